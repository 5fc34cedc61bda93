//! Publish exactly once and conditionally, against the real binary (memory backplane; the
//! window's test on the paused clock of an in-process server):
//! `idempotency_key` (a repeat within the window answers the first seq and publishes nothing)
//! and `expected_seq` (compare-and-set: one winner per seq).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{assert_http_error, Relay, Ws};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_publish_retried_ten_times_at_once_yields_one_message() {
    let relay = Relay::start(&[]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("orders").await;
    let body = json!({"channel":"orders","data":{"id":7},"idempotency_key":"order-7"});
    let answers: Vec<(u16, Value)> =
        futures_util::future::join_all((0..10).map(|_| relay.post("/api/publish", &body))).await;
    for (status, v) in &answers {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(v["seq"], 1, "{v}");
        assert_eq!(v["epoch"], answers[0].1["epoch"]);
    }
    let duplicates = answers
        .iter()
        .filter(|(_, v)| v["duplicate"] == true)
        .count();
    assert_eq!(duplicates, 9, "{answers:?}");
    assert_eq!(ws.expect_message("orders", 1).await, json!({"id":7}));
    // Nothing else: the next message is seq 2.
    relay.publish("orders", json!("next")).await;
    assert_eq!(ws.expect_message("orders", 2).await, "next");
    let h = relay.history("orders", "?since=0").await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 2, "{h}");
}

#[tokio::test(start_paused = true)]
async fn a_key_is_forgotten_after_the_window_and_applies_per_channel_in_broadcasts() {
    let args = ["--idempotency-window", "60s"];
    common::paused(&args, |relay: Relay| async move {
        let publish = |key: &str| json!({"channel":"w","data":1,"idempotency_key":key});
        let (_, a) = relay.post("/api/publish", &publish("k")).await;
        let (_, b) = relay.post("/api/publish", &publish("k")).await;
        assert_eq!(
            (&a["seq"], &b["seq"], &b["duplicate"]),
            (&json!(1), &json!(1), &json!(true))
        );
        // The window passes on the paused clock, at once.
        tokio::time::sleep(Duration::from_secs(61)).await;
        let (_, c) = relay.post("/api/publish", &publish("k")).await;
        assert_eq!(c["seq"], 2, "{c}");
        assert!(c.get("duplicate").is_none(), "{c}");

        // A broadcast retried after it reached one channel publishes on the others only.
        relay
            .post(
                "/api/publish",
                &json!({"channel":"b1","data":0,"idempotency_key":"bc"}),
            )
            .await;
        let (status, v) = relay
            .post(
                "/api/broadcast",
                &json!({"channels":["b1","b2"],"data":0,"idempotency_key":"bc"}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["results"][0]["duplicate"], true, "{v}");
        assert_eq!(v["results"][1]["seq"], 1, "{v}");
        assert!(v["results"][1].get("duplicate").is_none(), "{v}");

        let long = "x".repeat(129);
        let r = relay.post("/api/publish", &publish(&long)).await;
        assert_http_error(&r, 400, "bad_request");
        let r = relay.post("/api/publish", &publish("")).await;
        assert_http_error(&r, 400, "bad_request");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_publishes_of_ten_racing_writers_have_one_winner_per_seq() {
    let relay = Relay::start(&[]);
    const TARGET: u64 = 40;
    let writer = |w: u64| {
        let relay = &relay;
        async move {
            let mut top = 0u64;
            let mut won = Vec::new();
            // Bounded: every round someone wins, so TARGET rounds suffice for all; the cap is
            // far above what a fair race needs.
            for _ in 0..TARGET * 20 {
                if top >= TARGET {
                    break;
                }
                let (status, v) = relay
                    .post(
                        "/api/publish",
                        &json!({"channel":"cas","data":{"w":w,"after":top},"expected_seq":top}),
                    )
                    .await;
                match status {
                    200 => {
                        assert_eq!(v["seq"], top + 1, "{v}");
                        won.push(top + 1);
                        top += 1;
                    }
                    409 => {
                        assert_eq!(v["error"]["code"], "seq_mismatch", "{v}");
                        assert!(v["epoch"].is_string(), "{v}");
                        let now = v["seq"].as_u64().unwrap();
                        assert!(now > top, "a mismatch names a later top: {v}");
                        top = now;
                    }
                    other => panic!("status {other}: {v}"),
                }
            }
            won
        }
    };
    let results = futures_util::future::join_all((0..10).map(writer)).await;
    let mut seqs: Vec<u64> = results.into_iter().flatten().collect();
    seqs.sort_unstable();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want, "each seq has exactly one winner");
    assert!(seqs.len() as u64 >= TARGET, "{}", seqs.len());
    // And history agrees: every message says which top it expected, and it is its seq - 1.
    let h = relay.history("cas", "?since=0&limit=1000").await;
    for m in h["messages"].as_array().unwrap() {
        assert_eq!(
            m["data"]["after"].as_u64().unwrap() + 1,
            m["seq"].as_u64().unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_conditional_publish_that_went_through_is_not_a_mismatch() {
    let relay = Relay::start(&[]);
    let body = json!({"channel":"c","data":1,"expected_seq":0,"idempotency_key":"once"});
    let (s1, a) = relay.post("/api/publish", &body).await;
    let (s2, b) = relay.post("/api/publish", &body).await;
    assert_eq!((s1, s2), (200, 200), "{a} {b}");
    assert_eq!((&a["seq"], &b["seq"]), (&json!(1), &json!(1)));
    assert_eq!(b["duplicate"], true);
    // Without the key, the same condition now fails with the position.
    let (s3, c) = relay
        .post(
            "/api/publish",
            &json!({"channel":"c","data":1,"expected_seq":0}),
        )
        .await;
    assert_eq!(s3, 409, "{c}");
    assert_eq!((&c["seq"], &c["epoch"]), (&json!(1), &a["epoch"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_json_publishes_take_the_same_conditions() {
    let relay = Relay::start(&[]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    for _ in 0..2 {
        ws.send_json(json!({"type":"publish","channel":"j","data":1,"idempotency_key":"x","id":1}))
            .await;
        let v = ws.recv_json().await;
        assert_eq!(
            (&v["type"], &v["seq"]),
            (&json!("published"), &json!(1)),
            "{v}"
        );
    }
    ws.send_json(json!({"type":"publish","channel":"j","data":2,"expected_seq":0,"id":2}))
        .await;
    let v = ws.recv_json().await;
    assert_eq!(
        (&v["type"], &v["code"]),
        (&json!("error"), &json!("seq_mismatch")),
        "{v}"
    );
    ws.send_json(json!({"type":"publish","channel":"j","data":2,"expected_seq":1,"id":3}))
        .await;
    let v = ws.recv_json().await;
    assert_eq!(
        (&v["type"], &v["seq"]),
        (&json!("published"), &json!(2)),
        "{v}"
    );
    let h = relay.history("j", "?since=0").await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 2, "{h}");
}
