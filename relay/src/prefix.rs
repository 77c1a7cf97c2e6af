//! Address prefixes as rules write them: `239.10.0.0/16`, `ff18::/16`, or a single address
//! (`239.1.1.1`, a /32 or /128). Group ranges and source prefixes are matched, masked and
//! remapped with these.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, de};

/// An IPv4 or IPv6 prefix: an address and how many of its leading bits count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

/// Why a prefix does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixError {
    Syntax,
    /// The length is beyond the family's (32 or 128).
    Length,
}

impl Prefix {
    /// A single address: a /32 or a /128.
    pub fn host(addr: IpAddr) -> Self {
        Prefix {
            addr,
            len: full_len(addr),
        }
    }

    /// 32 for IPv4, 128 for IPv6.
    pub fn full_len(&self) -> u8 {
        full_len(self.addr)
    }

    /// One address, not a range.
    pub fn is_host(&self) -> bool {
        self.len == self.full_len()
    }

    /// The prefix with the bits past its length cleared.
    pub fn network(&self) -> IpAddr {
        mask(self.addr, self.len)
    }

    /// Bits are set past the length (`239.10.3.4/16`): what was meant is unclear.
    pub fn has_host_bits(&self) -> bool {
        self.network() != self.addr
    }

    /// Whether `a` is inside the prefix (never across families).
    pub fn contains(&self, a: IpAddr) -> bool {
        a.is_ipv4() == self.addr.is_ipv4() && mask(a, self.len) == self.network()
    }

    /// Whether every address of `other` is inside this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    /// The length in the rule map's 16-byte form, where IPv4 is mapped into IPv6
    /// (`::ffff:a.b.c.d`): 96 more for IPv4.
    pub fn key_len(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => 96 + self.len,
            IpAddr::V6(_) => self.len,
        }
    }

    /// `addr` moved into this prefix: its bits up to this prefix's length are the prefix's,
    /// the rest (the host bits) stay `addr`'s. How a range input's group maps onto an output
    /// range of the same length.
    pub fn carry(&self, addr: IpAddr) -> IpAddr {
        match (self.network(), addr) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let m = mask_bits_u32(self.len);
                IpAddr::V4(Ipv4Addr::from((u32::from(p) & m) | (u32::from(a) & !m)))
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let m = mask_bits_u128(self.len);
                IpAddr::V6(Ipv6Addr::from((u128::from(p) & m) | (u128::from(a) & !m)))
            }
            // A rule is one family; validation refuses anything else.
            _ => addr,
        }
    }
}

fn full_len(a: IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask_bits_u32(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

fn mask_bits_u128(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

/// `a` with the bits past `len` cleared.
pub fn mask(a: IpAddr, len: u8) -> IpAddr {
    match a {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask_bits_u32(len))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask_bits_u128(len))),
    }
}

/// The 16-byte mask of a key length (see [`Prefix::key_len`]).
pub fn key_mask(key_len: u8) -> [u8; 16] {
    mask_bits_u128(key_len).to_be_bytes()
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            self.addr.fmt(f)
        } else {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((a, l)) = s.split_once('/') else {
            return s.parse().map(Prefix::host).map_err(|_| PrefixError::Syntax);
        };
        let addr: IpAddr = a.parse().map_err(|_| PrefixError::Syntax)?;
        // Digits only: "+16" or " 16" is no length anyone writes.
        if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PrefixError::Syntax);
        }
        let len: u8 = l.parse().map_err(|_| PrefixError::Length)?;
        if len > full_len(addr) {
            return Err(PrefixError::Length);
        }
        Ok(Prefix { addr, len })
    }
}

impl From<IpAddr> for Prefix {
    fn from(a: IpAddr) -> Self {
        Prefix::host(a)
    }
}

impl From<[u8; 4]> for Prefix {
    fn from(a: [u8; 4]) -> Self {
        Prefix::host(a.into())
    }
}

impl From<[u16; 8]> for Prefix {
    fn from(a: [u16; 8]) -> Self {
        Prefix::host(a.into())
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Prefix;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address or a prefix such as 239.10.0.0/16")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Prefix, E> {
                v.parse().map_err(|e| match e {
                    PrefixError::Syntax => E::invalid_value(de::Unexpected::Str(v), &self),
                    PrefixError::Length => E::invalid_value(
                        de::Unexpected::Str(v),
                        &"a prefix length of at most 32 (IPv4) or 128 (IPv6)",
                    ),
                })
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn parses_hosts_and_prefixes() {
        assert_eq!(p("239.1.1.1"), Prefix::host("239.1.1.1".parse().unwrap()));
        assert!(p("239.1.1.1").is_host());
        assert_eq!(p("239.10.0.0/16").len, 16);
        assert_eq!(p("ff18::/16").len, 16);
        assert_eq!(p("ff18::1/128"), p("ff18::1"));
        assert_eq!(p("239.10.0.0/16").to_string(), "239.10.0.0/16");
        assert_eq!(p("239.1.1.1/32").to_string(), "239.1.1.1");
        for bad in [
            "239.1.1",
            "239.1.1.1/",
            "239.1.1.1/+8",
            "239.1.1.1/ 8",
            "x/8",
            "",
        ] {
            assert_eq!(bad.parse::<Prefix>(), Err(PrefixError::Syntax), "{bad}");
        }
        for bad in ["239.1.1.1/33", "ff18::/129", "239.0.0.0/300"] {
            assert_eq!(bad.parse::<Prefix>(), Err(PrefixError::Length), "{bad}");
        }
        assert!(p("239.10.3.4/16").has_host_bits());
        assert!(!p("239.10.0.0/16").has_host_bits());
    }

    #[test]
    fn contains_carries_and_key_lengths() {
        let r = p("239.10.0.0/16");
        assert!(r.contains("239.10.3.4".parse().unwrap()));
        assert!(!r.contains("239.11.0.1".parse().unwrap()));
        assert!(!r.contains("ff18::1".parse().unwrap()));
        assert_eq!(
            p("239.20.0.0/16").carry("239.10.3.4".parse().unwrap()),
            "239.20.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            p("ff18:0:0:0:20::/80").carry("ff18::10:3:4".parse().unwrap()),
            "ff18::20:10:3:4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(r.key_len(), 112);
        assert_eq!(p("ff18::/16").key_len(), 16);
        assert_eq!(key_mask(0), [0; 16]);
        assert_eq!(key_mask(128), [0xff; 16]);
        assert_eq!(key_mask(12)[..2], [0xff, 0xf0]);
        assert!(p("239.0.0.0/8").covers(&r));
        assert!(!r.covers(&p("239.0.0.0/8")));
        assert!(p("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
    }

    proptest! {
        #[test]
        fn carry_keeps_the_prefix_and_the_host_bits(a in any::<u32>(), b in any::<u32>(), len in 0u8..=32) {
            let to = Prefix { addr: IpAddr::V4(a.into()), len };
            let out = to.carry(IpAddr::V4(b.into()));
            prop_assert!(to.contains(out));
            prop_assert_eq!(mask(out, 32), out);
            let host = !mask_bits_u32(len);
            let IpAddr::V4(o) = out else { unreachable!() };
            prop_assert_eq!(u32::from(o) & host, b & host);
        }

        #[test]
        fn display_parses_back(a in any::<u128>(), len in 0u8..=128, v4 in any::<bool>()) {
            let pre = if v4 {
                Prefix { addr: IpAddr::V4((a as u32).into()), len: len % 33 }
            } else {
                Prefix { addr: IpAddr::V6(a.into()), len }
            };
            prop_assert_eq!(pre.to_string().parse::<Prefix>(), Ok(pre));
        }
    }
}
