//! The AF_XDP data path: one UMEM shared by every socket, a socket per ingress rx queue and per
//! egress interface, and the worker threads that receive, rewrite in place and transmit.
//!
//! Frame ownership: a frame is in exactly one of these places at any time — the pool (or a
//! worker's cache in front of it), the kernel's fill/RX rings of an ingress socket
//! (`in_fill`), the TX/completion rings of an egress socket (`in_tx`), a lane between two
//! workers, or in the hands of a worker between two of these steps. The last is empty
//! whenever the workers have stopped, so at shutdown `pool + in_fill + in_tx == frames` must
//! hold, and the relay says so.

mod socket;
pub mod stats;
mod worker;

use std::{
    num::NonZeroU32,
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use log::{info, warn};
use xsk_rs::{
    Umem,
    config::{FrameSize, QueueSize, UmemConfig},
};

pub use stats::{DatapathStats, OutputCounters, RuleCounters};
use worker::{DRAIN, MAX_PORTS, Plan, Port, RUN, Shared, Waker, Worker, WorkerReport};

use crate::{
    config::BindMode,
    pool::{FramePool, PoolStats},
    rules::RuleTable,
};

/// Ring sizes. The fill ring of an ingress socket is kept at most this full.
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
}

impl FrameAccount {
    /// Frames that are in none of the places a frame can be.
    pub fn leaked(&self) -> isize {
        self.frames as isize - (self.in_pool + self.in_fill + self.in_tx) as isize
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
}

/// The data path before and while it runs.
pub struct Datapath {
    shared: Arc<Shared>,
    pending: Vec<Vec<(usize, Port)>>,
    running: Vec<JoinHandle<WorkerReport>>,
    ports: Vec<PortMeta>,
    bind: BindMode,
    fill_target: usize,
    /// The rx ring fd of each socket, by global id, for XSKMAP bindings.
    fds: Vec<RawFd>,
    /// CPUs to pin the workers to (worker i on `cpus[i % len]`).
    cpus: Option<Vec<usize>>,
}

/// Reads the data path's counters from any thread: each worker's last publication (at most
/// 100 ms old), re-shaped to the current rules and summed, and the pool's state.
#[derive(Clone)]
pub struct Monitor {
    shared: Arc<Shared>,
}

impl Monitor {
    /// The current rule table and the counters shaped by it.
    pub fn stats(&self) -> (RuleTable, DatapathStats) {
        let plan = self.shared.current_plan();
        let mut sum = DatapathStats::new(plan.table.rules.iter().map(|r| r.outputs.len()));
        for s in &self.shared.snapshots {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            sum.add(&worker::remap(&s.0, &s.1, &plan));
        }
        (plan.table.clone(), sum)
    }

    pub fn pool(&self) -> PoolStats {
        self.shared.pool.stats()
    }

    pub fn allocator(&self) -> crate::pool::AllocatorKind {
        self.shared.pool.kind()
    }
}

/// What the data path leaves when it has stopped.
pub struct Finished {
    /// The rules in force at the end, which `stats` is shaped by.
    pub table: RuleTable,
    pub stats: DatapathStats,
    pub account: FrameAccount,
    pub pool: PoolStats,
    pub sockets: Vec<(String, u32, xsk_rs::socket::XdpStatistics)>,
    /// Kept open until the report is printed, then dropped.
    _ports: Vec<Port>,
}

/// The sockets a table needs: one per ingress (interface, rx queue), and one per egress
/// interface that is not also an ingress. `(name, ifindex, queue, ingress)`.
fn wanted_sockets(table: &RuleTable) -> Vec<(String, u32, u32, bool)> {
    let mut wanted: Vec<(String, u32, u32, bool)> = Vec::new();
    for ing in &table.ingress {
        for q in 0..ing.info.rx_queues {
            wanted.push((ing.name.clone(), ing.info.ifindex, q, true));
        }
    }
    for eg in &table.egress {
        if !wanted.iter().any(|(n, _, q, _)| *n == eg.name && *q == 0) {
            wanted.push((eg.name.clone(), eg.info.ifindex, 0, false));
        }
    }
    wanted
}

impl Datapath {
    /// Creates the UMEM and every socket, and assigns the sockets to `workers` threads. The
    /// XDP program is not involved yet: the caller puts the returned bindings into the XSKMAP,
    /// then calls [`Datapath::start`].
    pub fn new(
        table: RuleTable,
        frames: u32,
        frame_size: u32,
        bind: BindMode,
        pool: Arc<dyn FramePool>,
        workers: usize,
        cpus: Option<Vec<usize>>,
    ) -> Result<(Self, Vec<XskBinding>)> {
        let workers = workers.max(1);
        let umem_config = UmemConfig::builder()
            .frame_size(FrameSize::new(frame_size).map_err(|e| anyhow!("frame size: {e}"))?)
            .fill_queue_size(QueueSize::new(RING_SIZE).map_err(|e| anyhow!("{e}"))?)
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
        if descs.len() != pool.capacity() {
            return Err(anyhow!(
                "pool holds {} frames, UMEM {}",
                pool.capacity(),
                descs.len()
            ));
        }
        let ingress_queues = wanted_sockets(&table).iter().filter(|w| w.3).count().max(1);
        // Half the frames may sit in fill rings; the rest serve TX and fan-out copies.
        let fill_target = (frames as usize / 2 / ingress_queues).min(RING_SIZE as usize);
        let wakers = (0..workers)
            .map(|_| Waker::new())
            .collect::<std::io::Result<Vec<_>>>()
            .context("creating eventfds")?;
        let empty = Arc::new(Plan {
            generation: 0,
            table: RuleTable::default(),
            egress_port: Vec::new(),
            egress_owner: Vec::new(),
            ingress_ports: Vec::new(),
        });
        let shared = Arc::new(Shared {
            umem,
            frames: descs,
            frame_size: frame_size as usize,
            pool,
            plan: Mutex::new(empty.clone()),
            plan_gen: AtomicU64::new(0),
            adopted: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            incoming: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            lanes: (0..MAX_PORTS).map(|_| OnceLock::new()).collect(),
            wakers,
            phase: AtomicU8::new(RUN),
            rx_done: AtomicUsize::new(0),
            snapshots: (0..workers)
                .map(|_| Mutex::new((empty.clone(), DatapathStats::default())))
                .collect(),
        });
        let mut dp = Datapath {
            shared,
            pending: (0..workers).map(|_| Vec::new()).collect(),
            running: Vec::new(),
            ports: Vec::new(),
            bind,
            fill_target,
            fds: Vec::new(),
            cpus: cpus.filter(|c| !c.is_empty()),
        };
        let (opened, bindings) = dp.open_sockets(&table)?;
        for (w, id, port) in opened {
            dp.pending[w].push((id, port));
        }
        dp.publish_plan(table);
        Ok((dp, bindings))
    }

    /// Opens a socket for every (interface, queue) the table needs that has none yet, and
    /// deals them to the workers round-robin (ingress first, so RX spreads before TX).
    #[allow(clippy::type_complexity)]
    fn open_sockets(
        &mut self,
        table: &RuleTable,
    ) -> Result<(Vec<(usize, usize, Port)>, Vec<XskBinding>)> {
        let workers = self.shared.wakers.len();
        let mut opened = Vec::new();
        let mut bindings = Vec::new();
        for (name, ifindex, queue, ingress) in wanted_sockets(table) {
            if let Some(id) = self
                .ports
                .iter()
                .position(|p| p.name == name && p.queue == queue && p.ifindex == ifindex)
            {
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
            let b = socket::open_socket(&self.shared.umem, &name, queue, self.bind, id == 0)?;
            let w = id % workers;
            info!(
                "{name} queue {queue}: AF_XDP socket bound in {} mode ({}, worker {w})",
                if b.copy_mode { "copy" } else { "zero-copy" },
                if ingress { "ingress" } else { "egress" }
            );
            let fd = b.rx.fd().as_raw_fd();
            if ingress {
                bindings.push((ifindex, queue, fd));
            }
            self.ports.push(PortMeta {
                name: name.clone(),
                ifindex,
                queue,
                owner: w,
            });
            self.fds.push(fd);
            let mtu = crate::sys::mtu(&name).unwrap_or(1500);
            opened.push((
                w,
                id,
                Port {
                    name,
                    ifindex,
                    queue,
                    ingress,
                    copy_mode: b.copy_mode,
                    tx: b.tx,
                    rx: b.rx,
                    fq: b.fq,
                    cq: b.cq,
                    in_fill: 0,
                    in_tx: 0,
                    fill_target: self.fill_target,
                    down: false,
                    mtu,
                },
            ));
        }
        Ok((opened, bindings))
    }

    fn known_fd(&self, id: usize) -> Option<RawFd> {
        self.fds.get(id).copied()
    }

    /// Makes `table` the current plan (the workers take it up on their next pass).
    fn publish_plan(&mut self, table: RuleTable) -> u64 {
        let find = |name: &str, ifindex: u32, queue: u32| {
            self.ports
                .iter()
                .position(|p| p.name == name && p.queue == queue && p.ifindex == ifindex)
                .expect("a socket was opened for every interface of the table")
        };
        let egress_port: Vec<usize> = table
            .egress
            .iter()
            .map(|e| find(&e.name, e.info.ifindex, 0))
            .collect();
        let egress_owner = egress_port.iter().map(|&id| self.ports[id].owner).collect();
        let ingress_ports = table
            .ingress
            .iter()
            .flat_map(|i| (0..i.info.rx_queues).map(move |q| (i.name.clone(), i.info.ifindex, q)))
            .map(|(n, ifindex, q)| find(&n, ifindex, q))
            .collect();
        let generation = self.shared.plan_gen.load(Ordering::Acquire) + 1;
        let plan = Arc::new(Plan {
            generation,
            table,
            egress_port,
            egress_owner,
            ingress_ports,
        });
        *self.shared.plan.lock().unwrap_or_else(|p| p.into_inner()) = plan;
        self.shared.plan_gen.store(generation, Ordering::Release);
        generation
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
            shared: self.shared.clone(),
        }
    }

    /// Starts the worker threads, each pinned to its CPU if `cpus:` names them; each fills
    /// its ingress rings first.
    pub fn start(&mut self) -> Result<()> {
        for (id, ports) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            let shared = self.shared.clone();
            let cpu = self.cpus.as_ref().map(|c| c[id % c.len()]);
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

    /// Switches the running data path to `table`: opens sockets for interfaces it did not
    /// have, hands them to their workers with the new plan, and waits until every worker has
    /// taken the plan up. Returns the ingress sockets the XDP program must now redirect to.
    /// Sockets of interfaces no longer used stay open (the caller detaches XDP from them), so
    /// a rule that comes back later finds them ready.
    pub fn reload(&mut self, table: RuleTable) -> Result<Vec<XskBinding>> {
        let (opened, bindings) = self.open_sockets(&table)?;
        for (w, id, port) in opened {
            self.shared.incoming[w]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((id, port));
        }
        let generation = self.publish_plan(table);
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
                return Err(anyhow!("a worker did not take up the new rules within 2 s"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(bindings)
    }

    /// Tells the workers to drain (the caller has detached the XDP program), waits for them,
    /// and settles the books.
    pub fn stop(self) -> Finished {
        self.shared.phase.store(DRAIN, Ordering::Release);
        let plan = self.shared.current_plan();
        let mut stats = DatapathStats::new(plan.table.rules.iter().map(|r| r.outputs.len()));
        let mut ports = Vec::new();
        for h in self.running {
            match h.join() {
                Ok(report) => {
                    stats.add(&worker::remap(&report.plan, &report.stats, &plan));
                    ports.extend(report.ports);
                }
                Err(_) => warn!("a worker thread panicked; its counters are lost"),
            }
        }
        // Sockets a reload opened that no worker took up before stopping.
        for slot in &self.shared.incoming {
            ports.extend(
                std::mem::take(&mut *slot.lock().unwrap_or_else(|p| p.into_inner()))
                    .into_iter()
                    .map(|(_, p)| p),
            );
        }
        // Frames still in a lane were handed over after their transmitting worker stopped:
        // they were never sent, so they go back to the pool.
        for lane in self.shared.lanes.iter().filter_map(OnceLock::get) {
            while let Some((desc, _)) = lane.pop() {
                self.shared
                    .pool
                    .give((desc.addr() / self.shared.frame_size) as u32);
            }
        }
        let account = FrameAccount {
            frames: self.shared.frames.len(),
            in_pool: self.shared.pool.free(),
            in_fill: ports.iter().map(|p| p.in_fill).sum(),
            in_tx: ports.iter().map(|p| p.in_tx).sum(),
        };
        let sockets = ports
            .iter()
            .filter_map(|p| {
                p.rx.fd()
                    .xdp_statistics()
                    .map(|s| (p.name.clone(), p.queue, s))
                    .map_err(|e| warn!("{}: reading XDP statistics: {e}", p.name))
                    .ok()
            })
            .collect();
        Finished {
            table: plan.table.clone(),
            stats,
            account,
            pool: self.shared.pool.stats(),
            sockets,
            _ports: ports,
        }
    }
}
