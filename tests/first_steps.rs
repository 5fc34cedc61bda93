//! What a new user meets in the first ten minutes (issue 16): the page at `/`, the demo's URL
//! and icon, errors that say what to do, SSE presence for the demo's SSE tabs, plain HTTP to a
//! TLS port, and a README and protocol doc that match the binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

async fn get_with(relay: &Relay, path: &str, accept: &str) -> (u16, String, Vec<u8>) {
    let res = relay
        .client()
        .get(relay.http(path))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let kind = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, res.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn root_without_demo_is_a_landing_page_for_browsers_and_an_index_for_scripts() {
    let relay = Relay::start(&[]);
    let browser = "text/html,application/xhtml+xml,*/*;q=0.8";
    let (status, kind, body) = get_with(&relay, "/", browser).await;
    let page = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(kind.starts_with("text/html"), "{kind}");
    for needle in [
        env!("CARGO_PKG_VERSION"),
        "href=\"/healthz\"",
        "--demo",
        "/docs/protocol.md",
    ] {
        assert!(page.contains(needle), "the page lacks {needle}:\n{page}");
    }
    // The page names the address the browser used.
    assert!(
        page.contains(&format!("http://{}/sse", relay.addr())),
        "{page}"
    );
    let (status, kind, body) = get_with(&relay, "/", "*/*").await;
    assert_eq!(status, 200);
    assert!(kind.starts_with("application/json"), "{kind}");
    let index: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(index["version"], env!("CARGO_PKG_VERSION"));
    assert!(index["links"]["/healthz"].is_string(), "{index}");
    let (status, kind, body) = get_with(&relay, "/docs/protocol.md", "*/*").await;
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/markdown"), "{kind}");
    assert_eq!(String::from_utf8(body).unwrap(), read("docs/protocol.md"));
    // Other unknown paths stay 404.
    assert_eq!(relay.get("/nope").await.0, 404);
}

#[tokio::test]
async fn every_page_has_an_icon() {
    for args in [&[][..], &["--demo"][..]] {
        let relay = Relay::start(args);
        let (status, kind, body) = get_with(&relay, "/favicon.ico", "image/*").await;
        assert_eq!((status, kind.as_str()), (200, "image/x-icon"), "{args:?}");
        // An ICO header: reserved 0, type 1 (icon).
        assert_eq!(&body[..4], &[0, 0, 1, 0]);
    }
}

#[test]
fn demo_prints_its_url_after_the_listening_line() {
    let args = [
        "serve",
        "--demo",
        "--shards",
        "1",
        "--listen",
        "127.0.0.1:0",
    ];
    let lines = first_stdout_lines(&args, 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let addr = lines[0]
        .strip_prefix("listening on http://")
        .expect(&lines[0]);
    assert_eq!(
        lines[1],
        format!("demo: open http://{addr}/ in two browser tabs")
    );
}

#[tokio::test]
async fn rate_limited_errors_echo_the_command_id() {
    let relay = Relay::start(&["--rate-limit", "10", "--rate-burst", "3"]);
    let mut ws = Ws::connect(&relay.ws_url()).await;
    for id in 1..=4 {
        ws.send_json(json!({"type":"publish","channel":"a","data":id,"id":id}))
            .await;
    }
    for id in 1..=3 {
        let v = ws.recv_json().await;
        assert_eq!(
            (v["type"].as_str(), v["id"].as_i64()),
            (Some("published"), Some(id)),
            "{v}"
        );
    }
    let v = ws.recv_json().await;
    assert_eq!(v["code"], "rate_limited", "{v}");
    assert_eq!(v["id"], 4, "the refused command's id: {v}");
}

#[tokio::test]
async fn a_resume_without_its_epoch_is_refused_with_a_reason() {
    let relay = Relay::start(&[]);
    relay.publish("a", json!(1)).await;
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.expect_error_for(
        r#"{"type":"subscribe","channel":"a","since":0,"id":7}"#,
        "bad_request",
        Some(json!(7)),
    )
    .await;
    ws.send_json(json!({"type":"subscribe","channel":"a","since":0,"epoch":"no-hex","id":8}))
        .await;
    let v = ws.recv_json().await;
    assert_eq!(
        (v["code"].as_str(), v["id"].as_i64()),
        (Some("bad_request"), Some(8)),
        "{v}"
    );
    // Nothing was subscribed: a plain subscribe works.
    ws.subscribe("a").await;
}

#[tokio::test]
async fn an_sse_resume_without_channels_says_to_repeat_them() {
    let relay = Relay::start(&[]);
    let res = Sse::request(&relay.http("/sse"), &[("last-event-id", "ab:3")]).await;
    let (status, body) = read_resp(res).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Last-Event-ID") && message.contains("same ?channel="),
        "{message}"
    );
}

/// Presence members of `channel`, by user.
async fn members(relay: &Relay, channel: &str) -> Vec<String> {
    let (status, v) = relay.get(&format!("/api/presence/{channel}")).await;
    assert_eq!(status, 200, "{v}");
    let mut users: Vec<String> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap().to_owned())
        .collect();
    users.sort();
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_that_asks_is_a_presence_member_while_it_is_open() {
    // Short presence timeouts: the stream itself keeps its member alive.
    let relay = Relay::start(&[
        "--presence-channels",
        "presence:*",
        "--heartbeat-interval",
        "300ms",
        "--presence-timeout",
        "1s",
        "--presence-sweep",
        "200ms",
    ]);
    let ch = "presence:room";
    let mut ws = Ws::connect(&relay.ws_url()).await;
    ws.send_json(json!({"type":"subscribe","channel":ch,"presence":{"user":"alice"}}))
        .await;
    assert_eq!(ws.recv_json().await["type"], "subscribed");
    assert_eq!(ws.recv_json().await["user"], "alice");
    // A plain SSE subscriber watches without being a member.
    let mut watcher = Sse::connect(&relay.http(&format!("/sse?channel={ch}"))).await;
    watcher.expect_event("subscribed").await;
    let info = "%7B%22name%22%3A%22Bob%22%7D";
    let url = format!("/sse?channel={ch}&presence=1&presence_user=bob&presence_info={info}");
    let mut sse = Sse::connect(&relay.http(&url)).await;
    sse.expect_event("subscribed").await;
    let join = ws.recv_json().await;
    assert_eq!(
        (&join["event"], &join["user"], &join["info"]),
        (&json!("join"), &json!("bob"), &json!({"name":"Bob"})),
        "{join}"
    );
    // The SSE member gets the presence events too (its own join first).
    let own = sse.expect_event("presence").await.json();
    assert_eq!(
        (&own["event"], &own["user"]),
        (&json!("join"), &json!("bob"))
    );
    // Three presence timeouts later it is still there: its stream is its heartbeat (alice
    // sends hers).
    for _ in 0..10 {
        ws.send_json(json!({"type":"heartbeat"})).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(members(&relay, ch).await, ["alice", "bob"]);
    // Closing the stream leaves at once.
    drop(sse);
    loop {
        let v = ws.recv_json().await;
        if v["type"] == "presence" {
            assert_eq!(
                (&v["event"], &v["user"]),
                (&json!("leave"), &json!("bob")),
                "{v}"
            );
            break;
        }
    }
    assert_eq!(members(&relay, ch).await, ["alice"]);
}

#[tokio::test]
async fn sse_presence_claims_follow_the_websocket_rules() {
    let relay = Relay::start(&["--presence-channels", "p:*", "--client-presence", "false"]);
    let res = Sse::request(&relay.http("/sse?channel=p:1&presence_user=mallory"), &[]).await;
    assert_http_error(&read_resp(res).await, 403, "forbidden");
    // Without a claim the stream is a member as itself (a user of its own).
    let mut sse = Sse::connect(&relay.http("/sse?channel=p:1&presence=1")).await;
    sse.expect_event("subscribed").await;
    let own = sse.expect_event("presence").await.json();
    assert_eq!(own["user"], own["client"], "{own}");
    let relay = Relay::start(&["--presence-channels", "p:*"]);
    let bad = "/sse?channel=p:1&presence_info=%5B1%5D";
    let res = Sse::request(&relay.http(bad), &[]).await;
    assert_http_error(&read_resp(res).await, 400, "bad_request");
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_an_answer() {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("relay-plain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    let relay = Relay::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    let mut s = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(RECV_TIMEOUT, s.read_to_end(&mut answer))
        .await
        .expect("the server closes after answering")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.contains("use https://"), "{answer:?}");
}

/// Every error code the server can send, from the source: `code: "…"`, `error(…, "…")`, the
/// arms of a `let code = match` and the binary decoder's codes.
fn codes_in_source() -> std::collections::BTreeSet<String> {
    let mut codes = std::collections::BTreeSet::new();
    let mut files = vec![];
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests name codes too; only the code before them counts.
        let text = text.split("#[cfg(test)]").next().unwrap();
        let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let single = ["forbidden", "unauthorized", "unavailable", "overloaded"];
        let is_code = |c: &str| {
            !c.is_empty()
                && c.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                && (c.contains('_') || single.contains(&c))
        };
        let mut grab = |marker: &str| {
            for part in flat.split(marker).skip(1) {
                let Some(rest) = part.strip_prefix('"') else {
                    continue;
                };
                let code: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                let whole = rest[code.len()..].starts_with('"');
                if whole && is_code(&code) {
                    codes.insert(code);
                }
            }
        };
        for status in [
            "BAD_REQUEST",
            "UNAUTHORIZED",
            "FORBIDDEN",
            "NOT_FOUND",
            "METHOD_NOT_ALLOWED",
            "PAYLOAD_TOO_LARGE",
            "SERVICE_UNAVAILABLE",
            "TOO_MANY_REQUESTS",
            "CONFLICT",
            "REQUEST_TIMEOUT",
        ] {
            grab(&format!("StatusCode::{status}, "));
        }
        grab("code: ");
        grab("Refusal::new(");
        grab("error(");
        grab("err(");
        // Codes chosen by a match: `let code = match … { … => "presence_full", … };`.
        if f.to_string_lossy().contains("/transport/") {
            for block in flat.split("let code = match").skip(1) {
                let block = block.split("};").next().unwrap_or("");
                for literal in block.split('"').skip(1).step_by(2) {
                    if is_code(literal) {
                        codes.insert(literal.to_owned());
                    }
                }
            }
        }
        if f.ends_with("binary.rs") {
            let body = flat.split("pub fn code(&self)").nth(1).unwrap_or("");
            let body = body.split("impl From").next().unwrap_or("");
            for part in body.split("=> ").skip(1) {
                if let Some(rest) = part.strip_prefix('"') {
                    codes.insert(rest.split('"').next().unwrap().to_owned());
                }
            }
        }
    }
    codes
}

#[test]
fn every_error_code_the_server_sends_is_documented() {
    let codes = codes_in_source();
    for known in [
        "rate_limited",
        "unavailable",
        "backplane_unavailable",
        "bad_frame",
        "presence_full",
        "overloaded",
    ] {
        assert!(codes.contains(known), "the scan missed {known}: {codes:?}");
    }
    let doc = read("docs/protocol.md");
    let missing: Vec<&String> = codes
        .iter()
        .filter(|c| !doc.contains(&format!("`{c}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/protocol.md does not name {missing:?}"
    );
}

#[test]
fn the_readme_installs_before_it_runs_relay_and_mints_tokens_with_gentoken() {
    let readme = read("README.md");
    let install = readme
        .find("cargo install --path .")
        .expect("an install step");
    let first_use = readme.find("relay serve").expect("relay serve");
    assert!(
        install < first_use,
        "the README runs `relay serve` before installing it"
    );
    assert!(
        readme.contains("relay gentoken"),
        "the README mints its token with gentoken"
    );
    // No token is pasted in (it would expire): JWTs start with eyJ.
    assert!(!readme.contains("eyJ"), "a pasted token in the README");
}
