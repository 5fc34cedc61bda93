//! One conformance suite for every backplane: the same scenarios run against memory, Redis and
//! NATS (like centrifuge's `map_broker_shared_test.go`). A scenario gets a [`Store`] and makes
//! in-process nodes on it (an engine and its backplane each, as `relay serve` wires them); the
//! Redis and NATS stores are real `redis-server` / `nats-server` processes on free loopback
//! ports (see `tests/cluster/mod.rs`). With the memory backplane every node is the one engine:
//! the contract is the same, there is just nothing to carry between nodes.
//!
//! What the scenarios hold every backplane to: one gap-free seq space per channel in publish
//! order; history after a position within the size and age of the window; a resume on any node
//! that recovers exactly what was missed, or says it cannot; a new epoch when the store lost a
//! channel; a join that brings a node to the store's position with its history; presence
//! joins, leaves and expiries seen on every node; a store restart after which every node
//! carries on without loss or repeats (or resets, when the store came back empty).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster::{Kind, Server};
use relay::backplane::memory::MemoryBackplane;
use relay::backplane::{Backplane, BackplaneError, Settings, Wakers};
use relay::engine::presence::{Identity, Liveness, PresenceConfig};
use relay::engine::{Engine, EngineConfig, GapReason, Join, Subscribed};
use relay::types::{ChannelName, DataKind, Epoch, StreamPosition};
use tokio_util::sync::CancellationToken;

/// The settings of one scenario (every node of a store shares them).
#[derive(Clone)]
struct Setup {
    history_size: usize,
    history_ttl: Duration,
    presence_timeout: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            presence_timeout: Duration::from_secs(2),
        }
    }
}

/// Where the nodes of a scenario sequence their channels.
struct Store {
    setup: Setup,
    backend: Backend,
    /// The nodes' stop tokens: cancelled when the store goes (their threads end).
    stops: std::sync::Mutex<Vec<CancellationToken>>,
}

enum Backend {
    /// The single-node backplane: every node is this one.
    Memory(Node),
    Remote(Server, Kind),
}

/// One relay node in this process: its engine and its backplane.
#[derive(Clone)]
struct Node {
    engine: Arc<Engine>,
    backplane: Arc<dyn Backplane>,
    stop: CancellationToken,
}

fn engine(setup: &Setup, seed: u64) -> Arc<Engine> {
    Arc::new(Engine::new(EngineConfig {
        shards: 1,
        history_size: setup.history_size,
        history_ttl: setup.history_ttl,
        seed,
        presence: PresenceConfig {
            patterns: vec!["presence:*".into()],
            timeout: setup.presence_timeout,
            max_members: 100,
            ..Default::default()
        },
        ..Default::default()
    }))
}

/// The seqs a subscriber's replay pages out of the ring: those after its resume point, up to
/// its position.
fn replayed(s: &relay::engine::Subscribed) -> Vec<u64> {
    let mut out = Vec::new();
    if let Some(after) = s.replay_after {
        assert!(
            s.channel
                .read_page(after, s.generation, usize::MAX, &mut out),
            "the replay connects"
        );
    }
    out.iter()
        .map(|p| p.seq)
        .filter(|&q| q <= s.position.seq)
        .collect()
}

fn seed(id: &str) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    id.bytes().fold(t ^ u64::from(std::process::id()), |h, b| {
        h.rotate_left(7) ^ u64::from(b)
    })
}

impl Store {
    fn memory(setup: Setup) -> Store {
        let engine = engine(&setup, seed("memory"));
        let backplane = Arc::new(MemoryBackplane::new(engine.clone(), Wakers::new(1)));
        Store {
            setup,
            backend: Backend::Memory(Node {
                engine,
                backplane,
                stop: CancellationToken::new(),
            }),
            stops: Default::default(),
        }
    }

    fn remote(kind: Kind, setup: Setup) -> Store {
        Store {
            setup,
            backend: Backend::Remote(Server::start(kind), kind),
            stops: Default::default(),
        }
    }

    /// A node on the store, ready to publish.
    async fn node(&self, id: &str) -> Node {
        let (server, kind) = match &self.backend {
            Backend::Memory(n) => return n.clone(),
            Backend::Remote(server, kind) => (server, *kind),
        };
        let engine = engine(&self.setup, seed(id));
        let settings = Settings {
            url: server.url(),
            history_size: self.setup.history_size,
            history_ttl: self.setup.history_ttl,
            node_id: id.to_owned(),
            seed: seed(id),
            presence_timeout: self.setup.presence_timeout,
            idempotency_window: Duration::from_secs(60),
        };
        let stop = CancellationToken::new();
        self.stops.lock().unwrap().push(stop.clone());
        let (e, w, s) = (engine.clone(), Wakers::new(1), stop.clone());
        let backplane: Arc<dyn Backplane> = match kind {
            Kind::Redis => relay::backplane::redis::start(settings, e, w, s).unwrap(),
            Kind::Nats => relay::backplane::nats::start(settings, e, w, s).unwrap(),
        };
        let node = Node {
            engine,
            backplane,
            stop,
        };
        node.wait_ready(true).await;
        node
    }

    /// Whether the store can be down (memory never is).
    fn can_fail(&self) -> bool {
        matches!(self.backend, Backend::Remote(..))
    }

    /// The store loses every channel: Redis and NATS restart without their data; the memory
    /// engine forgets its idle channels (as its sweep does once their history expired).
    async fn empty(&mut self, nodes: &[&Node]) {
        match &mut self.backend {
            Backend::Memory(n) => {
                let later = Instant::now() + self.setup.history_ttl * 2;
                assert!(
                    (0..64).map(|_| n.engine.tick(later).expired).sum::<usize>() > 0,
                    "the memory engine forgot channels"
                );
            }
            Backend::Remote(server, _) => {
                server.restart_empty();
                for n in nodes {
                    n.wait_ready(true).await;
                }
            }
        }
    }

    /// The store is killed (the nodes notice), then started again with what it keeps (NATS
    /// its streams; Redis nothing). The memory store never goes away.
    async fn kill(&mut self, nodes: &[&Node]) {
        if let Backend::Remote(server, _) = &mut self.backend {
            server.kill();
            for n in nodes {
                n.wait_ready(false).await;
            }
        }
    }

    async fn restart(&mut self, nodes: &[&Node]) {
        if let Backend::Remote(server, _) = &mut self.backend {
            server.restart();
            for n in nodes {
                n.wait_ready(true).await;
            }
        }
    }
}

fn ch(name: &str) -> ChannelName {
    ChannelName::new(name).unwrap()
}

async fn within<F: std::future::Future>(what: &str, d: Duration, f: F) -> F::Output {
    tokio::time::timeout(d, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {d:?}"))
}

impl Node {
    async fn wait_ready(&self, ready: bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.backplane.is_ready() != ready {
            assert!(
                Instant::now() < deadline,
                "backplane ready != {ready} in 15 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn publish(
        &self,
        channel: &ChannelName,
        data: &str,
    ) -> Result<(Epoch, u64), BackplaneError> {
        let data = Bytes::from(data.to_owned());
        within(
            "publish",
            Duration::from_secs(10),
            self.backplane.publish(channel, DataKind::Json, data),
        )
        .await
    }

    /// Joins `channel` (what a transport awaits before it adds a subscriber).
    async fn join(&self, channel: &ChannelName) {
        if let Some(j) = self.backplane.join(channel) {
            within("join", Duration::from_secs(15), j).await.unwrap();
        }
    }

    /// A subscriber on this node, resuming from `resume` when given (joins first).
    async fn subscribe(&self, channel: &ChannelName, resume: Option<StreamPosition>) -> Subscribed {
        self.subscribe_as(channel, resume, None).await
    }

    async fn subscribe_as(
        &self,
        channel: &ChannelName,
        resume: Option<StreamPosition>,
        join: Option<Join>,
    ) -> Subscribed {
        self.join(channel).await;
        self.engine
            .subscribe(0, channel, resume, join, Instant::now())
            .unwrap()
    }

    /// Waits until this node's replica of `channel` is at `at`.
    async fn wait_position(&self, channel: &ChannelName, at: (Epoch, u64)) {
        let want = StreamPosition {
            epoch: at.0,
            seq: at.1,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.engine.position(channel);
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "position {got:?}, want {want:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What this node holds of `channel`: `(seq, payload)`, oldest first.
    fn held(&self, channel: &ChannelName) -> Vec<(u64, String)> {
        let h = self.engine.history(channel, 0, usize::MAX, Instant::now());
        h.publications
            .iter()
            .map(|p| (p.seq, String::from_utf8(p.data.to_vec()).unwrap()))
            .collect()
    }

    async fn history(
        &self,
        channel: &ChannelName,
        since: u64,
        limit: usize,
    ) -> (Vec<u64>, bool, Option<StreamPosition>) {
        let h = within(
            "history",
            Duration::from_secs(10),
            self.backplane.history(channel, since, limit),
        )
        .await
        .unwrap();
        let seqs = h.publications.iter().map(|p| p.seq).collect();
        (seqs, h.complete, h.position)
    }

    /// The users present in `channel` as this node sees them, sorted.
    fn users(&self, channel: &ChannelName) -> Vec<String> {
        let mut users: Vec<String> = self
            .engine
            .presence(channel, None, 1000, usize::MAX)
            .map(|p| p.members.iter().map(|m| m.user.to_string()).collect())
            .unwrap_or_default();
        users.sort();
        users
    }

    async fn wait_users(&self, channel: &ChannelName, want: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.users(channel);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "users {got:?}, want {want:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        for stop in self.stops.lock().unwrap().drain(..) {
            stop.cancel();
        }
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

// ---------------------------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------------------------

async fn publishes_get_gap_free_seqs_in_one_epoch_and_arrive_in_order(store: Store) {
    let a = store.node("a").await;
    let room = ch("room");
    let sub = a.subscribe(&room, None).await;
    assert_eq!(sub.position.seq, 0, "a fresh channel");
    let mut replies = Vec::new();
    for i in 1..=20 {
        replies.push(a.publish(&room, &format!("m{i}")).await.unwrap());
    }
    let epoch = replies[0].0;
    assert_eq!(
        replies,
        (1..=20).map(|s| (epoch, s)).collect::<Vec<_>>(),
        "seqs 1, 2, 3 … in one epoch"
    );
    a.wait_position(&room, (epoch, 20)).await;
    assert_eq!(
        a.held(&room),
        (1..=20).map(|i| (i, format!("m{i}"))).collect::<Vec<_>>(),
        "in publish order"
    );
    assert!(!was_reset(&sub));
}

async fn two_nodes_sharing_a_channel_hold_the_same_messages_under_the_same_seqs(store: Store) {
    let (a, b) = (store.node("a").await, store.node("b").await);
    let room = ch("shared");
    let subs = [
        a.subscribe(&room, None).await,
        b.subscribe(&room, None).await,
    ];
    let mut tasks = Vec::new();
    for p in 0..4 {
        let n = if p % 2 == 0 { a.clone() } else { b.clone() };
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for k in 0..10 {
                let data = format!("p{p}k{k}");
                let (epoch, seq) = n.publish(&room, &data).await.unwrap();
                got.push((epoch, seq, data));
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by_key(|(_, seq, _)| *seq);
    let epoch = all[0].0;
    assert!(all.iter().all(|(e, _, _)| *e == epoch), "one epoch");
    assert_eq!(
        all.iter().map(|(_, s, _)| *s).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>(),
        "no gap, no repeat across nodes"
    );
    let want: Vec<(u64, String)> = all.into_iter().map(|(_, s, d)| (s, d)).collect();
    for (n, sub) in [(&a, &subs[0]), (&b, &subs[1])] {
        n.wait_position(&room, (epoch, 40)).await;
        assert_eq!(n.held(&room), want, "every node: one order");
        assert!(!was_reset(sub));
    }
}

async fn history_after_a_position_is_bounded_by_the_size_and_age_of_the_window(store: Store) {
    let ttl = store.setup.history_ttl;
    let (a, b) = (store.node("a").await, store.node("b").await);
    let log = ch("log");
    for i in 1..=8 {
        a.publish(&log, &format!("m{i}")).await.unwrap();
    }
    // From a node that never received the channel, too.
    for n in [&a, &b] {
        let (seqs, complete, pos) = n.history(&log, 0, 100).await;
        assert_eq!(seqs, [4, 5, 6, 7, 8], "the last 5 (the history size)");
        assert!(!complete, "seq 1 is gone");
        assert_eq!(pos.map(|p| p.seq), Some(8));
        assert_eq!(n.history(&log, 5, 100).await.0, [6, 7, 8]);
        assert!(n.history(&log, 5, 100).await.1);
        assert_eq!(n.history(&log, 3, 2).await.0, [4, 5], "at most the limit");
        let (seqs, complete, _) = n.history(&log, 8, 100).await;
        assert!(seqs.is_empty() && complete, "nothing after the top");
    }
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    for n in [&a, &b] {
        let (seqs, complete, _) = n.history(&log, 5, 100).await;
        assert!(seqs.is_empty(), "older than the TTL: {seqs:?}");
        assert!(!complete);
    }
}

async fn a_resume_on_another_node_recovers_exactly_what_was_missed_or_says_it_cannot(store: Store) {
    let (a, b) = (store.node("a").await, store.node("b").await);
    let feed = ch("feed");
    let sub = a.subscribe(&feed, None).await;
    let mut last = (Epoch(0), 0);
    for i in 1..=3 {
        last = a.publish(&feed, &format!("m{i}")).await.unwrap();
    }
    a.wait_position(&feed, last).await;
    let seen = StreamPosition {
        epoch: sub.position.epoch,
        seq: 3,
    };
    assert_eq!(seen.epoch, last.0);
    // The client is away while 4..=6 are published, then resumes on the other node.
    for i in 4..=6 {
        b.publish(&feed, &format!("m{i}")).await.unwrap();
    }
    let back = b.subscribe(&feed, Some(seen)).await;
    assert!(back.recovered, "recovered: {:?}", back.gap);
    assert_eq!(replayed(&back), [4, 5, 6], "exactly the missed messages");
    // A position the history no longer covers (size 5).
    for i in 7..=12 {
        a.publish(&feed, &format!("m{i}")).await.unwrap();
    }
    b.wait_position(&feed, (last.0, 12)).await;
    let too_old = b.subscribe(&feed, Some(seen)).await;
    assert!(!too_old.recovered);
    assert_eq!(too_old.gap, Some(GapReason::HistoryExpired));
}

async fn a_store_that_lost_a_channel_starts_a_new_epoch_and_resumes_say_so(mut store: Store) {
    let (a, b) = (store.node("a").await, store.node("b").await);
    let gone = ch("gone");
    let mut last = (Epoch(0), 0);
    for i in 1..=3 {
        last = a.publish(&gone, &format!("m{i}")).await.unwrap();
    }
    store.empty(&[&a, &b]).await;
    let fresh = a.publish(&gone, "after").await.unwrap();
    assert_ne!(fresh.0, last.0, "a new epoch");
    assert_eq!(fresh.1, 1, "numbered from 1 again");
    let (seqs, _, pos) = b.history(&gone, 0, 100).await;
    assert_eq!(pos.map(|p| (p.epoch, p.seq)), Some(fresh));
    assert_eq!(seqs, [1]);
    let old = StreamPosition {
        epoch: last.0,
        seq: 3,
    };
    let resumed = b.subscribe(&gone, Some(old)).await;
    assert!(!resumed.recovered);
    assert_eq!(resumed.gap, Some(GapReason::EpochChanged));
    assert_eq!(resumed.position.epoch, fresh.0);
}

async fn a_node_joining_a_channel_with_history_adopts_its_position_and_history(store: Store) {
    let (a, b) = (store.node("a").await, store.node("b").await);
    let old = ch("old");
    let mut last = (Epoch(0), 0);
    for i in 1..=7 {
        last = a.publish(&old, &format!("m{i}")).await.unwrap();
    }
    let resume = StreamPosition {
        epoch: last.0,
        seq: 4,
    };
    let sub = b.subscribe(&old, Some(resume)).await;
    assert_eq!(
        sub.position,
        StreamPosition {
            epoch: last.0,
            seq: 7
        }
    );
    assert!(sub.recovered);
    assert_eq!(replayed(&sub), [5, 6, 7]);
    let next = a.publish(&old, "m8").await.unwrap();
    b.wait_position(&old, next).await;
    assert_eq!(b.held(&old).last(), Some(&(8, "m8".to_owned())));
}

/// Touches the liveness of members and sweeps presence on the nodes (what their connections
/// and shard 0 do), every 100 ms, until dropped.
struct Heartbeats {
    stop: CancellationToken,
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn heartbeats(nodes: Vec<Node>, live: Vec<(Node, Arc<Liveness>)>) -> Heartbeats {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        while !s.is_cancelled() {
            let now = Instant::now();
            for (n, l) in &live {
                l.touch(n.engine.millis(now));
            }
            for n in &nodes {
                n.engine.sweep_presence(now);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Heartbeats { stop }
}

fn member(n: &Node, client: &str, user: &str) -> (Join, Arc<Liveness>) {
    let live = Arc::new(Liveness::default());
    live.touch(n.engine.millis(Instant::now()));
    let who = Identity {
        client: Arc::from(client),
        user: Arc::from(user),
        info: None,
    };
    (
        Join {
            who,
            live: live.clone(),
        },
        live,
    )
}

async fn presence_joins_leaves_and_expiries_are_seen_on_every_node(store: Store) {
    let timeout = store.setup.presence_timeout;
    let (a, b, c) = (
        store.node("a").await,
        store.node("b").await,
        store.node("c").await,
    );
    let lobby = ch("presence:lobby");
    let (ja, la) = member(&a, "ca", "alice");
    let (jb, lb) = member(&b, "cb", "bob");
    let (jc, lc) = member(&c, "cc", "carol");
    let alice = a.subscribe_as(&lobby, None, Some(ja)).await;
    b.subscribe_as(&lobby, None, Some(jb)).await;
    c.subscribe_as(&lobby, None, Some(jc)).await;
    let _alive = heartbeats(
        vec![a.clone(), b.clone()],
        vec![(a.clone(), la), (b.clone(), lb)],
    );
    let carol_alive = heartbeats(Vec::new(), vec![(c.clone(), lc)]);
    for n in [&a, &b, &c] {
        n.wait_users(&lobby, &["alice", "bob", "carol"], Duration::from_secs(5))
            .await;
    }
    // A clean leave on a reaches b (alice is still heartbeating: only the leave removes her).
    a.engine
        .leave_presence(&alice.channel, "ca", std::time::Instant::now());
    b.wait_users(&lobby, &["bob", "carol"], Duration::from_secs(3))
        .await;
    // Carol's node dies (and her connection with it): she is not gone at once, and leaves
    // every node within her timeout.
    drop(carol_alive);
    c.stop.cancel();
    assert!(b.users(&lobby).contains(&"carol".to_owned()));
    b.wait_users(&lobby, &["bob"], timeout * 3).await;
    a.wait_users(&lobby, &["bob"], timeout * 3).await;
}

async fn a_store_restart_leaves_every_node_in_step_without_loss_or_repeats(mut store: Store) {
    let (a, b) = (store.node("a").await, store.node("b").await);
    let live = ch("live");
    let subs = [
        a.subscribe(&live, None).await,
        b.subscribe(&live, None).await,
    ];
    let mut before = (Epoch(0), 0);
    for i in 1..=5 {
        let n = if i % 2 == 0 { &a } else { &b };
        before = n.publish(&live, &format!("m{i}")).await.unwrap();
    }
    a.wait_position(&live, before).await;
    b.wait_position(&live, before).await;
    store.kill(&[&a, &b]).await;
    if store.can_fail() {
        let down = a.publish(&live, "during").await;
        assert!(
            matches!(down, Err(BackplaneError::Unavailable(_))),
            "{down:?}"
        );
    }
    assert_eq!(
        a.held(&live).len(),
        5,
        "local subscribers keep what they have"
    );
    store.restart(&[&a, &b]).await;
    let mut after = Vec::new();
    for i in 6..=10 {
        let n = if i % 2 == 0 { &a } else { &b };
        let (epoch, seq) = n.publish(&live, &format!("m{i}")).await.unwrap();
        after.push((epoch, seq, format!("m{i}")));
    }
    let last = after.last().map(|(e, s, _)| (*e, *s)).unwrap();
    assert!(
        after.iter().all(|(e, _, _)| *e == last.0),
        "one epoch after the restart"
    );
    for (n, sub) in [(&a, &subs[0]), (&b, &subs[1])] {
        n.wait_position(&live, last).await;
        let held = n.held(&live);
        let wanted: Vec<(u64, String)> = after.iter().map(|(_, s, d)| (*s, d.clone())).collect();
        if last.0 == before.0 {
            // The store kept the channel: one run, 1..=10, and nobody was closed.
            assert_eq!(
                held,
                (1..=10).map(|i| (i, format!("m{i}"))).collect::<Vec<_>>()
            );
            assert!(!was_reset(sub), "continuous: subscribers keep going");
        } else {
            // The store came back empty: a new epoch, announced by closing subscribers.
            assert!(held.ends_with(&wanted), "{held:?} ends with {wanted:?}");
            assert!(was_reset(sub), "a new epoch closes subscribers for resume");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Every scenario against every backplane
// ---------------------------------------------------------------------------------------------

fn small_window() -> Setup {
    Setup {
        history_size: 5,
        history_ttl: Duration::from_secs(2),
        ..Setup::default()
    }
}

fn small_history() -> Setup {
    Setup {
        history_size: 5,
        ..Setup::default()
    }
}

fn short_presence() -> Setup {
    Setup {
        presence_timeout: Duration::from_secs(1),
        ..Setup::default()
    }
}

/// `scenario(setup)`: one test per backplane (`memory::…`, `redis::…`, `nats::…`). A test
/// whose server is not installed says so and passes outside CI (and fails in CI).
macro_rules! conformance {
    ($($scenario:ident($setup:expr);)*) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Store::memory($setup)).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if super::Kind::Redis.available() {
                        super::$scenario(super::Store::remote(super::Kind::Redis, $setup)).await;
                    }
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if super::Kind::Nats.available() {
                        super::$scenario(super::Store::remote(super::Kind::Nats, $setup)).await;
                    }
                }
            )*
        }
    };
}

conformance! {
    publishes_get_gap_free_seqs_in_one_epoch_and_arrive_in_order(super::Setup::default());
    two_nodes_sharing_a_channel_hold_the_same_messages_under_the_same_seqs(super::Setup::default());
    history_after_a_position_is_bounded_by_the_size_and_age_of_the_window(super::small_window());
    a_resume_on_another_node_recovers_exactly_what_was_missed_or_says_it_cannot(super::small_history());
    a_store_that_lost_a_channel_starts_a_new_epoch_and_resumes_say_so(super::Setup::default());
    a_node_joining_a_channel_with_history_adopts_its_position_and_history(super::Setup::default());
    presence_joins_leaves_and_expiries_are_seen_on_every_node(super::short_presence());
    a_store_restart_leaves_every_node_in_step_without_loss_or_repeats(super::Setup::default());
}
