//! Graceful shutdown (docs/protocol.md, "Shutdown").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::time::Instant;

async fn graceful(sig: &str) {
    // No drain period: the close starts at the signal (tests/edge.rs covers the drain).
    let mut relay = Relay::start(&["--shutdown-timeout", "5s", "--drain-period", "0s"]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("s").await;
    let mut sse = Sse::connect(&relay.http("/sse?channel=s")).await;
    sse.expect_event("subscribed").await;
    relay.publish("s", json!(1)).await;
    ws.expect_message("s", 1).await;
    sse.expect_message("s", 1).await;

    let t0 = Instant::now();
    relay.signal(sig);
    assert_eq!(
        ws.expect_close().await,
        1012,
        "WebSocket close code on SIG{sig}"
    );
    assert!(
        sse.expect_end(Duration::from_secs(5)).await,
        "SSE stream did not end on SIG{sig}"
    );
    drop(ws);
    drop(sse);
    let status = relay
        .wait_exit(Duration::from_secs(6))
        .await
        .unwrap_or_else(|| panic!("relay still running 6 s after SIG{sig}"));
    assert!(status.success(), "exit status after SIG{sig}: {status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "with every client gone the node must not wait out --shutdown-timeout ({:?})",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_1012_and_exits_cleanly() {
    graceful("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_closes_clients_1012_and_exits_cleanly() {
    graceful("INT").await;
}

/// A client that never answers the close handshake cannot hold the node past the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stubborn_client_bounded_by_shutdown_timeout() {
    let mut relay = Relay::start(&["--shutdown-timeout", "1s", "--drain-period", "0s"]);
    let mut raw = RawWs::connect(relay.addr()).await;
    raw.send_json(json!({"type":"subscribe","channel":"s"}))
        .await;
    assert_subscribed(&raw.recv_json().await, "s");

    let t0 = Instant::now();
    relay.signal("TERM");
    let status = relay.wait_exit(Duration::from_secs(4)).await;
    assert!(
        status.is_some(),
        "relay still running {:?} after SIGTERM with --shutdown-timeout 1s",
        t0.elapsed()
    );
    // The stubborn client was sent a 1012 close frame all the same.
    assert_eq!(raw.expect_close_code(RECV_TIMEOUT).await, Some(1012));
}

/// `server::run` serves on the listener the caller bound until its shutdown future completes,
/// then closes clients as a signal does and returns once the shards have finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_run_serves_until_its_shutdown_future_completes() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config =
        relay::config::Config::from_args(["--shutdown-timeout", "5s", "--drain-period", "0s"])
            .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = relay::server::run(config, vec![listener], async {
        let _ = stopped.await;
    });
    let client = async move {
        let mut ws = Ws::connect(&format!("ws://{addr}/ws")).await;
        ws.subscribe("s").await;
        let (status, body) = send(
            http_client()
                .post(format!("http://{addr}/api/publish"))
                .json(&json!({"channel": "s", "data": 1})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        ws.expect_message("s", 1).await;
        stop.send(()).unwrap();
        assert_eq!(ws.expect_close().await, 1012, "closed as on SIGTERM");
    };
    let t0 = Instant::now();
    let (ran, ()) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(server, client)
    })
    .await
    .expect("run returns after its shutdown future");
    ran.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the port is closed once run returned"
    );
}

/// `n` raw WebSocket clients subscribed to `s`.
async fn raw_subscribers(relay: &Relay, n: usize) -> Vec<RawWs> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut raw = RawWs::connect(relay.addr()).await;
        raw.send_json(json!({"type":"subscribe","channel":"s"}))
            .await;
        assert_subscribed(&raw.recv_json().await, "s");
        clients.push(raw);
    }
    clients
}

/// A restart tells each WebSocket client when to come back, spread over a window, so that a
/// fleet does not reconnect at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_spreads_the_clients_reconnect_delays() {
    let mut relay = Relay::start(&["--shutdown-timeout", "5s", "--drain-period", "0s"]);
    let mut clients = raw_subscribers(&relay, 16).await;
    relay.signal("TERM");
    let mut delays = Vec::new();
    for raw in &mut clients {
        let (code, reason) = raw
            .expect_close_frame(RECV_TIMEOUT)
            .await
            .expect("a close frame");
        assert_eq!(code, 1012);
        let ms: u64 = reason
            .strip_prefix("service restart; reconnect in ")
            .and_then(|r| r.strip_suffix(" ms"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no reconnect hint in {reason:?}"));
        // 16 connections: the shortest window, 250 ms.
        assert!(ms < 250, "{ms} ms");
        delays.push(ms);
    }
    delays.sort_unstable();
    delays.dedup();
    assert!(
        delays.len() >= 12,
        "spread, not one delay for all: {delays:?}"
    );
    drop(clients);
    assert!(relay.wait_exit(Duration::from_secs(6)).await.is_some());
}

/// A restart does not wait for each client to answer its close frame: once a connection's
/// 1012 is sent the node lets go of it, so a fleet of clients that answer late (or never)
/// does not hold the old process and its port for the close grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_wait_for_the_clients_close_replies() {
    let mut relay = Relay::start(&[
        "--shutdown-timeout",
        "30s",
        "--drain-period",
        "0s",
        "--max-connections-per-ip",
        "0",
    ]);
    let mut clients = raw_subscribers(&relay, 100).await;
    relay.signal("TERM");
    // Every client is told (and none answers).
    for raw in &mut clients {
        let close = raw.expect_close_frame(RECV_TIMEOUT).await;
        assert_eq!(close.map(|c| c.0), Some(1012));
    }
    // A session waiting for the reply would keep the node for its 3 s close grace.
    let status = relay.wait_exit(Duration::from_secs(2)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the node waited for close replies that never came: {status:?}"
    );
}
