//! What `GET /` answers when `--demo` is off: a short page for browsers (what this server is,
//! its version, where to go next), a JSON index for everything else (`curl`, scripts); plus
//! `/favicon.ico` and `/docs/protocol.md` (the wire contract of this very version), all
//! compiled into the binary.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::http::{json, Body};

/// The tab icon of the landing page and the demo.
pub const FAVICON: &[u8] = include_bytes!("../../clients/demo/favicon.ico");
/// The protocol reference, served as `/docs/protocol.md`.
pub const PROTOCOL_MD: &str = include_str!("../../docs/protocol.md");

/// The places the index points to: (path, what it is). A new page of the relay (an admin UI,
/// say) adds a line here.
const LINKS: &[(&str, &str)] = &[
    ("/healthz", "liveness: 200 while the process runs"),
    (
        "/readyz",
        "readiness: 503 while shutting down or without the backplane",
    ),
    ("/metrics", "Prometheus metrics"),
    (
        "/docs/protocol.md",
        "the wire protocol: commands, events, error and close codes",
    ),
    ("/ws", "WebSocket endpoint (JSON or relay.v1.bin)"),
    ("/sse?channel=news", "Server-Sent Events endpoint"),
    ("/api/publish", "HTTP API: POST {\"channel\",\"data\"}"),
];

/// The admin UI's line, listed only when it is on (`--admin-password` or `--admin-token`).
const ADMIN_LINK: (&str, &str) = ("/admin", "admin UI: nodes, channels, rates, publish");

/// Whether `path` is one of this module's.
pub fn is_landing_path(path: &str) -> bool {
    matches!(path, "/" | "/favicon.ico" | "/docs/protocol.md")
}

/// Answers a path of [`is_landing_path`]; `admin`: the admin UI is on.
pub fn serve(path: &str, headers: &HeaderMap, admin: bool) -> Response<Body> {
    let links = || LINKS.iter().chain(admin.then_some(&ADMIN_LINK));
    match path {
        "/favicon.ico" => fixed(Bytes::from_static(FAVICON), "image/x-icon", "max-age=86400"),
        "/docs/protocol.md" => fixed(
            Bytes::from_static(PROTOCOL_MD.as_bytes()),
            "text/markdown; charset=utf-8",
            "no-cache",
        ),
        _ if wants_html(headers) => {
            let page = page(host(headers).unwrap_or("127.0.0.1:8080"), links());
            fixed(Bytes::from(page), "text/html; charset=utf-8", "no-cache")
        }
        _ => json(StatusCode::OK, index(links())),
    }
}

/// Browsers name `text/html` in `Accept`; `curl` sends `*/*` and gets the JSON index.
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

/// The `Host` the client used, when it is a plain host\[:port\] (it goes into the page).
fn host(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get(hyper::header::HOST)?.to_str().ok()?;
    let plain = h
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    (plain && !h.is_empty() && h.len() <= 255).then_some(h)
}

/// A whole body of `kind` with `Cache-Control: cache`.
pub(super) fn fixed(body: Bytes, kind: &'static str, cache: &'static str) -> Response<Body> {
    let mut res = Response::new(Body::Full(Full::new(body)));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static(cache));
    res
}

/// `{"name":"relay","version":…,"links":{path: what},"demo":…}`.
fn index<'a>(links: impl Iterator<Item = &'a (&'a str, &'a str)>) -> String {
    let links: serde_json::Map<String, serde_json::Value> = links
        .map(|(path, what)| ((*path).to_owned(), (*what).into()))
        .collect();
    serde_json::json!({
        "name": "relay",
        "version": env!("CARGO_PKG_VERSION"),
        "links": links,
        "demo": "restart with `relay serve --demo` for a live demo on this page",
    })
    .to_string()
}

fn page<'a>(host: &str, links: impl Iterator<Item = &'a (&'a str, &'a str)>) -> String {
    let links: String = links
        .map(|(path, what)| {
            format!(
                "<li><a href=\"{path}\"><code>{path}</code></a> {}</li>\n",
                what.replace('<', "&lt;")
            )
        })
        .collect();
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>relay {version}</title>
<style>
  body {{ font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; max-width: 720px; margin: 40px auto; padding: 0 16px; }}
  h1 {{ font-size: 22px; margin-bottom: 0; }} .v {{ color: #6b7385; font-size: 14px; }}
  code, pre {{ font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f0f3f8; border-radius: 4px; padding: 1px 4px; }}
  pre {{ padding: 10px 12px; overflow: auto; }} li {{ margin: 4px 0; }}
</style>
</head>
<body>
<h1>relay <span class="v">{version}</span></h1>
<p>This is a relay node: it is running. Browsers and apps subscribe to channels over WebSocket or
Server-Sent Events; backends publish over HTTP; every subscriber gets every message, in order,
and resumes after a reconnect with nothing lost.</p>
<p><b>See it live:</b> restart it with <code>relay serve --demo</code> and open this page in two
tabs: live cursors and presence.</p>
<p><b>Try it from a terminal:</b></p>
<pre># in one terminal: subscribe
curl -N 'http://{host}/sse?channel=news'
# in another: publish
curl -X POST http://{host}/api/publish -d '{{"channel":"news","data":"hi"}}'</pre>
<ul>
{links}</ul>
</body>
</html>
"#,
        version = env!("CARGO_PKG_VERSION"),
    )
}
