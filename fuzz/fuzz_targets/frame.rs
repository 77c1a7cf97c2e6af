//! Any bytes as a received frame: classification, the length check, completing a partial UDP
//! checksum and every kind of rewrite must not panic; a completed checksum must verify from
//! scratch; and a rewrite of a frame the data path accepts must leave a frame that classifies
//! again with the output's group and port and valid IPv4 header checksum.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use relay::{
    checksum::{checksum, udp_ipv4, udp_ipv6},
    rewrite::{OutputAction, complete_partial_udp_checksum, rewrite},
    wire::{Ipv4Packet, UdpPacket, check_lengths, classify},
};

fuzz_target!(|data: &[u8]| {
    // The first bytes choose the output's rewrite; the rest is the frame.
    let Some((ctl, frame)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Some(flow) = classify(frame) else {
        return;
    };
    let accepted = check_lengths(frame, &flow).is_ok();
    let group = (ctl[0] & 1 == 1).then(|| match flow.group {
        IpAddr::V4(_) => IpAddr::from([239, ctl[1], ctl[2], ctl[3]]),
        IpAddr::V6(_) => IpAddr::from([0xff18, 0, 0, 0, 0, 0, u16::from(ctl[1]), u16::from(ctl[2])]),
    });
    let port = (ctl[0] & 2 == 2).then(|| u16::from_be_bytes([ctl[1], ctl[3]]).max(1));
    let ttl = (ctl[0] & 4 == 4).then_some(ctl[2].max(1));
    let action = OutputAction {
        src_mac: [0x02, 0, 0, 0, 0, 0x42],
        group,
        port,
        ttl,
    };
    let ipv4_sum_ok = match flow.group {
        IpAddr::V4(_) => Ipv4Packet::new_checked(&frame[flow.l3..])
            .is_ok_and(|ip| checksum(ip.header()) == 0),
        IpAddr::V6(_) => false,
    };
    // As the data path does: completed once, on the received frame, before the rewrites.
    let mut out = frame.to_vec();
    if complete_partial_udp_checksum(&mut out, &flow) {
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
    if rewrite(&mut out, &flow, &action).is_ok() && accepted {
        assert_eq!(out.len(), frame.len());
        let again = classify(&out).expect("a rewritten frame is still relayable");
        assert_eq!(again.group, group.unwrap_or(flow.group));
        assert_eq!(again.port, port.unwrap_or(flow.port));
        assert_eq!(again.source, flow.source);
        if ipv4_sum_ok {
            let ip = Ipv4Packet::new_checked(&out[again.l3..]).unwrap();
            assert_eq!(checksum(ip.header()), 0, "the IPv4 header checksum stays valid");
        }
    }
});
