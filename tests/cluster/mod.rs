//! Scenarios shared by the cluster tests (`cluster_redis.rs`, `cluster_nats.rs`): several
//! relay processes on one backplane server, which each test starts on a free loopback port and
//! kills when done.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{Relay, Ws};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

pub mod redis_ha;

/// The backplane server a cluster test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Nats,
}

impl Kind {
    fn program(self) -> &'static str {
        match self {
            Kind::Redis => "redis-server",
            Kind::Nats => "nats-server",
        }
    }

    /// The server binary: on the PATH, or in /usr/sbin (Debian's nats-server).
    fn binary(self) -> Option<String> {
        let name = self.program();
        let on_path = Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if on_path {
            return Some(name.to_owned());
        }
        ["/usr/sbin", "/usr/bin", "/usr/local/bin"]
            .iter()
            .map(|d| format!("{d}/{name}"))
            .find(|p| std::path::Path::new(p).exists())
    }

    /// Whether the test can run: the server is installed. In CI (which installs it through
    /// scripts/test.sh) a missing server fails instead.
    pub fn available(self) -> bool {
        if self.binary().is_some() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is not installed (scripts/test.sh installs it)",
            self.program()
        );
        eprintln!(
            "{} is not installed: skipping (scripts/test.sh installs it)",
            self.program()
        );
        false
    }
}

/// A redis-server or nats-server (JetStream, file storage in a temporary directory) child on a
/// loopback port; killed (SIGKILL) on drop, its directory removed.
pub struct Server {
    kind: Kind,
    child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
    /// The server's arguments (made once its port and directory are known).
    args: Vec<String>,
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The usual arguments of a server on `port` keeping its files in `dir`.
pub fn default_args(kind: Kind, port: u16, dir: &std::path::Path) -> Vec<String> {
    let port = port.to_string();
    let args: Vec<&str> = match kind {
        Kind::Redis => vec![
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().unwrap(),
        ],
        Kind::Nats => vec![
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port,
            "-sd",
            dir.to_str().unwrap(),
        ],
    };
    args.into_iter().map(str::to_owned).collect()
}

impl Server {
    pub fn start(kind: Kind) -> Server {
        Self::start_with(kind, |port, dir| default_args(kind, port, dir))
    }

    /// A server run with the arguments `args` makes from its port and directory.
    pub fn start_with(
        kind: Kind,
        args: impl FnOnce(u16, &std::path::Path) -> Vec<String>,
    ) -> Server {
        let dir = std::env::temp_dir().join(format!(
            "relay-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let mut s = Server {
            kind,
            child: None,
            port,
            args: args(port, &dir),
            dir,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let bin = self.kind.binary().expect("server binary");
        let mut cmd = Command::new(bin);
        cmd.args(&self.args);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the backplane server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not listen on {} within 10 s",
                self.kind.program(),
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's URL (`redis://…` or `nats://…`, loopback).
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Redis => format!("redis://127.0.0.1:{}", self.port),
            Kind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// Whether the process is running (not killed by the test).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL. Redis has no persistence (it comes back empty); NATS keeps its JetStream
    /// directory (it comes back with its streams).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts again on the same port with no data (NATS loses its JetStream directory; Redis
    /// never keeps any).
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).unwrap();
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What relay nodes are pointed at: a server, or a deployment of several.
pub trait Backend {
    /// The relay flags that point a node at it.
    fn flags(&self) -> Vec<String>;
}

impl<T: Backend> Backend for &T {
    fn flags(&self) -> Vec<String> {
        (*self).flags()
    }
}

impl Backend for Server {
    fn flags(&self) -> Vec<String> {
        let (backplane, flag) = match self.kind {
            Kind::Redis => ("redis", "--redis-url"),
            Kind::Nats => ("nats", "--nats-url"),
        };
        vec![
            "--backplane".into(),
            backplane.into(),
            flag.into(),
            self.url(),
        ]
    }
}

/// A relay node on `server`, ready (its `/readyz` says so).
pub async fn node(server: &impl Backend, id: &str, extra: &[&str]) -> Relay {
    let flags = server.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend_from_slice(&["--node-id", id]);
    args.extend_from_slice(extra);
    let r = Relay::start(&args);
    wait_ready(&r, Duration::from_secs(15)).await;
    r
}

async fn wait_ready(r: &Relay, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (status, _) = r.get("/readyz").await;
        if status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node not ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_not_ready(r: &Relay, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (status, _) = r.get("/readyz").await;
        if status == 503 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node still ready {within:?} after redis died"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes over HTTP; returns `(status, body)`.
async fn publish(r: &Relay, channel: &str, data: Value) -> (u16, Value) {
    r.post("/api/publish", &json!({"channel": channel, "data": data}))
        .await
}

/// Reads `n` messages of `channel` and returns `(seq, data)` in arrival order.
async fn collect(ws: &mut Ws, channel: &str, n: usize, within: Duration) -> Vec<(u64, Value)> {
    let deadline = Instant::now() + within;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(v) = ws.recv_json_within(left).await else {
            panic!(
                "got {} of {n} messages within {within:?}: {:?}",
                out.len(),
                out.iter().map(|(s, _)| *s).collect::<Vec<_>>()
            );
        };
        if v["type"] == "message" && v["channel"] == json!(channel) {
            out.push((v["seq"].as_u64().unwrap(), v["data"].clone()));
        }
    }
    out
}

pub async fn three_nodes_deliver_every_message_in_one_order_with_one_seq_space(
    redis: &impl Backend,
) {
    let nodes = [
        node(&redis, "n1", &[]).await,
        node(&redis, "n2", &[]).await,
        node(&redis, "n3", &[]).await,
    ];
    // Two subscribers per node.
    let mut subs = Vec::new();
    for n in &nodes {
        for _ in 0..2 {
            let mut ws = Ws::connect(&n.ws_url()).await;
            let s = ws.subscribe("room").await;
            assert_eq!(s["seq"], 0, "a fresh channel: {s}");
            subs.push(ws);
        }
    }
    let mut epoch = None;
    for i in 0..30u64 {
        let n = &nodes[i as usize % 3];
        let (status, body) = publish(n, "room", json!({"i": i, "via": i % 3})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["seq"], i + 1, "one seq space across nodes: {body}");
        let e = body["epoch"].as_str().unwrap().to_owned();
        assert_eq!(epoch.get_or_insert(e.clone()), &e, "one epoch across nodes");
    }
    for ws in &mut subs {
        let got = collect(ws, "room", 30, Duration::from_secs(10)).await;
        let want: Vec<(u64, Value)> = (0..30u64)
            .map(|i| (i + 1, json!({"i": i, "via": i % 3})))
            .collect();
        assert_eq!(got, want, "every node delivers every message, in one order");
    }
    // A node with no subscriber serves history from Redis.
    let h = nodes[2].history("room", "?since=25").await;
    assert_eq!(h["epoch"], json!(epoch.unwrap()));
    assert_eq!(h["seq"], 30);
    assert_eq!(h["complete"], true);
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [26, 27, 28, 29, 30]);
}

pub async fn concurrent_publishers_on_different_nodes_make_no_gaps_or_repeats(
    redis: &impl Backend,
) {
    let nodes = [
        node(&redis, "a", &[]).await,
        node(&redis, "b", &[]).await,
        node(&redis, "c", &[]).await,
    ];
    let mut subs = Vec::new();
    for n in &nodes {
        let mut ws = Ws::connect(&n.ws_url()).await;
        ws.subscribe("busy").await;
        subs.push(ws);
    }
    const PUBLISHERS: u64 = 10;
    const EACH: u64 = 20;
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let url = nodes[p as usize % 3].http("/api/publish");
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut seqs = Vec::new();
            for k in 0..EACH {
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    client
                        .post(&url)
                        .json(&json!({"channel": "busy", "data": {"p": p, "k": k}}))
                        .send(),
                )
                .await
                .expect("publish timed out")
                .expect("publish");
                assert_eq!(r.status().as_u16(), 200);
                let v: Value = r.json().await.unwrap();
                seqs.push((v["seq"].as_u64().unwrap(), p, k));
            }
            seqs
        }));
    }
    let mut by_seq = BTreeMap::new();
    for t in tasks {
        for (seq, p, k) in t.await.unwrap() {
            assert!(
                by_seq.insert(seq, json!({"p": p, "k": k})).is_none(),
                "seq {seq} given twice"
            );
        }
    }
    let total = PUBLISHERS * EACH;
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "publish replies: no gap, no repeat"
    );
    let want: Vec<(u64, Value)> = by_seq.into_iter().collect();
    for ws in &mut subs {
        let got = collect(ws, "busy", total as usize, Duration::from_secs(20)).await;
        assert_eq!(
            got, want,
            "every node: the same messages under the same seqs"
        );
    }
}

/// One node takes a burst of publishes on one channel, many in flight at once (WebSocket
/// commands, not waiting for replies): every publish gets its own seq, without gap or repeat,
/// subscribers on both nodes get every message once in seq order, and the history another node
/// serves from the store has them one by one (NATS stores a burst as batches).
pub async fn a_burst_on_one_channel_is_sequenced_without_loss_or_repeat(server: &impl Backend) {
    let a = node(&server, "a", &["--rate-limit", "0"]).await;
    let b = node(&server, "b", &[]).await;
    let mut subs = Vec::new();
    for n in [&a, &b] {
        let mut ws = Ws::connect(&n.ws_url()).await;
        ws.subscribe("burst").await;
        subs.push(ws);
    }
    const N: u64 = 2000;
    // Rounds of 250 publishes in flight (the replies are read between rounds, so that the
    // publisher's own outbox stays small).
    const ROUND: u64 = 250;
    let mut publisher = Ws::connect(&a.ws_url()).await;
    let mut by_seq = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for round in 0..N / ROUND {
        for i in round * ROUND..(round + 1) * ROUND {
            publisher
                .send_json(
                    json!({"type": "publish", "id": i, "channel": "burst", "data": {"i": i}}),
                )
                .await;
        }
        while (by_seq.len() as u64) < (round + 1) * ROUND {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = publisher
                .recv_json_within(left)
                .await
                .unwrap_or_else(|| panic!("{} of {N} publishes answered", by_seq.len()));
            assert_eq!(v["type"], "published", "{v}");
            let (seq, i) = (v["seq"].as_u64().unwrap(), v["id"].as_u64().unwrap());
            assert!(
                by_seq.insert(seq, json!({"i": i})).is_none(),
                "seq {seq} given twice"
            );
        }
    }
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>(),
        "publish replies: no gap, no repeat"
    );
    let want: Vec<(u64, Value)> = by_seq.into_iter().collect();
    for ws in &mut subs {
        let got = collect(ws, "burst", N as usize, Duration::from_secs(30)).await;
        assert_eq!(got, want, "each node: every message once, in seq order");
    }
    let h = b.history("burst", &format!("?since={}", N - 5)).await;
    let tail: Vec<(u64, Value)> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["seq"].as_u64().unwrap(), m["data"].clone()))
        .collect();
    assert_eq!(tail, want[want.len() - 5..], "history: {h}");
}

/// Writes `bodies` as pipelined `POST /api/publish` requests on one connection (all at once,
/// not waiting for answers) and returns the answers' seqs, in request order.
async fn pipelined_publishes(addr: std::net::SocketAddr, bodies: &[Value]) -> Vec<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    for b in bodies {
        let body = b.to_string();
        out.extend_from_slice(
            format!(
                "POST /api/publish HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    conn.write_all(&out).await.unwrap();
    let mut seqs = Vec::with_capacity(bodies.len());
    let mut buf: Vec<u8> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seqs.len() < bodies.len() {
        // One whole answer at the front of `buf`: head, then Content-Length bytes of JSON.
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("a Content-Length");
            if buf.len() >= end + 4 + len {
                let v: Value = serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap();
                seqs.push(v["seq"].as_u64().unwrap());
                buf.drain(..end + 4 + len);
                continue;
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, conn.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{} of {} answers", seqs.len(), bodies.len()))
            .unwrap();
        assert!(n > 0, "closed after {} answers", seqs.len());
        buf.extend_from_slice(&chunk[..n]);
    }
    seqs
}

/// One HTTP connection on node a pipelines many publishes (the node's front keeps many in
/// flight to the store at once) while node b publishes on the same channel: every
/// answer has its own seq, a's in the order sent; subscribers on both nodes get every message
/// once, in seq order.
pub async fn pipelined_publishes_from_one_connection_reach_two_nodes_in_order(
    server: &impl Backend,
) {
    let a = node(&server, "a", &["--rate-limit", "0"]).await;
    let b = node(&server, "b", &["--rate-limit", "0"]).await;
    let mut subs = Vec::new();
    for n in [&a, &a, &b] {
        let mut ws = Ws::connect(&n.ws_url()).await;
        ws.subscribe("pipe").await;
        subs.push(ws);
    }
    const N: u64 = 1000;
    const OTHER: u64 = 100;
    let bodies: Vec<Value> = (0..N)
        .map(|i| json!({"channel": "pipe", "data": {"a": i}}))
        .collect();
    let other = {
        let url = b.http("/api/publish");
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut seqs = Vec::new();
            for k in 0..OTHER {
                let r = client
                    .post(&url)
                    .json(&json!({"channel": "pipe", "data": {"b": k}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let v: Value = r.json().await.unwrap();
                seqs.push((v["seq"].as_u64().unwrap(), json!({"b": k})));
            }
            seqs
        })
    };
    let mine = pipelined_publishes(a.addr(), &bodies).await;
    assert!(
        mine.windows(2).all(|w| w[0] < w[1]),
        "one connection's publishes are sequenced in the order sent"
    );
    let mut by_seq: BTreeMap<u64, Value> = mine
        .into_iter()
        .zip(bodies.iter().map(|b| b["data"].clone()))
        .collect();
    for (seq, data) in other.await.unwrap() {
        assert!(by_seq.insert(seq, data).is_none(), "seq {seq} given twice");
    }
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=N + OTHER).collect::<Vec<_>>(),
        "publish answers: no gap, no repeat"
    );
    let want: Vec<(u64, Value)> = by_seq.into_iter().collect();
    for ws in &mut subs {
        let got = collect(ws, "pipe", want.len(), Duration::from_secs(30)).await;
        assert_eq!(got, want, "each node: every message once, in seq order");
    }
}

pub async fn a_client_resumes_on_another_node_after_its_node_is_killed(redis: &impl Backend) {
    let a = node(&redis, "a", &[]).await;
    let b = node(&redis, "b", &[]).await;
    let mut ws = Ws::connect(&a.ws_url()).await;
    let s = ws.subscribe("resume").await;
    let epoch = s["epoch"].as_str().unwrap().to_owned();
    for i in 1..=5 {
        publish(&b, "resume", json!(i)).await;
    }
    let got = collect(&mut ws, "resume", 5, Duration::from_secs(5)).await;
    assert_eq!(got.last().unwrap().0, 5);
    a.signal("KILL");
    drop(ws);
    for i in 6..=10 {
        let (status, _) = publish(&b, "resume", json!(i)).await;
        assert_eq!(status, 200);
    }
    let mut ws = Ws::connect(&b.ws_url()).await;
    let s = ws.subscribe_resume("resume", 5, &epoch).await;
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["seq"], 10);
    let got = collect(&mut ws, "resume", 5, Duration::from_secs(5)).await;
    assert_eq!(
        got,
        (6..=10u64).map(|i| (i, json!(i))).collect::<Vec<_>>(),
        "exactly the missed messages"
    );
    publish(&b, "resume", json!(11)).await;
    assert_eq!(ws.expect_message("resume", 11).await, json!(11));
    // Nothing more: no duplicate.
    assert!(ws
        .recv_json_within(Duration::from_millis(300))
        .await
        .is_none());
    // A node that never had the channel resumes too (joining it first).
    let c = node(&redis, "c", &[]).await;
    let mut ws = Ws::connect(&c.ws_url()).await;
    let s = ws.subscribe_resume("resume", 8, &epoch).await;
    assert_eq!(s["recovered"], true, "{s}");
    let got = collect(&mut ws, "resume", 3, Duration::from_secs(5)).await;
    assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), [9, 10, 11]);
}

/// What one resuming subscriber saw: runs of messages, each started by a `subscribed`.
#[derive(Debug, Default)]
struct Seen {
    /// `(epoch, recovered, seqs)` per connection.
    runs: Vec<(String, bool, Vec<u64>)>,
    closes: Vec<u16>,
}

/// Subscribes to `channel` on `url`, and on every close (4008 after a backplane resync, or
/// anything else) reconnects and resumes from the last position, until `stop` or 90 s.
async fn resuming_subscriber(
    url: String,
    channel: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::default();
    let mut pos: Option<(String, u64)> = None;
    // A bound only: every test stops its subscribers when done (a failover may take a while).
    let deadline = Instant::now() + Duration::from_secs(90);
    'connections: while Instant::now() < deadline && !*stop.borrow() {
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let sub = match &pos {
            Some((epoch, seq)) => {
                json!({"type": "subscribe", "channel": channel, "since": seq, "epoch": epoch})
            }
            None => json!({"type": "subscribe", "channel": channel}),
        };
        if futures_util::SinkExt::send(&mut ws, Message::Text(sub.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        loop {
            if *stop.borrow() && Instant::now() > deadline {
                break 'connections;
            }
            let next = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
            let msg = match next {
                Err(_) => {
                    if *stop.borrow() {
                        break 'connections;
                    }
                    continue;
                }
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(_))) | Ok(None) => continue 'connections,
            };
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    match v["type"].as_str() {
                        Some("subscribed") => {
                            let epoch = v["epoch"].as_str().unwrap().to_owned();
                            let recovered = v["recovered"] == true;
                            if !recovered {
                                pos = Some((epoch.clone(), v["seq"].as_u64().unwrap()));
                            }
                            seen.runs.push((epoch, recovered, Vec::new()));
                        }
                        Some("message") => {
                            let seq = v["seq"].as_u64().unwrap();
                            if let Some(run) = seen.runs.last_mut() {
                                run.2.push(seq);
                            }
                            if let Some(p) = pos.as_mut() {
                                p.1 = seq;
                            }
                        }
                        Some("error") => {
                            // `unavailable` while redis is down: try again shortly.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue 'connections;
                        }
                        _ => {}
                    }
                }
                Message::Close(f) => {
                    seen.closes.push(f.map_or(1005, |f| u16::from(f.code)));
                    continue 'connections;
                }
                _ => {}
            }
        }
    }
    seen
}

/// Checks a subscriber's runs: seqs increase by exactly one inside a run and across resumes
/// that said `recovered:true`; a break is only allowed where `recovered:false` said so.
fn assert_gap_free(who: &str, seen: &Seen) {
    let mut last: Option<(String, u64)> = None;
    for (epoch, recovered, seqs) in &seen.runs {
        let mut prev = match (&last, recovered) {
            (Some((e, s)), true) => {
                assert_eq!(e, epoch, "{who}: recovered across epochs: {seen:?}");
                Some(*s)
            }
            _ => None,
        };
        for &s in seqs {
            if let Some(p) = prev {
                assert_eq!(s, p + 1, "{who}: gap or repeat in {seen:?}");
            }
            prev = Some(s);
        }
        if let Some(p) = prev {
            last = Some((epoch.clone(), p));
        } else if !recovered {
            last = None;
        }
    }
}

pub async fn server_killed_and_restarted_mid_stream_nodes_recover_without_loss_or_repeats(
    kind: Kind,
    empty: bool,
) {
    let mut redis = Server::start(kind);
    let a = node(&redis, "a", &[]).await;
    let b = node(&redis, "b", &[]).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let subs: Vec<_> = [&a, &b, &a, &b]
        .iter()
        .map(|n| tokio::spawn(resuming_subscriber(n.ws_url(), "live", stop_rx.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut ok_before = 0;
    for i in 0..20 {
        let n = if i % 2 == 0 { &a } else { &b };
        let (status, body) = publish(n, "live", json!(i)).await;
        assert_eq!(status, 200, "{body}");
        ok_before += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    redis.kill();
    wait_not_ready(&a, Duration::from_secs(10)).await;
    wait_not_ready(&b, Duration::from_secs(10)).await;
    for n in [&a, &b] {
        let (status, body) = publish(n, "live", json!("during")).await;
        assert_eq!(
            status, 503,
            "a publish that cannot be sequenced fails: {body}"
        );
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
    // Local subscribers stay connected meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;

    if empty {
        redis.restart_empty();
    } else {
        redis.restart();
    }
    wait_ready(&a, Duration::from_secs(15)).await;
    wait_ready(&b, Duration::from_secs(15)).await;
    // Give the nodes a moment to resync their channels (and close subscribers for resume).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut after = Vec::new();
    for i in 0..20 {
        let n = if i % 2 == 0 { &a } else { &b };
        let (status, body) = publish(n, "live", json!(100 + i)).await;
        assert_eq!(status, 200, "{body}");
        after.push((
            body["epoch"].as_str().unwrap().to_owned(),
            body["seq"].as_u64().unwrap(),
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop_tx.send(true).unwrap();
    let (last_epoch, last_seq) = after.last().cloned().unwrap();
    for (i, t) in subs.into_iter().enumerate() {
        let seen = t.await.unwrap();
        let who = format!("subscriber {i}");
        assert_gap_free(&who, &seen);
        // Everything published after recovery arrived.
        let (epoch, _, seqs) = seen.runs.last().unwrap();
        assert_eq!(
            epoch, &last_epoch,
            "{who}: ends in the current epoch: {seen:?}"
        );
        let all_in_epoch: Vec<u64> = seen
            .runs
            .iter()
            .filter(|r| &r.0 == epoch)
            .flat_map(|r| r.2.iter().copied())
            .collect();
        for (_, s) in &after {
            assert!(all_in_epoch.contains(s), "{who}: lost seq {s}: {seen:?}");
        }
        assert_eq!(seqs.last(), Some(&last_seq), "{who}: {seen:?}");
        if kind == Kind::Redis || empty {
            // The server came back empty: the history before the outage is gone, so the
            // resume after it says so explicitly.
            assert!(
                seen.runs.iter().skip(1).any(|r| !r.1),
                "{who}: an explicit recovered:false after the restart: {seen:?}"
            );
        }
        assert!(ok_before > 0);
    }
}

/// Members, sorted, from `GET /api/presence/{channel}` on `r`.
async fn members(r: &Relay, channel: &str) -> Vec<String> {
    let (status, body) = r.get(&format!("/api/presence/{channel}")).await;
    assert_eq!(status, 200, "{body}");
    let mut users: Vec<String> = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap().to_owned())
        .collect();
    users.sort();
    users
}

async fn wait_members(r: &Relay, channel: &str, want: &[&str], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = members(r, channel).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "members {got:?}, want {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Presence on `presence:*`, quick timeouts.
const PRESENCE_OPTS: [&str; 8] = [
    "--presence-channels",
    "presence:*",
    "--heartbeat-interval",
    "500ms",
    "--presence-timeout",
    "2s",
    "--presence-sweep",
    "200ms",
];

/// A WebSocket subscriber of `ch` on `n` that is a presence member as `user`.
async fn presence_member(n: &Relay, ch: &str, user: &str) -> Ws {
    let mut ws = Ws::connect(&n.ws_url()).await;
    ws.send_json(json!({"type":"subscribe","channel":ch,"presence":{"user":user}}))
        .await;
    let v = ws.recv_json().await;
    assert_eq!(v["type"], "subscribed", "{v}");
    ws
}

/// A node with no subscriber of a channel (so it does not receive it) lists the channel's
/// members of every node from the store, and sees a leave.
pub async fn presence_is_listed_by_a_node_without_subscribers_of_the_channel(
    server: &impl Backend,
) {
    let a = node(&server, "a", &PRESENCE_OPTS).await;
    let b = node(&server, "b", &PRESENCE_OPTS).await;
    let ch = "presence:far";
    let mut users = Vec::new();
    for user in ["alice", "amir"] {
        users.push(presence_member(&a, ch, user).await);
    }
    wait_members(&b, ch, &["alice", "amir"], Duration::from_secs(5)).await;
    let (status, stats) = b.get(&format!("/api/presence/{ch}/stats")).await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(
        (stats["clients"].as_u64(), stats["users"].as_u64()),
        (Some(2), Some(2)),
        "{stats}"
    );
    let (status, page) = b.get(&format!("/api/presence/{ch}?limit=1")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["members"].as_array().map(Vec::len), Some(1), "{page}");
    let next = page["next"].as_str().expect("a next page").to_owned();
    let (_, rest) = b
        .get(&format!("/api/presence/{ch}?limit=1&cursor={next}"))
        .await;
    assert_eq!(rest["members"].as_array().map(Vec::len), Some(1), "{rest}");
    assert_ne!(rest["members"][0]["client"], page["members"][0]["client"]);
    assert_eq!(
        b.channel_info(ch).await.map(|c| c["subscribers"].clone()),
        None,
        "b never received the channel"
    );
    users.pop().unwrap().close_cleanly().await;
    wait_members(&b, ch, &["alice"], Duration::from_secs(5)).await;
}

pub async fn presence_spans_nodes_and_a_killed_nodes_members_leave_within_the_timeout(
    redis: &impl Backend,
) {
    let a = node(&redis, "a", &PRESENCE_OPTS).await;
    let b = node(&redis, "b", &PRESENCE_OPTS).await;
    let c = node(&redis, "c", &PRESENCE_OPTS).await;
    let ch = "presence:lobby";
    let mut clients = Vec::new();
    for (n, user) in [(&a, "alice"), (&b, "bob"), (&c, "carol")] {
        clients.push(presence_member(n, ch, user).await);
    }
    for n in [&a, &b, &c] {
        wait_members(n, ch, &["alice", "bob", "carol"], Duration::from_secs(5)).await;
    }
    // Alice (on a) sees bob and carol join through the backplane.
    let mut joined = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while joined.len() < 3 && Instant::now() < deadline {
        if let Some(v) = clients[0]
            .recv_json_within(Duration::from_millis(200))
            .await
        {
            if v["type"] == "presence" && v["event"] == "join" {
                joined.push(v["user"].as_str().unwrap().to_owned());
            }
        }
    }
    joined.sort();
    assert_eq!(joined, ["alice", "bob", "carol"]);

    // Keep alice and bob alive with heartbeats while c is killed.
    c.signal("KILL");
    let killed = Instant::now();
    let (keep_a, keep_b) = {
        let mut it = clients.drain(..2);
        (it.next().unwrap(), it.next().unwrap())
    };
    let beat = |mut ws: Ws| {
        tokio::spawn(async move {
            let mut left = Vec::new();
            let end = Instant::now() + Duration::from_secs(6);
            let mut next_beat = Instant::now();
            while Instant::now() < end {
                if Instant::now() >= next_beat {
                    ws.send_json(json!({"type":"heartbeat"})).await;
                    next_beat = Instant::now() + Duration::from_millis(300);
                }
                let wait = next_beat.saturating_duration_since(Instant::now());
                if let Some(v) = ws.recv_json_within(wait).await {
                    if v["type"] == "presence" && v["event"] == "leave" {
                        left.push((v["user"].as_str().unwrap().to_owned(), Instant::now()));
                    }
                }
            }
            left
        })
    };
    let (ha, hb) = (beat(keep_a), beat(keep_b));
    wait_members(&a, ch, &["alice", "bob"], Duration::from_secs(5)).await;
    wait_members(&b, ch, &["alice", "bob"], Duration::from_secs(5)).await;
    let gone_after = killed.elapsed();
    assert!(
        gone_after < Duration::from_millis(2000 + 1500),
        "carol left {gone_after:?} after her node died (timeout 2 s)"
    );
    for h in [ha, hb] {
        let left = h.await.unwrap();
        assert_eq!(
            left.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>(),
            ["carol"],
            "only carol leaves, once"
        );
    }
}

/// A local webhook receiver: every event of every POST, in arrival order.
struct HookReceiver {
    url: String,
    events: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl HookReceiver {
    async fn start() -> HookReceiver {
        let events: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
        let e = events.clone();
        let base = crate::common::serve_http(move |_, body| {
            let v: Value = serde_json::from_slice(&body).unwrap();
            e.lock()
                .unwrap()
                .extend(v["events"].as_array().unwrap().iter().cloned());
            (200, bytes::Bytes::new())
        })
        .await;
        HookReceiver {
            url: format!("{base}/hooks"),
            events,
        }
    }

    /// `name[ user]` of every event of `channel` so far.
    fn names(&self, channel: &str) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["channel"] == channel)
            .map(|e| match e["user_id"].as_str() {
                Some(u) => format!("{} {u}", e["name"].as_str().unwrap()),
                None => e["name"].as_str().unwrap().to_owned(),
            })
            .collect()
    }

    /// How many events of `channel` are `name` so far.
    fn count(&self, channel: &str, name: &str) -> usize {
        self.names(channel).iter().filter(|n| *n == name).count()
    }

    /// Waits (at most `within`) until `channel` has had the event `name`; returns when.
    async fn wait(&self, channel: &str, name: &str, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            if self.count(channel, name) > 0 {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "no {name} for {channel} within {within:?}: {:?}",
                self.names(channel)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sends heartbeats on `ws` (and reads what comes) until `stop`; gives the socket back.
fn keep_alive(
    mut ws: Ws,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Ws> {
    tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(30);
        let mut next_beat = Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
            if Instant::now() >= next_beat {
                ws.send_json(json!({"type":"heartbeat"})).await;
                next_beat = Instant::now() + Duration::from_millis(300);
            }
            let wait = next_beat.saturating_duration_since(Instant::now());
            let _ = ws.recv_json_within(wait).await;
        }
        ws
    })
}

/// Three nodes with the same webhook receiver report each occupancy and membership change
/// once for the cluster; a SIGKILLed node's subscribers and members are settled (vacated,
/// removed) by the others within the presence timeout, and only where it was the last holder.
pub async fn webhooks_are_sent_once_per_cluster_and_a_killed_nodes_holds_are_settled(kind: Kind) {
    let server = Server::start(kind);
    let rx = HookReceiver::start().await;
    let mut opts: Vec<&str> = PRESENCE_OPTS.to_vec();
    opts.extend_from_slice(&["--webhook-url", &rx.url, "--webhook-batch-delay", "10ms"]);
    let a = node(&server, "a", &opts).await;
    let b = node(&server, "b", &opts).await;
    let c = node(&server, "c", &opts).await;
    let (hall, solo) = ("presence:hall", "solo");
    let mut members = Vec::new();
    for (n, user) in [(&a, "alice"), (&b, "bob"), (&c, "alice"), (&c, "carol")] {
        members.push(presence_member(n, hall, user).await);
    }
    let mut on_c = Ws::connect(&c.ws_url()).await;
    on_c.subscribe(solo).await;
    for name in [
        "channel_occupied",
        "member_added alice",
        "member_added bob",
        "member_added carol",
    ] {
        rx.wait(hall, name, Duration::from_secs(5)).await;
    }
    rx.wait(solo, "channel_occupied", Duration::from_secs(5))
        .await;
    // Past a lease refresh (timeout / 4 = 500 ms) of every node: nothing is reported again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut before = rx.names(hall);
    before.sort();
    assert_eq!(
        before,
        [
            "channel_occupied",
            "member_added alice",
            "member_added bob",
            "member_added carol"
        ],
        "once per cluster, not once per node"
    );
    assert_eq!(rx.names(solo), ["channel_occupied"]);

    // c dies: carol and solo's subscriber were only there; alice is still on a.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut it = members.drain(..2);
    let (on_a, on_b) = (it.next().unwrap(), it.next().unwrap());
    drop(it);
    let (keep_a, keep_b) = (
        keep_alive(on_a, stop.clone()),
        keep_alive(on_b, stop.clone()),
    );
    c.signal("KILL");
    let killed = Instant::now();
    let removed = rx
        .wait(hall, "member_removed carol", Duration::from_secs(6))
        .await;
    let vacated = rx
        .wait(solo, "channel_vacated", Duration::from_secs(6))
        .await;
    for (what, at) in [("carol removed", removed), ("solo vacated", vacated)] {
        let after = at.duration_since(killed);
        assert!(
            after < Duration::from_millis(2000 + 1000),
            "{what} {after:?} after her node died (timeout 2 s)"
        );
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(rx.count(hall, "member_removed alice"), 0, "alice is on a");
    assert_eq!(
        rx.count(hall, "channel_vacated"),
        0,
        "a and b hold the hall"
    );
    assert_eq!(rx.count(hall, "member_removed carol"), 1);
    assert_eq!(rx.names(solo), ["channel_occupied", "channel_vacated"]);

    // The last holders leave: each change once.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (on_a, on_b) = (keep_a.await.unwrap(), keep_b.await.unwrap());
    on_b.close_cleanly().await;
    rx.wait(hall, "member_removed bob", Duration::from_secs(5))
        .await;
    on_a.close_cleanly().await;
    rx.wait(hall, "channel_vacated", Duration::from_secs(5))
        .await;
    rx.wait(hall, "member_removed alice", Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut all = rx.names(hall);
    all.sort();
    assert_eq!(
        all,
        [
            "channel_occupied",
            "channel_vacated",
            "member_added alice",
            "member_added bob",
            "member_added carol",
            "member_removed alice",
            "member_removed bob",
            "member_removed carol",
        ]
    );
    drop(on_c);
    drop(c);
}

/// The seqs of `channel`'s history, read on `n`.
async fn history_seqs(n: &Relay, channel: &str) -> Vec<u64> {
    let (status, h) = n.get(&format!("/api/history/{channel}?since=0")).await;
    assert_eq!(status, 200, "{h}");
    h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// Ten concurrent tries of one publish with the same idempotency key, spread over three
/// nodes, publish one message: every try answers its seq, all but one as a duplicate.
pub async fn an_idempotent_publish_retried_on_every_node_at_once_is_published_once(kind: Kind) {
    let server = Server::start(kind);
    let nodes = [
        node(&server, "a", &[]).await,
        node(&server, "b", &[]).await,
        node(&server, "c", &[]).await,
    ];
    let ch = "orders";
    let mut ws = Ws::connect(&nodes[0].ws_url()).await;
    ws.subscribe(ch).await;
    let body = json!({"channel": ch, "data": {"order": 7}, "idempotency_key": "order-7"});
    let answers =
        futures_util::future::join_all((0..10).map(|i| nodes[i % 3].post("/api/publish", &body)))
            .await;
    let mut firsts = 0;
    for (status, v) in &answers {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(
            (&v["seq"], &v["epoch"]),
            (&answers[0].1["seq"], &answers[0].1["epoch"])
        );
        if v["duplicate"] != json!(true) {
            firsts += 1;
        }
    }
    assert_eq!(
        firsts, 1,
        "one try publishes, the others are duplicates: {answers:?}"
    );
    let got = collect(&mut ws, ch, 1, Duration::from_secs(5)).await;
    assert_eq!(got, [(1, json!({"order": 7}))]);
    while let Some(v) = ws.recv_json_within(Duration::from_millis(500)).await {
        assert_ne!(v["type"], "message", "published twice: {v}");
    }
    for n in &nodes {
        assert_eq!(history_seqs(n, ch).await, [1]);
    }
}

/// Ten writers on three nodes publish with the same `expected_seq` at once, round after
/// round: exactly one wins each seq, the others get 409 `seq_mismatch` with the new top.
pub async fn conditional_writers_on_different_nodes_win_once_per_seq(kind: Kind) {
    let server = Server::start(kind);
    let nodes = [
        node(&server, "a", &[]).await,
        node(&server, "b", &[]).await,
        node(&server, "c", &[]).await,
    ];
    let ch = "ledger";
    for round in 0..5u64 {
        let nodes = &nodes;
        let answers = futures_util::future::join_all((0..10).map(|i| {
            let body = json!({"channel": ch, "data": {"round": round, "writer": i},
                "expected_seq": round});
            async move { nodes[i % 3].post("/api/publish", &body).await }
        }))
        .await;
        let winners: Vec<&Value> = answers
            .iter()
            .filter(|(s, _)| *s == 200)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {answers:?}");
        assert_eq!(winners[0]["seq"], round + 1);
        for (status, v) in answers.iter().filter(|(s, _)| *s != 200) {
            assert_eq!(*status, 409, "{v}");
            assert_eq!(v["error"]["code"], "seq_mismatch", "{v}");
            assert_eq!(v["seq"], round + 1, "{v}");
        }
    }
    assert_eq!(history_seqs(&nodes[1], ch).await, [1, 2, 3, 4, 5]);
    // The retry of a conditional publish that went through (through another node) answers
    // its seq as a duplicate, not a mismatch.
    let body = json!({"channel": ch, "data": "once", "expected_seq": 5, "idempotency_key": "k"});
    let (status, first) = nodes[0].post("/api/publish", &body).await;
    assert_eq!((status, &first["seq"]), (200, &json!(6)), "{first}");
    let (status, again) = nodes[2].post("/api/publish", &body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (&again["seq"], &again["duplicate"]),
        (&json!(6), &json!(true))
    );
    assert_eq!(history_seqs(&nodes[1], ch).await, [1, 2, 3, 4, 5, 6]);
}

const USER_SECRET: &str = "cluster-user-secret-0123456789";
const USER_KEY: &str = "cluster-api-key";

/// A WebSocket of `user` (a token with that subject) on `n`, subscribed to `channel`.
async fn user_socket(n: &Relay, user: &str, channel: &str) -> Ws {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user, "exp": exp, "channels": {"subscribe": ["*"]}}),
        &EncodingKey::from_secret(USER_SECRET.as_bytes()),
    )
    .unwrap();
    let mut ws = Ws::connect(&format!("{}?token={token}", n.ws_url())).await;
    ws.subscribe(channel).await;
    ws
}

/// The server API's user commands sent to one node act on the user's connections on every
/// node, and say how many nodes they reached; other users' connections are untouched.
pub async fn a_user_command_sent_through_one_node_acts_on_every_node(kind: Kind) {
    let server = Server::start(kind);
    let opts = ["--jwt-secret", USER_SECRET, "--api-key", USER_KEY];
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        let mut n = node(&server, id, &opts).await;
        n.set_api_key(USER_KEY);
        nodes.push(n);
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut alice = [
        user_socket(b, "alice", "room").await,
        user_socket(c, "alice", "room").await,
    ];
    let mut bob = user_socket(b, "bob", "room").await;

    // Redis's PUBLISH says how many nodes got a command; core NATS cannot.
    let reached = match kind {
        Kind::Redis => json!(3),
        Kind::Nats => Value::Null,
    };
    let (status, v) = a
        .post(
            "/api/users/subscribe",
            &json!({"user": "alice", "channel": "news"}),
        )
        .await;
    assert_eq!((status, &v["nodes"]), (200, &reached), "{v}");
    for ws in &mut alice {
        let v = ws.recv_json_within(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            (&v["type"], &v["channel"]),
            (&json!("subscribed"), &json!("news")),
            "{v}"
        );
    }
    a.publish("news", json!("for alice")).await;
    for ws in &mut alice {
        assert_eq!(ws.expect_message("news", 1).await, "for alice");
    }

    let (status, v) = a
        .post(
            "/api/users/disconnect",
            &json!({"user": "alice", "reason": "banned", "reconnect": false}),
        )
        .await;
    assert_eq!((status, &v["nodes"]), (200, &reached), "{v}");
    for ws in &mut alice {
        assert_eq!(ws.expect_close_within(Duration::from_secs(5)).await, 4011);
    }
    // Bob, on the same node as one of alice's connections, stays and is served.
    c.publish("room", json!("still here")).await;
    assert_eq!(bob.expect_message("room", 1).await, "still here");
}

/// Publishes over HTTP until Redis takes it (503 while a node reconnects), at most 20 s.
async fn publish_through(r: &Relay, channel: &str, data: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = publish(r, channel, data.clone()).await;
        if status == 200 {
            return body;
        }
        assert!(
            status == 503 && Instant::now() < deadline,
            "publish: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Subscribers on two nodes while the Redis master fails over (`fail_over` kills it once its
/// writes reached the replica, and returns when the replica is promoted): every subscriber
/// gets every message once, in order, without a `recovered:false` (nothing was lost), and
/// publishes go on through the new master.
pub async fn a_master_failover_loses_no_message<B: Backend + Send>(
    backend: &mut B,
    fail_over: impl FnOnce(&mut B),
) {
    let a = node(&*backend, "a", &[]).await;
    let b = node(&*backend, "b", &[]).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let subs: Vec<_> = [&a, &b, &a, &b]
        .iter()
        .map(|n| tokio::spawn(resuming_subscriber(n.ws_url(), "ha", stop_rx.clone())))
        .collect();
    a.wait_subscribers("ha", 2, Duration::from_secs(10)).await;
    b.wait_subscribers("ha", 2, Duration::from_secs(10)).await;
    let mut replies = Vec::new();
    for i in 0..20 {
        let n = if i % 2 == 0 { &a } else { &b };
        replies.push(publish_through(n, "ha", json!(i)).await);
    }
    tokio::task::block_in_place(|| fail_over(backend));
    for i in 20..40 {
        let n = if i % 2 == 0 { &a } else { &b };
        replies.push(publish_through(n, "ha", json!(i)).await);
    }
    let epoch = replies[0]["epoch"].clone();
    let seqs: Vec<u64> = replies.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        replies.iter().all(|r| r["epoch"] == epoch),
        "one epoch throughout: nothing was lost: {replies:?}"
    );
    let last = *seqs.iter().max().unwrap();
    // Give the subscribers a moment to get the last ones, then stop them.
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in [&a, &b] {
        while Instant::now() < deadline {
            match n.channel_info("ha").await {
                Some(v) if v["seq"].as_u64() >= Some(last) => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    for (i, t) in subs.into_iter().enumerate() {
        let seen = t.await.unwrap();
        let who = format!("subscriber {i}");
        assert_gap_free(&who, &seen);
        assert!(
            seen.runs.iter().skip(1).all(|r| r.1),
            "{who}: every resume recovered (nothing was lost): {seen:?}"
        );
        let all: Vec<u64> = seen.runs.iter().flat_map(|r| r.2.iter().copied()).collect();
        assert_eq!(
            all,
            (1..=last).collect::<Vec<_>>(),
            "{who}: every message once, in order: {seen:?}"
        );
    }
}

/// Redis loses the last messages of a channel that the nodes had delivered (what a failover to
/// a replica that had not received them does; simulated on one server by dropping them, and
/// with `cut` by cutting every connection as a failover does): the nodes start the channel's
/// next epoch (on resync after the cut, or at the next publish without it), every subscriber
/// resumes with `recovered:false` into it, and the next publishes reach everyone.
pub async fn history_lost_by_redis_is_resumed_with_recovered_false(redis: &Server, cut: bool) {
    let a = node(redis, "a", &[]).await;
    let b = node(redis, "b", &[]).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let subs: Vec<_> = [&a, &b]
        .iter()
        .map(|n| tokio::spawn(resuming_subscriber(n.ws_url(), "lost", stop_rx.clone())))
        .collect();
    a.wait_subscribers("lost", 1, Duration::from_secs(10)).await;
    b.wait_subscribers("lost", 1, Duration::from_secs(10)).await;
    let mut before = None;
    for i in 1..=10 {
        let n = if i % 2 == 0 { &a } else { &b };
        let body = publish_through(n, "lost", json!(i)).await;
        before.get_or_insert(body["epoch"].clone());
    }
    for n in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while n.channel_info("lost").await.and_then(|v| v["seq"].as_u64()) != Some(10) {
            assert!(Instant::now() < deadline, "both nodes have seq 10");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::task::block_in_place(|| {
        use redis_ha::cli;
        cli(redis.port, &["hset", "relay:{lost}:meta", "top", "5"]);
        let mut xdel = vec!["xdel", "relay:{lost}:hist"];
        xdel.extend(["6-1", "7-1", "8-1", "9-1", "10-1"]);
        assert_eq!(cli(redis.port, &xdel), "5");
        // As on a replica that never had them: the stream's last id is 5 again.
        assert_eq!(
            cli(redis.port, &["xsetid", "relay:{lost}:hist", "5-1"]),
            "OK"
        );
        if cut {
            cli(redis.port, &["client", "kill", "type", "pubsub"]);
            cli(redis.port, &["client", "kill", "type", "normal"]);
        }
    });
    if cut {
        // The nodes reconnect and resync before anyone publishes again.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let mut after = Vec::new();
    for i in 11..=15 {
        let n = if i % 2 == 0 { &a } else { &b };
        after.push(publish_through(n, "lost", json!(i)).await);
    }
    let epoch = after[0]["epoch"].clone();
    assert_ne!(Some(&epoch), before.as_ref(), "a new epoch");
    assert!(after.iter().all(|r| r["epoch"] == epoch), "{after:?}");
    let seqs: Vec<u64> = after.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        [6, 7, 8, 9, 10],
        "the new epoch goes on from what Redis kept"
    );
    // Once every subscriber is back: one more, which each must get.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let body = publish_through(&a, "lost", json!(16)).await;
    assert_eq!(
        (&body["epoch"], &body["seq"]),
        (&epoch, &json!(11)),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    for (i, t) in subs.into_iter().enumerate() {
        let seen = t.await.unwrap();
        let who = format!("subscriber {i}");
        assert_gap_free(&who, &seen);
        assert_eq!(
            seen.runs[0].2,
            (1..=10).collect::<Vec<_>>(),
            "{who}: {seen:?}"
        );
        let last = seen.runs.last().unwrap();
        assert_eq!(
            json!(last.0),
            epoch,
            "{who}: ends in the new epoch: {seen:?}"
        );
        assert!(
            seen.runs
                .iter()
                .skip(1)
                .any(|r| !r.1 && json!(r.0) == epoch),
            "{who}: told recovered:false into the new epoch: {seen:?}"
        );
        let new: Vec<u64> = seen
            .runs
            .iter()
            .filter(|r| json!(r.0) == epoch)
            .flat_map(|r| r.2.iter().copied())
            .collect();
        if cut {
            assert_eq!(new, [6, 7, 8, 9, 10, 11], "{who}: {seen:?}");
        } else {
            // The first publish of the new epoch closed it for resume: it resumed (with
            // recovered:false) where the new epoch then stood, and has everything after.
            assert_eq!(new.last(), Some(&11), "{who}: {seen:?}");
        }
    }
}

/// The scenarios every backplane runs, written once: each becomes a test of the file that
/// invokes this with its [`Kind`] (`tests/cluster_redis.rs`, `tests/cluster_nats.rs`), skipped
/// only where the server is not installed and never in CI (see [`Kind::available`]).
#[allow(unused_macros)] // Only the per-backplane cluster files run the whole list.
macro_rules! every_backplane_runs {
    ($kind:expr) => {
        cluster::every_backplane_runs!(@server $kind;
            three_nodes_deliver_every_message_in_one_order_with_one_seq_space,
            concurrent_publishers_on_different_nodes_make_no_gaps_or_repeats,
            pipelined_publishes_from_one_connection_reach_two_nodes_in_order,
            a_burst_on_one_channel_is_sequenced_without_loss_or_repeat,
            presence_is_listed_by_a_node_without_subscribers_of_the_channel,
            a_client_resumes_on_another_node_after_its_node_is_killed,
            presence_spans_nodes_and_a_killed_nodes_members_leave_within_the_timeout
        );
        cluster::every_backplane_runs!(@kind $kind;
            webhooks_are_sent_once_per_cluster_and_a_killed_nodes_holds_are_settled,
            an_idempotent_publish_retried_on_every_node_at_once_is_published_once,
            conditional_writers_on_different_nodes_win_once_per_seq,
            a_user_command_sent_through_one_node_acts_on_every_node
        );
    };
    // Scenarios on one server started for the test.
    (@server $kind:expr; $($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if $kind.available() {
                cluster::$name(&cluster::Server::start($kind)).await;
            }
        }
    )*};
    // Scenarios that start (and stop) their servers themselves.
    (@kind $kind:expr; $($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if $kind.available() {
                cluster::$name($kind).await;
            }
        }
    )*};
}
#[allow(unused_imports)] // Only the per-backplane cluster files run the whole list.
pub(crate) use every_backplane_runs;
