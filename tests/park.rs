//! Idle WebSocket sessions park off the runtime (`transport::park`, docs/ARCHITECTURE.md):
//! parked, a connection still gets every message in order, is pinged and heard, takes
//! commands, leaves its channels and presence when it closes or vanishes, and gets its 1012
//! at a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-0123456789abcdef";
const KEY: &str = "server-api-key";

/// A token for user `sub` that may subscribe anywhere.
fn token(sub: &str) -> String {
    hs256_token(SECRET, sub, json!({"subscribe": ["*"]}))
}

/// Sessions park after 100 ms without input.
const PARK: &[&str] = &["--ws-park-after", "100ms"];

/// Waits (10 s at most) until `want` sessions are parked; panics otherwise.
async fn wait_parked(relay: &Relay, want: f64) {
    relay.wait_metric("relay_parked_sessions", want).await;
}

fn args<'a>(more: &[&'a str]) -> Vec<&'a str> {
    PARK.iter().chain(more).copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_gets_every_message_in_order_and_takes_commands() {
    let relay = Relay::start(&args(&["--max-outbox-bytes", "64MiB"]));
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("p").await;
    wait_parked(&relay, 1.0).await;
    assert_eq!(
        relay.metric("relay_connections{transport=\"ws\"}").await,
        1.0,
        "a parked connection is still a connection"
    );

    // Small messages: pump passes write them to the parked socket themselves.
    for seq in 1..=20 {
        relay.publish("p", json!({"n": seq})).await;
    }
    for seq in 1..=20 {
        assert_eq!(ws.expect_message("p", seq).await, json!({"n": seq}));
    }

    // A command: the session wakes, subscribes, publishes, and parks again.
    wait_parked(&relay, 1.0).await;
    ws.subscribe("q").await;
    ws.send_json(json!({"type":"publish","channel":"q","data":"hi","id":1}))
        .await;
    let mut got = (false, false);
    while got != (true, true) {
        let v = ws.recv_json().await;
        match v["type"].as_str() {
            Some("published") => got.0 = true,
            Some("message") => {
                assert_eq!(
                    (v["channel"].clone(), v["seq"].clone()),
                    (json!("q"), json!(1))
                );
                got.1 = true;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    wait_parked(&relay, 1.0).await;

    // More than the socket takes while nobody reads: a direct write would block, the session
    // resumes to write the rest; every message arrives whole and in order.
    let pad = "x".repeat(60_000);
    for seq in 2..=60 {
        relay.publish("q", json!({"n": seq, "pad": pad})).await;
    }
    for seq in 2..=60 {
        let data = ws.expect_message("q", seq).await;
        assert_eq!(data["n"], json!(seq));
        assert_eq!(data["pad"].as_str().map(str::len), Some(60_000));
    }
    wait_parked(&relay, 1.0).await;
    relay.publish("p", json!({"n": 21})).await;
    assert_eq!(ws.expect_message("p", 21).await, json!({"n": 21}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_pinged_and_its_pongs_are_heard() {
    // Without its pongs being read, the session would close at the idle timeout, before the
    // third ping.
    let relay = Relay::start(&args(&["--ping-interval", "1s", "--idle-timeout", "2s"]));
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("p").await;
    wait_parked(&relay, 1.0).await;
    let mut pings = 0;
    while pings < 3 {
        // tungstenite answers each ping with a pong as it reads.
        match tokio::time::timeout(RECV_TIMEOUT, ws.inner.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    relay.publish("p", json!(1)).await;
    ws.expect_message("p", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_that_closes_or_vanishes_leaves_its_channels() {
    let relay = Relay::start(&args(&["--presence-channels", "presence:*"]));
    let ch = "presence:room";
    let mut obs = Ws::connect(&relay.ws_url()).await;
    obs.subscribe(ch).await;
    // Its own join.
    assert_eq!(obs.recv_json().await["event"], "join");
    let join = |user: &str| json!({"type":"subscribe","channel":ch,"presence":{"user":user}});
    let mut a = Ws::connect(&relay.ws_url()).await;
    a.send_json(join("alice")).await;
    assert_eq!(a.recv_json().await["type"], "subscribed");
    let mut b = Ws::connect(&relay.ws_url()).await;
    b.send_json(join("bob")).await;
    assert_eq!(b.recv_json().await["type"], "subscribed");
    for user in ["alice", "bob"] {
        let v = obs.recv_json().await;
        assert_eq!(
            (v["event"].as_str(), v["user"].as_str()),
            (Some("join"), Some(user))
        );
    }
    relay.wait_subscribers(ch, 3, RECV_TIMEOUT).await;
    wait_parked(&relay, 3.0).await;

    // A close frame: the session wakes, answers, and leaves presence at once.
    a.close_cleanly().await;
    let v = obs.recv_json().await;
    assert_eq!(
        (v["event"].as_str(), v["user"].as_str()),
        (Some("leave"), Some("alice"))
    );
    relay.wait_subscribers(ch, 2, RECV_TIMEOUT).await;

    // A reset: the session wakes, reads the error and ends.
    wait_parked(&relay, 2.0).await;
    if let tokio_tungstenite::MaybeTlsStream::Plain(s) = b.inner.get_ref() {
        socket2::SockRef::from(s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    drop(b);
    relay.wait_subscribers(ch, 1, RECV_TIMEOUT).await;
    let deadline = Instant::now() + RECV_TIMEOUT;
    while relay.metric("relay_connections{transport=\"ws\"}").await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the reset connection is still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_parked(&relay, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_closes_parked_connections_with_1012() {
    let mut relay = Relay::start(&args(&["--drain-period", "0s", "--shutdown-timeout", "5s"]));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut ws = Ws::connect(&relay.ws_url()).await;
        ws.subscribe("r").await;
        clients.push(ws);
    }
    wait_parked(&relay, 4.0).await;
    relay.terminate_expecting_1012(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_reaches_a_parked_user_connection() {
    let mut relay = Relay::start(&args(&["--jwt-secret", SECRET, "--api-key", KEY]));
    relay.set_api_key(KEY);
    let mut ws = Ws::connect(&format!("{}?token={}", relay.ws_url(), token("carol"))).await;
    wait_parked(&relay, 1.0).await;
    let (status, v) = relay
        .post(
            "/api/users/subscribe",
            &json!({"user":"carol","channel":"c"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let v = ws.recv_json().await;
    assert_eq!(
        (v["type"].as_str(), v["channel"].as_str()),
        (Some("subscribed"), Some("c"))
    );
    wait_parked(&relay, 1.0).await;
    relay.publish("c", json!(1)).await;
    ws.expect_message("c", 1).await;
    wait_parked(&relay, 1.0).await;
    let (status, v) = relay
        .post(
            "/api/users/disconnect",
            &json!({"user":"carol","reason":"bye","reconnect":false}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(ws.expect_close().await, 4011);
}
