//! The relay's IGMP/MLD querier against reports it must not believe and queriers it must
//! yield to: reports from another VLAN on a trunk's parent (the tag crafted into the frame,
//! or pushed by tc into the skb's metadata as a NIC's rx-vlan offload leaves it), reports
//! from off the interface's subnets, IGMPv2 reports without Router Alert (taken, counted),
//! and the relay querying from 0.0.0.0 on an interface without IPv4, yielding to a real
//! querier.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use relay::{
    checksum::checksum,
    listeners::wire::{QueryToSend, build_query},
    querier::QuerierView,
    stats::StatsView,
    wire::multicast_mac,
};
use relay_tests::{
    netns::{Netns, require_root},
    relay_proc::{RelayProc, relay_bin},
    topo::Topology,
    traffic::{Limits, capture, ifindex_of, inject, join},
    vlan_tc::{TagIn, VlanPush},
};

mod common;
use common::{client_ok, dad_done, serial, stats_until, stop_clean};

const G4: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
const G4B: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 2);
const G6: Ipv6Addr = Ipv6Addr::new(0xff18, 0, 0, 0, 0, 0, 1, 1);
/// The host's side of receiver 0's link; the relay's side is 198.18.2.1/24.
const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// A link-local source for crafted MLD reports (the relay checks only that it is one).
const HOST_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x99);
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0xc0, 0xff, 0xee];

const RULES: &str = "\
querier: { query_interval: 2, query_response_interval: 1 }
rules:
  - name: od4
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [ { interface: rout0, on_demand: true } ]
  - name: od4b
    input: { interface: rin, group: 239.1.1.2, port: 5000 }
    outputs: [ { interface: rout0, on_demand: true } ]
  - name: od6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs: [ { interface: rout0, on_demand: true } ]
";

/// Receiver 0's link with its IPv6 addresses past duplicate address detection, `prepare`
/// run on it, and the relay started on it.
fn one_link(prepare: impl FnOnce(&Topology)) -> (Topology, RelayProc) {
    let topo = Topology::new(1).unwrap();
    dad_done(&topo.relay);
    dad_done(&topo.receivers[0].ns);
    prepare(&topo);
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    (topo, relay)
}

/// The relay's querier on rout0 for `family` (`ipv4`, `ipv6`), from `relay members --json`.
fn rout0(relay: &RelayProc, family: &str) -> QuerierView {
    let out = client_ok(&relay.control, &["members", "--json"]);
    let all: Vec<QuerierView> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    all.into_iter()
        .find(|q| q.interface == "rout0" && q.family == family)
        .unwrap_or_else(|| panic!("no {family} querier on rout0: {out}"))
}

fn count(map: &std::collections::BTreeMap<String, u64>, key: &str) -> u64 {
    map.get(key).copied().unwrap_or(0)
}

/// Polls the querier view of `family` (3 s at most) until `done` holds; the last view.
fn view_until(relay: &RelayProc, family: &str, done: impl Fn(&QuerierView) -> bool) -> QuerierView {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let v = rout0(relay, family);
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Which of the rules' on-demand outputs forward now.
fn forwarding(relay: &RelayProc) -> Vec<String> {
    let v: StatsView = stats_until(&relay.control, |_| true);
    v.rules
        .iter()
        .filter(|r| {
            r.outputs[0]
                .on_demand
                .as_ref()
                .is_some_and(|o| o.forwarding)
        })
        .map(|r| r.name.clone())
        .collect()
}

/// An IGMPv3 / MLDv2 report with one EXCLUDE({}) record for `group` (a join); its checksum
/// is left for [`frame`].
fn join_report(group: IpAddr) -> Vec<u8> {
    let (kind, group) = match group {
        IpAddr::V4(g) => (0x22, g.octets().to_vec()),
        IpAddr::V6(g) => (143, g.octets().to_vec()),
    };
    let mut m = vec![kind, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0];
    m.extend_from_slice(&group);
    m
}

/// An IGMPv2 report for `group`.
fn v2_report(group: Ipv4Addr) -> Vec<u8> {
    let mut m = vec![0x16, 0, 0, 0];
    m.extend_from_slice(&group.octets());
    m
}

/// A membership message `msg` from `src` to `dst` on the wire as a host sends it (TTL or
/// hop limit 1; Router Alert when `ra`), with its checksum filled in, tagged with `tci` if
/// given.
fn frame(src: IpAddr, dst: IpAddr, ra: bool, tci: Option<u16>, mut msg: Vec<u8>) -> Vec<u8> {
    let mut f = multicast_mac(dst).to_vec();
    f.extend_from_slice(&HOST_MAC);
    if let Some(tci) = tci {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&tci.to_be_bytes());
    }
    let option: &[u8] = if ra { &[0x94, 0x04, 0, 0] } else { &[] };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let c = checksum(&msg);
            msg[2..4].copy_from_slice(&c.to_be_bytes());
            let hlen = 20 + option.len();
            let mut ip = vec![0x40 | (hlen / 4) as u8, 0xc0];
            ip.extend_from_slice(&((hlen + msg.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0, 0, 1, 2, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(option);
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&[0x08, 0x00]);
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut pseudo = [s.octets(), d.octets()].concat();
            pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 58]);
            pseudo.extend_from_slice(&msg);
            let c = checksum(&pseudo);
            msg[2..4].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&((8 + msg.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 1]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            // Hop-by-hop: ICMPv6 next, Router Alert for MLD (0), PadN.
            f.extend_from_slice(&[58, 0, 5, 2, 0, 0, 1, 0]);
        }
        _ => unreachable!("mixed families"),
    }
    f.extend_from_slice(&msg);
    f
}

const IGMPV3_ROUTERS: IpAddr = IpAddr::V4(Ipv4Addr::new(224, 0, 0, 22));
const MLDV2_ROUTERS: IpAddr = IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16));

/// A join of `group` (IGMPv3 or MLDv2), from the host, tagged with `tci` if given.
fn join_frame(group: IpAddr, tci: Option<u16>) -> Vec<u8> {
    let (src, dst) = match group {
        IpAddr::V4(_) => (IpAddr::V4(HOST), IGMPV3_ROUTERS),
        IpAddr::V6(_) => (IpAddr::V6(HOST_LL), MLDV2_ROUTERS),
    };
    frame(src, dst, true, tci, join_report(group))
}

/// Sends `frames` from receiver 0's side of the link.
fn send(topo: &Topology, frames: Vec<Vec<u8>>) {
    let r0 = &topo.receivers[0];
    let n = frames.len();
    let sent = join(inject(&r0.ns, &r0.iface, frames, Duration::from_millis(10)).unwrap()).unwrap();
    assert_eq!(sent, n);
}

/// The host's own stack joins `groups` on its link, whose IPv6 address is `addr6` (IGMPv3
/// and MLDv2 reports, sent at once and repeated within a second) and holds them until the
/// returned sender is dropped or 20 s pass.
fn host_joins(ns: &Netns, addr6: Ipv6Addr, groups: Vec<IpAddr>) -> mpsc::Sender<()> {
    let (stop, stopped) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel();
    let _holder = ns.run(move || {
        let mut socks = Vec::new();
        for g in groups {
            let sock = UdpSocket::bind(SocketAddr::new(g, 5000))?;
            match g {
                IpAddr::V4(g) => sock.join_multicast_v4(&g, &HOST)?,
                IpAddr::V6(g) => {
                    sock.join_multicast_v6(&g, ifindex_of(addr6)?)?;
                }
            }
            socks.push(sock);
        }
        let _ = ready_tx.send(());
        let _ = stopped.recv_timeout(Duration::from_secs(20));
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the host joined");
    stop
}

/// On a trunk's parent the kernel strips a VLAN's tag before the querier's packet socket
/// sees the frame: reports that carried a tag (VID 10) are refused and counted, whether the
/// tag was in the frame's bytes (crafted) or in the skb's metadata (a tc program on the
/// host's interface, tx-vlan offload on: the host's own stack joining), and none turns on
/// an untagged on-demand output. A priority tag (VID 0) is the untagged link's and is taken.
#[test]
fn tagged_reports_on_a_trunk_parent_are_refused() {
    require_root();
    let _serial = serial();
    let (topo, relay) = one_link(|_| {});
    let tagged = |family| count(&rout0(&relay, family).refused, "vlan_tagged");

    // Crafted, the tag in the frame.
    send(
        &topo,
        vec![
            join_frame(G4.into(), Some(10)),
            join_frame(G6.into(), Some(0x2000 | 10)),
        ],
    );
    let v4 = view_until(&relay, "ipv4", |v| count(&v.refused, "vlan_tagged") >= 1);
    let v6 = view_until(&relay, "ipv6", |v| count(&v.refused, "vlan_tagged") >= 1);
    assert_eq!(count(&v4.refused, "vlan_tagged"), 1, "{v4:?}");
    assert_eq!(count(&v6.refused, "vlan_tagged"), 1, "{v6:?}");
    assert!(forwarding(&relay).is_empty(), "{:?}", forwarding(&relay));

    // The host's own joins, tagged by tc in the skb's metadata.
    let r0 = &topo.receivers[0];
    let push = VlanPush::attach(&r0.ns, &r0.iface, 10, TagIn::Metadata).unwrap();
    let held = host_joins(&r0.ns, r0.addr6, vec![G4.into(), G6.into()]);
    let v4 = view_until(&relay, "ipv4", |v| count(&v.refused, "vlan_tagged") >= 2);
    let v6 = view_until(&relay, "ipv6", |v| count(&v.refused, "vlan_tagged") >= 2);
    assert!(count(&v4.refused, "vlan_tagged") >= 2, "{v4:?}");
    assert!(count(&v6.refused, "vlan_tagged") >= 2, "{v6:?}");
    // The host repeats its unsolicited reports within a second: still refused.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(forwarding(&relay).is_empty(), "{:?}", forwarding(&relay));
    let named = |v: &QuerierView, g: String| v.members.iter().any(|m| m.group == g);
    let (v4, v6) = (rout0(&relay, "ipv4"), rout0(&relay, "ipv6"));
    assert!(!named(&v4, G4.to_string()), "{v4:?}");
    assert!(!named(&v6, G6.to_string()), "{v6:?}");
    drop(held);
    drop(push);

    // A priority-tagged report (VID 0, priority 5) is the untagged link's; so is a plain one.
    let before = (tagged("ipv4"), tagged("ipv6"));
    send(
        &topo,
        vec![
            join_frame(G4.into(), Some(0xa000)),
            join_frame(G6.into(), None),
        ],
    );
    let v = stats_until(&relay.control, |v| {
        v.rules
            .iter()
            .all(|r| r.name == "od4b" || r.outputs[0].on_demand.as_ref().unwrap().forwarding)
    });
    let on: Vec<&str> = v
        .rules
        .iter()
        .filter(|r| r.outputs[0].on_demand.as_ref().unwrap().forwarding)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(on, ["od4", "od6"]);
    assert_eq!((tagged("ipv4"), tagged("ipv6")), before);
    let text = client_ok(&relay.control, &["members"]);
    assert!(text.contains("refused vlan_tagged="), "{text}");
    stop_clean(relay, &topo);
}

/// RFC 3376 §9.2: a report from a source on none of the interface's subnets is ignored and
/// counted; one from 0.0.0.0 (a host without an address yet) is taken. An IGMPv2 report
/// without Router Alert is taken (as Linux and FRR take it) and counted, unless it too is
/// off-subnet.
#[test]
fn off_subnet_reports_are_refused_and_v2_reports_without_router_alert_taken() {
    require_root();
    let _serial = serial();
    let (topo, relay) = one_link(|_| {});
    let off = IpAddr::V4(Ipv4Addr::new(198, 18, 9, 2));
    send(
        &topo,
        vec![
            frame(off, IGMPV3_ROUTERS, true, None, join_report(G4.into())),
            frame(off, G4B.into(), false, None, v2_report(G4B)),
        ],
    );
    let v = view_until(&relay, "ipv4", |v| count(&v.refused, "off_subnet") >= 2);
    assert_eq!(count(&v.refused, "off_subnet"), 2, "{v:?}");
    assert_eq!(count(&v.accepted, "no_router_alert"), 0, "{v:?}");
    assert!(forwarding(&relay).is_empty(), "{:?}", forwarding(&relay));

    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    send(
        &topo,
        vec![
            frame(
                unspecified,
                IGMPV3_ROUTERS,
                true,
                None,
                join_report(G4.into()),
            ),
            frame(HOST.into(), G4B.into(), false, None, v2_report(G4B)),
        ],
    );
    let v = view_until(&relay, "ipv4", |v| v.members.len() >= 2);
    let reporter = |g: Ipv4Addr| {
        v.members
            .iter()
            .find(|m| m.group == g.to_string())
            .unwrap_or_else(|| panic!("{g} not a member: {v:?}"))
            .last_reporter
            .clone()
    };
    assert_eq!(reporter(G4).as_deref(), Some("0.0.0.0"));
    assert_eq!(reporter(G4B).as_deref(), Some("198.18.2.2"));
    assert_eq!(count(&v.accepted, "no_router_alert"), 1, "{v:?}");
    assert_eq!(count(&v.refused, "off_subnet"), 2, "{v:?}");
    assert_eq!(forwarding(&relay), ["od4", "od4b"]);
    // The counters show in `relay members` and in `relay stats --json`.
    let text = client_ok(&relay.control, &["members"]);
    assert!(
        text.contains("refused off_subnet=2") && text.contains("accepted no_router_alert=1"),
        "{text}"
    );
    let stats = stats_until(&relay.control, |_| true);
    let q = stats
        .queriers
        .iter()
        .find(|q| q.interface == "rout0" && q.family == "ipv4")
        .unwrap();
    assert_eq!(count(&q.refused, "off_subnet"), 2);

    // A querier without an address (a Linux bridge's) does not silence the relay, which
    // has one.
    let bridge = general_query_from(unspecified);
    send(&topo, vec![bridge]);
    std::thread::sleep(Duration::from_millis(200));
    let v = rout0(&relay, "ipv4");
    assert!(v.querier && v.address == "198.18.2.1", "{v:?}");
    stop_clean(relay, &topo);
}

/// A general query as another router on the link sends it, from `source`.
fn general_query_from(source: IpAddr) -> Vec<u8> {
    let q = QueryToSend {
        group: None,
        sources: vec![],
        max_response: Duration::from_secs(1),
        suppress: false,
        qrv: 2,
        qqi: Duration::from_secs(2),
    };
    build_query(&q, HOST_MAC, source)
}

/// The IPv4 general queries in `frame`, by source.
fn query_source(frame: &[u8]) -> Option<Ipv4Addr> {
    let ihl = usize::from(frame.get(14)? & 0x0f) * 4;
    let igmp = frame.get(14 + ihl..)?;
    (frame.get(12..14)? == [0x08, 0x00] && frame[23] == 2 && *igmp.first()? == 0x11)
        .then(|| Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]))
}

fn is_v4_query(frame: &[u8]) -> bool {
    query_source(frame).is_some()
}

/// Queries from the relay's unspecified address seen on receiver 0's side for `window`.
fn queries_from_nowhere(topo: &Topology, window: Duration) -> usize {
    let r0 = &topo.receivers[0];
    let limits = Limits {
        expect: u64::MAX,
        idle: window + Duration::from_secs(1),
        max: window,
    };
    let frames = join(capture(&r0.ns, &r0.iface, limits, is_v4_query).unwrap()).unwrap();
    frames
        .iter()
        .filter(|f| query_source(f) == Some(Ipv4Addr::UNSPECIFIED) && f[6..12] != HOST_MAC)
        .count()
}

/// On an interface without IPv4 the relay queries from 0.0.0.0 (as the Linux bridge does)
/// and yields to a querier with an address, however high, while it is heard; once that has
/// been quiet for the other querier present interval (2 × 2 s + 0.5 s here) it queries
/// again. Reports are taken from any source there: there is no subnet to check them by.
#[test]
fn without_ipv4_the_relay_queries_from_nowhere_and_yields_to_a_real_querier() {
    require_root();
    let _serial = serial();
    let (topo, relay) = one_link(|topo| {
        topo.relay
            .exec(&["ip", "addr", "del", "198.18.2.1/24", "dev", "rout0"])
            .unwrap();
    });
    let v = rout0(&relay, "ipv4");
    assert!(v.querier && v.address == "0.0.0.0", "{v:?}");
    assert!(
        queries_from_nowhere(&topo, Duration::from_millis(2500)) >= 1,
        "the relay queries from 0.0.0.0"
    );

    // The other router queries every second for 6 s.
    let r0 = &topo.receivers[0];
    let other = Ipv4Addr::new(198, 18, 2, 250);
    let queries = vec![general_query_from(other.into()); 6];
    let sending = inject(&r0.ns, &r0.iface, queries, Duration::from_secs(1)).unwrap();
    let v = view_until(&relay, "ipv4", |v| !v.querier);
    assert!(!v.querier, "the relay yielded: {v:?}");
    assert_eq!(
        queries_from_nowhere(&topo, Duration::from_secs(4)),
        0,
        "the relay kept quiet"
    );
    // Reports are still followed, from any source.
    send(&topo, vec![join_frame(G4.into(), None)]);
    let v = view_until(&relay, "ipv4", |v| !v.members.is_empty());
    assert_eq!(count(&v.refused, "off_subnet"), 0, "{v:?}");
    assert_eq!(forwarding(&relay), ["od4"]);
    assert_eq!(join(sending).unwrap(), 6);

    // Quiet for 4.5 s: the relay queries again, from 0.0.0.0.
    assert!(
        queries_from_nowhere(&topo, Duration::from_secs(7)) >= 1,
        "the relay took over again"
    );
    let v = rout0(&relay, "ipv4");
    assert!(v.querier && v.address == "0.0.0.0", "{v:?}");
    stop_clean(relay, &topo);
}
