//! The server API for users and channels (API key only): disconnect a user, subscribe or
//! unsubscribe a user server-side, channel info, and `batch` (many commands in one request,
//! run in order). The operations themselves are the transport-neutral [`super::Node`] methods
//! of [`super::users`]; this module is their HTTP face.

use std::borrow::Cow;
use std::fmt::Write as _;

use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;

use super::http::{error, json, Body};
use super::ShardContext;
use crate::auth::Grants;
use crate::protocol::json::{json_string, normalize_data};
use crate::types::{ChannelName, DataKind};

/// Most commands in one batch.
pub const MAX_BATCH: usize = 1000;

/// A refusal: HTTP status, error code, message.
struct Refusal(StatusCode, &'static str, String);

impl Refusal {
    fn bad(message: impl Into<String>) -> Self {
        Refusal(StatusCode::BAD_REQUEST, "bad_request", message.into())
    }

    fn response(&self) -> Response<Body> {
        error(self.0, self.1, &self.2)
    }

    fn json(&self) -> String {
        format!(
            "{{\"error\":{{\"code\":\"{}\",\"message\":{}}}}}",
            self.1,
            json_string(&self.2)
        )
    }
}

#[derive(Deserialize)]
struct UserBody<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
    #[serde(default = "yes")]
    reconnect: bool,
}

fn yes() -> bool {
    true
}

use super::api::PublishBody;

/// One command of a batch: `{"publish":{…}}`, `{"disconnect":{…}}`, …
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum BatchCommand<'a> {
    Publish(#[serde(borrow)] PublishBody<'a>),
    Disconnect(#[serde(borrow)] UserBody<'a>),
    Subscribe(#[serde(borrow)] UserBody<'a>),
    Unsubscribe(#[serde(borrow)] UserBody<'a>),
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    commands: Vec<BatchCommand<'a>>,
}

/// Routes `/api/users/*`, `/api/channels/{channel}` and `/api/batch`.
pub async fn handle<B: super::api::ApiBody>(
    ctx: &ShardContext,
    g: &Grants,
    req: Request<B>,
) -> Response<Body> {
    if !g.is_all() {
        return Refusal(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the server API needs an API key".into(),
        )
        .response();
    }
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if let Some(name) = path.strip_prefix("/api/channels/") {
        if method != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "wrong method for this path",
            );
        }
        let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        return match channel(&name) {
            Ok(ch) => json(StatusCode::OK, channel_info(ctx, &ch)),
            Err(r) => r.response(),
        };
    }
    if method != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "wrong method for this path",
        );
    }
    let body = match super::api::read_body(ctx, req).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    let result = match path.as_str() {
        "/api/users/disconnect" => match parse(&body) {
            Ok(b) => disconnect(ctx, b).await,
            Err(r) => Err(r),
        },
        "/api/users/subscribe" => match parse(&body) {
            Ok(b) => subscribe(ctx, b, true).await,
            Err(r) => Err(r),
        },
        "/api/users/unsubscribe" => match parse(&body) {
            Ok(b) => subscribe(ctx, b, false).await,
            Err(r) => Err(r),
        },
        "/api/batch" => match parse::<BatchBody>(&body) {
            Ok(b) => batch(ctx, b).await,
            Err(r) => Err(r),
        },
        _ => Err(Refusal(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such API path".into(),
        )),
    };
    match result {
        Ok(body) => json(StatusCode::OK, body),
        Err(r) => r.response(),
    }
}

fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, Refusal> {
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_data() {
            "bad_request"
        } else {
            "bad_json"
        };
        Refusal(StatusCode::BAD_REQUEST, code, e.to_string())
    })
}

fn channel(name: &str) -> Result<ChannelName, Refusal> {
    ChannelName::new(name)
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, "invalid_channel", e.to_string()))
}

fn user(name: &str) -> Result<&str, Refusal> {
    if name.is_empty() || name.len() > 256 {
        return Err(Refusal::bad("user must be 1 to 256 bytes"));
    }
    Ok(name)
}

/// `,"nodes":N` when the number of nodes a user command reached is known.
fn nodes(reach: super::users::Reach) -> String {
    reach
        .nodes
        .map_or_else(String::new, |n| format!(",\"nodes\":{n}"))
}

fn refused(e: super::users::UserCommandError) -> Refusal {
    use super::users::UserCommandError;
    let code = match e {
        UserCommandError::Full(_) => "overloaded",
        UserCommandError::NotSent(_) => "unavailable",
    };
    Refusal(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string())
}

/// `{"channel","subscribers","epoch","seq","presence":{"clients","users"}}`: `epoch` only when
/// the node has the channel, `presence` only on a presence channel.
fn channel_info(ctx: &ShardContext, ch: &ChannelName) -> String {
    let info = ctx.node.channel_info(ch);
    let mut out = format!(
        "{{\"channel\":\"{ch}\",\"subscribers\":{}",
        info.subscribers
    );
    match info.position {
        Some(p) => {
            let _ = write!(out, ",\"epoch\":\"{}\",\"seq\":{}", p.epoch, p.seq);
        }
        None => out.push_str(",\"seq\":0"),
    }
    if let Some(p) = info.presence {
        let _ = write!(
            out,
            ",\"presence\":{{\"clients\":{},\"users\":{}}}",
            p.clients, p.users
        );
    }
    out.push('}');
    out
}

async fn disconnect(ctx: &ShardContext, b: UserBody<'_>) -> Result<String, Refusal> {
    let u = user(&b.user)?;
    let reason = b.reason.as_deref().unwrap_or("disconnected by the server");
    if reason.len() > 120 {
        return Err(Refusal::bad("reason must be at most 120 bytes"));
    }
    let reach = ctx
        .node
        .disconnect_user(u, reason, b.reconnect)
        .await
        .map_err(refused)?;
    Ok(format!("{{\"user\":{}{}}}", json_string(u), nodes(reach)))
}

async fn subscribe(ctx: &ShardContext, b: UserBody<'_>, on: bool) -> Result<String, Refusal> {
    let u = user(&b.user)?;
    let Some(name) = b.channel.as_deref() else {
        return Err(Refusal::bad("give a channel"));
    };
    let ch = channel(name)?;
    let reach = if on {
        ctx.node.subscribe_user(u, &ch).await
    } else {
        ctx.node.unsubscribe_user(u, &ch).await
    }
    .map_err(refused)?;
    Ok(format!(
        "{{\"user\":{},\"channel\":\"{ch}\"{}}}",
        json_string(u),
        nodes(reach)
    ))
}

async fn publish(ctx: &ShardContext, b: PublishBody<'_>) -> Result<String, Refusal> {
    let ch = channel(&b.channel)?;
    let cond = crate::engine::idempotency::PublishConditions::checked(
        b.idempotency_key.as_deref(),
        b.expected_seq,
    )
    .map_err(Refusal::bad)?;
    let data = normalize_data(b.data.get());
    let (p, duplicate) = ctx
        .node
        .publish_with(&ch, DataKind::Json, data, cond)
        .await
        .map_err(|e| {
            e.count();
            let status = match e {
                super::PublishError::SeqMismatch(_) => StatusCode::CONFLICT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            Refusal(status, e.code(), e.to_string())
        })?;
    if !duplicate {
        ctx.metrics.published.increment(1);
    }
    Ok(super::api::published_json(&ch, &p, duplicate))
}

/// Runs the commands one after the other (so a channel's publishes keep their order) and
/// answers `{"replies":[{"result":…}|{"error":…},…]}`, one per command: a failed command
/// does not stop the others.
async fn batch(ctx: &ShardContext, b: BatchBody<'_>) -> Result<String, Refusal> {
    if b.commands.is_empty() || b.commands.len() > MAX_BATCH {
        return Err(Refusal::bad(format!("give 1 to {MAX_BATCH} commands")));
    }
    let mut out = String::from("{\"replies\":[");
    for (i, c) in b.commands.into_iter().enumerate() {
        let r = match c {
            BatchCommand::Publish(p) => publish(ctx, p).await,
            BatchCommand::Disconnect(u) => disconnect(ctx, u).await,
            BatchCommand::Subscribe(u) => subscribe(ctx, u, true).await,
            BatchCommand::Unsubscribe(u) => subscribe(ctx, u, false).await,
        };
        if i > 0 {
            out.push(',');
        }
        match r {
            Ok(result) => {
                let _ = write!(out, "{{\"result\":{result}}}");
            }
            Err(e) => out.push_str(&e.json()),
        }
    }
    out.push_str("]}");
    Ok(out)
}
