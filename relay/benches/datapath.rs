//! The worker's per-frame path without the kernel: RX descriptors in, classify, rule lookup,
//! rewrite, TX descriptors out, completions back, fill ring refilled, over in-memory sockets
//! (`relay::datapath::loopback`). `cargo bench -p relay --bench datapath`; `cargo xtask
//! bench-datapath` runs it and prints the table.
//!
//! Each iteration is one frame received (a 64-byte UDP payload, 106 bytes on the wire): its
//! time is from the frames arriving to the last output's completion. Rows:
//! - `datapath_kernel/bounce`, `bounce8`: the simulated kernel alone (frames written into
//!   fill ring frames, RX descriptors bounced to the TX ring once or eight times, completions
//!   back on the fill ring), which the 1->1 and 1->8 rows include;
//! - `datapath_w1/<allocator>/<1to1|1to8>`: one worker, stepped in the bench's thread;
//! - `datapath_w2/<allocator>/<1to1|1to8>`: two worker threads as the relay deals sockets:
//!   the ingress on worker 0, out0 on worker 1 (so 1->1 goes through the lane), and at 1->8
//!   out0-out7 alternately on worker 1 and worker 0. Wall-clock time per frame delivered to
//!   every output, the two threads in a pipeline; the bench thread sleeps while it waits.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use relay::{
    config::{Config, StaticSystem},
    craft::{UdpFrame, build_udp_frame},
    datapath::{
        loopback::{Loopback, Options},
        memory::{Wire, bounce},
    },
    pool::AllocatorKind,
    rules::RuleTable,
};

/// Frames of the UMEM with one worker. With two, the relay's default of 4,096: then the
/// frames the ingress worker has handed over and the egress worker not yet sent cannot
/// outgrow a lane (4,096), and the ingress worker waits for frames instead of dropping
/// them (`handoff_full`) when the other falls behind.
const FRAMES: [u32; 2] = [8192, 4096];

fn table(outputs: usize) -> RuleTable {
    let mut yaml = String::from(
        "rules:\n  - name: bench\n    input: { interface: in0, group: 239.1.1.1, port: 5000 }\n    outputs:\n",
    );
    for o in 0..outputs {
        yaml.push_str(&format!(
            "      - {{ interface: out{o}, group: 239.2.2.{o}, port: 6000 }}\n"
        ));
    }
    let mut ifaces = vec![("in0".to_owned(), 10)];
    ifaces.extend((0..outputs).map(|o| (format!("out{o}"), 11 + o as u32)));
    let cfg = Config::parse("bench.yaml", &yaml).unwrap();
    RuleTable::compile(&cfg, "bench.yaml", &StaticSystem(ifaces, Vec::new())).unwrap()
}

fn frame() -> Vec<u8> {
    build_udp_frame(&UdpFrame::simple(
        "198.18.10.2".parse().unwrap(),
        "239.1.1.1".parse().unwrap(),
        5000,
        16,
        &[0x5a; 64],
    ))
}

fn sent(outs: &[Arc<Wire>]) -> u64 {
    outs.iter().map(|w| w.sent()).sum()
}

/// A loopback for 1->`outputs`, its ingress link and its output links.
fn loopback(
    allocator: AllocatorKind,
    workers: usize,
    outputs: usize,
) -> (Loopback, Arc<Wire>, Vec<Arc<Wire>>) {
    let lb = Loopback::new(
        table(outputs),
        Options {
            frames: FRAMES[workers - 1],
            frame_size: 2048,
            allocator,
            workers,
            sleep: false,
        },
    )
    .unwrap();
    let input = lb.wire("in0", 0).unwrap();
    let outs = (0..outputs)
        .map(|o| lb.wire(&format!("out{o}"), 0).unwrap())
        .collect();
    (lb, input, outs)
}

const ALLOCATORS: [(AllocatorKind, &str); 2] = [
    (AllocatorKind::Lockfree, "lockfree"),
    (AllocatorKind::Mutex, "mutex"),
];
const FANOUTS: [(usize, &str); 2] = [(1, "1to1"), (8, "1to8")];

fn kernel(c: &mut Criterion) {
    let f = frame();
    let mut g = c.benchmark_group("datapath_kernel");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(3));
    for (outputs, name) in [(1, "bounce"), (8, "bounce8")] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                bounce(black_box(&f), iters, 64, outputs);
                start.elapsed()
            })
        });
    }
    g.finish();
}

fn one_worker(c: &mut Criterion) {
    let f = frame();
    let mut g = c.benchmark_group("datapath_w1");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(3));
    for (allocator, name) in ALLOCATORS {
        for (outputs, fanout) in FANOUTS {
            let (mut lb, input, outs) = loopback(allocator, 1, outputs);
            g.bench_function(BenchmarkId::new(name, fanout), |b| {
                b.iter_custom(|iters| {
                    let target = sent(&outs) + iters * outputs as u64;
                    let start = Instant::now();
                    input.stream(&f, iters);
                    // Bounded by the loopback going idle, should a frame ever be dropped
                    // (the assertion after the run says so).
                    while sent(&outs) < target && (lb.step() || input.waiting() > 0) {}
                    start.elapsed()
                })
            });
            let out = lb.stop();
            assert_eq!(out.account.leaked(), 0);
            assert!(out.stats.rules[0].outputs.iter().all(|o| o.dropped() == 0));
        }
    }
    g.finish();
}

fn two_workers(c: &mut Criterion) {
    let f = frame();
    let mut g = c.benchmark_group("datapath_w2");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(3));
    for (allocator, name) in ALLOCATORS {
        for (outputs, fanout) in FANOUTS {
            let (mut lb, input, outs) = loopback(allocator, 2, outputs);
            assert_eq!(lb.owner("in0", 0), Some(0));
            assert_eq!(lb.owner("out0", 0), Some(1));
            lb.start().unwrap();
            g.bench_function(BenchmarkId::new(name, fanout), |b| {
                b.iter_custom(|iters| {
                    // Until the last frame has arrived and the outputs have seen their last
                    // one (nothing sent for 200 µs); the time is that of the last frame seen
                    // sent. Frames the egress worker cannot take are dropped, as in the
                    // relay (counted, printed below): the time is scaled to the frames that
                    // reached every output, so a sample with drops shows what the pipeline
                    // delivers, not what it was offered.
                    let (received, before) = (input.delivered(), sent(&outs));
                    let start = Instant::now();
                    input.stream(&f, iters);
                    while input.delivered() < received + iters {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    let (mut last, mut at) = (sent(&outs), Instant::now());
                    while at.elapsed() < Duration::from_micros(200) {
                        std::thread::sleep(Duration::from_micros(50));
                        let now = sent(&outs);
                        if now != last {
                            (last, at) = (now, Instant::now());
                        }
                    }
                    let delivered = (last - before) as f64 / outputs as f64;
                    (at - start).mul_f64(iters as f64 / delivered.max(1.0))
                })
            });
            let out = lb.stop();
            assert_eq!(out.account.leaked(), 0);
            let r = &out.stats.rules[0];
            let dropped: u64 = r.outputs.iter().map(|o| o.dropped()).sum();
            eprintln!(
                "datapath_w2/{name}/{fanout}: {} frames received, {} sent, {dropped} dropped \
                 ({} handoff_full, {} no_frame, {} tx_ring_full)",
                r.packets,
                sent(&outs),
                r.outputs.iter().map(|o| o.handoff_full).sum::<u64>(),
                r.outputs.iter().map(|o| o.no_frame).sum::<u64>(),
                r.outputs.iter().map(|o| o.tx_ring_full).sum::<u64>(),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, kernel, one_worker, two_workers);
criterion_main!(benches);
