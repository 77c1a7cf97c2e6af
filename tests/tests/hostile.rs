//! Hostile and odd frames through the real path: each crafted frame is injected raw on the
//! sender's link, and the test checks that the XDP program and the daemon do what
//! docs/ARCHITECTURE.md says for it — pass it to the kernel untouched, drop it with a
//! counter, or relay it correctly — and that the table there is this test's table.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use relay::{
    checksum::checksum,
    craft::{NEXTHDR_FRAGMENT, UdpFrame, build_udp_frame, make_udp_checksum_partial},
    wire::{ETH_HLEN, Ipv4Packet, Ipv6Packet, UdpPacket, classify},
};
use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{
        RELAY_IN, RELAY_IN_ADDR, RELAY_IN_ADDR6, SENDER_ADDR, SENDER_ADDR6, SENDER_IF, Topology,
    },
    traffic::{Limits, capture, capture_tagged, check_payload, inject, join, payload},
};

mod common;
use common::stats_until;

/// The source MAC of every injected frame, so captures can tell them from the links' own
/// traffic (neighbour discovery, MLD).
const INJECT_MAC: [u8; 6] = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x01];

const RULES: &str = "\
rules:
  - name: v4
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }]
  - name: v6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs: [{ interface: rout0 }]
  - name: v4-unicast
    input: { interface: rin, destination: 198.18.1.2, port: 7100 }
    outputs: [{ interface: rout0, group: 239.7.7.7 }]
  - name: v6-unicast
    input: { interface: rin, destination: '2001:2:0:1::2', port: 7100 }
    outputs: [{ interface: rout0, group: 'ff18::7:7' }]
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Relayed, rewritten, with valid checksums.
    Relayed,
    /// XDP_PASS: the kernel's own stack gets it, untouched.
    Passed,
    /// Redirected, then dropped and counted as `ttl_expired` on the output.
    TtlExpired,
    /// Redirected, then dropped and counted as `malformed` by the data path: its lengths
    /// disagree with the frame.
    Malformed,
    /// Redirected, then dropped and counted as `too_large` on the output: longer than the
    /// egress interface's MTU.
    TooLarge,
    /// Matched, but longer than a UMEM frame holds: passed, and counted as `oversize`.
    Oversize,
    /// A later fragment whose first fragment was not seen: passed, and counted as
    /// `fragments_unknown`.
    UnknownFragment,
}

impl Outcome {
    fn describe(self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::Passed => "passed to the kernel (XDP_PASS)",
            Outcome::TtlExpired => "dropped, counted as ttl_expired",
            Outcome::Malformed => "dropped, counted as datapath malformed",
            Outcome::TooLarge => "dropped, counted as too_large on the output",
            Outcome::Oversize => "passed to the kernel (XDP_PASS), counted as oversize",
            Outcome::UnknownFragment => {
                "passed to the kernel (XDP_PASS), counted as fragments_unknown"
            }
        }
    }

    /// Whether the relay's own stack receives the frame.
    fn reaches_stack(self) -> bool {
        matches!(
            self,
            Outcome::Passed | Outcome::Oversize | Outcome::UnknownFragment
        )
    }
}

struct Case {
    what: &'static str,
    frame: Vec<u8>,
    outcome: Outcome,
}

fn v4(id: u64) -> UdpFrame {
    let mut f = UdpFrame::simple(
        SENDER_ADDR.into(),
        "239.1.1.1".parse().unwrap(),
        5000,
        8,
        &payload(id, 64),
    );
    f.src_mac = INJECT_MAC;
    f
}

fn v6(id: u64) -> UdpFrame {
    let mut f = UdpFrame::simple(
        SENDER_ADDR6.into(),
        "ff18::1:1".parse().unwrap(),
        5000,
        8,
        &payload(id, 64),
    );
    f.src_mac = INJECT_MAC;
    f
}

/// UDP to the relay's own address and the unicast rule's port, as a sender would address it
/// (to the relay's MAC).
fn to_relay(spec: UdpFrame, rin_mac: [u8; 6]) -> Vec<u8> {
    let v6 = spec.group.is_ipv6();
    let mut f = build_udp_frame(&UdpFrame {
        group: if v6 {
            RELAY_IN_ADDR6.into()
        } else {
            RELAY_IN_ADDR.into()
        },
        dst_port: 7100,
        ..spec
    });
    f[..6].copy_from_slice(&rin_mac);
    f
}

/// An ARP request from the injector for the relay's address.
fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&INJECT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&INJECT_MAC);
    f.extend_from_slice(&SENDER_ADDR.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&RELAY_IN_ADDR.octets());
    f.resize(60, 0);
    f
}

/// Applies `edit` to the IPv4 header of an untagged frame and fixes the header checksum.
fn edit_ipv4(mut frame: Vec<u8>, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    let hdr = &mut frame[ETH_HLEN..ETH_HLEN + ihl.max(20)];
    edit(hdr);
    hdr[10..12].fill(0);
    let sum = checksum(hdr);
    hdr[10..12].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// An IPv6 frame with a fragment header right after the fixed header, made a later fragment
/// (offset 1480, more to come) of datagram `id`.
fn v6_later_fragment(mut frame: Vec<u8>, id: u32) -> Vec<u8> {
    let fh = ETH_HLEN + 40;
    frame[fh + 2..fh + 4].copy_from_slice(&(185u16 << 3 | 1).to_be_bytes());
    frame[fh + 4..fh + 8].copy_from_slice(&id.to_be_bytes());
    frame
}

/// `frame` as a sender with transmit checksum offload hands it to a veth: the UDP checksum
/// field holds only the pseudo-header's sum.
fn partial(mut frame: Vec<u8>) -> Vec<u8> {
    make_udp_checksum_partial(&mut frame);
    frame
}

/// Whether a frame's UDP checksum is partial (what the relay completes).
fn is_partial(frame: &[u8]) -> bool {
    let Some(flow) = classify(frame) else {
        return false;
    };
    let mut p = frame.to_vec();
    make_udp_checksum_partial(&mut p);
    p[flow.l4 + 6..flow.l4 + 8] == frame[flow.l4 + 6..flow.l4 + 8]
}

/// The UDP length field of an untagged IPv4 frame without options.
const V4_UDP_LEN: usize = ETH_HLEN + 20 + 4;

fn cases(rin_mac: [u8; 6]) -> Vec<Case> {
    let mut id = 0u64;
    let mut next = || {
        id += 1;
        id
    };
    let case = |what, frame, outcome| Case {
        what,
        frame,
        outcome,
    };
    use Outcome::*;
    vec![
        case(
            "IPv4 UDP to a rule's group and port",
            build_udp_frame(&v4(next())),
            Relayed,
        ),
        case(
            "IPv4 with options (IHL 6)",
            build_udp_frame(&UdpFrame {
                ip_options: vec![1, 1, 1, 1],
                ..v4(next())
            }),
            Relayed,
        ),
        case(
            "802.1Q tag, output without vlan: sent untagged",
            build_udp_frame(&UdpFrame {
                vlan: Some(100),
                ..v4(next())
            }),
            Relayed,
        ),
        case(
            "802.1Q priority tag (VID 0), output without vlan: sent untagged",
            build_udp_frame(&UdpFrame {
                vlan: Some(0xa000),
                ..v4(next())
            }),
            Relayed,
        ),
        case(
            "one 802.1ad tag, output without vlan: sent untagged",
            {
                let mut f = build_udp_frame(&UdpFrame {
                    vlan: Some(100),
                    ..v4(next())
                });
                f[12..14].copy_from_slice(&[0x88, 0xa8]);
                f
            },
            Relayed,
        ),
        case(
            "IPv4 UDP checksum 0 (none)",
            build_udp_frame(&UdpFrame {
                udp_checksum: false,
                ..v4(next())
            }),
            Relayed,
        ),
        case(
            "IPv4 UDP partial checksum (sender's tx offload), with options: completed",
            partial(build_udp_frame(&UdpFrame {
                ip_options: vec![1, 1, 1, 1],
                ..v4(next())
            })),
            Relayed,
        ),
        case(
            "TTL 1",
            build_udp_frame(&UdpFrame {
                ttl: 1,
                ..v4(next())
            }),
            TtlExpired,
        ),
        case(
            "TTL 0",
            build_udp_frame(&UdpFrame {
                ttl: 0,
                ..v4(next())
            }),
            TtlExpired,
        ),
        // Fragments are made by editing whole frames, so a "later fragment" holds a UDP header
        // and payload as its data: the test can still tell which case arrived.
        case(
            "IPv4 first fragment (more-fragments set)",
            edit_ipv4(build_udp_frame(&v4(next())), |h| {
                h[6..8].copy_from_slice(&[0x20, 0])
            }),
            Relayed,
        ),
        case(
            "IPv4 later fragment (offset 1480) after its first",
            edit_ipv4(build_udp_frame(&v4(next())), |h| {
                h[6..8].copy_from_slice(&185u16.to_be_bytes())
            }),
            Relayed,
        ),
        case(
            "IPv4 later fragment (offset 1480) whose first never came",
            edit_ipv4(build_udp_frame(&v4(next())), |h| {
                h[4..6].copy_from_slice(&[0x42, 0x42]);
                h[6..8].copy_from_slice(&185u16.to_be_bytes())
            }),
            UnknownFragment,
        ),
        case(
            "QinQ: 802.1ad outer and 802.1Q inner tag",
            {
                let mut f = build_udp_frame(&UdpFrame {
                    vlan: Some(100),
                    ..v4(next())
                });
                f.splice(12..12, [0x88, 0xa8, 0x00, 0x07]);
                f
            },
            Passed,
        ),
        case(
            "IGMP to the rule's group",
            edit_ipv4(build_udp_frame(&v4(next())), |h| h[9] = 2),
            Passed,
        ),
        case(
            "PIM to 224.0.0.13",
            edit_ipv4(
                build_udp_frame(&UdpFrame {
                    group: "224.0.0.13".parse().unwrap(),
                    ..v4(next())
                }),
                |h| h[9] = 103,
            ),
            Passed,
        ),
        case(
            "broadcast UDP to the rule's port",
            {
                let mut f = edit_ipv4(build_udp_frame(&v4(next())), |h| h[16..20].fill(0xff));
                f[..6].fill(0xff);
                f
            },
            Passed,
        ),
        case(
            "unicast UDP to the relay's address",
            {
                let mut f = edit_ipv4(build_udp_frame(&v4(next())), |h| {
                    h[16..20].copy_from_slice(&RELAY_IN_ADDR.octets())
                });
                f[..6].copy_from_slice(&rin_mac);
                f
            },
            Passed,
        ),
        case(
            "IPv4 UDP to a port no rule has",
            build_udp_frame(&UdpFrame {
                dst_port: 5001,
                ..v4(next())
            }),
            Passed,
        ),
        case(
            "Ethernet header only",
            build_udp_frame(&v4(next()))[..ETH_HLEN].to_vec(),
            Passed,
        ),
        case(
            "IPv4 header cut at 10 bytes",
            build_udp_frame(&v4(next()))[..ETH_HLEN + 10].to_vec(),
            Passed,
        ),
        case(
            "UDP header cut at 4 bytes",
            build_udp_frame(&v4(next()))[..ETH_HLEN + 24].to_vec(),
            Passed,
        ),
        case(
            "IP version 5 in an IPv4 ethertype",
            edit_ipv4(build_udp_frame(&v4(next())), |h| h[0] = 0x55),
            Passed,
        ),
        case(
            "IHL 4 (below the minimum)",
            edit_ipv4(build_udp_frame(&v4(next())), |h| h[0] = 0x44),
            Passed,
        ),
        case(
            "1700-byte frame, above the egress MTU (1500)",
            build_udp_frame(&UdpFrame {
                payload: payload(next(), 1700 - 42),
                ..v4(0)
            }),
            TooLarge,
        ),
        case(
            "2500-byte frame, above what a 2048-byte UMEM frame holds",
            build_udp_frame(&UdpFrame {
                payload: payload(next(), 2500 - 42),
                ..v4(0)
            }),
            Oversize,
        ),
        case(
            "IPv4 total length past the frame",
            edit_ipv4(build_udp_frame(&v4(next())), |h| {
                let t = u16::from_be_bytes([h[2], h[3]]) + 100;
                h[2..4].copy_from_slice(&t.to_be_bytes());
            }),
            Malformed,
        ),
        case(
            "IPv4 total length below its headers",
            edit_ipv4(build_udp_frame(&v4(next())), |h| {
                h[2..4].copy_from_slice(&24u16.to_be_bytes())
            }),
            Malformed,
        ),
        case(
            "UDP length past the IP packet",
            {
                let mut f = build_udp_frame(&v4(next()));
                f[V4_UDP_LEN..V4_UDP_LEN + 2].copy_from_slice(&200u16.to_be_bytes());
                f
            },
            Malformed,
        ),
        case(
            "UDP length below its header",
            {
                let mut f = build_udp_frame(&v4(next()));
                f[V4_UDP_LEN..V4_UDP_LEN + 2].copy_from_slice(&4u16.to_be_bytes());
                f
            },
            Malformed,
        ),
        case(
            "IPv6 UDP to a rule's group and port",
            build_udp_frame(&v6(next())),
            Relayed,
        ),
        case(
            "IPv6 with four extension headers (hop-by-hop, destination, routing, destination)",
            build_udp_frame(&UdpFrame {
                ipv6_ext: vec![0, 60, 43, 60],
                ..v6(next())
            }),
            Relayed,
        ),
        case(
            "IPv6 with five extension headers",
            build_udp_frame(&UdpFrame {
                ipv6_ext: vec![0, 60, 43, 60, 60],
                ..v6(next())
            }),
            Passed,
        ),
        case(
            "IPv6 first fragment (fragment header, offset 0, more set)",
            build_udp_frame(&UdpFrame {
                ipv6_ext: vec![NEXTHDR_FRAGMENT],
                ..v6(next())
            }),
            Relayed,
        ),
        case(
            "IPv6 later fragment (offset 1480) after its first",
            v6_later_fragment(
                build_udp_frame(&UdpFrame {
                    ipv6_ext: vec![NEXTHDR_FRAGMENT],
                    ..v6(next())
                }),
                1,
            ),
            Relayed,
        ),
        case(
            "IPv6 later fragment (offset 1480) whose first never came",
            v6_later_fragment(
                build_udp_frame(&UdpFrame {
                    ipv6_ext: vec![NEXTHDR_FRAGMENT],
                    ..v6(next())
                }),
                7,
            ),
            UnknownFragment,
        ),
        case(
            "ICMPv6 to the rule's group",
            {
                let mut f = build_udp_frame(&v6(next()));
                f[ETH_HLEN + 6] = 58;
                f
            },
            Passed,
        ),
        case(
            "IPv6 hop limit 1",
            build_udp_frame(&UdpFrame {
                ttl: 1,
                ..v6(next())
            }),
            TtlExpired,
        ),
        case(
            "IPv6 UDP checksum 0 (forbidden): recomputed",
            build_udp_frame(&UdpFrame {
                udp_checksum: false,
                ..v6(next())
            }),
            Relayed,
        ),
        case(
            "IPv6 UDP partial checksum (sender's tx offload), after two extension headers: completed",
            partial(build_udp_frame(&UdpFrame {
                ipv6_ext: vec![0, 60],
                ..v6(next())
            })),
            Relayed,
        ),
        case(
            "IPv6 cut inside an extension header",
            build_udp_frame(&UdpFrame {
                ipv6_ext: vec![0, 60],
                ..v6(next())
            })[..ETH_HLEN + 40 + 12]
                .to_vec(),
            Passed,
        ),
        case(
            "IPv6 payload length past the frame",
            {
                let mut f = build_udp_frame(&v6(next()));
                let at = ETH_HLEN + 4;
                let len = u16::from_be_bytes([f[at], f[at + 1]]) + 100;
                f[at..at + 2].copy_from_slice(&len.to_be_bytes());
                f
            },
            Malformed,
        ),
        case(
            "IPv6 UDP to the relay's unicast address",
            {
                let mut f = build_udp_frame(&v6(next()));
                f[ETH_HLEN + 24..ETH_HLEN + 40].copy_from_slice(&RELAY_IN_ADDR6.octets());
                f[..6].copy_from_slice(&rin_mac);
                f
            },
            Passed,
        ),
        case(
            "IPv4 UDP to a unicast rule's destination and port",
            to_relay(v4(next()), rin_mac),
            Relayed,
        ),
        case(
            "IPv4 UDP to a unicast rule's destination, with options",
            to_relay(
                UdpFrame {
                    ip_options: vec![1, 1, 1, 1],
                    ..v4(next())
                },
                rin_mac,
            ),
            Relayed,
        ),
        case(
            "IPv4 UDP to a unicast rule's destination, another port",
            {
                let mut f = to_relay(v4(next()), rin_mac);
                // Port and checksum both moved by one: the checksum stays right.
                f[V4_UDP_LEN - 2..V4_UDP_LEN].copy_from_slice(&7101u16.to_be_bytes());
                let at = V4_UDP_LEN + 2;
                let sum = u16::from_be_bytes([f[at], f[at + 1]]).wrapping_sub(1);
                f[at..at + 2].copy_from_slice(&sum.to_be_bytes());
                f
            },
            Passed,
        ),
        case(
            "TCP to a unicast rule's destination and port",
            edit_ipv4(to_relay(v4(next()), rin_mac), |h| h[9] = 6),
            Passed,
        ),
        case(
            "ICMP to a unicast rule's destination",
            edit_ipv4(to_relay(v4(next()), rin_mac), |h| h[9] = 1),
            Passed,
        ),
        case(
            "ARP request for a unicast rule's destination",
            {
                // Every case has its number, payload or not.
                next();
                arp_request()
            },
            Passed,
        ),
        case(
            "IPv4 first fragment to a unicast rule's destination",
            edit_ipv4(to_relay(v4(next()), rin_mac), |h| {
                h[4..6].copy_from_slice(&[0x51, 0x51]);
                h[6..8].copy_from_slice(&[0x20, 0])
            }),
            Relayed,
        ),
        case(
            "IPv4 later fragment to a unicast rule's destination, after its first",
            edit_ipv4(to_relay(v4(next()), rin_mac), |h| {
                h[4..6].copy_from_slice(&[0x51, 0x51]);
                h[6..8].copy_from_slice(&185u16.to_be_bytes())
            }),
            Relayed,
        ),
        case(
            "IPv4 UDP to a unicast rule's destination, UDP length past the IP packet",
            {
                let mut f = to_relay(v4(next()), rin_mac);
                f[V4_UDP_LEN..V4_UDP_LEN + 2].copy_from_slice(&200u16.to_be_bytes());
                f
            },
            Malformed,
        ),
        case(
            "IPv4 UDP to a unicast rule's destination, TTL 1",
            to_relay(
                UdpFrame {
                    ttl: 1,
                    ..v4(next())
                },
                rin_mac,
            ),
            TtlExpired,
        ),
        case(
            "IPv6 UDP to a unicast rule's destination and port",
            to_relay(v6(next()), rin_mac),
            Relayed,
        ),
        case(
            "IPv6 UDP to a unicast rule's destination, after two extension headers",
            to_relay(
                UdpFrame {
                    ipv6_ext: vec![0, 60],
                    ..v6(next())
                },
                rin_mac,
            ),
            Relayed,
        ),
        case(
            "IPv6 first fragment to a unicast rule's destination",
            to_relay(
                UdpFrame {
                    ipv6_ext: vec![NEXTHDR_FRAGMENT],
                    ..v6(next())
                },
                rin_mac,
            ),
            Relayed,
        ),
        case(
            "IPv6 later fragment to a unicast rule's destination, after its first",
            v6_later_fragment(
                to_relay(
                    UdpFrame {
                        ipv6_ext: vec![NEXTHDR_FRAGMENT],
                        ..v6(next())
                    },
                    rin_mac,
                ),
                1,
            ),
            Relayed,
        ),
        case(
            "IPv6 UDP to a unicast rule's destination, payload length past the frame",
            {
                let mut f = to_relay(v6(next()), rin_mac);
                let at = ETH_HLEN + 4;
                let len = u16::from_be_bytes([f[at], f[at + 1]]) + 100;
                f[at..at + 2].copy_from_slice(&len.to_be_bytes());
                f
            },
            Malformed,
        ),
    ]
}

fn is_injected(frame: &[u8]) -> bool {
    frame.get(6..12) == Some(&INJECT_MAC)
}

fn is_relayed(frame: &[u8]) -> bool {
    classify(frame).is_some()
}

/// The frame as an AF_PACKET socket sees it arrive: the kernel moves the outer VLAN tag
/// into the packet's metadata before the taps run.
fn as_received(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    if f.len() >= 16 && matches!(f[12..14], [0x81, 0x00] | [0x88, 0xa8]) {
        f.drain(12..16);
    }
    f
}

/// Checks a relayed frame's checksums and hop count; returns the payload's sequence number.
fn verify_relayed(frame: &[u8]) -> u64 {
    let flow = classify(frame).unwrap();
    assert_eq!(flow.tci, None, "sent untagged: {frame:02x?}");
    if flow.is_later_fragment() {
        // No UDP header to check: the IP header, and the data (the whole frame's UDP header
        // and payload) intact.
        let (end, hops) = match flow.group {
            IpAddr::V4(_) => {
                let ip = Ipv4Packet::new_checked(&frame[flow.l3..]).unwrap();
                assert_eq!(checksum(ip.header()), 0, "IPv4 header checksum");
                (flow.l3 + usize::from(ip.total_len()), ip.ttl())
            }
            IpAddr::V6(_) => {
                let ip = Ipv6Packet::new_checked(&frame[flow.l3..]).unwrap();
                (flow.l3 + 40 + usize::from(ip.payload_len()), ip.hop_limit())
            }
        };
        assert_eq!(hops, 7, "TTL or hop limit 8 - 1");
        return check_payload(&frame[flow.l4 + 8..end]).expect("fragment data intact");
    }
    let (udp_bytes, hops, expected) = common::udp_from_scratch(frame, &flow);
    assert_eq!(hops, 7, "TTL or hop limit 8 - 1");
    let udp = UdpPacket::new_checked(udp_bytes).unwrap();
    if udp.checksum() != 0 || flow.group.is_ipv6() {
        assert_eq!(udp.checksum(), expected, "UDP checksum of {frame:02x?}");
    }
    check_payload(udp.payload()).expect("payload intact")
}

/// The table in docs/ARCHITECTURE.md, as this test renders it.
fn table_rows(cases: &[Case]) -> Vec<String> {
    cases
        .iter()
        .map(|c| format!("| {} | {} |", c.what, c.outcome.describe()))
        .collect()
}

#[test]
fn hostile_frames_get_the_documented_outcome() {
    require_root();
    let topo = Topology::new(1).unwrap();
    // Room on the ingress link for frames longer than a UMEM frame (the egress stays at 1500).
    topo.sender
        .exec(&["ip", "link", "set", SENDER_IF, "mtu", "3000"])
        .unwrap();
    topo.relay
        .exec(&["ip", "link", "set", RELAY_IN, "mtu", "3000"])
        .unwrap();
    let rin_mac = common::mac_of(&topo, RELAY_IN);
    let cases = cases(rin_mac);
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    let count = |o: Outcome| cases.iter().filter(|c| c.outcome == o).count() as u64;
    let before = stats_until(&relay.control, |_| true);

    let rx = &topo.receivers[0];
    let mut limits = Limits::new(count(Outcome::Relayed));
    limits.idle = Duration::from_secs(2);
    // With the tags as sent: the relay's output has no `vlan:`, so every frame leaves untagged.
    let relayed = capture_tagged(&rx.ns, &rx.iface, limits, is_relayed).unwrap();
    let mut limits = Limits::new(
        count(Outcome::Passed) + count(Outcome::Oversize) + count(Outcome::UnknownFragment),
    );
    limits.idle = Duration::from_secs(2);
    let passed = capture(&topo.relay, RELAY_IN, limits, is_injected).unwrap();
    let frames: Vec<Vec<u8>> = cases.iter().map(|c| c.frame.clone()).collect();
    let sent =
        join(inject(&topo.sender, SENDER_IF, frames, Duration::from_millis(5)).unwrap()).unwrap();
    assert_eq!(sent, cases.len());

    // Relayed: exactly the cases that should be, each rewritten correctly.
    let relayed: Vec<Vec<u8>> = join(relayed).unwrap();
    let ids: BTreeSet<u64> = relayed.iter().map(|f| verify_relayed(f)).collect();
    let want: BTreeSet<u64> = (1..=cases.len() as u64)
        .filter(|i| cases[*i as usize - 1].outcome == Outcome::Relayed)
        .collect();
    assert_eq!(ids, want, "the relayed cases");
    assert_eq!(relayed.len(), want.len(), "each relayed once");

    // Passed: the kernel's stack saw exactly these, byte for byte; redirected frames never
    // reach it.
    let seen: Vec<Vec<u8>> = join(passed).unwrap();
    for c in &cases {
        let arrived = seen.contains(&as_received(&c.frame));
        assert_eq!(
            arrived,
            c.outcome.reaches_stack(),
            "{}: reached the relay's own stack: {arrived}",
            c.what
        );
    }

    // The data path publishes its counters every 100 ms; wait until it has seen them all.
    let redirected = count(Outcome::Relayed)
        + count(Outcome::TtlExpired)
        + count(Outcome::Malformed)
        + count(Outcome::TooLarge);
    let after = stats_until(&relay.control, |v| {
        let received: u64 = v.rules.iter().map(|r| r.received).sum();
        received + v.malformed == redirected
    });
    let delta = |k: &str| after.xdp[k] - before.xdp[k];
    assert_eq!(delta("redirected"), redirected, "{after:?}");
    assert_eq!(delta("oversize"), count(Outcome::Oversize), "{after:?}");
    assert_eq!(
        delta("fragments_unknown"),
        count(Outcome::UnknownFragment),
        "{after:?}"
    );
    assert_eq!(
        delta("fragments"),
        4,
        "the four later fragments after their first (two to groups, two to unicast rules)"
    );
    assert_eq!(
        delta("matched"),
        redirected + count(Outcome::Oversize),
        "{after:?}"
    );
    assert_eq!(
        after.malformed - before.malformed,
        count(Outcome::Malformed),
        "{after:?}"
    );
    let out = |k: &str| -> u64 {
        after
            .rules
            .iter()
            .map(|r| r.outputs[0].dropped.get(k).copied().unwrap_or(0))
            .sum()
    };
    assert_eq!(out("ttl_expired"), count(Outcome::TtlExpired), "{after:?}");
    assert_eq!(out("too_large"), count(Outcome::TooLarge), "{after:?}");
    let sent: u64 = after.rules.iter().map(|r| r.outputs[0].sent).sum();
    assert_eq!(sent, count(Outcome::Relayed), "{after:?}");
    let completed =
        |v: &relay::stats::StatsView| -> u64 { v.rules.iter().map(|r| r.checksum_completed).sum() };
    let partials = cases
        .iter()
        .filter(|c| c.outcome == Outcome::Relayed && is_partial(&c.frame))
        .count() as u64;
    assert_eq!(partials, 2, "the two partial-checksum cases, and only they");
    assert_eq!(
        completed(&after) - completed(&before),
        partials,
        "{after:?}"
    );
    assert_eq!(
        after.copies, 0,
        "one output: the received frame itself goes out"
    );

    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
    assert!(!topo.relay_has_xdp().unwrap());

    // The documented table is this one.
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/ARCHITECTURE.md"
    ))
    .unwrap();
    let missing: Vec<String> = table_rows(&cases)
        .into_iter()
        .filter(|row| !doc.contains(row.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md lacks these rows of the hostile-frame table:\n{}",
        missing.join("\n")
    );
}
