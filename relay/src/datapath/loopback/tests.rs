//! The worker's logic over in-memory sockets, without root: the real rule table, pools,
//! workers, lanes and shutdown books, with frames checked byte for byte against ones built
//! from scratch.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use super::*;
use crate::{
    config::{Config, StaticSystem},
    craft::{UdpFrame, build_udp_frame},
};

const ALLOCATORS: [AllocatorKind; 2] = [AllocatorKind::Lockfree, AllocatorKind::Mutex];

fn system() -> StaticSystem {
    StaticSystem::new(&[
        ("in0", 10),
        ("out0", 11),
        ("out1", 12),
        ("out2", 13),
        ("out3", 14),
    ])
}

fn table(yaml: &str) -> RuleTable {
    let cfg = Config::parse("rules.yaml", yaml).unwrap();
    RuleTable::compile(&cfg, "rules.yaml", &system()).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Frame `n` of a test: its payload says which it is, and its length varies.
fn sent(group: &str, source: &str, port: u16, ttl: u8, n: usize) -> UdpFrame {
    let payload: Vec<u8> = (0..16 + n % 48).map(|i| (n + i) as u8).collect();
    UdpFrame::simple(ip(source), ip(group), port, ttl, &payload)
}

/// `f` as the relay sends it on interface `ifindex` of the fixed system.
fn relayed(f: &UdpFrame, ifindex: u8, group: &str, port: u16, ttl: u8) -> Vec<u8> {
    build_udp_frame(&UdpFrame {
        src_mac: [0x02, 0, 0, 0, 0, ifindex],
        group: ip(group),
        dst_port: port,
        ttl,
        ..f.clone()
    })
}

fn options(allocator: AllocatorKind, workers: usize, frames: u32) -> Options {
    Options {
        frames,
        frame_size: 2048,
        allocator,
        workers,
        sleep: false,
    }
}

/// Every frame is back in the pool, or on a fill ring: none on a TX ring, none lost, none
/// given back twice.
fn assert_books(out: &Outcome, frames: u32) {
    let a = out.account;
    assert_eq!(a.frames, frames as usize);
    assert_eq!(a.leaked(), 0, "{a:?}");
    assert_eq!(a.in_tx, 0, "{a:?}");
    assert_eq!(a.abandoned, 0, "{a:?}");
    assert_eq!(a.in_pool + a.in_fill, a.frames, "{a:?}");
    assert_eq!(out.pool.free, a.in_pool);
    assert_eq!(out.pool.rejected, 0, "a frame was given back twice");
}

/// Steps until nothing is waiting on `wire` and a pass moves nothing.
fn run_dry(lb: &mut Loopback, wire: &Wire) {
    for _ in 0..10_000 {
        if !lb.step() && wire.waiting() == 0 {
            return;
        }
    }
    panic!("the loopback never went idle");
}

/// Streams `total` frames to 239.1.1.1:5000 in on `input` and steps until the first rule has
/// taken them all. A worker never goes idle while frames await completions on a stalled
/// ring, so this is bounded by passes rather than by idleness.
fn stream_past_stalls(lb: &mut Loopback, input: &Wire, total: u64) -> DatapathStats {
    let f = build_udp_frame(&sent("239.1.1.1", "198.18.10.2", 5000, 16, 0));
    input.stream(&f, total);
    for _ in 0..100_000 {
        if lb.stats().rules[0].packets == total && input.waiting() == 0 {
            break;
        }
        lb.step();
    }
    lb.step();
    lb.stats()
}

const ONE_TO_ONE: &str = "rules:
  - name: v4
    input: { interface: in0, group: 239.1.1.1, port: 5000 }
    outputs: [ { interface: out0, group: 239.9.9.9, port: 6000, ttl: 7 } ]
  - name: v6
    input: { interface: in0, group: 'ff18::1', port: 5000 }
    outputs: [ { interface: out0, group: 'ff18::9' } ]
";

#[test]
fn one_to_one_delivers_every_frame_rewritten() {
    for allocator in ALLOCATORS {
        let mut lb = Loopback::new(table(ONE_TO_ONE), options(allocator, 1, 4096)).unwrap();
        let (input, output) = (lb.wire("in0", 0).unwrap(), lb.wire("out0", 0).unwrap());
        output.capture();
        let mut want = Vec::new();
        let mut bytes = [0u64; 2];
        for n in 0..3000 {
            let (f, expect) = if n % 3 == 2 {
                let f = sent("ff18::1", "2001:2:0:10::2", 5000, 9, n);
                let e = relayed(&f, 11, "ff18::9", 5000, 8);
                (f, e)
            } else {
                let f = sent("239.1.1.1", "198.18.10.2", 5000, 16, n);
                let e = relayed(&f, 11, "239.9.9.9", 6000, 7);
                (f, e)
            };
            let frame = build_udp_frame(&f);
            bytes[usize::from(n % 3 == 2)] += frame.len() as u64;
            input.send(frame);
            want.push(expect);
        }
        run_dry(&mut lb, &input);
        let got = output.take_captured();
        assert_eq!(got.len(), want.len(), "{allocator:?}");
        for (n, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{allocator:?}: frame {n}");
        }
        let s = lb.stats();
        assert_eq!([s.rules[0].packets, s.rules[1].packets], [2000, 1000]);
        assert_eq!([s.rules[0].bytes, s.rules[1].bytes], bytes);
        assert_eq!(s.rules[0].outputs[0].packets, 2000);
        assert_eq!(s.rules[1].outputs[0].packets, 1000);
        assert_eq!(s.rules[0].outputs[0].dropped(), 0);
        assert_eq!(s.rules[1].outputs[0].dropped(), 0);
        assert_eq!(output.sent_bytes(), bytes[0] + bytes[1]);
        assert_eq!((s.copies, s.unmatched, s.malformed), (0, 0, 0));
        let out = lb.stop();
        assert_eq!(out.stats.rules[0].outputs[0].packets, 2000);
        assert_books(&out, 4096);
    }
}

#[test]
fn fan_out_copies_one_less_than_the_outputs() {
    let yaml = "rules:
  - name: fan
    input: { interface: in0, group: 239.1.1.1, port: 5000 }
    outputs:
      - { interface: out0 }
      - { interface: out1, port: 6001 }
      - { interface: out2, group: 239.3.3.3, ttl: 3 }
";
    for allocator in ALLOCATORS {
        let mut lb = Loopback::new(table(yaml), options(allocator, 1, 4096)).unwrap();
        let input = lb.wire("in0", 0).unwrap();
        let outs: Vec<_> = ["out0", "out1", "out2"]
            .iter()
            .map(|n| lb.wire(n, 0).unwrap())
            .collect();
        outs.iter().for_each(|w| w.capture());
        let frames: Vec<UdpFrame> = (0..1000)
            .map(|n| sent("239.1.1.1", "198.18.10.2", 5000, 16, n))
            .collect();
        for f in &frames {
            input.send(build_udp_frame(f));
        }
        run_dry(&mut lb, &input);
        let want: [Vec<Vec<u8>>; 3] = [
            frames
                .iter()
                .map(|f| relayed(f, 11, "239.1.1.1", 5000, 15))
                .collect(),
            frames
                .iter()
                .map(|f| relayed(f, 12, "239.1.1.1", 6001, 15))
                .collect(),
            frames
                .iter()
                .map(|f| relayed(f, 13, "239.3.3.3", 5000, 3))
                .collect(),
        ];
        for (o, (wire, want)) in outs.iter().zip(&want).enumerate() {
            assert_eq!(&wire.take_captured(), want, "{allocator:?}: output {o}");
        }
        let s = lb.stats();
        assert_eq!(s.copies, 2000, "{allocator:?}: outputs - 1 per frame");
        assert_eq!(s.cross_umem, 0);
        for o in &s.rules[0].outputs {
            assert_eq!((o.packets, o.dropped()), (1000, 0));
        }
        assert_books(&lb.stop(), 4096);
    }
}

#[test]
fn full_tx_ring_keeps_the_waiting_bound_and_drops_the_rest() {
    for allocator in ALLOCATORS {
        let mut lb = Loopback::new(table(ONE_TO_ONE), options(allocator, 1, 8192)).unwrap();
        let (input, output) = (lb.wire("in0", 0).unwrap(), lb.wire("out0", 0).unwrap());
        output.stall(true);
        let extra = 100;
        let f = build_udp_frame(&sent("239.1.1.1", "198.18.10.2", 5000, 16, 0));
        input.stream(&f, (RING + WAITING + extra) as u64);
        assert_eq!(lb.port("out0", 0).unwrap().waiting, 0);
        let total = (RING + WAITING + extra) as u64;
        for _ in 0..10_000 {
            if lb.stats().rules[0].packets == total {
                break;
            }
            lb.step();
        }
        // And a pass more, which moves nothing: the ring is still full.
        lb.step();
        let port = lb.port("out0", 0).unwrap();
        assert_eq!(port.in_tx, RING, "{allocator:?}: the TX ring is full");
        assert_eq!(port.waiting, WAITING, "{allocator:?}");
        let o = lb.stats().rules[0].outputs[0];
        assert_eq!(o.tx_ring_full, extra as u64, "{allocator:?}");
        assert_eq!(o.packets, RING as u64, "counted when put on the ring");
        assert_eq!(output.sent(), 0);
        output.stall(false);
        run_dry(&mut lb, &input);
        assert_eq!(output.sent(), (RING + WAITING) as u64, "{allocator:?}");
        let o = lb.stats().rules[0].outputs[0];
        assert_eq!(
            (o.packets, o.tx_ring_full),
            ((RING + WAITING) as u64, extra as u64)
        );
        assert_eq!(lb.port("out0", 0).unwrap().waiting, 0);
        assert_books(&lb.stop(), 8192);
    }
}

#[test]
fn an_egress_of_the_other_worker_goes_through_its_lane() {
    for allocator in ALLOCATORS {
        let mut lb = Loopback::new(table(ONE_TO_ONE), options(allocator, 2, 4096)).unwrap();
        assert_eq!(lb.owner("in0", 0), Some(0));
        assert_eq!(lb.owner("out0", 0), Some(1));
        let (input, output) = (lb.wire("in0", 0).unwrap(), lb.wire("out0", 0).unwrap());
        output.capture();
        let frames: Vec<UdpFrame> = (0..2000)
            .map(|n| sent("239.1.1.1", "198.18.10.2", 5000, 16, n))
            .collect();
        for f in &frames {
            input.send(build_udp_frame(f));
        }
        run_dry(&mut lb, &input);
        let want: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| relayed(f, 11, "239.9.9.9", 6000, 7))
            .collect();
        assert_eq!(output.take_captured(), want, "{allocator:?}");
        let o = lb.stats().rules[0].outputs[0];
        assert_eq!((o.packets, o.handoff_full, o.dropped()), (2000, 0, 0));
        assert_books(&lb.stop(), 4096);
    }
}

/// The same path with each worker in its own thread, as the relay runs them, stopped while
/// frames are still arriving.
#[test]
fn two_worker_threads_deliver_and_drain() {
    for allocator in ALLOCATORS {
        let mut lb = Loopback::new(table(ONE_TO_ONE), options(allocator, 2, 4096)).unwrap();
        let (input, output) = (lb.wire("in0", 0).unwrap(), lb.wire("out0", 0).unwrap());
        let f = build_udp_frame(&sent("239.1.1.1", "198.18.10.2", 5000, 16, 0));
        lb.start().unwrap();
        input.stream(&f, 20_000);
        let deadline = Instant::now() + Duration::from_secs(20);
        while output.sent() < 20_000 {
            assert!(
                Instant::now() < deadline,
                "{allocator:?}: {}",
                output.sent()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        input.stream(&f, 1_000_000);
        let out = lb.stop();
        let o = out.stats.rules[0].outputs[0];
        assert_eq!(o.dropped(), 0, "{allocator:?}: {o:?}");
        assert_eq!(o.packets, output.sent(), "{allocator:?}");
        assert_eq!(out.stats.rules[0].packets, o.packets);
        assert!(o.packets < 1_020_000, "the stop cut the stream short");
        assert_books(&out, 4096);
    }
}

/// Frames that differ from the one before in one field only (group, port or source), so
/// the worker's memory of its last lookup must not answer for them.
#[test]
fn frames_no_rule_matches_are_counted_and_returned() {
    let yaml = "rules:
  - name: any
    input: { interface: in0, group: 239.1.1.1, port: 5000 }
    outputs: [ { interface: out0 } ]
  - name: one-source
    input: { interface: in0, group: 239.7.7.7, source: 198.18.10.9 }
    outputs: [ { interface: out0 } ]
";
    for allocator in ALLOCATORS {
        let mut lb = Loopback::new(table(yaml), options(allocator, 1, 4096)).unwrap();
        let (input, output) = (lb.wire("in0", 0).unwrap(), lb.wire("out0", 0).unwrap());
        // (group, source, port, matches which rule)
        let kinds = [
            ("239.1.1.1", "198.18.10.2", 5000, Some(0)),
            ("239.1.1.1", "198.18.10.2", 5001, None),
            ("239.5.5.5", "198.18.10.2", 5000, None),
            ("239.7.7.7", "198.18.10.9", 5000, Some(1)),
            ("239.7.7.7", "198.18.10.2", 5000, None),
            ("239.7.7.7", "198.18.10.9", 6000, Some(1)),
        ];
        let mut want = [0u64; 2];
        let mut unmatched = 0;
        for n in 0..6000 {
            // Runs of one to three frames of a kind.
            let (group, source, port, rule) = kinds[(n / (1 + n % 3)) % kinds.len()];
            match rule {
                Some(r) => want[r] += 1,
                None => unmatched += 1,
            }
            input.send(build_udp_frame(&sent(group, source, port, 16, n)));
        }
        let mut garbage = build_udp_frame(&sent("239.1.1.1", "198.18.10.2", 5000, 16, 0));
        garbage[23] = 6; // TCP
        input.send(garbage);
        run_dry(&mut lb, &input);
        let s = lb.stats();
        assert_eq!((s.unmatched, s.malformed), (unmatched, 1), "{allocator:?}");
        assert_eq!(
            [s.rules[0].packets, s.rules[1].packets],
            want,
            "{allocator:?}"
        );
        assert!(want.iter().all(|&w| w > 0) && unmatched > 0);
        assert_eq!(output.sent(), want[0] + want[1]);
        assert_books(&lb.stop(), 4096);
    }
}

/// `relay capture`'s tap: while a capture runs, each frame of its rule is queued as it came
/// in (inbound, the ingress) and as it went out (rewritten, outbound, the egress); frames
/// of other rules are not; a full queue drops captures, never forwarded frames; with the
/// capture stopped nothing more is taken.
#[test]
fn a_capture_sees_frames_as_received_and_as_sent_and_never_holds_them_up() {
    use crate::capture::{Direction, Filter};
    let mut lb =
        Loopback::new(table(ONE_TO_ONE), options(AllocatorKind::Lockfree, 1, 4096)).unwrap();
    let (input, output) = (lb.wire("in0", 0).unwrap(), lb.wire("out0", 0).unwrap());
    output.capture();
    let filter = Filter {
        rule: Some("v4".into()),
        output: None,
    };
    // Room for 10 frames: 5 datagrams in and out, then the queue is full.
    let capture = lb.tap().start(filter, 10).unwrap();
    let mut want_in = Vec::new();
    let mut want_out = Vec::new();
    for n in 0..20 {
        let f = sent("239.1.1.1", "198.18.10.2", 5000, 16, n);
        want_in.push(build_udp_frame(&f));
        want_out.push(relayed(&f, 11, "239.9.9.9", 6000, 7));
        input.send(build_udp_frame(&f));
        // Another rule's frames are not taken.
        input.send(build_udp_frame(&sent(
            "ff18::1",
            "2001:2:0:10::2",
            5000,
            9,
            n,
        )));
    }
    run_dry(&mut lb, &input);
    assert_eq!(
        output.take_captured().len(),
        40,
        "every frame was forwarded"
    );
    let mut got = Vec::new();
    while let Some(c) = capture.session.pop() {
        got.push((c.direction, c.ifindex, c.data));
    }
    let expected: Vec<_> = (0..5)
        .flat_map(|n| {
            [
                (Direction::Inbound, 10, want_in[n].clone()),
                (Direction::Outbound, 11, want_out[n].clone()),
            ]
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(lb.stats().capture_dropped, 30, "15 datagrams in and out");

    drop(capture);
    input.send(build_udp_frame(&sent(
        "239.1.1.1",
        "198.18.10.2",
        5000,
        16,
        99,
    )));
    run_dry(&mut lb, &input);
    assert_eq!(output.take_captured().len(), 1);
    assert!(lb.tap().current().is_none());
    let out = lb.stop();
    assert_eq!(out.stats.capture_dropped, 30);
    assert_books(&out, 4096);
}

/// A worker thread whose only work is to await TX completions (its egress stalled) gives its
/// CPU up between looks, rather than spin over them: in copy mode the completions come from
/// the kernel's receive work on the same CPU, which a spinning worker keeps waiting. Once the
/// egress moves again, everything held is delivered and the books balance.
#[test]
fn a_worker_awaiting_only_completions_yields_its_cpu() {
    for allocator in ALLOCATORS {
        let sleeping = Options {
            sleep: true,
            ..options(allocator, 1, 8192)
        };
        let mut lb = Loopback::new(table(ONE_TO_ONE), sleeping).unwrap();
        let (input, output) = (lb.wire("in0", 0).unwrap(), lb.wire("out0", 0).unwrap());
        output.stall(true);
        let f = build_udp_frame(&sent("239.1.1.1", "198.18.10.2", 5000, 16, 0));
        input.stream(&f, 100);
        lb.start().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(output.sent(), 0, "{allocator:?}: the egress is stalled");
        output.stall(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while output.sent() < 100 {
            assert!(
                Instant::now() < deadline,
                "{allocator:?}: {}",
                output.sent()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let out = lb.stop();
        assert!(
            out.stats.yields > 0,
            "{allocator:?}: 200 ms of awaiting completions without one yield"
        );
        assert_eq!(out.stats.rules[0].outputs[0].packets, 100, "{allocator:?}");
        assert_books(&out, 8192);
    }
}

/// An egress whose device stops taking frames (link up, TX ring never drained) keeps a quarter
/// of the UMEM on its ring and a bounded few waiting, and drops the rest as `tx_ring_full`;
/// the other outputs of the same rule, a copy and the received frame, get every frame. When
/// it could fill its whole ring (2,048), a UMEM of 1,024 frames was all on that ring and the
/// healthy outputs got 960 frames of 20,000; at 4,096 it held 2,304, leaving the fill ring
/// shallow.
#[test]
fn a_stalled_egress_keeps_its_share_and_the_other_outputs_flow() {
    let yaml = "rules:
  - name: fan
    input: { interface: in0, group: 239.1.1.1, port: 5000 }
    outputs: [ { interface: out0 }, { interface: out1 }, { interface: out2 } ]
";
    for (allocator, frames) in ALLOCATORS.into_iter().flat_map(|a| [(a, 1024), (a, 4096)]) {
        let hold = frames as usize / 4;
        let waiting = WAITING.min(hold);
        let mut lb = Loopback::new(table(yaml), options(allocator, 1, frames)).unwrap();
        let input = lb.wire("in0", 0).unwrap();
        let outs: Vec<_> = ["out0", "out1", "out2"]
            .iter()
            .map(|n| lb.wire(n, 0).unwrap())
            .collect();
        outs[1].stall(true);
        let total = 20_000u64;
        let s = stream_past_stalls(&mut lb, &input, total);
        assert_eq!(s.rules[0].packets, total, "{allocator:?} {frames}");
        for o in [0, 2] {
            assert_eq!(outs[o].sent(), total, "{allocator:?} {frames}: out{o}");
            let c = s.rules[0].outputs[o];
            assert_eq!(
                (c.packets, c.dropped()),
                (total, 0),
                "{allocator:?} {frames}: {c:?}"
            );
        }
        let port = lb.port("out1", 0).unwrap();
        assert_eq!(
            port.in_tx, hold,
            "{allocator:?} {frames}: the stalled one holds a quarter"
        );
        assert_eq!(port.waiting, waiting, "{allocator:?} {frames}");
        let c = s.rules[0].outputs[1];
        assert_eq!(c.packets, hold as u64, "{allocator:?} {frames}");
        assert_eq!(c.no_frame, 0, "{allocator:?} {frames}");
        assert_eq!(
            c.tx_ring_full,
            total - (hold + waiting) as u64,
            "{allocator:?} {frames}"
        );
        // Moving again, it sends what it held and what waited.
        outs[1].stall(false);
        run_dry(&mut lb, &input);
        assert_eq!(
            outs[1].sent(),
            (hold + waiting) as u64,
            "{allocator:?} {frames}"
        );
        assert_books(&lb.stop(), frames);
    }
}

/// Three stalled egresses on one UMEM: each used to keep its own quarter on its ring and a
/// quarter's worth waiting, so at the default 4,096 frames together they held 3,840 and the
/// fill ring and the healthy output starved. Together they now hold a quarter of the UMEM on
/// their rings (each still keeps a few batches waiting), and the healthy output of the same
/// rule gets every frame.
#[test]
fn stalled_egresses_share_one_quarter_and_the_healthy_output_flows() {
    let yaml = "rules:
  - name: fan
    input: { interface: in0, group: 239.1.1.1, port: 5000 }
    outputs: [ { interface: out0 }, { interface: out1 }, { interface: out2 }, { interface: out3 } ]
";
    for allocator in ALLOCATORS {
        let frames = 4096u32;
        let hold = frames as usize / 4;
        let mut lb = Loopback::new(table(yaml), options(allocator, 1, frames)).unwrap();
        let input = lb.wire("in0", 0).unwrap();
        let outs: Vec<_> = ["out0", "out1", "out2", "out3"]
            .iter()
            .map(|n| lb.wire(n, 0).unwrap())
            .collect();
        for o in &outs[1..] {
            o.stall(true);
        }
        let total = 20_000u64;
        let s = stream_past_stalls(&mut lb, &input, total);
        assert_eq!(s.rules[0].packets, total, "{allocator:?}");
        assert_eq!(outs[0].sent(), total, "{allocator:?}: the healthy output");
        let c = s.rules[0].outputs[0];
        assert_eq!((c.packets, c.dropped()), (total, 0), "{allocator:?}: {c:?}");
        let held: usize = ["out1", "out2", "out3"]
            .iter()
            .map(|n| lb.port(n, 0).unwrap().in_tx)
            .sum();
        assert_eq!(
            held, hold,
            "{allocator:?}: the stalled ones hold a quarter together"
        );
        for n in ["out1", "out2", "out3"] {
            let waiting = lb.port(n, 0).unwrap().waiting;
            assert_eq!(
                waiting, WAITING,
                "{allocator:?}: {n} keeps a few batches waiting"
            );
        }
        for (o, out) in outs.iter().enumerate().skip(1) {
            let c = s.rules[0].outputs[o];
            let port = lb.port(&format!("out{o}"), 0).unwrap();
            assert_eq!(
                c.packets, port.in_tx as u64,
                "{allocator:?}: out{o} sent what it holds"
            );
            assert_eq!(
                c.packets + c.tx_ring_full + port.waiting as u64,
                total,
                "{allocator:?}: out{o}'s frames are sent, waiting or dropped as tx_ring_full"
            );
            out.stall(false);
        }
        run_dry(&mut lb, &input);
        assert_books(&lb.stop(), frames);
    }
}

/// A unicast output's rewrite is prepared once per stream like a group output's, with its
/// next hop's MAC written per frame: a neighbour that changes in mid-stream is followed at the
/// next frame, and one that goes away refuses the frames (`no_neighbour`), as does a
/// destination routed through another interface, under its own reason (`no_route_via`).
/// Every frame is the from-scratch rewrite's, byte for byte.
#[test]
fn a_unicast_output_follows_its_next_hop_mid_stream() {
    let yaml = "rules:
  - name: uni
    input: { interface: in0, group: 239.1.1.1, port: 5000 }
    outputs: [ { interface: out0, destination: 198.18.9.9, port: 7002, source: 198.18.11.1 } ]
";
    let (a, b) = ([0x02, 0xaa, 0, 0, 0, 1], [0x02, 0xbb, 0, 0, 0, 2]);
    for allocator in ALLOCATORS {
        let mut rules = table(yaml);
        assert_eq!(rules.unicast_targets().len(), 1);
        let slot = Arc::new(crate::nexthop::NextHopSlot::new());
        rules.set_next_hops(vec![slot.clone()]);
        let action = rules.rules[0].outputs[0].action;
        let mut lb = Loopback::new(rules, options(allocator, 1, 4096)).unwrap();
        let (input, output) = (lb.wire("in0", 0).unwrap(), lb.wire("out0", 0).unwrap());
        output.capture();
        let mut want = Vec::new();
        let mut n = 0;
        for (mac, no_route_via, frames) in [
            (Some(a), false, 300),
            (Some(b), false, 300),
            (None, false, 50),
            (None, true, 40),
            (Some(a), false, 300),
        ] {
            if no_route_via {
                slot.set_no_route_via();
            } else {
                slot.set(mac);
            }
            for _ in 0..frames {
                let frame = build_udp_frame(&sent("239.1.1.1", "198.18.10.2", 5000, 16, n));
                n += 1;
                if mac.is_some() {
                    let mut expect = frame.clone();
                    let flow = crate::wire::classify(&expect).unwrap();
                    let action = crate::rewrite::OutputAction {
                        next_hop_mac: mac,
                        ..action
                    };
                    crate::rewrite::rewrite(&mut expect, &flow, &action).unwrap();
                    want.push(expect);
                }
                input.send(frame);
            }
            run_dry(&mut lb, &input);
        }
        let got = output.take_captured();
        assert_eq!(got.len(), want.len(), "{allocator:?}");
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{allocator:?}: frame {k}");
        }
        let c = lb.stats().rules[0].outputs[0];
        assert_eq!(
            (c.packets, c.no_neighbour, c.no_route_via),
            (900, 50, 40),
            "{allocator:?}"
        );
        assert_books(&lb.stop(), 4096);
    }
}
