//! The XDP program itself against the rule model, without a network: the kernel runs the
//! loaded program on crafted frames (BPF_PROG_TEST_RUN), and whether its `matched` counter
//! moved must agree with a reference model of the rules, for random rule sets of both
//! families. And 10,000 rules load in well under a second and all match.

use std::{net::IpAddr, time::Instant};

use proptest::prelude::*;
use relay::{
    config::{Config, Input, Output, Rule, StaticSystem},
    craft::{UdpFrame, build_udp_frame},
    loader::Steering,
    rules::RuleTable,
    vlan::Vlan,
    wire::{classify, classify_udp},
};
use relay_common::{SHAPES_VLAN, XdpCounter};
use relay_tests::netns::require_root;

/// The loopback interface: the test run needs a real device for the frame's ingress; `in0`
/// is it, and the output exists only on paper (no socket is opened).
const LO: u32 = 1;

fn rule(i: usize, group: IpAddr, port: Option<u16>, source: Option<IpAddr>) -> Rule {
    vlan_rule(i, group, port, source, None)
}

fn vlan_rule(
    i: usize,
    group: IpAddr,
    port: Option<u16>,
    source: Option<IpAddr>,
    vlan: Option<Vlan>,
) -> Rule {
    Rule {
        name: format!("r{i}"),
        input: Input {
            interface: "in0".into(),
            group: group.is_multicast().then_some(group.into()),
            destination: (!group.is_multicast()).then_some(group),
            port,
            source: source.map(Into::into),
            vlan,
        },
        outputs: vec![Output {
            interface: "out0".into(),
            // A unicast input's output names where to send.
            group: (!group.is_multicast()).then(|| {
                if group.is_ipv6() {
                    [0xff18, 0, 0, 0, 0, 0, 9, 9].into()
                } else {
                    [239, 9, 9, 9].into()
                }
            }),
            destination: None,
            port: None,
            ttl: None,
            vlan: None,
            dscp: None,
            source: None,
            source_port: None,
        }],
    }
}

fn table(rules: Vec<Rule>) -> RuleTable {
    let config = Config::parse("t", "rules: []")
        .map(|c| Config { rules, ..c })
        .unwrap();
    RuleTable::compile(
        &config,
        "t",
        &StaticSystem::new(&[("in0", LO), ("out0", 1000)]),
    )
    .unwrap()
}

/// The reference model: a rule covers the frame if its group matches and its port and source
/// are absent or equal, and its VLAN is absent, the frame's VID, or `untagged` for a frame
/// without a tag or with a priority tag (VID 0).
fn model_matches(
    rules: &[Rule],
    group: IpAddr,
    source: IpAddr,
    port: u16,
    tci: Option<u16>,
) -> bool {
    let vid = tci.map(|t| t & 0x0fff).filter(|&v| v != 0);
    rules.iter().any(|r| {
        r.input.address() == group
            && r.input.port.is_none_or(|p| p == port)
            && r.input.source.is_none_or(|s| s.contains(source))
            && match r.input.vlan {
                None => true,
                Some(Vlan::Untagged) => vid.is_none(),
                Some(Vlan::Id(v)) => vid == Some(v),
            }
    })
}

fn arb_vlan() -> impl Strategy<Value = Option<Vlan>> {
    proptest::option::of(prop_oneof![
        Just(Vlan::Untagged),
        (10u16..12).prop_map(Vlan::Id)
    ])
}

/// Tags the probes carry: none, a priority tag (VID 0), VIDs 10 and 11 (some with a
/// priority), and 12, which no rule names.
fn arb_tci() -> impl Strategy<Value = Option<u16>> {
    proptest::option::of(prop_oneof![
        Just(0x6000u16),
        Just(10),
        Just(0xa00a),
        Just(11),
        Just(12)
    ])
}

/// Whether the program matched `frame`, from its counter.
fn bpf_matches(steering: &Steering, frame: &[u8]) -> bool {
    let matched = || steering.counters().read().unwrap()[XdpCounter::Matched as usize];
    let before = matched();
    let (action, _) = steering.test_run(frame, LO, 1).unwrap();
    // Matched or not, with no socket in the XSKMAP the frame goes to the kernel.
    assert_eq!(action, 2, "XDP_PASS");
    matched() - before == 1
}

/// Group `g`, or for `g` of 3 and above the relay's own unicast address .2 + (g - 3): a
/// rule with a unicast `destination:` (with a port) or a frame to one.
fn group(v6: bool, g: u8) -> IpAddr {
    if g >= 3 {
        let host = 2 + g - 3;
        return if v6 {
            IpAddr::from([0x2001, 2, 0, 1, 0, 0, 0, u16::from(host)])
        } else {
            IpAddr::from([198, 18, 1, host])
        };
    }
    if v6 {
        IpAddr::from([0xff18, 0, 0, 0, 0, 0, 1, u16::from(g)])
    } else {
        IpAddr::from([239, 0, 0, g])
    }
}

fn source(v6: bool, s: u8) -> IpAddr {
    if v6 {
        IpAddr::from([0x2001, 2, 0, 1, 0, 0, 0, u16::from(s)])
    } else {
        IpAddr::from([198, 18, 1, s])
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random rule sets of both families and random frames: the program matches exactly
    /// the frames some rule covers.
    #[test]
    fn the_xdp_program_matches_what_the_model_matches(
        specs in proptest::collection::vec(
            (any::<bool>(), 0u8..5, proptest::option::of(5000u16..5003), proptest::option::of(1u8..4), arb_vlan()),
            1..16),
        probes in proptest::collection::vec(
            (any::<bool>(), 0u8..5, 5000u16..5003, 1u8..4, arb_tci()), 1..24),
    ) {
        require_root();
        let mut seen = std::collections::HashSet::new();
        let rules: Vec<Rule> = specs
            .into_iter()
            // A unicast destination needs a port.
            .map(|(v6, g, p, s, v)| (v6, g, if g >= 3 { p.or(Some(5000)) } else { p }, s, v))
            .filter(|s| seen.insert(*s))
            .enumerate()
            .map(|(i, (v6, g, p, s, v))| vlan_rule(i, group(v6, g), p, s.map(|s| source(v6, s)), v))
            .collect();
        let t = table(rules.clone());
        let steering = Steering::load(&t, 2048).unwrap();
        for (v6, g, port, s, tci) in probes {
            let (g, s) = (group(v6, g), source(v6, s));
            let frame = build_udp_frame(&UdpFrame {
                vlan: tci,
                ..UdpFrame::simple(s, g, port, 8, b"probe")
            });
            let want = model_matches(&rules, g, s, port, tci);
            prop_assert_eq!(bpf_matches(&steering, &frame), want, "{} -> {}:{} tci {:?}", s, g, port, tci);
            // The daemon's matcher finds a rule for exactly these frames too.
            let flow = classify_udp(&frame).unwrap();
            prop_assert_eq!(t.lookup(LO, &flow).is_some(), want);
        }
    }
}

/// Rules without `vlan:` leave the VLAN shapes out, so their frames cost no extra lookup;
/// a QinQ frame (802.1ad outer, 802.1Q inner tag) is never matched, whatever the rules, and
/// a single 802.1ad tag is read as a VLAN tag.
#[test]
fn vlan_shapes_and_qinq() {
    require_root();
    let g = group(false, 1);
    let plain = table(vec![rule(0, g, Some(5000), None)]);
    assert_eq!(plain.shapes() & SHAPES_VLAN, 0);
    let rules = vec![
        vlan_rule(0, g, Some(5000), None, Some(Vlan::Id(7))),
        vlan_rule(1, group(false, 2), None, None, None),
    ];
    let t = table(rules);
    assert_ne!(t.shapes() & SHAPES_VLAN, 0);
    let steering = Steering::load(&t, 2048).unwrap();
    let tagged = |tci| {
        build_udp_frame(&UdpFrame {
            vlan: tci,
            ..UdpFrame::simple(source(false, 1), g, 5000, 8, b"x")
        })
    };
    assert!(bpf_matches(&steering, &tagged(Some(7))));
    assert!(!bpf_matches(&steering, &tagged(Some(8))));
    assert!(!bpf_matches(&steering, &tagged(None)));
    let mut ad = tagged(Some(7));
    ad[12..14].copy_from_slice(&[0x88, 0xa8]);
    assert!(bpf_matches(&steering, &ad), "one 802.1ad tag");
    for outer in [[0x88, 0xa8, 0x00, 0x07], [0x81, 0x00, 0x00, 0x07]] {
        let mut qinq = tagged(Some(7));
        qinq.splice(12..12, outer);
        assert!(!bpf_matches(&steering, &qinq), "QinQ {outer:02x?}");
        assert_eq!(classify(&qinq), None);
    }
    // The rule without a VLAN takes its group on any VLAN and none.
    for tci in [None, Some(7), Some(4000)] {
        let f = build_udp_frame(&UdpFrame {
            vlan: tci,
            ..UdpFrame::simple(source(false, 1), group(false, 2), 9, 8, b"x")
        });
        assert!(bpf_matches(&steering, &f), "{tci:?}");
    }
}

/// A reload from rules of one shape to rules of others: the program looks up the shapes the
/// new table has (it skips the lookups no rule can answer), and stops matching the old ones.
#[test]
fn a_reload_moves_the_program_to_the_new_shapes() {
    require_root();
    let g = group(false, 1);
    let src = source(false, 1);
    let old = vec![rule(0, g, Some(5000), None)];
    let new = vec![
        rule(0, g, None, Some(src)),
        rule(1, group(true, 2), None, None),
    ];
    let old_t = table(old.clone());
    let new_t = table(new.clone());
    let mut steering = Steering::load(&old_t, 2048).unwrap();
    let f_old = build_udp_frame(&UdpFrame::simple(source(false, 2), g, 5000, 8, b"x"));
    let f_src = build_udp_frame(&UdpFrame::simple(src, g, 7000, 8, b"x"));
    let f_v6 = build_udp_frame(&UdpFrame::simple(
        source(true, 3),
        group(true, 2),
        9,
        8,
        b"x",
    ));
    assert!(bpf_matches(&steering, &f_old));
    assert!(!bpf_matches(&steering, &f_src));
    steering.update_rules(&old_t, &new_t).unwrap();
    for (f, want) in [(&f_old, false), (&f_src, true), (&f_v6, true)] {
        assert_eq!(bpf_matches(&steering, f), want);
    }
}

/// 10,000 rules (100 groups x 100 ports) compile and load into the kernel, every one of them
/// matches its frames, and a port next to them does not. (How long loading takes is measured
/// by `cargo xtask bench-xdp`, not asserted here.)
#[test]
fn ten_thousand_rules_load_and_all_match() {
    require_root();
    let rules: Vec<Rule> = (0..10_000)
        .map(|i| {
            let g = IpAddr::from([239, 10, (i / 100) as u8, 1]);
            rule(i, g, Some(5000 + (i % 100) as u16), None)
        })
        .collect();
    let start = Instant::now();
    let t = table(rules.clone());
    let steering = Steering::load(&t, 2048).unwrap();
    let took = start.elapsed();
    let memory = steering.rule_map_memory().unwrap();
    eprintln!(
        "10,000 rules: compiled and loaded in {took:?}; rule map memory {} KiB",
        memory / 1024
    );
    assert_eq!(t.bpf_entries().count(), 10_000);
    let src = IpAddr::from([198, 18, 1, 1]);
    for r in &rules {
        let frame = build_udp_frame(&UdpFrame::simple(
            src,
            r.input.address(),
            r.input.port.unwrap(),
            8,
            b"x",
        ));
        assert!(bpf_matches(&steering, &frame), "{}", r.name);
    }
    for g in 0..100u8 {
        let frame = build_udp_frame(&UdpFrame::simple(
            src,
            IpAddr::from([239, 10, g, 1]),
            5100,
            8,
            b"x",
        ));
        assert!(!bpf_matches(&steering, &frame), "port 5100 has no rule");
    }
}

/// A fragment of a datagram to `g`:`port` from `s`, made from a whole frame: `id` its
/// identification, `offset` in 8-byte units (0: the first, with more to come).
fn fragment(v6: bool, g: IpAddr, s: IpAddr, port: u16, id: u16, offset: u16) -> Vec<u8> {
    let mut f = build_udp_frame(&UdpFrame {
        ipv6_ext: if v6 { vec![44] } else { vec![] },
        ..UdpFrame::simple(s, g, port, 8, b"fragment")
    });
    let l3 = 14;
    if v6 {
        let fh = l3 + 40;
        f[fh + 2..fh + 4].copy_from_slice(&(offset << 3 | 1).to_be_bytes());
        f[fh + 4..fh + 8].copy_from_slice(&u32::from(id).to_be_bytes());
    } else {
        f[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
        f[l3 + 6..l3 + 8].copy_from_slice(&(0x2000 | offset).to_be_bytes());
    }
    f
}

/// Later fragments follow what their datagram's first fragment matched, in the XDP program
/// and in the daemon's model of it (`FragTable` beside `RuleTable::lookup`, as a worker
/// keeps them); a later fragment before its first, or of a datagram whose first matched
/// nothing, is passed and counted.
#[test]
fn fragments_follow_their_first() {
    require_root();
    for v6 in [false, true] {
        let (g, s) = (group(v6, 1), source(v6, 1));
        let rules = vec![rule(0, g, Some(5000), None)];
        let t = table(rules);
        let steering = Steering::load(&t, 2048).unwrap();
        let mut frags = relay::frag::FragTable::new(64);
        let mut model = |frame: &[u8]| {
            let flow = classify(frame).unwrap();
            let frag = flow.frag.unwrap();
            let key = relay::frag::key(LO, &flow, frag);
            if flow.is_later_fragment() {
                return frags.get(&key, 0).is_some();
            }
            let rule = t.lookup(LO, &flow);
            if let Some(r) = rule {
                frags.insert(key, r, 0);
            }
            rule.is_some()
        };
        let count = |c: XdpCounter| steering.counters().read().unwrap()[c as usize];
        let (known, unknown) = (
            count(XdpCounter::Fragments),
            count(XdpCounter::FragmentsUnknown),
        );
        let probes = [
            (
                fragment(v6, g, s, 5000, 5, 185),
                false,
                "later before its first",
            ),
            (fragment(v6, g, s, 5000, 5, 0), true, "first"),
            (
                fragment(v6, g, s, 5000, 5, 185),
                true,
                "later after its first",
            ),
            (fragment(v6, g, s, 5000, 5, 370), true, "another later"),
            (
                fragment(v6, g, s, 5000, 6, 185),
                false,
                "another datagram's later",
            ),
            (
                fragment(v6, g, source(v6, 2), 5000, 5, 185),
                false,
                "another source's later",
            ),
            (
                fragment(v6, g, s, 5001, 8, 0),
                false,
                "a first no rule takes",
            ),
            (fragment(v6, g, s, 5001, 8, 185), false, "its later"),
            (
                {
                    let mut f = fragment(v6, g, s, 5000, 5, 185);
                    f.splice(12..12, [0x81, 0x00, 0x00, 20]);
                    f
                },
                false,
                "a later with the first's identification, on VLAN 20",
            ),
        ];
        for (frame, want, what) in &probes {
            assert_eq!(bpf_matches(&steering, frame), *want, "v6 {v6}: {what}");
            assert_eq!(model(frame), *want, "model, v6 {v6}: {what}");
        }
        assert_eq!(count(XdpCounter::Fragments) - known, 2);
        assert_eq!(count(XdpCounter::FragmentsUnknown) - unknown, 5);
    }
}

/// A unicast `destination:` input: the program takes UDP to that address and port only, in
/// both families and in fragments, and leaves other ports, other protocols and other
/// addresses to the kernel. Without such a rule, unicast is never looked up (the shape bit
/// is clear), whatever its address.
#[test]
fn unicast_inputs_match_only_their_address_and_port() {
    require_root();
    use relay_common::SHAPE_UNICAST;
    for v6 in [false, true] {
        let me = group(v6, 3);
        let other = group(v6, 4);
        let s = source(v6, 1);
        let groups_only = table(vec![rule(0, group(v6, 1), Some(7100), None)]);
        assert_eq!(groups_only.shapes() & SHAPE_UNICAST, 0);
        let t = table(vec![
            rule(0, group(v6, 1), Some(7100), None),
            rule(1, me, Some(7100), None),
        ]);
        assert_ne!(t.shapes() & SHAPE_UNICAST, 0);
        let to = |dst: IpAddr, port: u16| build_udp_frame(&UdpFrame::simple(s, dst, port, 8, b"u"));
        let steering = Steering::load(&t, 2048).unwrap();
        let plain = Steering::load(&groups_only, 2048).unwrap();
        assert!(bpf_matches(&steering, &to(me, 7100)), "v6 {v6}");
        assert!(
            !bpf_matches(&plain, &to(me, 7100)),
            "no unicast rule, v6 {v6}"
        );
        assert!(
            !bpf_matches(&steering, &to(me, 7101)),
            "another port, v6 {v6}"
        );
        assert!(
            !bpf_matches(&steering, &to(other, 7100)),
            "another address, v6 {v6}"
        );
        assert!(
            bpf_matches(&steering, &to(group(v6, 1), 7100)),
            "the group rule still"
        );
        // Another protocol to the same address and port.
        let mut tcp = to(me, 7100);
        if v6 {
            tcp[14 + 6] = 6;
        } else {
            tcp[14 + 9] = 6;
        }
        assert!(!bpf_matches(&steering, &tcp), "TCP, v6 {v6}");
        // Fragments: the first by its port, the later ones by the first.
        let first = fragment(v6, me, s, 7100, 9, 0);
        let later = fragment(v6, me, s, 7100, 9, 185);
        let stray = fragment(v6, me, s, 7100, 10, 185);
        assert!(bpf_matches(&steering, &first));
        assert!(bpf_matches(&steering, &later));
        assert!(!bpf_matches(&steering, &stray));
        // The daemon's matcher agrees.
        assert_eq!(t.lookup(LO, &classify_udp(&to(me, 7100)).unwrap()), Some(1));
        assert_eq!(t.lookup(LO, &classify_udp(&to(me, 7101)).unwrap()), None);
        assert_eq!(classify(&to(me, 7100)), None, "not a multicast frame");
    }
}
