//! Builds IPv4 and IPv6 UDP frames from their fields: the reference that the rewriter is
//! checked against, and the frames the tests inject.

use std::net::IpAddr;

use crate::{
    checksum::{checksum, pseudo_ipv4, pseudo_ipv6, udp_ipv4, udp_ipv6},
    wire::{ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, UDP_HLEN, classify, multicast_mac},
};

/// The IPv6 fragment header's next-header number.
pub const NEXTHDR_FRAGMENT: u8 = 44;

/// The fields of a frame to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpFrame {
    /// An 802.1Q tag control word, when the frame is tagged.
    pub vlan: Option<u16>,
    pub src_mac: [u8; 6],
    /// Source and group, both IPv4 or both IPv6.
    pub source: IpAddr,
    pub group: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// IPv4 options; the length must be a multiple of 4 and at most 40. Ignored for IPv6.
    pub ip_options: Vec<u8>,
    /// IPv6 extension headers before UDP, in order, each 8 bytes: 0 (hop-by-hop), 43
    /// (routing, segments left 0), 60 (destination options) or 44 (a first fragment with
    /// more-fragments set). Ignored for IPv4.
    pub ipv6_ext: Vec<u8>,
    pub payload: Vec<u8>,
    /// Whether to compute the UDP checksum (otherwise it is sent as zero, which IPv6 forbids
    /// and the relay must repair).
    pub udp_checksum: bool,
}

impl UdpFrame {
    /// A frame with no VLAN tag, options or extension headers, and a UDP checksum.
    pub fn simple(source: IpAddr, group: IpAddr, dst_port: u16, ttl: u8, payload: &[u8]) -> Self {
        Self {
            vlan: None,
            src_mac: [0x02, 0, 0, 0, 0, 1],
            source,
            group,
            src_port: 4000,
            dst_port,
            ttl,
            ip_options: Vec::new(),
            ipv6_ext: Vec::new(),
            payload: payload.to_vec(),
            udp_checksum: true,
        }
    }
}

/// Serialises `f` with correct lengths and checksums, computed from scratch.
pub fn build_udp_frame(f: &UdpFrame) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + f.payload.len());
    out.extend_from_slice(&multicast_mac(f.group));
    out.extend_from_slice(&f.src_mac);
    if let Some(tci) = f.vlan {
        out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        out.extend_from_slice(&tci.to_be_bytes());
    }
    let udp_len = UDP_HLEN + f.payload.len();
    match (f.source, f.group) {
        (IpAddr::V4(source), IpAddr::V4(group)) => {
            assert!(f.ip_options.len().is_multiple_of(4) && f.ip_options.len() <= 40);
            out.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let ihl = 20 + f.ip_options.len();
            let l3 = out.len();
            out.push(0x40 | (ihl / 4) as u8);
            out.push(0);
            out.extend_from_slice(&((ihl + udp_len) as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0, 0x40, 0]); // id 0, don't fragment
            out.push(f.ttl);
            out.push(IPPROTO_UDP);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&source.octets());
            out.extend_from_slice(&group.octets());
            out.extend_from_slice(&f.ip_options);
            let ip_sum = checksum(&out[l3..l3 + ihl]);
            out[l3 + 10..l3 + 12].copy_from_slice(&ip_sum.to_be_bytes());
        }
        (IpAddr::V6(source), IpAddr::V6(group)) => {
            out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            let ext_len = 8 * f.ipv6_ext.len();
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&((ext_len + udp_len) as u16).to_be_bytes());
            out.push(f.ipv6_ext.first().copied().unwrap_or(IPPROTO_UDP));
            out.push(f.ttl);
            out.extend_from_slice(&source.octets());
            out.extend_from_slice(&group.octets());
            for (i, &kind) in f.ipv6_ext.iter().enumerate() {
                let next = f.ipv6_ext.get(i + 1).copied().unwrap_or(IPPROTO_UDP);
                match kind {
                    // Fragment offset 0 with more-fragments set, identification 1.
                    NEXTHDR_FRAGMENT => out.extend_from_slice(&[next, 0, 0, 1, 0, 0, 0, 1]),
                    // Hdr Ext Len 0 (8 bytes); options padded with one PadN of four bytes;
                    // for a routing header: type 0 with segments left 0, which is ignored.
                    43 => out.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]),
                    _ => out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
                }
            }
        }
        _ => panic!("source and group of different families"),
    }

    let l4 = out.len();
    out.extend_from_slice(&f.src_port.to_be_bytes());
    out.extend_from_slice(&f.dst_port.to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&f.payload);
    if f.udp_checksum {
        let s = match (f.source, f.group) {
            (IpAddr::V4(s), IpAddr::V4(g)) => udp_ipv4(s, g, &out[l4..]),
            (IpAddr::V6(s), IpAddr::V6(g)) => udp_ipv6(s, g, &out[l4..]),
            _ => unreachable!("checked above"),
        };
        out[l4 + 6..l4 + 8].copy_from_slice(&s.to_be_bytes());
    }
    out
}

/// Puts in a built frame's UDP checksum field what a sender with transmit checksum offload
/// hands to its NIC or veth (Linux's CHECKSUM_PARTIAL): the pseudo-header's folded sum over the
/// datagram's UDP length, to be completed by whoever transmits it. Panics on a frame
/// [`build_udp_frame`] would not make.
pub fn make_udp_checksum_partial(frame: &mut [u8]) {
    let flow = classify(frame).expect("a multicast UDP frame");
    let at = flow.l4;
    let udp_len = u16::from_be_bytes([frame[at + 4], frame[at + 5]]);
    let partial = match (flow.source, flow.group) {
        (IpAddr::V4(s), IpAddr::V4(g)) => pseudo_ipv4(s, g, udp_len),
        (IpAddr::V6(s), IpAddr::V6(g)) => pseudo_ipv6(s, g, u32::from(udp_len)),
        _ => unreachable!("classify keeps one family"),
    };
    frame[at + 6..at + 8].copy_from_slice(&partial.to_be_bytes());
}
