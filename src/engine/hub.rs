//! The shard-local side of fan-out: which of this shard's connections subscribe to what, and
//! the pump that moves new publications from the shared rings into their outboxes.
//!
//! `!Send` by design: one hub per shard thread, touched only by that thread's tasks, so
//! subscribing, unsubscribing and delivering take no lock beyond the channel's own.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;

use super::outbox::{Gauge, Out, Outbox, OutboxState, Run};
use super::presence::PresenceEvent;
use super::{
    Channel, Engine, Join, Publication, SlowPolicy, SubscribeError, Subscribed, FRAME_SLOTS,
};
pub use crate::types::Encoder;
use crate::types::{ChannelName, StreamPosition};

/// The tag of a presence member's client id (see [`super::Engine::client_id`]): a tagged
/// subscriber does not receive its own connection's presence events.
pub fn client_tag(client: &str) -> u64 {
    u64::from_str_radix(client, 16).unwrap_or(0)
}

/// Identifies a connection within its shard.
pub type ConnId = u64;

/// Most publications a replay reads from the ring under one lock.
const REPLAY_PAGE: usize = 256;

/// Most payload bytes joined in one run (`outbox::Run`): a pass that pulled more of a channel
/// queues several runs, so that a burst of large messages is not copied into one buffer (and
/// a large message gains nothing from joining: it goes alone).
const RUN_BYTES: usize = 64 << 10;

/// What [`RUN_BYTES`] counts per message besides its payload (about a frame's header and
/// envelope).
const RUN_ENTRY: usize = 64;

/// One local subscription.
pub struct Subscriber {
    /// Where its frames go.
    pub outbox: Rc<Outbox>,
    /// Which encoding it reads (index into the publication's frame cache).
    /// (Below [`FRAME_SLOTS`]; one byte, so that the entry is 64 bytes, not 72: every
    /// subscription of every connection has one.)
    pub encoding: u8,
    /// The connection's own index for this subscription (SSE cursors use it).
    pub slot: u16,
    /// Nonzero: the connection's tag ([`client_tag`] of its client id). Publications whose
    /// [`Encoder::origin`] is this tag and this connection's own presence events are not
    /// delivered to it (Pusher's `socket_id` exclusion, and a member is not told it joined).
    pub tag: u64,
    /// It has everything up to this seq already (from `subscribed` and its replay).
    after: u64,
    /// It gets presence events after this presence seq.
    pafter: u64,
    /// What waits for room in its outbox, if anything.
    deferred: Deferred,
}

/// What a subscriber waits to queue until its outbox has room. One at a time: a replay
/// precedes live delivery (which skips the subscriber meanwhile), and a channel's policy is
/// either `drop` or `conflate`. One field keeps the subscriber small, which the fan-out loop
/// over thousands of them feels.
enum Deferred {
    /// Nothing.
    None,
    /// `drop` policy: the messages `from..=to` it missed while its outbox was full, to announce.
    Gap(u64, u64),
    /// `conflate` policy: the latest message it could not take yet.
    Stash(Arc<Publication>),
    /// While it resumes: the last seq its replay queued. Live delivery skips it (`after` is
    /// `u64::MAX`) until the replay, paged out of the ring as its outbox drains, catches up.
    Replay(u64),
}

impl Subscriber {
    /// A subscription writing to `outbox` in `encoding`, known to its connection as `slot`.
    pub fn new(outbox: Rc<Outbox>, encoding: usize, slot: u16) -> Self {
        Self {
            outbox,
            encoding: (encoding % FRAME_SLOTS) as u8,
            slot,
            tag: 0,
            after: 0,
            pafter: 0,
            deferred: Deferred::None,
        }
    }

    fn pending(&self) -> bool {
        !matches!(self.deferred, Deferred::None)
    }

    /// Whether it is still replaying a resume.
    pub fn replaying(&self) -> bool {
        matches!(self.deferred, Deferred::Replay(_))
    }
}

struct Local {
    channel: Arc<Channel>,
    /// Everything up to this seq was delivered on this shard.
    cursor: u64,
    /// Presence events up to this presence seq were delivered on this shard.
    pcursor: u64,
    /// The channel's generation the cursor belongs to (see [`Engine::reset`]).
    generation: u64,
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
    /// Messages skipped for full outboxes under the `drop` or `conflate` policy.
    pub skipped: usize,
    /// Messages queued from resume replays.
    pub replayed: usize,
    /// Messages queued joined with others of their channel in one entry (`outbox::Run`).
    pub joined: usize,
    /// Bytes queued into outboxes (frames and entries), added to the shard's gauge once per
    /// pass rather than once per delivery.
    pub queued: usize,
    /// Age of the oldest publication pulled (publish → queued), if any.
    pub oldest_age: Option<std::time::Duration>,
}

/// See the module docs.
pub struct Hub {
    shard: usize,
    engine: Arc<Engine>,
    encode: Encoder,
    /// The shard's outbox gauge (what fan-out queues is added once per pass).
    gauge: Gauge,
    channels: HashMap<ChannelName, Local>,
    dirty: Vec<Arc<Channel>>,
    pubs: Vec<Arc<Publication>>,
    events: Vec<Arc<PresenceEvent>>,
}

impl Hub {
    /// The hub of `shard`.
    pub fn new(shard: usize, engine: Arc<Engine>, encode: Encoder) -> Self {
        Self::with_gauge(shard, engine, encode, Gauge::default())
    }

    /// [`Hub::new`], counting what it queues in `gauge`, the gauge of the shard's outboxes.
    pub fn with_gauge(shard: usize, engine: Arc<Engine>, encode: Encoder, gauge: Gauge) -> Self {
        Self {
            shard,
            engine,
            encode,
            gauge,
            channels: HashMap::new(),
            dirty: Vec::new(),
            pubs: Vec::new(),
            events: Vec::new(),
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

    /// Subscribes connection `conn` (and adds it to the channel's presence when `join` is
    /// given and the channel has presence). The caller queues its reply right away (before
    /// yielding), then calls [`Hub::flush`] for the channel, which queues the first page of a
    /// resume's replay; live messages follow the replay (or start after `position.seq`).
    /// Wake `wake`.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        name: &ChannelName,
        resume: Option<StreamPosition>,
        join: Option<Join>,
        sub: Subscriber,
        now: Instant,
    ) -> Result<Subscribed, SubscribeError> {
        let s = self.engine.subscribe(self.shard, name, resume, join, now)?;
        let local = self.channels.entry(name.clone()).or_insert_with(|| Local {
            channel: s.channel.clone(),
            cursor: s.position.seq,
            pcursor: s.pseq,
            generation: s.generation,
            subs: IndexMap::new(),
        });
        if !Arc::ptr_eq(&local.channel, &s.channel) {
            // The sweep replaced the channel while this shard had no subscriber left in it.
            local.channel = s.channel.clone();
            local.cursor = s.position.seq;
            local.pcursor = s.pseq;
            local.generation = s.generation;
        } else if local.generation != s.generation {
            // The channel was reset (a backplane resync) before this shard pumped: the
            // subscribers it had are positioned in the old state; they resume.
            for sub in local.subs.values() {
                sub.outbox.mark_overflowed();
            }
            local.cursor = s.position.seq;
            local.generation = s.generation;
        }
        let sub = Subscriber {
            after: if s.replay_after.is_some() {
                u64::MAX
            } else {
                s.position.seq
            },
            pafter: s.pseq,
            deferred: s.replay_after.map_or(Deferred::None, Deferred::Replay),
            ..sub
        };
        if local.subs.insert(conn, sub).is_some() {
            // A connection subscribes once per channel (transports check); keep counts right.
            self.engine.unsubscribe(self.shard, &s.channel, now);
        }
        Ok(s)
    }

    /// The shared channel `name` if this shard has subscribers in it.
    pub fn channel(&self, name: &ChannelName) -> Option<&Arc<Channel>> {
        self.channels.get(name).map(|l| &l.channel)
    }

    /// Unsubscribes `conn` from `name`. Returns the channel, or `None` if it was not
    /// subscribed.
    pub fn unsubscribe(
        &mut self,
        conn: ConnId,
        name: &ChannelName,
        now: Instant,
    ) -> Option<Arc<Channel>> {
        let local = self.channels.get_mut(name)?;
        local.subs.swap_remove(&conn)?;
        let channel = local.channel.clone();
        self.engine.unsubscribe(self.shard, &channel, now);
        if local.subs.is_empty() {
            self.channels.remove(name);
        }
        Some(channel)
    }

    /// Sends what connection `conn` deferred for lack of room (the next page of a resume's
    /// replay, gap notices, conflated messages) in its subscriptions `names`, as far as its
    /// outbox now has room. Writers call it when [`Outbox::take_deferred`] says so.
    pub fn flush(&mut self, conn: ConnId, names: &[ChannelName]) -> PumpStats {
        let mut stats = PumpStats::default();
        for name in names {
            let Some(local) = self.channels.get_mut(name) else {
                continue;
            };
            let (channel, cursor, generation) = (&local.channel, local.cursor, local.generation);
            if let Some(sub) = local.subs.get_mut(&conn) {
                if sub.replaying() {
                    replay_page(&mut stats, channel, cursor, generation, sub, self.encode);
                } else {
                    flush_sub(&mut stats, sub, channel.name(), self.encode);
                }
                if sub.pending() {
                    sub.outbox.set_deferred();
                }
            }
        }
        self.count(&stats);
        stats
    }

    /// Adds what a pass queued to the shard's gauge.
    fn count(&self, stats: &PumpStats) {
        self.gauge.set(self.gauge.get().wrapping_add(stats.queued));
    }

    /// The hub's own copy of `name` when this shard serves the channel: a session keeps it
    /// instead of the name its request allocated, so that every subscriber of a channel shares
    /// one name (issue 12 item 4: 32 bytes or more per subscription otherwise).
    pub fn shared_name(&self, name: &ChannelName) -> Option<ChannelName> {
        self.channels.get_key_value(name).map(|(k, _)| k.clone())
    }

    /// Local subscribers of `name`.
    pub fn subscribers(&self, name: &ChannelName) -> usize {
        self.channels.get(name).map_or(0, |l| l.subs.len())
    }

    /// Moves every new publication of this shard's dirty channels into the subscribers'
    /// outboxes. Call it whenever the shard is woken for fan-out.
    pub fn pump(&mut self) -> PumpStats {
        let mut stats = PumpStats::default();
        // When the oldest publication pulled was published.
        let mut oldest = None;
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
            self.events.clear();
            let (lost, plost, current) = channel.read_all_since_in(
                local.cursor,
                local.pcursor,
                Some(local.generation),
                &mut self.pubs,
                &mut self.events,
            );
            if let Err((generation, top)) = current {
                // The channel adopted a remote state (backplane resync): the positions of this
                // shard's subscribers no longer connect to it; they resume against the new state.
                close_for_resume(&mut stats, local);
                local.generation = generation;
                local.cursor = top;
                continue;
            }
            if lost || plost {
                // This shard fell behind the ring: every local subscriber has a gap, so each
                // resumes from its own last seq.
                close_for_resume(&mut stats, local);
            }
            if self.events.is_empty() && self.pubs.len() > 1 {
                // In runs of at most RUN_BYTES (a single message over it goes alone): each
                // subscriber gets the runs in order.
                let mut rest = &self.pubs[..];
                while !rest.is_empty() {
                    let (run, after) = rest.split_at(run_len(rest));
                    match run {
                        [p] => deliver_publication(&mut stats, local, self.encode, p),
                        _ => deliver_run(&mut stats, local, self.encode, run),
                    }
                    rest = after;
                }
            } else {
                // Merge in the order things happened: an event recorded at seq N came after
                // message N and before message N + 1.
                let mut events = self.events.iter().peekable();
                for p in &self.pubs {
                    while let Some(e) = events.next_if(|e| e.seq < p.seq) {
                        deliver_presence(&mut stats, local, self.encode, e);
                    }
                    deliver_publication(&mut stats, local, self.encode, p);
                }
                for e in events {
                    deliver_presence(&mut stats, local, self.encode, e);
                }
            }
            stats.publications += self.pubs.len();
            if let Some(first) = self.pubs.first() {
                oldest = Some(oldest.map_or(first.at, |o: Instant| o.min(first.at)));
            }
        }
        // One clock read per pass, not one per channel: a pass carrying one message for each of
        // many channels is the common case of many small rooms.
        stats.oldest_age = oldest.map(|at| Instant::now().saturating_duration_since(at));
        self.dirty = dirty;
        self.pubs.clear();
        self.events.clear();
        self.count(&stats);
        stats
    }
}

/// Queues the next part of `sub`'s replay: the publications after its replay cursor, from the
/// ring, while its outbox is at most half full (the other half stays free for replies and
/// presence events), and at least one when it is empty. Once the replay reaches what this
/// shard has delivered (`cursor`), the subscriber goes live from there. A replay that no longer
/// connects (history expired or evicted meanwhile, or the channel was reset) closes the
/// subscriber for resume: never a silent skip.
fn replay_page(
    stats: &mut PumpStats,
    channel: &Channel,
    cursor: u64,
    generation: u64,
    sub: &mut Subscriber,
    encode: Encoder,
) {
    let Deferred::Replay(mut at) = sub.deferred else {
        return;
    };
    let half = sub.outbox.limit() / 2;
    let enc = usize::from(sub.encoding);
    let mut page = Vec::new();
    loop {
        page.clear();
        if !channel.read_page(at, generation, REPLAY_PAGE, &mut page) {
            sub.deferred = Deferred::None;
            sub.outbox.mark_overflowed();
            stats.slow += 1;
            return;
        }
        for p in &page {
            let frame = p.frame(enc, |p| (encode.publication)(enc, channel.name(), p));
            let queued = sub.outbox.queued_bytes();
            if queued > 0 && queued + frame.len() > half {
                sub.deferred = Deferred::Replay(at);
                return;
            }
            let out = Out::message(p.clone(), enc, sub.slot);
            let cost = Outbox::cost(&out);
            if !sub.outbox.push_uncounted(out) {
                sub.deferred = Deferred::None;
                stats.slow += 1;
                return;
            }
            at = p.seq;
            stats.queued += cost;
            stats.deliveries += 1;
            stats.replayed += 1;
        }
        if page.len() < REPLAY_PAGE {
            break;
        }
    }
    // Everything up to the ring's top is queued, so at least what this shard delivered: live
    // delivery takes over after it.
    if at >= cursor {
        sub.deferred = Deferred::None;
        sub.after = at;
    } else {
        sub.deferred = Deferred::Replay(at);
    }
}

/// Closes every local subscriber of the channel as a slow consumer, so that it reconnects and
/// resumes from its own last seq: the one answer to a gap this shard cannot fill.
fn close_for_resume(stats: &mut PumpStats, local: &Local) {
    for sub in local.subs.values() {
        sub.outbox.mark_overflowed();
        stats.slow += 1;
    }
}

fn deliver_publication(
    stats: &mut PumpStats,
    local: &mut Local,
    encode: Encoder,
    p: &Arc<Publication>,
) {
    // The length of its frame in each encoding, once built.
    let mut lens: [Option<usize>; FRAME_SLOTS] = Default::default();
    let policy = local.channel.policy();
    let name = local.channel.name();
    // Summed in a local, added to the stats once: the loop over subscribers stays as it was.
    let mut queued = 0;
    let mut origin = None;
    for i in 0..local.subs.len() {
        prefetch_ahead(&local.subs, i);
        let Some((_, sub)) = local.subs.get_index_mut(i) else {
            break;
        };
        queued += offer(
            stats,
            sub,
            (policy, name, encode),
            p,
            &mut lens,
            &mut origin,
        );
    }
    stats.queued += queued;
    local.cursor = p.seq;
}

/// Starts loading the outbox of the subscriber two after the `i`th, which the fan-out loop
/// reaches next but one: the subscribers sit side by side, their outboxes each in an
/// allocation of their own, out of cache when a pass comes (see [`Outbox::prefetch`]).
#[inline(always)]
fn prefetch_ahead(subs: &IndexMap<ConnId, Subscriber>, i: usize) {
    if let Some((_, ahead)) = subs.get_index(i + 2) {
        Outbox::prefetch(&ahead.outbox);
    }
}

/// How many of `pubs` (at least one) go in the next run: as many as fit in [`RUN_BYTES`].
fn run_len(pubs: &[Arc<Publication>]) -> usize {
    let mut bytes = 0;
    pubs.iter()
        .take_while(|p| {
            bytes += p.data.len() + RUN_ENTRY;
            bytes <= RUN_BYTES
        })
        .count()
        .max(1)
}

/// Delivers several publications of one channel, with no presence event among them (one
/// pass's worth, or a part of it under [`RUN_BYTES`]): each subscriber that takes them all
/// gets them as one entry, an `outbox::Run` built once per encoding and shared (their frames
/// joined in a [`Encoder::joinable`] encoding); any other (it joined in the middle of them,
/// one of them is its own, its outbox has no room for them all under a `drop` or `conflate`
/// policy) gets them one by one as [`deliver_publication`] would.
fn deliver_run(
    stats: &mut PumpStats,
    local: &mut Local,
    encode: Encoder,
    pubs: &[Arc<Publication>],
) {
    let (Some(first), Some(last)) = (pubs.first(), pubs.last()) else {
        return;
    };
    let mut runs: [Option<Arc<Run>>; FRAME_SLOTS] = Default::default();
    // Each publication's origin tag, read once per pass if a subscriber has a tag.
    let mut origins: Vec<u64> = Vec::new();
    // What the subscribers that take them one by one learned of each publication (its frame
    // lengths, its origin), kept from one such subscriber to the next: made when the first
    // one comes.
    let mut learned: Vec<([Option<usize>; FRAME_SLOTS], Option<u64>)> = Vec::new();
    let channel = &local.channel;
    let policy = channel.policy();
    let name = channel.name();
    let mut queued = 0;
    for i in 0..local.subs.len() {
        prefetch_ahead(&local.subs, i);
        let Some((_, sub)) = local.subs.get_index_mut(i) else {
            break;
        };
        let enc = usize::from(sub.encoding);
        let mut whole = sub.after < first.seq;
        if whole && sub.tag != 0 {
            if origins.is_empty() {
                origins.extend(pubs.iter().map(|p| (encode.origin)(p)));
            }
            whole = !origins.contains(&sub.tag);
        }
        if whole {
            let run = runs[enc].get_or_insert_with(|| build_run(pubs, enc, channel, encode));
            if policy != SlowPolicy::Disconnect {
                flush_sub(stats, sub, name, encode);
                whole = !sub.pending() && sub.outbox.has_room(run.len());
            }
            if whole {
                let out = Out::Run {
                    r: run.clone(),
                    slot: sub.slot,
                };
                let cost = deliver(stats, sub, out);
                if cost > 0 {
                    stats.joined += pubs.len();
                }
                queued += cost;
                continue;
            }
        }
        if learned.is_empty() {
            learned = (0..pubs.len())
                .map(|i| (Default::default(), origins.get(i).copied()))
                .collect();
        }
        for (p, (lens, origin)) in pubs.iter().zip(learned.iter_mut()) {
            queued += offer(stats, sub, (policy, name, encode), p, lens, origin);
        }
    }
    stats.queued += queued;
    local.cursor = last.seq;
}

/// The run of `pubs` in encoding `enc`: each frame built once (and cached in its publication
/// as usual), and in a joinable encoding copied back to back into one buffer, in a stamped one
/// each after its stamp at the channel's epoch, counted in the node's frame gauge.
fn build_run(
    pubs: &[Arc<Publication>],
    enc: usize,
    channel: &Channel,
    encode: Encoder,
) -> Arc<Run> {
    let name = channel.name();
    let len: usize = pubs
        .iter()
        .map(|p| p.frame(enc, |p| (encode.publication)(enc, name, p)).len())
        .sum();
    let bit = 1 << enc;
    let stamped = (encode.stamped & bit != 0).then(|| channel.position().epoch);
    let joined = if encode.joinable & bit != 0 || stamped.is_some() {
        // A stamp (an SSE `id:` line) is under 64 bytes.
        let stamps = if stamped.is_some() {
            64 * pubs.len()
        } else {
            0
        };
        let mut buf = BytesMut::with_capacity(len + stamps);
        for p in pubs {
            if let Some(epoch) = stamped {
                (encode.stamp)(epoch, p.seq, &mut buf);
            }
            buf.extend_from_slice(p.built_frame(enc));
        }
        let buf = buf.freeze();
        match pubs.first().and_then(|p| p.gauge.as_ref()) {
            Some(g) => g.count(buf),
            None => buf,
        }
    } else {
        Bytes::new()
    };
    Arc::new(Run::new(pubs.into(), enc, joined, stamped))
}

/// Offers `p` to `sub` under the channel's `policy`: skipped (it has it already, or it is its
/// own), deferred (no room under `drop` or `conflate`) or queued. Returns what it adds to
/// [`PumpStats::queued`]. `lens` and `origin` carry what was learned of `p` (its frame lengths,
/// its origin tag) from one subscriber to the next.
#[inline]
fn offer(
    stats: &mut PumpStats,
    sub: &mut Subscriber,
    (policy, name, encode): (SlowPolicy, &ChannelName, Encoder),
    p: &Arc<Publication>,
    lens: &mut [Option<usize>; FRAME_SLOTS],
    origin: &mut Option<u64>,
) -> usize {
    if p.seq <= sub.after {
        return 0;
    }
    if sub.tag != 0 && *origin.get_or_insert_with(|| (encode.origin)(p)) == sub.tag {
        return 0;
    }
    let enc = usize::from(sub.encoding);
    let len = *lens[enc]
        .get_or_insert_with(|| p.frame(enc, |p| (encode.publication)(enc, name, p)).len());
    if policy != SlowPolicy::Disconnect {
        flush_sub(stats, sub, name, encode);
        if sub.pending() || !sub.outbox.has_room(len) {
            // Skip it (drop: widen the gap; conflate: keep it as the latest) and flush
            // when the writer frees room.
            sub.deferred = match (policy, &sub.deferred) {
                (SlowPolicy::Drop, Deferred::Gap(from, _)) => Deferred::Gap(*from, p.seq),
                (SlowPolicy::Drop, _) => Deferred::Gap(p.seq, p.seq),
                _ => Deferred::Stash(p.clone()),
            };
            sub.outbox.set_deferred();
            stats.skipped += 1;
            return 0;
        }
    }
    deliver(stats, sub, Out::message(p.clone(), enc, sub.slot))
}

/// Queues what `sub` deferred, in order, as far as its outbox has room.
fn flush_sub(stats: &mut PumpStats, sub: &mut Subscriber, name: &ChannelName, encode: Encoder) {
    let enc = usize::from(sub.encoding);
    let out = match &sub.deferred {
        Deferred::Gap(from, to) => Out::control((encode.gap)(enc, name, *from, *to)),
        Deferred::Stash(p) => {
            p.frame(enc, |p| (encode.publication)(enc, name, p));
            Out::message(p.clone(), enc, sub.slot)
        }
        Deferred::None | Deferred::Replay(_) => return,
    };
    if !sub.outbox.has_room(out.frame().len()) {
        return;
    }
    sub.deferred = Deferred::None;
    stats.queued += deliver(stats, sub, out);
}

fn deliver_presence(
    stats: &mut PumpStats,
    local: &mut Local,
    encode: Encoder,
    e: &Arc<PresenceEvent>,
) {
    let mut built = [false; FRAME_SLOTS];
    let mut queued = 0;
    let mut origin = None;
    for sub in local.subs.values() {
        if e.pseq <= sub.pafter {
            continue;
        }
        if sub.tag != 0 && *origin.get_or_insert_with(|| client_tag(&e.who.client)) == sub.tag {
            continue;
        }
        let enc = usize::from(sub.encoding);
        if !built[enc] {
            e.frame(enc, |e| (encode.presence)(enc, local.channel.name(), e));
            built[enc] = true;
        }
        queued += deliver(stats, sub, Out::event(e.clone(), enc));
    }
    stats.queued += queued;
    local.pcursor = e.pseq;
}

/// Queues `out` for `sub` without counting it in the shard's gauge; returns what the caller
/// adds to [`PumpStats::queued`] (0 when the outbox did not take it).
fn deliver(stats: &mut PumpStats, sub: &Subscriber, out: Out) -> usize {
    let cost = Outbox::cost(&out);
    let messages = out.messages();
    if sub.outbox.push_uncounted(out) {
        stats.deliveries += messages;
        cost
    } else {
        if sub.outbox.state() == OutboxState::Overflowed {
            stats.slow += 1;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::engine::outbox::OutboxState;
    use crate::engine::EngineConfig;
    use std::time::Duration;

    fn encode_pub(enc: usize, _: &ChannelName, p: &Publication) -> Bytes {
        Bytes::from(format!("{enc}:{}", p.seq))
    }

    fn encode_presence(_: usize, _: &ChannelName, e: &PresenceEvent) -> Bytes {
        Bytes::from(format!("{}:{}@{}", e.kind(), e.who.user, e.seq))
    }

    fn encode_gap(_: usize, _: &ChannelName, from: u64, to: u64) -> Bytes {
        Bytes::from(format!("gap:{from}-{to}"))
    }

    fn origin(p: &Publication) -> u64 {
        p.data.first().map_or(0, |&b| u64::from(b))
    }

    const ENC: Encoder = Encoder {
        publication: encode_pub,
        presence: encode_presence,
        gap: encode_gap,
        origin,
        joinable: 0,
        stamped: 0,
        stamp: stamp_id,
    };

    /// `[epoch:seq]`, as a stream of one channel would stamp a message.
    fn stamp_id(epoch: crate::types::Epoch, seq: u64, out: &mut BytesMut) {
        out.extend_from_slice(format!("[{:x}:{seq}]", epoch.0).as_bytes());
    }

    /// Frames that can be told apart when joined; every encoding but 1 (the SSE of these
    /// tests) joinable.
    fn encode_marked(enc: usize, _: &ChannelName, p: &Publication) -> Bytes {
        Bytes::from(format!("<{enc}:{}>", p.seq))
    }

    const JOINED: Encoder = Encoder {
        publication: encode_marked,
        joinable: !(1 << 1),
        ..ENC
    };

    fn setup(shards: usize) -> Arc<Engine> {
        Arc::new(Engine::new(EngineConfig {
            shards,
            history_size: 100,
            history_ttl: Duration::from_secs(60),
            seed: 3,
            presence: crate::engine::presence::PresenceConfig {
                patterns: vec!["p:*".into()],
                ..Default::default()
            },
            slow_consumer: vec![
                ("drop:*".into(), SlowPolicy::Drop),
                ("last:*".into(), SlowPolicy::Conflate),
            ],
            ..Default::default()
        }))
    }

    fn sub(outbox: &Rc<Outbox>, encoding: usize) -> Subscriber {
        Subscriber::new(outbox.clone(), encoding, 0)
    }

    /// What `o` holds, one string per entry: a run's joined frames as one, the messages of a
    /// run that is not joined one by one (as SSE reads them).
    fn frames(o: &Outbox) -> Vec<String> {
        let mut v = Vec::new();
        o.drain_into(|out| {
            if out.frame().is_empty() && !out.is_empty() {
                out.each(|_, f| v.push(String::from_utf8_lossy(f).into_owned()));
            } else {
                v.push(String::from_utf8_lossy(out.frame()).into_owned());
            }
        });
        v
    }

    #[test]
    fn a_subscriber_entry_is_a_cache_line() {
        // One per subscription of every connection (issue 12 item 4).
        assert!(std::mem::size_of::<Subscriber>() <= 64);
    }

    #[test]
    fn a_tagged_subscriber_misses_its_own_publications_and_presence_events() {
        use crate::engine::presence::{Identity, Liveness};
        use crate::types::DataKind;
        let e = setup(1);
        let mut hub = Hub::new(0, e.clone(), ENC);
        let now = Instant::now();
        let name = ChannelName::new("p:tagged").unwrap();
        let (mine, other) = (Rc::new(Outbox::new(1 << 20)), Rc::new(Outbox::new(1 << 20)));
        hub.subscribe(2, &name, None, None, sub(&other, 0), now)
            .unwrap();
        let join = Join {
            who: Identity {
                client: "07".into(),
                user: "u".into(),
                info: None,
            },
            live: Arc::new(Liveness::default()),
        };
        let mut tagged = sub(&mine, 0);
        tagged.tag = client_tag("07");
        hub.subscribe(1, &name, None, Some(join), tagged, now)
            .unwrap();
        for b in [7u8, 8] {
            e.publish(&name, DataKind::Json, Bytes::from(vec![b]), now)
                .unwrap();
        }
        hub.pump();
        assert_eq!(frames(&other), ["join:u@0", "0:1", "0:2"]);
        assert_eq!(
            frames(&mine),
            ["0:2"],
            "not its own join, not its own message"
        );
    }

    #[test]
    fn a_reset_closes_the_subscribers_positioned_before_it() {
        use crate::engine::IngestOutcome;
        use crate::types::DataKind;
        let e = setup(1);
        let mut hub = Hub::new(0, e.clone(), ENC);
        let now = Instant::now();
        let name = ChannelName::new("r").unwrap();
        let o1 = Rc::new(Outbox::new(1 << 20));
        hub.subscribe(1, &name, None, None, sub(&o1, 0), now)
            .unwrap();
        e.publish(&name, DataKind::Json, Bytes::new(), now).unwrap();
        hub.pump();
        assert_eq!(frames(&o1), ["0:1"]);
        let epoch = crate::types::Epoch(77 | 1 << 60);
        e.reset(&name, epoch, 40, Vec::new(), now);
        let stats = hub.pump();
        assert_eq!(stats.slow, 1);
        assert_eq!(o1.state(), OutboxState::Overflowed, "closed for resume");
        // A subscriber that comes after the reset is served from the new state.
        let o2 = Rc::new(Outbox::new(1 << 20));
        let s = hub
            .subscribe(2, &name, None, None, sub(&o2, 0), now)
            .unwrap();
        assert_eq!(s.position.seq, 40);
        assert_eq!(
            e.ingest(&name, epoch, 41, DataKind::Json, Bytes::new(), now, now),
            IngestOutcome::Appended(1)
        );
        hub.pump();
        assert_eq!(frames(&o2), ["0:41"]);
        // A reset that the hub has not pumped yet is seen at the next subscribe too.
        e.reset(&name, epoch, 50, Vec::new(), now);
        let o3 = Rc::new(Outbox::new(1 << 20));
        hub.subscribe(3, &name, None, None, sub(&o3, 0), now)
            .unwrap();
        assert_eq!(o2.state(), OutboxState::Overflowed);
        assert_ne!(o3.state(), OutboxState::Overflowed);
        hub.pump();
        assert!(frames(&o3).is_empty());
    }

    #[test]
    fn fan_out_reaches_every_shard_in_order_once() {
        let e = setup(2);
        let now = Instant::now();
        let name = ChannelName::new("c").unwrap();
        let mut hubs = [Hub::new(0, e.clone(), ENC), Hub::new(1, e.clone(), ENC)];
        let a = Rc::new(Outbox::new(1 << 20));
        let b = Rc::new(Outbox::new(1 << 20));
        let c = Rc::new(Outbox::new(1 << 20));
        hubs[0]
            .subscribe(1, &name, None, None, sub(&a, 0), now)
            .unwrap();
        hubs[0]
            .subscribe(2, &name, None, None, sub(&b, 1), now)
            .unwrap();
        hubs[1]
            .subscribe(1, &name, None, None, sub(&c, 0), now)
            .unwrap();
        for _ in 0..3 {
            e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now)
                .unwrap();
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
        let mut hub = Hub::new(0, e.clone(), ENC);
        let a = Rc::new(Outbox::new(1 << 20));
        let b = Rc::new(Outbox::new(1 << 20));
        hub.subscribe(1, &name, None, None, sub(&a, 0), now)
            .unwrap();
        e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now)
            .unwrap();
        // b joins before the shard pumped seq 1: it must not get seq 1.
        let s = hub
            .subscribe(2, &name, None, None, sub(&b, 0), now)
            .unwrap();
        assert_eq!(s.position.seq, 1);
        e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now)
            .unwrap();
        hub.pump();
        assert_eq!(frames(&a), ["0:1", "0:2"]);
        assert_eq!(frames(&b), ["0:2"]);
    }

    #[test]
    fn a_slow_subscriber_overflows_alone() {
        let e = setup(1);
        let now = Instant::now();
        let name = ChannelName::new("c").unwrap();
        let mut hub = Hub::new(0, e.clone(), ENC);
        let slow = Rc::new(Outbox::new(8));
        let fast = Rc::new(Outbox::new(1 << 20));
        hub.subscribe(1, &name, None, None, sub(&slow, 0), now)
            .unwrap();
        hub.subscribe(2, &name, None, None, sub(&fast, 0), now)
            .unwrap();
        for _ in 0..5 {
            e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now)
                .unwrap();
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
        let mut hub = Hub::new(0, e.clone(), ENC);
        let a = Rc::new(Outbox::new(1 << 20));
        hub.subscribe(1, &name, None, None, sub(&a, 0), now)
            .unwrap();
        assert!(hub.unsubscribe(1, &name, now).is_some());
        assert!(hub.unsubscribe(1, &name, now).is_none());
        assert_eq!(
            e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now)
                .unwrap()
                .wake,
            0
        );
        hub.pump();
        assert!(a.is_empty());
        assert_eq!(e.channels()[0].subscribers, 0);
    }

    #[test]
    fn presence_events_reach_every_shard_once_per_user() {
        use crate::engine::presence::{Identity, Liveness};
        let e = setup(2);
        let now = Instant::now();
        let name = ChannelName::new("p:room").unwrap();
        let mut hubs = [Hub::new(0, e.clone(), ENC), Hub::new(1, e.clone(), ENC)];
        let live = Arc::new(Liveness::default());
        let join = |client: &str, user: &str| {
            Some(Join {
                who: Identity {
                    client: client.into(),
                    user: user.into(),
                    info: None,
                },
                live: live.clone(),
            })
        };
        let a = Rc::new(Outbox::new(1 << 20));
        let b = Rc::new(Outbox::new(1 << 20));
        let c = Rc::new(Outbox::new(1 << 20));
        hubs[0]
            .subscribe(1, &name, None, join("c1", "alice"), sub(&a, 0), now)
            .unwrap();
        hubs[1]
            .subscribe(1, &name, None, join("c2", "alice"), sub(&b, 0), now)
            .unwrap();
        e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now)
            .unwrap();
        hubs[1]
            .subscribe(2, &name, None, join("c3", "bob"), sub(&c, 0), now)
            .unwrap();
        hubs[0].pump();
        hubs[1].pump();
        assert_eq!(frames(&a), ["join:alice@0", "0:1", "join:bob@1"]);
        assert_eq!(
            frames(&b),
            ["0:1", "join:bob@1"],
            "alice joined once, before b"
        );
        assert_eq!(frames(&c), ["join:bob@1"]);
        let ch = hubs[0].channel(&name).unwrap().clone();
        assert_eq!(
            e.leave_presence(&ch, "c1", Instant::now()),
            0,
            "alice still has c2: no event"
        );
        assert_ne!(e.leave_presence(&ch, "c2", Instant::now()), 0);
        hubs[0].pump();
        assert_eq!(frames(&a), ["leave:alice@1"]);
    }

    #[test]
    fn drop_policy_skips_and_announces_the_gap_before_the_next_message() {
        let e = setup(1);
        let now = Instant::now();
        let name = ChannelName::new("drop:x").unwrap();
        let mut hub = Hub::new(0, e.clone(), ENC);
        // Frames "0:N" are 3 bytes, the notice "gap:3-4" 7: room for two frames, or the notice
        // once the queue is drained.
        let o = Rc::new(Outbox::new(8));
        hub.subscribe(1, &name, None, None, sub(&o, 0), now)
            .unwrap();
        for _ in 0..4 {
            e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now)
                .unwrap();
        }
        let st = hub.pump();
        assert_eq!((st.deliveries, st.skipped), (2, 2));
        assert_eq!(o.state(), OutboxState::Open, "drop never disconnects");
        assert_eq!(frames(&o), ["0:1", "0:2"]);
        assert!(o.take_deferred());
        hub.flush(1, std::slice::from_ref(&name));
        assert_eq!(frames(&o), ["gap:3-4"]);
        e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now)
            .unwrap();
        hub.pump();
        assert_eq!(frames(&o), ["0:5"]);
    }

    #[test]
    fn conflate_policy_keeps_only_the_latest() {
        let e = setup(1);
        let now = Instant::now();
        let name = ChannelName::new("last:x").unwrap();
        let mut hub = Hub::new(0, e.clone(), ENC);
        let o = Rc::new(Outbox::new(3));
        hub.subscribe(1, &name, None, None, sub(&o, 0), now)
            .unwrap();
        for _ in 0..5 {
            e.publish(&name, crate::types::DataKind::Json, Bytes::new(), now)
                .unwrap();
        }
        assert_eq!(hub.pump().skipped, 4);
        assert_eq!(frames(&o), ["0:1"]);
        assert!(o.take_deferred());
        hub.flush(1, std::slice::from_ref(&name));
        assert_eq!(frames(&o), ["0:5"], "the latest, and only it");
        assert!(!o.take_deferred());
    }

    /// Publishes `n` messages to `name`; returns the epoch.
    fn publish_n(e: &Engine, name: &ChannelName, n: usize) -> crate::types::Epoch {
        let mut epoch = crate::types::Epoch(0);
        for _ in 0..n {
            epoch = e
                .publish(
                    name,
                    crate::types::DataKind::Json,
                    Bytes::new(),
                    Instant::now(),
                )
                .unwrap()
                .epoch;
        }
        epoch
    }

    /// Drains `o` as a writer would, then asks the hub for what was deferred; returns the
    /// frames written.
    fn drain_and_flush(hub: &mut Hub, o: &Outbox, name: &ChannelName) -> Vec<String> {
        let got = frames(o);
        if o.take_deferred() {
            hub.flush(1, std::slice::from_ref(name));
        }
        got
    }

    #[test]
    fn a_resume_bigger_than_the_outbox_is_paged_in_as_it_drains() {
        let e = setup(1);
        let name = ChannelName::new("r").unwrap();
        let mut hub = Hub::new(0, e.clone(), ENC);
        let epoch = publish_n(&e, &name, 90);
        // Frames "0:N" are 3 to 4 bytes: a 40-byte outbox takes about ten at most, and a page
        // fills at most half of it.
        let o = Rc::new(Outbox::new(40));
        let resume = StreamPosition { epoch, seq: 10 };
        let s = hub
            .subscribe(1, &name, Some(resume), None, sub(&o, 0), Instant::now())
            .unwrap();
        assert!(s.recovered && s.replay_after == Some(10));
        hub.flush(1, std::slice::from_ref(&name));
        let mut got = Vec::new();
        let mut rounds = 0;
        while !o.is_empty() {
            rounds += 1;
            assert!(o.queued_bytes() <= 40);
            got.extend(drain_and_flush(&mut hub, &o, &name));
            if rounds == 3 {
                // Live messages meanwhile wait for the replay, and follow it.
                publish_n(&e, &name, 5);
                hub.pump();
            }
        }
        assert!(rounds > 5, "paged: {rounds}");
        assert_eq!(o.state(), OutboxState::Open, "never overflowed");
        let want: Vec<String> = (11..=95).map(|i| format!("0:{i}")).collect();
        assert_eq!(
            got, want,
            "every missed message once, in order, then the live ones"
        );
        publish_n(&e, &name, 1);
        hub.pump();
        assert_eq!(frames(&o), ["0:96"], "live delivery took over");
    }

    #[test]
    fn the_shard_gauge_counts_what_fan_out_queued_and_writers_took() {
        let e = setup(1);
        let g = Gauge::default();
        let mut hub = Hub::with_gauge(0, e.clone(), ENC, g.clone());
        let name = ChannelName::new("g").unwrap();
        let a = Rc::new(Outbox::with_gauge(1 << 20, g.clone()));
        let b = Rc::new(Outbox::with_gauge(1 << 20, g.clone()));
        hub.subscribe(1, &name, None, None, sub(&a, 0), Instant::now())
            .unwrap();
        hub.subscribe(2, &name, None, None, sub(&b, 0), Instant::now())
            .unwrap();
        publish_n(&e, &name, 3);
        hub.pump();
        let per = std::mem::size_of::<Out>();
        assert_eq!(
            g.get(),
            2 * per,
            "one entry each (a run of the three); the frames are the node's"
        );
        assert_eq!(
            e.meter().frames().bytes(),
            3 * 3,
            "three 3-byte frames, once each (not joined in this encoding)"
        );
        assert_eq!(frames(&a), ["0:1", "0:2", "0:3"]);
        assert_eq!(g.get(), per);
        drop(hub);
        drop(b);
        assert_eq!(g.get(), 0);
    }

    #[test]
    fn a_frame_queued_for_many_slow_connections_weighs_once() {
        let e = setup(1);
        let g = Gauge::default();
        let mut hub = Hub::with_gauge(0, e.clone(), ENC, g.clone());
        let name = ChannelName::new("many").unwrap();
        let boxes: Vec<_> = (0..100)
            .map(|i| {
                let o = Rc::new(Outbox::with_gauge(1 << 20, g.clone()));
                hub.subscribe(i, &name, None, None, sub(&o, 0), Instant::now())
                    .unwrap();
                o
            })
            .collect();
        let data = Bytes::from(vec![b'7'; 10_000]);
        e.publish(&name, crate::types::DataKind::Json, data, Instant::now())
            .unwrap();
        hub.pump();
        let frame = frames(&boxes[0]).concat().len();
        assert_eq!(e.meter().frames().bytes(), frame, "the frame once");
        assert_eq!(g.get(), 99 * std::mem::size_of::<Out>(), "entries only");
        e.meter()
            .set_shard(0, crate::engine::memory::Kind::Outbox, g.get());
        assert_eq!(
            e.meter().bytes(crate::engine::memory::Kind::Outbox),
            99 * std::mem::size_of::<Out>() + frame,
            "not 99 times the frame"
        );
        for o in &boxes[1..] {
            frames(o);
        }
        assert_eq!(g.get(), 0);
        assert_eq!(e.meter().frames().bytes(), frame, "the ring still holds it");
    }

    #[test]
    fn a_replay_that_history_no_longer_covers_closes_for_resume() {
        let e = Arc::new(Engine::new(EngineConfig {
            history_size: 20,
            ..Default::default()
        }));
        let name = ChannelName::new("r").unwrap();
        let mut hub = Hub::new(0, e.clone(), ENC);
        let epoch = publish_n(&e, &name, 20);
        let o = Rc::new(Outbox::new(16));
        let resume = StreamPosition { epoch, seq: 0 };
        let s = hub
            .subscribe(1, &name, Some(resume), None, sub(&o, 0), Instant::now())
            .unwrap();
        assert!(s.recovered);
        hub.flush(1, std::slice::from_ref(&name));
        assert_eq!(frames(&o), ["0:1", "0:2"]);
        // The ring moves on past the replay (a burst beyond the fan-out window of 1024).
        publish_n(&e, &name, 1100);
        assert!(o.take_deferred());
        hub.flush(1, std::slice::from_ref(&name));
        assert_eq!(
            o.state(),
            OutboxState::Overflowed,
            "closed for resume, not skipped"
        );
    }

    #[test]
    fn a_pass_of_several_messages_queues_them_as_one_entry_per_subscriber_in_order() {
        use crate::types::DataKind;
        let e = setup(1);
        let g = Gauge::default();
        let mut hub = Hub::with_gauge(0, e.clone(), JOINED, g.clone());
        let name = ChannelName::new("runs").unwrap();
        let now = Instant::now();
        let outbox = || Rc::new(Outbox::with_gauge(1 << 20, g.clone()));
        let (ws, ws2, sse, own, late) = (outbox(), outbox(), outbox(), outbox(), outbox());
        hub.subscribe(1, &name, None, None, sub(&ws, 0), now)
            .unwrap();
        hub.subscribe(2, &name, None, None, sub(&ws2, 0), now)
            .unwrap();
        hub.subscribe(3, &name, None, None, sub(&sse, 1), now)
            .unwrap();
        let mut tagged = sub(&own, 2);
        tagged.tag = 8;
        hub.subscribe(4, &name, None, None, tagged, now).unwrap();
        for b in [7u8, 8, 9] {
            e.publish(&name, DataKind::Json, Bytes::from(vec![b]), now)
                .unwrap();
            if b == 7 {
                // Joins after message 1 (before this shard's pass): positioned after it.
                hub.subscribe(5, &name, None, None, sub(&late, 0), now)
                    .unwrap();
            }
        }
        let stats = hub.pump();
        assert_eq!(stats.publications, 3);
        assert_eq!(stats.deliveries, 3 + 3 + 3 + 2 + 2);
        assert_eq!(stats.joined, 3 + 3 + 3, "ws, ws2 and sse");
        assert_eq!(frames(&ws), ["<0:1><0:2><0:3>"], "one entry, in order");
        assert_eq!(
            frames(&sse),
            ["<1:1>", "<1:2>", "<1:3>"],
            "a run, not joined"
        );
        assert_eq!(frames(&own), ["<2:1>", "<2:3>"], "not its own message");
        assert_eq!(frames(&late), ["<0:2>", "<0:3>"], "only what follows it");
        // The joined frames are shared, and weigh once for the node: the run beside the
        // messages' own frames (which the ring keeps), counted until its last entry goes.
        let frame = "<0:1><0:2><0:3>".len();
        // In the ring: 3 frames in encodings 0 and 1, 2 in encoding 2 (not message 2).
        let own_frames = (3 + 3 + 2) * "<0:1>".len();
        assert_eq!(e.meter().frames().bytes(), own_frames + frame);
        assert_eq!(g.get(), std::mem::size_of::<Out>(), "ws2's entry only");
        assert_eq!(frames(&ws2), ["<0:1><0:2><0:3>"]);
        assert_eq!(g.get(), 0);
        assert_eq!(e.meter().frames().bytes(), own_frames, "the run is gone");
        // A pass of one message queues the message itself.
        e.publish(&name, DataKind::Json, Bytes::from_static(b"x"), now)
            .unwrap();
        hub.pump();
        assert_eq!(frames(&ws), ["<0:4>"]);
    }

    #[test]
    fn a_run_in_a_stamped_encoding_is_joined_with_each_stamp_at_the_channels_epoch() {
        use crate::types::DataKind;
        const STAMPED: Encoder = Encoder {
            stamped: 1 << 1,
            ..JOINED
        };
        let e = setup(1);
        let mut hub = Hub::new(0, e.clone(), STAMPED);
        let name = ChannelName::new("stamps").unwrap();
        let now = Instant::now();
        let o = Rc::new(Outbox::new(1 << 20));
        let s = hub
            .subscribe(1, &name, None, None, sub(&o, 1), now)
            .unwrap();
        let epoch = s.position.epoch;
        let publish = |n| {
            for _ in 0..n {
                e.publish(&name, DataKind::Json, Bytes::from_static(b"x"), now)
                    .unwrap();
            }
        };
        publish(2);
        hub.pump();
        let mut got = Vec::new();
        o.drain_into(|out| {
            let (at, joined) = out.stamped().unwrap();
            let mut each = Vec::new();
            out.each(|seq, f| each.push((seq, f.to_vec())));
            got.push((at, joined.clone(), out.frame().len(), out.seq(), each));
        });
        let stamped = format!("[{:x}:1]<1:1>[{:x}:2]<1:2>", epoch.0, epoch.0);
        assert_eq!(
            got,
            [(
                epoch,
                Bytes::from(stamped),
                0,
                2,
                vec![(1, b"<1:1>".to_vec()), (2, b"<1:2>".to_vec())]
            )],
            "stamped once for every stream of the channel alone; still readable one by one"
        );
        // A pass of one message queues the message itself, unstamped.
        publish(1);
        hub.pump();
        assert_eq!(o.frames(), 1);
        o.drain_into(|out| assert!(out.stamped().is_none() && out.frame() == b"<1:3>"));
    }

    #[test]
    fn a_run_that_does_not_fit_a_drop_policy_outbox_goes_one_by_one_and_announces_the_gap() {
        use crate::types::DataKind;
        let e = setup(1);
        let mut hub = Hub::new(0, e.clone(), JOINED);
        let name = ChannelName::new("drop:runs").unwrap();
        let now = Instant::now();
        // Room for two of the three frames.
        let small = Rc::new(Outbox::new(2 * "<0:1>".len()));
        let roomy = Rc::new(Outbox::new(1 << 20));
        hub.subscribe(1, &name, None, None, sub(&small, 0), now)
            .unwrap();
        hub.subscribe(2, &name, None, None, sub(&roomy, 0), now)
            .unwrap();
        for _ in 0..3 {
            e.publish(&name, DataKind::Json, Bytes::from_static(b"x"), now)
                .unwrap();
        }
        hub.pump();
        assert_eq!(frames(&roomy), ["<0:1><0:2><0:3>"]);
        assert_eq!(frames(&small), ["<0:1>", "<0:2>"], "what fits, in order");
        hub.flush(1, std::slice::from_ref(&name));
        assert_eq!(frames(&small), ["gap:3-3"], "then the gap");
        assert_eq!(small.state(), OutboxState::Open);
    }

    #[test]
    fn a_large_message_goes_alone_between_runs_of_small_ones() {
        use crate::types::DataKind;
        let e = setup(1);
        let mut hub = Hub::new(0, e.clone(), JOINED);
        let name = ChannelName::new("mixed").unwrap();
        let now = Instant::now();
        let o = Rc::new(Outbox::new(1 << 20));
        hub.subscribe(1, &name, None, None, sub(&o, 0), now)
            .unwrap();
        for size in [10, 10, RUN_BYTES, 10, 10, RUN_BYTES / 2, RUN_BYTES / 2] {
            e.publish(&name, DataKind::Binary, Bytes::from(vec![0; size]), now)
                .unwrap();
        }
        hub.pump();
        assert_eq!(
            frames(&o),
            ["<0:1><0:2>", "<0:3>", "<0:4><0:5><0:6>", "<0:7>"],
            "runs of at most RUN_BYTES, in order"
        );
    }
}
