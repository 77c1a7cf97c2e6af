//! Helpers the end-to-end test files share.

// Each test file uses its own subset of these.
#![allow(dead_code)]

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::Mutex,
    time::Duration,
};

use relay::{
    checksum::{checksum, udp_ipv4, udp_ipv6},
    stats::StatsView,
    wire::{EthernetFrame, Ipv4Packet, Ipv6Packet, UdpPacket, classify, multicast_mac},
};
use relay_tests::{
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, SENDER_ADDR6, Topology},
    traffic::check_payload,
};

/// The group of the rule most end-to-end tests relay ([`RULES`]), and what rout1 remaps it to.
pub const G1: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
pub const G2: Ipv4Addr = Ipv4Addr::new(239, 2, 2, 2);

/// One rule, video-a: G1 port 5000 from rin to rout0 as it came, and to rout1 remapped to
/// G2 port 6000 with TTL 16.
pub const RULES: &str = "\
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
pub fn ping_answers(ns: &relay_tests::netns::Netns, addr: IpAddr) {
    let family = if addr.is_ipv6() { "-6" } else { "-4" };
    let to = addr.to_string();
    let ping = ns
        .exec(&["ping", family, "-c", "3", "-i", "0.2", "-W", "1", &to])
        .unwrap_or_else(|e| panic!("ping {to}: {e:#}"));
    assert!(ping.contains("3 received"), "{ping}");
}

/// The machine has two cores: tests that push traffic run one at a time so that one test's
/// load cannot cost another packets.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The MAC of the relay's interface `iface`.
pub fn mac_of(topo: &Topology, iface: &str) -> [u8; 6] {
    mac_in(&topo.relay, iface)
}

/// The MAC of interface `iface` in namespace `ns`.
pub fn mac_in(ns: &relay_tests::netns::Netns, iface: &str) -> [u8; 6] {
    let s = ns
        .exec(&["cat", &format!("/sys/class/net/{iface}/address")])
        .unwrap();
    relay::sys::parse_mac(s.trim()).unwrap()
}

/// UDP to the test groups: 239.0.0.0/8, or IPv6 groups of organisation scope (ff?8::/16).
pub fn is_udp_to_test_group(frame: &[u8]) -> bool {
    classify(frame).is_some_and(|f| match f.group {
        IpAddr::V4(g) => g.octets()[0] == 239,
        IpAddr::V6(g) => g.octets()[0] == 0xff && g.octets()[1] & 0x0f == 8,
    })
}

/// Checks one captured frame (MACs, checksums, the sender's source address) and returns
/// (group, port, TTL or hop limit, payload).
pub fn inspect(frame: &[u8], src_mac: [u8; 6]) -> (IpAddr, u16, u8, Vec<u8>) {
    let flow = classify(frame).expect("a multicast UDP frame");
    let eth = EthernetFrame::new_checked(frame).unwrap();
    assert_eq!(
        eth.src_mac(),
        src_mac,
        "source MAC is the egress interface's"
    );
    assert_eq!(eth.dst_mac(), multicast_mac(flow.group));
    let want_source = match flow.source {
        IpAddr::V4(_) => IpAddr::V4(SENDER_ADDR),
        IpAddr::V6(_) => IpAddr::V6(SENDER_ADDR6),
    };
    assert_eq!(flow.source, want_source, "the source address is kept");
    let (udp_bytes, hops, expected_sum) = udp_from_scratch(frame, &flow);
    let udp = UdpPacket::new_checked(udp_bytes).unwrap();
    assert_ne!(udp.checksum(), 0, "the UDP checksum is present");
    assert_eq!(udp.checksum(), expected_sum, "UDP checksum is valid");
    (flow.group, flow.port, hops, udp.payload().to_vec())
}

/// A relayed frame's UDP datagram (up to the IP length), its TTL or hop limit, and the UDP
/// checksum it should carry, computed from scratch; the IPv4 header checksum is checked on the
/// way.
pub fn udp_from_scratch<'a>(frame: &'a [u8], flow: &relay::wire::Flow) -> (&'a [u8], u8, u16) {
    let (udp, hops) = match flow.group {
        IpAddr::V4(_) => {
            let ip = Ipv4Packet::new_checked(&frame[flow.l3..]).unwrap();
            assert_eq!(checksum(ip.header()), 0, "IPv4 header checksum");
            (
                &frame[flow.l4..flow.l3 + usize::from(ip.total_len())],
                ip.ttl(),
            )
        }
        IpAddr::V6(_) => {
            let ip = Ipv6Packet::new_checked(&frame[flow.l3..]).unwrap();
            let end = flow.l3 + 40 + usize::from(ip.payload_len());
            (&frame[flow.l4..end], ip.hop_limit())
        }
    };
    let mut zeroed = udp.to_vec();
    zeroed[6..8].fill(0);
    let expected = match (flow.source, flow.group) {
        (IpAddr::V4(s), IpAddr::V4(g)) => udp_ipv4(s, g, &zeroed),
        (IpAddr::V6(s), IpAddr::V6(g)) => udp_ipv6(s, g, &zeroed),
        _ => panic!("mixed families in {frame:02x?}"),
    };
    (udp, hops, expected)
}

/// Stops the relay with SIGTERM and checks that it ended well: exit 0, every frame of the
/// default UMEM accounted for, no panic, no XDP program left in the relay's namespace.
pub fn stop_clean(relay: RelayProc, topo: &Topology) -> relay_tests::relay_proc::Exit {
    stop_accounted(relay, topo, 4096)
}

/// As [`stop_clean`], for a relay whose UMEMs hold `frames` frames in all; the report's
/// frame line says nothing leaked.
pub fn stop_accounted(
    relay: RelayProc,
    topo: &Topology,
    frames: u64,
) -> relay_tests::relay_proc::Exit {
    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(
        exit.status.success(),
        "SIGTERM exits 0: {}\n{}",
        exit.status,
        exit.stderr
    );
    assert!(
        exit.stderr
            .contains(&format!("all {frames} frames accounted for")),
        "{}",
        exit.stderr
    );
    assert_eq!(
        relay_tests::relay_proc::report_value(&exit.stdout, &["frames"], "leaked"),
        Some(0),
        "{}",
        exit.stdout
    );
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
    assert!(
        !topo.relay_has_xdp().unwrap(),
        "no XDP program left attached"
    );
    exit
}

pub fn seqs(payloads: &[Vec<u8>]) -> BTreeSet<u64> {
    let set: BTreeSet<u64> = payloads
        .iter()
        .map(|p| check_payload(p).expect("payload intact"))
        .collect();
    assert_eq!(set.len(), payloads.len(), "no duplicates");
    set
}

/// `relay stats --json` against `control`, polled until `done` holds or three seconds pass;
/// the last answer either way.
pub fn stats_until(control: &Path, done: impl Fn(&StatsView) -> bool) -> StatsView {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let out = std::process::Command::new(relay_bin())
            .args(["stats", "--json", "--control"])
            .arg(control)
            .output()
            .unwrap();
        let v: StatsView = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        if done(&v) || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (5 s at most) until the relay's log says `what` at least `n` times.
pub fn wait_log(relay: &RelayProc, what: &str, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(&relay.stderr).unwrap();
        if log.matches(what).count() >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not {n} times '{what}' in:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The one error line a refused start prints, and that it stopped non-zero.
pub fn start_refused(topo: &Topology, yaml: &str, why: &str) -> String {
    let err = match RelayProc::start(&relay_bin(), &topo.relay, yaml, &[]) {
        Ok(_) => panic!("the relay started despite {why}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("exited early (exit status: 1)"),
        "{why}:\n{err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "one error line for {why}:\n{err}");
    errors[0].to_owned()
}

/// Runs `relay ARGS --control CONTROL`; whether it succeeded, and what it said.
pub fn client(control: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(relay_bin())
        .args(args)
        .arg("--control")
        .arg(control)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// As [`client`], for a command that must succeed; what it printed.
pub fn client_ok(control: &Path, args: &[&str]) -> String {
    let (ok, said) = client(control, args);
    assert!(ok, "relay {args:?}: {said}");
    said
}

/// Waits (5 s at most) until no IPv6 address in `ns` is tentative: duplicate address
/// detection is done, so link-local sources (ND, MLD) and global ones can be used.
pub fn dad_done(ns: &relay_tests::netns::Netns) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !ns
        .exec(&["ip", "-6", "addr", "show", "tentative"])
        .unwrap()
        .trim()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "IPv6 addresses still tentative"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Another link from the sender, `sender_if` to `relay_if` (see `Topology::add_ingress`),
/// whose native XDP attach the driver refuses though the checks pass it: a veth runs XDP
/// itself, but not a program without multi-buffer support behind a peer with a jumbo MTU
/// (ERANGE). For the tests of a change that fails at the attach, half way through.
pub fn ingress_refusing_native_xdp(topo: &Topology, relay_if: &str, sender_if: &str, subnet: u8) {
    topo.add_ingress(relay_if, sender_if, subnet).unwrap();
    for (ns, iface) in [(&topo.sender, sender_if), (&topo.relay, relay_if)] {
        ip(ns, &format!("link set {iface} mtu 9000"));
    }
}

/// `ip ARGS` (split at spaces) in `ns`; a failure fails the test.
pub fn ip(ns: &relay_tests::netns::Netns, args: &str) {
    let args: Vec<&str> = args.split(' ').collect();
    ns.exec(&[&["ip"], &args[..]].concat())
        .unwrap_or_else(|e| panic!("ip {}: {e:#}", args.join(" ")));
}
