//! One data path thread: the sockets it owns, its frame cache, and its loop.
//!
//! Every socket belongs to exactly one worker, which alone touches its four rings. A worker
//! receives on its ingress sockets and transmits on its egress sockets. A frame bound for an
//! egress that another worker owns goes through that egress's lane, a bounded lock-free queue,
//! and the owner transmits it and later gives it back to the pool. That is where frames cross
//! threads: taken from the pool by the receiving worker (fill ring, fan-out copies), given back
//! by the transmitting one (completion ring).

use std::{
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence},
    },
    time::{Duration, Instant},
};

use super::{
    BATCH, DRAIN_TIMEOUT, IDLE_POLL_MS, RING_SIZE,
    backend::{Backend, FrameMut, Rings},
    ringlog::RingLog,
    stats::{DatapathStats, OutputCounters, SocketCounters},
    tags::{TagBooks, carries_output},
};
use crate::{
    capture::{Direction, Session, Tap},
    frag::{FragTable, rewrite_packet},
    merge::Unnumbered,
    pool::{FrameCache, FramePool},
    rewrite::{OutputAction, Prepared, RewriteError, complete_partial_udp_checksum},
    rules::RuleTable,
    vlan::retag,
    wire::{check_lengths, classify_udp},
};
use crossbeam_queue::ArrayQueue;
use log::debug;

/// Where the data path is in its life.
pub(super) const RUN: u8 = 0;
pub(super) const DRAIN: u8 = 1;

/// A frame on its way to an egress, and whose counters it moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tag {
    pub rule: u32,
    pub output: u16,
    /// The plan generation (low bits) the rule and output indices belong to: a frame handed
    /// over just before a reload may reach a worker that already counts by the new plan.
    pub plan: u16,
}

/// One version of the data path's configuration: the rule table, and which socket (and so
/// which worker) transmits for each of its egresses. A reload publishes a new one.
pub(super) struct Plan {
    pub generation: u64,
    pub table: RuleTable,
    /// For each egress of the table, the global id of the socket that transmits on it; `None`
    /// while its device is gone (its frames are dropped as `interface_down`).
    pub egress_port: Vec<Option<usize>>,
    /// For each egress, the worker that owns that socket.
    pub egress_owner: Vec<Option<usize>>,
    /// For each egress, the UMEM of that socket (`NO_DOMAIN` when there is none).
    pub egress_domain: Vec<usize>,
    /// Global ids of the sockets that receive (bound to an ingress queue).
    pub ingress_ports: Vec<usize>,
    /// Sockets whose device is gone: their owner takes back what frames it can and closes
    /// them when it takes this plan up.
    pub retire: Vec<usize>,
    /// How full each ingress socket's fill ring is kept, by UMEM: its fill budget shared by
    /// the ingress queues on it now.
    pub fill_targets: Vec<usize>,
}

/// Sockets a reload opened for one worker: (global id, socket).
pub(super) type Incoming<B> = Vec<(usize, Port<B>)>;

/// Frames handed from one worker to the owner of a socket.
pub(super) type Lane<B> = ArrayQueue<(<B as Backend>::Desc, Tag)>;

/// Most sockets one relay opens over its lifetime.
pub(super) const MAX_PORTS: usize = 1024;

/// One UMEM, the frames it holds and the pool of those that are free. Sockets share one per
/// bind mode, and one per `umem.separate` interface; a frame is copied only to cross from
/// one to another.
pub(super) struct Domain<B: Backend> {
    pub umem: B::Umem,
    /// The descriptor `Umem::new` made for each frame, indexed by frame number.
    pub frames: Vec<B::Desc>,
    pub pool: Arc<dyn FramePool>,
    /// Frames on the TX rings of this UMEM's sockets that are not draining (see
    /// `Port::draining`), as those sockets counted them: together they may hold
    /// `Shared::tx_hold`, so several stalled devices cannot take the fill rings' share.
    pub stalled: AtomicUsize,
}

/// Most UMEMs one data path makes over its life (one per bind mode, one per `separate`
/// interface, and new ones for kinds whose every socket went away).
pub(super) const MAX_DOMAINS: usize = 32;

/// No socket (the egress is gone): in `Plan::egress_domain`.
pub(super) const NO_DOMAIN: usize = usize::MAX;

/// What the workers share.
pub(super) struct Shared<B: Backend> {
    /// The UMEMs, made when a socket first needs one and never moved.
    pub domains: Box<[OnceLock<Domain<B>>]>,
    pub frame_size: usize,
    /// log2 of `frame_size`: a frame's number is its offset shifted by this, once per frame
    /// and not a division.
    pub frame_shift: u32,
    pub allocator: crate::pool::AllocatorKind,
    /// The current plan; workers look at `plan_gen` every pass and take the lock only when it
    /// moved.
    pub plan: Mutex<Arc<Plan>>,
    pub plan_gen: AtomicU64,
    /// The plan generation each worker has adopted.
    pub adopted: Vec<AtomicU64>,
    /// Sockets opened by a reload, waiting for their worker to take them: (global id, socket).
    pub incoming: Vec<Mutex<Incoming<B>>>,
    /// For each socket (by global id), frames other workers hand to its owner; made on first
    /// use.
    pub lanes: Box<[OnceLock<Lane<B>>]>,
    pub wakers: Vec<Waker>,
    pub phase: AtomicU8,
    /// Workers that have emptied their RX rings while draining.
    pub rx_done: AtomicUsize,
    /// Frames lost with sockets whose device went away: the kernel had taken them from the
    /// fill or TX ring and never gave them back. Counted so the books still balance.
    pub abandoned: AtomicUsize,
    /// Frames each worker's cache may hold (see `budget`).
    pub cache_frames: usize,
    /// Frames one egress socket may have on its TX and completion rings, and waiting for
    /// them (see `budget`).
    pub tx_hold: usize,
    pub waiting_max: usize,
    /// `poll: busy`: idle workers spin instead of sleeping.
    pub busy_poll: bool,
    /// The clock merged rules time their windows by, shared so that legs received by
    /// different workers compare times.
    pub epoch: Instant,
    /// Counters a data path this one replaced had (see `Datapath::rebuild`), with the plan
    /// they are shaped by.
    pub base: Mutex<Option<(Arc<Plan>, DatapathStats)>>,
    /// Each worker's counters as of its last publication, with the plan they are shaped by.
    pub snapshots: Vec<Mutex<(Arc<Plan>, DatapathStats)>>,
    /// Each worker's sockets' kernel counters as of its last publication.
    pub sockets: Vec<Mutex<Vec<SocketCounters>>>,
    /// `relay capture`: looked at once per received batch. Kept across a rebuild, so a
    /// capture follows the data path to its new UMEM.
    pub tap: Arc<Tap>,
}

impl<B: Backend> Shared<B> {
    /// The state `workers` workers share, with no UMEM and an empty plan (generation 0).
    pub fn new(
        workers: usize,
        frame_size: usize,
        allocator: crate::pool::AllocatorKind,
        budget: &super::budget::Budget,
        busy_poll: bool,
        tap: Arc<Tap>,
    ) -> std::io::Result<Self> {
        if !frame_size.is_power_of_two() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("frame size {frame_size} is not a power of two"),
            ));
        }
        let wakers = (0..workers)
            .map(|_| Waker::new())
            .collect::<std::io::Result<Vec<_>>>()?;
        let empty = Arc::new(Plan {
            generation: 0,
            table: RuleTable::default(),
            egress_port: Vec::new(),
            egress_owner: Vec::new(),
            ingress_ports: Vec::new(),
            retire: Vec::new(),
            egress_domain: Vec::new(),
            fill_targets: Vec::new(),
        });
        Ok(Shared {
            domains: (0..MAX_DOMAINS).map(|_| OnceLock::new()).collect(),
            frame_size,
            frame_shift: frame_size.trailing_zeros(),
            allocator,
            plan: Mutex::new(empty.clone()),
            plan_gen: AtomicU64::new(0),
            adopted: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            incoming: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            lanes: (0..MAX_PORTS).map(|_| OnceLock::new()).collect(),
            wakers,
            phase: AtomicU8::new(RUN),
            rx_done: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            base: Mutex::new(None),
            cache_frames: budget.cache,
            tx_hold: budget.tx_hold,
            waiting_max: budget.waiting(WAITING_MAX),
            busy_poll,
            epoch: Instant::now(),
            snapshots: (0..workers)
                .map(|_| Mutex::new((empty.clone(), DatapathStats::default())))
                .collect(),
            sockets: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            tap,
        })
    }

    /// A UMEM a socket uses (so it was made before the socket).
    pub fn domain(&self, d: usize) -> &Domain<B> {
        self.domains[d]
            .get()
            .expect("a socket's UMEM is made before the socket")
    }

    /// The number of the frame at `addr` in its UMEM.
    #[inline]
    pub fn frame_of(&self, addr: usize) -> u32 {
        (addr >> self.frame_shift) as u32
    }

    /// The UMEMs made so far.
    pub fn made_domains(&self) -> impl Iterator<Item = &Domain<B>> {
        self.domains.iter().filter_map(OnceLock::get)
    }

    /// The pools of every UMEM, added up.
    pub fn pool_stats(&self) -> crate::pool::PoolStats {
        let mut sum = crate::pool::PoolStats {
            capacity: 0,
            free: 0,
            low_water: 0,
            rejected: 0,
        };
        for d in self.made_domains() {
            let s = d.pool.stats();
            sum.capacity += s.capacity;
            sum.free += s.free;
            sum.low_water += s.low_water;
            sum.rejected += s.rejected;
        }
        sum
    }

    pub fn lane(&self, port: usize) -> &Lane<B> {
        self.lanes[port].get_or_init(|| ArrayQueue::new(super::LANE_FRAMES))
    }

    /// The inherited counters, re-shaped to `plan`.
    pub fn inherited(&self, plan: &Plan) -> DatapathStats {
        let base = self.base.lock().unwrap_or_else(|p| p.into_inner());
        match &*base {
            Some((shape, stats)) => remap(shape, stats, plan),
            None => DatapathStats::new(plan.table.rules.iter().map(|r| r.outputs.len())),
        }
    }

    pub fn current_plan(&self) -> Arc<Plan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What one pass over a worker's rings found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// A frame was received, handed over, transmitted or completed.
    Moved,
    /// Nothing moved, and frames it sent await their completions.
    Awaiting,
    /// Nothing moved and nothing is in flight: time to wait for frames.
    Idle,
}

/// Wakes a worker that sleeps in poll() when another hands it frames.
pub(super) struct Waker {
    event: OwnedFd,
    sleeping: AtomicBool,
}

impl Waker {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd(2) with valid flags; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let event = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self {
            event,
            sleeping: AtomicBool::new(false),
        })
    }

    fn wake(&self) {
        // Pairs with the fence in `Worker::idle_wait`: either the sleeper sees the frames we
        // queued before it sleeps, or we see it sleeping and write the eventfd.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.event.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Wakes the worker whether or not it sleeps (a reload wants every worker's attention).
    pub fn wake_now(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.event.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid u64; EAGAIN when nothing is pending.
        unsafe { libc::read(self.event.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// One AF_XDP socket, bound to one (interface, queue).
pub(super) struct Port<B: Backend> {
    /// The UMEM its frames are in.
    pub domain: usize,
    pub name: String,
    pub ifindex: u32,
    pub queue: u32,
    pub ingress: bool,
    pub copy_mode: bool,
    pub rings: B::Rings,
    /// Frames given to the fill ring and not yet consumed from the RX ring.
    pub in_fill: usize,
    /// Frames produced to the TX ring and not yet consumed from the completion ring.
    pub in_tx: usize,
    pub fill_target: usize,
    /// The interface was down (or gone) when last looked at.
    pub down: bool,
    /// Its MTU when last looked at: the largest IP packet it sends.
    pub mtu: u32,
    /// Its device's state, kept current by the link watcher from netlink notifications
    /// (`None` for in-memory sockets, which have no device).
    pub link: Option<Arc<crate::links::LinkSlot>>,
    /// The frames last given to the fill ring and the TX ring, to take back the ones the
    /// kernel had not consumed when the socket is retired.
    pub fill_log: RingLog,
    pub tx_log: RingLog,
    /// The kernel refuses to transmit on it (ENXIO: the device was unregistered): stop kicking
    /// it; its frames come back when the main thread retires the socket.
    pub dead: bool,
    /// Staged frames (at the front) that did not fit the TX ring on the last pass, already
    /// checked against the MTU.
    pub waiting: usize,
    /// The last look at its completion ring found frames, or none in flight: the device is
    /// taking frames, and a burst may fill its TX ring. Otherwise (frames in flight and none
    /// came back) it is held to `Shared::tx_hold`, with every other such socket on its UMEM.
    pub draining: bool,
    /// What this socket added to its UMEM's `Domain::stalled` since it stopped draining.
    pub stalled: usize,
}

/// What a worker hands back when it ends.
pub(super) struct WorkerReport<B: Backend> {
    pub plan: Arc<Plan>,
    pub stats: DatapathStats,
    pub ports: Vec<Port<B>>,
}

pub(super) struct Worker<B: Backend> {
    id: usize,
    shared: Arc<Shared<B>>,
    plan: Arc<Plan>,
    ports: Vec<Port<B>>,
    /// The global id of each of `ports`.
    port_ids: Vec<usize>,
    /// A frame cache per UMEM, made on first use.
    caches: Vec<Option<FrameCache>>,
    stats: DatapathStats,
    /// For each egress of the plan's table, the index of this worker's port for it, if it
    /// owns it.
    local_egress: Vec<Option<usize>>,
    staged: Vec<Vec<B::Desc>>,
    staged_tags: Vec<Vec<Tag>>,
    /// Workers this one handed frames to during the current pass.
    to_wake: Vec<bool>,
    rx_buf: Vec<B::Desc>,
    /// The merge clock as read for the current batch (see `merge_now`).
    batch_ms: Option<u64>,
    comp_buf: Vec<B::Desc>,
    poll_fds: Vec<libc::pollfd>,
    take_buf: Vec<u32>,
    desc_buf: Vec<B::Desc>,
    /// What each output of the frame being forwarded does with it (see [`verdict`]).
    verdicts: Vec<Verdict>,
    /// The rules the first fragments of recent datagrams matched, for their later fragments.
    frags: FragTable,
    /// The last unfragmented frame's stream: its rule and its outputs' rewrites.
    rewrites: StreamRewrites,
    /// The capture running during the current received batch, if any (`relay capture`).
    capture: Option<Arc<Session>>,
    /// Where counts for tags of other plans than this worker's go.
    books: TagBooks,
}

/// What a rule lookup depends on: the frame's ingress, group, source, port and VLAN, and the
/// plan whose table it was looked up in. The addresses are taken as the frame holds them (the
/// bytes `classify_udp` made the flow's from), which compare as two words, where the flow's
/// `IpAddr`s, written a byte at a time, would stall the read on store forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LookupKey {
    generation: u64,
    ifindex: u32,
    tci: Option<u16>,
    port: u16,
    v4: bool,
    /// Source then destination: IPv4's 8 bytes (and zeros), or IPv6's 32.
    addrs: [u128; 2],
}

impl LookupKey {
    /// The key of an unfragmented frame, `None` if the frame is shorter than its flow says
    /// (which `classify_udp` rules out).
    #[inline]
    fn of(generation: u64, ifindex: u32, flow: &crate::wire::Flow, frame: &[u8]) -> Option<Self> {
        let v4 = flow.group.is_ipv4();
        let addrs = if v4 {
            // Source and destination, adjacent in the IPv4 header.
            let at = flow.l3 + 12;
            let both: [u8; 8] = frame.get(at..at + 8)?.try_into().ok()?;
            [u128::from(u64::from_ne_bytes(both)), 0]
        } else {
            let at = flow.l3 + 8;
            let source: [u8; 16] = frame.get(at..at + 16)?.try_into().ok()?;
            let group: [u8; 16] = frame.get(at + 16..at + 32)?.try_into().ok()?;
            [u128::from_ne_bytes(source), u128::from_ne_bytes(group)]
        };
        Some(LookupKey {
            generation,
            ifindex,
            tci: flow.tci,
            port: flow.port,
            v4,
            addrs,
        })
    }
}

/// Datagrams whose fragments a worker follows at once (see `FragTable`).
const FRAG_SLOTS: usize = 4096;

/// How many received frames ahead of the one being forwarded the worker asks the CPU to
/// load (see `receive`).
const PREFETCH_AHEAD: usize = 4;

/// Asks the CPU to start loading the cache line a frame's headers are in.
#[inline(always)]
fn prefetch(frame: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it reads nothing the program sees and cannot fault,
    // whatever the address; SSE, which it needs, is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            frame.as_ptr().cast(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = frame;
}

/// Frames that did not fit a TX ring and wait for the next pass, at most.
pub(super) const WAITING_MAX: usize = 4 * BATCH;

/// How often a worker publishes its counters.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

impl<B: Backend> Worker<B> {
    pub fn new(id: usize, shared: Arc<Shared<B>>, ports: Vec<(usize, Port<B>)>) -> Self {
        let plan = shared.current_plan();
        let (port_ids, mut ports): (Vec<usize>, Vec<Port<B>>) = ports.into_iter().unzip();
        for p in &mut ports {
            p.fill_target = plan.fill_targets.get(p.domain).copied().unwrap_or(0);
        }
        let n = ports.len();
        let stats = DatapathStats::new(plan.table.rules.iter().map(|r| r.outputs.len()));
        let workers = shared.wakers.len();
        let mut w = Worker {
            id,
            shared,
            plan,
            ports,
            port_ids,
            caches: (0..MAX_DOMAINS).map(|_| None).collect(),
            stats,
            local_egress: Vec::new(),
            staged: vec![Vec::with_capacity(BATCH * 4); n],
            staged_tags: vec![Vec::with_capacity(BATCH * 4); n],
            to_wake: vec![false; workers],
            rx_buf: vec![B::Desc::default(); BATCH],
            batch_ms: None,
            comp_buf: vec![B::Desc::default(); RING_SIZE as usize],
            poll_fds: Vec::new(),
            take_buf: Vec::with_capacity(RING_SIZE as usize),
            desc_buf: Vec::with_capacity(RING_SIZE as usize),
            verdicts: Vec::new(),
            frags: FragTable::new(FRAG_SLOTS),
            rewrites: StreamRewrites::default(),
            capture: None,
            books: TagBooks::default(),
        };
        w.local_egress = w.map_egress();
        w.poll_fds = w.poll_set();
        w.shared.adopted[id].store(w.plan.generation, Ordering::Release);
        for i in 0..n {
            w.refill(i);
        }
        w
    }

    /// For each egress of the current plan, this worker's port for it, if it owns it.
    fn map_egress(&self) -> Vec<Option<usize>> {
        (0..self.plan.table.egress.len())
            .map(|e| {
                if self.plan.egress_owner[e] != Some(self.id) {
                    return None;
                }
                let port = self.plan.egress_port[e]?;
                self.port_ids.iter().position(|&g| g == port)
            })
            .collect()
    }

    /// Takes up a newer plan, and any sockets a reload opened for this worker.
    fn adopt(&mut self) {
        if self.shared.plan_gen.load(Ordering::Acquire) == self.plan.generation {
            return;
        }
        let plan = self.shared.current_plan();
        let new_ports = std::mem::take(
            &mut *self.shared.incoming[self.id]
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (id, port) in new_ports {
            self.port_ids.push(id);
            self.ports.push(port);
            self.staged.push(Vec::with_capacity(BATCH * 4));
            self.staged_tags.push(Vec::with_capacity(BATCH * 4));
        }
        // Retired under the old plan, whose generation the staged frames' tags carry, so their
        // drops are counted before the counters are re-shaped.
        let mut pi = 0;
        while pi < self.ports.len() {
            if plan.retire.contains(&self.port_ids[pi]) {
                self.retire(pi);
            } else {
                pi += 1;
            }
        }
        self.take_back_handed_to_retired(&plan.retire);
        let old = std::mem::replace(&mut self.plan, plan);
        self.stats = remap(&old, &self.stats, &self.plan);
        self.books.adopted(old, &self.plan, &mut self.stats);
        let plan = Arc::clone(&self.plan);
        for (port, id) in self.ports.iter_mut().zip(&self.port_ids) {
            port.ingress = plan.ingress_ports.contains(id);
            port.fill_target = plan.fill_targets.get(port.domain).copied().unwrap_or(0);
        }
        self.local_egress = self.map_egress();
        self.poll_fds = self.poll_set();
        self.publish();
        self.shared.adopted[self.id].store(self.plan.generation, Ordering::Release);
    }

    /// Frames this worker handed, under its old plan, to sockets that `retire` closes: their
    /// owner may have taken the new plan up and closed the socket first, and nobody would
    /// count them (the rule did, as received). Counted here, under the old plan like the
    /// owner's, as `interface_down`.
    fn take_back_handed_to_retired(&mut self, retire: &[usize]) {
        let shared = Arc::clone(&self.shared);
        for &id in retire {
            let Some(lane) = shared.lanes[id].get() else {
                continue;
            };
            // The socket's UMEM, as the old plan had it for the egress it transmitted for.
            let Some(dom) = self
                .plan
                .egress_port
                .iter()
                .position(|&p| p == Some(id))
                .map(|e| self.plan.egress_domain[e])
            else {
                continue;
            };
            while let Some((desc, tag)) = lane.pop() {
                if let Some(c) = self.counters(tag) {
                    c.interface_down += 1;
                }
                let f = self.frame_index(&desc);
                self.cache(dom).give(f);
            }
        }
    }

    /// Takes back what frames it can from a socket whose device is gone, and closes it. The
    /// kernel no longer touches its rings: what is left on the RX and completion rings is
    /// consumed as usual, and the fill and TX entries it never consumed are the last ones
    /// produced. Frames the kernel held anywhere else are lost with the device, and counted.
    fn retire(&mut self, pi: usize) {
        let id = self.port_ids.remove(pi);
        let mut port = self.ports.remove(pi);
        let dom = port.domain;
        release_stalled(&mut port, &self.shared);
        let staged = self.staged.remove(pi);
        let tags = self.staged_tags.remove(pi);
        let lane = self.shared.lanes[id].get();
        let handed: Vec<(B::Desc, Tag)> =
            std::iter::from_fn(|| lane.and_then(ArrayQueue::pop)).collect();
        for (desc, tag) in staged.into_iter().zip(tags).chain(handed) {
            if let Some(c) = self.counters(tag) {
                c.interface_down += 1;
            }
            let f = self.frame_index(&desc);
            self.cache(dom).give(f);
        }
        let before = port.in_fill + port.in_tx;
        loop {
            // SAFETY: as in `receive`: descriptors on the RX ring name frames the kernel has
            // handed back to us.
            let n = unsafe { port.rings.rx_consume(&mut self.rx_buf) };
            if n == 0 {
                break;
            }
            port.in_fill = port.in_fill.saturating_sub(n);
            for k in 0..n {
                let f = self.frame_index(&self.rx_buf[k]);
                self.cache(dom).give(f);
            }
        }
        let unfilled = port.rings.fill_held();
        let unfilled = unfilled.min(port.in_fill);
        for f in port.fill_log.last(unfilled) {
            self.cache(dom).give(f);
        }
        port.in_fill -= unfilled;
        loop {
            // SAFETY: the completion ring hands back frames the kernel has finished with.
            let n = unsafe { port.rings.comp_consume(&mut self.comp_buf) };
            if n == 0 {
                break;
            }
            port.in_tx = port.in_tx.saturating_sub(n);
            for k in 0..n {
                let f = self.frame_index(&self.comp_buf[k]);
                self.cache(dom).give(f);
            }
        }
        let unsent = port.rings.tx_held() as usize;
        let unsent = unsent.min(port.in_tx);
        for f in port.tx_log.last(unsent) {
            self.cache(dom).give(f);
        }
        port.in_tx -= unsent;
        let lost = port.in_fill + port.in_tx;
        self.shared.abandoned.fetch_add(lost, Ordering::AcqRel);
        log::info!(
            "{} queue {}: socket closed, its device is gone; {} frames taken back{}",
            port.name,
            port.queue,
            before - lost,
            if lost > 0 {
                format!(", {lost} lost with the device")
            } else {
                String::new()
            }
        );
    }

    /// One pass, for a caller that drives the worker itself (the in-memory loopback): a newer
    /// plan taken up first, as `run` does.
    pub fn pass(&mut self) -> bool {
        self.adopt();
        self.step() != Pass::Idle
    }

    /// This worker's counters, shaped by its plan.
    pub fn stats(&self) -> &DatapathStats {
        &self.stats
    }

    /// Its sockets, by global id.
    pub fn ports(&self) -> impl Iterator<Item = (usize, &Port<B>)> {
        self.port_ids.iter().copied().zip(&self.ports)
    }

    /// Runs until the data path is told to drain, then drains, and reports.
    pub fn run(mut self) -> WorkerReport<B> {
        let mut published = Instant::now();
        let mut passes = 0u32;
        while self.shared.phase.load(Ordering::Relaxed) == RUN {
            self.adopt();
            passes = passes.wrapping_add(1);
            let pass = self.step();
            if pass == Pass::Idle {
                if self.shared.busy_poll {
                    self.busy_wait();
                } else {
                    self.idle_wait();
                }
            } else if pass == Pass::Awaiting && !self.shared.busy_poll {
                // Nothing moved; only completions are awaited. In copy mode they come when
                // the egress's receive side, run in this CPU's softirq, frees the frames, and
                // once that work is deferred to ksoftirqd, a worker spinning here keeps it
                // off the CPU: the profile at 50 kpps 1->8 showed ksoftirqd waiting up to
                // 60 ms, every frame behind it late. Yielding lets it (and the receivers) run.
                self.stats.yields += 1;
                std::thread::yield_now();
            }
            // Readers (`relay stats`, the metrics endpoint) see counters at most this old; the
            // lock is taken ten times a second, never per packet. The clock is read every 64th
            // pass, and after each sleep: a busy-polling worker's profile had a clock read per
            // pass at 8% of its samples.
            let sleeps = pass == Pass::Idle && !self.shared.busy_poll;
            if (sleeps || passes.is_multiple_of(64)) && published.elapsed() >= PUBLISH_EVERY {
                self.publish();
                if B::REAL_LINKS {
                    self.check_links();
                }
                published = Instant::now();
            }
        }
        self.drain();
        self.drop_staged();
        for cache in self.caches.iter_mut().flatten() {
            cache.flush();
        }
        self.publish();
        WorkerReport {
            plan: self.plan,
            stats: self.stats,
            ports: self.ports,
        }
    }

    /// After the XDP program is detached: forward what is still in the RX rings, then, once
    /// every worker has done so (nobody hands out frames any more), wait, bounded, for every
    /// transmitted frame to complete.
    fn drain(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.receive_all() > 0 && Instant::now() < deadline {
            self.step();
        }
        self.shared.rx_done.fetch_add(1, Ordering::AcqRel);
        let workers = self.shared.wakers.len();
        while Instant::now() < deadline {
            self.step();
            let everyone_done = self.shared.rx_done.load(Ordering::Acquire) == workers;
            let lanes_empty = self
                .port_ids
                .iter()
                .all(|&g| self.shared.lanes[g].get().is_none_or(|l| l.is_empty()));
            let sent = self
                .ports
                .iter()
                .enumerate()
                .all(|(i, p)| p.dead || (p.in_tx == 0 && self.staged[i].is_empty()));
            if everyone_done && lanes_empty && sent {
                break;
            }
            std::thread::yield_now();
        }
    }

    /// Frames still staged when the drain ends were never put on a TX ring: they go back to the
    /// pool, counted as the ring's drops.
    fn drop_staged(&mut self) {
        for pi in 0..self.ports.len() {
            let dom = self.ports[pi].domain;
            let staged = std::mem::take(&mut self.staged[pi]);
            let tags = std::mem::take(&mut self.staged_tags[pi]);
            for (desc, tag) in staged.iter().zip(tags) {
                if let Some(c) = self.counters(tag) {
                    c.tx_ring_full += 1;
                }
                let f = self.frame_index(desc);
                self.cache(dom).give(f);
            }
        }
    }

    /// One pass over every ring this worker owns.
    fn step(&mut self) -> Pass {
        let mut moved = self.receive_all();
        for w in 0..self.to_wake.len() {
            if std::mem::take(&mut self.to_wake[w]) {
                self.shared.wakers[w].wake();
            }
        }
        for pi in 0..self.ports.len() {
            moved += self.collect_lane(pi);
        }
        for i in 0..self.ports.len() {
            moved += self.transmit(i);
        }
        for i in 0..self.ports.len() {
            moved += self.complete(i);
            if self.ports[i].ingress {
                self.refill(i);
            }
        }
        if moved > 0 {
            Pass::Moved
        } else if self.ports.iter().any(|p| p.in_tx > 0 && !p.dead) {
            Pass::Awaiting
        } else {
            Pass::Idle
        }
    }

    /// Notes which egress interfaces are down, so their frames are dropped and counted rather
    /// than left to fill a TX ring nothing drains. The link watcher keeps the state; this reads
    /// three atomics per port, no system call.
    fn check_links(&mut self) {
        for pi in 0..self.ports.len() {
            let sends = self.local_egress.contains(&Some(pi));
            let p = &mut self.ports[pi];
            let Some(link) = &p.link else { continue };
            // A socket is bound to an ifindex: an interface deleted and created again under
            // the same name is another device, which the main thread binds to with new
            // sockets (`watch_interfaces`).
            let mtu = link.mtu();
            if mtu > 0 {
                p.mtu = mtu;
            }
            let replaced = !link.present();
            let down = replaced || !link.up();
            if down != p.down {
                if replaced {
                    log::warn!(
                        "{}: this socket's interface was deleted; {}",
                        p.name,
                        if sends {
                            "its frames are dropped as interface_down"
                        } else {
                            "nothing arrives on it"
                        }
                    );
                } else if down && sends {
                    log::warn!(
                        "{}: link down; its outputs' frames are dropped (interface_down) until it is back",
                        p.name
                    );
                } else if down {
                    log::warn!(
                        "{}: link down; nothing arrives on it until it is back",
                        p.name
                    );
                } else {
                    log::info!(
                        "{}: link up; {}",
                        p.name,
                        if sends {
                            "transmitting again"
                        } else {
                            "receiving again"
                        }
                    );
                }
                p.down = down;
            }
        }
    }

    fn publish(&self) {
        let mut slot = self.shared.snapshots[self.id]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        slot.0 = self.plan.clone();
        slot.1.clone_from(&self.stats);
        drop(slot);
        // One getsockopt per socket per publication, never per packet.
        let mut sockets = self.shared.sockets[self.id]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        sockets.clear();
        for p in &self.ports {
            match p.rings.kernel_counters() {
                Some(Ok(st)) => sockets.push(SocketCounters::from_kernel(
                    &p.name, p.queue, p.ingress, &st,
                )),
                Some(Err(e)) => {
                    debug!("{} queue {}: reading XDP statistics: {e}", p.name, p.queue)
                }
                None => {}
            }
        }
    }

    fn receive_all(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.ports.len() {
            if self.ports[i].ingress {
                n += self.receive(i);
            }
        }
        n
    }

    fn idle_wait(&mut self) {
        let waker = &self.shared.wakers[self.id];
        waker.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let pending = self
            .port_ids
            .iter()
            .any(|&g| self.shared.lanes[g].get().is_some_and(|l| !l.is_empty()));
        let new_plan = self.shared.plan_gen.load(Ordering::Acquire) != self.plan.generation;
        let mut signalled = false;
        if !pending && !new_plan && self.shared.phase.load(Ordering::Relaxed) == RUN {
            let fds = &mut self.poll_fds;
            // SAFETY: `fds` is a valid array of initialised pollfd for the duration of the
            // call. EINTR (a stop signal) simply ends the wait.
            let ready =
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, IDLE_POLL_MS) };
            // The eventfd is the set's last entry.
            signalled = ready > 0 && fds.last().is_some_and(|f| f.revents & libc::POLLIN != 0);
        }
        waker.sleeping.store(false, Ordering::Relaxed);
        // Only when it was written: most wake-ups are frames arriving, and reading an empty
        // eventfd is a system call per wake-up for nothing. A write that came while the worker
        // did not poll is read after the next poll, which it ends at once.
        if signalled {
            waker.clear();
        }
    }

    /// `poll: busy`: an idle pass costs no sleep and no wake-up. Nobody writes this worker's
    /// eventfd (it never says it sleeps). On a zero-copy socket the kernel's receive runs in
    /// the driver's NAPI, which a non-blocking recvfrom drives when the socket prefers busy
    /// polling; copy-mode sockets are fed by the sender's CPU and need nothing.
    fn busy_wait(&mut self) {
        for fd in self
            .ports
            .iter()
            .filter(|p| p.ingress && !p.copy_mode)
            .filter_map(|p| p.rings.poll_fd())
        {
            // SAFETY: a zero-length, non-blocking receive into no buffer; the result is not
            // needed (AF_XDP returns no data through it), only the busy poll it triggers.
            unsafe {
                libc::recvfrom(
                    fd,
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }
        std::hint::spin_loop();
    }

    /// What an idle worker waits on: its ingress sockets and its eventfd. Built when its
    /// sockets change, not on every wait.
    fn poll_set(&self) -> Vec<libc::pollfd> {
        self.ports
            .iter()
            .filter(|p| p.ingress)
            .filter_map(|p| p.rings.poll_fd())
            .chain(std::iter::once(
                self.shared.wakers[self.id].event.as_raw_fd(),
            ))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect()
    }

    /// The frame cache in front of UMEM `d`'s pool.
    fn cache(&mut self, d: usize) -> &mut FrameCache {
        let shared = &self.shared;
        self.caches[d].get_or_insert_with(|| {
            FrameCache::new(shared.domain(d).pool.clone(), shared.cache_frames)
        })
    }

    fn frame_index(&self, desc: &B::Desc) -> u32 {
        self.shared.frame_of(B::addr(desc))
    }

    /// Consumes one batch from an ingress RX ring and sends every frame on its way.
    fn receive(&mut self, pi: usize) -> usize {
        // SAFETY: rx_buf descriptors are only written by the ring; the frames they then name
        // were handed to the kernel through the fill ring and are now ours.
        let n = unsafe { self.ports[pi].rings.rx_consume(&mut self.rx_buf) };
        self.ports[pi].in_fill -= n;
        if n == 0 {
            // A zero-copy driver sets the flag when it runs out of fill entries, which may be
            // long after we last produced; an empty receive is when to look (as xdpsock does).
            let port = &mut self.ports[pi];
            if port.rings.fill_needs_wakeup() {
                port.rings.fill_wakeup();
            }
            return 0;
        }
        let ifindex = self.ports[pi].ifindex;
        let dom = self.ports[pi].domain;
        // One reference count for the batch, not one per frame: the count is shared by every
        // worker, and touching it per frame would bounce its cache line between them.
        let plan = Arc::clone(&self.plan);
        let shared = Arc::clone(&self.shared);
        // Read once per batch, and only if a merged rule asks for it.
        self.batch_ms = None;
        // One relaxed load per batch while no capture runs; its frames are copied only while
        // one does.
        self.capture = shared.tap.current();
        // The frames were written by another CPU (the sender's, in copy mode; the NIC's DMA
        // in zero-copy): the first read of each headers line misses. Asking for a few frames
        // ahead lets those misses overlap the work on the frames before them, as a frame's
        // own path is too long for the CPU to reach the next frame's load by itself.
        let home = shared.domain(dom);
        for desc in &self.rx_buf[..n.min(PREFETCH_AHEAD)] {
            // SAFETY: the frame is ours (off the RX ring); only its address is taken.
            prefetch(unsafe { B::data(&home.umem, desc) });
        }
        for k in 0..n {
            if let Some(ahead) = self.rx_buf[..n].get(k + PREFETCH_AHEAD) {
                // SAFETY: as above.
                prefetch(unsafe { B::data(&home.umem, ahead) });
            }
            let desc = self.rx_buf[k];
            self.forward(&shared, &plan, ifindex, dom, desc);
        }
        self.capture = None;
        n
    }

    /// Milliseconds on the merge clock, read at most once per received batch (a batch is
    /// microseconds; windows are hundreds of milliseconds).
    fn merge_now(&mut self, shared: &Shared<B>) -> u64 {
        *self
            .batch_ms
            .get_or_insert_with(|| shared.epoch.elapsed().as_millis() as u64)
    }

    /// Sends one received frame (in UMEM `dom`) to each output of its rule: the received frame
    /// itself, rewritten in place, to the last output whose socket is on the same UMEM, and a
    /// copy to every other output, taken from the UMEM of its socket.
    fn forward(
        &mut self,
        shared: &Shared<B>,
        plan: &Plan,
        ifindex: u32,
        dom: usize,
        mut desc: B::Desc,
    ) {
        let frame_no = self.frame_index(&desc);
        let home = shared.domain(dom);
        // SAFETY: the frame came off the RX ring, so neither the kernel nor another descriptor
        // refers to it until we hand it on.
        let bytes = unsafe { B::data(&home.umem, &desc) };
        let len = bytes.len();
        let Some(flow) = classify_udp(bytes) else {
            self.stats.malformed += 1;
            self.cache(dom).give(frame_no);
            return;
        };
        let Some(rule_id) = self.find_rule(plan, ifindex, &flow, bytes) else {
            self.stats.unmatched += 1;
            self.cache(dom).give(frame_no);
            return;
        };
        if check_lengths(bytes, &flow).is_err() {
            self.stats.malformed += 1;
            self.cache(dom).give(frame_no);
            return;
        }
        // Read before the frame is borrowed mutably below.
        let expired = arrived_ttl(bytes, &flow) <= 1;
        // A merged rule's sequence number, from the UDP payload. A fragment carries none the
        // merge could trust (the later ones none at all).
        let merged = plan.table.rules[rule_id as usize].merge.as_ref();
        let sequence = merged.map(|m| {
            if flow.frag.is_some() {
                return Err(Unnumbered::Malformed);
            }
            let payload = bytes.get(flow.l4 + 4..flow.l4 + 6).and_then(|l| {
                bytes.get(flow.l4 + 8..flow.l4 + usize::from(u16::from_be_bytes([l[0], l[1]])))
            });
            m.sequence().read(payload.ok_or(Unnumbered::Malformed)?)
        });
        // Once per received frame, before any copy: every copy then starts from a full
        // checksum, which each output's incremental update keeps valid.
        // SAFETY: the frame came off the RX ring and no copy of it exists yet, so this is its
        // only user; `bytes` is not read again.
        // Not in fragments: the sender's stack completes the checksum before it fragments, and
        // a later fragment's data is no UDP header.
        let completed = flow.frag.is_none()
            && unsafe {
                complete_partial_udp_checksum(
                    B::data_mut(&home.umem, &mut desc).contents_mut(),
                    &flow,
                )
            };
        let rule = &plan.table.rules[rule_id as usize];
        if let Some(session) = &self.capture
            && session.filter.wants_received(rule, &plan.table)
        {
            // As received, before the merge or any rewrite (a checksum left for offload is
            // completed, as the wire would have carried it).
            // SAFETY: the frame is ours (off the RX ring) and nothing writes it here.
            let frame = unsafe { B::data(&home.umem, &desc) };
            if !session.offer(Direction::Inbound, ifindex, frame) {
                self.stats.capture_dropped += 1;
            }
        }
        let rc = &mut self.stats.rules[rule_id as usize];
        rc.packets += 1;
        rc.bytes += len as u64;
        rc.checksum_completed += u64::from(completed);
        if !rule.prefix.is_host() {
            rc.groups.record(flow.group, len as u64);
        }
        if let Some(merge) = &rule.merge {
            // First arrival wins: a sequence number another leg (or this one) brought within
            // the window is dropped here, before any copy or rewrite.
            // RTCP and packets of a stream the merge has left are no part of the merged
            // stream: counted, dropped.
            let numbered = match sequence {
                Some(Ok(n)) => n,
                Some(Err(Unnumbered::Rtcp)) => {
                    rc.merge.rtcp += 1;
                    self.cache(dom).give(frame_no);
                    return;
                }
                _ => {
                    rc.merge.malformed += 1;
                    self.cache(dom).give(frame_no);
                    return;
                }
            };
            let leg = rule.leg_of(ifindex, &flow);
            let now = self.merge_now(shared);
            let o = merge.offer_numbered(leg, numbered, now);
            let rc = &mut self.stats.rules[rule_id as usize];
            rc.merge.new_streams += u64::from(o.new_stream);
            if o.stale {
                rc.merge.stale += 1;
                self.cache(dom).give(frame_no);
                return;
            }
            rc.merge.holes_opened += o.holes_opened;
            rc.merge.holes_filled += u64::from(o.hole_filled);
            let lc = rc.merge.leg(leg);
            lc.received += 1;
            lc.gaps += o.leg_gaps;
            if o.first {
                lc.first += 1;
            } else {
                lc.duplicate += 1;
                self.cache(dom).give(frame_no);
                return;
            }
        }
        let tag = |output: usize| Tag {
            rule: rule_id,
            output: output as u16,
            plan: plan.generation as u16,
        };
        // What each output does with the frame, decided once, before any copy: what it
        // refuses (a frame at the end of its scope, a next hop not resolved yet) gets no copy,
        // and the last output on the frame's own UMEM gets the frame itself.
        let mut verdicts = std::mem::take(&mut self.verdicts);
        verdicts.clear();
        let mut last = None;
        for (oi, out) in rule.outputs.iter().enumerate() {
            let v = verdict(out, expired, plan.egress_domain[out.egress], flow.source);
            if v == Verdict::To(dom) {
                last = Some(oi);
            }
            verdicts.push(v);
        }

        // Only the per-output vector leaves the worker for the fan-out (which needs `self`
        // too), not the whole stream memo with its lookup key (about 100 bytes moved out and
        // back per frame).
        let mut by_output = std::mem::take(&mut self.rewrites.by_output);
        let mut rewrites = OutputRewrites {
            current: self.rewrites.current,
            by_output: &mut by_output,
        };
        for (oi, (out, &v)) in rule.outputs.iter().zip(&verdicts).enumerate() {
            if Some(oi) == last {
                continue;
            }
            let counters = &mut self.stats.rules[rule_id as usize].outputs[oi];
            let to = match v {
                Verdict::To(to) => to,
                // Nobody behind it listens: not a loss, so not counted as dropped.
                Verdict::NoListener => {
                    counters.no_listener += 1;
                    continue;
                }
                Verdict::Refused(e) => {
                    match e {
                        RewriteError::NoNeighbour => counters.no_neighbour += 1,
                        RewriteError::NoRouteVia => counters.no_route_via += 1,
                        RewriteError::NoSource => counters.no_source += 1,
                        _ => counters.ttl_expired += 1,
                    }
                    continue;
                }
                // Its device is gone and no new one has come yet: no copy for it.
                Verdict::Gone => {
                    counters.interface_down += 1;
                    continue;
                }
            };
            let Some(copy_no) = self.cache(to).take() else {
                self.stats.rules[rule_id as usize].outputs[oi].no_frame += 1;
                continue;
            };
            self.stats.copies += 1;
            if to != dom {
                self.stats.cross_umem += 1;
            }
            let away = shared.domain(to);
            let mut copy = away.frames[copy_no as usize];
            // SAFETY: `copy` is a free frame just taken from its pool, distinct from `desc`'s
            // frame (another frame, or another UMEM), and no ring holds it; `desc`'s frame is
            // only read here.
            let result = unsafe {
                let src = B::data(&home.umem, &desc);
                let mut dst = B::data_mut(&away.umem, &mut copy);
                dst.copy_from(src);
                rewrites.rewrite(oi, out, &flow, &mut dst)
            };
            self.settle(out.egress, to, copy, tag(oi), result);
        }

        self.verdicts = verdicts;
        let Some(last) = last else {
            self.rewrites.by_output = by_output;
            // Every output got a copy (or refused the frame): the received one goes back.
            self.cache(dom).give(frame_no);
            return;
        };
        let out = &rule.outputs[last];
        // SAFETY: the copies are done, so this is the frame's only user.
        let result =
            unsafe { rewrites.rewrite(last, out, &flow, &mut B::data_mut(&home.umem, &mut desc)) };
        self.rewrites.by_output = by_output;
        self.settle(out.egress, dom, desc, tag(last), result);
    }

    /// The rule of a frame: by the rule table, as the XDP program found it; for a later
    /// fragment, the rule its datagram's first fragment matched, which is remembered here.
    fn find_rule(
        &mut self,
        plan: &Plan,
        ifindex: u32,
        flow: &crate::wire::Flow,
        frame: &[u8],
    ) -> Option<u32> {
        let Some(frag) = flow.frag else {
            // A stream's frames come in runs, and a plan's table never changes: the frame
            // before this one may have been looked up already.
            let key = LookupKey::of(plan.generation, ifindex, flow, frame);
            return self
                .rewrites
                .rule_of(key, || plan.table.lookup(ifindex, flow));
        };
        self.rewrites.current = false;
        let key = crate::frag::key(ifindex, flow, frag);
        if flow.is_later_fragment() {
            return self.frags.get(&key, plan.generation);
        }
        let rule = plan.table.lookup(ifindex, flow)?;
        self.frags.insert(key, rule, plan.generation);
        Some(rule)
    }

    /// Sends a rewritten frame on its way, or, if the rewrite refused it, counts why and
    /// returns the frame to the pool.
    fn settle(
        &mut self,
        egress: usize,
        dom: usize,
        desc: B::Desc,
        tag: Tag,
        result: Result<(), RewriteError>,
    ) {
        match result {
            Ok(()) => self.dispatch(egress, dom, desc, tag),
            Err(e) => {
                self.count_rewrite_error(tag, e);
                let f = self.frame_index(&desc);
                self.cache(dom).give(f);
            }
        }
    }

    /// Stages a frame (in UMEM `dom`, the egress socket's) on this worker's socket for
    /// `egress`, or hands it to the owner's lane.
    fn dispatch(&mut self, egress: usize, dom: usize, desc: B::Desc, tag: Tag) {
        if self.capture.is_some() {
            self.capture_sent(egress, dom, &desc, tag);
        }
        if let Some(pi) = self.local_egress[egress] {
            self.staged[pi].push(desc);
            self.staged_tags[pi].push(tag);
            return;
        }
        let (Some(port), Some(owner)) = (
            self.plan.egress_port[egress],
            self.plan.egress_owner[egress],
        ) else {
            // Its device is gone and no new one has come yet.
            if let Some(c) = self.counters(tag) {
                c.interface_down += 1;
            }
            let f = self.frame_index(&desc);
            self.cache(dom).give(f);
            return;
        };
        match self.shared.lane(port).push((desc, tag)) {
            Ok(()) => self.to_wake[owner] = true,
            Err((desc, tag)) => {
                if let Some(c) = self.counters(tag) {
                    c.handoff_full += 1;
                }
                let f = self.frame_index(&desc);
                self.cache(dom).give(f);
            }
        }
    }

    /// Offers a rewritten frame, as it is handed to its egress, to the running capture.
    fn capture_sent(&mut self, egress: usize, dom: usize, desc: &B::Desc, tag: Tag) {
        let Some(session) = &self.capture else {
            return;
        };
        let table = &self.plan.table;
        let (Some(rule), Some(eg)) = (table.rules.get(tag.rule as usize), table.egress.get(egress))
        else {
            return;
        };
        if !session.filter.wants_sent(rule, &eg.name) {
            return;
        }
        // SAFETY: the frame is ours (rewritten, not yet staged or handed over) and nothing
        // writes it here.
        let frame = unsafe { B::data(&self.shared.domain(dom).umem, desc) };
        if !session.offer(Direction::Outbound, eg.info.ifindex, frame) {
            self.stats.capture_dropped += 1;
        }
    }

    /// The counters a tag names, if it was made under the plan this worker counts by.
    fn counters(&mut self, tag: Tag) -> Option<&mut OutputCounters> {
        self.books.counters(&mut self.stats, &self.plan, tag)
    }

    fn count_rewrite_error(&mut self, tag: Tag, e: RewriteError) {
        let Some(c) = self.counters(tag) else {
            return;
        };
        match e {
            RewriteError::TtlExpired => c.ttl_expired += 1,
            RewriteError::Malformed => c.malformed += 1,
            RewriteError::TooLarge => c.too_large += 1,
            RewriteError::NoNeighbour => c.no_neighbour += 1,
            RewriteError::NoRouteVia => c.no_route_via += 1,
            RewriteError::NoSource => c.no_source += 1,
            RewriteError::ZeroChecksumFragment => c.zero_checksum_fragment += 1,
        }
    }

    /// Moves frames other workers queued for port `pi` onto its staging list.
    fn collect_lane(&mut self, pi: usize) -> usize {
        let Some(lane) = self.shared.lanes[self.port_ids[pi]].get() else {
            return 0;
        };
        let room = (RING_SIZE as usize).saturating_sub(self.staged[pi].len());
        let mut n = 0;
        while n < room {
            let Some((desc, tag)) = lane.pop() else {
                break;
            };
            self.staged[pi].push(desc);
            self.staged_tags[pi].push(tag);
            n += 1;
        }
        n
    }

    /// Puts staged frames on a port's TX ring and kicks the kernel.
    fn transmit(&mut self, pi: usize) -> usize {
        let dom = self.ports[pi].domain;
        let mut staged = std::mem::take(&mut self.staged[pi]);
        let mut tags = std::mem::take(&mut self.staged_tags[pi]);
        let mut sent = 0;
        if !staged.is_empty() && (self.ports[pi].down || self.ports[pi].dead) {
            for (desc, tag) in staged.iter().zip(&tags) {
                if let Some(oc) = self.counters(*tag) {
                    oc.interface_down += 1;
                }
                let f = self.frame_index(desc);
                self.cache(dom).give(f);
            }
            staged.clear();
            tags.clear();
        } else if !staged.is_empty() {
            // Frames too large for the interface's MTU now are dropped here, where the MTU is
            // current: the kernel would refuse them anyway.
            // Frames that waited from the last pass were checked then.
            let mtu = self.ports[pi].mtu;
            let checked = self.ports[pi].waiting.min(staged.len());
            let mut kept = checked;
            for k in checked..staged.len() {
                // A frame whose whole length fits needs no look at its headers.
                let fits = B::len(&staged[k]) <= mtu as usize + crate::wire::ETH_HLEN
                    || ip_len::<B>(self.shared.domain(dom), &staged[k]) <= mtu;
                if fits {
                    staged[kept] = staged[k];
                    tags[kept] = tags[k];
                    kept += 1;
                } else {
                    if let Some(oc) = self.counters(tags[k]) {
                        oc.too_large += 1;
                    }
                    let f = self.frame_index(&staged[k]);
                    self.cache(dom).give(f);
                }
            }
            staged.truncate(kept);
            tags.truncate(kept);
            let port = &mut self.ports[pi];
            // The ring takes a batch whole or not at all, so offer what fits; and while the
            // device gives nothing back, no more than the socket's hold: one that stopped
            // taking frames keeps its share of the UMEM and no more, while a burst to one that
            // drains may still fill its ring.
            let domain = self.shared.domain(dom);
            let hold = if port.draining {
                usize::MAX
            } else {
                let together = domain.stalled.load(Ordering::Relaxed);
                let limit = self.shared.tx_hold;
                limit
                    .saturating_sub(port.in_tx)
                    .min(limit.saturating_sub(together))
            };
            let room = (port.rings.tx_free(staged.len() as u32) as usize)
                .min(staged.len())
                .min(hold);
            // SAFETY: every staged frame is ours (off an RX ring, out of the pool, or handed
            // over through a lane) and is on no ring.
            sent = unsafe { port.rings.tx_produce(&staged[..room]) };
            port.in_tx += sent;
            if !port.draining && sent > 0 {
                domain.stalled.fetch_add(sent, Ordering::Relaxed);
                port.stalled += sent;
            }
            // A port's frames come in runs of one output's (a rule's fan-out stages one frame
            // per port): its counters are found once per run, not per frame.
            let mut run: Option<(Tag, u64, u64)> = None;
            for (desc, tag) in staged[..sent].iter().zip(&tags[..sent]) {
                port.tx_log.record(self.shared.frame_of(B::addr(desc)));
                let len = B::len(desc) as u64;
                match &mut run {
                    Some((t, packets, bytes)) if t == tag => {
                        *packets += 1;
                        *bytes += len;
                    }
                    _ => {
                        if let Some(done) = run.replace((*tag, 1, len)) {
                            count_sent(&mut self.books, &mut self.stats, &self.plan, done);
                        }
                    }
                }
            }
            if let Some(done) = run {
                count_sent(&mut self.books, &mut self.stats, &self.plan, done);
            }
            // What did not fit waits for the next pass, a few batches at most: beyond that the
            // egress is not keeping up and the newest frames are dropped, rather than moved
            // and checked again on every pass.
            let keep = sent + (staged.len() - sent).min(self.shared.waiting_max);
            for (desc, tag) in staged[keep..].iter().zip(&tags[keep..]) {
                if let Some(oc) = self.counters(*tag) {
                    oc.tx_ring_full += 1;
                }
                let f = self.frame_index(desc);
                self.cache(dom).give(f);
            }
            staged.truncate(keep);
            tags.truncate(keep);
            staged.drain(..sent);
            tags.drain(..sent);
        }
        self.ports[pi].waiting = staged.len();
        // Hand the buffers back so their capacity is reused (with what waits for room).
        self.staged[pi] = staged;
        self.staged_tags[pi] = tags;
        self.kick(pi);
        sent
    }

    /// Has the kernel transmit what is on a port's TX ring. Copy mode transmits only inside
    /// sendto(), at most a batch (32 frames) per call, and says "more" with EAGAIN, which
    /// the socket layer swallows: so kick while the ring still holds descriptors the kernel
    /// has not taken, and stop when a kick takes none (the device is busy; the next pass
    /// tries again). Frames that were sent but not yet completed need no kick: their
    /// completions come when the kernel frees them. Zero-copy drivers say when they need
    /// one.
    fn kick(&mut self, pi: usize) {
        let port = &mut self.ports[pi];
        if port.in_tx == 0 || port.dead {
            return;
        }
        let kicks = if port.copy_mode {
            let mut unsent = port.rings.tx_held();
            let mut kicks = 0;
            // Bounded: a whole ring is RING_SIZE / 32 batches.
            while unsent > 0 && kicks <= RING_SIZE / 32 {
                kicks += 1;
                if let Err(e) = port.rings.tx_wakeup() {
                    Self::wakeup_failed(port, e);
                    break;
                }
                let left = port.rings.tx_held();
                if left >= unsent {
                    break;
                }
                unsent = left;
            }
            kicks
        } else if port.rings.tx_needs_wakeup() {
            if let Err(e) = port.rings.tx_wakeup() {
                Self::wakeup_failed(port, e);
            }
            1
        } else {
            0
        };
        self.stats.kicks += u64::from(kicks);
    }

    fn wakeup_failed(port: &mut Port<B>, e: std::io::Error) {
        if e.raw_os_error() == Some(libc::ENXIO) {
            log::warn!(
                "{}: the kernel no longer transmits on this socket (its device was unregistered); its frames are dropped as interface_down",
                port.name
            );
            port.dead = true;
        } else {
            debug!("{}: TX wakeup: {e}", port.name);
        }
    }

    /// Returns completed TX frames to the pool (through this worker's cache).
    fn complete(&mut self, pi: usize) -> usize {
        let port = &mut self.ports[pi];
        if port.in_tx == 0 {
            port.draining = true;
            release_stalled(port, &self.shared);
            return 0;
        }
        // A buffer of RING_SIZE descriptors made once: consume() overwrites what it fills, so
        // nothing needs resetting between passes.
        let want = port.in_tx.min(self.comp_buf.len());
        // SAFETY: the completion ring hands back frames the kernel has finished sending.
        let n = unsafe { port.rings.comp_consume(&mut self.comp_buf[..want]) };
        port.in_tx -= n;
        let draining = n > 0 || port.in_tx == 0;
        let dom = port.domain;
        let shared = &self.shared;
        if draining {
            release_stalled(port, shared);
        } else if port.draining {
            // It stopped draining: what it has in flight now counts against the UMEM's hold.
            shared
                .domain(dom)
                .stalled
                .fetch_add(port.in_tx, Ordering::Relaxed);
            port.stalled += port.in_tx;
        }
        port.draining = draining;
        let cache = self.caches[dom].get_or_insert_with(|| {
            FrameCache::new(shared.domain(dom).pool.clone(), shared.cache_frames)
        });
        for desc in &self.comp_buf[..n] {
            cache.give(shared.frame_of(B::addr(desc)));
        }
        n
    }

    /// Tops an ingress port's fill ring up to its target.
    fn refill(&mut self, pi: usize) {
        let port = &mut self.ports[pi];
        if !port.ingress || port.in_fill >= port.fill_target {
            return;
        }
        let want = port.fill_target - port.in_fill;
        let want = want.min(port.rings.fill_free(want as u32) as usize);
        if want == 0 {
            return;
        }
        let dom = port.domain;
        self.take_buf.clear();
        let shared = &self.shared;
        let cache = self.caches[dom].get_or_insert_with(|| {
            FrameCache::new(shared.domain(dom).pool.clone(), shared.cache_frames)
        });
        cache.take_batch(&mut self.take_buf, want);
        let frames = &shared.domain(dom).frames;
        self.desc_buf.clear();
        self.desc_buf
            .extend(self.take_buf.iter().map(|&f| frames[f as usize]));
        let port = &mut self.ports[pi];
        // SAFETY: the frames came from the pool, so nothing else refers to them.
        let produced = unsafe { port.rings.fill_produce(&self.desc_buf) };
        port.in_fill += produced;
        for &f in &self.take_buf[..produced] {
            port.fill_log.record(f);
        }
        // The fill ring is ours alone and had room for `want`, so this is empty.
        cache.give_batch(&self.take_buf[produced..]);
        if port.rings.fill_needs_wakeup() {
            port.rings.fill_wakeup();
        }
    }
}

/// Takes back what a socket that drains again (or is retired) counted against its UMEM's
/// stalled total. Called on every pass of a draining socket, so it looks at the UMEM only
/// when there is something to take back.
#[inline]
fn release_stalled<B: Backend>(port: &mut Port<B>, shared: &Shared<B>) {
    if port.stalled > 0 {
        shared
            .domain(port.domain)
            .stalled
            .fetch_sub(port.stalled, Ordering::Relaxed);
        port.stalled = 0;
    }
}

/// Counts a run of `packets` frames of `bytes` sent for the output `tag` names.
#[inline]
fn count_sent(
    books: &mut TagBooks,
    stats: &mut DatapathStats,
    plan: &Plan,
    (tag, packets, bytes): (Tag, u64, u64),
) {
    if let Some(oc) = books.counters(stats, plan, tag) {
        oc.packets += packets;
        oc.bytes += bytes;
    }
}

/// Rewrites a frame in its UMEM frame for one output: its VLAN tag first, which may move
/// everything after the MAC addresses by the 4 bytes of a tag and so change the frame's length
/// and header offsets, then MACs, group, port, TTL and checksums at the new offsets (only the
/// IP header's in a later fragment).
fn rewrite_frame(
    data: &mut impl FrameMut,
    flow: &crate::wire::Flow,
    action: &crate::rewrite::OutputAction,
) -> Result<(), RewriteError> {
    if flow.tci.is_none() && action.vlan.is_none() {
        return rewrite_packet(data.contents_mut(), flow, action);
    }
    let len = data.contents().len();
    let grows = flow.tci.is_none();
    if grows {
        // The data segment runs to the end of the UMEM frame; the cursor's position is the
        // frame's length, so moving it past the data lends the tag's 4 bytes.
        if data.capacity() < len + crate::wire::VLAN_HLEN {
            return Err(RewriteError::TooLarge);
        }
        data.set_len(len + crate::wire::VLAN_HLEN);
    }
    let (new_len, flow) = retag(data.contents_mut(), len, flow, action.vlan)?;
    data.set_len(new_len);
    rewrite_packet(data.contents_mut(), &flow, action)
}

/// The worker's last looked-up stream: the rule it matched, and the rewrite of each output of
/// that rule, worked out at the stream's first frame and reused by the rest of its run (see
/// [`Prepared`]). One type, so the rewrites cannot outlive the lookup they belong to.
#[derive(Default)]
struct StreamRewrites {
    /// The stream's key and the rule it found, if any.
    last: Option<(LookupKey, Option<u32>)>,
    /// The frame being forwarded is of that stream.
    current: bool,
    /// By output; `None` until the output's first frame of the stream.
    by_output: Vec<Option<Ready>>,
}

/// An output's rewrite for the current stream.
#[derive(Debug, Clone, Copy)]
enum Ready {
    /// Applied as it is.
    Group(Prepared),
    /// Applied with the next hop's MAC of the moment written in: a unicast output's next hop
    /// can change in mid-stream. Its own variant, so a group output's frames never look at a
    /// neighbour slot (a load per output per frame, 2 ns each at 1->8).
    Unicast(Prepared),
    /// Every frame of the stream is refused, for this reason.
    Refused(RewriteError),
}

impl StreamRewrites {
    /// The rule of a frame of stream `key`: the last one found if it is the same stream, else
    /// `lookup`'s, which starts a stream with no rewrite prepared. A frame with no key (its
    /// stream cannot be told) is looked up and leaves no stream current.
    #[inline(always)]
    fn rule_of(
        &mut self,
        key: Option<LookupKey>,
        lookup: impl FnOnce() -> Option<u32>,
    ) -> Option<u32> {
        let Some(key) = key else {
            self.current = false;
            return lookup();
        };
        self.current = true;
        if let Some((last, rule)) = &self.last
            && *last == key
        {
            return *rule;
        }
        let rule = lookup();
        self.last = Some((key, rule));
        self.by_output.clear();
        rule
    }
}

/// The current stream's per-output rewrites, borrowed from [`StreamRewrites`] for one
/// frame's fan-out.
struct OutputRewrites<'a> {
    /// The frame is of the memo's stream.
    current: bool,
    by_output: &'a mut Vec<Option<Ready>>,
}

impl OutputRewrites<'_> {
    /// Rewrites a frame for output `oi` of its rule: with the output's rewrite prepared for
    /// the frame's stream, worked out now if this is the stream's first frame on that output;
    /// from scratch where a frame's rewrite cannot be prepared: a VLAN tag to add, change or
    /// remove (which moves the headers), a fragment.
    #[inline(always)]
    fn rewrite(
        &mut self,
        oi: usize,
        out: &crate::rules::CompiledOutput,
        flow: &crate::wire::Flow,
        data: &mut impl FrameMut,
    ) -> Result<(), RewriteError> {
        if self.current && flow.tci.is_none() {
            // Entries exist only for outputs that can have one, and go with the stream. The
            // two arms here repeat the ones below on purpose: one `Ready::apply` for both
            // paths (a refused stream's entry checked in the fast path too) measured 16 ns
            // slower at 1->8 in the in-memory bench (265 -> 282).
            match self.by_output.get(oi) {
                Some(Some(Ready::Group(p))) => return p.apply(data.contents_mut(), flow),
                Some(Some(Ready::Unicast(p))) => {
                    return to_next_hop(p, out, flow, data.contents_mut());
                }
                _ => {}
            }
        }
        match self.prepare(oi, out, flow) {
            Some(Ready::Group(p)) => p.apply(data.contents_mut(), flow),
            Some(Ready::Unicast(p)) => to_next_hop(&p, out, flow, data.contents_mut()),
            Some(Ready::Refused(e)) => Err(e),
            None => rewrite_frame(data, flow, &resolved_action(out)),
        }
    }

    /// Output `oi`'s rewrite for the current stream, worked out at its first frame (out of
    /// line, so the common path stays a few instructions); `None` where a frame's rewrite
    /// cannot be prepared.
    #[cold]
    #[inline(never)]
    fn prepare(
        &mut self,
        oi: usize,
        out: &crate::rules::CompiledOutput,
        flow: &crate::wire::Flow,
    ) -> Option<Ready> {
        let preparable =
            self.current && flow.frag.is_none() && flow.tci.is_none() && out.action.vlan.is_none();
        if !preparable {
            return None;
        }
        if self.by_output.len() <= oi {
            self.by_output.resize(oi + 1, None);
        }
        Some(*self.by_output[oi].get_or_insert_with(|| {
            let prepared = match out.next_hop {
                // The MAC is written per frame (`to_next_hop`); everything else is the
                // stream's.
                Some(_) => Prepared::new(
                    flow,
                    &OutputAction {
                        next_hop_mac: Some([0; 6]),
                        ..out.action
                    },
                ),
                None => Prepared::new(flow, &out.action),
            };
            match prepared {
                Ok(p) if out.next_hop.is_some() => Ready::Unicast(p),
                Ok(p) => Ready::Group(p),
                Err(e) => Ready::Refused(e),
            }
        }))
    }
}

/// Applies a unicast output's prepared rewrite to a frame, with the next hop's MAC as its
/// neighbour slot has it now (refused, the frame untouched, if it has none since the verdict
/// looked).
#[inline]
fn to_next_hop(
    p: &Prepared,
    out: &crate::rules::CompiledOutput,
    flow: &crate::wire::Flow,
    frame: &mut [u8],
) -> Result<(), RewriteError> {
    let mac = out
        .next_hop
        .as_ref()
        .map_or(Err(RewriteError::NoNeighbour), |slot| slot.usable())?;
    p.apply(frame, flow)?;
    frame[..6].copy_from_slice(&mac);
    Ok(())
}

/// `out`'s action as this frame needs it: a unicast output's with its next hop's MAC of the
/// moment (read once per frame from the slot the neighbour tracker writes).
fn resolved_action(out: &crate::rules::CompiledOutput) -> std::borrow::Cow<'_, OutputAction> {
    match &out.next_hop {
        Some(slot) => std::borrow::Cow::Owned(OutputAction {
            next_hop_mac: slot.mac(),
            ..out.action
        }),
        None => std::borrow::Cow::Borrowed(&out.action),
    }
}

/// What one output of a frame's rule does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// It sends it, from a frame of this UMEM (its socket's).
    To(usize),
    /// An on-demand output with no listener now.
    NoListener,
    /// It will not take it (see [`verdict`]).
    Refused(RewriteError),
    /// Its device is gone.
    Gone,
}

/// What `out` does with a frame from `source`, known before any copy is made, its socket being
/// on UMEM `to`: nothing if nobody listens to that source; it refuses the frame if the frame arrived at the end of
/// its scope (`expired`) and the output does not set the TTL, if `source: auto` has no address
/// to write, or if its unicast next hop has no MAC yet (with its device gone the next hop is
/// gone too: then the device is the news).
fn verdict(
    out: &crate::rules::CompiledOutput,
    expired: bool,
    to: usize,
    source: std::net::IpAddr,
) -> Verdict {
    let a = &out.action;
    if out.unwanted_from(source) {
        Verdict::NoListener
    } else if expired && a.ttl.is_none() {
        Verdict::Refused(RewriteError::TtlExpired)
    } else if a.source_spec.is_some() && a.source.is_none() {
        Verdict::Refused(RewriteError::NoSource)
    } else if to == NO_DOMAIN {
        Verdict::Gone
    } else if let Some(Err(e)) = out.next_hop.as_ref().map(|s| s.usable()) {
        Verdict::Refused(e)
    } else {
        Verdict::To(to)
    }
}

/// The TTL (IPv4) or hop limit (IPv6) a frame arrived with; 0 if the frame is too short to
/// hold one, which `classify` has already ruled out.
fn arrived_ttl(frame: &[u8], flow: &crate::wire::Flow) -> u8 {
    let at = flow.l3 + if flow.group.is_ipv4() { 8 } else { 7 };
    frame.get(at).copied().unwrap_or(0)
}

/// The length of the IP packet in a frame: what must fit the egress MTU. A VLAN tag the output
/// sends with does not count.
fn ip_len<B: Backend>(domain: &Domain<B>, desc: &B::Desc) -> u32 {
    // SAFETY: the frame is staged, so it is ours and only read here.
    let data = unsafe { B::data(&domain.umem, desc) };
    let tagged = data
        .get(12..14)
        .is_some_and(|t| t == [0x81, 0x00] || t == [0x88, 0xa8]);
    data.len().saturating_sub(if tagged { 18 } else { 14 }) as u32
}

/// Re-shapes counters kept under `old` to `new`: a rule keeps its counters if the new table
/// has a rule of the same name, and an output its counters if it is the same interface (by
/// name: counters belong to the rule's output, not to a device, which may be created again)
/// with the same rewrite at the same position. Linear in the rules: workers run it at every
/// reload, between two passes.
pub(super) fn remap(old: &Plan, stats: &DatapathStats, new: &Plan) -> DatapathStats {
    if old.generation == new.generation {
        return stats.clone();
    }
    let mut out = DatapathStats::new(new.table.rules.iter().map(|r| r.outputs.len()));
    out.unmatched = stats.unmatched;
    out.malformed = stats.malformed;
    out.copies = stats.copies;
    out.cross_umem = stats.cross_umem;
    out.capture_dropped = stats.capture_dropped;
    out.kicks = stats.kicks;
    out.yields = stats.yields;
    let by_name: rustc_hash::FxHashMap<&str, usize> = old
        .table
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.as_str(), i))
        .collect();
    for (ni, nr) in new.table.rules.iter().enumerate() {
        let Some(&oi) = by_name.get(nr.name.as_str()) else {
            continue;
        };
        let (or, oc) = (&old.table.rules[oi], &stats.rules[oi]);
        out.rules[ni].packets = oc.packets;
        out.rules[ni].bytes = oc.bytes;
        out.rules[ni].checksum_completed = oc.checksum_completed;
        // A merged rule that stays keeps its state (`RuleTable::keep_merge_state`), and so
        // its counters.
        if or.merge == nr.merge {
            out.rules[ni].merge = oc.merge.clone();
        }
        if or.prefix == nr.prefix {
            out.rules[ni].groups = oc.groups.clone();
        }
        for k in 0..nr.outputs.len() {
            if carries_output(old, oi, new, ni, k) {
                out.rules[ni].outputs[k] = oc.outputs[k];
            }
        }
    }
    out
}
