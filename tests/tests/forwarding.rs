//! Forwarding end to end, on real kernel paths: the relay binary in a namespace between a
//! sender and receivers, with the XDP program attached and AF_XDP sockets bound, for each
//! allocator, with one worker and two, sleeping and busy polling; TTL 1 where outputs
//! decrement it and where they set it; 64 outputs; a worker per rx queue pinned to its CPU.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin, report_value},
    topo::{RELAY_IN_ADDR, SENDER_ADDR, Topology},
    traffic::{Flow, Limits, capture, check_payload, join, listen, send},
};

mod common;
use common::{
    G1, G2, RULES, inspect, is_udp_to_test_group, mac_of, ping_answers, seqs, serial, stop_clean,
};

const OTHER: Ipv4Addr = Ipv4Addr::new(239, 9, 9, 9);

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
