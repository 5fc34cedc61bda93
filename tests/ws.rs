//! WebSocket commands and replies (docs/protocol.md, "WebSocket: GET /ws").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_round_trip() {
    let relay = Relay::in_process(&[]);
    let mut sub = Ws::connect(&relay.ws_url()).await;

    // subscribe -> subscribed (seq 0, recovered false, epoch string), id echoed
    sub.send_json(json!({"type":"subscribe","id":1,"channel":"room:1"}))
        .await;
    let s = sub.recv_json().await;
    assert_subscribed(&s, "room:1");
    assert_eq!(s["id"], json!(1), "{s}");
    assert_eq!(s["seq"], json!(0), "{s}");
    assert_eq!(s["recovered"], json!(false), "{s}");
    let epoch = assert_epoch(&s["epoch"]);

    // publish via HTTP API -> message seq 1 with the same data
    let r = relay.publish("room:1", json!({"text":"hi"})).await;
    assert_eq!(r["seq"], json!(1), "{r}");
    assert_eq!(r["epoch"], json!(epoch), "{r}");
    let data = sub.expect_message("room:1", 1).await;
    assert_eq!(data, json!({"text":"hi"}));

    // publish via WS from another connection -> published (id echoed), subscriber gets it
    let mut publisher = Ws::connect(&relay.ws_url()).await;
    publisher
        .send_json(json!({"type":"publish","id":"p-7","channel":"room:1","data":[1,null,"x", {"k":"h\u{e9}llo \u{2603}"}]}))
        .await;
    let p = publisher.recv_json().await;
    assert_eq!(p["type"], "published", "{p}");
    assert_eq!(p["id"], json!("p-7"), "{p}");
    assert_eq!(p["channel"], json!("room:1"), "{p}");
    assert_eq!(p["seq"], json!(2), "{p}");
    assert_eq!(p["epoch"], json!(epoch), "{p}");
    let data = sub.expect_message("room:1", 2).await;
    assert_eq!(data, json!([1, null, "x", {"k":"h\u{e9}llo \u{2603}"}]));

    // data may be null
    publisher
        .send_json(json!({"type":"publish","id":3,"channel":"room:1","data":null}))
        .await;
    let p = publisher.recv_json().await;
    assert_eq!(p["type"], "published", "{p}");
    assert_eq!(p["id"], json!(3), "{p}");
    assert_eq!(p["seq"], json!(3), "{p}");
    let m = sub.recv_json().await;
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["seq"], json!(3), "{m}");
    assert_eq!(
        m.get("data"),
        Some(&Value::Null),
        "data null must be carried: {m}"
    );

    // A publisher that also subscribes receives its own message (order vs. reply unspecified).
    sub.send_json(json!({"type":"publish","id":"own","channel":"room:1","data":"mine"}))
        .await;
    let a = sub.recv_json().await;
    let b = sub.recv_json().await;
    let (reply, msg) = if a["type"] == "published" {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(reply["type"], "published", "{reply}");
    assert_eq!(reply["id"], json!("own"), "{reply}");
    assert_eq!(reply["seq"], json!(4), "{reply}");
    assert_eq!(msg["type"], "message", "{msg}");
    assert_eq!(msg["seq"], json!(4), "{msg}");
    assert_eq!(msg["data"], json!("mine"), "{msg}");

    // the publisher (not subscribed) receives no message frames
    assert!(
        publisher
            .recv_json_within(Duration::from_millis(300))
            .await
            .is_none(),
        "unsubscribed publisher got a frame"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_heartbeat_unsubscribe_and_subscription_errors() {
    let relay = Relay::in_process(&[]);
    let mut ws = Ws::connect(&relay.ws_url()).await;

    ws.send_json(json!({"type":"heartbeat"})).await;
    let h = ws.recv_json().await;
    assert_eq!(h["type"], "heartbeat", "{h}");
    ws.send_json(json!({"type":"heartbeat","id":"hb"})).await;
    let h = ws.recv_json().await;
    assert_eq!(h["type"], "heartbeat", "{h}");
    assert_eq!(h["id"], json!("hb"), "{h}");

    ws.subscribe("a").await;
    ws.expect_error_for(
        r#"{"type":"subscribe","id":10,"channel":"a"}"#,
        "already_subscribed",
        Some(json!(10)),
    )
    .await;
    ws.expect_error_for(
        r#"{"type":"unsubscribe","id":11,"channel":"never"}"#,
        "not_subscribed",
        Some(json!(11)),
    )
    .await;

    ws.send_json(json!({"type":"unsubscribe","id":12,"channel":"a"}))
        .await;
    let u = ws.recv_json().await;
    assert_eq!(u["type"], "unsubscribed", "{u}");
    assert_eq!(u["id"], json!(12), "{u}");
    assert_eq!(u["channel"], json!("a"), "{u}");

    // After unsubscribing nothing from "a" arrives; "b" still flows.
    ws.subscribe("b").await;
    relay.publish("a", json!("gone")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.publish("b", json!("here")).await;
    let m = ws.recv_json().await;
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(
        m["channel"],
        json!("b"),
        "got a message after unsubscribe: {m}"
    );
    assert_eq!(m["seq"], json!(1), "{m}");

    // Subscribing again to "a" reports its current seq.
    let s = ws.subscribe("a").await;
    assert_eq!(s["seq"], json!(1), "{s}");
    assert_eq!(s["recovered"], json!(false), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_too_many_subscriptions() {
    let relay = Relay::in_process(&["--max-subscriptions", "2"]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("one").await;
    ws.subscribe("two").await;
    ws.expect_error_for(
        r#"{"type":"subscribe","id":"third","channel":"three"}"#,
        "too_many_subscriptions",
        Some(json!("third")),
    )
    .await;
    // The two existing subscriptions still work.
    relay.publish("two", json!(2)).await;
    ws.expect_message("two", 1).await;
    // Freeing one slot allows a new subscription.
    ws.send_json(json!({"type":"unsubscribe","channel":"one"}))
        .await;
    assert_eq!(ws.recv_json().await["type"], "unsubscribed");
    ws.subscribe("three").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_binary_frame_is_unsupported_and_connection_stays() {
    let relay = Relay::in_process(&[]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.send_msg(Message::Binary(vec![1u8, 2, 3].into())).await;
    let e = ws.recv_json().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], "unsupported_frame", "{e}");
    ws.subscribe("x").await;
    relay.publish("x", json!(1)).await;
    ws.expect_message("x", 1).await;
}

/// `data` is forwarded byte for byte, except raw line breaks between tokens become spaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_data_forwarded_verbatim() {
    let relay = Relay::in_process(&[]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("v").await;

    // Unusual but valid formatting survives exactly.
    let raw = r#"{"channel":"v","data":{"b" :  1.50,"a":[true , "x\ny"],"e":1e3}}"#;
    let (status, body) = relay.post_raw("/api/publish", raw).await;
    assert_eq!(status, 200, "{body}");
    let m = ws.recv_text().await;
    assert!(
        m.contains(r#"{"b" :  1.50,"a":[true , "x\ny"],"e":1e3}"#),
        "data not forwarded byte for byte: {m}"
    );

    // Raw line breaks between tokens become spaces.
    let raw = "{\"channel\":\"v\",\"data\":{\"a\":\n[1,\n2]}}";
    let (status, body) = relay.post_raw("/api/publish", raw).await;
    assert_eq!(status, 200, "{body}");
    let m = ws.recv_text().await;
    assert!(
        m.contains(r#"{"a": [1, 2]}"#),
        "line breaks should become spaces: {m:?}"
    );
    let v: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(v["seq"], json!(2));
    assert_eq!(v["data"], json!({"a":[1,2]}));
}
