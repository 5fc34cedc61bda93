//! Who sends a webhook in a cluster: the node the backplane names (see
//! [`crate::backplane::agree`]), so that each `channel_occupied`, `channel_vacated`,
//! `member_added` and `member_removed` is sent once per cluster, not once per node.
//!
//! The engine's observer calls only mark a channel as changed (under the channel lock: one
//! short lock and a wake-up). A task on the thread `relay-agree` then compares what this node
//! holds of each marked channel (a local subscriber; the users of its local presence members)
//! with what it last wrote, writes the difference as claims, and queues the events the
//! backplane answers on the dispatcher. Every `presence-timeout / 4` it refreshes every claim
//! (the lease), rechecks every channel it holds and settles the channels of dead nodes
//! ([`crate::backplane::Backplane::reap`]). A change shorter than one pass (a subscribe and
//! unsubscribe in between) may go unreported, as the cluster never saw it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{EventKind, Webhooks};
use crate::backplane::agree::{Agreed, Claim, ClaimOp};
use crate::backplane::Backplane;
use crate::engine::observe::Observer;
use crate::engine::presence::Identity;
use crate::engine::Engine;
use crate::types::ChannelName;

/// Channels written per round trip batch (their scripts run concurrently).
const BATCH: usize = 64;

/// The engine's observer in a cluster. See the module docs.
pub struct Agreement {
    changed: Mutex<HashSet<ChannelName>>,
    wake: Notify,
}

impl Observer for Agreement {
    fn occupancy(&self, channel: &ChannelName, _occupied: bool) {
        self.mark(channel);
    }

    fn presence(&self, channel: &ChannelName, _who: &Identity, _joined: bool) {
        self.mark(channel);
    }
}

impl Agreement {
    fn mark(&self, channel: &ChannelName) {
        // Bounded by the engine's channels (`--max-channels`).
        if self.changed.lock().insert(channel.clone()) {
            self.wake.notify_one();
        }
    }

    /// Starts the agreement task on its own thread; its events go to `hooks`.
    pub fn start(
        hooks: Arc<Webhooks>,
        engine: Arc<Engine>,
        backplane: Arc<dyn Backplane>,
        lease: Duration,
        shutdown: CancellationToken,
    ) -> std::io::Result<Arc<Self>> {
        let me = Arc::new(Self {
            changed: Mutex::new(HashSet::new()),
            wake: Notify::new(),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let run = Run {
            me: me.clone(),
            hooks,
            engine,
            backplane,
            held: HashMap::new(),
        };
        let every = crate::backplane::presence::every(lease);
        std::thread::Builder::new()
            .name("relay-agree".into())
            .spawn(move || rt.block_on(run.run(every, shutdown)))?;
        Ok(me)
    }
}

/// What this node wrote about a channel.
#[derive(Default, PartialEq, Eq)]
struct Held {
    occupied: bool,
    users: HashSet<Arc<str>>,
}

impl Held {
    fn is_empty(&self) -> bool {
        !self.occupied && self.users.is_empty()
    }
}

struct Run {
    me: Arc<Agreement>,
    hooks: Arc<Webhooks>,
    engine: Arc<Engine>,
    backplane: Arc<dyn Backplane>,
    held: HashMap<ChannelName, Held>,
}

/// The claims that take `was` to `now`; with `keep`, the ones held on are refreshed.
fn claims(was: &Held, now: &Held, keep: bool) -> Vec<Claim> {
    let claim = |op, user: Option<&Arc<str>>| Claim {
        op,
        user: user.cloned(),
    };
    let mut out = Vec::new();
    match (was.occupied, now.occupied) {
        (false, true) => out.push(claim(ClaimOp::Add, None)),
        (true, false) => out.push(claim(ClaimOp::Remove, None)),
        (true, true) if keep => out.push(claim(ClaimOp::Keep, None)),
        _ => {}
    }
    out.extend(
        was.users
            .difference(&now.users)
            .map(|u| claim(ClaimOp::Remove, Some(u))),
    );
    for u in &now.users {
        if !was.users.contains(u) {
            out.push(claim(ClaimOp::Add, Some(u)));
        } else if keep {
            out.push(claim(ClaimOp::Keep, Some(u)));
        }
    }
    out
}

impl Run {
    async fn run(mut self, every: Duration, shutdown: CancellationToken) {
        let mut refresh = tokio::time::interval(every);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let keep = tokio::select! {
                _ = self.me.wake.notified() => false,
                _ = refresh.tick() => true,
                _ = shutdown.cancelled() => return,
            };
            let mut names: Vec<ChannelName> = std::mem::take(&mut *self.me.changed.lock())
                .into_iter()
                .collect();
            if keep {
                let marked: HashSet<ChannelName> = names.iter().cloned().collect();
                names.extend(self.held.keys().filter(|n| !marked.contains(*n)).cloned());
            }
            for batch in names.chunks(BATCH) {
                self.write(batch, keep).await;
            }
            if keep {
                match self.backplane.reap().await {
                    Ok(changes) => {
                        for (channel, change) in changes {
                            self.emit(&channel, change);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "webhooks: settling expired claims failed")
                    }
                }
            }
        }
    }

    /// What this node holds of `name` now.
    fn now(&self, name: &ChannelName) -> Held {
        Held {
            occupied: self.engine.local_subscribers(name) > 0,
            users: if self.engine.has_presence(name) {
                self.engine
                    .presence_local(name)
                    .into_iter()
                    .map(|w| w.user)
                    .collect()
            } else {
                HashSet::new()
            },
        }
    }

    /// Writes the claims of `names`; a channel whose write failed is marked again (the next
    /// pass retries it).
    async fn write(&mut self, names: &[ChannelName], keep: bool) {
        let empty = Held::default();
        let work: Vec<(ChannelName, Held, Vec<Claim>)> = names
            .iter()
            .filter_map(|name| {
                let now = self.now(name);
                let c = claims(self.held.get(name).unwrap_or(&empty), &now, keep);
                (!c.is_empty()).then(|| (name.clone(), now, c))
            })
            .collect();
        let results = futures_util::future::join_all(
            work.iter()
                .map(|(name, _, c)| self.backplane.agree(name, c.clone())),
        )
        .await;
        for ((name, now, _), result) in work.into_iter().zip(results) {
            match result {
                Ok(changes) => {
                    for change in changes {
                        self.emit(&name, change);
                    }
                    if now.is_empty() {
                        self.held.remove(&name);
                    } else {
                        self.held.insert(name, now);
                    }
                }
                Err(e) => {
                    tracing::debug!(%name, error = %e, "webhooks: writing claims failed; retrying");
                    self.me.changed.lock().insert(name);
                }
            }
        }
    }

    fn emit(&self, channel: &ChannelName, change: Agreed) {
        let kind = match (&change.user, change.up) {
            (None, true) => EventKind::ChannelOccupied,
            (None, false) => EventKind::ChannelVacated,
            (Some(_), true) => EventKind::MemberAdded,
            (Some(_), false) => EventKind::MemberRemoved,
        };
        self.hooks.emit(kind, channel, change.user.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(occupied: bool, users: &[&str]) -> Held {
        Held {
            occupied,
            users: users.iter().map(|u| Arc::from(*u)).collect(),
        }
    }

    fn ops(c: &[Claim]) -> Vec<(ClaimOp, Option<&str>)> {
        let mut v: Vec<_> = c.iter().map(|c| (c.op, c.user.as_deref())).collect();
        v.sort_by_key(|(op, u)| (format!("{op:?}"), u.map(str::to_owned)));
        v
    }

    #[test]
    fn claims_are_the_difference_and_refreshes_only_when_kept() {
        let was = held(true, &["a", "b"]);
        let now = held(true, &["b", "c"]);
        assert_eq!(
            ops(&claims(&was, &now, false)),
            [(ClaimOp::Add, Some("c")), (ClaimOp::Remove, Some("a"))]
        );
        assert_eq!(
            ops(&claims(&was, &now, true)),
            [
                (ClaimOp::Add, Some("c")),
                (ClaimOp::Keep, None),
                (ClaimOp::Keep, Some("b")),
                (ClaimOp::Remove, Some("a")),
            ]
        );
        assert_eq!(
            ops(&claims(&was, &held(false, &[]), true)),
            [
                (ClaimOp::Remove, None),
                (ClaimOp::Remove, Some("a")),
                (ClaimOp::Remove, Some("b"))
            ]
        );
        assert!(claims(&Held::default(), &Held::default(), true).is_empty());
    }
}
