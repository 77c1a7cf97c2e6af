//! IPv6 end to end, for each allocator: rewritten delivery, MLDv2 joins, the zero UDP
//! checksum repaired, hop limit 1, and what no rule names left to the relay's own stack.

use std::{collections::BTreeSet, net::Ipv6Addr, time::Duration};

use relay::wire::Ipv6Packet;
use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin, report_value},
    topo::{RELAY_IN_ADDR6, SENDER_ADDR6, Topology},
    traffic::{Flow, Limits, capture, check_payload, join, listen, send},
};

mod common;
use common::{inspect, is_udp_to_test_group, mac_of, ping_answers, seqs, serial, stop_clean};

const G6_1: Ipv6Addr = Ipv6Addr::new(0xff18, 0, 0, 0, 0, 0, 1, 1);

const G6_2: Ipv6Addr = Ipv6Addr::new(0xff18, 0, 0, 0, 0, 0, 2, 2);

const G6_SSM: Ipv6Addr = Ipv6Addr::new(0xff38, 0, 0, 0, 0, 0, 5, 5);

const G6_OTHER: Ipv6Addr = Ipv6Addr::new(0xff18, 0, 0, 0, 0, 0, 9, 9);

const RULES6: &str = "\
rules:
  - name: v6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs:
      - interface: rout0
      - interface: rout1
        group: 'ff18::2:2'
        port: 6000
        hop_limit: 16
  - name: v6-ssm
    input: { interface: rin, group: 'ff38::5:5', port: 5002, source: '2001:2:0:1::1' }
    outputs:
      - interface: rout0
";

/// The ICMPv6 message in an IPv6 frame, after its extension headers (MLD reports carry a
/// hop-by-hop header with the router alert option).
fn icmpv6(frame: &[u8]) -> Option<&[u8]> {
    let ip = Ipv6Packet::new_checked(frame.get(14..)?).ok()?;
    let (off, proto) = ip.upper_layer()?;
    (frame[12..14] == [0x86, 0xdd] && proto == 58).then(|| &frame[14 + off..])
}

fn is_mld_report(frame: &[u8]) -> bool {
    icmpv6(frame).is_some_and(|m| m.first() == Some(&143))
}

/// The multicast address records of an MLDv2 report: (record type, group, sources).
fn mldv2_records(frame: &[u8]) -> Vec<(u8, Ipv6Addr, Vec<Ipv6Addr>)> {
    let Some(m) = icmpv6(frame).filter(|m| m.len() >= 8 && m[0] == 143) else {
        return Vec::new();
    };
    let n = usize::from(u16::from_be_bytes([m[6], m[7]]));
    let mut at = 8;
    let mut out = Vec::new();
    for _ in 0..n {
        let Some(rec) = m.get(at..at + 20) else {
            break;
        };
        let (kind, aux, nsrc) = (
            rec[0],
            usize::from(rec[1]),
            usize::from(u16::from_be_bytes([rec[2], rec[3]])),
        );
        let group = Ipv6Addr::from(<[u8; 16]>::try_from(&rec[4..20]).unwrap());
        let srcs = (0..nsrc)
            .filter_map(|i| m.get(at + 20 + i * 16..at + 36 + i * 16))
            .map(|b| Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()))
            .collect();
        out.push((kind, group, srcs));
        at += 20 + nsrc * 16 + aux * 4;
    }
    out
}

/// IPv6 end to end: delivery on both outputs with the group, port and hop limit rewritten and
/// checksums valid at the receivers; MLDv2 joins (source-specific for the (S,G) rule); a
/// datagram sent with the zero UDP checksum IPv6 forbids arrives repaired; hop limit 1 is
/// dropped and counted where the output does not set it; a group without a rule and neighbour
/// discovery reach the relay's own stack untouched.
fn ipv6_end_to_end(allocator: &str) {
    require_root();
    let _serial = serial();
    const N: u64 = 400;
    const SSM: u64 = 100;
    const HOP1: u64 = 20;
    let topo = Topology::new(2).unwrap();
    let mut mld_limits = Limits::new(1000);
    mld_limits.idle = Duration::from_secs(2);
    mld_limits.max = Duration::from_secs(2);
    let mld = capture(&topo.sender, "snd0", mld_limits, is_mld_report).unwrap();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        RULES6,
        &["--allocator", allocator],
    )
    .unwrap();
    let log = std::fs::read_to_string(&relay.stderr).unwrap();
    assert!(log.contains("rin: joined ff18::1:1 (MLD)"), "{log}");
    assert!(
        log.contains("rin: joined (2001:2:0:1::1, ff38::5:5) (MLDv2 source-specific)"),
        "{log}"
    );
    let maddr = topo
        .relay
        .exec(&["ip", "-6", "maddr", "show", "dev", "rin"])
        .unwrap();
    let member = |g: &str| maddr.lines().any(|l| l.split_whitespace().eq(["inet6", g]));
    assert!(member("ff18::1:1") && member("ff38::5:5"), "{maddr}");
    let reports: Vec<_> = join(mld)
        .unwrap()
        .iter()
        .flat_map(|f| mldv2_records(f))
        .collect();
    // Record types: 4 CHANGE_TO_EXCLUDE (any source), 5 ALLOW_NEW_SOURCES / 1 MODE_IS_INCLUDE.
    assert!(
        reports
            .iter()
            .any(|(k, g, s)| *g == G6_1 && s.is_empty() && *k == 4),
        "an any-source MLDv2 report for ff18::1:1 left rin: {reports:?}"
    );
    assert!(
        reports
            .iter()
            .any(|(k, g, s)| *g == G6_SSM && s == &[SENDER_ADDR6] && [1, 5].contains(k)),
        "a source-specific MLDv2 report for (2001:2:0:1::1, ff38::5:5) left rin: {reports:?}"
    );

    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let rx0 = listen(&r0.ns, G6_1, 5000, r0.addr6, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, G6_2, 6000, r1.addr6, Limits::new(N + HOP1)).unwrap();
    let rx_ssm = listen(&r0.ns, G6_SSM, 5002, r0.addr6, Limits::new(SSM)).unwrap();
    let cap0 = capture(
        &r0.ns,
        &r0.iface,
        Limits::new(N + SSM),
        is_udp_to_test_group,
    )
    .unwrap();
    let cap1 = capture(
        &r1.ns,
        &r1.iface,
        Limits::new(N + HOP1),
        is_udp_to_test_group,
    )
    .unwrap();
    let local = listen(&topo.relay, G6_OTHER, 5000, RELAY_IN_ADDR6, Limits::new(50)).unwrap();
    let stray = listen(&r0.ns, G6_OTHER, 5000, r0.addr6, Limits::new(1)).unwrap();

    assert_eq!(
        join(send(&topo.sender, SENDER_ADDR6, Flow::new(G6_1, 5000, N))).unwrap(),
        N
    );
    let mut zero = Flow::new(G6_SSM, 5002, SSM);
    zero.zero_checksum = true;
    join(send(&topo.sender, SENDER_ADDR6, zero)).unwrap();
    let mut hop1 = Flow::new(G6_1, 5000, HOP1);
    hop1.ttl = 1;
    join(send(&topo.sender, SENDER_ADDR6, hop1)).unwrap();
    join(send(
        &topo.sender,
        SENDER_ADDR6,
        Flow::new(G6_OTHER, 5000, 50),
    ))
    .unwrap();
    // Neighbour discovery and unicast to the relay still reach its stack.
    ping_answers(&topo.sender, RELAY_IN_ADDR6.into());

    let all: BTreeSet<u64> = (0..N).collect();
    assert_eq!(seqs(&join(rx0).unwrap()), all, "output 0 got every packet");
    let got1 = join(rx1).unwrap();
    assert_eq!(
        got1.len() as u64,
        N + HOP1,
        "hop_limit: 16 relays hop limit 1 too"
    );
    assert_eq!(
        seqs(&join(rx_ssm).unwrap()),
        (0..SSM).collect(),
        "zero-checksum datagrams arrive, repaired"
    );
    assert_eq!(
        join(local).unwrap().len(),
        50,
        "a group without a rule reached the relay's stack"
    );
    assert!(
        join(stray).unwrap().is_empty(),
        "a group without a rule was not relayed"
    );

    let mac0 = mac_of(&topo, &r0.relay_iface);
    let mac1 = mac_of(&topo, &r1.relay_iface);
    let frames0 = join(cap0).unwrap();
    assert_eq!(frames0.len() as u64, N + SSM);
    for f in &frames0 {
        let (g, p, hops, payload) = inspect(f, mac0);
        assert!(check_payload(&payload).is_some());
        match p {
            5000 => assert_eq!((g, hops), (G6_1.into(), 7), "hop limit 8 - 1"),
            5002 => assert_eq!((g, hops), (G6_SSM.into(), 7)),
            _ => panic!("unexpected port {p}"),
        }
    }
    let frames1 = join(cap1).unwrap();
    assert_eq!(frames1.len() as u64, N + HOP1);
    for f in &frames1 {
        let (g, p, hops, _) = inspect(f, mac1);
        assert_eq!(
            (g, p, hops),
            (G6_2.into(), 6000, 16),
            "remapped, hop limit set"
        );
    }

    let exit = stop_clean(relay, &topo);
    let r = &exit.stdout;
    assert_eq!(
        report_value(r, &["rule=v6"], "received"),
        Some(N + HOP1),
        "{r}"
    );
    assert_eq!(
        report_value(r, &["rule=v6", "output=rout0"], "sent"),
        Some(N),
        "{r}"
    );
    assert_eq!(
        report_value(r, &["rule=v6", "output=rout0"], "ttl_expired"),
        Some(HOP1),
        "{r}"
    );
    assert_eq!(
        report_value(r, &["rule=v6", "output=rout1"], "sent"),
        Some(N + HOP1),
        "{r}"
    );
    assert_eq!(
        report_value(r, &["rule=v6-ssm", "output=rout0"], "sent"),
        Some(SSM),
        "{r}"
    );
    assert!(
        exit.stderr.contains("rin: left ff18::1:1"),
        "{}",
        exit.stderr
    );
}

#[test]
fn ipv6_end_to_end_with_lockfree_pool() {
    ipv6_end_to_end("lockfree");
}

#[test]
fn ipv6_end_to_end_with_mutex_pool() {
    ipv6_end_to_end("mutex");
}
