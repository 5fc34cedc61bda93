//! Timers driven by paused time: the server runs one shard on the test's own runtime
//! (`server::run_here`), whose clock the test pauses, so a 30 s timeout passes at once and a
//! test asserts it to the second without waiting for it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Serves `args` on a port-0 listener of this runtime while `client(addr)` runs, then stops.
async fn with_server<F, Fut>(args: &[&str], client: F)
where
    F: FnOnce(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = relay::config::Config::from_args(args.iter().copied()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = relay::server::run_here(config, listener, async {
        let _ = stopped.await;
    });
    let client = async move {
        client(addr).await;
        let _ = stop.send(());
    };
    let (served, ()) = tokio::join!(server, client);
    served.unwrap();
}

/// The close code and when it came, reading (and ignoring) everything before it.
async fn close_code(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> (u16, Instant) {
    while let Some(msg) = ws.next().await {
        if let Message::Close(Some(f)) = msg.unwrap() {
            return (u16::from(f.code), Instant::now());
        }
    }
    panic!("the connection ended without a close frame");
}

#[tokio::test(start_paused = true)]
async fn a_client_without_a_token_is_closed_at_the_auth_timeout() {
    let args = [
        "--jwt-secret",
        "a-secret-of-at-least-16-bytes",
        "--auth-timeout",
        "30s",
        "--ping-interval",
        "10m",
        "--idle-timeout",
        "20m",
    ];
    with_server(&args, |addr| async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap();
        let t0 = Instant::now();
        let (code, at) = close_code(&mut ws).await;
        assert_eq!(CloseCode::from(code), CloseCode::Library(4001));
        let waited = at - t0;
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "{waited:?}"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_pinged_then_closed_at_the_idle_timeout() {
    let args = ["--ping-interval", "25s", "--idle-timeout", "60s"];
    with_server(&args, |addr| async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap();
        let t0 = Instant::now();
        // tungstenite answers the ping by itself when it reads it; a client that reads
        // nothing stays silent. Read only once the idle timeout must have passed.
        tokio::time::sleep(Duration::from_secs(61)).await;
        let mut pinged = None;
        let mut closed = None;
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Ping(_)) => pinged = Some(Instant::now() - t0),
                Ok(Message::Close(Some(f))) => {
                    closed = Some(u16::from(f.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        assert!(pinged.is_some(), "a ping came first");
        assert_eq!(closed, Some(1001), "idle timeout");
    })
    .await;
}
