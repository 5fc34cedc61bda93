//! Subscriber groups: many WebSocket or SSE subscriber connections on one single-threaded runtime,
//! their receive path, and the worker processes (`relay-bench worker`) that hold a share of the
//! connections when one process may not open them all (20,000 open files per process here).
//!
//! The receive path: one task per connection waits for readability, reads into a buffer shared by
//! every connection of the process (only an incomplete frame is kept per connection), walks the
//! frames in place, and takes `"seq":` and the payload stamp by substring search. The clock is read
//! once per read, not per message.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::pusher::PusherApp;
use crate::wire::{self, Dechunk, Finders, SseEvents};

/// Which server relay-bench talks to (URL shapes and message framing differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// relay: `GET /ws` + JSON subscribe, `GET /sse?channel=`, `POST /api/publish`.
    Relay,
    /// nginx + Nchan: `ws://…/sub/CH`, `GET /sub/CH` (EventSource), `POST /pub?id=CH`.
    Nchan,
    /// The Node `ws` relay in benches/node-relay: JSON subscribe on `/`, `POST /api/publish`.
    Node,
    /// The uWebSockets comparator (C++, `app.publish` to a topic; built outside the repo, see
    /// benches/RESULTS.md): the same subset of the protocol as `node`.
    Uws,
    /// A Pusher Channels server (relay's Pusher endpoint, Sockudo, soketi) serving the app of
    /// --pusher-app (default `bench:bench-key:bench-secret`): `GET /app/KEY` +
    /// `pusher:subscribe` to the public channel `CH`. Published with `--publish pusher-api`
    /// (signed `POST /apps/ID/events`, any Pusher server), or, relay only, through
    /// `POST /api/publish` to its relay name `pusher/ID/CH`.
    Pusher,
}

impl Target {
    /// The WebSocket path (Nchan's is per channel: `/sub/CH`; a Pusher app's is `/app/KEY`).
    pub fn ws_path(self, app: &PusherApp) -> Cow<'static, str> {
        match self {
            Target::Relay => Cow::Borrowed("/ws"),
            Target::Node | Target::Uws | Target::Nchan => Cow::Borrowed("/"),
            Target::Pusher => Cow::Owned(app.ws_path()),
        }
    }
}

/// Subscribers that reconnect when the server closes them (the reconnect storm): each retries
/// every `retry_ms` (plus up to `jitter_ms` at random) until `give_up_ms` after its close, and
/// resumes from its last position (relay: `since` + `epoch`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Reconnect {
    pub retry_ms: u64,
    pub jitter_ms: u64,
    pub give_up_ms: u64,
}

/// Everything a subscriber connection needs to know (also sent to worker processes as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubSpec {
    pub target: Target,
    pub addr: SocketAddr,
    pub sse: bool,
    /// Channel `i` is named `{prefix}{i}`.
    pub prefix: String,
    pub channels: u32,
    /// Source addresses 127.0.0.1 ..= 127.0.0.{src_ips} (0: let the kernel choose).
    pub src_ips: u32,
    /// Record the latency of one message in `sample` per connection.
    pub sample: u32,
    /// Connections set up at once.
    pub concurrency: u32,
    /// Reconnect and resume when closed (storm scenario).
    #[serde(default)]
    pub reconnect: Option<Reconnect>,
    /// The app of the `pusher` target.
    #[serde(default)]
    pub pusher: PusherApp,
    /// Keep each publish's first and last arrival (`--spans`).
    #[serde(default)]
    pub spans: bool,
}

impl SubSpec {
    pub fn channel(&self, i: u32) -> String {
        format!("{}{}", self.prefix, i % self.channels.max(1))
    }
}

/// Counters of a group, mergeable across processes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Connections subscribed and open.
    pub open: u64,
    /// Connection setups that failed.
    pub failed: u64,
    /// Messages carrying a relay-bench stamp (duplicates included).
    pub received: u64,
    /// Messages without a stamp (e.g. autocannon's bodies).
    pub foreign: u64,
    /// Same publisher sequence seen again.
    pub dups: u64,
    /// Publisher sequence lower than one already seen.
    pub reordered: u64,
    /// Holes in the server's per-channel `seq` (relay and node only).
    pub seq_gaps: u64,
    /// Server `seq` not above the previous one.
    pub seq_back: u64,
    /// Connections the server closed (or that failed) after setup.
    pub closed: u64,
    pub close_codes: BTreeMap<u16, u64>,
    /// Error events, gap events and protocol errors.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Bytes read.
    pub bytes: u64,
    /// Reads done.
    pub reads: u64,
    /// Latency histogram in µs as (value, count) pairs.
    pub lat_us: Vec<(u64, u64)>,
    /// Reconnect storm: subscriptions re-established after a close.
    pub resumed: u64,
    /// … of which the server said `recovered:true` (relay).
    pub recovered: u64,
    /// Connection attempts that failed while reconnecting (refused, reset, timed out).
    pub retries: u64,
    /// Connections that gave up reconnecting.
    pub gave_up: u64,
    /// First close seen (ns since the Unix epoch; 0: none).
    pub first_close_ns: u64,
    /// Last subscription re-established (ns since the Unix epoch; 0: none).
    pub last_resume_ns: u64,
    /// The first `subscribed` reply of a resume that was not recovered.
    pub first_unrecovered: Option<String>,
    /// Sum over the connections of the last server seq each has seen (one channel: the tail
    /// a connection misses is top − its last seq).
    pub last_seq_sum: u64,
    /// With `--spans`: per publish (publisher << 40 | sequence), the latency in µs of its
    /// first and of its last delivery.
    #[serde(default)]
    pub spans: Vec<(u64, u32, u32)>,
}

impl Stats {
    pub fn merge(&mut self, o: Stats) {
        self.open += o.open;
        self.failed += o.failed;
        self.received += o.received;
        self.foreign += o.foreign;
        self.dups += o.dups;
        self.reordered += o.reordered;
        self.seq_gaps += o.seq_gaps;
        self.seq_back += o.seq_back;
        self.closed += o.closed;
        for (k, v) in o.close_codes {
            *self.close_codes.entry(k).or_default() += v;
        }
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.bytes += o.bytes;
        self.reads += o.reads;
        self.lat_us.extend(o.lat_us);
        self.resumed += o.resumed;
        self.recovered += o.recovered;
        self.retries += o.retries;
        self.gave_up += o.gave_up;
        self.first_close_ns = match (self.first_close_ns, o.first_close_ns) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.last_resume_ns = self.last_resume_ns.max(o.last_resume_ns);
        if self.first_unrecovered.is_none() {
            self.first_unrecovered = o.first_unrecovered;
        }
        self.last_seq_sum += o.last_seq_sum;
        self.spans.extend(o.spans);
    }

    pub fn histogram(&self) -> Result<Histogram<u64>> {
        let mut h = new_hist()?;
        for &(v, n) in &self.lat_us {
            h.saturating_record_n(v, n);
        }
        Ok(h)
    }
}

pub fn new_hist() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 120_000_000, 3).map_err(|e| anyhow!("histogram: {e}"))
}

/// Nanoseconds since the Unix epoch (the clock every process of the machine shares).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The live counters of a group (one per process; shared by its connection tasks).
struct Agg {
    stats: Stats,
    hist: Histogram<u64>,
    /// Last server seq seen, per connection index (only with `reconnect`).
    last_seq: Vec<u64>,
    /// First and last delivery latency (µs) per publish (only with `spans`).
    spans: HashMap<u64, (u32, u32)>,
}

impl Agg {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.stats.errors += 1;
        if self.stats.first_error.is_none() {
            self.stats.first_error = Some(e.to_string());
        }
    }
}

/// Read buffer shared by every connection of the process.
const SHARED_BUF: usize = 256 * 1024;

/// A group of subscriber connections in this process.
pub struct Group {
    spec: Arc<SubSpec>,
    agg: Rc<RefCell<Agg>>,
    buf: Rc<RefCell<Vec<u8>>>,
    finders: Rc<Finders>,
}

impl Group {
    pub fn new(spec: SubSpec) -> Result<Self> {
        Ok(Self {
            spec: Arc::new(spec),
            agg: Rc::new(RefCell::new(Agg {
                stats: Stats::default(),
                hist: new_hist()?,
                last_seq: Vec::new(),
                spans: HashMap::new(),
            })),
            buf: Rc::new(RefCell::new(vec![0; SHARED_BUF])),
            finders: Rc::new(Finders::default()),
        })
    }

    /// Opens (and subscribes) connections `from..to`; returns once each is ready or has failed.
    /// Must run inside a `LocalSet`.
    pub async fn open(&self, from: u32, to: u32) -> Stats {
        let (tx, mut rx) = mpsc::unbounded_channel::<Result<()>>();
        let sem = Arc::new(Semaphore::new(self.spec.concurrency.max(1) as usize));
        for i in from..to {
            let tx = tx.clone();
            let sem = sem.clone();
            let spec = self.spec.clone();
            let agg = self.agg.clone();
            let buf = self.buf.clone();
            let finders = self.finders.clone();
            tokio::task::spawn_local(async move {
                let permit = sem.acquire_owned().await;
                let setup =
                    tokio::time::timeout(Duration::from_secs(15), Conn::setup(&spec, i, None))
                        .await
                        .map_err(|_| anyhow!("setup timed out"))
                        .and_then(|r| r);
                let mut conn = match setup {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                conn.ready_tx = Some((tx, permit));
                loop {
                    let res = conn.run(&spec, &agg, &buf, &finders).await;
                    {
                        let mut a = agg.borrow_mut();
                        // Never became ready: a failed setup.
                        if let Some((tx, _)) = conn.ready_tx.take() {
                            let e = match (res, conn.refused.take()) {
                                (_, Some(r)) => anyhow!("subscribe refused: {r}"),
                                (Err(e), None) => e,
                                (Ok(()), None) => anyhow!("closed"),
                            };
                            let _ = tx.send(Err(e));
                            return;
                        }
                        if conn.counted {
                            a.stats.open = a.stats.open.saturating_sub(1);
                        }
                        a.stats.closed += 1;
                        *a.stats.close_codes.entry(conn.close_code).or_default() += 1;
                        if let Err(e) = res {
                            a.error(format!("connection {i}: {e:#}"));
                        }
                        if spec.reconnect.is_some() {
                            let now = now_ns();
                            let f = &mut a.stats.first_close_ns;
                            *f = if *f == 0 { now } else { (*f).min(now) };
                        }
                    }
                    let Some(rc) = spec.reconnect else { return };
                    // The old socket is closed first (the server waits for our FIN).
                    let (resume, last) = (
                        Resume {
                            epoch: conn.epoch.take(),
                            since: conn.last_seq,
                        },
                        std::mem::take(&mut conn.last),
                    );
                    drop(conn);
                    match reconnect(&spec, i, resume, last, rc, &agg).await {
                        Some(c) => conn = c,
                        None => return,
                    }
                }
            });
        }
        drop(tx);
        let mut out = Stats::default();
        for _ in from..to {
            match rx.recv().await {
                Some(Ok(())) => out.open += 1,
                Some(Err(e)) => {
                    out.failed += 1;
                    if out.first_error.is_none() {
                        out.first_error = Some(format!("{e:#}"));
                    }
                }
                None => break,
            }
        }
        let mut a = self.agg.borrow_mut();
        a.stats.failed += out.failed;
        if a.stats.first_error.is_none() {
            a.stats.first_error.clone_from(&out.first_error);
        }
        out
    }

    /// The counters so far; `reset` zeroes the per-step ones (not `open`/`failed`).
    pub fn stats(&self, reset: bool) -> Stats {
        let mut a = self.agg.borrow_mut();
        let mut s = a.stats.clone();
        s.last_seq_sum = a.last_seq.iter().sum();
        s.spans = a.spans.iter().map(|(&k, &(f, l))| (k, f, l)).collect();
        s.lat_us = a
            .hist
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        if reset {
            let keep = Stats {
                open: a.stats.open,
                failed: a.stats.failed,
                resumed: a.stats.resumed,
                recovered: a.stats.recovered,
                retries: a.stats.retries,
                gave_up: a.stats.gave_up,
                first_close_ns: a.stats.first_close_ns,
                last_resume_ns: a.stats.last_resume_ns,
                first_unrecovered: a.stats.first_unrecovered.clone(),
                ..Stats::default()
            };
            a.stats = keep;
            a.hist.reset();
            a.spans.clear();
        }
        s
    }
}

/// Where a connection reports that it is subscribed, with the setup slot it holds until then.
type ReadyTx = (
    mpsc::UnboundedSender<Result<()>>,
    Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>,
);

/// Reconnects connection `i` after a close (retrying every `rc.retry_ms` plus jitter) and
/// sends its resume; `None` when it gave up.
async fn reconnect(
    spec: &SubSpec,
    i: u32,
    resume: Resume,
    mut last: Vec<u64>,
    rc: Reconnect,
    agg: &RefCell<Agg>,
) -> Option<Conn> {
    let give_up = tokio::time::Instant::now() + Duration::from_millis(rc.give_up_ms);
    let mut rng = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    loop {
        // xorshift: a different jitter per connection and attempt, no dependency.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let wait = rc.retry_ms
            + if rc.jitter_ms > 0 {
                rng % rc.jitter_ms
            } else {
                0
            };
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            Conn::setup(spec, i, Some(resume.clone())),
        )
        .await;
        match attempt {
            Ok(Ok(mut c)) => {
                c.last = std::mem::take(&mut last);
                return Some(c);
            }
            _ if tokio::time::Instant::now() >= give_up => {
                agg.borrow_mut().stats.gave_up += 1;
                return None;
            }
            _ => agg.borrow_mut().stats.retries += 1,
        }
    }
}

/// Where a reconnecting subscriber was.
#[derive(Debug, Clone)]
struct Resume {
    /// The epoch of its stream (relay; None: the server has none, or it never subscribed).
    epoch: Option<String>,
    since: u64,
}

/// One subscriber connection.
struct Conn {
    stream: TcpStream,
    /// An incomplete frame / event / chunk line left from the last read.
    partial: Vec<u8>,
    /// SSE: the chunked-body decoder (None when the body is not chunked).
    dechunk: Option<Dechunk>,
    /// SSE: the event parser (what it holds of an incomplete event).
    ev: SseEvents,
    /// Last publisher sequence seen, per publisher.
    last: Vec<u64>,
    /// Last server seq seen (0: none yet).
    last_seq: u64,
    /// The channel's epoch from the `subscribed` reply (relay).
    epoch: Option<String>,
    /// Index of the connection (for per-connection bookkeeping).
    index: u32,
    /// Counted in `open`.
    counted: bool,
    /// A reconnection waiting for its `subscribed` reply.
    resuming: bool,
    /// The server refused the subscribe (its error frame).
    refused: Option<String>,
    /// The epoch this connection resumed from.
    resume_epoch: Option<String>,
    nmsg: u32,
    ready: bool,
    /// Told once the connection is subscribed; holds the setup permit until then.
    ready_tx: Option<ReadyTx>,
    /// Frames to send (pongs, close replies).
    out: Vec<u8>,
    close_code: u16,
    closing: bool,
}

impl Conn {
    async fn setup(spec: &SubSpec, i: u32, resume: Option<Resume>) -> Result<Conn> {
        let sock = TcpSocket::new_v4()?;
        if spec.src_ips > 0 {
            let ip = src_ip(i % spec.src_ips);
            sock.bind(SocketAddr::new(ip.into(), 0))
                .with_context(|| format!("bind {ip}"))?;
        }
        let mut stream = sock
            .connect(spec.addr)
            .await
            .with_context(|| format!("connect {}", spec.addr))?;
        stream.set_nodelay(true)?;
        let host = spec.addr.to_string();
        let ch = spec.channel(i);
        let req = match (spec.target, spec.sse) {
            (Target::Relay, false) => wire::upgrade_request(&host, "/ws"),
            (Target::Node | Target::Uws, false) => wire::upgrade_request(&host, "/"),
            (Target::Nchan, false) => wire::upgrade_request(&host, &format!("/sub/{ch}")),
            (Target::Relay, true) => sse_request(&host, &format!("/sse?channel={ch}")),
            (Target::Nchan, true) => sse_request(&host, &format!("/sub/{ch}")),
            (Target::Node | Target::Uws, true) => bail!("{:?} has no SSE endpoint", spec.target),
            (Target::Pusher, false) => wire::upgrade_request(&host, &spec.pusher.ws_path()),
            (Target::Pusher, true) => bail!("Pusher has no SSE endpoint"),
        };
        stream.write_all(req.as_bytes()).await?;
        let mut head = Vec::with_capacity(512);
        let end = loop {
            if let Some(end) = wire::head_end(&head) {
                break end;
            }
            if head.len() > 16 * 1024 {
                bail!("response head too long");
            }
            let mut tmp = [0u8; 4096];
            let n = stream.read(&mut tmp).await?;
            if n == 0 {
                bail!("closed during the handshake");
            }
            head.extend_from_slice(&tmp[..n]);
        };
        let h = wire::parse_head(&head[..end])?;
        let want = if spec.sse { 200 } else { 101 };
        if h.status != want {
            bail!("status {} (expected {want})", h.status);
        }
        let conn_resume = resume.clone();
        let mut conn = Conn {
            stream,
            partial: head[end..].to_vec(),
            dechunk: (spec.sse && h.chunked).then(Dechunk::default),
            ev: SseEvents::default(),
            last: Vec::new(),
            last_seq: resume.as_ref().map_or(0, |r| r.since),
            // Kept if this attempt is refused, for the next one.
            epoch: resume.as_ref().and_then(|r| r.epoch.clone()),
            index: i,
            counted: false,
            resuming: resume.is_some(),
            refused: None,
            resume_epoch: resume.as_ref().and_then(|r| r.epoch.clone()),
            // Offset per connection, so that sampling one message in N still samples when each
            // connection gets fewer than N messages.
            nmsg: i,
            ready: spec.target == Target::Nchan,
            ready_tx: None,
            out: Vec::new(),
            close_code: 0,
            closing: false,
        };
        if !spec.sse && spec.target != Target::Nchan {
            let cmd = match &conn_resume {
                Some(Resume {
                    epoch: Some(epoch),
                    since,
                }) if spec.target == Target::Relay => format!(
                    r#"{{"type":"subscribe","channel":"{ch}","since":{since},"epoch":"{epoch}"}}"#
                ),
                Some(_) | None if spec.target == Target::Pusher => {
                    format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{ch}"}}}}"#)
                }
                _ => format!(r#"{{"type":"subscribe","channel":"{ch}"}}"#),
            };
            let mut f = Vec::new();
            wire::client_frame(wire::OP_TEXT, cmd.as_bytes(), &mut f);
            conn.stream.write_all(&f).await?;
        }
        Ok(conn)
    }

    fn signal_ready(&mut self, agg: &RefCell<Agg>) {
        if self.ready {
            if let Some((tx, _permit)) = self.ready_tx.take() {
                agg.borrow_mut().stats.open += 1;
                self.counted = true;
                let _ = tx.send(Ok(()));
            }
        }
    }

    async fn run(
        &mut self,
        spec: &SubSpec,
        agg: &RefCell<Agg>,
        buf: &RefCell<Vec<u8>>,
        finders: &Finders,
    ) -> Result<()> {
        // Bytes that came with the handshake response.
        if !self.partial.is_empty() {
            let data = std::mem::take(&mut self.partial);
            let used = self.process(spec, &data, now_ns(), &mut agg.borrow_mut(), finders)?;
            self.partial.extend_from_slice(&data[used..]);
        }
        self.signal_ready(agg);
        loop {
            if !self.out.is_empty() {
                let out = std::mem::take(&mut self.out);
                self.stream.write_all(&out).await?;
            }
            if self.closing {
                return Ok(());
            }
            self.stream.readable().await?;
            let mut budget = 16;
            loop {
                let drained = {
                    let mut b = buf.borrow_mut();
                    let p = self.partial.len();
                    if p + 4096 > b.len() {
                        b.resize(p + SHARED_BUF, 0);
                    }
                    b[..p].copy_from_slice(&self.partial);
                    let space = b.len() - p;
                    // A short read means the socket's queue was empty when read: report
                    // WouldBlock to tokio so it clears the readiness now, instead of spending a
                    // second read() on EAGAIN. (Edge-triggered: data arriving later raises a new
                    // edge, and tokio only clears a readiness it has not seen change.)
                    let mut got = 0;
                    let res = self.stream.try_io(Interest::READABLE, || {
                        got = self.stream.try_read(&mut b[p..])?;
                        if got > 0 && got < space {
                            return Err(std::io::ErrorKind::WouldBlock.into());
                        }
                        Ok(())
                    });
                    match res {
                        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                            return Err(e.into())
                        }
                        _ if got == 0 => match res {
                            Ok(()) => return Ok(()), // EOF
                            Err(_) => break,         // nothing to read
                        },
                        _ => {
                            let total = p + got;
                            let mut a = agg.borrow_mut();
                            a.stats.bytes += got as u64;
                            a.stats.reads += 1;
                            let used =
                                self.process(spec, &b[..total], now_ns(), &mut a, finders)?;
                            self.partial.clear();
                            self.partial.extend_from_slice(&b[used..total]);
                            res.is_err()
                        }
                    }
                };
                self.signal_ready(agg);
                if drained || !self.out.is_empty() || self.closing {
                    break;
                }
                budget -= 1;
                if budget == 0 {
                    tokio::task::yield_now().await;
                    break;
                }
            }
            self.signal_ready(agg);
        }
    }

    /// Handles every complete frame or event in `data`; returns the bytes used.
    fn process(
        &mut self,
        spec: &SubSpec,
        data: &[u8],
        now: u64,
        agg: &mut Agg,
        f: &Finders,
    ) -> Result<usize> {
        if spec.sse {
            return self.process_sse(spec, data, now, agg, f);
        }
        let mut off = 0;
        while let Some(fr) = wire::parse_frame(&data[off..])? {
            off += fr.len;
            match fr.opcode {
                wire::OP_TEXT | wire::OP_BINARY | wire::OP_CONT => {
                    self.on_message(spec, fr.payload, now, agg, f);
                }
                wire::OP_PING => wire::client_frame(wire::OP_PONG, fr.payload, &mut self.out),
                wire::OP_PONG => {}
                wire::OP_CLOSE => {
                    self.close_code = wire::close_code(fr.payload).unwrap_or(1005);
                    wire::close_frame(&mut self.out);
                    self.closing = true;
                    return Ok(off);
                }
                op => bail!("opcode {op}"),
            }
        }
        Ok(off)
    }

    fn on_message(&mut self, spec: &SubSpec, msg: &[u8], now: u64, agg: &mut Agg, f: &Finders) {
        if spec.target == Target::Nchan {
            self.delivery(spec, None, f.stamp(msg), now, agg);
            return;
        }
        if spec.target == Target::Pusher {
            // Every event not Pusher's own is a delivery: `message` for a relay payload without
            // an event name (its data the stamp as JSON), the event of a signed API publish
            // (its data the stamp as a JSON string). Pusher has no seq.
            if !msg.starts_with(br#"{"event":"pusher"#) {
                if msg.starts_with(br#"{"event":"#) {
                    self.delivery(spec, None, f.stamp(msg), now, agg);
                }
            } else if msg.starts_with(br#"{"event":"pusher_internal:subscription_succeeded""#) {
                self.ready = true;
            } else if msg.starts_with(br#"{"event":"pusher:ping""#) {
                let pong = br#"{"event":"pusher:pong","data":{}}"#;
                wire::client_frame(wire::OP_TEXT, pong, &mut self.out);
            } else if msg.starts_with(br#"{"event":"pusher:error""#) {
                agg.error(String::from_utf8_lossy(msg));
            }
            return;
        }
        if msg.starts_with(br#"{"type":"message""#) {
            let (seq, stamp) = f.message(msg);
            self.delivery(spec, seq, stamp, now, agg);
        } else if msg.starts_with(br#"{"type":"subscribed""#) {
            self.ready = true;
            self.epoch = f
                .epoch(msg)
                .map(|e| String::from_utf8_lossy(e).into_owned());
            if self.resuming {
                self.resuming = false;
                let recovered = memchr::memmem::find(msg, br#""recovered":true"#).is_some();
                let st = &mut agg.stats;
                st.resumed += 1;
                st.open += 1;
                self.counted = true;
                st.last_resume_ns = st.last_resume_ns.max(now);
                if recovered {
                    st.recovered += 1;
                } else {
                    if st.first_unrecovered.is_none() {
                        st.first_unrecovered = Some(format!(
                            "{} (we had seq {}, epoch {:?})",
                            String::from_utf8_lossy(msg),
                            self.last_seq,
                            self.resume_epoch
                        ));
                    }
                    // A new stream: seqs start over from the channel's current top.
                    self.last_seq = f.seq(msg).unwrap_or(0);
                }
            }
        } else if msg.starts_with(br#"{"type":"error""#) || msg.starts_with(br#"{"type":"gap""#) {
            agg.error(String::from_utf8_lossy(msg));
            if !self.ready || self.resuming {
                // The subscribe was refused (e.g. `unavailable` while a backplane connects):
                // a failed setup, or for a reconnection, another attempt.
                self.refused = Some(String::from_utf8_lossy(msg).into_owned());
                self.closing = true;
            }
        }
    }

    fn delivery(
        &mut self,
        spec: &SubSpec,
        seq: Option<u64>,
        stamp: Option<wire::Stamp>,
        now: u64,
        agg: &mut Agg,
    ) {
        let st = &mut agg.stats;
        if let Some(seq) = seq {
            if self.last_seq != 0 {
                if seq > self.last_seq + 1 {
                    st.seq_gaps += seq - self.last_seq - 1;
                } else if seq <= self.last_seq {
                    st.seq_back += 1;
                }
            }
            self.last_seq = self.last_seq.max(seq);
            if spec.reconnect.is_some() {
                let i = self.index as usize;
                if agg.last_seq.len() <= i {
                    agg.last_seq.resize(i + 1, 0);
                }
                agg.last_seq[i] = self.last_seq;
            }
        }
        let Some(stamp) = stamp else {
            st.foreign += 1;
            return;
        };
        st.received += 1;
        let p = stamp.p as usize;
        if self.last.len() <= p {
            self.last.resize(p + 1, 0);
        }
        let last = &mut self.last[p];
        if stamp.s > *last {
            *last = stamp.s;
        } else if stamp.s == *last {
            st.dups += 1;
        } else {
            st.reordered += 1;
        }
        self.nmsg = self.nmsg.wrapping_add(1);
        if spec.spans {
            let us = u32::try_from(now.saturating_sub(stamp.t) / 1000).unwrap_or(u32::MAX);
            let key = span_key(stamp.p, stamp.s);
            widen_span(agg.spans.entry(key).or_insert((us, us)), us, us);
        }
        if self.nmsg % spec.sample.max(1) == 0 {
            let us = now.saturating_sub(stamp.t) / 1000;
            agg.hist.saturating_record(us.max(1));
        }
    }

    fn process_sse(
        &mut self,
        spec: &SubSpec,
        data: &[u8],
        now: u64,
        agg: &mut Agg,
        f: &Finders,
    ) -> Result<usize> {
        // Events are parsed in place from the read buffer (a chunked body's data runs, handed
        // over by the de-chunker without a copy); `on_event` needs `self`, so the parser and
        // the de-chunker are taken out for the call.
        let mut ev = std::mem::take(&mut self.ev);
        let mut dechunk = self.dechunk.take();
        let mut on_event = |name: &[u8], data: &[u8]| self.on_event(spec, name, data, now, agg, f);
        let used = match &mut dechunk {
            Some(d) => d.segments(data, |seg| ev.feed(seg, &mut on_event)),
            None => {
                ev.feed(data, &mut on_event);
                Ok(data.len())
            }
        };
        self.ev = ev;
        if dechunk.as_ref().is_some_and(|d| d.done) {
            self.closing = true;
        }
        self.dechunk = dechunk;
        used
    }

    fn on_event(
        &mut self,
        spec: &SubSpec,
        name: &[u8],
        data: &[u8],
        now: u64,
        agg: &mut Agg,
        f: &Finders,
    ) {
        match name {
            b"subscribed" => self.ready = true,
            b"gap" => agg.error(format!("gap: {}", String::from_utf8_lossy(data))),
            b"message" | b"" if !data.is_empty() => {
                let (seq, stamp) = match spec.target {
                    Target::Nchan => (None, f.stamp(data)),
                    _ => f.message(data),
                };
                self.delivery(spec, seq, stamp, now, agg);
            }
            _ => {}
        }
    }
}

/// The `n`th loopback source address: 127.0.0.1, 127.0.0.2, … (250 per third octet).
pub fn src_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, (n / 250) as u8, (1 + n % 250) as u8)
}

fn sse_request(host: &str, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n")
}

// ---------------------------------------------------------------------------------------------
// Worker processes.

/// A group of subscribers, here or spread over worker processes.
pub enum Groups {
    Local(Group),
    Remote(Vec<Worker>),
}

pub struct Worker {
    pid: u32,
    tx: mpsc::UnboundedSender<(String, oneshot::Sender<Result<String>>)>,
    _child: std::process::Child,
}

impl Groups {
    /// `procs` ≤ 1: in this process; otherwise `procs` re-executions of this binary.
    pub fn new(spec: SubSpec, procs: u32) -> Result<Self> {
        if procs <= 1 {
            return Ok(Groups::Local(Group::new(spec)?));
        }
        let exe = std::env::current_exe()?;
        let json = serde_json::to_string(&spec)?;
        let mut workers = Vec::new();
        for _ in 0..procs {
            let mut child = std::process::Command::new(&exe)
                .args(["worker", "--spec", &json])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("spawn a worker")?;
            let pid = child.id();
            let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("worker stdin"))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("worker stdout"))?;
            let (tx, mut rx) =
                mpsc::unbounded_channel::<(String, oneshot::Sender<Result<String>>)>();
            std::thread::spawn(move || {
                let mut lines = std::io::BufReader::new(stdout).lines();
                while let Some((cmd, reply)) = rx.blocking_recv() {
                    let res = writeln!(stdin, "{cmd}")
                        .and_then(|()| stdin.flush())
                        .map_err(anyhow::Error::from)
                        .and_then(|()| match lines.next() {
                            Some(Ok(l)) => Ok(l),
                            Some(Err(e)) => Err(e.into()),
                            None => Err(anyhow!("worker {pid} exited")),
                        });
                    let _ = reply.send(res);
                }
            });
            workers.push(Worker {
                pid,
                tx,
                _child: child,
            });
        }
        Ok(Groups::Remote(workers))
    }

    pub fn worker_pids(&self) -> Vec<String> {
        match self {
            Groups::Local(_) => Vec::new(),
            Groups::Remote(w) => w.iter().map(|w| w.pid.to_string()).collect(),
        }
    }

    async fn ask_all(workers: &[Worker], cmds: Vec<String>) -> Result<Stats> {
        let mut waits = Vec::new();
        for (w, cmd) in workers.iter().zip(cmds) {
            let (tx, rx) = oneshot::channel();
            w.tx.send((cmd, tx))
                .map_err(|_| anyhow!("worker {} gone", w.pid))?;
            waits.push(rx);
        }
        let mut total = Stats::default();
        for rx in waits {
            let line = rx.await.map_err(|_| anyhow!("worker gone"))??;
            total.merge(serde_json::from_str(&line).context("worker reply")?);
        }
        Ok(total)
    }

    /// Opens connections `from..to` (split evenly over the workers).
    pub async fn open(&self, from: u32, to: u32) -> Result<Stats> {
        match self {
            Groups::Local(g) => Ok(g.open(from, to).await),
            Groups::Remote(ws) => {
                let k = ws.len() as u32;
                let n = to.saturating_sub(from);
                let cmds = (0..k)
                    .map(|j| {
                        let a = from + n * j / k;
                        let b = from + n * (j + 1) / k;
                        format!("open {a} {b}")
                    })
                    .collect();
                Self::ask_all(ws, cmds).await
            }
        }
    }

    pub async fn stats(&self, reset: bool) -> Result<Stats> {
        match self {
            Groups::Local(g) => Ok(g.stats(reset)),
            Groups::Remote(ws) => {
                let cmd = if reset { "reset" } else { "stats" };
                Self::ask_all(ws, vec![cmd.to_string(); ws.len()]).await
            }
        }
    }
}

/// `relay-bench worker --spec JSON`: holds a share of a group's connections, driven over stdin
/// (`open FROM TO`, `stats`, `reset`, one JSON line back for each); exits when stdin closes.
pub async fn worker_main(spec: SubSpec) -> Result<()> {
    let group = Group::new(spec)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut stdout = std::io::stdout();
    while let Some(line) = rx.recv().await {
        let mut words = line.split_whitespace();
        let reply = match words.next() {
            Some("open") => {
                let a: u32 = words.next().unwrap_or("0").parse()?;
                let b: u32 = words.next().unwrap_or("0").parse()?;
                group.open(a, b).await
            }
            Some("stats") => group.stats(false),
            Some("reset") => group.stats(true),
            _ => break,
        };
        writeln!(stdout, "{}", serde_json::to_string(&reply)?)?;
        stdout.flush()?;
    }
    Ok(())
}

/// A publish's key in [`Stats::spans`]: its publisher and sequence.
pub fn span_key(publisher: u32, seq: u64) -> u64 {
    u64::from(publisher) << 40 | seq
}

/// The publisher and sequence of a [`span_key`].
pub fn span_publish(key: u64) -> (u64, u64) {
    (key >> 40, key & ((1 << 40) - 1))
}

/// Widens a publish's span (its first and last delivery latency) to take in `first..=last`.
pub fn widen_span(span: &mut (u32, u32), first: u32, last: u32) {
    span.0 = span.0.min(first);
    span.1 = span.1.max(last);
}
