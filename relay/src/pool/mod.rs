//! The UMEM frame allocator: which frames are free for the fill ring or for a fan-out copy.
//!
//! Frames are named by index (`addr / frame_size`). Two implementations sit behind one trait and
//! are chosen at run time: a lock-free pool (the default) and a mutex pool (the fallback and the
//! baseline it is measured against). Neither blocks or panics when empty or full: taking from an
//! empty pool yields fewer frames, and the caller drops the packet and counts it.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use serde::Deserialize;

mod cache;
pub mod ring;
mod sync;

pub use cache::FrameCache;
use ring::BulkRing;

/// Which pool implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AllocatorKind {
    /// A bounded lock-free ring with bulk operations: no lock on take or give-back.
    /// `lock-free`, as the log writes it, is accepted too.
    #[default]
    #[serde(alias = "lock-free")]
    #[value(alias = "lock-free")]
    Lockfree,
    /// `Mutex<Vec<u32>>`: simple, and the baseline.
    Mutex,
}

impl AllocatorKind {
    /// The name the logs use.
    pub fn describe(self) -> &'static str {
        match self {
            AllocatorKind::Lockfree => "lock-free",
            AllocatorKind::Mutex => "mutex",
        }
    }
}

/// Counters every pool keeps.
#[derive(Debug, Default)]
struct Watermarks {
    low_water: AtomicUsize,
    /// Frames given back while the pool was already full: a double give-back, which is a bug;
    /// counted rather than allowed to corrupt the pool.
    rejected: AtomicU64,
}

impl Watermarks {
    fn new(capacity: usize) -> Self {
        Self {
            low_water: AtomicUsize::new(capacity),
            rejected: AtomicU64::new(0),
        }
    }

    fn snapshot(&self, capacity: usize, free: usize) -> PoolStats {
        PoolStats {
            capacity,
            free,
            low_water: self.low_water.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    fn observe(&self, free: usize) {
        // Read first: the common case writes nothing, so the cache line stays shared.
        if free < self.low_water.load(Ordering::Relaxed) {
            self.low_water.fetch_min(free, Ordering::Relaxed);
        }
    }
}

/// A snapshot of a pool's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub capacity: usize,
    pub free: usize,
    pub low_water: usize,
    pub rejected: u64,
}

impl PoolStats {
    pub fn in_flight(&self) -> usize {
        self.capacity - self.free
    }
}

/// A pool of UMEM frame indices, shared by the threads of the data path.
pub trait FramePool: Send + Sync {
    fn kind(&self) -> AllocatorKind;
    fn capacity(&self) -> usize;
    /// Frames free right now.
    fn free(&self) -> usize;
    /// Appends up to `n` free frames to `out`; returns how many it appended.
    fn take_batch(&self, out: &mut Vec<u32>, n: usize) -> usize;
    /// Returns frames to the pool.
    fn give_batch(&self, frames: &[u32]);
    fn stats(&self) -> PoolStats;

    fn take(&self) -> Option<u32> {
        let mut one = Vec::with_capacity(1);
        (self.take_batch(&mut one, 1) == 1).then(|| one[0])
    }

    fn give(&self, frame: u32) {
        self.give_batch(&[frame]);
    }
}

/// Builds the pool `kind` holding frames `0..frames`, all free.
pub fn new_pool(kind: AllocatorKind, frames: u32) -> Box<dyn FramePool> {
    match kind {
        AllocatorKind::Lockfree => Box::new(LockFreePool::new(frames)),
        AllocatorKind::Mutex => Box::new(MutexPool::new(frames)),
    }
}

/// The lock-free pool: a [`BulkRing`] of free frame numbers, so a batch costs one
/// compare-and-swap however many frames it moves.
pub struct LockFreePool {
    ring: BulkRing,
    capacity: usize,
    marks: Watermarks,
}

impl LockFreePool {
    pub fn new(frames: u32) -> Self {
        let ring = BulkRing::new(frames as usize);
        let all: Vec<u32> = (0..frames).collect();
        assert_eq!(
            ring.push_bulk(&all),
            all.len(),
            "the ring holds every frame"
        );
        Self {
            ring,
            capacity: frames as usize,
            marks: Watermarks::new(frames as usize),
        }
    }
}

impl FramePool for LockFreePool {
    fn kind(&self) -> AllocatorKind {
        AllocatorKind::Lockfree
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn free(&self) -> usize {
        self.ring.len()
    }

    fn take_batch(&self, out: &mut Vec<u32>, n: usize) -> usize {
        let got = self.ring.pop_bulk(out, n);
        // Reading the free count touches the producers' index too, a cache line another core
        // is writing; sample it on a sixteenth of the small takes (and on every short or large
        // one), which keeps the low-water mark honest without that cost on every take.
        thread_local! {
            static TAKES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        let tick = TAKES.with(|t| {
            let v = t.get().wrapping_add(1);
            t.set(v);
            v
        });
        if got < n || n >= 16 || tick.is_multiple_of(16) {
            self.marks.observe(self.ring.len());
        }
        got
    }

    fn give_batch(&self, mut frames: &[u32]) {
        while !frames.is_empty() {
            let n = self.ring.push_bulk(frames);
            if n == 0 {
                // Full: the ring is exactly as large as the frame count, so these are double
                // give-backs.
                self.marks
                    .rejected
                    .fetch_add(frames.len() as u64, Ordering::Relaxed);
                return;
            }
            frames = &frames[n..];
        }
    }

    fn stats(&self) -> PoolStats {
        self.marks.snapshot(self.capacity, self.free())
    }
}

/// The mutex pool: a stack of free frames behind one lock.
pub struct MutexPool {
    free: Mutex<Vec<u32>>,
    capacity: usize,
    marks: Watermarks,
}

impl MutexPool {
    pub fn new(frames: u32) -> Self {
        Self {
            free: Mutex::new((0..frames).rev().collect()),
            capacity: frames as usize,
            marks: Watermarks::new(frames as usize),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        // Nothing that runs under the lock can panic half-way through an update, so a poisoned
        // lock still guards a consistent stack.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FramePool for MutexPool {
    fn kind(&self) -> AllocatorKind {
        AllocatorKind::Mutex
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn free(&self) -> usize {
        self.lock().len()
    }

    fn take_batch(&self, out: &mut Vec<u32>, n: usize) -> usize {
        let mut free = self.lock();
        let got = n.min(free.len());
        let at = free.len() - got;
        out.extend(free.drain(at..));
        self.marks.observe(free.len());
        got
    }

    fn give_batch(&self, frames: &[u32]) {
        let mut free = self.lock();
        let room = self.capacity - free.len();
        let (fits, over) = frames.split_at(frames.len().min(room));
        free.extend_from_slice(fits);
        if !over.is_empty() {
            self.marks
                .rejected
                .fetch_add(over.len() as u64, Ordering::Relaxed);
        }
    }

    fn stats(&self) -> PoolStats {
        self.marks.snapshot(self.capacity, self.free())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::{collections::BTreeSet, sync::Arc};

    const KINDS: [AllocatorKind; 2] = [AllocatorKind::Lockfree, AllocatorKind::Mutex];

    /// One test body, run against each implementation.
    fn each(test: impl Fn(Box<dyn FramePool>)) {
        for kind in KINDS {
            let pool = new_pool(kind, 64);
            assert_eq!(pool.kind(), kind);
            test(pool);
        }
    }

    #[test]
    fn starts_full_and_hands_out_each_frame_once() {
        each(|pool| {
            assert_eq!(pool.capacity(), 64);
            assert_eq!(pool.free(), 64);
            let mut got = Vec::new();
            assert_eq!(pool.take_batch(&mut got, 100), 64);
            let set: BTreeSet<u32> = got.iter().copied().collect();
            assert_eq!(set, (0..64).collect());
            assert_eq!(pool.take(), None);
            assert_eq!(pool.free(), 0);
        });
    }

    #[test]
    fn exhaustion_yields_short_batches_and_recovers() {
        each(|pool| {
            let mut a = Vec::new();
            assert_eq!(pool.take_batch(&mut a, 60), 60);
            let mut b = Vec::new();
            assert_eq!(pool.take_batch(&mut b, 16), 4);
            assert_eq!(pool.take_batch(&mut b, 16), 0);
            pool.give_batch(&a);
            pool.give_batch(&b);
            assert_eq!(pool.free(), 64);
            let s = pool.stats();
            assert_eq!((s.low_water, s.rejected, s.in_flight()), (0, 0, 0));
            // A large take is always seen by the low-water mark.
            let fresh = new_pool(pool.kind(), 64);
            let mut held = Vec::new();
            fresh.take_batch(&mut held, 40);
            assert_eq!(fresh.stats().low_water, 24, "{:?}", pool.kind());
        });
    }

    #[test]
    fn overfilling_is_counted_not_stored() {
        each(|pool| {
            let f = pool.take().unwrap();
            pool.give(f);
            pool.give(f); // a double give-back
            assert_eq!(pool.free(), 64);
            assert_eq!(pool.stats().rejected, 1);
        });
    }

    /// Frames taken on one thread and given back on another, as between an RX worker and
    /// the thread that reaps its TX completions: nothing lost, nothing duplicated.
    #[test]
    fn cross_thread_give_back_loses_nothing() {
        for kind in KINDS {
            let pool: Arc<dyn FramePool> = Arc::from(new_pool(kind, 256));
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u32>>(4);
            let taker = {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    let mut moved = 0usize;
                    // Miri interprets every step; a smaller run still crosses threads.
                    let target = if cfg!(miri) { 2_000 } else { 200_000 };
                    while moved < target {
                        let mut batch = Vec::with_capacity(16);
                        if pool.take_batch(&mut batch, 16) > 0 {
                            moved += batch.len();
                            tx.send(batch).unwrap();
                        } else {
                            std::thread::yield_now();
                        }
                    }
                })
            };
            let giver = {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for batch in rx {
                        pool.give_batch(&batch);
                    }
                })
            };
            taker.join().unwrap();
            giver.join().unwrap();
            assert_conserved(&*pool, 256);
        }
    }

    /// Several threads, each with a private cache and a mix of batch sizes, take and give back
    /// millions of frames between them; the pool ends up holding exactly what it started with.
    #[test]
    fn stress_many_threads_conserve_frames() {
        const FRAMES: u32 = 1024;
        const PER_THREAD: usize = 1_000_000;
        for kind in KINDS {
            let pool: Arc<dyn FramePool> = Arc::from(new_pool(kind, FRAMES));
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let pool = pool.clone();
                    std::thread::spawn(move || {
                        let mut cache = FrameCache::new(pool.clone(), 32 << (t % 2));
                        let mut held: Vec<u32> = Vec::new();
                        let mut moved = 0;
                        let mut i = 0usize;
                        // Bounded in passes, not time: a busy machine makes it slower, never
                        // wrong. A pass moves 27 frames on average when frames are there.
                        while moved < PER_THREAD && i < 20 * PER_THREAD {
                            i += 1;
                            let n = [1, 16, 64][i % 3];
                            let got = if t < 2 {
                                pool.take_batch(&mut held, n)
                            } else {
                                cache.take_batch(&mut held, n)
                            };
                            moved += got;
                            // Give back from the other end, sometimes to the shared pool
                            // directly, so frames travel between caches.
                            let back = held.len().min(n + i % 5);
                            let at = held.len() - back;
                            if i.is_multiple_of(2) {
                                pool.give_batch(&held[at..]);
                            } else {
                                cache.give_batch(&held[at..]);
                            }
                            held.truncate(at);
                        }
                        pool.give_batch(&held);
                        moved
                    })
                })
                .collect();
            let moved: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
            assert!(
                moved >= 4 * PER_THREAD,
                "{kind:?}: moved only {moved} in {} passes",
                20 * PER_THREAD
            );
            assert_conserved(&*pool, FRAMES);
        }
    }

    fn assert_conserved(pool: &dyn FramePool, frames: u32) {
        let mut all = Vec::new();
        assert_eq!(
            pool.take_batch(&mut all, frames as usize * 2),
            frames as usize
        );
        all.sort_unstable();
        assert_eq!(all, (0..frames).collect::<Vec<_>>(), "{:?}", pool.kind());
        assert_eq!(pool.stats().rejected, 0);
    }
}
