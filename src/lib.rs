//! relay: an ultra-low-latency real-time edge relay.
//!
//! # Layout
//! - [`types`]: leaf values (channel names, epochs, positions).
//! - [`engine`]: sans-IO sequencing, history and fan-out bookkeeping (shared channel table +
//!   per-shard hub + bounded outboxes).
//! - [`protocol`]: sans-IO wire codecs: WebSocket framing, JSON commands and events, SSE.
//! - [`config`]: the settings, from flags, environment and TOML file.
//! - [`transport`]: hyper services over the engine: `/ws`, `/sse`, `/api`, health.
//! - [`server`]: per-core shards (pinned `current_thread` runtimes with `SO_REUSEPORT`
//!   listeners), wake-ups and graceful shutdown.
//!
//! See `docs/ARCHITECTURE.md` for the invariants.

pub mod config;
pub mod engine;
pub mod protocol;
pub mod server;
pub mod transport;
pub mod types;
