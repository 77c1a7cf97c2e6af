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
        Arc, Mutex,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use crossbeam_queue::ArrayQueue;
use log::{info, warn};
use xsk_rs::{
    Umem,
    config::{FrameSize, QueueSize, UmemConfig},
};

pub use stats::{DatapathStats, OutputCounters, RuleCounters};
use worker::{DRAIN, Port, RUN, Shared, Waker, Worker, WorkerReport};

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

/// Where each ingress socket must go in the XSKMAP: (ingress slot, queue, socket fd).
pub type XskBinding = (usize, u32, RawFd);

/// The data path before and while it runs.
pub struct Datapath {
    shared: Arc<Shared>,
    pending: Vec<Vec<Port>>,
    running: Vec<JoinHandle<WorkerReport>>,
}

/// Reads the data path's counters from any thread: each worker's last publication (at most
/// 100 ms old), summed, and the pool's state.
#[derive(Clone)]
pub struct Monitor {
    shared: Arc<Shared>,
}

impl Monitor {
    pub fn stats(&self) -> DatapathStats {
        let mut sum = DatapathStats::new(self.shared.table.rules.iter().map(|r| r.outputs.len()));
        for s in &self.shared.snapshots {
            sum.add(&s.lock().unwrap_or_else(|p| p.into_inner()));
        }
        sum
    }

    pub fn pool(&self) -> PoolStats {
        self.shared.pool.stats()
    }

    pub fn allocator(&self) -> crate::pool::AllocatorKind {
        self.shared.pool.kind()
    }

    pub fn table(&self) -> &RuleTable {
        &self.shared.table
    }
}

/// What the data path leaves when it has stopped.
pub struct Finished {
    pub stats: DatapathStats,
    pub account: FrameAccount,
    pub pool: PoolStats,
    pub sockets: Vec<(String, u32, xsk_rs::socket::XdpStatistics)>,
    /// Kept open until the report is printed, then dropped.
    _ports: Vec<Port>,
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
    ) -> Result<(Self, Vec<XskBinding>)> {
        let workers = workers.max(1);
        let umem_config = UmemConfig::builder()
            .frame_size(FrameSize::new(frame_size).map_err(|e| anyhow!("frame size: {e}"))?)
            .fill_queue_size(QueueSize::new(RING_SIZE).map_err(|e| anyhow!("{e}"))?)
            .comp_queue_size(QueueSize::new(RING_SIZE).map_err(|e| anyhow!("{e}"))?)
            .build()
            .map_err(|e| anyhow!("UMEM config: {e}"))?;
        let count = NonZeroU32::new(frames).ok_or_else(|| anyhow!("zero frames"))?;
        let (umem, descs) =
            Umem::new(umem_config, count, false).context("creating the UMEM (is this root?)")?;
        if descs.len() != pool.capacity() {
            return Err(anyhow!(
                "pool holds {} frames, UMEM {}",
                pool.capacity(),
                descs.len()
            ));
        }

        // One socket per ingress (interface, rx queue), then one per egress interface that is
        // not also an ingress.
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
        let ingress_queues = wanted.iter().filter(|w| w.3).count().max(1);
        // Half the frames may sit in fill rings; the rest serve TX and fan-out copies.
        let fill_target = (frames as usize / 2 / ingress_queues).min(RING_SIZE as usize);

        // Sockets go to workers round-robin, ingress queues first, so RX spreads before TX.
        let mut pending: Vec<Vec<Port>> = (0..workers).map(|_| Vec::new()).collect();
        let mut owner_of: Vec<(String, u32, usize)> = Vec::new();
        let mut bindings = Vec::new();
        for (k, (name, ifindex, queue, ingress)) in wanted.into_iter().enumerate() {
            let b = socket::open_socket(&umem, &name, queue, bind, k == 0)?;
            let w = k % workers;
            info!(
                "{name} queue {queue}: AF_XDP socket bound in {} mode ({}, worker {w})",
                if b.copy_mode { "copy" } else { "zero-copy" },
                if ingress { "ingress" } else { "egress" }
            );
            if ingress {
                let slot = table
                    .ingress
                    .iter()
                    .position(|i| i.info.ifindex == ifindex)
                    .expect("ingress came from the table");
                bindings.push((slot, queue, b.rx.fd().as_raw_fd()));
            }
            owner_of.push((name.clone(), queue, w));
            pending[w].push(Port {
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
                fill_target,
            });
        }
        let egress_owner = table
            .egress
            .iter()
            .map(|e| {
                owner_of
                    .iter()
                    .find(|(n, q, _)| *n == e.name && *q == 0)
                    .map(|o| o.2)
                    .expect("a socket was opened for every egress")
            })
            .collect();
        let lanes = table
            .egress
            .iter()
            .map(|_| ArrayQueue::new(LANE_FRAMES))
            .collect();
        let wakers = (0..workers)
            .map(|_| Waker::new())
            .collect::<std::io::Result<Vec<_>>>()
            .context("creating eventfds")?;
        let table_shape: Vec<usize> = table.rules.iter().map(|r| r.outputs.len()).collect();
        let shared = Arc::new(Shared {
            umem,
            frames: descs,
            frame_size: frame_size as usize,
            pool,
            table,
            egress_owner,
            lanes,
            wakers,
            phase: AtomicU8::new(RUN),
            rx_done: AtomicUsize::new(0),
            snapshots: (0..workers)
                .map(|_| Mutex::new(DatapathStats::new(table_shape.iter().copied())))
                .collect(),
        });
        Ok((
            Datapath {
                shared,
                pending,
                running: Vec::new(),
            },
            bindings,
        ))
    }

    pub fn table(&self) -> &RuleTable {
        &self.shared.table
    }

    /// A handle other threads use to read live counters.
    pub fn monitor(&self) -> Monitor {
        Monitor {
            shared: self.shared.clone(),
        }
    }

    /// Starts the worker threads; each fills its ingress rings first.
    pub fn start(&mut self) -> Result<()> {
        for (id, ports) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            let shared = self.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("relay-worker-{id}"))
                .spawn(move || Worker::new(id, shared, ports).run())
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

    /// Tells the workers to drain (the caller has detached the XDP program), waits for them,
    /// and settles the books.
    pub fn stop(self) -> Finished {
        self.shared.phase.store(DRAIN, Ordering::Release);
        let mut stats = DatapathStats::new(self.shared.table.rules.iter().map(|r| r.outputs.len()));
        let mut ports = Vec::new();
        for h in self.running {
            match h.join() {
                Ok(report) => {
                    stats.add(&report.stats);
                    ports.extend(report.ports);
                }
                Err(_) => warn!("a worker thread panicked; its counters are lost"),
            }
        }
        // Frames still in a lane were handed over after their transmitting worker stopped:
        // they were never sent, so they go back to the pool.
        for lane in &self.shared.lanes {
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
            stats,
            account,
            pool: self.shared.pool.stats(),
            sockets,
            _ports: ports,
        }
    }
}
