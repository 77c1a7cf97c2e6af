//! How the UMEM's frames are shared between the places a frame can wait, so that none of them
//! can starve the others: the ingress fill rings, the workers' caches, and what is in flight
//! (TX and completion rings, lanes between workers, fan-out copies). One egress whose TX ring
//! never drains (its device stalled with the link up) may hold only its own share, so the
//! others and the fill rings keep theirs.

/// Frames one RX batch takes; an ingress fill ring needs at least this many to receive.
const BATCH: usize = super::BATCH;
/// A worker's cache never holds more than this.
const CACHE_MAX: usize = 512;
const CACHE_MIN: usize = 16;
/// The fewest and the most entries an RX or fill ring is made with.
const RING_MIN: usize = super::RING_SIZE as usize;
const RING_MAX: usize = 16384;

/// The shares of a UMEM of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Frames the fill rings hold between them: half the UMEM.
    pub fill_total: usize,
    /// Frames one worker's cache may hold: all caches together at most a quarter of the UMEM,
    /// so the rest (a quarter at least) is always there for frames in flight.
    pub cache: usize,
    /// Frames one egress socket may have on its TX and completion rings: a quarter of the
    /// UMEM, at least a batch. What is beyond waits (a few batches) or is dropped as
    /// `tx_ring_full`, as on a full ring.
    pub tx_hold: usize,
    /// Entries of each RX and fill ring: the fill rings' share, rounded up to a power of two
    /// (2,048 to 16,384). While a worker is off its CPU the kernel moves frames from the fill
    /// ring to the RX ring, and stops when either runs out: so the share buys time only if
    /// both rings can hold it. With rings of a fixed 2,048 a larger UMEM bought nothing.
    pub ingress_ring: usize,
}

impl Budget {
    pub fn new(frames: usize, workers: usize) -> Self {
        Budget {
            fill_total: frames / 2,
            cache: (frames / 4 / workers.max(1)).clamp(CACHE_MIN, CACHE_MAX),
            tx_hold: (frames / 4).max(BATCH),
            ingress_ring: (frames / 2).next_power_of_two().clamp(RING_MIN, RING_MAX),
        }
    }

    /// Frames one staging list may keep waiting for TX ring room, beyond what the ring holds:
    /// `waiting_max` batches at most, and never more than the socket's hold, so a stalled
    /// egress keeps at most half the UMEM even at the smallest size.
    pub fn waiting(&self, waiting_max: usize) -> usize {
        waiting_max.min(self.tx_hold)
    }

    /// The fill target of each of `ingress_queues` queues, at most a ring's worth.
    pub fn fill_target(&self, ingress_queues: usize) -> usize {
        // Counted are the frames in the fill ring and those received and not yet consumed
        // (the RX ring), so a worker that falls behind for a moment leaves a full fill ring
        // behind its backlog rather than an empty one.
        (self.fill_total / ingress_queues.max(1)).min(self.ingress_ring)
    }
}

/// The smallest UMEM that works with `ingress_queues` ingress queues and `workers` workers:
/// every fill ring gets two RX batches (from half the UMEM), and every worker one batch for its
/// cache and one in flight (from a quarter each).
pub fn minimum_frames(ingress_queues: usize, workers: usize) -> usize {
    4 * BATCH * ingress_queues.max(workers).max(1)
}

/// Refuses a UMEM of `frames` too small for `ingress_queues` and `workers`, saying why and
/// the least that works. The data path checks it at start and reload, `--check` before.
pub fn check(frames: usize, ingress_queues: usize, workers: usize) -> Result<(), String> {
    let min = minimum_frames(ingress_queues, workers);
    if frames < min {
        return Err(format!(
            "umem: frames: {frames} is too few for {ingress_queues} ingress queue(s) and \
             {workers} worker(s): at least {min} are needed (each fill ring needs two RX \
             batches, each worker room for its cache and its frames in flight); raise \
             umem.frames or set fewer workers"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// At the minimum size and above, every fill ring gets at least two batches, the caches
        /// leave at least a quarter of the UMEM, and no share exceeds the whole.
        #[test]
        fn shares_fit(queues in 1usize..64, workers in 1usize..64, extra in 0usize..100_000) {
            let frames = minimum_frames(queues, workers) + extra;
            let b = Budget::new(frames, workers);
            prop_assert!(b.fill_target(queues) >= 2 * BATCH);
            prop_assert!(b.fill_target(queues) * queues <= b.fill_total);
            // The rings hold the share (a stall as long as the share lasts loses nothing),
            // up to the largest ring.
            prop_assert!(b.ingress_ring.is_power_of_two());
            prop_assert!(b.fill_target(queues) <= b.ingress_ring);
            prop_assert!(b.ingress_ring >= b.fill_total.min(RING_MAX));
            prop_assert!(b.cache * workers <= frames / 4);
            prop_assert!(b.fill_total + b.cache * workers + BATCH * workers <= frames);
            // A stalled egress (its TX ring full and its staging list at the bound) leaves the
            // fill rings their share and every worker its cache.
            prop_assert!(b.tx_hold + b.waiting(4 * BATCH) <= frames / 2);
            prop_assert!(b.tx_hold >= BATCH);
        }
    }

    #[test]
    fn what_the_issue_saw() {
        // 16 queues and 16 workers at the default 4096 frames left 5 workers with empty fill
        // rings (512-frame caches hoarded the UMEM): now each cache holds 64 and each fill
        // ring 128.
        assert_eq!(minimum_frames(16, 16), 4096);
        let b = Budget::new(4096, 16);
        assert_eq!((b.cache, b.fill_target(16)), (64, 128));
        // 512 frames and 2 workers delivered 128 of 64,000: now each cache holds 64.
        assert_eq!(minimum_frames(1, 2), 512);
        assert_eq!(Budget::new(512, 2).cache, 64);
        // The defaults on a small machine keep the full-size cache.
        assert_eq!(Budget::new(4096, 2).cache, 512);
        assert!(minimum_frames(17, 1) > 4096);
        // A stalled egress held a whole ring (2,048) and 256 waiting of the default 4,096,
        // and all 256 of the smallest UMEM: now a quarter, and a quarter waiting at most.
        let b = Budget::new(4096, 1);
        assert_eq!((b.tx_hold, b.waiting(256)), (1024, 256));
        let b = Budget::new(minimum_frames(1, 1), 1);
        assert_eq!((b.tx_hold, b.waiting(256)), (64, 64));
        // umem.frames 8,192 was documented as a buffer twice as deep, but the RX and fill
        // rings stayed at 2,048 entries, so a stall lost frames after 2,048 whatever the
        // UMEM: now the rings grow with the share.
        let ring = |frames| Budget::new(frames, 1).ingress_ring;
        assert_eq!(
            [
                ring(512),
                ring(4096),
                ring(8192),
                ring(16384),
                ring(1 << 20)
            ],
            [2048, 2048, 4096, 8192, 16384]
        );
        assert_eq!(Budget::new(8192, 1).fill_target(1), 4096);
    }
}
