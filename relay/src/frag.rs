//! IP fragments of relayed UDP datagrams.
//!
//! A datagram larger than the path's MTU arrives as fragments, and only the first carries the
//! UDP header, so only the first can be matched against the rules. The XDP program remembers
//! what each first fragment matched in an LRU map (`FRAGS`, keyed by ingress, VLAN, source,
//! group and identification) and steers the later fragments by it; the data path keeps the same
//! memory here, per worker (a datagram's fragments share their addresses, which is all an rx
//! queue's hash sees of them, so they reach one socket and one worker). A later fragment whose
//! first has not been seen is passed to the kernel: the relay never reassembles.
//!
//! Each fragment is rewritten on its own: the IP header of every fragment (TTL or hop limit,
//! group, the IPv4 header checksum), and in the first also the UDP header (port, checksum).
//! The UDP checksum is updated incrementally (RFC 1624) in the first fragment although the
//! data it covers is spread over all of them: the checksum is a one's-complement sum over the
//! pseudo-header and the whole datagram, and a sum does not care where its words are. The
//! fields that change (the group, in the pseudo-header, and the port, in the UDP header) are
//! known without the rest, so `~(~HC + ~m + m')` is the checksum of the datagram with the new
//! values, which is what the receiver verifies after reassembly. The later fragments' data
//! are never read or changed.

use std::net::IpAddr;

use relay_common::{FragKey, frame_vlan};

use crate::{
    checksum::{update16, update32},
    rewrite::{OutputAction, RewriteError, rewrite},
    rules::key_addr,
    wire::{EthernetFrame, Flow, Fragment, Ipv4Packet, Ipv6Packet},
};

/// The fragment map's key for a fragment of `flow` that arrived on `ifindex`.
pub fn key(ifindex: u32, flow: &Flow, frag: Fragment) -> FragKey {
    FragKey {
        ifindex,
        id: frag.id,
        source: key_addr(flow.source),
        group: key_addr(flow.group),
        vlan: frame_vlan(flow.tci),
        pad: 0,
    }
}

/// The rules the first fragments of recent datagrams matched: a direct-mapped table, so its
/// size is fixed and a lookup is one probe; a newer datagram that lands on an older one's slot
/// replaces it, as the XDP program's LRU map lets the oldest go.
pub struct FragTable {
    slots: Box<[Option<Slot>]>,
}

#[derive(Clone, Copy)]
struct Slot {
    key: FragKey,
    rule: u32,
    /// The plan generation `rule` indexes into: a reload renumbers the rules.
    plan: u64,
}

impl FragTable {
    /// A table of `slots` entries, rounded up to a power of two.
    pub fn new(slots: usize) -> Self {
        Self {
            slots: vec![None; slots.next_power_of_two()].into_boxed_slice(),
        }
    }

    fn index(&self, key: &FragKey) -> usize {
        use std::hash::BuildHasher;
        let h = rustc_hash::FxBuildHasher.hash_one(key);
        // FxHash mixes into the high bits.
        (h >> 32) as usize & (self.slots.len() - 1)
    }

    /// Remembers that the datagram of `key` matched `rule` under plan `plan`.
    pub fn insert(&mut self, key: FragKey, rule: u32, plan: u64) {
        let i = self.index(&key);
        self.slots[i] = Some(Slot { key, rule, plan });
    }

    /// The rule the datagram of `key` matched under plan `plan`, if its first fragment was
    /// seen under that plan.
    pub fn get(&self, key: &FragKey, plan: u64) -> Option<u32> {
        self.slots[self.index(key)]
            .filter(|s| s.key == *key && s.plan == plan)
            .map(|s| s.rule)
    }
}

/// Rewrites any frame the data path relays for `action`, after its tag: a later fragment with
/// [`rewrite_later`], which leaves its data alone, anything else with [`rewrite`].
///
/// The first fragment of an IPv6 datagram with a zero UDP checksum is refused
/// ([`RewriteError::ZeroChecksumFragment`]), untouched: IPv6 receivers drop a zero checksum,
/// and the one to write instead is a sum over the whole datagram, most of which is in the
/// later fragments. Its later fragments are relayed as usual (they carry no UDP header to
/// check); without their first, receivers discard them when reassembly times out.
pub fn rewrite_packet(
    frame: &mut [u8],
    flow: &Flow,
    action: &OutputAction,
) -> Result<(), RewriteError> {
    if flow.is_later_fragment() {
        rewrite_later(frame, flow, action)
    } else if flow.frag.is_some()
        && flow.group.is_ipv6()
        && frame.get(flow.l4 + 6..flow.l4 + 8) == Some(&[0, 0])
    {
        Err(RewriteError::ZeroChecksumFragment)
    } else {
        rewrite(frame, flow, action)
    }
}

/// Rewrites a later fragment for `action`: MACs, the TTL or hop limit and the group, and the
/// IPv4 header checksum. It has no UDP header: the port and the UDP checksum live in the first
/// fragment.
pub fn rewrite_later(
    frame: &mut [u8],
    flow: &Flow,
    action: &OutputAction,
) -> Result<(), RewriteError> {
    if frame.len() < flow.l4 || flow.l4 < flow.l3 {
        return Err(RewriteError::Malformed);
    }
    let dst_mac = crate::rewrite::destination_mac(flow, action)?;
    let source = crate::rewrite::source_of(flow, action)?;
    let dst = action.destination_of(flow);
    let (head, _) = frame.split_at_mut(flow.l4);
    let (l2, l3) = head.split_at_mut(flow.l3);
    match (flow.source, source, flow.group, dst) {
        (IpAddr::V4(old_src), IpAddr::V4(src), IpAddr::V4(old), IpAddr::V4(new)) => {
            let mut ip = Ipv4Packet::new_checked(&mut *l3).map_err(|_| RewriteError::Malformed)?;
            let old_ttl = ip.ttl();
            let ttl = next_hops(old_ttl, action.ttl)?;
            // TTL shares its 16-bit word with the protocol byte.
            let proto = u16::from(ip.protocol());
            let mut sum = update16(
                ip.checksum(),
                u16::from(old_ttl) << 8 | proto,
                u16::from(ttl) << 8 | proto,
            );
            ip.set_ttl(ttl);
            if new != old {
                sum = update32(sum, old.octets(), new.octets());
                ip.set_dst_addr(new);
            }
            if src != old_src {
                sum = update32(sum, old_src.octets(), src.octets());
                ip.set_src_addr(src);
            }
            ip.set_checksum(sum);
        }
        (IpAddr::V6(_), IpAddr::V6(src), IpAddr::V6(_), IpAddr::V6(new)) => {
            let mut ip = Ipv6Packet::new_checked(&mut *l3).map_err(|_| RewriteError::Malformed)?;
            let hops = next_hops(ip.hop_limit(), action.ttl)?;
            ip.set_hop_limit(hops);
            ip.set_dst_addr(new);
            ip.set_src_addr(src);
        }
        _ => return Err(RewriteError::Malformed),
    }
    if let Some(dscp) = action.dscp {
        crate::rewrite::set_dscp(l3, dscp)?;
    }
    let mut eth = EthernetFrame::new_checked(l2).map_err(|_| RewriteError::Malformed)?;
    eth.set_dst_mac(dst_mac);
    eth.set_src_mac(action.src_mac);
    Ok(())
}

/// The TTL or hop limit to send with, or why not (as `rewrite` decides it).
fn next_hops(received: u8, set: Option<u8>) -> Result<u8, RewriteError> {
    match set {
        Some(ttl) => Ok(ttl),
        None if received <= 1 => Err(RewriteError::TtlExpired),
        None => Ok(received - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        checksum::{checksum, udp_ipv4, udp_ipv6},
        craft::{UdpFrame, build_udp_frame},
        wire::{ETH_HLEN, IPV6_HLEN, NEXTHDR_FRAGMENT, check_lengths, classify},
    };
    use proptest::prelude::*;

    const OUT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x42];

    /// Splits a whole frame's datagram into fragments of at most `chunk` data bytes (a
    /// multiple of 8), as a sender's stack would: each fragment gets the IP header (IPv4
    /// offset, MF and checksum set; IPv6 a fragment header with identification `id`).
    fn fragment(whole: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
        let flow = classify(whole).unwrap();
        let (l3, l4) = (flow.l3, flow.l4);
        let data = &whole[l4..];
        let n = data.len().div_ceil(chunk);
        (0..n)
            .map(|i| {
                let part = &data[i * chunk..((i + 1) * chunk).min(data.len())];
                let more = i + 1 < n;
                let offset = (i * chunk / 8) as u16;
                let mut f = whole[..l4].to_vec();
                if flow.group.is_ipv4() {
                    let ihl = l4 - l3;
                    let total = (ihl + part.len()) as u16;
                    f[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
                    f[l3 + 4..l3 + 6].copy_from_slice(&(id as u16).to_be_bytes());
                    let flags = offset | if more { 0x2000 } else { 0 };
                    f[l3 + 6..l3 + 8].copy_from_slice(&flags.to_be_bytes());
                    f[l3 + 10..l3 + 12].fill(0);
                    let sum = checksum(&f[l3..l4]);
                    f[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
                } else {
                    // Insert the fragment header right after the fixed header (no extension
                    // headers in these frames).
                    let next = f[l3 + 6];
                    f[l3 + 6] = NEXTHDR_FRAGMENT;
                    let mut fh = vec![next, 0];
                    fh.extend((offset << 3 | u16::from(more)).to_be_bytes());
                    fh.extend(id.to_be_bytes());
                    f.splice(l3 + IPV6_HLEN..l3 + IPV6_HLEN, fh);
                    let plen = (8 + part.len()) as u16;
                    f[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
                }
                f.extend_from_slice(part);
                f
            })
            .collect()
    }

    /// Puts fragments back together: the first one's headers (its fragment fields cleared),
    /// then every fragment's data in order.
    fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
        let first = crate::wire::classify_udp(&frags[0]).unwrap();
        let mut out = frags[0][..first.l4].to_vec();
        let l3 = first.l3;
        if first.group.is_ipv6() {
            let next = out[l3 + IPV6_HLEN];
            out.drain(l3 + IPV6_HLEN..l3 + IPV6_HLEN + 8);
            out[l3 + 6] = next;
        }
        for f in frags {
            let flow = crate::wire::classify_udp(f).unwrap();
            out.extend_from_slice(&f[flow.l4..]);
        }
        let first_l4 = crate::wire::classify_udp(&frags[0]).unwrap().l4
            - if first.group.is_ipv6() { 8 } else { 0 };
        let data_len = out.len() - first_l4;
        if first.group.is_ipv4() {
            let ihl = first_l4 - l3;
            out[l3 + 2..l3 + 4].copy_from_slice(&((ihl + data_len) as u16).to_be_bytes());
            out[l3 + 6..l3 + 8].fill(0);
            out[l3 + 10..l3 + 12].fill(0);
            let sum = checksum(&out[l3..l3 + ihl]);
            out[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
        } else {
            out[l3 + 4..l3 + 6].copy_from_slice(&(data_len as u16).to_be_bytes());
        }
        out
    }

    fn samples(payload: &[u8]) -> [UdpFrame; 2] {
        [
            UdpFrame::simple(
                "198.18.1.1".parse().unwrap(),
                "239.1.1.1".parse().unwrap(),
                5000,
                8,
                payload,
            ),
            UdpFrame::simple(
                "2001:2::1".parse().unwrap(),
                "ff18::1:1".parse().unwrap(),
                5000,
                8,
                payload,
            ),
        ]
    }

    fn action(group: Option<IpAddr>, port: Option<u16>) -> OutputAction {
        OutputAction {
            group: group.map(Into::into),
            port,
            ..OutputAction::plain(OUT_MAC)
        }
    }

    /// Rewrites each fragment as the data path does: the first with `rewrite`, the later
    /// ones with `rewrite_later`.
    fn rewrite_all(frags: &mut [Vec<u8>], a: &OutputAction) {
        for f in frags {
            let flow = classify(f).unwrap();
            assert!(flow.frag.is_some());
            check_lengths(f, &flow).unwrap();
            rewrite_packet(f, &flow, a).unwrap();
        }
    }

    /// A zero UDP checksum in the first fragment: IPv6 refuses the fragment untouched, under
    /// its own reason, and relays the later ones; IPv4 relays the datagram with the checksum
    /// left zero ("none"). A first fragment with a checksum is rewritten in both.
    #[test]
    fn a_zero_checksum_first_fragment_is_refused_over_ipv6_only() {
        let a = action(None, Some(6000));
        for s in samples(&[9; 100]) {
            let mut whole = build_udp_frame(&s);
            let l4 = classify(&whole).unwrap().l4;
            let with_sum = fragment(&whole, 48, 7);
            whole[l4 + 6..l4 + 8].fill(0);
            let mut frags = fragment(&whole, 48, 7);
            assert_eq!(frags.len(), 3);
            let v6 = s.group.is_ipv6();
            for (k, f) in frags.iter_mut().enumerate() {
                let flow = classify(f).unwrap();
                check_lengths(f, &flow).unwrap();
                let before = f.clone();
                let got = rewrite_packet(f, &flow, &a);
                if k == 0 && v6 {
                    assert_eq!(got, Err(RewriteError::ZeroChecksumFragment));
                    assert_eq!(*f, before, "refused untouched");
                } else {
                    assert_eq!(got, Ok(()), "fragment {k} of {}", s.group);
                    assert_ne!(*f, before, "rewritten");
                }
                if k == 0 && !v6 {
                    assert_eq!(
                        &f[flow.l4 + 6..flow.l4 + 8],
                        [0, 0],
                        "IPv4: none stays none"
                    );
                }
            }
            let mut first = with_sum[0].clone();
            let flow = classify(&first).unwrap();
            assert_eq!(rewrite_packet(&mut first, &flow, &a), Ok(()));
        }
    }

    #[test]
    fn fragments_classify_with_their_identification_and_offset() {
        for s in samples(&[7; 100]) {
            let frags = fragment(&build_udp_frame(&s), 48, 0x1234);
            assert_eq!(frags.len(), 3);
            let flows: Vec<Flow> = frags.iter().map(|f| classify(f).unwrap()).collect();
            // Either family's identification, IPv4's 16 bits in the low two bytes.
            let id = [0, 0, 0x12, 0x34];
            assert_eq!(flows[0].frag, Some(Fragment { id, offset: 0 }));
            assert_eq!(flows[0].port, 5000);
            assert_eq!(flows[1].frag, Some(Fragment { id, offset: 6 }));
            assert_eq!(flows[2].frag, Some(Fragment { id, offset: 12 }));
            assert!(flows[1].is_later_fragment() && flows[2].is_later_fragment());
            assert_eq!((flows[1].port, flows[1].source), (0, s.source));
            // The first fragment's UDP length is the datagram's, past its own IP packet.
            assert_eq!(check_lengths(&frags[0], &flows[0]), Ok(()));
        }
        // An IPv6 atomic fragment (offset 0, no more) is a whole datagram.
        let mut s = samples(b"x")[1].clone();
        s.ipv6_ext = vec![NEXTHDR_FRAGMENT];
        let mut f = build_udp_frame(&s);
        f[ETH_HLEN + IPV6_HLEN + 3] = 0;
        let flow = classify(&f).unwrap();
        assert_eq!((flow.frag, flow.port), (None, 5000));
    }

    #[test]
    fn the_table_remembers_per_plan_and_replaces() {
        let f = classify(&fragment(&build_udp_frame(&samples(&[1; 64])[0]), 32, 9)[0]).unwrap();
        let k = key(3, &f, f.frag.unwrap());
        let mut t = FragTable::new(8);
        assert_eq!(t.get(&k, 1), None);
        t.insert(k, 5, 1);
        assert_eq!(t.get(&k, 1), Some(5));
        assert_eq!(t.get(&k, 2), None, "a reload renumbers the rules");
        assert_eq!(t.get(&FragKey { ifindex: 4, ..k }, 1), None);
        t.insert(k, 6, 1);
        assert_eq!(t.get(&k, 1), Some(6));
    }

    proptest! {
        /// A datagram fragmented, each fragment rewritten on its own (group and port remapped,
        /// TTL decremented), and reassembled is the datagram a sender would build with the
        /// output's values: the incremental UDP checksum in the first fragment holds for the
        /// whole datagram.
        #[test]
        fn fragments_rewritten_one_by_one_reassemble_to_the_remapped_datagram(
            v6 in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 1..600),
            chunk in 1usize..40,
            remap in any::<bool>(),
            port in proptest::option::of(1u16..),
            id in any::<u32>(),
            gateway in any::<bool>(),
        ) {
            // At least two fragments: one would be a whole datagram.
            prop_assume!(8 + payload.len() > chunk * 8);
            let s = samples(&payload)[usize::from(v6)].clone();
            let id = if v6 { id } else { id & 0xffff };
            let mut frags = fragment(&build_udp_frame(&s), chunk * 8, id);
            let group: Option<IpAddr> = remap.then(|| {
                if v6 { "ff18::2:2".parse().unwrap() } else { "239.2.2.2".parse().unwrap() }
            });
            // As a gateway: to a unicast destination, from the egress's address and a port
            // of its own, in every fragment (the port and checksum in the first only).
            const HOP: [u8; 6] = [2, 0, 0, 0, 0, 0x77];
            let (dest, source): (IpAddr, IpAddr) = if v6 {
                ("2001:2:0:2::2".parse().unwrap(), "2001:2:0:2::1".parse().unwrap())
            } else {
                ("198.18.2.2".parse().unwrap(), "198.18.2.1".parse().unwrap())
            };
            let a = if gateway {
                OutputAction {
                    group: None,
                    destination: Some(dest),
                    source_spec: Some(crate::config::SourceSpec::Auto),
                    source: Some(source),
                    source_port: Some(7001),
                    next_hop_mac: Some(HOP),
                    ..action(None, port)
                }
            } else {
                action(group, port)
            };
            rewrite_all(&mut frags, &a);
            let to = if gateway { dest } else { group.unwrap_or(s.group) };
            let to_mac = if gateway { HOP } else { crate::wire::multicast_mac(to) };
            for f in &frags {
                prop_assert_eq!(&f[..6], &to_mac[..]);
                prop_assert_eq!(&f[6..12], &OUT_MAC[..]);
                if !v6 {
                    let flow = crate::wire::classify_udp(f).unwrap();
                    prop_assert_eq!(checksum(&f[flow.l3..flow.l4]), 0, "IPv4 header checksum");
                }
            }
            let whole = reassemble(&frags);
            let mut want = build_udp_frame(&UdpFrame {
                src_mac: OUT_MAC,
                group: to,
                source: if gateway { source } else { s.source },
                src_port: if gateway { 7001 } else { s.src_port },
                dst_port: port.unwrap_or(s.dst_port),
                ttl: 7,
                ..s.clone()
            });
            want[..6].copy_from_slice(&to_mac);
            // IPv4: the reassembled header keeps the identification (the sample's is 0 and
            // DF set); compare all but those bytes and the header checksum.
            let mut a = whole.clone();
            let mut b = want.clone();
            if !v6 {
                for x in [&mut a, &mut b] {
                    x[ETH_HLEN + 4..ETH_HLEN + 8].fill(0);
                    x[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
                }
            }
            let ui = crate::wire::classify_udp(&want).unwrap().l4 + 6;
            let sum = |x: &[u8]| u16::from_be_bytes([x[ui], x[ui + 1]]);
            let (sa, sb) = (sum(&a), sum(&b));
            prop_assert!(sa == sb || (sa | sb == 0xffff && (sa == 0 || sb == 0)));
            a[ui..ui + 2].fill(0);
            b[ui..ui + 2].fill(0);
            prop_assert_eq!(a, b);
            // And the receiver's check: the checksum over the reassembled datagram.
            let flow = crate::wire::classify_udp(&whole).unwrap();
            let mut z = whole[flow.l4..].to_vec();
            z[6..8].fill(0);
            let expect = match (flow.source, flow.group) {
                (IpAddr::V4(s), IpAddr::V4(g)) => udp_ipv4(s, g, &z),
                (IpAddr::V6(s), IpAddr::V6(g)) => udp_ipv6(s, g, &z),
                _ => unreachable!(),
            };
            prop_assert_eq!(sum(&whole), expect);
        }

        #[test]
        fn rewrite_later_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..80),
            l3 in 0usize..30,
            l4 in 0usize..80,
            v6 in any::<bool>(),
        ) {
            let s = &samples(b"x")[usize::from(v6)];
            let flow = Flow {
                tci: None,
                l3,
                l4,
                source: s.source,
                group: s.group,
                port: 0,
                frag: Some(Fragment { id: [0; 4], offset: 1 }),
            };
            let mut b = bytes;
            let _ = rewrite_later(&mut b, &flow, &action(None, None));
        }
    }
}
