//! The composition root: builds the [`Node`] every shard shares (engine, backplane, limiters,
//! auth, TLS, webhooks, JWKS refresh, admin, Pusher apps) from the settings and the files the
//! server read. The only place that knows every concrete part; the transports see them through
//! the `Node`.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::presence::PresenceConfig;
use crate::engine::{Engine, EngineConfig};
use crate::transport::Node;

/// A node for `config` with `shards` shards, with the JWT verifier and TLS state the
/// server loaded from the files `config` names. Its backplane is the memory one until
/// [`start_backplane`].
pub fn node(
    config: Config,
    shards: usize,
    seed: u64,
    auth: Option<crate::auth::Auth>,
    tls: Option<Arc<crate::tls::Tls>>,
) -> Node {
    let max_memory = config
        .max_memory
        .unwrap_or_else(crate::limits::default_memory_budget);
    match (config.max_memory, max_memory) {
        (None, 0) => tracing::warn!(
            "could not read the cgroup or physical memory limit: no memory budget; set --max-memory"
        ),
        (Some(0), _) => tracing::warn!("--max-memory 0: no memory budget"),
        (given, bytes) => tracing::info!(
            bytes,
            derived = given.is_none(),
            "memory budget for what clients make the node hold (--max-memory)"
        ),
    }
    let engine = Engine::new(EngineConfig {
        shards,
        history_size: config.history_size,
        history_max_bytes: config.history_max_bytes,
        history_ttl: config.history_ttl,
        max_channels: config.max_channels,
        max_memory,
        seed,
        presence: PresenceConfig {
            patterns: crate::transport::pusher::presence_patterns(&config),
            timeout: config.presence_timeout,
            max_members: config.presence_max_members,
            info_budget: config
                .presence_info_budget
                .unwrap_or_else(|| crate::limits::default_presence_info_budget(max_memory)),
        },
        slow_consumer: config.slow_consumer.clone(),
        idempotency_window: config.idempotency_window,
    });
    let engine = Arc::new(engine);
    let wakers = crate::backplane::Wakers::new(shards);
    let backplane = Arc::new(crate::backplane::memory::MemoryBackplane::new(
        engine.clone(),
        wakers.clone(),
    ));
    Node {
        backplane,
        ips: crate::limits::IpLimiter::new(config.max_connections_per_ip),
        api: crate::limits::ApiLimiter::new(
            config.api_rate_limit,
            config.api_key_rate_limit,
            config.api_key.len(),
            crate::types::now(),
        ),
        trusted: crate::proxy::TrustedProxies::new(&config.trusted_proxies),
        admin: crate::transport::admin::Admin::new(&config),
        load: (0..shards).map(|_| Default::default()).collect(),
        pusher: Arc::new(crate::transport::pusher::Registry::new(&config.pusher_app)),
        draining: Default::default(),
        webhooks: None,
        backend: None,
        users: Arc::new(crate::transport::users::UserControl::new(shards)),
        auth,
        tls,
        config,
        engine,
        wakers: wakers.0,
        shutdown: CancellationToken::new(),
    }
}

/// The backplane settings for the server at `url`.
fn backplane_settings(node: &Node, url: &str, seed: u64) -> crate::backplane::Settings {
    crate::backplane::Settings {
        url: url.to_owned(),
        history_size: node.config.history_size,
        history_ttl: node.config.history_ttl,
        node_id: node.config.node_id().to_owned(),
        seed,
        presence_timeout: node.config.presence_timeout,
        idempotency_window: node.config.idempotency_window,
    }
}

/// Starts the backplane the config names (`memory` needs nothing). Call once, before the
/// node is shared.
pub fn start_backplane(node: &mut Node, seed: u64) -> std::io::Result<()> {
    use crate::backplane::replica::Replica;
    use crate::backplane::{nats, redis, Settings, Wakers};
    use crate::config::BackplaneKind;
    type Start =
        fn(Settings, Arc<Engine>, Wakers, CancellationToken) -> std::io::Result<Arc<Replica>>;
    let (url, start): (&str, Start) = match node.config.backplane {
        BackplaneKind::Memory => return Ok(()),
        BackplaneKind::Redis => (&node.config.redis_url, redis::start),
        BackplaneKind::Nats => (&node.config.nats_url, nats::start),
    };
    let settings = backplane_settings(node, url, seed);
    node.backplane = start(
        settings,
        node.engine.clone(),
        Wakers(node.wakers.clone()),
        node.shutdown.clone(),
    )?;
    crate::transport::users::listen(node);
    Ok(())
}

/// Starts the webhook dispatcher for the `--webhook-url` hooks plus `extra` (hooks of
/// another format, e.g. a compatibility API's), its senders where `runs` says, and makes it
/// the engine's observer. Nothing without hooks. Call once, before the node is shared.
pub fn start_webhooks(
    node: &mut Node,
    extra: Vec<crate::webhooks::Hook>,
    seed: u64,
    runs: crate::webhooks::Runs,
) -> std::io::Result<()> {
    let format: Arc<dyn crate::webhooks::Format> = Arc::new(crate::webhooks::RelayFormat::new(
        node.config.webhook_secret.as_deref(),
    ));
    let mut hooks = Vec::new();
    for spec in &node.config.webhook_url {
        // Checked by `server::prepare` already.
        let spec = crate::webhooks::parse_hook_spec(spec).map_err(std::io::Error::other)?;
        hooks.push(crate::webhooks::Hook {
            url: spec.url,
            events: spec.events,
            channels: crate::webhooks::ChannelFilter {
                scope: None,
                patterns: spec.patterns,
            },
            format: format.clone(),
        });
    }
    hooks.extend(extra);
    if hooks.is_empty() {
        return Ok(());
    }
    let webhooks = crate::webhooks::Webhooks::start(
        hooks,
        webhook_settings(&node.config),
        node.config.node_id(),
        seed,
        node.shutdown.clone(),
        runs,
    )?;
    if node.backplane.agrees() {
        // In a cluster the backplane decides which node reports each event.
        let agreement = crate::webhooks::agree::Agreement::start(
            webhooks.clone(),
            node.engine.clone(),
            node.backplane.clone(),
            node.config.presence_timeout,
            node.shutdown.clone(),
        )?;
        node.engine.set_observer(agreement);
    } else {
        // One node (memory mode): every change it sees is an event.
        node.engine.set_observer(webhooks.clone());
    }
    node.webhooks = Some(webhooks);
    Ok(())
}

/// Starts refreshing the JWKS key set (`--jwt-jwks-url`) when the verifier has one. Call once.
pub fn start_jwks(node: &Node) -> std::io::Result<()> {
    if let (Some(set), Some(url)) = (
        node.auth.as_ref().and_then(|a| a.jwks()),
        node.config.jwt_jwks_url.as_deref(),
    ) {
        // Checked by `Config::problems` already.
        let url = url.parse().map_err(std::io::Error::other)?;
        crate::jwks::start(
            set.clone(),
            url,
            node.config.jwt_jwks_refresh,
            node.shutdown.clone(),
        )?;
    }
    Ok(())
}

/// The webhook dispatcher's settings from the node's config.
fn webhook_settings(c: &Config) -> crate::webhooks::Settings {
    crate::webhooks::Settings {
        batch_size: c.webhook_batch_size,
        batch_delay: c.webhook_batch_delay,
        timeout: c.webhook_timeout,
        max_attempts: c.webhook_max_attempts,
        queue_size: c.webhook_queue_size,
        retry_base: std::time::Duration::from_millis(100),
        retry_cap: c.webhook_retry_cap,
        shutdown_timeout: c.shutdown_timeout,
    }
}
