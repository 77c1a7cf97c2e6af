//! What a merged rule's state costs per packet: `cargo bench -p relay --bench merge`.
//!
//! Cases: one thread offering both legs of a stream in turn (a first arrival, then its
//! duplicate), RTP and 8-byte counters; and two threads, one per leg, racing for the same
//! slots, as two workers receiving the two legs do. The numbers are per packet offered.

use std::{
    hint::black_box,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use relay::merge::{DEFAULT_SLOTS, MergeState, Numbered, Sequence};

fn one_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge one thread");
    g.throughput(Throughput::Elements(2));
    // "rtp ssrc": as the data path offers RTP, with the SSRC it read (one more load per
    // packet of the leg's and the table's stream words).
    for (name, sequence, wrap, ssrc) in [
        ("rtp", Sequence::Rtp, 0xffff_u64, None),
        ("rtp ssrc", Sequence::Rtp, 0xffff_u64, Some(7)),
        (
            "counter",
            Sequence::Counter {
                offset: 0,
                bytes: 8,
            },
            u64::MAX,
            None,
        ),
    ] {
        let m = MergeState::new(sequence, 2, 500, DEFAULT_SLOTS);
        let mut seq = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                seq += 1;
                let now = seq / 50_000;
                let n = Numbered {
                    seq: black_box(seq & wrap),
                    ssrc,
                };
                black_box(m.offer_numbered(0, n, now));
                black_box(m.offer_numbered(1, n, now));
            })
        });
    }
    g.finish();
}

/// Two threads, one leg each, the same numbers: every slot is contended once.
fn two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge two threads");
    g.throughput(Throughput::Elements(2));
    g.bench_function("rtp", |b| {
        b.iter_custom(|iters| {
            let m = Arc::new(MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS));
            let barrier = Arc::new(Barrier::new(2));
            let run = |leg: usize| {
                let (m, barrier) = (m.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for i in 0..iters {
                        black_box(m.offer(leg, i & 0xffff, i / 50_000));
                    }
                    start.elapsed()
                })
            };
            let (a, b) = (run(0), run(1));
            let (a, b): (Duration, Duration) = (a.join().unwrap(), b.join().unwrap());
            a.max(b)
        })
    });
    g.finish();
}

criterion_group!(benches, one_thread, two_threads);
criterion_main!(benches);
