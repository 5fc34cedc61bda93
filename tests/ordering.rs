//! Per-channel total order under concurrent publishers (docs/protocol.md, "Sequence IDs and
//! epochs": first publish seq 1, then seq + 1, never a gap and never a repeat).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const PUBLISHERS: u64 = 10;
const PER_PUBLISHER: u64 = 100;
const TOTAL: u64 = PUBLISHERS * PER_PUBLISHER;
const CH: &str = "order:1";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_total_order() {
    let relay = Relay::in_process(&[]);

    // Several WebSocket subscribers (so they likely land on both shards) and one SSE stream.
    let mut readers: Vec<tokio::task::JoinHandle<Vec<(u64, Value)>>> = Vec::new();
    for _ in 0..4 {
        let mut ws = Ws::connect(&relay.ws_url()).await;
        let s = ws.subscribe(CH).await;
        assert_eq!(s["seq"], json!(0), "{s}");
        readers.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(TOTAL as usize);
            for _ in 0..TOTAL {
                let m = ws.recv_json().await;
                assert_eq!(m["type"], "message", "{m}");
                assert_eq!(m["channel"], CH, "{m}");
                out.push((m["seq"].as_u64().expect("seq"), m["data"].clone()));
            }
            out
        }));
    }
    let mut sse = Sse::connect(&relay.http(&format!("/sse?channel={CH}"))).await;
    let sub = sse.expect_event("subscribed").await;
    let epoch = assert_epoch(&sub.json()["channels"][0]["epoch"]);
    readers.push(tokio::spawn(async move {
        let mut out = Vec::with_capacity(TOTAL as usize);
        for _ in 0..TOTAL {
            let ev = sse.expect_event("message").await;
            let v = ev.json();
            let seq = v["seq"].as_u64().expect("seq");
            assert_eq!(ev.id, Some(format!("{epoch}:{seq}")), "{ev:?}");
            out.push((seq, v["data"].clone()));
        }
        out
    }));

    // 10 concurrent HTTP publishers, 100 messages each (sequential within a publisher).
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let client = relay.client().clone();
        let url = relay.http("/api/publish");
        publishers.push(tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(PER_PUBLISHER as usize);
            for n in 0..PER_PUBLISHER {
                let r = client
                    .post(&url)
                    .json(&json!({"channel":CH,"data":{"p":p,"n":n}}))
                    .send()
                    .await
                    .expect("publish request");
                assert_eq!(r.status().as_u16(), 200);
                let v: Value = r.json().await.expect("publish reply");
                seqs.push(v["seq"].as_u64().expect("seq in reply"));
            }
            seqs
        }));
    }

    let mut by_seq: HashMap<u64, Value> = HashMap::new();
    let mut all = Vec::new();
    for (p, h) in publishers.into_iter().enumerate() {
        let seqs = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("publisher finished within 60 s")
            .expect("publisher task");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a publisher's sequential publishes must get increasing seqs: {seqs:?}"
        );
        for (n, s) in seqs.iter().enumerate() {
            by_seq.insert(*s, json!({"p":p,"n":n}));
        }
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=TOTAL).collect::<Vec<_>>(),
        "publish replies must be exactly 1..={TOTAL}"
    );

    for (i, h) in readers.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("reader finished within 60 s")
            .expect("reader task");
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=TOTAL).collect::<Vec<_>>(),
            "subscriber {i} must see 1..={TOTAL} in order, exactly once"
        );
        for (s, d) in &got {
            assert_eq!(&by_seq[s], d, "subscriber {i}: data of seq {s}");
        }
    }
}
