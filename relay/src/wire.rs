//! Zero-copy views of the headers the relay reads and rewrites, in the manner of smoltcp's
//! `wire` module: a view wraps any `T: AsRef<[u8]>`, `new_checked` proves the buffer is long
//! enough for every accessor, and nothing here panics on short or odd input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a buffer is not a frame the relay handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than the header it should hold.
    Truncated,
    /// A header field says something impossible (IP version, IHL below 5, lengths that
    /// point past the frame).
    BadHeader,
}

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
/// IPv6 extension headers stepped over on the way to UDP: hop-by-hop, routing, destination
/// options. A fragment header or any other ends the walk, and the frame is not relayed.
pub const IPV6_SKIPPED_EXT_HEADERS: [u8; 3] = [0, 43, 60];
/// At most this many extension headers before UDP, the XDP program's bound too.
pub const IPV6_MAX_EXT_HEADERS: usize = 4;
pub const UDP_HLEN: usize = 8;
pub const IPPROTO_UDP: u8 = 17;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// An Ethernet II header, with at most one 802.1Q/802.1ad tag skipped.
#[derive(Debug, Clone)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
    header_len: usize,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let b = buffer.as_ref();
        if b.len() < ETH_HLEN {
            return Err(Malformed::Truncated);
        }
        let outer = be16(b, 12);
        let header_len = if outer == ETH_P_8021Q || outer == ETH_P_8021AD {
            if b.len() < ETH_HLEN + VLAN_HLEN {
                return Err(Malformed::Truncated);
            }
            ETH_HLEN + VLAN_HLEN
        } else {
            ETH_HLEN
        };
        Ok(Self { buffer, header_len })
    }

    pub fn dst_mac(&self) -> [u8; 6] {
        self.buffer.as_ref()[0..6]
            .try_into()
            .expect("checked length")
    }

    pub fn src_mac(&self) -> [u8; 6] {
        self.buffer.as_ref()[6..12]
            .try_into()
            .expect("checked length")
    }

    /// The ethertype after any VLAN tag.
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), self.header_len - 2)
    }

    /// The tag control word (PCP, DEI, VID) of the frame's 802.1Q/802.1ad tag, if it has one.
    pub fn tci(&self) -> Option<u16> {
        (self.header_len > ETH_HLEN).then(|| be16(self.buffer.as_ref(), ETH_HLEN))
    }

    /// Length of the Ethernet header including the VLAN tag: where the payload starts.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    pub fn set_dst_mac(&mut self, mac: [u8; 6]) {
        self.buffer.as_mut()[0..6].copy_from_slice(&mac);
    }

    pub fn set_src_mac(&mut self, mac: [u8; 6]) {
        self.buffer.as_mut()[6..12].copy_from_slice(&mac);
    }
}

/// An IPv4 header and what follows it.
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Checks version, IHL and that the whole header (options included) is in the buffer.
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let b = buffer.as_ref();
        if b.len() < IPV4_MIN_HLEN {
            return Err(Malformed::Truncated);
        }
        if b[0] >> 4 != 4 {
            return Err(Malformed::BadHeader);
        }
        let ihl = usize::from(b[0] & 0x0f) * 4;
        if ihl < IPV4_MIN_HLEN {
            return Err(Malformed::BadHeader);
        }
        if b.len() < ihl {
            return Err(Malformed::Truncated);
        }
        Ok(Self { buffer })
    }

    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[0] & 0x0f) * 4
    }

    pub fn total_len(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }

    /// True for any fragment: more-fragments set or a non-zero offset.
    pub fn is_fragment(&self) -> bool {
        be16(self.buffer.as_ref(), 6) & 0x3fff != 0
    }

    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[8]
    }

    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[9]
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), 10)
    }

    pub fn src_addr(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }

    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }

    pub fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.header_len()]
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buffer.as_mut()[8] = ttl;
    }

    pub fn set_checksum(&mut self, sum: u16) {
        put16(self.buffer.as_mut(), 10, sum);
    }

    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[16..20].copy_from_slice(&addr.octets());
    }

    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[12..16].copy_from_slice(&addr.octets());
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        &mut self.buffer.as_mut()[hl..]
    }
}

/// An IPv6 fixed header and what follows it (extension headers included).
#[derive(Debug, Clone)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Checks the version and that the fixed header is in the buffer.
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let b = buffer.as_ref();
        if b.len() < IPV6_HLEN {
            return Err(Malformed::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(Malformed::BadHeader);
        }
        Ok(Self { buffer })
    }

    pub fn payload_len(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }

    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[6]
    }

    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[7]
    }

    pub fn src_addr(&self) -> Ipv6Addr {
        let b: [u8; 16] = self.buffer.as_ref()[8..24]
            .try_into()
            .expect("checked length");
        Ipv6Addr::from(b)
    }

    pub fn dst_addr(&self) -> Ipv6Addr {
        let b: [u8; 16] = self.buffer.as_ref()[24..40]
            .try_into()
            .expect("checked length");
        Ipv6Addr::from(b)
    }

    /// Everything after the fixed header: extension headers, then the upper layer.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[IPV6_HLEN..]
    }

    /// The offset of the upper-layer header and its protocol, after stepping over at most
    /// [`IPV6_MAX_EXT_HEADERS`] skippable extension headers; `None` when the chain is longer,
    /// or runs past the buffer.
    pub fn upper_layer(&self) -> Option<(usize, u8)> {
        let b = self.buffer.as_ref();
        let mut next = self.next_header();
        let mut off = IPV6_HLEN;
        for _ in 0..IPV6_MAX_EXT_HEADERS {
            if !IPV6_SKIPPED_EXT_HEADERS.contains(&next) {
                break;
            }
            let ext = b.get(off..off + 2)?;
            next = ext[0];
            off += (usize::from(ext[1]) + 1) * 8;
        }
        if IPV6_SKIPPED_EXT_HEADERS.contains(&next) || off > b.len() {
            return None;
        }
        Some((off, next))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    pub fn set_hop_limit(&mut self, hops: u8) {
        self.buffer.as_mut()[7] = hops;
    }

    pub fn set_dst_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[24..40].copy_from_slice(&addr.octets());
    }

    pub fn set_src_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[8..24].copy_from_slice(&addr.octets());
    }
}

/// A UDP header and its payload.
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        if buffer.as_ref().len() < UDP_HLEN {
            return Err(Malformed::Truncated);
        }
        Ok(Self { buffer })
    }

    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 0)
    }

    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }

    pub fn len(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }

    pub fn is_empty(&self) -> bool {
        self.len() as usize <= UDP_HLEN
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), 6)
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[UDP_HLEN..]
    }

    /// The header and everything after it.
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    pub fn set_src_port(&mut self, port: u16) {
        put16(self.buffer.as_mut(), 0, port);
    }

    pub fn set_dst_port(&mut self, port: u16) {
        put16(self.buffer.as_mut(), 2, port);
    }

    pub fn set_checksum(&mut self, sum: u16) {
        put16(self.buffer.as_mut(), 6, sum);
    }
}

/// Where the headers of a UDP frame sit, and the fields the relay matches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// The tag control word of the VLAN tag the frame has (the XDP program's too), `None`
    /// when it is untagged; the rule lookup uses its VID.
    pub tci: Option<u16>,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the UDP header (after any IPv6 extension headers).
    pub l4: usize,
    /// The source and the group are of one family.
    pub source: IpAddr,
    /// The destination address: a group, or, for a rule with a unicast `destination:`, that
    /// address.
    pub group: IpAddr,
    /// The destination port; 0 in a later fragment, which has no UDP header.
    pub port: u16,
    /// Where the packet stands among its datagram's fragments; `None` when it is not
    /// fragmented (an IPv6 atomic fragment included). In a later fragment `l4` is where the
    /// fragment's data starts.
    pub frag: Option<Fragment>,
}

/// A fragment of a UDP datagram to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// The datagram's identification as the fragment map keys it: the IPv6 fragment header's
    /// four bytes, or the IPv4 header's two after two zero bytes.
    pub id: [u8; 4],
    /// Where the fragment's data sits in the datagram, in 8-byte units; 0 for the first
    /// fragment, which carries the UDP header.
    pub offset: u16,
}

impl Flow {
    /// A fragment other than the first: no UDP header, and its rule is the one its first
    /// fragment matched.
    pub fn is_later_fragment(&self) -> bool {
        self.frag.is_some_and(|f| f.offset > 0)
    }
}

/// The IPv6 fragment header's next-header number.
pub const NEXTHDR_FRAGMENT: u8 = 44;

/// What the XDP program decides for a frame, computed the same way in userspace: `Some` for
/// an IPv4 or IPv6 UDP frame to a multicast group, or a fragment of one (whether a later
/// fragment is relayed depends on its first, which the caller looks up), `None` (pass to the
/// kernel) for everything else. Used by the data path to find the rule and header offsets of a frame
/// the XDP program redirected, and by tests as the model of the XDP program.
pub fn classify(frame: &[u8]) -> Option<Flow> {
    classify_udp(frame).filter(|f| f.group.is_multicast())
}

/// As [`classify`], for UDP to any destination, unicast included: what the XDP program
/// decides once some rule takes a unicast `destination:` (the rule lookup then tells a
/// unicast datagram of a rule from the host's own traffic). The data path classifies the
/// frames the program redirected with this.
// Inlined into the data path's caller: returned out of line, the `Flow` went through the
// stack, written a byte or two at a time, and the caller's wider reads of it stalled on store
// forwarding (a fifth of the worker's receive time in the data path benchmark).
#[inline(always)]
pub fn classify_udp(frame: &[u8]) -> Option<Flow> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let l3 = eth.header_len();
    let (source, group, l4, frag) = match eth.ethertype() {
        ETH_P_IP => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.protocol() != IPPROTO_UDP {
                return None;
            }
            let h = ip.header();
            let frag = ip.is_fragment().then(|| Fragment {
                id: [0, 0, h[4], h[5]],
                offset: be16(h, 6) & 0x1fff,
            });
            (
                IpAddr::V4(ip.src_addr()),
                IpAddr::V4(ip.dst_addr()),
                l3 + ip.header_len(),
                frag,
            )
        }
        ETH_P_IPV6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            let (mut off, mut proto) = ip.upper_layer()?;
            let mut frag = None;
            if proto == NEXTHDR_FRAGMENT {
                // Next header, reserved, offset (13 bits) / reserved (2) / M (1), identification.
                let fh = ip.payload().get(off - IPV6_HLEN..off - IPV6_HLEN + 8)?;
                let offset = be16(fh, 2) >> 3;
                let id = [fh[4], fh[5], fh[6], fh[7]];
                off += 8;
                // Offset 0 without more to come is an atomic fragment: a whole datagram.
                if offset != 0 || fh[3] & 1 != 0 {
                    frag = Some(Fragment { id, offset });
                }
                proto = if offset != 0 { IPPROTO_UDP } else { fh[0] };
            }
            if proto != IPPROTO_UDP {
                return None;
            }
            (
                IpAddr::V6(ip.src_addr()),
                IpAddr::V6(ip.dst_addr()),
                l3 + off,
                frag,
            )
        }
        _ => return None,
    };
    if frag.is_some_and(|f| f.offset > 0) {
        // No UDP header: what follows is the middle of the datagram.
        return Some(Flow {
            tci: eth.tci(),
            l3,
            l4,
            source,
            group,
            port: 0,
            frag,
        });
    }
    let udp = UdpPacket::new_checked(frame.get(l4..)?).ok()?;
    Some(Flow {
        tci: eth.tci(),
        l3,
        l4,
        source,
        group,
        port: udp.dst_port(),
        frag,
    })
}

/// Checks that the lengths in a classified frame's headers agree with the frame: the IP
/// packet fits in the frame (Ethernet padding after it is fine), and the UDP datagram fits in
/// the IP packet and is at least a header long. The XDP program does not read lengths; the
/// data path drops what fails here rather than forward a packet its receivers would discard.
pub fn check_lengths(frame: &[u8], flow: &Flow) -> Result<(), Malformed> {
    let bad = Err(Malformed::BadHeader);
    let l3 = frame.get(flow.l3..).ok_or(Malformed::Truncated)?;
    let ip_end = match flow.group {
        IpAddr::V4(_) => {
            let ip = Ipv4Packet::new_checked(l3)?;
            let total = usize::from(ip.total_len());
            // A later fragment has no UDP header; its data may be a single byte.
            let udp_hlen = if flow.is_later_fragment() {
                0
            } else {
                UDP_HLEN
            };
            if total < ip.header_len() + udp_hlen {
                return bad;
            }
            flow.l3 + total
        }
        IpAddr::V6(_) => {
            let ip = Ipv6Packet::new_checked(l3)?;
            flow.l3 + IPV6_HLEN + usize::from(ip.payload_len())
        }
    };
    if ip_end > frame.len() || flow.l4 > ip_end {
        return bad;
    }
    if flow.is_later_fragment() {
        return Ok(());
    }
    let udp = UdpPacket::new_checked(frame.get(flow.l4..).ok_or(Malformed::Truncated)?)?;
    let udp_len = usize::from(udp.len());
    // A first fragment holds the UDP header, and its UDP length is the whole datagram's.
    let udp_end = if flow.frag.is_some() {
        flow.l4 + UDP_HLEN
    } else {
        flow.l4 + udp_len
    };
    if udp_len < UDP_HLEN || udp_end > ip_end {
        return bad;
    }
    Ok(())
}

/// The Ethernet address an IPv4 group maps to (RFC 1112): 01:00:5e and the group's low 23 bits.
pub fn ipv4_multicast_mac(group: Ipv4Addr) -> [u8; 6] {
    let o = group.octets();
    [0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]]
}

/// The Ethernet address an IPv6 group maps to (RFC 2464): 33:33 and the group's low 32 bits.
pub fn ipv6_multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The Ethernet address of a group of either family.
pub fn multicast_mac(group: IpAddr) -> [u8; 6] {
    match group {
        IpAddr::V4(g) => ipv4_multicast_mac(g),
        IpAddr::V6(g) => ipv6_multicast_mac(g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn multicast_mac_keeps_low_23_bits() {
        assert_eq!(
            ipv4_multicast_mac(Ipv4Addr::new(239, 129, 2, 3)),
            [0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]
        );
        assert_eq!(
            ipv4_multicast_mac(Ipv4Addr::new(224, 0, 0, 251)),
            [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb]
        );
    }

    #[test]
    fn short_buffers_are_truncated_not_panics() {
        for len in 0..ETH_HLEN {
            assert_eq!(
                EthernetFrame::new_checked(&[0u8; 64][..len]).err(),
                Some(Malformed::Truncated)
            );
        }
        let mut tagged = [0u8; 17];
        tagged[12..14].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
        assert_eq!(
            EthernetFrame::new_checked(&tagged[..]).err(),
            Some(Malformed::Truncated)
        );
        assert_eq!(
            Ipv4Packet::new_checked(&[0x45u8; 19][..]).err(),
            Some(Malformed::Truncated)
        );
        // IHL 15 claims 60 bytes of header.
        assert_eq!(
            Ipv4Packet::new_checked(&[0x4fu8; 40][..]).err(),
            Some(Malformed::Truncated)
        );
        assert_eq!(
            Ipv4Packet::new_checked(&[0x44u8; 40][..]).err(),
            Some(Malformed::BadHeader)
        );
        assert_eq!(
            Ipv4Packet::new_checked(&[0x65u8; 40][..]).err(),
            Some(Malformed::BadHeader)
        );
        assert_eq!(
            UdpPacket::new_checked(&[0u8; 7][..]).err(),
            Some(Malformed::Truncated)
        );
    }

    fn v6(ext: &[u8]) -> Vec<u8> {
        let mut f = crate::craft::UdpFrame::simple(
            "2001:2::1".parse().unwrap(),
            "ff18::1:1".parse().unwrap(),
            5000,
            8,
            b"x",
        );
        f.ipv6_ext = ext.to_vec();
        crate::craft::build_udp_frame(&f)
    }

    #[test]
    fn ipv6_udp_is_found_after_up_to_four_extension_headers() {
        for ext in [&[][..], &[0], &[0, 43], &[0, 60, 43, 60]] {
            let f = v6(ext);
            let flow = classify(&f).unwrap_or_else(|| panic!("{ext:?}"));
            assert_eq!(flow.l4, ETH_HLEN + IPV6_HLEN + 8 * ext.len());
            assert_eq!(flow.group, "ff18::1:1".parse::<IpAddr>().unwrap());
            assert_eq!(flow.source, "2001:2::1".parse::<IpAddr>().unwrap());
            assert_eq!(flow.port, 5000);
        }
        // A fifth header is beyond the bound.
        assert_eq!(classify(&v6(&[0, 60, 43, 60, 60])), None);
        // A first fragment carries the UDP header after its fragment header.
        for ext in [&[NEXTHDR_FRAGMENT][..], &[60, NEXTHDR_FRAGMENT]] {
            let flow = classify(&v6(ext)).unwrap();
            assert_eq!(flow.l4, ETH_HLEN + IPV6_HLEN + 8 * ext.len());
            assert_eq!(flow.port, 5000);
            assert_eq!(
                flow.frag,
                Some(Fragment {
                    id: [0, 0, 0, 1],
                    offset: 0
                })
            );
        }
    }

    #[test]
    fn ipv6_that_is_not_multicast_udp_is_passed() {
        let mut f = v6(&[]);
        f[ETH_HLEN + 6] = 58; // ICMPv6, as neighbour discovery is
        assert_eq!(classify(&f), None);
        let mut f = v6(&[]);
        f[ETH_HLEN + 24] = 0xfe; // fe..: not a group
        assert_eq!(classify(&f), None);
        // Truncated inside an extension header and inside the UDP header.
        let f = v6(&[0, 60]);
        assert_eq!(classify(&f[..ETH_HLEN + IPV6_HLEN + 9]), None);
        assert_eq!(classify(&f[..ETH_HLEN + IPV6_HLEN + 16 + 7]), None);
        // The multicast MAC keeps the group's low 32 bits.
        assert_eq!(
            ipv6_multicast_mac("ff18::1:2:3".parse().unwrap()),
            [0x33, 0x33, 0x00, 0x02, 0x00, 0x03]
        );
    }

    #[test]
    fn lengths_must_agree_with_the_frame() {
        let build = |group: &str, source: &str| {
            crate::craft::build_udp_frame(&crate::craft::UdpFrame::simple(
                source.parse().unwrap(),
                group.parse().unwrap(),
                5000,
                8,
                &[7; 32],
            ))
        };
        for f in [
            build("239.1.1.1", "198.18.1.1"),
            build("ff18::1", "2001:2::1"),
        ] {
            let flow = classify(&f).unwrap();
            assert_eq!(check_lengths(&f, &flow), Ok(()));
            // Ethernet padding after the packet is fine.
            let mut padded = f.clone();
            padded.extend([0; 20]);
            assert_eq!(check_lengths(&padded, &flow), Ok(()));
            // The frame cut short of the IP length.
            assert_eq!(
                check_lengths(&f[..f.len() - 1], &flow),
                Err(Malformed::BadHeader)
            );
            // UDP length past the IP packet, and below a header.
            let ulen = flow.l4 + 4;
            for bad in [41u16, 7] {
                let mut g = f.clone();
                g[ulen..ulen + 2].copy_from_slice(&bad.to_be_bytes());
                assert_eq!(check_lengths(&g, &flow), Err(Malformed::BadHeader), "{bad}");
            }
            // A UDP length shorter than the IP payload is allowed (the rest is trailer).
            let mut g = f.clone();
            g[ulen..ulen + 2].copy_from_slice(&20u16.to_be_bytes());
            assert_eq!(check_lengths(&g, &flow), Ok(()));
        }
        // An IPv4 total length too small for the headers.
        let mut f = build("239.1.1.1", "198.18.1.1");
        let flow = classify(&f).unwrap();
        f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&27u16.to_be_bytes());
        assert_eq!(check_lengths(&f, &flow), Err(Malformed::BadHeader));
    }

    proptest! {
        #[test]
        fn views_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Some(flow) = classify(&bytes) {
                let _ = check_lengths(&bytes, &flow);
            }
            if let Ok(eth) = EthernetFrame::new_checked(&bytes[..]) {
                let _ = (eth.dst_mac(), eth.src_mac(), eth.ethertype());
                if let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) {
                    let _ = (ip.hop_limit(), ip.src_addr(), ip.dst_addr(), ip.payload_len(), ip.upper_layer());
                }
                if let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) {
                    let _ = (ip.ttl(), ip.protocol(), ip.src_addr(), ip.dst_addr(), ip.total_len());
                    if let Ok(udp) = UdpPacket::new_checked(ip.payload()) {
                        let _ = (udp.src_port(), udp.dst_port(), udp.len(), udp.checksum(), udp.payload());
                    }
                }
            }
        }
    }
}
