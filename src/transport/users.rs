//! Acting on a user's connections from the server API: disconnect them, subscribe them to a
//! channel or unsubscribe them, on every shard.
//!
//! A user is a token's subject (`sub`): connections without one are not in the index.
//! - [`UserControl`] (in the [`super::Node`], shared): one bounded inbox per shard of
//!   `(user, command)` and a `Notify`. The API handler puts a command into every shard's inbox.
//! - [`ShardUsers`] (in each [`super::ShardContext`]): user → this shard's connections of that
//!   user, each with a [`Mailbox`]. The shard's control task ([`run_shard`]) drains its inbox
//!   into the mailboxes of the user's connections, and each session applies its mailbox on its
//!   own task (where its state lives).
//!
//! Bounded everywhere: an inbox holds at most [`INBOX`] commands (the API answers 503
//! `overloaded` past it), a mailbox [`MAILBOX`] (older commands first; past it the newest is
//! dropped and the connection is disconnected instead, so that it cannot miss an order). The
//! index costs one map entry per user plus one `Rc` per connection with a user.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::engine::hub::ConnId;
use crate::types::ChannelName;

/// Commands waiting per shard, at most.
pub const INBOX: usize = 4096;
/// Commands waiting per connection, at most.
pub const MAILBOX: usize = 16;

// The close codes of a server-side disconnect, from the catalogue; their old paths.
pub use crate::protocol::codes::{CLOSE_DISCONNECTED, CLOSE_DISCONNECTED_FOR_GOOD};

/// What to do with each connection of a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserCommand {
    /// Close it: WebSocket close [`CLOSE_DISCONNECTED`] (`reconnect`) or
    /// [`CLOSE_DISCONNECTED_FOR_GOOD`] with `reason`; an SSE stream ends.
    Disconnect {
        /// Shown to the client (at most 120 bytes are sent).
        reason: Arc<str>,
        /// Whether the client should come back.
        reconnect: bool,
    },
    /// Subscribe it to the channel (WebSocket: a `subscribed` event without `id` follows).
    Subscribe(ChannelName),
    /// Unsubscribe it (WebSocket: an `unsubscribed` event without `id` follows).
    Unsubscribe(ChannelName),
}

/// One shard's waiting commands, with the user each is for.
type Inbox = Mutex<VecDeque<(Arc<str>, UserCommand)>>;

/// A user's connections on one shard.
type Conns = Vec<(ConnId, Rc<Mailbox>)>;

/// The shards' inboxes. See the module docs.
pub struct UserControl {
    inboxes: Box<[Inbox]>,
    ready: Box<[Notify]>,
}

/// The inboxes are full: the API answers 503 `overloaded`.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("too many user commands are waiting; try again later")]
pub struct InboxFull;

impl UserControl {
    /// Inboxes for `shards` shards.
    pub fn new(shards: usize) -> Self {
        Self {
            inboxes: (0..shards).map(|_| Mutex::default()).collect(),
            ready: (0..shards).map(|_| Notify::new()).collect(),
        }
    }

    /// Sends `command` to every connection of `user` on every shard of this node. All or
    /// nothing: refused when any shard's inbox is full.
    pub fn send(&self, user: &str, command: UserCommand) -> Result<(), InboxFull> {
        let mut inboxes: Vec<_> = self.inboxes.iter().map(|i| i.lock()).collect();
        if inboxes.iter().any(|i| i.len() >= INBOX) {
            return Err(InboxFull);
        }
        let user: Arc<str> = user.into();
        for inbox in inboxes.iter_mut() {
            inbox.push_back((user.clone(), command.clone()));
        }
        drop(inboxes);
        for r in self.ready.iter() {
            r.notify_one();
        }
        Ok(())
    }
}

/// One connection's commands, applied by its session.
#[derive(Default)]
pub struct Mailbox {
    commands: RefCell<VecDeque<UserCommand>>,
    /// The session's task, woken when a command comes.
    waker: RefCell<Option<Waker>>,
}

impl Mailbox {
    /// `Ready` when a command is there; otherwise wakes `cx` when one comes. A poll rather
    /// than a future, so that a session holds no future per source it waits on.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.commands.borrow().is_empty() {
            return Poll::Ready(());
        }
        let mut w = self.waker.borrow_mut();
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The next command.
    pub fn take(&self) -> Option<UserCommand> {
        self.commands.borrow_mut().pop_front()
    }

    fn put(&self, command: UserCommand) {
        let mut q = self.commands.borrow_mut();
        if q.len() >= MAILBOX {
            // Rather than let the connection miss an order, end it; it reconnects and gets
            // its server-side state anew.
            q.clear();
            q.push_back(UserCommand::Disconnect {
                reason: "too many server commands at once; reconnect".into(),
                reconnect: true,
            });
        } else {
            q.push_back(command);
        }
        drop(q);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// This shard's user → connections index. See the module docs.
#[derive(Default)]
pub struct ShardUsers {
    users: RefCell<HashMap<Arc<str>, Conns>>,
}

impl ShardUsers {
    /// Adds connection `conn` of `user`; returns its mailbox. Call [`ShardUsers::remove`] when
    /// it ends.
    pub fn add(&self, user: &Arc<str>, conn: ConnId) -> Rc<Mailbox> {
        let mailbox = Rc::new(Mailbox::default());
        self.users
            .borrow_mut()
            .entry(user.clone())
            .or_default()
            .push((conn, mailbox.clone()));
        mailbox
    }

    /// Removes connection `conn` of `user`.
    pub fn remove(&self, user: &str, conn: ConnId) {
        let mut users = self.users.borrow_mut();
        if let Some(conns) = users.get_mut(user) {
            conns.retain(|(c, _)| *c != conn);
            if conns.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Connections of `user` on this shard.
    pub fn count(&self, user: &str) -> usize {
        self.users.borrow().get(user).map_or(0, Vec::len)
    }

    fn deliver(&self, user: &str, command: &UserCommand) {
        if let Some(conns) = self.users.borrow().get(user) {
            for (_, m) in conns {
                m.put(command.clone());
            }
        }
    }
}

/// The shard's control task: moves the commands of its inbox to its connections' mailboxes.
pub async fn run_shard(ctx: Rc<super::ShardContext>) {
    let node = ctx.node.clone();
    let shard = ctx.shard;
    let (Some(inbox), Some(ready)) = (node.users.inboxes.get(shard), node.users.ready.get(shard))
    else {
        return;
    };
    loop {
        tokio::select! {
            _ = ready.notified() => {}
            _ = node.shutdown.cancelled() => return,
        }
        let batch: Vec<_> = inbox.lock().drain(..).collect();
        for (user, command) in batch {
            ctx.users.deliver(&user, &command);
        }
    }
}

/// A user command as one node sends it to the others: `{"node","user","command":
/// "disconnect"|"subscribe"|"unsubscribe","reason"?,"reconnect"?,"channel"?}`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    node: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    user: std::borrow::Cow<'a, str>,
    command: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    reconnect: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    channel: Option<std::borrow::Cow<'a, str>>,
}

fn encode(node: &str, user: &str, command: &UserCommand) -> bytes::Bytes {
    let (name, reason, reconnect, channel) = match command {
        UserCommand::Disconnect { reason, reconnect } => {
            ("disconnect", Some(&**reason), *reconnect, None)
        }
        UserCommand::Subscribe(c) => ("subscribe", None, false, Some(c.as_str())),
        UserCommand::Unsubscribe(c) => ("unsubscribe", None, false, Some(c.as_str())),
    };
    let wire = Wire {
        node: node.into(),
        user: user.into(),
        command: name,
        reason: reason.map(Into::into),
        reconnect,
        channel: channel.map(Into::into),
    };
    bytes::Bytes::from(serde_json::to_vec(&wire).unwrap_or_default())
}

/// `(node, user, command)` of a control message, `None` when it is not one.
fn decode(message: &[u8]) -> Option<(String, String, UserCommand)> {
    let w: Wire = serde_json::from_slice(message).ok()?;
    let channel = || ChannelName::new(w.channel.as_deref()?).ok();
    let command = match w.command {
        "disconnect" => UserCommand::Disconnect {
            reason: w.reason.as_deref()?.into(),
            reconnect: w.reconnect,
        },
        "subscribe" => UserCommand::Subscribe(channel()?),
        "unsubscribe" => UserCommand::Unsubscribe(channel()?),
        _ => return None,
    };
    Some((w.node.into_owned(), w.user.into_owned(), command))
}

/// How far a user command went: the nodes it reached (this one included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reach {
    /// 1 on a single node; in a cluster, the nodes the backplane delivered it to, or `None`
    /// when the backplane cannot tell (NATS: sent to every node subscribed).
    pub nodes: Option<u64>,
}

/// Why a user command was not carried out everywhere.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UserCommandError {
    /// This node's inboxes are full: nothing was done (503 `overloaded`).
    #[error(transparent)]
    Full(#[from] InboxFull),
    /// Applied on this node, but the other nodes could not be told (503 `unavailable`; the
    /// commands are idempotent, a retry is safe).
    #[error("applied on this node only; the backplane is unavailable ({0}); retry")]
    NotSent(String),
}

/// Makes `node` apply the user commands other nodes send over the backplane.
pub fn listen(node: &super::Node) {
    let users = node.users.clone();
    let me = node.config.node_id().to_owned();
    node.backplane.set_control(std::sync::Arc::new(move |message: &[u8]| {
        let Some((from, user, command)) = decode(message) else {
            tracing::warn!("backplane: unreadable control message ignored");
            return;
        };
        // The sender applied it already.
        if from != me && users.send(&user, command).is_err() {
            tracing::warn!(%user, %from, "a user command from another node was dropped: inboxes full");
            metrics::counter!("relay_user_commands_dropped_total").increment(1);
        }
    }));
}

/// What the server API (and compatibility APIs) can ask of the node, transport-neutral.
impl super::Node {
    /// Closes every connection of `user` in the cluster (see [`UserCommand::Disconnect`]).
    pub async fn disconnect_user(
        &self,
        user: &str,
        reason: &str,
        reconnect: bool,
    ) -> Result<Reach, UserCommandError> {
        let command = UserCommand::Disconnect {
            reason: reason.into(),
            reconnect,
        };
        self.user_command(user, command).await
    }

    /// Subscribes every WebSocket connection of `user` in the cluster to `channel`, whatever
    /// its grants (the server decides).
    pub async fn subscribe_user(
        &self,
        user: &str,
        channel: &ChannelName,
    ) -> Result<Reach, UserCommandError> {
        self.user_command(user, UserCommand::Subscribe(channel.clone()))
            .await
    }

    /// Unsubscribes every WebSocket connection of `user` in the cluster from `channel`.
    pub async fn unsubscribe_user(
        &self,
        user: &str,
        channel: &ChannelName,
    ) -> Result<Reach, UserCommandError> {
        self.user_command(user, UserCommand::Unsubscribe(channel.clone()))
            .await
    }

    /// Applies `command` on this node's shards, then sends it to the other nodes.
    async fn user_command(
        &self,
        user: &str,
        command: UserCommand,
    ) -> Result<Reach, UserCommandError> {
        let message = encode(self.config.node_id(), user, &command);
        self.users.send(user, command)?;
        match self.backplane.send_control(message) {
            None => Ok(Reach { nodes: Some(1) }),
            Some(sent) => match sent.await {
                Ok(nodes) => Ok(Reach {
                    nodes: nodes.map(|n| n.max(1)),
                }),
                Err(e) => Err(UserCommandError::NotSent(e.to_string())),
            },
        }
    }

    /// What this node knows of `channel` (reading creates nothing).
    pub fn channel_info(&self, channel: &ChannelName) -> ChannelInfo {
        let presence = self
            .engine
            .presence(channel, None, 0, 0)
            .map(|snapshot| snapshot.stats);
        ChannelInfo {
            subscribers: self.engine.local_subscribers(channel),
            position: self.engine.position(channel),
            presence,
        }
    }
}

/// A channel as [`super::Node::channel_info`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct ChannelInfo {
    /// Subscribers connected to this node.
    pub subscribers: u64,
    /// Its epoch and top seq; `None`: the node does not have it.
    pub position: Option<crate::types::StreamPosition>,
    /// Its presence counts; `None`: not a presence channel.
    pub presence: Option<crate::engine::presence::PresenceStats>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_flooded_mailbox_disconnects_instead_of_dropping_an_order() {
        let users = ShardUsers::default();
        let alice: Arc<str> = "alice".into();
        let m = users.add(&alice, 1);
        let ch = ChannelName::new("a").unwrap();
        for _ in 0..=MAILBOX {
            users.deliver("alice", &UserCommand::Subscribe(ch.clone()));
        }
        assert!(matches!(m.take(), Some(UserCommand::Disconnect { .. })));
        assert_eq!(m.take(), None);
        users.remove("alice", 1);
        assert_eq!(users.count("alice"), 0);
    }
}

#[cfg(test)]
mod wire_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn user_commands_cross_the_backplane_unchanged() {
        let ch = ChannelName::new("private:ann").unwrap();
        for command in [
            UserCommand::Disconnect {
                reason: "banned \"for good\"".into(),
                reconnect: false,
            },
            UserCommand::Subscribe(ch.clone()),
            UserCommand::Unsubscribe(ch),
        ] {
            let b = encode("node-1", "ann", &command);
            let (node, user, back) = decode(&b).unwrap();
            assert_eq!((node.as_str(), user.as_str()), ("node-1", "ann"));
            assert_eq!(back, command);
        }
        assert!(decode(b"{}").is_none());
        assert!(decode(br#"{"node":"a","user":"u","command":"explode"}"#).is_none());
        assert!(decode(br#"{"node":"a","user":"u","command":"subscribe","channel":""}"#).is_none());
    }
}
