//! What the data path reads to know whether an on-demand output has listeners.
//!
//! One [`ListenSlot`] per (egress interface, group, source) that some `on_demand: true`
//! output sends to, shared by every output with that key. The querier thread
//! ([`crate::querier`]) writes it when the IGMP/MLD state of that group changes on that
//! interface; the workers read it once per frame per output, with no lock and no allocation.
//!
//! The slot holds the group's filter (RFC 3376 §6.3): nobody, every source, or the sources
//! included or excluded. While it is "nobody" or "every source" (an output whose frames carry
//! a known source is always one of these) the read is one relaxed load of one byte, as it
//! was when the slot was a flag: a change only needs to be seen within a frame or two. A
//! source list is read under a seqlock over two buffers: the querier writes the one the
//! readers are not directed to and then flips the index, so a reader retries only if two
//! updates land inside its read, and never waits on a writer stopped mid-write. An immutable
//! snapshot swapped by pointer would need reclamation (hazard pointers or epochs) on the
//! frame path; a per-(S,G) slot would need the querier to learn every source the data path
//! sees.

use std::{
    net::IpAddr,
    sync::{
        OnceLock,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering, fence},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use crate::listeners::router::MAX_SOURCES;

/// What an on-demand output listens for: the group it sends to on its interface (after any
/// remapping), and the source its frames carry there (a rewritten `source:`, or the rule's
/// exact input source) when that is known; `None` decides by each frame's own source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenKey {
    pub ifindex: u32,
    pub group: IpAddr,
    pub source: Option<IpAddr>,
}

/// Which sources of a group the hosts behind an output want, as the querier writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter<'a> {
    /// Nobody listens.
    Off,
    /// Every source (EXCLUDE({}), or an output whose one source is wanted).
    Any,
    /// Only these (INCLUDE mode with their timers running). Not empty.
    Include(&'a [IpAddr]),
    /// All but these (EXCLUDE mode, the exclude list). Not empty.
    Exclude(&'a [IpAddr]),
}

const OFF: u8 = 0;
const ANY: u8 = 1;
/// The decision needs the source list: [`Lists`].
const LISTED: u8 = 2;

/// In a buffer's header: the mode of its list.
const INCLUDE: u64 = 1 << 32;
const EXCLUDE: u64 = 2 << 32;

/// One source list: its header (mode in the high word, length in the low one) and the sources
/// sorted, each as 128 bits (IPv4 mapped into IPv6) in two words, under the buffer's seqlock
/// (odd while written).
struct Buffer {
    seq: AtomicU64,
    header: AtomicU64,
    sources: Box<[[AtomicU64; 2]]>,
}

impl Buffer {
    fn new() -> Self {
        Buffer {
            seq: AtomicU64::new(0),
            header: AtomicU64::new(0),
            sources: (0..MAX_SOURCES)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
        }
    }

    fn entry(&self, i: usize) -> u128 {
        let [hi, lo] = &self.sources[i];
        (u128::from(hi.load(Ordering::Relaxed)) << 64) | u128::from(lo.load(Ordering::Relaxed))
    }

    /// Whether `source` passes the list, or `None` if a writer changed the buffer meanwhile.
    fn passes(&self, source: u128) -> Option<bool> {
        let before = self.seq.load(Ordering::Acquire);
        if before & 1 == 1 {
            return None;
        }
        let header = self.header.load(Ordering::Relaxed);
        let len = ((header & 0xffff_ffff) as usize).min(self.sources.len());
        // A binary search: bounded steps even over a list torn by a writer (then discarded).
        let (mut lo, mut hi) = (0, len);
        let mut found = false;
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.entry(mid).cmp(&source) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    found = true;
                    break;
                }
            }
        }
        // The loads above happen before the check that no writer came in between.
        fence(Ordering::Acquire);
        if self.seq.load(Ordering::Relaxed) != before {
            return None;
        }
        match header & !0xffff_ffff {
            INCLUDE => Some(found),
            EXCLUDE => Some(!found),
            _ => Some(false),
        }
    }

    /// Only the querier writes, under its lock: one writer at a time.
    fn write(&self, mode: u64, sorted: &[u128]) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        // Readers that see any of the writes below see the odd sequence number too.
        fence(Ordering::Release);
        let len = sorted.len().min(self.sources.len());
        for (slot, s) in self.sources.iter().zip(&sorted[..len]) {
            slot[0].store((s >> 64) as u64, Ordering::Relaxed);
            slot[1].store(*s as u64, Ordering::Relaxed);
        }
        self.header.store(mode | len as u64, Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    fn holds(&self, mode: u64, sorted: &[u128]) -> bool {
        let header = self.header.load(Ordering::Relaxed);
        header == mode | sorted.len() as u64
            && sorted.iter().enumerate().all(|(i, s)| self.entry(i) == *s)
    }
}

/// The two buffers of a slot's source list, and which one readers go to.
struct Lists {
    current: AtomicU8,
    buffers: [Buffer; 2],
}

/// Sources compare as 128-bit numbers, IPv4 mapped into IPv6 (a slot holds one family).
fn key(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Whether an on-demand output forwards, and since when.
#[derive(Default)]
pub struct ListenSlot {
    /// [`OFF`], [`ANY`] or [`LISTED`]: all most frames need.
    state: AtomicU8,
    /// Made the first time the slot holds a source list (an output whose source is known never
    /// needs one).
    lists: OnceLock<Box<Lists>>,
    /// Milliseconds since the Unix epoch of the last change of [`ListenSlot::on`], 0 for
    /// never.
    changed: AtomicU64,
    /// Groups with listeners on the output's interface (of the output's family), for
    /// `relay stats`.
    groups: AtomicU32,
}

impl std::fmt::Debug for ListenSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenSlot")
            .field("state", &self.state)
            .field("changed", &self.changed)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

impl ListenSlot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Someone behind the output listens, to some source at least: `relay stats` shows the
    /// output as forwarding.
    pub fn on(&self) -> bool {
        self.state.load(Ordering::Relaxed) != OFF
    }

    /// Whether the data path sends a frame from `source` to the output. Lock-free: a
    /// relaxed load, and for a source list a seqlocked binary search of at most
    /// [`MAX_SOURCES`], retried at most a few times; a list that kept changing under the
    /// reader holds the frame back (a membership change is under way).
    pub fn wants(&self, source: IpAddr) -> bool {
        match self.state.load(Ordering::Relaxed) {
            OFF => false,
            ANY => true,
            _ => {
                let Some(lists) = self.lists.get() else {
                    return false;
                };
                let source = key(source);
                for _ in 0..4 {
                    let b = &lists.buffers[usize::from(lists.current.load(Ordering::Acquire) & 1)];
                    if let Some(pass) = b.passes(source) {
                        return pass;
                    }
                }
                false
            }
        }
    }

    /// Sets the state to on (every source) or off; a change is stamped with the wall clock,
    /// for `relay stats`.
    pub fn set(&self, on: bool) {
        self.set_filter(if on { Filter::Any } else { Filter::Off });
    }

    /// Sets the filter the data path reads. Only the querier calls this, under its lock.
    pub fn set_filter(&self, filter: Filter) {
        let was_on = self.on();
        let state = match filter {
            Filter::Off => OFF,
            Filter::Any => ANY,
            Filter::Include(s) | Filter::Exclude(s) => {
                let mode = if matches!(filter, Filter::Include(_)) {
                    INCLUDE
                } else {
                    EXCLUDE
                };
                let mut sorted: Vec<u128> = s.iter().copied().map(key).collect();
                sorted.sort_unstable();
                sorted.dedup();
                sorted.truncate(MAX_SOURCES);
                let lists = self.lists.get_or_init(|| {
                    Box::new(Lists {
                        current: AtomicU8::new(0),
                        buffers: [Buffer::new(), Buffer::new()],
                    })
                });
                let current = usize::from(lists.current.load(Ordering::Relaxed) & 1);
                let listed = self.state.load(Ordering::Relaxed) == LISTED;
                if !(listed && lists.buffers[current].holds(mode, &sorted)) {
                    let next = current ^ 1;
                    lists.buffers[next].write(mode, &sorted);
                    lists.current.store(next as u8, Ordering::Release);
                }
                LISTED
            }
        };
        self.state.store(state, Ordering::Release);
        if was_on != (state != OFF) {
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
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Sources from a small space, so lists and probes meet often; both families.
    fn source(v6: bool, n: u8) -> IpAddr {
        if v6 {
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, u16::from(n >> 4), u16::from(n)).into()
        } else {
            Ipv4Addr::new(198, 18, n >> 4, n).into()
        }
    }

    proptest! {
        /// Whatever sequence of filters is written, the slot answers for every source as the
        /// last one says (INCLUDE: listed; EXCLUDE: not listed), and `on` is "not off".
        #[test]
        fn a_slot_answers_as_the_last_filter_written(
            v6 in any::<bool>(),
            writes in proptest::collection::vec(
                (0u8..4, proptest::collection::vec(0u8..64, 1..40)), 1..8),
        ) {
            let slot = ListenSlot::new();
            for (mode, list) in &writes {
                let list: Vec<IpAddr> = list.iter().map(|n| source(v6, *n)).collect();
                let filter = match mode {
                    0 => Filter::Off,
                    1 => Filter::Any,
                    2 => Filter::Include(&list),
                    _ => Filter::Exclude(&list),
                };
                slot.set_filter(filter);
                prop_assert_eq!(slot.on(), *mode != 0);
                for n in 0..64 {
                    let s = source(v6, n);
                    let want = match mode {
                        0 => false,
                        1 => true,
                        2 => list.contains(&s),
                        _ => !list.contains(&s),
                    };
                    prop_assert_eq!(slot.wants(s), want, "{:?} {}", filter, s);
                }
            }
        }
    }

    #[test]
    fn a_longest_list_is_searched_whole() {
        let list: Vec<IpAddr> = (0..MAX_SOURCES as u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i * 3)))
            .collect();
        let slot = ListenSlot::new();
        slot.set_filter(Filter::Include(&list));
        assert!(list.iter().all(|s| slot.wants(*s)));
        assert!(!slot.wants(IpAddr::V4(Ipv4Addr::from(0xc612_0001))));
    }

    /// Readers racing a writer only ever see a list that was written whole: a source in
    /// every exclude list written is never let through, however the reads interleave.
    #[test]
    fn readers_never_see_a_torn_list() {
        let slot = std::sync::Arc::new(ListenSlot::new());
        let blocked = source(false, 200);
        // Two lists with the blocked source at different places, so a list half written
        // over the other is unsorted around it.
        let a: Vec<IpAddr> = (0..100)
            .map(|n| source(false, n))
            .chain([blocked])
            .collect();
        let b: Vec<IpAddr> = [blocked]
            .into_iter()
            .chain((220..=255).map(|n| source(false, n)))
            .collect();
        slot.set_filter(Filter::Exclude(&a));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (slot, stop) = (slot.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut through = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        through += u64::from(slot.wants(blocked));
                    }
                    through
                })
            })
            .collect();
        for i in 0..20_000 {
            slot.set_filter(Filter::Exclude(if i % 2 == 0 { &b } else { &a }));
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert_eq!(r.join().unwrap(), 0, "the blocked source got through");
        }
    }

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
