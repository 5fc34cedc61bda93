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

pub mod hub;
pub mod idempotency;
pub mod memory;
pub mod observe;
pub mod outbox;
pub mod presence;

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::types::{ChannelName, DataKind, Epoch, StreamPosition};
use memory::{Kind, Meter, Pressure};
use presence::{Identity, Liveness, Presence, PresenceError, PresenceEvent, PresenceStats};

/// Most shards an engine serves (the dirty mask is one `u64`).
pub const MAX_SHARDS: usize = 64;

/// How many encodings of one publication can be cached (see [`Publication::frame`]).
pub const FRAME_SLOTS: usize = 6;

/// The fan-out window: besides its history, a ring keeps what was published in the last
/// [`FANOUT_MIN_AGE`], up to this many publications and [`FANOUT_MAX_BYTES`], so that shards
/// can catch up after a burst even with a small (or zero) history.
pub const FANOUT_MIN: usize = 1024;

/// How long the fan-out window lasts.
pub const FANOUT_MIN_AGE: Duration = Duration::from_secs(5);

/// Most bytes the fan-out window keeps per channel. A shard that falls further behind sees
/// the gap (`lost`) and closes its subscribers for resume.
pub const FANOUT_MAX_BYTES: usize = 4 << 20;

/// Bytes a ring entry costs besides its payload (the publication, its `Arc`, its ring slot).
pub const ENTRY_OVERHEAD: usize = std::mem::size_of::<Publication>() + 24;

/// Bytes a channel costs besides its name (its state, its table and queue entries).
pub const CHANNEL_OVERHEAD: usize =
    std::mem::size_of::<Channel>() + std::mem::size_of::<ChannelState>() + 128;

/// Most channels one [`Engine::tick`] examines: expiry costs the same whatever the number of
/// channels.
pub const TICK_CHECKS: usize = 4096;

/// Most channels an eviction on the publish or subscribe path examines.
const EVICT_INLINE: usize = 64;

/// A channel is examined again at most this often.
const MIN_RECHECK: Duration = Duration::from_millis(100);

/// Bit set of shard indexes.
pub type ShardMask = u64;

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

/// What happens to a subscriber whose connection cannot take a channel's messages as fast as
/// they come (its outbox is full).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlowPolicy {
    /// Close the connection (4008); the client resumes from its last seq.
    #[default]
    Disconnect,
    /// Skip messages and tell the client the range it missed (a gap notice) before the next one.
    Drop,
    /// Keep only the latest message of the channel for that client.
    Conflate,
}

impl SlowPolicy {
    /// Parses `disconnect`, `drop` or `conflate`.
    pub fn parse(s: &str) -> Option<SlowPolicy> {
        match s {
            "disconnect" => Some(SlowPolicy::Disconnect),
            "drop" => Some(SlowPolicy::Drop),
            "conflate" => Some(SlowPolicy::Conflate),
            _ => None,
        }
    }
}

/// One published message, shared by reference between the ring, every shard and every outbox.
pub struct Publication {
    /// Sequence ID in its channel.
    pub seq: u64,
    /// When it was published (for the history TTL).
    pub at: Instant,
    /// What the payload is.
    pub kind: DataKind,
    /// The payload as published.
    pub data: Bytes,
    /// The channel's running total of [`Publication::cost`] up to and including this one
    /// (the byte windows of the ring are found by binary search on it).
    cum: u64,
    frames: [OnceLock<Bytes>; FRAME_SLOTS],
    /// Where its frames are counted (the node's meter); `None` for publications built outside
    /// an engine (benches, tests), whose frames outboxes count themselves.
    gauge: Option<memory::FrameGauge>,
}

impl Publication {
    /// Creates a publication; exposed for benches and tests.
    pub fn new(seq: u64, at: Instant, kind: DataKind, data: Bytes) -> Self {
        Self {
            seq,
            at,
            kind,
            data,
            cum: 0,
            frames: Default::default(),
            gauge: None,
        }
    }

    /// The encoded frame for `slot`, built by `encode` the first time any shard asks and shared
    /// by everyone after: a message is encoded once per encoding, never per subscriber.
    pub fn frame(&self, slot: usize, encode: impl FnOnce(&Publication) -> Bytes) -> Bytes {
        self.frames[slot % FRAME_SLOTS]
            .get_or_init(|| match &self.gauge {
                Some(g) => g.count(encode(self)),
                None => encode(self),
            })
            .clone()
    }

    /// Whether its frames are counted in the node's meter (then an outbox counts only its
    /// entry for one, see [`memory::FrameGauge`]).
    pub fn counts_frames(&self) -> bool {
        self.gauge.is_some()
    }

    /// What it costs in a ring: its payload plus [`ENTRY_OVERHEAD`].
    pub fn cost(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD
    }

    /// The running total before this one.
    fn cum_before(&self) -> u64 {
        self.cum - self.cost() as u64
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

/// What [`Engine::ingest`] did with a message sequenced elsewhere (by a backplane).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    /// It was the next message: appended; wake these shards.
    Appended(ShardMask),
    /// The channel already has it (`seq <= top`): ignored.
    Duplicate,
    /// Messages are missing between the local top and this one: nothing was appended; fetch
    /// `top + 1 ..= seq` and ingest them in order (or [`Engine::reset`]).
    Gap {
        /// The local top.
        top: u64,
    },
    /// The message belongs to another epoch than the local one: the local state is stale and
    /// must be [`Engine::reset`].
    OtherEpoch,
}

/// One message of a remote history, for [`Engine::reset`].
#[derive(Clone, Debug)]
pub struct RemoteEntry {
    /// Its seq.
    pub seq: u64,
    /// When it was published, on this process's clock.
    pub at: Instant,
    /// Payload kind.
    pub kind: DataKind,
    /// Payload.
    pub data: Bytes,
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
    /// Shards to wake: they have subscribers and were not already dirty.
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

/// A presence listing (one page).
pub struct PresenceSnapshot {
    /// The channel's message seq.
    pub seq: u64,
    /// The members of this page, by client id.
    pub members: Vec<Identity>,
    /// Counts.
    pub stats: PresenceStats,
    /// The cursor of the next page (the last client id of this one), when there is more.
    pub next: Option<Arc<str>>,
}

/// Why a resume position could not be recovered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// The channel's history started afresh since.
    EpochChanged,
    /// The history no longer holds the message after the position (or the position is ahead).
    HistoryExpired,
    /// The history held it, but memory pressure evicted it (see `--max-memory`).
    Evicted,
}

impl GapReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::EpochChanged => "epoch_changed",
            GapReason::HistoryExpired => "history_expired",
            GapReason::Evicted => "evicted",
        }
    }
}

/// A history read.
pub struct History {
    /// The channel's current position; `None` when the channel does not exist (then there are
    /// no publications, and `complete` says whether `since` was 0).
    pub position: Option<StreamPosition>,
    /// Publications after `since`, oldest first, at most `limit`.
    pub publications: Vec<Arc<Publication>>,
    /// False when history no longer holds `since + 1`.
    pub complete: bool,
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

/// What one [`Engine::tick`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickStats {
    /// Channels examined by expiry (at most [`TICK_CHECKS`]).
    pub checked: usize,
    /// Channels forgotten.
    pub expired: usize,
    /// Channels whose history was evicted for memory.
    pub evicted: usize,
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

/// An entry of the expiry queue: examine `ch` at `at`. The channel's `next_check` says which
/// entry is current; others are stale and skipped.
struct Due {
    at: Instant,
    n: u64,
    ch: Arc<Channel>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.n) == (other.at, other.n)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        // Reversed: the heap pops the earliest first.
        (other.at, other.n).cmp(&(self.at, self.n))
    }
}

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
            base: Instant::now(),
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

    /// Info bytes of every presence member on the node.
    pub fn presence_info_bytes(&self) -> usize {
        self.info_bytes.load(Ordering::Relaxed)
    }

    /// `now` on the engine's millisecond clock (what [`Liveness`] holds).
    pub fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_millis() as u64
    }

    /// Whether `name` has presence.
    pub fn has_presence(&self, name: &ChannelName) -> bool {
        self.cfg
            .presence
            .patterns
            .iter()
            .any(|p| presence::glob_match(p, name.as_str()))
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

    fn enqueue_dirty(&self, ch: &Arc<Channel>, wake: ShardMask) {
        for shard in mask_iter(wake) {
            self.dirty_lists[shard].lock().push(ch.clone());
        }
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
        mut f: impl FnMut(&Arc<Channel>, &mut ChannelState) -> R,
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

    /// Sequences one message: gives it the next seq, appends it to history and returns the
    /// shards to wake (whose dirty lists now hold the channel). Refused under memory pressure
    /// and past `max_channels` (see [`Engine::admit`]).
    pub fn publish(
        &self,
        name: &ChannelName,
        kind: DataKind,
        data: Bytes,
        now: Instant,
    ) -> Result<Published, Overloaded> {
        self.admit(name, now)?;
        let (published, ch) = self.with_channel(name, now, true, |ch, st| {
            st.top += 1;
            st.last_active = now;
            st.recent = true;
            let cost = st.push(st.top, now, kind, data.clone(), self.meter.frames());
            // One meter update for the append and what it pushed out.
            let freed = self.trim(ch, st, now);
            self.meter.add(Kind::History, cost as i64 - freed as i64);
            // Mark under the lock so that a shard that pulls after seeing its bit sees the entry.
            let wake = Self::mark_dirty(ch, st);
            (
                Published {
                    epoch: st.epoch,
                    seq: st.top,
                    wake,
                },
                ch.clone(),
            )
        })?;
        self.enqueue_dirty(&ch, published.wake);
        Ok(published)
    }

    /// [`Engine::publish`] under `cond`: a repeat of an idempotency key within the window
    /// answers the first publish's position and publishes nothing (`.1` is `true`); with
    /// `expected_seq`, publishes only when the channel's top is that seq, else
    /// [`PublishRefused::SeqMismatch`] with the current position. A duplicate is recognised
    /// before the seq is compared, so the retry of a conditional publish that went through
    /// gets its seq, not a mismatch.
    pub fn publish_with(
        &self,
        name: &ChannelName,
        kind: DataKind,
        data: Bytes,
        cond: &idempotency::PublishConditions,
        now: Instant,
    ) -> Result<(Published, bool), PublishRefused> {
        self.admit(name, now).map_err(PublishRefused::Overloaded)?;
        let window = self.cfg.idempotency_window;
        let (r, ch) = self
            .with_channel(name, now, true, |ch, st| {
                if let Some(keys) = st.keys.as_mut() {
                    let freed = keys.prune(now, window);
                    self.meter.add(Kind::History, -(freed as i64));
                }
                let key = cond.idempotency_key.as_ref();
                if let Some(seq) = key.and_then(|k| st.keys.as_ref()?.get(k)) {
                    let p = Published {
                        epoch: st.epoch,
                        seq,
                        wake: 0,
                    };
                    return (Ok((p, true)), ch.clone());
                }
                if cond.expected_seq.is_some_and(|e| e != st.top) {
                    let at = StreamPosition {
                        epoch: st.epoch,
                        seq: st.top,
                    };
                    return (Err(PublishRefused::SeqMismatch(at)), ch.clone());
                }
                st.top += 1;
                st.last_active = now;
                st.recent = true;
                let mut cost = st.push(st.top, now, kind, data.clone(), self.meter.frames());
                if let Some(k) = key {
                    let top = st.top;
                    let keys = st.keys.get_or_insert_with(Box::default);
                    cost += keys.insert(k.clone(), top, now);
                    // The expiry queue looks at the channel again once its oldest key is due.
                    if let Some(at) = keys.next_expiry(window) {
                        self.schedule(ch, st, at + Duration::from_millis(1));
                    }
                }
                let freed = self.trim(ch, st, now);
                self.meter.add(Kind::History, cost as i64 - freed as i64);
                let wake = Self::mark_dirty(ch, st);
                let p = Published {
                    epoch: st.epoch,
                    seq: st.top,
                    wake,
                };
                (Ok((p, false)), ch.clone())
            })
            .map_err(PublishRefused::Overloaded)?;
        if let Ok((p, false)) = &r {
            self.enqueue_dirty(&ch, p.wake);
        }
        r
    }

    /// Where the history window of the ring starts: the oldest entry that is within the last
    /// `history_size`, the last `history_max_bytes` and the TTL. `ring.len()` when none is.
    fn history_start(&self, st: &ChannelState, now: Instant) -> usize {
        let by_count = st.ring.len().saturating_sub(self.cfg.history_size);
        let floor = st.cum.saturating_sub(self.cfg.history_max_bytes as u64);
        let by_bytes = st.ring.partition_point(|p| p.cum_before() < floor);
        let ttl = self.cfg.history_ttl;
        let by_age = st
            .ring
            .partition_point(|p| now.saturating_duration_since(p.at) > ttl);
        by_count.max(by_bytes).max(by_age)
    }

    /// Whether the ring's oldest entry is in the history window (so the whole ring is).
    fn front_in_history(&self, st: &ChannelState, now: Instant) -> bool {
        st.ring.front().is_some_and(|front| {
            st.ring.len() <= self.cfg.history_size
                && st.bytes <= self.cfg.history_max_bytes
                && now.saturating_duration_since(front.at) <= self.cfg.history_ttl
        })
    }

    /// Whether the ring's oldest entry is in the fan-out window (young, within its count and
    /// bytes).
    fn front_in_fanout(st: &ChannelState, now: Instant) -> bool {
        st.ring.front().is_some_and(|front| {
            st.ring.len() <= FANOUT_MIN
                && st.bytes <= FANOUT_MAX_BYTES
                && now.saturating_duration_since(front.at) <= FANOUT_MIN_AGE
        })
    }

    /// Drops what neither window keeps, and makes sure the channel is examined again when its
    /// oldest entry leaves the fan-out window. Returns the bytes freed, for the caller to count
    /// in the meter (with what it added, in one update).
    fn trim(&self, ch: &Arc<Channel>, st: &mut ChannelState, now: Instant) -> usize {
        let mut freed = 0;
        let in_history = loop {
            if st.ring.is_empty() {
                break true;
            }
            if self.front_in_history(st, now) {
                break true;
            }
            if Self::front_in_fanout(st, now) {
                break false;
            }
            if let Some((_, cost)) = st.pop() {
                freed += cost;
            }
        };
        if !st.ring.is_empty() && !st.in_lru {
            // Queued at the back: a use from now on gives it a second chance.
            st.in_lru = true;
            st.recent = false;
            self.lru.lock().push_back(ch.clone());
        }
        if let (false, Some(front)) = (in_history, st.ring.front()) {
            // Only the fan-out window keeps the front: it goes when the window closes, not at
            // the channel's next TTL check.
            let at = front.at + FANOUT_MIN_AGE + Duration::from_millis(1);
            self.schedule(ch, st, at);
        }
        freed
    }

    /// Queues an examination of `ch` at `at`, unless one is due sooner already.
    fn schedule(&self, ch: &Arc<Channel>, st: &mut ChannelState, at: Instant) {
        if st.next_check.is_some_and(|n| n <= at) {
            return;
        }
        st.next_check = Some(at);
        let n = self.due_n.fetch_add(1, Ordering::Relaxed);
        self.expiry.lock().push(Due {
            at,
            n,
            ch: ch.clone(),
        });
    }

    /// When the channel must be examined next: when its oldest entry leaves its window, when
    /// its oldest presence event ages out, when it has been idle for the TTL; a subscribed
    /// channel once per TTL at least.
    fn next_due(&self, st: &ChannelState, now: Instant) -> Instant {
        let ttl = self.cfg.history_ttl;
        let mut due = now + ttl;
        let idle_at = st.last_active + ttl;
        if st.interest == 0 && !st.has_members() && idle_at > now {
            due = due.min(idle_at);
        }
        if let Some(front) = st.ring.front() {
            let window = if self.front_in_history(st, now) {
                ttl
            } else {
                FANOUT_MIN_AGE
            };
            due = due.min(front.at + window);
        }
        if let Some(ms) = st.presence.as_ref().and_then(|p| p.events_due()) {
            due = due.min(self.base + Duration::from_millis(ms));
        }
        if let Some(at) = st
            .keys
            .as_ref()
            .and_then(|k| k.next_expiry(self.cfg.idempotency_window))
        {
            due = due.min(at);
        }
        (due + Duration::from_millis(1)).max(now + MIN_RECHECK)
    }

    /// The publications after `since` that history (size, bytes and TTL) still serves, or why
    /// `since + 1` is not there.
    fn visible_since<'s>(
        &self,
        st: &'s ChannelState,
        since: u64,
        now: Instant,
    ) -> Result<std::collections::vec_deque::Iter<'s, Arc<Publication>>, GapReason> {
        if since > st.top {
            return Err(GapReason::HistoryExpired);
        }
        if since == st.top {
            return Ok(st.ring.range(0..0));
        }
        let reason = if since < st.evicted_through {
            GapReason::Evicted
        } else {
            GapReason::HistoryExpired
        };
        let start = self.history_start(st, now);
        let (Some(front), Some(first)) = (st.ring.front(), st.ring.get(start)) else {
            return Err(reason);
        };
        if since + 1 < first.seq {
            return Err(reason);
        }
        Ok(st.ring.range((since + 1 - front.seq) as usize..))
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

    /// Runs `f` on the channel's presence (`None` when it has none) and keeps the books: the
    /// memory meter, the node's info bytes, the list of channels with members, and the expiry
    /// of its events.
    fn presence_op<R>(
        &self,
        ch: &Arc<Channel>,
        st: &mut ChannelState,
        now_ms: u64,
        f: impl FnOnce(&mut Presence) -> R,
    ) -> Option<R> {
        let p = st.presence.as_mut()?;
        let (bytes, info, empty) = (p.bytes(), p.info_bytes(), p.is_empty());
        let pseq = p.pseq();
        let r = f(p);
        if let Some(o) = self.observer.get().filter(|_| p.pseq() != pseq) {
            let mut events = Vec::new();
            p.read_since(pseq, &mut events);
            for e in events {
                o.presence(&ch.name, &e.who, e.join);
            }
        }
        p.trim_events(now_ms);
        self.meter
            .add(Kind::Presence, p.bytes() as i64 - bytes as i64);
        let info_now = p.info_bytes();
        if info_now >= info {
            self.info_bytes
                .fetch_add(info_now - info, Ordering::Relaxed);
        } else {
            self.info_bytes
                .fetch_sub(info - info_now, Ordering::Relaxed);
        }
        let (empty_now, due) = (p.is_empty(), p.events_due());
        if empty != empty_now {
            let mut present = self.present.lock();
            if empty_now {
                present.remove(&ch.name);
            } else {
                present.insert(ch.name.clone(), ch.clone());
            }
        }
        if let Some(ms) = due {
            self.schedule(ch, st, self.base + Duration::from_millis(ms));
        }
        Some(r)
    }

    /// Removes `client` from the channel's presence at once (a clean leave). Returns the shards
    /// to wake.
    pub fn leave_presence(&self, channel: &Arc<Channel>, client: &str) -> ShardMask {
        let now_ms = self.millis(Instant::now());
        let wake = {
            let mut st = channel.state.lock();
            let seq = st.top;
            let left = self
                .presence_op(channel, &mut st, now_ms, |p| p.leave(client, seq, now_ms))
                .unwrap_or(false);
            if left {
                Self::mark_dirty(channel, &st)
            } else {
                0
            }
        };
        self.enqueue_dirty(channel, wake);
        wake
    }

    /// Removes every presence member not seen for the presence timeout. Returns the shards to
    /// wake. Costs O(members of the channels that have members): run it every
    /// `--presence-sweep`.
    pub fn sweep_presence(&self, now: Instant) -> ShardMask {
        let now_ms = self.millis(now);
        let deadline = now_ms.saturating_sub(self.cfg.presence.timeout.as_millis() as u64);
        let channels: Vec<Arc<Channel>> = self.present.lock().values().cloned().collect();
        let mut all = 0;
        for ch in channels {
            let wake = {
                let mut st = ch.state.lock();
                let seq = st.top;
                let left = self
                    .presence_op(&ch, &mut st, now_ms, |p| p.sweep(deadline, seq, now_ms))
                    .is_some_and(|n| n > 0);
                if left {
                    Self::mark_dirty(&ch, &st)
                } else {
                    0
                }
            };
            self.enqueue_dirty(&ch, wake);
            all |= wake;
        }
        all
    }

    /// The members of `name` connected to this node (none when it has no presence or is
    /// unknown here): what a backplane advertises to the other nodes.
    pub fn presence_local(&self, name: &ChannelName) -> Vec<Identity> {
        self.with_existing(name, |_, st| {
            st.presence
                .as_ref()
                .map_or_else(Vec::new, |p| p.local_members())
        })
        .unwrap_or_default()
    }

    /// Adds (`Some(live)`) or removes (`None`) a member connected to another node, as the
    /// backplane reports it, in a channel this node has. Join and leave events follow the same
    /// per-user rules as local members. Returns the shards to wake.
    pub fn presence_remote(
        &self,
        name: &ChannelName,
        who: Identity,
        live: Option<Arc<Liveness>>,
        now: Instant,
    ) -> ShardMask {
        if !self.has_presence(name) {
            return 0;
        }
        let now_ms = self.millis(now);
        let r = self.with_existing(name, |ch, st| {
            let seq = st.top;
            let changed = self
                .presence_op(ch, st, now_ms, |p| match live {
                    Some(live) => p
                        .join_member(who, live, seq, usize::MAX, true, now_ms)
                        .unwrap_or(false),
                    None => p.leave(&who.client, seq, now_ms),
                })
                .unwrap_or(false);
            let wake = if changed { Self::mark_dirty(ch, st) } else { 0 };
            (wake, ch.clone())
        });
        let Some((wake, ch)) = r else {
            return 0;
        };
        self.enqueue_dirty(&ch, wake);
        wake
    }

    /// The client ids of the remote members of `name`.
    pub fn presence_remote_clients(&self, name: &ChannelName) -> Vec<Arc<str>> {
        self.with_existing(name, |_, st| {
            st.presence
                .as_ref()
                .map_or_else(Vec::new, |p| p.remote_clients())
        })
        .unwrap_or_default()
    }

    /// A page of the members of `name` (those after the client id `after`, at most `limit`,
    /// and past the first at most `max_bytes` of ids and info), or `None` when it has no
    /// presence. A channel that does not exist has no members (and is not created).
    pub fn presence(
        &self,
        name: &ChannelName,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> Option<PresenceSnapshot> {
        if !self.has_presence(name) {
            return None;
        }
        let empty = || PresenceSnapshot {
            seq: 0,
            members: Vec::new(),
            stats: PresenceStats {
                clients: 0,
                users: 0,
            },
            next: None,
        };
        self.with_existing(name, |_, st| {
            st.presence.as_ref().map(|p| {
                let (members, next) = p.members_page(after, limit, max_bytes);
                PresenceSnapshot {
                    seq: st.top,
                    members,
                    stats: p.stats(),
                    next,
                }
            })
        })
        .map_or_else(|| Some(empty()), |s| Some(s.unwrap_or_else(empty)))
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

    /// Appends a message that a remote sequencer (a backplane) numbered `seq` in `epoch`:
    /// appended when it is the next one of the local epoch, ignored when already there, a gap
    /// otherwise. `at` is when it was published, on this process's clock. Never refused: the
    /// message exists already, and local subscribers wait for it.
    #[allow(clippy::too_many_arguments)]
    pub fn ingest(
        &self,
        name: &ChannelName,
        epoch: Epoch,
        seq: u64,
        kind: DataKind,
        data: Bytes,
        at: Instant,
        now: Instant,
    ) -> IngestOutcome {
        let r = self.with_channel(name, now, false, |ch, st| {
            if st.epoch != epoch {
                return (IngestOutcome::OtherEpoch, None);
            }
            if seq <= st.top {
                return (IngestOutcome::Duplicate, None);
            }
            if seq != st.top + 1 {
                return (IngestOutcome::Gap { top: st.top }, None);
            }
            st.top = seq;
            st.last_active = now;
            st.recent = true;
            let cost = st.push(seq, at, kind, data.clone(), self.meter.frames());
            let freed = self.trim(ch, st, now);
            self.meter.add(Kind::History, cost as i64 - freed as i64);
            let wake = Self::mark_dirty(ch, st);
            (IngestOutcome::Appended(wake), Some(ch.clone()))
        });
        let Ok((outcome, ch)) = r else {
            return IngestOutcome::OtherEpoch;
        };
        if let (IngestOutcome::Appended(wake), Some(ch)) = (outcome, ch) {
            self.enqueue_dirty(&ch, wake);
        }
        outcome
    }

    /// Adopts a remote state: `epoch`, `top`, and the remote history `entries` (ascending; only
    /// those `<= top` are kept, and only a run that ends at `top` is usable for resume). The
    /// channel's generation moves on, so every hub closes the local subscribers it had in the
    /// channel (as slow consumers: they resume against the new state and get exactly what they
    /// missed, or `recovered:false`). Returns the shards to wake.
    pub fn reset(
        &self,
        name: &ChannelName,
        epoch: Epoch,
        top: u64,
        entries: Vec<RemoteEntry>,
        now: Instant,
    ) -> ShardMask {
        let r = self.with_channel(name, now, false, |ch, st| {
            st.epoch = epoch;
            st.top = top;
            let mut freed = 0;
            while let Some((_, cost)) = st.pop() {
                freed += cost;
            }
            st.evicted_through = 0;
            // Keep the contiguous run that ends at `top`, oldest first.
            let mut run: Vec<&RemoteEntry> = Vec::new();
            let mut want = top;
            for e in entries.iter().rev() {
                if want == 0 || e.seq < want {
                    break;
                }
                if e.seq == want {
                    run.push(e);
                    want -= 1;
                }
            }
            let mut added = 0;
            for e in run.into_iter().rev() {
                added += st.push(e.seq, e.at, e.kind, e.data.clone(), self.meter.frames());
            }
            freed += self.trim(ch, st, now);
            self.meter.add(Kind::History, added as i64 - freed as i64);
            st.generation += 1;
            st.last_active = now;
            (Self::mark_dirty(ch, st), ch.clone())
        });
        let Ok((wake, ch)) = r else {
            return 0;
        };
        self.enqueue_dirty(&ch, wake);
        wake
    }

    /// Reads history after `since`, at most `limit` (capped by the history size). A channel
    /// that does not exist has no history (and is not created).
    pub fn history(&self, name: &ChannelName, since: u64, limit: usize, now: Instant) -> History {
        let limit = limit.min(self.cfg.history_size);
        let read = self.with_existing(name, |_, st| {
            let position = Some(StreamPosition {
                epoch: st.epoch,
                seq: st.top,
            });
            match self.visible_since(st, since, now) {
                Ok(it) => History {
                    position,
                    publications: it.take(limit).cloned().collect(),
                    complete: true,
                },
                Err(_) => {
                    // Serve what is still visible after `since`.
                    let start = self.history_start(st, now);
                    let publications = st
                        .ring
                        .range(start..)
                        .filter(|p| p.seq > since)
                        .take(limit)
                        .cloned()
                        .collect();
                    History {
                        position,
                        publications,
                        complete: false,
                    }
                }
            }
        });
        read.unwrap_or(History {
            position: None,
            publications: Vec::new(),
            complete: since == 0,
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

    /// Periodic upkeep, with bounded work whatever the number of channels: examines the
    /// channels that are due (at most [`TICK_CHECKS`]): trims their rings and presence events,
    /// forgets those idle for the TTL with nothing left; then evicts history if memory is
    /// under pressure, and refreshes the pressure level. Call it every 100 ms or so.
    pub fn tick(&self, now: Instant) -> TickStats {
        let mut stats = TickStats::default();
        let due: Vec<Due> = {
            let mut q = self.expiry.lock();
            let mut due = Vec::new();
            while due.len() < TICK_CHECKS && q.peek().is_some_and(|d| d.at <= now) {
                if let Some(d) = q.pop() {
                    due.push(d);
                }
            }
            due
        };
        for d in due {
            stats.checked += 1;
            if self.examine(&d, now) {
                stats.expired += 1;
            }
        }
        let s = &self.stats;
        s.checked.fetch_add(stats.checked as u64, Ordering::Relaxed);
        s.checked_max
            .fetch_max(stats.checked as u64, Ordering::Relaxed);
        s.expired.fetch_add(stats.expired as u64, Ordering::Relaxed);
        if self.meter.recompute() != Pressure::Normal {
            stats.evicted = self.evict(now, TICK_CHECKS);
        }
        stats
    }

    /// Expiry of one channel; returns whether it was forgotten.
    fn examine(&self, d: &Due, now: Instant) -> bool {
        let ch = &d.ch;
        let mut st = ch.state.lock();
        if st.removed || st.next_check != Some(d.at) {
            return false; // A stale entry: the channel is gone or has a sooner one.
        }
        st.next_check = None;
        let mut freed = self.trim(ch, &mut st, now);
        let window = self.cfg.idempotency_window;
        if let Some(keys) = st.keys.as_mut() {
            freed += keys.prune(now, window);
            if keys.bytes() == 0 {
                st.keys = None;
            }
        }
        self.meter.add(Kind::History, -(freed as i64));
        // Presence bookkeeping alone trims the events that aged out.
        self.presence_op(ch, &mut st, self.millis(now), |_| ());
        let idle = now.saturating_duration_since(st.last_active) > self.cfg.history_ttl;
        // A channel with idempotency keys stays (with its epoch) until they leave the window.
        let nothing = st.ring.is_empty()
            && st.presence.as_ref().is_none_or(|p| p.is_idle())
            && st.keys.is_none();
        if st.interest == 0 && idle && nothing {
            st.removed = true;
            drop(st);
            self.forget(ch);
            return true;
        }
        if st.next_check.is_none() {
            let at = self.next_due(&st, now);
            self.schedule(ch, &mut st, at);
        }
        false
    }

    /// Evicts history, least recently used channels first (a channel published to or
    /// subscribed since it was last looked at gets a second chance), until memory is back under
    /// its target or `max` channels were examined. A channel with subscribers keeps its
    /// fan-out window. One evicting thread at a time; returns the channels evicted.
    pub fn evict(&self, now: Instant, max: usize) -> usize {
        let _one = self.evicting.lock();
        self.meter.recompute();
        let mut want = self.meter.excess();
        let (mut examined, mut evicted) = (0, 0);
        while want > 0 && examined < max {
            // Take a batch, then lock channels without holding the queue (publishers take a
            // channel lock, then the queue).
            let batch: Vec<Arc<Channel>> = {
                let mut q = self.lru.lock();
                let n = q.len().min(64).min(max - examined);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            let mut again = Vec::new();
            for ch in batch {
                examined += 1;
                let mut st = ch.state.lock();
                if st.removed || st.ring.is_empty() {
                    st.in_lru = false;
                    continue;
                }
                if st.recent || want == 0 {
                    st.recent = false;
                    again.push(ch.clone());
                    continue;
                }
                let keep_window = st.interest != 0;
                let mut freed = 0;
                while let Some(front) = st.ring.front() {
                    let in_window = st.ring.len() <= FANOUT_MIN
                        && st.bytes <= FANOUT_MAX_BYTES
                        && now.saturating_duration_since(front.at) <= FANOUT_MIN_AGE;
                    if keep_window && in_window {
                        break;
                    }
                    if let Some((seq, cost)) = st.pop() {
                        st.evicted_through = seq;
                        freed += cost;
                    }
                }
                self.meter.add(Kind::History, -(freed as i64));
                if freed > 0 {
                    evicted += 1;
                    want = want.saturating_sub(freed);
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .evicted_bytes
                        .fetch_add(freed as u64, Ordering::Relaxed);
                }
                if st.ring.is_empty() {
                    st.in_lru = false;
                } else {
                    again.push(ch.clone());
                }
            }
            self.lru.lock().extend(again);
        }
        self.meter.recompute();
        evicted
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

    /// Appends the publications with `seq > cursor` to `out` and returns whether some were
    /// already gone from the ring (the reader fell too far behind).
    pub fn read_since(&self, cursor: u64, out: &mut Vec<Arc<Publication>>) -> bool {
        Self::ring_since(&self.state.lock(), cursor, usize::MAX, out)
    }

    fn ring_since(
        st: &ChannelState,
        cursor: u64,
        max: usize,
        out: &mut Vec<Arc<Publication>>,
    ) -> bool {
        let Some(first) = st.ring.front().map(|p| p.seq) else {
            return cursor < st.top;
        };
        let lost = cursor + 1 < first;
        let start = (cursor + 1).saturating_sub(first) as usize;
        out.extend(st.ring.range(start.min(st.ring.len())..).take(max).cloned());
        lost
    }

    /// Appends up to `max` publications after `cursor` to `out`, for a reader positioned in
    /// `generation` (a subscriber's paged replay). Returns false, reading nothing, when they no
    /// longer connect: some after `cursor` are gone from the ring, or the channel was reset.
    pub fn read_page(
        &self,
        cursor: u64,
        generation: u64,
        max: usize,
        out: &mut Vec<Arc<Publication>>,
    ) -> bool {
        let st = self.state.lock();
        let first = st.ring.front().map_or(st.top + 1, |p| p.seq);
        if st.generation != generation || cursor + 1 < first {
            return false;
        }
        Self::ring_since(&st, cursor, max, out);
        true
    }

    /// [`Channel::read_since`] for messages after `cursor` and presence events after `pcursor`,
    /// under one lock so that the two lists are consistent with each other.
    pub fn read_all_since(
        &self,
        cursor: u64,
        pcursor: u64,
        pubs: &mut Vec<Arc<Publication>>,
        events: &mut Vec<Arc<PresenceEvent>>,
    ) -> (bool, bool) {
        let (lost, plost, _) = self.read_all_since_in(cursor, pcursor, None, pubs, events);
        (lost, plost)
    }

    /// [`Channel::read_all_since`] for a reader positioned in `generation`: when the channel
    /// was [`Engine::reset`] since, nothing is read and the current generation and top are
    /// returned (`Err`), so the reader can close its subscribers and start over from there.
    pub fn read_all_since_in(
        &self,
        cursor: u64,
        pcursor: u64,
        generation: Option<u64>,
        pubs: &mut Vec<Arc<Publication>>,
        events: &mut Vec<Arc<PresenceEvent>>,
    ) -> (bool, bool, Result<(), (u64, u64)>) {
        let st = self.state.lock();
        if generation.is_some_and(|g| g != st.generation) {
            return (false, false, Err((st.generation, st.top)));
        }
        let lost = Self::ring_since(&st, cursor, usize::MAX, pubs);
        let plost = st
            .presence
            .as_ref()
            .is_some_and(|p| p.read_since(pcursor, events));
        (lost, plost, Ok(()))
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

/// splitmix64 of `seed + n` (for ids and epochs outside the engine).
pub fn mix_public(seed: u64, n: u64) -> u64 {
    mix(seed, n)
}

/// splitmix64 of `seed + n`.
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The shard indexes set in `mask`.
pub fn mask_iter(mut mask: ShardMask) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn engine(history: usize, shards: usize) -> Engine {
        Engine::new(EngineConfig {
            shards,
            history_size: history,
            history_ttl: Duration::from_secs(300),
            seed: 7,
            ..Default::default()
        })
    }

    /// What a subscriber's replay would page out of the ring: the seqs after its position.
    fn replay(s: &Subscribed) -> Vec<u64> {
        let mut out = Vec::new();
        if let Some(after) = s.replay_after {
            assert!(s
                .channel
                .read_page(after, s.generation, usize::MAX, &mut out));
        }
        out.iter()
            .map(|p| p.seq)
            .filter(|&q| q <= s.position.seq)
            .collect()
    }

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    #[test]
    fn seqs_start_at_one_and_increase() {
        let e = engine(10, 1);
        let now = Instant::now();
        let a = e
            .publish(&ch("a"), DataKind::Json, Bytes::from_static(b"1"), now)
            .unwrap();
        let b = e
            .publish(&ch("a"), DataKind::Json, Bytes::from_static(b"2"), now)
            .unwrap();
        let other = e
            .publish(&ch("b"), DataKind::Json, Bytes::from_static(b"3"), now)
            .unwrap();
        assert_eq!((a.seq, b.seq, other.seq), (1, 2, 1));
        assert_eq!(a.epoch, b.epoch);
        assert_ne!(a.epoch, other.epoch);
        assert_eq!(a.wake, 0, "no subscriber, nobody to wake");
    }

    #[test]
    fn publish_wakes_each_subscribed_shard_once_until_it_pulls() {
        let e = engine(10, 3);
        let now = Instant::now();
        let s0 = e.subscribe(0, &ch("a"), None, None, now).unwrap();
        let _s2 = e.subscribe(2, &ch("a"), None, None, now).unwrap();
        assert_eq!(
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
                .unwrap()
                .wake,
            0b101
        );
        assert_eq!(
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
                .unwrap()
                .wake,
            0,
            "already dirty"
        );
        let mut dirty = Vec::new();
        e.take_dirty(0, &mut dirty);
        assert_eq!(dirty.len(), 1);
        let mut pubs = Vec::new();
        assert!(!dirty[0].read_since(s0.position.seq, &mut pubs));
        assert_eq!(pubs.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
                .unwrap()
                .wake,
            0b001
        );
    }

    #[test]
    fn resume_recovers_exactly_the_missed_messages() {
        let e = engine(5, 1);
        let now = Instant::now();
        let first = e
            .publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .unwrap();
        for _ in 0..3 {
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
                .unwrap();
        }
        let pos = StreamPosition {
            epoch: first.epoch,
            seq: 1,
        };
        let s = e.subscribe(0, &ch("a"), Some(pos), None, now).unwrap();
        assert!(s.recovered);
        assert_eq!(replay(&s), [2, 3, 4]);
        assert_eq!(s.position.seq, 4);

        let at_top = StreamPosition {
            epoch: first.epoch,
            seq: 4,
        };
        let s = e.subscribe(0, &ch("a"), Some(at_top), None, now).unwrap();
        assert!(s.recovered && s.replay_after.is_none());
    }

    #[test]
    fn resume_fails_whole_on_gap_epoch_or_future() {
        let e = engine(5, 1);
        let now = Instant::now();
        let p = e
            .publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .unwrap();
        for _ in 0..9 {
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
                .unwrap();
        }
        for (pos, reason) in [
            (
                StreamPosition {
                    epoch: p.epoch,
                    seq: 4,
                },
                GapReason::HistoryExpired,
            ),
            (
                StreamPosition {
                    epoch: p.epoch,
                    seq: 11,
                },
                GapReason::HistoryExpired,
            ),
            (
                StreamPosition {
                    epoch: Epoch(1),
                    seq: 9,
                },
                GapReason::EpochChanged,
            ),
        ] {
            let s = e.subscribe(0, &ch("a"), Some(pos), None, now).unwrap();
            assert!(!s.recovered);
            assert!(s.replay_after.is_none());
            assert_eq!(s.gap, Some(reason));
        }
        // The oldest message still in the window is seq 6, so since=5 recovers.
        let s = e
            .subscribe(
                0,
                &ch("a"),
                Some(StreamPosition {
                    epoch: p.epoch,
                    seq: 5,
                }),
                None,
                now,
            )
            .unwrap();
        assert!(s.recovered);
        assert_eq!(replay(&s).len(), 5);
    }

    #[test]
    fn history_ttl_hides_old_messages() {
        let e = Engine::new(EngineConfig {
            history_size: 100,
            history_ttl: Duration::from_secs(10),
            seed: 1,
            ..Default::default()
        });
        let t0 = Instant::now();
        e.publish(&ch("a"), DataKind::Json, Bytes::new(), t0)
            .unwrap();
        e.publish(
            &ch("a"),
            DataKind::Json,
            Bytes::new(),
            t0 + Duration::from_secs(8),
        )
        .unwrap();
        let h = e.history(&ch("a"), 0, 100, t0 + Duration::from_secs(12));
        assert!(!h.complete);
        assert_eq!(
            h.publications.iter().map(|p| p.seq).collect::<Vec<_>>(),
            [2]
        );
        let h = e.history(&ch("a"), 1, 100, t0 + Duration::from_secs(12));
        assert!(h.complete);
    }

    #[test]
    fn expiry_forgets_idle_channels_and_gives_a_new_epoch() {
        let e = Engine::new(EngineConfig {
            history_size: 100,
            history_ttl: Duration::from_secs(10),
            seed: 1,
            ..Default::default()
        });
        let t0 = Instant::now();
        let p = e
            .publish(&ch("a"), DataKind::Json, Bytes::new(), t0)
            .unwrap();
        let sub = e.subscribe(0, &ch("b"), None, None, t0).unwrap();
        assert_eq!(e.tick(t0 + Duration::from_secs(5)).expired, 0);
        let t = e.tick(t0 + Duration::from_secs(20));
        assert_eq!((t.checked, t.expired), (2, 1), "b is subscribed");
        assert_eq!(e.channel_count(), 1);
        let again = e
            .publish(
                &ch("a"),
                DataKind::Json,
                Bytes::new(),
                t0 + Duration::from_secs(21),
            )
            .unwrap();
        assert_eq!(again.seq, 1);
        assert_ne!(again.epoch, p.epoch);
        e.unsubscribe(0, &sub.channel, t0);
    }

    #[test]
    fn a_reader_that_falls_behind_the_ring_sees_lost() {
        let e = engine(1, 1);
        let now = Instant::now();
        let s = e.subscribe(0, &ch("a"), None, None, now).unwrap();
        for _ in 0..(FANOUT_MIN + 10) {
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
                .unwrap();
        }
        let mut out = Vec::new();
        assert!(s.channel.read_since(0, &mut out));
        assert_eq!(out.len(), FANOUT_MIN);
        out.clear();
        assert!(!s.channel.read_since(20, &mut out));
    }

    #[test]
    fn ingest_appends_the_next_ignores_duplicates_and_reports_gaps() {
        let e = engine(10, 2);
        let now = Instant::now();
        let epoch = Epoch(0x1234 | 1 << 60);
        e.reset(&ch("a"), epoch, 0, Vec::new(), now);
        let s = e.subscribe(1, &ch("a"), None, None, now).unwrap();
        assert_eq!(e.local_subscribers(&ch("a")), 1);
        assert_eq!(s.position, StreamPosition { epoch, seq: 0 });
        let data = || Bytes::from_static(b"x");
        assert_eq!(
            e.ingest(&ch("a"), epoch, 1, DataKind::Json, data(), now, now),
            IngestOutcome::Appended(0b10)
        );
        assert_eq!(
            e.ingest(&ch("a"), epoch, 1, DataKind::Json, data(), now, now),
            IngestOutcome::Duplicate
        );
        assert_eq!(
            e.ingest(&ch("a"), epoch, 3, DataKind::Json, data(), now, now),
            IngestOutcome::Gap { top: 1 }
        );
        assert_eq!(
            e.ingest(&ch("a"), Epoch(9), 2, DataKind::Json, data(), now, now),
            IngestOutcome::OtherEpoch
        );
        assert_eq!(
            e.ingest(&ch("a"), epoch, 2, DataKind::Json, data(), now, now),
            IngestOutcome::Appended(0),
            "already dirty"
        );
        let mut out = Vec::new();
        assert!(!s.channel.read_since(0, &mut out));
        assert_eq!(out.iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 2]);
        // Resume against ingested history works like against published history.
        let r = e
            .subscribe(
                0,
                &ch("a"),
                Some(StreamPosition { epoch, seq: 1 }),
                None,
                now,
            )
            .unwrap();
        assert!(r.recovered);
        assert_eq!(e.local_subscribers(&ch("a")), 2);
        assert_eq!(replay(&r), [2]);
        assert!(!e.unsubscribe(0, &r.channel, now));
        assert!(
            e.unsubscribe(1, &s.channel, now),
            "the last one on this node"
        );
        assert_eq!(e.local_subscribers(&ch("a")), 0);
    }

    #[test]
    fn reset_adopts_the_remote_state_and_moves_the_generation() {
        let e = engine(5, 1);
        let now = Instant::now();
        let p = e
            .publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .unwrap();
        let s = e.subscribe(0, &ch("a"), None, None, now).unwrap();
        let remote = Epoch(0xABC | 1 << 60);
        let entry = |seq| RemoteEntry {
            seq,
            at: now,
            kind: DataKind::Json,
            data: Bytes::from(seq.to_string()),
        };
        // Entries that do not end at top, and ones beyond it, are not kept as history.
        let wake = e.reset(
            &ch("a"),
            remote,
            7,
            vec![entry(3), entry(5), entry(6), entry(7), entry(8)],
            now,
        );
        assert_eq!(
            wake, 0b1,
            "the subscribed shard pumps, sees the new generation"
        );
        assert_ne!(remote, p.epoch);
        assert_eq!(
            e.position(&ch("a")),
            Some(StreamPosition {
                epoch: remote,
                seq: 7
            })
        );
        let mut pubs = Vec::new();
        let (_, _, current) =
            s.channel
                .read_all_since_in(0, 0, Some(s.generation), &mut pubs, &mut Vec::new());
        assert_eq!(current, Err((s.generation + 1, 7)));
        let r = e
            .subscribe(
                0,
                &ch("a"),
                Some(StreamPosition {
                    epoch: remote,
                    seq: 4,
                }),
                None,
                now,
            )
            .unwrap();
        assert!(r.recovered);
        assert_eq!(replay(&r), [5, 6, 7]);
        let r = e
            .subscribe(
                0,
                &ch("a"),
                Some(StreamPosition {
                    epoch: remote,
                    seq: 3,
                }),
                None,
                now,
            )
            .unwrap();
        assert_eq!(r.gap, Some(GapReason::HistoryExpired), "4 is not there");
        let old = e
            .subscribe(
                0,
                &ch("a"),
                Some(StreamPosition {
                    epoch: p.epoch,
                    seq: 1,
                }),
                None,
                now,
            )
            .unwrap();
        assert_eq!(old.gap, Some(GapReason::EpochChanged));
    }

    #[test]
    fn idempotency_keys_are_counted_and_keep_their_channel_for_the_window() {
        use idempotency::{PublishConditions, KEY_OVERHEAD};
        let e = Engine::new(EngineConfig {
            history_ttl: Duration::from_secs(1),
            idempotency_window: Duration::from_secs(10),
            ..Default::default()
        });
        let t0 = Instant::now();
        let a = ch("a");
        let cond = PublishConditions {
            idempotency_key: Some("key".into()),
            expected_seq: None,
        };
        let data = || Bytes::from_static(b"1");
        let (p, dup) = e
            .publish_with(&a, DataKind::Json, data(), &cond, t0)
            .unwrap();
        assert!(!dup);
        let with_key = e.meter().bytes(Kind::History);
        e.publish(&ch("b"), DataKind::Json, data(), t0).unwrap();
        let without = e.meter().bytes(Kind::History) - with_key;
        assert_eq!(with_key - without, KEY_OVERHEAD + 3);
        // Past the TTL the message is gone, not the key, nor the channel and its epoch.
        for s in 2..=5 {
            e.tick(t0 + Duration::from_secs(s));
        }
        let (again, dup) = e
            .publish_with(
                &a,
                DataKind::Json,
                data(),
                &cond,
                t0 + Duration::from_secs(5),
            )
            .unwrap();
        assert!(dup);
        assert_eq!((again.epoch, again.seq), (p.epoch, p.seq));
        // Past the window the key goes, and then the idle channel with it.
        for s in 11..=14 {
            e.tick(t0 + Duration::from_secs(s));
        }
        assert_eq!(e.meter().bytes(Kind::History), 0);
        assert_eq!(e.position(&a), None);
    }

    fn big(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn history_keeps_its_count_and_bytes_and_the_fanout_window_only_for_its_age() {
        let e = Engine::new(EngineConfig {
            history_size: 10,
            history_max_bytes: 100 << 10,
            ..Default::default()
        });
        let t0 = Instant::now();
        let a = ch("a");
        // 200 × 60 KB in one burst: the fan-out window keeps what fits 4 MiB.
        for _ in 0..200 {
            e.publish(&a, DataKind::Json, big(60_000), t0).unwrap();
        }
        let held = e.meter().bytes(Kind::History);
        assert!(held <= FANOUT_MAX_BYTES, "{held}");
        assert!(held > FANOUT_MAX_BYTES / 2, "{held}");
        // History itself: 100 KiB hold one 60 KB message (10 would fit by count).
        let h = e.history(&a, 0, 100, t0);
        assert_eq!(h.publications.len(), 1);
        assert!(!h.complete);
        // Once the window closes, only history remains, without another publish.
        let later = t0 + FANOUT_MIN_AGE + Duration::from_secs(1);
        e.tick(later);
        assert_eq!(e.meter().bytes(Kind::History), 60_000 + ENTRY_OVERHEAD);
        // Small messages: the count bounds.
        let b = ch("b");
        for _ in 0..50 {
            e.publish(&b, DataKind::Json, big(10), later).unwrap();
        }
        e.tick(later + FANOUT_MIN_AGE + Duration::from_secs(1));
        assert_eq!(e.history(&b, 0, 100, later).publications.len(), 10);
    }

    #[test]
    fn reads_never_create_channels() {
        let e = Engine::new(EngineConfig {
            presence: presence::PresenceConfig {
                patterns: vec!["*".into()],
                ..Default::default()
            },
            ..Default::default()
        });
        let now = Instant::now();
        for i in 0..100 {
            let name = ch(&format!("ghost:{i}"));
            let h = e.history(&name, 0, 10, now);
            assert!(h.position.is_none() && h.publications.is_empty() && h.complete);
            assert!(!e.history(&name, 5, 10, now).complete, "since 5: missed");
            let p = e.presence(&name, None, 10, 1000).unwrap();
            assert!(p.members.is_empty() && p.next.is_none());
            assert_eq!(e.position(&name), None);
            assert_eq!(e.local_subscribers(&name), 0);
            assert!(e.presence_local(&name).is_empty());
            assert_eq!(
                e.presence_remote(&name, presence_who("c", None), None, now),
                0
            );
        }
        assert_eq!(e.channel_count(), 0);
        assert!(e.channels().is_empty());
        assert_eq!(e.meter().total(), 0);
    }

    fn presence_who(client: &str, info: Option<usize>) -> Identity {
        Identity {
            client: client.into(),
            user: client.into(),
            info: info.map(big),
        }
    }

    #[test]
    fn max_channels_refuses_a_new_channel_but_not_an_existing_one() {
        let e = Engine::new(EngineConfig {
            max_channels: 2,
            ..Default::default()
        });
        let now = Instant::now();
        e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .unwrap();
        e.subscribe(0, &ch("b"), None, None, now).unwrap();
        assert_eq!(
            e.publish(&ch("c"), DataKind::Json, Bytes::new(), now)
                .unwrap_err(),
            Overloaded::Channels
        );
        assert!(matches!(
            e.subscribe(0, &ch("c"), None, None, now),
            Err(SubscribeError::Overloaded(Overloaded::Channels))
        ));
        assert!(e
            .publish(&ch("b"), DataKind::Json, Bytes::new(), now)
            .is_ok());
        assert_eq!(e.admit(&ch("a"), now), Ok(()));
        assert_eq!(e.admit(&ch("c"), now), Err(Overloaded::Channels));
        assert_eq!(e.channel_count(), 2);
    }

    #[test]
    fn expiry_examines_a_bounded_number_of_channels_per_tick() {
        let e = Engine::new(EngineConfig {
            history_ttl: Duration::from_secs(1),
            ..Default::default()
        });
        let t0 = Instant::now();
        let n = 3 * TICK_CHECKS + 100;
        for i in 0..n {
            e.publish(&ch(&format!("c{i}")), DataKind::Json, big(10), t0)
                .unwrap();
        }
        assert_eq!(e.channel_count(), n);
        // Past the TTL and the fan-out window.
        let mut t = t0 + FANOUT_MIN_AGE + Duration::from_secs(1);
        let mut ticks = 0;
        while e.channel_count() > 0 {
            let s = e.tick(t);
            assert!(s.checked <= TICK_CHECKS, "{s:?}");
            ticks += 1;
            assert!(ticks < 10, "expiry stalled at {}", e.channel_count());
            t += Duration::from_millis(100);
        }
        assert_eq!(
            ticks, 4,
            "all due at once: four ticks of at most {TICK_CHECKS}"
        );
        assert_eq!(
            e.meter().total(),
            0,
            "forgotten channels give back everything"
        );
        assert_eq!(e.stats().expired.load(Ordering::Relaxed), n as u64);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_history_first_and_resume_says_evicted() {
        let e = Engine::new(EngineConfig {
            max_memory: 16 << 20,
            ..Default::default()
        });
        let t0 = Instant::now();
        let mut epochs = Vec::new();
        // 12 channels × 1 MB: 75 % of the budget, no pressure yet.
        for i in 0..12 {
            let p = e
                .publish(&ch(&format!("h{i}")), DataKind::Json, big(1_000_000), t0)
                .unwrap();
            epochs.push(p.epoch);
        }
        assert_eq!(e.meter().recompute(), Pressure::Normal);
        // h0 is used again: it is not the least recently used any more.
        e.publish(&ch("h0"), DataKind::Json, big(10), t0).unwrap();
        for i in 12..16 {
            e.publish(&ch(&format!("h{i}")), DataKind::Json, big(1_000_000), t0)
                .unwrap();
        }
        let s = e.tick(t0 + Duration::from_millis(100));
        assert!(s.evicted > 0);
        assert!(e.meter().total() <= (16 << 20) * 3 / 4 + (1 << 20));
        assert_eq!(e.meter().recompute(), Pressure::Normal);
        let resume = |i: usize| {
            e.subscribe(
                0,
                &ch(&format!("h{i}")),
                Some(StreamPosition {
                    epoch: epochs[i],
                    seq: 0,
                }),
                None,
                t0,
            )
            .unwrap()
        };
        let s = resume(1);
        assert_eq!((s.recovered, s.gap), (false, Some(GapReason::Evicted)));
        let s = resume(0);
        assert!(s.recovered, "h0 had its second chance");
        assert!(e.stats().evictions.load(Ordering::Relaxed) >= 4);
    }

    #[test]
    fn over_the_budget_publishes_and_subscribes_are_refused_until_memory_returns() {
        let e = Engine::new(EngineConfig {
            max_memory: 16 << 20,
            ..Default::default()
        });
        let now = Instant::now();
        // What eviction cannot free: outboxes (reported by the shards).
        e.meter().set_shard(0, Kind::Outbox, 17 << 20);
        assert!(e.overloaded());
        assert_eq!(
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now),
            Err(Overloaded::Memory)
        );
        assert!(matches!(
            e.subscribe(0, &ch("a"), None, None, now),
            Err(SubscribeError::Overloaded(Overloaded::Memory))
        ));
        e.meter()
            .set_shard(0, Kind::Outbox, (15 << 20) + (512 << 10));
        e.tick(now);
        assert!(e.overloaded(), "still over 95 %");
        e.meter().set_shard(0, Kind::Outbox, 1 << 20);
        e.tick(now);
        assert!(!e.overloaded());
        assert!(e
            .publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .is_ok());
    }

    #[test]
    fn the_presence_info_budget_refuses_info_past_it_and_comes_back() {
        let e = Engine::new(EngineConfig {
            presence: presence::PresenceConfig {
                patterns: vec!["p:*".into()],
                info_budget: 10_000,
                ..Default::default()
            },
            ..Default::default()
        });
        let now = Instant::now();
        let join = |c: &str, info| {
            Some(Join {
                who: presence_who(c, info),
                live: Arc::new(Liveness::default()),
            })
        };
        let a = e
            .subscribe(0, &ch("p:1"), None, join("a", Some(4000)), now)
            .unwrap();
        e.subscribe(0, &ch("p:2"), None, join("b", Some(4000)), now)
            .unwrap();
        assert!(matches!(
            e.subscribe(0, &ch("p:1"), None, join("c", Some(4000)), now),
            Err(SubscribeError::Presence(PresenceError::InfoBudget))
        ));
        e.subscribe(0, &ch("p:1"), None, join("d", None), now)
            .unwrap();
        assert_eq!(e.presence_info_bytes(), 8000);
        e.leave_presence(&a.channel, "a");
        assert_eq!(e.presence_info_bytes(), 4000);
        e.subscribe(0, &ch("p:1"), None, join("c", Some(4000)), now)
            .unwrap();
    }

    #[test]
    fn presence_memory_returns_once_members_leave_and_their_events_age_out() {
        let e = Engine::new(EngineConfig {
            history_ttl: Duration::from_secs(1),
            presence: presence::PresenceConfig {
                patterns: vec!["p:*".into()],
                ..Default::default()
            },
            ..Default::default()
        });
        let t0 = Instant::now();
        let mut subs = Vec::new();
        for i in 0..50 {
            let s = e
                .subscribe(
                    0,
                    &ch("p:room"),
                    None,
                    Some(Join {
                        who: presence_who(&format!("c{i}"), Some(4096)),
                        live: Arc::new(Liveness::default()),
                    }),
                    t0,
                )
                .unwrap();
            subs.push(s);
        }
        assert!(e.meter().bytes(Kind::Presence) > 2 * 50 * 4096);
        for (i, s) in subs.iter().enumerate() {
            e.leave_presence(&s.channel, &format!("c{i}"));
            e.unsubscribe(0, &s.channel, t0);
        }
        assert!(e.meter().bytes(Kind::Presence) > 0, "the leave events");
        // The events age out, then the idle channel is forgotten: everything comes back.
        let mut t = Instant::now();
        for _ in 0..100 {
            t += Duration::from_millis(200);
            e.tick(t);
        }
        assert_eq!(e.meter().bytes(Kind::Presence), 0);
        assert_eq!(e.channel_count(), 0);
        assert_eq!(e.meter().total(), 0);
    }

    #[test]
    fn channels_come_in_pages_in_name_order() {
        let e = engine(10, 1);
        let now = Instant::now();
        for i in (0..250).rev() {
            e.publish(&ch(&format!("c{i:03}")), DataKind::Json, Bytes::new(), now)
                .unwrap();
        }
        let mut after = None;
        let mut all = Vec::new();
        loop {
            let page = e.channels_page(after.as_ref(), 100);
            assert!(page.channels.len() <= 100);
            all.extend(page.channels.into_iter().map(|c| c.name));
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let want: Vec<ChannelName> = (0..250).map(|i| ch(&format!("c{i:03}"))).collect();
        assert_eq!(all, want);
    }

    #[test]
    fn frames_are_encoded_once() {
        let p = Publication::new(1, Instant::now(), DataKind::Json, Bytes::from_static(b"x"));
        let mut calls = 0;
        for _ in 0..3 {
            let f = p.frame(0, |_| {
                calls += 1;
                Bytes::from_static(b"frame")
            });
            assert_eq!(&f[..], b"frame");
        }
        assert_eq!(calls, 1);
    }
}
