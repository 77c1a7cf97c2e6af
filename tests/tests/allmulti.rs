//! Allmulticast for group ranges: a range cannot be joined group by group, so while a rule
//! with a range receives on an interface the relay puts it into allmulticast mode, and takes
//! it out again when no range needs it (a reload, a remove-rule, the exit), leaving an
//! operator's own allmulticast alone. What it turned on is written beside the control socket,
//! so that the start after a SIGKILL turns off what the killed relay left on. Frames are not
//! looked at here: the flag and the state file are.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use relay_tests::{
    netns::{require_root, sh, unique_name},
    relay_proc::{RelayProc, relay_bin},
    topo::Topology,
};

mod common;
use common::{client, serial, stop_clean, wait_log};

const RANGE: &str = "\
rules:
  - name: range
    input: { interface: rin, group: 239.10.0.0/16, port: 5000 }
    outputs: [{ interface: rout0 }]
";

const EXACT: &str = "\
rules:
  - name: exact
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }]
";

const UPSTREAM: &str = "upstream switches must flood these ranges";

/// Whether `iface` in the relay's namespace is in allmulticast mode: bit 0x200 of its sysfs
/// flags, which must agree with the ALLMULTI that `ip link` lists.
fn allmulti(topo: &Topology, iface: &str) -> bool {
    // The relay may flip the flag between the two reads (it turns it on within half a
    // second of an interface appearing): read both again until they were read on one side
    // of a change, a few times at most.
    for _ in 0..5 {
        if let Some(on) = allmulti_once(topo, iface) {
            return on;
        }
    }
    let said = allmulti_once(topo, iface);
    panic!("{iface}: sysfs and ip link disagree about ALLMULTI five times running: {said:?}");
}

/// The flag as sysfs and `ip link` show it, when they agree.
fn allmulti_once(topo: &Topology, iface: &str) -> Option<bool> {
    let flags = topo
        .relay
        .exec(&["cat", &format!("/sys/class/net/{iface}/flags")])
        .unwrap();
    let bits = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("{iface} flags '{flags}': {e}"));
    let on = bits & 0x200 != 0;
    let link = topo.relay.exec(&["ip", "link", "show", iface]).unwrap();
    let listed = link
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(f, _)| f.split(',').any(|f| f == "ALLMULTI"))
        .unwrap_or_else(|| panic!("no flags in {link}"));
    (on == listed).then_some(on)
}

fn ifindex(topo: &Topology, iface: &str) -> u32 {
    topo.relay
        .exec(&["cat", &format!("/sys/class/net/{iface}/ifindex")])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn state_path(control: &Path) -> PathBuf {
    PathBuf::from(format!("{}.allmulti", control.display()))
}

/// The interfaces the state file beside `control` names (`name ifindex`), or `None` if there
/// is no file.
fn state(control: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(state_path(control)).ok()?;
    assert!(text.starts_with("# relay: "), "{text}");
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_owned)
            .collect(),
    )
}

fn reload(relay: &RelayProc, yaml: &str) -> (bool, String) {
    let control = format!("control: {}\n", relay.control.display());
    std::fs::write(&relay.config, format!("{control}{yaml}")).unwrap();
    client(&relay.control, &["reload"])
}

fn log(relay: &RelayProc) -> String {
    std::fs::read_to_string(&relay.stderr).unwrap()
}

/// Polls (5 s at most) until `iface`'s allmulticast is `on`: the watch that re-applies the
/// rules runs every 0.5 s.
fn wait_allmulti(topo: &Topology, relay: &RelayProc, iface: &str, on: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while allmulti(topo, iface) != on {
        assert!(
            Instant::now() < deadline,
            "{iface}: allmulticast not {on} within 5 s:\n{}",
            log(relay)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn on_while_a_range_runs(allocator: &str) {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    assert!(!allmulti(&topo, "rin"), "off before the relay starts");
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        RANGE,
        &["--allocator", allocator],
    )
    .unwrap();
    assert!(allmulti(&topo, "rin"), "on while the range runs");
    assert!(!allmulti(&topo, "rout0"), "an egress is left alone");
    let rin = ifindex(&topo, "rin");
    assert_eq!(state(&relay.control), Some(vec![format!("rin {rin}")]));
    let said = log(&relay);
    assert_eq!(
        said.matches("rin: allmulticast on, for 239.10.0.0/16")
            .count(),
        1,
        "{said}"
    );
    let upstream: Vec<&str> = said.lines().filter(|l| l.contains(UPSTREAM)).collect();
    assert_eq!(upstream.len(), 1, "{said}");
    assert!(
        upstream[0].contains(" WARN ") && upstream[0].contains("rin: group ranges are received"),
        "{}",
        upstream[0]
    );
    let control = relay.control.clone();
    let exit = stop_clean(relay, &topo);
    assert!(!allmulti(&topo, "rin"), "off after SIGTERM");
    assert_eq!(state(&control), None, "no state file after a clean stop");
    assert!(
        exit.stderr
            .contains("rin: allmulticast off again (the relay stops)"),
        "{}",
        exit.stderr
    );
}

#[test]
fn on_while_a_range_runs_with_lockfree_pool() {
    on_while_a_range_runs("lockfree");
}

#[test]
fn on_while_a_range_runs_with_mutex_pool() {
    on_while_a_range_runs("mutex");
}

/// A reload that removes the last range turns it off; remove-rule and add-rule turn it off
/// and on again; the word about upstream switches is said once for the interface.
#[test]
fn off_when_the_last_range_goes() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let both = format!(
        "{RANGE}  - name: second\n    input: {{ interface: rin, group: 239.20.0.0/24 }}\n    \
         outputs: [{{ interface: rout0 }}]\n"
    );
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &both, &[]).unwrap();
    assert!(allmulti(&topo, "rin"));
    assert!(
        log(&relay).contains("rin: allmulticast on, for 239.10.0.0/16, 239.20.0.0/24"),
        "{}",
        log(&relay)
    );

    // One of two ranges goes: still on.
    let (ok, said) = client(&relay.control, &["remove-rule", "second"]);
    assert!(ok, "{said}");
    assert!(allmulti(&topo, "rin"), "one range is left");

    // The last range goes with a reload.
    let (ok, said) = reload(&relay, EXACT);
    assert!(ok, "{said}\n{}", log(&relay));
    assert!(!allmulti(&topo, "rin"), "off once no range is left");
    assert_eq!(state(&relay.control), None);
    assert!(
        log(&relay)
            .contains("rin: allmulticast off again (no group range is received there any more)"),
        "{}",
        log(&relay)
    );

    // add-rule brings a range back, remove-rule takes it away again.
    let extra = relay.config.with_file_name("extra.yaml");
    std::fs::write(
        &extra,
        "name: back\ninput: { interface: rin, group: 239.30.0.0/16 }\noutputs: [{ interface: rout0 }]\n",
    )
    .unwrap();
    let (ok, said) = client(&relay.control, &["add-rule", extra.to_str().unwrap()]);
    assert!(ok, "{said}");
    assert!(allmulti(&topo, "rin"), "on again with add-rule");
    let rin = ifindex(&topo, "rin");
    assert_eq!(state(&relay.control), Some(vec![format!("rin {rin}")]));
    let (ok, said) = client(&relay.control, &["remove-rule", "back"]);
    assert!(ok, "{said}");
    assert!(!allmulti(&topo, "rin"), "off again with remove-rule");
    assert_eq!(state(&relay.control), None);

    let said = log(&relay);
    assert_eq!(
        said.matches("rin: allmulticast on, for").count(),
        2,
        "{said}"
    );
    assert_eq!(
        said.matches("rin: allmulticast off again").count(),
        2,
        "{said}"
    );
    assert_eq!(said.matches(UPSTREAM).count(), 1, "said once: {said}");
    let exit = stop_clean(relay, &topo);
    assert!(!allmulti(&topo, "rin"));
    assert!(
        !exit.stderr.contains("(the relay stops)"),
        "{}",
        exit.stderr
    );
}

/// An operator's allmulticast, on before the start, is theirs: the relay neither records it
/// nor turns it off, at a reload or at exit.
#[test]
fn an_operators_allmulticast_stays_on() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    topo.relay
        .exec(&["ip", "link", "set", "rin", "allmulticast", "on"])
        .unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RANGE, &[]).unwrap();
    assert!(allmulti(&topo, "rin"));
    assert_eq!(
        state(&relay.control),
        None,
        "nothing of the relay's to record"
    );
    let said = log(&relay);
    assert!(
        said.contains("rin: allmulticast was on already, not by the relay: it stays on at exit"),
        "{said}"
    );
    assert!(!said.contains("rin: allmulticast on, for"), "{said}");
    assert_eq!(said.matches(UPSTREAM).count(), 1, "{said}");

    let (ok, said) = reload(&relay, EXACT);
    assert!(ok, "{said}");
    assert!(allmulti(&topo, "rin"), "a reload leaves the operator's on");
    let (ok, said) = reload(&relay, RANGE);
    assert!(ok, "{said}");
    let exit = stop_clean(relay, &topo);
    assert!(allmulti(&topo, "rin"), "the exit leaves the operator's on");
    assert!(!exit.stderr.contains("allmulticast off"), "{}", exit.stderr);
}

/// The control socket's directory, made for one test and removed after it.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kill(relay: RelayProc) {
    sh(&["kill", "-KILL", &relay.pid().to_string()]).unwrap();
    // Reaps it.
    drop(relay);
}

/// A relay killed with SIGKILL leaves allmulticast on and its state file; the next start on
/// the same control socket keeps it on while its rules need a range there, and turns it off,
/// saying so, when they do not.
#[test]
fn after_sigkill_the_next_start_cleans_up() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let dir = Dir(std::env::temp_dir().join(unique_name("allmulti")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let control = dir.0.join("control.sock");
    let with_control = |yaml: &str| format!("control: {}\n{yaml}", control.display());
    let rin = ifindex(&topo, "rin");
    let recorded = Some(vec![format!("rin {rin}")]);

    let relay = RelayProc::start(&relay_bin(), &topo.relay, &with_control(RANGE), &[]).unwrap();
    assert!(allmulti(&topo, "rin"));
    kill(relay);
    assert!(allmulti(&topo, "rin"), "a killed relay cannot turn it off");
    assert_eq!(state(&control), recorded, "the killed relay's record stays");

    // A start that still needs the range keeps it on, as its own.
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &with_control(RANGE), &[]).unwrap();
    let said = log(&relay);
    assert!(
        said.contains(
            "rin: allmulticast left on by a relay that did not stop cleanly; kept on, as a \
             group range is received there"
        ),
        "{said}"
    );
    assert!(allmulti(&topo, "rin"));
    assert_eq!(state(&control), recorded);
    kill(relay);
    assert!(allmulti(&topo, "rin"));

    // A start that needs no range turns it off and says so.
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &with_control(EXACT), &[]).unwrap();
    let said = log(&relay);
    let lines: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("did not stop cleanly"))
        .collect();
    assert_eq!(lines.len(), 1, "{said}");
    assert!(
        lines[0].contains(" WARN ")
            && lines[0].ends_with(
                "] rin: allmulticast left on by a relay that did not stop cleanly; turned off"
            ),
        "{}",
        lines[0]
    );
    assert!(!allmulti(&topo, "rin"), "turned off by the next start");
    assert_eq!(state(&control), None, "the state file is removed");
    stop_clean(relay, &topo);
    assert!(!allmulti(&topo, "rin"));
}

/// A reload that turns allmulticast on for a new range and then fails (the driver refuses
/// native XDP on a veth behind a jumbo MTU) turns it off again; the running range keeps it on, though the refused
/// file had dropped it.
#[test]
fn a_reload_that_fails_half_way_leaves_allmulticast_as_it_was() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    topo.add_ingress("rin2", "snd1", 100).unwrap();
    common::ingress_refusing_native_xdp(&topo, "rin4", "snd3", 102);
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RANGE, &[]).unwrap();
    let rin = ifindex(&topo, "rin");
    assert!(allmulti(&topo, "rin"));
    assert!(!allmulti(&topo, "rin2"));
    let rule_rin2 = "  - name: r2\n    input: { interface: rin2, group: 239.20.0.0/16, port: 5000 }\n    outputs: [{ interface: rout0 }]\n";
    let rule_jumbo = "  - name: l\n    input: { interface: rin4, group: 239.4.4.4, port: 5000 }\n    outputs: [{ interface: rout0 }]\n";
    let (ok, said) = reload(
        &relay,
        &format!("xdp_mode: native\n{EXACT}{rule_rin2}{rule_jumbo}"),
    );
    assert!(!ok, "{said}");
    assert!(
        said.contains("attaching XDP to rin4 in native mode"),
        "{said}"
    );
    let said = log(&relay);
    assert!(
        said.contains("rin2: allmulticast on, for 239.20.0.0/16")
            && said.contains("rin2: allmulticast off again (the change failed)"),
        "rin2's allmulticast was turned on, then off again: {said}"
    );
    assert!(allmulti(&topo, "rin"), "the running range keeps rin's on");
    assert!(!allmulti(&topo, "rin2"), "rin2's is off again");
    assert_eq!(state(&relay.control), Some(vec![format!("rin {rin}")]));
    let rin4 = topo
        .relay
        .exec(&["ip", "-d", "link", "show", "rin4"])
        .unwrap();
    assert!(!rin4.contains("xdp"), "no XDP left on rin4: {rin4}");
    stop_clean(relay, &topo);
    assert!(!allmulti(&topo, "rin"));
    assert!(!allmulti(&topo, "rin2"));
}

/// An ingress that appears after the start, and one deleted and created again, get
/// allmulticast when the watch binds to them; the state file names the device by its new
/// ifindex.
#[test]
fn interfaces_that_appear_or_come_back_get_it() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let later = format!(
        "{RANGE}  - name: later\n    input: {{ interface: rin2, group: 239.20.0.0/16 }}\n    \
         outputs: [{{ interface: rout0 }}]\n"
    );
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &later, &[]).unwrap();
    assert!(allmulti(&topo, "rin"));

    topo.add_ingress("rin2", "snd1", 100).unwrap();
    wait_log(&relay, "rin2: allmulticast on, for 239.20.0.0/16", 1);
    assert!(allmulti(&topo, "rin2"));
    let (rin, rin2) = (ifindex(&topo, "rin"), ifindex(&topo, "rin2"));
    assert_eq!(
        state(&relay.control),
        Some(vec![format!("rin {rin}"), format!("rin2 {rin2}")])
    );

    topo.relay.exec(&["ip", "link", "del", "rin"]).unwrap();
    topo.relink_ingress().unwrap();
    assert!(!allmulti(&topo, "rin"), "a new device starts without it");
    wait_allmulti(&topo, &relay, "rin", true);
    // The old device's entry goes once the switch is done.
    wait_log(&relay, "rebound: ", 1);
    let new_rin = ifindex(&topo, "rin");
    assert_ne!(new_rin, rin);
    assert_eq!(
        state(&relay.control),
        Some(vec![format!("rin2 {rin2}"), format!("rin {new_rin}")])
    );
    stop_clean(relay, &topo);
    assert!(!allmulti(&topo, "rin"));
    assert!(!allmulti(&topo, "rin2"));
}
