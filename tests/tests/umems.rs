//! Sockets on more than one UMEM: `umem.separate` gives an interface a UMEM of its own, which
//! forces the cross-UMEM path here in copy mode (a zero-copy NIC beside veths takes the same
//! path, with the zero-copy UMEM on one side). A frame is copied only to cross UMEMs, and
//! every copy is counted.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin, report_value},
    topo::{SENDER_ADDR, SENDER_ADDR6, Topology},
    traffic::{Flow, Limits, join, listen, send},
};

mod common;
use common::{seqs, stats_until, stop_accounted, wait_log};

static SERIAL: Mutex<()> = Mutex::new(());

const G1: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
const G2: Ipv4Addr = Ipv4Addr::new(239, 2, 2, 2);
const N: u64 = 1000;

fn all() -> BTreeSet<u64> {
    (0..N).collect()
}

/// One frame to two outputs, one of them on a UMEM of its own: the output that shares the
/// ingress's UMEM gets the received frame itself, the other a copy into its UMEM; the copy is
/// rewritten (group, port, TTL) and its checksums stay valid (the receivers' sockets drop
/// any datagram whose checksum is wrong).
fn fan_out_across_umems(allocator: &str) {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(2).unwrap();
    let rules = "\
umem: { separate: [rout1] }
rules:
  - name: a
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs:
      - interface: rout0
      - { interface: rout1, group: 239.2.2.2, port: 6000, ttl: 16 }
";
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        rules,
        &["--allocator", allocator],
    )
    .unwrap();
    let log = std::fs::read_to_string(&relay.stderr).unwrap();
    assert!(
        log.contains("rin queue 0: AF_XDP socket bound in copy mode (ingress, worker 0) on UMEM 0"),
        "{log}"
    );
    assert!(
        log.contains(
            "rout1 queue 0: AF_XDP socket bound in copy mode (egress, worker 0) on UMEM 1"
        ),
        "{log}"
    );
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, G2, 6000, r1.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(seqs(&join(rx0).unwrap()), all(), "rout0, same UMEM");
    assert_eq!(seqs(&join(rx1).unwrap()), all(), "rout1, its own UMEM");
    let v = stats_until(&relay.control, |v| v.rules[0].outputs[1].sent == N);
    assert_eq!((v.copies, v.cross_umem), (N, N), "{v:?}");
    assert_eq!(v.pool.capacity, 8192, "two UMEMs' pools: {v:?}");
    let report = stop_accounted(relay, &topo, 8192).stdout;
    assert_eq!(
        report_value(&report, &["datapath"], "cross_umem"),
        Some(N),
        "{report}"
    );
}

#[test]
fn fan_out_across_umems_with_lockfree_pool() {
    fan_out_across_umems("lockfree");
}

#[test]
fn fan_out_across_umems_with_mutex_pool() {
    fan_out_across_umems("mutex");
}

/// An ingress on a UMEM of its own: every frame crosses to its one output, IPv4 and IPv6.
/// Without the separate UMEM the same rules make no copy at all.
#[test]
fn an_ingress_on_its_own_umem_copies_every_frame_once() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let g6 = Ipv6Addr::new(0xff18, 0, 0, 0, 0, 0, 1, 1);
    let rules = "\
rules:
  - name: v4
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }]
  - name: v6
    input: { interface: rin, group: 'ff18::1:1', port: 5000 }
    outputs: [{ interface: rout0, port: 6000 }]
";
    for (separate, copies) in [("umem: { separate: [rin] }\n", 2 * N), ("", 0)] {
        let topo = Topology::new(1).unwrap();
        let relay = RelayProc::start(
            &relay_bin(),
            &topo.relay,
            &format!("{separate}{rules}"),
            &[],
        )
        .unwrap();
        let r0 = &topo.receivers[0];
        let rx4 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
        let rx6 = listen(&r0.ns, g6, 6000, r0.addr6, Limits::new(N)).unwrap();
        join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
        join(send(&topo.sender, SENDER_ADDR6, Flow::new(g6, 5000, N))).unwrap();
        assert_eq!(seqs(&join(rx4).unwrap()), all(), "IPv4 {separate}");
        assert_eq!(seqs(&join(rx6).unwrap()), all(), "IPv6 {separate}");
        let v = stats_until(&relay.control, |v| v.rules[1].outputs[0].sent == N);
        assert_eq!(
            (v.copies, v.cross_umem),
            (copies, copies),
            "{separate}: {v:?}"
        );
        let frames = if copies > 0 { 8192 } else { 4096 };
        stop_accounted(relay, &topo, frames);
    }
}

/// The interface on a UMEM of its own deleted and created again: its UMEM has no socket left
/// to share through, so the new device's socket gets a new UMEM; the other output loses
/// nothing meanwhile, and every frame of all three UMEMs is accounted for.
#[test]
fn a_separate_interface_recreated_gets_a_new_umem() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(2).unwrap();
    let rules = "\
umem: { separate: [rout1] }
rules:
  - name: a
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }, { interface: rout1 }]
";
    let relay = RelayProc::start(&relay_bin(), &topo.relay, rules, &[]).unwrap();
    let log = || std::fs::read_to_string(&relay.stderr).unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    topo.relay.exec(&["ip", "link", "del", "rout1"]).unwrap();
    wait_log(&relay, "UMEM 1: every socket on it is gone", 1);
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(
        seqs(&join(rx0).unwrap()),
        all(),
        "rout0 while rout1 is away"
    );
    topo.relink_receiver(1).unwrap();
    wait_log(&relay, "rebound: 1 rules", 1);
    assert!(log().contains("on UMEM 2"), "{}", log());
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, G1, 5000, r1.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(seqs(&join(rx0).unwrap()), all(), "rout0 after");
    assert_eq!(
        seqs(&join(rx1).unwrap()),
        all(),
        "rout1 on its new UMEM\n{}",
        log()
    );
    let v = stats_until(&relay.control, |v| v.rules[0].outputs[1].sent == N);
    assert_eq!(v.rules[0].outputs[1].dropped["interface_down"], N, "{v:?}");
    assert_eq!(v.cross_umem, N, "{v:?}");
    stop_accounted(relay, &topo, 3 * 4096);
}

/// The smallest UMEM two workers may share (512 frames): every fill ring, cache and frame in
/// flight gets its share, so a long flow fanned out across the two workers arrives whole.
/// Before the budget, 512-frame caches could hold the whole UMEM and 128 of 64,000 frames got
/// through.
fn small_umem_two_workers(allocator: &str) {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const LONG: u64 = 20_000;
    let topo = Topology::new(2).unwrap();
    let rules = "\
umem: { frames: 512 }
workers: 2
rules:
  - name: a
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }, { interface: rout1, port: 6000 }]
";
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        rules,
        &["--allocator", allocator],
    )
    .unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(LONG)).unwrap();
    let rx1 = listen(&r1.ns, G1, 6000, r1.addr, Limits::new(LONG)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, LONG))).unwrap();
    let want: BTreeSet<u64> = (0..LONG).collect();
    assert_eq!(seqs(&join(rx0).unwrap()), want, "rout0");
    assert_eq!(seqs(&join(rx1).unwrap()), want, "rout1");
    let v = stats_until(&relay.control, |v| v.rules[0].outputs[1].sent == LONG);
    for o in &v.rules[0].outputs {
        assert_eq!(o.dropped.values().sum::<u64>(), 0, "{v:?}");
    }
    stop_accounted(relay, &topo, 512);
}

#[test]
fn small_umem_two_workers_with_lockfree_pool() {
    small_umem_two_workers("lockfree");
}

#[test]
fn small_umem_two_workers_with_mutex_pool() {
    small_umem_two_workers("mutex");
}

/// A worker off its CPU (here the whole relay, stopped with SIGSTOP while 3,000 frames
/// arrive): the kernel keeps moving frames from the fill ring to the RX ring, and the share
/// of the UMEM on those rings is what is not lost. With 8,192 frames the rings are made 4,096
/// deep and the relay takes every frame once it runs again; with 4,096 frames they are 2,048
/// deep and the kernel drops what came after the 2,048th (its socket counters say so).
/// Before the rings followed the UMEM they were 2,048 deep at any size. Counted at the relay:
/// the burst it then sends at once is more than a receiver's veth backlog takes (1,000).
#[test]
fn a_stopped_relay_loses_only_what_its_rings_cannot_hold() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const SENT: u64 = 3000;
    for (frames, ring) in [(8192u64, 4096u64), (4096, 2048)] {
        let topo = Topology::new(1).unwrap();
        let rules = format!(
            "umem: {{ frames: {frames} }}
rules:
  - name: a
    input: {{ interface: rin, group: 239.1.1.1, port: 5000 }}
    outputs: [ {{ interface: rout0 }} ]
"
        );
        let relay = RelayProc::start(&relay_bin(), &topo.relay, &rules, &[]).unwrap();
        let log = std::fs::read_to_string(&relay.stderr).unwrap();
        assert!(
            log.contains(&format!("RX and fill rings of {ring}")),
            "{frames} frames: {log}"
        );
        let pid = nix::unistd::Pid::from_raw(relay.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        // Nothing of the relay runs while these arrive: no refill, no receive.
        let mut flow = Flow::new(G1, 5000, SENT);
        flow.burst = 64;
        let sent = join(send(&topo.sender, SENDER_ADDR, flow));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        assert_eq!(sent.unwrap(), SENT);
        let ingress_drops = |v: &relay::stats::StatsView| {
            v.sockets
                .iter()
                .filter(|s| s.ingress)
                .map(|s| s.rx_dropped)
                .sum::<u64>()
        };
        let v = stats_until(&relay.control, |v| {
            v.rules[0].received + ingress_drops(v) >= SENT
        });
        let ingress = v
            .sockets
            .iter()
            .find(|s| s.ingress)
            .expect("an ingress socket");
        let kept = SENT.min(ring);
        assert_eq!(
            (v.rules[0].received, v.rules[0].outputs[0].sent),
            (kept, kept),
            "{frames} frames: {ingress:?}"
        );
        assert_eq!(
            ingress.rx_dropped,
            SENT - kept,
            "{frames} frames: {ingress:?}"
        );
        assert_eq!(
            ingress.fill_ring_empty > 0,
            SENT > ring,
            "{frames} frames: {ingress:?}"
        );
        stop_accounted(relay, &topo, frames);
    }
}
