//! Wires everything: binds the shards' listeners, starts one pinned thread per shard, and
//! shuts down gracefully.
//!
//! - [`start`] takes a [`Config`], reads the JWT key and TLS files it names, binds
//!   `--listen` once per shard and returns a [`ServerHandle`] once every shard is listening
//!   (`main.rs` uses it).
//! - [`run`] serves on listeners the caller bound until a shutdown future completes
//!   (in-process servers and tests: bind port 0, read the address, run); [`start_on`] is its
//!   handle-returning form.
//! - [`compose`]: the composition root, which builds the shared [`Node`].
//! - [`shard`]: the per-core runtime, accept loop, fan-out pump and sweep.
//! - [`listener`]: `SO_REUSEPORT` sockets.

pub mod compose;
mod front;
pub mod listener;
pub mod shard;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{Config, ConfigError};
use crate::transport::Node;
use crate::webhooks::Runs;

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file a setting names cannot be used: a JWT public key, the TLS certificate or key.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding a listener or starting a thread failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A running server.
pub struct ServerHandle {
    local_addr: SocketAddr,
    node: Arc<Node>,
    threads: Vec<JoinHandle<()>>,
}

/// Reads the key and certificate files, then binds and starts every shard.
pub fn start(config: Config) -> Result<ServerHandle, StartError> {
    crate::metrics::install();
    // Before anything is bound: a bad file stops the start, so the node never serves without
    // auth or in clear text by mistake.
    let (auth, tls) = prepare(&config).map_err(|mut e| e.swap_remove(0))?;
    let listeners = listener::bind_shards(config.listen, config.effective_shards())?;
    launch(config, listeners, auth, tls)
}

/// Serves `config` on `listeners`, bound by the caller (one per shard: their number is the
/// number of shards; in-process servers and tests pass one bound to port 0), until
/// `shutdown` completes; then shuts down gracefully (WebSocket 1012, SSE `retry:`, up to
/// `--shutdown-timeout`) and returns once every shard has finished. `--listen` and `--shards`
/// are not used. A bad key or certificate file, or a listener that cannot be used, is an
/// error before anything is served.
pub async fn run(
    config: Config,
    listeners: Vec<std::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let handle = start_on(config, listeners)?;
    shutdown.await;
    handle.shutdown();
    // The shards are threads: wait for them off the caller's runtime.
    let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    Ok(())
}

/// [`start`] on listeners bound by the caller (see [`run`]).
pub fn start_on(
    config: Config,
    listeners: Vec<std::net::TcpListener>,
) -> Result<ServerHandle, StartError> {
    crate::metrics::install();
    let (auth, tls) = prepare(&config).map_err(|mut e| e.swap_remove(0))?;
    if listeners.is_empty() || listeners.len() > crate::types::MAX_SHARDS {
        return Err(StartError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "1 to {} listeners (one per shard), not {}",
                crate::types::MAX_SHARDS,
                listeners.len()
            ),
        )));
    }
    for l in &listeners {
        // The shards register them with their runtimes, which need them non-blocking.
        l.set_nonblocking(true)?;
    }
    launch(config, listeners, auth, tls)
}

/// Builds the node and starts one shard thread per listener.
fn launch(
    config: Config,
    listeners: Vec<std::net::TcpListener>,
    auth: Option<crate::auth::Auth>,
    tls: Option<Arc<crate::tls::Tls>>,
) -> Result<ServerHandle, StartError> {
    let shards = listeners.len();
    let local_addr = listeners[0].local_addr()?;
    if let Some(cap) = listener::somaxconn().filter(|&cap| cap < config.listen_backlog) {
        // Not an error: the listeners work, but a fleet arriving at once overflows sooner
        // than the operator planned (its clients retry their SYN after a second).
        tracing::warn!(
            listen_backlog = config.listen_backlog,
            somaxconn = cap,
            "the kernel caps each listener's backlog at net.core.somaxconn, below \
             --listen-backlog; raise it (sysctl -w net.core.somaxconn=N) for a fleet that \
             reconnects at once"
        );
    }
    // Before the shards accept: a table that grows under arriving connections stalls every
    // accept of the node for an RCU grace period at each doubling (see the function).
    match crate::limits::reserve_descriptors() {
        Ok(slots) => tracing::debug!(slots, "file descriptor table sized"),
        Err(e) => tracing::warn!(error = %e, "cannot size the file descriptor table at start"),
    }
    let node = build_node(config, shards, auth, tls, Runs::OwnThread)?;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let pin = shards <= cores.len();
    // Every shard's runtime (its epoll and timer descriptors) exists before any shard serves:
    // a node short of file descriptors fails to start instead of serving on some shards while
    // the kernel keeps sending connections to the listeners of the others.
    let runtimes = (0..shards)
        .map(|_| shard::runtime())
        .collect::<Result<Vec<_>, _>>()
        .inspect_err(|_| node.shutdown.cancel())?;
    let mut threads = Vec::with_capacity(shards);
    for (i, (l, rt)) in listeners.into_iter().zip(runtimes).enumerate() {
        let node = node.clone();
        let core = if pin { cores.get(i).copied() } else { None };
        threads.push(
            std::thread::Builder::new()
                .name(format!("relay-shard-{i}"))
                .spawn(move || shard::run(node, i, l, rt, core))?,
        );
    }
    Ok(ServerHandle {
        local_addr,
        node,
        threads,
    })
}

/// The shared node of `shards` shards, with what the settings name started (the webhook
/// senders where `runs` says).
fn build_node(
    config: Config,
    shards: usize,
    auth: Option<crate::auth::Auth>,
    tls: Option<Arc<crate::tls::Tls>>,
    runs: Runs,
) -> Result<Arc<Node>, StartError> {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()).rotate_left(32);
    crate::protocol::deflate::set_min_size(config.deflate_min_size);
    let mut node = compose::node(config, shards, seed, auth, tls);
    compose::start_backplane(&mut node, seed)?;
    // Checked by `prepare` already.
    let pusher_hooks =
        crate::transport::pusher::webhooks(&node.config).map_err(std::io::Error::other)?;
    compose::start_webhooks(&mut node, pusher_hooks, seed, runs)?;
    compose::start_jwks(&node)?;
    node.backend = crate::backend::Proxy::from_config(&node.config)?.map(Arc::new);
    let node = Arc::new(node);
    crate::transport::admin::announce(&node)?;
    Ok(node)
}

/// The test mode of [`run`]: one shard served on the caller's runtime (a `current_thread`
/// one: the shard's tasks are `!Send` and run in a `LocalSet` here) instead of on a thread of
/// its own, until `shutdown` completes. Its timers are the caller's, so a test that pauses
/// tokio's clock (`start_paused`, `tokio::time::pause`) drives the sessions' timeouts
/// (auth, keep-alive, close grace) and the webhook senders' (batching window, retry backoff)
/// without waiting for them. Production never uses it: a shard there is a pinned thread with
/// its own runtime, and so are the webhook senders.
pub async fn run_here(
    config: Config,
    listener: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    crate::metrics::install();
    let (auth, tls) = prepare(&config).map_err(|mut e| e.swap_remove(0))?;
    listener.set_nonblocking(true)?;
    let node = build_node(config, 1, auth, tls, Runs::Here)?;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let shard = tokio::task::spawn_local(shard::serve(node.clone(), 0, listener));
            shutdown.await;
            node.shutdown.cancel();
            let _ = shard.await;
        })
        .await;
    Ok(())
}

/// What the server checks before it starts, beyond [`Config::problems`] (plain data: it
/// reads no file and knows no lower module's grammar), as [`start`] does: the settings written
/// in a lower module's grammar, parsed by that module (`--redis-url`, `--webhook-url`,
/// `--pusher-webhook`), and the JWT keys and the TLS certificate and key read from their
/// files. Every problem, not only the first (`relay check-config` lists them all).
#[allow(clippy::type_complexity)]
pub fn prepare(
    config: &Config,
) -> Result<(Option<crate::auth::Auth>, Option<Arc<crate::tls::Tls>>), Vec<ConfigError>> {
    let mut problems = grammar_problems(config);
    match read_files(config) {
        Ok(files) if problems.is_empty() => Ok(files),
        Ok(_) => Err(problems),
        Err(more) => {
            problems.extend(more);
            Err(problems)
        }
    }
}

/// The settings of a lower module's grammar that do not parse.
fn grammar_problems(config: &Config) -> Vec<ConfigError> {
    let invalid = |key, reason: String| ConfigError::Invalid { key, reason };
    let mut problems = Vec::new();
    if matches!(config.backplane, crate::config::BackplaneKind::Redis) {
        // One server, a cluster or Sentinels, as fred takes them.
        if let Err(e) = crate::backplane::redis::Target::parse(&config.redis_url) {
            problems.push(invalid("redis_url", e));
        }
    }
    for url in &config.webhook_url {
        if let Err(e) = crate::webhooks::parse_hook_spec(url) {
            problems.push(invalid("webhook_url", e));
        }
    }
    // A hook naming no app is the config's own problem, listed once by `Config::problems`.
    if config.pusher_webhooks().is_ok() {
        if let Err(e) = crate::transport::pusher::webhooks(config) {
            problems.push(invalid("pusher_webhook", e));
        }
    }
    problems
}

/// Reads and checks the JWT keys and the TLS certificate and key that `config` names.
#[allow(clippy::type_complexity)]
fn read_files(
    config: &Config,
) -> Result<(Option<crate::auth::Auth>, Option<Arc<crate::tls::Tls>>), Vec<ConfigError>> {
    let invalid = |key, e: &dyn std::fmt::Display| ConfigError::Invalid {
        key,
        reason: e.to_string(),
    };
    let auth = read_public_keys(config)
        .and_then(|pems| crate::auth::Auth::new(config, &pems))
        .map_err(|e| invalid("jwt", &e));
    let tls = crate::tls::Tls::from_config(config).map_err(|e| invalid("tls", &e));
    match (auth, tls) {
        (Ok(auth), Ok(tls)) => Ok((auth, tls)),
        (auth, tls) => Err(auth.err().into_iter().chain(tls.err()).collect()),
    }
}

/// The contents of the `--jwt-public-key` files.
fn read_public_keys(
    config: &Config,
) -> Result<Vec<(std::path::PathBuf, Vec<u8>)>, crate::auth::AuthSetupError> {
    config
        .jwt_public_key
        .iter()
        .map(|path| match std::fs::read(path) {
            Ok(pem) => Ok((path.clone(), pem)),
            Err(source) => Err(crate::auth::AuthSetupError::Read {
                path: path.clone(),
                source,
            }),
        })
        .collect()
}

impl ServerHandle {
    /// The address every shard listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Reloads the TLS certificate and key from their files: new connections get them, open
    /// ones keep theirs. A no-op without TLS; on error the old ones stay.
    pub fn reload_tls(&self) -> Result<(), crate::tls::TlsError> {
        match &self.node.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// Starts the drain period: `/readyz` answers 503 (so that load balancers stop sending new
    /// clients) while everything else is served as usual; [`ServerHandle::shutdown`] ends it.
    pub fn drain(&self) {
        self.node.drain();
    }

    /// Starts the graceful shutdown: stop accepting, close WebSockets with 1012, end SSE
    /// streams. Returns at once; [`ServerHandle::join`] waits for the end.
    pub fn shutdown(&self) {
        self.node.shutdown.cancel();
    }

    /// Waits for every shard to finish (after [`ServerHandle::shutdown`]).
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a shard thread panicked");
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.node.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn problems(args: &[&str]) -> Vec<String> {
        let config = Config::from_args(args).unwrap();
        match prepare(&config) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn settings_of_a_modules_grammar_are_parsed_before_the_start_every_one_named() {
        let found = problems(&[
            "--backplane=redis",
            "--redis-url=rediss://r:6379",
            "--webhook-url=channel_ocupied@http://a/h",
            "--pusher-app=app1:key1:secret-one-1234",
            "--pusher-webhook=app1:nope@http://h/w",
            "--tls-cert=/nonexistent/cert.pem",
            "--tls-key=/nonexistent/key.pem",
        ]);
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(found[0].starts_with("invalid redis_url: TLS"), "{found:?}");
        assert!(found[1].starts_with("invalid webhook_url: unknown webhook event"));
        assert!(
            found[2].starts_with("invalid pusher_webhook: app app1: unknown webhook event"),
            "{found:?}"
        );
        assert!(found[3].contains("/nonexistent/cert.pem"), "{found:?}");
        // The URL of a Redis the node does not use is not its concern.
        assert!(problems(&["--redis-url=rediss://r:6379"]).is_empty());
        assert!(problems(&[
            "--backplane=redis",
            "--redis-url=redis-cluster://a:7000,b:7001",
            "--webhook-url=member_added;presence:*@https://app.example/h",
        ])
        .is_empty());
    }
}
