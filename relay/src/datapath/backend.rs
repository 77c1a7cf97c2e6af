//! What a worker needs from a socket's four rings and from the memory its frames are in, so the
//! same per-frame code runs over xsk-rs (the relay) and over in-memory rings (tests and the
//! data path benchmark, see [`super::memory`]), as quinn-proto runs without sockets.
//!
//! The worker is generic over a [`Backend`] and monomorphized: over xsk-rs its descriptors are
//! xsk-rs's own `FrameDesc`s and every call below is the xsk-rs call it stands for, so the seam
//! costs the relay nothing (no dyn, no conversion per frame).

use std::os::fd::RawFd;

/// A frame being written: its data and how long it is.
pub trait FrameMut {
    fn contents(&self) -> &[u8];
    fn contents_mut(&mut self) -> &mut [u8];
    /// The most bytes its data may grow to.
    fn capacity(&mut self) -> usize;
    /// Sets the data's length, at most [`FrameMut::capacity`].
    fn set_len(&mut self, len: usize);

    /// Makes the frame a copy of `src`.
    fn copy_from(&mut self, src: &[u8]) {
        assert!(
            src.len() <= self.capacity(),
            "a frame's data fits in any frame"
        );
        self.set_len(src.len());
        copy_frame(self.contents_mut(), src);
    }
}

/// Copies a frame's bytes, `src` into `dst` of the same length, 16 bytes a move. A copy's
/// headers are read right after it is made, to rewrite them: libc's memcpy writes a frame of
/// a hundred bytes with 64-byte stores, which this CPU does not forward to those 2- and 4-byte
/// reads, so each waited for the stores to complete (the profile put a quarter of a fan-out's
/// rewrite time on its first read of the copy). 16-byte stores forward.
#[inline]
pub(crate) fn copy_frame(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "a copy is as long as its source");
    let len = dst.len();
    let (to, _) = dst.as_chunks_mut::<16>();
    let (from, _) = src.as_chunks::<16>();
    for (d, s) in to.iter_mut().zip(from) {
        *d = u128::from_ne_bytes(*s).to_ne_bytes();
        // Emits nothing, but keeps the compiler from turning the loop back into a memcpy
        // call.
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::Release);
    }
    let done = len / 16 * 16;
    if done == len {
        return;
    }
    if len >= 16 {
        // The tail as one more 16-byte move, overlapping the last one, rather than byte by
        // byte.
        let tail: &[u8; 16] = src[len - 16..].try_into().expect("16 bytes");
        dst[len - 16..].copy_from_slice(&u128::from_ne_bytes(*tail).to_ne_bytes());
    } else {
        dst.copy_from_slice(src);
    }
}

/// One socket's rings, as the relay's side (the producer of the fill and TX rings, the
/// consumer of the RX and completion rings) sees them.
pub trait Rings<D> {
    /// Takes received frames into `out`; returns how many.
    ///
    /// # Safety
    /// The frames the descriptors name become the caller's: it must hand each on exactly once.
    unsafe fn rx_consume(&mut self, out: &mut [D]) -> usize;
    /// Free fill ring entries, at least `want` of them looked for.
    fn fill_free(&mut self, want: u32) -> u32;
    /// Entries on the fill ring the kernel has not consumed.
    fn fill_held(&mut self) -> usize;
    /// Gives frames to the kernel to receive into; returns how many it took (all or none).
    ///
    /// # Safety
    /// Nothing else may refer to the frames until they come back on the RX ring.
    unsafe fn fill_produce(&mut self, descs: &[D]) -> usize;
    fn fill_needs_wakeup(&self) -> bool;
    fn fill_wakeup(&mut self);
    /// Free TX ring entries, at least `want` of them looked for.
    fn tx_free(&mut self, want: u32) -> u32;
    /// Entries on the TX ring the kernel has not consumed.
    fn tx_held(&mut self) -> u32;
    /// Gives frames to the kernel to send; returns how many it took (all or none).
    ///
    /// # Safety
    /// Nothing else may refer to the frames until they come back on the completion ring.
    unsafe fn tx_produce(&mut self, descs: &[D]) -> usize;
    fn tx_needs_wakeup(&self) -> bool;
    fn tx_wakeup(&mut self) -> std::io::Result<()>;
    /// Takes frames the kernel has finished sending into `out`; returns how many.
    ///
    /// # Safety
    /// As [`Rings::rx_consume`].
    unsafe fn comp_consume(&mut self, out: &mut [D]) -> usize;
    /// What an idle worker polls for received frames, if anything.
    fn poll_fd(&self) -> Option<RawFd>;
    /// The kernel's counters of the socket (XDP_STATISTICS), if there is a kernel socket.
    fn kernel_counters(&self) -> Option<std::io::Result<xsk_rs::socket::XdpStatistics>> {
        None
    }
}

/// Rings and frame memory of one kind.
pub trait Backend: 'static {
    /// A descriptor: which frame, and how long its data is.
    type Desc: Copy + Default + Send + Sync + std::fmt::Debug + 'static;
    /// The memory of one UMEM.
    type Umem: Send + Sync + 'static;
    type Rings: Rings<Self::Desc> + Send + 'static;
    type FrameMut<'a>: FrameMut;
    /// Whether a port is a real interface, whose link state and MTU the worker reads.
    const REAL_LINKS: bool;

    /// The frame's offset in its UMEM.
    fn addr(desc: &Self::Desc) -> usize;
    /// The length of the frame's data.
    fn len(desc: &Self::Desc) -> usize;
    /// The frame's data.
    ///
    /// # Safety
    /// `desc` names a frame of `umem` that the caller owns, which nothing writes meanwhile.
    unsafe fn data<'a>(umem: &'a Self::Umem, desc: &Self::Desc) -> &'a [u8];
    /// The frame, to write.
    ///
    /// # Safety
    /// `desc` names a frame of `umem` that the caller owns, which nothing else reads or writes
    /// meanwhile.
    unsafe fn data_mut<'a>(umem: &'a Self::Umem, desc: &'a mut Self::Desc) -> Self::FrameMut<'a>;
}

#[cfg(test)]
mod tests {
    use super::copy_frame;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the length, the copy is the source, and nothing else is written.
        #[test]
        fn copies_exactly(src in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut dst = vec![0xee; src.len() + 8];
            copy_frame(&mut dst[..src.len()], &src);
            prop_assert_eq!(&dst[..src.len()], &src[..]);
            prop_assert!(dst[src.len()..].iter().all(|&b| b == 0xee));
        }
    }
}
