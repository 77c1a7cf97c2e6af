//! Types shared by the relay daemon and its XDP program.
//!
//! Everything here is `#[repr(C)]` plain data: the XDP program reads these from BPF maps and the
//! daemon writes them with aya. Addresses and ports are kept in network byte order exactly as
//! they sit in a frame, so the XDP program can build a key from packet bytes without swapping.
#![no_std]

/// Name of the XSKMAP that the XDP program redirects matches into.
pub const XSK_MAP: &str = "XSKS";
/// Name of the hash map from (ingress interface, group, port, source) to rule id.
pub const RULE_MAP: &str = "RULES";
/// Name of the hash map from ingress interface index to its slot in the XSKMAP.
pub const IFACE_MAP: &str = "IFACES";
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
        let any_source = self.source == [0; 16];
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

/// Name of the XDP program in the object file.
pub const PROGRAM: &str = "relay";

/// Each ingress interface owns this many consecutive XSKMAP entries, one per rx queue.
pub const MAX_QUEUES_PER_IFACE: u32 = 64;
/// How many ingress interfaces one relay can steer.
pub const MAX_INGRESS_IFACES: u32 = 256;
/// XSKMAP size: every (ingress slot, rx queue) pair has an entry.
pub const XSK_MAP_SIZE: u32 = MAX_QUEUES_PER_IFACE * MAX_INGRESS_IFACES;
/// Most rules (counting each lookup key once) the rule map holds.
pub const MAX_RULE_KEYS: u32 = 65536;

/// Lookup key of the rule map.
///
/// Addresses are 16 bytes: IPv6 as it is, IPv4 as an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`, RFC 4291), so one map serves both families and no IPv4 key can equal an
/// IPv6 one. A rule with no source stores an all-zero source; one with no port stores
/// `port = 0` (UDP port 0 is not a valid destination, so it cannot collide with a real one).
/// The XDP program looks up the exact (S,G,port) key first, then (S,G,*), (*,G,port) and
/// (*,G,*), first with the frame's VLAN (its VID, or [`VLAN_UNTAGGED`]) and then with
/// [`VLAN_ANY`]: a VLAN on a trunk is an interface of its own, so a rule for it is more
/// specific than any rule for the whole port.
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
    /// computes it rather than copying it. It also fills what would be padding, which a BPF
    /// hash key must not contain.
    pub vlan: u16,
}

/// The IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) of an IPv4 address, as the rule keys hold it.
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

impl RuleKey {
    /// A key from host-order fields, as the daemon builds it from the YAML, for any VLAN.
    pub const fn new(ifindex: u32, group: [u8; 16], source: [u8; 16], port: u16) -> Self {
        Self {
            ifindex,
            group,
            source,
            port: port.to_be_bytes(),
            vlan: VLAN_ANY,
        }
    }

    /// The same key for one VLAN (`vlan` as the field holds it).
    pub const fn with_vlan(self, vlan: u16) -> Self {
        Self { vlan, ..self }
    }
}

/// Value of the rule map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleValue {
    /// Index of the rule in the daemon's rule table.
    pub rule_id: u32,
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
}

impl XdpCounter {
    /// Every counter, in index order.
    pub const ALL: [XdpCounter; 8] = [
        XdpCounter::Seen,
        XdpCounter::Matched,
        XdpCounter::Redirected,
        XdpCounter::Passed,
        XdpCounter::RedirectFailed,
        XdpCounter::Oversize,
        XdpCounter::Fragments,
        XdpCounter::FragmentsUnknown,
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
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)] structs of byte arrays, u32s and a u16 with no padding
    // (RuleKey's `vlan` sits where padding would be: 4 + 16 + 16 + 2 + 2 = 40, a multiple of
    // its alignment), so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::RuleKey {}
    // SAFETY: a #[repr(C)] struct of a u32, byte arrays and two u16s, 4 + 4 + 16 + 16 + 2 + 2
    // = 44 bytes with no padding: every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above, a single u32.
    unsafe impl aya::Pod for super::RuleValue {}
}
