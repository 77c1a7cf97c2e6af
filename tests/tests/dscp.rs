//! `dscp:` on outputs, on real kernel paths: frames injected on the relay's ingress with a
//! marking (DSCP 10, ECN 01) leave one output re-marked (DSCP 46, ECN kept) and the other as
//! received; both with valid checksums, both families, both allocators.

use std::{net::IpAddr, time::Duration};

use relay::{
    craft::{UdpFrame, build_udp_frame},
    wire::classify,
};
use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, SENDER_ADDR6, SENDER_IF, Topology},
    traffic::{Limits, capture, inject, join, payload},
};

mod common;
use common::{inspect, mac_of, serial, stats_until, stop_clean};

const INJECT_MAC: [u8; 6] = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x03];
const N: u64 = 50;
/// DSCP 10 (AF11) with ECN 01 (ECT(1)), as the injected frames carry it.
const RECEIVED: u8 = 10 << 2 | 0b01;

/// A frame to `group`:5000 marked `RECEIVED` (in the IPv4 TOS byte, or the IPv6 traffic
/// class), its IPv4 header checksum made right.
fn frame(group: IpAddr, seq: u64) -> Vec<u8> {
    let source = if group.is_ipv4() {
        IpAddr::from(SENDER_ADDR)
    } else {
        IpAddr::from(SENDER_ADDR6)
    };
    let mut f = build_udp_frame(&UdpFrame {
        src_mac: INJECT_MAC,
        ..UdpFrame::simple(source, group, 5000, 8, &payload(seq, 64))
    });
    let l3 = classify(&f).unwrap().l3;
    if group.is_ipv4() {
        f[l3 + 1] = RECEIVED;
        f[l3 + 10..l3 + 12].fill(0);
        let sum = relay::checksum::checksum(&f[l3..l3 + 20]);
        f[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
    } else {
        f[l3] = (f[l3] & 0xf0) | RECEIVED >> 4;
        f[l3 + 1] = (f[l3 + 1] & 0x0f) | (RECEIVED & 0x0f) << 4;
    }
    f
}

fn relayed(frame: &[u8]) -> bool {
    frame.get(6..12) != Some(&INJECT_MAC) && classify(frame).is_some()
}

/// The traffic class of a captured frame.
fn class(frame: &[u8]) -> u8 {
    let l3 = classify(frame).unwrap().l3;
    match frame[l3] >> 4 {
        4 => frame[l3 + 1],
        _ => (frame[l3] & 0x0f) << 4 | frame[l3 + 1] >> 4,
    }
}

fn remarks(allocator: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let rules = "\
rules:
  - name: v4
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0, dscp: 46 }, { interface: rout1 }]
  - name: v6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs: [{ interface: rout0, dscp: 46 }, { interface: rout1 }]
";
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        rules,
        &["--allocator", allocator],
    )
    .unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let (mac0, mac1) = (mac_of(&topo, "rout0"), mac_of(&topo, "rout1"));
    for group in ["239.1.1.1", "ff18::1:1"] {
        let group: IpAddr = group.parse().unwrap();
        let cap0 = capture(&r0.ns, &r0.iface, Limits::new(N), relayed).unwrap();
        let cap1 = capture(&r1.ns, &r1.iface, Limits::new(N), relayed).unwrap();
        let frames = (0..N).map(|seq| frame(group, seq)).collect();
        join(inject(&topo.sender, SENDER_IF, frames, Duration::from_micros(200)).unwrap()).unwrap();
        let (got0, got1) = (join(cap0).unwrap(), join(cap1).unwrap());
        assert_eq!(got0.len() as u64, N, "rout0, {group}");
        assert_eq!(got1.len() as u64, N, "rout1, {group}");
        for f in &got0 {
            let (g, port, hops, _) = inspect(f, mac0);
            assert_eq!((g, port, hops), (group, 5000, 7));
            assert_eq!(class(f), 46 << 2 | 0b01, "DSCP 46, ECN kept: {f:02x?}");
        }
        for f in &got1 {
            inspect(f, mac1);
            assert_eq!(class(f), RECEIVED, "marking as received: {f:02x?}");
        }
    }
    let v = stats_until(&relay.control, |v| v.rules[1].outputs[0].sent == N);
    assert_eq!(v.rules[0].outputs[0].dscp, Some(46), "{v:?}");
    assert_eq!(v.rules[0].outputs[1].dscp, None, "{v:?}");
    let exit = stop_clean(relay, &topo);
    assert!(
        exit.stdout.contains("output=rout0") && exit.stdout.contains(" dscp=46"),
        "{}",
        exit.stdout
    );
}

#[test]
fn remarks_dscp_and_keeps_ecn_with_lockfree_pool() {
    remarks("lockfree");
}

#[test]
fn remarks_dscp_and_keeps_ecn_with_mutex_pool() {
    remarks("mutex");
}
