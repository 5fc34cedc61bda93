//! Pusher Channels over the relay engine, with a raw WebSocket client and signed HTTP API
//! requests: the protocol, its refusals in Pusher's shapes, and one channel shared with relay
//! clients. (pusher-js and the official `pusher` server library are tested in
//! `clients/pusher-test`.) Signatures are made with `relay::protocol::pusher::sign`, whose
//! output a unit test checks against the reference value of Pusher's documentation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod common;

use std::time::Duration;

use common::{Relay, Ws};
use relay::protocol::pusher::{md5_hex, sign};
use serde_json::{json, Value};

const SECRET1: &str = "secret-one-1234";
const APPS: &[&str] = &[
    "--pusher-app",
    "app1:key1:secret-one-1234:client_events=true",
    "--pusher-app",
    "app2:key2:secret-two-1234",
];

fn pusher_url(relay: &Relay, key: &str) -> String {
    format!(
        "ws://{}/app/{key}?protocol=7&client=js&version=8.4.0&flash=false",
        relay.addr()
    )
}

/// A Pusher connection and its socket id.
async fn connect(relay: &Relay, key: &str) -> (Ws, String) {
    let mut ws = Ws::connect(&pusher_url(relay, key)).await;
    let v = ws.recv_json().await;
    assert_eq!(v["event"], "pusher:connection_established", "{v}");
    let data: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
    assert!(data["activity_timeout"].as_u64().unwrap() > 0, "{data}");
    let socket_id = data["socket_id"].as_str().unwrap().to_owned();
    assert!(
        socket_id.split('.').count() == 2
            && socket_id
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        "{socket_id}"
    );
    (ws, socket_id)
}

/// The next frame.
async fn next(ws: &mut Ws) -> Value {
    ws.recv_json().await
}

async fn subscribe(ws: &mut Ws, channel: &str, auth: Option<String>, channel_data: Option<&str>) {
    let mut data = json!({ "channel": channel });
    if let Some(a) = auth {
        data["auth"] = json!(a);
    }
    if let Some(d) = channel_data {
        data["channel_data"] = json!(d);
    }
    ws.send_json(json!({"event":"pusher:subscribe","data":data}))
        .await;
}

fn auth(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    let mut msg = format!("{socket_id}:{channel}");
    if let Some(d) = channel_data {
        msg = format!("{msg}:{d}");
    }
    format!("key1:{}", sign(SECRET1, msg.as_bytes()))
}

async fn subscribed(ws: &mut Ws, channel: &str) -> Value {
    let v = next(ws).await;
    assert_eq!(v["event"], "pusher_internal:subscription_succeeded", "{v}");
    assert_eq!(v["channel"], channel, "{v}");
    v
}

/// A signed HTTP API request of app1, as the Pusher server libraries sign it.
async fn api(
    relay: &Relay,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: Option<&Value>,
    timestamp: u64,
) -> (u16, String) {
    let body = body.map(|b| b.to_string());
    let mut q: Vec<(String, String)> = vec![
        ("auth_key".into(), "key1".into()),
        ("auth_timestamp".into(), timestamp.to_string()),
        ("auth_version".into(), "1.0".into()),
    ];
    if let Some(b) = &body {
        q.push(("body_md5".into(), md5_hex(b.as_bytes())));
    }
    q.extend(params.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    q.sort();
    let query = q
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let sig = sign(SECRET1, format!("{method}\n{path}\n{query}").as_bytes());
    let url = relay.http(&format!("{path}?{query}&auth_signature={sig}"));
    let rb = match method {
        "POST" => relay.client().post(url).body(body.unwrap_or_default()),
        _ => relay.client().get(url),
    };
    let resp = rb.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn trigger(relay: &Relay, body: Value) {
    let (status, text) = api(relay, "POST", "/apps/app1/events", &[], Some(&body), now()).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pusher_client_and_a_relay_client_see_the_same_messages_in_the_same_order() {
    let relay = Relay::start(APPS);
    let (mut p, _) = connect(&relay, "key1").await;
    subscribe(&mut p, "news", None, None).await;
    subscribed(&mut p, "news").await;
    let mut r = Ws::connect(&relay.ws_url()).await;
    r.subscribe("pusher/app1/news").await;

    trigger(
        &relay,
        json!({"name":"headline","data":"{\"n\":1}","channels":["news"]}),
    )
    .await;
    relay
        .publish("pusher/app1/news", json!({"from":"relay"}))
        .await;
    relay
        .publish(
            "pusher/app1/news",
            json!({"event":"named","data":"from relay"}),
        )
        .await;

    let v = next(&mut p).await;
    assert_eq!(
        (
            v["event"].as_str(),
            v["channel"].as_str(),
            v["data"].as_str()
        ),
        (Some("headline"), Some("news"), Some("{\"n\":1}")),
        "{v}"
    );
    let v = next(&mut p).await;
    assert_eq!(v["event"], "message", "a relay payload without a name: {v}");
    assert_eq!(v["data"], json!({"from":"relay"}));
    let v = next(&mut p).await;
    assert_eq!(
        (v["event"].as_str(), v["data"].as_str()),
        (Some("named"), Some("from relay"))
    );

    let m = r.expect_message("pusher/app1/news", 1).await;
    assert_eq!(m, json!({"event":"headline","data":"{\"n\":1}"}));
    let m = r.expect_message("pusher/app1/news", 2).await;
    assert_eq!(m, json!({"from":"relay"}));
    r.expect_message("pusher/app1/news", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_are_isolated_and_the_sender_socket_is_excluded() {
    let relay = Relay::start(APPS);
    let (mut a, a_id) = connect(&relay, "key1").await;
    let (mut b, _) = connect(&relay, "key1").await;
    let (mut other_app, _) = connect(&relay, "key2").await;
    for ws in [&mut a, &mut b, &mut other_app] {
        subscribe(ws, "room", None, None).await;
        subscribed(ws, "room").await;
    }
    trigger(
        &relay,
        json!({"name":"e","data":"1","channels":["room"],"socket_id":a_id}),
    )
    .await;
    trigger(&relay, json!({"name":"e","data":"2","channel":"room"})).await;
    assert_eq!(next(&mut b).await["data"], "1");
    assert_eq!(next(&mut b).await["data"], "2");
    assert_eq!(
        next(&mut a).await["data"],
        "2",
        "socket_id excluded the first"
    );
    assert!(
        other_app
            .recv_json_within(Duration::from_millis(300))
            .await
            .is_none(),
        "another app's channel of the same name gets nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_channels_need_a_valid_signature() {
    let relay = Relay::start(APPS);
    let (mut ws, socket_id) = connect(&relay, "key1").await;
    subscribe(&mut ws, "private-x", None, None).await;
    let v = next(&mut ws).await;
    assert_eq!(v["event"], "pusher:error", "{v}");
    assert_eq!(v["data"]["code"], 4009, "{v}");
    let v = next(&mut ws).await;
    assert_eq!(v["event"], "pusher:subscription_error", "{v}");
    assert_eq!(
        (v["channel"].as_str(), v["data"]["status"].as_u64()),
        (Some("private-x"), Some(401))
    );

    // A signature for another socket is refused the same way.
    subscribe(
        &mut ws,
        "private-x",
        Some(auth("1.2", "private-x", None)),
        None,
    )
    .await;
    assert_eq!(next(&mut ws).await["data"]["code"], 4009);
    assert_eq!(next(&mut ws).await["event"], "pusher:subscription_error");

    subscribe(
        &mut ws,
        "private-x",
        Some(auth(&socket_id, "private-x", None)),
        None,
    )
    .await;
    subscribed(&mut ws, "private-x").await;
    ws.send_json(json!({"event":"pusher:ping","data":{}})).await;
    assert_eq!(next(&mut ws).await["event"], "pusher:pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_events_reach_the_other_subscribers_of_private_channels_only() {
    let relay = Relay::start(APPS);
    let (mut a, a_id) = connect(&relay, "key1").await;
    let (mut b, b_id) = connect(&relay, "key1").await;
    for (ws, id) in [(&mut a, &a_id), (&mut b, &b_id)] {
        subscribe(ws, "public", None, None).await;
        subscribed(ws, "public").await;
        subscribe(
            ws,
            "private-chat",
            Some(auth(id, "private-chat", None)),
            None,
        )
        .await;
        subscribed(ws, "private-chat").await;
    }
    a.send_json(json!({"event":"client-typing","channel":"public","data":{"x":1}}))
        .await;
    let v = next(&mut a).await;
    assert_eq!(
        (v["event"].as_str(), v["data"]["code"].as_u64()),
        (Some("pusher:error"), Some(4301)),
        "{v}"
    );

    a.send_json(json!({"event":"client-typing","channel":"private-chat","data":{"x":2}}))
        .await;
    let v = next(&mut b).await;
    assert_eq!(
        (v["event"].as_str(), v["channel"].as_str()),
        (Some("client-typing"), Some("private-chat")),
        "{v}"
    );
    assert_eq!(v["data"], json!({"x":2}));
    assert!(
        a.recv_json_within(Duration::from_millis(300))
            .await
            .is_none(),
        "not echoed to the sender"
    );

    // An app without client events refuses them.
    let (mut c, c_id) = connect(&relay, "key2").await;
    let sig = format!(
        "key2:{}",
        sign("secret-two-1234", format!("{c_id}:private-chat").as_bytes())
    );
    subscribe(&mut c, "private-chat", Some(sig), None).await;
    subscribed(&mut c, "private-chat").await;
    c.send_json(json!({"event":"client-typing","channel":"private-chat","data":{}}))
        .await;
    assert_eq!(next(&mut c).await["data"]["code"], 4301);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_channels_list_members_and_announce_joins_and_leaves() {
    let relay = Relay::start(APPS);
    let ch = "presence-room";
    let (mut a, a_id) = connect(&relay, "key1").await;
    let a_data = r#"{"user_id":"alice","user_info":{"name":"Alice"}}"#;
    subscribe(
        &mut a,
        ch,
        Some(auth(&a_id, ch, Some(a_data))),
        Some(a_data),
    )
    .await;
    let v = subscribed(&mut a, ch).await;
    let d: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
    assert_eq!(d["presence"]["count"], 1, "{d}");
    assert_eq!(d["presence"]["hash"]["alice"], json!({"name":"Alice"}));

    let (mut b, b_id) = connect(&relay, "key1").await;
    let b_data = r#"{"user_id":7}"#;
    subscribe(
        &mut b,
        ch,
        Some(auth(&b_id, ch, Some(b_data))),
        Some(b_data),
    )
    .await;
    let v = subscribed(&mut b, ch).await;
    let d: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
    assert_eq!(d["presence"]["count"], 2, "{d}");

    let v = next(&mut a).await;
    assert_eq!(v["event"], "pusher_internal:member_added", "{v}");
    let m: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
    assert_eq!(m["user_id"], "7");
    assert!(
        b.recv_json_within(Duration::from_millis(200))
            .await
            .is_none(),
        "a member is not told of its own join"
    );

    let (status, text) = api(
        &relay,
        "GET",
        "/apps/app1/channels/presence-room",
        &[("info", "user_count,subscription_count")],
        None,
        now(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let info: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        info,
        json!({"occupied":true,"subscription_count":2,"user_count":2})
    );
    let (status, text) = api(
        &relay,
        "GET",
        "/apps/app1/channels/presence-room/users",
        &[],
        None,
        now(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let users: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(users, json!({"users":[{"id":"7"},{"id":"alice"}]}));
    let (status, text) = api(
        &relay,
        "GET",
        "/apps/app1/channels",
        &[("filter_by_prefix", "presence-"), ("info", "user_count")],
        None,
        now(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let list: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list, json!({"channels":{"presence-room":{"user_count":2}}}));

    b.close_cleanly().await;
    let v = next(&mut a).await;
    assert_eq!(v["event"], "pusher_internal:member_removed", "{v}");
    let m: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
    assert_eq!(m["user_id"], "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_refuses_bad_signatures_and_stale_timestamps() {
    let relay = Relay::start(APPS);
    let body = json!({"name":"e","data":"x","channels":["c"]});
    let (status, text) = api(
        &relay,
        "POST",
        "/apps/app1/events",
        &[],
        Some(&body),
        now() - 3600,
    )
    .await;
    assert_eq!(status, 401);
    assert!(text.starts_with("Timestamp expired"), "{text}");

    let url = relay.http(&format!(
        "/apps/app1/events?auth_key=key1&auth_timestamp={}&auth_version=1.0&body_md5={}&auth_signature=00",
        now(),
        md5_hex(body.to_string().as_bytes())
    ));
    let resp = relay
        .client()
        .post(url)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.text().await.unwrap().starts_with("Invalid signature"));

    let (status, _) = api(&relay, "POST", "/apps/nope/events", &[], Some(&body), now()).await;
    assert_eq!(status, 404, "unknown app");
    let big = json!({"name":"e","data":"x".repeat(11 * 1024),"channels":["c"]});
    let (status, _) = api(&relay, "POST", "/apps/app1/events", &[], Some(&big), now()).await;
    assert_eq!(status, 413, "over max_event_bytes");
    let many = json!({"batch": (0..11).map(|i| json!({"name":"e","data":"x","channel":format!("c{i}")})).collect::<Vec<_>>()});
    let (status, _) = api(
        &relay,
        "POST",
        "/apps/app1/batch_events",
        &[],
        Some(&many),
        now(),
    )
    .await;
    assert_eq!(status, 400, "over max_batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_apps_and_protocols_are_refused_with_pushers_codes() {
    let relay = Relay::start(APPS);
    let mut ws = Ws::connect(&pusher_url(&relay, "nope")).await;
    let v = next(&mut ws).await;
    assert_eq!(
        (v["event"].as_str(), v["data"]["code"].as_u64()),
        (Some("pusher:error"), Some(4001))
    );
    assert_eq!(ws.expect_close().await, 4001);
    let url = format!("ws://{}/app/key1?protocol=3", relay.addr());
    let mut ws = Ws::connect(&url).await;
    assert_eq!(next(&mut ws).await["data"]["code"], 4007);
    assert_eq!(ws.expect_close().await, 4007);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_in_users_get_their_channel_and_can_be_terminated() {
    let relay = Relay::start(APPS);
    let (mut ws, socket_id) = connect(&relay, "key1").await;
    let user_data = r#"{"id":"u1","name":"U"}"#;
    let sig = sign(
        SECRET1,
        format!("{socket_id}::user::{user_data}").as_bytes(),
    );
    ws.send_json(json!({"event":"pusher:signin","data":{"auth":format!("key1:{sig}"),"user_data":user_data}}))
        .await;
    let v = next(&mut ws).await;
    assert_eq!(v["event"], "pusher:signin_success", "{v}");
    subscribe(&mut ws, "#server-to-user-u2", None, None).await;
    assert_eq!(
        next(&mut ws).await["data"]["code"],
        4009,
        "another user's channel"
    );
    next(&mut ws).await;
    subscribe(&mut ws, "#server-to-user-u1", None, None).await;
    subscribed(&mut ws, "#server-to-user-u1").await;
    trigger(
        &relay,
        json!({"name":"hi","data":"\"x\"","channels":["#server-to-user-u1"]}),
    )
    .await;
    assert_eq!(next(&mut ws).await["event"], "hi");

    let (status, text) = api(
        &relay,
        "POST",
        "/apps/app1/users/u1/terminate_connections",
        &[],
        Some(&json!({})),
        now(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v = next(&mut ws).await;
    assert_eq!(v["data"]["code"], 4100, "{v}");
    assert_eq!(ws.expect_close().await, 4100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_clients_without_credentials_cannot_reach_an_apps_private_channels() {
    let relay = Relay::start(APPS);
    let mut r = Ws::connect(&relay.ws_url()).await;
    for ch in [
        "pusher/app1/private-x",
        "pusher/app1/presence-x",
        "pusher/app1/~user-u1",
    ] {
        r.send_json(json!({"type":"subscribe","channel":ch})).await;
        let v = r.recv_json().await;
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some("forbidden")),
            "{ch}: {v}"
        );
    }
    r.subscribe("pusher/app1/public").await;
    let (status, body) = relay
        .post(
            "/api/publish",
            &json!({"channel":"pusher/app1/private-x","data":1}),
        )
        .await;
    assert_eq!(status, 403, "{body}");

    // With an API key, the relay API reaches them (a backend's own trusted path).
    let mut keyed = Relay::start(&[APPS, &["--api-key", "k-123456789"]].concat());
    keyed.set_api_key("k-123456789");
    keyed.publish("pusher/app1/private-x", json!(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_clients_on_two_redis_nodes_share_channels_and_presence() {
    let kind = cluster::Kind::Redis;
    if !kind.available() {
        return;
    }
    let server = cluster::Server::start(kind);
    let a = cluster::node(&server, "pa", APPS).await;
    let b = cluster::node(&server, "pb", APPS).await;
    let (mut on_a, a_id) = connect(&a, "key1").await;
    let (mut on_b, b_id) = connect(&b, "key1").await;
    for ws in [&mut on_a, &mut on_b] {
        subscribe(ws, "news", None, None).await;
        subscribed(ws, "news").await;
    }
    let ch = "presence-room";
    let a_data = r#"{"user_id":"alice"}"#;
    subscribe(
        &mut on_a,
        ch,
        Some(auth(&a_id, ch, Some(a_data))),
        Some(a_data),
    )
    .await;
    subscribed(&mut on_a, ch).await;
    let b_data = r#"{"user_id":"bob"}"#;
    subscribe(
        &mut on_b,
        ch,
        Some(auth(&b_id, ch, Some(b_data))),
        Some(b_data),
    )
    .await;
    let bob_sub = subscribed(&mut on_b, ch).await;
    // Bob learns of alice from the member list if node B's presence mirror had her yet, else
    // from a member_added once it does (the mirror is read from the backplane).
    let mut bob_knows_alice = bob_sub["data"].as_str().unwrap().contains("alice");
    let v = next(&mut on_a).await;
    assert_eq!(
        v["event"], "pusher_internal:member_added",
        "bob joined on the other node: {v}"
    );

    trigger(&a, json!({"name":"e","data":"1","channels":["news"]})).await;
    trigger(&b, json!({"name":"e","data":"2","channels":["news"]})).await;
    for (ws, node) in [(&mut on_a, "a"), (&mut on_b, "b")] {
        let mut got = Vec::new();
        while got.len() < 2 {
            let v = next(ws).await;
            if v["event"] == "pusher_internal:member_added" && node == "b" {
                assert!(v["data"].as_str().unwrap().contains("alice"), "{v}");
                bob_knows_alice = true;
                continue;
            }
            assert_eq!(v["event"], "e", "{v}");
            got.push(v["data"].clone());
        }
        assert_eq!(got, [json!("1"), json!("2")], "one order on node {node}");
    }
    if !bob_knows_alice {
        // The presence mirror is read from the backplane every presence-timeout / 4.
        let v = on_b.recv_json_within(Duration::from_secs(15)).await;
        let v = v.expect("bob was told of alice");
        assert_eq!(v["event"], "pusher_internal:member_added", "{v}");
    }
}

// --- webhooks in Pusher's format -----------------------------------------------------------

/// One webhook POST a receiver got.
#[derive(Clone, Debug)]
struct Hooked {
    key: Option<String>,
    signature: Option<String>,
    body: Vec<u8>,
    status: u16,
}

/// A local webhook receiver answering 500 to its first `fail` POSTs, 200 after.
struct HookReceiver {
    url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<Hooked>>>,
}

impl HookReceiver {
    async fn start(fail: usize) -> HookReceiver {
        let got: std::sync::Arc<std::sync::Mutex<Vec<Hooked>>> = Default::default();
        let g = got.clone();
        let base = common::serve_http(move |headers, body| {
            let header = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
            let mut got = g.lock().unwrap();
            let status = if got.len() < fail { 500 } else { 200 };
            got.push(Hooked {
                key: header("x-pusher-key"),
                signature: header("x-pusher-signature"),
                body: body.to_vec(),
                status,
            });
            (status, bytes::Bytes::new())
        })
        .await;
        HookReceiver {
            url: format!("{base}/pusher/webhooks"),
            got,
        }
    }

    fn posts(&self) -> Vec<Hooked> {
        self.got.lock().unwrap().clone()
    }

    /// The events of the accepted POSTs, in order.
    fn events(&self) -> Vec<Value> {
        self.posts()
            .iter()
            .filter(|p| p.status == 200)
            .flat_map(|p| {
                let v: Value = serde_json::from_slice(&p.body).unwrap();
                assert!(v["time_ms"].as_u64().unwrap() > 0, "{v}");
                v["events"].as_array().unwrap().clone()
            })
            .collect()
    }

    /// Waits until the accepted POSTs hold `n` events (at most 10 s).
    async fn wait_events(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let events = self.events();
            if events.len() >= n || tokio::time::Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Checks a POST as the Pusher server libraries do: `X-Pusher-Key` is the app's key and
/// `X-Pusher-Signature` the hex HMAC-SHA256 of the raw body with the app's secret.
fn assert_pusher_signed(p: &Hooked, key: &str, secret: &str) {
    assert_eq!(p.key.as_deref(), Some(key));
    let sig = p.signature.as_deref().expect("X-Pusher-Signature");
    let raw: Vec<u8> = (0..sig.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&sig[i..i + 2], 16).unwrap())
        .collect();
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&k, &p.body, &raw).expect("valid X-Pusher-Signature");
}

/// `name channel [user]` of each event.
fn summary(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let mut s = format!("{} {}", e["name"].as_str().unwrap(), e["channel"]);
            if let Some(u) = e["user_id"].as_str() {
                s = format!("{s} {u}");
            }
            s
        })
        .collect()
}

fn with_apps(extra: &[&str]) -> Vec<String> {
    APPS.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[tokio::test(start_paused = true)]
async fn pusher_webhooks_are_signed_with_the_apps_secret_and_hold_only_its_channels() {
    let rx1 = HookReceiver::start(0).await;
    let rx2 = HookReceiver::start(0).await;
    let args = with_apps(&[
        "--pusher-webhook",
        &format!("app1:{}", rx1.url),
        "--pusher-webhook",
        &format!("app2:{}", rx2.url),
        "--webhook-batch-delay",
        "10ms",
    ]);
    common::paused(&strs(&args), |relay: Relay| async move {
        let (mut a, a_id) = connect(&relay, "key1").await;
        subscribe(&mut a, "news", None, None).await;
        subscribed(&mut a, "news").await;
        let ch = "presence-room";
        let data = r#"{"user_id":"alice"}"#;
        subscribe(&mut a, ch, Some(auth(&a_id, ch, Some(data))), Some(data)).await;
        subscribed(&mut a, ch).await;
        // Another app's channel of the same name.
        let (mut c, _) = connect(&relay, "key2").await;
        subscribe(&mut c, "news", None, None).await;
        subscribed(&mut c, "news").await;
        c.close_cleanly().await;
        a.close_cleanly().await;

        let events = rx1.wait_events(6).await;
        let mut got = summary(&events);
        got.sort();
        assert_eq!(
            got,
            [
                "channel_occupied \"news\"",
                "channel_occupied \"presence-room\"",
                "channel_vacated \"news\"",
                "channel_vacated \"presence-room\"",
                "member_added \"presence-room\" alice",
                "member_removed \"presence-room\" alice",
            ],
            "{events:?}"
        );
        for p in rx1.posts() {
            assert_pusher_signed(&p, "key1", SECRET1);
        }
        let events = rx2.wait_events(2).await;
        assert_eq!(
            summary(&events),
            ["channel_occupied \"news\"", "channel_vacated \"news\""]
        );
        for p in rx2.posts() {
            assert_pusher_signed(&p, "key2", "secret-two-1234");
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET1.as_bytes());
            let sig: Vec<u8> = (0..64)
                .step_by(2)
                .map(|i| {
                    u8::from_str_radix(&p.signature.as_deref().unwrap()[i..i + 2], 16).unwrap()
                })
                .collect();
            assert!(
                ring::hmac::verify(&k, &p.body, &sig).is_err(),
                "another app's secret does not verify it"
            );
        }
        // Nothing of the other app comes later, however long one waits.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(rx1.events().len(), 6);
        assert_eq!(rx2.events().len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pusher_hook_gets_the_kinds_and_channels_it_names_and_client_events_only_when_named() {
    let rx = HookReceiver::start(0).await;
    let all = HookReceiver::start(0).await;
    let relay_format = HookReceiver::start(0).await;
    let relay = Relay::start(&strs(&with_apps(&[
        "--pusher-webhook",
        &format!("app1:client_event+member_added;presence-*@{}", rx.url),
        "--pusher-webhook",
        &format!("app1:{}", all.url),
        "--webhook-url",
        &format!("client_event@{}", relay_format.url),
        "--webhook-batch-delay",
        "10ms",
    ])));
    let (mut a, a_id) = connect(&relay, "key1").await;
    let (mut b, b_id) = connect(&relay, "key1").await;
    let ch = "presence-room";
    for (ws, id, user) in [(&mut a, &a_id, "alice"), (&mut b, &b_id, "bob")] {
        let data = format!(r#"{{"user_id":"{user}"}}"#);
        subscribe(ws, ch, Some(auth(id, ch, Some(&data))), Some(&data)).await;
        subscribed(ws, ch).await;
        subscribe(
            ws,
            "private-chat",
            Some(auth(id, "private-chat", None)),
            None,
        )
        .await;
        subscribed(ws, "private-chat").await;
    }
    a.send_json(json!({"event":"client-typing","channel":"private-chat","data":{"x":1}}))
        .await;
    a.send_json(json!({"event":"client-typing","channel":ch,"data":{"x":2}}))
        .await;
    // Both reached b (so both were published).
    for _ in 0..2 {
        loop {
            let v = next(&mut b).await;
            if v["event"] == "client-typing" {
                break;
            }
        }
    }

    let events = rx.wait_events(3).await;
    assert_eq!(
        summary(&events),
        [
            "member_added \"presence-room\" alice",
            "member_added \"presence-room\" bob",
            "client_event \"presence-room\" alice",
        ],
        "{events:?}"
    );
    let e = &events[2];
    assert_eq!(e["event"], "client-typing");
    assert_eq!(e["socket_id"], a_id.as_str());
    let data: Value = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
    assert_eq!(data, json!({"x":2}));
    // A hook naming no kinds gets channel and member events, no client events.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.events().len(), 3);
    let names = summary(&all.events());
    assert!(
        names.iter().all(|n| !n.starts_with("client_event")),
        "{names:?}"
    );
    assert!(names.contains(&"channel_occupied \"private-chat\"".to_owned()));
    // relay's own format names the relay channel and carries the data as it was sent.
    let events = relay_format.wait_events(2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["channel"], "pusher/app1/private-chat");
    assert_eq!(events[0]["data"], json!({"x":1}));
    assert_eq!(events[0]["socket_id"], a_id.as_str());
    assert_eq!(events[1]["user_id"], "alice");
}

#[tokio::test(start_paused = true)]
async fn a_failing_pusher_receiver_gets_the_same_signed_body_on_retry() {
    let rx = HookReceiver::start(2).await;
    let args = with_apps(&[
        "--pusher-webhook",
        &format!("app1:channel_occupied@{}", rx.url),
        "--webhook-retry-cap",
        "100ms",
    ]);
    common::paused(&strs(&args), |relay: Relay| async move {
        let (mut a, _) = connect(&relay, "key1").await;
        subscribe(&mut a, "news", None, None).await;
        subscribed(&mut a, "news").await;
        let events = rx.wait_events(1).await;
        assert_eq!(summary(&events), ["channel_occupied \"news\""]);
        let posts = rx.posts();
        assert_eq!(
            posts.iter().map(|p| p.status).collect::<Vec<_>>(),
            [500, 500, 200]
        );
        assert!(posts.iter().all(|p| p.body == posts[0].body), "{posts:?}");
        for p in &posts {
            assert_pusher_signed(p, "key1", SECRET1);
        }
    })
    .await;
}

#[test]
fn a_pusher_webhook_of_no_app_stops_the_start() {
    let out = common::run_bin(
        &[
            "check-config",
            "--pusher-app",
            "app1:key1:secret-one-1234",
            "--pusher-webhook",
            "nope:http://127.0.0.1:9/h",
        ],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pusher_webhook") && err.contains("nope"),
        "{err}"
    );
}
