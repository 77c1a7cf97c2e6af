//! `relay --check` promises "exit 0 if it would run": here each thing that stopped a start
//! after `--check` had said OK — a CPU the relay may not use, zero-copy on a driver without
//! it, a queue another relay holds, a metrics address that cannot be bound, missing
//! capabilities, a control socket in a directory that does not exist — is refused by
//! `--check` in the relay's namespace, with the start's message, naming the file, the key and
//! the value. And a start that fails leaves no control socket file behind.

use std::{
    path::{Path, PathBuf},
    process::Output,
    sync::mpsc,
    time::Duration,
};

use relay_tests::{
    netns::{require_root, unique_name},
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, Topology},
    traffic::{Flow, Limits, join, listen, send},
};

mod common;
use common::{G1, client, ip, seqs, serial, start_refused, stats_until, stop_clean};

const RULES: &str = "\
rules:
  - name: video-a
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs:
      - interface: rout0
      - interface: rout1
        group: 239.2.2.2
        port: 6000
";

/// A directory of its own for a test's files, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("check"));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// Writes a config with its own control socket (so that no test meets another's, or
    /// the machine's /run/relay) unless `yaml` names one.
    fn config(&self, name: &str, yaml: &str) -> PathBuf {
        let yaml = if yaml.contains("control:") {
            yaml.to_owned()
        } else {
            format!("control: {}\n{yaml}", self.control().display())
        };
        let path = self.0.join(name);
        std::fs::write(&path, yaml).unwrap();
        path
    }

    fn control(&self) -> PathBuf {
        self.0.join("control.sock")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `relay --check --config FILE` in the relay's namespace, behind `wrapper` (such as
/// `setpriv ...`) if given.
fn check(topo: &Topology, file: &Path, wrapper: &[&str]) -> Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", topo.relay.name()])
        .args(wrapper)
        .arg(relay_bin())
        .args(["--check", "--config"])
        .arg(file)
        .output()
        .unwrap()
}

/// The one error line a refused `--check` prints; it must have exited 1 and said no OK.
fn check_refused(topo: &Topology, file: &Path, wrapper: &[&str], why: &str) -> String {
    let out = check(topo, file, wrapper);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "--check passes despite {why}:\n{stdout}{stderr}"
    );
    assert!(!stdout.contains("OK"), "{why}: {stdout}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "one error line for {why}:\n{stderr}");
    errors[0].to_owned()
}

/// `yaml` is refused by `--check` and by the start with the one error line `want` (after the
/// file's name, which the start's copy of the file does not share).
fn refused_alike(topo: &Topology, files: &Scratch, yaml: &str, want: &str) {
    let file = files.config(&format!("{}.yaml", unique_name("refused")), yaml);
    let line = check_refused(topo, &file, &[], want);
    assert!(
        line.ends_with(&format!("{}: {want}", file.display())),
        "{line}"
    );
    let line = start_refused(topo, yaml, want);
    assert!(line.ends_with(want), "{line}");
}

/// `relay --check` passes `file`, for `what`; what it printed on standard output.
fn check_passes(topo: &Topology, file: &Path, what: &str) -> String {
    let out = check(topo, file, &[]);
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The README's `cpus: [2, 3]` on a two-CPU machine: any CPU this process may not run on
/// (the relay inherits its affinity) is refused by `--check` with the start's own message.
#[test]
fn check_refuses_cpus_the_relay_may_not_use() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let files = Scratch::new();
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let allowed: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    let beyond = allowed.last().unwrap() + 1;
    assert!(beyond < 1024, "this machine has a CPU for every number");
    let yaml = format!("cpus: [{}, {beyond}]\n{RULES}", allowed[0]);
    let file = files.config("cpus.yaml", &yaml);
    let want = format!(
        "{}: cpus: CPU {beyond} is not available to the relay (it may run on {}): fix `cpus:` \
         or leave it out",
        file.display(),
        relay::sys::cpu_list(&allowed)
    );
    let line = check_refused(&topo, &file, &[], "a CPU it may not use");
    assert!(line.ends_with(&want), "{line}");
    // The start says the same (of its own copy of the file).
    let line = start_refused(&topo, &yaml, "a CPU it may not use");
    assert!(
        line.contains(&want[want.find(": cpus:").unwrap()..]),
        "{line}"
    );
    assert!(!topo.relay_has_xdp().unwrap());
}

/// veth has no zero-copy AF_XDP: `bind: zerocopy` is refused by `--check` (naming the file,
/// the key, the value and the interface, and what to write instead), and `bind: auto` passes
/// with a note that the relay will run in copy mode. Nothing is left attached or bound: a
/// relay starts right after, as the systemd unit starts it after `--check`, without waiting
/// for a queue.
#[test]
fn check_refuses_zerocopy_on_veth_and_notes_copy_mode() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let files = Scratch::new();
    let zc = files.config("zc.yaml", &format!("bind: zerocopy\n{RULES}"));
    let line = check_refused(&topo, &zc, &[], "zero-copy on veth");
    assert!(
        line.ends_with(&format!(
            "{}: bind: zerocopy: rin queue 0 has no zero-copy AF_XDP (the driver has copy mode \
             only): use `bind: auto`, which falls back to copy mode, or `bind: copy`",
            zc.display()
        )),
        "{line}"
    );

    let copy = files.config("copy.yaml", &format!("bind: copy\n{RULES}"));
    let out = check(&topo, &copy, &[]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("note"));

    let auto = files.config("auto.yaml", RULES);
    let out = check(&topo, &auto, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "{}: note: bind: auto: no zero-copy AF_XDP on rin, rout0, rout1 (the driver has \
             copy mode only): the relay will run in copy mode\n",
            auto.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("OK: 1 rules"), "{stdout}");

    assert!(!topo.relay_has_xdp().unwrap(), "--check attaches nothing");
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();
    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(
        !exit.stderr.contains("is busy"),
        "the check left a queue busy:\n{}",
        exit.stderr
    );
}

/// A queue a running relay holds: a second `--check` on the same interfaces is refused,
/// naming the rule, the interface and the queue, and so is a `--check` of the running relay's
/// own file (its control socket answers). The second relay's start is refused too and leaves
/// no control socket file behind; the first relay is unharmed.
#[test]
fn check_refuses_a_queue_a_running_relay_holds() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let files = Scratch::new();
    let first = RelayProc::start(&relay_bin(), &topo.relay, RULES, &[]).unwrap();

    let second = files.config("second.yaml", RULES);
    let line = check_refused(&topo, &second, &[], "a queue another relay holds");
    assert!(
        line.ends_with(&format!(
            "{}: rule 'video-a': input interface rin queue 0 already has an AF_XDP socket \
             bound: is another relay (or AF_XDP program) running on rin? Stop it, or remove rin \
             from this config",
            second.display()
        )),
        "{line}"
    );

    let line = check_refused(&topo, &first.config, &[], "its own running relay");
    assert!(
        line.ends_with(&format!(
            "{}: control: {}: a relay answers there: another relay is running with this \
             control socket (stop it, or set `control:` to another path; to check a changed \
             file against the relay running it: relay reload --dry-run --config FILE)",
            first.config.display(),
            first.control.display()
        )),
        "{line}"
    );

    // The start fails after its control socket was made: the file goes with it.
    let control = files.control();
    let yaml = format!("control: {}\n{RULES}", control.display());
    let line = start_refused(&topo, &yaml, "a queue another relay holds");
    assert!(
        line.contains("already has an AF_XDP socket bound"),
        "{line}"
    );
    assert!(!control.exists(), "{} left behind", control.display());

    assert!(first.control.exists());
    let exit = first.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(
        exit.stderr.contains("all 4096 frames accounted for"),
        "{}",
        exit.stderr
    );
}

/// A start that fails once the control socket exists — zero-copy on veth stops it when it
/// binds its sockets — removes the socket file it made (and today's relay left behind).
#[test]
fn a_failed_start_leaves_no_control_socket() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let files = Scratch::new();
    let control = files.control();
    let yaml = format!("control: {}\nbind: zerocopy\n{RULES}", control.display());
    let line = start_refused(&topo, &yaml, "zero-copy on veth");
    assert!(line.contains("zero-copy AF_XDP is not supported"), "{line}");
    assert!(!control.exists(), "{} left behind", control.display());
    assert!(!topo.relay_has_xdp().unwrap());
    // A stale socket file from a relay that died is replaced, and removed at the end.
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    assert!(control.exists());
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        &format!("control: {}\n{RULES}", control.display()),
        &[],
    )
    .unwrap();
    assert!(relay.stop(Duration::from_secs(3)).unwrap().status.success());
    assert!(
        !control.exists(),
        "a stopped relay removes its control socket"
    );
}

/// A metrics address in use, and one that is not this host's, are refused by `--check` (which
/// binds the address and closes it again) and at start, before anything is attached.
#[test]
fn check_refuses_a_metrics_address_it_cannot_bind() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let files = Scratch::new();
    // Someone else listens on the address, in the relay's namespace.
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let holder = topo.relay.run(move || {
        let listener = std::net::TcpListener::bind("198.18.1.2:9469")?;
        ready_tx.send(()).unwrap();
        let _ = done_rx.recv();
        drop(listener);
        Ok(())
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let in_use = files.config("in-use.yaml", &format!("metrics: 198.18.1.2:9469\n{RULES}"));
    let line = check_refused(&topo, &in_use, &[], "a metrics address in use");
    assert!(
        line.ends_with(&format!(
            "{}: metrics: 198.18.1.2:9469: the address is in use: another program (or another \
             relay) listens there; pick another port",
            in_use.display()
        )),
        "{line}"
    );
    let control = files.control();
    let line = start_refused(
        &topo,
        &format!(
            "control: {}\nmetrics: 198.18.1.2:9469\n{RULES}",
            control.display()
        ),
        "a metrics address in use",
    );
    assert!(line.contains("metrics: 198.18.1.2:9469: the address is in use"));
    assert!(!control.exists(), "{} left behind", control.display());
    assert!(!topo.relay_has_xdp().unwrap());

    let foreign = files.config(
        "foreign.yaml",
        &format!("metrics: 198.18.9.9:9469\n{RULES}"),
    );
    let line = check_refused(&topo, &foreign, &[], "a metrics address of no interface");
    assert!(
        line.ends_with(&format!(
            "{}: metrics: 198.18.9.9:9469: 198.18.9.9 is not an address of this host",
            foreign.display()
        )),
        "{line}"
    );

    done_tx.send(()).unwrap();
    holder.join().unwrap().unwrap();
    let out = check(&topo, &in_use, &[]);
    assert!(
        out.status.success(),
        "free again: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `control:` in a directory that does not exist is refused by `--check` and by the start,
/// naming the file, the key and the value, and the directory is not created.
#[test]
fn control_in_a_missing_directory_is_refused_at_check_and_start() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let files = Scratch::new();
    let dir = files.0.join("missing");
    let control = dir.join("relay.sock");
    let yaml = format!("control: {}\n{RULES}", control.display());
    let file = files.config("missing.yaml", &yaml);
    let want = format!(
        "control: {}: the directory {} does not exist: create it, or leave `control:` out for \
         the default /run/relay/relay.sock",
        control.display(),
        dir.display()
    );
    let line = check_refused(&topo, &file, &[], "a control socket in a missing directory");
    assert!(
        line.ends_with(&format!("{}: {want}", file.display())),
        "{line}"
    );
    let line = start_refused(&topo, &yaml, "a control socket in a missing directory");
    assert!(line.ends_with(&want), "{line}");
    assert!(!dir.exists(), "the relay made {}", dir.display());
    assert!(!topo.relay_has_xdp().unwrap());
}

/// Without the capabilities the relay needs, `--check` stops with the start's one line.
#[test]
fn check_without_privileges_is_refused_like_the_start() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let files = Scratch::new();
    let file = files.config("rules.yaml", RULES);
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ];
    let line = check_refused(&topo, &file, &nobody, "no capabilities at all");
    assert!(
        line.ends_with(
            "the relay lacks CAP_NET_ADMIN, CAP_NET_RAW, CAP_PERFMON, CAP_BPF: run it as root \
             (sudo), or as the relay.service unit, which grants CAP_NET_ADMIN, CAP_NET_RAW, \
             CAP_BPF, CAP_PERFMON and CAP_IPC_LOCK"
        ),
        "{line}"
    );
    let no_raw = [
        "setpriv",
        "--bounding-set",
        "-all,+net_admin,+bpf,+perfmon,+ipc_lock",
        "--",
    ];
    let line = check_refused(&topo, &file, &no_raw, "no CAP_NET_RAW");
    assert!(
        line.contains("the relay lacks CAP_NET_RAW: run it as root"),
        "{line}"
    );
    // With exactly the unit's capabilities it passes.
    let unit = [
        "setpriv",
        "--bounding-set",
        "-all,+net_admin,+net_raw,+bpf,+perfmon,+ipc_lock",
        "--",
    ];
    let out = check(&topo, &file, &unit);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A UMEM too small for its fill rings, worker caches and frames in flight (512 frames with
/// four workers starved fill rings before) is refused by `--check` and the start, naming the
/// minimum; the minimum itself is accepted.
#[test]
fn check_refuses_a_umem_too_small_for_its_workers() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let files = Scratch::new();
    let yaml = format!("umem: {{ frames: 512 }}\nworkers: 4\n{RULES}");
    let file = files.config("small.yaml", &yaml);
    let want = "umem: frames: 512 is too few for 1 ingress queue(s) and 4 worker(s): at least \
                1024 are needed";
    let line = check_refused(&topo, &file, &[], "a UMEM too small");
    assert!(
        line.contains(&format!("{}: {want}", file.display())),
        "{line}"
    );
    let line = start_refused(&topo, &yaml, "a UMEM too small");
    assert!(line.contains(want), "{line}");
    let enough = files.config("enough.yaml", &yaml.replace("frames: 512", "frames: 1024"));
    let out = check(&topo, &enough, &[]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `source: auto` on an interface with no address of the rule's family, and a `source:` the
/// interface does not have: `--check` and the start refuse them, naming the rule, the
/// interface and the value; with the address in place, both pass.
#[test]
fn check_refuses_a_source_the_interface_cannot_send_from() {
    require_root();
    let topo = Topology::new(1).unwrap();
    let dir = Scratch::new();
    topo.relay
        .exec(&["ip", "-4", "addr", "flush", "dev", "rout0"])
        .unwrap();
    let auto = "rules:\n  - name: gw\n    input: { interface: rin, group: 239.1.1.1, port: 5000 }\n    outputs: [{ interface: rout0, destination: 198.18.2.2, source: auto }]\n";
    let file = dir.config("auto.yaml", auto);
    let line = check_refused(&topo, &file, &[], "source: auto without an address");
    assert!(
        line.ends_with(&format!(
            "{}: rule 'gw': output source auto on 'rout0': 'rout0' has no IPv4 address to send \
             from (add one, or name the source)",
            file.display()
        )),
        "{line}"
    );
    let started = start_refused(&topo, auto, "source: auto without an address");
    assert!(started.contains("'rout0' has no IPv4 address"), "{started}");

    let named = dir.config(
        "named.yaml",
        "rules:\n  - name: gw\n    input: { interface: rin, group: 239.1.1.1, port: 5000 }\n    outputs: [{ interface: rout0, destination: 198.18.2.2, source: 198.18.2.1 }]\n",
    );
    let line = check_refused(&topo, &named, &[], "a source rout0 does not have");
    assert!(
        line.contains(
            "rule 'gw': output source 198.18.2.1 is not an address of 'rout0' (it has \
             2001:2:0:2::1"
        ),
        "{line}"
    );

    topo.relay
        .exec(&["ip", "addr", "add", "198.18.2.1/24", "dev", "rout0"])
        .unwrap();
    for f in [&file, &named] {
        let out = check(&topo, f, &[]);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `xdp_mode: native` with an input on a bridge, a macvlan or a vxlan (whose drivers run no
/// XDP of their own, as the kernel's xdp-features say): `--check` refuses it with the reason,
/// naming the file, the rule, the interface, its kind and the key, and the start says the
/// same (it used to pass `--check` and fail at the attach). With `xdp_mode: auto` each passes,
/// and so do the kinds with native XDP (veth, tap) with `xdp_mode: native`.
#[test]
fn check_refuses_native_xdp_on_kinds_without_it() {
    require_root();
    let topo = Topology::new(1).unwrap();
    let files = Scratch::new();
    for cmd in [
        "link add br0 type bridge",
        "link add mv0 link rin type macvlan mode bridge",
        "link add vx0 type vxlan id 42 dstport 4789 dev rin",
        "tuntap add dev tap0 mode tap",
    ] {
        ip(&topo.relay, cmd);
    }
    let rule = |mode: &str, input: &str| {
        format!(
            "xdp_mode: {mode}\nrules:\n  - name: k\n    input: {{ interface: {input}, group: \
             239.1.1.1, port: 5000 }}\n    outputs: [{{ interface: rout0 }}]\n"
        )
    };
    for (input, kind) in [("br0", "bridge"), ("mv0", "macvlan"), ("vx0", "vxlan")] {
        ip(&topo.relay, &format!("link set {input} up"));
        let want = format!(
            "rule 'k': input interface '{input}' (kind {kind}) has no native XDP (its driver \
             does not run XDP programs), so xdp_mode: native cannot attach there; use \
             xdp_mode: auto (native where the driver has it, skb mode elsewhere) or xdp_mode: skb"
        );
        refused_alike(&topo, &files, &rule("native", input), &want);
        let auto = files.config(&format!("{input}-auto.yaml"), &rule("auto", input));
        check_passes(&topo, &auto, &format!("{kind} with xdp_mode: auto"));
    }
    for input in ["rin", "tap0"] {
        let file = files.config(&format!("{input}.yaml"), &rule("native", input));
        check_passes(&topo, &file, &format!("{input} with xdp_mode: native"));
    }
    assert!(!topo.relay_has_xdp().unwrap());
}

/// A tun in L3 mode and loopback carry no Ethernet header: as input or as output each is
/// refused by `--check` and by the start, naming the interface, its link type and kind and
/// what to use instead (a tun was taken for an interface that does not exist yet and its rule
/// idled; loopback was taken as it is). A reload to such a file, or to `xdp_mode: native` on
/// a bridge, is refused the same way and the running rules keep relaying.
#[test]
fn l3_and_loopback_interfaces_are_refused_at_check_start_and_reload() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let files = Scratch::new();
    for cmd in [
        "tuntap add dev tun0 mode tun",
        "link set tun0 up",
        "link add br0 type bridge",
    ] {
        ip(&topo.relay, cmd);
    }
    let tun = "is not an Ethernet interface (link type 65534 (none: an L3 device, its packets \
               have no Ethernet header), kind tun): the XDP program and the rewrite read and \
               write Ethernet frames; use a tap instead of a tun (ip tuntap add mode tap; the \
               program or VM on it then reads and writes Ethernet frames)";
    let lo = "is not an Ethernet interface (link type 772 (loopback), kind none): the XDP \
              program and the rewrite read and write Ethernet frames; use a veth pair or a \
              dummy interface instead of loopback";
    let rule = |input: &str, output: &str| {
        format!(
            "  - name: k\n    input: {{ interface: {input}, group: 239.1.1.2, port: 5000 }}\n    \
             outputs: [{{ interface: {output} }}]\n"
        )
    };
    let cases = [
        (
            "rules:\n".to_owned() + &rule("tun0", "rout0"),
            format!("rule 'k': input interface 'tun0' {tun}"),
        ),
        (
            "rules:\n".to_owned() + &rule("rin", "tun0"),
            format!("rule 'k': output interface 'tun0' {tun}"),
        ),
        (
            "rules:\n".to_owned() + &rule("lo", "rout0"),
            format!("rule 'k': input interface 'lo' {lo}"),
        ),
        (
            "rules:\n".to_owned() + &rule("rin", "lo"),
            format!("rule 'k': output interface 'lo' {lo}"),
        ),
    ];
    for (yaml, want) in &cases {
        refused_alike(&topo, &files, yaml, want);
    }

    // A running relay on rin, asked to reload to each refused file.
    let running = "rules:\n  - name: a\n    input: { interface: rin, group: 239.1.1.1, port: 5000 }\n    outputs: [{ interface: rout0 }]\n";
    let relay = RelayProc::start(&relay_bin(), &topo.relay, running, &[]).unwrap();
    let control = format!("control: {}\n", relay.control.display());
    let native_bridge = (
        format!("xdp_mode: native\n{running}{}", rule("br0", "rout0")),
        "rule 'k': input interface 'br0' (kind bridge) has no native XDP".to_owned(),
    );
    for (yaml, want) in cases
        .iter()
        .map(|(y, w)| (format!("{running}{}", &y["rules:\n".len()..]), w.clone()))
        .chain([native_bridge])
    {
        std::fs::write(&relay.config, format!("{control}{yaml}")).unwrap();
        let (ok, said) = client(&relay.control, &["reload"]);
        assert!(!ok, "the reload passed despite: {want}\n{said}");
        assert!(said.contains(&want), "{said}");
        let v = stats_until(&relay.control, |_| true);
        let names: Vec<&str> = v.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a"], "the running rules stay");
        let r0 = &topo.receivers[0];
        let rx = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(50)).unwrap();
        join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, 50))).unwrap();
        let got = join(rx).unwrap();
        assert_eq!(seqs(&got).len(), 50, "rule a relays after: {want}");
    }
    stop_clean(relay, &topo);
}

/// A veth keeps the tags of frames from its peer in the skb's metadata (rx-vlan-offload on)
/// where only a native-mode program reads them: an input with `vlan:` on it is refused in
/// `xdp_mode: skb` by `--check` and by the start alike, with the fix, and taken in auto and
/// native mode. An input without `vlan:` takes every VLAN, and is taken in skb mode too.
#[test]
fn check_refuses_vlan_inputs_where_the_tag_cannot_be_read() {
    require_root();
    let topo = Topology::new(1).unwrap();
    let files = Scratch::new();
    let rule = |mode: &str, vlan: &str| {
        format!(
            "xdp_mode: {mode}\nrules:\n  - name: k\n    input: {{ interface: rin, group: \
             239.1.1.1, port: 5000{vlan} }}\n    outputs: [{{ interface: rout0 }}]\n"
        )
    };
    for vlan in ["10", "untagged"] {
        let want = format!(
            "rule 'k': input vlan {vlan}: interface 'rin' (kind veth) takes the VLAN tag off the \
             frames it receives (rx-vlan-offload on) into their metadata, which only a \
             native-mode program can read, and xdp_mode is skb: the relay could not tell VLANs \
             apart there, and frames of every VLAN would look untagged; use xdp_mode: auto or \
             native"
        );
        refused_alike(
            &topo,
            &files,
            &rule("skb", &format!(", vlan: {vlan}")),
            &want,
        );
        for mode in ["auto", "native"] {
            let file = files.config(
                &format!("{mode}-{vlan}.yaml"),
                &rule(mode, &format!(", vlan: {vlan}")),
            );
            check_passes(&topo, &file, &format!("vlan {vlan} in xdp_mode: {mode}"));
        }
    }
    let file = files.config("skb-any.yaml", &rule("skb", ""));
    check_passes(&topo, &file, "no vlan: in xdp_mode: skb");
    assert!(!topo.relay_has_xdp().unwrap());
}

/// `--check` in a namespace where not one of the file's interfaces exists (the wrong
/// namespace, or the wrong machine) fails and says so, rather than passing with a warning per
/// interface; where one of them exists, the others are warnings as before.
#[test]
fn check_where_none_of_the_interfaces_exist_fails() {
    require_root();
    let files = Scratch::new();
    let file = files.config("rules.yaml", RULES);
    let elsewhere = relay_tests::netns::Netns::new("nowhere").unwrap();
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            elsewhere.name(),
            relay_bin().to_str().unwrap(),
        ])
        .args(["--check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(!stdout.contains("OK"), "{stdout}");
    assert!(
        stderr.trim_end().ends_with(&format!(
            "{}: none of the 3 interfaces the rules name exists here (rin, rout0, rout1): is \
             this the relay's network namespace (or machine)? Run the check where the relay \
             runs (`ip netns exec NAME relay --config FILE --check`)",
            file.display()
        )),
        "{stderr}"
    );

    // One of them present: the others are warnings, and the check passes.
    let topo = Topology::new(2).unwrap();
    let partly = files.config(
        "partly.yaml",
        &RULES.replace("interface: rout1", "interface: rotu1"),
    );
    let stdout = check_passes(&topo, &partly, "one interface missing of three");
    assert!(
        stdout.contains(&format!(
            "warning: {}: rule 'video-a': output interface 'rotu1' does not exist yet",
            partly.display()
        )),
        "{stdout}"
    );
}
