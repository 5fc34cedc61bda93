//! Shared helpers for relay's black-box integration tests.
//!
//! A test starts the real server, in this process on port 0 ([`Relay::in_process`], on
//! `relay::server::start_on`) or as the `relay` binary ([`Relay::start`]: for what only a
//! process shows: the CLI, signals, exit codes, stdout/stderr, RSS, process-wide metrics), and
//! talks to it over loopback only:
//! WebSocket (tokio-tungstenite, or a hand-rolled raw client for protocol violations),
//! SSE (reqwest byte stream) and the HTTP API (reqwest). Every receive has a timeout so a
//! server bug fails the test instead of hanging it.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Default timeout for a single receive (frame, event, response).
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the binary gets to print its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

pub const BIN: &str = env!("CARGO_BIN_EXE_relay");

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

/// Runs `test` against `relay serve --shards 1 <extra>` served on this test's own runtime
/// (`relay::server::run_here`), then stops the server. Under `#[tokio::test(start_paused =
/// true)]` the test's clock is the server's: its timers, the sessions' deadlines and the
/// engine's (presence expiry, history and channel TTL, rate buckets) follow the paused clock,
/// which jumps ahead whenever everything waits, so a test asserts a 30 s timeout to the
/// millisecond without waiting for it.
pub async fn paused<F, Fut>(extra: &[&str], test: F)
where
    F: FnOnce(Relay) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback port 0");
    let addr = listener.local_addr().expect("its address");
    let config = relay::config::Config::from_args(extra.iter().copied())
        .unwrap_or_else(|e| panic!("settings {extra:?}: {e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = relay::server::run_here(config, listener, async {
        let _ = stopped.await;
    });
    let relay = Relay {
        server: Server::Here,
        addr,
        client: http_client(),
        api_key: None,
        exited: None,
    };
    let client = async move {
        test(relay).await;
        let _ = stop.send(());
    };
    let (served, ()) = tokio::join!(server, client);
    served.expect("the server ran");
}

/// A running relay: a `relay serve` child process (killed with SIGKILL and reaped on drop) or
/// a server in this process (shut down on drop).
pub struct Relay {
    server: Server,
    addr: SocketAddr,
    client: reqwest::Client,
    api_key: Option<String>,
    exited: Option<ExitStatus>,
}

fn base_command() -> Command {
    let mut cmd = Command::new(BIN);
    // Keep the caller's environment from leaking configuration into the server.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RELAY_") {
            cmd.env_remove(k);
        }
    }
    // Quiet servers unless the caller asks for logs (RUST_LOG=info cargo test ...).
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    cmd
}

enum Server {
    Process(Child),
    InProcess(relay::server::ServerHandle),
    /// Served on the test's own runtime by [`paused`], which stops it.
    Here,
}

impl Relay {
    /// A server in this process with the settings of `relay serve --shards 2 <extra>` (no
    /// environment, no file), its two shards listening on one loopback port picked by the
    /// system. Its metrics recorder is the process's, shared by every in-process server of the
    /// test binary: tests that count metrics, read the logs or signal the server use
    /// [`Relay::start`].
    pub fn in_process(extra: &[&str]) -> Relay {
        let shards: usize = extra
            .iter()
            .position(|a| *a == "--shards")
            .and_then(|i| extra.get(i + 1))
            .map_or(2, |n| n.parse().expect("--shards N"));
        let config = relay::config::Config::from_args(extra.iter().copied())
            .unwrap_or_else(|e| panic!("settings {extra:?}: {e}"));
        let listeners = relay::server::listener::bind_shards(
            "127.0.0.1:0".parse().expect("loopback address"),
            shards,
        )
        .expect("bind loopback port 0");
        let handle = relay::server::start_on(config, listeners).expect("start the server");
        Relay {
            addr: handle.local_addr(),
            server: Server::InProcess(handle),
            client: http_client(),
            api_key: None,
            exited: None,
        }
    }

    /// `relay serve --listen 127.0.0.1:0 --shards 2 <extra>`.
    pub fn start(extra: &[&str]) -> Relay {
        Relay::start_with(extra, &[])
    }

    /// Like [`Relay::start`], with extra environment variables for the child.
    pub fn start_with(extra: &[&str], envs: &[(&str, &str)]) -> Relay {
        let mut cmd = base_command();
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        if !extra.contains(&"--shards") {
            cmd.args(["--shards", "2"]);
        }
        cmd.args(extra)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn relay binary");
        let stdout = child.stdout.take().expect("child stdout");

        // A thread forwards stdout lines, and keeps draining stdout after the listening line so
        // the server never writes into a closed pipe.
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = tx.send(line.clone());
                    }
                }
            }
        });

        let deadline = std::time::Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        let addr = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let trimmed = line.trim_end_matches(['\r', '\n']);
                    if let Some(rest) = trimmed
                        .strip_prefix("listening on http://")
                        .or_else(|| trimmed.strip_prefix("listening on https://"))
                    {
                        let addr: SocketAddr = rest
                            .parse()
                            .unwrap_or_else(|e| panic!("bad listening address {rest:?}: {e}"));
                        break addr;
                    }
                    seen.push(trimmed.to_string());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "relay did not print `listening on http://...` within {START_TIMEOUT:?}; \
                         stdout so far: {seen:?}"
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.kill();
                    let status = child.wait();
                    panic!(
                        "relay closed stdout before printing the listening line \
                         (status {status:?}); stdout: {seen:?}"
                    );
                }
            }
        };
        assert_eq!(
            addr.ip().to_string(),
            "127.0.0.1",
            "listening line must name the loopback address"
        );
        assert_ne!(addr.port(), 0, "listening line must carry the bound port");

        Relay {
            server: Server::Process(child),
            addr,
            client: http_client(),
            api_key: None,
            exited: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `ws://127.0.0.1:PORT/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn child(&mut self) -> &mut Child {
        match &mut self.server {
            Server::Process(child) => child,
            Server::InProcess(_) | Server::Here => {
                panic!("an in-process relay has no process: use Relay::start")
            }
        }
    }

    pub fn pid(&self) -> u32 {
        match &self.server {
            Server::Process(child) => child.id(),
            Server::InProcess(_) | Server::Here => {
                panic!("an in-process relay has no process: use Relay::start")
            }
        }
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Use this bearer key on every `/api/*` helper call.
    pub fn set_api_key(&mut self, key: &str) {
        self.api_key = Some(key.to_string());
    }

    /// Send a signal (`TERM`, `INT`, ...) to the child with `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed: {status:?}");
    }

    /// Wait (without blocking the runtime) for the child to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exited {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child().try_wait().expect("try_wait") {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM: every one of `clients` gets its close 1012, then the relay exits cleanly
    /// within 6 s.
    pub async fn terminate_expecting_1012(&mut self, clients: Vec<Ws>) {
        self.signal("TERM");
        for mut ws in clients {
            assert_eq!(ws.expect_close().await, 1012);
        }
        let status = self
            .wait_exit(Duration::from_secs(6))
            .await
            .expect("the relay exits");
        assert!(status.success(), "{status:?}");
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => rb.header("authorization", format!("Bearer {k}")),
            None => rb,
        }
    }

    /// GET `path`, returning status and parsed JSON body (or the raw text as a JSON string).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let rb = self.authed(self.client.get(self.http(path)));
        read_resp(rb.send().await.expect("GET request")).await
    }

    /// POST a JSON body to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let rb = self.authed(self.client.post(self.http(path)).json(body));
        read_resp(rb.send().await.expect("POST request")).await
    }

    /// POST raw bytes (declared as JSON) to `path`.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let rb = self.authed(
            self.client
                .post(self.http(path))
                .header("content-type", "application/json")
                .body(body),
        );
        read_resp(rb.send().await.expect("POST request")).await
    }

    /// `POST /api/publish`, asserting 200 and the response shape. Returns the response body.
    pub async fn publish(&self, channel: &str, data: Value) -> Value {
        let (status, body) = self
            .post("/api/publish", &json!({"channel": channel, "data": data}))
            .await;
        assert_eq!(status, 200, "publish to {channel:?} failed: {body}");
        assert_eq!(body["channel"], json!(channel), "publish reply: {body}");
        assert!(body["seq"].is_u64(), "publish reply without seq: {body}");
        assert_epoch(&body["epoch"]);
        body
    }

    /// `POST /api/publish`, returning the assigned seq.
    pub async fn publish_seq(&self, channel: &str, data: Value) -> u64 {
        self.publish(channel, data).await["seq"].as_u64().unwrap()
    }

    /// `GET /api/history/{channel}{query}` asserting 200.
    pub async fn history(&self, channel: &str, query: &str) -> Value {
        let (status, body) = self.get(&format!("/api/history/{channel}{query}")).await;
        assert_eq!(status, 200, "history of {channel:?} failed: {body}");
        body
    }

    /// `GET /api/channels` entry for `channel`, if listed.
    pub async fn channel_info(&self, channel: &str) -> Option<Value> {
        let (status, body) = self.get("/api/channels").await;
        assert_eq!(status, 200, "/api/channels failed: {body}");
        body["channels"]
            .as_array()
            .unwrap_or_else(|| panic!("/api/channels without array: {body}"))
            .iter()
            .find(|c| c["channel"] == json!(channel))
            .cloned()
    }

    /// Waits (10 s at most) until the metric `name` reads `want`; panics otherwise.
    pub async fn wait_metric(&self, name: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.metric(name).await;
            if n == want {
                return;
            }
            assert!(Instant::now() < deadline, "{name} is {n}, never {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Poll `/api/channels` until `channel` reports `want` subscribers (or time out).
    pub async fn wait_subscribers(&self, channel: &str, want: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.channel_info(channel).await;
            let n = info
                .as_ref()
                .and_then(|i| i["subscribers"].as_u64())
                .unwrap_or(0);
            if n == want {
                return;
            }
            if Instant::now() >= deadline {
                panic!("{channel:?} never reached {want} subscribers; last: {info:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        match &mut self.server {
            // std's Child::kill sends SIGKILL on Unix.
            Server::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            // The shards shut down on their threads; the test need not wait for them.
            Server::InProcess(handle) => handle.shutdown(),
            Server::Here => {}
        }
    }
}

impl Relay {
    /// The `/metrics` text.
    pub async fn scrape(&self) -> String {
        let resp = self
            .client()
            .get(self.http("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(resp.status().as_u16(), 200);
        resp.text().await.expect("metrics body")
    }

    /// The value of the sample `name` (with its labels, as written, e.g.
    /// `relay_memory_bytes{kind="history"}`); 0 when the sample is absent (a counter never
    /// incremented).
    pub async fn metric(&self, name: &str) -> f64 {
        sample(&self.scrape().await, name).unwrap_or(0.0)
    }

    /// The child's resident set size, KiB (`VmRSS` in `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> u64 {
        self.proc_status("VmRSS")
    }

    /// A numeric field of the child's `/proc/<pid>/status` (`VmRSS` in KiB, `FDSize`, …).
    pub fn proc_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }
}

/// The value of the sample `name` in a Prometheus text, if present.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("a number"))
}

/// Run the binary with `args` (no `serve` prefix added) to completion, killing it after
/// `timeout`. Returns its output; panics on timeout.
pub fn run_bin(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Output {
    let mut child = base_command()
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay binary");
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("collect output");
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output();
            panic!("relay {args:?} did not exit within {timeout:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the binary with `args`, returns the first `n` lines it prints on stdout (fewer if it
/// prints fewer within [`START_TIMEOUT`]), and kills it.
pub fn first_stdout_lines(args: &[&str], n: usize) -> Vec<String> {
    let mut child = base_command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn relay binary");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().take(n) {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    let mut lines = Vec::new();
    while lines.len() < n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

/// An HS256 token signed with `secret` for user `sub`, valid five more minutes, with the
/// `channels` grants (e.g. `{"subscribe": ["*"]}`).
pub fn hs256_token(secret: &str, sub: &str, channels: Value) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp, "channels": channels}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A reqwest client for loopback API calls: no proxy, bounded per request.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        // The server may close a keep-alive connection that idles past its handshake timeout
        // (some tests set it to 1-2 s); never reuse one that could be closing under us.
        .pool_idle_timeout(Duration::from_millis(500))
        .build()
        .expect("build reqwest client")
}

/// Status plus JSON body (raw text as a JSON string if it does not parse).
pub async fn read_resp(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = tokio::time::timeout(RECV_TIMEOUT, resp.text())
        .await
        .expect("response body within timeout")
        .unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// Sends a request; its status and JSON body (see [`read_resp`]).
pub async fn send(rb: reqwest::RequestBuilder) -> (u16, Value) {
    read_resp(rb.send().await.expect("request")).await
}

/// `relay_refused_total{cause}` in Prometheus text (see [`Relay::scrape`]); 0 when absent.
pub fn refused_count(text: &str, cause: &str) -> u64 {
    sample(text, &format!("relay_refused_total{{cause=\"{cause}\"}}")).unwrap_or(0.0) as u64
}

/// Reads until the peer closes (EOF or reset) within `d`: the bytes read, or `None` if it is
/// still open then.
pub async fn read_until_closed(s: &mut TcpStream, d: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + d;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `request` on `s` and reads the response head (status line and headers).
pub async fn head_of(s: &mut TcpStream, request: &str) -> String {
    s.write_all(request.as_bytes()).await.unwrap();
    let deadline = Instant::now() + RECV_TIMEOUT;
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return String::from_utf8_lossy(&buf[..end]).into_owned();
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            r => panic!(
                "no response head ({r:?}); got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
}

/// `GET path` with extra headers: status, `Retry-After`, body.
pub async fn api_get(relay: &Relay, path: &str, headers: &[(&str, &str)]) -> (u16, Option<u64>) {
    let mut rb = relay.client().get(relay.http(path));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let status = r.status().as_u16();
    if status == 429 {
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    }
    (status, retry)
}

/// Assert an HTTP error response: `status` and `{"error":{"code":code,"message":"…"}}`.
pub fn assert_http_error(resp: &(u16, Value), status: u16, code: &str) {
    let (s, body) = resp;
    assert_eq!(*s, status, "expected HTTP {status} {code}, got {s}: {body}");
    assert_eq!(
        body["error"]["code"],
        json!(code),
        "error code mismatch in {body}"
    );
    assert!(
        body["error"]["message"].is_string(),
        "error body lacks a message: {body}"
    );
}

/// Assert an epoch is a short lowercase hex string; return it.
pub fn assert_epoch(v: &Value) -> String {
    let e = v
        .as_str()
        .unwrap_or_else(|| panic!("epoch is not a string: {v}"));
    assert!(
        !e.is_empty() && e.len() <= 32,
        "epoch should be a short string: {e:?}"
    );
    assert!(
        e.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "epoch should be lowercase hex: {e:?}"
    );
    e.to_string()
}

// ---------------------------------------------------------------------------------------------
// WebSocket client (tokio-tungstenite)
// ---------------------------------------------------------------------------------------------

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub struct Ws {
    pub inner: WsStream,
}

impl Ws {
    pub async fn connect(url: &str) -> Ws {
        let (inner, resp) =
            tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(url))
                .await
                .unwrap_or_else(|_| panic!("WebSocket connect to {url} timed out"))
                .unwrap_or_else(|e| panic!("WebSocket connect to {url} failed: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        Ws { inner }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, s: &str) {
        self.send_msg(Message::Text(s.to_string().into())).await;
    }

    pub async fn send_msg(&mut self, m: Message) {
        tokio::time::timeout(RECV_TIMEOUT, self.inner.send(m))
            .await
            .expect("WebSocket send timed out")
            .expect("WebSocket send failed");
    }

    /// The raw text of the next text frame within 5 s (pings and pongs skipped).
    pub async fn recv_text(&mut self) -> String {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => panic!("no WebSocket frame within {RECV_TIMEOUT:?}"),
                Ok(Some(Ok(Message::Text(t)))) => return t.as_str().to_string(),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Next JSON text frame within 5 s (pings and pongs skipped). Panics otherwise.
    pub async fn recv_json(&mut self) -> Value {
        match self.recv_json_within(RECV_TIMEOUT).await {
            Some(v) => v,
            None => panic!("no WebSocket frame within {RECV_TIMEOUT:?}"),
        }
    }

    /// Next JSON text frame within `d`, or `None` on timeout. Panics on close or error.
    pub async fn recv_json_within(&mut self, d: Duration) -> Option<Value> {
        let deadline = Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => return None,
                Ok(None) => panic!("WebSocket stream ended while waiting for a frame"),
                Ok(Some(Err(e))) => panic!("WebSocket error while waiting for a frame: {e}"),
                Ok(Some(Ok(msg))) => match msg {
                    Message::Text(t) => {
                        let s = t.as_str();
                        return Some(
                            serde_json::from_str(s)
                                .unwrap_or_else(|e| panic!("server sent non-JSON {s:?}: {e}")),
                        );
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                    Message::Binary(b) => panic!("unexpected binary frame ({} bytes)", b.len()),
                    Message::Close(f) => {
                        panic!("unexpected close while waiting for a frame: {f:?}")
                    }
                },
            }
        }
    }

    /// Close with a close frame and drain until the server's close reply, so the close
    /// handshake completes (a clean end: presence members leave at once).
    pub async fn close_cleanly(mut self) {
        self.inner.close(None).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.inner.next().await {}
        })
        .await;
    }

    /// Wait (5 s) for the server's close frame, skipping data frames; returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        self.expect_close_within(RECV_TIMEOUT).await
    }

    pub async fn expect_close_within(&mut self, d: Duration) -> u16 {
        let deadline = Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => panic!("no close frame within {d:?}"),
                Ok(None) => panic!("WebSocket ended without a close frame"),
                Ok(Some(Err(e))) => panic!("WebSocket error instead of a close frame: {e}"),
                Ok(Some(Ok(Message::Close(Some(f))))) => return u16::from(f.code),
                Ok(Some(Ok(Message::Close(None)))) => return 1005,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Subscribe and return the `subscribed` reply (asserting its shape).
    pub async fn subscribe(&mut self, channel: &str) -> Value {
        self.send_json(json!({"type": "subscribe", "channel": channel}))
            .await;
        let v = self.recv_json().await;
        assert_subscribed(&v, channel);
        v
    }

    /// Resume-subscribe with `since` and `epoch`; returns the `subscribed` reply.
    pub async fn subscribe_resume(&mut self, channel: &str, since: u64, epoch: &str) -> Value {
        self.send_json(
            json!({"type": "subscribe", "channel": channel, "since": since, "epoch": epoch}),
        )
        .await;
        let v = self.recv_json().await;
        assert_subscribed(&v, channel);
        v
    }

    /// Receive a `message` frame for `channel` with exactly `seq`; returns its `data`.
    pub async fn expect_message(&mut self, channel: &str, seq: u64) -> Value {
        let v = self.recv_json().await;
        assert_eq!(v["type"], "message", "expected message seq {seq}, got {v}");
        assert_eq!(v["channel"], json!(channel), "wrong channel in {v}");
        assert_eq!(v["seq"], json!(seq), "expected seq {seq}, got {v}");
        assert!(v.get("data").is_some(), "message without data: {v}");
        v["data"].clone()
    }

    /// Send a command and expect an `error` frame with `code` (and `id` echoed if given).
    pub async fn expect_error_for(&mut self, frame: &str, code: &str, id: Option<Value>) {
        self.send_text(frame).await;
        let v = self.recv_json().await;
        assert_eq!(
            v["type"], "error",
            "expected error {code} for {frame}, got {v}"
        );
        assert_eq!(v["code"], json!(code), "for {frame}: {v}");
        assert!(v["message"].is_string(), "error without message: {v}");
        if let Some(id) = id {
            assert_eq!(v["id"], id, "error must echo id for {frame}: {v}");
        }
    }
}

pub fn assert_subscribed(v: &Value, channel: &str) {
    assert_eq!(v["type"], "subscribed", "expected subscribed, got {v}");
    assert_eq!(v["channel"], json!(channel), "wrong channel in {v}");
    assert!(v["seq"].is_u64(), "subscribed without seq: {v}");
    assert!(
        v["recovered"].is_boolean(),
        "subscribed without recovered: {v}"
    );
    assert_epoch(&v["epoch"]);
}

// ---------------------------------------------------------------------------------------------
// SSE client (reqwest byte stream)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {:?}", self.data))
    }
}

#[derive(Debug)]
pub enum SseNext {
    Event(SseEvent),
    End,
    Timeout,
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Vec<u8>, String>> + Send>>;

pub struct Sse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    stream: ByteStream,
    buf: Vec<u8>,
    /// Every raw line seen (without line terminator), in order.
    pub raw_lines: Vec<String>,
    /// Comment lines (starting with `:`), verbatim.
    pub comments: Vec<String>,
    /// Values of `retry:` fields.
    pub retries: Vec<String>,
    ended: bool,
    // event being assembled
    cur_id: Option<String>,
    cur_event: Option<String>,
    cur_data: Option<String>,
}

/// A client for streams: no total timeout (each read is bounded instead), no proxy.
pub fn stream_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(RECV_TIMEOUT)
        .build()
        .expect("build reqwest client")
}

impl Sse {
    /// Send the GET and return the raw response (for error-status checks).
    pub async fn request(url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut rb = stream_client().get(url);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        tokio::time::timeout(RECV_TIMEOUT, rb.send())
            .await
            .unwrap_or_else(|_| panic!("SSE response headers for {url} within {RECV_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("SSE request to {url} failed: {e}"))
    }

    pub async fn connect(url: &str) -> Sse {
        Sse::connect_with(url, &[]).await
    }

    /// Open the stream, asserting 200 and `text/event-stream`.
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Sse {
        let resp = Sse::request(url, headers).await;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = read_resp(resp).await.1;
            panic!("SSE {url} answered {status}: {body}");
        }
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(
            ct.starts_with("text/event-stream"),
            "SSE content-type is {ct:?}"
        );
        Sse::from_response(resp)
    }

    /// A stream over an already opened response (any client, e.g. HTTPS or HTTP/2).
    pub fn from_response(resp: reqwest::Response) -> Sse {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let stream = resp
            .bytes_stream()
            .map(|r| r.map(|b| b.to_vec()).map_err(|e| e.to_string()));
        Sse {
            status,
            headers,
            stream: Box::pin(stream),
            buf: Vec::new(),
            raw_lines: Vec::new(),
            comments: Vec::new(),
            retries: Vec::new(),
            ended: false,
            cur_id: None,
            cur_event: None,
            cur_data: None,
        }
    }

    /// Process one complete line; returns an event when a blank line dispatches one.
    fn line(&mut self, line: String) -> Option<SseEvent> {
        self.raw_lines.push(line.clone());
        if line.is_empty() {
            if self.cur_id.is_none() && self.cur_event.is_none() && self.cur_data.is_none() {
                return None;
            }
            let ev = SseEvent {
                id: self.cur_id.take(),
                event: self
                    .cur_event
                    .take()
                    .unwrap_or_else(|| "message".to_string()),
                data: self.cur_data.take().unwrap_or_default(),
            };
            return Some(ev);
        }
        if line.starts_with(':') {
            self.comments.push(line);
            return None;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line.as_str(), ""),
        };
        match field {
            "data" => match &mut self.cur_data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.cur_data = Some(value.to_string()),
            },
            "event" => self.cur_event = Some(value.to_string()),
            "id" => self.cur_id = Some(value.to_string()),
            "retry" => self.retries.push(value.to_string()),
            _ => {}
        }
        None
    }

    /// Next event within `d`.
    pub async fn next_within(&mut self, d: Duration) -> SseNext {
        let deadline = Instant::now() + d;
        loop {
            // Complete lines already buffered?
            while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut raw: Vec<u8> = self.buf.drain(..=pos).collect();
                raw.pop();
                if raw.last() == Some(&b'\r') {
                    raw.pop();
                }
                let line = String::from_utf8(raw).expect("SSE stream is not UTF-8");
                if let Some(ev) = self.line(line) {
                    return SseNext::Event(ev);
                }
            }
            if self.ended {
                return SseNext::End;
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return SseNext::Timeout,
                Ok(None) | Ok(Some(Err(_))) => {
                    self.ended = true;
                }
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
            }
        }
    }

    /// Next event within 5 s; panics on end of stream or timeout.
    pub async fn next_event(&mut self) -> SseEvent {
        match self.next_within(RECV_TIMEOUT).await {
            SseNext::Event(e) => e,
            SseNext::End => panic!("SSE stream ended while waiting for an event"),
            SseNext::Timeout => panic!("no SSE event within {RECV_TIMEOUT:?}"),
        }
    }

    /// Next event, asserting its type is `event`.
    pub async fn expect_event(&mut self, event: &str) -> SseEvent {
        let ev = self.next_event().await;
        assert_eq!(ev.event, event, "expected `{event}` event, got {ev:?}");
        ev
    }

    /// Next event must be a message for `channel` with `seq`; returns the event.
    pub async fn expect_message(&mut self, channel: &str, seq: u64) -> SseEvent {
        let ev = self.expect_event("message").await;
        let v = ev.json();
        assert_eq!(v["channel"], json!(channel), "wrong channel in {ev:?}");
        assert_eq!(v["seq"], json!(seq), "expected seq {seq} in {ev:?}");
        assert!(v.get("data").is_some(), "message without data: {ev:?}");
        ev
    }

    /// True if the stream ends within `d` (events before the end are discarded).
    pub async fn expect_end(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                SseNext::End => return true,
                SseNext::Timeout => return false,
                SseNext::Event(_) => continue,
            }
        }
    }

    /// Wait until a comment line equal to `text` has been seen (reading events meanwhile).
    pub async fn wait_comment(&mut self, text: &str, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            if self.comments.iter().any(|c| c == text) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.next_within(left).await {
                SseNext::End => return self.comments.iter().any(|c| c == text),
                SseNext::Timeout => return self.comments.iter().any(|c| c == text),
                SseNext::Event(_) => continue,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket over TcpStream (hand-made handshake and frames)
// ---------------------------------------------------------------------------------------------

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

#[derive(Debug, Clone)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Close code of a close frame (1005 if the payload is empty).
    pub fn close_code(&self) -> u16 {
        assert_eq!(self.opcode, OP_CLOSE, "not a close frame: {self:?}");
        if self.payload.len() >= 2 {
            u16::from_be_bytes([self.payload[0], self.payload[1]])
        } else {
            1005
        }
    }
}

#[derive(Debug)]
pub enum RawRead {
    Frame(Frame),
    Eof,
    Timeout,
}

/// Encode one frame. `mask: Some(..)` masks the payload (as a client must).
pub fn encode_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(((fin as u8) << 7) | ((rsv & 0x7) << 4) | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= 0xffff {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// The RFC 6455 sample key and its accept value.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

impl RawWs {
    pub async fn connect(addr: SocketAddr) -> RawWs {
        let stream = tokio::time::timeout(RECV_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect");
        RawWs::handshake(stream, addr, "").await.0
    }

    /// Connect with `extra` header lines (each ending in `\r\n`) in the handshake; returns the
    /// response head too.
    pub async fn connect_with(addr: SocketAddr, extra: &str) -> (RawWs, String) {
        let stream = tokio::time::timeout(RECV_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect");
        RawWs::handshake(stream, addr, extra).await
    }

    /// Connect with a small receive buffer (set before connecting, so the window stays small).
    pub async fn connect_with_rcvbuf(addr: SocketAddr, rcvbuf: u32) -> RawWs {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let stream = tokio::time::timeout(RECV_TIMEOUT, sock.connect(addr))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect");
        RawWs::handshake(stream, addr, "").await.0
    }

    /// The handshake request bytes for `/ws`.
    pub fn handshake_request(addr: SocketAddr) -> String {
        format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    }

    async fn handshake(mut stream: TcpStream, addr: SocketAddr, extra: &str) -> (RawWs, String) {
        let mut request = RawWs::handshake_request(addr);
        request.insert_str(request.len() - 2, extra);
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write handshake");
        let mut buf = Vec::new();
        let deadline = Instant::now() + RECV_TIMEOUT;
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                .await
                .expect("handshake response timed out")
                .expect("read handshake response");
            assert!(
                n > 0,
                "server closed during handshake; got {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let status_line = head.lines().next().unwrap_or("");
        assert!(
            status_line.starts_with("HTTP/1.1 101"),
            "handshake not switched: {head:?}"
        );
        let accept = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|(_, v)| v.trim().to_string());
        assert_eq!(accept.as_deref(), Some(WS_ACCEPT), "bad accept in {head:?}");
        let rest = buf[end..].to_vec();
        (RawWs { stream, buf: rest }, head)
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        tokio::time::timeout(RECV_TIMEOUT, self.stream.write_all(bytes))
            .await
            .expect("raw write timed out")
            .expect("raw write");
    }

    /// Send a masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let f = encode_frame(fin, 0, opcode, payload, Some(MASK));
        self.send_raw(&f).await;
    }

    /// Send a masked, final text frame.
    pub async fn send_text(&mut self, s: &str) {
        self.send_frame(true, OP_TEXT, s.as_bytes()).await;
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    async fn fill(&mut self, n: usize, deadline: Instant) -> Result<(), RawRead> {
        while self.buf.len() < n {
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(RawRead::Timeout),
                Ok(Err(_)) | Ok(Ok(0)) => return Err(RawRead::Eof),
                Ok(Ok(k)) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
        Ok(())
    }

    /// Read one frame within `d`. `Eof` covers a clean close, a reset, or EOF mid-frame.
    pub async fn read_frame(&mut self, d: Duration) -> RawRead {
        let deadline = Instant::now() + d;
        if let Err(e) = self.fill(2, deadline).await {
            return e;
        }
        let b0 = self.buf[0];
        let b1 = self.buf[1];
        let masked = b1 & 0x80 != 0;
        let mut len = (b1 & 0x7f) as u64;
        let mut hdr = 2usize;
        if len == 126 {
            if let Err(e) = self.fill(4, deadline).await {
                return e;
            }
            len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as u64;
            hdr = 4;
        } else if len == 127 {
            if let Err(e) = self.fill(10, deadline).await {
                return e;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.buf[2..10]);
            len = u64::from_be_bytes(b);
            hdr = 10;
        }
        let mask_at = hdr;
        if masked {
            hdr += 4;
        }
        let total = hdr + len as usize;
        if let Err(e) = self.fill(total, deadline).await {
            return e;
        }
        let mut payload = self.buf[hdr..total].to_vec();
        if masked {
            let m = [
                self.buf[mask_at],
                self.buf[mask_at + 1],
                self.buf[mask_at + 2],
                self.buf[mask_at + 3],
            ];
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i % 4];
            }
        }
        self.buf.drain(..total);
        RawRead::Frame(Frame {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x7,
            opcode: b0 & 0x0f,
            masked,
            payload,
        })
    }

    /// Read frames until a close frame (returns its code) or EOF (returns `None`), within `d`.
    /// Data, ping and pong frames are skipped. Panics on timeout.
    /// The close frame's code and reason, or `None` if the connection ended without one.
    pub async fn expect_close_frame(&mut self, d: Duration) -> Option<(u16, String)> {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left).await {
                RawRead::Frame(f) if f.opcode == OP_CLOSE => {
                    let reason = String::from_utf8_lossy(f.payload.get(2..).unwrap_or(&[]));
                    return Some((f.close_code(), reason.into_owned()));
                }
                RawRead::Frame(_) => continue,
                RawRead::Eof => return None,
                RawRead::Timeout => panic!("no close frame within {d:?}"),
            }
        }
    }

    pub async fn expect_close_code(&mut self, d: Duration) -> Option<u16> {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left).await {
                RawRead::Frame(f) if f.opcode == OP_CLOSE => {
                    assert!(!f.masked, "server frames must not be masked");
                    return Some(f.close_code());
                }
                RawRead::Frame(_) => continue,
                RawRead::Eof => return None,
                RawRead::Timeout => {
                    panic!("connection neither closed nor sent a close frame within {d:?}")
                }
            }
        }
    }

    /// Next text frame as JSON within 5 s (pings/pongs skipped). Panics otherwise.
    pub async fn recv_json(&mut self) -> Value {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left).await {
                RawRead::Frame(f) if f.opcode == OP_TEXT => {
                    assert!(f.fin, "unexpected fragmented server frame");
                    assert!(!f.masked, "server frames must not be masked");
                    return serde_json::from_slice(&f.payload).unwrap_or_else(|e| {
                        panic!(
                            "non-JSON text frame ({e}): {:?}",
                            String::from_utf8_lossy(&f.payload)
                        )
                    });
                }
                RawRead::Frame(f) if f.opcode == OP_PING || f.opcode == OP_PONG => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A local HTTP server (webhook receivers, JWKS, backends)
// ---------------------------------------------------------------------------------------------

/// Serves HTTP/1.1 on a loopback port: `answer(headers, body)` gives each request's status and
/// body. Returns `http://127.0.0.1:PORT`. Runs until the test's runtime ends.
pub async fn serve_http<F>(answer: F) -> String
where
    F: Fn(&hyper::HeaderMap, bytes::Bytes) -> (u16, bytes::Bytes) + Send + Sync + 'static,
{
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let answer = answer.clone();
                    async move {
                        let headers = req.headers().clone();
                        let body: hyper::body::Incoming = req.into_body();
                        let body = body.collect().await?.to_bytes();
                        let (status, out) = answer(&headers, body);
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(out))
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
    base
}
