//! Presence over WebSocket and HTTP: per-user join/leave events, heartbeats and timeouts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Relay, Ws};
use serde_json::{json, Value};

const PRESENCE: &[&str] = &["--presence-channels", "presence:*"];

/// Subscribes with a presence identity and returns the `subscribed` reply.
async fn join(ws: &mut Ws, channel: &str, user: &str, info: Value) -> Value {
    ws.send_json(
        json!({"type":"subscribe","channel":channel,"presence":{"user":user,"info":info}}),
    )
    .await;
    let v = ws.recv_json().await;
    assert_eq!(v["type"], "subscribed", "{v}");
    v
}

/// Next presence event, skipping nothing: anything else fails.
async fn presence_event(ws: &mut Ws) -> (String, String, u64) {
    let v = ws.recv_json().await;
    assert_eq!(v["type"], "presence", "expected a presence event, got {v}");
    assert!(v["client"].is_string(), "{v}");
    (
        v["event"].as_str().unwrap().to_owned(),
        v["user"].as_str().unwrap().to_owned(),
        v["seq"].as_u64().expect("presence event without seq"),
    )
}

async fn close_cleanly(ws: Ws) {
    ws.close_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_are_per_user_and_ordered() {
    let relay = Relay::in_process(PRESENCE);
    let ch = "presence:room";
    let mut obs = Ws::connect(&relay.ws_url()).await;
    join(&mut obs, ch, "observer", json!({"role":"watch"})).await;
    assert_eq!(
        presence_event(&mut obs).await,
        ("join".into(), "observer".into(), 0)
    );

    let mut a1 = Ws::connect(&relay.ws_url()).await;
    join(&mut a1, ch, "alice", json!({"name":"Alice"})).await;
    let v = obs.recv_json().await;
    assert_eq!(
        (v["event"].as_str(), v["user"].as_str()),
        (Some("join"), Some("alice"))
    );
    assert_eq!(v["info"], json!({"name":"Alice"}), "info is carried: {v}");

    // A message between joins: bob's join carries the channel position after it.
    assert_eq!(relay.publish_seq(ch, json!("hello")).await, 1);
    obs.expect_message(ch, 1).await;

    let mut a2 = Ws::connect(&relay.ws_url()).await;
    join(&mut a2, ch, "alice", json!({})).await; // second connection of alice: no event
    let mut b = Ws::connect(&relay.ws_url()).await;
    join(&mut b, ch, "bob", json!({})).await;
    assert_eq!(
        presence_event(&mut obs).await,
        ("join".into(), "bob".into(), 1)
    );

    close_cleanly(a1).await; // alice still has a2: no event
    a2.send_json(json!({"type":"unsubscribe","channel":ch}))
        .await;
    // a2 has presence events of its own queued before the reply.
    loop {
        let v = a2.recv_json().await;
        if v["type"] == "unsubscribed" {
            break;
        }
        assert_eq!(v["type"], "presence", "{v}");
    }
    assert_eq!(
        presence_event(&mut obs).await,
        ("leave".into(), "alice".into(), 1)
    );
    close_cleanly(b).await;
    assert_eq!(
        presence_event(&mut obs).await,
        ("leave".into(), "bob".into(), 1)
    );
    assert!(
        obs.recv_json_within(Duration::from_millis(400))
            .await
            .is_none(),
        "no event beyond one join and one leave per user"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_and_http_presence_queries_agree() {
    let relay = Relay::in_process(PRESENCE);
    let ch = "presence:q";
    let mut conns = Vec::new();
    for user in ["ann", "ann", "ben"] {
        let mut ws = Ws::connect(&relay.ws_url()).await;
        join(&mut ws, ch, user, json!({"u": user})).await;
        conns.push(ws);
    }
    // An anonymous member counts as a user of its own, named by its client id.
    let mut anon = Ws::connect(&relay.ws_url()).await;
    anon.subscribe(ch).await;

    let q = &mut conns[0];
    // Skip the presence events queued for this connection.
    q.send_json(json!({"type":"presence","channel":ch,"id":7}))
        .await;
    let state = loop {
        let v = q.recv_json().await;
        if v["type"] == "presence_state" {
            break v;
        }
        assert_eq!(v["type"], "presence", "{v}");
    };
    assert_eq!(state["id"], 7);
    assert_eq!(state["channel"], ch);
    let ws_members: Vec<(String, String)> = state["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["client"].as_str().unwrap().into(),
                m["user"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(ws_members.len(), 4);
    let anon_member = ws_members
        .iter()
        .find(|(c, u)| c == u)
        .expect("anonymous member");
    assert_eq!(ws_members.iter().filter(|(_, u)| u == "ann").count(), 2);

    let (status, http) = relay.get("/api/presence/presence:q").await;
    assert_eq!(status, 200);
    let mut http_members: Vec<(String, String)> = http["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["client"].as_str().unwrap().into(),
                m["user"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut sorted = ws_members.clone();
    sorted.sort();
    http_members.sort();
    assert_eq!(http_members, sorted);
    assert!(http_members.contains(anon_member));

    let (status, stats) = relay.get("/api/presence/presence:q/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats, json!({"channel":"presence:q","clients":4,"users":3}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_opt_in_per_channel_and_identity_can_be_locked() {
    let relay = Relay::in_process(&[
        "--presence-channels",
        "presence:*",
        "--client-presence",
        "false",
    ]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.expect_error_for(
        r#"{"type":"presence","channel":"plain","id":1}"#,
        "presence_disabled",
        Some(json!(1)),
    )
    .await;
    let (status, body) = relay.get("/api/presence/plain").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "presence_disabled");
    ws.expect_error_for(
        r#"{"type":"subscribe","channel":"presence:x","presence":{"user":"mallory"},"id":2}"#,
        "forbidden",
        Some(json!(2)),
    )
    .await;
    ws.expect_error_for(
        r#"{"type":"subscribe","channel":"presence:x","presence":{"user":""}}"#,
        "bad_request",
        None,
    )
    .await;
    // Without a claimed identity it joins as itself.
    ws.subscribe("presence:x").await;
    let v = ws.recv_json().await;
    assert_eq!(v["type"], "presence");
    assert_eq!(v["user"], v["client"]);
}
