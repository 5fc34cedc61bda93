//! The binary protocol (`relay.v1.bin`) end to end: negotiation, a binary and a JSON client on
//! the same channel seeing the same messages and sequence IDs, payloads crossing between them
//! in the documented forms, resume, and errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{Relay, Ws, WsStream, RECV_TIMEOUT};
use relay::protocol::binary::{self, Body, Frame};
use relay::types::{Epoch, StreamPosition};

/// A client speaking `relay.v1.bin`, decoding every frame it gets with the crate's codec.
struct BinWs {
    inner: WsStream,
    /// Messages that arrived while a reply was awaited, handed out first by `recv`.
    pending: std::collections::VecDeque<Got>,
}

/// A server frame, owned (the test keeps frames after the buffer they came in).
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Subscribed {
        id: Option<u64>,
        channel: String,
        position: StreamPosition,
        recovered: bool,
    },
    Published {
        id: Option<u64>,
        channel: String,
        position: StreamPosition,
    },
    Message {
        channel: String,
        seq: u64,
        json: bool,
        payload: Vec<u8>,
    },
    Error {
        id: Option<u64>,
        code: String,
    },
    Heartbeat {
        id: Option<u64>,
    },
    Other(String),
}

/// Connects asking for `protocols`; returns the socket and the subprotocol the server chose.
async fn connect_with(relay: &Relay, protocols: &str) -> (WsStream, Option<String>) {
    let mut req = relay.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    let (ws, resp) = tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    (ws, chosen)
}

impl BinWs {
    async fn connect(relay: &Relay) -> BinWs {
        let (inner, chosen) = connect_with(relay, "relay.v1.bin").await;
        assert_eq!(chosen.as_deref(), Some("relay.v1.bin"));
        BinWs {
            inner,
            pending: Default::default(),
        }
    }

    async fn send(&mut self, frame: Frame<'_>) {
        let mut buf = Vec::new();
        binary::encode(&frame, &mut buf);
        self.send_raw(buf).await;
    }

    async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.inner
            .send(Message::Binary(bytes.into()))
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> Got {
        self.recv_within(RECV_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no binary frame within {RECV_TIMEOUT:?}"))
    }

    async fn recv_within(&mut self, d: Duration) -> Option<Got> {
        if let Some(g) = self.pending.pop_front() {
            return Some(g);
        }
        let deadline = Instant::now() + d;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => return None,
                Ok(m) => m.expect("stream ended").expect("websocket error"),
            };
            let bytes = match msg {
                Message::Binary(b) => b,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                other => panic!("expected a binary frame, got {other:?}"),
            };
            let f = binary::decode(&bytes)
                .unwrap_or_else(|e| panic!("server sent an undecodable frame {bytes:?}: {e}"));
            return Some(match f.body {
                Body::Subscribed {
                    channel,
                    position,
                    recovered,
                } => Got::Subscribed {
                    id: f.id,
                    channel: channel.into(),
                    position,
                    recovered,
                },
                Body::Published { channel, position } => Got::Published {
                    id: f.id,
                    channel: channel.into(),
                    position,
                },
                Body::Message {
                    channel,
                    seq,
                    json,
                    payload,
                } => Got::Message {
                    channel: channel.into(),
                    seq,
                    json,
                    payload: payload.to_vec(),
                },
                Body::Error { code, .. } => Got::Error {
                    id: f.id,
                    code: code.into(),
                },
                Body::HeartbeatReply => Got::Heartbeat { id: f.id },
                other => Got::Other(format!("{other:?}")),
            });
        }
    }

    async fn subscribe(&mut self, channel: &str, id: u64, resume: Option<StreamPosition>) -> Got {
        self.send(Frame {
            id: Some(id),
            body: Body::Subscribe {
                channel,
                resume,
                presence: None,
            },
        })
        .await;
        self.recv().await
    }

    async fn publish(&mut self, channel: &str, id: u64, payload: &[u8]) -> StreamPosition {
        self.send(Frame {
            id: Some(id),
            body: Body::Publish {
                channel,
                idempotency_key: None,
                expected_seq: None,
                payload,
            },
        })
        .await;
        // Our own messages (we may be subscribed) can come first: keep them for later.
        let mut early = Vec::new();
        let position = loop {
            match self.recv().await {
                Got::Published {
                    id: Some(got),
                    channel: c,
                    position,
                } if got == id && c == channel => break position,
                m @ Got::Message { .. } => early.push(m),
                other => panic!("expected published for id {id}, got {other:?}"),
            }
        };
        for m in early.into_iter().rev() {
            self.pending.push_front(m);
        }
        position
    }
}

fn epoch_hex(v: &Value) -> Epoch {
    Epoch::parse(v.as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn subprotocol_negotiation() {
    let relay = Relay::in_process(&[]);
    let (_, chosen) = connect_with(&relay, "relay.v1.bin").await;
    assert_eq!(chosen.as_deref(), Some("relay.v1.bin"));
    // The client's order of preference wins; unknown names are skipped.
    let (_, chosen) = connect_with(&relay, "x.v9, relay.v1.json, relay.v1.bin").await;
    assert_eq!(chosen.as_deref(), Some("relay.v1.json"));
    let (_, chosen) = connect_with(&relay, "x.v9, relay.v1.bin").await;
    assert_eq!(chosen.as_deref(), Some("relay.v1.bin"));
}

#[tokio::test]
async fn binary_and_json_clients_see_identical_sequences() {
    let relay = Relay::in_process(&[]);
    let ch = "mix:1";
    let mut js = Ws::connect(&relay.ws_url()).await;
    let mut bin = BinWs::connect(&relay).await;

    let sub = js.subscribe(ch).await;
    let Got::Subscribed {
        id: Some(1),
        position,
        recovered: false,
        ..
    } = bin.subscribe(ch, 1, None).await
    else {
        panic!("bad subscribed")
    };
    // Same channel, same epoch and seq on both protocols.
    assert_eq!(position.epoch, epoch_hex(&sub["epoch"]));
    assert_eq!(position.seq, sub["seq"].as_u64().unwrap());
    assert_eq!(position.seq, 0);

    // Publishes from both protocols and the HTTP API, interleaved.
    let p1 = bin.publish(ch, 10, &[0xff, 0x00, 0x7f]).await; // not JSON
    let p2 = bin.publish(ch, 11, br#"{"x":[1,2]}"#).await; // JSON text, sent as bytes
    js.send_json(json!({"type":"publish","channel":ch,"data":{"t":"hi"},"id":"j"}))
        .await;
    // The JSON client's own reply and the first messages may interleave: gather until the reply.
    let mut js_frames = Vec::new();
    loop {
        let v = js.recv_json().await;
        if v["type"] == "published" {
            assert_eq!(v["id"], "j");
            assert_eq!(v["seq"], 3);
            assert_eq!(epoch_hex(&v["epoch"]), position.epoch);
            break;
        }
        js_frames.push(v);
    }
    let p4 = relay.publish(ch, json!([true, null])).await;
    let p5 = bin.publish(ch, 12, b"").await; // empty payload
    assert_eq!(
        [p1.seq, p2.seq, p4["seq"].as_u64().unwrap(), p5.seq],
        [1, 2, 4, 5]
    );
    assert!([p1.epoch, p2.epoch, p5.epoch]
        .iter()
        .all(|e| *e == position.epoch));

    // The JSON subscriber: every message, in order, payloads in the documented forms.
    while js_frames.len() < 5 {
        js_frames.push(js.recv_json().await);
    }
    let seqs: Vec<u64> = js_frames
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert!(js_frames
        .iter()
        .all(|v| v["type"] == "message" && v["channel"] == ch));
    // Bytes that are not JSON: base64 with "encoding":"base64".
    assert_eq!(js_frames[0]["encoding"], "base64");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(js_frames[0]["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, [0xff, 0x00, 0x7f]);
    // Bytes that are JSON text: the JSON value.
    assert_eq!(js_frames[1]["data"], json!({"x":[1,2]}));
    assert!(js_frames[1].get("encoding").is_none());
    assert_eq!(js_frames[2]["data"], json!({"t":"hi"}));
    assert_eq!(js_frames[3]["data"], json!([true, null]));
    // An empty payload is not JSON: base64 of nothing.
    assert_eq!(js_frames[4]["data"], "");
    assert_eq!(js_frames[4]["encoding"], "base64");

    // The binary subscriber: the same messages and seqs; its own bytes back byte for byte, JSON
    // payloads as JSON text with the JSON flag.
    let mut bin_msgs = Vec::new();
    while bin_msgs.len() < 5 {
        match bin.recv().await {
            Got::Message {
                channel,
                seq,
                json,
                payload,
            } => {
                assert_eq!(channel, ch);
                bin_msgs.push((seq, json, payload));
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }
    assert_eq!(
        bin_msgs,
        [
            (1, false, vec![0xff, 0x00, 0x7f]),
            (2, false, br#"{"x":[1,2]}"#.to_vec()),
            (3, true, br#"{"t":"hi"}"#.to_vec()),
            (4, true, b"[true,null]".to_vec()),
            (5, false, vec![]),
        ]
    );
    let bin_seqs: Vec<u64> = bin_msgs.iter().map(|m| m.0).collect();
    assert_eq!(bin_seqs, seqs);
}

#[tokio::test]
async fn binary_resume_replays_the_missed_messages() {
    let relay = Relay::in_process(&[]);
    let ch = "resume:bin";
    let mut bin = BinWs::connect(&relay).await;
    let p = bin.publish(ch, 1, b"one").await;
    bin.publish(ch, 2, b"two").await;
    relay.publish(ch, json!("three")).await;

    let mut again = BinWs::connect(&relay).await;
    let got = again
        .subscribe(
            ch,
            7,
            Some(StreamPosition {
                epoch: p.epoch,
                seq: 1,
            }),
        )
        .await;
    assert_eq!(
        got,
        Got::Subscribed {
            id: Some(7),
            channel: ch.into(),
            position: StreamPosition {
                epoch: p.epoch,
                seq: 3
            },
            recovered: true
        }
    );
    for (seq, json, payload) in [(2, false, &b"two"[..]), (3, true, &b"\"three\""[..])] {
        assert_eq!(
            again.recv().await,
            Got::Message {
                channel: ch.into(),
                seq,
                json,
                payload: payload.to_vec()
            }
        );
    }
    // Another epoch: recovered:false and nothing replayed.
    let mut other = BinWs::connect(&relay).await;
    let got = other
        .subscribe(
            ch,
            8,
            Some(StreamPosition {
                epoch: Epoch(p.epoch.0 ^ 1),
                seq: 1,
            }),
        )
        .await;
    assert!(matches!(
        got,
        Got::Subscribed {
            recovered: false,
            ..
        }
    ));
    assert_eq!(other.recv_within(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn binary_errors_keep_the_connection_open() {
    let relay = Relay::in_process(&[]);
    let mut bin = BinWs::connect(&relay).await;
    let cases: [(Vec<u8>, Option<u64>, &str); 6] = [
        (vec![2, 4, 1, 5], None, "unsupported_version"),
        (vec![1, 0x42, 1, 6], Some(6), "unknown_type"),
        (vec![1, 0x84, 1, 7], Some(7), "unknown_type"), // an event sent as a command
        (vec![1, 2, 1, 8, 9, b'a'], Some(8), "bad_frame"), // channel length past the end
        (
            vec![1, 2, 1, 9, 3, b'a', b' ', b'b'],
            Some(9),
            "invalid_channel",
        ),
        (vec![1], None, "bad_frame"),
    ];
    for (frame, id, code) in cases {
        bin.send_raw(frame.clone()).await;
        match bin.recv().await {
            Got::Error { id: got, code: c } => {
                assert_eq!((got, c.as_str()), (id, code), "for {frame:?}")
            }
            other => panic!("expected an error for {frame:?}, got {other:?}"),
        }
    }
    // A text frame on a binary connection.
    bin.inner
        .send(Message::Text("{\"type\":\"heartbeat\"}".into()))
        .await
        .unwrap();
    assert!(matches!(bin.recv().await, Got::Error { code, .. } if code == "unsupported_frame"));
    // Still open: a heartbeat is answered with the same id.
    bin.send(Frame {
        id: Some(99),
        body: Body::Heartbeat,
    })
    .await;
    assert_eq!(bin.recv().await, Got::Heartbeat { id: Some(99) });
}

#[tokio::test]
async fn binary_payloads_read_back_as_json_from_the_history_api() {
    let relay = Relay::in_process(&[]);
    let mut bin = BinWs::connect(&relay).await;
    bin.publish("hist:bin", 1, &[0xff, 0x00, 0x7f]).await; // not JSON: base64
    bin.publish("hist:bin", 2, br#"{"ok":true}"#).await; // JSON text: the value
    let h = relay.history("hist:bin", "?since=0").await;
    assert_eq!(
        h["messages"],
        json!([
            {"seq": 1, "data": "/wB/", "encoding": "base64"},
            {"seq": 2, "data": {"ok": true}},
        ])
    );
}

#[tokio::test]
async fn binary_publish_conditions_apply_like_json() {
    let relay = Relay::start(&[]);
    let ch = "cond:1";
    let mut bin = BinWs::connect(&relay).await;
    let mut publish = async |id, key, expected| {
        bin.send(Frame {
            id: Some(id),
            body: Body::Publish {
                channel: ch,
                idempotency_key: key,
                expected_seq: expected,
                payload: b"x",
            },
        })
        .await;
        bin.recv().await
    };
    // A repeated key answers the first seq and publishes nothing.
    let Got::Published {
        position: first, ..
    } = publish(1, Some("k1"), None).await
    else {
        panic!("first keyed publish not published")
    };
    let Got::Published {
        position: again, ..
    } = publish(2, Some("k1"), None).await
    else {
        panic!("repeated key not answered with published")
    };
    assert_eq!((first.seq, again.seq), (1, 1));
    // Compare-and-set: the top is 1, so 0 loses and 1 wins.
    assert_eq!(
        publish(3, None, Some(0)).await,
        Got::Error {
            id: Some(3),
            code: "seq_mismatch".into()
        }
    );
    let Got::Published { position, .. } = publish(4, None, Some(1)).await else {
        panic!("matching expected_seq not published")
    };
    assert_eq!(position.seq, 2);
    // An empty key is refused, the connection stays open.
    assert_eq!(
        publish(5, Some(""), None).await,
        Got::Error {
            id: Some(5),
            code: "bad_request".into()
        }
    );
    let history = relay.history(ch, "").await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 2);
}
