//! Server-Sent Events streams: one hyper response body per stream, fed by the hub through the
//! stream's outbox and tagged with the multi-channel cursor as it is written.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::http::{error, Body};
use super::request::form_pairs;
use super::session::commands::{instant_at, subscribe_refusal, CLAIM_WITH_TOKEN};
use super::session::{self, Claim, Refusal, Rules, SessionCore, Timeouts};
use super::ShardContext;
use crate::auth::Perm;
use crate::engine::hub::{ConnId, Subscriber};
use crate::engine::outbox::{Outbox, OutboxState, NO_SLOT};
use crate::engine::presence::{Identity, Liveness};
use crate::engine::Join;
use crate::protocol::{sse, ENC_SSE};
use crate::types::{ChannelName, StreamPosition};
use std::sync::Arc;

/// Answers `GET /sse?channel=…`.
pub async fn open(ctx: Rc<ShardContext>, req: Request<Incoming>) -> Response<Body> {
    open_as(ctx, req, None).await
}

/// The backend proxy's word on a stream (when one is configured): the connect proxy (which may
/// name the user and add server-side channels), then the subscribe proxy on each channel the
/// request names. A refusal is the error response.
async fn ask_backend(
    ctx: &ShardContext,
    req: &Request<Incoming>,
    id: crate::engine::hub::ConnId,
    auth: &mut super::request::ConnAuth,
    channels: &mut Vec<ChannelName>,
) -> Result<(), Response<Body>> {
    let Some(hs) = super::proxied::handshake(ctx, req, ("sse", "sse"), auth) else {
        return Ok(());
    };
    let refused = |r: crate::backend::Refusal| {
        let status = match r.code {
            "forbidden" => StatusCode::FORBIDDEN,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        error(status, r.code, &r.message)
    };
    let client = ctx.node.engine.client_id(ctx.shard, id);
    let extra = super::proxied::admit(&hs, &client, auth)
        .await
        .map_err(refused)?;
    for ch in channels.iter() {
        if let Some(a) = hs
            .caller
            .subscribe_asker(&client, auth.user.as_ref(), ch.as_str())
        {
            a.subscribe(ch.clone()).await.map_err(refused)?;
        }
    }
    for ch in extra {
        if !channels.contains(&ch) {
            channels.push(ch);
        }
    }
    Ok(())
}

/// Answers an SSE request as `given` when it is `Some` (the admin UI's live tail, authorised
/// by its session), else as the request's token says.
pub(crate) async fn open_as(
    ctx: Rc<ShardContext>,
    req: Request<Incoming>,
    given: Option<super::request::ConnAuth>,
) -> Response<Body> {
    if let Err(e) = session::on_connect(ctx.node.engine.overloaded(), "sse stream") {
        return super::http::overloaded(e);
    }
    let cfg = ctx.config().clone();
    let mut channels: Vec<ChannelName> = Vec::new();
    let mut last_event_id: Option<String> = None;
    let mut ask = PresenceAsk::default();
    for (k, v) in form_pairs(req.uri().query().unwrap_or("")) {
        match k.as_str() {
            "presence" => ask.join = !matches!(v.as_str(), "0" | "false" | "no"),
            "presence_user" => ask.user = Some(v),
            "presence_info" => ask.info = Some(v),
            "channel" => match ChannelName::new(&v) {
                Ok(c) if !channels.contains(&c) => channels.push(c),
                Ok(_) => {}
                Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_channel", &e.to_string()),
            },
            "last_event_id" => last_event_id = Some(v),
            _ => {}
        }
    }
    if let Some(h) = req.headers().get("last-event-id") {
        match h.to_str() {
            Ok(s) => last_event_id = Some(s.to_owned()),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "Last-Event-ID is not ASCII",
                )
            }
        }
    }
    if channels.is_empty() {
        // A cursor holds positions, not names: a resume repeats the channels.
        let message = match last_event_id {
            Some(_) => {
                "give at least one ?channel=: a Last-Event-ID cursor holds one epoch:seq per \
                 channel, not the channels, so a resume repeats the same ?channel= parameters \
                 in the same order"
            }
            None => "give at least one ?channel=",
        };
        return error(StatusCode::BAD_REQUEST, "bad_request", message);
    }
    let as_admin = given.is_some();
    let mut auth = match given.map_or_else(|| super::request::connection_auth(&ctx, &req), Ok) {
        Ok(a) => a,
        Err(e) => {
            crate::limits::refused(crate::limits::Cause::Unauthorized, &e.to_string());
            return error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
        }
    };
    let id = ctx.next_conn_id();
    if !as_admin {
        if let Err(res) = ask_backend(&ctx, &req, id, &mut auth, &mut channels).await {
            return res;
        }
    }
    // The stream's decisions are a WebSocket session's (`session::commands`): its grants, its
    // presence identity and the subscription limit, its channels waiting for the backplane.
    let rules = Rules::of(&cfg, ctx.node.auth.is_some());
    let now = session::now();
    let timeouts = Timeouts::from_config(&cfg, std::time::Duration::ZERO);
    let expires = auth.exp.map(|exp| instant_at(exp, now));
    let mut core = SessionCore::new(&timeouts, now, auth, false, (0, 0));
    for ch in &channels {
        if let Err(r) = core.may(Perm::Subscribe, ch) {
            let message = format!("no subscribe permission on {ch}");
            return error(StatusCode::FORBIDDEN, r.code, &message);
        }
    }
    if let Err(res) = ask.check(&rules, &core) {
        return res;
    }
    let slot = match super::http::stream_slot(&ctx, &req) {
        Ok(s) => s,
        Err(res) => return res,
    };
    for ch in &channels {
        if let Err(r) = core.admit(&rules, ch) {
            let message = "more channels than --max-subscriptions";
            return error(StatusCode::BAD_REQUEST, r.code, message);
        }
        core.wait_join(ch.clone());
    }
    let resume = match last_event_id.as_deref().filter(|s| !s.trim().is_empty()) {
        None => None,
        Some(s) => match sse::parse_cursor(s, cfg.max_subscriptions) {
            Ok(c) => Some(c),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("Last-Event-ID: {e}"),
                )
            }
        },
    };
    // A cursor for another list of channels cannot be matched position by position.
    let cursor_fits = resume.as_ref().map(|c| c.len() == channels.len());

    // A backplane brings each channel in sync on this node first (never waits in memory mode).
    for ch in &channels {
        if let Some(wait) = ctx.node.join(ch) {
            if let Err(e) = wait.await {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    &e.to_string(),
                );
            }
        }
        core.join_answered(ch);
    }
    let outbox = ctx.new_outbox();
    let now = session::now();
    let member = match ask.identity(&ctx, &rules, &core, id, now) {
        Ok(m) => m,
        Err(r) => return error(StatusCode::FORBIDDEN, r.code, &r.message),
    };
    let mut head = BytesMut::new();
    head.put_slice(&sse::retry(cfg.sse_retry.as_millis()));
    let mut gaps = BytesMut::new();
    let mut cursor = Vec::with_capacity(channels.len());
    let mut listing = String::from("{\"channels\":[");
    {
        let mut hub = ctx.hub.borrow_mut();
        for (i, ch) in channels.iter().enumerate() {
            let from = match (&resume, cursor_fits) {
                (Some(c), Some(true)) => Some(c[i]),
                _ => None,
            };
            let sub = Subscriber::new(outbox.clone(), ENC_SSE, core.next_slot());
            // A stream is a presence member only when it asks (`?presence=1`): its liveness is
            // the stream itself (see `SseBody::member`).
            let join = match &member {
                Some((who, live)) if ctx.node.engine.has_presence(ch) => Some(Join {
                    who: who.clone(),
                    live: live.clone(),
                }),
                _ => None,
            };
            let s = match hub.subscribe(id, ch, from, join, sub, now) {
                Ok(s) => s,
                Err(e) => {
                    let mut wake = 0;
                    for done in &channels[..i] {
                        if let (Some(c), Some((who, _))) = (hub.unsubscribe(id, done, now), &member)
                        {
                            wake |= ctx.node.engine.leave_presence(&c, &who.client, now);
                        }
                    }
                    ctx.node.wake(wake);
                    let code = subscribe_refusal(e, "sse subscribe");
                    return error(StatusCode::SERVICE_UNAVAILABLE, code, &e.to_string());
                }
            };
            ctx.node.wake(s.wake);
            core.subscribed(ch.clone());
            let reason = match (cursor_fits, s.gap) {
                (Some(false), _) => Some("bad_cursor"),
                (_, Some(g)) => Some(g.as_str()),
                _ => None,
            };
            if let Some(reason) = reason {
                gaps.put_slice(&sse::gap(ch, reason, s.position));
            }
            // The stream starts where the client is: its resume point when recovered.
            let start = match from {
                Some(p) if s.recovered => p,
                _ => s.position,
            };
            cursor.push(start);
            if i > 0 {
                listing.push(',');
            }
            listing.push_str(&format!(
                "{{\"channel\":\"{ch}\",\"epoch\":\"{}\",\"seq\":{},\"recovered\":{}}}",
                s.position.epoch, s.position.seq, s.recovered
            ));
        }
        // The first page of each replay; the body asks for the next ones as it drains. The
        // `subscribed` event and the gaps (the head) go out before anything queued.
        let stats = hub.flush(id, &channels);
        ctx.metrics.pumped(&stats);
    }
    listing.push_str("]}");
    sse::write_id(&cursor, &mut head);
    head.put_slice(&sse::event("subscribed", &listing)[..]);
    head.put_slice(&gaps);
    let m = &ctx.metrics;
    m.sse_accepted.increment(1);
    m.sse_connections.increment(1.0);
    m.subscriptions.increment(channels.len() as f64);
    // A member's stream writes (and so marks itself alive) well within the presence timeout.
    let keepalive_every = match member {
        Some(_) => cfg.sse_keepalive.min(cfg.heartbeat_interval),
        None => cfg.sse_keepalive,
    };
    let keepalive = tokio::time::sleep(keepalive_every);
    let body = SseBody {
        shutdown: Box::pin(ctx.node.shutdown.clone().cancelled_owned()),
        ctx,
        id,
        channels,
        cursor,
        outbox,
        head: Some(head.freeze()),
        keepalive: Box::pin(keepalive),
        keepalive_every,
        retry: cfg.sse_retry,
        member: member.map(|(who, live)| (who.client, live)),
        ended: false,
        _slot: slot,
        // No refresh reaches a stream: at its token's expiry it ends (`Timed::Close` of a
        // session that cannot refresh), with a `token_expired` event.
        expires: expires.map(|at| Box::pin(tokio::time::sleep_until(at.into()))),
    };
    let mut res = Response::new(Body::Sse(Box::new(body)));
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    res
}

/// The body of one event stream.
pub struct SseBody {
    ctx: Rc<ShardContext>,
    id: ConnId,
    channels: Vec<ChannelName>,
    cursor: Vec<StreamPosition>,
    outbox: Rc<Outbox>,
    head: Option<Bytes>,
    keepalive: Pin<Box<tokio::time::Sleep>>,
    keepalive_every: std::time::Duration,
    /// `--sse-retry`: on shutdown the stream ends with a `retry:` spread below it.
    retry: std::time::Duration,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    ended: bool,
    /// The client's per-IP slot when it came through a trusted proxy (else the connection
    /// holds it).
    _slot: Option<std::sync::Arc<crate::limits::IpGuard>>,
    /// The token's expiry: the stream ends then, with a `token_expired` event.
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Its presence client id and liveness, when the stream is a presence member. Every poll
    /// marks it alive (the keep-alive polls at least every `min(--sse-keepalive,
    /// --heartbeat-interval)`); dropping the stream leaves at once.
    member: Option<(Arc<str>, Arc<Liveness>)>,
}

/// What a stream asked to be in presence: `?presence=1` (as the token's subject, or as a user
/// of its own), `presence_user=` and `presence_info=` (a JSON object), as a WebSocket
/// subscribe's `presence` claim.
#[derive(Default)]
struct PresenceAsk {
    join: bool,
    user: Option<String>,
    info: Option<String>,
}

impl PresenceAsk {
    /// The claim, as a WebSocket subscribe's `presence`.
    fn claim(&self) -> Claim {
        Claim {
            user: self.user.as_deref().map(Arc::from),
            info: self
                .info
                .as_deref()
                .map(crate::protocol::json::normalize_data),
        }
    }

    /// Refuses a claim that a WebSocket subscribe could not make either (the session core's
    /// rule), or that does not parse: the answer.
    // The error is the response itself, built once per refused stream: boxing it buys nothing.
    #[allow(clippy::result_large_err)]
    fn check(&self, rules: &Rules, core: &SessionCore) -> Result<(), Response<Body>> {
        if let Err(r) = core.check_claim(rules, &self.claim()) {
            let message = match r.message {
                m if m == CLAIM_WITH_TOKEN => format!("{m}: use ?presence=1"),
                m => m.into_owned(),
            };
            return Err(error(StatusCode::FORBIDDEN, r.code, &message));
        }
        let bad = |message| Err(error(StatusCode::BAD_REQUEST, "bad_request", message));
        if self
            .user
            .as_ref()
            .is_some_and(|u| u.is_empty() || u.len() > crate::protocol::MAX_USER_LEN)
        {
            return bad("presence_user must be 1 to 256 bytes");
        }
        let object = |i: &str| {
            i.len() <= crate::protocol::MAX_INFO_LEN
                && serde_json::from_str::<serde_json::Value>(i).is_ok_and(|v| v.is_object())
        };
        if self.info.as_deref().is_some_and(|i| !object(i)) {
            return bad("presence_info must be a JSON object of at most 4096 bytes");
        }
        Ok(())
    }

    /// The member this stream is, if it asked to be one (after [`PresenceAsk::check`]).
    fn identity(
        self,
        ctx: &ShardContext,
        rules: &Rules,
        core: &SessionCore,
        id: ConnId,
        now: Instant,
    ) -> Result<Option<(Identity, Arc<Liveness>)>, Refusal> {
        let claim = self.claim();
        if !self.join && claim.user.is_none() && claim.info.is_none() {
            return Ok(None);
        }
        let client = ctx.node.engine.client_id(ctx.shard, id);
        let who = core.presence_identity(rules, &client, claim)?;
        let live = Arc::new(Liveness::default());
        live.touch(ctx.node.engine.millis(now));
        Ok(Some((who, live)))
    }
}

impl SseBody {
    /// Queues what the hub held back for this stream (a replay's next page, a gap notice, a
    /// conflated message) once its outbox has drained enough.
    fn flush_deferred(&self) {
        if self.outbox.take_deferred() {
            if let Ok(mut hub) = self.ctx.hub.try_borrow_mut() {
                let stats = hub.flush(self.id, &self.channels);
                self.ctx.metrics.pumped(&stats);
            }
        }
    }
}

impl HttpBody for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some((_, live)) = &this.member {
            live.touch(this.ctx.node.engine.millis(crate::types::now()));
        }
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        match this.outbox.state() {
            // Ending the stream makes the client reconnect with Last-Event-ID and resume.
            OutboxState::Overflowed => {
                this.ctx.metrics.slow.increment(1);
                this.ended = true;
                return Poll::Ready(None);
            }
            OutboxState::Closing if this.outbox.is_empty() => {
                this.ended = true;
                return Poll::Ready(None);
            }
            _ => {}
        }
        // What is queued goes first; the stream's timers and the shutdown are looked at only
        // when nothing is (hyper polls again after each chunk until the body is pending, so
        // every wake-up still reaches them), which keeps a busy stream's wake-up to one pass
        // over them instead of two. One chunk for everything queued, sized up front (frames,
        // plus an `id:` line of up to ~40 bytes per channel each) so that copying them in
        // never reallocates. Not once the token expired or the node is going (two reads of
        // this thread's state, not the node's shared token): a stream that always has
        // something queued would otherwise never reach its timers below (what is queued then
        // is resumed by the client, as after any end of stream).
        let frames = this.outbox.messages();
        let ending = this.expires.as_ref().is_some_and(|e| e.is_elapsed())
            || this.ctx.alarms.shutting_down();
        if frames > 0 && !ending {
            let size = this.outbox.queued_bytes() + frames * (8 + 40 * this.cursor.len());
            let mut buf = BytesMut::new();
            // A run stamped for a stream of its channel alone (see `Out::stamped`), when it
            // is all that is queued, goes out as it is, shared with the channel's other
            // streams.
            let mut shared = None;
            let alone = this.outbox.frames() == 1;
            let cursor = &mut this.cursor;
            // Each message after its `id:` line, those of a run (a pass's messages of a
            // channel, queued as one entry) too.
            let n = this.outbox.drain_into(|out| {
                if let ([pos], Some((epoch, joined))) = (&mut cursor[..], out.stamped()) {
                    if pos.epoch == epoch {
                        pos.seq = out.seq();
                        if alone {
                            shared = Some(joined.clone());
                        } else {
                            reserve_once(&mut buf, size);
                            buf.put_slice(joined);
                        }
                        return;
                    }
                }
                reserve_once(&mut buf, size);
                let slot = out.slot();
                out.each(|seq, frame| {
                    if slot != NO_SLOT {
                        if let Some(p) = cursor.get_mut(slot as usize) {
                            p.seq = seq;
                        }
                        sse::write_id(cursor, &mut buf);
                    }
                    buf.put_slice(frame);
                });
            });
            this.ctx.metrics.frames_per_write.record(n as f64);
            this.flush_deferred();
            let chunk = shared.unwrap_or_else(|| buf.freeze());
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        this.flush_deferred();
        if this
            .expires
            .as_mut()
            .is_some_and(|e| e.as_mut().poll(cx).is_ready())
        {
            this.ended = true;
            return Poll::Ready(Some(Ok(Frame::data(sse::event("token_expired", "{}")))));
        }
        if this.shutdown.as_mut().poll(cx).is_ready() {
            // The node is going: reconnect elsewhere, each stream after its own delay below
            // `--sse-retry`, so that its clients do not all arrive at once.
            this.ended = true;
            let spread = this.id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
            let ms = spread % (this.retry.as_millis() as u64).max(1);
            return Poll::Ready(Some(Ok(Frame::data(sse::retry(u128::from(ms))))));
        }
        if this.keepalive.as_mut().poll(cx).is_ready() {
            let next = tokio::time::Instant::now() + this.keepalive_every;
            this.keepalive.as_mut().reset(next);
            let _ = this.keepalive.as_mut().poll(cx);
            // A quiet stream (nothing to write at its keep-alive): no queue buffer held.
            this.outbox.release_idle();
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(sse::KEEPALIVE)))));
        }
        match this.outbox.poll_ready(cx) {
            Poll::Ready(()) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Sizes `buf` for everything queued (`size`) the first time something is copied into it, so
/// that copying never reallocates and a chunk that goes out shared allocates nothing.
fn reserve_once(buf: &mut BytesMut, size: usize) {
    if buf.capacity() == 0 {
        buf.reserve(size);
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        let m = &self.ctx.metrics;
        m.sse_connections.decrement(1.0);
        m.subscriptions.decrement(self.channels.len() as f64);
        let now = crate::types::now();
        if let Ok(mut hub) = self.ctx.hub.try_borrow_mut() {
            let mut wake = 0;
            for ch in &self.channels {
                let left = hub.unsubscribe(self.id, ch, now);
                if let (Some(c), Some((client, _))) = (left, &self.member) {
                    wake |= self.ctx.node.engine.leave_presence(&c, client, now);
                }
            }
            self.ctx.node.wake(wake);
        } else {
            tracing::error!(
                conn = self.id,
                "sse stream dropped while the hub was busy; subscriptions leak"
            );
        }
    }
}
