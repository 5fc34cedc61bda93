//! Cluster-wide agreement on channel events in NATS (see [`crate::backplane::agree`]).
//!
//! # The bucket
//! A JetStream KV bucket `relay_hooks` holds one entry per channel (key: the channel's hex,
//! as KV keys allow only `[-/_=.a-zA-Z0-9]`), a JSON [`Holds`]: which nodes hold the channel's
//! occupancy and which nodes hold each user's presence, each with its lease expiry (ms).
//!
//! A node reads the entry, applies its claims with [`apply`] (which drops the expired holds
//! first and says which changes made the first holder or removed the last one), and writes it
//! back with a compare-and-set on the entry's revision (`update(key, value, revision)`; revision
//! 0 creates). A conflict means another node wrote in between: read again and apply again, so
//! each change is reported by exactly the one node whose write made it. An entry left with no
//! holds is deleted (again on its revision).
//!
//! The reaper lists the bucket's keys and settles every channel whose holds have all expired
//! (a dead node's), once: the compare-and-set lets only one reaper's write through. The bucket's
//! `max_age` (3 leases) drops entries that no node is left to settle.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::jetstream::kv::{Operation, Store, UpdateErrorKind};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{hex, unavailable, unhex, COMMAND_TIMEOUT};
use crate::backplane::agree::{Agreed, Claim, ClaimOp, Lease};
use crate::backplane::{wall_ms, BackplaneError};
use crate::types::ChannelName;

/// The bucket of the channels' holds.
pub const BUCKET: &str = "relay_hooks";

/// Compare-and-set attempts before a write gives up (the next pass retries it).
const ATTEMPTS: usize = 64;

/// Channels a reaper pass settles at most (the next pass takes the rest).
const REAP_BATCH: usize = 256;

/// A channel's entry: node → lease expiry (ms) for occupancy, and per user.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holds {
    /// The nodes with a subscriber in the channel.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub occ: BTreeMap<String, u64>,
    /// Per user, the nodes where it is a presence member (never an empty map).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Holds {
    /// No node holds anything.
    pub fn is_empty(&self) -> bool {
        self.occ.is_empty() && self.users.is_empty()
    }

    /// The latest expiry of any hold (0: none).
    pub fn latest(&self) -> u64 {
        self.occ
            .values()
            .chain(self.users.values().flat_map(|n| n.values()))
            .copied()
            .max()
            .unwrap_or(0)
    }
}

fn gone(user: Option<&str>) -> Agreed {
    Agreed {
        user: user.map(Arc::from),
        up: false,
    }
}

fn came(user: Option<&str>) -> Agreed {
    Agreed {
        user: user.map(Arc::from),
        up: true,
    }
}

/// Applies `node`'s `claims` at `now` (new holds expire at `expiry`) to `holds`: first drops
/// every hold that expired before `now`, then applies the claims in order. Returns the
/// cluster-wide changes: the first holder of occupancy or of a user, or the last one gone.
pub fn apply(
    holds: &mut Holds,
    node: &str,
    now: u64,
    expiry: u64,
    claims: &[Claim],
) -> Vec<Agreed> {
    let mut out = Vec::new();
    let before = holds.occ.len();
    holds.occ.retain(|_, e| *e >= now);
    if before > 0 && holds.occ.is_empty() {
        out.push(gone(None));
    }
    holds.users.retain(|user, nodes| {
        nodes.retain(|_, e| *e >= now);
        if nodes.is_empty() {
            out.push(gone(Some(user)));
        }
        !nodes.is_empty()
    });
    for c in claims {
        match (&c.user, c.op) {
            (None, ClaimOp::Remove) => {
                if holds.occ.remove(node).is_some() && holds.occ.is_empty() {
                    out.push(gone(None));
                }
            }
            (None, ClaimOp::Add | ClaimOp::Keep) => {
                if holds.occ.insert(node.to_owned(), expiry).is_none() && holds.occ.len() == 1 {
                    out.push(came(None));
                }
            }
            (Some(user), ClaimOp::Remove) => {
                if let Some(nodes) = holds.users.get_mut(&**user) {
                    if nodes.remove(node).is_some() && nodes.is_empty() {
                        holds.users.remove(&**user);
                        out.push(gone(Some(user)));
                    }
                }
            }
            (Some(user), ClaimOp::Add | ClaimOp::Keep) => {
                let nodes = holds.users.entry(user.to_string()).or_default();
                if nodes.insert(node.to_owned(), expiry).is_none() && nodes.len() == 1 {
                    out.push(came(Some(user)));
                }
            }
        }
    }
    out
}

fn bad_entry(e: serde_json::Error) -> BackplaneError {
    BackplaneError::Protocol(format!("bad hooks entry: {e}"))
}

async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, BackplaneError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("nats timed out")),
    }
}

/// Reads a channel's entry: its holds and its revision (0: none yet).
async fn read(kv: &Store, key: &str) -> Result<(Holds, u64, bool), BackplaneError> {
    match timed(kv.entry(key)).await? {
        None => Ok((Holds::default(), 0, false)),
        Some(e) if e.operation == Operation::Put => {
            let holds = serde_json::from_slice(&e.value).map_err(bad_entry)?;
            Ok((holds, e.revision, true))
        }
        // Deleted or purged: no holds, but the next write must follow the marker.
        Some(e) => Ok((Holds::default(), e.revision, false)),
    }
}

/// Writes `claims` about `channel` under `lease`; returns what changed cluster-wide.
/// `only_if_due`: only when every hold has expired (the reaper's pass), else nothing.
async fn settle(
    kv: &Store,
    channel: &ChannelName,
    claims: &[Claim],
    lease: &Lease,
    only_if_due: bool,
) -> Result<Vec<Agreed>, BackplaneError> {
    let key = hex(channel);
    let length = lease.length.as_millis() as u64;
    for _ in 0..ATTEMPTS {
        let (mut holds, revision, present) = read(kv, &key).await?;
        let now = wall_ms();
        if only_if_due && (!present || holds.latest() >= now) {
            return Ok(Vec::new());
        }
        let changes = apply(&mut holds, &lease.node, now, now + length, claims);
        let written = if !holds.is_empty() {
            let value = serde_json::to_vec(&holds).map_err(bad_entry)?;
            tokio::time::timeout(COMMAND_TIMEOUT, kv.update(&key, value.into(), revision)).await
        } else if present {
            tokio::time::timeout(
                COMMAND_TIMEOUT,
                kv.delete_expect_revision(&key, Some(revision)),
            )
            .await
            .map(|r| r.map(|()| revision))
        } else {
            // Nothing was written and nothing is left to write.
            return Ok(changes);
        };
        match written {
            Ok(Ok(_)) => return Ok(changes),
            // Another node wrote in between: its write may have changed what ours means.
            Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
            Ok(Err(e)) => return Err(unavailable(e)),
            Err(_) => return Err(unavailable("nats timed out")),
        }
    }
    Err(unavailable("hooks entry kept changing; retrying later"))
}

/// Writes `claims` about `channel` under `lease`; returns what changed cluster-wide.
pub async fn agree(
    kv: &Store,
    channel: &ChannelName,
    claims: &[Claim],
    lease: &Lease,
) -> Result<Vec<Agreed>, BackplaneError> {
    settle(kv, channel, claims, lease, false).await
}

/// Settles the channels whose holds all ran out (a dead node's): removes the expired holds and
/// returns the changes that made.
pub async fn reap(kv: &Store, lease: &Lease) -> Result<Vec<(ChannelName, Agreed)>, BackplaneError> {
    let listed = tokio::time::timeout(COMMAND_TIMEOUT, async {
        let mut keys = kv.keys().await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            out.push(k.map_err(unavailable)?);
        }
        Ok::<_, BackplaneError>(out)
    })
    .await
    .map_err(|_| unavailable("nats timed out listing the hooks bucket"))??;
    let mut out = Vec::new();
    let mut settled = 0;
    for key in listed {
        // Not a channel's key (written by something else): not ours to settle.
        let Some(channel) = unhex(&key).and_then(|n| ChannelName::new(&n).ok()) else {
            continue;
        };
        let changes = settle(kv, &channel, &[], lease, true).await?;
        if !changes.is_empty() {
            settled += 1;
        }
        out.extend(changes.into_iter().map(|c| (channel.clone(), c)));
        if settled >= REAP_BATCH {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn claim(op: ClaimOp, user: Option<&str>) -> Claim {
        Claim {
            op,
            user: user.map(Arc::from),
        }
    }

    #[test]
    fn only_the_first_holder_and_the_last_one_gone_are_reported() {
        let mut h = Holds::default();
        let occ = [claim(ClaimOp::Add, None)];
        assert_eq!(apply(&mut h, "a", 0, 100, &occ), [came(None)]);
        assert_eq!(apply(&mut h, "b", 0, 100, &occ), []);
        assert_eq!(apply(&mut h, "a", 0, 100, &occ), [], "a repeated add");
        let off = [claim(ClaimOp::Remove, None)];
        assert_eq!(apply(&mut h, "a", 0, 100, &off), []);
        assert_eq!(apply(&mut h, "a", 0, 100, &off), [], "a repeated remove");
        assert_eq!(apply(&mut h, "b", 0, 100, &off), [gone(None)]);
        assert!(h.is_empty());
    }

    #[test]
    fn users_are_counted_across_nodes() {
        let mut h = Holds::default();
        let alice = [claim(ClaimOp::Add, Some("alice"))];
        assert_eq!(apply(&mut h, "a", 0, 100, &alice), [came(Some("alice"))]);
        assert_eq!(apply(&mut h, "b", 0, 100, &alice), []);
        let bob = [claim(ClaimOp::Keep, Some("bob"))];
        assert_eq!(apply(&mut h, "b", 0, 100, &bob), [came(Some("bob"))]);
        let leave = [claim(ClaimOp::Remove, Some("alice"))];
        assert_eq!(apply(&mut h, "a", 0, 100, &leave), []);
        assert_eq!(apply(&mut h, "b", 0, 100, &leave), [gone(Some("alice"))]);
        assert_eq!(h.users.keys().collect::<Vec<_>>(), ["bob"]);
        let stranger = [claim(ClaimOp::Remove, Some("carol"))];
        assert_eq!(apply(&mut h, "a", 0, 100, &stranger), []);
        assert!(!h.users.contains_key("carol"));
    }

    #[test]
    fn expired_holds_are_settled_once_by_whoever_writes_next() {
        let mut h = Holds::default();
        let both = [claim(ClaimOp::Add, None), claim(ClaimOp::Add, Some("u"))];
        apply(&mut h, "dead", 0, 100, &both);
        apply(&mut h, "live", 0, 500, &[claim(ClaimOp::Add, Some("u"))]);
        assert_eq!(h.latest(), 500);
        // At 100 the dead node's holds are still valid.
        assert_eq!(apply(&mut h, "live", 100, 600, &[]), []);
        // Past it: the occupancy ends; "u" is still held by the live node.
        assert_eq!(apply(&mut h, "live", 101, 600, &[]), [gone(None)]);
        assert_eq!(apply(&mut h, "live", 102, 600, &[]), [], "settled once");
        assert_eq!(apply(&mut h, "x", 501, 600, &[]), [gone(Some("u"))]);
        assert!(h.is_empty());
        assert_eq!(h.latest(), 0);
    }

    #[test]
    fn a_kept_hold_that_expired_meanwhile_is_a_new_first_holder() {
        let mut h = Holds::default();
        let keep = [claim(ClaimOp::Keep, None)];
        assert_eq!(apply(&mut h, "a", 0, 10, &keep), [came(None)]);
        assert_eq!(apply(&mut h, "a", 20, 30, &keep), [gone(None), came(None)]);
    }

    #[test]
    fn entries_round_trip_and_omit_what_is_empty() {
        let mut h = Holds::default();
        assert_eq!(serde_json::to_string(&h).unwrap(), "{}");
        apply(&mut h, "n", 0, 7, &[claim(ClaimOp::Add, Some("u"))]);
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, r#"{"users":{"u":{"n":7}}}"#);
        assert_eq!(serde_json::from_str::<Holds>(&json).unwrap(), h);
    }
}
