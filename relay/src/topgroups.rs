//! Per-group counters of a range rule, in bounded memory.
//!
//! A rule for `239.10.0.0/16` may see 65,536 groups; counting each would let one rule grow the
//! relay's memory and its stats without limit. So each worker keeps, per range rule, at most
//! [`TopGroups::CAPACITY`] groups with the space-saving algorithm (Metwally, Agrawal and El
//! Abbadi, 2005): a group seen while the table is full replaces the least counted one and
//! inherits its count as its possible overcount (`error`). Every group with more than
//! 1/CAPACITY of the rule's packets is in the table, and no count is ever below the group's
//! true one, nor above it by more than its `error`. With no more groups than the capacity,
//! every count is exact.

use std::net::IpAddr;

use rustc_hash::FxHashMap;

/// What a group's frames came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupCount {
    pub packets: u64,
    pub bytes: u64,
    /// How far `packets` may exceed the true count: what the group inherited when it took
    /// the place of another (0 when exact).
    pub error: u64,
}

/// The most active groups of one rule.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TopGroups {
    slots: Vec<(IpAddr, GroupCount)>,
    index: FxHashMap<IpAddr, u32>,
    /// Slots that had the least count, `min`, when the table was last scanned: the next to
    /// give up their place (each checked again when its turn comes). Scanning once for all
    /// of them keeps a group that is not in the table at O(1) per frame, amortised, however
    /// many groups take turns: a /16 of busy groups costs no scan per frame.
    at_min: Vec<u32>,
    min: u64,
}

impl TopGroups {
    /// Groups kept per rule and worker.
    pub const CAPACITY: usize = 64;

    /// Counts one frame of `bytes` to `group`.
    pub fn record(&mut self, group: IpAddr, bytes: u64) {
        if let Some(&i) = self.index.get(&group) {
            let c = &mut self.slots[i as usize].1;
            c.packets += 1;
            c.bytes += bytes;
            return;
        }
        if self.slots.len() < Self::CAPACITY {
            self.index.insert(group, self.slots.len() as u32);
            self.slots.push((
                group,
                GroupCount {
                    packets: 1,
                    bytes,
                    error: 0,
                },
            ));
            return;
        }
        let i = self.least();
        let (old, c) = self.slots[i as usize];
        self.index.remove(&old);
        self.index.insert(group, i);
        self.slots[i as usize] = (
            group,
            GroupCount {
                packets: c.packets + 1,
                bytes,
                error: c.packets,
            },
        );
    }

    /// A slot with the least count of a full table.
    fn least(&mut self) -> u32 {
        loop {
            while let Some(i) = self.at_min.pop() {
                if self.slots[i as usize].1.packets == self.min {
                    return i;
                }
            }
            self.min = self.slots.iter().map(|s| s.1.packets).min().unwrap_or(0);
            let min = self.min;
            // Refilled in place: this runs on the per-frame path, which allocates nothing
            // once the table has filled.
            let slots = &self.slots;
            self.at_min.clear();
            self.at_min.extend(
                (0..slots.len() as u32)
                    .rev()
                    .filter(|&i| slots[i as usize].1.packets == min),
            );
        }
    }

    /// Adds another worker's table to this one, keeping the `CAPACITY` largest. A group
    /// missing from a full table may have had up to that table's least count there, so it
    /// is added (as possible overcount): counts stay at or above the truth.
    pub fn merge(&mut self, other: &TopGroups) {
        let floor = |t: &TopGroups| {
            if t.slots.len() >= Self::CAPACITY {
                t.slots.iter().map(|s| s.1.packets).min().unwrap_or(0)
            } else {
                0
            }
        };
        let (mine, theirs) = (floor(self), floor(other));
        let unseen = |n| GroupCount {
            packets: n,
            bytes: 0,
            error: n,
        };
        let mut merged: Vec<(IpAddr, GroupCount)> = Vec::new();
        for (g, c) in &self.slots {
            let d = other
                .index
                .get(g)
                .map_or(unseen(theirs), |&i| other.slots[i as usize].1);
            merged.push((*g, add(c, &d)));
        }
        for (g, d) in &other.slots {
            if !self.index.contains_key(g) {
                merged.push((*g, add(&unseen(mine), d)));
            }
        }
        merged.sort_unstable_by(|a, b| b.1.packets.cmp(&a.1.packets).then(a.0.cmp(&b.0)));
        merged.truncate(Self::CAPACITY);
        self.index = merged
            .iter()
            .enumerate()
            .map(|(i, (g, _))| (*g, i as u32))
            .collect();
        self.slots = merged;
        self.at_min.clear();
    }

    /// The `n` groups with the most packets, most first (ties by address).
    pub fn top(&self, n: usize) -> Vec<(IpAddr, GroupCount)> {
        let mut all = self.slots.clone();
        all.sort_unstable_by(|a, b| b.1.packets.cmp(&a.1.packets).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

fn add(a: &GroupCount, b: &GroupCount) -> GroupCount {
    GroupCount {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        error: a.error + b.error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn g(i: u16) -> IpAddr {
        IpAddr::from([239, 10, (i >> 8) as u8, i as u8])
    }

    #[test]
    fn exact_while_the_groups_fit() {
        let mut t = TopGroups::default();
        for i in 0..40u16 {
            for _ in 0..=i {
                t.record(g(i), 100);
            }
        }
        let top = t.top(3);
        assert_eq!(
            top[0],
            (
                g(39),
                GroupCount {
                    packets: 40,
                    bytes: 4000,
                    error: 0
                }
            )
        );
        assert_eq!(top[2].0, g(37));
        assert_eq!(t.len(), 40);
    }

    proptest! {
        /// Bounded memory; no count below the truth, none above it by more than its error;
        /// every group with more than 1/CAPACITY of the packets kept; and the same after
        /// merging two workers' tables.
        #[test]
        fn space_saving_bounds(
            a in proptest::collection::vec(0u16..300, 0..2000),
            b in proptest::collection::vec(prop_oneof![0u16..4, 0u16..300], 0..2000),
        ) {
            let mut truth: HashMap<IpAddr, u64> = HashMap::new();
            let (mut ta, mut tb) = (TopGroups::default(), TopGroups::default());
            for &i in &a {
                ta.record(g(i), 1);
                *truth.entry(g(i)).or_default() += 1;
            }
            for &i in &b {
                tb.record(g(i), 1);
                *truth.entry(g(i)).or_default() += 1;
            }
            prop_assert!(ta.len() <= TopGroups::CAPACITY && tb.len() <= TopGroups::CAPACITY);
            let mut m = ta.clone();
            m.merge(&tb);
            prop_assert!(m.len() <= TopGroups::CAPACITY);
            let total = (a.len() + b.len()) as u64;
            for (grp, c) in m.top(TopGroups::CAPACITY) {
                let t = truth[&grp];
                prop_assert!(c.packets >= t, "{grp}: {} < {t}", c.packets);
                prop_assert!(c.packets - c.error <= t, "{grp}: {c:?} vs {t}");
            }
            for (grp, &t) in &truth {
                if t * TopGroups::CAPACITY as u64 > 2 * total {
                    prop_assert!(m.top(TopGroups::CAPACITY).iter().any(|(x, _)| x == grp), "{grp} ({t} of {total}) dropped");
                }
            }
        }
    }
}
