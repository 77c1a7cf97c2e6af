//! The AF_XDP data path: one UMEM shared by every socket, a socket per ingress rx queue and per
//! egress interface, and the worker threads that receive, rewrite in place and transmit.
//!
//! Frame ownership: a frame is in exactly one of these places at any time — the pool (or a
//! worker's cache in front of it), the kernel's fill/RX rings of an ingress socket
//! (`in_fill`), the TX/completion rings of an egress socket (`in_tx`), a lane between two
//! workers, or in the hands of a worker between two of these steps. The last is empty
//! whenever the workers have stopped, so at shutdown `pool + in_fill + in_tx == frames` must
//! hold, and the relay says so.

pub(crate) mod backend;
pub mod budget;
pub mod loopback;
pub mod memory;
mod ringlog;
mod socket;
pub mod stats;
mod tags;
mod worker;
mod xsk;

use std::{
    num::NonZeroU32,
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex, atomic::Ordering},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use log::{info, warn};
use xsk_rs::{
    Umem,
    config::{FrameSize, QueueSize, UmemConfig},
};

use backend::Backend;
pub use stats::{
    DatapathStats, LegCounters, MergeCounters, OutputCounters, RuleCounters, SocketCounters,
};
use worker::{
    DRAIN, Domain, MAX_DOMAINS, MAX_PORTS, NO_DOMAIN, Plan, Port, Shared, Worker, WorkerReport,
};
use xsk::Xsk;

use crate::{
    config::BindMode,
    pool::{AllocatorKind, PoolStats, new_pool},
    rules::RuleTable,
};

/// TX and completion ring sizes, and the least RX and fill rings are made with (those grow
/// with the UMEM: `Budget::ingress_ring`).
const RING_SIZE: u32 = 2048;
/// Frames handled per RX ring operation.
const BATCH: usize = 64;
/// How long an idle worker sleeps in poll() before it checks for a stop request.
const IDLE_POLL_MS: i32 = 100;
/// How long shutdown waits for transmitted frames to complete.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);
/// Frames one lane between two workers holds.
const LANE_FRAMES: usize = 4096;

/// How the frame accounting came out at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameAccount {
    pub frames: usize,
    pub in_pool: usize,
    pub in_fill: usize,
    pub in_tx: usize,
    /// Lost with a device that went away while the kernel held them (see `Worker::retire`).
    pub abandoned: usize,
}

impl FrameAccount {
    /// Frames that are in none of the places a frame can be.
    pub fn leaked(&self) -> isize {
        self.frames as isize - (self.in_pool + self.in_fill + self.in_tx + self.abandoned) as isize
    }
}

fn describe_source(e: &dyn std::error::Error) -> String {
    e.source().map_or_else(String::new, |s| s.to_string())
}

/// An ingress socket the XDP program must redirect to: (ifindex, rx queue, socket fd).
pub type XskBinding = (u32, u32, RawFd);

/// A socket the data path has opened, as the main thread remembers it.
struct PortMeta {
    name: String,
    ifindex: u32,
    queue: u32,
    owner: usize,
    ingress: bool,
    /// Its device is gone and its worker has closed it.
    retired: bool,
    /// The UMEM it shares.
    domain: usize,
}

/// Which sockets share a UMEM: one per bind mode, and one per `umem.separate` interface.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Copy,
    Zerocopy,
    Own(String),
}

/// A UMEM as the main thread keeps track of it.
struct DomainMeta {
    kind: Kind,
    /// The descriptor libxdp names in every shared bind (its first socket's), once it has one.
    umem_fd: Option<RawFd>,
    /// The socket that descriptor refers to now (see [`Datapath::reanchor`]).
    anchor: Option<usize>,
    /// Every socket on it went away: nothing can share it any more, and new sockets of its
    /// kind get a new UMEM.
    orphaned: bool,
}

/// Sockets opened for a table the data path is not running yet.
pub struct Prepared {
    opened: Vec<(usize, usize, Port<Xsk>)>,
    pub bindings: Vec<XskBinding>,
    /// How many sockets the data path knew before.
    known: usize,
}

/// An AF_XDP socket the data path closed because its device went away: the XDP program's
/// maps must forget it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    pub name: String,
    pub ifindex: u32,
    pub queue: u32,
    pub ingress: bool,
}

/// How a data path is made: the config's `umem:`, `bind:`, `workers:`, `cpus:` and `poll:`,
/// and the allocator chosen at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub frames: u32,
    pub frame_size: u32,
    pub bind: BindMode,
    pub allocator: AllocatorKind,
    /// Interfaces whose sockets get a UMEM of their own.
    pub separate: Vec<String>,
    pub workers: usize,
    /// CPUs to pin the workers to (worker i on `cpus[i % len]`).
    pub cpus: Option<Vec<usize>>,
    pub poll: crate::config::PollMode,
}

/// The data path before and while it runs.
pub struct Datapath {
    shared: Arc<Shared<Xsk>>,
    pending: Vec<Vec<(usize, Port<Xsk>)>>,
    running: Vec<JoinHandle<WorkerReport<Xsk>>>,
    ports: Vec<PortMeta>,
    /// What it was made with; a rebuild makes its successor with the same.
    settings: Settings,
    /// How the UMEM's frames are shared out.
    budget: budget::Budget,
    /// The rx ring fd of each socket, by global id, for XSKMAP bindings.
    fds: Vec<RawFd>,
    /// The UMEMs made so far, by their slot in `Shared::domains`.
    domains: Vec<DomainMeta>,
    /// Drivers a zero-copy bind failed on: not tried again.
    no_zerocopy: std::collections::HashSet<String>,
    /// What monitors read: this data path's shared state, or its successor's after a rebuild.
    current: Arc<Mutex<Arc<Shared<Xsk>>>>,
}

/// Reads the data path's counters from any thread: each worker's last publication (at most
/// 100 ms old), re-shaped to the current rules and summed, and the pool's state.
/// It follows the data path through a rebuild (see [`Datapath::rebuild`]).
#[derive(Clone)]
pub struct Monitor {
    current: Arc<Mutex<Arc<Shared<Xsk>>>>,
}

impl Monitor {
    fn shared(&self) -> Arc<Shared<Xsk>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current rule table and the counters shaped by it.
    pub fn stats(&self) -> (RuleTable, DatapathStats) {
        let shared = self.shared();
        let plan = shared.current_plan();
        let mut sum = DatapathStats::new(plan.table.rules.iter().map(|r| r.outputs.len()));
        for s in &shared.snapshots {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            sum.add(&worker::remap(&s.0, &s.1, &plan));
        }
        sum.add(&shared.inherited(&plan));
        (plan.table.clone(), sum)
    }

    /// The rules in force.
    pub fn table(&self) -> RuleTable {
        self.shared().current_plan().table.clone()
    }

    /// What `relay capture` starts captures on.
    pub fn tap(&self) -> Arc<crate::capture::Tap> {
        self.shared().tap.clone()
    }

    /// The pools of every UMEM, added up.
    pub fn pool(&self) -> PoolStats {
        self.shared().pool_stats()
    }

    pub fn allocator(&self) -> crate::pool::AllocatorKind {
        self.shared().allocator
    }

    /// The kernel's counters of every open socket, as the workers last published them (at
    /// most 100 ms old), one line per (interface, queue).
    pub fn sockets(&self) -> Vec<SocketCounters> {
        let shared = self.shared();
        stats::merge_sockets(
            shared
                .sockets
                .iter()
                .flat_map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        )
    }
}

/// What the data path leaves when it has stopped.
pub struct Finished {
    /// The rules in force at the end, which `stats` is shaped by.
    pub table: RuleTable,
    pub stats: DatapathStats,
    pub account: FrameAccount,
    pub pool: PoolStats,
    /// The kernel's counters of the sockets open at the end, one per (interface, queue).
    pub sockets: Vec<SocketCounters>,
    /// Kept open until the report is printed, then dropped.
    _ports: Vec<Port<Xsk>>,
}

/// The sockets a table needs: one per ingress (interface, rx queue), and one per egress
/// interface that is not also an ingress. `(name, ifindex, queue, ingress)`.
pub(crate) fn wanted_sockets(table: &RuleTable) -> Vec<(String, u32, u32, bool)> {
    let mut wanted: Vec<(String, u32, u32, bool)> = Vec::new();
    // Interfaces that do not exist yet have no socket until they do.
    for ing in table.ingress.iter().filter(|i| i.info.exists()) {
        for q in 0..ing.info.rx_queues {
            wanted.push((ing.name.clone(), ing.info.ifindex, q, true));
        }
    }
    for eg in table.egress.iter().filter(|e| e.info.exists()) {
        if !wanted.iter().any(|(n, _, q, _)| *n == eg.name && *q == 0) {
            wanted.push((eg.name.clone(), eg.info.ifindex, 0, false));
        }
    }
    wanted
}

/// Refuses a UMEM too small for the sockets and workers that would share it.
fn check_budget(frames: usize, ingress_queues: usize, workers: usize) -> Result<()> {
    budget::check(frames, ingress_queues, workers).map_err(|e| anyhow!(e))
}

impl Datapath {
    /// Creates the UMEM and every socket, and assigns the sockets to worker threads. The XDP
    /// program is not involved yet: the caller puts the returned bindings into the XSKMAP,
    /// then calls [`Datapath::start`].
    pub fn new(table: RuleTable, settings: Settings) -> Result<(Self, Vec<XskBinding>)> {
        Self::with_tap(table, settings, Arc::default())
    }

    /// As [`Datapath::new`], with the capture tap of the data path this one replaces.
    fn with_tap(
        table: RuleTable,
        settings: Settings,
        tap: Arc<crate::capture::Tap>,
    ) -> Result<(Self, Vec<XskBinding>)> {
        let Settings {
            frames,
            frame_size,
            allocator,
            workers,
            poll,
            ..
        } = settings;
        let workers = workers.max(1);
        FrameSize::new(frame_size).map_err(|e| anyhow!("frame size: {e}"))?;
        NonZeroU32::new(frames).ok_or_else(|| anyhow!("zero frames"))?;
        let queues = wanted_sockets(&table).iter().filter(|w| w.3).count();
        check_budget(frames as usize, queues, workers)?;
        let budget = budget::Budget::new(frames as usize, workers);
        let shared = Arc::new(
            Shared::new(
                workers,
                frame_size as usize,
                allocator,
                &budget,
                poll == crate::config::PollMode::Busy,
                tap,
            )
            .context("setting up the data path")?,
        );
        let mut dp = Datapath {
            shared: shared.clone(),
            pending: (0..workers).map(|_| Vec::new()).collect(),
            running: Vec::new(),
            ports: Vec::new(),
            budget,
            fds: Vec::new(),
            domains: Vec::new(),
            no_zerocopy: std::collections::HashSet::new(),
            current: Arc::new(Mutex::new(shared.clone())),
            settings: Settings {
                workers,
                cpus: settings.cpus.filter(|c| !c.is_empty()),
                ..settings
            },
        };
        let (opened, bindings) = dp.open_sockets(&table)?;
        for (w, id, port) in opened {
            dp.pending[w].push((id, port));
        }
        dp.publish_plan(table, Vec::new());
        Ok((dp, bindings))
    }

    /// Opens a socket for every (interface, queue) the table needs that has none yet, and
    /// deals them to the workers round-robin (ingress first, so RX spreads before TX). All or
    /// nothing: if one fails, the ones this call opened are closed and forgotten, so the next
    /// attempt does not take them for open.
    #[allow(clippy::type_complexity)]
    fn open_sockets(
        &mut self,
        table: &RuleTable,
    ) -> Result<(Vec<(usize, usize, Port<Xsk>)>, Vec<XskBinding>)> {
        let known = self.ports.len();
        let result = self.try_open_sockets(table);
        if result.is_err() {
            self.ports.truncate(known);
            self.fds.truncate(known);
        }
        result
    }

    #[allow(clippy::type_complexity)]
    fn try_open_sockets(
        &mut self,
        table: &RuleTable,
    ) -> Result<(Vec<(usize, usize, Port<Xsk>)>, Vec<XskBinding>)> {
        let workers = self.shared.wakers.len();
        let mut opened = Vec::new();
        let mut bindings = Vec::new();
        for (name, ifindex, queue, ingress) in wanted_sockets(table) {
            if let Some(id) = self.ports.iter().position(|p| {
                !p.retired && p.name == name && p.queue == queue && p.ifindex == ifindex
            }) {
                // Already open (perhaps as an egress-only socket): an ingress now needs it in
                // the XSKMAP.
                if ingress && let Some(fd) = self.known_fd(id) {
                    bindings.push((ifindex, queue, fd));
                }
                continue;
            }
            let id = self.ports.len();
            if id >= MAX_PORTS {
                return Err(anyhow!("more than {MAX_PORTS} sockets"));
            }
            let (domain, b) = self.bind_socket(&name, queue)?;
            let w = id % workers;
            info!(
                "{name} queue {queue}: AF_XDP socket bound in {} mode ({}, worker {w}) on UMEM {domain}",
                if b.copy_mode { "copy" } else { "zero-copy" },
                if ingress { "ingress" } else { "egress" }
            );
            let fd = b.rx.fd().as_raw_fd();
            if ingress && !b.copy_mode && self.shared.busy_poll {
                prefer_busy_poll(fd, &name, queue);
            }
            if ingress {
                bindings.push((ifindex, queue, fd));
            }
            self.ports.push(PortMeta {
                name: name.clone(),
                ifindex,
                queue,
                owner: w,
                ingress,
                retired: false,
                domain,
            });
            self.fds.push(fd);
            let meta = &mut self.domains[domain];
            if meta.umem_fd.is_none() {
                // libxdp made the UMEM's first socket on the UMEM's own descriptor.
                meta.umem_fd = Some(fd);
                meta.anchor = Some(id);
            }
            // Its device's state from here on: kept by the link watcher, read by the worker.
            let link = crate::links::watch(ifindex, &name)?;
            let mtu = link.mtu();
            opened.push((
                w,
                id,
                Port {
                    domain,
                    name,
                    ifindex,
                    queue,
                    ingress,
                    copy_mode: b.copy_mode,
                    rings: xsk::XskRings {
                        tx: b.tx,
                        rx: b.rx,
                        fq: b.fq,
                        cq: b.cq,
                        fill_size: self.budget.ingress_ring as u32,
                    },
                    in_fill: 0,
                    in_tx: 0,
                    // Set from the plan the socket arrives with.
                    fill_target: 0,
                    down: false,
                    mtu,
                    link: Some(link),
                    fill_log: ringlog::RingLog::new(self.budget.ingress_ring),
                    tx_log: ringlog::RingLog::new(RING_SIZE as usize),
                    dead: false,
                    draining: true,
                    stalled: 0,
                    waiting: 0,
                },
            ));
        }
        Ok((opened, bindings))
    }

    /// Binds socket `id` for (`iface`, `queue`) on the UMEM its kind calls for, making the
    /// UMEM if it has none yet. With `bind: auto`, a physical interface tries the zero-copy
    /// UMEM first and the copy one if its driver refuses; a virtual one (veth, bridge, VLAN,
    /// tunnel) goes to the copy UMEM at once. Returns the UMEM's slot and the socket.
    fn bind_socket(&mut self, iface: &str, queue: u32) -> Result<(usize, socket::Bound)> {
        let kinds = if self.settings.separate.iter().any(|s| s == iface) {
            vec![Kind::Own(iface.to_owned())]
        } else {
            match self.settings.bind {
                BindMode::Copy => vec![Kind::Copy],
                BindMode::Zerocopy => vec![Kind::Zerocopy],
                BindMode::Auto => {
                    let known_copy_only =
                        socket::driver(iface).is_some_and(|d| self.no_zerocopy.contains(&d));
                    if socket::is_virtual(iface) || known_copy_only {
                        vec![Kind::Copy]
                    } else {
                        vec![Kind::Zerocopy, Kind::Copy]
                    }
                }
            }
        };
        let mut last_err = None;
        for kind in kinds {
            let d = match self
                .domains
                .iter()
                .position(|m| m.kind == kind && !m.orphaned)
            {
                Some(d) => d,
                None => self.make_domain(kind.clone())?,
            };
            let first = self.domains[d].umem_fd.is_none();
            let mode = match &kind {
                Kind::Copy => BindMode::Copy,
                Kind::Zerocopy => BindMode::Zerocopy,
                Kind::Own(_) => self.settings.bind,
            };
            let umem = &self.shared.domain(d).umem;
            let rx_ring = self.budget.ingress_ring as u32;
            match socket::open_socket(umem, iface, queue, mode, first, rx_ring) {
                Ok(b) => return Ok((d, b)),
                Err(e) if e.downcast_ref::<socket::NoZeroCopy>().is_some() => {
                    if let Some(driver) = socket::driver(iface) {
                        self.no_zerocopy.insert(driver);
                    }
                    if first
                        && !self
                            .domains
                            .iter()
                            .any(|m| m.kind == Kind::Copy && !m.orphaned)
                    {
                        // The UMEM just made has no socket yet: it serves as the copy one.
                        self.domains[d].kind = Kind::Copy;
                    }
                    info!(
                        "{iface} queue {queue}: no zero-copy AF_XDP ({e}); using a copy-mode UMEM"
                    );
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("{iface} queue {queue}: no UMEM to bind to")))
    }

    /// Makes a UMEM of `frames` frames, and its pool, for sockets of `kind`.
    fn make_domain(&mut self, kind: Kind) -> Result<usize> {
        let slot = self.domains.len();
        if slot >= MAX_DOMAINS {
            return Err(anyhow!(
                "the relay has made {MAX_DOMAINS} UMEMs (interfaces re-created many times over): \
                 restart it"
            ));
        }
        let frames = self.settings.frames;
        let frame_size = self.shared.frame_size as u32;
        let ingress_ring = self.budget.ingress_ring as u32;
        let umem_config = UmemConfig::builder()
            .frame_size(FrameSize::new(frame_size).map_err(|e| anyhow!("frame size: {e}"))?)
            .fill_queue_size(QueueSize::new(ingress_ring).map_err(|e| anyhow!("{e}"))?)
            .comp_queue_size(QueueSize::new(RING_SIZE).map_err(|e| anyhow!("{e}"))?)
            .build()
            .map_err(|e| anyhow!("UMEM config: {e}"))?;
        let count = NonZeroU32::new(frames).ok_or_else(|| anyhow!("zero frames"))?;
        let (umem, descs) = Umem::new(umem_config, count, false).map_err(|e| {
            let why = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .and_then(std::io::Error::raw_os_error);
            let hint = match why {
                Some(libc::ENOBUFS) | Some(libc::ENOMEM) => format!(
                    "the UMEM ({} MiB) is larger than RLIMIT_MEMLOCK allows: give the relay \
                     CAP_IPC_LOCK, raise the limit (LimitMEMLOCK=infinity), or lower umem.frames",
                    (frames as u64 * frame_size as u64) >> 20
                ),
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    "AF_XDP sockets need CAP_NET_RAW: run as root".to_owned()
                }
                _ => "is AF_XDP (CONFIG_XDP_SOCKETS) available?".to_owned(),
            };
            anyhow!("creating the UMEM: {e}: {}; {hint}", describe_source(&e))
        })?;
        let pool: Arc<dyn crate::pool::FramePool> =
            Arc::from(new_pool(self.settings.allocator, frames));
        let made = self.shared.domains[slot].set(Domain {
            umem,
            frames: descs,
            pool,
            stalled: Default::default(),
        });
        if made.is_err() {
            return Err(anyhow!("UMEM slot {slot} was already taken"));
        }
        info!(
            "UMEM {slot}: {frames} frames of {frame_size} bytes, RX and fill rings of {ingress_ring}, \
             for {kind:?} sockets"
        );
        self.domains.push(DomainMeta {
            kind,
            umem_fd: None,
            anchor: None,
            orphaned: false,
        });
        Ok(slot)
    }

    fn known_fd(&self, id: usize) -> Option<RawFd> {
        self.fds.get(id).copied()
    }

    /// Makes `table` the current plan (the workers take it up on their next pass), with the
    /// sockets in `retire` to be closed by their workers.
    fn publish_plan(&mut self, table: RuleTable, retire: Vec<usize>) -> u64 {
        let generation = self.shared.plan_gen.load(Ordering::Acquire) + 1;
        let plan = Arc::new(build_plan(
            &self.ports,
            &self.budget,
            self.domains.len(),
            table,
            retire,
            generation,
        ));
        *self.shared.plan.lock().unwrap_or_else(|p| p.into_inner()) = plan;
        self.shared.plan_gen.store(generation, Ordering::Release);
        generation
    }

    /// Wakes every worker and waits until each has taken up plan `generation`.
    fn wait_adopted(&self, generation: u64) -> Result<()> {
        for w in &self.shared.wakers {
            w.wake_now();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while self
            .shared
            .adopted
            .iter()
            .any(|a| a.load(Ordering::Acquire) < generation)
        {
            if std::time::Instant::now() > deadline {
                return Err(anyhow!("a worker did not take up the new plan within 2 s"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Closes the sockets whose device no longer exists (deleted, or deleted and created
    /// again: a socket is bound to an ifindex), taking their frames back, and gives the fill
    /// budget to the ingress queues that remain. Returns what was closed, for the XDP maps.
    pub fn retire_gone(&mut self) -> Result<Vec<Retired>> {
        let gone: Vec<usize> = (0..self.ports.len())
            .filter(|&id| {
                let p = &self.ports[id];
                !p.retired && !crate::sys::ifindex_exists(p.ifindex)
            })
            .collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        for &id in &gone {
            self.ports[id].retired = true;
        }
        let table = self.table();
        if self.running.is_empty() {
            // Not started: the sockets wait in `pending`; close them here.
            for list in &mut self.pending {
                list.retain(|(id, _)| !gone.contains(id));
            }
            self.publish_plan(table, Vec::new());
        } else {
            let generation = self.publish_plan(table, gone.clone());
            self.wait_adopted(generation)?;
        }
        // Frames a worker on an older plan handed over after the owner closed the socket are
        // taken back, and counted, by that worker when it takes the plan up
        // (`take_back_handed_to_retired`); any left here are frames no counter will show.
        for &id in &gone {
            if let Some(lane) = self.shared.lanes[id].get() {
                let pool = &self.shared.domain(self.ports[id].domain).pool;
                let mut left = 0;
                while let Some((desc, _)) = lane.pop() {
                    pool.give(self.shared.frame_of(desc.addr()));
                    left += 1;
                }
                if left > 0 {
                    warn!(
                        "{} queue {}: {left} frames handed to its closed socket were not counted",
                        self.ports[id].name, self.ports[id].queue
                    );
                }
            }
        }
        for d in 0..self.domains.len() {
            let anchor = self.domains[d].anchor;
            if anchor.is_some_and(|a| self.ports[a].retired) {
                self.reanchor(d)?;
            }
        }
        Ok(gone
            .iter()
            .map(|&id| {
                let p = &self.ports[id];
                Retired {
                    name: p.name.clone(),
                    ifindex: p.ifindex,
                    queue: p.queue,
                    ingress: p.ingress,
                }
            })
            .collect())
    }

    /// Points UMEM `d`'s descriptor at a live socket of it. The kernel lets a socket share a
    /// UMEM through any bound socket that uses it, but libxdp always names the first socket's
    /// descriptor, and a socket whose device is gone is unbound for good: binding through it
    /// fails with EBADF, so without this every new socket would fail once the first
    /// interface is re-created. dup2 makes that descriptor number refer to another socket of
    /// the same UMEM. With none left, the UMEM is orphaned: new sockets of its kind get a new
    /// one (and when every socket is gone, the caller starts over: `Datapath::rebuild`).
    fn reanchor(&mut self, d: usize) -> Result<()> {
        let Some(umem_fd) = self.domains[d].umem_fd else {
            return Ok(());
        };
        let Some(live) = self.ports.iter().position(|p| !p.retired && p.domain == d) else {
            info!("UMEM {d}: every socket on it is gone; new sockets of its kind get a new UMEM");
            self.domains[d].orphaned = true;
            self.domains[d].anchor = None;
            return Ok(());
        };
        // SAFETY: both descriptors are open: `umem_fd` is libxdp's, which it closes only when
        // the UMEM is deleted (at exit), and `fds[live]` belongs to a socket that stays open
        // until this thread retires it. dup2 replaces only the descriptor-table entry; the old
        // socket is released by its owner's close.
        let rc = unsafe { libc::dup2(self.fds[live], umem_fd) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error())
                .context("pointing the UMEM's descriptor at a live socket");
        }
        info!(
            "UMEM {d}: its first socket is gone; new sockets share it through {} queue {}",
            self.ports[live].name, self.ports[live].queue
        );
        self.domains[d].anchor = Some(live);
        Ok(())
    }

    /// The rules in force.
    pub fn table(&self) -> RuleTable {
        self.shared.current_plan().table.clone()
    }

    /// Calls `f` on the current rule table without copying it.
    pub fn with_table<R>(&self, f: impl FnOnce(&RuleTable) -> R) -> R {
        f(&self.shared.current_plan().table)
    }

    /// A handle other threads use to read live counters.
    pub fn monitor(&self) -> Monitor {
        Monitor {
            current: self.current.clone(),
        }
    }

    /// Whether every socket the data path had is closed: none is left to share the UMEM
    /// through (see [`Datapath::reanchor`]).
    pub fn is_orphaned(&self) -> bool {
        !self.ports.is_empty() && self.ports.iter().all(|p| p.retired)
    }

    /// Starts over on a new UMEM, for when every interface went away at once and no socket is
    /// left to share the old one through. Nothing is in flight then (every socket is closed
    /// and its frames taken back), so the old data path stops at once; the new one keeps the
    /// old one's counters and runs the same rules, idle until their interfaces are back and
    /// the caller applies them again, which opens sockets on the new UMEM.
    pub fn rebuild(&mut self) -> Result<FrameAccount> {
        let table = self.table();
        let (mut next, _) = Datapath::with_tap(
            RuleTable::default(),
            self.settings.clone(),
            self.shared.tap.clone(),
        )?;
        next.current = self.current.clone();
        let old = std::mem::replace(self, next);
        let finished = old.stop();
        let shape = Arc::new(Plan {
            // A generation no plan of the new data path has, so counters are re-shaped by name.
            generation: u64::MAX,
            table: finished.table.clone(),
            egress_port: Vec::new(),
            egress_owner: Vec::new(),
            egress_domain: Vec::new(),
            ingress_ports: Vec::new(),
            retire: Vec::new(),
            fill_targets: Vec::new(),
        });
        *self.shared.base.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((shape, finished.stats.clone()));
        self.publish_plan(table, Vec::new());
        self.start()?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = self.shared.clone();
        Ok(finished.account)
    }

    /// Starts the worker threads, each pinned to its CPU if `cpus:` names them; each fills
    /// its ingress rings first.
    pub fn start(&mut self) -> Result<()> {
        for (id, ports) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            let shared = self.shared.clone();
            let cpu = self.settings.cpus.as_ref().map(|c| c[id % c.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("relay-worker-{id}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        match crate::sys::pin_to_cpu(cpu) {
                            Ok(()) => info!("worker {id} pinned to CPU {cpu}"),
                            Err(e) => warn!("worker {id}: pinning to CPU {cpu} failed: {e}"),
                        }
                    }
                    Worker::new(id, shared, ports).run()
                })
                .context("spawning a worker")?;
            self.running.push(handle);
        }
        info!(
            "{} worker thread{}",
            self.running.len(),
            if self.running.len() == 1 { "" } else { "s" }
        );
        Ok(())
    }

    /// The first half of switching to `table`: checks the frame budget and opens sockets for
    /// the (interface, queue) pairs it needs and the relay does not have, all or nothing.
    /// Nothing the workers see changes yet. Returns the ingress sockets the XDP program must
    /// redirect to (new ones, and open ones that become an ingress); follow with
    /// [`Datapath::commit`] or [`Datapath::abort`].
    pub fn prepare(&mut self, table: &RuleTable) -> Result<Prepared> {
        let queues = wanted_sockets(table).iter().filter(|w| w.3).count();
        check_budget(
            self.settings.frames as usize,
            queues,
            self.shared.wakers.len(),
        )?;
        let known = self.ports.len();
        let (opened, bindings) = self.open_sockets(table)?;
        Ok(Prepared {
            opened,
            bindings,
            known,
        })
    }

    /// Closes what [`Datapath::prepare`] opened and forgets it: the sockets were never given
    /// to a worker, so nothing else refers to them once the caller has taken them out of the
    /// XSKMAP.
    pub fn abort(&mut self, prepared: Prepared) {
        drop(prepared.opened);
        self.ports.truncate(prepared.known);
        self.fds.truncate(prepared.known);
    }

    /// Hands the prepared sockets to their workers with `table`'s plan, and waits until every
    /// worker has taken it up. Sockets of interfaces no longer used stay open (the caller
    /// detaches XDP from them), so a rule that comes back later finds them ready. On a time-out
    /// the caller goes back with [`Datapath::switch_table`].
    pub fn commit(&mut self, prepared: Prepared, table: RuleTable) -> Result<()> {
        for (w, id, port) in prepared.opened {
            self.shared.incoming[w]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((id, port));
        }
        let generation = self.publish_plan(table, Vec::new());
        self.wait_adopted(generation)
    }

    /// Switches the workers to `table` over the sockets already open (a roll-back).
    pub fn switch_table(&mut self, table: RuleTable) -> Result<()> {
        let generation = self.publish_plan(table, Vec::new());
        self.wait_adopted(generation)
    }

    /// Tells the workers to drain (the caller has detached the XDP program), waits for them,
    /// and settles the books.
    pub fn stop(self) -> Finished {
        self.shared.phase.store(DRAIN, Ordering::Release);
        let reports: Vec<_> = self.running.into_iter().map(|h| h.join().ok()).collect();
        let domains: Vec<usize> = self.ports.iter().map(|p| p.domain).collect();
        let (plan, stats, account, ports) = settle(&self.shared, reports, &domains);
        let sockets = stats::merge_sockets(ports.iter().filter_map(|p| {
            p.rings
                .rx
                .fd()
                .xdp_statistics()
                .map(|s| SocketCounters::from_kernel(&p.name, p.queue, p.ingress, &s))
                .map_err(|e| warn!("{}: reading XDP statistics: {e}", p.name))
                .ok()
        }));
        Finished {
            table: plan.table.clone(),
            stats,
            account,
            pool: self.shared.pool_stats(),
            sockets,
            _ports: ports,
        }
    }
}

/// Settles the books once the workers have stopped (`reports`, `None` for one that panicked):
/// their counters summed and re-shaped to the current plan, the frames left in lanes given
/// back, and where every frame is. `port_domain` is the UMEM of each socket by global id.
#[allow(clippy::type_complexity)]
fn settle<B: Backend>(
    shared: &Shared<B>,
    reports: Vec<Option<WorkerReport<B>>>,
    port_domain: &[usize],
) -> (Arc<Plan>, DatapathStats, FrameAccount, Vec<Port<B>>) {
    let plan = shared.current_plan();
    let mut stats = DatapathStats::new(plan.table.rules.iter().map(|r| r.outputs.len()));
    let mut ports = Vec::new();
    for report in reports {
        match report {
            Some(report) => {
                stats.add(&worker::remap(&report.plan, &report.stats, &plan));
                ports.extend(report.ports);
            }
            None => warn!("a worker thread panicked; its counters are lost"),
        }
    }
    stats.add(&shared.inherited(&plan));
    // Sockets a reload opened that no worker took up before stopping.
    for slot in &shared.incoming {
        ports.extend(
            std::mem::take(&mut *slot.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .map(|(_, p)| p),
        );
    }
    // Frames still in a lane were handed over after their transmitting worker stopped:
    // they were never sent, so they go back to the pool.
    for (id, lane) in shared.lanes.iter().enumerate() {
        let Some(lane) = lane.get() else { continue };
        // A lane is made only for a socket that exists, so it has a UMEM.
        let pool = &shared.domain(port_domain[id]).pool;
        while let Some((desc, _)) = lane.pop() {
            pool.give(shared.frame_of(B::addr(&desc)));
        }
    }
    let account = FrameAccount {
        frames: shared.made_domains().map(|d| d.frames.len()).sum(),
        in_pool: shared.made_domains().map(|d| d.pool.free()).sum(),
        in_fill: ports.iter().map(|p| p.in_fill).sum(),
        in_tx: ports.iter().map(|p| p.in_tx).sum(),
        abandoned: shared.abandoned.load(Ordering::Acquire),
    };
    (plan, stats, account, ports)
}

/// The plan that runs `table` over the sockets `ports` (by global id) on `domains` UMEMs
/// shared out by `budget`, closing the sockets in `retire`.
fn build_plan(
    ports: &[PortMeta],
    budget: &budget::Budget,
    domains: usize,
    table: RuleTable,
    retire: Vec<usize>,
    generation: u64,
) -> Plan {
    let live = |name: &str, ifindex: u32, queue: u32| {
        ports
            .iter()
            .position(|p| !p.retired && p.name == name && p.queue == queue && p.ifindex == ifindex)
    };
    let egress_port: Vec<Option<usize>> = table
        .egress
        .iter()
        .map(|e| live(&e.name, e.info.ifindex, 0))
        .collect();
    let egress_owner = egress_port
        .iter()
        .map(|id| id.map(|id| ports[id].owner))
        .collect();
    let ingress_ports: Vec<usize> = table
        .ingress
        .iter()
        .flat_map(|i| (0..i.info.rx_queues).map(move |q| (i.name.clone(), i.info.ifindex, q)))
        .filter_map(|(n, ifindex, q)| live(&n, ifindex, q))
        .collect();
    let egress_domain = egress_port
        .iter()
        .map(|id| id.map_or(NO_DOMAIN, |id| ports[id].domain))
        .collect();
    // Each UMEM's fill budget is shared by the ingress queues on it.
    let fill_targets = (0..domains)
        .map(|d| {
            let queues = ingress_ports
                .iter()
                .filter(|&&id| ports[id].domain == d)
                .count();
            budget.fill_target(queues)
        })
        .collect();
    Plan {
        generation,
        table,
        egress_port,
        egress_owner,
        egress_domain,
        ingress_ports,
        retire,
        fill_targets,
    }
}

/// `poll: busy` on a zero-copy socket: the kernel's receive runs in the driver's NAPI, which
/// the worker's non-blocking recvfrom then drives (SO_PREFER_BUSY_POLL, up to 20 µs and 64
/// frames a call), rather than interrupts (Documentation/networking/af_xdp.rst). Best
/// effort: a kernel or driver that refuses leaves the socket as it was, which is logged.
fn prefer_busy_poll(fd: i32, name: &str, queue: u32) {
    // The generic (x86-64, arm64) values; the libc crate does not carry them for Linux.
    const SO_BUSY_POLL: i32 = 46;
    const SO_PREFER_BUSY_POLL: i32 = 69;
    const SO_BUSY_POLL_BUDGET: i32 = 70;
    for (opt, value, what) in [
        (SO_PREFER_BUSY_POLL, 1i32, "SO_PREFER_BUSY_POLL"),
        (SO_BUSY_POLL, 20, "SO_BUSY_POLL"),
        (SO_BUSY_POLL_BUDGET, 64, "SO_BUSY_POLL_BUDGET"),
    ] {
        // SAFETY: `value` is a live i32 of the size given, the type these options take.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as u32,
            )
        };
        if rc != 0 {
            warn!(
                "{name} queue {queue}: {what}: {}; the socket is not busy-polled by the kernel",
                std::io::Error::last_os_error()
            );
            return;
        }
    }
}
