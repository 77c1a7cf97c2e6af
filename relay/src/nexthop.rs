//! Placeholder until the resolver lands (replaced by the nexthop branch).

use std::sync::atomic::{AtomicU64, Ordering};

const RESOLVED: u64 = 1 << 63;

#[derive(Debug, Default)]
pub struct NextHopSlot(AtomicU64);

impl NextHopSlot {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn mac(&self) -> Option<[u8; 6]> {
        let v = self.0.load(Ordering::Acquire);
        if v & RESOLVED == 0 {
            return None;
        }
        let b = v.to_be_bytes();
        Some([b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    pub fn set(&self, mac: Option<[u8; 6]>) {
        let v = mac.map_or(0, |m| {
            RESOLVED | u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]])
        });
        self.0.store(v, Ordering::Release);
    }
}
