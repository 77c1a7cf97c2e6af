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

#[test]
fn ipv6_fragments_are_relayed_and_remapped() {
    relays_fragmented_datagrams(
        "\
rules:
  - name: big6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs:
      - { interface: rout0 }
      - { interface: rout1, group: 'ff18::2:2', port: 6000 }
",
        "ff18::1:1".parse().unwrap(),
        "ff18::2:2".parse().unwrap(),
    );
}
