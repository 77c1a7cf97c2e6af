//! Changes to the running rules: hot reload, by `relay reload` and by SIGHUP, that loses no
//! packet of the rules that stay, and rules added and removed at runtime; a refused change
//! leaves the running rules as they were.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use relay_tests::{
    netns::{require_root, sh},
    relay_proc::{RelayProc, relay_bin, report_value},
    topo::{SENDER_ADDR, Topology},
    traffic::{Flow, Limits, join, listen, send},
};

mod common;
use common::{G1, G2, RULES, client, client_ok, seqs, serial};

/// Hot reload: a steady flow on a rule that stays loses no packet across 20 reloads (by
/// `relay reload` and by SIGHUP) that add and remove another rule; the added rule starts, the
/// removed one stops, and a broken file is refused with the running rules kept.
#[test]
fn reload_keeps_unchanged_rules_lossless() {
    reload_lossless(1);
}

/// The same with two workers, where frames for rout0 cross to the other worker's lane while
/// the plan changes under both.
#[test]
fn reload_keeps_unchanged_rules_lossless_across_workers() {
    reload_lossless(2);
}

fn reload_lossless(workers: usize) {
    require_root();
    let _serial = serial();
    const N: u64 = 64_000;
    const G3: Ipv4Addr = Ipv4Addr::new(239, 3, 3, 3);
    let topo = Topology::new(2).unwrap();
    let w = workers.to_string();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &["--workers", &w]).unwrap();
    let base = std::fs::read_to_string(&relay.config).unwrap();
    let with_extra = format!(
        "{base}  - name: extra\n    input: {{ interface: rin, group: 239.3.3.3, port: 5000 }}\n    outputs:\n      - interface: rout1\n"
    );
    let ctl = relay.control.to_str().unwrap().to_owned();
    let reload = || {
        std::process::Command::new(relay_bin())
            .args(["reload", "--control", &ctl])
            .output()
            .unwrap()
    };
    let (r0, r1) = (&topo.receivers[0], &topo.receivers[1]);

    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    let rx1 = listen(&r1.ns, G2, 6000, r1.addr, Limits::new(N)).unwrap();
    let sender = send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N));
    for i in 0..20 {
        let yaml = if i % 2 == 0 { &with_extra } else { &base };
        std::fs::write(&relay.config, yaml).unwrap();
        if i == 7 {
            sh(&["kill", "-HUP", &relay.pid().to_string()]).unwrap();
            std::thread::sleep(Duration::from_millis(60));
        } else {
            let out = reload();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{said}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(said.starts_with("done: "), "{said}");
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    assert_eq!(join(sender).unwrap(), N);
    let all: BTreeSet<u64> = (0..N).collect();
    assert_eq!(
        seqs(&join(rx0).unwrap()),
        all,
        "no loss on the unchanged rule, output 0"
    );
    assert_eq!(
        seqs(&join(rx1).unwrap()),
        all,
        "no loss on the unchanged rule, output 1"
    );

    // The last reload (i = 19) left the base rules: 239.3.3.3 is not relayed.
    let none = listen(&r1.ns, G3, 5000, r1.addr, Limits::new(1)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G3, 5000, 50))).unwrap();
    assert!(join(none).unwrap().is_empty(), "a removed rule stops");

    std::fs::write(&relay.config, &with_extra).unwrap();
    assert!(reload().status.success());
    let some = listen(&r1.ns, G3, 5000, r1.addr, Limits::new(50)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G3, 5000, 50))).unwrap();
    assert_eq!(join(some).unwrap().len(), 50, "an added rule starts");

    // A file that does not validate is refused with --check's message; the rules stay.
    std::fs::write(
        &relay.config,
        with_extra.replace("group: 239.3.3.3", "group: 198.18.3.3"),
    )
    .unwrap();
    let out = reload();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("input group 198.18.3.3 is not a multicast address"),
        "{err}"
    );
    let still = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(20)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 20))).unwrap();
    assert_eq!(
        join(still).unwrap().len(),
        20,
        "the running rules stay after a refused reload"
    );

    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert_eq!(
        report_value(&exit.stdout, &["frames"], "leaked"),
        Some(0),
        "{}",
        exit.stdout
    );
    for said in [
        "reload: 2 rules (1 added, 0 removed, 0 changed)",
        "reload: 1 rules (0 added, 1 removed, 0 changed)",
        "SIGHUP: 1 rules (0 added, 1 removed, 0 changed)",
        "reload refused, the running rules stay",
    ] {
        assert!(exit.stderr.contains(said), "{said}\n{}", exit.stderr);
    }
}

/// `relay add-rule` and `relay remove-rule` change the running rules (validated like a
/// reload); refused changes leave everything as it was.
#[test]
fn add_and_remove_rules_at_runtime() {
    require_root();
    let _serial = serial();
    const G3: Ipv4Addr = Ipv4Addr::new(239, 3, 3, 3);
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    let ctl = relay.control.to_str().unwrap().to_owned();
    let dir = relay.config.parent().unwrap().to_owned();
    let run = |args: &[&str]| {
        std::process::Command::new(relay_bin())
            .args(args)
            .args(["--control", &ctl])
            .output()
            .unwrap()
    };
    let fragment = dir.join("extra.yaml");
    std::fs::write(
        &fragment,
        "name: extra\ninput: { interface: rin, group: 239.3.3.3, port: 5000 }\noutputs:\n  - interface: rout1\n",
    )
    .unwrap();
    let out = run(&["add-rule", fragment.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "done: 2 rules (1 added, 0 removed, 0 changed)"
    );
    let r1 = &topo.receivers[1];
    let rx = listen(&r1.ns, G3, 5000, r1.addr, Limits::new(30)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G3, 5000, 30))).unwrap();
    assert_eq!(join(rx).unwrap().len(), 30, "the added rule relays");

    // The same rule again: a duplicate name, refused.
    let out = run(&["add-rule", fragment.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rule 'extra': duplicate rule name"));
    // Not a rule at all.
    std::fs::write(
        &fragment,
        "name: bad\ninput: { interface: rin, group: 239.4.4.4, prot: 1 }\noutputs: []\n",
    )
    .unwrap();
    let out = run(&["add-rule", fragment.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `prot`"));

    let out = run(&["remove-rule", "extra"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let none = listen(&r1.ns, G3, 5000, r1.addr, Limits::new(1)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G3, 5000, 30))).unwrap();
    assert!(join(none).unwrap().is_empty(), "the removed rule stops");
    let out = run(&["remove-rule", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rule named 'nope'"));

    // video-a was never disturbed.
    let r0 = &topo.receivers[0];
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(20)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 20))).unwrap();
    assert_eq!(join(rx0).unwrap().len(), 20);
    assert!(relay.stop(Duration::from_secs(3)).unwrap().status.success());
}

/// The running relay's file with `from` replaced by `to` (its `control:` line kept).
fn edit(relay: &RelayProc, from: &str, to: &str) {
    let text = std::fs::read_to_string(&relay.config).unwrap();
    assert!(text.contains(from), "{from} in\n{text}");
    std::fs::write(&relay.config, text.replace(from, to)).unwrap();
}

/// `count` packets of G1 sent; how many reached receiver 1 (rout1, remapped to G2 port 6000).
fn delivered_on_rout1(topo: &Topology, count: u64) -> usize {
    let r1 = &topo.receivers[1];
    let rx = listen(&r1.ns, G2, 6000, r1.addr, Limits::new(count)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, count))).unwrap();
    join(rx).unwrap().len()
}

/// An output interface with a typo (`rotu1` for `rout1`) still parses and validates: the
/// reload and add-rule say so in their reply and in the relay's log, and with `--strict` they
/// refuse it (exit 1) and the output keeps flowing; without, it is applied, as before.
#[test]
fn a_typo_in_an_output_interface_is_warned_about_and_refused_with_strict() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    let file = relay.config.display().to_string();
    let warning = format!(
        "{file}: rule 'video-a': output interface 'rotu1' does not exist yet: this output \
         drops its frames (interface_down) until it appears"
    );
    edit(&relay, "interface: rout1", "interface: rotu1");

    let (ok, said) = client(&relay.control, &["reload", "--strict"]);
    assert!(!ok, "--strict reload of a typo succeeded: {said}");
    assert!(
        said.contains(&format!("--strict: refused for 1 warning: {warning}")),
        "{said}"
    );
    assert_eq!(delivered_on_rout1(&topo, 20), 20, "the running rules stay");

    let said = client_ok(&relay.control, &["reload"]);
    assert_eq!(
        said.trim(),
        format!("done: 1 rules (0 added, 0 removed, 1 changed)\nwarning: {warning}")
    );
    assert_eq!(
        delivered_on_rout1(&topo, 20),
        0,
        "applied: rout1 is no output now"
    );

    // One rule added by hand: its own file is named.
    let fragment = relay.config.parent().unwrap().join("typo.yaml");
    std::fs::write(
        &fragment,
        "name: extra\ninput: { interface: rin, group: 239.3.3.3, port: 5000 }\noutputs:\n  - interface: rout0\n  - interface: ruot1\n",
    )
    .unwrap();
    let fragment = fragment.to_str().unwrap();
    let added = format!(
        "{fragment}: rule 'extra': output interface 'ruot1' does not exist yet: this output \
         drops its frames (interface_down) until it appears"
    );
    let (ok, said) = client(&relay.control, &["add-rule", "--strict", fragment]);
    assert!(!ok, "--strict add-rule of a typo succeeded: {said}");
    assert!(said.contains(&added), "{said}");
    let said = client_ok(&relay.control, &["add-rule", fragment]);
    assert_eq!(
        said.trim(),
        format!("done: 2 rules (1 added, 0 removed, 0 changed)\nwarning: {added}")
    );

    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success());
    for w in [&warning, &added] {
        assert!(
            exit.stderr
                .lines()
                .any(|l| l.contains(" WARN ") && l.ends_with(w.as_str())),
            "the log warns {w}:\n{}",
            exit.stderr
        );
    }
}

/// Edit, dry run, reload: `--check` of the running relay's file cannot be run (its socket
/// answers, its queues are held), so `relay reload --dry-run` has the running relay validate
/// its file as a reload would and say what would change, applying nothing; a file it would
/// refuse fails the dry run, and so do warnings with `--strict`.
#[test]
fn a_dry_run_says_what_a_reload_would_change_and_changes_nothing() {
    require_root();
    let _serial = serial();
    const G3: Ipv4Addr = Ipv4Addr::new(239, 3, 3, 3);
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    let file = relay.config.display().to_string();
    let config = ["--config", file.as_str()];
    let dry = |more: &[&str]| client(&relay.control, &[&["reload", "--dry-run"], more].concat());

    // Unchanged.
    let (ok, said) = dry(&config);
    assert!(ok, "{said}");
    assert_eq!(
        said.trim(),
        format!(
            "{file}: valid, nothing applied; a reload would run 1 rules: 0 added, 0 removed, 0 \
             changed"
        )
    );
    // A rule added, the other's TTL changed.
    edit(&relay, "ttl: 16", "ttl: 8");
    let text = std::fs::read_to_string(&relay.config).unwrap();
    std::fs::write(
        &relay.config,
        format!(
            "{text}  - name: extra\n    input: {{ interface: rin, group: 239.3.3.3, port: 5000 }}\n    outputs: [{{ interface: rout1 }}]\n"
        ),
    )
    .unwrap();
    let (ok, said) = dry(&config);
    assert!(ok, "{said}");
    assert_eq!(
        said.trim(),
        format!(
            "{file}: valid, nothing applied; a reload would run 2 rules: 1 added (extra), 0 \
             removed, 1 changed (video-a)"
        )
    );
    let r1 = &topo.receivers[1];
    let none = listen(&r1.ns, G3, 5000, r1.addr, Limits::new(1)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G3, 5000, 20))).unwrap();
    assert!(
        join(none).unwrap().is_empty(),
        "the dry run applied nothing"
    );

    // Another file than the relay's: refused, not answered for the relay's own.
    let other = relay.config.with_file_name("other.yaml");
    std::fs::copy(&relay.config, &other).unwrap();
    let (ok, said) = dry(&["--config", other.to_str().unwrap()]);
    assert!(!ok, "{said}");
    assert!(
        said.contains(&format!(
            "a reload would be refused: this relay reloads {file}, not {}",
            other.display()
        )),
        "{said}"
    );

    // A typo: a warning, and with --strict, a failure.
    edit(&relay, "interface: rout1 }", "interface: rotu1 }");
    let warning = format!(
        "warning: {file}: rule 'extra': output interface 'rotu1' does not exist yet: this \
         output drops its frames (interface_down) until it appears"
    );
    let (ok, said) = dry(&config);
    assert!(ok, "{said}");
    assert!(said.trim().ends_with(&warning), "{said}");
    let (ok, said) = dry(&[&config[..], &["--strict"]].concat());
    assert!(!ok, "{said}");
    assert!(
        said.contains("a reload would be refused: --strict"),
        "{said}"
    );

    // A file a reload would refuse.
    edit(&relay, "group: 239.3.3.3", "group: 239.3.3.3, prot: 1");
    let (ok, said) = dry(&config);
    assert!(!ok, "{said}");
    assert!(
        said.contains("a reload would be refused: ") && said.contains("unknown field `prot`"),
        "{said}"
    );

    // Fixed, then reloaded: the reload does what the dry run said.
    edit(&relay, "group: 239.3.3.3, prot: 1", "group: 239.3.3.3");
    edit(&relay, "interface: rotu1 }", "interface: rout1 }");
    let said = client_ok(&relay.control, &["reload"]);
    assert_eq!(said.trim(), "done: 2 rules (1 added, 0 removed, 1 changed)");
    let rx = listen(&r1.ns, G3, 5000, r1.addr, Limits::new(20)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G3, 5000, 20))).unwrap();
    assert_eq!(join(rx).unwrap().len(), 20, "the reload applied it");
    assert!(relay.stop(Duration::from_secs(3)).unwrap().status.success());
}
