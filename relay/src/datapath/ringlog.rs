//! The frames last given to a producer ring, so they can be taken back from a socket whose
//! device is gone.
//!
//! A fill or TX ring is consumed by the kernel in order, so the entries it has not consumed
//! are always the last ones produced. When the device goes, the kernel never touches the ring
//! again: the relay learns how many entries are left (ring size less free slots) and finds
//! which frames they are here, instead of losing them with the socket.

pub(super) struct RingLog {
    slots: Box<[u32]>,
    /// Frames recorded since the start; the next one goes to `written % len`.
    written: usize,
}

impl RingLog {
    /// A log as deep as the ring it shadows, whose size (like every AF_XDP ring's) is a power
    /// of two: a slot is found with a mask, not a division, once per frame.
    pub fn new(ring_size: usize) -> Self {
        assert!(ring_size.is_power_of_two(), "ring sizes are powers of two");
        Self {
            slots: vec![0; ring_size].into_boxed_slice(),
            written: 0,
        }
    }

    pub fn record(&mut self, frame: u32) {
        let at = self.written & (self.slots.len() - 1);
        self.slots[at] = frame;
        self.written += 1;
    }

    /// The last `n` frames recorded, oldest first; fewer if fewer were recorded or the log is
    /// shallower than `n`.
    pub fn last(&self, n: usize) -> impl Iterator<Item = u32> + '_ {
        let n = n.min(self.written).min(self.slots.len());
        (self.written - n..self.written).map(|i| self.slots[i & (self.slots.len() - 1)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nothing_recorded_gives_nothing() {
        assert_eq!(RingLog::new(4).last(3).count(), 0);
    }

    proptest! {
        /// Against a model: whatever was produced, the last n are the unconsumed ones.
        #[test]
        fn last_n_are_the_newest(frames in proptest::collection::vec(any::<u32>(), 0..40),
                                 shift in 0u32..5, n in 0usize..20) {
            let size = 1usize << shift;
            let mut log = RingLog::new(size);
            for &f in &frames {
                log.record(f);
            }
            let want = n.min(size).min(frames.len());
            let expect: Vec<u32> = frames[frames.len() - want..].to_vec();
            prop_assert_eq!(log.last(n).collect::<Vec<_>>(), expect);
        }
    }
}
