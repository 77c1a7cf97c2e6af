//! Interfaces that come and go under a running relay: the ingress that owns the UMEM
//! re-created three times, an egress twice while a flow runs, then a reload and an add-rule.
//! Counters never go backwards, every frame is accounted for, and the XDP program's maps
//! hold no trace of the deleted devices.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Mutex, time::Duration};

use relay::stats::StatsView;
use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, Topology},
    traffic::{Flow, Limits, join, listen, send},
};

mod common;
use common::{seqs, stats_until, stop_clean, wait_log};

static SERIAL: Mutex<()> = Mutex::new(());

const G1: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);

const RULES: &str = "\
rules:
  - name: a
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }, { interface: rout1 }]
";

/// Every counter of `now` is at least what it was in `before`.
fn never_backwards(before: &StatsView, now: &StatsView, when: &str) {
    let (b, n) = (&before.rules[0], &now.rules[0]);
    assert!(
        n.received >= b.received,
        "{when}: received went back: {b:?} -> {n:?}"
    );
    for (bo, no) in b.outputs.iter().zip(&n.outputs) {
        assert!(
            no.sent >= bo.sent,
            "{when}: sent went back: {bo:?} -> {no:?}"
        );
        for (why, &count) in &bo.dropped {
            let now = no.dropped.get(why).copied().unwrap_or(0);
            assert!(now >= count, "{when}: {why} went back: {bo:?} -> {no:?}");
        }
    }
}

/// The XSKMAP slots the values of the relay's rule map carry (each key's ingress slot). The
/// map is found among the map ids the relay's own descriptors hold, so no other relay's map is
/// read.
fn rule_map_slots(pid: u32) -> std::collections::BTreeSet<u32> {
    let mut held = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let info = std::fs::read_to_string(fd.unwrap().path()).unwrap_or_default();
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")) {
            held.push(id.trim().parse::<u64>().unwrap());
        }
    }
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()
        .unwrap();
    let maps: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let id = maps
        .iter()
        .find(|m| m["name"] == "RULES" && m["id"].as_u64().is_some_and(|id| held.contains(&id)))
        .unwrap_or_else(|| panic!("no RULES map among {held:?} held by pid {pid}"))["id"]
        .as_u64()
        .unwrap();
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &id.to_string()])
        .output()
        .unwrap();
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    entries
        .iter()
        .map(|e| {
            // With BTF bpftool formats the value; without, it lists its bytes in hex.
            if let Some(slot) = e["formatted"]["value"]["slot"].as_u64() {
                return slot as u32;
            }
            let bytes: Vec<u8> = e["value"]
                .as_array()
                .unwrap_or_else(|| panic!("a rule map entry without a value: {e}"))
                .iter()
                .map(|b| {
                    u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
                })
                .collect();
            u32::from_le_bytes(bytes[4..8].try_into().unwrap())
        })
        .collect()
}

fn recreated_under_a_running_flow(allocator: &str) {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const N: u64 = 500;
    let all: BTreeSet<u64> = (0..N).collect();
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        RULES,
        &["--allocator", allocator],
    )
    .unwrap();
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let log = || std::fs::read_to_string(&relay.stderr).unwrap();
    let both_get_all = |when: &str| {
        let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
        let rx1 = listen(&r1.ns, G1, 5000, r1.addr, Limits::new(N)).unwrap();
        join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
        assert_eq!(seqs(&join(rx0).unwrap()), all, "rout0 {when}\n{}", log());
        assert_eq!(seqs(&join(rx1).unwrap()), all, "rout1 {when}\n{}", log());
    };
    let stats =
        |min_received: u64| stats_until(&relay.control, |v| v.rules[0].received >= min_received);

    both_get_all("at start");
    let mut last = stats(N);
    let mut expected = N;

    // The first ingress owns the UMEM: before, a new socket could never share it again.
    for i in 1..=3 {
        topo.relay.exec(&["ip", "link", "del", "rin"]).unwrap();
        wait_log(&relay, "rin queue 0: socket closed, its device is gone", i);
        topo.relink_ingress().unwrap();
        wait_log(
            &relay,
            "rin: the interface is back (a new device); binding to it",
            i,
        );
        wait_log(&relay, "rebound: 1 rules", i);
        both_get_all(&format!("after the ingress was re-created {i} times"));
        expected += N;
        let now = stats(expected);
        never_backwards(&last, &now, &format!("ingress re-created {i} times"));
        assert_eq!(now.rules[0].received, expected, "{now:?}");
        for o in &now.rules[0].outputs {
            assert_eq!(
                o.dropped.get("no_frame").copied().unwrap_or(0),
                0,
                "{now:?}"
            );
        }
        last = now;
    }
    // The lines about each old device name it as the deleted one, so that its `left` after
    // the new device's `joined` is not read as the group being left.
    let said = log();
    let old_device =
        |l: &&str| l.contains("rin (ifindex ") && l.contains(", deleted): left 239.1.1.1 (IGMP)");
    assert_eq!(said.lines().filter(old_device).count(), 3, "{said}");
    assert!(!said.contains("rin: left 239.1.1.1"), "{said}");
    let detached = |l: &&str| l.contains(", deleted): XDP program detached");
    assert_eq!(said.lines().filter(detached).count(), 3, "{said}");
    assert!(!said.contains("rin: XDP program detached"), "{said}");
    // Each re-created ingress is a new device; the gone one's slot is given to it again.
    assert_eq!(
        rule_map_slots(relay.pid()),
        std::collections::BTreeSet::from([0]),
        "one ingress, one slot"
    );

    // An egress deleted and created again while a flow runs: the other output gets every
    // datagram, and the re-created one's counters carry on from where they were.
    const LONG: u64 = 20_000;
    for i in 1..=2 {
        let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(LONG)).unwrap();
        let sender = send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, LONG));
        std::thread::sleep(Duration::from_millis(150));
        topo.relay.exec(&["ip", "link", "del", "rout1"]).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        topo.relink_receiver(1).unwrap();
        assert_eq!(join(sender).unwrap(), LONG);
        let got: BTreeSet<u64> = seqs(&join(rx0).unwrap());
        assert_eq!(
            got,
            (0..LONG).collect(),
            "rout0 while rout1 was re-created {i}\n{}",
            log()
        );
        wait_log(
            &relay,
            "rout1: the interface is back (a new device); binding to it",
            i,
        );
        expected += LONG;
        let now = stats(expected);
        never_backwards(&last, &now, &format!("egress re-created {i} times"));
        let down = now.rules[0].outputs[1].dropped["interface_down"];
        assert!(
            down > last.rules[0].outputs[1].dropped["interface_down"],
            "the outage is counted: {now:?}"
        );
        last = now;
        both_get_all(&format!("after the egress was re-created {i} times"));
        expected += N;
        let now = stats(expected);
        never_backwards(&last, &now, "after the egress came back");
        last = now;
    }

    // A reload and an add-rule work on the rebound sockets.
    let ctl = relay.control.to_str().unwrap().to_owned();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(relay_bin())
            .args(args)
            .args(["--control", &ctl])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log()
        );
    };
    run(&["reload"]);
    let extra = relay.config.with_file_name("extra.yaml");
    std::fs::write(
        &extra,
        "name: b\ninput: { interface: rin, group: 239.3.3.3, port: 5000 }\noutputs: [{ interface: rout1 }]\n",
    )
    .unwrap();
    run(&["add-rule", extra.to_str().unwrap()]);
    both_get_all("after a reload and an add-rule");
    let g3 = Ipv4Addr::new(239, 3, 3, 3);
    let rx = listen(&r1.ns, g3, 5000, r1.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(g3, 5000, N))).unwrap();
    assert_eq!(seqs(&join(rx).unwrap()), all, "the added rule relays");
    expected += N;
    never_backwards(&last, &stats(expected), "after the reload");

    stop_clean(relay, &topo);
}

#[test]
fn recreated_under_a_running_flow_with_lockfree_pool() {
    recreated_under_a_running_flow("lockfree");
}

#[test]
fn recreated_under_a_running_flow_with_mutex_pool() {
    recreated_under_a_running_flow("mutex");
}

/// A reload that fails half way — a socket the kernel refuses (EBUSY: another relay holds
/// the queue) after another was opened, or an XDP attach the driver refuses (native mode on
/// a veth behind a jumbo MTU) after sockets, XSKMAP entries and joins — leaves the running relay exactly as it
/// was, and the next reload finds nothing stale.
#[test]
fn a_reload_that_fails_half_way_changes_nothing() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const N: u64 = 300;
    let all: BTreeSet<u64> = (0..N).collect();
    let g3 = Ipv4Addr::new(239, 3, 3, 3);
    let topo = Topology::new(2).unwrap();
    let from2 = topo.add_ingress("rin2", "snd1", 100).unwrap();
    let from3 = topo.add_ingress("rin3", "snd2", 101).unwrap();
    common::ingress_refusing_native_xdp(&topo, "rin4", "snd3", 102);
    // Another relay holds rin2's queue.
    let other = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        "rules:\n  - name: o\n    input: { interface: rin2, group: 239.9.9.9 }\n    outputs: [{ interface: rout1 }]\n",
        &[],
    )
    .unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, "rules:\n  - name: a\n    input: { interface: rin, group: 239.1.1.1, port: 5000 }\n    outputs: [{ interface: rout0 }]\n", &[]).unwrap();
    let base = std::fs::read_to_string(&relay.config).unwrap();
    let rule_x = "  - name: x\n    input: { interface: rin3, group: 239.3.3.3, port: 5000 }\n    outputs: [{ interface: rout0 }]\n";
    let rule_y = "  - name: y\n    input: { interface: rin2, group: 239.3.3.3, port: 5000 }\n    outputs: [{ interface: rout0 }]\n";
    let rule_jumbo = "  - name: l\n    input: { interface: rin4, group: 239.4.4.4, port: 5000 }\n    outputs: [{ interface: rout0 }]\n";
    let reload = |yaml: &str| {
        std::fs::write(&relay.config, yaml).unwrap();
        common::client(&relay.control, &["reload"])
    };
    let log = || std::fs::read_to_string(&relay.stderr).unwrap();
    let r0 = &topo.receivers[0];
    let relays = |group: Ipv4Addr, from: Ipv4Addr, when: &str| {
        let rx = listen(&r0.ns, group, 5000, r0.addr, Limits::new(N)).unwrap();
        join(send(&topo.sender, from, Flow::new(group, 5000, N))).unwrap();
        assert_eq!(
            seqs(&join(rx).unwrap()),
            all,
            "{group} from {from} {when}\n{}",
            log()
        );
    };
    let rules_now = || {
        stats_until(&relay.control, |_| true)
            .rules
            .iter()
            .map(|r| r.name.clone())
            .collect::<Vec<_>>()
    };
    relays(G1, SENDER_ADDR, "at start");

    // rin3's socket opens, rin2's is refused: the reload fails and rin3's is closed again.
    let (ok, said) = reload(&format!("{base}{rule_x}{rule_y}"));
    assert!(!ok, "{said}");
    assert!(
        said.contains("rin2 queue 0 already has an AF_XDP socket bound"),
        "{said}"
    );
    assert_eq!(rules_now(), ["a"], "the running rules stay");
    relays(G1, SENDER_ADDR, "after the refused reload");

    // Sockets, XSKMAP entries and joins done, then the attach is refused: all undone.
    let (ok, said) = reload(&format!("xdp_mode: native\n{base}{rule_x}{rule_jumbo}"));
    assert!(!ok, "{said}");
    assert!(
        said.contains("attaching XDP to rin4 in native mode"),
        "{said}"
    );
    assert_eq!(rules_now(), ["a"], "the running rules stay");
    relays(G1, SENDER_ADDR, "after the refused attach");
    let rin4 = topo
        .relay
        .exec(&["ip", "-d", "link", "show", "rin4"])
        .unwrap();
    assert!(!rin4.contains("xdp"), "no XDP left on rin4: {rin4}");
    let rin3 = topo
        .relay
        .exec(&["ip", "-d", "link", "show", "rin3"])
        .unwrap();
    assert!(!rin3.contains("xdp"), "no XDP left on rin3: {rin3}");
    let maddr = topo
        .relay
        .exec(&["ip", "maddr", "show", "dev", "rin3"])
        .unwrap();
    assert!(
        !maddr.contains("239.3.3.3"),
        "the join on rin3 was left: {maddr}"
    );

    // The next reload opens rin3 afresh and relays from it.
    let (ok, said) = reload(&format!("{base}{rule_x}"));
    assert!(ok, "{said}\n{}", log());
    relays(G1, SENDER_ADDR, "after rule x was added");
    relays(g3, from3, "from rin3");

    // Once the other relay has gone, rin2 can be had too.
    let exit = other.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    let (ok, said) = reload(&format!("{base}{rule_x}{rule_y}"));
    assert!(ok, "{said}\n{}", log());
    relays(g3, from2, "from rin2");
    relays(g3, from3, "from rin3, still");
    assert_eq!(rules_now(), ["a", "x", "y"]);

    stop_clean(relay, &topo);
}

/// Rules may name interfaces that do not exist yet (VLANs, tunnels and container veths come
/// up later): `--check` warns, the relay starts with those rules idle and brings each to life
/// when its interface appears, an input and an output alike.
#[test]
fn rules_wait_for_interfaces_that_do_not_exist_yet() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const N: u64 = 300;
    let all: BTreeSet<u64> = (0..N).collect();
    let g3 = Ipv4Addr::new(239, 3, 3, 3);
    let topo = Topology::new(2).unwrap();
    topo.relay.exec(&["ip", "link", "del", "rout1"]).unwrap();
    let rules = "\
rules:
  - name: a
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }, { interface: rout1 }]
  - name: later
    input: { interface: rin2, group: 239.3.3.3, port: 5000 }
    outputs: [{ interface: rout0 }]
";
    let dir = std::env::temp_dir().join(relay_tests::netns::unique_name("idle"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rules.yaml");
    std::fs::write(&file, rules).unwrap();
    let check = std::process::Command::new("ip")
        .args(["netns", "exec", topo.relay.name()])
        .arg(relay_bin())
        .arg("--config")
        .arg(&file)
        .arg("--check")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{said}");
    for iface in ["rin2", "rout1"] {
        assert!(
            said.contains(&format!("interface '{iface}' does not exist yet")),
            "--check warns about {iface}: {said}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);

    let relay = RelayProc::start(&relay_bin(), &topo.relay, rules, &[]).unwrap();
    let log = || std::fs::read_to_string(&relay.stderr).unwrap();
    for iface in ["rin2", "rout1"] {
        assert!(
            log().contains(&format!(
                "{iface}: the interface does not exist yet; its rules are idle until it appears"
            )),
            "{}",
            log()
        );
    }
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(
        seqs(&join(rx0).unwrap()),
        all,
        "rule a relays to rout0 meanwhile"
    );
    let v = stats_until(&relay.control, |v| {
        v.rules[0].outputs[1].dropped.get("interface_down") == Some(&N)
    });
    assert_eq!(v.rules[0].outputs[1].dropped["interface_down"], N, "{v:?}");

    // The output appears.
    topo.relink_receiver(1).unwrap();
    wait_log(
        &relay,
        "rout1: the interface has appeared; binding to it",
        1,
    );
    wait_log(&relay, "rebound: 2 rules", 1);
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, G1, 5000, r1.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(seqs(&join(rx0).unwrap()), all, "rout0\n{}", log());
    assert_eq!(
        seqs(&join(rx1).unwrap()),
        all,
        "rout1, once it exists\n{}",
        log()
    );

    // The input appears.
    let from2 = topo.add_ingress("rin2", "snd1", 100).unwrap();
    wait_log(&relay, "rin2: the interface has appeared; binding to it", 1);
    let rx0 = listen(&r0.ns, g3, 5000, r0.addr, Limits::new(N)).unwrap();
    wait_log(&relay, "rebound: 2 rules", 2);
    join(send(&topo.sender, from2, Flow::new(g3, 5000, N))).unwrap();
    assert_eq!(
        seqs(&join(rx0).unwrap()),
        all,
        "rule 'later' relays from rin2\n{}",
        log()
    );

    stop_clean(relay, &topo);
}

/// Every interface of the relay deleted at once (a container pair restarted): no socket is
/// left to share the UMEM through, so the relay starts over on a new one, keeps its counters,
/// and relays again when the interfaces are back.
#[test]
fn every_interface_gone_at_once_starts_over_on_a_new_umem() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const N: u64 = 300;
    let all: BTreeSet<u64> = (0..N).collect();
    let topo = Topology::new(1).unwrap();
    let rules = "\
rules:
  - name: a
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0, port: 6000 }]
";
    let relay = RelayProc::start(&relay_bin(), &topo.relay, rules, &[]).unwrap();
    let log = || std::fs::read_to_string(&relay.stderr).unwrap();
    let r0 = &topo.receivers[0];
    let relays = |when: &str| {
        let rx = listen(&r0.ns, G1, 6000, r0.addr, Limits::new(N)).unwrap();
        join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
        assert_eq!(seqs(&join(rx).unwrap()), all, "{when}\n{}", log());
    };
    relays("at start");
    for round in 1..=2u64 {
        let n = round as usize;
        topo.relay.exec(&["ip", "link", "del", "rin"]).unwrap();
        topo.relay.exec(&["ip", "link", "del", "rout0"]).unwrap();
        wait_log(&relay, "starting over on a new UMEM", n);
        topo.relink_ingress().unwrap();
        topo.relink_receiver(0).unwrap();
        wait_log(
            &relay,
            "rin: the interface is back (a new device); binding to it",
            n,
        );
        wait_log(
            &relay,
            "rout0: the interface is back (a new device); binding to it",
            n,
        );
        std::thread::sleep(Duration::from_millis(600));
        relays(&format!("after starting over {round} times"));
        let v = stats_until(&relay.control, |v| v.rules[0].received >= N * (round + 1));
        assert_eq!(
            v.rules[0].received,
            N * (round + 1),
            "counters carried over: {v:?}"
        );
        assert_eq!(v.rules[0].outputs[0].sent, N * (round + 1), "{v:?}");
    }
    // Each start-over settles the old UMEM's books: every frame back, none leaked.
    let books: Vec<String> = log()
        .lines()
        .filter(|l| l.contains("the old UMEM:"))
        .map(|l| l[l.find("the old UMEM:").unwrap()..].to_owned())
        .collect();
    assert_eq!(books.len(), 2, "{}", log());
    for b in &books {
        assert!(
            b.starts_with("the old UMEM: 4096 frames, ") && b.ends_with(", 0 leaked"),
            "{b}"
        );
    }

    stop_clean(relay, &topo);
}

/// The relay's CPU time (user + system) so far, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// An egress deleted while frames sit in its TX ring: the kernel will never complete them, so
/// a relay that waits for them spins at 100% CPU calling sendto forever. Its socket is closed
/// and the frames taken back instead: the relay idles, and stops with every frame accounted
/// for.
#[test]
fn an_egress_deleted_with_frames_in_flight_does_not_spin() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    let mut flow = Flow::new(G1, 5000, 200_000);
    flow.burst = 256;
    flow.pause = Duration::from_micros(50);
    let sender = send(&topo.sender, SENDER_ADDR, flow);
    std::thread::sleep(Duration::from_millis(300));
    topo.relay.exec(&["ip", "link", "del", "rout1"]).unwrap();
    join(sender).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_time(relay.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(relay.pid()) - before;
    let log = std::fs::read_to_string(&relay.stderr).unwrap();
    assert!(
        used < Duration::from_millis(500),
        "the relay used {used:?} of CPU in 2 s of idling\n{log}"
    );
    assert!(
        log.contains("rout1 queue 0: socket closed, its device is gone"),
        "{log}"
    );
    stop_clean(relay, &topo);
}

/// Every output's frames are all accounted for: what the rule received is what the output
/// sent plus what it dropped, for every reason, exactly.
fn balanced(v: &StatsView) -> bool {
    v.rules.iter().all(|r| {
        r.outputs
            .iter()
            .all(|o| o.sent + o.dropped.values().sum::<u64>() == r.received)
    })
}

/// Outputs deleted and created again under a flow that two workers share (one receives, the
/// other owns an egress, so frames cross between them in lanes while the plan changes): once
/// the traffic has stopped and the counters settled, each output has sent or dropped every
/// frame its rule received, not one fewer.
fn counters_balance_after_churn(allocator: &str) {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const LONG: u64 = 100_000;
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        RULES,
        &["--allocator", allocator, "--workers", "2"],
    )
    .unwrap();
    let log = || std::fs::read_to_string(&relay.stderr).unwrap();
    // About three seconds of traffic, over the deletions and reloads: each publishes a plan,
    // and each plan is a chance for a frame handed over under the old one to be counted under
    // the new.
    let sender = send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, LONG));
    let ctl = relay.control.to_str().unwrap().to_owned();
    for i in 1..=4 {
        std::thread::sleep(Duration::from_millis(100));
        let victim = i % 2;
        let name = &topo.receivers[victim].relay_iface;
        topo.relay.exec(&["ip", "link", "del", name]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        topo.relink_receiver(victim).unwrap();
        for _ in 0..8 {
            let out = std::process::Command::new(relay_bin())
                .args(["reload", "--control", &ctl])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}\n{}", log());
        }
    }
    assert_eq!(join(sender).unwrap(), LONG);
    // The counters settle within a few publications (100 ms each) of the last frame.
    let settled = stats_until(&relay.control, |v| {
        v.rules[0].received == LONG && balanced(v)
    });
    let rule = &settled.rules[0];
    assert_eq!(rule.received, LONG, "{settled:?}\n{}", log());
    for o in &rule.outputs {
        assert_eq!(
            o.sent + o.dropped.values().sum::<u64>(),
            rule.received,
            "{}: sent {} + dropped {:?} against received {}\n{}",
            o.interface,
            o.sent,
            o.dropped,
            rule.received,
            log()
        );
    }
    assert!(
        rule.outputs
            .iter()
            .any(|o| o.dropped.get("interface_down").copied().unwrap_or(0) > 0),
        "the churn happened under traffic: {settled:?}"
    );
    stop_clean(relay, &topo);
}

#[test]
fn counters_balance_after_churn_with_lockfree_pool() {
    counters_balance_after_churn("lockfree");
}

#[test]
fn counters_balance_after_churn_with_mutex_pool() {
    counters_balance_after_churn("mutex");
}
