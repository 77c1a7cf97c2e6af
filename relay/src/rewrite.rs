//! Per-output rewrite of a relayed frame, in place: MACs, group, port, TTL and both checksums.
//!
//! Checksums are updated incrementally (RFC 1624) from the fields that change, so the cost does
//! not grow with the payload and a payload the relay never reads stays unread.

use std::net::Ipv4Addr;

use crate::{
    checksum::{update16, update32},
    wire::{EthernetFrame, Flow, Ipv4Packet, UdpPacket, ipv4_multicast_mac},
};

/// What one output does to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputAction {
    /// The egress interface's MAC: the relayed frame's source.
    pub src_mac: [u8; 6],
    /// New destination group, if the output remaps it.
    pub group: Option<Ipv4Addr>,
    /// New destination UDP port, if the output remaps it.
    pub port: Option<u16>,
    /// A TTL to set instead of decrementing the received one.
    pub ttl: Option<u8>,
}

/// Why a frame was not sent on an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteError {
    /// It arrived with TTL 0 or 1 and the output does not set the TTL: forwarding it would
    /// exceed its scope.
    TtlExpired,
    /// The frame does not hold the headers `flow` describes.
    Malformed,
}

/// Rewrites `frame` for `action`. `flow` is [`crate::wire::classify`]'s answer for this frame
/// (copies of a frame share it, since a rewrite never moves a header).
pub fn rewrite(frame: &mut [u8], flow: &Flow, action: &OutputAction) -> Result<(), RewriteError> {
    if frame.len() < flow.l4 || flow.l4 < flow.l3 {
        return Err(RewriteError::Malformed);
    }
    let (head, l4) = frame.split_at_mut(flow.l4);
    let (l2, l3) = head.split_at_mut(flow.l3);
    let mut ip = Ipv4Packet::new_checked(l3).map_err(|_| RewriteError::Malformed)?;
    let mut udp = UdpPacket::new_checked(l4).map_err(|_| RewriteError::Malformed)?;

    let old_ttl = ip.ttl();
    let new_ttl = match action.ttl {
        Some(ttl) => ttl,
        None if old_ttl <= 1 => return Err(RewriteError::TtlExpired),
        None => old_ttl - 1,
    };
    let group = action.group.unwrap_or(flow.group);
    let port = action.port.unwrap_or(flow.port);

    // TTL shares its 16-bit word with the protocol byte.
    let proto = u16::from(ip.protocol());
    let mut ip_sum = update16(
        ip.checksum(),
        u16::from(old_ttl) << 8 | proto,
        u16::from(new_ttl) << 8 | proto,
    );
    ip.set_ttl(new_ttl);

    let old_group = ip.dst_addr();
    if group != old_group {
        ip_sum = update32(ip_sum, old_group.octets(), group.octets());
        ip.set_dst_addr(group);
    }
    ip.set_checksum(ip_sum);

    // A zero UDP checksum means "none" over IPv4 and stays zero; the group is in the
    // pseudo-header, so it changes the UDP checksum too.
    let old_udp_sum = udp.checksum();
    if old_udp_sum != 0 {
        let mut s = update32(old_udp_sum, old_group.octets(), group.octets());
        s = update16(s, flow.port, port);
        udp.set_checksum(if s == 0 { 0xffff } else { s });
    }
    udp.set_dst_port(port);

    let mut eth = EthernetFrame::new_checked(l2).map_err(|_| RewriteError::Malformed)?;
    eth.set_dst_mac(ipv4_multicast_mac(group));
    eth.set_src_mac(action.src_mac);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        checksum::{checksum, udp_ipv4},
        craft::{UdpFrame, build_udp_frame},
        wire::classify,
    };
    use proptest::prelude::*;

    const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

    fn verify(frame: &[u8]) -> (Ipv4Addr, u16, u8) {
        let flow = classify(frame).expect("still a multicast UDP frame");
        let ip = Ipv4Packet::new_checked(&frame[flow.l3..]).unwrap();
        assert_eq!(checksum(ip.header()), 0, "IPv4 header checksum");
        let udp_bytes = &frame[flow.l4..flow.l3 + usize::from(ip.total_len())];
        let udp = UdpPacket::new_checked(udp_bytes).unwrap();
        if udp.checksum() != 0 {
            let mut zeroed = udp_bytes.to_vec();
            zeroed[6..8].fill(0);
            assert_eq!(
                udp.checksum(),
                udp_ipv4(ip.src_addr(), ip.dst_addr(), &zeroed),
                "UDP checksum"
            );
        }
        let eth = EthernetFrame::new_checked(frame).unwrap();
        assert_eq!(eth.dst_mac(), ipv4_multicast_mac(ip.dst_addr()));
        assert_eq!(eth.src_mac(), OUT_MAC);
        (flow.group, flow.port, ip.ttl())
    }

    fn sample() -> UdpFrame {
        UdpFrame {
            vlan: None,
            src_mac: [0x02, 0, 0, 0, 0, 1],
            source: Ipv4Addr::new(198, 18, 1, 1),
            group: Ipv4Addr::new(239, 1, 1, 1),
            src_port: 4000,
            dst_port: 5000,
            ttl: 8,
            ip_options: Vec::new(),
            payload: b"hello multicast".to_vec(),
            udp_checksum: true,
        }
    }

    #[test]
    fn same_group_decrements_ttl() {
        let mut f = build_udp_frame(&sample());
        let flow = classify(&f).unwrap();
        let action = OutputAction {
            src_mac: OUT_MAC,
            group: None,
            port: None,
            ttl: None,
        };
        rewrite(&mut f, &flow, &action).unwrap();
        assert_eq!(verify(&f), (Ipv4Addr::new(239, 1, 1, 1), 5000, 7));
    }

    #[test]
    fn remap_and_set_ttl() {
        let mut f = build_udp_frame(&sample());
        let flow = classify(&f).unwrap();
        let action = OutputAction {
            src_mac: OUT_MAC,
            group: Some(Ipv4Addr::new(239, 2, 2, 2)),
            port: Some(6000),
            ttl: Some(16),
        };
        rewrite(&mut f, &flow, &action).unwrap();
        assert_eq!(verify(&f), (Ipv4Addr::new(239, 2, 2, 2), 6000, 16));
        assert_eq!(&f[f.len() - 15..], b"hello multicast");
    }

    #[test]
    fn ttl_one_is_dropped_unless_set() {
        let mut s = sample();
        s.ttl = 1;
        let mut f = build_udp_frame(&s);
        let before = f.clone();
        let flow = classify(&f).unwrap();
        let dec = OutputAction {
            src_mac: OUT_MAC,
            group: None,
            port: None,
            ttl: None,
        };
        assert_eq!(rewrite(&mut f, &flow, &dec), Err(RewriteError::TtlExpired));
        assert_eq!(f, before, "a refused frame is left as it was");
        let set = OutputAction {
            ttl: Some(1),
            ..dec
        };
        rewrite(&mut f, &flow, &set).unwrap();
        assert_eq!(verify(&f).2, 1);
    }

    #[test]
    fn zero_udp_checksum_stays_zero() {
        let mut s = sample();
        s.udp_checksum = false;
        let mut f = build_udp_frame(&s);
        let flow = classify(&f).unwrap();
        let action = OutputAction {
            src_mac: OUT_MAC,
            group: Some(Ipv4Addr::new(239, 9, 9, 9)),
            port: Some(7),
            ttl: None,
        };
        rewrite(&mut f, &flow, &action).unwrap();
        let udp = UdpPacket::new_checked(&f[flow.l4..]).unwrap();
        assert_eq!(udp.checksum(), 0);
        verify(&f);
    }

    #[test]
    fn truncated_flow_is_malformed() {
        let f = build_udp_frame(&sample());
        let flow = classify(&f).unwrap();
        let mut short = f[..flow.l4 + 4].to_vec();
        let action = OutputAction {
            src_mac: OUT_MAC,
            group: None,
            port: None,
            ttl: None,
        };
        assert_eq!(
            rewrite(&mut short, &flow, &action),
            Err(RewriteError::Malformed)
        );
    }

    fn arb_frame() -> impl Strategy<Value = UdpFrame> {
        (
            proptest::option::of(any::<u16>()),
            any::<[u8; 4]>(),
            (224u8..=239, any::<[u8; 3]>()),
            any::<u16>(),
            1u16..,
            2u8..,
            proptest::collection::vec(any::<u8>(), 0..=10).prop_map(|v| {
                let words = v.len() / 4 * 4;
                v[..words].to_vec()
            }),
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<bool>(),
        )
            .prop_map(
                |(vlan, src, (g0, g), sp, dp, ttl, ip_options, payload, udp_checksum)| UdpFrame {
                    vlan,
                    src_mac: [0x02, 0, 0, 0, 0, 1],
                    source: Ipv4Addr::from(src),
                    group: Ipv4Addr::new(g0, g[0], g[1], g[2]),
                    src_port: sp,
                    dst_port: dp,
                    ttl,
                    ip_options,
                    payload,
                    udp_checksum,
                },
            )
    }

    proptest! {
        #[test]
        fn rewrite_matches_from_scratch(
            spec in arb_frame(),
            group in proptest::option::of((224u8..=239, any::<[u8; 3]>())),
            port in proptest::option::of(1u16..),
            ttl in proptest::option::of(1u8..),
        ) {
            let mut f = build_udp_frame(&spec);
            let flow = classify(&f).unwrap();
            let group = group.map(|(a, b)| Ipv4Addr::new(a, b[0], b[1], b[2]));
            let action = OutputAction { src_mac: OUT_MAC, group, port, ttl };
            rewrite(&mut f, &flow, &action).unwrap();

            // The same frame built from scratch with the output's values.
            let mut expect_spec = spec.clone();
            expect_spec.src_mac = OUT_MAC;
            expect_spec.group = group.unwrap_or(spec.group);
            expect_spec.dst_port = port.unwrap_or(spec.dst_port);
            expect_spec.ttl = ttl.unwrap_or(spec.ttl - 1);
            let expect = build_udp_frame(&expect_spec);
            // Checksums may differ only in one's complement's two zeros.
            let (gi, ui) = (flow.l3 + 10, flow.l4 + 6);
            prop_assert_eq!(&f[..gi], &expect[..gi]);
            prop_assert_eq!(&f[gi + 2..ui], &expect[gi + 2..ui]);
            prop_assert_eq!(&f[ui + 2..], &expect[ui + 2..]);
            verify(&f);
        }
    }
}
