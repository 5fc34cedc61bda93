//! permessage-deflate (RFC 7692), sans-IO: the handshake's offer, and compressing and
//! decompressing one message at a time.
//!
//! We accept only with `server_no_context_takeover` and `client_no_context_takeover`: every
//! message is compressed on its own, so one compressed frame of a publication is valid for
//! every subscriber (compressed once, shared like the plain frame), and no connection keeps a
//! 32 KiB window for either direction. The compressor and decompressor are one per thread
//! (per shard), reset between messages.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use bytes::Bytes;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The `Sec-WebSocket-Extensions` response header when an offer is accepted.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The tail a sync flush ends with, removed from every compressed message (RFC 7692 §7.2.1)
/// and put back before decompressing (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Whether the client's `Sec-WebSocket-Extensions` values hold a permessage-deflate offer we
/// can accept: one whose parameters are all known, none twice, and none that asks us for a
/// window under 15 bits (our compressor uses the full window; asking for it is fine).
pub fn accepts<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> bool {
    values.into_iter().any(|v| {
        std::str::from_utf8(v)
            .map(|v| v.split(',').any(acceptable_offer))
            .unwrap_or(false)
    })
}

fn acceptable_offer(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if parts.next() != Some("permessage-deflate") {
        return false;
    }
    let mut seen = [false; 4];
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        let (i, ok) = match name {
            "server_no_context_takeover" => (0, value.is_none()),
            "client_no_context_takeover" => (1, value.is_none()),
            // The client may limit our window only to what we use anyway.
            "server_max_window_bits" => (2, value == Some("15")),
            // The client's own window: with no context takeover we keep none, any size works.
            "client_max_window_bits" => (
                3,
                value.is_none_or(|v| v.parse::<u8>().is_ok_and(|b| (8..=15).contains(&b))),
            ),
            _ => return false,
        };
        if !ok || std::mem::replace(&mut seen[i], true) {
            return false;
        }
    }
    true
}

/// Messages shorter than this go out uncompressed (`--deflate-min-size`). One value per
/// process, set once at start: the hub's encoders are plain functions.
static MIN_SIZE: AtomicUsize = AtomicUsize::new(256);

/// Sets `--deflate-min-size`.
pub fn set_min_size(bytes: usize) {
    MIN_SIZE.store(bytes, Relaxed);
}

/// The frame to send a permessage-deflate connection for the server frame `plain` (a
/// complete unmasked data frame): the same frame when its payload is under the minimum size or
/// would not shrink, else its payload compressed in a frame with RSV1 set. Built once per
/// publication and shared by every such subscriber.
pub fn frame_of(plain: Bytes) -> Bytes {
    let header = match plain.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return plain,
    };
    let (Some(&b0), Some(payload)) = (plain.first(), plain.get(header..)) else {
        return plain;
    };
    if payload.len() < MIN_SIZE.load(Relaxed) {
        return plain;
    }
    let z = super::ws::compressed_frame(b0 & 0x0f, payload);
    if z.len() < plain.len() {
        z
    } else {
        plain
    }
}

thread_local! {
    static COMPRESS: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
    static DECOMPRESS: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Compresses one message payload into `out` (appended), ready to go out as the payload of a
/// frame with RSV1 set.
pub fn compress(payload: &[u8], out: &mut Vec<u8>) {
    COMPRESS.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        out.reserve(payload.len() / 2 + 16);
        let start = c.total_in();
        loop {
            let used = (c.total_in() - start) as usize;
            // Cannot fail: a raw deflate stream with a buffer to write to.
            let _ = c.compress_vec(&payload[used..], out, FlushCompress::Sync);
            // Done once all the input is in and the flush did not fill the buffer.
            if (c.total_in() - start) as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
    });
}

/// Why an inbound compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the message size limit (a zip bomb, or just too big): close with 1009.
    TooBig,
    /// Not a valid DEFLATE stream: close with 1007.
    Invalid,
}

/// Decompresses one message (the payload of its frames, RSV1 set on the first) into `out`
/// (cleared first), refusing to produce more than `limit` bytes: the work and memory a
/// message can cost stay bounded by the limit whatever its compression ratio.
pub fn decompress(data: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
    out.clear();
    DECOMPRESS.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let start = d.total_in();
        let whole = data.len() + TAIL.len();
        loop {
            // The message's bytes, then the tail: one stream to the inflater.
            let used = (d.total_in() - start) as usize;
            let input = match data.get(used..) {
                Some(rest) if !rest.is_empty() => rest,
                _ => &TAIL[used.saturating_sub(data.len()).min(TAIL.len())..],
            };
            if out.len() == out.capacity() {
                // One byte past the limit tells "too big" from "exactly the limit".
                let room = out.len().max(256).min(limit + 1 - out.len());
                out.reserve_exact(room);
            }
            let before = (d.total_in(), d.total_out());
            match d.decompress_vec(input, out, FlushDecompress::Sync) {
                Ok(Status::StreamEnd) => return Ok(()),
                Ok(_) => {}
                Err(_) => return Err(InflateError::Invalid),
            }
            if out.len() > limit {
                return Err(InflateError::TooBig);
            }
            let room_left = out.len() < out.capacity();
            if (d.total_in() - start) as usize == whole && room_left {
                // Everything is in and the inflater stopped with room to spare: done.
                return Ok(());
            }
            if (d.total_in(), d.total_out()) == before && room_left {
                // No progress with input and room: the stream is stuck (truncated).
                return Err(InflateError::Invalid);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn offers_are_accepted_only_when_we_can_honour_them() {
        let ok = |h: &str| accepts([h.as_bytes()]);
        assert!(ok("permessage-deflate"));
        assert!(ok("permessage-deflate; client_max_window_bits"));
        assert!(ok("permessage-deflate; client_max_window_bits=10"));
        assert!(ok(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ));
        assert!(ok("x-webkit-deflate-frame, permessage-deflate"));
        assert!(ok(
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ));
        assert!(!ok("permessage-deflate; server_max_window_bits=10"));
        assert!(!ok(
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
        ));
        assert!(!ok("permessage-deflate; mystery"));
        assert!(!ok("permessage-deflate; client_max_window_bits=16"));
        assert!(!ok("x-webkit-deflate-frame"));
        assert!(!accepts([] as [&[u8]; 0]));
    }

    #[test]
    fn a_message_round_trips_and_compresses() {
        let msg = br#"{"type":"message","channel":"c","seq":1,"data":{"a":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}}"#.repeat(20);
        let mut z = Vec::new();
        compress(&msg, &mut z);
        assert!(z.len() < msg.len() / 4, "{} of {}", z.len(), msg.len());
        assert!(!z.ends_with(&TAIL));
        let mut back = Vec::new();
        decompress(&z, msg.len(), &mut back).unwrap();
        assert_eq!(back, msg);
        // Each message stands alone (no context taken over): the same bytes again.
        let mut z2 = Vec::new();
        compress(&msg, &mut z2);
        assert_eq!(z, z2);
        let mut empty = Vec::new();
        compress(b"", &mut empty);
        decompress(&empty, 0, &mut back).unwrap();
        assert!(back.is_empty());
    }

    #[test]
    fn both_wires_get_their_own_frames_compressed_and_the_rest_plain() {
        use crate::protocol::*;
        use crate::types::Publication;
        use crate::types::{ChannelName, DataKind};
        let ch = ChannelName::new("c").unwrap();
        let data = Bytes::from(vec![b'7'; 4096]);
        let p = Publication::new(1, std::time::Instant::now(), DataKind::Json, data);
        for (plain_enc, z_enc) in [
            (ENC_WS_JSON, ENC_WS_JSON_DEFLATE),
            (ENC_WS_BIN, ENC_WS_BIN_DEFLATE),
        ] {
            let plain = p.frame(plain_enc, |p| encode_publication(plain_enc, &ch, p));
            let z = p.frame(z_enc, |p| encode_publication(z_enc, &ch, p));
            assert_eq!(z[0], plain[0] | 0x40, "same opcode, RSV1 set");
            let (hz, hp) = (if z[1] & 0x7f == 126 { 4 } else { 2 }, 4);
            let mut back = Vec::new();
            decompress(&z[hz..], 1 << 20, &mut back).unwrap();
            assert_eq!(back, &plain[hp..]);
            assert_eq!(
                encode_gap(z_enc, &ch, 1, 2),
                encode_gap(plain_enc, &ch, 1, 2),
                "gap notices go plain in the connection's own protocol"
            );
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit_and_garbage_is_refused() {
        let big = vec![b'a'; 10 << 20];
        let mut z = Vec::new();
        compress(&big, &mut z);
        assert!(z.len() < 64 << 10);
        let mut out = Vec::new();
        assert_eq!(
            decompress(&z, 64 << 10, &mut out),
            Err(InflateError::TooBig)
        );
        assert!(out.capacity() <= (64 << 10) + 1024, "{}", out.capacity());
        assert_eq!(
            decompress(b"\xff\xff\xff\xff\xff", 1 << 20, &mut out),
            Err(InflateError::Invalid)
        );
    }
}
