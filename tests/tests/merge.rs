//! Hitless merge (#18) on real kernel paths: one stream sent twice, over two links from the
//! sender to the relay (legs `rin` and `rin2`, to different groups), merged into one output.
//! The receiver must see every packet either leg carried, exactly once and intact, whatever
//! each leg lost; the counters must say what each leg lost and brought.
//!
//! Each datagram is an RTP packet (version 2, its sequence number), then an 8-byte counter
//! (for `merge: {offset: 12, bytes: 8}`), then the harness's own payload of a packet id, so a
//! packet's bytes are the same on both legs and checkable at the receiver. A packet may be an
//! RTCP report instead, as a sender's RTCP reaches a leg that shares its port.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use relay::stats::{MergeView, StatsView};
use relay_tests::{
    netns::{Netns, require_root},
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, SENDER_ADDR6, Topology, addr6},
    traffic::{Limits, check_payload, ifindex_of, join, listen, payload, setsockopt},
};

mod common;
use common::{serial, stats_until, stop_clean};

const GROUP_A: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
const GROUP_B: Ipv4Addr = Ipv4Addr::new(239, 101, 1, 1);
const PORT: u16 = 5000;
/// Bytes of the harness payload after the RTP header and the counter.
const BODY: usize = 40;

/// The SSRC of the packets the tests send, unless a test changes it.
const SSRC: u32 = 0x5eed_cafe;

/// One datagram to send: on which leg, its RTP sequence number and SSRC, its payload
/// counter, and the packet id its bytes are made from; or, with `rtcp`, an RTCP report of
/// that packet type from the SSRC.
#[derive(Debug, Clone, Copy)]
struct Packet {
    leg: usize,
    rtp: u16,
    ssrc: u32,
    counter: u64,
    id: u64,
    rtcp: Option<u8>,
}

fn datagram(p: &Packet, rtp_version: u8) -> Vec<u8> {
    if let Some(pt) = p.rtcp {
        // Its length field (in 32-bit words, less one) where RTP has the sequence number:
        // an SR without report blocks is 6, an RR or a BYE alone 1.
        let words: u16 = match pt {
            200 => 6,
            201 | 203 => 1,
            _ => 2,
        };
        let mut d = vec![0x80, pt];
        d.extend_from_slice(&words.to_be_bytes());
        d.extend_from_slice(&p.ssrc.to_be_bytes());
        d.resize(4 * (usize::from(words) + 1), 0);
        return d;
    }
    let mut d = vec![rtp_version << 6, 96];
    d.extend_from_slice(&p.rtp.to_be_bytes());
    d.extend_from_slice(&(p.id as u32).to_be_bytes());
    d.extend_from_slice(&p.ssrc.to_be_bytes());
    d.extend_from_slice(&p.counter.to_be_bytes());
    d.extend_from_slice(&payload(p.id, BODY));
    d
}

/// The packet id of a relayed datagram, checking that it is one of ours, intact.
fn id_of(d: &[u8]) -> u64 {
    assert_eq!(d.len(), 20 + BODY, "{d:02x?}");
    check_payload(&d[20..]).unwrap_or_else(|| panic!("damaged payload {d:02x?}"))
}

/// Sends `packets` in order from the sender namespace: leg 0 from `SENDER_ADDR` to
/// `GROUP_A`, leg 1 from `leg1_source` (the second link) to `GROUP_B`, paced.
fn send(ns: &Netns, leg1_source: Ipv4Addr, packets: Vec<Packet>, rtp_version: u8) {
    join(ns.run(move || {
        let socket = |source: Ipv4Addr| -> anyhow::Result<UdpSocket> {
            let s = UdpSocket::bind(SocketAddr::new(source.into(), 0))?;
            s.set_multicast_ttl_v4(8)?;
            s.set_multicast_loop_v4(false)?;
            let a = libc::in_addr {
                s_addr: u32::from(source).to_be(),
            };
            setsockopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MULTICAST_IF, &a)?;
            Ok(s)
        };
        // Only the legs this batch uses: a leg whose link was deleted has no address.
        let used = |leg: usize| packets.iter().any(|p| p.leg == leg);
        let legs = [
            (used(0).then(|| socket(SENDER_ADDR)).transpose()?, GROUP_A),
            (used(1).then(|| socket(leg1_source)).transpose()?, GROUP_B),
        ];
        for (i, p) in packets.iter().enumerate() {
            let (s, g) = &legs[p.leg];
            let s = s.as_ref().expect("a socket for every leg used");
            s.send_to(
                &datagram(p, rtp_version),
                SocketAddr::new((*g).into(), PORT),
            )?;
            if i % 16 == 15 {
                std::thread::sleep(Duration::from_micros(800));
            }
        }
        Ok(())
    }))
    .unwrap();
}

fn yaml(merge: &str, workers: usize) -> String {
    format!(
        "workers: {workers}\n{}",
        rules([GROUP_A.into(), GROUP_B.into()], merge)
    )
}

/// The merged rule `feed` of legs `groups` (on rin and rin2), out of rout0.
fn rules(groups: [IpAddr; 2], merge: &str) -> String {
    let [a, b] = groups;
    format!(
        "rules:
  - name: feed
    inputs:
      - {{ interface: rin, group: '{a}', port: {PORT} }}
      - {{ interface: rin2, group: '{b}', port: {PORT} }}
    merge: {merge}
    outputs: [{{ interface: rout0 }}]
"
    )
}

/// Starts a relay merging the two legs of `topo` (whose second link is made here).
fn start(topo: &Topology, merge: &str, workers: usize, allocator: &str) -> (RelayProc, Ipv4Addr) {
    let leg1 = topo.add_ingress("rin2", "snd1", 100).unwrap();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        &yaml(merge, workers),
        &["--allocator", allocator],
    )
    .unwrap();
    (relay, leg1)
}

fn merge_view(control: &std::path::Path, relayed: u64) -> (StatsView, MergeView) {
    let v = stats_until(control, |v| {
        v.rules[0]
            .merge
            .as_ref()
            .is_some_and(|m| m.relayed >= relayed)
    });
    let m = v.rules[0].merge.clone().expect("a merged rule");
    (v, m)
}

/// What the counters must say for `packets` (sent in order, nothing lost on the wire).
struct Expected {
    relayed: BTreeSet<u64>,
    received: [u64; 2],
    gaps: [u64; 2],
    lost: u64,
}

fn expected(packets: &[Packet]) -> Expected {
    let ids = |leg: usize| -> BTreeSet<u64> {
        packets
            .iter()
            .filter(|p| p.leg == leg)
            .map(|p| p.id)
            .collect()
    };
    let (a, b) = (ids(0), ids(1));
    let relayed: BTreeSet<u64> = a.union(&b).copied().collect();
    let gaps = |s: &BTreeSet<u64>| match (s.first(), s.last()) {
        (Some(lo), Some(hi)) => hi - lo + 1 - s.len() as u64,
        _ => 0,
    };
    Expected {
        received: [a.len() as u64, b.len() as u64],
        gaps: [gaps(&a), gaps(&b)],
        lost: gaps(&relayed),
        relayed,
    }
}

/// Both legs of ids `ids`, the RTP sequence starting at `rtp0`, each leg losing the ids its
/// `lost` says, leg 0's packet first.
fn both_legs(
    ids: std::ops::Range<u64>,
    rtp0: u16,
    counter0: u64,
    lost: impl Fn(usize, u64) -> bool,
) -> Vec<Packet> {
    let first = ids.start;
    ids.flat_map(|id| {
        (0..2).map(move |leg| Packet {
            leg,
            rtp: rtp0.wrapping_add((id - first) as u16),
            ssrc: SSRC,
            counter: counter0 + (id - first),
            id,
            rtcp: None,
        })
    })
    .filter(|p| !lost(p.leg, p.id))
    .collect()
}

/// The output's receiver, joined to the first leg's group (what the merged stream goes out
/// as), ready before it returns.
fn receiver(topo: &Topology, expect: u64) -> Receiving {
    let r = &topo.receivers[0];
    listen(&r.ns, GROUP_A, PORT, r.addr, Limits::new(expect)).unwrap()
}

type Receiving = std::thread::JoinHandle<anyhow::Result<Vec<Vec<u8>>>>;

/// Every id the output carried, each exactly once.
fn ids_once(got: &[Vec<u8>]) -> BTreeSet<u64> {
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for d in got {
        *count.entry(id_of(d)).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "relayed more than once: {twice:?}");
    count.into_keys().collect()
}

/// The receiver got every id of `want` (each once: see [`ids_once`]), and no other.
fn all_of(got: &BTreeSet<u64>, want: &BTreeSet<u64>, allocator: &str) {
    assert_eq!(
        got.len(),
        want.len(),
        "{allocator}: missing {:?}",
        want.difference(got).take(20).collect::<Vec<_>>()
    );
    assert_eq!(got, want, "{allocator}: every packet either leg carried");
}

fn check_counters(m: &MergeView, want: &Expected) {
    assert_eq!(m.relayed, want.relayed.len() as u64, "{m:?}");
    assert_eq!(m.lost, want.lost, "{m:?}");
    assert_eq!(m.malformed, 0, "{m:?}");
    for leg in 0..2 {
        let l = &m.legs[leg];
        assert_eq!(l.received, want.received[leg], "leg {leg}: {m:?}");
        assert_eq!(l.first + l.duplicate, l.received, "leg {leg}: {m:?}");
        assert_eq!(l.gaps, want.gaps[leg], "leg {leg}: {m:?}");
    }
}

/// Two legs with independent losses and an outage each, across the RTP sequence number's
/// wrap from 65535 to 0: the output carries every packet either leg carried, once.
fn lossy_legs(allocator: &str, workers: usize) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let (relay, leg1) = start(&topo, "rtp", workers, allocator);
    // Neither leg loses the first or the last packet, so each leg's gaps are what it
    // skipped between them; ids 1000-1002 are lost on both (nobody can relay them), and so
    // are those where the two patterns meet.
    let lost = |leg: usize, id: u64| {
        if id == 0 || id == 2999 {
            return false;
        }
        match leg {
            0 => id % 13 == 4 || (600..800).contains(&id) || (1000..1003).contains(&id),
            _ => id % 11 == 7 || (1800..1950).contains(&id) || (1000..1003).contains(&id),
        }
    };
    if workers == 2 {
        // The legs really are on two threads.
        let log = std::fs::read_to_string(&relay.stderr).unwrap();
        let worker_of = |iface: &str| {
            log.lines()
                .find(|l| l.contains(&format!("{iface} queue 0: AF_XDP socket bound")))
                .and_then(|l| l.split("worker ").nth(1))
                .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_digit()).to_owned())
                .unwrap_or_else(|| panic!("no socket for {iface} in\n{log}"))
        };
        assert_ne!(worker_of("rin"), worker_of("rin2"), "{log}");
    }
    let packets = both_legs(0..3000, 65535 - 1500, 0, lost);
    let want = expected(&packets);
    assert!(want.lost >= 3, "some numbers are lost on both legs");
    let rx = receiver(&topo, want.relayed.len() as u64);
    send(&topo.sender, leg1, packets, 2);
    let got = ids_once(&join(rx).unwrap());
    assert_eq!(got, want.relayed, "every packet either leg carried");
    let (_, m) = merge_view(&relay.control, want.relayed.len() as u64);
    check_counters(&m, &want);
    assert!(
        m.legs[0].first > 0 && m.legs[1].first > 0,
        "each leg was first at times: {m:?}"
    );
    stop_clean(relay, &topo);
}

#[test]
fn merges_lossy_legs_across_the_wrap_with_lockfree_pool() {
    lossy_legs("lockfree", 1);
}

#[test]
fn merges_lossy_legs_across_the_wrap_with_mutex_pool() {
    lossy_legs("mutex", 1);
}

/// Two workers: each leg's interface has its own worker, so the legs race for the merge
/// state from two threads.
#[test]
fn merges_legs_received_by_two_workers() {
    lossy_legs("lockfree", 2);
}

/// One leg's link is deleted mid-stream: the other carries on alone and nothing is lost.
#[test]
fn one_leg_dies_and_the_other_carries_on() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let (relay, leg1) = start(&topo, "rtp", 1, "lockfree");
    let rx = receiver(&topo, 2000);
    send(
        &topo.sender,
        leg1,
        both_legs(0..1000, 100, 0, |_, _| false),
        2,
    );
    topo.relay.exec(&["ip", "link", "del", "rin2"]).unwrap();
    let alone: Vec<Packet> = both_legs(1000..2000, 1100, 1000, |leg, _| leg == 1);
    send(&topo.sender, leg1, alone, 2);
    let got = ids_once(&join(rx).unwrap());
    assert_eq!(got, (0..2000).collect::<BTreeSet<u64>>());
    let (_, m) = merge_view(&relay.control, 2000);
    assert_eq!((m.relayed, m.lost), (2000, 0), "{m:?}");
    assert_eq!(m.legs[0].received, 2000, "{m:?}");
    stop_clean(relay, &topo);
}

/// The sender starts again at a lower sequence number after a pause longer than the
/// window: nothing is swallowed as a duplicate, with RTP numbering and with a counter.
fn restart(merge: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let (relay, leg1) = start(&topo, merge, 1, "mutex");
    let rx = receiver(&topo, 2000);
    send(
        &topo.sender,
        leg1,
        both_legs(0..1000, 500, 500, |_, _| false),
        2,
    );
    // The window is 500 ms.
    std::thread::sleep(Duration::from_millis(1200));
    send(
        &topo.sender,
        leg1,
        both_legs(1000..2000, 200, 200, |_, _| false),
        2,
    );
    let got = ids_once(&join(rx).unwrap());
    assert_eq!(got, (0..2000).collect::<BTreeSet<u64>>(), "{merge}");
    let (_, m) = merge_view(&relay.control, 2000);
    assert_eq!((m.relayed, m.lost), (2000, 0), "{merge}: {m:?}");
    for l in &m.legs {
        assert_eq!(
            (l.received, l.first + l.duplicate, l.gaps),
            (2000, 2000, 0),
            "{m:?}"
        );
    }
    stop_clean(relay, &topo);
}

#[test]
fn a_sender_that_starts_again_lower_is_not_swallowed_rtp() {
    restart("rtp");
}

#[test]
fn a_sender_that_starts_again_lower_is_not_swallowed_counter() {
    restart("{ offset: 12, bytes: 8 }");
}

/// Datagrams that are not RTP version 2 on a merged input are counted and never relayed;
/// the RTP ones around them go out.
#[test]
fn packets_without_a_sequence_number_are_counted_not_relayed() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let (relay, leg1) = start(&topo, "rtp", 1, "lockfree");
    let rx = receiver(&topo, 200);
    send(&topo.sender, leg1, both_legs(0..100, 7, 0, |_, _| false), 2);
    // RTP version 1: no sequence number the merge reads.
    send(
        &topo.sender,
        leg1,
        both_legs(5000..5100, 0, 0, |leg, _| leg == 1),
        1,
    );
    send(
        &topo.sender,
        leg1,
        both_legs(100..200, 107, 100, |_, _| false),
        2,
    );
    let got = ids_once(&join(rx).unwrap());
    assert_eq!(got, (0..200).collect::<BTreeSet<u64>>());
    let v = stats_until(&relay.control, |v| {
        v.rules[0]
            .merge
            .as_ref()
            .is_some_and(|m| m.malformed >= 100)
    });
    let m = v.rules[0].merge.as_ref().unwrap();
    assert_eq!((m.malformed, m.relayed), (100, 200), "{m:?}");
    assert_eq!(
        v.rules[0].outputs[0].sent, 200,
        "the output sent the relayed ones only"
    );
    stop_clean(relay, &topo);
}

const GROUP_A6: Ipv6Addr = Ipv6Addr::new(0xff18, 0, 0, 0, 0, 0, 0x101, 1);
const GROUP_B6: Ipv6Addr = Ipv6Addr::new(0xff18, 0, 0, 0, 0, 0, 0x102, 1);
/// The sender's and the relay's addresses on the second link (`snd1` -- `rin2`).
const LEG1_SENDER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 100, 0, 0, 0, 1);
const LEG1_RELAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 100, 0, 0, 0, 2);

/// The source ports of the two IPv6 legs: fixed, so the test can work out each datagram's
/// checksum.
const LEG_PORTS: [u16; 2] = [41000, 41001];

/// Whether the relay counts a datagram sent with transmit checksum offload as completed: it
/// counts a completion when the full checksum differs from the partial one the sender left
/// (the two are equal for one datagram in 65,536, which is then already right).
fn completes(p: &Packet) -> bool {
    let (source, group) = [(SENDER_ADDR6, GROUP_A6), (LEG1_SENDER6, GROUP_B6)][p.leg];
    let body = datagram(p, 2);
    let len = (8 + body.len()) as u16;
    let mut udp = Vec::with_capacity(usize::from(len));
    udp.extend_from_slice(&LEG_PORTS[p.leg].to_be_bytes());
    udp.extend_from_slice(&PORT.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&body);
    let partial = relay::checksum::pseudo_ipv6(source, group, u32::from(len));
    relay::checksum::udp_ipv6(source, group, &udp) != partial
}

/// The second link of an IPv6 merge (`snd1` -- `rin2`) with its addresses.
fn legs6(topo: &Topology) {
    topo.add_ingress("rin2", "snd1", 100).unwrap();
    addr6(&topo.sender, "snd1", LEG1_SENDER6).unwrap();
    addr6(&topo.relay, "rin2", LEG1_RELAY6).unwrap();
}

/// As [`send`] over IPv6 (leg 0 from `SENDER_ADDR6` to `GROUP_A6`, leg 1 from
/// `LEG1_SENDER6` to `GROUP_B6`), in the background: the caller reloads meanwhile.
fn send6(ns: &Netns, packets: Vec<Packet>) -> std::thread::JoinHandle<anyhow::Result<()>> {
    ns.run(move || {
        let socket = |source: Ipv6Addr, port: u16| -> anyhow::Result<UdpSocket> {
            let s = UdpSocket::bind(SocketAddr::new(source.into(), port))?;
            s.set_multicast_loop_v6(false)?;
            let hops: libc::c_int = 8;
            setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MULTICAST_HOPS,
                &hops,
            )?;
            let index: libc::c_uint = ifindex_of(source)?;
            setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MULTICAST_IF,
                &index,
            )?;
            Ok(s)
        };
        let legs = [
            (socket(SENDER_ADDR6, LEG_PORTS[0])?, GROUP_A6),
            (socket(LEG1_SENDER6, LEG_PORTS[1])?, GROUP_B6),
        ];
        for (i, p) in packets.iter().enumerate() {
            let (s, g) = &legs[p.leg];
            s.send_to(&datagram(p, 2), SocketAddr::new((*g).into(), PORT))?;
            if i % 16 == 15 {
                std::thread::sleep(Duration::from_micros(800));
            }
        }
        Ok(())
    })
}

/// Merged IPv6 legs, from a sender whose transmit checksum offload is on (so every frame on
/// both legs arrives with a partial UDP checksum), while the rules are reloaded six times
/// around the merged rule (another rule added and removed): every packet either leg carried
/// reaches the receiver once and intact (its stack checks the completed checksum), and the
/// merged rule's counters run on across the reloads as if there had been none.
fn ipv6_legs_offload_on_through_reloads(allocator: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    legs6(&topo);
    topo.sender_tx_offload_on().unwrap();
    topo.sender
        .exec(&["ethtool", "-K", "snd1", "tx", "on"])
        .unwrap();
    let base = rules([GROUP_A6.into(), GROUP_B6.into()], "rtp");
    let with_extra = format!(
        "{base}  - name: extra\n    input: {{ interface: rin, group: 239.3.3.3, port: 5000 }}\n    outputs: [{{ interface: rout0 }}]\n"
    );
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        &base,
        &["--allocator", allocator],
    )
    .unwrap();
    let lost = |leg: usize, id: u64| {
        if id == 0 || id == 7999 {
            return false;
        }
        match leg {
            0 => id % 7 == 3 || (2000..2600).contains(&id) || (5000..5004).contains(&id),
            _ => id % 9 == 5 || (4000..4500).contains(&id) || (5000..5004).contains(&id),
        }
    };
    let packets = both_legs(0..8000, 60_000, 0, lost);
    let want = expected(&packets);
    let completed = packets.iter().filter(|p| completes(p)).count() as u64;
    assert!(want.lost >= 4, "some numbers are lost on both legs");
    let r = &topo.receivers[0];
    let rx = listen(
        &r.ns,
        GROUP_A6,
        PORT,
        r.addr6,
        Limits::new(want.relayed.len() as u64),
    )
    .unwrap();
    let sender = send6(&topo.sender, packets);
    let ctl = relay.control.to_str().unwrap().to_owned();
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(60));
        let yaml = if i % 2 == 0 { &with_extra } else { &base };
        std::fs::write(&relay.config, yaml).unwrap();
        let out = std::process::Command::new(relay_bin())
            .args(["reload", "--control", &ctl])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && said.starts_with("done: "), "{said}");
    }
    join(sender).unwrap();
    let got = ids_once(&join(rx).unwrap());
    all_of(&got, &want.relayed, allocator);
    let (v, m) = merge_view(&relay.control, want.relayed.len() as u64);
    check_counters(&m, &want);
    assert_eq!(
        v.rules[0].received,
        want.received[0] + want.received[1],
        "{allocator}: the rule's own count ran on across the reloads"
    );
    assert_eq!(
        v.rules[0].checksum_completed, completed,
        "{allocator}: every frame arrived with a partial checksum and was completed"
    );
    stop_clean(relay, &topo);
}

#[test]
fn merges_ipv6_legs_with_offload_on_through_reloads_lockfree() {
    ipv6_legs_offload_on_through_reloads("lockfree");
}

#[test]
fn merges_ipv6_legs_with_offload_on_through_reloads_mutex() {
    ipv6_legs_offload_on_through_reloads("mutex");
}

/// ST 2110 and ST 2022-7 senders send RTCP to the RTP port + 1, and a sender that restarts
/// picks a new SSRC and a new first number. Both legs carry an RTCP report of each type
/// (SR, RR, SDES, BYE, APP) every 40 packets, across the RTP number's wrap (where an SR's
/// length of 6, read as a sequence number, jumped the merge ahead past the wrap and the real
/// 6 came as a duplicate); then the sender restarts (new SSRC) 200 numbers behind where it
/// was, leg 1 three packets behind leg 0. The receiver gets every RTP packet once and no
/// RTCP; the counters say how many reports were dropped, one new stream, and the lagging
/// leg's old packets as stale.
fn rtcp_and_a_second_ssrc(v6: bool, allocator: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let groups: [IpAddr; 2] = if v6 {
        legs6(&topo);
        [GROUP_A6.into(), GROUP_B6.into()]
    } else {
        [GROUP_A.into(), GROUP_B.into()]
    };
    let leg1 = (!v6).then(|| topo.add_ingress("rin2", "snd1", 100).unwrap());
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        &rules(groups, "rtp"),
        &["--allocator", allocator],
    )
    .unwrap();
    let old = both_legs(0..1500, 65535 - 700, 0, |_, _| false);
    // The old stream's last number is 798.
    let restarted = both_legs(1500..3000, 598, 0, |_, _| false)
        .into_iter()
        .map(|p| Packet { ssrc: 0x0b0b, ..p });
    let rtp: Vec<Packet> = old.into_iter().chain(restarted).collect();
    let want = expected(&rtp);
    // Leg 1 three packets behind leg 0, and a report after every 40th packet of each leg.
    let lag = |p: &Packet| 2 * p.id + if p.leg == 1 { 7 } else { 0 };
    let mut packets = rtp.clone();
    packets.sort_by_key(lag);
    let mut reports = 0;
    let packets: Vec<Packet> = packets
        .into_iter()
        .flat_map(|p| {
            let report = (p.id % 40 == 39).then(|| {
                reports += 1;
                Packet {
                    rtcp: Some(200 + (p.id / 40 % 5) as u8),
                    ..p
                }
            });
            std::iter::once(p).chain(report)
        })
        .collect();
    let r = &topo.receivers[0];
    let (group, addr): (IpAddr, IpAddr) = if v6 {
        (GROUP_A6.into(), r.addr6.into())
    } else {
        (GROUP_A.into(), r.addr.into())
    };
    // One more than should come: a report or a second copy let through is seen.
    let rx = listen(
        &r.ns,
        group,
        PORT,
        addr,
        Limits::new(want.relayed.len() as u64 + 1),
    )
    .unwrap();
    match leg1 {
        Some(leg1) => send(&topo.sender, leg1, packets, 2),
        None => join(send6(&topo.sender, packets)).unwrap(),
    }
    let got = ids_once(&join(rx).unwrap());
    all_of(&got, &want.relayed, allocator);
    let v = stats_until(&relay.control, |v| {
        v.rules[0]
            .merge
            .as_ref()
            .is_some_and(|m| m.rtcp >= reports && m.relayed >= want.relayed.len() as u64)
    });
    let m = v.rules[0].merge.clone().expect("a merged rule");
    assert_eq!(
        (m.relayed, m.lost, m.malformed, m.rtcp, m.new_streams),
        (want.relayed.len() as u64, 0, 0, reports, 1),
        "{allocator}: {m:?}"
    );
    // What the legs received is what was sent, less the stale: those of the lagging leg's
    // old stream after the other leg's first new packet (3 on the wire; the worker takes up
    // to a batch of 64 from one leg's ring before the other's, so either leg may be first).
    let received: u64 = m.legs.iter().map(|l| l.received).sum();
    assert_eq!(received + m.stale, rtp.len() as u64, "{allocator}: {m:?}");
    assert!(m.stale <= 3 + 2 * 64, "{allocator}: {m:?}");
    for l in &m.legs {
        assert_eq!(
            (l.first + l.duplicate, l.gaps),
            (l.received, 0),
            "{allocator}: {m:?}"
        );
    }
    assert_eq!(v.rules[0].outputs[0].sent, want.relayed.len() as u64);
    // `relay stats` shows them on the merge line.
    let table = std::process::Command::new(relay_bin())
        .args(["stats", "--control"])
        .arg(&relay.control)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!("rtcp={reports} new_streams=1 stale={}", m.stale)),
        "{table}"
    );
    // And so does the report at shutdown.
    let exit = stop_clean(relay, &topo);
    let merge_line = format!(
        "rule=feed merge relayed={} lost=0 malformed=0 rtcp={reports} new_streams=1 stale={}",
        want.relayed.len(),
        m.stale
    );
    assert!(exit.stdout.contains(&merge_line), "{}", exit.stdout);
}

#[test]
fn rtcp_and_a_second_ssrc_ipv4_lockfree() {
    rtcp_and_a_second_ssrc(false, "lockfree");
}

#[test]
fn rtcp_and_a_second_ssrc_ipv4_mutex() {
    rtcp_and_a_second_ssrc(false, "mutex");
}

#[test]
fn rtcp_and_a_second_ssrc_ipv6_lockfree() {
    rtcp_and_a_second_ssrc(true, "lockfree");
}

#[test]
fn rtcp_and_a_second_ssrc_ipv6_mutex() {
    rtcp_and_a_second_ssrc(true, "mutex");
}
