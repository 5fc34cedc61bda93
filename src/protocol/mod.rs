//! Wire formats, sans-IO: nothing here names a socket, a runtime or hyper.
//!
//! - [`ws`]: RFC 6455 frame decoding and encoding.
//! - [`json`]: the JSON protocol (`relay.v1.json`, the default).
//! - [`binary`]: the binary protocol (`relay.v1.bin`).
//! - [`sse`]: Server-Sent Events formatting and the resume cursor.
//! - [`deflate`]: permessage-deflate (RFC 7692), one message at a time.
//! - [`pusher`]: the Pusher Channels protocol (apps, messages, signatures, the mapping to relay).
//!
//! Both WebSocket protocols carry the same [`Command`]s in and [`Event`]s out; a transport picks
//! a [`Wire`] per connection and never looks inside a codec.

pub mod binary;
pub mod codes;
pub mod deflate;
pub mod json;
pub mod pusher;
pub mod sse;
pub mod ws;

use std::borrow::Cow;

use bytes::Bytes;

use crate::types::{ChannelName, Encoder, Identity, PresenceEvent, Publication, StreamPosition};

pub use crate::types::{MAX_INFO_LEN, MAX_USER_LEN};

/// Frame-cache slot (and hub encoding) of JSON WebSocket subscribers.
pub const ENC_WS_JSON: usize = 0;
/// Frame-cache slot of SSE subscribers (the event body after its `id:` line).
pub const ENC_SSE: usize = 1;
/// Frame-cache slot of binary WebSocket subscribers.
pub const ENC_WS_BIN: usize = 2;
/// Frame-cache slot of JSON WebSocket subscribers with permessage-deflate: the JSON frame
/// compressed once (or the JSON frame itself when it is under `--deflate-min-size`).
pub const ENC_WS_JSON_DEFLATE: usize = 3;
/// The same for binary WebSocket subscribers.
pub const ENC_WS_BIN_DEFLATE: usize = 4;
/// Frame-cache slot of Pusher subscribers (`/app/KEY`).
pub const ENC_PUSHER: usize = 5;

/// A command's request id, echoed in its reply in the same protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqId<'a> {
    /// A JSON id: the raw JSON value (number or string) as sent.
    Json(&'a str),
    /// A binary id.
    Num(u64),
}

/// A [`ReqId`] that owns its text, for replies sent after the frame is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedReqId {
    /// A JSON id.
    Json(Box<str>),
    /// A binary id.
    Num(u64),
}

impl ReqId<'_> {
    /// An owned copy.
    pub fn to_owned_id(&self) -> OwnedReqId {
        match *self {
            ReqId::Json(s) => OwnedReqId::Json(s.into()),
            ReqId::Num(n) => OwnedReqId::Num(n),
        }
    }
}

impl OwnedReqId {
    /// Borrows it back.
    pub fn as_req_id(&self) -> ReqId<'_> {
        match self {
            OwnedReqId::Json(s) => ReqId::Json(s),
            OwnedReqId::Num(n) => ReqId::Num(*n),
        }
    }
}

/// A payload as a client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    /// Raw JSON text (a JSON client's `data`).
    Json(&'a str),
    /// Opaque bytes (a binary client's payload).
    Bytes(&'a [u8]),
}

/// What a publish may require: see `engine::idempotency::PublishConditions`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishIf<'a> {
    /// A repeat within the window publishes nothing and answers the first seq.
    pub idempotency_key: Option<Cow<'a, str>>,
    /// Publish only when the channel's top seq is this.
    pub expected_seq: Option<u64>,
}

/// A client command, borrowed from its frame.
#[derive(Debug)]
pub enum Command<'a> {
    /// Subscribe, resuming from a position when given.
    Subscribe {
        /// The channel.
        channel: ChannelName,
        /// Where the client left off (`since` + `epoch`).
        resume: Option<StreamPosition>,
        /// Identity the client claims for presence (allowed by `--client-presence`).
        presence: Option<ClientPresence<'a>>,
    },
    /// Unsubscribe.
    Unsubscribe {
        /// The channel.
        channel: ChannelName,
    },
    /// Publish to a channel.
    Publish {
        /// The channel.
        channel: ChannelName,
        /// The payload.
        data: Payload<'a>,
        /// Its conditions.
        cond: PublishIf<'a>,
    },
    /// Heartbeat (answered with a heartbeat).
    Heartbeat,
    /// Presence query: the channel's current members, one page at a time.
    Presence {
        /// The channel.
        channel: ChannelName,
        /// Which page.
        page: Page<'a>,
    },
    /// Authenticate a connection opened without `?token=` (JSON protocol).
    Auth {
        /// The JWT.
        token: Cow<'a, str>,
    },
    /// Replace the connection's token before (or soon after) it expires (JSON protocol).
    Refresh {
        /// The new JWT, for the same subject.
        token: Cow<'a, str>,
    },
}

/// Which page of a listing a command asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page<'a> {
    /// Most items (the server caps it); `None`: the default.
    pub limit: Option<u64>,
    /// Where the previous page ended (its `next`); `None`: the first page.
    pub cursor: Option<Cow<'a, str>>,
}

/// A presence identity given in a subscribe command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientPresence<'a> {
    /// User id (1..=256 bytes).
    pub user: Option<Cow<'a, str>>,
    /// Info: a raw JSON object (at most 4 KiB).
    pub info: Option<&'a str>,
}

/// A command and its optional id.
#[derive(Debug)]
pub struct Request<'a> {
    /// The client's id, echoed in the reply.
    pub id: Option<ReqId<'a>>,
    /// The command.
    pub command: Command<'a>,
}

/// A command that could not be decoded; answered with an `error` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError<'a> {
    /// The id, when it could be read.
    pub id: Option<ReqId<'a>>,
    /// Machine-readable code (`bad_json`, `unknown_type`, `bad_request`, `invalid_channel`, …).
    pub code: &'static str,
    /// Human text.
    pub message: Cow<'static, str>,
}

/// A server event other than `message` (messages are encoded once per publication, see
/// [`encode_publication`]).
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// Reply to subscribe.
    Subscribed {
        /// The channel.
        channel: &'a ChannelName,
        /// Its current position.
        position: StreamPosition,
        /// Whether the resume succeeded.
        recovered: bool,
        /// Why a resume failed (`epoch_changed`, `history_expired`, `evicted`); `None` when
        /// none was asked for or it succeeded.
        reason: Option<&'a str>,
    },
    /// Reply to publish.
    Published {
        /// The channel.
        channel: &'a ChannelName,
        /// The message's position.
        position: StreamPosition,
    },
    /// Reply to unsubscribe.
    Unsubscribed {
        /// The channel.
        channel: &'a ChannelName,
    },
    /// Reply to heartbeat.
    Heartbeat,
    /// Reply to a presence query.
    PresenceState {
        /// The channel.
        channel: &'a ChannelName,
        /// The channel's message seq.
        seq: u64,
        /// The members of this page.
        members: &'a [Identity],
        /// The cursor of the next page, when there is more.
        next: Option<&'a str>,
    },
    /// A refused command.
    Error {
        /// Machine-readable code.
        code: &'a str,
        /// Human text.
        message: &'a str,
    },
}

/// The protocol spoken on one WebSocket connection, chosen by subprotocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// `relay.v1.json`: JSON text frames (the default).
    Json,
    /// `relay.v1.bin`: binary frames.
    Binary,
}

impl Wire {
    /// The `Sec-WebSocket-Protocol` name.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Wire::Json => "relay.v1.json",
            Wire::Binary => "relay.v1.bin",
        }
    }

    /// The frame-cache slot of this protocol's `message` frames.
    pub fn message_encoding(self) -> usize {
        match self {
            Wire::Json => ENC_WS_JSON,
            Wire::Binary => ENC_WS_BIN,
        }
    }

    /// [`Wire::message_encoding`] of a connection that negotiated permessage-deflate (`deflate`).
    pub fn message_encoding_with(self, deflate: bool) -> usize {
        match (self, deflate) {
            (Wire::Json, true) => ENC_WS_JSON_DEFLATE,
            (Wire::Binary, true) => ENC_WS_BIN_DEFLATE,
            (wire, false) => wire.message_encoding(),
        }
    }

    /// A complete WebSocket frame carrying `event`.
    pub fn encode(self, id: Option<ReqId<'_>>, event: &Event<'_>) -> Bytes {
        match self {
            Wire::Json => json::encode_event(id, event),
            Wire::Binary => binary::encode_event(id, event),
        }
    }
}

/// The hub's encoder: builds the frame of `p` for `encoding`, once per publication.
pub fn encode_publication(encoding: usize, channel: &ChannelName, p: &Publication) -> Bytes {
    match encoding {
        ENC_WS_JSON_DEFLATE | ENC_WS_BIN_DEFLATE => {
            // Built from the plain frame (cached in its own slot, shared when not compressed).
            let plain = if encoding == ENC_WS_BIN_DEFLATE {
                ENC_WS_BIN
            } else {
                ENC_WS_JSON
            };
            deflate::frame_of(p.frame(plain, |p| encode_publication(plain, channel, p)))
        }
        ENC_SSE => sse::message(channel, p.seq, p.kind, &p.data),
        ENC_WS_BIN => binary::message(channel, p.seq, p.kind, &p.data),
        ENC_PUSHER => pusher::message(channel, p),
        _ => json::message(channel, p.seq, p.kind, &p.data),
    }
}

/// The hub's encoder for presence events, once per event and encoding.
pub fn encode_presence(encoding: usize, channel: &ChannelName, e: &PresenceEvent) -> Bytes {
    // Presence events and gap notices are small: deflate connections get them plain.
    match encoding {
        ENC_SSE => sse::presence(channel, e),
        ENC_WS_BIN | ENC_WS_BIN_DEFLATE => binary::presence(channel, e),
        ENC_PUSHER => pusher::presence(channel, e),
        _ => json::presence(channel, e),
    }
}

/// The hub's encoder for gap notices (slow-consumer `drop` policy).
pub fn encode_gap(encoding: usize, channel: &ChannelName, from: u64, to: u64) -> Bytes {
    match encoding {
        ENC_SSE => sse::dropped(channel, from, to),
        ENC_WS_BIN | ENC_WS_BIN_DEFLATE => binary::gap(channel, from, to),
        ENC_PUSHER => pusher::gap(channel, from, to),
        _ => json::gap(channel, from, to),
    }
}

/// The encoders, for the hub.
pub const ENCODER: Encoder = Encoder {
    publication: encode_publication,
    presence: encode_presence,
    gap: encode_gap,
    origin: pusher::origin,
    joinable: JOINABLE,
    stamped: 1 << ENC_SSE,
    stamp: sse::stamp,
};

/// Every WebSocket encoding: its frames are written as built, one after the other (an SSE
/// stream writes an `id:` line before each message's frame).
const JOINABLE: u8 = 1 << ENC_WS_JSON
    | 1 << ENC_WS_BIN
    | 1 << ENC_WS_JSON_DEFLATE
    | 1 << ENC_WS_BIN_DEFLATE
    | 1 << ENC_PUSHER;
