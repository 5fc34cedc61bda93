//! Binary codec (`relay.v1.bin`): decode and encode of typical frames, with 64 B and 1 KiB
//! payloads. `cargo bench --bench codec`; results in `benches/RESULTS.md`.
//!
//! `BENCH_MIN_OF_BATCHES=1 cargo bench --bench codec` prints instead the fastest of 2000
//! batches of each operation: on a busy machine the minimum is the figure that repeats.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

use relay::protocol::binary::{self, Body, Encoder, Frame};
use relay::types::{ChannelName, DataKind, Epoch, StreamPosition};

const SIZES: [usize; 2] = [64, 1024];
const CHANNEL: &str = "room:lobby-42";

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn publish(p: &[u8]) -> Frame<'_> {
    Frame {
        id: Some(1234),
        body: Body::Publish {
            channel: CHANNEL,
            idempotency_key: None,
            expected_seq: None,
            payload: p,
        },
    }
}

fn message(p: &[u8]) -> Frame<'_> {
    Frame {
        id: None,
        body: Body::Message {
            channel: CHANNEL,
            seq: 1_000_042,
            json: false,
            payload: p,
        },
    }
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("binary/decode");
    for n in SIZES {
        let p = payload(n);
        let frames = [("publish", publish(&p)), ("message", message(&p))];
        for (name, f) in frames {
            let bytes = Encoder::default().encode(&f).to_vec();
            g.throughput(Throughput::Bytes(bytes.len() as u64));
            g.bench_with_input(BenchmarkId::new(name, n), &bytes, |b, bytes| {
                b.iter(|| binary::decode(black_box(bytes)))
            });
        }
        // The server's path for a publish: decode + channel validation into the neutral types.
        let bytes = Encoder::default().encode(&publish(&p)).to_vec();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("publish_command", n),
            &bytes,
            |b, bytes| b.iter(|| binary::decode_command(black_box(bytes)).is_ok()),
        );
    }
    let sub = Encoder::default()
        .encode(&Frame {
            id: Some(7),
            body: Body::Subscribe {
                channel: CHANNEL,
                resume: Some(StreamPosition {
                    epoch: Epoch(0x9f2c_61d3_a0b4_e5f7),
                    seq: 41,
                }),
                presence: None,
            },
        })
        .to_vec();
    g.throughput(Throughput::Bytes(sub.len() as u64));
    g.bench_function("subscribe_resume", |b| {
        b.iter(|| binary::decode(black_box(&sub)))
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("binary/encode");
    let ch = ChannelName::new(CHANNEL).unwrap_or_else(|_| unreachable!());
    for n in SIZES {
        let p = payload(n);
        let f = message(&p);
        let len = binary::encoded_len(&f) as u64;
        g.throughput(Throughput::Bytes(len));
        // Into a reused buffer: the codec alone.
        let mut e = Encoder::with_capacity(2048);
        g.bench_with_input(BenchmarkId::new("message_reused_buf", n), &f, |b, f| {
            b.iter(|| e.encode(black_box(f)).len())
        });
        // The fan-out path: a complete WebSocket frame as shared `Bytes` (one allocation).
        g.bench_with_input(BenchmarkId::new("message_ws_frame", n), &p, |b, p| {
            b.iter(|| binary::message(&ch, black_box(1_000_042), DataKind::Binary, black_box(p)))
        });
        let f = publish(&p);
        g.throughput(Throughput::Bytes(binary::encoded_len(&f) as u64));
        g.bench_with_input(BenchmarkId::new("publish_reused_buf", n), &f, |b, f| {
            b.iter(|| e.encode(black_box(f)).len())
        });
    }
    g.finish();
}

/// The fastest of 2000 batches of 500 calls, in ns per call.
fn min_ns(mut f: impl FnMut()) -> f64 {
    let batch = 500;
    let mut best = f64::MAX;
    for _ in 0..2000 {
        let t = std::time::Instant::now();
        for _ in 0..batch {
            f();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(batch));
    }
    best
}

fn min_of_batches() {
    let ch = ChannelName::new(CHANNEL).unwrap_or_else(|_| unreachable!());
    for n in SIZES {
        let p = payload(n);
        let pb = Encoder::default().encode(&publish(&p)).to_vec();
        let mb = Encoder::default().encode(&message(&p)).to_vec();
        let mut e = Encoder::with_capacity(2048);
        let fm = message(&p);
        let fp = publish(&p);
        let mut rows = vec![
            ("decode publish", pb.len(), 0.0),
            ("decode message", mb.len(), 0.0),
            ("decode_command publish", pb.len(), 0.0),
            ("encode message, reused buffer", mb.len(), 0.0),
            ("encode publish, reused buffer", pb.len(), 0.0),
            ("message as WebSocket frame", mb.len() + 4, 0.0),
        ];
        rows[0].2 = min_ns(|| {
            black_box(binary::decode(black_box(&pb)).is_ok());
        });
        rows[1].2 = min_ns(|| {
            black_box(binary::decode(black_box(&mb)).is_ok());
        });
        rows[2].2 = min_ns(|| {
            black_box(binary::decode_command(black_box(&pb)).is_ok());
        });
        rows[3].2 = min_ns(|| {
            black_box(e.encode(black_box(&fm)).len());
        });
        rows[4].2 = min_ns(|| {
            black_box(e.encode(black_box(&fp)).len());
        });
        rows[5].2 = min_ns(|| {
            black_box(binary::message(
                &ch,
                black_box(1_000_042),
                DataKind::Binary,
                black_box(&p),
            ));
        });
        for (name, len, ns) in rows {
            let gib = len as f64 / ns / 1.073_741_824;
            println!("| {n} B | {name} | {len} B | {ns:.1} ns | {gib:.2} GiB/s |");
        }
    }
}

criterion_group!(benches, decode, encode);

fn main() {
    if std::env::var_os("BENCH_MIN_OF_BATCHES").is_some() {
        return min_of_batches();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
