//! Transports over the engine: hyper services for `/ws`, `/sse`, `/api/*` and health.
//!
//! Each shard thread owns one [`ShardContext`] (`!Send`): its hub, its connections' outboxes and
//! a handle on the shared [`Node`]. Handlers run on that thread only, so they use the hub
//! without locks; publishes go through the shared engine and wake the shards it names.

pub mod api;
pub mod demo;
pub mod http;
pub mod sse;
pub mod ws;

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::engine::hub::{ConnId, Hub};
use bytes::Bytes;

use crate::engine::{mask_iter, Engine, Published, ShardMask};
use crate::protocol;
use crate::types::{ChannelName, DataKind};

/// What all shards share.
pub struct Node {
    /// Settings.
    pub config: Config,
    /// The channel table.
    pub engine: Arc<Engine>,
    /// One fan-out wake-up per shard.
    pub wakers: Arc<[Notify]>,
    /// Where messages are sequenced: this node (`memory`) or a shared backplane.
    pub backplane: Arc<dyn crate::backplane::Backplane>,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    /// JWT verifier and config grants; `None`: auth off.
    pub auth: Option<crate::auth::Auth>,
    /// Open connections per client IP, over all shards.
    pub ips: Arc<crate::limits::IpLimiter>,
    /// TLS config, reloadable; `None`: plain TCP.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

impl Node {
    /// A node for `config` with `shards` shards, with the JWT verifier and TLS state the
    /// server loaded from the files `config` names.
    pub fn new(
        config: Config,
        shards: usize,
        seed: u64,
        auth: Option<crate::auth::Auth>,
        tls: Option<Arc<crate::tls::Tls>>,
    ) -> Self {
        let engine = Engine::new(crate::engine::EngineConfig {
            shards,
            history_size: config.history_size,
            history_ttl: config.history_ttl,
            seed,
            presence: crate::engine::presence::PresenceConfig {
                patterns: config.presence_channels.clone(),
                timeout: config.presence_timeout,
                max_members: config.presence_max_members,
            },
            slow_consumer: config.slow_consumer.clone(),
        });
        let engine = Arc::new(engine);
        let wakers = crate::backplane::Wakers::new(shards);
        let backplane = Arc::new(crate::backplane::memory::MemoryBackplane::new(
            engine.clone(),
            wakers.clone(),
        ));
        Self {
            backplane,
            ips: crate::limits::IpLimiter::new(config.max_connections_per_ip),
            auth,
            tls,
            config,
            engine,
            wakers: wakers.0,
            shutdown: CancellationToken::new(),
        }
    }

    /// What a client without a token may do: everything with auth off.
    pub fn anonymous_grants(&self) -> crate::auth::Grants {
        match &self.auth {
            Some(a) => a.anonymous(),
            None => crate::auth::Grants::all(),
        }
    }

    /// Sequences one message and starts its fan-out. The one way transports publish: where the
    /// sequence lives (this node, or a backplane shared by several) is decided here.
    pub async fn publish(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
    ) -> Result<Published, PublishError> {
        match self.backplane.publish(channel, kind, data).await {
            Ok((epoch, seq)) => Ok(Published {
                epoch,
                seq,
                wake: 0,
            }),
            Err(e) => Err(PublishError::Unavailable(e.to_string())),
        }
    }

    /// The backplane settings for the server at `url`.
    fn backplane_settings(&self, url: &str, seed: u64) -> crate::backplane::Settings {
        crate::backplane::Settings {
            url: url.to_owned(),
            history_size: self.config.history_size,
            history_ttl: self.config.history_ttl,
            node_id: self.config.node_id().to_owned(),
            seed,
            presence_timeout: self.config.presence_timeout,
        }
    }

    /// Starts the backplane the config names (`memory` needs nothing). Call once, before the
    /// node is shared.
    pub fn start_backplane(&mut self, seed: u64) -> std::io::Result<()> {
        use crate::config::BackplaneKind;
        match self.config.backplane {
            BackplaneKind::Memory => Ok(()),
            BackplaneKind::Redis => {
                let settings = self.backplane_settings(&self.config.redis_url, seed);
                self.backplane = crate::backplane::redis::start(
                    settings,
                    self.engine.clone(),
                    crate::backplane::Wakers(self.wakers.clone()),
                    self.shutdown.clone(),
                )?;
                Ok(())
            }
            BackplaneKind::Nats => {
                let settings = self.backplane_settings(&self.config.nats_url, seed);
                self.backplane = crate::backplane::nats::start(
                    settings,
                    self.engine.clone(),
                    crate::backplane::Wakers(self.wakers.clone()),
                    self.shutdown.clone(),
                )?;
                Ok(())
            }
        }
    }

    /// What a subscriber of `channel` must wait for before it is added to a hub: `None` when
    /// the channel is in sync on this node (always in memory mode: subscribe at once).
    pub fn join(
        &self,
        channel: &ChannelName,
    ) -> Option<crate::backplane::BoxFuture<Result<(), PublishError>>> {
        let f = self.backplane.join(channel)?;
        Some(Box::pin(async move {
            f.await
                .map_err(|e| PublishError::Unavailable(e.to_string()))
        }))
    }

    /// Reads history after `since`, at most `limit`, from where history lives (the engine in
    /// memory mode, the backplane otherwise).
    pub async fn history(
        &self,
        channel: &ChannelName,
        since: u64,
        limit: usize,
    ) -> Result<crate::engine::History, PublishError> {
        self.backplane
            .history(channel, since, limit)
            .await
            .map_err(|e| PublishError::Unavailable(e.to_string()))
    }

    /// Whether the node can take publishes (`/readyz`): not shutting down, and its backplane
    /// reachable.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.backplane.is_ready()
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

/// Why a publish was refused: the message was not sequenced, and nobody will receive it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The backplane that sequences messages cannot be reached (HTTP 503, WS `unavailable`).
    #[error("the message cannot be sequenced now: {0}")]
    Unavailable(String),
}

/// One shard's transport state. See the module docs.
pub struct ShardContext {
    /// The shared node.
    pub node: Arc<Node>,
    /// This shard's index.
    pub shard: usize,
    /// This shard's subscribers.
    pub hub: RefCell<Hub>,
    /// This shard's metric handles.
    pub metrics: crate::metrics::ShardMetrics,
    /// Every connection task of the shard (HTTP connections and upgraded WebSocket sessions):
    /// shutdown waits for them, up to the timeout.
    pub tracker: TaskTracker,
    next_conn: Cell<ConnId>,
}

impl ShardContext {
    /// The context of shard `shard`.
    pub fn new(node: Arc<Node>, shard: usize) -> Self {
        let hub = Hub::new(shard, node.engine.clone(), protocol::ENCODER);
        Self {
            node,
            shard,
            hub: RefCell::new(hub),
            tracker: TaskTracker::new(),
            metrics: crate::metrics::ShardMetrics::new(),
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
