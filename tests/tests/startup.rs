//! What a start checks and refuses: `--check` against the namespace's interfaces, the
//! capabilities the relay runs with (and the one it lacks named), a second relay on an
//! interface the first holds, and a kernel feature the interface lacks.

use std::time::Duration;

use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, Topology},
    traffic::{Flow, Limits, join, listen, send},
};

mod common;
use common::{G1, RULES, serial, start_refused};

/// `--check` validates against the interfaces of the namespace it runs in.
#[test]
fn check_names_file_rule_and_bad_value() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let dir = std::env::temp_dir().join(relay_tests::netns::unique_name("check"));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, RULES).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, RULES.replace("group: 239.2.2.2", "group: 198.18.2.2")).unwrap();
    let bin = relay_bin();
    let run = |file: &std::path::Path| {
        std::process::Command::new("ip")
            .args(["netns", "exec", topo.relay.name()])
            .arg(&bin)
            .args(["--check", "--config"])
            .arg(file)
            .output()
            .unwrap()
    };
    let ok = run(&good);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK: 1 rules"));
    let fail = run(&bad);
    assert!(!fail.status.success());
    let msg = String::from_utf8_lossy(&fail.stderr);
    assert!(
        msg.contains(&format!(
            "{}: rule 'video-a': output group 198.18.2.2 on 'rout1' is not a multicast address",
            bad.display()
        )),
        "{msg}"
    );
    assert!(!topo.relay_has_xdp().unwrap(), "--check attaches nothing");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay runs with CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF, CAP_PERFMON and CAP_IPC_LOCK
/// alone (what the systemd unit grants), and without any one of the first four it stops with
/// one error that names the capability it lacks.
#[test]
fn runs_with_only_its_capabilities() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let caps = ["net_admin", "net_raw", "bpf", "perfmon", "ipc_lock"];
    let bounding = |keep: &[&str]| {
        let mut set = "-all".to_owned();
        for c in keep {
            set.push_str(&format!(",+{c}"));
        }
        set
    };
    let set = bounding(&caps);
    let relay = RelayProc::start_wrapped(
        &relay_bin(),
        &topo.relay,
        RULES,
        &[],
        &["setpriv", "--bounding-set", &set, "--"],
    )
    .unwrap();
    let r0 = &topo.receivers[0];
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(50)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 50))).unwrap();
    assert_eq!(
        join(rx0).unwrap().len(),
        50,
        "relays with only these capabilities"
    );
    assert!(relay.stop(Duration::from_secs(3)).unwrap().status.success());

    for (missing, named) in [
        ("net_admin", "CAP_NET_ADMIN"),
        ("net_raw", "CAP_NET_RAW"),
        ("bpf", "CAP_BPF"),
        ("perfmon", "CAP_PERFMON"),
    ] {
        let keep: Vec<&str> = caps.iter().copied().filter(|c| *c != missing).collect();
        let set = bounding(&keep);
        let err = match RelayProc::start_wrapped(
            &relay_bin(),
            &topo.relay,
            RULES,
            &[],
            &["setpriv", "--bounding-set", &set, "--"],
        ) {
            Ok(_) => panic!("the relay started without {named}"),
            Err(e) => format!("{e:#}"),
        };
        let errors: Vec<&str> = err.lines().filter(|l| l.contains(" ERROR ")).collect();
        assert_eq!(errors.len(), 1, "one error line without {named}:\n{err}");
        assert!(errors[0].contains(named), "without {named}:\n{err}");
        assert!(
            !topo.relay_has_xdp().unwrap(),
            "nothing left attached without {named}"
        );
    }

    // Not root at all: one line that says what to do.
    let err = match RelayProc::start_wrapped(
        &relay_bin(),
        &topo.relay,
        RULES,
        &[],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
    ) {
        Ok(_) => panic!("the relay started as nobody"),
        Err(e) => format!("{e:#}"),
    };
    let errors: Vec<&str> = err.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains(
            "the relay lacks CAP_NET_ADMIN, CAP_NET_RAW, CAP_PERFMON, CAP_BPF: run it as root"
        ),
        "{err}"
    );
}

/// A second relay on an interface the first one holds, and a kernel feature the interface
/// lacks (zero-copy AF_XDP on veth): each start stops with one error line that names the
/// cause and what to do, exits non-zero, and leaves the running relay and the interfaces as
/// they were.
#[test]
fn second_relay_and_missing_feature_are_refused_clearly() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let first = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();

    let line = start_refused(&topo, RULES, "a second relay on the same interfaces");
    assert!(
        line.contains("is another relay (or AF_XDP program) running on rin? Stop it"),
        "{line}"
    );
    // The first relay is unharmed.
    let r0 = &topo.receivers[0];
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(100)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 100))).unwrap();
    assert_eq!(
        join(rx0).unwrap().len(),
        100,
        "the first relay still relays"
    );
    assert!(first.stop(Duration::from_secs(3)).unwrap().status.success());

    let line = start_refused(
        &topo,
        &format!("bind: zerocopy\n{RULES}"),
        "zero-copy on veth",
    );
    assert!(
        line.contains("zero-copy") && line.contains("not supported") && line.contains("bind: auto"),
        "{line}"
    );
    assert!(!topo.relay_has_xdp().unwrap());
}
