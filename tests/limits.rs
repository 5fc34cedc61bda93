//! Abuse limits (issue 7): origin allow-list, connections per IP, handshake timeout and a
//! slowloris, header size, inbound message rate, message size and subscriptions. Each limit
//! triggers, is counted in `relay_refused_total`, and the node keeps serving everyone else.
//! And the file table, sized at start so that connections arriving never grow it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{assert_http_error, read_resp, refused_count, RawWs, Relay, Sse, Ws};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `addr` from the loopback address `from` (e.g. 127.0.0.2).
async fn connect_from(from: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((from, 0)))?;
    tokio::time::timeout(common::RECV_TIMEOUT, sock.connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Reads until EOF (or a reset) within `d`; true if the peer closed.
async fn closed_within(s: &mut TcpStream, d: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + d;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// The status of a WebSocket upgrade with `Origin: origin`.
async fn ws_status_with_origin(relay: &Relay, origin: &str) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = relay.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("origin", origin.parse().unwrap());
    match tokio::time::timeout(common::RECV_TIMEOUT, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
    {
        Ok((_, resp)) => resp.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test]
async fn origin_allow_list() {
    let relay = Relay::start(&["--allowed-origin", "https://good.example"]);
    assert_eq!(
        ws_status_with_origin(&relay, "https://good.example").await,
        101
    );
    assert_eq!(
        ws_status_with_origin(&relay, "https://evil.example").await,
        403
    );

    let good = [("origin", "https://good.example")];
    let evil = [("origin", "https://evil.example")];
    let r = Sse::request(&relay.http("/sse?channel=a"), &evil).await;
    assert_http_error(&read_resp(r).await, 403, "forbidden_origin");
    let r = Sse::request(&relay.http("/sse?channel=a"), &good).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://good.example"
    );
    drop(r);

    let c = relay.client();
    let r = c
        .get(relay.http("/api/channels"))
        .header("origin", "https://evil.example");
    assert_http_error(
        &read_resp(r.send().await.unwrap()).await,
        403,
        "forbidden_origin",
    );
    let r = c
        .get(relay.http("/api/channels"))
        .header("origin", "https://good.example");
    let r = r.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://good.example"
    );
    let pre = c
        .request(reqwest::Method::OPTIONS, relay.http("/api/publish"))
        .header("origin", "https://good.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status().as_u16(), 204);
    assert!(pre.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    // Clients that send no Origin (not browsers) are not affected.
    assert_eq!(relay.get("/api/channels").await.0, 200);
    Ws::connect(&relay.ws_url()).await.subscribe("a").await;
    assert!(refused_count(&relay.scrape().await, "origin") >= 3);
}

#[tokio::test]
async fn connections_per_ip_are_capped_across_shards() {
    // Loopback peers are trusted proxies by default (`private`): count them as clients here.
    let relay = Relay::start(&[
        "--max-connections-per-ip",
        "4",
        "--shards",
        "2",
        "--trusted-proxies",
        "none",
    ]);
    let addr = relay.addr();
    // Four WebSocket sessions from 127.0.0.3, spread over both shards by the kernel.
    let mut held = Vec::new();
    for _ in 0..4 {
        let s = connect_from([127, 0, 0, 3], addr).await.unwrap();
        let mut s = s;
        s.write_all(RawWs::handshake_request(addr).as_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(common::RECV_TIMEOUT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 101"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(s);
    }
    // The fifth from that IP is refused at once with 429.
    let mut fifth = connect_from([127, 0, 0, 3], addr).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(common::RECV_TIMEOUT, fifth.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(
        buf.starts_with(b"HTTP/1.1 429"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    // Others are served.
    Ws::connect(&relay.ws_url()).await.subscribe("x").await;
    // A closed session gives its slot back.
    drop(held.pop());
    let mut ok = false;
    for _ in 0..50 {
        let mut s = connect_from([127, 0, 0, 3], addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            if buf[..n].starts_with(b"HTTP/1.1 200") {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the slot of a closed connection came back");
    assert!(refused_count(&relay.scrape().await, "ip_limit") >= 1);
}

/// 500 half-open connections (partial request headers, and silent ones) do not stop new
/// clients, and are cut at the handshake timeout.
#[tokio::test]
async fn slowloris_does_not_stop_new_clients() {
    let relay = Relay::start(&["--handshake-timeout", "2s"]);
    let addr = relay.addr();
    let mut loris = Vec::new();
    for i in 0..500 {
        let mut s = connect_from([127, 0, 0, 2], addr).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
        }
        loris.push(s);
    }
    // New clients are served meanwhile, on every door.
    let start = std::time::Instant::now();
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("live").await;
    let mut sse = Sse::connect(&relay.http("/sse?channel=live")).await;
    sse.expect_event("subscribed").await;
    relay.publish("live", json!("hello")).await;
    ws.expect_message("live", 1).await;
    sse.expect_message("live", 1).await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "served before the timeout"
    );
    // Every half-open connection is closed by the server soon after the timeout.
    for s in loris.iter_mut() {
        assert!(
            closed_within(s, Duration::from_secs(6)).await,
            "half-open connection not cut"
        );
    }
    assert!(refused_count(&relay.scrape().await, "handshake_timeout") >= 500);
    relay.publish("live", json!("still")).await;
    ws.expect_message("live", 2).await;
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let relay = Relay::start(&["--max-header-size", "8KiB"]);
    let mut s = TcpStream::connect(relay.addr()).await.unwrap();
    let big = "a".repeat(20 * 1024);
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(common::RECV_TIMEOUT, s.read_to_end(&mut buf)).await;
    assert!(
        buf.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(relay.get("/healthz").await.0, 200);
    assert!(refused_count(&relay.scrape().await, "header_too_large") >= 1);
}

#[tokio::test]
async fn inbound_rate_limit_refuses_then_closes() {
    let relay = Relay::start(&["--rate-limit", "10", "--rate-burst", "5"]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    let mut other = Ws::connect(&relay.ws_url()).await;
    for _ in 0..6 {
        ws.send_json(json!({"type":"heartbeat"})).await;
    }
    for _ in 0..5 {
        assert_eq!(ws.recv_json().await["type"], "heartbeat");
    }
    let v = ws.recv_json().await;
    assert_eq!(v["code"], "rate_limited", "{v}");
    // Persistent excess closes with 4029.
    for _ in 0..30 {
        ws.send_json(json!({"type":"heartbeat"})).await;
    }
    assert_eq!(ws.expect_close().await, 4029);
    // The neighbour is unaffected.
    other.send_json(json!({"type":"heartbeat"})).await;
    assert_eq!(other.recv_json().await["type"], "heartbeat");
    let m = relay.scrape().await;
    assert!(refused_count(&m, "rate_limited") >= 1, "{m}");
    assert!(refused_count(&m, "rate_closed") >= 1, "{m}");
}

#[tokio::test]
async fn message_size_and_subscription_limits() {
    let relay = Relay::start(&["--max-message-size", "1KiB", "--max-subscriptions", "2"]);
    let mut big = Ws::connect(&relay.ws_url()).await;
    big.send_text(&format!(
        "{{\"type\":\"publish\",\"channel\":\"a\",\"data\":\"{}\"}}",
        "x".repeat(2048)
    ))
    .await;
    assert_eq!(big.expect_close().await, 1009);
    let mut subs = Ws::connect(&relay.ws_url()).await;
    subs.subscribe("a").await;
    subs.subscribe("b").await;
    subs.expect_error_for(
        r#"{"type":"subscribe","channel":"c"}"#,
        "too_many_subscriptions",
        None,
    )
    .await;
    let r = relay
        .post(
            "/api/publish",
            &json!({"channel":"a","data":"y".repeat(2048)}),
        )
        .await;
    assert_http_error(&r, 413, "payload_too_large");
    relay.publish("a", json!(1)).await;
    subs.expect_message("a", 1).await;
    let m = relay.scrape().await;
    assert!(refused_count(&m, "message_too_large") >= 2, "{m}");
    assert!(refused_count(&m, "too_many_subscriptions") >= 1, "{m}");
}

/// `limits::reserve_descriptors`: the server's file table is sized at start for its soft
/// descriptor limit (at most `RESERVED_DESCRIPTORS`), and 1,500 connections arriving leave it
/// as it was: growing it would stall every accept for an RCU grace period per doubling.
#[tokio::test]
async fn the_file_table_is_sized_at_start_and_arrivals_do_not_grow_it() {
    let relay = Relay::start(&["--handshake-timeout", "30s"]);
    let pid = relay.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("Max open files in /proc/<pid>/limits");
    let want = if soft < 1024 {
        0
    } else {
        soft.min(relay::limits::RESERVED_DESCRIPTORS)
    };
    let at_start = relay.proc_status("FDSize");
    assert!(
        at_start >= want,
        "FDSize {at_start} at start, soft limit {soft}: want at least {want}"
    );

    let n = 1_500.min(soft.saturating_sub(200) as usize);
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(TcpStream::connect(relay.addr()).await.unwrap());
    }
    let open = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while open() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server accepted {} of {n} connections",
            open()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        relay.proc_status("FDSize"),
        at_start,
        "{n} connections grew the file table"
    );
    // Still serving.
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("fd-table").await;
    drop(conns);
}
