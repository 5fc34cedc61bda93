//! The shard-local side of fan-out: which of this shard's connections subscribe to what, and
//! the pump that moves new publications from the shared rings into their outboxes.
//!
//! `!Send` by design: one hub per shard thread, touched only by that thread's tasks, so
//! subscribing, unsubscribing and delivering take no lock beyond the channel's own.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use indexmap::IndexMap;

use super::outbox::{Out, Outbox};
use super::{Channel, Engine, Publication, Subscribed, FRAME_SLOTS};
use crate::types::{ChannelName, StreamPosition};

/// Builds the frame of a publication for one encoding (an index below [`FRAME_SLOTS`]). The
/// hub calls it at most once per publication and encoding, whatever the number of subscribers.
pub type Encoder = fn(encoding: usize, channel: &ChannelName, publication: &Publication) -> Bytes;

/// Identifies a connection within its shard.
pub type ConnId = u64;

/// One local subscription.
#[derive(Debug)]
pub struct Subscriber {
    /// Where its frames go.
    pub outbox: Rc<Outbox>,
    /// Which encoding it reads (index into the publication's frame cache).
    pub encoding: usize,
    /// The connection's own index for this subscription (SSE cursors use it).
    pub slot: u16,
    /// It has everything up to this seq already (from `subscribed` and its replay).
    pub after: u64,
}

struct Local {
    channel: Arc<Channel>,
    /// Everything up to this seq was delivered on this shard.
    cursor: u64,
    subs: IndexMap<ConnId, Subscriber>,
}

/// Counters of one [`Hub::pump`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PumpStats {
    /// Channels pulled.
    pub channels: usize,
    /// Publications pulled.
    pub publications: usize,
    /// Frames queued to subscribers.
    pub deliveries: usize,
    /// Subscribers that overflowed or lagged past the ring.
    pub slow: usize,
}

/// See the module docs.
pub struct Hub {
    shard: usize,
    engine: Arc<Engine>,
    encode: Encoder,
    channels: HashMap<ChannelName, Local>,
    dirty: Vec<Arc<Channel>>,
    pubs: Vec<Arc<Publication>>,
}

impl Hub {
    /// The hub of `shard`.
    pub fn new(shard: usize, engine: Arc<Engine>, encode: Encoder) -> Self {
        Self {
            shard,
            engine,
            encode,
            channels: HashMap::new(),
            dirty: Vec::new(),
            pubs: Vec::new(),
        }
    }

    /// The engine behind it.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The shard index.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Subscribes connection `conn`. The caller queues its reply and `replay` into the outbox
    /// right away (before yielding), so that they precede every live message, which start after
    /// `position.seq`.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        name: &ChannelName,
        resume: Option<StreamPosition>,
        sub: Subscriber,
        now: Instant,
    ) -> Subscribed {
        let s = self.engine.subscribe(self.shard, name, resume, now);
        let local = self.channels.entry(name.clone()).or_insert_with(|| Local {
            channel: s.channel.clone(),
            cursor: s.position.seq,
            subs: IndexMap::new(),
        });
        if !Arc::ptr_eq(&local.channel, &s.channel) {
            // The sweep replaced the channel while this shard had no subscriber left in it.
            local.channel = s.channel.clone();
            local.cursor = s.position.seq;
        }
        let after = s.position.seq;
        if let Some(old) = local.subs.insert(conn, Subscriber { after, ..sub }) {
            // A connection subscribes once per channel (transports check); keep counts right.
            drop(old);
            self.engine.unsubscribe(self.shard, &s.channel, now);
        }
        s
    }

    /// Unsubscribes `conn` from `name`. Returns false if it was not subscribed.
    pub fn unsubscribe(&mut self, conn: ConnId, name: &ChannelName, now: Instant) -> bool {
        let Some(local) = self.channels.get_mut(name) else {
            return false;
        };
        if local.subs.swap_remove(&conn).is_none() {
            return false;
        }
        self.engine.unsubscribe(self.shard, &local.channel, now);
        if local.subs.is_empty() {
            self.channels.remove(name);
        }
        true
    }

    /// Local subscribers of `name`.
    pub fn subscribers(&self, name: &ChannelName) -> usize {
        self.channels.get(name).map_or(0, |l| l.subs.len())
    }

    /// Moves every new publication of this shard's dirty channels into the subscribers'
    /// outboxes. Call it whenever the shard is woken for fan-out.
    pub fn pump(&mut self) -> PumpStats {
        let mut stats = PumpStats::default();
        self.engine.take_dirty(self.shard, &mut self.dirty);
        let mut dirty = std::mem::take(&mut self.dirty);
        for channel in dirty.drain(..) {
            let Some(local) = self.channels.get_mut(channel.name()) else {
                continue;
            };
            if !Arc::ptr_eq(&local.channel, &channel) {
                continue;
            }
            stats.channels += 1;
            self.pubs.clear();
            let lost = channel.read_since(local.cursor, &mut self.pubs);
            if lost {
                // This shard fell behind the ring: every local subscriber has a gap, so each
                // is closed as a slow consumer and resumes from its own last seq.
                for sub in local.subs.values() {
                    sub.outbox.mark_overflowed();
                    stats.slow += 1;
                }
            }
            for p in &self.pubs {
                let mut frames: [Option<Bytes>; FRAME_SLOTS] = Default::default();
                for sub in local.subs.values() {
                    if p.seq <= sub.after {
                        continue;
                    }
                    let enc = sub.encoding % FRAME_SLOTS;
                    let frame = frames[enc]
                        .get_or_insert_with(|| {
                            let encode = self.encode;
                            p.frame(enc, |p| encode(enc, channel.name(), p))
                        })
                        .clone();
                    let out = Out {
                        frame,
                        slot: sub.slot,
                        seq: p.seq,
                    };
                    if sub.outbox.push(out) {
                        stats.deliveries += 1;
                    } else if sub.outbox.state() == super::outbox::OutboxState::Overflowed {
                        stats.slow += 1;
                    }
                }
                local.cursor = p.seq;
            }
            stats.publications += self.pubs.len();
        }
        self.dirty = dirty;
        self.pubs.clear();
        stats
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::engine::outbox::OutboxState;
    use crate::engine::EngineConfig;
    use std::time::Duration;

    fn encode(enc: usize, _: &ChannelName, p: &Publication) -> Bytes {
        Bytes::from(format!("{enc}:{}", p.seq))
    }

    fn setup(shards: usize) -> Arc<Engine> {
        Arc::new(Engine::new(EngineConfig {
            shards,
            history_size: 100,
            history_ttl: Duration::from_secs(60),
            seed: 3,
        }))
    }

    fn sub(outbox: &Rc<Outbox>, encoding: usize) -> Subscriber {
        Subscriber {
            outbox: outbox.clone(),
            encoding,
            slot: 0,
            after: 0,
        }
    }

    fn frames(o: &Outbox) -> Vec<String> {
        let mut v = Vec::new();
        o.drain_into(|out| v.push(String::from_utf8_lossy(&out.frame).into_owned()));
        v
    }

    #[test]
    fn fan_out_reaches_every_shard_in_order_once() {
        let e = setup(2);
        let now = Instant::now();
        let name = ChannelName::new("c").unwrap();
        let mut hubs = [
            Hub::new(0, e.clone(), encode),
            Hub::new(1, e.clone(), encode),
        ];
        let a = Rc::new(Outbox::new(1 << 20));
        let b = Rc::new(Outbox::new(1 << 20));
        let c = Rc::new(Outbox::new(1 << 20));
        hubs[0].subscribe(1, &name, None, sub(&a, 0), now);
        hubs[0].subscribe(2, &name, None, sub(&b, 1), now);
        hubs[1].subscribe(1, &name, None, sub(&c, 0), now);
        for _ in 0..3 {
            e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now);
        }
        assert_eq!(hubs[0].pump().deliveries, 6);
        assert_eq!(hubs[1].pump().deliveries, 3);
        assert_eq!(hubs[1].pump().deliveries, 0, "nothing twice");
        assert_eq!(frames(&a), ["0:1", "0:2", "0:3"]);
        assert_eq!(frames(&b), ["1:1", "1:2", "1:3"]);
        assert_eq!(frames(&c), ["0:1", "0:2", "0:3"]);
    }

    #[test]
    fn a_late_subscriber_gets_only_what_follows_its_position() {
        let e = setup(1);
        let now = Instant::now();
        let name = ChannelName::new("c").unwrap();
        let mut hub = Hub::new(0, e.clone(), encode);
        let a = Rc::new(Outbox::new(1 << 20));
        let b = Rc::new(Outbox::new(1 << 20));
        hub.subscribe(1, &name, None, sub(&a, 0), now);
        e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now);
        // b joins before the shard pumped seq 1: it must not get seq 1.
        let s = hub.subscribe(2, &name, None, sub(&b, 0), now);
        assert_eq!(s.position.seq, 1);
        e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now);
        hub.pump();
        assert_eq!(frames(&a), ["0:1", "0:2"]);
        assert_eq!(frames(&b), ["0:2"]);
    }

    #[test]
    fn a_slow_subscriber_overflows_alone() {
        let e = setup(1);
        let now = Instant::now();
        let name = ChannelName::new("c").unwrap();
        let mut hub = Hub::new(0, e.clone(), encode);
        let slow = Rc::new(Outbox::new(8));
        let fast = Rc::new(Outbox::new(1 << 20));
        hub.subscribe(1, &name, None, sub(&slow, 0), now);
        hub.subscribe(2, &name, None, sub(&fast, 0), now);
        for _ in 0..5 {
            e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now);
        }
        let st = hub.pump();
        assert_eq!(slow.state(), OutboxState::Overflowed);
        assert!(st.slow >= 1);
        assert_eq!(frames(&fast).len(), 5);
    }

    #[test]
    fn unsubscribe_stops_delivery_and_releases_interest() {
        let e = setup(1);
        let now = Instant::now();
        let name = ChannelName::new("c").unwrap();
        let mut hub = Hub::new(0, e.clone(), encode);
        let a = Rc::new(Outbox::new(1 << 20));
        hub.subscribe(1, &name, None, sub(&a, 0), now);
        assert!(hub.unsubscribe(1, &name, now));
        assert!(!hub.unsubscribe(1, &name, now));
        assert_eq!(
            e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now)
                .wake,
            0
        );
        hub.pump();
        assert!(a.is_empty());
        assert_eq!(e.channels()[0].subscribers, 0);
    }
}
