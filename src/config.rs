//! Settings: `relay serve` flags, `RELAY_*` environment variables and a TOML file, with
//! precedence flag > env > file > default. Pure data plus validation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::engine::SlowPolicy;

/// Every setting of a running node, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Shards (threads with their own runtime and listener); 0 in input means one per core.
    pub shards: usize,
    /// API keys for `/api/*`; empty means the API is open.
    pub api_keys: Vec<String>,
    /// Messages kept per channel.
    pub history_size: usize,
    /// How long a message stays in history.
    pub history_ttl: Duration,
    /// Largest inbound message (WebSocket message or HTTP body), bytes.
    pub max_message_size: usize,
    /// Most channels one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Most bytes queued for one connection before it is a slow consumer.
    pub max_outbox_bytes: usize,
    /// How long shutdown waits for connections to close.
    pub shutdown_timeout: Duration,
    /// Ping a WebSocket client after this long without inbound traffic.
    pub ping_interval: Duration,
    /// Close a WebSocket client after this long without inbound traffic.
    pub idle_timeout: Duration,
    /// SSE keep-alive comment period.
    pub sse_keepalive: Duration,
    /// SSE `retry:` hint.
    pub sse_retry: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Channel patterns with presence (`*` wildcard).
    pub presence_channels: Vec<String>,
    /// How often clients are expected to send a heartbeat.
    pub heartbeat_interval: Duration,
    /// A presence member silent for this long leaves.
    pub presence_timeout: Duration,
    /// How often silent members are looked for.
    pub presence_sweep: Duration,
    /// Most presence members per channel.
    pub presence_max_members: usize,
    /// Whether subscribers may give their own presence `user`/`info` (until auth provides them).
    pub client_presence: bool,
    /// Slow-consumer policy by channel pattern, first match wins (default disconnect).
    pub slow_consumer: Vec<(String, SlowPolicy)>,
    /// Where messages are sequenced: this node alone, or a backplane shared by several nodes.
    pub backplane: BackplaneKind,
    /// Redis URL for `--backplane redis`.
    pub redis_url: String,
    /// NATS URL for `--backplane nats`.
    pub nats_url: String,
    /// This node's id in a cluster (logs, presence); generated when not given.
    pub node_id: String,
    /// Serve the demo page (`GET /`, `/demo`) and the JS client (`/demo/relay.js`).
    pub demo: bool,
    /// HS256 shared secret for JWT connection auth (`None` and no public key: auth off).
    pub jwt_secret: Option<String>,
    /// PEM public keys (RSA, EC or Ed25519) for JWT connection auth.
    pub jwt_public_keys: Vec<PathBuf>,
    /// Required `aud` claim.
    pub jwt_audience: Option<String>,
    /// Required `iss` claim.
    pub jwt_issuer: Option<String>,
    /// What every token holder may do besides its grants (`{sub}` is its subject).
    pub allow: Vec<crate::auth::Rule>,
    /// What clients without a token may do when auth is on.
    pub allow_anonymous: Vec<crate::auth::Rule>,
    /// Time for the first `auth` command, and for a `refresh` after the token expired.
    pub auth_timeout: Duration,
    /// Browser origins allowed (WebSocket `Origin`, CORS); empty: any.
    pub allowed_origins: Vec<String>,
    /// TLS certificate chain (PEM); with `tls_key`, serve TLS on the listen port.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Most open connections from one IP address, over all shards (0: no limit).
    pub max_connections_per_ip: usize,
    /// Time for a new connection to finish its TLS handshake and first request headers.
    pub handshake_timeout: Duration,
    /// Largest request head (request line and headers), bytes.
    pub max_header_size: usize,
    /// Inbound WebSocket messages per second per connection (0: no limit).
    pub rate_limit: u32,
    /// Inbound WebSocket messages a connection may send at once above the rate.
    pub rate_burst: u32,
}

/// Which backplane sequences messages (`--backplane`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: 0,
            api_keys: Vec::new(),
            history_size: 1000,
            history_ttl: Duration::from_secs(300),
            max_message_size: 64 * 1024,
            max_subscriptions: 128,
            max_outbox_bytes: 1024 * 1024,
            shutdown_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            sse_keepalive: Duration::from_secs(15),
            sse_retry: Duration::from_millis(1000),
            log_format: LogFormat::Human,
            presence_channels: Vec::new(),
            heartbeat_interval: Duration::from_secs(15),
            presence_timeout: Duration::from_secs(45),
            presence_sweep: Duration::from_secs(10),
            presence_max_members: 10_000,
            client_presence: true,
            slow_consumer: Vec::new(),
            backplane: BackplaneKind::Memory,
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            node_id: String::new(),
            demo: false,
            jwt_secret: None,
            jwt_public_keys: Vec::new(),
            jwt_audience: None,
            jwt_issuer: None,
            allow: Vec::new(),
            allow_anonymous: Vec::new(),
            auth_timeout: Duration::from_secs(10),
            allowed_origins: Vec::new(),
            tls_cert: None,
            tls_key: None,
            max_connections_per_ip: 1000,
            handshake_timeout: Duration::from_secs(10),
            max_header_size: 16 * 1024,
            rate_limit: 1000,
            rate_burst: 2000,
        }
    }
}

/// Options of `relay serve`, as given on the command line or in the environment. Every field
/// is optional so that the file and the defaults can fill what is absent.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (keys are the long flag names with `_`, e.g. `history_size = 500`).
    #[arg(long, env = "RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "RELAY_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Shards: threads, each with its own runtime and SO_REUSEPORT listener, pinned to a core
    /// [default: number of usable cores].
    #[arg(long, env = "RELAY_SHARDS", value_name = "N")]
    pub shards: Option<usize>,
    /// API key for /api/* (repeatable; comma-separated in RELAY_API_KEY). Without any, the API
    /// is open.
    #[arg(
        long = "api-key",
        env = "RELAY_API_KEY",
        value_name = "KEY",
        value_delimiter = ','
    )]
    pub api_keys: Vec<String>,
    /// Messages kept per channel for resume and history [default: 1000].
    #[arg(long, env = "RELAY_HISTORY_SIZE", value_name = "N")]
    pub history_size: Option<usize>,
    /// How long a message stays in history, e.g. 300s, 5m [default: 300s].
    #[arg(long, env = "RELAY_HISTORY_TTL", value_name = "DURATION", value_parser = parse_duration)]
    pub history_ttl: Option<Duration>,
    /// Largest inbound WebSocket message or HTTP body, e.g. 65536, 64KiB [default: 64KiB].
    #[arg(long, env = "RELAY_MAX_MESSAGE_SIZE", value_name = "BYTES", value_parser = parse_bytes)]
    pub max_message_size: Option<usize>,
    /// Most channels per connection [default: 128].
    #[arg(long, env = "RELAY_MAX_SUBSCRIPTIONS", value_name = "N")]
    pub max_subscriptions: Option<usize>,
    /// Bytes queued for one connection before it is closed as a slow consumer (4008)
    /// [default: 1MiB].
    #[arg(long, env = "RELAY_MAX_OUTBOX_BYTES", value_name = "BYTES", value_parser = parse_bytes)]
    pub max_outbox_bytes: Option<usize>,
    /// How long shutdown waits for clients to go [default: 10s].
    #[arg(long, env = "RELAY_SHUTDOWN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Ping a WebSocket client after this long without traffic [default: 25s].
    #[arg(long, env = "RELAY_PING_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub ping_interval: Option<Duration>,
    /// Close a WebSocket client after this long without traffic (1001) [default: 60s].
    #[arg(long, env = "RELAY_IDLE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// SSE keep-alive comment period [default: 15s].
    #[arg(long, env = "RELAY_SSE_KEEPALIVE", value_name = "DURATION", value_parser = parse_duration)]
    pub sse_keepalive: Option<Duration>,
    /// SSE reconnect hint sent as `retry:` [default: 1s].
    #[arg(long, env = "RELAY_SSE_RETRY", value_name = "DURATION", value_parser = parse_duration)]
    pub sse_retry: Option<Duration>,
    /// Log format [default: human]. Log level: RUST_LOG (default info).
    #[arg(long, env = "RELAY_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Channels with presence, as a glob (repeatable; comma-separated in the environment), e.g.
    /// `presence:*`, or `*` for all [default: none].
    #[arg(
        long = "presence-channels",
        env = "RELAY_PRESENCE_CHANNELS",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub presence_channels: Vec<String>,
    /// How often clients should send {"type":"heartbeat"} [default: 15s].
    #[arg(long, env = "RELAY_HEARTBEAT_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// A presence member that sent nothing for this long leaves [default: 45s].
    #[arg(long, env = "RELAY_PRESENCE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub presence_timeout: Option<Duration>,
    /// How often silent presence members are removed [default: 10s].
    #[arg(long, env = "RELAY_PRESENCE_SWEEP", value_name = "DURATION", value_parser = parse_duration)]
    pub presence_sweep: Option<Duration>,
    /// Most presence members per channel [default: 10000].
    #[arg(long, env = "RELAY_PRESENCE_MAX_MEMBERS", value_name = "N")]
    pub presence_max_members: Option<usize>,
    /// Whether subscribers may set their presence user and info in the subscribe command
    /// [default: true].
    #[arg(long, env = "RELAY_CLIENT_PRESENCE", value_name = "BOOL")]
    pub client_presence: Option<bool>,
    /// What to do with a subscriber whose outbox is full: `disconnect` (close 4008, it resumes),
    /// `drop` (skip, then send a gap notice) or `conflate` (keep only the latest message), for
    /// every channel (`drop`) or by pattern (`ticker:*=conflate`); repeatable, first match wins
    /// [default: disconnect].
    #[arg(long = "slow-consumer", env = "RELAY_SLOW_CONSUMER", value_name = "[PATTERN=]POLICY", value_delimiter = ',', value_parser = parse_slow_consumer)]
    pub slow_consumer: Vec<(String, SlowPolicy)>,
    /// Where messages are sequenced: `memory` (this node alone), `redis` or `nats` (a cluster
    /// of nodes sharing channels, sequence and history) [default: memory].
    #[arg(long, env = "RELAY_BACKPLANE", value_name = "KIND")]
    pub backplane: Option<BackplaneKind>,
    /// Redis URL for --backplane redis [default: redis://127.0.0.1:6379].
    #[arg(long, env = "RELAY_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,
    /// NATS URL for --backplane nats [default: nats://127.0.0.1:4222].
    #[arg(long, env = "RELAY_NATS_URL", value_name = "URL")]
    pub nats_url: Option<String>,
    /// This node's id in a cluster (logs, presence) [default: generated at start].
    #[arg(long, env = "RELAY_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// Serve a demo page at / (live cursors and presence in the channel `presence:demo`) and the
    /// JS client at /demo/relay.js; makes `presence:*` presence channels unless
    /// --presence-channels is given [default: false].
    #[arg(long, env = "RELAY_DEMO", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub demo: Option<bool>,
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
        long = "jwt-public-key",
        env = "RELAY_JWT_PUBLIC_KEY",
        value_name = "FILE",
        value_delimiter = ','
    )]
    pub jwt_public_keys: Vec<PathBuf>,
    /// JWT auth: the `aud` a token must name [default: not checked].
    #[arg(long, env = "RELAY_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,
    /// JWT auth: the `iss` a token must have [default: not checked].
    #[arg(long, env = "RELAY_JWT_ISSUER", value_name = "ISS")]
    pub jwt_issuer: Option<String>,
    /// JWT auth: what every token holder may do besides its token's grants, as PERMS=PATTERN
    /// (PERMS: subscribe, publish, presence, history, all, joined by `+`; `{sub}` in the
    /// pattern is the token's subject), e.g. `all=user:{sub}`; repeatable [default: none].
    #[arg(long = "allow", env = "RELAY_ALLOW", value_name = "PERMS=PATTERN", value_delimiter = ',', value_parser = crate::auth::Rule::parse)]
    pub allow: Vec<crate::auth::Rule>,
    /// JWT auth: what clients without a token may do, as PERMS=PATTERN, e.g.
    /// `subscribe+history=public:*`; repeatable [default: nothing].
    #[arg(long = "allow-anonymous", env = "RELAY_ALLOW_ANONYMOUS", value_name = "PERMS=PATTERN", value_delimiter = ',', value_parser = crate::auth::Rule::parse)]
    pub allow_anonymous: Vec<crate::auth::Rule>,
    /// JWT auth: time for a WebSocket client without ?token= to send {"type":"auth"} (when
    /// anonymous clients may do nothing), and for a refresh after its token expired [default: 10s].
    #[arg(long, env = "RELAY_AUTH_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub auth_timeout: Option<Duration>,
    /// Browser origin allowed to connect (WebSocket Origin, CORS for SSE and the API), e.g.
    /// `https://app.example.com`; repeatable. Others get 403 [default: any origin].
    #[arg(
        long = "allowed-origin",
        env = "RELAY_ALLOWED_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// TLS certificate chain, PEM. With --tls-key, the port serves TLS (wss://, https with
    /// HTTP/1.1 and h2); SIGHUP reloads both files [default: plain TCP].
    #[arg(long, env = "RELAY_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "RELAY_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Most open connections from one IP address, over all shards; 0 for no limit
    /// [default: 1000].
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,
    /// Time for a new connection to finish its TLS handshake and send its first request
    /// headers (slowloris defence) [default: 10s].
    #[arg(long, env = "RELAY_HANDSHAKE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Largest request head (request line + headers); larger gets 431 [default: 16KiB, at
    /// least 8KiB].
    #[arg(long, env = "RELAY_MAX_HEADER_SIZE", value_name = "BYTES", value_parser = parse_bytes)]
    pub max_header_size: Option<usize>,
    /// Inbound WebSocket messages per second per connection; excess gets `rate_limited`,
    /// persistent excess a close 4029; 0 for no limit [default: 1000].
    #[arg(long, env = "RELAY_RATE_LIMIT", value_name = "PER_SECOND")]
    pub rate_limit: Option<u32>,
    /// Inbound WebSocket messages a connection may send at once [default: 2000].
    #[arg(long, env = "RELAY_RATE_BURST", value_name = "N")]
    pub rate_burst: Option<u32>,
}

/// The TOML file: the same keys as the flags (with `_`), all optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::listen`].
    pub listen: Option<SocketAddr>,
    /// See [`Config::shards`].
    pub shards: Option<usize>,
    /// See [`Config::api_keys`].
    pub api_keys: Option<Vec<String>>,
    /// See [`Config::history_size`].
    pub history_size: Option<usize>,
    /// See [`Config::history_ttl`], e.g. `"300s"`.
    pub history_ttl: Option<String>,
    /// See [`Config::max_message_size`], a number or e.g. `"64KiB"`.
    pub max_message_size: Option<toml::Value>,
    /// See [`Config::max_subscriptions`].
    pub max_subscriptions: Option<usize>,
    /// See [`Config::max_outbox_bytes`].
    pub max_outbox_bytes: Option<toml::Value>,
    /// See [`Config::shutdown_timeout`].
    pub shutdown_timeout: Option<String>,
    /// See [`Config::ping_interval`].
    pub ping_interval: Option<String>,
    /// See [`Config::idle_timeout`].
    pub idle_timeout: Option<String>,
    /// See [`Config::sse_keepalive`].
    pub sse_keepalive: Option<String>,
    /// See [`Config::sse_retry`].
    pub sse_retry: Option<String>,
    /// See [`Config::log_format`].
    pub log_format: Option<LogFormat>,
    /// See [`Config::presence_channels`].
    pub presence_channels: Option<Vec<String>>,
    /// See [`Config::heartbeat_interval`].
    pub heartbeat_interval: Option<String>,
    /// See [`Config::presence_timeout`].
    pub presence_timeout: Option<String>,
    /// See [`Config::presence_sweep`].
    pub presence_sweep: Option<String>,
    /// See [`Config::presence_max_members`].
    pub presence_max_members: Option<usize>,
    /// See [`Config::client_presence`].
    pub client_presence: Option<bool>,
    /// See [`Config::slow_consumer`]: `["drop"]` or `["ticker:*=conflate", "disconnect"]`.
    pub slow_consumer: Option<Vec<String>>,
    /// See [`Config::backplane`]: `"memory"`, `"redis"` or `"nats"`.
    pub backplane: Option<BackplaneKind>,
    /// See [`Config::redis_url`].
    pub redis_url: Option<String>,
    /// See [`Config::nats_url`].
    pub nats_url: Option<String>,
    /// See [`Config::node_id`].
    pub node_id: Option<String>,
    /// See [`Config::demo`].
    pub demo: Option<bool>,
    /// See [`Config::jwt_secret`].
    pub jwt_secret: Option<String>,
    /// See [`Config::jwt_public_keys`].
    pub jwt_public_keys: Option<Vec<PathBuf>>,
    /// See [`Config::jwt_audience`].
    pub jwt_audience: Option<String>,
    /// See [`Config::jwt_issuer`].
    pub jwt_issuer: Option<String>,
    /// See [`Config::allow`]: `["all=user:{sub}"]`.
    pub allow: Option<Vec<String>>,
    /// See [`Config::allow_anonymous`]: `["subscribe+history=public:*"]`.
    pub allow_anonymous: Option<Vec<String>>,
    /// See [`Config::auth_timeout`].
    pub auth_timeout: Option<String>,
    /// See [`Config::allowed_origins`].
    pub allowed_origins: Option<Vec<String>>,
    /// See [`Config::tls_cert`].
    pub tls_cert: Option<PathBuf>,
    /// See [`Config::tls_key`].
    pub tls_key: Option<PathBuf>,
    /// See [`Config::max_connections_per_ip`].
    pub max_connections_per_ip: Option<usize>,
    /// See [`Config::handshake_timeout`].
    pub handshake_timeout: Option<String>,
    /// See [`Config::max_header_size`].
    pub max_header_size: Option<toml::Value>,
    /// See [`Config::rate_limit`].
    pub rate_limit: Option<u32>,
    /// See [`Config::rate_burst`].
    pub rate_burst: Option<u32>,
}

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
    /// The file is not valid TOML for these keys.
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
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

/// Parses `300s`, `5m`, `250ms`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (try e.g. 300s, 5m, 250ms)"))
}

/// Parses `65536`, `64KiB`, `64k`, `1MiB`, `1MB`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 65536 or 64KiB)"))?;
    let mul: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn file_duration(key: &'static str, v: Option<String>) -> Result<Option<Duration>, ConfigError> {
    v.map(|s| parse_duration(&s).map_err(|reason| ConfigError::Invalid { key, reason }))
        .transpose()
}

fn file_bytes(key: &'static str, v: Option<toml::Value>) -> Result<Option<usize>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { key, reason };
    match v {
        None => Ok(None),
        Some(toml::Value::Integer(n)) => usize::try_from(n)
            .map(Some)
            .map_err(|_| invalid(format!("{n} is out of range"))),
        Some(toml::Value::String(s)) => parse_bytes(&s).map(Some).map_err(invalid),
        Some(other) => Err(invalid(format!(
            "expected a number or a string, got {other}"
        ))),
    }
}

/// Flag rules, else the file's (parsed), else none.
fn file_rules(
    key: &'static str,
    args: &[crate::auth::Rule],
    file: Option<Vec<String>>,
) -> Result<Vec<crate::auth::Rule>, ConfigError> {
    if !args.is_empty() {
        return Ok(args.to_vec());
    }
    file.unwrap_or_default()
        .iter()
        .map(|s| crate::auth::Rule::parse(s))
        .collect::<Result<_, _>>()
        .map_err(|reason| ConfigError::Invalid { key, reason })
}

/// A node id for a node started without `--node-id`: unlikely to repeat across processes.
fn generated_node_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = t ^ u64::from(std::process::id()).rotate_left(40);
    format!("{:016x}", crate::engine::mix_public(seed, 0x1D))
}

impl Config {
    /// Builds the config from parsed flags/env (`args`) over the file named by `args.config`.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source: Box::new(source),
                })?
            }
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    /// Flag/env values over file values over defaults, then validation.
    pub fn merge(args: &ServeArgs, file: FileConfig) -> Result<Config, ConfigError> {
        let d = Config::default();
        let c = Config {
            listen: args.listen.or(file.listen).unwrap_or(d.listen),
            shards: args.shards.or(file.shards).unwrap_or(d.shards),
            api_keys: if args.api_keys.is_empty() {
                file.api_keys.unwrap_or_default()
            } else {
                args.api_keys.clone()
            },
            history_size: args
                .history_size
                .or(file.history_size)
                .unwrap_or(d.history_size),
            history_ttl: args
                .history_ttl
                .or(file_duration("history_ttl", file.history_ttl)?)
                .unwrap_or(d.history_ttl),
            max_message_size: args
                .max_message_size
                .or(file_bytes("max_message_size", file.max_message_size)?)
                .unwrap_or(d.max_message_size),
            max_subscriptions: args
                .max_subscriptions
                .or(file.max_subscriptions)
                .unwrap_or(d.max_subscriptions),
            max_outbox_bytes: args
                .max_outbox_bytes
                .or(file_bytes("max_outbox_bytes", file.max_outbox_bytes)?)
                .unwrap_or(d.max_outbox_bytes),
            shutdown_timeout: args
                .shutdown_timeout
                .or(file_duration("shutdown_timeout", file.shutdown_timeout)?)
                .unwrap_or(d.shutdown_timeout),
            ping_interval: args
                .ping_interval
                .or(file_duration("ping_interval", file.ping_interval)?)
                .unwrap_or(d.ping_interval),
            idle_timeout: args
                .idle_timeout
                .or(file_duration("idle_timeout", file.idle_timeout)?)
                .unwrap_or(d.idle_timeout),
            sse_keepalive: args
                .sse_keepalive
                .or(file_duration("sse_keepalive", file.sse_keepalive)?)
                .unwrap_or(d.sse_keepalive),
            sse_retry: args
                .sse_retry
                .or(file_duration("sse_retry", file.sse_retry)?)
                .unwrap_or(d.sse_retry),
            log_format: args.log_format.or(file.log_format).unwrap_or(d.log_format),
            presence_channels: match (&args.presence_channels, file.presence_channels) {
                (a, _) if !a.is_empty() => a.clone(),
                (_, Some(f)) if !f.is_empty() => f,
                // The demo's channel needs presence.
                _ if args.demo.or(file.demo).unwrap_or(d.demo) => vec!["presence:*".to_owned()],
                _ => Vec::new(),
            },
            heartbeat_interval: args
                .heartbeat_interval
                .or(file_duration(
                    "heartbeat_interval",
                    file.heartbeat_interval,
                )?)
                .unwrap_or(d.heartbeat_interval),
            presence_timeout: args
                .presence_timeout
                .or(file_duration("presence_timeout", file.presence_timeout)?)
                .unwrap_or(d.presence_timeout),
            presence_sweep: args
                .presence_sweep
                .or(file_duration("presence_sweep", file.presence_sweep)?)
                .unwrap_or(d.presence_sweep),
            presence_max_members: args
                .presence_max_members
                .or(file.presence_max_members)
                .unwrap_or(d.presence_max_members),
            client_presence: args
                .client_presence
                .or(file.client_presence)
                // With JWT auth, presence identity comes from the token.
                .unwrap_or(
                    d.client_presence
                        && args.jwt_secret.is_none()
                        && file.jwt_secret.is_none()
                        && args.jwt_public_keys.is_empty()
                        && file.jwt_public_keys.as_ref().is_none_or(Vec::is_empty),
                ),
            slow_consumer: if args.slow_consumer.is_empty() {
                file.slow_consumer
                    .unwrap_or_default()
                    .iter()
                    .map(|s| parse_slow_consumer(s))
                    .collect::<Result<_, _>>()
                    .map_err(|reason| ConfigError::Invalid {
                        key: "slow_consumer",
                        reason,
                    })?
            } else {
                args.slow_consumer.clone()
            },
            backplane: args.backplane.or(file.backplane).unwrap_or(d.backplane),
            redis_url: args
                .redis_url
                .clone()
                .or(file.redis_url)
                .unwrap_or(d.redis_url),
            nats_url: args
                .nats_url
                .clone()
                .or(file.nats_url)
                .unwrap_or(d.nats_url),
            node_id: args
                .node_id
                .clone()
                .or(file.node_id)
                .unwrap_or_else(generated_node_id),
            demo: args.demo.or(file.demo).unwrap_or(d.demo),
            jwt_secret: args.jwt_secret.clone().or(file.jwt_secret),
            jwt_public_keys: if args.jwt_public_keys.is_empty() {
                file.jwt_public_keys.unwrap_or_default()
            } else {
                args.jwt_public_keys.clone()
            },
            jwt_audience: args.jwt_audience.clone().or(file.jwt_audience),
            jwt_issuer: args.jwt_issuer.clone().or(file.jwt_issuer),
            allow: file_rules("allow", &args.allow, file.allow)?,
            allow_anonymous: file_rules(
                "allow_anonymous",
                &args.allow_anonymous,
                file.allow_anonymous,
            )?,
            auth_timeout: args
                .auth_timeout
                .or(file_duration("auth_timeout", file.auth_timeout)?)
                .unwrap_or(d.auth_timeout),
            allowed_origins: if args.allowed_origins.is_empty() {
                file.allowed_origins.unwrap_or_default()
            } else {
                args.allowed_origins.clone()
            },
            tls_cert: args.tls_cert.clone().or(file.tls_cert),
            tls_key: args.tls_key.clone().or(file.tls_key),
            max_connections_per_ip: args
                .max_connections_per_ip
                .or(file.max_connections_per_ip)
                .unwrap_or(d.max_connections_per_ip),
            handshake_timeout: args
                .handshake_timeout
                .or(file_duration("handshake_timeout", file.handshake_timeout)?)
                .unwrap_or(d.handshake_timeout),
            max_header_size: args
                .max_header_size
                .or(file_bytes("max_header_size", file.max_header_size)?)
                .unwrap_or(d.max_header_size),
            rate_limit: args.rate_limit.or(file.rate_limit).unwrap_or(d.rate_limit),
            rate_burst: args.rate_burst.or(file.rate_burst).unwrap_or(d.rate_burst),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks ranges and relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.shards > crate::engine::MAX_SHARDS {
            return invalid("shards", "at most 64");
        }
        if self.node_id.is_empty()
            || self.node_id.len() > 64
            || !self
                .node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return invalid("node_id", "1 to 64 characters from A-Z a-z 0-9 - _ . :");
        }
        match self.backplane {
            BackplaneKind::Memory => {}
            BackplaneKind::Redis => {
                if !(self.redis_url.starts_with("redis://")
                    || self.redis_url.starts_with("rediss://"))
                {
                    return invalid("redis_url", "must start with redis:// or rediss://");
                }
            }
            BackplaneKind::Nats => {
                if !(self.nats_url.starts_with("nats://") || self.nats_url.starts_with("tls://")) {
                    return invalid("nats_url", "must start with nats:// or tls://");
                }
            }
        }
        if self.history_size > 1_000_000 {
            return invalid("history_size", "at most 1000000");
        }
        if !(256..=64 << 20).contains(&self.max_message_size) {
            return invalid("max_message_size", "must be between 256 bytes and 64MiB");
        }
        if self.max_subscriptions == 0 || self.max_subscriptions > 65_000 {
            return invalid("max_subscriptions", "must be between 1 and 65000");
        }
        if self.max_outbox_bytes < 4096 {
            return invalid("max_outbox_bytes", "must be at least 4KiB");
        }
        if self.ping_interval.is_zero() || self.idle_timeout <= self.ping_interval {
            return invalid("idle_timeout", "must be longer than ping_interval (> 0)");
        }
        if self.sse_keepalive.is_zero() {
            return invalid("sse_keepalive", "must be > 0");
        }
        if self.presence_timeout <= self.heartbeat_interval || self.heartbeat_interval.is_zero() {
            return invalid(
                "presence_timeout",
                "must be longer than heartbeat_interval (> 0)",
            );
        }
        if self.presence_sweep.is_zero() {
            return invalid("presence_sweep", "must be > 0");
        }
        if self.presence_max_members == 0 {
            return invalid("presence_max_members", "must be at least 1");
        }
        if self.presence_channels.iter().any(|p| p.is_empty()) {
            return invalid("presence_channels", "a pattern must not be empty");
        }
        if self.api_keys.iter().any(|k| k.is_empty()) {
            return invalid("api_key", "must not be empty");
        }
        self.validate_security()?;
        Ok(())
    }

    /// Checks the auth, TLS and limit settings; loads the key and certificate files so that a
    /// bad one stops the start instead of the first connection.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if self.jwt_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return invalid("jwt_secret", "must be at least 16 bytes".into());
        }
        if self.auth_timeout.is_zero() {
            return invalid("auth_timeout", "must be > 0".into());
        }
        let auth = match crate::auth::Auth::from_config(self) {
            Ok(a) => a,
            Err(e) => return invalid("jwt", e.to_string()),
        };
        if auth.is_some() && self.client_presence {
            return invalid(
                "client_presence",
                "cannot be true with JWT auth: presence identity comes from the token".into(),
            );
        }
        if auth.is_none()
            && (self.jwt_audience.is_some()
                || self.jwt_issuer.is_some()
                || !self.allow.is_empty()
                || !self.allow_anonymous.is_empty())
        {
            return invalid(
                "jwt",
                "jwt_audience, jwt_issuer, allow and allow_anonymous need jwt_secret or jwt_public_key"
                    .into(),
            );
        }
        if self
            .allowed_origins
            .iter()
            .any(|o| o.is_empty() || o.ends_with('/'))
        {
            return invalid(
                "allowed_origin",
                "an origin is scheme://host[:port], without a trailing slash".into(),
            );
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), Some(_)) => {
                if let Err(e) = crate::tls::load(self) {
                    return invalid("tls", e.to_string());
                }
            }
            (None, None) => {}
            _ => return invalid("tls", "give both tls_cert and tls_key".into()),
        }
        if self.handshake_timeout.is_zero() {
            return invalid("handshake_timeout", "must be > 0".into());
        }
        if !(8 * 1024..=1024 * 1024).contains(&self.max_header_size) {
            return invalid("max_header_size", "must be between 8KiB and 1MiB".into());
        }
        if self.rate_limit > 0 && self.rate_burst == 0 {
            return invalid("rate_burst", "must be at least 1".into());
        }
        Ok(())
    }

    /// Whether JWT connection auth is on.
    pub fn auth_enabled(&self) -> bool {
        self.jwt_secret.is_some() || !self.jwt_public_keys.is_empty()
    }

    /// The number of shards to run: the setting, or one per usable core.
    pub fn effective_shards(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(crate::engine::MAX_SHARDS)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
    fn flag_beats_file_beats_default() {
        let file: FileConfig = toml::from_str(
            "history_size = 3\nhistory_ttl = \"9s\"\nmax_message_size = \"2KiB\"\napi_keys = [\"f\"]",
        )
        .unwrap();
        let args = ServeArgs {
            history_size: Some(5),
            ..ServeArgs::default()
        };
        let c = Config::merge(&args, file.clone()).unwrap();
        assert_eq!(c.history_size, 5);
        assert_eq!(c.history_ttl, Duration::from_secs(9));
        assert_eq!(c.max_message_size, 2048);
        assert_eq!(c.api_keys, ["f"]);
        assert_eq!(c.max_subscriptions, 128);
        let c = Config::merge(&ServeArgs::default(), file).unwrap();
        assert_eq!(c.history_size, 3);
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<FileConfig>("histroy_size = 3").is_err());
        let file: FileConfig =
            toml::from_str("idle_timeout = \"1s\"\nping_interval = \"2s\"").unwrap();
        assert!(Config::merge(&ServeArgs::default(), file).is_err());
    }
}
