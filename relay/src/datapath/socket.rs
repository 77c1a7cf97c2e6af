//! Binding AF_XDP sockets: the mode fallback, the EBUSY retry, and asking the kernel which
//! mode a socket really got.

use std::{
    os::fd::{AsRawFd, RawFd},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};
use log::{error, info, warn};
use xsk_rs::{
    CompQueue, FillQueue, RxQueue, Socket, TxQueue, Umem,
    config::{BindFlags, LibxdpFlags, QueueSize, SocketConfig, SocketConfigBuilder},
};

use super::RING_SIZE;
use crate::config::BindMode;

/// The four rings of one bound socket, and whether it runs in copy mode.
pub(super) struct Bound {
    pub tx: TxQueue,
    pub rx: RxQueue,
    pub fq: FillQueue,
    pub cq: CompQueue,
    pub copy_mode: bool,
}

/// Binds one socket; the first binds in the configured mode, the rest share its UMEM (and the
/// kernel gives them the first one's mode).
pub(super) fn open_socket(
    umem: &Umem,
    iface: &str,
    queue: u32,
    bind: BindMode,
    first: bool,
    rx_ring: u32,
) -> Result<Bound> {
    let ifname = iface
        .parse()
        .map_err(|e| anyhow!("interface name {iface}: {e:?}"))?;
    let try_bind = |flags: BindFlags| {
        let config: SocketConfig = SocketConfigBuilder::new()
            .rx_queue_size(QueueSize::new(rx_ring).expect("power of two"))
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
        if os_error(&e) == Some(libc::EOPNOTSUPP) && (bind == BindMode::Zerocopy || !first) {
            // The caller may try a copy-mode UMEM instead: a type it can recognise.
            anyhow::Error::new(NoZeroCopy {
                iface: iface.to_owned(),
                queue,
                shared: !first,
            })
        } else if os_error(&e) == Some(libc::EBUSY) {
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
    Ok(Bound {
        tx,
        rx,
        fq,
        cq,
        copy_mode: !zerocopy,
    })
}

/// A zero-copy bind the driver refused: binding first with `bind: zerocopy`, or sharing a
/// UMEM whose sockets run zero-copy (the kernel gives a shared socket the UMEM's mode).
#[derive(Debug)]
pub(super) struct NoZeroCopy {
    pub iface: String,
    pub queue: u32,
    pub shared: bool,
}

impl std::fmt::Display for NoZeroCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (iface, queue) = (&self.iface, self.queue);
        if self.shared {
            write!(
                f,
                "{iface} queue {queue}: {iface}'s driver has no zero-copy AF_XDP, and the UMEM \
                 it would share runs zero-copy"
            )
        } else {
            write!(
                f,
                "{iface} queue {queue}: zero-copy AF_XDP is not supported by {iface}'s driver \
                 (veth and many others have copy mode only): use `bind: auto`, which falls back \
                 to copy mode, or `bind: copy`"
            )
        }
    }
}

impl std::error::Error for NoZeroCopy {}

/// Whether an interface is a virtual device (veth, bridge, VLAN, tunnel, ...): those have no
/// zero-copy AF_XDP, so the relay does not try it on them.
pub(super) fn is_virtual(iface: &str) -> bool {
    !std::path::Path::new(&format!("/sys/class/net/{iface}/device")).exists()
}

/// The driver of a physical interface, to remember which have no zero-copy.
pub(super) fn driver(iface: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/class/net/{iface}/device/driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
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
