//! The NATS backplane: JetStream sequences and keeps history, core NATS fans out.
//!
//! # Subjects, per channel `ch` (hex-encoded: channel names may hold `.`)
//! - `relay.log.<hex>`: what publishers write, captured by the stream `RELAY`
//!   (`max_msgs_per_subject` = history size, `max_age` = history TTL, direct get allowed).
//! - `relay.msg.<hex>`: the stream **republishes** every message it stored there (core NATS):
//!   nodes subscribe to it while they have local subscribers. A message the stream refused is
//!   never republished, so subscribers only ever see sequenced messages, in stream order.
//!
//! # Sequence scheme
//! Every stored message carries headers `Relay-Epoch`, `Relay-Seq`, `Relay-Kind`, `Relay-Time`.
//! A publish reads the subject's last message (cached per node, per channel) and publishes
//! `seq = last + 1` in its epoch with `Nats-Expected-Last-Subject-Sequence` = the last message's
//! stream sequence: JetStream refuses it if another publish got there first, and the publisher
//! reads again and retries. So seqs per channel are gap-free and unique across nodes (optimistic
//! concurrency; publishes of one node on one channel are serialized to avoid refusing each
//! other). A subject with no message (new, or its history expired) starts a new epoch at seq 1.
//! A node that joins an empty channel writes an *epoch marker* (`Relay-Seq: 0`, kind `e`) so that
//! its subscribers and the first publish agree on the epoch; markers are never delivered.
//!
//! Joining, ingesting, resyncing and failure handling follow the Redis backplane (see
//! [`super::redis`]): subscribe first, then read the stored messages, adopt them
//! ([`Engine::ingest`] or [`Engine::reset`]), then ingest what came meanwhile. Reconnection is
//! async-nats's, with full-jitter exponential backoff; every joined channel resyncs after it.
//!
//! # Presence
//! A second stream `RELAY_PRESENCE` (subjects `relay.pres.<channel>.<client>`, one message per
//! subject, `max_age` = 3 × presence timeout) holds each member's record (node, user, info;
//! header `Relay-Expiry`); a leave writes an empty record. Joins and leaves are also announced
//! on the channel's fan-out subject. See [`super::presence`] for the rest (shared with Redis).
//!
//! [`Engine::ingest`]: crate::engine::Engine::ingest
//! [`Engine::reset`]: crate::engine::Engine::reset

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::presence::{decode_member, encode_member, Mirror, PresenceOp};
use super::{backoff, instant_of, wall_ms, Backplane, BackplaneError, BoxFuture, Wakers};
use crate::engine::{Engine, History, IngestOutcome, Publication, RemoteEntry};
use crate::types::{ChannelName, DataKind, Epoch, StreamPosition};

const STREAM: &str = "RELAY";
const PRESENCE_STREAM: &str = "RELAY_PRESENCE";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
const LINGER: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(500);
const SYNC_BUFFER: usize = 100_000;
const PUBLISH_ATTEMPTS: usize = 100;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// See the module docs.
pub struct NatsBackplane {
    inner: Arc<Inner>,
}

struct Inner {
    settings: super::Settings,
    engine: Arc<Engine>,
    wakers: Wakers,
    rt: tokio::runtime::Handle,
    client: ArcSwapOption<async_nats::Client>,
    js: ArcSwapOption<jetstream::Context>,
    stream: ArcSwapOption<jetstream::stream::Stream>,
    presence_stream: ArcSwapOption<jetstream::stream::Stream>,
    /// Connected and the stream exists.
    ready: AtomicBool,
    chans: Mutex<HashMap<ChannelName, Chan>>,
    /// Per channel: the last message this node knows of (publish cache), behind a lock that
    /// serializes this node's publishes on the channel.
    lasts: Mutex<HashMap<ChannelName, Arc<tokio::sync::Mutex<Option<Last>>>>>,
    epochs: AtomicU64,
    metrics: Metrics,
}

struct Metrics {
    up: Gauge,
    reconnects: Counter,
    publish: Histogram,
    resyncs: Counter,
}

/// The last message of a subject: stream sequence, epoch, channel seq.
#[derive(Clone, Copy, Debug)]
struct Last {
    stream_seq: u64,
    epoch: Epoch,
    seq: u64,
}

struct Chan {
    synced: bool,
    ever_synced: bool,
    sync_id: u64,
    buf: Vec<Msg>,
    buf_overflow: bool,
    waiters: Vec<oneshot::Sender<Result<(), BackplaneError>>>,
    last_join: Instant,
    idle_ticks: u32,
    reader: Option<tokio::task::JoinHandle<()>>,
    presence: Mirror,
}

impl Chan {
    fn new(now: Instant) -> Self {
        Self {
            synced: false,
            ever_synced: false,
            sync_id: 0,
            buf: Vec::new(),
            buf_overflow: false,
            waiters: Vec::new(),
            last_join: now,
            idle_ticks: 0,
            reader: None,
            presence: Mirror::default(),
        }
    }

    fn fail_waiters(&mut self, why: &str) {
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(BackplaneError::Unavailable(why.to_owned())));
        }
    }
}

impl Drop for Chan {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

#[derive(Clone, Debug)]
struct Msg {
    epoch: Epoch,
    seq: u64,
    kind: DataKind,
    ms: u64,
    data: Bytes,
    /// An epoch marker (never delivered).
    marker: bool,
}

fn hex(ch: &ChannelName) -> String {
    let mut s = String::with_capacity(ch.as_str().len() * 2);
    for b in ch.as_str().bytes() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn log_subject(ch: &ChannelName) -> String {
    format!("relay.log.{}", hex(ch))
}

fn msg_subject(ch: &ChannelName) -> String {
    format!("relay.msg.{}", hex(ch))
}

fn presence_subject(ch: &ChannelName, client: &str) -> String {
    let mut s = format!("relay.pres.{}.", hex(ch));
    for b in client.bytes() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex(s: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn unavailable(e: impl std::fmt::Display) -> BackplaneError {
    BackplaneError::Unavailable(e.to_string())
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).map(|v| v.as_str())
}

fn parse_headers(h: &HeaderMap, data: Bytes) -> Option<Msg> {
    let epoch = Epoch::parse(header(h, "Relay-Epoch")?)?;
    let seq = header(h, "Relay-Seq")?.parse().ok()?;
    let (kind, marker) = match header(h, "Relay-Kind")? {
        "j" => (DataKind::Json, false),
        "b" => (DataKind::Binary, false),
        "e" => (DataKind::Json, true),
        _ => return None,
    };
    let ms = header(h, "Relay-Time")?.parse().ok()?;
    Some(Msg {
        epoch,
        seq,
        kind,
        ms,
        data,
        marker,
    })
}

fn headers(epoch: Epoch, seq: u64, kind: &str, expect: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        expect.to_string().as_str(),
    );
    h.insert("Relay-Epoch", epoch.to_string().as_str());
    h.insert("Relay-Seq", seq.to_string().as_str());
    h.insert("Relay-Kind", kind);
    h.insert("Relay-Time", wall_ms().to_string().as_str());
    h
}

struct Snapshot {
    epoch: Epoch,
    top: u64,
    mode_since: bool,
    /// Ascending.
    entries: Vec<Msg>,
}

impl NatsBackplane {
    /// Starts the backplane on its own thread and runtime; connects (and reconnects) until
    /// `stop`. Returns at once; the node is not ready until connected with the stream in place.
    pub fn start(
        settings: super::Settings,
        engine: Arc<Engine>,
        wakers: Wakers,
        stop: CancellationToken,
    ) -> std::io::Result<Arc<Self>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let inner = Arc::new(Inner {
            engine,
            wakers,
            rt: rt.handle().clone(),
            client: ArcSwapOption::empty(),
            js: ArcSwapOption::empty(),
            stream: ArcSwapOption::empty(),
            presence_stream: ArcSwapOption::empty(),
            ready: AtomicBool::new(false),
            chans: Mutex::new(HashMap::new()),
            lasts: Mutex::new(HashMap::new()),
            epochs: AtomicU64::new(0),
            metrics: Metrics {
                up: gauge!("relay_backplane_up", "backplane" => "nats"),
                reconnects: counter!("relay_backplane_reconnects_total", "backplane" => "nats"),
                publish: histogram!("relay_backplane_publish_seconds", "backplane" => "nats"),
                resyncs: counter!("relay_backplane_resyncs_total", "backplane" => "nats"),
            },
            settings,
        });
        inner.metrics.up.set(0.0);
        let sup = inner.clone();
        std::thread::Builder::new()
            .name("relay-backplane".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::spawn(maintenance(sup.clone(), stop.clone()));
                    supervise(sup, stop).await;
                });
            })?;
        Ok(Arc::new(NatsBackplane { inner }))
    }
}

async fn supervise(inner: Arc<Inner>, stop: CancellationToken) {
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let seed = inner.settings.seed;
    let opts = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(move |attempt| {
            backoff(
                attempt.min(30) as u32,
                BACKOFF_BASE,
                BACKOFF_CAP,
                crate::engine::mix_public(seed ^ wall_ms(), attempt as u64),
            )
        })
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e);
            }
        });
    let client = match opts.connect(inner.settings.url.as_str()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, url = %inner.settings.url, "backplane: bad nats setup");
            return;
        }
    };
    inner
        .js
        .store(Some(Arc::new(jetstream::new(client.clone()))));
    inner.client.store(Some(Arc::new(client)));
    let mut connects = 0u64;
    // The first connection may already be up when the callback is installed: check once.
    let mut pending_check = true;
    loop {
        if pending_check {
            pending_check = false;
            let connected =
                inner.client.load().as_ref().is_some_and(|c| {
                    c.connection_state() == async_nats::connection::State::Connected
                });
            if connected && !inner.ready.load(Ordering::Acquire) {
                connects += 1;
                inner.on_connected(connects, &stop).await;
            }
        }
        let e = tokio::select! {
            e = events.recv() => e,
            _ = stop.cancelled() => break,
        };
        match e {
            Some(async_nats::Event::Connected) => {
                connects += 1;
                inner.on_connected(connects, &stop).await;
            }
            Some(async_nats::Event::Disconnected) | Some(async_nats::Event::Closed) => {
                inner.ready.store(false, Ordering::Release);
                inner.metrics.up.set(0.0);
                inner.lasts.lock().clear();
                let mut chans = inner.chans.lock();
                chans.retain(|_, c| {
                    if !c.synced {
                        c.fail_waiters("lost the connection to nats");
                    }
                    c.ever_synced
                });
                tracing::warn!(node = %inner.settings.node_id, "backplane: lost the connection to nats");
            }
            Some(other) => tracing::debug!(event = %other, "backplane: nats event"),
            None => break,
        }
    }
    if let Some(c) = inner.client.load_full() {
        let _ = tokio::time::timeout(Duration::from_millis(500), c.drain()).await;
    }
}

impl Inner {
    async fn on_connected(self: &Arc<Self>, connects: u64, stop: &CancellationToken) {
        let Some(js) = self.js.load_full() else {
            return;
        };
        let config = jetstream::stream::Config {
            name: STREAM.to_owned(),
            subjects: vec!["relay.log.>".to_owned()],
            max_messages_per_subject: self.settings.history_size.max(1) as i64,
            max_age: self.settings.history_ttl,
            storage: jetstream::stream::StorageType::File,
            allow_direct: true,
            republish: Some(jetstream::stream::Republish {
                source: "relay.log.>".to_owned(),
                destination: "relay.msg.>".to_owned(),
                headers_only: false,
            }),
            ..Default::default()
        };
        let mut attempt = 0;
        let stream = loop {
            match tokio::time::timeout(COMMAND_TIMEOUT, js.get_or_create_stream(config.clone()))
                .await
            {
                Ok(Ok(s)) => break s,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "backplane: cannot set up the RELAY stream");
                }
                Err(_) => tracing::warn!("backplane: timed out setting up the RELAY stream"),
            }
            attempt += 1;
            let d = backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, self.random());
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = stop.cancelled() => return,
            }
        };
        self.stream.store(Some(Arc::new(stream)));
        let presence = jetstream::stream::Config {
            name: PRESENCE_STREAM.to_owned(),
            subjects: vec!["relay.pres.>".to_owned()],
            max_messages_per_subject: 1,
            max_age: (self.settings.presence_timeout * 3).max(Duration::from_secs(1)),
            storage: jetstream::stream::StorageType::File,
            allow_direct: true,
            ..Default::default()
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, js.get_or_create_stream(presence)).await {
            Ok(Ok(s)) => self.presence_stream.store(Some(Arc::new(s))),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "backplane: no presence stream; presence stays per node")
            }
            Err(_) => tracing::warn!("backplane: timed out setting up the presence stream"),
        }
        self.ready.store(true, Ordering::Release);
        self.metrics.up.set(1.0);
        if connects > 1 {
            self.metrics.reconnects.increment(1);
            tracing::info!(node = %self.settings.node_id, "backplane: reconnected to nats; resyncing channels");
        } else {
            tracing::info!(node = %self.settings.node_id, url = %self.settings.url, "backplane: connected to nats");
        }
        self.resync_all();
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn random(&self) -> u64 {
        crate::engine::mix_public(
            self.settings.seed ^ wall_ms(),
            self.epochs.fetch_add(1, Ordering::Relaxed),
        )
    }

    fn candidate_epoch(&self) -> Epoch {
        let n = self.epochs.fetch_add(1, Ordering::Relaxed);
        Epoch(crate::engine::mix_public(self.settings.seed, n) | 1 << 60)
    }

    fn parts(
        &self,
    ) -> Result<(Arc<jetstream::Context>, Arc<jetstream::stream::Stream>), BackplaneError> {
        if !self.is_ready() {
            return Err(unavailable("nats is unavailable"));
        }
        match (self.js.load_full(), self.stream.load_full()) {
            (Some(js), Some(s)) => Ok((js, s)),
            _ => Err(unavailable("nats is unavailable")),
        }
    }

    /// The subject's last message, or `None` when it has none.
    async fn last(
        &self,
        stream: &jetstream::stream::Stream,
        ch: &ChannelName,
    ) -> Result<Option<(u64, Msg)>, BackplaneError> {
        use jetstream::stream::DirectGetErrorKind;
        match tokio::time::timeout(
            COMMAND_TIMEOUT,
            stream.direct_get_last_for_subject(log_subject(ch)),
        )
        .await
        {
            Err(_) => Err(unavailable("nats timed out")),
            Ok(Err(e)) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Ok(Err(e)) => Err(unavailable(e)),
            Ok(Ok(m)) => {
                let msg = parse_headers(&m.headers, m.payload).ok_or_else(|| {
                    BackplaneError::Protocol("a message without relay headers".into())
                })?;
                Ok(Some((m.sequence, msg)))
            }
        }
    }

    /// Every stored message of `ch` up to stream sequence `until`, ascending (markers included).
    async fn walk(
        &self,
        stream: &jetstream::stream::Stream,
        ch: &ChannelName,
        until: u64,
    ) -> Result<Vec<Msg>, BackplaneError> {
        use jetstream::stream::DirectGetErrorKind;
        let subject = log_subject(ch);
        let mut out = Vec::new();
        let mut from = None;
        for _ in 0..=self.settings.history_size.max(1) + 1 {
            let r = tokio::time::timeout(
                COMMAND_TIMEOUT,
                stream.direct_get_next_for_subject(subject.clone(), from),
            )
            .await;
            let m = match r {
                Err(_) => return Err(unavailable("nats timed out")),
                Ok(Err(e)) if e.kind() == DirectGetErrorKind::NotFound => break,
                Ok(Err(e)) => return Err(unavailable(e)),
                Ok(Ok(m)) => m,
            };
            if m.sequence > until {
                break;
            }
            let seq = m.sequence;
            if let Some(msg) = parse_headers(&m.headers, m.payload) {
                out.push(msg);
            }
            if seq >= until {
                break;
            }
            from = Some(seq + 1);
        }
        Ok(out)
    }

    /// Publishes with the optimistic-concurrency header; `Ok(None)` when another publish won.
    async fn try_publish(
        &self,
        js: &jetstream::Context,
        ch: &ChannelName,
        h: HeaderMap,
        data: Bytes,
    ) -> Result<Option<u64>, BackplaneError> {
        use jetstream::context::PublishErrorKind;
        let r = tokio::time::timeout(COMMAND_TIMEOUT, async {
            let ack = js.publish_with_headers(log_subject(ch), h, data).await?;
            ack.await
        })
        .await;
        match r {
            Err(_) => Err(unavailable("nats timed out")),
            Ok(Ok(ack)) => Ok(Some(ack.sequence)),
            Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Ok(Err(e)) => Err(unavailable(e)),
        }
    }

    /// The state of `ch` for a join: its last message (an epoch marker is written first when
    /// the subject is empty) and, from `since` when it can, the stored messages.
    async fn snapshot(
        &self,
        ch: &ChannelName,
        since: Option<StreamPosition>,
    ) -> Result<Snapshot, BackplaneError> {
        let (js, stream) = self.parts()?;
        for _ in 0..PUBLISH_ATTEMPTS {
            let Some((stream_seq, last)) = self.last(&stream, ch).await? else {
                let h = headers(self.candidate_epoch(), 0, "e", 0);
                self.try_publish(&js, ch, h, Bytes::new()).await?;
                continue;
            };
            let all = self.walk(&stream, ch, stream_seq).await?;
            let entries: Vec<Msg> = all
                .into_iter()
                .filter(|m| !m.marker && m.epoch == last.epoch && m.seq <= last.seq)
                .collect();
            let mode_since = since.is_some_and(|p| {
                p.epoch == last.epoch
                    && p.seq <= last.seq
                    && (p.seq == last.seq || entries.first().is_some_and(|f| f.seq <= p.seq + 1))
            });
            let entries = match (mode_since, since) {
                (true, Some(p)) => entries.into_iter().filter(|m| m.seq > p.seq).collect(),
                _ => entries,
            };
            return Ok(Snapshot {
                epoch: last.epoch,
                top: last.seq,
                mode_since,
                entries,
            });
        }
        Err(unavailable("could not read the channel's state"))
    }

    fn start_sync(self: &Arc<Self>, name: &ChannelName, c: &mut Chan) {
        c.synced = false;
        c.sync_id += 1;
        c.presence.restart();
        self.metrics.resyncs.increment(1);
        let id = c.sync_id;
        let me = self.clone();
        let name = name.clone();
        self.rt.spawn(async move { me.sync(name, id).await });
    }

    async fn sync(self: Arc<Self>, name: ChannelName, id: u64) {
        let mut attempt = 0;
        loop {
            let current = self
                .chans
                .lock()
                .get(&name)
                .is_some_and(|c| c.sync_id == id && !c.synced);
            if !current || !self.is_ready() {
                return;
            }
            let since = self.engine.position(&name);
            match self.snapshot(&name, since).await {
                Ok(s) => {
                    self.apply_sync(&name, id, since, s);
                    return;
                }
                Err(e) => {
                    tracing::warn!(channel = %name, error = %e, "backplane sync failed; retrying");
                    attempt += 1;
                    if attempt >= 5 {
                        if let Some(c) = self.chans.lock().get_mut(&name) {
                            c.fail_waiters("the channel could not be synced from nats");
                        }
                    }
                    let d = backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, self.random());
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    fn apply_sync(
        self: &Arc<Self>,
        name: &ChannelName,
        id: u64,
        since: Option<StreamPosition>,
        s: Snapshot,
    ) {
        let mut chans = self.chans.lock();
        let Some(c) = chans.get_mut(name) else {
            return;
        };
        if c.sync_id != id || c.synced {
            return;
        }
        let now = Instant::now();
        let now_ms = wall_ms();
        let mut wake = 0;
        let mut continuous = s.mode_since && since.is_some_and(|p| p.epoch == s.epoch);
        if continuous {
            for m in &s.entries {
                let at = instant_of(m.ms, now, now_ms);
                match self
                    .engine
                    .ingest(name, s.epoch, m.seq, m.kind, m.data.clone(), at, now)
                {
                    IngestOutcome::Appended(w) => wake |= w,
                    IngestOutcome::Duplicate => {}
                    IngestOutcome::Gap { .. } | IngestOutcome::OtherEpoch => {
                        continuous = false;
                        break;
                    }
                }
            }
            if continuous && self.engine.position(name).map(|p| p.seq) != Some(s.top) {
                continuous = false;
            }
        }
        if !continuous {
            let entries = s
                .entries
                .iter()
                .map(|m| RemoteEntry {
                    seq: m.seq,
                    at: instant_of(m.ms, now, now_ms),
                    kind: m.kind,
                    data: m.data.clone(),
                })
                .collect();
            wake |= self.engine.reset(name, s.epoch, s.top, entries, now);
        }
        let mut again = c.buf_overflow;
        c.buf_overflow = false;
        for m in std::mem::take(&mut c.buf) {
            if m.marker {
                if self.engine.position(name).map(|p| p.epoch) != Some(m.epoch) {
                    again = true;
                }
                continue;
            }
            let at = instant_of(m.ms, now, now_ms);
            match self
                .engine
                .ingest(name, m.epoch, m.seq, m.kind, m.data, at, now)
            {
                IngestOutcome::Appended(w) => wake |= w,
                IngestOutcome::Duplicate => {}
                IngestOutcome::Gap { .. } | IngestOutcome::OtherEpoch => again = true,
            }
        }
        if again {
            self.start_sync(name, c);
        } else {
            c.synced = true;
            c.ever_synced = true;
            for w in c.waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
        }
        drop(chans);
        self.wakers.wake(wake);
    }

    fn on_message(self: &Arc<Self>, name: &ChannelName, m: async_nats::Message) {
        if let Some(op) = m.headers.as_ref().and_then(|h| header(h, "Relay-Presence")) {
            let client = m
                .headers
                .as_ref()
                .and_then(|h| header(h, "Relay-Client"))
                .unwrap_or_default();
            let now = Instant::now();
            let mut chans = self.chans.lock();
            let Some(c) = chans.get_mut(name) else {
                return;
            };
            let me = self.settings.node_id.as_str();
            let wake = match op {
                "+" => match decode_member(client, &m.payload) {
                    Some((node, who)) => c.presence.joined(&self.engine, name, me, &node, who, now),
                    None => 0,
                },
                "-" => c.presence.left(&self.engine, name, client, now),
                _ => 0,
            };
            drop(chans);
            self.wakers.wake(wake);
            return;
        }
        let Some(msg) = m
            .headers
            .as_ref()
            .and_then(|h| parse_headers(h, m.payload.clone()))
        else {
            return;
        };
        let mut chans = self.chans.lock();
        let Some(c) = chans.get_mut(name) else {
            return;
        };
        if !c.synced {
            if c.buf.len() < SYNC_BUFFER {
                c.buf.push(msg);
            } else {
                c.buf_overflow = true;
            }
            return;
        }
        if msg.marker {
            if self.engine.position(name).map(|p| p.epoch) != Some(msg.epoch) {
                self.start_sync(name, c);
            }
            return;
        }
        let now = Instant::now();
        let at = instant_of(msg.ms, now, wall_ms());
        match self.engine.ingest(
            name,
            msg.epoch,
            msg.seq,
            msg.kind,
            msg.data.clone(),
            at,
            now,
        ) {
            IngestOutcome::Appended(w) => {
                drop(chans);
                self.wakers.wake(w);
            }
            IngestOutcome::Duplicate => {}
            IngestOutcome::Gap { .. } | IngestOutcome::OtherEpoch => {
                c.buf.push(msg);
                self.start_sync(name, c);
            }
        }
    }

    fn resync_all(self: &Arc<Self>) {
        let mut chans = self.chans.lock();
        let names: Vec<ChannelName> = chans.keys().cloned().collect();
        for name in names {
            if let Some(c) = chans.get_mut(&name) {
                self.start_sync(&name, c);
            }
        }
    }

    /// Subscribes to the channel's fan-out subject, then syncs, then reads messages.
    fn start_reader(self: &Arc<Self>, name: ChannelName) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        self.rt.spawn(async move {
            let Some(client) = me.client.load_full() else {
                return;
            };
            let sub = tokio::time::timeout(COMMAND_TIMEOUT, async {
                let s = client.subscribe(msg_subject(&name)).await?;
                client.flush().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(s)
            })
            .await;
            let mut sub = match sub {
                Ok(Ok(s)) => s,
                _ => {
                    let mut chans = me.chans.lock();
                    if let Some(c) = chans.get_mut(&name) {
                        c.fail_waiters("cannot subscribe: nats is unavailable");
                        if !c.ever_synced {
                            chans.remove(&name);
                        }
                    }
                    return;
                }
            };
            {
                let mut chans = me.chans.lock();
                match chans.get_mut(&name) {
                    Some(c) => me.start_sync(&name, c),
                    None => return,
                }
            }
            while let Some(m) = sub.next().await {
                me.on_message(&name, m);
            }
        })
    }

    fn maintain(&self, now: Instant) -> Vec<(ChannelName, Vec<PresenceOp>, bool)> {
        let mut chans = self.chans.lock();
        let mut idle = Vec::new();
        for (name, c) in chans.iter_mut() {
            let quiet = self.engine.local_subscribers(name) == 0
                && c.waiters.is_empty()
                && now.saturating_duration_since(c.last_join) > LINGER;
            if quiet {
                c.idle_ticks += 1;
                if c.idle_ticks >= 2 {
                    idle.push(name.clone());
                }
            } else {
                c.idle_ticks = 0;
            }
        }
        let mut wake = 0;
        for name in idle {
            // Drop aborts the reader: unsubscribes.
            if let Some(c) = chans.remove(&name) {
                wake |= std::mem::take(&mut { c }.presence).clear(&self.engine, &name, now);
            }
        }
        let timeout = self.settings.presence_timeout;
        let work = chans
            .iter_mut()
            .filter(|(name, c)| c.synced && self.engine.has_presence(name))
            .filter_map(|(name, c)| {
                c.presence
                    .plan(&self.engine, name, timeout, now)
                    .map(|(ops, reconcile)| (name.clone(), ops, reconcile))
            })
            .collect();
        drop(chans);
        self.wakers.wake(wake);
        // The publish cache only saves a read: drop the entries no publish is using.
        self.lasts.lock().retain(|_, l| Arc::strong_count(l) > 1);
        work
    }

    /// Writes this node's presence changes for `name` and, when `reconcile`, adopts the members
    /// of the other nodes that the presence stream lists.
    async fn run_presence(
        self: &Arc<Self>,
        name: &ChannelName,
        ops: Vec<PresenceOp>,
        reconcile: bool,
    ) {
        let (Ok((js, _)), Some(stream), Some(client)) = (
            self.parts(),
            self.presence_stream.load_full(),
            self.client.load_full(),
        ) else {
            return;
        };
        let timeout_ms = self.settings.presence_timeout.as_millis() as u64;
        let expiry = wall_ms() + timeout_ms;
        let me = self.settings.node_id.as_str();
        let mut failed = false;
        for (op, who) in &ops {
            let subject = presence_subject(name, &who.client);
            let (record, exp) = match *op {
                "-" => (Bytes::new(), 0),
                _ => (encode_member(me, who), expiry),
            };
            let mut h = HeaderMap::new();
            h.insert("Relay-Expiry", exp.to_string().as_str());
            let r = tokio::time::timeout(COMMAND_TIMEOUT, async {
                js.publish_with_headers(subject, h, record.clone())
                    .await?
                    .await
            })
            .await;
            if !matches!(r, Ok(Ok(_))) {
                failed = true;
                break;
            }
            if *op != "~" {
                let mut h = HeaderMap::new();
                h.insert("Relay-Presence", *op);
                h.insert("Relay-Client", &*who.client);
                let _ = client
                    .publish_with_headers(msg_subject(name), h, record)
                    .await;
            }
        }
        if failed {
            tracing::warn!(channel = %name, "backplane: presence update failed");
            if let Some(c) = self.chans.lock().get_mut(name) {
                c.presence.restart();
            }
            return;
        }
        if !reconcile {
            return;
        }
        let prefix = format!("relay.pres.{}.", hex(name));
        let mut members = HashMap::new();
        let mut from = None;
        for _ in 0..=self.engine.config().presence.max_members.saturating_add(1) {
            let r = tokio::time::timeout(
                COMMAND_TIMEOUT,
                stream.direct_get_next_for_subject(format!("{prefix}*"), from),
            )
            .await;
            let Ok(Ok(m)) = r else {
                break;
            };
            from = Some(m.sequence + 1);
            let exp: u64 = header(&m.headers, "Relay-Expiry")
                .and_then(|e| e.parse().ok())
                .unwrap_or(0);
            let Some(client) = m.subject.strip_prefix(prefix.as_str()).and_then(unhex) else {
                continue;
            };
            if let Some((node, who)) = decode_member(&client, &m.payload) {
                members.insert(who.client.clone(), (node, who, exp));
            }
        }
        let now = Instant::now();
        let mut chans = self.chans.lock();
        let Some(c) = chans.get_mut(name) else {
            return;
        };
        let wake = c.presence.reconcile(
            &self.engine,
            name,
            me,
            members,
            self.settings.presence_timeout,
            now,
            wall_ms(),
        );
        drop(chans);
        self.wakers.wake(wake);
    }
}

async fn maintenance(inner: Arc<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        for (name, ops, reconcile) in inner.maintain(Instant::now()) {
            inner.run_presence(&name, ops, reconcile).await;
        }
        // Safety net: channels with local subscribers that are not received get joined.
        if inner.is_ready() {
            let missing: Vec<ChannelName> = {
                let chans = inner.chans.lock();
                inner
                    .engine
                    .channels()
                    .into_iter()
                    .filter(|i| i.subscribers > 0 && !chans.contains_key(&i.name))
                    .map(|i| i.name)
                    .collect()
            };
            for name in missing {
                tracing::warn!(channel = %name, "backplane: subscribed channel was not received; joining");
                let reader = inner.start_reader(name.clone());
                let mut c = Chan::new(Instant::now());
                c.reader = Some(reader);
                inner.chans.lock().insert(name, c);
            }
        }
    }
}

impl Backplane for NatsBackplane {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn publish(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
    ) -> BoxFuture<Result<(Epoch, u64), BackplaneError>> {
        let inner = self.inner.clone();
        let ch = channel.clone();
        Box::pin(async move {
            let (js, stream) = inner.parts()?;
            let start = Instant::now();
            let slot = inner.lasts.lock().entry(ch.clone()).or_default().clone();
            let mut cached = slot.lock().await;
            let code = match kind {
                DataKind::Json => "j",
                DataKind::Binary => "b",
            };
            for _ in 0..PUBLISH_ATTEMPTS {
                let last = match *cached {
                    Some(l) => l,
                    None => match inner.last(&stream, &ch).await? {
                        Some((stream_seq, m)) => Last {
                            stream_seq,
                            epoch: m.epoch,
                            seq: m.seq,
                        },
                        None => Last {
                            stream_seq: 0,
                            epoch: inner.candidate_epoch(),
                            seq: 0,
                        },
                    },
                };
                let h = headers(last.epoch, last.seq + 1, code, last.stream_seq);
                match inner.try_publish(&js, &ch, h, data.clone()).await {
                    Ok(Some(stream_seq)) => {
                        *cached = Some(Last {
                            stream_seq,
                            epoch: last.epoch,
                            seq: last.seq + 1,
                        });
                        inner.metrics.publish.record(start.elapsed().as_secs_f64());
                        return Ok((last.epoch, last.seq + 1));
                    }
                    Ok(None) => *cached = None,
                    Err(e) => {
                        *cached = None;
                        return Err(e);
                    }
                }
            }
            Err(unavailable("too much contention on the channel"))
        })
    }

    fn join(&self, channel: &ChannelName) -> Option<BoxFuture<Result<(), BackplaneError>>> {
        let now = Instant::now();
        let mut chans = self.inner.chans.lock();
        let rx = match chans.get_mut(channel) {
            Some(c) => {
                c.last_join = now;
                c.idle_ticks = 0;
                if c.synced {
                    return None;
                }
                let (tx, rx) = oneshot::channel();
                c.waiters.push(tx);
                rx
            }
            None => {
                if !self.inner.is_ready() {
                    return Some(Box::pin(std::future::ready(Err(unavailable(
                        "nats is unavailable",
                    )))));
                }
                let mut c = Chan::new(now);
                let (tx, rx) = oneshot::channel();
                c.waiters.push(tx);
                chans.insert(channel.clone(), c);
                let reader = self.inner.start_reader(channel.clone());
                if let Some(c) = chans.get_mut(channel) {
                    c.reader = Some(reader);
                }
                rx
            }
        };
        Some(Box::pin(async move {
            match tokio::time::timeout(JOIN_TIMEOUT, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(unavailable("the join was abandoned")),
                Err(_) => Err(unavailable("timed out joining the channel")),
            }
        }))
    }

    fn leave(&self, channel: &ChannelName) {
        if let Some(c) = self.inner.chans.lock().get_mut(channel) {
            c.idle_ticks = c.idle_ticks.max(1);
        }
    }

    fn history(
        &self,
        channel: &ChannelName,
        since: u64,
        limit: usize,
    ) -> BoxFuture<Result<History, BackplaneError>> {
        let inner = self.inner.clone();
        let ch = channel.clone();
        Box::pin(async move {
            let (_, stream) = inner.parts()?;
            let limit = limit.min(inner.settings.history_size);
            let Some((stream_seq, last)) = inner.last(&stream, &ch).await? else {
                return Ok(inner.engine.history(&ch, since, limit, Instant::now()));
            };
            let all = inner.walk(&stream, &ch, stream_seq).await?;
            let top = last.seq;
            let now = Instant::now();
            let now_ms = wall_ms();
            let ttl_ms = inner.settings.history_ttl.as_millis() as u64;
            let oldest = top
                .saturating_sub(inner.settings.history_size as u64)
                .saturating_add(1);
            let publications: Vec<Arc<Publication>> = all
                .into_iter()
                .filter(|m| {
                    !m.marker
                        && m.epoch == last.epoch
                        && m.seq > since
                        && m.seq >= oldest
                        && now_ms.saturating_sub(m.ms) <= ttl_ms
                })
                .take(limit)
                .map(|m| {
                    Arc::new(Publication::new(
                        m.seq,
                        instant_of(m.ms, now, now_ms),
                        m.kind,
                        m.data,
                    ))
                })
                .collect();
            let complete = since == top
                || (since < top && publications.first().is_some_and(|p| p.seq == since + 1));
            Ok(History {
                position: Some(StreamPosition {
                    epoch: last.epoch,
                    seq: top,
                }),
                publications,
                complete,
            })
        })
    }

    fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn subjects_are_single_tokens_whatever_the_channel() {
        let ch = ChannelName::new("a.b:c").unwrap();
        assert_eq!(log_subject(&ch), "relay.log.612e623a63");
        assert_eq!(msg_subject(&ch), "relay.msg.612e623a63");
    }

    #[test]
    fn headers_round_trip() {
        let h = headers(Epoch(0x1000_0000_0000_00ab), 7, "b", 41);
        let m = parse_headers(&h, Bytes::from_static(b"\x00x")).unwrap();
        assert_eq!(
            (m.epoch, m.seq, m.kind, m.marker),
            (Epoch(0x1000_0000_0000_00ab), 7, DataKind::Binary, false)
        );
        assert_eq!(
            header(&h, "Nats-Expected-Last-Subject-Sequence"),
            Some("41")
        );
        let marker = parse_headers(&headers(Epoch(5), 0, "e", 0), Bytes::new()).unwrap();
        assert!(marker.marker);
    }
}
