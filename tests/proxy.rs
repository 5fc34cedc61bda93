//! The backend proxy (connect / subscribe / publish) against the real binary, with a local HTTP
//! backend: its refusals reach the client with the backend's reason, a slow backend meets the
//! timeout and the failure policy, a connect result's user, info and channels are applied, a
//! publish goes out with the data the backend gave.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Relay, Ws};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What the backend answers on one path: after `delay`, `status` and `body`.
#[derive(Clone)]
struct Answer {
    delay: Duration,
    status: u16,
    body: Value,
}

fn answer(body: Value) -> Answer {
    Answer {
        delay: Duration::ZERO,
        status: 200,
        body,
    }
}

/// One request the backend got.
#[derive(Clone, Debug)]
struct Got {
    path: String,
    headers: hyper::HeaderMap,
    body: Value,
}

/// A local backend answering `/connect`, `/subscribe`, `/publish` as told (200 `{}` for a path
/// it was not told about), recording every request.
struct Backend {
    base: String,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Backend {
    async fn start(answers: Vec<(&'static str, Answer)>) -> Backend {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let answers = Arc::new(answers);
        let g = got.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (answers, got) = (answers.clone(), g.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let (answers, got) = (answers.clone(), got.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            let headers = req.headers().clone();
                            let body: hyper::body::Incoming = req.into_body();
                            let body = body.collect().await?.to_bytes();
                            got.lock().unwrap().push(Got {
                                path: path.clone(),
                                headers,
                                body: serde_json::from_slice(&body).unwrap(),
                            });
                            let a = answers
                                .iter()
                                .find(|(p, _)| *p == path)
                                .map_or_else(|| answer(json!({})), |(_, a)| a.clone());
                            tokio::time::sleep(a.delay).await;
                            Ok::<_, hyper::Error>(
                                hyper::Response::builder()
                                    .status(a.status)
                                    .body(http_body_util::Full::new(bytes::Bytes::from(
                                        a.body.to_string(),
                                    )))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Backend { base, got }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn requests(&self, path: &str) -> Vec<Got> {
        let got = self.got.lock().unwrap();
        got.iter().filter(|g| g.path == path).cloned().collect()
    }
}

/// The next frame that is not a `presence` event.
async fn recv_reply(ws: &mut Ws) -> Value {
    loop {
        let v = ws.recv_json().await;
        if v["type"] != "presence" {
            return v;
        }
    }
}

#[tokio::test]
async fn a_refused_connect_gets_forbidden_with_the_backends_reason_and_a_close() {
    let backend = Backend::start(vec![(
        "/connect",
        answer(json!({"error": {"message": "no session cookie"}})),
    )])
    .await;
    let relay = Relay::start(&["--proxy-connect-url", &backend.url("/connect")]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    let v = ws.recv_json().await;
    assert_eq!(v["type"], "error");
    assert_eq!(v["code"], "forbidden");
    assert_eq!(v["message"], "no session cookie");
    assert_eq!(ws.expect_close().await, 4403);

    // SSE: the same refusal is the HTTP answer.
    let (status, body) = relay.get("/sse?channel=a").await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(body["error"]["message"], "no session cookie");
}

#[tokio::test]
async fn a_backend_disconnect_closes_with_its_code() {
    let backend = Backend::start(vec![(
        "/connect",
        answer(json!({"disconnect": {"code": 4500, "reason": "banned"}})),
    )])
    .await;
    let relay = Relay::start(&["--proxy-connect-url", &backend.url("/connect")]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    let v = ws.recv_json().await;
    assert_eq!(
        (v["code"].as_str(), v["message"].as_str()),
        (Some("forbidden"), Some("banned"))
    );
    assert_eq!(ws.expect_close().await, 4500);
}

#[tokio::test]
async fn connect_result_user_info_and_channels_are_applied() {
    let backend = Backend::start(vec![(
        "/connect",
        answer(json!({"result": {
            "user": "alice",
            "info": {"name": "Alice"},
            "channels": ["news:alice"]
        }})),
    )])
    .await;
    let relay = Relay::start(&[
        "--proxy-connect-url",
        &backend.url("/connect"),
        "--proxy-header",
        "x-session",
        "--presence-channels",
        "room:*",
    ]);
    let mut req = relay.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("x-session", "s-123".parse().unwrap());
    req.headers_mut()
        .insert("x-other", "not forwarded".parse().unwrap());
    let (inner, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut ws = Ws { inner };

    // The server-side subscription, never asked for by the client.
    let v = ws.recv_json().await;
    assert_eq!(v["type"], "subscribed", "{v}");
    assert_eq!(v["channel"], "news:alice");
    relay.publish("news:alice", json!({"headline": 1})).await;
    let data = ws.expect_message("news:alice", 1).await;
    assert_eq!(data, json!({"headline": 1}));

    // The backend's user and info are the connection's presence identity.
    ws.subscribe("room:1").await;
    ws.send_json(json!({"type": "presence", "channel": "room:1", "id": 9}))
        .await;
    let state = recv_reply(&mut ws).await;
    assert_eq!(state["type"], "presence_state", "{state}");
    let members = state["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["user"], "alice");
    assert_eq!(members[0]["info"], json!({"name": "Alice"}));

    // What the backend was told: the client, transport, address and the chosen header only.
    let reqs = backend.requests("/connect");
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.body["transport"], "websocket");
    assert_eq!(r.body["protocol"], "json");
    assert_eq!(r.body["remote_addr"], "127.0.0.1");
    assert!(r.body["client"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!(r.headers.get("x-session").unwrap(), "s-123");
    assert!(r.headers.get("x-other").is_none());
}

#[tokio::test]
async fn a_refused_subscribe_gets_forbidden_and_unmatched_channels_are_not_asked() {
    let backend = Backend::start(vec![(
        "/subscribe",
        answer(json!({"error": {"message": "not your room"}})),
    )])
    .await;
    let relay = Relay::start(&[
        "--proxy-subscribe-url",
        &backend.url("/subscribe"),
        "--proxy-subscribe-channels",
        "secret:*",
    ]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.send_json(json!({"type": "subscribe", "channel": "secret:1", "id": 1}))
        .await;
    let v = ws.recv_json().await;
    assert_eq!(v["id"], 1);
    assert_eq!(v["code"], "forbidden");
    assert_eq!(v["message"], "not your room");
    // Not subscribed: a publish does not reach it; a channel outside the patterns is not asked.
    ws.subscribe("open:1").await;
    relay.publish("secret:1", json!(1)).await;
    relay.publish("open:1", json!(2)).await;
    let m = ws.recv_json().await;
    assert_eq!(
        (m["channel"].as_str(), m["data"].as_i64()),
        (Some("open:1"), Some(2))
    );
    let asked = backend.requests("/subscribe");
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].body["channel"], "secret:1");

    // SSE asks for the channels it names too.
    let (status, body) = relay.get("/sse?channel=secret:2").await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["message"], "not your room");
}

#[tokio::test]
async fn a_slow_backend_meets_the_timeout_and_the_failure_policy() {
    let slow = Answer {
        delay: Duration::from_secs(3),
        ..answer(json!({"error": {"message": "too late to matter"}}))
    };
    let backend = Backend::start(vec![("/subscribe", slow)]).await;
    for (policy, want) in [("deny", "unavailable"), ("allow", "subscribed")] {
        let relay = Relay::start(&[
            "--proxy-subscribe-url",
            &backend.url("/subscribe"),
            "--proxy-timeout",
            "200ms",
            "--proxy-failure",
            policy,
        ]);
        let mut ws = Ws::connect(&relay.ws_url()).await;
        let start = std::time::Instant::now();
        ws.send_json(json!({"type": "subscribe", "channel": "c", "id": 1}))
            .await;
        let v = ws.recv_json().await;
        let got = if v["type"] == "error" {
            &v["code"]
        } else {
            &v["type"]
        };
        assert_eq!(got, want, "policy {policy}: {v}");
        // Answered at the timeout, not after the backend's 3 s.
        assert!(start.elapsed() < Duration::from_secs(2), "policy {policy}");
        let text = relay.scrape().await;
        assert!(
            text.contains("relay_proxy_requests_total{kind=\"subscribe\",result=\"timeout\"} 1"),
            "{policy}: no timeout counted"
        );
    }
}

#[tokio::test]
async fn requests_past_the_in_flight_limit_are_overloaded() {
    let slow = Answer {
        delay: Duration::from_millis(1500),
        ..answer(json!({}))
    };
    let backend = Backend::start(vec![("/subscribe", slow)]).await;
    let relay = Relay::start(&[
        "--proxy-subscribe-url",
        &backend.url("/subscribe"),
        "--proxy-max-in-flight",
        "1",
        "--proxy-timeout",
        "4s",
    ]);
    let mut a = Ws::connect(&relay.ws_url()).await;
    let mut b = Ws::connect(&relay.ws_url()).await;
    a.send_json(json!({"type": "subscribe", "channel": "c1", "id": 1}))
        .await;
    // The first request holds the one slot until the backend answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while backend.requests("/subscribe").is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.send_json(json!({"type": "subscribe", "channel": "c2", "id": 2}))
        .await;
    let v = b.recv_json().await;
    assert_eq!(
        (v["id"].as_i64(), v["code"].as_str()),
        (Some(2), Some("overloaded"))
    );
    let v = a.recv_json().await;
    assert_eq!(v["type"], "subscribed");
}

#[tokio::test]
async fn subscribers_get_the_data_the_publish_proxy_gave() {
    let backend = Backend::start(vec![(
        "/publish",
        answer(json!({"result": {"data": {"text": "hello (moderated)"}}})),
    )])
    .await;
    let relay = Relay::start(&["--proxy-publish-url", &backend.url("/publish")]);
    let mut sub = Ws::connect(&relay.ws_url()).await;
    sub.subscribe("chat").await;
    let mut publisher = Ws::connect(&relay.ws_url()).await;
    publisher
        .send_json(
            json!({"type": "publish", "channel": "chat", "data": {"text": "hello"}, "id": 1}),
        )
        .await;
    let v = publisher.recv_json().await;
    assert_eq!(v["type"], "published", "{v}");
    let data = sub.expect_message("chat", 1).await;
    assert_eq!(data, json!({"text": "hello (moderated)"}));
    let asked = backend.requests("/publish");
    assert_eq!(asked[0].body["channel"], "chat");
    assert_eq!(asked[0].body["data"], json!({"text": "hello"}));
    // The HTTP API is the backend's own path: never proxied.
    relay.publish("chat", json!("direct")).await;
    assert_eq!(sub.expect_message("chat", 2).await, "direct");
    assert_eq!(backend.requests("/publish").len(), 1);
}

#[tokio::test]
async fn a_refused_publish_is_forbidden_and_publishes_nothing() {
    let backend = Backend::start(vec![(
        "/publish",
        answer(json!({"error": {"message": "spam"}})),
    )])
    .await;
    let relay = Relay::start(&["--proxy-publish-url", &backend.url("/publish")]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.send_json(json!({"type": "publish", "channel": "chat", "data": 1, "id": 1}))
        .await;
    let v = ws.recv_json().await;
    assert_eq!(
        (v["code"].as_str(), v["message"].as_str()),
        (Some("forbidden"), Some("spam"))
    );
    let (_, h) = relay.get("/api/history/chat").await;
    assert_eq!(h["messages"].as_array().map_or(0, Vec::len), 0, "{h}");
    // Still open.
    ws.send_json(json!({"type": "heartbeat", "id": 2})).await;
    assert_eq!(ws.recv_json().await["type"], "heartbeat");
}

#[tokio::test]
async fn a_publish_answered_with_disconnect_closes_with_the_backends_code() {
    let backend = Backend::start(vec![(
        "/publish",
        answer(json!({"disconnect": {"code": 4501, "reason": "flooding"}})),
    )])
    .await;
    let relay = Relay::start(&["--proxy-publish-url", &backend.url("/publish")]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.send_json(json!({"type": "publish", "channel": "chat", "data": 1, "id": 1}))
        .await;
    let v = ws.recv_json().await;
    assert_eq!(
        (v["id"].as_i64(), v["code"].as_str()),
        (Some(1), Some("forbidden"))
    );
    assert_eq!(v["message"], "flooding");
    assert_eq!(ws.expect_close().await, 4501);
}
