//! Presence across nodes, independent of the backplane's store: what a node advertises of its
//! own members, and the members of other nodes mirrored into its engine as *remote* members.
//!
//! The store (Redis hash + zset, NATS JetStream subjects) holds per channel every member with
//! its node and an expiry; each node writes its members' joins, leaves and refreshes (every
//! `timeout / 4`), announces joins and leaves on the channel's fan-out for speed, and reads the
//! whole set back as often. A remote member's liveness is its expiry minus the timeout, so the
//! engine's presence sweep treats it like a local one: a dead node's members leave everywhere
//! within the timeout (plus a sweep).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::instant_of;
use crate::engine::presence::{Identity, Liveness};
use crate::engine::{Engine, ShardMask};
use crate::types::ChannelName;

/// One change to write: `+` joined here, `-` left here, `~` still here (refresh).
pub type PresenceOp = (&'static str, Identity);

/// Members a store lists for a channel: client → (node, identity, expiry in wall-clock ms).
pub type Members = HashMap<Arc<str>, (String, Identity, u64)>;

/// How often members are refreshed and read back, for a presence timeout.
pub fn every(timeout: Duration) -> Duration {
    (timeout / 4).max(Duration::from_millis(250))
}

/// A member as stored: `<len>:<node><len>:<user><info>`.
pub fn encode_member(node: &str, who: &Identity) -> Bytes {
    let mut b = Vec::with_capacity(node.len() + who.user.len() + 16);
    b.extend_from_slice(format!("{}:{node}{}:", node.len(), who.user.len()).as_bytes());
    b.extend_from_slice(who.user.as_bytes());
    if let Some(info) = &who.info {
        b.extend_from_slice(info);
    }
    Bytes::from(b)
}

/// Parses [`encode_member`] back: `(node, identity)`.
pub fn decode_member(client: &str, b: &[u8]) -> Option<(String, Identity)> {
    fn field(b: &[u8]) -> Option<(&str, &[u8])> {
        let colon = memchr::memchr(b':', b)?;
        let len: usize = std::str::from_utf8(&b[..colon]).ok()?.parse().ok()?;
        let rest = &b[colon + 1..];
        let s = std::str::from_utf8(rest.get(..len)?).ok()?;
        Some((s, &rest[len..]))
    }
    let (node, rest) = field(b)?;
    let (user, info) = field(rest)?;
    Some((
        node.to_owned(),
        Identity {
            client: Arc::from(client),
            user: Arc::from(user),
            info: (!info.is_empty()).then(|| Bytes::copy_from_slice(info)),
        },
    ))
}

fn bare(client: Arc<str>) -> Identity {
    Identity {
        user: client.clone(),
        client,
        info: None,
    }
}

/// A joined presence channel's cross-node bookkeeping.
#[derive(Default)]
pub struct Mirror {
    /// The local members this node wrote to the store.
    advertised: HashSet<Arc<str>>,
    /// Members of other nodes, with the liveness the store reports for them.
    remote: HashMap<Arc<str>, Arc<Liveness>>,
    refreshed: Option<Instant>,
    reconciled: Option<Instant>,
}

impl Mirror {
    /// Forgets what was written and read (the store may have lost it): everything is written
    /// and read again at the next [`Mirror::plan`].
    pub fn restart(&mut self) {
        self.advertised.clear();
        self.refreshed = None;
        self.reconciled = None;
    }

    /// What to write now for `name` (joins, leaves, refreshes when due) and whether to read
    /// the members back; `None` when there is nothing to do.
    pub fn plan(
        &mut self,
        engine: &Engine,
        name: &ChannelName,
        timeout: Duration,
        now: Instant,
    ) -> Option<(Vec<PresenceOp>, bool)> {
        let every = every(timeout);
        let due = |t: Option<Instant>| t.is_none_or(|t| now.saturating_duration_since(t) >= every);
        let local = engine.presence_local(name);
        let current: HashSet<Arc<str>> = local.iter().map(|w| w.client.clone()).collect();
        let mut ops: Vec<PresenceOp> = self
            .advertised
            .difference(&current)
            .map(|c| ("-", bare(c.clone())))
            .collect();
        let refresh = due(self.refreshed);
        for w in local {
            if !self.advertised.contains(&w.client) {
                ops.push(("+", w));
            } else if refresh {
                ops.push(("~", w));
            }
        }
        if refresh {
            self.refreshed = Some(now);
        }
        let reconcile = due(self.reconciled);
        if reconcile {
            self.reconciled = Some(now);
        }
        self.advertised = current;
        (!ops.is_empty() || reconcile).then_some((ops, reconcile))
    }

    /// A join announced by `node` (ignored when it is this node, `me`). Returns the shards to
    /// wake.
    pub fn joined(
        &mut self,
        engine: &Engine,
        name: &ChannelName,
        me: &str,
        node: &str,
        who: Identity,
        now: Instant,
    ) -> ShardMask {
        if node == me {
            return 0;
        }
        let ms = engine.millis(now);
        if let Some(live) = self.remote.get(&who.client) {
            live.touch(ms);
            return 0;
        }
        let live = Arc::new(Liveness::default());
        live.touch(ms);
        self.remote.insert(who.client.clone(), live.clone());
        engine.presence_remote(name, who, Some(live), now)
    }

    /// A leave announced by another node. Returns the shards to wake.
    pub fn left(
        &mut self,
        engine: &Engine,
        name: &ChannelName,
        client: &str,
        now: Instant,
    ) -> ShardMask {
        match self.remote.remove_entry(client) {
            Some((client, _)) => engine.presence_remote(name, bare(client), None, now),
            None => 0,
        }
    }

    /// Adopts the members the store lists (`client → (node, identity, expiry ms)`): adds the
    /// new ones of other nodes, moves the liveness of known ones, removes the ones it no longer
    /// lists. Returns the shards to wake.
    #[allow(clippy::too_many_arguments)]
    pub fn reconcile(
        &mut self,
        engine: &Engine,
        name: &ChannelName,
        me: &str,
        members: Members,
        timeout: Duration,
        now: Instant,
        now_ms: u64,
    ) -> ShardMask {
        let timeout_ms = timeout.as_millis() as u64;
        let every_ms = every(timeout).as_millis() as u64;
        let engine_now = engine.millis(now);
        // Members the engine's sweep removed (silent past the timeout) are no longer known.
        let known: HashSet<Arc<str>> = engine.presence_remote_clients(name).into_iter().collect();
        self.remote.retain(|client, _| known.contains(client));
        let mut wake = 0;
        let mut listed = HashSet::new();
        for (client, (node, who, exp)) in members {
            if node == me || exp < now_ms {
                continue;
            }
            listed.insert(client.clone());
            let seen = engine.millis(instant_of(exp.saturating_sub(timeout_ms), now, now_ms));
            match self.remote.get(&client) {
                Some(live) => {
                    if seen > live.get() {
                        live.touch(seen);
                    }
                }
                None => {
                    let live = Arc::new(Liveness::default());
                    live.touch(seen);
                    self.remote.insert(client, live.clone());
                    wake |= engine.presence_remote(name, who, Some(live), now);
                }
            }
        }
        // Not listed, and not announced very recently (the announce may beat the write).
        let gone: Vec<Arc<str>> = self
            .remote
            .iter()
            .filter(|(c, live)| !listed.contains(*c) && live.get() + every_ms < engine_now)
            .map(|(c, _)| c.clone())
            .collect();
        for client in gone {
            self.remote.remove(&client);
            wake |= engine.presence_remote(name, bare(client), None, now);
        }
        wake
    }

    /// The channel is no longer received: its remote members leave this node's view.
    pub fn clear(self, engine: &Engine, name: &ChannelName, now: Instant) -> ShardMask {
        self.remote.into_keys().fold(0, |w, c| {
            w | engine.presence_remote(name, bare(c), None, now)
        })
    }
}

/// A page of `members` (every node's, read from the store) in the shape the engine answers
/// for a channel it holds: by client id after `after`, at most `limit` (and about `max_bytes`,
/// at least one), with the counts of all of them.
pub fn page(
    mut members: Vec<Identity>,
    seq: u64,
    after: Option<&str>,
    limit: usize,
    max_bytes: usize,
) -> crate::engine::PresenceSnapshot {
    let users: std::collections::HashSet<&str> = members.iter().map(|m| &*m.user).collect();
    let stats = crate::engine::presence::PresenceStats {
        clients: members.len(),
        users: users.len(),
    };
    members.retain(|m| after.is_none_or(|a| &*m.client > a));
    members.sort_unstable_by(|a, b| a.client.cmp(&b.client));
    let take = limit.max(1);
    let mut bytes = 0;
    let mut out = Vec::new();
    for m in members.iter().take(take) {
        bytes += crate::types::identity_len(m);
        if !out.is_empty() && bytes > max_bytes {
            break;
        }
        out.push(m.clone());
    }
    let next = (out.len() < members.len())
        .then(|| out.last().map(|w| w.client.clone()))
        .flatten();
    crate::engine::PresenceSnapshot {
        seq,
        members: out,
        stats,
        next,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn members_round_trip() {
        let who = Identity {
            client: Arc::from("c1"),
            user: Arc::from("ali:ce 1"),
            info: Some(Bytes::from_static(b"{\"a\":1}")),
        };
        let b = encode_member("node-7", &who);
        let (node, back) = decode_member("c1", &b).unwrap();
        assert_eq!(node, "node-7");
        assert_eq!(&*back.user, "ali:ce 1");
        assert_eq!(back.info.as_deref(), Some(&b"{\"a\":1}"[..]));
        let bare = encode_member("n", &bare(Arc::from("x")));
        assert!(decode_member("x", &bare).unwrap().1.info.is_none());
        assert!(decode_member("x", b"9:short").is_none());
    }

    #[test]
    fn a_store_page_is_by_client_with_the_counts_of_all() {
        let who = |client: &str, user: &str| Identity {
            client: client.into(),
            user: user.into(),
            info: None,
        };
        let all = vec![who("c", "u1"), who("a", "u1"), who("b", "u2")];
        let first = page(all.clone(), 9, None, 2, 1 << 20);
        let ids: Vec<&str> = first.members.iter().map(|m| &*m.client).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(first.next.as_deref(), Some("b"));
        assert_eq!(
            (first.stats.clients, first.stats.users, first.seq),
            (3, 2, 9)
        );
        let rest = page(all, 9, Some("b"), 2, 1 << 20);
        assert_eq!(rest.members.len(), 1);
        assert_eq!(rest.next, None);
    }
}
