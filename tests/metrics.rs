//! `GET /metrics`: Prometheus text with the documented names, moving with real traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Relay, Ws};
use serde_json::json;

async fn scrape(relay: &Relay) -> String {
    let resp = relay
        .client()
        .get(relay.http("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain"), "{ct}");
    resp.text().await.unwrap()
}

/// The value of the sample `name` (with its labels, as written), or panic.
fn value(text: &str, name: &str) -> f64 {
    common::sample(text, name).unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_traffic() {
    let relay = Relay::start(&[]);
    let mut a = Ws::connect(&relay.ws_url()).await;
    let mut b = Ws::connect(&relay.ws_url()).await;
    a.subscribe("m").await;
    b.subscribe("m").await;
    for i in 1..=5 {
        relay.publish("m", json!(i)).await;
    }
    for i in 1..=5 {
        a.expect_message("m", i).await;
        b.expect_message("m", i).await;
    }
    let text = scrape(&relay).await;
    for help in [
        "# HELP relay_connections ",
        "# HELP relay_messages_published_total ",
        "# HELP relay_frames_per_write ",
        "# HELP relay_fanout_latency_seconds ",
        "# TYPE relay_fanout_latency_seconds histogram",
    ] {
        assert!(text.contains(help), "missing {help:?} in:\n{text}");
    }
    assert_eq!(value(&text, "relay_connections{transport=\"ws\"}"), 2.0);
    assert_eq!(value(&text, "relay_subscriptions"), 2.0);
    assert_eq!(value(&text, "relay_messages_published_total"), 5.0);
    assert_eq!(value(&text, "relay_messages_delivered_total"), 10.0);
    assert!(value(&text, "relay_bytes_written_total") > 0.0);
    assert!(value(&text, "relay_frames_per_write_count") >= 1.0);
    // Each delivery went out in a write the pass made itself or one it woke a writer for.
    let direct = value(&text, "relay_direct_writes_total");
    let woken = value(&text, "relay_writer_wakes_total");
    assert!(direct + woken >= 1.0, "direct {direct}, woken {woken}");
    assert!(value(&text, "relay_fanout_latency_seconds_count") >= 1.0);

    drop(a);
    let mut gone = false;
    for _ in 0..50 {
        if value(&scrape(&relay).await, "relay_connections{transport=\"ws\"}") == 1.0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "a closed connection leaves the gauge");
}

/// An SSE stream's writes are counted too: each chunk it writes is one observation of
/// `relay_frames_per_write`, holding the events queued since the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_writes_count_in_frames_per_write() {
    let relay = Relay::start(&[]);
    let mut sse = common::Sse::connect(&relay.http("/sse?channel=f")).await;
    sse.expect_event("subscribed").await;
    for i in 1..=5 {
        relay.publish("f", json!(i)).await;
    }
    for i in 1..=5 {
        sse.expect_message("f", i).await;
    }
    let text = scrape(&relay).await;
    let writes = value(&text, "relay_frames_per_write_count");
    assert!((1.0..=5.0).contains(&writes), "{writes} writes");
    assert_eq!(value(&text, "relay_frames_per_write_sum"), 5.0);
}
