//! The pipelining front of an HTTP/1 connection. hyper answers a connection's requests one at
//! a time: it does not parse the next request until the previous answer is written. With a
//! remote backplane every publish waits for the store's round trip, so a publisher pipelining
//! on one connection would get one publish per round trip. The front reads the connection
//! first: while its requests are simple API requests (see [`parse`]) it reads each one whole,
//! starts its handler in request order, keeps up to [`DEPTH`] of them in flight and writes
//! their answers in request order, every answer that is ready in one write. On the first other
//! request (an upgrade, SSE, a path outside `/api/`, a malformed or oversize head, HTTP/1.0,
//! a chunked body, `Expect`, ...) it waits for the answers in flight, then hands the
//! connection with the bytes it read ahead to hyper, which serves the rest exactly as before
//! (and gives a malformed head its usual 400 or 431).
//!
//! Order: handlers are started (first polled) in request order, and a publish hands its
//! message to the backplane before its first await (the engine sequences at once; Redis sends
//! the script on the first poll; NATS queues the message on the channel's batch), so two
//! publishes of one connection to one channel are sequenced in request order.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::rc::Rc;
use std::task::Poll;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::future::{self, Either};
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE};
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::limits::{refused, Cause};
use crate::transport::http::{self, Body};
use crate::transport::{Peer, ShardContext};

/// Most requests of one connection in flight at once: enough to cover a store's round trip
/// at a publisher's full rate, few enough that a connection holds little.
pub const DEPTH: usize = 128;

/// Most body bytes of one connection's requests in flight at once (a request is always taken
/// when none is in flight, so a body up to `--max-message-size` still goes).
pub const DEPTH_BYTES: usize = 1 << 20;

/// Most body bytes of the requests in flight on a shard's connections, past the first of each
/// connection (which hyper would hold too): what pipelining adds to a node is bounded by
/// shards × this, whatever the number of connections.
pub const SHARD_BYTES: usize = 64 << 20;

thread_local! {
    /// Body bytes in flight past each connection's first, on this shard (one thread).
    static SHARD_HELD: Cell<usize> = const { Cell::new(0) };
}

/// The body bytes of one connection's requests in flight: counted in the shard's total while
/// there, given back when answered or when the connection goes.
#[derive(Default)]
struct Held {
    bytes: usize,
    /// Of `bytes`, those counted in [`SHARD_HELD`].
    shared: usize,
}

impl Held {
    /// Takes `n` more bytes if the connection and the shard have room (always with nothing in
    /// flight, uncounted by the shard): how many of them the shard counts.
    fn take(&mut self, n: usize, idle: bool) -> Option<usize> {
        if idle {
            self.bytes += n;
            return Some(0);
        }
        if self.bytes + n > DEPTH_BYTES || SHARD_HELD.get() + n > SHARD_BYTES {
            return None;
        }
        self.bytes += n;
        self.shared += n;
        SHARD_HELD.set(SHARD_HELD.get() + n);
        Some(n)
    }

    /// Gives back what [`Held::take`] took: `n` bytes, `shared` of them the shard's.
    fn give_back(&mut self, (n, shared): (usize, usize)) {
        self.bytes -= n;
        self.shared -= shared;
        SHARD_HELD.set(SHARD_HELD.get() - shared);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        SHARD_HELD.set(SHARD_HELD.get() - self.shared);
    }
}

/// Whether a request may share the connection with others in flight: publishes and
/// broadcasts, whose answers are small. Any other (reads with answers up to a page of 1 MiB,
/// server API commands) runs alone, as through hyper: taken when nothing is in flight, and
/// nothing is taken after it until it is answered.
fn pipelines(req: &Request<()>) -> bool {
    req.method() == Method::POST && matches!(req.uri().path(), "/api/publish" | "/api/broadcast")
}

/// Most headers in a head the front takes; a head with more goes to hyper (whose limit is the
/// same, and whose answer is 431).
const MAX_HEADERS: usize = 100;

/// What a connection's buffer starts with.
// Made and taken apart at once, on the stack: boxing the request buys an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Head {
    /// A simple API request: its head is `head_len` bytes, its body `body_len` (not
    /// necessarily all read yet).
    Simple {
        req: Request<()>,
        head_len: usize,
        body_len: usize,
    },
    /// Not a whole head yet.
    Partial,
    /// Anything else: hyper serves it.
    Other,
}

/// Reads the head at the start of `buf`. Simple: HTTP/1.1, a path under `/api/`, a method
/// other than HEAD, CONNECT and TRACE, a `Content-Length` body (or none) of at most
/// `max_body` bytes, no `Transfer-Encoding`, `Upgrade` or `Expect`, no `Connection` but
/// `keep-alive`, a head of at most `max_head` bytes and [`MAX_HEADERS`] headers, every name
/// and value valid.
pub(crate) fn parse(buf: &[u8], max_head: usize, max_body: usize) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Head::Partial,
        _ => return Head::Other,
    };
    let (Some(method), Some(path), Some(1)) = (r.method, r.path, r.version) else {
        return Head::Other;
    };
    let method = match Method::from_bytes(method.as_bytes()) {
        Ok(m) if ![Method::HEAD, Method::CONNECT, Method::TRACE].contains(&m) => m,
        _ => return Head::Other,
    };
    if !path.starts_with("/api/") {
        return Head::Other;
    }
    let Ok(mut req) = Request::builder()
        .method(method)
        .uri(path)
        .version(Version::HTTP_11)
        .body(())
    else {
        return Head::Other;
    };
    // Sized once for the head's headers rather than grown as they are appended.
    *req.headers_mut() = hyper::HeaderMap::with_capacity(r.headers.len());
    let mut body_len = None;
    for h in r.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return Head::Other;
        }
        if name.eq_ignore_ascii_case("connection")
            && !h.value.trim_ascii().eq_ignore_ascii_case(b"keep-alive")
        {
            return Head::Other;
        }
        if name.eq_ignore_ascii_case("content-length") {
            match (body_len, content_length(h.value)) {
                (None, Some(n)) if n <= max_body => body_len = Some(n),
                _ => return Head::Other,
            }
        }
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Head::Other;
        };
        req.headers_mut().append(name, value);
    }
    Head::Simple {
        req,
        head_len,
        body_len: body_len.unwrap_or(0),
    }
}

/// A `Content-Length` value: decimal digits only.
fn content_length(v: &[u8]) -> Option<usize> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Serves `io`'s requests while they are simple ([`parse`]). `None`: the connection is done
/// (closed by either side, timed out, or failed); `Some(bytes)`: hyper serves the rest of it,
/// starting with `bytes`. `deadline` is the first request's (`--handshake-timeout`);
/// `started` is set once a request's head is in.
pub(crate) async fn serve<I>(
    ctx: &Rc<ShardContext>,
    io: &mut I,
    peer: &Peer,
    deadline: Instant,
    started: &Cell<bool>,
) -> Option<Bytes>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = ctx.config();
    let (max_head, max_body) = (cfg.max_header_size, cfg.max_message_size);
    let shutdown = ctx.node.shutdown.clone();
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut inflight = FuturesOrdered::new();
    // Body bytes of the requests in flight.
    let mut held = Held::default();
    // A request that runs alone ([`pipelines`]) is in flight.
    let mut alone = false;
    // A request for hyper is next in `buf`.
    let mut other = false;
    // No more requests: answer those in flight, then close.
    let mut closing = false;
    let mut eof = false;
    // When the next head must be in: the first request's deadline, then the keep-alive
    // timeout from when the connection went idle (hyper's header read timeout).
    let mut head_by = deadline;
    // When the body of the request next in `buf` started to be waited for.
    let mut body_since: Option<Instant> = None;
    loop {
        // Start every whole simple request the buffer holds, while there is room.
        let mut need_more = false;
        alone &= !inflight.is_empty();
        while !other && !closing && !alone && inflight.len() < DEPTH {
            let (req, head_len, body_len) = match parse(&buf, max_head, max_body) {
                Head::Other => {
                    other = true;
                    break;
                }
                Head::Partial => {
                    need_more = true;
                    break;
                }
                Head::Simple {
                    req,
                    head_len,
                    body_len,
                } => (req, head_len, body_len),
            };
            started.set(true);
            let pipelined = pipelines(&req);
            if !inflight.is_empty() && !pipelined {
                break;
            }
            if buf.len() < head_len + body_len {
                body_since.get_or_insert_with(Instant::now);
                need_more = true;
                break;
            }
            let Some(shared) = held.take(body_len, inflight.is_empty()) else {
                break;
            };
            alone = !pipelined;
            body_since = None;
            buf.advance(head_len);
            let body = buf.split_to(body_len).freeze();
            let mut req = req.map(|()| Full::new(body));
            req.extensions_mut().insert(peer.clone());
            let ctx = ctx.clone();
            inflight.push_back(Either::Left(async move {
                ((body_len, shared), http::handle_api(ctx, req).await)
            }));
        }
        if need_more && eof {
            closing = true;
        }
        if !out.is_empty() {
            if io.write_all(&out).await.is_err() {
                return None;
            }
            // A large answer's buffer is not kept for the connection's life.
            if out.capacity() > READ_CHUNK * 8 {
                out = BytesMut::new();
            } else {
                out.clear();
            }
            if inflight.is_empty() {
                head_by = Instant::now() + cfg.keepalive_timeout;
            }
            continue;
        }
        if inflight.is_empty() {
            if closing {
                let _ = io.shutdown().await;
                return None;
            }
            if other {
                return Some(buf.freeze());
            }
        }
        let timer = match body_since {
            Some(since) if !closing => Some(since + cfg.body_timeout),
            _ if inflight.is_empty() && !closing => Some(head_by),
            _ => None,
        };
        if need_more && buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            () = drain(&mut inflight, &mut out, &mut held, &mut closing), if !inflight.is_empty() => {}
            r = io.read_buf(&mut buf), if need_more && !eof && !closing => match r {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(_) => return None,
            },
            () = sleep_until(timer), if timer.is_some() => {
                if body_since.take().is_some() {
                    // Answered after those in flight; nothing after it is read.
                    let res = crate::transport::api::body_timed_out(cfg.body_timeout);
                    inflight.push_back(Either::Right(future::ready(((0, 0), res))));
                    closing = true;
                } else {
                    if !started.get() {
                        refused(Cause::HandshakeTimeout, "first request headers");
                    }
                    return None;
                }
            }
            () = shutdown.cancelled(), if !closing => closing = true,
        }
    }
}

/// A connection after the front: its first reads are the bytes the front read ahead (plain
/// TCP has its own, [`crate::transport::io::TimedIo::read_ahead`], which a WebSocket upgrade
/// keeps).
pub(crate) struct Rewind<I> {
    pre: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(io: I, pre: Bytes) -> Rewind<I> {
        Rewind { pre, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pre.is_empty() {
            return std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.pre.len().min(buf.remaining());
        buf.put_slice(&this.pre.split_to(n));
        if this.pre.is_empty() {
            // An empty slice would still pin the front's buffer for the connection's life.
            this.pre = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Bytes the front reads at a time.
const READ_CHUNK: usize = 8 * 1024;

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Waits for the next answer in order, then takes it and every one after it that is ready
/// too into `out`. After an answer that closes the connection nothing more is written.
async fn drain<F>(
    inflight: &mut FuturesOrdered<F>,
    out: &mut BytesMut,
    held: &mut Held,
    closing: &mut bool,
) where
    F: std::future::Future<Output = ((usize, usize), Response<Body>)>,
{
    let mut closed = false;
    std::future::poll_fn(|cx| {
        let mut any = false;
        while let Poll::Ready(Some((len, res))) = inflight.poll_next_unpin(cx) {
            held.give_back(len);
            any = true;
            if !closed && encode(res, out) {
                closed = true;
            }
        }
        if any {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    if closed {
        *closing = true;
    }
}

/// Writes `res` as HTTP/1.1 into `out`, framed as hyper frames it (`content-length`, and
/// `date` when the answer has none); whether it closes the connection (`connection: close`).
pub(crate) fn encode(res: Response<Body>, out: &mut BytesMut) -> bool {
    let (parts, body) = res.into_parts();
    let body = match body {
        Body::Full(b) | Body::Counted(b, _) => whole(b),
        Body::Empty => Bytes::new(),
        // No API route answers with a stream.
        Body::Sse(_) => {
            let mut res = http::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "a stream cannot be answered here",
            );
            res.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return encode(res, out);
        }
    };
    let status = parts.status;
    let _ = write!(
        Writer(out),
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if !bodiless && !parts.headers.contains_key(CONTENT_LENGTH) {
        let _ = write!(Writer(out), "content-length: {}\r\n", body.len());
    }
    if !parts.headers.contains_key(DATE) {
        out.put_slice(b"date: ");
        now_date(|d| out.put_slice(d.as_bytes()));
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    if !bodiless {
        out.put_slice(&body);
    }
    parts
        .headers
        .get(CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

/// The bytes of a whole body (ready at once: it is in memory, in one frame or none; taken
/// without the list `collect` would allocate).
fn whole(mut b: Full<Bytes>) -> Bytes {
    b.frame()
        .now_or_never()
        .flatten()
        .and_then(Result::ok)
        .and_then(|f| f.into_data().ok())
        .unwrap_or_default()
}

/// `fmt::Write` into a `BytesMut`.
struct Writer<'a>(&'a mut BytesMut);

impl std::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

thread_local! {
    /// The current second's `date` value, made once a second per shard.
    static DATE_NOW: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

fn now_date(f: impl FnOnce(&str)) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE_NOW.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            *d = (secs, http_date(secs));
        }
        f(&d.1);
    });
}

/// An HTTP date (IMF-fixdate, RFC 9110 §5.6.7) of `secs` since the Unix epoch.
pub(crate) fn http_date(secs: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MAX_HEAD: usize = 16 * 1024;
    const MAX_BODY: usize = 64 * 1024;

    fn simple(buf: &[u8]) -> (Request<()>, usize, usize) {
        match parse(buf, MAX_HEAD, MAX_BODY) {
            Head::Simple {
                req,
                head_len,
                body_len,
            } => (req, head_len, body_len),
            other => panic!("not simple: {other:?}"),
        }
    }

    fn is_other(buf: &[u8]) -> bool {
        matches!(parse(buf, MAX_HEAD, MAX_BODY), Head::Other)
    }

    #[test]
    fn a_publish_with_a_length_is_simple_and_framed_by_it() {
        let head = b"POST /api/publish?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer k\r\nContent-Length: 5\r\n\r\n";
        let mut buf = head.to_vec();
        buf.extend_from_slice(b"hello GET ");
        let (req, head_len, body_len) = simple(&buf);
        assert_eq!((head_len, body_len), (head.len(), 5));
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri().path(), "/api/publish");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.headers()["authorization"], "Bearer k");
        let (_, _, none) = simple(b"GET /api/channels HTTP/1.1\r\nConnection: Keep-Alive\r\n\r\n");
        assert_eq!(none, 0, "no length: no body");
    }

    #[test]
    fn a_head_in_pieces_is_partial_until_whole() {
        let head = b"POST /api/publish HTTP/1.1\r\nContent-Length: 2\r\n\r\n";
        for cut in 0..head.len() {
            assert!(
                matches!(parse(&head[..cut], MAX_HEAD, MAX_BODY), Head::Partial),
                "cut at {cut}"
            );
        }
        simple(head);
    }

    #[test]
    fn everything_but_a_plain_api_request_goes_to_hyper() {
        for buf in [
            &b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"[..],
            b"GET /sse HTTP/1.1\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n\r\n",
            b"GET /api/channels HTTP/1.0\r\n\r\n",
            b"HEAD /api/channels HTTP/1.1\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nContent-Length: +2\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
            b"GARBAGE\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(is_other(buf), "{}", String::from_utf8_lossy(buf));
        }
    }

    #[test]
    fn a_head_past_the_header_cap_goes_to_hyper_whole_or_not() {
        let mut big = b"GET /api/channels HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert!(is_other(&big), "partial, and already over the cap");
        big.extend_from_slice(b"\r\n\r\n");
        assert!(is_other(&big), "whole, and over the cap");
        let mut many = b"GET /api/channels HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(is_other(&many), "too many headers");
    }

    #[test]
    fn an_answer_is_framed_by_its_length_and_dated() {
        let mut out = BytesMut::new();
        let close = encode(http::json(StatusCode::OK, "{\"a\":1}".into()), &mut out);
        assert!(!close);
        let text = String::from_utf8(out.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "{\"a\":1}");
        let mut lines = head.split("\r\n");
        assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"));
        let rest: Vec<_> = lines.collect();
        assert!(rest.contains(&"content-type: application/json"));
        assert!(rest.contains(&"content-length: 7"));
        assert!(rest
            .iter()
            .any(|l| l.starts_with("date: ") && l.ends_with(" GMT")));
    }

    #[test]
    fn a_bodiless_status_has_no_length_and_a_close_is_reported() {
        let mut out = BytesMut::new();
        let mut res = Response::new(Body::Empty);
        *res.status_mut() = StatusCode::NO_CONTENT;
        assert!(!encode(res, &mut out));
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(!text.contains("content-length"));
        assert!(text.ends_with("\r\n\r\n"));
        let mut out = BytesMut::new();
        let res = crate::transport::api::body_timed_out(std::time::Duration::from_secs(1));
        assert!(encode(res, &mut out), "the 408 closes");
    }

    #[test]
    fn only_publishes_and_broadcasts_share_the_connection() {
        let req = |head: &[u8]| simple(head).0;
        assert!(pipelines(&req(b"POST /api/publish HTTP/1.1\r\n\r\n")));
        assert!(pipelines(&req(b"POST /api/broadcast HTTP/1.1\r\n\r\n")));
        assert!(!pipelines(&req(b"GET /api/history/a HTTP/1.1\r\n\r\n")));
        assert!(!pipelines(&req(b"POST /api/batch HTTP/1.1\r\n\r\n")));
        assert!(!pipelines(&req(b"GET /api/publish HTTP/1.1\r\n\r\n")));
    }

    #[test]
    fn bodies_past_a_connections_first_take_room_of_the_connection_and_the_shard() {
        let mut a = Held::default();
        assert_eq!(a.take(DEPTH_BYTES, true), Some(0), "the first always goes");
        assert_eq!(a.take(1, false), None, "the connection is full");
        a.give_back((DEPTH_BYTES, 0));
        let mut others: Vec<Held> = Vec::new();
        while SHARD_HELD.get() + DEPTH_BYTES <= SHARD_BYTES {
            let mut h = Held::default();
            assert_eq!(h.take(10, true), Some(0));
            assert_eq!(h.take(DEPTH_BYTES - 10, false), Some(DEPTH_BYTES - 10));
            others.push(h);
        }
        assert_eq!(a.take(5, true), Some(0));
        let left = SHARD_BYTES - SHARD_HELD.get();
        assert_eq!(a.take(left + 1, false), None, "the shard is full");
        assert_eq!(a.take(left, false), Some(left));
        drop(others);
        a.give_back((left, left));
        assert_eq!(
            SHARD_HELD.get(),
            0,
            "a connection gone gives its share back"
        );
        assert_eq!(a.take(DEPTH_BYTES - 5, false), Some(DEPTH_BYTES - 5));
        drop(a);
        assert_eq!(SHARD_HELD.get(), 0);
    }

    #[test]
    fn http_dates_are_imf_fixdates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(951_825_600), "Tue, 29 Feb 2000 12:00:00 GMT");
        assert_eq!(http_date(1_798_761_599), "Thu, 31 Dec 2026 23:59:59 GMT");
    }
}
