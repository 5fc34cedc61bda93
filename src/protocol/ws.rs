//! Sans-IO WebSocket framing (RFC 6455), server side: decoding client frames straight from a
//! read buffer, and building server frames.
//!
//! Why our own decoder: fastwebsockets does the handshake, but its reader keeps an 8 KiB buffer
//! per connection from the start. We read into a buffer shared by the shard and keep only the
//! partial frame (if any) per connection; see docs/ARCHITECTURE.md.

use bytes::{BufMut, Bytes, BytesMut};

/// Continuation frame.
pub const OP_CONTINUATION: u8 = 0x0;
/// Text frame.
pub const OP_TEXT: u8 = 0x1;
/// Binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Ping frame.
pub const OP_PING: u8 = 0x9;
/// Pong frame.
pub const OP_PONG: u8 = 0xA;

/// Close code: normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code: going away (idle timeout).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: protocol error.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code: invalid frame payload data (bad UTF-8).
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
/// Close code: message too big.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: internal error.
pub const CLOSE_INTERNAL: u16 = 1011;
/// Close code: service restart (shutdown; reconnect and resume).
pub const CLOSE_RESTART: u16 = 1012;
/// Close code: try again later (RFC 6455 registry): the node is over its memory budget.
pub const CLOSE_TRY_AGAIN: u16 = 1013;
/// Close code: slow consumer (reconnect and resume from the last seq).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;

/// Largest server frame header: 2 bytes + 8 bytes of length.
pub const MAX_HEADER: usize = 10;

/// A client frame that breaks the protocol. Each maps to the close code to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A rule of RFC 6455 was broken (close code 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or close reason is not UTF-8 (close code 1007).
    #[error("invalid utf-8")]
    InvalidUtf8,
    /// A message is larger than the limit (close code 1009), also once decompressed.
    #[error("message too big")]
    TooBig,
}

impl WsError {
    /// The close code to answer with.
    pub fn close_code(self) -> u16 {
        match self {
            WsError::Protocol(_) => CLOSE_PROTOCOL_ERROR,
            WsError::InvalidUtf8 => CLOSE_INVALID_PAYLOAD,
            WsError::TooBig => CLOSE_TOO_BIG,
        }
    }
}

/// One complete client message, borrowed from the read buffer or the decoder's fragment buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message (valid UTF-8).
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
    /// A ping with its payload.
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// A close frame: code (if any) and reason.
    Close(Option<u16>, &'a str),
}

/// Per-connection decoding state: only a message being assembled from fragments, if any.
#[derive(Debug, Default)]
pub struct Decoder {
    max_message: usize,
    /// Opcode of the fragmented message in progress (text or binary), if any.
    fragment_op: Option<u8>,
    /// The buffers of fragmented and compressed messages, made for the first such message:
    /// most connections send neither, and every connection's task holds its decoder (issue
    /// 12 item 4: two vectors inline were 40 bytes more in each task than one box).
    bufs: Option<Box<Bufs>>,
    release_fragments: bool,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
    /// The fragmented message in progress is compressed.
    compressed: bool,
}

/// A [`Decoder`]'s buffers.
#[derive(Debug, Default)]
struct Bufs {
    fragments: Vec<u8>,
    /// The last decompressed message (released like the fragments).
    inflated: Vec<u8>,
}

impl Decoder {
    /// A decoder refusing messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            ..Self::default()
        }
    }

    /// Takes compressed messages (RSV1) from now on: permessage-deflate was negotiated.
    pub fn with_deflate(mut self, on: bool) -> Self {
        self.deflate = on;
        self
    }

    /// Bytes held for a fragmented message in progress.
    pub fn held(&self) -> usize {
        self.bufs
            .as_ref()
            .map_or(0, |b| b.fragments.capacity() + b.inflated.capacity())
    }

    /// The buffers, made when first needed.
    fn bufs(&mut self) -> &mut Bufs {
        self.bufs.get_or_insert_with(Box::default)
    }

    /// Decodes the frame at the start of `buf`, unmasking it in place.
    ///
    /// - `Ok(None)`: `buf` does not hold a whole frame yet; keep it and read more. The header is
    ///   checked first, so an oversize or broken frame fails before its payload arrives.
    /// - `Ok(Some((n, None)))`: consumed `n` bytes, a fragment of a message still in progress.
    /// - `Ok(Some((n, Some(message))))`: consumed `n` bytes and completed a message.
    pub fn decode<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> Result<Option<(usize, Option<Message<'a>>)>, WsError> {
        if self.release_fragments {
            self.release_fragments = false;
            if let Some(b) = self.bufs.as_mut() {
                b.fragments.clear();
                if b.fragments.capacity() > 4096 {
                    b.fragments = Vec::new();
                }
                if b.inflated.capacity() > 4096 {
                    b.inflated = Vec::new();
                }
            }
        }
        let Some(h) = parse_header(buf)? else {
            return Ok(None);
        };
        if h.rsv & 0b011 != 0 {
            return Err(WsError::Protocol("reserved bits set without an extension"));
        }
        // RSV1 marks a compressed message, on its first frame only (RFC 7692 §6).
        let rsv1 = h.rsv & 0b100 != 0;
        if rsv1 && !(self.deflate && matches!(h.opcode, OP_TEXT | OP_BINARY)) {
            return Err(WsError::Protocol(if self.deflate {
                "RSV1 set on a control or continuation frame"
            } else {
                "reserved bits set without an extension"
            }));
        }
        if h.is_control() {
            if !h.fin {
                return Err(WsError::Protocol("fragmented control frame"));
            }
            if h.len > 125 {
                return Err(WsError::Protocol("control frame longer than 125 bytes"));
            }
        } else {
            match (h.opcode, self.fragment_op) {
                (OP_CONTINUATION, None) => {
                    return Err(WsError::Protocol("continuation without a message"))
                }
                (OP_TEXT | OP_BINARY, Some(_)) => {
                    return Err(WsError::Protocol("new message inside a fragmented one"))
                }
                _ => {}
            }
            let held = self.bufs.as_ref().map_or(0, |b| b.fragments.len());
            if h.len.saturating_add(held as u64) > self.max_message as u64 {
                return Err(WsError::TooBig);
            }
        }
        let total = h.header_len + h.len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let payload = &mut buf[h.header_len..total];
        fastwebsockets::unmask(payload, h.mask);
        let payload: &'a [u8] = payload;
        let msg = match h.opcode {
            OP_PING => Some(Message::Ping(payload)),
            OP_PONG => Some(Message::Pong(payload)),
            OP_CLOSE => Some(parse_close(payload)?),
            OP_TEXT | OP_BINARY if h.fin && rsv1 => {
                self.release_fragments = true;
                Some(self.inflate(h.opcode, payload)?)
            }
            OP_TEXT | OP_BINARY if h.fin => Some(data_message(h.opcode, payload)?),
            OP_TEXT | OP_BINARY => {
                self.fragment_op = Some(h.opcode);
                self.compressed = rsv1;
                self.bufs().fragments.extend_from_slice(payload);
                None
            }
            _ => {
                // OP_CONTINUATION with a message in progress.
                self.bufs().fragments.extend_from_slice(payload);
                if h.fin {
                    let op = self.fragment_op.take().unwrap_or(OP_BINARY);
                    self.release_fragments = true;
                    let max = self.max_message;
                    let compressed = std::mem::take(&mut self.compressed);
                    let b = self.bufs();
                    if compressed {
                        inflate_into(&b.fragments, max, &mut b.inflated)?;
                        Some(data_message(op, &b.inflated)?)
                    } else {
                        Some(data_message(op, &b.fragments)?)
                    }
                } else {
                    None
                }
            }
        };
        Ok(Some((total, msg)))
    }
}

impl Decoder {
    fn inflate(&mut self, opcode: u8, data: &[u8]) -> Result<Message<'_>, WsError> {
        let max = self.max_message;
        let b = self.bufs();
        inflate_into(data, max, &mut b.inflated)?;
        data_message(opcode, &b.inflated)
    }
}

/// Decompresses a whole compressed message into `inflated`, within the message limit.
fn inflate_into(data: &[u8], max_message: usize, inflated: &mut Vec<u8>) -> Result<(), WsError> {
    use super::deflate::{decompress, InflateError};
    decompress(data, max_message, inflated).map_err(|e| match e {
        InflateError::TooBig => WsError::TooBig,
        InflateError::Invalid => WsError::Protocol("invalid compressed data"),
    })
}

fn data_message(opcode: u8, payload: &[u8]) -> Result<Message<'_>, WsError> {
    if opcode == OP_TEXT {
        std::str::from_utf8(payload)
            .map(Message::Text)
            .map_err(|_| WsError::InvalidUtf8)
    } else {
        Ok(Message::Binary(payload))
    }
}

fn parse_close(payload: &[u8]) -> Result<Message<'_>, WsError> {
    match payload {
        [] => Ok(Message::Close(None, "")),
        [_] => Err(WsError::Protocol("close frame with a one-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(WsError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Message::Close(Some(code), reason))
        }
    }
}

#[derive(Debug)]
struct Header {
    fin: bool,
    /// RSV1..RSV3 as the low three bits (RSV1 = 0b100).
    rsv: u8,
    opcode: u8,
    mask: [u8; 4],
    len: u64,
    header_len: usize,
}

impl Header {
    fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

fn parse_header(buf: &[u8]) -> Result<Option<Header>, WsError> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(WsError::Protocol("reserved opcode"));
    }
    if b1 & 0x80 == 0 {
        return Err(WsError::Protocol("client frame is not masked"));
    }
    let (len, ext) = match b1 & 0x7F {
        126 => match rest {
            [a, b, ..] => (u64::from(u16::from_be_bytes([*a, *b])), 2),
            _ => return Ok(None),
        },
        127 => match rest.get(..8) {
            Some(s) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(s);
                let len = u64::from_be_bytes(a);
                if len >> 63 != 0 {
                    return Err(WsError::Protocol("64-bit length with the top bit set"));
                }
                (len, 8)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 0),
    };
    let Some(m) = rest.get(ext..ext + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0b111,
        opcode,
        mask: [m[0], m[1], m[2], m[3]],
        len,
        header_len: 2 + ext + 4,
    }))
}

/// Writes the header of an unmasked server frame into `out`, returning its length.
pub fn write_header(opcode: u8, len: usize, out: &mut [u8; MAX_HEADER]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Starts a frame whose payload is written in place after a reserved header: call
/// [`finish_frame`] when the payload is complete. One allocation per frame, no copy.
pub fn begin_frame(capacity: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(MAX_HEADER + capacity);
    buf.put_bytes(0, MAX_HEADER);
    buf
}

/// Completes a frame started by [`begin_frame`].
pub fn finish_frame(mut buf: BytesMut, opcode: u8) -> Bytes {
    let len = buf.len() - MAX_HEADER;
    let mut header = [0u8; MAX_HEADER];
    let n = write_header(opcode, len, &mut header);
    buf[MAX_HEADER - n..MAX_HEADER].copy_from_slice(&header[..n]);
    let _ = buf.split_to(MAX_HEADER - n);
    buf.freeze()
}

/// A whole server frame with `payload`.
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut buf = begin_frame(payload.len());
    buf.extend_from_slice(payload);
    finish_frame(buf, opcode)
}

/// A data frame with RSV1 set (a message compressed by permessage-deflate) carrying the
/// compressed bytes of `payload`, the payload of a plain frame of the same opcode.
pub fn compressed_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut z = Vec::new();
    super::deflate::compress(payload, &mut z);
    let mut buf = begin_frame(z.len());
    buf.extend_from_slice(&z);
    // The header's first byte is FIN | opcode: RSV1 (0x40) rides along with the opcode.
    finish_frame(buf, opcode | RSV1)
}

/// RSV1 in a frame's first byte: the message is compressed (permessage-deflate).
const RSV1: u8 = 0x40;

/// A close frame with `code` and a short `reason` (cut to fit 123 bytes).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut buf = begin_frame(2 + end);
    buf.extend_from_slice(&code.to_be_bytes());
    buf.extend_from_slice(&reason.as_bytes()[..end]);
    finish_frame(buf, OP_CLOSE)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A masked client frame.
    pub(crate) fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut v = vec![b0];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n <= 65535 => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    fn one(dec: &mut Decoder, bytes: &[u8]) -> Result<Option<(usize, Option<String>)>, WsError> {
        let mut buf = bytes.to_vec();
        dec.decode(&mut buf)
            .map(|o| o.map(|(n, m)| (n, m.map(|m| format!("{m:?}")))))
    }

    #[test]
    fn decodes_masked_text() {
        let mut d = Decoder::new(1024);
        let f = client_frame(0x81, b"Hello");
        assert_eq!(
            one(&mut d, &f).unwrap(),
            Some((f.len(), Some("Text(\"Hello\")".into())))
        );
    }

    #[test]
    fn every_split_point_is_incomplete_until_whole() {
        let mut d = Decoder::new(1 << 20);
        for len in [0, 5, 125, 126, 300, 70_000] {
            let f = client_frame(0x82, &vec![7u8; len]);
            for cut in 0..f.len().min(20) {
                assert_eq!(one(&mut d, &f[..cut]).unwrap(), None, "len {len} cut {cut}");
            }
            assert_eq!(one(&mut d, &f[..f.len() - 1]).unwrap(), None);
            let mut buf = f.clone();
            let (n, m) = d.decode(&mut buf).unwrap().unwrap();
            assert_eq!(n, f.len());
            assert_eq!(m, Some(Message::Binary(&vec![7u8; len][..])));
        }
    }

    #[test]
    fn fragments_reassemble_with_interleaved_ping() {
        let mut d = Decoder::new(1024);
        let mut wire = client_frame(0x01, b"Hel");
        wire.extend(client_frame(0x89, b"p"));
        wire.extend(client_frame(0x80, b"lo"));
        let mut pos = 0;
        let mut got = Vec::new();
        while pos < wire.len() {
            let (n, m) = d.decode(&mut wire[pos..]).unwrap().unwrap();
            if let Some(m) = m {
                got.push(format!("{m:?}"));
            }
            pos += n;
        }
        assert_eq!(got, ["Ping([112])", "Text(\"Hello\")"]);
    }

    #[test]
    fn protocol_violations_map_to_close_codes() {
        let mut d = Decoder::new(16);
        let unmasked = [0x81, 0x01, b'a'];
        assert_eq!(one(&mut d, &unmasked).unwrap_err().close_code(), 1002);
        assert_eq!(
            one(&mut d, &client_frame(0xC1, b"a"))
                .unwrap_err()
                .close_code(),
            1002
        );
        assert_eq!(
            one(&mut d, &client_frame(0x83, b"a"))
                .unwrap_err()
                .close_code(),
            1002
        );
        assert_eq!(
            one(&mut d, &client_frame(0x09, b"a"))
                .unwrap_err()
                .close_code(),
            1002
        );
        assert_eq!(
            one(&mut d, &client_frame(0x80, b"a"))
                .unwrap_err()
                .close_code(),
            1002
        );
        assert_eq!(
            one(&mut d, &client_frame(0x89, &[0; 126]))
                .unwrap_err()
                .close_code(),
            1002
        );
        assert_eq!(
            one(&mut d, &client_frame(0x81, &[0xff, 0xfe]))
                .unwrap_err()
                .close_code(),
            1007
        );
        assert_eq!(
            one(&mut d, &client_frame(0x88, &[0x03, 0xe8, 0xff]))
                .unwrap_err()
                .close_code(),
            1007
        );
        assert_eq!(
            one(&mut d, &client_frame(0x88, &[0x03]))
                .unwrap_err()
                .close_code(),
            1002
        );
        assert_eq!(
            one(&mut d, &client_frame(0x88, &[0x03, 0xed]))
                .unwrap_err()
                .close_code(),
            1002
        );
        // Too big is known from the header alone, before the payload arrives.
        let big = client_frame(0x82, &[0; 17]);
        assert_eq!(one(&mut d, &big[..8]).unwrap_err().close_code(), 1009);
    }

    #[test]
    fn fragmented_total_is_limited() {
        let mut d = Decoder::new(10);
        let mut f = client_frame(0x01, b"123456");
        let n = f.len();
        assert!(d
            .decode(&mut f)
            .unwrap()
            .is_some_and(|(m, x)| m == n && x.is_none()));
        let mut g = client_frame(0x80, b"123456");
        assert_eq!(d.decode(&mut g).unwrap_err(), WsError::TooBig);
    }

    #[test]
    fn server_frames_have_minimal_headers() {
        assert_eq!(&frame(OP_TEXT, b"hi")[..], b"\x81\x02hi");
        let f = frame(OP_BINARY, &[1; 300]);
        assert_eq!(&f[..4], &[0x82, 126, 1, 44]);
        assert_eq!(f.len(), 304);
        let f = frame(OP_BINARY, &[1; 70_000]);
        assert_eq!(f[1], 127);
        assert_eq!(f.len(), 70_010);
        assert_eq!(&close_frame(1012, "bye")[..], b"\x88\x05\x03\xf4bye");
    }
}
