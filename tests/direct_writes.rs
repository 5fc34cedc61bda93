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

/// Waits for every task of `tasks` (each a `what`), a minute at most in all; panics if one
/// failed or they did not finish.
async fn join_within_a_minute(tasks: Vec<tokio::task::JoinHandle<()>>, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for t in tasks {
        tokio::time::timeout_at(deadline, t)
            .await
            .unwrap_or_else(|_| panic!("every {what} finishes within a minute"))
            .unwrap_or_else(|e| panic!("a {what} failed: {e}"));
    }
}

/// A subscriber whose socket has a small receive buffer (set before connecting).
async fn slow_subscriber(relay: &Relay) -> Ws {
    subscriber_with_rcvbuf(relay, 4096).await
}

/// A subscriber whose socket's receive buffer is `rcvbuf` bytes (set before connecting).
async fn subscriber_with_rcvbuf(relay: &Relay, rcvbuf: u32) -> Ws {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(rcvbuf).unwrap();
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
    join_within_a_minute(publishers, "publisher").await;
    join_within_a_minute(readers, "subscriber").await;
}

/// A subscriber that stops reading while thousands of messages are published has them queued
/// in its outbox once its socket is full (on loopback the kernel takes a megabyte or more
/// first: hence 8,000 messages of ~560 bytes); when it reads again the backlog goes out in
/// writes of more than 64 frames (up to 1,024: `engine/outbox.rs`), and it still gets every
/// message once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_goes_out_in_writes_of_many_frames_once_and_in_order() {
    const PUBLISHERS: u64 = 4;
    const EACH: u64 = 2_000;
    let mut relay = Relay::start(&["--max-outbox-bytes", "16MiB"]);
    let mut ws = subscriber_with_rcvbuf(&relay, 65_536).await;
    let reply = ws.subscribe("backlog").await;
    assert_eq!(reply["seq"], json!(0), "{reply}");
    // It reads nothing while everything is published, from several publishers at once.
    let url = relay.http("/api/publish");
    let pad = "x".repeat(500);
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let client = relay.client().clone();
            let url = url.clone();
            let pad = pad.clone();
            tokio::spawn(async move {
                for n in 0..EACH {
                    let body = json!({"channel": "backlog", "data": {"p": p, "n": n, "pad": pad}});
                    let r = client.post(&url).json(&body).send().await.expect("publish");
                    assert_eq!(r.status().as_u16(), 200);
                }
            })
        })
        .collect();
    join_within_a_minute(publishers, "publisher").await;
    let total = PUBLISHERS * EACH;
    // Each publisher's messages in its own order, every seq once and in order.
    let mut next = vec![0u64; PUBLISHERS as usize];
    for seq in 1..=total {
        let m = ws.recv_json().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["seq"], json!(seq), "once and in order: {m}");
        let p = m["data"]["p"].as_u64().expect("p") as usize;
        assert_eq!(m["data"]["n"], json!(next[p]), "{m}");
        next[p] += 1;
    }
    assert_eq!(ws.recv_json_within(Duration::from_millis(200)).await, None);
    let metrics = relay.scrape().await;
    let writes = sample(&metrics, "relay_frames_per_write_count").expect("writes");
    let small = sample(&metrics, "relay_frames_per_write_bucket{le=\"64\"}").expect("le=64");
    assert!(
        writes > small,
        "no write carried more than 64 frames ({writes} writes, {small} of at most 64)"
    );
    relay.signal("TERM");
    assert!(relay.wait_exit(Duration::from_secs(15)).await.is_some());
}
