//! Publishing and history: the ring of each channel. A publish appends under the channel
//! lock and trims the ring to its two windows (history: count, bytes, TTL; fan-out: the last
//! [`FANOUT_MIN_AGE`], at most [`FANOUT_MIN`] publications and [`FANOUT_MAX_BYTES`]); resumes,
//! the history API and the hubs read the ring (`visible_since`, `Channel::read_*`).

use super::*;

/// The fan-out window: besides its history, a ring keeps what was published in the last
/// [`FANOUT_MIN_AGE`], up to this many publications and [`FANOUT_MAX_BYTES`], so that shards
/// can catch up after a burst even with a small (or zero) history.
pub const FANOUT_MIN: usize = 1024;

/// How long the fan-out window lasts.
pub const FANOUT_MIN_AGE: Duration = Duration::from_secs(5);

/// Most bytes the fan-out window keeps per channel. A shard that falls further behind sees
/// the gap (`lost`) and closes its subscribers for resume.
pub const FANOUT_MAX_BYTES: usize = 4 << 20;

/// A history read.
pub struct History {
    /// The channel's current position; `None` when the channel does not exist (then there are
    /// no publications, and `complete` says whether `since` was 0).
    pub position: Option<StreamPosition>,
    /// Publications after `since`, oldest first, at most `limit`.
    pub publications: Vec<Arc<Publication>>,
    /// False when history no longer holds `since + 1`.
    pub complete: bool,
}

impl Engine {
    /// Sequences one message: gives it the next seq, appends it to history and returns the
    /// shards to wake (whose dirty lists now hold the channel). Refused under memory pressure
    /// and past `max_channels` (see [`Engine::admit`]).
    pub fn publish(
        &self,
        name: &ChannelName,
        kind: DataKind,
        data: Bytes,
        now: Instant,
    ) -> Result<Published, Overloaded> {
        self.admit(name, now)?;
        let (published, ch) = self.with_channel(name, now, true, |ch, st| {
            st.top += 1;
            st.last_active = now;
            st.recent = true;
            // Moved, not cloned: a clone of a fresh `Bytes` allocates its shared header.
            let cost = st.push(st.top, now, kind, data, self.meter.frames());
            // One meter update for the append and what it pushed out.
            let freed = self.trim(ch, st, now);
            self.meter.add(Kind::History, cost as i64 - freed as i64);
            // Mark under the lock so that a shard that pulls after seeing its bit sees the entry.
            let wake = Self::mark_dirty(ch, st);
            (
                Published {
                    epoch: st.epoch,
                    seq: st.top,
                    wake,
                },
                ch.clone(),
            )
        })?;
        let wake = self.enqueue_dirty(&ch, published.wake);
        Ok(Published { wake, ..published })
    }

    /// [`Engine::publish`] under `cond`: a repeat of an idempotency key within the window
    /// answers the first publish's position and publishes nothing (`.1` is `true`); with
    /// `expected_seq`, publishes only when the channel's top is that seq, else
    /// [`PublishRefused::SeqMismatch`] with the current position. A duplicate is recognised
    /// before the seq is compared, so the retry of a conditional publish that went through
    /// gets its seq, not a mismatch.
    pub fn publish_with(
        &self,
        name: &ChannelName,
        kind: DataKind,
        data: Bytes,
        cond: &idempotency::PublishConditions,
        now: Instant,
    ) -> Result<(Published, bool), PublishRefused> {
        self.admit(name, now).map_err(PublishRefused::Overloaded)?;
        let window = self.cfg.idempotency_window;
        let (mut r, ch) = self
            .with_channel(name, now, true, |ch, st| {
                if let Some(keys) = st.keys.as_mut() {
                    let freed = keys.prune(now, window);
                    self.meter.add(Kind::History, -(freed as i64));
                }
                let key = cond.idempotency_key.as_ref();
                if let Some(seq) = key.and_then(|k| st.keys.as_ref()?.get(k)) {
                    let p = Published {
                        epoch: st.epoch,
                        seq,
                        wake: 0,
                    };
                    return (Ok((p, true)), ch.clone());
                }
                if cond.expected_seq.is_some_and(|e| e != st.top) {
                    let at = StreamPosition {
                        epoch: st.epoch,
                        seq: st.top,
                    };
                    return (Err(PublishRefused::SeqMismatch(at)), ch.clone());
                }
                st.top += 1;
                st.last_active = now;
                st.recent = true;
                let mut cost = st.push(st.top, now, kind, data, self.meter.frames());
                if let Some(k) = key {
                    let top = st.top;
                    let keys = st.keys.get_or_insert_with(Box::default);
                    cost += keys.insert(k.clone(), top, now);
                    // The expiry queue looks at the channel again once its oldest key is due.
                    if let Some(at) = keys.next_expiry(window) {
                        self.schedule(ch, st, at + Duration::from_millis(1));
                    }
                }
                let freed = self.trim(ch, st, now);
                self.meter.add(Kind::History, cost as i64 - freed as i64);
                let wake = Self::mark_dirty(ch, st);
                let p = Published {
                    epoch: st.epoch,
                    seq: st.top,
                    wake,
                };
                (Ok((p, false)), ch.clone())
            })
            .map_err(PublishRefused::Overloaded)?;
        if let Ok((p, false)) = &mut r {
            p.wake = self.enqueue_dirty(&ch, p.wake);
        }
        r
    }

    /// Where the history window of the ring starts: the oldest entry that is within the last
    /// `history_size`, the last `history_max_bytes` and the TTL. `ring.len()` when none is.
    pub(super) fn history_start(&self, st: &ChannelState, now: Instant) -> usize {
        let by_count = st.ring.len().saturating_sub(self.cfg.history_size);
        let floor = st.cum.saturating_sub(self.cfg.history_max_bytes as u64);
        let by_bytes = st.ring.partition_point(|p| p.cum_before() < floor);
        let ttl = self.cfg.history_ttl;
        let by_age = st
            .ring
            .partition_point(|p| now.saturating_duration_since(p.at) > ttl);
        by_count.max(by_bytes).max(by_age)
    }

    /// Whether the ring's oldest entry is in the history window (so the whole ring is).
    pub(super) fn front_in_history(&self, st: &ChannelState, now: Instant) -> bool {
        st.ring.front().is_some_and(|front| {
            st.ring.len() <= self.cfg.history_size
                && st.bytes <= self.cfg.history_max_bytes
                && now.saturating_duration_since(front.at) <= self.cfg.history_ttl
        })
    }

    /// Whether the ring's oldest entry is in the fan-out window (young, within its count and
    /// bytes).
    pub(super) fn front_in_fanout(st: &ChannelState, now: Instant) -> bool {
        st.ring.front().is_some_and(|front| {
            st.ring.len() <= FANOUT_MIN
                && st.bytes <= FANOUT_MAX_BYTES
                && now.saturating_duration_since(front.at) <= FANOUT_MIN_AGE
        })
    }

    /// Drops what neither window keeps, and makes sure the channel is examined again when its
    /// oldest entry leaves the fan-out window. Returns the bytes freed, for the caller to count
    /// in the meter (with what it added, in one update).
    pub(super) fn trim(&self, ch: &Arc<Channel>, st: &mut ChannelState, now: Instant) -> usize {
        let mut freed = 0;
        let in_history = loop {
            if st.ring.is_empty() {
                break true;
            }
            if self.front_in_history(st, now) {
                break true;
            }
            if Self::front_in_fanout(st, now) {
                break false;
            }
            if let Some((_, cost)) = st.pop() {
                freed += cost;
            }
        };
        if !st.ring.is_empty() && !st.in_lru {
            // Queued at the back: a use from now on gives it a second chance.
            st.in_lru = true;
            st.recent = false;
            self.lru.lock().push_back(ch.clone());
        }
        if let (false, Some(front)) = (in_history, st.ring.front()) {
            // Only the fan-out window keeps the front: it goes when the window closes, not at
            // the channel's next TTL check.
            let at = front.at + FANOUT_MIN_AGE + Duration::from_millis(1);
            self.schedule(ch, st, at);
        }
        freed
    }

    /// The publications after `since` that history (size, bytes and TTL) still serves, or why
    /// `since + 1` is not there.
    pub(super) fn visible_since<'s>(
        &self,
        st: &'s ChannelState,
        since: u64,
        now: Instant,
    ) -> Result<std::collections::vec_deque::Iter<'s, Arc<Publication>>, GapReason> {
        if since > st.top {
            return Err(GapReason::HistoryExpired);
        }
        if since == st.top {
            return Ok(st.ring.range(0..0));
        }
        let reason = if since < st.evicted_through {
            GapReason::Evicted
        } else {
            GapReason::HistoryExpired
        };
        let start = self.history_start(st, now);
        let (Some(front), Some(first)) = (st.ring.front(), st.ring.get(start)) else {
            return Err(reason);
        };
        if since + 1 < first.seq {
            return Err(reason);
        }
        Ok(st.ring.range((since + 1 - front.seq) as usize..))
    }

    /// Reads history after `since`, at most `limit` (capped by the history size). A channel
    /// that does not exist has no history (and is not created).
    pub fn history(&self, name: &ChannelName, since: u64, limit: usize, now: Instant) -> History {
        let limit = limit.min(self.cfg.history_size);
        let read = self.with_existing(name, |_, st| {
            let position = Some(StreamPosition {
                epoch: st.epoch,
                seq: st.top,
            });
            match self.visible_since(st, since, now) {
                Ok(it) => History {
                    position,
                    publications: it.take(limit).cloned().collect(),
                    complete: true,
                },
                Err(_) => {
                    // Serve what is still visible after `since`.
                    let start = self.history_start(st, now);
                    let publications = st
                        .ring
                        .range(start..)
                        .filter(|p| p.seq > since)
                        .take(limit)
                        .cloned()
                        .collect();
                    History {
                        position,
                        publications,
                        complete: false,
                    }
                }
            }
        });
        read.unwrap_or(History {
            position: None,
            publications: Vec::new(),
            complete: since == 0,
        })
    }
}

impl Channel {
    /// Appends the publications with `seq > cursor` to `out` and returns whether some were
    /// already gone from the ring (the reader fell too far behind).
    pub fn read_since(&self, cursor: u64, out: &mut Vec<Arc<Publication>>) -> bool {
        Self::ring_since(&self.state.lock(), cursor, usize::MAX, out)
    }

    pub(super) fn ring_since(
        st: &ChannelState,
        cursor: u64,
        max: usize,
        out: &mut Vec<Arc<Publication>>,
    ) -> bool {
        let Some(first) = st.ring.front().map(|p| p.seq) else {
            return cursor < st.top;
        };
        let lost = cursor + 1 < first;
        let start = (cursor + 1).saturating_sub(first) as usize;
        out.extend(st.ring.range(start.min(st.ring.len())..).take(max).cloned());
        lost
    }

    /// Appends up to `max` publications after `cursor` to `out`, for a reader positioned in
    /// `generation` (a subscriber's paged replay). Returns false, reading nothing, when they no
    /// longer connect: some after `cursor` are gone from the ring, or the channel was reset.
    pub fn read_page(
        &self,
        cursor: u64,
        generation: u64,
        max: usize,
        out: &mut Vec<Arc<Publication>>,
    ) -> bool {
        let st = self.state.lock();
        let first = st.ring.front().map_or(st.top + 1, |p| p.seq);
        if st.generation != generation || cursor + 1 < first {
            return false;
        }
        Self::ring_since(&st, cursor, max, out);
        true
    }

    /// [`Channel::read_since`] for messages after `cursor` and presence events after `pcursor`,
    /// under one lock so that the two lists are consistent with each other.
    pub fn read_all_since(
        &self,
        cursor: u64,
        pcursor: u64,
        pubs: &mut Vec<Arc<Publication>>,
        events: &mut Vec<Arc<PresenceEvent>>,
    ) -> (bool, bool) {
        let (lost, plost, _) = self.read_all_since_in(cursor, pcursor, None, pubs, events);
        (lost, plost)
    }

    /// [`Channel::read_all_since`] for a reader positioned in `generation`: when the channel
    /// was [`Engine::reset`] since, nothing is read and the current generation and top are
    /// returned (`Err`), so the reader can close its subscribers and start over from there.
    pub fn read_all_since_in(
        &self,
        cursor: u64,
        pcursor: u64,
        generation: Option<u64>,
        pubs: &mut Vec<Arc<Publication>>,
        events: &mut Vec<Arc<PresenceEvent>>,
    ) -> (bool, bool, Result<(), (u64, u64)>) {
        let st = self.state.lock();
        if generation.is_some_and(|g| g != st.generation) {
            return (false, false, Err((st.generation, st.top)));
        }
        let lost = Self::ring_since(&st, cursor, usize::MAX, pubs);
        let plost = st
            .presence
            .as_ref()
            .is_some_and(|p| p.read_since(pcursor, events));
        (lost, plost, Ok(()))
    }
}
