//! Pipelined HTTP/1 (issue 17): a connection's API requests are answered in request order,
//! framed exactly, while several are in flight; the first request the front does not take (an
//! upgrade, a malformed or oversize head, `Connection: close`) is served by hyper on the same
//! connection after every answer before it. Raw `TcpStream`s write the bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{read_until_closed, Relay, Ws, RECV_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

fn relay(extra: &[&str]) -> Relay {
    let mut args = vec!["--shards", "1", "--api-rate-limit", "0"];
    args.extend_from_slice(extra);
    Relay::in_process(&args)
}

fn publish_request(channel: &str, data: &Value, extra: &str) -> String {
    let body = json!({"channel": channel, "data": data}).to_string();
    format!(
        "POST /api/publish HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n{extra}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One answer as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Takes one whole answer off the front of `buf`, strictly: a status line, headers, then
/// exactly `Content-Length` bytes of body (none for 101, 204 and 304).
fn take_answer(buf: &mut Vec<u8>) -> Option<Answer> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8(buf[..end].to_vec()).expect("an ASCII head");
    let status: u16 = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head:?}"));
    for line in head.lines().skip(1) {
        assert!(line.contains(": "), "a header line: {line:?}");
    }
    let mut a = Answer {
        status,
        head,
        body: Vec::new(),
    };
    let len = match status {
        101 | 204 | 304 => {
            assert!(a.header("content-length").is_none(), "{}", a.head);
            0
        }
        _ => a
            .header("content-length")
            .unwrap_or_else(|| panic!("a Content-Length: {}", a.head))
            .parse()
            .unwrap(),
    };
    if buf.len() < end + 4 + len {
        return None;
    }
    a.body = buf[end + 4..end + 4 + len].to_vec();
    buf.drain(..end + 4 + len);
    Some(a)
}

/// Reads `n` answers from `conn` ([`take_answer`]); `buf` keeps what follows them.
async fn answers(conn: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Vec<Answer> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < n {
        if let Some(a) = take_answer(buf) {
            got.push(a);
            continue;
        }
        let mut chunk = [0u8; 16 * 1024];
        let read = tokio::time::timeout_at(deadline, conn.read(&mut chunk)).await;
        let k = read
            .unwrap_or_else(|_| panic!("{} of {n} answers", got.len()))
            .unwrap();
        assert!(k > 0, "closed after {} of {n} answers: {got:?}", got.len());
        buf.extend_from_slice(&chunk[..k]);
    }
    got
}

/// Writes `wire` and reads every answer until the server closes: nothing but whole answers.
async fn answers_until_closed(addr: SocketAddr, wire: &str) -> Vec<Answer> {
    let mut conn = connect(addr).await;
    conn.write_all(wire.as_bytes()).await.unwrap();
    let mut buf = read_until_closed(&mut conn, RECV_TIMEOUT)
        .await
        .expect("the server closes the connection");
    let got: Vec<Answer> = std::iter::from_fn(|| take_answer(&mut buf)).collect();
    assert!(
        buf.is_empty(),
        "only whole answers: {:?}",
        String::from_utf8_lossy(&buf)
    );
    got
}

async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(RECV_TIMEOUT, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap()
}

async fn collect(ws: &mut Ws, n: usize) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = ws.recv_json().await;
        if m["type"] == "message" {
            got.push((m["seq"].as_u64().unwrap(), m["data"].clone()));
        }
    }
    got
}

#[tokio::test]
async fn pipelined_api_requests_are_answered_in_request_order_and_framed_exactly() {
    let relay = relay(&[]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("pipe").await;
    // More publishes than the front keeps in flight, with reads and a preflight among them.
    const N: u64 = 400;
    let mut wire = String::new();
    let mut kinds = Vec::new();
    for i in 0..N {
        wire.push_str(&publish_request("pipe", &json!({"i": i}), ""));
        kinds.push("publish");
        if i % 50 == 25 {
            wire.push_str("GET /api/history/pipe?since=0&limit=1 HTTP/1.1\r\nHost: relay\r\n\r\n");
            kinds.push("history");
            wire.push_str("GET /api/channels HTTP/1.1\r\nHost: relay\r\n\r\n");
            kinds.push("channels");
            wire.push_str(
                "OPTIONS /api/publish HTTP/1.1\r\nHost: relay\r\nOrigin: https://app.example\r\n\r\n",
            );
            kinds.push("preflight");
        }
    }
    let mut conn = connect(relay.addr()).await;
    conn.write_all(wire.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let got = answers(&mut conn, &mut buf, kinds.len()).await;
    let mut next_seq = 1;
    for (a, kind) in got.iter().zip(&kinds) {
        match *kind {
            "publish" => {
                assert_eq!(a.status, 200, "{a:?}");
                assert_eq!(a.json()["seq"], next_seq, "answers in request order");
                next_seq += 1;
            }
            "history" => {
                assert_eq!(a.status, 200, "{a:?}");
                assert_eq!(
                    a.json()["seq"],
                    next_seq - 1,
                    "a read sees every publish before it"
                );
            }
            "channels" => assert!(a.json()["channels"].is_array(), "{a:?}"),
            _ => {
                assert_eq!(a.status, 204, "{a:?}");
                assert_eq!(a.header("access-control-allow-origin"), Some("*"));
            }
        }
        assert!(
            a.header("date").is_some_and(|d| d.ends_with(" GMT")),
            "{a:?}"
        );
        assert_eq!(a.header("x-relay-shard"), Some("0"));
    }
    assert!(buf.is_empty(), "nothing after the last answer");
    let want: Vec<(u64, Value)> = (0..N).map(|i| (i + 1, json!({"i": i}))).collect();
    assert_eq!(
        collect(&mut ws, N as usize).await,
        want,
        "every message once, in order"
    );
    // The connection stays open for more.
    conn.write_all(publish_request("pipe", &json!("more"), "").as_bytes())
        .await
        .unwrap();
    let more = answers(&mut conn, &mut buf, 1).await;
    assert_eq!(more[0].json()["seq"], N + 1);
}

#[tokio::test]
async fn a_malformed_request_after_publishes_gets_its_400_after_their_answers() {
    let relay = relay(&[]);
    let mut wire = String::new();
    for i in 0..3 {
        wire.push_str(&publish_request("bad", &json!(i), ""));
    }
    wire.push_str("NOT HTTP AT ALL\r\n\r\n");
    let got = answers_until_closed(relay.addr(), &wire).await;
    let statuses: Vec<u16> = got.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 200, 400]);
    let seqs: Vec<Value> = got[..3].iter().map(|a| a.json()["seq"].clone()).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[tokio::test]
async fn a_head_over_the_cap_after_publishes_gets_431() {
    let relay = relay(&["--max-header-size", "8KiB"]);
    let mut wire = publish_request("big", &json!(1), "");
    wire.push_str(&format!(
        "GET /api/channels HTTP/1.1\r\nHost: relay\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10 * 1024)
    ));
    let mut conn = connect(relay.addr()).await;
    conn.write_all(wire.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let got = answers(&mut conn, &mut buf, 2).await;
    assert_eq!(got[0].status, 200);
    assert_eq!(got[1].status, 431);
}

#[tokio::test]
async fn an_upgrade_after_pipelined_publishes_opens_a_websocket_on_the_same_connection() {
    let relay = relay(&[]);
    let mut wire = String::new();
    for i in 0..5 {
        wire.push_str(&publish_request("up", &json!(i), ""));
    }
    wire.push_str(&common::RawWs::handshake_request(relay.addr()));
    let mut conn = connect(relay.addr()).await;
    conn.write_all(wire.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let got = answers(&mut conn, &mut buf, 6).await;
    let statuses: Vec<u16> = got.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 101]);
    assert!(buf.is_empty());
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        conn,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let sub = json!({"type": "subscribe", "channel": "up"}).to_string();
    ws.send(sub.into()).await.unwrap();
    // Subscribed on the upgraded connection: the next publish arrives, after the five.
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("frames within the timeout")
            .unwrap()
            .unwrap();
        let Ok(text) = m.to_text() else { continue };
        let v: Value = serde_json::from_str(text).unwrap();
        match v["type"].as_str() {
            Some("subscribed") => {
                relay.publish("up", json!("live")).await;
            }
            Some("message") => {
                assert_eq!((v["seq"].as_u64(), &v["data"]), (Some(6), &json!("live")));
                break;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_close_request_is_the_last_one_served() {
    let relay = relay(&[]);
    let mut wire = String::new();
    wire.push_str(&publish_request("close", &json!(1), ""));
    wire.push_str(&publish_request(
        "close",
        &json!(2),
        "Connection: close\r\n",
    ));
    wire.push_str(&publish_request("close", &json!(3), ""));
    let got = answers_until_closed(relay.addr(), &wire).await;
    assert_eq!(got.len(), 2, "nothing after the close: {got:?}");
    assert_eq!(got[1].json()["seq"], 2);
    assert_eq!(got[1].header("connection"), Some("close"));
    let h = relay.history("close", "?since=0").await;
    assert_eq!(
        h["seq"], 2,
        "the request after the close is not served: {h}"
    );
}

#[tokio::test]
async fn a_body_that_stops_short_gets_408_after_the_answers_before_it() {
    let relay = relay(&["--body-timeout", "300ms"]);
    let mut wire = String::new();
    wire.push_str(&publish_request("slow", &json!(1), ""));
    wire.push_str(&publish_request("slow", &json!(2), ""));
    wire.push_str(
        "POST /api/publish HTTP/1.1\r\nHost: relay\r\nContent-Length: 100\r\n\r\n{\"chan",
    );
    let got = answers_until_closed(relay.addr(), &wire).await;
    let statuses: Vec<u16> = got.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 408]);
    assert_eq!(got[2].json()["error"]["code"], "request_timeout");
}

#[tokio::test]
async fn a_request_with_an_unknown_key_is_refused_in_its_place() {
    let relay = relay(&["--api-key", "secret"]);
    let mut wire = String::new();
    wire.push_str(&publish_request(
        "auth",
        &json!(1),
        "Authorization: Bearer secret\r\n",
    ));
    wire.push_str(&publish_request(
        "auth",
        &json!(2),
        "Authorization: Bearer wrong\r\n",
    ));
    wire.push_str(&publish_request(
        "auth",
        &json!(3),
        "Authorization: Bearer secret\r\n",
    ));
    let mut conn = connect(relay.addr()).await;
    conn.write_all(wire.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let got = answers(&mut conn, &mut buf, 3).await;
    let statuses: Vec<u16> = got.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 401, 200]);
    assert_eq!(got[2].json()["seq"], 2);
}

#[tokio::test]
async fn a_pipelined_batch_over_many_channels_keeps_each_channels_order_and_its_keys() {
    let relay = relay(&[]);
    const CHANNELS: u64 = 20;
    const ROUNDS: u64 = 5;
    let mut subs = Vec::new();
    for c in 0..CHANNELS {
        let mut ws = Ws::connect(&relay.ws_url()).await;
        ws.subscribe(&format!("room-{c}")).await;
        subs.push(ws);
    }
    // One write: publishes round-robin over the channels (as a chat backend does), each round's
    // first publish repeated with its idempotency key right after it.
    let mut wire = String::new();
    let mut want = Vec::new();
    for r in 0..ROUNDS {
        for c in 0..CHANNELS {
            let ch = format!("room-{c}");
            let body =
                json!({"channel": ch, "data": {"r": r}, "idempotency_key": format!("k{r}-{c}")})
                    .to_string();
            let req = format!(
                "POST /api/publish HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            wire.push_str(&req);
            want.push((c, r + 1, false));
            if c == 0 {
                wire.push_str(&req);
                want.push((c, r + 1, true));
            }
        }
    }
    let mut conn = connect(relay.addr()).await;
    conn.write_all(wire.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let got = answers(&mut conn, &mut buf, want.len()).await;
    for (a, (c, seq, dup)) in got.iter().zip(&want) {
        assert_eq!(a.status, 200, "{a:?}");
        let j = a.json();
        assert_eq!(
            j["channel"],
            format!("room-{c}"),
            "answers in request order"
        );
        assert_eq!(j["seq"], *seq, "each channel's seqs follow its requests");
        assert_eq!(j["duplicate"].as_bool().unwrap_or(false), *dup, "{j}");
    }
    let expect: Vec<(u64, Value)> = (0..ROUNDS).map(|r| (r + 1, json!({"r": r}))).collect();
    for (c, ws) in subs.iter_mut().enumerate() {
        assert_eq!(
            collect(ws, ROUNDS as usize).await,
            expect,
            "room-{c}: every message once, in order, a repeated key publishing nothing"
        );
    }
    // Nothing more came: a repeated key did not publish.
    conn.write_all(publish_request("room-0", &json!("last"), "").as_bytes())
        .await
        .unwrap();
    let last = answers(&mut conn, &mut buf, 1).await;
    assert_eq!(last[0].json()["seq"], ROUNDS + 1);
    assert_eq!(
        collect(&mut subs[0], 1).await,
        [(ROUNDS + 1, json!("last"))]
    );
}

#[tokio::test]
async fn a_chunked_publish_body_in_several_pieces_is_published_whole() {
    let relay = relay(&[]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("chunks").await;
    let body = json!({"channel": "chunks", "data": {"text": "one two three"}}).to_string();
    let (a, rest) = body.split_at(10);
    let (b, c) = rest.split_at(12);
    // Chunked goes to hyper, whose body comes in as the chunks arrive: three frames.
    let mut conn = connect(relay.addr()).await;
    conn.write_all(
        b"POST /api/publish HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    for piece in [a, b, c] {
        let chunk = format!("{:x}\r\n{piece}\r\n", piece.len());
        conn.write_all(chunk.as_bytes()).await.unwrap();
        conn.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    conn.write_all(b"0\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let got = answers(&mut conn, &mut buf, 1).await;
    assert_eq!(got[0].status, 200, "{:?}", got[0]);
    assert_eq!(got[0].json()["seq"], 1);
    assert_eq!(
        collect(&mut ws, 1).await,
        [(1, json!({"text": "one two three"}))]
    );
}

/// Raw inflate of a permessage-deflate message (RFC 7692 §7.2.2: its bytes, then 00 00 ff ff).
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = flate2::Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 16);
    d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
        .expect("valid deflate data");
    out
}

#[tokio::test]
async fn a_pipelined_batch_to_one_channel_reaches_every_subscriber_as_its_messages_in_order() {
    // A separate process: the test reads its metrics.
    let relay = Relay::start(&["--shards", "1", "--api-rate-limit", "0"]);
    const N: u64 = 40;
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("one").await;
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    let (mut zipped, head) = common::RawWs::connect_with(relay.addr(), offer).await;
    assert!(head.contains("permessage-deflate"), "{head}");
    zipped
        .send_json(json!({"type": "subscribe", "channel": "one"}))
        .await;
    common::assert_subscribed(&zipped.recv_json().await, "one");
    // A stream of the channel alone (its `id:` lines are the channel's own) and one of two
    // channels (each `id:` names both).
    let mut sse = common::Sse::connect(&relay.http("/sse?channel=one")).await;
    let epoch = |ev: &common::SseEvent| {
        let id = ev.id.clone().unwrap_or_default();
        id.split(':').next().unwrap_or_default().to_string()
    };
    let e1 = epoch(&sse.expect_event("subscribed").await);
    let mut both = common::Sse::connect(&relay.http("/sse?channel=one&channel=two")).await;
    let first = both.expect_event("subscribed").await;
    let id = first.id.clone().unwrap_or_default();
    // Channel two's position, which the batch does not move.
    let two = id
        .split_once(',')
        .map_or(String::new(), |(_, t)| t.to_string());
    assert_eq!(id, format!("{e1}:0,{two}"));
    // One write: the pass that fans it out carries every message of the batch, which joined
    // subscribers get as one queue entry. Every other message is big enough to be compressed.
    let data = |i: u64| {
        if i % 2 == 0 {
            json!({"i": i, "text": "a rather repetitive payload ".repeat(20)})
        } else {
            json!({"i": i})
        }
    };
    let wire: String = (1..=N)
        .map(|i| publish_request("one", &data(i), ""))
        .collect();
    let mut conn = connect(relay.addr()).await;
    conn.write_all(wire.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    for (i, a) in answers(&mut conn, &mut buf, N as usize)
        .await
        .iter()
        .enumerate()
    {
        assert_eq!(a.json()["seq"], i as u64 + 1, "{a:?}");
    }
    let expect: Vec<(u64, Value)> = (1..=N).map(|i| (i, data(i))).collect();
    assert_eq!(collect(&mut ws, N as usize).await, expect, "one frame each");
    let mut got = Vec::new();
    let mut compressed = 0;
    while got.len() < N as usize {
        let f = match zipped.read_frame(RECV_TIMEOUT).await {
            common::RawRead::Frame(f) if f.opcode == common::OP_TEXT => f,
            common::RawRead::Frame(_) => continue,
            other => panic!("no data frame: {other:?}"),
        };
        let text = if f.rsv == 0b100 {
            compressed += 1;
            inflate(&f.payload)
        } else {
            f.payload.clone()
        };
        let m: Value = serde_json::from_slice(&text).unwrap();
        got.push((m["seq"].as_u64().unwrap(), m["data"].clone()));
    }
    assert_eq!(got, expect, "each message its own frame, decoded");
    assert_eq!(
        compressed,
        N / 2,
        "the big ones compressed, each on its own"
    );
    for i in 1..=N {
        let m = sse.expect_message("one", i).await;
        assert_eq!(m.json()["data"], data(i), "SSE: one event and id each");
        assert_eq!(m.id, Some(format!("{e1}:{i}")));
        let m = both.expect_message("one", i).await;
        assert_eq!(m.json()["data"], data(i));
        assert_eq!(m.id, Some(format!("{e1}:{i},{two}")), "both positions");
    }
    // A stream resumed from the middle of the batch gets the rest, each once.
    let from = format!("{e1}:{}", N / 2);
    let mut again =
        common::Sse::connect_with(&relay.http("/sse?channel=one"), &[("Last-Event-ID", &from)])
            .await;
    again.expect_event("subscribed").await;
    for i in N / 2 + 1..=N {
        let m = again.expect_message("one", i).await;
        assert_eq!(m.id, Some(format!("{e1}:{i}")));
    }
    assert!(
        relay.metric("relay_messages_joined_total").await > 0.0,
        "the WebSocket subscribers got the batch joined"
    );
    // Every message frame written counts in relay_frames_per_write, joined or not: N to each
    // of the two WebSocket subscribers and the two first streams, N / 2 to the resumed one.
    let written = relay.metric("relay_frames_per_write_sum").await;
    assert!(
        written >= (4 * N + N / 2) as f64,
        "{written} frames written"
    );
}
