//! Builds IPv4 UDP frames from their fields: the reference that the rewriter is checked
//! against, and the frames the namespace tests and the demo inject.

use std::net::Ipv4Addr;

use crate::{
    checksum::{checksum, udp_ipv4},
    wire::{ETH_P_8021Q, ETH_P_IP, IPPROTO_UDP, UDP_HLEN, ipv4_multicast_mac},
};

/// The fields of a frame to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpFrame {
    /// An 802.1Q tag control word, when the frame is tagged.
    pub vlan: Option<u16>,
    pub src_mac: [u8; 6],
    pub source: Ipv4Addr,
    pub group: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub ttl: u8,
    /// IPv4 options; the length must be a multiple of 4 and at most 40.
    pub ip_options: Vec<u8>,
    pub payload: Vec<u8>,
    /// Whether to compute the UDP checksum (otherwise it is sent as zero).
    pub udp_checksum: bool,
}

/// Serialises `f` with correct lengths and checksums, computed from scratch.
pub fn build_udp_frame(f: &UdpFrame) -> Vec<u8> {
    assert!(f.ip_options.len().is_multiple_of(4) && f.ip_options.len() <= 40);
    let mut out = Vec::with_capacity(64 + f.payload.len());
    out.extend_from_slice(&ipv4_multicast_mac(f.group));
    out.extend_from_slice(&f.src_mac);
    if let Some(tci) = f.vlan {
        out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        out.extend_from_slice(&tci.to_be_bytes());
    }
    out.extend_from_slice(&ETH_P_IP.to_be_bytes());

    let ihl = 20 + f.ip_options.len();
    let udp_len = UDP_HLEN + f.payload.len();
    let l3 = out.len();
    out.push(0x40 | (ihl / 4) as u8);
    out.push(0);
    out.extend_from_slice(&((ihl + udp_len) as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0]); // id 0, don't fragment
    out.push(f.ttl);
    out.push(IPPROTO_UDP);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&f.source.octets());
    out.extend_from_slice(&f.group.octets());
    out.extend_from_slice(&f.ip_options);
    let ip_sum = checksum(&out[l3..l3 + ihl]);
    out[l3 + 10..l3 + 12].copy_from_slice(&ip_sum.to_be_bytes());

    let l4 = out.len();
    out.extend_from_slice(&f.src_port.to_be_bytes());
    out.extend_from_slice(&f.dst_port.to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&f.payload);
    if f.udp_checksum {
        let s = udp_ipv4(f.source, f.group, &out[l4..]);
        out[l4 + 6..l4 + 8].copy_from_slice(&s.to_be_bytes());
    }
    out
}
