//! The relay's backend: AF_XDP sockets and UMEMs through xsk-rs, each call the xsk-rs call it
//! stands for.

use std::os::fd::{AsRawFd, RawFd};

use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, TxQueue, Umem, umem::frame::DataMut};

use super::{
    RING_SIZE,
    backend::{Backend, FrameMut, Rings},
};

/// AF_XDP through xsk-rs.
pub(super) struct Xsk;

/// The four rings of one bound socket.
pub(super) struct XskRings {
    pub tx: TxQueue,
    pub rx: RxQueue,
    pub fq: FillQueue,
    pub cq: CompQueue,
    /// Entries of the fill ring (the UMEM's, made with the budget's ingress ring size).
    pub fill_size: u32,
}

impl Backend for Xsk {
    type Desc = FrameDesc;
    type Umem = Umem;
    type Rings = XskRings;
    type FrameMut<'a> = DataMut<'a>;
    const REAL_LINKS: bool = true;

    #[inline]
    fn addr(desc: &FrameDesc) -> usize {
        desc.addr()
    }

    #[inline]
    fn len(desc: &FrameDesc) -> usize {
        desc.lengths().data()
    }

    #[inline]
    unsafe fn data<'a>(umem: &'a Umem, desc: &FrameDesc) -> &'a [u8] {
        // SAFETY: the caller owns the frame, which belongs to `umem`, and nothing writes it.
        unsafe { umem.data(desc) }.contents()
    }

    #[inline]
    unsafe fn data_mut<'a>(umem: &'a Umem, desc: &'a mut FrameDesc) -> DataMut<'a> {
        // SAFETY: the caller owns the frame, which belongs to `umem`, and no one else uses it.
        unsafe { umem.data_mut(desc) }
    }
}

impl FrameMut for DataMut<'_> {
    #[inline]
    fn contents(&self) -> &[u8] {
        DataMut::contents(self)
    }

    #[inline]
    fn contents_mut(&mut self) -> &mut [u8] {
        DataMut::contents_mut(self)
    }

    #[inline]
    fn capacity(&mut self) -> usize {
        // The data segment runs to the end of the UMEM frame.
        self.cursor().buf_len()
    }

    #[inline]
    fn set_len(&mut self, len: usize) {
        // The cursor's position is the data's length.
        self.cursor().set_pos(len);
    }
}

impl Rings<FrameDesc> for XskRings {
    #[inline]
    unsafe fn rx_consume(&mut self, out: &mut [FrameDesc]) -> usize {
        // SAFETY: the caller takes the frames on, as the contract says.
        unsafe { self.rx.consume(out) }
    }

    #[inline]
    fn fill_free(&mut self, want: u32) -> u32 {
        self.fq.nb_free(want)
    }

    fn fill_held(&mut self) -> usize {
        (self.fill_size - self.fq.nb_free_exact()) as usize
    }

    #[inline]
    unsafe fn fill_produce(&mut self, descs: &[FrameDesc]) -> usize {
        // SAFETY: the caller hands the frames over, as the contract says.
        unsafe { self.fq.produce(descs) }
    }

    #[inline]
    fn fill_needs_wakeup(&self) -> bool {
        self.fq.needs_wakeup()
    }

    fn fill_wakeup(&mut self) {
        let _ = self.fq.wakeup(self.rx.fd_mut(), 0);
    }

    #[inline]
    fn tx_free(&mut self, want: u32) -> u32 {
        self.tx.nb_free(want)
    }

    #[inline]
    fn tx_held(&mut self) -> u32 {
        RING_SIZE - self.tx.nb_free_exact()
    }

    #[inline]
    unsafe fn tx_produce(&mut self, descs: &[FrameDesc]) -> usize {
        // SAFETY: the caller hands the frames over, as the contract says.
        unsafe { self.tx.produce(descs) }
    }

    #[inline]
    fn tx_needs_wakeup(&self) -> bool {
        self.tx.needs_wakeup()
    }

    fn tx_wakeup(&mut self) -> std::io::Result<()> {
        self.tx.wakeup()
    }

    #[inline]
    unsafe fn comp_consume(&mut self, out: &mut [FrameDesc]) -> usize {
        // SAFETY: the caller takes the frames on, as the contract says.
        unsafe { self.cq.consume(out) }
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.rx.fd().as_raw_fd())
    }

    fn kernel_counters(&self) -> Option<std::io::Result<xsk_rs::socket::XdpStatistics>> {
        Some(self.rx.fd().xdp_statistics())
    }
}
