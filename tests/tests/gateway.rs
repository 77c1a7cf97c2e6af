//! The relay as a gateway, on real kernel paths: multicast to unicast (on-link and behind a
//! gateway route) with the source address and port rewritten and DSCP set, received by
//! ordinary UDP sockets on a host with a strict reverse-path filter; unicast to multicast
//! with the source rewritten and the TTL set; other unicast to the relay host untouched. The
//! next hop is the kernel's: its MAC changes, its entry is flushed, or it never resolves, and
//! the relay follows and counts. IPv4 and IPv6 (ND), both allocators.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use relay::{
    checksum::{checksum, udp_ipv4, udp_ipv6},
    craft::{UdpFrame, build_udp_frame},
    stats::StatsView,
    wire::{EthernetFrame, Ipv4Packet, Ipv6Packet, UdpPacket, classify, classify_udp},
};
use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{RELAY_IN_ADDR, RELAY_IN_ADDR6, SENDER_ADDR, SENDER_ADDR6, SENDER_IF, Topology},
    traffic::{Flow, Limits, capture, check_payload, inject, join, listen, listen_unicast, send},
};

mod common;
use common::{client_ok, dad_done, mac_in, mac_of, serial, stats_until, stop_clean};

const N: u64 = 300;
const INJECT_MAC: [u8; 6] = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x05];
/// DSCP 10 with ECN 01, as the injected frames carry it.
const MARKED: u8 = 10 << 2 | 0b01;

const RX0: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const RX0_6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 2);
const ROUT0: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const ROUT0_6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 1);
const ROUT1: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const ROUT1_6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 3, 0, 0, 0, 1);
/// Behind receiver 1, which routes it (has it on its loopback).
const FAR: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 9);
const FAR_6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 9, 0, 0, 0, 0, 9);

const GATEWAY_RULES: &str = "\
rules:
  - name: to-unicast
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs:
      - { interface: rout0, destination: 198.18.2.2, port: 7000, source: auto, source_port: 7001, dscp: 46 }
      - { interface: rout0, destination: 198.18.2.2, port: 7005 }
      - { interface: rout1, destination: 198.18.9.9, port: 7002, source: auto }
  - name: to-unicast6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs:
      - { interface: rout0, destination: '2001:2:0:2::2', port: 7000, source: auto, source_port: 7001, dscp: 46 }
      - { interface: rout1, destination: '2001:2:9::9', port: 7002, source: auto }
  - name: to-group
    input: { interface: rin, destination: 198.18.1.2, port: 7100 }
    outputs:
      - { interface: rout1, group: 239.5.5.5, port: 5000, ttl: 8, source: auto }
  - name: to-group6
    input: { interface: rin, destination: '2001:2:0:1::2', port: 7100 }
    outputs:
      - { interface: rout1, group: 'ff18::5:5', port: 5000, ttl: 8, source: auto }
";

/// Unicast UDP on the relay's egress links (a relayed frame; the links' own ND and ARP are
/// not UDP).
fn unicast_udp(frame: &[u8]) -> bool {
    frame.get(6..12) != Some(&INJECT_MAC)
        && classify_udp(frame).is_some_and(|f| !f.group.is_multicast())
}

/// What a captured frame says: (source MAC, destination MAC, source, destination, source
/// port, destination port, TTL or hop limit, traffic class, payload), after checking its IPv4
/// header checksum and its UDP checksum from scratch.
struct Seen {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    source: IpAddr,
    dest: IpAddr,
    sport: u16,
    dport: u16,
    hops: u8,
    class: u8,
    payload: Vec<u8>,
}

fn inspect(frame: &[u8]) -> Seen {
    let flow = classify_udp(frame).expect("a UDP frame");
    let eth = EthernetFrame::new_checked(frame).unwrap();
    let l3 = &frame[flow.l3..];
    let (udp_bytes, hops, class, want) = match (flow.source, flow.group) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = Ipv4Packet::new_checked(l3).unwrap();
            assert_eq!(checksum(ip.header()), 0, "IPv4 header checksum");
            let udp = &frame[flow.l4..flow.l3 + usize::from(ip.total_len())];
            let mut z = udp.to_vec();
            z[6..8].fill(0);
            (udp, ip.ttl(), l3[1], udp_ipv4(s, d, &z))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Packet::new_checked(l3).unwrap();
            let udp = &frame[flow.l4..flow.l3 + 40 + usize::from(ip.payload_len())];
            let mut z = udp.to_vec();
            z[6..8].fill(0);
            let class = (l3[0] & 0x0f) << 4 | l3[1] >> 4;
            (udp, ip.hop_limit(), class, udp_ipv6(s, d, &z))
        }
        _ => panic!("mixed families: {frame:02x?}"),
    };
    let udp = UdpPacket::new_checked(udp_bytes).unwrap();
    assert_eq!(udp.checksum(), want, "UDP checksum of {frame:02x?}");
    Seen {
        src_mac: eth.src_mac(),
        dst_mac: eth.dst_mac(),
        source: flow.source,
        dest: flow.group,
        sport: udp.src_port(),
        dport: udp.dst_port(),
        hops,
        class,
        payload: udp.payload().to_vec(),
    }
}

/// Waits (5 s at most) until no IPv6 address in `ns` is still tentative.
fn mac_text(m: [u8; 6]) -> String {
    relay::nexthop::MacDisplay(m).to_string()
}

/// Frames to the group, marked `MARKED`, injected on the sender's link: the ECN bits must
/// survive `dscp:`.
fn marked(seq: u64, v6: bool) -> Vec<u8> {
    let (source, group): (IpAddr, IpAddr) = if v6 {
        (SENDER_ADDR6.into(), "ff18::1:1".parse().unwrap())
    } else {
        (SENDER_ADDR.into(), "239.1.1.1".parse().unwrap())
    };
    let mut f = build_udp_frame(&UdpFrame {
        src_mac: INJECT_MAC,
        ..UdpFrame::simple(
            source,
            group,
            5000,
            8,
            &relay_tests::traffic::payload(seq, 100),
        )
    });
    let l3 = classify(&f).unwrap().l3;
    if v6 {
        f[l3] = (f[l3] & 0xf0) | MARKED >> 4;
        f[l3 + 1] = (f[l3 + 1] & 0x0f) | (MARKED & 0x0f) << 4;
    } else {
        f[l3 + 1] = MARKED;
        f[l3 + 10..l3 + 12].fill(0);
        let sum = checksum(&f[l3..l3 + 20]);
        f[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
    }
    f
}

fn output<'a>(v: &'a StatsView, rule: &str, i: usize) -> &'a relay::stats::OutputView {
    &v.rules.iter().find(|r| r.name == rule).unwrap().outputs[i]
}

fn received(v: &StatsView, rule: &str) -> u64 {
    v.rules.iter().find(|r| r.name == rule).unwrap().received
}

fn dropped(o: &relay::stats::OutputView, reason: &str) -> u64 {
    o.dropped.get(reason).copied().unwrap_or(0)
}

/// Routes 198.18.9.0/24 and 2001:2:9::/64 (FAR, FAR_6) through receiver 1, on rout1.
fn route_far_via_receiver1(topo: &Topology) {
    topo.relay
        .exec(&["ip", "route", "add", "198.18.9.0/24", "via", "198.18.3.2"])
        .unwrap();
    topo.relay
        .exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "2001:2:9::/64",
            "via",
            "2001:2:0:3::2",
        ])
        .unwrap();
}

/// `offload`: the sender keeps its veth's transmit checksum offload on (as a container
/// does), so every datagram it sends reaches the relay with a partial UDP checksum, completed
/// before the source and destination rewrites.
fn gateway(allocator: &str, offload: bool) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    if offload {
        topo.sender_tx_offload_on().unwrap();
    }
    // Receiver 0 filters strictly: a datagram whose source it has no route back to through
    // rcv0 (the sender's own, 198.18.1.1) is dropped before any socket sees it.
    for conf in ["all", "default", r0.iface.as_str()] {
        r0.ns
            .exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{conf}.rp_filter=1"),
            ])
            .unwrap();
    }
    route_far_via_receiver1(&topo);
    r1.ns
        .exec(&["ip", "addr", "add", "198.18.9.9/32", "dev", "lo"])
        .unwrap();
    r1.ns
        .exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:2:9::9/128",
            "dev",
            "lo",
            "nodad",
        ])
        .unwrap();
    // The kernel solicits a neighbour for the relay (which has no datagram of its own
    // waiting) only from a link-local source that has passed duplicate address detection.
    for ns in [&topo.relay, &r0.ns, &r1.ns] {
        dad_done(ns);
    }
    // A relay that has never talked to anyone.
    topo.relay.exec(&["ip", "neigh", "flush", "all"]).unwrap();
    topo.relay
        .exec(&["ip", "-6", "neigh", "flush", "all"])
        .unwrap();

    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        GATEWAY_RULES,
        &["--allocator", allocator],
    )
    .unwrap();
    let (rcv0_mac, rcv1_mac) = (mac_in(&r0.ns, &r0.iface), mac_in(&r1.ns, &r1.iface));
    // Every next hop resolved, with no traffic sent: the relay had the kernel resolve them.
    let v = stats_until(&relay.control, |v| {
        v.rules
            .iter()
            .flat_map(|r| &r.outputs)
            .all(|o| o.next_hop.as_deref() != Some("unresolved"))
    });
    for o in v.rules.iter().flat_map(|r| &r.outputs) {
        assert_ne!(o.next_hop.as_deref(), Some("unresolved"), "{v:?}");
    }
    let (rout0_mac, rout1_mac) = (mac_of(&topo, "rout0"), mac_of(&topo, "rout1"));

    let limits = Limits::new(N + 10);
    let at = |a: IpAddr, p: u16| SocketAddr::new(a, p);
    let sock0 = listen_unicast(&r0.ns, at(RX0.into(), 7000), limits).unwrap();
    let sock0_6 = listen_unicast(&r0.ns, at(RX0_6.into(), 7000), limits).unwrap();
    // Open for as long as the traffic runs: nothing may arrive.
    let mut quiet = Limits::new(1);
    quiet.idle = Duration::from_secs(4);
    let unrewritten = listen_unicast(&r0.ns, at(RX0.into(), 7005), quiet).unwrap();
    let far = listen_unicast(&r1.ns, at(FAR.into(), 7002), limits).unwrap();
    let far6 = listen_unicast(&r1.ns, at(FAR_6.into(), 7002), limits).unwrap();
    let group = listen(
        &r1.ns,
        Ipv4Addr::new(239, 5, 5, 5),
        5000,
        r1.addr,
        Limits::new(N),
    )
    .unwrap();
    let group6 = listen(
        &r1.ns,
        "ff18::5:5".parse::<Ipv6Addr>().unwrap(),
        5000,
        r1.addr6,
        Limits::new(N),
    )
    .unwrap();
    // The relay host's own unicast, to another port of the address a rule takes.
    let host = listen_unicast(&topo.relay, at(RELAY_IN_ADDR.into(), 7101), Limits::new(N)).unwrap();
    let host6 =
        listen_unicast(&topo.relay, at(RELAY_IN_ADDR6.into(), 7101), Limits::new(N)).unwrap();
    let mut cap_limits = Limits::new(3 * (N + 10));
    cap_limits.idle = Duration::from_secs(2);
    let cap0 = capture(&r0.ns, &r0.iface, cap_limits, unicast_udp).unwrap();
    let cap1 = capture(&r1.ns, &r1.iface, Limits::new(2 * N + 20), unicast_udp).unwrap();

    let flows = [
        send(
            &topo.sender,
            SENDER_ADDR,
            Flow::new(Ipv4Addr::new(239, 1, 1, 1), 5000, N),
        ),
        send(
            &topo.sender,
            SENDER_ADDR6,
            Flow::new("ff18::1:1".parse::<Ipv6Addr>().unwrap(), 5000, N),
        ),
        send(&topo.sender, SENDER_ADDR, Flow::new(RELAY_IN_ADDR, 7100, N)),
        send(
            &topo.sender,
            SENDER_ADDR6,
            Flow::new(RELAY_IN_ADDR6, 7100, N),
        ),
        send(&topo.sender, SENDER_ADDR, Flow::new(RELAY_IN_ADDR, 7101, N)),
        send(
            &topo.sender,
            SENDER_ADDR6,
            Flow::new(RELAY_IN_ADDR6, 7101, N),
        ),
    ];
    for f in flows {
        assert_eq!(join(f).unwrap(), N);
    }
    let marks: Vec<Vec<u8>> = (0..10)
        .map(|i| marked(10_000 + i, false))
        .chain((0..10).map(|i| marked(20_000 + i, true)))
        .collect();
    join(inject(&topo.sender, SENDER_IF, marks, Duration::from_millis(2)).unwrap()).unwrap();

    let v = stats_until(&relay.control, |v| {
        received(v, "to-unicast") == N + 10
            && received(v, "to-unicast6") == N + 10
            && received(v, "to-group") == N
            && received(v, "to-group6") == N
    });
    // Every frame the relay matched went out, or waited for its next hop (counted).
    for (rule, outputs, want) in [
        ("to-unicast", 3, N + 10),
        ("to-unicast6", 2, N + 10),
        ("to-group", 1, N),
        ("to-group6", 1, N),
    ] {
        assert_eq!(received(&v, rule), want, "{rule}: {v:?}");
        for i in 0..outputs {
            let o = output(&v, rule, i);
            assert_eq!(o.sent, want, "{rule} output {i}: {o:?}");
            assert_eq!(o.dropped.values().sum::<u64>(), 0, "{o:?}");
        }
    }
    // The sender's datagrams (not the injected ones, which carry full checksums) arrived
    // with partial checksums exactly when its offload was on; the sockets below accept only
    // valid ones.
    for rule in ["to-unicast", "to-unicast6", "to-group", "to-group6"] {
        let r = v.rules.iter().find(|r| r.name == rule).unwrap();
        assert_eq!(r.checksum_completed, if offload { N } else { 0 }, "{rule}");
    }
    let o = output(&v, "to-unicast", 0);
    assert!(o.unicast, "{o:?}");
    assert_eq!(o.group, "198.18.2.2");
    assert_eq!(o.next_hop.as_deref(), Some(mac_text(rcv0_mac).as_str()));
    assert_eq!(o.source.as_deref(), Some("auto (198.18.2.1)"));
    assert_eq!((o.source_port, o.dscp), (Some(7001), Some(46)));
    let far_out = output(&v, "to-unicast", 2);
    assert_eq!(
        far_out.next_hop.as_deref(),
        Some(mac_text(rcv1_mac).as_str()),
        "behind the gateway: the gateway's MAC"
    );
    assert_eq!(
        output(&v, "to-unicast6", 1).next_hop.as_deref(),
        Some(mac_text(rcv1_mac).as_str())
    );
    assert_eq!(
        output(&v, "to-group", 0).source.as_deref(),
        Some("auto (198.18.3.1)")
    );

    // The ordinary sockets: what the relay sent, from the egress's address and port 7001.
    let sent = |rule: &str, i: usize| output(&v, rule, i).sent;
    for (sock, source, rule) in [
        (sock0, IpAddr::from(ROUT0), "to-unicast"),
        (sock0_6, ROUT0_6.into(), "to-unicast6"),
    ] {
        let got = join(sock).unwrap();
        assert_eq!(got.len() as u64, sent(rule, 0), "{rule}");
        for (from, p) in &got {
            assert_eq!(*from, SocketAddr::new(source, 7001), "{rule}");
            check_payload(p).expect("payload intact");
        }
    }
    assert_eq!(
        join(unrewritten).unwrap().len(),
        0,
        "the sender's own source fails the receiver's reverse-path filter"
    );
    assert_eq!(sent("to-unicast", 1), N + 10);
    for (sock, source, rule) in [
        (far, IpAddr::from(ROUT1), "to-unicast"),
        (far6, ROUT1_6.into(), "to-unicast6"),
    ] {
        let got = join(sock).unwrap();
        let i = if rule == "to-unicast" { 2 } else { 1 };
        assert_eq!(got.len() as u64, sent(rule, i), "{rule} behind the gateway");
        assert!(got.iter().all(|(from, _)| from.ip() == source));
    }
    for g in [group, group6] {
        assert_eq!(join(g).unwrap().len() as u64, N, "unicast -> multicast");
    }
    for h in [host, host6] {
        assert_eq!(
            join(h).unwrap().len() as u64,
            N,
            "the host's own unicast is untouched"
        );
    }

    // On the wire: MACs, addresses, ports, TTL, DSCP with ECN kept, checksums.
    let frames0 = join(cap0).unwrap();
    let mut by_port = std::collections::BTreeMap::<u16, u64>::new();
    for f in &frames0 {
        let s = inspect(f);
        *by_port.entry(s.dport).or_default() += 1;
        assert_eq!((s.src_mac, s.dst_mac), (rout0_mac, rcv0_mac), "{f:02x?}");
        assert_eq!(s.hops, 7, "TTL or hop limit 8 - 1");
        match s.dport {
            7000 => {
                let v6 = s.source.is_ipv6();
                assert_eq!(
                    s.source,
                    if v6 {
                        IpAddr::from(ROUT0_6)
                    } else {
                        ROUT0.into()
                    }
                );
                assert_eq!(s.dest, if v6 { IpAddr::from(RX0_6) } else { RX0.into() });
                assert_eq!(s.sport, 7001);
                let seq = check_payload(&s.payload).unwrap();
                let ecn = if seq >= 10_000 { 0b01 } else { 0 };
                assert_eq!(s.class, 46 << 2 | ecn, "DSCP 46, ECN kept: seq {seq}");
            }
            7005 => {
                assert_eq!(s.source, IpAddr::from(SENDER_ADDR), "no source rewrite");
                let seq = check_payload(&s.payload).unwrap();
                assert_eq!(s.class, if seq >= 10_000 { MARKED } else { 0 });
            }
            p => panic!("unexpected port {p}"),
        }
    }
    assert_eq!(
        by_port[&7000],
        sent("to-unicast", 0) + sent("to-unicast6", 0)
    );
    assert_eq!(by_port[&7005], sent("to-unicast", 1));
    for f in join(cap1).unwrap() {
        let s = inspect(&f);
        assert_eq!((s.src_mac, s.dst_mac), (rout1_mac, rcv1_mac));
        assert_eq!(
            s.dest,
            if s.dest.is_ipv6() {
                IpAddr::from(FAR_6)
            } else {
                FAR.into()
            }
        );
    }

    let exit = stop_clean(relay, &topo);
    for want in [
        "destination=198.18.2.2 port=7000",
        "source=auto:198.18.2.1 source_port=7001",
        "destination=2001:2:9::9 port=7002",
        "group=239.5.5.5 port=5000 source=auto:198.18.3.1",
    ] {
        assert!(exit.stdout.contains(want), "{want} in\n{}", exit.stdout);
    }
}

#[test]
fn gateway_paths_with_lockfree_pool_and_sender_offload() {
    gateway("lockfree", true);
}

#[test]
fn gateway_paths_with_mutex_pool() {
    gateway("mutex", false);
}

const FOLLOW_RULES: &str = "\
rules:
  - name: follow
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs:
      - { interface: rout0, destination: 198.18.2.2, port: 7000, source: auto }
      - { interface: rout0, destination: 198.18.2.77, port: 7000, source: auto }
      - { interface: rout1 }
  - name: follow6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs:
      - { interface: rout0, destination: '2001:2:0:2::2', port: 7000, source: auto }
      - { interface: rout0, destination: '2001:2:0:2::77', port: 7000, source: auto }
      - { interface: rout1 }
";

/// Polls the relay's view until both families' first output shows `mac` as its next hop;
/// how long that took.
fn until_next_hop(relay: &RelayProc, mac: Option<[u8; 6]>, within: Duration) -> Duration {
    let want = mac.map_or("unresolved".to_owned(), mac_text);
    let start = Instant::now();
    loop {
        let v = stats_until(&relay.control, |_| true);
        let now: Vec<Option<String>> = ["follow", "follow6"]
            .iter()
            .map(|r| output(&v, r, 0).next_hop.clone())
            .collect();
        if now.iter().all(|n| n.as_deref() == Some(want.as_str())) {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "next hops {now:?}, want {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn follows(allocator: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let r0 = &topo.receivers[0];
    // The receiver announces a new MAC (gratuitous ARP, unsolicited NA), as a host that
    // replaced its NIC or a VM that moved does.
    r0.ns
        .exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{}.arp_notify=1", r0.iface),
        ])
        .unwrap();
    r0.ns
        .exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{}.ndisc_notify=1", r0.iface),
        ])
        .unwrap();
    for ns in [&topo.relay, &r0.ns] {
        dad_done(ns);
    }
    topo.relay.exec(&["ip", "neigh", "flush", "all"]).unwrap();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        FOLLOW_RULES,
        &["--allocator", allocator],
    )
    .unwrap();
    let old_mac = mac_in(&r0.ns, &r0.iface);
    until_next_hop(&relay, Some(old_mac), Duration::from_secs(3));

    // About 1,000 datagrams a second per family for three seconds.
    const FLOW: u64 = 3000;
    let mut limits = Limits::new(2 * FLOW);
    limits.idle = Duration::from_secs(2);
    let sock = listen_unicast(&r0.ns, SocketAddr::new(RX0.into(), 7000), limits).unwrap();
    let sock6 = listen_unicast(&r0.ns, SocketAddr::new(RX0_6.into(), 7000), limits).unwrap();
    // The links' own ARP and ND (the relay keeps its next hop's entry fresh) keep a capture
    // from going idle: it ends at the flows' length and a margin.
    let mut cap_limits = Limits::new(2 * FLOW);
    cap_limits.max = Duration::from_secs(10);
    let cap = capture(&r0.ns, &r0.iface, cap_limits, unicast_udp).unwrap();
    let senders = paced_flows(&topo, FLOW);
    // Past the kernel's lock time (1 s), so the announcement may override the entry.
    std::thread::sleep(Duration::from_millis(1100));
    let new_mac = [0x02, 0x42, 0, 0, 0x0a, 0x0b];
    r0.ns
        .exec(&[
            "ip",
            "link",
            "set",
            "dev",
            &r0.iface,
            "address",
            &mac_text(new_mac),
        ])
        .unwrap();
    let took = until_next_hop(&relay, Some(new_mac), Duration::from_secs(2));
    assert!(
        took < Duration::from_secs(1),
        "followed the new MAC in {took:?}"
    );
    // The relay's neighbour entries are flushed: it has the kernel resolve them again, and
    // counts what it cannot send meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    topo.relay
        .exec(&["ip", "neigh", "flush", "dev", "rout0"])
        .unwrap();
    topo.relay
        .exec(&["ip", "-6", "neigh", "flush", "dev", "rout0"])
        .unwrap();
    until_next_hop(&relay, Some(new_mac), Duration::from_secs(3));
    for s in senders {
        assert_eq!(join(s).unwrap(), FLOW);
    }

    let v = stats_until(&relay.control, |v| {
        received(v, "follow") == FLOW && received(v, "follow6") == FLOW
    });
    let (got, got6) = (join(sock).unwrap(), join(sock6).unwrap());
    let frames = join(cap).unwrap();
    let mut old_after = 0;
    // Per family: IPv4 follows the gratuitous ARP, IPv6 the unsolicited NA.
    let mut seen_new = [false; 2];
    for f in &frames {
        let s = inspect(f);
        let fam = usize::from(s.dest.is_ipv6());
        if s.dst_mac == new_mac {
            seen_new[fam] = true;
        } else {
            assert_eq!(s.dst_mac, old_mac);
            assert!(
                !seen_new[fam],
                "no frame to the old MAC once the new one is used"
            );
            old_after += 1;
        }
    }
    assert_eq!(seen_new, [true, true]);
    for (rule, sock) in [("follow", &got), ("follow6", &got6)] {
        let o = output(&v, rule, 0);
        // Every frame matched went out or was counted as waiting for its next hop.
        assert_eq!(o.sent + dropped(o, "no_neighbour"), FLOW, "{rule}: {o:?}");
        // The socket got everything sent but the frames to the old MAC after it changed.
        let seqs: BTreeSet<u64> = sock
            .iter()
            .map(|(_, p)| check_payload(p).unwrap())
            .collect();
        assert_eq!(seqs.len(), sock.len(), "no duplicates");
        assert!(sock.len() as u64 <= o.sent, "{rule}");
        // The one that never resolves: every frame counted, none sent.
        let lost = output(&v, rule, 1);
        assert_eq!(
            (lost.sent, dropped(lost, "no_neighbour")),
            (0, FLOW),
            "{lost:?}"
        );
        assert_eq!(lost.next_hop.as_deref(), Some("unresolved"));
        // The group output beside them is unaffected.
        let g = output(&v, rule, 2);
        assert_eq!(
            (g.sent, g.dropped.values().sum::<u64>()),
            (FLOW, 0),
            "{g:?}"
        );
    }
    let sent_both = output(&v, "follow", 0).sent + output(&v, "follow6", 0).sent;
    assert_eq!(
        frames.len() as u64,
        sent_both,
        "every frame sent reached the receiver's link"
    );
    let delivered = (got.len() + got6.len()) as u64;
    // The frames in between: sent to the old MAC after the change, dropped by the receiver.
    // At about 1,000 a second per family, less than a second's worth of them.
    let in_between = sent_both - delivered;
    assert!(in_between <= old_after, "{in_between} > {old_after}");
    assert!(in_between < 2000, "{in_between} frames went to the old MAC");

    stop_clean(relay, &topo);
}

#[test]
fn next_hops_follow_with_lockfree_pool() {
    follows("lockfree");
}

#[test]
fn next_hops_follow_with_mutex_pool() {
    follows("mutex");
}

/// `count` datagrams to 239.1.1.1 and to ff18::1:1, port 5000, each at about 1,000 a second
/// (4 every 4 ms): long enough for things to happen under them.
fn paced_flows(topo: &Topology, count: u64) -> [std::thread::JoinHandle<anyhow::Result<u64>>; 2] {
    let flow = |group: IpAddr| Flow {
        burst: 4,
        pause: Duration::from_millis(4),
        ..Flow::new(group, 5000, count)
    };
    [
        send(
            &topo.sender,
            SENDER_ADDR,
            flow("239.1.1.1".parse().unwrap()),
        ),
        send(
            &topo.sender,
            SENDER_ADDR6,
            flow("ff18::1:1".parse().unwrap()),
        ),
    ]
}

const KEEP_RULES: &str = "\
rules:
  - name: keep
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0, destination: 198.18.2.2, port: 7000, source: auto }]
  - name: keep6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs: [{ interface: rout0, destination: '2001:2:0:2::2', port: 7000, source: auto }]
";

/// While a flow runs: a reload that adds a unicast rule, an add-rule, a remove-rule, and the
/// egress's addresses changed. The outputs that stay lose nothing (no frame waits for a next
/// hop again, every frame reaches the receiver), and `source: auto` moves to the new
/// address within a second, in both families.
fn reloads_and_readdressing(allocator: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    for ns in [&topo.relay, &r0.ns, &r1.ns] {
        dad_done(ns);
    }
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        KEEP_RULES,
        &["--allocator", allocator],
    )
    .unwrap();
    let resolved = |v: &StatsView| {
        v.rules
            .iter()
            .flat_map(|r| &r.outputs)
            .all(|o| o.next_hop.as_deref() != Some("unresolved"))
    };
    assert!(resolved(&stats_until(&relay.control, resolved)));
    const FLOW: u64 = 3000;
    let mut limits = Limits::new(FLOW);
    limits.idle = Duration::from_secs(3);
    let sock = listen_unicast(&r0.ns, SocketAddr::new(RX0.into(), 7000), limits).unwrap();
    let sock6 = listen_unicast(&r0.ns, SocketAddr::new(RX0_6.into(), 7000), limits).unwrap();
    let senders = paced_flows(&topo, FLOW);

    let run = |args: &[&str]| client_ok(&relay.control, args);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(
        &relay.config,
        format!(
            "{KEEP_RULES}  - name: more\n    input: {{ interface: rin, group: 239.2.2.2, port: 5000 }}\n    outputs: [{{ interface: rout1, destination: 198.18.3.2, source_port: 9 }}]\n"
        ),
    )
    .unwrap();
    run(&["reload"]);
    let extra = relay.config.with_file_name("extra.yaml");
    std::fs::write(
        &extra,
        "name: extra\ninput: { interface: rin, group: 'ff18::3:3', port: 5000 }\noutputs: [{ interface: rout1, destination: '2001:2:0:3::2' }]\n",
    )
    .unwrap();
    run(&["add-rule", extra.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(300));
    run(&["remove-rule", "more"]);

    // New addresses on rout0, the old ones removed (a secondary IPv4 address is promoted).
    for cmd in [
        "sysctl -qw net.ipv4.conf.rout0.promote_secondaries=1",
        "ip addr add 198.18.2.10/24 dev rout0",
        "ip -6 addr add 2001:2:0:2::10/64 dev rout0 nodad",
        "ip addr del 198.18.2.1/24 dev rout0",
        "ip -6 addr del 2001:2:0:2::1/64 dev rout0",
    ] {
        topo.relay
            .exec(&cmd.split(' ').collect::<Vec<_>>())
            .unwrap();
    }
    let changed = Instant::now();
    loop {
        let v = stats_until(&relay.control, |_| true);
        let now = (
            output(&v, "keep", 0).source.clone(),
            output(&v, "keep6", 0).source.clone(),
        );
        if now
            == (
                Some("auto (198.18.2.10)".to_owned()),
                Some("auto (2001:2:0:2::10)".to_owned()),
            )
        {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "source: auto still {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for s in senders {
        assert_eq!(join(s).unwrap(), FLOW);
    }
    let v = stats_until(&relay.control, |v| {
        received(v, "keep") == FLOW && received(v, "keep6") == FLOW
    });
    for (rule, sock, old, new) in [
        (
            "keep",
            sock,
            IpAddr::from(ROUT0),
            IpAddr::from([198, 18, 2, 10]),
        ),
        (
            "keep6",
            sock6,
            ROUT0_6.into(),
            "2001:2:0:2::10".parse().unwrap(),
        ),
    ] {
        let o = output(&v, rule, 0);
        // The counters carried through every change, and nothing was dropped: the next hop
        // stayed resolved and the new address replaced the old one with no gap.
        assert_eq!(
            (o.sent, o.dropped.values().sum::<u64>()),
            (FLOW, 0),
            "{rule}: {o:?}"
        );
        let got = join(sock).unwrap();
        assert_eq!(got.len() as u64, FLOW, "{rule}: every frame arrived");
        let seqs: BTreeSet<u64> = got.iter().map(|(_, p)| check_payload(p).unwrap()).collect();
        assert_eq!(seqs.len() as u64, FLOW);
        // From the old address, then from the new one, and never back.
        let switch = got.iter().position(|(from, _)| from.ip() == new).unwrap();
        assert!(
            switch > 0,
            "{rule}: the first frames came from the old address"
        );
        assert!(got[..switch].iter().all(|(from, _)| from.ip() == old));
        assert!(got[switch..].iter().all(|(from, _)| from.ip() == new));
    }
    let exit = stop_clean(relay, &topo);
    assert!(
        exit.stdout.contains("source=auto:198.18.2.10"),
        "{}",
        exit.stdout
    );
}

#[test]
fn reloads_and_readdressing_with_lockfree_pool() {
    reloads_and_readdressing("lockfree");
}

#[test]
fn reloads_and_readdressing_with_mutex_pool() {
    reloads_and_readdressing("mutex");
}

/// A unicast output's interface deleted under a flow and created again (a container's veth
/// restarted): frames meanwhile are counted as `interface_down`, the relay binds to the new
/// device and resolves the next hop through it (a new ifindex, the peer's new MAC), and the
/// flow reaches the receiver again; IPv4 and IPv6.
#[test]
fn unicast_output_follows_its_interface_recreated() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    for ns in [&topo.relay, &topo.receivers[0].ns] {
        dad_done(ns);
    }
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        FOLLOW_RULES
            .split("      - { interface: rout1 }\n")
            .collect::<String>()
            .as_str(),
        &[],
    )
    .unwrap();
    let old_mac = mac_in(&topo.receivers[0].ns, &topo.receivers[0].iface);
    until_next_hop(&relay, Some(old_mac), Duration::from_secs(3));

    let senders = paced_flows(&topo, 3000);
    std::thread::sleep(Duration::from_millis(500));
    topo.relay.exec(&["ip", "link", "del", "rout0"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    topo.relink_receiver(0).unwrap();
    let r0 = &topo.receivers[0];
    dad_done(&topo.relay);
    dad_done(&r0.ns);
    let new_mac = mac_in(&r0.ns, &r0.iface);
    assert_ne!(new_mac, old_mac, "a new device, a new MAC");
    until_next_hop(&relay, Some(new_mac), Duration::from_secs(5));
    // The paced flow may end before the new device is resolved on a slow machine (DAD alone
    // takes a second or more), so a second flow, sent once the next hop is known and the
    // receivers are bound, is what must arrive in full.
    let mut limits = Limits::new(u64::MAX);
    limits.idle = Duration::from_secs(2);
    let sock = listen_unicast(&r0.ns, SocketAddr::new(RX0.into(), 7000), limits).unwrap();
    let sock6 = listen_unicast(&r0.ns, SocketAddr::new(RX0_6.into(), 7000), limits).unwrap();
    for s in senders {
        assert_eq!(join(s).unwrap(), 3000);
    }
    const AFTER: u64 = 200;
    let after = |group: &str| Flow {
        first_seq: 10_000,
        burst: 4,
        pause: Duration::from_millis(4),
        ..Flow::new(group.parse::<IpAddr>().unwrap(), 5000, AFTER)
    };
    for s in [
        send(&topo.sender, SENDER_ADDR, after("239.1.1.1")),
        send(&topo.sender, SENDER_ADDR6, after("ff18::1:1")),
    ] {
        assert_eq!(join(s).unwrap(), AFTER);
    }
    for (family, sock) in [("IPv4", sock), ("IPv6", sock6)] {
        let late: BTreeSet<u64> = join(sock)
            .unwrap()
            .iter()
            .map(|(_, p)| check_payload(p).unwrap())
            .filter(|seq| *seq >= 10_000)
            .collect();
        assert_eq!(
            late,
            (10_000..10_000 + AFTER).collect(),
            "{family} flows again, every frame of the flow sent after the re-creation"
        );
    }
    let total = 3000 + AFTER;
    let v = stats_until(&relay.control, |v| {
        received(v, "follow") == total && received(v, "follow6") == total
    });
    for rule in ["follow", "follow6"] {
        let o = output(&v, rule, 0);
        // Every frame went out, or was counted while the device was gone or its next hop
        // was being resolved again.
        assert_eq!(
            o.sent + dropped(o, "interface_down") + dropped(o, "no_neighbour"),
            total,
            "{rule}: {o:?}"
        );
        // The gap is counted: while the device is gone (`interface_down`), and on the new
        // one until its next hop resolves (`no_neighbour`; IPv6 waits for the new link's
        // duplicate address detection first).
        assert!(
            dropped(o, "interface_down") + dropped(o, "no_neighbour") > 0,
            "{rule}: the flow ran through the gap: {o:?}"
        );
        assert!(o.sent >= AFTER, "{rule}: {o:?}");
    }
    stop_clean(relay, &topo);
}

const ASTRAY_RULES: &str = "\
rules:
  - name: astray
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs:
      - { interface: rout0, destination: 198.18.9.9, port: 7002 }
      - { interface: rout1, destination: 198.18.9.9, port: 7002 }
  - name: astray6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs:
      - { interface: rout0, destination: '2001:2:9::9', port: 7002 }
      - { interface: rout1, destination: '2001:2:9::9', port: 7002 }
";

/// A unicast output on rout0 to a destination the relay host routes through rout1 only: no
/// next hop on rout0 will ever answer for it. The relay says `no route via rout0` (IPv4 used
/// to say `unresolved` forever, misled by the kernel's on-link fallback), logs which interface
/// the kernel routes it through, and counts every frame as `no_route_via`, not `no_neighbour`;
/// the same destination through rout1 gets every frame. Both families.
fn routed_elsewhere(allocator: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    route_far_via_receiver1(&topo);
    for ns in [&topo.relay, &topo.receivers[1].ns] {
        dad_done(ns);
    }
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        ASTRAY_RULES,
        &["--allocator", allocator],
    )
    .unwrap();
    let log = || std::fs::read_to_string(&relay.stderr).unwrap();
    let rules = ["astray", "astray6"];
    let settled = |v: &StatsView| {
        rules.iter().all(|r| {
            output(v, r, 0).next_hop.as_deref() == Some("no route via rout0")
                && output(v, r, 1)
                    .next_hop
                    .as_deref()
                    .is_some_and(|h| h.contains(':'))
        })
    };
    let v = stats_until(&relay.control, settled);
    assert!(settled(&v), "{v:?}\n{}", log());
    let text = client_ok(&relay.control, &["stats"]);
    assert!(text.contains("(no route via rout0)"), "{text}");
    for senders in paced_flows(&topo, N) {
        assert_eq!(join(senders).unwrap(), N);
    }
    let v = stats_until(&relay.control, |v| {
        rules.iter().all(|r| {
            received(v, r) == N
                && (0..2).all(|i| {
                    let o = output(v, r, i);
                    o.sent + o.dropped.values().sum::<u64>() == N
                })
        })
    });
    for r in rules {
        assert_eq!(received(&v, r), N, "{r}: {v:?}");
        let (astray, through) = (output(&v, r, 0), output(&v, r, 1));
        assert_eq!(
            (astray.sent, dropped(astray, "no_route_via")),
            (0, N),
            "{r}: {astray:?}"
        );
        assert_eq!(dropped(astray, "no_neighbour"), 0, "{r}: {astray:?}");
        assert_eq!(through.sent, N, "{r}: {through:?}");
    }
    for dest in ["198.18.9.9", "2001:2:9::9"] {
        let line =
            format!("rout0: no route to {dest} via rout0: the kernel routes it through rout1");
        assert!(log().contains(&line), "{line}\n{}", log());
    }
    stop_clean(relay, &topo);
}

#[test]
fn routed_elsewhere_with_lockfree_pool() {
    routed_elsewhere("lockfree");
}

#[test]
fn routed_elsewhere_with_mutex_pool() {
    routed_elsewhere("mutex");
}
