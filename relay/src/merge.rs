//! Hitless merge (SMPTE ST 2022-7, A/B market-data lines): one stream out of two or more legs
//! that carry the same packets, each packet relayed once, from whichever leg delivered it
//! first, with no buffering.
//!
//! The state is a fixed table of slots indexed by the low bits of the packet's (extended)
//! sequence number. A slot remembers which sequence number it last let through and when, in one
//! 64-bit word: a packet is a duplicate if its slot names its own sequence number and that was
//! less than the window ago. Legs received by different workers race for a slot with one
//! compare-and-swap, so exactly one of them wins, without a lock and without allocating.
//!
//! What the table cannot tell: a sequence number older than the last `slots` numbers let
//! through has had its slot taken by a newer one, so it counts as new. The legs' skew must be
//! smaller than that many packets (65,536 by default: 1.3 s at 50 kpps).
//!
//! Time is data here (`now_ms`, from the caller), so all of this is tested on a simulated clock.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

/// How a leg's packets are numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    /// The RTP header's 16-bit sequence number (RFC 3550), extended across wrap-around.
    Rtp,
    /// A big-endian counter of `bytes` (4 or 8) at `offset` in the UDP payload.
    Counter { offset: usize, bytes: usize },
}

impl Sequence {
    /// The sequence number of a datagram with this UDP payload, if it carries one: RTP version
    /// 2 with a whole fixed header, or a payload long enough for the counter.
    pub fn read(self, payload: &[u8]) -> Option<u64> {
        match self {
            Sequence::Rtp => {
                let h = payload.get(..RTP_HEADER)?;
                (h[0] >> 6 == 2).then(|| u64::from(u16::from_be_bytes([h[2], h[3]])))
            }
            Sequence::Counter { offset, bytes } => {
                let b = payload.get(offset..offset.checked_add(bytes)?)?;
                match bytes {
                    4 => Some(u64::from(u32::from_be_bytes(b.try_into().ok()?))),
                    8 => Some(u64::from_be_bytes(b.try_into().ok()?)),
                    _ => None,
                }
            }
        }
    }
}

/// An RTP fixed header's length: a payload shorter than this is not RTP.
const RTP_HEADER: usize = 12;

/// Slots in a merge table unless told otherwise: a power of two, 512 KiB.
pub const DEFAULT_SLOTS: usize = 1 << 16;

/// Bits of the slot word: the sequence number's low 39 bits, a bit saying the slot was ever
/// written, and 24 bits of milliseconds (4.6 hours before they wrap; windows are far shorter).
const TIME_BITS: u32 = 24;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
const USED: u64 = 1 << TIME_BITS;
const TAG_SHIFT: u32 = TIME_BITS + 1;
const TAG_MASK: u64 = (1 << (64 - TAG_SHIFT)) - 1;

/// The longest window a merge table can time, in milliseconds.
pub const MAX_WINDOW_MS: u32 = 60_000;

/// Where the extended numbering of RTP starts, so that a sequence number just below the first
/// one seen still extends to a value above zero.
const RTP_BASE: u64 = 1 << 32;

/// No packet seen yet (the high-water marks hold sequence number + 1).
const NONE: u64 = 0;

/// What became of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// Relay it: no leg brought its sequence number within the window.
    pub first: bool,
    /// Sequence numbers this leg skipped to reach this packet.
    pub leg_gaps: u64,
    /// Sequence numbers no leg has brought yet that this packet jumped over (relayed packets
    /// only).
    pub holes_opened: u64,
    /// This packet, relayed, was one of those: it arrived late.
    pub hole_filled: bool,
    /// Its sequence number was let through before, longer ago than the window: the sender
    /// started again, and the marks were moved back to it.
    pub restart: bool,
}

/// The shared state of one merged rule.
#[derive(Debug)]
pub struct MergeState {
    sequence: Sequence,
    window_ms: u64,
    slots: Box<[AtomicU64]>,
    mask: u64,
    /// Highest sequence number let through, + 1 (`NONE` before the first). Each mark on a
    /// cache line of its own: legs on different workers write them.
    high: CachePadded<AtomicU64>,
    /// Lowest sequence number let through since the last restart (`u64::MAX` before the
    /// first): a late packet below it filled no hole, it only had not been seen yet.
    low: CachePadded<AtomicU64>,
    /// Highest sequence number each leg brought, + 1.
    leg_high: Box<[CachePadded<AtomicU64>]>,
}

/// Two states are equal when they merge the same way (numbering, window, legs, size): what a
/// reload compares to decide whether a rule changed. What they remember is not compared.
impl PartialEq for MergeState {
    fn eq(&self, other: &Self) -> bool {
        self.sequence == other.sequence
            && self.window_ms == other.window_ms
            && self.legs() == other.legs()
            && self.slots.len() == other.slots.len()
    }
}

impl Eq for MergeState {}

impl MergeState {
    /// A table for `legs` legs; `slots` is rounded up to a power of two.
    pub fn new(sequence: Sequence, legs: usize, window_ms: u32, slots: usize) -> Self {
        let slots = slots.max(2).next_power_of_two();
        MergeState {
            sequence,
            window_ms: u64::from(window_ms.min(MAX_WINDOW_MS)),
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            mask: slots as u64 - 1,
            high: CachePadded::new(AtomicU64::new(NONE)),
            low: CachePadded::new(AtomicU64::new(u64::MAX)),
            leg_high: (0..legs)
                .map(|_| CachePadded::new(AtomicU64::new(NONE)))
                .collect(),
        }
    }

    pub fn sequence(&self) -> Sequence {
        self.sequence
    }

    pub fn window_ms(&self) -> u32 {
        self.window_ms as u32
    }

    pub fn legs(&self) -> usize {
        self.leg_high.len()
    }

    /// How far back (in sequence numbers) the table remembers.
    fn horizon(&self) -> u64 {
        self.mask + 1
    }

    /// Decides one packet of leg `leg` with sequence number `raw` (as read from it) at
    /// `now_ms` on the caller's monotonic clock.
    pub fn offer(&self, leg: usize, raw: u64, now_ms: u64) -> Offer {
        let seq = self.extend(raw);
        let slot = &self.slots[(seq & self.mask) as usize];
        let tag = seq & TAG_MASK;
        let now = now_ms & TIME_MASK;
        let mut restart = false;
        let first = loop {
            let cur = slot.load(Ordering::Acquire);
            let same = cur & USED != 0 && cur >> TAG_SHIFT == tag;
            let stamped = cur & TIME_MASK;
            // Each worker reads the clock once per batch, so the worker of the other leg may
            // have stamped the slot after this one's reading: a stamp that is ahead of `now`
            // (by no more than a window) is as fresh as can be, not 2^24 ms old. Read as
            // old, it let a packet's second copy through as a restart, once in a while with
            // the legs on two workers and a reload making one of them late.
            let ahead = stamped.wrapping_sub(now) & TIME_MASK;
            let age = if ahead <= self.window_ms {
                0
            } else {
                now.wrapping_sub(stamped) & TIME_MASK
            };
            if same && age < self.window_ms {
                break false;
            }
            restart = same;
            let claim = tag << TAG_SHIFT | USED | now;
            if slot
                .compare_exchange(cur, claim, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break true;
            }
            // Another leg's packet took the slot first: look again at what it wrote.
        };
        let leg_gaps = self.advance(&self.leg_high[leg], seq, restart).0;
        let (holes_opened, hole_filled) = if first {
            let (above, behind) = self.advance(&self.high, seq, restart);
            // A packet below the lowest let through opens the holes between them (they were
            // not seen yet either); one between the lowest and the highest fills one.
            let low = if restart {
                self.low.store(seq, Ordering::Release);
                u64::MAX
            } else {
                // Written only when it moves: the common packet is above it.
                let low = self.low.load(Ordering::Acquire);
                if seq < low {
                    self.low.fetch_min(seq, Ordering::AcqRel)
                } else {
                    low
                }
            };
            let below = match low.checked_sub(seq) {
                Some(d) if low != u64::MAX && d > 0 && d < self.horizon() => d - 1,
                _ => 0,
            };
            (above + below, behind && low != u64::MAX && seq > low)
        } else {
            (0, false)
        };
        Offer {
            first,
            leg_gaps,
            holes_opened,
            hole_filled,
            restart,
        }
    }

    /// Moves a high-water mark to `seq`: returns the numbers skipped to get there, and whether
    /// `seq` was behind the mark (and near it: a late packet). A restart, or a packet further
    /// behind than the table remembers, moves the mark back to it.
    fn advance(&self, mark: &AtomicU64, seq: u64, restart: bool) -> (u64, bool) {
        // A 64-bit counter at its very last value shares the mark with the one before it.
        // Written only when it moves (a duplicate, a late packet does not), so a mark
        // several workers share bounces between them once per new number at most.
        let next = seq.saturating_add(1);
        let seen = mark.load(Ordering::Acquire);
        let prev = if next > seen {
            mark.fetch_max(next, Ordering::AcqRel)
        } else {
            seen
        };
        if prev == NONE {
            return (0, false);
        }
        let prev = prev - 1;
        if seq > prev {
            let jump = seq - prev - 1;
            // A jump further than the table remembers is a new start, not a loss.
            return (if jump < self.horizon() { jump } else { 0 }, false);
        }
        if restart || prev - seq >= self.horizon() {
            mark.store(next, Ordering::Release);
            return (0, false);
        }
        (0, seq < prev)
    }

    /// The sequence number on the table's scale: RTP's 16 bits extended to the value nearest
    /// the highest let through (RFC 3550 A.1), counters as they are.
    fn extend(&self, raw: u64) -> u64 {
        match self.sequence {
            Sequence::Counter { .. } => raw,
            Sequence::Rtp => {
                let high = self.high.load(Ordering::Acquire);
                if high == NONE {
                    return RTP_BASE + raw;
                }
                let high = high - 1;
                let cand = (high & !0xffff) | (raw & 0xffff);
                if cand > high + 0x8000 {
                    cand - 0x1_0000
                } else if cand + 0x8000 < high {
                    cand + 0x1_0000
                } else {
                    cand
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn rtp(seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 96, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7, 0xaa];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p
    }

    #[test]
    fn reads_rtp_and_counters() {
        assert_eq!(Sequence::Rtp.read(&rtp(65535)), Some(65535));
        let mut v1 = rtp(5);
        v1[0] = 0x40;
        assert_eq!(Sequence::Rtp.read(&v1), None, "RTP version 1");
        assert_eq!(Sequence::Rtp.read(&rtp(5)[..11]), None, "short header");
        let c4 = Sequence::Counter {
            offset: 2,
            bytes: 4,
        };
        assert_eq!(c4.read(&[9, 9, 0, 0, 1, 2]), Some(0x102));
        assert_eq!(c4.read(&[9, 9, 0, 0, 1]), None);
        let c8 = Sequence::Counter {
            offset: 0,
            bytes: 8,
        };
        assert_eq!(c8.read(&u64::MAX.to_be_bytes()), Some(u64::MAX));
        let far = Sequence::Counter {
            offset: usize::MAX,
            bytes: 8,
        };
        assert_eq!(far.read(&[0; 16]), None, "offset overflow");
    }

    #[test]
    fn first_arrival_wins_and_the_other_leg_is_a_duplicate() {
        let m = MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS);
        assert!(m.offer(0, 10, 0).first);
        assert!(!m.offer(1, 10, 1).first);
        assert!(m.offer(1, 11, 2).first);
        assert!(!m.offer(0, 11, 3).first);
    }

    /// The legs' workers read the clock once per batch each, so the second copy of a number
    /// can come with an earlier reading than the first copy's stamp: still a duplicate,
    /// also where the 24-bit clock wraps; a stamp further ahead than a window, and one
    /// older than a window, are not fresh.
    #[test]
    fn a_copy_timed_before_the_first_is_still_a_duplicate() {
        let m = MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS);
        assert!(m.offer(0, 10, 10_000).first);
        assert!(
            !m.offer(1, 10, 9_997).first,
            "3 ms earlier by the other worker's clock"
        );
        assert!(!m.offer(1, 10, 9_500).first, "a window earlier");
        let wrap = TIME_MASK - 1;
        assert!(m.offer(0, 11, wrap + 3).first);
        assert!(!m.offer(1, 11, wrap).first, "across the clock's wrap");
        assert!(m.offer(0, 12, 20_000).first);
        let restart = m.offer(1, 12, 20_000 - 501);
        assert!(
            restart.first && restart.restart,
            "ahead by more than a window"
        );
        assert!(m.offer(0, 13, 30_000).first);
        assert!(m.offer(1, 13, 30_500).first, "a window later: a restart");
    }

    #[test]
    fn rtp_wraps_around() {
        let m = MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS);
        for (t, s) in (65530u64..65536).chain(0..6).enumerate() {
            let o = m.offer(0, s, t as u64);
            assert!(
                o.first && o.leg_gaps == 0 && o.holes_opened == 0,
                "{s}: {o:?}"
            );
            assert!(!m.offer(1, s, t as u64).first, "{s} twice");
        }
    }

    #[test]
    fn gaps_holes_and_late_fills() {
        let m = MergeState::new(
            Sequence::Counter {
                offset: 0,
                bytes: 8,
            },
            2,
            500,
            1024,
        );
        assert_eq!(m.offer(0, 100, 0).leg_gaps, 0);
        // Leg 0 skips 101..=103; nobody has them yet.
        let o = m.offer(0, 104, 1);
        assert_eq!((o.first, o.leg_gaps, o.holes_opened), (true, 3, 3));
        // Leg 1 brings 101..=104 late: 101-103 fill holes, 104 is a duplicate.
        for s in 101..=103 {
            let o = m.offer(1, s, 2);
            assert!(
                o.first && o.hole_filled && o.holes_opened == 0,
                "{s}: {o:?}"
            );
        }
        let o = m.offer(1, 104, 2);
        assert!(!o.first && !o.hole_filled);
        // Leg 1's own numbering had a gap of 100 (its first was 101: none).
        assert_eq!(m.offer(1, 106, 3).leg_gaps, 1);
    }

    #[test]
    fn a_number_seen_longer_ago_than_the_window_is_new_and_restarts() {
        let m = MergeState::new(
            Sequence::Counter {
                offset: 0,
                bytes: 4,
            },
            1,
            500,
            1024,
        );
        for s in 0..100 {
            assert!(m.offer(0, s, s).first);
        }
        // The sender starts over at 10 after a pause of a second: nothing is swallowed, and
        // no gap or hole is counted for going back.
        for s in 10..50 {
            let o = m.offer(0, s, 2000 + s);
            assert!(
                o.first && o.leg_gaps == 0 && o.holes_opened == 0,
                "{s}: {o:?}"
            );
            assert!(!o.hole_filled);
            assert!(o.restart);
        }
        // ... and is followed from there: 50 after 49 is no gap.
        assert_eq!(m.offer(0, 50, 2100).leg_gaps, 0);
    }

    #[test]
    fn concurrent_legs_relay_each_number_once() {
        // Two threads as two workers, each with a leg of the same 200,000 numbers, kept within
        // a thousand packets (and one clock tick) of each other by a barrier.
        let m = std::sync::Arc::new(MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|leg| {
                let (m, barrier) = (m.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut first = 0;
                    for chunk in 0..200u64 {
                        barrier.wait();
                        for i in chunk * 1000..(chunk + 1) * 1000 {
                            first += usize::from(m.offer(leg, i & 0xffff, chunk).first);
                        }
                    }
                    first
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 200_000);
    }

    /// What the table should decide, with unbounded memory: a number is a duplicate if it was
    /// let through less than the window ago.
    #[derive(Default)]
    struct Model {
        passed: HashMap<u64, u64>,
    }

    impl Model {
        fn offer(&mut self, seq: u64, now: u64, window: u64) -> bool {
            match self.passed.get(&seq) {
                Some(&t) if now - t < window => false,
                _ => {
                    self.passed.insert(seq, now);
                    true
                }
            }
        }
    }

    /// One packet of a two-leg run: which leg, its true sequence number, when.
    fn run(
        sequence: Sequence,
        window: u32,
        packets: &[(usize, u64, u64)],
    ) -> (Vec<bool>, Vec<bool>) {
        let m = MergeState::new(sequence, 2, window, DEFAULT_SLOTS);
        let mut model = Model::default();
        let wire = |s: u64| match sequence {
            Sequence::Rtp => s & 0xffff,
            Sequence::Counter { bytes: 4, .. } => s & 0xffff_ffff,
            _ => s,
        };
        let got = packets
            .iter()
            .map(|&(leg, s, t)| m.offer(leg, wire(s), t).first)
            .collect();
        let want = packets
            .iter()
            .map(|&(_, s, t)| model.offer(s, t, u64::from(window)))
            .collect();
        (got, want)
    }

    /// Two legs of the same numbers from `start`, each with its own losses, the second
    /// `skew` packets behind, both at one packet per `step` ms (times never go back).
    fn legs(
        start: u64,
        n: u64,
        skew: u64,
        step: u64,
        lost: &[(bool, bool)],
    ) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::new();
        for i in 0..n + skew {
            let t = i * step;
            if i < n && !lost[i as usize % lost.len()].0 {
                out.push((0, start + i, t));
            }
            if i >= skew && !lost[(i - skew) as usize % lost.len()].1 {
                out.push((1, start + i - skew, t));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn two_lossy_legs_match_the_model(
            start in prop_oneof![Just(0u64), Just(65_000), Just(u64::MAX - 3_300), 0u64..1 << 40],
            n in 1u64..3000,
            skew in 0u64..200,
            lost in proptest::collection::vec((any::<bool>(), any::<bool>()), 1..50),
            kind in 0usize..3,
        ) {
            let sequence = [
                Sequence::Rtp,
                Sequence::Counter { offset: 0, bytes: 4 },
                Sequence::Counter { offset: 0, bytes: 8 },
            ][kind];
            let start = if kind == 1 { start & 0xffff_ffff } else { start };
            // (u32 counters wrap: their state sees a jump back, a restart, not a sequence.)
            let start = if kind == 1 { start.min(0xffff_ffff - 3_300) } else { start };
            let packets = legs(start, n, skew, 0, &lost);
            let (got, want) = run(sequence, 500, &packets);
            prop_assert_eq!(got, want);
        }

        #[test]
        fn reordering_within_the_window_matches_the_model(
            n in 1usize..2000,
            swaps in proptest::collection::vec((0usize..2000, 1usize..20), 0..200),
            leg_of in proptest::collection::vec(0usize..2, 1..64),
        ) {
            // One stream split over two legs with each number twice, locally reordered.
            let mut seqs: Vec<u64> = (0..n as u64).flat_map(|s| [s, s]).collect();
            for &(at, by) in &swaps {
                let (a, b) = (at % seqs.len(), (at + by) % seqs.len());
                seqs.swap(a, b);
            }
            let packets: Vec<_> = seqs
                .iter()
                .enumerate()
                .map(|(i, &s)| (leg_of[i % leg_of.len()], s + 65_500, i as u64 / 100))
                .collect();
            let (got, want) = run(Sequence::Rtp, 500, &packets);
            prop_assert_eq!(got, want);
        }

        #[test]
        fn restarts_after_the_window_match_the_model(
            first in 0u64..60_000,
            again in 0u64..60_000,
            n in 1u64..500,
            pause in 501u64..5_000,
            kind in 0usize..2,
        ) {
            let sequence = [Sequence::Rtp, Sequence::Counter { offset: 0, bytes: 8 }][kind];
            let mut packets = legs(first, n, 3, 1, &[(false, false)]);
            let t0 = packets.last().map_or(0, |p| p.2) + pause;
            packets.extend(
                legs(again, n, 3, 1, &[(false, false)])
                    .into_iter()
                    .map(|(l, s, t)| (l, s, t0 + t)),
            );
            let (got, want) = run(sequence, 500, &packets);
            prop_assert_eq!(got, want);
        }

        #[test]
        fn relayed_numbers_and_holes_add_up(
            n in 1u64..3000,
            lost in proptest::collection::vec((any::<bool>(), any::<bool>()), 1..40),
            skew in 0u64..100,
        ) {
            let m = MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS);
            let packets = legs(40_000, n, skew, 0, &lost);
            let (mut relayed, mut opened, mut filled) = (0u64, 0u64, 0u64);
            let mut gaps = [0u64; 2];
            for &(leg, s, t) in &packets {
                let o = m.offer(leg, s & 0xffff, t);
                relayed += u64::from(o.first);
                opened += o.holes_opened;
                filled += u64::from(o.hole_filled);
                gaps[leg] += o.leg_gaps;
            }
            let carried: std::collections::BTreeSet<u64> = packets.iter().map(|p| p.1).collect();
            prop_assert_eq!(relayed, carried.len() as u64);
            // Holes still open: numbers between the first and last relayed that no leg carried.
            let open = match (carried.first(), carried.last()) {
                (Some(lo), Some(hi)) => hi - lo + 1 - carried.len() as u64,
                _ => 0,
            };
            prop_assert!(opened >= filled, "{} opened, {} filled", opened, filled);
            prop_assert_eq!(opened - filled, open);
            for (leg, &got) in gaps.iter().enumerate() {
                let mine: Vec<u64> = packets.iter().filter(|p| p.0 == leg).map(|p| p.1).collect();
                let want = match (mine.first(), mine.last()) {
                    (Some(a), Some(b)) => b - a + 1 - mine.len() as u64,
                    _ => 0,
                };
                prop_assert_eq!(got, want, "leg {}", leg);
            }
        }
    }
}
