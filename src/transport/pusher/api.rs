//! The Pusher HTTP API on `/apps/ID/…`, as the Pusher server libraries call it: every request
//! signed with the app's secret (`auth_key`, `auth_timestamp` within
//! [`wire::AUTH_WINDOW_SECS`], `auth_version=1.0`, `body_md5`, `auth_signature`); errors as
//! Pusher answers them (a status and a plain-text body).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::pusher::{self as wire, App, ChannelKind};
use crate::transport::http::{json, Body};
use crate::transport::ShardContext;
use crate::types::{ChannelName, DataKind};

/// Most channels one `GET /channels` lists.
const MAX_LISTED_CHANNELS: usize = 10_000;

/// A plain-text answer, as Pusher gives its errors.
fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut res = Response::new(Body::Full(Full::new(Bytes::from(format!("{message}\n")))));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    res
}

fn bad_request(message: &str) -> Response<Body> {
    text(StatusCode::BAD_REQUEST, message)
}

/// Serves one request under `/apps/`.
pub async fn handle(ctx: Rc<ShardContext>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let Some((app_id, rest)) = path["/apps/".len()..].split_once('/') else {
        return text(StatusCode::NOT_FOUND, "Not found");
    };
    let registry = ctx.node.pusher.clone();
    let Some(app) = registry.by_id(app_id).and_then(|i| registry.app(i)) else {
        return text(StatusCode::NOT_FOUND, "Unknown app");
    };
    let method = req.method().clone();
    let query = super::query_pairs(req.uri().query().unwrap_or(""));
    let client = req
        .extensions()
        .get::<crate::transport::Peer>()
        .and_then(|p| ctx.node.client(p, req.headers()));
    let body = match read_body(&ctx, req).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    if let Err(e) = wire::check_api_request(
        app,
        method.as_str(),
        &path,
        &query,
        &body,
        crate::auth::unix_now(),
    ) {
        // A signed request is a backend with the app's secret and is never limited; failed
        // ones are counted per client address against --api-rate-limit.
        let who = client.map_or(
            crate::limits::ApiClient::Unknown,
            crate::limits::ApiClient::Ip,
        );
        if ctx.node.api.check(who, crate::types::now()).is_err() {
            crate::limits::refused(crate::limits::Cause::ApiRateLimited, "pusher api");
            return text(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many requests with a bad signature",
            );
        }
        crate::limits::refused(crate::limits::Cause::Unauthorized, "pusher api");
        return text(StatusCode::UNAUTHORIZED, &e.to_string());
    }
    let param = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    match (&method, rest) {
        (&Method::POST, "events") => events(&ctx, app, &body).await,
        (&Method::POST, "batch_events") => batch_events(&ctx, app, &body).await,
        (&Method::GET, "channels") => channels(&ctx, app, param("filter_by_prefix"), param("info")),
        (&Method::GET, r) if r.starts_with("channels/") => {
            let r = &r["channels/".len()..];
            match r.strip_suffix("/users") {
                Some(name) => users(&ctx, app, name),
                None => channel(&ctx, app, r, param("info")),
            }
        }
        (&Method::POST, r) if r.starts_with("users/") && r.ends_with("/terminate_connections") => {
            let user = &r["users/".len()..r.len() - "/terminate_connections".len()];
            let index = registry.by_id(app_id).unwrap_or(usize::MAX);
            registry.terminate(index, user);
            json(StatusCode::OK, "{}".into())
        }
        _ => text(StatusCode::NOT_FOUND, "Not found"),
    }
}

/// The body, at most `--max-message-size`, within `--body-timeout`.
async fn read_body(ctx: &ShardContext, req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let max = ctx.config().max_message_size;
    let too_large = || {
        crate::limits::refused(crate::limits::Cause::MessageTooLarge, "pusher api body");
        text(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large")
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), max).collect();
    match tokio::time::timeout(ctx.config().body_timeout, body).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(bad_request("Could not read the body")),
        Err(_) => {
            crate::limits::refused(crate::limits::Cause::BodyTimeout, "pusher api body");
            let mut res = text(StatusCode::REQUEST_TIMEOUT, "Request Timeout");
            res.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            Err(res)
        }
    }
}

/// One event of `events` or of a batch.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, borrow)]
    channels: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    socket_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    info: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    batch: Vec<Event<'a>>,
}

/// An event checked against the app's limits: its relay channels (with their Pusher names)
/// and the relay payload.
struct Checked {
    channels: Vec<(String, ChannelName)>,
    payload: Bytes,
    info: Option<String>,
}

// The error is the response itself, built once per refused request: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn check(app: &App, e: &Event<'_>, max_channels: usize) -> Result<Checked, Response<Body>> {
    if e.name.is_empty() || e.name.len() > wire::MAX_EVENT_NAME_LEN {
        return Err(bad_request("Event name must be 1 to 200 characters"));
    }
    if e.data.get().len() > app.max_event_bytes {
        return Err(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Event data is larger than the app's max_event_bytes",
        ));
    }
    let names: Vec<&str> = match (&e.channels, &e.channel) {
        (Some(c), _) => c.iter().map(|c| &**c).collect(),
        (None, Some(c)) => vec![&**c],
        (None, None) => return Err(bad_request("Missing channels")),
    };
    if names.is_empty() || names.len() > max_channels {
        return Err(bad_request(&format!(
            "An event names 1 to {max_channels} channels"
        )));
    }
    let encrypted = names
        .iter()
        .any(|n| ChannelKind::of(n) == ChannelKind::Encrypted);
    if encrypted && names.len() > 1 {
        return Err(bad_request(
            "An event on an encrypted channel names that channel alone",
        ));
    }
    let mut channels = Vec::with_capacity(names.len());
    for n in names {
        let c = wire::relay_channel(&app.id, n)
            .ok_or_else(|| bad_request(&format!("Invalid channel name {n:?}")))?;
        channels.push((n.to_owned(), c));
    }
    if let Some(s) = &e.socket_id {
        if !wire::valid_socket_id(s) {
            return Err(bad_request("Invalid socket_id"));
        }
    }
    Ok(Checked {
        channels,
        payload: wire::payload(&e.name, e.data.get(), e.socket_id.as_deref(), None),
        info: e.info.as_deref().map(str::to_owned),
    })
}

/// Publishes a checked event on each of its channels; returns the `channels` info asked for.
async fn publish(ctx: &ShardContext, c: &Checked) -> Result<Option<String>, Response<Body>> {
    for (_, channel) in &c.channels {
        if let Err(e) = ctx
            .node
            .publish(channel, DataKind::Json, c.payload.clone())
            .await
        {
            e.count();
            return Err(text(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()));
        }
        ctx.metrics.published.increment(1);
    }
    Ok(c.info.as_deref().map(|info| {
        let items: Vec<String> = c
            .channels
            .iter()
            .map(|(n, ch)| format!("\"{n}\":{}", attributes(ctx, ch, n, info)))
            .collect();
        format!("{{{}}}", items.join(","))
    }))
}

async fn events(ctx: &ShardContext, app: &App, body: &[u8]) -> Response<Body> {
    let e: Event = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(err) => return bad_request(&format!("Invalid JSON: {err}")),
    };
    let c = match check(app, &e, app.max_channels_per_event) {
        Ok(c) => c,
        Err(res) => return res,
    };
    match publish(ctx, &c).await {
        Ok(Some(info)) => json(StatusCode::OK, format!("{{\"channels\":{info}}}")),
        Ok(None) => json(StatusCode::OK, "{}".into()),
        Err(res) => res,
    }
}

async fn batch_events(ctx: &ShardContext, app: &App, body: &[u8]) -> Response<Body> {
    let b: Batch = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(err) => return bad_request(&format!("Invalid JSON: {err}")),
    };
    if b.batch.len() > app.max_batch {
        return bad_request(&format!(
            "Batch too large: at most {} events",
            app.max_batch
        ));
    }
    // Every event is checked before any is published: a bad batch publishes nothing.
    let mut checked = Vec::with_capacity(b.batch.len());
    for e in &b.batch {
        match check(app, e, 1) {
            Ok(c) => checked.push(c),
            Err(res) => return res,
        }
    }
    let mut infos = Vec::with_capacity(checked.len());
    for c in &checked {
        match publish(ctx, c).await {
            Ok(info) => infos.push(info),
            Err(res) => return res,
        }
    }
    if infos.iter().all(Option::is_none) {
        return json(StatusCode::OK, "{}".into());
    }
    let items: Vec<String> = checked
        .iter()
        .zip(infos)
        .map(|(c, info)| match (info, c.channels.first()) {
            // One channel per batch event: its attributes alone.
            (Some(_), Some((n, ch))) => attributes(ctx, ch, n, c.info.as_deref().unwrap_or("")),
            _ => "{}".to_owned(),
        })
        .collect();
    json(
        StatusCode::OK,
        format!("{{\"batch\":[{}]}}", items.join(",")),
    )
}

/// The attributes `info` asks for (`subscription_count`, `user_count` for presence
/// channels) of `channel`, as a JSON object.
fn attributes(ctx: &ShardContext, channel: &ChannelName, name: &str, info: &str) -> String {
    let mut out = BTreeMap::new();
    for want in info.split(',').map(str::trim) {
        match want {
            "subscription_count" => {
                out.insert(
                    "subscription_count",
                    ctx.node.engine.local_subscribers(channel),
                );
            }
            "user_count" if ChannelKind::of(name) == ChannelKind::Presence => {
                out.insert("user_count", user_count(ctx, channel));
            }
            _ => {}
        }
    }
    let items: Vec<String> = out.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", items.join(","))
}

fn user_count(ctx: &ShardContext, channel: &ChannelName) -> u64 {
    ctx.node
        .engine
        .presence(channel, None, 1, 0)
        .map_or(0, |p| p.stats.users as u64)
}

/// `GET /apps/ID/channels`: the occupied channels (with subscribers on this node), by prefix.
fn channels(
    ctx: &ShardContext,
    app: &App,
    prefix: Option<&str>,
    info: Option<&str>,
) -> Response<Body> {
    let prefix = prefix.unwrap_or("");
    if info.is_some_and(|i| i.contains("user_count")) && !prefix.starts_with("presence-") {
        return bad_request(
            "user_count is only available for presence channels (filter_by_prefix=presence-)",
        );
    }
    let start = format!("{}{}/{prefix}", wire::PREFIX, app.id);
    let mut after = ChannelName::new(&start).ok();
    let mut items = Vec::new();
    'pages: while let Some(a) = after.take() {
        let page = ctx
            .node
            .engine
            .channels_page(Some(&a), crate::transport::paging::MAX_LIMIT);
        for c in &page.channels {
            if !c.name.as_str().starts_with(&start) || items.len() >= MAX_LISTED_CHANNELS {
                break 'pages;
            }
            let Some(name) = wire::pusher_channel(c.name.as_str()) else {
                continue;
            };
            if c.subscribers == 0 || name.starts_with(wire::USER_CHANNEL) {
                continue;
            }
            let attrs =
                info.map_or_else(|| "{}".to_owned(), |i| attributes(ctx, &c.name, &name, i));
            items.push(format!("\"{name}\":{attrs}"));
        }
        after = page.next;
    }
    crate::transport::http::json_counted(
        ctx,
        StatusCode::OK,
        format!("{{\"channels\":{{{}}}}}", items.join(",")),
    )
}

/// `GET /apps/ID/channels/NAME`.
fn channel(ctx: &ShardContext, app: &App, name: &str, info: Option<&str>) -> Response<Body> {
    let Some(channel) = wire::relay_channel(&app.id, name) else {
        return bad_request("Invalid channel name");
    };
    let presence = ChannelKind::of(name) == ChannelKind::Presence;
    if info.is_some_and(|i| i.contains("user_count")) && !presence {
        return bad_request("user_count is only available for presence channels");
    }
    let subs = ctx.node.engine.local_subscribers(&channel);
    let mut body = format!("{{\"occupied\":{}", subs > 0);
    for want in info.unwrap_or("").split(',').map(str::trim) {
        match want {
            "subscription_count" => body.push_str(&format!(",\"subscription_count\":{subs}")),
            "user_count" => {
                body.push_str(&format!(",\"user_count\":{}", user_count(ctx, &channel)))
            }
            _ => {}
        }
    }
    body.push('}');
    json(StatusCode::OK, body)
}

/// `GET /apps/ID/channels/NAME/users`: a presence channel's user ids.
fn users(ctx: &ShardContext, app: &App, name: &str) -> Response<Body> {
    if ChannelKind::of(name) != ChannelKind::Presence {
        return bad_request("Users are only available for presence channels");
    }
    let Some(channel) = wire::relay_channel(&app.id, name) else {
        return bad_request("Invalid channel name");
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor: Option<std::sync::Arc<str>> = None;
    while let Some(page) = ctx.node.engine.presence(
        &channel,
        cursor.as_deref(),
        crate::transport::paging::MAX_LIMIT,
        crate::transport::paging::MAX_PAGE_BYTES,
    ) {
        for m in page.members {
            seen.insert(m.user);
        }
        match page.next {
            Some(n) if seen.len() < MAX_LISTED_CHANNELS => cursor = Some(n),
            _ => break,
        }
    }
    let items: Vec<String> = seen
        .iter()
        .map(|u| format!("{{\"id\":{}}}", crate::protocol::json::json_string(u)))
        .collect();
    crate::transport::http::json_counted(
        ctx,
        StatusCode::OK,
        format!("{{\"users\":[{}]}}", items.join(",")),
    )
}
