//! A fleet arriving at once (issue 12, item 5): connections that upgrade and subscribe while a
//! channel already holds thousands of subscribers and streams messages each get `subscribed`
//! and then every message after their position, once and in order; the subscribers already
//! there miss nothing meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use serde_json::json;

const CHANNEL: &str = "crowd";
/// Subscribers in the channel before the crowd arrives.
const HOLDERS: usize = 2_000;
/// Connections arriving while the channel streams.
const ARRIVING: usize = 500;
/// Messages published (one at a time) while they arrive; message `i` has seq `i`.
const MESSAGES: u64 = 40;

async fn subscriber(addr: std::net::SocketAddr) -> (RawWs, u64) {
    let mut ws = RawWs::connect(addr).await;
    ws.send_json(json!({"type": "subscribe", "channel": CHANNEL}))
        .await;
    let v = ws.recv_json().await;
    assert_subscribed(&v, CHANNEL);
    let seq = v["seq"].as_u64().unwrap();
    (ws, seq)
}

/// Reads the messages after `from` up to the last one: each once, in order, with its data.
async fn expect_rest(mut ws: RawWs, from: u64) {
    for seq in from + 1..=MESSAGES {
        let v = ws.recv_json().await;
        assert_eq!(v["type"], "message", "after seq {}: {v}", seq - 1);
        assert_eq!(
            v["seq"],
            json!(seq),
            "expected seq {seq} (resumed from {from}): {v}"
        );
        assert_eq!(v["data"], json!(seq), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_arriving_in_a_busy_channel_gets_every_message_once_in_order() {
    let relay = Arc::new(Relay::in_process(&[
        "--shards",
        "1",
        "--max-connections-per-ip",
        "0",
        "--rate-limit",
        "0",
    ]));
    let addr = relay.addr();
    let mut holders = Vec::with_capacity(HOLDERS);
    for chunk in 0..HOLDERS / 250 {
        let opened = join_all((0..250).map(|_| subscriber(addr))).await;
        for (ws, seq) in opened {
            assert_eq!(seq, 0, "chunk {chunk}: nothing published yet");
            holders.push(ws);
        }
    }

    let publisher = {
        let relay = relay.clone();
        tokio::spawn(async move {
            for i in 1..=MESSAGES {
                assert_eq!(relay.publish_seq(CHANNEL, json!(i)).await, i);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // All at once: the listener's queue holds them until the shard takes them in batches.
    let arrivals = (0..ARRIVING).map(|_| {
        tokio::spawn(async move {
            let (ws, from) = subscriber(addr).await;
            expect_rest(ws, from).await;
            from
        })
    });
    let arrived = tokio::time::timeout(Duration::from_secs(60), join_all(arrivals))
        .await
        .expect("the crowd is served within a minute");
    publisher.await.unwrap();
    let froms: Vec<u64> = arrived.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(froms.len(), ARRIVING);

    tokio::time::timeout(
        Duration::from_secs(60),
        join_all(holders.into_iter().map(|ws| expect_rest(ws, 0))),
    )
    .await
    .expect("the holders read everything within a minute");
}
