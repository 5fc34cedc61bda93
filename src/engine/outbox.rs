//! A connection's bounded queue of outgoing frames. Sans-IO: the writer task drains it (or, while
//! that task idles, a pump pass through the transport's [`Sink`], see [`Outbox::write_direct`]),
//! the hub and the command handlers fill it, and a `std::task::Waker` links the two.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::types::{Epoch, PresenceEvent, Publication, FRAME_SLOTS};

/// `Out::slot` of a frame that belongs to no subscription (replies, control frames).
pub const NO_SLOT: u16 = u16::MAX;

/// One queued frame: 16 bytes. Fan-out queues one per subscriber and message, or one per
/// subscriber for all of a pass's messages of a channel (a [`Run`]), so that subscribers who
/// fall behind (the top step of a max search at 10,000 subscribers) hold one entry per pass:
/// an entry names the publication, presence event or run whose frames it writes (cached there,
/// shared by every subscriber; see `Publication::frame`) with one pointer, instead of a 32-byte
/// `Bytes` handle plus its seq and slot (48 bytes).
#[derive(Clone)]
pub enum Out {
    /// A publication's frame in encoding `enc`, built (`Publication::frame`) before it is
    /// queued; `slot` is the connection's subscription it belongs to.
    Message {
        /// The publication (its frames and seq).
        p: Arc<Publication>,
        /// The encoding slot of its frame.
        enc: u8,
        /// The connection's subscription slot.
        slot: u16,
    },
    /// A presence event's frame in encoding `enc`, built before it is queued.
    Event {
        /// The event.
        e: Arc<PresenceEvent>,
        /// The encoding slot of its frame.
        enc: u8,
    },
    /// Several consecutive messages of one channel (see [`Run`]).
    Run {
        /// The messages, gathered once per pass, channel and encoding, shared by every
        /// subscriber that takes them all.
        r: Arc<Run>,
        /// The connection's subscription slot.
        slot: u16,
    },
    /// A frame of this connection's own (replies, gap notices, control frames), boxed so that
    /// the entries of shared frames stay one pointer wide.
    Private(Box<Bytes>),
}

/// The messages one fan-out pass carries for one channel, in one encoding: what the pass
/// queues for each subscriber that takes them all, one entry instead of one per message (see
/// `hub::Hub::pump`). A subscriber that falls behind then holds one entry per pass, not one
/// per message. In an encoding whose frames go to the wire back to back unchanged (WebSocket,
/// `Encoder::joinable`) the run also holds them *joined*, copied into one buffer once, so that
/// a writer gathers one slice per pass. A stream that writes something of its own before each
/// message (SSE's `id:` line) reads them one by one ([`Out::each`]), or, when the stamp it
/// would write is the channel's alone (an SSE stream of one channel), takes them joined with
/// those stamps (`Encoder::stamped`, [`Out::stamped`]), built once for all such streams. Each
/// message is still encoded once: a run holds the publications, whose frames are cached in
/// them.
pub struct Run {
    /// The publications, in seq order, each with its frame in `enc` built.
    pubs: Box<[Arc<Publication>]>,
    /// The encoding slot of their frames.
    enc: u8,
    /// Their frames back to back (empty if not joined), each after its stamp if `stamped`;
    /// counted in the node's frame gauge when the publications' frames are.
    joined: Bytes,
    /// The channel's epoch whose stamps `joined` carries, if it carries stamps.
    stamped: Option<Epoch>,
    /// Bytes of their frames.
    len: usize,
}

impl Run {
    /// The run of `pubs` (consecutive, in seq order, their frames in `enc` built), with
    /// `joined`, their frames back to back (each after its stamp for `stamped`, an epoch of
    /// their channel), or an empty buffer.
    pub fn new(
        pubs: Box<[Arc<Publication>]>,
        enc: usize,
        joined: Bytes,
        stamped: Option<Epoch>,
    ) -> Self {
        let enc = enc % FRAME_SLOTS;
        let len = pubs.iter().map(|p| p.built_frame(enc).len()).sum();
        debug_assert!(joined.is_empty() || stamped.is_some() || joined.len() == len);
        Self {
            pubs,
            enc: enc as u8,
            joined,
            stamped,
            len,
        }
    }

    /// How many messages it holds.
    pub fn count(&self) -> usize {
        self.pubs.len()
    }

    /// Bytes of their frames.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no message.
    pub fn is_empty(&self) -> bool {
        self.pubs.is_empty()
    }
}

impl Out {
    /// A frame that belongs to no subscription.
    pub fn control(frame: Bytes) -> Self {
        Out::Private(Box::new(frame))
    }

    /// `p`'s frame in encoding `enc` for subscription `slot`: the frame must be built
    /// (`p.frame(enc, …)`) first; the entry writes what the publication caches.
    pub fn message(p: Arc<Publication>, enc: usize, slot: u16) -> Self {
        Out::Message {
            p,
            enc: (enc % FRAME_SLOTS) as u8,
            slot,
        }
    }

    /// `e`'s frame in encoding `enc`, built first (`e.frame(enc, …)`).
    pub fn event(e: Arc<PresenceEvent>, enc: usize) -> Self {
        Out::Event {
            e,
            enc: (enc % FRAME_SLOTS) as u8,
        }
    }

    /// Bytes of its frames: what it counts against the outbox's limit.
    pub fn len(&self) -> usize {
        match self {
            Out::Run { r, .. } => r.len,
            _ => self.frame().len(),
        }
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many messages it holds (a run's count; 1 for any other frame).
    pub fn messages(&self) -> usize {
        match self {
            Out::Run { r, .. } => r.count(),
            _ => 1,
        }
    }

    /// Calls `f` with the seq (0 for frames that are not messages) and frame of each message
    /// it holds, in order: what a stream that writes something of its own before each message
    /// (SSE) reads.
    pub fn each(&self, mut f: impl FnMut(u64, &[u8])) {
        match self {
            Out::Run { r, .. } => {
                let enc = usize::from(r.enc);
                for p in r.pubs.iter() {
                    f(p.seq, p.built_frame(enc));
                }
            }
            _ => f(self.seq(), self.frame()),
        }
    }

    /// A run's frames joined with their stamps (`Encoder::stamped`), and the channel's epoch
    /// those name: what a stream of that channel alone, at that epoch, writes as it is.
    pub fn stamped(&self) -> Option<(Epoch, &Bytes)> {
        match self {
            Out::Run { r, .. } => r.stamped.map(|e| (e, &r.joined)),
            _ => None,
        }
    }

    /// The bytes to write, all of its frames (nothing for a run whose frames are not joined
    /// as they are: those are read with [`Out::each`] or [`Out::stamped`]).
    pub fn frame(&self) -> &[u8] {
        match self {
            Out::Message { p, enc, .. } => p.built_frame(usize::from(*enc)),
            Out::Event { e, enc } => e.built_frame(usize::from(*enc)),
            Out::Run { r, .. } if r.stamped.is_some() => &[],
            Out::Run { r, .. } => &r.joined,
            Out::Private(b) => b,
        }
    }

    /// The connection's subscription slot the frame belongs to, or [`NO_SLOT`].
    pub fn slot(&self) -> u16 {
        match self {
            Out::Message { slot, .. } | Out::Run { slot, .. } => *slot,
            _ => NO_SLOT,
        }
    }

    /// The message's seq, the last one's for a run (0 for frames that are not messages).
    pub fn seq(&self) -> u64 {
        match self {
            Out::Message { p, .. } => p.seq,
            Out::Run { r, .. } => r.pubs.last().map_or(0, |p| p.seq),
            _ => 0,
        }
    }

    /// The bytes it adds to its outbox's footprint besides the entry: nothing for a message
    /// frame counted once for the node (see `memory::FrameGauge`), wherever it is queued;
    /// otherwise the frame (and, for a private one, its box).
    fn private_len(&self) -> usize {
        match self {
            Out::Message { p, .. } if p.counts_frames() => 0,
            Out::Run { r, .. } if r.pubs.first().is_some_and(|p| p.counts_frames()) => 0,
            Out::Run { r, .. } => r.len,
            Out::Private(b) => b.len() + PRIVATE_BOX,
            _ => self.frame().len(),
        }
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out")
            .field("len", &self.len())
            .field("slot", &self.slot())
            .field("seq", &self.seq())
            .finish()
    }
}

/// What a private frame's box costs besides the frame.
const PRIVATE_BOX: usize = std::mem::size_of::<Bytes>();

/// Whether the outbox still takes frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxState {
    /// Accepting.
    Open,
    /// Passed its byte limit: the queue was dropped, the connection must be closed as a slow
    /// consumer (and the client resumes from its last seq).
    Overflowed,
    /// Closing: only the frames already queued (ending with the close frame) go out.
    Closing,
}

/// See the module docs.
#[derive(Debug)]
pub struct Outbox {
    inner: RefCell<Inner>,
}

/// Bytes held by the outboxes of one shard (frames and queue entries): what the shard reports
/// to the node's memory meter. Shard-local, so counting costs no atomic operation. Updated with
/// wrapping arithmetic: the hub counts what fan-out queued once per pass (see
/// [`Outbox::push_uncounted`]), so the value is exact whenever the shard reads it, between
/// passes, even if a drop in the middle of a pass briefly went "below zero".
pub type Gauge = Rc<Cell<usize>>;

#[derive(Debug)]
struct Inner {
    queue: VecDeque<Out>,
    /// Bytes queued and not yet written (what the limit bounds).
    bytes: usize,
    /// Bytes of the queued frames that are not shared (see [`Out::shared`]), whole frames:
    /// what the outbox adds to the gauge besides its entries.
    private: usize,
    /// Bytes of the front frame already written.
    front_written: usize,
    /// The byte limit (`--max-outbox-bytes`, at most 4 GiB: see [`Outbox::with_gauge`]); a
    /// `u32` so that, with the flags beside it, the outbox fits a 128-byte allocation.
    limit: u32,
    waker: Option<Waker>,
    state: OutboxState,
    /// A subscriber of this connection has a gap notice or a conflated message waiting for
    /// room (see `Hub::flush`).
    deferred: bool,
    /// The connection's shard timer rang: one of its deadlines may be due (see
    /// [`Outbox::ring`]).
    alarm: bool,
    /// The shard's gauge, which holds this outbox's [`Inner::footprint`].
    gauge: Gauge,
    /// The socket a pump pass may write to itself while the writer is idle (plain TCP
    /// WebSocket connections only; see [`Outbox::set_direct`]).
    direct: Option<Rc<dyn Sink>>,
    /// Listed for a direct write after the current pass (see [`collect_wakes`]).
    direct_due: bool,
}

/// A connection's socket as the pump sees it: a non-blocking vectored write. The transport
/// implements it for its socket (a plain `TcpStream`); the engine never names one.
pub trait Sink: std::fmt::Debug {
    /// Writes what it can of `bufs` without waiting: the bytes written, or `WouldBlock`.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

/// Most frames gathered into one vectored write: Linux's `UIO_MAXIOV`. A subscriber that fell
/// behind (its client read slowly, or the shard was busy) gets its backlog in as few writes as
/// the socket takes, so the cost of catching up per message falls as the backlog grows.
const MAX_IOV: usize = 1024;

/// The slices of a write of a few frames (the common case) are gathered on a smaller array.
const FEW_IOV: usize = 64;

impl Outbox {
    /// An empty outbox that holds at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self::with_gauge(limit, Gauge::default())
    }

    /// [`Outbox::new`], counting what it holds in the shard's `gauge`.
    pub fn with_gauge(limit: usize, gauge: Gauge) -> Self {
        Self {
            inner: RefCell::new(Inner {
                queue: VecDeque::new(),
                bytes: 0,
                private: 0,
                front_written: 0,
                limit: u32::try_from(limit).unwrap_or(u32::MAX),
                waker: None,
                state: OutboxState::Open,
                deferred: false,
                alarm: false,
                gauge,
                direct: None,
                direct_due: false,
            }),
        }
    }

    /// Lets pump passes write to `sink` themselves while the connection's writer is idle
    /// (`None`: never; every frame waits for the writer's task). The transport sets it for a
    /// plain TCP socket and clears it before the socket closes.
    pub fn set_direct(&self, sink: Option<Rc<dyn Sink>>) {
        self.inner.borrow_mut().direct = sink;
    }

    /// Asks the CPU to start loading this outbox (its `Rc` allocation) for a direct write a
    /// little later in the same loop, so that the load overlaps the write before it: a pass
    /// over many subscribers finds each one's state out of cache (at 19,462 publishes/s to
    /// 10,000 subscribers over 1,000 channels, the misses were ~5 % of the server's CPU). A
    /// hint: it changes nothing the outbox does. See [`Outbox::prefetch_parts`].
    pub fn prefetch(this: &Rc<Self>) {
        let at = Rc::as_ptr(this).cast::<u8>();
        // The allocation (reference counts, then the value) is at most 128 bytes (see
        // `an_outbox_fits_a_128_byte_allocation`): its first, middle and last byte.
        for offset in [-16_isize, 48, 111] {
            prefetch(at.wrapping_offset(offset));
        }
    }

    /// The second step of [`Outbox::prefetch`], once the outbox itself is (nearly) in cache:
    /// the direct socket and the front of the queue, which a direct write reads next.
    pub fn prefetch_parts(&self) {
        if let Ok(inner) = self.inner.try_borrow() {
            if let Some(sink) = &inner.direct {
                prefetch(Rc::as_ptr(sink).cast::<u8>().wrapping_sub(16));
            }
            if let Some(front) = inner.queue.front() {
                prefetch(std::ptr::from_ref(front).cast::<u8>());
            }
        }
    }

    /// Writes what a pump pass queued to the socket itself, once, if the writer is still idle
    /// (parked on this outbox with nothing of its own in flight); see [`collect_wakes`]. All
    /// of it written: the writer stays parked. Otherwise (a partial write, `WouldBlock`, an
    /// error, an overflow or close to act on, a flush to ask for) what is left stays queued
    /// where the writer continues, and the writer's waker is handed back to be woken.
    pub fn write_direct(&self) -> DirectWrite {
        let mut inner = self.inner.borrow_mut();
        inner.direct_due = false;
        let mut done = DirectWrite::default();
        // Woken meanwhile (by a read, a reply): the writer's task writes it all itself.
        if inner.waker.is_none() {
            return done;
        }
        let idle = inner.state == OutboxState::Open
            && inner.front_written == 0
            && !inner.deferred
            && !inner.alarm;
        let sink = match &inner.direct {
            Some(sink) if idle => sink.clone(),
            // An overflow, a close, a flush or an alarm: the writer acts on it.
            _ => {
                done.wake = inner.waker.take();
                return done;
            }
        };
        if inner.queue.is_empty() {
            return done;
        }
        let r = inner.with_slices(|slices| sink.try_write_vectored(slices));
        if let Ok(n) = r {
            done.written = inner.consume(n);
        }
        // `WouldBlock` or a partial write: the writer continues (and arms its write deadline);
        // an error: the writer's own write or read sees it and ends the connection.
        if !inner.queue.is_empty() || r.is_err() {
            done.wake = inner.waker.take();
        }
        done
    }

    /// The byte limit.
    pub fn limit(&self) -> usize {
        self.inner.borrow().limit()
    }

    /// Queues a frame. Returns false if it was not taken: the outbox is closing, or it was
    /// full, in which case it is now [`OutboxState::Overflowed`] (and stays so).
    pub fn push(&self, out: Out) -> bool {
        let grown = Self::cost(&out);
        let taken = self.queue(out, None);
        if taken {
            let inner = self.inner.borrow();
            inner.gauge.set(inner.gauge.get().wrapping_add(grown));
        }
        taken
    }

    /// [`Outbox::push`] without counting the frame in the shard's gauge: the caller adds
    /// [`Outbox::cost`] of what was taken to the gauge before the shard next reads it. For
    /// fan-out, which counts once per pass rather than once per delivery.
    /// Fan-out pushes through the outbox's `Rc`, so that a pass can list an idle writer's
    /// outbox for a direct write (see [`collect_wakes`]).
    pub fn push_uncounted(self: &Rc<Self>, out: Out) -> bool {
        self.queue(out, Some(self))
    }

    /// Queues `out` unless closed or full; `me`: this outbox, to list for a direct write.
    fn queue(&self, out: Out, me: Option<&Rc<Outbox>>) -> bool {
        let mut inner = self.inner.borrow_mut();
        if inner.state != OutboxState::Open {
            return false;
        }
        if inner.bytes + out.len() > inner.limit() {
            drop(inner);
            self.mark_overflowed();
            return false;
        }
        inner.bytes += out.len();
        inner.private += out.private_len();
        inner.queue.push_back(out);
        wake(&mut inner, me);
        true
    }

    /// What a queued frame adds to the shard's gauge.
    pub fn cost(out: &Out) -> usize {
        out.private_len() + OUT_SIZE
    }

    /// Queues `frame` (a close frame or the end of a stream) as the last thing to go out: after
    /// it the outbox takes nothing. Frames already queued stay ahead of it unless `flush` is
    /// false, in which case they are dropped.
    pub fn close_with(&self, frame: Bytes, flush: bool) {
        let mut inner = self.inner.borrow_mut();
        if inner.state == OutboxState::Closing {
            return;
        }
        let before = inner.footprint();
        if !flush || inner.state == OutboxState::Overflowed {
            // Keep a partly written front frame: cutting it would corrupt the stream.
            let keep = usize::from(inner.front_written > 0);
            inner.queue.truncate(keep);
            inner.recount_queue();
        }
        inner.state = OutboxState::Closing;
        let out = Out::control(frame);
        inner.bytes += out.len();
        inner.private += out.private_len();
        inner.queue.push_back(out);
        inner.recount(before);
        wake(&mut inner, None);
    }

    /// Marks the outbox overflowed (its reader lost messages another way, e.g. its shard fell
    /// behind the ring): same outcome as passing the byte limit.
    pub fn mark_overflowed(&self) {
        let mut inner = self.inner.borrow_mut();
        if inner.state == OutboxState::Open {
            let before = inner.footprint();
            inner.state = OutboxState::Overflowed;
            let keep = usize::from(inner.front_written > 0);
            inner.queue.truncate(keep);
            inner.recount_queue();
            inner.recount(before);
            wake(&mut inner, None);
        }
    }

    /// Whether `len` more bytes fit under the limit.
    pub fn has_room(&self, len: usize) -> bool {
        let inner = self.inner.borrow();
        inner.state == OutboxState::Open && inner.bytes + len <= inner.limit()
    }

    /// Notes that a subscriber deferred something until there is room.
    pub fn set_deferred(&self) {
        self.inner.borrow_mut().deferred = true;
    }

    /// Takes the deferred flag once at most half the limit is queued (the writer then asks the
    /// hub to flush), so a connection that frees a little room does not flush one frame at a time.
    pub fn take_deferred(&self) -> bool {
        let mut inner = self.inner.borrow_mut();
        if inner.deferred && inner.state == OutboxState::Open && inner.bytes <= inner.limit() / 2 {
            inner.deferred = false;
            return true;
        }
        false
    }

    /// Wakes the connection's task for a timer: the shard keeps one timer for all its
    /// connections (not one per connection) and rings the outbox, which already holds the
    /// task's waker, when a connection's deadline comes.
    pub fn ring(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.alarm = true;
        wake(&mut inner, None);
    }

    /// `Ready` once after each [`Outbox::ring`]; otherwise registers `cx`'s waker (the same
    /// one [`Outbox::poll_ready`] keeps: one task drains the outbox and hears its alarm).
    pub fn poll_alarm(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.inner.borrow_mut();
        if std::mem::take(&mut inner.alarm) {
            return Poll::Ready(());
        }
        register(&mut inner, cx);
        Poll::Pending
    }

    /// Whether the writer has nothing to do: nothing queued, open, nothing deferred, no alarm
    /// rung. What a session checks before it parks (`transport::park`).
    pub fn is_idle(&self) -> bool {
        let inner = self.inner.borrow();
        inner.queue.is_empty()
            && inner.state == OutboxState::Open
            && !inner.deferred
            && !inner.alarm
    }

    /// Makes `waker` the one woken by the next push, ring, overflow or close, and by a direct
    /// write that leaves something: a parked session's (`transport::park`), which has no task.
    pub fn set_waker(&self, waker: &Waker) {
        self.inner.borrow_mut().waker = Some(waker.clone());
    }

    /// The state.
    pub fn state(&self) -> OutboxState {
        self.inner.borrow().state
    }

    /// Bytes waiting.
    pub fn queued_bytes(&self) -> usize {
        self.inner.borrow().bytes
    }

    /// Frees the queue's buffer if nothing is queued: SSE streams call it at their keep-alive,
    /// so an idle stream holds no queue buffer.
    pub fn release_idle(&self) {
        let mut inner = self.inner.borrow_mut();
        if inner.queue.is_empty() {
            inner.queue = VecDeque::new();
        }
    }

    /// Queue entries allocated (what an idle outbox should not keep).
    pub fn capacity(&self) -> usize {
        self.inner.borrow().queue.capacity()
    }

    /// Frames waiting (queue entries: a run is one).
    pub fn frames(&self) -> usize {
        self.inner.borrow().queue.len()
    }

    /// Messages and other frames waiting (a run counts its messages).
    pub fn messages(&self) -> usize {
        self.inner.borrow().queue.iter().map(Out::messages).sum()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.inner.borrow().queue.is_empty()
    }

    /// Registers `cx`'s waker to be woken on the next push, unless there is something to
    /// do already (queued frames, or an overflow to act on): then `Ready(())`.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.inner.borrow_mut();
        if !inner.queue.is_empty() || inner.state == OutboxState::Overflowed {
            return Poll::Ready(());
        }
        register(&mut inner, cx);
        Poll::Pending
    }

    /// Calls `write` with the queued frames (at most 1,024) as I/O slices, once, and consumes as
    /// many bytes as it reports written. This is the write-coalescing point: every frame queued
    /// since the last wake-up goes out in one vectored write.
    pub fn write_with<E>(
        &self,
        write: impl FnOnce(&[IoSlice<'_>]) -> Poll<Result<usize, E>>,
    ) -> Poll<Result<Written, E>> {
        let mut inner = self.inner.borrow_mut();
        if inner.queue.is_empty() {
            return Poll::Ready(Ok(Written::default()));
        }
        let n = match inner.with_slices(write) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        Poll::Ready(Ok(inner.consume(n)))
    }

    /// Pops every entry (for transports that copy, like SSE bodies) into `f`; returns the
    /// frames they held (a run counts its messages).
    pub fn drain_into(&self, mut f: impl FnMut(&Out)) -> usize {
        let mut inner = self.inner.borrow_mut();
        let mut n = 0;
        let mut freed = 0;
        while let Some(out) = inner.queue.pop_front() {
            inner.bytes -= out.len() - inner.front_written;
            inner.private -= out.private_len();
            inner.front_written = 0;
            freed += Self::cost(&out);
            f(&out);
            n += out.messages();
        }
        inner.release_if_idle();
        inner.gauge.set(inner.gauge.get().wrapping_sub(freed));
        n
    }
}

/// What [`Outbox::write_direct`] did.
#[derive(Debug, Default)]
pub struct DirectWrite {
    /// What went out (nothing if it did not write).
    pub written: Written,
    /// The writer, to wake: it has something left to do.
    pub wake: Option<Waker>,
}

/// What one write consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Bytes written.
    pub bytes: usize,
    /// Frames completed by this write (a run counts its messages: each is a frame on the
    /// wire).
    pub frames: usize,
    /// Whether the queue is now empty and the outbox closing (the close frame went out).
    pub finished: bool,
}

impl Inner {
    /// Whether a pass may write this outbox's frames itself rather than wake its writer:
    /// a direct socket, a writer parked on the outbox, and the frame just queued the only one
    /// (nothing of the writer's own in flight, nothing to act on but writing).
    fn direct_idle(&self, me: Option<&Rc<Outbox>>) -> Option<Rc<Outbox>> {
        let me = me.filter(|_| self.direct.is_some())?;
        let idle = self.waker.is_some()
            && self.queue.len() == 1
            && self.front_written == 0
            && self.state == OutboxState::Open
            && !self.deferred
            && !self.alarm;
        idle.then(|| me.clone())
    }

    fn limit(&self) -> usize {
        self.limit as usize
    }

    /// Calls `f` once with the queued frames (at most [`MAX_IOV`]) as I/O slices, the front
    /// one past what was written of it: what the writer and a direct write send.
    fn with_slices<R>(&self, f: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
        // One frame, the usual direct write of a quiet subscriber: no array to fill.
        if let (1, Some(only)) = (self.queue.len(), self.queue.front()) {
            return f(&[IoSlice::new(&only.frame()[self.front_written..])]);
        }
        if self.queue.len() <= FEW_IOV {
            let mut slices = [IoSlice::new(&[]); FEW_IOV];
            let count = self.slices(&mut slices);
            f(&slices[..count])
        } else {
            self.with_many_slices(f)
        }
    }

    /// [`Inner::with_slices`] for a backlog, on the larger array (out of line: the common
    /// path does not reserve its stack).
    #[inline(never)]
    fn with_many_slices<R>(&self, f: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let count = self.slices(&mut slices);
        f(&slices[..count])
    }

    /// The queued frames (at most `N`) as I/O slices in `into`, the front one past
    /// what was written of it; returns how many. What the writer and a direct write send.
    fn slices<'a, const N: usize>(&'a self, into: &mut [IoSlice<'a>; N]) -> usize {
        let mut count = 0;
        for (slot, out) in into.iter_mut().zip(&self.queue) {
            let skip = if count == 0 { self.front_written } else { 0 };
            *slot = IoSlice::new(&out.frame()[skip..]);
            count += 1;
        }
        count
    }

    fn consume(&mut self, mut n: usize) -> Written {
        let before = self.footprint();
        let mut w = Written {
            bytes: n,
            ..Written::default()
        };
        self.bytes -= n;
        while n > 0 {
            let Some(front) = self.queue.front() else {
                break;
            };
            let left = front.len() - self.front_written;
            if n >= left {
                n -= left;
                self.front_written = 0;
                if let Some(out) = self.queue.pop_front() {
                    self.private -= out.private_len();
                    w.frames += out.messages();
                }
            } else {
                self.front_written += n;
                n = 0;
            }
        }
        w.finished = self.queue.is_empty() && self.state == OutboxState::Closing;
        self.release_if_idle();
        self.recount(before);
        w
    }

    /// Frees the queue's buffer once it is empty if it grew past [`KEEP_ENTRIES`]: a burst is
    /// over, and a `VecDeque` never shrinks by itself, so every connection would keep its
    /// largest burst's worth for its whole life. A smaller buffer stays for the next pass (no
    /// allocation per delivery); [`Outbox::release_idle`] frees it on a quiet connection.
    fn release_if_idle(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > KEEP_ENTRIES {
            self.queue = VecDeque::new();
        }
    }

    /// What this outbox holds, as counted in the shard's gauge: its queue entries and its
    /// private frames (shared message frames are counted once for the node, elsewhere).
    fn footprint(&self) -> usize {
        self.private + self.queue.len() * OUT_SIZE
    }

    /// Sets `bytes` and `private` from the queue (after it was cut).
    fn recount_queue(&mut self) {
        self.bytes = self.queue.iter().map(Out::len).sum::<usize>() - self.front_written;
        self.private = self.queue.iter().map(Out::private_len).sum();
    }

    /// Moves the gauge by how the footprint changed since it was `before`.
    fn recount(&mut self, before: usize) {
        let now = self.footprint();
        self.gauge
            .set(self.gauge.get().wrapping_add(now).wrapping_sub(before));
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.gauge
            .set(self.gauge.get().wrapping_sub(self.footprint()));
    }
}

/// Bytes a queued frame costs besides the frame itself.
const OUT_SIZE: usize = std::mem::size_of::<Out>();

/// Queue entries an emptied outbox may keep allocated for the next pass (about 3 KiB).
const KEEP_ENTRIES: usize = 64;

/// Keeps `cx`'s waker, unless the one kept already wakes the same task.
fn register(inner: &mut Inner, cx: &Context<'_>) {
    if !inner
        .waker
        .as_ref()
        .is_some_and(|w| w.will_wake(cx.waker()))
    {
        inner.waker = Some(cx.waker().clone());
    }
}

thread_local! {
    /// The wakes that pushes on this thread hold back while [`collect_wakes`] runs.
    static HELD: RefCell<Option<Writers>> = const { RefCell::new(None) };
}

/// A hint to the CPU to load the cache line holding `at` (see [`Outbox::prefetch`]).
#[inline(always)]
fn prefetch(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: a prefetch only hints the cache: it reads nothing into the program and never
    // faults, whatever the address (a stale or unmapped one is ignored).
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(at.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// What a pump pass leaves to do for the writers it queued frames for.
#[derive(Debug, Default)]
pub struct Writers {
    /// Writers to wake.
    pub wakes: Vec<Waker>,
    /// Outboxes whose writer was idle when the pass queued their first frame: the caller
    /// writes them itself ([`Outbox::write_direct`]), and wakes only the writers that
    /// have something left.
    pub direct: Vec<Rc<Outbox>>,
}

/// Runs `f` (a hub's pass) with the wakes of the writers it queues frames for put into `into`
/// instead of done, for the caller to do in its own time (a shard wakes them a few at a time,
/// so that the other tasks it runs do not wait behind every subscriber's write), and the
/// outboxes it can write to directly listed there too.
pub fn collect_wakes<R>(into: &mut Writers, f: impl FnOnce() -> R) -> R {
    /// Puts the collected wakes into `into` however `f` ends.
    struct Restore<'a>(&'a mut Writers);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            if let Some(held) = HELD.with_borrow_mut(Option::take) {
                *self.0 = held;
            }
        }
    }
    HELD.with_borrow_mut(|h| *h = Some(std::mem::take(into)));
    let _restore = Restore(into);
    f()
}

/// Wakes the outbox's writer, or, in a pass, holds the wake back (or, for an idle writer
/// with a direct socket, whose outbox is `me`, lists the outbox for a direct write).
fn wake(inner: &mut Inner, me: Option<&Rc<Outbox>>) {
    HELD.with_borrow_mut(|held| match held {
        Some(held) => {
            // Listed already: the pass's other frames go out in the same direct write.
            if inner.direct_due {
                return;
            }
            if let Some(me) = inner.direct_idle(me) {
                // The writer stays parked (its waker kept) unless the direct write leaves
                // something for it.
                inner.direct_due = true;
                held.direct.push(me);
            } else if let Some(w) = inner.waker.take() {
                held.wakes.push(w);
            }
        }
        None => {
            if let Some(w) = inner.waker.take() {
                w.wake();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    fn frame(n: usize) -> Out {
        Out::control(Bytes::from(vec![b'x'; n]))
    }

    fn write_all(o: &Outbox, max: usize) -> Written {
        match o.write_with::<()>(|iov| {
            Poll::Ready(Ok(iov.iter().map(|s| s.len()).sum::<usize>().min(max)))
        }) {
            Poll::Ready(Ok(w)) => w,
            _ => Written::default(),
        }
    }

    /// Writes all `o` holds into `wire`, 5 bytes at a time.
    fn write_in_short_writes(o: &Outbox, wire: &mut Vec<u8>) {
        while !o.is_empty() {
            let _ = o.write_with::<()>(|iov| {
                let n = iov.iter().map(|s| s.len()).sum::<usize>().min(5);
                let mut left = n;
                for s in iov {
                    let k = s.len().min(left);
                    wire.extend_from_slice(&s[..k]);
                    left -= k;
                }
                Poll::Ready(Ok(n))
            });
        }
    }

    fn capacity(o: &Outbox) -> usize {
        o.inner.borrow().queue.capacity()
    }

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn woken(c: &std::sync::Arc<Count>) -> usize {
        c.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn wakes_held_during_a_pass_are_handed_over_not_done_and_later_ones_are_done() {
        let count = std::sync::Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let (a, b) = (Outbox::new(1024), Outbox::new(1024));
        assert!(a.poll_ready(&mut cx).is_pending());
        assert!(b.poll_ready(&mut cx).is_pending());
        let mut held = Writers::default();
        let queued = collect_wakes(&mut held, || a.push(frame(8)) && b.push(frame(8)));
        assert!(queued);
        assert_eq!(woken(&count), 0, "held, not done");
        assert_eq!(held.wakes.len(), 2, "one per writer that waited");
        held.wakes.drain(..).for_each(Waker::wake);
        assert_eq!(woken(&count), 2);
        // Outside a pass, a push wakes at once again.
        assert!(a.poll_ready(&mut cx).is_ready(), "something queued");
        write_all(&a, usize::MAX);
        assert!(a.poll_ready(&mut cx).is_pending());
        a.push(frame(8));
        assert_eq!(woken(&count), 3);
    }

    /// A socket for the direct path: takes at most `room` bytes per write (`None`:
    /// `WouldBlock`), or fails.
    #[derive(Debug, Default)]
    struct Socket {
        room: Cell<Option<usize>>,
        fail: Cell<bool>,
        wire: RefCell<Vec<u8>>,
        writes: Cell<usize>,
    }

    impl Sink for Socket {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.writes.set(self.writes.get() + 1);
            if self.fail.get() {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            let Some(room) = self.room.get() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            let mut left = room;
            for b in bufs {
                let k = b.len().min(left);
                self.wire.borrow_mut().extend_from_slice(&b[..k]);
                left -= k;
            }
            Ok(room - left)
        }
    }

    /// An outbox of a plain TCP connection whose writer is parked on it (as a session's task
    /// is between wake-ups), counted in `gauge`.
    fn parked(limit: usize, gauge: &Gauge, room: Option<usize>) -> (Rc<Outbox>, Rc<Socket>) {
        let o = Rc::new(Outbox::with_gauge(limit, gauge.clone()));
        let socket = Rc::new(Socket::default());
        socket.room.set(room);
        o.set_direct(Some(socket.clone()));
        (o, socket)
    }

    fn park(o: &Outbox, waker: &Waker) {
        let mut cx = Context::from_waker(waker);
        assert!(o.poll_ready(&mut cx).is_pending());
        assert!(o.poll_alarm(&mut cx).is_pending());
    }

    /// A pump pass: pushes `frames` uncounted and counts them at the end, as the hub does.
    fn pass(outboxes: &[&Rc<Outbox>], frames: &[&[u8]]) -> Writers {
        let mut held = Writers::default();
        collect_wakes(&mut held, || {
            for o in outboxes {
                for f in frames {
                    let out = Out::control(Bytes::copy_from_slice(f));
                    let cost = Outbox::cost(&out);
                    if o.push_uncounted(out) {
                        let g = &o.inner.borrow().gauge;
                        g.set(g.get().wrapping_add(cost));
                    }
                }
            }
        });
        held
    }

    /// Every connection holds one outbox behind an `Rc` (16 bytes of counts): at most 112
    /// bytes keeps that allocation in mimalloc's 128-byte class (issue 12 item 4: idle memory
    /// per connection); the direct socket is one `Rc<dyn Sink>`, the limit a `u32`.
    #[test]
    fn an_outbox_fits_a_128_byte_allocation() {
        let size = std::mem::size_of::<Outbox>();
        assert!(size + 16 <= 128, "the outbox is {size} bytes");
    }

    /// A backlog goes out in writes of up to `MAX_IOV` frames, in order, whoever writes it:
    /// 1,500 frames in two writes (1,024 + 476) rather than 24 of 64.
    #[test]
    fn a_backlog_goes_out_in_writes_of_up_to_max_iov_frames() {
        let frames: Vec<Vec<u8>> = (0..1500u32)
            .map(|i| format!("<{i}>").into_bytes())
            .collect();
        let want: Vec<u8> = frames.concat();
        // The writer's path.
        let o = Outbox::new(1 << 20);
        for f in &frames {
            assert!(o.push(Out::control(Bytes::copy_from_slice(f))));
        }
        let mut wire = Vec::new();
        let mut writes = Vec::new();
        while !o.is_empty() {
            let r = o.write_with::<()>(|iov| {
                writes.push(iov.len());
                iov.iter().for_each(|s| wire.extend_from_slice(s));
                Poll::Ready(Ok(iov.iter().map(|s| s.len()).sum()))
            });
            assert!(matches!(r, Poll::Ready(Ok(_))));
        }
        assert_eq!(writes, [MAX_IOV, 1500 - MAX_IOV]);
        assert_eq!(wire, want);
        // A direct write, after a short write that ended mid-frame.
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let g = Gauge::default();
        let (o, socket) = parked(1 << 20, &g, Some(3));
        park(&o, &waker);
        let slices: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let held = pass(&[&o], &slices);
        let done = held.direct[0].write_direct();
        assert_eq!(done.written.bytes, 3, "the socket took 3 bytes");
        assert!(done.wake.is_some(), "the rest is the writer's");
        socket.room.set(Some(usize::MAX));
        let mut writes = 0;
        while !o.is_empty() {
            let r = o.write_with::<io::Error>(|iov| {
                writes += 1;
                Poll::Ready(socket.try_write_vectored(iov))
            });
            assert!(matches!(r, Poll::Ready(Ok(_))));
        }
        assert_eq!(writes, 2, "1,024 frames (the first one's rest), then 476");
        assert_eq!(*socket.wire.borrow(), want);
    }

    #[test]
    fn a_pass_writes_an_idle_writer_s_socket_itself_and_leaves_it_parked() {
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let g = Gauge::default();
        let (a, sa) = parked(100, &g, Some(1 << 20));
        let (b, sb) = parked(100, &g, Some(1 << 20));
        park(&a, &waker);
        park(&b, &waker);
        let held = pass(&[&a, &b], &[b"one", b"two", b"three"]);
        assert!(held.wakes.is_empty(), "no writer to wake");
        assert_eq!(
            held.direct.len(),
            2,
            "each outbox listed once, not per frame"
        );
        assert!(g.get() > 0);
        for o in &held.direct {
            let done = o.write_direct();
            assert!(done.wake.is_none(), "all of it went");
            assert_eq!((done.written.bytes, done.written.frames), (11, 3));
        }
        assert_eq!(*sa.wire.borrow(), b"onetwothree");
        assert_eq!(*sb.wire.borrow(), b"onetwothree");
        assert_eq!(sa.writes.get(), 1, "one vectored write per pass");
        assert_eq!(woken(&count), 0);
        assert_eq!(g.get(), 0, "what went out directly left the gauge");
        assert_eq!((a.queued_bytes(), a.frames()), (0, 0));
        // What was written directly freed the room --max-outbox-bytes bounds: the next pass
        // fits again, where without the direct write 11 + 99 bytes would overflow.
        let big = [b'x'; 99];
        let held = pass(&[&a], &[&big]);
        assert_eq!(held.direct.len(), 1);
        assert_eq!(a.state(), OutboxState::Open);
        assert!(held.direct[0].write_direct().wake.is_none());
        // The writer is still parked: a frame queued outside a pass wakes it as always.
        a.push(frame(1));
        assert_eq!(woken(&count), 1);
    }

    #[test]
    fn a_partial_direct_write_leaves_the_rest_mid_frame_for_the_writer() {
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let g = Gauge::default();
        let (o, socket) = parked(1000, &g, Some(7));
        park(&o, &waker);
        let held = pass(&[&o], &[b"[first]", b"[second]", b"[third]"]);
        let done = held.direct[0].write_direct();
        assert_eq!((done.written.bytes, done.written.frames), (7, 1));
        let w = done.wake.expect("the writer is woken for the rest");
        w.wake();
        assert_eq!(woken(&count), 1);
        // The writer continues where the direct write stopped, mid-frame: nothing lost, nothing
        // twice, in order.
        let mut wire = socket.wire.borrow().clone();
        write_in_short_writes(&o, &mut wire);
        assert_eq!(wire, b"[first][second][third]");
        assert_eq!(g.get(), 0);
    }

    #[test]
    fn a_direct_write_that_would_block_or_fails_wakes_the_writer_and_loses_nothing() {
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let g = Gauge::default();
        let (o, socket) = parked(1000, &g, None);
        park(&o, &waker);
        let held = pass(&[&o], &[b"a", b"bc"]);
        let done = held.direct[0].write_direct();
        assert_eq!(done.written, Written::default());
        assert!(
            done.wake.is_some(),
            "WouldBlock: the writer waits for the socket"
        );
        assert_eq!((o.frames(), o.queued_bytes()), (2, 3));
        assert_eq!(write_all(&o, usize::MAX).bytes, 3);
        // An error: the writer's own write sees it.
        park(&o, &waker);
        socket.room.set(Some(100));
        socket.fail.set(true);
        let held = pass(&[&o], &[b"d"]);
        let done = held.direct[0].write_direct();
        assert!(done.wake.is_some());
        assert_eq!(o.frames(), 1);
    }

    #[test]
    fn a_writer_with_something_of_its_own_in_flight_is_never_bypassed() {
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let g = Gauge::default();
        // Mid-write of a partial frame, waiting for the socket: the pass wakes it instead.
        let (o, socket) = parked(1000, &g, Some(1000));
        o.push(frame(10));
        write_all(&o, 4);
        let mut cx = Context::from_waker(&waker);
        assert!(o.poll_alarm(&mut cx).is_pending());
        let held = pass(&[&o], &[b"next"]);
        assert!(held.direct.is_empty());
        assert_eq!(held.wakes.len(), 1);
        assert_eq!(socket.writes.get(), 0);
        // Woken (by a read, say) after the pass listed it and before the direct write: its
        // task writes everything itself.
        let (o, socket) = parked(1000, &g, Some(1000));
        park(&o, &waker);
        let held = pass(&[&o], &[b"x"]);
        o.ring();
        let done = held.direct[0].write_direct();
        assert!(done.wake.is_none() && done.written.bytes == 0);
        assert_eq!(socket.writes.get(), 0);
        assert_eq!(o.frames(), 1);
        // Overflowed during the pass that listed it: the writer is woken to close it.
        let (o, socket) = parked(10, &g, Some(1000));
        park(&o, &waker);
        let held = pass(&[&o], &[b"12345", b"123456"]);
        assert_eq!(o.state(), OutboxState::Overflowed);
        assert!(held.direct[0].write_direct().wake.is_some());
        assert_eq!(socket.writes.get(), 0);
        // Without a socket to write to (TLS, SSE): the wake path, as before.
        let o = Rc::new(Outbox::new(100));
        park(&o, &waker);
        let held = pass(&[&o], &[b"y"]);
        assert!(held.direct.is_empty());
        assert_eq!(held.wakes.len(), 1);
    }

    #[test]
    fn an_emptied_outbox_keeps_no_burst_sized_buffer() {
        let o = Outbox::new(1 << 20);
        for _ in 0..1000 {
            o.push(frame(10));
        }
        while !o.is_empty() {
            write_all(&o, usize::MAX);
        }
        assert_eq!(capacity(&o), 0, "a burst's buffer is freed once written");
        // A busy connection keeps a small buffer from one write to the next...
        for _ in 0..8 {
            o.push(frame(10));
        }
        write_all(&o, usize::MAX);
        assert!(capacity(&o) >= 8);
        // ...and a single frame per write allocates nothing more...
        o.push(frame(10));
        write_all(&o, usize::MAX);
        assert!(capacity(&o) >= 8);
        // ...until the connection is idle: then the transport's idle timer may free it.
        o.release_idle();
        assert_eq!(capacity(&o), 0);
        // The same when a transport drains by copying (SSE).
        for _ in 0..1000 {
            o.push(frame(10));
        }
        o.drain_into(|_| {});
        assert_eq!(capacity(&o), 0);
    }

    #[test]
    fn an_entry_is_two_words() {
        // One per subscriber and message: at 10,000 subscribers 1,000 messages behind, each
        // byte here is 10 MB.
        assert_eq!(std::mem::size_of::<Out>(), 16);
    }

    #[test]
    fn shared_and_private_frames_go_out_whole_and_in_order() {
        use crate::types::{DataKind, Identity};
        let p = Arc::new(Publication::new(
            7,
            std::time::Instant::now(),
            DataKind::Json,
            Bytes::from_static(b"data"),
        ));
        p.frame(1, |p| Bytes::from(format!("[msg {}]", p.seq)));
        let who = Identity {
            client: "c".into(),
            user: "u".into(),
            info: None,
        };
        let e = Arc::new(PresenceEvent::new(1, 7, true, who));
        e.frame(1, |e| Bytes::from(format!("[{} {}]", e.kind(), e.who.user)));
        let o = Outbox::new(1000);
        assert!(o.push(Out::control(Bytes::from_static(b"[reply]"))));
        assert!(o.push(Out::message(p.clone(), 1, 3)));
        assert!(o.push(Out::event(e, 1)));
        assert!(o.push(Out::message(p, 1, 3)));
        assert_eq!(o.queued_bytes(), 7 + 7 + 8 + 7);
        let mut wire = Vec::new();
        // Short writes cut frames anywhere; what goes out is every frame once, in order.
        write_in_short_writes(&o, &mut wire);
        assert_eq!(wire, b"[reply][msg 7][join u][msg 7]");
        // The cursor an SSE stream keeps comes from the entry.
        let p = Arc::new(Publication::new(
            9,
            std::time::Instant::now(),
            DataKind::Json,
            Bytes::new(),
        ));
        p.frame(0, |_| Bytes::from_static(b"m"));
        o.push(Out::message(p, 0, 2));
        o.push(frame(1));
        let mut seen = Vec::new();
        o.drain_into(|out| seen.push((out.slot(), out.seq(), out.frame().to_vec())));
        assert_eq!(seen, [(2, 9, b"m".to_vec()), (NO_SLOT, 0, b"x".to_vec())]);
    }

    #[test]
    fn overflow_drops_the_queue_and_refuses_more() {
        let o = Outbox::new(100);
        assert!(o.push(frame(60)));
        assert!(!o.push(frame(60)));
        assert_eq!(o.state(), OutboxState::Overflowed);
        assert_eq!(o.queued_bytes(), 0);
        assert!(!o.push(frame(1)));
    }

    #[test]
    fn partial_writes_resume_mid_frame() {
        let o = Outbox::new(1000);
        o.push(frame(10));
        o.push(frame(10));
        let w = write_all(&o, 15);
        assert_eq!((w.bytes, w.frames), (15, 1));
        assert_eq!(o.queued_bytes(), 5);
        let w = write_all(&o, 100);
        assert_eq!((w.bytes, w.frames), (5, 1));
        assert!(o.is_empty());
    }

    #[test]
    fn the_shard_gauge_follows_what_outboxes_hold() {
        let g = Gauge::default();
        // A private frame costs its entry and its box besides its bytes.
        let per = std::mem::size_of::<Out>() + PRIVATE_BOX;
        let a = Outbox::with_gauge(1000, g.clone());
        let b = Outbox::with_gauge(1000, g.clone());
        a.push(frame(10));
        a.push(frame(20));
        b.push(frame(5));
        assert_eq!(g.get(), 35 + 3 * per);
        write_all(&a, 15);
        assert_eq!(g.get(), 20 + 5 + 2 * per, "the written frame is gone");
        b.mark_overflowed();
        assert_eq!(g.get(), 20 + per);
        // Fan-out pushes without counting, then counts the pass at once.
        let c = Rc::new(Outbox::with_gauge(1000, g.clone()));
        let out = frame(7);
        let cost = Outbox::cost(&out);
        assert!(c.push_uncounted(out));
        c.mark_overflowed();
        g.set(g.get().wrapping_add(cost));
        assert_eq!(
            g.get(),
            20 + per,
            "a drop before the pass is counted nets out"
        );
        drop(c);
        drop(a);
        assert_eq!(g.get(), 0, "a closed connection gives it all back");
    }

    #[test]
    fn close_keeps_a_partly_written_frame() {
        let o = Outbox::new(1000);
        o.push(frame(10));
        o.push(frame(10));
        write_all(&o, 4);
        o.close_with(Bytes::from_static(b"close"), false);
        let w = write_all(&o, 100);
        assert_eq!(w.bytes, 6 + 5);
        assert!(w.finished);
        assert!(!o.push(frame(1)));
    }

    #[test]
    fn a_run_counts_its_messages_goes_out_whole_and_reads_one_by_one_unjoined() {
        use crate::types::DataKind;
        let pubs: Vec<Arc<Publication>> = (1..=3)
            .map(|seq| {
                let p =
                    Publication::new(seq, std::time::Instant::now(), DataKind::Json, Bytes::new());
                p.frame(0, |p| Bytes::from(format!("[{}]", p.seq)));
                Arc::new(p)
            })
            .collect();
        let run = |joined: &'static [u8]| Out::Run {
            r: Arc::new(Run::new(
                pubs.clone().into(),
                0,
                Bytes::from_static(joined),
                None,
            )),
            slot: 4,
        };
        let o = Outbox::new(1000);
        assert!(o.push(Out::control(Bytes::from_static(b"<r>"))));
        assert!(o.push(run(b"[1][2][3]")));
        assert_eq!((o.frames(), o.messages(), o.queued_bytes()), (2, 4, 3 + 9));
        let mut wire = Vec::new();
        write_in_short_writes(&o, &mut wire);
        assert_eq!(
            wire, b"<r>[1][2][3]",
            "whole, in order, across short writes"
        );
        // One write of it all: four frames on the wire (relay_frames_per_write).
        let o = Outbox::new(1000);
        assert!(o.push(Out::control(Bytes::from_static(b"<r>"))));
        assert!(o.push(run(b"[1][2][3]")));
        let w = o.write_with::<()>(|iov| Poll::Ready(Ok(iov.iter().map(|s| s.len()).sum())));
        match w {
            Poll::Ready(Ok(w)) => assert_eq!((w.bytes, w.frames), (12, 4)),
            other => panic!("{other:?}"),
        }
        // Not joined (SSE): its messages count against the limit all the same, and are read
        // one by one with their seqs.
        let small = Outbox::new(8);
        assert!(!small.push(run(b"")), "9 bytes of frames do not fit in 8");
        assert_eq!(small.state(), OutboxState::Overflowed);
        let o = Outbox::new(1000);
        assert!(o.push(run(b"")));
        assert_eq!(o.queued_bytes(), 9);
        let mut seen = Vec::new();
        let n = o.drain_into(|out| {
            out.each(|seq, f| seen.push((out.slot(), seq, String::from_utf8_lossy(f).into_owned())))
        });
        assert_eq!(n, 3, "three frames drained (relay_frames_per_write)");
        assert_eq!(
            seen,
            [
                (4, 1, "[1]".into()),
                (4, 2, "[2]".into()),
                (4, 3, "[3]".into())
            ]
        );
        assert_eq!(o.queued_bytes(), 0);
    }
}
