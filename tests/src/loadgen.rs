//! The traffic generator's logic, without sockets: the payload format, the receiver's
//! accounting (loss, duplicates, reordering, latency), and pacing.
//!
//! A payload starts with a 24-byte header: magic, flow id, sequence number and the sender's
//! CLOCK_MONOTONIC time in nanoseconds. Network namespaces share that clock, so a receiver on
//! the same machine computes one-way latency by subtracting.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

pub const MAGIC: u32 = 0x524c_4731; // "RLG1"
pub const HEADER: usize = 24;

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes the header for packet `seq` of `flow` into `buf` (at least [`HEADER`] bytes).
pub fn stamp(buf: &mut [u8], flow: u32, seq: u64, sent_ns: u64) {
    buf[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    buf[4..8].copy_from_slice(&flow.to_be_bytes());
    buf[8..16].copy_from_slice(&seq.to_be_bytes());
    buf[16..24].copy_from_slice(&sent_ns.to_be_bytes());
}

/// Where the payload starts in a frame from [`udp4_frame`].
pub const UDP4_PAYLOAD_AT: usize = 14 + 20 + 8;

/// A whole Ethernet frame carrying an IPv4 UDP datagram of `payload_len` zero bytes to
/// `group`, for a sender that writes frames itself (AF_XDP). The UDP checksum is zero ("none",
/// valid over IPv4), so stamping the payload needs no checksum update; the IPv4 header
/// checksum is computed.
pub fn udp4_frame(
    src_mac: [u8; 6],
    source: std::net::Ipv4Addr,
    group: std::net::Ipv4Addr,
    dst_port: u16,
    ttl: u8,
    payload_len: usize,
) -> Vec<u8> {
    let g = group.octets();
    let group_mac = [0x01, 0x00, 0x5e, g[1] & 0x7f, g[2], g[3]];
    udp4_frame_to(
        group_mac,
        src_mac,
        source,
        group,
        dst_port,
        ttl,
        payload_len,
    )
}

/// As [`udp4_frame`], to any IPv4 `destination` behind `dst_mac`: a unicast datagram needs
/// the next hop's MAC, which no address maps to the way a group's does.
pub fn udp4_frame_to(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    source: std::net::Ipv4Addr,
    destination: std::net::Ipv4Addr,
    dst_port: u16,
    ttl: u8,
    payload_len: usize,
) -> Vec<u8> {
    let g = destination.octets();
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload_len) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = ttl;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&g);
    let mut sum: u32 = ip
        .as_chunks::<2>()
        .0
        .iter()
        .map(|w| u32::from(u16::from_be_bytes(*w)))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(UDP4_PAYLOAD_AT + payload_len, 0);
    f
}

/// Reads a header: (flow, seq, sent_ns), or `None` for anything that is not one.
pub fn parse(buf: &[u8]) -> Option<(u32, u64, u64)> {
    if buf.len() < HEADER || buf[0..4] != MAGIC.to_be_bytes() {
        return None;
    }
    Some((
        u32::from_be_bytes(buf[4..8].try_into().ok()?),
        u64::from_be_bytes(buf[8..16].try_into().ok()?),
        u64::from_be_bytes(buf[16..24].try_into().ok()?),
    ))
}

/// What a receiver saw of one flow.
pub struct RecvStats {
    seen: Vec<u64>,
    pub received: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub foreign: u64,
    max_seq: Option<u64>,
    latency: Histogram<u64>,
}

impl Default for RecvStats {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvStats {
    pub fn new() -> Self {
        RecvStats {
            seen: Vec::new(),
            received: 0,
            unique: 0,
            duplicates: 0,
            reordered: 0,
            foreign: 0,
            max_seq: None,
            // 1 ns to 100 s at 3 significant digits.
            latency: Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds"),
        }
    }

    /// Accounts one datagram that arrived at `now_ns`.
    pub fn record(&mut self, payload: &[u8], now_ns: u64) {
        let Some((_, seq, sent)) = parse(payload) else {
            self.foreign += 1;
            return;
        };
        self.received += 1;
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.seen.len() {
            // Bounded: a sender numbers from 0, and a count of 2^32 is beyond any run.
            if word > (1 << 26) {
                self.foreign += 1;
                return;
            }
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= 1 << bit;
        self.unique += 1;
        match self.max_seq {
            Some(m) if seq < m => self.reordered += 1,
            _ => self.max_seq = Some(seq),
        }
        let _ = self.latency.record(now_ns.saturating_sub(sent).max(1));
    }

    pub fn summary(&self, sent: Option<u64>) -> RecvSummary {
        let q = |p: f64| {
            if self.latency.is_empty() {
                0
            } else {
                self.latency.value_at_quantile(p)
            }
        };
        RecvSummary {
            received: self.received,
            unique: self.unique,
            duplicates: self.duplicates,
            reordered: self.reordered,
            foreign: self.foreign,
            lost: sent.map(|s| s.saturating_sub(self.unique)),
            p50_ns: q(0.50),
            p95_ns: q(0.95),
            p99_ns: q(0.99),
            p999_ns: q(0.999),
            max_ns: self.latency.max(),
        }
    }
}

/// A receiver's result, as the `recv` subcommand prints it (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecvSummary {
    pub received: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub foreign: u64,
    pub lost: Option<u64>,
    pub p50_ns: u64,
    pub p95_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

/// A sender's result, as the `send` subcommand prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendSummary {
    pub sent: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub pps: f64,
}

/// When the `n`th packet (from 0) is due, at `rate` packets per second from the start.
pub fn due(n: u64, rate: u64) -> Duration {
    Duration::from_nanos((u128::from(n) * 1_000_000_000 / u128::from(rate.max(1))) as u64)
}

#[cfg(test)]
mod tests {

    #[test]
    fn udp4_frames_are_valid_multicast_udp() {
        let f = udp4_frame(
            [2, 0, 0, 0, 0, 1],
            [198, 18, 1, 1].into(),
            [239, 1, 2, 3].into(),
            5000,
            8,
            64,
        );
        let flow = relay::wire::classify(&f).expect("multicast UDP");
        assert_eq!((flow.port, flow.l4), (5000, 34));
        assert_eq!(flow.group, std::net::IpAddr::from([239, 1, 2, 3]));
        assert_eq!(relay::checksum::checksum(&f[14..34]), 0, "header checksum");
        assert_eq!(relay::wire::check_lengths(&f, &flow), Ok(()));
        assert_eq!(f.len(), UDP4_PAYLOAD_AT + 64);
        assert_eq!(f[..6], [0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]);
    }

    #[test]
    fn unicast_frames_differ_from_group_frames_only_in_the_addressing() {
        let (src_mac, next_hop) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let source = [198, 18, 1, 1].into();
        let group = udp4_frame(src_mac, source, [239, 1, 2, 3].into(), 7100, 8, 64);
        let f = udp4_frame_to(
            next_hop,
            src_mac,
            source,
            [198, 18, 1, 2].into(),
            7100,
            8,
            64,
        );
        assert_eq!(f[..6], next_hop);
        assert_eq!(f[30..34], [198, 18, 1, 2]);
        assert_eq!(relay::checksum::checksum(&f[14..34]), 0, "header checksum");
        let differ: Vec<usize> = (0..f.len()).filter(|&i| f[i] != group[i]).collect();
        // The destination MAC, the IPv4 checksum and the destination address.
        assert!(
            differ
                .iter()
                .all(|&i| i < 6 || (24..26).contains(&i) || (30..34).contains(&i)),
            "{differ:?}"
        );
    }

    use super::*;

    fn pkt(seq: u64, sent: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        stamp(&mut b, 7, seq, sent);
        b
    }

    #[test]
    fn header_round_trips_and_rejects_strangers() {
        let b = pkt(42, 1234);
        assert_eq!(parse(&b), Some((7, 42, 1234)));
        assert_eq!(parse(&b[..23]), None);
        assert_eq!(parse(&[0u8; 64]), None);
    }

    #[test]
    fn counts_loss_duplicates_and_reordering() {
        let mut s = RecvStats::new();
        for (seq, at) in [(0, 100), (1, 200), (3, 300), (2, 400), (3, 500), (5, 600)] {
            s.record(&pkt(seq, at - 50), at);
        }
        s.record(b"not ours", 700);
        let r = s.summary(Some(7));
        assert_eq!(
            (
                r.received,
                r.unique,
                r.duplicates,
                r.reordered,
                r.foreign,
                r.lost
            ),
            (6, 5, 1, 1, 1, Some(2))
        );
        assert_eq!(r.p50_ns, 50);
        assert_eq!(r.max_ns, 50);
    }

    #[test]
    fn latency_percentiles() {
        let mut s = RecvStats::new();
        for seq in 0..1000u64 {
            s.record(&pkt(seq, 0), (seq + 1) * 1000);
        }
        let r = s.summary(Some(1000));
        assert_eq!(r.lost, Some(0));
        // HdrHistogram at 3 significant digits: within 0.1%.
        for (got, want) in [
            (r.p50_ns, 500_000),
            (r.p99_ns, 990_000),
            (r.p999_ns, 999_000),
        ] {
            assert!(got.abs_diff(want) <= want / 1000 + 1, "{got} vs {want}");
        }
    }

    #[test]
    fn pacing_schedule() {
        assert_eq!(due(0, 1000), Duration::ZERO);
        assert_eq!(due(1, 1000), Duration::from_millis(1));
        assert_eq!(due(1_000_000, 1_000_000), Duration::from_secs(1));
    }
}
