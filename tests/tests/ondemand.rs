//! On-demand outputs on real kernel paths: the relay is the IGMP/MLD querier on the output's
//! link, the hosts behind it are Linux's own IGMPv3/MLDv2 (and, forced, IGMPv2/MLDv1) stacks
//! joining and leaving with ordinary sockets, and the flow follows them. An always-on output
//! of the same rule gets everything throughout. Both allocators; IPv4 and IPv6.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use relay::{
    checksum::checksum,
    querier::QuerierView,
    stats::{OutputView, StatsView},
};
use relay_tests::{
    netns::{Netns, require_root},
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, SENDER_ADDR6, Topology},
    traffic::{Flow, Limits, capture, check_payload, ifindex_of, inject, join, listen, send},
};

mod common;
use common::{client_ok, dad_done, is_udp_to_test_group, serial, stats_until, stop_clean};

const G4: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
const G6: Ipv6Addr = Ipv6Addr::new(0xff18, 0, 0, 0, 0, 0, 1, 1);
const ROUT0: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// The RFCs' defaults but a 1 s response interval, so a host answers a query within a
/// second; the last member query time is then 2 × 1 s.
const QUERIER: &str = "querier: { query_interval: 125, query_response_interval: 1 }\n";
const LMQT: Duration = Duration::from_secs(2);

const RULES: &str = "\
rules:
  - name: od4
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs:
      - { interface: rout0, on_demand: true }
      - { interface: rout1 }
  - name: od6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs:
      - { interface: rout0, on_demand: true }
      - { interface: rout1 }
";

/// A host's membership, held by a socket on a thread in its namespace until dropped (then the
/// kernel reports the leave); it records when each relayed datagram arrived.
struct Member {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<Result<Vec<(Instant, u64)>>>,
    joined: Instant,
}

impl Member {
    fn join(ns: &Netns, group: IpAddr, iface_addr: IpAddr) -> Member {
        let (stop, stopped) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = ns.run(move || {
            let sock = UdpSocket::bind(SocketAddr::new(group, 5000))
                .with_context(|| format!("binding {group}"))?;
            match (group, iface_addr) {
                (IpAddr::V4(g), IpAddr::V4(a)) => sock.join_multicast_v4(&g, &a)?,
                (IpAddr::V6(g), IpAddr::V6(a)) => sock.join_multicast_v6(&g, ifindex_of(a)?)?,
                _ => anyhow::bail!("mixed families"),
            }
            sock.set_read_timeout(Some(Duration::from_millis(20)))?;
            let _ = ready_tx.send(Instant::now());
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(60);
            while stopped.try_recv().is_err() && Instant::now() < deadline {
                if let Ok(n) = sock.recv(&mut buf)
                    && let Some(seq) = check_payload(&buf[..n])
                {
                    got.push((Instant::now(), seq));
                }
            }
            Ok(got)
        });
        let joined = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the member joined");
        Member {
            stop,
            handle,
            joined,
        }
    }

    /// Leaves (the socket closes); what arrived while it was a member.
    fn leave(self) -> (Instant, Vec<(Instant, u64)>) {
        let _ = self.stop.send(());
        let got = join(self.handle).unwrap();
        (Instant::now(), got)
    }
}

fn output<'a>(v: &'a StatsView, rule: &str, i: usize) -> &'a OutputView {
    &v.rules.iter().find(|r| r.name == rule).unwrap().outputs[i]
}

fn forwarding(v: &StatsView, rule: &str) -> bool {
    output(v, rule, 0).on_demand.as_ref().unwrap().forwarding
}

/// Polls `relay stats` until the on-demand outputs of `rules` forward (`on`) or not; when
/// that was seen, or `None` after `limit`.
fn until_forwarding(
    relay: &RelayProc,
    rules: &[&str],
    on: bool,
    limit: Duration,
) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let v = stats_until(&relay.control, |_| true);
        if rules.iter().all(|r| forwarding(&v, r) == on) {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn queriers(relay: &RelayProc) -> Vec<QuerierView> {
    let out = client_ok(&relay.control, &["members", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn querier<'a>(q: &'a [QuerierView], family: &str) -> &'a QuerierView {
    q.iter()
        .find(|q| q.interface == "rout0" && q.family == family)
        .unwrap_or_else(|| panic!("no {family} querier on rout0: {q:?}"))
}

/// A paced flow to each group: `count` datagrams, about 1,000 a second.
fn flows(topo: &Topology, count: u64) -> [JoinHandle<Result<u64>>; 2] {
    let flow = |g: IpAddr| Flow {
        burst: 4,
        pause: Duration::from_millis(4),
        ..Flow::new(g, 5000, count)
    };
    [
        send(&topo.sender, SENDER_ADDR, flow(G4.into())),
        send(&topo.sender, SENDER_ADDR6, flow(G6.into())),
    ]
}

/// An IGMP general or group-specific query, or an MLD query, seen on the wire: (source,
/// group; unspecified for a general query).
fn query_of(frame: &[u8]) -> Option<(IpAddr, IpAddr)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    match ethertype {
        0x0800 => {
            let ihl = usize::from(frame.get(14)? & 0x0f) * 4;
            if *frame.get(23)? != 2 {
                return None;
            }
            let igmp = frame.get(14 + ihl..)?;
            (*igmp.first()? == 0x11).then(|| {
                let src: [u8; 4] = frame[26..30].try_into().unwrap();
                let g: [u8; 4] = igmp[4..8].try_into().unwrap();
                (IpAddr::from(src), IpAddr::from(g))
            })
        }
        0x86dd => {
            // Hop-by-hop (Router Alert) then ICMPv6.
            if *frame.get(20)? != 0 || *frame.get(54)? != 58 {
                return None;
            }
            let hbh_len = (usize::from(*frame.get(55)?) + 1) * 8;
            let icmp = frame.get(54 + hbh_len..)?;
            (*icmp.first()? == 130).then(|| {
                let src: [u8; 16] = frame[22..38].try_into().unwrap();
                let g: [u8; 16] = icmp.get(8..24)?.try_into().unwrap();
                Some((IpAddr::from(src), IpAddr::from(g)))
            })?
        }
        _ => None,
    }
}

fn is_query(frame: &[u8]) -> bool {
    query_of(frame).is_some()
}

fn link_local(ns: &Netns, iface: &str) -> Ipv6Addr {
    let out = ns
        .exec(&[
            "ip", "-6", "-o", "addr", "show", "dev", iface, "scope", "link",
        ])
        .unwrap();
    let a = out
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no link-local address on {iface}: {out}"));
    a.parse().unwrap()
}

/// Join, flow, leave, for both families at once: nothing before the join, the flow within a
/// second of it, none again within the last member query time and a second after the
/// leave, and the always-on output gets every datagram throughout.
fn follows_joins_and_leaves(allocator: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    for ns in [&topo.relay, &r0.ns, &r1.ns] {
        dad_done(ns);
    }
    let queries = capture(
        &r0.ns,
        &r0.iface,
        Limits {
            expect: u64::MAX,
            idle: Duration::from_secs(30),
            max: Duration::from_secs(20),
        },
        is_query,
    )
    .unwrap();
    let started = Instant::now();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        &format!("{QUERIER}{RULES}"),
        &["--allocator", allocator],
    )
    .unwrap();
    const COUNT: u64 = 9000;
    let always: Vec<_> = [
        (IpAddr::from(G4), IpAddr::from(r1.addr)),
        (G6.into(), r1.addr6.into()),
    ]
    .into_iter()
    .map(|(g, a)| listen(&r1.ns, g, 5000, a, Limits::new(COUNT)).unwrap())
    .collect();
    let senders = flows(&topo, COUNT);

    // Before any join: the on-demand output holds everything back, and its link sees none.
    let before = capture(
        &r0.ns,
        &r0.iface,
        Limits {
            expect: u64::MAX,
            idle: Duration::from_secs(2),
            max: Duration::from_millis(1500),
        },
        is_udp_to_test_group,
    )
    .unwrap();
    let relayed_before = join(before).unwrap();
    assert!(relayed_before.is_empty(), "{} frames", relayed_before.len());
    let v = stats_until(&relay.control, |_| true);
    for rule in ["od4", "od6"] {
        let o = output(&v, rule, 0);
        let d = o.on_demand.as_ref().unwrap();
        assert!(
            !d.forwarding && o.sent == 0 && d.no_listener > 0,
            "{rule}: {o:?}"
        );
        assert!(
            output(&v, rule, 1).sent > 0,
            "{rule}: the always-on output sends"
        );
    }

    // A host joins: its kernel reports at once, and the flow starts within a second.
    let m4 = Member::join(&r0.ns, G4.into(), r0.addr.into());
    let m6 = Member::join(&r0.ns, G6.into(), r0.addr6.into());
    std::thread::sleep(Duration::from_millis(1500));
    let q = queriers(&relay);
    let g4 = querier(&q, "ipv4")
        .members
        .iter()
        .find(|m| m.group == G4.to_string());
    let g4 = g4.unwrap_or_else(|| panic!("{q:?}"));
    assert_eq!(
        (g4.mode.as_str(), g4.version.as_str()),
        ("exclude", "v3"),
        "{g4:?}"
    );
    assert_eq!(
        g4.last_reporter.as_deref(),
        Some(r0.addr.to_string().as_str())
    );
    assert!(
        querier(&q, "ipv4").querier && querier(&q, "ipv6").querier,
        "{q:?}"
    );
    let g6 = querier(&q, "ipv6")
        .members
        .iter()
        .find(|m| m.group == G6.to_string());
    assert_eq!(g6.unwrap_or_else(|| panic!("{q:?}")).version, "mldv2");
    let (joined4, joined6) = (m4.joined, m6.joined);
    let (left, got4) = m4.leave();
    let (_, got6) = m6.leave();
    for (family, joined, got) in [("IPv4", joined4, &got4), ("IPv6", joined6, &got6)] {
        let first = got
            .first()
            .unwrap_or_else(|| panic!("{family}: nothing arrived while joined"))
            .0;
        assert!(
            first - joined <= Duration::from_secs(1),
            "{family}: the flow started {:?} after the join",
            first - joined
        );
    }

    // The host left: the relay asks for the group twice, a second apart, and stops.
    let stopped = until_forwarding(
        &relay,
        &["od4", "od6"],
        false,
        LMQT + Duration::from_secs(2),
    )
    .expect("the flow stopped after the leave");
    let after_leave = stopped - left;
    assert!(
        after_leave <= LMQT + Duration::from_secs(1),
        "stopped {after_leave:?} after the leave"
    );
    // The counters are published every 100 ms: let the last frames sent show first.
    std::thread::sleep(Duration::from_millis(300));
    let v = stats_until(&relay.control, |_| true);
    std::thread::sleep(Duration::from_millis(1000));
    let later = stats_until(&relay.control, |_| true);
    for rule in ["od4", "od6"] {
        assert_eq!(
            output(&later, rule, 0).sent,
            output(&v, rule, 0).sent,
            "{rule}: stopped"
        );
    }

    for s in senders {
        assert_eq!(join(s).unwrap(), COUNT);
    }
    for (family, a) in ["IPv4", "IPv6"].iter().zip(always) {
        assert_eq!(
            join(a).unwrap().len() as u64,
            COUNT,
            "{family}: the always-on output"
        );
    }
    let v = stats_until(&relay.control, |v| {
        v.rules.iter().all(|r| r.received == COUNT)
    });
    for rule in ["od4", "od6"] {
        let o = output(&v, rule, 0);
        let d = o.on_demand.as_ref().unwrap();
        // Every frame was either sent or held back for want of a listener; nothing dropped.
        assert_eq!(o.sent + d.no_listener, COUNT, "{rule}: {o:?}");
        assert_eq!(o.dropped.values().sum::<u64>(), 0, "{rule}: {o:?}");
        assert!(d.changed_ms.is_some(), "{rule}: {d:?}");
    }
    let exit = stop_clean(relay, &topo);
    assert!(
        exit.stdout.contains(" on_demand no_listener="),
        "{}",
        exit.stdout
    );

    // The relay's startup queries, from its own addresses, in its first second; and the
    // group-specific ones after the leave.
    let seen: Vec<(IpAddr, IpAddr)> = join(queries)
        .unwrap()
        .iter()
        .filter_map(|f| query_of(f))
        .collect();
    let relay_ll = IpAddr::from(link_local(&topo.relay, "rout0"));
    for (from, general, specific) in [
        (
            IpAddr::from(ROUT0),
            IpAddr::from(Ipv4Addr::UNSPECIFIED),
            IpAddr::from(G4),
        ),
        (relay_ll, Ipv6Addr::UNSPECIFIED.into(), G6.into()),
    ] {
        // The second startup query is a quarter query interval (31 s) later, after the
        // capture: exactly one.
        let general_n = seen.iter().filter(|q| **q == (from, general)).count();
        assert_eq!(
            general_n, 1,
            "startup general queries from {from}: {seen:?}"
        );
        let specific_n = seen.iter().filter(|q| **q == (from, specific)).count();
        // At least robustness (2) of them: a repeated leave report may add one.
        assert!(
            specific_n >= 2,
            "group-specific queries from {from}: {seen:?}"
        );
    }
    assert!(
        left - started < Duration::from_secs(18),
        "the leave's queries fell inside the capture"
    );
}

#[test]
fn follows_joins_and_leaves_with_lockfree_pool() {
    follows_joins_and_leaves("lockfree");
}

#[test]
fn follows_joins_and_leaves_with_mutex_pool() {
    follows_joins_and_leaves("mutex");
}

const ONE_RULE: &str = "\
rules:
  - name: od4
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [ { interface: rout0, on_demand: true } ]
  - name: od6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs: [ { interface: rout0, on_demand: true } ]
";

/// One receiver's link, its IPv6 addresses past duplicate address detection (MLD wants the
/// link-local ones), and the relay started on it with `yaml`.
fn one_link(yaml: &str, args: &[&str]) -> (Topology, RelayProc) {
    let topo = Topology::new(1).unwrap();
    dad_done(&topo.relay);
    dad_done(&topo.receivers[0].ns);
    let relay = RelayProc::start(&relay_bin(), &topo.relay, yaml, args).unwrap();
    (topo, relay)
}

/// A second host on receiver 0's link: receiver 0's interface goes into a bridge (with its
/// address), and a new namespace hangs off the bridge as 198.18.2.3. The bridge floods
/// multicast (no snooping), as a dumb switch does.
fn second_host(topo: &Topology) -> Netns {
    let r0 = &topo.receivers[0];
    let h2 = Netns::new("h2").unwrap();
    for cmd in [
        "ip link add br0 type bridge mcast_snooping 0",
        "ip link set br0 up",
        "ip addr del 198.18.2.2/24 dev rcv0",
        "ip link set rcv0 master br0",
        "ip addr add 198.18.2.2/24 dev br0",
        "sysctl -qw net.ipv4.conf.br0.rp_filter=0",
    ] {
        r0.ns.exec(&cmd.split(' ').collect::<Vec<_>>()).unwrap();
    }
    r0.ns
        .exec(&[
            "ip",
            "link",
            "add",
            "h2p",
            "type",
            "veth",
            "peer",
            "name",
            "h2e",
            "netns",
            h2.name(),
        ])
        .unwrap();
    r0.ns
        .exec(&["ip", "link", "set", "h2p", "master", "br0", "up"])
        .unwrap();
    for cmd in [
        "ip addr add 198.18.2.3/24 dev h2e",
        "ip link set h2e up",
        "sysctl -qw net.ipv4.conf.all.rp_filter=0",
        "sysctl -qw net.ipv4.conf.h2e.rp_filter=0",
    ] {
        h2.exec(&cmd.split(' ').collect::<Vec<_>>()).unwrap();
    }
    h2
}

/// A host that joined before the relay started is found by the relay's startup query; with
/// two hosts on the link, one leaving keeps the flow (the other answers the relay's
/// group-specific query), and the flow stops when the last one leaves.
#[test]
fn found_by_the_startup_query_and_kept_by_a_second_listener() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let h2 = second_host(&topo);
    let a = Member::join(
        &topo.receivers[0].ns,
        G4.into(),
        Ipv4Addr::new(198, 18, 2, 2).into(),
    );
    // Its unsolicited reports (two, within a second) are over before the relay starts.
    std::thread::sleep(Duration::from_millis(2500));
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        &format!("{QUERIER}{ONE_RULE}"),
        &[],
    )
    .unwrap();
    let start = Instant::now();
    let senders = flows(&topo, 12_000);
    let found = until_forwarding(&relay, &["od4"], true, Duration::from_secs(4))
        .expect("the startup query found the member");
    // The host answers the query within its 1 s response interval.
    assert!(
        found - start <= Duration::from_secs(2),
        "found after {:?}",
        found - start
    );

    let b = Member::join(&h2, G4.into(), Ipv4Addr::new(198, 18, 2, 3).into());
    std::thread::sleep(Duration::from_millis(500));
    let (a_left, _) = a.leave();
    // Longer than the last member query time and a second: the flow never stops.
    while a_left.elapsed() < LMQT + Duration::from_millis(1500) {
        let v = stats_until(&relay.control, |_| true);
        assert!(
            forwarding(&v, "od4"),
            "the second listener keeps the flow: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let q = queriers(&relay);
    let m = querier(&q, "ipv4")
        .members
        .iter()
        .find(|m| m.group == G4.to_string());
    assert_eq!(
        m.unwrap_or_else(|| panic!("{q:?}"))
            .last_reporter
            .as_deref(),
        Some("198.18.2.3"),
        "the second host answered the group-specific query"
    );
    let (b_left, got_b) = b.leave();
    let late = got_b.iter().filter(|(t, _)| *t > a_left + LMQT).count();
    assert!(late > 100, "the second host kept receiving: {late}");
    let stopped = until_forwarding(&relay, &["od4"], false, LMQT + Duration::from_secs(2))
        .expect("the flow stopped after the last leave");
    assert!(stopped - b_left <= LMQT + Duration::from_secs(1));
    for s in senders {
        join(s).unwrap();
    }
    stop_clean(relay, &topo);
}

/// The on-demand line's "groups with listeners" counts the groups the outputs on the
/// interface can forward, not the groups every host reports for itself (IPv6 solicited-node
/// `ff02::1:ff..`, answered to the relay's query): 0 before anyone joins, 1 per family after.
#[test]
fn the_groups_count_only_what_outputs_forward() {
    require_root();
    let _serial = serial();
    let (topo, relay) = one_link(&format!("{QUERIER}{ONE_RULE}"), &[]);
    let r0 = &topo.receivers[0];
    let groups = |v: &StatsView, rule: &str| output(v, rule, 0).on_demand.as_ref().unwrap().groups;
    // The startup query is answered within its 1 s response interval.
    std::thread::sleep(Duration::from_millis(2500));
    let q = queriers(&relay);
    let v = stats_until(&relay.control, |_| true);
    assert_eq!(
        (groups(&v, "od4"), groups(&v, "od6")),
        (0, 0),
        "nobody joined: {q:?}"
    );
    // The host did report groups of its own: they were not taken.
    let not_forwarded = |family| {
        querier(&q, family)
            .refused
            .get("not_forwarded")
            .copied()
            .unwrap_or(0)
    };
    assert!(not_forwarded("ipv6") > 0, "{q:?}");
    let a = Member::join(&r0.ns, G4.into(), r0.addr.into());
    let b = Member::join(&r0.ns, G6.into(), r0.addr6.into());
    assert!(until_forwarding(&relay, &["od4", "od6"], true, Duration::from_secs(2)).is_some());
    let q = queriers(&relay);
    let v = stats_until(&relay.control, |_| true);
    assert_eq!((groups(&v, "od4"), groups(&v, "od6")), (1, 1), "{q:?}");
    let text = client_ok(&relay.control, &["stats"]);
    assert!(text.contains("1 groups with listeners on rout0"), "{text}");
    a.leave();
    b.leave();
    stop_clean(relay, &topo);
}

/// An IGMPv3 general query from `source` (max response 1 s, QRV 2, QQIC 2 s), as a router
/// on the link would send it: TTL 1, Router Alert.
fn general_query_from(source: Ipv4Addr) -> Vec<u8> {
    let mut igmp = vec![0x11, 10, 0, 0, 0, 0, 0, 0, 0x02, 2, 0, 0];
    let c = checksum(&igmp);
    igmp[2..4].copy_from_slice(&c.to_be_bytes());
    igmp_frame(source, Ipv4Addr::new(224, 0, 0, 1), 1, true, &igmp)
}

/// An Ethernet frame with an IPv4 header (with a Router Alert option when `ra`) around `igmp`.
fn igmp_frame(source: Ipv4Addr, dest: Ipv4Addr, ttl: u8, ra: bool, igmp: &[u8]) -> Vec<u8> {
    let d = dest.octets();
    let mut f = vec![
        0x01,
        0x00,
        0x5e,
        d[1] & 0x7f,
        d[2],
        d[3],
        0x02,
        0xee,
        0,
        0,
        0,
        9,
        0x08,
        0x00,
    ];
    let hlen = if ra { 24 } else { 20 };
    let total = (hlen + igmp.len()) as u16;
    let mut ip = vec![(0x40 | (hlen / 4)) as u8, 0xc0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, ttl, 2, 0, 0]);
    ip.extend_from_slice(&source.octets());
    ip.extend_from_slice(&d);
    if ra {
        ip.extend_from_slice(&[0x94, 0x04, 0, 0]);
    }
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(igmp);
    f
}

/// Another querier with a lower address on the link: the relay stops its general queries
/// while it is heard (and still follows reports), and takes over again once it has been
/// quiet for the other querier present interval.
#[test]
fn a_querier_with_a_lower_address_silences_the_relay() {
    require_root();
    let _serial = serial();
    // Queries every 2 s; the other querier present interval is then 2 × 2 + 0.5 = 4.5 s.
    let yaml = format!("querier: {{ query_interval: 2, query_response_interval: 1 }}\n{ONE_RULE}");
    let (topo, relay) = one_link(&yaml, &[]);
    let r0 = &topo.receivers[0];
    let ours = |f: &[u8]| query_of(f) == Some((ROUT0.into(), Ipv4Addr::UNSPECIFIED.into()));
    let count_ours = |frames: Vec<Vec<u8>>| frames.iter().filter(|f| ours(f)).count();
    let window = |d: Duration| Limits {
        expect: u64::MAX,
        idle: d + Duration::from_secs(1),
        max: d,
    };
    let heard = count_ours(
        join(
            capture(
                &r0.ns,
                &r0.iface,
                window(Duration::from_millis(4500)),
                is_query,
            )
            .unwrap(),
        )
        .unwrap(),
    );
    assert!(heard >= 2, "the relay queries every 2 s: {heard}");

    // The other router queries every second for 7 s.
    let lower = Ipv4Addr::new(198, 18, 0, 9);
    let other = inject(
        &r0.ns,
        &r0.iface,
        vec![general_query_from(lower); 7],
        Duration::from_secs(1),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let quiet = capture(&r0.ns, &r0.iface, window(Duration::from_secs(6)), is_query).unwrap();
    let q = queriers(&relay);
    assert!(!querier(&q, "ipv4").querier, "{q:?}");
    // Reports are still followed while another router queries.
    let m = Member::join(&r0.ns, G4.into(), r0.addr.into());
    let senders = flows(&topo, 3000);
    assert!(until_forwarding(&relay, &["od4"], true, Duration::from_secs(1)).is_some());
    assert_eq!(count_ours(join(quiet).unwrap()), 0, "the relay kept quiet");
    assert_eq!(join(other).unwrap(), 7);
    let _ = m.leave();

    // Quiet for 4.5 s: the relay is querier again.
    let back = count_ours(
        join(capture(&r0.ns, &r0.iface, window(Duration::from_secs(8)), is_query).unwrap())
            .unwrap(),
    );
    assert!(back >= 1, "the relay took over again");
    assert!(querier(&queriers(&relay), "ipv4").querier);
    for s in senders {
        join(s).unwrap();
    }
    stop_clean(relay, &topo);
}

/// Hosts forced to IGMPv2 and MLDv1: their reports and leaves work, and the groups run in
/// those compatibility modes.
#[test]
fn igmpv2_and_mldv1_hosts() {
    require_root();
    let _serial = serial();
    let (topo, relay) = one_link(&format!("{QUERIER}{ONE_RULE}"), &[]);
    let r0 = &topo.receivers[0];
    // Before the host joins anything: its reports are then of these versions only.
    for knob in [
        format!("net.ipv4.conf.{}.force_igmp_version=2", r0.iface),
        format!("net.ipv6.conf.{}.force_mld_version=1", r0.iface),
    ] {
        r0.ns.exec(&["sysctl", "-qw", &knob]).unwrap();
    }
    let senders = flows(&topo, 8000);
    let m4 = Member::join(&r0.ns, G4.into(), r0.addr.into());
    let m6 = Member::join(&r0.ns, G6.into(), r0.addr6.into());
    let on = until_forwarding(&relay, &["od4", "od6"], true, Duration::from_secs(2))
        .expect("v2/v1 reports start the flow");
    assert!(on - m6.joined <= Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(1500));
    let q = queriers(&relay);
    let version = |family: &str, g: String| {
        querier(&q, family)
            .members
            .iter()
            .find(|m| m.group == g)
            .unwrap_or_else(|| panic!("{q:?}"))
            .version
            .clone()
    };
    assert_eq!(version("ipv4", G4.to_string()), "v2");
    assert_eq!(version("ipv6", G6.to_string()), "mldv1");
    let (left, got) = m4.leave();
    let _ = m6.leave();
    assert!(!got.is_empty());
    let off = until_forwarding(
        &relay,
        &["od4", "od6"],
        false,
        LMQT + Duration::from_secs(2),
    )
    .expect("an IGMPv2 leave and an MLDv1 done stop the flow");
    assert!(off - left <= LMQT + Duration::from_secs(1));
    for s in senders {
        join(s).unwrap();
    }
    stop_clean(relay, &topo);
}

/// Appends group records (kind, group, sources), which IGMPv3 and MLDv2 lay out alike.
fn push_records<A: Copy + Into<IpAddr>>(out: &mut Vec<u8>, records: &[(u8, A, &[A])]) {
    for (kind, g, sources) in records {
        out.extend_from_slice(&[*kind, 0]);
        out.extend_from_slice(&(sources.len() as u16).to_be_bytes());
        for a in std::iter::once(g).chain(sources.iter()) {
            match (*a).into() {
                IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
            }
        }
    }
}

/// An IGMPv3 report with one record of `kind` for `group` and `sources`.
fn v3_report(records: &[(u8, Ipv4Addr, &[Ipv4Addr])], claimed: Option<u16>) -> Vec<u8> {
    let mut igmp = vec![0x22, 0, 0, 0, 0, 0];
    igmp.extend_from_slice(&claimed.unwrap_or(records.len() as u16).to_be_bytes());
    push_records(&mut igmp, records);
    let c = checksum(&igmp);
    igmp[2..4].copy_from_slice(&c.to_be_bytes());
    igmp
}

/// An MLDv2 report frame from `source` (hop-by-hop Router Alert, ICMPv6 checksum) with one
/// EXCLUDE({}) record for `group`.
fn mld_report(source: Ipv6Addr, hop_limit: u8, group: Ipv6Addr) -> Vec<u8> {
    mld_v2_report(source, hop_limit, &[(2, group, &[])])
}

/// An MLDv2 report frame from `source` with `records` (kind, group, sources).
fn mld_v2_report(
    source: Ipv6Addr,
    hop_limit: u8,
    records: &[(u8, Ipv6Addr, &[Ipv6Addr])],
) -> Vec<u8> {
    let mut icmp = vec![143, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&(records.len() as u16).to_be_bytes());
    push_records(&mut icmp, records);
    mld_frame(source, "ff02::16".parse().unwrap(), hop_limit, icmp)
}

/// An MLDv1 report for `group` from `source`, sent to the group.
fn mldv1_report(source: Ipv6Addr, group: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![131, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&group.octets());
    mld_frame(source, group, 1, icmp)
}

/// An Ethernet frame with an IPv6 header and a hop-by-hop Router Alert around the MLD
/// message `icmp`, its checksum filled in.
fn mld_frame(source: Ipv6Addr, dest: Ipv6Addr, hop_limit: u8, mut icmp: Vec<u8>) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&dest.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let c = checksum(&pseudo);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let d = dest.octets();
    let mut f = vec![
        0x33, 0x33, d[12], d[13], d[14], d[15], 0x02, 0xee, 0, 0, 0, 9, 0x86, 0xdd,
    ];
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((8 + icmp.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, hop_limit]);
    f.extend_from_slice(&source.octets());
    f.extend_from_slice(&dest.octets());
    // Hop-by-hop: next header ICMPv6, Router Alert (MLD), PadN.
    f.extend_from_slice(&[58, 0, 5, 2, 0, 0, 1, 0]);
    f.extend_from_slice(&icmp);
    f
}

/// Hostile and broken reports on the output's link: each refused, counted by reason, none of
/// them a member, and the relay carries on (a real host's join works afterwards).
#[test]
fn hostile_reports_are_counted_and_refused() {
    require_root();
    let _serial = serial();
    let (topo, relay) = one_link(&format!("{QUERIER}{ONE_RULE}"), &[]);
    let r0 = &topo.receivers[0];
    let host = r0.addr;
    let to = Ipv4Addr::new(224, 0, 0, 22);
    let join_g4 = v3_report(&[(4, G4, &[])], None);
    let mut bad_sum = join_g4.clone();
    bad_sum[2] ^= 0x55;
    // Cut inside its sources, with the checksum made over what is left (as a crafted
    // report would be): refused as truncated, not for its checksum.
    let truncated = {
        let mut r = v3_report(&[(1, G4, &[host, host])], None);
        r.truncate(r.len() - 6);
        r[2..4].copy_from_slice(&[0, 0]);
        let c = checksum(&r);
        r[2..4].copy_from_slice(&c.to_be_bytes());
        r
    };
    let huge = v3_report(&[(4, G4, &[])], Some(u16::MAX));
    let ll = link_local(&r0.ns, &r0.iface);
    let frames = vec![
        igmp_frame(host, to, 1, true, &bad_sum),
        igmp_frame(host, to, 1, true, &truncated),
        igmp_frame(host, to, 1, true, &huge),
        igmp_frame(host, to, 2, true, &join_g4),
        igmp_frame(host, to, 1, false, &join_g4),
        mld_report(r0.addr6, 1, G6),
        mld_report(ll, 255, G6),
        // Cut inside its record's group address (the IPv6 length says more follows).
        {
            let f = mld_report(ll, 1, G6);
            f[..f.len() - 8].to_vec()
        },
    ];
    let n = frames.len();
    assert_eq!(
        join(inject(&r0.ns, &r0.iface, frames, Duration::from_millis(20)).unwrap()).unwrap(),
        n
    );
    std::thread::sleep(Duration::from_millis(300));
    let q = queriers(&relay);
    let (v4, v6) = (querier(&q, "ipv4"), querier(&q, "ipv6"));
    let refused = |v: &QuerierView, k: &str| v.refused.get(k).copied().unwrap_or(0);
    assert_eq!(refused(v4, "bad_checksum"), 1, "{v4:?}");
    assert_eq!(refused(v4, "truncated"), 2, "{v4:?}");
    assert_eq!(refused(v4, "ttl_not_one"), 1, "{v4:?}");
    assert_eq!(refused(v4, "no_router_alert"), 1, "{v4:?}");
    assert_eq!(refused(v6, "bad_source"), 1, "{v6:?}");
    assert_eq!(refused(v6, "ttl_not_one"), 1, "{v6:?}");
    assert_eq!(refused(v6, "truncated"), 1, "{v6:?}");
    // None of the refused reports' groups has state (the host's own solicited-node groups
    // have none either: no output sends to them, so they are `not_forwarded`).
    let named = |v: &QuerierView, g: String| v.members.iter().any(|m| m.group == g);
    assert!(
        !named(v4, G4.to_string()) && !named(v6, G6.to_string()),
        "{q:?}"
    );
    let v = stats_until(&relay.control, |_| true);
    assert!(!forwarding(&v, "od4") && !forwarding(&v, "od6"));

    // A valid report from the same host works.
    let ok = igmp_frame(host, to, 1, true, &join_g4);
    assert_eq!(
        join(inject(&r0.ns, &r0.iface, vec![ok], Duration::ZERO).unwrap()).unwrap(),
        1
    );
    assert!(until_forwarding(&relay, &["od4"], true, Duration::from_secs(1)).is_some());
    client_ok(&relay.control, &["ping"]);
    stop_clean(relay, &topo);
}

/// A reload (a rule added, the on-demand outputs kept) and a reload that is refused keep the
/// membership state: the outputs forward throughout, without waiting for a query; an
/// on-demand output added by the reload to a group a host already joined is found by the
/// next query, and a rule removed stops its output.
fn reload_keeps_membership(allocator: &str) {
    require_root();
    let _serial = serial();
    // Queries every 4 s, so the added output is found within one.
    let querier = "querier: { query_interval: 4, query_response_interval: 1 }\n";
    let (topo, relay) = one_link(&format!("{querier}{ONE_RULE}"), &["--allocator", allocator]);
    let r0 = &topo.receivers[0];
    let m4 = Member::join(&r0.ns, G4.into(), r0.addr.into());
    let m6 = Member::join(&r0.ns, G6.into(), r0.addr6.into());
    // A host that listens to a group no output sends yet.
    let g3 = Ipv4Addr::new(239, 3, 3, 3);
    let m3 = Member::join(&r0.ns, g3.into(), r0.addr.into());
    assert!(until_forwarding(&relay, &["od4", "od6"], true, Duration::from_secs(2)).is_some());
    let senders = flows(&topo, 6000);
    std::thread::sleep(Duration::from_millis(500));

    let watch = |what: &str, d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            let v = stats_until(&relay.control, |_| true);
            assert!(
                forwarding(&v, "od4") && forwarding(&v, "od6"),
                "{what}: the kept outputs forward throughout"
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    };
    let added = format!(
        "{querier}{ONE_RULE}  - name: more\n    input: {{ interface: rin, group: 239.1.1.1, port: 5001 }}\n    outputs: [ {{ interface: rout0, group: 239.3.3.3, on_demand: true }} ]\n"
    );
    std::fs::write(&relay.config, &added).unwrap();
    client_ok(&relay.control, &["reload"]);
    watch("after the reload", Duration::from_millis(500));
    // The added output's group was joined before: the next general query finds it.
    assert!(
        until_forwarding(&relay, &["more"], true, Duration::from_secs(6)).is_some(),
        "the added on-demand output found its listener"
    );
    // A file that does not validate: refused, the state stays.
    std::fs::write(
        &relay.config,
        format!("querier: {{ robustness: 0 }}\n{ONE_RULE}"),
    )
    .unwrap();
    let (ok, said) = common::client(&relay.control, &["reload"]);
    assert!(!ok && said.contains("querier.robustness is 0"), "{said}");
    watch("after the refused reload", Duration::from_millis(500));
    // The rule removed: nothing is left to forward its group, and the others carry on.
    std::fs::write(&relay.config, format!("{querier}{ONE_RULE}")).unwrap();
    client_ok(&relay.control, &["reload"]);
    watch("after the rule was removed", Duration::from_millis(300));
    for s in senders {
        join(s).unwrap();
    }
    let (_, got4) = m4.leave();
    let (_, got6) = m6.leave();
    let _ = m3.leave();
    for (family, got) in [("IPv4", got4), ("IPv6", got6)] {
        // Paced at about a datagram a millisecond: a gap of half a second is a stall (an
        // output that lost its state would wait for the next query, seconds away), and
        // shorter ones a busy machine's scheduling.
        let stall = got.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap();
        assert!(
            stall < Duration::from_millis(500),
            "{family}: a {stall:?} gap"
        );
        assert!(got.len() > 3000, "{family}: {}", got.len());
    }
    stop_clean(relay, &topo);
}

#[test]
fn reload_keeps_membership_with_lockfree_pool() {
    reload_keeps_membership("lockfree");
}

#[test]
fn reload_keeps_membership_with_mutex_pool() {
    reload_keeps_membership("mutex");
}

/// A source-specific listener (IGMPv3 INCLUDE) on receiver 0's link, held until the
/// returned sender is dropped or sent to. Its socket binds `port` (each its own: the
/// membership is what counts).
fn join_source(
    ns: &Netns,
    group: Ipv4Addr,
    source: Ipv4Addr,
    iface: Ipv4Addr,
    port: u16,
) -> mpsc::Sender<()> {
    let (stop, stopped) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = ns.run(move || {
        let sock = UdpSocket::bind(SocketAddr::new(group.into(), port))?;
        let mreq = libc::ip_mreq_source {
            imr_multiaddr: libc::in_addr {
                s_addr: u32::from(group).to_be(),
            },
            imr_interface: libc::in_addr {
                s_addr: u32::from(iface).to_be(),
            },
            imr_sourceaddr: libc::in_addr {
                s_addr: u32::from(source).to_be(),
            },
        };
        relay_tests::traffic::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_ADD_SOURCE_MEMBERSHIP,
            &mreq,
        )?;
        let _ = ready_tx.send(());
        let _ = stopped.recv_timeout(Duration::from_secs(60));
        Ok(())
    });
    if ready_rx.recv_timeout(Duration::from_secs(5)).is_err() {
        panic!("joining ({source}, {group}): {:?}", join(handle));
    }
    stop
}

/// An (S,G) rule's on-demand output follows its listeners' source lists: a listener that
/// wants another source of the group does not start it, one that includes the rule's source
/// does, and its leave (a BLOCK of that source) stops it after the last member query time.
#[test]
fn source_specific_listeners_select_the_source() {
    require_root();
    let _serial = serial();
    let yaml = format!(
        "{QUERIER}rules:\n  - name: ssm\n    input: {{ interface: rin, group: 239.1.1.1, port: 5000, source: {SENDER_ADDR} }}\n    outputs: [ {{ interface: rout0, on_demand: true }} ]\n"
    );
    let (topo, relay) = one_link(&yaml, &[]);
    let r0 = &topo.receivers[0];
    let other = join_source(&r0.ns, G4, Ipv4Addr::new(198, 18, 1, 99), r0.addr, 5002);
    assert!(
        until_forwarding(&relay, &["ssm"], true, Duration::from_millis(1500)).is_none(),
        "INCLUDE(another source) does not start the rule's source"
    );
    let q = queriers(&relay);
    let m = querier(&q, "ipv4")
        .members
        .iter()
        .find(|m| m.group == G4.to_string());
    let m = m.unwrap_or_else(|| panic!("{q:?}"));
    assert_eq!(m.mode, "include");
    assert_eq!(m.sources.len(), 1, "{m:?}");
    assert_eq!(m.sources[0].0, "198.18.1.99");

    let wanted = join_source(&r0.ns, G4, SENDER_ADDR, r0.addr, 5003);
    let on = until_forwarding(&relay, &["ssm"], true, Duration::from_secs(1));
    assert!(on.is_some(), "INCLUDE(the rule's source) starts it");
    drop(wanted);
    let left = Instant::now();
    let off = until_forwarding(&relay, &["ssm"], false, LMQT + Duration::from_secs(2))
        .expect("the source's listener left");
    assert!(off - left <= LMQT + Duration::from_secs(1));
    // The other source's listener is still there.
    let q = queriers(&relay);
    assert!(
        querier(&q, "ipv4")
            .members
            .iter()
            .any(|m| m.group == G4.to_string())
    );
    drop(other);
    stop_clean(relay, &topo);
}

/// The second sender on the ingress link, beside SENDER_ADDR and SENDER_ADDR6.
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 5);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 5);

/// Gives the sender namespace a second address of each family, to send from.
fn second_source(topo: &Topology) {
    for cmd in [
        "ip addr add 198.18.1.5/24 dev snd0",
        "ip -6 addr add 2001:2:0:1::5/64 dev snd0 nodad",
    ] {
        topo.sender
            .exec(&cmd.split(' ').collect::<Vec<_>>())
            .unwrap();
    }
}

/// Paced flows to `g4` and `g6` from both senders, about 1,000 datagrams a second each.
fn flows_from_both(
    topo: &Topology,
    g4: Ipv4Addr,
    g6: Ipv6Addr,
    count: u64,
) -> Vec<JoinHandle<Result<u64>>> {
    let flow = |g: IpAddr| Flow {
        burst: 4,
        pause: Duration::from_millis(4),
        ..Flow::new(g, 5000, count)
    };
    [
        (IpAddr::from(SENDER_ADDR), IpAddr::from(g4)),
        (OTHER4.into(), g4.into()),
        (SENDER_ADDR6.into(), g6.into()),
        (OTHER6.into(), g6.into()),
    ]
    .into_iter()
    .map(|(s, g)| send(&topo.sender, s, flow(g)))
    .collect()
}

/// The UDP frames to `groups` that receiver 0's link carries for `d`, counted by source.
fn relayed_by_source(
    topo: &Topology,
    groups: [IpAddr; 2],
    d: Duration,
) -> std::collections::BTreeMap<IpAddr, usize> {
    let r0 = &topo.receivers[0];
    let limits = Limits {
        expect: u64::MAX,
        idle: d + Duration::from_secs(1),
        max: d,
    };
    let frames = capture(&r0.ns, &r0.iface, limits, |f| {
        relay::wire::classify(f).is_some()
    })
    .unwrap();
    let mut by = std::collections::BTreeMap::new();
    for f in join(frames).unwrap() {
        if let Some(f) = relay::wire::classify(&f).filter(|f| groups.contains(&f.group)) {
            *by.entry(f.source).or_default() += 1;
        }
    }
    by
}

/// An any-source rule's on-demand output forwards a frame only if a host wants its own
/// source: INCLUDE of another source keeps every sender off, and EXCLUDE({S}) keeps S off and
/// lets the other sender through. IGMPv3 and MLDv2 reports, as a host would send them.
fn filter_modes_decide_by_the_frames_source(allocator: &str) {
    require_root();
    let _serial = serial();
    let (topo, relay) = one_link(&format!("{QUERIER}{ONE_RULE}"), &["--allocator", allocator]);
    second_source(&topo);
    let r0 = &topo.receivers[0];
    let ll = link_local(&r0.ns, &r0.iface);
    let nobody4 = Ipv4Addr::new(198, 18, 1, 99);
    let nobody6 = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x99);
    let report = |kind: u8, s4: Ipv4Addr, s6: Ipv6Addr| {
        let frames = vec![
            igmp_frame(
                r0.addr,
                Ipv4Addr::new(224, 0, 0, 22),
                1,
                true,
                &v3_report(&[(kind, G4, &[s4])], None),
            ),
            mld_v2_report(ll, 1, &[(kind, G6, &[s6])]),
        ];
        assert_eq!(
            join(inject(&r0.ns, &r0.iface, frames, Duration::ZERO).unwrap()).unwrap(),
            2
        );
    };
    let senders = flows_from_both(&topo, G4, G6, 5000);
    let groups = [IpAddr::from(G4), G6.into()];

    // MODE_IS_INCLUDE({another source}).
    report(1, nobody4, nobody6);
    std::thread::sleep(Duration::from_millis(300));
    let q = queriers(&relay);
    for family in ["ipv4", "ipv6"] {
        let m = &querier(&q, family).members;
        assert!(m.iter().any(|m| m.mode == "include"), "{family}: {q:?}");
    }
    let seen = relayed_by_source(&topo, groups, Duration::from_millis(1500));
    assert!(
        seen.is_empty(),
        "INCLUDE(another source) forwards nothing: {seen:?}"
    );

    // MODE_IS_EXCLUDE({S}): now EXCLUDE({S}) (the included source no longer matters).
    report(2, SENDER_ADDR, SENDER_ADDR6);
    std::thread::sleep(Duration::from_millis(300));
    let seen = relayed_by_source(&topo, groups, Duration::from_millis(1500));
    for (s, other) in [
        (IpAddr::from(SENDER_ADDR), IpAddr::from(OTHER4)),
        (SENDER_ADDR6.into(), OTHER6.into()),
    ] {
        assert_eq!(seen.get(&s), None, "EXCLUDE({s}) holds {s} back: {seen:?}");
        assert!(
            seen.get(&other).is_some_and(|n| *n > 500),
            "EXCLUDE({s}) forwards {other}: {seen:?}"
        );
    }
    for s in senders {
        join(s).unwrap();
    }
    let v = stats_until(&relay.control, |v| {
        v.rules.iter().all(|r| r.received == 10_000)
    });
    for rule in ["od4", "od6"] {
        let o = output(&v, rule, 0);
        let d = o.on_demand.as_ref().unwrap();
        assert_eq!(o.sent + d.no_listener, 10_000, "{rule}: {o:?}");
        assert!(d.forwarding, "{rule}: someone listens: {o:?}");
    }
    stop_clean(relay, &topo);
}

#[test]
fn filter_modes_decide_by_the_frames_source_with_lockfree_pool() {
    filter_modes_decide_by_the_frames_source("lockfree");
}

#[test]
fn filter_modes_decide_by_the_frames_source_with_mutex_pool() {
    filter_modes_decide_by_the_frames_source("mutex");
}

const S4: Ipv4Addr = Ipv4Addr::new(232, 1, 1, 1);
const S6: Ipv6Addr = Ipv6Addr::new(0xff3e, 0, 0, 0, 0, 0, 1, 1);

/// Source-specific groups (RFC 4604): IGMPv2 and MLDv1 reports and EXCLUDE records for them
/// are ignored and counted, and an IGMPv3/MLDv2 join of one source forwards that source only.
fn ssm_groups_forward_the_joined_source_only(allocator: &str) {
    require_root();
    let _serial = serial();
    let yaml = format!(
        "{QUERIER}rules:
  - name: ssm4
    input: {{ interface: rin, group: {S4}, port: 5000 }}
    outputs: [ {{ interface: rout0, on_demand: true }} ]
  - name: ssm6
    input: {{ interface: rin, group: '{S6}', port: 5000 }}
    outputs: [ {{ interface: rout0, on_demand: true }} ]
"
    );
    let (topo, relay) = one_link(&yaml, &["--allocator", allocator]);
    second_source(&topo);
    let r0 = &topo.receivers[0];
    let ll = link_local(&r0.ns, &r0.iface);
    let senders = flows_from_both(&topo, S4, S6, 5000);
    let groups = [IpAddr::from(S4), S6.into()];
    // An IGMPv2 report, an MLDv1 report, and EXCLUDE({}) records of both versions.
    let mut v2 = vec![0x16, 0, 0, 0];
    v2.extend_from_slice(&S4.octets());
    let c = checksum(&v2);
    v2[2..4].copy_from_slice(&c.to_be_bytes());
    let old = vec![
        igmp_frame(r0.addr, S4, 1, true, &v2),
        mldv1_report(ll, S6),
        igmp_frame(
            r0.addr,
            Ipv4Addr::new(224, 0, 0, 22),
            1,
            true,
            &v3_report(&[(2, S4, &[]), (4, S4, &[])], None),
        ),
        mld_v2_report(ll, 1, &[(2, S6, &[]), (4, S6, &[])]),
    ];
    assert_eq!(
        join(inject(&r0.ns, &r0.iface, old, Duration::ZERO).unwrap()).unwrap(),
        4
    );
    std::thread::sleep(Duration::from_millis(300));
    let q = queriers(&relay);
    for family in ["ipv4", "ipv6"] {
        let v = querier(&q, family);
        let refused = |k: &str| v.refused.get(k).copied().unwrap_or(0);
        assert_eq!(
            (refused("ssm_old_version"), refused("ssm_exclude")),
            (1, 2),
            "{family}: {v:?}"
        );
        assert!(v.members.is_empty(), "{family}: {v:?}");
    }
    let seen = relayed_by_source(&topo, groups, Duration::from_millis(1000));
    assert!(seen.is_empty(), "nothing joined: {seen:?}");

    // ALLOW_NEW_SOURCES({S}) for each group: S only.
    let joins = vec![
        igmp_frame(
            r0.addr,
            Ipv4Addr::new(224, 0, 0, 22),
            1,
            true,
            &v3_report(&[(5, S4, &[SENDER_ADDR])], None),
        ),
        mld_v2_report(ll, 1, &[(5, S6, &[SENDER_ADDR6])]),
    ];
    let joined = Instant::now();
    assert_eq!(
        join(inject(&r0.ns, &r0.iface, joins, Duration::ZERO).unwrap()).unwrap(),
        2
    );
    assert!(
        until_forwarding(&relay, &["ssm4", "ssm6"], true, Duration::from_secs(1)).is_some(),
        "the joins started the outputs within {:?}",
        joined.elapsed()
    );
    let seen = relayed_by_source(&topo, groups, Duration::from_millis(1500));
    for (s, other) in [
        (IpAddr::from(SENDER_ADDR), IpAddr::from(OTHER4)),
        (SENDER_ADDR6.into(), OTHER6.into()),
    ] {
        assert!(
            seen.get(&s).is_some_and(|n| *n > 500),
            "{s} joined: {seen:?}"
        );
        assert_eq!(seen.get(&other), None, "{other} not joined: {seen:?}");
    }
    let members = client_ok(&relay.control, &["members"]);
    assert!(
        members.contains("ssm_old_version=1") && members.contains("ssm_exclude=2"),
        "{members}"
    );
    for s in senders {
        join(s).unwrap();
    }
    stop_clean(relay, &topo);
}

#[test]
fn ssm_groups_forward_the_joined_source_only_with_lockfree_pool() {
    ssm_groups_forward_the_joined_source_only("lockfree");
}

#[test]
fn ssm_groups_forward_the_joined_source_only_with_mutex_pool() {
    ssm_groups_forward_the_joined_source_only("mutex");
}

/// CPU time (user and system, in clock ticks) of the relay's thread named `name`.
fn thread_ticks(pid: u32, name: &str) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // After the command name in parentheses: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap_or(0)).collect();
        return f[11] + f[12];
    }
    panic!("no thread {name} in {pid}");
}

/// One host reports 10,000 groups no output sends to, 30,000 reports at about 10,000 a
/// second: they are ignored and counted, the querier thread's CPU stays bounded,
/// `relay members` answers within a second throughout, and a join for the rule's group then
/// starts the flow within a second.
#[test]
fn a_flood_of_other_groups_leaves_room_for_ours() {
    require_root();
    let _serial = serial();
    let (topo, relay) = one_link(&format!("{QUERIER}{ONE_RULE}"), &[]);
    let r0 = &topo.receivers[0];
    let to = Ipv4Addr::new(224, 0, 0, 22);
    let groups: Vec<Ipv4Addr> = (0..10_000u32)
        .map(|i| Ipv4Addr::from(0xef00_0000 | (i.wrapping_mul(2_654_435_761) & 0x00ff_ffff)))
        .filter(|g| *g != G4)
        .collect();
    let reports: Vec<Vec<u8>> = groups
        .iter()
        .map(|g| igmp_frame(r0.addr, to, 1, true, &v3_report(&[(2, *g, &[])], None)))
        .collect();
    let ticks_per_s = 100.0;
    let pid = relay.pid();
    let before = thread_ticks(pid, "relay-querier");
    let start = Instant::now();
    let (done_tx, done) = mpsc::channel::<()>();
    let control = relay.control.clone();
    let asker = std::thread::spawn(move || {
        let mut slowest = Duration::ZERO;
        while done.try_recv().is_err() {
            let t = Instant::now();
            client_ok(&control, &["members"]);
            slowest = slowest.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(100));
        }
        slowest
    });
    // 30,000 reports, paced by the injector's sleep between frames (a 20 µs sleep takes
    // about 100 µs with the default timer slack: about 10,000 a second).
    let all: Vec<Vec<u8>> = reports.iter().cycle().take(30_000).cloned().collect();
    let sent = join(inject(&r0.ns, &r0.iface, all, Duration::from_micros(20)).unwrap()).unwrap();
    let took = start.elapsed();
    let cpu = (thread_ticks(pid, "relay-querier") - before) as f64 / ticks_per_s;
    let _ = done_tx.send(());
    let slowest = asker.join().unwrap();
    eprintln!(
        "flood: {sent} reports in {took:?} ({:.0}/s); querier thread CPU {cpu:.2} s ({:.0}%); \
         slowest `relay members` {slowest:?}",
        sent as f64 / took.as_secs_f64(),
        100.0 * cpu / took.as_secs_f64()
    );
    assert!(
        slowest < Duration::from_secs(1),
        "relay members took {slowest:?}"
    );
    assert!(
        cpu < 0.5 * took.as_secs_f64(),
        "the querier thread took {cpu:.2} s of CPU in {took:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let q = queriers(&relay);
    let v4 = querier(&q, "ipv4");
    assert!(
        v4.refused.get("not_forwarded").copied().unwrap_or(0) >= sent as u64 * 9 / 10,
        "{:?}",
        v4.refused
    );
    assert!(v4.members.iter().all(|m| m.group != G4.to_string()));
    assert!(
        v4.members.is_empty(),
        "no group but the outputs' has state: {}",
        v4.members.len()
    );

    // The rule's group: a join starts the flow within a second.
    let senders = flows(&topo, 3000);
    let join_g4 = igmp_frame(r0.addr, to, 1, true, &v3_report(&[(2, G4, &[])], None));
    let joined = Instant::now();
    assert_eq!(
        join(inject(&r0.ns, &r0.iface, vec![join_g4], Duration::ZERO).unwrap()).unwrap(),
        1
    );
    let on = until_forwarding(&relay, &["od4"], true, Duration::from_secs(1));
    assert!(on.is_some(), "the join was not taken within a second");
    eprintln!("the join took {:?}", on.unwrap() - joined);
    for s in senders {
        join(s).unwrap();
    }
    stop_clean(relay, &topo);
}
