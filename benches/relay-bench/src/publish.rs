//! The open-loop publisher: a fixed schedule of R publishes per second, in one of four shapes
//! (`Mode`). The default is the shape of issue 12's measurement, a typical backend: **one
//! keep-alive HTTP/1.1 connection, `POST /api/publish` requests pipelined (not waiting for the
//! responses), written once per 1 ms tick** (so under 1,000/s each tick carries one publish);
//! a reader task reads and checks the responses as they come. Each payload carries its send
//! time and a per-publisher sequence (`wire::payload`).

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::pusher::{self, PusherApp};
use crate::subs::{now_ns, Target};
use crate::wire::{self, Finders, Stamp};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// HTTP `POST /api/publish` on one keep-alive connection (per --publishers), requests
    /// pipelined and written once per 1 ms tick; responses read concurrently.
    Pipelined,
    /// HTTP `POST /api/publish`, one request in flight per keep-alive connection (several
    /// connections: --publishers, default 8).
    Http,
    /// HTTP `POST /api/broadcast` (relay only): each scheduled publish is one request to every
    /// channel (at most 100), pipelined like `pipelined`.
    Broadcast,
    /// WebSocket `publish` commands written once per 1 ms tick, not waiting for replies
    /// (relay, node and uws).
    Ws,
    /// Pusher HTTP API publishes (`--target pusher`, any Pusher server): `POST /apps/ID/events`
    /// signed with the app's secret, one event per request, pipelined like `pipelined`. The
    /// event's `data` is the payload as a JSON string, as the Pusher server libraries send it.
    PusherApi,
    /// The same signed publishes, one request in flight per connection (several: --publishers,
    /// default 8), a new connection when the server closes one: for servers that close every
    /// API connection after one response (Sockudo answers each with `Connection: close`), where
    /// pipelined requests behind the first would go unanswered.
    PusherApiHttp,
}

impl Mode {
    /// Publisher connections unless --publishers says otherwise.
    pub fn default_conns(self) -> u32 {
        match self {
            Mode::Http | Mode::PusherApiHttp => 8,
            Mode::Pipelined | Mode::Broadcast | Mode::Ws | Mode::PusherApi => 1,
        }
    }
}

/// Most publishes per second sent on one WebSocket publisher connection (more connections are
/// opened as the rate grows), so that relay's default --rate-limit (1000/s) is never hit.
const WS_PER_CONN: f64 = 500.0;

/// Most requests in flight on one pipelined connection; past it a tick's publishes are counted
/// as errors instead of written (keeps the bookkeeping bounded if a server stops answering).
const MAX_IN_FLIGHT: usize = 1 << 20;

/// The event name of `pusher-api` publishes.
const PUSHER_EVENT: &str = "bench";

/// `acked` index meaning "every channel" (a broadcast).
const ALL: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub struct PubSpec {
    pub target: Target,
    pub addr: std::net::SocketAddr,
    pub mode: Mode,
    pub conns: u32,
    pub channels: u32,
    pub payload: usize,
    pub prefix: String,
    /// More request header lines for HTTP publishes, each ending in `\r\n` (an
    /// `Authorization: Bearer` API key, an `X-Forwarded-For`).
    pub headers: String,
    /// The app of the `pusher` target (signs `pusher-api` publishes).
    pub pusher: PusherApp,
}

/// Counters shared by the publisher connections (cumulative).
#[derive(Default)]
struct Shared {
    /// Next schedule slot (and so the next channel, round-robin).
    next: Cell<u64>,
    /// `next` when the current step began: slot `next - step_base` of a step is due at
    /// `(next - step_base) / rate` after its start.
    step_base: Cell<u64>,
    sent: Cell<u64>,
    /// Acknowledged publishes per channel.
    acked: RefCell<Vec<u64>>,
    /// Highest `seq` the server answered, per channel.
    top: RefCell<Vec<u64>>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
    /// Worst lateness against the schedule in this step.
    lag: Cell<Duration>,
    /// HTTP responses by status.
    statuses: RefCell<std::collections::BTreeMap<u16, u64>>,
}

impl Shared {
    fn error(&self, e: impl std::fmt::Display) {
        self.errors_n(1, e);
    }

    fn errors_n(&self, n: u64, e: impl std::fmt::Display) {
        self.errors.set(self.errors.get() + n);
        let mut f = self.first_error.borrow_mut();
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }

    fn status(&self, status: u16) {
        *self.statuses.borrow_mut().entry(status).or_default() += 1;
    }

    fn ack(&self, ch: u32, seq: Option<u64>) {
        let mut acked = self.acked.borrow_mut();
        if ch == ALL {
            acked.iter_mut().for_each(|a| *a += 1);
            return;
        }
        if let Some(a) = acked.get_mut(ch as usize) {
            *a += 1;
        }
        if let (Some(seq), Some(t)) = (seq, self.top.borrow_mut().get_mut(ch as usize)) {
            *t = (*t).max(seq);
        }
    }
}

/// What one step did.
#[derive(Debug, Default, Clone)]
pub struct StepPub {
    pub sent: u64,
    pub errors: u64,
    pub max_lag: Duration,
    pub elapsed: Duration,
}

pub struct Publisher {
    spec: Rc<PubSpec>,
    shared: Rc<Shared>,
    conns: Vec<Option<PubConn>>,
}

enum PubConn {
    Http(HttpPub),
    Pipe(PipePub),
    Ws(WsPub),
}

impl Publisher {
    /// Opens the connections. Must run inside a `LocalSet`.
    pub async fn connect(spec: PubSpec) -> Result<Self> {
        let n = spec.channels.max(1) as usize;
        let shared = Rc::new(Shared {
            acked: RefCell::new(vec![0; n]),
            top: RefCell::new(vec![0; n]),
            ..Shared::default()
        });
        if spec.mode == Mode::Broadcast && (spec.target != Target::Relay || spec.channels > 100) {
            bail!("--publish broadcast is for relay and at most 100 channels");
        }
        if spec.mode == Mode::Ws && matches!(spec.target, Target::Nchan | Target::Pusher) {
            bail!("WebSocket publishing is implemented for relay, node and uws only");
        }
        if matches!(spec.mode, Mode::PusherApi | Mode::PusherApiHttp)
            && spec.target != Target::Pusher
        {
            bail!("--publish pusher-api and pusher-api-http are for --target pusher");
        }
        let spec = Rc::new(spec);
        let mut conns = Vec::new();
        for id in 0..spec.conns.max(1) {
            conns.push(Some(PubConn::open(&spec, id, &shared).await?));
        }
        Ok(Self {
            spec,
            shared,
            conns,
        })
    }

    pub fn acked_per_channel(&self) -> Vec<u64> {
        self.shared.acked.borrow().clone()
    }

    /// The highest seq the server answered, per channel (not known for broadcasts).
    pub fn top_per_channel(&self) -> Vec<u64> {
        self.shared.top.borrow().clone()
    }

    pub fn first_error(&self) -> Option<String> {
        self.shared.first_error.borrow().clone()
    }

    /// HTTP responses so far, by status.
    pub fn statuses(&self) -> std::collections::BTreeMap<u16, u64> {
        self.shared.statuses.borrow().clone()
    }

    pub fn conns(&self) -> usize {
        self.conns.len()
    }

    /// Publishes sent, publishes acknowledged (a broadcast counts once), errors.
    pub fn totals(&self) -> (u64, u64, u64) {
        let acked = self.shared.acked.borrow();
        let acked = if self.spec.mode == Mode::Broadcast {
            acked.first().copied().unwrap_or(0)
        } else {
            acked.iter().sum()
        };
        (self.shared.sent.get(), acked, self.shared.errors.get())
    }

    /// Publishes at `rate` per second for `dur`; returns when every connection has stopped
    /// sending (replies may still be on their way: see `settle`).
    pub async fn run(&mut self, rate: f64, dur: Duration) -> Result<StepPub> {
        let (sent0, _, err0) = self.totals();
        self.shared.lag.set(Duration::ZERO);
        if self.spec.mode == Mode::Ws {
            for slot in &mut self.conns {
                if let Some(PubConn::Ws(w)) = slot {
                    if w.dead.get() {
                        let id = w.id;
                        *slot = Some(PubConn::open(&self.spec, id, &self.shared).await?);
                    }
                }
            }
            // Keep each WebSocket publisher at WS_PER_CONN publishes/s or less.
            let want = ((rate / WS_PER_CONN).ceil() as usize).max(self.conns.len());
            while self.conns.len() < want {
                let id = self.conns.len() as u32;
                let c = PubConn::open(&self.spec, id, &self.shared).await?;
                self.conns.push(Some(c));
            }
        }
        self.shared.step_base.set(self.shared.next.get());
        let start = Instant::now();
        let end = start + dur;
        let n = self.conns.len() as f64;
        let mut handles = Vec::new();
        for slot in &mut self.conns {
            let c = slot
                .take()
                .ok_or_else(|| anyhow!("publisher connection lost"))?;
            let spec = self.spec.clone();
            let sh = self.shared.clone();
            handles.push(tokio::task::spawn_local(async move {
                match c {
                    PubConn::Http(mut h) => {
                        h.step(&spec, &sh, start, end, rate).await;
                        PubConn::Http(h)
                    }
                    PubConn::Pipe(mut p) => {
                        p.step(&spec, &sh, start, end, rate / n).await;
                        PubConn::Pipe(p)
                    }
                    PubConn::Ws(mut w) => {
                        w.step(&spec, &sh, start, end, rate / n).await;
                        PubConn::Ws(w)
                    }
                }
            }));
        }
        for (slot, h) in self.conns.iter_mut().zip(handles) {
            *slot = Some(h.await?);
        }
        let (sent, _, errors) = self.totals();
        Ok(StepPub {
            sent: sent - sent0,
            errors: errors - err0,
            max_lag: self.shared.lag.get(),
            elapsed: start.elapsed(),
        })
    }

    /// Waits (at most `max`) until every publish sent has been answered.
    pub async fn settle(&self, max: Duration) {
        let until = Instant::now() + max;
        while Instant::now() < until {
            let (sent, acked, errors) = self.totals();
            if acked + errors >= sent {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl PubConn {
    async fn open(spec: &Rc<PubSpec>, id: u32, sh: &Rc<Shared>) -> Result<Self> {
        Ok(match spec.mode {
            Mode::Http | Mode::PusherApiHttp => PubConn::Http(HttpPub {
                id,
                seq: 0,
                stream: Some(connect(spec.addr).await?),
                buf: Vec::with_capacity(4096),
                req: Vec::with_capacity(512),
                body: Vec::with_capacity(512),
            }),
            Mode::Pipelined | Mode::Broadcast | Mode::PusherApi => PubConn::Pipe(PipePub {
                id,
                seq: 0,
                shared: sh.clone(),
                conn: Some(PipeConn::open(spec.addr, sh.clone()).await?),
                out: Vec::with_capacity(64 * 1024),
                body: Vec::with_capacity(512),
                retry_at: None,
            }),
            Mode::Ws => PubConn::Ws(WsPub::connect(spec, id, sh.clone()).await?),
        })
    }
}

async fn connect(addr: std::net::SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn note_lag(sh: &Shared, due: Instant) {
    let now = Instant::now();
    if now > due {
        let late = now - due;
        if late > sh.lag.get() {
            sh.lag.set(late);
        }
    }
}

/// The tick loop shared by the pipelined and WebSocket publishers: once per millisecond, calls
/// `send(from, to)` for the schedule slots that came due (open loop: a late tick catches up).
/// Returns when `end` is reached or `send` fails.
async fn ticks<F>(sh: &Shared, start: Instant, end: Instant, rate: f64, mut send: F)
where
    F: AsyncFnMut(u64, u64) -> Result<()>,
{
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0u64;
    loop {
        tick.tick().await;
        let now = Instant::now().min(end);
        let due = ((now - start).as_secs_f64() * rate) as u64;
        if due > sent {
            // Slot k (from 0) comes due at (k + 1) / rate: the first publish goes out one period
            // after the start.
            note_lag(
                sh,
                start + Duration::from_secs_f64((sent + 1) as f64 / rate),
            );
            let from = sent;
            sent = due;
            if let Err(e) = send(from, due).await {
                sh.error(format!("publisher: {e:#}"));
            }
        }
        if now >= end {
            return;
        }
    }
}

/// What comes before a channel's name in relay's API: `pusher/ID/` for the Pusher target
/// (its channel `CH` is relay channel `pusher/ID/CH`).
fn relay_prefix(spec: &PubSpec) -> Cow<'static, str> {
    match spec.target {
        Target::Pusher => Cow::Owned(spec.pusher.relay_prefix()),
        _ => Cow::Borrowed(""),
    }
}

/// Appends a publish request (HTTP/1.1, keep-alive) for channel `ch` (or a broadcast) to `out`.
fn http_request(spec: &PubSpec, ch: u32, stamp: Stamp, body: &mut Vec<u8>, out: &mut Vec<u8>) {
    use std::io::Write;
    body.clear();
    let owned_path;
    let path = match (spec.target, spec.mode) {
        (Target::Nchan, _) => {
            wire::payload(body, stamp, spec.payload);
            owned_path = format!("/pub?id={}{ch}", spec.prefix);
            owned_path.as_str()
        }
        (_, Mode::PusherApi | Mode::PusherApiHttp) => {
            let mut data = Vec::with_capacity(spec.payload + 16);
            wire::payload(&mut data, stamp, spec.payload);
            let _ = write!(
                body,
                r#"{{"name":"{PUSHER_EVENT}","channel":"{}{ch}","data":"#,
                spec.prefix
            );
            pusher::push_json_string(body, &data);
            body.push(b'}');
            let app = &spec.pusher;
            let events = app.events_path();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            owned_path = format!("{events}?{}", app.signed_query(&events, body, now));
            owned_path.as_str()
        }
        (_, Mode::Broadcast) => {
            body.extend_from_slice(br#"{"channels":["#);
            for c in 0..spec.channels.max(1) {
                if c > 0 {
                    body.push(b',');
                }
                let _ = write!(body, r#""{}{}{c}""#, relay_prefix(spec), spec.prefix);
            }
            body.extend_from_slice(br#"],"data":"#);
            wire::payload(body, stamp, spec.payload);
            body.push(b'}');
            "/api/broadcast"
        }
        _ => {
            let _ = write!(
                body,
                r#"{{"channel":"{}{}{ch}","data":"#,
                relay_prefix(spec),
                spec.prefix
            );
            wire::payload(body, stamp, spec.payload);
            body.push(b'}');
            "/api/publish"
        }
    };
    let _ = write!(
        out,
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{}\
         Content-Length: {}\r\n\r\n",
        spec.addr,
        spec.headers,
        body.len()
    );
    out.extend_from_slice(body);
}

// ---------------------------------------------------------------------------------------------
// Pipelined HTTP.

struct PipePub {
    id: u32,
    seq: u64,
    /// For the reader task of a connection reopened mid-step.
    shared: Rc<Shared>,
    conn: Option<PipeConn>,
    out: Vec<u8>,
    body: Vec<u8>,
    /// After a failed connect, no new attempt before this (the server may be restarting).
    retry_at: Option<Instant>,
}

/// One pipelined connection: the write half, and the channels of the requests in flight, in
/// order (HTTP/1.1 answers pipelined requests in order), shared with the reader task.
struct PipeConn {
    write: OwnedWriteHalf,
    in_flight: Rc<RefCell<VecDeque<u32>>>,
    dead: Rc<Cell<bool>>,
}

impl PipeConn {
    async fn open(addr: std::net::SocketAddr, sh: Rc<Shared>) -> Result<Self> {
        let (read, write) = connect(addr).await?.into_split();
        let in_flight = Rc::new(RefCell::new(VecDeque::new()));
        let dead = Rc::new(Cell::new(false));
        tokio::task::spawn_local(read_responses(read, in_flight.clone(), dead.clone(), sh));
        Ok(Self {
            write,
            in_flight,
            dead,
        })
    }
}

/// Reads the responses of a pipelined connection: each acknowledges the oldest request in
/// flight (2xx) or counts an error. When the connection ends, what was in flight is an error.
async fn read_responses(
    mut read: OwnedReadHalf,
    in_flight: Rc<RefCell<VecDeque<u32>>>,
    dead: Rc<Cell<bool>>,
    sh: Rc<Shared>,
) {
    let f = Finders::default();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut tmp = vec![0u8; 64 * 1024];
    let why = 'conn: loop {
        let mut off = 0;
        while let Some(end) = wire::head_end(&buf[off..]) {
            let head = match wire::parse_head(&buf[off..off + end]) {
                Ok(h) => h,
                Err(e) => break 'conn format!("bad response: {e:#}"),
            };
            let Some(len) = head.content_length else {
                break 'conn "a pipelined response without Content-Length".to_string();
            };
            if buf.len() - off < end + len {
                break;
            }
            let body = &buf[off + end..off + end + len];
            let ch = in_flight.borrow_mut().pop_front();
            sh.status(head.status);
            match ch {
                Some(ch) if (200..300).contains(&head.status) => sh.ack(ch, f.seq(body)),
                Some(_) => sh.error(format!(
                    "publish: HTTP {}: {}",
                    head.status,
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                )),
                None => break 'conn "a response to no request".to_string(),
            }
            off += end + len;
            if head.close {
                break 'conn "the server answered `Connection: close` (a server that closes every \
                             API connection needs one request per connection: --publish http or \
                             pusher-api-http)"
                    .to_string();
            }
        }
        buf.drain(..off);
        match read.read(&mut tmp).await {
            Ok(0) => break "the server closed the publisher connection".to_string(),
            Err(e) => break format!("publisher read: {e}"),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    dead.set(true);
    let lost = std::mem::take(&mut *in_flight.borrow_mut()).len() as u64;
    if lost > 0 {
        sh.errors_n(lost, format!("{why} ({lost} requests unanswered)"));
    }
}

impl PipePub {
    async fn step(&mut self, spec: &PubSpec, sh: &Shared, start: Instant, end: Instant, rate: f64) {
        let me = self;
        ticks(sh, start, end, rate, async |from, to| {
            me.send(spec, sh, to - from).await
        })
        .await;
    }

    async fn send(&mut self, spec: &PubSpec, sh: &Shared, n: u64) -> Result<()> {
        sh.sent.set(sh.sent.get() + n);
        if self.conn.as_ref().is_some_and(|c| c.dead.get()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                sh.errors_n(n, "publisher: no connection");
                return Ok(());
            }
            match PipeConn::open(spec.addr, self.shared.clone()).await {
                Ok(c) => {
                    self.conn = Some(c);
                    self.retry_at = None;
                }
                Err(e) => {
                    self.retry_at = Some(Instant::now() + Duration::from_millis(10));
                    sh.errors_n(n, format!("publisher: {e:#}"));
                    return Ok(());
                }
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        if conn.in_flight.borrow().len() >= MAX_IN_FLIGHT {
            sh.errors_n(n, "publisher: too many requests unanswered");
            return Ok(());
        }
        self.out.clear();
        for _ in 0..n {
            let idx = sh.next.get();
            sh.next.set(idx + 1);
            let ch = match spec.mode {
                Mode::Broadcast => ALL,
                _ => (idx % u64::from(spec.channels.max(1))) as u32,
            };
            self.seq += 1;
            let stamp = Stamp {
                t: now_ns(),
                p: self.id,
                s: self.seq,
            };
            http_request(spec, ch, stamp, &mut self.body, &mut self.out);
            conn.in_flight.borrow_mut().push_back(ch);
        }
        if let Err(e) = conn.write.write_all(&self.out).await {
            conn.dead.set(true);
            bail!("write: {e}");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// One request in flight per connection.

struct HttpPub {
    id: u32,
    seq: u64,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    req: Vec<u8>,
    body: Vec<u8>,
}

impl HttpPub {
    async fn step(&mut self, spec: &PubSpec, sh: &Shared, start: Instant, end: Instant, rate: f64) {
        loop {
            let idx = sh.next.get();
            let slot = idx - sh.step_base.get();
            let due = start + Duration::from_secs_f64(slot as f64 / rate);
            if due >= end {
                return;
            }
            sh.next.set(idx + 1);
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            note_lag(sh, due);
            let ch = (idx % u64::from(spec.channels.max(1))) as u32;
            self.seq += 1;
            sh.sent.set(sh.sent.get() + 1);
            match tokio::time::timeout(Duration::from_secs(5), self.publish(spec, ch)).await {
                Ok(Ok((status, seq))) if (200..300).contains(&status) => {
                    sh.status(status);
                    sh.ack(ch, seq);
                }
                Ok(Ok((status, _))) => {
                    sh.status(status);
                    sh.error(format!("publish: HTTP {status}"));
                }
                Ok(Err(e)) => {
                    self.stream = None;
                    sh.error(format!("publish: {e:#}"));
                }
                Err(_) => {
                    self.stream = None;
                    sh.error("publish: no response in 5 s");
                }
            }
        }
    }

    async fn publish(&mut self, spec: &PubSpec, ch: u32) -> Result<(u16, Option<u64>)> {
        let stamp = Stamp {
            t: now_ns(),
            p: self.id,
            s: self.seq,
        };
        self.req.clear();
        http_request(spec, ch, stamp, &mut self.body, &mut self.req);
        let stream = match &mut self.stream {
            Some(s) => s,
            None => self.stream.insert(connect(spec.addr).await?),
        };
        stream.write_all(&self.req).await?;
        // Response head, then the body (Content-Length, chunked, or until close).
        self.buf.clear();
        let end = loop {
            if let Some(e) = wire::head_end(&self.buf) {
                break e;
            }
            if read_more(stream, &mut self.buf).await? == 0 {
                bail!("connection closed before the response");
            }
        };
        let head = wire::parse_head(&self.buf[..end])?;
        let mut rest = self.buf.split_off(end);
        if let Some(len) = head.content_length {
            while rest.len() < len {
                if read_more(stream, &mut rest).await? == 0 {
                    bail!("connection closed in the body");
                }
            }
        } else if head.chunked {
            let mut d = wire::Dechunk::default();
            let mut sink = Vec::new();
            loop {
                let used = d.feed(&rest, &mut sink)?;
                rest.drain(..used);
                if d.done {
                    // Trailing CRLF after the last chunk.
                    while rest.len() < 2 {
                        if read_more(stream, &mut rest).await? == 0 {
                            break;
                        }
                    }
                    break;
                }
                if read_more(stream, &mut rest).await? == 0 {
                    bail!("connection closed in the body");
                }
            }
            rest = sink;
        } else if head.status >= 200 && head.status != 204 && head.status != 304 {
            while read_more(stream, &mut rest).await? > 0 {}
            self.stream = None;
        }
        if head.close {
            self.stream = None;
        }
        Ok((head.status, Finders::default().seq(&rest)))
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize> {
    let mut tmp = [0u8; 4096];
    let n = s.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// WebSocket publish commands.

struct WsPub {
    id: u32,
    seq: u64,
    /// Set by the reader when the server closed the connection.
    dead: Rc<Cell<bool>>,
    write: OwnedWriteHalf,
    out: Vec<u8>,
    cmd: Vec<u8>,
}

impl WsPub {
    async fn connect(spec: &PubSpec, id: u32, sh: Rc<Shared>) -> Result<Self> {
        let mut s = connect(spec.addr).await?;
        s.write_all(
            wire::upgrade_request(&spec.addr.to_string(), &spec.target.ws_path(&spec.pusher))
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        let end = loop {
            if let Some(e) = wire::head_end(&buf) {
                break e;
            }
            if read_more(&mut s, &mut buf).await? == 0 {
                bail!("closed during the handshake");
            }
        };
        let head = wire::parse_head(&buf[..end])?;
        if head.status != 101 {
            bail!("publisher upgrade: status {}", head.status);
        }
        let (mut read, write) = s.into_split();
        let mut partial = buf.split_off(end);
        let dead = Rc::new(Cell::new(false));
        let dead2 = dead.clone();
        // Reader: counts `published` replies by their `id` (the channel index).
        tokio::task::spawn_local(async move {
            let f = Finders::default();
            let mut tmp = vec![0u8; 64 * 1024];
            loop {
                let mut off = 0;
                loop {
                    match wire::parse_frame(&partial[off..]) {
                        Ok(Some(fr)) => {
                            off += fr.len;
                            let m = fr.payload;
                            if fr.opcode == wire::OP_CLOSE {
                                sh.error("publisher connection closed by the server");
                                dead2.set(true);
                                return;
                            }
                            if m.starts_with(br#"{"type":"published""#) {
                                let ch = f.id(m).unwrap_or(u64::MAX).min(u64::from(ALL - 1));
                                sh.ack(ch as u32, f.seq(m));
                            } else if m.starts_with(br#"{"type":"error""#) {
                                sh.error(String::from_utf8_lossy(m));
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            sh.error(format!("publisher: {e:#}"));
                            dead2.set(true);
                            return;
                        }
                    }
                }
                partial.drain(..off);
                match read.read(&mut tmp).await {
                    Ok(0) | Err(_) => {
                        dead2.set(true);
                        return;
                    }
                    Ok(n) => partial.extend_from_slice(&tmp[..n]),
                }
            }
        });
        Ok(Self {
            id,
            seq: 0,
            dead,
            write,
            out: Vec::with_capacity(64 * 1024),
            cmd: Vec::with_capacity(512),
        })
    }

    async fn step(&mut self, spec: &PubSpec, sh: &Shared, start: Instant, end: Instant, rate: f64) {
        let me = self;
        ticks(sh, start, end, rate, async |from, to| {
            me.send(spec, sh, to - from).await
        })
        .await;
    }

    async fn send(&mut self, spec: &PubSpec, sh: &Shared, n: u64) -> Result<()> {
        use std::io::Write;
        sh.sent.set(sh.sent.get() + n);
        if self.dead.get() {
            sh.errors_n(n, "publisher: WebSocket connection closed");
            return Ok(());
        }
        self.out.clear();
        for _ in 0..n {
            let idx = sh.next.get();
            sh.next.set(idx + 1);
            let ch = idx % u64::from(spec.channels.max(1));
            self.seq += 1;
            let stamp = Stamp {
                t: now_ns(),
                p: self.id,
                s: self.seq,
            };
            self.cmd.clear();
            let _ = write!(
                self.cmd,
                r#"{{"type":"publish","id":{ch},"channel":"{}{ch}","data":"#,
                spec.prefix
            );
            wire::payload(&mut self.cmd, stamp, spec.payload);
            self.cmd.push(b'}');
            wire::client_frame(wire::OP_TEXT, &self.cmd, &mut self.out);
        }
        if let Err(e) = self.write.write_all(&self.out).await {
            self.dead.set(true);
            bail!("write: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn spec(addr: std::net::SocketAddr, mode: Mode, channels: u32) -> PubSpec {
        PubSpec {
            target: Target::Relay,
            addr,
            mode,
            conns: 1,
            channels,
            payload: 64,
            prefix: "t".into(),
            headers: String::new(),
            pusher: PusherApp::default(),
        }
    }

    /// Reads requests (head + Content-Length body) from `s` until `n` have arrived; returns
    /// their paths and bodies and the number of reads it took.
    async fn read_requests(s: &mut TcpStream, n: usize) -> Result<(Vec<(String, Vec<u8>)>, usize)> {
        let mut buf = Vec::new();
        let mut tmp = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        let mut reads = 0;
        while out.len() < n {
            let k = s.read(&mut tmp).await?;
            if k == 0 {
                bail!("closed after {} requests", out.len());
            }
            reads += 1;
            buf.extend_from_slice(&tmp[..k]);
            while let Some(end) = wire::head_end(&buf) {
                let head = std::str::from_utf8(&buf[..end])?.to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .ok_or_else(|| anyhow!("no Content-Length"))?
                    .trim()
                    .parse()?;
                if buf.len() < end + len {
                    break;
                }
                let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                out.push((path, buf[end..end + len].to_vec()));
                buf.drain(..end + len);
            }
        }
        Ok((out, reads))
    }

    /// Accepts one connection, reads `n` requests, then writes `answers` and holds the
    /// connection until the client closes it; returns the requests and the reads they took.
    async fn answer_after(
        listener: TcpListener,
        n: usize,
        answers: String,
    ) -> Result<(Vec<(String, Vec<u8>)>, usize)> {
        let (mut s, _) = listener.accept().await?;
        let got = read_requests(&mut s, n).await?;
        s.write_all(answers.as_bytes()).await?;
        let mut tmp = [0u8; 16];
        let _ = s.read(&mut tmp).await;
        Ok(got)
    }

    fn response(seq: u64) -> String {
        let body = format!(r#"{{"channel":"t0","seq":{seq},"epoch":"e"}}"#);
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_pipelined_publisher_sends_without_waiting_and_counts_the_answers_in_order(
    ) -> Result<()> {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                // The server answers nothing until it has every request of the run: a
                // publisher that waited for answers would stall at the first.
                let server = tokio::spawn(answer_after(
                    listener,
                    200,
                    (1..=200).map(response).collect(),
                ));
                let mut p = Publisher::connect(spec(addr, Mode::Pipelined, 2)).await?;
                let r = p.run(1000.0, Duration::from_millis(200)).await?;
                p.settle(Duration::from_secs(5)).await;
                assert_eq!(r.sent, 200);
                assert_eq!(p.totals(), (200, 200, 0));
                // Round-robin over the two channels, acknowledged per channel.
                assert_eq!(p.acked_per_channel(), vec![100, 100]);
                assert_eq!(p.top_per_channel(), vec![199, 200]);
                drop(p);
                let (reqs, _) = server.await??;
                assert!(reqs.iter().all(|(path, _)| path == "/api/publish"));
                assert!(reqs[0].1.starts_with(br#"{"channel":"t0","data":{"t":"#));
                assert!(reqs[1].1.starts_with(br#"{"channel":"t1","data":{"t":"#));
                Ok(())
            })
            .await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn under_a_thousand_per_second_each_tick_carries_one_publish() -> Result<()> {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let server =
                    tokio::spawn(answer_after(listener, 20, (1..=20).map(response).collect()));
                let mut p = Publisher::connect(spec(addr, Mode::Pipelined, 1)).await?;
                p.run(100.0, Duration::from_millis(200)).await?;
                p.settle(Duration::from_secs(5)).await;
                drop(p);
                let (reqs, reads) = server.await??;
                let n = reqs.len();
                // 100/s: one publish every 10 ms, each written on its own (TCP_NODELAY), so the
                // server sees them one read at a time.
                assert_eq!(n, 20);
                assert!(reads >= 15, "{reads} reads for 20 publishes 10 ms apart");
                Ok(())
            })
            .await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn pusher_api_publishes_are_signed_events_one_per_request_pipelined() -> Result<()> {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                // Answers nothing until every request is in (pipelined), then `{}` as Pusher
                // servers do.
                let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".repeat(20);
                let server = tokio::spawn(answer_after(listener, 20, ok));
                let mut spec = spec(addr, Mode::PusherApi, 2);
                spec.target = Target::Pusher;
                spec.pusher = "app7:key7:secret7"
                    .parse()
                    .map_err(|e: String| anyhow!(e))?;
                let mut p = Publisher::connect(spec).await?;
                p.run(1000.0, Duration::from_millis(20)).await?;
                p.settle(Duration::from_secs(5)).await;
                assert_eq!(p.totals(), (20, 20, 0));
                assert_eq!(p.acked_per_channel(), vec![10, 10]);
                drop(p);
                let (reqs, _) = server.await??;
                let f = Finders::default();
                for (i, (target, body)) in reqs.iter().enumerate() {
                    let (path, query) = target.split_once('?').unwrap_or_default();
                    assert_eq!(path, "/apps/app7/events");
                    let (signed, sig) = query.split_once("&auth_signature=").unwrap_or_default();
                    assert!(
                        signed.starts_with("auth_key=key7&auth_timestamp=")
                            && signed.ends_with(&format!(
                                "&auth_version=1.0&body_md5={}",
                                pusher::md5_hex(body)
                            )),
                        "{signed}"
                    );
                    let want =
                        pusher::sign("secret7", format!("POST\n{path}\n{signed}").as_bytes());
                    assert_eq!(sig, want);
                    // One event per request; data is a JSON string holding the stamp.
                    let ev: serde_json::Value = serde_json::from_slice(body)?;
                    assert_eq!(ev["name"], PUSHER_EVENT);
                    assert_eq!(ev["channel"], format!("t{}", i % 2));
                    let data = ev["data"].as_str().unwrap_or_default();
                    let stamp = f.stamp(data.as_bytes()).ok_or_else(|| anyhow!("{data}"))?;
                    assert_eq!(stamp.s, i as u64 + 1);
                    assert_eq!(f.stamp(body), Some(stamp));
                }
                Ok(())
            })
            .await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_server_that_closes_after_each_answer_gets_every_publish_on_new_connections(
    ) -> Result<()> {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                // Sockudo's way: every API answer says `connection: close`, then closes.
                let server = tokio::spawn(async move {
                    let mut conns = 0;
                    let mut paths = Vec::new();
                    while paths.len() < 40 {
                        let (mut s, _) = listener.accept().await?;
                        conns += 1;
                        let (reqs, _) = read_requests(&mut s, 1).await?;
                        paths.extend(reqs.into_iter().map(|(p, _)| p));
                        let close = "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
                        s.write_all(close.as_bytes()).await?;
                    }
                    Ok::<_, anyhow::Error>((conns, paths))
                });
                let mut spec = spec(addr, Mode::PusherApiHttp, 1);
                spec.target = Target::Pusher;
                spec.conns = 2;
                let mut p = Publisher::connect(spec).await?;
                // Two steps: the second's schedule starts at its own start, not where the
                // first's slots left off.
                for step in 1..=2 {
                    let r = p.run(200.0, Duration::from_millis(100)).await?;
                    p.settle(Duration::from_secs(5)).await;
                    assert_eq!(r.sent, 20);
                    assert_eq!(p.totals(), (20 * step, 20 * step, 0));
                }
                drop(p);
                let (conns, paths) = server.await??;
                assert_eq!(conns, 40);
                assert!(paths.iter().all(|p| p.starts_with("/apps/bench/events?auth_key=bench-key&")));
                Ok(())
            })
            .await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_publish_is_an_error_not_an_ack() -> Result<()> {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                tokio::spawn(async move {
                    let (mut s, _) = listener.accept().await?;
                    read_requests(&mut s, 3).await?;
                    let busy = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}";
                    let all = format!("{}{busy}{}", response(1), response(2));
                    s.write_all(all.as_bytes()).await?;
                    let mut tmp = [0u8; 16];
                    let _ = s.read(&mut tmp).await;
                    Ok::<_, anyhow::Error>(())
                });
                let mut p = Publisher::connect(spec(addr, Mode::Pipelined, 1)).await?;
                p.run(100.0, Duration::from_millis(30)).await?;
                p.settle(Duration::from_secs(5)).await;
                assert_eq!(p.totals(), (3, 2, 1));
                assert!(p.first_error().is_some_and(|e| e.contains("503")));
                Ok(())
            })
            .await
    }
}
