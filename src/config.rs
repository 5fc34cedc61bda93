//! Settings: `relay serve` flags, `RELAY_*` environment variables and a TOML file, with
//! precedence flag > env > file > default. Plain data plus validation; reads no files (`main`
//! reads the TOML file, the server reads key and certificate files when it starts) and names
//! no module but `types`: a setting written in a lower module's grammar (`--redis-url`,
//! `--webhook-url`) is kept as a string and parsed by the server (`server::prepare`).
//!
//! Every setting is written once, as one field of [`Config`]: its name (`--history-size`,
//! `RELAY_HISTORY_SIZE`, file key `history_size`), type, parser, default and `--help` text. A
//! file value goes through the same parser as the flag, so `64KiB` or `5m` mean the same
//! everywhere.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};

use crate::types::{Rule, SlowPolicy, TrustedNet};
// A size parser every layer may use (a Pusher app's `max_event_bytes` too); its old path.
pub use crate::types::parse_bytes;

/// Every setting of a node. The doc comment of a field is its `--help` text.
///
/// To add a setting, add a field here: `#[arg(long, env = "RELAY_<NAME>", value_name = …,
/// default_value = …)]`, a parser (`value_parser = parse_duration` or `parse_bytes`) for
/// durations and sizes, and a check in [`Config::validate`] when it has a range. The flag, the
/// variable and the file key follow from that field; list it in `deploy/relay.toml` and in
/// README's table.
///
/// `Serialize` is for `relay check-config`, which prints the effective settings (see
/// `crate::tools::effective_toml`): a new field's type must be `Serialize` too.
#[derive(Clone, Debug, PartialEq, clap::Args, serde::Serialize)]
pub struct Config {
    /// Address to listen on: IP:PORT, `localhost:PORT` (127.0.0.1), `:PORT` or `*:PORT` (every
    /// interface, 0.0.0.0), or a bare PORT (127.0.0.1).
    #[arg(long, env = "RELAY_LISTEN", value_name = "ADDR", value_parser = parse_listen, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Shards: threads, each with its own runtime and SO_REUSEPORT listener, pinned to a core;
    /// 0 for one per usable core.
    #[arg(long, env = "RELAY_SHARDS", value_name = "N", default_value_t = 0)]
    pub shards: usize,
    /// API key for /api/* (repeatable; comma-separated in RELAY_API_KEY). Without any, the API
    /// is open.
    #[arg(long, env = "RELAY_API_KEY", value_name = "KEY", value_delimiter = ',')]
    pub api_key: Vec<String>,
    /// Messages kept per channel for resume and history.
    #[arg(
        long,
        env = "RELAY_HISTORY_SIZE",
        value_name = "N",
        default_value_t = 1000
    )]
    pub history_size: usize,
    /// How long a message stays in history, e.g. 300s, 5m.
    #[arg(long, env = "RELAY_HISTORY_TTL", value_name = "DURATION", value_parser = parse_duration, default_value = "300s")]
    pub history_ttl: Duration,
    /// Largest inbound WebSocket message or HTTP body, e.g. 65536, 64KiB.
    #[arg(long, env = "RELAY_MAX_MESSAGE_SIZE", value_name = "BYTES", value_parser = parse_bytes, default_value = "64KiB")]
    pub max_message_size: usize,
    /// Most channels per connection.
    #[arg(
        long,
        env = "RELAY_MAX_SUBSCRIPTIONS",
        value_name = "N",
        default_value_t = 128
    )]
    pub max_subscriptions: usize,
    /// Bytes queued for one connection before it is closed as a slow consumer (4008); at least 4KiB, under 4GiB.
    #[arg(long, env = "RELAY_MAX_OUTBOX_BYTES", value_name = "BYTES", value_parser = parse_bytes, default_value = "1MiB")]
    pub max_outbox_bytes: usize,
    /// How long shutdown waits for clients to go.
    #[arg(long, env = "RELAY_SHUTDOWN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub shutdown_timeout: Duration,
    /// Ping a WebSocket client after this long without traffic.
    #[arg(long, env = "RELAY_PING_INTERVAL", value_name = "DURATION", value_parser = parse_duration, default_value = "25s")]
    pub ping_interval: Duration,
    /// Close a WebSocket client after this long without traffic (1001).
    #[arg(long, env = "RELAY_IDLE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "60s")]
    pub idle_timeout: Duration,
    /// Move a plain-TCP WebSocket session that has been quiet this long (no input, nothing to
    /// write) off the runtime into its shard's parking lot, where it holds no task and no
    /// runtime I/O registration until something happens (0: never).
    #[arg(long, env = "RELAY_WS_PARK_AFTER", value_name = "DURATION", value_parser = parse_duration, default_value = "250ms")]
    pub ws_park_after: Duration,
    /// SSE keep-alive comment period.
    #[arg(long, env = "RELAY_SSE_KEEPALIVE", value_name = "DURATION", value_parser = parse_duration, default_value = "15s")]
    pub sse_keepalive: Duration,
    /// Offer permessage-deflate (RFC 7692) to WebSocket clients that ask for it: messages over
    /// `--deflate-min-size` go out compressed once per message and shared by every subscriber.
    #[arg(long, env = "RELAY_PERMESSAGE_DEFLATE", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = true)]
    pub permessage_deflate: bool,
    /// Messages shorter than this go out uncompressed to permessage-deflate clients.
    #[arg(long, env = "RELAY_DEFLATE_MIN_SIZE", value_name = "BYTES", value_parser = parse_bytes, default_value = "256B")]
    pub deflate_min_size: usize,
    /// SSE reconnect hint sent as `retry:`.
    #[arg(long, env = "RELAY_SSE_RETRY", value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    pub sse_retry: Duration,
    /// Log format. Log level: RUST_LOG (default info).
    #[arg(long, env = "RELAY_LOG_FORMAT", value_name = "FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Channels with presence, as a glob (repeatable; comma-separated in the environment), e.g.
    /// `presence:*`, or `*` for all [default: none; `presence:*` with --demo].
    #[arg(
        long,
        env = "RELAY_PRESENCE_CHANNELS",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub presence_channels: Vec<String>,
    /// How often clients should send {"type":"heartbeat"}.
    #[arg(long, env = "RELAY_HEARTBEAT_INTERVAL", value_name = "DURATION", value_parser = parse_duration, default_value = "15s")]
    pub heartbeat_interval: Duration,
    /// A presence member that sent nothing for this long leaves.
    #[arg(long, env = "RELAY_PRESENCE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "45s")]
    pub presence_timeout: Duration,
    /// How often silent presence members are removed.
    #[arg(long, env = "RELAY_PRESENCE_SWEEP", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub presence_sweep: Duration,
    /// Most presence members per channel.
    #[arg(
        long,
        env = "RELAY_PRESENCE_MAX_MEMBERS",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub presence_max_members: usize,
    /// Whether subscribers may set their presence user and info in the subscribe command
    /// [default: true; false with JWT auth, where identity comes from the token].
    #[arg(long, env = "RELAY_CLIENT_PRESENCE", value_name = "BOOL")]
    pub client_presence: Option<bool>,
    /// What to do with a subscriber whose outbox is full: `disconnect` (close 4008, it resumes),
    /// `drop` (skip, then send a gap notice) or `conflate` (keep only the latest message), for
    /// every channel (`drop`) or by pattern (`ticker:*=conflate`); repeatable, first match wins
    /// [default: disconnect].
    #[arg(long, env = "RELAY_SLOW_CONSUMER", value_name = "[PATTERN=]POLICY", value_delimiter = ',', value_parser = parse_slow_consumer)]
    #[serde(serialize_with = "serialize_slow_consumer")]
    pub slow_consumer: Vec<(String, SlowPolicy)>,
    /// Where messages are sequenced: `memory` (this node alone), `redis` or `nats` (a cluster
    /// of nodes sharing channels, sequence and history).
    #[arg(long, env = "RELAY_BACKPLANE", value_name = "KIND", value_enum, default_value_t = BackplaneKind::Memory)]
    pub backplane: BackplaneKind,
    /// Redis for --backplane redis: one server `redis://[user:pass@]host:port[/db]`, a
    /// cluster `redis-cluster://[user:pass@]host:port,host:port,...` (any of its nodes), or a
    /// Sentinel-managed master `redis-sentinel://[user:pass@]host:port,.../MASTER[/db]` (the
    /// Sentinels' addresses and the master's name). Checked at start: a URL naming the wrong
    /// kind of deployment, or a master no Sentinel knows, stops the node.
    #[arg(
        long,
        env = "RELAY_REDIS_URL",
        value_name = "URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// NATS URL for --backplane nats.
    #[arg(
        long,
        env = "RELAY_NATS_URL",
        value_name = "URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// This node's id in a cluster (logs, presence) [default: generated at start].
    #[arg(long, env = "RELAY_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// Serve a demo page at / (live cursors and presence in the channel `presence:demo`) and the
    /// JS client at /demo/relay.js; makes `presence:*` presence channels unless
    /// --presence-channels is given.
    #[arg(long, env = "RELAY_DEMO", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false)]
    pub demo: bool,
    /// JWT auth: HS256 shared secret. Setting it (or --jwt-public-key) turns auth on; prefer
    /// RELAY_JWT_SECRET to keep it out of `ps` [default: none, auth off].
    #[arg(
        long,
        env = "RELAY_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// JWT auth: PEM public key file (RSA for RS256, EC for ES256, or Ed25519); repeatable for
    /// rotation (comma-separated in the environment). Turns auth on.
    #[arg(
        long,
        env = "RELAY_JWT_PUBLIC_KEY",
        value_name = "FILE",
        value_delimiter = ','
    )]
    pub jwt_public_key: Vec<PathBuf>,
    /// JWT auth: URL of a JSON Web Key Set (JWKS) whose public keys verify tokens by their
    /// `kid`; fetched at start, every --jwt-jwks-refresh and when a token names an unknown
    /// `kid` (at most every 5 s). Turns auth on.
    #[arg(long, env = "RELAY_JWT_JWKS_URL", value_name = "URL")]
    pub jwt_jwks_url: Option<String>,
    /// How often the JWKS is fetched again (removed keys stop verifying after it).
    #[arg(long, env = "RELAY_JWT_JWKS_REFRESH", value_name = "DURATION", value_parser = parse_duration, default_value = "5m")]
    pub jwt_jwks_refresh: Duration,
    /// JWT auth: the `aud` a token must name [default: not checked].
    #[arg(long, env = "RELAY_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,
    /// JWT auth: the `iss` a token must have [default: not checked].
    #[arg(long, env = "RELAY_JWT_ISSUER", value_name = "ISS")]
    pub jwt_issuer: Option<String>,
    /// JWT auth: what every token holder may do besides its token's grants, as PERMS=PATTERN
    /// (PERMS: subscribe, publish, presence, history, all, joined by `+`; `{sub}` in the
    /// pattern is the token's subject), e.g. `all=user:{sub}`; repeatable [default: none].
    #[arg(long, env = "RELAY_ALLOW", value_name = "PERMS=PATTERN", value_delimiter = ',', value_parser = Rule::parse)]
    pub allow: Vec<Rule>,
    /// JWT auth: what clients without a token may do, as PERMS=PATTERN, e.g.
    /// `subscribe+history=public:*`; repeatable [default: nothing].
    #[arg(long, env = "RELAY_ALLOW_ANONYMOUS", value_name = "PERMS=PATTERN", value_delimiter = ',', value_parser = Rule::parse)]
    pub allow_anonymous: Vec<Rule>,
    /// JWT auth: time for a WebSocket client without ?token= to send {"type":"auth"} (when
    /// anonymous clients may do nothing), and for a refresh after its token expired.
    #[arg(long, env = "RELAY_AUTH_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub auth_timeout: Duration,
    /// Browser origin allowed to connect (WebSocket Origin, CORS for SSE and the API), e.g.
    /// `https://app.example.com`; repeatable. Others get 403 [default: any origin].
    #[arg(
        long,
        env = "RELAY_ALLOWED_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub allowed_origin: Vec<String>,
    /// TLS certificate chain, PEM. With --tls-key, the port serves TLS (wss://, https with
    /// HTTP/1.1 and h2); SIGHUP reloads both files [default: plain TCP].
    #[arg(long, env = "RELAY_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "RELAY_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Most open connections from one client address, over all shards (the client behind a
    /// trusted proxy, see --trusted-proxies); more get 429; 0 for no limit.
    #[arg(
        long,
        env = "RELAY_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub max_connections_per_ip: usize,
    /// Connections each shard's listener holds ready before the kernel drops new ones (a
    /// fleet reconnecting after a restart arrives at once). The kernel caps it at
    /// net.core.somaxconn (a warning at start says so).
    #[arg(
        long,
        env = "RELAY_LISTEN_BACKLOG",
        value_name = "N",
        default_value_t = 4096
    )]
    pub listen_backlog: i32,
    /// Time for a new connection to finish its TLS handshake and send its first request
    /// headers (slowloris defence).
    #[arg(long, env = "RELAY_HANDSHAKE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub handshake_timeout: Duration,
    /// Largest request head (request line + headers), at least 8KiB; larger gets 431.
    #[arg(long, env = "RELAY_MAX_HEADER_SIZE", value_name = "BYTES", value_parser = parse_bytes, default_value = "16KiB")]
    pub max_header_size: usize,
    /// Inbound WebSocket messages per second per connection; excess gets `rate_limited`,
    /// persistent excess a close 4029; 0 for no limit.
    #[arg(
        long,
        env = "RELAY_RATE_LIMIT",
        value_name = "PER_SECOND",
        default_value_t = 1000
    )]
    pub rate_limit: u32,
    /// Inbound WebSocket messages a connection may send at once.
    #[arg(
        long,
        env = "RELAY_RATE_BURST",
        value_name = "N",
        default_value_t = 2000
    )]
    pub rate_burst: u32,
    /// Time to receive a whole HTTP request body once its headers are in; a slower one gets
    /// 408 and the connection is closed.
    #[arg(long, env = "RELAY_BODY_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub body_timeout: Duration,
    /// A connection whose client reads nothing of what we send for this long is reset (an HTTP
    /// response, an SSE stream or a WebSocket that the client stopped reading).
    #[arg(long, env = "RELAY_WRITE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "15s")]
    pub write_timeout: Duration,
    /// An HTTP keep-alive connection must send its next request's headers within this long
    /// after a response; an HTTP/2 connection that moves no bytes for this long is closed.
    /// Keep it longer than the idle timeout of a load balancer in front (often 60 s).
    #[arg(long, env = "RELAY_KEEPALIVE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "75s")]
    pub keepalive_timeout: Duration,
    /// On SIGTERM, answer /readyz with 503 for this long while serving as usual, so that load
    /// balancers stop sending new clients; then close WebSockets (1012), end SSE streams and
    /// the listeners (SIGINT skips it).
    #[arg(long, env = "RELAY_DRAIN_PERIOD", value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    pub drain_period: Duration,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from a load balancer,
    /// which names the client; a connection without one is closed.
    #[arg(long, env = "RELAY_PROXY_PROTOCOL", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false)]
    pub proxy_protocol: bool,
    /// Peers whose X-Forwarded-For / Forwarded headers name the client (CIDR networks or
    /// addresses, repeatable): `private` (loopback, private and link-local networks, where load
    /// balancers and ingresses live), or `none` to trust nobody.
    #[arg(long, env = "RELAY_TRUSTED_PROXIES", value_name = "CIDR", value_delimiter = ',', value_parser = TrustedNet::parse, default_value = "private")]
    pub trusted_proxies: Vec<TrustedNet>,
    /// HTTP API requests per second from one client address without an API key (burst: twice
    /// as many); more get 429 with Retry-After; 0 for no limit.
    #[arg(
        long,
        env = "RELAY_API_RATE_LIMIT",
        value_name = "PER_SECOND",
        default_value_t = 100
    )]
    pub api_rate_limit: u32,
    /// HTTP API requests per second per API key (burst: twice as many); more get 429 with
    /// Retry-After; 0 for no limit.
    #[arg(
        long,
        env = "RELAY_API_KEY_RATE_LIMIT",
        value_name = "PER_SECOND",
        default_value_t = 0
    )]
    pub api_key_rate_limit: u32,
    // --- resource bounds (issue 11) ---
    /// Memory budget of the node: what clients make it hold (history, presence, channels,
    /// outboxes, API answers, connections and subscriptions at an estimated cost each), and at
    /// least its RSS (--rss-floor). From 85 % the history of the least recently used channels
    /// is evicted; over it, new publishes, subscriptions and connections are refused (503,
    /// `overloaded`, close 1013) until it is back under 95 %. 0 for none [default: half the
    /// cgroup memory limit, or of physical memory].
    #[arg(long, env = "RELAY_MAX_MEMORY", value_name = "BYTES", value_parser = parse_bytes)]
    pub max_memory: Option<usize>,
    /// Hold --max-memory against the process's resident memory (RSS, read every 100 ms) as
    /// well as what relay counts: what no counter sees (allocator slack, buffers, the binary
    /// itself) then also leads to eviction and refusal. false: only what relay counts (a relay
    /// embedded in a larger process).
    #[arg(long, env = "RELAY_RSS_FLOOR", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = true)]
    pub rss_floor: bool,
    /// Bytes of history kept per channel, as well as --history-size messages.
    #[arg(long, env = "RELAY_HISTORY_MAX_BYTES", value_name = "BYTES", value_parser = parse_bytes, default_value = "1MiB")]
    pub history_max_bytes: usize,
    /// Most channels on the node; a publish or subscribe that would create one more gets
    /// `overloaded` (503); 0 for no limit.
    #[arg(
        long,
        env = "RELAY_MAX_CHANNELS",
        value_name = "N",
        default_value_t = 1_000_000
    )]
    pub max_channels: usize,
    /// Most presence info bytes of all members of the node together; a subscribe with info
    /// past it gets `overloaded` [default: an eighth of --max-memory, at most 64MiB: a member's
    /// info costs about 3.5 times its bytes while its join event lives].
    #[arg(long, env = "RELAY_PRESENCE_INFO_BUDGET", value_name = "BYTES", value_parser = parse_bytes)]
    pub presence_info_budget: Option<usize>,
    /// Admin UI at /admin: the password of its login form (at least 8 bytes). Setting it (or
    /// --admin-token) turns /admin on; prefer RELAY_ADMIN_PASSWORD to keep it out of `ps`
    /// [default: none, /admin is 404].
    #[arg(
        long,
        env = "RELAY_ADMIN_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub admin_password: Option<String>,
    /// Admin API for scripts: a bearer secret (at least 16 bytes) that /admin/api/* accepts as
    /// `Authorization: Bearer <SECRET>`; turns /admin on too [default: none].
    #[arg(
        long,
        env = "RELAY_ADMIN_TOKEN",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    // --- backend integration (issue 14) ---
    /// Webhook receiver, as `[EVENTS][;PATTERN…]@URL`: EVENTS is `+`-separated among
    /// channel_occupied, channel_vacated, member_added, member_removed (all four without it),
    /// client_event (Pusher client events, only when named); each PATTERN limits it to the
    /// channels matching it (`*` = any run), e.g.
    /// `channel_occupied+channel_vacated;chat/*@https://app.example/hooks`; repeatable
    /// (comma-separated in the environment) [default: none].
    #[arg(
        long,
        env = "RELAY_WEBHOOK_URL",
        value_name = "[EVENTS][;PATTERN…]@URL",
        value_delimiter = ','
    )]
    pub webhook_url: Vec<String>,
    /// Webhook HMAC-SHA256 key: each POST carries `X-Relay-Signature: v1=<hex
    /// HMAC(key, "<X-Relay-Timestamp>.<body>")>` [default: none, unsigned].
    #[arg(
        long,
        env = "RELAY_WEBHOOK_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<String>,
    /// Most webhook events per POST.
    #[arg(
        long,
        env = "RELAY_WEBHOOK_BATCH_SIZE",
        value_name = "N",
        default_value_t = 100
    )]
    pub webhook_batch_size: usize,
    /// How long a webhook event waits for others to share its POST.
    #[arg(long, env = "RELAY_WEBHOOK_BATCH_DELAY", value_name = "DURATION", value_parser = parse_duration, default_value = "50ms")]
    pub webhook_batch_delay: Duration,
    /// A webhook POST not answered within this fails and is retried.
    #[arg(long, env = "RELAY_WEBHOOK_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    pub webhook_timeout: Duration,
    /// Tries of a webhook POST (the first included) before its events are dropped (counted).
    #[arg(
        long,
        env = "RELAY_WEBHOOK_MAX_ATTEMPTS",
        value_name = "N",
        default_value_t = 10
    )]
    pub webhook_max_attempts: u32,
    /// Longest wait between two tries of a webhook POST (full-jitter exponential backoff from
    /// 100ms).
    #[arg(long, env = "RELAY_WEBHOOK_RETRY_CAP", value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
    pub webhook_retry_cap: Duration,
    /// Webhook events queued per receiver; past it new events are dropped (counted in
    /// relay_webhook_events_dropped_total).
    #[arg(
        long,
        env = "RELAY_WEBHOOK_QUEUE_SIZE",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub webhook_queue_size: usize,
    /// Backend proxy: POST each new connection without a token here (the backend admits it,
    /// maybe naming its user, presence info, expiry and server-side channels, or refuses it;
    /// with JWT off this is the auth) [default: none].
    #[arg(long, env = "RELAY_PROXY_CONNECT_URL", value_name = "URL")]
    pub proxy_connect_url: Option<String>,
    /// Backend proxy: POST each subscribe to a channel of --proxy-subscribe-channels here
    /// (allow or refuse) [default: none].
    #[arg(long, env = "RELAY_PROXY_SUBSCRIBE_URL", value_name = "URL")]
    pub proxy_subscribe_url: Option<String>,
    /// Backend proxy: POST each WebSocket publish to a channel of --proxy-publish-channels here
    /// (allow, refuse, or replace the data) [default: none].
    #[arg(long, env = "RELAY_PROXY_PUBLISH_URL", value_name = "URL")]
    pub proxy_publish_url: Option<String>,
    /// Channel patterns (`*` any run) whose subscribes go to --proxy-subscribe-url.
    #[arg(
        long,
        env = "RELAY_PROXY_SUBSCRIBE_CHANNELS",
        value_name = "PATTERN",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub proxy_subscribe_channels: Vec<String>,
    /// Channel patterns (`*` any run) whose client publishes go to --proxy-publish-url.
    #[arg(
        long,
        env = "RELAY_PROXY_PUBLISH_CHANNELS",
        value_name = "PATTERN",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub proxy_publish_channels: Vec<String>,
    /// A header of the client's WebSocket or SSE request to forward on every backend proxy POST,
    /// e.g. cookie or authorization (repeatable) [default: none].
    #[arg(
        long,
        env = "RELAY_PROXY_HEADER",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub proxy_header: Vec<String>,
    /// A backend proxy POST not answered within this fails (see --proxy-failure).
    #[arg(long, env = "RELAY_PROXY_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    pub proxy_timeout: Duration,
    /// What a failed backend proxy POST (timeout, non-2xx, bad answer) comes to: deny (the
    /// client gets `unavailable`) or allow (as if the backend said yes, unchanged).
    #[arg(
        long,
        env = "RELAY_PROXY_FAILURE",
        value_name = "deny|allow",
        default_value = "deny"
    )]
    pub proxy_failure: String,
    /// Most backend proxy POSTs in flight on the node; more are refused with `overloaded`.
    #[arg(
        long,
        env = "RELAY_PROXY_MAX_IN_FLIGHT",
        value_name = "N",
        default_value_t = 1000
    )]
    pub proxy_max_in_flight: usize,
    /// How long a publish's idempotency_key is remembered: a repeat within it gets the first
    /// publish's seq and publishes nothing (the channel and its epoch are kept that long).
    #[arg(long, env = "RELAY_IDEMPOTENCY_WINDOW", value_name = "DURATION", value_parser = parse_duration, default_value = "60s")]
    pub idempotency_window: Duration,
    // --- Pusher Channels (issue 15) ---
    /// A Pusher Channels app served at /app/KEY (WebSocket) and /apps/ID/… (HTTP API), as
    /// ID:KEY:SECRET[:OPTION=VALUE…] with options client_events=true|false,
    /// max_connections=N, max_event_bytes=BYTES, max_channels_per_event=N, max_batch=N,
    /// client_event_rate=N (repeatable; comma-separated in the environment). Its channel C is
    /// relay channel pusher/ID/C (see docs/pusher.md).
    #[arg(long, env = "RELAY_PUSHER_APP", value_name = "APP", value_delimiter = ',', value_parser = crate::types::pusher_app::parse_app, hide_env_values = true)]
    pub pusher_app: Vec<crate::types::pusher_app::App>,
    /// A webhook of a Pusher app, in Pusher's format (X-Pusher-Key, X-Pusher-Signature signed
    /// with the app's secret), as APP_ID:[EVENTS][;PATTERN…]@URL: EVENTS is `+`-separated among
    /// channel_occupied, channel_vacated, member_added, member_removed (all four without it),
    /// client_event (only when named); each PATTERN limits it to the app's channels matching it
    /// (`*` = any run), e.g. `my-app:client_event;private-*@https://app.example/pusher`;
    /// repeatable (comma-separated in the environment) [default: none].
    #[arg(
        long,
        env = "RELAY_PUSHER_WEBHOOK",
        value_name = "APP_ID:[EVENTS][;PATTERN…]@URL",
        value_delimiter = ','
    )]
    pub pusher_webhook: Vec<String>,
}

/// Options of `relay serve`: the config file and the settings.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (keys are the long flag names with `_`, e.g. `history_size = 500`).
    #[arg(long, env = "RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The settings, from flags and environment (the file is applied by [`Config::load`]).
    #[command(flatten)]
    pub settings: Config,
}

/// Which backplane sequences messages (`--backplane`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackplaneKind {
    /// One node: the node's own engine sequences (no cluster).
    #[default]
    Memory,
    /// Redis: sequence, history and fan-out through one Redis (see `docs/ARCHITECTURE.md`).
    Redis,
    /// NATS: JetStream for sequence and history, core NATS for fan-out.
    Nats,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// File keys from before the keys were the flag names, and the setting each stands for.
const OLD_KEYS: [(&str, &str); 3] = [
    ("api_keys", "api_key"),
    ("jwt_public_keys", "jwt_public_key"),
    ("allowed_origins", "allowed_origin"),
];

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A key of the file names no setting, or its value is not one the setting takes.
    #[error("config file {path}: {key}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// The key as written in the file.
        key: String,
        /// Why.
        reason: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid {key}: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl Default for Config {
    /// The defaults written on the fields (no environment, no file).
    fn default() -> Self {
        Config::command(|a| a.env(None))
            .try_get_matches_from(["relay"])
            .and_then(|m| Config::from_arg_matches(&m))
            // The defaults are constants; the unit tests parse them.
            .unwrap_or_else(|e| panic!("the defaults of Config do not parse: {e}"))
    }
}

impl Config {
    /// The settings given as flags and environment variables (`cli`, parsed by clap into
    /// `matches`, the `serve` subcommand's), over those of the TOML `file` (path and text), over
    /// the defaults; then the defaults that depend on other settings, and validation.
    pub fn load(
        cli: Config,
        matches: &ArgMatches,
        file: Option<(&Path, &str)>,
    ) -> Result<Config, ConfigError> {
        let (config, mut problems) = Config::load_all(cli, matches, file);
        match problems.is_empty() {
            true => Ok(config),
            false => Err(problems.swap_remove(0)),
        }
    }

    /// Like [`Config::load`], but returns the settings as far as they could be applied with
    /// every problem found (of the file, then of the settings' ranges and relations), not only
    /// the first. The settings are good when there is no problem.
    pub fn load_all(
        cli: Config,
        matches: &ArgMatches,
        file: Option<(&Path, &str)>,
    ) -> (Config, Vec<ConfigError>) {
        let mut config = cli;
        let mut problems = Vec::new();
        if let Some((path, text)) = file {
            let given = |id: &str| {
                matches!(
                    matches.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            };
            config.apply_file(path, text, given, &mut problems);
        }
        if config.demo && config.presence_channels.is_empty() {
            // The demo page's channel needs presence.
            config.presence_channels = vec!["presence:*".to_owned()];
        }
        config.node_id.get_or_insert_with(generated_node_id);
        problems.extend(config.problems());
        (config, problems)
    }

    /// The defaults with the settings of a TOML file (path and text) applied, not validated:
    /// checks that a file parses.
    pub fn from_file(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        let mut problems = Vec::new();
        config.apply_file(path, text, |_| false, &mut problems);
        match problems.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(config),
        }
    }

    /// The settings of `relay serve ARGS` (flags only: no environment, no file), checked like
    /// [`Config::load`]'s: for in-process servers and tests.
    pub fn from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args = std::iter::once(std::ffi::OsString::from("relay"))
            .chain(args.into_iter().map(Into::into));
        let invalid = |e: clap::Error| ConfigError::Invalid {
            key: "arguments",
            reason: clap_reason(&e),
        };
        let matches = Config::command(|a| a.env(None))
            .try_get_matches_from(args)
            .map_err(invalid)?;
        let cli = Config::from_arg_matches(&matches).map_err(invalid)?;
        Config::load(cli, &matches, None)
    }

    /// The settings' arguments alone, each changed by `adjust`.
    fn command(adjust: impl FnMut(Arg) -> Arg) -> Command {
        Config::augment_args(Command::new("relay").disable_help_flag(true)).mut_args(adjust)
    }

    /// Checks every key of the TOML `text` and sets its setting, unless `keep` says the
    /// setting was given as a flag or environment variable (which wins). An unknown key or a
    /// bad value is refused by its name in the file: added to `problems`, and the next key
    /// is checked.
    fn apply_file(
        &mut self,
        path: &Path,
        text: &str,
        keep: impl Fn(&str) -> bool,
        problems: &mut Vec<ConfigError>,
    ) {
        let table: toml::Table = match toml::from_str(text) {
            Ok(t) => t,
            Err(source) => {
                return problems.push(ConfigError::Parse {
                    path: path.to_owned(),
                    source: Box::new(source),
                })
            }
        };
        // A file value goes through its flag's own parser. Without defaults, so that parsing one
        // key sets that setting alone; without the environment; without splitting at commas,
        // since a list is a TOML array.
        let cmd = Config::command(|a| a.env(None).default_value(None).value_delimiter(None));
        for (key, value) in table {
            if let Err(e) = self.apply_key(&cmd, path, &key, value, &keep) {
                problems.push(e);
            }
        }
    }

    /// Checks one key of the file and sets its setting unless `keep` says it was given.
    fn apply_key(
        &mut self,
        cmd: &Command,
        path: &Path,
        key: &str,
        value: toml::Value,
        keep: impl Fn(&str) -> bool,
    ) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::File {
            path: path.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let id = OLD_KEYS
            .iter()
            .find(|(old, _)| *old == key)
            .map_or(key, |(_, id)| id);
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == id)
            .ok_or_else(|| invalid("no such setting (keys are the flag names with `_`)".into()))?;
        let list = matches!(arg.get_action(), ArgAction::Append);
        let flag = arg.get_long().unwrap_or(id);
        let argv = file_values(value, list)
            .map_err(invalid)?
            .into_iter()
            .map(|v| format!("--{flag}={v}"));
        // Parsed even when a flag wins, so that a mistake in the file never goes unseen.
        let matches = cmd
            .clone()
            .try_get_matches_from(std::iter::once("relay".to_owned()).chain(argv))
            .map_err(|e| invalid(clap_reason(&e)))?;
        if !keep(id) {
            self.update_from_arg_matches(&matches)
                .map_err(|e| invalid(clap_reason(&e)))?;
        }
        Ok(())
    }

    /// Checks ranges and relations between settings (no files: the server reads the key and
    /// certificate files when it starts): the first problem of [`Config::problems`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.problems().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every range or relation between settings that is wrong, in the order of the checks
    /// (`relay check-config` lists them all).
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut problems = Vec::new();
        let mut invalid = |key, reason: &str| {
            problems.push(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.shards > crate::types::MAX_SHARDS {
            invalid("shards", "at most 64");
        }
        if self.node_id.as_ref().is_some_and(|id| {
            id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        }) {
            invalid("node_id", "1 to 64 characters from A-Z a-z 0-9 - _ . :");
        }
        match self.backplane {
            // A `--redis-url` is of the Redis backplane's grammar (one server, a cluster or
            // Sentinels): the composition root parses it (`server::prepare`).
            BackplaneKind::Memory | BackplaneKind::Redis => {}
            BackplaneKind::Nats => {
                if !(self.nats_url.starts_with("nats://") || self.nats_url.starts_with("tls://")) {
                    invalid("nats_url", "must start with nats:// or tls://");
                }
            }
        }
        if self.history_size > 1_000_000 {
            invalid("history_size", "at most 1000000");
        }
        if !(256..=64 << 20).contains(&self.max_message_size) {
            invalid("max_message_size", "must be between 256 bytes and 64MiB");
        }
        if self.max_subscriptions == 0 || self.max_subscriptions > 65_000 {
            invalid("max_subscriptions", "must be between 1 and 65000");
        }
        // An outbox keeps its limit in a `u32` (idle memory per connection, issue 12).
        if self.max_outbox_bytes < 4096 || self.max_outbox_bytes > u32::MAX as usize {
            invalid("max_outbox_bytes", "must be at least 4KiB and under 4GiB");
        }
        if self.ping_interval.is_zero() || self.idle_timeout <= self.ping_interval {
            invalid("idle_timeout", "must be longer than ping_interval (> 0)");
        }
        if self.sse_keepalive.is_zero() {
            invalid("sse_keepalive", "must be > 0");
        }
        if self.presence_timeout <= self.heartbeat_interval || self.heartbeat_interval.is_zero() {
            invalid(
                "presence_timeout",
                "must be longer than heartbeat_interval (> 0)",
            );
        }
        if self.presence_sweep.is_zero() {
            invalid("presence_sweep", "must be > 0");
        }
        if self.presence_max_members == 0 {
            invalid("presence_max_members", "must be at least 1");
        }
        if self.presence_channels.iter().any(|p| p.is_empty()) {
            invalid("presence_channels", "a pattern must not be empty");
        }
        if self.api_key.iter().any(|k| k.is_empty()) {
            invalid("api_key", "must not be empty");
        }
        if self.max_memory.is_some_and(|m| m != 0 && m < 16 << 20) {
            invalid("max_memory", "must be 0 (no budget) or at least 16MiB");
        }
        self.security_problems(&mut problems);
        self.edge_problems(&mut problems);
        self.backend_problems(&mut problems);
        problems
    }

    /// Checks the auth, TLS and limit settings.
    fn security_problems(&self, problems: &mut Vec<ConfigError>) {
        let mut invalid = |key, reason: &str| {
            problems.push(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.jwt_secret.as_ref().is_some_and(|s| s.len() < 16) {
            invalid("jwt_secret", "must be at least 16 bytes");
        }
        if self.admin_password.as_ref().is_some_and(|s| s.len() < 8) {
            invalid("admin_password", "must be at least 8 bytes");
        }
        if self.admin_token.as_ref().is_some_and(|s| s.len() < 16) {
            invalid("admin_token", "must be at least 16 bytes");
        }
        if self.auth_timeout.is_zero() {
            invalid("auth_timeout", "must be > 0");
        }
        if self.auth_enabled() && self.client_presence == Some(true) {
            invalid(
                "client_presence",
                "cannot be true with JWT auth (jwt_secret or jwt_public_key is set): presence \
                 identity comes from the token; remove client_presence from the config file, \
                 RELAY_CLIENT_PRESENCE and --client-presence, or set it to false",
            );
        }
        if !self.auth_enabled()
            && (self.jwt_audience.is_some()
                || self.jwt_issuer.is_some()
                || !self.allow.is_empty()
                || !self.allow_anonymous.is_empty())
        {
            invalid(
                "jwt",
                "jwt_audience, jwt_issuer, allow and allow_anonymous need jwt_secret or jwt_public_key",
            );
        }
        if self
            .allowed_origin
            .iter()
            .any(|o| o.is_empty() || o.ends_with('/'))
        {
            invalid(
                "allowed_origin",
                "an origin is scheme://host[:port], without a trailing slash",
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            invalid("tls", "give both tls_cert and tls_key");
        }
        if self.handshake_timeout.is_zero() {
            invalid("handshake_timeout", "must be > 0");
        }
        if self.listen_backlog < 1 {
            invalid("listen_backlog", "must be at least 1");
        }
        if !(8 * 1024..=1024 * 1024).contains(&self.max_header_size) {
            invalid("max_header_size", "must be between 8KiB and 1MiB");
        }
        if self.rate_limit > 0 && self.rate_burst == 0 {
            invalid("rate_burst", "must be at least 1");
        }
    }

    /// Checks the HTTP time bounds, drain and proxy settings.
    fn edge_problems(&self, problems: &mut Vec<ConfigError>) {
        let mut invalid = |key, reason: &str| {
            problems.push(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.body_timeout.is_zero() {
            invalid("body_timeout", "must be > 0");
        }
        if self.write_timeout.is_zero() {
            invalid("write_timeout", "must be > 0");
        }
        // An HTTP/2 connection carrying only SSE streams moves bytes once per keep-alive.
        if self.keepalive_timeout <= self.sse_keepalive {
            invalid("keepalive_timeout", "must be longer than sse_keepalive");
        }
        if self.trusted_proxies.len() > 1 && self.trusted_proxies.contains(&TrustedNet::None) {
            invalid("trusted_proxies", "`none` cannot be given with networks");
        }
        for (i, app) in self.pusher_app.iter().enumerate() {
            let earlier = &self.pusher_app[..i];
            if earlier.iter().any(|a| a.id == app.id || a.key == app.key) {
                invalid("pusher_app", "two apps with the same id or key");
            }
        }
        if let Err(e) = self.pusher_webhooks() {
            invalid("pusher_webhook", &e);
        }
    }

    /// Checks the webhook, proxy and publish settings (issue 14).
    fn backend_problems(&self, problems: &mut Vec<ConfigError>) {
        let mut invalid = |key, reason: &str| {
            problems.push(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        // A `--webhook-url` is of the webhooks' grammar (events, patterns, URL): the
        // composition root parses it (`server::prepare`).
        if self.webhook_secret.as_ref().is_some_and(|s| s.len() < 16) {
            invalid("webhook_secret", "must be at least 16 bytes");
        }
        if !(1..=1000).contains(&self.webhook_batch_size) {
            invalid("webhook_batch_size", "must be between 1 and 1000");
        }
        if self.webhook_timeout.is_zero() {
            invalid("webhook_timeout", "must be > 0");
        }
        if self.webhook_max_attempts == 0 {
            invalid("webhook_max_attempts", "must be at least 1");
        }
        if self.webhook_queue_size == 0 {
            invalid("webhook_queue_size", "must be at least 1");
        }
        if let Some(url) = &self.jwt_jwks_url {
            let ok = url.parse::<hyper::Uri>().ok().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                invalid("jwt_jwks_url", "must be an http:// or https:// URL");
            }
        }
        if self.jwt_jwks_refresh.is_zero() {
            invalid("jwt_jwks_refresh", "must be > 0");
        }
        if self.idempotency_window.is_zero() {
            invalid("idempotency_window", "must be > 0");
        }
        self.proxy_problems(&mut invalid);
    }

    /// Checks the backend proxy settings (`--proxy-*`).
    fn proxy_problems(&self, invalid: &mut impl FnMut(&'static str, &str)) {
        let c = self;
        for (key, u) in [
            ("proxy_connect_url", &c.proxy_connect_url),
            ("proxy_subscribe_url", &c.proxy_subscribe_url),
            ("proxy_publish_url", &c.proxy_publish_url),
        ] {
            let ok = u.as_deref().is_none_or(|u| {
                u.parse::<hyper::Uri>().ok().is_some_and(|u| {
                    matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                })
            });
            if !ok {
                invalid(key, "must be an http:// or https:// URL");
            }
        }
        for (key, list) in [
            ("proxy_subscribe_channels", &c.proxy_subscribe_channels),
            ("proxy_publish_channels", &c.proxy_publish_channels),
        ] {
            for p in list {
                if let Err(e) = crate::types::Pattern::parse(p) {
                    invalid(key, &format!("{p:?}: {e}"));
                } else if crate::types::Pattern::parse(p).is_ok_and(|p| p.uses_sub()) {
                    invalid(key, &format!("{p:?}: {{sub}} has no meaning here"));
                }
            }
        }
        for h in &c.proxy_header {
            if hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
                invalid("proxy_header", &format!("{h:?} is not a header name"));
            }
        }
        if !matches!(c.proxy_failure.as_str(), "deny" | "allow") {
            invalid("proxy_failure", "must be deny or allow");
        }
        if c.proxy_timeout.is_zero() {
            invalid("proxy_timeout", "must be > 0");
        }
        if c.proxy_max_in_flight == 0 {
            invalid("proxy_max_in_flight", "must be at least 1");
        }
    }

    /// The `--pusher-webhook` hooks, `APP_ID:[EVENTS][;PATTERN…]@URL`: each one's app and the
    /// rest, a hook spec as `--webhook-url` takes it (its patterns over the app's own channel
    /// names), parsed by `webhooks::parse_hook_spec` where the hooks are built.
    pub fn pusher_webhooks(&self) -> Result<Vec<(&crate::types::pusher_app::App, &str)>, String> {
        self.pusher_webhook
            .iter()
            .map(|s| {
                let (id, spec) = s
                    .split_once(':')
                    .ok_or_else(|| format!("{s:?}: expected APP_ID:[EVENTS][;PATTERN…]@URL"))?;
                let app = self
                    .pusher_app
                    .iter()
                    .find(|a| a.id == id)
                    .ok_or_else(|| format!("{s:?}: no --pusher-app has the id {id:?}"))?;
                Ok((app, spec))
            })
            .collect()
    }

    /// Whether JWT connection auth is on.
    pub fn auth_enabled(&self) -> bool {
        self.jwt_secret.is_some() || !self.jwt_public_key.is_empty() || self.jwt_jwks_url.is_some()
    }

    /// Whether subscribers may set their own presence user and info: as set, else unless JWT
    /// auth is on (then identity comes from the token).
    pub fn client_presence(&self) -> bool {
        self.client_presence.unwrap_or(!self.auth_enabled())
    }

    /// This node's id in a cluster: as set, else the one [`Config::load`] generated.
    pub fn node_id(&self) -> &str {
        self.node_id.as_deref().unwrap_or_default()
    }

    /// The number of shards to run: the setting, or one per usable core.
    pub fn effective_shards(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(crate::types::MAX_SHARDS)
        }
    }
}

/// A file value as the arguments its flag would be given: one per item of a list.
fn file_values(value: toml::Value, list: bool) -> Result<Vec<String>, String> {
    let scalar = |v: toml::Value| match v {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, an integer or a boolean, not {}",
            other.type_str()
        )),
    };
    match value {
        toml::Value::Array(items) if list => items.into_iter().map(scalar).collect(),
        toml::Value::Array(_) => Err("expected one value, not a list".into()),
        _ if list => Err("expected a list, e.g. [\"a\", \"b\"]".into()),
        v => Ok(vec![scalar(v)?]),
    }
}

/// What a clap error says about a value, without the `error:` prefix and the usage hint.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let text = text.split("\n\nFor more information").next().unwrap_or("");
    text.trim_start_matches("error: ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Serializes `--slow-consumer` the way it is written: `PATTERN=POLICY`.
fn serialize_slow_consumer<S: serde::Serializer>(
    v: &[(String, SlowPolicy)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for (pattern, policy) in v {
        let policy = format!("{policy:?}").to_ascii_lowercase();
        seq.serialize_element(&format!("{pattern}={policy}"))?;
    }
    seq.end()
}

/// Parses `POLICY` (every channel) or `PATTERN=POLICY`.
pub fn parse_slow_consumer(s: &str) -> Result<(String, SlowPolicy), String> {
    let (pattern, policy) = s.trim().rsplit_once('=').unwrap_or(("*", s.trim()));
    let policy = SlowPolicy::parse(policy.trim())
        .ok_or_else(|| format!("{policy:?} is not disconnect, drop or conflate"))?;
    if pattern.is_empty() {
        return Err("empty channel pattern".into());
    }
    Ok((pattern.to_owned(), policy))
}

/// Parses a listen address as users write it elsewhere: `IP:PORT` (`[::1]:8080` too),
/// `localhost:PORT` (127.0.0.1: what browsers and curl reach first), `:PORT` and `*:PORT`
/// (every interface, as in Go, nginx and Caddy), or a bare `PORT` (the default host,
/// 127.0.0.1, so that changing the port never opens the node to the network by surprise).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port (0 to 65535)"))
    };
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port(s)?)));
    }
    match s.rsplit_once(':') {
        Some(("" | "*" | "0.0.0.0", p)) => Ok(SocketAddr::from(([0, 0, 0, 0], port(p)?))),
        Some((host, p)) if host.eq_ignore_ascii_case("localhost") => {
            Ok(SocketAddr::from(([127, 0, 0, 1], port(p)?)))
        }
        _ => Err(format!(
            "{s:?} is not an address to listen on (try 127.0.0.1:8080, localhost:8080, :8080 \
             for every interface, or 8080)"
        )),
    }
}

/// Parses `300s`, `5m`, `250ms`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (try e.g. 300s, 5m, 250ms)"))
}

/// A node id for a node started without `--node-id`: unlikely to repeat across processes.
fn generated_node_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = t ^ u64::from(std::process::id()).rotate_left(40);
    format!("{:016x}", crate::types::mix_public(seed, 0x1D))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `relay serve ARGS` with the config file TEXT, loaded as `main` does, without the
    /// environment (tests/config.rs runs the binary with environment variables).
    fn load(args: &[&str], text: &str) -> Result<Config, ConfigError> {
        let cmd = ServeArgs::augment_args(Command::new("serve")).mut_args(|a| a.env(None));
        let matches = cmd
            .try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))
            .unwrap();
        let cli = ServeArgs::from_arg_matches(&matches).unwrap().settings;
        Config::load(cli, &matches, Some((Path::new("test.toml"), text)))
    }

    fn from_file(text: &str) -> Config {
        Config::from_file(Path::new("test.toml"), text).unwrap()
    }

    #[test]
    fn every_bad_proxy_setting_is_named() {
        let c = from_file(
            r#"
proxy_connect_url = "ftp://backend"
proxy_subscribe_channels = [""]
proxy_publish_channels = ["user:{sub}"]
proxy_header = ["bad header"]
proxy_failure = "maybe"
proxy_timeout = "0s"
proxy_max_in_flight = 0
"#,
        );
        let found: Vec<String> = c.problems().iter().map(|p| p.to_string()).collect();
        for key in [
            "proxy_connect_url",
            "proxy_subscribe_channels",
            "proxy_publish_channels",
            "proxy_header",
            "proxy_failure",
            "proxy_timeout",
            "proxy_max_in_flight",
        ] {
            assert!(found.iter().any(|p| p.contains(key)), "{key}: {found:?}");
        }
        let good = from_file("proxy_connect_url = \"https://app.example/connect\"\n");
        assert!(good.problems().is_empty(), "{:?}", good.problems());
    }

    #[test]
    fn an_outbox_limit_over_4_gib_is_refused_not_cut() {
        let problems = |v: &str| -> Vec<String> {
            let c = from_file(&format!("max_outbox_bytes = \"{v}\"\n"));
            c.problems().iter().map(|p| p.to_string()).collect()
        };
        assert!(problems("3GiB").is_empty(), "{:?}", problems("3GiB"));
        let found = problems("4GiB");
        assert!(
            found.iter().any(|p| p.contains("max_outbox_bytes")),
            "{found:?}"
        );
        let found = problems("5GiB");
        assert!(
            found.iter().any(|p| p.contains("max_outbox_bytes")),
            "{found:?}"
        );
        let found = problems("1KiB");
        assert!(
            found.iter().any(|p| p.contains("max_outbox_bytes")),
            "{found:?}"
        );
    }

    #[test]
    fn listen_addresses_as_users_write_them() {
        let addr = |s: &str| parse_listen(s).map(|a| a.to_string());
        assert_eq!(addr("127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(addr("[::1]:9000").unwrap(), "[::1]:9000");
        assert_eq!(addr("localhost:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(addr("LOCALHOST:0").unwrap(), "127.0.0.1:0");
        assert_eq!(addr(":8080").unwrap(), "0.0.0.0:8080");
        assert_eq!(addr("*:8080").unwrap(), "0.0.0.0:8080");
        assert_eq!(addr("8080").unwrap(), "127.0.0.1:8080");
        for bad in [
            "",
            ":",
            "localhost",
            "80800",
            ":http",
            "example.com:80",
            "1.2.3:4",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("1 MiB"), Ok(1 << 20));
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn the_defaults_are_the_documented_ones_and_valid() {
        let d = Config::default();
        assert_eq!(d.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(d.shards, 0);
        assert_eq!(d.history_size, 1000);
        assert_eq!(d.history_ttl, Duration::from_secs(300));
        assert_eq!(d.max_message_size, 64 * 1024);
        assert_eq!(d.max_outbox_bytes, 1 << 20);
        assert_eq!(d.sse_retry, Duration::from_millis(1000));
        assert_eq!(d.log_format, LogFormat::Human);
        assert_eq!(d.backplane, BackplaneKind::Memory);
        assert_eq!(d.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(d.max_header_size, 16 * 1024);
        assert_eq!((d.rate_limit, d.rate_burst), (1000, 2000));
        assert!(!d.demo && d.client_presence() && d.api_key.is_empty());
        d.validate().unwrap();
        // Loading nothing gives the defaults and a generated node id.
        let loaded = load(&[], "").unwrap();
        assert_eq!(loaded.node_id().len(), 16);
        assert_eq!(
            Config {
                node_id: None,
                ..loaded
            },
            d
        );
    }

    #[test]
    fn every_setting_is_named_once_for_flag_env_and_file() {
        let cmd = Config::command(|a| a);
        let mut n = 0;
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            assert_eq!(arg.get_long(), Some(id.replace('_', "-").as_str()), "{id}");
            let env = format!("RELAY_{}", id.to_ascii_uppercase());
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(&env)), "{id}");
            n += 1;
        }
        // The 41 settings of issue 13; more may come, none may go silently.
        assert!(n >= 41, "{n} settings");
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let file = "history_size = 3\nhistory_ttl = \"9s\"\nmax_message_size = \"2KiB\"\n\
                    api_key = [\"f\"]\nallowed_origin = [\"https://file.example\"]";
        let c = load(
            &[
                "--history-size",
                "5",
                "--allowed-origin",
                "https://a,https://b",
            ],
            file,
        )
        .unwrap();
        assert_eq!(c.history_size, 5);
        assert_eq!(c.history_ttl, Duration::from_secs(9));
        assert_eq!(c.max_message_size, 2048);
        assert_eq!(c.api_key, ["f"]);
        // A list flag replaces the file's list whole.
        assert_eq!(c.allowed_origin, ["https://a", "https://b"]);
        assert_eq!(c.max_subscriptions, 128);
        let c = load(&[], file).unwrap();
        assert_eq!(c.history_size, 3);
        assert_eq!(c.allowed_origin, ["https://file.example"]);
        // A flag given with its default value still beats the file.
        let c = load(&["--history-size", "1000"], file).unwrap();
        assert_eq!(c.history_size, 1000);
    }

    #[test]
    fn the_old_plural_file_keys_still_work() {
        let new = "api_key = [\"k\"]\njwt_public_key = [\"/k.pem\"]\n\
                   allowed_origin = [\"https://app.example\"]";
        let old = "api_keys = [\"k\"]\njwt_public_keys = [\"/k.pem\"]\n\
                   allowed_origins = [\"https://app.example\"]";
        let c = from_file(old);
        assert_eq!(c, from_file(new));
        assert_eq!(c.api_key, ["k"]);
        assert_eq!(c.jwt_public_key, [PathBuf::from("/k.pem")]);
        assert_eq!(c.allowed_origin, ["https://app.example"]);
        // An old key is the same setting: a flag beats it too.
        let c = load(&["--api-key", "flag"], "api_keys = [\"file\"]").unwrap();
        assert_eq!(c.api_key, ["flag"]);
    }

    #[test]
    fn file_values_parse_like_flags() {
        let file = from_file(
            "max_message_size = \"2KiB\"\nmax_outbox_bytes = 8192\nhistory_ttl = \"5m\"\n\
             slow_consumer = [\"ticker:*=conflate\", \"drop\"]\ndemo = true\n\
             allow = [\"subscribe,history=public:*\"]\nlog_format = \"json\"\n\
             client_presence = false\njwt_secret = \"-starts-with-a-dash\"",
        );
        let flags = load(
            &[
                "--max-message-size=2KiB",
                "--max-outbox-bytes=8192",
                "--history-ttl=5m",
                "--slow-consumer=ticker:*=conflate,drop",
                "--demo",
                "--allow=subscribe+history=public:*",
                "--log-format=json",
                "--client-presence=false",
                "--jwt-secret=-starts-with-a-dash",
            ],
            "",
        )
        .unwrap();
        assert_eq!(file.max_message_size, 2048);
        assert_eq!(file.history_ttl, Duration::from_secs(300));
        assert_eq!(
            file.slow_consumer,
            [
                ("ticker:*".to_owned(), SlowPolicy::Conflate),
                ("*".to_owned(), SlowPolicy::Drop)
            ]
        );
        // A list item in the file is never split at commas.
        assert_eq!(file.allow.len(), 1);
        let same = |c: &Config| {
            (
                c.max_message_size,
                c.max_outbox_bytes,
                c.history_ttl,
                c.slow_consumer.clone(),
                c.demo,
                c.allow.clone(),
                c.log_format,
                c.client_presence,
                c.jwt_secret.clone(),
            )
        };
        assert_eq!(same(&file), same(&flags));
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_refused_by_name() {
        for (text, key) in [
            ("histroy_size = 3", "histroy_size"),
            ("history-size = 3", "history-size"),
            ("config = \"other.toml\"", "config"),
            ("history_size = \"lots\"", "history_size"),
            ("history_size = [3]", "history_size"),
            ("history_size = 1.5", "history_size"),
            ("api_key = \"k\"", "api_key"),
            ("api_keys = [1.5]", "api_keys"),
            ("max_message_size = \"12 parsecs\"", "max_message_size"),
            ("history_ttl = \"soon\"", "history_ttl"),
            ("log_format = \"xml\"", "log_format"),
            ("allow = [\"read=x\"]", "allow"),
            ("slow_consumer = [\"later\"]", "slow_consumer"),
        ] {
            let e = load(&[], text).unwrap_err();
            assert!(
                matches!(&e, ConfigError::File { key: k, .. } if k == key),
                "{text}: {e}"
            );
            assert!(e
                .to_string()
                .starts_with(&format!("config file test.toml: {key}: ")));
        }
        // A mistake in the file is refused even when a flag wins over the key.
        assert!(load(&["--history-size", "3"], "histroy_size = 3").is_err());
        assert!(load(&["--history-size", "3"], "history_size = \"lots\"").is_err());
        assert!(load(&["--listen", "127.0.0.1:0"], "listen = 80800").is_err());
        assert!(matches!(
            load(&[], "history_size = "),
            Err(ConfigError::Parse { .. })
        ));
        let e = load(&[], "idle_timeout = \"1s\"\nping_interval = \"2s\"").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid idle_timeout: must be longer than ping_interval (> 0)"
        );
    }

    #[test]
    fn some_defaults_follow_other_settings() {
        // --demo turns on presence for its channel, unless the channels are chosen.
        assert_eq!(
            load(&["--demo"], "").unwrap().presence_channels,
            ["presence:*"]
        );
        assert_eq!(
            load(&[], "demo = true\npresence_channels = []")
                .unwrap()
                .presence_channels,
            ["presence:*"]
        );
        let c = load(&["--demo", "--presence-channels", "room:*"], "").unwrap();
        assert_eq!(c.presence_channels, ["room:*"]);
        // With JWT auth, presence identity comes from the token.
        let secret = "--jwt-secret=0123456789abcdef";
        assert!(!load(&[secret], "").unwrap().client_presence());
        assert!(!load(&[secret, "--client-presence", "false"], "")
            .unwrap()
            .client_presence());
        let e = load(
            &["--client-presence", "true"],
            "jwt_secret = \"0123456789abcdef\"",
        );
        assert!(matches!(
            e,
            Err(ConfigError::Invalid {
                key: "client_presence",
                ..
            })
        ));
        // A node id is generated unless given; an empty one is refused.
        assert_eq!(
            load(&["--node-id", "edge-1"], "").unwrap().node_id(),
            "edge-1"
        );
        assert_ne!(load(&[], "").unwrap().node_id(), "");
        assert!(load(&[], "node_id = \"\"").is_err());
    }

    #[test]
    fn validation_needs_no_files() {
        // Key and certificate files are read by the server when it starts, not here.
        let c = load(
            &[
                "--jwt-public-key=/nonexistent/key.pem",
                "--tls-cert=/nonexistent/cert.pem",
                "--tls-key=/nonexistent/key.pem",
            ],
            "",
        )
        .unwrap();
        assert!(c.auth_enabled());
        let e = load(&["--tls-cert=/c.pem"], "").unwrap_err();
        assert_eq!(e.to_string(), "invalid tls: give both tls_cert and tls_key");
    }

    #[test]
    fn pusher_webhooks_come_from_the_file_and_must_name_an_app() {
        let app = r#"pusher_app = ["app1:key1:secret-one-1234"]"#;
        let c = load(
            &[],
            &format!("{app}\npusher_webhook = [\"app1:client_event;private-*@http://h/w\"]"),
        )
        .unwrap();
        let hooks = c.pusher_webhooks().unwrap();
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].0.id, "app1");
        assert_eq!(hooks[0].1, "client_event;private-*@http://h/w");
        let e = load(&["--pusher-webhook=app2:http://h/w"], app).unwrap_err();
        assert!(e.to_string().contains("pusher_webhook"), "{e}");
    }
}
