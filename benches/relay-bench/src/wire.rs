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
/// presented again with more bytes); `segments` hands the data bytes over in place instead.
#[derive(Debug, Default)]
pub struct Dechunk {
    /// Data bytes left in the current chunk.
    remaining: usize,
    /// The CRLF after a chunk's data is still to skip (bytes left of it).
    crlf: usize,
    /// The last (empty) chunk was seen.
    pub done: bool,
}

/// Longest chunk size line accepted (hex size plus extensions).
const MAX_SIZE_LINE: usize = 64;

impl Dechunk {
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize> {
        self.segments(input, |data| out.extend_from_slice(data))
    }

    /// Calls `data` with each run of data bytes in `input`, borrowed from it (a chunk cut by the
    /// end of `input` gives its first part now, the rest with the next call); returns how many
    /// input bytes it consumed, as [`Dechunk::feed`].
    pub fn segments(&mut self, input: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize> {
        let mut i = 0;
        while i < input.len() && !self.done {
            if self.remaining > 0 {
                let n = self.remaining.min(input.len() - i);
                data(&input[i..i + n]);
                i += n;
                self.remaining -= n;
                if self.remaining == 0 {
                    self.crlf = 2;
                }
            } else if self.crlf > 0 {
                i += 1;
                self.crlf -= 1;
            } else {
                let Some(eol) = memchr::memchr(b'\n', &input[i..]) else {
                    if input.len() - i > MAX_SIZE_LINE {
                        bail!("chunk size line too long");
                    }
                    break;
                };
                let size = chunk_size(&input[i..i + eol])?;
                i += eol + 1;
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

/// The size of a chunk size line (`1a3f;ext=…\r`, without its `\n`).
fn chunk_size(line: &[u8]) -> Result<usize> {
    if line.len() > MAX_SIZE_LINE {
        bail!("chunk size line too long");
    }
    let mut size: usize = 0;
    let mut digits = 0;
    for &b in line {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            b';' | b'\r' | b' ' | b'\t' => break,
            _ => bail!("bad chunk size line {:?}", String::from_utf8_lossy(line)),
        };
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(usize::from(d)))
            .ok_or_else(|| anyhow::anyhow!("chunk size overflows"))?;
        digits += 1;
    }
    if digits == 0 {
        bail!("bad chunk size line {:?}", String::from_utf8_lossy(line));
    }
    Ok(size)
}

/// Where the `data` of the event being read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Data {
    /// No `data:` line yet.
    None,
    /// In the segment being parsed, at this range.
    Here(usize, usize),
    /// Copied into `SseEvents::data` (it began in an earlier segment, or has several lines).
    Kept,
}

/// Streaming parser of an SSE body (after de-chunking): lines are found with `memchr` in the
/// bytes as they were read and an event's `data` is handed over in place. Only what a segment
/// boundary cuts is copied (the incomplete line at its end, the `data` of an event whose blank
/// line comes later), into buffers that are reused: no allocation per event. Between events, a
/// whole event in the shape relay writes (`id:`, `event:`, `data:`, blank line) is read in one
/// go ([`whole_event`]: three line ends found, no per-line field dispatch); anything else is
/// read line by line.
#[derive(Debug)]
pub struct SseEvents {
    /// An incomplete line left from the last segment.
    line: Vec<u8>,
    /// The `event:` name of the event being read (empty: none, which means `message`).
    name: Vec<u8>,
    data: Vec<u8>,
    at: Data,
}

impl Default for SseEvents {
    fn default() -> Self {
        Self {
            line: Vec::new(),
            name: Vec::new(),
            data: Vec::new(),
            at: Data::None,
        }
    }
}

impl SseEvents {
    /// Parses the next bytes of the stream (any split: mid-line, mid-field, mid-event); calls
    /// `event(name, data)` for each complete event that has a `data:` or `event:` line (a
    /// comment or a `retry:`-only block is none). The name is empty when the event has none.
    pub fn feed(&mut self, seg: &[u8], mut event: impl FnMut(&[u8], &[u8])) {
        let mut i = 0;
        if !self.line.is_empty() {
            let Some(n) = memchr::memchr(b'\n', seg) else {
                self.line.extend_from_slice(seg);
                return;
            };
            self.line.extend_from_slice(&seg[..n]);
            let line = std::mem::take(&mut self.line);
            self.on_line(&line, None, seg, &mut event);
            self.line = line;
            self.line.clear();
            i = n + 1;
        }
        loop {
            // Between events, a whole event in the shape relay writes is read in one go.
            if self.at == Data::None && self.name.is_empty() {
                if let Some(n) = whole_event(&seg[i..], &mut event) {
                    i += n;
                    continue;
                }
            }
            let Some(n) = memchr::memchr(b'\n', &seg[i..]) else {
                break;
            };
            self.on_line(&seg[i..i + n], Some(i), seg, &mut event);
            i += n + 1;
        }
        if let Data::Here(a, b) = self.at {
            self.data.clear();
            self.data.extend_from_slice(&seg[a..b]);
            self.at = Data::Kept;
        }
        self.line.extend_from_slice(&seg[i..]);
    }

    /// One line (without its `\n`); `start` is where it begins in `seg` when it is there (not
    /// rebuilt from a carried part).
    fn on_line(
        &mut self,
        line: &[u8],
        start: Option<usize>,
        seg: &[u8],
        event: &mut impl FnMut(&[u8], &[u8]),
    ) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            let data = match self.at {
                Data::None => &[][..],
                Data::Here(a, b) => &seg[a..b],
                Data::Kept => &self.data[..],
            };
            if self.at != Data::None || !self.name.is_empty() {
                event(&self.name, data);
            }
            self.name.clear();
            self.at = Data::None;
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(0) => return, // a comment (keep-alive)
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &line[line.len()..]),
        };
        match field {
            b"data" => match (self.at, start) {
                (Data::None, Some(s)) => {
                    let a = s + (value.as_ptr() as usize - line.as_ptr() as usize);
                    self.at = Data::Here(a, a + value.len());
                }
                (Data::None, None) => {
                    self.data.clear();
                    self.data.extend_from_slice(value);
                    self.at = Data::Kept;
                }
                // Several `data:` lines are one value joined by line breaks.
                (Data::Here(a, b), _) => {
                    self.data.clear();
                    self.data.extend_from_slice(&seg[a..b]);
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                    self.at = Data::Kept;
                }
                (Data::Kept, _) => {
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                }
            },
            b"event" => {
                self.name.clear();
                self.name.extend_from_slice(value);
            }
            _ => {} // `id:` (the cursor: the data carries the seq), `retry:`
        }
    }
}

/// The event at the front of `b` when it is whole and in the shape relay writes (an optional
/// `id: …` line, an optional `event: NAME` line, one `data: …` line, the blank line; each field
/// followed by one space, each line ended by a bare `\n`): calls `event(name, data)` and returns
/// the bytes it took, as the line-by-line parser would read the same lines. Anything else
/// (another field or order, several `data:` lines, CRLF, a comment, an event cut by the end of
/// `b`) is `None`, with nothing called: the caller reads it line by line.
fn whole_event(b: &[u8], event: &mut impl FnMut(&[u8], &[u8])) -> Option<usize> {
    let mut i = 0;
    if b.starts_with(b"id: ") {
        i = memchr::memchr(b'\n', b)? + 1;
    }
    let mut name: &[u8] = b"";
    if let Some(rest) = b[i..].strip_prefix(b"event: ") {
        let n = memchr::memchr(b'\n', rest)?;
        name = &rest[..n];
        i += 7 + n + 1;
    }
    let d = b[i..].strip_prefix(b"data: ")?;
    let n = memchr::memchr(b'\n', d)?;
    let data = &d[..n];
    if d.get(n + 1) != Some(&b'\n') || data.ends_with(b"\r") || name.ends_with(b"\r") {
        return None;
    }
    event(name, data);
    Some(i + 6 + n + 2)
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

/// Reads the decimal digits at the front of `b` (`None`: no digit, or more than a u64 holds).
/// The first 16 go eight at a time while eight bytes are all digits (a 19-digit send time is
/// read once per delivery: two 8-byte steps and three digits instead of 19 checked steps).
#[inline(always)]
fn digits(b: &[u8]) -> Option<(u64, usize)> {
    const ZEROS: u64 = u64::from_le_bytes([b'0'; 8]);
    const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    let mut v: u64 = 0;
    let mut n = 0;
    while n < 16 {
        let Some(w) = b
            .get(n..n + 8)
            .and_then(|c| <[u8; 8]>::try_from(c).ok())
            .map(u64::from_le_bytes)
        else {
            break;
        };
        // Every byte 0x30..=0x39 (no carry between bytes: each is at most 0x3f + 6).
        if w & HIGH != ZEROS || w.wrapping_add(0x0606_0606_0606_0606) & HIGH != ZEROS {
            break;
        }
        // The eight digits' value, first digit in the lowest byte: pairs, quads, then all.
        let x = w - ZEROS;
        let x = (x.wrapping_mul(10 << 8 | 1) >> 8) & 0x00FF_00FF_00FF_00FF;
        let x = (x.wrapping_mul(100 << 16 | 1) >> 16) & 0x0000_FFFF_0000_FFFF;
        let x = x.wrapping_mul(10_000 << 32 | 1) >> 32;
        v = v * 100_000_000 + x; // below 10^16: no overflow
        n += 8;
    }
    for &c in &b[n..] {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        n += 1;
    }
    (n > 0).then_some((v, n))
}

/// A stamp at the very start of `b`, in relay-bench's own layout: `{"t":T,"p":P,"s":S`.
///
/// This, [`digits`] and [`Finders::message`] are inlined into each delivery's caller: called,
/// they returned their `Option`s through the stack, written 8 bytes at a time and read back 16
/// at a time, a failed store-to-load forward at each of the two returns (about 11 % of
/// relay-bench's samples reading 13 M SSE deliveries/s; see benches/RESULTS.md, session 14).
#[inline(always)]
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
    #[inline(always)]
    pub fn message(&self, msg: &[u8]) -> (Option<u64>, Option<Stamp>) {
        self.message_fast(msg)
            .unwrap_or_else(|| (self.seq(msg), self.stamp(msg)))
    }

    #[inline(always)]
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
    fn digits_are_read_as_str_parse_reads_them() {
        let mut cases: Vec<String> = vec![
            "0".into(),
            "7".into(),
            "12345678".into(),
            "123456789".into(),
            "1234567812345678".into(),
            "1764000000123456789".into(),
            u64::MAX.to_string(),
            "18446744073709551616".into(), // u64::MAX + 1
            "99999999999999999999".into(),
            "000000000000000000000000042".into(),
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 1 + (x % 20) as usize;
            cases.push(x.to_string().chars().take(len).collect());
        }
        for digits_text in cases {
            for tail in ["", ",", "x\"", ":", "/", "9"] {
                let text = format!("{digits_text}{tail}");
                let all: String = text.chars().take_while(char::is_ascii_digit).collect();
                let want = all.parse::<u64>().ok().map(|v| (v, all.len()));
                assert_eq!(digits(text.as_bytes()), want, "{text:?}");
            }
        }
        assert_eq!(digits(b""), None);
        assert_eq!(digits(b",1"), None);
        // Bytes next to the digit range are not digits.
        assert_eq!(digits(b"12345678:2345678"), Some((12_345_678, 8)));
        assert_eq!(digits(b"1234567/12345678"), Some((1_234_567, 7)));
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

    /// Every event of an SSE body, fed in the given pieces, as (name, data) pairs.
    fn sse_events(pieces: &[&[u8]]) -> Vec<(String, String)> {
        let mut p = SseEvents::default();
        let mut got = Vec::new();
        for piece in pieces {
            p.feed(piece, |n, d| {
                got.push((
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(d).into_owned(),
                ));
            });
        }
        got
    }

    /// A stream as relay writes it (retry, cursor ids, named events, keep-alive comments),
    /// plus what the format allows and other servers write: CRLF line ends, an unnamed event,
    /// a field without a space after the colon, several `data:` lines, a `retry:`-only block.
    const SSE_BODY: &[u8] = b"retry: 1000\n\n\
        id: 9f2c:0\nevent: subscribed\ndata: {\"channels\":[]}\n\n\
        : keep-alive\n\n\
        id: 9f2c:1\nevent: message\ndata: {\"channel\":\"c0\",\"seq\":1,\"data\":{\"t\":5}}\n\n\
        id: 9f2c:2\r\nevent: message\r\ndata: {\"seq\":2}\r\n\r\n\
        id: 3\ndata:{\"plain\":3}\n\n\
        event: gap\ndata: line one\ndata: line two\n\n\
        retry: 5\n\n\
        : keep-alive\n\n\
        event:named\ndata: n\n\n\
        id: 7\nevent: a\nid: 8\ndata: y\n\n\
        data: a\nevent: b\n\n\
        event: c\r\ndata: d\n\n\
        data: e\r\n\n\
        data: f\n: a comment inside an event\n\n\
        id: 9\ndata: \n\n\
        event: only\n\n\
        event: message\ndata: last\n\n";

    fn sse_want() -> Vec<(String, String)> {
        [
            ("subscribed", r#"{"channels":[]}"#),
            ("message", r#"{"channel":"c0","seq":1,"data":{"t":5}}"#),
            ("message", r#"{"seq":2}"#),
            ("", r#"{"plain":3}"#),
            ("gap", "line one\nline two"),
            ("named", "n"),
            ("a", "y"),
            ("b", "a"),
            ("c", "d"),
            ("", "e"),
            ("", "f"),
            ("", ""),
            ("only", ""),
            ("message", "last"),
        ]
        .into_iter()
        .map(|(n, d)| (n.to_owned(), d.to_owned()))
        .collect()
    }

    #[test]
    fn sse_events_are_the_same_wherever_the_reads_split() {
        assert_eq!(sse_events(&[SSE_BODY]), sse_want());
        // Two pieces, cut at every byte (mid-line, mid-`id:`, mid-`data:`, between the two
        // line breaks of a blank line, between `\r` and `\n`)…
        for i in 0..=SSE_BODY.len() {
            let (a, b) = SSE_BODY.split_at(i);
            assert_eq!(sse_events(&[a, b]), sse_want(), "cut at {i}");
        }
        // … three pieces, cut at every pair of bytes …
        for i in 0..=SSE_BODY.len() {
            for j in i..=SSE_BODY.len() {
                let pieces = [&SSE_BODY[..i], &SSE_BODY[i..j], &SSE_BODY[j..]];
                assert_eq!(sse_events(&pieces), sse_want(), "cuts at {i} and {j}");
            }
        }
        // … and one byte at a time.
        let bytes: Vec<&[u8]> = SSE_BODY.chunks(1).collect();
        assert_eq!(sse_events(&bytes), sse_want());
    }

    #[test]
    fn relay_shaped_events_are_read_whole_and_others_line_by_line() {
        let mut got = Vec::new();
        let mut ev = |n: &[u8], d: &[u8]| got.push((n.to_vec(), d.to_vec()));
        let relay = b"id: 9f2c:1\nevent: message\ndata: {\"seq\":1}\n\nid: 9f2c:2\n";
        assert_eq!(
            whole_event(relay, &mut ev),
            Some(relay.len() - "id: 9f2c:2\n".len())
        );
        assert_eq!(whole_event(b"data: x\n\n", &mut ev), Some(9));
        for other in [
            &b"id: 1\nevent: message\ndata: {\"seq\":1}\n"[..], // no blank line yet
            b"id: 1\nevent: message\ndata: {\"se",
            b"id: 1\nevent: mess",
            b"id: 1",
            b"id: 1\r\nevent: message\r\ndata: x\r\n\r\n",
            b"event: message\ndata: x\r\n\n",
            b"event:message\ndata: x\n\n",
            b"data:x\n\n",
            b"data: x\ndata: y\n\n",
            b"data: x\nid: 2\n\n",
            b"event: a\nid: 2\ndata: x\n\n",
            b"retry: 5\n\n",
            b": keep-alive\n\n",
            b"\n",
            b"",
        ] {
            assert_eq!(whole_event(other, &mut ev), None, "{other:?}");
        }
        assert_eq!(
            got,
            [
                (b"message".to_vec(), br#"{"seq":1}"#.to_vec()),
                (Vec::new(), b"x".to_vec())
            ]
        );
    }

    #[test]
    fn comments_and_retry_blocks_are_no_events() {
        assert!(sse_events(&[b": keep-alive\n\n: keep-alive\n\nretry: 10\n\n\n"]).is_empty());
        // An event is not over until its blank line.
        assert!(sse_events(&[b"event: message\ndata: x\n"]).is_empty());
    }

    #[test]
    fn chunked_sse_gives_the_same_events_in_place() -> Result<()> {
        // The body in chunks of every size from 1 to 40 bytes, then read in every piece size:
        // chunk boundaries and read boundaries fall anywhere in the events.
        for chunk in 1..=40 {
            let mut body = Vec::new();
            for c in SSE_BODY.chunks(chunk) {
                body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            for read in [1, 2, 3, 7, 64, body.len()] {
                let mut d = Dechunk::default();
                let mut p = SseEvents::default();
                let mut got = Vec::new();
                let mut pending: Vec<u8> = Vec::new();
                for r in body.chunks(read) {
                    pending.extend_from_slice(r);
                    let used = d.segments(&pending, |seg| {
                        p.feed(seg, |n, v| {
                            got.push((
                                String::from_utf8_lossy(n).into_owned(),
                                String::from_utf8_lossy(v).into_owned(),
                            ));
                        });
                    })?;
                    pending.drain(..used);
                }
                assert_eq!(got, sse_want(), "chunks of {chunk}, reads of {read}");
                assert!(d.done);
            }
        }
        Ok(())
    }

    #[test]
    fn bad_chunk_size_lines_are_errors() {
        for bad in [&b"zz\r\n"[..], b"\r\n", b"fffffffffffffffffffff\r\n"] {
            let mut d = Dechunk::default();
            assert!(d.segments(bad, |_| {}).is_err(), "{bad:?}");
        }
        let mut d = Dechunk::default();
        assert!(d.segments(&[b'1'; 100], |_| {}).is_err());
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
