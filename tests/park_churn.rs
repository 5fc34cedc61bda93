//! Churn over parked WebSocket sessions (`transport::park`, docs/ARCHITECTURE.md): ~120
//! clients on a few channels park and resume many times while a publisher sends bursts with
//! pauses longer than `--ws-park-after`; some clients stop reading through large bursts (so
//! direct writes to a parked socket block), some send pings, publishes and subscribes while
//! parked, some vanish (reset or plain FIN) and come back with a resume. Every client must see
//! every seq of each of its channels exactly once and in order, sessions must really have
//! parked, and nothing stays counted once everybody is gone. A restart while most sessions are
//! parked closes each with 1012.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Clients of the churn run.
const CLIENTS: usize = 120;
/// Channels the publisher feeds (each client is on one of them).
const CHANNELS: usize = 4;
/// The channel some clients join while parked.
const EXTRA: &str = "churn-x";
/// The channel of the slow clients only: each big burst sends it a few 60 KB messages, then
/// one of 6 MB, more than the kernel's socket buffers hold (a 4 MiB send buffer at most,
/// `net.ipv4.tcp_wmem`), while they read nothing: the one direct write of that message to a
/// parked socket blocks with most of it left, which only the session, woken, can finish.
const HUGE: &str = "churn-huge";
const HUGE_COUNT: usize = 20;
const HUGE_PAD: usize = 60_000;
const HUGEST_PAD: usize = 6_000_000;
/// Small bursts per channel, and every how many of them a big one follows.
const ROUNDS: usize = 14;
const BIG_EVERY: usize = 5;
/// A big burst: this many messages of this many padding bytes, per channel (~500 KB; the
/// kernel's socket buffers usually take it all, see [`HUGE`]).
const BIG_COUNT: usize = 40;
const BIG_PAD: usize = 12_000;

/// A client that gets no frame for this long while it still waits for some has stalled (the
/// publisher never pauses for more than a fraction of it).
const STALL: Duration = Duration::from_secs(20);

fn channel(i: usize) -> String {
    format!("churn-{i}")
}

/// A client's channel: every kind of client is on every channel.
fn home(k: usize) -> String {
    channel((k + k / 6) % CHANNELS)
}

fn server_args() -> Vec<&'static str> {
    vec![
        "--ws-park-after",
        "50ms",
        "--shards",
        "2",
        // One test process publishes many times a second without an API key.
        "--api-rate-limit",
        "0",
        // Every message of the run stays in history, so that every resume recovers.
        "--history-size",
        "100000",
        "--history-max-bytes",
        "256MiB",
        // What the kernel does not take of a huge burst (~2 MB) waits in the outbox: nobody is
        // closed as a slow consumer (asserted).
        "--max-outbox-bytes",
        "16MiB",
        "--max-message-size",
        "8MiB",
    ]
}

/// What a client does now and then (by its index).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Only reads.
    Reader,
    /// Stops reading for a while, then drains.
    Slow,
    /// Sends a WebSocket ping.
    Pinger,
    /// Publishes over its WebSocket.
    Publisher,
    /// Joins [`EXTRA`] while parked.
    Joiner,
    /// Vanishes (reset or FIN, no close frame) and comes back with a resume.
    Reconnector,
}

fn kind(k: usize) -> Kind {
    match k % 6 {
        0 => Kind::Reader,
        1 => Kind::Slow,
        2 => Kind::Pinger,
        3 => Kind::Publisher,
        4 => Kind::Joiner,
        _ => Kind::Reconnector,
    }
}

/// Shared between the test body and the clients.
struct Run {
    url: String,
    /// Set when the publisher is done: the clients stop acting, the end markers follow.
    stop: AtomicBool,
    /// Joiners whose [`EXTRA`] subscription was confirmed (or that gave it up at `stop`).
    joined: AtomicUsize,
    /// Reconnections made.
    reconnects: AtomicU64,
    /// Set after a big burst until every client has all of it: clients send nothing, so that
    /// no later publish or command carries on a blocked direct write (its session must be
    /// woken to finish it).
    quiet: AtomicBool,
    /// The last seq of its home channel each client has seen, and of [`HUGE`].
    seen: Vec<AtomicU64>,
    seen_huge: Vec<AtomicU64>,
    /// Big bursts begun; slow clients stop reading through each (until `burst_done`), and
    /// count themselves in `pausing` first.
    episode: AtomicU64,
    pausing: AtomicUsize,
    burst_done: AtomicBool,
}

/// One client's view of its channels.
#[derive(Default)]
struct Track {
    /// Last seq seen per channel (the `subscribed` seq before any message).
    last: HashMap<String, u64>,
    epoch: HashMap<String, String>,
    /// Channels whose end marker arrived.
    ended: HashMap<String, u64>,
    /// Subscribe commands not answered yet.
    pending: usize,
    messages: u64,
}

impl Track {
    /// Checks one frame; panics on any gap, duplicate or reorder.
    fn frame(&mut self, k: usize, v: &Value) {
        match v["type"].as_str() {
            Some("message") => {
                let ch = v["channel"].as_str().expect("message channel").to_string();
                let seq = v["seq"].as_u64().expect("message seq");
                let last = *self
                    .last
                    .get(&ch)
                    .unwrap_or_else(|| panic!("client {k}: message before subscribed: {v}"));
                assert_eq!(
                    seq,
                    last + 1,
                    "client {k}: {ch} seq {seq} after {last} (gap, duplicate or reorder)"
                );
                assert!(
                    !self.ended.contains_key(&ch),
                    "client {k}: {ch} seq {seq} after its end marker"
                );
                self.last.insert(ch.clone(), seq);
                self.messages += 1;
                if v["data"]["end"] == json!(true) {
                    self.ended.insert(ch, seq);
                }
            }
            Some("subscribed") => {
                let ch = v["channel"]
                    .as_str()
                    .expect("subscribed channel")
                    .to_string();
                let seq = v["seq"].as_u64().expect("subscribed seq");
                let epoch = v["epoch"].as_str().expect("subscribed epoch").to_string();
                self.pending -= 1;
                match self.last.get(&ch) {
                    // A resume: the missed messages follow, from `last + 1`.
                    Some(&last) => {
                        assert_eq!(
                            v["recovered"],
                            json!(true),
                            "client {k}: resume of {ch} since {last} not recovered: {v}"
                        );
                        assert_eq!(
                            self.epoch.get(&ch),
                            Some(&epoch),
                            "client {k}: {ch} epoch changed"
                        );
                        assert!(seq >= last, "client {k}: {ch} went back: {v}");
                    }
                    None => {
                        self.last.insert(ch.clone(), seq);
                        self.epoch.insert(ch, epoch);
                    }
                }
            }
            Some("published") => {}
            _ => panic!("client {k}: unexpected frame {v}"),
        }
    }

    fn done(&self) -> bool {
        self.pending == 0 && self.last.keys().all(|c| self.ended.contains_key(c))
    }
}

/// Sends a (resume) subscribe for every channel the client tracks, or `first` when none.
async fn subscribe_all(ws: &mut Ws, track: &mut Track, first: &str) {
    if track.last.is_empty() {
        track.pending += 1;
        ws.send_json(json!({"type":"subscribe","channel":first}))
            .await;
        return;
    }
    let chans: Vec<(String, u64)> = track.last.iter().map(|(c, s)| (c.clone(), *s)).collect();
    for (ch, since) in chans {
        track.pending += 1;
        let epoch = track.epoch[&ch].clone();
        ws.send_json(json!({"type":"subscribe","channel":ch,"since":since,"epoch":epoch}))
            .await;
    }
}

/// One client: subscribes, reads and acts until it saw the end marker of each of its channels;
/// returns what it tracked.
async fn client(k: usize, run: Arc<Run>) -> Track {
    let kind = kind(k);
    let home = home(k);
    let mut track = Track::default();
    let mut ws = Ws::connect(&run.url).await;
    subscribe_all(&mut ws, &mut track, &home).await;
    if kind == Kind::Slow {
        track.pending += 1;
        ws.send_json(json!({"type":"subscribe","channel":HUGE}))
            .await;
    }
    // Actions come at different periods per client, all longer than the park period.
    let period = Duration::from_millis(150 + (k as u64 * 37) % 200);
    let mut next = Instant::now() + period;
    let mut acts = 0u64;
    let mut joined = false;
    let mut sent = 0u64;
    let mut last_frame = Instant::now();
    let mut paused_in = 0;
    while !track.done() {
        let frame = tokio::select! {
            f = ws.inner.next() => f,
            _ = tokio::time::sleep_until(next) => {
                next = Instant::now() + period;
                acts += 1;
                // Something stalled (a parked session nobody wakes): fail rather than hang.
                assert!(
                    last_frame.elapsed() < STALL,
                    "client {k} ({kind:?}): no frame for {STALL:?}; last seqs {:?}, ended {:?}",
                    track.last,
                    track.ended
                );
                if run.quiet.load(Ordering::SeqCst) {
                    let ep = run.episode.load(Ordering::SeqCst);
                    if kind == Kind::Slow && ep != paused_in {
                        // Not a byte read through the whole big burst: the socket fills,
                        // a direct write blocks, and only a wake of the parked session
                        // writes the rest.
                        paused_in = ep;
                        run.pausing.fetch_add(1, Ordering::SeqCst);
                        while !run.burst_done.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        last_frame = Instant::now();
                    }
                    continue;
                }
                if run.stop.load(Ordering::SeqCst) {
                    if kind == Kind::Joiner && !joined {
                        joined = true;
                        run.joined.fetch_add(1, Ordering::SeqCst);
                    }
                    continue;
                }
                match kind {
                    Kind::Reader => {}
                    Kind::Slow => {
                        if acts % 2 == 0 {
                            tokio::time::sleep(Duration::from_millis(400)).await;
                        }
                    }
                    Kind::Pinger => ws.send_msg(Message::Ping(b"churn".to_vec().into())).await,
                    Kind::Publisher => {
                        sent += 1;
                        ws.send_json(json!({"type":"publish","channel":home,"data":{"from":k,"n":sent},"id":sent})).await;
                    }
                    Kind::Joiner => {
                        if !joined && track.pending == 0 {
                            joined = true;
                            track.pending += 1;
                            ws.send_json(json!({"type":"subscribe","channel":EXTRA,"id":"x"})).await;
                        }
                    }
                    Kind::Reconnector => {
                        if acts % 3 == 0 && track.pending == 0 {
                            if acts % 2 == 0 {
                                // A reset.
                                if let tokio_tungstenite::MaybeTlsStream::Plain(s) = ws.inner.get_ref() {
                                    socket2::SockRef::from(s).set_linger(Some(Duration::ZERO)).unwrap();
                                }
                            }
                            // Dropped without a close frame: a FIN, or the reset above.
                            drop(ws);
                            ws = Ws::connect(&run.url).await;
                            run.reconnects.fetch_add(1, Ordering::SeqCst);
                            subscribe_all(&mut ws, &mut track, &home).await;
                        }
                    }
                }
                continue;
            }
        };
        last_frame = Instant::now();
        match frame {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str())
                    .unwrap_or_else(|e| panic!("client {k}: non-JSON {t:?}: {e}"));
                let was_pending = track.pending;
                track.frame(k, &v);
                if let Some(&seq) = track.last.get(&home) {
                    run.seen[k].store(seq, Ordering::SeqCst);
                }
                if let Some(&seq) = track.last.get(HUGE) {
                    run.seen_huge[k].store(seq, Ordering::SeqCst);
                }
                if kind == Kind::Joiner
                    && was_pending > track.pending
                    && v["channel"] == json!(EXTRA)
                {
                    run.joined.fetch_add(1, Ordering::SeqCst);
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            other => panic!("client {k} ({kind:?}): connection ended: {other:?}"),
        }
    }
    ws.close_cleanly().await;
    track
}

/// Polls `relay_parked_sessions` until `stop`, returning the highest value seen.
async fn watch_parked(relay: Arc<Relay>, stop: Arc<AtomicBool>) -> f64 {
    let mut max: f64 = 0.0;
    while !stop.load(Ordering::SeqCst) {
        max = max.max(relay.metric("relay_parked_sessions").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_over_parked_sessions_loses_and_reorders_nothing() {
    let relay = Arc::new(Relay::start(&server_args()));
    let run = Arc::new(Run {
        url: relay.ws_url(),
        stop: AtomicBool::new(false),
        joined: AtomicUsize::new(0),
        reconnects: AtomicU64::new(0),
        quiet: AtomicBool::new(false),
        seen: (0..CLIENTS).map(|_| AtomicU64::new(0)).collect(),
        seen_huge: (0..CLIENTS).map(|_| AtomicU64::new(0)).collect(),
        episode: AtomicU64::new(0),
        pausing: AtomicUsize::new(0),
        burst_done: AtomicBool::new(false),
    });
    let slow = (0..CLIENTS).filter(|k| kind(*k) == Kind::Slow).count();
    let mut clients = Vec::new();
    for k in 0..CLIENTS {
        clients.push(tokio::spawn(client(k, run.clone())));
    }
    // Everybody subscribed (the extra channel exists only once joined).
    for i in 0..CHANNELS {
        let on = (0..CLIENTS).filter(|k| home(*k) == channel(i)).count();
        relay
            .wait_subscribers(&channel(i), on as u64, RECV_TIMEOUT)
            .await;
    }
    relay
        .wait_subscribers(HUGE, slow as u64, RECV_TIMEOUT)
        .await;
    let watching = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_parked(relay.clone(), watching.clone()));

    // The publisher: a burst on every channel, then a pause of several park periods.
    let pad = "p".repeat(BIG_PAD);
    // The longest wait for the clients to drain a big burst (reported).
    let mut drained = Duration::ZERO;
    for round in 0..ROUNDS {
        let big = round % BIG_EVERY == BIG_EVERY - 1;
        let (count, size) = if big { (BIG_COUNT, BIG_PAD) } else { (10, 0) };
        if big {
            run.burst_done.store(false, Ordering::SeqCst);
            run.pausing.store(0, Ordering::SeqCst);
            run.episode.fetch_add(1, Ordering::SeqCst);
            run.quiet.store(true, Ordering::SeqCst);
            let deadline = Instant::now() + STALL;
            while run.pausing.load(Ordering::SeqCst) < slow {
                assert!(Instant::now() < deadline, "the slow clients never paused");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut burst = Vec::new();
        for i in 0..CHANNELS {
            let relay = relay.clone();
            let pad = pad[..size].to_string();
            burst.push(tokio::spawn(async move {
                let mut top = 0;
                for n in 0..count {
                    top = relay
                        .publish_seq(&channel(i), json!({"round": round, "n": n, "pad": pad}))
                        .await;
                }
                top
            }));
        }
        let mut huge_top = 0;
        if big {
            let huge = "h".repeat(HUGE_PAD);
            for n in 0..HUGE_COUNT {
                relay
                    .publish_seq(HUGE, json!({"round": round, "n": n, "pad": huge}))
                    .await;
            }
            let hugest = "H".repeat(HUGEST_PAD);
            huge_top = relay
                .publish_seq(HUGE, json!({"round": round, "pad": hugest}))
                .await;
        }
        let mut tops = Vec::new();
        for b in burst {
            tops.push(b.await.unwrap());
        }
        run.burst_done.store(true, Ordering::SeqCst);
        if big {
            // Nothing else is published or sent until every client has the whole burst.
            let began = Instant::now();
            let deadline = began + STALL;
            for k in 0..CLIENTS {
                let top = tops[(k + k / 6) % CHANNELS];
                let huge = if kind(k) == Kind::Slow { huge_top } else { 0 };
                while run.seen[k].load(Ordering::SeqCst) < top
                    || run.seen_huge[k].load(Ordering::SeqCst) < huge
                {
                    assert!(
                        Instant::now() < deadline,
                        "client {k} ({:?}) stuck at {} of {top} after a big burst",
                        kind(k),
                        run.seen[k].load(Ordering::SeqCst)
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            drained = drained.max(began.elapsed());
            run.quiet.store(false, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The clients stop acting; once the joiners are in, an end marker on every channel.
    run.stop.store(true, Ordering::SeqCst);
    let joiners = (0..CLIENTS).filter(|k| kind(*k) == Kind::Joiner).count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while run.joined.load(Ordering::SeqCst) < joiners {
        assert!(Instant::now() < deadline, "the joiners never joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ends = HashMap::new();
    for ch in (0..CHANNELS)
        .map(channel)
        .chain([EXTRA.to_string(), HUGE.to_string()])
    {
        let seq = relay.publish_seq(&ch, json!({"end": true})).await;
        ends.insert(ch, seq);
    }

    let mut messages = 0;
    for (k, c) in clients.into_iter().enumerate() {
        let track = c.await.unwrap_or_else(|e| panic!("client {k}: {e}"));
        for (ch, seq) in &track.ended {
            assert_eq!(Some(seq), ends.get(ch), "client {k}: end marker of {ch}");
        }
        let home = home(k);
        assert!(
            track.ended.contains_key(&home),
            "client {k}: never on {home}"
        );
        messages += track.messages;
    }
    watching.store(true, Ordering::SeqCst);
    let max_parked = watcher.await.unwrap();
    let metrics = relay.scrape().await;
    let count = |name| sample(&metrics, name).unwrap_or(0.0);
    eprintln!(
        "churn: {messages} messages checked, {} reconnections, up to {max_parked} sessions \
         parked, {} direct writes, {} writer wakes, big bursts drained within {drained:?}, \
         ends {ends:?}",
        run.reconnects.load(Ordering::SeqCst),
        count("relay_direct_writes_total"),
        count("relay_writer_wakes_total"),
    );
    // Proof that the run exercised the parking lot: most of the fleet was parked at once.
    assert!(
        max_parked >= (CLIENTS / 2) as f64,
        "at most {max_parked} of {CLIENTS} sessions were parked"
    );
    assert!(run.reconnects.load(Ordering::SeqCst) > 0);

    // Everybody is gone: nothing is left parked or counted.
    relay
        .wait_metric("relay_connections{transport=\"ws\"}", 0.0)
        .await;
    relay.wait_metric("relay_parked_sessions", 0.0).await;
    assert_eq!(
        relay.metric("relay_slow_consumers_total").await,
        0.0,
        "nobody went over the outbox limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_most_sessions_parked_closes_each_with_1012() {
    let mut args = server_args();
    args.extend(["--drain-period", "0s", "--shutdown-timeout", "5s"]);
    let mut relay = Relay::start(&args);
    let mut clients = Vec::new();
    for k in 0..80 {
        let mut ws = Ws::connect(&relay.ws_url()).await;
        ws.subscribe(&channel(k % CHANNELS)).await;
        clients.push(ws);
    }
    for i in 0..CHANNELS {
        relay.publish(&channel(i), json!({"n": 1})).await;
    }
    for (k, ws) in clients.iter_mut().enumerate() {
        ws.expect_message(&channel(k % CHANNELS), 1).await;
    }
    // A few stay busy (they ping), the rest park.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for ws in clients.iter_mut().take(5) {
            ws.inner
                .send(Message::Ping(b"busy".to_vec().into()))
                .await
                .unwrap();
        }
        let parked = relay.metric("relay_parked_sessions").await;
        if parked >= 60.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {parked} of 80 sessions parked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.terminate_expecting_1012(clients).await;
}
