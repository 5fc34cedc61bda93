//! The reconnect storm (issue 12, item 5): S subscribers on one channel receive a steady publish
//! load, so each holds a position (epoch, seq); then the server is stopped with SIGTERM (relay
//! closes every WebSocket with 1012 and exits) and started again on the same port, and every
//! subscriber reconnects at once and resumes from its position. Reported: the time from the
//! SIGTERM (and from the new server's first `listening` line) until every subscriber is
//! subscribed again, the accept rate (resubscriptions per second), how many resumes the server
//! recovered, and the loss: seq gaps inside each subscriber's stream plus the tail it is missing
//! at the end (the channel's last seq minus the last it saw), counted only where the server said
//! `recovered:true` — a relay whose history does not survive the restart (`--backplane memory`)
//! answers `recovered:false` with a new epoch, and the messages published while the subscribers
//! were away are then not recoverable by design; a Redis backplane keeps them.
//!
//! relay-bench runs the server itself (`--server-cmd`, a shell command that must `exec` the
//! server so the pid is the server's, and listen on `--addr`), because it must restart it.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::json;
use tokio::time::Instant;

use crate::procfs::{self, Usage};
use crate::publish::{Mode, PubSpec, Publisher};
use crate::subs::{now_ns, Groups, Reconnect, SubSpec};
use crate::{check_loopback, default_prefix, human, mib, procs_for, Common};

#[derive(Args, Clone)]
pub struct StormArgs {
    #[command(flatten)]
    common: Common,
    /// The server command, run with `sh -c "exec CMD"` (twice: before and after the restart).
    /// It must listen on --addr, e.g. `taskset -c 0 relay serve --shards 1 --listen
    /// 127.0.0.1:7000 --max-connections-per-ip 0 --rate-limit 0`.
    #[arg(long)]
    server_cmd: String,
    /// Subscribers (one channel).
    #[arg(long, default_value_t = 10_000)]
    subs: u32,
    /// Publishes per second, before, during and after the storm (pipelined HTTP publisher).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Publishing before the restart (so every subscriber holds a position).
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    before: Duration,
    /// Publishing after every subscriber is back.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    after: Duration,
    /// How long the subscribers may take to come back.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    max_storm: Duration,
    /// A reconnecting subscriber retries every this long …
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    retry: Duration,
    /// … plus a random delay up to this (0: the whole fleet at once, the worst case).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    jitter: Duration,
}

/// The server process, started with `sh -c "exec CMD"`.
struct Server {
    child: Child,
    pid: String,
}

impl Server {
    /// Starts the server and waits (at most 20 s) for its `listening on` line.
    fn start(cmd: &str) -> Result<Self> {
        let mut child = Command::new("sh")
            .args(["-c", &format!("exec {cmd}")])
            .stdout(Stdio::piped())
            .spawn()
            .context("start the server")?;
        let pid = child.id().to_string();
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("server stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut told = false;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(l) = line else { break };
                if !told && l.contains("listening on") {
                    told = true;
                    let _ = tx.send(());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(()) => Ok(Server { child, pid }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the server did not print `listening on` within 20 s: {cmd}")
            }
        }
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid])
            .status();
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `max`); returns how long it took.
    async fn stop(mut self, max: Duration) -> Result<Duration> {
        let t = Instant::now();
        self.signal("TERM");
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(t.elapsed());
            }
            if t.elapsed() > max {
                self.signal("KILL");
                self.child.wait()?;
                return Ok(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Waits (at most 20 s) until `GET /readyz` answers anything but 503 (relay with a backplane
/// prints `listening` before its backplane is connected); returns how long it took.
async fn wait_ready(addr: std::net::SocketAddr) -> Result<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(
                format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            let end = crate::wire::head_end(&buf).ok_or_else(|| anyhow!("no response"))?;
            Ok::<_, anyhow::Error>(crate::wire::parse_head(&buf[..end])?.status)
        };
        if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
            if status != 503 {
                return Ok(t.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("the server was not ready within 20 s")
}

pub async fn run(a: &StormArgs) -> Result<()> {
    let c = &a.common;
    check_loopback(&c.addr)?;
    let prefix = c.prefix.clone().unwrap_or_else(default_prefix);
    let server = Server::start(&a.server_cmd)?;
    wait_ready(c.addr).await?;
    let spec = SubSpec {
        target: c.target,
        addr: c.addr,
        sse: false,
        prefix: prefix.clone(),
        channels: 1,
        src_ips: c.src_ips,
        sample: 1,
        concurrency: c.concurrency,
        reconnect: Some(Reconnect {
            retry_ms: a.retry.as_millis() as u64,
            jitter_ms: a.jitter.as_millis() as u64,
            give_up_ms: a.max_storm.as_millis() as u64,
        }),
        pusher: c.pusher_app.clone(),
        spans: false,
    };
    let groups = Groups::new(spec, procs_for(c, a.subs))?;
    let opened = groups.open(0, a.subs).await?;
    println!(
        "{:?}: {} of {} subscribers subscribed ({} failed)",
        c.target, opened.open, a.subs, opened.failed
    );
    if opened.open < u64::from(a.subs) {
        let _ = server.stop(Duration::from_secs(15)).await;
        bail!(
            "not every subscriber could subscribe (first error: {})",
            opened.first_error.unwrap_or_default()
        );
    }
    let mut publisher = Publisher::connect(PubSpec {
        target: c.target,
        addr: c.addr,
        mode: Mode::Pipelined,
        conns: 1,
        channels: 1,
        payload: a.payload,
        prefix,
        headers: a.common.publish_headers(),
        pusher: c.pusher_app.clone(),
    })
    .await?;
    publisher.run(a.rate, a.before).await?;
    publisher.settle(Duration::from_secs(3)).await;
    let before = groups.stats(false).await?;
    println!(
        "before the restart: {} messages delivered, channel at seq {}",
        before.received,
        publisher.top_per_channel()[0]
    );
    let rss_before = procfs::rss_bytes(&server.pid);

    // The storm. The publisher keeps its rate throughout (its publishes fail while no server
    // listens); the subscribers reconnect on their own.
    let drops0 = procfs::listen_drops();
    let t_term = Instant::now();
    let term_ns = now_ns();
    // Published in 250 ms runs until told to stop, so that it ends cleanly.
    let stop = std::rc::Rc::new(std::cell::Cell::new(false));
    let pub_task = {
        let mut p = publisher;
        let rate = a.rate;
        let stop = stop.clone();
        tokio::task::spawn_local(async move {
            while !stop.get() {
                p.run(rate, Duration::from_millis(250)).await?;
            }
            Ok::<_, anyhow::Error>(p)
        })
    };
    let took = server.stop(Duration::from_secs(30)).await?;
    let down = Instant::now();
    let server = Server::start(&a.server_cmd)?;
    let t_listen = Instant::now();
    let listen_ns = now_ns();
    let usage0 = Usage::now(std::slice::from_ref(&server.pid));
    let ready = wait_ready(c.addr).await?;
    println!(
        "old server exited {:.0} ms after SIGTERM; new one listening {:.0} ms later, ready {:.0} \
         ms after that",
        took.as_secs_f64() * 1e3,
        (t_listen - down).as_secs_f64() * 1e3,
        ready.as_secs_f64() * 1e3
    );
    let mut back;
    let mut last_line = Instant::now();
    loop {
        back = groups.stats(false).await?;
        if back.resumed + back.gave_up >= u64::from(a.subs) {
            break;
        }
        if t_term.elapsed() > a.max_storm {
            println!("the storm did not end within {} s", a.max_storm.as_secs());
            break;
        }
        if last_line.elapsed() > Duration::from_secs(1) {
            last_line = Instant::now();
            println!(
                "  {:>5.1} s: {} resubscribed, {} connect retries",
                t_term.elapsed().as_secs_f64(),
                back.resumed,
                back.retries
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let usage = Usage::now(std::slice::from_ref(&server.pid))
        .zip(usage0)
        .map(|(u1, u0)| u1.since(u0));
    // Machine-wide, but nothing else on the machine should be connecting now.
    let drops = procfs::listen_drops()
        .zip(drops0)
        .map(|((o1, d1), (o0, d0))| (o1.saturating_sub(o0), d1.saturating_sub(d0)));
    let secs = |ns: u64, from: u64| ns.saturating_sub(from) as f64 / 1e9;
    let all_back = back.last_resume_ns;
    let from_term = secs(all_back, term_ns);
    let from_listen = secs(all_back, listen_ns);
    let accept_rate = back.resumed as f64 / from_listen.max(1e-9);
    tokio::time::sleep(a.after).await;
    stop.set(true);
    let publisher = pub_task.await??;
    publisher.settle(Duration::from_secs(3)).await;
    // Let the last messages arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = groups.stats(false).await?;
    let top = publisher.top_per_channel()[0];
    let n = end.open;
    let tail = (n * top).saturating_sub(end.last_seq_sum);
    let (sent, acked, pub_errors) = publisher.totals();
    let rss_after = procfs::rss_bytes(&server.pid);
    let recovered_all = end.recovered == end.resumed && end.resumed > 0;
    let loss = if recovered_all {
        Some(end.seq_gaps + tail)
    } else {
        None
    };
    println!(
        "STORM: {} of {} resubscribed in {:.2} s from SIGTERM ({:.2} s from the new server's \
         listen): {}/s accepted and resumed; {} recovered, {} not; {} connect retries, {} gave \
         up; listen queue overflows {} (drops {}); loss {} (seq gaps {}, tail {} at seq {}); \
         duplicates {}; server CPU during the storm {}; RSS {} MiB before, {} MiB after; \
         publishes {} sent, {} acked, {} failed",
        back.resumed,
        a.subs,
        from_term,
        from_listen,
        human(accept_rate),
        end.recovered,
        end.resumed - end.recovered,
        end.retries,
        end.gave_up,
        drops.map_or("-".into(), |d| d.0.to_string()),
        drops.map_or("-".into(), |d| d.1.to_string()),
        loss.map_or(
            "- (not recovered: the history did not survive)".into(),
            |l| l.to_string()
        ),
        end.seq_gaps,
        tail,
        top,
        end.dups,
        usage.map_or("-".into(), |u| format!("{:.2} s", u.cpu_s)),
        rss_before.map_or("-".into(), |r| format!("{:.1}", mib(r))),
        rss_after.map_or("-".into(), |r| format!("{:.1}", mib(r))),
        sent,
        acked,
        pub_errors,
    );
    if let Some(u) = &end.first_unrecovered {
        println!("first resume not recovered: {u}");
    }
    if let Some(e) = &end.first_error {
        println!("first error seen by a subscriber: {e}");
    }
    if c.json {
        let out = json!({
            "scenario": "storm", "target": c.target, "subs": a.subs, "resumed": back.resumed,
            "secs_from_term": from_term, "secs_from_listen": from_listen,
            "accept_per_sec": accept_rate, "recovered": end.recovered,
            "not_recovered": end.resumed - end.recovered, "retries": end.retries,
            "gave_up": end.gave_up, "listen_overflows": drops.map(|d| d.0),
            "listen_drops": drops.map(|d| d.1), "loss": loss, "seq_gaps": end.seq_gaps, "tail": tail,
            "top": top, "dups": end.dups, "close_codes": end.close_codes,
            "old_exit_ms": took.as_secs_f64() * 1e3, "ready_ms": ready.as_secs_f64() * 1e3,
            "server_cpu_s": usage.map(|u| u.cpu_s), "rss_before": rss_before,
            "rss_after": rss_after, "pub_sent": sent, "pub_acked": acked,
            "pub_errors": pub_errors, "rate": a.rate, "retry_ms": a.retry.as_millis() as u64,
            "jitter_ms": a.jitter.as_millis() as u64,
        });
        println!("RESULT {out}");
    }
    let _ = server.stop(Duration::from_secs(15)).await;
    Ok(())
}
