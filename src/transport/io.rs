//! The socket of an accepted connection, with the bounds that hyper does not keep: a write
//! that makes no progress for `--write-timeout` fails (and the socket is reset), the bytes read
//! past a PROXY protocol header are served first, and, for HTTP/2, reads and writes are counted
//! so that an idle connection can be found.
//!
//! **Invariant:** a client that stops reading holds nothing of ours past `--write-timeout`:
//! hyper's buffered response, an SSE stream or a WebSocket session's outbox go with the socket.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::tcp::WriteHalf;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::engine::outbox::Sink;
use crate::proxy::{parse_proxy_header, ProxyHeaderError};

/// The deadline of a stalled write: armed when a write cannot proceed, cleared by any
/// progress. Every connection holds one: it is kept to two words.
pub struct WriteDeadline {
    /// In milliseconds (0: none).
    timeout_ms: u32,
    /// The connection's write timeout is counted (`relay_refused_total{cause="write_timeout"}`):
    /// once per connection, whether our deadline or the kernel's fired, on a read or a write.
    counted: bool,
    /// Boxed only while a write waits: an idle connection pays one word.
    stall: Option<Pin<Box<Sleep>>>,
}

impl WriteDeadline {
    /// A deadline of `timeout` (zero: none; rounded up to whole milliseconds).
    pub fn new(timeout: Duration) -> WriteDeadline {
        let ms = timeout.as_nanos().div_ceil(1_000_000);
        WriteDeadline {
            timeout_ms: u32::try_from(ms).unwrap_or(u32::MAX),
            counted: false,
            stall: None,
        }
    }

    /// The timeout (zero: none).
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.timeout_ms))
    }

    /// Counts the connection's write timeout, the first time only; whether it did.
    fn count(&mut self) -> bool {
        let first = !std::mem::replace(&mut self.counted, true);
        if first {
            crate::limits::refused(
                crate::limits::Cause::WriteTimeout,
                "the client stopped reading",
            );
        }
        first
    }

    /// Counts a socket error that is the kernel's TCP_USER_TIMEOUT: it is set to the same
    /// `--write-timeout` as our own deadline, so whichever fires first (a read or a write may
    /// see it, or both), the cause is the same: the client stopped reading.
    /// Whether it counted one.
    fn kernel_timeout<T>(&mut self, r: &Poll<io::Result<T>>) -> bool {
        matches!(r, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::TimedOut) && self.count()
    }

    /// Passes on the result of a write (`write: true`), flush or shutdown; pending with no
    /// write done for the whole timeout, it becomes a `TimedOut` error, and `tcp` is set to
    /// reset when it closes (so the kernel drops its unsent bytes at once instead of retrying
    /// them for minutes). Only a write that went through is progress: a flush of a socket is
    /// ready whether or not the peer reads.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &TcpStream,
        r: Poll<io::Result<T>>,
        write: bool,
    ) -> Poll<io::Result<T>> {
        if r.is_ready() || self.timeout_ms == 0 {
            if write {
                self.stall = None;
            }
            // The kernel gives up on unacknowledged data after TCP_USER_TIMEOUT, which is set to
            // the same --write-timeout: whichever of the two fires first, the cause is the same.
            self.kernel_timeout(&r);
            return r;
        }
        let timeout = self.timeout();
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stall.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stall = None;
        let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
        self.count();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "write timeout: the client read nothing",
        )))
    }
}

/// An accepted TCP connection. See the module docs.
pub struct TimedIo {
    tcp: TcpStream,
    /// Read past the PROXY header: the connection's first bytes.
    pre: Bytes,
    write: WriteDeadline,
    /// Counts reads and writes that moved bytes (HTTP/2 idle detection only).
    activity: Option<Arc<AtomicU64>>,
}

impl TimedIo {
    /// `tcp` with writes bounded by `write_timeout`.
    pub fn new(tcp: TcpStream, write_timeout: Duration) -> TimedIo {
        TimedIo {
            tcp,
            pre: Bytes::new(),
            write: WriteDeadline::new(write_timeout),
            activity: None,
        }
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The socket, to answer on it before anything is served (plain HTTP on the TLS port).
    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    /// Whether no bytes were read ahead (past a PROXY header): the socket shows the first.
    pub fn nothing_read_ahead(&self) -> bool {
        self.pre.is_empty()
    }

    /// Reads the connection's PROXY protocol header: the client's address, or `None` for the
    /// proxy's own connections. What came after the header is read next.
    pub async fn read_proxy_header(&mut self) -> Result<Option<IpAddr>, ProxyHeaderError> {
        let mut buf = BytesMut::with_capacity(256);
        loop {
            let n = self
                .tcp
                .read_buf(&mut buf)
                .await
                .map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
            if n == 0 {
                return Err(ProxyHeaderError::Missing);
            }
            if let Some(h) = parse_proxy_header(&buf)? {
                buf.advance(h.len);
                self.pre = buf.freeze();
                return Ok(h.source);
            }
        }
    }

    /// Starts counting the reads and writes that move bytes.
    pub fn track_activity(&mut self) -> Arc<AtomicU64> {
        self.activity.get_or_insert_with(Default::default).clone()
    }

    /// The socket, the bytes read but not yet served, and the write timeout: what an upgraded
    /// WebSocket session keeps (a [`SessionTcp`]; a Pusher session splits the socket and wraps
    /// the write half in a [`TimedWrite`]), and nothing else, since it lives as long as the
    /// session.
    pub fn into_parts(self) -> (TcpStream, Bytes, Duration) {
        (self.tcp, self.pre, self.write.timeout())
    }

    /// `self` with `more` (bytes hyper read past a WebSocket upgrade request) served after
    /// what is already read ahead, before the socket.
    pub fn read_ahead(mut self, more: Bytes) -> TimedIo {
        // Even empty, `more` is a slice of hyper's read buffer and would pin it (8 KiB or
        // more) for the session's whole life: kept only with bytes in it, and only until they
        // are read.
        if more.is_empty() {
            return self;
        }
        self.pre = if self.pre.is_empty() {
            more
        } else {
            [&self.pre[..], &more[..]].concat().into()
        };
        self
    }

    fn moved(&self) {
        if let Some(a) = &self.activity {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Serves what was read ahead (past a PROXY header, or by hyper) into `buf`, if anything was:
/// whether it did.
fn read_ahead(pre: &mut Bytes, buf: &mut ReadBuf<'_>) -> bool {
    if pre.is_empty() {
        return false;
    }
    let n = pre.len().min(buf.remaining());
    buf.put_slice(&pre[..n]);
    pre.advance(n);
    if pre.is_empty() {
        // An empty slice of hyper's read buffer would still pin it (about 8 KiB) for a
        // WebSocket session's whole life.
        *pre = Bytes::new();
    }
    true
}

impl AsyncRead for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if read_ahead(&mut this.pre, buf) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.moved();
        }
        this.write.kernel_timeout(&r);
        r
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        this.write.check(cx, &this.tcp, r, true)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // One slice: `send(2)` rather than `writev(2)` (see `try_send`).
        if let [one] = bufs {
            return self.poll_write(cx, one);
        }
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        this.write.check(cx, &this.tcp, r, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_flush(cx);
        this.write.check(cx, &this.tcp, r, false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_shutdown(cx);
        this.write.check(cx, &this.tcp, r, false)
    }
}

/// The write half of a WebSocket session's connection, with its write deadline.
pub struct TimedWrite<'a> {
    wr: WriteHalf<'a>,
    write: WriteDeadline,
}

impl<'a> TimedWrite<'a> {
    /// `wr` with writes bounded by `timeout`.
    pub fn new(wr: WriteHalf<'a>, timeout: Duration) -> TimedWrite<'a> {
        TimedWrite {
            wr,
            write: WriteDeadline::new(timeout),
        }
    }
}

impl AsyncWrite for TimedWrite<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.wr).poll_write(cx, data);
        this.write.check(cx, this.wr.as_ref(), r, true)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // One slice: `send(2)` rather than `writev(2)` (see `try_send`).
        if let [one] = bufs {
            return self.poll_write(cx, one);
        }
        let this = self.get_mut();
        let r = Pin::new(&mut this.wr).poll_write_vectored(cx, bufs);
        this.write.check(cx, this.wr.as_ref(), r, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.wr.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.wr).poll_flush(cx);
        this.write.check(cx, this.wr.as_ref(), r, false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.wr).poll_shutdown(cx);
        this.write.check(cx, this.wr.as_ref(), r, false)
    }
}

/// A pump pass writes to a session's socket directly while the session's writer is idle
/// (`Outbox::write_direct`): without waiting, and only if tokio knows it writable.
impl Sink for TcpStream {
    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        try_send(self, bufs)
    }
}

/// One non-blocking write of `bufs` to `tcp` (`WouldBlock` clears tokio's readiness, as
/// `TcpStream::try_write_vectored` does): `send(2)` for one slice, `sendmsg(2)` for more, not
/// `writev(2)`. A socket's `writev` goes through the file layer first (`vfs_writev`,
/// `fdget_pos`, the file hooks) before it reaches the socket's `sendmsg`; with one small frame
/// per write, the common case when a pump pass writes each subscriber's socket directly, that
/// layer is a visible part of the write: at 12,975 publishes/s to 10,000 subscribers over
/// 1,000 channels, 11–14 % of the server's CPU sat between the syscall entry and `tcp_sendmsg`
/// with `writev`, 9 % with `send`/`sendmsg` (`benches/RESULTS.md`, "send, not writev").
pub fn try_send(tcp: &TcpStream, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    tcp.try_io(tokio::io::Interest::WRITABLE, || send_now(tcp, bufs))
}

/// One write of `bufs` to a non-blocking socket: `send(2)` for one slice, `sendmsg(2)` for
/// more (`MSG_NOSIGNAL`: a closed peer is an error, not a signal).
fn send_now(sock: &impl std::os::fd::AsFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    let sock = socket2::SockRef::from(sock);
    match bufs {
        [one] => sock.send_with_flags(one, libc::MSG_NOSIGNAL),
        _ => sock.send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL),
    }
}

/// A parked session's socket (`super::park`): out of the runtime, written by pump passes
/// without waiting, as [`try_send`] does (no readiness to clear).
impl Sink for std::net::TcpStream {
    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        send_now(self, bufs)
    }
}

/// What [`SessionIo::park`] did.
pub enum Parking {
    /// The socket, out of the runtime (non-blocking).
    Parked(std::net::TcpStream),
    /// Not parkable (TLS, bytes read ahead, a write waiting, the socket shared): as it was.
    Busy(SessionIo),
    /// The runtime could not let the socket go: it is closed.
    Lost(io::Error),
}

/// The plain TCP socket of a WebSocket session, shared (`Rc`) with the session's outbox so
/// that a pump pass can write to it while the session's writer is idle; the session reads it
/// and writes the rest, through the `&self` readiness API (`poll_*_ready`, `try_*`), with the
/// write deadline, the bytes read ahead served first.
pub struct SessionTcp {
    tcp: Rc<TcpStream>,
    pre: Bytes,
    write: WriteDeadline,
}

impl SessionTcp {
    fn new(io: TimedIo) -> SessionTcp {
        let (tcp, pre, timeout) = io.into_parts();
        SessionTcp {
            tcp: Rc::new(tcp),
            pre,
            write: WriteDeadline::new(timeout),
        }
    }

    /// Waits until the socket is `ready`, then does `op` once it does not block.
    fn poll_io<T>(
        cx: &mut Context<'_>,
        mut ready: impl FnMut(&mut Context<'_>) -> Poll<io::Result<()>>,
        mut op: impl FnMut() -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            std::task::ready!(ready(cx))?;
            match op() {
                // tokio cleared its readiness: the next poll registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncRead for SessionTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if read_ahead(&mut this.pre, buf) {
            return Poll::Ready(Ok(()));
        }
        let tcp = &*this.tcp;
        let r = Self::poll_io(
            cx,
            |cx| tcp.poll_read_ready(cx),
            || tcp.try_read(buf.initialize_unfilled()),
        );
        let r = r.map_ok(|n| buf.advance(n));
        this.write.kernel_timeout(&r);
        r
    }
}

impl AsyncWrite for SessionTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let tcp = &*this.tcp;
        let r = Self::poll_io(cx, |cx| tcp.poll_write_ready(cx), || tcp.try_write(data));
        this.write.check(cx, tcp, r, true)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let tcp = &*this.tcp;
        let r = Self::poll_io(cx, |cx| tcp.poll_write_ready(cx), || try_send(tcp, bufs));
        this.write.check(cx, tcp, r, true)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A socket has nothing of ours buffered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let tcp = &*this.tcp;
        let r = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
        this.write.check(cx, tcp, Poll::Ready(r), false)
    }
}

/// The socket of an upgraded WebSocket session: ours (plain TCP: the write deadline, the
/// bytes read ahead served first, and the pump's direct writes), or whatever else hyper hands
/// over (TLS), with its own buffer first. One type, so that a session's task is one future
/// whatever the transport.
pub enum SessionIo {
    /// Plain TCP.
    Tcp(SessionTcp),
    /// TLS (and anything else hyper may hand us).
    Other(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>),
}

impl SessionIo {
    /// The socket of a connection hyper upgraded.
    pub fn new(upgraded: hyper::upgrade::Upgraded) -> SessionIo {
        match upgraded.downcast::<hyper_util::rt::TokioIo<TimedIo>>() {
            // Bytes read past a PROXY header come before hyper's.
            Ok(parts) => SessionIo::Tcp(SessionTcp::new(
                parts.io.into_inner().read_ahead(parts.read_buf),
            )),
            Err(up) => SessionIo::Other(hyper_util::rt::TokioIo::new(up)),
        }
    }

    /// Whether the socket can ever park (plain TCP).
    pub fn can_park(&self) -> bool {
        matches!(self, SessionIo::Tcp(_))
    }

    /// Takes the socket out of the runtime (its registration freed) for a session that parks:
    /// only plain TCP with nothing read ahead, no write waiting, and no other owner (the
    /// outbox's direct sink cleared first).
    pub fn park(self) -> Parking {
        let t = match self {
            SessionIo::Tcp(t) if t.pre.is_empty() && t.write.stall.is_none() => t,
            other => return Parking::Busy(other),
        };
        let SessionTcp { tcp, pre, write } = t;
        match Rc::try_unwrap(tcp) {
            Ok(tcp) => match tcp.into_std() {
                Ok(std) => Parking::Parked(std),
                Err(e) => Parking::Lost(e),
            },
            Err(tcp) => Parking::Busy(SessionIo::Tcp(SessionTcp { tcp, pre, write })),
        }
    }

    /// The socket of a parked session, back in the runtime, with writes bounded by `timeout`.
    pub fn resume(tcp: std::net::TcpStream, timeout: Duration) -> io::Result<SessionIo> {
        Ok(SessionIo::Tcp(SessionTcp {
            tcp: Rc::new(TcpStream::from_std(tcp)?),
            pre: Bytes::new(),
            write: WriteDeadline::new(timeout),
        }))
    }

    /// The socket a pump pass may write to directly: plain TCP only (a TLS stream's writes go
    /// through its session state, which only the connection's task holds).
    pub fn sink(&self) -> Option<Rc<dyn Sink>> {
        match self {
            SessionIo::Tcp(t) => Some(t.tcp.clone()),
            SessionIo::Other(_) => None,
        }
    }
}

impl AsyncRead for SessionIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionIo::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            SessionIo::Other(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SessionIo::Tcp(io) => Pin::new(io).poll_write(cx, data),
            SessionIo::Other(io) => Pin::new(io).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SessionIo::Tcp(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            SessionIo::Other(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            SessionIo::Tcp(io) => io.is_write_vectored(),
            SessionIo::Other(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionIo::Tcp(io) => Pin::new(io).poll_flush(cx),
            SessionIo::Other(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionIo::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            SessionIo::Other(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (s, c)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_fails_after_the_timeout() {
        let (server, _client) = pair().await;
        let mut io = TimedIo::new(server, Duration::from_secs(5));
        let chunk = vec![0u8; 1 << 20];
        let t0 = tokio::time::Instant::now();
        let err = loop {
            if let Err(e) = io.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_secs(5));
    }

    #[test]
    fn a_connection_whose_read_and_write_both_time_out_counts_one_write_timeout() {
        let timed_out = || Poll::Ready(Err::<(), _>(io::Error::from(io::ErrorKind::TimedOut)));
        let mut d = WriteDeadline::new(Duration::from_secs(5));
        assert!(!d.kernel_timeout(&Poll::Ready(Ok::<(), io::Error>(()))));
        assert!(!d.kernel_timeout(&Poll::<io::Result<()>>::Pending));
        let reset = Poll::Ready(Err::<(), _>(io::Error::from(
            io::ErrorKind::ConnectionReset,
        )));
        assert!(!d.kernel_timeout(&reset), "only ETIMEDOUT counts");
        // The read sees the kernel's ETIMEDOUT, then the write, then our own deadline fires:
        // one count, the first.
        assert!(d.kernel_timeout(&timed_out()), "the read's");
        assert!(!d.kernel_timeout(&timed_out()), "the write's adds nothing");
        assert!(!d.count(), "nor our own deadline's");
        // And it stays two words, as every connection holds one.
        assert_eq!(std::mem::size_of::<WriteDeadline>(), 16);
        assert_eq!(WriteDeadline::new(Duration::from_micros(1)).timeout_ms, 1);
        assert_eq!(WriteDeadline::new(Duration::ZERO).timeout_ms, 0);
    }

    /// What hyper hands over with an upgraded connection: the request it parsed and the rest
    /// of its read buffer, both parts of one allocation.
    fn hyper_buffer(read: &[u8], request_len: usize) -> (Bytes, Bytes) {
        let mut buf = BytesMut::with_capacity(8192);
        buf.extend_from_slice(read);
        let request = buf.split_to(request_len).freeze();
        (request, buf.freeze())
    }

    #[tokio::test]
    async fn an_upgraded_socket_keeps_no_part_of_hyper_s_buffer() {
        let (server, _client) = pair().await;
        let (request, rest) = hyper_buffer(b"GET /ws HTTP/1.1\r\n\r\n", 20);
        assert!(!request.is_unique());
        let _io = TimedIo::new(server, Duration::from_secs(5)).read_ahead(rest);
        assert!(request.is_unique(), "an empty rest is not kept");

        let (server, _client) = pair().await;
        let (request, rest) = hyper_buffer(b"GET /ws HTTP/1.1\r\n\r\nab", 20);
        let mut io = TimedIo::new(server, Duration::from_secs(5)).read_ahead(rest);
        assert!(!request.is_unique(), "bytes not yet read are kept");
        let mut got = [0u8; 2];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ab");
        assert!(request.is_unique(), "and released once read");
    }

    #[tokio::test]
    async fn bytes_after_the_proxy_header_are_read_first() {
        let (server, mut client) = pair().await;
        client
            .write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 1000 80\r\nGET /")
            .await
            .unwrap();
        let mut io = TimedIo::new(server, Duration::from_secs(5));
        let src = io.read_proxy_header().await.unwrap();
        assert_eq!(src, Some("203.0.113.7".parse().unwrap()));
        client.write_all(b" HTTP/1.1").await.unwrap();
        let mut got = vec![0u8; 14];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1");
    }

    #[tokio::test]
    async fn try_send_writes_one_or_several_slices_in_order_and_waits_on_a_full_socket() {
        let (server, mut client) = pair().await;
        let mut sent = Vec::new();
        let one = try_send(&server, &[io::IoSlice::new(b"one;")]).unwrap();
        sent.extend_from_slice(&b"one;"[..one]);
        let parts: [&[u8]; 3] = [b"two;", b"", b"three;"];
        let slices = parts.map(io::IoSlice::new);
        let n = try_send(&server, &slices).unwrap();
        assert_eq!(n, 10, "sendmsg takes every slice of a small write");
        sent.extend_from_slice(b"two;three;");
        assert_eq!(try_send(&server, &[]).unwrap(), 0);
        // Fill the socket until the kernel takes no more: `WouldBlock`, as from tokio's own
        // `try_write_vectored`, and tokio's readiness cleared, so `writable` waits for room.
        let chunk = vec![7u8; 64 << 10];
        let halves = [
            io::IoSlice::new(&chunk[..1000]),
            io::IoSlice::new(&chunk[1000..]),
        ];
        let err = loop {
            match try_send(&server, &halves) {
                Ok(n) => sent.extend_from_slice(&chunk[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let end = b"end";
        let mut done = 0;
        while done < end.len() {
            server.writable().await.unwrap();
            match try_send(&server, &[io::IoSlice::new(&end[done..])]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        sent.extend_from_slice(end);
        drop(server);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "every byte arrived, in order");
        assert!(got.starts_with(b"one;two;three;\x07") && got.ends_with(b"\x07end"));
    }

    #[tokio::test]
    async fn a_connection_without_a_proxy_header_is_refused() {
        let (server, mut client) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut io = TimedIo::new(server, Duration::from_secs(5));
        assert_eq!(io.read_proxy_header().await, Err(ProxyHeaderError::Missing));
    }
}
