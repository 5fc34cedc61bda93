//! Safe at the edge (issue 11, part 2): HTTP time bounds, the second server on a port, the
//! drain on SIGTERM, the RFC 6455 handshake, clients behind proxies (PROXY protocol, trusted
//! X-Forwarded-For), API rate limits and the accept error log. Each test reproduces a row of
//! the issue against the real binary and asserts the bound; waits are scaled down by flags.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    api_get, assert_http_error, head_of, read_until_closed, refused_count, sample, RawWs, Relay,
    Sse, Ws, BIN,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// A connection with a small receive buffer (set before connecting, so the window stays
/// small): a client that stops reading stalls the server's writes quickly.
async fn small_window(addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    tokio::time::timeout(common::RECV_TIMEOUT, sock.connect(addr))
        .await
        .unwrap()
        .unwrap()
}

/// A WebSocket upgrade request for `/ws` with extra header lines.
fn upgrade_request(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// The status line of a WebSocket upgrade with `extra` header lines, and the connection.
async fn upgrade(addr: SocketAddr, extra: &str) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = head_of(&mut s, &upgrade_request(extra)).await;
    (head.lines().next().unwrap_or("").to_owned(), s)
}

/// 60 KB of JSON string.
fn big() -> serde_json::Value {
    json!("x".repeat(60_000))
}

// ---------------------------------------------------------------------------------------------
// Item 4: time bounds
// ---------------------------------------------------------------------------------------------

/// `Content-Length: 60000` and one byte: 408 at the body timeout, and the connection closed.
#[tokio::test]
async fn a_slow_request_body_is_cut_at_the_body_timeout() {
    let relay = Relay::start(&["--body-timeout", "1s"]);
    let mut s = TcpStream::connect(relay.addr()).await.unwrap();
    let t0 = Instant::now();
    s.write_all(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 60000\r\n\r\n{",
    )
    .await
    .unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("the connection is closed after the body timeout");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert!(refused_count(&relay.scrape().await, "body_timeout") >= 1);
    // Everyone else is served meanwhile and after.
    relay.publish("after", json!(1)).await;
}

/// An answer the server has handed whole to its socket (no write of ours waits on it) while
/// the client reads nothing: the kernel resets the connection at the write timeout too
/// (`TCP_USER_TIMEOUT`), so the megabyte it holds does not wait for the keep-alive timeout.
#[tokio::test]
async fn an_answer_left_in_the_kernel_is_dropped_at_the_write_timeout() {
    let relay = Relay::start(&["--write-timeout", "2s", "--history-size", "100"]);
    for _ in 0..100 {
        relay.publish("big", big()).await;
    }
    let mut s = small_window(relay.addr()).await;
    s.write_all(b"GET /api/history/big?since=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let got = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("the connection was reset, not kept for the keep-alive timeout");
    assert!(
        got.len() < 500_000,
        "{} bytes of the ~1 MB answer reached the client after the reset",
        got.len()
    );
}

/// 15 pipelined `GET /api/history/…?since=0` (1 MiB pages of 6 MB of history) on 4 connections
/// that never read: each connection is reset at the write timeout, and the answers it held are
/// freed (the relay's own count of pending responses, `relay_memory_bytes{kind="responses"}`,
/// goes back to zero; RSS is printed for the record).
#[tokio::test]
async fn responses_nobody_reads_are_dropped_at_the_write_timeout() {
    let relay = Relay::start(&["--write-timeout", "2s", "--history-size", "100"]);
    for _ in 0..100 {
        relay.publish("big", big()).await;
    }
    let responses = "relay_memory_bytes{kind=\"responses\"}";
    let before = relay.rss_kib() * 1024;
    let request = "GET /api/history/big?since=0 HTTP/1.1\r\nHost: x\r\n\r\n".repeat(15);
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut s = small_window(relay.addr()).await;
        s.write_all(request.as_bytes()).await.unwrap();
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = relay.rss_kib() * 1024;
    assert!(
        held > before + 4_000_000,
        "the unread answers were held ({before} -> {held})"
    );
    // Past the timeout: the server has reset every connection; what reached the client is a
    // fraction of the 15 responses.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let full = 15 * 1_000_000;
    for s in &mut conns {
        let got = read_until_closed(s, Duration::from_secs(5))
            .await
            .expect("the server dropped the connection");
        assert!(
            got.len() < full / 2,
            "{} bytes reached the client",
            got.len()
        );
    }
    assert!(refused_count(&relay.scrape().await, "write_timeout") >= 4);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let after = relay.rss_kib() * 1024;
    eprintln!("RSS before {before}, held {held}, after {after}");
    assert!(
        held - after.min(held) > (held - before) / 3,
        "memory came back: before {before}, held {held}, after {after}"
    );
    assert_eq!(relay.metric(responses).await, 0.0, "no answer left pending");
    relay.publish("after", json!(1)).await;
}

/// An SSE stream whose client stopped reading is reset at the write timeout: its
/// subscription goes with it.
#[tokio::test]
async fn a_stalled_sse_stream_is_cut_at_the_write_timeout() {
    let relay = Relay::start(&["--write-timeout", "2s"]);
    let mut s = small_window(relay.addr()).await;
    let head = head_of(&mut s, "GET /sse?channel=s HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    relay.wait_subscribers("s", 1, Duration::from_secs(5)).await;
    for _ in 0..150 {
        relay.publish("s", big()).await;
    }
    relay
        .wait_subscribers("s", 0, Duration::from_secs(10))
        .await;
    assert!(read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .is_some());
    assert!(refused_count(&relay.scrape().await, "write_timeout") >= 1);
}

/// A WebSocket client that stops reading, with an outbox too large to overflow, is cut at the
/// write timeout instead of holding its outbox for ever.
#[tokio::test]
async fn a_websocket_that_stops_reading_is_cut_at_the_write_timeout() {
    let relay = Relay::start(&["--write-timeout", "2s", "--max-outbox-bytes", "64MiB"]);
    let mut ws = RawWs::connect_with_rcvbuf(relay.addr(), 4096).await;
    ws.send_json(json!({"type":"subscribe","channel":"w"}))
        .await;
    common::assert_subscribed(&ws.recv_json().await, "w");
    for _ in 0..150 {
        relay.publish("w", big()).await;
    }
    relay
        .wait_subscribers("w", 0, Duration::from_secs(10))
        .await;
    assert!(refused_count(&relay.scrape().await, "write_timeout") >= 1);
}

// ---------------------------------------------------------------------------------------------
// Item 8: operator safety
// ---------------------------------------------------------------------------------------------

/// Starts `cmd` with warnings logged and stdout and stderr piped.
fn spawn_piped(cmd: &mut Command) -> Child {
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `relay serve` with `args`.
fn spawn_serve(args: &[&str]) -> Child {
    spawn_piped(Command::new(BIN).arg("serve").args(args))
}

/// Whether `child` printed its listening line within `d` (false if it exited first).
fn listens(child: &mut Child, d: Duration) -> bool {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("listening on") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(d).is_ok()
}

/// A second `relay serve` on the same address exits non-zero with a clear message, and the
/// first keeps every connection (one epoch, consecutive seqs).
#[tokio::test]
async fn a_second_server_on_the_same_address_refuses_to_start() {
    let relay = Relay::start(&[]);
    let first = relay.publish("d", json!(0)).await;
    let addr = relay.addr().to_string();
    let out = common::run_bin(
        &["serve", "--listen", &addr, "--shards", "2"],
        &[],
        Duration::from_secs(10),
    );
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already served by another process"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    for i in 1..=20 {
        let p = relay.publish("d", json!(i)).await;
        assert_eq!(p["epoch"], first["epoch"]);
        assert_eq!(p["seq"], json!(i + 1));
    }
}

/// Two servers started at the same moment on one free port: never do both serve.
#[tokio::test]
async fn two_servers_starting_at_once_never_both_serve() {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let args = ["--listen", addr.as_str(), "--shards", "2"];
        let (mut a, mut b) = (spawn_serve(&args), spawn_serve(&args));
        let (la, lb) = (
            listens(&mut a, Duration::from_secs(10)),
            listens(&mut b, Duration::from_secs(10)),
        );
        let _ = (a.kill(), b.kill());
        let _ = (a.wait(), b.wait());
        assert!(!(la && lb), "both servers listen on {addr}");
    }
}

/// SIGTERM: for the drain period `/readyz` answers 503 and `/healthz` 200 while clients are
/// served as usual; then WebSocket clients get 1012, SSE streams end with a `retry:`, and the
/// port closes.
#[tokio::test]
async fn sigterm_drains_with_readyz_503_then_closes() {
    let mut relay = Relay::start(&["--drain-period", "2s", "--shutdown-timeout", "5s"]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("s").await;
    let mut sse = Sse::connect(&relay.http("/sse?channel=s")).await;
    sse.expect_event("subscribed").await;
    let t0 = Instant::now();
    relay.signal("TERM");
    // The signal is handled on the node's own time: wait for the drain to begin.
    while relay.get("/readyz").await.0 == 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "/readyz still 200 after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seq = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        assert_http_error(&relay.get("/readyz").await, 503, "shutting_down");
        assert_eq!(relay.get("/healthz").await.0, 200);
        seq = relay.publish_seq("s", json!("during the drain")).await;
        ws.expect_message("s", seq).await;
        sse.expect_message("s", seq).await;
    }
    assert!(seq >= 2, "served during the drain");
    assert_eq!(ws.expect_close_within(Duration::from_secs(4)).await, 1012);
    assert!(
        t0.elapsed() >= Duration::from_millis(1900),
        "told to go only after the drain period ({:?})",
        t0.elapsed()
    );
    assert!(sse.expect_end(Duration::from_secs(4)).await);
    let retry: u64 = sse.retries.last().unwrap().parse().unwrap();
    assert!(retry < 1000, "a retry below --sse-retry: {retry}");
    drop(ws);
    drop(sse);
    assert!(
        TcpStream::connect(relay.addr()).await.is_err(),
        "the port closed"
    );
    let status = relay.wait_exit(Duration::from_secs(6)).await.unwrap();
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// Item 10: handshake strictness
// ---------------------------------------------------------------------------------------------

/// RFC 6455 §4.2.2: another version gets 426 with the version we speak; §4.2.1: a key that is
/// not the base64 of 16 bytes gets 400.
#[tokio::test]
async fn the_websocket_handshake_follows_rfc_6455() {
    let relay = Relay::start(&[]);
    let addr = relay.addr();
    let ask = |version: Option<&str>, keys: &[&str]| {
        let mut r = String::from(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        );
        if let Some(v) = version {
            r.push_str(&format!("Sec-WebSocket-Version: {v}\r\n"));
        }
        for k in keys {
            r.push_str(&format!("Sec-WebSocket-Key: {k}\r\n"));
        }
        r + "\r\n"
    };
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    for version in [Some("8"), Some("13, 8"), None] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = head_of(&mut s, &ask(version, &[key])).await;
        assert!(head.starts_with("HTTP/1.1 426"), "{version:?}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-version: 13"),
            "{head}"
        );
    }
    // 15 bytes, not base64, two keys, none.
    for keys in [
        &["AAAAAAAAAAAAAAAAAAAA"][..],
        &["not base64 at all!"],
        &[key, key],
        &[],
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = head_of(&mut s, &ask(Some("13"), keys)).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{keys:?}: {head}");
    }
    RawWs::connect(addr).await;
}

// ---------------------------------------------------------------------------------------------
// Item 9: behind proxies and load balancers
// ---------------------------------------------------------------------------------------------

fn proxy_v1(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 10.0.0.1 40000 8080\r\n").into_bytes()
}

fn proxy_v2(client: [u8; 4], command: u8) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20 | command, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[10, 0, 0, 1, 0x9c, 0x40, 0x1f, 0x90]);
    h
}

/// A WebSocket upgrade behind a PROXY header: the status line and the connection.
async fn proxied_upgrade(addr: SocketAddr, header: &[u8]) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(header).await.unwrap();
    let head = head_of(&mut s, &upgrade_request("")).await;
    (head.lines().next().unwrap_or("").to_owned(), s)
}

/// With `--proxy-protocol`, per-IP limits count the client each PROXY v1 or v2 header names;
/// a connection without a header, or a silent one, is closed.
#[tokio::test]
async fn proxy_protocol_headers_name_the_client() {
    let relay = Relay::start(&[
        "--proxy-protocol",
        "--max-connections-per-ip",
        "2",
        "--trusted-proxies",
        "none",
        "--handshake-timeout",
        "1s",
    ]);
    let addr = relay.addr();
    let mut held = Vec::new();
    for header in [proxy_v1("203.0.113.7"), proxy_v2([203, 0, 113, 7], 1)] {
        let (status, s) = proxied_upgrade(addr, &header).await;
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        held.push(s);
    }
    // The third from 203.0.113.7, in either version, is refused; another client is not.
    for header in [proxy_v1("203.0.113.7"), proxy_v2([203, 0, 113, 7], 1)] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&header).await.unwrap();
        let got = read_until_closed(&mut s, common::RECV_TIMEOUT)
            .await
            .unwrap();
        assert!(
            got.starts_with(b"HTTP/1.1 429"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let (status, _other) = proxied_upgrade(addr, &proxy_v2([203, 0, 113, 8], 1)).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    // The load balancer's own health check (v2 LOCAL).
    let mut hc = TcpStream::connect(addr).await.unwrap();
    hc.write_all(&proxy_v2([0; 4], 0)).await.unwrap();
    let head = head_of(&mut hc, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // No header: closed without an answer; a silent connection: closed at the timeout.
    let mut bare = TcpStream::connect(addr).await.unwrap();
    bare.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut bare, common::RECV_TIMEOUT)
        .await
        .unwrap();
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    let mut silent = TcpStream::connect(addr).await.unwrap();
    silent.write_all(b"PROXY TCP4 203.0").await.unwrap();
    assert!(read_until_closed(&mut silent, Duration::from_secs(4))
        .await
        .is_some());
    let m = metrics_via_proxy(addr).await;
    assert!(refused_count(&m, "proxy_protocol") >= 1, "{m}");
    assert!(refused_count(&m, "ip_limit") >= 2);
}

/// `/metrics` through a PROXY v1 header.
async fn metrics_via_proxy(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&proxy_v1("192.0.2.1")).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut s, common::RECV_TIMEOUT)
        .await
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

/// From a trusted proxy (loopback is one by default), WebSocket connections count against the
/// right-most untrusted `X-Forwarded-For` address; the proxy itself is not capped.
#[tokio::test]
async fn forwarded_for_from_a_trusted_proxy_names_the_client() {
    let relay = Relay::start(&["--max-connections-per-ip", "2"]);
    let addr = relay.addr();
    let mut held = Vec::new();
    for _ in 0..2 {
        let (status, s) = upgrade(addr, "X-Forwarded-For: 198.51.100.1\r\n").await;
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        held.push(s);
    }
    let (status, _) = upgrade(addr, "X-Forwarded-For: 198.51.100.1\r\n").await;
    assert!(status.starts_with("HTTP/1.1 429"), "{status}");
    // What a client writes left of the proxy's entry is not believed.
    let (status, _) = upgrade(addr, "X-Forwarded-For: 198.51.100.77, 198.51.100.1\r\n").await;
    assert!(status.starts_with("HTTP/1.1 429"), "{status}");
    let (status, _c) = upgrade(addr, "Forwarded: for=198.51.100.2\r\n").await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    // The proxy's own connections (no client named) are many, and not capped.
    for _ in 0..4 {
        held.push(RawWs::connect(addr).await.stream);
    }
    // The slot comes back when the session ends.
    drop(held.remove(0));
    let mut ok = false;
    for _ in 0..50 {
        let (status, s) = upgrade(addr, "X-Forwarded-For: 198.51.100.1\r\n").await;
        if status.starts_with("HTTP/1.1 101") {
            held.push(s);
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the slot of a closed session came back");
}

/// An untrusted peer's `X-Forwarded-For` is ignored: it is counted as itself.
#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let relay = Relay::start(&[
        "--max-connections-per-ip",
        "2",
        "--trusted-proxies",
        "10.0.0.0/8",
    ]);
    let addr = relay.addr();
    let mut held = Vec::new();
    for i in 0..2 {
        let (status, s) = upgrade(addr, &format!("X-Forwarded-For: 198.51.100.{i}\r\n")).await;
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        held.push(s);
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_request("X-Forwarded-For: 198.51.100.9\r\n").as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut s, common::RECV_TIMEOUT)
        .await
        .unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 429"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

// ---------------------------------------------------------------------------------------------
// Item 7: API rate limits, accept errors
// ---------------------------------------------------------------------------------------------

/// Requests with an API key are counted per key (and never per address).
#[tokio::test]
async fn the_api_is_rate_limited_per_key() {
    let relay = Relay::start(&[
        "--api-key",
        "k1",
        "--api-key",
        "k2",
        "--api-key-rate-limit",
        "5",
        "--api-rate-limit",
        "1",
        "--trusted-proxies",
        "none",
    ]);
    let k1 = [("authorization", "Bearer k1")];
    for _ in 0..10 {
        assert_eq!(api_get(&relay, "/api/history/h", &k1).await.0, 200);
    }
    let (status, retry) = api_get(&relay, "/api/history/h", &k1).await;
    assert_eq!((status, retry.is_some()), (429, true));
    assert_eq!(
        api_get(&relay, "/api/history/h", &[("authorization", "Bearer k2")])
            .await
            .0,
        200
    );
    // Without a key, the address's own limit (1/s, burst 2) applies before the 401.
    assert_eq!(api_get(&relay, "/api/history/h", &[]).await.0, 401);
    assert_eq!(api_get(&relay, "/api/history/h", &[]).await.0, 401);
    assert_eq!(api_get(&relay, "/api/history/h", &[]).await.0, 429);
}

/// Out of file descriptors, every accept fails on every shard: counted each time, logged once
/// per cause per interval, and the node serves again once descriptors are free.
#[tokio::test]
async fn accept_errors_are_logged_once_per_cause_per_interval() {
    let mut child = spawn_piped(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 64 && exec \"$0\" serve --listen 127.0.0.1:0 --shards 2")
            .arg(BIN),
    );
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap()
        .parse()
        .unwrap();
    let mut conns = Vec::new();
    for _ in 0..120 {
        conns.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(conns);
    // Descriptors come back as the server sees the closes.
    let mut text = String::new();
    // Bounded: 20 s at most on a busy machine.
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(format!("http://{addr}/metrics")).await {
            text = r.text().await.unwrap_or_default();
            if text.contains("relay_accept_errors_total") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failures =
        sample(&text, "relay_accept_errors_total{cause=\"emfile\"}").unwrap_or(0.0) as u64;
    if failures < 5 {
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        panic!(
            "accept failures counted: {failures}\n{text}\nserver: {:?}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    let logged = err.lines().filter(|l| l.contains("accept failed")).count();
    assert_eq!(
        logged, 1,
        "{failures} failures, logged {logged} times:\n{err}"
    );
}

/// A node without the descriptors for every shard's runtime refuses to start (exit 1, a line
/// saying why) instead of serving on some shards while the kernel hands connections to the
/// listeners of the others.
#[tokio::test]
async fn a_node_short_of_descriptors_refuses_to_start() {
    let output = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 14 && exec \"$0\" serve --listen 127.0.0.1:0 --shards 2")
        .arg(BIN)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stdout {out}\nstderr {err}");
    assert!(!out.contains("listening on"), "{out}");
    assert!(err.contains("Too many open files"), "{err}");
}
