//! The open-loop publisher: a fixed schedule of R publishes per second spread over several
//! connections, over the HTTP publish API (one request in flight per keep-alive connection) or as
//! WebSocket `publish` commands (written in batches once a millisecond, replies counted by a reader
//! task). Each payload carries its send time and a per-publisher sequence (`wire::payload`).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::subs::{now_ns, Target};
use crate::wire::{self, Finders, Stamp};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// HTTP publish API, keep-alive, one request in flight per connection.
    Http,
    /// WebSocket `publish` commands, not waiting for replies (relay and node only).
    Ws,
}

/// Most publishes per second sent on one WebSocket publisher connection (more connections are
/// opened as the rate grows).
const WS_PER_CONN: f64 = 500.0;

#[derive(Debug, Clone)]
pub struct PubSpec {
    pub target: Target,
    pub addr: std::net::SocketAddr,
    pub mode: Mode,
    pub conns: u32,
    pub channels: u32,
    pub payload: usize,
    pub prefix: String,
}

/// Counters shared by the publisher connections (cumulative).
#[derive(Default)]
struct Shared {
    /// Next schedule slot.
    next: Cell<u64>,
    sent: Cell<u64>,
    /// Acknowledged publishes per channel.
    acked: RefCell<Vec<u64>>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
    /// Worst lateness against the schedule in this step.
    lag: Cell<Duration>,
}

impl Shared {
    fn error(&self, e: impl std::fmt::Display) {
        self.errors.set(self.errors.get() + 1);
        let mut f = self.first_error.borrow_mut();
        if f.is_none() {
            *f = Some(e.to_string());
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
    Ws(WsPub),
}

struct HttpPub {
    id: u32,
    seq: u64,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    req: Vec<u8>,
    body: Vec<u8>,
}

struct WsPub {
    id: u32,
    seq: u64,
    /// Set by the reader when the server closed the connection.
    dead: Rc<Cell<bool>>,
    write: OwnedWriteHalf,
    out: Vec<u8>,
    cmd: Vec<u8>,
}

impl Publisher {
    /// Opens the connections. Must run inside a `LocalSet`.
    pub async fn connect(spec: PubSpec) -> Result<Self> {
        let shared = Rc::new(Shared {
            acked: RefCell::new(vec![0; spec.channels.max(1) as usize]),
            ..Shared::default()
        });
        let spec = Rc::new(spec);
        let mut conns = Vec::new();
        for id in 0..spec.conns.max(1) {
            let c = match spec.mode {
                Mode::Http => PubConn::Http(HttpPub {
                    id,
                    seq: 0,
                    stream: Some(connect(spec.addr).await?),
                    buf: Vec::with_capacity(4096),
                    req: Vec::with_capacity(512),
                    body: Vec::with_capacity(512),
                }),
                Mode::Ws => {
                    if spec.target == Target::Nchan {
                        bail!("WebSocket publishing is implemented for relay and node only");
                    }
                    PubConn::Ws(WsPub::connect(&spec, id, shared.clone()).await?)
                }
            };
            conns.push(Some(c));
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

    pub fn first_error(&self) -> Option<String> {
        self.shared.first_error.borrow().clone()
    }

    pub fn conns(&self) -> usize {
        self.conns.len()
    }

    pub fn totals(&self) -> (u64, u64, u64) {
        let acked = self.shared.acked.borrow().iter().sum();
        (self.shared.sent.get(), acked, self.shared.errors.get())
    }

    /// Publishes at `rate` per second for `dur`; returns when every connection has stopped
    /// sending (WebSocket replies may still be on their way: see `settle`).
    pub async fn run(&mut self, rate: f64, dur: Duration) -> Result<StepPub> {
        let (sent0, _, err0) = self.totals();
        self.shared.next.set(0);
        self.shared.lag.set(Duration::ZERO);
        if self.spec.mode == Mode::Ws {
            // relay limits inbound messages per connection (--rate-limit, 1000/s by default):
            // keep each publisher connection at WS_PER_CONN publishes/s or less.
            let want = ((rate / WS_PER_CONN).ceil() as usize).max(self.conns.len());
            for slot in &mut self.conns {
                if let Some(PubConn::Ws(w)) = slot {
                    if w.dead.get() {
                        let id = w.id;
                        *slot = Some(PubConn::Ws(
                            WsPub::connect(&self.spec, id, self.shared.clone()).await?,
                        ));
                    }
                }
            }
            while self.conns.len() < want {
                let id = self.conns.len() as u32;
                let c = WsPub::connect(&self.spec, id, self.shared.clone()).await?;
                self.conns.push(Some(PubConn::Ws(c)));
            }
        }
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

async fn connect(addr: std::net::SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn note_lag(sh: &Shared, due: Instant) -> Instant {
    let now = Instant::now();
    if now > due {
        let late = now - due;
        if late > sh.lag.get() {
            sh.lag.set(late);
        }
    }
    now
}

impl HttpPub {
    async fn step(&mut self, spec: &PubSpec, sh: &Shared, start: Instant, end: Instant, rate: f64) {
        loop {
            let idx = sh.next.get();
            sh.next.set(idx + 1);
            let due = start + Duration::from_secs_f64(idx as f64 / rate);
            if due >= end {
                return;
            }
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            note_lag(sh, due);
            let ch = (idx % u64::from(spec.channels.max(1))) as usize;
            self.seq += 1;
            sh.sent.set(sh.sent.get() + 1);
            match tokio::time::timeout(Duration::from_secs(5), self.publish(spec, ch)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    if let Some(a) = sh.acked.borrow_mut().get_mut(ch) {
                        *a += 1;
                    }
                }
                Ok(Ok(status)) => sh.error(format!("publish: HTTP {status}")),
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

    async fn publish(&mut self, spec: &PubSpec, ch: usize) -> Result<u16> {
        use std::io::Write;
        let stamp = Stamp {
            t: now_ns(),
            p: self.id,
            s: self.seq,
        };
        self.body.clear();
        let path = match spec.target {
            Target::Nchan => {
                wire::payload(&mut self.body, stamp, spec.payload);
                format!("/pub?id={}{ch}", spec.prefix)
            }
            Target::Relay | Target::Node => {
                let _ = write!(self.body, r#"{{"channel":"{}{ch}","data":"#, spec.prefix);
                wire::payload(&mut self.body, stamp, spec.payload);
                self.body.push(b'}');
                "/api/publish".to_string()
            }
        };
        self.req.clear();
        let _ = write!(
            self.req,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            spec.addr,
            self.body.len()
        );
        self.req.extend_from_slice(&self.body);
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
        } else if head.status >= 200 && head.status != 204 && head.status != 304 {
            while read_more(stream, &mut rest).await? > 0 {}
            self.stream = None;
        }
        if head.close {
            self.stream = None;
        }
        Ok(head.status)
    }
}

/// Marks a publisher connection dead when its reader ends.
struct DeadOnDrop(Rc<Cell<bool>>);

impl Drop for DeadOnDrop {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize> {
    let mut tmp = [0u8; 4096];
    let n = s.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n)
}

impl WsPub {
    async fn connect(spec: &PubSpec, id: u32, sh: Rc<Shared>) -> Result<Self> {
        let mut s = connect(spec.addr).await?;
        let path = if spec.target == Target::Node {
            "/"
        } else {
            "/ws"
        };
        s.write_all(wire::upgrade_request(&spec.addr.to_string(), path).as_bytes())
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
            let _dead = DeadOnDrop(dead2);
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
                                return;
                            }
                            if m.starts_with(br#"{"type":"published""#) {
                                let ch = f.id(m).unwrap_or(u64::MAX) as usize;
                                if let Some(a) = sh.acked.borrow_mut().get_mut(ch) {
                                    *a += 1;
                                }
                            } else if m.starts_with(br#"{"type":"error""#) {
                                sh.error(String::from_utf8_lossy(m));
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            sh.error(format!("publisher: {e:#}"));
                            return;
                        }
                    }
                }
                partial.drain(..off);
                match read.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
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
        use std::io::Write;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = 0u64;
        loop {
            tick.tick().await;
            let now = Instant::now().min(end);
            let due = ((now - start).as_secs_f64() * rate) as u64;
            if due > sent {
                let at = start + Duration::from_secs_f64(sent as f64 / rate);
                note_lag(sh, at);
            }
            self.out.clear();
            let batch = due.saturating_sub(sent);
            while sent < due {
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
                sent += 1;
            }
            if !self.out.is_empty() {
                sh.sent.set(sh.sent.get() + batch);
                if let Err(e) = self.write.write_all(&self.out).await {
                    sh.error(format!("publisher write: {e}"));
                    return;
                }
            }
            if now >= end {
                break;
            }
        }
    }
}
