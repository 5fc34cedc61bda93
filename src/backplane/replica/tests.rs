//! The replica against a fake store: an in-memory [`Remote`] whose deliveries the tests make by
//! hand (in order, out of order, lost, late), whose snapshots can be held back or fail, and
//! which can go down. No server, no network.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::FutureExt;

use super::*;
use crate::engine::presence::{Identity, Liveness, PresenceConfig};
use crate::engine::{EngineConfig, Join, Subscribed};

const SIZE: usize = 10;
const TTL: Duration = Duration::from_secs(60);

/// One channel in the fake store.
struct Log {
    epoch: Epoch,
    top: u64,
    /// The last [`SIZE`] entries.
    entries: Vec<Entry>,
}

#[derive(Default)]
struct FakeState {
    logs: HashMap<ChannelName, Log>,
    /// `subscribe a`, `unsubscribe a`, `snapshot a`, in call order.
    calls: Vec<String>,
    /// The next snapshot waits for this (it reads the store when called, answers when let go).
    hold: Option<oneshot::Receiver<()>>,
    /// This many snapshots fail next.
    failing_snapshots: u32,
    /// Members the store lists, per channel.
    members: HashMap<ChannelName, Members>,
    /// Presence writes: `(channel, op, client)`.
    written: Vec<(String, &'static str, String)>,
    epochs: u64,
    /// Idempotency keys seen: key → the first publish's position.
    keys: HashMap<String, (Epoch, u64)>,
    /// What the store's fan-out would deliver of the publishes made through the replica, in
    /// the store's order; the tests deliver them by hand.
    echoes: Vec<Incoming>,
}

#[derive(Default)]
struct Fake {
    down: AtomicBool,
    st: Mutex<FakeState>,
}

fn ms_ago(d: Duration) -> u64 {
    wall_ms() - d.as_millis() as u64
}

impl Fake {
    /// Appends a message to the store (creating the channel's epoch) and returns what the
    /// store's fan-out would deliver; the test decides whether and when it is delivered.
    fn append(&self, ch: &ChannelName, data: &str) -> Incoming {
        self.append_at(ch, data, wall_ms())
    }

    fn append_at(&self, ch: &ChannelName, data: &str, ms: u64) -> Incoming {
        let mut st = self.st.lock();
        let epoch = st.new_epoch();
        let log = st.logs.entry(ch.clone()).or_insert(Log {
            epoch,
            top: 0,
            entries: Vec::new(),
        });
        log.top += 1;
        let entry = Entry {
            seq: log.top,
            kind: DataKind::Json,
            ms,
            data: Bytes::from(data.to_owned()),
        };
        log.entries.push(entry.clone());
        if log.entries.len() > SIZE {
            log.entries.remove(0);
        }
        Incoming::Message(log.epoch, entry)
    }

    /// The store loses the channel (expiry, a restart without data).
    fn forget(&self, ch: &ChannelName) {
        self.st.lock().logs.remove(ch);
    }

    fn position(&self, ch: &ChannelName) -> StreamPosition {
        let st = self.st.lock();
        let log = &st.logs[ch];
        StreamPosition {
            epoch: log.epoch,
            seq: log.top,
        }
    }

    /// Holds the next snapshot back until the returned sender is used (or dropped).
    fn hold_snapshot(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        self.st.lock().hold = Some(rx);
        tx
    }

    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut self.st.lock().calls)
    }

    /// The fan-out of the publishes made through the replica so far, in the store's order.
    fn echoes(&self) -> Vec<Incoming> {
        std::mem::take(&mut self.st.lock().echoes)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

impl FakeState {
    fn new_epoch(&mut self) -> Epoch {
        self.epochs += 1;
        Epoch(0x1000 + self.epochs)
    }
}

impl Remote for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn is_up(&self) -> bool {
        !self.down.load(Ordering::SeqCst)
    }

    fn publish(
        &self,
        channel: &ChannelName,
        _kind: DataKind,
        data: Bytes,
    ) -> BoxFuture<Result<(Epoch, u64), BackplaneError>> {
        let echo = self.append(channel, std::str::from_utf8(&data).unwrap());
        let r = match &echo {
            Incoming::Message(e, m) => Ok((*e, m.seq)),
            Incoming::Epoch(_) => unreachable!(),
        };
        self.st.lock().echoes.push(echo);
        Box::pin(std::future::ready(r))
    }

    fn publish_with(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
        cond: PublishConditions,
    ) -> BoxFuture<Result<(Epoch, u64, bool), BackplaneError>> {
        let key = cond.idempotency_key.expect("the tests publish with a key");
        if let Some(&(e, seq)) = self.st.lock().keys.get(&*key) {
            return Box::pin(std::future::ready(Ok((e, seq, true))));
        }
        let published = self.publish(channel, kind, data);
        let st = &self.st;
        let r = published.now_or_never().expect("ready");
        if let Ok(at) = r {
            st.lock().keys.insert(key.to_string(), at);
        }
        Box::pin(std::future::ready(r.map(|(e, s)| (e, s, false))))
    }

    fn subscribe(
        &self,
        channels: Vec<ChannelName>,
        _to: &Arc<Replica>,
    ) -> BoxFuture<Result<(), BackplaneError>> {
        let mut st = self.st.lock();
        for ch in &channels {
            st.calls.push(format!("subscribe {ch}"));
        }
        let r = if self.is_up() {
            Ok(())
        } else {
            Err(BackplaneError::Unavailable("down".into()))
        };
        Box::pin(std::future::ready(r))
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        self.st.lock().calls.push(format!("unsubscribe {channel}"));
    }

    fn snapshot(
        &self,
        channel: &ChannelName,
        since: Option<StreamPosition>,
    ) -> BoxFuture<Result<Snapshot, BackplaneError>> {
        let mut st = self.st.lock();
        st.calls.push(format!("snapshot {channel}"));
        let hold = st.hold.take();
        if st.failing_snapshots > 0 {
            st.failing_snapshots -= 1;
            return Box::pin(std::future::ready(Err(BackplaneError::Unavailable(
                "snapshot refused".into(),
            ))));
        }
        // What the Redis sync script does: create the epoch, then the run after `since` when
        // it is still there, else the newest entries.
        let epoch = st.new_epoch();
        let log = st.logs.entry(channel.clone()).or_insert(Log {
            epoch,
            top: 0,
            entries: Vec::new(),
        });
        let from_since = since.is_some_and(|p| {
            p.epoch == log.epoch
                && p.seq <= log.top
                && (p.seq == log.top || log.entries.first().is_some_and(|f| f.seq <= p.seq + 1))
        });
        let entries = log
            .entries
            .iter()
            .filter(|e| !from_since || since.is_some_and(|p| e.seq > p.seq))
            .cloned()
            .collect();
        let snapshot = Snapshot {
            epoch: log.epoch,
            top: log.top,
            since: from_since,
            entries,
        };
        Box::pin(async move {
            if let Some(hold) = hold {
                let _ = hold.await;
            }
            Ok(snapshot)
        })
    }

    fn history(
        &self,
        channel: &ChannelName,
        since: u64,
        _limit: usize,
    ) -> BoxFuture<Result<Option<Stored>, BackplaneError>> {
        let st = self.st.lock();
        let stored = st.logs.get(channel).map(|log| Stored {
            position: StreamPosition {
                epoch: log.epoch,
                seq: log.top,
            },
            entries: log
                .entries
                .iter()
                .filter(|e| e.seq > since)
                .cloned()
                .collect(),
        });
        Box::pin(std::future::ready(Ok(stored)))
    }

    fn presence(
        &self,
        channel: &ChannelName,
        ops: Vec<PresenceOp>,
        read: bool,
    ) -> BoxFuture<Result<Option<Members>, BackplaneError>> {
        let mut st = self.st.lock();
        for (op, who) in ops {
            st.written
                .push((channel.to_string(), op, who.client.to_string()));
        }
        let members = read.then(|| st.members.get(channel).cloned().unwrap_or_default());
        Box::pin(std::future::ready(Ok(members)))
    }
}

struct Node {
    fake: Arc<Fake>,
    engine: Arc<Engine>,
    replica: Arc<Replica>,
}

fn node() -> Node {
    let engine = Arc::new(Engine::new(EngineConfig {
        shards: 1,
        history_size: SIZE,
        history_ttl: TTL,
        seed: 7,
        presence: PresenceConfig {
            patterns: vec!["p:*".into()],
            timeout: Duration::from_secs(2),
            max_members: 100,
            ..Default::default()
        },
        ..Default::default()
    }));
    let fake = Arc::new(Fake::default());
    let settings = Settings {
        url: "fake://".into(),
        history_size: SIZE,
        history_ttl: TTL,
        node_id: "me".into(),
        seed: 7,
        presence_timeout: Duration::from_secs(2),
        idempotency_window: Duration::from_secs(60),
    };
    let replica = Replica::new(
        fake.clone(),
        engine.clone(),
        Wakers::new(1),
        settings,
        tokio::runtime::Handle::current(),
    );
    Node {
        fake,
        engine,
        replica,
    }
}

fn ch(name: &str) -> ChannelName {
    ChannelName::new(name).unwrap()
}

/// Lets the replica's tasks run (they are on the test's runtime).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

impl Node {
    /// Joins `name` and waits for the join to complete.
    async fn join(&self, name: &ChannelName) -> Result<(), BackplaneError> {
        match self.replica.join(name) {
            Some(f) => f.await,
            None => Ok(()),
        }
    }

    /// A local subscriber (what the transports add once the join completed).
    fn subscriber(&self, name: &ChannelName) -> Subscribed {
        self.engine
            .subscribe(0, name, None, None, Instant::now())
            .unwrap()
    }

    /// The seqs the local channel holds, with their payloads.
    fn held(&self, name: &ChannelName) -> Vec<(u64, String)> {
        self.engine
            .history(name, 0, SIZE, Instant::now())
            .publications
            .iter()
            .map(|p| (p.seq, String::from_utf8(p.data.to_vec()).unwrap()))
            .collect()
    }

    fn seqs(&self, name: &ChannelName) -> Vec<u64> {
        self.held(name).into_iter().map(|(s, _)| s).collect()
    }
}

/// Whether the channel was reset under `s` (its subscribers would be closed for resume).
fn was_reset(s: &Subscribed) -> bool {
    let (mut pubs, mut events) = (Vec::new(), Vec::new());
    s.channel
        .read_all_since_in(
            s.position.seq,
            0,
            Some(s.generation),
            &mut pubs,
            &mut events,
        )
        .2
        .is_err()
}

#[tokio::test(start_paused = true)]
async fn a_join_subscribes_before_it_reads_the_store_and_then_ingests_in_order() {
    let n = node();
    let a = ch("a");
    for i in 1..=3 {
        n.fake.append(&a, &format!("m{i}"));
    }
    n.join(&a).await.unwrap();
    assert_eq!(n.fake.calls(), ["subscribe a", "snapshot a"]);
    assert_eq!(n.replica.state(&a), Some(State::Synced));
    assert!(
        n.replica.join(&a).is_none(),
        "a synced channel is joined at once"
    );
    assert_eq!(n.engine.position(&a), Some(n.fake.position(&a)));
    let sub = n.subscriber(&a);
    let m4 = n.fake.append(&a, "m4");
    let m5 = n.fake.append(&a, "m5");
    n.replica.on_messages(&a, [m4, m5.clone()]);
    n.replica.on_messages(&a, [m5]);
    assert_eq!(
        n.held(&a),
        (1..=5).map(|i| (i, format!("m{i}"))).collect::<Vec<_>>(),
        "in order, the duplicate ignored"
    );
    assert!(!was_reset(&sub));
    settle().await;
    assert!(n.fake.calls().is_empty(), "no resync");
}

#[tokio::test(start_paused = true)]
async fn a_lost_message_starts_a_resync_that_fills_the_gap_without_closing_subscribers() {
    let n = node();
    let a = ch("a");
    n.join(&a).await.unwrap();
    let sub = n.subscriber(&a);
    n.fake.calls();
    let m1 = n.fake.append(&a, "m1");
    n.replica.on_messages(&a, [m1]);
    let _lost = n.fake.append(&a, "m2");
    let m3 = n.fake.append(&a, "m3");
    n.replica.on_messages(&a, [m3]);
    assert_eq!(n.replica.state(&a), Some(State::Resyncing));
    assert_eq!(n.seqs(&a), [1], "nothing after a gap until the resync");
    settle().await;
    assert_eq!(n.fake.calls(), ["snapshot a"]);
    assert_eq!(n.replica.state(&a), Some(State::Synced));
    assert_eq!(n.seqs(&a), [1, 2, 3]);
    assert!(
        !was_reset(&sub),
        "the run was ingested: subscribers keep going"
    );
}

#[tokio::test(start_paused = true)]
async fn messages_delivered_out_of_order_end_in_the_store_order() {
    let n = node();
    let a = ch("a");
    n.join(&a).await.unwrap();
    let sub = n.subscriber(&a);
    let m: Vec<Incoming> = (1..=4)
        .map(|i| n.fake.append(&a, &format!("m{i}")))
        .collect();
    // 1, then 3 (2 is late), then 2 and 4 while the resync runs.
    n.replica.on_messages(&a, [m[0].clone(), m[2].clone()]);
    n.replica.on_messages(&a, [m[1].clone(), m[3].clone()]);
    settle().await;
    assert_eq!(n.seqs(&a), [1, 2, 3, 4]);
    assert!(!was_reset(&sub));
    assert_eq!(n.replica.state(&a), Some(State::Synced));
}

#[tokio::test(start_paused = true)]
async fn another_epoch_resets_the_channel_and_closes_its_subscribers_for_resume() {
    let n = node();
    let a = ch("a");
    n.fake.append(&a, "old");
    n.join(&a).await.unwrap();
    let sub = n.subscriber(&a);
    let before = n.engine.position(&a).unwrap();
    n.fake.forget(&a);
    let fresh = n.fake.append(&a, "new");
    n.replica.on_messages(&a, [fresh]);
    settle().await;
    let after = n.engine.position(&a).unwrap();
    assert_ne!(after.epoch, before.epoch);
    assert_eq!(after, n.fake.position(&a));
    assert_eq!(n.held(&a), [(1, "new".to_owned())]);
    assert!(
        was_reset(&sub),
        "positions of the old epoch no longer connect"
    );
}

#[tokio::test(start_paused = true)]
async fn an_epoch_marker_resyncs_only_when_it_names_another_epoch() {
    let n = node();
    let a = ch("a");
    n.fake.append(&a, "m1");
    n.join(&a).await.unwrap();
    n.fake.calls();
    let same = n.engine.position(&a).unwrap().epoch;
    n.replica.on_messages(&a, [Incoming::Epoch(same)]);
    assert_eq!(n.replica.state(&a), Some(State::Synced));
    n.fake.forget(&a);
    n.fake.append(&a, "m1 again");
    let other = n.fake.position(&a).epoch;
    n.replica.on_messages(&a, [Incoming::Epoch(other)]);
    assert_eq!(n.replica.state(&a), Some(State::Resyncing));
    settle().await;
    assert_eq!(n.fake.calls(), ["snapshot a"]);
    assert_eq!(n.engine.position(&a), Some(n.fake.position(&a)));
}

#[tokio::test(start_paused = true)]
async fn messages_that_arrive_during_a_join_are_buffered_and_replayed_after_the_snapshot() {
    let n = node();
    let a = ch("a");
    let m1 = n.fake.append(&a, "m1");
    let m2 = n.fake.append(&a, "m2");
    let release = n.fake.hold_snapshot();
    let mut joining = n.replica.join(&a).unwrap();
    settle().await;
    // The snapshot read the store at seq 2; 3 is published after, and 2 arrives late.
    let m3 = n.fake.append(&a, "m3");
    n.replica.on_messages(&a, [m1, m2, m3]);
    assert_eq!(n.replica.state(&a), Some(State::Joining));
    assert!((&mut joining).now_or_never().is_none(), "the join waits");
    assert!(
        n.seqs(&a).is_empty(),
        "nothing is ingested before the snapshot"
    );
    release.send(()).unwrap();
    settle().await;
    joining.await.unwrap();
    assert_eq!(n.seqs(&a), [1, 2, 3]);
    assert_eq!(n.replica.state(&a), Some(State::Synced));
}

#[tokio::test(start_paused = true)]
async fn a_buffer_that_overflows_during_a_sync_starts_another_sync() {
    let n = node();
    let a = ch("a");
    let release = n.fake.hold_snapshot();
    let joining = n.replica.join(&a).unwrap();
    settle().await;
    let burst: Vec<Incoming> = (0..=SYNC_BUFFER)
        .map(|i| n.fake.append(&a, &i.to_string()))
        .collect();
    n.replica.on_messages(&a, burst);
    n.fake.calls();
    release.send(()).unwrap();
    settle().await;
    joining.await.unwrap();
    assert_eq!(n.fake.calls(), ["snapshot a"], "one more read of the store");
    assert_eq!(n.engine.position(&a), Some(n.fake.position(&a)));
}

#[tokio::test(start_paused = true)]
async fn a_join_fails_at_once_while_the_store_is_down_and_a_pending_one_fails_when_it_goes() {
    let n = node();
    let a = ch("a");
    n.fake.set_down(true);
    let refused = n.replica.join(&a).unwrap().now_or_never();
    assert!(matches!(refused, Some(Err(BackplaneError::Unavailable(_)))));
    assert_eq!(n.replica.state(&a), None);
    assert!(!n.replica.is_ready());

    n.fake.set_down(false);
    let _held = n.fake.hold_snapshot();
    let joining = n.replica.join(&a).unwrap();
    settle().await;
    n.fake.set_down(true);
    n.replica.disconnected();
    assert!(matches!(joining.await, Err(BackplaneError::Unavailable(_))));
    assert_eq!(
        n.replica.state(&a),
        None,
        "a channel never synced is dropped"
    );
    assert!(n.fake.calls().contains(&"unsubscribe a".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn a_reconnect_subscribes_every_channel_again_and_resyncs_it() {
    let n = node();
    let (a, b) = (ch("a"), ch("b"));
    n.fake.append(&b, "b1");
    n.join(&a).await.unwrap();
    n.join(&b).await.unwrap();
    let (sa, sb) = (n.subscriber(&a), n.subscriber(&b));
    n.fake.calls();

    n.fake.set_down(true);
    n.replica.disconnected();
    assert_eq!(
        n.replica.state(&a),
        Some(State::Synced),
        "synced channels stay"
    );
    // While down: `a` moves on, `b` is lost by the store; nothing is delivered.
    n.fake.append(&a, "a1");
    n.fake.append(&a, "a2");
    n.fake.forget(&b);
    n.fake.set_down(false);
    n.replica.connected(false);
    settle().await;
    let mut calls = n.fake.calls();
    calls.sort();
    assert_eq!(
        calls,
        ["snapshot a", "snapshot b", "subscribe a", "subscribe b"]
    );
    assert_eq!(
        n.seqs(&a),
        [1, 2],
        "what was published meanwhile is ingested"
    );
    assert!(!was_reset(&sa));
    assert_eq!(n.engine.position(&b), Some(n.fake.position(&b)));
    assert!(
        was_reset(&sb),
        "a store that lost the channel starts a new epoch"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lagging_reader_resyncs_every_channel() {
    let n = node();
    let (a, b) = (ch("a"), ch("b"));
    n.join(&a).await.unwrap();
    n.join(&b).await.unwrap();
    n.fake.calls();
    n.fake.append(&a, "lost");
    n.replica.resync_all();
    settle().await;
    let mut calls = n.fake.calls();
    calls.sort();
    assert_eq!(calls, ["snapshot a", "snapshot b"]);
    assert_eq!(n.seqs(&a), [1]);
}

#[tokio::test(start_paused = true)]
async fn an_idle_channel_is_unsubscribed_only_after_the_grace_period() {
    let n = node();
    let (a, busy) = (ch("a"), ch("busy"));
    n.join(&a).await.unwrap();
    n.join(&busy).await.unwrap();
    let _sub = n.subscriber(&busy);
    n.fake.calls();
    let t0 = Instant::now();
    n.replica.maintain(t0);
    n.replica.maintain(t0 + TICK);
    assert_eq!(
        n.replica.state(&a),
        Some(State::Synced),
        "within the grace period"
    );
    let late = t0 + LINGER + Duration::from_millis(1);
    n.replica.maintain(late);
    assert!(
        n.replica.state(&a).is_some(),
        "one quiet pass is not enough"
    );
    // A subscriber comes and goes: the count starts over.
    assert!(n.replica.join(&a).is_none());
    n.replica.maintain(late + LINGER + TICK);
    assert!(n.replica.state(&a).is_some());
    n.replica.maintain(late + LINGER + TICK * 2);
    assert_eq!(
        n.replica.state(&a),
        None,
        "two quiet passes after the grace period"
    );
    assert_eq!(n.fake.calls(), ["unsubscribe a"]);
    assert!(
        n.replica.state(&busy).is_some(),
        "a channel with subscribers stays"
    );
}

#[tokio::test(start_paused = true)]
async fn a_channel_with_local_subscribers_that_is_not_received_gets_joined() {
    let n = node();
    let a = ch("a");
    n.fake.append(&a, "m1");
    let _sub = n.subscriber(&a);
    n.replica.maintain(Instant::now());
    assert_eq!(n.replica.state(&a), Some(State::Joining));
    settle().await;
    assert_eq!(n.fake.calls(), ["subscribe a", "snapshot a"]);
    assert_eq!(n.replica.state(&a), Some(State::Synced));
    assert_eq!(n.seqs(&a), [1]);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_cannot_be_read_fails_the_join_and_the_sync_keeps_trying() {
    let n = node();
    let a = ch("a");
    n.fake.st.lock().failing_snapshots = SYNC_ATTEMPTS_BEFORE_FAILING;
    let joining = n.replica.join(&a).unwrap();
    assert!(matches!(joining.await, Err(BackplaneError::Unavailable(_))));
    tokio::time::sleep(BACKOFF_CAP * 2).await;
    assert_eq!(
        n.replica.state(&a),
        Some(State::Synced),
        "the next read worked"
    );
    let snapshots = n
        .fake
        .calls()
        .iter()
        .filter(|c| c.starts_with("snapshot"))
        .count();
    assert_eq!(snapshots as u32, SYNC_ATTEMPTS_BEFORE_FAILING + 1);
}

#[tokio::test(start_paused = true)]
async fn history_shows_the_store_within_the_size_and_age_of_the_window() {
    let n = node();
    let a = ch("a");
    n.fake.append_at(&a, "too old", ms_ago(TTL * 2));
    for i in 2..=12 {
        n.fake.append(&a, &format!("m{i}"));
    }
    let h = n.replica.history(&a, 0, 100).await.unwrap();
    let seqs: Vec<u64> = h.publications.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (3..=12).collect::<Vec<_>>(), "the last {SIZE} only");
    assert!(!h.complete, "seq 1 is gone");
    assert_eq!(h.position, Some(n.fake.position(&a)));
    let h = n.replica.history(&a, 9, 2).await.unwrap();
    let seqs: Vec<u64> = h.publications.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, [10, 11], "at most the limit");
    assert!(h.complete);

    let b = ch("b");
    n.fake.append_at(&b, "expired", ms_ago(TTL * 2));
    let h = n.replica.history(&b, 0, 100).await.unwrap();
    assert!(
        h.publications.is_empty() && !h.complete,
        "older than the TTL"
    );
    let unknown = n.replica.history(&ch("never"), 0, 10).await.unwrap();
    assert_eq!(
        unknown.position, None,
        "from the local engine, which reading does not create"
    );
    assert!(unknown.publications.is_empty() && unknown.complete);
}

#[tokio::test(start_paused = true)]
async fn presence_is_written_for_local_members_and_mirrored_from_other_nodes() {
    let n = node();
    let p = ch("p:lobby");
    n.join(&p).await.unwrap();
    let who = |client: &str, user: &str| Identity {
        client: Arc::from(client),
        user: Arc::from(user),
        info: None,
    };
    let live = Arc::new(Liveness::default());
    live.touch(n.engine.millis(Instant::now()));
    let join = Join {
        who: who("c1", "alice"),
        live,
    };
    let alice = n
        .engine
        .subscribe(0, &p, None, Some(join), Instant::now())
        .unwrap();
    let users = |n: &Node| {
        let mut u: Vec<String> = n
            .engine
            .presence(&p, None, 1000, usize::MAX)
            .unwrap()
            .members
            .iter()
            .map(|m| m.user.to_string())
            .collect();
        u.sort();
        u
    };

    // Another node's member, as the store lists it.
    let bob = who("c2", "bob");
    let expiry = wall_ms() + 2000;
    n.fake.st.lock().members.insert(
        p.clone(),
        HashMap::from([(bob.client.clone(), ("other".to_owned(), bob, expiry))]),
    );
    let work = n.replica.maintain(Instant::now());
    assert_eq!(work.len(), 1);
    for (name, ops, read) in work {
        assert!(read);
        n.replica.run_presence(&name, ops, read).await;
    }
    assert_eq!(
        n.fake.st.lock().written,
        [("p:lobby".to_owned(), "+", "c1".to_owned())],
        "this node's member is written"
    );
    assert_eq!(users(&n), ["alice", "bob"]);

    // Announcements: another node's join and leave; this node's own is ignored.
    let carol = super::super::presence::encode_member("third", &who("c3", "carol"));
    n.replica.presence_joined(&p, "c3", &carol);
    let mine = super::super::presence::encode_member("me", &who("c9", "mallory"));
    n.replica.presence_joined(&p, "c9", &mine);
    assert_eq!(users(&n), ["alice", "bob", "carol"]);
    n.replica.presence_left(&p, "c3");
    assert_eq!(users(&n), ["alice", "bob"]);

    // The channel is left: the mirrored members leave this node's view.
    n.engine.unsubscribe(0, &alice.channel, Instant::now());
    let t = Instant::now() + LINGER + TICK;
    n.replica.maintain(t);
    n.replica.maintain(t + TICK);
    assert_eq!(n.replica.state(&p), None);
    assert!(!users(&n).contains(&"bob".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn a_batch_ingests_each_channel_in_order_and_a_gap_resyncs_only_its_channel() {
    let n = node();
    let (a, b) = (ch("a"), ch("b"));
    n.join(&a).await.unwrap();
    n.join(&b).await.unwrap();
    let _sa = n.subscriber(&a);
    let _sb = n.subscriber(&b);
    n.fake.calls();
    let a1 = n.fake.append(&a, "a1");
    let b1 = n.fake.append(&b, "b1");
    let a2 = n.fake.append(&a, "a2");
    let _lost = n.fake.append(&b, "b2");
    let b3 = n.fake.append(&b, "b3");
    let mut batch = Batch::default();
    for (c, m) in [(&a, a1), (&b, b1), (&a, a2), (&b, b3)] {
        batch.push(c.clone(), m);
    }
    assert!(batch.holds(&a) && batch.holds(&b) && !batch.holds(&ch("c")));
    n.replica.on_batch(&mut batch);
    assert!(batch.is_empty(), "the batch is handed over whole");
    assert_eq!(n.seqs(&a), [1, 2]);
    assert_eq!(n.replica.state(&a), Some(State::Synced));
    assert_eq!(n.replica.state(&b), Some(State::Resyncing), "b lost b2");
    settle().await;
    assert_eq!(n.fake.calls(), ["snapshot b"]);
    assert_eq!(n.seqs(&b), [1, 2, 3]);
    assert_eq!(n.replica.state(&b), Some(State::Synced));
}

/// Publishes `data` on `ch` through the replica (as a transport does) and returns its seq.
async fn publish(n: &Node, ch: &ChannelName, data: &str) -> u64 {
    let data = Bytes::from(data.to_owned());
    n.replica.publish(ch, DataKind::Json, data).await.unwrap().1
}

#[tokio::test(start_paused = true)]
async fn an_own_publish_is_fanned_out_from_the_answer_and_its_echo_is_a_duplicate() {
    let n = node();
    let a = ch("a");
    n.join(&a).await.unwrap();
    let sub = n.subscriber(&a);
    n.fake.calls();
    for i in 1..=3 {
        assert_eq!(publish(&n, &a, &format!("m{i}")).await, i);
    }
    assert_eq!(
        n.held(&a),
        (1..=3).map(|i| (i, format!("m{i}"))).collect::<Vec<_>>(),
        "in the ring before the store delivered them"
    );
    assert_eq!(n.engine.position(&a), Some(n.fake.position(&a)));
    n.replica.on_messages(&a, n.fake.echoes());
    let m4 = n.fake.append(&a, "other node's");
    n.replica.on_messages(&a, [m4]);
    assert_eq!(
        n.seqs(&a),
        [1, 2, 3, 4],
        "echoes ignored, the next one follows"
    );
    assert_eq!(n.replica.state(&a), Some(State::Synced));
    assert!(!was_reset(&sub));
    settle().await;
    assert!(n.fake.calls().is_empty(), "no resync");
}

#[tokio::test(start_paused = true)]
async fn an_own_publish_behind_another_nodes_undelivered_message_waits_for_the_store_order() {
    let n = node();
    let a = ch("a");
    n.join(&a).await.unwrap();
    let sub = n.subscriber(&a);
    n.fake.calls();
    // Another node's message 1 is sequenced but not delivered yet when ours (2) is answered.
    let theirs = n.fake.append(&a, "theirs");
    assert_eq!(publish(&n, &a, "mine").await, 2);
    assert!(n.seqs(&a).is_empty(), "2 cannot come before 1");
    assert_eq!(
        n.replica.state(&a),
        Some(State::Synced),
        "not a gap: no resync"
    );
    // The store delivers both, in its order: 1, then our 2.
    n.replica.on_messages(&a, [theirs]);
    n.replica.on_messages(&a, n.fake.echoes());
    assert_eq!(
        n.held(&a),
        [(1, "theirs".to_owned()), (2, "mine".to_owned())]
    );
    // Interleaved the other way: ours answered first, theirs after it.
    assert_eq!(publish(&n, &a, "mine again").await, 3);
    let theirs = n.fake.append(&a, "theirs again");
    n.replica.on_messages(&a, n.fake.echoes());
    n.replica.on_messages(&a, [theirs]);
    assert_eq!(n.seqs(&a), [1, 2, 3, 4]);
    assert!(!was_reset(&sub));
    settle().await;
    assert!(n.fake.calls().is_empty(), "no resync");
}

#[tokio::test(start_paused = true)]
async fn a_gap_in_the_stores_delivery_still_resyncs_when_own_publishes_are_answered() {
    let n = node();
    let a = ch("a");
    n.join(&a).await.unwrap();
    let sub = n.subscriber(&a);
    n.fake.calls();
    assert_eq!(publish(&n, &a, "m1").await, 1);
    // Another node's 2 is lost by the fan-out; our 3 cannot be appended from its answer.
    let _lost = n.fake.append(&a, "m2");
    assert_eq!(publish(&n, &a, "m3").await, 3);
    assert_eq!(n.seqs(&a), [1]);
    // The store's delivery shows the gap: 1 (a duplicate), then 3.
    n.replica.on_messages(&a, n.fake.echoes());
    assert_eq!(n.replica.state(&a), Some(State::Resyncing));
    settle().await;
    assert_eq!(n.fake.calls(), ["snapshot a"]);
    assert_eq!(n.seqs(&a), [1, 2, 3]);
    assert!(!was_reset(&sub), "the run was ingested");
}

#[tokio::test(start_paused = true)]
async fn an_own_publish_in_another_epoch_or_during_a_sync_is_left_to_the_store() {
    let n = node();
    let a = ch("a");
    n.fake.append(&a, "old");
    n.join(&a).await.unwrap();
    let sub = n.subscriber(&a);
    n.fake.calls();
    // The store lost the channel: our publish starts its next epoch.
    n.fake.forget(&a);
    let before = n.engine.position(&a).unwrap();
    assert_eq!(publish(&n, &a, "new").await, 1);
    assert_eq!(
        n.engine.position(&a),
        Some(before),
        "another epoch: not ingested"
    );
    assert_eq!(n.replica.state(&a), Some(State::Synced));
    // The echo names the new epoch: the channel resyncs and resets.
    let release = n.fake.hold_snapshot();
    n.replica.on_messages(&a, n.fake.echoes());
    assert_eq!(n.replica.state(&a), Some(State::Resyncing));
    settle().await;
    // While it syncs, an answered publish waits for the sync too.
    assert_eq!(publish(&n, &a, "during").await, 2);
    assert_eq!(n.engine.position(&a), Some(before));
    release.send(()).unwrap();
    settle().await;
    assert_eq!(n.replica.state(&a), Some(State::Synced));
    n.replica.on_messages(&a, n.fake.echoes());
    assert_eq!(
        n.held(&a),
        [(1, "new".to_owned()), (2, "during".to_owned())]
    );
    assert_eq!(n.engine.position(&a), Some(n.fake.position(&a)));
    assert!(was_reset(&sub));
}

#[tokio::test(start_paused = true)]
async fn a_repeated_idempotent_publish_is_not_ingested_twice() {
    let n = node();
    let a = ch("a");
    n.join(&a).await.unwrap();
    let cond = PublishConditions {
        idempotency_key: Some("k".into()),
        expected_seq: None,
    };
    let first = n
        .replica
        .publish_with(&a, DataKind::Json, Bytes::from_static(b"m1"), cond.clone())
        .await
        .unwrap();
    let again = n
        .replica
        .publish_with(&a, DataKind::Json, Bytes::from_static(b"m1"), cond)
        .await
        .unwrap();
    assert_eq!((first.1, first.2), (1, false));
    assert_eq!((again.1, again.2), (1, true));
    assert_eq!(n.held(&a), [(1, "m1".to_owned())]);
    assert_eq!(publish(&n, &a, "m2").await, 2);
    assert_eq!(n.seqs(&a), [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn an_own_publish_on_a_channel_not_received_here_is_not_ingested() {
    let n = node();
    let a = ch("a");
    assert_eq!(publish(&n, &a, "m1").await, 1);
    assert_eq!(n.engine.position(&a), None, "no channel made on this node");
}
