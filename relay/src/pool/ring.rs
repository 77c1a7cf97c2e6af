//! A bounded multi-producer multi-consumer ring of frame numbers with bulk operations.
//!
//! The algorithm of DPDK's `rte_ring`: producers and consumers each have a head (how far
//! positions have been claimed) and a tail (how far they have been finished). A batch of `n`
//! entries is claimed with one compare-and-swap on the head; its values are then copied as
//! plain memory, and the tail is moved past them once the batches claimed before it have
//! finished. The slots are packed `u32`s, sixteen to a cache line, with no per-slot
//! bookkeeping, so a batch costs two atomic updates and a memcpy however many frames it moves.
//!
//! The design it replaced (Vyukov's bounded queue with bulk claims, a sequence number per
//! slot) paid an atomic load and store per frame, and per-slot cache lines that crossed
//! between the cores twice per lap; PERFORMANCE.md has both measured.
//!
//! Nobody waits on an empty or a full ring: `pop_bulk` and `push_bulk` return short counts.
//! The one wait is for a batch claimed just before one's own to finish its copy (a few
//! nanoseconds, unless that thread was preempted mid-copy), as in `rte_ring` and in
//! crossbeam's `ArrayQueue`.

use super::sync::{AtomicUsize, Ordering, UnsafeCell, spin};

/// Keeps each index on its own cache line (two, against the adjacent-line prefetcher), so a
/// producer claiming positions does not evict the line a consumer is finishing on.
#[repr(align(128))]
struct Padded(AtomicUsize);

/// One side's progress: positions claimed (`head`) and positions finished (`tail`).
struct HeadTail {
    head: Padded,
    tail: Padded,
}

impl HeadTail {
    fn new() -> Self {
        Self {
            head: Padded(AtomicUsize::new(0)),
            tail: Padded(AtomicUsize::new(0)),
        }
    }

    /// Claims up to `want` positions from `head`, where `room(head)` says how many are
    /// available past it; returns the first claimed position and the count.
    #[inline(always)]
    fn claim(&self, want: usize, room: impl Fn(usize) -> usize) -> (usize, usize) {
        loop {
            let head = self.head.0.load(Ordering::Acquire);
            let n = want.min(room(head));
            if n == 0 {
                return (head, 0);
            }
            if self
                .head
                .0
                .compare_exchange_weak(
                    head,
                    head.wrapping_add(n),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                return (head, n);
            }
        }
    }

    /// Marks `[start, start + n)` finished, after every batch claimed before it.
    #[inline(always)]
    fn finish(&self, start: usize, n: usize) {
        let mut waited = 0u32;
        while self.tail.0.load(Ordering::Acquire) != start {
            spin(&mut waited);
        }
        self.tail.0.store(start.wrapping_add(n), Ordering::Release);
    }
}

pub struct BulkRing {
    slots: Box<[UnsafeCell<u32>]>,
    mask: usize,
    prod: HeadTail,
    cons: HeadTail,
}

// SAFETY: a slot is written only by the producer whose head CAS claimed its position, after
// the consumer tail (acquired) showed the previous lap's reader had finished with it; it is
// read only by the consumer whose head CAS claimed it, after the producer tail (acquired)
// showed the value published. The tails are stored with Release after the copies.
unsafe impl Sync for BulkRing {}
// SAFETY: as above; the ring owns its slots.
unsafe impl Send for BulkRing {}

impl BulkRing {
    /// A ring with room for at least `capacity` entries (rounded up to a power of two).
    pub fn new(capacity: usize) -> Self {
        let cap = capacity.max(2).next_power_of_two();
        Self {
            slots: (0..cap).map(|_| UnsafeCell::new(0)).collect(),
            mask: cap - 1,
            prod: HeadTail::new(),
            cons: HeadTail::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Entries ready to take (exact when no operation is in progress).
    pub fn len(&self) -> usize {
        // The consumer head first: the producer tail read after it can only be further on.
        let head = self.cons.head.0.load(Ordering::Acquire);
        let tail = self.prod.tail.0.load(Ordering::Acquire);
        (tail.wrapping_sub(head) as isize).clamp(0, self.capacity() as isize) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot ranges `[start, start + n)` covers: up to the end of the array, then from its
    /// beginning.
    fn spans(&self, start: usize, n: usize) -> [(usize, usize); 2] {
        let first = start & self.mask;
        let len = n.min(self.capacity() - first);
        [(first, len), (0, n - len)]
    }

    /// The address of slot `at`, with the provenance of the whole array (a pointer taken from
    /// one slot's reference may not be used to reach the next).
    #[cfg(not(loom))]
    fn slot_ptr(&self, at: usize) -> *mut u32 {
        // The transparent cell has the layout of a `u32`; writing through a pointer derived
        // from a shared reference is what `UnsafeCell` permits.
        self.slots[at..].as_ptr().cast::<u32>().cast_mut()
    }

    /// Copies `values` into the slots from position `start` on.
    ///
    /// # Safety
    /// The caller has claimed those positions as a producer.
    #[cfg(not(loom))]
    unsafe fn write(&self, start: usize, values: &[u32]) {
        let mut from = values.as_ptr();
        for (at, len) in self.spans(start, values.len()) {
            // SAFETY: `UnsafeCell<u32>` has the layout of `u32`, `at + len` is within the slots
            // (see `spans`), and no other thread touches claimed slots until the tail moves.
            unsafe {
                std::ptr::copy_nonoverlapping(from, self.slot_ptr(at), len);
                from = from.add(len);
            }
        }
    }

    /// Appends the `n` values from position `start` on to `out`.
    ///
    /// # Safety
    /// The caller has claimed those positions as a consumer.
    #[cfg(not(loom))]
    unsafe fn read(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        out.reserve(n);
        for (at, len) in self.spans(start, n) {
            // SAFETY: as in `write`; the values were published before the producer tail moved.
            let span = unsafe { std::slice::from_raw_parts(self.slot_ptr(at), len) };
            out.extend_from_slice(span);
        }
    }

    /// Loom tracks each cell, so the model copies one slot at a time through its API.
    #[cfg(loom)]
    unsafe fn write(&self, start: usize, values: &[u32]) {
        for (i, &v) in values.iter().enumerate() {
            let slot = &self.slots[start.wrapping_add(i) & self.mask];
            // SAFETY: as in the native version.
            slot.with_mut(|p| unsafe { *p = v });
        }
    }

    #[cfg(loom)]
    unsafe fn read(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        for i in 0..n {
            let slot = &self.slots[start.wrapping_add(i) & self.mask];
            // SAFETY: as in the native version.
            out.push(slot.with(|p| unsafe { *p }));
        }
    }

    /// Appends as many of `values` as there is room for; returns how many.
    pub fn push_bulk(&self, values: &[u32]) -> usize {
        let cap = self.capacity();
        let (start, n) = self.prod.claim(values.len(), |head| {
            let used = head.wrapping_sub(self.cons.tail.0.load(Ordering::Acquire)) as isize;
            // A negative count means `head` is stale (consumers finished past it since it was
            // read); the CAS will fail and the claim retries with a fresh head.
            if used < 0 {
                1
            } else {
                cap.saturating_sub(used as usize)
            }
        });
        // SAFETY: the claim made these positions ours, and the consumer tail it read showed the
        // previous lap's readers done with their slots.
        unsafe { self.write(start, &values[..n]) };
        if n > 0 {
            self.prod.finish(start, n);
        }
        n
    }

    /// Moves up to `max` entries to `out`; returns how many.
    pub fn pop_bulk(&self, out: &mut Vec<u32>, max: usize) -> usize {
        let (start, n) = self.cons.claim(max, |head| {
            let ready = self.prod.tail.0.load(Ordering::Acquire).wrapping_sub(head) as isize;
            if ready < 0 { 1 } else { ready as usize }
        });
        // SAFETY: the claim made these positions ours, and the producer tail it read showed their
        // values published.
        unsafe { self.read(start, n, out) };
        if n > 0 {
            self.cons.finish(start, n);
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    proptest! {
        // Miri interprets every step and cannot read the working directory for the failure
        // file; a few cases there still check the copies for undefined behaviour.
        #![proptest_config(ProptestConfig {
            cases: if cfg!(miri) { 4 } else { 512 },
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Any sequence of bulk pushes and pops, on any small capacity, behaves as a bounded
        /// FIFO: the same counts and the same values in the same order as a `VecDeque`.
        #[test]
        fn matches_a_bounded_fifo(
            cap_log in 1u32..6,
            ops in prop::collection::vec((any::<bool>(), 0usize..40), 1..200),
        ) {
            let ring = BulkRing::new(1 << cap_log);
            let mut model = VecDeque::new();
            let mut next = 0u32;
            for (push, n) in ops {
                if push {
                    let values: Vec<u32> = (next..next + n as u32).collect();
                    let room = ring.capacity() - model.len();
                    let pushed = ring.push_bulk(&values);
                    prop_assert_eq!(pushed, n.min(room));
                    model.extend(&values[..pushed]);
                    next += n as u32;
                } else {
                    let mut out = vec![u32::MAX];
                    let got = ring.pop_bulk(&mut out, n);
                    let want: Vec<u32> = model.drain(..n.min(model.len())).collect();
                    prop_assert_eq!(got, want.len());
                    prop_assert_eq!(&out[1..], &want[..], "appended after what was there");
                }
                prop_assert_eq!(ring.len(), model.len());
            }
        }
    }

    #[test]
    fn fifo_bulk_and_wraparound() {
        let r = BulkRing::new(8);
        assert_eq!(r.capacity(), 8);
        let mut out = Vec::new();
        for lap in 0..5u32 {
            assert_eq!(
                r.push_bulk(&[lap, lap + 1, lap + 2, lap + 3, lap + 4, lap + 5]),
                6
            );
            assert_eq!(r.push_bulk(&[9, 9, 9, 9]), 2, "only two slots left");
            assert_eq!(r.len(), 8);
            out.clear();
            assert_eq!(r.pop_bulk(&mut out, 3), 3);
            assert_eq!(out, [lap, lap + 1, lap + 2]);
            assert_eq!(r.pop_bulk(&mut out, 100), 5);
            assert_eq!(r.pop_bulk(&mut out, 100), 0);
            assert!(r.is_empty());
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::{sync::Arc, thread};

    /// Two threads move frames through the ring concurrently in batches; whatever the
    /// interleaving, every frame ends up exactly once in the ring or in a thread's hands.
    #[test]
    fn concurrent_bulk_take_and_give_back_conserve_frames() {
        loom::model(|| {
            let ring = Arc::new(BulkRing::new(4));
            assert_eq!(ring.push_bulk(&[0, 1, 2]), 3);
            let worker = |ring: Arc<BulkRing>| {
                move || {
                    let mut got = Vec::new();
                    ring.pop_bulk(&mut got, 2);
                    let back = ring.push_bulk(&got);
                    assert_eq!(back, got.len(), "room for every frame taken");
                }
            };
            let a = thread::spawn(worker(ring.clone()));
            let b = thread::spawn(worker(ring.clone()));
            a.join().unwrap();
            b.join().unwrap();
            let mut all = Vec::new();
            ring.pop_bulk(&mut all, 10);
            all.sort_unstable();
            assert_eq!(all, [0, 1, 2]);
        });
    }

    /// A frame taken on one thread and given back on another (the RX/TX split).
    #[test]
    fn cross_thread_give_back() {
        loom::model(|| {
            let ring = Arc::new(BulkRing::new(2));
            assert_eq!(ring.push_bulk(&[7, 8]), 2);
            let (tx, rx) = loom::sync::mpsc::channel();
            let taker = {
                let ring = ring.clone();
                thread::spawn(move || {
                    let mut got = Vec::new();
                    ring.pop_bulk(&mut got, 2);
                    tx.send(got).unwrap();
                })
            };
            let giver = {
                let ring = ring.clone();
                thread::spawn(move || {
                    let got = rx.recv().unwrap();
                    assert_eq!(ring.push_bulk(&got), got.len());
                })
            };
            taker.join().unwrap();
            giver.join().unwrap();
            let mut all = Vec::new();
            ring.pop_bulk(&mut all, 4);
            all.sort_unstable();
            assert_eq!(all, [7, 8]);
        });
    }

    /// Repeated take/give-back by two threads on a ring that is exactly full: a producer that
    /// read `tail` before the other thread lapped it must not mistake the ring for full.
    #[test]
    fn full_ring_laps_without_false_full() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let ring = Arc::new(BulkRing::new(2));
            assert_eq!(ring.push_bulk(&[0, 1]), 2);
            let worker = |ring: Arc<BulkRing>| {
                move || {
                    for _ in 0..2 {
                        let mut got = Vec::new();
                        ring.pop_bulk(&mut got, 1);
                        assert_eq!(
                            ring.push_bulk(&got),
                            got.len(),
                            "room for every frame taken"
                        );
                    }
                }
            };
            let a = thread::spawn(worker(ring.clone()));
            let b = thread::spawn(worker(ring.clone()));
            a.join().unwrap();
            b.join().unwrap();
            assert_eq!(ring.len(), 2);
            let mut all = Vec::new();
            ring.pop_bulk(&mut all, 10);
            all.sort_unstable();
            assert_eq!(all, [0, 1]);
        });
    }
}
