//! permessage-deflate (RFC 7692; docs/protocol.md, "Compression"): negotiated when offered,
//! each publication compressed once and the same frame sent to every subscriber, compressed
//! commands read, bombs refused. Decompressed here with flate2's raw inflate, as a client would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use flate2::{Decompress, FlushDecompress};
use serde_json::{json, Value};

const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
const ACCEPTED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn extensions(head: &str) -> Option<String> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, v)| v.trim().to_string())
}

/// Inflates a message as RFC 7692 §7.2.2 says: its bytes, then 00 00 ff ff.
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("valid deflate data");
    out
}

/// Raw deflate of `data` with a sync flush and the 00 00 ff ff tail removed.
fn deflate(data: &[u8]) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

async fn subscribed_deflate(relay: &Relay, channel: &str) -> RawWs {
    let (mut ws, head) = RawWs::connect_with(relay.addr(), OFFER).await;
    assert_eq!(extensions(&head).as_deref(), Some(ACCEPTED), "{head}");
    ws.send_json(json!({"type":"subscribe","channel":channel}))
        .await;
    assert_subscribed(&ws.recv_json().await, channel);
    ws
}

async fn next_data_frame(ws: &mut RawWs) -> Frame {
    loop {
        match ws.read_frame(RECV_TIMEOUT).await {
            RawRead::Frame(f) if f.opcode == OP_TEXT => return f,
            RawRead::Frame(_) => continue,
            other => panic!("no data frame: {other:?}"),
        }
    }
}

#[tokio::test]
async fn deflate_is_negotiated_only_when_offered_and_enabled() {
    let relay = Relay::start(&[]);
    let (_, head) = RawWs::connect_with(relay.addr(), OFFER).await;
    assert_eq!(extensions(&head).as_deref(), Some(ACCEPTED));
    let (_, head) = RawWs::connect_with(relay.addr(), "").await;
    assert_eq!(extensions(&head), None, "not offered: not used");
    // An offer we cannot honour (a smaller window for our side) is declined, not failed.
    let (_, head) = RawWs::connect_with(
        relay.addr(),
        "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n",
    )
    .await;
    assert_eq!(extensions(&head), None);
    let off = Relay::start(&["--permessage-deflate", "false"]);
    let (_, head) = RawWs::connect_with(off.addr(), OFFER).await;
    assert_eq!(extensions(&head), None, "the operator turned it off");
}

#[tokio::test]
async fn a_large_message_is_compressed_once_and_the_frame_shared_by_every_subscriber() {
    let relay = Relay::start(&[]);
    let mut a = subscribed_deflate(&relay, "z").await;
    let mut b = subscribed_deflate(&relay, "z").await;
    let mut plain = RawWs::connect(relay.addr()).await;
    plain
        .send_json(json!({"type":"subscribe","channel":"z"}))
        .await;
    assert_subscribed(&plain.recv_json().await, "z");

    let items: Vec<Value> = (0..100)
        .map(|i| json!({"id": i, "name": "a rather repetitive JSON payload", "ok": true}))
        .collect();
    relay.publish("z", json!(items)).await;
    let fa = next_data_frame(&mut a).await;
    let fb = next_data_frame(&mut b).await;
    let fp = next_data_frame(&mut plain).await;
    assert_eq!(fa.rsv, 0b100, "RSV1: compressed");
    assert_eq!(fp.rsv, 0, "a client that did not offer gets it plain");
    assert_eq!(fa.payload, fb.payload, "one compressed frame for both");
    assert!(
        fa.payload.len() * 4 < fp.payload.len(),
        "{} compressed vs {} plain",
        fa.payload.len(),
        fp.payload.len()
    );
    assert_eq!(inflate(&fa.payload), fp.payload);
    let v: Value = serde_json::from_slice(&fp.payload).unwrap();
    assert_eq!(v["data"], json!(items));

    // Under --deflate-min-size (256 B by default) a message goes out as is.
    relay.publish("z", json!({"small": 1})).await;
    let f = next_data_frame(&mut a).await;
    assert_eq!(f.rsv, 0);
    assert_eq!(
        serde_json::from_slice::<Value>(&f.payload).unwrap()["seq"],
        2
    );
}

#[tokio::test]
async fn compressed_commands_are_read_and_a_bomb_closes_with_1009() {
    let relay = Relay::start(&["--max-message-size", "64KiB"]);
    let (mut ws, head) = RawWs::connect_with(relay.addr(), OFFER).await;
    assert!(extensions(&head).is_some());
    // A compressed subscribe, split over two frames (RSV1 on the first only).
    let z = deflate(br#"{"type":"subscribe","channel":"c"}"#);
    let (one, two) = z.split_at(z.len() / 2);
    ws.send_raw(&encode_frame(false, 0b100, OP_TEXT, one, Some(MASK)))
        .await;
    ws.send_raw(&encode_frame(true, 0, 0x0, two, Some(MASK)))
        .await;
    assert_subscribed(&ws.recv_json().await, "c");
    // 10 MiB of spaces compress to ~10 KiB: well under the limit on the wire, far over it
    // inflated.
    let bomb = deflate(&vec![b' '; 10 << 20]);
    assert!(bomb.len() < 64 << 10);
    ws.send_raw(&encode_frame(true, 0b100, OP_TEXT, &bomb, Some(MASK)))
        .await;
    assert_eq!(ws.expect_close_code(RECV_TIMEOUT).await, Some(1009));

    // Without the extension, RSV1 is a protocol error.
    let mut plain = RawWs::connect(relay.addr()).await;
    plain
        .send_raw(&encode_frame(true, 0b100, OP_TEXT, &z, Some(MASK)))
        .await;
    assert_eq!(plain.expect_close_code(RECV_TIMEOUT).await, Some(1002));
}
