//! Settings: `relay serve` flags, `RELAY_*` environment variables and a TOML file, with
//! precedence flag > env > file > default. Pure data plus validation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

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
        if self.api_keys.iter().any(|k| k.is_empty()) {
            return invalid("api_key", "must not be empty");
        }
        Ok(())
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
