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

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::types::{ChannelName, DataKind, Epoch, StreamPosition};

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
    /// Shards that were told about new publications and have not pulled them yet.
    dirty: AtomicU64,
    state: Mutex<ChannelState>,
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

/// The shared channel table. See the module docs.
pub struct Engine {
    cfg: EngineConfig,
    table: Box<[RwLock<HashMap<ChannelName, Arc<Channel>>>]>,
    hasher: std::collections::hash_map::RandomState,
    epochs: AtomicU64,
    dirty_lists: Box<[Mutex<Vec<Arc<Channel>>>]>,
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
            cfg,
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    fn part(&self, name: &ChannelName) -> &RwLock<HashMap<ChannelName, Arc<Channel>>> {
        let mut h = self.hasher.build_hasher();
        name.hash(&mut h);
        let i = (std::hash::Hasher::finish(&h) as usize) % TABLE_PARTS;
        &self.table[i]
    }

    fn next_epoch(&self) -> Epoch {
        // splitmix64 over (seed + counter): distinct per channel incarnation and per process.
        let n = self.epochs.fetch_add(1, Ordering::Relaxed);
        let mut z = self
            .cfg
            .seed
            .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Epoch((z ^ (z >> 31)) | 1 << 60)
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
                    dirty: AtomicU64::new(0),
                    state: Mutex::new(ChannelState {
                        epoch: self.next_epoch(),
                        top: 0,
                        ring: VecDeque::new(),
                        shard_subs: vec![0; self.cfg.shards].into_boxed_slice(),
                        interest: 0,
                        last_active: now,
                        removed: false,
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
            let prev = ch.dirty.fetch_or(st.interest, Ordering::AcqRel);
            let wake = st.interest & !prev;
            (
                Published {
                    epoch: st.epoch,
                    seq: st.top,
                    wake,
                },
                ch.clone(),
            )
        });
        for shard in mask_iter(published.wake) {
            self.dirty_lists[shard].lock().push(ch.clone());
        }
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

    /// Subscribes one subscriber of `shard` to `name`, resuming from `resume` when given.
    ///
    /// The caller must register the subscriber in its shard's hub with
    /// `position.seq` as its starting point before it yields, and call
    /// [`Engine::unsubscribe`] exactly once when it leaves.
    pub fn subscribe(
        &self,
        shard: usize,
        name: &ChannelName,
        resume: Option<StreamPosition>,
        now: Instant,
    ) -> Subscribed {
        self.with_channel(name, now, |ch, st| {
            let shard = shard % self.cfg.shards;
            st.shard_subs[shard] += 1;
            st.interest |= 1 << shard;
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
            Subscribed {
                channel: ch.clone(),
                position,
                recovered,
                replay,
                gap,
            }
        })
    }

    /// Undoes one [`Engine::subscribe`] of `shard`.
    pub fn unsubscribe(&self, shard: usize, channel: &Channel, now: Instant) {
        let shard = shard % self.cfg.shards;
        let mut st = channel.state.lock();
        st.shard_subs[shard] = st.shard_subs[shard].saturating_sub(1);
        if st.shard_subs[shard] == 0 {
            st.interest &= !(1 << shard);
        }
        st.last_active = now;
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
                if st.interest == 0 && idle && !visible {
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

    /// Appends the publications with `seq > cursor` to `out` and returns whether some were
    /// already gone from the ring (the reader fell too far behind).
    pub fn read_since(&self, cursor: u64, out: &mut Vec<Arc<Publication>>) -> bool {
        let st = self.state.lock();
        let Some(first) = st.ring.front().map(|p| p.seq) else {
            return cursor < st.top;
        };
        let lost = cursor + 1 < first;
        let start = (cursor + 1).saturating_sub(first) as usize;
        out.extend(st.ring.range(start.min(st.ring.len())..).cloned());
        lost
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
        let s0 = e.subscribe(0, &ch("a"), None, now);
        let _s2 = e.subscribe(2, &ch("a"), None, now);
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
        let s = e.subscribe(0, &ch("a"), Some(pos), now);
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
        let s = e.subscribe(0, &ch("a"), Some(at_top), now);
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
            let s = e.subscribe(0, &ch("a"), Some(pos), now);
            assert!(!s.recovered);
            assert!(s.replay.is_empty());
            assert_eq!(s.gap, Some(reason));
        }
        // The oldest message still in the window is seq 6, so since=5 recovers.
        let s = e.subscribe(
            0,
            &ch("a"),
            Some(StreamPosition {
                epoch: p.epoch,
                seq: 5,
            }),
            now,
        );
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
        });
        let t0 = Instant::now();
        let p = e.publish(&ch("a"), DataKind::Json, Bytes::new(), t0);
        let sub = e.subscribe(0, &ch("b"), None, t0);
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
        let s = e.subscribe(0, &ch("a"), None, now);
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
