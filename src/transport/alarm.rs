//! One timer per shard for the deadlines of all its sessions (keep-alive, auth, close grace),
//! instead of one `tokio::time::Sleep` (112 bytes) held by every connection's task. A session
//! keeps its deadlines in its `SessionClock` and arms one alarm here at the earliest; the
//! shard's [`Alarms::run`] task sleeps until the first alarm of the shard and rings the
//! connection's outbox (which holds the task's waker) when it comes. On shutdown it rings every
//! armed connection, which then sees the token cancelled: no connection holds a cancellation
//! future either.
//!
//! The alarms are a binary heap of 16-byte entries (deadline, outbox), not a map keyed by
//! connection: every idle connection holds one (issue 12 item 4: a `BTreeMap` entry cost
//! ~63 bytes per connection in its nodes at 10,000). Nothing is removed from the middle: an
//! alarm a session replaces by an earlier one, or leaves when it ends, stays until its time
//! (a ring then finds nothing due) or until the sweep drops those of ended sessions.
//!
//! **Invariants:** a waiting session always has an alarm at or before its next deadline: it
//! can never sleep past a deadline or through a shutdown. An alarm rung early (the deadline
//! moved later, e.g. traffic put off the ping, or the alarm was replaced) is harmless: the
//! session finds nothing due and arms again, at most once per deadline, never per message.
//! The alarms of a connection are at most its live one and those it replaced with earlier ones
//! (rare: closing, authenticating), each rung once.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::engine::outbox::Outbox;

/// How often the shard frees the queue buffers of idle outboxes and the pages its allocator
/// holds empty.
pub const SWEEP: Duration = Duration::from_secs(1);

/// Hands the memory pages this thread's allocator holds empty back to the OS. mimalloc keeps
/// freed pages for reuse and returns them only as later allocations pass by, so after a burst
/// (connection set-ups: hyper's handshake buffers; a backlog of outbox entries, written and
/// freed) a shard that goes quiet would keep them for good: the RSS of 10,000 idle connections
/// read 3.2 KB each since start against 0.4 KB for the next 9,000, and RSS stayed up to 250
/// MiB over idle after a max-load search (issue 12 items 3 and 4). Not forced: pages freed
/// less than mimalloc's purge delay ago stay for reuse. Called once per [`SWEEP`] on each
/// shard's thread that fanned nothing out in it (the heap is the calling thread's); it walks
/// that heap's pages (a few thousand at 100 MiB), microseconds.
/// `force` (every 100 ms while the node is under memory pressure, from the shard's upkeep
/// tick): also what was freed within the purge delay, so that the memory budget's RSS floor
/// falls as soon as memory is freed and retention cannot keep the node refusing.
#[allow(unsafe_code)]
pub(crate) fn return_free_pages(force: bool) {
    // SAFETY: `mi_collect` takes no pointer, may be called on any thread at any time, and only
    // frees memory the allocator itself holds unused.
    unsafe { libmimalloc_sys::mi_collect(force) }
}

/// The alarms of one shard. See the module docs.
pub struct Alarms {
    /// The soonest first. Weak: an alarm never keeps a closed connection's outbox alive.
    due: RefCell<BinaryHeap<Reverse<Alarm>>>,
    /// What deadlines count from (nanoseconds in an [`Alarm`]).
    base: Instant,
    /// An alarm earlier than the one the task sleeps for was armed.
    sooner: Notify,
    /// A fan-out pass ran since the last sweep ([`Alarms::fanned_out`]).
    busy: Cell<bool>,
    /// Every alarm rang at shutdown: what a session holds as armed is gone.
    all_rung: Cell<bool>,
}

/// One alarm: when, and whose outbox to ring.
struct Alarm {
    /// Nanoseconds after [`Alarms::base`] (584 years).
    at: u64,
    outbox: Weak<Outbox>,
}

impl PartialEq for Alarm {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Alarm {}

impl PartialOrd for Alarm {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Alarm {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

impl Default for Alarms {
    fn default() -> Self {
        Alarms {
            due: RefCell::default(),
            base: super::session::now(),
            sooner: Notify::new(),
            busy: Cell::new(false),
            all_rung: Cell::new(false),
        }
    }
}

impl Alarms {
    /// `t` as an alarm's time (a deadline before the base rings at once).
    fn at(&self, t: Instant) -> u64 {
        let ns = t.saturating_duration_since(self.base).as_nanos();
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// An alarm's time as an instant.
    fn instant(&self, at: u64) -> Instant {
        self.base + Duration::from_nanos(at)
    }

    /// Arms an alarm at `when` for the session of `outbox`; returns it, for the session to
    /// keep to know whether it rang. The old one stays and rings
    /// harmlessly (see the module docs); a session arms only a deadline sooner than the one
    /// it has armed, or after its alarm rang.
    pub fn arm(&self, when: Instant, outbox: &Rc<Outbox>) -> Option<Instant> {
        let at = self.at(when);
        let mut due = self.due.borrow_mut();
        let first = due.peek().is_none_or(|Reverse(a)| at < a.at);
        due.push(Reverse(Alarm {
            at,
            outbox: Rc::downgrade(outbox),
        }));
        drop(due);
        if first {
            self.sooner.notify_one();
        }
        Some(when)
    }

    /// What is left of a session's alarm `armed` after a ring: `None` when it rang (a ring
    /// rings every alarm due, and shutdown every alarm), else still `armed` (the ring was for
    /// an alarm since replaced).
    pub fn after_ring(&self, armed: Option<Instant>) -> Option<Instant> {
        if self.shutting_down() {
            return None;
        }
        let now = super::session::now();
        armed.filter(|t| *t > now)
    }

    /// Whether shutdown has rung this shard's alarms: a read of the shard's own state, for
    /// checks made per write, where the node's token (a mutex every shard shares) would do.
    pub fn shutting_down(&self) -> bool {
        self.all_rung.get()
    }

    /// How many alarms are held (one per waiting session, and those replaced or of ended
    /// sessions not yet rung or swept).
    pub fn len(&self) -> usize {
        self.due.borrow().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.due.borrow().is_empty()
    }

    /// Rings (and removes) every alarm due at `now`.
    fn ring_due(&self, now: Instant) {
        let now = self.at(now);
        loop {
            let mut due = self.due.borrow_mut();
            match due.peek() {
                Some(Reverse(a)) if a.at <= now => {
                    let outbox = due.pop().map(|Reverse(a)| a.outbox);
                    // Rung outside the borrow: waking runs no task code now, but keep the
                    // heap free anyway.
                    drop(due);
                    if let Some(o) = outbox.and_then(|o| o.upgrade()) {
                        o.ring();
                    }
                }
                _ => return,
            }
        }
    }

    /// Rings (and removes) every alarm (shutdown): each connection sees the token cancelled,
    /// closes, and arms again for its close grace.
    fn ring_all(&self) {
        self.all_rung.set(true);
        let all = std::mem::take(&mut *self.due.borrow_mut());
        for Reverse(a) in all {
            if let Some(o) = a.outbox.upgrade() {
                o.ring();
            }
        }
    }

    /// Frees the queue buffer of every armed connection whose outbox is empty. An outbox
    /// keeps its buffer between writes (no allocation per delivery), so without this an idle
    /// connection would keep the buffer of the last frames it was sent (its `subscribed`
    /// reply: 4 entries, 192 bytes) for good. A busy one allocates it again at most once per
    /// sweep. The alarms of ended sessions go too.
    fn release_idle(&self) {
        self.due
            .borrow_mut()
            .retain(|Reverse(a)| match a.outbox.upgrade() {
                Some(o) => {
                    o.release_idle();
                    true
                }
                None => false,
            });
        // Only a shard that fanned nothing out for a whole sweep hands pages back: one that
        // delivers even a few messages a second would take them back from the OS at its next
        // pass, a page fault per page, on the delivery path (at 20 publishes/s to 1,000
        // subscribers that showed in the p99). After a load or an arrival burst the next quiet
        // sweep returns them.
        if !self.busy.replace(false) {
            return_free_pages(false);
        }
    }

    /// Marks the shard busy for this sweep (the pump calls it after each pass).
    pub fn fanned_out(&self) {
        self.busy.set(true);
    }

    /// The shard's timer task: rings alarms as they come due, and every armed connection
    /// once when `shutdown` is cancelled (the alarms keep ringing after it, for the close
    /// grace of the sessions that close then); every [`SWEEP`] frees idle queue buffers.
    /// Never returns; the shard's runtime drops it.
    pub async fn run(&self, shutdown: CancellationToken) {
        let stop = shutdown.cancelled();
        tokio::pin!(stop);
        let mut stopped = false;
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(sleep);
        loop {
            let next = self
                .due
                .borrow()
                .peek()
                .map(|Reverse(a)| self.instant(a.at));
            if let Some(t) = next {
                let t = tokio::time::Instant::from_std(t);
                if sleep.deadline() != t {
                    sleep.as_mut().reset(t);
                }
            }
            tokio::select! {
                _ = &mut stop, if !stopped => {
                    stopped = true;
                    self.ring_all();
                }
                _ = self.sooner.notified() => {}
                _ = sweep.tick() => self.release_idle(),
                _ = &mut sleep, if next.is_some() => {
                    self.ring_due(super::session::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Poll, Waker};

    fn rung(o: &Outbox) -> bool {
        o.poll_alarm(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    }

    #[test]
    fn an_earlier_alarm_rings_first_and_a_replaced_one_rings_harmlessly() {
        let a = Alarms::default();
        let o = Rc::new(Outbox::new(100));
        let t0 = a.base;
        let armed = a.arm(t0 + Duration::from_secs(25), &o);
        assert!(armed.is_some());
        let armed = a.arm(t0 + Duration::from_secs(3), &o);
        a.ring_due(t0 + Duration::from_secs(2));
        assert!(!rung(&o), "not due yet");
        a.ring_due(t0 + Duration::from_secs(3));
        assert!(rung(&o));
        assert!(!rung(&o), "an alarm rings once");
        assert_eq!(a.len(), 1, "the replaced one waits for its time");
        a.ring_due(t0 + Duration::from_secs(25));
        assert!(rung(&o), "and rings then (the session finds nothing due)");
        assert!(a.is_empty(), "a rung alarm is gone");
        assert_eq!(armed, Some(t0 + Duration::from_secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_learns_whether_its_own_alarm_rang() {
        let a = Alarms::default();
        let o = Rc::new(Outbox::new(100));
        let t0 = super::super::session::now();
        let armed = a.arm(t0 + Duration::from_secs(5), &o);
        assert_eq!(
            a.after_ring(armed),
            armed,
            "a ring for another alarm keeps it"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(a.after_ring(armed), None, "its own rang");
        let armed = a.arm(t0 + Duration::from_secs(60), &o);
        a.ring_all();
        assert_eq!(a.after_ring(armed), None, "shutdown rings every alarm");
    }

    #[test]
    fn an_alarm_keeps_no_closed_connection_alive() {
        let a = Alarms::default();
        let o = Rc::new(Outbox::new(100));
        a.arm(Instant::now(), &o);
        drop(o);
        a.ring_due(Instant::now() + Duration::from_secs(1));
        assert!(a.is_empty());
    }

    #[test]
    fn the_sweep_drops_the_alarms_of_ended_sessions() {
        let a = Alarms::default();
        let (ended, live) = (Rc::new(Outbox::new(100)), Rc::new(Outbox::new(100)));
        let t = a.base + Duration::from_secs(25);
        a.arm(t, &ended);
        a.arm(t, &live);
        drop(ended);
        a.release_idle();
        assert_eq!(a.len(), 1, "only the live session's alarm is left");
    }

    #[test]
    fn the_sweep_frees_the_queue_buffers_of_idle_connections() {
        let a = Alarms::default();
        let (idle, busy) = (Rc::new(Outbox::new(1000)), Rc::new(Outbox::new(1000)));
        for o in [&idle, &busy] {
            a.arm(Instant::now(), o);
            o.push(crate::engine::outbox::Out::control(
                bytes::Bytes::from_static(b"x"),
            ));
        }
        let _ = idle.write_with::<()>(|iov| Poll::Ready(Ok(iov.iter().map(|s| s.len()).sum())));
        assert!(
            idle.is_empty() && idle.capacity() > 0,
            "kept between writes"
        );
        a.release_idle();
        assert_eq!(idle.capacity(), 0, "freed by the sweep");
        assert!(busy.capacity() > 0, "a queue with frames keeps its buffer");
    }

    #[tokio::test(start_paused = true)]
    async fn the_shard_task_rings_at_the_deadline_and_everyone_at_shutdown() {
        let a = Rc::new(Alarms::default());
        let stop = CancellationToken::new();
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let task = tokio::task::spawn_local({
                    let (a, stop) = (a.clone(), stop.clone());
                    async move { a.run(stop).await }
                });
                let (early, late) = (Rc::new(Outbox::new(100)), Rc::new(Outbox::new(100)));
                let t0 = super::super::session::now();
                a.arm(t0 + Duration::from_secs(60), &late);
                tokio::task::yield_now().await;
                // Armed after the task went to sleep for the later one: it wakes sooner.
                a.arm(t0 + Duration::from_secs(5), &early);
                tokio::time::sleep(Duration::from_millis(4_999)).await;
                assert!(!rung(&early));
                tokio::time::sleep(Duration::from_millis(2)).await;
                assert!(rung(&early), "rung at its deadline");
                assert!(!rung(&late));
                stop.cancel();
                tokio::task::yield_now().await;
                assert!(rung(&late), "shutdown rings every armed connection");
                assert!(a.is_empty(), "and its alarm is gone");
                task.abort();
            })
            .await;
    }
}
