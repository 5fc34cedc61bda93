//! relay: an ultra-low-latency real-time edge relay.
//!
//! # Layout
//! In layer order: each module imports only those above it in this list (`tests/layering.rs`).
//! - [`types`]: leaf values below every other module (channel names, epochs, positions,
//!   publications and presence events, shard masks, permission rules).
//! - [`protocol`]: sans-IO wire codecs: WebSocket framing, JSON commands and events, binary,
//!   SSE.
//! - [`engine`]: sans-IO sequencing, history and fan-out bookkeeping: the shared channel table
//!   (`mod.rs`), publish and history (`history.rs`), replica ingest (`ingest.rs`), presence
//!   (`presence.rs`), expiry and eviction (`expiry.rs`), the per-shard hub and bounded outboxes.
//! - [`backplane`]: where sequencing happens when several nodes serve the same channels
//!   (memory; Redis and NATS through one replica layer).
//! - [`config`]: the settings, from flags, environment and TOML file; plain data.
//! - [`auth`]: JWT verification and channel grants (pure: the server reads the key files).
//! - [`jwks`]: verification keys fetched from a JWKS URL, cached by `kid`, refreshed.
//! - [`limits`]: connections per client address (shared by the shards), per-connection and
//!   HTTP API rate limits, the refusal counter, and the throttled accept error log.
//! - [`proxy`]: the client behind load balancers: PROXY protocol headers, trusted
//!   `X-Forwarded-For` / `Forwarded`.
//! - [`tls`]: rustls server config with ALPN, swapped on SIGHUP.
//! - [`metrics`]: Prometheus metrics, resolved per shard.
//! - [`tools`]: `relay gentoken`, `check-config` and `genconfig` (token claims and signing,
//!   the effective settings with secrets masked, a config with fresh secrets).
//! - [`webhooks`]: POSTs to the application's backend when channels are occupied or vacated
//!   and members come and go (batched, signed, retried), and the outbound HTTP client.
//! - [`backend`]: the backend proxy: connect, subscribe and publish decisions POSTed to the
//!   application (timeouts, failure policy, a bound on requests in flight).
//! - [`transport`]: hyper services over the engine: `/ws`, `/sse`, `/api`, Pusher `/app`,
//!   `/admin`, health; the transports never import one another.
//! - [`server`]: the composition root (`compose`) and per-core shards (pinned
//!   `current_thread` runtimes with `SO_REUSEPORT` listeners), wake-ups and graceful shutdown.
//!
//! See `docs/ARCHITECTURE.md` for the invariants; `tests/layering.rs` holds the dependency
//! rules.

pub mod auth;
pub mod backend;
pub mod backplane;
pub mod config;
pub mod engine;
pub mod jwks;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod tools;
pub mod transport;
pub mod types;
pub mod webhooks;
