//! Pusher client connections on `/app/KEY`: the WebSocket handshake, then one task per
//! connection that speaks Pusher protocol 7 over the engine. A subscription is a hub
//! subscriber with the Pusher encoding and the connection's tag (so that its own client events
//! and `socket_id`-excluded publishes, and its own `member_added`, are not sent back to it).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::ConnSlot;
use crate::engine::hub::{client_tag, ConnId, Subscriber};
use crate::engine::outbox::{Out, Outbox, OutboxState};
use crate::engine::presence::{Identity, Liveness};
use crate::engine::Join;
use crate::protocol::pusher::{self as wire, code, ChannelKind, ClientMessage};
use crate::protocol::ws::{self as frame, Decoder, Message, WsError};
use crate::protocol::ENC_PUSHER;
use crate::transport::http::{error, Body};
use crate::transport::io::{TimedIo, TimedWrite};
use crate::transport::session::reader::{self, Frames};
use crate::transport::session::{self, Due, Pending, SessionClock, Timeouts};
use crate::transport::ShardContext;
use crate::types::{ChannelName, DataKind};

/// How long a closing connection may take to flush its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Most members listed in a presence channel's `subscription_succeeded` (Pusher's limit is
/// 100 members per channel).
const MAX_LISTED_MEMBERS: usize = 1000;

/// Why a connection is refused right after the handshake (Pusher tells it with `pusher:error`
/// and the same close code, which a browser sees where it would not see an HTTP status).
struct Refusal(u16, &'static str);

/// Answers `GET /app/KEY`.
pub fn upgrade(ctx: Rc<ShardContext>, mut req: Request<Incoming>) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected a WebSocket upgrade request (Pusher protocol)",
        );
    }
    if req
        .headers()
        .get("sec-websocket-version")
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut res = error(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_version",
            "this server speaks WebSocket version 13 (RFC 6455)",
        );
        res.headers_mut().insert(
            "sec-websocket-version",
            hyper::header::HeaderValue::from_static("13"),
        );
        return res;
    }
    let start = admit(&ctx, &req);
    let guard = match crate::transport::http::stream_slot(&ctx, &req) {
        Ok(g) => g,
        Err(res) => return res,
    };
    let (res, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    let shutdown = ctx.node.shutdown.clone();
    let tracker = ctx.tracker.clone();
    tracker.spawn_local(async move {
        if shutdown.is_cancelled() {
            return;
        }
        let ws = match fut.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(error = %e, "pusher websocket upgrade failed");
                return;
            }
        };
        let upgraded = ws.into_inner().into_inner();
        match upgraded.downcast::<TokioIo<TimedIo>>() {
            Ok(parts) => {
                let (mut tcp, unread, timeout) = parts.io.into_inner().into_parts();
                let (rd, wr) = tcp.split();
                let wr = TimedWrite::new(wr, timeout);
                let pre = if unread.is_empty() {
                    parts.read_buf
                } else {
                    [unread, parts.read_buf].concat().into()
                };
                run(ctx, start, rd, wr, pre).await;
            }
            Err(up) => {
                let (rd, wr) = tokio::io::split(TokioIo::new(up));
                run(ctx, start, rd, wr, Bytes::new()).await;
            }
        }
        drop(guard);
    });
    res.map(|_| Body::Empty)
}

/// The app a request connects to and its connection slot, or why it is refused.
fn admit(ctx: &Rc<ShardContext>, req: &Request<Incoming>) -> Result<(usize, ConnSlot), Refusal> {
    let key = req.uri().path().trim_start_matches("/app/");
    let registry = &ctx.node.pusher;
    let index = registry
        .by_key(key)
        .ok_or(Refusal(code::APP_NOT_FOUND, "App key not in this cluster"))?;
    let query = req.uri().query().unwrap_or("");
    let protocol = super::query_pairs(query)
        .into_iter()
        .find(|(k, _)| k == "protocol")
        .map(|(_, v)| v)
        .ok_or(Refusal(code::NO_PROTOCOL, "No protocol version supplied"))?;
    let version: u32 = protocol
        .parse()
        .map_err(|_| Refusal(code::BAD_VERSION, "Invalid version string format"))?;
    if !wire::PROTOCOLS.contains(&version) {
        return Err(Refusal(
            code::UNSUPPORTED_PROTOCOL,
            "Unsupported protocol version",
        ));
    }
    if session::on_connect(ctx.node.engine.overloaded(), "pusher connection").is_err() {
        return Err(Refusal(code::OVER_CAPACITY, "Over capacity"));
    }
    let slot = registry.connect(index).ok_or(Refusal(
        code::OVER_QUOTA,
        "Over connection quota (max_connections)",
    ))?;
    Ok((index, slot))
}

/// One subscription of a connection.
struct Sub {
    channel: ChannelName,
    /// Presence: the member's user id (client events carry it).
    user: Option<Arc<str>>,
}

/// A subscribe waiting for the backplane to bring its channel in sync.
struct PendingJoin {
    name: String,
    channel: ChannelName,
    member: Option<(Arc<str>, Option<Bytes>)>,
}

struct Session {
    ctx: Rc<ShardContext>,
    app: usize,
    _slot: ConnSlot,
    id: ConnId,
    client: Arc<str>,
    tag: u64,
    live: Arc<Liveness>,
    clean: bool,
    outbox: Rc<Outbox>,
    subs: Vec<Sub>,
    partial: reader::Partial,
    /// Keep-alive and the close grace (sans-IO, `transport::session`).
    clock: SessionClock,
    read_closed: bool,
    draining: bool,
    /// The signed-in user and the notice `terminate_connections` sends it.
    user: Option<(Arc<str>, Arc<Notify>)>,
    /// Client events per second.
    bucket: Option<crate::limits::TokenBucket>,
    joining: Pending<PendingJoin, Result<(), crate::transport::PublishError>>,
}

async fn run<R, W>(
    ctx: Rc<ShardContext>,
    start: Result<(usize, ConnSlot), Refusal>,
    mut rd: R,
    mut wr: W,
    pre: Bytes,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (app, slot) = match start {
        Ok(x) => x,
        Err(Refusal(c, message)) => return refuse(ctx, c, message, &mut wr).await,
    };
    let node = ctx.node.clone();
    let cfg = &node.config;
    let mut decoder = Decoder::new(cfg.max_message_size);
    let id = ctx.next_conn_id();
    let client = ctx.node.engine.client_id(ctx.shard, id);
    let tag = client_tag(&client);
    let live = Arc::new(Liveness::default());
    live.touch(ctx.node.engine.millis(crate::types::now()));
    let rate = node.pusher.app(app).map_or(0, |a| a.client_event_rate);
    let mut s = Session {
        app,
        _slot: slot,
        id,
        client,
        tag,
        live,
        clean: false,
        outbox: ctx.new_outbox(),
        ctx,
        subs: Vec::new(),
        partial: reader::Partial::default(),
        clock: SessionClock::new(
            &Timeouts::from_config(cfg, CLOSE_GRACE),
            session::now(),
            None,
            false,
        ),
        read_closed: false,
        draining: false,
        user: None,
        bucket: (rate > 0)
            .then(|| crate::limits::TokenBucket::new(rate, rate, crate::types::now())),
        joining: Pending::default(),
    };
    let m = &s.ctx.metrics;
    m.ws_accepted.increment(1);
    m.ws_connections.increment(1.0);
    // pusher-js pings after this long without traffic; the server pings too (`pusher:ping`)
    // after --ping-interval, so that presence sees a live connection.
    let activity = cfg.ping_interval.as_secs().clamp(1, 120);
    s.push(wire::connection_established(
        &wire::socket_id(s.tag),
        activity,
    ));
    if !pre.is_empty() {
        reader::on_read(&mut s, &mut decoder, &mut pre.to_vec());
    }
    drop(pre);
    let shutdown = s.ctx.node.shutdown.clone();
    // One registration with the token for the connection's life: a fresh `cancelled()` per
    // turn of the loop would join and leave the token's waiter list on every wake-up, which
    // is a measurable share of a delivery's CPU at 10,000 connections.
    let stop = shutdown.cancelled();
    tokio::pin!(stop);
    let timer = tokio::time::sleep(cfg.ping_interval);
    tokio::pin!(timer);
    loop {
        let deadline = s.clock.poll_timeout(&s.timeouts());
        if timer.deadline() != deadline.into() {
            timer.as_mut().reset(deadline.into());
        }
        tokio::select! {
            biased;
            _ = &mut stop, if !s.clock.is_closing() => {
                s.close(code::RECONNECT, "service restart");
            }
            _ = killed(&s.user), if !s.clock.is_closing() => {
                s.push(wire::error(Some(code::TERMINATED), "Connection terminated by the server"));
                s.close(code::TERMINATED, "terminated");
            }
            r = write_some(&mut wr, &s.outbox) => match r {
                Ok(Some(true)) => {
                    let _ = wr.shutdown().await;
                    s.draining = true;
                }
                Ok(Some(false)) => {}
                Ok(None) => {
                    s.ctx.metrics.slow.increment(1);
                    // Pusher has no resume: the client reconnects and subscribes afresh.
                    s.clean = false;
                    s.outbox.close_with(frame::close_frame(code::RECONNECT, "slow consumer"), false);
                    s.read_closed = true;
                    s.clock.close(session::now(), &s.timeouts());
                }
                Err(_) => break,
            },
            r = reader::read_some(&mut rd), if !s.read_closed || s.draining => match r {
                Ok(0) | Err(_) => break,
                Ok(_) if s.draining => {}
                Ok(n) => {
                    let now = session::now();
                    s.clock.on_inbound(now);
                    s.live.touch(s.ctx.node.engine.millis(now));
                    reader::on_scratch(&mut s, &mut decoder, n);
                }
            },
            (p, r) = s.joining.next(), if !s.joining.is_empty() => match r {
                Ok(()) => s.subscribe_now(&p.name, p.channel, p.member),
                Err(e) => s.push(wire::subscription_error(&p.name, 503, &e.to_string())),
            },
            _ = &mut timer => {
                if s.on_timer() {
                    break;
                }
            }
        }
    }
    s.leave();
    s.ctx.metrics.ws_connections.decrement(1.0);
}

/// Sends `pusher:error` with `code` and closes with it.
async fn refuse<W: AsyncWrite + Unpin>(ctx: Rc<ShardContext>, c: u16, message: &str, wr: &mut W) {
    let outbox = ctx.new_outbox();
    outbox.push(Out::control(wire::error(Some(c), message)));
    outbox.close_with(frame::close_frame(c, message), true);
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Ok(Some(false)) = write_some(wr, &outbox).await {}
    })
    .await;
    let _ = wr.shutdown().await;
}

/// Resolves when the signed-in user's connections are terminated; never without a sign-in.
async fn killed(user: &Option<(Arc<str>, Arc<Notify>)>) {
    match user {
        Some((_, kill)) => kill.notified().await,
        None => std::future::pending().await,
    }
}

/// Writes what the outbox holds: `Some(true)` once the close frame is written, `None` when it
/// overflowed.
async fn write_some<W: AsyncWrite + Unpin>(
    wr: &mut W,
    outbox: &Outbox,
) -> io::Result<Option<bool>> {
    poll_fn(|cx| {
        ready!(outbox.poll_ready(cx));
        if outbox.state() == OutboxState::Overflowed {
            return Poll::Ready(Ok(None));
        }
        outbox
            .write_with(|iov| Pin::new(&mut *wr).poll_write_vectored(cx, iov))
            .map_ok(|w| Some(w.finished))
    })
    .await
}

impl Frames for Session {
    const NAME: &'static str = "pusher";

    fn on_message(&mut self, msg: Message<'_>) {
        Session::on_message(self, msg);
    }

    fn on_protocol_error(&mut self, e: WsError) {
        self.ctx.metrics.protocol_errors.increment(1);
        self.close(e.close_code(), &e.to_string());
    }

    fn read_closed(&self) -> bool {
        self.read_closed
    }

    fn partial(&mut self) -> &mut reader::Partial {
        &mut self.partial
    }
}

impl Session {
    fn app(&self) -> Option<&crate::protocol::pusher::App> {
        self.ctx.node.pusher.app(self.app)
    }

    fn socket_id(&self) -> String {
        wire::socket_id(self.tag)
    }

    fn push(&self, frame: Bytes) {
        self.outbox.push(Out::control(frame));
    }

    /// The clock's settings (read from the node's config, not kept per connection).
    fn timeouts(&self) -> Timeouts {
        Timeouts::from_config(self.ctx.config(), CLOSE_GRACE)
    }

    /// Acts on what the clock says is due; returns true when the session must end now.
    /// (Pusher connections carry no token: no auth deadline is ever due.)
    fn on_timer(&mut self) -> bool {
        match self.clock.handle_timeout(session::now(), &self.timeouts()) {
            Due::End => return true,
            Due::Ping => self.push(wire::ping()),
            Due::Idle => self.close(code::PONG_TIMEOUT, "Pong reply not received"),
            Due::Nothing | Due::AuthTimeout | Due::RefreshTimeout | Due::TokenExpired { .. } => {}
        }
        false
    }

    /// Queues a close frame; the session ends once it is written (or after a grace period).
    fn close(&mut self, c: u16, reason: &str) {
        self.clean = true;
        self.clock.close(session::now(), &self.timeouts());
        self.read_closed = true;
        self.outbox.close_with(frame::close_frame(c, reason), true);
    }

    fn on_message(&mut self, msg: Message<'_>) {
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                return self.push(wire::error(None, "Pusher messages are JSON text frames"))
            }
            Message::Ping(p) => return self.push(frame::frame(frame::OP_PONG, p)),
            Message::Pong(_) => return,
            Message::Close(c, _) => {
                return self.close(c.unwrap_or(frame::CLOSE_NORMAL), "");
            }
        };
        match wire::parse(text.as_bytes()) {
            Ok(ClientMessage::Ping) => self.push(wire::pong()),
            Ok(ClientMessage::Pong) => {}
            Ok(ClientMessage::Subscribe {
                channel,
                auth,
                channel_data,
            }) => self.on_subscribe(&channel, auth.as_deref(), channel_data.as_deref()),
            Ok(ClientMessage::Unsubscribe { channel }) => self.on_unsubscribe(&channel),
            Ok(ClientMessage::Signin { auth, user_data }) => self.on_signin(&auth, &user_data),
            Ok(ClientMessage::Client {
                event,
                channel,
                data,
            }) => self.on_client_event(&event, &channel, data),
            Err(message) => self.push(wire::error(None, &message)),
        }
    }

    fn on_subscribe(&mut self, name: &str, auth: Option<&str>, channel_data: Option<&str>) {
        let Some(app) = self.app() else {
            return;
        };
        let Some(channel) = wire::relay_channel(&app.id, name) else {
            return self.push(wire::error(
                None,
                "Invalid channel name: 1 to 164 characters from A-Z a-z 0-9 _ - = @ .",
            ));
        };
        // `name` is valid from here: frames may carry it verbatim.
        if self.subs.iter().any(|s| s.channel == channel)
            || self.joining.any(|j| j.channel == channel)
        {
            return self.push(wire::error(None, "Existing subscription to this channel"));
        }
        if self.subs.len() + self.joining.len() >= self.ctx.config().max_subscriptions {
            crate::limits::refused(
                crate::limits::Cause::TooManySubscriptions,
                "pusher subscribe",
            );
            return self.push(wire::subscription_error(
                name,
                429,
                "this connection has the most subscriptions allowed (--max-subscriptions)",
            ));
        }
        let kind = ChannelKind::of(name);
        let socket_id = self.socket_id();
        let data = (kind == ChannelKind::Presence)
            .then_some(channel_data)
            .flatten();
        let authorized = match kind {
            ChannelKind::Public => true,
            ChannelKind::User => self
                .user
                .as_ref()
                .is_some_and(|(u, _)| name[wire::USER_CHANNEL.len()..] == **u),
            _ => auth.is_some_and(|a| wire::channel_auth_ok(app, &socket_id, name, data, a)),
        };
        if !authorized {
            crate::limits::refused(crate::limits::Cause::Unauthorized, "pusher subscribe");
            let message = match (kind, auth) {
                (ChannelKind::User, _) => "Only the user signed in may subscribe to its channel",
                (_, None) => "Auth signature required for this channel",
                _ => "Invalid signature",
            };
            self.push(wire::error(Some(code::UNAUTHORIZED), message));
            return self.push(wire::subscription_error(name, 401, message));
        }
        let member = match (kind, data) {
            (ChannelKind::Presence, Some(d)) => match wire::presence_member(d) {
                Some((user, info)) => Some((Arc::from(user), info.map(Bytes::from))),
                None => {
                    let m = "channel_data needs a user_id (string or number)";
                    self.push(wire::error(Some(code::UNAUTHORIZED), m));
                    return self.push(wire::subscription_error(name, 400, m));
                }
            },
            (ChannelKind::Presence, None) => {
                let m = "A presence channel needs channel_data";
                self.push(wire::error(Some(code::UNAUTHORIZED), m));
                return self.push(wire::subscription_error(name, 400, m));
            }
            _ => None,
        };
        if let Some(wait) = self.ctx.node.join(&channel) {
            let request = PendingJoin {
                name: name.to_owned(),
                channel,
                member,
            };
            self.joining.hold(request, wait);
            return;
        }
        self.subscribe_now(name, channel, member);
    }

    fn subscribe_now(
        &mut self,
        name: &str,
        channel: ChannelName,
        member: Option<(Arc<str>, Option<Bytes>)>,
    ) {
        let now = crate::types::now();
        let join = member.as_ref().map(|(user, info)| Join {
            who: Identity {
                client: self.client.clone(),
                user: user.clone(),
                info: info.clone(),
            },
            live: self.live.clone(),
        });
        let mut sub = Subscriber::new(self.outbox.clone(), ENC_PUSHER, self.subs.len() as u16);
        sub.tag = self.tag;
        let r = self
            .ctx
            .hub
            .borrow_mut()
            .subscribe(self.id, &channel, None, join, sub, now);
        let s = match r {
            Ok(s) => s,
            Err(e) => {
                use crate::engine::SubscribeError;
                if let SubscribeError::Overloaded(o) = e {
                    crate::limits::refused(crate::transport::overload_cause(o), "subscribe");
                }
                return self.push(wire::subscription_error(name, 503, &e.to_string()));
            }
        };
        self.ctx.node.wake(s.wake);
        self.ctx.metrics.subscriptions.increment(1.0);
        let reply = match &member {
            Some(_) => wire::presence_succeeded(name, &self.members(&channel)),
            None => wire::subscription_succeeded(name),
        };
        self.push(reply);
        self.subs.push(Sub {
            channel,
            user: member.map(|(u, _)| u),
        });
    }

    /// The members of a presence channel, one entry per user (a user's first connection's
    /// info), at most [`MAX_LISTED_MEMBERS`].
    fn members(&self, channel: &ChannelName) -> Vec<(String, Option<Bytes>)> {
        let engine = &self.ctx.node.engine;
        let mut users: Vec<(String, Option<Bytes>)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut cursor: Option<Arc<str>> = None;
        loop {
            let Some(page) = engine.presence(
                channel,
                cursor.as_deref(),
                crate::transport::paging::MAX_LIMIT,
                usize::MAX,
            ) else {
                break;
            };
            for m in page.members {
                if users.len() < MAX_LISTED_MEMBERS && seen.insert(m.user.clone()) {
                    users.push((m.user.to_string(), m.info));
                }
            }
            match page.next {
                Some(n) if users.len() < MAX_LISTED_MEMBERS => cursor = Some(n),
                _ => break,
            }
        }
        users
    }

    fn on_unsubscribe(&mut self, name: &str) {
        let Some(channel) = self.app().and_then(|a| wire::relay_channel(&a.id, name)) else {
            return;
        };
        self.joining.cancel(|j| j.channel == channel);
        let Some(i) = self.subs.iter().position(|s| s.channel == channel) else {
            return;
        };
        self.subs.swap_remove(i);
        let now = crate::types::now();
        let left = self
            .ctx
            .hub
            .borrow_mut()
            .unsubscribe(self.id, &channel, now);
        if let Some(ch) = left {
            self.ctx.metrics.subscriptions.decrement(1.0);
            let wake = self.ctx.node.engine.leave_presence(&ch, &self.client, now);
            self.ctx.node.wake(wake);
        }
    }

    /// `pusher:signin`: a bad signature closes the connection with 4009, as Pusher does.
    fn on_signin(&mut self, auth: &str, user_data: &str) {
        let Some(app) = self.app() else {
            return;
        };
        let user = wire::user_auth_ok(app, &self.socket_id(), user_data, auth)
            .then(|| wire::signin_user(user_data))
            .flatten();
        let Some(user) = user else {
            crate::limits::refused(crate::limits::Cause::Unauthorized, "pusher signin");
            self.push(wire::error(Some(code::UNAUTHORIZED), "Invalid signin"));
            return self.close(code::UNAUTHORIZED, "Invalid signin");
        };
        if self.user.is_some() {
            return self.push(wire::error(None, "Already signed in"));
        }
        let user: Arc<str> = Arc::from(user);
        let kill = Arc::new(Notify::new());
        self.ctx
            .node
            .pusher
            .sign_in(self.app, user.clone(), self.tag, kill.clone());
        self.user = Some((user, kill));
        self.push(wire::signin_success(user_data));
    }

    fn on_client_event(&mut self, event: &str, name: &str, data: &str) {
        let Some(app) = self.app() else {
            return;
        };
        let reject = |s: &Session, m: &str| {
            s.push(wire::error(Some(code::CLIENT_EVENT_REJECTED), m));
        };
        if !app.client_events {
            return reject(self, "Client events are not enabled for this app");
        }
        if !matches!(
            ChannelKind::of(name),
            ChannelKind::Private | ChannelKind::Presence
        ) {
            return reject(
                self,
                "Client event rejected - only supported on private and presence channels",
            );
        }
        if event.len() > wire::MAX_EVENT_NAME_LEN {
            return reject(self, "Event name too long");
        }
        if data.len() > app.max_event_bytes {
            return reject(self, "Client event data is larger than max_event_bytes");
        }
        let Some(channel) = wire::relay_channel(&app.id, name) else {
            return reject(self, "Invalid channel name");
        };
        let Some(sub) = self.subs.iter().find(|s| s.channel == channel) else {
            return reject(
                self,
                "Client event rejected - not subscribed to this channel",
            );
        };
        if let Some(b) = self.bucket.as_mut() {
            if b.take(crate::types::now()) != crate::limits::Verdict::Ok {
                crate::limits::refused(crate::limits::Cause::RateLimited, "pusher client event");
                return reject(self, "Client event rejected due to rate limit");
            }
        }
        let socket_id = self.socket_id();
        let payload = wire::payload(event, data, Some(&socket_id), sub.user.as_deref());
        let node = self.ctx.node.clone();
        // The app's `client_event` webhook, told once the event is published.
        let hook = node
            .webhooks
            .as_ref()
            .and_then(|w| w.client_event(&channel, sub.user.as_ref(), event, data, &socket_id));
        let mut publish =
            Box::pin(async move { node.publish(&channel, DataKind::Json, payload).await });
        // A node that sequences locally is done at once; a backplane round trip finishes in
        // a task, and only a failure is reported.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match publish.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(_)) => {
                self.ctx.metrics.published.increment(1);
                if let Some(h) = hook {
                    h.emit();
                }
            }
            Poll::Ready(Err(e)) => {
                e.count();
                self.push(wire::error(None, &e.to_string()));
            }
            Poll::Pending => {
                let outbox = self.outbox.clone();
                self.ctx.tracker.spawn_local(async move {
                    match publish.await {
                        Ok(_) => {
                            if let Some(h) = hook {
                                h.emit();
                            }
                        }
                        Err(e) => {
                            e.count();
                            outbox.push(Out::control(wire::error(None, &e.to_string())));
                        }
                    }
                });
            }
        }
    }

    /// Releases every subscription and the sign-in; leaves presence at once if the connection
    /// ended cleanly (a vanished one leaves at the presence timeout).
    fn leave(&mut self) {
        let now = crate::types::now();
        let mut wake = 0;
        let mut hub = self.ctx.hub.borrow_mut();
        self.ctx
            .metrics
            .subscriptions
            .decrement(self.subs.len() as f64);
        for s in self.subs.drain(..) {
            if let Some(channel) = hub.unsubscribe(self.id, &s.channel, now) {
                if self.clean {
                    wake |= self
                        .ctx
                        .node
                        .engine
                        .leave_presence(&channel, &self.client, now);
                }
            }
        }
        drop(hub);
        self.ctx.node.wake(wake);
        if let Some((user, _)) = self.user.take() {
            self.ctx.node.pusher.sign_out(self.app, &user, self.tag);
        }
    }
}
