//! UDP datagrams larger than the link's MTU arrive as IP fragments: the relay steers the first
//! by the rules and the later ones by what the first matched, rewrites each (the remap of the
//! group and port included), and the receivers' stacks reassemble every datagram whole.

use std::{net::IpAddr, time::Duration};

use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, SENDER_ADDR6, Topology},
    traffic::{Flow, Limits, check_payload, join, listen, send},
};

mod common;
use common::stats_until;

/// Datagrams per family.
const N: u64 = 200;
/// A UDP payload that needs three fragments at a 1500-byte MTU.
const LEN: usize = 4000;

/// Sends N 4,000-byte datagrams to `g1`:5000 over the 1500-MTU veth; the relay sends them to
/// `g1`:5000 on rout0 and, remapped, to `g2`:6000 on rout1. Every datagram must reach both
/// receivers' sockets whole.
fn relays_fragmented_datagrams(yaml: &str, g1: IpAddr, g2: IpAddr) {
    require_root();
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, yaml, &[]).unwrap();
    let before = stats_until(&relay.control, |_| true);
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let (a0, a1, source): (IpAddr, IpAddr, IpAddr) = if g1.is_ipv4() {
        (r0.addr.into(), r1.addr.into(), SENDER_ADDR.into())
    } else {
        (r0.addr6.into(), r1.addr6.into(), SENDER_ADDR6.into())
    };
    let rx0 = listen(&r0.ns, g1, 5000, a0, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, g2, 6000, a1, Limits::new(N)).unwrap();
    let mut flow = Flow::new(g1, 5000, N);
    flow.len = LEN;
    flow.burst = 4;
    flow.pause = Duration::from_millis(1);
    assert_eq!(join(send(&topo.sender, source, flow)).unwrap(), N);
    for (name, rx) in [("rout0", rx0), ("rout1 (remapped)", rx1)] {
        let got = join(rx).unwrap();
        let mut seqs: Vec<u64> = got
            .iter()
            .map(|p| {
                assert_eq!(p.len(), LEN, "{name}: a datagram whole");
                check_payload(p).unwrap_or_else(|| panic!("{name}: payload damaged"))
            })
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..N).collect::<Vec<_>>(), "{name}: every datagram");
    }
    let after = stats_until(&relay.control, |v| v.rules[0].received >= 3 * N);
    let delta = |k: &str| after.xdp[k] - before.xdp[k];
    // Three fragments a datagram: the first matched by the rule, two following it.
    assert_eq!(after.rules[0].received, 3 * N, "{after:?}");
    assert_eq!(delta("fragments"), 2 * N, "{after:?}");
    assert_eq!(delta("fragments_unknown"), 0, "{after:?}");
    assert_eq!(delta("redirected"), 3 * N, "{after:?}");
    for o in &after.rules[0].outputs {
        assert_eq!(o.sent, 3 * N, "{after:?}");
    }
    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
}

#[test]
fn ipv4_fragments_are_relayed_and_remapped() {
    relays_fragmented_datagrams(
        "\
rules:
  - name: big
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs:
      - { interface: rout0 }
      - { interface: rout1, group: 239.2.2.2, port: 6000 }
",
        "239.1.1.1".parse().unwrap(),
        "239.2.2.2".parse().unwrap(),
    );
}

/// ff18::1:1 port 5000 to rout0 as it came, and to rout1 remapped to ff18::2:2 port 6000.
const RULES6: &str = "\
rules:
  - name: big6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs:
      - { interface: rout0 }
      - { interface: rout1, group: 'ff18::2:2', port: 6000 }
";

#[test]
fn ipv6_fragments_are_relayed_and_remapped() {
    relays_fragmented_datagrams(
        RULES6,
        "ff18::1:1".parse().unwrap(),
        "ff18::2:2".parse().unwrap(),
    );
}

/// `whole`, an IPv4 frame (tagged or not), cut into fragments of at most 1480 data bytes, as
/// a sender's stack cuts a datagram for a 1500-byte MTU, with identification `id`.
fn fragment_ipv4(whole: &[u8], id: u16) -> Vec<Vec<u8>> {
    let flow = relay::wire::classify(whole).unwrap();
    let (l3, l4) = (flow.l3, flow.l4);
    let data = &whole[l4..];
    let chunks: Vec<&[u8]> = data.chunks(1480).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let mut f = whole[..l4].to_vec();
            let total = (l4 - l3 + part.len()) as u16;
            f[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            f[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
            let more = if i + 1 < chunks.len() { 0x2000 } else { 0 };
            let flags = more | (i * 1480 / 8) as u16;
            f[l3 + 6..l3 + 8].copy_from_slice(&flags.to_be_bytes());
            f[l3 + 10..l3 + 12].fill(0);
            let sum = relay::checksum::checksum(&f[l3..l4]);
            f[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
            f.extend_from_slice(part);
            f
        })
        .collect()
}

/// Fragments on a trunk: datagrams tagged with VID 10 (the rule's) and VID 20, injected as
/// tagged fragments with the same identifications on both VLANs. Only VID 10's arrive, whole,
/// untagged: the fragment map keys on the VLAN too, so VID 20's later fragments do not follow
/// VID 10's first ones.
#[test]
fn tagged_fragments_follow_only_their_own_vlan() {
    require_root();
    const COUNT: u64 = 20;
    let topo = Topology::new(1).unwrap();
    let yaml = "\
rules:
  - name: trunk
    input: { interface: rin, group: 239.1.1.1, port: 5000, vlan: 10 }
    outputs: [{ interface: rout0 }]
";
    let relay = RelayProc::start(&relay_bin(), &topo.relay, yaml, &[]).unwrap();
    let before = stats_until(&relay.control, |_| true);
    let r0 = &topo.receivers[0];
    let mut limits = Limits::new(2 * COUNT);
    limits.idle = Duration::from_secs(2);
    let rx = listen(
        &r0.ns,
        "239.1.1.1".parse::<IpAddr>().unwrap(),
        5000,
        IpAddr::from(r0.addr),
        limits,
    )
    .unwrap();
    let mut frames = Vec::new();
    for i in 0..COUNT {
        for (vid, seq) in [(10u16, i), (20, 1000 + i)] {
            let whole = relay::craft::build_udp_frame(&relay::craft::UdpFrame {
                vlan: Some(vid),
                src_mac: [0x02, 0xde, 0xad, 0xbe, 0xef, 0x03],
                ..relay::craft::UdpFrame::simple(
                    SENDER_ADDR.into(),
                    "239.1.1.1".parse().unwrap(),
                    5000,
                    8,
                    &relay_tests::traffic::payload(seq, 3000),
                )
            });
            // The same identification on both VLANs, VID 20's after VID 10's first fragment
            // has been seen: keyed without the VLAN, its later fragments would follow it.
            frames.extend(fragment_ipv4(&whole, 7000 + i as u16));
        }
    }
    let n = frames.len();
    let sent = join(
        relay_tests::traffic::inject(
            &topo.sender,
            relay_tests::topo::SENDER_IF,
            frames,
            Duration::from_micros(300),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(sent, n);
    let got = join(rx).unwrap();
    let mut seqs: Vec<u64> = got
        .iter()
        .map(|p| {
            assert_eq!(p.len(), 3000, "a datagram whole");
            check_payload(p).expect("payload intact")
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..COUNT).collect::<Vec<_>>(),
        "VID 10's datagrams, and only those"
    );
    let after = stats_until(&relay.control, |v| v.rules[0].received >= 3 * COUNT);
    let delta = |k: &str| after.xdp[k] - before.xdp[k];
    assert_eq!(after.rules[0].received, 3 * COUNT, "{after:?}");
    assert_eq!(delta("fragments"), 2 * COUNT, "{after:?}");
    assert_eq!(
        delta("fragments_unknown"),
        2 * COUNT,
        "VID 20's later fragments: {after:?}"
    );
    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
}

/// IPv6 datagrams sent with a zero UDP checksum (UDP_NO_CHECK6_TX) and too large for the link:
/// the relay cannot write a checksum into the first fragment (it covers the whole datagram,
/// which the relay never reassembles) and IPv6 receivers drop a zero one, so the first
/// fragment is dropped on every output under its own reason, `zero_checksum_fragment` (it
/// used to count as `malformed`); the later fragments are relayed and, without their first,
/// reassembled by nobody. Every frame is accounted for on every output.
fn zero_checksum_ipv6_fragments(allocator: &str) {
    require_root();
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        RULES6,
        &["--allocator", allocator],
    )
    .unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let (g1, g2): (IpAddr, IpAddr) = ("ff18::1:1".parse().unwrap(), "ff18::2:2".parse().unwrap());
    let rx0 = listen(&r0.ns, g1, 5000, r0.addr6, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, g2, 6000, r1.addr6, Limits::new(N)).unwrap();
    let mut flow = Flow::new(g1, 5000, N);
    flow.len = LEN;
    flow.zero_checksum = true;
    flow.burst = 4;
    flow.pause = Duration::from_millis(1);
    assert_eq!(join(send(&topo.sender, SENDER_ADDR6, flow)).unwrap(), N);
    let v = stats_until(&relay.control, |v| {
        v.rules[0].received == 3 * N
            && v.rules[0]
                .outputs
                .iter()
                .all(|o| o.sent + o.dropped.values().sum::<u64>() == 3 * N)
    });
    let rule = &v.rules[0];
    assert_eq!(rule.received, 3 * N, "three fragments a datagram: {v:?}");
    for o in &rule.outputs {
        assert_eq!(o.dropped["zero_checksum_fragment"], N, "every first: {o:?}");
        assert_eq!(o.dropped["malformed"], 0, "{o:?}");
        assert_eq!(o.sent, 2 * N, "the later fragments: {o:?}");
        assert_eq!(
            o.sent + o.dropped.values().sum::<u64>(),
            rule.received,
            "{o:?}"
        );
    }
    for (name, rx) in [("rout0", rx0), ("rout1", rx1)] {
        assert!(join(rx).unwrap().is_empty(), "{name}: nothing reassembles");
    }
    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(
        exit.stdout.contains(&format!("zero_checksum_fragment={N}")),
        "the shutdown report: {}",
        exit.stdout
    );
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
}

#[test]
fn zero_checksum_ipv6_fragments_with_lockfree_pool() {
    zero_checksum_ipv6_fragments("lockfree");
}

#[test]
fn zero_checksum_ipv6_fragments_with_mutex_pool() {
    zero_checksum_ipv6_fragments("mutex");
}
