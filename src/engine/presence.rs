//! Presence: who is in a channel. Sans-IO, driven by `now` (as milliseconds on the engine's
//! clock).
//!
//! - Members are connections (`client`) of a `user`; events are per user: `join` when a user's
//!   first connection arrives, `leave` when its last one goes.
//! - Liveness costs one atomic store per heartbeat (or any inbound frame): each connection owns a
//!   [`Liveness`] shared with every channel it is a member of. Nothing else happens per beat.
//! - The sweep, every `--presence-sweep`, removes members whose liveness is older than the
//!   timeout: a vanished client leaves at the first sweep after its timeout, never before.
//! - Events go into a small ring per channel, with a presence sequence (`pseq`) that shards use as
//!   their cursor, and carry the channel's message seq at the time so clients can order them
//!   against messages.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use std::time::Instant;

use super::memory::Kind;
use super::{Channel, ChannelState, Engine, ShardMask};
use crate::types::{identity_len, ChannelName};
pub use crate::types::{Identity, PresenceEvent, EVENT_OVERHEAD};

/// Presence settings.
#[derive(Clone, Debug)]
pub struct PresenceConfig {
    /// Channel patterns with presence (`*` matches any run of characters).
    pub patterns: Vec<String>,
    /// A member whose liveness is older than this leaves.
    pub timeout: Duration,
    /// Most members per channel.
    pub max_members: usize,
    /// Most info bytes of all the members of the node together.
    pub info_budget: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            patterns: Vec::new(),
            timeout: Duration::from_secs(45),
            max_members: 10_000,
            info_budget: 64 << 20,
        }
    }
}

/// Events kept per channel for shards to pull, at most.
const EVENT_RING: usize = 1024;

/// Events are kept this long at most (milliseconds): long enough for every shard to pull them,
/// short enough that the identities and info they hold go soon after their members left.
pub const EVENT_MAX_AGE_MS: u64 = 5_000;

/// Bytes a member costs besides its ids and info (its map entries, its `Arc`s).
pub const MEMBER_OVERHEAD: usize = 160;

/// Whether `name` matches the glob `pattern` (`*` = any run of characters, possibly empty).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// A connection's last sign of life, in engine milliseconds. Shared by the connection (which
/// stores into it) and every presence set it is in (which reads it in the sweep).
#[derive(Debug, Default)]
pub struct Liveness(AtomicU64);

impl Liveness {
    /// Records life at `ms`.
    pub fn touch(&self, ms: u64) {
        self.0.store(ms, Ordering::Relaxed);
    }

    /// The last sign of life.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Member {
    who: Identity,
    live: Arc<Liveness>,
    /// Connected to another node (known through a backplane), not to this one.
    remote: bool,
}

/// Why a member could not join.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    /// The channel has `max_members` members.
    #[error("the channel's presence is full")]
    Full,
    /// The members of the node hold `--presence-info-budget` bytes of info already.
    #[error("the node's presence info budget (--presence-info-budget) is used up: join without info or try again later")]
    InfoBudget,
}

/// One channel's presence set.
#[derive(Default)]
pub struct Presence {
    members: HashMap<Arc<str>, Member>,
    users: HashMap<Arc<str>, u32>,
    events: VecDeque<Arc<PresenceEvent>>,
    pseq: u64,
    /// What the members and events cost (see [`Presence::bytes`]).
    bytes: usize,
    /// Info bytes of the members.
    info_bytes: usize,
}

/// Counts of a presence set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresenceStats {
    /// Connections.
    pub clients: usize,
    /// Distinct users.
    pub users: usize,
}

impl Presence {
    /// The last presence sequence number (shards start their cursor here).
    pub fn pseq(&self) -> u64 {
        self.pseq
    }

    /// Adds a member at `now_ms`. Returns whether an event was recorded (the user's first
    /// connection).
    pub fn join(
        &mut self,
        who: Identity,
        live: Arc<Liveness>,
        seq: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<bool, PresenceError> {
        self.join_member(who, live, seq, max, false, now_ms)
    }

    /// [`Presence::join`] of a member connected to this node (`remote == false`) or to
    /// another node of a cluster (`remote == true`, known through the backplane).
    pub fn join_member(
        &mut self,
        who: Identity,
        live: Arc<Liveness>,
        seq: u64,
        max: usize,
        remote: bool,
        now_ms: u64,
    ) -> Result<bool, PresenceError> {
        if self.members.contains_key(&who.client) {
            return Ok(false);
        }
        if self.members.len() >= max {
            return Err(PresenceError::Full);
        }
        let count = self.users.entry(who.user.clone()).or_insert(0);
        *count += 1;
        let first = *count == 1;
        self.bytes += MEMBER_OVERHEAD + identity_len(&who);
        self.info_bytes += who.info.as_ref().map_or(0, Bytes::len);
        self.members.insert(
            who.client.clone(),
            Member {
                who: who.clone(),
                live,
                remote,
            },
        );
        if first {
            self.record(true, who, seq, now_ms);
        }
        Ok(first)
    }

    /// Removes a member at `now_ms`. Returns whether an event was recorded (the user's last
    /// connection).
    pub fn leave(&mut self, client: &str, seq: u64, now_ms: u64) -> bool {
        let Some(m) = self.members.remove(client) else {
            return false;
        };
        self.bytes -= MEMBER_OVERHEAD + identity_len(&m.who);
        self.info_bytes -= m.who.info.as_ref().map_or(0, Bytes::len);
        let last = match self.users.get_mut(&m.who.user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.users.remove(&m.who.user);
                true
            }
        };
        if last {
            self.record(false, m.who, seq, now_ms);
        }
        self.shrink();
        last
    }

    /// Removes the members not seen since `deadline_ms`. Returns how many events it recorded.
    pub fn sweep(&mut self, deadline_ms: u64, seq: u64, now_ms: u64) -> usize {
        let gone: Vec<Arc<str>> = self
            .members
            .iter()
            .filter(|(_, m)| m.live.get() < deadline_ms)
            .map(|(c, _)| c.clone())
            .collect();
        gone.iter().filter(|c| self.leave(c, seq, now_ms)).count()
    }

    fn record(&mut self, join: bool, who: Identity, seq: u64, now_ms: u64) {
        self.pseq += 1;
        let mut event = PresenceEvent::new(self.pseq, seq, join, who);
        event.at_ms = now_ms;
        self.bytes += event.cost();
        self.events.push_back(Arc::new(event));
        while self.events.len() > EVENT_RING {
            self.pop_event();
        }
        self.trim_events(now_ms);
    }

    fn pop_event(&mut self) {
        if let Some(e) = self.events.pop_front() {
            self.bytes -= e.cost();
        }
    }

    /// Drops the events older than [`EVENT_MAX_AGE_MS`].
    pub fn trim_events(&mut self, now_ms: u64) {
        while self
            .events
            .front()
            .is_some_and(|e| now_ms.saturating_sub(e.at_ms) > EVENT_MAX_AGE_MS)
        {
            self.pop_event();
        }
        self.shrink();
    }

    /// When the oldest event may be dropped, in engine milliseconds.
    pub fn events_due(&self) -> Option<u64> {
        self.events.front().map(|e| e.at_ms + EVENT_MAX_AGE_MS + 1)
    }

    /// Gives memory back once most members or events are gone: maps keep their capacity
    /// otherwise, and a crowd that left would stay paid for.
    fn shrink(&mut self) {
        if self.members.capacity() > 4 * self.members.len() + 16 {
            self.members.shrink_to_fit();
            self.users.shrink_to_fit();
        }
        if self.events.capacity() > 4 * self.events.len() + 16 {
            self.events.shrink_to_fit();
        }
    }

    /// What the members and events cost, bytes (ids, info and fixed overheads).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Info bytes of the members.
    pub fn info_bytes(&self) -> usize {
        self.info_bytes
    }

    /// Whether there are neither members nor events.
    pub fn is_idle(&self) -> bool {
        self.members.is_empty() && self.events.is_empty()
    }

    /// Appends the events after `cursor` to `out`; returns whether some were already gone.
    pub fn read_since(&self, cursor: u64, out: &mut Vec<Arc<PresenceEvent>>) -> bool {
        let Some(first) = self.events.front().map(|e| e.pseq) else {
            return cursor < self.pseq;
        };
        let start = (cursor + 1).saturating_sub(first) as usize;
        out.extend(self.events.range(start.min(self.events.len())..).cloned());
        cursor + 1 < first
    }

    /// The members, sorted by client id.
    pub fn members(&self) -> Vec<Identity> {
        self.members_page(None, usize::MAX, usize::MAX).0
    }

    /// A page of the members, sorted by client id: those after the client id `after`, at most
    /// `limit` of them and, past the first, at most `max_bytes` of ids and info. The second
    /// value is the cursor of the next page (the last client id given), when there is more.
    pub fn members_page(
        &self,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> (Vec<Identity>, Option<Arc<str>>) {
        let mut v: Vec<&Member> = self
            .members
            .values()
            .filter(|m| after.is_none_or(|a| &*m.who.client > a))
            .collect();
        let take = limit.max(1);
        if v.len() > take {
            v.select_nth_unstable_by(take, |a, b| a.who.client.cmp(&b.who.client));
        }
        let more = v.len() > take;
        v.truncate(take);
        v.sort_unstable_by(|a, b| a.who.client.cmp(&b.who.client));
        let mut out = Vec::with_capacity(v.len());
        let mut bytes = 0;
        for m in &v {
            bytes += identity_len(&m.who);
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(m.who.clone());
        }
        let cut = out.len() < v.len();
        let next = (more || cut)
            .then(|| out.last().map(|w: &Identity| w.client.clone()))
            .flatten();
        (out, next)
    }

    /// The members connected to this node (not the remote ones), unsorted.
    pub fn local_members(&self) -> Vec<Identity> {
        self.members
            .values()
            .filter(|m| !m.remote)
            .map(|m| m.who.clone())
            .collect()
    }

    /// The client ids of the remote members.
    pub fn remote_clients(&self) -> Vec<Arc<str>> {
        self.members
            .iter()
            .filter(|(_, m)| m.remote)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Counts.
    pub fn stats(&self) -> PresenceStats {
        PresenceStats {
            clients: self.members.len(),
            users: self.users.len(),
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

// The engine's presence operations over its table: the members of a channel live in its
// `Presence` (above), under the channel lock; these find the channel, keep the sweep's work
// list and the node's info budget.

/// A presence listing (one page).
pub struct PresenceSnapshot {
    /// The channel's message seq.
    pub seq: u64,
    /// The members of this page, by client id.
    pub members: Vec<Identity>,
    /// Counts.
    pub stats: PresenceStats,
    /// The cursor of the next page (the last client id of this one), when there is more.
    pub next: Option<Arc<str>>,
}

impl Engine {
    /// Whether `name` has presence.
    pub fn has_presence(&self, name: &ChannelName) -> bool {
        self.cfg
            .presence
            .patterns
            .iter()
            .any(|p| glob_match(p, name.as_str()))
    }

    /// Info bytes of every presence member on the node.
    pub fn presence_info_bytes(&self) -> usize {
        self.info_bytes.load(Ordering::Relaxed)
    }

    /// Runs `f` on the channel's presence (`None` when it has none) and keeps the books: the
    /// memory meter, the node's info bytes, the list of channels with members, and the expiry
    /// of its events.
    pub(super) fn presence_op<R>(
        &self,
        ch: &Arc<Channel>,
        st: &mut ChannelState,
        now_ms: u64,
        f: impl FnOnce(&mut Presence) -> R,
    ) -> Option<R> {
        let p = st.presence.as_mut()?;
        let (bytes, info, empty) = (p.bytes(), p.info_bytes(), p.is_empty());
        let pseq = p.pseq();
        let r = f(p);
        if let Some(o) = self.observer.get().filter(|_| p.pseq() != pseq) {
            let mut events = Vec::new();
            p.read_since(pseq, &mut events);
            for e in events {
                o.presence(&ch.name, &e.who, e.join);
            }
        }
        p.trim_events(now_ms);
        self.meter
            .add(Kind::Presence, p.bytes() as i64 - bytes as i64);
        let info_now = p.info_bytes();
        if info_now >= info {
            self.info_bytes
                .fetch_add(info_now - info, Ordering::Relaxed);
        } else {
            self.info_bytes
                .fetch_sub(info - info_now, Ordering::Relaxed);
        }
        let (empty_now, due) = (p.is_empty(), p.events_due());
        if empty != empty_now {
            let mut present = self.present.lock();
            if empty_now {
                present.remove(&ch.name);
            } else {
                present.insert(ch.name.clone(), ch.clone());
            }
        }
        if let Some(ms) = due {
            self.schedule(ch, st, self.base + Duration::from_millis(ms));
        }
        Some(r)
    }

    /// Removes `client` from the channel's presence at once (a clean leave) at `now`. Returns
    /// the shards to wake.
    pub fn leave_presence(&self, channel: &Arc<Channel>, client: &str, now: Instant) -> ShardMask {
        let now_ms = self.millis(now);
        let wake = {
            let mut st = channel.state.lock();
            let seq = st.top;
            let left = self
                .presence_op(channel, &mut st, now_ms, |p| p.leave(client, seq, now_ms))
                .unwrap_or(false);
            if left {
                Self::mark_dirty(channel, &st)
            } else {
                0
            }
        };
        self.enqueue_dirty(channel, wake);
        wake
    }

    /// Removes every presence member not seen for the presence timeout. Returns the shards to
    /// wake. Costs O(members of the channels that have members): run it every
    /// `--presence-sweep`.
    pub fn sweep_presence(&self, now: Instant) -> ShardMask {
        let now_ms = self.millis(now);
        let deadline = now_ms.saturating_sub(self.cfg.presence.timeout.as_millis() as u64);
        let channels: Vec<Arc<Channel>> = self.present.lock().values().cloned().collect();
        let mut all = 0;
        for ch in channels {
            let wake = {
                let mut st = ch.state.lock();
                let seq = st.top;
                let left = self
                    .presence_op(&ch, &mut st, now_ms, |p| p.sweep(deadline, seq, now_ms))
                    .is_some_and(|n| n > 0);
                if left {
                    Self::mark_dirty(&ch, &st)
                } else {
                    0
                }
            };
            self.enqueue_dirty(&ch, wake);
            all |= wake;
        }
        all
    }

    /// The members of `name` connected to this node (none when it has no presence or is
    /// unknown here): what a backplane advertises to the other nodes.
    pub fn presence_local(&self, name: &ChannelName) -> Vec<Identity> {
        self.with_existing(name, |_, st| {
            st.presence
                .as_ref()
                .map_or_else(Vec::new, |p| p.local_members())
        })
        .unwrap_or_default()
    }

    /// Adds (`Some(live)`) or removes (`None`) a member connected to another node, as the
    /// backplane reports it, in a channel this node has. Join and leave events follow the same
    /// per-user rules as local members. Returns the shards to wake.
    pub fn presence_remote(
        &self,
        name: &ChannelName,
        who: Identity,
        live: Option<Arc<Liveness>>,
        now: Instant,
    ) -> ShardMask {
        if !self.has_presence(name) {
            return 0;
        }
        let now_ms = self.millis(now);
        let r = self.with_existing(name, |ch, st| {
            let seq = st.top;
            let changed = self
                .presence_op(ch, st, now_ms, |p| match live {
                    Some(live) => p
                        .join_member(who, live, seq, usize::MAX, true, now_ms)
                        .unwrap_or(false),
                    None => p.leave(&who.client, seq, now_ms),
                })
                .unwrap_or(false);
            let wake = if changed { Self::mark_dirty(ch, st) } else { 0 };
            (wake, ch.clone())
        });
        let Some((wake, ch)) = r else {
            return 0;
        };
        self.enqueue_dirty(&ch, wake);
        wake
    }

    /// The client ids of the remote members of `name`.
    pub fn presence_remote_clients(&self, name: &ChannelName) -> Vec<Arc<str>> {
        self.with_existing(name, |_, st| {
            st.presence
                .as_ref()
                .map_or_else(Vec::new, |p| p.remote_clients())
        })
        .unwrap_or_default()
    }

    /// A page of the members of `name` (those after the client id `after`, at most `limit`,
    /// and past the first at most `max_bytes` of ids and info), or `None` when it has no
    /// presence. A channel that does not exist has no members (and is not created).
    pub fn presence(
        &self,
        name: &ChannelName,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> Option<PresenceSnapshot> {
        if !self.has_presence(name) {
            return None;
        }
        let empty = || PresenceSnapshot {
            seq: 0,
            members: Vec::new(),
            stats: PresenceStats {
                clients: 0,
                users: 0,
            },
            next: None,
        };
        self.with_existing(name, |_, st| {
            st.presence.as_ref().map(|p| {
                let (members, next) = p.members_page(after, limit, max_bytes);
                PresenceSnapshot {
                    seq: st.top,
                    members,
                    stats: p.stats(),
                    next,
                }
            })
        })
        .map_or_else(|| Some(empty()), |s| Some(s.unwrap_or_else(empty)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(client: &str, user: &str) -> Identity {
        Identity {
            client: client.into(),
            user: user.into(),
            info: None,
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("presence:*", "presence:room"));
        assert!(!glob_match("presence:*", "room"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-x-c"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exact2"));
    }

    #[test]
    fn events_are_per_user() {
        let mut p = Presence::default();
        let live = Arc::new(Liveness::default());
        assert_eq!(p.join(who("c1", "alice"), live.clone(), 0, 10, 0), Ok(true));
        assert_eq!(
            p.join(who("c2", "alice"), live.clone(), 0, 10, 0),
            Ok(false)
        );
        assert_eq!(p.join(who("c3", "bob"), live.clone(), 1, 10, 0), Ok(true));
        assert_eq!(
            p.stats(),
            PresenceStats {
                clients: 3,
                users: 2
            }
        );
        assert!(!p.leave("c1", 2, 0));
        assert!(p.leave("c2", 2, 0));
        assert!(!p.leave("c2", 2, 0), "already gone");
        let mut ev = Vec::new();
        p.read_since(0, &mut ev);
        let got: Vec<_> = ev.iter().map(|e| (e.kind(), &*e.who.user, e.seq)).collect();
        assert_eq!(
            got,
            [
                ("join", "alice", 0),
                ("join", "bob", 1),
                ("leave", "alice", 2)
            ]
        );
        ev.clear();
        p.read_since(2, &mut ev);
        assert_eq!(ev.len(), 1);
    }

    #[test]
    fn sweep_removes_only_the_silent() {
        let mut p = Presence::default();
        let quiet = Arc::new(Liveness::default());
        let busy = Arc::new(Liveness::default());
        quiet.touch(1_000);
        busy.touch(1_000);
        p.join(who("q", "q"), quiet, 0, 10, 0).ok();
        p.join(who("b", "b"), busy.clone(), 0, 10, 0).ok();
        busy.touch(50_000);
        assert_eq!(
            p.sweep(1_000, 0, 0),
            0,
            "exactly at the deadline is still alive"
        );
        assert_eq!(p.sweep(20_000, 0, 0), 1);
        assert_eq!(p.members().len(), 1);
        assert_eq!(&*p.members()[0].client, "b");
    }

    #[test]
    fn full_is_refused() {
        let mut p = Presence::default();
        let live = Arc::new(Liveness::default());
        p.join(who("a", "a"), live.clone(), 0, 1, 0).ok();
        assert_eq!(
            p.join(who("b", "b"), live, 0, 1, 0),
            Err(PresenceError::Full)
        );
    }

    #[test]
    fn memory_returns_after_members_leave_and_events_age_out() {
        let mut p = Presence::default();
        let live = Arc::new(Liveness::default());
        for i in 0..500 {
            let w = Identity {
                client: format!("c{i}").into(),
                user: format!("u{i}").into(),
                info: Some(Bytes::from(vec![b'x'; 4096])),
            };
            p.join(w, live.clone(), 0, 10_000, 1_000).ok();
        }
        assert_eq!(p.info_bytes(), 500 * 4096);
        assert!(p.bytes() > 2 * 500 * 4096, "members and their join events");
        for i in 0..500 {
            p.leave(&format!("c{i}"), 0, 2_000);
        }
        assert_eq!(p.info_bytes(), 0);
        assert!(p.bytes() > 0, "leave events are still there for the shards");
        assert_eq!(p.events_due(), Some(1_000 + EVENT_MAX_AGE_MS + 1));
        p.trim_events(2_000 + EVENT_MAX_AGE_MS + 1);
        assert_eq!(p.bytes(), 0);
        assert!(p.is_idle());
        assert!(p.members.capacity() < 64, "the maps gave their room back");
    }

    #[test]
    fn member_pages_follow_the_client_order_and_the_byte_cap() {
        let mut p = Presence::default();
        let live = Arc::new(Liveness::default());
        for i in (0..25).rev() {
            p.join(who(&format!("c{i:02}"), "u"), live.clone(), 0, 100, 0)
                .ok();
        }
        let (page, next) = p.members_page(None, 10, usize::MAX);
        assert_eq!(page.len(), 10);
        assert_eq!(&*page[0].client, "c00");
        assert_eq!(next.as_deref(), Some("c09"));
        let (page, next) = p.members_page(next.as_deref(), 10, usize::MAX);
        assert_eq!(&*page[0].client, "c10");
        let (page, next) = p.members_page(next.as_deref(), 10, usize::MAX);
        assert_eq!(page.len(), 5);
        assert_eq!(next, None, "the last page");
        // Each member is 4 bytes of ids: 12 bytes hold 3; the first always comes.
        let (page, next) = p.members_page(None, 10, 12);
        assert_eq!(page.len(), 3);
        assert_eq!(next.as_deref(), Some("c02"));
        assert_eq!(p.members_page(None, 10, 1).0.len(), 1);
    }
}
