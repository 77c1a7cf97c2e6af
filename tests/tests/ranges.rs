//! Group ranges and source prefixes on real kernel paths: a /16 remapped onto another /16
//! (groups across the range, their TTL, checksums and the MAC of the remapped group), an
//! exact group inside the range taken by its own rule alone, a source prefix that selects
//! its senders while other senders' frames reach the relay host's stack, groups outside every
//! range passed, and the per-group counters; IPv4 and IPv6, both allocators.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use relay::wire::classify;
use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{RELAY_IN, SENDER_ADDR, SENDER_ADDR6, SENDER_IF, Topology},
    traffic::{Flow, Limits, capture, join, listen, send},
};

mod common;
use common::{client_ok, inspect, mac_of, seqs, serial, stats_until, stop_clean};

const N: u64 = 100;

const RULES: &str = "\
rules:
  - name: channels
    input: { interface: rin, group: 239.10.0.0/16, port: 5000 }
    outputs: [{ interface: rout0, group: 239.20.0.0/16 }]
  - name: one-channel
    input: { interface: rin, group: 239.10.5.5, port: 5000 }
    outputs: [{ interface: rout1 }]
  - name: by-sender
    input: { interface: rin, group: 239.30.0.0/24, source: 198.18.1.0/28 }
    outputs: [{ interface: rout1 }]
  - name: channels6
    input: { interface: rin, group: 'ff18::10:0/112', port: 5000 }
    outputs: [{ interface: rout0, group: 'ff18::20:0/112' }]
  - name: by-sender6
    input: { interface: rin, group: 'ff18::30:0/112', source: '2001:2:0:1::/120' }
    outputs: [{ interface: rout1 }]
";

/// A second sender on the sender's link, outside both source prefixes.
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
const STRANGER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 1, 0);

fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Multicast UDP sent by the stranger (not relayed: the relay's own stack sees it).
fn from_stranger(frame: &[u8]) -> bool {
    classify(frame)
        .is_some_and(|f| f.source == IpAddr::from(STRANGER) || f.source == IpAddr::from(STRANGER6))
}

/// UDP to a group no rule covers.
fn to_uncovered(frame: &[u8]) -> bool {
    classify(frame).is_some_and(|f| f.group == v4("239.11.0.1") || f.group == v4("ff18::40:1"))
}

/// `relay stats --json --groups`.
fn stats_with_groups(relay: &RelayProc) -> relay::stats::StatsView {
    let said = client_ok(&relay.control, &["stats", "--json", "--groups"]);
    serde_json::from_str(&said).unwrap()
}

fn ranges(allocator: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    topo.sender
        .exec(&["ip", "addr", "add", "198.18.1.100/24", "dev", SENDER_IF])
        .unwrap();
    topo.sender
        .exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:2:0:1::1:0/64",
            "dev",
            SENDER_IF,
            "nodad",
        ])
        .unwrap();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        RULES,
        &["--allocator", allocator],
    )
    .unwrap();
    let mac0 = mac_of(&topo, "rout0");

    // Across the /16 (and the IPv6 /112): first, middle, last-but-one groups.
    let spread: [(IpAddr, IpAddr); 6] = [
        (v4("239.10.0.1"), v4("239.20.0.1")),
        (v4("239.10.128.77"), v4("239.20.128.77")),
        (v4("239.10.255.254"), v4("239.20.255.254")),
        (v4("ff18::10:1"), v4("ff18::20:1")),
        (v4("ff18::10:abcd"), v4("ff18::20:abcd")),
        (v4("ff18::10:fffe"), v4("ff18::20:fffe")),
    ];
    let mut rx = Vec::new();
    for (_, to) in spread {
        let at: IpAddr = if to.is_ipv4() {
            r0.addr.into()
        } else {
            r0.addr6.into()
        };
        rx.push(listen(&r0.ns, to, 5000, at, Limits::new(N)).unwrap());
    }
    // The exact group inside the range: on rout1 only, never remapped onto rout0.
    let exact = listen(
        &r1.ns,
        Ipv4Addr::new(239, 10, 5, 5),
        5000,
        r1.addr,
        Limits::new(N),
    )
    .unwrap();
    let mut quiet = Limits::new(1);
    quiet.idle = Duration::from_secs(3);
    let exact_on_r0 = listen(&r0.ns, Ipv4Addr::new(239, 20, 5, 5), 5000, r0.addr, quiet).unwrap();
    // The source prefixes: the sender's own address is inside them, the stranger's is not.
    let by_sender = listen(
        &r1.ns,
        Ipv4Addr::new(239, 30, 0, 9),
        6000,
        r1.addr,
        Limits::new(2 * N),
    )
    .unwrap();
    let by_sender6 = listen(&r1.ns, v4("ff18::30:9"), 6000, r1.addr6, Limits::new(2 * N)).unwrap();
    let mut cap_limits = Limits::new(2 * N);
    cap_limits.idle = Duration::from_secs(2);
    let passed = capture(&topo.relay, RELAY_IN, cap_limits, from_stranger).unwrap();
    let uncovered = capture(&topo.relay, RELAY_IN, cap_limits, to_uncovered).unwrap();

    let mut flows = Vec::new();
    for (i, (from, _)) in spread.iter().enumerate() {
        let source: IpAddr = if from.is_ipv4() {
            SENDER_ADDR.into()
        } else {
            SENDER_ADDR6.into()
        };
        flows.push(send(
            &topo.sender,
            source,
            Flow {
                first_seq: 1000 * i as u64,
                ..Flow::new(*from, 5000, N)
            },
        ));
    }
    flows.push(send(
        &topo.sender,
        SENDER_ADDR,
        Flow::new(Ipv4Addr::new(239, 10, 5, 5), 5000, N),
    ));
    for (source, group) in [
        (IpAddr::from(SENDER_ADDR), v4("239.30.0.9")),
        (IpAddr::from(STRANGER), v4("239.30.0.9")),
        (IpAddr::from(SENDER_ADDR6), v4("ff18::30:9")),
        (IpAddr::from(STRANGER6), v4("ff18::30:9")),
        (IpAddr::from(SENDER_ADDR), v4("239.11.0.1")),
        (IpAddr::from(SENDER_ADDR6), v4("ff18::40:1")),
    ] {
        flows.push(send(&topo.sender, source, Flow::new(group, 6000, N)));
    }
    for f in flows {
        assert_eq!(join(f).unwrap(), N);
    }

    for ((from, to), r) in spread.iter().zip(rx) {
        let got = join(r).unwrap();
        assert_eq!(got.len() as u64, N, "{from} -> {to}");
        let i = spread.iter().position(|(f, _)| f == from).unwrap() as u64;
        assert_eq!(
            seqs(&got),
            (1000 * i..1000 * i + N).collect(),
            "{from} -> {to}"
        );
    }
    assert_eq!(
        join(exact).unwrap().len() as u64,
        N,
        "the exact rule takes its group"
    );
    assert!(
        join(exact_on_r0).unwrap().is_empty(),
        "and the range does not"
    );
    assert_eq!(
        join(by_sender).unwrap().len() as u64,
        N,
        "only the prefix's sender"
    );
    assert_eq!(
        join(by_sender6).unwrap().len() as u64,
        N,
        "only the prefix's sender (IPv6)"
    );
    // What the relay did not take reached its own stack, as it was sent.
    let passed = join(passed).unwrap();
    assert_eq!(
        passed.len() as u64,
        2 * N,
        "the stranger's frames were passed"
    );
    let uncovered = join(uncovered).unwrap();
    assert_eq!(
        uncovered.len() as u64,
        2 * N,
        "groups outside every range were passed"
    );

    // On the wire, a remapped range frame: TTL, checksums, the MAC of the remapped group.
    let cap0 = capture(&r0.ns, &r0.iface, Limits::new(2), |f| {
        classify(f).is_some_and(|f| f.group == v4("239.20.77.1") || f.group == v4("ff18::20:7701"))
    })
    .unwrap();
    join(send(
        &topo.sender,
        SENDER_ADDR,
        Flow::new(v4("239.10.77.1"), 5000, 1),
    ))
    .unwrap();
    join(send(
        &topo.sender,
        SENDER_ADDR6,
        Flow::new(v4("ff18::10:7701"), 5000, 1),
    ))
    .unwrap();
    for f in join(cap0).unwrap() {
        let (g, port, hops, _) = inspect(&f, mac0);
        assert!(g == v4("239.20.77.1") || g == v4("ff18::20:7701"), "{g}");
        assert_eq!((port, hops), (5000, 7));
    }

    // Per-group counters of the range rules: each group's exact count.
    let v = stats_until(&relay.control, |v| {
        v.rules
            .iter()
            .find(|r| r.name == "channels")
            .unwrap()
            .received
            == 3 * N + 1
    });
    let with_groups = stats_with_groups(&relay);
    assert!(
        v.rules.iter().all(|r| r.groups.is_none()),
        "without --groups, no group counters: {v:?}"
    );
    let channels = with_groups
        .rules
        .iter()
        .find(|r| r.name == "channels")
        .unwrap();
    let groups: BTreeMap<String, u64> = channels
        .groups
        .iter()
        .flatten()
        .map(|g| (g.group.clone(), g.packets))
        .collect();
    for g in ["239.10.0.1", "239.10.128.77", "239.10.255.254"] {
        assert_eq!(groups.get(g), Some(&N), "{g}: {groups:?}");
    }
    assert_eq!(groups.get("239.10.77.1"), Some(&1));
    assert_eq!(groups.len(), 4, "{groups:?}");
    let one = with_groups
        .rules
        .iter()
        .find(|r| r.name == "one-channel")
        .unwrap();
    assert_eq!((one.received, one.groups.as_ref()), (N, None));
    let exit = stop_clean(relay, &topo);
    assert!(
        exit.stdout.contains("rule=channels received=301"),
        "{}",
        exit.stdout
    );
}

#[test]
fn ranges_and_prefixes_with_lockfree_pool() {
    ranges("lockfree");
}

#[test]
fn ranges_and_prefixes_with_mutex_pool() {
    ranges("mutex");
}

/// A flow to groups of a range while reloads add and remove other rules (an exact group
/// inside the range, another range, a source prefix) twenty times, and an add-rule and a
/// remove-rule: the range rule that stays loses nothing, and its per-group counters carry on.
#[test]
fn reloads_beside_a_range_lose_nothing() {
    require_root();
    let _serial = serial();
    const FLOW: u64 = 20_000;
    let topo = Topology::new(2).unwrap();
    let r0 = &topo.receivers[0];
    let base = "rules:\n  - name: channels\n    input: { interface: rin, group: 239.10.0.0/16, port: 5000 }\n    outputs: [{ interface: rout0, group: 239.20.0.0/16 }]\n";
    let more = format!(
        "{base}  - name: inside\n    input: {{ interface: rin, group: 239.10.9.9, port: 5000 }}\n    outputs: [{{ interface: rout1 }}]\n  - name: other\n    input: {{ interface: rin, group: 239.40.0.0/24, source: 198.18.1.0/28 }}\n    outputs: [{{ interface: rout1 }}]\n"
    );
    let relay = RelayProc::start(&relay_bin(), &topo.relay, base, &[]).unwrap();
    let run = |args: &[&str]| client_ok(&relay.control, args);
    let rx = listen(
        &r0.ns,
        Ipv4Addr::new(239, 20, 3, 4),
        5000,
        r0.addr,
        Limits::new(FLOW),
    )
    .unwrap();
    let sender = send(
        &topo.sender,
        SENDER_ADDR,
        Flow::new(Ipv4Addr::new(239, 10, 3, 4), 5000, FLOW),
    );
    for i in 0..20 {
        std::fs::write(&relay.config, if i % 2 == 0 { &more } else { base }).unwrap();
        run(&["reload"]);
        std::thread::sleep(Duration::from_millis(30));
    }
    let extra = relay.config.with_file_name("extra.yaml");
    std::fs::write(
        &extra,
        "name: extra\ninput: { interface: rin, group: 239.50.0.0/16 }\noutputs: [{ interface: rout1 }]\n",
    )
    .unwrap();
    run(&["add-rule", extra.to_str().unwrap()]);
    run(&["remove-rule", "extra"]);
    assert_eq!(join(sender).unwrap(), FLOW);
    let got = join(rx).unwrap();
    assert_eq!(
        seqs(&got),
        (0..FLOW).collect(),
        "no loss on the range rule that stays"
    );
    // Counters are published every 100 ms.
    stats_until(&relay.control, |v| v.rules[0].received == FLOW);
    let v = stats_with_groups(&relay);
    let channels = v.rules.iter().find(|r| r.name == "channels").unwrap();
    assert_eq!(channels.received, FLOW);
    let g = &channels.groups.as_ref().unwrap()[0];
    assert_eq!(
        (g.group.as_str(), g.packets, g.error),
        ("239.10.3.4", FLOW, 0)
    );
    stop_clean(relay, &topo);
}
