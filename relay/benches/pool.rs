//! Take + give-back cost of the frame pools: `cargo bench -p relay --bench pool`.
//!
//! Rows: the two selectable pools (lock-free bulk ring, mutex), the design the lock-free pool
//! replaced (a crossbeam `ArrayQueue` popped and pushed one frame at a time), and each pool
//! behind a per-thread `FrameCache`. Cases: one thread, uncontended, in batches of 1, 16 and
//! 64; and two threads where every frame is taken on one and given back on the other, as
//! between an RX worker and the thread that reaps its TX completions.

use std::{
    hint::black_box,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_queue::ArrayQueue;
use relay::pool::{AllocatorKind, FrameCache, FramePool, PoolStats, new_pool};

const FRAMES: u32 = 4096;

/// The design the lock-free pool started as: one CAS per frame.
struct ArrayQueuePool(ArrayQueue<u32>);

impl ArrayQueuePool {
    fn new(frames: u32) -> Self {
        let q = ArrayQueue::new(frames as usize);
        for f in 0..frames {
            q.push(f).unwrap();
        }
        Self(q)
    }
}

impl FramePool for ArrayQueuePool {
    fn kind(&self) -> AllocatorKind {
        AllocatorKind::Lockfree
    }
    fn capacity(&self) -> usize {
        self.0.capacity()
    }
    fn free(&self) -> usize {
        self.0.len()
    }
    fn take_batch(&self, out: &mut Vec<u32>, n: usize) -> usize {
        let mut got = 0;
        while got < n {
            match self.0.pop() {
                Some(f) => out.push(f),
                None => break,
            }
            got += 1;
        }
        got
    }
    fn give_batch(&self, frames: &[u32]) {
        for &f in frames {
            let _ = self.0.push(f);
        }
    }
    fn stats(&self) -> PoolStats {
        PoolStats {
            capacity: self.capacity(),
            free: self.free(),
            low_water: 0,
            rejected: 0,
        }
    }
}

fn pools() -> Vec<(&'static str, Arc<dyn FramePool>)> {
    vec![
        (
            "lockfree",
            Arc::from(new_pool(AllocatorKind::Lockfree, FRAMES)),
        ),
        ("mutex", Arc::from(new_pool(AllocatorKind::Mutex, FRAMES))),
        (
            "arrayqueue",
            Arc::new(ArrayQueuePool::new(FRAMES)) as Arc<dyn FramePool>,
        ),
    ]
}

/// Something that hands out and takes back frames: a pool, or a cache in front of one.
trait Source {
    fn take_batch(&mut self, out: &mut Vec<u32>, n: usize) -> usize;
    fn give_batch(&mut self, frames: &[u32]);
}

struct Direct(Arc<dyn FramePool>);
impl Source for Direct {
    fn take_batch(&mut self, out: &mut Vec<u32>, n: usize) -> usize {
        self.0.take_batch(out, n)
    }
    fn give_batch(&mut self, frames: &[u32]) {
        self.0.give_batch(frames)
    }
}
impl Source for FrameCache {
    fn take_batch(&mut self, out: &mut Vec<u32>, n: usize) -> usize {
        FrameCache::take_batch(self, out, n)
    }
    fn give_batch(&mut self, frames: &[u32]) {
        FrameCache::give_batch(self, frames)
    }
}

fn source(pool: &Arc<dyn FramePool>, cached: bool) -> Box<dyn Source + Send> {
    if cached {
        Box::new(FrameCache::new(pool.clone(), 256))
    } else {
        Box::new(Direct(pool.clone()))
    }
}

fn label(name: &str, cached: bool) -> String {
    if cached {
        format!("{name}+cache")
    } else {
        name.to_owned()
    }
}

fn single_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("single_thread");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for batch in [1usize, 16, 64] {
        g.throughput(Throughput::Elements(batch as u64));
        for (name, pool) in pools() {
            for cached in [false, true] {
                let label = label(name, cached);
                let mut src = source(&pool, cached);
                let mut buf = Vec::with_capacity(batch);
                g.bench_function(BenchmarkId::new(label, batch), |b| {
                    b.iter(|| {
                        buf.clear();
                        let n = src.take_batch(&mut buf, batch);
                        black_box(&buf);
                        src.give_batch(&buf[..n]);
                    })
                });
            }
        }
    }
    g.finish();
}

/// Thread A takes frames and passes them to thread B, which gives them back; the time is
/// for `iters` frames to make the round trip.
fn cross_thread(c: &mut Criterion) {
    // Counted before any pinning: available_parallelism honours the thread's affinity.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("cross_thread");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for batch in [1usize, 16, 64] {
        g.throughput(Throughput::Elements(1));
        for (name, pool) in pools() {
            for cached in [false, true] {
                let label = label(name, cached);
                g.bench_function(BenchmarkId::new(label, batch), |b| {
                    b.iter_custom(|iters| run_cross(&pool, cached, batch, iters, cpus))
                });
            }
        }
    }
    g.finish();
}

/// Busy-waits without PAUSE: under KVM, a vCPU that executes PAUSE in a loop is taken off the
/// CPU by pause-loop exiting, which turns a cross-core hand-off into tens of microseconds and
/// measures the hypervisor instead of the pool.
#[inline(always)]
fn wait_a_moment() {
    for _ in 0..32 {
        std::hint::black_box(());
    }
}

/// Pins the calling thread to `cpu`, so the two threads of a cross-thread run sit on two
/// cores rather than taking turns on one.
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET and sched_setaffinity get a valid set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn run_cross(
    pool: &Arc<dyn FramePool>,
    cached: bool,
    batch: usize,
    iters: u64,
    cpus: usize,
) -> Duration {
    // The frames travel as they do in the relay: through a single-producer single-consumer
    // ring of frame numbers, as the TX and completion rings carry them, so the hand-off costs
    // a shared index update per batch and the pools are what differs between rows. Short, so
    // at most 256 frames are in flight and the pool stays well stocked, as a relay's pool is:
    // the threads meet in the pool, not at an empty one.
    let (mut to_giver, mut from_taker) = rtrb::RingBuffer::<u32>::new(256);
    let barrier = Arc::new(Barrier::new(2));
    pin(0);
    let giver = {
        let (barrier, mut src) = (barrier.clone(), source(pool, cached));
        std::thread::spawn(move || {
            pin(1 % cpus);
            barrier.wait();
            let mut returned = 0u64;
            while returned < iters {
                let ready = from_taker.slots().min(64);
                if ready == 0 {
                    wait_a_moment();
                    continue;
                }
                let chunk = from_taker.read_chunk(ready).expect("slots() said so");
                let (a, b) = chunk.as_slices();
                src.give_batch(a);
                src.give_batch(b);
                chunk.commit_all();
                returned += ready as u64;
            }
        })
    };
    let mut src = source(pool, cached);
    let mut buf = Vec::with_capacity(64);
    barrier.wait();
    let start = Instant::now();
    let mut taken = 0u64;
    while taken < iters {
        buf.clear();
        let want = batch.min((iters - taken) as usize);
        let n = src.take_batch(&mut buf, want);
        if n == 0 {
            wait_a_moment();
            continue;
        }
        taken += n as u64;
        while to_giver.slots() < n {
            wait_a_moment();
        }
        let mut chunk = to_giver.write_chunk_uninit(n).expect("slots() said so");
        let (a, b) = chunk.as_mut_slices();
        for (slot, &f) in a.iter_mut().chain(b.iter_mut()).zip(&buf) {
            slot.write(f);
        }
        // SAFETY: the loop above initialised all n slots of the chunk.
        unsafe { chunk.commit_all() };
    }
    giver.join().unwrap();
    let elapsed = start.elapsed();
    drop(src);
    elapsed
}

criterion_group!(benches, single_thread, cross_thread);
criterion_main!(benches);
