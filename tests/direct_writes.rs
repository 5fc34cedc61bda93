//! A pump pass writes the frames it queued for an idle WebSocket writer to the socket itself,
//! and leaves what the socket did not take (a partial write, a full socket) to the writer's
//! task (docs/ARCHITECTURE.md, `outbox.rs`). Whoever writes, every subscriber gets every
//! message once, in order, in whole frames.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::net::TcpSocket;

const CHANNELS: usize = 3;
const SUBSCRIBERS_PER_CHANNEL: usize = 4;
/// Of each channel's subscribers, these read slowly through a small receive window, so that
/// the server's socket fills: direct writes go partly through or not at all.
const SLOW_PER_CHANNEL: usize = 2;
const MESSAGES: u64 = 120;
/// Big frames: what a slow reader leaves unread must outgrow the kernel's socket buffers.
const PAD: usize = 60_000;

/// A subscriber whose socket has a small receive buffer (set before connecting).
async fn slow_subscriber(relay: &Relay) -> Ws {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = tokio::time::timeout(RECV_TIMEOUT, sock.connect(relay.addr()))
        .await
        .expect("connect timed out")
        .expect("connect");
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (inner, resp) = tokio_tungstenite::client_async(relay.ws_url(), stream)
        .await
        .expect("WebSocket handshake");
    assert_eq!(resp.status().as_u16(), 101);
    Ws { inner }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_subscriber_gets_every_message_once_in_order_whoever_writes_it() {
    // Room for every message a slow reader leaves unread: none is closed as a slow consumer.
    let relay = Relay::in_process(&["--max-outbox-bytes", "64MiB"]);
    let mut readers = Vec::new();
    for c in 0..CHANNELS {
        let ch = format!("direct:{c}");
        for i in 0..SUBSCRIBERS_PER_CHANNEL {
            let slow = i < SLOW_PER_CHANNEL;
            let mut ws = if slow {
                slow_subscriber(&relay).await
            } else {
                Ws::connect(&relay.ws_url()).await
            };
            let reply = ws.subscribe(&ch).await;
            assert_eq!(reply["seq"], json!(0), "{reply}");
            let ch = ch.clone();
            readers.push(tokio::spawn(async move {
                for seq in 1..=MESSAGES {
                    // A slow reader starts late and stops now and then: meanwhile the server's
                    // socket fills.
                    if slow && seq % 60 == 1 {
                        tokio::time::sleep(Duration::from_millis(700)).await;
                    }
                    let m = ws.recv_json().await;
                    assert_eq!(m["type"], "message", "{m}");
                    assert_eq!(m["channel"], json!(ch), "{m}");
                    assert_eq!(m["seq"], json!(seq), "once and in order: {m}");
                    assert_eq!(m["data"]["n"], json!(seq), "{m}");
                    let pad = m["data"]["pad"].as_str().expect("pad");
                    assert_eq!(pad.len(), PAD, "a whole frame");
                    assert!(pad.bytes().all(|b| b == b'a' + (seq % 26) as u8));
                }
                // Nothing after the last one.
                assert_eq!(ws.recv_json_within(Duration::from_millis(200)).await, None);
            }));
        }
    }
    for c in 0..CHANNELS {
        relay
            .wait_subscribers(
                &format!("direct:{c}"),
                SUBSCRIBERS_PER_CHANNEL as u64,
                RECV_TIMEOUT,
            )
            .await;
    }
    // One publisher per channel, all at once: passes carry messages of several channels, and a
    // subscriber's frames of one pass go out together.
    let url = relay.http("/api/publish");
    let publishers: Vec<_> = (0..CHANNELS)
        .map(|c| {
            let client = relay.client().clone();
            let url = url.clone();
            tokio::spawn(async move {
                for n in 1..=MESSAGES {
                    let pad = String::from((b'a' + (n % 26) as u8) as char).repeat(PAD);
                    let body =
                        json!({"channel": format!("direct:{c}"), "data": {"n": n, "pad": pad}});
                    let r = client.post(&url).json(&body).send().await.expect("publish");
                    assert_eq!(r.status().as_u16(), 200);
                    let v: Value = r.json().await.expect("publish reply");
                    assert_eq!(v["seq"], json!(n), "{v}");
                }
            })
        })
        .collect();
    for p in publishers {
        tokio::time::timeout(Duration::from_secs(60), p)
            .await
            .expect("publishers finish")
            .expect("publisher");
    }
    for r in readers {
        tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("subscribers finish")
            .expect("subscriber");
    }
}
