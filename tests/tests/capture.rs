//! `relay capture` end to end: the pcapng it writes holds each frame as the relay received it
//! (inbound, on the ingress) and as it sent it (rewritten, outbound, on the egress); a
//! capture client that stops reading costs forwarding nothing, and what its queue could not
//! take is counted as capture_dropped; a filter naming what does not run, and a second
//! capture, are refused.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pcap_file::pcapng::{
    Block, PcapNgReader,
    blocks::{
        enhanced_packet::EnhancedPacketOption, interface_description::InterfaceDescriptionOption,
    },
};
use relay::control::{Reply, Request};
use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{SENDER_ADDR, SENDER_ADDR6, SENDER_IF, Topology},
    traffic::{Flow, Limits, check_payload, join, listen, send},
};

mod common;
use common::{G1, G2, inspect, mac_in, mac_of, serial, stats_until, stop_clean};

/// One rule: G1:5000 from rin to rout0 as G2:6000, TTL decremented.
const RULE: &str = "\
rules:
  - name: r
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs:
      - interface: rout0
        group: 239.2.2.2
        port: 6000
";

/// A captured frame: its interface's name, its `epb_flags`, its bytes.
type Frame = (String, u32, Vec<u8>);

/// The frames of a pcapng stream, with the name of the interface each was captured on.
fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut reader = PcapNgReader::new(bytes).expect("a pcapng section header");
    let mut names = Vec::new();
    let mut out = Vec::new();
    while let Some(block) = reader.next_block() {
        match block.expect("whole, well-formed blocks") {
            Block::InterfaceDescription(idb) => {
                assert!(
                    idb.options
                        .contains(&InterfaceDescriptionOption::IfTsResol(9)),
                    "{idb:?}"
                );
                names.push(
                    idb.options
                        .iter()
                        .find_map(|o| match o {
                            InterfaceDescriptionOption::IfName(n) => Some(n.to_string()),
                            _ => None,
                        })
                        .expect("each interface is named"),
                );
            }
            Block::EnhancedPacket(epb) => {
                let [EnhancedPacketOption::Flags(flags)] = epb.options[..] else {
                    panic!("one flags option: {:?}", epb.options);
                };
                assert_eq!(epb.original_len as usize, epb.data.len(), "whole frames");
                out.push((
                    names[epb.interface_id as usize].clone(),
                    flags,
                    epb.data.to_vec(),
                ));
            }
            other => panic!("unexpected block {other:?}"),
        }
    }
    out
}

/// Waits (10 s at most) until `path` holds `what`.
fn wait_file(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(what) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never said {what:?}: {text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks a capture of `--count 20` on a one-output rule with one worker: each datagram as it
/// came in on rin (group, port, TTL or hop limit `received`), then as it went out on the
/// egress (`sent`), in order, the payloads those the harness sent.
fn check_pairs(
    captured: &[Frame],
    topo: &Topology,
    received: (IpAddr, u16, u8),
    sent: (IpAddr, u16, u8),
) {
    assert_eq!(captured.len(), 20, "--count 20");
    let egress = &topo.receivers[0].relay_iface;
    let sender_mac = mac_in(&topo.sender, SENDER_IF);
    let egress_mac = mac_of(topo, egress);
    for (k, pair) in captured.chunks(2).enumerate() {
        let [(in_if, in_flags, in_frame), (out_if, out_flags, out_frame)] = pair else {
            panic!("pairs");
        };
        assert_eq!((in_if.as_str(), *in_flags), ("rin", 0b01), "inbound on rin");
        assert_eq!(
            (out_if.as_str(), *out_flags),
            (egress.as_str(), 0b10),
            "outbound on the egress"
        );
        let (g, p, hops, payload) = inspect(in_frame, sender_mac);
        assert_eq!((g, p, hops), received, "as received");
        assert_eq!(check_payload(&payload), Some(k as u64));
        let (g, p, hops, sent_payload) = inspect(out_frame, egress_mac);
        assert_eq!(
            (g, p, hops),
            sent,
            "as sent: remapped, TTL or hop limit - 1"
        );
        assert_eq!(sent_payload, payload);
    }
}

/// How many lines of `tcpdump -nn -r file` contain each of `what`: the tool operators reach
/// for reads the file too.
fn tcpdump_counts(file: &Path, what: &[&str]) -> Vec<usize> {
    let dump = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let text = String::from_utf8_lossy(&dump.stdout);
    what.iter()
        .map(|w| text.lines().filter(|l| l.contains(w)).count())
        .collect()
}

/// Starts `relay capture --rule RULE --count 20 -w FILE` against `relay`, its stderr into
/// `err`, and returns once it says it captures.
fn capture_rule(relay: &RelayProc, rule: &str, file: &Path, err: &Path) -> std::process::Child {
    let client = Command::new(relay_bin())
        .args(["capture", "--rule", rule, "--count", "20", "-w"])
        .arg(file)
        .arg("--control")
        .arg(&relay.control)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(err).unwrap())
        .spawn()
        .unwrap();
    wait_file(err, &format!("capturing rule '{rule}'"));
    client
}

/// Waits (10 s at most) for a `relay capture --count` client to end.
fn wait_exit(client: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = client.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "relay capture --count did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_capture_holds_each_frame_as_received_and_as_sent() {
    require_root();
    let _serial = serial();
    const N: u64 = 100;
    let topo = Topology::new(1).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULE, &[]).unwrap();
    let r0 = &topo.receivers[0];
    let rx = listen(&r0.ns, G2, 6000, r0.addr, Limits::new(N)).unwrap();

    let dir = relay.config.parent().unwrap().to_path_buf();
    let file = dir.join("r.pcapng");
    let err = dir.join("capture.err");
    let mut client = capture_rule(&relay, "r", &file, &err);
    assert_eq!(
        join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap(),
        N
    );
    let all: BTreeSet<u64> = (0..N).collect();
    let got: BTreeSet<u64> = join(rx)
        .unwrap()
        .iter()
        .map(|p| check_payload(p).unwrap())
        .collect();
    assert_eq!(got, all, "every datagram relayed");
    let status = wait_exit(&mut client);
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    let captured = frames(&std::fs::read(&file).unwrap());
    check_pairs(
        &captured,
        &topo,
        (IpAddr::from(G1), 5000, 8),
        (IpAddr::from(G2), 6000, 7),
    );
    assert_eq!(
        tcpdump_counts(&file, &["> 239.1.1.1.5000: UDP", "> 239.2.2.2.6000: UDP"]),
        [10, 10]
    );

    // Without --count it runs until Ctrl-C, and the file still ends with a whole frame.
    let file = dir.join("all.pcapng");
    let err = dir.join("all.err");
    let mut client = Command::new(relay_bin())
        .args(["capture", "--output", &r0.relay_iface, "-w"])
        .arg(&file)
        .arg("--control")
        .arg(&relay.control)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    wait_file(&err, &format!("capturing output '{}'", r0.relay_iface));
    let rx = listen(&r0.ns, G2, 6000, r0.addr, Limits::new(10)).unwrap();
    let mut flow = Flow::new(G1, 5000, 10);
    flow.first_seq = 1000;
    assert_eq!(join(send(&topo.sender, SENDER_ADDR, flow)).unwrap(), 10);
    assert_eq!(join(rx).unwrap().len(), 10);
    wait_file(&relay.stderr, "capture of output");
    // SAFETY: kill(2) on the child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(client.id() as i32, libc::SIGINT) }, 0);
    let status = client.wait().unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("capture ended"), "{stderr}");
    let seen: Vec<(String, u32, u64)> = frames(&std::fs::read(&file).unwrap())
        .into_iter()
        .map(|(i, f, frame)| {
            let payload = &frame[14 + 20 + 8..];
            (i, f, check_payload(payload).unwrap())
        })
        .collect();
    let expected: Vec<(String, u32, u64)> = (1000..1010)
        .flat_map(|s| [("rin".to_owned(), 1, s), (r0.relay_iface.clone(), 2, s)])
        .collect();
    assert_eq!(
        seen,
        expected,
        "{stderr}\n{}",
        std::fs::read_to_string(&relay.stderr).unwrap()
    );

    // A filter naming what does not run is refused, by name, and writes no file.
    for (args, says) in [
        (&["--rule", "nope"][..], "no rule named 'nope' is running"),
        (
            &["--output", "rin"][..],
            "no rule has an output on interface 'rin'",
        ),
    ] {
        let none = dir.join("none.pcapng");
        let out = Command::new(relay_bin())
            .arg("capture")
            .args(args)
            .arg("-w")
            .arg(&none)
            .arg("--control")
            .arg(&relay.control)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!none.exists(), "{args:?}");
    }
    stop_clean(relay, &topo);
}

/// Asks for a capture of everything and reads the reply line, then nothing more; or the
/// relay's refusal.
fn capture_without_reading(control: &Path) -> Result<UnixStream, String> {
    let stream = UnixStream::connect(control).unwrap();
    let mut line = serde_json::to_string(&Request::Capture {
        filter: Default::default(),
        count: None,
    })
    .unwrap();
    line.push('\n');
    (&stream).write_all(line.as_bytes()).unwrap();
    let mut reply = String::new();
    // Byte by byte: nothing of the stream after the line is taken.
    let mut byte = [0u8; 1];
    while !reply.ends_with('\n') {
        assert_eq!((&stream).read(&mut byte).unwrap(), 1, "{reply}");
        reply.push(byte[0] as char);
    }
    match serde_json::from_str(&reply).unwrap() {
        Reply::Capturing(what) => {
            assert_eq!(what, "every rule's frames");
            Ok(stream)
        }
        Reply::Error(e) => Err(e),
        other => panic!("{other:?}"),
    }
}

#[test]
fn forwarding_keeps_its_rate_while_a_capture_client_does_not_read() {
    require_root();
    let _serial = serial();
    // Two captured frames per datagram, far more than the capture's queue (4096) and the
    // socket's buffer hold while the client reads nothing.
    const N: u64 = 8000;
    let topo = Topology::new(1).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, RULE, &[]).unwrap();
    let r0 = &topo.receivers[0];
    let rx = listen(&r0.ns, G2, 6000, r0.addr, Limits::new(N)).unwrap();
    let stream = capture_without_reading(&relay.control).unwrap();

    // One capture at a time.
    let out = Command::new(relay_bin())
        .args(["capture", "--count", "1", "-w"])
        .arg(relay.config.parent().unwrap().join("second.pcapng"))
        .arg("--control")
        .arg(&relay.control)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("a capture is already running"), "{stderr}");

    assert_eq!(
        join(send(&topo.sender, SENDER_ADDR, Flow::new(G1, 5000, N))).unwrap(),
        N
    );
    let got: BTreeSet<u64> = join(rx)
        .unwrap()
        .iter()
        .map(|p| check_payload(p).unwrap())
        .collect();
    assert_eq!(
        got,
        (0..N).collect(),
        "every datagram delivered while the capture stalled"
    );

    // Now read what the capture took: with what it could not, every frame in and out.
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match (&stream).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    let taken = frames(&bytes).len() as u64;
    let v = stats_until(&relay.control, |v| v.capture_dropped + taken == 2 * N);
    eprintln!("captured {taken} frames, {} not taken", v.capture_dropped);
    assert!(
        v.capture_dropped > 0,
        "the stalled client's queue filled: {v:?}"
    );
    assert_eq!(v.capture_dropped + taken, 2 * N, "taken {taken}: {v:?}");
    let out = &v.rules[0].outputs[0];
    assert_eq!(out.sent, N, "{v:?}");
    assert_eq!(out.dropped.values().sum::<u64>(), 0, "{v:?}");
    drop(stream);
    // The capture ended with its client (which the relay sees within its 20 ms wait): another
    // may start.
    let deadline = Instant::now() + Duration::from_secs(2);
    let again = loop {
        match capture_without_reading(&relay.control) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                assert!(e.contains("a capture is already running"), "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the first capture never ended: {e}"),
        }
    };
    drop(again);
    let exit = stop_clean(relay, &topo);
    assert!(
        exit.stderr.contains("capture of every rule's frames ended"),
        "{}",
        exit.stderr
    );
}

/// The same over IPv6: each datagram as received (its group, port and hop limit) and as
/// sent (remapped, hop limit - 1), in pairs, the checksums valid, and tcpdump reads it.
#[test]
fn a_capture_of_ipv6_holds_each_frame_as_received_and_as_sent() {
    require_root();
    let _serial = serial();
    const N: u64 = 60;
    let g_in: Ipv6Addr = "ff18::1:1".parse().unwrap();
    let g_out: Ipv6Addr = "ff18::2:2".parse().unwrap();
    let topo = Topology::new(1).unwrap();
    let rule = format!(
        "rules:
  - name: r6
    input: {{ interface: rin, group: '{g_in}', port: 5000 }}
    outputs:
      - {{ interface: rout0, group: '{g_out}', port: 6000 }}
"
    );
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &rule, &[]).unwrap();
    let r0 = &topo.receivers[0];
    let rx = listen(&r0.ns, g_out, 6000, r0.addr6, Limits::new(N)).unwrap();
    let dir = relay.config.parent().unwrap().to_path_buf();
    let file = dir.join("r6.pcapng");
    let err = dir.join("capture6.err");
    let status = {
        let mut client = capture_rule(&relay, "r6", &file, &err);
        assert_eq!(
            join(send(&topo.sender, SENDER_ADDR6, Flow::new(g_in, 5000, N))).unwrap(),
            N
        );
        let got: BTreeSet<u64> = join(rx)
            .unwrap()
            .iter()
            .map(|p| check_payload(p).unwrap())
            .collect();
        assert_eq!(got, (0..N).collect(), "every datagram relayed");
        wait_exit(&mut client)
    };
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&err).unwrap()
    );
    let captured = frames(&std::fs::read(&file).unwrap());
    check_pairs(
        &captured,
        &topo,
        (IpAddr::from(g_in), 5000, 8),
        (IpAddr::from(g_out), 6000, 7),
    );
    assert_eq!(
        tcpdump_counts(&file, &["> ff18::1:1.5000: UDP", "> ff18::2:2.6000: UDP"]),
        [10, 10]
    );
    stop_clean(relay, &topo);
}
