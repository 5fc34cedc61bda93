//! The binary protocol (`relay.v1.bin`). Not negotiated yet: see issue 3. Until then it
//! renders events as JSON so that the shared dispatch compiles and stays total.

use bytes::Bytes;

/// Whether transports may negotiate `relay.v1.bin`.
pub const AVAILABLE: bool = false;

use super::{json, CommandError, Event, ReqId, Request};
use crate::types::{ChannelName, DataKind};

/// Decodes one binary command frame.
pub fn decode_command(_input: &[u8]) -> Result<Request<'_>, CommandError<'_>> {
    Err(CommandError {
        id: None,
        code: "unsupported_frame",
        message: "the binary protocol is not available".into(),
    })
}

/// A complete frame carrying `event`.
pub fn encode_event(id: Option<ReqId<'_>>, ev: &Event<'_>) -> Bytes {
    json::encode_event(id, ev)
}

/// The `message` frame of binary subscribers.
pub fn message(channel: &ChannelName, seq: u64, kind: DataKind, data: &[u8]) -> Bytes {
    json::message(channel, seq, kind, data)
}
