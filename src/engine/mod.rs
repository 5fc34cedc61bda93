//! The channel engine: sequencing, history and fan-out bookkeeping. Sans-IO: it never touches a
//! socket, a timer or a runtime. Time comes in as `now`, wake-ups go out as shard masks.
//!
//! Two halves:
//! - [`Engine`] is shared by all shards (`Send + Sync`). Each channel is a [`Channel`] with one
//!   mutex around its sequencer, its history ring and its per-shard subscriber counts. A publish
//!   takes that lock once: seq + 1, append to the ring, and mark the shards that have subscribers
//!   as dirty. It returns the mask of shards that must be woken.
//! - [`hub::Hub`] is shard-local (`!Send`). On wake-up it pulls the new publications of each
//!   dirty channel from the ring and pushes the shared, pre-encoded frame into every local
//!   subscriber's bounded [`outbox::Outbox`].
//!
//! Pulling from the ring instead of pushing per-shard queues bounds memory by the ring, whatever
//! the publish rate, and turns a shard that falls too far behind into a detected gap
//! (`lost`), never a silent drop.
//!
//! What the engine holds is bounded three ways: per channel (history count, bytes and age, a
//! short byte-capped fan-out window), in channels (`max_channels`; only a publish or a
//! subscribe creates one, and an expiry queue forgets idle ones with bounded work per tick),
//! and for the node ([`memory::Meter`]: the history of the least recently used channels is
//! evicted under pressure, then what would grow memory is refused).
//!
//! Files, along the seams of [`Engine`] (one `impl Engine` block each):
//! - `mod.rs`: the channel table (parts, lookup, creation, `max_channels`, the memory
//!   admission), subscribe and unsubscribe, listings, the dirty lists.
//! - `history.rs`: publish and the ring (its history and fan-out windows, resume reads,
//!   the history API, `Channel::read_*` for the hubs).
//! - `ingest.rs`: messages sequenced elsewhere (`ingest`, `reset`), for the backplane replica.
//! - `presence.rs`: the per-channel presence set, and the engine's presence operations.
//! - `expiry.rs`: the expiry heap (`tick`) and eviction under memory pressure (`evict`).
//! - `hub.rs`, `outbox.rs`, `memory.rs`: the per-shard fan-out, the bounded outboxes, the
//!   memory meter. Tests of the table as a whole are in `tests.rs`.

mod expiry;
mod history;
pub mod hub;
pub mod idempotency;
mod ingest;
pub mod memory;
pub mod observe;
pub mod outbox;
pub mod presence;
#[cfg(test)]
mod tests;

use expiry::{Due, EVICT_INLINE, MIN_RECHECK};
pub use expiry::{TickStats, TICK_CHECKS};
pub use history::{History, FANOUT_MAX_BYTES, FANOUT_MIN, FANOUT_MIN_AGE};
pub use ingest::{IngestOutcome, RemoteEntry};
pub use presence::PresenceSnapshot;

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::types::mix_public as mix;
use crate::types::{ChannelName, DataKind, Epoch, StreamPosition};
use memory::{Kind, Meter, Pressure};
use presence::{Identity, Liveness, Presence, PresenceError, PresenceEvent};

// The leaf types the engine shares with `protocol` live in `types`; they are re-exported here
// under their old paths.
pub use crate::types::{
    mask_iter, mix_public, GapReason, Publication, ShardMask, SlowPolicy, ENTRY_OVERHEAD,
    FRAME_SLOTS, MAX_SHARDS,
};

/// Bytes a channel costs besides its name (its state, its table and queue entries).
pub const CHANNEL_OVERHEAD: usize =
    std::mem::size_of::<Channel>() + std::mem::size_of::<ChannelState>() + 128;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Number of shards (1..=[`MAX_SHARDS`]).
    pub shards: usize,
    /// Messages kept per channel for resume and the history API.
    pub history_size: usize,
    /// Bytes (payload plus [`ENTRY_OVERHEAD`] per message) kept per channel for history.
    pub history_max_bytes: usize,
    /// How long a message stays in history.
    pub history_ttl: Duration,
    /// Most channels (0: no limit).
    pub max_channels: usize,
    /// The node's memory budget for what clients grow, bytes (0: none).
    pub max_memory: usize,
    /// Seeds epoch generation; give each process a different one.
    pub seed: u64,
    /// Presence settings.
    pub presence: presence::PresenceConfig,
    /// Slow-consumer policy by channel pattern: the first match wins; no match is
    /// [`SlowPolicy::Disconnect`].
    pub slow_consumer: Vec<(String, SlowPolicy)>,
    /// How long a publish's idempotency key is remembered (its channel is kept that long).
    pub idempotency_window: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            shards: 1,
            history_size: 1000,
            history_max_bytes: 1 << 20,
            history_ttl: Duration::from_secs(300),
            max_channels: 1_000_000,
            max_memory: 0,
            seed: 0,
            presence: Default::default(),
            slow_consumer: Vec::new(),
            idempotency_window: Duration::from_secs(60),
        }
    }
}

/// One channel's shared state.
pub struct Channel {
    name: ChannelName,
    policy: SlowPolicy,
    /// Shards that were told about new publications and have not pulled them yet.
    dirty: AtomicU64,
    state: Mutex<ChannelState>,
}

struct ChannelState {
    epoch: Epoch,
    top: u64,
    ring: VecDeque<Arc<Publication>>,
    /// The ring's [`Publication::cost`]s added up.
    bytes: usize,
    /// The running total of costs (the `cum` of the next publication, minus its cost).
    cum: u64,
    /// The highest seq that memory pressure evicted: a resume that needed it fails with
    /// [`GapReason::Evicted`].
    evicted_through: u64,
    /// Published to or subscribed since eviction last looked (its second chance).
    recent: bool,
    /// In the engine's eviction queue.
    in_lru: bool,
    /// When the expiry queue examines the channel next (`None`: not queued).
    next_check: Option<Instant>,
    /// Subscribers per shard.
    shard_subs: Box<[u32]>,
    /// Shards with at least one subscriber.
    interest: ShardMask,
    last_active: Instant,
    /// Set when expiry dropped the channel from the table; whoever holds a stale `Arc`
    /// looks the name up again.
    removed: bool,
    /// Present on channels that match a presence pattern.
    presence: Option<Box<Presence>>,
    /// Bumped by [`Engine::reset`]: hubs whose subscribers were positioned in an older
    /// generation close them for resume (their positions no longer connect).
    generation: u64,
    /// Idempotency keys of recent publishes (`None` until the first).
    keys: Option<Box<idempotency::Keys>>,
}

impl ChannelState {
    fn push(
        &mut self,
        seq: u64,
        at: Instant,
        kind: DataKind,
        data: Bytes,
        frames: &memory::FrameGauge,
    ) -> usize {
        let mut p = Publication::new(seq, at, kind, data);
        p.gauge = Some(frames.clone());
        let cost = p.cost();
        self.cum += cost as u64;
        p.cum = self.cum;
        self.bytes += cost;
        self.ring.push_back(Arc::new(p));
        cost
    }

    /// Drops the oldest entry; returns its seq and cost.
    fn pop(&mut self) -> Option<(u64, usize)> {
        let p = self.ring.pop_front()?;
        self.bytes -= p.cost();
        Some((p.seq, p.cost()))
    }

    fn has_members(&self) -> bool {
        self.presence.as_ref().is_some_and(|p| !p.is_empty())
    }
}

/// Why the node refused to grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overloaded {
    /// The memory budget is used up (even after evicting history).
    #[error("the node's memory budget (--max-memory) is used up: try again later")]
    Memory,
    /// The channel would be one more than `max_channels`.
    #[error("the node has the most channels it may hold (--max-channels)")]
    Channels,
}

impl Overloaded {
    /// The `relay_refused_total` cause.
    pub fn cause(self) -> &'static str {
        match self {
            Overloaded::Memory => "memory",
            Overloaded::Channels => "max_channels",
        }
    }
}

/// Why a subscribe was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// Presence refused the member.
    #[error(transparent)]
    Presence(#[from] PresenceError),
    /// The node cannot grow.
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
}

/// What a publish did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// The channel's epoch.
    pub epoch: Epoch,
    /// The sequence ID given to the message.
    pub seq: u64,
    /// Shards to wake: they have subscribers and no pass pending (see
    /// [`Engine::enqueue_dirty`]).
    pub wake: ShardMask,
}

/// Why a conditional publish was not done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefused {
    /// The node cannot grow.
    #[error(transparent)]
    Overloaded(Overloaded),
    /// `expected_seq` is not the channel's top, which is this.
    #[error("expected_seq is not the channel's top seq ({}:{})", .0.epoch, .0.seq)]
    SeqMismatch(StreamPosition),
}

/// How a subscribe went.
pub struct Subscribed {
    /// The channel, for the hub and for the unsubscribe.
    pub channel: Arc<Channel>,
    /// The channel's current position: live messages start after it.
    pub position: StreamPosition,
    /// Whether the requested resume position was recovered.
    pub recovered: bool,
    /// On recovery with messages to replay, the seq the replay starts after (the client's
    /// position). The hub pages the replay out of the ring as the outbox drains.
    pub replay_after: Option<u64>,
    /// Why recovery failed, when it was asked for and failed.
    pub gap: Option<GapReason>,
    /// The presence sequence before this subscriber's own join (its presence cursor).
    pub pseq: u64,
    /// Whether the channel has presence.
    pub presence: bool,
    /// Shards to wake for the join event.
    pub wake: ShardMask,
    /// The channel's generation (see [`Engine::reset`]) at `position`.
    pub generation: u64,
}

/// A member to add on subscribe.
pub struct Join {
    /// Who.
    pub who: Identity,
    /// The connection's liveness.
    pub live: Arc<Liveness>,
}

/// Summary of one channel for the channels API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    /// Name.
    pub name: ChannelName,
    /// Subscribers over all shards.
    pub subscribers: u64,
    /// Latest sequence ID.
    pub seq: u64,
}

/// A page of the channel list.
pub struct ChannelsPage {
    /// The channels of the page, sorted by name.
    pub channels: Vec<ChannelInfo>,
    /// The cursor of the next page (the last name of this one), when there is more.
    pub next: Option<ChannelName>,
}

/// Counters since start, for metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Channels examined by expiry.
    pub checked: AtomicU64,
    /// The most channels one tick examined.
    pub checked_max: AtomicU64,
    /// Channels forgotten by expiry.
    pub expired: AtomicU64,
    /// History evictions (channels) under memory pressure.
    pub evictions: AtomicU64,
    /// Bytes of history evicted.
    pub evicted_bytes: AtomicU64,
}

const TABLE_PARTS: usize = 16;

/// One part of the channel table.
type Table = HashMap<ChannelName, Arc<Channel>>;

/// The shared channel table. See the module docs.
pub struct Engine {
    cfg: EngineConfig,
    table: Box<[RwLock<Table>]>,
    hasher: std::collections::hash_map::RandomState,
    epochs: AtomicU64,
    dirty_lists: Box<[Mutex<Vec<Arc<Channel>>>]>,
    /// Origin of the engine's millisecond clock (presence liveness).
    base: Instant,
    /// Channels in the table.
    count: AtomicUsize,
    /// What clients made the node hold.
    meter: Meter,
    /// When to examine which channel (expiry, ring trimming, presence events): a min-heap.
    expiry: Mutex<BinaryHeap<Due>>,
    due_n: AtomicU64,
    /// Channels with history, oldest first, for eviction (second-chance order).
    lru: Mutex<VecDeque<Arc<Channel>>>,
    /// One evicting thread at a time; a publisher over the budget waits for the current
    /// eviction rather than being refused while it runs.
    evicting: Mutex<()>,
    /// Until when (engine ms) publishers over the budget do not try to evict: the last try
    /// found nothing to evict, so trying again on every refused publish would only cost.
    evict_idle_until: AtomicU64,
    /// Channels with presence members (the presence sweep's work list).
    present: Mutex<HashMap<ChannelName, Arc<Channel>>>,
    /// Channels with subscribers on this node, by table part.
    subscribed: Box<[Mutex<HashSet<ChannelName>>]>,
    /// Info bytes of every presence member on the node.
    info_bytes: AtomicUsize,
    stats: EngineStats,
    /// Told about occupancy and presence changes (webhooks), when set.
    observer: std::sync::OnceLock<Arc<dyn observe::Observer>>,
}

impl Engine {
    /// A new, empty engine.
    pub fn new(mut cfg: EngineConfig) -> Self {
        cfg.shards = cfg.shards.clamp(1, MAX_SHARDS);
        Self {
            table: (0..TABLE_PARTS).map(|_| RwLock::default()).collect(),
            hasher: Default::default(),
            epochs: AtomicU64::new(0),
            dirty_lists: (0..cfg.shards).map(|_| Mutex::default()).collect(),
            base: crate::types::now(),
            count: AtomicUsize::new(0),
            meter: Meter::new(cfg.max_memory, cfg.shards),
            expiry: Mutex::default(),
            due_n: AtomicU64::new(0),
            lru: Mutex::default(),
            evicting: Mutex::new(()),
            evict_idle_until: AtomicU64::new(0),
            present: Mutex::default(),
            subscribed: (0..TABLE_PARTS).map(|_| Mutex::default()).collect(),
            info_bytes: AtomicUsize::new(0),
            stats: EngineStats::default(),
            observer: std::sync::OnceLock::new(),
            cfg,
        }
    }

    /// Sets the observer of occupancy and presence changes (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn observe::Observer>) {
        let _ = self.observer.set(observer);
    }

    /// The settings in force.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The memory meter (the shards report their outboxes and responses into it).
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Counters since start.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Channels in the table.
    pub fn channel_count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// `now` on the engine's millisecond clock (what [`Liveness`] holds).
    pub fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_millis() as u64
    }

    /// A client id for connection `conn` of `shard`, unique in this process and unlikely to
    /// repeat across processes.
    pub fn client_id(&self, shard: usize, conn: u64) -> Arc<str> {
        let x = mix(self.cfg.seed ^ 0xC1A5_5EED, ((shard as u64) << 48) ^ conn);
        Arc::from(format!("{x:016x}"))
    }

    fn part_index(&self, name: &ChannelName) -> usize {
        (self.hasher.hash_one(name) as usize) % TABLE_PARTS
    }

    fn part(&self, name: &ChannelName) -> &RwLock<Table> {
        &self.table[self.part_index(name)]
    }

    fn next_epoch(&self) -> Epoch {
        // Distinct per channel incarnation and per process; bit 60 keeps 0 an impossible epoch.
        let n = self.epochs.fetch_add(1, Ordering::Relaxed);
        Epoch(mix(self.cfg.seed, n) | 1 << 60)
    }

    /// Marks the interested shards of `ch` dirty; returns the ones newly marked. Call under the
    /// channel lock, after recording what they must pull, then [`Engine::enqueue_dirty`].
    fn mark_dirty(ch: &Channel, st: &ChannelState) -> ShardMask {
        let prev = ch.dirty.fetch_or(st.interest, Ordering::AcqRel);
        st.interest & !prev
    }

    /// Puts `ch` on the dirty list of each shard in `wake`; returns the shards to notify: those
    /// whose list was empty. A list that already held a channel was notified when it got its
    /// first one and has not been taken since, so the pass to come takes this one too: a burst
    /// of publishes to many channels notifies a shard once per pass, not once per publish.
    /// (Notifying a shard in `wake` that is not returned is harmless, a spare pass.)
    fn enqueue_dirty(&self, ch: &Arc<Channel>, wake: ShardMask) -> ShardMask {
        let mut notify: ShardMask = 0;
        for shard in mask_iter(wake) {
            let mut list = self.dirty_lists[shard].lock();
            if list.is_empty() {
                notify |= 1 << shard;
            }
            list.push(ch.clone());
        }
        notify
    }

    fn lookup(&self, name: &ChannelName) -> Option<Arc<Channel>> {
        self.part(name).read().get(name).cloned()
    }

    /// The channel `name`, created if needed; with `enforce`, a creation past `max_channels`
    /// is refused.
    fn get_or_create(&self, name: &ChannelName, enforce: bool) -> Result<Arc<Channel>, Overloaded> {
        if let Some(ch) = self.lookup(name) {
            return Ok(ch);
        }
        let mut part = self.part(name).write();
        if let Some(ch) = part.get(name) {
            return Ok(ch.clone());
        }
        let before = self.count.fetch_add(1, Ordering::Relaxed);
        if enforce && self.cfg.max_channels > 0 && before >= self.cfg.max_channels {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return Err(Overloaded::Channels);
        }
        let ch = Arc::new(Channel {
            name: name.clone(),
            policy: self
                .cfg
                .slow_consumer
                .iter()
                .find(|(p, _)| presence::glob_match(p, name.as_str()))
                .map(|(_, policy)| *policy)
                .unwrap_or_default(),
            dirty: AtomicU64::new(0),
            state: Mutex::new(ChannelState {
                epoch: self.next_epoch(),
                top: 0,
                ring: VecDeque::new(),
                bytes: 0,
                cum: 0,
                evicted_through: 0,
                recent: true,
                in_lru: false,
                next_check: None,
                shard_subs: vec![0; self.cfg.shards].into_boxed_slice(),
                interest: 0,
                last_active: self.base,
                removed: false,
                presence: self.has_presence(name).then(Box::default),
                generation: 0,
                keys: None,
            }),
        });
        part.insert(name.clone(), ch.clone());
        drop(part);
        self.meter.add(Kind::Channels, channel_cost(name));
        Ok(ch)
    }

    /// Drops `ch` from the table if it is still the entry for its name (expiry marked it
    /// removed). Whoever removes it releases its count.
    fn forget(&self, ch: &Arc<Channel>) {
        let mut part = self.part(&ch.name).write();
        if part.get(&ch.name).is_some_and(|c| Arc::ptr_eq(c, ch)) {
            part.remove(&ch.name);
            drop(part);
            self.count.fetch_sub(1, Ordering::Relaxed);
            self.meter.add(Kind::Channels, -channel_cost(&ch.name));
        }
    }

    /// Runs `f` under the lock of the live channel `name`, creating it if needed (refused past
    /// `max_channels` when `enforce`). A new channel joins the expiry queue.
    fn with_channel<R>(
        &self,
        name: &ChannelName,
        now: Instant,
        enforce: bool,
        f: impl FnOnce(&Arc<Channel>, &mut ChannelState) -> R,
    ) -> Result<R, Overloaded> {
        loop {
            let ch = self.get_or_create(name, enforce)?;
            let mut st = ch.state.lock();
            if st.removed {
                // Lost a race with expiry: make sure the stale entry is gone, look up again.
                drop(st);
                self.forget(&ch);
                continue;
            }
            let r = f(&ch, &mut st);
            if st.next_check.is_none() {
                let at = self.next_due(&st, now);
                self.schedule(&ch, &mut st, at);
            }
            return Ok(r);
        }
    }

    /// Runs `f` under the lock of `name` if the channel exists; never creates it.
    fn with_existing<R>(
        &self,
        name: &ChannelName,
        f: impl FnOnce(&Arc<Channel>, &mut ChannelState) -> R,
    ) -> Option<R> {
        let ch = self.lookup(name)?;
        let mut st = ch.state.lock();
        if st.removed {
            return None;
        }
        Some(f(&ch, &mut st))
    }

    /// Whether a publish to or a subscription of `name` may grow the node now: refused under
    /// memory pressure (after evicting what it can) and, for a channel that does not exist
    /// yet, past `max_channels`. Cheap when there is no pressure: two atomic loads.
    pub fn admit(&self, name: &ChannelName, now: Instant) -> Result<(), Overloaded> {
        if self.meter.pressure() == Pressure::Refuse {
            // The tick evicts in the background from 85 %; over the budget, make room here
            // before refusing (unless the last try found nothing to evict, just now).
            let ms = self.millis(now);
            if ms >= self.evict_idle_until.load(Ordering::Relaxed)
                && self.evict(now, EVICT_INLINE) == 0
            {
                self.evict_idle_until
                    .store(ms + MIN_RECHECK.as_millis() as u64, Ordering::Relaxed);
            }
            if self.meter.pressure() == Pressure::Refuse {
                return Err(Overloaded::Memory);
            }
        }
        if self.cfg.max_channels > 0
            && self.count.load(Ordering::Relaxed) >= self.cfg.max_channels
            && self.lookup(name).is_none()
        {
            return Err(Overloaded::Channels);
        }
        Ok(())
    }

    /// Whether the node refuses what would grow memory (new connections, publishes,
    /// subscriptions).
    pub fn overloaded(&self) -> bool {
        self.meter.pressure() == Pressure::Refuse
    }

    /// Subscribes one subscriber of `shard` to `name`, resuming from `resume` when given, and
    /// adds it to the channel's presence when the channel has presence and `join` is given.
    /// Creates the channel (refused past `max_channels`); refused under memory pressure.
    ///
    /// The caller must register the subscriber in its shard's hub with `position.seq` and
    /// `pseq` as its starting points before it yields, wake `wake`, and call
    /// [`Engine::unsubscribe`] exactly once when it leaves.
    pub fn subscribe(
        &self,
        shard: usize,
        name: &ChannelName,
        resume: Option<StreamPosition>,
        join: Option<Join>,
        now: Instant,
    ) -> Result<Subscribed, SubscribeError> {
        self.admit(name, now)?;
        let mut join = join;
        let now_ms = self.millis(now);
        let (s, ch) = self.with_channel(name, now, true, |ch, st| {
            let shard = shard % self.cfg.shards;
            let pseq = st.presence.as_ref().map_or(0, |p| p.pseq());
            let top = st.top;
            let first_on_node = st.shard_subs.iter().all(|&n| n == 0);
            // Occupancy before the subscriber's presence join, so an observer sees them in the
            // order a member sees them (the channel is occupied, then someone is in it).
            let observer = self.observer.get().filter(|_| first_on_node);
            if let Some(o) = observer {
                o.occupancy(name, true);
            }
            let joined = match join.take() {
                Some(j) if st.presence.is_some() => {
                    let info = j.who.info.as_ref().map_or(0, Bytes::len);
                    if info > 0
                        && self.info_bytes.load(Ordering::Relaxed) + info
                            > self.cfg.presence.info_budget
                    {
                        if let Some(o) = observer {
                            o.occupancy(name, false);
                        }
                        return Err(SubscribeError::Presence(PresenceError::InfoBudget));
                    }
                    let max = self.cfg.presence.max_members;
                    let r = self
                        .presence_op(ch, st, now_ms, |p| p.join(j.who, j.live, top, max, now_ms))
                        .unwrap_or(Ok(false));
                    if let (Err(_), Some(o)) = (&r, observer) {
                        o.occupancy(name, false);
                    }
                    r?
                }
                _ => false,
            };
            st.shard_subs[shard] += 1;
            st.interest |= 1 << shard;
            if first_on_node {
                self.subscribed[self.part_index(name)]
                    .lock()
                    .insert(name.clone());
            }
            // After the interest update, so that this shard pulls its own join event too.
            let wake = if joined { Self::mark_dirty(ch, st) } else { 0 };
            st.last_active = now;
            st.recent = true;
            let position = StreamPosition {
                epoch: st.epoch,
                seq: st.top,
            };
            let (recovered, replay_after, gap) = match resume {
                None => (false, None, None),
                Some(p) if p.epoch != st.epoch => (false, None, Some(GapReason::EpochChanged)),
                Some(p) => match self.visible_since(st, p.seq, now) {
                    Ok(_) => (true, (p.seq < st.top).then_some(p.seq), None),
                    Err(reason) => (false, None, Some(reason)),
                },
            };
            Ok((
                Subscribed {
                    channel: ch.clone(),
                    position,
                    recovered,
                    replay_after,
                    gap,
                    pseq,
                    presence: st.presence.is_some(),
                    wake,
                    generation: st.generation,
                },
                ch.clone(),
            ))
        })??;
        self.enqueue_dirty(&ch, s.wake);
        Ok(s)
    }

    /// Undoes one [`Engine::subscribe`] of `shard`. Returns whether the channel has no
    /// subscriber left on this node (this was the last one).
    pub fn unsubscribe(&self, shard: usize, channel: &Channel, now: Instant) -> bool {
        let shard = shard % self.cfg.shards;
        let mut st = channel.state.lock();
        let was = st.interest != 0;
        st.shard_subs[shard] = st.shard_subs[shard].saturating_sub(1);
        if st.shard_subs[shard] == 0 {
            st.interest &= !(1 << shard);
        }
        st.last_active = now;
        if was && st.interest == 0 {
            self.subscribed[self.part_index(&channel.name)]
                .lock()
                .remove(&channel.name);
            if let Some(o) = self.observer.get() {
                o.occupancy(&channel.name, false);
            }
        }
        st.interest == 0
    }

    /// The channels with subscribers on this node (what a backplane must receive). Costs
    /// O(such channels), not O(channels).
    pub fn subscribed_channels(&self) -> Vec<ChannelName> {
        self.subscribed
            .iter()
            .flat_map(|s| s.lock().iter().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Subscribers of `name` on this node, over all shards (0 when the channel is unknown).
    pub fn local_subscribers(&self, name: &ChannelName) -> u64 {
        self.with_existing(name, |_, st| {
            st.shard_subs.iter().map(|&n| u64::from(n)).sum()
        })
        .unwrap_or(0)
    }

    /// The position of `name` on this node, if the channel exists here.
    pub fn position(&self, name: &ChannelName) -> Option<StreamPosition> {
        self.with_existing(name, |_, st| StreamPosition {
            epoch: st.epoch,
            seq: st.top,
        })
    }

    /// Takes the channels that have new publications for `shard`, clearing their dirty bit
    /// for it. Pull with [`Channel::read_since`] after this call, never before.
    pub fn take_dirty(&self, shard: usize, out: &mut Vec<Arc<Channel>>) {
        let bit = 1u64 << (shard % self.cfg.shards);
        std::mem::swap(&mut *self.dirty_lists[shard % self.cfg.shards].lock(), out);
        for ch in out.iter() {
            ch.dirty.fetch_and(!bit, Ordering::AcqRel);
        }
    }

    /// A page of the channels, sorted by name: those after `after`, at most `limit`. One pass
    /// over the table keeping the `limit` smallest names (each part under its read lock, which
    /// never stops a publish to an existing channel).
    pub fn channels_page(&self, after: Option<&ChannelName>, limit: usize) -> ChannelsPage {
        let take = limit.max(1);
        // A max-heap of the `take + 1` smallest names seen: its top is the one to drop.
        let mut best: BinaryHeap<(ChannelName, ByPtr)> = BinaryHeap::with_capacity(take + 2);
        for part in self.table.iter() {
            let part = part.read();
            for (name, ch) in part.iter() {
                if after.is_some_and(|a| name <= a) {
                    continue;
                }
                if best.len() <= take {
                    best.push((name.clone(), ByPtr(ch.clone())));
                } else if best.peek().is_some_and(|(top, _)| name < top) {
                    best.pop();
                    best.push((name.clone(), ByPtr(ch.clone())));
                }
            }
        }
        let mut all = best.into_sorted_vec();
        let more = all.len() > take;
        all.truncate(take);
        let channels: Vec<ChannelInfo> = all
            .into_iter()
            .map(|(name, ch)| {
                let st = ch.0.state.lock();
                ChannelInfo {
                    name,
                    subscribers: st.shard_subs.iter().map(|&n| u64::from(n)).sum(),
                    seq: st.top,
                }
            })
            .collect();
        let next = more
            .then(|| channels.last().map(|c| c.name.clone()))
            .flatten();
        ChannelsPage { channels, next }
    }

    /// Active channels, sorted by name (every page of [`Engine::channels_page`]: for tests and
    /// small tables).
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.channels_page(after.as_ref(), 1000);
            out.extend(page.channels);
            match page.next {
                Some(n) => after = Some(n),
                None => return out,
            }
        }
    }
}

/// What a channel costs in the meter's `channels` kind.
fn channel_cost(name: &ChannelName) -> i64 {
    (CHANNEL_OVERHEAD + name.as_str().len()) as i64
}

/// An `Arc<Channel>` that sorts as equal to every other (the channel list sorts by name).
struct ByPtr(Arc<Channel>);

impl PartialEq for ByPtr {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for ByPtr {}
impl PartialOrd for ByPtr {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByPtr {
    fn cmp(&self, _: &Self) -> CmpOrdering {
        CmpOrdering::Equal
    }
}

impl Channel {
    /// The channel's name.
    pub fn name(&self) -> &ChannelName {
        &self.name
    }

    /// The slow-consumer policy of the channel.
    pub fn policy(&self) -> SlowPolicy {
        self.policy
    }

    /// The channel's current position.
    pub fn position(&self) -> StreamPosition {
        let st = self.state.lock();
        StreamPosition {
            epoch: st.epoch,
            seq: st.top,
        }
    }
}
