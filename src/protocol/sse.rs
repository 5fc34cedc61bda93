//! Server-Sent Events formatting and the multi-channel resume cursor. Sans-IO.
//!
//! A stream over channels `c1..cn` tags every event with the cursor `e1:s1,…,en:sn` (each
//! channel's epoch and last seq at that event, in the order of the request), so that a plain
//! `EventSource` reconnect (`Last-Event-ID`) resumes every channel at once.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

use super::json::json_string;
use crate::types::{ChannelName, DataKind, Epoch, StreamPosition};

/// A malformed cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// More positions than the stream may have channels.
    #[error("cursor has too many positions")]
    TooLong,
    /// A position is not `epoch:seq`.
    #[error("cursor position is not epoch:seq")]
    BadPosition,
}

/// Parses a cursor (`Last-Event-ID`) of at most `max` positions.
pub fn parse_cursor(s: &str, max: usize) -> Result<Vec<StreamPosition>, CursorError> {
    let s = s.trim();
    if s.len() > max.saturating_mul(40) {
        return Err(CursorError::TooLong);
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        if out.len() == max {
            return Err(CursorError::TooLong);
        }
        let (e, q) = part.split_once(':').ok_or(CursorError::BadPosition)?;
        let epoch = Epoch::parse(e).ok_or(CursorError::BadPosition)?;
        if q.is_empty() || q.len() > 20 || !q.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CursorError::BadPosition);
        }
        let seq = q.parse().map_err(|_| CursorError::BadPosition)?;
        out.push(StreamPosition { epoch, seq });
    }
    Ok(out)
}

/// Writes `id: <cursor>\n`. Once per delivery (the cursor is the stream's own), so the numbers
/// are written without `fmt`'s machinery: the epoch's hex digits by shifts, the seq by `itoa`
/// (a division by a radix only known at run time was a quarter of an SSE stream's CPU).
pub fn write_id(cursor: &[StreamPosition], out: &mut BytesMut) {
    out.put_slice(b"id: ");
    for (i, p) in cursor.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        put_hex(out, p.epoch.0);
        out.put_u8(b':');
        out.put_slice(itoa::Buffer::new().format(p.seq).as_bytes());
    }
    out.put_u8(b'\n');
}

/// Writes the `id:` line of message `seq` of a channel at `epoch` for a stream of that channel
/// alone: what [`write_id`] writes for its one-position cursor (`Encoder::stamp`).
pub fn stamp(epoch: Epoch, seq: u64, out: &mut BytesMut) {
    write_id(&[StreamPosition { epoch, seq }], out);
}

/// `v` in lowercase hex without leading zeros: what `{:x}` writes.
fn put_hex(out: &mut BytesMut, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = ((64 - v.leading_zeros() as usize).div_ceil(4)).max(1);
    let mut b = [0u8; 16];
    for (i, d) in b[..digits].iter_mut().enumerate() {
        *d = DIGITS[((v >> (4 * (digits - 1 - i))) & 0xf) as usize];
    }
    out.put_slice(&b[..digits]);
}

/// The `message` event body (everything after the `id:` line), shared by every SSE subscriber
/// of the channel. `data` must hold no line break (see `json::normalize_data`). The event has no
/// `event:` line: an unnamed event is a `message` event (EventSource dispatches it as
/// `message`, as the format says), and that line was a tenth of the bytes of a delivery.
pub fn message(channel: &ChannelName, seq: u64, kind: DataKind, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(data.len() * 4 / 3 + channel.as_str().len() + 48);
    b.put_slice(b"data: {\"channel\":\"");
    b.put_slice(channel.as_str().as_bytes());
    let _ = write!(b, "\",\"seq\":{seq},\"data\":");
    super::json::put_data(&mut b, kind, data);
    b.put_slice(b"}\n\n");
    b.freeze()
}

/// The `presence` event (no `id:`: it does not move the cursor).
pub fn presence(channel: &ChannelName, e: &crate::types::PresenceEvent) -> Bytes {
    let mut b = BytesMut::with_capacity(160);
    b.put_slice(b"event: presence\ndata: {\"channel\":\"");
    b.put_slice(channel.as_str().as_bytes());
    let _ = write!(b, "\",\"seq\":{},\"event\":\"{}\",", e.seq, e.kind());
    super::json::put_identity(&mut b, &e.who);
    b.put_slice(b"}\n\n");
    b.freeze()
}

/// A named event with a one-line JSON `data`.
pub fn event(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The `gap` event for a channel that could not be resumed.
pub fn gap(channel: &ChannelName, reason: &str, pos: StreamPosition) -> Bytes {
    event(
        "gap",
        &format!(
            "{{\"channel\":\"{channel}\",\"reason\":{},\"epoch\":\"{}\",\"seq\":{}}}",
            json_string(reason),
            pos.epoch,
            pos.seq
        ),
    )
}

/// The `gap` event of a slow reader under the `drop` policy: it missed `from..=to`.
pub fn dropped(channel: &ChannelName, from: u64, to: u64) -> Bytes {
    event(
        "gap",
        &format!(
            "{{\"channel\":\"{channel}\",\"reason\":\"dropped\",\"from\":{from},\"to\":{to}}}"
        ),
    )
}

/// The `retry:` hint that opens a stream.
pub fn retry(ms: u128) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

/// The keep-alive comment.
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cursor_round_trip() {
        let c = vec![
            StreamPosition {
                epoch: Epoch(0x9f2c),
                seq: 42,
            },
            StreamPosition {
                epoch: Epoch(1),
                seq: 0,
            },
        ];
        let mut b = BytesMut::new();
        write_id(&c, &mut b);
        assert_eq!(&b[..], b"id: 9f2c:42,1:0\n");
        let s = std::str::from_utf8(&b[4..b.len() - 1]).unwrap();
        assert_eq!(parse_cursor(s, 2).unwrap(), c);
    }

    proptest::proptest! {
        #[test]
        fn id_lines_are_what_display_writes(e: u64, q: u64, e2: u64, q2: u64) {
            let c = [
                StreamPosition { epoch: Epoch(e), seq: q },
                StreamPosition { epoch: Epoch(e2), seq: q2 },
            ];
            let mut b = BytesMut::new();
            write_id(&c, &mut b);
            let want = format!("id: {}:{q},{}:{q2}\n", Epoch(e), Epoch(e2));
            proptest::prop_assert_eq!(&b[..], want.as_bytes());
        }
    }

    #[test]
    fn id_lines_at_the_edges() {
        for (e, q) in [(0, 0), (1, 9), (0xf, 10), (u64::MAX, u64::MAX)] {
            let mut b = BytesMut::new();
            write_id(
                &[StreamPosition {
                    epoch: Epoch(e),
                    seq: q,
                }],
                &mut b,
            );
            assert_eq!(&b[..], format!("id: {e:x}:{q}\n").as_bytes());
        }
    }

    #[test]
    fn bad_cursors() {
        for s in [
            "",
            "x",
            "ab:",
            ":1",
            "ab:1,",
            "zz:1",
            "ab:-1",
            "ab:1x",
            "ab:99999999999999999999999",
        ] {
            assert_eq!(parse_cursor(s, 4), Err(CursorError::BadPosition), "{s:?}");
        }
        assert_eq!(parse_cursor("a:1,a:2,a:3", 2), Err(CursorError::TooLong));
    }

    #[test]
    fn message_event_shape() {
        let ch = ChannelName::new("a").unwrap();
        assert_eq!(
            &message(&ch, 7, DataKind::Json, b"[1]")[..],
            b"data: {\"channel\":\"a\",\"seq\":7,\"data\":[1]}\n\n"
        );
    }
}
