//! RFC 6455 conformance over a hand-made client (docs/protocol.md, "Close codes").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const HEARTBEAT: &[u8] = br#"{"type":"heartbeat"}"#;

/// Send `bytes` right after the handshake and return the close code the server answers with.
async fn close_code_after(relay: &Relay, bytes: &[u8]) -> Option<u16> {
    let mut raw = RawWs::connect(relay.addr()).await;
    raw.send_raw(bytes).await;
    raw.expect_close_code(RECV_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmasked_client_frame_closes_1002() {
    let relay = Relay::in_process(&[]);
    let f = encode_frame(true, 0, OP_TEXT, HEARTBEAT, None);
    assert_eq!(close_code_after(&relay, &f).await, Some(1002));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_text_closes_1007() {
    let relay = Relay::in_process(&[]);
    let f = encode_frame(true, 0, OP_TEXT, &[b'"', 0xff, 0xfe, b'"'], Some(MASK));
    assert_eq!(close_code_after(&relay, &f).await, Some(1007));
    // Invalid UTF-8 split across fragments too (0xE2 0x82 then 0x28 is not a valid sequence).
    let mut bytes = encode_frame(false, 0, OP_TEXT, &[b'"', 0xe2, 0x82], Some(MASK));
    bytes.extend(encode_frame(true, 0, OP_CONT, &[0x28, b'"'], Some(MASK)));
    assert_eq!(close_code_after(&relay, &bytes).await, Some(1007));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_gets_pong_with_same_payload() {
    let relay = Relay::in_process(&[]);
    let mut raw = RawWs::connect(relay.addr()).await;
    raw.send_frame(true, OP_PING, b"hello \x00\x01 relay").await;
    match raw.read_frame(RECV_TIMEOUT).await {
        RawRead::Frame(f) => {
            assert_eq!(f.opcode, OP_PONG, "{f:?}");
            assert!(f.fin && !f.masked, "{f:?}");
            assert_eq!(f.payload, b"hello \x00\x01 relay".to_vec());
        }
        other => panic!("expected pong, got {other:?}"),
    }
    // An empty ping too, and the connection keeps working.
    raw.send_frame(true, OP_PING, b"").await;
    match raw.read_frame(RECV_TIMEOUT).await {
        RawRead::Frame(f) => {
            assert_eq!(f.opcode, OP_PONG, "{f:?}");
            assert!(f.payload.is_empty(), "{f:?}");
        }
        other => panic!("expected pong, got {other:?}"),
    }
    raw.send_json(json!({"type":"heartbeat","id":1})).await;
    assert_eq!(raw.recv_json().await, json!({"type":"heartbeat","id":1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_1002() {
    let relay = Relay::in_process(&[]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "RSV1 without extension",
            encode_frame(true, 0b100, OP_TEXT, HEARTBEAT, Some(MASK)),
        ),
        (
            "RSV3 set",
            encode_frame(true, 0b001, OP_TEXT, HEARTBEAT, Some(MASK)),
        ),
        (
            "reserved data opcode 0x3",
            encode_frame(true, 0, 0x3, b"x", Some(MASK)),
        ),
        (
            "reserved control opcode 0xB",
            encode_frame(true, 0, 0xB, b"x", Some(MASK)),
        ),
        (
            "fragmented ping",
            encode_frame(false, 0, OP_PING, b"x", Some(MASK)),
        ),
        (
            "oversize control frame",
            encode_frame(true, 0, OP_PING, &[b'p'; 126], Some(MASK)),
        ),
        (
            "continuation without start",
            encode_frame(true, 0, OP_CONT, b"x", Some(MASK)),
        ),
        ("new text frame inside a fragmented message", {
            let mut b = encode_frame(false, 0, OP_TEXT, b"{\"type\":", Some(MASK));
            b.extend(encode_frame(true, 0, OP_TEXT, HEARTBEAT, Some(MASK)));
            b
        }),
    ];
    for (name, bytes) in cases {
        assert_eq!(close_code_after(&relay, &bytes).await, Some(1002), "{name}");
    }
    // The server is still fine.
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_text_message_is_reassembled() {
    let relay = Relay::in_process(&[]);
    let mut raw = RawWs::connect(relay.addr()).await;
    raw.send_frame(false, OP_TEXT, br#"{"type":"subs"#).await;
    // A control frame may be interleaved between fragments.
    raw.send_frame(true, OP_PING, b"mid").await;
    raw.send_frame(false, OP_CONT, br#"cribe","id":"f","#).await;
    raw.send_frame(true, OP_CONT, br#""channel":"frag"}"#).await;
    let mut got_pong = false;
    let reply = loop {
        match raw.read_frame(RECV_TIMEOUT).await {
            RawRead::Frame(f) if f.opcode == OP_PONG => {
                assert_eq!(f.payload, b"mid".to_vec());
                got_pong = true;
            }
            RawRead::Frame(f) if f.opcode == OP_TEXT => {
                break serde_json::from_slice::<serde_json::Value>(&f.payload).unwrap()
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_subscribed(&reply, "frag");
    assert_eq!(reply["id"], json!("f"), "{reply}");
    if !got_pong {
        match raw.read_frame(RECV_TIMEOUT).await {
            RawRead::Frame(f) => assert_eq!(f.opcode, OP_PONG, "{f:?}"),
            other => panic!("expected pong, got {other:?}"),
        }
    }
    relay.publish("frag", json!("ok")).await;
    let m = raw.recv_json().await;
    assert_eq!(m["seq"], json!(1), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_is_echoed_1000() {
    let relay = Relay::in_process(&[]);
    let mut raw = RawWs::connect(relay.addr()).await;
    raw.send_frame(true, OP_CLOSE, &1000u16.to_be_bytes()).await;
    assert_eq!(raw.expect_close_code(RECV_TIMEOUT).await, Some(1000));
    // After the closing handshake the server closes the TCP connection.
    match raw.read_frame(Duration::from_secs(3)).await {
        RawRead::Eof => {}
        other => panic!("expected EOF after close handshake, got {other:?}"),
    }
}
