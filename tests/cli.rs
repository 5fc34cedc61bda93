//! The operator's commands besides `serve`: `relay --help`, `relay gentoken`, `relay
//! check-config`, `relay genconfig`, and the `--listen` forms users write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::json;

const SECRET: &str = "a-test-secret-of-32-bytes-length";
const T: Duration = Duration::from_secs(20);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A file in a directory of its own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("relay-cli-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `relay gentoken ARGS` with `envs`; the token it printed.
fn gentoken(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut all = vec!["gentoken"];
    all.extend_from_slice(args);
    let out = run_bin(&all, envs, T);
    assert!(out.status.success(), "relay {all:?}: {out:?}");
    let token = stdout(&out).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");
    token
}

/// Subscribing to `channel` with `token` over WebSocket: the reply's type and code.
async fn try_subscribe(relay: &Relay, token: &str, channel: &str) -> (String, String) {
    let mut ws = Ws::connect(&format!("{}?token={token}", relay.ws_url())).await;
    ws.send_json(json!({"type":"subscribe","channel":channel,"id":1}))
        .await;
    let v = ws.recv_json().await;
    (
        v["type"].as_str().unwrap_or("").to_owned(),
        v["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn help_lists_the_commands_and_their_usage() {
    let out = run_bin(&["--help"], &[], T);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("Usage: relay <COMMAND>"), "{text}");
    for cmd in ["serve", "check-config", "genconfig", "gentoken"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(cmd)),
            "`relay --help` does not list {cmd}:\n{text}"
        );
    }
    assert!(text.contains("relay serve --help"), "{text}");
    // The serve options are `relay serve`'s, not a bare `serve` program's.
    assert!(!text.contains("Usage: serve"), "{text}");
    let serve = stdout(&run_bin(&["serve", "--help"], &[], T));
    assert!(serve.contains("Usage: relay serve [OPTIONS]"), "{serve}");
    let token = stdout(&run_bin(&["gentoken", "--help"], &[], T));
    assert!(
        token.contains("Usage: relay gentoken") && token.contains("--sub"),
        "{token}"
    );
}

#[tokio::test]
async fn a_gentoken_token_is_accepted_by_a_relay_with_the_same_secret() {
    let relay = Relay::start(&["--jwt-secret", SECRET]);
    // The secret as `serve` reads it: from the environment ...
    let token = gentoken(
        &["--sub", "alice", "--channel", "room:*", "--ttl", "10m"],
        &[("RELAY_JWT_SECRET", SECRET)],
    );
    assert_eq!(
        try_subscribe(&relay, &token, "room:1").await.0,
        "subscribed"
    );
    assert_eq!(
        try_subscribe(&relay, &token, "other").await,
        ("error".into(), "forbidden".into())
    );
    // ... and from a config file, with a narrower grant and presence info.
    let dir = TempDir::new("gentoken");
    let file = dir.file("relay.toml", &format!("jwt_secret = \"{SECRET}\"\n"));
    let token = gentoken(
        &[
            "--config",
            &file,
            "--sub",
            "bob",
            "--grant",
            "subscribe+history=news:*",
            "--info",
            r#"{"name":"Bob"}"#,
        ],
        &[],
    );
    assert_eq!(
        try_subscribe(&relay, &token, "news:1").await.0,
        "subscribed"
    );
    let r = relay
        .client()
        .post(relay.http("/api/publish"))
        .bearer_auth(&token)
        .json(&json!({"channel":"news:1","data":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "no publish grant");
    // A token for another secret is refused.
    let other = gentoken(
        &["--sub", "eve", "--channel", "*"],
        &[("RELAY_JWT_SECRET", "another-secret-of-32-bytes-long!")],
    );
    let r = relay
        .client()
        .get(relay.http(&format!("/sse?channel=room:1&token={other}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

#[tokio::test]
async fn gentoken_signs_with_a_private_key_the_relay_verifies_with_its_public_key() {
    let key = rcgen::KeyPair::generate().unwrap();
    let dir = TempDir::new("ec");
    let public = dir.file("ec.pub.pem", &key.public_key_pem());
    let private = dir.file("ec.pem", &key.serialize_pem());
    let relay = Relay::start(&["--jwt-public-key", &public, "--jwt-audience", "relay"]);
    // The audience comes from the settings, read as `serve` reads them.
    let token = gentoken(
        &[
            "--jwt-private-key",
            &private,
            "--jwt-audience",
            "relay",
            "--sub",
            "carol",
            "--channel",
            "room:*",
        ],
        &[],
    );
    assert_eq!(
        try_subscribe(&relay, &token, "room:2").await.0,
        "subscribed"
    );
    let header = token.split('.').next().unwrap();
    use base64::Engine;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    assert!(String::from_utf8_lossy(&header).contains("ES256"));
}

#[test]
fn gentoken_without_a_key_says_where_the_key_goes() {
    let out = run_bin(&["gentoken", "--sub", "a", "--channel", "x"], &[], T);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains("RELAY_JWT_SECRET") && err.contains("--jwt-private-key"),
        "{err}"
    );
    assert!(stdout(&out).is_empty());
}

#[tokio::test]
async fn the_example_config_checks_and_starts_with_and_without_a_jwt_secret() {
    let example = repo("deploy/relay.toml");
    let example = example.to_str().unwrap();
    for envs in [&[][..], &[("RELAY_JWT_SECRET", SECRET)][..]] {
        let out = run_bin(&["check-config", example], envs, T);
        assert!(
            out.status.success(),
            "check-config {example} with {envs:?}: {out:?}"
        );
        // The same file starts the relay (JWT on: presence identity from the token).
        let relay = Relay::start_with(&["--config", example], envs);
        assert_eq!(relay.get("/healthz").await.0, 200);
    }
}

#[test]
fn client_presence_with_jwt_names_what_to_change() {
    let out = run_bin(
        &["check-config", "--client-presence", "true"],
        &[("RELAY_JWT_SECRET", SECRET)],
        T,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains("client_presence") && err.contains("remove client_presence"),
        "{err}"
    );
}

#[test]
fn check_config_prints_the_effective_settings_with_secrets_masked() {
    let dir = TempDir::new("mask");
    let file = dir.file(
        "relay.toml",
        "history_size = 77\napi_key = [\"file-key-123\"]\nredis_url = \"redis://u:redis-pass@r:6379\"\n",
    );
    let out = run_bin(
        &[
            "check-config",
            &file,
            "--history-ttl",
            "90s",
            "--listen",
            ":8080",
        ],
        &[
            ("RELAY_JWT_SECRET", SECRET),
            ("RELAY_API_KEY", "env-key-456"),
        ],
        T,
    );
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    for secret in [SECRET, "file-key-123", "env-key-456", "redis-pass"] {
        assert!(!text.contains(secret), "{secret} printed:\n{text}");
    }
    for line in [
        "history_size = 77",
        "history_ttl = \"1m 30s\"",
        "listen = \"0.0.0.0:8080\"",
        "jwt_secret = \"<hidden>\"",
        "api_key = [\"<hidden>\"]",
        "redis_url = \"redis://u:<hidden>@r:6379\"",
        "client_presence = false",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
}

#[test]
fn check_config_lists_every_problem_and_exits_2() {
    let dir = TempDir::new("problems");
    let file = dir.file(
        "relay.toml",
        "histroy_size = 3\nmax_message_size = \"12 parsecs\"\nidle_timeout = \"1s\"\n",
    );
    let out = run_bin(
        &[
            "check-config",
            &file,
            "--history-size",
            "2000000",
            "--jwt-public-key",
            "/nonexistent/relay-key.pem",
            "--tls-cert",
            "/nonexistent/relay-cert.pem",
            "--tls-key",
            "/nonexistent/relay-key.pem",
            "--backplane",
            "redis",
            "--redis-url",
            "redis-cluster://a:7000/0",
            "--webhook-url",
            "ftp://app.example/hooks",
        ],
        &[],
        T,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    for problem in [
        "histroy_size",
        "max_message_size",
        "idle_timeout",
        "history_size",
        "/nonexistent/relay-key.pem",
        "/nonexistent/relay-cert.pem",
        "invalid redis_url",
        "invalid webhook_url",
        "8 problems",
    ] {
        assert!(err.contains(problem), "{problem} not listed:\n{err}");
    }
    assert!(stdout(&out).is_empty(), "{out:?}");
    // A file that cannot be read is one problem too.
    let out = run_bin(&["check-config", "/nonexistent/relay.toml"], &[], T);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn genconfig_writes_every_option_with_fresh_secrets() {
    let a = stdout(&run_bin(&["genconfig"], &[], T));
    let b = stdout(&run_bin(&["genconfig"], &[], T));
    let secret = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
            .to_owned()
    };
    for key in ["jwt_secret = ", "api_key = "] {
        assert_ne!(secret(&a, key), secret(&b, key), "{key} is not fresh");
        assert!(
            secret(&a, key).len() > key.len() + 60,
            "{}",
            secret(&a, key)
        );
    }
    // Every option of the example, and a file the relay takes.
    let example = std::fs::read_to_string(repo("deploy/relay.toml")).unwrap();
    for line in example.lines().filter(|l| l.contains(" = ")) {
        let key = line.trim_start_matches("# ").split(" = ").next().unwrap();
        assert!(a.contains(&format!("{key} = ")), "genconfig lacks {key}");
    }
    let dir = TempDir::new("gen");
    let file = dir.file("relay.toml", &a);
    let out = run_bin(&["check-config", &file], &[], T);
    assert!(out.status.success(), "{out:?}");
    // Its secret mints tokens for it.
    gentoken(&["--config", &file, "--sub", "x", "--channel", "x"], &[]);
}

/// `relay serve --listen LISTEN`: the address it printed (it is killed on return).
fn bound_address(listen: &str) -> String {
    let lines = first_stdout_lines(&["serve", "--shards", "1", "--listen", listen], 1);
    let line = lines.first().map_or("", String::as_str);
    line.trim_start_matches("listening on http://").to_owned()
}

#[test]
fn listen_takes_the_forms_users_write() {
    // `localhost:PORT` and a bare PORT are the loopback address.
    for listen in ["localhost:0", "0"] {
        let addr = bound_address(listen);
        assert!(
            addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
            "--listen {listen}: {addr:?}"
        );
    }
    // `:PORT` is every interface (checked without binding one).
    for (listen, effective) in [
        (":8080", "0.0.0.0:8080"),
        ("*:9000", "0.0.0.0:9000"),
        ("8081", "127.0.0.1:8081"),
    ] {
        let out = run_bin(&["check-config", "--listen", listen], &[], T);
        assert!(out.status.success(), "{out:?}");
        let want = format!("listen = \"{effective}\"");
        assert!(
            stdout(&out).lines().any(|l| l == want),
            "--listen {listen}: {out:?}"
        );
    }
    let out = run_bin(&["check-config", "--listen", "example.com:80"], &[], T);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(":8080 for every interface"),
        "{out:?}"
    );
}
