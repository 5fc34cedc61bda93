//! Transports over the engine: hyper services for `/ws`, `/sse`, `/api/*`, `/admin` and health.
//!
//! Each shard thread owns one [`ShardContext`] (`!Send`): its hub, its connections' outboxes and
//! a handle on the shared [`Node`]. Handlers run on that thread only, so they use the hub
//! without locks; publishes go through the shared engine and wake the shards it names.

pub mod admin;
pub mod alarm;
pub mod api;
pub mod demo;
pub mod http;
pub mod io;
pub mod landing;
pub mod park;
pub mod proxied;
pub mod pusher;
pub mod request;
pub mod server_api;
pub mod session;
pub mod sse;
pub mod users;
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

/// What all shards share. Built by the composition root, `server::compose`.
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
    /// HTTP API request rates per key and per client address, over all shards.
    pub api: crate::limits::ApiLimiter,
    /// Peers whose forwarding headers name the client (`--trusted-proxies`).
    pub trusted: crate::proxy::TrustedProxies,
    /// The admin UI's state; `None`: `/admin` is off (no `--admin-password` or `--admin-token`).
    pub admin: Option<admin::Admin>,
    /// Each shard's open connections and subscriptions (the admin UI reads them).
    pub load: Box<[crate::metrics::ShardLoad]>,
    /// The webhook dispatcher, when hooks are configured ([`Node::start_webhooks`]).
    pub webhooks: Option<Arc<crate::webhooks::Webhooks>>,
    /// The backend proxy (`--proxy-*-url`), when one is configured.
    pub backend: Option<Arc<crate::backend::Proxy>>,
    /// Server API commands for users' connections, one inbox per shard.
    pub users: Arc<users::UserControl>,
    /// The Pusher apps (`--pusher-app`), their connection counts and signed-in users.
    pub pusher: Arc<pusher::Registry>,
    /// Set on SIGTERM: `/readyz` answers 503 for the drain period, while everything else is
    /// served as usual.
    pub(crate) draining: std::sync::atomic::AtomicBool,
}

/// The other end of an HTTP connection, in every request's extensions.
#[derive(Clone)]
pub struct Peer {
    /// The TCP peer, or the client its PROXY protocol header names.
    pub ip: std::net::IpAddr,
    /// The connection's per-IP slot; `None` from a trusted proxy, whose WebSocket and SSE
    /// requests each take a slot for the client they name ([`Node::stream_slot`]).
    pub guard: Option<Arc<crate::limits::IpGuard>>,
}

impl Node {
    /// Starts the drain period: `/readyz` answers 503 from now on.
    pub fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the node is draining or shutting down (`/readyz` 503).
    pub fn is_leaving(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed) || self.shutdown.is_cancelled()
    }

    /// The address a request from `peer` is counted as: see [`crate::proxy::forwarded_client`].
    pub fn client(&self, peer: &Peer, headers: &hyper::HeaderMap) -> Option<std::net::IpAddr> {
        crate::proxy::forwarded_client(peer.ip, headers, &self.trusted)
    }

    /// The per-IP slot a long-lived request (WebSocket, SSE stream) holds while it lasts: its
    /// connection's, or, from a trusted proxy, one for the client the request names (none
    /// when it names none). `Err(client)`: that client has `--max-connections-per-ip` open.
    pub fn stream_slot(
        &self,
        peer: Option<&Peer>,
        headers: &hyper::HeaderMap,
    ) -> Result<Option<Arc<crate::limits::IpGuard>>, std::net::IpAddr> {
        let Some(peer) = peer else {
            return Ok(None);
        };
        if let Some(g) = &peer.guard {
            return Ok(Some(g.clone()));
        }
        match self.client(peer, headers) {
            None => Ok(None),
            Some(ip) => self
                .ips
                .try_acquire(ip)
                .map(|g| Some(Arc::new(g)))
                .ok_or(ip),
        }
    }

    /// What a client without a token may do: everything with auth off.
    pub fn anonymous_grants(&self) -> crate::auth::Grants {
        match &self.auth {
            Some(a) => a.anonymous(),
            None if self.config.pusher_app.is_empty() => crate::auth::Grants::all(),
            None => crate::auth::Grants::all_but_pusher_private(),
        }
    }

    /// Sequences one message and starts its fan-out. The one way transports publish: where the
    /// sequence lives (this node, or a backplane shared by several) is decided here. Refused
    /// when the node cannot grow (memory budget, `--max-channels`).
    pub async fn publish(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
    ) -> Result<Published, PublishError> {
        self.engine
            .admit(channel, crate::types::now())
            .map_err(PublishError::Overloaded)?;
        match self.backplane.publish(channel, kind, data).await {
            Ok((epoch, seq)) => Ok(Published {
                epoch,
                seq,
                wake: 0,
            }),
            Err(crate::backplane::BackplaneError::Overloaded(o)) => {
                Err(PublishError::Overloaded(o))
            }
            Err(e) => Err(PublishError::Unavailable(e.to_string())),
        }
    }

    /// [`Node::publish`] under conditions: an idempotency key (a repeat within
    /// `--idempotency-window` answers the first publish's position, `.1` true, and publishes
    /// nothing) and an expected seq (compare-and-set: [`PublishError::SeqMismatch`] unless the
    /// channel's top is that seq).
    pub async fn publish_with(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
        cond: crate::engine::idempotency::PublishConditions,
    ) -> Result<(Published, bool), PublishError> {
        use crate::backplane::BackplaneError;
        if cond.is_empty() {
            return self.publish(channel, kind, data).await.map(|p| (p, false));
        }
        self.engine
            .admit(channel, crate::types::now())
            .map_err(PublishError::Overloaded)?;
        match self.backplane.publish_with(channel, kind, data, cond).await {
            Ok((epoch, seq, duplicate)) => Ok((
                Published {
                    epoch,
                    seq,
                    wake: 0,
                },
                duplicate,
            )),
            Err(BackplaneError::Overloaded(o)) => Err(PublishError::Overloaded(o)),
            Err(BackplaneError::SeqMismatch(at)) => Err(PublishError::SeqMismatch(at)),
            Err(e) => Err(PublishError::Unavailable(e.to_string())),
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
        !self.is_leaving() && self.backplane.is_ready()
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

/// Listings (history, presence, channels) answer one page at a time, so that no answer can be
/// huge: at most `limit` items (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]) and, past
/// the first item, at most [`MAX_PAGE_BYTES`]; a `next` cursor says where to continue.
pub mod paging {
    /// Items per page when the request gives no `limit`.
    pub const DEFAULT_LIMIT: usize = 100;
    /// Most items per page.
    pub const MAX_LIMIT: usize = 1000;
    /// Most bytes of items per answer (the first item always comes, whatever its size).
    pub const MAX_PAGE_BYTES: usize = 1 << 20;

    /// The page size for a requested `limit`.
    pub fn limit(requested: Option<u64>) -> usize {
        requested.map_or(DEFAULT_LIMIT, |n| {
            usize::try_from(n).unwrap_or(MAX_LIMIT).min(MAX_LIMIT)
        })
    }
}

/// Why a publish was refused: the message was not sequenced, and nobody will receive it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The backplane that sequences messages cannot be reached (HTTP 503, WS `unavailable`).
    #[error("the message cannot be sequenced now: {0}")]
    Unavailable(String),
    /// The node cannot grow (HTTP 503, WS `overloaded`).
    #[error(transparent)]
    Overloaded(crate::engine::Overloaded),
    /// `expected_seq` is not the channel's top, which is this (HTTP 409, WS `seq_mismatch`).
    #[error("expected_seq is not the channel's top seq, which is {}:{}", .0.epoch, .0.seq)]
    SeqMismatch(crate::types::StreamPosition),
}

impl PublishError {
    /// The error code clients see.
    pub fn code(&self) -> &'static str {
        match self {
            PublishError::Unavailable(_) => "unavailable",
            PublishError::Overloaded(_) => "overloaded",
            PublishError::SeqMismatch(_) => "seq_mismatch",
        }
    }

    /// Counts a refusal for overload (an unavailable backplane is not a refusal).
    pub fn count(&self) {
        if let PublishError::Overloaded(o) = self {
            crate::limits::refused(overload_cause(*o), "publish");
        }
    }
}

/// The `relay_refused_total` cause of an overload.
pub fn overload_cause(o: crate::engine::Overloaded) -> crate::limits::Cause {
    match o {
        crate::engine::Overloaded::Memory => crate::limits::Cause::Memory,
        crate::engine::Overloaded::Channels => crate::limits::Cause::MaxChannels,
    }
}

/// One shard's transport state. See the module docs.
pub struct ShardContext {
    /// The shared node.
    pub node: Arc<Node>,
    /// This shard's index.
    pub shard: usize,
    /// The `x-relay-shard` header of every answer, made once (a clone shares its bytes).
    pub(crate) shard_header: hyper::header::HeaderValue,
    /// This shard's subscribers.
    pub hub: RefCell<Hub>,
    /// This shard's metric handles.
    pub metrics: crate::metrics::ShardMetrics,
    /// Every connection task of the shard (HTTP connections and upgraded WebSocket sessions):
    /// shutdown waits for them, up to the timeout.
    pub tracker: TaskTracker,
    /// Bytes held by this shard's outboxes (see [`ShardContext::report_memory`]).
    pub outboxes: crate::engine::outbox::Gauge,
    /// Bytes of HTTP API answers built on this shard and not yet sent.
    pub responses: crate::engine::outbox::Gauge,
    /// This shard's connections by user (server API commands).
    pub users: users::ShardUsers,
    /// The one timer of this shard's sessions (see [`alarm`]).
    pub alarms: alarm::Alarms,
    /// This shard's idle WebSocket sessions, parked off the runtime (see [`park`]).
    pub lot: park::Lot,
    /// The auth of a connection without a user, shared by all of them (one per connection
    /// would cost every idle anonymous connection 120 bytes).
    pub(crate) anonymous: std::rc::Rc<request::ConnAuth>,
    next_conn: Cell<ConnId>,
}

impl ShardContext {
    /// The context of shard `shard`.
    pub fn new(node: Arc<Node>, shard: usize) -> Self {
        let outboxes = crate::engine::outbox::Gauge::default();
        let hub = Hub::with_gauge(
            shard,
            node.engine.clone(),
            protocol::ENCODER,
            outboxes.clone(),
        );
        let metrics = match node.load.get(shard) {
            Some(load) => crate::metrics::ShardMetrics::with_load(load),
            None => crate::metrics::ShardMetrics::new(),
        };
        let anonymous = std::rc::Rc::new(request::ConnAuth {
            grants: node.anonymous_grants(),
            user: None,
            info: None,
            exp: None,
        });
        Self {
            node,
            shard,
            shard_header: hyper::header::HeaderValue::from(shard),
            hub: RefCell::new(hub),
            tracker: TaskTracker::new(),
            metrics,
            outboxes,
            responses: Default::default(),
            users: Default::default(),
            alarms: Default::default(),
            lot: Default::default(),
            anonymous,
            next_conn: Cell::new(1),
        }
    }

    /// An outbox for a new connection, counted in the shard's gauge.
    pub fn new_outbox(&self) -> std::rc::Rc<crate::engine::outbox::Outbox> {
        std::rc::Rc::new(crate::engine::outbox::Outbox::with_gauge(
            self.config().max_outbox_bytes,
            self.outboxes.clone(),
        ))
    }

    /// Tells the node's memory meter what this shard's outboxes and pending answers hold: one
    /// relaxed store each, after every fan-out pass and on the shard's upkeep tick.
    pub fn report_memory(&self) {
        use crate::engine::memory::Kind;
        let meter = self.node.engine.meter();
        meter.set_shard(self.shard, Kind::Outbox, self.outboxes.get());
        meter.set_shard(self.shard, Kind::Responses, self.responses.get());
    }

    /// Tells the node's memory meter what this shard's connections hold besides their outboxes:
    /// an estimated fixed cost per open connection and per subscription. After each accept
    /// batch (so that a burst of connections weighs before the next batch) and on every tick.
    pub fn report_connections(&self) {
        use crate::engine::memory::{Kind, CONNECTION_COST, SUBSCRIPTION_COST};
        let subscriptions = self.node.load.get(self.shard).map_or(0, |l| {
            usize::try_from(l.subscriptions.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(0)
        });
        let bytes = (self.tracker.len() + self.lot.len())
            .saturating_mul(CONNECTION_COST)
            .saturating_add(subscriptions.saturating_mul(SUBSCRIPTION_COST));
        self.node
            .engine
            .meter()
            .set_shard(self.shard, Kind::Connections, bytes);
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

/// The engine's counters for `/metrics`, read when it is scraped.
pub fn engine_figures(engine: &Engine) -> crate::metrics::EngineFigures {
    use crate::engine::memory::Kind;
    use std::sync::atomic::Ordering::Relaxed;
    let meter = engine.meter();
    let s = engine.stats();
    crate::metrics::EngineFigures {
        memory: Kind::ALL
            .iter()
            .map(|&k| (k.as_str(), meter.bytes(k)))
            .collect(),
        memory_limit: meter.limit(),
        memory_pressure: meter.pressure() as u8,
        memory_rss: meter.rss(),
        memory_level: meter.level(),
        channels: engine.channel_count(),
        presence_info_bytes: engine.presence_info_bytes(),
        evictions: s.evictions.load(Relaxed),
        evicted_bytes: s.evicted_bytes.load(Relaxed),
        expiry_checked: s.checked.load(Relaxed),
        channels_expired: s.expired.load(Relaxed),
        expiry_checked_max: s.checked_max.load(Relaxed),
    }
}

impl crate::metrics::Pumped for crate::engine::hub::PumpStats {
    fn deliveries(&self) -> usize {
        self.deliveries
    }
    fn skipped(&self) -> usize {
        self.skipped
    }
    fn replayed(&self) -> usize {
        self.replayed
    }
    fn joined(&self) -> usize {
        self.joined
    }
    fn oldest_age(&self) -> Option<std::time::Duration> {
        self.oldest_age
    }
}
