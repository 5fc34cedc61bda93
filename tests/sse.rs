//! Server-Sent Events (docs/protocol.md, "Server-Sent Events: GET /sse").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_round_trip() {
    let relay = Relay::in_process(&[]);
    let mut sse = Sse::connect(&relay.http("/sse?channel=x")).await;
    assert_eq!(
        sse.headers
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("*"),
        "SSE must carry Access-Control-Allow-Origin: *"
    );

    let sub = sse.expect_event("subscribed").await;
    // The stream opens with a retry hint (default 1000 ms) before the subscribed event.
    assert_eq!(sse.retries, vec!["1000".to_string()], "retry hint");
    let d = sub.json();
    let chans = d["channels"].as_array().expect("channels array");
    assert_eq!(chans.len(), 1, "{d}");
    assert_eq!(chans[0]["channel"], "x", "{d}");
    assert_eq!(chans[0]["seq"], json!(0), "{d}");
    assert_eq!(chans[0]["recovered"], json!(false), "{d}");
    let epoch = assert_epoch(&chans[0]["epoch"]);
    assert_eq!(sub.id, Some(format!("{epoch}:0")), "subscribed id");

    let r = relay.publish("x", json!({"text":"hi"})).await;
    assert_eq!(r["seq"], json!(1));
    assert_eq!(r["epoch"], json!(epoch));
    let m = sse.expect_message("x", 1).await;
    assert_eq!(m.id, Some(format!("{epoch}:1")));
    assert_eq!(
        m.json(),
        json!({"channel":"x","seq":1,"data":{"text":"hi"}}),
        "message event data"
    );

    // Escaped line breaks inside strings survive; the event stays one data line.
    relay.publish("x", json!({"s":"l1\nl2\r\nl3"})).await;
    let m = sse.expect_message("x", 2).await;
    assert!(
        !m.data.contains('\n'),
        "data must be one line: {:?}",
        m.data
    );
    assert_eq!(m.json()["data"], json!({"s":"l1\nl2\r\nl3"}));

    // Raw line breaks between tokens become spaces (SSE cannot carry them).
    let (status, body) = relay
        .post_raw(
            "/api/publish",
            "{\"channel\":\"x\",\n\"data\":{\"a\":\n[1,\n2]}}",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let m = sse.expect_message("x", 3).await;
    assert_eq!(m.id, Some(format!("{epoch}:3")));
    assert!(
        !m.data.contains('\n'),
        "data must be one line: {:?}",
        m.data
    );
    assert!(m.data.contains(r#"{"a": [1, 2]}"#), "{:?}", m.data);
    assert_eq!(m.json()["data"], json!({"a":[1,2]}));

    // A second stream on a channel with history starts at its latest seq.
    let mut sse2 = Sse::connect(&relay.http("/sse?channel=x")).await;
    let sub = sse2.expect_event("subscribed").await;
    assert_eq!(sub.id, Some(format!("{epoch}:3")));
    assert_eq!(
        sub.json(),
        json!({"channels":[{"channel":"x","epoch":epoch,"seq":3,"recovered":false}]})
    );
    relay.publish("x", json!(null)).await;
    let m = sse2.expect_message("x", 4).await;
    assert_eq!(m.json(), json!({"channel":"x","seq":4,"data":null}));
    sse.expect_message("x", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_multi_channel_cursor() {
    let relay = Relay::in_process(&[]);
    let ea = relay.publish("a", json!("before")).await["epoch"]
        .as_str()
        .unwrap()
        .to_string();

    let mut sse = Sse::connect(&relay.http("/sse?channel=a&channel=b")).await;
    let sub = sse.expect_event("subscribed").await;
    let d = sub.json();
    let chans = d["channels"].as_array().expect("channels array");
    assert_eq!(chans.len(), 2, "{d}");
    assert_eq!(
        chans[0]["channel"], "a",
        "order follows the channel params: {d}"
    );
    assert_eq!(chans[0]["seq"], json!(1), "{d}");
    assert_eq!(chans[0]["epoch"], json!(ea), "{d}");
    assert_eq!(chans[1]["channel"], "b", "{d}");
    assert_eq!(chans[1]["seq"], json!(0), "{d}");
    let eb = assert_epoch(&chans[1]["epoch"]);
    assert_eq!(sub.id, Some(format!("{ea}:1,{eb}:0")));

    relay.publish("b", json!("b1")).await;
    let m = sse.expect_message("b", 1).await;
    assert_eq!(m.id, Some(format!("{ea}:1,{eb}:1")));
    assert_eq!(m.json(), json!({"channel":"b","seq":1,"data":"b1"}));

    relay.publish("a", json!("a2")).await;
    let m = sse.expect_message("a", 2).await;
    assert_eq!(m.id, Some(format!("{ea}:2,{eb}:1")));
    assert_eq!(m.json(), json!({"channel":"a","seq":2,"data":"a2"}));

    // Channel order in the URL decides cursor order.
    let mut rev = Sse::connect(&relay.http("/sse?channel=b&channel=a")).await;
    let sub = rev.expect_event("subscribed").await;
    assert_eq!(sub.id, Some(format!("{eb}:1,{ea}:2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_keepalive_and_retry_flag() {
    let relay = Relay::in_process(&["--sse-keepalive", "300ms", "--sse-retry", "2500ms"]);
    let mut sse = Sse::connect(&relay.http("/sse?channel=k")).await;
    sse.expect_event("subscribed").await;
    assert_eq!(
        sse.retries,
        vec!["2500".to_string()],
        "retry hint from --sse-retry"
    );
    assert!(
        sse.wait_comment(": keep-alive", Duration::from_secs(3))
            .await,
        "no `: keep-alive` comment within 3 s with --sse-keepalive 300ms; lines: {:?}",
        sse.raw_lines
    );
    // Still delivering after keep-alives.
    relay.publish("k", json!(1)).await;
    sse.expect_message("k", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_http_errors() {
    let relay = Relay::in_process(&["--max-subscriptions", "2"]);
    let err = |path: &'static str, headers: Vec<(&'static str, &'static str)>| {
        let url = relay.http(path);
        async move { read_resp(Sse::request(&url, &headers).await).await }
    };

    // no channel
    assert_http_error(&err("/sse", vec![]).await, 400, "bad_request");
    // invalid channels
    assert_http_error(
        &err("/sse?channel=a%20b", vec![]).await,
        400,
        "invalid_channel",
    );
    assert_http_error(&err("/sse?channel=", vec![]).await, 400, "invalid_channel");
    assert_http_error(
        &err("/sse?channel=ok&channel=no*pe", vec![]).await,
        400,
        "invalid_channel",
    );
    // more than --max-subscriptions channels
    let (status, body) = err("/sse?channel=a&channel=b&channel=c", vec![]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    // malformed cursor, as query and as header
    let (status, body) = err("/sse?channel=a&last_event_id=garbage", vec![]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    let (status, body) = err("/sse?channel=a", vec![("last-event-id", "garbage")]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");

    // ... and exactly --max-subscriptions channels is fine.
    let mut ok = Sse::connect(&relay.http("/sse?channel=a&channel=b")).await;
    ok.expect_event("subscribed").await;
}

/// Many messages queued between two writes go out as one chunk; each still carries its own
/// cursor (`id:`) and arrives once, in order. Two channels on one stream: the cursor moves the
/// position of the message's own channel and keeps the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_arrives_whole_in_order_with_a_cursor_per_event() {
    let relay = Relay::in_process(&[]);
    let mut sse = Sse::connect(&relay.http("/sse?channel=b1&channel=b2")).await;
    let sub = sse.expect_event("subscribed").await.json();
    let e1 = assert_epoch(&sub["channels"][0]["epoch"]);
    let e2 = assert_epoch(&sub["channels"][1]["epoch"]);
    const N: u64 = 300;
    // Published concurrently, so that the pump finds several at a time.
    let publishes = (1..=N).map(|i| {
        let relay = &relay;
        async move {
            let ch = if i % 3 == 0 { "b2" } else { "b1" };
            relay.publish(ch, json!({"i": i})).await
        }
    });
    futures_util::future::join_all(publishes).await;
    let (mut s1, mut s2) = (0u64, 0u64);
    for _ in 0..N {
        let ev = sse.expect_event("message").await;
        let v = ev.json();
        if v["channel"] == "b1" {
            s1 += 1;
            assert_eq!(v["seq"], json!(s1), "{ev:?}");
        } else {
            s2 += 1;
            assert_eq!(v["seq"], json!(s2), "{ev:?}");
        }
        assert_eq!(ev.id, Some(format!("{e1}:{s1},{e2}:{s2}")), "{ev:?}");
    }
    assert_eq!((s1, s2), (N - N / 3, N / 3));
}
