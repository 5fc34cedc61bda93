//! TLS (issue 7): wss:// and https SSE on one port, HTTP/1.1 and h2 by ALPN, and certificate
//! reload on SIGHUP (new connections see the new certificate, open ones stay).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{Relay, Sse};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

struct Cert {
    pem: String,
    der: CertificateDer<'static>,
    key_pem: String,
}

fn cert() -> Cert {
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    Cert {
        pem: c.cert.pem(),
        der: c.cert.der().clone(),
        key_pem: c.key_pair.serialize_pem(),
    }
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("relay-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Files { dir }
    }
    fn write(&self, c: &Cert) {
        std::fs::write(self.dir.join("cert.pem"), &c.pem).unwrap();
        std::fs::write(self.dir.join("key.pem"), &c.key_pem).unwrap();
    }
    fn cert(&self) -> String {
        self.dir.join("cert.pem").to_str().unwrap().to_owned()
    }
    fn key(&self) -> String {
        self.dir.join("key.pem").to_str().unwrap().to_owned()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(files: &Files) -> Relay {
    Relay::start(&["--tls-cert", &files.cert(), "--tls-key", &files.key()])
}

fn https(relay: &Relay, path: &str) -> String {
    format!("https://localhost:{}{path}", relay.addr().port())
}

fn tls_config(roots: &[&Cert]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.der.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
    )
}

async fn tls_connect(relay: &Relay, roots: &[&Cert]) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(relay.addr()).await.unwrap();
    let conn = tokio_rustls::TlsConnector::from(tls_config(roots));
    tokio::time::timeout(
        common::RECV_TIMEOUT,
        conn.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap()
}

type Wss = WebSocketStream<TlsStream<TcpStream>>;

async fn wss(relay: &Relay, roots: &[&Cert]) -> Wss {
    let tls = tls_connect(relay, roots).await;
    let url = format!("wss://localhost:{}/ws", relay.addr().port());
    let (ws, resp) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

async fn send(ws: &mut Wss, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

async fn recv(ws: &mut Wss) -> Value {
    loop {
        let m = tokio::time::timeout(common::RECV_TIMEOUT, ws.next())
            .await
            .expect("frame within timeout")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

async fn publish(
    c: &reqwest::Client,
    relay: &Relay,
    channel: &str,
    data: Value,
) -> reqwest::Version {
    let r = c
        .post(https(relay, "/api/publish"))
        .json(&json!({"channel": channel, "data": data}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.version()
}

/// Resolve `localhost` to the relay's port for reqwest.
fn client_for(relay: &Relay, c: &Cert, http1_only: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .resolve("localhost", relay.addr())
        .add_root_certificate(reqwest::Certificate::from_pem(c.pem.as_bytes()).unwrap())
        .connect_timeout(common::RECV_TIMEOUT);
    if http1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

#[tokio::test]
async fn tls_round_trip_wss_https_sse_and_h2() {
    let files = Files::new("rt");
    let c = cert();
    files.write(&c);
    let relay = start(&files);
    let h2 = client_for(&relay, &c, false);
    let h1 = client_for(&relay, &c, true);

    // HTTPS API over h2 (ALPN) and HTTP/1.1.
    let r = h2.get(https(&relay, "/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let r = h1.get(https(&relay, "/healthz")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);

    // wss:// (HTTP/1.1 upgrade).
    let mut ws = wss(&relay, &[&c]).await;
    send(&mut ws, json!({"type":"subscribe","channel":"t"})).await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");

    // SSE over h2 and over HTTP/1.1, several streams on one h2 connection.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let resp = h2
            .get(https(&relay, "/sse?channel=t"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        streams.push(Sse::from_response(resp));
    }
    let resp = h1
        .get(https(&relay, "/sse?channel=t"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    streams.push(Sse::from_response(resp));
    for s in streams.iter_mut() {
        s.expect_event("subscribed").await;
    }
    assert_eq!(
        publish(&h2, &relay, "t", json!("over tls")).await,
        reqwest::Version::HTTP_2
    );
    let m = recv(&mut ws).await;
    assert_eq!(m["seq"], 1, "{m}");
    assert_eq!(m["data"], "over tls");
    for s in streams.iter_mut() {
        s.expect_message("t", 1).await;
    }

    // Plain HTTP on the TLS port does not get through.
    let plain = common::http_client()
        .get(relay.http("/healthz"))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status().as_u16() != 200);
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let files = Files::new("reload");
    let (a, b) = (cert(), cert());
    files.write(&a);
    let relay = start(&files);
    let tls = tls_connect(&relay, &[&a, &b]).await;
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], a.der);
    drop(tls);
    let mut old = wss(&relay, &[&a]).await;
    send(&mut old, json!({"type":"subscribe","channel":"r"})).await;
    assert_eq!(recv(&mut old).await["type"], "subscribed");
    let client_a = client_for(&relay, &a, true);
    let mut old_sse = Sse::from_response(
        client_a
            .get(https(&relay, "/sse?channel=r"))
            .send()
            .await
            .unwrap(),
    );
    old_sse.expect_event("subscribed").await;

    // A broken file is refused and the old certificate stays.
    std::fs::write(files.dir.join("cert.pem"), "not a certificate").unwrap();
    relay.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tls = tls_connect(&relay, &[&a, &b]).await;
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], a.der);
    drop(tls);

    files.write(&b);
    relay.signal("HUP");
    let mut seen_b = false;
    for _ in 0..50 {
        let tls = tls_connect(&relay, &[&a, &b]).await;
        if tls.get_ref().1.peer_certificates().unwrap()[0] == b.der {
            seen_b = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen_b, "new connections see the new certificate");
    // A client that trusts only the new certificate gets in; old connections still work.
    let client_b = client_for(&relay, &b, false);
    publish(&client_b, &relay, "r", json!("after reload")).await;
    let m = recv(&mut old).await;
    assert_eq!(m["data"], "after reload", "{m}");
    old_sse.expect_message("r", 1).await;
}

/// Pipelined publishes over TLS (HTTP/1.1 by ALPN) are answered in order by the front, and a
/// WebSocket upgrade after them on the same connection is served by hyper.
#[tokio::test]
async fn pipelined_publishes_over_tls_are_answered_in_order_then_an_upgrade_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let files = Files::new("pipe");
    let c = cert();
    files.write(&c);
    let relay = Relay::start(&[
        "--tls-cert",
        &files.cert(),
        "--tls-key",
        &files.key(),
        "--api-rate-limit",
        "0",
    ]);
    let mut tls = tls_connect(&relay, &[&c]).await;
    const N: usize = 50;
    let mut wire = String::new();
    for i in 0..N {
        let body = json!({"channel": "tp", "data": i}).to_string();
        wire.push_str(&format!(
            "POST /api/publish HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    }
    wire.push_str(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    tls.write_all(wire.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let text = loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if text.contains("HTTP/1.1 101") && text.ends_with("\r\n\r\n") {
            break text;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(common::RECV_TIMEOUT, tls.read(&mut chunk))
            .await
            .expect("answers within the timeout")
            .unwrap();
        assert!(n > 0, "closed: {text}");
        got.extend_from_slice(&chunk[..n]);
    };
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), N, "{text}");
    let seqs: Vec<u64> = text
        .split("\"seq\":")
        .skip(1)
        .map(|s| {
            s.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(
        seqs,
        (1..=N as u64).collect::<Vec<_>>(),
        "answers in request order"
    );
    let mut ws = WebSocketStream::from_raw_socket(
        tls,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    send(&mut ws, json!({"type": "subscribe", "channel": "tp"})).await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    let client = client_for(&relay, &c, true);
    publish(&client, &relay, "tp", json!("live")).await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["seq"].as_u64(), &m["data"]),
        (Some(N as u64 + 1), &json!("live"))
    );
}
