//! VLAN trunks through the real path. There are no VLAN devices on this kernel, so tagged
//! frames are crafted and injected raw on the sender's link, and the receivers' links are
//! captured raw with each frame's tag put back (`capture_tagged`): which frames an input's
//! `vlan:` takes, which tag each output sends with (none, a new one, or the arrived one's VID
//! replaced with its priority kept), and that the rest of the rewrite (MACs, TTL, checksums)
//! is right at the moved offsets. Each runs twice: with the tag in the frame, as a NIC with
//! rx-vlan offload off hands it over, and with the tag in the skb's metadata, as a NIC with
//! the offload on (most server NICs by default) leaves it: a tc program on the sender's link
//! moves each crafted frame's tag there, and the relay reads it through the XDP RX metadata
//! kfunc.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use relay::{
    craft::{UdpFrame, build_udp_frame},
    wire::{UdpPacket, classify, multicast_mac},
};
use relay_tests::{
    netns::require_root,
    relay_proc::{RelayProc, relay_bin},
    topo::{RELAY_IN, SENDER_ADDR, SENDER_ADDR6, SENDER_IF, Topology},
    traffic::{Limits, capture_tagged, check_payload, inject, join, payload},
    vlan_tc::{TagIn, VlanPush},
};

mod common;
use common::stats_until;

/// The source MAC of every injected frame, so captures can tell them from the links' own
/// traffic (neighbour discovery, MLD).
const INJECT_MAC: [u8; 6] = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x02];

/// A frame to `group`:`port` carrying payload `seq`, tagged with `tci` if given.
fn frame(group: &str, port: u16, tci: Option<u16>, seq: u64, len: usize) -> Vec<u8> {
    let group: IpAddr = group.parse().unwrap();
    let source = if group.is_ipv4() {
        IpAddr::from(SENDER_ADDR)
    } else {
        IpAddr::from(SENDER_ADDR6)
    };
    build_udp_frame(&UdpFrame {
        vlan: tci,
        src_mac: INJECT_MAC,
        ..UdpFrame::simple(source, group, port, 8, &payload(seq, len))
    })
}

fn is_relayed(frame: &[u8]) -> bool {
    frame.get(6..12) != Some(&INJECT_MAC) && classify(frame).is_some()
}

fn is_injected(frame: &[u8]) -> bool {
    frame.get(6..12) == Some(&INJECT_MAC)
}

/// What a relayed frame carries: its sequence number, its tag control word, group and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Got {
    tci: Option<u16>,
    group: IpAddr,
    port: u16,
}

/// Checks a captured relayed frame from scratch: MACs (the group's, the egress's), TTL or hop
/// limit 8 - 1, both checksums, the payload. Returns its sequence number and what it carries.
fn verify(frame: &[u8], src_mac: [u8; 6]) -> (u64, Got) {
    let flow = classify(frame).unwrap();
    assert_eq!(frame[..6], multicast_mac(flow.group), "destination MAC");
    assert_eq!(frame[6..12], src_mac, "source MAC: the egress's");
    let (udp_bytes, hops, expected) = common::udp_from_scratch(frame, &flow);
    assert_eq!(hops, 7, "TTL or hop limit 8 - 1");
    let udp = UdpPacket::new_checked(udp_bytes).unwrap();
    assert_eq!(udp.checksum(), expected, "UDP checksum of {frame:02x?}");
    let seq = check_payload(udp.payload()).expect("payload intact");
    (
        seq,
        Got {
            tci: flow.tci,
            group: flow.group,
            port: flow.port,
        },
    )
}

/// One run: the relay on `yaml`, `frames` injected on the sender's link; returns, for each
/// receiver, its relayed frames by sequence number (checked by [`verify`]), and the sequence
/// numbers of the injected frames the relay's own stack saw (the passed ones).
struct Run {
    relayed: Vec<BTreeMap<u64, Got>>,
    passed: Vec<u64>,
    /// Injected frames the relay's stack saw, QinQ ones too (which `passed` cannot number).
    passed_frames: usize,
    matched: u64,
    copies: u64,
    /// The first rule's merge counters, if it merges.
    merge: Option<relay::stats::MergeView>,
    /// Relayed frames whose tag the program read from the NIC's metadata.
    from_metadata: u64,
}

/// `relayed` and `passed` bound how many frames the captures wait for; `matched` is how many
/// the rules take, which the counters are awaited for.
fn run(
    yaml: &str,
    allocator: &str,
    tags: TagIn,
    frames: Vec<Vec<u8>>,
    (relayed, passed, matched): (usize, usize, u64),
) -> Run {
    require_root();
    let topo = Topology::new(2).unwrap();
    let _moved = (tags == TagIn::Metadata)
        .then(|| VlanPush::move_frame_tags(&topo.sender, SENDER_IF).unwrap());
    let macs: Vec<[u8; 6]> = topo
        .receivers
        .iter()
        .map(|r| common::mac_of(&topo, &r.relay_iface))
        .collect();
    let relay = RelayProc::start(
        &relay_bin(),
        &topo.relay,
        &format!("allocator: {allocator}\n{yaml}"),
        &[],
    )
    .unwrap();
    let before = stats_until(&relay.control, |_| true);
    let mut limits = Limits::new(relayed as u64);
    limits.idle = Duration::from_secs(2);
    let captures: Vec<_> = topo
        .receivers
        .iter()
        .map(|r| capture_tagged(&r.ns, &r.iface, limits, is_relayed).unwrap())
        .collect();
    let mut limits = Limits::new(passed as u64);
    limits.idle = Duration::from_secs(2);
    let stack = capture_tagged(&topo.relay, RELAY_IN, limits, is_injected).unwrap();
    let n = frames.len();
    let sent =
        join(inject(&topo.sender, SENDER_IF, frames, Duration::from_millis(5)).unwrap()).unwrap();
    assert_eq!(sent, n);

    let relayed: Vec<BTreeMap<u64, Got>> = captures
        .into_iter()
        .zip(&macs)
        .map(|(c, mac)| {
            let frames = join(c).unwrap();
            let mut by_seq = BTreeMap::new();
            for f in &frames {
                let (seq, got) = verify(f, *mac);
                assert!(by_seq.insert(seq, got).is_none(), "{seq} relayed twice");
            }
            by_seq
        })
        .collect();
    let stack = join(stack).unwrap();
    let passed_frames = stack.len();
    let passed: Vec<u64> = stack
        .iter()
        .filter_map(|f| {
            let flow = classify(f)?;
            check_payload(UdpPacket::new_checked(&f[flow.l4..]).ok()?.payload())
        })
        .collect();
    let received = |v: &relay::stats::StatsView| v.rules.iter().map(|r| r.received).sum::<u64>();
    let after = stats_until(&relay.control, |v| {
        received(v) - received(&before) >= matched
    });
    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
    assert!(
        exit.stderr.contains(" frames accounted for"),
        "{}",
        exit.stderr
    );
    Run {
        relayed,
        passed,
        passed_frames,
        matched: after.xdp["matched"] - before.xdp["matched"],
        copies: after.copies - before.copies,
        merge: after.rules[0].merge.clone(),
        // Read leniently so that a relay without the counter fails on what it relayed.
        from_metadata: after.xdp.get("vlan_from_metadata").copied().unwrap_or(0)
            - before.xdp.get("vlan_from_metadata").copied().unwrap_or(0),
    }
}

/// `vlan_from_metadata` after a run that relayed `tagged` frames that came with a tag: all of
/// them when the tags came in the metadata, none when they came in the frames.
fn assert_from_metadata(r: &Run, tags: TagIn, tagged: u64) {
    let want = if tags == TagIn::Metadata { tagged } else { 0 };
    assert_eq!(
        r.from_metadata, want,
        "frames whose tag came from the metadata"
    );
}

/// Two #[test]s for `$body(TagIn)`: the tag in the frame, and in the NIC's metadata.
macro_rules! both_ways {
    ($body:ident, $frame:ident, $metadata:ident) => {
        #[test]
        fn $frame() {
            $body(TagIn::Frame);
        }

        #[test]
        fn $metadata() {
            $body(TagIn::Metadata);
        }
    };
}

fn v4(tci: Option<u16>, port: u16) -> Got {
    Got {
        tci,
        group: "239.1.1.1".parse().unwrap(),
        port,
    }
}

/// (a) An input with `vlan: 10` takes frames tagged with VID 10, whatever their priority, and
/// neither VID 20 nor untagged frames, which go to the kernel.
fn an_input_vlan_takes_only_its_vid(tags: TagIn) {
    let yaml = "\
rules:
  - name: v10
    input: { interface: rin, group: 239.1.1.1, port: 5000, vlan: 10 }
    outputs: [{ interface: rout0 }]
";
    let frames = vec![
        frame("239.1.1.1", 5000, Some(10), 1, 64),
        frame("239.1.1.1", 5000, Some(20), 2, 64),
        frame("239.1.1.1", 5000, None, 3, 64),
        // PCP 3.
        frame("239.1.1.1", 5000, Some(0x600a), 4, 64),
    ];
    let r = run(yaml, "lockfree", tags, frames, (2, 2, 2));
    let want: BTreeMap<u64, Got> = [(1, v4(None, 5000)), (4, v4(None, 5000))].into();
    assert_eq!(r.relayed[0], want, "VID 10 relayed, untagged");
    assert_eq!(r.relayed[1], BTreeMap::new());
    assert_eq!(r.passed, [2, 3], "VID 20 and untagged passed to the kernel");
    assert_eq!(r.matched, 2);
    assert_from_metadata(&r, tags, 2);
}

both_ways!(
    an_input_vlan_takes_only_its_vid,
    an_input_vlan_takes_only_its_vid_in_frame,
    an_input_vlan_takes_only_its_vid_in_metadata
);

/// (b) An output without `vlan:` sends untagged (a tag the frame came with is removed), one
/// with `vlan: 30` sends tagged with VID 30 (inserted into an untagged frame; replacing the
/// arrived VID, with its priority kept), and one frame fans out to both. A 1500-byte IP
/// packet still fits the 1500 MTU with a tag: the tag is not part of the IP packet. Both
/// allocators.
fn outputs_strip_or_tag(allocator: &str, tags: TagIn) {
    let yaml = "\
rules:
  - name: trunk
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout0 }, { interface: rout1, vlan: 30 }]
";
    let frames = vec![
        // PCP 5, VID 10.
        frame("239.1.1.1", 5000, Some(0xa00a), 1, 64),
        frame("239.1.1.1", 5000, None, 2, 64),
        // 20 + 8 + 1472 = 1500 bytes of IP.
        frame("239.1.1.1", 5000, None, 3, 1472),
    ];
    let r = run(yaml, allocator, tags, frames, (3, 0, 3));
    let untagged: BTreeMap<u64, Got> = (1..=3).map(|s| (s, v4(None, 5000))).collect();
    assert_eq!(r.relayed[0], untagged, "rout0 sends untagged");
    let tagged: BTreeMap<u64, Got> = [
        (1, v4(Some(0xa01e), 5000)),
        (2, v4(Some(0x001e), 5000)),
        (3, v4(Some(0x001e), 5000)),
    ]
    .into();
    assert_eq!(
        r.relayed[1], tagged,
        "rout1 sends VID 30, the priority kept"
    );
    assert_eq!(r.passed, Vec::<u64>::new());
    assert_eq!((r.matched, r.copies), (3, 3), "one copy per frame");
    assert_from_metadata(&r, tags, 1);
}

#[test]
fn outputs_strip_or_tag_lockfree() {
    outputs_strip_or_tag("lockfree", TagIn::Frame);
}

#[test]
fn outputs_strip_or_tag_mutex() {
    outputs_strip_or_tag("mutex", TagIn::Frame);
}

#[test]
fn outputs_strip_or_tag_in_metadata_lockfree() {
    outputs_strip_or_tag("lockfree", TagIn::Metadata);
}

#[test]
fn outputs_strip_or_tag_in_metadata_mutex() {
    outputs_strip_or_tag("mutex", TagIn::Metadata);
}

/// (c) `vlan: untagged` takes untagged and priority-tagged (VID 0) frames only; a rule for
/// VID 10 on the same group takes that VLAN; VID 11 has no rule and is passed.
fn an_untagged_input_takes_only_untagged_frames(tags: TagIn) {
    let yaml = "\
rules:
  - name: native
    input: { interface: rin, group: 239.1.1.1, port: 5000, vlan: untagged }
    outputs: [{ interface: rout0, vlan: 40 }]
  - name: v10
    input: { interface: rin, group: 239.1.1.1, port: 5000, vlan: 10 }
    outputs: [{ interface: rout1, port: 6000 }]
";
    let frames = vec![
        frame("239.1.1.1", 5000, None, 1, 64),
        frame("239.1.1.1", 5000, Some(10), 2, 64),
        // A priority tag: PCP 3, VID 0.
        frame("239.1.1.1", 5000, Some(0x6000), 3, 64),
        frame("239.1.1.1", 5000, Some(11), 4, 64),
    ];
    let r = run(yaml, "lockfree", tags, frames, (2, 1, 3));
    let native: BTreeMap<u64, Got> = [(1, v4(Some(40), 5000)), (3, v4(Some(0x6028), 5000))].into();
    assert_eq!(r.relayed[0], native);
    let v10: BTreeMap<u64, Got> = [(2, v4(None, 6000))].into();
    assert_eq!(r.relayed[1], v10);
    assert_eq!(r.passed, [4]);
    assert_eq!(r.matched, 3);
    // The priority-tagged frame's tag came in the metadata too.
    assert_from_metadata(&r, tags, 2);
}

both_ways!(
    an_untagged_input_takes_only_untagged_frames,
    an_untagged_input_takes_only_untagged_frames_in_frame,
    an_untagged_input_takes_only_untagged_frames_in_metadata
);

/// QinQ: a frame with two tags is the kernel's, whatever the rules; with the NIC's offload on
/// it takes the outer tag into its metadata and the inner stays in the frame, which the
/// program must not read as the frame's only tag.
fn qinq_is_passed(tags: TagIn) {
    let yaml = "\
rules:
  - name: v10
    input: { interface: rin, group: 239.1.1.1, port: 5000, vlan: 10 }
    outputs: [{ interface: rout0 }]
  - name: any
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [{ interface: rout1 }]
";
    let mut qinq = frame("239.1.1.1", 5000, Some(10), 1, 64);
    qinq.splice(12..12, [0x88, 0xa8, 0x00, 0x0a]);
    let frames = vec![qinq, frame("239.1.1.1", 5000, Some(10), 2, 64)];
    let r = run(yaml, "lockfree", tags, frames, (1, 1, 1));
    assert_eq!(
        r.relayed[0],
        [(2, v4(None, 5000))].into(),
        "only the single tag"
    );
    assert_eq!(r.relayed[1], BTreeMap::new(), "QinQ reaches no rule");
    assert_eq!(r.passed_frames, 1, "QinQ is the kernel's");
    assert_eq!(r.matched, 1);
    assert_from_metadata(&r, tags, 1);
}

both_ways!(
    qinq_is_passed,
    qinq_is_passed_in_frame,
    qinq_is_passed_in_metadata
);

/// (d) IPv6: VID 10 taken and fanned out untagged and, remapped, tagged with VID 30; VID 20
/// and untagged frames passed.
fn ipv6_tagged_frames(tags: TagIn) {
    let yaml = "\
rules:
  - name: v6
    input: { interface: rin, group: 'ff18::1:1', port: 5000, vlan: 10 }
    outputs:
      - { interface: rout0 }
      - { interface: rout1, group: 'ff18::2:2', port: 6000, vlan: 30 }
";
    let frames = vec![
        // PCP 1.
        frame("ff18::1:1", 5000, Some(0x200a), 1, 64),
        frame("ff18::1:1", 5000, Some(20), 2, 64),
        frame("ff18::1:1", 5000, None, 3, 64),
        frame("ff18::1:1", 5000, Some(10), 4, 1000),
    ];
    let r = run(yaml, "lockfree", tags, frames, (2, 2, 2));
    let g1: IpAddr = "ff18::1:1".parse().unwrap();
    let g2: IpAddr = "ff18::2:2".parse().unwrap();
    let got = |tci, group, port| Got { tci, group, port };
    let want0: BTreeMap<u64, Got> = [(1, got(None, g1, 5000)), (4, got(None, g1, 5000))].into();
    assert_eq!(r.relayed[0], want0);
    let want1: BTreeMap<u64, Got> = [
        (1, got(Some(0x201e), g2, 6000)),
        (4, got(Some(0x001e), g2, 6000)),
    ]
    .into();
    assert_eq!(r.relayed[1], want1);
    assert_eq!(r.passed, [2, 3]);
    assert_eq!((r.matched, r.copies), (2, 2));
    assert_from_metadata(&r, tags, 2);
}

both_ways!(
    ipv6_tagged_frames,
    ipv6_tagged_frames_in_frame,
    ipv6_tagged_frames_in_metadata
);

/// A reload that changes an input's VLAN and one output's VLAN: frames follow the new rules
/// at once, and counters carry over only for the output whose identity (interface, group,
/// port, TTL, VLAN) stayed the same.
#[test]
fn a_reload_moves_vlans_and_keeps_counters_by_output_identity() {
    require_root();
    let topo = Topology::new(2).unwrap();
    let macs: Vec<[u8; 6]> = topo
        .receivers
        .iter()
        .map(|r| common::mac_of(&topo, &r.relay_iface))
        .collect();
    let rules = |input_vlan: u16, out_vlan: u16| {
        format!(
            "rules:
  - name: trunk
    input: {{ interface: rin, group: 239.1.1.1, port: 5000, vlan: {input_vlan} }}
    outputs: [{{ interface: rout0, vlan: {out_vlan} }}, {{ interface: rout1 }}]
"
        )
    };
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &rules(10, 30), &[]).unwrap();
    let mut limits = Limits::new(3);
    limits.idle = Duration::from_secs(6);
    let captures: Vec<_> = topo
        .receivers
        .iter()
        .map(|r| capture_tagged(&r.ns, &r.iface, limits, is_relayed).unwrap())
        .collect();
    let send = |frames: Vec<Vec<u8>>| {
        join(inject(&topo.sender, SENDER_IF, frames, Duration::from_millis(5)).unwrap()).unwrap()
    };
    let sent = |v: &relay::stats::StatsView| -> Vec<u64> {
        v.rules[0].outputs.iter().map(|o| o.sent).collect()
    };
    send(vec![
        frame("239.1.1.1", 5000, Some(10), 1, 64),
        frame("239.1.1.1", 5000, Some(10), 2, 64),
    ]);
    let v = stats_until(&relay.control, |v| sent(v) == [2, 2]);
    assert_eq!(sent(&v), [2, 2], "{v:?}");

    // The control socket's path stays: it is the first line of the file the relay wrote.
    let config = std::fs::read_to_string(&relay.config).unwrap();
    let control = config.lines().next().unwrap();
    std::fs::write(&relay.config, format!("{control}\n{}", rules(11, 31))).unwrap();
    let out = std::process::Command::new(relay_bin())
        .args(["reload", "--control"])
        .arg(&relay.control)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = stats_until(&relay.control, |v| {
        v.rules[0].input.vlan == Some(relay::vlan::Vlan::Id(11))
    });
    assert_eq!(v.rules[0].input.to_string(), "rin 239.1.1.1:5000 vlan 11");
    assert_eq!(
        sent(&v),
        [0, 2],
        "rout0's VLAN changed, so it is a new output; rout1's counters carry over"
    );
    assert_eq!(
        (v.rules[0].outputs[0].vlan, v.rules[0].outputs[1].vlan),
        (Some(31), None)
    );

    send(vec![
        frame("239.1.1.1", 5000, Some(10), 3, 64),
        frame("239.1.1.1", 5000, Some(11), 4, 64),
    ]);
    let v = stats_until(&relay.control, |v| sent(v) == [1, 3]);
    assert_eq!(sent(&v), [1, 3], "{v:?}");
    let got: Vec<BTreeMap<u64, Option<u16>>> = captures
        .into_iter()
        .zip(&macs)
        .map(|(c, mac)| {
            join(c)
                .unwrap()
                .iter()
                .map(|f| {
                    let (seq, got) = verify(f, *mac);
                    (seq, got.tci)
                })
                .collect()
        })
        .collect();
    assert_eq!(
        got[0],
        [(1, Some(30)), (2, Some(30)), (4, Some(31))].into(),
        "VID 10 before the reload, VID 11 after; tagged 30, then 31"
    );
    assert_eq!(got[1], [(1, None), (2, None), (4, None)].into());
    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert!(
        exit.stdout
            .contains("output=rout0 group=239.1.1.1 port=5000 vlan=31 sent=1 "),
        "{}",
        exit.stdout
    );
}

/// Merged legs on one trunk, told apart by VID (a red/blue pair carried as two VLANs): each
/// sequence number goes out once on each output, from whichever leg brought it first, the
/// tagged output keeping the priority of that leg's frame; frames on other VIDs or untagged
/// are the kernel's; the merge counts each leg's firsts, duplicates and gaps. `group` picks
/// the family: the VLAN offsets and the merge's payload offset move with the IP header.
fn merged_legs_on_vlans(allocator: &str, group: &str, tags: TagIn) {
    let yaml = format!(
        "\
rules:
  - name: ab
    inputs:
      - {{ interface: rin, group: '{group}', port: 5000, vlan: 10 }}
      - {{ interface: rin, group: '{group}', port: 5000, vlan: 20 }}
    merge: {{ offset: 0, bytes: 8 }}
    outputs: [{{ interface: rout0 }}, {{ interface: rout1, vlan: 30 }}]
"
    );
    let got = |tci| Got {
        tci,
        group: group.parse().unwrap(),
        port: 5000,
    };
    // Leg A (PCP 0, VID 10) misses every fifth number, leg B (PCP 3, VID 20) every seventh,
    // so 35 is carried by neither; A's copy of a number is sent before B's.
    let (a, b) = (0x000a, 0x6014);
    let mut frames = Vec::new();
    for seq in 1..=40u64 {
        if seq % 5 != 0 {
            frames.push(frame(group, 5000, Some(a), seq, 64));
        }
        if seq % 7 != 0 {
            frames.push(frame(group, 5000, Some(b), seq, 64));
        }
    }
    frames.push(frame(group, 5000, None, 100, 64));
    frames.push(frame(group, 5000, Some(30), 101, 64));
    let carried: Vec<u64> = (1..=40).filter(|s| *s != 35).collect();
    let r = run(&yaml, allocator, tags, frames, (carried.len(), 2, 32 + 35));
    let untagged: BTreeMap<u64, Got> = carried.iter().map(|&s| (s, got(None))).collect();
    assert_eq!(r.relayed[0], untagged, "rout0: each number once, untagged");
    // Where A missed a number, B's frame went first, and its priority with it.
    let tagged: BTreeMap<u64, Got> = carried
        .iter()
        .map(|&s| (s, got(Some(if s % 5 == 0 { 0x601e } else { 0x001e }))))
        .collect();
    assert_eq!(
        r.relayed[1], tagged,
        "rout1: VID 30, the first leg's priority"
    );
    assert_eq!(
        r.passed,
        vec![100, 101],
        "other VIDs and untagged frames are the kernel's"
    );
    assert_eq!(
        r.matched,
        32 + 35,
        "the XDP program takes both legs' frames"
    );
    assert_eq!(
        r.copies,
        carried.len() as u64,
        "duplicates are dropped before any copy"
    );
    let m = r.merge.as_ref().expect("a merged rule");
    assert_eq!((m.relayed, m.lost, m.malformed), (39, 1, 0), "{m:?}");
    let legs: Vec<[u64; 4]> = m
        .legs
        .iter()
        .map(|l| [l.received, l.first, l.duplicate, l.gaps])
        .collect();
    // A: 32 received, all first; it skipped 5, 10, ... 35 before a later number (40, its
    // last miss, has nothing after it). B: 35 received, first only where A missed (5, 10,
    // 15, 20, 25, 30, 40); it skipped 7, 14, 21, 28 and 35.
    assert_eq!(legs, vec![[32, 32, 0, 7], [35, 7, 28, 5]], "{m:?}");
    assert_from_metadata(&r, tags, 32 + 35);
}

#[test]
fn merged_legs_on_vlans_lockfree() {
    merged_legs_on_vlans("lockfree", "239.1.1.1", TagIn::Frame);
}

#[test]
fn merged_legs_on_vlans_mutex() {
    merged_legs_on_vlans("mutex", "239.1.1.1", TagIn::Frame);
}

#[test]
fn merged_legs_on_vlans_ipv6_lockfree() {
    merged_legs_on_vlans("lockfree", "ff18::1:1", TagIn::Frame);
}

#[test]
fn merged_legs_on_vlans_ipv6_mutex() {
    merged_legs_on_vlans("mutex", "ff18::1:1", TagIn::Frame);
}

#[test]
fn merged_legs_on_vlans_in_metadata_lockfree() {
    merged_legs_on_vlans("lockfree", "239.1.1.1", TagIn::Metadata);
}

#[test]
fn merged_legs_on_vlans_ipv6_in_metadata_mutex() {
    merged_legs_on_vlans("mutex", "ff18::1:1", TagIn::Metadata);
}
