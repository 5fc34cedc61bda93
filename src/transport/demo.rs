//! The demo (`relay serve --demo`): a page with live cursors and a presence list in the channel
//! `presence:demo`, and the JS client it loads. Both are compiled into the binary, so the demo
//! needs nothing but the binary.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;

use super::http::Body;

/// The demo page.
pub const INDEX_HTML: &str = include_str!("../../clients/demo/index.html");
/// The JS client bundle (`clients/js/dist/relay.js`, built by `tsc`).
pub const RELAY_JS: &str = include_str!("../../clients/js/dist/relay.js");

/// Whether `path` is one of the demo's.
pub fn is_demo_path(path: &str) -> bool {
    matches!(path, "/" | "/demo" | "/demo/" | "/demo/relay.js")
}

/// Answers a demo path (see [`is_demo_path`]).
pub fn serve(path: &str) -> Response<Body> {
    let (body, kind) = if path == "/demo/relay.js" {
        (RELAY_JS, "text/javascript; charset=utf-8")
    } else {
        (INDEX_HTML, "text/html; charset=utf-8")
    };
    let mut res = Response::new(Body::Full(Full::new(Bytes::from_static(body.as_bytes()))));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}
