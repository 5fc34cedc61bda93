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

pub mod hub;
pub mod outbox;
pub mod presence;

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::types::{ChannelName, DataKind, Epoch, StreamPosition};
use presence::{Identity, Liveness, Presence, PresenceError, PresenceEvent, PresenceStats};

/// Most shards an engine serves (the dirty mask is one `u64`).
pub const MAX_SHARDS: usize = 64;

/// How many encodings of one publication can be cached (see [`Publication::frame`]).
pub const FRAME_SLOTS: usize = 4;

/// The ring always keeps at least this many publications so that shards can catch up after a
/// burst, even with a small (or zero) history size.
const FANOUT_MIN: usize = 1024;

/// Publications younger than this are never trimmed by age, for the same reason.
const FANOUT_MIN_AGE: Duration = Duration::from_secs(5);

/// Bit set of shard indexes.
pub type ShardMask = u64;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Number of shards (1..=[`MAX_SHARDS`]).
    pub shards: usize,
    /// Messages kept per channel for resume and the history API.
    pub history_size: usize,
    /// How long a message stays in history.
    pub history_ttl: Duration,
    /// Seeds epoch generation; give each process a different one.
    pub seed: u64,
    /// Presence settings.
    pub presence: presence::PresenceConfig,
    /// Slow-consumer policy by channel pattern: the first match wins; no match is
    /// [`SlowPolicy::Disconnect`].
    pub slow_consumer: Vec<(String, SlowPolicy)>,
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
    frames: [OnceLock<Bytes>; FRAME_SLOTS],
}

impl Publication {
    /// Creates a publication; exposed for benches and tests.
    pub fn new(seq: u64, at: Instant, kind: DataKind, data: Bytes) -> Self {
        Self {
            seq,
            at,
            kind,
            data,
            frames: Default::default(),
        }
    }

    /// The encoded frame for `slot`, built by `encode` the first time any shard asks and shared
    /// by everyone after: a message is encoded once per encoding, never per subscriber.
    pub fn frame(&self, slot: usize, encode: impl FnOnce(&Publication) -> Bytes) -> Bytes {
        self.frames[slot % FRAME_SLOTS]
            .get_or_init(|| encode(self))
            .clone()
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
    /// Subscribers per shard.
    shard_subs: Box<[u32]>,
    /// Shards with at least one subscriber.
    interest: ShardMask,
    last_active: Instant,
    /// Set when the sweep dropped the channel from the table; whoever holds a stale `Arc`
    /// looks the name up again.
    removed: bool,
    /// Present on channels that match a presence pattern.
    presence: Option<Box<Presence>>,
    /// Bumped by [`Engine::reset`]: hubs whose subscribers were positioned in an older
    /// generation close them for resume (their positions no longer connect).
    generation: u64,
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

/// How a subscribe went.
pub struct Subscribed {
    /// The channel, for the hub and for the unsubscribe.
    pub channel: Arc<Channel>,
    /// The channel's current position: live messages start after it.
    pub position: StreamPosition,
    /// Whether the requested resume position was recovered.
    pub recovered: bool,
    /// On recovery, the missed publications in order; otherwise empty.
    pub replay: Vec<Arc<Publication>>,
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

/// A presence listing.
pub struct PresenceSnapshot {
    /// The channel's message seq.
    pub seq: u64,
    /// The members.
    pub members: Vec<Identity>,
    /// Counts.
    pub stats: PresenceStats,
}

/// Why a resume position could not be recovered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// The channel's history started afresh since.
    EpochChanged,
    /// The history no longer holds the message after the position (or the position is ahead).
    HistoryExpired,
}

impl GapReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::EpochChanged => "epoch_changed",
            GapReason::HistoryExpired => "history_expired",
        }
    }
}

/// A history read.
pub struct History {
    /// The channel's current position.
    pub position: StreamPosition,
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
            cfg,
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
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

    fn part(&self, name: &ChannelName) -> &RwLock<Table> {
        &self.table[(self.hasher.hash_one(name) as usize) % TABLE_PARTS]
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

    fn get_or_create(&self, name: &ChannelName, now: Instant) -> Arc<Channel> {
        let part = self.part(name);
        if let Some(ch) = part.read().get(name) {
            return ch.clone();
        }
        part.write()
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(Channel {
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
                        shard_subs: vec![0; self.cfg.shards].into_boxed_slice(),
                        interest: 0,
                        last_active: now,
                        removed: false,
                        presence: self.has_presence(name).then(Box::default),
                        generation: 0,
                    }),
                })
            })
            .clone()
    }

    /// Runs `f` under the lock of the live channel `name`, creating it if needed.
    fn with_channel<R>(
        &self,
        name: &ChannelName,
        now: Instant,
        mut f: impl FnMut(&Arc<Channel>, &mut ChannelState) -> R,
    ) -> R {
        loop {
            let ch = self.get_or_create(name, now);
            let mut st = ch.state.lock();
            if st.removed {
                continue; // Lost a race with the sweep: look the name up again.
            }
            return f(&ch, &mut st);
        }
    }

    /// Sequences one message: gives it the next seq, appends it to history and returns the
    /// shards to wake (whose dirty lists now hold the channel).
    pub fn publish(
        &self,
        name: &ChannelName,
        kind: DataKind,
        data: Bytes,
        now: Instant,
    ) -> Published {
        let (published, ch) = self.with_channel(name, now, |ch, st| {
            st.top += 1;
            st.last_active = now;
            st.ring
                .push_back(Arc::new(Publication::new(st.top, now, kind, data.clone())));
            self.trim(st, now);
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
        });
        self.enqueue_dirty(&ch, published.wake);
        published
    }

    fn trim(&self, st: &mut ChannelState, now: Instant) {
        let keep = self.cfg.history_size.max(FANOUT_MIN);
        while st.ring.len() > keep {
            st.ring.pop_front();
        }
        let ttl = self.cfg.history_ttl.max(FANOUT_MIN_AGE);
        while st
            .ring
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.at) > ttl)
        {
            st.ring.pop_front();
        }
    }

    /// The publications after `since` that history (size and TTL) still serves, or `None` when
    /// `since + 1` is no longer there.
    fn visible_since<'s>(
        &self,
        st: &'s ChannelState,
        since: u64,
        now: Instant,
    ) -> Option<std::collections::vec_deque::Iter<'s, Arc<Publication>>> {
        if since > st.top {
            return None;
        }
        if since == st.top {
            return Some(st.ring.range(0..0));
        }
        let oldest_by_size = st
            .top
            .saturating_sub(self.cfg.history_size as u64)
            .saturating_add(1);
        let first = st.ring.front()?.seq;
        if since + 1 < first || since + 1 < oldest_by_size {
            return None;
        }
        let start = (since + 1 - first) as usize;
        let ttl = self.cfg.history_ttl;
        if st
            .ring
            .get(start)
            .is_none_or(|p| now.saturating_duration_since(p.at) > ttl)
        {
            return None;
        }
        Some(st.ring.range(start..))
    }

    /// Subscribes one subscriber of `shard` to `name`, resuming from `resume` when given, and
    /// adds it to the channel's presence when the channel has presence and `join` is given.
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
    ) -> Result<Subscribed, PresenceError> {
        let mut join = join;
        let (s, ch) = self.with_channel(name, now, |ch, st| {
            let shard = shard % self.cfg.shards;
            let pseq = st.presence.as_ref().map_or(0, |p| p.pseq());
            let top = st.top;
            let joined = match (st.presence.as_mut(), join.take()) {
                (Some(p), Some(j)) => p.join(j.who, j.live, top, self.cfg.presence.max_members)?,
                _ => false,
            };
            st.shard_subs[shard] += 1;
            st.interest |= 1 << shard;
            // After the interest update, so that this shard pulls its own join event too.
            let wake = if joined { Self::mark_dirty(ch, st) } else { 0 };
            st.last_active = now;
            let position = StreamPosition {
                epoch: st.epoch,
                seq: st.top,
            };
            let (recovered, replay, gap) = match resume {
                None => (false, Vec::new(), None),
                Some(p) if p.epoch != st.epoch => {
                    (false, Vec::new(), Some(GapReason::EpochChanged))
                }
                Some(p) => match self.visible_since(st, p.seq, now) {
                    Some(it) => (true, it.cloned().collect(), None),
                    None => (false, Vec::new(), Some(GapReason::HistoryExpired)),
                },
            };
            Ok((
                Subscribed {
                    channel: ch.clone(),
                    position,
                    recovered,
                    replay,
                    gap,
                    pseq,
                    presence: st.presence.is_some(),
                    wake,
                    generation: st.generation,
                },
                ch.clone(),
            ))
        })?;
        self.enqueue_dirty(&ch, s.wake);
        Ok(s)
    }

    /// Removes `client` from the channel's presence at once (a clean leave). Returns the shards
    /// to wake.
    pub fn leave_presence(&self, channel: &Arc<Channel>, client: &str) -> ShardMask {
        let wake = {
            let mut st = channel.state.lock();
            let seq = st.top;
            let left = st.presence.as_mut().is_some_and(|p| p.leave(client, seq));
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
    /// wake. Costs O(members of presence channels): run it every `--presence-sweep`.
    pub fn sweep_presence(&self, now: Instant) -> ShardMask {
        let deadline = self
            .millis(now)
            .saturating_sub(self.cfg.presence.timeout.as_millis() as u64);
        let mut all = 0;
        for part in self.table.iter() {
            let channels: Vec<Arc<Channel>> = part.read().values().cloned().collect();
            for ch in channels {
                let wake = {
                    let mut st = ch.state.lock();
                    let seq = st.top;
                    let left = st
                        .presence
                        .as_mut()
                        .is_some_and(|p| p.sweep(deadline, seq) > 0);
                    if left {
                        Self::mark_dirty(&ch, &st)
                    } else {
                        0
                    }
                };
                self.enqueue_dirty(&ch, wake);
                all |= wake;
            }
        }
        all
    }

    /// The members of `name` connected to this node (none when it has no presence or is
    /// unknown here): what a backplane advertises to the other nodes.
    pub fn presence_local(&self, name: &ChannelName) -> Vec<Identity> {
        let ch = self.part(name).read().get(name).cloned();
        ch.map_or_else(Vec::new, |ch| {
            ch.state
                .lock()
                .presence
                .as_ref()
                .map_or_else(Vec::new, |p| p.local_members())
        })
    }

    /// Adds (`Some(live)`) or removes (`None`) a member connected to another node, as the
    /// backplane reports it. Join and leave events follow the same per-user rules as local
    /// members. Returns the shards to wake.
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
        let (wake, ch) = self.with_channel(name, now, |ch, st| {
            let seq = st.top;
            let changed = match (st.presence.as_mut(), live.clone()) {
                (Some(p), Some(live)) => p
                    .join_member(who.clone(), live, seq, usize::MAX, true)
                    .unwrap_or(false),
                (Some(p), None) => p.leave(&who.client, seq),
                (None, _) => false,
            };
            let wake = if changed { Self::mark_dirty(ch, st) } else { 0 };
            (wake, ch.clone())
        });
        self.enqueue_dirty(&ch, wake);
        wake
    }

    /// The client ids of the remote members of `name`.
    pub fn presence_remote_clients(&self, name: &ChannelName) -> Vec<Arc<str>> {
        let ch = self.part(name).read().get(name).cloned();
        ch.map_or_else(Vec::new, |ch| {
            ch.state
                .lock()
                .presence
                .as_ref()
                .map_or_else(Vec::new, |p| p.remote_clients())
        })
    }

    /// The members of `name`, or `None` when it has no presence.
    pub fn presence(&self, name: &ChannelName, now: Instant) -> Option<PresenceSnapshot> {
        if !self.has_presence(name) {
            return None;
        }
        self.with_channel(name, now, |_, st| {
            st.presence.as_ref().map(|p| PresenceSnapshot {
                seq: st.top,
                members: p.members(),
                stats: p.stats(),
            })
        })
    }

    /// Undoes one [`Engine::subscribe`] of `shard`. Returns whether the channel has no
    /// subscriber left on this node (this was the last one).
    pub fn unsubscribe(&self, shard: usize, channel: &Channel, now: Instant) -> bool {
        let shard = shard % self.cfg.shards;
        let mut st = channel.state.lock();
        st.shard_subs[shard] = st.shard_subs[shard].saturating_sub(1);
        if st.shard_subs[shard] == 0 {
            st.interest &= !(1 << shard);
        }
        st.last_active = now;
        st.interest == 0
    }

    /// Subscribers of `name` on this node, over all shards (0 when the channel is unknown).
    pub fn local_subscribers(&self, name: &ChannelName) -> u64 {
        let ch = self.part(name).read().get(name).cloned();
        ch.map_or(0, |ch| {
            ch.state
                .lock()
                .shard_subs
                .iter()
                .map(|&n| u64::from(n))
                .sum()
        })
    }

    /// The position of `name` on this node, if the channel exists here.
    pub fn position(&self, name: &ChannelName) -> Option<StreamPosition> {
        let ch = self.part(name).read().get(name).cloned();
        ch.map(|ch| ch.position())
    }

    /// Appends a message that a remote sequencer (a backplane) numbered `seq` in `epoch`:
    /// appended when it is the next one of the local epoch, ignored when already there, a gap
    /// otherwise. `at` is when it was published, on this process's clock.
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
        let (outcome, ch) = self.with_channel(name, now, |ch, st| {
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
            st.ring
                .push_back(Arc::new(Publication::new(seq, at, kind, data.clone())));
            self.trim(st, now);
            let wake = Self::mark_dirty(ch, st);
            (IngestOutcome::Appended(wake), Some(ch.clone()))
        });
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
        let (wake, ch) = self.with_channel(name, now, |ch, st| {
            st.epoch = epoch;
            st.top = top;
            st.ring.clear();
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
            for e in run.into_iter().rev() {
                st.ring.push_back(Arc::new(Publication::new(
                    e.seq,
                    e.at,
                    e.kind,
                    e.data.clone(),
                )));
            }
            self.trim(st, now);
            st.generation += 1;
            st.last_active = now;
            (Self::mark_dirty(ch, st), ch.clone())
        });
        self.enqueue_dirty(&ch, wake);
        wake
    }

    /// Reads history after `since`, at most `limit` (capped by the history size).
    pub fn history(&self, name: &ChannelName, since: u64, limit: usize, now: Instant) -> History {
        let limit = limit.min(self.cfg.history_size);
        self.with_channel(name, now, |_, st| {
            let position = StreamPosition {
                epoch: st.epoch,
                seq: st.top,
            };
            match self.visible_since(st, since, now) {
                Some(it) => History {
                    position,
                    publications: it.take(limit).cloned().collect(),
                    complete: true,
                },
                None => {
                    // Serve what is still visible after `since`.
                    let oldest = st.top.saturating_sub(self.cfg.history_size as u64) + 1;
                    let publications = st
                        .ring
                        .iter()
                        .filter(|p| {
                            p.seq > since
                                && p.seq >= oldest
                                && now.saturating_duration_since(p.at) <= self.cfg.history_ttl
                        })
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

    /// Active channels, sorted by name.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let mut out: Vec<ChannelInfo> = self
            .table
            .iter()
            .flat_map(|part| {
                part.read()
                    .values()
                    .map(|ch| {
                        let st = ch.state.lock();
                        ChannelInfo {
                            name: ch.name.clone(),
                            subscribers: st.shard_subs.iter().map(|&n| n as u64).sum(),
                            seq: st.top,
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Drops expired history and forgets channels that have no subscribers, no history left
    /// and no activity for the history TTL. Returns how many channels were forgotten.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut removed = 0;
        for part in self.table.iter() {
            part.write().retain(|_, ch| {
                let mut st = ch.state.lock();
                self.trim(&mut st, now);
                let idle = now.saturating_duration_since(st.last_active) > self.cfg.history_ttl;
                let visible = st
                    .ring
                    .back()
                    .is_some_and(|p| now.saturating_duration_since(p.at) <= self.cfg.history_ttl);
                let members = st.presence.as_ref().is_some_and(|p| !p.is_empty());
                if st.interest == 0 && idle && !visible && !members {
                    st.removed = true;
                    removed += 1;
                    false
                } else {
                    true
                }
            });
        }
        removed
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
        Self::ring_since(&self.state.lock(), cursor, out)
    }

    fn ring_since(st: &ChannelState, cursor: u64, out: &mut Vec<Arc<Publication>>) -> bool {
        let Some(first) = st.ring.front().map(|p| p.seq) else {
            return cursor < st.top;
        };
        let lost = cursor + 1 < first;
        let start = (cursor + 1).saturating_sub(first) as usize;
        out.extend(st.ring.range(start.min(st.ring.len())..).cloned());
        lost
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
        let lost = Self::ring_since(&st, cursor, pubs);
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
            presence: Default::default(),
            slow_consumer: Vec::new(),
        })
    }

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    #[test]
    fn seqs_start_at_one_and_increase() {
        let e = engine(10, 1);
        let now = Instant::now();
        let a = e.publish(&ch("a"), DataKind::Json, Bytes::from_static(b"1"), now);
        let b = e.publish(&ch("a"), DataKind::Json, Bytes::from_static(b"2"), now);
        let other = e.publish(&ch("b"), DataKind::Json, Bytes::from_static(b"3"), now);
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
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now).wake,
            0b101
        );
        assert_eq!(
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now).wake,
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
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now).wake,
            0b001
        );
    }

    #[test]
    fn resume_recovers_exactly_the_missed_messages() {
        let e = engine(5, 1);
        let now = Instant::now();
        let first = e.publish(&ch("a"), DataKind::Json, Bytes::new(), now);
        for _ in 0..3 {
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now);
        }
        let pos = StreamPosition {
            epoch: first.epoch,
            seq: 1,
        };
        let s = e.subscribe(0, &ch("a"), Some(pos), None, now).unwrap();
        assert!(s.recovered);
        assert_eq!(
            s.replay.iter().map(|p| p.seq).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(s.position.seq, 4);

        let at_top = StreamPosition {
            epoch: first.epoch,
            seq: 4,
        };
        let s = e.subscribe(0, &ch("a"), Some(at_top), None, now).unwrap();
        assert!(s.recovered && s.replay.is_empty());
    }

    #[test]
    fn resume_fails_whole_on_gap_epoch_or_future() {
        let e = engine(5, 1);
        let now = Instant::now();
        let p = e.publish(&ch("a"), DataKind::Json, Bytes::new(), now);
        for _ in 0..9 {
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now);
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
            assert!(s.replay.is_empty());
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
        assert_eq!(s.replay.len(), 5);
    }

    #[test]
    fn history_ttl_hides_old_messages() {
        let e = Engine::new(EngineConfig {
            shards: 1,
            history_size: 100,
            history_ttl: Duration::from_secs(10),
            seed: 1,
            presence: Default::default(),
            slow_consumer: Vec::new(),
        });
        let t0 = Instant::now();
        e.publish(&ch("a"), DataKind::Json, Bytes::new(), t0);
        e.publish(
            &ch("a"),
            DataKind::Json,
            Bytes::new(),
            t0 + Duration::from_secs(8),
        );
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
    fn sweep_forgets_idle_channels_and_gives_a_new_epoch() {
        let e = Engine::new(EngineConfig {
            shards: 1,
            history_size: 100,
            history_ttl: Duration::from_secs(10),
            seed: 1,
            presence: Default::default(),
            slow_consumer: Vec::new(),
        });
        let t0 = Instant::now();
        let p = e.publish(&ch("a"), DataKind::Json, Bytes::new(), t0);
        let sub = e.subscribe(0, &ch("b"), None, None, t0).unwrap();
        assert_eq!(e.sweep(t0 + Duration::from_secs(5)), 0);
        assert_eq!(e.sweep(t0 + Duration::from_secs(20)), 1, "b is subscribed");
        let again = e.publish(
            &ch("a"),
            DataKind::Json,
            Bytes::new(),
            t0 + Duration::from_secs(21),
        );
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
            e.publish(&ch("a"), DataKind::Json, Bytes::new(), now);
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
        assert_eq!(r.replay.iter().map(|p| p.seq).collect::<Vec<_>>(), [2]);
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
        let p = e.publish(&ch("a"), DataKind::Json, Bytes::new(), now);
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
        assert_eq!(
            r.replay.iter().map(|p| p.seq).collect::<Vec<_>>(),
            [5, 6, 7]
        );
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
