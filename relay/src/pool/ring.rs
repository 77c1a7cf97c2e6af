//! A bounded multi-producer multi-consumer ring of frame numbers with bulk operations.
//!
//! Dmitry Vyukov's bounded MPMC queue (the algorithm behind crossbeam's `ArrayQueue`), with
//! one change that matters for a packet pool: a batch of `n` entries is claimed with one
//! compare-and-swap on the head or tail, not `n` of them, as DPDK's `rte_ring` bulk calls do.
//! Each slot carries a sequence number saying whose turn it is. A taker that finds the next
//! slot not yet published returns what it has (possibly nothing) rather than wait; a producer
//! that finds the next slot claimed by a consumer that has not released it waits for it, as
//! `ArrayQueue` does, since a frame given back cannot be dropped. A full ring returns at once.

use super::sync::{AtomicUsize, Ordering, UnsafeCell, spin};

struct Slot {
    /// `pos` when the slot is free for the producer at position `pos`, `pos + 1` when it holds
    /// the value written at `pos`.
    seq: AtomicUsize,
    value: UnsafeCell<u32>,
}

/// Keeps the producer and consumer indices on separate cache lines.
///
/// Both indices are read with Acquire and moved with AcqRel: a thread that sees another's
/// tail (or head) must also see the head (or tail) move that thread made before it, or a
/// full/empty check mixes an old index with a new one (loom found exactly that).
#[repr(align(128))]
struct Padded(AtomicUsize);

pub struct BulkRing {
    slots: Box<[Slot]>,
    mask: usize,
    /// Next position a consumer takes.
    head: Padded,
    /// Next position a producer fills.
    tail: Padded,
}

// SAFETY: a slot's value is written only by the producer that claimed its position with the
// CAS on `tail`, and read only by the consumer that claimed it with the CAS on `head`; the
// slot's sequence number (release on publish, acquire on observe) orders the two.
unsafe impl Sync for BulkRing {}
// SAFETY: as above; the ring owns its slots.
unsafe impl Send for BulkRing {}

impl BulkRing {
    /// A ring with room for at least `capacity` entries (rounded up to a power of two).
    pub fn new(capacity: usize) -> Self {
        let cap = capacity.max(2).next_power_of_two();
        let slots = (0..cap)
            .map(|i| Slot {
                seq: AtomicUsize::new(i),
                value: UnsafeCell::new(0),
            })
            .collect();
        Self {
            slots,
            mask: cap - 1,
            head: Padded(AtomicUsize::new(0)),
            tail: Padded(AtomicUsize::new(0)),
        }
    }

    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Entries in the ring (exact when no operation is in progress).
    pub fn len(&self) -> usize {
        // Head first: the tail read after it can only be further on, so the difference never
        // goes negative (it may count a push that is still publishing).
        let head = self.head.0.load(Ordering::Acquire);
        let tail = self.tail.0.load(Ordering::Acquire);
        tail.wrapping_sub(head).min(self.capacity())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends as many of `values` as there is room for; returns how many.
    pub fn push_bulk(&self, values: &[u32]) -> usize {
        let mut waited = 0u32;
        loop {
            let tail = self.tail.0.load(Ordering::Acquire);
            let mut n = 0;
            while n < values.len() && n <= self.mask {
                let slot = &self.slots[tail.wrapping_add(n) & self.mask];
                if slot.seq.load(Ordering::Acquire) != tail.wrapping_add(n) {
                    break;
                }
                n += 1;
            }
            if n == 0 && !values.is_empty() {
                if self.tail.0.load(Ordering::Acquire) != tail {
                    continue; // another producer moved on; look again
                }
                let head = self.head.0.load(Ordering::Acquire);
                let used = tail.wrapping_sub(head) as isize;
                if used < 0 {
                    continue; // `tail` is stale: consumers have moved past it since
                }
                if used as usize > self.mask {
                    return 0; // full
                }
                // Not full: the consumer of the previous lap has claimed the slot and is about
                // to release it. Wait for it, as crossbeam's ArrayQueue does (a frame given
                // back cannot be dropped).
                spin(&mut waited);
                continue;
            }
            if n == 0 {
                return 0;
            }
            if self
                .tail
                .0
                .compare_exchange_weak(
                    tail,
                    tail.wrapping_add(n),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                for (i, &v) in values[..n].iter().enumerate() {
                    let pos = tail.wrapping_add(i);
                    let slot = &self.slots[pos & self.mask];
                    // SAFETY: the CAS made position `pos` ours, and its sequence number showed
                    // the consumer of the previous lap had finished with the slot.
                    slot.value.with_mut(|p| unsafe { *p = v });
                    slot.seq.store(pos.wrapping_add(1), Ordering::Release);
                }
                return n;
            }
        }
    }

    /// Moves up to `max` entries to `out`; returns how many.
    pub fn pop_bulk(&self, out: &mut Vec<u32>, max: usize) -> usize {
        loop {
            let head = self.head.0.load(Ordering::Acquire);
            let mut n = 0;
            while n < max && n <= self.mask {
                let slot = &self.slots[head.wrapping_add(n) & self.mask];
                if slot.seq.load(Ordering::Acquire) != head.wrapping_add(n).wrapping_add(1) {
                    break;
                }
                n += 1;
            }
            if n == 0 && max > 0 {
                if self.head.0.load(Ordering::Acquire) != head {
                    continue;
                }
                // Empty, or a producer has claimed the next slot and not yet published it.
                // Either way there is nothing to take right now, and a pool's taker would
                // rather get a short batch than wait on another thread.
                return 0;
            }
            if n == 0 {
                return 0;
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
                out.reserve(n);
                for i in 0..n {
                    let pos = head.wrapping_add(i);
                    let slot = &self.slots[pos & self.mask];
                    // SAFETY: the CAS made position `pos` ours, and its sequence number
                    // (acquired above) showed the producer had published the value.
                    out.push(slot.value.with(|p| unsafe { *p }));
                    slot.seq
                        .store(pos.wrapping_add(self.mask + 1), Ordering::Release);
                }
                return n;
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

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
