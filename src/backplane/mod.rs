//! Backplanes: where a channel's sequence and history live when several relay nodes serve the
//! same channels.
//!
//! A [`Backplane`] sequences publishes (gives each message its `(epoch, seq)`), carries every
//! message to every node that has local subscribers in its channel, and keeps the history that
//! any node can serve a resume from. The node keeps its own engine (rings, hubs, outboxes) as a
//! local replica of the channels it has subscribers in: [`Engine::ingest`] appends what the
//! backplane delivers, [`Engine::reset`] adopts the backplane's state when the local replica
//! cannot be brought up to date message by message.
//!
//! - [`memory::MemoryBackplane`]: one node, the engine is the sequencer (the default).
//! - [`replica::Replica`]: the backplane of every remote store. It keeps the engine in step
//!   with the store (join, ingest, resync, maintenance, presence mirroring) and asks a
//!   [`replica::Remote`] for what only the store knows how to do:
//!   - [`redis`]: Redis (one Lua script per publish; pub/sub fan-out; streams as history).
//!     See `docs/ARCHITECTURE.md`, section *Backplane*.
//!   - [`nats`]: NATS (JetStream stream with optimistic concurrency for the seq and history;
//!     core NATS republish for fan-out).
//!
//! [`Engine::ingest`]: crate::engine::Engine::ingest
//! [`Engine::reset`]: crate::engine::Engine::reset

pub mod agree;
pub mod memory;
pub mod nats;
pub mod presence;
pub mod redis;
pub mod replica;
pub mod roster;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::engine::presence::Identity;
use crate::engine::{mask_iter, mix_public, History, ShardMask};
use crate::types::{ChannelName, DataKind, Epoch};

/// What a node does with a control message ([`Backplane::set_control`]).
pub type ControlHandler = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// A boxed, sendable future (what trait objects can return).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why a backplane operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackplaneError {
    /// The backplane cannot be reached now (down, reconnecting, timed out).
    #[error("backplane unavailable: {0}")]
    Unavailable(String),
    /// The backplane answered something this node does not understand.
    #[error("backplane protocol error: {0}")]
    Protocol(String),
    /// The node cannot grow (the memory backplane's engine refused).
    #[error(transparent)]
    Overloaded(crate::engine::Overloaded),
    /// A conditional publish's `expected_seq` is not the channel's top, which is this.
    #[error("expected_seq is not the channel's top seq ({}:{})", .0.epoch, .0.seq)]
    SeqMismatch(crate::types::StreamPosition),
    /// This backplane cannot do what was asked.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// Where sequencing and cross-node fan-out happen. See the module docs.
///
/// Methods return boxed futures so that the trait can be used as `Arc<dyn Backplane>`; a
/// future that needs no I/O is ready at its first poll (transports rely on this to answer
/// inline in memory mode).
pub trait Backplane: Send + Sync {
    /// Sequences one message: returns its channel's epoch and its seq. Local fan-out follows
    /// (at once in memory mode; when the message comes back from the backplane otherwise).
    fn publish(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
    ) -> BoxFuture<Result<(Epoch, u64), BackplaneError>>;

    /// [`Backplane::publish`] under conditions (idempotency key, expected seq): see
    /// [`crate::engine::Engine::publish_with`]. Returns the position and whether the publish
    /// was a duplicate (nothing published). Every backplane applies the conditions for the
    /// whole cluster (the key and the compare-and-set live where the seq is made); none
    /// ignores them.
    fn publish_with(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
        cond: crate::engine::idempotency::PublishConditions,
    ) -> BoxFuture<Result<(Epoch, u64, bool), BackplaneError>>;

    /// Called before a subscriber is added on this node. `None` when the local channel is
    /// already in sync (subscribe at once); otherwise a future that completes once this node
    /// receives the channel and its local state matches the backplane's. The backplane stops
    /// receiving a channel by itself once it has had no local subscriber for a grace period.
    fn join(&self, channel: &ChannelName) -> Option<BoxFuture<Result<(), BackplaneError>>>;

    /// Reads history after `since`, at most `limit`.
    fn history(
        &self,
        channel: &ChannelName,
        since: u64,
        limit: usize,
    ) -> BoxFuture<Result<History, BackplaneError>>;

    /// Whether the node can sequence publishes now (`/readyz`).
    fn is_ready(&self) -> bool;

    /// The channel's presence members on every node, read from the store, when this node does
    /// not mirror the channel (it receives only the channels it has subscribers in). `None`:
    /// the local engine's presence is the answer (memory mode, or a mirrored channel).
    fn presence(
        &self,
        _channel: &ChannelName,
    ) -> Option<BoxFuture<Result<Vec<Identity>, BackplaneError>>> {
        None
    }

    /// Sends `message` to every node's control handler ([`Backplane::set_control`]), this
    /// node's included; answers how many nodes it reached when the store can tell. `None`:
    /// one node only (memory mode).
    fn send_control(
        &self,
        _message: Bytes,
    ) -> Option<BoxFuture<Result<Option<u64>, BackplaneError>>> {
        None
    }

    /// Sets what this node does with the control messages of every node (once; later calls
    /// are ignored). The handler runs on the backplane's thread and must not block.
    fn set_control(&self, _handler: ControlHandler) {}

    /// Whether the backplane agrees on channel events across nodes ([`Backplane::agree`]).
    /// `false` (memory mode): the node alone decides, every change it sees is an event.
    fn agrees(&self) -> bool {
        false
    }

    /// Writes this node's `claims` about `channel` (see [`agree`]) and returns the
    /// cluster-wide changes they (and the expired claims of other nodes found meanwhile)
    /// made, for this node to report.
    fn agree(
        &self,
        _channel: &ChannelName,
        _claims: Vec<agree::Claim>,
    ) -> BoxFuture<Result<Vec<agree::Agreed>, BackplaneError>> {
        Box::pin(std::future::ready(Err(BackplaneError::Unsupported(
            "this backplane does not agree on channel events",
        ))))
    }

    /// Removes the claims whose lease ran out on channels no live node touches any more (a
    /// crashed node's) and returns the changes that made, for this node to report.
    fn reap(&self) -> BoxFuture<Result<Vec<(ChannelName, agree::Agreed)>, BackplaneError>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

/// Wakes the shards of a node (the fan-out pump of each).
#[derive(Clone)]
pub struct Wakers(pub Arc<[Notify]>);

impl Wakers {
    /// `shards` wakers.
    pub fn new(shards: usize) -> Self {
        Wakers((0..shards).map(|_| Notify::new()).collect())
    }

    /// Wakes the shards in `mask`.
    pub fn wake(&self, mask: ShardMask) {
        for shard in mask_iter(mask) {
            if let Some(n) = self.0.get(shard) {
                n.notify_one();
            }
        }
    }
}

thread_local! {
    /// Whether this thread is a shard's (see [`enter_shard`]).
    static ON_SHARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as a shard's: a remote backplane then sends the publishes made on
/// it over a connection of the shard's own (on its runtime), not through the backplane's
/// thread. Why: a publish is a round trip (the pipelining front keeps several of one
/// connection in flight, `server::front`), and every hand-over to another thread on the way is
/// a scheduler wake-up (up to a time slice on a busy core), several per publish through the
/// backplane's thread.
pub fn enter_shard() {
    ON_SHARD.with(|s| s.set(true));
}

/// Whether the calling thread is a shard's ([`enter_shard`]).
pub(crate) fn on_shard() -> bool {
    ON_SHARD.with(|s| s.get())
}

/// Wall-clock milliseconds since the UNIX epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The local `Instant` of a wall-clock time `ms` (clamped to now: the future is now).
pub fn instant_of(ms: u64, now: Instant, now_ms: u64) -> Instant {
    let age = Duration::from_millis(now_ms.saturating_sub(ms));
    now.checked_sub(age).unwrap_or(now)
}

/// Jitter and epoch candidates of one node (seeded splitmix64: spread, never secrecy).
pub struct Seeds {
    seed: u64,
    n: AtomicU64,
}

impl Seeds {
    /// Numbers drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            n: AtomicU64::new(0),
        }
    }

    /// A number for jitter (mixed with the wall clock, so that restarted nodes differ).
    pub fn random(&self) -> u64 {
        mix_public(
            self.seed ^ wall_ms(),
            self.n.fetch_add(1, Ordering::Relaxed),
        )
    }

    /// An epoch for a channel that has none in the store yet (bit 60 set: never 0, and the
    /// same width whatever the draw).
    pub fn epoch(&self) -> Epoch {
        Epoch(mix_public(self.seed, self.n.fetch_add(1, Ordering::Relaxed)) | 1 << 60)
    }
}

/// Full-jitter exponential backoff: a random delay in `[0, min(cap, base * 2^attempt)]`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, random: u64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(20));
    let ceiling = exp.min(cap).as_millis() as u64;
    Duration::from_millis(if ceiling == 0 {
        0
    } else {
        random % (ceiling + 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_by_the_cap_and_grows() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for attempt in 0..40 {
            for r in [0, 1, 99, 12345, u64::MAX] {
                assert!(backoff(attempt, base, cap, r) <= cap);
            }
        }
        assert!(backoff(0, base, cap, u64::MAX - 5) <= base);
        assert_eq!(backoff(3, base, cap, 800), Duration::from_millis(800));
    }

    #[test]
    fn instants_of_wall_times() {
        let now = Instant::now();
        assert_eq!(instant_of(1000, now, 1000), now);
        assert_eq!(instant_of(2000, now, 1000), now, "future clamps to now");
        assert_eq!(instant_of(0, now, 250) + Duration::from_millis(250), now);
    }
}

/// What a remote backplane needs to know.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The server's URL: `redis://host:port[/db]` or `nats://host:port`.
    pub url: String,
    /// Messages kept per channel.
    pub history_size: usize,
    /// How long a message stays in history.
    pub history_ttl: std::time::Duration,
    /// This node's id (logs, and the owner of its presence records in the store).
    pub node_id: String,
    /// Seeds epoch candidates and jitter.
    pub seed: u64,
    /// A presence member not refreshed for this long leaves (`--presence-timeout`).
    pub presence_timeout: std::time::Duration,
    /// How long a publish's idempotency key is remembered (`--idempotency-window`).
    pub idempotency_window: std::time::Duration,
}

impl Settings {
    /// This node's lease on what it claims about channels (see [`agree`]).
    pub fn lease(&self) -> agree::Lease {
        agree::Lease {
            node: self.node_id.clone(),
            length: self.presence_timeout,
        }
    }
}
