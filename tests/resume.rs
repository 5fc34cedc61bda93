//! Resuming from a position over WebSocket and SSE (docs/protocol.md, "Sequence IDs and
//! epochs", "WebSocket", "Server-Sent Events").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::json;

const BOGUS_EPOCH: &str = "deadbeef0badf00d";

// ------------------------------------------------------------------------------------------
// WebSocket
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_resume_replays_exactly_the_missed_messages() {
    let relay = Relay::in_process(&[]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    let s = ws.subscribe("r").await;
    let epoch = assert_epoch(&s["epoch"]);
    for i in 1..=3u64 {
        relay.publish("r", json!({"i": i})).await;
    }
    for i in 1..=3u64 {
        assert_eq!(ws.expect_message("r", i).await, json!({"i": i}));
    }
    drop(ws);

    for i in 4..=8u64 {
        relay.publish("r", json!({"i": i})).await;
    }

    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.send_json(json!({"type":"subscribe","id":"re","channel":"r","since":3,"epoch":epoch}))
        .await;
    let s = ws.recv_json().await;
    assert_subscribed(&s, "r");
    assert_eq!(s["id"], json!("re"), "{s}");
    assert_eq!(s["recovered"], json!(true), "{s}");
    assert_eq!(s["seq"], json!(8), "{s}");
    assert_eq!(s["epoch"], json!(epoch), "{s}");
    for i in 4..=8u64 {
        assert_eq!(ws.expect_message("r", i).await, json!({"i": i}));
    }
    relay.publish("r", json!({"i": 9})).await;
    assert_eq!(ws.expect_message("r", 9).await, json!({"i": 9}));

    // Resuming at the latest seq: recovered, nothing replayed, live follows.
    let mut ws2 = Ws::connect(&relay.ws_url()).await;
    let s = ws2.subscribe_resume("r", 9, &epoch).await;
    assert_eq!(s["recovered"], json!(true), "{s}");
    assert_eq!(s["seq"], json!(9), "{s}");
    relay.publish("r", json!({"i": 10})).await;
    ws2.expect_message("r", 10).await;

    // since ahead of the channel: recovered false, no replay, live follows.
    let mut ws3 = Ws::connect(&relay.ws_url()).await;
    let s = ws3.subscribe_resume("r", 100, &epoch).await;
    assert_eq!(s["recovered"], json!(false), "{s}");
    assert_eq!(s["seq"], json!(10), "{s}");
    relay.publish("r", json!({"i": 11})).await;
    ws3.expect_message("r", 11).await;
}

/// Resume while messages keep being published: none missing, none repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ws_resume_during_concurrent_publishing() {
    let relay = Relay::in_process(&[]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    let epoch = assert_epoch(&ws.subscribe("c").await["epoch"]);
    for _ in 0..20 {
        relay.publish("c", json!("x")).await;
    }
    for i in 1..=20 {
        ws.expect_message("c", i).await;
    }
    drop(ws);
    for _ in 0..20 {
        relay.publish("c", json!("x")).await;
    }

    let client = relay.client().clone();
    let url = relay.http("/api/publish");
    let publisher = tokio::spawn(async move {
        for _ in 0..100 {
            let r = client
                .post(&url)
                .json(&json!({"channel":"c","data":"y"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
    });

    let mut ws = Ws::connect(&relay.ws_url()).await;
    let s = ws.subscribe_resume("c", 20, &epoch).await;
    assert_eq!(s["recovered"], json!(true), "{s}");
    let at = s["seq"].as_u64().unwrap();
    assert!((40..=140).contains(&at), "{s}");
    for i in 21..=140 {
        ws.expect_message("c", i).await;
    }
    tokio::time::timeout(RECV_TIMEOUT, publisher)
        .await
        .expect("publisher finished")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_resume_with_other_epoch_is_not_recovered() {
    let relay = Relay::in_process(&[]);
    for i in 1..=5u64 {
        relay.publish("e", json!(i)).await;
    }
    let mut ws = Ws::connect(&relay.ws_url()).await;
    let s = ws.subscribe_resume("e", 2, BOGUS_EPOCH).await;
    assert_eq!(s["recovered"], json!(false), "{s}");
    assert_eq!(s["seq"], json!(5), "{s}");
    assert_ne!(s["epoch"], json!(BOGUS_EPOCH), "{s}");
    // No replay: the very next frame is the next live message.
    relay.publish("e", json!(6)).await;
    assert_eq!(ws.expect_message("e", 6).await, json!(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_resume_gap_older_than_history_is_not_recovered() {
    let relay = Relay::in_process(&["--history-size", "5"]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    let epoch = assert_epoch(&ws.subscribe("g").await["epoch"]);
    relay.publish("g", json!(1)).await;
    ws.expect_message("g", 1).await;
    drop(ws);
    for i in 2..=21u64 {
        relay.publish("g", json!(i)).await;
    }
    let mut ws = Ws::connect(&relay.ws_url()).await;
    let s = ws.subscribe_resume("g", 1, &epoch).await;
    assert_eq!(s["recovered"], json!(false), "{s}");
    assert_eq!(s["seq"], json!(21), "{s}");
    assert_eq!(s["epoch"], json!(epoch), "{s}");
    // Never a partial replay: the next frame is the next live message.
    relay.publish("g", json!(22)).await;
    assert_eq!(ws.expect_message("g", 22).await, json!(22));

    // A gap that history still covers (history holds 18..=22, since = 17) is recovered.
    let mut ws = Ws::connect(&relay.ws_url()).await;
    let s = ws.subscribe_resume("g", 17, &epoch).await;
    assert_eq!(s["recovered"], json!(true), "{s}");
    for i in 18..=22 {
        assert_eq!(ws.expect_message("g", i).await, json!(i));
    }
}

// ------------------------------------------------------------------------------------------
// SSE
// ------------------------------------------------------------------------------------------

/// Open a one-channel stream, publish 1..=3, read them, return (epoch, last id).
async fn sse_read_three(relay: &Relay, ch: &str) -> (String, String) {
    let mut sse = Sse::connect(&relay.http(&format!("/sse?channel={ch}"))).await;
    let sub = sse.expect_event("subscribed").await;
    let epoch = assert_epoch(&sub.json()["channels"][0]["epoch"]);
    for i in 1..=3u64 {
        relay.publish(ch, json!({"i": i})).await;
    }
    let mut last = None;
    for i in 1..=3u64 {
        let m = sse.expect_message(ch, i).await;
        assert_eq!(m.id, Some(format!("{epoch}:{i}")));
        last = m.id;
    }
    (epoch, last.unwrap())
}

async fn sse_check_resumed(relay: &Relay, mut sse: Sse, ch: &str, epoch: &str) {
    let sub = sse.expect_event("subscribed").await;
    let d = sub.json();
    assert_eq!(
        d,
        json!({"channels":[{"channel":ch,"epoch":epoch,"seq":6,"recovered":true}]}),
        "subscribed on resume"
    );
    let id = sub.id.expect("subscribed event has an id");
    assert!(id.starts_with(&format!("{epoch}:")), "{id}");
    for i in 4..=6u64 {
        let m = sse.expect_message(ch, i).await;
        assert_eq!(m.id, Some(format!("{epoch}:{i}")));
        assert_eq!(m.json(), json!({"channel":ch,"seq":i,"data":{"i":i}}));
    }
    relay.publish(ch, json!({"i": 7})).await;
    let m = sse.expect_message(ch, 7).await;
    assert_eq!(m.id, Some(format!("{epoch}:7")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resume_with_last_event_id_header() {
    let relay = Relay::in_process(&[]);
    let (epoch, last) = sse_read_three(&relay, "x").await;
    assert_eq!(last, format!("{epoch}:3"));
    for i in 4..=6u64 {
        relay.publish("x", json!({"i": i})).await;
    }
    let sse = Sse::connect_with(&relay.http("/sse?channel=x"), &[("Last-Event-ID", &last)]).await;
    sse_check_resumed(&relay, sse, "x", &epoch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resume_with_last_event_id_query() {
    let relay = Relay::in_process(&[]);
    let (epoch, last) = sse_read_three(&relay, "q").await;
    for i in 4..=6u64 {
        relay.publish("q", json!({"i": i})).await;
    }
    let sse = Sse::connect(&relay.http(&format!("/sse?channel=q&last_event_id={last}"))).await;
    sse_check_resumed(&relay, sse, "q", &epoch).await;
}

/// A client that saw only the `subscribed` event can resume from its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resume_from_subscribed_id() {
    let relay = Relay::in_process(&[]);
    let mut sse = Sse::connect(&relay.http("/sse?channel=s")).await;
    let sub = sse.expect_event("subscribed").await;
    let start = sub.id.clone().expect("subscribed id");
    drop(sse);
    relay.publish("s", json!("one")).await;
    relay.publish("s", json!("two")).await;
    let mut sse =
        Sse::connect_with(&relay.http("/sse?channel=s"), &[("Last-Event-ID", &start)]).await;
    let sub = sse.expect_event("subscribed").await;
    assert_eq!(
        sub.json()["channels"][0]["recovered"],
        json!(true),
        "{sub:?}"
    );
    assert_eq!(sse.expect_message("s", 1).await.json()["data"], "one");
    assert_eq!(sse.expect_message("s", 2).await.json()["data"], "two");
}

fn cursor(parts: &[(&str, u64)]) -> String {
    parts
        .iter()
        .map(|(e, s)| format!("{e}:{s}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_multi_channel_resume() {
    let relay = Relay::in_process(&[]);
    let mut sse = Sse::connect(&relay.http("/sse?channel=a&channel=b")).await;
    let sub = sse.expect_event("subscribed").await;
    let d = sub.json();
    let ea = assert_epoch(&d["channels"][0]["epoch"]);
    let eb = assert_epoch(&d["channels"][1]["epoch"]);
    relay.publish("a", json!("a1")).await;
    sse.expect_message("a", 1).await;
    relay.publish("b", json!("b1")).await;
    let last = sse.expect_message("b", 1).await.id.unwrap();
    assert_eq!(last, cursor(&[(&ea, 1), (&eb, 1)]));
    drop(sse);

    relay.publish("a", json!("a2")).await;
    relay.publish("b", json!("b2")).await;
    relay.publish("a", json!("a3")).await;
    relay.publish("b", json!("b3")).await;
    relay.publish("b", json!("b4")).await;

    let mut sse = Sse::connect_with(
        &relay.http("/sse?channel=a&channel=b"),
        &[("Last-Event-ID", &last)],
    )
    .await;
    let sub = sse.expect_event("subscribed").await;
    assert_eq!(
        sub.json(),
        json!({"channels":[
            {"channel":"a","epoch":ea,"seq":3,"recovered":true},
            {"channel":"b","epoch":eb,"seq":4,"recovered":true},
        ]})
    );

    // Exactly the 5 missed messages: per channel in order; every event's id is the position
    // of every channel at that event.
    let epochs: HashMap<&str, &str> = [("a", ea.as_str()), ("b", eb.as_str())].into();
    let mut pos: HashMap<String, u64> = [("a".to_string(), 1), ("b".to_string(), 1)].into();
    let mut got = Vec::new();
    for _ in 0..5 {
        let m = sse.expect_event("message").await;
        let v = m.json();
        let ch = v["channel"].as_str().unwrap().to_string();
        let seq = v["seq"].as_u64().unwrap();
        assert_eq!(
            seq,
            pos[&ch] + 1,
            "out of order / gap / repeat on {ch}: {m:?}"
        );
        assert_eq!(v["data"], json!(format!("{ch}{seq}")), "{m:?}");
        pos.insert(ch.clone(), seq);
        let expect_id = cursor(&[(epochs["a"], pos["a"]), (epochs["b"], pos["b"])]);
        assert_eq!(m.id, Some(expect_id), "cursor of {m:?}");
        got.push((ch, seq));
    }
    assert_eq!(pos["a"], 3);
    assert_eq!(pos["b"], 4);

    relay.publish("a", json!("a4")).await;
    let m = sse.expect_message("a", 4).await;
    assert_eq!(m.id, Some(cursor(&[(&ea, 4), (&eb, 4)])));
}

/// Read events after `subscribed` until `want` gap events and `msgs` message events were seen;
/// returns them in arrival order.
async fn collect(sse: &mut Sse, gaps: usize, msgs: usize) -> Vec<SseEvent> {
    let mut out = Vec::new();
    let (mut g, mut m) = (0, 0);
    while g < gaps || m < msgs {
        assert!(out.len() < 50, "too many events: {out:?}");
        let ev = sse.next_event().await;
        match ev.event.as_str() {
            "gap" => g += 1,
            "message" => m += 1,
            other => panic!("unexpected event {other}: {ev:?}"),
        }
        out.push(ev);
    }
    out
}

fn assert_gaps_first(events: &[SseEvent]) {
    let last_gap = events.iter().rposition(|e| e.event == "gap");
    let first_msg = events.iter().position(|e| e.event == "message");
    if let (Some(g), Some(m)) = (last_gap, first_msg) {
        assert!(g < m, "gap events must come before any message: {events:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_gap_when_history_cannot_cover() {
    let relay = Relay::in_process(&["--history-size", "3"]);
    let mut sse = Sse::connect(&relay.http("/sse?channel=a&channel=b")).await;
    let d = sse.expect_event("subscribed").await.json();
    let ea = assert_epoch(&d["channels"][0]["epoch"]);
    let eb = assert_epoch(&d["channels"][1]["epoch"]);
    relay.publish("a", json!("a1")).await;
    sse.expect_message("a", 1).await;
    relay.publish("b", json!("b1")).await;
    let last = sse.expect_message("b", 1).await.id.unwrap();
    drop(sse);

    for i in 2..=11 {
        relay.publish("a", json!(format!("a{i}"))).await;
    }
    relay.publish("b", json!("b2")).await;

    let mut sse =
        Sse::connect(&relay.http(&format!("/sse?channel=a&channel=b&last_event_id={last}"))).await;
    let sub = sse.expect_event("subscribed").await;
    assert_eq!(
        sub.json(),
        json!({"channels":[
            {"channel":"a","epoch":ea,"seq":11,"recovered":false},
            {"channel":"b","epoch":eb,"seq":2,"recovered":true},
        ]})
    );
    let events = collect(&mut sse, 1, 1).await;
    assert_gaps_first(&events);
    let gap = events.iter().find(|e| e.event == "gap").unwrap();
    assert_eq!(
        gap.json(),
        json!({"channel":"a","reason":"history_expired","epoch":ea,"seq":11})
    );
    let msg = events.iter().find(|e| e.event == "message").unwrap();
    assert_eq!(msg.json(), json!({"channel":"b","seq":2,"data":"b2"}));
    assert_eq!(msg.id, Some(cursor(&[(&ea, 11), (&eb, 2)])));

    // Nothing of a's lost range is replayed; live continues from a's current position.
    relay.publish("a", json!("a12")).await;
    let m = sse.expect_message("a", 12).await;
    assert_eq!(m.id, Some(cursor(&[(&ea, 12), (&eb, 2)])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_gap_epoch_changed_and_bad_cursor() {
    let relay = Relay::in_process(&[]);
    let ea = assert_epoch(&relay.publish("a", json!("a1")).await["epoch"]);
    let eb = assert_epoch(&relay.publish("b", json!("b1")).await["epoch"]);
    relay.publish("b", json!("b2")).await;

    // a: other epoch -> gap epoch_changed; b: covered -> recovered
    let c = cursor(&[(BOGUS_EPOCH, 1), (&eb, 1)]);
    let mut sse = Sse::connect_with(
        &relay.http("/sse?channel=a&channel=b"),
        &[("Last-Event-ID", &c)],
    )
    .await;
    let sub = sse.expect_event("subscribed").await;
    assert_eq!(
        sub.json(),
        json!({"channels":[
            {"channel":"a","epoch":ea,"seq":1,"recovered":false},
            {"channel":"b","epoch":eb,"seq":2,"recovered":true},
        ]})
    );
    let events = collect(&mut sse, 1, 1).await;
    assert_gaps_first(&events);
    let gap = events.iter().find(|e| e.event == "gap").unwrap();
    assert_eq!(
        gap.json(),
        json!({"channel":"a","reason":"epoch_changed","epoch":ea,"seq":1})
    );
    let msg = events.iter().find(|e| e.event == "message").unwrap();
    assert_eq!(msg.json(), json!({"channel":"b","seq":2,"data":"b2"}));
    drop(sse);

    // A cursor that does not match the channel list (one entry for two channels).
    let c = cursor(&[(&ea, 0)]);
    let mut sse = Sse::connect_with(
        &relay.http("/sse?channel=a&channel=b"),
        &[("Last-Event-ID", &c)],
    )
    .await;
    let sub = sse.expect_event("subscribed").await;
    assert_eq!(
        sub.json(),
        json!({"channels":[
            {"channel":"a","epoch":ea,"seq":1,"recovered":false},
            {"channel":"b","epoch":eb,"seq":2,"recovered":false},
        ]})
    );
    let events = collect(&mut sse, 2, 0).await;
    let mut gaps: Vec<_> = events.iter().map(|e| e.json()).collect();
    gaps.sort_by_key(|g| g["channel"].as_str().unwrap().to_string());
    assert_eq!(
        gaps,
        vec![
            json!({"channel":"a","reason":"bad_cursor","epoch":ea,"seq":1}),
            json!({"channel":"b","reason":"bad_cursor","epoch":eb,"seq":2}),
        ]
    );
    // Then live, with no replay.
    relay.publish("b", json!("b3")).await;
    let m = sse.expect_message("b", 3).await;
    assert_eq!(m.id, Some(cursor(&[(&ea, 1), (&eb, 3)])));
}
