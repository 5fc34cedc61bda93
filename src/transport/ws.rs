//! WebSocket sessions: fastwebsockets does the handshake, then one task per connection reads
//! frames with the sans-IO decoder (from a buffer shared by the shard) and writes its outbox
//! with vectored writes.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::http::{error, Body};
use super::ShardContext;
use crate::engine::hub::{ConnId, Subscriber};
use crate::engine::outbox::{Out, Outbox, OutboxState, Written};
use crate::protocol::ws::{self as frame, Decoder, Message};
use crate::protocol::{binary, json, Command, Event, Payload, ReqId, Wire};
use crate::types::{ChannelName, DataKind, StreamPosition};

/// Size of the shard's shared read buffer.
const SCRATCH: usize = 64 * 1024;

/// How long a closing connection may take to flush its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

thread_local! {
    /// Every connection of the shard reads into this buffer; only a partial frame is kept per
    /// connection. Borrowed only inside one poll or one synchronous parse, never across an await.
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// Answers `GET /ws`: the 101 response, and a task that runs the session once upgraded.
pub fn upgrade(ctx: Rc<ShardContext>, mut req: Request<Incoming>) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected a WebSocket upgrade request",
        );
    }
    let wire = choose_wire(&req);
    let (mut res, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    if let Some(wire) = wire {
        res.headers_mut().insert(
            "sec-websocket-protocol",
            hyper::header::HeaderValue::from_static(wire.subprotocol()),
        );
    }
    let wire = wire.unwrap_or(Wire::Json);
    let shutdown = ctx.node.shutdown.clone();
    tokio::task::spawn_local(async move {
        if shutdown.is_cancelled() {
            return;
        }
        let ws = match fut.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let upgraded = ws.into_inner().into_inner();
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let mut tcp = parts.io.into_inner();
                let (rd, wr) = tcp.split();
                run(ctx, wire, rd, wr, parts.read_buf).await;
            }
            Err(up) => {
                let (rd, wr) = tokio::io::split(TokioIo::new(up));
                run(ctx, wire, rd, wr, Bytes::new()).await;
            }
        }
    });
    res.map(|_| Body::Empty)
}

/// The protocol the client asked for, in its order of preference; `None` when it named none we
/// speak (then JSON, without echoing a subprotocol).
fn choose_wire(req: &Request<Incoming>) -> Option<Wire> {
    req.headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim))
        .find_map(|p| match p {
            "relay.v1.json" => Some(Wire::Json),
            "relay.v1.bin" if binary::AVAILABLE => Some(Wire::Binary),
            _ => None,
        })
}

/// One WebSocket connection's state, apart from its socket and decoder.
struct Session {
    ctx: Rc<ShardContext>,
    id: ConnId,
    wire: Wire,
    outbox: Rc<Outbox>,
    subs: Vec<ChannelName>,
    /// Bytes of a frame not yet complete.
    partial: BytesMut,
    last_inbound: Instant,
    ping_sent: bool,
    /// No more reading: the peer closed, broke the protocol, or we are closing.
    read_closed: bool,
    close_deadline: Option<Instant>,
}

async fn run<R, W>(ctx: Rc<ShardContext>, wire: Wire, mut rd: R, mut wr: W, pre: Bytes)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cfg = ctx.config().clone();
    let mut decoder = Decoder::new(cfg.max_message_size);
    let mut s = Session {
        id: ctx.next_conn_id(),
        wire,
        outbox: Rc::new(Outbox::new(cfg.max_outbox_bytes)),
        ctx,
        subs: Vec::new(),
        partial: BytesMut::new(),
        last_inbound: Instant::now(),
        ping_sent: false,
        read_closed: false,
        close_deadline: None,
    };
    if !pre.is_empty() {
        s.on_read(&mut decoder, &mut pre.to_vec());
    }
    let shutdown = s.ctx.node.shutdown.clone();
    let timer = tokio::time::sleep(cfg.ping_interval);
    tokio::pin!(timer);
    loop {
        let deadline = s.next_deadline(&cfg);
        if timer.deadline() != deadline.into() {
            timer.as_mut().reset(deadline.into());
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if s.close_deadline.is_none() => {
                s.close(frame::CLOSE_RESTART, "service restart", true);
            }
            r = write_some(&mut wr, &s.outbox) => match r {
                Ok(WriteEvent::Wrote(w)) if w.finished => {
                    let _ = wr.shutdown().await;
                    break;
                }
                Ok(WriteEvent::Wrote(_)) => {}
                Ok(WriteEvent::Overflowed) => {
                    tracing::debug!(conn = s.id, "slow consumer closed");
                    s.close(frame::CLOSE_SLOW_CONSUMER, "slow consumer: resume from your last seq", false);
                }
                Err(_) => break,
            },
            r = read_some(&mut rd), if !s.read_closed => match r {
                Ok(0) | Err(_) => {
                    // The peer went away without a close frame: nothing more to send it.
                    break;
                }
                Ok(n) => {
                    s.last_inbound = Instant::now();
                    s.ping_sent = false;
                    SCRATCH_BUF.with(|b| {
                        let mut b = b.borrow_mut();
                        s.on_read(&mut decoder, &mut b[..n]);
                    });
                }
            },
            _ = &mut timer => {
                if s.on_timer(&cfg) {
                    break;
                }
            }
        }
    }
    s.leave();
}

enum WriteEvent {
    Wrote(Written),
    Overflowed,
}

async fn write_some<W: AsyncWrite + Unpin>(wr: &mut W, outbox: &Outbox) -> io::Result<WriteEvent> {
    poll_fn(|cx| {
        ready!(outbox.poll_ready(cx));
        if outbox.state() == OutboxState::Overflowed {
            return Poll::Ready(Ok(WriteEvent::Overflowed));
        }
        outbox
            .write_with(|iov| Pin::new(&mut *wr).poll_write_vectored(cx, iov))
            .map_ok(WriteEvent::Wrote)
    })
    .await
}

async fn read_some<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<usize> {
    poll_fn(|cx| {
        SCRATCH_BUF.with(|b| {
            let mut b = b.borrow_mut();
            let mut buf = ReadBuf::new(&mut b[..]);
            ready!(Pin::new(&mut *rd).poll_read(cx, &mut buf))?;
            Poll::Ready(Ok(buf.filled().len()))
        })
    })
    .await
}

impl Session {
    fn next_deadline(&self, cfg: &crate::config::Config) -> Instant {
        if let Some(d) = self.close_deadline {
            return d;
        }
        if self.ping_sent {
            self.last_inbound + cfg.idle_timeout
        } else {
            self.last_inbound + cfg.ping_interval
        }
    }

    /// Returns true when the session must end now.
    fn on_timer(&mut self, cfg: &crate::config::Config) -> bool {
        let now = Instant::now();
        if self.close_deadline.is_some_and(|d| now >= d) {
            return true;
        }
        if now >= self.last_inbound + cfg.idle_timeout {
            self.close(frame::CLOSE_GOING_AWAY, "idle timeout", true);
        } else if !self.ping_sent && now >= self.last_inbound + cfg.ping_interval {
            self.ping_sent = true;
            self.push(frame::frame(frame::OP_PING, b""));
        }
        false
    }

    /// Queues a close frame; the session ends once it is written (or after a grace period).
    fn close(&mut self, code: u16, reason: &str, flush: bool) {
        if self.close_deadline.is_none() {
            self.close_deadline = Some(Instant::now() + CLOSE_GRACE);
        }
        self.read_closed = true;
        self.outbox
            .close_with(frame::close_frame(code, reason), flush);
    }

    fn on_read(&mut self, decoder: &mut Decoder, data: &mut [u8]) {
        if self.partial.is_empty() {
            let used = self.parse(decoder, data);
            if used < data.len() && !self.read_closed {
                self.partial.extend_from_slice(&data[used..]);
            }
        } else {
            self.partial.extend_from_slice(data);
            let mut buf = std::mem::take(&mut self.partial);
            let used = self.parse(decoder, &mut buf);
            buf.advance(used);
            if !buf.is_empty() && !self.read_closed {
                self.partial = buf;
            }
        }
    }

    /// Handles every whole frame at the start of `buf`; returns the bytes consumed.
    fn parse(&mut self, decoder: &mut Decoder, buf: &mut [u8]) -> usize {
        let mut pos = 0;
        while !self.read_closed {
            match decoder.decode(&mut buf[pos..]) {
                Ok(None) => break,
                Ok(Some((n, msg))) => {
                    if let Some(msg) = msg {
                        self.on_message(msg);
                    }
                    pos += n;
                }
                Err(e) => {
                    tracing::debug!(conn = self.id, error = %e, "websocket protocol error");
                    self.close(e.close_code(), &e.to_string(), true);
                }
            }
        }
        pos
    }

    fn on_message(&mut self, msg: Message<'_>) {
        let decoded = match (msg, self.wire) {
            (Message::Text(text), Wire::Json) => json::parse_command(text.as_bytes()),
            (Message::Binary(bytes), Wire::Binary) => binary::decode_command(bytes),
            (Message::Text(_) | Message::Binary(_), wire) => {
                let message = match wire {
                    Wire::Json => "binary frames need the relay.v1.bin subprotocol",
                    Wire::Binary => "text frames need the relay.v1.json subprotocol",
                };
                return self.reply(
                    None,
                    &Event::Error {
                        code: "unsupported_frame",
                        message,
                    },
                );
            }
            (Message::Ping(p), _) => return self.push(frame::frame(frame::OP_PONG, p)),
            (Message::Pong(_), _) => return,
            (Message::Close(code, _), _) => {
                let code = code.unwrap_or(frame::CLOSE_NORMAL);
                return self.close(code, "", true);
            }
        };
        match decoded {
            Ok(req) => self.on_command(req.id, req.command),
            Err(e) => self.reply(
                e.id,
                &Event::Error {
                    code: e.code,
                    message: &e.message,
                },
            ),
        }
    }

    fn push(&self, frame: Bytes) {
        self.outbox.push(Out::control(frame));
    }

    fn reply(&self, id: Option<ReqId<'_>>, event: &Event<'_>) {
        self.push(self.wire.encode(id, event));
    }

    fn on_command(&mut self, id: Option<ReqId<'_>>, command: Command<'_>) {
        let now = Instant::now();
        let error = |code, message| Event::Error { code, message };
        match command {
            Command::Subscribe { channel, resume } => {
                if self.subs.contains(&channel) {
                    return self.reply(
                        id,
                        &error("already_subscribed", "already subscribed to this channel"),
                    );
                }
                if self.subs.len() >= self.ctx.config().max_subscriptions {
                    return self.reply(
                        id,
                        &error(
                            "too_many_subscriptions",
                            "this connection has the most subscriptions allowed",
                        ),
                    );
                }
                let encoding = self.wire.message_encoding();
                let sub = Subscriber {
                    outbox: self.outbox.clone(),
                    encoding,
                    slot: self.subs.len() as u16,
                    after: 0,
                };
                let s = self
                    .ctx
                    .hub
                    .borrow_mut()
                    .subscribe(self.id, &channel, resume, sub, now);
                self.subs.push(channel.clone());
                self.reply(
                    id,
                    &Event::Subscribed {
                        channel: &channel,
                        position: s.position,
                        recovered: s.recovered,
                    },
                );
                for p in &s.replay {
                    let frame = p.frame(encoding, |p| {
                        crate::protocol::encode_publication(encoding, &channel, p)
                    });
                    if !self.outbox.push(Out {
                        frame,
                        slot: 0,
                        seq: p.seq,
                    }) {
                        break;
                    }
                }
            }
            Command::Unsubscribe { channel } => {
                if self
                    .ctx
                    .hub
                    .borrow_mut()
                    .unsubscribe(self.id, &channel, now)
                {
                    self.subs.retain(|c| c != &channel);
                    self.reply(id, &Event::Unsubscribed { channel: &channel });
                } else {
                    self.reply(
                        id,
                        &error("not_subscribed", "not subscribed to this channel"),
                    );
                }
            }
            Command::Publish { channel, data } => {
                let (kind, bytes) = match data {
                    Payload::Json(raw) => (DataKind::Json, json::normalize_data(raw)),
                    Payload::Bytes(b) => (DataKind::Binary, Bytes::copy_from_slice(b)),
                };
                let p = self.ctx.node.engine.publish(&channel, kind, bytes, now);
                self.ctx.node.wake(p.wake);
                let position = StreamPosition {
                    epoch: p.epoch,
                    seq: p.seq,
                };
                self.reply(
                    id,
                    &Event::Published {
                        channel: &channel,
                        position,
                    },
                );
            }
            Command::Heartbeat => self.reply(id, &Event::Heartbeat),
        }
    }

    /// Releases every subscription.
    fn leave(&mut self) {
        let now = Instant::now();
        let mut hub = self.ctx.hub.borrow_mut();
        for ch in self.subs.drain(..) {
            hub.unsubscribe(self.id, &ch, now);
        }
    }
}
