//! The bytes on the wire, parsed straight from the read buffer: server WebSocket frames (never
//! masked), HTTP response heads, chunked bodies, SSE events, and the few numbers relay-bench needs
//! from a message (`"seq":`, and the `t`/`p`/`s` fields of its own payload), found by substring
//! search rather than a JSON parse.

use anyhow::{bail, Result};
use memchr::memmem;

/// WebSocket opcodes.
pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest server frame accepted (the relay's own limit is 64 KiB by default).
const MAX_FRAME: u64 = 16 << 20;

/// One complete server frame at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
    /// Bytes of the buffer this frame takes (header + payload).
    pub len: usize,
}

/// Parses the server frame at the front of `buf`: `Ok(None)` when it is not complete yet.
pub fn parse_frame(buf: &[u8]) -> Result<Option<Frame<'_>>> {
    let (b0, b1) = match buf {
        [b0, b1, ..] => (*b0, *b1),
        _ => return Ok(None),
    };
    if b1 & 0x80 != 0 {
        bail!("masked frame from the server");
    }
    if b0 & 0x70 != 0 {
        bail!("reserved bits set in a server frame");
    }
    let (head, len) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (4usize, u64::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (10usize, u64::from_be_bytes(a))
            }
            None => return Ok(None),
        },
        n => (2usize, u64::from(n)),
    };
    if len > MAX_FRAME {
        bail!("server frame of {len} bytes");
    }
    let total = head + len as usize;
    match buf.get(head..total) {
        Some(payload) => Ok(Some(Frame {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            payload,
            len: total,
        })),
        None => Ok(None),
    }
}

/// Appends a client frame (FIN set, masked with the all-zero key, so the payload is copied as is:
/// still a valid masked frame, and no per-byte XOR).
pub fn client_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

/// A close frame with status 1000.
pub fn close_frame(out: &mut Vec<u8>) {
    client_frame(OP_CLOSE, &1000u16.to_be_bytes(), out);
}

/// The close code of a close frame's payload, if it has one.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

/// The upgrade request (a fixed key: relay-bench does not check the accept hash).
pub fn upgrade_request(host: &str, path: &str) -> String {
    upgrade_request_with(host, path, "")
}

/// The upgrade request with more header lines (`extra`, each ending in `\r\n`).
pub fn upgrade_request_with(host: &str, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Reads a WebSocket upgrade's response head from `s`; fails unless it is a 101. Returns the
/// bytes that came after the head (the first frames, if any).
pub async fn read_upgrade<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(512);
    let mut tmp = [0u8; 2048];
    let end = loop {
        if let Some(e) = head_end(&buf) {
            break e;
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            bail!("closed during the handshake");
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = parse_head(&buf[..end])?;
    if head.status != 101 {
        bail!("upgrade: status {}", head.status);
    }
    Ok(buf.split_off(end))
}

/// Where the head of an HTTP message ends (just past `\r\n\r\n`).
pub fn head_end(buf: &[u8]) -> Option<usize> {
    memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
}

/// The parts of an HTTP response head relay-bench cares about.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<usize>,
    pub chunked: bool,
    pub close: bool,
}

/// Parses a complete response head (`buf` ends with the blank line).
pub fn parse_head(buf: &[u8]) -> Result<Head> {
    let text = std::str::from_utf8(buf)?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 response: {status_line:?}");
    }
    let status: u16 = parts.next().unwrap_or_default().parse()?;
    let mut head = Head {
        status,
        close: version == "HTTP/1.0",
        ..Head::default()
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(value.parse()?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                head.close = true;
            } else if v.contains("keep-alive") {
                head.close = false;
            }
        }
    }
    Ok(head)
}

/// Streaming decoder of a chunked body: `feed` appends the data bytes found in `input` to `out`
/// and returns how many input bytes it consumed (the rest, an incomplete size line, must be
/// presented again with more bytes).
#[derive(Debug, Default)]
pub struct Dechunk {
    /// Data bytes left in the current chunk.
    remaining: usize,
    /// The CRLF after a chunk's data is still to skip (bytes left of it).
    crlf: usize,
    /// The last (empty) chunk was seen.
    pub done: bool,
}

impl Dechunk {
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize> {
        let mut i = 0;
        while i < input.len() && !self.done {
            if self.remaining > 0 {
                let n = self.remaining.min(input.len() - i);
                out.extend_from_slice(&input[i..i + n]);
                i += n;
                self.remaining -= n;
                if self.remaining == 0 {
                    self.crlf = 2;
                }
            } else if self.crlf > 0 {
                i += 1;
                self.crlf -= 1;
            } else {
                let Some(eol) = memmem::find(&input[i..], b"\r\n") else {
                    if input.len() - i > 64 {
                        bail!("chunk size line too long");
                    }
                    break;
                };
                let line = &input[i..i + eol];
                let hex = line.split(|&b| b == b';').next().unwrap_or_default();
                let size = usize::from_str_radix(std::str::from_utf8(hex)?.trim(), 16)?;
                i += eol + 2;
                if size == 0 {
                    self.done = true;
                } else {
                    self.remaining = size;
                }
            }
        }
        Ok(i)
    }
}

/// Precompiled searches for the numbers in a message.
pub struct Finders {
    seq: memmem::Finder<'static>,
    t: memmem::Finder<'static>,
    t_escaped: memmem::Finder<'static>,
    p: memmem::Finder<'static>,
    s: memmem::Finder<'static>,
    id: memmem::Finder<'static>,
    epoch: memmem::Finder<'static>,
}

impl Default for Finders {
    fn default() -> Self {
        Self {
            seq: memmem::Finder::new(b"\"seq\":"),
            t: memmem::Finder::new(b"\"t\":"),
            t_escaped: memmem::Finder::new(br#"{\"t\":"#),
            p: memmem::Finder::new(b",\"p\":"),
            s: memmem::Finder::new(b",\"s\":"),
            id: memmem::Finder::new(b"\"id\":"),
            epoch: memmem::Finder::new(b"\"epoch\":\""),
        }
    }
}

/// relay-bench's payload fields: send time (ns since the Unix epoch), publisher, its sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub t: u64,
    pub p: u32,
    pub s: u64,
}

/// Reads the decimal digits at the front of `b`.
fn digits(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        n += 1;
    }
    (n > 0).then_some((v, n))
}

/// A stamp at the very start of `b`, in relay-bench's own layout: `{"t":T,"p":P,"s":S`.
fn stamp_at(b: &[u8]) -> Option<Stamp> {
    let mut i = b.strip_prefix(br#"{"t":"#).map(|_| 5)?;
    let (t, n) = digits(&b[i..])?;
    i += n;
    i += b[i..].strip_prefix(br#","p":"#).map(|_| 5)?;
    let (p, n) = digits(&b[i..])?;
    i += n;
    i += b[i..].strip_prefix(br#","s":"#).map(|_| 5)?;
    let (s, _) = digits(&b[i..])?;
    Some(Stamp {
        t,
        p: u32::try_from(p).ok()?,
        s,
    })
}

impl Finders {
    /// The first `"seq":N` of a message (the relay's, which comes before `data`).
    pub fn seq(&self, msg: &[u8]) -> Option<u64> {
        let i = self.seq.find(msg)? + 6;
        digits(&msg[i..]).map(|(v, _)| v)
    }

    /// The first `"id":N` (the channel index relay-bench puts in its WebSocket publishes).
    pub fn id(&self, msg: &[u8]) -> Option<u64> {
        let i = self.id.find(msg)? + 5;
        digits(&msg[i..]).map(|(v, _)| v)
    }

    /// The text of the first `"epoch":"…"` string.
    pub fn epoch<'a>(&self, msg: &'a [u8]) -> Option<&'a [u8]> {
        let i = self.epoch.find(msg)? + 9;
        let n = memchr::memchr(b'"', &msg[i..])?;
        Some(&msg[i..i + n])
    }

    /// The server seq and relay-bench's stamp of a `message` frame or event data. Fast path for
    /// the exact shape relay and the Node relay write
    /// (`{"type":"message","channel":"…","seq":N,"data":{"t":…`, or `{"channel":"…","seq":N,…`
    /// over SSE): no search but one `memchr` for the end of the channel name. Anything else
    /// falls back to substring searches.
    pub fn message(&self, msg: &[u8]) -> (Option<u64>, Option<Stamp>) {
        self.message_fast(msg)
            .unwrap_or_else(|| (self.seq(msg), self.stamp(msg)))
    }

    fn message_fast(&self, msg: &[u8]) -> Option<(Option<u64>, Option<Stamp>)> {
        const WS: &[u8] = br#"{"type":"message","channel":""#;
        const SSE: &[u8] = br#"{"channel":""#;
        let start = if msg.starts_with(WS) {
            WS.len()
        } else if msg.starts_with(SSE) {
            SSE.len()
        } else {
            return None;
        };
        let mut i = start + memchr::memchr(b'"', &msg[start..])? + 1;
        i += msg[i..].strip_prefix(br#","seq":"#).map(|_| 7)?;
        let (seq, n) = digits(&msg[i..])?;
        i += n;
        i += msg[i..].strip_prefix(br#","data":"#).map(|_| 8)?;
        Some((Some(seq), Some(stamp_at(&msg[i..])?)))
    }

    /// relay-bench's stamp `{"t":T,"p":P,"s":S` anywhere in the message, or escaped inside a
    /// JSON string (`{\"t\":T,\"p\":P,\"s\":S`: a Pusher event's `data`).
    pub fn stamp(&self, msg: &[u8]) -> Option<Stamp> {
        if let Some(s) = stamp_at(msg) {
            return Some(s);
        }
        self.plain_stamp(msg).or_else(|| self.escaped_stamp(msg))
    }

    /// The stamp in a JSON string, as its exact escaped text (servers pass a string through).
    fn escaped_stamp(&self, msg: &[u8]) -> Option<Stamp> {
        let mut i = self.t_escaped.find(msg)? + br#"{\"t\":"#.len();
        let mut next = |key: &[u8]| {
            let (v, n) = digits(&msg[i..])?;
            i += n;
            if !key.is_empty() {
                i += msg[i..].strip_prefix(key).map(|_| key.len())?;
            }
            Some(v)
        };
        let t = next(br#",\"p\":"#)?;
        let p = next(br#",\"s\":"#)?;
        let s = next(b"")?;
        Some(Stamp {
            t,
            p: u32::try_from(p).ok()?,
            s,
        })
    }

    fn plain_stamp(&self, msg: &[u8]) -> Option<Stamp> {
        let mut i = self.t.find(msg)? + 4;
        let (t, n) = digits(&msg[i..])?;
        i += n;
        let rest = &msg[i..];
        if !rest.starts_with(b",\"p\":") {
            // Tolerate re-serialised payloads that add spaces.
            let j = self.p.find(rest)?;
            i += j;
        }
        i += 5;
        let (p, n) = digits(&msg[i..])?;
        i += n;
        let rest = &msg[i..];
        let j = if rest.starts_with(b",\"s\":") {
            0
        } else {
            self.s.find(rest)?
        };
        i += j + 5;
        let (s, _) = digits(&msg[i..])?;
        Some(Stamp {
            t,
            p: u32::try_from(p).ok()?,
            s,
        })
    }
}

/// Builds a payload of exactly `size` bytes (or the minimum, if `size` is smaller):
/// `{"t":T,"p":P,"s":S,"x":"xxx…"}`.
pub fn payload(out: &mut Vec<u8>, stamp: Stamp, size: usize) {
    use std::io::Write;
    let start = out.len();
    let _ = write!(
        out,
        "{{\"t\":{},\"p\":{},\"s\":{},\"x\":\"",
        stamp.t, stamp.p, stamp.s
    );
    let used = out.len() - start + 2;
    let pad = size.saturating_sub(used);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80 | opcode];
        let n = payload.len();
        if n < 126 {
            v.push(n as u8);
        } else if n <= 0xffff {
            v.push(126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn frames_of_every_length_form_parse_and_split() -> Result<()> {
        for n in [0usize, 1, 125, 126, 127, 300, 65535, 65536, 70000] {
            let body = vec![b'a'; n];
            let mut buf = server_frame(OP_TEXT, &body);
            buf.extend_from_slice(&server_frame(OP_PING, b"hi"));
            let first = parse_frame(&buf)?.ok_or_else(|| anyhow::anyhow!("incomplete"))?;
            assert_eq!(first.opcode, OP_TEXT);
            assert!(first.fin);
            assert_eq!(first.payload.len(), n);
            let len = first.len;
            let second = parse_frame(&buf[len..])?.ok_or_else(|| anyhow::anyhow!("incomplete"))?;
            assert_eq!((second.opcode, second.payload), (OP_PING, &b"hi"[..]));
            // Every strict prefix is incomplete, never an error.
            for cut in [0, 1, 2, 3, len.saturating_sub(1)] {
                if cut < len {
                    assert!(parse_frame(&buf[..cut])?.is_none(), "n={n} cut={cut}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn masked_or_reserved_server_frames_are_refused() {
        assert!(parse_frame(&[0x81, 0x80, 0, 0, 0, 0]).is_err());
        assert!(parse_frame(&[0xC1, 0x00]).is_err());
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(parse_frame(&huge).is_err());
    }

    #[test]
    fn client_frames_are_masked_with_a_zero_key() {
        let mut out = Vec::new();
        client_frame(OP_TEXT, b"abc", &mut out);
        assert_eq!(out, [0x81, 0x83, 0, 0, 0, 0, b'a', b'b', b'c']);
        out.clear();
        client_frame(OP_TEXT, &[b'z'; 200], &mut out);
        assert_eq!(&out[..4], &[0x81, 0x80 | 126, 0, 200]);
        assert_eq!(out.len(), 4 + 4 + 200);
    }

    #[test]
    fn a_stamp_escaped_in_a_json_string_is_found() {
        let mut p = Vec::new();
        let want = Stamp {
            t: 1_700_000_000_123_456_789,
            p: 2,
            s: 77,
        };
        payload(&mut p, want, 64);
        let mut frame = br#"{"event":"bench","channel":"c0","data":"#.to_vec();
        crate::pusher::push_json_string(&mut frame, &p);
        frame.push(b'}');
        let f = Finders::default();
        assert_eq!(f.stamp(&frame), Some(want));
        // A cut-off stamp is no stamp.
        let cut = br#"{"event":"bench","data":"{\"t\":17,\"p\":2}"}"#;
        assert_eq!(f.stamp(cut), None);
    }

    #[test]
    fn stamps_and_seqs_are_found_without_a_json_parse() {
        let f = Finders::default();
        let mut p = Vec::new();
        payload(
            &mut p,
            Stamp {
                t: 1_700_000_000_123_456_789,
                p: 3,
                s: 42,
            },
            64,
        );
        assert_eq!(p.len(), 64);
        let frame = [
            &br#"{"type":"message","channel":"c0","seq":17,"data":"#[..],
            &p,
            b"}",
        ]
        .concat();
        assert_eq!(f.seq(&frame), Some(17));
        let want = Stamp {
            t: 1_700_000_000_123_456_789,
            p: 3,
            s: 42,
        };
        assert_eq!(f.message(&frame), (Some(17), Some(want)));
        assert_eq!(f.message_fast(&frame), Some((Some(17), Some(want))));
        let sse = [&br#"{"channel":"c0","seq":9,"data":"#[..], &p, b"}"].concat();
        assert_eq!(f.message_fast(&sse), Some((Some(9), Some(want))));
        // Another field order still parses, by search.
        let odd = [
            &br#"{"type":"message","seq":5,"channel":"c0","data":"#[..],
            &p,
            b"}",
        ]
        .concat();
        assert_eq!(f.message_fast(&odd), None);
        assert_eq!(f.message(&odd), (Some(5), Some(want)));
        assert_eq!(
            f.stamp(&frame),
            Some(Stamp {
                t: 1_700_000_000_123_456_789,
                p: 3,
                s: 42
            })
        );
        assert_eq!(f.stamp(br#"{"t": 5, "p": 1, "s": 2}"#), None);
        assert_eq!(
            f.stamp(br#"{"t":5,"x":0,"p":1,"y":2,"s":2}"#),
            Some(Stamp { t: 5, p: 1, s: 2 })
        );
        assert_eq!(f.id(br#"{"type":"published","id":7,"seq":3}"#), Some(7));
        assert_eq!(
            f.epoch(br#"{"type":"subscribed","channel":"a","epoch":"9f2c","seq":4}"#),
            Some(&b"9f2c"[..])
        );
        assert_eq!(f.epoch(br#"{"type":"subscribed","epoch":"9f2"#), None);
    }

    #[test]
    fn heads_and_chunked_bodies() -> Result<()> {
        let raw = b"HTTP/1.1 201 Created\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n";
        let end = head_end(raw).ok_or_else(|| anyhow::anyhow!("no end"))?;
        let h = parse_head(&raw[..end])?;
        assert_eq!(
            h,
            Head {
                status: 201,
                content_length: Some(12),
                chunked: false,
                close: false
            }
        );
        let mut d = Dechunk::default();
        let mut out = Vec::new();
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
        // Byte by byte: every split point must work.
        let mut pending: Vec<u8> = Vec::new();
        for &b in body {
            pending.push(b);
            let used = d.feed(&pending, &mut out)?;
            pending.drain(..used);
        }
        assert_eq!(out, b"hello world");
        assert!(d.done);
        Ok(())
    }
}
