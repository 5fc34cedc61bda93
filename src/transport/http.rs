//! The HTTP router: one hyper service per connection, dispatching by path.

use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Frame;
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use super::{api, sse, ws, ShardContext};

/// Response body of every route. Not `Send`: SSE bodies hold the shard's `Rc` state, and
/// hyper's HTTP/1 connections run on the shard that owns them.
pub enum Body {
    /// A whole body.
    Full(Full<Bytes>),
    /// A whole body counted in the shard's memory gauge until it is sent (or dropped).
    Counted(Full<Bytes>, Counted),
    /// No body (101 upgrades).
    Empty,
    /// An event stream.
    Sse(Box<sse::SseBody>),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) | Body::Counted(b, _) => Pin::new(b).poll_frame(cx),
            Body::Empty => Pin::new(&mut Empty::<Bytes>::new()).poll_frame(cx),
            Body::Sse(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) | Body::Counted(b, _) => b.is_end_stream(),
            Body::Empty => true,
            Body::Sse(_) => false,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Body::Full(b) | Body::Counted(b, _) => b.size_hint(),
            Body::Empty => http_body::SizeHint::with_exact(0),
            Body::Sse(_) => http_body::SizeHint::default(),
        }
    }
}

/// Bytes of an answer held for a client, in the shard's gauge of pending responses (what the
/// memory meter counts as `responses`): added when built, taken back when dropped.
pub struct Counted {
    gauge: crate::engine::outbox::Gauge,
    bytes: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.set(self.gauge.get().saturating_sub(self.bytes));
    }
}

/// A JSON response counted as a pending answer until it is gone (the API's large answers:
/// history, presence, channels).
pub fn json_counted(ctx: &ShardContext, status: StatusCode, body: String) -> Response<Body> {
    let bytes = body.len();
    ctx.responses.set(ctx.responses.get() + bytes);
    ctx.report_memory();
    let counted = Counted {
        gauge: ctx.responses.clone(),
        bytes,
    };
    let mut res = Response::new(Body::Counted(Full::new(Bytes::from(body)), counted));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// The answer to a new SSE stream the session core did not admit
/// ([`super::session::on_connect`], which counted it): 503 `overloaded`.
pub fn overloaded(_: super::session::OverBudget) -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        super::session::OverBudget::CODE,
        &crate::engine::Overloaded::Memory.to_string(),
    )
}

/// Routes one request. Every response names the shard that served it (`x-relay-shard`), which
/// is how tests and operators see the kernel's `SO_REUSEPORT` spread.
pub async fn handle(ctx: Rc<ShardContext>, req: Request<Incoming>) -> Response<Body> {
    guard(ctx, req, route).await
}

/// Routes an `/api/` request the pipelining front (`server::front`) read whole: the same
/// answer [`handle`] gives it.
pub async fn handle_api<B: api::ApiBody>(ctx: Rc<ShardContext>, req: Request<B>) -> Response<Body> {
    guard(ctx, req, api::handle).await
}

/// Made at compile time: a name given as a string would be copied into each answer.
const X_RELAY_SHARD: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-relay-shard");

/// What every route shares: the Origin check and CORS of the browser-facing paths, and the
/// `x-relay-shard` header.
async fn guard<B, F, R>(ctx: Rc<ShardContext>, req: Request<B>, route: R) -> Response<Body>
where
    R: FnOnce(Rc<ShardContext>, Request<B>) -> F,
    F: std::future::Future<Output = Response<Body>>,
{
    let shard = ctx.shard_header.clone();
    let origin = req.headers().get(hyper::header::ORIGIN).cloned();
    let path = req.uri().path();
    let guarded =
        path == "/ws" || path == "/sse" || path.starts_with("/api/") || path.starts_with("/app/");
    let mut res = match origin.as_ref() {
        Some(o) if guarded && !origin_allowed(&ctx.config().allowed_origin, o) => {
            crate::limits::refused(crate::limits::Cause::Origin, o.to_str().unwrap_or("?"));
            error(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                "this Origin is not allowed here (see --allowed-origin)",
            )
        }
        Some(_) if guarded && req.method() == Method::OPTIONS => preflight(),
        _ => route(ctx.clone(), req).await,
    };
    if let (true, Some(o)) = (guarded, origin) {
        if res.status() != StatusCode::FORBIDDEN || ctx.config().allowed_origin.is_empty() {
            cors(&ctx.config().allowed_origin, o, &mut res);
        }
    }
    res.headers_mut().insert(X_RELAY_SHARD, shard);
    res
}

/// Whether a browser page of `origin` may use the relay: any when the list is empty.
fn origin_allowed(allowed: &[String], origin: &HeaderValue) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
}

/// CORS headers for an allowed `origin`: `*` when every origin is allowed, else the origin
/// itself (and `Vary: Origin`, so caches keep one answer per origin).
fn cors(allowed: &[String], origin: HeaderValue, res: &mut Response<Body>) {
    let h = res.headers_mut();
    if allowed.is_empty() || allowed.iter().any(|a| a == "*") {
        h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    } else {
        h.insert("access-control-allow-origin", origin);
        h.append(hyper::header::VARY, HeaderValue::from_static("origin"));
    }
}

/// The answer to a CORS preflight (`OPTIONS`) of an allowed origin.
fn preflight() -> Response<Body> {
    let mut res = Response::new(Body::Empty);
    *res.status_mut() = StatusCode::NO_CONTENT;
    let h = res.headers_mut();
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("authorization, content-type, last-event-id"),
    );
    h.insert("access-control-max-age", HeaderValue::from_static("600"));
    res
}

async fn route(ctx: Rc<ShardContext>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/ws") => ws::upgrade(ctx, req),
        (&Method::GET, "/sse") => sse::open(ctx, req).await,
        (&Method::GET, "/metrics") => {
            match crate::metrics::render(|| super::engine_figures(&ctx.node.engine)) {
                Some(text) => {
                    let mut res = Response::new(Body::Full(Full::new(Bytes::from(text))));
                    res.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    res
                }
                None => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "metrics are not enabled",
                ),
            }
        }
        (&Method::GET, "/healthz") => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
        (&Method::GET, "/readyz") => {
            if ctx.node.is_leaving() {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the node is draining or shutting down",
                )
            } else if !ctx.node.is_ready() {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "backplane_unavailable",
                    "the backplane cannot be reached: publishes fail until it is back",
                )
            } else {
                json(StatusCode::OK, r#"{"status":"ready"}"#.into())
            }
        }
        (_, p) if p.starts_with("/api/") => api::handle(ctx, req).await,
        (_, p) if p == "/admin" || p.starts_with("/admin/") => super::admin::handle(ctx, req).await,
        (&Method::GET, p) if p.starts_with("/app/") => super::pusher::ws::upgrade(ctx, req),
        (_, p) if p.starts_with("/apps/") => super::pusher::api::handle(ctx, req).await,
        (_, "/ws" | "/sse" | "/healthz" | "/readyz") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ),
        (&Method::GET, p) if ctx.config().demo && super::demo::is_demo_path(p) => {
            super::demo::serve(p)
        }
        (&Method::GET, p) if super::landing::is_landing_path(p) => {
            super::landing::serve(p, req.headers(), ctx.node.admin.is_some())
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    }
}

/// The per-IP slot a WebSocket or SSE request holds while it lasts ([`super::Node::stream_slot`]),
/// or the 429 of a client that has too many connections.
// The error is the response itself, built once per refused request: boxing it buys nothing.
#[allow(clippy::result_large_err)]
pub fn stream_slot<B>(
    ctx: &ShardContext,
    req: &Request<B>,
) -> Result<Option<std::sync::Arc<crate::limits::IpGuard>>, Response<Body>> {
    ctx.node
        .stream_slot(req.extensions().get::<super::Peer>(), req.headers())
        .map_err(|ip| {
            crate::limits::refused(crate::limits::Cause::IpLimit, &ip.to_string());
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                "this address has the most connections allowed (--max-connections-per-ip)",
            )
        })
}

/// A JSON response.
pub fn json(status: StatusCode, mut body: String) -> Response<Body> {
    // A `Bytes` made of a full buffer needs no shared header of its own (one allocation less
    // per answer); shrinking a little is done in place.
    body.shrink_to_fit();
    let mut res = Response::new(Body::Full(Full::new(Bytes::from(body))));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// An error response: `{"error":{"code","message"}}`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        format!(
            "{{\"error\":{{\"code\":\"{code}\",\"message\":{}}}}}",
            crate::protocol::json::json_string(message)
        ),
    )
}
