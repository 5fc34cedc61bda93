//! Cluster-wide agreement on channel events (what the webhooks report once per cluster, not
//! once per node).
//!
//! Each node *holds* facts about a channel: "I have a subscriber in it" (occupancy) and "user U
//! has a presence member here". It writes its changes ([`Claim`]s) to the store under a lease
//! (`--presence-timeout`, refreshed every quarter of it), and the store answers, atomically per
//! channel, which claim changed the cluster-wide state ([`Agreed`]): the node whose claim made
//! the first holder sends `channel_occupied` / `member_added`, the node whose claim removed the
//! last one sends `channel_vacated` / `member_removed`. A node that dies stops refreshing; any
//! node that next touches the channel, or that finds it in the store's index of channels whose
//! leases may have run out ([`super::Backplane::reap`]), removes the expired holds and sends
//! what their removal means, once.

use std::sync::Arc;
use std::time::Duration;

/// Whose claims, for how long (the store drops a claim not kept for `length`).
#[derive(Clone, Debug)]
pub struct Lease {
    /// This node's id.
    pub node: String,
    /// A claim not kept for this long expires.
    pub length: Duration,
}

/// What a claim does to a fact this node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimOp {
    /// This node holds it from now on.
    Add,
    /// This node no longer holds it.
    Remove,
    /// This node still holds it (lease refresh; adds it again if it expired meanwhile).
    Keep,
}

/// One change of what this node holds about a channel: occupancy (`user: None`) or a user's
/// presence (`user: Some`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Add, remove or keep.
    pub op: ClaimOp,
    /// The user, or `None` for the channel's occupancy.
    pub user: Option<Arc<str>>,
}

/// A change of the cluster-wide state: the channel became occupied (`up`) or vacated, or a
/// user became a member (`up`) or stopped being one. The node that receives it reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// The user, or `None` for occupancy.
    pub user: Option<Arc<str>>,
    /// First holder (`true`) or last one gone (`false`).
    pub up: bool,
}
