//! HTTP API (docs/protocol.md, "HTTP API").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_required_on_api_paths() {
    let relay = Relay::in_process(&["--api-key", "k1", "--api-key", "k2"]);
    let c = relay.client();
    let url = relay.http("/api/publish");
    let body = json!({"channel":"a","data":1});

    assert_http_error(&send(c.post(&url).json(&body)).await, 401, "unauthorized");
    for bad in [
        "Bearer wrong",
        "Bearer k",
        "Bearer k1x",
        "Basic k1",
        "k1",
        "Bearer ",
    ] {
        let r = send(c.post(&url).header("authorization", bad).json(&body)).await;
        assert_http_error(&r, 401, "unauthorized");
    }

    let (s, b) = send(
        c.post(&url)
            .header("authorization", "Bearer k1")
            .json(&body),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["seq"],
        json!(1),
        "rejected requests must not publish: {b}"
    );
    let (s, b) = send(
        c.post(&url)
            .header("authorization", "Bearer k2")
            .json(&body),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["seq"], json!(2), "{b}");

    // Other /api/* paths too.
    assert_http_error(
        &send(c.get(relay.http("/api/channels"))).await,
        401,
        "unauthorized",
    );
    assert_http_error(
        &send(c.get(relay.http("/api/history/a"))).await,
        401,
        "unauthorized",
    );
    assert_http_error(
        &send(
            c.post(relay.http("/api/broadcast"))
                .json(&json!({"channels":["a"],"data":1})),
        )
        .await,
        401,
        "unauthorized",
    );
    let (s, b) = send(
        c.get(relay.http("/api/history/a"))
            .header("authorization", "Bearer k2"),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["seq"], json!(2), "{b}");

    // Health endpoints need no key.
    let (s, b) = send(c.get(relay.http("/healthz"))).await;
    assert_eq!((s, b), (200, json!({"status":"ok"})));
    let (s, b) = send(c.get(relay.http("/readyz"))).await;
    assert_eq!((s, b), (200, json!({"status":"ready"})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let relay = Relay::in_process(&[]);
    assert_eq!(relay.get("/healthz").await, (200, json!({"status":"ok"})));
    assert_eq!(relay.get("/readyz").await, (200, json!({"status":"ready"})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_returns_a_seq_per_channel() {
    let relay = Relay::in_process(&[]);
    let mut wa = Ws::connect(&relay.ws_url()).await;
    wa.subscribe("a").await;
    let mut wb = Ws::connect(&relay.ws_url()).await;
    wb.subscribe("b").await;
    let ea = assert_epoch(&relay.publish("a", json!(0)).await["epoch"]);
    relay.publish("a", json!(0)).await;
    wa.expect_message("a", 1).await;
    wa.expect_message("a", 2).await;

    let (s, b) = relay
        .post(
            "/api/broadcast",
            &json!({"channels":["a","b"],"data":{"x":1}}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let results = b["results"].as_array().expect("results array");
    assert_eq!(results.len(), 2, "{b}");
    assert_eq!(results[0]["channel"], "a", "{b}");
    assert_eq!(results[0]["seq"], json!(3), "{b}");
    assert_eq!(results[0]["epoch"], json!(ea), "{b}");
    assert_eq!(results[1]["channel"], "b", "{b}");
    assert_eq!(results[1]["seq"], json!(1), "{b}");
    assert_epoch(&results[1]["epoch"]);
    assert_eq!(wa.expect_message("a", 3).await, json!({"x":1}));
    assert_eq!(wb.expect_message("b", 1).await, json!({"x":1}));

    // Every channel is validated before any is published.
    let r = relay
        .post(
            "/api/broadcast",
            &json!({"channels":["a","bad name"],"data":1}),
        )
        .await;
    assert_http_error(&r, 400, "invalid_channel");
    // At most 100 channels.
    let many: Vec<String> = (0..101).map(|i| format!("m{i}")).collect();
    let (s, b) = relay
        .post("/api/broadcast", &json!({"channels":many,"data":1}))
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error"]["code"].is_string(), "{b}");
    // Missing data / wrong types.
    assert_http_error(
        &relay
            .post("/api/broadcast", &json!({"channels":["a"]}))
            .await,
        400,
        "bad_request",
    );
    assert_http_error(
        &relay
            .post("/api/broadcast", &json!({"channels":"a","data":1}))
            .await,
        400,
        "bad_request",
    );
    // None of the refused broadcasts published anything.
    assert_eq!(relay.history("a", "").await["seq"], json!(3));
    let m0 = relay.channel_info("m0").await;
    assert!(
        m0.as_ref().map(|i| i["seq"] == json!(0)).unwrap_or(true),
        "refused broadcast published to m0: {m0:?}"
    );
    // 100 channels is fine.
    let hundred: Vec<String> = (0..100).map(|i| format!("h{i}")).collect();
    let (s, b) = relay
        .post("/api/broadcast", &json!({"channels":hundred,"data":1}))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["results"].as_array().map(|r| r.len()), Some(100));
    // The next frame on `a` is the next live message, not something from a refused broadcast.
    relay.publish("a", json!("next")).await;
    assert_eq!(wa.expect_message("a", 4).await, json!("next"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_since_and_limit() {
    let relay = Relay::in_process(&[]);
    let epoch = assert_epoch(&relay.publish("h", json!({"n":1})).await["epoch"]);
    for n in 2..=10 {
        relay.publish("h", json!({"n":n})).await;
    }
    let msgs = |from: u64, to: u64| -> Value {
        Value::Array(
            (from..=to)
                .map(|n| json!({"seq":n,"data":{"n":n}}))
                .collect(),
        )
    };

    let h = relay.history("h", "").await;
    assert_eq!(
        h,
        json!({"channel":"h","epoch":epoch,"seq":10,"complete":true,"messages":msgs(1,10)})
    );
    let h = relay.history("h", "?since=7").await;
    assert_eq!(h["messages"], msgs(8, 10), "{h}");
    assert_eq!(h["complete"], json!(true), "{h}");
    assert_eq!(h["seq"], json!(10), "{h}");
    let h = relay.history("h", "?since=3&limit=2").await;
    assert_eq!(
        h["messages"],
        msgs(4, 5),
        "oldest first, at most limit: {h}"
    );
    assert_eq!(h["complete"], json!(true), "{h}");
    let h = relay.history("h", "?limit=3").await;
    assert_eq!(h["messages"], msgs(1, 3), "{h}");
    let h = relay.history("h", "?since=10").await;
    assert_eq!(h["messages"], json!([]), "{h}");
    assert_eq!(h["complete"], json!(true), "{h}");
    assert_eq!(h["seq"], json!(10), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_bounded_by_size() {
    let relay = Relay::in_process(&["--history-size", "5"]);
    for n in 1..=10 {
        relay.publish("s", json!(n)).await;
    }
    let h = relay.history("s", "").await;
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![6, 7, 8, 9, 10], "{h}");
    assert_eq!(h["complete"], json!(false), "history lost 1..=5: {h}");
    assert_eq!(h["seq"], json!(10), "{h}");
    let h = relay.history("s", "?since=5").await;
    assert_eq!(h["complete"], json!(true), "history holds 6: {h}");
    assert_eq!(h["messages"].as_array().unwrap().len(), 5, "{h}");
    let h = relay.history("s", "?since=4").await;
    assert_eq!(h["complete"], json!(false), "history lost 5: {h}");
    let h = relay.history("s", "?limit=100").await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 5, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_lists_subscriber_counts() {
    let relay = Relay::in_process(&[]);
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut ws = Ws::connect(&relay.ws_url()).await;
        ws.subscribe("c1").await;
        subs.push(ws);
    }
    relay.publish("c1", json!(1)).await;
    relay.publish("c1", json!(2)).await;
    relay.publish("c2", json!(1)).await;

    assert_eq!(
        relay.channel_info("c1").await,
        Some(json!({"channel":"c1","subscribers":3,"seq":2}))
    );
    assert_eq!(
        relay.channel_info("c2").await,
        Some(json!({"channel":"c2","subscribers":0,"seq":1}))
    );

    for ws in subs.iter_mut() {
        ws.expect_message("c1", 1).await;
        ws.expect_message("c1", 2).await;
    }

    // Unsubscribing and disconnecting are reflected.
    subs[0]
        .send_json(json!({"type":"unsubscribe","channel":"c1"}))
        .await;
    assert_eq!(subs[0].recv_json().await["type"], "unsubscribed");
    relay
        .wait_subscribers("c1", 2, Duration::from_secs(3))
        .await;
    drop(subs.pop());
    relay
        .wait_subscribers("c1", 1, Duration::from_secs(3))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors() {
    let relay = Relay::in_process(&[]);
    assert_http_error(
        &relay.post_raw("/api/publish", "{not json").await,
        400,
        "bad_json",
    );
    assert_http_error(
        &relay.post("/api/publish", &json!({"data":1})).await,
        400,
        "bad_request",
    );
    assert_http_error(
        &relay
            .post("/api/publish", &json!({"channel":5,"data":1}))
            .await,
        400,
        "bad_request",
    );
    assert_http_error(
        &relay.post("/api/publish", &json!({"channel":"a"})).await,
        400,
        "bad_request",
    );

    let long = "a".repeat(201);
    for bad in [
        "",
        "a b",
        "a\"b",
        "a*b",
        "a,b",
        "caf\u{e9}",
        "tab\t",
        long.as_str(),
    ] {
        let r = relay
            .post("/api/publish", &json!({"channel":bad,"data":1}))
            .await;
        assert_http_error(&r, 400, "invalid_channel");
    }
    let max = "z".repeat(200);
    for good in ["A-Za-z0-9:_-.@/=+!~$", max.as_str(), "x"] {
        let (s, b) = relay
            .post("/api/publish", &json!({"channel":good,"data":1}))
            .await;
        assert_eq!(s, 200, "{good:?} is a valid channel: {b}");
        assert_eq!(b["seq"], json!(1), "{b}");
    }

    assert_http_error(&relay.get("/nope").await, 404, "not_found");
    assert_http_error(&relay.get("/api/nope").await, 404, "not_found");
    assert_http_error(&relay.get("/api/publish").await, 405, "method_not_allowed");
    assert_http_error(
        &relay.post("/api/channels", &json!({})).await,
        405,
        "method_not_allowed",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_body_is_413() {
    let relay = Relay::in_process(&["--max-message-size", "1024"]);
    let big = json!({"channel":"a","data":"x".repeat(4096)});
    assert_http_error(
        &relay.post("/api/publish", &big).await,
        413,
        "payload_too_large",
    );
    let small = json!({"channel":"a","data":"x".repeat(800)});
    let (s, b) = relay.post("/api/publish", &small).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["seq"],
        json!(1),
        "the refused body must not have been published: {b}"
    );
}
