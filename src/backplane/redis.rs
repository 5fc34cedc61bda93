//! The Redis backplane (standalone Redis; keys use `{channel}` hash tags so that one channel's
//! keys share a cluster slot).
//!
//! # Keys, per channel `ch`
//! - `relay:{ch}:meta`, a hash: `e` the epoch (hex), `top` the last seq. Expires after
//!   `max(history TTL, 1h)` without a publish, so an epoch outlives the data it numbered.
//! - `relay:{ch}:hist`, a stream: entry `<seq>-1` with fields `k` (kind `j`/`b`), `t` (publish
//!   time, ms, from Redis `TIME`) and `d` (the payload); `MAXLEN` = history size; expires
//!   after the history TTL without a publish.
//! - `relay:msg:{ch}`, the pub/sub channel: `<epoch> <seq> <kind> <t> <payload>`.
//!
//! # Publish
//! One Lua script (atomic for the channel): create the epoch if absent (and drop a stale
//! stream), `HINCRBY top`, `XADD`, `PEXPIRE` both keys, `PUBLISH`. Redis runs scripts one at a
//! time, so pub/sub order is seq order. Publishes from every shard share one multiplexed
//! connection: many `EVALSHA`s are in flight at once, pipelined.
//!
//! # Receive
//! A node `SUBSCRIBE`s `relay:msg:{ch}` only while it has local subscribers in `ch`. On join:
//! `SUBSCRIBE` first, then one Lua script reads `(epoch, top, history)`; messages that arrive
//! meanwhile are buffered. The local channel then adopts that state ([`Engine::ingest`] of what
//! it lacks when its epoch matches and the stream still has the messages after its top,
//! [`Engine::reset`] otherwise, which closes local subscribers for resume), the buffer is
//! replayed (duplicates ignored), and from then on messages are ingested as they come. A gap
//! (a message lost by pub/sub) or another epoch triggers the same resync.
//!
//! # Failure
//! One supervisor owns the connections: a command connection and a pub/sub connection, made
//! anew after any loss, with full-jitter exponential backoff (100 ms base, 5 s cap). While
//! down: publishes fail at once with [`BackplaneError::Unavailable`] (HTTP 503, WS
//! `unavailable`), joins of channels not yet received fail the same way, `/readyz` is 503,
//! and local subscribers keep what they have. On reconnect every joined channel is
//! re-subscribed and resynced as above: subscribers either get what they missed or are closed
//! and resume (`recovered:false` when the history cannot cover their gap).
//!
//! [`Engine::ingest`]: crate::engine::Engine::ingest
//! [`Engine::reset`]: crate::engine::Engine::reset

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use fred::prelude::{
    Builder, Client, ClientLike, Config as RedisConfig, Error as RedisError, EventInterface,
    LuaInterface, PubsubInterface, Value,
};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::presence::{decode_member, encode_member, Mirror, PresenceOp};
use super::{backoff, instant_of, wall_ms, Backplane, BackplaneError, BoxFuture, Wakers};
use crate::engine::{Engine, History, IngestOutcome, Publication, RemoteEntry};
use crate::types::{ChannelName, DataKind, Epoch, StreamPosition};

/// How long one Redis command may take before the publish (or join) fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a subscriber waits for its channel to be joined.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A channel left without local subscribers for this long is unsubscribed.
const LINGER: Duration = Duration::from_secs(2);
/// How often the maintenance pass runs (leave idle channels, join forgotten ones).
const TICK: Duration = Duration::from_millis(500);
/// Most messages buffered for a channel while it syncs; past that, it syncs again.
const SYNC_BUFFER: usize = 100_000;
/// Reconnect backoff.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

const PUBLISH_LUA: &str = r#"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e, 'top', 0)
  redis.call('DEL', KEYS[2])
end
local seq = redis.call('HINCRBY', KEYS[1], 'top', 1)
local t = redis.call('TIME')
local ms = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], seq .. '-1', 'k', ARGV[2], 't', ms, 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[7], e .. ' ' .. seq .. ' ' .. ARGV[2] .. ' ' .. ms .. ' ' .. ARGV[3])
return {e, seq}
"#;

/// `ARGV`: candidate epoch, since epoch (or ''), since seq, limit, meta TTL ms. Returns
/// `{epoch, top, mode, entries}`: mode 1 = every entry after `since` (the caller's epoch
/// matches and the stream still holds `since + 1`), mode 0 = the last `limit` entries, newest
/// first.
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

/// See the module docs.
pub struct RedisBackplane {
    inner: Arc<Inner>,
}

struct Scripts {
    publish: String,
    sync: String,
    history: String,
    presence: String,
}

struct Metrics {
    up: Gauge,
    reconnects: Counter,
    publish: Histogram,
    resyncs: Counter,
}

struct Inner {
    settings: super::Settings,
    engine: Arc<Engine>,
    wakers: Wakers,
    rt: tokio::runtime::Handle,
    conn: ArcSwapOption<Conn>,
    chans: Mutex<HashMap<ChannelName, Chan>>,
    ctl: mpsc::UnboundedSender<Ctl>,
    epochs: AtomicU64,
    scripts: Scripts,
    metrics: Metrics,
}

struct Conn {
    cmd: Client,
    sub: Client,
    generation: u64,
}

/// A channel this node receives (or is about to).
struct Chan {
    /// The local channel matches Redis and messages are ingested as they come.
    synced: bool,
    /// Synced at least once (it has, or had, local subscribers to keep serving).
    ever_synced: bool,
    /// Identifies the current sync; a finished sync applies only if it is still current.
    sync_id: u64,
    /// Messages received while syncing.
    buf: Vec<Msg>,
    buf_overflow: bool,
    /// Subscribers waiting for the sync.
    waiters: Vec<oneshot::Sender<Result<(), BackplaneError>>>,
    last_join: Instant,
    idle_ticks: u32,
    /// Presence channel: what this node wrote, and the other nodes' members it mirrors.
    presence: Mirror,
}

impl Chan {
    fn new(now: Instant) -> Self {
        Self {
            synced: false,
            ever_synced: false,
            sync_id: 0,
            buf: Vec::new(),
            buf_overflow: false,
            waiters: Vec::new(),
            last_join: now,
            idle_ticks: 0,
            presence: Mirror::default(),
        }
    }

    fn fail_waiters(&mut self, why: &str) {
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(BackplaneError::Unavailable(why.to_owned())));
        }
    }
}

/// One message as carried by pub/sub.
#[derive(Clone, Debug, PartialEq)]
struct Msg {
    epoch: Epoch,
    seq: u64,
    kind: DataKind,
    ms: u64,
    data: Bytes,
}

enum Ctl {
    Subscribe(ChannelName),
    Unsubscribe(ChannelName),
    Resubscribe,
}

fn meta_key(ch: &ChannelName) -> String {
    format!("relay:{{{ch}}}:meta")
}

fn hist_key(ch: &ChannelName) -> String {
    format!("relay:{{{ch}}}:hist")
}

const MSG_PREFIX: &str = "relay:msg:";

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
fn parse_msg(b: &Bytes) -> Option<Msg> {
    let mut rest = &b[..];
    let mut fields = [&b""[..]; 4];
    for f in fields.iter_mut() {
        let sp = memchr::memchr(b' ', rest)?;
        *f = &rest[..sp];
        rest = &rest[sp + 1..];
    }
    let data_at = b.len() - rest.len();
    Some(Msg {
        epoch: Epoch::parse(std::str::from_utf8(fields[0]).ok()?)?,
        seq: std::str::from_utf8(fields[1]).ok()?.parse().ok()?,
        kind: parse_kind(fields[2])?,
        ms: std::str::from_utf8(fields[3]).ok()?.parse().ok()?,
        data: b.slice(data_at..),
    })
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
fn parse_entry(v: Value) -> Option<Msg> {
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
    Some(Msg {
        epoch: Epoch(0),
        seq,
        kind: kind?,
        ms: ms?,
        data: data.unwrap_or_default(),
    })
}

fn parse_entries(v: Value) -> Result<Vec<Msg>, BackplaneError> {
    v.into_array()
        .into_iter()
        .map(|e| parse_entry(e).ok_or_else(|| protocol("bad stream entry")))
        .collect()
}

impl RedisBackplane {
    /// Starts the backplane: its own thread and runtime, and a supervisor that connects (and
    /// reconnects) to Redis until `stop` is cancelled. Returns at once; the node is not ready
    /// until the first connection succeeds.
    pub fn start(
        settings: super::Settings,
        engine: Arc<Engine>,
        wakers: Wakers,
        stop: CancellationToken,
    ) -> std::io::Result<Arc<Self>> {
        RedisConfig::from_url(&settings.url)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            epochs: AtomicU64::new(0),
            engine,
            wakers,
            rt: rt.handle().clone(),
            conn: ArcSwapOption::empty(),
            chans: Mutex::new(HashMap::new()),
            ctl,
            scripts: Scripts {
                publish: fred::util::sha1_hash(PUBLISH_LUA),
                sync: fred::util::sha1_hash(SYNC_LUA),
                history: fred::util::sha1_hash(HISTORY_LUA),
                presence: fred::util::sha1_hash(PRESENCE_LUA),
            },
            metrics: Metrics {
                up: gauge!("relay_backplane_up", "backplane" => "redis"),
                reconnects: counter!("relay_backplane_reconnects_total", "backplane" => "redis"),
                publish: histogram!("relay_backplane_publish_seconds", "backplane" => "redis"),
                resyncs: counter!("relay_backplane_resyncs_total", "backplane" => "redis"),
            },
            settings,
        });
        inner.metrics.up.set(0.0);
        let sup = inner.clone();
        std::thread::Builder::new()
            .name("relay-backplane".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::spawn(control(sup.clone(), ctl_rx));
                    tokio::spawn(maintenance(sup.clone(), stop.clone()));
                    supervise(sup, stop).await;
                });
            })?;
        Ok(Arc::new(RedisBackplane { inner }))
    }
}

impl Inner {
    fn current(&self) -> Option<Arc<Conn>> {
        self.conn.load_full()
    }

    fn candidate_epoch(&self) -> String {
        let n = self.epochs.fetch_add(1, Ordering::Relaxed);
        Epoch(crate::engine::mix_public(self.settings.seed, n) | 1 << 60).to_string()
    }

    fn meta_ttl_ms(&self) -> u64 {
        self.settings
            .history_ttl
            .max(Duration::from_secs(3600))
            .as_millis() as u64
    }

    /// Runs one of our scripts by hash, loading it when Redis does not know it (a restart).
    async fn script(
        &self,
        conn: &Conn,
        sha: &str,
        lua: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, BackplaneError> {
        let first: Result<Value, RedisError> = match tokio::time::timeout(
            COMMAND_TIMEOUT,
            conn.cmd.evalsha(sha, keys.clone(), args.clone()),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => return Err(unavailable("redis timed out")),
        };
        match first {
            Ok(v) => Ok(v),
            Err(e) if e.details().contains("NOSCRIPT") => {
                match tokio::time::timeout(COMMAND_TIMEOUT, conn.cmd.eval(lua, keys, args)).await {
                    Ok(r) => r.map_err(unavailable),
                    Err(_) => Err(unavailable("redis timed out")),
                }
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Starts a sync of `name` (its entry must exist): buffer messages, read the state, apply.
    fn start_sync(self: &Arc<Self>, name: &ChannelName, c: &mut Chan) {
        c.synced = false;
        c.sync_id += 1;
        // Write this node's members again and read the others' (Redis may have lost them).
        c.presence.restart();
        self.metrics.resyncs.increment(1);
        let id = c.sync_id;
        let me = self.clone();
        let name = name.clone();
        self.rt.spawn(async move { me.sync(name, id).await });
    }

    async fn sync(self: Arc<Self>, name: ChannelName, id: u64) {
        let mut attempt = 0;
        loop {
            let still_current = |me: &Inner| {
                me.chans
                    .lock()
                    .get(&name)
                    .is_some_and(|c| c.sync_id == id && !c.synced)
            };
            if !still_current(&self) {
                return;
            }
            let Some(conn) = self.current() else {
                // Down: the reconnect resyncs every channel.
                return;
            };
            let since = self.engine.position(&name);
            let args: Vec<Value> = vec![
                self.candidate_epoch().into(),
                since.map_or(String::new(), |p| p.epoch.to_string()).into(),
                (since.map_or(0, |p| p.seq) as i64).into(),
                (self.settings.history_size.max(1) as i64).into(),
                (self.meta_ttl_ms() as i64).into(),
            ];
            let keys = vec![meta_key(&name), hist_key(&name)];
            match self
                .script(&conn, &self.scripts.sync, SYNC_LUA, keys, args)
                .await
                .and_then(parse_sync)
            {
                Ok(snapshot) => {
                    self.apply_sync(&name, id, since, snapshot);
                    return;
                }
                Err(e) => {
                    tracing::warn!(channel = %name, error = %e, "backplane sync failed; retrying");
                    attempt += 1;
                    if attempt >= 5 {
                        if let Some(c) = self.chans.lock().get_mut(&name) {
                            c.fail_waiters("the channel could not be synced from redis");
                        }
                    }
                    let d = backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, self.random());
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    fn random(&self) -> u64 {
        crate::engine::mix_public(
            self.settings.seed ^ wall_ms(),
            self.epochs.fetch_add(1, Ordering::Relaxed),
        )
    }

    fn apply_sync(
        self: &Arc<Self>,
        name: &ChannelName,
        id: u64,
        since: Option<StreamPosition>,
        s: Snapshot,
    ) {
        let mut chans = self.chans.lock();
        let Some(c) = chans.get_mut(name) else {
            return;
        };
        if c.sync_id != id || c.synced {
            return;
        }
        let now = Instant::now();
        let now_ms = wall_ms();
        let mut wake = 0;
        let mut continuous = s.mode_since && since.is_some_and(|p| p.epoch == s.epoch);
        if continuous {
            for m in &s.entries {
                match self.engine.ingest(
                    name,
                    s.epoch,
                    m.seq,
                    m.kind,
                    m.data.clone(),
                    instant_of(m.ms, now, now_ms),
                    now,
                ) {
                    IngestOutcome::Appended(w) => wake |= w,
                    IngestOutcome::Duplicate => {}
                    IngestOutcome::Gap { .. } | IngestOutcome::OtherEpoch => {
                        continuous = false;
                        break;
                    }
                }
            }
            if continuous && self.engine.position(name).map(|p| p.seq) != Some(s.top) {
                continuous = false;
            }
        }
        if !continuous {
            let entries = s
                .entries
                .iter()
                .rev()
                .map(|m| RemoteEntry {
                    seq: m.seq,
                    at: instant_of(m.ms, now, now_ms),
                    kind: m.kind,
                    data: m.data.clone(),
                })
                .collect();
            wake |= self.engine.reset(name, s.epoch, s.top, entries, now);
            if c.ever_synced {
                tracing::info!(channel = %name, epoch = %s.epoch, top = s.top, "backplane: channel reset to redis state");
            }
        }
        // Messages that came while reading: duplicates of the snapshot, then its successors.
        let mut again = c.buf_overflow;
        c.buf_overflow = false;
        for m in std::mem::take(&mut c.buf) {
            let at = instant_of(m.ms, now, now_ms);
            match self
                .engine
                .ingest(name, m.epoch, m.seq, m.kind, m.data, at, now)
            {
                IngestOutcome::Appended(w) => wake |= w,
                IngestOutcome::Duplicate => {}
                IngestOutcome::Gap { .. } | IngestOutcome::OtherEpoch => again = true,
            }
        }
        if again {
            self.start_sync(name, c);
        } else {
            c.synced = true;
            c.ever_synced = true;
            for w in c.waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
        }
        drop(chans);
        self.wakers.wake(wake);
    }

    fn on_message(self: &Arc<Self>, m: fred::types::Message) {
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
            return self.on_presence_message(&name, &payload);
        }
        let Some(msg) = parse_msg(&payload) else {
            tracing::warn!(channel = %name, "backplane: unreadable message ignored");
            return;
        };
        let mut chans = self.chans.lock();
        let Some(c) = chans.get_mut(&name) else {
            return;
        };
        if !c.synced {
            if c.buf.len() < SYNC_BUFFER {
                c.buf.push(msg);
            } else {
                c.buf_overflow = true;
            }
            return;
        }
        let now = Instant::now();
        let at = instant_of(msg.ms, now, wall_ms());
        match self.engine.ingest(
            &name,
            msg.epoch,
            msg.seq,
            msg.kind,
            msg.data.clone(),
            at,
            now,
        ) {
            IngestOutcome::Appended(w) => {
                drop(chans);
                self.wakers.wake(w);
            }
            IngestOutcome::Duplicate => {}
            IngestOutcome::Gap { top } => {
                tracing::info!(channel = %name, top, seq = msg.seq, "backplane: gap; resyncing");
                c.buf.push(msg);
                self.start_sync(&name, c);
            }
            IngestOutcome::OtherEpoch => {
                tracing::info!(channel = %name, epoch = %msg.epoch, "backplane: new epoch; resyncing");
                c.buf.push(msg);
                self.start_sync(&name, c);
            }
        }
    }

    /// `P+ <client> <member>` or `P- <client>` from another node (or this one: ignored).
    fn on_presence_message(self: &Arc<Self>, name: &ChannelName, payload: &[u8]) {
        let mut parts = payload.splitn(3, |&b| b == b' ');
        let (Some(op), Some(client)) = (parts.next(), parts.next()) else {
            return;
        };
        let Ok(client) = std::str::from_utf8(client) else {
            return;
        };
        let now = Instant::now();
        let mut chans = self.chans.lock();
        let Some(c) = chans.get_mut(name) else {
            return;
        };
        let me = self.settings.node_id.as_str();
        let wake = match op {
            b"P+" => match parts.next().and_then(|b| decode_member(client, b)) {
                Some((node, who)) => c.presence.joined(&self.engine, name, me, &node, who, now),
                None => 0,
            },
            b"P-" => c.presence.left(&self.engine, name, client, now),
            _ => 0,
        };
        drop(chans);
        self.wakers.wake(wake);
    }

    /// Every joined channel syncs again (after a reconnect or lost messages).
    fn resync_all(self: &Arc<Self>) {
        let mut chans = self.chans.lock();
        let names: Vec<ChannelName> = chans.keys().cloned().collect();
        for name in names {
            if let Some(c) = chans.get_mut(&name) {
                self.start_sync(&name, c);
            }
        }
    }
}

struct Snapshot {
    epoch: Epoch,
    top: u64,
    mode_since: bool,
    /// Mode since: ascending; mode last: newest first.
    entries: Vec<Msg>,
}

fn parse_sync(v: Value) -> Result<Snapshot, BackplaneError> {
    let mut parts = v.into_array().into_iter();
    let (Some(e), Some(top), Some(mode), Some(entries)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(protocol("short sync reply"));
    };
    Ok(Snapshot {
        epoch: value_epoch(&e).ok_or_else(|| protocol("bad epoch"))?,
        top: value_u64(&top).ok_or_else(|| protocol("bad top"))?,
        mode_since: value_u64(&mode) == Some(1),
        entries: parse_entries(entries)?,
    })
}

async fn connect(
    inner: &Inner,
) -> Result<(Client, Client, Vec<fred::types::ConnectHandle>), RedisError> {
    let config = RedisConfig::from_url(&inner.settings.url)?;
    let build = || {
        Builder::from_config(config.clone())
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                c.max_command_attempts = 1;
                c.unresponsive.max_timeout = Some(Duration::from_secs(5));
                c.unresponsive.interval = Duration::from_secs(1);
            })
            .with_performance_config(|p| {
                p.broadcast_channel_capacity = 1 << 16;
            })
            .build()
    };
    let cmd = build()?;
    let sub = build()?;
    let h1 = cmd.init().await?;
    let h2 = match sub.init().await {
        Ok(h) => h,
        Err(e) => {
            let _ = cmd.quit().await;
            return Err(e);
        }
    };
    for lua in [PUBLISH_LUA, SYNC_LUA, HISTORY_LUA, PRESENCE_LUA] {
        if let Err(e) = cmd.script_load::<Value, _>(lua).await {
            let _ = cmd.quit().await;
            let _ = sub.quit().await;
            return Err(e);
        }
    }
    Ok((cmd, sub, vec![h1, h2]))
}

async fn supervise(inner: Arc<Inner>, stop: CancellationToken) {
    let mut attempt: u32 = 0;
    let mut generation: u64 = 0;
    loop {
        if stop.is_cancelled() {
            break;
        }
        let connected = tokio::select! {
            r = connect(&inner) => Some(r),
            _ = stop.cancelled() => None,
        };
        match connected {
            None => break,
            Some(Ok((cmd, sub, handles))) => {
                generation += 1;
                attempt = 0;
                let rx = sub.message_rx();
                let conn = Arc::new(Conn {
                    cmd,
                    sub,
                    generation,
                });
                let reader = tokio::spawn(read_messages(inner.clone(), rx));
                inner.conn.store(Some(conn.clone()));
                inner.metrics.up.set(1.0);
                if conn.generation > 1 {
                    inner.metrics.reconnects.increment(1);
                    tracing::info!(node = %inner.settings.node_id, url = %inner.settings.url, "backplane: reconnected to redis; resyncing channels");
                } else {
                    tracing::info!(node = %inner.settings.node_id, url = %inner.settings.url, "backplane: connected to redis");
                }
                let _ = inner.ctl.send(Ctl::Resubscribe);
                let mut handles = handles.into_iter();
                let (h1, h2) = (handles.next(), handles.next());
                let stopped = tokio::select! {
                    _ = async { if let Some(h) = h1 { let _ = h.await; } } => false,
                    _ = async { if let Some(h) = h2 { let _ = h.await; } } => false,
                    _ = stop.cancelled() => true,
                };
                inner.conn.store(None);
                inner.metrics.up.set(0.0);
                let _ = tokio::time::timeout(Duration::from_millis(500), conn.cmd.quit()).await;
                let _ = tokio::time::timeout(Duration::from_millis(500), conn.sub.quit()).await;
                reader.abort();
                {
                    let mut chans = inner.chans.lock();
                    chans.retain(|_, c| {
                        if !c.synced {
                            c.fail_waiters("lost the connection to redis");
                        }
                        c.ever_synced
                    });
                }
                if stopped {
                    break;
                }
                tracing::warn!(node = %inner.settings.node_id, "backplane: lost the connection to redis");
            }
            Some(Err(e)) => {
                if attempt == 0 || attempt % 10 == 0 {
                    tracing::warn!(node = %inner.settings.node_id, url = %inner.settings.url, error = %e, attempt, "backplane: cannot connect to redis");
                }
            }
        }
        let d = backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, inner.random());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.cancelled() => break,
        }
    }
}

async fn read_messages(inner: Arc<Inner>, mut rx: broadcast::Receiver<fred::types::Message>) {
    loop {
        match rx.recv().await {
            Ok(m) => inner.on_message(m),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    lost = n,
                    "backplane: pub/sub reader lagged; resyncing every channel"
                );
                inner.resync_all();
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// Subscribes and unsubscribes in the order asked, so that a leave and a later join of the
/// same channel reach Redis in that order.
async fn control(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Ctl>) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Ctl::Subscribe(name) => {
                let ok = match inner.current() {
                    Some(conn) => matches!(
                        tokio::time::timeout(COMMAND_TIMEOUT, conn.sub.subscribe(msg_key(&name)))
                            .await,
                        Ok(Ok(()))
                    ),
                    None => false,
                };
                let mut chans = inner.chans.lock();
                if let Some(c) = chans.get_mut(&name) {
                    if ok {
                        inner.start_sync(&name, c);
                    } else {
                        c.fail_waiters("cannot subscribe: redis is unavailable");
                        if !c.ever_synced {
                            chans.remove(&name);
                        }
                    }
                }
            }
            Ctl::Unsubscribe(name) => {
                if let Some(conn) = inner.current() {
                    let _ =
                        tokio::time::timeout(COMMAND_TIMEOUT, conn.sub.unsubscribe(msg_key(&name)))
                            .await;
                }
            }
            Ctl::Resubscribe => {
                let Some(conn) = inner.current() else {
                    continue;
                };
                let names: Vec<ChannelName> = inner.chans.lock().keys().cloned().collect();
                for chunk in names.chunks(500) {
                    let keys: Vec<String> = chunk.iter().map(msg_key).collect();
                    if let Ok(Ok(())) =
                        tokio::time::timeout(COMMAND_TIMEOUT, conn.sub.subscribe(keys)).await
                    {
                        let mut chans = inner.chans.lock();
                        for name in chunk {
                            if let Some(c) = chans.get_mut(name) {
                                inner.start_sync(name, c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Unsubscribes channels left without local subscribers, and joins channels that have local
/// subscribers but are not received (a safety net: it should never find any).
async fn maintenance(inner: Arc<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let work = inner.maintain(Instant::now());
        for (name, ops, reconcile) in work {
            inner.run_presence(&name, ops, reconcile).await;
        }
    }
}

impl Inner {
    /// One maintenance pass under the channel lock: leave idle channels, join forgotten
    /// ones, and list the presence work to do (done after, without the lock).
    fn maintain(&self, now: Instant) -> Vec<(ChannelName, Vec<PresenceOp>, bool)> {
        let mut chans = self.chans.lock();
        let mut idle = Vec::new();
        for (name, c) in chans.iter_mut() {
            let quiet = self.engine.local_subscribers(name) == 0
                && c.waiters.is_empty()
                && now.saturating_duration_since(c.last_join) > LINGER;
            if quiet {
                c.idle_ticks += 1;
                if c.idle_ticks >= 2 {
                    idle.push(name.clone());
                }
            } else {
                c.idle_ticks = 0;
            }
        }
        let mut wake = 0;
        for name in idle {
            if let Some(c) = chans.remove(&name) {
                wake |= c.presence.clear(&self.engine, &name, now);
            }
            let _ = self.ctl.send(Ctl::Unsubscribe(name));
        }
        self.wakers.wake(wake);
        if self.current().is_some() {
            for name in self.engine.subscribed_channels() {
                if !chans.contains_key(&name) {
                    tracing::warn!(channel = %name, "backplane: subscribed channel was not received; joining");
                    chans.insert(name.clone(), Chan::new(now));
                    let _ = self.ctl.send(Ctl::Subscribe(name));
                }
            }
        }
        self.presence_work(&mut chans, now)
    }

    /// What each synced presence channel must write to (and read from) Redis now.
    fn presence_work(
        &self,
        chans: &mut HashMap<ChannelName, Chan>,
        now: Instant,
    ) -> Vec<(ChannelName, Vec<PresenceOp>, bool)> {
        let timeout = self.settings.presence_timeout;
        chans
            .iter_mut()
            .filter(|(name, c)| c.synced && self.engine.has_presence(name))
            .filter_map(|(name, c)| {
                c.presence
                    .plan(&self.engine, name, timeout, now)
                    .map(|(ops, reconcile)| (name.clone(), ops, reconcile))
            })
            .collect()
    }

    /// Writes this node's presence changes for `name` and, when `reconcile`, adopts the
    /// members of the other nodes that Redis lists (and drops those it no longer does).
    async fn run_presence(
        self: &Arc<Self>,
        name: &ChannelName,
        ops: Vec<PresenceOp>,
        reconcile: bool,
    ) {
        let Some(conn) = self.current() else {
            return;
        };
        let timeout_ms = self.settings.presence_timeout.as_millis() as u64;
        let now_ms = wall_ms();
        let mut args: Vec<Value> = vec![
            msg_key(name).into(),
            ((now_ms + timeout_ms) as i64).into(),
            (now_ms as i64).into(),
            ((timeout_ms * 3).max(1000) as i64).into(),
            if reconcile { "1" } else { "0" }.into(),
        ];
        for (op, who) in &ops {
            args.push((*op).into());
            args.push(who.client.to_string().into());
            args.push(Value::Bytes(encode_member(&self.settings.node_id, who)));
        }
        match self
            .script(
                &conn,
                &self.scripts.presence,
                PRESENCE_LUA,
                presence_keys(name),
                args,
            )
            .await
        {
            Ok(v) if reconcile => self.apply_presence(name, v),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(channel = %name, error = %e, "backplane: presence update failed");
                if let Some(c) = self.chans.lock().get_mut(name) {
                    c.presence.restart();
                }
            }
        }
    }

    fn apply_presence(self: &Arc<Self>, name: &ChannelName, v: Value) {
        let mut parts = v.into_array().into_iter();
        let (Some(hash), Some(zset)) = (parts.next(), parts.next()) else {
            return;
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
        let mut members = HashMap::new();
        let mut it = hash.into_array().into_iter();
        while let (Some(client), Some(enc)) = (it.next(), it.next()) {
            let (Some(client), Some(enc)) = (client.as_string(), enc.as_bytes()) else {
                continue;
            };
            let (Some((node, who)), Some(&exp)) =
                (decode_member(&client, enc), expiries.get(&client))
            else {
                continue;
            };
            members.insert(who.client.clone(), (node, who, exp));
        }
        let now = Instant::now();
        let mut chans = self.chans.lock();
        let Some(c) = chans.get_mut(name) else {
            return;
        };
        let wake = c.presence.reconcile(
            &self.engine,
            name,
            &self.settings.node_id,
            members,
            self.settings.presence_timeout,
            now,
            wall_ms(),
        );
        drop(chans);
        self.wakers.wake(wake);
    }
}

impl Backplane for RedisBackplane {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn publish(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
    ) -> BoxFuture<Result<(Epoch, u64), BackplaneError>> {
        let inner = self.inner.clone();
        let ch = channel.clone();
        Box::pin(async move {
            let Some(conn) = inner.current() else {
                return Err(unavailable("redis is unavailable"));
            };
            let start = Instant::now();
            let keys = vec![meta_key(&ch), hist_key(&ch)];
            let args: Vec<Value> = vec![
                inner.candidate_epoch().into(),
                kind_code(kind).into(),
                Value::Bytes(data),
                (inner.settings.history_size as i64).into(),
                (inner.settings.history_ttl.as_millis().max(1) as i64).into(),
                (inner.meta_ttl_ms() as i64).into(),
                msg_key(&ch).into(),
            ];
            let v = inner
                .script(&conn, &inner.scripts.publish, PUBLISH_LUA, keys, args)
                .await?;
            let mut parts = v.into_array().into_iter();
            let (Some(e), Some(seq)) = (parts.next(), parts.next()) else {
                return Err(protocol("short publish reply"));
            };
            let epoch = value_epoch(&e).ok_or_else(|| protocol("bad epoch"))?;
            let seq = value_u64(&seq).ok_or_else(|| protocol("bad seq"))?;
            inner.metrics.publish.record(start.elapsed().as_secs_f64());
            Ok((epoch, seq))
        })
    }

    fn join(&self, channel: &ChannelName) -> Option<BoxFuture<Result<(), BackplaneError>>> {
        let now = Instant::now();
        let mut chans = self.inner.chans.lock();
        let rx = match chans.get_mut(channel) {
            Some(c) => {
                c.last_join = now;
                c.idle_ticks = 0;
                if c.synced {
                    return None;
                }
                let (tx, rx) = oneshot::channel();
                c.waiters.push(tx);
                rx
            }
            None => {
                if self.inner.current().is_none() {
                    return Some(Box::pin(std::future::ready(Err(unavailable(
                        "redis is unavailable",
                    )))));
                }
                let mut c = Chan::new(now);
                let (tx, rx) = oneshot::channel();
                c.waiters.push(tx);
                chans.insert(channel.clone(), c);
                let _ = self.inner.ctl.send(Ctl::Subscribe(channel.clone()));
                rx
            }
        };
        Some(Box::pin(async move {
            match tokio::time::timeout(JOIN_TIMEOUT, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(unavailable("the join was abandoned")),
                Err(_) => Err(unavailable("timed out joining the channel")),
            }
        }))
    }

    fn leave(&self, channel: &ChannelName) {
        // Unsubscribed by the maintenance pass once idle for the grace period, so that a
        // channel whose subscribers come and go does not flap.
        if let Some(c) = self.inner.chans.lock().get_mut(channel) {
            c.idle_ticks = c.idle_ticks.max(1);
        }
    }

    fn history(
        &self,
        channel: &ChannelName,
        since: u64,
        limit: usize,
    ) -> BoxFuture<Result<History, BackplaneError>> {
        let inner = self.inner.clone();
        let ch = channel.clone();
        Box::pin(async move {
            let Some(conn) = inner.current() else {
                return Err(unavailable("redis is unavailable"));
            };
            let limit = limit.min(inner.settings.history_size);
            let keys = vec![meta_key(&ch), hist_key(&ch)];
            let args: Vec<Value> = vec![(since as i64).into(), (limit.max(1) as i64).into()];
            let v = inner
                .script(&conn, &inner.scripts.history, HISTORY_LUA, keys, args)
                .await?;
            let mut parts = v.into_array().into_iter();
            let (Some(e), Some(top), Some(entries)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(protocol("short history reply"));
            };
            let Some(epoch) = value_epoch(&e) else {
                // Never published (or expired): what the local engine says.
                return Ok(inner.engine.history(&ch, since, limit, Instant::now()));
            };
            let top = value_u64(&top).ok_or_else(|| protocol("bad top"))?;
            let now = Instant::now();
            let now_ms = wall_ms();
            let ttl_ms = inner.settings.history_ttl.as_millis() as u64;
            let oldest = top
                .saturating_sub(inner.settings.history_size as u64)
                .saturating_add(1);
            let publications: Vec<Arc<Publication>> = if limit == 0 {
                Vec::new()
            } else {
                parse_entries(entries)?
                    .into_iter()
                    .filter(|m| {
                        m.seq > since && m.seq >= oldest && now_ms.saturating_sub(m.ms) <= ttl_ms
                    })
                    .map(|m| {
                        Arc::new(Publication::new(
                            m.seq,
                            instant_of(m.ms, now, now_ms),
                            m.kind,
                            m.data,
                        ))
                    })
                    .collect()
            };
            let complete = since == top
                || (since < top && publications.first().is_some_and(|p| p.seq == since + 1));
            Ok(History {
                position: Some(StreamPosition { epoch, seq: top }),
                publications,
                complete,
            })
        })
    }

    fn is_ready(&self) -> bool {
        self.inner.current().is_some()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn messages_round_trip_binary_payloads() {
        let b = Bytes::from_static(b"1000000000000abc 42 b 1712345678901 \x00 raw \xff bytes");
        let m = parse_msg(&b).unwrap();
        assert_eq!(m.epoch, Epoch(0x1000000000000abc));
        assert_eq!((m.seq, m.kind, m.ms), (42, DataKind::Binary, 1712345678901));
        assert_eq!(&m.data[..], b"\x00 raw \xff bytes");
        assert!(parse_msg(&Bytes::from_static(b"zz 1 j 1 x")).is_none());
        assert!(parse_msg(&Bytes::from_static(b"1 1 q 1 x")).is_none());
        let empty = parse_msg(&Bytes::from_static(b"1 1 j 5 ")).unwrap();
        assert!(empty.data.is_empty());
    }

    #[test]
    fn keys_share_a_hash_tag() {
        let ch = ChannelName::new("room:1").unwrap();
        assert_eq!(meta_key(&ch), "relay:{room:1}:meta");
        assert_eq!(hist_key(&ch), "relay:{room:1}:hist");
        assert_eq!(msg_key(&ch), "relay:msg:room:1");
    }

    #[test]
    fn stream_entries_parse() {
        let v = Value::Array(vec![
            Value::from("7-1"),
            Value::Array(vec![
                Value::from("k"),
                Value::from("j"),
                Value::from("t"),
                Value::from("99"),
                Value::from("d"),
                Value::from("{\"a\":1}"),
            ]),
        ]);
        let m = parse_entry(v).unwrap();
        assert_eq!((m.seq, m.kind, m.ms), (7, DataKind::Json, 99));
        assert_eq!(&m.data[..], b"{\"a\":1}");
    }
}
