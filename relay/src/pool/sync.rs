//! The atomics and cells the ring uses: std's in a normal build, loom's under `--cfg loom`, so
//! the model checker explores every interleaving of the real code.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicUsize, Ordering};

/// Loom's `UnsafeCell` checks every access in the model; natively a transparent wrapper whose
/// layout is the value's, so spans of cells can be copied as plain memory.
#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

#[cfg(not(loom))]
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) fn new(v: T) -> Self {
        Self(std::cell::UnsafeCell::new(v))
    }
}

/// Waits a moment for another thread to finish a step: a few PAUSEs, then the CPU is given
/// up. Spinning on PAUSE for long is what a hypervisor's pause-loop exiting punishes: under KVM
/// the vCPU is descheduled, and a hand-off that takes nanoseconds takes tens of microseconds.
#[inline(always)]
pub(crate) fn spin(waited: &mut u32) {
    #[cfg(loom)]
    {
        let _ = waited;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        *waited += 1;
        if *waited < 16 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}
