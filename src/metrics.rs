//! Prometheus metrics at `GET /metrics`, through the `metrics` facade with the Prometheus
//! exporter used as a recorder only (we serve the text ourselves).
//!
//! Handles are resolved once per shard ([`ShardMetrics`]): the hot path pays one atomic
//! operation per pump or per write, never a registry lookup, and never anything per subscriber.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls are no-ops).
pub fn install() {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("relay_frames_per_write".into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0, 1024.0],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
                        0.05, 0.1, 0.25, 0.5, 1.0,
                    ],
                )
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(e) => {
                tracing::warn!(error = %e, "metrics disabled");
                return None;
            }
        };
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only ours");
        }
        describe();
        Some(handle)
    });
}

/// What the engine counts, read when `/metrics` is scraped: the engine keeps plain atomics and
/// never calls into the registry, and this module knows no engine type (the transport that
/// serves `/metrics` fills this in).
#[derive(Clone, Debug, Default)]
pub struct EngineFigures {
    /// Bytes of the memory budget in use, by kind name.
    pub memory: Vec<(&'static str, usize)>,
    /// The memory budget, bytes.
    pub memory_limit: usize,
    /// The memory pressure level (0 normal, 1 evict, 2 refuse).
    pub memory_pressure: u8,
    /// The process's RSS at the budget's last sample (0: not sampled).
    pub memory_rss: usize,
    /// What the budget is held against: counted bytes plus what the last RSS sample held
    /// beyond them.
    pub memory_level: usize,
    /// Channels in the table.
    pub channels: usize,
    /// Presence info bytes of the node.
    pub presence_info_bytes: usize,
    /// History evictions (channels).
    pub evictions: u64,
    /// History bytes evicted.
    pub evicted_bytes: u64,
    /// Channels examined by expiry.
    pub expiry_checked: u64,
    /// Channels forgotten by expiry.
    pub channels_expired: u64,
    /// The most channels one tick examined.
    pub expiry_checked_max: u64,
}

/// The exposition text, or `None` when metrics are not installed. The engine's own counters
/// (memory by kind, channels, expiry, eviction) come as [`EngineFigures`], read then.
pub fn render(engine: impl FnOnce() -> EngineFigures) -> Option<String> {
    HANDLE.get().and_then(|h| h.as_ref()).map(|h| {
        observe(&engine());
        h.run_upkeep();
        h.render()
    })
}

/// Moves the histogram samples recorded since the last call into their buckets. The exporter
/// keeps every sample in a growing list until then, so without a scrape it would grow by a few
/// bytes per socket write forever (hundreds of MB under load): shard 0 calls this every second,
/// which bounds the list to one second of samples whether or not anyone scrapes.
pub fn upkeep() {
    if let Some(h) = HANDLE.get().and_then(|h| h.as_ref()) {
        h.run_upkeep();
    }
}

fn observe(e: &EngineFigures) {
    for &(kind, bytes) in &e.memory {
        gauge!("relay_memory_bytes", "kind" => kind).set(bytes as f64);
    }
    gauge!("relay_memory_limit_bytes").set(e.memory_limit as f64);
    gauge!("relay_memory_pressure").set(f64::from(e.memory_pressure));
    gauge!("relay_memory_rss_bytes").set(e.memory_rss as f64);
    gauge!("relay_memory_level_bytes").set(e.memory_level as f64);
    gauge!("relay_channels").set(e.channels as f64);
    gauge!("relay_presence_info_bytes").set(e.presence_info_bytes as f64);
    counter!("relay_history_evictions_total").absolute(e.evictions);
    counter!("relay_history_evicted_bytes_total").absolute(e.evicted_bytes);
    counter!("relay_expiry_checked_total").absolute(e.expiry_checked);
    counter!("relay_channels_expired_total").absolute(e.channels_expired);
    gauge!("relay_expiry_checked_per_tick_max").set(e.expiry_checked_max as f64);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "relay_connections",
        "Open client connections, by transport (ws, sse)."
    );
    describe_gauge!(
        "relay_subscriptions",
        "Channel subscriptions of open connections."
    );
    describe_counter!(
        "relay_messages_published_total",
        "Messages published (HTTP API and WebSocket)."
    );
    describe_counter!(
        "relay_messages_delivered_total",
        "Frames queued to subscribers (messages, presence events, notices)."
    );
    describe_counter!(
        "relay_messages_skipped_total",
        "Messages skipped for slow subscribers under the drop or conflate policy."
    );
    describe_counter!(
        "relay_slow_consumers_total",
        "Connections closed (WebSocket 4008) or ended (SSE) as slow consumers."
    );
    describe_counter!(
        "relay_bytes_written_total",
        Unit::Bytes,
        "Bytes written to WebSocket clients."
    );
    describe_gauge!(
        "relay_parked_sessions",
        "Idle WebSocket sessions parked off the runtime (no task, no runtime I/O registration); counted in relay_connections too."
    );
    describe_counter!(
        "relay_direct_writes_total",
        "Socket writes a fan-out pass made itself, for WebSocket connections whose writer was idle."
    );
    describe_counter!(
        "relay_writer_wakes_total",
        "Connection tasks a fan-out pass woke to write (direct writes that left data included)."
    );
    describe_histogram!(
        "relay_frames_per_write",
        "Frames (WebSocket) or events (SSE) coalesced into one socket write."
    );
    describe_histogram!(
        "relay_fanout_latency_seconds",
        Unit::Seconds,
        "From publish to queued on subscribers' outboxes (oldest message of each fan-out pass)."
    );
    describe_counter!(
        "relay_protocol_errors_total",
        "WebSocket connections closed for breaking RFC 6455."
    );
    describe_gauge!(
        "relay_backplane_up",
        "1 while the backplane (redis) is connected, 0 while it is down or reconnecting."
    );
    describe_counter!(
        "relay_backplane_reconnects_total",
        "Connections to the backplane made again after a loss."
    );
    describe_counter!(
        "relay_backplane_resyncs_total",
        "Channel syncs with the backplane (joins, gaps, reconnects)."
    );
    describe_histogram!(
        "relay_backplane_publish_seconds",
        Unit::Seconds,
        "Time to sequence one publish in the backplane (one round trip)."
    );
    describe_counter!(
        "relay_connections_total",
        "Connections accepted, by transport."
    );
    describe_counter!(
        "relay_refused_total",
        "Refusals by cause: ip_limit, handshake_timeout, header_too_large, message_too_large, \
         rate_limited, rate_closed, origin, unauthorized, forbidden, token_expired, \
         too_many_subscriptions, tls, memory, max_channels, presence_info."
    );
    describe_gauge!(
        "relay_memory_bytes",
        Unit::Bytes,
        "What clients made the node hold, by kind: history (payload + per-message overhead), \
         presence (members, events), channels, outbox (queued frames; a frame shared by several \
         outboxes counts once), responses (API answers not yet sent), connections (open \
         connections and subscriptions at an estimated cost each)."
    );
    describe_gauge!(
        "relay_memory_limit_bytes",
        Unit::Bytes,
        "The memory budget (--max-memory); 0: none."
    );
    describe_gauge!(
        "relay_memory_rss_bytes",
        Unit::Bytes,
        "The process's resident memory at the memory budget's last sample (every 100 ms, \
         --rss-floor); 0: not sampled."
    );
    describe_gauge!(
        "relay_memory_level_bytes",
        Unit::Bytes,
        "What the memory budget is held against: the bytes counted by kind plus what the last \
         RSS sample held beyond them."
    );
    describe_gauge!(
        "relay_memory_pressure",
        "0 normal, 1 evicting history (over 85 % of the budget), 2 refusing (over the budget)."
    );
    describe_gauge!("relay_channels", "Channels on the node.");
    describe_gauge!(
        "relay_presence_info_bytes",
        Unit::Bytes,
        "Presence info of every member of the node (--presence-info-budget)."
    );
    describe_counter!(
        "relay_history_evictions_total",
        "Channels whose history was evicted under memory pressure."
    );
    describe_counter!(
        "relay_history_evicted_bytes_total",
        Unit::Bytes,
        "History bytes evicted under memory pressure."
    );
    describe_counter!(
        "relay_expiry_checked_total",
        "Channels examined by the expiry queue."
    );
    describe_counter!(
        "relay_channels_expired_total",
        "Idle channels forgotten by the expiry queue."
    );
    describe_gauge!(
        "relay_expiry_checked_per_tick_max",
        "The most channels one expiry tick examined (bounded, whatever the channel count)."
    );
    describe_counter!(
        "relay_messages_joined_total",
        "Messages a fan-out pass queued for a subscriber in one entry with the pass's other messages of their channel (a run: for WebSocket, their frames joined in one buffer)."
    );
    describe_counter!(
        "relay_messages_replayed_total",
        "Messages queued from resume replays (paged out of history as outboxes drain)."
    );
    describe_counter!(
        "relay_webhook_events_sent_total",
        "Webhook events a receiver accepted (2xx)."
    );
    describe_counter!(
        "relay_webhook_retries_total",
        "Webhook POSTs tried again after a failure."
    );
    describe_counter!(
        "relay_webhook_events_dropped_total",
        "Webhook events dropped, by reason (queue_full, attempts)."
    );
    describe_histogram!(
        "relay_webhook_post_seconds",
        Unit::Seconds,
        "Time of an accepted webhook POST."
    );
    describe_counter!(
        "relay_proxy_requests_total",
        "Backend proxy requests by kind (connect, subscribe, publish) and result (allow, deny, disconnect, timeout, status, error, bad_answer, overloaded)."
    );
    describe_histogram!(
        "relay_proxy_seconds",
        Unit::Seconds,
        "Time of a backend proxy POST, by kind."
    );
    describe_histogram!(
        "relay_webhook_latency_seconds",
        Unit::Seconds,
        "From a webhook event to its acceptance by the receiver."
    );
}

/// One shard's open connections and subscriptions, readable by any thread (the admin UI's
/// shard table): the registry's gauges are summed over the shards and cannot be read back.
/// Moved once per connection or subscription, never per message.
#[derive(Default)]
pub struct ShardLoad {
    /// Open WebSocket connections.
    pub ws: std::sync::Arc<AtomicI64>,
    /// Open SSE streams.
    pub sse: std::sync::Arc<AtomicI64>,
    /// Subscriptions of open connections.
    pub subscriptions: std::sync::Arc<AtomicI64>,
}

/// A registry gauge that also keeps its shard's count in a [`ShardLoad`] field.
pub struct LoadGauge {
    gauge: Gauge,
    count: std::sync::Arc<AtomicI64>,
}

impl LoadGauge {
    fn new(gauge: Gauge, count: &std::sync::Arc<AtomicI64>) -> Self {
        Self {
            gauge,
            count: count.clone(),
        }
    }

    /// Adds `n`.
    pub fn increment(&self, n: f64) {
        self.gauge.increment(n);
        self.count.fetch_add(n as i64, Relaxed);
    }

    /// Subtracts `n`.
    pub fn decrement(&self, n: f64) {
        self.gauge.decrement(n);
        self.count.fetch_sub(n as i64, Relaxed);
    }
}

/// One shard's resolved handles.
pub struct ShardMetrics {
    /// Open WebSocket connections.
    pub ws_connections: LoadGauge,
    /// Open SSE streams.
    pub sse_connections: LoadGauge,
    /// WebSocket sessions parked off the runtime (counted in `ws_connections` too).
    pub parked: Gauge,
    /// WebSocket connections accepted.
    pub ws_accepted: Counter,
    /// SSE streams opened.
    pub sse_accepted: Counter,
    /// Subscriptions.
    pub subscriptions: LoadGauge,
    /// Messages published.
    pub published: Counter,
    /// Frames queued to subscribers.
    pub delivered: Counter,
    /// Messages skipped (drop/conflate).
    pub skipped: Counter,
    /// Slow consumers cut off.
    pub slow: Counter,
    /// Bytes written to WebSocket clients.
    pub bytes_written: Counter,
    /// Frames per vectored write.
    pub frames_per_write: Histogram,
    /// Writes a fan-out pass made itself.
    pub direct_writes: Counter,
    /// Writers a fan-out pass woke.
    pub writer_wakes: Counter,
    /// Publish → queued latency.
    pub fanout_latency: Histogram,
    /// Protocol violations.
    pub protocol_errors: Counter,
    /// Messages replayed for resumes.
    pub replayed: Counter,
    /// Messages queued joined with others of their channel.
    pub joined: Counter,
}

impl ShardMetrics {
    /// Resolves the handles (no-ops when no recorder is installed), with counts of their own.
    pub fn new() -> Self {
        Self::with_load(&ShardLoad::default())
    }

    /// Resolves the handles; the connection and subscription gauges also count into `load`.
    pub fn with_load(load: &ShardLoad) -> Self {
        Self {
            ws_connections: LoadGauge::new(
                gauge!("relay_connections", "transport" => "ws"),
                &load.ws,
            ),
            sse_connections: LoadGauge::new(
                gauge!("relay_connections", "transport" => "sse"),
                &load.sse,
            ),
            parked: gauge!("relay_parked_sessions"),
            ws_accepted: counter!("relay_connections_total", "transport" => "ws"),
            sse_accepted: counter!("relay_connections_total", "transport" => "sse"),
            subscriptions: LoadGauge::new(gauge!("relay_subscriptions"), &load.subscriptions),
            published: counter!("relay_messages_published_total"),
            delivered: counter!("relay_messages_delivered_total"),
            skipped: counter!("relay_messages_skipped_total"),
            slow: counter!("relay_slow_consumers_total"),
            bytes_written: counter!("relay_bytes_written_total"),
            frames_per_write: histogram!("relay_frames_per_write"),
            direct_writes: counter!("relay_direct_writes_total"),
            writer_wakes: counter!("relay_writer_wakes_total"),
            fanout_latency: histogram!("relay_fanout_latency_seconds"),
            protocol_errors: counter!("relay_protocol_errors_total"),
            replayed: counter!("relay_messages_replayed_total"),
            joined: counter!("relay_messages_joined_total"),
        }
    }

    /// Records a pump or flush.
    pub fn pumped(&self, st: &impl Pumped) {
        let (deliveries, skipped, replayed) = (st.deliveries(), st.skipped(), st.replayed());
        if deliveries > 0 {
            self.delivered.increment(deliveries as u64);
        }
        if skipped > 0 {
            self.skipped.increment(skipped as u64);
        }
        if replayed > 0 {
            self.replayed.increment(replayed as u64);
        }
        let joined = st.joined();
        if joined > 0 {
            self.joined.increment(joined as u64);
        }
        if let Some(age) = st.oldest_age() {
            self.fanout_latency.record(age.as_secs_f64());
        }
    }
}

/// What a pump or flush reports (the engine's `hub::PumpStats`, whose impl is in `transport`:
/// this module knows no engine type).
pub trait Pumped {
    /// Frames queued to subscribers.
    fn deliveries(&self) -> usize;
    /// Messages skipped under the `drop` or `conflate` policy.
    fn skipped(&self) -> usize;
    /// Messages queued from resume replays.
    fn replayed(&self) -> usize;
    /// Messages queued joined with others of their channel in one entry.
    fn joined(&self) -> usize;
    /// Age of the oldest publication pulled, if any.
    fn oldest_age(&self) -> Option<std::time::Duration>;
}

impl Default for ShardMetrics {
    fn default() -> Self {
        Self::new()
    }
}
