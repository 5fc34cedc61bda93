//! Bad input, abrupt disconnects, idle and slow clients: one client's trouble never affects
//! the others (docs/protocol.md, "Errors", "Close codes", SSE slow readers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Publish the next value on `w` and check the watcher receives it.
async fn watcher_still_receives(relay: &Relay, watcher: &mut Ws, seq: &mut u64) {
    *seq += 1;
    let got = relay.publish_seq("w", json!({"n": *seq})).await;
    assert_eq!(got, *seq);
    assert_eq!(watcher.expect_message("w", *seq).await, json!({"n": *seq}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_bad_input_keeps_connection_and_others_flowing() {
    let relay = Relay::start(&["--max-message-size", "1024"]);
    let mut watcher = Ws::connect(&relay.ws_url()).await;
    watcher.subscribe("w").await;
    let mut seq = 0;
    watcher_still_receives(&relay, &mut watcher, &mut seq).await;

    let mut bad = Ws::connect(&relay.ws_url()).await;
    let cases: &[(&str, &str, Option<serde_json::Value>)] = &[
        ("{not json", "bad_json", None),
        ("[1,2]", "bad_json", None),
        ("42", "bad_json", None),
        ("", "bad_json", None),
        (r#"{"type":"nope","id":5}"#, "unknown_type", Some(json!(5))),
        (r#"{"id":6}"#, "unknown_type", Some(json!(6))),
        (
            r#"{"type":"subscribe","id":7}"#,
            "bad_request",
            Some(json!(7)),
        ),
        (
            r#"{"type":"subscribe","id":8,"channel":5}"#,
            "bad_request",
            Some(json!(8)),
        ),
        (
            r#"{"type":"publish","id":9,"channel":"w"}"#,
            "bad_request",
            Some(json!(9)),
        ),
        (
            r#"{"type":"unsubscribe","id":"u"}"#,
            "bad_request",
            Some(json!("u")),
        ),
        (
            r#"{"type":"subscribe","id":10,"channel":"bad channel"}"#,
            "invalid_channel",
            Some(json!(10)),
        ),
        (
            r#"{"type":"publish","id":11,"channel":"","data":1}"#,
            "invalid_channel",
            Some(json!(11)),
        ),
        (
            r#"{"type":"subscribe","id":12,"channel":"caf\u00e9"}"#,
            "invalid_channel",
            Some(json!(12)),
        ),
    ];
    // Check every case, then report all mismatches at once.
    let mut wrong = Vec::new();
    for (frame, code, id) in cases {
        bad.send_text(frame).await;
        let v = bad.recv_json().await;
        let ok = v["type"] == "error"
            && v["code"] == json!(code)
            && v["message"].is_string()
            && id.as_ref().is_none_or(|id| &v["id"] == id);
        if !ok {
            wrong.push(format!(
                "{frame} -> {v} (expected error {code}, id {})",
                id.clone().unwrap_or_default()
            ));
        }
        watcher_still_receives(&relay, &mut watcher, &mut seq).await;
    }
    assert!(
        wrong.is_empty(),
        "wrong error replies:\n{}",
        wrong.join("\n")
    );

    // The connection is still usable.
    bad.send_json(json!({"type":"heartbeat","id":"still"}))
        .await;
    assert_eq!(
        bad.recv_json().await,
        json!({"type":"heartbeat","id":"still"})
    );
    bad.subscribe("w").await;
    watcher_still_receives(&relay, &mut watcher, &mut seq).await;
    bad.expect_message("w", seq).await;

    // Oversize frame (4 KiB > --max-message-size 1024) -> close 1009.
    let big = json!({"type":"publish","channel":"w","data":"x".repeat(4096)}).to_string();
    bad.send_text(&big).await;
    assert_eq!(bad.expect_close().await, 1009);
    watcher_still_receives(&relay, &mut watcher, &mut seq).await;
    // The oversize message was not published.
    assert_eq!(relay.history("w", "").await["seq"], json!(seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnects_leave_others_fine() {
    let relay = Relay::start(&[]);
    let mut watcher = Ws::connect(&relay.ws_url()).await;
    watcher.subscribe("w").await;
    let mut seq = 0;

    // A subscribed raw client drops the socket in the middle of a frame.
    let mut raw = RawWs::connect(relay.addr()).await;
    raw.send_json(json!({"type":"subscribe","channel":"w"}))
        .await;
    assert_subscribed(&raw.recv_json().await, "w");
    relay.wait_subscribers("w", 2, Duration::from_secs(3)).await;
    let frame = encode_frame(true, 0, OP_TEXT, &[b' '; 100], Some(MASK));
    raw.send_raw(&frame[..20]).await;
    drop(raw);
    watcher_still_receives(&relay, &mut watcher, &mut seq).await;
    relay.wait_subscribers("w", 1, Duration::from_secs(3)).await;

    // Half a handshake, then gone.
    let mut tcp = TcpStream::connect(relay.addr()).await.unwrap();
    tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websock")
        .await
        .unwrap();
    drop(tcp);
    // Connect and vanish.
    drop(TcpStream::connect(relay.addr()).await.unwrap());
    // A subscriber that vanishes while messages are flowing to it.
    let mut raw = RawWs::connect(relay.addr()).await;
    raw.send_json(json!({"type":"subscribe","channel":"w"}))
        .await;
    assert_subscribed(&raw.recv_json().await, "w");
    for _ in 0..5 {
        watcher_still_receives(&relay, &mut watcher, &mut seq).await;
    }
    drop(raw);
    for _ in 0..5 {
        watcher_still_receives(&relay, &mut watcher, &mut seq).await;
    }

    // New clients are served normally.
    let mut fresh = Ws::connect(&relay.ws_url()).await;
    let s = fresh.subscribe("w").await;
    assert_eq!(s["seq"], json!(seq));
    watcher_still_receives(&relay, &mut watcher, &mut seq).await;
    fresh.expect_message("w", seq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_gets_pings_then_close_1001() {
    let relay = Relay::start(&["--idle-timeout", "1s", "--ping-interval", "300ms"]);
    let mut raw = RawWs::connect(relay.addr()).await;
    let start = Instant::now();
    let mut pings = 0;
    let outcome = loop {
        let left = Duration::from_secs(6).saturating_sub(start.elapsed());
        match raw.read_frame(left).await {
            RawRead::Frame(f) if f.opcode == OP_PING => {
                assert!(!f.masked, "{f:?}");
                pings += 1;
            }
            RawRead::Frame(f) if f.opcode == OP_CLOSE => break Some(f.close_code()),
            RawRead::Frame(f) => panic!("unexpected frame {f:?}"),
            RawRead::Eof => break None,
            RawRead::Timeout => panic!("idle client not closed within 6 s ({pings} pings)"),
        }
    };
    let elapsed = start.elapsed();
    assert!(pings >= 1, "expected pings before the idle close");
    if let Some(code) = outcome {
        assert_eq!(code, 1001, "idle close code");
    }
    assert!(
        elapsed >= Duration::from_millis(700),
        "closed too early ({elapsed:?}) for --idle-timeout 1s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_answering_pings_stays_alive() {
    let relay = Relay::start(&["--idle-timeout", "1s", "--ping-interval", "300ms"]);
    let mut raw = RawWs::connect(relay.addr()).await;
    let until = Instant::now() + Duration::from_millis(2500);
    let mut pings = 0;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match raw.read_frame(left).await {
            RawRead::Frame(f) if f.opcode == OP_PING => {
                pings += 1;
                raw.send_frame(true, OP_PONG, &f.payload).await;
            }
            RawRead::Timeout => break,
            other => panic!("connection answering pings must stay open: {other:?}"),
        }
    }
    assert!(pings >= 2, "expected regular pings, got {pings}");
    raw.send_json(json!({"type":"heartbeat"})).await;
    assert_eq!(raw.recv_json().await, json!({"type":"heartbeat"}));
}

const SLOW_N: u64 = 600;
const SLOW_PAD: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_ws_consumer_is_closed_4008_others_unaffected() {
    let relay = Relay::start(&["--max-outbox-bytes", "65536"]);

    // The slow client: small receive window, subscribes, then never reads.
    let mut slow = RawWs::connect_with_rcvbuf(relay.addr(), 4096).await;
    slow.send_json(json!({"type":"subscribe","channel":"slow"}))
        .await;
    assert_subscribed(&slow.recv_json().await, "slow");

    let mut fast = Ws::connect(&relay.ws_url()).await;
    fast.subscribe("slow").await;
    // The fast reader reports its progress so the publisher never runs more than two messages
    // (32 KiB, half its outbox) ahead of it: on a loaded 2-core machine a debug-build reader
    // can pause long enough to lag four 16 KiB messages, which would rightly close it too.
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        for i in 1..=SLOW_N {
            let d = fast.expect_message("slow", i).await;
            assert_eq!(d["i"], json!(i));
            assert_eq!(d["pad"].as_str().map(str::len), Some(SLOW_PAD));
            let _ = progress_tx.send(i);
        }
    });

    let pad = "x".repeat(SLOW_PAD);
    let publish_all = async {
        for i in 1..=SLOW_N {
            progress
                .wait_for(|&got| got + 2 >= i)
                .await
                .expect("the fast reader stopped");
            let s = relay.publish_seq("slow", json!({"i": i, "pad": pad})).await;
            assert_eq!(s, i);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), publish_all)
        .await
        .expect("publishing finished within 60 s");
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("normal subscriber got everything within 30 s")
        .unwrap();

    // Now read the slow client's socket: some messages, then a 4008 close or the end.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut msgs = 0u64;
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match slow.read_frame(left).await {
            RawRead::Frame(f) if f.opcode == OP_TEXT => msgs += 1,
            RawRead::Frame(f) if f.opcode == OP_CLOSE => break Some(f.close_code()),
            RawRead::Frame(_) => {}
            RawRead::Eof => break None,
            RawRead::Timeout => {
                panic!("slow consumer was never closed (read {msgs} of {SLOW_N} messages)")
            }
        }
    };
    if let Some(code) = outcome {
        assert_eq!(code, 4008, "slow consumer close code");
    }
    assert!(
        msgs < SLOW_N,
        "slow consumer received all {SLOW_N} messages, so it was not cut off"
    );

    // The channel keeps working for new subscribers.
    let mut again = Ws::connect(&relay.ws_url()).await;
    again.subscribe("slow").await;
    relay.publish("slow", json!("after")).await;
    assert_eq!(
        again.expect_message("slow", SLOW_N + 1).await,
        json!("after")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_sse_reader_stream_is_ended() {
    let relay = Relay::start(&["--max-outbox-bytes", "65536"]);

    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut tcp = sock.connect(relay.addr()).await.unwrap();
    tcp.write_all(
        format!(
            "GET /sse?channel=slowsse HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            relay.addr()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Read until the subscribed event is in, then stop reading.
    let mut head = Vec::new();
    let deadline = Instant::now() + RECV_TIMEOUT;
    while !head.windows(17).any(|w| w == b"event: subscribed") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("subscribed event within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "SSE closed early: {}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );

    let mut fast = Sse::connect(&relay.http("/sse?channel=slowsse")).await;
    fast.expect_event("subscribed").await;
    // As above: the normal reader reports progress and the publisher stays at most two
    // messages (32 KiB, half the outbox) ahead of it.
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        for i in 1..=SLOW_N {
            let ev = fast.expect_message("slowsse", i).await;
            assert_eq!(ev.json()["data"]["i"], json!(i));
            let _ = progress_tx.send(i);
        }
    });
    let pad = "y".repeat(SLOW_PAD);
    let publish_all = async {
        for i in 1..=SLOW_N {
            progress
                .wait_for(|&got| got + 2 >= i)
                .await
                .expect("the normal SSE reader stopped");
            relay
                .publish_seq("slowsse", json!({"i": i, "pad": pad}))
                .await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), publish_all)
        .await
        .expect("publishing finished within 60 s");
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("normal SSE reader got everything within 30 s")
        .unwrap();

    // Drain the slow socket: the stream must end (EOF, or the last chunk of a chunked body).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut total = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let mut buf = vec![0u8; 64 * 1024];
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => panic!("slow SSE stream never ended (read {total} bytes)"),
            Ok(Err(_)) | Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                total += n;
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 16 {
                    tail.drain(..tail.len() - 16);
                }
                if tail.ends_with(b"\r\n0\r\n\r\n") {
                    break;
                }
            }
        }
    }
    assert!(
        total < SLOW_N as usize * SLOW_PAD,
        "slow SSE reader got everything ({total} bytes), so it was not cut off"
    );
}
