//! End to end, on real kernel paths: the relay binary in a namespace between a sender and
//! receivers, with the XDP program attached and AF_XDP sockets bound, for each allocator.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use relay::wire::Ipv6Packet;
use relay_tests::{
    netns::{require_root, sh},
    relay_proc::{RelayProc, relay_bin, report_value},
    topo::{RELAY_IN_ADDR, RELAY_IN_ADDR6, SENDER_ADDR, SENDER_ADDR6, Topology},
    traffic::{Flow, Limits, capture, check_payload, join, listen, send},
};

mod common;
use common::{
    inspect, is_udp_to_test_group, mac_of, seqs, serial, start_refused, stats_until, stop_clean,
};

const G1: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
const G2: Ipv4Addr = Ipv4Addr::new(239, 2, 2, 2);
const OTHER: Ipv4Addr = Ipv4Addr::new(239, 9, 9, 9);

const RULES: &str = "\
rules:
  - name: video-a
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs:
      - interface: rout0
      - interface: rout1
        group: 239.2.2.2
        port: 6000
        ttl: 16
";

/// Three pings from `ns` to `addr` are all answered.
fn ping_answers(ns: &relay_tests::netns::Netns, addr: IpAddr) {
    let family = if addr.is_ipv6() { "-6" } else { "-4" };
    let to = addr.to_string();
    let ping = ns
        .exec(&["ping", family, "-c", "3", "-i", "0.2", "-W", "1", &to])
        .unwrap_or_else(|e| panic!("ping {to}: {e:#}"));
    assert!(ping.contains("3 received"), "{ping}");
}

fn relays_and_remaps(allocator: &str, log_name: &str, workers: usize, poll: &str) {
    require_root();
    let _serial = serial();
    const N: u64 = 500;
    let topo = Topology::new(2).unwrap();
    let w = workers.to_string();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        &format!("poll: {poll}\n{RULES}"),
        &["--allocator", allocator, "--workers", &w],
    )
    .unwrap();
    let log = std::fs::read_to_string(&relay.stderr).unwrap();
    assert_eq!(
        log.contains("workers busy-poll"),
        poll == "busy",
        "the log says how workers wait:\n{log}"
    );
    assert!(
        log.contains(&format!("frame allocator: {log_name}")),
        "log names the allocator:\n{log}"
    );
    if workers == 2 {
        // Sockets are dealt out round-robin: rin and rout1 on worker 0, rout0 on worker 1, so
        // every frame for rout0 is taken from the pool on one thread and given back on the
        // other.
        assert!(log.contains("2 worker threads"), "{log}");
        for line in [
            "rin queue 0: AF_XDP socket bound in copy mode (ingress, worker 0)",
            "rout0 queue 0: AF_XDP socket bound in copy mode (egress, worker 1)",
        ] {
            assert!(log.contains(line), "{line}\n{log}");
        }
    }
    assert!(log.contains("rin: XDP program attached in"), "{log}");
    assert!(log.contains("rin queue 0: AF_XDP socket bound in"), "{log}");

    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, G2, 6000, r1.addr, Limits::new(N)).unwrap();
    let cap0 = capture(&r0.ns, &r0.iface, Limits::new(N), is_udp_to_test_group).unwrap();
    let cap1 = capture(&r1.ns, &r1.iface, Limits::new(N), is_udp_to_test_group).unwrap();
    // The non-matching group: the relay's own stack receives it, the receivers never do.
    let local = listen(&topo.relay, OTHER, 5000, RELAY_IN_ADDR, Limits::new(50)).unwrap();
    let stray = listen(&r0.ns, OTHER, 5000, r0.addr, Limits::new(1)).unwrap();

    let sent = join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    let sent_other = join(send(&topo.sender, SENDER_ADDR, Flow::new(OTHER, 5000, 50))).unwrap();
    assert_eq!((sent, sent_other), (N, 50));
    // Unicast to the relay's own address (and ARP) still reaches its stack.
    ping_answers(&topo.sender, RELAY_IN_ADDR.into());

    let all: BTreeSet<u64> = (0..N).collect();
    assert_eq!(seqs(&join(rx0).unwrap()), all, "output 0 got every packet");
    assert_eq!(seqs(&join(rx1).unwrap()), all, "output 1 got every packet");
    assert_eq!(
        join(local).unwrap().len(),
        50,
        "non-matching group reached the relay's stack"
    );
    assert!(
        join(stray).unwrap().is_empty(),
        "non-matching group was not relayed"
    );

    let frames0 = join(cap0).unwrap();
    let frames1 = join(cap1).unwrap();
    assert_eq!(frames0.len() as u64, N);
    assert_eq!(frames1.len() as u64, N);
    let mac0 = mac_of(&topo, &r0.relay_iface);
    let mac1 = mac_of(&topo, &r1.relay_iface);
    for f in &frames0 {
        let (g, p, ttl, payload) = inspect(f, mac0);
        assert_eq!(
            (g, p, ttl),
            (G1.into(), 5000, 7),
            "same group and port, TTL 8 - 1"
        );
        assert!(check_payload(&payload).is_some());
    }
    for f in &frames1 {
        let (g, p, ttl, payload) = inspect(f, mac1);
        assert_eq!(
            (g, p, ttl),
            (G2.into(), 6000, 16),
            "remapped group and port, TTL set"
        );
        assert!(check_payload(&payload).is_some());
    }

    let exit = stop_clean(relay, &topo);
    let r = &exit.stdout;
    assert_eq!(
        report_value(r, &["rule=video-a"], "received"),
        Some(N),
        "{r}"
    );
    assert_eq!(report_value(r, &["output=rout0"], "sent"), Some(N), "{r}");
    assert_eq!(report_value(r, &["output=rout1"], "sent"), Some(N), "{r}");
    assert_eq!(
        report_value(r, &["datapath"], "copies"),
        Some(N),
        "one copy per packet for two outputs: {r}"
    );
    assert_eq!(
        report_value(r, &["output=rout0"], "dropped"),
        Some(0),
        "{r}"
    );
    assert_eq!(report_value(r, &["xdp"], "redirected"), Some(N), "{r}");
    assert_eq!(report_value(r, &["frames"], "leaked"), Some(0), "{r}");
}

#[test]
fn relays_and_remaps_with_lockfree_pool() {
    relays_and_remaps("lockfree", "lock-free", 1, "sleep");
}

#[test]
fn relays_and_remaps_with_mutex_pool() {
    relays_and_remaps("mutex", "mutex", 1, "sleep");
}

/// Two workers: frames cross threads between the RX worker and the TX owner of rout0.
#[test]
fn relays_across_workers_with_lockfree_pool() {
    relays_and_remaps("lockfree", "lock-free", 2, "sleep");
}

#[test]
fn relays_across_workers_with_mutex_pool() {
    relays_and_remaps("mutex", "mutex", 2, "sleep");
}

/// `poll: busy`: workers that never sleep relay the same, with one worker and with two
/// (frames handed between spinning threads, no wake-up).
#[test]
fn relays_busy_polling_with_lockfree_pool() {
    relays_and_remaps("lockfree", "lock-free", 2, "busy");
}

#[test]
fn relays_busy_polling_with_mutex_pool() {
    relays_and_remaps("mutex", "mutex", 1, "busy");
}

/// TTL=1 traffic (mDNS, SSDP) is dropped and counted where the output decrements, and
/// relayed where the output sets the TTL.
#[test]
fn ttl_one_is_relayed_only_where_the_output_sets_ttl() {
    require_root();
    let _serial = serial();
    const N: u64 = 100;
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(1)).unwrap();
    let rx1 = listen(&r1.ns, G2, 6000, r1.addr, Limits::new(N)).unwrap();
    let mut flow = Flow::new(G1, 5000, N);
    flow.ttl = 1;
    join(send(&topo.sender, SENDER_ADDR, flow)).unwrap();
    assert!(
        join(rx0).unwrap().is_empty(),
        "TTL 1 is not decremented onto the wire"
    );
    assert_eq!(
        join(rx1).unwrap().len() as u64,
        N,
        "ttl: 16 relays TTL 1 traffic"
    );
    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success());
    let r = &exit.stdout;
    assert_eq!(
        report_value(r, &["output=rout0"], "ttl_expired"),
        Some(N),
        "{r}"
    );
    assert_eq!(report_value(r, &["output=rout0"], "sent"), Some(0), "{r}");
    assert_eq!(report_value(r, &["output=rout1"], "sent"), Some(N), "{r}");
    // Decided before the fan-out: no copy is made for the output that would refuse it.
    assert_eq!(report_value(r, &["datapath"], "copies"), Some(0), "{r}");
}

/// A killed relay leaves nothing attached (the program hangs off a bpf_link the process
/// owns), and a new relay starts at once on the same interfaces.
#[test]
fn sigkill_leaves_nothing_attached_and_restart_works() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    assert!(topo.relay_has_xdp().unwrap(), "attached while running");
    sh(&["kill", "-KILL", &relay.pid().to_string()]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while topo.relay_has_xdp().unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "XDP still attached 5 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(relay);
    let again = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    let r0 = &topo.receivers[0];
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(20)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 20))).unwrap();
    assert_eq!(join(rx0).unwrap().len(), 20, "the restarted relay forwards");
    assert!(again.stop(Duration::from_secs(3)).unwrap().status.success());
}

/// `--check` validates against the interfaces of the namespace it runs in.
#[test]
fn check_names_file_rule_and_bad_value() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let dir = std::env::temp_dir().join(relay_tests::netns::unique_name("check"));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, RULES).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, RULES.replace("group: 239.2.2.2", "group: 198.18.2.2")).unwrap();
    let bin = relay_bin();
    let run = |file: &std::path::Path| {
        std::process::Command::new("ip")
            .args(["netns", "exec", topo.relay.name()])
            .arg(&bin)
            .args(["--check", "--config"])
            .arg(file)
            .output()
            .unwrap()
    };
    let ok = run(&good);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK: 1 rules"));
    let fail = run(&bad);
    assert!(!fail.status.success());
    let msg = String::from_utf8_lossy(&fail.stderr);
    assert!(
        msg.contains(&format!(
            "{}: rule 'video-a': output group 198.18.2.2 on 'rout1' is not a multicast address",
            bad.display()
        )),
        "{msg}"
    );
    assert!(!topo.relay_has_xdp().unwrap(), "--check attaches nothing");
    let _ = std::fs::remove_dir_all(&dir);
}

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

/// `relay stats`, `relay ping` and the Prometheus endpoint answer while the relay runs, with
/// the counters of the traffic just relayed; a malformed request gets an error and changes
/// nothing.
#[test]
fn stats_ping_and_metrics_while_running() {
    use std::io::{BufRead, BufReader, Read, Write};
    require_root();
    let _serial = serial();
    const N: u64 = 200;
    let topo = Topology::new(2).unwrap();
    let rules = format!("metrics: 127.0.0.1:9469\n{RULES}");
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &rules, &[]).unwrap();
    let ctl = relay.control.to_str().unwrap().to_owned();
    let client = |args: &[&str]| {
        let out = std::process::Command::new(relay_bin())
            .args(args)
            .args(["--control", &ctl])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(client(&["ping"]).contains("is running"));

    let r0 = &topo.receivers[0];
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(join(rx0).unwrap().len() as u64, N);

    // Workers publish their counters every 100 ms.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let view: relay::stats::StatsView = loop {
        let v: relay::stats::StatsView =
            serde_json::from_str(&client(&["stats", "--json"])).unwrap();
        if v.rules[0].outputs.iter().all(|o| o.sent == N) || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(view.rules[0].name, "video-a");
    assert_eq!(view.rules[0].received, N);
    assert_eq!(view.rules[0].outputs[0].interface, "rout0");
    assert_eq!(view.rules[0].outputs[1].group, "239.2.2.2");
    assert!(
        view.rules[0].outputs.iter().all(|o| o.sent == N),
        "{view:?}"
    );
    assert_eq!(view.xdp["redirected"], N);
    assert_eq!(view.pool.allocator, "lock-free");
    let table = client(&["stats"]);
    assert!(
        table.contains("video-a") && table.contains("rout1"),
        "{table}"
    );

    // Garbage on the control socket: an error reply, and the relay carries on.
    let sock = std::os::unix::net::UnixStream::connect(&relay.control).unwrap();
    (&sock).write_all(b"{\"cmd\":\"explode\"}\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&sock).read_line(&mut reply).unwrap();
    assert!(reply.contains("error"), "{reply}");
    assert!(client(&["ping"]).contains("is running"));

    // The metrics endpoint listens in the relay's namespace.
    let body = join(topo.relay.run(|| {
        let mut c = std::net::TcpStream::connect("127.0.0.1:9469")?;
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        c.read_to_string(&mut body)?;
        Ok(body)
    }))
    .unwrap();
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(
        body.contains(&format!(
            "relay_output_sent_packets_total{{rule=\"video-a\",output=\"rout1 239.2.2.2:6000\",interface=\"rout1\",group=\"239.2.2.2\"}} {N}"
        )),
        "{body}"
    );
    assert!(body.contains(&format!(
        "relay_rule_received_packets_total{{rule=\"video-a\",interface=\"rin\"}} {N}"
    )));

    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
}

/// Hot reload: a steady flow on a rule that stays loses no packet across 20 reloads (by
/// `relay reload` and by SIGHUP) that add and remove another rule; the added rule starts, the
/// removed one stops, and a broken file is refused with the running rules kept.
#[test]
fn reload_keeps_unchanged_rules_lossless() {
    reload_lossless(1);
}

/// The same with two workers, where frames for rout0 cross to the other worker's lane while
/// the plan changes under both.
#[test]
fn reload_keeps_unchanged_rules_lossless_across_workers() {
    reload_lossless(2);
}

fn reload_lossless(workers: usize) {
    require_root();
    let _serial = serial();
    const N: u64 = 64_000;
    const G3: Ipv4Addr = Ipv4Addr::new(239, 3, 3, 3);
    let topo = Topology::new(2).unwrap();
    let w = workers.to_string();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &["--workers", &w]).unwrap();
    let base = std::fs::read_to_string(&relay.config).unwrap();
    let with_extra = format!(
        "{base}  - name: extra\n    input: {{ interface: rin, group: 239.3.3.3, port: 5000 }}\n    outputs:\n      - interface: rout1\n"
    );
    let ctl = relay.control.to_str().unwrap().to_owned();
    let reload = || {
        std::process::Command::new(relay_bin())
            .args(["reload", "--control", &ctl])
            .output()
            .unwrap()
    };
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);

    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, G2, 6000, r1.addr, Limits::new(N)).unwrap();
    let sender = send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N));
    for i in 0..20 {
        let yaml = if i % 2 == 0 { &with_extra } else { &base };
        std::fs::write(&relay.config, yaml).unwrap();
        if i == 7 {
            sh(&["kill", "-HUP", &relay.pid().to_string()]).unwrap();
            std::thread::sleep(Duration::from_millis(60));
        } else {
            let out = reload();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{said}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(said.starts_with("done: "), "{said}");
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    assert_eq!(join(sender).unwrap(), N);
    let all: BTreeSet<u64> = (0..N).collect();
    assert_eq!(
        seqs(&join(rx0).unwrap()),
        all,
        "no loss on the unchanged rule, output 0"
    );
    assert_eq!(
        seqs(&join(rx1).unwrap()),
        all,
        "no loss on the unchanged rule, output 1"
    );

    // The last reload (i = 19) left the base rules: 239.3.3.3 is not relayed.
    let none = listen(&r1.ns, G3, 5000, r1.addr, Limits::new(1)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G3, 5000, 50))).unwrap();
    assert!(join(none).unwrap().is_empty(), "a removed rule stops");

    std::fs::write(&relay.config, &with_extra).unwrap();
    assert!(reload().status.success());
    let some = listen(&r1.ns, G3, 5000, r1.addr, Limits::new(50)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G3, 5000, 50))).unwrap();
    assert_eq!(join(some).unwrap().len(), 50, "an added rule starts");

    // A file that does not validate is refused with --check's message; the rules stay.
    std::fs::write(
        &relay.config,
        with_extra.replace("group: 239.3.3.3", "group: 198.18.3.3"),
    )
    .unwrap();
    let out = reload();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("input group 198.18.3.3 is not a multicast address"),
        "{err}"
    );
    let still = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(20)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 20))).unwrap();
    assert_eq!(
        join(still).unwrap().len(),
        20,
        "the running rules stay after a refused reload"
    );

    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert_eq!(
        report_value(&exit.stdout, &["frames"], "leaked"),
        Some(0),
        "{}",
        exit.stdout
    );
    for said in [
        "reload: 2 rules (1 added, 0 removed, 0 changed)",
        "reload: 1 rules (0 added, 1 removed, 0 changed)",
        "SIGHUP: 1 rules (0 added, 1 removed, 0 changed)",
        "reload refused, the running rules stay",
    ] {
        assert!(exit.stderr.contains(said), "{said}\n{}", exit.stderr);
    }
}

/// `relay add-rule` and `relay remove-rule` change the running rules (validated like a
/// reload); refused changes leave everything as it was.
#[test]
fn add_and_remove_rules_at_runtime() {
    require_root();
    let _serial = serial();
    const G3: Ipv4Addr = Ipv4Addr::new(239, 3, 3, 3);
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    let ctl = relay.control.to_str().unwrap().to_owned();
    let dir = relay.config.parent().unwrap().to_owned();
    let run = |args: &[&str]| {
        std::process::Command::new(relay_bin())
            .args(args)
            .args(["--control", &ctl])
            .output()
            .unwrap()
    };
    let fragment = dir.join("extra.yaml");
    std::fs::write(
        &fragment,
        "name: extra\ninput: { interface: rin, group: 239.3.3.3, port: 5000 }\noutputs:\n  - interface: rout1\n",
    )
    .unwrap();
    let out = run(&["add-rule", fragment.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "done: 2 rules (1 added, 0 removed, 0 changed)"
    );
    let r1 = &topo.receivers[1];
    let rx = listen(&r1.ns, G3, 5000, r1.addr, Limits::new(30)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G3, 5000, 30))).unwrap();
    assert_eq!(join(rx).unwrap().len(), 30, "the added rule relays");

    // The same rule again: a duplicate name, refused.
    let out = run(&["add-rule", fragment.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rule 'extra': duplicate rule name"));
    // Not a rule at all.
    std::fs::write(
        &fragment,
        "name: bad\ninput: { interface: rin, group: 239.4.4.4, prot: 1 }\noutputs: []\n",
    )
    .unwrap();
    let out = run(&["add-rule", fragment.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `prot`"));

    let out = run(&["remove-rule", "extra"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let none = listen(&r1.ns, G3, 5000, r1.addr, Limits::new(1)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G3, 5000, 30))).unwrap();
    assert!(join(none).unwrap().is_empty(), "the removed rule stops");
    let out = run(&["remove-rule", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rule named 'nope'"));

    // video-a was never disturbed.
    let r0 = &topo.receivers[0];
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(20)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 20))).unwrap();
    assert_eq!(join(rx0).unwrap().len(), 20);
    assert!(relay.stop(Duration::from_secs(3)).unwrap().status.success());
}

/// The relay runs with CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF, CAP_PERFMON and CAP_IPC_LOCK
/// alone (what the systemd unit grants), and without any one of the first four it stops with
/// one error that names the capability it lacks.
#[test]
fn runs_with_only_its_capabilities() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let caps = ["net_admin", "net_raw", "bpf", "perfmon", "ipc_lock"];
    let bounding = |keep: &[&str]| {
        let mut set = "-all".to_owned();
        for c in keep {
            set.push_str(&format!(",+{c}"));
        }
        set
    };
    let set = bounding(&caps);
    let relay = RelayProc::start_wrapped(
        &relay_bin(),
        &topo.relay,
        RULES,
        &[],
        &["setpriv", "--bounding-set", &set, "--"],
    )
    .unwrap();
    let r0 = &topo.receivers[0];
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(50)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 50))).unwrap();
    assert_eq!(
        join(rx0).unwrap().len(),
        50,
        "relays with only these capabilities"
    );
    assert!(relay.stop(Duration::from_secs(3)).unwrap().status.success());

    for (missing, named) in [
        ("net_admin", "CAP_NET_ADMIN"),
        ("net_raw", "CAP_NET_RAW"),
        ("bpf", "CAP_BPF"),
        ("perfmon", "CAP_PERFMON"),
    ] {
        let keep: Vec<&str> = caps.iter().copied().filter(|c| *c != missing).collect();
        let set = bounding(&keep);
        let err = match RelayProc::start_wrapped(
            &relay_bin(),
            &topo.relay,
            RULES,
            &[],
            &["setpriv", "--bounding-set", &set, "--"],
        ) {
            Ok(_) => panic!("the relay started without {named}"),
            Err(e) => format!("{e:#}"),
        };
        let errors: Vec<&str> = err.lines().filter(|l| l.contains(" ERROR ")).collect();
        assert_eq!(errors.len(), 1, "one error line without {named}:\n{err}");
        assert!(errors[0].contains(named), "without {named}:\n{err}");
        assert!(
            !topo.relay_has_xdp().unwrap(),
            "nothing left attached without {named}"
        );
    }

    // Not root at all: one line that says what to do.
    let err = match RelayProc::start_wrapped(
        &relay_bin(),
        &topo.relay,
        RULES,
        &[],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
    ) {
        Ok(_) => panic!("the relay started as nobody"),
        Err(e) => format!("{e:#}"),
    };
    let errors: Vec<&str> = err.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains(
            "the relay lacks CAP_NET_ADMIN, CAP_NET_RAW, CAP_PERFMON, CAP_BPF: run it as root"
        ),
        "{err}"
    );
}

/// An egress that goes down costs only its own output (counted as interface_down) and
/// resumes when it comes back; frames larger than an egress's MTU are dropped there
/// (too_large); a reload that names a new input interface attaches to it, and one that drops
/// it detaches.
#[test]
fn egress_faults_and_interfaces_coming_and_going() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let out1 = |v: &relay::stats::StatsView, k: &str| v.rules[0].outputs[1].dropped[k];

    // rout1 down: rout0 keeps flowing, rout1's frames are counted.
    topo.relay
        .exec(&["ip", "link", "set", "rout1", "down"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(100)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 100))).unwrap();
    assert_eq!(
        join(rx0).unwrap().len(),
        100,
        "the other output keeps flowing"
    );
    let v = stats_until(&relay.control, |v| out1(v, "interface_down") == 100);
    assert_eq!(out1(&v, "interface_down"), 100, "{v:?}");
    assert_eq!(v.rules[0].outputs[0].sent, 100);

    // Back up: rout1 resumes.
    topo.relay
        .exec(&["ip", "link", "set", "rout1", "up"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let rx1 = listen(&r1.ns, G2, 6000, r1.addr, Limits::new(100)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 100))).unwrap();
    assert_eq!(
        join(rx1).unwrap().len(),
        100,
        "the output resumes when its link is back"
    );

    // rout1's MTU below the packets: dropped there as too_large, rout0 unaffected.
    topo.relay
        .exec(&["ip", "link", "set", "rout1", "mtu", "576"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(50)).unwrap();
    let mut big = Flow::new(G1, 5000, 50);
    big.len = 1000;
    join(send(&topo.sender, SENDER_ADDR, big)).unwrap();
    assert_eq!(join(rx0).unwrap().len(), 50);
    let v = stats_until(&relay.control, |v| out1(v, "too_large") == 50);
    assert_eq!(out1(&v, "too_large"), 50, "{v:?}");

    // A second input interface arrives with a reload, and goes with the next one.
    sh(&[
        "ip",
        "link",
        "add",
        "snd1",
        "netns",
        topo.sender.name(),
        "type",
        "veth",
        "peer",
        "name",
        "rin2",
        "netns",
        topo.relay.name(),
    ])
    .unwrap();
    for (ns, ifc, addr) in [
        (&topo.sender, "snd1", "198.18.9.1/24"),
        (&topo.relay, "rin2", "198.18.9.2/24"),
    ] {
        ns.exec(&["ip", "addr", "add", addr, "dev", ifc]).unwrap();
        ns.exec(&["ip", "link", "set", ifc, "up"]).unwrap();
    }
    topo.sender
        .exec(&["ethtool", "-K", "snd1", "tx", "off"])
        .unwrap();
    let base = std::fs::read_to_string(&relay.config).unwrap();
    let second = format!(
        "{base}  - name: second\n    input: {{ interface: rin2, group: 239.7.7.7, port: 5000 }}\n    outputs:\n      - interface: rout0\n"
    );
    let reload = || {
        let out = std::process::Command::new(relay_bin())
            .args(["reload", "--control", relay.control.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(&relay.config, &second).unwrap();
    reload();
    let g7 = Ipv4Addr::new(239, 7, 7, 7);
    let rx = listen(&r0.ns, g7, 5000, r0.addr, Limits::new(40)).unwrap();
    join(send(
        &topo.sender,
        Ipv4Addr::new(198, 18, 9, 1),
        Flow::new(g7, 5000, 40),
    ))
    .unwrap();
    assert_eq!(
        join(rx).unwrap().len(),
        40,
        "the new input interface relays"
    );
    let links = topo
        .relay
        .exec(&["ip", "-d", "link", "show", "rin2"])
        .unwrap();
    assert!(links.contains("prog/xdp"), "XDP attached to rin2: {links}");

    std::fs::write(&relay.config, &base).unwrap();
    reload();
    let links = topo
        .relay
        .exec(&["ip", "-d", "link", "show", "rin2"])
        .unwrap();
    assert!(
        !links.contains("prog/xdp"),
        "XDP detached from rin2: {links}"
    );
    let links = topo
        .relay
        .exec(&["ip", "-d", "link", "show", "rin"])
        .unwrap();
    assert!(links.contains("prog/xdp"), "still attached to rin: {links}");

    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    for said in [
        "rout1: link down",
        "rout1: link up",
        "rin2: XDP program attached",
        "rin2: XDP program detached",
        "rin2: joined 239.7.7.7",
        "rin2: left 239.7.7.7",
    ] {
        assert!(exit.stderr.contains(said), "{said}\n{}", exit.stderr);
    }
    assert_eq!(
        report_value(&exit.stdout, &["frames"], "leaked"),
        Some(0),
        "{}",
        exit.stdout
    );
}

/// One rule with 64 outputs on 64 veth interfaces — twice what kernel multicast routing can
/// take (MAXVIFS is 32) — delivers every packet to every receiver.
#[test]
fn fans_out_to_64_interfaces() {
    require_root();
    let _serial = serial();
    const OUTPUTS: usize = 64;
    const N: u64 = 200;
    let topo = Topology::new(OUTPUTS).unwrap();
    let mut yaml = String::from(
        "umem: { frames: 16384 }\nrules:\n  - name: wide\n    input: { interface: rin, group: 239.1.1.1, port: 5000 }\n    outputs:\n",
    );
    for i in 0..OUTPUTS {
        yaml.push_str(&format!("      - interface: rout{i}\n"));
    }
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &yaml, &[]).unwrap();
    let rxs: Vec<_> = topo
        .receivers
        .iter()
        .map(|r| listen(&r.ns, G1, 5000, r.addr, Limits::new(N)).unwrap())
        .collect();
    let mut flow = Flow::new(G1, 5000, N);
    // 64 copies of every packet: keep the offered rate well inside what one CPU transmits.
    flow.burst = 4;
    flow.pause = Duration::from_millis(2);
    join(send(&topo.sender, SENDER_ADDR, flow)).unwrap();
    for (i, rx) in rxs.into_iter().enumerate() {
        let got = seqs(&join(rx).unwrap());
        assert_eq!(got.len() as u64, N, "receiver {i} got {} of {N}", got.len());
    }
    let exit = relay.stop(Duration::from_secs(5)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert_eq!(
        report_value(&exit.stdout, &["rule=wide"], "received"),
        Some(N)
    );
    assert_eq!(
        report_value(&exit.stdout, &["output=rout63"], "sent"),
        Some(N),
        "{}",
        exit.stdout
    );
    assert_eq!(report_value(&exit.stdout, &["frames"], "leaked"), Some(0));
    // 63 copies per packet: the 64th output sends the received frame itself.
    assert_eq!(
        report_value(&exit.stdout, &["datapath"], "copies"),
        Some(63 * N),
        "{}",
        exit.stdout
    );
}

/// Interfaces that go away while the relay runs: an egress deleted costs only its own output
/// (counted as interface_down) and is bound again, by itself, when an interface of that name
/// comes back; an ingress deleted stops only its own rules, and the others keep relaying;
/// at the end every frame is accounted for and nothing stays attached.
#[test]
fn interfaces_deleted_and_created_again() {
    require_root();
    let _serial = serial();
    const N: u64 = 200;
    let topo = Topology::new(2).unwrap();
    let second = topo.add_ingress("rin2", "snd1", 100).unwrap();
    let rules = "\
rules:
  - name: a
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }, { interface: rout1 }]
  - name: b
    input: { interface: rin2, group: 239.3.3.3, port: 5000 }
    outputs: [{ interface: rout0, group: 239.1.1.1 }]
";
    let relay = RelayProc::start(&relay_bin(), &topo.relay, rules, &[]).unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let all: BTreeSet<u64> = (0..N).collect();
    let log = || std::fs::read_to_string(&relay.stderr).unwrap();
    let wait_log = |what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !log().contains(what) {
            assert!(
                std::time::Instant::now() < deadline,
                "no '{what}' in:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // An egress deleted: the other output carries on, this one counts its drops.
    topo.relay.exec(&["ip", "link", "del", "rout1"]).unwrap();
    wait_log("rout1: the interface is gone");
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(seqs(&join(rx0).unwrap()), all, "rout0 kept relaying");
    let v = stats_until(&relay.control, |v| {
        v.rules[0].outputs[1].dropped["interface_down"] == N
    });
    assert_eq!(v.rules[0].outputs[1].dropped["interface_down"], N, "{v:?}");
    assert_eq!(v.rules[0].outputs[1].sent, 0, "{v:?}");

    // Created again: the relay binds to the new device by itself.
    topo.relink_receiver(1).unwrap();
    wait_log("rout1: the interface is back (a new device); binding to it");
    wait_log("rebound: 2 rules");
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, G1, 5000, r1.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(seqs(&join(rx0).unwrap()), all, "rout0 after the rebind");
    assert_eq!(
        seqs(&join(rx1).unwrap()),
        all,
        "rout1 relays again on the new device"
    );

    // The second ingress works, then is deleted: the first keeps relaying.
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    join(send(
        &topo.sender,
        second,
        Flow::new(Ipv4Addr::new(239, 3, 3, 3), 5000, N),
    ))
    .unwrap();
    assert_eq!(seqs(&join(rx0).unwrap()), all, "rule b relays from rin2");
    topo.relay.exec(&["ip", "link", "del", "rin2"]).unwrap();
    wait_log("rin2: the interface is gone; its rules receive nothing");
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, G1, 5000, r1.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(
        seqs(&join(rx0).unwrap()),
        all,
        "rule a still relays on rout0"
    );
    assert_eq!(
        seqs(&join(rx1).unwrap()),
        all,
        "rule a still relays on rout1"
    );

    stop_clean(relay, &topo);
}

/// A second relay on an interface the first one holds, and a kernel feature the interface
/// lacks (zero-copy AF_XDP on veth): each start stops with one error line that names the
/// cause and what to do, exits non-zero, and leaves the running relay and the interfaces as
/// they were.
#[test]
fn second_relay_and_missing_feature_are_refused_clearly() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let first = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();

    let line = start_refused(&topo, RULES, "a second relay on the same interfaces");
    assert!(
        line.contains("is another relay (or AF_XDP program) running on rin? Stop it"),
        "{line}"
    );
    // The first relay is unharmed.
    let r0 = &topo.receivers[0];
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(100)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 100))).unwrap();
    assert_eq!(
        join(rx0).unwrap().len(),
        100,
        "the first relay still relays"
    );
    assert!(first.stop(Duration::from_secs(3)).unwrap().status.success());

    let line = start_refused(
        &topo,
        &format!("bind: zerocopy\n{RULES}"),
        "zero-copy on veth",
    );
    assert!(
        line.contains("zero-copy") && line.contains("not supported") && line.contains("bind: auto"),
        "{line}"
    );
    assert!(!topo.relay_has_xdp().unwrap());
}

/// One worker per ingress rx queue, pinned where `cpus:` says: a two-queue ingress gets a
/// socket and a worker for each queue by default, flows from 32 sockets spread over both
/// queues (the kernel's own per-queue counters show it), and every datagram of every flow
/// arrives on both outputs, whichever worker received it and whichever transmits.
#[test]
fn one_worker_per_rx_queue_pinned_to_cpus() {
    require_root();
    let _serial = serial();
    const FLOWS: u64 = 32;
    const PER_FLOW: u64 = 100;
    let topo = Topology::with_queues(2, 2).unwrap();
    let rules = "\
cpus: [1, 0]
rules:
  - name: mq
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }, { interface: rout1 }]
";
    let relay = RelayProc::start(&relay_bin(), &topo.relay, rules, &[]).unwrap();
    let log = std::fs::read_to_string(&relay.stderr).unwrap();
    for line in [
        "2 worker threads",
        "rin queue 0: AF_XDP socket bound in copy mode (ingress, worker 0)",
        "rin queue 1: AF_XDP socket bound in copy mode (ingress, worker 1)",
        "worker 0 pinned to CPU 1",
        "worker 1 pinned to CPU 0",
    ] {
        assert!(log.contains(line), "{line}\n{log}");
    }
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let n = FLOWS * PER_FLOW;
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(n)).unwrap();
    let rx1 = listen(&r1.ns, G1, 5000, r1.addr, Limits::new(n)).unwrap();
    // One socket per flow, so each has its own source port and hash, one after another.
    for f in 0..FLOWS {
        let mut flow = Flow::new(G1, 5000, PER_FLOW);
        flow.first_seq = f * PER_FLOW;
        join(send(&topo.sender, SENDER_ADDR, flow)).unwrap();
    }
    for (name, rx) in [("rout0", rx0), ("rout1", rx1)] {
        let got = seqs(&join(rx).unwrap());
        let missing: Vec<u64> = (0..n).filter(|s| !got.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "{name} lacks {} datagrams: {missing:?}",
            missing.len()
        );
    }

    let stats = topo.relay.exec(&["ethtool", "-S", "rin"]).unwrap();
    let queue = |q: u32| -> u64 {
        let key = format!("rx_queue_{q}_xdp_redirect:");
        stats
            .lines()
            .find_map(|l| l.trim().strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in\n{stats}"))
    };
    let (q0, q1) = (queue(0), queue(1));
    assert_eq!(q0 + q1, n, "{stats}");
    assert!(q0 > 0 && q1 > 0, "both queues carried flows: {q0} and {q1}");
    stop_clean(relay, &topo);
}
