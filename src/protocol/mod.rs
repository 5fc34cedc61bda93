//! Wire formats, sans-IO: nothing here names a socket, a runtime or hyper.
//!
//! - [`ws`]: RFC 6455 frame decoding and encoding.
//! - [`json`]: the JSON command and event protocol.
//! - [`sse`]: Server-Sent Events formatting and the resume cursor.

pub mod json;
pub mod sse;
pub mod ws;

use bytes::Bytes;

use crate::engine::Publication;
use crate::types::ChannelName;

/// Frame-cache slot (and hub encoding) of JSON WebSocket subscribers.
pub const ENC_WS_JSON: usize = 0;
/// Frame-cache slot of SSE subscribers (the event body after its `id:` line).
pub const ENC_SSE: usize = 1;

/// The hub's encoder: builds the frame of `p` for `encoding`, once per publication.
pub fn encode_publication(encoding: usize, channel: &ChannelName, p: &Publication) -> Bytes {
    match encoding {
        ENC_SSE => sse::message(channel, p.seq, &p.data),
        _ => json::message(channel, p.seq, &p.data),
    }
}
