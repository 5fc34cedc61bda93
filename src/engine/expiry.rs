//! Expiry and eviction with bounded work: a min-heap of when to examine which channel
//! (ring trimming, presence events, forgetting idle channels), popped at most [`TICK_CHECKS`]
//! per [`Engine::tick`]; [`Engine::evict`] drops the history of the least recently used
//! channels under memory pressure (second-chance order).

use super::*;

/// Most channels one [`Engine::tick`] examines: expiry costs the same whatever the number of
/// channels.
pub const TICK_CHECKS: usize = 4096;

/// Most channels an eviction on the publish or subscribe path examines.
pub(super) const EVICT_INLINE: usize = 64;

/// A channel is examined again at most this often.
pub(super) const MIN_RECHECK: Duration = Duration::from_millis(100);

/// What one [`Engine::tick`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickStats {
    /// Channels examined by expiry (at most [`TICK_CHECKS`]).
    pub checked: usize,
    /// Channels forgotten.
    pub expired: usize,
    /// Channels whose history was evicted for memory.
    pub evicted: usize,
}

/// An entry of the expiry queue: examine `ch` at `at`. The channel's `next_check` says which
/// entry is current; others are stale and skipped.
pub(super) struct Due {
    at: Instant,
    n: u64,
    ch: Arc<Channel>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.n) == (other.at, other.n)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        // Reversed: the heap pops the earliest first.
        (other.at, other.n).cmp(&(self.at, self.n))
    }
}

impl Engine {
    /// Queues an examination of `ch` at `at`, unless one is due sooner already.
    pub(super) fn schedule(&self, ch: &Arc<Channel>, st: &mut ChannelState, at: Instant) {
        if st.next_check.is_some_and(|n| n <= at) {
            return;
        }
        st.next_check = Some(at);
        let n = self.due_n.fetch_add(1, Ordering::Relaxed);
        self.expiry.lock().push(Due {
            at,
            n,
            ch: ch.clone(),
        });
    }

    /// When the channel must be examined next: when its oldest entry leaves its window, when
    /// its oldest presence event ages out, when it has been idle for the TTL; a subscribed
    /// channel once per TTL at least.
    pub(super) fn next_due(&self, st: &ChannelState, now: Instant) -> Instant {
        let ttl = self.cfg.history_ttl;
        let mut due = now + ttl;
        let idle_at = st.last_active + ttl;
        if st.interest == 0 && !st.has_members() && idle_at > now {
            due = due.min(idle_at);
        }
        if let Some(front) = st.ring.front() {
            let window = if self.front_in_history(st, now) {
                ttl
            } else {
                FANOUT_MIN_AGE
            };
            due = due.min(front.at + window);
        }
        if let Some(ms) = st.presence.as_ref().and_then(|p| p.events_due()) {
            due = due.min(self.base + Duration::from_millis(ms));
        }
        if let Some(at) = st
            .keys
            .as_ref()
            .and_then(|k| k.next_expiry(self.cfg.idempotency_window))
        {
            due = due.min(at);
        }
        (due + Duration::from_millis(1)).max(now + MIN_RECHECK)
    }

    /// Periodic upkeep, with bounded work whatever the number of channels: examines the
    /// channels that are due (at most [`TICK_CHECKS`]): trims their rings and presence events,
    /// forgets those idle for the TTL with nothing left; then evicts history if memory is
    /// under pressure, and refreshes the pressure level. Call it every 100 ms or so.
    pub fn tick(&self, now: Instant) -> TickStats {
        let mut stats = TickStats::default();
        let due: Vec<Due> = {
            let mut q = self.expiry.lock();
            let mut due = Vec::new();
            while due.len() < TICK_CHECKS && q.peek().is_some_and(|d| d.at <= now) {
                if let Some(d) = q.pop() {
                    due.push(d);
                }
            }
            due
        };
        for d in due {
            stats.checked += 1;
            if self.examine(&d, now) {
                stats.expired += 1;
            }
        }
        let s = &self.stats;
        s.checked.fetch_add(stats.checked as u64, Ordering::Relaxed);
        s.checked_max
            .fetch_max(stats.checked as u64, Ordering::Relaxed);
        s.expired.fetch_add(stats.expired as u64, Ordering::Relaxed);
        if self.meter.recompute() != Pressure::Normal {
            stats.evicted = self.evict(now, TICK_CHECKS);
        }
        stats
    }

    /// Expiry of one channel; returns whether it was forgotten.
    pub(super) fn examine(&self, d: &Due, now: Instant) -> bool {
        let ch = &d.ch;
        let mut st = ch.state.lock();
        if st.removed || st.next_check != Some(d.at) {
            return false; // A stale entry: the channel is gone or has a sooner one.
        }
        st.next_check = None;
        let mut freed = self.trim(ch, &mut st, now);
        let window = self.cfg.idempotency_window;
        if let Some(keys) = st.keys.as_mut() {
            freed += keys.prune(now, window);
            if keys.bytes() == 0 {
                st.keys = None;
            }
        }
        self.meter.add(Kind::History, -(freed as i64));
        // Presence bookkeeping alone trims the events that aged out.
        self.presence_op(ch, &mut st, self.millis(now), |_| ());
        let idle = now.saturating_duration_since(st.last_active) > self.cfg.history_ttl;
        // A channel with idempotency keys stays (with its epoch) until they leave the window.
        let nothing = st.ring.is_empty()
            && st.presence.as_ref().is_none_or(|p| p.is_idle())
            && st.keys.is_none();
        if st.interest == 0 && idle && nothing {
            st.removed = true;
            drop(st);
            self.forget(ch);
            return true;
        }
        if st.next_check.is_none() {
            let at = self.next_due(&st, now);
            self.schedule(ch, &mut st, at);
        }
        false
    }

    /// Evicts history, least recently used channels first (a channel published to or
    /// subscribed since it was last looked at gets a second chance), until memory is back under
    /// its target or `max` channels were examined. A channel with subscribers keeps its
    /// fan-out window. One evicting thread at a time; returns the channels evicted.
    pub fn evict(&self, now: Instant, max: usize) -> usize {
        let _one = self.evicting.lock();
        self.meter.recompute();
        let mut want = self.meter.excess();
        let (mut examined, mut evicted) = (0, 0);
        while want > 0 && examined < max {
            // Take a batch, then lock channels without holding the queue (publishers take a
            // channel lock, then the queue).
            let batch: Vec<Arc<Channel>> = {
                let mut q = self.lru.lock();
                let n = q.len().min(64).min(max - examined);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            let mut again = Vec::new();
            for ch in batch {
                examined += 1;
                let mut st = ch.state.lock();
                if st.removed || st.ring.is_empty() {
                    st.in_lru = false;
                    continue;
                }
                if st.recent || want == 0 {
                    st.recent = false;
                    again.push(ch.clone());
                    continue;
                }
                let keep_window = st.interest != 0;
                let mut freed = 0;
                while let Some(front) = st.ring.front() {
                    let in_window = st.ring.len() <= FANOUT_MIN
                        && st.bytes <= FANOUT_MAX_BYTES
                        && now.saturating_duration_since(front.at) <= FANOUT_MIN_AGE;
                    if keep_window && in_window {
                        break;
                    }
                    if let Some((seq, cost)) = st.pop() {
                        st.evicted_through = seq;
                        freed += cost;
                    }
                }
                self.meter.add(Kind::History, -(freed as i64));
                if freed > 0 {
                    evicted += 1;
                    want = want.saturating_sub(freed);
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .evicted_bytes
                        .fetch_add(freed as u64, Ordering::Relaxed);
                }
                if st.ring.is_empty() {
                    st.in_lru = false;
                } else {
                    again.push(ch.clone());
                }
            }
            self.lru.lock().extend(again);
        }
        self.meter.recompute();
        evicted
    }
}
