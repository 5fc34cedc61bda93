//! One shard: a thread pinned to a core, running a `current_thread` runtime with a `LocalSet`.
//! It accepts on its own listener, serves its connections, pumps its hub when the engine wakes
//! it, and (shard 0) sweeps expired history.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::LocalSet;

use crate::limits::{refused, Cause, IpGuard};
use crate::transport::{http, Node, ShardContext};

/// Runs shard `index` until shutdown completes.
pub fn run(
    node: Arc<Node>,
    index: usize,
    listener: StdListener,
    core: Option<core_affinity::CoreId>,
) {
    if let Some(core) = core {
        core_affinity::set_for_current(core);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(shard = index, error = %e, "cannot start the shard's runtime");
            node.shutdown.cancel();
            return;
        }
    };
    let local = LocalSet::new();
    local.block_on(&rt, serve(node, index, listener));
}

async fn serve(node: Arc<Node>, index: usize, listener: StdListener) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(shard = index, error = %e, "cannot register the listener");
            node.shutdown.cancel();
            return;
        }
    };
    let ctx = Rc::new(ShardContext::new(node.clone(), index));
    let tracker = ctx.tracker.clone();
    let shutdown = node.shutdown.clone();

    // Fan-out: pump the hub whenever the engine marks this shard dirty.
    let pump_ctx = ctx.clone();
    let pump_stop = shutdown.clone();
    tokio::task::spawn_local(async move {
        let waker = &pump_ctx.node.wakers[index];
        loop {
            tokio::select! {
                _ = waker.notified() => {
                    let stats = pump_ctx.hub.borrow_mut().pump();
                    pump_ctx.metrics.pumped(&stats);
                }
                _ = pump_stop.cancelled() => break,
            }
        }
    });

    if index == 0 {
        let node = node.clone();
        let stop = shutdown.clone();
        tokio::task::spawn_local(async move {
            let mut history = tokio::time::interval(Duration::from_secs(1));
            history.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut presence = tokio::time::interval(node.config.presence_sweep);
            presence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = history.tick() => { node.engine.sweep(Instant::now()); }
                    _ = presence.tick() => {
                        let wake = node.engine.sweep_presence(Instant::now());
                        node.wake(wake);
                    }
                    _ = stop.cancelled() => break,
                }
            }
        });
    }

    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => match node.ips.try_acquire(peer.ip()) {
                    Some(guard) => {
                        let _ = stream.set_nodelay(true);
                        tracker.spawn_local(serve_connection(ctx.clone(), stream, Arc::new(guard)));
                    }
                    None => {
                        refused(Cause::IpLimit, &peer.ip().to_string());
                        if node.tls.is_none() {
                            // Best effort, never waits: the socket is closed right after.
                            let _ = stream.try_write(TOO_MANY_CONNECTIONS);
                        }
                    }
                },
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(shard = index, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(node.config.shutdown_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            shard = index,
            open = tracker.len(),
            "shutdown timeout: dropping connections"
        );
    }
}

/// What a client over `--max-connections-per-ip` gets before its socket is closed.
const TOO_MANY_CONNECTIONS: &[u8] =
    b"HTTP/1.1 429 Too Many Requests\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// Runs hyper's per-stream tasks of an HTTP/2 connection on the shard's `LocalSet`: our
/// bodies hold shard-local `Rc`s, so they cannot move to another thread.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Serves one accepted connection: the TLS handshake when TLS is on (then HTTP/2 or
/// HTTP/1.1 by ALPN), else HTTP/1.1. The TLS handshake and the first request's headers must
/// be done within `--handshake-timeout`; `guard` holds the connection's per-IP slot and goes
/// with it into an upgraded WebSocket session.
async fn serve_connection(
    ctx: Rc<ShardContext>,
    stream: tokio::net::TcpStream,
    guard: Arc<IpGuard>,
) {
    let deadline = tokio::time::Instant::now() + ctx.config().handshake_timeout;
    let started = Rc::new(Cell::new(false));
    let svc_ctx = ctx.clone();
    let svc_started = started.clone();
    let svc = service_fn(move |mut req| {
        svc_started.set(true);
        req.extensions_mut().insert(guard.clone());
        let ctx = svc_ctx.clone();
        async move { Ok::<_, Infallible>(http::handle(ctx, req).await) }
    });
    let Some(tls) = ctx.node.tls.clone() else {
        return serve_http1(&ctx, TokioIo::new(stream), svc, &started, deadline).await;
    };
    let mut stream = stream;
    match tokio::time::timeout_at(deadline, crate::tls::answer_plain_http(&mut stream)).await {
        Ok(true) => return refused(Cause::Tls, "plain HTTP on the TLS port"),
        Ok(false) => {}
        Err(_) => return refused(Cause::HandshakeTimeout, "TLS handshake"),
    }
    let stream = match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refused(Cause::Tls, &e.to_string()),
        Err(_) => return refused(Cause::HandshakeTimeout, "TLS handshake"),
    };
    if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
        serve_h2(&ctx, TokioIo::new(stream), svc, &started, deadline).await
    } else {
        serve_http1(&ctx, TokioIo::new(stream), svc, &started, deadline).await
    }
}

async fn serve_http1<I, S>(
    ctx: &ShardContext,
    io: I,
    svc: S,
    started: &Cell<bool>,
    deadline: tokio::time::Instant,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = http::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cfg = ctx.config();
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.handshake_timeout)
        .max_buf_size(cfg.max_header_size)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    let shutdown = ctx.node.shutdown.clone();
    let first_request = tokio::time::sleep_until(deadline);
    tokio::pin!(first_request);
    let mut armed = true;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if e.is_parse_too_large() {
                        refused(Cause::HeaderTooLarge, &e.to_string());
                    } else if e.is_timeout() {
                        refused(Cause::HandshakeTimeout, "request headers");
                    }
                    tracing::debug!(error = %e, "http connection error");
                }
                return;
            }
            _ = &mut first_request, if armed => {
                if !started.get() {
                    return refused(Cause::HandshakeTimeout, "first request headers");
                }
                armed = false;
            }
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(cfg.shutdown_timeout, conn).await;
                return;
            }
        }
    }
}

async fn serve_h2<I, S>(
    ctx: &ShardContext,
    io: I,
    svc: S,
    started: &Cell<bool>,
    deadline: tokio::time::Instant,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = http::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    LocalExec: hyper::rt::bounds::Http2ServerConnExec<S::Future, http::Body>,
{
    let cfg = ctx.config();
    let conn = http2::Builder::new(LocalExec)
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_size).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_H2_STREAMS)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let shutdown = ctx.node.shutdown.clone();
    let first_request = tokio::time::sleep_until(deadline);
    tokio::pin!(first_request);
    let mut armed = true;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "h2 connection error");
                }
                return;
            }
            _ = &mut first_request, if armed => {
                if !started.get() {
                    return refused(Cause::HandshakeTimeout, "first h2 request");
                }
                armed = false;
            }
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(cfg.shutdown_timeout, conn).await;
                return;
            }
        }
    }
}

/// Most concurrent streams (requests, SSE streams) on one HTTP/2 connection.
const MAX_H2_STREAMS: u32 = 128;
