//! One shard: a thread pinned to a core, running a `current_thread` runtime with a `LocalSet`.
//! It accepts on its own listener, serves its connections, pumps its hub when the engine wakes
//! it, and (shard 0) sweeps expired history.

use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::LocalSet;
use tokio_util::task::TaskTracker;

use crate::transport::{http, Node, ShardContext};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

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
    let tracker = TaskTracker::new();
    let shutdown = node.shutdown.clone();

    // Fan-out: pump the hub whenever the engine marks this shard dirty.
    let pump_ctx = ctx.clone();
    let pump_stop = shutdown.clone();
    tokio::task::spawn_local(async move {
        let waker = &pump_ctx.node.wakers[index];
        loop {
            tokio::select! {
                _ = waker.notified() => {
                    pump_ctx.hub.borrow_mut().pump();
                }
                _ = pump_stop.cancelled() => break,
            }
        }
    });

    if index == 0 {
        let node = node.clone();
        let stop = shutdown.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => { node.engine.sweep(Instant::now()); }
                    _ = stop.cancelled() => break,
                }
            }
        });
    }

    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    tracker.spawn_local(serve_connection(ctx.clone(), stream, tracker.clone()));
                }
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

async fn serve_connection(
    ctx: Rc<ShardContext>,
    stream: tokio::net::TcpStream,
    tracker: TaskTracker,
) {
    let shutdown = ctx.node.shutdown.clone();
    let grace = ctx.config().shutdown_timeout;
    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        async move { Ok::<_, Infallible>(http::handle(ctx, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    // Keep the tracker open while a WebSocket session spawned from this connection runs.
    let _keep = tracker.token();
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(grace, conn).await;
        }
    }
}
