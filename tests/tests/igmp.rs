//! The memberships the relay holds for its ingress groups, which AF_XDP sockets cannot join:
//! the kernel lists them, their IGMPv3 reports leave the ingress towards the sender, and they
//! are dropped when the relay stops.

use std::{net::Ipv4Addr, time::Duration};

use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, Topology},
    traffic::{Limits, capture, join},
};

mod common;
use common::{G1, RULES, serial};

fn is_igmp(frame: &[u8]) -> bool {
    frame.len() > 34 && frame[12..14] == [0x08, 0x00] && frame[23] == 2
}

/// The groups an IGMPv3 membership report in `frame` reports, with each record's sources.
fn igmpv3_records(frame: &[u8]) -> Vec<(Ipv4Addr, Vec<Ipv4Addr>)> {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let igmp = &frame[14 + ihl..];
    if igmp.len() < 8 || igmp[0] != 0x22 {
        return Vec::new();
    }
    let n = usize::from(u16::from_be_bytes([igmp[6], igmp[7]]));
    let mut at = 8;
    let mut out = Vec::new();
    for _ in 0..n {
        let Some(rec) = igmp.get(at..at + 8) else {
            break;
        };
        let (aux, nsrc) = (
            usize::from(rec[1]),
            usize::from(u16::from_be_bytes([rec[2], rec[3]])),
        );
        let group = Ipv4Addr::new(rec[4], rec[5], rec[6], rec[7]);
        let srcs = (0..nsrc)
            .filter_map(|i| igmp.get(at + 8 + i * 4..at + 12 + i * 4))
            .map(|b| Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            .collect();
        out.push((group, srcs));
        at += 8 + nsrc * 4 + aux * 4;
    }
    out
}

/// AF_XDP sockets cannot join groups, so the relay joins each ingress group through an
/// ordinary socket: the kernel lists the membership, and the IGMPv3 report (source-specific
/// for an (S,G) rule) leaves the ingress interface towards the sender's side.
#[test]
fn joins_ingress_groups_with_igmp() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let rules = format!(
        "{RULES}  - name: ssm
    input: {{ interface: rin, group: 239.5.5.5, source: {SENDER_ADDR} }}
    outputs:
      - interface: rout0
"
    );
    let mut limits = Limits::new(1000);
    limits.idle = Duration::from_secs(3);
    limits.max = Duration::from_secs(3);
    let cap = capture(&topo.sender, "snd0", limits, is_igmp).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &rules, &[]).unwrap();
    let log = std::fs::read_to_string(&relay.stderr).unwrap();
    assert!(log.contains("rin: joined 239.1.1.1 (IGMP)"), "{log}");
    assert!(
        log.contains(&format!(
            "rin: joined ({SENDER_ADDR}, 239.5.5.5) (IGMPv3 source-specific)"
        )),
        "{log}"
    );
    let maddr = topo
        .relay
        .exec(&["ip", "maddr", "show", "dev", "rin"])
        .unwrap();
    let member = |maddr: &str, g: &str| maddr.lines().any(|l| l.split_whitespace().eq(["inet", g]));
    assert!(member(&maddr, "239.1.1.1"), "{maddr}");
    assert!(member(&maddr, "239.5.5.5"), "{maddr}");

    let reports: Vec<(Ipv4Addr, Vec<Ipv4Addr>)> = join(cap)
        .unwrap()
        .iter()
        .flat_map(|f| igmpv3_records(f))
        .collect();
    assert!(
        reports.iter().any(|(g, s)| *g == G1 && s.is_empty()),
        "an any-source report for 239.1.1.1 left rin: {reports:?}"
    );
    assert!(
        reports
            .iter()
            .any(|(g, s)| *g == Ipv4Addr::new(239, 5, 5, 5) && s == &[SENDER_ADDR]),
        "a source-specific report for (198.18.1.1, 239.5.5.5) left rin: {reports:?}"
    );

    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success());
    assert!(
        exit.stderr.contains("rin: left 239.1.1.1"),
        "{}",
        exit.stderr
    );
    let maddr = topo
        .relay
        .exec(&["ip", "maddr", "show", "dev", "rin"])
        .unwrap();
    assert!(
        !member(&maddr, "239.1.1.1"),
        "membership dropped at exit: {maddr}"
    );
}
