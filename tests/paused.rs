//! Timers driven by paused time: the server runs one shard on the test's own runtime
//! (`server::run_here`, `common::paused`), whose clock the test pauses, so a 30 s timeout
//! passes at once and a test asserts it to the second without waiting for it. The engine's
//! deadlines (presence expiry, history TTL) and the rate buckets read the same clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{api_get, head_of, read_until_closed, refused_count, Relay, Ws};
use serde_json::{json, Value};

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// The close code and when it came, reading (and ignoring) everything before it.
async fn close_code(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> (u16, Instant) {
    while let Some(msg) = ws.next().await {
        if let Message::Close(Some(f)) = msg.unwrap() {
            return (u16::from(f.code), Instant::now());
        }
    }
    panic!("the connection ended without a close frame");
}

#[tokio::test(start_paused = true)]
async fn a_client_without_a_token_is_closed_at_the_auth_timeout() {
    let args = [
        "--jwt-secret",
        "a-secret-of-at-least-16-bytes",
        "--auth-timeout",
        "30s",
        "--ping-interval",
        "10m",
        "--idle-timeout",
        "20m",
    ];
    common::paused(&args, |relay: Relay| async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(relay.ws_url())
            .await
            .unwrap();
        let t0 = Instant::now();
        let (code, at) = close_code(&mut ws).await;
        assert_eq!(CloseCode::from(code), CloseCode::Library(4001));
        let waited = at - t0;
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "{waited:?}"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_pinged_then_closed_at_the_idle_timeout() {
    let args = ["--ping-interval", "25s", "--idle-timeout", "60s"];
    common::paused(&args, |relay: Relay| async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(relay.ws_url())
            .await
            .unwrap();
        let t0 = Instant::now();
        // tungstenite answers the ping by itself when it reads it; a client that reads
        // nothing stays silent. Read only once the idle timeout must have passed.
        tokio::time::sleep(Duration::from_secs(61)).await;
        let mut pinged = None;
        let mut closed = None;
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Ping(_)) => pinged = Some(Instant::now() - t0),
                Ok(Message::Close(Some(f))) => {
                    closed = Some(u16::from(f.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        assert!(pinged.is_some(), "a ping came first");
        assert_eq!(closed, Some(1001), "idle timeout");
    })
    .await;
}

/// Subscribes `ws` to presence channel `ch` as `user` and returns the first presence event
/// it then sees (its own join).
async fn join_as(ws: &mut Ws, ch: &str, user: &str) -> Value {
    let subscribe = json!({"type":"subscribe","channel":ch,"presence":{"user":user}});
    ws.send_json(subscribe).await;
    assert_eq!(ws.recv_json().await["type"], "subscribed");
    ws.recv_json().await
}

#[tokio::test(start_paused = true)]
async fn a_vanished_client_leaves_presence_at_the_timeout_not_before() {
    let (timeout, sweep) = (Duration::from_secs(30), Duration::from_secs(5));
    let args = [
        "--presence-channels",
        "presence:*",
        "--heartbeat-interval",
        "10s",
        "--presence-timeout",
        "30s",
        "--presence-sweep",
        "5s",
        "--ping-interval",
        "10m",
        "--idle-timeout",
        "20m",
    ];
    common::paused(&args, |relay: Relay| async move {
        let ch = "presence:vanish";
        let mut obs = Ws::connect(&relay.ws_url()).await;
        assert_eq!(join_as(&mut obs, ch, "observer").await["user"], "observer");
        let mut ghost = Ws::connect(&relay.ws_url()).await;
        // The ghost's last frame is its subscribe, sent after this instant.
        let last_life = Instant::now();
        join_as(&mut ghost, ch, "ghost").await;
        assert_eq!(obs.recv_json().await["user"], "ghost");
        // Vanish: the TCP connection goes without a close frame.
        drop(ghost);
        // The observer heartbeats every 5 s, so it stays; the first presence event it sees is
        // the ghost's leave.
        let left = loop {
            assert!(
                last_life.elapsed() < 4 * timeout,
                "the vanished client never left"
            );
            obs.send_json(json!({"type":"heartbeat"})).await;
            let until = Instant::now() + Duration::from_secs(5);
            let mut event = None;
            while let Some(v) = obs.recv_json_within(until - Instant::now()).await {
                if v["type"] == "presence" {
                    event = Some(v);
                    break;
                }
            }
            if let Some(v) = event {
                break v;
            }
        };
        let waited = last_life.elapsed();
        assert_eq!(
            (&left["event"], &left["user"]),
            (&json!("leave"), &json!("ghost"))
        );
        assert!(
            waited >= timeout,
            "left after {waited:?}, before the timeout"
        );
        assert!(
            waited <= timeout + sweep,
            "left after {waited:?}: later than a sweep after"
        );
        let members = relay.get("/api/presence/presence:vanish").await.1;
        assert_eq!(members["members"][0]["user"], "observer", "{members}");
        assert_eq!(
            members["members"].as_array().map(Vec::len),
            Some(1),
            "{members}"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn history_older_than_the_ttl_is_gone_and_says_so() {
    common::paused(&["--history-ttl", "2s"], |relay: Relay| async move {
        for n in 1..=3 {
            relay.publish("t", json!(n)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        relay.publish("t", json!(4)).await;
        relay.publish("t", json!(5)).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // Now 1..=3 are 2.5 s old (expired) and 4..=5 are 1 s old.
        let h = relay.history("t", "").await;
        assert_eq!(h["seq"], json!(5), "{h}");
        assert_eq!(h["complete"], json!(false), "{h}");
        let kept = json!([{"seq":4,"data":4},{"seq":5,"data":5}]);
        assert_eq!(h["messages"], kept, "{h}");
        let h = relay.history("t", "?since=3").await;
        assert_eq!(h["complete"], json!(true), "{h}");
        assert_eq!(h["messages"].as_array().unwrap().len(), 2, "{h}");
    })
    .await;
}

/// Requests without an API key are limited per client address: a burst of twice the rate,
/// then 429 with `Retry-After`; other clients and the proxy's own requests go on.
#[tokio::test(start_paused = true)]
async fn the_api_is_rate_limited_per_client_address() {
    common::paused(&["--api-rate-limit", "5"], |relay: Relay| async move {
        let alice = [("x-forwarded-for", "198.51.100.1")];
        for _ in 0..10 {
            assert_eq!(api_get(&relay, "/api/history/h", &alice).await.0, 200);
        }
        let (status, retry) = api_get(&relay, "/api/history/h", &alice).await;
        assert_eq!(status, 429);
        let retry = retry.expect("Retry-After");
        assert!((1..=2).contains(&retry), "{retry}");
        let bob = [("x-forwarded-for", "198.51.100.2")];
        assert_eq!(api_get(&relay, "/api/history/h", &bob).await.0, 200);
        for _ in 0..30 {
            assert_eq!(api_get(&relay, "/api/history/h", &[]).await.0, 200);
        }
        tokio::time::sleep(Duration::from_secs(retry)).await;
        assert_eq!(api_get(&relay, "/api/history/h", &alice).await.0, 200);
        assert!(refused_count(&relay.scrape().await, "api_rate_limited") >= 1);
    })
    .await;
}

/// A keep-alive connection serves requests while they come, and is closed once idle for the
/// keep-alive timeout (hyper's timer, on the shard's clock).
#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_closes_at_the_keepalive_timeout() {
    let timeout = Duration::from_secs(20);
    let args = ["--keepalive-timeout", "20s", "--sse-keepalive", "1s"];
    common::paused(&args, |relay: Relay| async move {
        let mut s = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
        let req = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(head_of(&mut s, req).await.starts_with("HTTP/1.1 200"));
        // Idle for most of the timeout: the connection still serves.
        tokio::time::sleep(timeout - Duration::from_secs(1)).await;
        assert!(head_of(&mut s, req).await.starts_with("HTTP/1.1 200"));
        let idle = Instant::now();
        assert!(read_until_closed(&mut s, 3 * timeout).await.is_some());
        let waited = idle.elapsed();
        assert!(waited >= timeout, "closed after {waited:?} idle");
        assert!(
            waited <= timeout + Duration::from_secs(1),
            "closed after {waited:?} idle"
        );
    })
    .await;
}
