//! The channel-sync state machine that every remote backplane shares: this node's engine kept
//! as a *replica* of the channels it has subscribers in, in step with a remote store.
//!
//! A [`Remote`] is what a store does (Redis, NATS, a fake in tests): sequence a publish,
//! subscribe and unsubscribe a channel's fan-out, read a channel's state since a position,
//! read history, write and read presence. It knows keys, scripts, subjects and parsing, and
//! nothing of the engine. The [`Replica`] knows the engine and nothing of the store:
//!
//! - **Join** (before a channel's first local subscriber): subscribe first, then read the
//!   store's state since the local position ([`Remote::snapshot`]); messages that arrive
//!   meanwhile are buffered. The snapshot is adopted ([`Engine::ingest`] of the missing run
//!   when the local epoch matches and the store still holds it, [`Engine::reset`] otherwise,
//!   which closes local subscribers for resume), the buffer is replayed (duplicates ignored),
//!   and from then on the channel is *synced*: messages are ingested as they come.
//! - **Ingest** ([`Replica::on_messages`], a run of messages of one channel): one lock, one
//!   wake. A message that does not follow the local top (a gap: pub/sub lost one) or belongs to
//!   another epoch starts the same sync (*resyncing*). This node's own publishes are ingested
//!   from the store's answer when they are the next message ([`Replica::published`]), so their
//!   fan-out does not wait for the store's delivery; that delivery is then a duplicate.
//! - **Maintenance** (every 500 ms): a channel without local subscribers for the grace period
//!   (two quiet passes after 2 s) is unsubscribed; a channel with local subscribers that is not
//!   received is joined (a safety net); presence is written and read back.
//! - **Connection** ([`Replica::connected`], [`Replica::disconnected`]): when the store goes,
//!   pending joins fail and channels never synced are dropped; when it comes back, every
//!   channel is subscribed again and resynced.
//!
//! [`Engine::ingest`]: crate::engine::Engine::ingest
//! [`Engine::reset`]: crate::engine::Engine::reset

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::agree::{Agreed, Claim};
use super::presence::{decode_member, Members, Mirror, PresenceOp};
use super::{
    backoff, instant_of, wall_ms, Backplane, BackplaneError, BoxFuture, Seeds, Settings, Wakers,
};
use crate::engine::idempotency::PublishConditions;
use crate::engine::presence::Identity;
use crate::engine::{Engine, History, IngestOutcome, Publication, RemoteEntry, ShardMask};
use crate::types::{ChannelName, DataKind, Epoch, StreamPosition};

/// How long a subscriber waits for its channel to be joined.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A channel left without local subscribers for this long is unsubscribed (no flapping).
pub const LINGER: Duration = Duration::from_secs(2);
/// How often the maintenance pass runs.
pub const TICK: Duration = Duration::from_millis(500);
/// Most messages buffered for a channel while it syncs; past that, it syncs again.
const SYNC_BUFFER: usize = 100_000;
/// Most channels asked of the store in one subscribe after a reconnect.
const SUBSCRIBE_CHUNK: usize = 500;
/// Failed snapshot reads before the subscribers waiting for the join are told.
const SYNC_ATTEMPTS_BEFORE_FAILING: u32 = 5;
/// Retry backoff (sync reads; remotes use it for their reconnects).
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// See [`BACKOFF_BASE`].
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// One stored message of a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its seq in the channel's epoch.
    pub seq: u64,
    /// Payload kind.
    pub kind: DataKind,
    /// When it was published: wall-clock milliseconds (the store's clock).
    pub ms: u64,
    /// Payload.
    pub data: Bytes,
}

/// What a store delivers on a channel's fan-out, in the store's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A sequenced message.
    Message(Epoch, Entry),
    /// The channel's epoch, with nothing to deliver (a NATS epoch marker): a replica in
    /// another epoch resyncs.
    Epoch(Epoch),
}

/// A channel's state in the store, for a join or a resync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The channel's epoch (created by the read when the store had none).
    pub epoch: Epoch,
    /// Its last seq.
    pub top: u64,
    /// `true`: `entries` are every message after the position asked for (same epoch, and the
    /// store still holds the one after it). `false`: the newest entries the store holds.
    pub since: bool,
    /// Ascending.
    pub entries: Vec<Entry>,
}

/// What a store holds of a channel, for a history read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The channel's position in the store.
    pub position: StreamPosition,
    /// Ascending; at least those after the `since` asked for, up to the limit asked for (the
    /// replica filters by seq, size and age).
    pub entries: Vec<Entry>,
}

/// What a remote drained from its connection at once, grouped by channel (each channel's
/// messages in the store's order), for [`Replica::on_batch`]. Kept by the remote's reader and
/// reused, so a busy connection does not allocate the grouping per batch.
#[derive(Default)]
pub struct Batch {
    runs: Vec<(ChannelName, Vec<Incoming>)>,
    index: HashMap<ChannelName, usize>,
}

impl Batch {
    /// Adds `m` to its channel's run.
    pub fn push(&mut self, channel: ChannelName, m: Incoming) {
        match self.index.get(&channel).and_then(|&i| self.runs.get_mut(i)) {
            Some((_, run)) => run.push(m),
            None => {
                self.index.insert(channel.clone(), self.runs.len());
                self.runs.push((channel, vec![m]));
            }
        }
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Whether `channel` has messages waiting (a presence announcement of it must wait for
    /// them: events are placed after the messages published before them).
    pub fn holds(&self, channel: &ChannelName) -> bool {
        self.index.contains_key(channel)
    }
}

/// What a remote store does for the [`Replica`]. Methods are called with the replica's lock
/// held: they must return at once (their futures do the I/O) and never call back into the
/// replica before returning.
pub trait Remote: Send + Sync + 'static {
    /// `redis` or `nats` (logs, metrics, error texts).
    fn name(&self) -> &'static str;

    /// Whether the store can be reached now.
    fn is_up(&self) -> bool;

    /// Sequences one message: its channel's epoch and seq (see [`Backplane::publish`]).
    fn publish(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
    ) -> BoxFuture<Result<(Epoch, u64), BackplaneError>>;

    /// [`Backplane::publish_with`] with conditions (the replica handles unconditional
    /// publishes with [`Remote::publish`]). Both stores implement it; the default (test
    /// fakes) refuses.
    fn publish_with(
        &self,
        _channel: &ChannelName,
        _kind: DataKind,
        _data: Bytes,
        _cond: PublishConditions,
    ) -> BoxFuture<Result<(Epoch, u64, bool), BackplaneError>> {
        Box::pin(std::future::ready(Err(BackplaneError::Unsupported(
            "this store cannot publish under conditions",
        ))))
    }

    /// Makes this node receive `channels`: their messages and presence announcements go to
    /// `to` ([`Replica::on_messages`], [`Replica::presence_joined`], [`Replica::presence_left`]).
    /// Completes once what is published from then on will arrive. Subscribing a channel that
    /// is received is harmless. Subscribes and unsubscribes take effect in the order of the
    /// calls (not of the awaits).
    fn subscribe(
        &self,
        channels: Vec<ChannelName>,
        to: &Arc<Replica>,
    ) -> BoxFuture<Result<(), BackplaneError>>;

    /// Stops receiving `channel` (best effort: what still arrives is ignored).
    fn unsubscribe(&self, channel: &ChannelName);

    /// The channel's state (its epoch is created when it has none) and, from `since` when the
    /// store still holds the run after it, the messages after it (see [`Snapshot`]).
    fn snapshot(
        &self,
        channel: &ChannelName,
        since: Option<StreamPosition>,
    ) -> BoxFuture<Result<Snapshot, BackplaneError>>;

    /// The channel's position and entries after `since` (at most `limit`), or `None` when the
    /// store has nothing of it.
    fn history(
        &self,
        channel: &ChannelName,
        since: u64,
        limit: usize,
    ) -> BoxFuture<Result<Option<Stored>, BackplaneError>>;

    /// Writes this node's presence changes for `channel` and, when `read`, returns the members
    /// the store lists. `Ok(None)` when nothing was read (or presence is off in the store).
    fn presence(
        &self,
        channel: &ChannelName,
        ops: Vec<PresenceOp>,
        read: bool,
    ) -> BoxFuture<Result<Option<Members>, BackplaneError>>;

    /// See [`Backplane::send_control`]; `None` when the store has no control channel.
    fn send_control(
        &self,
        _message: Bytes,
    ) -> Option<BoxFuture<Result<Option<u64>, BackplaneError>>> {
        None
    }

    /// Whether the store implements [`Remote::agree`] and [`Remote::reap`].
    fn agrees(&self) -> bool {
        false
    }

    /// See [`Backplane::agree`].
    fn agree(
        &self,
        _channel: &ChannelName,
        _claims: Vec<Claim>,
    ) -> BoxFuture<Result<Vec<Agreed>, BackplaneError>> {
        Box::pin(std::future::ready(Err(BackplaneError::Unsupported(
            "this backplane does not agree on channel events",
        ))))
    }

    /// See [`Backplane::reap`].
    fn reap(&self) -> BoxFuture<Result<Vec<(ChannelName, Agreed)>, BackplaneError>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

/// Where a received channel stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Subscribing and reading the store for the first time; subscribers wait.
    Joining,
    /// Messages are ingested as they come.
    Synced,
    /// Reading the store again (a gap, another epoch, a reconnect); local subscribers keep
    /// what they have, messages are buffered.
    Resyncing,
}

/// A channel this node receives (or is about to).
struct Chan {
    state: State,
    /// Identifies the current sync; a finished sync applies only if it is still current.
    sync_id: u64,
    /// Messages received while not synced.
    buf: Vec<Incoming>,
    buf_overflow: bool,
    /// Subscribers waiting for the sync.
    waiters: Vec<oneshot::Sender<Result<(), BackplaneError>>>,
    last_join: Instant,
    idle_ticks: u32,
    /// Presence channel: what this node wrote, and the other nodes' members it mirrors.
    presence: Mirror,
}

impl Chan {
    fn new(now: Instant) -> Self {
        Self {
            state: State::Joining,
            sync_id: 0,
            buf: Vec::new(),
            buf_overflow: false,
            waiters: Vec::new(),
            last_join: now,
            idle_ticks: 0,
            presence: Mirror::default(),
        }
    }

    fn wait(&mut self) -> oneshot::Receiver<Result<(), BackplaneError>> {
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        rx
    }

    fn buffer(&mut self, m: Incoming) {
        if self.buf.len() < SYNC_BUFFER {
            self.buf.push(m);
        } else {
            self.buf_overflow = true;
        }
    }

    fn fail_waiters(&mut self, why: &str) {
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(BackplaneError::Unavailable(why.to_owned())));
        }
    }
}

struct Metrics {
    up: Gauge,
    reconnects: Counter,
    publish: Histogram,
    resyncs: Counter,
}

/// Presence work of one channel, done after the maintenance pass without the lock: the
/// writes, and whether to read the members back.
pub type PresenceWork = (ChannelName, Vec<PresenceOp>, bool);

/// See the module docs. Shared (`Arc`) by the node (as its [`Backplane`]) and by the remote's
/// tasks (which deliver to it).
pub struct Replica {
    me: Weak<Replica>,
    remote: Arc<dyn Remote>,
    engine: Arc<Engine>,
    wakers: Wakers,
    settings: Settings,
    rt: tokio::runtime::Handle,
    chans: Mutex<HashMap<ChannelName, Chan>>,
    seeds: Seeds,
    metrics: Metrics,
    /// What this node does with control messages ([`Replica::on_control`]).
    control: std::sync::OnceLock<super::ControlHandler>,
}

/// Starts a remote backplane on its own thread and `current_thread` runtime: the replica's
/// maintenance pass, and `supervise` (the store's connection loop, which calls
/// [`Replica::connected`] and [`Replica::disconnected`] and delivers messages), until `stop`.
/// Returns at once; the node is not ready until the remote is up.
pub fn start<R, F, Fut>(
    remote: Arc<R>,
    engine: Arc<Engine>,
    wakers: Wakers,
    settings: Settings,
    stop: CancellationToken,
    supervise: F,
) -> std::io::Result<Arc<Replica>>
where
    R: Remote,
    F: FnOnce(Arc<R>, Arc<Replica>, CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let replica = Replica::new(
        remote.clone(),
        engine,
        wakers,
        settings,
        rt.handle().clone(),
    );
    let sup = replica.clone();
    std::thread::Builder::new()
        .name("relay-backplane".into())
        .spawn(move || {
            rt.block_on(async move {
                tokio::spawn(sup.clone().maintenance(stop.clone()));
                supervise(remote, sup, stop).await;
            });
        })?;
    Ok(replica)
}

impl Replica {
    /// A replica of `engine`'s channels kept in step with `remote`; its tasks run on `rt`.
    /// [`start`] is what a backplane uses; this is for tests (with the test's runtime), which
    /// then drive the maintenance pass themselves ([`Replica::maintain`]).
    pub fn new(
        remote: Arc<dyn Remote>,
        engine: Arc<Engine>,
        wakers: Wakers,
        settings: Settings,
        rt: tokio::runtime::Handle,
    ) -> Arc<Self> {
        let kind = remote.name();
        let metrics = Metrics {
            up: gauge!("relay_backplane_up", "backplane" => kind),
            reconnects: counter!("relay_backplane_reconnects_total", "backplane" => kind),
            publish: histogram!("relay_backplane_publish_seconds", "backplane" => kind),
            resyncs: counter!("relay_backplane_resyncs_total", "backplane" => kind),
        };
        metrics.up.set(0.0);
        Arc::new_cyclic(|me| Replica {
            me: me.clone(),
            seeds: Seeds::new(settings.seed),
            remote,
            engine,
            wakers,
            settings,
            rt,
            chans: Mutex::new(HashMap::new()),
            metrics,
            control: std::sync::OnceLock::new(),
        })
    }

    /// A control message from the store (any node's, this one's included).
    pub fn on_control(&self, message: &[u8]) {
        if let Some(handle) = self.control.get() {
            handle(message);
        }
    }

    /// Runs `task` on the backplane's runtime (remotes start their readers with it).
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.spawn(task)
    }

    /// Where `channel` stands, or `None` when it is not received.
    pub fn state(&self, channel: &ChannelName) -> Option<State> {
        self.chans.lock().get(channel).map(|c| c.state)
    }

    /// The store is reachable (again): every received channel is subscribed again and
    /// resynced (what was published meanwhile is ingested, or the channel is reset).
    pub fn connected(&self, first: bool) {
        self.metrics.up.set(1.0);
        let (node, url, kind) = (
            &self.settings.node_id,
            &self.settings.url,
            self.remote.name(),
        );
        if first {
            tracing::info!(%node, %url, "backplane: connected to {kind}");
        } else {
            self.metrics.reconnects.increment(1);
            tracing::info!(%node, %url, "backplane: reconnected to {kind}; resyncing channels");
        }
        let chans = self.chans.lock();
        let names: Vec<ChannelName> = chans.keys().cloned().collect();
        for chunk in names.chunks(SUBSCRIBE_CHUNK) {
            self.receive(chunk.to_vec());
        }
    }

    /// The store is gone: joins in progress fail, channels never synced are dropped, the
    /// others keep serving what they have until [`Replica::connected`].
    pub fn disconnected(&self) {
        self.metrics.up.set(0.0);
        let why = format!("lost the connection to {}", self.remote.name());
        self.chans.lock().retain(|name, c| {
            if c.state != State::Synced {
                c.fail_waiters(&why);
            }
            if c.state == State::Joining {
                self.remote.unsubscribe(name);
                return false;
            }
            true
        });
    }

    /// Every received channel syncs again (the remote lost messages it cannot name).
    pub fn resync_all(&self) {
        let mut chans = self.chans.lock();
        for (name, c) in chans.iter_mut() {
            self.start_sync(name, c);
        }
    }

    /// Messages of `channel`, in the store's order: ingested while the channel is synced (one
    /// wake for the run), buffered while it syncs. The first one that does not follow the
    /// local top (a lost message, or another epoch) starts a resync; it and the rest are
    /// buffered for after it.
    pub fn on_messages(&self, channel: &ChannelName, msgs: impl IntoIterator<Item = Incoming>) {
        let mut chans = self.chans.lock();
        let (now, now_ms) = (crate::types::now(), wall_ms());
        let wake = self.ingest_run(&mut chans, channel, msgs, now, now_ms);
        drop(chans);
        self.wakers.wake(wake);
    }

    /// A batch of runs (what a remote drained from its connection at once, grouped by
    /// channel, each run in the store's order): one lock and one wake for the whole batch,
    /// each run as [`Replica::on_messages`].
    pub fn on_batch(&self, runs: &mut Batch) {
        if runs.is_empty() {
            return;
        }
        let mut chans = self.chans.lock();
        let (now, now_ms) = (crate::types::now(), wall_ms());
        let mut wake = 0;
        for (channel, msgs) in runs.runs.drain(..) {
            wake |= self.ingest_run(&mut chans, &channel, msgs, now, now_ms);
        }
        runs.index.clear();
        drop(chans);
        self.wakers.wake(wake);
    }

    fn ingest_run(
        &self,
        chans: &mut HashMap<ChannelName, Chan>,
        channel: &ChannelName,
        msgs: impl IntoIterator<Item = Incoming>,
        now: Instant,
        now_ms: u64,
    ) -> ShardMask {
        let Some(c) = chans.get_mut(channel) else {
            return 0;
        };
        let mut msgs = msgs.into_iter();
        let mut wake = 0;
        if c.state == State::Synced {
            for m in msgs.by_ref() {
                match self.ingest(channel, &m, now, now_ms) {
                    Ok(w) => wake |= w,
                    Err(outcome) => {
                        tracing::info!(%channel, ?outcome, "backplane: message out of line; resyncing");
                        c.buffer(m);
                        self.start_sync(channel, c);
                        break;
                    }
                }
            }
        }
        for m in msgs {
            c.buffer(m);
        }
        wake
    }

    /// This node's own publish as the store answered it (`seq` in `epoch`): ingested at once
    /// when the channel is synced here and the message is the next one, so that the shards
    /// fan it out without waiting for the store to deliver it back (its echo, a hop through
    /// this backplane's thread, is then a duplicate). Otherwise nothing happens here and the
    /// echo brings it in the store's order like any other node's message: when the local top
    /// is behind it (another node's message before it has not arrived yet), in another epoch,
    /// or while the channel syncs or is not received. Never starts a resync: only what the
    /// store delivers, in its order, is evidence of a gap.
    pub fn published(
        &self,
        channel: &ChannelName,
        epoch: Epoch,
        seq: u64,
        kind: DataKind,
        data: Bytes,
    ) {
        let chans = self.chans.lock();
        if !chans.get(channel).is_some_and(|c| c.state == State::Synced) {
            return;
        }
        let now = Instant::now();
        let wake = match self
            .engine
            .ingest(channel, epoch, seq, kind, data, now, now)
        {
            IngestOutcome::Appended(w) => w,
            _ => 0,
        };
        drop(chans);
        self.wakers.wake(wake);
    }

    /// Another node announced a presence join (`member` as [`super::presence::encode_member`]
    /// wrote it; this node's own announcements are ignored).
    pub fn presence_joined(&self, channel: &ChannelName, client: &str, member: &[u8]) {
        let Some((node, who)) = decode_member(client, member) else {
            return;
        };
        let now = crate::types::now();
        let mut chans = self.chans.lock();
        let Some(c) = chans.get_mut(channel) else {
            return;
        };
        let me = self.settings.node_id.as_str();
        let wake = c
            .presence
            .joined(&self.engine, channel, me, &node, who, now);
        drop(chans);
        self.wakers.wake(wake);
    }

    /// Another node announced a presence leave.
    pub fn presence_left(&self, channel: &ChannelName, client: &str) {
        let now = crate::types::now();
        let mut chans = self.chans.lock();
        let Some(c) = chans.get_mut(channel) else {
            return;
        };
        let wake = c.presence.left(&self.engine, channel, client, now);
        drop(chans);
        self.wakers.wake(wake);
    }

    /// One maintenance pass: unsubscribe channels idle for the grace period, join channels
    /// with local subscribers that are not received, and list the presence work to do (done
    /// after, without the lock, by [`Replica::run_presence`]).
    pub fn maintain(&self, now: Instant) -> Vec<PresenceWork> {
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
            if let Some(c) = chans.remove(&name) {
                wake |= c.presence.clear(&self.engine, &name, now);
            }
            self.remote.unsubscribe(&name);
        }
        if self.remote.is_up() {
            let missing: Vec<ChannelName> = self
                .engine
                .channels()
                .into_iter()
                .filter(|i| i.subscribers > 0 && !chans.contains_key(&i.name))
                .map(|i| i.name)
                .collect();
            for name in &missing {
                tracing::warn!(channel = %name, "backplane: subscribed channel was not received; joining");
                chans.insert(name.clone(), Chan::new(now));
            }
            if !missing.is_empty() {
                self.receive(missing);
            }
        }
        let timeout = self.settings.presence_timeout;
        let work = chans
            .iter_mut()
            .filter(|(name, c)| c.state == State::Synced && self.engine.has_presence(name))
            .filter_map(|(name, c)| {
                c.presence
                    .plan(&self.engine, name, timeout, now)
                    .map(|(ops, read)| (name.clone(), ops, read))
            })
            .collect();
        drop(chans);
        self.wakers.wake(wake);
        work
    }

    /// Writes this node's presence changes for `channel` and, when `read`, adopts the members
    /// of the other nodes that the store lists (and drops those it no longer does).
    pub async fn run_presence(&self, channel: &ChannelName, ops: Vec<PresenceOp>, read: bool) {
        match self.remote.presence(channel, ops, read).await {
            Ok(Some(members)) => {
                let now = crate::types::now();
                let mut chans = self.chans.lock();
                let Some(c) = chans.get_mut(channel) else {
                    return;
                };
                let wake = c.presence.reconcile(
                    &self.engine,
                    channel,
                    &self.settings.node_id,
                    members,
                    self.settings.presence_timeout,
                    now,
                    wall_ms(),
                );
                drop(chans);
                self.wakers.wake(wake);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%channel, error = %e, "backplane: presence update failed");
                // Write everything again next time: the store may have lost it.
                if let Some(c) = self.chans.lock().get_mut(channel) {
                    c.presence.restart();
                }
            }
        }
    }

    async fn maintenance(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            for (name, ops, read) in self.maintain(crate::types::now()) {
                self.run_presence(&name, ops, read).await;
            }
        }
    }

    /// Asks the store for `names` (already in the table) and syncs each once it is received;
    /// on failure, the waiting subscribers are told and channels never synced are dropped.
    fn receive(&self, names: Vec<ChannelName>) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let subscribed = self.remote.subscribe(names.clone(), &me);
        self.rt.spawn(async move {
            let r = subscribed.await;
            let mut chans = me.chans.lock();
            for name in &names {
                let Some(c) = chans.get_mut(name) else {
                    continue;
                };
                match &r {
                    Ok(()) => me.start_sync(name, c),
                    Err(e) => {
                        tracing::warn!(channel = %name, error = %e, "backplane: cannot subscribe");
                        c.fail_waiters(&format!(
                            "cannot subscribe: {} is unavailable",
                            me.remote.name()
                        ));
                        if c.state == State::Joining {
                            chans.remove(name);
                            me.remote.unsubscribe(name);
                        }
                    }
                }
            }
        });
    }

    /// Starts a sync of `name`: buffer messages, read the store, apply.
    fn start_sync(&self, name: &ChannelName, c: &mut Chan) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        if c.state == State::Synced {
            c.state = State::Resyncing;
        }
        c.sync_id += 1;
        // Write this node's members again and read the others' (the store may have lost them).
        c.presence.restart();
        self.metrics.resyncs.increment(1);
        let (id, name) = (c.sync_id, name.clone());
        self.rt.spawn(async move { me.sync(name, id).await });
    }

    fn is_current(&self, name: &ChannelName, id: u64) -> bool {
        self.chans
            .lock()
            .get(name)
            .is_some_and(|c| c.sync_id == id && c.state != State::Synced)
    }

    async fn sync(self: Arc<Self>, name: ChannelName, id: u64) {
        let mut attempt = 0;
        loop {
            // Down: the reconnect resyncs every channel.
            if !self.is_current(&name, id) || !self.remote.is_up() {
                return;
            }
            let since = self.engine.position(&name);
            match self.remote.snapshot(&name, since).await {
                Ok(snapshot) => {
                    self.apply_sync(&name, id, since, snapshot);
                    return;
                }
                Err(e) => {
                    tracing::warn!(channel = %name, error = %e, "backplane sync failed; retrying");
                    attempt += 1;
                    if attempt >= SYNC_ATTEMPTS_BEFORE_FAILING {
                        if let Some(c) = self.chans.lock().get_mut(&name) {
                            c.fail_waiters(&format!(
                                "the channel could not be synced from {}",
                                self.remote.name()
                            ));
                        }
                    }
                    let d = backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, self.seeds.random());
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    /// Adopts `s` (read for the local position `since`), replays the buffer, and marks the
    /// channel synced; or starts over when the buffer does not connect to the snapshot.
    fn apply_sync(&self, name: &ChannelName, id: u64, since: Option<StreamPosition>, s: Snapshot) {
        let mut chans = self.chans.lock();
        let Some(c) = chans.get_mut(name) else {
            return;
        };
        if c.sync_id != id || c.state == State::Synced {
            return;
        }
        let (now, now_ms) = (crate::types::now(), wall_ms());
        let mut wake = 0;
        // The run after the local top, in the local epoch: local subscribers keep going.
        let mut continuous = s.since && since.is_some_and(|p| p.epoch == s.epoch);
        if continuous {
            for m in &s.entries {
                let m = Incoming::Message(s.epoch, m.clone());
                match self.ingest(name, &m, now, now_ms) {
                    Ok(w) => wake |= w,
                    Err(_) => {
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
                .into_iter()
                .map(|m| RemoteEntry {
                    seq: m.seq,
                    at: instant_of(m.ms, now, now_ms),
                    kind: m.kind,
                    data: m.data,
                })
                .collect();
            wake |= self.engine.reset(name, s.epoch, s.top, entries, now);
            if c.state == State::Resyncing {
                tracing::info!(channel = %name, epoch = %s.epoch, top = s.top, "backplane: channel reset to the {} state", self.remote.name());
            }
        }
        // Messages that came while reading: duplicates of the snapshot, then its successors.
        let mut again = std::mem::take(&mut c.buf_overflow);
        for m in std::mem::take(&mut c.buf) {
            match self.ingest(name, &m, now, now_ms) {
                Ok(w) => wake |= w,
                Err(_) => {
                    again = true;
                    break;
                }
            }
        }
        if again {
            self.start_sync(name, c);
        } else {
            c.state = State::Synced;
            for w in c.waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
        }
        drop(chans);
        self.wakers.wake(wake);
    }

    /// Ingests one message: `Ok(shards to wake)` when it was appended or already there (or is
    /// the local epoch's marker), `Err` when it does not follow the local top.
    fn ingest(
        &self,
        name: &ChannelName,
        m: &Incoming,
        now: Instant,
        now_ms: u64,
    ) -> Result<ShardMask, IngestOutcome> {
        match m {
            Incoming::Epoch(e) => match self.engine.position(name) {
                Some(p) if p.epoch == *e => Ok(0),
                _ => Err(IngestOutcome::OtherEpoch),
            },
            Incoming::Message(epoch, m) => {
                let at = instant_of(m.ms, now, now_ms);
                let outcome =
                    self.engine
                        .ingest(name, *epoch, m.seq, m.kind, m.data.clone(), at, now);
                match outcome {
                    IngestOutcome::Appended(w) => Ok(w),
                    IngestOutcome::Duplicate => Ok(0),
                    other => Err(other),
                }
            }
        }
    }
}

impl Backplane for Replica {
    fn publish(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
    ) -> BoxFuture<Result<(Epoch, u64), BackplaneError>> {
        let published = self.remote.publish(channel, kind, data.clone());
        let took = self.metrics.publish.clone();
        let (me, channel) = (self.me.clone(), channel.clone());
        Box::pin(async move {
            let start = crate::types::now();
            let r = published.await;
            if let Ok((epoch, seq)) = r {
                took.record(start.elapsed().as_secs_f64());
                if let Some(me) = me.upgrade() {
                    me.published(&channel, epoch, seq, kind, data);
                }
            }
            r
        })
    }

    fn publish_with(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
        cond: PublishConditions,
    ) -> BoxFuture<Result<(Epoch, u64, bool), BackplaneError>> {
        if cond.is_empty() {
            let f = self.publish(channel, kind, data);
            return Box::pin(async move { f.await.map(|(e, s)| (e, s, false)) });
        }
        let published = self.remote.publish_with(channel, kind, data.clone(), cond);
        let (me, channel) = (self.me.clone(), channel.clone());
        Box::pin(async move {
            let r = published.await;
            // A duplicate published nothing: its position is the first publish's.
            if let (Ok((epoch, seq, false)), Some(me)) = (&r, me.upgrade()) {
                me.published(&channel, *epoch, *seq, kind, data);
            }
            r
        })
    }

    fn join(&self, channel: &ChannelName) -> Option<BoxFuture<Result<(), BackplaneError>>> {
        let now = crate::types::now();
        let mut chans = self.chans.lock();
        let rx = match chans.get_mut(channel) {
            Some(c) => {
                c.last_join = now;
                c.idle_ticks = 0;
                if c.state == State::Synced {
                    return None;
                }
                c.wait()
            }
            None => {
                if !self.remote.is_up() {
                    let why = format!("{} is unavailable", self.remote.name());
                    return Some(Box::pin(std::future::ready(Err(
                        BackplaneError::Unavailable(why),
                    ))));
                }
                let mut c = Chan::new(now);
                let rx = c.wait();
                chans.insert(channel.clone(), c);
                self.receive(vec![channel.clone()]);
                rx
            }
        };
        Some(Box::pin(async move {
            let unavailable = |why: &str| Err(BackplaneError::Unavailable(why.to_owned()));
            match tokio::time::timeout(JOIN_TIMEOUT, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => unavailable("the join was abandoned"),
                Err(_) => unavailable("timed out joining the channel"),
            }
        }))
    }

    fn history(
        &self,
        channel: &ChannelName,
        since: u64,
        limit: usize,
    ) -> BoxFuture<Result<History, BackplaneError>> {
        let limit = limit.min(self.settings.history_size);
        let read = self.remote.history(channel, since, limit);
        let (engine, channel) = (self.engine.clone(), channel.clone());
        let (size, ttl) = (self.settings.history_size, self.settings.history_ttl);
        Box::pin(async move {
            let Some(stored) = read.await? else {
                // Never published (or expired): what the local engine says.
                return Ok(engine.history(&channel, since, limit, crate::types::now()));
            };
            Ok(visible_history(stored, since, limit, size, ttl))
        })
    }

    fn is_ready(&self) -> bool {
        self.remote.is_up()
    }

    fn presence(
        &self,
        channel: &ChannelName,
    ) -> Option<BoxFuture<Result<Vec<Identity>, BackplaneError>>> {
        // A synced channel's presence is mirrored in the engine (local and remote members).
        if self
            .chans
            .lock()
            .get(channel)
            .is_some_and(|c| c.state == State::Synced)
        {
            return None;
        }
        if !self.remote.is_up() {
            let why = format!("{} is unavailable", self.remote.name());
            return Some(Box::pin(std::future::ready(Err(
                BackplaneError::Unavailable(why),
            ))));
        }
        let read = self.remote.presence(channel, Vec::new(), true);
        Some(Box::pin(async move {
            let members = read.await?.unwrap_or_default();
            let now_ms = wall_ms();
            Ok(members
                .into_values()
                .filter(|(_, _, expiry)| *expiry >= now_ms)
                .map(|(_, who, _)| who)
                .collect())
        }))
    }

    fn send_control(
        &self,
        message: Bytes,
    ) -> Option<BoxFuture<Result<Option<u64>, BackplaneError>>> {
        self.remote.send_control(message)
    }

    fn set_control(&self, handler: super::ControlHandler) {
        let _ = self.control.set(handler);
    }

    fn agrees(&self) -> bool {
        self.remote.agrees()
    }

    fn agree(
        &self,
        channel: &ChannelName,
        claims: Vec<Claim>,
    ) -> BoxFuture<Result<Vec<Agreed>, BackplaneError>> {
        self.remote.agree(channel, claims)
    }

    fn reap(&self) -> BoxFuture<Result<Vec<(ChannelName, Agreed)>, BackplaneError>> {
        self.remote.reap()
    }
}

/// What a history read serves of `stored`: the entries after `since` that the history window
/// (the last `size` seqs, younger than `ttl`) still shows, at most `limit`; `complete` when
/// they start right after `since`.
fn visible_history(
    stored: Stored,
    since: u64,
    limit: usize,
    size: usize,
    ttl: Duration,
) -> History {
    let (now, now_ms) = (crate::types::now(), wall_ms());
    let ttl_ms = ttl.as_millis() as u64;
    let top = stored.position.seq;
    let oldest = top.saturating_sub(size as u64).saturating_add(1);
    let publications: Vec<Arc<Publication>> = stored
        .entries
        .into_iter()
        .filter(|m| m.seq > since && m.seq >= oldest && now_ms.saturating_sub(m.ms) <= ttl_ms)
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
    let complete =
        since == top || (since < top && publications.first().is_some_and(|p| p.seq == since + 1));
    History {
        position: Some(stored.position),
        publications,
        complete,
    }
}

#[cfg(test)]
mod tests;
