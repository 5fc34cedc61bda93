//! The Redis backplane: the [`Remote`] of a [`Replica`], on one Redis server, a Redis Cluster
//! or a Sentinel-managed master ([`Target`], from `--redis-url`).
//!
//! # Topologies
//! - `redis://[user:pass@]host:port[/db]`: one server.
//! - `redis-cluster://[user:pass@]host:port,host:port,...`: a Redis Cluster, from any of its
//!   nodes (the seeds; the rest is discovered). Every key of a channel carries the `{channel}`
//!   hash tag, so each script touches one slot; pub/sub is the classic `PUBLISH`, which the
//!   cluster carries to every node, so a node subscribes on any one of them.
//! - `redis-sentinel://[user:pass@]host:port,host:port,.../master[/db]`: the master that the
//!   Sentinels at those addresses know as `master` (the same credentials for both).
//!
//! A failover (a replica promoted by Sentinel or by the cluster) ends a connection like any
//! loss: the supervisor reconnects (asking the Sentinels or the cluster again) and every
//! joined channel resyncs. What the promoted replica had not received is lost to Redis; a node
//! that saw more of a channel than Redis now holds starts the channel's next epoch (the sync
//! script does, and so does the publish script, which carries the publisher's local
//! position), so that no position of the old epoch can name a newer message and every
//! subscriber behind the loss resumes with `recovered:false`.
//!
//! # Keys, per channel `ch`
//! - `relay:{ch}:meta`, a hash: `e` the epoch (hex), `top` the last seq. Expires after
//!   `max(history TTL, 1h)` without a publish, so an epoch outlives the data it numbered.
//! - `relay:{ch}:hist`, a stream: entry `<seq>-1` with fields `k` (kind `j`/`b`), `t` (publish
//!   time, ms, from Redis `TIME`) and `d` (the payload); `MAXLEN` = history size; expires
//!   after the history TTL without a publish.
//! - `relay:msg:{ch}`, the pub/sub channel: `<epoch> <seq> <kind> <t> <payload>`, and the
//!   presence announcements `P+ <client> <member>` / `P- <client>`.
//! - `relay:{ch}:pres` (client → member) and `relay:{ch}:pexp` (client → expiry ms): presence.
//!
//! # Publish
//! One Lua script (atomic for the channel): create the epoch if absent (and drop a stale
//! stream), `HINCRBY top`, `XADD`, `PEXPIRE` both keys, `PUBLISH`. Redis runs scripts one at a
//! time, so pub/sub order is seq order. A shard publishes on a multiplexed connection of its own
//! ([`OwnConn`]; the supervisor's until that one is up): many `EVALSHA`s are in flight at once,
//! pipelined, and no publish waits for another thread to be scheduled.
//!
//! # Receive
//! The [`Replica`] joins, ingests and resyncs; here a join is `SUBSCRIBE relay:msg:{ch}` and a
//! snapshot is one Lua script that reads `(epoch, top, history)` (creating the epoch when the
//! channel has none). Subscribes and unsubscribes go through one task, in the order asked, so
//! that a leave and a later join of the same channel reach Redis in that order.
//!
//! # Failure
//! One supervisor owns the connections: a command connection and a pub/sub connection, made
//! anew after any loss, with full-jitter exponential backoff (100 ms base, 5 s cap). While
//! down: publishes fail at once with [`BackplaneError::Unavailable`] (HTTP 503, WS
//! `unavailable`), joins of channels not yet received fail the same way, `/readyz` is 503,
//! and local subscribers keep what they have. On reconnect every joined channel is
//! re-subscribed and resynced ([`Replica::connected`]): subscribers either get what they missed
//! or are closed and resume (`recovered:false` when the history cannot cover their gap).

mod agree;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use fred::prelude::{
    Builder, Client, ClientLike, Config as RedisConfig, Error as RedisError, EventInterface,
    LuaInterface, PubsubInterface, Value,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::agree::{Agreed, Claim};
use super::presence::{decode_member, encode_member, Members, PresenceOp};
use super::replica::{
    Batch, Entry, Incoming, Remote, Replica, Snapshot, Stored, BACKOFF_BASE, BACKOFF_CAP,
};
use super::{backoff, wall_ms, BackplaneError, BoxFuture, Seeds, Settings, Wakers};
use crate::engine::idempotency::PublishConditions;
use crate::engine::Engine;
use crate::types::{ChannelName, DataKind, Epoch, StreamPosition};

/// How long one Redis command may take before the publish (or join) fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// `KEYS`: meta, stream and, with an idempotency key, its key. `ARGV`: candidate epoch, kind,
/// data, history size, history TTL ms, meta TTL ms, pub/sub channel, the publisher's local
/// position (epoch or '', seq) and, for a conditional publish, the expected seq ('' none) and
/// the key's window ms. A publisher that holds more of the epoch than Redis (history lost in a
/// failover, see [`SYNC_LUA`]) moves the channel to the candidate epoch before numbering, so
/// the new message never takes a lost one's seq. Returns `{epoch, seq, 0}`; `{epoch, seq, 1}`
/// when the key was seen (the first publish's position, nothing published); `{epoch, top, 2}`
/// when the top is not the expected seq (nothing published).
const PUBLISH_LUA: &str = r#"
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local e, seq = string.match(seen, '^(%S+) (%d+)$')
    return {e, tonumber(seq), 1}
  end
end
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e, 'top', 0)
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
elseif e == ARGV[8] and tonumber(redis.call('HGET', KEYS[1], 'top') or '0') < tonumber(ARGV[9]) then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e)
end
if ARGV[10] and ARGV[10] ~= '' then
  local top = tonumber(redis.call('HGET', KEYS[1], 'top'))
  if top ~= tonumber(ARGV[10]) then
    return {e, top, 2}
  end
end
local seq = redis.call('HINCRBY', KEYS[1], 'top', 1)
local t = redis.call('TIME')
local ms = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], seq .. '-1', 'k', ARGV[2], 't', ms, 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[7], e .. ' ' .. seq .. ' ' .. ARGV[2] .. ' ' .. ms .. ' ' .. ARGV[3])
if KEYS[3] then
  redis.call('SET', KEYS[3], e .. ' ' .. seq, 'PX', ARGV[11])
end
return {e, seq, 0}
"#;

/// `ARGV`: candidate epoch, since epoch (or ''), since seq, limit, meta TTL ms. Returns
/// `{epoch, top, mode, entries}`: mode 1 = every entry after `since` (the caller's epoch
/// matches and the stream still holds `since + 1`), mode 0 = the last `limit` entries, newest
/// first.
///
/// A caller that saw more of the epoch than Redis holds (`since > top`: a failover promoted a
/// replica that had not received the last writes) proves that history was lost: the channel
/// moves to the candidate epoch, keeping its top and stream, so that the next seqs are never
/// taken for the lost messages that had the same numbers.
const SYNC_LUA: &str = r#"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e, 'top', 0)
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0')
local since = tonumber(ARGV[3])
if e == ARGV[2] and since > top then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
if e == ARGV[2] and since <= top then
  if since == top then
    return {e, top, 1, {}}
  end
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if first[1] and tonumber(string.match(first[1][1], '^(%d+)')) <= since + 1 then
    return {e, top, 1, redis.call('XRANGE', KEYS[2], '(' .. since .. '-1', '+')}
  end
end
return {e, top, 0, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[4])}
"#;

/// Presence of one channel. `KEYS`: members hash (client → identity), expiries zset.
/// `ARGV`: pub/sub channel, expiry ms, now ms, key TTL ms, reconcile (0/1), then triplets
/// `op client identity` with op `+` (joined here), `-` (left here), `~` (still here).
/// Drops expired members; returns `{members hash, expiries}` when reconciling.
const PRESENCE_LUA: &str = r#"
local i = 6
while ARGV[i] do
  local op, client, who = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == '+' then
    redis.call('HSET', KEYS[1], client, who)
    redis.call('ZADD', KEYS[2], ARGV[2], client)
    redis.call('PUBLISH', ARGV[1], 'P+ ' .. client .. ' ' .. who)
  elseif op == '-' then
    redis.call('HDEL', KEYS[1], client)
    redis.call('ZREM', KEYS[2], client)
    redis.call('PUBLISH', ARGV[1], 'P- ' .. client)
  else
    redis.call('ZADD', KEYS[2], ARGV[2], client)
  end
  i = i + 3
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
for _, client in ipairs(expired) do
  redis.call('HDEL', KEYS[1], client)
  redis.call('ZREM', KEYS[2], client)
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
if ARGV[5] == '1' then
  return {redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
end
return {}
"#;

/// `ARGV`: since, limit. Returns `{epoch or '', top, entries after since}`.
const HISTORY_LUA: &str = r#"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  return {'', 0, {}}
end
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0')
return {e, top, redis.call('XRANGE', KEYS[2], '(' .. ARGV[1] .. '-1', '+', 'COUNT', ARGV[2])}
"#;

/// The Redis deployment `--redis-url` names. See the module docs for the URL shapes.
#[derive(Clone, Debug)]
pub struct Target {
    /// What fred connects with.
    pub config: RedisConfig,
}

const CLUSTER_SCHEME: &str = "redis-cluster://";
const SENTINEL_SCHEME: &str = "redis-sentinel://";

impl Target {
    /// Parses `--redis-url`; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Target, String> {
        use fred::types::config::{ClusterDiscoveryPolicy, Server, ServerConfig};
        let fred_err = |e: RedisError| e.details().to_owned();
        let (cluster, rest) = if let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix(SENTINEL_SCHEME) {
            (false, rest)
        } else if url.starts_with("rediss") {
            // fred is built without TLS: it would connect in clear text (with a warning), and
            // send the password that way.
            return Err(
                "TLS to Redis (rediss://) is not built in: use redis:// on a private network"
                    .into(),
            );
        } else if url.starts_with("redis://") {
            return RedisConfig::from_url_centralized(url)
                .map(|config| Target { config })
                .map_err(fred_err);
        } else {
            return Err("must start with redis://, redis-cluster:// or redis-sentinel://".into());
        };
        if rest.contains('?') {
            return Err("takes no query parameters".into());
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (auth, hosts) = match authority.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), authority),
        };
        let hosts = hosts
            .split(',')
            .map(parse_host)
            .collect::<Result<Vec<Server>, String>>()?;
        let Some(first) = hosts.first() else {
            return Err("names no host".into());
        };
        let first = format!("{}:{}", first.host, first.port);
        let mut db = "";
        let server = if cluster {
            if !path.is_empty() {
                return Err("a cluster has no databases: drop the path".into());
            }
            ServerConfig::Clustered {
                hosts,
                policy: ClusterDiscoveryPolicy::default(),
            }
        } else {
            let master;
            (master, db) = path.split_once('/').unwrap_or((path, ""));
            if master.is_empty() {
                return Err("names no master: redis-sentinel://host:port,.../master[/db]".into());
            }
            ServerConfig::Sentinel {
                hosts,
                service_name: master.to_owned(),
            }
        };
        // The credentials and database, parsed (and percent-decoded) by fred.
        let mut config = RedisConfig::from_url_centralized(&format!("redis://{auth}{first}/{db}"))
            .map_err(fred_err)?;
        config.server = server;
        Ok(Target { config })
    }

    /// The centralized config of one of this target's hosts (the seeds, or the Sentinels):
    /// the same credentials, no database.
    fn one(&self, host: &fred::types::config::Server) -> RedisConfig {
        RedisConfig {
            server: fred::types::config::ServerConfig::new_centralized(
                host.host.to_string(),
                host.port,
            ),
            database: None,
            ..self.config.clone()
        }
    }

    /// Asks the deployment, once, whether it is what the URL says: a cluster URL must reach
    /// cluster nodes, a plain one a server that is not a cluster node, and the Sentinels must
    /// know the master. Unreachable hosts prove nothing (the supervisor keeps trying); a host
    /// that answers otherwise is a configuration mistake.
    async fn check(&self) -> Result<(), String> {
        use fred::types::config::ServerConfig;
        let (hosts, want) = match &self.config.server {
            ServerConfig::Centralized { server } => (vec![server.clone()], Probe::NotCluster),
            ServerConfig::Clustered { hosts, .. } => (hosts.clone(), Probe::Cluster),
            ServerConfig::Sentinel {
                hosts,
                service_name,
                ..
            } => (hosts.clone(), Probe::Sentinel(service_name.clone())),
            #[allow(unreachable_patterns)]
            _ => return Ok(()),
        };
        let mut unknown_master = None;
        for host in &hosts {
            let at = format!("{}:{}", host.host, host.port);
            let mut config = self.one(host);
            if matches!(want, Probe::Sentinel(_)) {
                // A Sentinel takes no SELECT.
                config.database = None;
            }
            let Some(answer) = ask(config, &want).await else {
                continue;
            };
            match (&want, answer) {
                (Probe::Cluster, Answer::Text(info)) if !info.contains("cluster_enabled:1") => {
                    return Err(format!(
                        "{at} is not a Redis Cluster node (cluster_enabled:0): use redis://{at} for one server"
                    ));
                }
                (Probe::NotCluster, Answer::Text(info)) if info.contains("cluster_enabled:1") => {
                    return Err(format!(
                        "{at} is a Redis Cluster node: use redis-cluster://{at}[,host:port...]"
                    ));
                }
                (Probe::Sentinel(_), Answer::Error(e)) => {
                    return Err(format!("{at} is not a Redis Sentinel ({e})"));
                }
                (Probe::Sentinel(name), Answer::Nil) => {
                    unknown_master = Some(format!(
                        "the Sentinel at {at} knows no master named {name:?}"
                    ));
                }
                (Probe::Sentinel(_), Answer::Text(_)) => return Ok(()),
                _ => {}
            }
        }
        unknown_master.map_or(Ok(()), Err)
    }
}

/// `host:port` or `[v6]:port`.
fn parse_host(s: &str) -> Result<fred::types::config::Server, String> {
    let bad = || format!("{s:?} is not host:port");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok(fred::types::config::Server::new(host, port))
}

enum Probe {
    Cluster,
    NotCluster,
    Sentinel(String),
}

enum Answer {
    Text(String),
    Nil,
    Error(String),
}

/// One question to one host; `None` when it cannot be reached or does not answer in time.
async fn ask(config: RedisConfig, probe: &Probe) -> Option<Answer> {
    use fred::types::CustomCommand;
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 1;
        })
        .build()
        .ok()?;
    let asked = async {
        let handle = client.init().await.ok()?;
        let (cmd, args): (&'static str, Vec<Value>) = match probe {
            Probe::Sentinel(name) => (
                "SENTINEL",
                vec!["get-master-addr-by-name".into(), name.as_str().into()],
            ),
            _ => ("INFO", vec!["cluster".into()]),
        };
        let reply: Result<Value, RedisError> = client
            .custom(CustomCommand::new_static(cmd, None, false), args)
            .await;
        let _ = client.quit().await;
        handle.abort();
        Some(match reply {
            Ok(Value::Null) => Answer::Nil,
            Ok(v) => Answer::Text(v.as_string().unwrap_or_default()),
            Err(e) => Answer::Error(e.details().to_owned()),
        })
    };
    tokio::time::timeout(Duration::from_secs(3), asked)
        .await
        .ok()
        .flatten()
}

/// A shard's own publish connection ([`super::enter_shard`]): the publishes made on a shard go
/// to Redis from the shard's runtime, with no hand-over to the backplane's thread on the way
/// out or back. One per shard thread, made on its first publish (meanwhile, and whenever it is
/// down, publishes take the shared connection). It belongs to one connection of the
/// supervisor ([`Redis::generation`]) and is replaced after a reconnect, so that a failover
/// moves it to the new master too.
#[derive(Default)]
struct OwnConn {
    generation: u64,
    client: Option<Client>,
    /// Where the connect under way puts its client (`None`: it failed). Shared with the
    /// connecting task, which may run on another thread (a test's runtime): when nobody holds
    /// it any more (a reconnect of the supervisor started over), the task closes its client.
    connecting: Option<Arc<parking_lot::Mutex<Option<Option<Client>>>>>,
    /// After a failed connect, none before this.
    retry_at: Option<Instant>,
    /// Publishes of this shard in flight on the shared connection. The shard's publishes move
    /// to its own connection only when there are none: two connections do not keep the order
    /// of a publisher's pipelined publishes between them.
    on_shared: Arc<AtomicUsize>,
}

thread_local! {
    static OWN: std::cell::RefCell<OwnConn> = std::cell::RefCell::default();
}

/// Counts a publish in flight on the shared connection ([`OwnConn::on_shared`]).
struct OnShared(Arc<AtomicUsize>);

impl OnShared {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        OnShared(n.clone())
    }
}

impl Drop for OnShared {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// See the module docs.
struct Redis {
    target: Target,
    /// The local replica's positions (read by publishes: see [`PUBLISH_LUA`]).
    engine: Arc<Engine>,
    settings: Settings,
    conn: ArcSwapOption<Conn>,
    /// Subscribes and unsubscribes, applied in order by [`control`].
    ctl: mpsc::UnboundedSender<Ctl>,
    seeds: Seeds,
    scripts: Scripts,
    /// Counts the supervisor's connections: a shard's own publish connection belongs to one
    /// of them ([`OwnConn`]) and is replaced after a reconnect.
    generation: AtomicU64,
}

struct Scripts {
    publish: String,
    sync: String,
    history: String,
    presence: String,
}

struct Conn {
    cmd: Client,
    sub: Client,
    /// Redis answered `READONLY`: the server is a replica now (a master demoted by a failover
    /// that kept the connection open, e.g. behind a DNS name). The supervisor reconnects.
    demoted: tokio::sync::Notify,
}

enum Ctl {
    Subscribe(
        Vec<ChannelName>,
        oneshot::Sender<Result<(), BackplaneError>>,
    ),
    Unsubscribe(ChannelName),
}

fn meta_key(ch: &ChannelName) -> String {
    format!("relay:{{{ch}}}:meta")
}

fn hist_key(ch: &ChannelName) -> String {
    format!("relay:{{{ch}}}:hist")
}

const MSG_PREFIX: &str = "relay:msg:";

/// The pub/sub channel of control messages (server API user commands), outside the channels'
/// namespace: every node subscribes to it on each connection.
const CONTROL_KEY: &str = "relay:control";

fn msg_key(ch: &ChannelName) -> String {
    format!("{MSG_PREFIX}{ch}")
}

fn presence_keys(ch: &ChannelName) -> Vec<String> {
    vec![
        format!("relay:{{{ch}}}:pres"),
        format!("relay:{{{ch}}}:pexp"),
    ]
}

fn kind_code(kind: DataKind) -> &'static str {
    match kind {
        DataKind::Json => "j",
        DataKind::Binary => "b",
    }
}

fn parse_kind(s: &[u8]) -> Option<DataKind> {
    match s {
        b"j" => Some(DataKind::Json),
        b"b" => Some(DataKind::Binary),
        _ => None,
    }
}

/// Parses `<epoch> <seq> <kind> <t> <payload>`.
fn parse_msg(b: &Bytes) -> Option<Incoming> {
    let mut rest = &b[..];
    let mut fields = [&b""[..]; 4];
    for f in fields.iter_mut() {
        let sp = memchr::memchr(b' ', rest)?;
        *f = &rest[..sp];
        rest = &rest[sp + 1..];
    }
    let data_at = b.len() - rest.len();
    let epoch = Epoch::parse(std::str::from_utf8(fields[0]).ok()?)?;
    Some(Incoming::Message(
        epoch,
        Entry {
            seq: std::str::from_utf8(fields[1]).ok()?.parse().ok()?,
            kind: parse_kind(fields[2])?,
            ms: std::str::from_utf8(fields[3]).ok()?.parse().ok()?,
            data: b.slice(data_at..),
        },
    ))
}

fn protocol(what: &str) -> BackplaneError {
    BackplaneError::Protocol(what.to_owned())
}

fn unavailable(e: impl std::fmt::Display) -> BackplaneError {
    BackplaneError::Unavailable(e.to_string())
}

fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(n) => u64::try_from(*n).ok(),
        other => other.as_str().and_then(|s| s.parse().ok()),
    }
}

fn value_epoch(v: &Value) -> Option<Epoch> {
    v.as_str().and_then(|s| Epoch::parse(&s))
}

/// One stream entry: `[id, [field, value, ...]]`.
fn parse_entry(v: Value) -> Option<Entry> {
    let mut parts = v.into_array().into_iter();
    let id = parts.next()?;
    let id = id.as_str()?;
    let seq: u64 = id.split('-').next()?.parse().ok()?;
    let fields = parts.next()?.into_array();
    let (mut kind, mut ms, mut data) = (None, None, None);
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        match k.as_bytes() {
            Some(b"k") => kind = v.as_bytes().and_then(parse_kind),
            Some(b"t") => ms = value_u64(&v),
            Some(b"d") => data = v.into_bytes(),
            _ => {}
        }
    }
    Some(Entry {
        seq,
        kind: kind?,
        ms: ms?,
        data: data.unwrap_or_default(),
    })
}

fn parse_entries(v: Value) -> Result<Vec<Entry>, BackplaneError> {
    v.into_array()
        .into_iter()
        .map(|e| parse_entry(e).ok_or_else(|| protocol("bad stream entry")))
        .collect()
}

/// The sync script's reply: `{epoch, top, mode, entries}` (mode 0: newest first).
fn parse_sync(v: Value) -> Result<Snapshot, BackplaneError> {
    let mut parts = v.into_array().into_iter();
    let (Some(e), Some(top), Some(mode), Some(entries)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(protocol("short sync reply"));
    };
    let since = value_u64(&mode) == Some(1);
    let mut entries = parse_entries(entries)?;
    if !since {
        entries.reverse();
    }
    Ok(Snapshot {
        epoch: value_epoch(&e).ok_or_else(|| protocol("bad epoch"))?,
        top: value_u64(&top).ok_or_else(|| protocol("bad top"))?,
        since,
        entries,
    })
}

/// The presence script's reading: `{members hash, expiries zset}`.
fn parse_members(v: Value) -> Members {
    let mut members = HashMap::new();
    let mut parts = v.into_array().into_iter();
    let (Some(hash), Some(zset)) = (parts.next(), parts.next()) else {
        return members;
    };
    let mut expiries: HashMap<String, u64> = HashMap::new();
    let mut it = zset.into_array().into_iter();
    while let (Some(client), Some(score)) = (it.next(), it.next()) {
        if let (Some(c), Some(s)) = (client.as_string(), score.as_str()) {
            if let Ok(x) = s.parse::<f64>() {
                expiries.insert(c, x as u64);
            }
        }
    }
    let mut it = hash.into_array().into_iter();
    while let (Some(client), Some(enc)) = (it.next(), it.next()) {
        let (Some(client), Some(enc)) = (client.as_string(), enc.as_bytes()) else {
            continue;
        };
        let (Some((node, who)), Some(&exp)) = (decode_member(&client, enc), expiries.get(&client))
        else {
            continue;
        };
        members.insert(who.client.clone(), (node, who, exp));
    }
    members
}

/// Starts the Redis backplane: its own thread and runtime, and a supervisor that connects (and
/// reconnects) to Redis until `stop` is cancelled. Returns at once; the node is not ready until
/// the first connection succeeds.
pub fn start(
    settings: Settings,
    engine: Arc<Engine>,
    wakers: Wakers,
    stop: CancellationToken,
) -> std::io::Result<Arc<Replica>> {
    let invalid = |e: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "--redis-url {}: {e}",
                crate::types::mask_url_password(&settings.url, "<hidden>")
            ),
        )
    };
    let target = Target::parse(&settings.url).map_err(invalid)?;
    // Before the node serves: a URL that names the wrong kind of deployment stops the start.
    let probe = target.clone();
    std::thread::Builder::new()
        .name("relay-redis-check".into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(probe.check())
        })?
        .join()
        .map_err(|_| invalid("the check panicked".into()))?
        .map_err(invalid)?;
    let (ctl, ctl_rx) = mpsc::unbounded_channel();
    let redis = Arc::new(Redis {
        target,
        engine: engine.clone(),
        seeds: Seeds::new(settings.seed),
        settings: settings.clone(),
        conn: ArcSwapOption::empty(),
        ctl,
        scripts: Scripts {
            publish: fred::util::sha1_hash(PUBLISH_LUA),
            sync: fred::util::sha1_hash(SYNC_LUA),
            history: fred::util::sha1_hash(HISTORY_LUA),
            presence: fred::util::sha1_hash(PRESENCE_LUA),
        },
        generation: AtomicU64::new(0),
    });
    super::replica::start(
        redis,
        engine,
        wakers,
        settings,
        stop,
        |redis, replica, stop| async move {
            tokio::spawn(control(redis.clone(), ctl_rx));
            supervise(redis, replica, stop).await;
        },
    )
}

impl Redis {
    /// The connection a publish made on this thread goes out on: the shard's own (`Some`), or
    /// the shared one (`None`, with the count of the shard's publishes in flight on it). On a
    /// shard, starts its own connection when it has none for the current `conn`.
    fn publish_route(&self) -> (Option<Client>, Option<OnShared>) {
        if !super::on_shard() {
            return (None, None);
        }
        let generation = self.generation.load(Ordering::Relaxed);
        OWN.with(|own| {
            let mut own = own.borrow_mut();
            if own.generation != generation {
                if let Some(old) = own.client.take() {
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_millis(500), old.quit()).await;
                    });
                }
                *own = OwnConn {
                    generation,
                    on_shared: own.on_shared.clone(),
                    ..OwnConn::default()
                };
            }
            if let Some(made) = own.connecting.as_ref().and_then(|m| m.lock().take()) {
                own.connecting = None;
                match made {
                    Some(c) => own.client = Some(c),
                    None => own.retry_at = Some(Instant::now() + BACKOFF_CAP),
                }
            }
            if let Some(c) = &own.client {
                if c.is_connected() {
                    if own.on_shared.load(Ordering::Relaxed) == 0 {
                        return (Some(c.clone()), None);
                    }
                } else {
                    own.client = None;
                }
            }
            let due = own.retry_at.is_none_or(|t| Instant::now() >= t);
            if own.client.is_none() && own.connecting.is_none() && due {
                own.connecting = Some(self.connect_own());
            }
            (None, Some(OnShared::new(&own.on_shared)))
        })
    }

    /// Connects a shard's own publish connection (on the shard's runtime); the client (or
    /// `None`, failed) goes into the returned slot.
    fn connect_own(&self) -> Arc<parking_lot::Mutex<Option<Option<Client>>>> {
        let config = self.target.config.clone();
        let slot = Arc::new(parking_lot::Mutex::new(None));
        let to = slot.clone();
        tokio::spawn(async move {
            let made = async {
                let client = build_client(&config, false).ok()?;
                match tokio::time::timeout(COMMAND_TIMEOUT, client.init()).await {
                    Ok(Ok(_handle)) => Some(client),
                    _ => {
                        let _ = client.quit().await;
                        None
                    }
                }
            }
            .await;
            if Arc::strong_count(&to) == 1 {
                // Given up on (the supervisor reconnected meanwhile).
                if let Some(c) = made {
                    let _ = tokio::time::timeout(Duration::from_millis(500), c.quit()).await;
                }
                return;
            }
            *to.lock() = Some(made);
        });
        slot
    }

    fn current(&self) -> Result<Arc<Conn>, BackplaneError> {
        self.conn
            .load_full()
            .ok_or_else(|| unavailable("redis is unavailable"))
    }

    /// Runs the publish script, with `cond` (a conditional publish) or without.
    fn publish_script(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
        cond: Option<PublishConditions>,
    ) -> BoxFuture<Result<(Epoch, u64, bool), BackplaneError>> {
        let mut keys = vec![meta_key(channel), hist_key(channel)];
        // What this node holds of the channel (nothing when it does not receive it).
        let known = self.engine.position(channel);
        let mut args: Vec<Value> = vec![
            self.seeds.epoch().to_string().into(),
            kind_code(kind).into(),
            Value::Bytes(data),
            (self.settings.history_size as i64).into(),
            (self.settings.history_ttl.as_millis().max(1) as i64).into(),
            (self.meta_ttl_ms() as i64).into(),
            msg_key(channel).into(),
            known.map_or(String::new(), |p| p.epoch.to_string()).into(),
            (known.map_or(0, |p| p.seq) as i64).into(),
        ];
        if let Some(cond) = cond {
            if let Some(key) = &cond.idempotency_key {
                keys.push(format!("relay:{{{channel}}}:idem:{key}"));
            }
            args.push(
                cond.expected_seq
                    .map_or(String::new(), |s| s.to_string())
                    .into(),
            );
            args.push((self.settings.idempotency_window.as_millis().max(1) as i64).into());
        }
        let conn = self.current();
        let sha = self.scripts.publish.clone();
        let route = conn.as_ref().ok().map(|_| self.publish_route());
        Box::pin(async move {
            let conn = conn?;
            let reply = match route {
                Some((Some(ref own), _)) => {
                    eval_on(own, &conn, &sha, PUBLISH_LUA, keys, args).await
                }
                _ => eval(&conn, &sha, PUBLISH_LUA, keys, args).await,
            };
            drop(route);
            let mut parts = reply?.into_array().into_iter();
            let (Some(e), Some(seq)) = (parts.next(), parts.next()) else {
                return Err(protocol("short publish reply"));
            };
            let epoch = value_epoch(&e).ok_or_else(|| protocol("bad epoch"))?;
            let seq = value_u64(&seq).ok_or_else(|| protocol("bad seq"))?;
            match parts.next().as_ref().and_then(value_u64) {
                Some(0) => Ok((epoch, seq, false)),
                Some(1) => Ok((epoch, seq, true)),
                Some(2) => Err(BackplaneError::SeqMismatch(StreamPosition { epoch, seq })),
                _ => Err(protocol("bad publish outcome")),
            }
        })
    }

    fn meta_ttl_ms(&self) -> u64 {
        self.settings
            .history_ttl
            .max(Duration::from_secs(3600))
            .as_millis() as u64
    }

    /// Runs one of our scripts by hash, loading it when Redis does not know it (a restart).
    fn script(
        &self,
        sha: &str,
        lua: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> BoxFuture<Result<Value, BackplaneError>> {
        let conn = self.current();
        let sha = sha.to_owned();
        Box::pin(async move { eval(&*conn?, &sha, lua, keys, args).await })
    }
}

/// Runs a script by hash on `conn`, loading it when Redis does not know it (a restart).
async fn eval(
    conn: &Conn,
    sha: &str,
    lua: &'static str,
    keys: Vec<String>,
    args: Vec<Value>,
) -> Result<Value, BackplaneError> {
    eval_on(&conn.cmd, conn, sha, lua, keys, args).await
}

/// [`eval`] on `cmd` (`conn`'s, or a shard's own connection made for it).
async fn eval_on(
    cmd: &Client,
    conn: &Conn,
    sha: &str,
    lua: &'static str,
    keys: Vec<String>,
    args: Vec<Value>,
) -> Result<Value, BackplaneError> {
    let first: Result<Value, RedisError> = match tokio::time::timeout(
        COMMAND_TIMEOUT,
        cmd.evalsha(sha, keys.clone(), args.clone()),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => return Err(unavailable("redis timed out")),
    };
    match first {
        Ok(v) => Ok(v),
        Err(e) if e.details().contains("NOSCRIPT") => {
            match tokio::time::timeout(COMMAND_TIMEOUT, cmd.eval(lua, keys, args)).await {
                Ok(r) => r.map_err(unavailable),
                Err(_) => Err(unavailable("redis timed out")),
            }
        }
        Err(e) => {
            if e.details().contains("READONLY") {
                conn.demoted.notify_one();
            }
            Err(unavailable(e))
        }
    }
}

impl Remote for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn is_up(&self) -> bool {
        self.conn.load().is_some()
    }

    fn publish(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
    ) -> BoxFuture<Result<(Epoch, u64), BackplaneError>> {
        let run = self.publish_script(channel, kind, data, None);
        Box::pin(async move { run.await.map(|(e, s, _)| (e, s)) })
    }

    fn publish_with(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
        cond: PublishConditions,
    ) -> BoxFuture<Result<(Epoch, u64, bool), BackplaneError>> {
        self.publish_script(channel, kind, data, Some(cond))
    }

    fn subscribe(
        &self,
        channels: Vec<ChannelName>,
        _to: &Arc<Replica>,
    ) -> BoxFuture<Result<(), BackplaneError>> {
        // Messages reach the replica through the pub/sub reader of the connection.
        let (tx, rx) = oneshot::channel();
        let _ = self.ctl.send(Ctl::Subscribe(channels, tx));
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(unavailable("the backplane stopped")))
        })
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        let _ = self.ctl.send(Ctl::Unsubscribe(channel.clone()));
    }

    fn snapshot(
        &self,
        channel: &ChannelName,
        since: Option<StreamPosition>,
    ) -> BoxFuture<Result<Snapshot, BackplaneError>> {
        let args: Vec<Value> = vec![
            self.seeds.epoch().to_string().into(),
            since.map_or(String::new(), |p| p.epoch.to_string()).into(),
            (since.map_or(0, |p| p.seq) as i64).into(),
            (self.settings.history_size.max(1) as i64).into(),
            (self.meta_ttl_ms() as i64).into(),
        ];
        let keys = vec![meta_key(channel), hist_key(channel)];
        let run = self.script(&self.scripts.sync, SYNC_LUA, keys, args);
        Box::pin(async move { parse_sync(run.await?) })
    }

    fn history(
        &self,
        channel: &ChannelName,
        since: u64,
        limit: usize,
    ) -> BoxFuture<Result<Option<Stored>, BackplaneError>> {
        let keys = vec![meta_key(channel), hist_key(channel)];
        let args: Vec<Value> = vec![(since as i64).into(), (limit.max(1) as i64).into()];
        let run = self.script(&self.scripts.history, HISTORY_LUA, keys, args);
        Box::pin(async move {
            let mut parts = run.await?.into_array().into_iter();
            let (Some(e), Some(top), Some(entries)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(protocol("short history reply"));
            };
            let Some(epoch) = value_epoch(&e) else {
                return Ok(None);
            };
            let seq = value_u64(&top).ok_or_else(|| protocol("bad top"))?;
            Ok(Some(Stored {
                position: StreamPosition { epoch, seq },
                entries: parse_entries(entries)?,
            }))
        })
    }

    fn presence(
        &self,
        channel: &ChannelName,
        ops: Vec<PresenceOp>,
        read: bool,
    ) -> BoxFuture<Result<Option<Members>, BackplaneError>> {
        if !self.is_up() {
            return Box::pin(std::future::ready(Ok(None)));
        }
        let timeout_ms = self.settings.presence_timeout.as_millis() as u64;
        let now_ms = wall_ms();
        let mut args: Vec<Value> = vec![
            msg_key(channel).into(),
            ((now_ms + timeout_ms) as i64).into(),
            (now_ms as i64).into(),
            ((timeout_ms * 3).max(1000) as i64).into(),
            if read { "1" } else { "0" }.into(),
        ];
        for (op, who) in &ops {
            args.push((*op).into());
            args.push(who.client.to_string().into());
            args.push(Value::Bytes(encode_member(&self.settings.node_id, who)));
        }
        let keys = presence_keys(channel);
        let run = self.script(&self.scripts.presence, PRESENCE_LUA, keys, args);
        Box::pin(async move {
            let v = run.await?;
            Ok(read.then(|| parse_members(v)))
        })
    }

    fn send_control(
        &self,
        message: Bytes,
    ) -> Option<BoxFuture<Result<Option<u64>, BackplaneError>>> {
        let conn = self.current();
        Some(Box::pin(async move {
            let conn = conn?;
            let sent = conn.cmd.publish::<i64, _, _>(CONTROL_KEY, message);
            match tokio::time::timeout(COMMAND_TIMEOUT, sent).await {
                // PUBLISH answers how many subscribers got it: every node subscribes.
                Ok(Ok(n)) => Ok(Some(n.max(0) as u64)),
                Ok(Err(e)) => Err(unavailable(e)),
                Err(_) => Err(unavailable("redis timed out")),
            }
        }))
    }

    fn agrees(&self) -> bool {
        true
    }

    fn agree(
        &self,
        channel: &ChannelName,
        claims: Vec<Claim>,
    ) -> BoxFuture<Result<Vec<Agreed>, BackplaneError>> {
        let (conn, channel) = (self.current(), channel.clone());
        let lease = self.settings.lease();
        Box::pin(async move { agree::agree(&*conn?, &channel, &claims, lease).await })
    }

    fn reap(&self) -> BoxFuture<Result<Vec<(ChannelName, Agreed)>, BackplaneError>> {
        let conn = self.current();
        let lease = self.settings.lease();
        Box::pin(async move { agree::reap(&*conn?, lease).await })
    }
}

/// A client of the supervisor's settings: no reconnect of its own (the supervisor's, or the
/// shard's for its own connection), one attempt per command. `pubsub`: it receives pub/sub
/// messages (a deep broadcast buffer, so that a burst does not lag the reader); a client that
/// only sends commands keeps fred's small default.
fn build_client(config: &RedisConfig, pubsub: bool) -> Result<Client, RedisError> {
    Builder::from_config(config.clone())
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 1;
            c.unresponsive.max_timeout = Some(Duration::from_secs(5));
            c.unresponsive.interval = Duration::from_secs(1);
        })
        .with_performance_config(|p| {
            if pubsub {
                p.broadcast_channel_capacity = 1 << 16;
            }
        })
        .build()
}

async fn connect(
    redis: &Redis,
) -> Result<(Client, Client, Vec<fred::types::ConnectHandle>), RedisError> {
    let cmd = build_client(&redis.target.config, false)?;
    let sub = build_client(&redis.target.config, true)?;
    let h1 = cmd.init().await?;
    let h2 = match sub.init().await {
        Ok(h) => h,
        Err(e) => {
            let _ = cmd.quit().await;
            return Err(e);
        }
    };
    for lua in [PUBLISH_LUA, SYNC_LUA, HISTORY_LUA, PRESENCE_LUA] {
        // A cluster: on every primary (a script runs where its keys are).
        let loaded = if cmd.is_clustered() {
            cmd.script_load_cluster::<Value, _>(lua).await
        } else {
            cmd.script_load::<Value, _>(lua).await.map(|_| Value::Null)
        };
        if let Err(e) = loaded {
            let _ = cmd.quit().await;
            let _ = sub.quit().await;
            return Err(e);
        }
    }
    if let Err(e) = sub.subscribe(CONTROL_KEY).await {
        let _ = cmd.quit().await;
        let _ = sub.quit().await;
        return Err(e);
    }
    Ok((cmd, sub, vec![h1, h2]))
}

async fn supervise(redis: Arc<Redis>, replica: Arc<Replica>, stop: CancellationToken) {
    let settings = &redis.settings;
    let mut attempt: u32 = 0;
    let mut first = true;
    loop {
        if stop.is_cancelled() {
            break;
        }
        let connected = tokio::select! {
            r = connect(&redis) => Some(r),
            _ = stop.cancelled() => None,
        };
        match connected {
            None => break,
            Some(Ok((cmd, sub, handles))) => {
                attempt = 0;
                let rx = sub.message_rx();
                let conn = Arc::new(Conn {
                    cmd,
                    sub,
                    demoted: tokio::sync::Notify::new(),
                });
                let reader = tokio::spawn(read_messages(replica.clone(), rx));
                redis.generation.fetch_add(1, Ordering::Relaxed);
                redis.conn.store(Some(conn.clone()));
                replica.connected(std::mem::take(&mut first));
                let mut handles = handles.into_iter();
                let (h1, h2) = (handles.next(), handles.next());
                let stopped = tokio::select! {
                    _ = async { if let Some(h) = h1 { let _ = h.await; } } => false,
                    _ = async { if let Some(h) = h2 { let _ = h.await; } } => false,
                    _ = conn.demoted.notified() => {
                        tracing::warn!(node = %settings.node_id, "backplane: redis answered READONLY (no longer the master); reconnecting");
                        false
                    }
                    _ = stop.cancelled() => true,
                };
                redis.conn.store(None);
                let _ = tokio::time::timeout(Duration::from_millis(500), conn.cmd.quit()).await;
                let _ = tokio::time::timeout(Duration::from_millis(500), conn.sub.quit()).await;
                reader.abort();
                replica.disconnected();
                if stopped {
                    break;
                }
                tracing::warn!(node = %settings.node_id, "backplane: lost the connection to redis");
            }
            Some(Err(e)) => {
                if attempt == 0 || attempt % 10 == 0 {
                    tracing::warn!(node = %settings.node_id, url = %crate::types::mask_url_password(&settings.url, "<hidden>"), error = %e, attempt, "backplane: cannot connect to redis");
                }
            }
        }
        let d = backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, redis.seeds.random());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.cancelled() => break,
        }
    }
}

/// Most pub/sub messages handed to the replica in one batch.
const BATCH: usize = 4096;

/// Hands what pub/sub delivers to the replica: messages, and presence announcements. Everything
/// the connection has delivered when the reader wakes is taken at once and ingested as one
/// batch (one lock, one wake of each shard), so that a burst reaches the shards' pumps in one
/// pass instead of one wake per message.
async fn read_messages(replica: Arc<Replica>, mut rx: broadcast::Receiver<fred::types::Message>) {
    use broadcast::error::{RecvError, TryRecvError};
    let mut batch = Batch::default();
    loop {
        let mut next = Some(rx.recv().await);
        let mut taken = 0;
        while let Some(r) = next.take() {
            match r {
                Ok(m) => on_message(&replica, m, &mut batch),
                Err(RecvError::Lagged(n)) => {
                    replica.on_batch(&mut batch);
                    tracing::warn!(
                        lost = n,
                        "backplane: pub/sub reader lagged; resyncing every channel"
                    );
                    replica.resync_all();
                }
                Err(RecvError::Closed) => {
                    replica.on_batch(&mut batch);
                    return;
                }
            }
            taken += 1;
            if taken < BATCH {
                next = match rx.try_recv() {
                    Ok(m) => Some(Ok(m)),
                    Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                    Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                    Err(TryRecvError::Empty) => None,
                };
            }
        }
        replica.on_batch(&mut batch);
    }
}

fn on_message(replica: &Replica, m: fred::types::Message, batch: &mut Batch) {
    if m.channel == CONTROL_KEY {
        if let Some(payload) = m.value.into_bytes() {
            replica.on_control(&payload);
        }
        return;
    }
    let Some(name) = m
        .channel
        .strip_prefix(MSG_PREFIX)
        .and_then(|n| ChannelName::new(n).ok())
    else {
        return;
    };
    let Some(payload) = m.value.into_bytes() else {
        return;
    };
    if payload.starts_with(b"P") {
        // `P+ <client> <member>` or `P- <client>`, placed after the messages before it.
        if batch.holds(&name) {
            replica.on_batch(batch);
        }
        let mut parts = payload.splitn(3, |&b| b == b' ');
        let (Some(op), Some(client)) = (parts.next(), parts.next()) else {
            return;
        };
        let Ok(client) = std::str::from_utf8(client) else {
            return;
        };
        match op {
            b"P+" => {
                if let Some(member) = parts.next() {
                    replica.presence_joined(&name, client, member);
                }
            }
            b"P-" => replica.presence_left(&name, client),
            _ => {}
        }
        return;
    }
    match parse_msg(&payload) {
        Some(msg) => batch.push(name, msg),
        None => tracing::warn!(channel = %name, "backplane: unreadable message ignored"),
    }
}

/// Applies subscribes and unsubscribes in the order asked.
async fn control(redis: Arc<Redis>, mut rx: mpsc::UnboundedReceiver<Ctl>) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Ctl::Subscribe(names, done) => {
                let r = match redis.current() {
                    Ok(conn) => {
                        let keys: Vec<String> = names.iter().map(msg_key).collect();
                        match tokio::time::timeout(COMMAND_TIMEOUT, conn.sub.subscribe(keys)).await
                        {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err(unavailable(e)),
                            Err(_) => Err(unavailable("redis timed out")),
                        }
                    }
                    Err(e) => Err(e),
                };
                let _ = done.send(r);
            }
            Ctl::Unsubscribe(name) => {
                if let Ok(conn) = redis.current() {
                    let _ =
                        tokio::time::timeout(COMMAND_TIMEOUT, conn.sub.unsubscribe(msg_key(&name)))
                            .await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn messages_round_trip_binary_payloads() {
        let b = Bytes::from_static(b"1000000000000abc 42 b 1712345678901 \x00 raw \xff bytes");
        let Some(Incoming::Message(epoch, m)) = parse_msg(&b) else {
            panic!("a message");
        };
        assert_eq!(epoch, Epoch(0x1000000000000abc));
        assert_eq!((m.seq, m.kind, m.ms), (42, DataKind::Binary, 1712345678901));
        assert_eq!(&m.data[..], b"\x00 raw \xff bytes");
        assert!(parse_msg(&Bytes::from_static(b"zz 1 j 1 x")).is_none());
        assert!(parse_msg(&Bytes::from_static(b"1 1 q 1 x")).is_none());
        let Some(Incoming::Message(_, empty)) = parse_msg(&Bytes::from_static(b"1 1 j 5 ")) else {
            panic!("a message");
        };
        assert!(empty.data.is_empty());
    }

    #[test]
    fn redis_urls_name_one_server_a_cluster_or_a_sentinel_master() {
        use fred::types::config::ServerConfig;
        let hosts = |c: &RedisConfig| -> Vec<String> {
            c.server
                .hosts()
                .iter()
                .map(|h| format!("{}:{}", h.host, h.port))
                .collect()
        };
        let one = Target::parse("redis://u:p%40ss@10.0.0.1:7000/2")
            .unwrap()
            .config;
        assert!(matches!(one.server, ServerConfig::Centralized { .. }));
        assert_eq!(
            (one.username.as_deref(), one.password.as_deref()),
            (Some("u"), Some("p@ss"))
        );
        assert_eq!(one.database, Some(2));

        let c = Target::parse("redis-cluster://:secret@a:7000,b:7001,[::1]:7002")
            .unwrap()
            .config;
        assert!(matches!(c.server, ServerConfig::Clustered { .. }));
        let mut seeds = hosts(&c);
        seeds.sort();
        assert_eq!(seeds, ["::1:7002", "a:7000", "b:7001"]);
        assert_eq!(c.password.as_deref(), Some("secret"));

        let s = Target::parse("redis-sentinel://s1:26379,s2:26380/mymaster/3")
            .unwrap()
            .config;
        let ServerConfig::Sentinel { service_name, .. } = &s.server else {
            panic!("a sentinel config");
        };
        assert_eq!(service_name, "mymaster");
        assert_eq!(hosts(&s).len(), 2);
        assert_eq!(s.database, Some(3));

        for bad in [
            "http://a:1",
            "rediss://a:1",
            "rediss-cluster://a:1",
            "redis-cluster://a",
            "redis-cluster://a:1,",
            "redis-cluster://a:1/0",
            "redis-cluster://a:1?node=b:2",
            "redis-sentinel://a:26379",
            "redis-sentinel://a:26379/",
            "redis-sentinel://a:x/m",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} is refused");
        }
    }

    #[test]
    fn keys_share_a_hash_tag() {
        let ch = ChannelName::new("room:1").unwrap();
        assert_eq!(meta_key(&ch), "relay:{room:1}:meta");
        assert_eq!(hist_key(&ch), "relay:{room:1}:hist");
        assert_eq!(msg_key(&ch), "relay:msg:room:1");
    }

    fn entry(seq: &str, data: &str) -> Value {
        Value::Array(vec![
            Value::from(seq),
            Value::Array(vec![
                Value::from("k"),
                Value::from("j"),
                Value::from("t"),
                Value::from("99"),
                Value::from("d"),
                Value::from(data),
            ]),
        ])
    }

    #[test]
    fn stream_entries_parse() {
        let m = parse_entry(entry("7-1", "{\"a\":1}")).unwrap();
        assert_eq!((m.seq, m.kind, m.ms), (7, DataKind::Json, 99));
        assert_eq!(&m.data[..], b"{\"a\":1}");
    }

    #[test]
    fn snapshots_are_ascending_whatever_the_mode() {
        let reply = |mode: i64, ids: [&str; 2]| {
            Value::Array(vec![
                Value::from("1000000000000001"),
                Value::Integer(9),
                Value::Integer(mode),
                Value::Array(ids.iter().map(|id| entry(id, "1")).collect()),
            ])
        };
        let seqs = |s: &Snapshot| s.entries.iter().map(|e| e.seq).collect::<Vec<_>>();
        let since = parse_sync(reply(1, ["8-1", "9-1"])).unwrap();
        assert!(since.since);
        assert_eq!(seqs(&since), [8, 9]);
        let last = parse_sync(reply(0, ["9-1", "8-1"])).unwrap();
        assert!(!last.since);
        assert_eq!(
            seqs(&last),
            [8, 9],
            "newest-first replies are turned around"
        );
        assert_eq!((last.epoch, last.top), (Epoch(0x1000000000000001), 9));
    }
}
