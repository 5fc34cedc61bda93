//! Slow-consumer policies other than disconnect (which tests/robustness.rs covers): `drop`
//! skips messages and announces the gap, `conflate` keeps only the latest; neither closes the
//! slow client, and neither slows down a normal subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{assert_subscribed, RawRead, RawWs, Relay, Ws, OP_CLOSE, OP_TEXT};
use serde_json::{json, Value};

const N: u64 = 400;
const PAD: usize = 16 * 1024;

/// Publishes `N` padded messages to `channel` while a normal subscriber (never more than two
/// messages behind) receives all of them; the slow client subscribed before and reads nothing.
async fn burst(relay: &Relay, channel: &str) -> RawWs {
    let mut slow = RawWs::connect_with_rcvbuf(relay.addr(), 4096).await;
    slow.send_json(json!({"type":"subscribe","channel":channel}))
        .await;
    assert_subscribed(&slow.recv_json().await, channel);

    let mut fast = Ws::connect(&relay.ws_url()).await;
    fast.subscribe(channel).await;
    let (tx, mut progress) = tokio::sync::watch::channel(0u64);
    let ch = channel.to_owned();
    let reader = tokio::spawn(async move {
        for i in 1..=N {
            fast.expect_message(&ch, i).await;
            let _ = tx.send(i);
        }
    });
    let pad = "x".repeat(PAD);
    let publish = async {
        for i in 1..=N {
            progress.wait_for(|&got| got + 2 >= i).await.unwrap();
            assert_eq!(relay.publish_seq(channel, json!({"pad": pad})).await, i);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), publish)
        .await
        .expect("publishing finished within 60 s");
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the normal subscriber got everything")
        .unwrap();
    slow
}

/// Reads the slow client until seq `last` is covered (by a message, or by a gap notice that
/// reaches it); returns every message seq and every gap notice (`from`, `to`) in arrival order.
async fn read_until(slow: &mut RawWs, last: u64) -> Vec<(String, u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match slow.read_frame(left).await {
            RawRead::Frame(f) if f.opcode == OP_TEXT => {
                let v: Value = serde_json::from_slice(&f.payload).unwrap();
                match v["type"].as_str() {
                    Some("message") => {
                        let seq = v["seq"].as_u64().unwrap();
                        seen.push(("message".into(), seq, seq));
                        if seq == last {
                            return seen;
                        }
                    }
                    Some("gap") => {
                        let to = v["to"].as_u64().unwrap();
                        seen.push(("gap".into(), v["from"].as_u64().unwrap(), to));
                        if to >= last {
                            return seen;
                        }
                    }
                    _ => panic!("unexpected frame {v}"),
                }
            }
            RawRead::Frame(f) if f.opcode == OP_CLOSE => {
                panic!(
                    "the slow client was closed ({}) under a non-disconnect policy",
                    f.close_code()
                )
            }
            RawRead::Frame(_) => {}
            RawRead::Eof => panic!("the slow client was disconnected"),
            RawRead::Timeout => panic!("seq {last} never arrived; saw {} frames", seen.len()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_policy_skips_and_announces_every_missed_range() {
    // History must hold the 400 × 16 KiB burst for the last check (the default keeps 1MiB).
    let relay = Relay::in_process(&[
        "--max-outbox-bytes",
        "65536",
        "--slow-consumer",
        "drop",
        "--history-max-bytes",
        "16MiB",
    ]);
    let mut slow = burst(&relay, "feed").await;
    // Reading drains the outbox; the writer then flushes the pending gap notice by itself.
    let mut seen = read_until(&mut slow, N).await;
    // Once it keeps up again it gets messages as usual.
    assert_eq!(relay.publish_seq("feed", json!("last")).await, N + 1);
    seen.extend(read_until(&mut slow, N + 1).await);
    assert_eq!(seen.last().unwrap(), &("message".to_owned(), N + 1, N + 1));

    let gaps = seen.iter().filter(|(k, _, _)| k == "gap").count();
    assert!(
        gaps >= 1,
        "a slow client under drop must have missed something"
    );
    // Every seq 1..=N+1 is covered exactly once, in order, by a message or a gap range.
    let mut next = 1;
    for (kind, from, to) in &seen {
        assert_eq!(
            *from,
            next,
            "{kind} {from}..={to} after seq {}: {seen:?}",
            next - 1
        );
        assert!(to >= from);
        next = to + 1;
    }
    assert_eq!(next, N + 2);
    // History holds what the gap notices name.
    let (first_gap_from, first_gap_to) = seen
        .iter()
        .find(|(k, _, _)| k == "gap")
        .map(|(_, f, t)| (*f, *t))
        .unwrap();
    let h = relay
        .history("feed", &format!("?since={}&limit=1", first_gap_from - 1))
        .await;
    assert_eq!(h["messages"][0]["seq"], json!(first_gap_from));
    assert!(first_gap_to <= N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflate_policy_delivers_the_latest_without_disconnecting() {
    let relay = Relay::in_process(&[
        "--max-outbox-bytes",
        "65536",
        "--slow-consumer",
        "ticker:*=conflate",
        "--slow-consumer",
        "disconnect",
    ]);
    let mut slow = burst(&relay, "ticker:abc").await;
    // No new publish: the latest (seq N) must still arrive, flushed when the writer drains.
    let seen = read_until(&mut slow, N).await;
    assert!(
        seen.iter().all(|(k, _, _)| k == "message"),
        "no gap notices under conflate"
    );
    let seqs: Vec<u64> = seen.iter().map(|(_, s, _)| *s).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, no repeats: {seqs:?}"
    );
    assert!((seqs.len() as u64) < N, "some messages were conflated away");
    assert_eq!(*seqs.last().unwrap(), N);
}
