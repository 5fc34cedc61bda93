//! Limits against abuse: open connections per client IP (shared by every shard), the inbound
//! message rate of one connection and the HTTP API request rate per key and per client IP
//! (token buckets), the refusal counter and its log, the throttled log of accept errors, and
//! the file table sized at start.
//!
//! **Invariants:** an [`IpGuard`] exists for every connection counted and gives its slot back
//! when dropped, so the count per IP is exactly the connections alive; a refusal is counted in
//! `relay_refused_total{cause}` every time and logged once per cause for the process; an accept
//! error is counted every time and logged at most once per cause every
//! [`ACCEPT_LOG_INTERVAL`]; the API limiter tracks at most [`MAX_TRACKED_IPS`] addresses.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Most descriptor slots [`reserve_descriptors`] sizes the file table for: 512 KiB of kernel
/// memory at 8 bytes a slot. A node past it grows the table as before, one doubling at a time.
pub const RESERVED_DESCRIPTORS: u64 = 65_536;

/// Sizes the process's file-descriptor table once, at start, for as many descriptors as the
/// soft `RLIMIT_NOFILE` allows, at most [`RESERVED_DESCRIPTORS`], so that connections arriving
/// do not grow it. Linux grows the table by doubling when a new descriptor does not fit, and in
/// a process of more than one thread each growth waits for an RCU grace period
/// (`synchronize_rcu` in `expand_fdtable`) inside that `accept`, while every other accept of
/// the node waits for the resize: 10–40 ms each on a 2-vCPU VM, six of them (256 to 16,384
/// slots) as 10,000 connections arrive (benches/RESULTS.md, session 16). A single-threaded
/// server never pays it. The table never shrinks, so one descriptor placed at the top and
/// closed again leaves it sized. Returns the slots reserved (0 under a limit too low to matter); an error (no
/// `/dev/null` to duplicate, for one) leaves the table to grow as before.
#[allow(unsafe_code)]
pub fn reserve_descriptors() -> std::io::Result<u64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let slots = limit.rlim_cur.min(RESERVED_DESCRIPTORS);
    if slots < 1024 {
        return Ok(0);
    }
    let probe = std::fs::File::open("/dev/null")?;
    let top = libc::c_int::try_from(slots - 1).map_err(std::io::Error::other)?;
    // SAFETY: F_DUPFD_CLOEXEC duplicates `probe`, a descriptor this function owns, to the
    // lowest free descriptor from `top` on; it takes no pointer.
    let fd = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just made by fcntl and nothing else owns it; dropping it closes it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(slots)
}

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
    /// A request body not received within `--body-timeout` (HTTP 408).
    BodyTimeout,
    /// A connection that took nothing we wrote for `--write-timeout` (reset).
    WriteTimeout,
    /// An API request over `--api-rate-limit` or `--api-key-rate-limit` (HTTP 429).
    ApiRateLimited,
    /// A connection without a valid PROXY protocol header while `--proxy-protocol` is on.
    ProxyProtocol,
    /// Over the memory budget (`--max-memory`): HTTP 503 / error `overloaded` / close 1013.
    Memory,
    /// A new channel past `--max-channels` (HTTP 503 / error `overloaded`).
    MaxChannels,
    /// Presence info past `--presence-info-budget` (error `overloaded`).
    PresenceInfo,
    /// Backend proxy requests past `--proxy-max-in-flight` (error `overloaded`).
    ProxyInFlight,
}

const CAUSES: usize = 20;

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
            Cause::BodyTimeout => "body_timeout",
            Cause::WriteTimeout => "write_timeout",
            Cause::ApiRateLimited => "api_rate_limited",
            Cause::ProxyProtocol => "proxy_protocol",
            Cause::Memory => "memory",
            Cause::MaxChannels => "max_channels",
            Cause::PresenceInfo => "presence_info",
            Cause::ProxyInFlight => "proxy_in_flight",
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

/// How often an accept error of one cause may be logged.
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why `accept` failed: the `cause` label of `relay_accept_errors_total`.
const ACCEPT_CAUSES: [&str; 4] = ["emfile", "enfile", "enomem", "other"];

static ACCEPT_LOG: [Throttle; 4] = [const { Throttle::new() }; 4];

/// Counts a failed `accept` and logs it, at most once per cause every
/// [`ACCEPT_LOG_INTERVAL`] with the count of those not logged since (out of file descriptors,
/// every accept fails at once on every shard: a line per failure would flood the log).
pub fn accept_failed(shard: usize, e: &std::io::Error) {
    // Linux errno values: EMFILE, ENFILE, ENOMEM and ENOBUFS.
    let i = match e.raw_os_error() {
        Some(24) => 0,
        Some(23) => 1,
        Some(12 | 105) => 2,
        _ => 3,
    };
    let cause = ACCEPT_CAUSES[i];
    metrics::counter!("relay_accept_errors_total", "cause" => cause).increment(1);
    if let Some(suppressed) = ACCEPT_LOG[i].check(clock_millis(), ACCEPT_LOG_INTERVAL) {
        tracing::warn!(
            shard,
            cause,
            error = %e,
            suppressed,
            "accept failed (logged at most once per cause every 10 s; see relay_accept_errors_total)"
        );
    }
}

/// Milliseconds since the first call (never 0): a clock for [`Throttle`].
fn clock_millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Lets one event through per interval, shared by threads, and counts the others.
pub struct Throttle {
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    /// A throttle that lets the first event through.
    pub const fn new() -> Throttle {
        Throttle {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether an event at `now_ms` (> 0) goes through: then `Some(events held back since the
    /// last one through)`.
    pub fn check(&self, now_ms: u64, every: Duration) -> Option<u64> {
        let every = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now_ms >= last.saturating_add(every);
        if due
            && self
                .last
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

/// The memory budget of a node started without `--max-memory`: half of what the process may
/// use (the cgroup v2 `memory.max`, the cgroup v1 `memory.limit_in_bytes`, else physical
/// memory). Half, because the budget counts only what clients grow: the other half is for what
/// it does not count (connections, encoded frames, kernel socket buffers, allocator slack).
pub fn default_memory_budget() -> usize {
    memory_limit().map_or(0, |limit| limit / 2)
}

/// The default of `--presence-info-budget` under a memory budget of `max_memory` bytes (0:
/// none): an eighth of it, at most 64 MiB. Info is what presence members send, and in a burst
/// of joins each byte of it cost about 3.5 bytes of RSS (the member's copy, its join event's
/// frame for 5 s, and the allocator pages those pin among the burst's transient buffers):
/// measured in issue 11's soak, 64 MiB of info took a 256 MiB node to 1.28 times its budget,
/// 32 MiB to 0.84 times (benches/RESULTS.md, "RSS under the budget").
pub fn default_presence_info_budget(max_memory: usize) -> usize {
    const MOST: usize = 64 << 20;
    match max_memory {
        0 => MOST,
        m => (m / 8).min(MOST),
    }
}

/// The process's resident memory (RSS) in bytes: the second field of `/proc/self/statm`, in
/// pages; `None` where there is no procfs. The file is opened once and read again in place
/// (`pread` at 0), one system call per sample: reading `/proc/self/status` took eleven (open,
/// stat, eight growing reads, close) on every upkeep tick. For the upkeep tick (the memory
/// budget's floor), never for a hot path.
pub fn resident_bytes() -> Option<usize> {
    use std::os::unix::fs::FileExt;
    static STATM: OnceLock<Option<(std::fs::File, usize)>> = OnceLock::new();
    let (file, page) = STATM
        .get_or_init(|| Some((std::fs::File::open("/proc/self/statm").ok()?, page_size()?)))
        .as_ref()?;
    let mut buf = [0u8; 128];
    let n = file.read_at(&mut buf, 0).ok()?;
    let pages: usize = std::str::from_utf8(buf.get(..n)?)
        .ok()?
        .split_ascii_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(pages.saturating_mul(*page))
}

/// The size of a memory page.
#[allow(unsafe_code)]
fn page_size() -> Option<usize> {
    // SAFETY: sysconf takes no pointer and only reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).ok().filter(|&p| p > 0)
}

/// The bytes of a `Key:   1234 kB` line of a /proc file.
fn kb_field(text: &str, key: &str) -> Option<usize> {
    let kb = text.lines().find_map(|l| l.strip_prefix(key))?;
    let kb: usize = kb.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// What the process may use: its cgroup's limit, else physical memory; `None` if unknown.
fn memory_limit() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let physical = read("/proc/meminfo").and_then(|m| kb_field(&m, "MemTotal:"));
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

/// Tokens refilled at `rate` per second up to `burst`; the rate and burst are kept by the
/// owner, so that a bucket per client costs two words.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    /// Refills for the time since the last call; returns the seconds elapsed.
    fn refill(&mut self, rate: f64, burst: f64, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate).min(burst);
        dt
    }

    /// Takes a token, or says how long until there is one.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    /// Whether the bucket would be full at `now` (so forgetting it changes nothing).
    fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate >= burst
    }
}

/// A token bucket of `rate` messages per second holding at most `burst`, plus a tally of
/// refusals that drains at half the rate: when the tally passes `burst` the sender is not
/// bursting but persistently over the limit (more than 1.5 times the rate), and is closed.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Whole numbers (the settings are), so that every WebSocket session's bucket is 40
    /// bytes rather than 48: its task's future crosses tokio's 128-byte steps (issue 12 item 4).
    rate: u32,
    burst: u32,
    bucket: Bucket,
    strikes: f64,
}

impl TokenBucket {
    /// A full bucket; `rate` 0 means no limit.
    pub fn new(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        let burst = burst.max(1);
        TokenBucket {
            rate,
            burst,
            bucket: Bucket::full(f64::from(burst), now),
            strikes: 0.0,
        }
    }

    /// Takes one token for a message arriving at `now`.
    pub fn take(&mut self, now: Instant) -> Verdict {
        if self.rate == 0 {
            return Verdict::Ok;
        }
        let (rate, burst) = (f64::from(self.rate), f64::from(self.burst));
        let dt = self.bucket.refill(rate, burst, now);
        self.strikes = (self.strikes - dt * rate / 2.0).max(0.0);
        if self.bucket.tokens >= 1.0 {
            self.bucket.tokens -= 1.0;
            return Verdict::Ok;
        }
        self.strikes += 1.0;
        if self.strikes > burst {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }
}

/// Most client addresses the API limiter tracks at once; more (a flood from a whole IPv6
/// range, or many proxies' worth of clients) share one bucket until the sweep frees room.
pub const MAX_TRACKED_IPS: usize = 65_536;

/// Who an API request is counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiClient {
    /// The holder of the `n`th `--api-key`.
    Key(usize),
    /// A client without an API key, by its address.
    Ip(IpAddr),
    /// Not limited: a request from a trusted proxy that names no client.
    Unknown,
}

/// HTTP API request rates: a token bucket per API key (`--api-key-rate-limit`) and per
/// client address (`--api-rate-limit`, for requests without an API key; IPv6 clients by their
/// /64, the block one subscriber gets), each of `rate` requests per second and a burst of
/// twice that. Shared by every shard, like [`IpLimiter`].
pub struct ApiLimiter {
    ip_rate: f64,
    key_rate: f64,
    ips: [Mutex<HashMap<IpAddr, Bucket>>; IP_PARTS],
    /// The bucket of the clients that find the table full.
    overflow: Mutex<Bucket>,
    keys: Box<[Mutex<Bucket>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl ApiLimiter {
    /// A limiter of `ip_rate` requests per second per client address and `key_rate` per API
    /// key, for `keys` keys (0: no limit).
    pub fn new(ip_rate: u32, key_rate: u32, keys: usize, now: Instant) -> ApiLimiter {
        let (ip_rate, key_rate) = (f64::from(ip_rate), f64::from(key_rate));
        ApiLimiter {
            ips: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            overflow: Mutex::new(Bucket::full(2.0 * ip_rate, now)),
            keys: (0..keys)
                .map(|_| Mutex::new(Bucket::full(2.0 * key_rate, now)))
                .collect(),
            ip_rate,
            key_rate,
            hasher: Default::default(),
        }
    }

    /// Takes a token for one request of `who` at `now`, or says when to retry.
    pub fn check(&self, who: ApiClient, now: Instant) -> Result<(), Duration> {
        match who {
            ApiClient::Unknown => Ok(()),
            ApiClient::Key(_) if self.key_rate <= 0.0 => Ok(()),
            ApiClient::Key(i) => match self.keys.get(i) {
                Some(b) => b.lock().take(self.key_rate, 2.0 * self.key_rate, now),
                None => Ok(()),
            },
            ApiClient::Ip(_) if self.ip_rate <= 0.0 => Ok(()),
            ApiClient::Ip(ip) => {
                let (rate, burst) = (self.ip_rate, 2.0 * self.ip_rate);
                let ip = rate_key(ip);
                let part = &self.ips[(self.hasher.hash_one(ip) as usize) % IP_PARTS];
                let mut map = part.lock();
                if let Some(b) = map.get_mut(&ip) {
                    return b.take(rate, burst, now);
                }
                if map.len() >= MAX_TRACKED_IPS / IP_PARTS {
                    drop(map);
                    return self.overflow.lock().take(rate, burst, now);
                }
                let mut b = Bucket::full(burst, now);
                let r = b.take(rate, burst, now);
                map.insert(ip, b);
                r
            }
        }
    }

    /// Forgets the clients whose bucket has refilled (they are as good as new): keeps the table
    /// to the clients of the last few seconds.
    pub fn sweep(&self, now: Instant) {
        let (rate, burst) = (self.ip_rate, 2.0 * self.ip_rate);
        for part in &self.ips {
            part.lock().retain(|_, b| !b.is_full(rate, burst, now));
        }
    }

    /// Client addresses tracked.
    pub fn tracked(&self) -> usize {
        self.ips.iter().map(|p| p.lock().len()).sum()
    }
}

/// The address a rate is kept for: IPv4 as is, IPv6 by its /64 (an IPv4-mapped address as
/// IPv4).
fn rate_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_presence_info_budget_follows_a_small_memory_budget() {
        assert_eq!(default_presence_info_budget(256 << 20), 32 << 20);
        assert_eq!(
            default_presence_info_budget(16 << 30),
            64 << 20,
            "at most 64 MiB"
        );
        assert_eq!(
            default_presence_info_budget(0),
            64 << 20,
            "no memory budget"
        );
    }

    #[test]
    fn the_resident_memory_is_read_from_proc() {
        let rss = resident_bytes().unwrap();
        assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
        // What /proc/self/status says (in kB), within what the test's own threads change
        // between the two reads; and a second sample reads the file again, not a copy.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_rss = kb_field(&status, "VmRSS:").unwrap();
        assert!(
            rss.abs_diff(vm_rss) < 8 << 20,
            "statm {rss}, status {vm_rss}"
        );
        let grown: Vec<u8> = std::hint::black_box(vec![1; 32 << 20]);
        let again = resident_bytes().unwrap();
        assert!(again >= rss + (16 << 20), "{rss} then {again}");
        drop(grown);
    }

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

    #[test]
    fn api_rates_per_key_and_per_address() {
        let t0 = Instant::now();
        let l = ApiLimiter::new(10, 100, 2, t0);
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        // A burst of twice the rate, then a wait of one token's time.
        assert!((0..20).all(|_| l.check(ApiClient::Ip(ip), t0).is_ok()));
        let wait = l.check(ApiClient::Ip(ip), t0).unwrap_err();
        assert!((Duration::from_millis(99)..=Duration::from_millis(101)).contains(&wait));
        assert!(l.check(ApiClient::Ip(ip), t0 + wait).is_ok());
        // Another address, a key and an unknown client are counted apart.
        assert!(l
            .check(ApiClient::Ip("203.0.113.10".parse().unwrap()), t0)
            .is_ok());
        assert!((0..200).all(|_| l.check(ApiClient::Key(1), t0).is_ok()));
        assert!(l.check(ApiClient::Key(1), t0).is_err());
        assert!(l.check(ApiClient::Key(0), t0).is_ok());
        assert!((0..1000).all(|_| l.check(ApiClient::Unknown, t0).is_ok()));
        // IPv6 clients share their /64.
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!((0..20).all(|_| l.check(ApiClient::Ip(a), t0).is_ok()));
        assert!(l.check(ApiClient::Ip(b), t0).is_err());
        assert!(l
            .check(ApiClient::Ip("2001:db8:1:3::1".parse().unwrap()), t0)
            .is_ok());
        // Refilled buckets are forgotten.
        assert_eq!(l.tracked(), 4);
        l.sweep(t0 + Duration::from_secs(3));
        assert_eq!(l.tracked(), 0);
        // Rate 0: no limit.
        let free = ApiLimiter::new(0, 0, 1, t0);
        assert!((0..1000).all(|_| free.check(ApiClient::Ip(ip), t0).is_ok()
            && free.check(ApiClient::Key(0), t0).is_ok()));
    }

    #[test]
    fn the_api_limiter_table_is_bounded() {
        let t0 = Instant::now();
        let l = ApiLimiter::new(1, 0, 0, t0);
        for i in 0..(MAX_TRACKED_IPS as u32 * 2) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = l.check(ApiClient::Ip(ip), t0);
        }
        assert!(l.tracked() <= MAX_TRACKED_IPS);
        // The clients that found it full share one bucket: some of them are refused.
        let refused = (0..10u32)
            .filter(|i| {
                let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
                l.check(ApiClient::Ip(ip), t0).is_err()
            })
            .count();
        assert!(refused > 0);
    }

    #[test]
    fn a_throttle_lets_one_through_per_interval() {
        let t = Throttle::new();
        let every = Duration::from_secs(10);
        assert_eq!(t.check(1, every), Some(0));
        assert_eq!(t.check(2, every), None);
        assert_eq!(t.check(9_000, every), None);
        assert_eq!(t.check(10_001, every), Some(2));
        assert_eq!(t.check(10_002, every), None);
    }
}
