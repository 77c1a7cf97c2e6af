//! Overload: a sender flat out into a rule that fans out to eight outputs, far above what the
//! relay can transmit, for 30 s. Every frame the XDP program redirects is either relayed or
//! counted as dropped, memory stays flat, every UMEM frame is back at the end, and a normal
//! flow right after the load is delivered whole.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use relay_tests::{
    genproc::{GenSender, SendSpec, rss_kib},
    netns::require_root,
    relay_proc::{RelayProc, relay_bin, report_value},
    topo::{SENDER_ADDR, Topology},
    traffic::{Flow, Limits, join, listen, send},
};

const GROUP: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
const OUTPUTS: usize = 8;
const LOAD_SECS: u64 = 30;

#[test]
fn overload_drops_are_counted_memory_is_flat_and_it_recovers() {
    require_root();
    let topo = Topology::new(OUTPUTS).unwrap();
    let outputs: String = (0..OUTPUTS)
        .map(|i| format!("      - interface: rout{i}\n"))
        .collect();
    let rules = format!(
        "rules:\n  - name: load\n    input: {{ interface: rin, group: {GROUP}, port: 5000 }}\n    outputs:\n{outputs}"
    );
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &rules, &[]).unwrap();
    let pid = relay.pid();

    let gen_bin = Path::new(env!("CARGO_BIN_EXE_relay-gen"));
    let spec = SendSpec {
        group: GROUP,
        port: 5000,
        source: SENDER_ADDR,
        size: 64,
        rate: 0,
        duration_s: LOAD_SECS as f64,
        cpu: Some(0),
        afxdp: None,
    };
    let sender = GenSender::spawn(gen_bin, &topo.sender, &spec).unwrap();
    // Memory, sampled once the load has settled and every 5 s after.
    std::thread::sleep(Duration::from_secs(5));
    let mut rss = Vec::new();
    for _ in 0..(LOAD_SECS / 5 - 1) {
        rss.push(rss_kib(pid).unwrap());
        std::thread::sleep(Duration::from_secs(5));
    }
    let sent = sender.finish().unwrap();
    rss.push(rss_kib(pid).unwrap());
    eprintln!(
        "offered {:.0} pps for {:.1} s; relay RSS samples (KiB): {rss:?}",
        sent.pps, sent.elapsed_s
    );
    let (lo, hi) = (*rss.iter().min().unwrap(), *rss.iter().max().unwrap());
    assert!(hi - lo <= 1024, "RSS grew under load: {rss:?} KiB");

    // Right after the load: a normal flow arrives whole on every output.
    std::thread::sleep(Duration::from_millis(500));
    let rxs: Vec<_> = topo
        .receivers
        .iter()
        .map(|r| listen(&r.ns, GROUP, 5000, r.addr, Limits::new(200)).unwrap())
        .collect();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(GROUP, 5000, 200))).unwrap();
    for (i, rx) in rxs.into_iter().enumerate() {
        assert_eq!(join(rx).unwrap().len(), 200, "rout{i} after the overload");
    }

    let exit = relay.stop(Duration::from_secs(5)).unwrap();
    assert!(exit.status.success(), "{}\n{}", exit.status, exit.stderr);
    assert!(
        exit.stderr.contains("all 4096 frames accounted for"),
        "{}",
        exit.stderr
    );
    let r = &exit.stdout;
    let v = |filters: &[&str], key: &str| {
        report_value(r, filters, key).unwrap_or_else(|| panic!("no {key} in:\n{r}"))
    };
    let received = v(&["rule=load"], "received");
    // It was overloaded: far less went out than was offered to the eight outputs.
    let total_sent: u64 = (0..OUTPUTS)
        .map(|i| v(&["rule=load", &format!("output=rout{i}")], "sent"))
        .sum();
    assert!(
        (total_sent as f64) < 0.8 * (sent.sent as f64) * OUTPUTS as f64,
        "not an overload: {total_sent} sent of {} x {OUTPUTS}\n{r}",
        sent.sent
    );
    // Every frame the rule received went out on each output or was counted as dropped there.
    for i in 0..OUTPUTS {
        let output = format!("output=rout{i}");
        let out = ["rule=load", output.as_str()];
        assert_eq!(
            v(&out, "sent") + v(&out, "dropped"),
            received,
            "rout{i}: every received frame sent or counted\n{r}"
        );
    }
    // Each received frame was copied for the first seven outputs, or the copy was counted as
    // no_frame there; the eighth output sends the received frame itself.
    let no_frame: u64 = (0..OUTPUTS - 1)
        .map(|i| v(&["rule=load", &format!("output=rout{i}")], "no_frame"))
        .sum();
    assert_eq!(
        v(&["datapath"], "copies") + no_frame,
        received * (OUTPUTS as u64 - 1),
        "{r}"
    );
    // Every frame XDP redirected reached the relay or was counted by the kernel's socket.
    let socket = ["socket=rin"];
    let kernel_drops = v(&socket, "rx_dropped") + v(&socket, "rx_ring_full");
    assert_eq!(
        v(&["xdp"], "redirected"),
        received + kernel_drops,
        "redirected = received + the socket's drops\n{r}"
    );
    assert!(!topo.relay_has_xdp().unwrap());
}
