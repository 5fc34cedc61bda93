//! The binary protocol (`relay.v1.bin`), sans-IO. One WebSocket binary message holds one frame:
//!
//! ```text
//! version:u8 = 1 | type:u8 | flags:u8 | [id:varint] | fields of the type … | [payload: the rest]
//! ```
//!
//! - A 3-byte fixed header, then the variable parts in a fixed order per type. Varints are
//!   unsigned LEB128 (as in protobuf), at most 10 bytes and minimal (no trailing `0x00` group),
//!   so that every frame has exactly one encoding. A channel is a 1-byte length and its bytes;
//!   an epoch is 8 bytes big-endian (it is random, so a varint would not pay); a payload is the
//!   rest of the message (the WebSocket frame already delimits it).
//! - Type tags with the high bit clear are commands (client → server), with it set events.
//! - Decoding never guesses: an unknown version, type tag or flag, a truncated field, a length
//!   past the end, a malformed varint, an oversize or invalid channel and trailing bytes are each
//!   a [`DecodeError`] naming the broken rule.
//! - Decoding borrows: [`decode`] returns a [`Frame`] whose channel, payload and texts are slices
//!   of the input; nothing is copied or allocated.
//!
//! `docs/protocol.md` has the byte tables and worked hex examples.

use std::borrow::Cow;

use bytes::{BufMut, Bytes};

use super::{
    json, ws, ClientPresence, Command, CommandError, Event, Payload, ReqId, Request, MAX_INFO_LEN,
    MAX_USER_LEN,
};
use crate::types::{
    ChannelName, ChannelNameError, DataKind, Epoch, Identity, PresenceEvent, StreamPosition,
    MAX_CHANNEL_LEN,
};

/// Whether transports may negotiate `relay.v1.bin`.
pub const AVAILABLE: bool = true;

/// The protocol version carried in the first byte of every frame.
pub const VERSION: u8 = 1;

/// Length of the fixed header: version, type, flags.
pub const HEADER_LEN: usize = 3;

/// Longest varint: 10 bytes hold 64 bits.
pub const MAX_VARINT_LEN: usize = 10;

/// Longest presence page cursor (a client id; servers send 16 hex digits).
pub const MAX_CURSOR_LEN: usize = 256;

/// Longest idempotency key a publish frame may carry (the engine's limit).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = crate::types::MAX_IDEMPOTENCY_KEY_LEN;

/// Type tags (second byte). Commands are `0x01..=0x05`, events `0x81..=0x89`.
pub mod tag {
    /// Command: subscribe to a channel, maybe resuming.
    pub const SUBSCRIBE: u8 = 0x01;
    /// Command: unsubscribe from a channel.
    pub const UNSUBSCRIBE: u8 = 0x02;
    /// Command: publish a payload to a channel.
    pub const PUBLISH: u8 = 0x03;
    /// Command: heartbeat.
    pub const HEARTBEAT: u8 = 0x04;
    /// Command: presence query.
    pub const PRESENCE: u8 = 0x05;
    /// Event: reply to subscribe.
    pub const SUBSCRIBED: u8 = 0x81;
    /// Event: reply to unsubscribe.
    pub const UNSUBSCRIBED: u8 = 0x82;
    /// Event: reply to publish.
    pub const PUBLISHED: u8 = 0x83;
    /// Event: reply to heartbeat.
    pub const HEARTBEAT_REPLY: u8 = 0x84;
    /// Event: a message of a subscribed channel.
    pub const MESSAGE: u8 = 0x85;
    /// Event: a refused command.
    pub const ERROR: u8 = 0x86;
    /// Event: reply to a presence query.
    pub const PRESENCE_STATE: u8 = 0x87;
    /// Event: a user joined or left a subscribed channel.
    pub const PRESENCE_EVENT: u8 = 0x88;
    /// Event: messages this subscriber missed (slow consumer under the `drop` policy).
    pub const GAP: u8 = 0x89;

    /// The name of a tag (its JSON `type`), for error messages.
    pub fn name(tag: u8) -> Option<&'static str> {
        Some(match tag {
            SUBSCRIBE => "subscribe",
            UNSUBSCRIBE => "unsubscribe",
            PUBLISH => "publish",
            HEARTBEAT | HEARTBEAT_REPLY => "heartbeat",
            PRESENCE => "presence",
            SUBSCRIBED => "subscribed",
            UNSUBSCRIBED => "unsubscribed",
            PUBLISHED => "published",
            MESSAGE => "message",
            ERROR => "error",
            PRESENCE_STATE => "presence_state",
            PRESENCE_EVENT => "presence",
            GAP => "gap",
            _ => return None,
        })
    }
}

/// Flag bits (third byte). Each type allows only some of them; any other bit is an error.
pub mod flag {
    /// A request id (varint) follows the header. Every type but the `message`, `presence` and
    /// `gap` events.
    pub const ID: u8 = 0x01;
    /// `subscribe`: an epoch and the last seq seen follow the channel (resume).
    pub const RESUME: u8 = 0x02;
    /// `subscribed`: the resume succeeded (the JSON `recovered:true`).
    pub const RECOVERED: u8 = 0x04;
    /// `message`: the payload is JSON text (published by a JSON or HTTP client).
    pub const JSON: u8 = 0x08;
    /// `subscribe`: a presence identity (user, info) follows.
    pub const PRESENCE: u8 = 0x10;
    /// `presence` event: a join (clear: a leave).
    pub const JOIN: u8 = 0x20;
    /// `presence` command: a page is asked for (a limit and a cursor follow the channel).
    pub const PAGE: u8 = 0x40;
    /// `presence_state`: more members follow; the cursor of the next page follows the members.
    pub const MORE: u8 = 0x40;
    /// `publish`: an idempotency key (text) follows the channel.
    pub const IDEMPOTENCY_KEY: u8 = 0x02;
    /// `publish`: the expected top seq (varint) follows the channel (and the key).
    pub const EXPECTED_SEQ: u8 = 0x04;

    /// The flags `tag` allows.
    pub(super) fn allowed(tag: u8) -> u8 {
        use super::tag;
        match tag {
            tag::SUBSCRIBE => ID | RESUME | PRESENCE,
            tag::SUBSCRIBED => ID | RECOVERED,
            tag::MESSAGE => JSON,
            tag::PRESENCE_EVENT => JOIN,
            tag::PRESENCE => ID | PAGE,
            tag::PRESENCE_STATE => ID | MORE,
            tag::PUBLISH => ID | IDEMPOTENCY_KEY | EXPECTED_SEQ,
            tag::GAP => 0,
            _ => ID,
        }
    }
}

/// One binary frame, borrowed from the bytes it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The request id (flag [`flag::ID`]); never written on `message`, `presence` and `gap` events.
    pub id: Option<u64>,
    /// The type and its fields.
    pub body: Body<'a>,
}

/// The presence identity a client claims when subscribing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceClaim<'a> {
    /// User id (at most [`MAX_USER_LEN`] bytes; empty on the wire means none).
    pub user: Option<&'a str>,
    /// Info: JSON object text (at most [`MAX_INFO_LEN`] bytes; empty on the wire means none).
    pub info: Option<&'a str>,
}

/// One presence member: its connection, its user and optional info (JSON object text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    /// The connection's id.
    pub client: &'a str,
    /// The user id.
    pub user: &'a str,
    /// Info, JSON object text.
    pub info: Option<&'a str>,
}

/// The encoded member list of a `presence_state` frame: `count` members back to back. Decoding
/// checks every member, so [`Members::iter`] yields exactly `count` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Members<'a> {
    /// How many members.
    pub count: u64,
    /// Their encoding.
    pub bytes: &'a [u8],
}

impl<'a> Members<'a> {
    /// The members, in order.
    pub fn iter(&self) -> impl Iterator<Item = Member<'a>> {
        let mut r = Reader {
            buf: self.bytes,
            pos: 0,
        };
        (0..self.count).map_while(move |_| r.member().ok())
    }
}

/// The type of a frame and its fields. Channels are valid channel names (1 to 200 bytes of the
/// allowed set) when decoded; the encoder writes at most 255 bytes of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// `0x01` subscribe, resuming from a position with [`flag::RESUME`], claiming a presence
    /// identity with [`flag::PRESENCE`].
    Subscribe {
        /// The channel.
        channel: &'a str,
        /// The last position seen.
        resume: Option<StreamPosition>,
        /// The presence identity.
        presence: Option<PresenceClaim<'a>>,
    },
    /// `0x02` unsubscribe.
    Unsubscribe {
        /// The channel.
        channel: &'a str,
    },
    /// `0x03` publish: any bytes, with an idempotency key ([`flag::IDEMPOTENCY_KEY`]) and an
    /// expected top seq ([`flag::EXPECTED_SEQ`]) when given.
    Publish {
        /// The channel.
        channel: &'a str,
        /// A repeat within the idempotency window publishes nothing.
        idempotency_key: Option<&'a str>,
        /// Publish only when the channel's top seq is this.
        expected_seq: Option<u64>,
        /// The payload.
        payload: &'a [u8],
    },
    /// `0x04` heartbeat (command).
    Heartbeat,
    /// `0x05` presence query; a page of it with [`flag::PAGE`].
    Presence {
        /// The channel.
        channel: &'a str,
        /// The most members wanted and the cursor to continue from (empty: the first page).
        page: Option<(u64, &'a str)>,
    },
    /// `0x81` subscribed.
    Subscribed {
        /// The channel.
        channel: &'a str,
        /// The channel's position when subscribing.
        position: StreamPosition,
        /// Whether the resume succeeded.
        recovered: bool,
    },
    /// `0x82` unsubscribed.
    Unsubscribed {
        /// The channel.
        channel: &'a str,
    },
    /// `0x83` published.
    Published {
        /// The channel.
        channel: &'a str,
        /// The position given to the message.
        position: StreamPosition,
    },
    /// `0x84` heartbeat (reply).
    HeartbeatReply,
    /// `0x85` message.
    Message {
        /// The channel.
        channel: &'a str,
        /// The message's seq.
        seq: u64,
        /// Whether the payload is JSON text ([`flag::JSON`]).
        json: bool,
        /// The payload.
        payload: &'a [u8],
    },
    /// `0x86` error.
    Error {
        /// Machine-readable code (at most 255 bytes).
        code: &'a str,
        /// Human text (UTF-8).
        message: &'a str,
    },
    /// `0x87` presence state: the members of a channel.
    PresenceState {
        /// The channel.
        channel: &'a str,
        /// The channel's message seq.
        seq: u64,
        /// The members.
        members: Members<'a>,
        /// With [`flag::MORE`]: the cursor of the next page.
        next: Option<&'a str>,
    },
    /// `0x88` presence event: a join ([`flag::JOIN`]) or a leave.
    PresenceEvent {
        /// The channel.
        channel: &'a str,
        /// The channel's message seq when it happened.
        seq: u64,
        /// Join or leave.
        join: bool,
        /// Who.
        member: Member<'a>,
    },
    /// `0x89` gap: this subscriber missed the messages `from..=to` of the channel (slow consumer
    /// under the `drop` policy); they can be fetched from history.
    Gap {
        /// The channel.
        channel: &'a str,
        /// First missed seq.
        from: u64,
        /// Last missed seq.
        to: u64,
    },
}

impl Body<'_> {
    /// The type tag of this body.
    pub fn tag(&self) -> u8 {
        match self {
            Body::Subscribe { .. } => tag::SUBSCRIBE,
            Body::Unsubscribe { .. } => tag::UNSUBSCRIBE,
            Body::Publish { .. } => tag::PUBLISH,
            Body::Heartbeat => tag::HEARTBEAT,
            Body::Presence { .. } => tag::PRESENCE,
            Body::Subscribed { .. } => tag::SUBSCRIBED,
            Body::Unsubscribed { .. } => tag::UNSUBSCRIBED,
            Body::Published { .. } => tag::PUBLISHED,
            Body::HeartbeatReply => tag::HEARTBEAT_REPLY,
            Body::Message { .. } => tag::MESSAGE,
            Body::Error { .. } => tag::ERROR,
            Body::PresenceState { .. } => tag::PRESENCE_STATE,
            Body::PresenceEvent { .. } => tag::PRESENCE_EVENT,
            Body::Gap { .. } => tag::GAP,
        }
    }

    /// Whether this type carries a request id when one is given.
    fn has_id(&self) -> bool {
        flag::allowed(self.tag()) & flag::ID != 0
    }
}

/// Why a binary frame was refused. Each variant names the broken rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer than the [`HEADER_LEN`] bytes of the fixed header.
    #[error("frame of {0} bytes is shorter than the 3-byte header")]
    TruncatedHeader(usize),
    /// The version byte is not [`VERSION`].
    #[error("unsupported protocol version {0} (this server speaks version 1)")]
    UnsupportedVersion(u8),
    /// The type tag is none of [`tag`].
    #[error("unknown type tag 0x{0:02x}")]
    UnknownType(u8),
    /// A flag bit that the type does not define is set.
    #[error("flags 0x{flags:02x} are not defined for type tag 0x{tag:02x}")]
    BadFlags {
        /// The type tag.
        tag: u8,
        /// The flags byte.
        flags: u8,
    },
    /// The frame ends inside a fixed-size field or a varint.
    #[error("the frame ends inside field `{0}`")]
    Truncated(&'static str),
    /// A length prefix reaches past the end of the frame.
    #[error("field `{field}` declares {len} bytes but only {left} remain")]
    LengthPastEnd {
        /// The field.
        field: &'static str,
        /// The declared length.
        len: u64,
        /// The bytes left in the frame.
        left: usize,
    },
    /// A varint longer than 10 bytes, overflowing 64 bits, or not minimal.
    #[error("field `{field}` is a malformed varint: {reason}")]
    BadVarint {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A length prefix larger than the field allows (checked before reading it).
    #[error("field `{field}` declares {len} bytes, more than the {max} allowed")]
    Oversize {
        /// The field.
        field: &'static str,
        /// The declared length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The channel name breaks the channel rules.
    #[error("{0}")]
    InvalidChannel(ChannelNameError),
    /// A text field is not UTF-8.
    #[error("field `{0}` is not valid UTF-8")]
    BadUtf8(&'static str),
    /// Bytes after the last field of a type that has no payload.
    #[error("{0} unexpected bytes after the last field")]
    TrailingBytes(usize),
    /// A well-formed event frame sent where a command is expected.
    #[error("type tag 0x{0:02x} is a server event, not a command")]
    NotACommand(u8),
}

impl DecodeError {
    /// The `error` code a client gets for this frame.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
            DecodeError::UnknownType(_) | DecodeError::NotACommand(_) => "unknown_type",
            DecodeError::InvalidChannel(_)
            | DecodeError::Oversize {
                field: "channel", ..
            } => "invalid_channel",
            _ => "bad_frame",
        }
    }
}

impl From<ChannelNameError> for DecodeError {
    fn from(e: ChannelNameError) -> Self {
        DecodeError::InvalidChannel(e)
    }
}

/// [`crate::types::is_channel_byte`] as a table: the check runs on every byte of every channel decoded.
/// `channel_table_matches_the_rule` checks it against the rule.
static CHANNEL_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b':' | b'_' | b'-' | b'.' | b'@' | b'/' | b'=' | b'+' | b'!' | b'~' | b'$'
            );
        b += 1;
    }
    t
};

/// A cursor over the bytes of one frame.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn varint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let (v, n) = read_varint(&self.buf[self.pos..], field)?;
        self.pos += n;
        Ok(v)
    }

    fn u64_be(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let Some(s) = self.buf.get(self.pos..self.pos + 8) else {
            return Err(DecodeError::Truncated(field));
        };
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        self.pos += 8;
        Ok(u64::from_be_bytes(a))
    }

    /// `len` bytes, after checking `len` against `max` and then against what is left.
    fn take(&mut self, field: &'static str, len: u64, max: usize) -> Result<&'a [u8], DecodeError> {
        if len > max as u64 {
            return Err(DecodeError::Oversize { field, len, max });
        }
        let left = self.left();
        if len > left as u64 {
            return Err(DecodeError::LengthPastEnd { field, len, left });
        }
        let s = &self.buf[self.pos..self.pos + len as usize];
        self.pos += len as usize;
        Ok(s)
    }

    /// A 1-byte length, then that many bytes.
    fn short_bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let Some(&len) = self.buf.get(self.pos) else {
            return Err(DecodeError::Truncated(field));
        };
        self.pos += 1;
        self.take(field, u64::from(len), max)
    }

    /// A varint length, then that many bytes of UTF-8.
    fn text(&mut self, field: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let len = self.varint(field)?;
        let b = self.take(field, len, max)?;
        std::str::from_utf8(b).map_err(|_| DecodeError::BadUtf8(field))
    }

    /// Like [`Reader::text`], with an empty text read as absent.
    fn opt_text(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<Option<&'a str>, DecodeError> {
        self.text(field, max).map(|s| (!s.is_empty()).then_some(s))
    }

    fn channel(&mut self) -> Result<&'a str, DecodeError> {
        let b = self.short_bytes("channel", MAX_CHANNEL_LEN)?;
        if b.is_empty() {
            return Err(DecodeError::InvalidChannel(ChannelNameError::Empty));
        }
        if !b.iter().all(|&c| CHANNEL_BYTES[usize::from(c)]) {
            return Err(DecodeError::InvalidChannel(ChannelNameError::BadCharacter));
        }
        // Channel bytes are ASCII, so this cannot fail.
        std::str::from_utf8(b).map_err(|_| DecodeError::BadUtf8("channel"))
    }

    fn position(&mut self, seq_field: &'static str) -> Result<StreamPosition, DecodeError> {
        let epoch = Epoch(self.u64_be("epoch")?);
        let seq = self.varint(seq_field)?;
        Ok(StreamPosition { epoch, seq })
    }

    fn member(&mut self) -> Result<Member<'a>, DecodeError> {
        Ok(Member {
            client: self.text("client", usize::MAX)?,
            user: self.text("user", usize::MAX)?,
            info: self.opt_text("info", usize::MAX)?,
        })
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn end(&self) -> Result<(), DecodeError> {
        match self.left() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// Reads an unsigned LEB128 varint at the start of `buf`: its value and length.
pub fn read_varint(buf: &[u8], field: &'static str) -> Result<(u64, usize), DecodeError> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        if i == MAX_VARINT_LEN - 1 && b > 1 {
            return Err(DecodeError::BadVarint {
                field,
                reason: "overflows 64 bits",
            });
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(DecodeError::BadVarint {
                    field,
                    reason: "not minimal (ends with a zero group)",
                });
            }
            return Ok((v, i + 1));
        }
    }
    // Ten bytes with the continuation bit are impossible (the tenth is at most 1), so only
    // running out of input gets here.
    Err(DecodeError::Truncated(field))
}

/// The bytes of `v` as a varint.
pub fn varint_len(v: u64) -> usize {
    // One byte per started group of 7 bits; 0 takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Appends `v` as a varint.
pub fn put_varint<B: BufMut>(out: &mut B, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// Decodes one frame, borrowing its channel, payload and texts from `input`.
pub fn decode(input: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let [version, tag, flags, ..] = *input else {
        return Err(DecodeError::TruncatedHeader(input.len()));
    };
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    if tag::name(tag).is_none() {
        return Err(DecodeError::UnknownType(tag));
    }
    if flags & !flag::allowed(tag) != 0 {
        return Err(DecodeError::BadFlags { tag, flags });
    }
    let mut r = Reader {
        buf: input,
        pos: HEADER_LEN,
    };
    let id = if flags & flag::ID != 0 {
        Some(r.varint("id")?)
    } else {
        None
    };
    let body = match tag {
        tag::SUBSCRIBE => {
            let channel = r.channel()?;
            let resume = if flags & flag::RESUME != 0 {
                Some(r.position("since")?)
            } else {
                None
            };
            let presence = if flags & flag::PRESENCE != 0 {
                Some(PresenceClaim {
                    user: r.opt_text("user", MAX_USER_LEN)?,
                    info: r.opt_text("info", MAX_INFO_LEN)?,
                })
            } else {
                None
            };
            r.end()?;
            Body::Subscribe {
                channel,
                resume,
                presence,
            }
        }
        tag::UNSUBSCRIBE => {
            let channel = r.channel()?;
            r.end()?;
            Body::Unsubscribe { channel }
        }
        tag::PUBLISH => Body::Publish {
            channel: r.channel()?,
            idempotency_key: if flags & flag::IDEMPOTENCY_KEY != 0 {
                Some(r.text("idempotency_key", MAX_IDEMPOTENCY_KEY_LEN)?)
            } else {
                None
            },
            expected_seq: if flags & flag::EXPECTED_SEQ != 0 {
                Some(r.varint("expected_seq")?)
            } else {
                None
            },
            payload: r.rest(),
        },
        tag::HEARTBEAT => {
            r.end()?;
            Body::Heartbeat
        }
        tag::PRESENCE => {
            let channel = r.channel()?;
            let page = if flags & flag::PAGE != 0 {
                Some((r.varint("limit")?, r.text("cursor", MAX_CURSOR_LEN)?))
            } else {
                None
            };
            r.end()?;
            Body::Presence { channel, page }
        }
        tag::SUBSCRIBED => {
            let channel = r.channel()?;
            let position = r.position("seq")?;
            r.end()?;
            Body::Subscribed {
                channel,
                position,
                recovered: flags & flag::RECOVERED != 0,
            }
        }
        tag::UNSUBSCRIBED => {
            let channel = r.channel()?;
            r.end()?;
            Body::Unsubscribed { channel }
        }
        tag::PUBLISHED => {
            let channel = r.channel()?;
            let position = r.position("seq")?;
            r.end()?;
            Body::Published { channel, position }
        }
        tag::HEARTBEAT_REPLY => {
            r.end()?;
            Body::HeartbeatReply
        }
        tag::MESSAGE => {
            let channel = r.channel()?;
            let seq = r.varint("seq")?;
            Body::Message {
                channel,
                seq,
                json: flags & flag::JSON != 0,
                payload: r.rest(),
            }
        }
        tag::ERROR => {
            let code = r.short_bytes("code", usize::from(u8::MAX))?;
            let code = std::str::from_utf8(code).map_err(|_| DecodeError::BadUtf8("code"))?;
            let message =
                std::str::from_utf8(r.rest()).map_err(|_| DecodeError::BadUtf8("message"))?;
            Body::Error { code, message }
        }
        tag::PRESENCE_STATE => {
            let channel = r.channel()?;
            let seq = r.varint("seq")?;
            let count = r.varint("count")?;
            // A member takes at least 3 bytes: refuse an impossible count before looking.
            let left = r.left();
            if count > (left / 3) as u64 {
                return Err(DecodeError::LengthPastEnd {
                    field: "members",
                    len: count.saturating_mul(3),
                    left,
                });
            }
            let start = r.pos;
            for _ in 0..count {
                r.member()?;
            }
            let members = Members {
                count,
                bytes: &input[start..r.pos],
            };
            let next = if flags & flag::MORE != 0 {
                Some(r.text("next", MAX_CURSOR_LEN)?)
            } else {
                None
            };
            r.end()?;
            Body::PresenceState {
                channel,
                seq,
                members,
                next,
            }
        }
        tag::PRESENCE_EVENT => {
            let channel = r.channel()?;
            let seq = r.varint("seq")?;
            let member = r.member()?;
            r.end()?;
            Body::PresenceEvent {
                channel,
                seq,
                join: flags & flag::JOIN != 0,
                member,
            }
        }
        _ => {
            // tag::GAP, the last known tag.
            let channel = r.channel()?;
            let from = r.varint("from")?;
            let to = r.varint("to")?;
            r.end()?;
            Body::Gap { channel, from, to }
        }
    };
    Ok(Frame { id, body })
}

/// The request id of a frame whose header and id are readable, for error replies.
fn peek_id(input: &[u8]) -> Option<u64> {
    match input {
        [VERSION, _, flags, rest @ ..] if flags & flag::ID != 0 => {
            read_varint(rest, "id").ok().map(|(v, _)| v)
        }
        _ => None,
    }
}

/// Decodes one client command (a binary WebSocket message) into the codec-neutral
/// [`Request`]. The payload of a publish stays a slice of `input`; the channel is validated into
/// a [`ChannelName`]. Errors carry the request id when it could be read.
pub fn decode_command(input: &[u8]) -> Result<Request<'_>, CommandError<'_>> {
    let id = || peek_id(input).map(ReqId::Num);
    let refuse = |e: DecodeError| CommandError {
        id: id(),
        code: e.code(),
        message: e.to_string().into(),
    };
    let frame = decode(input).map_err(refuse)?;
    let channel = |name: &str| ChannelName::new(name).map_err(|e| refuse(e.into()));
    let command = match frame.body {
        Body::Subscribe {
            channel: c,
            resume,
            presence,
        } => Command::Subscribe {
            channel: channel(c)?,
            resume,
            presence: match presence {
                None => None,
                Some(p) => Some(client_presence(p).map_err(|m| CommandError {
                    id: id(),
                    code: "bad_request",
                    message: m.into(),
                })?),
            },
        },
        Body::Unsubscribe { channel: c } => Command::Unsubscribe {
            channel: channel(c)?,
        },
        Body::Publish {
            channel: c,
            idempotency_key,
            expected_seq,
            payload,
        } => Command::Publish {
            channel: channel(c)?,
            data: Payload::Bytes(payload),
            cond: super::PublishIf {
                idempotency_key: idempotency_key.map(Cow::Borrowed),
                expected_seq,
            },
        },
        Body::Heartbeat => Command::Heartbeat,
        Body::Presence { channel: c, page } => Command::Presence {
            channel: channel(c)?,
            page: match page {
                Some((limit, cursor)) => super::Page {
                    limit: Some(limit),
                    cursor: (!cursor.is_empty()).then_some(Cow::Borrowed(cursor)),
                },
                None => super::Page::default(),
            },
        },
        other => return Err(refuse(DecodeError::NotACommand(other.tag()))),
    };
    Ok(Request {
        id: frame.id.map(ReqId::Num),
        command,
    })
}

/// The presence identity of a subscribe, under the same rules as the JSON protocol: info must
/// be a JSON object (on one line, as it is forwarded verbatim to JSON and SSE clients).
fn client_presence(p: PresenceClaim<'_>) -> Result<ClientPresence<'_>, &'static str> {
    if let Some(info) = p.info {
        if !info.starts_with('{') || !json::is_embeddable_json(info.as_bytes()) {
            return Err("presence info must be a JSON object without line breaks");
        }
    }
    Ok(ClientPresence {
        user: p.user.map(Cow::Borrowed),
        info: p.info,
    })
}

/// A channel, code or other short field as written: at most 255 bytes.
fn short(s: &str) -> &[u8] {
    let b = s.as_bytes();
    &b[..b.len().min(usize::from(u8::MAX))]
}

fn text_len(s: &str) -> usize {
    varint_len(s.len() as u64) + s.len()
}

fn member_len(client: &str, user: &str, info: Option<&str>) -> usize {
    text_len(client) + text_len(user) + text_len(info.unwrap_or(""))
}

fn put_text<B: BufMut>(out: &mut B, s: &[u8]) {
    put_varint(out, s.len() as u64);
    out.put_slice(s);
}

fn put_member<B: BufMut>(out: &mut B, client: &[u8], user: &[u8], info: Option<&[u8]>) {
    put_text(out, client);
    put_text(out, user);
    put_text(out, info.unwrap_or(b""));
}

/// The exact length of `frame` once encoded.
pub fn encoded_len(frame: &Frame<'_>) -> usize {
    let id = match frame.id {
        Some(id) if frame.body.has_id() => varint_len(id),
        _ => 0,
    };
    let ch = |c: &str| 1 + short(c).len();
    let pos = |p: &StreamPosition| 8 + varint_len(p.seq);
    HEADER_LEN
        + id
        + match frame.body {
            Body::Subscribe {
                channel,
                resume,
                presence,
            } => {
                ch(channel)
                    + resume.as_ref().map_or(0, pos)
                    + presence.map_or(0, |p| {
                        text_len(p.user.unwrap_or("")) + text_len(p.info.unwrap_or(""))
                    })
            }
            Body::Unsubscribe { channel } | Body::Unsubscribed { channel } => ch(channel),
            Body::Presence { channel, page } => {
                ch(channel) + page.map_or(0, |(limit, c)| varint_len(limit) + text_len(c))
            }
            Body::Publish {
                channel,
                idempotency_key,
                expected_seq,
                payload,
            } => {
                ch(channel)
                    + idempotency_key.map_or(0, text_len)
                    + expected_seq.map_or(0, varint_len)
                    + payload.len()
            }
            Body::Heartbeat | Body::HeartbeatReply => 0,
            Body::Subscribed {
                channel, position, ..
            }
            | Body::Published { channel, position } => ch(channel) + pos(&position),
            Body::Message {
                channel,
                seq,
                payload,
                ..
            } => ch(channel) + varint_len(seq) + payload.len(),
            Body::Error { code, message } => 1 + short(code).len() + message.len(),
            Body::PresenceState {
                channel,
                seq,
                members,
                next,
            } => {
                ch(channel)
                    + varint_len(seq)
                    + varint_len(members.count)
                    + members.bytes.len()
                    + next.map_or(0, text_len)
            }
            Body::PresenceEvent {
                channel,
                seq,
                member,
                ..
            } => {
                ch(channel) + varint_len(seq) + member_len(member.client, member.user, member.info)
            }
            Body::Gap { channel, from, to } => ch(channel) + varint_len(from) + varint_len(to),
        }
}

/// Appends `frame` to `out` (without a WebSocket header). [`decode`] of the bytes gives `frame`
/// back, provided its channel and code fit 255 bytes (longer ones are cut), it has no id where
/// the type has none (it is not written), and empty presence texts are `None`.
pub fn encode<B: BufMut>(frame: &Frame<'_>, out: &mut B) {
    let body = &frame.body;
    let id = frame.id.filter(|_| body.has_id());
    let mut flags = if id.is_some() { flag::ID } else { 0 };
    match body {
        Body::Subscribe {
            resume, presence, ..
        } => {
            if resume.is_some() {
                flags |= flag::RESUME;
            }
            if presence.is_some() {
                flags |= flag::PRESENCE;
            }
        }
        Body::Subscribed {
            recovered: true, ..
        } => flags |= flag::RECOVERED,
        Body::Message { json: true, .. } => flags |= flag::JSON,
        Body::PresenceEvent { join: true, .. } => flags |= flag::JOIN,
        Body::Presence { page: Some(_), .. } => flags |= flag::PAGE,
        Body::PresenceState { next: Some(_), .. } => flags |= flag::MORE,
        Body::Publish {
            idempotency_key,
            expected_seq,
            ..
        } => {
            if idempotency_key.is_some() {
                flags |= flag::IDEMPOTENCY_KEY;
            }
            if expected_seq.is_some() {
                flags |= flag::EXPECTED_SEQ;
            }
        }
        _ => {}
    }
    out.put_slice(&[VERSION, body.tag(), flags]);
    if let Some(id) = id {
        put_varint(out, id);
    }
    let put_short = |out: &mut B, s: &str| {
        let s = short(s);
        out.put_u8(s.len() as u8);
        out.put_slice(s);
    };
    let put_pos = |out: &mut B, p: &StreamPosition| {
        out.put_u64(p.epoch.0);
        put_varint(out, p.seq);
    };
    match *body {
        Body::Subscribe {
            channel,
            resume,
            presence,
        } => {
            put_short(out, channel);
            if let Some(p) = resume {
                put_pos(out, &p);
            }
            if let Some(p) = presence {
                put_text(out, p.user.unwrap_or("").as_bytes());
                put_text(out, p.info.unwrap_or("").as_bytes());
            }
        }
        Body::Unsubscribe { channel } | Body::Unsubscribed { channel } => put_short(out, channel),
        Body::Presence { channel, page } => {
            put_short(out, channel);
            if let Some((limit, cursor)) = page {
                put_varint(out, limit);
                put_text(out, cursor.as_bytes());
            }
        }
        Body::Publish {
            channel,
            idempotency_key,
            expected_seq,
            payload,
        } => {
            put_short(out, channel);
            if let Some(k) = idempotency_key {
                put_text(out, k.as_bytes());
            }
            if let Some(s) = expected_seq {
                put_varint(out, s);
            }
            out.put_slice(payload);
        }
        Body::Heartbeat | Body::HeartbeatReply => {}
        Body::Subscribed {
            channel, position, ..
        }
        | Body::Published { channel, position } => {
            put_short(out, channel);
            put_pos(out, &position);
        }
        Body::Message {
            channel,
            seq,
            payload,
            ..
        } => {
            put_short(out, channel);
            put_varint(out, seq);
            out.put_slice(payload);
        }
        Body::Error { code, message } => {
            put_short(out, code);
            out.put_slice(message.as_bytes());
        }
        Body::PresenceState {
            channel,
            seq,
            members,
            next,
        } => {
            put_short(out, channel);
            put_varint(out, seq);
            put_varint(out, members.count);
            out.put_slice(members.bytes);
            if let Some(next) = next {
                put_text(out, next.as_bytes());
            }
        }
        Body::PresenceEvent {
            channel,
            seq,
            member,
            ..
        } => {
            put_short(out, channel);
            put_varint(out, seq);
            put_member(
                out,
                member.client.as_bytes(),
                member.user.as_bytes(),
                member.info.map(str::as_bytes),
            );
        }
        Body::Gap { channel, from, to } => {
            put_short(out, channel);
            put_varint(out, from);
            put_varint(out, to);
        }
    }
}

/// An encoder that reuses one buffer: each [`Encoder::encode`] overwrites the previous frame.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An encoder with room for frames of `capacity` bytes before it grows.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
        }
    }

    /// Encodes `frame` into the reused buffer and returns its bytes.
    pub fn encode(&mut self, frame: &Frame<'_>) -> &[u8] {
        self.buf.clear();
        encode(frame, &mut self.buf);
        &self.buf
    }
}

/// A complete WebSocket binary frame holding `frame`: the header is reserved and filled in
/// place, so one allocation and no copy.
pub fn ws_frame(frame: &Frame<'_>) -> Bytes {
    let mut buf = ws::begin_frame(encoded_len(frame));
    encode(frame, &mut buf);
    ws::finish_frame(buf, ws::OP_BINARY)
}

/// A complete WebSocket frame carrying `event`. Binary request ids are numbers; a JSON id (which
/// a binary connection never produces) is kept only when it is a plain `u64`.
pub fn encode_event(id: Option<ReqId<'_>>, ev: &Event<'_>) -> Bytes {
    let id = match id {
        Some(ReqId::Num(n)) => Some(n),
        Some(ReqId::Json(raw)) => raw.parse().ok(),
        None => None,
    };
    let members_buf;
    let body = match *ev {
        Event::Subscribed {
            channel,
            position,
            recovered,
            ..
        } => Body::Subscribed {
            channel: channel.as_str(),
            position,
            recovered,
        },
        Event::Published { channel, position } => Body::Published {
            channel: channel.as_str(),
            position,
        },
        Event::Unsubscribed { channel } => Body::Unsubscribed {
            channel: channel.as_str(),
        },
        Event::Heartbeat => Body::HeartbeatReply,
        Event::PresenceState {
            channel,
            seq,
            members,
            next,
        } => {
            members_buf = encode_members(members);
            Body::PresenceState {
                channel: channel.as_str(),
                seq,
                members: Members {
                    count: members.len() as u64,
                    bytes: &members_buf,
                },
                next,
            }
        }
        Event::Error { code, message } => Body::Error { code, message },
    };
    ws_frame(&Frame { id, body })
}

/// The member list of a `presence_state` frame.
fn encode_members(members: &[Identity]) -> Vec<u8> {
    let len = members
        .iter()
        .map(|m| {
            text_len(&m.client)
                + text_len(&m.user)
                + m.info
                    .as_ref()
                    .map_or(1, |i| varint_len(i.len() as u64) + i.len())
        })
        .sum();
    let mut out = Vec::with_capacity(len);
    for m in members {
        put_member(
            &mut out,
            m.client.as_bytes(),
            m.user.as_bytes(),
            m.info.as_deref(),
        );
    }
    out
}

/// The `message` frame of binary subscribers, encoded once per publication and shared by all of
/// them. A JSON payload (from a JSON or HTTP client) carries [`flag::JSON`]; a binary payload
/// is forwarded byte for byte without it.
pub fn message(channel: &ChannelName, seq: u64, kind: DataKind, data: &[u8]) -> Bytes {
    ws_frame(&Frame {
        id: None,
        body: Body::Message {
            channel: channel.as_str(),
            seq,
            json: kind == DataKind::Json,
            payload: data,
        },
    })
}

/// The `presence` event frame (join or leave) of binary subscribers, encoded once per event.
pub fn presence(channel: &ChannelName, e: &PresenceEvent) -> Bytes {
    let who = &e.who;
    let info = who.info.as_deref().unwrap_or(b"");
    let len = HEADER_LEN
        + 1
        + channel.as_str().len()
        + varint_len(e.seq)
        + text_len(&who.client)
        + text_len(&who.user)
        + varint_len(info.len() as u64)
        + info.len();
    let mut buf = ws::begin_frame(len);
    let flags = if e.join { flag::JOIN } else { 0 };
    buf.put_slice(&[VERSION, tag::PRESENCE_EVENT, flags]);
    let ch = short(channel.as_str());
    buf.put_u8(ch.len() as u8);
    buf.put_slice(ch);
    put_varint(&mut buf, e.seq);
    put_member(
        &mut buf,
        who.client.as_bytes(),
        who.user.as_bytes(),
        Some(info),
    );
    ws::finish_frame(buf, ws::OP_BINARY)
}

/// The `gap` frame of a binary subscriber: it missed the messages `from..=to` of the channel.
pub fn gap(channel: &ChannelName, from: u64, to: u64) -> Bytes {
    ws_frame(&Frame {
        id: None,
        body: Body::Gap {
            channel: channel.as_str(),
            from,
            to,
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn hex(b: &[u8]) -> String {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn unhex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|x| u8::from_str_radix(x, 16).unwrap())
            .collect()
    }

    fn enc(f: &Frame<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        encode(f, &mut v);
        assert_eq!(v.len(), encoded_len(f), "{f:?}");
        v
    }

    /// The WebSocket payload of a server frame.
    fn ws_payload(frame: &[u8]) -> &[u8] {
        assert_eq!(frame[0], 0x82, "a final binary frame");
        match frame[1] {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        }
    }

    const EPOCH: Epoch = Epoch(0x9f2c_61d3_a0b4_e5f7);

    /// The worked examples of docs/protocol.md: each (hex, frame) pair must match both ways.
    #[test]
    fn documented_examples() {
        let pos = |seq| StreamPosition { epoch: EPOCH, seq };
        let cases: Vec<(&str, Frame<'_>)> = vec![
            (
                "01 01 01 07 06 72 6f 6f 6d 3a 31",
                Frame {
                    id: Some(7),
                    body: Body::Subscribe {
                        channel: "room:1",
                        resume: None,
                        presence: None,
                    },
                },
            ),
            (
                "01 01 03 08 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 29",
                Frame {
                    id: Some(8),
                    body: Body::Subscribe {
                        channel: "room:1",
                        resume: Some(pos(41)),
                        presence: None,
                    },
                },
            ),
            (
                "01 03 01 ac 02 06 72 6f 6f 6d 3a 31 68 69",
                Frame {
                    id: Some(300),
                    body: Body::Publish {
                        channel: "room:1",
                        idempotency_key: None,
                        expected_seq: None,
                        payload: b"hi",
                    },
                },
            ),
            (
                // Flags 0x07: id, key "k1", expected seq 300.
                "01 03 07 01 06 72 6f 6f 6d 3a 31 02 6b 31 ac 02 68 69",
                Frame {
                    id: Some(1),
                    body: Body::Publish {
                        channel: "room:1",
                        idempotency_key: Some("k1"),
                        expected_seq: Some(300),
                        payload: b"hi",
                    },
                },
            ),
            (
                "01 02 00 06 72 6f 6f 6d 3a 31",
                Frame {
                    id: None,
                    body: Body::Unsubscribe { channel: "room:1" },
                },
            ),
            (
                "01 04 00",
                Frame {
                    id: None,
                    body: Body::Heartbeat,
                },
            ),
            (
                "01 81 05 08 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 29",
                Frame {
                    id: Some(8),
                    body: Body::Subscribed {
                        channel: "room:1",
                        position: pos(41),
                        recovered: true,
                    },
                },
            ),
            (
                "01 85 00 06 72 6f 6f 6d 3a 31 2a 68 69",
                Frame {
                    id: None,
                    body: Body::Message {
                        channel: "room:1",
                        seq: 42,
                        json: false,
                        payload: b"hi",
                    },
                },
            ),
            (
                "01 85 08 06 72 6f 6f 6d 3a 31 2b 7b 22 74 22 3a 31 7d",
                Frame {
                    id: None,
                    body: Body::Message {
                        channel: "room:1",
                        seq: 43,
                        json: true,
                        payload: br#"{"t":1}"#,
                    },
                },
            ),
            (
                "01 83 01 ac 02 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 2a",
                Frame {
                    id: Some(300),
                    body: Body::Published {
                        channel: "room:1",
                        position: pos(42),
                    },
                },
            ),
            (
                "01 82 00 06 72 6f 6f 6d 3a 31",
                Frame {
                    id: None,
                    body: Body::Unsubscribed { channel: "room:1" },
                },
            ),
            (
                "01 84 01 05",
                Frame {
                    id: Some(5),
                    body: Body::HeartbeatReply,
                },
            ),
            (
                "01 89 00 06 72 6f 6f 6d 3a 31 78 bb 01",
                Frame {
                    id: None,
                    body: Body::Gap {
                        channel: "room:1",
                        from: 120,
                        to: 187,
                    },
                },
            ),
            (
                "01 86 01 04 0f 69 6e 76 61 6c 69 64 5f 63 68 61 6e 6e 65 6c 62 61 64",
                Frame {
                    id: Some(4),
                    body: Body::Error {
                        code: "invalid_channel",
                        message: "bad",
                    },
                },
            ),
        ];
        for (h, f) in cases {
            assert_eq!(hex(&enc(&f)), h, "{f:?}");
            assert_eq!(decode(&unhex(h)).unwrap(), f, "{h}");
        }
    }

    #[test]
    fn channel_table_matches_the_rule() {
        use crate::types::is_channel_byte;
        for b in 0..=255u8 {
            assert_eq!(CHANNEL_BYTES[usize::from(b)], is_channel_byte(b), "{b}");
        }
    }

    #[test]
    fn varints() {
        for (v, h) in [
            (0u64, "00"),
            (1, "01"),
            (127, "7f"),
            (128, "80 01"),
            (300, "ac 02"),
            (16_383, "ff 7f"),
            (16_384, "80 80 01"),
            (u64::MAX, "ff ff ff ff ff ff ff ff ff 01"),
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(hex(&b), h);
            assert_eq!(varint_len(v), b.len());
            assert_eq!(read_varint(&b, "x").unwrap(), (v, b.len()));
        }
    }

    #[test]
    fn error_truncated_header() {
        for input in [&[][..], &[1], &[1, 4]] {
            assert_eq!(
                decode(input),
                Err(DecodeError::TruncatedHeader(input.len()))
            );
        }
        assert_eq!(decode_command(&[1]).unwrap_err().code, "bad_frame");
    }

    #[test]
    fn error_unsupported_version() {
        assert_eq!(decode(&[2, 4, 0]), Err(DecodeError::UnsupportedVersion(2)));
        assert_eq!(decode(&[0, 4, 0]), Err(DecodeError::UnsupportedVersion(0)));
        let e = decode_command(&[2, 4, 0]).unwrap_err();
        assert_eq!(e.code, "unsupported_version");
        assert!(e.message.contains("version 2"), "{}", e.message);
    }

    #[test]
    fn error_unknown_tag() {
        for t in [0x00, 0x06, 0x7f, 0x80, 0x8a, 0xff] {
            assert_eq!(decode(&[1, t, 0]), Err(DecodeError::UnknownType(t)));
        }
        let e = decode_command(&[1, 0x42, 1, 9]).unwrap_err();
        assert_eq!((e.code, e.id), ("unknown_type", Some(ReqId::Num(9))));
        assert!(e.message.contains("0x42"), "{}", e.message);
    }

    #[test]
    fn error_event_sent_as_command() {
        let input = unhex("01 84 01 05");
        let e = decode_command(&input).unwrap_err();
        assert_eq!((e.code, e.id), ("unknown_type", Some(ReqId::Num(5))));
    }

    #[test]
    fn error_bad_flags() {
        // RESUME on unsubscribe, RECOVERED on subscribe, ID on message, an undefined bit.
        for (t, f) in [
            (0x02, 0x02),
            (0x01, 0x04),
            (0x85, 0x01),
            (0x04, 0x10),
            (0x03, 0x80),
        ] {
            assert_eq!(
                decode(&[1, t, f, 0, 0]),
                Err(DecodeError::BadFlags { tag: t, flags: f })
            );
        }
    }

    #[test]
    fn error_truncated_fields() {
        // ID flag, no id.
        assert_eq!(decode(&[1, 4, 1]), Err(DecodeError::Truncated("id")));
        // id varint cut in the middle.
        assert_eq!(decode(&[1, 4, 1, 0x80]), Err(DecodeError::Truncated("id")));
        // No channel length.
        assert_eq!(decode(&[1, 2, 0]), Err(DecodeError::Truncated("channel")));
        // Resume without a whole epoch.
        assert_eq!(
            decode(&unhex("01 01 02 01 61 9f 2c")),
            Err(DecodeError::Truncated("epoch"))
        );
        // Resume without since.
        assert_eq!(
            decode(&unhex("01 01 02 01 61 9f 2c 61 d3 a0 b4 e5 f7")),
            Err(DecodeError::Truncated("since"))
        );
        // Every strict prefix of a frame without a payload is an error.
        let full = unhex("01 01 03 08 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 29");
        for cut in 0..full.len() {
            assert!(decode(&full[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn error_length_past_end() {
        assert_eq!(
            decode(&unhex("01 02 00 06 72 6f 6f")),
            Err(DecodeError::LengthPastEnd {
                field: "channel",
                len: 6,
                left: 3
            })
        );
        assert_eq!(
            decode(&unhex("01 86 00 09 61")),
            Err(DecodeError::LengthPastEnd {
                field: "code",
                len: 9,
                left: 1
            })
        );
        assert_eq!(
            decode_command(&unhex("01 03 01 02 09 61")).unwrap_err(),
            CommandError {
                id: Some(ReqId::Num(2)),
                code: "bad_frame",
                message: "field `channel` declares 9 bytes but only 1 remain".into(),
            }
        );
    }

    #[test]
    fn error_bad_varint() {
        // Eleven bytes / a tenth byte over 1: more than 64 bits.
        let mut f = vec![1, 4, 1];
        f.extend([0xff; 9]);
        f.push(0x02);
        assert_eq!(
            decode(&f),
            Err(DecodeError::BadVarint {
                field: "id",
                reason: "overflows 64 bits"
            })
        );
        // Not minimal: 0x80 0x00 is a long way to write 0.
        assert_eq!(
            decode(&[1, 4, 1, 0x80, 0x00]),
            Err(DecodeError::BadVarint {
                field: "id",
                reason: "not minimal (ends with a zero group)"
            })
        );
        assert_eq!(
            decode(&unhex("01 85 00 01 61 81 00")),
            Err(DecodeError::BadVarint {
                field: "seq",
                reason: "not minimal (ends with a zero group)"
            })
        );
        assert_eq!(decode_command(&f).unwrap_err().code, "bad_frame");
    }

    #[test]
    fn error_oversize_channel() {
        // The length is refused before the bytes are looked at (they are not even there).
        assert_eq!(
            decode(&[1, 2, 0, 201]),
            Err(DecodeError::Oversize {
                field: "channel",
                len: 201,
                max: 200
            })
        );
        assert_eq!(
            decode_command(&[1, 2, 0, 255]).unwrap_err().code,
            "invalid_channel"
        );
        let mut ok = vec![1, 2, 0, 200];
        ok.extend([b'a'; 200]);
        assert!(decode_command(&ok).is_ok());
    }

    #[test]
    fn error_invalid_channel() {
        assert_eq!(
            decode(&[1, 2, 0, 0]),
            Err(DecodeError::InvalidChannel(ChannelNameError::Empty))
        );
        for bad in [&b"a b"[..], b"a\"", b"\xc3\xa9", b"a,b"] {
            let mut f = vec![1, 2, 1, 3, bad.len() as u8];
            f.extend_from_slice(bad);
            let e = decode_command(&f).unwrap_err();
            assert_eq!((e.code, e.id), ("invalid_channel", Some(ReqId::Num(3))));
        }
    }

    #[test]
    fn error_trailing_bytes_and_bad_utf8() {
        assert_eq!(decode(&[1, 4, 0, 0]), Err(DecodeError::TrailingBytes(1)));
        assert_eq!(
            decode(&unhex("01 02 00 01 61 62 63")),
            Err(DecodeError::TrailingBytes(2))
        );
        assert_eq!(
            decode(&unhex("01 86 00 01 ff")),
            Err(DecodeError::BadUtf8("code"))
        );
        assert_eq!(
            decode(&unhex("01 86 00 01 61 ff fe")),
            Err(DecodeError::BadUtf8("message"))
        );
    }

    #[test]
    fn commands_map_to_the_neutral_types() {
        let input = unhex("01 03 01 ac 02 06 72 6f 6f 6d 3a 31 00 ff");
        let r = decode_command(&input).unwrap();
        assert_eq!(r.id, Some(ReqId::Num(300)));
        let Command::Publish { channel, data, .. } = r.command else {
            panic!()
        };
        assert_eq!(channel.as_str(), "room:1");
        assert_eq!(data, Payload::Bytes(&[0, 0xff]));
        let input = unhex("01 01 03 08 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 29");
        let r = decode_command(&input).unwrap();
        let Command::Subscribe {
            resume: Some(p), ..
        } = r.command
        else {
            panic!()
        };
        assert_eq!((p.epoch, p.seq), (EPOCH, 41));
        assert!(matches!(
            decode_command(&[1, 4, 0]).unwrap().command,
            Command::Heartbeat
        ));
        // The conditions of a publish reach the neutral command.
        let input = unhex("01 03 06 06 72 6f 6f 6d 3a 31 02 6b 31 07 00 ff");
        let Command::Publish { cond, data, .. } = decode_command(&input).unwrap().command else {
            panic!()
        };
        assert_eq!(cond.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(cond.expected_seq, Some(7));
        assert_eq!(data, Payload::Bytes(&[0, 0xff]));
        // A key longer than the engine keeps is refused at decoding.
        let mut long = unhex("01 03 02 01 61 81 01");
        long.extend_from_slice(&[b'k'; 129]);
        assert_eq!(decode_command(&long).unwrap_err().code, "bad_frame");
        // An empty publish payload is allowed.
        assert!(matches!(
            decode_command(&unhex("01 03 00 01 61")).unwrap().command,
            Command::Publish {
                data: Payload::Bytes(&[]),
                ..
            }
        ));
    }

    #[test]
    fn decoded_slices_borrow_the_input() {
        let input = unhex("01 03 00 01 61 01 02 03");
        let f = decode(&input).unwrap();
        let Body::Publish {
            channel, payload, ..
        } = f.body
        else {
            panic!()
        };
        assert_eq!(channel.as_ptr(), input[4..].as_ptr());
        assert_eq!(payload.as_ptr(), input[5..].as_ptr());
    }

    #[test]
    fn events_are_complete_websocket_frames() {
        let ch = ChannelName::new("room:1").unwrap();
        let position = StreamPosition {
            epoch: EPOCH,
            seq: 41,
        };
        let f = encode_event(
            Some(ReqId::Num(8)),
            &Event::Subscribed {
                channel: &ch,
                position,
                recovered: true,
                reason: None,
            },
        );
        assert_eq!(
            decode(ws_payload(&f)).unwrap(),
            Frame {
                id: Some(8),
                body: Body::Subscribed {
                    channel: "room:1",
                    position,
                    recovered: true
                }
            }
        );
        let f = encode_event(
            None,
            &Event::Error {
                code: "bad_frame",
                message: "no",
            },
        );
        assert!(matches!(
            decode(ws_payload(&f)).unwrap().body,
            Body::Error {
                code: "bad_frame",
                message: "no"
            }
        ));
        // A JSON id that is a number survives; any other is dropped.
        let f = encode_event(Some(ReqId::Json("12")), &Event::Heartbeat);
        assert_eq!(decode(ws_payload(&f)).unwrap().id, Some(12));
        let f = encode_event(Some(ReqId::Json("\"x\"")), &Event::Heartbeat);
        assert_eq!(decode(ws_payload(&f)).unwrap().id, None);
        // Large payloads use the extended WebSocket lengths.
        for len in [0, 100, 125, 200, 70_000] {
            let data = vec![7u8; len];
            let f = message(&ch, 42, DataKind::Binary, &data);
            let Body::Message {
                seq, json, payload, ..
            } = decode(ws_payload(&f)).unwrap().body
            else {
                panic!()
            };
            assert_eq!((seq, json, payload), (42, false, &data[..]));
        }
        let f = message(&ch, 1, DataKind::Json, b"{}");
        assert!(matches!(
            decode(ws_payload(&f)).unwrap().body,
            Body::Message { json: true, .. }
        ));
    }

    #[test]
    fn binary_payloads_reach_json_clients_as_valid_json() {
        let ch = ChannelName::new("a").unwrap();
        let json_payload = |data: &[u8]| {
            let f = json::message(&ch, 1, DataKind::Binary, data);
            let skip = if f[1] == 126 { 4 } else { 2 };
            serde_json::from_slice::<serde_json::Value>(&f[skip..]).unwrap()
        };
        // JSON text is embedded as its value; anything else is base64.
        assert_eq!(json_payload(br#"{"a":[1]}"#)["data"]["a"][0], 1);
        for data in [
            &b"\xff\x00"[..],
            b"not json",
            b"[1,\n2]",
            b"\"\xffk\xb3\xb3a\"",
        ] {
            let v = json_payload(data);
            assert_eq!(v["encoding"], "base64", "{data:?}");
        }
    }

    #[test]
    fn reusable_encoder() {
        let mut e = Encoder::with_capacity(64);
        let a = e
            .encode(&Frame {
                id: Some(1),
                body: Body::Heartbeat,
            })
            .to_vec();
        assert_eq!(a, [1, 4, 1, 1]);
        let b = e.encode(&Frame {
            id: None,
            body: Body::HeartbeatReply,
        });
        assert_eq!(b, [1, 0x84, 0]);
    }

    #[test]
    fn presence_frames() {
        // subscribe with presence: user "u1", info {"a":1}.
        let input = unhex("01 01 10 01 61 02 75 31 07 7b 22 61 22 3a 31 7d");
        let r = decode_command(&input).unwrap();
        let Command::Subscribe {
            presence: Some(p), ..
        } = r.command
        else {
            panic!()
        };
        assert_eq!(p.user.as_deref(), Some("u1"));
        assert_eq!(p.info, Some(r#"{"a":1}"#));
        // Empty user and info mean none.
        let input = unhex("01 01 10 01 61 00 00");
        let r = decode_command(&input).unwrap();
        assert!(matches!(
            r.command,
            Command::Subscribe {
                presence: Some(ClientPresence {
                    user: None,
                    info: None
                }),
                ..
            }
        ));
        // Info that is not a JSON object is a bad request; an oversize user is refused by its
        // length alone.
        let input = unhex("01 01 11 02 01 61 00 03 5b 31 5d");
        let e = decode_command(&input).unwrap_err();
        assert_eq!((e.code, e.id), ("bad_request", Some(ReqId::Num(2))));
        assert_eq!(
            decode(&unhex("01 01 10 01 61 81 02")),
            Err(DecodeError::Oversize {
                field: "user",
                len: 257,
                max: 256
            })
        );
        // A presence query.
        let input = unhex("01 05 01 03 01 61");
        let r = decode_command(&input).unwrap();
        assert!(matches!(r.command, Command::Presence { .. }));
        // A presence state with a count its bytes cannot hold is refused before reading.
        assert!(matches!(
            decode(&unhex("01 87 00 01 61 00 05 00 00 00")),
            Err(DecodeError::LengthPastEnd {
                field: "members",
                ..
            })
        ));
        // State and events from the engine's identities.
        let who = Identity {
            client: "c1".into(),
            user: "u1".into(),
            info: Some(Bytes::from_static(br#"{"a":1}"#)),
        };
        let anon = Identity {
            client: "c2".into(),
            user: "c2".into(),
            info: None,
        };
        let ch = ChannelName::new("a").unwrap();
        let members = [who.clone(), anon];
        let f = encode_event(
            Some(ReqId::Num(3)),
            &Event::PresenceState {
                channel: &ch,
                seq: 9,
                members: &members,
                next: None,
            },
        );
        assert_eq!(
            hex(ws_payload(&f)),
            "01 87 01 03 01 61 09 02 02 63 31 02 75 31 07 7b 22 61 22 3a 31 7d 02 63 32 02 63 32 00"
        );
        let Body::PresenceState { members: m, .. } = decode(ws_payload(&f)).unwrap().body else {
            panic!()
        };
        let got: Vec<_> = m.iter().collect();
        assert_eq!(
            got,
            [
                Member {
                    client: "c1",
                    user: "u1",
                    info: Some(r#"{"a":1}"#)
                },
                Member {
                    client: "c2",
                    user: "c2",
                    info: None
                }
            ]
        );
        let f = presence(&ch, &PresenceEvent::new(1, 9, true, who));
        assert_eq!(
            hex(ws_payload(&f)),
            "01 88 20 01 61 09 02 63 31 02 75 31 07 7b 22 61 22 3a 31 7d"
        );
        // A page with more after it: flag MORE, then the cursor ("c1") after the members.
        let f = encode_event(
            Some(ReqId::Num(3)),
            &Event::PresenceState {
                channel: &ch,
                seq: 9,
                members: &members[..1],
                next: Some("c1"),
            },
        );
        assert_eq!(
            hex(ws_payload(&f)),
            "01 87 41 03 01 61 09 01 02 63 31 02 75 31 07 7b 22 61 22 3a 31 7d 02 63 31"
        );
        // The query of the next page: flag PAGE, then the limit (50) and the cursor.
        let r = decode_command(&[0x01, 0x05, 0x41, 0x04, 0x01, b'a', 50, 2, b'c', b'1']).unwrap();
        let Command::Presence { page, .. } = r.command else {
            panic!()
        };
        assert_eq!((page.limit, page.cursor.as_deref()), (Some(50), Some("c1")));
        let Body::PresenceState { next, .. } = decode(ws_payload(&f)).unwrap().body else {
            panic!()
        };
        assert_eq!(next, Some("c1"));
    }

    // ---- property tests: every frame type round-trips, and decoding is canonical ----

    fn channel() -> impl Strategy<Value = String> {
        "[A-Za-z0-9:_.@/=+!~$-]{1,200}"
    }

    fn position() -> impl Strategy<Value = StreamPosition> {
        (any::<u64>(), any::<u64>()).prop_map(|(e, seq)| StreamPosition {
            epoch: Epoch(e),
            seq,
        })
    }

    /// An owned frame description: the strategy's value, from which a borrowed [`Frame`] is made.
    #[derive(Debug, Clone)]
    enum Owned {
        Subscribe(
            String,
            Option<StreamPosition>,
            Option<(Option<String>, Option<String>)>,
        ),
        Unsubscribe(String),
        Presence(String, Option<(u64, String)>),
        PresenceState(String, u64, u64, Vec<u8>, Option<String>),
        PresenceEvent(String, u64, bool, OwnedMember),
        Gap(String, u64, u64),
        Publish(String, Option<String>, Option<u64>, Vec<u8>),
        Heartbeat,
        Subscribed(String, StreamPosition, bool),
        Unsubscribed(String),
        Published(String, StreamPosition),
        HeartbeatReply,
        Message(String, u64, bool, Vec<u8>),
        Error(String, String),
    }

    impl Owned {
        fn frame(&self, id: Option<u64>) -> Frame<'_> {
            let body = match self {
                Owned::Subscribe(c, r, p) => Body::Subscribe {
                    channel: c,
                    resume: *r,
                    presence: p.as_ref().map(|(user, info)| PresenceClaim {
                        user: user.as_deref(),
                        info: info.as_deref(),
                    }),
                },
                Owned::Presence(c, page) => Body::Presence {
                    channel: c,
                    page: page.as_ref().map(|(l, c)| (*l, c.as_str())),
                },
                Owned::PresenceState(c, seq, count, bytes, next) => Body::PresenceState {
                    channel: c,
                    seq: *seq,
                    members: Members {
                        count: *count,
                        bytes,
                    },
                    next: next.as_deref(),
                },
                Owned::Gap(c, from, to) => Body::Gap {
                    channel: c,
                    from: *from,
                    to: *to,
                },
                Owned::PresenceEvent(c, seq, join, m) => Body::PresenceEvent {
                    channel: c,
                    seq: *seq,
                    join: *join,
                    member: m.member(),
                },
                Owned::Unsubscribe(c) => Body::Unsubscribe { channel: c },
                Owned::Publish(c, k, s, p) => Body::Publish {
                    channel: c,
                    idempotency_key: k.as_deref(),
                    expected_seq: *s,
                    payload: p,
                },
                Owned::Heartbeat => Body::Heartbeat,
                Owned::Subscribed(c, p, r) => Body::Subscribed {
                    channel: c,
                    position: *p,
                    recovered: *r,
                },
                Owned::Unsubscribed(c) => Body::Unsubscribed { channel: c },
                Owned::Published(c, p) => Body::Published {
                    channel: c,
                    position: *p,
                },
                Owned::HeartbeatReply => Body::HeartbeatReply,
                Owned::Message(c, s, j, p) => Body::Message {
                    channel: c,
                    seq: *s,
                    json: *j,
                    payload: p,
                },
                Owned::Error(c, m) => Body::Error {
                    code: c,
                    message: m,
                },
            };
            let id = id.filter(|_| body.has_id());
            Frame { id, body }
        }
    }

    type OwnedMember = (String, String, Option<String>);

    trait MemberOf {
        fn member(&self) -> Member<'_>;
    }

    impl MemberOf for OwnedMember {
        fn member(&self) -> Member<'_> {
            Member {
                client: &self.0,
                user: &self.1,
                info: self.2.as_deref(),
            }
        }
    }

    fn member() -> impl Strategy<Value = OwnedMember> {
        (
            "[a-z0-9-]{1,24}",
            ".{0,40}",
            proptest::option::of("\\{.{0,60}\\}"),
        )
    }

    fn text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(".{1,80}")
    }

    /// Presence info as a client may send it: a JSON object on one line.
    fn info() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("[a-z]{0,20}".prop_map(|v| format!("{{\"k\":\"{v}\"}}")))
    }

    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), 64..1100),
        ]
    }

    fn owned() -> impl Strategy<Value = Owned> {
        prop_oneof![
            (
                channel(),
                proptest::option::of(position()),
                proptest::option::of((text(), info()))
            )
                .prop_map(|(c, r, p)| Owned::Subscribe(c, r, p)),
            (
                channel(),
                proptest::option::of((any::<u64>(), "[a-z0-9]{0,24}"))
            )
                .prop_map(|(c, p)| Owned::Presence(c, p)),
            (
                channel(),
                any::<u64>(),
                proptest::collection::vec(member(), 0..20),
                proptest::option::of("[a-z0-9]{0,24}")
            )
                .prop_map(|(c, seq, ms, next)| {
                    let mut bytes = Vec::new();
                    for m in &ms {
                        put_member(
                            &mut bytes,
                            m.0.as_bytes(),
                            m.1.as_bytes(),
                            m.2.as_deref().map(str::as_bytes),
                        );
                    }
                    Owned::PresenceState(c, seq, ms.len() as u64, bytes, next)
                }),
            (channel(), any::<u64>(), any::<bool>(), member())
                .prop_map(|(c, seq, j, m)| Owned::PresenceEvent(c, seq, j, m)),
            (channel(), any::<u64>(), any::<u64>()).prop_map(|(c, f, t)| Owned::Gap(c, f, t)),
            channel().prop_map(Owned::Unsubscribe),
            (
                channel(),
                proptest::option::of("[a-z0-9-]{0,128}"),
                proptest::option::of(any::<u64>()),
                payload()
            )
                .prop_map(|(c, k, s, p)| Owned::Publish(c, k, s, p)),
            Just(Owned::Heartbeat),
            (channel(), position(), any::<bool>()).prop_map(|(c, p, r)| Owned::Subscribed(c, p, r)),
            channel().prop_map(Owned::Unsubscribed),
            (channel(), position()).prop_map(|(c, p)| Owned::Published(c, p)),
            Just(Owned::HeartbeatReply),
            (channel(), any::<u64>(), any::<bool>(), payload())
                .prop_map(|(c, s, j, p)| Owned::Message(c, s, j, p)),
            ("[a-z_]{0,64}", ".{0,100}").prop_map(|(c, m)| Owned::Error(c, m)),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(o in owned(), id in proptest::option::of(any::<u64>())) {
            let f = o.frame(id);
            let bytes = enc(&f);
            prop_assert_eq!(decode(&bytes), Ok(f));
            // Commands also decode into the neutral types.
            if f.body.tag() & 0x80 == 0 {
                let r = decode_command(&bytes).unwrap();
                prop_assert_eq!(r.id, f.id.map(ReqId::Num));
            }
        }

        #[test]
        fn decoding_is_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Whatever decodes re-encodes to the same bytes; nothing panics.
            if let Ok(f) = decode(&bytes) {
                prop_assert_eq!(enc(&f), bytes.clone());
            }
            let _ = decode_command(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(o in owned(), pos in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = enc(&o.frame(Some(1)));
            let i = pos % bytes.len();
            bytes[i] = byte;
            if let Ok(f) = decode(&bytes) {
                prop_assert_eq!(enc(&f), bytes);
            }
        }
    }
}
