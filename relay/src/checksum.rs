//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

use std::net::{Ipv4Addr, Ipv6Addr};

/// One's-complement sum of `data` as big-endian 16-bit words (an odd byte is padded with
/// zero), folded to 16 bits, starting from `initial`.
pub fn sum(initial: u32, data: &[u8]) -> u16 {
    let mut acc = u64::from(initial);
    let (words, rest) = data.as_chunks::<2>();
    for w in words {
        acc += u64::from(u16::from_be_bytes(*w));
    }
    if let [last] = rest {
        acc += u64::from(*last) << 8;
    }
    fold(acc)
}

pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum field value for `data` (with its checksum field zeroed).
pub fn checksum(data: &[u8]) -> u16 {
    !sum(0, data)
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word of the covered data changes from
/// `old` to `new`: HC' = ~(~HC + ~m + m').
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let acc = u64::from(!check) + u64::from(!old) + u64::from(new);
    !fold(acc)
}

/// As [`update16`] for a 32-bit field (two words), such as an IPv4 address.
pub fn update32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let c = update16(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    update16(
        c,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

/// What a field's change from `old` to `new` adds to a one's-complement sum (RFC 1624 eqn. 3's
/// `~m + m'`, word by word, unfolded): worked out once, it updates any number of checksums
/// with [`update_by`]. Equal fields add nothing (not `0xffff`, which is zero too but would
/// turn a sum of zero into `0xffff`).
pub fn delta(old: &[u8], new: &[u8]) -> u64 {
    debug_assert_eq!(old.len(), new.len());
    let (old, new) = (old.as_chunks::<2>().0, new.as_chunks::<2>().0);
    old.iter()
        .zip(new)
        .filter(|(o, n)| o != n)
        .map(|(o, n)| u64::from(!u16::from_be_bytes(*o)) + u64::from(u16::from_be_bytes(*n)))
        .sum()
}

/// As [`delta`] for one 16-bit word.
pub fn delta16(old: u16, new: u16) -> u64 {
    if old == new {
        0
    } else {
        u64::from(!old) + u64::from(new)
    }
}

/// The checksum after changes whose [`delta`]s add up to `add`: HC' = ~(~HC + Σ(~m + m')).
pub fn update_by(check: u16, add: u64) -> u16 {
    !fold(u64::from(!check) + add)
}

/// As [`update16`] for a field of any even length, word by word: an IPv6 address.
pub fn update_words(check: u16, old: &[u8], new: &[u8]) -> u16 {
    debug_assert_eq!(old.len(), new.len());
    let (old, new) = (old.as_chunks::<2>().0, new.as_chunks::<2>().0);
    old.iter().zip(new).fold(check, |c, (o, n)| {
        update16(c, u16::from_be_bytes(*o), u16::from_be_bytes(*n))
    })
}

/// The IPv6 pseudo-header (RFC 8200 section 8.1) of a UDP datagram of `udp_len` bytes, summed
/// and folded but not complemented: what a sender that leaves the checksum to its NIC (or to
/// the peer of a veth) writes into the checksum field.
pub fn pseudo_ipv6(src: Ipv6Addr, dst: Ipv6Addr, udp_len: u32) -> u16 {
    // The data path asks this of every IPv6 frame it receives, so the addresses are added in
    // 32-bit pieces rather than 16-bit words: 2^16 = 1 modulo 0xffff, so a number is
    // congruent to the sum of its 16-bit words, and folding keeps that.
    let pieces = |a: Ipv6Addr| -> u64 {
        let b = a.to_bits();
        (0..4).map(|i| u64::from((b >> (32 * i)) as u32)).sum()
    };
    fold(pieces(src) + pieces(dst) + u64::from(udp_len) + u64::from(crate::wire::IPPROTO_UDP))
}

/// As [`pseudo_ipv6`] for the IPv4 pseudo-header (RFC 768).
pub fn pseudo_ipv4(src: Ipv4Addr, dst: Ipv4Addr, udp_len: u16) -> u16 {
    fold(
        u64::from(src.to_bits())
            + u64::from(dst.to_bits())
            + u64::from(udp_len)
            + u64::from(crate::wire::IPPROTO_UDP),
    )
}

/// The UDP checksum of `udp` (header and payload, checksum field zeroed) over the IPv6
/// pseudo-header (RFC 8200 section 8.1). Zero is sent as 0xffff: in IPv6 a zero UDP checksum
/// is not allowed.
pub fn udp_ipv6(src: Ipv6Addr, dst: Ipv6Addr, udp: &[u8]) -> u16 {
    let partial = u32::from(pseudo_ipv6(src, dst, udp.len() as u32));
    match !sum(partial, udp) {
        0 => 0xffff,
        c => c,
    }
}

/// The UDP checksum of `udp` (header and payload, checksum field zeroed) over the IPv4
/// pseudo-header, as a sender computes it from scratch. Zero is sent as 0xffff (RFC 768).
pub fn udp_ipv4(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> u16 {
    let partial = u32::from(pseudo_ipv4(src, dst, udp.len() as u16));
    match !sum(partial, udp) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc1071_example() {
        // The worked example in RFC 1071 section 3: the sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(0, &data), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A header captured on the wire, checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(sum(0, &h), 0xffff);
    }

    proptest! {
        /// The pseudo-header sums are those of the headers RFC 768 and RFC 8200 lay out.
        #[test]
        fn pseudo_header_sums_match_the_laid_out_headers(
            src in any::<[u8; 16]>(),
            dst in any::<[u8; 16]>(),
            len in any::<u32>(),
        ) {
            let mut v6 = [0u8; 40];
            v6[0..16].copy_from_slice(&src);
            v6[16..32].copy_from_slice(&dst);
            v6[32..36].copy_from_slice(&len.to_be_bytes());
            v6[39] = 17;
            prop_assert_eq!(pseudo_ipv6(src.into(), dst.into(), len), sum(0, &v6));
            let (s4, d4) = ([src[0], src[1], src[2], src[3]], [dst[0], dst[1], dst[2], dst[3]]);
            let mut v4 = [0u8; 12];
            v4[0..4].copy_from_slice(&s4);
            v4[4..8].copy_from_slice(&d4);
            v4[9] = 17;
            v4[10..12].copy_from_slice(&(len as u16).to_be_bytes());
            prop_assert_eq!(pseudo_ipv4(s4.into(), d4.into(), len as u16), sum(0, &v4));
        }

        #[test]
        fn incremental_matches_recompute(
            mut data in proptest::collection::vec(any::<u8>(), 2..64),
            word in any::<prop::sample::Index>(),
            new in any::<u16>(),
        ) {
            if data.len() % 2 == 1 { data.pop(); }
            let at = word.index(data.len() / 2) * 2;
            let before = checksum(&data);
            let old = u16::from_be_bytes([data[at], data[at + 1]]);
            data[at..at + 2].copy_from_slice(&new.to_be_bytes());
            let after = checksum(&data);
            let inc = update16(before, old, new);
            // One's complement has two zeros; a receiver verifies either, so compare sums.
            prop_assert!(inc == after || (inc == 0xffff && after == 0) || (inc == 0 && after == 0xffff),
                "incremental {inc:#06x} vs recomputed {after:#06x}");
        }
    }
}
