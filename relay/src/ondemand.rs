//! What the data path reads to know whether an on-demand output has listeners.
//!
//! One [`ListenSlot`] per (egress interface, group, source) that some `on_demand: true`
//! output sends to, shared by every output with that key. The querier thread
//! ([`crate::querier`]) writes it when the IGMP/MLD state of that group changes on that
//! interface; the workers read it once per frame per output, with no lock: a relaxed load of
//! one atomic, as a change only needs to be seen within a frame or two.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// What an on-demand output listens for: the group it sends to on its interface (after any
/// remapping), and the source its frames carry there (a rewritten `source:`, or the rule's
/// exact input source) when listeners may select sources; `None` forwards whatever source
/// while any listener wants the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenKey {
    pub ifindex: u32,
    pub group: IpAddr,
    pub source: Option<IpAddr>,
}

/// Whether an on-demand output forwards, and since when.
#[derive(Debug, Default)]
pub struct ListenSlot {
    on: AtomicBool,
    /// Milliseconds since the Unix epoch of the last change, 0 for never.
    changed: AtomicU64,
    /// Groups with listeners on the output's interface (of the output's family), for
    /// `relay stats`.
    groups: AtomicU32,
}

impl ListenSlot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Someone behind the output listens: the data path sends to it.
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Sets the state; a change is stamped with the wall clock, for `relay stats`.
    pub fn set(&self, on: bool) {
        if self.on.swap(on, Ordering::Relaxed) != on {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            self.changed.store(ms, Ordering::Relaxed);
        }
    }

    /// Groups with listeners on the interface, as the querier last counted them.
    pub fn groups(&self) -> u32 {
        self.groups.load(Ordering::Relaxed)
    }

    pub fn set_groups(&self, n: u32) {
        self.groups.store(n, Ordering::Relaxed);
    }

    /// When the state last changed, in milliseconds since the Unix epoch; `None` if never.
    pub fn changed_ms(&self) -> Option<u64> {
        match self.changed.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_off_until_set_and_stamps_changes_only() {
        let s = ListenSlot::new();
        assert!(!s.on());
        assert_eq!(s.changed_ms(), None);
        s.set(false);
        assert_eq!(s.changed_ms(), None, "no change, no stamp");
        s.set(true);
        assert!(s.on());
        let first = s.changed_ms().expect("stamped");
        s.set(true);
        assert_eq!(s.changed_ms(), Some(first));
        s.set(false);
        assert!(!s.on());
        assert!(s.changed_ms().unwrap() >= first);
    }
}
