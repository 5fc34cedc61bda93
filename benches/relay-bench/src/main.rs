//! relay-bench: the load generator of relay (issues 5, 11, 12), and of the comparators it is
//! measured against (a uWebSockets server, nginx + Nchan, a Node `ws` relay: `--target`).
//!
//! Scenarios: `fanout` (S subscribers on C channels, open-loop publish rate R), `max` (steps R up
//! ×1.5 per 8 s step until loss or p99 passes a bound), `sse` (fanout over SSE), `idle` (server
//! RSS per idle subscribed connection), `connect` (WebSocket handshakes per second), `storm`
//! (every subscriber dropped by a server restart at once: time until all resumed, loss, accept
//! rate), `soak` (an abusive mix next to a normal fan-out load, RSS over time), `hold`
//! (subscribers that only count, for autocannon runs). The default publisher is issue 12's: one
//! keep-alive HTTP connection, requests pipelined, written once per 1 ms tick (`publish.rs`).
//! Every fan-out step reports the server's cost per delivery from /proc (CPU ns, read/write
//! syscalls, context switches). It speaks WebSocket and HTTP by hand over tokio sockets on one
//! thread: pin it with `taskset`. It reports its own CPU and says when it was the bottleneck.
//!
//! Loopback only: every address it connects to must be in 127.0.0.0/8.

mod procfs;
mod publish;
mod pusher;
mod soak;
mod storm;
mod subs;
mod wire;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use procfs::{CpuMeter, Usage};
use publish::{Mode, PubSpec, Publisher};
use subs::{Groups, Stats, SubSpec, Target};

#[derive(Parser)]
#[command(
    name = "relay-bench",
    version,
    about = "Load generator for relay and its comparators"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// S subscribers on C channels, an open-loop publisher at R msg/s for D: deliveries/s, loss,
    /// duplicates, reordering, latency percentiles, server CPU and RSS.
    Fanout(LoadArgs),
    /// Steps the publish rate up (×factor per step) until loss, a closed subscriber, a publisher
    /// that cannot keep the rate, or p99 > --p99-max; reports the best step.
    Max(MaxArgs),
    /// Fan-out over SSE subscribers (`--step-up` to search the maximum like `max`).
    Sse(SseArgs),
    /// N idle subscribed WebSocket connections: server RSS per connection and its slope.
    Idle(IdleArgs),
    /// WebSocket handshakes per second (connect, upgrade, close handshake), bounded.
    Connect(ConnectArgs),
    /// Reconnect storm: S subscribers with positions, the server restarted (relay: SIGTERM, which
    /// closes every WebSocket with 1012) and started again on the same port; time until all
    /// resumed, loss, accept rate. relay-bench runs the server itself (--server-cmd).
    Storm(storm::StormArgs),
    /// Soak (issue 11): an abusive mix for minutes next to a normal fan-out load; server RSS
    /// every few seconds, the normal load's p99 and loss.
    Soak(soak::SoakArgs),
    /// Subscribers that only read and count (prints `ready` once subscribed), e.g. while
    /// autocannon publishes.
    Hold(HoldArgs),
    /// Internal: a worker process holding part of the connections (see --procs).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        spec: String,
    },
}

#[derive(Args, Clone)]
pub struct Common {
    /// Server kind (URL shapes and message framing differ).
    #[arg(long, value_enum, default_value = "relay")]
    pub target: Target,
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Server process(es) whose CPU and RSS to report (repeatable; e.g. nginx's worker).
    #[arg(long = "server-pid")]
    pub server_pid: Vec<u32>,
    /// Also print one `RESULT {json}` line.
    #[arg(long)]
    pub json: bool,
    /// Channel name prefix (default: a fresh one per run, so no history is replayed).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Spread subscriber source addresses over 127.0.0.1..=127.0.0.N (0: kernel's choice).
    #[arg(long, default_value_t = 32)]
    pub src_ips: u32,
    /// Worker processes holding the subscribers (0: one per 15,000 connections, at least 1).
    #[arg(long, default_value_t = 0)]
    pub procs: u32,
    /// Connection setups in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: u32,
    /// API key the publisher sends (`Authorization: Bearer`; relay's `--api-key`), so that the
    /// load is counted against the key, not the per-address API rate limit.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The Pusher app of `--target pusher`, as ID:KEY:SECRET: subscribers connect to
    /// `/app/KEY`; `--publish pusher-api` signs its `POST /apps/ID/events` with SECRET; other
    /// publish shapes (relay only) post to relay channel `pusher/ID/CH`.
    #[arg(long, default_value = "bench:bench-key:bench-secret")]
    pub pusher_app: pusher::PusherApp,
}

impl Common {
    /// The header lines of the load's own HTTP publishes.
    pub fn publish_headers(&self) -> String {
        self.api_key
            .as_ref()
            .map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"))
    }
}

#[derive(Args, Clone)]
struct LoadArgs {
    #[command(flatten)]
    common: Common,
    /// Subscribers.
    #[arg(long, default_value_t = 1000)]
    subs: u32,
    /// Channels (subscriber i is on channel i mod C; publishes go round-robin).
    #[arg(long, default_value_t = 1)]
    channels: u32,
    /// Publishes per second (all channels together).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Bytes of `data` in each publish (it carries a timestamp and a sequence).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// How long to publish (per step for `max`).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Publishing before the first (measured) step, at its rate.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The publish shape.
    #[arg(long, value_enum, default_value = "pipelined")]
    publish: Mode,
    /// Publisher connections [default: 8 for http, else 1].
    #[arg(long)]
    publishers: Option<u32>,
    /// Record the latency of one message in N (per subscriber).
    #[arg(long, default_value_t = 1)]
    sample: u32,
    /// Also report, over the step's publishes, the latency of each publish's first and last
    /// delivery and the spread between them (where a fan-out pass starts and ends as the
    /// subscribers see it). Keeps two numbers per publish: for steady rates.
    #[arg(long)]
    spans: bool,
    /// With --spans, also write each publish's first and last delivery latency (µs) to this
    /// file, one line per publish by publisher and sequence (`step publisher seq first_us
    /// last_us`; with one publisher, publish order): to see whether slow passes come alone or
    /// in runs, whatever the server.
    #[arg(long, requires = "spans")]
    spans_out: Option<std::path::PathBuf>,
    /// Also count every syscall of the server in each step with `perf stat -e
    /// raw_syscalls:sys_enter` (all syscalls, not only reads and writes; adds a little cost to
    /// each of the server's syscalls).
    #[arg(long)]
    perf_syscalls: bool,
    /// Before each step, wait up to this long for the rest of the machine (everything but the
    /// server and relay-bench) to use less than --quiet cores: other work on a 2-core machine
    /// skews every figure. 0: do not wait.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    quiet_wait: Duration,
    /// Before each step, publish this long at the step's rate, wait for those deliveries and
    /// start the step right after them, uncounted. A step that starts after a pause longer than
    /// the TCP retransmission timeout (200 ms on loopback; the quiet wait and the previous
    /// step's drain are longer) finds every subscriber's socket in quick-ack mode: its first 16
    /// segments are each acknowledged at once, and on loopback the server's send carries that
    /// acknowledgement's processing too (the first 16 publishes of a 20/s step fan out about
    /// 30 % slower, for every server). 0: none.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    lead_in: Duration,
    /// Cores the rest of the machine may use for a step to count as quiet.
    #[arg(long, default_value_t = 0.25)]
    quiet: f64,
    /// A failed step that was noisy (other work above --quiet) is run again, after waiting for
    /// quiet, up to this many times (on top of --retry).
    #[arg(long, default_value_t = 3)]
    noisy_retries: u32,
}

#[derive(Args, Clone)]
struct MaxArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// First step's publish rate (publishes/s).
    #[arg(long, default_value_t = 100.0)]
    start_rate: f64,
    /// Rate multiplier per step.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    /// A step fails when its p99 passes this.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    p99_max: Duration,
    #[arg(long, default_value_t = 30)]
    max_steps: u32,
    /// Extra steps between the best passing and the first failing rate (geometric midpoint;
    /// 0: the result is the last passing step of the ×factor grid, as in issue 12).
    #[arg(long, default_value_t = 0)]
    refine: u32,
    /// Run a failed step again this many times before taking the failure; not when subscribers
    /// were closed (0: the first failure ends the search, as in issue 12).
    #[arg(long, default_value_t = 0)]
    retry: u32,
    /// After the last step, wait this long with no load and read the server's RSS again.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    rss_settle: Duration,
}

#[derive(Args, Clone)]
struct SseArgs {
    #[command(flatten)]
    max: MaxArgs,
    /// Step the rate up like `max` instead of one fixed-rate run.
    #[arg(long)]
    step_up: bool,
}

#[derive(Args, Clone)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Connections in total.
    #[arg(long, default_value_t = 19_000)]
    conns: u32,
    /// Measure RSS after each of this many equal steps.
    #[arg(long, default_value_t = 4)]
    steps: u32,
    /// Measure RSS at these connection counts instead (comma-separated, e.g. 10000,19000; the
    /// last is the total).
    #[arg(long, value_delimiter = ',')]
    points: Vec<u32>,
    /// Channels (connection i subscribes to channel i mod C).
    #[arg(long, default_value_t = 1)]
    channels: u32,
    /// Wait this long after each step before reading RSS.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
}

#[derive(Args, Clone)]
struct ConnectArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many handshakes.
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    /// Handshake loops running at once.
    #[arg(long, default_value_t = 64)]
    parallel: u32,
    /// Subscribe after each handshake and keep the connection open (the rate at which a fleet
    /// of subscribers can arrive), instead of closing it (at most 19,000: one process).
    #[arg(long)]
    hold: bool,
}

#[derive(Args, Clone)]
struct HoldArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    subs: u32,
    #[arg(long, default_value_t = 1)]
    channels: u32,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long)]
    sse: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        match cli.cmd {
            Cmd::Fanout(a) => run_load(&max_of(a), false, false).await,
            Cmd::Max(a) => run_load(&a, false, true).await,
            Cmd::Sse(a) => run_load(&a.max, true, a.step_up).await,
            Cmd::Idle(a) => run_idle(&a).await,
            Cmd::Connect(a) => run_connect(&a).await,
            Cmd::Storm(a) => storm::run(&a).await,
            Cmd::Soak(a) => soak::run(&a).await,
            Cmd::Hold(a) => run_hold(&a).await,
            Cmd::Worker { spec } => subs::worker_main(serde_json::from_str(&spec)?).await,
        }
    })
}

fn max_of(load: LoadArgs) -> MaxArgs {
    MaxArgs {
        start_rate: load.rate,
        load,
        factor: 1.5,
        p99_max: Duration::from_secs(3600),
        max_steps: 1,
        refine: 0,
        retry: 0,
        rss_settle: Duration::ZERO,
    }
}

pub fn check_loopback(addr: &SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() {
        bail!("relay-bench only targets loopback addresses (127.0.0.0/8, ::1), not {addr}");
    }
    Ok(())
}

pub fn default_prefix() -> String {
    format!("b{}x", subs::now_ns() / 1_000_000 % 100_000_000)
}

pub fn procs_for(c: &Common, conns: u32) -> u32 {
    if c.procs > 0 {
        c.procs
    } else {
        conns.div_ceil(15_000).max(1)
    }
}

pub fn server_pids(c: &Common) -> Vec<String> {
    c.server_pid.iter().map(u32::to_string).collect()
}

pub fn self_pids(groups: &Groups) -> Vec<String> {
    let mut v = vec![std::process::id().to_string()];
    v.extend(groups.worker_pids());
    v
}

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

pub fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// One measured fan-out step.
struct StepResult {
    rate: f64,
    achieved: f64,
    expected: u64,
    delivered: u64,
    per_sec: f64,
    loss: u64,
    stats: Stats,
    pub_errors: u64,
    max_lag: Duration,
    lat: [u64; 6],
    server_cpu: Option<f64>,
    server_rss: Option<u64>,
    self_cpu: Option<f64>,
    /// Cores used by everything else on the machine during the step (noise).
    other_cpu: Option<f64>,
    /// Publisher connections used.
    pub_conns: usize,
    /// Publishes acknowledged in the step.
    published: u64,
    /// What the server's processes used from the step's start to the end of its drain.
    server_usage: Option<Usage>,
    /// Every syscall of the server in the same window (`--perf-syscalls`).
    perf_syscalls: Option<u64>,
    /// What relay-bench's own processes (subscribers and publisher) used in the same window.
    bench_usage: Option<Usage>,
}

impl StepResult {
    /// With `--spans`, over the step's publishes: p50 and p99 (ms) of the first delivery's
    /// latency, of the last one's, and of the time between them.
    fn spans(&self) -> Option<[f64; 6]> {
        if self.stats.spans.is_empty() {
            return None;
        }
        let by = per_publish(&self.stats.spans);
        let q = |mut v: Vec<u32>, p: f64| {
            v.sort_unstable();
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            f64::from(v[i]) / 1e3
        };
        let first: Vec<u32> = by.values().map(|v| v.0).collect();
        let last: Vec<u32> = by.values().map(|v| v.1).collect();
        let spread: Vec<u32> = by.values().map(|v| v.1 - v.0).collect();
        Some([
            q(first.clone(), 0.5),
            q(first, 0.99),
            q(last.clone(), 0.5),
            q(last, 0.99),
            q(spread.clone(), 0.5),
            q(spread, 0.99),
        ])
    }

    /// Appends the step's publishes to `path` (see `--spans-out`).
    fn write_spans(&self, path: &std::path::Path, step: u32) -> Result<()> {
        use std::io::Write;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("--spans-out {}", path.display()))?;
        let mut w = std::io::BufWriter::new(file);
        for (k, (f, l)) in per_publish(&self.stats.spans) {
            let (publisher, seq) = subs::span_publish(k);
            writeln!(w, "{step} {publisher} {seq} {f} {l}")?;
        }
        w.flush()?;
        Ok(())
    }

    fn passed(&self, p99_max: Duration) -> bool {
        self.loss == 0
            && self.stats.closed == 0
            && self.stats.dups == 0
            && self.pub_errors == 0
            && self.achieved >= 0.95 * self.rate
            && self.lat[2] <= p99_max.as_micros() as u64
    }

    fn bench_bound(&self) -> bool {
        self.self_cpu.is_some_and(|c| c >= 0.9)
    }

    /// Server CPU ns, read/write syscalls and voluntary context switches (wake-ups) per
    /// delivery, and server CPU µs and wake-ups per publish.
    fn cost(&self) -> Option<Cost> {
        let u = self.server_usage?;
        let d = self.delivered.max(1) as f64;
        let p = self.published.max(1) as f64;
        Some(Cost {
            ns_per_delivery: u.cpu_s * 1e9 / d,
            syscalls_per_delivery: u.syscalls as f64 / d,
            wakeups_per_delivery: u.vol_ctx as f64 / d,
            us_per_publish: u.cpu_s * 1e6 / p,
            wakeups_per_publish: u.vol_ctx as f64 / p,
            all_syscalls_per_delivery: self.perf_syscalls.map(|n| n as f64 / d),
            usage: u,
        })
    }

    /// relay-bench's own cost per delivery: CPU ns (its subscribers and its publisher, from the
    /// step's start to the end of its drain), subscriber reads and bytes read.
    fn bench_cost(&self) -> Option<(f64, f64, f64)> {
        let u = self.bench_usage?;
        let d = self.delivered.max(1) as f64;
        Some((
            u.cpu_s * 1e9 / d,
            self.stats.reads as f64 / d,
            self.stats.bytes as f64 / d,
        ))
    }

    fn line(&self) -> String {
        let cpu = |c: Option<f64>| c.map_or("-".into(), |c| format!("{:.0}%", c * 100.0));
        format!(
            "rate {:>8.0}/s (sent {:>8.0}/s, lag max {:>5.1} ms) | delivered {:>9}/s ({} of {}) \
             loss {} dup {} reorder {} seq-gap {} closed {} pub-err {} | \
             p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms | server cpu {} rss {} MiB | \
             bench cpu {} other {}{}",
            self.rate,
            self.achieved,
            self.max_lag.as_secs_f64() * 1e3,
            human(self.per_sec),
            self.delivered,
            self.expected,
            self.loss,
            self.stats.dups,
            self.stats.reordered,
            self.stats.seq_gaps,
            self.stats.closed,
            self.pub_errors,
            ms(self.lat[0]),
            ms(self.lat[1]),
            ms(self.lat[2]),
            ms(self.lat[3]),
            ms(self.lat[4]),
            cpu(self.server_cpu),
            self.server_rss
                .map_or("-".into(), |r| format!("{:.1}", mib(r))),
            cpu(self.self_cpu),
            cpu(self.other_cpu),
            if self.bench_bound() {
                "  <-- relay-bench saturated its core: this step is bench-bound"
            } else {
                ""
            },
        ) + &self
            .cost()
            .map_or(String::new(), |k| format!("\n         cost: {}", k.line()))
            + &self.spans().map_or(String::new(), |s| {
                format!(
                    "\n         per publish (p50/p99 ms): first delivery {:.2}/{:.2}, \
                     last {:.2}/{:.2}, last − first {:.2}/{:.2}",
                    s[0], s[1], s[2], s[3], s[4], s[5]
                )
            })
            + &self
                .bench_cost()
                .map_or(String::new(), |(ns, reads, bytes)| {
                    let per = format!("{ns:.0} ns CPU, {reads:.4} reads, {bytes:.1} bytes read");
                    format!("\n         relay-bench: {per} per delivery")
                })
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "rate": self.rate, "sent_per_sec": self.achieved, "expected": self.expected,
            "delivered": self.delivered, "deliveries_per_sec": self.per_sec, "loss": self.loss,
            "dups": self.stats.dups, "reordered": self.stats.reordered,
            "seq_gaps": self.stats.seq_gaps, "closed": self.stats.closed,
            "close_codes": self.stats.close_codes, "errors": self.stats.errors,
            "pub_errors": self.pub_errors, "max_lag_ms": self.max_lag.as_secs_f64() * 1e3,
            "p50_ms": ms(self.lat[0]), "p90_ms": ms(self.lat[1]), "p99_ms": ms(self.lat[2]),
            "p999_ms": ms(self.lat[3]), "max_ms": ms(self.lat[4]), "samples": self.lat[5],
            "server_cpu": self.server_cpu, "server_rss": self.server_rss,
            "bench_cpu": self.self_cpu, "bench_bound": self.bench_bound(),
            "other_cpu": self.other_cpu, "pub_conns": self.pub_conns,
            "published": self.published, "cost": self.cost().map(|k| k.json()),
            "spans": self.spans().map(|s| json!({
                "first_p50_ms": s[0], "first_p99_ms": s[1], "last_p50_ms": s[2],
                "last_p99_ms": s[3], "spread_p50_ms": s[4], "spread_p99_ms": s[5],
            })),
            "bench_cost": self.bench_cost().map(|(ns, reads, bytes)| json!({
                "cpu_ns_per_delivery": ns, "reads_per_delivery": reads,
                "bytes_per_delivery": bytes,
                "source": "relay-bench's processes: /proc/<pid>/stat utime+stime from the \
                           step's start to the end of its drain; its subscribers' reads",
            })),
        })
    }
}

/// The server's cost of a step, from /proc: CPU (`stat` utime + stime), read-like and
/// write-like syscalls (`io` syscr + syscw), voluntary context switches (`task/*/status`: each
/// is a thread going to sleep, so one wake-up).
pub struct Cost {
    pub ns_per_delivery: f64,
    pub syscalls_per_delivery: f64,
    pub wakeups_per_delivery: f64,
    pub us_per_publish: f64,
    pub wakeups_per_publish: f64,
    /// Every syscall (perf), per delivery.
    pub all_syscalls_per_delivery: Option<f64>,
    pub usage: Usage,
}

impl Cost {
    pub fn line(&self) -> String {
        format!(
            "server {:.0} ns CPU, {:.3} read/write syscalls, {:.4} wake-ups per delivery; \
             {:.1} µs CPU, {:.2} wake-ups per publish ({:.2} s CPU, {} syscalls, {} voluntary + \
             {} involuntary switches)",
            self.ns_per_delivery,
            self.syscalls_per_delivery,
            self.wakeups_per_delivery,
            self.us_per_publish,
            self.wakeups_per_publish,
            self.usage.cpu_s,
            self.usage.syscalls,
            self.usage.vol_ctx,
            self.usage.invol_ctx,
        ) + &self.all_syscalls_per_delivery.map_or(String::new(), |n| {
            format!("; all syscalls (perf): {n:.3} per delivery")
        })
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "server_cpu_ns_per_delivery": self.ns_per_delivery,
            "syscalls_per_delivery": self.syscalls_per_delivery,
            "wakeups_per_delivery": self.wakeups_per_delivery,
            "server_cpu_us_per_publish": self.us_per_publish,
            "wakeups_per_publish": self.wakeups_per_publish,
            "server_cpu_s": self.usage.cpu_s, "syscalls": self.usage.syscalls,
            "voluntary_switches": self.usage.vol_ctx,
            "involuntary_switches": self.usage.invol_ctx,
            "all_syscalls_per_delivery": self.all_syscalls_per_delivery,
            "source": "/proc/<pid>/stat utime+stime, /proc/<pid>/io syscr+syscw, \
                       /proc/<pid>/task/*/status voluntary_ctxt_switches",
        })
    }
}

async fn run_load(a: &MaxArgs, sse: bool, stepping: bool) -> Result<()> {
    let l = &a.load;
    let c = &l.common;
    check_loopback(&c.addr)?;
    let prefix = c.prefix.clone().unwrap_or_else(default_prefix);
    let mode = l.publish;
    let publishers = l.publishers.unwrap_or(mode.default_conns());
    let spec = SubSpec {
        target: c.target,
        addr: c.addr,
        sse,
        prefix: prefix.clone(),
        channels: l.channels.max(1),
        src_ips: c.src_ips,
        sample: l.sample.max(1),
        concurrency: c.concurrency,
        reconnect: None,
        pusher: c.pusher_app.clone(),
        spans: l.spans,
    };
    let groups = Groups::new(spec, procs_for(c, l.subs))?;
    let t0 = Instant::now();
    let opened = groups.open(0, l.subs).await?;
    println!(
        "{:?} {} subscribers on {} channel(s): {} subscribed, {} failed in {:.2} s{}",
        c.target,
        if sse { "SSE" } else { "WebSocket" },
        l.channels,
        opened.open,
        opened.failed,
        t0.elapsed().as_secs_f64(),
        opened
            .first_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (first error: {e})")),
    );
    if opened.open == 0 {
        bail!("no subscriber could subscribe");
    }
    let mut publisher = Publisher::connect(PubSpec {
        target: c.target,
        addr: c.addr,
        mode,
        conns: publishers,
        channels: l.channels.max(1),
        payload: l.payload,
        prefix,
        headers: c.publish_headers(),
        pusher: c.pusher_app.clone(),
    })
    .await?;
    println!(
        "publishing over {mode:?} ({publishers} connection(s)), payload {} B, {} per step",
        l.payload,
        humantime::format_duration(l.duration)
    );
    // Subscriber counts per channel (for the expected deliveries).
    let per_channel: Vec<u64> = (0..l.channels.max(1))
        .map(|ch| u64::from((0..l.subs).filter(|i| i % l.channels.max(1) == ch).count() as u32))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = server_pids(c);
    // RSS with the subscribers connected and idle, before any publish.
    let rss_start = procfs::rss_sum(&server);
    let first_rate = if stepping { a.start_rate } else { l.rate };
    if !l.warmup.is_zero() {
        if !l.quiet_wait.is_zero() {
            wait_quiet(&groups, c, l.quiet, l.quiet_wait).await;
        }
        let w = publisher.run(first_rate, l.warmup).await?;
        publisher.settle(Duration::from_secs(3)).await;
        println!(
            "warm-up: {:.1} s at {first_rate:.0}/s ({} sent, {} errors)",
            l.warmup.as_secs_f64(),
            w.sent,
            w.errors
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    groups.stats(true).await?;

    let mut results: Vec<StepResult> = Vec::new();
    let mut best: Option<usize> = None;
    let mut fail_rate: Option<f64> = None;
    let mut rate = if stepping { a.start_rate } else { l.rate };
    let mut steps = 0;
    let mut refines = 0;
    loop {
        let mut tries = 0;
        let mut noisy_tries = 0;
        let r = loop {
            if !l.quiet_wait.is_zero() {
                wait_quiet(&groups, c, l.quiet, l.quiet_wait).await;
            }
            let r = step(&groups, &mut publisher, l, rate, &per_channel).await?;
            println!("step {:>2}: {}", steps + 1, r.line());
            if let Some(path) = &l.spans_out {
                r.write_spans(path, steps + 1)?;
            }
            if !stepping || r.passed(a.p99_max) || r.stats.closed > 0 {
                break r;
            }
            if r.other_cpu.is_some_and(|o| o > l.quiet) && noisy_tries < l.noisy_retries {
                noisy_tries += 1;
                println!(
                    "step {:>2}: failed while other work used {:.0}% CPU: again",
                    steps + 1,
                    r.other_cpu.unwrap_or(0.0) * 100.0
                );
            } else if tries < a.retry {
                tries += 1;
                println!("step {:>2}: failed, running it again", steps + 1);
            } else {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let passed = r.passed(a.p99_max);
        let closed = r.stats.closed > 0;
        results.push(r);
        steps += 1;
        if !stepping {
            break;
        }
        if passed {
            best = Some(results.len() - 1);
        } else {
            fail_rate = Some(rate);
        }
        if closed {
            println!("subscribers were closed: stopping here");
            break;
        }
        rate = match (passed, fail_rate) {
            (true, None) if steps < a.max_steps => rate * a.factor,
            (_, Some(f)) if refines < a.refine => {
                refines += 1;
                let lo = best.map_or(a.start_rate / a.factor, |b| results[b].rate);
                (lo * f).sqrt()
            }
            _ => break,
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // RSS at the end of the load, then after it stopped and a settle.
    let rss_end = procfs::rss_sum(&server);
    let rss_after = if a.rss_settle.is_zero() {
        None
    } else {
        tokio::time::sleep(a.rss_settle).await;
        procfs::rss_sum(&server)
    };
    let fmt_rss = |r: Option<u64>| r.map_or("-".into(), |r| format!("{:.1} MiB", mib(r)));
    println!(
        "server RSS: {} with the subscribers idle before the load, {} at its end, {} after {} s \
         without load",
        fmt_rss(rss_start),
        fmt_rss(rss_end),
        fmt_rss(rss_after),
        a.rss_settle.as_secs()
    );
    let summary = if stepping {
        match best {
            Some(b) => {
                let r = &results[b];
                println!(
                    "BEST: {} deliveries/s at {:.0} publishes/s to {} subscribers, p99 {:.2} ms \
                     (bound {} ms){}",
                    human(r.per_sec),
                    r.rate,
                    opened.open,
                    ms(r.lat[2]),
                    a.p99_max.as_millis(),
                    if r.bench_bound() {
                        "; relay-bench was saturated at this step: a lower bound"
                    } else {
                        ""
                    }
                );
                r.json()
            }
            None => {
                println!("BEST: no step passed");
                serde_json::Value::Null
            }
        }
    } else {
        results
            .last()
            .map_or(serde_json::Value::Null, StepResult::json)
    };
    let stats = groups.stats(false).await?;
    if let Some(e) = stats.first_error.as_ref() {
        println!("first error seen by a subscriber: {e}");
    }
    if let Some(e) = publisher.first_error() {
        println!("first publisher error: {e}");
    }
    if c.json {
        let out = json!({
            "scenario": if stepping { "max" } else { "fanout" },
            "transport": if sse { "sse" } else { "ws" },
            "target": c.target, "subs": l.subs, "subscribed": opened.open,
            "channels": l.channels, "payload": l.payload, "publish": format!("{mode:?}"),
            "p99_max_ms": a.p99_max.as_secs_f64() * 1e3, "warmup_s": l.warmup.as_secs_f64(),
            "step_s": l.duration.as_secs_f64(), "factor": a.factor, "start_rate": first_rate,
            "publishers": publisher.conns(),
            "rss_start": rss_start, "rss_end": rss_end, "rss_after": rss_after,
            "rss_settle_s": a.rss_settle.as_secs_f64(),
            "best": summary,
            "steps": results.iter().map(StepResult::json).collect::<Vec<_>>(),
        });
        println!("RESULT {out}");
    }
    Ok(())
}

/// Waits (at most `max_wait`) until everything but the server and relay-bench uses less than
/// `quiet` cores over half a second.
async fn wait_quiet(groups: &Groups, c: &Common, quiet: f64, max_wait: Duration) {
    let mut mine = server_pids(c);
    mine.extend(self_pids(groups));
    let t = Instant::now();
    loop {
        let machine = procfs::MachineMeter::start();
        let ours = CpuMeter::start(&mine);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let other = machine.cores().unwrap_or(0.0) - ours.cores().unwrap_or(0.0);
        if other < quiet {
            return;
        }
        if t.elapsed() >= max_wait {
            println!(
                "the machine stayed busy ({:.0}% CPU of other work) for {} s: measuring anyway",
                other * 100.0,
                max_wait.as_secs()
            );
            return;
        }
    }
}

async fn step(
    groups: &Groups,
    publisher: &mut Publisher,
    l: &LoadArgs,
    rate: f64,
    per_channel: &[u64],
) -> Result<StepResult> {
    let (c, dur, perf_syscalls) = (&l.common, l.duration, l.perf_syscalls);
    if !l.lead_in.is_zero() {
        let acked0 = publisher.acked_per_channel();
        publisher.run(rate, l.lead_in).await?;
        publisher.settle(Duration::from_secs(3)).await;
        let expected = owed(&publisher.acked_per_channel(), &acked0, per_channel);
        let got = drain(groups, expected, Duration::from_millis(2)).await?;
        if got < expected {
            // Reset with the rest, so the step's counts would not show it.
            println!("lead-in: {got} of {expected} deliveries arrived (lost before the step)");
        }
        groups.stats(true).await?;
    }
    let server = server_pids(c);
    let me = self_pids(groups);
    let acked0 = publisher.acked_per_channel();
    let usage0 = Usage::now(&server);
    let bench0 = Usage::now(&me);
    let perf = if perf_syscalls {
        procfs::PerfSyscalls::start(&server)
    } else {
        None
    };
    let server_cpu = CpuMeter::start(&server);
    let self_cpu = CpuMeter::start(&me);
    let machine = procfs::MachineMeter::start();
    let p = publisher.run(rate, dur).await?;
    // CPU over the publishing window (not the drain after it).
    let server_cpu = server_cpu.cores();
    let self_cpu = self_cpu.cores();
    let other_cpu = machine
        .cores()
        .map(|m| (m - server_cpu.unwrap_or(0.0) - self_cpu.unwrap_or(0.0)).max(0.0));
    publisher.settle(Duration::from_secs(3)).await;
    let acked1 = publisher.acked_per_channel();
    let expected = owed(&acked1, &acked0, per_channel);
    drain(groups, expected, Duration::from_millis(20)).await?;
    let server_usage = Usage::now(&server).zip(usage0).map(|(u1, u0)| u1.since(u0));
    let bench_usage = Usage::now(&me).zip(bench0).map(|(u1, u0)| u1.since(u0));
    let perf_syscalls = perf.and_then(procfs::PerfSyscalls::stop);
    let stats = groups.stats(true).await?;
    let h = stats.histogram()?;
    let delivered = stats.received - stats.dups;
    let secs = p.elapsed.as_secs_f64().max(1e-9);
    Ok(StepResult {
        rate,
        achieved: p.sent as f64 / secs,
        expected,
        delivered,
        // Over the time the publisher took: a publisher that fell behind (one request in flight
        // per connection to a slow server) spreads the step's publishes over longer than --duration.
        per_sec: delivered as f64 / secs.max(dur.as_secs_f64()).max(1e-9),
        loss: expected.saturating_sub(delivered),
        pub_errors: p.errors,
        max_lag: p.max_lag,
        lat: [
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            h.len(),
        ],
        stats,
        server_cpu,
        server_rss: procfs::rss_sum(&server),
        self_cpu,
        other_cpu,
        pub_conns: publisher.conns(),
        published: acked1.iter().zip(&acked0).map(|(a1, a0)| a1 - a0).sum(),
        server_usage,
        perf_syscalls,
        bench_usage,
    })
}

/// Each publish's first and last delivery latency (µs), merged over the subscriber groups'
/// entries (`subs::span_key`, first, last), in publisher then sequence order.
fn per_publish(spans: &[(u64, u32, u32)]) -> std::collections::BTreeMap<u64, (u32, u32)> {
    let mut by = std::collections::BTreeMap::new();
    for &(k, f, l) in spans {
        subs::widen_span(by.entry(k).or_insert((f, l)), f, l);
    }
    by
}

/// Deliveries owed for the publishes acknowledged between `acked0` and `acked1` (per channel:
/// × its subscribers).
fn owed(acked1: &[u64], acked0: &[u64], per_channel: &[u64]) -> u64 {
    acked1
        .iter()
        .zip(acked0)
        .zip(per_channel)
        .map(|((a1, a0), n)| (a1 - a0) * n)
        .sum()
}

/// Waits until `expected` deliveries arrived since the last reset, or nothing moved for 1 s (at
/// most 30 s: an overloaded server may deliver seconds late, and what arrives after the drain
/// would be counted in the next step). Polls every `poll` (after a lead-in, often: the step
/// starts right after its last delivery). Returns the deliveries that arrived.
async fn drain(groups: &Groups, expected: u64, poll: Duration) -> Result<u64> {
    let until = Instant::now() + Duration::from_secs(30);
    let mut last = u64::MAX;
    let mut last_move = Instant::now();
    let mut got = 0;
    while Instant::now() < until {
        let s = groups.stats(false).await?;
        got = s.received - s.dups;
        if got >= expected {
            break;
        }
        if got != last {
            last = got;
            last_move = Instant::now();
        } else if last_move.elapsed() > Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep(poll).await;
    }
    Ok(got)
}

async fn run_idle(a: &IdleArgs) -> Result<()> {
    let c = &a.common;
    check_loopback(&c.addr)?;
    let server = server_pids(c);
    if server.is_empty() {
        bail!("idle needs --server-pid (its RSS is the measurement)");
    }
    let spec = SubSpec {
        target: c.target,
        addr: c.addr,
        sse: false,
        prefix: c.prefix.clone().unwrap_or_else(default_prefix),
        channels: a.channels.max(1),
        src_ips: c.src_ips,
        sample: 1,
        concurrency: c.concurrency,
        reconnect: None,
        pusher: c.pusher_app.clone(),
        spans: false,
    };
    let total = a.points.last().copied().unwrap_or(a.conns);
    let procs = procs_for(c, total);
    let groups = Groups::new(spec, procs)?;
    tokio::time::sleep(a.settle).await;
    let rss0 = procfs::rss_sum(&server).ok_or_else(|| anyhow!("cannot read the server's RSS"))?;
    println!(
        "{:?}: {} idle subscribed WebSocket connections on {} channel(s), {} worker process(es); \
         server RSS before: {:.1} MiB",
        c.target,
        total,
        a.channels,
        procs,
        mib(rss0)
    );
    let targets: Vec<u32> = if a.points.is_empty() {
        (1..=a.steps.max(1))
            .map(|k| (u64::from(a.conns) * u64::from(k) / u64::from(a.steps.max(1))) as u32)
            .collect()
    } else {
        a.points.clone()
    };
    let mut points: Vec<(f64, f64)> = vec![(0.0, rss0 as f64)];
    let mut open = 0u64;
    let mut cur = 0u32;
    let mut rows = Vec::new();
    let t0 = Instant::now();
    for &target in &targets {
        let s = groups.open(cur, target).await?;
        cur = target;
        open += s.open;
        if let Some(e) = &s.first_error {
            println!("  {} failed (first error: {e})", s.failed);
        }
        tokio::time::sleep(a.settle).await;
        let now = groups.stats(false).await?;
        let rss = procfs::rss_sum(&server).ok_or_else(|| anyhow!("server gone"))?;
        let (pn, pr) = points[points.len() - 1];
        let per = (rss as f64 - rss0 as f64) / now.open.max(1) as f64;
        let step_slope = (rss as f64 - pr) / (now.open as f64 - pn).max(1.0);
        println!(
            "  {:>6} open: server RSS {:>8.1} MiB, {:>7.0} B/conn since start, {:>7.0} B/conn \
             over this step",
            now.open,
            mib(rss),
            per,
            step_slope
        );
        rows.push(json!({"open": now.open, "rss": rss, "per_conn": per, "step_slope": step_slope}));
        points.push((now.open as f64, rss as f64));
    }
    let elapsed = t0.elapsed();
    let last = points[points.len() - 1];
    let per_conn = (last.1 - rss0 as f64) / last.0.max(1.0);
    let slope = least_squares(&points[1..]).unwrap_or(per_conn);
    let stats = groups.stats(false).await?;
    println!(
        "RSS per idle connection at {} connections: {:.0} B (slope {:.0} B/conn); {} failed, \
         {} closed by the server; set-up {:.2} s",
        stats.open,
        per_conn,
        slope,
        stats.failed,
        stats.closed,
        elapsed.as_secs_f64()
    );
    if c.json {
        let out = json!({
            "scenario": "idle", "target": c.target, "conns": total, "open": stats.open,
            "opened": open, "failed": stats.failed, "closed": stats.closed, "channels": a.channels,
            "rss_before": rss0, "rss_after": last.1, "per_conn": per_conn, "slope": slope,
            "steps": rows,
        });
        println!("RESULT {out}");
    }
    Ok(())
}

/// Slope of the least-squares line through the points.
fn least_squares(p: &[(f64, f64)]) -> Option<f64> {
    if p.len() < 2 {
        return None;
    }
    let n = p.len() as f64;
    let mx = p.iter().map(|q| q.0).sum::<f64>() / n;
    let my = p.iter().map(|q| q.1).sum::<f64>() / n;
    let sxy: f64 = p.iter().map(|q| (q.0 - mx) * (q.1 - my)).sum();
    let sxx: f64 = p.iter().map(|q| (q.0 - mx) * (q.0 - mx)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

async fn run_connect(a: &ConnectArgs) -> Result<()> {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    let c = &a.common;
    check_loopback(&c.addr)?;
    let server = server_pids(c);
    let prefix = c.prefix.clone().unwrap_or_else(default_prefix);
    let path = match c.target {
        Target::Relay => "/ws".to_string(),
        Target::Node | Target::Uws => "/".to_string(),
        Target::Nchan => format!("/sub/{prefix}0"),
        Target::Pusher => c.pusher_app.ws_path(),
    };
    if a.hold && a.count > 19_000 {
        bail!("--hold keeps every connection open: at most 19,000 (--count)");
    }
    let req = Rc::new(wire::upgrade_request(&c.addr.to_string(), &path));
    let subscribe: Option<Rc<Vec<u8>>> = (a.hold && c.target != Target::Nchan).then(|| {
        let mut f = Vec::new();
        let cmd = format!(r#"{{"type":"subscribe","channel":"{prefix}0"}}"#);
        wire::client_frame(wire::OP_TEXT, cmd.as_bytes(), &mut f);
        Rc::new(f)
    });
    let held: Rc<RefCell<Vec<tokio::net::TcpStream>>> = Rc::new(RefCell::new(Vec::new()));
    let hold = a.hold;
    let counter = Rc::new(Cell::new(0u64));
    let ok = Rc::new(Cell::new(0u64));
    let failed = Rc::new(Cell::new(0u64));
    let first_err: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
    let hist = Rc::new(RefCell::new(subs::new_hist()?));
    let start = Instant::now();
    let end = start + a.duration;
    let server_cpu = CpuMeter::start(&server);
    let self_cpu = CpuMeter::start(&[std::process::id().to_string()]);
    let machine = procfs::MachineMeter::start();
    let mut tasks = Vec::new();
    for _ in 0..a.parallel.max(1) {
        let (req, counter, ok, failed, first_err, hist) = (
            req.clone(),
            counter.clone(),
            ok.clone(),
            failed.clone(),
            first_err.clone(),
            hist.clone(),
        );
        let (subscribe, held) = (subscribe.clone(), held.clone());
        let (addr, src_ips, count) = (c.addr, c.src_ips, a.count);
        tasks.push(tokio::task::spawn_local(async move {
            while Instant::now() < end && counter.get() < count {
                let i = counter.get();
                counter.set(i + 1);
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    handshake(
                        addr,
                        src_ips,
                        i as u32,
                        &req,
                        hold,
                        subscribe.as_deref().map(Vec::as_slice),
                    ),
                )
                .await
                .map_err(|_| anyhow!("timed out"))
                .and_then(|r| r);
                match r {
                    Ok((us, stream)) => {
                        ok.set(ok.get() + 1);
                        hist.borrow_mut().saturating_record(us.max(1));
                        held.borrow_mut().extend(stream);
                    }
                    Err(e) => {
                        failed.set(failed.get() + 1);
                        first_err.borrow_mut().get_or_insert(format!("{e:#}"));
                        // Back off a little on errors (e.g. port exhaustion).
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let server_rss = procfs::rss_sum(&server);
    let server_cpu = server_cpu.cores();
    let self_cpu = self_cpu.cores();
    let other_cpu = machine
        .cores()
        .map(|m| (m - server_cpu.unwrap_or(0.0) - self_cpu.unwrap_or(0.0)).max(0.0));
    let h = hist.borrow();
    let rate = ok.get() as f64 / elapsed;
    println!(
        "{:?}: {} handshakes{} in {:.2} s = {}/s ({} failed{}); {} latency p50 {:.2} p99 {:.2} \
         max {:.2} ms; server cpu {}, bench cpu {}, other {}{}",
        c.target,
        ok.get(),
        if hold {
            " + subscribes, held open"
        } else {
            " + close handshakes"
        },
        elapsed,
        human(rate),
        failed.get(),
        first_err
            .borrow()
            .as_ref()
            .map_or(String::new(), |e| format!(", first: {e}")),
        if hold { "subscribed" } else { "upgrade" },
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        server_cpu.map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
        self_cpu.map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
        other_cpu.map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
        if self_cpu.is_some_and(|c| c >= 0.9) {
            "  <-- relay-bench saturated its core: bench-bound"
        } else {
            ""
        }
    );
    if c.json {
        let out = json!({
            "scenario": "connect", "target": c.target, "hold": hold, "server_rss": server_rss,
            "ok": ok.get(), "failed": failed.get(),
            "secs": elapsed, "per_sec": rate, "p50_ms": ms(h.value_at_quantile(0.5)),
            "p99_ms": ms(h.value_at_quantile(0.99)), "server_cpu": server_cpu,
            "bench_cpu": self_cpu, "bench_bound": self_cpu.is_some_and(|c| c >= 0.9),
            "other_cpu": other_cpu,
        });
        println!("RESULT {out}");
    }
    Ok(())
}

/// Connect, upgrade, then either a close handshake (returns µs from connect to the 101) or,
/// with `hold`, a subscribe (`subscribe`: the frame; None for Nchan, which subscribes by URL)
/// and the open stream (µs from connect to the `subscribed` reply).
async fn handshake(
    addr: SocketAddr,
    src_ips: u32,
    i: u32,
    req: &str,
    hold: bool,
    subscribe: Option<&[u8]>,
) -> Result<(u64, Option<tokio::net::TcpStream>)> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    if src_ips > 0 {
        let ip = subs::src_ip(i % src_ips);
        sock.bind(SocketAddr::new(ip.into(), 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    let t = Instant::now();
    let mut s = sock.connect(addr).await.context("connect")?;
    s.set_nodelay(true)?;
    s.write_all(req.as_bytes()).await?;
    let mut rest = wire::read_upgrade(&mut s).await?;
    let mut tmp = [0u8; 2048];
    if hold {
        if let Some(f) = subscribe {
            s.write_all(f).await?;
            'reply: loop {
                let mut off = 0;
                while let Some(f) = wire::parse_frame(&rest[off..])? {
                    off += f.len;
                    if f.payload.starts_with(br#"{"type":"subscribed""#) {
                        break 'reply;
                    }
                    if f.opcode == wire::OP_CLOSE || f.payload.starts_with(br#"{"type":"error""#) {
                        bail!("subscribe refused: {}", String::from_utf8_lossy(f.payload));
                    }
                }
                rest.drain(..off);
                let n = s.read(&mut tmp).await?;
                if n == 0 {
                    bail!("closed before the subscribe reply");
                }
                rest.extend_from_slice(&tmp[..n]);
            }
        }
        return Ok((t.elapsed().as_micros() as u64, Some(s)));
    }
    let us = t.elapsed().as_micros() as u64;
    let mut close = Vec::new();
    wire::close_frame(&mut close);
    s.write_all(&close).await?;
    // Wait for the server's close frame (or EOF), briefly.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let mut off = 0;
            while let Ok(Some(f)) = wire::parse_frame(&rest[off..]) {
                if f.opcode == wire::OP_CLOSE {
                    return;
                }
                off += f.len;
            }
            rest.drain(..off);
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&tmp[..n]),
            }
        }
    })
    .await;
    Ok((us, None))
}

async fn run_hold(a: &HoldArgs) -> Result<()> {
    let c = &a.common;
    check_loopback(&c.addr)?;
    let spec = SubSpec {
        target: c.target,
        addr: c.addr,
        sse: a.sse,
        prefix: c.prefix.clone().unwrap_or_else(default_prefix),
        channels: a.channels.max(1),
        src_ips: c.src_ips,
        sample: 1,
        concurrency: c.concurrency,
        reconnect: None,
        pusher: c.pusher_app.clone(),
        spans: false,
    };
    let groups = Groups::new(spec, procs_for(c, a.subs))?;
    let s = groups.open(0, a.subs).await?;
    println!("ready {} subscribed, {} failed", s.open, s.failed);
    let me = self_pids(&groups);
    let self_cpu = CpuMeter::start(&me);
    let t = Instant::now();
    tokio::time::sleep(a.duration).await;
    let st = groups.stats(false).await?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = self_cpu.cores();
    let got = st.received + st.foreign;
    println!(
        "hold: {} messages in {:.1} s = {}/s delivered; {} closed {:?}; errors {}; bench cpu {}",
        got,
        secs,
        human(got as f64 / secs),
        st.closed,
        st.close_codes,
        st.errors,
        cpu.map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
    );
    if c.json {
        let out = json!({
            "scenario": "hold", "target": c.target, "subscribed": s.open, "messages": got,
            "per_sec": got as f64 / secs, "closed": st.closed, "close_codes": st.close_codes,
            "bench_cpu": cpu,
        });
        println!("RESULT {out}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::per_publish;

    #[test]
    fn a_publish_spans_from_its_first_group_delivery_to_its_last() {
        let key = |p: u64, s: u64| p << 40 | s;
        // Two groups (processes) saw publish 0/7; one saw 1/2; publish 0/3 once.
        let spans = [
            (key(0, 7), 400, 3_900),
            (key(1, 2), 350, 4_100),
            (key(0, 7), 380, 4_200),
            (key(0, 3), 300, 3_000),
        ];
        let by: Vec<_> = per_publish(&spans).into_iter().collect();
        assert_eq!(
            by,
            [
                (key(0, 3), (300, 3_000)),
                (key(0, 7), (380, 4_200)),
                (key(1, 2), (350, 4_100)),
            ]
        );
    }
}
