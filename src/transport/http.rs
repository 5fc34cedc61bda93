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
            Body::Full(b) => Pin::new(b).poll_frame(cx),
            Body::Empty => Pin::new(&mut Empty::<Bytes>::new()).poll_frame(cx),
            Body::Sse(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_end_stream(),
            Body::Empty => true,
            Body::Sse(_) => false,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Body::Full(b) => b.size_hint(),
            Body::Empty => http_body::SizeHint::with_exact(0),
            Body::Sse(_) => http_body::SizeHint::default(),
        }
    }
}

/// Routes one request.
pub async fn handle(ctx: Rc<ShardContext>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/ws") => ws::upgrade(ctx, req),
        (&Method::GET, "/sse") => sse::open(ctx, req),
        (&Method::GET, "/healthz") => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
        (&Method::GET, "/readyz") => {
            if ctx.node.shutdown.is_cancelled() {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the node is shutting down",
                )
            } else {
                json(StatusCode::OK, r#"{"status":"ready"}"#.into())
            }
        }
        (_, p) if p.starts_with("/api/") => api::handle(ctx, req).await,
        (_, "/ws" | "/sse" | "/healthz" | "/readyz") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    }
}

/// A JSON response.
pub fn json(status: StatusCode, body: String) -> Response<Body> {
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
