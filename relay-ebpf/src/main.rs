//! The relay's XDP program.
//!
//! Runs on every frame that arrives on an ingress interface. Multicast UDP (IPv4 or IPv6) that
//! matches a rule is redirected into the AF_XDP socket bound to the frame's rx queue; every other frame
//! is passed to the kernel untouched. The program never modifies a frame: rewriting happens in
//! userspace, per output.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, XskMap},
    programs::XdpContext,
};
use relay_common::{
    ExactKey, FULL_LEN, FragKey, MAX_FRAG_FLOWS, MAX_INGRESS_IFACES, MAX_QUEUES_PER_IFACE,
    MAX_RULE_KEYS, RuleKey, RuleValue, SHAPE_GROUP, SHAPE_PORT, SHAPE_RANGES, SHAPE_SOURCE,
    SHAPE_SOURCE_PORT, SHAPE_TUPLES_HALF, SHAPE_TUPLES_SHIFT, SHAPE_UNICAST, SHAPE_VLAN_SHIFT,
    SHAPES_VLAN, TUPLE_PORT, TUPLE_SLOTS, TUPLE_V4, TUPLE_VLAN, Tuple, VLAN_ANY, VlanHint,
    XSK_MAP_SIZE, XdpCounter, frame_vlan, v4_mapped,
};

#[map(name = "XSKS")]
static XSKS: XskMap = XskMap::with_max_entries(XSK_MAP_SIZE, 0);

#[map(name = "RULES")]
static RULES: HashMap<ExactKey, RuleValue> = HashMap::with_max_entries(MAX_RULE_KEYS, 0);

/// The range keys, apart so that exact keys stay 40 bytes. Allocated per entry
/// (BPF_F_NO_PREALLOC): most relays have no range, and the map then costs next to nothing.
#[map(name = "RANGE_RULES")]
static RANGE_RULES: HashMap<RuleKey, RuleValue> =
    HashMap::with_max_entries(MAX_RULE_KEYS, BPF_F_NO_PREALLOC);

/// The map flag for a hash map whose entries are allocated as they are added.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Which key shapes the rule map holds, so a lookup that cannot hit is not made.
#[map(name = "SHAPES")]
static SHAPES: Array<u32> = Array::with_max_entries(1, 0);

/// The tuples of the rule map's keys, most specific first, when some key is a range: two
/// halves, the one in use named by `SHAPES` (see relay_common::SHAPE_TUPLES_HALF).
#[map(name = "TUPLES")]
static TUPLES: Array<Tuple> = Array::with_max_entries(2 * TUPLE_SLOTS, 0);

/// Slot 0: `relay_ranges`, which `relay` tail-calls when some rule is a range; slot 1:
/// `relay_ranges_hinted`, the same for `relay_hinted`. Two programs rather than one branch:
/// with the tuple walk in the same function, the compiler's code for the exact lookups got
/// slower by a few nanoseconds a frame (measured with `cargo xtask bench-xdp`), and exact-only
/// rule sets are to cost what they did; and the verifier took seconds over the two together.
#[map(name = "RANGE_PROG")]
static RANGE_PROG: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// The rule each fragmented datagram's first fragment matched, for its later fragments.
#[map(name = "FRAGS")]
static FRAGS: LruHashMap<FragKey, RuleValue> = LruHashMap::with_max_entries(MAX_FRAG_FLOWS, 0);

/// Where the VLAN-hint front (vlan_hint.bpf.c) leaves the tag the NIC took off the frame it
/// is running on, for `relay_hinted`, which it tail-calls on the same CPU.
#[map(name = "VLAN_HINTS")]
static VLAN_HINTS: PerCpuArray<VlanHint> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(XdpCounter::COUNT, 0);

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers the program steps over (hop-by-hop, routing, destination options);
/// a fragment header (44) or anything else ends the walk and the frame is passed.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_FRAGMENT: u8 = 44;
/// IPv4 flags and fragment offset: more fragments, and the offset's 13 bits.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// At most this many extension headers before UDP; more are passed to the kernel. The same
/// bound as the daemon's parser (relay::wire::IPV6_MAX_EXT_HEADERS).
const IPV6_MAX_EXT_HEADERS: usize = 4;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
const UDP_HLEN: usize = 8;

/// The longest frame an AF_XDP socket can take: the UMEM frame size less the kernel's
/// headroom. The daemon sets it when it loads the program (a read-only global).
#[unsafe(no_mangle)]
static MAX_FRAME_LEN: u32 = 2048 - relay_common::XDP_PACKET_HEADROOM;

/// The program the daemon attaches. Without ranges it looks up the exact shapes itself;
/// with ranges it hands the frame to `relay_ranges` (see `classify`).
#[xdp]
pub fn relay(ctx: XdpContext) -> u32 {
    count(XdpCounter::Seen);
    run::<false>(&ctx)
}

/// `relay` when some rule is a range: the same parse, then the tuple walk. Reached only by
/// `relay`'s tail call, which has counted the frame as seen.
#[xdp]
pub fn relay_ranges(ctx: XdpContext) -> u32 {
    run::<true>(&ctx)
}

/// `relay` behind the VLAN-hint front, which the daemon attaches to devices whose driver
/// gives the VLAN tag it took off (rx-vlan-offload) as XDP metadata: the front has left that
/// tag in `VLAN_HINTS`. It counts as the frame's own, and a frame that goes to a socket gets
/// it back in its header, so the workers see the frame as it was on the wire. With ranges it
/// hands the frame to `relay_ranges_hinted`.
#[xdp]
pub fn relay_hinted(ctx: XdpContext) -> u32 {
    count(XdpCounter::Seen);
    run_hinted::<false>(&ctx)
}

/// `relay_ranges` for `relay_hinted`, which tail-calls it; the front's slot in `VLAN_HINTS`
/// still holds this frame's tag, as nothing else runs on this CPU in between.
#[xdp]
pub fn relay_ranges_hinted(ctx: XdpContext) -> u32 {
    run_hinted::<true>(&ctx)
}

#[inline(always)]
fn run_hinted<const RANGES: bool>(ctx: &XdpContext) -> u32 {
    let hint = match VLAN_HINTS.get(0) {
        Some(h) if h.present != 0 => Some(Hint {
            proto: h.proto,
            tci: h.tci,
        }),
        _ => None,
    };
    verdict(ctx, classify::<RANGES, true>(ctx, hint), hint)
}

/// A VLAN tag from the NIC's metadata: its TPID as on the wire (big-endian) and its TCI
/// (priority, DEI and VID) in host order.
#[derive(Clone, Copy)]
struct Hint {
    proto: u16,
    tci: u16,
}

/// Classifies and steers or passes one frame; `RANGES`: this is `relay_ranges`.
#[inline(always)]
fn run<const RANGES: bool>(ctx: &XdpContext) -> u32 {
    verdict(ctx, classify::<RANGES, false>(ctx, None), None)
}

#[inline(always)]
fn verdict(ctx: &XdpContext, found: Option<RuleValue>, hint: Option<Hint>) -> u32 {
    match found {
        Some(rule) => steer(ctx, rule, hint),
        None => {
            count(XdpCounter::Passed);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn steer(ctx: &XdpContext, rule: RuleValue, hint: Option<Hint>) -> u32 {
    count(XdpCounter::Matched);
    // SAFETY: a read of a u32 global; volatile, so the value the loader set is the one used
    // rather than the compile-time default.
    let max = unsafe { core::ptr::read_volatile(&MAX_FRAME_LEN) } as usize;
    // A tag put back into the frame makes it four bytes longer. Taken off the limit, not
    // added to the length: the verifier refuses arithmetic on the frame's end.
    let max = if hint.is_some() {
        max.saturating_sub(VLAN_HLEN)
    } else {
        max
    };
    if ctx.data_end() - ctx.data() > max {
        // The socket would drop it (ENOSPC) and no counter of ours would show it.
        count(XdpCounter::Oversize);
        count(XdpCounter::Passed);
        return xdp_action::XDP_PASS;
    }
    let queue = ctx.rx_queue_index();
    // The rule's key named the ingress interface, and its value carries that interface's slot.
    let slot = rule.slot;
    if slot >= MAX_INGRESS_IFACES {
        return redirect_failed();
    }
    if queue >= MAX_QUEUES_PER_IFACE {
        return redirect_failed();
    }
    // The socket gets the frame as it was on the wire: the tag back in its header.
    if let Some(h) = hint
        && !push_tag(ctx, h)
    {
        return redirect_failed();
    }
    // The low bits of the flags are the action bpf_redirect_map returns when the XSKMAP slot
    // is empty: pass the frame rather than drop it, so a relay that is starting or stopping
    // never blackholes traffic.
    match XSKS.redirect(
        slot * MAX_QUEUES_PER_IFACE + queue,
        xdp_action::XDP_PASS as u64,
    ) {
        Ok(action) if action == xdp_action::XDP_REDIRECT => {
            count(XdpCounter::Redirected);
            if hint.is_some() {
                count(XdpCounter::VlanFromMetadata);
            }
            action
        }
        // The kernel gets the frame as the NIC gave it: the tag in the skb's metadata only.
        _ => {
            if hint.is_some() {
                pop_tag(ctx);
            }
            redirect_failed()
        }
    }
}

/// Puts a tag from the NIC's metadata into the frame's header, after the MACs: the frame
/// grows by four bytes at the front. False if it could not.
#[inline(always)]
fn push_tag(ctx: &XdpContext, h: Hint) -> bool {
    // SAFETY: the program's own context; the kernel checks the headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(VLAN_HLEN as i32)) } != 0 {
        return false;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + VLAN_HLEN > end {
        return false;
    }
    let proto = if h.proto == 0 {
        ETH_P_8021Q.to_be()
    } else {
        h.proto
    };
    // SAFETY: the check above proves the first 18 bytes lie inside the frame: the MACs move
    // from four bytes in to the front, and the tag fills the four bytes after them.
    unsafe {
        let p = start as *mut u8;
        core::ptr::copy(p.add(VLAN_HLEN), p, 12);
        core::ptr::write_unaligned(p.add(12) as *mut u16, proto);
        core::ptr::write_unaligned(p.add(14) as *mut u16, h.tci.to_be());
    }
    true
}

/// Undoes [`push_tag`].
#[inline(always)]
fn pop_tag(ctx: &XdpContext) {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + VLAN_HLEN > end {
        return;
    }
    // SAFETY: the first 18 bytes lie inside the frame (checked above): the MACs move back
    // over the tag, and the head then drops the four bytes in front of them.
    unsafe {
        let p = start as *mut u8;
        core::ptr::copy(p, p.add(VLAN_HLEN), 12);
        bpf_xdp_adjust_head(ctx.ctx, VLAN_HLEN as i32);
    }
}

#[inline(always)]
fn redirect_failed() -> u32 {
    count(XdpCounter::RedirectFailed);
    count(XdpCounter::Passed);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(counter: XdpCounter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the per-CPU slot belongs to this CPU and the program cannot be preempted
        // while it runs, so nothing else writes it concurrently.
        unsafe { *value += 1 };
    }
}

/// Returns a pointer to `N` bytes at `offset`, or `None` when the frame is too short.
#[inline(always)]
fn bytes_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + N > end {
        return None;
    }
    // SAFETY: the check above proves [start+offset, start+offset+N) lies inside the frame, and
    // the verifier sees the same comparison against data_end.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) })
}

/// Parses Ethernet (one optional VLAN tag), IPv4 or IPv6 and UDP, and looks the frame up in
/// the rule map. `None` for anything that is not a UDP frame of a rule (to a group, or to the
/// unicast destination of a rule that names one), or a later fragment of a datagram whose
/// first fragment matched one.
/// Two tags (QinQ) end the parse: the inner ethertype is a tag, not IP, so such frames are
/// passed, never relayed with a VLAN the rules did not name.
#[inline(always)]
fn classify<const RANGES: bool, const HINTED: bool>(
    ctx: &XdpContext,
    hint: Option<Hint>,
) -> Option<RuleValue> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes(bytes_at::<2>(ctx, 12)?);
    let mut tci = hint.map(|h| h.tci);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if tci.is_some() {
            // The NIC took the outer of two tags: QinQ, passed as a pair in the frame is.
            return None;
        }
        let tag = bytes_at::<4>(ctx, ETH_HLEN)?;
        tci = Some(u16::from_be_bytes([tag[0], tag[1]]));
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        l3 += VLAN_HLEN;
    }
    // The key is filled in place, as the BPF stack (512 bytes) has no room for copies of it.
    let mut key = RuleKey {
        // SAFETY: the ifindex field of a valid xdp_md.
        ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
        group: [0; 16],
        source: [0; 16],
        port: [0; 2],
        vlan: frame_vlan(tci),
        glen: FULL_LEN,
        slen: FULL_LEN,
        pad: 0,
    };
    // Only the shapes some rule has are looked up: most rule sets name no source and no VLAN,
    // and then one lookup is made, not eight. Unicast is parsed at all only when a rule
    // takes a unicast destination. Read here, where it was read before ranges existed, and
    // not at the program's entry: the exact path is then the code it was, and measures so.
    // `relay_ranges` reads it again, as a reload may have flipped it since, and the tuple
    // count and half come with the flag.
    let shapes = SHAPES.get(0).copied().unwrap_or(0);
    if !RANGES && shapes & SHAPE_RANGES != 0 {
        // SAFETY: a tail call: on success control never comes back, and this program has
        // nothing to release. It fails only if the slot is empty, and the loader fills both
        // before it writes any rule, so the exact path below never sees a range rule set.
        unsafe { RANGE_PROG.tail_call(ctx, u32::from(HINTED)) };
    }
    let unicast = shapes & SHAPE_UNICAST != 0;
    let (l4, frag) = match ethertype {
        ETH_P_IP => ipv4(ctx, l3, &mut key, unicast)?,
        ETH_P_IPV6 => ipv6(ctx, l3, &mut key, unicast)?,
        _ => return None,
    };
    if let Frag::Later(id) = frag {
        return later_fragment(&key, id, key.vlan);
    }
    let udp = bytes_at::<UDP_HLEN>(ctx, l4)?;
    key.port = [udp[2], udp[3]];

    // A hit leaves the key's source zeroed if the rule has none, and its VLAN "any"; the
    // tuple walk puts the frame's group and source back.
    let (source, vlan) = (key.source, key.vlan);
    let found = if RANGES && shapes & SHAPE_RANGES != 0 {
        find_in_tuples(&mut key, shapes, ethertype == ETH_P_IP)
    } else {
        find_rule(&mut key, shapes)
    };
    if found == NO_RULE {
        return None;
    }
    let rule = RuleValue {
        rule_id: found as u32,
        slot: (found >> 32) as u32,
    };
    if let Frag::First(id) = frag {
        // The later fragments carry no ports, so they follow what the first one matched.
        // A full map drops its least recently used entry: a datagram long since complete.
        // Keyed on the frame's own group, not the range: the datagram is what is remembered.
        key.source = source;
        let _ = FRAGS.insert(&frag_key(&key, id, vlan), &rule, 0);
    }
    Some(rule)
}

/// The fragment map's key for a datagram of `key`'s ingress, VLAN, source and group. `vlan`
/// is the frame's, as `key.vlan` may have become "any" in the lookups.
#[inline(always)]
fn frag_key(key: &RuleKey, id: [u8; 4], vlan: u16) -> FragKey {
    FragKey {
        ifindex: key.ifindex,
        id,
        source: key.source,
        group: key.group,
        vlan,
        pad: 0,
    }
}

/// The rule of a later fragment: the one its datagram's first fragment matched, if that has
/// been seen. Otherwise the fragment goes to the kernel: the relay never reassembles.
#[inline(always)]
fn later_fragment(key: &RuleKey, id: [u8; 4], vlan: u16) -> Option<RuleValue> {
    // SAFETY: RuleValue is two plain u32s; an update or eviction racing this read yields
    // another valid value or none.
    match unsafe { FRAGS.get(&frag_key(key, id, vlan)) } {
        Some(rule) => {
            count(XdpCounter::Fragments);
            Some(*rule)
        }
        None => {
            count(XdpCounter::FragmentsUnknown);
            None
        }
    }
}

/// What the lookups below return for "no rule". They pass a rule's value as a plain u64 (slot
/// in the high half, rule id in the low) rather than `Option<RuleValue>`: a `None` leaves the
/// payload undefined, and LLVM may then shift an uninitialised register while packing the
/// option, which the verifier refuses.
const NO_RULE: u64 = u64::MAX;

#[inline(always)]
fn packed(v: &RuleValue) -> u64 {
    (v.slot as u64) << 32 | v.rule_id as u64
}

/// The rule map lookups, in the same order as the daemon's matcher
/// (relay::rules::RuleTable::lookup): the frame's own VLAN (or "untagged") before any VLAN, as
/// a VLAN is an interface of its own. [`NO_RULE`] when none matches.
#[inline(always)]
fn find_rule(key: &mut RuleKey, shapes: u32) -> u64 {
    if shapes & SHAPES_VLAN != 0 {
        let rule = lookup_shapes(key, shapes >> SHAPE_VLAN_SHIFT);
        if rule != NO_RULE {
            return rule;
        }
    }
    key.vlan = VLAN_ANY;
    lookup_shapes(key, shapes)
}

/// The rule map lookups when some rule is a range, in the same order as the daemon's matcher
/// (relay::rules::RuleTable::lookup): the tuples in use, most specific first, skipping those
/// of the other family; for each, the frame's group and source masked to its lengths, its
/// port or none, its VLAN or any. The first hit wins. `key` comes with the frame's fields
/// and leaves with its group and source as they came (the fragment map wants them).
#[inline(always)]
fn find_in_tuples(key: &mut RuleKey, shapes: u32, v4: bool) -> u64 {
    let count = (shapes >> SHAPE_TUPLES_SHIFT) & 0xff;
    let base = if shapes & SHAPE_TUPLES_HALF != 0 {
        TUPLE_SLOTS
    } else {
        0
    };
    let family = if v4 { TUPLE_V4 } else { 0 };
    let (group, source, port, vlan) = (
        u128::from_ne_bytes(key.group),
        u128::from_ne_bytes(key.source),
        key.port,
        key.vlan,
    );
    let mut rule = NO_RULE;
    // Bounded by the array's half, which the verifier sees; the count ends it sooner.
    for i in 0..TUPLE_SLOTS {
        if i >= count {
            break;
        }
        let Some(t) = TUPLES.get(base + i) else {
            break;
        };
        if t.flags & TUPLE_V4 != family {
            continue;
        }
        key.group = (group & u128::from_ne_bytes(t.group_mask)).to_ne_bytes();
        key.source = (source & u128::from_ne_bytes(t.source_mask)).to_ne_bytes();
        key.port = if t.flags & TUPLE_PORT != 0 {
            port
        } else {
            [0; 2]
        };
        key.vlan = if t.flags & TUPLE_VLAN != 0 {
            vlan
        } else {
            VLAN_ANY
        };
        key.glen = t.glen;
        key.slen = t.slen;
        rule = if t.is_exact() {
            lookup(key.exact())
        } else {
            lookup_range(key)
        };
        if rule != NO_RULE {
            break;
        }
    }
    key.group = group.to_ne_bytes();
    key.source = source.to_ne_bytes();
    rule
}

/// Looks `key` up in the four shapes whose `SHAPE_*` bits are set in `shapes`, most specific
/// first. A miss leaves `key` as it came (the frame's source and port), for the next call.
/// The keys are exact, in the exact map: one group, one source or any (all zero), so the
/// key's lengths are not looked at.
#[inline(always)]
fn lookup_shapes(key: &mut RuleKey, shapes: u32) -> u64 {
    let (source, port) = (key.source, key.port);
    if shapes & SHAPE_SOURCE_PORT != 0 {
        let rule = lookup(key.exact());
        if rule != NO_RULE {
            return rule;
        }
    }
    // The source is more specific than the port.
    key.port = [0; 2];
    if shapes & SHAPE_SOURCE != 0 {
        let rule = lookup(key.exact());
        if rule != NO_RULE {
            return rule;
        }
    }
    key.source = [0; 16];
    key.port = port;
    if shapes & SHAPE_PORT != 0 {
        let rule = lookup(key.exact());
        if rule != NO_RULE {
            return rule;
        }
    }
    key.port = [0; 2];
    let rule = if shapes & SHAPE_GROUP != 0 {
        lookup(key.exact())
    } else {
        NO_RULE
    };
    key.source = source;
    key.port = port;
    rule
}

/// Where a packet stands in its datagram's fragments: the identification, as the bytes of
/// the IP header (IPv4) or fragment header (IPv6) hold it.
#[derive(Clone, Copy)]
enum Frag {
    /// Not fragmented (an IPv6 atomic fragment, offset 0 without more to come, included).
    Whole,
    /// Offset 0, more to come: it carries the UDP header.
    First([u8; 4]),
    /// Offset above 0: no UDP header.
    Later([u8; 4]),
}

/// An IPv4 UDP packet to a group (or to any address when `unicast`): its (source, group)
/// into `key`, and where the UDP header (or, in a later fragment, the fragment's data)
/// starts and where it stands among its fragments.
#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize, key: &mut RuleKey, unicast: bool) -> Option<(usize, Frag)> {
    // Version/IHL .. TTL/protocol: the first 10 bytes, then the addresses at 12..20.
    let head = bytes_at::<10>(ctx, l3)?;
    if head[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((head[0] & 0x0f) as usize) * 4;
    if ihl < 20 || head[9] != IPPROTO_UDP {
        return None;
    }
    let flags = u16::from_be_bytes([head[6], head[7]]);
    let id = [0, 0, head[4], head[5]];
    let frag = if flags & IP_OFFSET != 0 {
        Frag::Later(id)
    } else if flags & IP_MF != 0 {
        Frag::First(id)
    } else {
        Frag::Whole
    };
    let addrs = bytes_at::<8>(ctx, l3 + 12)?;
    if addrs[4] & 0xf0 != 0xe0 && !unicast {
        return None;
    }
    key.source = v4_mapped([addrs[0], addrs[1], addrs[2], addrs[3]]);
    key.group = v4_mapped([addrs[4], addrs[5], addrs[6], addrs[7]]);
    Some((l3 + ihl, frag))
}

/// An IPv6 UDP packet to a group (ff00::/8; any address when `unicast`), after at most four
/// hop-by-hop, routing or
/// destination-options headers and then, if fragmented, a fragment header: its (source,
/// group) into `key`, and where the UDP header (or a later fragment's data) starts and where
/// it stands among its fragments. Chains the walk does not finish are left to the kernel.
#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize, key: &mut RuleKey, unicast: bool) -> Option<(usize, Frag)> {
    let head = bytes_at::<8>(ctx, l3)?;
    if head[0] >> 4 != 6 {
        return None;
    }
    key.source = bytes_at::<16>(ctx, l3 + 8)?;
    key.group = bytes_at::<16>(ctx, l3 + 24)?;
    if key.group[0] != 0xff && !unicast {
        return None;
    }
    let mut next = head[6];
    let mut off = l3 + IPV6_HLEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        if next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST {
            break;
        }
        let ext = bytes_at::<2>(ctx, off)?;
        next = ext[0];
        // Hdr Ext Len counts 8-octet units beyond the first, so a header is 8 to 2048 bytes.
        off += (ext[1] as usize + 1) * 8;
    }
    let mut frag = Frag::Whole;
    if next == NEXTHDR_FRAGMENT {
        // Next header, reserved, offset (13 bits) / reserved (2) / M (1), identification.
        let fh = bytes_at::<8>(ctx, off)?;
        let id = [fh[4], fh[5], fh[6], fh[7]];
        let offset = u16::from_be_bytes([fh[2], fh[3]]) >> 3;
        off += 8;
        if offset != 0 {
            // What follows is the middle of the datagram, whatever its first header said.
            return Some((off, Frag::Later(id)));
        }
        if fh[3] & 1 != 0 {
            frag = Frag::First(id);
        }
        next = fh[0];
    }
    (next == IPPROTO_UDP).then_some((off, frag))
}

#[inline(always)]
fn lookup(key: &ExactKey) -> u64 {
    // SAFETY: RuleValue is two plain u32s, so any bytes read are a valid value; an update
    // racing this read can only change the rule id (a key's slot is its ingress's, which does
    // not change while the key is in the map).
    match unsafe { RULES.get(key) } {
        Some(v) => packed(v),
        None => NO_RULE,
    }
}

#[inline(always)]
fn lookup_range(key: &RuleKey) -> u64 {
    // SAFETY: as in `lookup`.
    match unsafe { RANGE_RULES.get(key) } {
        Some(v) => packed(v),
        None => NO_RULE,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
