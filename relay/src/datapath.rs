//! The AF_XDP data path: one UMEM shared by every socket, a socket per ingress rx queue and per
//! egress interface, and the loop that receives, rewrites in place and transmits.
//!
//! Frame ownership: a frame is in exactly one of four places at any time — the pool, the
//! kernel's fill/RX rings of an ingress socket (`in_fill`), the TX/completion rings of an
//! egress socket (`in_tx`), or in the hands of [`Datapath::run`] between a ring and the next.
//! The last is empty whenever the loop is between steps, so at shutdown
//! `pool.free + in_fill + in_tx == frames` must hold, and the relay says so.

use std::{
    io::Write,
    num::NonZeroU32,
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use log::{debug, error, info, warn};
use xsk_rs::{
    CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem,
    config::{
        BindFlags, FrameSize, LibxdpFlags, QueueSize, SocketConfig, SocketConfigBuilder, UmemConfig,
    },
};

use crate::{
    config::BindMode,
    pool::FramePool,
    rewrite::{RewriteError, rewrite},
    rules::RuleTable,
    wire::classify,
};

/// Ring sizes. The fill ring of an ingress socket is kept at most this full.
const RING_SIZE: u32 = 2048;
/// Frames handled per ring operation.
const BATCH: usize = 64;
/// How long an idle loop sleeps in poll() before it checks for a stop request.
const IDLE_POLL_MS: i32 = 100;
/// How long shutdown waits for transmitted frames to complete.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

/// Counters of one output of one rule.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutputCounters {
    pub packets: u64,
    pub bytes: u64,
    pub ttl_expired: u64,
    pub no_frame: u64,
    pub tx_ring_full: u64,
    pub malformed: u64,
}

impl OutputCounters {
    pub fn dropped(&self) -> u64 {
        self.ttl_expired + self.no_frame + self.tx_ring_full + self.malformed
    }
}

/// Counters of one rule.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RuleCounters {
    pub packets: u64,
    pub bytes: u64,
    pub outputs: Vec<OutputCounters>,
}

/// Everything the data path counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DatapathStats {
    pub rules: Vec<RuleCounters>,
    /// Redirected frames that matched no rule in userspace (a map/table mismatch).
    pub unmatched: u64,
    /// Redirected frames that are not multicast IPv4 UDP after all.
    pub malformed: u64,
}

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

/// One AF_XDP socket, bound to one (interface, queue).
struct Port {
    name: String,
    ifindex: u32,
    queue: u32,
    ingress: bool,
    copy_mode: bool,
    tx: TxQueue,
    rx: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    in_fill: usize,
    in_tx: usize,
    fill_target: usize,
}

/// A frame waiting to go onto an egress TX ring, and whose counters it moves.
#[derive(Clone, Copy)]
struct Tag {
    rule: u32,
    output: u16,
}

pub struct Datapath {
    umem: Umem,
    /// The descriptor `Umem::new` made for each frame, indexed by frame number.
    frames: Vec<FrameDesc>,
    frame_size: usize,
    pool: Arc<dyn FramePool>,
    ports: Vec<Port>,
    /// For each egress of the rule table, the port it transmits on.
    egress_port: Vec<usize>,
    table: RuleTable,
    stats: DatapathStats,
    // Scratch space reused by every loop iteration, so the loop does not allocate.
    staged: Vec<Vec<FrameDesc>>,
    staged_tags: Vec<Vec<Tag>>,
    rx_buf: Vec<FrameDesc>,
    free_buf: Vec<u32>,
    take_buf: Vec<u32>,
    desc_buf: Vec<FrameDesc>,
}

/// Where each ingress socket must go in the XSKMAP: (ingress slot, queue, socket fd).
pub type XskBinding = (usize, u32, RawFd);

impl Datapath {
    /// Creates the UMEM and every socket. The XDP program is not involved yet: the caller puts
    /// the returned bindings into the XSKMAP.
    pub fn new(
        table: RuleTable,
        frames: u32,
        frame_size: u32,
        bind: BindMode,
        pool: Arc<dyn FramePool>,
    ) -> Result<(Self, Vec<XskBinding>)> {
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

        let mut ports = Vec::with_capacity(wanted.len());
        let mut bindings = Vec::new();
        for (name, ifindex, queue, ingress) in wanted {
            let first = ports.is_empty();
            let (tx, rx, fq, cq, copy_mode) = open_socket(&umem, &name, queue, bind, first)?;
            info!(
                "{name} queue {queue}: AF_XDP socket bound in {} mode{}",
                if copy_mode { "copy" } else { "zero-copy" },
                if ingress { " (ingress)" } else { " (egress)" }
            );
            if ingress {
                let slot = table
                    .ingress
                    .iter()
                    .position(|i| i.info.ifindex == ifindex)
                    .expect("ingress came from the table");
                bindings.push((slot, queue, rx.fd().as_raw_fd()));
            }
            ports.push(Port {
                name,
                ifindex,
                queue,
                ingress,
                copy_mode,
                tx,
                rx,
                fq,
                cq,
                in_fill: 0,
                in_tx: 0,
                fill_target,
            });
        }
        let egress_port = table
            .egress
            .iter()
            .map(|e| {
                ports
                    .iter()
                    .position(|p| p.name == e.name && p.queue == 0)
                    .expect("a socket was opened for every egress")
            })
            .collect();
        let stats = DatapathStats {
            rules: table
                .rules
                .iter()
                .map(|r| RuleCounters {
                    outputs: vec![OutputCounters::default(); r.outputs.len()],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let n = ports.len();
        let mut dp = Datapath {
            umem,
            frames: descs,
            frame_size: frame_size as usize,
            pool,
            ports,
            egress_port,
            table,
            stats,
            staged: vec![Vec::with_capacity(BATCH * 4); n],
            staged_tags: vec![Vec::with_capacity(BATCH * 4); n],
            rx_buf: vec![FrameDesc::default(); BATCH],
            free_buf: Vec::with_capacity(BATCH * 4),
            take_buf: Vec::with_capacity(RING_SIZE as usize),
            desc_buf: Vec::with_capacity(RING_SIZE as usize),
        };
        for i in 0..n {
            dp.refill(i);
        }
        Ok((dp, bindings))
    }

    /// Runs until `stop` is set, then drains what is in flight.
    pub fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let busy = self.step();
            if !busy {
                self.wait_for_rx();
            }
        }
    }

    /// One pass over every ring; true if anything moved.
    fn step(&mut self) -> bool {
        let mut moved = 0;
        for i in 0..self.ports.len() {
            if self.ports[i].ingress {
                moved += self.receive(i);
            }
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
        moved > 0 || self.ports.iter().any(|p| p.in_tx > 0)
    }

    /// After the XDP program is detached: forwards what is still in the RX rings and waits,
    /// bounded, for every transmitted frame to complete.
    pub fn drain(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while Instant::now() < deadline {
            self.step();
            if self.ports.iter().all(|p| p.in_tx == 0) {
                break;
            }
            std::thread::yield_now();
        }
    }

    fn wait_for_rx(&mut self) {
        let mut fds: Vec<libc::pollfd> = self
            .ports
            .iter()
            .filter(|p| p.ingress)
            .map(|p| libc::pollfd {
                fd: p.rx.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of initialised pollfd for the duration of the call.
        // EINTR (a stop signal) simply ends the wait.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, IDLE_POLL_MS) };
    }

    fn frame_index(&self, desc: &FrameDesc) -> u32 {
        (desc.addr() / self.frame_size) as u32
    }

    /// Consumes one batch from an ingress RX ring and stages every frame on its outputs.
    fn receive(&mut self, pi: usize) -> usize {
        // SAFETY: rx_buf descriptors are only written by the ring; the frames they then name
        // were handed to the kernel through the fill ring and are now ours.
        let n = unsafe { self.ports[pi].rx.consume(&mut self.rx_buf) };
        self.ports[pi].in_fill -= n;
        let ifindex = self.ports[pi].ifindex;
        for k in 0..n {
            let desc = self.rx_buf[k];
            self.forward(ifindex, desc);
        }
        if !self.free_buf.is_empty() {
            self.pool.give_batch(&self.free_buf);
            self.free_buf.clear();
        }
        n
    }

    /// Sends one received frame to each output of its rule: copies for all outputs but the
    /// last, then the received frame itself, rewritten in place, for the last.
    fn forward(&mut self, ifindex: u32, mut desc: FrameDesc) {
        let frame_no = self.frame_index(&desc);
        // SAFETY: the frame came off the RX ring, so neither the kernel nor another descriptor
        // refers to it until we hand it back.
        let data = unsafe { self.umem.data_mut(&mut desc) };
        let bytes = data.contents();
        let len = bytes.len();
        let Some(flow) = classify(bytes) else {
            self.stats.malformed += 1;
            self.free_buf.push(frame_no);
            return;
        };
        let Some(rule_id) = self.table.lookup(ifindex, &flow) else {
            self.stats.unmatched += 1;
            self.free_buf.push(frame_no);
            return;
        };
        let rule = &self.table.rules[rule_id as usize];
        let rc = &mut self.stats.rules[rule_id as usize];
        rc.packets += 1;
        rc.bytes += len as u64;
        let last = rule.outputs.len() - 1;

        for (oi, out) in rule.outputs.iter().enumerate().take(last) {
            let Some(copy_no) = take_one(&*self.pool, &mut self.take_buf) else {
                rc.outputs[oi].no_frame += 1;
                continue;
            };
            let mut copy = self.frames[copy_no as usize];
            // SAFETY: `copy` is a free frame just taken from the pool, distinct from `desc`'s
            // frame, and no ring holds it; `desc`'s frame is only read here.
            let result = unsafe {
                let src = self.umem.data(&desc).contents();
                let mut dst = self.umem.data_mut(&mut copy);
                let mut cursor = dst.cursor();
                cursor.set_pos(0);
                cursor
                    .write_all(src)
                    .expect("a frame's data fits in any frame");
                rewrite(dst.contents_mut(), &flow, &out.action)
            };
            match result {
                Ok(()) => {
                    let port = self.egress_port[out.egress];
                    self.staged[port].push(copy);
                    self.staged_tags[port].push(Tag {
                        rule: rule_id,
                        output: oi as u16,
                    });
                }
                Err(e) => {
                    count_rewrite_error(&mut rc.outputs[oi], e);
                    self.free_buf.push(copy_no);
                }
            }
        }

        let out = &rule.outputs[last];
        // SAFETY: as above; the copies are done, so this is the frame's only user.
        let result = unsafe {
            rewrite(
                self.umem.data_mut(&mut desc).contents_mut(),
                &flow,
                &out.action,
            )
        };
        match result {
            Ok(()) => {
                let port = self.egress_port[out.egress];
                self.staged[port].push(desc);
                self.staged_tags[port].push(Tag {
                    rule: rule_id,
                    output: last as u16,
                });
            }
            Err(e) => {
                count_rewrite_error(&mut rc.outputs[last], e);
                self.free_buf.push(frame_no);
            }
        }
    }

    /// Puts staged frames on a port's TX ring and kicks the kernel.
    fn transmit(&mut self, pi: usize) -> usize {
        let staged = std::mem::take(&mut self.staged[pi]);
        let tags = std::mem::take(&mut self.staged_tags[pi]);
        let mut sent = 0;
        if !staged.is_empty() {
            let port = &mut self.ports[pi];
            // SAFETY: every staged frame is ours (off an RX ring or out of the pool) and is
            // not on any other ring.
            sent = unsafe { port.tx.produce(&staged) };
            port.in_tx += sent;
            for (desc, tag) in staged[..sent].iter().zip(&tags[..sent]) {
                let oc = &mut self.stats.rules[tag.rule as usize].outputs[tag.output as usize];
                oc.packets += 1;
                oc.bytes += desc.lengths().data() as u64;
            }
            for (desc, tag) in staged[sent..].iter().zip(&tags[sent..]) {
                self.stats.rules[tag.rule as usize].outputs[tag.output as usize].tx_ring_full += 1;
                self.free_buf.push((desc.addr() / self.frame_size) as u32);
            }
            if !self.free_buf.is_empty() {
                self.pool.give_batch(&self.free_buf);
                self.free_buf.clear();
            }
        }
        // Hand the buffers back so their capacity is reused.
        self.staged[pi] = staged;
        self.staged[pi].clear();
        self.staged_tags[pi] = tags;
        self.staged_tags[pi].clear();

        let port = &mut self.ports[pi];
        // Copy mode transmits only inside sendto(), a bounded batch per call, so kick while
        // anything is outstanding; zero-copy drivers say when they need it.
        if port.in_tx > 0
            && (port.copy_mode || port.tx.needs_wakeup())
            && let Err(e) = port.tx.wakeup()
        {
            debug!("{}: TX wakeup: {e}", port.name);
        }
        sent
    }

    /// Returns completed TX frames to the pool.
    fn complete(&mut self, pi: usize) -> usize {
        let port = &mut self.ports[pi];
        self.desc_buf.clear();
        self.desc_buf
            .resize(RING_SIZE as usize, FrameDesc::default());
        // SAFETY: the completion ring hands back frames the kernel has finished sending.
        let n = unsafe { port.cq.consume(&mut self.desc_buf) };
        port.in_tx -= n;
        self.free_buf.clear();
        for d in &self.desc_buf[..n] {
            self.free_buf.push((d.addr() / self.frame_size) as u32);
        }
        if n > 0 {
            self.pool.give_batch(&self.free_buf);
            self.free_buf.clear();
        }
        n
    }

    /// Tops an ingress port's fill ring up to its target from the pool.
    fn refill(&mut self, pi: usize) {
        let port = &mut self.ports[pi];
        if !port.ingress || port.in_fill >= port.fill_target {
            return;
        }
        let want = port.fill_target - port.in_fill;
        let room = port.fq.nb_free(want as u32) as usize;
        let want = want.min(room);
        if want == 0 {
            return;
        }
        self.take_buf.clear();
        let got = self.pool.take_batch(&mut self.take_buf, want);
        self.desc_buf.clear();
        self.desc_buf
            .extend(self.take_buf.iter().map(|&f| self.frames[f as usize]));
        // SAFETY: the frames came from the pool, so nothing else refers to them.
        let produced = unsafe { port.fq.produce(&self.desc_buf) };
        port.in_fill += produced;
        if produced < got {
            // The ring changed under us (it cannot, single producer) — keep the books right.
            self.pool.give_batch(&self.take_buf[produced..]);
        }
        if port.fq.needs_wakeup() {
            let _ = port.fq.wakeup(port.rx.fd_mut(), 0);
        }
    }

    pub fn stats(&self) -> &DatapathStats {
        &self.stats
    }

    pub fn table(&self) -> &RuleTable {
        &self.table
    }

    pub fn account(&self) -> FrameAccount {
        FrameAccount {
            frames: self.frames.len(),
            in_pool: self.pool.free(),
            in_fill: self.ports.iter().map(|p| p.in_fill).sum(),
            in_tx: self.ports.iter().map(|p| p.in_tx).sum(),
        }
    }

    /// The kernel's per-socket drop counters, for the shutdown report.
    pub fn socket_stats(&self) -> Vec<(String, u32, xsk_rs::socket::XdpStatistics)> {
        self.ports
            .iter()
            .filter_map(|p| {
                p.rx.fd()
                    .xdp_statistics()
                    .map(|s| (p.name.clone(), p.queue, s))
                    .map_err(|e| warn!("{}: reading XDP statistics: {e}", p.name))
                    .ok()
            })
            .collect()
    }
}

fn take_one(pool: &dyn FramePool, buf: &mut Vec<u32>) -> Option<u32> {
    buf.clear();
    (pool.take_batch(buf, 1) == 1).then(|| buf[0])
}

fn count_rewrite_error(c: &mut OutputCounters, e: RewriteError) {
    match e {
        RewriteError::TtlExpired => c.ttl_expired += 1,
        RewriteError::Malformed => c.malformed += 1,
    }
}

/// Binds one socket; the first binds in the configured mode, the rest share its UMEM (and the
/// kernel gives them the first one's mode).
fn open_socket(
    umem: &Umem,
    iface: &str,
    queue: u32,
    bind: BindMode,
    first: bool,
) -> Result<(TxQueue, RxQueue, FillQueue, CompQueue, bool)> {
    let ifname = iface
        .parse()
        .map_err(|e| anyhow!("interface name {iface}: {e:?}"))?;
    let try_bind = |flags: BindFlags| {
        let config: SocketConfig = SocketConfigBuilder::new()
            .rx_queue_size(QueueSize::new(RING_SIZE).expect("power of two"))
            .tx_queue_size(QueueSize::new(RING_SIZE).expect("power of two"))
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(flags)
            .build();
        // SAFETY: the prog-load inhibit flag is set, as sharing a UMEM requires, and each
        // (interface, queue) is bound once.
        unsafe { Socket::new(config, umem, &ifname, queue) }
    };
    let zc = BindFlags::XDP_ZEROCOPY | BindFlags::XDP_USE_NEED_WAKEUP;
    let copy = BindFlags::XDP_COPY | BindFlags::XDP_USE_NEED_WAKEUP;
    let result = match (bind, first) {
        // Shared sockets bind with XDP_SHARED_UMEM only; libxdp ignores these flags.
        (_, false) => bind_retrying(iface, queue, || try_bind(BindFlags::empty())),
        (BindMode::Copy, true) => bind_retrying(iface, queue, || try_bind(copy)),
        (BindMode::Zerocopy, true) => bind_retrying(iface, queue, || try_bind(zc)),
        (BindMode::Auto, true) => match bind_retrying(iface, queue, || try_bind(zc)) {
            Ok(s) => Ok(s),
            Err(e) if os_error(&e) == Some(libc::EBUSY) => Err(e),
            Err(e) => {
                warn!(
                    "{iface} queue {queue}: zero-copy bind failed ({}); falling back to copy mode",
                    describe(&e)
                );
                bind_retrying(iface, queue, || try_bind(copy))
            }
        },
    };
    let (tx, rx, rings) = result.map_err(|e| {
        if os_error(&e) == Some(libc::EBUSY) {
            anyhow!(
                "{iface} queue {queue} already has an AF_XDP socket bound: is another relay (or \
                 AF_XDP program) running on {iface}? Stop it, or remove {iface} from this config"
            )
        } else {
            anyhow!(
                "binding an AF_XDP socket to {iface} queue {queue}: {}",
                describe(&e)
            )
        }
    })?;
    let (fq, cq) = rings
        .ok_or_else(|| anyhow!("{iface} queue {queue}: no fill/completion rings (bound twice?)"))?;
    let zerocopy = is_zerocopy(rx.fd().as_raw_fd()).unwrap_or_else(|e| {
        error!("{iface}: XDP_OPTIONS: {e}");
        false
    });
    Ok((tx, rx, fq, cq, !zerocopy))
}

/// How long a bind keeps retrying EBUSY. The kernel releases a closed socket's hold on its
/// queue from a work queue, after the XSKMAP that referenced it is freed, so a relay restarted
/// right after another one died can find the queue still busy for a moment.
const BUSY_RETRY: Duration = Duration::from_secs(3);

fn bind_retrying<T>(
    iface: &str,
    queue: u32,
    mut bind: impl FnMut() -> Result<T, xsk_rs::socket::SocketCreateError>,
) -> Result<T, xsk_rs::socket::SocketCreateError> {
    let deadline = Instant::now() + BUSY_RETRY;
    let mut said = false;
    loop {
        match bind() {
            Err(e) if os_error(&e) == Some(libc::EBUSY) && Instant::now() < deadline => {
                if !said {
                    info!(
                        "{iface} queue {queue} is busy; waiting up to {BUSY_RETRY:?} for the kernel to release it"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn os_error(e: &xsk_rs::socket::SocketCreateError) -> Option<i32> {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
}

fn describe(e: &xsk_rs::socket::SocketCreateError) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

/// Asks the kernel whether a bound socket runs in zero-copy mode.
fn is_zerocopy(fd: RawFd) -> std::io::Result<bool> {
    const SOL_XDP: libc::c_int = 283;
    const XDP_OPTIONS: libc::c_int = 8;
    const XDP_OPTIONS_ZEROCOPY: u32 = 1;
    let mut flags: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `flags`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_XDP,
            XDP_OPTIONS,
            (&mut flags as *mut u32).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(flags & XDP_OPTIONS_ZEROCOPY != 0)
}
