//! The parking lot of a shard's idle WebSocket sessions: a session with nothing to do holds
//! neither a tokio task nor a tokio I/O registration, only its state in a slot here and its
//! socket in an epoll set of the lot's own (issue 12 item 4: the task's cell, 512 bytes, and
//! tokio's registration, 256, were most of what an idle connection cost).
//!
//! A session parks (see `ws::run`) when its quiet period (`--ws-park-after` without input,
//! counted from when its task started or resumed at the earliest) ends with nothing to do: nothing queued or read ahead, no partial write, not closing, no
//! backplane join to wait for. Its socket leaves the runtime
//! (`TcpStream::into_std`) and joins the lot's epoll set (readable, which includes hang-ups
//! and errors) under its slot's key; its outbox's waker becomes a [`ParkWaker`] for that key,
//! and pump passes keep writing to the socket directly (`send`/`sendmsg`, as `io::try_send`).
//! It is resumed (the socket back in the runtime, the session loop spawned again through the
//! shard's tracker) when:
//! - the socket is readable (input, a close, a reset): the lot's epoll fd is itself readable
//!   in tokio's ([`run`]);
//! - its outbox wakes its writer: a direct write left something (`WouldBlock`, a partial
//!   write), the hub queued a reply or closed it, or its alarm rang (ping, idle, auth and
//!   token deadlines stay in the shard's `alarm::Alarms`); or its user's server API mailbox
//!   got a command;
//! - the node shuts down ([`Lot::resume_all`], before the shard waits for its tracker).
//!
//! **Invariants:** a parked session is in exactly one place (its slot) and is resumed at most
//! once per park: a key carries its slot's generation, so a stale wake finds nothing. Every
//! parked session has an alarm armed, so it never sleeps past a deadline; shutdown resumes
//! them all before waiting for the shard's tasks, and nothing parks once the node shuts
//! down. The wake list holds at most one key per wake of a parked session's waker (an outbox
//! takes its waker when it wakes it), so it is bounded by the sessions parked. Only plain TCP
//! `/ws` sessions park: TLS streams keep session state in their task, SSE and Pusher
//! sessions have their own loops.

use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::ws::Parked;
use super::ShardContext;

/// Events taken from the lot's epoll set per call.
const EVENTS: usize = 256;

/// One shard's parking lot. See the module docs.
pub struct Lot {
    /// The lot's epoll set (a clone of the handle [`run`] polls); `None`: it could not be
    /// made (out of file descriptors), so nothing parks.
    registry: Option<Registry>,
    /// The epoll set itself, until [`run`] takes it.
    poll: Cell<Option<mio::Poll>>,
    slots: RefCell<Slots>,
    wakes: Arc<Wakes>,
}

/// The parked sessions, by slot; a key is the slot's index and its generation.
#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
    parked: usize,
}

#[derive(Default)]
struct Slot {
    generation: u32,
    parked: Option<Box<Parked>>,
}

/// The keys of parked sessions whose outbox woke them, for [`run`] to resume.
#[derive(Default)]
struct Wakes {
    keys: Mutex<Vec<u64>>,
    notify: Notify,
}

/// The waker a parked session's outbox holds: it lists the session's key for the lot.
struct ParkWaker {
    key: u64,
    wakes: Arc<Wakes>,
}

impl Wake for ParkWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Ok(mut keys) = self.wakes.keys.lock() {
            keys.push(self.key);
        }
        self.wakes.notify.notify_one();
    }
}

fn key(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

impl Default for Lot {
    fn default() -> Self {
        // A key (slot index and generation) is an epoll token: 64 bits. Where a token is
        // narrower, nothing parks (a truncated key would never resume its session).
        let poll = (usize::BITS >= 64)
            .then(|| {
                mio::Poll::new()
                    .and_then(|p| p.registry().try_clone().map(|r| (p, r)))
                    .map_err(
                        |e| tracing::warn!(error = %e, "no parking lot: idle sessions stay tasks"),
                    )
                    .ok()
            })
            .flatten();
        let (poll, registry) = poll.unzip();
        Lot {
            registry,
            poll: Cell::new(poll),
            slots: RefCell::default(),
            wakes: Arc::default(),
        }
    }
}

impl Lot {
    /// Sessions parked.
    pub fn len(&self) -> usize {
        self.slots.borrow().parked
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether sessions can park here.
    pub fn is_open(&self) -> bool {
        self.registry.is_some()
    }

    /// Parks `p` with its socket `fd`: the waker its outbox (and whatever else may wake it)
    /// is to hold. `Err(p)`: it could not park (no lot, or the socket could not join the
    /// lot's epoll set), the session goes on as a task.
    pub(crate) fn park(&self, p: Box<Parked>, fd: &impl AsRawFd) -> Result<Waker, Box<Parked>> {
        let Some(registry) = &self.registry else {
            return Err(p);
        };
        let mut slots = self.slots.borrow_mut();
        let index = match slots.free.pop() {
            Some(i) => i,
            None => match u32::try_from(slots.slots.len()) {
                Ok(i) => {
                    slots.slots.push(Slot::default());
                    i
                }
                Err(_) => return Err(p),
            },
        };
        let Some(slot) = slots.slots.get_mut(index as usize) else {
            return Err(p);
        };
        let key = key(index, slot.generation);
        let raw = fd.as_raw_fd();
        if let Err(e) =
            registry.register(&mut SourceFd(&raw), Token(key as usize), Interest::READABLE)
        {
            tracing::debug!(error = %e, "cannot park a session");
            slots.free.push(index);
            return Err(p);
        }
        slot.parked = Some(p);
        slots.parked += 1;
        Ok(Waker::from(Arc::new(ParkWaker {
            key,
            wakes: self.wakes.clone(),
        })))
    }

    /// Takes the session parked under `key` out of the lot (and its socket out of the lot's
    /// epoll set); `None` when the key is stale.
    fn take(&self, key: u64) -> Option<Box<Parked>> {
        let (index, generation) = (key as u32, (key >> 32) as u32);
        let mut slots = self.slots.borrow_mut();
        let slot = slots.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        let p = slot.parked.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        slots.free.push(index);
        slots.parked -= 1;
        drop(slots);
        if let Some(registry) = &self.registry {
            let raw = p.fd();
            // A closed socket has left the set already.
            let _ = registry.deregister(&mut SourceFd(&raw));
        }
        Some(p)
    }

    /// Resumes every parked session (shutdown: each then closes with 1012).
    pub fn resume_all(&self, ctx: &Rc<ShardContext>) {
        let keys: Vec<u64> = {
            let slots = self.slots.borrow();
            (0u32..)
                .zip(&slots.slots)
                .filter(|(_, s)| s.parked.is_some())
                .map(|(i, s)| key(i, s.generation))
                .collect()
        };
        for k in keys {
            self.resume(ctx, k);
        }
    }

    fn resume(&self, ctx: &Rc<ShardContext>, key: u64) {
        if let Some(p) = self.take(key) {
            super::ws::resume(ctx.clone(), p);
        }
    }
}

/// The shard's lot task: resumes the parked sessions whose socket became readable (its epoll
/// set is one fd in tokio's) or whose waker was woken. Ends at shutdown (then the shard
/// resumes what is left, [`Lot::resume_all`]).
pub async fn run(ctx: Rc<ShardContext>) {
    let Some(poll) = ctx.lot.poll.take() else {
        return;
    };
    // SAFETY: a `mio::Poll` owns its epoll fd, returns that one from every `as_raw_fd` and
    // closes it only when dropped, which the `AsyncFd` (its owner) does after deregistering
    // it; this task only polls it through the guard, never replaces it.
    #[allow(unsafe_code)]
    let fd = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) };
    let mut fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            let (_, e) = e.into_parts();
            tracing::warn!(error = %e, "cannot watch the parking lot: idle sessions stay tasks");
            return;
        }
    };
    let mut events = mio::Events::with_capacity(EVENTS);
    let stop = ctx.node.shutdown.clone();
    let mut keys = Vec::new();
    loop {
        tokio::select! {
            r = fd.readable_mut() => {
                let mut guard = match r {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(error = %e, "the parking lot failed");
                        return;
                    }
                };
                loop {
                    if let Err(e) = guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                        if e.kind() == std::io::ErrorKind::Interrupted {
                            continue;
                        }
                        tracing::warn!(error = %e, "the parking lot failed");
                        return;
                    }
                    let mut n = 0;
                    for e in events.iter() {
                        n += 1;
                        ctx.lot.resume(&ctx, e.token().0 as u64);
                    }
                    if n < EVENTS {
                        break;
                    }
                }
                guard.clear_ready();
            }
            () = ctx.lot.wakes.notify.notified() => {
                if let Ok(mut due) = ctx.lot.wakes.keys.lock() {
                    std::mem::swap(&mut *due, &mut keys);
                }
                for k in keys.drain(..) {
                    ctx.lot.resume(&ctx, k);
                }
            }
            () = stop.cancelled() => return,
        }
    }
}
