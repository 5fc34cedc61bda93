//! One timer per shard for the deadlines of all its sessions (keep-alive, auth, close grace),
//! instead of one `tokio::time::Sleep` (112 bytes) held by every connection's task. A session
//! keeps its deadlines in its `SessionClock` and arms one alarm here at the earliest; the
//! shard's [`Alarms::run`] task sleeps until the first alarm of the shard and rings the
//! connection's outbox (which holds the task's waker) when it comes. On shutdown it rings every
//! armed connection, which then sees the token cancelled: no connection holds a cancellation
//! future either.
//!
//! **Invariants:** a connection has at most one alarm (keyed by its deadline and id, so
//! re-arming removes the old one), and a waiting session always has one: it can never sleep
//! past a deadline or through a shutdown. An alarm rung early (the deadline moved later, e.g.
//! traffic put off the ping) is harmless: the session finds nothing due and arms again, at
//! most once per deadline, never per message.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::engine::hub::ConnId;
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
#[derive(Default)]
pub struct Alarms {
    /// Deadline and connection → the outbox to ring. Weak: an alarm never keeps a closed
    /// connection's outbox alive (connections disarm when they end anyway).
    due: RefCell<BTreeMap<(Instant, ConnId), Weak<Outbox>>>,
    /// An alarm earlier than the one the task sleeps for was armed.
    sooner: Notify,
    /// A fan-out pass ran since the last sweep ([`Alarms::fanned_out`]).
    busy: Cell<bool>,
}

impl Alarms {
    /// Arms `conn`'s alarm at `when`, replacing the one it had (`armed`); returns the new
    /// one, which the session keeps to re-arm or disarm it.
    pub fn arm(
        &self,
        conn: ConnId,
        armed: Option<Instant>,
        when: Instant,
        outbox: &Rc<Outbox>,
    ) -> Option<Instant> {
        let mut due = self.due.borrow_mut();
        if let Some(old) = armed {
            due.remove(&(old, conn));
        }
        let first = due.first_key_value().is_none_or(|((t, _), _)| when < *t);
        due.insert((when, conn), Rc::downgrade(outbox));
        drop(due);
        if first {
            self.sooner.notify_one();
        }
        Some(when)
    }

    /// What is left of `conn`'s alarm `armed` after a ring: `None` when it is the one that
    /// rang (rung alarms are removed), else still `armed` (the ring was for an alarm since
    /// replaced).
    pub fn after_ring(&self, conn: ConnId, armed: Option<Instant>) -> Option<Instant> {
        armed.filter(|t| self.due.borrow().contains_key(&(*t, conn)))
    }

    /// Removes `conn`'s alarm (the session ends).
    pub fn disarm(&self, conn: ConnId, armed: Option<Instant>) {
        if let Some(old) = armed {
            self.due.borrow_mut().remove(&(old, conn));
        }
    }

    /// How many alarms are armed (one per waiting session).
    pub fn len(&self) -> usize {
        self.due.borrow().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.due.borrow().is_empty()
    }

    /// Rings (and removes) every alarm due at `now`.
    fn ring_due(&self, now: Instant) {
        loop {
            let mut due = self.due.borrow_mut();
            match due.first_entry() {
                Some(e) if e.key().0 <= now => {
                    let outbox = e.remove();
                    // Rung outside the borrow: waking runs no task code now, but keep the
                    // map free anyway.
                    drop(due);
                    if let Some(o) = outbox.upgrade() {
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
        let all = std::mem::take(&mut *self.due.borrow_mut());
        for outbox in all.into_values() {
            if let Some(o) = outbox.upgrade() {
                o.ring();
            }
        }
    }

    /// Frees the queue buffer of every armed connection whose outbox is empty. An outbox
    /// keeps its buffer between writes (no allocation per delivery), so without this an idle
    /// connection would keep the buffer of the last frames it was sent (its `subscribed`
    /// reply: 4 entries, 192 bytes) for good. A busy one allocates it again at most once per
    /// sweep.
    fn release_idle(&self) {
        for outbox in self.due.borrow().values() {
            if let Some(o) = outbox.upgrade() {
                o.release_idle();
            }
        }
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
            let next = self.due.borrow().first_key_value().map(|((t, _), _)| *t);
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
    fn a_connection_has_one_alarm_and_rearming_replaces_it() {
        let a = Alarms::default();
        let o = Rc::new(Outbox::new(100));
        let t0 = Instant::now();
        let armed = a.arm(1, None, t0 + Duration::from_secs(25), &o);
        let armed = a.arm(1, armed, t0 + Duration::from_secs(3), &o);
        assert_eq!(a.len(), 1);
        a.ring_due(t0 + Duration::from_secs(2));
        assert!(!rung(&o), "not due yet");
        a.ring_due(t0 + Duration::from_secs(3));
        assert!(rung(&o));
        assert!(!rung(&o), "an alarm rings once");
        assert!(a.is_empty(), "a rung alarm is gone");
        assert_eq!(a.after_ring(1, armed), None);
        let armed = a.arm(1, None, t0 + Duration::from_secs(9), &o);
        assert_eq!(
            a.after_ring(1, armed),
            armed,
            "a ring for an earlier alarm keeps it"
        );
        a.disarm(1, armed);
        let armed = a.arm(2, None, t0, &o);
        a.disarm(2, armed);
        assert!(a.is_empty());
    }

    #[test]
    fn an_alarm_keeps_no_closed_connection_alive() {
        let a = Alarms::default();
        let o = Rc::new(Outbox::new(100));
        a.arm(1, None, Instant::now(), &o);
        drop(o);
        a.ring_due(Instant::now() + Duration::from_secs(1));
        assert!(a.is_empty());
    }

    #[test]
    fn the_sweep_frees_the_queue_buffers_of_idle_connections() {
        let a = Alarms::default();
        let (idle, busy) = (Rc::new(Outbox::new(1000)), Rc::new(Outbox::new(1000)));
        for (id, o) in [(1, &idle), (2, &busy)] {
            a.arm(id, None, Instant::now(), o);
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
                a.arm(1, None, t0 + Duration::from_secs(60), &late);
                tokio::task::yield_now().await;
                // Armed after the task went to sleep for the later one: it wakes sooner.
                a.arm(2, None, t0 + Duration::from_secs(5), &early);
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
