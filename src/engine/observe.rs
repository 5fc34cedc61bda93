//! What the engine tells an observer (webhooks) about channels: occupancy and presence changes.
//!
//! The engine calls the observer under the channel's lock, so the calls for one channel come in
//! the order the changes happened. An observer must therefore only record (push into a bounded
//! queue) and never block, take a channel lock, or call back into the engine.

use super::presence::Identity;
use crate::types::ChannelName;

/// Receives the engine's channel events. See the module docs.
pub trait Observer: Send + Sync {
    /// `channel` got its first subscriber on this node (`true`) or lost its last (`false`).
    fn occupancy(&self, channel: &ChannelName, occupied: bool);
    /// A user joined (`true`: its first connection) or left (`false`: its last) the channel's
    /// presence. `who.client` is the connection that made the change.
    fn presence(&self, channel: &ChannelName, who: &Identity, joined: bool);
}
