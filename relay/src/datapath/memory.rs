//! The in-memory backend: frames in a heap arena, a socket's four rings in plain memory, and a
//! simulated kernel behind them, so the worker's per-frame path runs without AF_XDP (tests
//! without root, and the data path benchmark).
//!
//! The simulated kernel does what the kernel and the NIC do for a zero-copy socket, and no
//! more: when the worker looks at its RX ring, frames waiting on the port's [`Wire`] are
//! written into frames from the fill ring and put on the RX ring (as many as the worker takes
//! at once, if there are fill entries for them: nothing is dropped, the rest wait); when it
//! looks at its completion ring, what is on the TX ring is "sent" (counted, copied out if the
//! wire captures) and put on the completion ring, unless the wire is stalled. It runs in the
//! worker's thread, inside the worker's own ring calls, so a worker needs no other thread and
//! is never woken.

use std::{
    cell::UnsafeCell,
    collections::VecDeque,
    os::fd::RawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{
    RING_SIZE,
    backend::{Backend, FrameMut, Rings},
};

/// Frames in memory, rings in memory.
pub(super) struct Memory;

/// An in-memory descriptor: which frame (its offset in the arena) and how long its data is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct MemDesc {
    addr: usize,
    len: usize,
}

/// The frames of one in-memory UMEM.
pub(super) struct Arena {
    bytes: Box<[UnsafeCell<u8>]>,
    frame_size: usize,
}

// SAFETY: the arena hands out a frame's bytes only through `Memory::data`/`data_mut` (and the
// simulated kernel, which works on frames it holds), whose callers own that frame: as with a
// UMEM, each frame has one owner at a time, and frames are handed between threads through
// the worker's rings, lanes and pools, which synchronise.
unsafe impl Sync for Arena {}

impl Arena {
    pub fn new(frames: usize, frame_size: usize) -> Self {
        Arena {
            bytes: (0..frames * frame_size)
                .map(|_| UnsafeCell::new(0))
                .collect(),
            frame_size,
        }
    }

    /// A descriptor for each frame, by frame number: what `Umem::new` hands back.
    pub fn descs(&self) -> Vec<MemDesc> {
        (0..self.bytes.len() / self.frame_size)
            .map(|f| MemDesc {
                addr: f * self.frame_size,
                len: 0,
            })
            .collect()
    }

    /// The whole of the frame at `addr`.
    ///
    /// # Safety
    /// The caller owns the frame, and nothing else uses it while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn frame(&self, addr: usize) -> &mut [u8] {
        let cells = &self.bytes[addr..addr + self.frame_size];
        // SAFETY: `UnsafeCell<u8>` has the layout of `u8`, so the cells are `frame_size`
        // bytes in a row, and the caller owns them for the slice's life.
        unsafe { std::slice::from_raw_parts_mut(UnsafeCell::raw_get(cells.as_ptr()), cells.len()) }
    }
}

/// An in-memory frame being written.
pub(super) struct MemFrame<'a> {
    buf: &'a mut [u8],
    len: &'a mut usize,
}

impl FrameMut for MemFrame<'_> {
    #[inline]
    fn contents(&self) -> &[u8] {
        &self.buf[..*self.len]
    }

    #[inline]
    fn contents_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..*self.len]
    }

    #[inline]
    fn capacity(&mut self) -> usize {
        self.buf.len()
    }

    #[inline]
    fn set_len(&mut self, len: usize) {
        *self.len = len.min(self.buf.len());
    }
}

impl Backend for Memory {
    type Desc = MemDesc;
    type Umem = Arc<Arena>;
    type Rings = MemRings;
    type FrameMut<'a> = MemFrame<'a>;
    const REAL_LINKS: bool = false;

    #[inline]
    fn addr(desc: &MemDesc) -> usize {
        desc.addr
    }

    #[inline]
    fn len(desc: &MemDesc) -> usize {
        desc.len
    }

    #[inline]
    unsafe fn data<'a>(umem: &'a Arc<Arena>, desc: &MemDesc) -> &'a [u8] {
        // SAFETY: the caller owns the frame and nothing writes it meanwhile.
        let frame: &'a [u8] = unsafe { umem.frame(desc.addr) };
        &frame[..desc.len]
    }

    #[inline]
    unsafe fn data_mut<'a>(umem: &'a Arc<Arena>, desc: &'a mut MemDesc) -> MemFrame<'a> {
        MemFrame {
            // SAFETY: the caller owns the frame and nothing else uses it meanwhile.
            buf: unsafe { umem.frame(desc.addr) },
            len: &mut desc.len,
        }
    }
}

/// What the simulated link of one port carries: frames to arrive on its RX ring, and what
/// was sent on it. Shared between the worker that owns the port and whoever drives the
/// simulation.
#[derive(Default)]
pub struct Wire {
    state: Mutex<WireState>,
    /// Frames that arrived (put on the RX ring by the simulated kernel).
    delivered: AtomicU64,
    /// Frames sent (taken off the TX ring by the simulated kernel).
    sent: AtomicU64,
    /// Bytes of those frames.
    sent_bytes: AtomicU64,
}

#[derive(Default)]
struct WireState {
    /// Frames to arrive, in order.
    queued: VecDeque<Vec<u8>>,
    /// A frame to arrive `repeat` more times after `queued` (the benchmark's stream).
    template: Vec<u8>,
    repeat: u64,
    /// Keep a copy of every frame sent.
    capture: bool,
    captured: Vec<Vec<u8>>,
    /// The device takes nothing off the TX ring.
    stalled: bool,
}

impl Wire {
    fn state(&self) -> std::sync::MutexGuard<'_, WireState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Has `frame` arrive on this port (after the frames already waiting).
    pub fn send(&self, frame: Vec<u8>) {
        self.state().queued.push_back(frame);
    }

    /// Has `frame` arrive `count` more times, after anything queued.
    pub fn stream(&self, frame: &[u8], count: u64) {
        let mut s = self.state();
        if s.template != frame {
            s.template = frame.to_vec();
        }
        s.repeat += count;
    }

    /// Frames waiting to arrive.
    pub fn waiting(&self) -> u64 {
        let s = self.state();
        s.queued.len() as u64 + s.repeat
    }

    /// Forgets frames that have not arrived yet, as detaching the XDP program would.
    pub fn detach(&self) {
        let mut s = self.state();
        s.queued.clear();
        s.repeat = 0;
    }

    /// Keeps a copy of every frame sent from now on (see [`Wire::take_captured`]).
    pub fn capture(&self) {
        self.state().capture = true;
    }

    /// The frames sent since the last call, in the order they were sent.
    pub fn take_captured(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.state().captured)
    }

    /// While stalled, the device takes nothing off the TX ring, which fills up.
    pub fn stall(&self, stalled: bool) {
        self.state().stalled = stalled;
    }

    /// Frames that have arrived so far (are on the RX ring, or past it).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
    }

    /// Frames sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Bytes of the frames sent so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes.load(Ordering::Acquire)
    }
}

/// A ring of descriptors, `RING_SIZE` (a power of two) entries, in memory: the entries from
/// `head` (the consumer's) to `tail` (the producer's), indices taken modulo the size.
struct Ring {
    slots: Box<[MemDesc]>,
    head: usize,
    tail: usize,
}

impl Ring {
    const MASK: usize = RING_SIZE as usize - 1;

    fn new() -> Self {
        Ring {
            slots: vec![MemDesc::default(); RING_SIZE as usize].into_boxed_slice(),
            head: 0,
            tail: 0,
        }
    }

    fn len(&self) -> usize {
        self.tail - self.head
    }

    fn free(&self) -> usize {
        RING_SIZE as usize - self.len()
    }

    /// All of `descs` or none, as an xsk ring produces.
    fn produce(&mut self, descs: &[MemDesc]) -> usize {
        if descs.len() > self.free() {
            return 0;
        }
        for (i, &d) in descs.iter().enumerate() {
            self.slots[(self.tail + i) & Self::MASK] = d;
        }
        self.tail += descs.len();
        descs.len()
    }

    fn consume(&mut self, out: &mut [MemDesc]) -> usize {
        let n = out.len().min(self.len());
        for (i, slot) in out[..n].iter_mut().enumerate() {
            *slot = self.slots[(self.head + i) & Self::MASK];
        }
        self.head += n;
        n
    }

    /// One entry, where the caller has made sure there is room.
    fn push(&mut self, desc: MemDesc) {
        debug_assert!(self.free() > 0);
        self.slots[self.tail & Self::MASK] = desc;
        self.tail += 1;
    }

    fn pop(&mut self) -> Option<MemDesc> {
        (self.len() > 0).then(|| {
            let d = self.slots[self.head & Self::MASK];
            self.head += 1;
            d
        })
    }
}

/// One in-memory socket: its four rings, and the simulated kernel's side of them.
pub(super) struct MemRings {
    arena: Arc<Arena>,
    wire: Arc<Wire>,
    fill: Ring,
    rx: Ring,
    tx: Ring,
    comp: Ring,
}

impl MemRings {
    pub fn new(arena: Arc<Arena>, wire: Arc<Wire>) -> Self {
        MemRings {
            arena,
            wire,
            fill: Ring::new(),
            rx: Ring::new(),
            tx: Ring::new(),
            comp: Ring::new(),
        }
    }

    /// The kernel's receive: frames waiting on the wire into fill ring frames, onto the RX
    /// ring, at most `budget` of them (a NAPI poll's), so a frame is written shortly before the
    /// worker reads it, as a NIC's DMA writes shortly before.
    fn deliver(&mut self, budget: usize) {
        let room = self.fill.len().min(self.rx.free()).min(budget);
        if room == 0 {
            return;
        }
        let mut s = self.wire.state();
        let before = self.rx.len();
        for _ in 0..room {
            let desc = if let Some(frame) = s.queued.pop_front() {
                arrive(&self.arena, &mut self.fill, &frame)
            } else if s.repeat > 0 {
                s.repeat -= 1;
                arrive(&self.arena, &mut self.fill, &s.template)
            } else {
                break;
            };
            self.rx.push(desc);
        }
        drop(s);
        let n = self.rx.len() - before;
        self.wire.delivered.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// The kernel's transmit: what is on the TX ring is sent and completed.
    fn send(&mut self) {
        let n = self.tx.len().min(self.comp.free());
        if n == 0 {
            return;
        }
        let mut s = self.wire.state();
        if s.stalled {
            return;
        }
        let mut bytes = 0;
        for _ in 0..n {
            let desc = self.tx.pop().expect("n is at most its length");
            bytes += desc.len as u64;
            if s.capture {
                // SAFETY: the frame was on the TX ring, which hands it to the kernel alone.
                let frame = unsafe { self.arena.frame(desc.addr) };
                s.captured.push(frame[..desc.len].to_vec());
            }
            self.comp.push(desc);
        }
        drop(s);
        self.wire.sent_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.wire.sent.fetch_add(n as u64, Ordering::AcqRel);
    }
}

/// Writes a frame that arrived into the next fill ring frame.
fn arrive(arena: &Arena, fill: &mut Ring, frame: &[u8]) -> MemDesc {
    let mut desc = fill.pop().expect("deliver looks at the fill ring first");
    // SAFETY: the frame was on the fill ring, which hands it to the kernel alone.
    let buf = unsafe { arena.frame(desc.addr) };
    let len = frame.len().min(buf.len());
    super::backend::copy_frame(&mut buf[..len], &frame[..len]);
    desc.len = len;
    desc
}

impl Rings<MemDesc> for MemRings {
    unsafe fn rx_consume(&mut self, out: &mut [MemDesc]) -> usize {
        self.deliver(out.len().saturating_sub(self.rx.len()));
        self.rx.consume(out)
    }

    fn fill_free(&mut self, _want: u32) -> u32 {
        self.fill.free() as u32
    }

    fn fill_held(&mut self) -> usize {
        self.fill.len()
    }

    unsafe fn fill_produce(&mut self, descs: &[MemDesc]) -> usize {
        self.fill.produce(descs)
    }

    fn fill_needs_wakeup(&self) -> bool {
        false
    }

    fn fill_wakeup(&mut self) {}

    fn tx_free(&mut self, _want: u32) -> u32 {
        self.tx.free() as u32
    }

    fn tx_held(&mut self) -> u32 {
        self.tx.len() as u32
    }

    unsafe fn tx_produce(&mut self, descs: &[MemDesc]) -> usize {
        self.tx.produce(descs)
    }

    fn tx_needs_wakeup(&self) -> bool {
        false
    }

    fn tx_wakeup(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    unsafe fn comp_consume(&mut self, out: &mut [MemDesc]) -> usize {
        self.send();
        self.comp.consume(out)
    }

    fn poll_fd(&self) -> Option<RawFd> {
        None
    }
}

/// The simulated kernel alone, for the benchmark's baseline: `frames` copies of `frame`
/// arrive on one in-memory socket and are bounced straight back out, each RX descriptor put
/// on the TX ring `outputs` times as it is (the kernel's share of a fan-out: a TX entry, a
/// completion each) and one completion of each back on the fill ring, `batch` frames at a
/// time; no worker, no pool. What is left of a data path measurement after this is the
/// worker's own work.
pub fn bounce(frame: &[u8], frames: u64, batch: usize, outputs: usize) {
    let outputs = outputs.max(1);
    assert!(
        batch * outputs <= RING_SIZE as usize,
        "a batch's fan-out fits the TX ring"
    );
    let arena = Arc::new(Arena::new(RING_SIZE as usize, 2048));
    let wire = Arc::new(Wire::default());
    let mut rings = MemRings::new(arena.clone(), wire.clone());
    let descs = arena.descs();
    // SAFETY: every frame of the arena starts on the fill ring, which owns it then.
    unsafe { rings.fill_produce(&descs) };
    wire.stream(frame, frames);
    let mut rx = vec![MemDesc::default(); batch];
    let mut tx = Vec::with_capacity(batch * outputs);
    let mut comp = vec![MemDesc::default(); RING_SIZE as usize];
    let mut back = Vec::with_capacity(RING_SIZE as usize);
    while wire.sent() < frames * outputs as u64 {
        // SAFETY: frames come off the RX ring and go straight to the TX ring (a frame listed
        // `outputs` times, which the simulated kernel only counts), and from the completion
        // ring straight back to the fill ring, once each: each has one owner at a time.
        unsafe {
            let n = rings.rx_consume(&mut rx);
            tx.clear();
            for d in &rx[..n] {
                tx.extend(std::iter::repeat_n(*d, outputs));
            }
            rings.tx_produce(&tx);
            // The TX ring is emptied whole, so completions come in whole groups.
            let n = rings.comp_consume(&mut comp);
            back.clear();
            back.extend(comp[..n].iter().step_by(outputs));
            rings.fill_produce(&back);
        }
    }
}
