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
//! RTP carries more than the sequence number: RTCP that reaches the rule's port (a sender that
//! multiplexes it, RFC 5761) is no part of the stream and is refused before its length field is
//! read as a number, and the SSRC names the stream. Each leg remembers the SSRC it brings; a
//! leg that brings a new one first starts a new stream: its numbers go on the table far above
//! anything the old stream let through, so none of them is a duplicate or a gap of the old
//! one, and the other legs join the new stream when their SSRC changes too (until then their
//! packets are the old stream's: stale, dropped).
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

/// What the merge reads from a packet: its sequence number and, in RTP, the stream's SSRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numbered {
    pub seq: u64,
    pub ssrc: Option<u32>,
}

/// Why a packet has no number the merge can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unnumbered {
    /// RTCP on an RTP rule: its bytes 2-3 are a length, not a sequence number.
    Rtcp,
    /// Not RTP version 2 with a whole fixed header, or too short for the counter.
    Malformed,
}

impl Sequence {
    /// The sequence number of a datagram with this UDP payload, if it carries one: RTP version
    /// 2 with a whole fixed header that is not RTCP, or a payload long enough for the counter.
    pub fn read(self, payload: &[u8]) -> Result<Numbered, Unnumbered> {
        match self {
            Sequence::Rtp => {
                // RTCP first: an RR or a BYE alone is 8 bytes, shorter than an RTP header.
                match payload {
                    [first, second, ..] if first >> 6 == 2 && is_rtcp(*second) => {
                        return Err(Unnumbered::Rtcp);
                    }
                    _ => {}
                }
                let h = payload.get(..RTP_HEADER).ok_or(Unnumbered::Malformed)?;
                if h[0] >> 6 != 2 {
                    return Err(Unnumbered::Malformed);
                }
                Ok(Numbered {
                    seq: u64::from(u16::from_be_bytes([h[2], h[3]])),
                    ssrc: Some(u32::from_be_bytes([h[8], h[9], h[10], h[11]])),
                })
            }
            Sequence::Counter { offset, bytes } => {
                let b = offset
                    .checked_add(bytes)
                    .and_then(|end| payload.get(offset..end))
                    .ok_or(Unnumbered::Malformed)?;
                let seq = match bytes {
                    4 => u64::from(u32::from_be_bytes(b.try_into().expect("4 bytes"))),
                    8 => u64::from_be_bytes(b.try_into().expect("8 bytes")),
                    _ => return Err(Unnumbered::Malformed),
                };
                Ok(Numbered { seq, ssrc: None })
            }
        }
    }
}

/// Whether an RTP version 2 packet with this second byte is RTCP: packet types 192-223, which
/// read as RTP are payload types 64-95 with the marker bit set (RFC 5761 section 4: RTP does
/// not use them, so that the two can share a port). Among them SR, RR, SDES, BYE and APP
/// (200-204, PT 72-76 with the marker), and the feedback and XR reports a reduced-size RTCP
/// sender (RFC 5506) may send alone.
fn is_rtcp(second: u8) -> bool {
    (192..=223).contains(&second)
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

/// The table's stream word: a generation (16 bits, counted modulo) over where the stream's
/// numbers start on the table, in units of 2^16 (48 bits: RTP numbers extend to 64).
const START_BITS: u32 = 48;
const START_MASK: u64 = (1 << START_BITS) - 1;
const GEN_MASK: u64 = 0xffff;

/// A leg's stream word: a bit saying it brought an SSRC, the generation it belongs to (16
/// bits), the SSRC (32).
const LEG_SEEN: u64 = 1 << 63;
const LEG_GEN_SHIFT: u32 = 32;

fn generation(stream: u64) -> u64 {
    stream >> START_BITS
}

fn start(stream: u64) -> u64 {
    (stream & START_MASK) << 16
}

fn leg_generation(leg: u64) -> u64 {
    (leg >> LEG_GEN_SHIFT) & GEN_MASK
}

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
    /// Its leg brought a new SSRC before any other: a new stream starts with this packet (and
    /// it is relayed unless a copy beat it).
    pub new_stream: bool,
    /// Its leg's SSRC is one the merge has left (another leg started a new stream and this
    /// one has not changed yet): dropped, never relayed.
    pub stale: bool,
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
    /// Which stream the table holds: the legs read it on every packet, a new SSRC writes it.
    stream: CachePadded<Stream>,
    /// Each leg's marks, on a cache line of its own.
    legs: Box<[CachePadded<Leg>]>,
}

#[derive(Debug)]
struct Stream {
    /// Its generation and where its numbers start (see `generation`, `start`).
    current: AtomicU64,
    /// `LEG_SEEN` and the SSRC of the stream the table left last (0 before): a leg whose
    /// first packet comes after another leg started a new stream is on the old one if it
    /// brings this SSRC.
    left: AtomicU64,
}

#[derive(Debug)]
struct Leg {
    /// Highest sequence number the leg brought, + 1.
    high: AtomicU64,
    /// Its SSRC and the generation it belongs to (0 before the first; see `LEG_SEEN`).
    stream: AtomicU64,
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
            stream: CachePadded::new(Stream {
                current: AtomicU64::new(RTP_BASE >> 16),
                left: AtomicU64::new(0),
            }),
            legs: (0..legs)
                .map(|_| {
                    CachePadded::new(Leg {
                        high: AtomicU64::new(NONE),
                        stream: AtomicU64::new(0),
                    })
                })
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
        self.legs.len()
    }

    /// How far back (in sequence numbers) the table remembers.
    fn horizon(&self) -> u64 {
        self.mask + 1
    }

    /// Decides one packet of leg `leg` with sequence number `raw` (as read from it, with no
    /// SSRC) at `now_ms` on the caller's monotonic clock.
    pub fn offer(&self, leg: usize, raw: u64, now_ms: u64) -> Offer {
        self.offer_numbered(
            leg,
            Numbered {
                seq: raw,
                ssrc: None,
            },
            now_ms,
        )
    }

    /// Decides one packet of leg `leg` as read from it, SSRC and all.
    pub fn offer_numbered(&self, leg: usize, packet: Numbered, now_ms: u64) -> Offer {
        let (from, new_stream) = match packet.ssrc {
            Some(ssrc) => match self.stream_of(leg, ssrc) {
                Some(s) => s,
                None => {
                    return Offer {
                        first: false,
                        leg_gaps: 0,
                        holes_opened: 0,
                        hole_filled: false,
                        restart: false,
                        new_stream: false,
                        stale: true,
                    };
                }
            },
            None => (start(self.stream.current.load(Ordering::Acquire)), false),
        };
        let seq = self.extend(packet.seq, from);
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
        let leg_gaps = self.advance(&self.legs[leg].high, seq, restart).0;
        let (holes_opened, hole_filled) = if first {
            let (above, behind) = self.advance(&self.high, seq, restart);
            // A packet below the lowest let through opens the holes between them (they were
            // not seen yet either); one between the lowest and the highest fills one. A new
            // stream's lowest is its first.
            let low = if restart || new_stream {
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
            new_stream,
            stale: false,
        }
    }

    /// Where on the table the numbers of leg `leg`'s packet with `ssrc` start, and whether
    /// the packet starts a new stream; `None` for a packet of a stream the table has left.
    fn stream_of(&self, leg: usize, ssrc: u32) -> Option<(u64, bool)> {
        let mine = &self.legs[leg].stream;
        let belongs =
            |generation: u64| LEG_SEEN | (generation & GEN_MASK) << LEG_GEN_SHIFT | u64::from(ssrc);
        // Each pass that does not return lost a compare-and-swap to another worker's change,
        // which is then seen on the next.
        loop {
            let was = mine.load(Ordering::Acquire);
            let table = self.stream.current.load(Ordering::Acquire);
            let current = generation(table);
            if was & LEG_SEEN != 0 && was as u32 == ssrc {
                // The common packet: one load of each word, nothing written.
                return (leg_generation(was) == current).then_some((start(table), false));
            }
            if was & LEG_SEEN == 0 || leg_generation(was) != current {
                // The leg's first SSRC, or a new one after another leg started a new stream:
                // this is that stream (the legs of a merge carry the same one, or one each),
                // unless it is the first and the one the table left.
                let left = was & LEG_SEEN == 0
                    && self.stream.left.load(Ordering::Acquire) == LEG_SEEN | u64::from(ssrc);
                let joins = belongs(current.wrapping_sub(u64::from(left)));
                if mine
                    .compare_exchange(was, joins, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return (!left).then_some((start(table), false));
                }
                continue;
            }
            // The first leg with a new SSRC: the new stream's numbers start above the horizon
            // past the highest let through (and a wrap's margin either side), so none of them
            // finds a slot or a mark of the old stream's.
            let high = self.high.load(Ordering::Acquire).saturating_sub(1);
            let from = (high >> 16).max(table & START_MASK) + self.horizon().div_ceil(1 << 16) + 2;
            let next = ((current + 1) & GEN_MASK) << START_BITS | (from & START_MASK);
            // Written before the switch, so that a leg that reads the new stream also reads
            // which one it left (legs racing to start the same stream leave the same one).
            self.stream
                .left
                .store(LEG_SEEN | (was & 0xffff_ffff), Ordering::Release);
            if self
                .stream
                .current
                .compare_exchange(table, next, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            mine.store(belongs(current + 1), Ordering::Release);
            return Some((start(next), true));
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
    /// the highest let through (RFC 3550 A.1), the first of a stream from the stream's
    /// `from`; counters as they are.
    fn extend(&self, raw: u64, from: u64) -> u64 {
        match self.sequence {
            Sequence::Counter { .. } => raw,
            Sequence::Rtp => {
                let high = self.high.load(Ordering::Acquire);
                if high == NONE || high - 1 < from {
                    return from + raw;
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
        rtp_of(7, seq)
    }

    /// An RTP packet of stream `ssrc` (payload type 96, the marker set on odd numbers, as a
    /// video sender sets it at the end of each frame).
    fn rtp_of(ssrc: u32, seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 96 | (seq as u8 & 1) << 7, 0, 0, 0, 0, 0, 1];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.push(0xaa);
        p
    }

    /// An RTCP packet of type `pt` as a sender sends it (length in 32-bit words less one, the
    /// sender's SSRC, zeroes for the rest).
    fn rtcp(pt: u8, words: u16) -> Vec<u8> {
        let mut p = vec![0x80, pt];
        p.extend_from_slice(&words.to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes());
        p.resize(4 * (usize::from(words) + 1), 0);
        p
    }

    /// Every second byte: RTCP exactly when RFC 5761 says a receiver demultiplexes it as such
    /// (packet types 192-223; as RTP, payload types 64-95 with the marker). RTP payload types
    /// 0-63 and 96-127, with or without the marker, are RTP.
    #[test]
    fn rtcp_is_refused_and_rtp_read_for_every_second_byte() {
        for second in 0..=255u8 {
            let mut p = rtp(513);
            p[1] = second;
            let marker = second & 0x80 != 0;
            let pt = second & 0x7f;
            let got = Sequence::Rtp.read(&p);
            if marker && (64..=95).contains(&pt) {
                assert_eq!(got, Err(Unnumbered::Rtcp), "{second}");
            } else {
                assert_eq!(got.map(|n| n.seq), Ok(513), "{second}");
            }
        }
        for pt in 200..=204 {
            assert_eq!(Sequence::Rtp.read(&rtcp(pt, 6)), Err(Unnumbered::Rtcp));
        }
        // A counter does not look at RTP's bytes.
        let c = Sequence::Counter {
            offset: 0,
            bytes: 4,
        };
        assert_eq!(c.read(&rtcp(200, 6)).map(|n| n.seq), Ok(0x80c8_0006));
    }

    /// What a leg's packet became, read from its payload and offered as the worker does.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fate {
        Refused(Unnumbered),
        Offered(Offer),
    }

    fn deliver(m: &MergeState, leg: usize, payload: &[u8], now: u64) -> Fate {
        match m.sequence().read(payload) {
            Ok(n) => Fate::Offered(m.offer_numbered(leg, n, now)),
            Err(e) => Fate::Refused(e),
        }
    }

    /// ST 2110 senders send RTCP to the RTP port + 1; a leg on any port takes it. Interleaved
    /// with the stream on both legs, it takes no number: across the wrap of the sequence
    /// number (where an RTCP length of 6 read as a number jumped `high` ahead to 65,542 and
    /// the real 6 came as a duplicate), every RTP number goes out once, with no gap, no hole.
    #[test]
    fn rtcp_interleaved_on_both_legs_takes_no_number() {
        let m = MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS);
        let reports = [
            rtcp(200, 6),
            rtcp(201, 1),
            rtcp(202, 3),
            rtcp(203, 1),
            rtcp(204, 2),
        ];
        let mut relayed = HashMap::new();
        let mut refused = 0;
        for i in 0..400u64 {
            let seq = (65_300 + i) as u16;
            for leg in 0..2 {
                let mut fates = vec![deliver(&m, leg, &rtp(seq), i)];
                if i % 7 == leg as u64 {
                    fates.push(deliver(&m, leg, &reports[(i / 7) as usize % 5], i));
                }
                for f in fates {
                    match f {
                        Fate::Refused(Unnumbered::Rtcp) => refused += 1,
                        Fate::Offered(o) => {
                            assert!(
                                o.leg_gaps == 0 && o.holes_opened == 0 && !o.stale,
                                "{seq} on leg {leg}: {o:?}"
                            );
                            *relayed.entry(seq).or_insert(0) += u32::from(o.first);
                        }
                        f => panic!("{seq}: {f:?}"),
                    }
                }
            }
        }
        assert_eq!(refused, 2 * 400 / 7 + 1);
        assert_eq!(relayed.len(), 400);
        assert!(relayed.values().all(|&n| n == 1), "{relayed:?}");
    }

    /// A sender that restarts picks a new SSRC and a new first number (RFC 3550): here just
    /// behind the old stream's last, then just ahead of it, each a window's fraction later.
    /// The new stream is not the old one's duplicates (they were dropped) nor its gaps (they
    /// were counted), and it is counted once though both legs bring it.
    #[test]
    fn a_second_ssrc_is_a_new_stream() {
        let m = MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS);
        let mut t = 0;
        let mut new_streams = 0;
        for (ssrc, first) in [(1u32, 1000u16), (2, 1090), (3, 1200), (1, 1000)] {
            for seq in first..first + 100 {
                t += 1;
                for leg in 0..2 {
                    let Fate::Offered(o) = deliver(&m, leg, &rtp_of(ssrc, seq), t) else {
                        panic!("{ssrc}/{seq}");
                    };
                    assert_eq!(o.first, leg == 0, "{ssrc}/{seq} on leg {leg}: {o:?}");
                    assert!(
                        o.leg_gaps == 0 && o.holes_opened == 0 && !o.stale && !o.hole_filled,
                        "{ssrc}/{seq}: {o:?}"
                    );
                    new_streams += u32::from(o.new_stream);
                }
            }
        }
        assert_eq!(
            new_streams, 3,
            "1 -> 2 -> 3 -> 1: the first SSRC is no change"
        );
    }

    /// The leg that lags brings the old stream's last packets after the other leg started
    /// the new one: they are stale (the other leg relayed them), and the lagging leg joins
    /// the new stream when its SSRC changes, with no second new stream. Legs whose senders
    /// use an SSRC of their own each (two encoders) merge as one, and a restart of both is
    /// one new stream.
    #[test]
    fn a_lagging_leg_joins_the_new_stream() {
        let m = MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS);
        let offer = |leg, ssrc, seq, t| match deliver(&m, leg, &rtp_of(ssrc, seq), t) {
            Fate::Offered(o) => o,
            f => panic!("{f:?}"),
        };
        for seq in 0..10 {
            assert!(offer(0, 10, seq, 0).first);
            if seq >= 5 {
                assert!(!offer(1, 11, seq - 5, 0).first);
            }
        }
        // Leg 0 restarted first (SSRC 20), leg 1 (SSRC 11 of its own) is 5 packets behind.
        assert!(offer(0, 20, 7, 1).new_stream);
        for seq in 5..10 {
            let o = offer(1, 11, seq, 1);
            assert!(o.stale && !o.first, "{seq}: {o:?}");
        }
        for seq in 8..20 {
            assert!(offer(0, 20, seq, 2).first);
        }
        for seq in 7..20 {
            let o = offer(1, 21, seq, 2);
            assert!(
                !o.first && !o.new_stream && !o.stale && o.leg_gaps == 0,
                "{seq}: {o:?}"
            );
        }
        // And the lagging leg carries the stream on when the other fails.
        let o = offer(1, 21, 20, 3);
        assert!(o.first && o.holes_opened == 0, "{o:?}");
    }

    /// Two workers, one leg each, switch SSRC at the same packet: one new stream, each
    /// number of both streams relayed once.
    #[test]
    fn concurrent_legs_switching_ssrc_start_one_stream() {
        let (first, new) = two_workers(100, |i, chunk| {
            let ssrc = if chunk < 50 { 1 } else { 2 };
            let seq = (i + 40_000) & 0xffff;
            (
                Numbered {
                    seq,
                    ssrc: Some(ssrc),
                },
                chunk / 10,
            )
        });
        assert_eq!((first, new), (100_000, 1));
    }

    #[test]
    fn reads_rtp_and_counters() {
        let numbered = |seq, ssrc| Ok(Numbered { seq, ssrc });
        assert_eq!(Sequence::Rtp.read(&rtp(65535)), numbered(65535, Some(7)));
        let mut v1 = rtp(5);
        v1[0] = 0x40;
        assert_eq!(
            Sequence::Rtp.read(&v1),
            Err(Unnumbered::Malformed),
            "RTP version 1"
        );
        assert_eq!(
            Sequence::Rtp.read(&rtp(5)[..11]),
            Err(Unnumbered::Malformed),
            "short header"
        );
        let c4 = Sequence::Counter {
            offset: 2,
            bytes: 4,
        };
        assert_eq!(c4.read(&[9, 9, 0, 0, 1, 2]), numbered(0x102, None));
        assert_eq!(c4.read(&[9, 9, 0, 0, 1]), Err(Unnumbered::Malformed));
        let c8 = Sequence::Counter {
            offset: 0,
            bytes: 8,
        };
        assert_eq!(c8.read(&u64::MAX.to_be_bytes()), numbered(u64::MAX, None));
        let far = Sequence::Counter {
            offset: usize::MAX,
            bytes: 8,
        };
        assert_eq!(
            far.read(&[0; 16]),
            Err(Unnumbered::Malformed),
            "offset overflow"
        );
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

    /// Two threads as two workers, each with a leg of the same `chunks` thousand packets
    /// (`packet(i, chunk)`: what it reads and when), kept within a thousand packets of each
    /// other by a barrier: how many were relayed, and how many started a new stream.
    fn two_workers(chunks: u64, packet: fn(u64, u64) -> (Numbered, u64)) -> (usize, usize) {
        let m = std::sync::Arc::new(MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|leg| {
                let (m, barrier) = (m.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let (mut first, mut new) = (0, 0);
                    for chunk in 0..chunks {
                        barrier.wait();
                        for i in chunk * 1000..(chunk + 1) * 1000 {
                            let (n, now) = packet(i, chunk);
                            let o = m.offer_numbered(leg, n, now);
                            first += usize::from(o.first);
                            new += usize::from(o.new_stream);
                        }
                    }
                    (first, new)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    #[test]
    fn concurrent_legs_relay_each_number_once() {
        // 200,000 numbers, a clock tick per chunk.
        let (first, _) = two_workers(200, |i, chunk| {
            let seq = i & 0xffff;
            (Numbered { seq, ssrc: None }, chunk)
        });
        assert_eq!(first, 200_000);
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

        /// One stream, then another SSRC from any first number, on two legs `skew` packets
        /// apart, either leading: each packet of both streams is relayed once, the lagging
        /// leg's old packets after the switch are stale, one new stream, no gap, no hole.
        #[test]
        fn a_second_ssrc_from_any_number_relays_each_packet_once(
            a_first in any::<u16>(),
            b_first in any::<u16>(),
            n_a in 1u64..1500,
            n_b in 1u64..1500,
            skew in 0u64..60,
            lead in 0usize..2,
        ) {
            let m = MergeState::new(Sequence::Rtp, 2, 500, DEFAULT_SLOTS);
            let packet = |k: u64| {
                if k < n_a {
                    rtp_of(0xa, a_first.wrapping_add(k as u16))
                } else {
                    rtp_of(0xb, b_first.wrapping_add((k - n_a) as u16))
                }
            };
            let mut relayed = vec![0u32; (n_a + n_b) as usize];
            let (mut stale, mut new_streams) = (0u64, 0u64);
            for i in 0..n_a + n_b + skew {
                let lag = i.checked_sub(skew).filter(|&k| k < n_a + n_b);
                let lead_k = (i < n_a + n_b).then_some(i);
                for (leg, k) in [(lead, lead_k), (1 - lead, lag)] {
                    let Some(k) = k else { continue };
                    let Fate::Offered(o) = deliver(&m, leg, &packet(k), i / 10) else {
                        panic!("{k}");
                    };
                    prop_assert!(o.leg_gaps == 0 && o.holes_opened == 0, "{}: {:?}", k, o);
                    relayed[k as usize] += u32::from(o.first);
                    stale += u64::from(o.stale);
                    new_streams += u64::from(o.new_stream);
                }
            }
            prop_assert!(relayed.iter().all(|&n| n == 1), "{:?}", relayed);
            prop_assert_eq!(new_streams, 1);
            prop_assert_eq!(stale, skew.min(n_a));
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
