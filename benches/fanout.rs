//! The hub fan-out path without sockets: one publish to 1, 100 and 10,000 local subscribers
//! (publish, pump into outboxes, drain the outboxes as writers would).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use relay::engine::hub::{Hub, Subscriber};
use relay::engine::outbox::{Gauge, Outbox};
use relay::engine::{Engine, EngineConfig};
use relay::protocol::{ENCODER, ENC_WS_JSON};
use relay::types::{ChannelName, DataKind};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    let payload = Bytes::from(format!("{{\"t\":\"{}\"}}", "x".repeat(56))); // 64 bytes
    for n in [1usize, 100, 10_000] {
        let engine = Arc::new(Engine::new(EngineConfig {
            shards: 1,
            history_size: 1000,
            history_ttl: Duration::from_secs(300),
            seed: 9,
            ..Default::default()
        }));
        // One memory gauge for the shard's hub and outboxes, as the server has.
        let gauge = Gauge::default();
        let mut hub = Hub::with_gauge(0, engine.clone(), ENCODER, gauge.clone());
        let name = ChannelName::new("bench").unwrap();
        let now = Instant::now();
        let outboxes: Vec<Rc<Outbox>> = (0..n)
            .map(|_| Rc::new(Outbox::with_gauge(1 << 20, gauge.clone())))
            .collect();
        for (i, o) in outboxes.iter().enumerate() {
            let sub = Subscriber::new(o.clone(), ENC_WS_JSON, 0);
            hub.subscribe(i as u64, &name, None, None, sub, now)
                .unwrap();
        }
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("publish_to_{n}"), |b| {
            b.iter(|| {
                engine
                    .publish(&name, DataKind::Json, payload.clone(), now)
                    .unwrap();
                let st = hub.pump();
                assert_eq!(st.deliveries, n);
                for o in &outboxes {
                    o.drain_into(|_| {});
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
