//! The admin UI at `/admin`: off by default, the login (wrong passwords refused and
//! rate-limited), the session cookie and the script token, CSRF, publish through the admin API
//! to a WebSocket subscriber, the live tail under JWT auth, channels with presence counts in
//! pages, and every node of a Redis cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::time::Instant;

const PASSWORD: &str = "correct horse battery";
const TOKEN: &str = "admin-token-0123456789";

fn admin_relay(extra: &[&str]) -> Relay {
    let mut args = vec![
        "--admin-password",
        PASSWORD,
        "--admin-token",
        TOKEN,
        // Loopback is a trusted proxy by default; the login limit counts the peer anyway.
        "--trusted-proxies",
        "none",
    ];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// Posts the login form; returns the status and the `Set-Cookie` header.
async fn login(relay: &Relay, password: &str) -> (u16, Option<String>, reqwest::Response) {
    let res = relay
        .client()
        .post(relay.http("/admin/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "password={}",
            password.replace('%', "%25").replace(' ', "+")
        ))
        .send()
        .await
        .unwrap();
    let cookie = res
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_owned());
    (res.status().as_u16(), cookie, res)
}

/// Logs in and returns the `name=value` of the session cookie.
async fn session(relay: &Relay) -> String {
    let (status, cookie, _) = login(relay, PASSWORD).await;
    assert_eq!(status, 204);
    let cookie = cookie.expect("a session cookie");
    cookie.split(';').next().unwrap().to_owned()
}

async fn get_with(relay: &Relay, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = relay.client().get(relay.http(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    read_resp(req.send().await.unwrap()).await
}

async fn post_with(
    relay: &Relay,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = relay
        .client()
        .post(relay.http(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    read_resp(req.send().await.unwrap()).await
}

#[tokio::test]
async fn admin_is_off_by_default_and_every_admin_path_is_a_404() {
    let relay = Relay::start(&[]);
    for path in ["/admin", "/admin/", "/admin/app.js", "/admin/api/status"] {
        assert_http_error(&relay.get(path).await, 404, "not_found");
    }
    let (status, _, _) = login(&relay, PASSWORD).await;
    assert_eq!(status, 404);
    let (_, index) = relay.get("/").await;
    assert!(index["links"].get("/admin").is_none(), "{index}");
}

#[tokio::test]
async fn the_page_is_served_with_a_strict_csp_and_listed_on_the_landing_page() {
    let relay = admin_relay(&[]);
    let res = relay
        .client()
        .get(relay.http("/admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let csp = res.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let html = res.text().await.unwrap();
    assert!(html.contains("/admin/app.js") && !html.contains("<script>"));
    for (path, kind) in [("/admin/app.js", "javascript"), ("/admin/app.css", "css")] {
        let res = relay.client().get(relay.http(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains(kind));
    }
    let (_, index) = relay.get("/").await;
    assert!(index["links"].get("/admin").is_some(), "{index}");
}

#[tokio::test]
async fn a_wrong_password_is_refused_and_login_attempts_are_rate_limited() {
    let relay = admin_relay(&[]);
    let (status, cookie, res) = login(&relay, "not the password").await;
    assert_eq!(status, 401);
    assert!(cookie.is_none());
    assert_http_error(&read_resp(res).await, 401, "unauthorized");
    // A burst of two, then one a second: the fourth attempt in a row is refused whatever it
    // holds, with a Retry-After.
    let mut limited = None;
    for _ in 0..4 {
        let (status, _, res) = login(&relay, "still wrong").await;
        if status == 429 {
            limited = Some(res);
            break;
        }
        assert_eq!(status, 401);
    }
    let res = limited.expect("a 429 within four quick attempts");
    assert!(res.headers().contains_key("retry-after"));
    assert_http_error(&read_resp(res).await, 429, "rate_limited");
    let (status, cookie, _) = login(&relay, PASSWORD).await;
    assert_eq!(status, 429, "the right password waits its turn too");
    assert!(cookie.is_none());
    let text = relay.scrape().await;
    assert!(refused_count(&text, "unauthorized") >= 1, "{text}");
    assert!(refused_count(&text, "api_rate_limited") >= 1, "{text}");
}

#[tokio::test]
async fn the_admin_api_answers_only_with_a_session_or_the_admin_token() {
    let relay = admin_relay(&["--api-key", "an-api-key-0123456789"]);
    assert_http_error(&relay.get("/admin/api/status").await, 401, "unauthorized");
    let forged = format!("relay_admin={}.AAAA", u64::MAX / 2);
    // A forged cookie, a wrong token, and the API key of /api/* (no admin credential).
    for header in [
        ("cookie", forged.as_str()),
        ("authorization", "Bearer wrong-token-0123456789"),
        ("authorization", "Bearer an-api-key-0123456789"),
    ] {
        assert_http_error(
            &get_with(&relay, "/admin/api/status", &[header]).await,
            401,
            "unauthorized",
        );
    }
    let (status, set, _) = login(&relay, PASSWORD).await;
    assert_eq!(status, 204);
    let set = set.unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age="] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    let cookie = set.split(';').next().unwrap();
    let (status, st) = get_with(&relay, "/admin/api/status", &[("cookie", cookie)]).await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["shards"].as_array().unwrap().len(), 2, "{st}");
    assert_eq!(st["backplane"]["kind"], "memory");
    assert!(st["memory"]["bytes"]["history"].is_u64(), "{st}");
    let bearer = format!("Bearer {TOKEN}");
    let (status, nodes) = get_with(&relay, "/admin/api/nodes", &[("authorization", &bearer)]).await;
    assert_eq!(status, 200);
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1, "{nodes}");
    assert_eq!(nodes["nodes"][0]["self"], true);
    assert_eq!(
        get_with(&relay, "/admin/session", &[("cookie", cookie)])
            .await
            .1,
        json!({"session": true})
    );
    assert_eq!(
        relay.get("/admin/session").await.1,
        json!({"session": false})
    );
}

#[tokio::test]
async fn a_publish_from_the_admin_api_reaches_a_websocket_subscriber() {
    let relay = admin_relay(&[]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.subscribe("news").await;
    let cookie = session(&relay).await;
    let origin = format!("http://{}", relay.addr());
    let (status, body) = post_with(
        &relay,
        "/admin/api/publish",
        &json!({"channel": "news", "data": {"text": "from the admin"}}),
        &[("cookie", &cookie), ("origin", &origin)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["seq"], 1);
    assert_eq!(
        ws.expect_message("news", 1).await,
        json!({"text": "from the admin"})
    );
    // Shards count the connection and its subscription.
    let (_, st) = get_with(&relay, "/admin/api/status", &[("cookie", &cookie)]).await;
    assert_eq!(st["connections"], 1, "{st}");
    assert_eq!(st["subscriptions"], 1, "{st}");
    assert!(st["published"].as_u64().unwrap() >= 1, "{st}");
}

#[tokio::test]
async fn a_cookie_publish_without_the_same_origin_is_refused() {
    let relay = admin_relay(&[]);
    let cookie = session(&relay).await;
    let body = json!({"channel": "news", "data": 1});
    for headers in [
        vec![("cookie", cookie.as_str())],
        vec![
            ("cookie", cookie.as_str()),
            ("origin", "http://evil.example"),
        ],
    ] {
        assert_http_error(
            &post_with(&relay, "/admin/api/publish", &body, &headers).await,
            403,
            "forbidden_origin",
        );
    }
    assert_eq!(relay.history("news", "").await["seq"], 0);
    // A script's token is not sent by browsers on their own: no Origin needed.
    let bearer = format!("Bearer {TOKEN}");
    let (status, _) = post_with(
        &relay,
        "/admin/api/publish",
        &body,
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, 200);
    let text = relay.scrape().await;
    assert!(refused_count(&text, "origin") >= 2, "{text}");
}

#[tokio::test]
async fn the_live_tail_streams_a_channel_to_the_admin_session_under_jwt_auth() {
    let relay = admin_relay(&["--jwt-secret", "a-secret-of-at-least-16-bytes"]);
    // Without a token a client may not subscribe; the admin session may.
    let plain = Sse::request(&relay.http("/sse?channel=ops"), &[]).await;
    assert_eq!(plain.status(), 403);
    let cookie = session(&relay).await;
    let mut tail = Sse::connect_with(
        &relay.http("/admin/api/tail?channel=ops"),
        &[("cookie", &cookie)],
    )
    .await;
    tail.expect_event("subscribed").await;
    let (status, _) = post_with(
        &relay,
        "/admin/api/publish",
        &json!({"channel": "ops", "data": "deploy"}),
        &[("authorization", &format!("Bearer {TOKEN}"))],
    )
    .await;
    assert_eq!(status, 200);
    let e = tail.expect_message("ops", 1).await;
    assert_eq!(e.json()["data"], "deploy");
    let anon = Sse::request(&relay.http("/admin/api/tail?channel=ops"), &[]).await;
    assert_eq!(anon.status(), 401);
}

#[tokio::test]
async fn channels_come_in_pages_with_subscriber_and_presence_counts() {
    let relay = admin_relay(&["--presence-channels", "room:*"]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.send_json(json!({"type": "subscribe", "channel": "room:1", "presence": {"user": "ann"}}))
        .await;
    assert_subscribed(&ws.recv_json().await, "room:1");
    for ch in ["a", "b", "c"] {
        relay.publish(ch, json!(1)).await;
    }
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let (_, p1) = get_with(&relay, "/admin/api/channels?limit=2", &auth).await;
    let names: Vec<&str> = p1["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"], "{p1}");
    assert_eq!(p1["next"], "b");
    let (_, p2) = get_with(&relay, "/admin/api/channels?limit=2&cursor=b", &auth).await;
    assert_eq!(p2["channels"][0]["channel"], "c", "{p2}");
    let room = &p2["channels"][1];
    assert_eq!(room["channel"], "room:1", "{p2}");
    assert_eq!(room["subscribers"], 1);
    assert_eq!(room["presence"], json!({"clients": 1, "users": 1}));
    assert!(p2.get("next").is_none(), "{p2}");
    let (status, members) = get_with(&relay, "/admin/api/presence/room:1", &auth).await;
    assert_eq!(status, 200);
    assert_eq!(members["members"][0]["user"], "ann", "{members}");
    let (status, history) = get_with(&relay, "/admin/api/history/a", &auth).await;
    assert_eq!(status, 200);
    assert_eq!(history["messages"][0]["data"], 1, "{history}");
}

#[tokio::test]
async fn the_readme_command_turns_the_admin_ui_on_with_its_password() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("RELAY_ADMIN_PASSWORD='") && l.ends_with("relay serve"))
        .expect("README shows how to start relay with an admin password");
    let password = line.split('\'').nth(1).unwrap();
    assert!(readme.contains("http://127.0.0.1:8080/admin"));
    let relay = Relay::start_with(&[], &[("RELAY_ADMIN_PASSWORD", password)]);
    assert_eq!(relay.get("/admin").await.0, 200);
    let (status, cookie, _) = login(&relay, password).await;
    assert_eq!((status, cookie.is_some()), (204, true));
}

#[test]
fn a_short_admin_secret_stops_the_start() {
    let out = run_bin(
        &["check-config", "--admin-password", "short"],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin_password"));
}

#[test]
fn check_config_masks_the_admin_secrets() {
    let out = run_bin(
        &["check-config"],
        &[
            ("RELAY_ADMIN_PASSWORD", PASSWORD),
            ("RELAY_ADMIN_TOKEN", TOKEN),
        ],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("admin_password = \"<hidden>\""), "{text}");
    assert!(text.contains("admin_token = \"<hidden>\""), "{text}");
    assert!(!text.contains(PASSWORD) && !text.contains(TOKEN), "{text}");
}

/// The ids `/admin/api/nodes` of `relay` lists.
async fn node_ids(relay: &Relay) -> Vec<String> {
    let bearer = format!("Bearer {TOKEN}");
    let (status, v) = get_with(relay, "/admin/api/nodes", &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{v}");
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_owned())
        .collect()
}

async fn wait_nodes(relay: &Relay, want: &[&str], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ids = node_ids(relay).await;
        if ids == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nodes {ids:?}, want {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_redis_cluster_the_admin_api_lists_every_node_and_forgets_a_dead_one() {
    if cluster::Kind::Redis.available() {
        every_node_is_listed_and_a_dead_one_forgotten(cluster::Kind::Redis).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_nats_cluster_the_admin_api_lists_every_node_and_forgets_a_dead_one() {
    if cluster::Kind::Nats.available() {
        every_node_is_listed_and_a_dead_one_forgotten(cluster::Kind::Nats).await;
    }
}

async fn every_node_is_listed_and_a_dead_one_forgotten(kind: cluster::Kind) {
    let server = cluster::Server::start(kind);
    let flags = ["--admin-token", TOKEN];
    let a = cluster::node(&server, "node-a", &flags).await;
    let mut b = cluster::node(&server, "node-b", &flags).await;
    // Each lists itself first, then the others by id.
    wait_nodes(&a, &["node-a", "node-b"], Duration::from_secs(10)).await;
    wait_nodes(&b, &["node-b", "node-a"], Duration::from_secs(10)).await;
    let bearer = format!("Bearer {TOKEN}");
    let (_, v) = get_with(&a, "/admin/api/nodes", &[("authorization", &bearer)]).await;
    let peer = &v["nodes"][1];
    assert_eq!(peer["self"], false);
    let kind_name = format!("{kind:?}").to_lowercase();
    assert_eq!(peer["backplane"]["kind"], json!(kind_name), "{v}");
    assert!(peer["shards"].is_array(), "{v}");
    b.signal("KILL");
    b.wait_exit(Duration::from_secs(5)).await;
    wait_nodes(
        &a,
        &["node-a"],
        cluster_forget_after() + Duration::from_secs(5),
    )
    .await;
}

/// The roster forgets a node within 10 s (`backplane::roster::FORGET_AFTER`) plus an announce
/// period.
fn cluster_forget_after() -> Duration {
    Duration::from_secs(12)
}
