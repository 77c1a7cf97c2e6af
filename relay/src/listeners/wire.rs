//! IGMP (RFC 1112, 2236, 3376) and MLD (RFC 2710, 3810) messages as an AF_PACKET socket
//! delivers them: [`parse`] reads a whole Ethernet frame into a [`Message`] or says why it is
//! refused, [`build_query`] writes the one message a router sends, a v3 / MLDv2 query.
//!
//! As in [`crate::wire`], nothing here panics on short or odd input, and what a count field
//! claims is believed only as far as the bytes present back it: allocations are bounded by
//! the frame, not by the counts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::checksum::{checksum, sum};
use crate::wire::{ETH_P_IP, ETH_P_IPV6, EthernetFrame, Ipv4Packet, Ipv6Packet, multicast_mac};

pub const IPPROTO_IGMP: u8 = 2;
pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_HOPOPTS: u8 = 0;

const IGMP_QUERY: u8 = 0x11;
const IGMP_V1_REPORT: u8 = 0x12;
const IGMP_V2_REPORT: u8 = 0x16;
const IGMP_V2_LEAVE: u8 = 0x17;
const IGMP_V3_REPORT: u8 = 0x22;

const MLD_QUERY: u8 = 130;
const MLD_V1_REPORT: u8 = 131;
const MLD_V1_DONE: u8 = 132;
const MLD_V2_REPORT: u8 = 143;

/// The IPv4 Router Alert option (RFC 2113): copied flag, class 0, number 20.
const IPOPT_RA: u8 = 0x94;
/// The IPv6 Router Alert hop-by-hop option (RFC 2711); its value 0 means MLD.
const IPV6_OPT_RA: u8 = 5;

/// An IGMPv1 host waits up to 10 s before answering a query (RFC 1112 appendix I), which
/// has no field for it.
pub const IGMPV1_MAX_RESPONSE: Duration = Duration::from_secs(10);

/// Sources per built query, so a query fits the smallest MTU of its family that a link
/// running multicast routing will have: 1500-byte Ethernet for IPv4 (20-byte header, 4-byte
/// Router Alert, 12-byte query), the IPv6 minimum of 1280 for IPv6 (40-byte header, 8-byte
/// hop-by-hop, 28-byte query). The router splits longer source lists over several queries.
pub const MAX_QUERY_SOURCES_V4: usize = (1500 - 20 - 4 - 12) / 4;
pub const MAX_QUERY_SOURCES_V6: usize = (1280 - 40 - 8 - 28) / 16;

/// Why a frame is not a membership message the router acts on. Each has a stable
/// [`Refusal::name`] for a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Not IGMP or MLD at all (another protocol, another ICMPv6 type, a frame too short to
    /// tell): the I/O layer ignores these without counting.
    NotMembership,
    /// Shorter than a header, or a count of records or sources points past the message.
    Truncated,
    /// The IPv4 header, IGMP or ICMPv6 checksum does not verify.
    BadChecksum,
    /// IPv4 TTL or IPv6 hop limit other than 1: the message crossed a router.
    TtlNotOne,
    /// An IGMPv2/v3 or MLD message without the Router Alert option (but an IGMPv2 report,
    /// which is taken and flagged: [`Received::missing_router_alert`]).
    NoRouterAlert,
    /// A source address these messages may not come from (an MLD message from outside
    /// fe80::/10, a multicast or broadcast IPv4 source, 0.0.0.0 outside v3 reports and
    /// queries).
    BadSource,
    /// A length the protocol does not define (an IGMP query of 9 to 11 bytes, an MLD query
    /// of 25 to 27) or an IP total length shorter than its header.
    BadLength,
    /// An IGMP type this router does not know (DVMRP, mtrace, PIMv1 and such).
    UnknownType,
    /// A group field that is not a multicast address (or, in a query, not zero either).
    BadGroup,
    /// An IPv4 fragment: IGMP messages are never fragmented.
    Fragment,
    /// A message that arrived with an 802.1Q tag (other than a priority tag, VID 0): on a
    /// trunk's parent it comes from a host on a VLAN, not from the untagged link the relay
    /// queries. The I/O layer tells, from the packet socket's auxiliary data.
    VlanTagged,
    /// A report or leave from an IPv4 source on none of the interface's subnets (RFC 3376
    /// §9.2: ignored). 0.0.0.0, which hosts without an address yet use, is not refused. The
    /// I/O layer tells, from the interface's addresses.
    OffSubnet,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NotMembership => "not_membership",
            Refusal::Truncated => "truncated",
            Refusal::BadChecksum => "bad_checksum",
            Refusal::TtlNotOne => "ttl_not_one",
            Refusal::NoRouterAlert => "no_router_alert",
            Refusal::BadSource => "bad_source",
            Refusal::BadLength => "bad_length",
            Refusal::UnknownType => "unknown_type",
            Refusal::BadGroup => "bad_group",
            Refusal::Fragment => "fragment",
            Refusal::VlanTagged => "vlan_tagged",
            Refusal::OffSubnet => "off_subnet",
        }
    }

    pub const ALL: [Refusal; 12] = [
        Refusal::NotMembership,
        Refusal::Truncated,
        Refusal::BadChecksum,
        Refusal::TtlNotOne,
        Refusal::NoRouterAlert,
        Refusal::BadSource,
        Refusal::BadLength,
        Refusal::UnknownType,
        Refusal::BadGroup,
        Refusal::Fragment,
        Refusal::VlanTagged,
        Refusal::OffSubnet,
    ];
}

/// A parsed membership message and the addresses it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The IP source: the reporter, or the querier for election.
    pub source: IpAddr,
    pub destination: IpAddr,
    pub message: Message,
    /// An IGMPv2 report that came without the Router Alert option, accepted as Linux and
    /// FRR accept it (RFC 2236 §2 has hosts send the option; some stacks do not): the I/O
    /// layer counts these. IGMPv1 messages, which predate the option,
    /// are not flagged.
    pub missing_router_alert: bool,
}

/// What a host or another router said. Group addresses are multicast; MLD messages carry
/// IPv6 addresses, IGMP ones IPv4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Query(Query),
    /// An IGMPv1 membership report.
    V1Report {
        group: IpAddr,
    },
    /// An IGMPv2 membership report, or an MLDv1 report: MLDv1 is IGMPv2's counterpart and
    /// RFC 3810 §8.3.2 treats it as RFC 3376 §7.3.2 treats IGMPv2.
    V2Report {
        group: IpAddr,
    },
    /// An IGMPv2 leave or an MLDv1 done.
    Leave {
        group: IpAddr,
    },
    /// An IGMPv3 or MLDv2 report. Records of a type the RFCs do not define are left out, as
    /// RFC 3376 §4.2.12 and RFC 3810 §5.2.12 say to ignore them.
    Report {
        records: Vec<Record>,
    },
}

/// A group record of an IGMPv3 / MLDv2 report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordType,
    pub group: IpAddr,
    pub sources: Vec<IpAddr>,
}

/// RFC 3376 §4.2.12 record types, numbered as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordType {
    /// MODE_IS_INCLUDE, a current-state record.
    IsIn = 1,
    /// MODE_IS_EXCLUDE, a current-state record.
    IsEx = 2,
    /// CHANGE_TO_INCLUDE_MODE.
    ToIn = 3,
    /// CHANGE_TO_EXCLUDE_MODE.
    ToEx = 4,
    /// ALLOW_NEW_SOURCES.
    Allow = 5,
    /// BLOCK_OLD_SOURCES.
    Block = 6,
}

impl RecordType {
    pub fn from_wire(t: u8) -> Option<Self> {
        Some(match t {
            1 => RecordType::IsIn,
            2 => RecordType::IsEx,
            3 => RecordType::ToIn,
            4 => RecordType::ToEx,
            5 => RecordType::Allow,
            6 => RecordType::Block,
            _ => return None,
        })
    }
}

/// A membership query, of any version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The protocol version the query's length says: IGMP 1, 2 or 3; MLD 1 or 2.
    pub version: u8,
    /// `None` for a general query.
    pub group: Option<IpAddr>,
    /// Decoded from the max response code ([`IGMPV1_MAX_RESPONSE`] for IGMPv1).
    pub max_response: Duration,
    /// The "suppress router-side processing" flag (v3 / MLDv2 only).
    pub suppress: bool,
    /// Querier's robustness variable (v3 / MLDv2 only; 0 otherwise or when it exceeds 7).
    pub qrv: u8,
    /// Querier's query interval, decoded from QQIC (v3 / MLDv2 only; zero otherwise).
    pub qqi: Duration,
    /// Non-empty only in a group-and-source-specific query.
    pub sources: Vec<IpAddr>,
}

/// A query the router wants sent: [`build_query`] makes the frame, the family being the one
/// of the source address it is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryToSend {
    /// `None` for a general query (sent to all-hosts / all-nodes), else the group, which is
    /// then also the destination.
    pub group: Option<IpAddr>,
    pub sources: Vec<IpAddr>,
    pub max_response: Duration,
    pub suppress: bool,
    /// Sent as 0 above 7, as RFC 3376 §4.1.6 says.
    pub qrv: u8,
    pub qqi: Duration,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn v4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn v6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(o)
}

/// RFC 3376 §4.1.1 / §4.1.7 (and RFC 3810 §5.1.9 for QQIC): below 128 the code is the value,
/// above it a float with a 3-bit exponent and 4-bit mantissa.
pub fn decode_code8(code: u8) -> u32 {
    if code < 0x80 {
        u32::from(code)
    } else {
        let mant = u32::from(code & 0x0f);
        let exp = u32::from((code >> 4) & 0x07);
        (mant | 0x10) << (exp + 3)
    }
}

/// The code for `value`, rounded down to what the float form can say (so a host answers no
/// later than asked), saturating at the largest code.
pub fn encode_code8(value: u32) -> u8 {
    if value < 0x80 {
        return value as u8;
    }
    for exp in 0..8u32 {
        let m = value >> (exp + 3);
        if m < 0x20 {
            return 0x80 | (exp as u8) << 4 | (m as u8 & 0x0f);
        }
    }
    0xff
}

/// RFC 3810 §5.1.3: the MLDv2 maximum response code, milliseconds below 32768, a float with
/// a 3-bit exponent and 12-bit mantissa above.
pub fn decode_code16(code: u16) -> u32 {
    if code < 0x8000 {
        u32::from(code)
    } else {
        let mant = u32::from(code & 0x0fff);
        let exp = u32::from((code >> 12) & 0x07);
        (mant | 0x1000) << (exp + 3)
    }
}

/// As [`encode_code8`] for the 16-bit form.
pub fn encode_code16(value: u32) -> u16 {
    if value < 0x8000 {
        return value as u16;
    }
    for exp in 0..8u32 {
        let m = value >> (exp + 3);
        if m < 0x2000 {
            return 0x8000 | (exp as u16) << 12 | (m as u16 & 0x0fff);
        }
    }
    0xffff
}

fn tenths(d: Duration) -> u32 {
    u32::try_from(d.as_millis() / 100).unwrap_or(u32::MAX)
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// What a query built with `max_response` and `qqi` says after the round trip through the
/// codes: the times a receiver of [`build_query`]'s frame sees.
pub fn quantized(family_v6: bool, max_response: Duration, qqi: Duration) -> (Duration, Duration) {
    let mr = if family_v6 {
        Duration::from_millis(decode_code16(encode_code16(millis(max_response))).into())
    } else {
        Duration::from_millis(u64::from(decode_code8(encode_code8(tenths(max_response)))) * 100)
    };
    let q = Duration::from_secs(decode_code8(encode_code8(secs(qqi))).into());
    (mr, q)
}

/// Reads a whole Ethernet frame (an optional 802.1Q tag is stepped over).
pub fn parse(frame: &[u8]) -> Result<Received, Refusal> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| Refusal::NotMembership)?;
    match eth.ethertype() {
        ETH_P_IP => parse_v4(eth.payload()),
        ETH_P_IPV6 => parse_v6(eth.payload()),
        _ => Err(Refusal::NotMembership),
    }
}

/// Whether the IPv4 options hold a Router Alert with value 0 (RFC 2113: "every router
/// examines the packet"). A malformed option list ends the search.
fn ipv4_router_alert(options: &[u8]) -> bool {
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            0 => return false,
            1 => i += 1,
            kind => {
                let Some(&len) = options.get(i + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || i + len > options.len() {
                    return false;
                }
                if kind == IPOPT_RA && len == 4 && options[i + 2..i + 4] == [0, 0] {
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

fn parse_v4(payload: &[u8]) -> Result<Received, Refusal> {
    let ip = match Ipv4Packet::new_checked(payload) {
        Ok(ip) => ip,
        // Only an IPv4 header that says IGMP is worth a counter.
        Err(_) if payload.first().is_some_and(|b| b >> 4 == 4) && payload.get(9) == Some(&2) => {
            return Err(Refusal::Truncated);
        }
        Err(_) => return Err(Refusal::NotMembership),
    };
    if ip.protocol() != IPPROTO_IGMP {
        return Err(Refusal::NotMembership);
    }
    let hl = ip.header_len();
    let total = usize::from(ip.total_len());
    if total < hl {
        return Err(Refusal::BadLength);
    }
    // Ethernet pads short frames, so the IP length, not the frame's, ends the message.
    let Some(igmp) = payload.get(hl..total) else {
        return Err(Refusal::Truncated);
    };
    if checksum(ip.header()) != 0 {
        return Err(Refusal::BadChecksum);
    }
    if ip.is_fragment() {
        return Err(Refusal::Fragment);
    }
    let Some(&kind) = igmp.first() else {
        return Err(Refusal::Truncated);
    };
    if ![
        IGMP_QUERY,
        IGMP_V1_REPORT,
        IGMP_V2_REPORT,
        IGMP_V2_LEAVE,
        IGMP_V3_REPORT,
    ]
    .contains(&kind)
    {
        return Err(Refusal::UnknownType);
    }
    if igmp.len() < 8 {
        return Err(Refusal::Truncated);
    }
    if sum(0, igmp) != 0xffff {
        return Err(Refusal::BadChecksum);
    }
    if ip.ttl() != 1 {
        return Err(Refusal::TtlNotOne);
    }
    // IGMPv1 predates the Router Alert option: its report and its query (8 bytes, max
    // response code 0) are exempt. IGMPv2 reports without it are taken (and flagged) as
    // Linux and FRR take them; leaves, v2/v3 queries and v3 reports still need it.
    let v1 = kind == IGMP_V1_REPORT || (kind == IGMP_QUERY && igmp.len() == 8 && igmp[1] == 0);
    let missing_router_alert = !v1 && !ipv4_router_alert(&ip.header()[20..]);
    if missing_router_alert && kind != IGMP_V2_REPORT {
        return Err(Refusal::NoRouterAlert);
    }
    let source = ip.src_addr();
    // RFC 3376 §4.2.13 lets a host without an address report from 0.0.0.0; queriers
    // without an address (a Linux bridge's, by default) query from it too.
    let unspecified_ok = kind == IGMP_V3_REPORT || kind == IGMP_QUERY;
    if source.is_multicast()
        || source.is_broadcast()
        || (source.is_unspecified() && !unspecified_ok)
    {
        return Err(Refusal::BadSource);
    }
    let group = v4_at(igmp, 4);
    let multicast = |g: Ipv4Addr| {
        if g.is_multicast() {
            Ok(IpAddr::V4(g))
        } else {
            Err(Refusal::BadGroup)
        }
    };
    let message = match kind {
        IGMP_QUERY => Message::Query(parse_igmp_query(igmp)?),
        IGMP_V1_REPORT => Message::V1Report {
            group: multicast(group)?,
        },
        IGMP_V2_REPORT => Message::V2Report {
            group: multicast(group)?,
        },
        IGMP_V2_LEAVE => Message::Leave {
            group: multicast(group)?,
        },
        _ => Message::Report {
            records: parse_records(igmp, 4)?,
        },
    };
    Ok(Received {
        source: source.into(),
        destination: ip.dst_addr().into(),
        message,
        missing_router_alert,
    })
}

/// RFC 3376 §7.1: the version of a query is in its length (and, at 8 bytes, its code).
fn parse_igmp_query(igmp: &[u8]) -> Result<Query, Refusal> {
    let g = v4_at(igmp, 4);
    let group = if g.is_unspecified() {
        None
    } else if g.is_multicast() {
        Some(IpAddr::V4(g))
    } else {
        return Err(Refusal::BadGroup);
    };
    let code = igmp[1];
    let mut q = Query {
        version: 2,
        group,
        // IGMPv2's code is linear in tenths of a second (RFC 2236 §2.2).
        max_response: Duration::from_millis(u64::from(code) * 100),
        suppress: false,
        qrv: 0,
        qqi: Duration::ZERO,
        sources: Vec::new(),
    };
    match igmp.len() {
        8 if code == 0 => {
            q.version = 1;
            q.max_response = IGMPV1_MAX_RESPONSE;
            // An IGMPv1 query is always general; its group field is unused.
            q.group = None;
        }
        8 => {}
        9..=11 => return Err(Refusal::BadLength),
        len => {
            let n = usize::from(be16(igmp, 10));
            if 12 + n * 4 > len {
                return Err(Refusal::Truncated);
            }
            q.version = 3;
            q.max_response = Duration::from_millis(u64::from(decode_code8(code)) * 100);
            q.suppress = igmp[8] & 0x08 != 0;
            q.qrv = igmp[8] & 0x07;
            q.qqi = Duration::from_secs(decode_code8(igmp[9]).into());
            q.sources = (0..n)
                .map(|i| IpAddr::V4(v4_at(igmp, 12 + 4 * i)))
                .collect();
        }
    }
    Ok(q)
}

/// The group records of an IGMPv3 (`addr_len` 4) or MLDv2 (16) report; the record count is
/// at bytes 6..8 and records start at 8 in both.
fn parse_records(msg: &[u8], addr_len: usize) -> Result<Vec<Record>, Refusal> {
    let count = usize::from(be16(msg, 6));
    let addr = |at: usize| -> IpAddr {
        if addr_len == 4 {
            v4_at(msg, at).into()
        } else {
            v6_at(msg, at).into()
        }
    };
    // Each record takes at least 4 + addr_len bytes, which bounds the count by the message.
    let mut records = Vec::with_capacity(count.min(msg.len() / (4 + addr_len)));
    let mut at = 8;
    for _ in 0..count {
        let head = at + 4 + addr_len;
        if head > msg.len() {
            return Err(Refusal::Truncated);
        }
        let aux = usize::from(msg[at + 1]) * 4;
        let n = usize::from(be16(msg, at + 2));
        let end = head + n * addr_len + aux;
        if end > msg.len() {
            return Err(Refusal::Truncated);
        }
        let group = addr(at + 4);
        if !group.is_multicast() {
            return Err(Refusal::BadGroup);
        }
        if let Some(kind) = RecordType::from_wire(msg[at]) {
            let sources = (0..n).map(|i| addr(head + i * addr_len)).collect();
            records.push(Record {
                kind,
                group,
                sources,
            });
        }
        at = end;
    }
    Ok(records)
}

/// Where the ICMPv6 message starts and whether a Router Alert (value 0, MLD) was on the way:
/// right after the fixed header, or after one hop-by-hop header. `None` when the next
/// header is not ICMPv6.
fn icmpv6_after(ip: &[u8]) -> Option<(usize, bool)> {
    match ip[6] {
        IPPROTO_ICMPV6 => Some((40, false)),
        IPPROTO_HOPOPTS => {
            let h = ip.get(40..42)?;
            if h[0] != IPPROTO_ICMPV6 {
                return None;
            }
            let end = 40 + (usize::from(h[1]) + 1) * 8;
            let opts = ip.get(42..end)?;
            let mut ra = false;
            let mut i = 0;
            while i < opts.len() {
                if opts[i] == 0 {
                    i += 1;
                    continue;
                }
                let Some(&len) = opts.get(i + 1) else { break };
                let len = usize::from(len);
                if opts[i] == IPV6_OPT_RA && len == 2 && opts.get(i + 2..i + 4) == Some(&[0, 0]) {
                    ra = true;
                }
                i += 2 + len;
            }
            Some((end, ra))
        }
        _ => None,
    }
}

fn parse_v6(payload: &[u8]) -> Result<Received, Refusal> {
    let ip = Ipv6Packet::new_checked(payload).map_err(|_| Refusal::NotMembership)?;
    let Some((at, router_alert)) = icmpv6_after(payload) else {
        return Err(Refusal::NotMembership);
    };
    let Some(&kind) = payload.get(at) else {
        return Err(Refusal::NotMembership);
    };
    if ![MLD_QUERY, MLD_V1_REPORT, MLD_V1_DONE, MLD_V2_REPORT].contains(&kind) {
        return Err(Refusal::NotMembership);
    }
    let end = 40 + usize::from(ip.payload_len());
    if end < at {
        return Err(Refusal::BadLength);
    }
    let Some(mld) = payload.get(at..end) else {
        return Err(Refusal::Truncated);
    };
    let min = if kind == MLD_V2_REPORT { 8 } else { 24 };
    if mld.len() < min {
        return Err(Refusal::Truncated);
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&src.octets());
    pseudo[16..32].copy_from_slice(&dst.octets());
    pseudo[32..36].copy_from_slice(&(mld.len() as u32).to_be_bytes());
    pseudo[39] = IPPROTO_ICMPV6;
    if sum(u32::from(sum(0, &pseudo)), mld) != 0xffff {
        return Err(Refusal::BadChecksum);
    }
    if ip.hop_limit() != 1 {
        return Err(Refusal::TtlNotOne);
    }
    if !router_alert {
        return Err(Refusal::NoRouterAlert);
    }
    // RFC 3810 §5.1.14 and §5.2.13: all of MLD from link-local addresses; a report from ::
    // (a host still checking its address) is one routers ignore.
    if src.segments()[0] & 0xffc0 != 0xfe80 {
        return Err(Refusal::BadSource);
    }
    let group = v6_at(mld, 8);
    let multicast = || {
        if group.is_multicast() {
            Ok(IpAddr::V6(group))
        } else {
            Err(Refusal::BadGroup)
        }
    };
    let message = match kind {
        MLD_QUERY => Message::Query(parse_mld_query(mld)?),
        MLD_V1_REPORT => Message::V2Report {
            group: multicast()?,
        },
        MLD_V1_DONE => Message::Leave {
            group: multicast()?,
        },
        _ => Message::Report {
            records: parse_records(mld, 16)?,
        },
    };
    Ok(Received {
        source: src.into(),
        destination: dst.into(),
        message,
        missing_router_alert: false,
    })
}

/// RFC 3810 §8.1: 24 bytes is an MLDv1 query, 28 or more MLDv2.
fn parse_mld_query(mld: &[u8]) -> Result<Query, Refusal> {
    let g = v6_at(mld, 8);
    let group = if g.is_unspecified() {
        None
    } else if g.is_multicast() {
        Some(IpAddr::V6(g))
    } else {
        return Err(Refusal::BadGroup);
    };
    let code = be16(mld, 4);
    match mld.len() {
        24 => Ok(Query {
            version: 1,
            group,
            max_response: Duration::from_millis(code.into()),
            suppress: false,
            qrv: 0,
            qqi: Duration::ZERO,
            sources: Vec::new(),
        }),
        25..=27 => Err(Refusal::BadLength),
        len => {
            let n = usize::from(be16(mld, 26));
            if 28 + n * 16 > len {
                return Err(Refusal::Truncated);
            }
            Ok(Query {
                version: 2,
                group,
                max_response: Duration::from_millis(decode_code16(code).into()),
                suppress: mld[24] & 0x08 != 0,
                qrv: mld[24] & 0x07,
                qqi: Duration::from_secs(decode_code8(mld[25]).into()),
                sources: (0..n)
                    .map(|i| IpAddr::V6(v6_at(mld, 28 + 16 * i)))
                    .collect(),
            })
        }
    }
}

fn qrv_field(q: &QueryToSend) -> u8 {
    let qrv = if q.qrv > 7 { 0 } else { q.qrv };
    u8::from(q.suppress) << 3 | qrv
}

/// The whole Ethernet frame of an IGMPv3 query (when `src_ip` is IPv4) or an MLDv2 query
/// (IPv6; `src_ip` should be the interface's link-local address, as receivers refuse any
/// other). A group or sources of the other family than `src_ip` are left out: the query is
/// then general, or has fewer sources.
pub fn build_query(q: &QueryToSend, src_mac: [u8; 6], src_ip: IpAddr) -> Vec<u8> {
    match src_ip {
        IpAddr::V4(src) => build_v4(q, src_mac, src),
        IpAddr::V6(src) => build_v6(q, src_mac, src),
    }
}

fn build_v4(q: &QueryToSend, src_mac: [u8; 6], src: Ipv4Addr) -> Vec<u8> {
    let group = match q.group {
        Some(IpAddr::V4(g)) => Some(g),
        _ => None,
    };
    let sources: Vec<Ipv4Addr> = q
        .sources
        .iter()
        .filter_map(|s| match s {
            IpAddr::V4(s) => Some(*s),
            IpAddr::V6(_) => None,
        })
        .take(usize::from(u16::MAX))
        .collect();
    let dst = group.unwrap_or(Ipv4Addr::new(224, 0, 0, 1));
    let igmp_len = 12 + 4 * sources.len();
    let ip_len = 24 + igmp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&multicast_mac(dst.into()));
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    // IHL 6 for the Router Alert option; TOS 0xc0 (internetwork control), as Linux sends
    // IGMP.
    f.extend_from_slice(&[0x46, 0xc0]);
    f.extend_from_slice(&(ip_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0, 1, IPPROTO_IGMP, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[IPOPT_RA, 4, 0, 0]);
    let ip_sum = checksum(&f[14..38]);
    f[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    f.extend_from_slice(&[IGMP_QUERY, encode_code8(tenths(q.max_response)), 0, 0]);
    f.extend_from_slice(&group.unwrap_or(Ipv4Addr::UNSPECIFIED).octets());
    f.extend_from_slice(&[qrv_field(q), encode_code8(secs(q.qqi))]);
    f.extend_from_slice(&(sources.len() as u16).to_be_bytes());
    for s in &sources {
        f.extend_from_slice(&s.octets());
    }
    let igmp_sum = checksum(&f[38..]);
    f[40..42].copy_from_slice(&igmp_sum.to_be_bytes());
    f
}

fn build_v6(q: &QueryToSend, src_mac: [u8; 6], src: Ipv6Addr) -> Vec<u8> {
    let group = match q.group {
        Some(IpAddr::V6(g)) => Some(g),
        _ => None,
    };
    let sources: Vec<Ipv6Addr> = q
        .sources
        .iter()
        .filter_map(|s| match s {
            IpAddr::V6(s) => Some(*s),
            IpAddr::V4(_) => None,
        })
        .take(usize::from(u16::MAX))
        .collect();
    let dst = group.unwrap_or(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1));
    let mld_len = 28 + 16 * sources.len();
    let mut f = Vec::with_capacity(14 + 48 + mld_len);
    f.extend_from_slice(&multicast_mac(dst.into()));
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((8 + mld_len) as u16).to_be_bytes());
    f.extend_from_slice(&[IPPROTO_HOPOPTS, 1]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    // Hop-by-hop: Router Alert (MLD) then a PadN of two to fill the 8 bytes.
    f.extend_from_slice(&[IPPROTO_ICMPV6, 0, IPV6_OPT_RA, 2, 0, 0, 1, 0]);
    let at = f.len();
    f.extend_from_slice(&[MLD_QUERY, 0, 0, 0]);
    f.extend_from_slice(&encode_code16(millis(q.max_response)).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&group.unwrap_or(Ipv6Addr::UNSPECIFIED).octets());
    f.extend_from_slice(&[qrv_field(q), encode_code8(secs(q.qqi))]);
    f.extend_from_slice(&(sources.len() as u16).to_be_bytes());
    for s in &sources {
        f.extend_from_slice(&s.octets());
    }
    let sum = icmpv6_checksum(src, dst, &f[at..]);
    f[at + 2..at + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The ICMPv6 checksum (RFC 4443 §2.3) of `msg` with its checksum field zeroed, over the
/// RFC 8200 §8.1 pseudo-header.
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&src.octets());
    pseudo[16..32].copy_from_slice(&dst.octets());
    pseudo[32..36].copy_from_slice(&(msg.len() as u32).to_be_bytes());
    pseudo[39] = IPPROTO_ICMPV6;
    !sum(u32::from(sum(0, &pseudo)), msg)
}

/// Frames of every message kind, for tests here and in the router, and the fuzz seeds.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// An IPv4 frame carrying `igmp` (its checksum filled in), with or without the Router
    /// Alert option.
    pub fn v4_frame(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, ra: bool, igmp: &[u8]) -> Vec<u8> {
        let mut msg = igmp.to_vec();
        if msg.len() >= 4 {
            msg[2..4].fill(0);
            let s = checksum(&msg);
            msg[2..4].copy_from_slice(&s.to_be_bytes());
        }
        let hl = if ra { 24 } else { 20 };
        let mut f = multicast_mac(dst.into()).to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        f.extend_from_slice(&[(0x40 | (hl / 4)) as u8, 0xc0]);
        f.extend_from_slice(&((hl + msg.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0, ttl, IPPROTO_IGMP, 0, 0]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        if ra {
            f.extend_from_slice(&[IPOPT_RA, 4, 0, 0]);
        }
        let s = checksum(&f[14..14 + hl]);
        f[24..26].copy_from_slice(&s.to_be_bytes());
        f.extend_from_slice(&msg);
        f
    }

    /// An IPv6 frame carrying `mld` (its checksum filled in), with or without a hop-by-hop
    /// header holding the Router Alert.
    pub fn v6_frame(src: Ipv6Addr, dst: Ipv6Addr, hops: u8, ra: bool, mld: &[u8]) -> Vec<u8> {
        let mut msg = mld.to_vec();
        if msg.len() >= 4 {
            msg[2..4].fill(0);
            let s = icmpv6_checksum(src, dst, &msg);
            msg[2..4].copy_from_slice(&s.to_be_bytes());
        }
        let ext = if ra { 8 } else { 0 };
        let mut f = multicast_mac(dst.into()).to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((ext + msg.len()) as u16).to_be_bytes());
        let nh = if ra { IPPROTO_HOPOPTS } else { IPPROTO_ICMPV6 };
        f.extend_from_slice(&[nh, hops]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        if ra {
            f.extend_from_slice(&[IPPROTO_ICMPV6, 0, IPV6_OPT_RA, 2, 0, 0, 1, 0]);
        }
        f.extend_from_slice(&msg);
        f
    }

    /// An IGMP message of `kind` with `group` (checksum left for [`v4_frame`]).
    pub fn igmp_simple(kind: u8, code: u8, group: Ipv4Addr) -> Vec<u8> {
        let mut m = vec![kind, code, 0, 0];
        m.extend_from_slice(&group.octets());
        m
    }

    /// An IGMPv3 (v4 addresses) or MLDv2 (v6) report body.
    pub fn v3_report(records: &[Record]) -> Vec<u8> {
        let v6 = records.first().is_some_and(|r| r.group.is_ipv6());
        let mut m = vec![
            if v6 { MLD_V2_REPORT } else { IGMP_V3_REPORT },
            0,
            0,
            0,
            0,
            0,
        ];
        m.extend_from_slice(&(records.len() as u16).to_be_bytes());
        for r in records {
            m.extend_from_slice(&[r.kind as u8, 0]);
            m.extend_from_slice(&(r.sources.len() as u16).to_be_bytes());
            for a in std::iter::once(&r.group).chain(&r.sources) {
                match a {
                    IpAddr::V4(a) => m.extend_from_slice(&a.octets()),
                    IpAddr::V6(a) => m.extend_from_slice(&a.octets()),
                }
            }
        }
        m
    }

    /// An MLDv1 message of `kind` for `group`.
    pub fn mld_simple(kind: u8, delay: u16, group: Ipv6Addr) -> Vec<u8> {
        let mut m = vec![kind, 0, 0, 0];
        m.extend_from_slice(&delay.to_be_bytes());
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&group.octets());
        m
    }

    pub const LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x10);
    pub const MLDV2_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
    pub const IGMPV3_ROUTERS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 22);
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use proptest::prelude::*;

    const H: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const G4: Ipv4Addr = Ipv4Addr::new(239, 1, 2, 3);
    const G6: Ipv6Addr = Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 0x42);

    fn record(kind: RecordType, group: IpAddr, sources: &[IpAddr]) -> Record {
        Record {
            kind,
            group,
            sources: sources.to_vec(),
        }
    }

    #[test]
    fn code8_follows_rfc3376_examples() {
        assert_eq!(decode_code8(0x7f), 127);
        // 0x80: mant 0, exp 0 -> 0x10 << 3.
        assert_eq!(decode_code8(0x80), 128);
        assert_eq!(decode_code8(0xff), 31 << 10);
        assert_eq!(encode_code8(127), 127);
        assert_eq!(encode_code8(128), 0x80);
        // 125 s QQI fits directly; 250 needs the float form: 250 = 0b1_1111_010 -> mant 0xf,
        // exp 0, 248 after truncation.
        assert_eq!(encode_code8(250), 0x8f);
        assert_eq!(decode_code8(0x8f), 248);
        assert_eq!(encode_code8(u32::MAX), 0xff);
        assert_eq!(decode_code16(0x7fff), 32767);
        assert_eq!(decode_code16(0x8000), 32768);
        assert_eq!(decode_code16(0xffff), 0x1fff << 10);
        assert_eq!(encode_code16(u32::MAX), 0xffff);
    }

    proptest! {
        #[test]
        fn codes_round_down_and_decode_exactly(v in 0u32..40_000, w in 0u32..9_000_000) {
            let c = decode_code8(encode_code8(v));
            prop_assert!(c <= v);
            prop_assert_eq!(encode_code8(c), encode_code8(v));
            // The float keeps 5 significant bits: within 1/16 below.
            if v <= decode_code8(0xff) {
                prop_assert!(v - c <= v / 16);
            }
            let c = decode_code16(encode_code16(w));
            prop_assert!(c <= w);
            if w <= decode_code16(0xffff) {
                prop_assert!(w - c <= w / 4096);
            }
        }

        #[test]
        fn codes_are_monotonic(a in any::<u8>(), b in any::<u8>(), c in any::<u16>(), d in any::<u16>()) {
            prop_assert_eq!(a <= b, decode_code8(a) <= decode_code8(b));
            prop_assert_eq!(c <= d, decode_code16(c) <= decode_code16(d));
        }
    }

    fn arb_query(v6: bool) -> impl Strategy<Value = (QueryToSend, IpAddr)> {
        let addr = move |multicast: bool| {
            any::<[u8; 16]>().prop_map(move |mut b| -> IpAddr {
                if v6 {
                    if multicast {
                        b[0] = 0xff;
                    } else {
                        b[0] = 0xfe;
                        b[1] = 0x80 | (b[1] & 0x3f);
                    }
                    Ipv6Addr::from(b).into()
                } else {
                    b[0] = if multicast { 224 | (b[0] & 0x0f) } else { 10 };
                    Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
                }
            })
        };
        (
            proptest::option::of(addr(true)),
            proptest::collection::vec(addr(false), 0..20),
            0u64..10_000_000,
            any::<bool>(),
            0u8..=7,
            0u64..40_000,
            addr(false),
        )
            .prop_map(|(group, sources, mr, suppress, qrv, qqi, src)| {
                (
                    QueryToSend {
                        group,
                        sources,
                        max_response: Duration::from_millis(mr),
                        suppress,
                        qrv,
                        qqi: Duration::from_secs(qqi),
                    },
                    src,
                )
            })
    }

    fn check_round_trip(q: &QueryToSend, src: IpAddr) -> Result<(), TestCaseError> {
        let frame = build_query(q, [2, 0, 0, 0, 0, 9], src);
        let got = parse(&frame).map_err(|r| TestCaseError::fail(format!("refused {r:?}")))?;
        let v6 = src.is_ipv6();
        let (mr, qqi) = quantized(v6, q.max_response, q.qqi);
        let all = if v6 {
            IpAddr::from(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1))
        } else {
            IpAddr::from(Ipv4Addr::new(224, 0, 0, 1))
        };
        let dst = q.group.unwrap_or(all);
        prop_assert_eq!(&frame[..6], &multicast_mac(dst)[..]);
        prop_assert_eq!(
            got,
            Received {
                source: src,
                destination: dst,
                message: Message::Query(Query {
                    version: if v6 { 2 } else { 3 },
                    group: q.group,
                    max_response: mr,
                    suppress: q.suppress,
                    qrv: q.qrv,
                    qqi,
                    sources: q.sources.clone(),
                }),
                missing_router_alert: false,
            }
        );
        Ok(())
    }

    proptest! {
        #[test]
        fn built_v4_queries_parse_back(q in arb_query(false)) {
            check_round_trip(&q.0, q.1)?;
        }

        #[test]
        fn built_v6_queries_parse_back(q in arb_query(true)) {
            check_round_trip(&q.0, q.1)?;
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        /// Flipping any byte of a valid message past the Ethernet header is either refused
        /// or still a well-formed message: never a panic.
        #[test]
        fn corrupted_frames_never_panic(q in arb_query(false), at in any::<prop::sample::Index>(), x in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut f = build_query(&q.0, [2; 6], q.1);
            let i = at.index(f.len());
            f[i] ^= x;
            let _ = parse(&f);
            f.truncate(cut.index(f.len()));
            let _ = parse(&f);
        }
    }

    #[test]
    fn v4_general_query_layout() {
        let q = QueryToSend {
            group: None,
            sources: vec![],
            max_response: Duration::from_secs(10),
            suppress: false,
            qrv: 2,
            qqi: Duration::from_secs(125),
        };
        let f = build_query(&q, [2, 0, 0, 0, 0, 1], H.into());
        assert_eq!(&f[..6], &[0x01, 0x00, 0x5e, 0, 0, 1]);
        assert_eq!(f.len(), 14 + 24 + 12);
        assert_eq!(f[14], 0x46);
        assert_eq!(f[22], 1, "TTL 1");
        assert_eq!(&f[34..38], &[IPOPT_RA, 4, 0, 0]);
        assert_eq!(checksum(&f[14..38]), 0);
        assert_eq!(checksum(&f[38..]), 0);
        assert_eq!(
            &f[38..50],
            &[0x11, 100, f[40], f[41], 0, 0, 0, 0, 2, 125, 0, 0]
        );
    }

    #[test]
    fn v6_query_layout() {
        let q = QueryToSend {
            group: Some(G6.into()),
            sources: vec![],
            max_response: Duration::from_secs(1),
            suppress: true,
            qrv: 2,
            qqi: Duration::from_secs(125),
        };
        let f = build_query(&q, [2, 0, 0, 0, 0, 1], LL.into());
        assert_eq!(&f[..6], &[0x33, 0x33, 0, 0, 0, 0x42]);
        assert_eq!(f[21], 1, "hop limit 1");
        assert_eq!(f[20], 0, "hop-by-hop first");
        assert_eq!(&f[54..62], &[58, 0, 5, 2, 0, 0, 1, 0]);
        assert_eq!(f.len(), 14 + 40 + 8 + 28);
        assert_eq!(be16(&f, 66), 1000);
        assert_eq!(f[62 + 24], 0x08 | 2);
    }

    #[test]
    fn igmp_messages_of_every_version_parse() {
        let ok = |f: Vec<u8>| parse(&f).map(|r| r.message);
        assert_eq!(
            ok(v4_frame(H, G4, 1, false, &igmp_simple(0x12, 0, G4))),
            Ok(Message::V1Report { group: G4.into() })
        );
        assert_eq!(
            ok(v4_frame(H, G4, 1, true, &igmp_simple(0x16, 0, G4))),
            Ok(Message::V2Report { group: G4.into() })
        );
        assert_eq!(
            ok(v4_frame(
                H,
                Ipv4Addr::new(224, 0, 0, 2),
                1,
                true,
                &igmp_simple(0x17, 0, G4)
            )),
            Ok(Message::Leave { group: G4.into() })
        );
        let v1q = ok(v4_frame(
            H,
            Ipv4Addr::new(224, 0, 0, 1),
            1,
            false,
            &igmp_simple(0x11, 0, Ipv4Addr::UNSPECIFIED),
        ));
        assert!(
            matches!(
                v1q,
                Ok(Message::Query(Query {
                    version: 1,
                    group: None,
                    ..
                }))
            ),
            "{v1q:?}"
        );
        let v2q = ok(v4_frame(H, G4, 1, true, &igmp_simple(0x11, 200, G4)));
        let Ok(Message::Query(q)) = v2q else {
            panic!("{v2q:?}")
        };
        assert_eq!(
            (q.version, q.group, q.max_response),
            (2, Some(G4.into()), Duration::from_secs(20)),
            "v2 codes are linear"
        );
        let s1: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let records = vec![
            record(RecordType::IsIn, G4.into(), &[s1]),
            record(RecordType::IsEx, G4.into(), &[]),
            record(RecordType::ToIn, G4.into(), &[s1]),
            record(RecordType::ToEx, G4.into(), &[s1, s1]),
            record(RecordType::Allow, G4.into(), &[s1]),
            record(RecordType::Block, G4.into(), &[s1]),
        ];
        assert_eq!(
            parse(&v4_frame(
                Ipv4Addr::UNSPECIFIED,
                IGMPV3_ROUTERS,
                1,
                true,
                &v3_report(&records)
            )),
            Ok(Received {
                source: Ipv4Addr::UNSPECIFIED.into(),
                destination: IGMPV3_ROUTERS.into(),
                message: Message::Report { records },
                missing_router_alert: false,
            }),
            "v3 reports may come from 0.0.0.0"
        );
    }

    #[test]
    fn mld_messages_parse() {
        let ok = |f: Vec<u8>| parse(&f).map(|r| r.message);
        assert_eq!(
            ok(v6_frame(LL, G6, 1, true, &mld_simple(131, 0, G6))),
            Ok(Message::V2Report { group: G6.into() })
        );
        assert_eq!(
            ok(v6_frame(LL, G6, 1, true, &mld_simple(132, 0, G6))),
            Ok(Message::Leave { group: G6.into() })
        );
        let q = ok(v6_frame(
            LL,
            G6,
            1,
            true,
            &mld_simple(130, 1234, Ipv6Addr::UNSPECIFIED),
        ));
        let Ok(Message::Query(q)) = q else {
            panic!("{q:?}")
        };
        assert_eq!(
            (q.version, q.group, q.max_response),
            (1, None, Duration::from_millis(1234))
        );
        let s: IpAddr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into();
        let records = vec![
            record(RecordType::Allow, G6.into(), &[s]),
            record(RecordType::ToEx, G6.into(), &[]),
        ];
        assert_eq!(
            ok(v6_frame(LL, MLDV2_ROUTERS, 1, true, &v3_report(&records))),
            Ok(Message::Report { records })
        );
    }

    #[test]
    fn vlan_tagged_and_padded_frames_parse() {
        let f = v4_frame(H, G4, 1, true, &igmp_simple(0x16, 0, G4));
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        tagged.extend_from_slice(&f[12..]);
        // Ethernet pads to 60 bytes; the IP length ends the message.
        tagged.resize(64, 0xaa);
        assert_eq!(
            parse(&tagged).map(|r| r.message),
            Ok(Message::V2Report { group: G4.into() })
        );
    }

    /// Linux and FRR take IGMPv2 reports without Router Alert; so does the relay, flagging
    /// them for a counter. The rest of IGMPv2/v3 still needs the option, and v1 is not
    /// flagged (it predates the option).
    #[test]
    fn igmpv2_reports_without_router_alert_are_taken_and_flagged() {
        let report = igmp_simple(0x16, 0, G4);
        let got = parse(&v4_frame(H, G4, 1, false, &report));
        assert_eq!(
            got,
            Ok(Received {
                source: H.into(),
                destination: G4.into(),
                message: Message::V2Report { group: G4.into() },
                missing_router_alert: true,
            })
        );
        let with = parse(&v4_frame(H, G4, 1, true, &report)).unwrap();
        assert!(!with.missing_router_alert);
        let v1 = parse(&v4_frame(H, G4, 1, false, &igmp_simple(0x12, 0, G4))).unwrap();
        assert!(
            !v1.missing_router_alert,
            "IGMPv1 has no Router Alert to miss"
        );
        let all = Ipv4Addr::new(224, 0, 0, 1);
        for (what, to, igmp) in [
            ("leave", G4, igmp_simple(0x17, 0, G4)),
            (
                "v2 query",
                all,
                igmp_simple(0x11, 100, Ipv4Addr::UNSPECIFIED),
            ),
            (
                "v3 report",
                IGMPV3_ROUTERS,
                v3_report(&[record(RecordType::IsEx, G4.into(), &[])]),
            ),
        ] {
            assert_eq!(
                parse(&v4_frame(H, to, 1, false, &igmp)),
                Err(Refusal::NoRouterAlert),
                "{what}"
            );
        }
        // MLDv1 reports (IGMPv2's counterpart) keep needing it: MLD hosts all send it.
        assert_eq!(
            parse(&v6_frame(LL, G6, 1, false, &mld_simple(131, 0, G6))),
            Err(Refusal::NoRouterAlert)
        );
    }

    #[test]
    fn each_check_has_its_refusal() {
        let leave = igmp_simple(0x17, 0, G4);
        let good = v4_frame(H, G4, 1, true, &leave);
        assert!(parse(&good).is_ok());
        assert_eq!(
            parse(&v4_frame(H, G4, 2, true, &leave)),
            Err(Refusal::TtlNotOne)
        );
        assert_eq!(
            parse(&v4_frame(H, G4, 1, false, &leave)),
            Err(Refusal::NoRouterAlert)
        );
        // A v1 report needs no Router Alert; a v3 report does.
        assert!(parse(&v4_frame(H, G4, 1, false, &igmp_simple(0x12, 0, G4))).is_ok());
        let v3 = v3_report(&[record(RecordType::IsEx, G4.into(), &[])]);
        assert_eq!(
            parse(&v4_frame(H, IGMPV3_ROUTERS, 1, false, &v3)),
            Err(Refusal::NoRouterAlert)
        );
        assert_eq!(
            parse(&v4_frame(Ipv4Addr::UNSPECIFIED, G4, 1, true, &leave)),
            Err(Refusal::BadSource)
        );
        assert_eq!(
            parse(&v4_frame(G4, G4, 1, true, &leave)),
            Err(Refusal::BadSource)
        );
        assert_eq!(
            parse(&v4_frame(H, G4, 1, true, &igmp_simple(0x17, 0, H))),
            Err(Refusal::BadGroup)
        );
        assert_eq!(
            parse(&v4_frame(H, G4, 1, true, &igmp_simple(0x13, 0, G4))),
            Err(Refusal::UnknownType)
        );
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(parse(&bad), Err(Refusal::BadChecksum));
        let mut bad = good.clone();
        bad[14 + 8] = 7;
        assert_eq!(parse(&bad), Err(Refusal::BadChecksum), "IP header checksum");
        let mut q10 = igmp_simple(0x11, 10, G4);
        q10.extend_from_slice(&[0, 0]);
        assert_eq!(
            parse(&v4_frame(H, G4, 1, true, &q10)),
            Err(Refusal::BadLength)
        );
        assert_eq!(parse(&good[..good.len() - 1]), Err(Refusal::Truncated));
        let mut frag = v4_frame(H, G4, 1, true, &leave);
        frag[14 + 6] = 0x20;
        frag[24..26].fill(0);
        let s = checksum(&frag[14..38]);
        frag[24..26].copy_from_slice(&s.to_be_bytes());
        assert_eq!(parse(&frag), Err(Refusal::Fragment));
        // Other IP protocols and ICMPv6 types are not ours.
        let mut udp = good.clone();
        udp[14 + 9] = 17;
        assert_eq!(parse(&udp), Err(Refusal::NotMembership));
        let ns = v6_frame(LL, G6, 255, false, &mld_simple(135, 0, G6));
        assert_eq!(parse(&ns), Err(Refusal::NotMembership));
        assert_eq!(parse(&[0u8; 10]), Err(Refusal::NotMembership));

        let done = mld_simple(132, 0, G6);
        assert!(parse(&v6_frame(LL, G6, 1, true, &done)).is_ok());
        assert_eq!(
            parse(&v6_frame(LL, G6, 2, true, &done)),
            Err(Refusal::TtlNotOne)
        );
        assert_eq!(
            parse(&v6_frame(LL, G6, 1, false, &done)),
            Err(Refusal::NoRouterAlert)
        );
        let global = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        assert_eq!(
            parse(&v6_frame(global, G6, 1, true, &done)),
            Err(Refusal::BadSource)
        );
        let report = v3_report(&[record(RecordType::IsEx, G6.into(), &[])]);
        assert_eq!(
            parse(&v6_frame(
                Ipv6Addr::UNSPECIFIED,
                MLDV2_ROUTERS,
                1,
                true,
                &report
            )),
            Err(Refusal::BadSource)
        );
        let mut bad = v6_frame(LL, G6, 1, true, &done);
        let n = bad.len();
        bad[n - 1] ^= 0x10;
        assert_eq!(parse(&bad), Err(Refusal::BadChecksum));
        let mut q26 = mld_simple(130, 0, G6);
        q26.extend_from_slice(&[0, 0]);
        assert_eq!(
            parse(&v6_frame(LL, G6, 1, true, &q26)),
            Err(Refusal::BadLength)
        );
        assert_eq!(
            parse(&v6_frame(LL, G6, 1, true, &done[..20])),
            Err(Refusal::Truncated)
        );
    }

    #[test]
    fn counts_past_the_end_are_truncated() {
        // 65535 records claimed, none present.
        let mut m = v3_report(&[]);
        m[6..8].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(
            parse(&v4_frame(H, IGMPV3_ROUTERS, 1, true, &m)),
            Err(Refusal::Truncated)
        );
        // One record claiming 65535 sources, one present.
        let s: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let mut m = v3_report(&[record(RecordType::Allow, G4.into(), &[s])]);
        m[10..12].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(
            parse(&v4_frame(H, IGMPV3_ROUTERS, 1, true, &m)),
            Err(Refusal::Truncated)
        );
        // Aux data length past the end.
        let mut m = v3_report(&[record(RecordType::Allow, G4.into(), &[s])]);
        m[9] = 1;
        assert_eq!(
            parse(&v4_frame(H, IGMPV3_ROUTERS, 1, true, &m)),
            Err(Refusal::Truncated)
        );
        // A query claiming sources it lacks.
        let q = QueryToSend {
            group: Some(G4.into()),
            sources: vec![s],
            max_response: Duration::from_secs(1),
            suppress: false,
            qrv: 2,
            qqi: Duration::from_secs(125),
        };
        let mut f = build_query(&q, [2; 6], H.into());
        let n = f.len();
        f[n - 6..n - 4].copy_from_slice(&[0, 2]);
        f[40..42].fill(0);
        let c = checksum(&f[38..]);
        f[40..42].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse(&f), Err(Refusal::Truncated));
    }

    #[test]
    fn unknown_record_types_are_skipped_and_aux_data_stepped_over() {
        let s: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let mut m = v3_report(&[
            record(RecordType::Allow, G4.into(), &[s]),
            record(RecordType::Block, G4.into(), &[s]),
        ]);
        // The first record becomes type 9 with one word of aux data inserted after it.
        m[8] = 9;
        m[9] = 1;
        m.splice(20..20, [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(
            parse(&v4_frame(H, IGMPV3_ROUTERS, 1, true, &m)).map(|r| r.message),
            Ok(Message::Report {
                records: vec![record(RecordType::Block, G4.into(), &[s])]
            })
        );
    }

    /// The committed fuzz seeds (fuzz/corpus/listeners) are the frames below, each of one
    /// message kind, and each parses: two bytes of arrival time (the fuzz target's prefix)
    /// and the frame. With `RELAY_LISTENERS_SEEDS=1` the seeds are written anew instead.
    #[test]
    fn fuzz_seeds_are_the_message_kinds() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/listeners");
        let write = std::env::var_os("RELAY_LISTENERS_SEEDS").is_some();
        let s4: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let s6: IpAddr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into();
        let query = |group, sources| QueryToSend {
            group,
            sources,
            max_response: Duration::from_secs(1),
            suppress: false,
            qrv: 2,
            qqi: Duration::from_secs(125),
        };
        let lower4: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let frames = [
            (
                "igmpv1_report",
                v4_frame(H, G4, 1, false, &igmp_simple(0x12, 0, G4)),
            ),
            (
                "igmpv2_report",
                v4_frame(H, G4, 1, true, &igmp_simple(0x16, 0, G4)),
            ),
            (
                "igmpv2_leave",
                v4_frame(H, G4, 1, true, &igmp_simple(0x17, 0, G4)),
            ),
            (
                "igmpv2_query",
                v4_frame(H, G4, 1, true, &igmp_simple(0x11, 10, G4)),
            ),
            (
                "igmpv3_report",
                v4_frame(
                    H,
                    IGMPV3_ROUTERS,
                    1,
                    true,
                    &v3_report(&[
                        record(RecordType::IsEx, G4.into(), &[s4]),
                        record(RecordType::Block, G4.into(), &[s4]),
                        record(RecordType::ToIn, G4.into(), &[]),
                    ]),
                ),
            ),
            (
                "igmpv3_general_query",
                build_query(&query(None, vec![]), [2; 6], lower4),
            ),
            (
                "igmpv3_source_query",
                build_query(&query(Some(G4.into()), vec![s4]), [2; 6], lower4),
            ),
            (
                "mldv1_report",
                v6_frame(LL, G6, 1, true, &mld_simple(131, 0, G6)),
            ),
            (
                "mldv1_done",
                v6_frame(LL, G6, 1, true, &mld_simple(132, 0, G6)),
            ),
            (
                "mldv2_report",
                v6_frame(
                    LL,
                    MLDV2_ROUTERS,
                    1,
                    true,
                    &v3_report(&[
                        record(RecordType::IsIn, G6.into(), &[s6]),
                        record(RecordType::ToEx, G6.into(), &[s6]),
                    ]),
                ),
            ),
            (
                "mldv2_query",
                build_query(
                    &query(Some(G6.into()), vec![s6]),
                    [2; 6],
                    IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
                ),
            ),
        ];
        for (name, frame) in frames {
            assert!(parse(&frame).is_ok(), "{name}");
            let mut seed = vec![0x01, 0x00];
            seed.extend_from_slice(&frame);
            let path = format!("{dir}/{name}");
            if write {
                std::fs::write(&path, seed).unwrap();
            } else {
                let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                assert_eq!(committed, seed, "{path} is stale: regenerate the seeds");
            }
        }
    }

    #[test]
    fn refusal_names_are_distinct() {
        let names: std::collections::BTreeSet<_> = Refusal::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Refusal::ALL.len());
    }
}
