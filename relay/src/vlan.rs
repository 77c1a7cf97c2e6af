//! VLAN trunks: the `vlan:` of a rule's input (which tagged or untagged frames it takes) and
//! of an output (send untagged, or tagged with a VID), and the tag rewrite that moves the
//! frame's bytes by the 4 bytes of a tag.
//!
//! Only one tag is ever handled. A frame with two (QinQ) is not classified at all (its inner
//! ethertype is a tag, not IP), so it is passed to the kernel; a single 802.1ad tag is read as
//! a VLAN tag like an 802.1Q one. Whatever tag a frame arrived with, an output sends an
//! 802.1Q tag (TPID 0x8100) or none.

use std::fmt;

use relay_common::VLAN_UNTAGGED;
use serde::{Deserialize, Deserializer, de};

use crate::{
    rewrite::RewriteError,
    wire::{ETH_HLEN, ETH_P_8021Q, VLAN_HLEN},
};

/// Where the tag sits: right after the two MAC addresses.
const TAG_AT: usize = 12;

/// The lowest and highest VID a rule may name: 0 means "no VLAN" (a priority tag) and 4095 is
/// reserved (IEEE 802.1Q table 9-2).
pub const VID_MIN: u16 = 1;
pub const VID_MAX: u16 = 4094;

/// A `vlan:` value: a VID, or `untagged`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vlan {
    /// Frames without a tag (or with a priority tag, VID 0); on an output, the same as
    /// leaving `vlan:` out.
    Untagged,
    /// Frames tagged with this VID. The parser takes any u16; `Config::validate` refuses what
    /// is not 1..=4094, naming the rule.
    Id(u16),
}

impl Vlan {
    /// The `RuleKey::vlan` of an input with this `vlan:`.
    pub fn key(self) -> u16 {
        match self {
            Vlan::Untagged => VLAN_UNTAGGED,
            Vlan::Id(vid) => vid,
        }
    }

    /// The VID an output with this `vlan:` tags its frames with; `None` to send them untagged.
    pub fn vid(self) -> Option<u16> {
        match self {
            Vlan::Untagged => None,
            Vlan::Id(vid) => Some(vid),
        }
    }

    /// Whether an input with this `vlan:` (`None`: none given, any frame) takes a frame with
    /// this tag control word; VID 0 is a priority tag, so untagged.
    pub fn takes(vlan: Option<Vlan>, tci: Option<u16>) -> bool {
        let vid = tci.map(|t| t & 0x0fff).filter(|&v| v != 0);
        match vlan {
            None => true,
            Some(Vlan::Untagged) => vid.is_none(),
            Some(Vlan::Id(v)) => vid == Some(v),
        }
    }

    /// Whether this names a usable VLAN: `untagged`, or a VID from 1 to 4094.
    pub fn is_valid(self) -> bool {
        match self {
            Vlan::Untagged => true,
            Vlan::Id(vid) => (VID_MIN..=VID_MAX).contains(&vid),
        }
    }
}

impl fmt::Display for Vlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Vlan::Untagged => f.write_str("untagged"),
            Vlan::Id(vid) => write!(f, "{vid}"),
        }
    }
}

/// As written in the file: the VID as a number, or `"untagged"`.
impl serde::Serialize for Vlan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Vlan::Untagged => s.serialize_str("untagged"),
            Vlan::Id(vid) => s.serialize_u16(*vid),
        }
    }
}

impl<'de> Deserialize<'de> for Vlan {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Vlan;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a VLAN ID from 1 to 4094 or `untagged`")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Vlan, E> {
                u16::try_from(v)
                    .map(Vlan::Id)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vlan, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vlan, E> {
                match v {
                    "untagged" => Ok(Vlan::Untagged),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Whether an output sending with `out` (its `vlan:`) on the input's own interface could be
/// taken by an input with `input`: only then can the relay hear its own frames again.
pub fn may_loop(input: Option<Vlan>, out: Option<Vlan>) -> bool {
    let sent = out.unwrap_or(Vlan::Untagged);
    input.is_none_or(|i| i == sent)
}

/// Gives a frame the tag an output sends with: none (`vid` is `None`: a tag the frame arrived
/// with is removed) or an 802.1Q tag with `vid` (a tag is inserted into an untagged frame, or
/// the arrived tag's VID replaced, keeping its priority and DEI bits).
///
/// `buf` holds the frame's `len` bytes, and must have 4 bytes of room after them when a tag is
/// to be inserted. Inserting or removing a tag moves everything after the MAC addresses, as
/// the frame's start address is fixed. Returns the frame's new length and its flow with the
/// header offsets moved; `flow` is [`crate::wire::classify`]'s answer for the frame as it
/// arrived.
pub fn retag(
    buf: &mut [u8],
    len: usize,
    flow: &crate::wire::Flow,
    vid: Option<u16>,
) -> Result<(usize, crate::wire::Flow), RewriteError> {
    let tagged = flow.tci.is_some();
    let l3 = if tagged {
        ETH_HLEN + VLAN_HLEN
    } else {
        ETH_HLEN
    };
    if flow.l3 != l3 || flow.l4 < flow.l3 || len < flow.l4 || len > buf.len() {
        return Err(RewriteError::Malformed);
    }
    let mut out = *flow;
    let new_len = match (flow.tci, vid) {
        (None, None) => len,
        (Some(tci), Some(vid)) => {
            let tci = tci & 0xf000 | vid & 0x0fff;
            buf[TAG_AT..TAG_AT + 2].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
            buf[TAG_AT + 2..TAG_AT + 4].copy_from_slice(&tci.to_be_bytes());
            out.tci = Some(tci);
            len
        }
        (Some(_), None) => {
            buf.copy_within(TAG_AT + VLAN_HLEN..len, TAG_AT);
            out.tci = None;
            out.l3 -= VLAN_HLEN;
            out.l4 -= VLAN_HLEN;
            len - VLAN_HLEN
        }
        (None, Some(vid)) => {
            if buf.len() < len + VLAN_HLEN {
                return Err(RewriteError::TooLarge);
            }
            buf.copy_within(TAG_AT..len, TAG_AT + VLAN_HLEN);
            let tci = vid & 0x0fff;
            buf[TAG_AT..TAG_AT + 2].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
            buf[TAG_AT + 2..TAG_AT + 4].copy_from_slice(&tci.to_be_bytes());
            out.tci = Some(tci);
            out.l3 += VLAN_HLEN;
            out.l4 += VLAN_HLEN;
            len + VLAN_HLEN
        }
    };
    Ok((new_len, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        craft::{UdpFrame, build_udp_frame},
        rewrite::{OutputAction, rewrite},
        wire::classify,
    };

    /// An input's `vlan:` against a frame's tag: none given takes anything, `untagged` takes
    /// untagged and priority-tagged frames (VID 0), a VID takes only that VID whatever the
    /// priority bits.
    #[test]
    fn takes_by_vid_not_priority() {
        let cases = [
            (None, None, true),
            (None, Some(0x2014), true),
            (Some(Vlan::Untagged), None, true),
            (Some(Vlan::Untagged), Some(0x6000), true),
            (Some(Vlan::Untagged), Some(0x000a), false),
            (Some(Vlan::Id(10)), Some(0xe00a), true),
            (Some(Vlan::Id(10)), Some(0x0014), false),
            (Some(Vlan::Id(10)), None, false),
        ];
        for (vlan, tci, want) in cases {
            assert_eq!(Vlan::takes(vlan, tci), want, "{vlan:?} {tci:?}");
        }
    }
    use proptest::prelude::*;
    use std::net::IpAddr;

    fn samples() -> Vec<UdpFrame> {
        ["239.1.1.1", "ff18::1:1"]
            .into_iter()
            .zip(["198.18.1.1", "2001:2::1"])
            .map(|(g, s)| {
                UdpFrame::simple(s.parse().unwrap(), g.parse().unwrap(), 5000, 8, b"payload")
            })
            .collect()
    }

    /// The frame with room for a tag, retagged; returns the frame (its new length) and flow.
    fn apply(frame: &[u8], vid: Option<u16>) -> (Vec<u8>, crate::wire::Flow) {
        let flow = classify(frame).unwrap();
        let mut buf = frame.to_vec();
        buf.extend([0xee; 4]);
        let (len, f) = retag(&mut buf, frame.len(), &flow, vid).unwrap();
        buf.truncate(len);
        (buf, f)
    }

    #[test]
    fn each_arrival_and_output_gets_the_tag_it_asks_for() {
        for s in samples() {
            let untagged = build_udp_frame(&s);
            // PCP 5, DEI set, VID 10.
            let tagged = build_udp_frame(&UdpFrame {
                vlan: Some(0xb00a),
                ..s.clone()
            });
            let with = |tci| {
                build_udp_frame(&UdpFrame {
                    vlan: Some(tci),
                    ..s.clone()
                })
            };
            // Untagged stays untagged; a tag is inserted with priority 0.
            assert_eq!(apply(&untagged, None).0, untagged);
            assert_eq!(apply(&untagged, Some(30)).0, with(30));
            // A tag is removed, or its VID replaced with PCP and DEI kept.
            assert_eq!(apply(&tagged, None).0, untagged);
            assert_eq!(apply(&tagged, Some(30)).0, with(0xb01e));
            assert_eq!(apply(&tagged, Some(10)).0, tagged);
            // The flow follows the headers.
            let (f, flow) = apply(&untagged, Some(30));
            assert_eq!(classify(&f), Some(flow));
            let (f, flow) = apply(&tagged, None);
            assert_eq!(classify(&f), Some(flow));
        }
    }

    #[test]
    fn an_802_1ad_tag_goes_out_as_802_1q() {
        for s in samples() {
            let mut f = build_udp_frame(&UdpFrame {
                vlan: Some(0x200a),
                ..s.clone()
            });
            f[12..14].copy_from_slice(&[0x88, 0xa8]);
            let want = build_udp_frame(&UdpFrame {
                vlan: Some(0x2014),
                ..s
            });
            assert_eq!(apply(&f, Some(20)).0, want);
        }
    }

    #[test]
    fn no_room_for_a_tag_is_too_large_and_bad_flows_are_malformed() {
        let f = build_udp_frame(&samples()[0]);
        let flow = classify(&f).unwrap();
        let mut buf = f.clone();
        assert_eq!(
            retag(&mut buf, f.len(), &flow, Some(5)),
            Err(RewriteError::TooLarge)
        );
        assert_eq!(buf, f, "a refused frame is left as it was");
        let mut lying = flow;
        lying.tci = Some(1);
        assert_eq!(
            retag(&mut buf, f.len(), &lying, None),
            Err(RewriteError::Malformed)
        );
        assert_eq!(
            retag(&mut buf, flow.l4 - 1, &flow, None),
            Err(RewriteError::Malformed)
        );
        assert_eq!(
            retag(&mut buf, f.len() + 1, &flow, None),
            Err(RewriteError::Malformed)
        );
    }

    #[test]
    fn vlan_values_parse_and_loops_are_found() {
        #[derive(Deserialize)]
        struct V {
            vlan: Vlan,
        }
        let parse = |y: &str| serde_yaml::from_str::<V>(y).map(|v| v.vlan);
        assert_eq!(parse("vlan: 10").unwrap(), Vlan::Id(10));
        assert_eq!(parse("vlan: untagged").unwrap(), Vlan::Untagged);
        assert_eq!(parse("vlan: 4095").unwrap(), Vlan::Id(4095));
        assert!(!Vlan::Id(4095).is_valid() && !Vlan::Id(0).is_valid());
        assert!(Vlan::Id(4094).is_valid() && Vlan::Untagged.is_valid());
        for bad in ["vlan: tagged", "vlan: -1", "vlan: 70000", "vlan: 1.5"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("a VLAN ID from 1 to 4094 or `untagged`"),
                "{bad}: {e}"
            );
        }
        assert!(may_loop(None, None));
        assert!(may_loop(None, Some(Vlan::Id(3))));
        assert!(may_loop(Some(Vlan::Untagged), None));
        assert!(may_loop(Some(Vlan::Id(3)), Some(Vlan::Id(3))));
        assert!(!may_loop(Some(Vlan::Id(3)), Some(Vlan::Id(4))));
        assert!(!may_loop(Some(Vlan::Id(3)), None));
        assert!(!may_loop(Some(Vlan::Untagged), Some(Vlan::Id(4))));
    }

    proptest! {
        /// Any tag treatment of any frame, then the rest of the rewrite: the result is the
        /// frame a sender would build with the output's tag and fields.
        #[test]
        fn retag_then_rewrite_matches_from_scratch(
            v6 in any::<bool>(),
            arrived in proptest::option::of(any::<u16>()),
            vid in proptest::option::of(VID_MIN..=VID_MAX),
            port in proptest::option::of(1u16..),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let s = UdpFrame {
                vlan: arrived,
                payload,
                ..samples()[usize::from(v6)].clone()
            };
            let f = build_udp_frame(&s);
            let flow = classify(&f).unwrap();
            let mut buf = f.clone();
            buf.extend([0u8; 4]);
            let (len, new_flow) = retag(&mut buf, f.len(), &flow, vid).unwrap();
            buf.truncate(len);
            let action = OutputAction {
                port,
                vlan: vid,
                ..OutputAction::plain([2, 0, 0, 0, 0, 9])
            };
            rewrite(&mut buf, &new_flow, &action).unwrap();
            let want = build_udp_frame(&UdpFrame {
                vlan: vid.map(|v| arrived.map_or(0, |t| t & 0xf000) | v),
                src_mac: [2, 0, 0, 0, 0, 9],
                dst_port: port.unwrap_or(s.dst_port),
                ttl: 7,
                ..s
            });
            // Checksums equal by value (one's complement has two zeros).
            let ui = new_flow.l4 + 6;
            let sum = |b: &[u8]| u16::from_be_bytes([b[ui], b[ui + 1]]);
            let (a, b) = (sum(&buf), sum(&want));
            prop_assert!(a == b || (a | b == 0xffff && (a == 0 || b == 0)));
            buf[ui..ui + 2].fill(0);
            let mut want = want;
            want[ui..ui + 2].fill(0);
            prop_assert_eq!(buf, want);
        }

        /// Whatever the bytes and the flow claim, retag refuses or succeeds; it never panics,
        /// and a success leaves a length within the buffer.
        #[test]
        fn retag_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..96),
            len in 0usize..100,
            l3 in 0usize..40,
            l4 in 0usize..80,
            tci in proptest::option::of(any::<u16>()),
            vid in proptest::option::of(any::<u16>()),
        ) {
            let flow = crate::wire::Flow {
                tci,
                l3,
                l4,
                source: IpAddr::from([1, 2, 3, 4]),
                group: IpAddr::from([239, 1, 2, 3]),
                port: 1,
                frag: None,
            };
            let mut buf = bytes;
            if let Ok((n, f)) = retag(&mut buf, len, &flow, vid) {
                prop_assert!(n <= buf.len());
                prop_assert!(f.l4 <= n);
            }
        }
    }
}
