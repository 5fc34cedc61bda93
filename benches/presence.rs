//! Presence costs at 10,000 members in one channel: the heartbeat path (what every inbound frame
//! pays), the sweep with everyone alive (the steady state), and the sweep when all time out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use relay::engine::presence::{Identity, Liveness, PresenceConfig};
use relay::engine::{Engine, EngineConfig, Join};
use relay::types::ChannelName;

const MEMBERS: usize = 10_000;

fn engine() -> Engine {
    Engine::new(EngineConfig {
        shards: 1,
        history_size: 100,
        history_ttl: Duration::from_secs(60),
        seed: 1,
        presence: PresenceConfig {
            patterns: vec!["p:*".into()],
            timeout: Duration::from_secs(45),
            max_members: MEMBERS,
            ..Default::default()
        },
        ..Default::default()
    })
}

/// An engine with `MEMBERS` members in `p:big`, all last seen at `seen_ms`.
fn populated(seen_ms: u64) -> (Engine, Vec<Arc<Liveness>>) {
    let e = engine();
    let name = ChannelName::new("p:big").unwrap();
    let now = Instant::now();
    let mut lives = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        let live = Arc::new(Liveness::default());
        live.touch(seen_ms);
        let client: Arc<str> = Arc::from(format!("c{i}"));
        let who = Identity {
            client: client.clone(),
            user: client,
            info: None,
        };
        e.subscribe(
            0,
            &name,
            None,
            Some(Join {
                who,
                live: live.clone(),
            }),
            now,
        )
        .unwrap();
        lives.push(live);
    }
    (e, lives)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("presence");

    let (e, lives) = populated(0);
    g.throughput(Throughput::Elements(1));
    g.bench_function("heartbeat", |b| {
        let live = &lives[MEMBERS / 2];
        b.iter(|| live.touch(e.millis(Instant::now())))
    });

    // Everyone alive: the sweep finds nobody to remove (the common case, every 10 s).
    let now = Instant::now() + Duration::from_secs(30);
    let alive_ms = e.millis(now);
    for l in &lives {
        l.touch(alive_ms);
    }
    g.throughput(Throughput::Elements(MEMBERS as u64));
    g.bench_function("sweep_10k_all_alive", |b| {
        b.iter(|| assert_eq!(e.sweep_presence(now), 0))
    });

    // Everyone timed out at once: 10,000 leave events recorded.
    g.bench_function("sweep_10k_all_leave", |b| {
        b.iter_batched(
            || populated(0),
            |(e, _lives)| {
                let later = Instant::now() + Duration::from_secs(120);
                e.sweep_presence(later);
                e
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
