//! The soak (issue 11): for minutes, an abusive mix next to a normal fan-out load, with the
//! server's RSS every few seconds, and the normal load's latency and loss.
//!
//! The normal load: `--subs` WebSocket subscribers on one channel, the pipelined HTTP publisher
//! at `--rate`. The abusers, each bounded in count (connections) and rate, each on/off by its
//! flag (0 = off):
//! - **big publishes** to distinct channels (`--big-rate` per second of `--big-size` bytes, each
//!   to a new channel: history grows with every channel);
//! - **history readers** that never read (`--history-readers` connections, each sends
//!   `GET /api/history/<a channel holding --hist-fill big messages>?since=0` and reads nothing);
//! - **slow subscribers** (`--slow-subs` WebSocket connections subscribed to a channel that gets
//!   every `--slow-every`-th big publish, reading nothing);
//! - **presence members with large info** (`--presence-conns` connections, each a member of
//!   `--presence-per-conn` channels `presence:…` with `--presence-info` bytes of info; the server
//!   needs `--presence-channels 'presence:*'`); every period `--presence-churn` of them vanish
//!   (socket dropped, no close frame) and come back as new members;
//! - **reads of unknown channels** (`--unknown-rate` `GET /api/history/<new name>` per second,
//!   pipelined on one connection);
//! - **slowloris bodies** (`--slowloris` connections sending a `POST /api/publish` with
//!   `Content-Length: 60000`, one byte every `--slowloris-every`).
//!
//! With `--abuser-addrs N` every abusive request carries `X-Forwarded-For: 203.0.113.k` (k in
//! 1..=N): internet clients arriving through a load balancer on a private address, which relay
//! trusts by default, so its per-address limits see N attackers. The three request streams
//! each have their own address (big publishes 1, the slow subscribers' publishes 2, unknown
//! reads 3), so that what the per-address API limit refuses can be told apart; the connections
//! (history readers, slow subscribers, presence, slowloris) are spread over 4..=N.
//! The normal load (and the fill of the history channel) comes from loopback without one, like
//! a backend on the private network, and sends `--api-key` when given.
//!
//! Connections the server closes are counted (`closed`) and opened again at the next period, so
//! the pressure lasts. Checking whether a connection that never reads was closed does not read
//! it: tokio's readiness reports the peer's FIN (`is_read_closed`) even with unread bytes.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::procfs::{self, CpuMeter};
use crate::publish::{Mode, PubSpec, Publisher};
use crate::subs::{Groups, SubSpec};
use crate::wire;
use crate::{check_loopback, default_prefix, mib, ms, procs_for, self_pids, server_pids, Common};

#[derive(Args, Clone)]
pub struct SoakArgs {
    #[command(flatten)]
    common: Common,
    /// How long the soak lasts.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// One report line per period.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Normal load: subscribers (one channel).
    #[arg(long, default_value_t = 1000)]
    subs: u32,
    /// Normal load: publishes per second (pipelined HTTP), 64-byte payloads.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Big publishes per second, each to a new channel (0: off).
    #[arg(long, default_value_t = 50.0)]
    big_rate: f64,
    /// Bytes of each big publish's data.
    #[arg(long, default_value_t = 60_000)]
    big_size: usize,
    /// Connections asking for a large history and never reading the answer (0: off).
    #[arg(long, default_value_t = 15)]
    history_readers: u32,
    /// Big messages published first to the channel the history readers ask for.
    #[arg(long, default_value_t = 1000)]
    hist_fill: u32,
    /// Subscribers that never read, on a channel that gets big messages (0: off).
    #[arg(long, default_value_t = 200)]
    slow_subs: u32,
    /// Every this many big publishes, one goes to the slow subscribers' channel.
    #[arg(long, default_value_t = 5)]
    slow_every: u32,
    /// Presence connections (0: off).
    #[arg(long, default_value_t = 400)]
    presence_conns: u32,
    /// Presence channels each presence connection is a member of (distinct channels).
    #[arg(long, default_value_t = 128)]
    presence_per_conn: u32,
    /// Bytes of presence info per member.
    #[arg(long, default_value_t = 4000)]
    presence_info: usize,
    /// Share of the presence connections that vanish and come back each period.
    #[arg(long, default_value_t = 0.1)]
    presence_churn: f64,
    /// Reads of unknown channels per second (0: off).
    #[arg(long, default_value_t = 1000.0)]
    unknown_rate: f64,
    /// Slowloris connections (0: off).
    #[arg(long, default_value_t = 200)]
    slowloris: u32,
    /// A slowloris connection sends one body byte this often.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    slowloris_every: Duration,
    /// Client addresses the abusers claim in `X-Forwarded-For` (0: none, they come from
    /// loopback like the normal load).
    #[arg(long, default_value_t = 0)]
    abuser_addrs: u32,
}

/// What the abusers did (cumulative).
#[derive(Default)]
struct Abuse {
    hist_open: Cell<u64>,
    hist_closed: Cell<u64>,
    slow_open: Cell<u64>,
    slow_closed: Cell<u64>,
    presence_open: Cell<u64>,
    presence_members: Cell<u64>,
    presence_vanished: Cell<u64>,
    presence_closed: Cell<u64>,
    unknown_ok: Cell<u64>,
    unknown_err: Cell<u64>,
    /// Answers to the unknown-channel reads, by HTTP status.
    unknown_status: std::cell::RefCell<std::collections::BTreeMap<u16, u64>>,
    /// `overloaded` errors the presence connections were sent (refused subscriptions).
    presence_refused: Cell<u64>,
    loris_open: Cell<u64>,
    loris_closed: Cell<u64>,
    errors: Cell<u64>,
    first_error: std::cell::RefCell<Option<String>>,
}

impl Abuse {
    fn error(&self, e: impl std::fmt::Display) {
        self.errors.set(self.errors.get() + 1);
        let mut f = self.first_error.borrow_mut();
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }
}

/// The header line of address `k` (1-based) of `addrs` (empty without --abuser-addrs).
fn xff(addrs: u32, k: u32) -> String {
    if addrs == 0 {
        return String::new();
    }
    format!(
        "X-Forwarded-For: 203.0.113.{}\r\n",
        1 + (k - 1) % addrs.min(254)
    )
}

fn statuses(m: &std::collections::BTreeMap<u16, u64>) -> String {
    let v: Vec<String> = m.iter().map(|(s, n)| format!("{s}×{n}")).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(" ")
    }
}

fn inc(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

fn dec(c: &Cell<u64>) {
    c.set(c.get().saturating_sub(1));
}

pub async fn run(a: &SoakArgs) -> Result<()> {
    let c = &a.common;
    check_loopback(&c.addr)?;
    let server = server_pids(c);
    if server.is_empty() {
        bail!("soak needs --server-pid (its RSS is the measurement)");
    }
    let prefix = c.prefix.clone().unwrap_or_else(default_prefix);
    let rss0 = procfs::rss_sum(&server);
    // The normal load.
    let groups = Groups::new(
        SubSpec {
            target: c.target,
            addr: c.addr,
            sse: false,
            prefix: format!("{prefix}n"),
            channels: 1,
            src_ips: c.src_ips,
            sample: 1,
            concurrency: c.concurrency,
            reconnect: None,
            pusher: c.pusher_app.clone(),
            spans: false,
        },
        procs_for(c, a.subs),
    )?;
    let opened = groups.open(0, a.subs).await?;
    let legit = c.publish_headers();
    let mut normal = Publisher::connect(pub_spec(c, &format!("{prefix}n"), 1, 64, &legit)).await?;
    // Every abusive connection takes the next address of 4..=N (or 1..=N when N < 4).
    let mut who = 0u32;
    let first = if a.abuser_addrs > 3 { 4 } else { 1 };
    let mut next_xff = || {
        who += 1;
        let span = a.abuser_addrs.saturating_sub(first - 1).max(1);
        xff(a.abuser_addrs, first + (who - 1) % span)
    };
    println!(
        "soak of {} s: {} normal subscribers ({} failed), {}/s to them; abusers: big {}/s × {} B \
         to new channels, {} history readers over {} × {} B, {} slow subscribers, {} presence \
         connections × {} channels × {} B info (churn {:.0}%/period), {}/s unknown-channel reads, \
         {} slowloris; server RSS before: {}",
        a.duration.as_secs(),
        opened.open,
        opened.failed,
        a.rate,
        a.big_rate,
        a.big_size,
        a.history_readers,
        a.hist_fill,
        a.big_size,
        a.slow_subs,
        a.presence_conns,
        a.presence_per_conn,
        a.presence_info,
        a.presence_churn * 100.0,
        a.unknown_rate,
        a.slowloris,
        rss0.map_or("-".into(), |r| format!("{:.1} MiB", mib(r)))
    );
    let start = Instant::now();
    let end = start + a.duration;
    let abuse = Rc::new(Abuse::default());

    // The history the readers will ask for, filled first.
    let hist_channel = format!("{prefix}hist0");
    if a.history_readers > 0 && a.hist_fill > 0 {
        let mut p =
            Publisher::connect(pub_spec(c, &format!("{prefix}hist"), 1, a.big_size, &legit))
                .await?;
        let rate = 1000.0;
        p.run(rate, Duration::from_secs_f64(f64::from(a.hist_fill) / rate))
            .await?;
        p.settle(Duration::from_secs(10)).await;
        let (sent, acked, errors) = p.totals();
        println!("history channel filled: {sent} sent, {acked} acked, {errors} errors");
    }

    // Abusers: each a task until `end`.
    let mut tasks = Vec::new();
    let mut big_task = None;
    if a.big_rate > 0.0 {
        let channels = ((a.big_rate * a.duration.as_secs_f64()).ceil() as u32).max(1);
        let (h1, h2) = (xff(a.abuser_addrs, 1), xff(a.abuser_addrs, 2));
        let big = Publisher::connect(pub_spec(
            c,
            &format!("{prefix}big"),
            channels,
            a.big_size,
            &h1,
        ));
        let slow = Publisher::connect(pub_spec(c, &format!("{prefix}slow"), 1, a.big_size, &h2));
        let (mut big, mut slow) = (big.await?, slow.await?);
        let (big_rate, slow_rate) = (a.big_rate, a.big_rate / f64::from(a.slow_every.max(1)));
        let abuse = abuse.clone();
        big_task = Some(tokio::task::spawn_local(async move {
            while Instant::now() < end {
                let chunk = Duration::from_millis(500).min(end - Instant::now());
                let (r1, r2) = tokio::join!(big.run(big_rate, chunk), slow.run(slow_rate, chunk));
                if let Err(e) = r1.and(r2) {
                    abuse.error(format!("big publisher: {e:#}"));
                }
            }
            let (s1, a1, e1) = big.totals();
            let (s2, a2, e2) = slow.totals();
            let mut st = big.statuses();
            for (k, v) in slow.statuses() {
                *st.entry(k).or_default() += v;
            }
            println!(
                "big publishes: {} sent, {} acked, {} errors (first: {}); statuses {}",
                s1 + s2,
                a1 + a2,
                e1 + e2,
                big.first_error().or(slow.first_error()).unwrap_or_default(),
                statuses(&st)
            );
            st
        }));
    }
    for i in 0..a.history_readers {
        let req = format!(
            "GET /api/history/{hist_channel}?since=0 HTTP/1.1\r\nHost: {}\r\n{}\r\n",
            c.addr,
            next_xff()
        );
        tasks.push(hold_loop(
            c.addr,
            abuse.clone(),
            end,
            a.every,
            // Staggered: one more reader per period.
            a.every * i,
            Kind::History(req),
        ));
    }
    for i in 0..a.slow_subs {
        let _ = i;
        tasks.push(hold_loop(
            c.addr,
            abuse.clone(),
            end,
            a.every,
            Duration::ZERO,
            Kind::Slow(format!("{prefix}slow0"), next_xff()),
        ));
    }
    for i in 0..a.slowloris {
        let _ = i;
        tasks.push(hold_loop(
            c.addr,
            abuse.clone(),
            end,
            a.slowloris_every,
            Duration::ZERO,
            Kind::Loris(next_xff()),
        ));
    }
    let info = format!(
        r#"{{"x":"{}"}}"#,
        "i".repeat(a.presence_info.saturating_sub(8))
    );
    let churn_every = if a.presence_churn > 0.0 {
        Some(a.every.div_f64(a.presence_churn))
    } else {
        None
    };
    for i in 0..a.presence_conns {
        tasks.push(presence_loop(
            c.addr,
            abuse.clone(),
            end,
            PresenceSpec {
                prefix: format!("presence:{prefix}m{i}-"),
                xff: next_xff(),
                channels: a.presence_per_conn,
                info: info.clone(),
                // Lifetimes spread evenly over 0.5–1.5 × the churn period, so that the share
                // `--presence-churn` of the connections vanishes each period.
                lifetime: churn_every.map(|p| {
                    p.mul_f64(0.5 + (f64::from(i) + 0.5) / f64::from(a.presence_conns))
                        .max(Duration::from_secs(1))
                }),
            },
        ));
    }
    if a.unknown_rate > 0.0 {
        tasks.push(unknown_loop(
            c.addr,
            abuse.clone(),
            end,
            a.unknown_rate,
            format!("{prefix}u"),
            xff(a.abuser_addrs, 3),
        ));
    }

    // The normal load, one period at a time, and the report lines.
    let me = self_pids(&groups);
    let mut rows = Vec::new();
    let mut expected = 0u64;
    let mut delivered = 0u64;
    let mut all_lat = crate::subs::new_hist()?;
    let mut rss_max = 0u64;
    let mut closed = 0u64;
    groups.stats(true).await?;
    println!(
        "{:>6} {:>9} | normal: {:>8} {:>7} {:>7} {:>6} {:>6} | abusers: {:>5} {:>9} {:>9} {:>9} \
         {:>11} {:>9} | {:>5}",
        "t s",
        "RSS MiB",
        "deliv/s",
        "p50 ms",
        "p99 ms",
        "loss",
        "closed",
        "hist",
        "slow",
        "presence",
        "members",
        "unknown ok",
        "loris",
        "bench"
    );
    while Instant::now() < end {
        let period = a.every.min(end - Instant::now());
        let acked0 = normal.acked_per_channel()[0];
        let cpu = CpuMeter::start(&me);
        normal.run(a.rate, period).await?;
        let acked1 = normal.acked_per_channel()[0];
        let s = groups.stats(true).await?;
        expected += (acked1 - acked0) * u64::from(a.subs);
        delivered += s.received - s.dups;
        closed += s.closed;
        let h = s.histogram()?;
        all_lat.add(&h).ok();
        let rss = procfs::rss_sum(&server).unwrap_or(0);
        rss_max = rss_max.max(rss);
        let t = start.elapsed().as_secs_f64();
        // Loss so far, not counting what may still be in flight (one period's worth).
        let pending = (a.rate * period.as_secs_f64()) as u64 * u64::from(a.subs);
        let loss = expected.saturating_sub(delivered).saturating_sub(pending);
        let bench = cpu.cores().unwrap_or(0.0);
        println!(
            "{:>6.0} {:>9.1} | normal: {:>8.0} {:>7.2} {:>7.2} {:>6} {:>6} | abusers: {:>5} \
             {:>4}/{:<4} {:>4}/{:<4} {:>9} {:>11} {:>4}/{:<4} | {:>4.0}%",
            t,
            mib(rss),
            (s.received - s.dups) as f64 / period.as_secs_f64(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            loss,
            closed,
            abuse.hist_open.get(),
            abuse.slow_open.get(),
            abuse.slow_closed.get(),
            abuse.presence_open.get(),
            abuse.presence_vanished.get(),
            abuse.presence_members.get(),
            abuse.unknown_ok.get(),
            abuse.loris_open.get(),
            abuse.loris_closed.get(),
            bench * 100.0
        );
        rows.push(json!({
            "t": t, "rss": rss, "p50_ms": ms(h.value_at_quantile(0.5)),
            "p99_ms": ms(h.value_at_quantile(0.99)), "loss_so_far": loss, "closed": closed,
            "hist_open": abuse.hist_open.get(), "hist_closed": abuse.hist_closed.get(),
            "slow_open": abuse.slow_open.get(), "slow_closed": abuse.slow_closed.get(),
            "presence_open": abuse.presence_open.get(),
            "presence_members": abuse.presence_members.get(),
            "presence_vanished": abuse.presence_vanished.get(),
            "presence_closed": abuse.presence_closed.get(),
            "unknown_ok": abuse.unknown_ok.get(), "unknown_err": abuse.unknown_err.get(),
            "loris_open": abuse.loris_open.get(), "loris_closed": abuse.loris_closed.get(),
            "bench_cpu": bench,
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let big_statuses = match big_task {
        Some(t) => t.await.unwrap_or_default(),
        None => Default::default(),
    };
    // The normal load's last messages.
    let acked0 = normal.acked_per_channel()[0];
    normal.settle(Duration::from_secs(5)).await;
    expected += (normal.acked_per_channel()[0] - acked0) * u64::from(a.subs);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s = groups.stats(false).await?;
        if delivered + s.received - s.dups >= expected || Instant::now() > deadline {
            break;
        }
    }
    delivered += s.received - s.dups;
    all_lat.add(&s.histogram()?).ok();
    let loss = expected.saturating_sub(delivered);
    let (_, _, pub_errors) = normal.totals();
    let rss_end = procfs::rss_sum(&server);
    println!(
        "SOAK: normal load {} of {} delivered, loss {}, {} closed, {} publish errors; p50 {:.2} \
         p99 {:.2} p99.9 {:.2} max {:.2} ms; server RSS {} → max {:.1} → end {} MiB; abusers: big \
         publishes {}, unknown-channel reads {}, presence subscriptions refused {}, closed: \
         history readers {}, slow subscribers {}, presence {}, slowloris {}; abuser errors {} \
         (first: {})",
        delivered,
        expected,
        loss,
        closed + s.closed,
        pub_errors,
        ms(all_lat.value_at_quantile(0.5)),
        ms(all_lat.value_at_quantile(0.99)),
        ms(all_lat.value_at_quantile(0.999)),
        ms(all_lat.max()),
        rss0.map_or("-".into(), |r| format!("{:.1}", mib(r))),
        mib(rss_max),
        rss_end.map_or("-".into(), |r| format!("{:.1}", mib(r))),
        statuses(&big_statuses),
        statuses(&abuse.unknown_status.borrow()),
        abuse.presence_refused.get(),
        abuse.hist_closed.get(),
        abuse.slow_closed.get(),
        abuse.presence_closed.get(),
        abuse.loris_closed.get(),
        abuse.errors.get(),
        abuse.first_error.borrow().clone().unwrap_or_default()
    );
    if c.json {
        let out = json!({
            "scenario": "soak", "target": c.target, "duration_s": a.duration.as_secs_f64(),
            "subs": a.subs, "rate": a.rate, "expected": expected, "delivered": delivered,
            "loss": loss, "closed": closed + s.closed, "pub_errors": pub_errors,
            "p50_ms": ms(all_lat.value_at_quantile(0.5)),
            "p99_ms": ms(all_lat.value_at_quantile(0.99)),
            "max_ms": ms(all_lat.max()), "rss_before": rss0, "rss_max": rss_max,
            "rss_end": rss_end, "abuser_errors": abuse.errors.get(), "series": rows,
            "big_statuses": big_statuses, "unknown_statuses": *abuse.unknown_status.borrow(),
            "presence_refused": abuse.presence_refused.get(),
            "hist_closed": abuse.hist_closed.get(), "slow_closed": abuse.slow_closed.get(),
            "presence_closed": abuse.presence_closed.get(),
            "loris_closed": abuse.loris_closed.get(),
        });
        println!("RESULT {out}");
    }
    Ok(())
}

fn pub_spec(c: &Common, prefix: &str, channels: u32, payload: usize, headers: &str) -> PubSpec {
    PubSpec {
        target: c.target,
        addr: c.addr,
        mode: Mode::Pipelined,
        conns: 1,
        channels,
        payload,
        prefix: prefix.to_string(),
        headers: headers.to_string(),
        pusher: c.pusher_app.clone(),
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Connects and upgrades to a WebSocket; returns the stream (bytes after the 101 are dropped:
/// these connections do not look at what they receive).
async fn ws_connect(addr: SocketAddr, extra: &str) -> Result<TcpStream> {
    let mut s = connect(addr).await?;
    s.write_all(wire::upgrade_request_with(&addr.to_string(), "/ws", extra).as_bytes())
        .await?;
    wire::read_upgrade(&mut s).await?;
    Ok(s)
}

fn text_frame(cmd: &str) -> Vec<u8> {
    let mut f = Vec::new();
    wire::client_frame(wire::OP_TEXT, cmd.as_bytes(), &mut f);
    f
}

/// Whether the peer closed (FIN or an error), looked at without reading.
async fn peer_closed(s: &TcpStream) -> bool {
    match tokio::time::timeout(Duration::ZERO, s.ready(Interest::READABLE)).await {
        Ok(Ok(r)) => r.is_read_closed() || r.is_error(),
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

/// The connections that hold without reading.
enum Kind {
    /// A history request whose answer is never read.
    History(String),
    /// A WebSocket subscriber of this channel that never reads (and its header lines).
    Slow(String, String),
    /// A publish whose body comes one byte at a time (its header lines).
    Loris(String),
}

/// Holds one abusive connection until `end`: opens it (after `delay`), then every `every`
/// checks whether the server closed it (and, for slowloris, sends a byte), and opens it again
/// when it was.
fn hold_loop(
    addr: SocketAddr,
    abuse: Rc<Abuse>,
    end: Instant,
    every: Duration,
    delay: Duration,
    kind: Kind,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        tokio::time::sleep_until((Instant::now() + delay).min(end)).await;
        let (open, closed) = match kind {
            Kind::History(_) => (&abuse.hist_open, &abuse.hist_closed),
            Kind::Slow(..) => (&abuse.slow_open, &abuse.slow_closed),
            Kind::Loris(_) => (&abuse.loris_open, &abuse.loris_closed),
        };
        while Instant::now() < end {
            let opened = async {
                match &kind {
                    Kind::History(req) => {
                        let mut s = connect(addr).await?;
                        s.write_all(req.as_bytes()).await?;
                        Ok::<_, anyhow::Error>(s)
                    }
                    Kind::Slow(ch, extra) => {
                        let mut s = ws_connect(addr, extra).await?;
                        let cmd = format!(r#"{{"type":"subscribe","channel":"{ch}"}}"#);
                        s.write_all(&text_frame(&cmd)).await?;
                        Ok(s)
                    }
                    Kind::Loris(extra) => {
                        let mut s = connect(addr).await?;
                        let head = format!(
                            "POST /api/publish HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
                             application/json\r\n{extra}Content-Length: 60000\r\n\r\n{{"
                        );
                        s.write_all(head.as_bytes()).await?;
                        Ok(s)
                    }
                }
            };
            let mut s = match tokio::time::timeout(Duration::from_secs(5), opened).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    abuse.error(format!("open: {e:#}"));
                    tokio::time::sleep(every.min(end - Instant::now().min(end))).await;
                    continue;
                }
                Err(_) => {
                    abuse.error("open: timed out");
                    continue;
                }
            };
            inc(open);
            loop {
                tokio::time::sleep_until((Instant::now() + every).min(end)).await;
                if Instant::now() >= end {
                    dec(open);
                    return;
                }
                let gone = match kind {
                    Kind::Loris(_) => s.write_all(b" ").await.is_err() || peer_closed(&s).await,
                    _ => peer_closed(&s).await,
                };
                if gone {
                    dec(open);
                    inc(closed);
                    break;
                }
            }
        }
    })
}

struct PresenceSpec {
    prefix: String,
    channels: u32,
    info: String,
    /// Header lines of its upgrade request.
    xff: String,
    /// How long a connection lives before it vanishes (no close frame) and comes back.
    lifetime: Option<Duration>,
}

/// One presence connection until `end`: a member of `channels` channels with a large info,
/// reading and discarding what comes, heartbeating every 10 s; it vanishes after `lifetime`
/// and comes back as a new member.
fn presence_loop(
    addr: SocketAddr,
    abuse: Rc<Abuse>,
    end: Instant,
    p: PresenceSpec,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let mut gen = 0u32;
        while Instant::now() < end {
            gen += 1;
            let mut s = match tokio::time::timeout(Duration::from_secs(5), ws_connect(addr, &p.xff))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    abuse.error(format!("presence: {e:#}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(_) => continue,
            };
            let mut out = Vec::new();
            for j in 0..p.channels {
                let cmd = format!(
                    r#"{{"type":"subscribe","channel":"{}{j}","presence":{{"user":"u{gen}-{j}","info":{}}}}}"#,
                    p.prefix, p.info
                );
                wire::client_frame(wire::OP_TEXT, cmd.as_bytes(), &mut out);
            }
            if s.write_all(&out).await.is_err() {
                continue;
            }
            inc(&abuse.presence_open);
            abuse
                .presence_members
                .set(abuse.presence_members.get() + u64::from(p.channels));
            let until = p.lifetime.map_or(end, |l| (Instant::now() + l).min(end));
            let mut buf = vec![0u8; 16 * 1024];
            // What may hold the start of an `overloaded` split by the read before.
            let mut carry = Vec::new();
            let mut beat = tokio::time::interval(Duration::from_secs(10));
            let heartbeat = text_frame(r#"{"type":"heartbeat"}"#);
            let closed = loop {
                tokio::select! {
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break true,
                        // Pings are answered by nothing: the heartbeats keep it alive.
                        Ok(n) => {
                            const WORD: &[u8] = b"\"overloaded\"";
                            carry.extend_from_slice(&buf[..n]);
                            let found = memchr::memmem::find_iter(&carry, WORD).count() as u64;
                            abuse.presence_refused.set(abuse.presence_refused.get() + found);
                            let keep = carry.len().min(WORD.len() - 1);
                            carry.drain(..carry.len() - keep);
                        }
                    },
                    _ = beat.tick() => {
                        if s.write_all(&heartbeat).await.is_err() {
                            break true;
                        }
                    }
                    _ = tokio::time::sleep_until(until) => break false,
                }
            };
            dec(&abuse.presence_open);
            abuse.presence_members.set(
                abuse
                    .presence_members
                    .get()
                    .saturating_sub(u64::from(p.channels)),
            );
            if closed {
                inc(&abuse.presence_closed);
            } else if Instant::now() < end {
                // Vanish: drop the socket without a close frame (the members stay until their
                // presence timeout).
                inc(&abuse.presence_vanished);
            }
            drop(s);
        }
    })
}

/// `GET /api/history/<new name>` at `rate` per second, pipelined on one connection (reopened
/// when the server closes it); the responses are read and counted.
fn unknown_loop(
    addr: SocketAddr,
    abuse: Rc<Abuse>,
    end: Instant,
    rate: f64,
    prefix: String,
    extra: String,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let mut n = 0u64;
        while Instant::now() < end {
            let s = match connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    abuse.error(format!("unknown reads: {e:#}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let (mut rd, mut wr) = s.into_split();
            let in_flight = Rc::new(Cell::new(0u64));
            let reader = {
                let (abuse, in_flight) = (abuse.clone(), in_flight.clone());
                tokio::task::spawn_local(async move {
                    let mut buf = Vec::new();
                    let mut tmp = vec![0u8; 64 * 1024];
                    loop {
                        let mut off = 0;
                        while let Some(e) = wire::head_end(&buf[off..]) {
                            let Ok(h) = wire::parse_head(&buf[off..off + e]) else {
                                return;
                            };
                            let len = h.content_length.unwrap_or(0);
                            if buf.len() - off < e + len {
                                break;
                            }
                            off += e + len;
                            dec(&in_flight);
                            *abuse
                                .unknown_status
                                .borrow_mut()
                                .entry(h.status)
                                .or_default() += 1;
                            if h.status < 500 {
                                inc(&abuse.unknown_ok);
                            } else {
                                inc(&abuse.unknown_err);
                            }
                        }
                        buf.drain(..off);
                        match rd.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&tmp[..k]),
                        }
                    }
                })
            };
            let start = Instant::now();
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut out = Vec::new();
            loop {
                tick.tick().await;
                if reader.is_finished() || Instant::now() >= end {
                    break;
                }
                let due = (start.elapsed().as_secs_f64() * rate) as u64;
                // Bounded: not more than a second's worth unanswered.
                if in_flight.get() > rate as u64 {
                    sent = due;
                    continue;
                }
                out.clear();
                while sent < due {
                    sent += 1;
                    n += 1;
                    out.extend_from_slice(
                        format!(
                            "GET /api/history/{prefix}{n} HTTP/1.1\r\nHost: {addr}\r\n{extra}\r\n"
                        )
                        .as_bytes(),
                    );
                    inc(&in_flight);
                }
                if !out.is_empty() && wr.write_all(&out).await.is_err() {
                    break;
                }
            }
            reader.abort();
            abuse
                .unknown_err
                .set(abuse.unknown_err.get() + in_flight.get());
        }
    })
}
