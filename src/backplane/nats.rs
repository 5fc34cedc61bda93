//! The NATS backplane: JetStream sequences and keeps history, core NATS fans out; the
//! [`Remote`] of a [`Replica`].
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
//! its subscribers and the first publish agree on the epoch; markers are never delivered (the
//! replica sees them as [`Incoming::Epoch`]).
//!
//! Joining, ingesting, resyncing and failure handling are the [`Replica`]'s: here a join is a
//! reader task per channel (a core subscription to `relay.msg.<hex>`, aborted to unsubscribe)
//! and a snapshot is a walk of the subject's stored messages. Reconnection is async-nats's,
//! with full-jitter exponential backoff; every joined channel resyncs after it.
//!
//! # Presence
//! A second stream `RELAY_PRESENCE` (subjects `relay.pres.<channel>.<client>`, one message per
//! subject, `max_age` = 3 × presence timeout) holds each member's record (node, user, info;
//! header `Relay-Expiry`); a leave writes an empty record. Joins and leaves are also announced
//! on the channel's fan-out subject (headers `Relay-Presence: +|-`, `Relay-Client`). See
//! [`super::presence`] for the rest (shared with Redis).
//!
//! # Webhook agreement
//! A JetStream KV bucket `relay_hooks`, one entry per channel, written with compare-and-set on
//! its revision: see [`agree`].

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::agree::{Agreed, Claim};
use super::presence::{decode_member, encode_member, Members, PresenceOp};
use super::replica::{
    Entry, Incoming, Remote, Replica, Snapshot, Stored, BACKOFF_BASE, BACKOFF_CAP, TICK,
};
use super::{backoff, wall_ms, BackplaneError, BoxFuture, Seeds, Settings, Wakers};
use crate::engine::idempotency::PublishConditions;
use crate::engine::Engine;
use crate::types::{ChannelName, DataKind, Epoch, StreamPosition};

mod agree;

const STREAM: &str = "RELAY";
/// The core subject of control messages (server API user commands), outside the channels'.
const CONTROL_SUBJECT: &str = "relay.control";
const PRESENCE_STREAM: &str = "RELAY_PRESENCE";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
const PUBLISH_ATTEMPTS: usize = 100;

/// See the module docs.
struct Nats {
    settings: Settings,
    /// Most presence members read back per channel (`--presence-max-members`).
    max_members: usize,
    client: ArcSwapOption<async_nats::Client>,
    js: ArcSwapOption<jetstream::Context>,
    stream: ArcSwapOption<jetstream::stream::Stream>,
    presence_stream: ArcSwapOption<jetstream::stream::Stream>,
    /// The bucket of the channels' holds (see [`agree`]).
    hooks: ArcSwapOption<jetstream::kv::Store>,
    /// Connected and the stream exists.
    ready: AtomicBool,
    /// Per channel: this node's publishes waiting, and the last message it knows of.
    lasts: Mutex<HashMap<ChannelName, Arc<Slot>>>,
    /// Per received channel: the task that reads its fan-out subject.
    readers: Mutex<HashMap<ChannelName, tokio::task::JoinHandle<()>>>,
    seeds: Seeds,
}

/// A channel's publishes on this node. Whoever holds `last` publishes everything queued (up to
/// a batch) as one stored message, with one compare-and-set on the subject's last sequence, and
/// answers each publisher: one ack round trip per batch, not per message, so a busy channel is
/// not capped at one publish per round trip.
#[derive(Default)]
struct Slot {
    queue: Mutex<VecDeque<Pending>>,
    /// The last message this node knows of (saves a read), behind the lock of the batch in
    /// flight.
    last: tokio::sync::Mutex<Option<Last>>,
}

/// A publish waiting for its batch.
struct Pending {
    kind: DataKind,
    data: Bytes,
    done: oneshot::Sender<Result<(Epoch, u64), BackplaneError>>,
}

/// Most publishes waiting on one channel of a node; past it a publish is refused (503) rather
/// than queued.
const MAX_WAITING: usize = 65_536;

/// The last message of a subject: stream sequence, epoch, channel seq.
#[derive(Clone, Copy, Debug)]
struct Last {
    stream_seq: u64,
    epoch: Epoch,
    seq: u64,
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

/// Most messages one stored batch carries.
const BATCH_MESSAGES: usize = 1024;
/// Most payload bytes one stored batch carries (a single larger message is stored alone); well
/// under NATS's default `max_payload` (1 MiB).
const BATCH_BYTES: usize = 256 * 1024;

/// A stored or republished message: a message, an epoch marker, or a batch (`Relay-Kind: n`,
/// `Relay-Seq` the first seq, the payload `n` × (kind byte, u32 LE length, data)), appended to
/// `out` in seq order. `false` when it is not one of ours (nothing appended).
fn parse_stored(h: &HeaderMap, data: Bytes, out: &mut Vec<Incoming>) -> bool {
    let Some(epoch) = header(h, "Relay-Epoch").and_then(Epoch::parse) else {
        return false;
    };
    let Some(seq) = header(h, "Relay-Seq").and_then(|s| s.parse::<u64>().ok()) else {
        return false;
    };
    let ms = || header(h, "Relay-Time").and_then(|t| t.parse::<u64>().ok());
    let kind = match header(h, "Relay-Kind") {
        Some("j") => DataKind::Json,
        Some("b") => DataKind::Binary,
        Some("e") => {
            out.push(Incoming::Epoch(epoch));
            return true;
        }
        Some("n") => {
            let Some(ms) = ms() else {
                return false;
            };
            return parse_batch(epoch, seq, ms, &data, out);
        }
        _ => return false,
    };
    let Some(ms) = ms() else {
        return false;
    };
    out.push(Incoming::Message(
        epoch,
        Entry {
            seq,
            kind,
            ms,
            data,
        },
    ));
    true
}

/// The messages of a batch's payload (see [`parse_stored`]); nothing when it is malformed.
fn parse_batch(epoch: Epoch, first: u64, ms: u64, data: &Bytes, out: &mut Vec<Incoming>) -> bool {
    let start = out.len();
    let (mut at, mut seq) = (0usize, first);
    while at < data.len() {
        let kind = match data.get(at) {
            Some(b'j') => DataKind::Json,
            Some(b'b') => DataKind::Binary,
            _ => break,
        };
        let Some(len) = data
            .get(at + 1..at + 5)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u32::from_le_bytes(b) as usize)
        else {
            break;
        };
        let Some(end) = (at + 5).checked_add(len).filter(|&e| e <= data.len()) else {
            break;
        };
        out.push(Incoming::Message(
            epoch,
            Entry {
                seq,
                kind,
                ms,
                data: data.slice(at + 5..end),
            },
        ));
        (at, seq) = (end, seq + 1);
    }
    if at != data.len() || out.len() == start {
        out.truncate(start);
        return false;
    }
    true
}

/// A batch's payload (see [`parse_stored`]).
fn encode_batch(items: &[Pending]) -> Bytes {
    let len = items.iter().map(|p| 5 + p.data.len()).sum();
    let mut b = Vec::with_capacity(len);
    for p in items {
        b.push(kind_code(p.kind).as_bytes()[0]);
        b.extend_from_slice(&(p.data.len() as u32).to_le_bytes());
        b.extend_from_slice(&p.data);
    }
    Bytes::from(b)
}

fn kind_code(kind: DataKind) -> &'static str {
    match kind {
        DataKind::Json => "j",
        DataKind::Binary => "b",
    }
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

/// The messages of `all` in `epoch` up to `top`, markers left out.
fn entries_of(all: Vec<Incoming>, epoch: Epoch, top: u64) -> Vec<Entry> {
    all.into_iter()
        .filter_map(|m| match m {
            Incoming::Message(e, m) if e == epoch && m.seq <= top => Some(m),
            _ => None,
        })
        .collect()
}

/// Starts the NATS backplane on its own thread and runtime; connects (and reconnects) until
/// `stop`. Returns at once; the node is not ready until connected with the stream in place.
pub fn start(
    settings: Settings,
    engine: Arc<Engine>,
    wakers: Wakers,
    stop: CancellationToken,
) -> std::io::Result<Arc<Replica>> {
    let nats = Arc::new(Nats {
        max_members: engine.config().presence.max_members,
        seeds: Seeds::new(settings.seed),
        settings: settings.clone(),
        client: ArcSwapOption::empty(),
        js: ArcSwapOption::empty(),
        stream: ArcSwapOption::empty(),
        presence_stream: ArcSwapOption::empty(),
        hooks: ArcSwapOption::empty(),
        ready: AtomicBool::new(false),
        lasts: Mutex::new(HashMap::new()),
        readers: Mutex::new(HashMap::new()),
    });
    super::replica::start(nats, engine, wakers, settings, stop, supervise)
}

async fn supervise(nats: Arc<Nats>, replica: Arc<Replica>, stop: CancellationToken) {
    tokio::spawn(prune_publish_cache(nats.clone(), stop.clone()));
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let seed = nats.settings.seed;
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
    let client = match opts.connect(nats.settings.url.as_str()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, url = %nats.settings.url, "backplane: bad nats setup");
            return;
        }
    };
    nats.js
        .store(Some(Arc::new(jetstream::new(client.clone()))));
    // One subscription for the node's life: async-nats subscribes again after a reconnect.
    match client.subscribe(CONTROL_SUBJECT).await {
        Ok(mut control) => {
            let replica = replica.clone();
            tokio::spawn(async move {
                while let Some(m) = control.next().await {
                    replica.on_control(&m.payload);
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "backplane: cannot subscribe to the control subject"),
    }
    nats.client.store(Some(Arc::new(client)));
    let mut connects = 0u64;
    // The first connection may already be up when the callback is installed: check once.
    let mut pending_check = true;
    loop {
        if pending_check {
            pending_check = false;
            let connected =
                nats.client.load().as_ref().is_some_and(|c| {
                    c.connection_state() == async_nats::connection::State::Connected
                });
            if connected && !nats.is_up() {
                connects += 1;
                nats.on_connected(&replica, connects, &stop).await;
            }
        }
        let e = tokio::select! {
            e = events.recv() => e,
            _ = stop.cancelled() => break,
        };
        match e {
            Some(async_nats::Event::Connected) => {
                connects += 1;
                nats.on_connected(&replica, connects, &stop).await;
            }
            Some(async_nats::Event::Disconnected) | Some(async_nats::Event::Closed) => {
                nats.ready.store(false, Ordering::Release);
                nats.lasts.lock().clear();
                replica.disconnected();
                tracing::warn!(node = %nats.settings.node_id, "backplane: lost the connection to nats");
            }
            Some(other) => tracing::debug!(event = %other, "backplane: nats event"),
            None => break,
        }
    }
    if let Some(c) = nats.client.load_full() {
        let _ = tokio::time::timeout(Duration::from_millis(500), c.drain()).await;
    }
}

/// The publish cache only saves a read: drop the entries no publish is using.
async fn prune_publish_cache(nats: Arc<Nats>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        nats.lasts.lock().retain(|_, l| Arc::strong_count(l) > 1);
    }
}

/// Reads `name`'s fan-out subject into the replica; tells `done` once subscribed.
async fn read(
    client: Arc<async_nats::Client>,
    name: ChannelName,
    replica: Arc<Replica>,
    done: oneshot::Sender<Result<(), BackplaneError>>,
) {
    let sub = tokio::time::timeout(COMMAND_TIMEOUT, async {
        let s = client.subscribe(msg_subject(&name)).await?;
        client.flush().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(s)
    })
    .await;
    let Ok(Ok(mut sub)) = sub else {
        let _ = done.send(Err(unavailable("cannot subscribe: nats is unavailable")));
        return;
    };
    let _ = done.send(Ok(()));
    // Everything the subscription holds when the reader wakes is ingested as one run (one
    // lock, one wake of each shard); a presence announcement waits for the messages before it.
    let mut run = Vec::new();
    while let Some(first) = sub.next().await {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(m) = next.take() {
            if let Some(h) = m.headers.as_ref() {
                if let Some(op) = header(h, "Relay-Presence") {
                    if !run.is_empty() {
                        replica.on_messages(&name, run.drain(..));
                    }
                    let client = header(h, "Relay-Client").unwrap_or_default();
                    match op {
                        "+" => replica.presence_joined(&name, client, &m.payload),
                        "-" => replica.presence_left(&name, client),
                        _ => {}
                    }
                } else {
                    parse_stored(h, m.payload.clone(), &mut run);
                }
            }
            taken += 1;
            if taken < READ_BATCH {
                // `Some(None)`: the subscription ended; the outer loop sees it next.
                next = sub.next().now_or_never().flatten();
            }
        }
        if !run.is_empty() {
            replica.on_messages(&name, run.drain(..));
        }
    }
}

/// Most fan-out messages a channel's reader takes before handing them to the replica.
const READ_BATCH: usize = 4096;

impl Nats {
    async fn on_connected(&self, replica: &Replica, connects: u64, stop: &CancellationToken) {
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
            // Idempotency keys (`Nats-Msg-Id`); JetStream bounds the window by the max age.
            duplicate_window: self
                .settings
                .idempotency_window
                .min(self.settings.history_ttl),
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
            let d = backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, self.seeds.random());
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
        match tokio::time::timeout(COMMAND_TIMEOUT, self.hooks_bucket(&js)).await {
            Ok(Ok(kv)) => self.hooks.store(Some(Arc::new(kv))),
            // Agreement writes fail (and are retried) until a later connection sets it up.
            Ok(Err(e)) => tracing::warn!(error = %e, "backplane: cannot set up the hooks bucket"),
            Err(_) => tracing::warn!("backplane: timed out setting up the hooks bucket"),
        }
        self.ready.store(true, Ordering::Release);
        replica.connected(connects == 1);
    }

    /// The bucket of the webhooks agreement, created by the first node.
    async fn hooks_bucket(
        &self,
        js: &jetstream::Context,
    ) -> Result<jetstream::kv::Store, async_nats::Error> {
        // The bucket's stream, as `create_key_value` would make it (which first reads the
        // account's info in a shape servers before 2.10 do not answer).
        let config = jetstream::stream::Config {
            name: format!("KV_{}", agree::BUCKET),
            subjects: vec![format!("$KV.{}.>", agree::BUCKET)],
            max_messages_per_subject: 1,
            // Entries no node is left to settle (the whole cluster stopped) go after 3 leases.
            max_age: (self.settings.presence_timeout * 3).max(Duration::from_secs(1)),
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        };
        js.get_or_create_stream(config).await?;
        Ok(js.get_key_value(agree::BUCKET).await?)
    }

    fn hooks(&self) -> Result<Arc<jetstream::kv::Store>, BackplaneError> {
        self.hooks
            .load_full()
            .filter(|_| self.is_up())
            .ok_or_else(|| unavailable("nats is unavailable"))
    }

    /// `channel`'s publish slot on this node.
    fn slot(&self, channel: &ChannelName) -> Arc<Slot> {
        self.lasts
            .lock()
            .entry(channel.clone())
            .or_default()
            .clone()
    }

    fn parts(
        &self,
    ) -> Result<(Arc<jetstream::Context>, Arc<jetstream::stream::Stream>), BackplaneError> {
        if !self.is_up() {
            return Err(unavailable("nats is unavailable"));
        }
        match (self.js.load_full(), self.stream.load_full()) {
            (Some(js), Some(s)) => Ok((js, s)),
            _ => Err(unavailable("nats is unavailable")),
        }
    }
}

/// The subject's last message (its stream sequence, epoch and seq, the last of a batch; seq 0
/// for an epoch marker), or `None` when it has none.
async fn read_last(
    stream: &jetstream::stream::Stream,
    ch: &ChannelName,
) -> Result<Option<Last>, BackplaneError> {
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
            let mut got = Vec::new();
            parse_stored(&m.headers, m.payload, &mut got);
            let (epoch, seq) = match got.pop() {
                Some(Incoming::Message(e, m)) => (e, m.seq),
                Some(Incoming::Epoch(e)) => (e, 0),
                None => {
                    return Err(BackplaneError::Protocol(
                        "a message without relay headers".into(),
                    ))
                }
            };
            Ok(Some(Last {
                stream_seq: m.sequence,
                epoch,
                seq,
            }))
        }
    }
}

/// Every stored message of `ch` up to stream sequence `until`, ascending (markers included),
/// reading at most `most` + 1 messages.
async fn walk(
    stream: &jetstream::stream::Stream,
    ch: &ChannelName,
    until: u64,
    most: usize,
) -> Result<Vec<Incoming>, BackplaneError> {
    use jetstream::stream::DirectGetErrorKind;
    let subject = log_subject(ch);
    let mut out = Vec::new();
    let mut from = None;
    for _ in 0..=most.max(1) + 1 {
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
        parse_stored(&m.headers, m.payload, &mut out);
        if seq >= until {
            break;
        }
        from = Some(seq + 1);
    }
    Ok(out)
}

/// Publishes with the optimistic-concurrency header; `Ok(None)` when another publish won.
async fn try_publish(
    js: &jetstream::Context,
    ch: &ChannelName,
    h: HeaderMap,
    data: Bytes,
) -> Result<Option<u64>, BackplaneError> {
    Ok(try_publish_ack(js, ch, h, data)
        .await?
        .map(|ack| ack.sequence))
}

/// [`try_publish`], answering JetStream's whole ack (a duplicate `Nats-Msg-Id` is one).
async fn try_publish_ack(
    js: &jetstream::Context,
    ch: &ChannelName,
    h: HeaderMap,
    data: Bytes,
) -> Result<Option<jetstream::publish::PublishAck>, BackplaneError> {
    use jetstream::context::PublishErrorKind;
    let r = tokio::time::timeout(COMMAND_TIMEOUT, async {
        let ack = js.publish_with_headers(log_subject(ch), h, data).await?;
        ack.await
    })
    .await;
    match r {
        Err(_) => Err(unavailable("nats timed out")),
        Ok(Ok(ack)) => Ok(Some(ack)),
        Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
        Ok(Err(e)) => Err(unavailable(e)),
    }
}

/// A publish under conditions, alone (never batched: its `Nats-Msg-Id` and expectation are
/// its own). The idempotency key is JetStream's `Nats-Msg-Id` (`<hex channel>:<key>`, kept for
/// the stream's duplicate window); `expected_seq` is compared with the subject's last message,
/// and the publish expects that message's stream sequence (compare-and-set). With a key and a
/// mismatch the publish is still sent, expecting a sequence no subject has: JetStream answers
/// a repeated id as a duplicate before it checks expectations, and refuses anything else.
async fn publish_if(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    ch: &ChannelName,
    fresh: Epoch,
    (kind, data): (DataKind, Bytes),
    cond: &PublishConditions,
) -> Result<(Epoch, u64, bool), BackplaneError> {
    let id = cond
        .idempotency_key
        .as_ref()
        .map(|k| format!("{}:{k}", hex(ch)));
    for _ in 0..PUBLISH_ATTEMPTS {
        let last = read_last(stream, ch).await?.unwrap_or(Last {
            stream_seq: 0,
            epoch: fresh,
            seq: 0,
        });
        let at = StreamPosition {
            epoch: last.epoch,
            seq: last.seq,
        };
        let mismatch = cond.expected_seq.is_some_and(|e| e != last.seq);
        if mismatch && id.is_none() {
            return Err(BackplaneError::SeqMismatch(at));
        }
        let expect = if mismatch { u64::MAX } else { last.stream_seq };
        let mut h = headers(last.epoch, last.seq + 1, kind_code(kind), expect);
        if let Some(id) = &id {
            h.insert("Nats-Msg-Id", id.as_str());
        }
        match try_publish_ack(js, ch, h, data.clone()).await? {
            Some(ack) if ack.duplicate => return first_of(stream, ack.sequence).await,
            Some(_) => return Ok((last.epoch, last.seq + 1, false)),
            None if mismatch => return Err(BackplaneError::SeqMismatch(at)),
            // Another publish got there first: read again (a conditional one then mismatches).
            None => {}
        }
    }
    Err(unavailable("too much contention on the channel"))
}

/// The position of the message stored at `stream_seq` (the first publish of a repeated key).
async fn first_of(
    stream: &jetstream::stream::Stream,
    stream_seq: u64,
) -> Result<(Epoch, u64, bool), BackplaneError> {
    let m = match tokio::time::timeout(COMMAND_TIMEOUT, stream.direct_get(stream_seq)).await {
        Err(_) => return Err(unavailable("nats timed out")),
        Ok(Err(e)) => return Err(unavailable(e)),
        Ok(Ok(m)) => m,
    };
    let mut got = Vec::new();
    parse_stored(&m.headers, m.payload, &mut got);
    match got.first() {
        Some(Incoming::Message(e, m)) => Ok((*e, m.seq, true)),
        _ => Err(BackplaneError::Protocol(
            "the first publish of this idempotency key is not readable".into(),
        )),
    }
}

/// The oldest waiting publishes, up to a batch (at least one).
fn take_batch(queue: &Mutex<VecDeque<Pending>>) -> Vec<Pending> {
    let mut queue = queue.lock();
    let mut bytes = 0;
    let mut batch = Vec::new();
    while let Some(p) = queue.front() {
        let more = bytes + p.data.len();
        if !batch.is_empty() && (more > BATCH_BYTES || batch.len() >= BATCH_MESSAGES) {
            break;
        }
        bytes = more;
        batch.extend(queue.pop_front());
    }
    batch
}

/// Stores `batch` as the channel's next message(s) (compare-and-set on the subject's last
/// sequence, read again and retried when another node got there first) and answers each
/// publisher with its seq.
async fn publish_batch(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    ch: &ChannelName,
    cached: &mut Option<Last>,
    fresh: Epoch,
    batch: Vec<Pending>,
) {
    let fail = |batch: Vec<Pending>, e: BackplaneError| {
        for p in batch {
            let _ = p.done.send(Err(e.clone()));
        }
    };
    let n = batch.len() as u64;
    let (code, payload) = match batch.as_slice() {
        [one] => (kind_code(one.kind), one.data.clone()),
        _ => ("n", encode_batch(&batch)),
    };
    for _ in 0..PUBLISH_ATTEMPTS {
        let last = match *cached {
            Some(l) => l,
            None => match read_last(stream, ch).await {
                Ok(l) => l.unwrap_or(Last {
                    stream_seq: 0,
                    epoch: fresh,
                    seq: 0,
                }),
                Err(e) => return fail(batch, e),
            },
        };
        let h = headers(last.epoch, last.seq + 1, code, last.stream_seq);
        match try_publish(js, ch, h, payload.clone()).await {
            Ok(Some(stream_seq)) => {
                *cached = Some(Last {
                    stream_seq,
                    epoch: last.epoch,
                    seq: last.seq + n,
                });
                for (i, p) in (1..).zip(batch) {
                    let _ = p.done.send(Ok((last.epoch, last.seq + i)));
                }
                return;
            }
            Ok(None) => *cached = None,
            Err(e) => {
                *cached = None;
                return fail(batch, e);
            }
        }
    }
    fail(batch, unavailable("too much contention on the channel"));
}

impl Remote for Nats {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn publish_with(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
        cond: PublishConditions,
    ) -> BoxFuture<Result<(Epoch, u64, bool), BackplaneError>> {
        let (js, stream) = match self.parts() {
            Ok(p) => p,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let slot = self.slot(channel);
        let fresh = self.seeds.epoch();
        let ch = channel.clone();
        Box::pin(async move {
            // In turn with this node's batches of the channel; the cached last is then stale.
            let mut cached = slot.last.lock().await;
            *cached = None;
            publish_if(&js, &stream, &ch, fresh, (kind, data), &cond).await
        })
    }

    fn send_control(
        &self,
        message: Bytes,
    ) -> Option<BoxFuture<Result<Option<u64>, BackplaneError>>> {
        let client = self.client.load_full();
        Some(Box::pin(async move {
            let client = client.ok_or_else(|| unavailable("nats is unavailable"))?;
            let sent = async {
                client.publish(CONTROL_SUBJECT, message).await?;
                client.flush().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            match tokio::time::timeout(COMMAND_TIMEOUT, sent).await {
                // Core NATS does not say how many subscribers got it.
                Ok(Ok(())) => Ok(None),
                Ok(Err(e)) => Err(unavailable(e)),
                Err(_) => Err(unavailable("nats timed out")),
            }
        }))
    }

    fn is_up(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn agrees(&self) -> bool {
        true
    }

    fn agree(
        &self,
        channel: &ChannelName,
        claims: Vec<Claim>,
    ) -> BoxFuture<Result<Vec<Agreed>, BackplaneError>> {
        let (kv, channel, lease) = (self.hooks(), channel.clone(), self.settings.lease());
        Box::pin(async move { agree::agree(&*kv?, &channel, &claims, &lease).await })
    }

    fn reap(&self) -> BoxFuture<Result<Vec<(ChannelName, Agreed)>, BackplaneError>> {
        let (kv, lease) = (self.hooks(), self.settings.lease());
        Box::pin(async move { agree::reap(&*kv?, &lease).await })
    }

    fn publish(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
    ) -> BoxFuture<Result<(Epoch, u64), BackplaneError>> {
        let (js, stream) = match self.parts() {
            Ok(p) => p,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let slot = self.slot(channel);
        let (done, mut answer) = oneshot::channel();
        {
            let mut queue = slot.queue.lock();
            if queue.len() >= MAX_WAITING {
                let why = unavailable("too many publishes waiting on this channel");
                return Box::pin(std::future::ready(Err(why)));
            }
            queue.push_back(Pending { kind, data, done });
        }
        let fresh = self.seeds.epoch();
        let ch = channel.clone();
        Box::pin(async move {
            use oneshot::error::TryRecvError;
            let mut last = slot.last.lock().await;
            loop {
                match answer.try_recv() {
                    Ok(r) => return r,
                    Err(TryRecvError::Closed) => {
                        return Err(unavailable("the publish was abandoned"));
                    }
                    // Still queued: this publish leads the next batch.
                    Err(TryRecvError::Empty) => {}
                }
                let batch = take_batch(&slot.queue);
                if batch.is_empty() {
                    return Err(unavailable("the publish was abandoned"));
                }
                publish_batch(&js, &stream, &ch, &mut last, fresh, batch).await;
            }
        })
    }

    fn subscribe(
        &self,
        channels: Vec<ChannelName>,
        to: &Arc<Replica>,
    ) -> BoxFuture<Result<(), BackplaneError>> {
        let Some(client) = self.client.load_full() else {
            return Box::pin(std::future::ready(Err(unavailable("nats is unavailable"))));
        };
        let mut readers = self.readers.lock();
        let mut started = Vec::new();
        for name in channels {
            // A live reader stays subscribed across reconnects (async-nats subscribes again).
            if readers.get(&name).is_some_and(|r| !r.is_finished()) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let reader = to.spawn(read(client.clone(), name.clone(), to.clone(), tx));
            if let Some(old) = readers.insert(name, reader) {
                old.abort();
            }
            started.push(rx);
        }
        Box::pin(async move {
            for rx in started {
                rx.await
                    .unwrap_or_else(|_| Err(unavailable("the subscription was abandoned")))?;
            }
            Ok(())
        })
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        // Dropping the subscription (with the task) unsubscribes.
        if let Some(r) = self.readers.lock().remove(channel) {
            r.abort();
        }
    }

    fn snapshot(
        &self,
        channel: &ChannelName,
        since: Option<StreamPosition>,
    ) -> BoxFuture<Result<Snapshot, BackplaneError>> {
        let parts = self.parts();
        let ch = channel.clone();
        let most = self.settings.history_size;
        let fresh = self.seeds.epoch();
        Box::pin(async move {
            let (js, stream) = parts?;
            for _ in 0..PUBLISH_ATTEMPTS {
                let Some(last) = read_last(&stream, &ch).await? else {
                    // An empty subject: write the epoch its first publish will use.
                    let h = headers(fresh, 0, "e", 0);
                    try_publish(&js, &ch, h, Bytes::new()).await?;
                    continue;
                };
                let all = walk(&stream, &ch, last.stream_seq, most).await?;
                let entries = entries_of(all, last.epoch, last.seq);
                let from_since = since.is_some_and(|p| {
                    p.epoch == last.epoch
                        && p.seq <= last.seq
                        && (p.seq == last.seq
                            || entries.first().is_some_and(|f| f.seq <= p.seq + 1))
                });
                let entries = match (from_since, since) {
                    (true, Some(p)) => entries.into_iter().filter(|m| m.seq > p.seq).collect(),
                    _ => entries,
                };
                return Ok(Snapshot {
                    epoch: last.epoch,
                    top: last.seq,
                    since: from_since,
                    entries,
                });
            }
            Err(unavailable("could not read the channel's state"))
        })
    }

    fn history(
        &self,
        channel: &ChannelName,
        _since: u64,
        _limit: usize,
    ) -> BoxFuture<Result<Option<Stored>, BackplaneError>> {
        let parts = self.parts();
        let ch = channel.clone();
        let most = self.settings.history_size;
        Box::pin(async move {
            let (_, stream) = parts?;
            let Some(last) = read_last(&stream, &ch).await? else {
                return Ok(None);
            };
            let all = walk(&stream, &ch, last.stream_seq, most).await?;
            Ok(Some(Stored {
                position: StreamPosition {
                    epoch: last.epoch,
                    seq: last.seq,
                },
                entries: entries_of(all, last.epoch, last.seq),
            }))
        })
    }

    fn presence(
        &self,
        channel: &ChannelName,
        ops: Vec<PresenceOp>,
        read: bool,
    ) -> BoxFuture<Result<Option<Members>, BackplaneError>> {
        let (Ok((js, _)), Some(stream), Some(client)) = (
            self.parts(),
            self.presence_stream.load_full(),
            self.client.load_full(),
        ) else {
            return Box::pin(std::future::ready(Ok(None)));
        };
        let ch = channel.clone();
        let me = self.settings.node_id.clone();
        let expiry = wall_ms() + self.settings.presence_timeout.as_millis() as u64;
        let most = self.max_members;
        Box::pin(async move {
            for (op, who) in &ops {
                let subject = presence_subject(&ch, &who.client);
                let (record, exp) = match *op {
                    "-" => (Bytes::new(), 0),
                    _ => (encode_member(&me, who), expiry),
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
                    return Err(unavailable("nats refused a presence record"));
                }
                if *op != "~" {
                    let mut h = HeaderMap::new();
                    h.insert("Relay-Presence", *op);
                    h.insert("Relay-Client", &*who.client);
                    let _ = client
                        .publish_with_headers(msg_subject(&ch), h, record)
                        .await;
                }
            }
            if !read {
                return Ok(None);
            }
            let prefix = format!("relay.pres.{}.", hex(&ch));
            let mut members = HashMap::new();
            let mut from = None;
            for _ in 0..=most.saturating_add(1) {
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
            Ok(Some(members))
        })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for (_, r) in self.readers.lock().drain() {
            r.abort();
        }
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
        let mut got = Vec::new();
        assert!(parse_stored(&h, Bytes::from_static(b"\x00x"), &mut got));
        let Some(Incoming::Message(epoch, m)) = got.pop() else {
            panic!("a message");
        };
        assert_eq!(
            (epoch, m.seq, m.kind),
            (Epoch(0x1000_0000_0000_00ab), 7, DataKind::Binary)
        );
        assert_eq!(
            header(&h, "Nats-Expected-Last-Subject-Sequence"),
            Some("41")
        );
        let mut marker = Vec::new();
        parse_stored(&headers(Epoch(5), 0, "e", 0), Bytes::new(), &mut marker);
        assert_eq!(marker, [Incoming::Epoch(Epoch(5))]);
    }

    #[test]
    fn a_stored_batch_is_its_messages_in_seq_order() {
        let p = |kind, data: &'static [u8]| Pending {
            kind,
            data: Bytes::from_static(data),
            done: oneshot::channel().0,
        };
        let batch = [
            p(DataKind::Json, b"{\"a\":1}"),
            p(DataKind::Binary, b""),
            p(DataKind::Binary, b"\x00\xff"),
        ];
        let h = headers(Epoch(0x1000_0000_0000_0001), 41, "n", 7);
        let mut got = Vec::new();
        assert!(parse_stored(&h, encode_batch(&batch), &mut got));
        let seqs: Vec<(u64, DataKind, &[u8])> = got
            .iter()
            .map(|m| match m {
                Incoming::Message(_, m) => (m.seq, m.kind, &m.data[..]),
                Incoming::Epoch(_) => panic!("a message"),
            })
            .collect();
        assert_eq!(
            seqs,
            [
                (41, DataKind::Json, &b"{\"a\":1}"[..]),
                (42, DataKind::Binary, &b""[..]),
                (43, DataKind::Binary, &b"\x00\xff"[..]),
            ]
        );
        // A truncated batch is nothing (never half a batch).
        let mut cut = encode_batch(&batch).to_vec();
        cut.pop();
        let mut none = Vec::new();
        assert!(!parse_stored(&h, Bytes::from(cut), &mut none));
        assert!(none.is_empty());
    }

    #[test]
    fn batches_stop_at_their_bounds_but_take_one_whatever_its_size() {
        let queue = Mutex::new(VecDeque::new());
        let push = |n: usize| {
            queue.lock().push_back(Pending {
                kind: DataKind::Binary,
                data: Bytes::from(vec![0u8; n]),
                done: oneshot::channel().0,
            })
        };
        push(BATCH_BYTES + 1);
        push(1);
        assert_eq!(take_batch(&queue).len(), 1, "a big one goes alone");
        for _ in 0..BATCH_MESSAGES + 5 {
            push(1);
        }
        assert_eq!(take_batch(&queue).len(), BATCH_MESSAGES);
        assert_eq!(take_batch(&queue).len(), 6);
        assert!(take_batch(&queue).is_empty());
    }

    #[test]
    fn stored_entries_skip_markers_other_epochs_and_later_seqs() {
        let m = |e: u64, seq: u64| {
            Incoming::Message(
                Epoch(e),
                Entry {
                    seq,
                    kind: DataKind::Json,
                    ms: 1,
                    data: Bytes::new(),
                },
            )
        };
        let all = vec![
            m(1, 4),
            Incoming::Epoch(Epoch(2)),
            m(2, 1),
            m(2, 2),
            m(2, 3),
        ];
        let seqs: Vec<u64> = entries_of(all, Epoch(2), 2).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2]);
    }
}
