//! A running relay answers its clients: `relay stats`, `relay ping` and the Prometheus
//! endpoint, with the counters of the traffic just relayed.

use std::time::Duration;

use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, Topology},
    traffic::{Flow, Limits, join, listen, send},
};

mod common;
use common::{G1, RULES, serial};

/// `relay stats`, `relay ping` and the Prometheus endpoint answer while the relay runs, with
/// the counters of the traffic just relayed; a malformed request gets an error and changes
/// nothing.
#[test]
fn stats_ping_and_metrics_while_running() {
    use std::io::{BufRead, BufReader, Read, Write};
    require_root();
    let _serial = serial();
    const N: u64 = 200;
    let topo = Topology::new(2).unwrap();
    let rules = format!("metrics: 127.0.0.1:9469\n{RULES}");
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &rules, &[]).unwrap();
    let ctl = relay.control.to_str().unwrap().to_owned();
    let client = |args: &[&str]| {
        let out = std::process::Command::new(relay_bin())
            .args(args)
            .args(["--control", &ctl])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(client(&["ping"]).contains("is running"));

    let r0 = &topo.receivers[0];
    let rx0 = listen(&r0.ns, G1, 5000, r0.addr, Limits::new(N)).unwrap();
    join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap();
    assert_eq!(join(rx0).unwrap().len() as u64, N);

    // Workers publish their counters every 100 ms.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let view: relay::stats::StatsView = loop {
        let v: relay::stats::StatsView =
            serde_json::from_str(&client(&["stats", "--json"])).unwrap();
        if v.rules[0].outputs.iter().all(|o| o.sent == N) || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(view.rules[0].name, "video-a");
    assert_eq!(view.rules[0].received, N);
    assert_eq!(view.rules[0].outputs[0].interface, "rout0");
    assert_eq!(view.rules[0].outputs[1].group, "239.2.2.2");
    assert!(
        view.rules[0].outputs.iter().all(|o| o.sent == N),
        "{view:?}"
    );
    assert_eq!(view.xdp["redirected"], N);
    assert_eq!(view.pool.allocator, "lock-free");
    let table = client(&["stats"]);
    assert!(
        table.contains("video-a") && table.contains("rout1"),
        "{table}"
    );

    // Garbage on the control socket: an error reply, and the relay carries on.
    let sock = std::os::unix::net::UnixStream::connect(&relay.control).unwrap();
    (&sock).write_all(b"{\"cmd\":\"explode\"}\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&sock).read_line(&mut reply).unwrap();
    assert!(reply.contains("error"), "{reply}");
    assert!(client(&["ping"]).contains("is running"));

    // The metrics endpoint listens in the relay's namespace.
    let body = join(topo.relay.run(|| {
        let mut c = std::net::TcpStream::connect("127.0.0.1:9469")?;
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        c.read_to_string(&mut body)?;
        Ok(body)
    }))
    .unwrap();
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(
        body.contains(&format!(
            "relay_output_sent_packets_total{{rule=\"video-a\",output=\"rout1 239.2.2.2:6000\",interface=\"rout1\",group=\"239.2.2.2\"}} {N}"
        )),
        "{body}"
    );
    assert!(body.contains(&format!(
        "relay_rule_received_packets_total{{rule=\"video-a\",interface=\"rin\"}} {N}"
    )));

    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
}
