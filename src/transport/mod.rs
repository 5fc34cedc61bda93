//! Transports over the engine: hyper services for `/ws`, `/sse`, `/api/*` and health.
//!
//! Each shard thread owns one [`ShardContext`] (`!Send`): its hub, its connections' outboxes and
//! a handle on the shared [`Node`]. Handlers run on that thread only, so they use the hub
//! without locks; publishes go through the shared engine and wake the shards it names.

pub mod api;
pub mod http;
pub mod sse;
pub mod ws;

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::hub::{ConnId, Hub};
use crate::engine::{mask_iter, Engine, ShardMask};
use crate::protocol;

/// What all shards share.
pub struct Node {
    /// Settings.
    pub config: Config,
    /// The channel table.
    pub engine: Arc<Engine>,
    /// One fan-out wake-up per shard.
    pub wakers: Box<[Notify]>,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
}

impl Node {
    /// A node for `config` with `shards` shards.
    pub fn new(config: Config, shards: usize, seed: u64) -> Self {
        let engine = Engine::new(crate::engine::EngineConfig {
            shards,
            history_size: config.history_size,
            history_ttl: config.history_ttl,
            seed,
        });
        Self {
            config,
            engine: Arc::new(engine),
            wakers: (0..shards).map(|_| Notify::new()).collect(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Wakes the shards in `mask` to pump their hubs.
    pub fn wake(&self, mask: ShardMask) {
        for shard in mask_iter(mask) {
            if let Some(n) = self.wakers.get(shard) {
                n.notify_one();
            }
        }
    }
}

/// One shard's transport state. See the module docs.
pub struct ShardContext {
    /// The shared node.
    pub node: Arc<Node>,
    /// This shard's index.
    pub shard: usize,
    /// This shard's subscribers.
    pub hub: RefCell<Hub>,
    next_conn: Cell<ConnId>,
}

impl ShardContext {
    /// The context of shard `shard`.
    pub fn new(node: Arc<Node>, shard: usize) -> Self {
        let hub = Hub::new(shard, node.engine.clone(), protocol::encode_publication);
        Self {
            node,
            shard,
            hub: RefCell::new(hub),
            next_conn: Cell::new(1),
        }
    }

    /// A connection id unique within the shard.
    pub fn next_conn_id(&self) -> ConnId {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        id
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.node.config
    }
}
