//! The HTTP API: publish, broadcast, history and channels. JSON in and out.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::http::{error, json, Body};
use super::sse::form_pairs;
use super::ShardContext;
use crate::protocol::json::normalize_data;
use crate::types::{ChannelName, DataKind};

/// Most channels in one broadcast.
pub const MAX_BROADCAST: usize = 100;

/// Routes `/api/*`.
pub async fn handle(ctx: Rc<ShardContext>, req: Request<Incoming>) -> Response<Body> {
    if !authorized(&ctx.config().api_keys, &req) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key (Authorization: Bearer <key>)",
        );
    }
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/api/publish") => match read_body(&ctx, req).await {
            Ok(b) => parse(&b).map_or_else(|res| res, |body| publish(&ctx, body)),
            Err(res) => res,
        },
        (Method::POST, "/api/broadcast") => match read_body(&ctx, req).await {
            Ok(b) => parse(&b).map_or_else(|res| res, |body| broadcast(&ctx, body)),
            Err(res) => res,
        },
        (Method::GET, "/api/channels") => channels(&ctx),
        (Method::GET, p) if p.starts_with("/api/history/") => history(
            &ctx,
            &p["/api/history/".len()..],
            req.uri().query().unwrap_or(""),
        ),
        (_, "/api/publish" | "/api/broadcast" | "/api/channels") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "wrong method for this path",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such API path"),
    }
}

/// Whether the request carries one of `keys` (always, when there are none). Every key is
/// compared in full, in constant time, so timing tells nothing about a key.
fn authorized(keys: &[String], req: &Request<Incoming>) -> bool {
    if keys.is_empty() {
        return true;
    }
    let Some(given) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    keys.iter().fold(false, |ok, k| {
        ok | ct_eq(k.as_bytes(), given.trim().as_bytes())
    })
}

/// Constant-time equality (for equal lengths; lengths are not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct BroadcastBody<'a> {
    #[serde(borrow)]
    channels: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// Reads a body of at most `--max-message-size` bytes.
async fn read_body(ctx: &ShardContext, req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let max = ctx.config().max_message_size;
    let too_large = || {
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
    match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "could not read the body",
        )),
    }
}

/// Parses a JSON body: `bad_json` when it is not JSON, `bad_request` when fields are wrong.
fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, Response<Body>> {
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_data() {
            "bad_request"
        } else {
            "bad_json"
        };
        error(StatusCode::BAD_REQUEST, code, &e.to_string())
    })
}

fn channel(name: &str) -> Result<ChannelName, Response<Body>> {
    ChannelName::new(name)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_channel", &e.to_string()))
}

fn publish(ctx: &ShardContext, b: PublishBody<'_>) -> Response<Body> {
    let ch = match channel(&b.channel) {
        Ok(c) => c,
        Err(res) => return res,
    };
    let p = ctx.node.engine.publish(
        &ch,
        DataKind::Json,
        normalize_data(b.data.get()),
        Instant::now(),
    );
    ctx.node.wake(p.wake);
    json(
        StatusCode::OK,
        format!(
            "{{\"channel\":\"{ch}\",\"seq\":{},\"epoch\":\"{}\"}}",
            p.seq, p.epoch
        ),
    )
}

fn broadcast(ctx: &ShardContext, b: BroadcastBody<'_>) -> Response<Body> {
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
            Ok(c) => names.push(c),
            Err(res) => return res,
        }
    }
    let data = normalize_data(b.data.get());
    let now = Instant::now();
    let mut out = String::from("{\"results\":[");
    let mut wake = 0;
    for (i, ch) in names.iter().enumerate() {
        let p = ctx
            .node
            .engine
            .publish(ch, DataKind::Json, data.clone(), now);
        wake |= p.wake;
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"channel\":\"{ch}\",\"seq\":{},\"epoch\":\"{}\"}}",
            p.seq, p.epoch
        );
    }
    ctx.node.wake(wake);
    out.push_str("]}");
    json(StatusCode::OK, out)
}

fn history(ctx: &ShardContext, name: &str, query: &str) -> Response<Body> {
    let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    let ch = match channel(&name) {
        Ok(c) => c,
        Err(res) => return res,
    };
    let max = ctx.config().history_size;
    let (mut since, mut limit) = (0u64, max);
    for (k, v) in form_pairs(query) {
        let parsed = v.parse::<u64>();
        match (k.as_str(), parsed) {
            ("since", Ok(n)) => since = n,
            ("limit", Ok(n)) => limit = (n as usize).min(max),
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
    let h = ctx.node.engine.history(&ch, since, limit, Instant::now());
    let mut out = format!(
        "{{\"channel\":\"{ch}\",\"epoch\":\"{}\",\"seq\":{},\"complete\":{},\"messages\":[",
        h.position.epoch, h.position.seq, h.complete
    );
    for (i, p) in h.publications.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{{\"seq\":{},\"data\":", p.seq);
        out.push_str(&String::from_utf8_lossy(&p.data));
        out.push('}');
    }
    out.push_str("]}");
    json(StatusCode::OK, out)
}

fn channels(ctx: &ShardContext) -> Response<Body> {
    let mut out = String::from("{\"channels\":[");
    for (i, c) in ctx.node.engine.channels().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"channel\":\"{}\",\"subscribers\":{},\"seq\":{}}}",
            c.name, c.subscribers, c.seq
        );
    }
    out.push_str("]}");
    json(StatusCode::OK, out)
}
