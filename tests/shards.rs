//! Per-core shards: every shard accepts connections (the kernel spreads them with
//! SO_REUSEPORT), and a message published on one shard reaches subscribers on every shard.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{Relay, Ws};
use serde_json::json;

const SHARDS: usize = 4;

/// Connects until every shard has `per_shard` subscribers of `channel` (bounded attempts).
async fn spread(relay: &Relay, channel: &str, per_shard: usize) -> BTreeMap<usize, Vec<Ws>> {
    let mut by_shard: BTreeMap<usize, Vec<Ws>> = BTreeMap::new();
    for _ in 0..400 {
        if by_shard.len() == SHARDS && by_shard.values().all(|v| v.len() >= per_shard) {
            break;
        }
        let (inner, resp) = tokio_tungstenite::connect_async(relay.ws_url())
            .await
            .unwrap();
        let shard: usize = resp.headers()["x-relay-shard"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(shard < SHARDS, "shard {shard} out of range");
        let mut ws = Ws { inner };
        let list = by_shard.entry(shard).or_default();
        if list.len() < per_shard {
            ws.subscribe(channel).await;
            list.push(ws);
        }
    }
    assert_eq!(
        by_shard.len(),
        SHARDS,
        "every shard accepts connections: {:?}",
        by_shard.keys()
    );
    by_shard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_accepts_and_fan_out_crosses_shards() {
    let relay = Relay::start(&["--shards", "4"]);
    let mut subs = spread(&relay, "x", 2).await;

    // Publish over WebSocket from a connection of each shard in turn: every subscriber on every
    // shard gets every message, in order.
    let mut seq = 0;
    for shard in 0..SHARDS {
        let publisher = &mut subs.get_mut(&shard).unwrap()[0];
        publisher
            .send_json(json!({"type":"publish","channel":"x","data":{"from":shard},"id":shard}))
            .await;
        seq += 1;
        for list in subs.values_mut() {
            for ws in list.iter_mut() {
                // The publisher also gets its `published` reply, before or after the message.
                loop {
                    let v = ws.recv_json().await;
                    if v["type"] == "published" {
                        assert_eq!(v["seq"], json!(seq));
                        continue;
                    }
                    assert_eq!(v["type"], "message", "{v}");
                    assert_eq!(v["seq"], json!(seq));
                    assert_eq!(v["data"], json!({"from": shard}));
                    break;
                }
            }
        }
        // The publisher's reply may still be queued after its own copy of the message.
        let publisher = &mut subs.get_mut(&shard).unwrap()[0];
        if let Some(v) = publisher
            .recv_json_within(std::time::Duration::from_millis(200))
            .await
        {
            assert_eq!(v["type"], "published", "{v}");
        }
    }
    let info = relay.channel_info("x").await.unwrap();
    assert_eq!(info["subscribers"], json!(SHARDS * 2));
}
