//! One shard: a thread pinned to a core, running a `current_thread` runtime with a `LocalSet`.
//! It accepts on its own listener, serves its connections, pumps its hub when the engine wakes
//! it, reports its outboxes and connections to the memory meter (and under memory pressure
//! hands its freed pages back to the OS), and (shard 0) runs the engine's upkeep: the RSS
//! sample of the memory budget, the expiry queue, eviction under memory pressure, the presence
//! sweep, and the sweep of refilled API rate buckets.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::IpAddr;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::LocalSet;

use crate::limits::{refused, Cause};
use crate::transport::io::TimedIo;
use crate::transport::{http, Node, Peer, ShardContext};

/// A shard's runtime: built by [`super::start`] before any shard serves.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs shard `index` on `rt` until shutdown completes.
pub fn run(
    node: Arc<Node>,
    index: usize,
    listener: StdListener,
    rt: tokio::runtime::Runtime,
    core: Option<core_affinity::CoreId>,
) {
    if let Some(core) = core {
        core_affinity::set_for_current(core);
    }
    let local = LocalSet::new();
    local.block_on(&rt, serve(node, index, listener));
}

pub(super) async fn serve(node: Arc<Node>, index: usize, listener: StdListener) {
    crate::backplane::enter_shard();
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

    // Fan-out: pump the hub whenever the engine marks this shard dirty; report what the
    // outboxes hold after each pass (growth) and every upkeep tick (what writers drained).
    let pump_ctx = ctx.clone();
    let pump_stop = shutdown.clone();
    // A pass wakes its writers a few at a time, going to the back of the shard's run queue
    // between groups, and the next pass waits for the last group. The run queue is first in,
    // first out: woken all at once, every subscriber's write would run before anything woken
    // after them, such as the publisher's connection with its next pipelined requests or, with
    // a remote backplane, the store's next answers. Paced, those go on while the subscribers
    // are written, and the next pass carries every message that
    // came meanwhile: the longer the writes take, the more messages per pass and per write.
    tokio::task::spawn_local(async move {
        let waker = &pump_ctx.node.wakers[index];
        let mut writers = crate::engine::outbox::Writers::default();
        let mut upkeep = tokio::time::interval(UPKEEP);
        upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = waker.notified() => {
                    let stats = crate::engine::outbox::collect_wakes(&mut writers, || {
                        pump_ctx.hub.borrow_mut().pump()
                    });
                    pump_ctx.metrics.pumped(&stats);
                    pump_ctx.report_memory();
                    pump_ctx.alarms.fanned_out();
                    // The idle writers' sockets are written here, without waking their
                    // tasks; then the writers with something left are woken. Both a group at
                    // a time, going to the back of the run queue between groups. Each outbox
                    // is prefetched two writes ahead, its socket and queue one ahead, so that
                    // loading them overlaps the writes before (see `Outbox::prefetch`); the
                    // counters are added once per group.
                    let m = &pump_ctx.metrics;
                    let mut direct = std::mem::take(&mut writers.direct);
                    let mut at = 0;
                    for group in direct.chunks(WRITERS_AT_ONCE) {
                        let (mut writes, mut bytes) = (0, 0);
                        for outbox in group {
                            if let Some(ahead) = direct.get(at + 2) {
                                crate::engine::outbox::Outbox::prefetch(ahead);
                            }
                            if let Some(next) = direct.get(at + 1) {
                                next.prefetch_parts();
                            }
                            at += 1;
                            let done = outbox.write_direct();
                            let w = done.written;
                            if w.bytes > 0 {
                                writes += 1;
                                bytes += w.bytes as u64;
                                m.frames_per_write.record(w.frames as f64);
                            }
                            writers.wakes.extend(done.wake);
                        }
                        m.direct_writes.increment(writes);
                        m.bytes_written.increment(bytes);
                        if at < direct.len() || !writers.wakes.is_empty() {
                            to_the_back().await;
                        }
                    }
                    // Back for the next pass, with its capacity.
                    direct.clear();
                    writers.direct = direct;
                    if !writers.wakes.is_empty() {
                        m.writer_wakes.increment(writers.wakes.len() as u64);
                    }
                    // Taken out and woken by value (no clone of a waker), a group at a time;
                    // `writers` keeps its capacity for the next round.
                    let mut woken = writers.wakes.drain(..);
                    while woken.len() > 0 {
                        woken
                            .by_ref()
                            .take(WRITERS_AT_ONCE)
                            .for_each(std::task::Waker::wake);
                        to_the_back().await;
                    }
                }
                _ = upkeep.tick() => {
                    pump_ctx.report_memory();
                    pump_ctx.report_connections();
                    // Under pressure, what this thread's heap freed goes back to the OS now,
                    // so that the RSS floor falls with what was freed (see `memory::Meter`).
                    let meter = pump_ctx.node.engine.meter();
                    if meter.pressure() != crate::engine::memory::Pressure::Normal {
                        crate::transport::alarm::return_free_pages(true);
                    }
                }
                _ = pump_stop.cancelled() => break,
            }
        }
    });

    // The sessions' deadlines: one timer for the shard (see `transport::alarm`).
    let alarm_ctx = ctx.clone();
    let alarm_stop = shutdown.clone();
    tokio::task::spawn_local(async move { alarm_ctx.alarms.run(alarm_stop).await });

    // Idle WebSocket sessions (see `transport::park`).
    tokio::task::spawn_local(crate::transport::park::run(ctx.clone()));

    // Server API commands for this shard's users' connections.
    tokio::task::spawn_local(crate::transport::users::run_shard(ctx.clone()));

    if index == 0 {
        let node = node.clone();
        let stop = shutdown.clone();
        tokio::task::spawn_local(async move {
            // Expiry and eviction do bounded work per tick (engine::TICK_CHECKS channels), so
            // their cost does not grow with the number of channels.
            let mut expiry = tokio::time::interval(UPKEEP);
            expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut buckets = tokio::time::interval(Duration::from_secs(1));
            buckets.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut presence = tokio::time::interval(node.config.presence_sweep);
            presence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = expiry.tick() => {
                        // What no counter sees (allocator slack, transient buffers) weighs
                        // through the process's RSS: one read of /proc per tick.
                        let meter = node.engine.meter();
                        if node.config.rss_floor && meter.limit() > 0 {
                            if let Some(rss) = crate::limits::resident_bytes() {
                                meter.set_rss(rss);
                            }
                        }
                        node.engine.tick(crate::types::now());
                    }
                    _ = buckets.tick() => {
                        node.api.sweep(crate::types::now());
                        crate::metrics::upkeep();
                    }
                    _ = presence.tick() => {
                        let wake = node.engine.sweep_presence(crate::types::now());
                        node.wake(wake);
                    }
                    _ = stop.cancelled() => break,
                }
            }
        });
    }

    if let Err(e) = super::listener::prepare(
        &listener,
        node.config.write_timeout,
        node.config.listen_backlog,
    ) {
        tracing::warn!(shard = index, error = %e, "cannot set the listener's socket options");
    }

    let stop = shutdown.cancelled();
    tokio::pin!(stop);
    let mut batch = Vec::with_capacity(ACCEPT_BATCH);
    loop {
        tokio::select! {
            // Unconstrained: tokio's cooperative budget would end a batch after 128.
            r = tokio::task::unconstrained(accept_batch(&listener, &mut batch, ACCEPT_BATCH)) => {
                for (stream, peer) in batch.drain(..) {
                    if node.config.proxy_protocol {
                        // The client is known once the PROXY header is read.
                        tracker.spawn_local(serve_proxied(ctx.clone(), stream, peer.ip()));
                    } else if let Some(peer) = admit(&node, &stream, peer.ip()) {
                        let io = TimedIo::new(stream, node.config.write_timeout);
                        let deadline = tokio::time::Instant::now() + node.config.handshake_timeout;
                        tracker.spawn_local(serve_connection(ctx.clone(), io, peer, deadline));
                    }
                }
                // A burst of connections weighs in the budget before the next batch, so that
                // over it the next ones are refused at their upgrade.
                ctx.report_connections();
                if let Err(e) = r {
                    // Out of file descriptors and the like: back off instead of spinning.
                    crate::limits::accept_failed(index, &e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // Let the connections just accepted (and everything else) run before the next
                // batch: a fleet arriving at once is served in batches, not all accepted first.
                tokio::task::yield_now().await;
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    // Parked sessions join the tracker (and close with 1012) before it is waited for; none
    // parks from now on.
    ctx.lot.resume_all(&ctx);
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

/// Most connections a shard accepts per wake-up before it lets them (and its other tasks) run.
/// A connection the kernel's accept queue has no room for costs its client a second (the SYN
/// is retried after the initial RTO), so a fleet arriving at once is moved out of that queue
/// fast: accepting is cheap (one syscall and an epoll registration), serving comes after. At
/// ~10 µs per accept, a batch delays the shard's other tasks by a few ms at most.
const ACCEPT_BATCH: usize = 512;

/// Waits until the listener has a connection, then takes every ready one, up to `max`, into
/// `out`: one wake-up of the shard serves a burst of arrivals. An error ends the batch (with
/// what was accepted before it in `out`).
pub(crate) async fn accept_batch(
    listener: &TcpListener,
    out: &mut Vec<(tokio::net::TcpStream, std::net::SocketAddr)>,
    max: usize,
) -> std::io::Result<()> {
    std::future::poll_fn(|cx| {
        while out.len() < max {
            match listener.poll_accept(cx) {
                Poll::Ready(Ok(conn)) => out.push(conn),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if out.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(()))
    })
    .await
}

/// How often shards report their outboxes and shard 0 runs the engine's tick.
const UPKEEP: Duration = Duration::from_millis(100);

/// What a client over `--max-connections-per-ip` gets before its socket is closed.
const TOO_MANY_CONNECTIONS: &[u8] =
    b"HTTP/1.1 429 Too Many Requests\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// Takes the connection's per-IP slot: none for a trusted proxy (its requests take slots for
/// the clients they name); `None` when `ip` has too many connections (then the client is told
/// so, best effort, and the socket closed).
fn admit(node: &Node, stream: &tokio::net::TcpStream, ip: IpAddr) -> Option<Peer> {
    if node.trusted.contains(ip) {
        return Some(Peer { ip, guard: None });
    }
    match node.ips.try_acquire(crate::proxy::canonical(ip)) {
        Some(guard) => Some(Peer {
            ip,
            guard: Some(Arc::new(guard)),
        }),
        None => {
            refused(Cause::IpLimit, &ip.to_string());
            if node.tls.is_none() {
                // Never waits: the socket is closed right after.
                let _ = stream.try_write(TOO_MANY_CONNECTIONS);
            }
            None
        }
    }
}

/// Serves a connection that starts with a PROXY protocol header (`--proxy-protocol`): the
/// header must come within `--handshake-timeout`, and names the client that per-IP limits
/// count.
async fn serve_proxied(ctx: Rc<ShardContext>, stream: tokio::net::TcpStream, tcp_peer: IpAddr) {
    let cfg = ctx.config();
    let deadline = tokio::time::Instant::now() + cfg.handshake_timeout;
    let mut io = TimedIo::new(stream, cfg.write_timeout);
    let source = match tokio::time::timeout_at(deadline, io.read_proxy_header()).await {
        Ok(Ok(source)) => source,
        Ok(Err(e)) => return refused(Cause::ProxyProtocol, &e.to_string()),
        Err(_) => return refused(Cause::HandshakeTimeout, "PROXY protocol header"),
    };
    // No source: the proxy's own connection (a health check), counted as the proxy.
    let ip = source.unwrap_or(tcp_peer);
    if let Some(peer) = admit(&ctx.node, io.tcp(), ip) {
        serve_connection(ctx, io, peer, deadline).await;
    }
}

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
/// be done by `deadline` (`--handshake-timeout`); every request carries `peer`, whose per-IP
/// slot goes with it into an upgraded WebSocket session.
async fn serve_connection(
    ctx: Rc<ShardContext>,
    mut io: TimedIo,
    peer: Peer,
    deadline: tokio::time::Instant,
) {
    let started = Rc::new(Cell::new(false));
    if ctx.node.tls.is_none() {
        // Pipelined API requests are answered by the front; hyper serves the rest.
        match super::front::serve(&ctx, &mut io, &peer, deadline, &started).await {
            Some(ahead) => io = io.read_ahead(ahead),
            None => return,
        }
    }
    let front_peer = peer.clone();
    let svc_ctx = ctx.clone();
    let svc_started = started.clone();
    let svc = service_fn(move |mut req| {
        svc_started.set(true);
        req.extensions_mut().insert(peer.clone());
        let ctx = svc_ctx.clone();
        async move { Ok::<_, Infallible>(http::handle(ctx, req).await) }
    });
    let Some(tls) = ctx.node.tls.clone() else {
        return serve_http1(&ctx, TokioIo::new(io), svc, &started, deadline).await;
    };
    // A browser or curl speaking plain HTTP to the TLS port gets an answer saying so (when the
    // PROXY header left no bytes read ahead, the only case where the socket shows the first).
    if io.nothing_read_ahead() {
        match tokio::time::timeout_at(deadline, crate::tls::answer_plain_http(io.tcp_mut())).await {
            Ok(true) => return refused(Cause::Tls, "plain HTTP on the TLS port"),
            Ok(false) => {}
            Err(_) => return refused(Cause::HandshakeTimeout, "TLS handshake"),
        }
    }
    // Known only after the handshake, and cheap: counted on every TLS connection.
    let activity = io.track_activity();
    let stream = match tokio::time::timeout_at(deadline, tls.acceptor().accept(io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refused(Cause::Tls, &e.to_string()),
        Err(_) => return refused(Cause::HandshakeTimeout, "TLS handshake"),
    };
    if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
        serve_h2(
            &ctx,
            TokioIo::new(stream),
            svc,
            &started,
            deadline,
            activity,
        )
        .await
    } else {
        let mut stream = stream;
        let Some(ahead) =
            super::front::serve(&ctx, &mut stream, &front_peer, deadline, &started).await
        else {
            return;
        };
        let io = super::front::Rewind::new(stream, ahead);
        serve_http1(&ctx, TokioIo::new(io), svc, &started, deadline).await
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
    // hyper starts this timer when the connection goes idle after a response, so it is the
    // keep-alive timeout (the first request has the stricter `deadline` below).
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.keepalive_timeout)
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
                    // A timeout here is the keep-alive timeout: no refusal.
                    if e.is_parse_too_large() {
                        refused(Cause::HeaderTooLarge, &e.to_string());
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
    activity: Arc<AtomicU64>,
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
    // Idle: no byte moved for a whole keep-alive period (so between one and two of them).
    let mut idle = tokio::time::interval(cfg.keepalive_timeout);
    idle.tick().await;
    let mut moved = activity.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "h2 connection error");
                }
                return;
            }
            _ = idle.tick() => {
                let now = activity.load(Ordering::Relaxed);
                if now == moved {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(cfg.shutdown_timeout, conn).await;
                    return;
                }
                moved = now;
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

/// Writers a pump pass wakes at once (see `serve`): few enough that a task woken meanwhile
/// waits for about this many writes, not for every subscriber's.
const WRITERS_AT_ONCE: usize = 64;

/// Returns once every task woken before it on this shard has run: it wakes its own task and
/// yields, and a `LocalSet` queues a wake from its own thread at the back of its run queue
/// (`tokio::task::yield_now` defers the wake to the driver's next poll instead, which puts the
/// task ahead of a long queue).
async fn to_the_back() {
    let mut woke = false;
    std::future::poll_fn(|cx| {
        if woke {
            std::task::Poll::Ready(())
        } else {
            woke = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn one_wake_up_accepts_every_ready_connection_up_to_the_batch() {
        let std = crate::server::listener::bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = std.local_addr().unwrap();
        let listener = TcpListener::from_std(std).unwrap();
        // The kernel completes these handshakes itself: all ten wait in the accept queue.
        let _clients: Vec<_> = (0..10)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut batch = Vec::new();
        accept_batch(&listener, &mut batch, 4).await.unwrap();
        assert_eq!(batch.len(), 4, "a batch is bounded");
        batch.clear();
        accept_batch(&listener, &mut batch, ACCEPT_BATCH)
            .await
            .unwrap();
        assert_eq!(batch.len(), 6, "the rest come in one call");
        let peers: std::collections::HashSet<_> = batch.iter().map(|(_, p)| *p).collect();
        assert_eq!(peers.len(), 6);
    }
}
