//! Command line, environment and config file (flag > env > file > default).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::json;

fn temp_config(name: &str, body: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let p = std::env::temp_dir().join(format!(
        "relay-test-{}-{name}-{nanos}.toml",
        std::process::id()
    ));
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn help_mentions_the_main_flags() {
    // `relay --help` lists the commands (tests/cli.rs); `relay serve --help` every option.
    let out = run_bin(&["serve", "--help"], &[], Duration::from_secs(10));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--history-size",
        "--api-key",
        "--shards",
        "--history-ttl",
        "--max-message-size",
        "--max-subscriptions",
        "--shutdown-timeout",
        "--max-outbox-bytes",
        "--ping-interval",
        "--idle-timeout",
        "--sse-keepalive",
        "--sse-retry",
        "--log-format",
        "--config",
    ] {
        assert!(
            text.contains(flag),
            "`relay serve --help` lacks {flag}:\n{text}"
        );
    }
}

#[test]
fn invalid_configuration_exits_nonzero() {
    let cases: Vec<Vec<String>> = vec![
        vec!["serve".into(), "--history-size".into(), "abc".into()],
        vec!["serve".into(), "--idle-timeout".into(), "soon".into()],
        vec!["serve".into(), "--no-such-flag".into()],
        vec![
            "serve".into(),
            "--config".into(),
            "/nonexistent/relay-test.toml".into(),
        ],
    ];
    for args in cases {
        let mut full = args.clone();
        full.extend(["--listen".to_string(), "127.0.0.1:0".to_string()]);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = run_bin(&refs, &[], Duration::from_secs(10));
        assert!(!out.status.success(), "relay {refs:?} should fail: {out:?}");
    }
    let bad = temp_config("bad", "history_size = \"lots\"\n");
    let out = run_bin(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            bad.to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(10),
    );
    let _ = std::fs::remove_file(&bad);
    assert!(
        !out.status.success(),
        "a mistyped config value must fail: {out:?}"
    );
}

/// Effective history size observed through the API: publish 10, count what history returns.
async fn effective_history_size(args: &[&str], envs: &[(&str, &str)]) -> usize {
    let relay = Relay::start_with(args, envs);
    for n in 1..=10 {
        relay.publish("cfg", json!(n)).await;
    }
    let h = relay.history("cfg", "").await;
    assert_eq!(h["seq"], json!(10), "{h}");
    h["messages"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precedence_flag_over_env_over_file() {
    let file = temp_config("prec", "history_size = 3\n");
    let f = file.to_str().unwrap().to_string();
    let cfg = ["--config", f.as_str()];
    let env = [("RELAY_HISTORY_SIZE", "4")];

    assert_eq!(effective_history_size(&[], &[]).await, 10, "default (1000)");
    assert_eq!(effective_history_size(&cfg, &[]).await, 3, "file");
    assert_eq!(effective_history_size(&[], &env).await, 4, "env");
    assert_eq!(effective_history_size(&cfg, &env).await, 4, "env over file");
    assert_eq!(
        effective_history_size(&["--history-size", "5"], &[]).await,
        5,
        "flag"
    );
    let all = ["--config", f.as_str(), "--history-size", "5"];
    assert_eq!(effective_history_size(&all, &[]).await, 5, "flag over file");
    assert_eq!(
        effective_history_size(&all, &env).await,
        5,
        "flag over env over file"
    );
    assert_eq!(
        effective_history_size(&["--history-size", "5"], &env).await,
        5,
        "flag over env"
    );
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_from_file_and_env() {
    // The file uses the older key `api_keys`, which still works.
    let file = temp_config("keys", "api_keys = [\"filekey\"]\n");
    let f = file.to_str().unwrap().to_string();
    let body = json!({"channel":"k","data":1});

    let relay = Relay::start(&["--config", f.as_str()]);
    assert_http_error(
        &relay.post("/api/publish", &body).await,
        401,
        "unauthorized",
    );
    let mut relay = relay;
    relay.set_api_key("filekey");
    assert_eq!(relay.post("/api/publish", &body).await.0, 200);
    drop(relay);

    let mut relay = Relay::start_with(&[], &[("RELAY_API_KEY", "alpha,beta")]);
    assert_http_error(
        &relay.post("/api/publish", &body).await,
        401,
        "unauthorized",
    );
    relay.set_api_key("alpha");
    assert_eq!(relay.post("/api/publish", &body).await.0, 200);
    relay.set_api_key("beta");
    assert_eq!(relay.post("/api/publish", &body).await.0, 200);
    relay.set_api_key("alpha,beta");
    assert_http_error(
        &relay.post("/api/publish", &body).await,
        401,
        "unauthorized",
    );
    drop(relay);

    // A flag replaces the env keys (flag > env).
    let mut relay = Relay::start_with(&["--api-key", "flagkey"], &[("RELAY_API_KEY", "alpha")]);
    relay.set_api_key("flagkey");
    assert_eq!(relay.post("/api/publish", &body).await.0, 200);
    relay.set_api_key("alpha");
    assert_http_error(
        &relay.post("/api/publish", &body).await,
        401,
        "unauthorized",
    );
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_still_serves() {
    let relay = Relay::start(&["--log-format", "json"]);
    assert_eq!(relay.get("/healthz").await, (200, json!({"status":"ok"})));
}

/// Key `api_key`: which of `keys` the relay started with `args`, `envs` accepts.
async fn accepted_api_keys(args: &[&str], envs: &[(&str, &str)], keys: &[&str]) -> Vec<String> {
    let mut relay = Relay::start_with(args, envs);
    let body = json!({"channel":"k","data":1});
    let mut accepted = Vec::new();
    for key in keys {
        relay.set_api_key(key);
        if relay.post("/api/publish", &body).await.0 == 200 {
            accepted.push(key.to_string());
        }
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_setting_is_replaced_whole_by_a_higher_layer() {
    let file = temp_config("list", "api_key = [\"f1\", \"f2\"]\n");
    let f = file.to_str().unwrap().to_string();
    let cfg = ["--config", f.as_str()];
    let env = [("RELAY_API_KEY", "e1,e2")];
    let all = ["f1", "f2", "e1", "e2", "c1"];
    let flag = ["--config", f.as_str(), "--api-key", "c1"];

    assert_eq!(
        accepted_api_keys(&cfg, &[], &all).await,
        ["f1", "f2"],
        "file"
    );
    assert_eq!(
        accepted_api_keys(&cfg, &env, &all).await,
        ["e1", "e2"],
        "env over file"
    );
    assert_eq!(
        accepted_api_keys(&flag, &[], &all).await,
        ["c1"],
        "flag over file"
    );
    assert_eq!(
        accepted_api_keys(&flag, &env, &all).await,
        ["c1"],
        "flag over env"
    );
    let _ = std::fs::remove_file(&file);
}

/// What a relay started with `args` and `envs` says: the SSE `retry:` hint, and whether a
/// publish of 2000 bytes fits its largest message.
async fn retry_and_large_publish(args: &[&str], envs: &[(&str, &str)]) -> (String, u16) {
    let relay = Relay::start_with(args, envs);
    let mut sse = Sse::connect(&relay.http("/sse?channel=s")).await;
    sse.expect_event("subscribed").await;
    let big = json!({"channel":"s","data":"x".repeat(2000)});
    (
        sse.retries.join(","),
        relay.post("/api/publish", &big).await.0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_and_sizes_read_the_same_from_flag_env_and_file() {
    let file = temp_config(
        "units",
        "sse_retry = \"2500ms\"\nmax_message_size = \"1KiB\"\n",
    );
    let f = file.to_str().unwrap().to_string();
    let expected = ("2500".to_owned(), 413);
    assert_eq!(
        retry_and_large_publish(&[], &[]).await,
        ("1000".to_owned(), 200)
    );
    let flags = ["--sse-retry", "2500ms", "--max-message-size", "1KiB"];
    assert_eq!(
        retry_and_large_publish(&flags, &[]).await,
        expected,
        "flags"
    );
    let env = [
        ("RELAY_SSE_RETRY", "2500ms"),
        ("RELAY_MAX_MESSAGE_SIZE", "1KiB"),
    ];
    assert_eq!(retry_and_large_publish(&[], &env).await, expected, "env");
    let cfg = ["--config", f.as_str()];
    assert_eq!(retry_and_large_publish(&cfg, &[]).await, expected, "file");
    let _ = std::fs::remove_file(&file);
}

/// `relay serve ARGS` must exit with 2 and a `relay: …` line containing each of `words`.
fn assert_refused_at_start(args: &[&str], words: &[&str]) {
    let mut full = vec!["serve", "--listen", "127.0.0.1:0"];
    full.extend_from_slice(args);
    let out = run_bin(&full, &[], Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "relay {args:?}: {out:?}");
    assert!(
        out.stdout.is_empty(),
        "relay {args:?} must not listen: {out:?}"
    );
    for word in words {
        assert!(
            stderr.contains(word),
            "relay {args:?}: stderr lacks {word:?}: {stderr}"
        );
    }
}

#[test]
fn a_bad_key_or_certificate_file_stops_the_start() {
    let garbage = temp_config("garbage-pem", "not a PEM file\n");
    let g = garbage.to_str().unwrap();
    assert_refused_at_start(
        &["--jwt-public-key", "/nonexistent/relay-key.pem"],
        &["relay: invalid jwt", "/nonexistent/relay-key.pem"],
    );
    assert_refused_at_start(
        &["--jwt-public-key", g],
        &[
            "relay: invalid jwt",
            g,
            "not an RSA, EC or Ed25519 public key",
        ],
    );
    assert_refused_at_start(
        &["--tls-cert", g, "--tls-key", g],
        &["relay: invalid tls", g],
    );
    assert_refused_at_start(
        &["--tls-cert", "/nonexistent/cert.pem", "--tls-key", g],
        &["relay: invalid tls", "/nonexistent/cert.pem"],
    );
    let _ = std::fs::remove_file(&garbage);
}

#[test]
fn a_mistake_in_the_file_stops_the_start_and_is_named() {
    let typo = temp_config("typo", "histroy_size = 3\n");
    let t = typo.to_str().unwrap();
    assert_refused_at_start(&["--config", t], &["histroy_size", "no such setting"]);
    // Even when a flag overrides the key, a bad value in the file is refused.
    let bad = temp_config("badvalue", "max_message_size = \"12 parsecs\"\n");
    let b = bad.to_str().unwrap();
    assert_refused_at_start(
        &["--config", b, "--max-message-size", "1KiB"],
        &["max_message_size", "parsecs"],
    );
    let _ = std::fs::remove_file(&typo);
    let _ = std::fs::remove_file(&bad);
}
