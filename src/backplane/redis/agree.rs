//! Cluster-wide agreement on channel events in Redis (see [`crate::backplane::agree`]).
//!
//! # Keys, per channel `ch` (hash-tagged: one slot, one script)
//! - `relay:{ch}:hocc`, a zset: node → lease expiry (ms): the nodes with a subscriber in `ch`.
//! - `relay:{ch}:husr`, a zset: `<len>:<node><user>` → lease expiry: who is a presence member
//!   on which node.
//! - `relay:{ch}:hcnt`, a hash: user → on how many nodes (entries of `husr`).
//!
//! One script per channel drops the expired entries (reporting what that ends), applies the
//! node's claims (reporting the first holder and the last one gone) and answers the latest
//! expiry left. Redis runs scripts one at a time, so exactly one caller is told of each change.
//!
//! `relay:hooks:chans` (a zset, its own slot: written by separate commands) indexes channels
//! by the latest expiry written for them: a channel whose score has passed holds only expired
//! entries, and any node's reaper settles it.

use std::sync::{Arc, LazyLock};

use fred::prelude::Value;

use super::{eval, protocol, wall_ms, Agreed, BackplaneError, Claim, Conn};
use crate::backplane::agree::{ClaimOp, Lease};
use crate::types::ChannelName;

/// `KEYS`: hocc, husr, hcnt. `ARGV`: now ms, expiry ms, node, key TTL ms, then pairs
/// `op user` (`o+`/`o~`/`o-` occupancy with user '', `u+`/`u~`/`u-`). Returns `{latest expiry
/// left (0: none), code, user, code, user, …}` with codes `o+`, `o-`, `u+`, `u-`.
const AGREE_LUA: &str = r#"
local now, exp, node = ARGV[1], ARGV[2], ARGV[3]
local out = {0}
local function say(code, user)
  out[#out + 1] = code
  out[#out + 1] = user
end
local function user_of(m)
  local n = string.match(m, '^(%d+):')
  return string.sub(m, #n + 2 + tonumber(n))
end
local function gone(user)
  if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
    redis.call('HDEL', KEYS[3], user)
    say('u-', user)
  end
end
if redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now) > 0
    and redis.call('ZCARD', KEYS[1]) == 0 then
  say('o-', '')
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)) do
  redis.call('ZREM', KEYS[2], m)
  gone(user_of(m))
end
local i = 5
while ARGV[i] do
  local op, user = ARGV[i], ARGV[i + 1]
  if op == 'o-' then
    if redis.call('ZREM', KEYS[1], node) == 1 and redis.call('ZCARD', KEYS[1]) == 0 then
      say('o-', '')
    end
  elseif op == 'o+' or op == 'o~' then
    if redis.call('ZADD', KEYS[1], exp, node) == 1 and redis.call('ZCARD', KEYS[1]) == 1 then
      say('o+', '')
    end
  else
    local m = #node .. ':' .. node .. user
    if op == 'u-' then
      if redis.call('ZREM', KEYS[2], m) == 1 then
        gone(user)
      end
    elseif redis.call('ZADD', KEYS[2], exp, m) == 1
        and redis.call('HINCRBY', KEYS[3], user, 1) == 1 then
      say('u+', user)
    end
  end
  i = i + 2
end
local latest = 0
for k = 1, 2 do
  local top = redis.call('ZREVRANGE', KEYS[k], 0, 0, 'WITHSCORES')
  if top[2] and tonumber(top[2]) > latest then
    latest = tonumber(top[2])
  end
end
if latest > 0 then
  for k = 1, 3 do
    redis.call('PEXPIRE', KEYS[k], ARGV[4])
  end
else
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
out[1] = latest
return out
"#;

/// `KEYS`: the index. `ARGV`: mode, ms, channel, limit. Mode `set`: the channel's score is at
/// least ms. `drop`: removes the channel if its score is before ms (no node wrote a later
/// lease meanwhile). `list`: at most limit channels whose score is before ms.
const INDEX_LUA: &str = r#"
if ARGV[1] == 'list' then
  return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[4])
end
local s = redis.call('ZSCORE', KEYS[1], ARGV[3])
if ARGV[1] == 'set' then
  if not s or tonumber(s) < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  end
elseif s and tonumber(s) < tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[3])
end
return 0
"#;

static AGREE_SHA: LazyLock<String> = LazyLock::new(|| fred::util::sha1_hash(AGREE_LUA));
static INDEX_SHA: LazyLock<String> = LazyLock::new(|| fred::util::sha1_hash(INDEX_LUA));

const INDEX_KEY: &str = "relay:hooks:chans";

/// Channels a reaper pass settles at most (the next pass takes the rest).
const REAP_BATCH: usize = 256;

fn keys(ch: &ChannelName) -> Vec<String> {
    ["hocc", "husr", "hcnt"]
        .iter()
        .map(|k| format!("relay:{{{ch}}}:{k}"))
        .collect()
}

fn code(c: &Claim) -> &'static str {
    match (c.user.is_some(), c.op) {
        (false, ClaimOp::Add) => "o+",
        (false, ClaimOp::Keep) => "o~",
        (false, ClaimOp::Remove) => "o-",
        (true, ClaimOp::Add) => "u+",
        (true, ClaimOp::Keep) => "u~",
        (true, ClaimOp::Remove) => "u-",
    }
}

fn as_text(v: &Value) -> Option<String> {
    v.as_str().map(|s| s.into_owned())
}

/// Parses the script's answer: the latest expiry left and the changes.
fn parse(v: Value) -> Result<(u64, Vec<Agreed>), BackplaneError> {
    let mut parts = v.into_array().into_iter();
    let latest = parts
        .next()
        .and_then(|v| super::value_u64(&v))
        .ok_or_else(|| protocol("bad agreement reply"))?;
    let mut out = Vec::new();
    while let (Some(c), Some(u)) = (parts.next(), parts.next()) {
        let (c, u) = (as_text(&c), as_text(&u));
        let (Some(c), Some(u)) = (c, u) else {
            return Err(protocol("bad agreement change"));
        };
        let user = (c.starts_with('u')).then(|| Arc::<str>::from(u));
        out.push(Agreed {
            user,
            up: c.ends_with('+'),
        });
    }
    Ok((latest, out))
}

async fn index(conn: &Conn, mode: &str, ms: u64, channel: &str) -> Result<Value, BackplaneError> {
    let args: Vec<Value> = vec![
        mode.into(),
        (ms as i64).into(),
        channel.into(),
        (REAP_BATCH as i64).into(),
    ];
    eval(
        conn,
        &INDEX_SHA,
        INDEX_LUA,
        vec![INDEX_KEY.to_owned()],
        args,
    )
    .await
}

/// Writes `claims` about `channel` under `lease`; returns what changed cluster-wide.
pub async fn agree(
    conn: &Conn,
    channel: &ChannelName,
    claims: &[Claim],
    lease: Lease,
) -> Result<Vec<Agreed>, BackplaneError> {
    let now = wall_ms();
    let length = lease.length.as_millis() as u64;
    let mut args: Vec<Value> = vec![
        (now as i64).into(),
        ((now + length) as i64).into(),
        lease.node.into(),
        ((length * 3).max(1000) as i64).into(),
    ];
    for c in claims {
        args.push(code(c).into());
        args.push(c.user.as_deref().unwrap_or("").into());
    }
    let (latest, changes) = parse(eval(conn, &AGREE_SHA, AGREE_LUA, keys(channel), args).await?)?;
    // The index is written after the claims: a reaper that reads it before finds the old
    // score and drops nothing that was written after (see INDEX_LUA's `drop`).
    if latest > 0 {
        index(conn, "set", latest, channel.as_str()).await?;
    } else {
        index(conn, "drop", now, channel.as_str()).await?;
    }
    Ok(changes)
}

/// Settles the indexed channels whose leases all ran out (a dead node's): removes the expired
/// claims and returns the changes that made.
pub async fn reap(conn: &Conn, lease: Lease) -> Result<Vec<(ChannelName, Agreed)>, BackplaneError> {
    let now = wall_ms();
    let listed = index(conn, "list", now, "").await?.into_array();
    let mut out = Vec::new();
    for v in listed {
        let Some(name) = as_text(&v) else { continue };
        let Ok(channel) = ChannelName::new(&name) else {
            // Not ours to settle (written by something else): leave it out of the index.
            index(conn, "drop", i64::MAX as u64, &name).await?;
            continue;
        };
        for change in agree(conn, &channel, &[], lease.clone()).await? {
            out.push((channel.clone(), change));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replies_parse_into_changes() {
        let v = Value::Array(vec![
            Value::Integer(17),
            Value::String("o+".into()),
            Value::String("".into()),
            Value::String("u-".into()),
            Value::Bytes(bytes::Bytes::from_static(b"alice")),
        ]);
        let (latest, changes) = parse(v).unwrap();
        assert_eq!(latest, 17);
        assert_eq!(
            changes,
            [
                Agreed {
                    user: None,
                    up: true
                },
                Agreed {
                    user: Some("alice".into()),
                    up: false
                },
            ]
        );
        assert!(parse(Value::Array(vec![])).is_err());
    }

    #[test]
    fn a_channels_agreement_keys_share_its_hash_tag() {
        let ch = ChannelName::new("room.1").unwrap();
        for k in keys(&ch) {
            assert!(k.starts_with("relay:{room.1}:"), "{k}");
        }
    }
}
