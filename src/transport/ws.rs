//! WebSocket sessions: fastwebsockets does the handshake, then one task per connection reads
//! frames with the sans-IO decoder (from a buffer shared by the shard) and writes its outbox
//! with vectored writes.

use std::future::poll_fn;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::io::SessionIo;

use super::http::{error, Body};
use super::request::{connection_auth, ConnAuth};
use super::session::commands::subscribe_refusal;
use super::session::reader::{self, Frames};
use super::session::{
    self, Claim, Gate, Pending, Refusal, Rules, SessionCore, Timed, Timeouts, Unsubscribe,
};
use super::ShardContext;
use crate::auth::Perm;
use crate::engine::hub::{ConnId, Subscriber};
use crate::engine::outbox::{Out, Outbox, OutboxState, Written};
use crate::engine::presence::Liveness;
use crate::engine::Join;
use crate::protocol::ws::{self as frame, Decoder, Message, WsError};
use crate::protocol::{binary, json, ClientPresence, Command, Event, Payload, ReqId, Wire};
use crate::types::{ChannelName, DataKind, StreamPosition};

/// How long a closing connection may take to flush its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Answers `GET /ws`: the 101 response, and a task that runs the session once upgraded.
pub fn upgrade(ctx: Rc<ShardContext>, mut req: Request<Incoming>) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected a WebSocket upgrade request",
        );
    }
    if let Err(res) = check_handshake(&req) {
        return res;
    }
    let wire = choose_wire(&req);
    let deflate = ctx.config().permessage_deflate
        && crate::protocol::deflate::accepts(
            req.headers()
                .get_all("sec-websocket-extensions")
                .iter()
                .map(|v| v.as_bytes()),
        );
    let auth = match connection_auth(&ctx, &req) {
        Ok(a) => a,
        Err(e) => {
            crate::limits::refused(crate::limits::Cause::Unauthorized, &e.to_string());
            return error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
        }
    };
    let guard = match super::http::stream_slot(&ctx, &req) {
        Ok(g) => g,
        Err(res) => return res,
    };
    let protocol = match wire {
        Some(Wire::Binary) => "binary",
        _ => "json",
    };
    let hs = super::proxied::handshake(&ctx, &req, ("websocket", protocol), &auth);
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
    if deflate {
        res.headers_mut().insert(
            "sec-websocket-extensions",
            hyper::header::HeaderValue::from_static(crate::protocol::deflate::RESPONSE),
        );
    }
    let start = Box::new(Start {
        wire: wire.unwrap_or(Wire::Json),
        deflate,
        auth,
        hs,
    });
    ctx.tracker
        .clone()
        .spawn_local(session_task(ctx, fut, start, guard));
    res.map(|_| Body::Empty)
}

/// The RFC 6455 rules fastwebsockets leaves to us: a version other than 13 gets 426 with
/// `Sec-WebSocket-Version: 13` (§4.2.2), so a client can retry with one we speak; a
/// `Sec-WebSocket-Key` that is not the base64 of 16 bytes (or appears twice) gets 400 (§4.2.1).
// The error is the response itself, built once per refused handshake: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn check_handshake(req: &Request<Incoming>) -> Result<(), Response<Body>> {
    use base64::Engine;
    let h = req.headers();
    if h.get("sec-websocket-version").map(|v| v.as_bytes()) != Some(b"13") {
        let mut res = error(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_version",
            "this server speaks WebSocket version 13 (RFC 6455)",
        );
        res.headers_mut().insert(
            "sec-websocket-version",
            hyper::header::HeaderValue::from_static("13"),
        );
        return Err(res);
    }
    let mut keys = h.get_all("sec-websocket-key").iter();
    let key_ok = match (keys.next(), keys.next()) {
        (Some(k), None) => base64::engine::general_purpose::STANDARD
            .decode(k.as_bytes())
            .is_ok_and(|nonce| nonce.len() == 16),
        _ => false,
    };
    if !key_ok {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Sec-WebSocket-Key must be given once, as the base64 of 16 bytes",
        ));
    }
    Ok(())
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

// The session's own close codes, from the catalogue (`protocol::codes`); their old paths.
pub use crate::protocol::codes::{CLOSE_RATE_LIMITED, CLOSE_TOKEN_EXPIRED, CLOSE_UNAUTHORIZED};

/// The reply to a publish: `published`, or an `unavailable` error when it was not sequenced.
fn publish_reply(
    ctx: &ShardContext,
    wire: Wire,
    id: Option<ReqId<'_>>,
    channel: &ChannelName,
    r: Result<(crate::engine::Published, bool), crate::backend::Refusal>,
) -> Bytes {
    match r {
        Ok((p, duplicate)) => {
            if !duplicate {
                ctx.metrics.published.increment(1);
            }
            let position = StreamPosition {
                epoch: p.epoch,
                seq: p.seq,
            };
            wire.encode(id, &Event::Published { channel, position })
        }
        Err(e) => wire.encode(
            id,
            &Event::Error {
                code: e.code,
                message: &e.message,
            },
        ),
    }
}

/// One WebSocket connection's state, apart from its socket and decoder.
struct Session {
    ctx: Rc<ShardContext>,
    id: ConnId,
    /// Touched on every read once the connection is in a presence channel (presence sweeps
    /// read it); `None` before: most connections never join one.
    live: Option<Arc<Liveness>>,
    /// Whether the connection ends cleanly (close handshake, or closed by us): then it leaves
    /// presence at once; otherwise (vanished) at the presence timeout.
    clean: bool,
    wire: Wire,
    /// permessage-deflate was negotiated: publications go out compressed (over
    /// `--deflate-min-size`), in a frame shared by every such subscriber.
    deflate: bool,
    outbox: Rc<Outbox>,
    /// Bytes of a frame not yet complete.
    partial: reader::Partial,
    /// Auth, clock, rate and subscriptions: the decisions (sans-IO, `super::session`).
    core: SessionCore,
    /// No more reading: the peer closed, broke the protocol, or we are closing.
    read_closed: bool,
    /// Our close frame is written and our side shut down: read and discard until the client
    /// closes too (or the close grace ends), as RFC 6455 asks. Dropping the socket with unread
    /// input would make the kernel reset the connection, and the client could lose the close
    /// frame and its code.
    draining: bool,
    /// What an anonymous session without a backplane or a proxy does not use, boxed: one word
    /// in every session (issue 12 item 4).
    rare: Option<Box<Rare>>,
}

/// The parts of a [`Session`] that most sessions never use.
#[derive(Default)]
struct Rare {
    /// Subscribes waiting for the backplane to bring their channel in sync (never in memory
    /// mode); the core counts them as subscriptions.
    joining: Pending<PendingJoin, Result<(), crate::backend::Refusal>>,
    /// Server API commands for this connection's user (`None`: no user, not in the index).
    mailbox: Option<Rc<super::users::Mailbox>>,
    /// Who the backend proxy is told is asking (`None`: no proxy configured).
    caller: Option<Arc<crate::backend::Caller>>,
}

/// A subscribe that waits for [`super::Node::join`] before it is added to the hub.
struct PendingJoin {
    id: Option<crate::protocol::OwnedReqId>,
    channel: ChannelName,
    resume: Option<StreamPosition>,
    join: Option<Join>,
}

/// What the handshake decided, for the session task. Boxed until the session is built: an
/// `async fn` keeps its arguments for its whole life, so the task's future keeps one word of
/// it rather than a second copy of the connection's auth.
struct Start {
    wire: Wire,
    deflate: bool,
    auth: ConnAuth,
    hs: Option<crate::backend::Handshake>,
}

/// The task of one upgraded connection: the end of the upgrade, then the session until it
/// ends. What it holds while the connection idles is what an idle connection costs, so it
/// keeps only the session, its decoder and its socket (see the size test below): the
/// upgrade's leftovers (hyper's parts, the request) are gone before the first await of the
/// session, its deadlines wait in the shard's [`super::alarm::Alarms`], and the select is a
/// plain poll of each source rather than a future per branch.
async fn session_task(
    ctx: Rc<ShardContext>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    start: Box<Start>,
    guard: Option<Arc<crate::limits::IpGuard>>,
) {
    if ctx.node.shutdown.is_cancelled() {
        return;
    }
    let io = match upgrade.await {
        Ok(ws) => SessionIo::new(ws.into_inner().into_inner()),
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            return;
        }
    };
    let decoder = Decoder::new(ctx.config().max_message_size).with_deflate(start.deflate);
    // Built in a future of its own, boxed and gone once the session is: what it needs on the
    // way (the auth, the connect proxy's request) stays out of the task's future.
    let mut s = Box::pin(Session::open(ctx, start)).await;
    // Plain TCP: pump passes write to the socket themselves while this task idles.
    s.outbox.set_direct(io.sink());
    let m = &s.ctx.metrics;
    m.ws_accepted.increment(1);
    m.ws_connections.increment(1.0);
    if session::on_connect(s.ctx.node.engine.overloaded(), "websocket connection").is_err() {
        let (code, reason) = session::OverBudget::CLOSE;
        s.close(code, reason, true);
    }
    // The session loop is a task of its own: its cell holds the loop's state only, not the
    // upgrade's (and it is the task a parked session resumes as).
    let tracker = s.ctx.tracker.clone();
    tracker.spawn_local(run(Live {
        s,
        io,
        decoder,
        armed: None,
        guard,
        since: session::now(),
    }));
}

/// What a session's task holds: the session, its socket and decoder, the shard alarm it has
/// armed (see `super::alarm`), its per-IP slot, and when the task started (or resumed).
struct Live {
    s: Session,
    io: SessionIo,
    decoder: Decoder,
    armed: Option<Instant>,
    guard: Option<Arc<crate::limits::IpGuard>>,
    /// The quiet period before the session may park counts from its last input or from
    /// this, whichever is later: a session resumed to write, for a server command or for a
    /// ping stays a task at least that long (one park per quiet period at most).
    since: Instant,
}

/// The session loop, from the upgrade or from the parking lot (see `super::park`) until the
/// session ends or parks.
// Not an `async fn`: that would copy its argument into a second slot of the future; the
// block uses the one it captures.
#[allow(clippy::manual_async_fn)]
fn run(mut l: Live) -> impl Future<Output = ()> {
    async move {
        // The last wake was the session's alarm: the time it may park at may have come.
        let mut rang = false;
        loop {
            let now = session::now();
            let mut deadline = l.s.core.clock.poll_timeout(&l.s.timeouts());
            // TLS sessions never park: no alarm for it.
            let park_at = l.s.park_at(l.since).filter(|_| l.io.can_park());
            if let Some(at) = park_at.filter(|at| *at > now) {
                deadline = deadline.min(at);
            }
            if l.armed.is_none_or(|a| a > deadline) {
                l.armed = l.s.ctx.alarms.arm(deadline, &l.s.outbox);
            }
            // Parks when its alarm says the quiet period is over (and it has nothing to do).
            if rang && park_at.is_some_and(|at| at <= now) && l.s.may_park() {
                match park(l) {
                    Some(back) => l = back,
                    None => return,
                }
            }
            let wake = poll_fn(|cx| l.s.poll_event(&mut l.io, cx)).await;
            rang = matches!(wake, Wake::Alarm);
            match l.s.on_wake(wake, &mut l.decoder, &mut l.armed) {
                Step::Go => {}
                Step::Shutdown => {
                    let _ = l.io.shutdown().await;
                    // A restart closes every connection at once: waiting for each client's
                    // close reply would keep the old process (and its port) for round trips.
                    // With nothing unread the kernel sends our close frame and FIN as a
                    // graceful close; only unread input would turn it into a reset.
                    if l.s.ctx.node.shutdown.is_cancelled() && reader::nothing_unread(&mut l.io) {
                        break;
                    }
                    l.s.draining = true;
                }
                Step::End => break,
            }
        }
        finish(l.s, l.guard);
    }
}

/// The end of a session: its socket closes (with the task or the lot's slot, not with the
/// outbox, which the hub may hold a while), it leaves its channels.
fn finish(mut s: Session, guard: Option<Arc<crate::limits::IpGuard>>) {
    s.outbox.set_direct(None);
    s.leave();
    s.ctx.metrics.ws_connections.decrement(1.0);
    drop(guard);
}

/// A session in its shard's parking lot (see `super::park`): what its task held, the socket
/// out of the runtime and shared with the outbox, which pump passes write through.
pub(crate) struct Parked {
    s: Session,
    decoder: Decoder,
    armed: Option<Instant>,
    guard: Option<Arc<crate::limits::IpGuard>>,
    tcp: Rc<std::net::TcpStream>,
}

impl Parked {
    /// The socket, as the lot's epoll set knows it.
    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.tcp.as_raw_fd()
    }
}

/// Moves an idle session into its shard's parking lot: `None` once it is there (or, if the
/// runtime could not let its socket go, over); otherwise the session goes on as it was.
fn park(mut l: Live) -> Option<Live> {
    l.s.outbox.set_direct(None);
    let tcp = match l.io.park() {
        super::io::Parking::Parked(tcp) => Rc::new(tcp),
        super::io::Parking::Busy(io) => {
            l.s.outbox.set_direct(io.sink());
            l.io = io;
            return Some(l);
        }
        super::io::Parking::Lost(e) => {
            tracing::debug!(conn = l.s.id, error = %e, "a parking session lost its socket");
            finish(l.s, l.guard);
            return None;
        }
    };
    let Live {
        s,
        decoder,
        armed,
        guard,
        ..
    } = l;
    let (ctx, outbox) = (s.ctx.clone(), s.outbox.clone());
    let mailbox = s.rare.as_ref().and_then(|r| r.mailbox.clone());
    let parked = Box::new(Parked {
        s,
        decoder,
        armed,
        guard,
        tcp: tcp.clone(),
    });
    match ctx.lot.park(parked, &*tcp) {
        Ok(waker) => {
            // Its queue buffer too (the alarms' sweep would free it within a second).
            outbox.release_idle();
            outbox.set_waker(&waker);
            outbox.set_direct(Some(tcp));
            ctx.metrics.parked.increment(1.0);
            // Server API commands for the session's user wake it too.
            if let Some(m) = mailbox {
                if m.poll_ready(&mut Context::from_waker(&waker)).is_ready() {
                    waker.wake_by_ref();
                }
            }
            None
        }
        Err(parked) => {
            drop(tcp);
            unpark(parked)
        }
    }
}

/// A parked session's task state again, its socket back in the runtime: `None` if that
/// failed (then the session is over).
fn unpark(p: Box<Parked>) -> Option<Live> {
    let Parked {
        s,
        decoder,
        armed,
        guard,
        tcp,
    } = *p;
    // The outbox's handle on the socket goes first: then the parked one is the only one.
    s.outbox.set_direct(None);
    let io = Rc::try_unwrap(tcp)
        .map_err(|_| io::Error::other("the parked socket is shared"))
        .and_then(|tcp| SessionIo::resume(tcp, s.ctx.config().write_timeout));
    match io {
        Ok(io) => {
            s.outbox.set_direct(io.sink());
            Some(Live {
                s,
                io,
                decoder,
                armed,
                guard,
                since: session::now(),
            })
        }
        Err(e) => {
            tracing::debug!(conn = s.id, error = %e, "a parked session could not resume");
            finish(s, guard);
            None
        }
    }
}

/// Resumes a session taken out of the parking lot: its loop runs again as a task of the
/// shard's tracker (which shutdown waits for).
pub(crate) fn resume(ctx: Rc<super::ShardContext>, p: Box<Parked>) {
    ctx.metrics.parked.decrement(1.0);
    if let Some(l) = unpark(p) {
        ctx.tracker.spawn_local(run(l));
    }
}

impl Frames for Session {
    const NAME: &'static str = "websocket";

    fn on_message(&mut self, msg: Message<'_>) {
        Session::on_message(self, msg);
    }

    fn on_protocol_error(&mut self, e: WsError) {
        self.ctx.metrics.protocol_errors.increment(1);
        tracing::debug!(conn = self.id, error = %e, "websocket protocol error");
        self.close(e.close_code(), &e.to_string(), true);
    }

    fn read_closed(&self) -> bool {
        self.read_closed
    }

    fn partial(&mut self) -> &mut reader::Partial {
        &mut self.partial
    }
}

/// What checks `token` for the core, when auth is on.
fn verifier<'a>(
    ctx: &'a ShardContext,
    token: &'a str,
) -> Option<impl FnOnce() -> Result<crate::auth::Principal, String> + 'a> {
    let auth = ctx.node.auth.as_ref()?;
    Some(move || auth.verify(token).map_err(|e| e.to_string()))
}

/// What woke a session, in the order it is looked at (the order of the old `select!`, which
/// was biased).
enum Wake {
    /// The node is shutting down: close with 1012.
    Restart,
    Wrote(io::Result<WriteEvent>),
    Read(io::Result<usize>),
    Joined(PendingJoin, Result<(), crate::backend::Refusal>),
    Mail,
    Alarm,
}

/// Reconnections per second one shard is expected to take after a restart (handshake and
/// subscribe cost ~30-50 µs of a core each): the restart hint spreads a shard's clients over
/// `connections / RESTART_RECONNECTS_PER_SEC`, so that a fleet does not arrive at once.
const RESTART_RECONNECTS_PER_SEC: u64 = 20_000;

/// The shortest and longest restart spread (the shortest is the JS client's default window).
const RESTART_SPREAD_MS: (u64, u64) = (250, 30_000);

/// The 1012 close reason: `service restart; reconnect in N ms`, with N this connection's own
/// delay in a window that grows with the connections the shard holds (`open`). Keys are
/// sequential, so multiplying by an odd constant spreads them evenly over the window
/// (docs/protocol.md, "Shutdown").
fn restart_reason(key: u64, open: usize) -> String {
    let (min, max) = RESTART_SPREAD_MS;
    let window = (open as u64 * 1000 / RESTART_RECONNECTS_PER_SEC).clamp(min, max);
    let delay = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % window;
    format!("service restart; reconnect in {delay} ms")
}

/// What the task does after a wake-up.
enum Step {
    /// Waits for the next one.
    Go,
    /// Our close frame is out: shut our side down, then drain the client's input.
    Shutdown,
    /// The session is over.
    End,
}

enum WriteEvent {
    Wrote(Written),
    Overflowed,
}

/// Writes what the outbox holds, once it holds something.
fn poll_write_some<W: AsyncWrite + Unpin>(
    wr: &mut W,
    outbox: &Outbox,
    cx: &mut Context<'_>,
) -> Poll<io::Result<WriteEvent>> {
    ready!(outbox.poll_ready(cx));
    if outbox.state() == OutboxState::Overflowed {
        return Poll::Ready(Ok(WriteEvent::Overflowed));
    }
    outbox
        .write_with(|iov| Pin::new(&mut *wr).poll_write_vectored(cx, iov))
        .map_ok(WriteEvent::Wrote)
}

impl Session {
    /// The session of a new connection, admitted by the connect proxy when one is configured
    /// (nothing is read meanwhile).
    async fn open(ctx: Rc<ShardContext>, start: Box<Start>) -> Session {
        let Start {
            wire,
            deflate,
            mut auth,
            hs,
        } = *start;
        let id = ctx.next_conn_id();
        let client = ctx.node.engine.client_id(ctx.shard, id);
        let admitted = match &hs {
            Some(hs) => super::proxied::admit(hs, &client, &mut auth).await,
            None => Ok(Vec::new()),
        };
        let mut s = Session::new(ctx, id, (wire, deflate), auth, hs);
        s.register_user();
        s.on_admitted(admitted);
        s
    }

    /// A new session of connection `id`, with the handshake's choices and auth.
    fn new(
        ctx: Rc<ShardContext>,
        id: ConnId,
        (wire, deflate): (Wire, bool),
        auth: ConnAuth,
        hs: Option<crate::backend::Handshake>,
    ) -> Session {
        let node = &ctx.node;
        let cfg = &node.config;
        let now = session::now();
        // A client that may do nothing without a token must authenticate in time.
        let needs_token = node.auth.as_ref().is_some_and(|a| !a.anonymous_allowed());
        let rate = (cfg.rate_limit, cfg.rate_burst);
        let t = Timeouts::from_config(cfg, CLOSE_GRACE);
        let core = SessionCore::new(&t, now, auth.shared(&ctx.anonymous), needs_token, rate);
        Session {
            live: None,
            clean: false,
            id,
            wire,
            deflate,
            outbox: ctx.new_outbox(),
            ctx,
            partial: reader::Partial::default(),
            core,
            read_closed: false,
            draining: false,
            rare: hs.map(|h| {
                Box::new(Rare {
                    caller: Some(h.caller),
                    ..Rare::default()
                })
            }),
        }
    }

    /// Acts on what woke the session; says what the task does next.
    fn on_wake(&mut self, wake: Wake, decoder: &mut Decoder, armed: &mut Option<Instant>) -> Step {
        match wake {
            Wake::Restart => {
                // Ids are per shard: interleaved, they tell every connection of the node apart.
                let shards = self.ctx.node.wakers.len() as u64;
                let key = self.id * shards + self.ctx.shard as u64;
                let reason = restart_reason(key, self.ctx.tracker.len());
                self.close(frame::CLOSE_RESTART, &reason, true);
            }
            Wake::Wrote(Ok(WriteEvent::Wrote(w))) if w.finished => return Step::Shutdown,
            Wake::Wrote(Ok(WriteEvent::Wrote(w))) => {
                self.ctx.metrics.bytes_written.increment(w.bytes as u64);
                self.ctx.metrics.frames_per_write.record(w.frames as f64);
                if self.outbox.take_deferred() {
                    let stats = self.ctx.hub.borrow_mut().flush(self.id, self.core.subs());
                    self.ctx.metrics.pumped(&stats);
                }
            }
            Wake::Wrote(Ok(WriteEvent::Overflowed)) => {
                self.ctx.metrics.slow.increment(1);
                tracing::debug!(conn = self.id, "slow consumer closed");
                self.close(
                    frame::CLOSE_SLOW_CONSUMER,
                    "slow consumer: resume from your last seq",
                    false,
                );
            }
            // The peer is gone: it finished the close handshake we started (draining), or it
            // went away without one; either way nothing more can reach it.
            Wake::Wrote(Err(_)) | Wake::Read(Ok(0) | Err(_)) => return Step::End,
            Wake::Read(Ok(_)) if self.draining => {}
            Wake::Read(Ok(n)) => {
                let now = session::now();
                self.core.clock.on_inbound(now);
                if let Some(live) = &self.live {
                    live.touch(self.ctx.node.engine.millis(now));
                }
                reader::on_scratch(self, decoder, n);
            }
            Wake::Joined(p, r) => {
                let id = p.id.as_ref().map(|i| i.as_req_id());
                if self.core.join_answered(&p.channel) {
                    match r {
                        Ok(()) => {
                            self.subscribe_now(id, p.channel, p.resume, p.join, session::now())
                        }
                        Err(r) => self.refused(id, &r),
                    }
                }
            }
            Wake::Mail => self.on_user_commands(),
            Wake::Alarm => {
                // The session's alarm rang, or one it replaced did (then its own stays).
                *armed = self.ctx.alarms.after_ring(*armed);
                if self.on_timer() {
                    return Step::End;
                }
            }
        }
        Step::Go
    }

    /// Polls what may wake the session, in a fixed order; borrows nothing across polls, so the
    /// task's future holds no per-source future.
    fn poll_event<IO: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
    ) -> Poll<Wake> {
        // Cancellation is heard through the alarm (the shard rings every session when the
        // node shuts down) and read here: one load, no waiter per connection.
        if !self.core.clock.is_closing() && self.ctx.node.shutdown.is_cancelled() {
            return Poll::Ready(Wake::Restart);
        }
        if let Poll::Ready(r) = poll_write_some(io, &self.outbox, cx) {
            return Poll::Ready(Wake::Wrote(r));
        }
        if !self.read_closed || self.draining {
            if let Poll::Ready(r) = reader::poll_read_some(io, cx) {
                return Poll::Ready(Wake::Read(r));
            }
        }
        if let Some(rare) = &mut self.rare {
            if !rare.joining.is_empty() {
                if let Poll::Ready((p, r)) = rare.joining.poll_next(cx) {
                    return Poll::Ready(Wake::Joined(p, r));
                }
            }
            if let (Some(m), false) = (&rare.mailbox, self.core.clock.is_closing()) {
                if m.poll_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Mail);
                }
            }
        }
        self.outbox.poll_alarm(cx).map(|()| Wake::Alarm)
    }

    /// When this session may park (see `super::park`): `--ws-park-after` after its last
    /// input or `since` (its task's start), whichever is later; `None`: never (parking off).
    fn park_at(&self, since: Instant) -> Option<Instant> {
        let after = self.ctx.config().ws_park_after;
        let quiet = self.core.clock.last_inbound().max(since);
        (!after.is_zero() && self.ctx.lot.is_open()).then(|| quiet + after)
    }

    /// Whether the session has nothing to do but wait, with nothing a parked session cannot
    /// hear: nothing to write or read, not closing, no backplane join pending, the node not
    /// shutting down. (A parked session's server API mailbox wakes it like its outbox.)
    fn may_park(&self) -> bool {
        !self.read_closed
            && !self.draining
            && !self.core.clock.is_closing()
            && self.partial.is_empty()
            && self.rare.as_ref().is_none_or(|r| r.joining.is_empty())
            && self.outbox.is_idle()
            && !self.ctx.node.shutdown.is_cancelled()
    }

    /// The client id presence shows: derived from the connection's id when needed (presence,
    /// the backend proxy), not kept in every session.
    fn client(&self) -> Arc<str> {
        self.ctx.node.engine.client_id(self.ctx.shard, self.id)
    }

    /// Who the backend proxy is told is asking (`None`: no proxy configured).
    fn caller(&self) -> Option<&Arc<crate::backend::Caller>> {
        self.rare.as_ref()?.caller.as_ref()
    }

    /// The clock's settings (read from the node's config, not kept per connection).
    fn timeouts(&self) -> Timeouts {
        Timeouts::from_config(self.ctx.config(), CLOSE_GRACE)
    }

    /// The node's rules for the core's decisions.
    fn rules(&self) -> Rules {
        Rules::of(self.ctx.config(), self.ctx.node.auth.is_some())
    }

    /// Acts on what the clock says is due; returns true when the session must end now.
    fn on_timer(&mut self) -> bool {
        // The binary protocol has no refresh: an expired token closes (reconnect with a new
        // one and resume).
        let refresh = self.wire == Wire::Json;
        match self
            .core
            .on_timeout(session::now(), &self.timeouts(), refresh)
        {
            Timed::Nothing => {}
            Timed::End => return true,
            Timed::Ping => self.push(frame::frame(frame::OP_PING, b"")),
            Timed::Close((code, reason)) => self.close(code, reason, true),
            Timed::TokenExpired(within) => self.push(json::token_expired(within.as_millis())),
        }
        false
    }

    /// Queues a close frame; the session ends once it is written (or after a grace period).
    /// Every close but the slow-consumer one is clean (presence leaves at once); a slow
    /// consumer is expected back with a resume, so its presence waits for the timeout.
    fn close(&mut self, code: u16, reason: &str, flush: bool) {
        if self.core.clock.close(session::now(), &self.timeouts())
            && code != frame::CLOSE_SLOW_CONSUMER
        {
            self.clean = true;
        }
        self.read_closed = true;
        self.outbox
            .close_with(frame::close_frame(code, reason), flush);
    }

    fn on_message(&mut self, msg: Message<'_>) {
        let control = matches!(msg, Message::Close(..) | Message::Pong(_));
        if let (false, Err(gate)) = (control, self.core.on_message(session::now())) {
            return match gate {
                Gate::Refuse(r) => {
                    // The id lets the client fail that command now instead of at its timeout.
                    let id = match (&msg, self.wire) {
                        (Message::Text(t), Wire::Json) => {
                            json::parse_command(t.as_bytes()).map_or_else(|e| e.id, |r| r.id)
                        }
                        (Message::Binary(b), Wire::Binary) => {
                            binary::decode_command(b).map_or_else(|e| e.id, |r| r.id)
                        }
                        _ => None,
                    };
                    self.refuse(id, &r)
                }
                Gate::Close((code, reason)) => self.close(code, reason, true),
            };
        }
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

    /// Answers a command the core refused.
    fn refuse(&self, id: Option<ReqId<'_>>, r: &Refusal) {
        let event = Event::Error {
            code: r.code,
            message: &r.message,
        };
        self.reply(id, &event);
    }

    fn on_command(&mut self, id: Option<ReqId<'_>>, command: Command<'_>) {
        let now = session::now();
        match command {
            Command::Subscribe {
                channel,
                resume,
                presence,
            } => {
                if let Err(r) = self.core.may(Perm::Subscribe, &channel) {
                    return self.refuse(id, &r);
                }
                self.subscribe_granted(id, channel, resume, presence, now, true);
            }
            Command::Unsubscribe { channel } => self.unsubscribe(id, channel, now),
            other => self.on_other_command(id, other, now),
        }
    }

    /// A subscribe the connection may make (its grants, or the server API, allow it).
    fn subscribe_granted(
        &mut self,
        id: Option<ReqId<'_>>,
        channel: ChannelName,
        resume: Option<StreamPosition>,
        presence: Option<crate::protocol::ClientPresence<'_>>,
        now: Instant,
        ask: bool,
    ) {
        let rules = self.rules();
        {
            {
                if let Err(r) = self.core.admit(&rules, &channel) {
                    return self.refuse(id, &r);
                }
                let join = match self.presence_join(&rules, &channel, presence) {
                    Ok(join) => join,
                    Err(r) => return self.refuse(id, &r),
                };
                let asker = self.caller().filter(|_| ask).and_then(|c| {
                    c.subscribe_asker(
                        &self.client(),
                        self.core.auth().user.as_ref(),
                        channel.as_str(),
                    )
                });
                if let Some(wait) =
                    super::proxied::before_subscribe(&self.ctx.node, asker, &channel)
                {
                    // The backplane brings the channel in sync first; the session loop
                    // subscribes when it has (or answers `unavailable`).
                    let request = PendingJoin {
                        id: id.map(|i| i.to_owned_id()),
                        channel,
                        resume,
                        join,
                    };
                    self.core.wait_join(request.channel.clone());
                    self.rare
                        .get_or_insert_default()
                        .joining
                        .hold(request, wait);
                    return;
                }
                self.subscribe_now(id, channel, resume, join, now);
            }
        }
    }

    fn unsubscribe(&mut self, id: Option<ReqId<'_>>, channel: ChannelName, now: Instant) {
        match self.core.unsubscribe(&channel) {
            Unsubscribe::Waiting => {
                if let Some(rare) = &mut self.rare {
                    rare.joining.cancel(|j| j.channel == channel);
                }
            }
            Unsubscribe::Subscribed => {
                self.ctx.metrics.subscriptions.decrement(1.0);
                let left = self
                    .ctx
                    .hub
                    .borrow_mut()
                    .unsubscribe(self.id, &channel, now);
                if let Some(ch) = left {
                    let client = self.client();
                    let wake = self.ctx.node.engine.leave_presence(&ch, &client, now);
                    self.ctx.node.wake(wake);
                }
            }
            Unsubscribe::Not => {
                let error = Event::Error {
                    code: "not_subscribed",
                    message: "not subscribed to this channel",
                };
                return self.reply(id, &error);
            }
        }
        self.reply(id, &Event::Unsubscribed { channel: &channel });
    }

    fn on_other_command(&mut self, id: Option<ReqId<'_>>, command: Command<'_>, _: Instant) {
        let error = |code, message| Event::Error { code, message };
        match command {
            // Routed by `on_command`.
            Command::Subscribe { .. } | Command::Unsubscribe { .. } => {}
            Command::Publish {
                channel,
                data,
                cond,
            } => {
                if let Err(r) = self.core.may(Perm::Publish, &channel) {
                    return self.refuse(id, &r);
                }
                let cond = match crate::engine::idempotency::PublishConditions::checked(
                    cond.idempotency_key.as_deref(),
                    cond.expected_seq,
                ) {
                    Ok(c) => c,
                    Err(m) => return self.reply(id, &error("bad_request", &m)),
                };
                let (kind, bytes) = match data {
                    Payload::Json(raw) => (DataKind::Json, json::normalize_data(raw)),
                    Payload::Bytes(b) => (DataKind::Binary, Bytes::copy_from_slice(b)),
                };
                let node = self.ctx.node.clone();
                let asker = self.caller().and_then(|c| {
                    c.publish_asker(
                        &self.client(),
                        self.core.auth().user.as_ref(),
                        channel.as_str(),
                    )
                });
                let mut publish = Box::pin(async move {
                    let r =
                        super::proxied::publish(&node, asker, &channel, (kind, bytes), cond).await;
                    (channel, r)
                });
                // A node that sequences locally answers at once: reply in order, inline. A
                // backplane round trip finishes in a task and replies when it is done.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                match publish.as_mut().poll(&mut cx) {
                    Poll::Ready((channel, r)) => {
                        self.push(publish_reply(&self.ctx, self.wire, id, &channel, r))
                    }
                    Poll::Pending => {
                        let id = id.map(|i| i.to_owned_id());
                        let (ctx, outbox, wire) =
                            (self.ctx.clone(), self.outbox.clone(), self.wire);
                        self.ctx.tracker.spawn_local(async move {
                            let (channel, r) = publish.await;
                            let id = id.as_ref().map(|i| i.as_req_id());
                            let close = r.as_ref().err().and_then(|e| e.close.clone());
                            outbox.push(Out::control(publish_reply(&ctx, wire, id, &channel, r)));
                            // The backend asked to disconnect: the session ends once the close
                            // frame is written (and the client answers it, or goes idle).
                            if let Some((code, reason)) = close {
                                outbox.close_with(frame::close_frame(code, &reason), true);
                            }
                        });
                    }
                }
            }
            Command::Heartbeat => self.reply(id, &Event::Heartbeat),
            Command::Auth { token } => self.on_auth(id, &token),
            Command::Refresh { token } => self.on_refresh(id, &token),
            Command::Presence { channel, page } => {
                if let Err(r) = self.core.may(Perm::Presence, &channel) {
                    return self.refuse(id, &r);
                }
                let page = self.ctx.node.engine.presence(
                    &channel,
                    page.cursor.as_deref(),
                    super::paging::limit(page.limit),
                    // A page leaves most of the outbox free: a client that reads never
                    // overflows by asking.
                    super::paging::MAX_PAGE_BYTES.min(self.outbox.limit() / 4),
                );
                match page {
                    Some(p) => self.reply(
                        id,
                        &Event::PresenceState {
                            channel: &channel,
                            seq: p.seq,
                            members: &p.members,
                            next: p.next.as_deref(),
                        },
                    ),
                    None => self.reply(
                        id,
                        &error("presence_disabled", "this channel has no presence"),
                    ),
                }
            }
        }
    }

    /// Applies the connect proxy's decision: a refusal ends the connection (after the error);
    /// an admission subscribes the connection to the channels the backend named.
    fn on_admitted(&mut self, admitted: Result<Vec<ChannelName>, crate::backend::Refusal>) {
        match admitted {
            Ok(channels) => {
                for channel in channels {
                    self.subscribe_granted(None, channel, None, None, session::now(), false);
                }
            }
            Err(mut r) => {
                let close = r.close.take().unwrap_or_else(|| {
                    let reason = format!("{}: {}", r.code, r.message);
                    let mut end = reason.len().min(120);
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    (crate::backend::CLOSE_FORBIDDEN, reason[..end].to_owned())
                });
                self.reply(
                    None,
                    &Event::Error {
                        code: r.code,
                        message: &r.message,
                    },
                );
                self.close(close.0, &close.1, true);
            }
        }
    }

    /// Answers a refused command; closes the connection when the backend asked for it.
    fn refused(&mut self, id: Option<ReqId<'_>>, r: &crate::backend::Refusal) {
        self.reply(
            id,
            &Event::Error {
                code: r.code,
                message: &r.message,
            },
        );
        if let Some((code, reason)) = &r.close {
            self.close(*code, reason, true);
        }
    }

    /// Puts the connection in its shard's user index once it has a user (from the token at the
    /// handshake or an `auth` command), so that the server API can act on it.
    fn register_user(&mut self) {
        let listed = self.rare.as_ref().is_some_and(|r| r.mailbox.is_some());
        if let (false, Some(user)) = (listed, &self.core.auth().user) {
            self.rare.get_or_insert_default().mailbox = Some(self.ctx.users.add(user, self.id));
        }
    }

    /// Applies what the server API asked of this connection's user.
    fn on_user_commands(&mut self) {
        use super::users::UserCommand;
        let Some(mailbox) = self.rare.as_ref().and_then(|r| r.mailbox.clone()) else {
            return;
        };
        while let Some(command) = mailbox.take() {
            match command {
                UserCommand::Disconnect { reason, reconnect } => {
                    let code = if reconnect {
                        super::users::CLOSE_DISCONNECTED
                    } else {
                        super::users::CLOSE_DISCONNECTED_FOR_GOOD
                    };
                    let mut end = reason.len().min(120);
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    return self.close(code, &reason[..end], true);
                }
                UserCommand::Subscribe(channel) => {
                    if !self.core.has(&channel) {
                        self.subscribe_granted(None, channel, None, None, session::now(), false);
                    }
                }
                UserCommand::Unsubscribe(channel) => {
                    if self.core.has(&channel) {
                        self.unsubscribe(None, channel, session::now());
                    }
                }
            }
        }
    }

    /// `{"type":"auth","token":…}`: authenticates a connection opened without a token. A bad
    /// token closes the connection (4001) after the error.
    fn on_auth(&mut self, id: Option<ReqId<'_>>, token: &str) {
        match self
            .core
            .on_auth(session::now(), verifier(&self.ctx, token))
        {
            Ok((user, exp)) => {
                self.register_user();
                self.push(json::authenticated(id, &user, exp));
            }
            Err((r, close)) => {
                self.refuse(id, &r);
                if let Some((code, reason)) = close {
                    self.close(code, reason, true);
                }
            }
        }
    }

    /// `{"type":"refresh","token":…}`: a new token for the same subject; its grants and expiry
    /// replace the old ones. A bad one gets an error and changes nothing.
    fn on_refresh(&mut self, id: Option<ReqId<'_>>, token: &str) {
        match self
            .core
            .on_refresh(session::now(), verifier(&self.ctx, token))
        {
            Ok(exp) => self.push(json::refreshed(id, exp)),
            Err(r) => self.refuse(id, &r),
        }
    }

    /// Adds the subscription to the hub and queues `subscribed` and the replay.
    fn subscribe_now(
        &mut self,
        id: Option<ReqId<'_>>,
        channel: ChannelName,
        resume: Option<StreamPosition>,
        join: Option<Join>,
        now: Instant,
    ) {
        let error = |code, message| Event::Error { code, message };
        let encoding = self.wire.message_encoding_with(self.deflate);
        let sub = Subscriber::new(self.outbox.clone(), encoding, self.core.next_slot());
        let mut hub = self.ctx.hub.borrow_mut();
        let s = match hub.subscribe(self.id, &channel, resume, join, sub, now) {
            Ok(s) => s,
            Err(e) => {
                drop(hub);
                let code = subscribe_refusal(e, "subscribe");
                return self.reply(id, &error(code, &e.to_string()));
            }
        };
        let channel = hub.shared_name(&channel).unwrap_or(channel);
        drop(hub);
        self.ctx.node.wake(s.wake);
        self.ctx.metrics.subscriptions.increment(1.0);
        self.core.subscribed(channel.clone());
        self.reply(
            id,
            &Event::Subscribed {
                channel: &channel,
                position: s.position,
                recovered: s.recovered,
                reason: s.gap.map(|g| g.as_str()),
            },
        );
        // The replay follows the reply, a page at a time as the outbox drains (the writer asks
        // for the next one); live messages follow the replay.
        let stats = self
            .ctx
            .hub
            .borrow_mut()
            .flush(self.id, std::slice::from_ref(&channel));
        self.ctx.metrics.pumped(&stats);
    }

    /// The presence member to add when subscribing to `channel`: `None` when the channel has
    /// no presence; the refusal when the client claims an identity it may not.
    fn presence_join(
        &mut self,
        rules: &Rules,
        channel: &ChannelName,
        claimed: Option<ClientPresence<'_>>,
    ) -> Result<Option<Join>, Refusal> {
        if !self.ctx.node.engine.has_presence(channel) {
            return Ok(None);
        }
        let claimed = claimed.unwrap_or_default();
        let claim = Claim {
            user: claimed.user.map(|u| Arc::from(&*u)),
            info: claimed.info.map(json::normalize_data),
        };
        let who = self.core.presence_identity(rules, &self.client(), claim)?;
        let live = self.live.get_or_insert_with(|| {
            let live = Arc::new(Liveness::default());
            live.touch(self.ctx.node.engine.millis(session::now()));
            live
        });
        Ok(Some(Join {
            who,
            live: live.clone(),
        }))
    }

    /// Releases every subscription; leaves presence at once if the connection ended cleanly.
    fn leave(&mut self) {
        let now = session::now();
        let mailbox = self.rare.as_mut().and_then(|r| r.mailbox.take());
        if let (Some(_), Some(user)) = (mailbox, &self.core.auth().user) {
            self.ctx.users.remove(user, self.id);
        }
        let mut wake = 0;
        // Only a clean end leaves presence at once.
        let client = self.clean.then(|| self.client());
        let mut hub = self.ctx.hub.borrow_mut();
        let subs = self.core.take_subs();
        self.ctx.metrics.subscriptions.decrement(subs.len() as f64);
        for ch in subs {
            if let (Some(channel), Some(client)) = (hub.unsubscribe(self.id, &ch, now), &client) {
                wake |= self.ctx.node.engine.leave_presence(&channel, client, now);
            }
        }
        drop(hub);
        self.ctx.node.wake(wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it: the session loop's future.
    fn returned<A, F>(_: fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// What tokio stores of the task `f` spawns through the shard's tracker: the tracked
    /// future in its stage enum (running, finished with a `JoinError`, consumed), which has
    /// no niche to share: 8 bytes over the tracked future, itself 8 over the session's.
    fn staged<A, F>(_: fn(A) -> F) -> usize {
        #[allow(dead_code)]
        enum Stage<T> {
            Running(T),
            Finished(Result<(), tokio::task::JoinError>),
            Consumed,
        }
        std::mem::size_of::<Stage<tokio_util::task::task_tracker::TrackedFuture<F>>>()
    }

    /// The task's future is what a live connection holds besides its outbox, its hub entry,
    /// its alarm and tokio's registration of its socket (a parked one holds a [`Parked`]
    /// instead, see `parked_sessions_are_small`); until sessions parked (session 8) it was
    /// most of what an idle connection cost (issue 12: at most 1 KiB each). It is the session (`SESSION`), the
    /// socket (a `SessionIo`: over plain TCP an `Rc` of the stream, the bytes read ahead and
    /// the write deadline), the decoder (24), the alarm armed (16) and the task's arguments (4
    /// words), plus a few words of state. Before the reshape, the session's
    /// `run` future alone was 2,544 bytes in a debug build (1,248 in release), and the upgrade
    /// block around it kept a second copy of the auth, hyper's parts and the PROXY bytes
    /// across the session, and a `Sleep` (112) and a cancellation future (72) besides. A debug
    /// build lays futures out least tightly, so the budgets hold for release builds too.
    /// Whatever grows them (a field, a future kept across an await) costs every idle
    /// connection: box what is rarely used instead.
    ///
    /// Tokio aligns a task's cell to 128 bytes on x86_64: header 32, scheduler and id 16, the
    /// stage (`staged`), trailer 48. So each 128 the cell crosses costs a whole step, which a
    /// counting allocator shows (one 640-byte aligned block per connection at 10,000 idle
    /// connections until session 7): at a stage of 416 bytes the cell takes 512. Session 7
    /// boxed the clock's rare deadlines (88 → 32 bytes), the decoder's buffers (64 → 24) and
    /// made the rate bucket's settings integers (48 → 40): the future 504 → 400 bytes.
    ///
    /// Since session 8 the session loop (`run`) is a task of its own, spawned once the
    /// upgrade is done (and again when a parked session resumes): its cell holds the loop's
    /// state only (336 bytes in a debug build), not the upgrade's.
    const TASK: usize = 400;
    const STAGE: usize = 512 - 32 - 16 - 48;
    const SESSION: usize = 176;

    #[test]
    fn an_idle_session_holds_a_small_future() {
        let task = returned(run);
        let stage = staged(run);
        let session = std::mem::size_of::<Session>();
        eprintln!("session task {task} B (staged {stage} B), session {session} B");
        assert!(session <= SESSION, "the session is {session} bytes");
        assert!(task <= TASK, "the session task's future is {task} bytes");
        assert!(stage <= STAGE, "the session task's stage is {stage} bytes");
    }

    /// What a parked session holds in its lot's slot (besides the slot's 16 bytes): the
    /// session, its decoder, its alarm, its per-IP slot and its socket's `Rc`. One allocation
    /// of mimalloc's 256-byte class; with its outbox (128), its socket (32), its waker (32),
    /// its hub entry and its alarm, an idle parked connection costs about 600 bytes.
    #[test]
    fn parked_sessions_are_small() {
        let parked = std::mem::size_of::<Parked>();
        eprintln!("parked session {parked} B");
        assert!(parked <= 256, "a parked session is {parked} bytes");
    }
}
