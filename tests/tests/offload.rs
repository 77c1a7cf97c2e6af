//! Senders on the relay's own host: a container's veth has transmit checksum offload on (a
//! veth's default), so its UDP frames reach the relay with only a partial checksum, the
//! pseudo-header's sum left for a NIC to finish. Relayed as they are, every receiver drops
//! them. These tests leave the sender's offload on and check that every datagram arrives
//! with a valid checksum, remapped or not, for each family and allocator.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use relay::{
    checksum::{pseudo_ipv4, pseudo_ipv6},
    wire::{UdpPacket, classify},
};
use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin, report_value},
    topo::{SENDER_ADDR, SENDER_ADDR6, SENDER_IF, Topology},
    traffic::{Flow, Limits, capture, join, listen, send},
};

mod common;
use common::{inspect, is_udp_to_test_group, mac_of, seqs, serial, stats_until, stop_clean};

const N: u64 = 1000;

/// One family's rule: the group as it is on rout0, remapped (group, port and TTL) on rout1.
struct Case {
    rules: &'static str,
    source: IpAddr,
    group: IpAddr,
    remapped: IpAddr,
}

fn ipv4() -> Case {
    Case {
        rules: "\
rules:
  - name: offload
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs:
      - interface: rout0
      - interface: rout1
        group: 239.2.2.2
        port: 6000
        ttl: 16
",
        source: SENDER_ADDR.into(),
        group: Ipv4Addr::new(239, 1, 1, 1).into(),
        remapped: Ipv4Addr::new(239, 2, 2, 2).into(),
    }
}

fn ipv6() -> Case {
    Case {
        rules: "\
rules:
  - name: offload
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs:
      - interface: rout0
      - interface: rout1
        group: 'ff18::2:2'
        port: 6000
        hop_limit: 16
",
        source: SENDER_ADDR6.into(),
        group: Ipv6Addr::new(0xff18, 0, 0, 0, 0, 0, 1, 1).into(),
        remapped: Ipv6Addr::new(0xff18, 0, 0, 0, 0, 0, 2, 2).into(),
    }
}

/// Whether a captured frame's UDP checksum field holds just the pseudo-header's sum.
fn is_partial(frame: &[u8]) -> bool {
    let flow = classify(frame).expect("a multicast UDP frame");
    let udp = UdpPacket::new_checked(&frame[flow.l4..]).unwrap();
    let pseudo = match (flow.source, flow.group) {
        (IpAddr::V4(s), IpAddr::V4(g)) => pseudo_ipv4(s, g, udp.len()),
        (IpAddr::V6(s), IpAddr::V6(g)) => pseudo_ipv6(s, g, u32::from(udp.len())),
        _ => panic!("mixed families"),
    };
    udp.checksum() == pseudo
}

fn partial_checksums_are_completed(case: Case, allocator: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    topo.sender_tx_offload_on().unwrap();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        case.rules,
        &["--allocator", allocator],
    )
    .unwrap();

    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let (a0, a1): (IpAddr, IpAddr) = if case.group.is_ipv4() {
        (r0.addr.into(), r1.addr.into())
    } else {
        (r0.addr6.into(), r1.addr6.into())
    };
    // The receivers' sockets deliver only datagrams whose checksum verifies.
    let rx0 = listen(&r0.ns, case.group, 5000, a0, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, case.remapped, 6000, a1, Limits::new(N)).unwrap();
    // What the sender hands its veth, and what each receiver's link carries.
    let sent_frames = capture(
        &topo.sender,
        SENDER_IF,
        Limits::new(N),
        is_udp_to_test_group,
    );
    let cap0 = capture(&r0.ns, &r0.iface, Limits::new(N), is_udp_to_test_group).unwrap();
    let cap1 = capture(&r1.ns, &r1.iface, Limits::new(N), is_udp_to_test_group).unwrap();
    let sent_frames = sent_frames.unwrap();

    let sent = join(send(
        &topo.sender,
        case.source,
        Flow::new(case.group, 5000, N),
    ))
    .unwrap();
    assert_eq!(sent, N);

    // The premise: with offload on, the sender's frames carry partial checksums.
    let sent_frames = join(sent_frames).unwrap();
    assert_eq!(sent_frames.len() as u64, N);
    assert!(
        sent_frames.iter().all(|f| is_partial(f)),
        "every frame leaves the sender with a partial checksum"
    );

    let all: BTreeSet<u64> = (0..N).collect();
    let got0 = seqs(&join(rx0).unwrap());
    let got1 = seqs(&join(rx1).unwrap());
    println!(
        "delivered with valid checksums: {} of {N} on rout0, {} of {N} on rout1 (remapped)",
        got0.len(),
        got1.len()
    );
    assert!(got0 == all, "output 0: {} of {N} delivered", got0.len());
    assert!(got1 == all, "output 1: {} of {N} delivered", got1.len());

    // Every relayed frame, checked from scratch: MACs, IPv4 header checksum, and a full,
    // valid UDP checksum.
    let (mac0, mac1) = (
        mac_of(&topo, &r0.relay_iface),
        mac_of(&topo, &r1.relay_iface),
    );
    let frames0 = join(cap0).unwrap();
    assert_eq!(frames0.len() as u64, N);
    for f in &frames0 {
        let (g, p, ttl, _) = inspect(f, mac0);
        assert_eq!((g, p, ttl), (case.group, 5000, 7), "as sent, TTL 8 - 1");
    }
    let frames1 = join(cap1).unwrap();
    assert_eq!(frames1.len() as u64, N);
    for f in &frames1 {
        let (g, p, ttl, _) = inspect(f, mac1);
        assert_eq!((g, p, ttl), (case.remapped, 6000, 16), "remapped, TTL set");
    }

    // One completion per received frame, not per output.
    let view = stats_until(&relay.control, |v| v.rules[0].checksum_completed >= N);
    assert_eq!(view.rules[0].received, N, "{view:?}");
    assert_eq!(view.rules[0].checksum_completed, N, "{view:?}");

    let exit = stop_clean(relay, &topo);
    let r = &exit.stdout;
    assert_eq!(
        report_value(r, &["rule=offload"], "checksum_completed"),
        Some(N),
        "{r}"
    );
    for out in ["output=rout0", "output=rout1"] {
        assert_eq!(report_value(r, &[out], "sent"), Some(N), "{r}");
    }
}

#[test]
fn ipv4_partial_checksums_are_completed_with_lockfree_pool() {
    partial_checksums_are_completed(ipv4(), "lockfree");
}

#[test]
fn ipv4_partial_checksums_are_completed_with_mutex_pool() {
    partial_checksums_are_completed(ipv4(), "mutex");
}

#[test]
fn ipv6_partial_checksums_are_completed_with_lockfree_pool() {
    partial_checksums_are_completed(ipv6(), "lockfree");
}

#[test]
fn ipv6_partial_checksums_are_completed_with_mutex_pool() {
    partial_checksums_are_completed(ipv6(), "mutex");
}
