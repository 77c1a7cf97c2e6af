//! A worker's private stash of free frames in front of the shared pool, as DPDK's mempool keeps
//! a cache per lcore: takes and give-backs touch only this thread's memory, and the shared pool
//! is visited in batches, so its cost (a compare-and-swap, or a lock) is spread over many frames.

use std::sync::Arc;

use super::FramePool;

pub struct FrameCache {
    pool: Arc<dyn FramePool>,
    frames: Vec<u32>,
    /// Most frames held before half are flushed back.
    size: usize,
}

impl FrameCache {
    /// A cache of at most `size` frames (at least 2) in front of `pool`.
    pub fn new(pool: Arc<dyn FramePool>, size: usize) -> Self {
        let size = size.max(2);
        Self {
            pool,
            frames: Vec::with_capacity(size + 1),
            size,
        }
    }

    pub fn pool(&self) -> &Arc<dyn FramePool> {
        &self.pool
    }

    /// Frames held here, free but not in the shared pool.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    #[inline]
    pub fn take(&mut self) -> Option<u32> {
        if self.frames.is_empty() {
            self.pool.take_batch(&mut self.frames, self.size / 2);
        }
        self.frames.pop()
    }

    /// Appends up to `n` frames to `out`; returns how many.
    pub fn take_batch(&mut self, out: &mut Vec<u32>, n: usize) -> usize {
        if self.frames.len() < n {
            // Enough for this request and half a cache beyond it.
            let want = n - self.frames.len() + self.size / 2;
            self.pool.take_batch(&mut self.frames, want);
        }
        let got = n.min(self.frames.len());
        let at = self.frames.len() - got;
        out.extend(self.frames.drain(at..));
        got
    }

    #[inline]
    pub fn give(&mut self, frame: u32) {
        self.frames.push(frame);
        if self.frames.len() > self.size {
            self.spill();
        }
    }

    pub fn give_batch(&mut self, frames: &[u32]) {
        self.frames.extend_from_slice(frames);
        if self.frames.len() > self.size {
            self.spill();
        }
    }

    /// Returns frames above half the cache size to the shared pool.
    fn spill(&mut self) {
        let keep = self.size / 2;
        self.pool.give_batch(&self.frames[keep..]);
        self.frames.truncate(keep);
    }

    /// Returns every frame to the shared pool.
    pub fn flush(&mut self) {
        self.pool.give_batch(&self.frames);
        self.frames.clear();
    }
}

impl Drop for FrameCache {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::pool::{AllocatorKind, new_pool};

    #[test]
    fn cache_serves_from_itself_and_spills_in_batches() {
        for kind in [AllocatorKind::Lockfree, AllocatorKind::Mutex] {
            let pool: Arc<dyn FramePool> = Arc::from(new_pool(kind, 64));
            let mut cache = FrameCache::new(pool.clone(), 16);
            let f = cache.take().unwrap();
            assert_eq!(cache.len(), 7, "took half a cache, handed out one");
            assert_eq!(pool.free(), 56);
            cache.give(f);
            let mut out = Vec::new();
            assert_eq!(cache.take_batch(&mut out, 40), 40);
            assert_eq!(cache.len() + pool.free() + out.len(), 64);
            cache.give_batch(&out);
            assert!(cache.len() <= 16, "spilled down: {}", cache.len());
            assert_eq!(cache.len() + pool.free(), 64);
            drop(cache);
            assert_eq!(pool.free(), 64, "drop flushes");
            assert_eq!(pool.stats().rejected, 0);
        }
    }

    #[test]
    fn exhausted_pool_gives_short_batches() {
        let pool: Arc<dyn FramePool> = Arc::from(new_pool(AllocatorKind::Lockfree, 64));
        let mut cache = FrameCache::new(pool.clone(), 16);
        let mut out = Vec::new();
        assert_eq!(cache.take_batch(&mut out, 100), 64);
        assert_eq!(cache.take(), None);
        cache.give_batch(&out);
        cache.flush();
        assert_eq!(pool.free(), 64);
    }
}
