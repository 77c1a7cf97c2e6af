//! Faults around a running relay: killed by SIGKILL, an egress down or with too small an MTU,
//! interfaces deleted and created again under it; each costs only what it touches.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use relay_tests::{
    netns::{require_root, sh},
    relay_proc::{RelayProc, relay_bin, report_value},
    topo::{SENDER_ADDR, Topology},
    traffic::{Flow, Limits, join, listen, send},
};

mod common;
use common::{G1, G2, RULES, seqs, serial, stats_until, stop_clean};

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
