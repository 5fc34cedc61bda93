//! JWT connection auth and channel permissions (issue 7): each grant allows exactly what it
//! names, on WebSocket, SSE and the HTTP API; bad tokens are refused; refresh works and a missed
//! one disconnects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{assert_http_error, read_resp, Relay, Sse, Ws};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789abcdef";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs(claims: Value) -> String {
    hs_with(claims, SECRET.as_bytes())
}

fn hs_with(claims: Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A token for `sub` valid `secs` more seconds, with `channels` grants.
fn token(sub: &str, secs: u64, channels: Value) -> String {
    hs(json!({"sub": sub, "exp": now() + secs, "channels": channels}))
}

/// Connect to `/ws?token=…`.
async fn ws_with(relay: &Relay, token: &str) -> Ws {
    Ws::connect(&format!("{}?token={token}", relay.ws_url())).await
}

/// The HTTP status of a WebSocket upgrade that the server refuses.
async fn ws_refused(url: &str) -> u16 {
    match tokio::time::timeout(common::RECV_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake within timeout")
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("the upgrade of {url} was accepted"),
    }
}

async fn send_recv(ws: &mut Ws, v: Value) -> Value {
    ws.send_json(v).await;
    ws.recv_json().await
}

fn assert_forbidden(v: &Value) {
    assert_eq!(v["type"], "error", "expected forbidden, got {v}");
    assert_eq!(v["code"], "forbidden", "expected forbidden, got {v}");
}

async fn get_bearer(relay: &Relay, path: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut rb = relay.client().get(relay.http(path));
    if let Some(b) = bearer {
        rb = rb.header("authorization", format!("Bearer {b}"));
    }
    read_resp(rb.send().await.unwrap()).await
}

async fn post_bearer(
    relay: &Relay,
    path: &str,
    body: &Value,
    bearer: Option<&str>,
) -> (u16, Value) {
    let mut rb = relay.client().post(relay.http(path)).json(body);
    if let Some(b) = bearer {
        rb = rb.header("authorization", format!("Bearer {b}"));
    }
    read_resp(rb.send().await.unwrap()).await
}

/// Each grant allows exactly what it names: subscribe, publish, presence and history, each
/// tried with and without the grant over WebSocket, SSE and the HTTP API.
#[tokio::test]
async fn each_grant_allows_exactly_what_it_names() {
    let relay = Relay::start(&["--jwt-secret", SECRET, "--presence-channels", "p:*"]);
    let grants =
        json!({"subscribe": ["s:*"], "publish": ["w:*"], "presence": ["p:*"], "history": ["h:*"]});
    let t = token("alice", 300, grants);

    // WebSocket.
    let mut ws = ws_with(&relay, &t).await;
    ws.subscribe("s:1").await;
    for ch in ["w:1", "p:1", "h:1", "other"] {
        assert_forbidden(
            &send_recv(&mut ws, json!({"type":"subscribe","channel":ch,"id":1})).await,
        );
    }
    let v = send_recv(&mut ws, json!({"type":"publish","channel":"w:1","data":1})).await;
    assert_eq!(v["type"], "published", "{v}");
    for ch in ["s:1", "p:1", "h:1"] {
        assert_forbidden(
            &send_recv(&mut ws, json!({"type":"publish","channel":ch,"data":1})).await,
        );
    }
    let v = send_recv(&mut ws, json!({"type":"presence","channel":"p:1"})).await;
    assert_eq!(v["type"], "presence_state", "{v}");
    for ch in ["s:1", "w:1", "h:1"] {
        assert_forbidden(&send_recv(&mut ws, json!({"type":"presence","channel":ch})).await);
    }

    // SSE (subscribe).
    let sse = Sse::request(&relay.http(&format!("/sse?channel=s:2&token={t}")), &[]).await;
    assert_eq!(sse.status().as_u16(), 200);
    drop(sse);
    for ch in ["w:2", "p:2", "h:2"] {
        let r = Sse::request(&relay.http(&format!("/sse?channel={ch}&token={t}")), &[]).await;
        assert_http_error(&read_resp(r).await, 403, "forbidden");
    }
    // Bearer header works for SSE too, and a stream with one forbidden channel is refused.
    let auth = format!("Bearer {t}");
    let r = Sse::request(&relay.http("/sse?channel=s:3"), &[("authorization", &auth)]).await;
    assert_eq!(r.status().as_u16(), 200);
    drop(r);
    let r = Sse::request(
        &relay.http("/sse?channel=s:3&channel=w:3"),
        &[("authorization", &auth)],
    )
    .await;
    assert_http_error(&read_resp(r).await, 403, "forbidden");

    // HTTP API.
    let publish = |ch: &str| json!({"channel": ch, "data": {"x": 1}});
    assert_eq!(
        post_bearer(&relay, "/api/publish", &publish("w:9"), Some(&t))
            .await
            .0,
        200
    );
    for ch in ["s:9", "p:9", "h:9"] {
        let r = post_bearer(&relay, "/api/publish", &publish(ch), Some(&t)).await;
        assert_http_error(&r, 403, "forbidden");
    }
    let r = post_bearer(
        &relay,
        "/api/broadcast",
        &json!({"channels":["w:1","s:1"],"data":1}),
        Some(&t),
    )
    .await;
    assert_http_error(&r, 403, "forbidden");
    assert_eq!(
        get_bearer(&relay, "/api/history/h:1", Some(&t)).await.0,
        200
    );
    for ch in ["s:1", "w:1", "p:1"] {
        assert_http_error(
            &get_bearer(&relay, &format!("/api/history/{ch}"), Some(&t)).await,
            403,
            "forbidden",
        );
    }
    assert_eq!(
        get_bearer(&relay, "/api/presence/p:1", Some(&t)).await.0,
        200
    );
    assert_eq!(
        get_bearer(&relay, "/api/presence/p:1/stats", Some(&t))
            .await
            .0,
        200
    );
    for ch in ["s:1", "w:1", "h:1"] {
        assert_http_error(
            &get_bearer(&relay, &format!("/api/presence/{ch}"), Some(&t)).await,
            403,
            "forbidden",
        );
    }
    assert_http_error(
        &get_bearer(&relay, "/api/channels", Some(&t)).await,
        403,
        "forbidden",
    );

    // Without a token nothing is allowed (no --allow-anonymous).
    assert_http_error(
        &post_bearer(&relay, "/api/publish", &publish("w:1"), None).await,
        403,
        "forbidden",
    );
    assert_http_error(
        &get_bearer(&relay, "/api/history/h:1", None).await,
        403,
        "forbidden",
    );
    let r = Sse::request(&relay.http("/sse?channel=s:1"), &[]).await;
    assert_http_error(&read_resp(r).await, 403, "forbidden");
    let mut anon = Ws::connect(&relay.ws_url()).await;
    assert_forbidden(&send_recv(&mut anon, json!({"type":"subscribe","channel":"s:1"})).await);
    assert_forbidden(
        &send_recv(
            &mut anon,
            json!({"type":"publish","channel":"w:1","data":1}),
        )
        .await,
    );

    // Refusals are counted by cause.
    let (_, metrics) = get_bearer(&relay, "/metrics", None).await;
    let text = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains("relay_refused_total{cause=\"forbidden\"}"),
        "{text}"
    );
}

/// Config rules: `--allow-anonymous` for everyone, `--allow` with `{sub}` for token holders;
/// with an API key the HTTP API may do everything; presence identity comes from the token.
#[tokio::test]
async fn config_rules_api_keys_and_token_identity() {
    let relay = Relay::start(&[
        "--jwt-secret",
        SECRET,
        "--allow-anonymous",
        "subscribe+history=public:*",
        "--allow",
        "all=user:{sub}",
        "--api-key",
        "server-key",
        "--presence-channels",
        "user:*",
    ]);
    // Anonymous: subscribe and history on public:*, nothing else; no auth deadline.
    let mut anon = Ws::connect(&relay.ws_url()).await;
    anon.subscribe("public:news").await;
    assert_forbidden(
        &send_recv(
            &mut anon,
            json!({"type":"publish","channel":"public:news","data":1}),
        )
        .await,
    );
    assert_forbidden(&send_recv(&mut anon, json!({"type":"subscribe","channel":"user:bob"})).await);
    assert_eq!(
        get_bearer(&relay, "/api/history/public:news", None).await.0,
        200
    );
    assert_http_error(
        &get_bearer(&relay, "/api/history/user:bob", None).await,
        403,
        "forbidden",
    );

    // Token holder: own namespace, plus what anyone may.
    let bob = hs(json!({"sub":"bob","exp":now()+300,"info":{"name":"Bob"}}));
    let mut ws = ws_with(&relay, &bob).await;
    ws.subscribe("public:news").await;
    // A client claim is refused: identity comes from the token.
    assert_forbidden(
        &send_recv(
            &mut ws,
            json!({"type":"subscribe","channel":"user:bob","presence":{"user":"mallory"}}),
        )
        .await,
    );
    ws.subscribe("user:bob").await;
    let join = ws.recv_json().await;
    assert_eq!(join["type"], "presence", "{join}");
    assert_eq!(join["user"], "bob", "{join}");
    assert_eq!(join["info"], json!({"name":"Bob"}), "{join}");
    assert_forbidden(&send_recv(&mut ws, json!({"type":"subscribe","channel":"user:alice"})).await);
    let v = send_recv(
        &mut ws,
        json!({"type":"publish","channel":"user:bob","data":"hi"}),
    )
    .await;
    assert!(v["type"] == "published" || v["type"] == "message", "{v}");
    assert_eq!(
        get_bearer(&relay, "/api/history/user:bob", Some(&bob))
            .await
            .0,
        200
    );
    assert_http_error(
        &get_bearer(&relay, "/api/history/user:alice", Some(&bob)).await,
        403,
        "forbidden",
    );
    assert_http_error(
        &get_bearer(&relay, "/api/channels", None).await,
        403,
        "forbidden",
    );

    // An API key may do everything; a wrong bearer is 401.
    assert_eq!(
        get_bearer(&relay, "/api/channels", Some("server-key"))
            .await
            .0,
        200
    );
    let r = post_bearer(
        &relay,
        "/api/publish",
        &json!({"channel":"user:alice","data":1}),
        Some("server-key"),
    )
    .await;
    assert_eq!(r.0, 200, "{r:?}");
    let r = get_bearer(&relay, "/api/history/public:news", Some("wrong-key")).await;
    assert_http_error(&r, 401, "unauthorized");
}

/// Expired, tampered, `alg: none`, HS/public-key confusion and wrong-audience tokens are
/// refused on every door (WebSocket upgrade, `auth` command, SSE, HTTP API).
#[tokio::test]
async fn bad_tokens_are_refused() {
    let key = rcgen::KeyPair::generate().unwrap();
    let dir = std::env::temp_dir().join(format!("relay-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pub_pem = dir.join("ec.pub.pem");
    std::fs::write(&pub_pem, key.public_key_pem()).unwrap();
    let relay = Relay::start(&[
        "--jwt-secret",
        SECRET,
        "--jwt-public-key",
        pub_pem.to_str().unwrap(),
        "--jwt-audience",
        "relay",
        "--allow-anonymous",
        "subscribe=public:*",
    ]);
    let grants = json!({"subscribe":["*"]});
    let good = |exp: u64| json!({"sub":"a","exp":exp,"aud":"relay","channels":grants});
    let es = |claims: &Value| {
        encode(
            &Header::new(Algorithm::ES256),
            claims,
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap()
    };
    // Both algorithms work when right.
    for t in [hs(good(now() + 60)), es(&good(now() + 60))] {
        let mut ws = ws_with(&relay, &t).await;
        ws.subscribe("room:1").await;
    }
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let valid = hs(good(now() + 60));
    let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
    parts[1] = b64(&json!({"sub":"root","exp":now()+60,"aud":"relay","channels":{"all":["*"]}}));
    let tampered = parts.join(".");
    let bad = [
        ("expired", hs(good(now() - 120))),
        ("tampered", tampered),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg":"none","typ":"JWT"})),
                b64(&good(now() + 60))
            ),
        ),
        (
            "HS256 signed with the public key",
            hs_with(good(now() + 60), key.public_key_pem().as_bytes()),
        ),
        (
            "wrong audience",
            hs(json!({"sub":"a","exp":now()+60,"aud":"other"})),
        ),
        ("no audience", hs(json!({"sub":"a","exp":now()+60}))),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (what, t) in &bad {
        assert_eq!(
            ws_refused(&format!("{}?token={t}", relay.ws_url())).await,
            401,
            "{what}"
        );
        let r = Sse::request(
            &relay.http(&format!("/sse?channel=public:x&token={t}")),
            &[],
        )
        .await;
        assert_http_error(&read_resp(r).await, 401, "unauthorized");
        assert_http_error(
            &get_bearer(&relay, "/api/history/public:x", Some(t)).await,
            401,
            "unauthorized",
        );
        // The auth command: error, then close 4001.
        let mut ws = Ws::connect(&relay.ws_url()).await;
        let v = send_recv(&mut ws, json!({"type":"auth","token":t,"id":7})).await;
        assert_eq!(v["code"], "unauthorized", "{what}: {v}");
        assert_eq!(v["id"], 7);
        assert_eq!(ws.expect_close().await, 4001, "{what}");
    }

    // With only a public key configured, an HS256 token has no key at all.
    let only_pub = Relay::start(&["--jwt-public-key", pub_pem.to_str().unwrap()]);
    let confused = hs_with(
        json!({"sub":"a","exp":now()+60}),
        key.public_key_pem().as_bytes(),
    );
    assert_eq!(
        ws_refused(&format!("{}?token={confused}", only_pub.ws_url())).await,
        401
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `auth` as the first command, the auth deadline, `refresh` before the refresh deadline,
/// and a missed refresh (close 4003).
#[tokio::test]
async fn auth_command_refresh_and_deadlines() {
    let relay = Relay::start(&["--jwt-secret", SECRET, "--auth-timeout", "1500ms"]);
    let all = json!({"all":["*"]});

    // No auth within the deadline: 4001.
    let mut idle = Ws::connect(&relay.ws_url()).await;
    assert_eq!(idle.expect_close_within(Duration::from_secs(5)).await, 4001);

    // auth command, then refresh after token_expired.
    let mut ws = Ws::connect(&relay.ws_url()).await;
    let v = send_recv(
        &mut ws,
        json!({"type":"auth","token":token("carol", 2, all.clone()),"id":"a"}),
    )
    .await;
    assert_eq!(v["type"], "authenticated", "{v}");
    assert_eq!(v["user"], "carol");
    assert_eq!(v["id"], "a");
    ws.subscribe("room").await;
    // A second auth is refused; a refresh for another subject too.
    let v = send_recv(
        &mut ws,
        json!({"type":"auth","token":token("carol", 60, all.clone())}),
    )
    .await;
    assert_eq!(v["code"], "bad_request", "{v}");
    let v = send_recv(
        &mut ws,
        json!({"type":"refresh","token":token("dave", 60, all.clone())}),
    )
    .await;
    assert_forbidden(&v);
    let v = ws
        .recv_json_within(Duration::from_secs(5))
        .await
        .expect("token_expired");
    assert_eq!(v["type"], "token_expired", "{v}");
    assert!(v["deadline_ms"].as_u64().unwrap() > 0);
    let v = send_recv(
        &mut ws,
        json!({"type":"refresh","token":token("carol", 60, all.clone()),"id":2}),
    )
    .await;
    assert_eq!(v["type"], "refreshed", "{v}");
    assert_eq!(v["id"], 2);
    // Past the refresh deadline the connection still works.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut pubr = ws_with(&relay, &token("pub", 60, all.clone())).await;
    let v = send_recv(
        &mut pubr,
        json!({"type":"publish","channel":"room","data":"still here"}),
    )
    .await;
    assert_eq!(v["type"], "published", "{v}");
    assert_eq!(ws.expect_message("room", 1).await, json!("still here"));

    // Missed refresh: token_expired, then 4003.
    let mut late = ws_with(&relay, &token("erin", 1, all.clone())).await;
    late.subscribe("room").await;
    assert_eq!(late.expect_close_within(Duration::from_secs(8)).await, 4003);
}

/// An SSE stream ends with a `token_expired` event when its token expires.
#[tokio::test]
async fn sse_stream_ends_at_token_expiry() {
    let relay = Relay::start(&["--jwt-secret", SECRET]);
    let t = token("sam", 2, json!({"subscribe":["*"]}));
    let mut sse = Sse::connect(&relay.http(&format!("/sse?channel=feed&token={t}"))).await;
    sse.expect_event("subscribed").await;
    let ev = match sse.next_within(Duration::from_secs(6)).await {
        common::SseNext::Event(e) => e,
        other => panic!("expected token_expired, got {other:?}"),
    };
    assert_eq!(ev.event, "token_expired");
    assert!(sse.expect_end(Duration::from_secs(3)).await);
}

/// `exp` and `nbf` are NumericDates: a token whose `nbf` (or `exp`) is a string, which
/// jsonwebtoken alone would let through unchecked, is refused on every door.
#[tokio::test]
async fn dates_that_are_not_numbers_are_refused() {
    let relay = Relay::start_with(
        &["--allow-anonymous", "subscribe=public:*"],
        &[("RELAY_JWT_SECRET", SECRET)],
    );
    let future_nbf = hs(json!({"sub":"a","exp":now()+600,"nbf":"2999-01-01"}));
    let text_exp = hs(json!({"sub":"a","exp":"never"}));
    for t in [&future_nbf, &text_exp] {
        assert_eq!(
            ws_refused(&format!("{}?token={t}", relay.ws_url())).await,
            401
        );
        assert_http_error(
            &get_bearer(&relay, "/api/history/public:x", Some(t)).await,
            401,
            "unauthorized",
        );
        let sse = Sse::request(
            &relay.http(&format!("/sse?channel=public:x&token={t}")),
            &[],
        )
        .await;
        assert_eq!(sse.status().as_u16(), 401);
    }
    // A numeric one in the future is refused as not valid yet; a past one is fine.
    let later = hs(json!({"sub":"a","exp":now()+600,"nbf":now()+300}));
    assert_eq!(
        ws_refused(&format!("{}?token={later}", relay.ws_url())).await,
        401
    );
    let fine = hs(json!({"sub":"a","exp":now()+600,"nbf":now()-5}));
    ws_with(&relay, &fine).await.subscribe("public:x").await;
}

/// `{sub}` stands for a whole subject between separators: with `user:{sub}:*`, the subject
/// `alice:x` (which holds the separator `:`) gets no `{sub}` channel, so it cannot reach alice's
/// namespace `user:alice:*`, and alice's token is hers alone.
#[tokio::test]
async fn a_subject_with_separators_cannot_reach_another_subjects_channels() {
    let relay = Relay::start_with(
        &["--allow", "all=user:{sub}:*", "--allow", "all=user:{sub}"],
        &[("RELAY_JWT_SECRET", SECRET)],
    );
    let mut alice = ws_with(&relay, &token("alice", 60, json!({}))).await;
    alice.subscribe("user:alice").await;
    alice.subscribe("user:alice:x:inbox").await;
    let r = send_recv(
        &mut alice,
        json!({"type":"subscribe","channel":"user:alicex:inbox"}),
    )
    .await;
    assert_forbidden(&r);
    let mut other = ws_with(&relay, &token("alice:x", 60, json!({}))).await;
    for ch in ["user:alice:x:inbox", "user:alice:x", "user:alice"] {
        let r = send_recv(&mut other, json!({"type":"subscribe","channel":ch})).await;
        assert_forbidden(&r);
    }
    // Its token is valid all the same: other rules still apply to it.
    let r = send_recv(&mut other, json!({"type":"heartbeat"})).await;
    assert_eq!(r["type"], "heartbeat");
}

/// A rule where `{sub}` does not stand between separators is refused at start.
#[test]
fn a_sub_pattern_that_could_overlap_is_refused_at_start() {
    for rule in ["all=user{sub}", "all=u:{sub}*", "subscribe=*:{sub}"] {
        let out = common::run_bin(
            &["serve", "--listen", "127.0.0.1:0", "--allow", rule],
            &[("RELAY_JWT_SECRET", SECRET)],
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(2), "{rule}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("{sub}"), "{rule}: {err}");
    }
}
