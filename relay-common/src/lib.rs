//! Types shared by the relay daemon and its XDP program.
//!
//! Everything here is `#[repr(C)]` plain data: the XDP program reads these from BPF maps and the
//! daemon writes them with aya. Addresses and ports are kept in network byte order exactly as
//! they sit in a frame, so the XDP program can build a key from packet bytes without swapping.
#![no_std]

/// Name of the XSKMAP that the XDP program redirects matches into.
pub const XSK_MAP: &str = "XSKS";
/// Name of the hash map from an exact key (ingress interface, one group, one source or any,
/// port or any, VLAN or any; see [`ExactKey`]) to rule id.
pub const RULE_MAP: &str = "RULES";
/// Name of the hash map from a range key (a [`RuleKey`] whose group or source is a prefix
/// shorter than one address) to rule id. Apart from [`RULE_MAP`] so that exact keys stay
/// 40 bytes: every exact lookup hashes the whole key, and a frame of an exact-only rule
/// set is looked up as it was before ranges existed.
pub const RANGE_RULE_MAP: &str = "RANGE_RULES";
/// Name of the one-entry array saying which key shapes the rule map holds (`SHAPE_*` bits),
/// so the XDP program skips lookups that cannot hit.
pub const SHAPE_MAP: &str = "SHAPES";

/// A rule with a source and a port: the (S,G,P) lookup.
pub const SHAPE_SOURCE_PORT: u32 = 1;
/// A rule with a source and any port: (S,G,*).
pub const SHAPE_SOURCE: u32 = 2;
/// A rule with any source and a port: (*,G,P).
pub const SHAPE_PORT: u32 = 4;
/// A rule with any source and any port: (*,G,*).
pub const SHAPE_GROUP: u32 = 8;
/// The same four shapes for keys that name a VLAN (`vlan: N` or `vlan: untagged`): the base
/// shape's bit shifted by this much. Kept apart so rules without `vlan:` cost no extra lookup.
pub const SHAPE_VLAN_SHIFT: u32 = 4;
/// Every shape of a key that names a VLAN.
pub const SHAPES_VLAN: u32 = 0xf << SHAPE_VLAN_SHIFT;
/// Some key's destination is a unicast address (an input `destination:`): only then does
/// the program look unicast UDP up at all, so a relay of groups alone passes the host's own
/// unicast traffic after one comparison, as it always did.
pub const SHAPE_UNICAST: u32 = 1 << 8;
/// Some key is a range: a group prefix shorter than one group, or a source prefix shorter
/// than one source. Then the program does not use the shape bits above but walks the
/// tuples in [`TUPLE_MAP`] (how many: [`SHAPE_TUPLES_SHIFT`]; which half:
/// [`SHAPE_TUPLES_HALF`]). Without it, exact-only rule sets take the shape-bit path, as
/// fast as before ranges existed.
pub const SHAPE_RANGES: u32 = 1 << 9;
/// Bits 16..24 of `SHAPES` hold the number of tuples in use, when [`SHAPE_RANGES`] is set.
pub const SHAPE_TUPLES_SHIFT: u32 = 16;
/// Set: the tuples in use are the second half of [`TUPLE_MAP`] (entries
/// `TUPLE_SLOTS..2 * TUPLE_SLOTS`). The daemon writes a new tuple list into the half the
/// program is not reading and then flips this bit with the count in one u32 write, so the
/// program never reads a tuple that is half written.
pub const SHAPE_TUPLES_HALF: u32 = 1 << 24;

/// Name of the array of tuples (see [`Tuple`]), in precedence order, that the program walks
/// when [`SHAPE_RANGES`] is set. Two halves of [`TUPLE_SLOTS`] entries.
pub const TUPLE_MAP: &str = "TUPLES";
/// Most tuples a configuration may have (validation refuses more, naming the count).
pub const MAX_TUPLES: u32 = 64;
/// Entries in one half of [`TUPLE_MAP`], and the bound of the program's loop: twice
/// [`MAX_TUPLES`], as during a reload the program walks the union of the old and the new
/// table's tuples.
pub const TUPLE_SLOTS: u32 = 2 * MAX_TUPLES;

/// [`Tuple::flags`]: the tuple's keys name a VLAN (the frame's is looked up), else any VLAN.
pub const TUPLE_VLAN: u8 = 1;
/// [`Tuple::flags`]: the tuple's keys have a port (the frame's), else port 0.
pub const TUPLE_PORT: u8 = 2;
/// [`Tuple::flags`]: the tuple's keys are IPv4 (mapped); an IPv6 frame skips it, and an
/// IPv4 frame skips the tuples without it, with no lookup.
pub const TUPLE_V4: u8 = 4;

/// One "tuple" of the tuple-space search: the form a set of rule keys share (VLAN or any,
/// group prefix length, source prefix length, port or any, family). A frame's key for it is
/// the frame's group and source masked to the lengths, its port or 0, its VLAN or any; one
/// hash lookup then finds the rule of that form, if any. The daemon keeps the tuples that
/// exist sorted by precedence, so the first hit is the most specific rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Tuple {
    /// [`Tuple::glen`] leading one bits: what the frame's group is ANDed with.
    pub group_mask: [u8; 16],
    /// [`Tuple::slen`] leading one bits.
    pub source_mask: [u8; 16],
    /// Group prefix length in the 16-byte form (an IPv4 /16 is 112; one group is 128).
    pub glen: u8,
    /// Source prefix length in the 16-byte form; 0 for any source.
    pub slen: u8,
    /// `TUPLE_*` bits.
    pub flags: u8,
    /// Always zero.
    pub pad: u8,
}

impl Tuple {
    /// The tuple of keys with these lengths (16-byte form) and `TUPLE_*` flags.
    pub const fn new(glen: u8, slen: u8, flags: u8) -> Self {
        Self {
            group_mask: prefix_mask(glen),
            source_mask: prefix_mask(slen),
            glen,
            slen,
            flags,
            pad: 0,
        }
    }

    /// Sorts before every tuple that is less specific: a VLAN before any VLAN, then the
    /// longer group prefix, then the longer source prefix, then a port before any port. The
    /// family comes last only to make the order total (a frame is of one family, so tuples
    /// of the other are never compared against it).
    pub fn precedence(&self) -> (bool, u8, u8, bool, u8) {
        (
            self.flags & TUPLE_VLAN == 0,
            u8::MAX - self.glen,
            u8::MAX - self.slen,
            self.flags & TUPLE_PORT == 0,
            self.flags & TUPLE_V4,
        )
    }

    /// The tuple is one of the eight exact shapes (one group; one source or any), which the
    /// `SHAPE_*` bits describe.
    pub fn is_exact(&self) -> bool {
        self.glen == 128 && (self.slen == 128 || self.slen == 0)
    }
}

/// `len` leading one bits of 128, as bytes.
pub const fn prefix_mask(len: u8) -> [u8; 16] {
    let bits = if len == 0 {
        0
    } else if len >= 128 {
        u128::MAX
    } else {
        u128::MAX << (128 - len as u32)
    };
    bits.to_be_bytes()
}

/// `RuleKey::glen` and `slen` of one address, and `slen` of any source.
pub const FULL_LEN: u8 = 128;

/// `RuleKey::vlan` of a rule that takes any VLAN or none: what keys held before rules had a
/// `vlan:` (the field was padding, always zero).
pub const VLAN_ANY: u16 = 0;
/// `RuleKey::vlan` of a rule for untagged frames only, and of the lookup key of an untagged
/// frame. Outside the 12-bit VID space, so it equals no VID.
pub const VLAN_UNTAGGED: u16 = 0x1000;

/// The `RuleKey::vlan` a frame is looked up with: its VID, or [`VLAN_UNTAGGED`] when it has
/// no tag or a priority tag (VID 0, which 802.1Q says means "no VLAN": the frame belongs to
/// the port's native VLAN, as an untagged one does).
pub const fn frame_vlan(tci: Option<u16>) -> u16 {
    match tci {
        Some(tci) if tci & 0x0fff != 0 => tci & 0x0fff,
        _ => VLAN_UNTAGGED,
    }
}

impl RuleKey {
    /// This key's `SHAPE_*` bit.
    pub fn shape(&self) -> u32 {
        let any_source = self.slen == 0;
        let any_port = self.port == [0; 2];
        let base = match (any_source, any_port) {
            (false, false) => SHAPE_SOURCE_PORT,
            (false, true) => SHAPE_SOURCE,
            (true, false) => SHAPE_PORT,
            (true, true) => SHAPE_GROUP,
        };
        if self.vlan == VLAN_ANY {
            base
        } else {
            base << SHAPE_VLAN_SHIFT
        }
    }
}

/// Name of the LRU hash map from a fragmented datagram (see [`FragKey`]) to the rule its
/// first fragment matched, which the later fragments follow.
pub const FRAG_MAP: &str = "FRAGS";
/// Datagrams in flight whose fragments the XDP program remembers; the least recently used
/// go first. A datagram's fragments arrive within microseconds of each other, so this
/// holds far more than the datagrams any link carries in flight at once.
pub const MAX_FRAG_FLOWS: u32 = 16384;

/// Key of the fragment map: what identifies one fragmented datagram (RFC 791 and 8200: the
/// source, the destination and the identification) on one ingress interface and VLAN. The
/// protocol, which IPv4 also names, is UDP for every entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    /// Ingress interface index.
    pub ifindex: u32,
    /// The IPv4 header's 16-bit identification, or the IPv6 fragment header's 32-bit one, as
    /// the bytes are on the wire (big-endian, an IPv4 one in the low two bytes).
    pub id: [u8; 4],
    /// Source address, as in [`RuleKey`] (IPv4 mapped).
    pub source: [u8; 16],
    /// Destination group, as in [`RuleKey`].
    pub group: [u8; 16],
    /// The frame's VLAN as [`frame_vlan`] gives it: two VLANs of a trunk are two networks,
    /// and a datagram on one must not lend its rule to fragments on another.
    pub vlan: u16,
    /// Always zero: keeps the struct free of uninitialised padding.
    pub pad: u16,
}

/// Name of the per-CPU counter array.
pub const COUNTER_MAP: &str = "COUNTERS";
/// Name of the XDP program's global holding the longest frame a UMEM frame takes, which the
/// daemon sets at load time.
pub const MAX_FRAME_LEN_GLOBAL: &str = "MAX_FRAME_LEN";
/// The headroom the kernel keeps in front of each received frame in copy mode
/// (XDP_PACKET_HEADROOM): a UMEM frame of N bytes holds a frame of N - 256.
pub const XDP_PACKET_HEADROOM: u32 = 256;

/// Name of the XDP program in the object file: the one attached.
pub const PROGRAM: &str = "relay";
/// Name of the XDP program that [`PROGRAM`] tail-calls when [`SHAPE_RANGES`] is set: the
/// same parse, then the tuple walk.
pub const RANGES_PROGRAM: &str = "relay_ranges";
/// Name of the program array holding [`RANGES_PROGRAM`] (slot 0) and
/// [`HINTED_RANGES_PROGRAM`] (slot 1).
pub const RANGES_PROGRAM_MAP: &str = "RANGE_PROG";
/// Name of the XDP program that the VLAN-hint front (relay-ebpf/src/vlan_hint.bpf.c)
/// tail-calls: [`PROGRAM`] for a frame whose tag may be in the NIC's metadata.
pub const HINTED_PROGRAM: &str = "relay_hinted";
/// Name of [`RANGES_PROGRAM`] for [`HINTED_PROGRAM`], in slot 1 of [`RANGES_PROGRAM_MAP`].
pub const HINTED_RANGES_PROGRAM: &str = "relay_ranges_hinted";
/// Name of the per-CPU slot where the front leaves the frame's [`VlanHint`].
pub const VLAN_HINT_MAP: &str = "VLAN_HINTS";

/// A frame's VLAN tag as the NIC's metadata gave it (the XDP RX metadata kfunc), passed from
/// the front program to [`HINTED_PROGRAM`] on the same CPU. The C front declares the same
/// layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VlanHint {
    /// 1: the NIC took a tag off this frame.
    pub present: u16,
    /// Its TPID, as on the wire (big-endian).
    pub proto: u16,
    /// Its tag control information (priority, DEI, VID), in host order.
    pub tci: u16,
    pub pad: u16,
}

/// Each ingress interface owns this many consecutive XSKMAP entries, one per rx queue.
pub const MAX_QUEUES_PER_IFACE: u32 = 64;
/// How many ingress interfaces one relay can steer.
pub const MAX_INGRESS_IFACES: u32 = 256;
/// XSKMAP size: every (ingress slot, rx queue) pair has an entry.
pub const XSK_MAP_SIZE: u32 = MAX_QUEUES_PER_IFACE * MAX_INGRESS_IFACES;
/// Most rules (counting each lookup key once) the rule map holds.
pub const MAX_RULE_KEYS: u32 = 65536;

/// Key of the exact rule map ([`RULE_MAP`]): the first 40 bytes of a [`RuleKey`], whose
/// lengths an exact key does not need (one group; one source, or an all-zero source for
/// any).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ExactKey {
    /// As [`RuleKey::ifindex`].
    pub ifindex: u32,
    /// As [`RuleKey::group`].
    pub group: [u8; 16],
    /// As [`RuleKey::source`].
    pub source: [u8; 16],
    /// As [`RuleKey::port`].
    pub port: [u8; 2],
    /// As [`RuleKey::vlan`].
    pub vlan: u16,
}

/// Lookup key of the rule maps: of [`RANGE_RULE_MAP`] as it is, of [`RULE_MAP`] as its
/// first 40 bytes ([`RuleKey::exact`]).
///
/// Addresses are 16 bytes: IPv6 as it is, IPv4 as an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`, RFC 4291), so one map serves both families and no IPv4 key can equal an
/// IPv6 one. A range stores its network (the address masked to `glen`/`slen` bits) and its
/// length, so a frame's key masked to the same length finds it, and two rules of different
/// lengths never share a key. A rule with no source stores an all-zero source and `slen` 0;
/// one with no port stores `port = 0` (UDP port 0 is not a valid destination, so it cannot
/// collide with a real one). Without ranges the XDP program looks up the exact (S,G,port)
/// key first, then (S,G,*), (*,G,port) and (*,G,*), first with the frame's VLAN (its VID, or
/// [`VLAN_UNTAGGED`]) and then with [`VLAN_ANY`]: a VLAN on a trunk is an interface of its
/// own, so a rule for it is more specific than any rule for the whole port. With ranges it
/// walks the [`Tuple`]s in the same order, longer prefixes first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RuleKey {
    /// Ingress interface index.
    pub ifindex: u32,
    /// Destination group, network byte order (the bytes as on the wire, IPv4 mapped); or
    /// the unicast destination address of an input `destination:`.
    pub group: [u8; 16],
    /// Source address, network byte order (IPv4 mapped); all zero for any source.
    pub source: [u8; 16],
    /// Destination UDP port, network byte order; zero for any port.
    pub port: [u8; 2],
    /// [`VLAN_ANY`], a VID (1..=4094), or [`VLAN_UNTAGGED`]; host byte order, as the program
    /// computes it rather than copying it.
    pub vlan: u16,
    /// Length of the group prefix in the 16-byte form: 128 for one group (or a unicast
    /// destination), 96 + n for an IPv4 /n.
    pub glen: u8,
    /// Length of the source prefix in the 16-byte form: 128 for one source, 0 for any.
    pub slen: u8,
    /// Always zero: keeps the struct free of uninitialised padding, which a BPF hash key
    /// must not contain (the kernel hashes every byte).
    pub pad: u16,
}

/// The IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) of an IPv4 address, as the rule keys hold it.
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

impl RuleKey {
    /// An exact key from host-order fields, for any VLAN: one group, and one source or
    /// (all zero) any.
    pub const fn new(ifindex: u32, group: [u8; 16], source: [u8; 16], port: u16) -> Self {
        let any_source = u128::from_ne_bytes(source) == 0;
        Self {
            ifindex,
            group,
            source,
            port: port.to_be_bytes(),
            vlan: VLAN_ANY,
            glen: FULL_LEN,
            slen: if any_source { 0 } else { FULL_LEN },
            pad: 0,
        }
    }

    /// The same key for a group prefix of `glen` and a source prefix of `slen` bits (16-byte
    /// form), its addresses masked to them.
    pub const fn with_lengths(self, glen: u8, slen: u8) -> Self {
        let g = u128::from_ne_bytes(self.group) & u128::from_ne_bytes(prefix_mask(glen));
        let s = u128::from_ne_bytes(self.source) & u128::from_ne_bytes(prefix_mask(slen));
        Self {
            group: g.to_ne_bytes(),
            source: s.to_ne_bytes(),
            glen,
            slen,
            ..self
        }
    }

    /// The same key for one VLAN (`vlan` as the field holds it).
    pub const fn with_vlan(self, vlan: u16) -> Self {
        Self { vlan, ..self }
    }

    /// The key is exact: one group, and one source or any. It belongs in [`RULE_MAP`].
    pub const fn is_exact(&self) -> bool {
        self.glen == FULL_LEN && (self.slen == FULL_LEN || self.slen == 0)
    }

    /// The key's first 40 bytes, as the exact map takes them, in place: the XDP program
    /// builds one key on its small stack and looks it up in either map.
    pub fn exact(&self) -> &ExactKey {
        // SAFETY: both are #[repr(C)] with the same first five fields in the same order
        // (so at the same offsets), ExactKey's 40 bytes lie within RuleKey's 44, and both
        // have alignment 4; a shared reference to the prefix lives no longer than `self`.
        unsafe { &*(self as *const Self as *const ExactKey) }
    }
}

/// Value of the rule map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleValue {
    /// Index of the rule in the daemon's rule table.
    pub rule_id: u32,
    /// The key's ingress interface's slot in the XSKMAP (its sockets are at
    /// `slot * MAX_QUEUES_PER_IFACE + queue`): carried here so that a matched frame costs one
    /// hash lookup, not a second one by ifindex. The loader fills it as it writes the key.
    pub slot: u32,
}

/// Indices into the per-CPU counter array kept by the XDP program.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpCounter {
    /// Every frame the program ran on.
    Seen = 0,
    /// Frames that matched a rule.
    Matched = 1,
    /// Matched frames handed to an AF_XDP socket.
    Redirected = 2,
    /// Frames returned to the kernel stack untouched.
    Passed = 3,
    /// Matched frames whose redirect failed (no socket on that queue): these are passed.
    RedirectFailed = 4,
    /// Matched frames longer than a UMEM frame holds: an AF_XDP socket would drop them, so
    /// they are passed to the kernel instead.
    Oversize = 5,
    /// Later fragments (offset above zero) that followed the rule their first fragment
    /// matched (counted in `matched` too).
    Fragments = 6,
    /// Later fragments with no first fragment seen: it has not arrived yet, or it matched no
    /// rule. They are passed to the kernel.
    FragmentsUnknown = 7,
    /// Redirected frames whose VLAN tag the NIC had taken off into its metadata: the program
    /// read it there and put it back in the frame for the workers.
    VlanFromMetadata = 8,
}

impl XdpCounter {
    /// Every counter, in index order.
    pub const ALL: [XdpCounter; 9] = [
        XdpCounter::Seen,
        XdpCounter::Matched,
        XdpCounter::Redirected,
        XdpCounter::Passed,
        XdpCounter::RedirectFailed,
        XdpCounter::Oversize,
        XdpCounter::Fragments,
        XdpCounter::FragmentsUnknown,
        XdpCounter::VlanFromMetadata,
    ];
    /// Number of counters, the size of the counter array.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// A short name for logs and stats output.
    pub const fn name(self) -> &'static str {
        match self {
            XdpCounter::Seen => "seen",
            XdpCounter::Matched => "matched",
            XdpCounter::Redirected => "redirected",
            XdpCounter::Passed => "passed",
            XdpCounter::RedirectFailed => "redirect_failed",
            XdpCounter::Oversize => "oversize",
            XdpCounter::Fragments => "fragments",
            XdpCounter::FragmentsUnknown => "fragments_unknown",
            XdpCounter::VlanFromMetadata => "vlan_from_metadata",
        }
    }
}

// The BPF hash map hashes and compares every byte of a key: these sizes say there is no
// padding (the fields add up to them), which the Pod impls below rely on.
const _: () = assert!(core::mem::size_of::<RuleKey>() == 44);
const _: () = assert!(core::mem::size_of::<RuleValue>() == 8);
const _: () = assert!(core::mem::size_of::<ExactKey>() == 40);
const _: () = assert!(core::mem::align_of::<ExactKey>() == core::mem::align_of::<RuleKey>());
const _: () =
    assert!(core::mem::offset_of!(RuleKey, vlan) == core::mem::offset_of!(ExactKey, vlan));
const _: () = assert!(core::mem::size_of::<Tuple>() == 36);
const _: () = assert!(core::mem::size_of::<FragKey>() == 44);
const _: () = assert!(core::mem::size_of::<VlanHint>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: a #[repr(C)] struct of a u32, byte arrays, two u16s and two u8s with no
    // padding (4 + 16 + 16 + 2 + 2 + 1 + 1 + 2 = 44, a multiple of its alignment 4, and each
    // field at a multiple of its own alignment; `pad` fills what would be padding), so every
    // bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::RuleKey {}
    // SAFETY: a #[repr(C)] struct of a u32, byte arrays and two u16s, 4 + 16 + 16 + 2 + 2
    // = 40 bytes with no padding: every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::ExactKey {}
    // SAFETY: a #[repr(C)] struct of byte arrays and u8s (alignment 1), 16 + 16 + 4 = 36 bytes
    // with no padding: every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::Tuple {}
    // SAFETY: a #[repr(C)] struct of a u32, byte arrays and two u16s, 4 + 4 + 16 + 16 + 2 + 2
    // = 44 bytes with no padding: every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: a #[repr(C)] struct of two u32s, 8 bytes with no padding: every bit pattern is
    // valid and none is uninitialised.
    unsafe impl aya::Pod for super::RuleValue {}
    // SAFETY: four plain u16s, no padding.
    unsafe impl aya::Pod for super::VlanHint {}
}
