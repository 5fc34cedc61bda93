//! relay: an ultra-low-latency real-time edge relay.
//!
//! # Layout
//! - [`types`]: leaf values below every other module (channel names, epochs, positions,
//!   publications and presence events, shard masks, permission rules).
//! - [`backplane`]: where sequencing happens when several nodes serve the same channels
//!   (memory; Redis and NATS through one replica layer).
//! - [`engine`]: sans-IO sequencing, history and fan-out bookkeeping (shared channel table +
//!   per-shard hub + bounded outboxes).
//! - [`protocol`]: sans-IO wire codecs: WebSocket framing, JSON commands and events, SSE.
//! - [`config`]: the settings, from flags, environment and TOML file.
//! - [`auth`]: JWT verification and channel grants (pure).
//! - [`limits`]: connections per client address (shared by the shards), per-connection and
//!   HTTP API rate limits, the refusal counter, and the throttled accept error log.
//! - [`proxy`]: the client behind load balancers: PROXY protocol headers, trusted
//!   `X-Forwarded-For` / `Forwarded`.
//! - [`tls`]: rustls server config with ALPN, swapped on SIGHUP.
//! - [`metrics`]: Prometheus metrics, resolved per shard.
//! - [`transport`]: hyper services over the engine: `/ws`, `/sse`, `/api`, health.
//! - [`tools`]: `relay gentoken`, `check-config` and `genconfig` (token claims and signing,
//!   the effective settings with secrets masked, a config with fresh secrets).
//! - [`server`]: the composition root and per-core shards (pinned `current_thread` runtimes
//!   with `SO_REUSEPORT` listeners), wake-ups and graceful shutdown.
//!
//! See `docs/ARCHITECTURE.md` for the invariants; `tests/layering.rs` holds the dependency
//! rules.

pub mod auth;
pub mod backplane;
pub mod config;
pub mod engine;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod tools;
pub mod transport;
pub mod types;
