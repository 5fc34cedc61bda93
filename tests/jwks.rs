//! JWKS against the real binary: RS256 tokens signed with real RSA keys (made by `openssl
//! genrsa`), verified with keys fetched by `kid` from a local JWKS server; a new key is
//! accepted and a removed one refused after the refresh, without a restart; `aud` and `iss`
//! are checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::Relay;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// A fresh 2048-bit RSA key: its PEM private key and its JWK (public) with `kid`.
fn rsa_key(kid: &str) -> (Vec<u8>, Value) {
    let pem = Command::new("openssl")
        .args(["genrsa", "2048"])
        .output()
        .expect("openssl genrsa");
    assert!(pem.status.success(), "{pem:?}");
    let dir = std::env::temp_dir().join(format!("relay-jwks-{}-{kid}", std::process::id()));
    std::fs::write(&dir, &pem.stdout).unwrap();
    let modulus = Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&dir)
        .output()
        .expect("openssl rsa -modulus");
    let _ = std::fs::remove_file(&dir);
    let text = String::from_utf8(modulus.stdout).unwrap();
    let hex = text.trim().strip_prefix("Modulus=").unwrap();
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = json!({"kty":"RSA","kid":kid,"use":"sig","alg":"RS256","n":b64.encode(n),"e":"AQAB"});
    (pem.stdout, jwk)
}

fn token(pem: &[u8], kid: &str, claims: Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.to_owned());
    encode(&h, &claims, &EncodingKey::from_rsa_pem(pem).unwrap()).unwrap()
}

fn claims(aud: &str) -> Value {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    json!({"sub":"alice","exp":exp,"aud":aud,"iss":"https://idp.test","channels":{"history":["*"]}})
}

/// A local JWKS server whose document the test swaps.
async fn jwks_server(doc: Arc<Mutex<Value>>) -> String {
    let base =
        common::serve_http(move |_, _| (200, bytes::Bytes::from(doc.lock().unwrap().to_string())))
            .await;
    format!("{base}/.well-known/jwks.json")
}

/// The status of a history read with `token` as bearer.
async fn status_with(relay: &Relay, token: &str) -> u16 {
    common::http_client()
        .get(relay.http("/api/history/x"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls until a read with `token` answers `want` (at most 10 s).
async fn wait_status(relay: &Relay, token: &str, want: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = status_with(relay, token).await;
        if s == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {s}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_without_a_restart() {
    let (pem1, jwk1) = rsa_key("k1");
    let (pem2, jwk2) = rsa_key("k2");
    let doc = Arc::new(Mutex::new(json!({ "keys": [jwk1.clone()] })));
    let url = jwks_server(doc.clone()).await;
    let relay = Relay::start(&[
        "--jwt-jwks-url",
        &url,
        "--jwt-jwks-refresh",
        "1s",
        "--jwt-audience",
        "relay",
        "--jwt-issuer",
        "https://idp.test",
    ]);
    let t1 = token(&pem1, "k1", claims("relay"));
    let t2 = token(&pem2, "k2", claims("relay"));
    // Fetched at start: the first token verifies at once.
    assert_eq!(status_with(&relay, &t1).await, 200);
    // Checks still apply: wrong audience, a k2 token claiming k1, no token.
    assert_eq!(
        status_with(&relay, &token(&pem1, "k1", claims("other"))).await,
        401
    );
    assert_eq!(
        status_with(&relay, &token(&pem2, "k1", claims("relay"))).await,
        401
    );
    // k2 is not published yet.
    assert_eq!(status_with(&relay, &t2).await, 401);

    // Rotation: k2 added, then k1 removed.
    *doc.lock().unwrap() = json!({ "keys": [jwk1, jwk2.clone()] });
    wait_status(&relay, &t2, 200).await;
    assert_eq!(status_with(&relay, &t1).await, 200);
    *doc.lock().unwrap() = json!({ "keys": [jwk2] });
    wait_status(&relay, &t1, 401).await;
    assert_eq!(status_with(&relay, &t2).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_jwks_url_is_refused_at_start() {
    let out = common::run_bin(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--jwt-jwks-url",
            "ftp://x/jwks",
        ],
        &[],
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jwt_jwks_url"), "{err}");
}
