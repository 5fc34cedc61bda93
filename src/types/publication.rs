//! What the engine shares with the encoders: a publication, a presence event and who it names,
//! and the [`Encoder`] the hub calls to build each frame once per encoding. They sit below both
//! `engine` and `protocol` so that neither imports the other.

use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::{ChannelName, DataKind, Epoch};

/// How many encodings of one publication can be cached (see [`Publication::frame`]).
pub const FRAME_SLOTS: usize = 6;

/// Bytes a ring entry costs besides its payload (the publication, its `Arc`, its ring slot).
pub const ENTRY_OVERHEAD: usize = std::mem::size_of::<Publication>() + 24;

/// Bytes an event costs besides the identity it names.
pub const EVENT_OVERHEAD: usize = std::mem::size_of::<PresenceEvent>() + 32;

/// One published message, shared by reference between the ring, every shard and every outbox.
pub struct Publication {
    /// Sequence ID in its channel.
    pub seq: u64,
    /// When it was published (for the history TTL).
    pub at: Instant,
    /// What the payload is.
    pub kind: DataKind,
    /// The payload as published.
    pub data: Bytes,
    /// The channel's running total of [`Publication::cost`] up to and including this one
    /// (the byte windows of the ring are found by binary search on it).
    pub(crate) cum: u64,
    frames: Frames,
    /// Where its frames are counted (the node's meter); `None` for publications built outside
    /// an engine (benches, tests), whose frames outboxes count themselves.
    pub(crate) gauge: Option<FrameGauge>,
}

impl Publication {
    /// Creates a publication; exposed for benches and tests.
    pub fn new(seq: u64, at: Instant, kind: DataKind, data: Bytes) -> Self {
        Self {
            seq,
            at,
            kind,
            data,
            cum: 0,
            frames: Default::default(),
            gauge: None,
        }
    }

    /// The encoded frame for `slot`, built by `encode` the first time any shard asks and shared
    /// by everyone after: a message is encoded once per encoding, never per subscriber.
    pub fn frame(&self, slot: usize, encode: impl FnOnce(&Publication) -> Bytes) -> Bytes {
        self.frames.get_or_build(slot, || match &self.gauge {
            Some(g) => g.count(encode(self)),
            None => encode(self),
        })
    }

    /// The frame [`Publication::frame`] built for `slot`, or nothing if none was built yet: what
    /// an outbox entry, which holds the publication rather than a copy of the frame's handle,
    /// writes.
    pub fn built_frame(&self, slot: usize) -> &[u8] {
        self.frames.get(slot).map_or(&[], |b| &b[..])
    }

    /// Whether its frames are counted in the node's meter (then an outbox counts only its
    /// entry for one, see [`FrameGauge`]).
    pub fn counts_frames(&self) -> bool {
        self.gauge.is_some()
    }

    /// What it costs in a ring: its payload plus [`ENTRY_OVERHEAD`].
    pub fn cost(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD
    }

    /// The running total before this one.
    pub(crate) fn cum_before(&self) -> u64 {
        self.cum - self.cost() as u64
    }
}

/// The frames of one publication or presence event, by encoding slot, each built once. A node
/// builds one or two encodings of a message (its clients' protocols), so the first slot asked
/// for keeps its frame inline and the others theirs in a table allocated when a second slot is
/// asked for: 64 bytes in every ring entry instead of 240 for six inline slots (a `Publication`
/// is 144 bytes, not 320, and [`ENTRY_OVERHEAD`] 168, not 344). Building one slot may ask for
/// another (the compressed frame is made from the plain one): each slot has its own cell, so
/// that never waits on the cell being built.
struct Frames {
    /// The slot that owns `first` ([`NO_FRAME`] until one is asked for).
    first_slot: AtomicU8,
    /// The frame of `first_slot`.
    first: OnceLock<Bytes>,
    /// The frames of the other slots.
    rest: OnceLock<Box<[OnceLock<Bytes>; FRAME_SLOTS]>>,
}

/// `Frames::first_slot` before any slot is asked for.
const NO_FRAME: u8 = u8::MAX;

impl Default for Frames {
    fn default() -> Self {
        Self {
            first_slot: AtomicU8::new(NO_FRAME),
            first: OnceLock::new(),
            rest: OnceLock::new(),
        }
    }
}

impl Frames {
    /// The frame of `slot`, built by `build` the first time any thread asks for that slot
    /// (one asking meanwhile waits for it).
    fn get_or_build(&self, slot: usize, build: impl FnOnce() -> Bytes) -> Bytes {
        let slot = slot % FRAME_SLOTS;
        let tag = slot as u8;
        let owns_first = match self.first_slot.compare_exchange(
            NO_FRAME,
            tag,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => true,
            Err(owner) => owner == tag,
        };
        let cell = if owns_first {
            &self.first
        } else {
            &self.rest.get_or_init(Box::default)[slot]
        };
        cell.get_or_init(build).clone()
    }

    /// The frame built for `slot`, if any.
    fn get(&self, slot: usize) -> Option<&Bytes> {
        let slot = slot % FRAME_SLOTS;
        if self.first_slot.load(Ordering::Acquire) == slot as u8 {
            self.first.get()
        } else {
            self.rest.get()?[slot].get()
        }
    }
}

/// Who a member is.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The connection's id (unique per node).
    pub client: Arc<str>,
    /// The user id; a connection without one is a user of its own (its client id).
    pub user: Arc<str>,
    /// Optional info (raw JSON object).
    pub info: Option<Bytes>,
}

/// A presence change, shared like a publication.
pub struct PresenceEvent {
    /// Position in the channel's presence sequence (shard cursors).
    pub pseq: u64,
    /// The channel's message seq when it happened.
    pub seq: u64,
    /// `true` for join, `false` for leave.
    pub join: bool,
    /// Who.
    pub who: Identity,
    /// When it happened, in engine milliseconds (the engine's event ring drops it after
    /// `engine::presence::EVENT_MAX_AGE_MS`).
    pub at_ms: u64,
    frames: Frames,
}

impl PresenceEvent {
    /// A new event; exposed for benches and tests.
    pub fn new(pseq: u64, seq: u64, join: bool, who: Identity) -> Self {
        Self {
            pseq,
            seq,
            join,
            who,
            at_ms: 0,
            frames: Default::default(),
        }
    }

    pub(crate) fn cost(&self) -> usize {
        EVENT_OVERHEAD + identity_len(&self.who)
    }

    /// The encoded frame for `slot`, built once (see `Publication::frame`).
    pub fn frame(&self, slot: usize, encode: impl FnOnce(&PresenceEvent) -> Bytes) -> Bytes {
        self.frames.get_or_build(slot, || encode(self))
    }

    /// The frame [`PresenceEvent::frame`] built for `slot`, or nothing if none was built yet.
    pub fn built_frame(&self, slot: usize) -> &[u8] {
        self.frames.get(slot).map_or(&[], |b| &b[..])
    }

    /// `"join"` or `"leave"`.
    pub fn kind(&self) -> &'static str {
        if self.join {
            "join"
        } else {
            "leave"
        }
    }
}

/// Bytes of an identity's ids and info.
pub(crate) fn identity_len(who: &Identity) -> usize {
    who.client.len() + who.user.len() + who.info.as_ref().map_or(0, Bytes::len)
}

/// Builds frames for one encoding (an index below [`FRAME_SLOTS`]). The hub calls each at most
/// once per publication (or presence event) and encoding, whatever the number of subscribers.
#[derive(Clone, Copy)]
pub struct Encoder {
    /// A message.
    pub publication: fn(encoding: usize, channel: &ChannelName, p: &Publication) -> Bytes,
    /// A presence join or leave.
    pub presence: fn(encoding: usize, channel: &ChannelName, e: &PresenceEvent) -> Bytes,
    /// A gap notice: the subscriber missed messages `from..=to` (slow-consumer `drop` policy).
    pub gap: fn(encoding: usize, channel: &ChannelName, from: u64, to: u64) -> Bytes,
    /// The tag of the connection a publication came from, 0 for none (read once per
    /// publication, and only when a subscriber of the channel has a tag): a subscriber with
    /// that tag (the hub's `Subscriber::tag`) does not receive it.
    pub origin: fn(p: &Publication) -> u64,
    /// The encodings (bit `1 << encoding`) whose frames go to the wire back to back, unchanged:
    /// a pass that carries several messages of a channel may queue them for a subscriber in
    /// one of these as one entry (`outbox::Run`). Not SSE, whose stream writes each message's
    /// `id:` cursor before it.
    pub joinable: u8,
    /// The encodings (bit `1 << encoding`) whose stream writes a stamp of its own before each
    /// message (SSE: the `id:` line, the stream's cursor): a run in one of these is joined
    /// too, each frame after the stamp [`Encoder::stamp`] writes for a stream of that channel
    /// alone, which such a stream (one channel, at that epoch) writes as it is.
    pub stamped: u8,
    /// Appends the stamp of message `seq` of a channel at `epoch`, for a stream of that
    /// channel alone.
    pub stamp: fn(epoch: Epoch, seq: u64, out: &mut BytesMut),
}

/// Bytes of encoded message frames alive on the node. A frame is encoded once and shared by
/// the channel ring and every outbox that queued it: it is counted here once, from its
/// encoding until its last clone is dropped, and an outbox counts only its entry for it (so a
/// message queued for 10,000 slow connections weighs its frame once, not 10,000 times).
#[derive(Clone, Default)]
pub struct FrameGauge(Arc<AtomicI64>);

impl FrameGauge {
    /// `frame`, counted for as long as any clone of it lives (one atomic add now and one when
    /// the last clone goes: per frame, never per delivery).
    pub fn count(&self, frame: Bytes) -> Bytes {
        if frame.is_empty() {
            return frame;
        }
        self.0.fetch_add(frame.len() as i64, Ordering::Relaxed);
        Bytes::from_owner(Counted {
            frame,
            gauge: self.clone(),
        })
    }

    /// Bytes of the counted frames alive now.
    pub fn bytes(&self) -> usize {
        self.0.load(Ordering::Relaxed).max(0) as usize
    }
}

/// The owner behind a counted frame: uncounts it when the last clone is dropped.
struct Counted {
    frame: Bytes,
    gauge: FrameGauge,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge
            .0
            .fetch_sub(self.frame.len() as i64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_slot_is_built_once_and_kept_whichever_slot_comes_first() {
        let p = Publication::new(1, Instant::now(), DataKind::Json, Bytes::from_static(b"{}"));
        let builds = std::cell::Cell::new(0);
        let build = |tag: &'static [u8]| {
            builds.set(builds.get() + 1);
            Bytes::from_static(tag)
        };
        assert_eq!(p.built_frame(3), b"");
        assert_eq!(&p.frame(3, |_| build(b"three"))[..], b"three");
        assert_eq!(&p.frame(3, |_| build(b"again"))[..], b"three");
        assert_eq!(
            p.built_frame(0),
            b"",
            "another slot is not the first one's frame"
        );
        assert_eq!(&p.frame(0, |_| build(b"zero"))[..], b"zero");
        assert_eq!(&p.frame(FRAME_SLOTS, |_| build(b"again"))[..], b"zero");
        assert_eq!(&p.frame(5, |_| build(b"five"))[..], b"five");
        assert_eq!(builds.get(), 3, "one build per slot");
        // Building a slot may ask for another, as the compressed frame asks for the plain one,
        // including while the first slot is being built.
        let q = Publication::new(2, Instant::now(), DataKind::Json, Bytes::from_static(b"{}"));
        let outer = q.frame(4, |q| {
            let inner = q.frame(1, |_| Bytes::from_static(b"plain"));
            Bytes::from([&b"z:"[..], &inner[..]].concat())
        });
        assert_eq!(&outer[..], b"z:plain");
        assert_eq!(
            (q.built_frame(4), q.built_frame(1)),
            (&b"z:plain"[..], &b"plain"[..])
        );
        assert_eq!(
            (
                p.built_frame(3),
                p.built_frame(0),
                p.built_frame(5),
                p.built_frame(1)
            ),
            (&b"three"[..], &b"zero"[..], &b"five"[..], &b""[..])
        );
        assert!(
            std::mem::size_of::<Publication>() <= 160,
            "a ring entry stays small: {} bytes",
            std::mem::size_of::<Publication>()
        );
    }
}
