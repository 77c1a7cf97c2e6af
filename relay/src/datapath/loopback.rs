//! The data path over in-memory sockets (see [`super::memory`]): the relay's workers, plan,
//! pools and shutdown books exactly as [`super::Datapath`] runs them, with a [`Wire`] in place
//! of each AF_XDP socket's link. Needs no root and no interface; the rule table is compiled
//! against a fixed system (`config::StaticSystem`).
//!
//! Sockets are made as the relay makes them: one per ingress (interface, queue) and one per
//! egress interface that is not also an ingress, dealt to the workers round-robin in that
//! order, all on one UMEM. A worker is driven by [`Loopback::step`] (one pass of every worker,
//! in the caller's thread) or runs in a thread of its own after [`Loopback::start`], spinning
//! while idle (`poll: busy`).

use std::{
    sync::{Arc, atomic::Ordering},
    thread::JoinHandle,
};

use anyhow::{Context, Result};

use super::{
    DRAIN, FrameAccount, PortMeta, RING_SIZE, budget, build_plan, check_budget,
    memory::{Arena, MemRings, Memory, Wire},
    ringlog::RingLog,
    settle, wanted_sockets,
    worker::{Domain, Port, Shared, WAITING_MAX, Worker, WorkerReport},
};
use crate::{
    datapath::DatapathStats,
    pool::{AllocatorKind, PoolStats, new_pool},
    rules::RuleTable,
};

/// How a loopback data path is made.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Frames in its one UMEM.
    pub frames: u32,
    pub frame_size: u32,
    pub allocator: AllocatorKind,
    pub workers: usize,
    /// Worker threads sleep when idle, as with `poll: sleep` (in-memory sockets have no
    /// descriptor to wake them, so an idle worker looks again after its poll timeout);
    /// otherwise they spin, as with `poll: busy`.
    pub sleep: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            frames: 4096,
            frame_size: 2048,
            sleep: false,
            allocator: AllocatorKind::Lockfree,
            workers: 1,
        }
    }
}

/// What a socket's rings hold, as its worker last left them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortState {
    /// Frames on the fill and RX rings.
    pub in_fill: usize,
    /// Frames on the TX and completion rings.
    pub in_tx: usize,
    /// Frames staged for the TX ring that did not fit it.
    pub waiting: usize,
}

/// What a loopback data path leaves when it has stopped.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub stats: DatapathStats,
    pub account: FrameAccount,
    pub pool: PoolStats,
}

/// Staged frames that wait for room on a full TX ring, at most (the rest are dropped as
/// `tx_ring_full`).
pub const WAITING: usize = WAITING_MAX;

/// Entries in each ring of a socket.
pub const RING: usize = RING_SIZE as usize;

/// The data path over in-memory sockets.
pub struct Loopback {
    shared: Arc<Shared<Memory>>,
    /// Workers driven by `step`, until `start` moves them into threads.
    workers: Vec<Worker<Memory>>,
    running: Vec<JoinHandle<WorkerReport<Memory>>>,
    ports: Vec<PortMeta>,
    /// The link of each socket, by global id.
    wires: Vec<Arc<Wire>>,
}

impl Loopback {
    /// Makes the UMEM, a socket for every (interface, queue) `table` needs, and the workers,
    /// which fill their ingress rings.
    pub fn new(table: RuleTable, options: Options) -> Result<Self> {
        let workers = options.workers.max(1);
        let frames = options.frames as usize;
        let queues = wanted_sockets(&table).iter().filter(|w| w.3).count();
        check_budget(frames, queues, workers)?;
        let budget = budget::Budget::new(frames, workers);
        let shared = Arc::new(
            Shared::new(
                workers,
                options.frame_size as usize,
                options.allocator,
                &budget,
                !options.sleep,
                Arc::default(),
            )
            .context("setting up the data path")?,
        );
        let arena = Arc::new(Arena::new(frames, options.frame_size as usize));
        let domain = Domain {
            frames: arena.descs(),
            umem: arena.clone(),
            pool: Arc::from(new_pool(options.allocator, options.frames)),
            stalled: Default::default(),
        };
        if shared.domains[0].set(domain).is_err() {
            unreachable!("a new data path has no UMEM yet");
        }
        let mtu = |name: &str| {
            let ingress = table
                .ingress
                .iter()
                .find(|i| i.name == name)
                .map(|i| i.info);
            let egress = table.egress.iter().find(|e| e.name == name).map(|e| e.info);
            ingress.or(egress).map_or(1500, |i| i.mtu)
        };
        let mut metas = Vec::new();
        let mut wires = Vec::new();
        let mut dealt: Vec<Vec<(usize, Port<Memory>)>> = (0..workers).map(|_| Vec::new()).collect();
        for (id, (name, ifindex, queue, ingress)) in wanted_sockets(&table).into_iter().enumerate()
        {
            let owner = id % workers;
            let wire = Arc::new(Wire::default());
            metas.push(PortMeta {
                name: name.clone(),
                ifindex,
                queue,
                owner,
                ingress,
                retired: false,
                domain: 0,
            });
            wires.push(wire.clone());
            dealt[owner].push((
                id,
                Port {
                    domain: 0,
                    mtu: mtu(&name),
                    name,
                    ifindex,
                    queue,
                    ingress,
                    copy_mode: false,
                    rings: MemRings::new(arena.clone(), wire),
                    in_fill: 0,
                    in_tx: 0,
                    fill_target: 0,
                    down: false,
                    link: None,
                    fill_log: RingLog::new(RING),
                    tx_log: RingLog::new(RING),
                    dead: false,
                    draining: true,
                    stalled: 0,
                    waiting: 0,
                },
            ));
        }
        let plan = build_plan(&metas, &budget, 1, table, Vec::new(), 1);
        *shared.plan.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(plan);
        shared.plan_gen.store(1, Ordering::Release);
        let workers = dealt
            .into_iter()
            .enumerate()
            .map(|(id, ports)| Worker::new(id, shared.clone(), ports))
            .collect();
        Ok(Loopback {
            shared,
            workers,
            running: Vec::new(),
            ports: metas,
            wires,
        })
    }

    /// The link of `iface`'s socket for rx queue `queue` (an egress-only socket is queue 0).
    pub fn wire(&self, iface: &str, queue: u32) -> Option<Arc<Wire>> {
        let id = self
            .ports
            .iter()
            .position(|p| p.name == iface && p.queue == queue)?;
        Some(self.wires[id].clone())
    }

    /// Which worker owns `iface`'s socket for `queue`.
    pub fn owner(&self, iface: &str, queue: u32) -> Option<usize> {
        self.ports
            .iter()
            .find(|p| p.name == iface && p.queue == queue)
            .map(|p| p.owner)
    }

    /// One pass of every worker, in order, in this thread; true if anything moved or is in
    /// flight. Only before [`Loopback::start`].
    pub fn step(&mut self) -> bool {
        let mut busy = false;
        for w in &mut self.workers {
            busy |= w.pass();
        }
        busy
    }

    /// Steps until a pass moves nothing, at most `passes` times; returns the passes made.
    pub fn settle(&mut self, passes: usize) -> usize {
        (1..=passes).find(|_| !self.step()).unwrap_or(passes)
    }

    /// The counters of the workers driven by `step`, summed.
    pub fn stats(&self) -> DatapathStats {
        let plan = self.shared.current_plan();
        let mut sum = DatapathStats::new(plan.table.rules.iter().map(|r| r.outputs.len()));
        for w in &self.workers {
            sum.add(w.stats());
        }
        sum
    }

    /// What `iface`'s socket for `queue` holds, if a worker driven by `step` owns it.
    pub fn port(&self, iface: &str, queue: u32) -> Option<PortState> {
        self.workers
            .iter()
            .flat_map(|w| w.ports())
            .find(|(id, _)| self.ports[*id].name == iface && self.ports[*id].queue == queue)
            .map(|(_, p)| PortState {
                in_fill: p.in_fill,
                in_tx: p.in_tx,
                waiting: p.waiting,
            })
    }

    /// What captures start on (`relay capture`).
    pub fn tap(&self) -> Arc<crate::capture::Tap> {
        self.shared.tap.clone()
    }

    /// Frames free in the pool now.
    pub fn pool(&self) -> PoolStats {
        self.shared.pool_stats()
    }

    /// Runs each worker in a thread of its own until [`Loopback::stop`].
    pub fn start(&mut self) -> Result<()> {
        for (id, worker) in std::mem::take(&mut self.workers).into_iter().enumerate() {
            let handle = std::thread::Builder::new()
                .name(format!("loopback-worker-{id}"))
                .spawn(move || worker.run())
                .context("spawning a worker")?;
            self.running.push(handle);
        }
        Ok(())
    }

    /// Stops as the relay does: nothing more arrives (the XDP program is detached), the
    /// workers drain what they hold, and the books are settled.
    pub fn stop(self) -> Outcome {
        for w in &self.wires {
            w.detach();
        }
        self.shared.phase.store(DRAIN, Ordering::Release);
        let mut running = self.running;
        // Workers that were stepped drain in threads too: draining waits for the others.
        for worker in self.workers {
            running.push(std::thread::spawn(move || worker.run()));
        }
        let reports = running.into_iter().map(|h| h.join().ok()).collect();
        let domains: Vec<usize> = self.ports.iter().map(|p| p.domain).collect();
        let (_, stats, account, _) = settle(&self.shared, reports, &domains);
        Outcome {
            stats,
            account,
            pool: self.shared.pool_stats(),
        }
    }
}

#[cfg(test)]
mod tests;
