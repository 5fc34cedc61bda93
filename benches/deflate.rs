//! permessage-deflate (issue 12 item 6): bytes on the wire and CPU for the compressed frame of a
//! publication with a JSON payload, built once per message and shared by every subscriber that
//! negotiated the extension. `cargo bench --bench deflate`; results in `benches/RESULTS.md`.
//!
//! Prints first, for each payload, the plain and the compressed WebSocket frame sizes.

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

use relay::protocol::{deflate, json};
use relay::types::{ChannelName, DataKind};

/// JSON payloads of the shapes a backend publishes: a chat line, a small state update, a page
/// of records.
fn payloads() -> Vec<(&'static str, Vec<u8>)> {
    let chat =
        br#"{"user":"alice","text":"see you at the standup in five minutes?","ts":1764841234567}"#
            .to_vec();
    let state = serde_json::to_vec(&serde_json::json!({
        "order": 123456, "status": "shipped", "carrier": "postnl", "eta": "2026-12-06T10:00:00Z",
        "items": [{"sku": "A-1001", "qty": 2, "price": 1999}, {"sku": "B-2002", "qty": 1, "price": 4999}],
        "address": {"street": "Keizersgracht 1", "city": "Amsterdam", "zip": "1015 CJ", "country": "NL"}
    }))
    .unwrap_or_default();
    let records: Vec<serde_json::Value> = (0..60)
        .map(|i| serde_json::json!({"id": 1000 + i, "symbol": format!("SYM{}", i % 17), "bid": 100.25 + i as f64, "ask": 100.5 + i as f64, "volume": 12_000 + 37 * i}))
        .collect();
    let records = serde_json::to_vec(&records).unwrap_or_default();
    vec![("chat", chat), ("state", state), ("records", records)]
}

fn frames(c: &mut Criterion) {
    let channel = ChannelName::new("room:lobby-42").unwrap_or_else(|_| unreachable!());
    deflate::set_min_size(0);
    println!("payload: JSON bytes, plain frame -> compressed frame (bytes on the wire)");
    let mut g = c.benchmark_group("deflate/frame");
    for (name, p) in payloads() {
        let plain = json::message(&channel, 1_000_042, DataKind::Json, &p);
        let z = deflate::frame_of(plain.clone());
        println!(
            "  {name}: {} B payload, frame {} -> {} B ({:.0}%)",
            p.len(),
            plain.len(),
            z.len(),
            z.len() as f64 * 100.0 / plain.len() as f64
        );
        g.throughput(Throughput::Bytes(plain.len() as u64));
        g.bench_with_input(BenchmarkId::new("compress", name), &plain, |b, plain| {
            b.iter(|| deflate::frame_of(black_box(Bytes::clone(plain))))
        });
        let mut out = Vec::new();
        let mut payload = Vec::new();
        deflate::compress(&p, &mut payload);
        g.bench_with_input(BenchmarkId::new("inflate", name), &payload, |b, z| {
            b.iter(|| deflate::decompress(black_box(z), 1 << 20, &mut out).is_ok())
        });
    }
    g.finish();
}

criterion_group!(benches, frames);

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
