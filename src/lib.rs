//! relay: an ultra-low-latency real-time edge relay.
//!
//! # Layout
//! - [`types`]: leaf values (channel names, epochs, positions).
//! - [`backplane`]: where sequencing happens when several nodes serve the same channels
//!   (memory; Redis and NATS through one replica layer).
//! - [`engine`]: sans-IO sequencing, history and fan-out bookkeeping (shared channel table +
//!   per-shard hub + bounded outboxes).
//! - [`protocol`]: sans-IO wire codecs: WebSocket framing, JSON commands and events, SSE.
//! - [`config`]: the settings, from flags, environment and TOML file.
//! - [`auth`]: JWT verification and channel grants (pure).
//! - [`limits`]: connections per IP (shared by the shards), per-connection rate limit, and
//!   the refusal counter.
//! - [`tls`]: rustls server config with ALPN, swapped on SIGHUP.
//! - [`metrics`]: Prometheus metrics, resolved per shard.
//! - [`transport`]: hyper services over the engine: `/ws`, `/sse`, `/api`, health.
//! - [`server`]: per-core shards (pinned `current_thread` runtimes with `SO_REUSEPORT`
//!   listeners), wake-ups and graceful shutdown.
//!
//! See `docs/ARCHITECTURE.md` for the invariants.

pub mod auth;
pub mod backplane;
pub mod config;
pub mod engine;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod tls;
pub mod transport;
pub mod types;
