//! Any bytes as a received frame: classification, the length check, completing a partial UDP
//! checksum and every kind of rewrite (the VLAN tag kept, replaced, inserted or removed, and
//! the IP-header-only rewrite of a later fragment included) must not panic; a completed
//! checksum must verify from scratch; and a rewrite of a frame the data path accepts must
//! leave a frame that classifies again with the output's group, port and tag, the same
//! fragment fields, a later fragment's data untouched, and a valid IPv4 header checksum. The
//! gateway rewrites (a unicast destination with its next hop's MAC, a source address and a
//! source port) and unicast inputs are among the choices.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use relay::{
    checksum::{checksum, udp_ipv4, udp_ipv6},
    frag::rewrite_packet,
    rewrite::{OutputAction, complete_partial_udp_checksum},
    vlan::retag,
    config::SourceSpec,
    wire::{Ipv4Packet, UdpPacket, check_lengths, classify_udp},
};

fuzz_target!(|data: &[u8]| {
    // The first bytes choose the output's rewrite; the rest is the frame.
    let Some((ctl, frame)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Some(flow) = classify_udp(frame) else {
        return;
    };
    let accepted = check_lengths(frame, &flow).is_ok();
    let group = (ctl[0] & 1 == 1).then(|| match flow.group {
        IpAddr::V4(_) => IpAddr::from([239, ctl[1], ctl[2], ctl[3]]),
        IpAddr::V6(_) => IpAddr::from([0xff18, 0, 0, 0, 0, 0, u16::from(ctl[1]), u16::from(ctl[2])]),
    });
    let port = (ctl[0] & 2 == 2).then(|| u16::from_be_bytes([ctl[1], ctl[3]]).max(1));
    let ttl = (ctl[0] & 4 == 4).then_some(ctl[2].max(1));
    let vlan = (ctl[0] & 8 == 8).then(|| (u16::from_be_bytes([ctl[3], ctl[1]]) & 0x0fff).max(1));
    let dscp = (ctl[0] & 16 == 16).then_some(ctl[2] & 0x3f);
    let unicast = |a: u8, b: u8| match flow.group {
        IpAddr::V4(_) => IpAddr::from([198, 18, a, b]),
        IpAddr::V6(_) => IpAddr::from([0x2001, 2, 0, 0, 0, 0, u16::from(a), u16::from(b)]),
    };
    let destination = (ctl[0] & 32 == 32).then(|| unicast(ctl[3], ctl[1]));
    let source = (ctl[0] & 64 == 64).then(|| unicast(ctl[2], ctl[3]));
    let source_port = (ctl[0] & 128 == 128).then(|| u16::from_be_bytes([ctl[3], ctl[2]]).max(1));
    let action = OutputAction {
        group: group.map(Into::into),
        port,
        ttl,
        vlan,
        dscp,
        destination,
        source_spec: source.map(SourceSpec::Address),
        source,
        source_port,
        next_hop_mac: destination.map(|_| [0x02, 0, 0, 0, 0, 0x77]),
        ..OutputAction::plain([0x02, 0, 0, 0, 0, 0x42])
    };
    let ipv4_sum_ok = match flow.group {
        IpAddr::V4(_) => Ipv4Packet::new_checked(&frame[flow.l3..])
            .is_ok_and(|ip| checksum(ip.header()) == 0),
        IpAddr::V6(_) => false,
    };
    // As the data path does: completed once, on the received frame, before the rewrites
    // (never in a fragment).
    let mut out = frame.to_vec();
    if flow.frag.is_none() && complete_partial_udp_checksum(&mut out, &flow) {
        let udp = UdpPacket::new_checked(&out[flow.l4..]).unwrap();
        let mut datagram = out[flow.l4..flow.l4 + usize::from(udp.len())].to_vec();
        let completed = udp.checksum();
        datagram[6..8].fill(0);
        let expected = match (flow.source, flow.group) {
            (IpAddr::V4(s), IpAddr::V4(g)) => udp_ipv4(s, g, &datagram),
            (IpAddr::V6(s), IpAddr::V6(g)) => udp_ipv6(s, g, &datagram),
            _ => unreachable!("classify keeps one family"),
        };
        assert_eq!(completed, expected, "a completed checksum verifies");
    }
    // As in a UMEM frame: room after the data for a tag.
    let received = out.clone();
    out.extend([0u8; 4]);
    let Ok((len, out_flow)) = retag(&mut out, frame.len(), &flow, vlan) else {
        return;
    };
    out.truncate(len);
    let tag_len = |tci: Option<u16>| if tci.is_some() { 4 } else { 0 };
    assert_eq!(out.len() + tag_len(flow.tci), frame.len() + tag_len(vlan));
    let later = flow.is_later_fragment();
    let data = received.get(flow.l4..).map(<[u8]>::to_vec);
    if rewrite_packet(&mut out, &out_flow, &action).is_ok() && accepted {
        let again = classify_udp(&out).expect("a rewritten frame is still relayable");
        assert_eq!(
            (again.l3, again.l4, again.tci),
            (out_flow.l3, out_flow.l4, out_flow.tci),
            "headers where retag said"
        );
        assert_eq!(again.tci.map(|t| t & 0x0fff), vlan);
        assert_eq!(again.group, destination.or(group).unwrap_or(flow.group));
        if destination.is_some() {
            assert_eq!(out[..6], [0x02, 0, 0, 0, 0, 0x77], "the next hop's MAC");
        }
        if later {
            // Only the IP header changes: the fragment's data is the datagram's, unread.
            assert_eq!(again.port, 0);
            assert_eq!(out.get(again.l4..).map(<[u8]>::to_vec), data);
        } else {
            assert_eq!(again.port, port.unwrap_or(flow.port));
            if let Some(sp) = source_port {
                let udp = UdpPacket::new_checked(&out[again.l4..]).unwrap();
                assert_eq!(udp.src_port(), sp);
            }
        }
        assert_eq!(again.frag, flow.frag);
        assert_eq!(again.source, source.unwrap_or(flow.source));
        if ipv4_sum_ok {
            let ip = Ipv4Packet::new_checked(&out[again.l3..]).unwrap();
            assert_eq!(checksum(ip.header()), 0, "the IPv4 header checksum stays valid");
        }
    }
});
