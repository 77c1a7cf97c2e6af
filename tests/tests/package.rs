//! The Debian package that `cargo xtask package` (and `cargo xtask test`) builds: what it
//! installs, that apt would install it, that it leaves the unit disabled (the example config
//! names placeholder interfaces), that `systemctl reload` goes through `relay reload` (which
//! fails when the relay refuses the file), and that its unit grants the capabilities the
//! namespace harness proved sufficient.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

fn deb() -> PathBuf {
    let p = std::env::var_os("RELAY_DEB")
        .map(PathBuf::from)
        .expect("RELAY_DEB is unset: run `cargo xtask test`, which builds the package first");
    assert!(p.exists(), "{} is missing", p.display());
    p
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn installs_binary_unit_config_and_docs() {
    let deb = deb();
    let listing = run("dpkg-deb", &["-c", deb.to_str().unwrap()]);
    for path in [
        "./usr/bin/relay",
        "./etc/relay/rules.yaml",
        "./usr/lib/systemd/system/relay.service",
        "./usr/share/doc/relay/OPERATIONS.md",
        "./usr/share/relay/grafana/relay.json",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} missing:\n{listing}"
        );
    }
    let conffiles = run("dpkg-deb", &["-f", deb.to_str().unwrap(), "Package"]);
    assert_eq!(conffiles.trim(), "relay");
    let dir = std::env::temp_dir().join(format!("relay-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    run(
        "dpkg-deb",
        &["-R", deb.to_str().unwrap(), dir.to_str().unwrap()],
    );
    let conf = std::fs::read_to_string(dir.join("DEBIAN/conffiles")).unwrap();
    assert_eq!(
        conf.trim(),
        "/etc/relay/rules.yaml",
        "the config survives upgrades"
    );
    // Installed disabled and not started: enabled with the example's eth0/eth1/eth2 it would
    // fail and restart at every boot. (An upgrade keeps what the operator chose:
    // deb-systemd-helper's state.)
    let postinst = std::fs::read_to_string(dir.join("DEBIAN/postinst")).unwrap();
    // The one `enable` is the upgrade's, for a unit the operator had enabled.
    let kept = "if deb-systemd-helper --quiet was-enabled relay.service; then";
    let (_, after) = postinst
        .split_once(kept)
        .unwrap_or_else(|| panic!("{postinst}"));
    let block = &after[..after.find("\n\t\tfi").unwrap()];
    assert!(
        block.contains("deb-systemd-helper enable relay.service"),
        "{postinst}"
    );
    assert_eq!(
        postinst.matches("deb-systemd-helper enable").count(),
        1,
        "{postinst}"
    );
    assert!(!postinst.contains("systemctl start"), "{postinst}");
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");

    // The Grafana dashboard, as in the source tree (whose queries a unit test checks
    // against the exposition).
    let dashboard = std::fs::read(dir.join("usr/share/relay/grafana/relay.json")).unwrap();
    let source = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/relay.json"),
    )
    .unwrap();
    assert!(
        dashboard == source,
        "the packaged dashboard is not packaging/grafana/relay.json"
    );

    // The packaged example parses: only its interface names are placeholders.
    let example = std::fs::read_to_string(dir.join("etc/relay/rules.yaml")).unwrap();
    let cfg = relay::config::Config::parse("rules.yaml", &example).unwrap();
    assert_eq!(cfg.rules[0].outputs.len(), 2);

    // The unit grants exactly the capabilities runs_with_only_its_capabilities relays with.
    let unit = std::fs::read_to_string(dir.join("usr/lib/systemd/system/relay.service")).unwrap();
    let caps = |key: &str| -> BTreeSet<String> {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let want: BTreeSet<String> = [
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_IPC_LOCK",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(caps("AmbientCapabilities="), want);
    assert_eq!(caps("CapabilityBoundingSet="), want);
    // `relay reload` waits for the relay's answer and exits 1 when it refuses the file, so
    // `systemctl reload` fails then (a signal would report success either way); `--strict`
    // refuses a file naming an interface that does not exist (a typo) too.
    let reload: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecReload="))
        .collect();
    assert_eq!(reload, ["/usr/bin/relay reload --strict"], "{unit}");
    assert!(!unit.contains("kill"), "{unit}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn apt_would_install_it() {
    let deb = deb();
    let out = run(
        "apt-get",
        &["install", "--simulate", "-q", deb.to_str().unwrap()],
    );
    assert!(out.contains("Inst relay"), "{out}");
}
