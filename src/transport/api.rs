//! The HTTP API: publish, broadcast, history and channels. JSON in and out.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::http::{error, json, json_counted, Body};
use super::paging;
use super::request::form_pairs;
use super::{PublishError, ShardContext};
use crate::auth::{Grants, Perm};
use crate::engine::idempotency::PublishConditions;
use crate::protocol::json::normalize_data;
use crate::types::{ChannelName, DataKind};

/// Most channels in one broadcast.
pub const MAX_BROADCAST: usize = 100;

/// What a request body must be for the API: hyper's, or a whole one the pipelining front
/// (`server::front`) read ahead.
pub trait ApiBody: http_body::Body<Data = Bytes, Error: Into<BoxError>> {}
impl<B: http_body::Body<Data = Bytes, Error: Into<BoxError>>> ApiBody for B {}
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Routes `/api/*`.
pub async fn handle<B: ApiBody>(ctx: Rc<ShardContext>, req: Request<B>) -> Response<Body> {
    let key = api_key(&ctx.config().api_key, &req);
    if let Err(res) = within_rate(&ctx, &req, key) {
        return res;
    }
    let g = match grants(&ctx, &req, key.is_some()) {
        Ok(g) => g,
        Err(res) => return res,
    };
    let g = &g;
    // Routed on the request's own path (no copy): the arms that take the request use no part
    // of it.
    match (req.method().clone(), req.uri().path()) {
        (Method::POST, "/api/publish") => match read_body(&ctx, req).await {
            Ok(b) => match parse(&b) {
                Ok(body) => publish(&ctx, g, body).await,
                Err(res) => res,
            },
            Err(res) => res,
        },
        (Method::POST, "/api/broadcast") => match read_body(&ctx, req).await {
            Ok(b) => match parse(&b) {
                Ok(body) => broadcast(&ctx, g, body).await,
                Err(res) => res,
            },
            Err(res) => res,
        },
        (Method::GET, "/api/channels") if !g.is_all() => {
            forbidden("listing channels needs an API key")
        }
        (Method::GET, "/api/channels") => channels(&ctx, req.uri().query().unwrap_or(""), false),
        (Method::GET, p) if p.starts_with("/api/presence/") => {
            presence(
                &ctx,
                g,
                &p["/api/presence/".len()..],
                req.uri().query().unwrap_or(""),
            )
            .await
        }
        (Method::GET, p) if p.starts_with("/api/history/") => {
            history(
                &ctx,
                g,
                &p["/api/history/".len()..],
                req.uri().query().unwrap_or(""),
            )
            .await
        }
        (_, p)
            if p.starts_with("/api/users/")
                || p.starts_with("/api/channels/")
                || p == "/api/batch" =>
        {
            super::server_api::handle(&ctx, g, req).await
        }
        (_, "/api/publish" | "/api/broadcast" | "/api/channels") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "wrong method for this path",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such API path"),
    }
}

/// What the request may do: everything with an API key (or with neither API keys nor JWT auth
/// configured); with JWT auth, what its bearer token grants, or what anonymous clients may.
// The error is the response itself, built once per refused request: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn grants<B>(
    ctx: &ShardContext,
    req: &Request<B>,
    has_key: bool,
) -> Result<Grants, Response<Body>> {
    let cfg = ctx.config();
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let unauthorized = |message: &str| {
        crate::limits::refused(crate::limits::Cause::Unauthorized, "api");
        error(StatusCode::UNAUTHORIZED, "unauthorized", message)
    };
    if has_key {
        return Ok(Grants::all());
    }
    match (&ctx.node.auth, bearer) {
        (Some(auth), Some(token)) => auth
            .verify(token)
            .map(|p| p.grants)
            .map_err(|e| unauthorized(&format!("not an API key, and not a valid token: {e}"))),
        (Some(_), None) => Ok(ctx.node.anonymous_grants()),
        (None, _) if cfg.api_key.is_empty() => Ok(ctx.node.anonymous_grants()),
        (None, _) => Err(unauthorized(
            "missing or wrong API key (Authorization: Bearer <key>)",
        )),
    }
}

/// The 403 of a request its grants do not allow.
fn forbidden(message: &str) -> Response<Body> {
    crate::limits::refused(crate::limits::Cause::Forbidden, "api");
    error(StatusCode::FORBIDDEN, "forbidden", message)
}

/// Which of `keys` the request's bearer is, if any. Every key is compared in full, in constant
/// time, so timing tells nothing about a key.
fn api_key<B>(keys: &[String], req: &Request<B>) -> Option<usize> {
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))?
        .trim();
    keys.iter().enumerate().fold(None, |found, (i, k)| {
        if ct_eq(k.as_bytes(), given.as_bytes()) {
            Some(i)
        } else {
            found
        }
    })
}

/// Counts the request against its API key's rate, or its client address's when it has no key;
/// the 429 (with `Retry-After`) of one over it.
// The error is the response itself, built once per refused request: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn within_rate<B>(
    ctx: &ShardContext,
    req: &Request<B>,
    key: Option<usize>,
) -> Result<(), Response<Body>> {
    use crate::limits::ApiClient;
    let who = match key {
        Some(i) => ApiClient::Key(i),
        None => req
            .extensions()
            .get::<super::Peer>()
            .and_then(|p| ctx.node.client(p, req.headers()))
            .map_or(ApiClient::Unknown, ApiClient::Ip),
    };
    let Err(wait) = ctx.node.api.check(who, crate::types::now()) else {
        return Ok(());
    };
    let (flag, detail) = match who {
        ApiClient::Ip(ip) => ("--api-rate-limit", ip.to_string()),
        _ => ("--api-key-rate-limit", "api key".to_owned()),
    };
    crate::limits::refused(crate::limits::Cause::ApiRateLimited, &detail);
    Err(rate_limited(&format!("API requests ({flag})"), wait))
}

/// The 429 `rate_limited` of a request over its rate ("too many `what`"), with `Retry-After`
/// in whole seconds (at least 1).
pub(super) fn rate_limited(what: &str, wait: std::time::Duration) -> Response<Body> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut res = error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        &format!("too many {what}: retry after {secs} s"),
    );
    res.headers_mut()
        .insert(hyper::header::RETRY_AFTER, secs.max(1).into());
    res
}

/// Constant-time equality (for equal lengths; lengths are not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `{"channel","data","idempotency_key"?,"expected_seq"?}`: a publish (also in a batch).
#[derive(Deserialize)]
pub(super) struct PublishBody<'a> {
    #[serde(borrow)]
    pub(super) channel: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) data: &'a RawValue,
    #[serde(borrow, default)]
    pub(super) idempotency_key: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) expected_seq: Option<u64>,
}

#[derive(Deserialize)]
struct BroadcastBody<'a> {
    #[serde(borrow)]
    channels: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
}

/// The answer to a publish: `{"channel","seq","epoch"}`, plus `"duplicate":true` for a
/// repeat of an idempotency key.
pub(super) fn published_json(ch: &ChannelName, p: &super::Published, duplicate: bool) -> String {
    let dup = if duplicate { ",\"duplicate\":true" } else { "" };
    // Sized to the answer (seq and epoch take at most 20 digits each), so that `http::json`
    // shrinks it in place.
    let mut out = String::with_capacity(ch.as_str().len() + dup.len() + 80);
    let _ = write!(
        out,
        "{{\"channel\":\"{ch}\",\"seq\":{},\"epoch\":\"{}\"{dup}}}",
        p.seq, p.epoch
    );
    out
}

/// The refusal of a publish: 409 `seq_mismatch` with the channel's position, else 503.
pub(super) fn publish_refused(e: &PublishError) -> Response<Body> {
    match e {
        PublishError::SeqMismatch(at) => json(
            StatusCode::CONFLICT,
            format!(
                "{{\"error\":{{\"code\":\"seq_mismatch\",\"message\":{}}},\"epoch\":\"{}\",\"seq\":{}}}",
                crate::protocol::json::json_string(&e.to_string()),
                at.epoch,
                at.seq
            ),
        ),
        _ => unavailable(e),
    }
}

/// Reads a body of at most `--max-message-size` bytes.
pub(super) async fn read_body<B: ApiBody>(
    ctx: &ShardContext,
    req: Request<B>,
) -> Result<Bytes, Response<Body>> {
    let max = ctx.config().max_message_size;
    let too_large = || {
        crate::limits::refused(crate::limits::Cause::MessageTooLarge, "http body");
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!("the body is larger than {max} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let timeout = ctx.config().body_timeout;
    let body = whole_body(Limited::new(req.into_body(), max));
    match tokio::time::timeout(timeout, body).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "could not read the body",
        )),
        Err(_) => Err(body_timed_out(timeout)),
    }
}

/// The 408 of a body that did not arrive within `timeout` (`--body-timeout`). A slow body
/// holds the connection: it is closed after this answer.
pub(crate) fn body_timed_out(timeout: std::time::Duration) -> Response<Body> {
    crate::limits::refused(crate::limits::Cause::BodyTimeout, "http body");
    let mut res = error(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        &format!(
            "the body did not arrive within {} ms (--body-timeout)",
            timeout.as_millis()
        ),
    );
    res.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    res
}

/// The bytes of a body: the frame itself when there is one (a body the front read whole, or a
/// small one hyper read at once), else the frames joined. `collect` would allocate a list for
/// every body.
async fn whole_body<B: http_body::Body<Data = Bytes>>(body: B) -> Result<Bytes, B::Error> {
    let mut body = std::pin::pin!(body);
    let mut first = Bytes::new();
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = body.frame().await {
        // Trailers carry no body bytes.
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match &mut joined {
            Some(j) => j.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut j = bytes::BytesMut::with_capacity(first.len() + data.len());
                j.extend_from_slice(&first);
                j.extend_from_slice(&data);
                joined = Some(j);
            }
        }
    }
    Ok(joined.map_or(first, bytes::BytesMut::freeze))
}

/// Parses a JSON body: `bad_json` when it is not JSON, `bad_request` when fields are wrong.
// The error side is the ready-made error response of a cold path; boxing it buys nothing.
#[allow(clippy::result_large_err)]
pub(super) fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, Response<Body>> {
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_data() {
            "bad_request"
        } else {
            "bad_json"
        };
        error(StatusCode::BAD_REQUEST, code, &e.to_string())
    })
}

#[allow(clippy::result_large_err)]
fn channel(name: &str) -> Result<ChannelName, Response<Body>> {
    ChannelName::new(name)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_channel", &e.to_string()))
}

/// The 503 of a publish that could not be sequenced (`unavailable`) or that the node refused
/// to take (`overloaded`).
fn unavailable(e: &PublishError) -> Response<Body> {
    e.count();
    error(StatusCode::SERVICE_UNAVAILABLE, e.code(), &e.to_string())
}

/// The `limit` and `cursor` of a listing's query string.
#[allow(clippy::result_large_err)]
fn page_query(query: &str) -> Result<(usize, Option<String>), Response<Body>> {
    let (mut limit, mut cursor) = (None, None);
    for (k, v) in form_pairs(query) {
        match k.as_str() {
            "limit" => match v.parse::<u64>() {
                Ok(n) => limit = Some(n),
                Err(_) => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "limit must be a whole number",
                    ))
                }
            },
            "cursor" => cursor = Some(v),
            _ => {}
        }
    }
    Ok((paging::limit(limit), cursor.filter(|c| !c.is_empty())))
}

pub(super) async fn publish(ctx: &ShardContext, g: &Grants, b: PublishBody<'_>) -> Response<Body> {
    let ch = match channel(&b.channel) {
        Ok(c) => c,
        Err(res) => return res,
    };
    if !g.allows(Perm::Publish, ch.as_str()) {
        return forbidden("no publish permission on this channel");
    }
    let cond = match PublishConditions::checked(b.idempotency_key.as_deref(), b.expected_seq) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", &m),
    };
    let data = normalize_data(b.data.get());
    let (p, duplicate) = match ctx.node.publish_with(&ch, DataKind::Json, data, cond).await {
        Ok(p) => p,
        Err(e) => return publish_refused(&e),
    };
    if !duplicate {
        ctx.metrics.published.increment(1);
    }
    json(StatusCode::OK, published_json(&ch, &p, duplicate))
}

async fn broadcast(ctx: &ShardContext, g: &Grants, b: BroadcastBody<'_>) -> Response<Body> {
    if b.channels.is_empty() || b.channels.len() > MAX_BROADCAST {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("give 1 to {MAX_BROADCAST} channels"),
        );
    }
    let mut names = Vec::with_capacity(b.channels.len());
    for c in &b.channels {
        match channel(c) {
            Ok(c) if !g.allows(Perm::Publish, c.as_str()) => {
                return forbidden(&format!("no publish permission on {c}"))
            }
            Ok(c) => names.push(c),
            Err(res) => return res,
        }
    }
    // The key applies per channel: a retried broadcast publishes on none of the channels it
    // reached before, and on the others.
    let cond = match PublishConditions::checked(b.idempotency_key.as_deref(), None) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", &m),
    };
    let data = normalize_data(b.data.get());
    let mut out = String::from("{\"results\":[");
    for (i, ch) in names.iter().enumerate() {
        // Channels published before a failure stay published; the error says which failed.
        let (p, duplicate) = match ctx
            .node
            .publish_with(ch, DataKind::Json, data.clone(), cond.clone())
            .await
        {
            Ok(p) => p,
            Err(e) => return publish_refused(&e),
        };
        if !duplicate {
            ctx.metrics.published.increment(1);
        }
        if i > 0 {
            out.push(',');
        }
        out.push_str(&published_json(ch, &p, duplicate));
    }
    out.push_str("]}");
    json(StatusCode::OK, out)
}

pub(super) async fn history(
    ctx: &ShardContext,
    g: &Grants,
    name: &str,
    query: &str,
) -> Response<Body> {
    let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    let ch = match channel(&name) {
        Ok(c) => c,
        Err(res) => return res,
    };
    if !g.allows(Perm::History, ch.as_str()) {
        return forbidden("no history permission on this channel");
    }
    let (mut since, mut limit) = (0u64, paging::DEFAULT_LIMIT);
    for (k, v) in form_pairs(query) {
        let parsed = v.parse::<u64>();
        match (k.as_str(), parsed) {
            ("since", Ok(n)) => since = n,
            ("limit", Ok(n)) => limit = paging::limit(Some(n)),
            ("since" | "limit", Err(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("{k} must be a whole number"),
                )
            }
            _ => {}
        }
    }
    // From where history lives: this node's rings, or the backplane's. One more than the page
    // tells whether there is a next one.
    let h = match ctx.node.history(&ch, since, limit.saturating_add(1)).await {
        Ok(h) => h,
        Err(e) => return unavailable(&e),
    };
    // A channel this node does not have: no messages, and no epoch to name (reading history
    // does not create a channel).
    let mut out = match h.position {
        Some(p) => format!(
            "{{\"channel\":\"{ch}\",\"epoch\":\"{}\",\"seq\":{},\"complete\":{},\"messages\":[",
            p.epoch, p.seq, h.complete
        ),
        None => format!(
            "{{\"channel\":\"{ch}\",\"seq\":0,\"complete\":{},\"messages\":[",
            h.complete
        ),
    };
    let start = out.len();
    let mut last = None;
    for p in h.publications.iter().take(limit) {
        // Past the first message, stop before the page passes its byte cap.
        if last.is_some() && out.len() - start + p.data.len() > paging::MAX_PAGE_BYTES {
            break;
        }
        if last.is_some() {
            out.push(',');
        }
        let _ = write!(out, "{{\"seq\":{},\"data\":", p.seq);
        // Binary payloads become their JSON value or base64 (+ "encoding"), as on every JSON
        // surface; the buffer only ever holds valid UTF-8 JSON.
        let mut data = bytes::BytesMut::new();
        crate::protocol::json::put_data(&mut data, p.kind, &p.data);
        out.push_str(&String::from_utf8_lossy(&data));
        out.push('}');
        last = Some(p.seq);
    }
    out.push(']');
    if let Some(next) = last.filter(|&l| h.publications.iter().any(|p| p.seq > l)) {
        let _ = write!(out, ",\"next\":{next}");
    }
    out.push('}');
    json_counted(ctx, StatusCode::OK, out)
}

/// `GET /api/presence/{channel}?limit=&cursor=` (a page of members) and
/// `GET /api/presence/{channel}/stats`.
/// On a node that does not receive the channel (no local subscriber), the members of every
/// node are read from the backplane's store.
pub(super) async fn presence(
    ctx: &ShardContext,
    g: &Grants,
    rest: &str,
    query: &str,
) -> Response<Body> {
    let (name, stats) = match rest.strip_suffix("/stats") {
        Some(name) => (name, true),
        None => (rest, false),
    };
    let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    let ch = match channel(&name) {
        Ok(c) => c,
        Err(res) => return res,
    };
    if !g.allows(Perm::Presence, ch.as_str()) {
        return forbidden("no presence permission on this channel");
    }
    let (limit, cursor) = match page_query(query) {
        Ok(q) => q,
        Err(res) => return res,
    };
    let limit = if stats { 0 } else { limit };
    let remote = ctx
        .node
        .engine
        .has_presence(&ch)
        .then(|| ctx.node.backplane.presence(&ch))
        .flatten();
    let page = match remote {
        None => ctx
            .node
            .engine
            .presence(&ch, cursor.as_deref(), limit, paging::MAX_PAGE_BYTES),
        Some(read) => match read.await {
            Ok(members) => {
                let seq = ctx.node.engine.position(&ch).map_or(0, |p| p.seq);
                let (after, max) = (cursor.as_deref(), paging::MAX_PAGE_BYTES);
                Some(crate::backplane::presence::page(
                    members, seq, after, limit, max,
                ))
            }
            Err(e) => return unavailable(&PublishError::Unavailable(e.to_string())),
        },
    };
    let Some(p) = page else {
        return error(
            StatusCode::NOT_FOUND,
            "presence_disabled",
            "this channel has no presence (see --presence-channels)",
        );
    };
    if stats {
        return json(
            StatusCode::OK,
            format!(
                "{{\"channel\":\"{ch}\",\"clients\":{},\"users\":{}}}",
                p.stats.clients, p.stats.users
            ),
        );
    }
    let mut b = bytes::BytesMut::new();
    let _ = write!(b, "{{\"channel\":\"{ch}\",\"seq\":{},\"members\":[", p.seq);
    for (i, m) in p.members.iter().enumerate() {
        if i > 0 {
            b.extend_from_slice(b",");
        }
        b.extend_from_slice(b"{");
        crate::protocol::json::put_identity(&mut b, m);
        b.extend_from_slice(b"}");
    }
    b.extend_from_slice(b"]");
    if let Some(next) = &p.next {
        b.extend_from_slice(b",\"next\":");
        b.extend_from_slice(crate::protocol::json::json_string(next).as_bytes());
    }
    b.extend_from_slice(b"}");
    json_counted(
        ctx,
        StatusCode::OK,
        String::from_utf8_lossy(&b).into_owned(),
    )
}

/// `GET /api/channels?limit=&cursor=`: a page of the channels, by name; `with_presence` (the
/// admin UI) adds each presence channel's `presence: {clients, users}`.
pub(super) fn channels(ctx: &ShardContext, query: &str, with_presence: bool) -> Response<Body> {
    let (limit, cursor) = match page_query(query) {
        Ok(q) => q,
        Err(res) => return res,
    };
    let after = match cursor.as_deref().map(ChannelName::new) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "cursor must be a channel name (the `next` of the previous page)",
            )
        }
    };
    let page = ctx.node.engine.channels_page(after.as_ref(), limit);
    let mut out = String::from("{\"channels\":[");
    for (i, c) in page.channels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"channel\":\"{}\",\"subscribers\":{},\"seq\":{}}}",
            c.name, c.subscribers, c.seq
        );
        if let Some(p) = with_presence
            .then(|| ctx.node.engine.presence(&c.name, None, 0, 0))
            .flatten()
        {
            out.pop();
            let _ = write!(
                out,
                ",\"presence\":{{\"clients\":{},\"users\":{}}}}}",
                p.stats.clients, p.stats.users
            );
        }
    }
    out.push(']');
    if let Some(next) = &page.next {
        let _ = write!(out, ",\"next\":\"{next}\"");
    }
    out.push('}');
    json_counted(ctx, StatusCode::OK, out)
}
