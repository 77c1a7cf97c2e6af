//! The command line against a running relay, as an operator uses it: the client finds the
//! relay's control socket from its config file, `--watch` shows rates that match the traffic,
//! the sockets' and the data path's drop counters are in every view while it runs,
//! `relay rules` shows what each output does, and rules come and go with add-rule and
//! remove-rule, down to none (the relay idles) and back.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use relay::stats::StatsView;
use relay_tests::{
    loadgen::due,
    netns::{Netns, require_root},
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, Topology},
    traffic::{Flow, Limits, join, listen, send},
};

mod common;
use common::{seqs, serial, stats_until, stop_clean};

const G1: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
const METRICS: &str = "127.0.0.1:19469";

/// `relay ARGS` (no `--control`); whether it succeeded, its standard output and error.
fn relay(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(relay_bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn relay_ok(args: &[&str]) -> String {
    let (ok, out, err) = relay(args);
    assert!(ok, "relay {args:?}: {out}{err}");
    out
}

/// Sends to `group`:5000 from the sender at `rate` packets per second for `seconds`, each
/// packet at its due time (late ones go at once, so the average holds).
fn paced(
    ns: &Netns,
    group: Ipv4Addr,
    rate: u64,
    seconds: u64,
) -> std::thread::JoinHandle<anyhow::Result<u64>> {
    ns.run(move || {
        let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(SENDER_ADDR), 0))?;
        sock.set_multicast_ttl_v4(8)?;
        sock.set_multicast_loop_v4(false)?;
        let dst = SocketAddr::new(IpAddr::V4(group), 5000);
        let start = Instant::now();
        let total = rate * seconds;
        for n in 0..total {
            let at = start + due(n, rate);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            sock.send_to(&[0u8; 100], dst)?;
        }
        Ok(total)
    })
}

/// The metrics page, fetched from inside the relay's namespace.
fn scrape(ns: &Netns) -> String {
    join(ns.run(|| {
        let mut conn = std::net::TcpStream::connect(METRICS)?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut page = String::new();
        conn.read_to_string(&mut page)?;
        Ok(page)
    }))
    .unwrap()
}

/// The number in column `col` (whitespace-separated, from 0) of the row that starts with
/// `label` in a `--watch` block.
fn cell(block: &str, label: &str, col: usize) -> f64 {
    let row = block
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no row {label:?} in\n{block}"));
    row.split_whitespace()
        .nth(col)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number in column {col} of {row:?}"))
}

/// `relay stats --config FILE` talks to the relay that file names (a `control:` other than
/// the default) with no `--control`; `--watch 1 --count 2` prints two blocks of rates that
/// match a 2,000 pps flow; the sockets' and the data path's counters are in the table, the
/// JSON and Prometheus while the relay runs; `relay members --watch` repeats its view.
#[test]
fn the_client_reads_the_config_and_watches_rates() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let rules = format!(
        "metrics: {METRICS}\nrules:\n  - name: video\n    input: {{ interface: rin, group: {G1}, port: 5000 }}\n    outputs: [{{ interface: rout0 }}]\n"
    );
    let relay_proc = RelayProc::start(&relay_bin(), &topo.relay, &rules, &[]).unwrap();
    let config = relay_proc.config.to_str().unwrap().to_owned();
    assert_ne!(
        relay_proc.control,
        Path::new(relay::control::DEFAULT_SOCKET),
        "the test relay's socket is not the default one"
    );

    // The workers publish their sockets' counters every 100 ms.
    let v = stats_until(&relay_proc.control, |v| v.sockets.len() == 2);
    assert_eq!(v.sockets.len(), 2, "rin and rout0: {v:?}");
    let table = relay_ok(&["stats", "--config", &config]);
    assert!(table.starts_with("relay pid "), "{table}");
    assert!(
        table.lines().nth(1).unwrap().starts_with("RULE "),
        "{table}"
    );
    assert!(table.contains("video "), "{table}");
    // The sockets' kernel counters while running: one line per socket.
    let socket_lines: Vec<&str> = table.lines().filter(|l| l.starts_with("socket ")).collect();
    assert_eq!(socket_lines.len(), 2, "rin and rout0:\n{table}");
    assert!(
        socket_lines.iter().any(|l| l.starts_with("socket rin ")
            && l.contains("ingress")
            && l.contains("rx_ring_full=0 fill_ring_empty=0")),
        "{table}"
    );
    assert!(
        table.contains("datapath: unmatched=0 malformed=0"),
        "{table}"
    );
    // Before the subcommand, as for running the relay, works the same.
    assert_eq!(
        relay_ok(&["--config", &config, "ping"]).trim(),
        format!("relay {} is running", env!("CARGO_PKG_VERSION"))
    );
    // A file that cannot be read is named.
    let (ok, _, err) = relay(&["stats", "--config", "/nonexistent/rules.yaml"]);
    assert!(!ok);
    assert!(
        err.contains("/nonexistent/rules.yaml: cannot read it"),
        "{err}"
    );

    let v: StatsView =
        serde_json::from_str(&relay_ok(&["stats", "--json", "--config", &config])).unwrap();
    let rin = v.sockets.iter().find(|s| s.interface == "rin").unwrap();
    assert!(rin.ingress);
    assert_eq!(rin.queue, 0);
    assert_eq!(v.unmatched, 0);
    let page = scrape(&topo.relay);
    for needle in [
        "relay_socket_packets_total{interface=\"rin\",queue=\"0\",counter=\"rx_ring_full\"} 0",
        "relay_socket_packets_total{interface=\"rin\",queue=\"0\",counter=\"fill_ring_empty\"} 0",
        "relay_socket_packets_total{interface=\"rin\",queue=\"0\",counter=\"rx_dropped\"} 0",
        "relay_datapath_packets_total{counter=\"unmatched\"} 0",
        "relay_datapath_packets_total{counter=\"malformed\"} 0",
    ] {
        assert!(page.contains(needle), "{needle} in\n{page}");
    }

    // Rates: a flow of 2,000 pps for 7 s, watched over 1 s intervals (counters are up to
    // 100 ms old, so shorter ones are coarser) from its second second on. Stdout is a pipe here, so the blocks are printed one after the other.
    const RATE: u64 = 2000;
    let flow = paced(&topo.sender, G1, RATE, 7);
    std::thread::sleep(Duration::from_millis(1200));
    let watched = relay_ok(&["stats", "--config", &config, "--watch", "1", "--count", "2"]);
    let blocks: Vec<&str> = watched
        .split("rates over the last ")
        .filter(|b| !b.starts_with("relay pid "))
        .collect();
    assert_eq!(blocks.len(), 2, "{watched}");
    assert_eq!(
        watched.matches("relay pid ").count(),
        2,
        "each block names the relay: {watched}"
    );
    assert!(
        !watched.contains('\x1b'),
        "no terminal codes into a pipe: {watched:?}"
    );
    for block in &blocks {
        let seconds: f64 = block.split(' ').next().unwrap().parse().unwrap();
        assert!((0.9..1.5).contains(&seconds), "{block}");
        let received = cell(block, "video ", 3);
        let sent = cell(block, "  -> rout0 ", 3);
        let within = |v: f64| (RATE as f64 * 0.8..=RATE as f64 * 1.2).contains(&v);
        assert!(within(received), "received {received}/s:\n{block}");
        assert!(within(sent), "sent {sent}/s:\n{block}");
        // 100 bytes of payload in a 142-byte frame: bits/s follow packets/s.
        assert!(block.contains("Mbit/s"), "{block}");
        assert_eq!(cell(block, "  -> rout0 ", 6), 0.0, "no drops:\n{block}");
        assert!(
            block.lines().any(|l| l.starts_with("socket/s rin ")
                && l.contains(" queue 0  rx_dropped=0 rx_ring_full=0 fill_ring_empty=0")),
            "{block}"
        );
    }
    // The JSON form: one line of rates per update.
    let lines = relay_ok(&[
        "stats", "--config", &config, "--watch", "1", "--count", "2", "--json",
    ]);
    let updates: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(updates.len(), 2, "{lines}");
    for u in &updates {
        let pps = u["rules"][0]["packets"].as_f64().unwrap();
        assert!(
            (RATE as f64 * 0.8..=RATE as f64 * 1.2).contains(&pps),
            "{u}"
        );
    }
    assert_eq!(join(flow).unwrap(), RATE * 7);

    let members = relay_ok(&[
        "members", "--config", &config, "--watch", "0.2", "--count", "2",
    ]);
    assert_eq!(
        members
            .matches("no on-demand outputs: the relay is querier nowhere")
            .count(),
        2,
        "{members}"
    );
    let (ok, _, err) = relay(&["stats", "--config", &config, "--count", "2"]);
    assert!(
        !ok && err.contains("--watch"),
        "--count needs --watch: {err}"
    );
    stop_clean(relay_proc, &topo);
}

/// add-rule blames the added rule's file for its mistakes and takes a `- name:` item pasted
/// from a config file; `relay rules` shows each output's settings; removing the last rule
/// leaves the relay running idle (no XDP attached), and adding one back relays again; a
/// reload's reply carries its warnings.
#[test]
fn rules_come_and_go_down_to_none_and_back() {
    require_root();
    let _serial = serial();
    const N: u64 = 100;
    let topo = Topology::new(1).unwrap();
    let rules = format!(
        "rules:\n  - name: video a\n    input: {{ interface: rin, group: {G1}, port: 5000 }}\n    outputs: [{{ interface: rout0, group: 239.2.2.2, port: 6000, ttl: 5, dscp: 46 }}]\n"
    );
    let relay_proc = RelayProc::start(&relay_bin(), &topo.relay, &rules, &[]).unwrap();
    let config = relay_proc.config.to_str().unwrap().to_owned();

    let shown = relay_ok(&["rules", "--config", &config]);
    let lines: Vec<&str> = shown.lines().collect();
    assert!(
        lines[1].starts_with("video a ") && lines[1].ends_with("rin 239.1.1.1:5000"),
        "{shown}"
    );
    assert!(
        lines[2].contains("239.2.2.2:6000")
            && lines[2].ends_with("ttl 5, remapped from 239.1.1.1:5000, dscp 46"),
        "{shown}"
    );
    assert_ne!(
        shown,
        relay_ok(&["stats", "--config", &config]),
        "not the stats table"
    );

    let dir = std::env::temp_dir().join(relay_tests::netns::unique_name("cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("extra.yaml");
    std::fs::write(
        &bad,
        "name: extra\ninput: { interface: rin, group: 239.3.3.3 }\noutputs: [{ interface: rout0, dscp: 99 }]\n",
    )
    .unwrap();
    let (ok, _, err) = relay(&["add-rule", bad.to_str().unwrap(), "--config", &config]);
    assert!(!ok);
    assert!(
        err.contains(&format!("{}: rule 'extra': ", bad.display())) && err.contains("99"),
        "the added rule's file, rule and value: {err}"
    );
    assert!(!err.contains(&config), "not the main file: {err}");
    let two = dir.join("two.yaml");
    std::fs::write(
        &two,
        "- name: x\n  input: { interface: rin, group: 239.3.3.3 }\n  outputs: [{ interface: rout0 }]\n- name: y\n  input: { interface: rin, group: 239.4.4.4 }\n  outputs: [{ interface: rout0 }]\n",
    )
    .unwrap();
    let (ok, _, err) = relay(&["add-rule", two.to_str().unwrap(), "--config", &config]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}: a list of 2 rules (x, y): add-rule adds one at a time",
            two.display()
        )),
        "{err}"
    );
    // A `- name:` item pasted from a config file is one rule.
    let item = dir.join("item.yaml");
    std::fs::write(
        &item,
        "  - name: item\n    input: { interface: rin, group: 239.3.3.3, port: 5000 }\n    outputs: [{ interface: rout0 }]\n",
    )
    .unwrap();
    let said = relay_ok(&["add-rule", item.to_str().unwrap(), "--config", &config]);
    assert_eq!(said.trim(), "done: 2 rules (1 added, 0 removed, 0 changed)");

    // Down to no rules: the relay keeps running, idle, with nothing attached.
    relay_ok(&["remove-rule", "item", "--config", &config]);
    let said = relay_ok(&["remove-rule", "video a", "--config", &config]);
    assert_eq!(
        said.trim(),
        "done: 0 rules (0 added, 1 removed, 0 changed); the relay is idle until a rule is added"
    );
    assert!(
        !topo.relay_has_xdp().unwrap(),
        "idle: no XDP program attached"
    );
    assert!(relay_ok(&["rules", "--config", &config]).starts_with("no rules: the relay is idle"),);
    let (ok, _, err) = relay(&["remove-rule", "video a", "--config", &config]);
    assert!(
        !ok && err.contains("no rule named 'video a' (the running rules: none)"),
        "{err}"
    );

    // And back: a rule added to the idle relay relays.
    let back = dir.join("back.yaml");
    std::fs::write(
        &back,
        format!("name: back\ninput: {{ interface: rin, group: {G1}, port: 5000 }}\noutputs: [{{ interface: rout0 }}]\n"),
    )
    .unwrap();
    relay_ok(&["add-rule", back.to_str().unwrap(), "--config", &config]);
    let r0 = &topo.receivers[0];
    let rx = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(
        seqs(&join(rx).unwrap()).len() as u64,
        N,
        "relayed after the add"
    );
    let v = stats_until(&relay_proc.control, |v| {
        v.rules.first().is_some_and(|r| r.received == N)
    });
    assert_eq!(v.rules[0].name, "back");

    // A reload that changes a setting needing a restart says so in its reply.
    let file = std::fs::read_to_string(&relay_proc.config).unwrap();
    std::fs::write(&relay_proc.config, format!("metrics: {METRICS}\n{file}")).unwrap();
    let said = relay_ok(&["reload", "--config", &config]);
    assert!(
        said.contains(&format!(
            "; warning: {config}: `metrics` changed; it takes effect at the next start"
        )),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    stop_clean(relay_proc, &topo);
}

/// Whether `line` is a log line (`[2026-... ERROR relay] ...`) rather than a plain message.
fn logged(text: &str) -> bool {
    text.lines().any(|l| {
        l.starts_with('[')
            && [" ERROR ", " WARN ", " INFO "]
                .iter()
                .any(|lv| l.contains(lv))
    })
}

/// A client's error is a plain message, without the timestamp and level of a log line.
#[test]
fn client_errors_are_plain_messages() {
    let (ok, out, err) = relay(&["ping", "--control", "/nonexistent/relay.sock"]);
    assert!(!ok, "{out}");
    assert!(
        err.starts_with("connecting to /nonexistent/relay.sock (is the relay running"),
        "{err}"
    );
    assert!(!logged(&err), "{err}");
    let (ok, _, err) = relay(&["stats", "--config", "/nonexistent/rules.yaml"]);
    assert!(!ok);
    assert!(
        err.starts_with("/nonexistent/rules.yaml: cannot read it"),
        "{err}"
    );
}

/// `relay ARGS` with its standard output a pipe whose reader has already gone (`| head`
/// that has its lines); how it exited and its standard error.
fn into_closed_pipe(args: &[&str]) -> (std::process::ExitStatus, String) {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = std::process::Command::new(relay_bin())
        .args(args)
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `relay stats` names the relay that answered (pid and config file, and whether it runs in
/// another network namespace than the command), in the table and the JSON; a client whose
/// standard output closes ends quietly with 0, once or `--watch`ed (`| head`); the relay
/// logs a client that went away before its reply at debug, not as a warning.
#[test]
fn the_answering_relay_is_named_and_a_closed_pipe_ends_quietly() {
    use std::io::BufRead;
    require_root();
    let _serial = serial();
    let topo = Topology::new(1).unwrap();
    let rules = format!(
        "rules:\n  - name: video\n    input: {{ interface: rin, group: {G1}, port: 5000 }}\n    outputs: [{{ interface: rout0 }}]\n"
    );
    let relay_proc = RelayProc::start(&relay_bin(), &topo.relay, &rules, &[]).unwrap();
    let config = relay_proc.config.to_str().unwrap().to_owned();
    let pid = relay_proc.pid();

    // From this (the host's) namespace: the relay runs in another.
    let table = relay_ok(&["stats", "--config", &config]);
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with(&format!(
            "relay pid {pid}, config {config}, network namespace net:["
        )) && header
            .ends_with(" (not this command's: another relay than the one here may have answered)"),
        "{table}"
    );
    // From the relay's own namespace: no note.
    let here = topo
        .relay
        .exec(&[relay_bin().to_str().unwrap(), "stats", "--config", &config])
        .unwrap();
    let header = here.lines().next().unwrap();
    assert!(
        header.starts_with(&format!(
            "relay pid {pid}, config {config}, network namespace net:["
        )) && header.ends_with(']'),
        "{here}"
    );
    let v: StatsView =
        serde_json::from_str(&relay_ok(&["stats", "--json", "--config", &config])).unwrap();
    let id = v.relay.expect("the answering relay in the JSON");
    assert_eq!((id.pid, id.config.as_str()), (pid, config.as_str()));
    assert!(
        id.netns.as_deref().is_some_and(|n| header.contains(n)),
        "{id:?}"
    );

    // A closed standard output: exit 0, nothing said.
    for args in [
        vec!["stats", "--config", &config],
        vec![
            "stats", "--config", &config, "--watch", "0.1", "--count", "3",
        ],
        vec![
            "stats", "--json", "--config", &config, "--watch", "0.1", "--count", "3",
        ],
    ] {
        let (status, err) = into_closed_pipe(&args);
        assert!(
            status.success() && err.is_empty(),
            "{args:?}: {status}: {err}"
        );
    }
    // `| head -n 1` on an endless --watch: it ends once head has gone.
    let mut watch = std::process::Command::new(relay_bin())
        .args(["stats", "--config", &config, "--watch", "0.1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(watch.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with(&format!("relay pid {pid}, ")), "{first}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = watch.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            let _ = watch.wait();
            panic!("--watch went on after its reader had gone");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    watch
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success() && err.is_empty(), "{status}: {err}");

    // Clients that hang up before the reply: the relay carries on, and says nothing at
    // info or above about them.
    for _ in 0..5 {
        let sock = std::os::unix::net::UnixStream::connect(&relay_proc.control).unwrap();
        (&sock).write_all(b"{\"cmd\":\"stats\"}\n").unwrap();
        drop(sock);
    }
    // Served one at a time: when this is answered, the ones before it were.
    relay_ok(&["ping", "--config", &config]);
    let log = std::fs::read_to_string(&relay_proc.stderr).unwrap();
    assert!(!log.contains("control client"), "{log}");
    assert!(!logged(&table) && !table.contains("Broken pipe"));
    stop_clean(relay_proc, &topo);
}
