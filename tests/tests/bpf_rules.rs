//! The XDP program itself against the rule model, without a network: the kernel runs the
//! loaded program on crafted frames (BPF_PROG_TEST_RUN), and whether its `matched` counter
//! moved, and which rule it chose (what a first fragment stores in `FRAGS`), must agree with
//! a reference model of the rules, for random rule sets of both families with overlapping
//! group ranges and source prefixes. And 10,000 rules, or 10,000 ranges, load in well under a
//! second and all match.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use proptest::prelude::*;
use relay::{
    config::{Config, Input, Output, Rule, StaticSystem},
    craft::{UdpFrame, build_udp_frame},
    loader::Steering,
    prefix::Prefix,
    rules::{RuleTable, key_addr},
    vlan::Vlan,
    wire::{classify, classify_udp},
};
use relay_common::{FragKey, SHAPE_RANGES, SHAPES_VLAN, XdpCounter, frame_vlan};
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
    prefix_rule(i, group.into(), port, source.map(Into::into), vlan)
}

/// A rule for a group or range (or, not multicast, a unicast destination), from a source
/// or prefix of sources.
fn prefix_rule(
    i: usize,
    prefix: Prefix,
    port: Option<u16>,
    source: Option<Prefix>,
    vlan: Option<Vlan>,
) -> Rule {
    let group = prefix.addr;
    Rule {
        name: format!("r{i}"),
        input: Input {
            interface: "in0".into(),
            group: group.is_multicast().then_some(prefix),
            destination: (!group.is_multicast()).then_some(group),
            port,
            source,
            vlan,
        },
        legs: Vec::new(),
        merge: None,
        window_ms: None,
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
            on_demand: false,
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

/// The reference model, by brute force: among the rules that cover the frame (group inside
/// the rule's group or range, or its unicast destination; source inside its prefix or none;
/// port equal or none; VLAN the frame's, `untagged` for a frame without a tag or with a
/// priority tag (VID 0), or none), the most specific: a VLAN over none, then the longest
/// group prefix, the longest source prefix (none is /0), a port over none.
fn model_rule(
    rules: &[Rule],
    group: IpAddr,
    source: IpAddr,
    port: u16,
    tci: Option<u16>,
) -> Option<u32> {
    let vid = tci.map(|t| t & 0x0fff).filter(|&v| v != 0);
    rules
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.input.prefix().contains(group)
                && r.input.port.is_none_or(|p| p == port)
                && r.input.source.is_none_or(|s| s.contains(source))
                && match r.input.vlan {
                    None => true,
                    Some(Vlan::Untagged) => vid.is_none(),
                    Some(Vlan::Id(v)) => vid == Some(v),
                }
        })
        .max_by_key(|(_, r)| {
            (
                r.input.vlan.is_some(),
                r.input.prefix().len,
                r.input.source.map_or(0, |s| s.len),
                r.input.port.is_some(),
            )
        })
        .map(|(i, _)| i as u32)
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

/// The rule the program chose for a datagram to `g`:`port` from `s` on VLAN `tci`: it runs
/// a first fragment of it (identification `id`) and reads what it stored in `FRAGS`.
/// `None` when nothing matched (and then the fragment was passed).
fn bpf_rule(
    steering: &Steering,
    v6: bool,
    g: IpAddr,
    s: IpAddr,
    port: u16,
    tci: Option<u16>,
    id: u16,
) -> Option<u32> {
    let frame = fragment_tagged(tci, v6, g, s, port, id, 0);
    let matched = bpf_matches(steering, &frame);
    let key = FragKey {
        ifindex: LO,
        id: if v6 {
            u32::from(id).to_be_bytes()
        } else {
            [0, 0, (id >> 8) as u8, id as u8]
        },
        source: key_addr(s),
        group: key_addr(g),
        vlan: frame_vlan(tci),
        pad: 0,
    };
    let rule = steering.fragment_rule(&key).unwrap();
    assert_eq!(rule.is_some(), matched, "FRAGS holds what matched");
    rule
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

/// Whether `relay_hinted` matched `frame` when the VLAN-hint front found `tci` in the NIC's
/// metadata; it must hand a frame it passes back byte for byte.
fn bpf_matches_hinted(steering: &mut Steering, frame: &[u8], tci: Option<u16>) -> bool {
    let matched = |s: &Steering| s.counters().read().unwrap()[XdpCounter::Matched as usize];
    let before = matched(steering);
    let (action, out) = steering.test_run_hinted(frame, LO, tci).unwrap();
    assert_eq!(action, 2, "XDP_PASS");
    assert_eq!(
        out, frame,
        "a passed frame leaves as it came, the tag not in it"
    );
    matched(steering) - before == 1
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

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

/// A rule's groups: 0..=4 as [`group`] gives them (single groups, and .2/.3 unicast
/// destinations), then nested ranges over the groups 0..=2: a /24, a /30 and a /8 (IPv6: a
/// /112, /126 and /16), and a /31 (/127) holding group 2 and the probe group 5.
fn group_prefix(v6: bool, g: u8) -> Prefix {
    let ranges = if v6 {
        [
            "ff18::1:0/112",
            "ff18::1:0/126",
            "ff18::/16",
            "ff18::1:2/127",
        ]
    } else {
        [
            "239.0.0.0/24",
            "239.0.0.0/30",
            "239.0.0.0/8",
            "239.0.0.2/31",
        ]
    };
    match g {
        0..=4 => group(v6, g).into(),
        _ => p(ranges[usize::from(g - 5)]),
    }
}

/// A probe's group: 0..=4 as [`group`]; 5 inside the /30, the /31, the /24 and the /8; 6
/// inside the /8 (IPv6: /16) only; 7 outside every range.
fn probe_group(v6: bool, g: u8) -> IpAddr {
    let more = if v6 {
        ["ff18::1:3", "ff18::2:0", "ff19::1"]
    } else {
        ["239.0.0.3", "239.1.0.0", "238.0.0.1"]
    };
    match g {
        0..=4 => group(v6, g),
        _ => more[usize::from(g - 5)].parse().unwrap(),
    }
}

/// A rule's source: 1..=3 one source as [`source`] gives it; 4 a /30 (/126) over sources
/// 1..=3; 5 a /16 (/32) over those and probe source 4; 6 a /31 (/127) over sources 2 and 3.
fn source_prefix(v6: bool, s: u8) -> Prefix {
    let prefixes = if v6 {
        ["2001:2:0:1::/126", "2001:2::/32", "2001:2:0:1::2/127"]
    } else {
        ["198.18.1.0/30", "198.18.0.0/16", "198.18.1.2/31"]
    };
    match s {
        1..=3 => source(v6, s).into(),
        _ => p(prefixes[usize::from(s - 4)]),
    }
}

/// A probe's source: 1..=3 as [`source`]; 4 inside the /16 (/32) only; 5 outside all.
fn probe_source(v6: bool, s: u8) -> IpAddr {
    let more = if v6 {
        ["2001:2:0:2::1", "2001:3::1"]
    } else {
        ["198.18.2.1", "10.1.1.1"]
    };
    match s {
        1..=3 => source(v6, s),
        _ => more[usize::from(s - 4)].parse().unwrap(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random rule sets of both families, with overlapping group ranges and source prefixes,
    /// ports, VLANs and unicast destinations, and random frames: the program matches exactly
    /// the frames some rule covers, and picks the rule the model picks (a first fragment
    /// of the frame shows which, in `FRAGS`), as does the daemon's matcher.
    #[test]
    fn the_xdp_program_matches_what_the_model_matches(
        specs in proptest::collection::vec(
            (any::<bool>(), 0u8..9, proptest::option::of(5000u16..5003), proptest::option::of(1u8..7), arb_vlan()),
            1..20),
        probes in proptest::collection::vec(
            (any::<bool>(), 0u8..8, 5000u16..5003, 1u8..6, arb_tci()), 1..24),
    ) {
        require_root();
        let mut seen = std::collections::HashSet::new();
        let rules: Vec<Rule> = specs
            .into_iter()
            // A unicast destination needs a port.
            .map(|(v6, g, p, s, v)| (v6, g, if (3..5).contains(&g) { p.or(Some(5000)) } else { p }, s, v))
            .filter(|s| seen.insert(*s))
            .enumerate()
            .map(|(i, (v6, g, p, s, v))| {
                prefix_rule(i, group_prefix(v6, g), p, s.map(|s| source_prefix(v6, s)), v)
            })
            .collect();
        let t = table(rules.clone());
        let mut steering = Steering::load(&t, 2048).unwrap();
        for (i, (v6, g, port, s, tci)) in probes.into_iter().enumerate() {
            let (g, s) = (probe_group(v6, g), probe_source(v6, s));
            let frame = build_udp_frame(&UdpFrame {
                vlan: tci,
                ..UdpFrame::simple(s, g, port, 8, b"probe")
            });
            let want = model_rule(&rules, g, s, port, tci);
            prop_assert_eq!(bpf_matches(&steering, &frame), want.is_some(), "{} -> {}:{} tci {:?}", s, g, port, tci);
            prop_assert_eq!(
                bpf_rule(&steering, v6, g, s, port, tci, i as u16), want,
                "the program's rule, {} -> {}:{} tci {:?}", s, g, port, tci
            );
            // The daemon's matcher finds the same rule.
            let flow = classify_udp(&frame).unwrap();
            prop_assert_eq!(t.lookup(LO, &flow), want, "the daemon's rule");
            // The same frame with its tag in the NIC's metadata, behind the VLAN-hint front:
            // the same match, and the same rule for its first fragment.
            let bare = build_udp_frame(&UdpFrame { vlan: None, ..UdpFrame::simple(s, g, port, 8, b"probe") });
            prop_assert_eq!(bpf_matches_hinted(&mut steering, &bare, tci), want.is_some(), "hinted {} -> {}:{} tci {:?}", s, g, port, tci);
            let id = 0x8000 | i as u16;
            let first = fragment_tagged(None, v6, g, s, port, id, 0);
            bpf_matches_hinted(&mut steering, &first, tci);
            let key = FragKey {
                ifindex: LO,
                id: if v6 { u32::from(id).to_be_bytes() } else { [0, 0, (id >> 8) as u8, id as u8] },
                source: key_addr(s),
                group: key_addr(g),
                vlan: frame_vlan(tci),
                pad: 0,
            };
            prop_assert_eq!(steering.fragment_rule(&key).unwrap(), want, "the hinted program's rule");
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
    // Behind the VLAN-hint front: the tag from the metadata counts as the frame's, and a
    // frame that still has one in it is QinQ (the NIC took the outer one).
    let mut steering = steering;
    assert!(bpf_matches_hinted(&mut steering, &tagged(None), Some(7)));
    assert!(
        bpf_matches_hinted(&mut steering, &tagged(None), Some(0x2007)),
        "priority 1"
    );
    assert!(!bpf_matches_hinted(&mut steering, &tagged(None), Some(8)));
    assert!(!bpf_matches_hinted(&mut steering, &tagged(None), None));
    assert!(
        !bpf_matches_hinted(&mut steering, &tagged(Some(7)), Some(7)),
        "QinQ"
    );
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
    fragment_tagged(None, v6, g, s, port, id, offset)
}

/// As [`fragment`], tagged with `tci` if given.
fn fragment_tagged(
    tci: Option<u16>,
    v6: bool,
    g: IpAddr,
    s: IpAddr,
    port: u16,
    id: u16,
    offset: u16,
) -> Vec<u8> {
    let mut f = build_udp_frame(&UdpFrame {
        vlan: tci,
        ipv6_ext: if v6 { vec![44] } else { vec![] },
        ..UdpFrame::simple(s, g, port, 8, b"fragment")
    });
    let l3 = if tci.is_some() { 18 } else { 14 };
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

/// A frame to `g`:`port` from `s`.
fn udp(s: IpAddr, g: IpAddr, port: u16) -> Vec<u8> {
    build_udp_frame(&UdpFrame::simple(s, g, port, 8, b"r"))
}

/// One group inside a range: its frames take its rule alone, in the program and in the
/// daemon; the rest of the range takes the range's rule.
#[test]
fn the_exact_group_inside_a_range_wins_alone() {
    require_root();
    for v6 in [false, true] {
        let (range, one, other) = if v6 {
            ("ff18::10:0/112", "ff18::10:304", "ff18::10:305")
        } else {
            ("239.10.0.0/16", "239.10.3.4", "239.10.3.5")
        };
        let rules = vec![
            prefix_rule(0, p(range), None, None, None),
            prefix_rule(1, p(one), None, None, None),
        ];
        let t = table(rules);
        assert_ne!(t.shapes() & SHAPE_RANGES, 0);
        let steering = Steering::load(&t, 2048).unwrap();
        let s = source(v6, 1);
        for (g, want) in [(one, 1), (other, 0)] {
            let g: IpAddr = g.parse().unwrap();
            let matched = || steering.counters().read().unwrap()[XdpCounter::Matched as usize];
            let before = matched();
            assert_eq!(
                bpf_rule(&steering, v6, g, s, 5000, None, 7),
                Some(want),
                "{g}"
            );
            assert_eq!(matched() - before, 1, "one match for {g}");
            let flow = classify_udp(&udp(s, g, 5000)).unwrap();
            assert_eq!(t.lookup(LO, &flow), Some(want), "the daemon, {g}");
        }
    }
}

/// A source prefix takes its senders' frames; other senders' frames to the same groups are
/// passed (and counted as such); so are frames to groups outside every range, whoever sends
/// them, while the ranges' first and last groups match.
#[test]
fn source_prefixes_select_senders_and_other_groups_pass() {
    require_root();
    for v6 in [false, true] {
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        let (rules, inside, outside, senders, strangers) = if v6 {
            (
                vec![
                    prefix_rule(0, p("ff18::/16"), None, Some(p("2001:2:7::/48")), None),
                    prefix_rule(1, p("ff1e::20:0/120"), Some(5000), None, None),
                ],
                [
                    "ff18::",
                    "ff18:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                    "ff1e::20:ff",
                ],
                ["ff19::1", "ff1e::21:0", "ff1e::1f:ffff"],
                ["2001:2:7::1", "2001:2:7:ffff::9"],
                ["2001:2:8::1", "2001:2:6:ffff::1"],
            )
        } else {
            (
                vec![
                    prefix_rule(0, p("239.10.0.0/16"), None, Some(p("198.18.7.0/24")), None),
                    prefix_rule(1, p("239.20.0.0/24"), Some(5000), None, None),
                ],
                ["239.10.0.0", "239.10.255.255", "239.20.0.255"],
                ["239.11.0.0", "239.20.1.0", "239.9.255.255"],
                ["198.18.7.1", "198.18.7.255"],
                ["198.18.8.1", "198.18.6.255"],
            )
        };
        let t = table(rules);
        let steering = Steering::load(&t, 2048).unwrap();
        let matches = |s: &str, g: &str| {
            let frame = udp(ip(s), ip(g), 5000);
            let count = || steering.counters().read().unwrap();
            let before = count();
            let m = bpf_matches(&steering, &frame);
            let after = count();
            let moved = |c: XdpCounter| after[c as usize] - before[c as usize];
            // Every frame is passed here: a match too, as no socket waits for it
            // (`redirect_failed`); a frame no rule takes is passed without that.
            assert_eq!(moved(XdpCounter::Passed), 1, "passed: {s} -> {g}");
            assert_eq!(
                moved(XdpCounter::RedirectFailed),
                u64::from(m),
                "{s} -> {g}"
            );
            assert_eq!(
                t.lookup(LO, &classify_udp(&frame).unwrap()).is_some(),
                m,
                "the daemon agrees: {s} -> {g}"
            );
            m
        };
        for s in senders {
            for g in inside {
                assert!(matches(s, g), "{s} -> {g}");
            }
            for g in outside {
                assert!(!matches(s, g), "outside every range: {s} -> {g}");
            }
        }
        for s in strangers {
            assert!(!matches(s, inside[0]), "not a sender of the prefix: {s}");
            assert!(!matches(s, inside[1]), "not a sender of the prefix: {s}");
            assert!(matches(s, inside[2]), "the range without a source: {s}");
        }
    }
}

/// Reloads from rules with ranges to exact rules only and back, while another thread keeps
/// running a frame of a rule both tables have through the program: it matches every time,
/// through every step of every reload; before and after each, the rules only one table has
/// match exactly while it is loaded.
#[test]
fn a_reload_between_ranges_and_exact_keeps_a_staying_rule_matching() {
    require_root();
    let ip = |a: &str| a.parse::<IpAddr>().unwrap();
    let staying = prefix_rule(0, p("239.1.1.1"), Some(5000), None, None);
    let ranges = table(vec![
        staying.clone(),
        prefix_rule(1, p("239.10.0.0/16"), None, Some(p("198.18.7.0/24")), None),
        prefix_rule(2, p("ff18::/16"), None, None, None),
        prefix_rule(3, p("239.0.0.0/8"), None, None, Some(Vlan::Id(9))),
    ]);
    let exact = table(vec![
        staying,
        prefix_rule(1, p("239.2.2.2"), None, None, None),
    ]);
    assert_ne!(ranges.shapes() & SHAPE_RANGES, 0);
    assert_eq!(exact.shapes() & SHAPE_RANGES, 0);
    let mut steering = Steering::load(&ranges, 2048).unwrap();
    let src = ip("198.18.7.1");
    let f_stay = udp(src, ip("239.1.1.1"), 5000);
    let f_range = udp(src, ip("239.10.3.4"), 7);
    let f_v6 = udp(ip("2001:2::1"), ip("ff18::99"), 7);
    let f_exact = udp(src, ip("239.2.2.2"), 7);

    let stop = Arc::new(AtomicBool::new(false));
    let (runs, misses) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let runner = steering.test_runner().unwrap();
    let counters = steering.counters();
    let probe = {
        let (stop, runs, misses, frame) =
            (stop.clone(), runs.clone(), misses.clone(), f_stay.clone());
        std::thread::spawn(move || {
            // Only this thread runs the program while it runs: the main one only reloads.
            let matched = || counters.read().unwrap()[XdpCounter::Matched as usize];
            while !stop.load(Ordering::Relaxed) {
                let before = matched();
                runner.test_run(&frame, LO, 1).unwrap();
                if matched() == before {
                    misses.fetch_add(1, Ordering::Relaxed);
                }
                runs.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Each reload waits for the probe to have run once since the last, so the runs spread
    // over all of them.
    let probe_ran = || {
        let before = runs.load(Ordering::Relaxed);
        while runs.load(Ordering::Relaxed) == before {
            std::thread::yield_now();
        }
    };
    let mut reloads = 0;
    for _ in 0..50 {
        probe_ran();
        steering.update_rules(&ranges, &exact).unwrap();
        probe_ran();
        steering.update_rules(&exact, &ranges).unwrap();
        reloads += 2;
    }
    stop.store(true, Ordering::Relaxed);
    probe.join().unwrap();
    let (runs, misses) = (runs.load(Ordering::Relaxed), misses.load(Ordering::Relaxed));
    eprintln!("{reloads} reloads, {runs} runs of the staying rule's frame, {misses} misses");
    assert_eq!(misses, 0, "the staying rule matched every time");
    assert!(runs >= reloads, "the frame ran through the reloads");
    // Before and after: what each table alone matches.
    for (loaded, next) in [(&ranges, &exact), (&exact, &ranges)] {
        let with_ranges = std::ptr::eq(loaded, &ranges);
        assert!(bpf_matches(&steering, &f_stay));
        assert_eq!(bpf_matches(&steering, &f_range), with_ranges);
        assert_eq!(bpf_matches(&steering, &f_v6), with_ranges);
        assert_eq!(bpf_matches(&steering, &f_exact), !with_ranges);
        steering.update_rules(loaded, next).unwrap();
    }
    assert!(bpf_matches(&steering, &f_range), "back to the ranges");
}

/// 10,000 group ranges (/24s, half of them for a source prefix) compile and load in under a
/// second, and frames inside them match the right one; frames outside them pass.
#[test]
fn ten_thousand_ranges_load_in_under_a_second() {
    require_root();
    let rules: Vec<Rule> = (0..10_000usize)
        .map(|i| {
            let g = Prefix {
                addr: IpAddr::from([239, 10 + (i / 256) as u8, (i % 256) as u8, 0]),
                len: 24,
            };
            let source = (i % 2 == 1).then(|| p("198.18.0.0/16"));
            prefix_rule(i, g, None, source, None)
        })
        .collect();
    let start = Instant::now();
    let t = table(rules.clone());
    let steering = Steering::load(&t, 2048).unwrap();
    let took = start.elapsed();
    eprintln!(
        "10,000 ranges: compiled and loaded in {took:?}; {} tuples; rule map memory {} KiB",
        t.tuples().len(),
        steering.rule_map_memory().unwrap() / 1024
    );
    assert!(
        took < std::time::Duration::from_secs(1),
        "10,000 ranges took {took:?} to compile and load"
    );
    assert_eq!(t.bpf_entries().count(), 10_000);
    let src = IpAddr::from([198, 18, 1, 1]);
    for (i, r) in rules.iter().enumerate().step_by(97) {
        let IpAddr::V4(net) = r.input.address() else {
            unreachable!()
        };
        let mut g = net.octets();
        g[3] = 77;
        let frame = udp(src, g.into(), 5000);
        assert!(bpf_matches(&steering, &frame), "{}", r.name);
        assert_eq!(
            bpf_rule(&steering, false, g.into(), src, 5000, None, i as u16),
            Some(i as u32)
        );
        assert_eq!(t.lookup(LO, &classify_udp(&frame).unwrap()), Some(i as u32));
    }
    let outside = udp(src, IpAddr::from([239, 200, 0, 1]), 5000);
    assert!(!bpf_matches(&steering, &outside));
}
