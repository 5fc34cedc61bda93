//! Webhooks, with a local HTTP receiver: events arrive once, signed, in order per channel; a
//! failing receiver gets the same events again until it accepts them. One test runs the real
//! binary; the others serve the relay on the test's own runtime with its clock paused
//! (`common::paused`, where the webhook senders run too), so the relay's own timers (batching
//! window, retry backoff) pass at once and are asserted to the millisecond.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Relay, Ws};
use serde_json::{json, Value};
use tokio::time::Instant;

const SECRET: &str = "webhook-secret-0123456789";

/// The in-process servers of this test binary share one metrics recorder: a test that counts
/// a metric holds this while it runs and counts the change.
static METRICS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One POST the receiver got.
#[derive(Clone, Debug)]
struct Received {
    /// When it came (on the test's clock, paused or not).
    at: Instant,
    timestamp: Option<String>,
    signature: Option<String>,
    body: Vec<u8>,
    /// The status the receiver answered.
    status: u16,
}

/// A local HTTP receiver: answers 500 to the first `fail` POSTs, 200 after.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    posted: Arc<tokio::sync::Notify>,
}

impl Receiver {
    async fn start(fail: usize) -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let posted = Arc::new(tokio::sync::Notify::new());
        let (g, p) = (got.clone(), posted.clone());
        let base = common::serve_http(move |headers, body| {
            let header = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
            let mut got = g.lock().unwrap();
            let status = if got.len() < fail { 500 } else { 200 };
            got.push(Received {
                at: Instant::now(),
                timestamp: header("x-relay-timestamp"),
                signature: header("x-relay-signature"),
                body: body.to_vec(),
                status,
            });
            p.notify_one();
            (status, bytes::Bytes::new())
        })
        .await;
        Receiver {
            url: format!("{base}/hooks"),
            got,
            posted,
        }
    }

    /// The events of the accepted POSTs, in order.
    fn accepted_events(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status == 200)
            .flat_map(|r| events_of(&r.body))
            .collect()
    }

    /// Waits until the accepted POSTs hold `n` events (at most 10 s).
    async fn wait_events(&self, n: usize) -> Vec<Value> {
        self.wait_until(|r| r.accepted_events().len() >= n).await;
        self.accepted_events()
    }

    /// Waits until `done` holds, checked at every POST (at most 10 s).
    async fn wait_until(&self, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            if tokio::time::timeout_at(deadline, self.posted.notified())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn posts(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// The events of one POST's body.
fn events_of(body: &[u8]) -> Vec<Value> {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["events"].as_array().unwrap().clone()
}

/// Checks the signature the way a receiver should: HMAC-SHA256 over `<timestamp>.<body>`, and
/// a timestamp within 5 minutes of now.
fn assert_signed(r: &Received) {
    let ts = r.timestamp.as_deref().expect("X-Relay-Timestamp");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t: u64 = ts.parse().unwrap();
    assert!(now.abs_diff(t) < 300, "timestamp {t} vs now {now}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(&r.body);
    let sig = r.signature.as_deref().expect("X-Relay-Signature");
    let hex = sig.strip_prefix("v1=").expect("v1= prefix");
    let raw: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    ring::hmac::verify(&key, &signed, &raw).expect("valid signature");
}

fn names(events: &[Value], channel: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["channel"] == channel)
        .map(|e| match e["user_id"].as_str() {
            Some(u) => format!("{} {u}", e["name"].as_str().unwrap()),
            None => e["name"].as_str().unwrap().to_owned(),
        })
        .collect()
}

async fn join(ws: &mut Ws, channel: &str, user: &str) {
    ws.send_json(json!({"type":"subscribe","channel":channel,"presence":{"user":user}}))
        .await;
    let v = ws.recv_json().await;
    assert_eq!(v["type"], "subscribed", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_arrives_once_signed_and_in_order_per_channel() {
    let rx = Receiver::start(0).await;
    let relay = Relay::start(&[
        "--webhook-url",
        &rx.url,
        "--webhook-secret",
        SECRET,
        "--presence-channels",
        "presence:*",
    ]);
    let mut a = Ws::connect(&relay.ws_url()).await;
    let mut b = Ws::connect(&relay.ws_url()).await;
    join(&mut a, "presence:room", "alice").await;
    b.subscribe("plain").await;
    join(&mut b, "presence:room", "bob").await;
    b.send_json(json!({"type":"unsubscribe","channel":"presence:room"}))
        .await;
    // Skip the presence events on b's stream until the reply.
    while b.recv_json().await["type"] != "unsubscribed" {}
    b.close_cleanly().await;
    a.close_cleanly().await;

    let events = rx.wait_events(8).await;
    assert_eq!(
        names(&events, "presence:room"),
        [
            "channel_occupied",
            "member_added alice",
            "member_added bob",
            "member_removed bob",
            // Occupancy follows subscriptions and presence follows members: on a connection's
            // end its subscriptions go first.
            "channel_vacated",
            "member_removed alice",
        ]
    );
    assert_eq!(
        names(&events, "plain"),
        ["channel_occupied", "channel_vacated"]
    );
    // Once each: ids are unique.
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "{events:?}");
    for post in rx.posts() {
        assert_signed(&post);
    }
    // Nothing else comes later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.accepted_events().len(), 8);
    assert_eq!(relay.metric("relay_webhook_events_sent_total").await, 8.0);
}

#[tokio::test(start_paused = true)]
async fn a_receiver_that_fails_three_times_gets_the_event_on_the_fourth_try() {
    let _counting = METRICS.lock().await;
    let rx = Receiver::start(3).await;
    let args = [
        "--webhook-url",
        &format!("channel_occupied@{}", rx.url),
        "--webhook-secret",
        SECRET,
        "--webhook-retry-cap",
        "30s",
    ];
    common::paused(&args, |relay: Relay| async move {
        let retries = relay.metric("relay_webhook_retries_total").await;
        let mut a = Ws::connect(&relay.ws_url()).await;
        a.subscribe("retried").await;
        let events = rx.wait_events(1).await;
        assert_eq!(names(&events, "retried"), ["channel_occupied"]);
        let posts = rx.posts();
        assert_eq!(
            posts.iter().map(|p| p.status).collect::<Vec<_>>(),
            [500, 500, 500, 200]
        );
        // Each retry waits a random time up to its ceiling: 100 ms doubled per failure (full
        // jitter, as the backplanes reconnect), under the 30 s cap.
        for (i, pair) in posts.windows(2).enumerate() {
            let waited = pair[1].at - pair[0].at;
            let ceiling = Duration::from_millis(100 << i);
            assert!(waited <= ceiling, "retry {}: {waited:?}", i + 1);
        }
        // The same event (same id) every time, freshly signed each time.
        let ids: Vec<Value> = posts
            .iter()
            .map(|p| events_of(&p.body)[0]["id"].clone())
            .collect();
        assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
        for post in &posts {
            assert_signed(post);
        }
        // The filter holds: no channel_vacated for this hook, however long one waits.
        a.close_cleanly().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(rx.posts().len(), 4);
        let counted = relay.metric("relay_webhook_retries_total").await - retries;
        assert_eq!(counted, 3.0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_receiver_that_never_accepts_costs_a_counted_drop_not_the_node() {
    let _counting = METRICS.lock().await;
    let rx = Receiver::start(usize::MAX).await;
    let url = rx.url.clone();
    let args = [
        "--webhook-url",
        &url,
        "--webhook-max-attempts",
        "2",
        "--webhook-retry-cap",
        "50ms",
    ];
    common::paused(&args, |relay: Relay| async move {
        let dropped = r#"relay_webhook_events_dropped_total{reason="attempts"}"#;
        let before = relay.metric(dropped).await;
        let mut a = Ws::connect(&relay.ws_url()).await;
        a.subscribe("lost").await;
        rx.wait_until(|r| r.posts().len() >= 2).await;
        // No third try, however long one waits; the event is counted as dropped.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(rx.posts().len(), 2);
        assert_eq!(relay.metric(dropped).await - before, 1.0);
        // The node serves on.
        assert_eq!(relay.publish_seq("lost", json!(1)).await, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_events_of_one_batching_window_share_one_post_sent_when_it_ends() {
    let rx = Receiver::start(0).await;
    let args = [
        "--webhook-url",
        &format!("channel_occupied@{}", rx.url),
        "--webhook-batch-delay",
        "5s",
    ];
    common::paused(&args, |relay: Relay| async move {
        let mut a = Ws::connect(&relay.ws_url()).await;
        let t0 = Instant::now();
        for c in ["one", "two", "three"] {
            a.subscribe(c).await;
        }
        rx.wait_events(3).await;
        let later = Instant::now();
        a.subscribe("four").await;
        rx.wait_events(4).await;
        let posts = rx.posts();
        let counts: Vec<usize> = posts.iter().map(|p| events_of(&p.body).len()).collect();
        assert_eq!(counts, [3, 1]);
        // The window opens with the first event of an empty queue and lasts 5 s.
        let first = posts[0].at - t0;
        let second = posts[1].at - later;
        for waited in [first, second] {
            assert!(
                waited >= Duration::from_secs(5) && waited < Duration::from_millis(5100),
                "{waited:?}"
            );
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_hooks_channel_patterns_keep_other_channels_out() {
    let rx = Receiver::start(0).await;
    let args = [
        "--webhook-url",
        &format!("channel_occupied;chat/*;news@{}", rx.url),
        "--webhook-batch-delay",
        "10ms",
    ];
    common::paused(&args, |relay: Relay| async move {
        let mut a = Ws::connect(&relay.ws_url()).await;
        for c in ["other", "chat/1", "newsroom", "news", "x/chat/2", "chat/2"] {
            a.subscribe(c).await;
        }
        let events = rx.wait_events(3).await;
        let channels: Vec<&str> = events
            .iter()
            .map(|e| e["channel"].as_str().unwrap())
            .collect();
        assert_eq!(channels, ["chat/1", "news", "chat/2"], "{events:?}");
        a.close_cleanly().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(rx.accepted_events().len(), 3, "no vacated: not named");
    })
    .await;
}
