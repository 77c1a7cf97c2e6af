//! Per-output rewrite of a relayed frame, in place: MACs, group, port, TTL or hop limit, and
//! the checksums.
//!
//! Checksums are updated incrementally (RFC 1624) from the fields that change, so the cost does
//! not grow with the payload and a payload the relay never reads stays unread. The one
//! exception is an IPv6 frame that arrives with a zero UDP checksum, which IPv6 does not allow
//! (RFC 8200 section 8.1): its checksum is computed from scratch, so receivers accept it.
//!
//! A frame from a sender on the same host (a container behind a veth) may also arrive with a
//! *partial* UDP checksum, left for a NIC that it never reached: the data path completes it
//! once per received frame with [`complete_partial_udp_checksum`], before the fan-out, so the
//! incremental updates here start from a full checksum.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{
    checksum::{delta, delta16, pseudo_ipv4, pseudo_ipv6, sum, udp_ipv6, update_by, update16},
    config::SourceSpec,
    prefix::Prefix,
    wire::{ETH_HLEN, Flow, UDP_HLEN, UdpPacket, multicast_mac},
};

/// What one output does to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputAction {
    /// The egress interface's MAC: the relayed frame's source.
    pub src_mac: [u8; 6],
    /// New destination group, if the output remaps it (the input's family): one group, or
    /// for a range input a range of the same length, onto which the frame's group is moved
    /// with its host bits.
    pub group: Option<Prefix>,
    /// New destination UDP port, if the output remaps it.
    pub port: Option<u16>,
    /// A TTL (IPv4) or hop limit (IPv6) to set instead of decrementing the received one.
    pub ttl: Option<u8>,
    /// The VID to send tagged with; untagged when `None` (see [`crate::vlan::retag`], which
    /// the data path applies before [`rewrite`]).
    pub vlan: Option<u16>,
    /// A DSCP (0-63) to mark with, keeping the two ECN bits; the received one when absent.
    pub dscp: Option<u8>,
    /// A unicast address to send to instead of a group: the destination MAC is then the
    /// next hop's, which the caller passes to [`rewrite`].
    pub destination: Option<IpAddr>,
    /// The `source:` the user wrote, which `source` resolves.
    pub source_spec: Option<SourceSpec>,
    /// The IP source to write: the address `source_spec` stands for now; `None` with a
    /// `source_spec` when the interface has no such address at the moment (the frame is then
    /// not sent: [`RewriteError::NoSource`]).
    pub source: Option<IpAddr>,
    /// A UDP source port to write.
    pub source_port: Option<u16>,
    /// The next hop's MAC for a unicast `destination`: not configuration, but what the data
    /// path read from the output's neighbour slot for this frame; `None` while it is
    /// unresolved ([`RewriteError::NoNeighbour`]).
    pub next_hop_mac: Option<[u8; 6]>,
}

impl OutputAction {
    /// An action that sends the frame on as it came but for the MACs and the TTL.
    pub fn plain(src_mac: [u8; 6]) -> Self {
        OutputAction {
            src_mac,
            group: None,
            port: None,
            ttl: None,
            vlan: None,
            dscp: None,
            destination: None,
            source_spec: None,
            source: None,
            source_port: None,
            next_hop_mac: None,
        }
    }

    /// Whether two actions are the same output as the user wrote it. The source MAC and the
    /// source address `auto` resolved to are left out: they are the egress device's, which
    /// change when the interface is created again or readdressed.
    pub fn same_output(&self, other: &Self) -> bool {
        let written = |a: &Self| {
            (
                a.group,
                a.destination,
                a.port,
                a.ttl,
                a.vlan,
                a.dscp,
                a.source_spec,
                a.source_port,
            )
        };
        written(self) == written(other)
    }

    /// The destinations the output names: its unicast destination, or its group or range.
    pub fn named_destination(&self) -> Option<Prefix> {
        self.destination.map(Prefix::host).or(self.group)
    }

    /// The destination address a frame of `flow` leaves with.
    pub fn destination_of(&self, flow: &Flow) -> IpAddr {
        match (self.destination, self.group) {
            (Some(d), _) => d,
            (None, Some(g)) if g.is_host() => g.addr,
            (None, Some(g)) => g.carry(flow.group),
            (None, None) => flow.group,
        }
    }
}

/// Why a frame was not sent on an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteError {
    /// It arrived with TTL (or hop limit) 0 or 1 and the output does not set it: forwarding it
    /// would exceed its scope.
    TtlExpired,
    /// The frame does not hold the headers `flow` describes.
    Malformed,
    /// The output's VLAN tag does not fit in the frame's buffer.
    TooLarge,
    /// A unicast output whose next hop has no neighbour entry (yet).
    NoNeighbour,
    /// A unicast output whose destination the kernel routes through another interface than
    /// the output's: there is no next hop on the output's link to send to.
    NoRouteVia,
    /// `source: auto` on an interface that has no address of the frame's family now.
    NoSource,
    /// The first fragment of an IPv6 datagram whose UDP checksum is zero, which IPv6 forbids:
    /// the checksum covers the whole datagram, and the relay, which never reassembles, does
    /// not have it to compute one (see [`crate::frag::rewrite_packet`]).
    ZeroChecksumFragment,
}

/// Rewrites `frame` for `action`. `flow` is [`crate::wire::classify`]'s answer for this frame
/// (copies of a frame share it, since a rewrite never moves a header), or, after
/// [`crate::vlan::retag`] moved the headers, the flow it returned.
pub fn rewrite(frame: &mut [u8], flow: &Flow, action: &OutputAction) -> Result<(), RewriteError> {
    if frame.len() < flow.l4 || flow.l4 < flow.l3 {
        return Err(RewriteError::Malformed);
    }
    Prepared::new(flow, action)?.apply(frame, flow)
}

/// One output's rewrite of one stream, worked out once: the MACs, the addresses and ports it
/// writes, and what those changes add to each checksum. Everything here depends only on the
/// frame's addresses and destination port (the data path's flow key, under which it keeps
/// one per output) and on the action; [`Prepared::apply`] does what differs per frame (TTL,
/// DSCP, source port, the checksums' update) and nothing else, so a frame's rewrite costs a
/// few loads and stores rather than the address comparisons and checksum updates of all of
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// Destination MAC, then source MAC.
    macs: [u8; 12],
    v6: bool,
    /// The addresses to write (the first 4 bytes for IPv4), and whether they differ from the
    /// stream's (a group relay keeps the source: no store for it).
    dst: [u8; 16],
    src: [u8; 16],
    write_dst: bool,
    write_src: bool,
    /// The destination port the stream arrives on, and the one it leaves with.
    old_port: u16,
    port: u16,
    source_port: Option<u16>,
    ttl: Option<u8>,
    dscp: Option<u8>,
    /// What the address changes add to the IPv4 header checksum, and the address and
    /// destination port changes to the UDP checksum ([`crate::checksum::delta`]).
    ip_add: u64,
    udp_add: u64,
}

impl Prepared {
    /// The rewrite of `flow`'s stream for `action`: refused with what `rewrite` would refuse
    /// every frame of it with (an unresolved next hop, a `source: auto` with no address, an
    /// action of the other family).
    pub fn new(flow: &Flow, action: &OutputAction) -> Result<Prepared, RewriteError> {
        let dst_mac = destination_mac(flow, action)?;
        let source = source_of(flow, action)?;
        let dst = action.destination_of(flow);
        let mut macs = [0; 12];
        macs[..6].copy_from_slice(&dst_mac);
        macs[6..].copy_from_slice(&action.src_mac);
        let port = action.port.unwrap_or(flow.port);
        let (v6, old_src, src, old_dst, new_dst) = match (flow.source, source, flow.group, dst) {
            (IpAddr::V4(a), IpAddr::V4(b), IpAddr::V4(c), IpAddr::V4(d)) => {
                (false, v4_bytes(a), v4_bytes(b), v4_bytes(c), v4_bytes(d))
            }
            (IpAddr::V6(a), IpAddr::V6(b), IpAddr::V6(c), IpAddr::V6(d)) => {
                (true, a.octets(), b.octets(), c.octets(), d.octets())
            }
            _ => return Err(RewriteError::Malformed),
        };
        // Both addresses are in the UDP pseudo-header; only IPv4 has a header checksum.
        let addrs = delta(&old_dst, &new_dst) + delta(&old_src, &src);
        Ok(Prepared {
            macs,
            v6,
            dst: new_dst,
            src,
            write_dst: new_dst != old_dst,
            write_src: src != old_src,
            old_port: flow.port,
            port,
            source_port: action.source_port,
            ttl: action.ttl,
            dscp: action.dscp,
            ip_add: if v6 { 0 } else { addrs },
            udp_add: addrs + delta16(flow.port, port),
        })
    }

    /// Rewrites one frame of the stream this was prepared for, in place; `flow` is the
    /// frame's own (its header offsets may differ from the first frame's: IPv4 options).
    #[inline(always)]
    pub fn apply(&self, frame: &mut [u8], flow: &Flow) -> Result<(), RewriteError> {
        let (l3, l4) = (flow.l3, flow.l4);
        if l3 < ETH_HLEN || l4 < l3 || frame.len() < l4 + UDP_HLEN {
            return Err(RewriteError::Malformed);
        }
        let (head, udp) = frame.split_at_mut(l4);
        let (l2, ip) = head.split_at_mut(l3);
        if self.v6 {
            self.ipv6(ip, udp)?;
        } else {
            self.ipv4(ip, udp)?;
        }
        // The destination port is written whatever the checksum held; the source port too
        // when the output sets one.
        udp[2..4].copy_from_slice(&self.port.to_be_bytes());
        if let Some(sp) = self.source_port {
            udp[0..2].copy_from_slice(&sp.to_be_bytes());
        }
        l2[..12].copy_from_slice(&self.macs);
        Ok(())
    }

    /// The IPv4 header and the UDP checksum. `ip` is the header, options included.
    #[inline(always)]
    fn ipv4(&self, ip: &mut [u8], udp: &mut [u8]) -> Result<(), RewriteError> {
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip.len() < usize::from(ip[0] & 0x0f) * 4 {
            return Err(RewriteError::Malformed);
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ihl < 20 {
            return Err(RewriteError::Malformed);
        }
        let old_ttl = ip[8];
        let ttl = next_hops(old_ttl, self.ttl)?;
        // TTL shares its 16-bit word with the protocol byte, DSCP its with the version.
        let mut add = self.ip_add + delta16(u16::from(old_ttl) << 8, u16::from(ttl) << 8);
        ip[8] = ttl;
        if let Some(dscp) = self.dscp {
            let old = ip[1];
            ip[1] = (dscp & 0x3f) << 2 | (old & 0x03);
            add += delta16(u16::from(old), u16::from(ip[1]));
        }
        if self.write_dst {
            ip[16..20].copy_from_slice(&self.dst[..4]);
        }
        if self.write_src {
            ip[12..16].copy_from_slice(&self.src[..4]);
        }
        let check = u16::from_be_bytes([ip[10], ip[11]]);
        ip[10..12].copy_from_slice(&update_by(check, add).to_be_bytes());

        // A zero UDP checksum means "none" over IPv4 and stays zero.
        let old = u16::from_be_bytes([udp[6], udp[7]]);
        if old != 0 {
            let s = update_by(old, self.udp_add + self.source_port_delta(udp));
            udp[6..8].copy_from_slice(&nonzero(s).to_be_bytes());
        }
        Ok(())
    }

    /// The IPv6 header and the UDP checksum: the hop limit is in no checksum, the addresses
    /// only in UDP's.
    #[inline(always)]
    fn ipv6(&self, ip: &mut [u8], udp: &mut [u8]) -> Result<(), RewriteError> {
        if ip.len() < 40 || ip[0] >> 4 != 6 {
            return Err(RewriteError::Malformed);
        }
        ip[7] = next_hops(ip[7], self.ttl)?;
        if let Some(dscp) = self.dscp {
            set_dscp(ip, dscp)?;
        }
        if self.write_dst {
            ip[24..40].copy_from_slice(&self.dst);
        }
        if self.write_src {
            ip[8..24].copy_from_slice(&self.src);
        }
        let old = u16::from_be_bytes([udp[6], udp[7]]);
        let s = if old == 0 {
            // Not allowed in IPv6, so nothing to update: compute it over the datagram the UDP
            // length names, with the new ports in place.
            let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
            udp[2..4].copy_from_slice(&self.port.to_be_bytes());
            if let Some(sp) = self.source_port {
                udp[0..2].copy_from_slice(&sp.to_be_bytes());
            }
            let datagram = udp
                .get(..len)
                .filter(|d| d.len() >= UDP_HLEN)
                .ok_or(RewriteError::Malformed)?;
            udp_ipv6(Ipv6Addr::from(self.src), Ipv6Addr::from(self.dst), datagram)
        } else {
            nonzero(update_by(old, self.udp_add + self.source_port_delta(udp)))
        };
        udp[6..8].copy_from_slice(&s.to_be_bytes());
        Ok(())
    }

    /// What rewriting this frame's UDP source port adds to its checksum: the port the sender
    /// chose differs per frame (per socket), so it is the one part not prepared.
    #[inline(always)]
    fn source_port_delta(&self, udp: &[u8]) -> u64 {
        self.source_port
            .map_or(0, |sp| delta16(u16::from_be_bytes([udp[0], udp[1]]), sp))
    }

    /// The destination port frames of the stream arrive on (tests).
    pub fn old_port(&self) -> u16 {
        self.old_port
    }
}

fn v4_bytes(a: Ipv4Addr) -> [u8; 16] {
    let mut b = [0; 16];
    b[..4].copy_from_slice(&a.octets());
    b
}

/// A UDP checksum that came out zero is sent as all ones: zero means "none" in IPv4 and is
/// forbidden in IPv6 (RFC 768, RFC 8200).
fn nonzero(sum: u16) -> u16 {
    if sum == 0 { 0xffff } else { sum }
}

/// The destination MAC of a frame of `flow` on `action`'s output: a group's own (RFC 1112,
/// 2464), or the next hop's for a unicast destination.
pub fn destination_mac(flow: &Flow, action: &OutputAction) -> Result<[u8; 6], RewriteError> {
    if action.destination.is_some() {
        return action.next_hop_mac.ok_or(RewriteError::NoNeighbour);
    }
    Ok(multicast_mac(action.destination_of(flow)))
}

/// The IP source a frame of `flow` leaves with on `action`'s output.
pub fn source_of(flow: &Flow, action: &OutputAction) -> Result<IpAddr, RewriteError> {
    match (action.source_spec, action.source) {
        (_, Some(s)) => Ok(s),
        (Some(_), None) => Err(RewriteError::NoSource),
        (None, None) => Ok(flow.source),
    }
}

/// Completes a partial UDP checksum in `frame`, in place; true if there was one to complete.
///
/// A sender with transmit checksum offload (the default on a veth) writes only the folded sum
/// of the pseudo-header into the checksum field (Linux's CHECKSUM_PARTIAL) and leaves the rest
/// to the device. A NIC would finish it on the way out; a veth hands the frame over as it is,
/// and the kernel's own receive path would have trusted it (it knows the frame never left the
/// host), but the relay sends it on to other hosts, where every receiver would drop it. So a
/// field that equals the pseudo-header's sum, over the flow's addresses and the UDP length
/// field, is replaced by the checksum computed over the pseudo-header and the datagram.
///
/// Recognising one costs a sum over the 12- or 40-byte pseudo-header, never the payload, so
/// frames with full checksums pay next to nothing. A full checksum that happens to equal the
/// pseudo-header's sum is recomputed too, and harmlessly: a from-scratch checksum of an intact
/// datagram is the value it already holds, and as the result equals the field it is not
/// reported as completed. (A datagram damaged on the way whose checksum
/// field also matched would leave with a valid checksum; the link's own frame check drops
/// such frames first, and the chance of the match is 1 in 65,536 anyway.)
///
/// Left untouched, and false: an IPv4 checksum of zero ("none"; a pseudo-header sum is never
/// zero, so this is no partial one either), an IPv6 zero checksum ([`rewrite`] computes that
/// one per output), and a UDP length below a header or past the end of `frame`. The datagram
/// summed is the one the UDP length field names, not the rest of the frame, which may hold
/// Ethernet padding. `flow` is [`crate::wire::classify`]'s answer for this frame.
pub fn complete_partial_udp_checksum(frame: &mut [u8], flow: &Flow) -> bool {
    let Some(Ok(udp)) = frame.get(flow.l4..).map(UdpPacket::new_checked) else {
        return false;
    };
    let (len, field) = (udp.len(), udp.checksum());
    if field == 0 {
        return false;
    }
    let partial = match (flow.source, flow.group) {
        (IpAddr::V4(s), IpAddr::V4(g)) => pseudo_ipv4(s, g, len),
        (IpAddr::V6(s), IpAddr::V6(g)) => pseudo_ipv6(s, g, u32::from(len)),
        _ => return false,
    };
    if field != partial {
        return false;
    }
    let Some(datagram) = frame
        .get_mut(flow.l4..flow.l4 + usize::from(len))
        .filter(|d| d.len() >= UDP_HLEN)
    else {
        return false;
    };
    // From scratch, as `udp_ipv4` and `udp_ipv6` compute it, reusing the pseudo-header sum:
    // it covers the same addresses and length. A zero result is sent as 0xffff, since zero
    // would mean "none" (IPv4) or be forbidden (IPv6).
    datagram[6..8].fill(0);
    let full = match !sum(u32::from(partial), datagram) {
        0 => 0xffff,
        c => c,
    };
    datagram[6..8].copy_from_slice(&full.to_be_bytes());
    // A full checksum that happens to equal the pseudo-header's sum (one datagram in 65,536
    // of a sender without offload) is already right: nothing was completed, and the
    // `checksum_completed` counter must not say otherwise.
    full != field
}

/// Sets the DSCP of an IP header (the IPv4 TOS byte, the IPv6 traffic class) and keeps its
/// two ECN bits, which belong to the path's congestion signalling, not to the sender's
/// marking. IPv4's header checksum follows (RFC 1624); IPv6's header has none, and neither
/// field is in the UDP pseudo-header.
pub fn set_dscp(l3: &mut [u8], dscp: u8) -> Result<(), RewriteError> {
    let dscp = dscp & 0x3f;
    match l3.first().map(|b| b >> 4) {
        Some(4) if l3.len() >= 20 => {
            let old = u16::from_be_bytes([l3[0], l3[1]]);
            l3[1] = dscp << 2 | (l3[1] & 0x03);
            let new = u16::from_be_bytes([l3[0], l3[1]]);
            let sum = update16(u16::from_be_bytes([l3[10], l3[11]]), old, new);
            l3[10..12].copy_from_slice(&sum.to_be_bytes());
            Ok(())
        }
        Some(6) if l3.len() >= 40 => {
            let ecn = (l3[1] >> 4) & 0x03;
            let class = dscp << 2 | ecn;
            l3[0] = (l3[0] & 0xf0) | class >> 4;
            l3[1] = (l3[1] & 0x0f) | (class & 0x0f) << 4;
            Ok(())
        }
        _ => Err(RewriteError::Malformed),
    }
}

/// The TTL or hop limit to send with, or why not.
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
        checksum::{checksum, udp_ipv4},
        craft::{UdpFrame, build_udp_frame, make_udp_checksum_partial},
        wire::{EthernetFrame, Ipv4Packet, Ipv6Packet, classify},
    };
    use proptest::prelude::*;

    const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Checks every checksum and MAC of a rewritten frame from scratch; returns its group,
    /// port and TTL or hop limit.
    fn verify(frame: &[u8]) -> (IpAddr, u16, u8) {
        let flow = classify(frame).expect("still a multicast UDP frame");
        let (udp_bytes, hops) = match flow.group {
            IpAddr::V4(_) => {
                let ip = Ipv4Packet::new_checked(&frame[flow.l3..]).unwrap();
                assert_eq!(checksum(ip.header()), 0, "IPv4 header checksum");
                (
                    &frame[flow.l4..flow.l3 + usize::from(ip.total_len())],
                    ip.ttl(),
                )
            }
            IpAddr::V6(_) => {
                let ip = Ipv6Packet::new_checked(&frame[flow.l3..]).unwrap();
                let end = flow.l3 + 40 + usize::from(ip.payload_len());
                (&frame[flow.l4..end], ip.hop_limit())
            }
        };
        let udp = UdpPacket::new_checked(udp_bytes).unwrap();
        let mut zeroed = udp_bytes.to_vec();
        zeroed[6..8].fill(0);
        match (flow.source, flow.group) {
            (IpAddr::V4(s), IpAddr::V4(g)) => {
                if udp.checksum() != 0 {
                    assert_eq!(udp.checksum(), udp_ipv4(s, g, &zeroed), "UDP checksum");
                }
            }
            (IpAddr::V6(s), IpAddr::V6(g)) => {
                assert_eq!(udp.checksum(), udp_ipv6(s, g, &zeroed), "UDP checksum");
            }
            _ => panic!("mixed families"),
        }
        let eth = EthernetFrame::new_checked(frame).unwrap();
        assert_eq!(eth.dst_mac(), multicast_mac(flow.group));
        assert_eq!(eth.src_mac(), OUT_MAC);
        (flow.group, flow.port, hops)
    }

    fn samples() -> [UdpFrame; 2] {
        [
            UdpFrame::simple(
                ip("198.18.1.1"),
                ip("239.1.1.1"),
                5000,
                8,
                b"hello multicast",
            ),
            UdpFrame::simple(
                ip("2001:2::1"),
                ip("ff18::1:1"),
                5000,
                8,
                b"hello multicast",
            ),
        ]
    }

    fn action(group: Option<IpAddr>, port: Option<u16>, ttl: Option<u8>) -> OutputAction {
        OutputAction {
            group: group.map(Into::into),
            port,
            ttl,
            ..OutputAction::plain(OUT_MAC)
        }
    }

    #[test]
    fn same_group_decrements_ttl() {
        for s in samples() {
            let mut f = build_udp_frame(&s);
            let flow = classify(&f).unwrap();
            rewrite(&mut f, &flow, &action(None, None, None)).unwrap();
            assert_eq!(verify(&f), (s.group, 5000, 7));
        }
    }

    #[test]
    fn remap_and_set_ttl() {
        for (s, to) in samples()
            .into_iter()
            .zip([ip("239.2.2.2"), ip("ff18::2:2")])
        {
            let mut f = build_udp_frame(&s);
            let flow = classify(&f).unwrap();
            rewrite(&mut f, &flow, &action(Some(to), Some(6000), Some(16))).unwrap();
            assert_eq!(verify(&f), (to, 6000, 16));
            assert_eq!(&f[f.len() - 15..], b"hello multicast");
        }
    }

    #[test]
    fn ipv6_group_maps_to_33_33_and_low_32_bits() {
        let [_, s] = samples();
        let mut f = build_udp_frame(&s);
        let flow = classify(&f).unwrap();
        rewrite(
            &mut f,
            &flow,
            &action(Some(ip("ff18::aabb:ccdd")), None, None),
        )
        .unwrap();
        assert_eq!(f[..6], [0x33, 0x33, 0xaa, 0xbb, 0xcc, 0xdd]);
    }

    #[test]
    fn ttl_one_is_dropped_unless_set() {
        for mut s in samples() {
            s.ttl = 1;
            let mut f = build_udp_frame(&s);
            let before = f.clone();
            let flow = classify(&f).unwrap();
            let dec = action(None, None, None);
            assert_eq!(rewrite(&mut f, &flow, &dec), Err(RewriteError::TtlExpired));
            assert_eq!(f, before, "a refused frame is left as it was");
            rewrite(&mut f, &flow, &action(None, None, Some(1))).unwrap();
            assert_eq!(verify(&f).2, 1);
        }
    }

    #[test]
    fn zero_udp_checksum_stays_zero_over_ipv4() {
        let [mut s, _] = samples();
        s.udp_checksum = false;
        let mut f = build_udp_frame(&s);
        let flow = classify(&f).unwrap();
        rewrite(&mut f, &flow, &action(Some(ip("239.9.9.9")), Some(7), None)).unwrap();
        let udp = UdpPacket::new_checked(&f[flow.l4..]).unwrap();
        assert_eq!(udp.checksum(), 0);
        verify(&f);
    }

    #[test]
    fn zero_udp_checksum_is_computed_over_ipv6() {
        let [_, mut s] = samples();
        s.udp_checksum = false;
        s.ipv6_ext = vec![0, 60];
        let mut f = build_udp_frame(&s);
        let flow = classify(&f).unwrap();
        rewrite(&mut f, &flow, &action(Some(ip("ff18::9")), Some(7), None)).unwrap();
        let udp = UdpPacket::new_checked(&f[flow.l4..]).unwrap();
        assert_ne!(udp.checksum(), 0);
        assert_eq!(verify(&f), (ip("ff18::9"), 7, 7));
    }

    #[test]
    fn truncated_flow_is_malformed() {
        for s in samples() {
            let f = build_udp_frame(&s);
            let flow = classify(&f).unwrap();
            let mut short = f[..flow.l4 + 4].to_vec();
            assert_eq!(
                rewrite(&mut short, &flow, &action(None, None, None)),
                Err(RewriteError::Malformed)
            );
        }
        // An IPv6 zero checksum with a UDP length past the frame cannot be computed.
        let [_, mut s] = samples();
        s.udp_checksum = false;
        let mut f = build_udp_frame(&s);
        let flow = classify(&f).unwrap();
        f[flow.l4 + 4..flow.l4 + 6].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(
            rewrite(&mut f, &flow, &action(None, None, None)),
            Err(RewriteError::Malformed)
        );
    }

    #[test]
    fn a_group_of_the_other_family_is_refused() {
        for (s, other) in samples().into_iter().zip([ip("ff18::1"), ip("239.1.1.1")]) {
            let mut f = build_udp_frame(&s);
            let flow = classify(&f).unwrap();
            assert_eq!(
                rewrite(&mut f, &flow, &action(Some(other), None, None)),
                Err(RewriteError::Malformed)
            );
        }
    }

    /// `spec` built with a full UDP checksum, and the same frame as a sender with transmit
    /// checksum offload hands it to its veth.
    fn full_and_partial(spec: &UdpFrame) -> (Vec<u8>, Vec<u8>) {
        let full = build_udp_frame(&UdpFrame {
            udp_checksum: true,
            ..spec.clone()
        });
        let mut partial = full.clone();
        make_udp_checksum_partial(&mut partial);
        (full, partial)
    }

    fn udp_sum(frame: &[u8], flow: &Flow) -> u16 {
        u16::from_be_bytes([frame[flow.l4 + 6], frame[flow.l4 + 7]])
    }

    fn set_udp_len(frame: &mut [u8], flow: &Flow, len: u16) {
        frame[flow.l4 + 4..flow.l4 + 6].copy_from_slice(&len.to_be_bytes());
    }

    /// A second group of `s`'s family to remap to.
    fn other_group(s: &UdpFrame) -> IpAddr {
        match s.group {
            IpAddr::V4(_) => ip("239.2.2.2"),
            IpAddr::V6(_) => ip("ff18::2:2"),
        }
    }

    #[test]
    fn partial_checksum_is_completed_in_both_families() {
        let [v4, v6] = samples();
        let specs = [
            v4.clone(),
            v6.clone(),
            UdpFrame {
                ip_options: vec![1; 8],
                vlan: Some(7),
                ..v4
            },
            UdpFrame {
                ipv6_ext: vec![0, 60, 43, 60],
                ..v6
            },
        ];
        for s in specs {
            let (full, mut f) = full_and_partial(&s);
            assert_ne!(
                f, full,
                "{s:?}: the partial sum differs from the full checksum"
            );
            let flow = classify(&f).unwrap();
            assert!(complete_partial_udp_checksum(&mut f, &flow), "{s:?}");
            assert_eq!(f, full, "{s:?}: completed to what a sender computes itself");
            assert!(
                !complete_partial_udp_checksum(&mut f, &flow),
                "{s:?}: nothing left to complete"
            );
            let to = other_group(&s);
            rewrite(&mut f, &flow, &action(Some(to), Some(6000), None)).unwrap();
            assert_eq!(verify(&f), (to, 6000, 7));
        }
    }

    /// Two frames as Linux 6.18 handed them over a veth with tx offload on (captured with
    /// tcpdump, which flagged the checksums as bad and named the right ones).
    #[test]
    fn frames_captured_from_a_veth_with_offload_are_completed() {
        let hex = |s: &str| -> Vec<u8> {
            let s: String = s.split_whitespace().collect();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let v4 = hex("0100 5e01 0101 3ece 8d6d e0ae 0800 4500
                      002c 639c 4000 0811 0c0f c612 4d01 ef01
                      0101 0fa0 1388 0018 0340 7061 7274 6961
                      6c20 6368 6563 6b73 756d");
        let v6 = hex("3333 0001 0001 3ece 8d6d e0ae 86dd 600e
                      f985 0018 1108 2001 0002 0000 0077 0000
                      0000 0000 0001 ff18 0000 0000 0000 0000
                      0000 0001 0001 0fa0 1388 0018 1fbf 7061
                      7274 6961 6c20 6368 6563 6b73 756d");
        for (mut f, partial, full) in [(v4, 0x0340, 0x777b), (v6, 0x1fbf, 0x5afc)] {
            let flow = classify(&f).unwrap();
            assert_eq!(udp_sum(&f, &flow), partial);
            assert!(complete_partial_udp_checksum(&mut f, &flow));
            assert_eq!(udp_sum(&f, &flow), full);
            assert_eq!(&f[f.len() - 16..], b"partial checksum");
        }
    }

    /// Why the data path completes before rewriting: the incremental update carries the
    /// partial sum's error along, and the receiver drops the frame.
    #[test]
    fn a_partial_checksum_rewritten_as_it_is_stays_wrong() {
        for s in samples() {
            let (full, mut partial) = full_and_partial(&s);
            let flow = classify(&full).unwrap();
            let mut good = full.clone();
            let a = action(Some(other_group(&s)), Some(6000), None);
            rewrite(&mut good, &flow, &a).unwrap();
            rewrite(&mut partial, &flow, &a).unwrap();
            assert_ne!(udp_sum(&partial, &flow), udp_sum(&good, &flow));
        }
    }

    #[test]
    fn full_and_absent_checksums_are_left_alone() {
        for s in samples() {
            let before = build_udp_frame(&s);
            let mut f = before.clone();
            let flow = classify(&f).unwrap();
            assert!(!complete_partial_udp_checksum(&mut f, &flow));
            assert_eq!(f, before);
        }
        // Zero: "none" over IPv4, which stays so; over IPv6 `rewrite` computes it per output.
        for mut s in samples() {
            s.udp_checksum = false;
            let before = build_udp_frame(&s);
            let mut f = before.clone();
            let flow = classify(&f).unwrap();
            assert!(!complete_partial_udp_checksum(&mut f, &flow));
            assert_eq!(f, before);
            rewrite(&mut f, &flow, &action(None, None, None)).unwrap();
            assert_eq!(udp_sum(&f, &flow) != 0, s.group.is_ipv6());
            verify(&f);
        }
    }

    /// A full checksum that happens to equal the pseudo-header's sum is recognised as full:
    /// left as it is and not counted as completed (the suite once saw one such datagram of a
    /// sender without offload counted).
    #[test]
    fn a_full_checksum_that_looks_partial_is_kept() {
        for mut s in samples() {
            s.payload.extend([0, 0]);
            let (_, partial) = full_and_partial(&s);
            let flow = classify(&partial).unwrap();
            let pseudo = udp_sum(&partial, &flow);
            // The last payload word that makes the full checksum equal the pseudo-header sum.
            let end = s.payload.len();
            let look_alike = (0..=u16::MAX)
                .map(|w| {
                    let mut spec = s.clone();
                    spec.payload[end - 2..].copy_from_slice(&w.to_be_bytes());
                    build_udp_frame(&spec)
                })
                .find(|f| udp_sum(f, &flow) == pseudo)
                .expect("some word does it");
            let mut f = look_alike.clone();
            assert!(!complete_partial_udp_checksum(&mut f, &flow));
            assert_eq!(f, look_alike);
        }
    }

    #[test]
    fn only_the_datagram_the_udp_length_names_is_summed() {
        for s in samples() {
            // Ethernet padding after the packet.
            let (full, mut f) = full_and_partial(&s);
            f.extend([0xaa; 20]);
            let flow = classify(&f).unwrap();
            assert!(complete_partial_udp_checksum(&mut f, &flow));
            assert_eq!(f[..full.len()], full[..]);
            assert_eq!(f[full.len()..], [0xaa; 20]);

            // A UDP length shorter than the IP payload: the rest is a trailer.
            let mut f = build_udp_frame(&s);
            set_udp_len(&mut f, &flow, 12);
            let mut zeroed = f[flow.l4..flow.l4 + 12].to_vec();
            zeroed[6..8].fill(0);
            let expected = match (s.source, s.group) {
                (IpAddr::V4(a), IpAddr::V4(g)) => udp_ipv4(a, g, &zeroed),
                (IpAddr::V6(a), IpAddr::V6(g)) => udp_ipv6(a, g, &zeroed),
                _ => unreachable!(),
            };
            make_udp_checksum_partial(&mut f);
            assert!(complete_partial_udp_checksum(&mut f, &flow));
            assert_eq!(udp_sum(&f, &flow), expected);
        }
    }

    #[test]
    fn lengths_that_do_not_fit_are_refused_untouched() {
        for s in samples() {
            let (_, partial) = full_and_partial(&s);
            let flow = classify(&partial).unwrap();
            // A UDP length past the frame, or below a header, with the partial sum a sender
            // would write for it.
            let past = (partial.len() - flow.l4 + 1) as u16;
            for len in [past, 7, 0] {
                let mut f = partial.clone();
                set_udp_len(&mut f, &flow, len);
                make_udp_checksum_partial(&mut f);
                let before = f.clone();
                assert!(!complete_partial_udp_checksum(&mut f, &flow), "{len}");
                assert_eq!(f, before);
            }
            // Cut inside the UDP header, or a flow that points past the frame.
            let mut f = partial[..flow.l4 + 7].to_vec();
            assert!(!complete_partial_udp_checksum(&mut f, &flow));
            let mut f = partial.clone();
            for l4 in [partial.len(), partial.len() - 7, usize::MAX] {
                assert!(!complete_partial_udp_checksum(&mut f, &Flow { l4, ..flow }));
            }
            // A flow whose source and group are of different families.
            let mixed = Flow {
                source: other_group(&samples()[usize::from(s.group.is_ipv4())]),
                ..flow
            };
            assert!(!complete_partial_udp_checksum(&mut f, &mixed));
            assert_eq!(f, partial);
        }
    }

    /// A group of `family`'s family made from arbitrary bytes.
    fn group_like(family: IpAddr, g: [u8; 16]) -> IpAddr {
        match family {
            IpAddr::V4(_) => IpAddr::from([224 | (g[0] & 0x0f), g[1], g[2], g[3]]),
            IpAddr::V6(_) => {
                let mut a = g;
                a[0] = 0xff;
                IpAddr::from(a)
            }
        }
    }

    fn arb_v4() -> impl Strategy<Value = (IpAddr, IpAddr)> {
        (any::<[u8; 4]>(), 224u8..=239, any::<[u8; 3]>())
            .prop_map(|(s, g0, g)| (IpAddr::from(s), IpAddr::from([g0, g[0], g[1], g[2]])))
    }

    fn arb_v6() -> impl Strategy<Value = (IpAddr, IpAddr)> {
        (any::<[u8; 16]>(), any::<[u8; 15]>()).prop_map(|(s, g)| {
            let mut group = [0xffu8; 16];
            group[1..].copy_from_slice(&g);
            (IpAddr::from(s), IpAddr::from(group))
        })
    }

    fn arb_frame() -> impl Strategy<Value = UdpFrame> {
        (
            proptest::option::of(any::<u16>()),
            prop_oneof![arb_v4(), arb_v6()],
            any::<u16>(),
            1u16..,
            2u8..,
            proptest::collection::vec(any::<u8>(), 0..=10).prop_map(|v| {
                let words = v.len() / 4 * 4;
                v[..words].to_vec()
            }),
            proptest::collection::vec(prop::sample::select(vec![0u8, 43, 60]), 0..=4),
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<bool>(),
        )
            .prop_map(
                |(
                    vlan,
                    (source, group),
                    sp,
                    dp,
                    ttl,
                    ip_options,
                    ipv6_ext,
                    payload,
                    udp_checksum,
                )| {
                    UdpFrame {
                        vlan,
                        src_mac: [0x02, 0, 0, 0, 0, 1],
                        source,
                        group,
                        src_port: sp,
                        dst_port: dp,
                        ttl,
                        ip_options,
                        ipv6_ext,
                        payload,
                        udp_checksum,
                    }
                },
            )
    }

    proptest! {
        /// A rewritten frame is byte for byte the frame a sender would build from scratch with
        /// the output's values (checksums compared by value, as one's complement has two zeros).
        #[test]
        fn rewrite_matches_from_scratch(
            spec in arb_frame(),
            group in proptest::option::of(any::<[u8; 16]>()),
            port in proptest::option::of(1u16..),
            ttl in proptest::option::of(1u8..),
        ) {
            let mut f = build_udp_frame(&spec);
            let flow = classify(&f).unwrap();
            let group = group.map(|g| group_like(spec.group, g));
            rewrite(&mut f, &flow, &action(group, port, ttl)).unwrap();

            let mut expect_spec = spec.clone();
            expect_spec.src_mac = OUT_MAC;
            expect_spec.group = group.unwrap_or(spec.group);
            expect_spec.dst_port = port.unwrap_or(spec.dst_port);
            expect_spec.ttl = ttl.unwrap_or(spec.ttl - 1);
            // IPv6 forbids a zero UDP checksum, so the relay sends a computed one.
            expect_spec.udp_checksum |= spec.group.is_ipv6();
            let expect = build_udp_frame(&expect_spec);
            let ui = flow.l4 + 6;
            let sum_at = |b: &[u8]| u16::from_be_bytes([b[ui], b[ui + 1]]);
            let same_sum = |a: u16, b: u16| a == b || (a | b == 0xffff && (a == 0 || b == 0));
            prop_assert!(same_sum(sum_at(&f), sum_at(&expect)));
            prop_assert_eq!(
                without_checksums(&f, &flow, spec.group.is_ipv4()),
                without_checksums(&expect, &flow, spec.group.is_ipv4())
            );
            verify(&f);
        }
    }

    proptest! {
        /// The data path prepares an output's rewrite at a stream's first frame and applies it
        /// to the rest: applied to any other frame of the stream (same addresses, destination
        /// port and tag; any source port, TTL, options, extension headers, payload, checksum
        /// or none), it writes exactly the bytes a rewrite of that frame from scratch writes,
        /// or refuses it alike, for every kind of output.
        #[test]
        fn prepared_rewrite_is_the_rewrite_of_every_frame_of_its_stream(
            first in arb_frame(),
            other in arb_frame(),
            group in proptest::option::of(any::<[u8; 16]>()),
            port in proptest::option::of(1u16..),
            ttl in proptest::option::of(1u8..),
            dscp in proptest::option::of(0u8..64),
            source in proptest::option::of(any::<[u8; 16]>()),
            source_port in proptest::option::of(any::<u16>()),
            expired in any::<bool>(),
        ) {
            let mut other = other;
            other.source = first.source;
            other.group = first.group;
            other.dst_port = first.dst_port;
            other.vlan = first.vlan;
            if expired {
                other.ttl = 1;
            }
            let a = OutputAction {
                group: group.map(|g| group_like(first.group, g).into()),
                port,
                ttl,
                dscp,
                source: source.map(|s| unicast_like(first.group, s)),
                source_port,
                ..OutputAction::plain(OUT_MAC)
            };
            let f0 = build_udp_frame(&first);
            let prepared = Prepared::new(&classify(&f0).unwrap(), &a).unwrap();

            let mut by_prepared = build_udp_frame(&other);
            let flow = classify(&by_prepared).unwrap();
            let mut from_scratch = by_prepared.clone();
            let want = rewrite(&mut from_scratch, &flow, &a);
            prop_assert_eq!(prepared.apply(&mut by_prepared, &flow), want);
            prop_assert_eq!(prepared.old_port(), first.dst_port);
            if want.is_ok() {
                prop_assert_eq!(&by_prepared, &from_scratch);
                verify(&by_prepared);
            } else {
                prop_assert_eq!(want, Err(RewriteError::TtlExpired));
                prop_assert!(expired && ttl.is_none());
            }
        }
    }

    /// `frame` with its UDP checksum and (IPv4) header checksum zeroed: for comparing frames
    /// whose checksums were compared by value (one's complement has two zeros).
    fn without_checksums(frame: &[u8], flow: &Flow, v4: bool) -> Vec<u8> {
        let mut x = frame.to_vec();
        x[flow.l4 + 6..flow.l4 + 8].fill(0);
        if v4 {
            x[flow.l3 + 10..flow.l3 + 12].fill(0);
        }
        x
    }

    /// A unicast address of `family`'s family made from arbitrary bytes.
    fn unicast_like(family: IpAddr, a: [u8; 16]) -> IpAddr {
        match family {
            IpAddr::V4(_) => IpAddr::from([1 + a[0] % 223, a[1], a[2], a[3]]),
            IpAddr::V6(_) => {
                let mut b = a;
                b[0] = 0x20;
                IpAddr::from(b)
            }
        }
    }

    proptest! {
        /// The gateway rewrites: to a unicast destination (next hop MAC), from a rewritten
        /// source address and port, from a unicast input, with group, port and TTL: the
        /// rewritten frame is the frame a sender would build from scratch with those values,
        /// in both families, with options, extension headers, tags and zero checksums.
        #[test]
        fn gateway_rewrite_matches_from_scratch(
            spec in arb_frame(),
            unicast_in in any::<bool>(),
            to in prop_oneof![
                Just(None),
                any::<[u8; 16]>().prop_map(|a| Some((false, a))),
                any::<[u8; 16]>().prop_map(|a| Some((true, a))),
            ],
            source in proptest::option::of(any::<[u8; 16]>()),
            source_port in proptest::option::of(1u16..),
            port in proptest::option::of(1u16..),
            ttl in proptest::option::of(1u8..),
            hop_mac in any::<[u8; 6]>(),
        ) {
            let mut spec = spec;
            if unicast_in {
                spec.group = unicast_like(spec.group, [7; 16]);
            }
            let mut f = build_udp_frame(&spec);
            let flow = crate::wire::classify_udp(&f).unwrap();
            let (group, destination) = match to {
                Some((true, a)) => (None, Some(unicast_like(spec.group, a))),
                Some((false, g)) => (Some(group_like(spec.group, g)), None),
                // A unicast input's outputs name where to send (validation sees to it).
                None if unicast_in => (Some(group_like(spec.group, [9; 16])), None),
                None => (None, None),
            };
            let source = source.map(|a| unicast_like(spec.group, a));
            let action = OutputAction {
                group: group.map(Into::into),
                destination,
                port,
                ttl,
                source_spec: source.map(SourceSpec::Address),
                source,
                source_port,
                next_hop_mac: destination.map(|_| hop_mac),
                ..OutputAction::plain(OUT_MAC)
            };
            rewrite(&mut f, &flow, &action).unwrap();

            let mut expect_spec = spec.clone();
            expect_spec.src_mac = OUT_MAC;
            expect_spec.group = destination.or(group).unwrap_or(spec.group);
            expect_spec.source = source.unwrap_or(spec.source);
            expect_spec.src_port = source_port.unwrap_or(spec.src_port);
            expect_spec.dst_port = port.unwrap_or(spec.dst_port);
            expect_spec.ttl = ttl.unwrap_or(spec.ttl - 1);
            expect_spec.udp_checksum |= spec.group.is_ipv6();
            let mut expect = build_udp_frame(&expect_spec);
            if destination.is_some() {
                expect[..6].copy_from_slice(&hop_mac);
            }
            let ui = flow.l4 + 6;
            let sum_at = |b: &[u8]| u16::from_be_bytes([b[ui], b[ui + 1]]);
            let same_sum = |a: u16, b: u16| a == b || (a | b == 0xffff && (a == 0 || b == 0));
            prop_assert!(same_sum(sum_at(&f), sum_at(&expect)));
            let ip_sum_ok = |b: &[u8]| {
                spec.group.is_ipv6()
                    || crate::checksum::checksum(
                        Ipv4Packet::new_checked(&b[flow.l3..]).unwrap().header(),
                    ) == 0
            };
            prop_assert!(ip_sum_ok(&f));
            prop_assert_eq!(
                without_checksums(&f, &flow, spec.group.is_ipv4()),
                without_checksums(&expect, &flow, spec.group.is_ipv4())
            );
        }

        /// A unicast output with no next hop yet, and `source: auto` with no address, refuse
        /// the frame and leave it untouched.
        #[test]
        fn unresolved_outputs_refuse_untouched(spec in arb_frame(), which in any::<bool>()) {
            let mut f = build_udp_frame(&spec);
            let before = f.clone();
            let flow = classify(&f).unwrap();
            let action = if which {
                OutputAction {
                    destination: Some(unicast_like(spec.group, [3; 16])),
                    ..OutputAction::plain(OUT_MAC)
                }
            } else {
                OutputAction {
                    source_spec: Some(SourceSpec::Auto),
                    ..OutputAction::plain(OUT_MAC)
                }
            };
            let want = if which { RewriteError::NoNeighbour } else { RewriteError::NoSource };
            prop_assert_eq!(rewrite(&mut f, &flow, &action), Err(want));
            prop_assert_eq!(f, before);
        }
    }

    proptest! {
        /// A frame that arrives with a partial checksum, completed and then rewritten (group,
        /// port, TTL), leaves with a checksum that verifies from scratch: completion gives
        /// exactly the frame its sender would have built with the checksum computed.
        #[test]
        fn partial_completed_then_rewritten_verifies(
            spec in arb_frame(),
            group in proptest::option::of(any::<[u8; 16]>()),
            port in proptest::option::of(1u16..),
            ttl in proptest::option::of(1u8..),
        ) {
            let (full, mut f) = full_and_partial(&spec);
            let flow = classify(&f).unwrap();
            // Completed exactly when something changed (a partial sum that equals the full
            // checksum, one case in 65,536, is right as it stands).
            let changed = f != full;
            prop_assert_eq!(complete_partial_udp_checksum(&mut f, &flow), changed);
            prop_assert_eq!(&f, &full);
            let group = group.map(|g| group_like(spec.group, g));
            rewrite(&mut f, &flow, &action(group, port, ttl)).unwrap();
            let (g, p, hops) = verify(&f);
            prop_assert_eq!(g, group.unwrap_or(spec.group));
            prop_assert_eq!(p, port.unwrap_or(spec.dst_port));
            prop_assert_eq!(hops, ttl.unwrap_or(spec.ttl - 1));
        }

        /// A frame whose checksum is full (or absent) is never changed: at most its checksum
        /// is recomputed to the value it holds.
        #[test]
        fn full_checksums_stay_valid(spec in arb_frame()) {
            let before = build_udp_frame(&spec);
            let mut f = before.clone();
            let flow = classify(&f).unwrap();
            complete_partial_udp_checksum(&mut f, &flow);
            prop_assert_eq!(f, before);
        }

        /// A partial frame with any UDP length, cut anywhere: completed only when the datagram
        /// fits, and then valid; otherwise untouched.
        #[test]
        fn odd_lengths_are_completed_only_when_they_fit(
            spec in arb_frame(),
            udp_len in any::<u16>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let (_, mut f) = full_and_partial(&spec);
            let flow = classify(&f).unwrap();
            set_udp_len(&mut f, &flow, udp_len);
            make_udp_checksum_partial(&mut f);
            f.truncate(cut.index(f.len() + 1));
            let before = f.clone();
            let end = flow.l4 + usize::from(udp_len);
            if complete_partial_udp_checksum(&mut f, &flow) {
                prop_assert!(usize::from(udp_len) >= 8 && end <= f.len());
                let mut zeroed = f[flow.l4..end].to_vec();
                zeroed[6..8].fill(0);
                let expected = match (flow.source, flow.group) {
                    (IpAddr::V4(s), IpAddr::V4(g)) => udp_ipv4(s, g, &zeroed),
                    (IpAddr::V6(s), IpAddr::V6(g)) => udp_ipv6(s, g, &zeroed),
                    _ => unreachable!(),
                };
                prop_assert_eq!(udp_sum(&f, &flow), expected);
            } else {
                prop_assert!(usize::from(udp_len) < 8 || end > f.len());
                prop_assert_eq!(f, before);
            }
        }

        /// Any bytes, with their own flow or an arbitrary one, never panic.
        #[test]
        fn completion_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            l4 in 0usize..300,
            v6 in any::<bool>(),
            source in any::<[u8; 16]>(),
            group in any::<[u8; 16]>(),
        ) {
            let mut b = bytes.clone();
            if let Some(flow) = classify(&bytes) {
                complete_partial_udp_checksum(&mut b, &flow);
            }
            let (source, group) = if v6 {
                (IpAddr::from(source), IpAddr::from(group))
            } else {
                let four = |a: [u8; 16]| IpAddr::from([a[0], a[1], a[2], a[3]]);
                (four(source), four(group))
            };
            let flow = Flow { tci: None, l3: 0, l4, source, group, port: 0, frag: None };
            complete_partial_udp_checksum(&mut b, &flow);
        }
    }
}

#[cfg(test)]
mod dscp_tests {
    use std::net::IpAddr;

    use proptest::prelude::*;

    use super::{OutputAction, rewrite, set_dscp};
    use crate::{
        checksum::{checksum, udp_ipv4, udp_ipv6},
        craft::{UdpFrame, build_udp_frame},
        wire::{Ipv4Packet, Ipv6Packet, UdpPacket, classify},
    };

    /// The (DSCP, ECN) of a frame's IP header.
    fn marking(frame: &[u8], l3: usize) -> (u8, u8) {
        let class = match frame[l3] >> 4 {
            4 => frame[l3 + 1],
            _ => (frame[l3] & 0x0f) << 4 | frame[l3 + 1] >> 4,
        };
        (class >> 2, class & 3)
    }

    /// Writes a received marking into a built frame (and, for IPv4, its header checksum).
    fn mark(frame: &mut [u8], l3: usize, class: u8) {
        match frame[l3] >> 4 {
            4 => {
                frame[l3 + 1] = class;
                frame[l3 + 10..l3 + 12].fill(0);
                let ihl = usize::from(frame[l3] & 0x0f) * 4;
                let sum = checksum(&frame[l3..l3 + ihl]);
                frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
            }
            _ => {
                frame[l3] = (frame[l3] & 0xf0) | class >> 4;
                frame[l3 + 1] = (frame[l3 + 1] & 0x0f) | (class & 0x0f) << 4;
            }
        }
    }

    #[test]
    fn ef_on_ect_keeps_ecn_ipv4_and_ipv6() {
        for (src, grp) in [("198.18.1.1", "239.1.1.1"), ("2001:2::1", "ff18::1:1")] {
            let f = UdpFrame::simple(src.parse().unwrap(), grp.parse().unwrap(), 5000, 8, b"x");
            let mut frame = build_udp_frame(&f);
            let l3 = classify(&frame).unwrap().l3;
            mark(&mut frame, l3, 0b0000_0010); // DSCP 0, ECT(0)
            set_dscp(&mut frame[l3..], 46).unwrap();
            assert_eq!(marking(&frame, l3), (46, 0b10), "{grp}");
            if frame[l3] >> 4 == 4 {
                assert_eq!(frame[l3 + 1], 0xba);
                assert_eq!(checksum(&frame[l3..l3 + 20]), 0);
            } else {
                // Version and flow label untouched.
                assert_eq!(frame[l3] >> 4, 6);
            }
        }
    }

    #[test]
    fn short_or_unknown_headers_are_refused_untouched() {
        for bytes in [vec![], vec![0x45; 10], vec![0x65; 20], vec![0x55; 40]] {
            let mut b = bytes.clone();
            assert!(set_dscp(&mut b, 46).is_err());
            assert_eq!(b, bytes);
        }
    }

    proptest! {
        /// Any DSCP on any received marking, with any other rewrite of the output: the new
        /// DSCP, the received ECN bits, and every checksum valid from scratch.
        #[test]
        fn dscp_with_every_other_rewrite(v6 in any::<bool>(), class in any::<u8>(), dscp in 0u8..64,
                                         group in proptest::option::of(1u8..255),
                                         port in proptest::option::of(1u16..),
                                         ttl in proptest::option::of(1u8..)) {
            let (src, grp): (IpAddr, IpAddr) = if v6 {
                ("2001:2::1".parse().unwrap(), "ff18::1:1".parse().unwrap())
            } else {
                ("198.18.1.1".parse().unwrap(), "239.1.1.1".parse().unwrap())
            };
            let f = UdpFrame::simple(src, grp, 5000, 8, b"payload of some length");
            let mut frame = build_udp_frame(&f);
            let flow = classify(&frame).unwrap();
            mark(&mut frame, flow.l3, class);
            let group = group.map(|g| -> IpAddr {
                if v6 { [0xff18, 0, 0, 0, 0, 0, 2, u16::from(g)].into() } else { [239, 2, 2, g].into() }
            });
            let action = OutputAction {
                group: group.map(Into::into),
                port,
                ttl,
                dscp: Some(dscp),
                ..OutputAction::plain([2, 0, 0, 0, 0, 9])
            };
            rewrite(&mut frame, &flow, &action).unwrap();
            prop_assert_eq!(marking(&frame, flow.l3), (dscp, class & 3));
            let out = classify(&frame).unwrap();
            let udp = UdpPacket::new_checked(&frame[out.l4..]).unwrap();
            let mut zeroed = frame[out.l4..out.l4 + usize::from(udp.len())].to_vec();
            zeroed[6..8].fill(0);
            match (out.source, out.group) {
                (IpAddr::V4(s), IpAddr::V4(g)) => {
                    let ip = Ipv4Packet::new_checked(&frame[out.l3..]).unwrap();
                    prop_assert_eq!(checksum(ip.header()), 0);
                    prop_assert_eq!(udp.checksum(), udp_ipv4(s, g, &zeroed));
                }
                (IpAddr::V6(s), IpAddr::V6(g)) => {
                    prop_assert!(Ipv6Packet::new_checked(&frame[out.l3..]).is_ok());
                    prop_assert_eq!(udp.checksum(), udp_ipv6(s, g, &zeroed));
                }
                _ => prop_assert!(false, "mixed families"),
            }
        }
    }
}
