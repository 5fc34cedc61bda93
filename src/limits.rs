//! Limits against abuse: open connections per client IP (shared by every shard), the inbound
//! message rate of one connection (token bucket), and the refusal counter and its log.
//!
//! **Invariants:** an [`IpGuard`] exists for every connection counted and gives its slot back
//! when dropped, so the count per IP is exactly the connections alive; a refusal is counted in
//! `relay_refused_total{cause}` every time and logged once per cause for the process.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

/// Why something was refused: the `cause` label of `relay_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Too many open connections from one IP (`--max-connections-per-ip`).
    IpLimit = 0,
    /// Request headers (or the TLS handshake) not complete within `--handshake-timeout`.
    HandshakeTimeout,
    /// Request headers larger than `--max-header-size` (HTTP 431).
    HeaderTooLarge,
    /// A WebSocket message over `--max-message-size` (close 1009) or an HTTP body over it (413).
    MessageTooLarge,
    /// A message over the rate limit (error `rate_limited`).
    RateLimited,
    /// A connection that kept sending over the rate limit (close 4029).
    RateClosed,
    /// An `Origin` not in `--allowed-origin` (HTTP 403).
    Origin,
    /// A missing or invalid token or API key (HTTP 401, error `unauthorized`, close 4001).
    Unauthorized,
    /// A command the connection's grants do not allow (error `forbidden`, HTTP 403).
    Forbidden,
    /// A token that expired without a refresh in time (close 4003).
    TokenExpired,
    /// More channels than `--max-subscriptions` on one connection.
    TooManySubscriptions,
    /// A TLS handshake that failed.
    Tls,
    /// Over the memory budget (`--max-memory`): HTTP 503 / error `overloaded` / close 1013.
    Memory,
    /// A new channel past `--max-channels` (HTTP 503 / error `overloaded`).
    MaxChannels,
    /// Presence info past `--presence-info-budget` (error `overloaded`).
    PresenceInfo,
}

const CAUSES: usize = 15;

impl Cause {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::IpLimit => "ip_limit",
            Cause::HandshakeTimeout => "handshake_timeout",
            Cause::HeaderTooLarge => "header_too_large",
            Cause::MessageTooLarge => "message_too_large",
            Cause::RateLimited => "rate_limited",
            Cause::RateClosed => "rate_closed",
            Cause::Origin => "origin",
            Cause::Unauthorized => "unauthorized",
            Cause::Forbidden => "forbidden",
            Cause::TokenExpired => "token_expired",
            Cause::TooManySubscriptions => "too_many_subscriptions",
            Cause::Tls => "tls",
            Cause::Memory => "memory",
            Cause::MaxChannels => "max_channels",
            Cause::PresenceInfo => "presence_info",
        }
    }
}

static LOGGED: [AtomicBool; CAUSES] = [const { AtomicBool::new(false) }; CAUSES];

/// Counts a refusal, and logs the first one of each cause (later ones only count, so a flood
/// cannot flood the log).
pub fn refused(cause: Cause, detail: &str) {
    metrics::counter!("relay_refused_total", "cause" => cause.as_str()).increment(1);
    if !LOGGED[cause as usize].swap(true, Ordering::Relaxed) {
        tracing::warn!(
            cause = cause.as_str(),
            detail,
            "refused (logged once per cause; see relay_refused_total for the count)"
        );
    }
}

/// The memory budget of a node started without `--max-memory`: half of what the process may
/// use (the cgroup v2 `memory.max`, the cgroup v1 `memory.limit_in_bytes`, else physical
/// memory). Half, because the budget counts only what clients grow: the other half is for what
/// it does not count (connections, encoded frames, kernel socket buffers, allocator slack).
pub fn default_memory_budget() -> usize {
    memory_limit().map_or(0, |limit| limit / 2)
}

/// What the process may use: its cgroup's limit, else physical memory; `None` if unknown.
fn memory_limit() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let physical = read("/proc/meminfo").and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    // v2: "max" when unlimited; v1: a huge number when unlimited. Either way, never more than
    // the machine has.
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match (cgroup, physical) {
        (Some(c), Some(p)) => Some(c.min(p)),
        (c, p) => c.or(p),
    }
}

const IP_PARTS: usize = 16;

/// Open connections per client IP, shared by every shard: 16 mutex-guarded maps picked by a
/// hash of the address, so shards rarely contend.
pub struct IpLimiter {
    max: u32,
    parts: [Mutex<HashMap<IpAddr, u32>>; IP_PARTS],
    hasher: std::collections::hash_map::RandomState,
}

impl IpLimiter {
    /// A limiter allowing `max` connections per IP (0: no limit).
    pub fn new(max: usize) -> Arc<IpLimiter> {
        Arc::new(IpLimiter {
            max: u32::try_from(max).unwrap_or(u32::MAX),
            parts: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: Default::default(),
        })
    }

    fn part(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        &self.parts[(self.hasher.hash_one(ip) as usize) % IP_PARTS]
    }

    /// Takes a slot for `ip`, or `None` when it has `max` open connections already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpGuard> {
        if self.max > 0 {
            let mut map = self.part(&ip).lock();
            let n = map.entry(ip).or_insert(0);
            if *n >= self.max {
                return None;
            }
            *n += 1;
        }
        Some(IpGuard {
            limiter: self.clone(),
            ip,
        })
    }

    /// Open connections counted for `ip`.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.part(&ip).lock().get(&ip).copied().unwrap_or(0)
    }
}

/// One counted connection; gives its slot back when dropped.
pub struct IpGuard {
    limiter: Arc<IpLimiter>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        if self.limiter.max == 0 {
            return;
        }
        let mut map = self.limiter.part(&self.ip).lock();
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// What the rate limiter says about one inbound message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate.
    Ok,
    /// Over the rate: refuse this message.
    Refuse,
    /// Over the rate for too long: close the connection.
    Close,
}

/// A token bucket of `rate` messages per second holding at most `burst`, plus a tally of
/// refusals that drains at half the rate: when the tally passes `burst` the sender is not
/// bursting but persistently over the limit (more than 1.5 times the rate), and is closed.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    strikes: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `rate` 0 means no limit.
    pub fn new(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            strikes: 0.0,
            last: now,
        }
    }

    /// Takes one token for a message arriving at `now`.
    pub fn take(&mut self, now: Instant) -> Verdict {
        if self.rate <= 0.0 {
            return Verdict::Ok;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.strikes = (self.strikes - dt * self.rate / 2.0).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Ok;
        }
        self.strikes += 1.0;
        if self.strikes > self.burst {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn ip_slots_come_back() {
        let l = IpLimiter::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let a = l.try_acquire(ip).unwrap();
        let _b = l.try_acquire(ip).unwrap();
        assert!(l.try_acquire(ip).is_none());
        assert!(l.try_acquire(other).is_some());
        drop(a);
        assert_eq!(l.count(ip), 1);
        assert!(l.try_acquire(ip).is_some());
        let unlimited = IpLimiter::new(0);
        let many: Vec<_> = (0..100).map(|_| unlimited.try_acquire(ip)).collect();
        assert!(many.iter().all(Option::is_some));
    }

    #[test]
    fn bucket_refuses_then_closes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        for _ in 0..5 {
            assert_eq!(b.take(t0), Verdict::Ok);
        }
        assert_eq!(b.take(t0), Verdict::Refuse);
        // Refilled after a second.
        assert_eq!(b.take(t0 + Duration::from_secs(1)), Verdict::Ok);
        // Persistent excess: more than `burst` refusals before they drain.
        let t1 = t0 + Duration::from_secs(1);
        let mut last = Verdict::Ok;
        for _ in 0..20 {
            last = b.take(t1);
            if last == Verdict::Close {
                break;
            }
        }
        assert_eq!(last, Verdict::Close);
        let mut free = TokenBucket::new(0, 1, t0);
        assert!((0..1000).all(|_| free.take(t0) == Verdict::Ok));
    }
}
