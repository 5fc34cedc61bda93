//! The node's memory budget (`--max-memory`): what clients can make the node hold, counted by
//! kind, and the pressure level that follows from it. Sans-IO: plain counters and thresholds.
//!
//! - The engine's kinds (history, presence, channels) change under channel locks on every
//!   thread; each thread adds to its own cache-padded slot (relaxed atomics, no sharing), and
//!   the total is summed lazily: when a slot has grown by a batch since the last sum, and on
//!   every maintenance tick.
//! - The shards' kinds (outboxes, pending HTTP responses, connections) are counted shard-locally
//!   without atomics and stored here as absolute values (`set_shard`) after each fan-out pass,
//!   accept batch and tick.
//! - What no counter sees (allocator slack and retention, transient buffers, the process's own
//!   code and runtimes) comes in through the process's resident memory: the server samples it
//!   on its upkeep tick (`set_rss`) and the difference between it and the counted total at that
//!   moment ([`Meter::unseen`]) is added to the total until the next sample. So RSS is a floor
//!   of the level at every sample, and between samples the counters move the level at once
//!   (an eviction lowers it before the allocator has returned the pages; the next sample
//!   corrects it if they stay).
//!
//! Levels, by the level ([`Meter::level`]: counted + unseen) against the limit: under 85 %
//! [`Pressure::Normal`]; from 85 % [`Pressure::Evict`] (history of the least recently used
//! channels is evicted down to 75 %); over 100 % [`Pressure::Refuse`] (new publishes,
//! subscriptions and connections are refused) until the level is back under 95 %.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicUsize, Ordering};

/// What the bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Messages in channel rings (payload + per-entry overhead).
    History = 0,
    /// Presence members (ids, info) and presence events.
    Presence = 1,
    /// The channels themselves (a fixed cost per channel).
    Channels = 2,
    /// Connection outboxes: their queue entries and private frames (replies, control frames),
    /// plus every encoded message frame once, however many outboxes and rings share it (see
    /// [`FrameGauge`]).
    Outbox = 3,
    /// HTTP API answers built and not yet sent.
    Responses = 4,
    /// Open connections and their subscriptions, at a fixed estimated cost each
    /// ([`CONNECTION_COST`], [`SUBSCRIPTION_COST`]): what a connection holds besides its outbox
    /// (its task and session, socket registration, per-IP entry, a hub entry per channel).
    Connections = 5,
}

impl Kind {
    /// Every kind, in metric order.
    pub const ALL: [Kind; KINDS] = [
        Kind::History,
        Kind::Presence,
        Kind::Channels,
        Kind::Connections,
        Kind::Outbox,
        Kind::Responses,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::History => "history",
            Kind::Presence => "presence",
            Kind::Channels => "channels",
            Kind::Outbox => "outbox",
            Kind::Responses => "responses",
            Kind::Connections => "connections",
        }
    }
}

/// Number of kinds.
pub const KINDS: usize = 6;

/// Estimated bytes an open connection holds besides its outbox and subscriptions: its task and
/// session, decoder, socket registration and per-IP entry, plus what its handshake leaves in
/// the allocator. Measured (release, 2 shards, loopback): 4.9 KB of RSS per connection for
/// 1,000 idle `/ws` connections; the slope at 10,000–19,000 is lower (≈ 1.7 KB, Pusher's
/// `/app` ≈ 3.1 KB). An estimate: the RSS floor covers what it misses.
pub const CONNECTION_COST: usize = 4 << 10;
/// Estimated bytes a subscription holds: its hub entry, the channel's interest and the
/// connection's channel list. Measured: 254 B of RSS per subscription for 200 connections × 128
/// shared channels.
pub const SUBSCRIPTION_COST: usize = 256;
/// Kinds counted per thread (the engine's); the others are set per shard.
const THREAD_KINDS: usize = 3;

/// How full the budget is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    /// Under the eviction threshold.
    Normal = 0,
    /// Evict history of the least recently used channels.
    Evict = 1,
    /// Over the budget: refuse what would grow memory.
    Refuse = 2,
}

/// Percent of the limit where eviction starts.
const EVICT_AT: usize = 85;
/// Percent of the limit eviction brings the total down to.
const EVICT_TO: usize = 75;
/// Percent of the limit under which refusing stops.
const RECOVER_AT: usize = 95;
/// Thread slots (threads share one when there are more).
const SLOTS: usize = 64;

#[repr(align(128))]
#[derive(Default)]
struct Slot {
    bytes: [AtomicI64; THREAD_KINDS],
}

// `FrameGauge` lives in `types` (a `Publication` holds one); its old path.
pub use crate::types::FrameGauge;

/// See the module docs.
pub struct Meter {
    /// 0: no limit.
    limit: usize,
    batch: i64,
    slots: Box<[Slot]>,
    shards: Box<[[AtomicUsize; KINDS - THREAD_KINDS]]>,
    frames: FrameGauge,
    level: AtomicU8,
    /// The last RSS sample (0: none yet, or not sampled).
    rss: AtomicUsize,
    /// What that sample held beyond the counted total then.
    unseen: AtomicUsize,
}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn thread_slot() -> usize {
    SLOT.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS);
        }
        s.get()
    })
}

impl Meter {
    /// A meter for `limit` bytes (0: no limit) and `shards` shards.
    pub fn new(limit: usize, shards: usize) -> Self {
        Self {
            limit,
            // Sum at least every 1/1024 of the limit of growth per thread and kind, and not more
            // often than every 16 KiB: the total lags by at most a batch per active thread.
            batch: (limit / 1024).max(16 << 10) as i64,
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            shards: (0..shards.max(1)).map(|_| Default::default()).collect(),
            frames: FrameGauge::default(),
            level: AtomicU8::new(Pressure::Normal as u8),
            rss: AtomicUsize::new(0),
            unseen: AtomicUsize::new(0),
        }
    }

    /// The budget (0: none).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The gauge of encoded message frames (part of [`Kind::Outbox`]).
    pub fn frames(&self) -> &FrameGauge {
        &self.frames
    }

    /// Counts `delta` bytes of an engine kind (history, presence, channels).
    pub fn add(&self, kind: Kind, delta: i64) {
        if delta == 0 {
            return;
        }
        let slot = &self.slots[thread_slot()];
        let before = slot.bytes[kind as usize % THREAD_KINDS].fetch_add(delta, Ordering::Relaxed);
        // One atomic operation: the total is summed again when this slot's count passes a
        // multiple of the batch on its way up.
        if delta > 0 && (before + delta).div_euclid(self.batch) != before.div_euclid(self.batch) {
            self.recompute();
        }
    }

    /// Sets shard `shard`'s bytes of a shard kind (outbox, responses, connections).
    pub fn set_shard(&self, shard: usize, kind: Kind, bytes: usize) {
        let Some(i) = (kind as usize).checked_sub(THREAD_KINDS) else {
            return;
        };
        let Some(cell) = self.shards.get(shard).and_then(|s| s.get(i)) else {
            return;
        };
        let before = cell.swap(bytes, Ordering::Relaxed);
        if bytes >= before.saturating_add(self.batch as usize) {
            self.recompute();
        }
    }

    /// Bytes of `kind` over the node.
    pub fn bytes(&self, kind: Kind) -> usize {
        let k = kind as usize;
        if k < THREAD_KINDS {
            let sum: i64 = self
                .slots
                .iter()
                .map(|s| s.bytes[k].load(Ordering::Relaxed))
                .sum();
            sum.max(0) as usize
        } else {
            let shards: usize = self
                .shards
                .iter()
                .map(|s| s[k - THREAD_KINDS].load(Ordering::Relaxed))
                .sum();
            match kind {
                Kind::Outbox => shards + self.frames.bytes(),
                _ => shards,
            }
        }
    }

    /// Every kind's bytes added up.
    pub fn total(&self) -> usize {
        Kind::ALL.iter().map(|&k| self.bytes(k)).sum()
    }

    /// Takes a sample of the process's resident memory: from now until the next sample, what
    /// it holds beyond the counted total is added to the level. Sets the level; returns it.
    pub fn set_rss(&self, rss: usize) -> Pressure {
        self.rss.store(rss, Ordering::Relaxed);
        self.unseen
            .store(rss.saturating_sub(self.total()), Ordering::Relaxed);
        self.recompute()
    }

    /// The last RSS sample (0: none).
    pub fn rss(&self) -> usize {
        self.rss.load(Ordering::Relaxed)
    }

    /// What the last RSS sample held beyond the counted total.
    pub fn unseen(&self) -> usize {
        self.unseen.load(Ordering::Relaxed)
    }

    /// What the budget is held against: the counted total plus what the last RSS sample held
    /// beyond it.
    pub fn level(&self) -> usize {
        self.total().saturating_add(self.unseen())
    }

    /// The level as last computed.
    pub fn pressure(&self) -> Pressure {
        match self.level.load(Ordering::Relaxed) {
            0 => Pressure::Normal,
            1 => Pressure::Evict,
            _ => Pressure::Refuse,
        }
    }

    /// Sums the kinds and sets the pressure level from [`Meter::level`]; returns it.
    pub fn recompute(&self) -> Pressure {
        if self.limit == 0 {
            return Pressure::Normal;
        }
        let total = self.level();
        let pct = |p: usize| self.limit / 100 * p + self.limit % 100 * p / 100;
        let level = if total > self.limit
            || (self.pressure() == Pressure::Refuse && total > pct(RECOVER_AT))
        {
            Pressure::Refuse
        } else if total > pct(EVICT_AT) {
            Pressure::Evict
        } else {
            Pressure::Normal
        };
        self.level.store(level as u8, Ordering::Relaxed);
        level
    }

    /// How many bytes eviction should free now to bring the level to its target (0 when
    /// there is no pressure).
    pub fn excess(&self) -> usize {
        if self.limit == 0 {
            return 0;
        }
        let target = self.limit / 100 * EVICT_TO;
        let total = self.level();
        if total > self.limit / 100 * EVICT_AT || self.pressure() != Pressure::Normal {
            total.saturating_sub(target)
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn levels_follow_the_total_with_hysteresis() {
        let m = Meter::new(1 << 20, 2);
        assert_eq!(m.recompute(), Pressure::Normal);
        m.add(Kind::History, 800 << 10);
        assert_eq!(m.recompute(), Pressure::Normal);
        m.set_shard(1, Kind::Outbox, 100 << 10);
        assert_eq!(m.pressure(), Pressure::Evict, "a big jump sums at once");
        m.add(Kind::Presence, 200 << 10);
        assert_eq!(m.recompute(), Pressure::Refuse);
        assert_eq!(m.bytes(Kind::Outbox), 100 << 10);
        m.add(Kind::Presence, -(100 << 10));
        assert_eq!(m.recompute(), Pressure::Refuse, "not yet under 95 %");
        m.add(Kind::Presence, -(100 << 10));
        assert_eq!(m.recompute(), Pressure::Evict);
        assert!(m.excess() > 0);
        m.set_shard(1, Kind::Outbox, 0);
        m.add(Kind::History, -(400 << 10));
        assert_eq!(m.recompute(), Pressure::Normal);
        assert_eq!(m.excess(), 0);
        assert_eq!(m.total(), 400 << 10);
    }

    #[test]
    fn a_counted_frame_weighs_until_its_last_clone_goes() {
        let m = Meter::new(1 << 20, 1);
        let f = m.frames().count(Bytes::from(vec![1u8; 1000]));
        let mut clones: Vec<Bytes> = (0..50).map(|_| f.clone()).collect();
        assert_eq!(m.bytes(Kind::Outbox), 1000, "once, not 51 times");
        assert_eq!(&clones[7][..], &[1u8; 1000][..]);
        drop(f);
        clones.truncate(1);
        assert_eq!(m.frames().bytes(), 1000);
        drop(clones);
        assert_eq!(m.frames().bytes(), 0);
        assert_eq!(m.total(), 0);
    }

    #[test]
    fn growth_sums_by_itself_after_a_batch() {
        let m = Meter::new(1 << 20, 1);
        for _ in 0..100 {
            m.add(Kind::History, 11 << 10);
        }
        assert_eq!(
            m.pressure(),
            Pressure::Refuse,
            "no explicit recompute needed"
        );
    }

    #[test]
    fn the_rss_floor_drives_the_level_with_hysteresis() {
        let m = Meter::new(1 << 20, 1);
        m.add(Kind::History, 100 << 10);
        assert_eq!(
            m.set_rss(900 << 10),
            Pressure::Evict,
            "88 % of RSS, 10 % counted"
        );
        assert_eq!(m.level(), 900 << 10);
        assert_eq!(m.unseen(), 800 << 10);
        assert_eq!(m.excess(), (900 << 10) - (1 << 20) / 100 * EVICT_TO);
        // Evicting lowers the level at once, before the next sample.
        m.add(Kind::History, -(100 << 10));
        assert_eq!(m.recompute(), Pressure::Normal);
        assert_eq!(m.set_rss(1100 << 10), Pressure::Refuse);
        assert_eq!(
            m.set_rss(1000 << 10),
            Pressure::Refuse,
            "not yet under 95 %"
        );
        assert_eq!(m.set_rss(950 << 10), Pressure::Evict, "recovered by itself");
        assert_eq!(m.set_rss(500 << 10), Pressure::Normal);
        assert_eq!(m.rss(), 500 << 10);
    }

    #[test]
    fn counted_growth_adds_to_the_last_sample() {
        let m = Meter::new(1 << 20, 2);
        assert_eq!(m.set_rss(500 << 10), Pressure::Normal);
        m.set_shard(
            1,
            Kind::Connections,
            100 * CONNECTION_COST + 100 * SUBSCRIPTION_COST,
        );
        assert_eq!(m.bytes(Kind::Connections), 100 * (4096 + 256));
        m.add(Kind::Presence, 200 << 10);
        assert_eq!(
            m.pressure(),
            Pressure::Refuse,
            "counted since the sample: over"
        );
        // A sample under the counted total leaves the total as the level.
        m.set_shard(1, Kind::Connections, 0);
        m.add(Kind::Presence, 400 << 10);
        assert_eq!(m.set_rss(100 << 10), Pressure::Normal);
        assert_eq!((m.unseen(), m.level()), (0, 600 << 10));
    }

    #[test]
    fn no_limit_never_presses() {
        let m = Meter::new(0, 1);
        m.add(Kind::History, 1 << 40);
        assert_eq!(m.recompute(), Pressure::Normal);
        assert_eq!(m.excess(), 0);
    }
}
