//! Loads the XDP program with aya, fills its maps from the rule table and attaches it to every
//! ingress interface through a bpf_link, so that a relay that dies for any reason leaves
//! nothing attached.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::Arc,
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray, XskMap},
    programs::{ProgramFd, Xdp, XdpMode, xdp::XdpLinkId},
};
use log::{info, warn};
use relay_common::{
    COUNTER_MAP, ExactKey, FRAG_MAP, FragKey, HINTED_PROGRAM, HINTED_RANGES_PROGRAM,
    MAX_QUEUES_PER_IFACE, PROGRAM, RANGE_RULE_MAP, RANGES_PROGRAM, RANGES_PROGRAM_MAP, RULE_MAP,
    RuleKey, RuleValue, SHAPE_MAP, SHAPE_RANGES, SHAPE_TUPLES_HALF, SHAPE_TUPLES_SHIFT, TUPLE_MAP,
    TUPLE_SLOTS, Tuple, VLAN_HINT_MAP, XSK_MAP, XdpCounter,
};

use crate::{
    config::XdpModeConfig,
    rules::{RuleTable, merge_tuples},
};

static XDP_OBJECT: &[u8] = include_bytes_aligned!(env!("RELAY_XDP_OBJ"));
/// The front program for devices whose driver gives the VLAN tag it stripped as XDP RX
/// metadata (relay-ebpf/src/vlan_hint.bpf.c). libbpf loads it: it must be bound to its device
/// at load, which aya cannot ask for.
static VLAN_HINT_OBJECT: &[u8] = include_bytes_aligned!(env!("RELAY_VLAN_HINT_OBJ"));
/// `BPF_F_XDP_DEV_BOUND_ONLY`: bound to one device, which the metadata kfuncs need.
const XDP_DEV_BOUND_ONLY: u32 = 1 << 6;

/// The loaded program and its attachments.
pub struct Steering {
    ebpf: Ebpf,
    xsks: XskMap<MapData>,
    counters: Arc<XdpCounters>,
    links: Vec<(String, u32, Attachment)>,
    /// Ingress ifindex of each XSKMAP slot, in the order they were given out; 0 for a slot
    /// freed when its device went away, to be given out again.
    slots: Vec<u32>,
    /// The (ifindex, queue) XSKMAP entries that hold a socket.
    entries: std::collections::HashSet<(u32, u32)>,
    /// The `SHAPES` value the program reads now: which half of `TUPLES` is in use is in it.
    shapes: u32,
}

/// The XDP program's per-CPU counters, readable from any thread.
pub struct XdpCounters {
    map: PerCpuArray<MapData, u64>,
}

impl XdpCounters {
    /// The counters summed over CPUs, in [`XdpCounter`] order.
    pub fn read(&self) -> Result<[u64; XdpCounter::COUNT as usize]> {
        let mut out = [0u64; XdpCounter::COUNT as usize];
        for c in XdpCounter::ALL {
            out[c as usize] = self.map.get(&(c as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}

/// How the program is attached to an interface.
enum Attachment {
    /// The relay's program itself.
    Shared(XdpLinkId),
    /// The VLAN-hint front bound to the device, which tail-calls the relay's program.
    Front(VlanFront),
}

/// A front program loaded for one device and attached to it; dropping it detaches it.
struct VlanFront {
    link: libbpf_rs::Link,
    _object: libbpf_rs::Object,
}

impl VlanFront {
    /// Loads the front bound to `ifindex`, with the relay's `hints` map as its own, points it
    /// at `hinted` and attaches it in native mode (a device-bound program has no other).
    fn attach(ifindex: u32, hinted: BorrowedFd<'_>, hints: BorrowedFd<'_>) -> Result<Self> {
        use libbpf_rs::{MapCore, MapFlags};
        let mut open = libbpf_rs::ObjectBuilder::default()
            .open_memory(VLAN_HINT_OBJECT)
            .context("opening the VLAN-hint front program")?;
        for mut prog in open.progs_mut() {
            prog.set_ifindex(ifindex);
            prog.set_flags(XDP_DEV_BOUND_ONLY);
        }
        for mut map in open.maps_mut() {
            if map.name() == VLAN_HINT_MAP {
                map.reuse_fd(hints)
                    .context("giving the VLAN-hint front the relay's hint map")?;
            }
        }
        let object = open
            .load()
            .context("loading the VLAN-hint front program bound to its device")?;
        let next = object
            .maps()
            .find(|m| m.name() == "NEXT")
            .ok_or_else(|| anyhow!("the VLAN-hint front has no NEXT map"))?;
        let fd = u32::try_from(hinted.as_raw_fd()).context("the relay program's descriptor")?;
        next.update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .context("putting the relay's program behind the VLAN-hint front")?;
        let prog = object
            .progs_mut()
            .next()
            .ok_or_else(|| anyhow!("the VLAN-hint front object has no program"))?;
        let ifindex = i32::try_from(ifindex).context("ifindex")?;
        let link = prog
            .attach_xdp(ifindex)
            .context("attaching the VLAN-hint front")?;
        Ok(Self {
            link,
            _object: object,
        })
    }
}

/// Which XDP mode an interface got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    /// Native, behind the front that reads the VLAN tag the NIC stripped.
    NativeVlanHint,
    Skb,
}

impl AttachedMode {
    pub fn describe(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::NativeVlanHint => {
                "native (VLAN tags the driver strips read from XDP metadata)"
            }
            AttachedMode::Skb => "skb (generic)",
        }
    }
}

impl Steering {
    /// Loads the program for UMEM frames of `frame_size` bytes and fills the rule map.
    /// Nothing is attached yet.
    pub fn load(table: &RuleTable, frame_size: u32) -> Result<Self> {
        raise_memlock();
        let max_frame_len = frame_size - relay_common::XDP_PACKET_HEADROOM;
        let mut ebpf = EbpfLoader::new()
            .override_global(relay_common::MAX_FRAME_LEN_GLOBAL, &max_frame_len, true)
            .load(XDP_OBJECT)
            .context(
                "loading the XDP object (creating its maps needs CAP_BPF, and the XSKMAP \
             CAP_NET_ADMIN: run as root, or see docs/OPERATIONS.md for the capabilities)",
            )?;
        let xsks = XskMap::try_from(
            ebpf.take_map(XSK_MAP)
                .ok_or_else(|| anyhow!("no {XSK_MAP} map"))?,
        )?;
        let counters = Arc::new(XdpCounters {
            map: PerCpuArray::try_from(
                ebpf.take_map(COUNTER_MAP)
                    .ok_or_else(|| anyhow!("no {COUNTER_MAP} map"))?,
            )?,
        });
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("no {PROGRAM} program in the object"))?
            .try_into()?;
        prog.load().context(
            "the kernel refused the XDP program (loading it needs CAP_BPF and CAP_PERFMON)",
        )?;
        // The program for rule sets with ranges, which the attached one tail-calls: in its
        // slot before any rule is written. The map stays in `ebpf`: a program array's slots
        // empty when the last descriptor of it closes.
        load_into_slot(&mut ebpf, RANGES_PROGRAM, 0)?;
        let mut steering = Self {
            ebpf,
            xsks,
            counters,
            links: Vec::new(),
            slots: Vec::new(),
            entries: std::collections::HashSet::new(),
            shapes: 0,
        };
        steering.update_rules(&RuleTable::default(), table)?;
        Ok(steering)
    }

    fn hash_map<K: aya::Pod>(&mut self, name: &str) -> Result<HashMap<&mut MapData, K, RuleValue>> {
        Ok(HashMap::try_from(
            self.ebpf
                .map_mut(name)
                .ok_or_else(|| anyhow!("no {name} map"))?,
        )?)
    }

    /// Writes `entries` into the exact map (their first 40 bytes) and the range map.
    fn write_rules(&mut self, entries: &[(RuleKey, RuleValue)]) -> Result<()> {
        // Each value carries its ingress's XSKMAP slot, given out here if the interface has
        // none yet (its sockets get the same one).
        let entries = entries
            .iter()
            .map(|&(key, value)| {
                Ok((
                    key,
                    RuleValue {
                        slot: self.slot(key.ifindex)?,
                        ..value
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let entries = &entries[..];
        let mut exact = self.hash_map::<ExactKey>(RULE_MAP)?;
        for (key, value) in entries.iter().filter(|(k, _)| k.is_exact()) {
            exact
                .insert(key.exact(), value, 0)
                .context("writing the rule map")?;
        }
        let mut ranges = self.hash_map::<RuleKey>(RANGE_RULE_MAP)?;
        for (key, value) in entries.iter().filter(|(k, _)| !k.is_exact()) {
            ranges
                .insert(key, value, 0)
                .context("writing the range rule map")?;
        }
        Ok(())
    }

    /// Deletes `keys` from the map each belongs in.
    fn remove_rules(&mut self, keys: &[RuleKey]) -> Result<()> {
        let mut exact = self.hash_map::<ExactKey>(RULE_MAP)?;
        for key in keys.iter().filter(|k| k.is_exact()) {
            exact
                .remove(key.exact())
                .context("deleting from the rule map")?;
        }
        let mut ranges = self.hash_map::<RuleKey>(RANGE_RULE_MAP)?;
        for key in keys.iter().filter(|k| !k.is_exact()) {
            ranges
                .remove(key)
                .context("deleting from the range rule map")?;
        }
        Ok(())
    }

    /// Moves the rule maps from `old` to `new` without a moment where a rule both have is
    /// missing: the program first looks up both tables' shapes (with ranges: the union of
    /// their tuples), then every entry of `new` is written (a key that exists is replaced in
    /// place), then the keys only `old` has are deleted, and last the program is told
    /// `new`'s shapes and tuples alone.
    pub fn update_rules(&mut self, old: &RuleTable, new: &RuleTable) -> Result<()> {
        // While both tables' keys may be in the map, the program looks up both tables'
        // shapes, and walks both tables' tuples in one precedence order.
        let both = merge_tuples(old.tuples(), new.tuples());
        self.set_shapes(old.shapes() | new.shapes(), &both)?;
        let entries: Vec<(RuleKey, RuleValue)> = new.bpf_entries().collect();
        self.write_rules(&entries)?;
        let keep: std::collections::HashSet<RuleKey> = entries.iter().map(|(k, _)| *k).collect();
        let gone: Vec<RuleKey> = old
            .bpf_entries()
            .map(|(k, _)| k)
            .filter(|k| !keep.contains(k))
            .collect();
        self.remove_rules(&gone)?;
        self.set_shapes(new.shapes(), new.tuples())
    }

    /// Points the program at `shapes`. With [`SHAPE_RANGES`], `tuples` go into the half of
    /// `TUPLES` the program is not reading, and the one u32 of `SHAPES` then switches the
    /// program to them, with their count: it never sees a tuple half written, nor a count
    /// of one list with the entries of another.
    fn set_shapes(&mut self, shapes: u32, tuples: &[Tuple]) -> Result<()> {
        let mut shapes = shapes;
        if shapes & SHAPE_RANGES != 0 {
            if tuples.len() > TUPLE_SLOTS as usize {
                // Validation allows half as many per table, so a reload's union fits.
                return Err(anyhow!(
                    "{} rule tuples: the {TUPLE_MAP} map holds {TUPLE_SLOTS}",
                    tuples.len()
                ));
            }
            let half = if self.shapes & SHAPE_TUPLES_HALF != 0 {
                0
            } else {
                SHAPE_TUPLES_HALF
            };
            let base = if half != 0 { TUPLE_SLOTS } else { 0 };
            let mut map: Array<_, Tuple> = Array::try_from(
                self.ebpf
                    .map_mut(TUPLE_MAP)
                    .ok_or_else(|| anyhow!("no {TUPLE_MAP} map"))?,
            )?;
            for (i, t) in tuples.iter().enumerate() {
                map.set(base + i as u32, t, 0)
                    .context("writing the rule tuples")?;
            }
            shapes |= half | (tuples.len() as u32) << SHAPE_TUPLES_SHIFT;
        }
        let mut map: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut(SHAPE_MAP)
                .ok_or_else(|| anyhow!("no {SHAPE_MAP} map"))?,
        )?;
        map.set(0, &shapes, 0).context("writing the rule shapes")?;
        self.shapes = shapes;
        Ok(())
    }

    /// The XSKMAP slot of an ingress interface: given out once and kept, so a reload never
    /// moves an interface's sockets.
    fn slot(&mut self, ifindex: u32) -> Result<u32> {
        if let Some(i) = self.slots.iter().position(|&x| x == ifindex) {
            return Ok(i as u32);
        }
        // Slots of devices that are gone are free again: their keys can no longer match.
        if !self.slots.contains(&0)
            && self.slots.len() as u32 >= relay_common::MAX_INGRESS_IFACES
            && let Some(gone) = self
                .slots
                .iter()
                .position(|&x| !crate::sys::ifindex_exists(x))
        {
            let old = self.slots[gone];
            self.release_iface(old)?;
        }
        let slot = match self.slots.iter().position(|&x| x == 0) {
            Some(free) => {
                self.slots[free] = ifindex;
                free as u32
            }
            None if (self.slots.len() as u32) < relay_common::MAX_INGRESS_IFACES => {
                self.slots.push(ifindex);
                self.slots.len() as u32 - 1
            }
            None => {
                return Err(anyhow!(
                    "more than {} ingress interfaces",
                    relay_common::MAX_INGRESS_IFACES
                ));
            }
        };
        Ok(slot)
    }

    /// Puts an AF_XDP socket where the program redirects frames from `ifindex`'s `queue`.
    /// Returns whether that entry was empty (so an undo knows what to clear).
    pub fn set_socket(&mut self, ifindex: u32, queue: u32, fd: &impl AsRawFd) -> Result<bool> {
        if queue >= MAX_QUEUES_PER_IFACE {
            return Err(anyhow!(
                "rx queue {queue} is beyond the {MAX_QUEUES_PER_IFACE} queues per interface the relay steers"
            ));
        }
        let index = self.slot(ifindex)? * MAX_QUEUES_PER_IFACE + queue;
        self.xsks
            .set(index, fd.as_raw_fd(), 0)
            .context("adding the AF_XDP socket to the XSKMAP")?;
        Ok(self.entries.insert((ifindex, queue)))
    }

    /// Undoes a [`Steering::set_socket`] that filled an empty entry. The interface keeps its
    /// slot: rule keys written for it carry the slot, and a slot is only given to another
    /// interface once this one is gone ([`Steering::release_iface`]).
    pub fn unset_socket(&mut self, ifindex: u32, queue: u32) -> Result<()> {
        let Some(slot) = self.slots.iter().position(|&x| x == ifindex) else {
            return Ok(());
        };
        self.xsks
            .unset(slot as u32 * MAX_QUEUES_PER_IFACE + queue)
            .context("removing an AF_XDP socket from the XSKMAP")?;
        self.entries.remove(&(ifindex, queue));
        Ok(())
    }

    /// Forgets a device that went away: its sockets leave the XSKMAP and its slot is free for
    /// the next ingress, so interfaces can be re-created any number of times. The rule keys
    /// of the old device may still name the slot, but they can match no frame: their ifindex
    /// is gone for good.
    pub fn release_iface(&mut self, ifindex: u32) -> Result<()> {
        let Some(slot) = self.slots.iter().position(|&x| x == ifindex) else {
            return Ok(());
        };
        for q in 0..MAX_QUEUES_PER_IFACE {
            let _ = self.xsks.unset(slot as u32 * MAX_QUEUES_PER_IFACE + q);
        }
        self.entries.retain(|&(i, _)| i != ifindex);
        self.slots[slot] = 0;
        Ok(())
    }

    /// The interfaces the program is attached to.
    pub fn attached(&self) -> Vec<String> {
        self.links.iter().map(|(i, _, _)| i.clone()).collect()
    }

    /// Detaches from one interface: its frames pass to the kernel from here on.
    pub fn detach_iface(&mut self, iface: &str) -> Result<()> {
        let Some(at) = self.links.iter().position(|(i, _, _)| i == iface) else {
            return Ok(());
        };
        let (_, ifindex, attachment) = self.links.remove(at);
        match attachment {
            Attachment::Shared(id) => {
                let prog: &mut Xdp = self
                    .ebpf
                    .program_mut(PROGRAM)
                    .ok_or_else(|| anyhow!("no {PROGRAM} program"))?
                    .try_into()?;
                prog.detach(id)
                    .with_context(|| format!("detaching XDP from {iface}"))?;
            }
            Attachment::Front(front) => front
                .link
                .detach()
                .with_context(|| format!("detaching XDP from {iface}"))?,
        }
        info!(
            "{}: XDP program detached",
            crate::sys::device_label(iface, ifindex)
        );
        Ok(())
    }

    /// Attaches to `iface` (`ifindex`) in the configured mode; `auto` tries native first.
    /// Where native is allowed and the driver gives the VLAN tags it strips as XDP metadata,
    /// the front that reads them goes first: a tag is then read wherever the NIC put it.
    pub fn attach(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: XdpModeConfig,
    ) -> Result<AttachedMode> {
        let vlan_hint = crate::link_kind::xdp_features(ifindex).is_some_and(|f| f.vlan_hint());
        if vlan_hint && mode != XdpModeConfig::Skb {
            let hinted = self.hinted()?;
            let hints = match self.ebpf.map(VLAN_HINT_MAP) {
                Some(aya::maps::Map::PerCpuArray(m)) => m.fd().as_fd(),
                _ => return Err(anyhow!("no {VLAN_HINT_MAP} map")),
            };
            match VlanFront::attach(ifindex, hinted.as_fd(), hints) {
                Ok(front) => {
                    self.links
                        .push((iface.to_owned(), ifindex, Attachment::Front(front)));
                    return Ok(AttachedMode::NativeVlanHint);
                }
                Err(e) => warn!(
                    "{iface}: the front that reads stripped VLAN tags did not attach ({e:#}); \
                     VLAN-tagged frames whose tag the driver takes off will look untagged"
                ),
            }
        }
        let name = std::ffi::CString::new(iface)?;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("no {PROGRAM} program"))?
            .try_into()?;
        let attempt = |prog: &mut Xdp, m: XdpMode| prog.attach(name.as_c_str(), m);
        let (id, got) = match mode {
            XdpModeConfig::Native => (
                attempt(prog, XdpMode::Driver).with_context(|| {
                    format!("attaching XDP to {iface} in native mode (needs CAP_NET_ADMIN and driver support)")
                })?,
                AttachedMode::Native,
            ),
            XdpModeConfig::Skb => (
                attempt(prog, XdpMode::Skb).with_context(|| {
                    format!("attaching XDP to {iface} in skb mode (needs CAP_NET_ADMIN)")
                })?,
                AttachedMode::Skb,
            ),
            XdpModeConfig::Auto => match attempt(prog, XdpMode::Driver) {
                Ok(id) => (id, AttachedMode::Native),
                Err(e) => {
                    warn!("{iface}: native XDP unavailable ({e}); falling back to skb mode");
                    (
                        attempt(prog, XdpMode::Skb).with_context(|| {
                            format!("attaching XDP to {iface} (needs CAP_NET_ADMIN)")
                        })?,
                        AttachedMode::Skb,
                    )
                }
            },
        };
        self.links
            .push((iface.to_owned(), ifindex, Attachment::Shared(id)));
        Ok(got)
    }

    /// Detaches from every interface; frames pass to the kernel from here on.
    pub fn detach(&mut self) {
        for (iface, ifindex, attachment) in std::mem::take(&mut self.links) {
            let done = match attachment {
                Attachment::Shared(id) => self
                    .ebpf
                    .program_mut(PROGRAM)
                    .ok_or_else(|| anyhow!("no {PROGRAM} program"))
                    .and_then(|p| Ok(<&mut Xdp>::try_from(p)?))
                    .and_then(|p| Ok(p.detach(id)?)),
                Attachment::Front(front) => front.link.detach().map_err(Into::into),
            };
            match done {
                Ok(()) => info!(
                    "{}: XDP program detached",
                    crate::sys::device_label(&iface, ifindex)
                ),
                Err(e) => warn!("{iface}: detaching XDP failed: {e}"),
            }
        }
    }

    /// Runs the loaded program on `frame` as if it arrived on `ifindex`'s rx queue 0
    /// (BPF_PROG_TEST_RUN), `repeat` times; returns the XDP action and the kernel's mean
    /// time per run in nanoseconds. The frame is not sent anywhere: the kernel only reports
    /// what the program decided, and the program's counters move as they would. Used by the
    /// tests that check the program against the rule model, and to measure its cost.
    pub fn test_run(&self, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(u32, u32)> {
        test_run(self.program_fd()?.as_fd(), frame, ifindex, repeat)
    }

    /// Runs `relay_hinted` on `frame` as [`Steering::test_run`] runs the program, as if the
    /// VLAN-hint front had found the tag `tci` in the NIC's metadata (`None`: no tag there);
    /// returns the XDP action and the frame as the program left it.
    pub fn test_run_hinted(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        tci: Option<u16>,
    ) -> Result<(u32, Vec<u8>)> {
        let hint = relay_common::VlanHint {
            present: u16::from(tci.is_some()),
            proto: 0x8100u16.to_be(),
            tci: tci.unwrap_or(0),
            pad: 0,
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut hints: PerCpuArray<&mut MapData, relay_common::VlanHint> = PerCpuArray::try_from(
            self.ebpf
                .map_mut(VLAN_HINT_MAP)
                .ok_or_else(|| anyhow!("no {VLAN_HINT_MAP} map"))?,
        )?;
        hints.set(
            0,
            aya::maps::PerCpuValues::try_from(vec![hint; cpus.get() as usize])?,
            0,
        )?;
        let prog = self.hinted()?;
        let mut out = vec![0u8; frame.len() + 64];
        let (action, _, len) = test_run_into(prog.as_fd(), frame, ifindex, 1, &mut out)?;
        out.truncate(len);
        Ok((action, out))
    }

    /// A handle that runs the program as [`Steering::test_run`] does, from another thread:
    /// a test can keep frames going through the program while this one reloads the rules.
    pub fn test_runner(&self) -> Result<TestRunner> {
        Ok(TestRunner(self.program_fd()?.try_clone()?))
    }

    /// `relay_hinted`, loaded (with its ranges program in slot 1) the first time a device
    /// needs it: a relay without such devices pays nothing for it, at the start or per frame.
    fn hinted(&mut self) -> Result<ProgramFd> {
        let loaded = |ebpf: &Ebpf| -> Result<Option<ProgramFd>> {
            let prog: &Xdp = ebpf
                .program(HINTED_PROGRAM)
                .ok_or_else(|| anyhow!("no {HINTED_PROGRAM} program"))?
                .try_into()?;
            Ok(prog.fd().ok().map(|fd| fd.try_clone()).transpose()?)
        };
        if let Some(fd) = loaded(&self.ebpf)? {
            return Ok(fd);
        }
        load_into_slot(&mut self.ebpf, HINTED_RANGES_PROGRAM, 1)?;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(HINTED_PROGRAM)
            .ok_or_else(|| anyhow!("no {HINTED_PROGRAM} program"))?
            .try_into()?;
        prog.load()
            .context("the kernel refused the XDP program behind the VLAN-hint front")?;
        loaded(&self.ebpf)?.ok_or_else(|| anyhow!("{HINTED_PROGRAM} did not load"))
    }

    fn program_fd(&self) -> Result<&ProgramFd> {
        let prog: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .ok_or_else(|| anyhow!("no {PROGRAM} program"))?
            .try_into()?;
        Ok(prog.fd()?)
    }

    /// The rule the program stored in `FRAGS` for a fragmented datagram: the one its first
    /// fragment matched. The counters say only that some rule matched; this says which, so
    /// the tests can hold the program's choice among overlapping rules against the model's.
    pub fn fragment_rule(&self, key: &FragKey) -> Result<Option<u32>> {
        let map = self
            .ebpf
            .map(FRAG_MAP)
            .ok_or_else(|| anyhow!("no {FRAG_MAP} map"))?;
        let frags: HashMap<&MapData, FragKey, RuleValue> = HashMap::try_from(map)?;
        match frags.get(key, 0) {
            Ok(v) => Ok(Some(v.rule_id)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading the fragment map"),
        }
    }

    /// Kernel memory charged to the rule maps (exact and range), from their fdinfo
    /// (`memlock`).
    pub fn rule_map_memory(&self) -> Result<u64> {
        let mut total = 0;
        for name in [RULE_MAP, RANGE_RULE_MAP] {
            let map = self
                .ebpf
                .map(name)
                .ok_or_else(|| anyhow!("no {name} map"))?;
            let aya::maps::Map::HashMap(data) = map else {
                return Err(anyhow!("{name} is not a hash map"));
            };
            let fd = data.fd().as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
            total += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| anyhow!("no memlock in {name}'s fdinfo"))?;
        }
        Ok(total)
    }

    /// A handle on the program's counters.
    pub fn counters(&self) -> Arc<XdpCounters> {
        self.counters.clone()
    }
}

/// Runs a loaded program from any thread (see [`Steering::test_runner`]).
pub struct TestRunner(ProgramFd);

impl TestRunner {
    /// As [`Steering::test_run`].
    pub fn test_run(&self, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(u32, u32)> {
        test_run(self.0.as_fd(), frame, ifindex, repeat)
    }
}

/// Runs the program `prog` on `frame` as if it arrived on `ifindex`'s rx queue 0
/// (BPF_PROG_TEST_RUN), `repeat` times; returns the XDP action and the kernel's mean time
/// per run in nanoseconds.
/// Loads program `name` and puts it in slot `slot` of the ranges program array.
fn load_into_slot(ebpf: &mut Ebpf, name: &str, slot: u32) -> Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("no {name} program in the object"))?
        .try_into()?;
    prog.load()
        .with_context(|| format!("the kernel refused the XDP program {name}"))?;
    let fd = prog.fd()?.try_clone()?;
    let mut array: ProgramArray<_> = ProgramArray::try_from(
        ebpf.map_mut(RANGES_PROGRAM_MAP)
            .ok_or_else(|| anyhow!("no {RANGES_PROGRAM_MAP} map"))?,
    )?;
    array
        .set(slot, &fd, 0)
        .with_context(|| format!("putting {name} in its slot"))
}

fn test_run(prog: BorrowedFd<'_>, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(u32, u32)> {
    let (action, duration, _) = test_run_into(prog, frame, ifindex, repeat, &mut [])?;
    Ok((action, duration))
}

/// [`test_run`], with the frame as the program left it copied into `out` (when not empty):
/// returns the action, the mean time per run in nanoseconds and the frame's length.
fn test_run_into(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
    out: &mut [u8],
) -> Result<(u32, u32, usize)> {
    let fd = prog.as_raw_fd();
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. Only the ifindex and queue may be set on input.
    let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut opts = libbpf_sys::bpf_test_run_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _,
        data_in: frame.as_ptr().cast(),
        data_size_in: frame.len() as u32,
        ctx_in: ctx.as_ptr().cast(),
        ctx_size_in: std::mem::size_of_val(&ctx) as u32,
        repeat: repeat as i32,
        ..Default::default()
    };
    if !out.is_empty() {
        opts.data_out = out.as_mut_ptr().cast();
        opts.data_size_out = out.len() as u32;
    }
    // SAFETY: `opts` is libbpf's own options struct with its size set; the frame and ctx
    // buffers it points to outlive the call, and the kernel writes at most `data_size_out`
    // bytes into `out`, which is that long (no ctx_out given). `fd` is a program fd the
    // caller borrows for the call.
    let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(fd, &mut opts) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(-rc)).context("BPF_PROG_TEST_RUN");
    }
    Ok((opts.retval, opts.duration, opts.data_size_out as usize))
}

impl Drop for Steering {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones ignore it.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised struct and has no other effect on memory.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        // Only matters before 5.11, and a container may forbid it; a map that then fails to
        // load says so itself.
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
