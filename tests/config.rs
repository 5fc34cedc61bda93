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
    for args in [&["--help"][..], &["serve", "--help"][..]] {
        let out = run_bin(args, &[], Duration::from_secs(10));
        assert!(out.status.success(), "relay {args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        for flag in ["--listen", "--history-size", "--api-key"] {
            assert!(
                text.contains(flag),
                "relay {args:?} does not mention {flag}:\n{text}"
            );
        }
    }
    let out = run_bin(&["serve", "--help"], &[], Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
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
