//! The server API for users and channels against the real binary: disconnect a user's
//! connections (on every shard), subscribe and unsubscribe a user server-side, channel info,
//! and `batch` in order.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{assert_http_error, hs256_token, Relay, Ws};
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789abcdef";
const KEY: &str = "server-api-key";

fn token(sub: &str, grants: Value) -> String {
    hs256_token(SECRET, sub, grants)
}

fn relay() -> Relay {
    let mut r = Relay::start(&[
        "--jwt-secret",
        SECRET,
        "--api-key",
        KEY,
        "--presence-channels",
        "presence:*",
        "--shards",
        "2",
    ]);
    r.set_api_key(KEY);
    r
}

async fn connect(relay: &Relay, sub: &str) -> Ws {
    let t = token(sub, json!({"subscribe": ["*"]}));
    Ws::connect(&format!("{}?token={t}", relay.ws_url())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_a_user_closes_all_its_connections_with_the_code_and_reason() {
    let relay = relay();
    // Enough connections that both shards hold some of alice's.
    let mut alice = Vec::new();
    for _ in 0..6 {
        let mut ws = connect(&relay, "alice").await;
        ws.subscribe("room").await;
        alice.push(ws);
    }
    let mut bob = connect(&relay, "bob").await;
    bob.subscribe("room").await;

    let (status, v) = relay
        .post(
            "/api/users/disconnect",
            &json!({"user":"alice","reason":"banned","reconnect":false}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for ws in &mut alice {
        assert_eq!(ws.expect_close().await, 4011);
    }
    // Bob stays and is served.
    relay.publish("room", json!("still here")).await;
    assert_eq!(bob.expect_message("room", 1).await, "still here");

    // May reconnect: 4010, with the reason.
    let (status, _) = relay
        .post("/api/users/disconnect", &json!({"user":"bob"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(bob.expect_close().await, 4010);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_subscriptions_ignore_grants_and_reach_every_connection_of_the_user() {
    let relay = relay();
    // Carol may subscribe to nothing herself.
    let t = token("carol", json!({}));
    let mut a = Ws::connect(&format!("{}?token={t}", relay.ws_url())).await;
    let mut b = Ws::connect(&format!("{}?token={t}", relay.ws_url())).await;
    a.send_json(json!({"type":"subscribe","channel":"private:carol","id":1}))
        .await;
    assert_eq!(a.recv_json().await["code"], "forbidden");

    let (status, v) = relay
        .post(
            "/api/users/subscribe",
            &json!({"user":"carol","channel":"private:carol"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for ws in [&mut a, &mut b] {
        let v = ws.recv_json().await;
        assert_eq!(v["type"], "subscribed", "{v}");
        assert_eq!(v["channel"], "private:carol");
        assert!(v.get("id").is_none(), "{v}");
    }
    relay.publish("private:carol", json!(1)).await;
    for ws in [&mut a, &mut b] {
        assert_eq!(ws.expect_message("private:carol", 1).await, 1);
    }
    let info = relay.get("/api/channels/private:carol").await;
    assert_eq!(info.0, 200, "{info:?}");
    assert_eq!(info.1["subscribers"], 2);
    assert_eq!(info.1["seq"], 1);
    assert!(info.1["epoch"].is_string());

    let (status, _) = relay
        .post(
            "/api/users/unsubscribe",
            &json!({"user":"carol","channel":"private:carol"}),
        )
        .await;
    assert_eq!(status, 200);
    for ws in [&mut a, &mut b] {
        let v = ws.recv_json().await;
        assert_eq!(v["type"], "unsubscribed", "{v}");
    }
    relay
        .wait_subscribers("private:carol", 0, common::RECV_TIMEOUT)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_info_counts_subscribers_presence_and_top() {
    let relay = relay();
    let (status, v) = relay.get("/api/channels/presence:none").await;
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"channel":"presence:none","subscribers":0,"seq":0,"presence":{"clients":0,"users":0}})
    );
    let mut a = connect(&relay, "dave").await;
    let mut b = connect(&relay, "dave").await;
    for ws in [&mut a, &mut b] {
        ws.send_json(json!({"type":"subscribe","channel":"presence:lobby"}))
            .await;
        assert_eq!(ws.recv_json().await["type"], "subscribed");
    }
    relay.publish("presence:lobby", json!(1)).await;
    let (_, v) = relay.get("/api/channels/presence:lobby").await;
    assert_eq!(v["subscribers"], 2, "{v}");
    assert_eq!(v["seq"], 1, "{v}");
    assert_eq!(v["presence"], json!({"clients":2,"users":1}), "{v}");

    // The server API needs an API key.
    let t = token("dave", json!({"subscribe": ["*"], "publish": ["*"]}));
    let res = common::http_client()
        .get(relay.http("/api/channels/presence:lobby"))
        .bearer_auth(t)
        .send()
        .await
        .unwrap();
    assert_http_error(&common::read_resp(res).await, 403, "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_its_commands_in_order_and_answers_each() {
    let relay = relay();
    let mut ws = connect(&relay, "erin").await;
    ws.subscribe("feed").await;
    let mut commands: Vec<Value> = (1..=50)
        .map(|i| json!({"publish":{"channel":"feed","data":i}}))
        .collect();
    commands.push(json!({"publish":{"channel":"bad channel!","data":0}}));
    commands.push(json!({"subscribe":{"user":"erin","channel":"extra"}}));
    let (status, v) = relay
        .post("/api/batch", &json!({ "commands": commands }))
        .await;
    assert_eq!(status, 200, "{v}");
    let replies = v["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 52);
    for (i, r) in replies[..50].iter().enumerate() {
        assert_eq!(r["result"]["seq"], i as u64 + 1, "{r}");
    }
    assert_eq!(replies[50]["error"]["code"], "invalid_channel");
    assert_eq!(replies[51]["result"]["channel"], "extra");
    for i in 1..=50u64 {
        assert_eq!(ws.expect_message("feed", i).await, i);
    }
    let v = ws.recv_json().await;
    assert_eq!(
        (&v["type"], &v["channel"]),
        (&json!("subscribed"), &json!("extra"))
    );

    let (status, v) = relay.post("/api/batch", &json!({"commands": []})).await;
    assert_http_error(&(status, v), 400, "bad_request");
    let (status, v) = relay
        .post("/api/users/disconnect", &json!({"reason":"no user"}))
        .await;
    assert_http_error(&(status, v), 400, "bad_request");
}
