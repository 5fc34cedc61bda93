//! The read side of a WebSocket session, shared by `/ws` and Pusher's `/app/KEY`: reads into
//! the shard's scratch buffer, keeps only a partial frame per connection, and hands each whole
//! message to the session ([`Frames`]). What a message means is the session's business.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use crate::protocol::ws::{Decoder, Message, WsError, CLOSE_TOO_BIG};

/// Size of the shard's shared read buffer.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    /// Every WebSocket connection of the shard reads into this buffer; only a partial frame is
    /// kept per connection. Borrowed only inside one poll or one synchronous parse, never across
    /// an await.
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// A session that takes whole messages.
pub trait Frames {
    /// What `relay_refused_total` calls a message over `--max-message-size` on it.
    const NAME: &'static str;
    /// A whole message.
    fn on_message(&mut self, msg: Message<'_>);
    /// A frame broke the protocol: the session closes with `e.close_code()`.
    fn on_protocol_error(&mut self, e: WsError);
    /// Whether the session reads no more (it closed, or is closing).
    fn read_closed(&self) -> bool;
    /// The bytes of a frame not yet complete.
    fn partial(&mut self) -> &mut Partial;
}

/// The bytes of a frame not yet complete: boxed, and only while there are some, so that an
/// idle connection pays one word for it rather than a `BytesMut` (32 bytes in every session's
/// future; issue 12 item 4).
#[derive(Default)]
pub struct Partial(Option<Box<BytesMut>>);

impl Partial {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|b| b.is_empty())
    }

    /// Appends `data`.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.0.get_or_insert_default().extend_from_slice(data);
    }

    /// Takes the bytes, leaving none.
    pub fn take(&mut self) -> BytesMut {
        self.0.take().map(|b| *b).unwrap_or_default()
    }

    /// Keeps `buf` (nothing if it is empty).
    pub fn set(&mut self, buf: BytesMut) {
        self.0 = (!buf.is_empty()).then(|| Box::new(buf));
    }
}

/// Reads into the shard's buffer: the number of bytes read (0: the peer closed).
pub async fn read_some<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<usize> {
    poll_fn(|cx| poll_read_some(rd, cx)).await
}

/// [`read_some`] as a poll, for a driver that polls its sources itself.
pub fn poll_read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    SCRATCH_BUF.with(|b| {
        let mut b = b.borrow_mut();
        let mut buf = ReadBuf::new(&mut b[..]);
        ready!(Pin::new(&mut *rd).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(buf.filled().len()))
    })
}

/// Whether the peer has sent nothing we have not read (or has closed): one read that does not
/// wait; what it reads is discarded (the session is closing).
pub fn nothing_unread<R: AsyncRead + Unpin>(rd: &mut R) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    SCRATCH_BUF.with(|b| {
        let mut b = b.borrow_mut();
        let mut buf = ReadBuf::new(&mut b[..]);
        match Pin::new(rd).poll_read(&mut cx, &mut buf) {
            Poll::Pending | Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => buf.filled().is_empty(),
        }
    })
}

/// Hands the first `n` bytes of the shard's buffer (just read by [`read_some`]) to `s`.
pub fn on_scratch<S: Frames>(s: &mut S, decoder: &mut Decoder, n: usize) {
    SCRATCH_BUF.with(|b| {
        let mut b = b.borrow_mut();
        on_read(s, decoder, &mut b[..n]);
    });
}

/// Hands every whole message in `data` (after the partial frame kept from before) to `s`, and
/// keeps what is left of an incomplete frame.
pub fn on_read<S: Frames>(s: &mut S, decoder: &mut Decoder, data: &mut [u8]) {
    if s.partial().is_empty() {
        let used = parse(s, decoder, data);
        if used < data.len() && !s.read_closed() {
            s.partial().extend_from_slice(&data[used..]);
        }
    } else {
        s.partial().extend_from_slice(data);
        let mut buf = s.partial().take();
        let used = parse(s, decoder, &mut buf);
        buf.advance(used);
        if !s.read_closed() {
            s.partial().set(buf);
        }
    }
}

/// Handles every whole frame at the start of `buf`; returns the bytes consumed.
fn parse<S: Frames>(s: &mut S, decoder: &mut Decoder, buf: &mut [u8]) -> usize {
    let mut pos = 0;
    while !s.read_closed() {
        match decoder.decode(&mut buf[pos..]) {
            Ok(None) => break,
            Ok(Some((n, msg))) => {
                if let Some(msg) = msg {
                    s.on_message(msg);
                }
                pos += n;
            }
            Err(e) => {
                if e.close_code() == CLOSE_TOO_BIG {
                    crate::limits::refused(crate::limits::Cause::MessageTooLarge, S::NAME);
                }
                s.on_protocol_error(e);
            }
        }
    }
    pos
}
