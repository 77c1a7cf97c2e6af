//! The floor under the relay's data path, for `cargo xtask bench`: the least a forwarder on the
//! same AF_XDP setup can do. The same XDP program steers the same rule into a socket on a UMEM
//! of the same frames and ring sizes, a second socket on the egress shares that UMEM, and one
//! thread moves every frame RX -> TX writing only the source MAC and the TTL (the destination
//! MAC of a group the relay does not remap is already right). It kicks the TX ring the way the
//! relay does (copy mode transmits at most 32 frames per sendto) and sleeps in poll() when idle,
//! or spins with `--poll busy`. What the relay spends above this is its own work: classifying,
//! the rule lookup, counters, the frame pool, the plan.
//!
//! Usage (in the relay's namespace): relay-floor IN OUT GROUP PORT [--poll sleep|busy]

use std::{
    net::IpAddr,
    num::NonZeroU32,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use relay::{
    config::{Config, System},
    loader::Steering,
    rules::RuleTable,
    sys::LiveSystem,
};
use xsk_rs::{
    FrameDesc, Socket, Umem,
    config::{BindFlags, FrameSize, LibxdpFlags, QueueSize, SocketConfigBuilder, UmemConfig},
};

/// The relay's own sizes (relay/src/datapath: RING_SIZE, BATCH; the default umem.frames).
const RING: u32 = 2048;
const BATCH: usize = 64;
const FRAMES: u32 = 4096;
const FRAME_SIZE: u32 = 2048;
/// The relay's idle wait.
const IDLE_POLL_MS: i32 = 100;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    if let Err(e) = run() {
        eprintln!("relay-floor: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, group, port, rest @ ..] = args.as_slice() else {
        bail!("usage: relay-floor IN OUT GROUP PORT [--poll sleep|busy]");
    };
    let busy = match rest {
        [] => false,
        [flag, mode] if flag == "--poll" && mode == "sleep" => false,
        [flag, mode] if flag == "--poll" && mode == "busy" => true,
        _ => bail!("unknown arguments {rest:?}"),
    };
    let group: IpAddr = group.parse().context("GROUP")?;
    let yaml = format!(
        "rules:\n  - name: floor\n    input: {{ interface: {input}, group: {group}, port: {port} }}\n    outputs: [{{ interface: {output} }}]\n"
    );
    let cfg = Config::parse("floor", &yaml).map_err(|e| anyhow!("{e}"))?;
    let table = RuleTable::compile(&cfg, "floor", &LiveSystem).map_err(|e| anyhow!("{e}"))?;
    let info = |name: &str| {
        LiveSystem
            .interface(name)
            .ok_or_else(|| anyhow!("{name}: no such interface"))
    };
    let out_mac = info(output)?.mac;
    let in_index = info(input)?.ifindex;

    let umem_config = UmemConfig::builder()
        .frame_size(FrameSize::new(FRAME_SIZE).map_err(|e| anyhow!("{e}"))?)
        .fill_queue_size(QueueSize::new(RING).map_err(|e| anyhow!("{e}"))?)
        .comp_queue_size(QueueSize::new(RING).map_err(|e| anyhow!("{e}"))?)
        .build()
        .map_err(|e| anyhow!("UMEM config: {e}"))?;
    let (umem, descs) = Umem::new(
        umem_config,
        NonZeroU32::new(FRAMES).expect("non-zero"),
        false,
    )
    .map_err(|e| anyhow!("creating the UMEM: {e}"))?;
    let socket = |iface: &str, flags: BindFlags| -> Result<_> {
        let config = SocketConfigBuilder::new()
            .rx_queue_size(QueueSize::new(RING).map_err(|e| anyhow!("{e}"))?)
            .tx_queue_size(QueueSize::new(RING).map_err(|e| anyhow!("{e}"))?)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(flags)
            .build();
        let name = iface.parse().map_err(|e| anyhow!("{iface}: {e:?}"))?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            // SAFETY: libxdp's program loading is inhibited (the relay's XDP program is loaded
            // below) and each (interface, queue 0) is bound once.
            match unsafe { Socket::new(config, &umem, &name, 0) } {
                Ok(s) => return Ok(s),
                // A previous run's hold on the queue is released a moment after it exits.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => bail!("binding an AF_XDP socket to {iface} queue 0: {e}"),
            }
        }
    };
    let (_in_tx, mut rx, rings) =
        socket(input, BindFlags::XDP_COPY | BindFlags::XDP_USE_NEED_WAKEUP)?;
    let (mut fq, _in_cq) = rings.ok_or_else(|| anyhow!("{input}: no fill ring"))?;
    // A socket sharing the UMEM binds with no mode flags (it takes the UMEM's).
    let (mut tx, _out_rx, rings) = socket(output, BindFlags::empty())?;
    let (_out_fq, mut cq) = rings.ok_or_else(|| anyhow!("{output}: no completion ring"))?;

    let mut steering = Steering::load(&table, FRAME_SIZE)?;
    steering.set_socket(in_index, 0, rx.fd())?;
    steering.attach(input, in_index, cfg.xdp_mode)?;

    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }

    // Half the frames wait in the fill ring, as the relay's budget has it; the rest are free.
    let mut free: Vec<FrameDesc> = descs;
    let fill_target = (FRAMES / 2) as usize;
    let mut in_fill = 0usize;
    let mut in_tx = 0usize;
    let mut rx_buf = vec![FrameDesc::default(); BATCH];
    let mut comp_buf = vec![FrameDesc::default(); RING as usize];
    let mut staged: Vec<FrameDesc> = Vec::with_capacity(4 * BATCH);
    let (mut received, mut sent, mut dropped) = (0u64, 0u64, 0u64);
    let mut fds = [libc::pollfd {
        fd: rx.fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    println!("relay-floor: forwarding {group}:{port} from {input} to {output}");
    while !STOP.load(Ordering::Relaxed) {
        let mut moved = 0;
        // Fill ring topped up from the free frames.
        if in_fill < fill_target {
            let want = (fill_target - in_fill).min(free.len());
            let want = want.min(fq.nb_free(want as u32) as usize);
            if want > 0 {
                let at = free.len() - want;
                // SAFETY: free frames are on no ring and referred to by nothing else.
                let n = unsafe { fq.produce(&free[at..]) };
                free.truncate(free.len() - n);
                in_fill += n;
            }
        }
        // SAFETY: descriptors on the RX ring name frames the kernel handed back.
        let n = unsafe { rx.consume(&mut rx_buf) };
        in_fill -= n;
        received += n as u64;
        moved += n;
        for desc in &mut rx_buf[..n] {
            // SAFETY: the frame came off the RX ring, so it is ours alone until produced.
            let mut data = unsafe { umem.data_mut(desc) };
            let frame = data.contents_mut();
            if frame.len() >= 34 && frame[12..14] == [0x08, 0x00] {
                frame[6..12].copy_from_slice(&out_mac);
                ttl_minus_one(&mut frame[14..34]);
            }
            staged.push(*desc);
        }
        if !staged.is_empty() {
            let room = (tx.nb_free(staged.len() as u32) as usize).min(staged.len());
            // SAFETY: staged frames are ours and on no ring.
            let n = unsafe { tx.produce(&staged[..room]) };
            in_tx += n;
            sent += n as u64;
            staged.drain(..n);
            // The relay keeps up to four batches waiting; so does the floor.
            if staged.len() > 4 * BATCH {
                dropped += (staged.len() - 4 * BATCH) as u64;
                free.extend(staged.drain(4 * BATCH..));
            }
        }
        // Copy mode transmits at most 32 frames per sendto: kick while the kernel takes some.
        if in_tx > 0 {
            let mut unsent = RING - tx.nb_free_exact();
            let mut kicks = 0;
            while unsent > 0 && kicks <= RING / 32 {
                kicks += 1;
                if tx.wakeup().is_err() {
                    break;
                }
                let left = RING - tx.nb_free_exact();
                if left >= unsent {
                    break;
                }
                unsent = left;
            }
        }
        if in_tx > 0 {
            // SAFETY: the completion ring hands back frames the kernel is done with.
            let n = unsafe { cq.consume(&mut comp_buf[..in_tx.min(RING as usize)]) };
            in_tx -= n;
            free.extend_from_slice(&comp_buf[..n]);
            moved += n;
        }
        if moved == 0 && in_tx == 0 {
            if busy {
                std::hint::spin_loop();
            } else {
                // SAFETY: one initialised pollfd, valid for the call; EINTR ends the wait.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, IDLE_POLL_MS) };
            }
        }
    }
    steering.detach();
    println!("relay-floor: received={received} sent={sent} dropped={dropped}");
    Ok(())
}

/// Decrements an IPv4 header's TTL and updates its checksum incrementally (RFC 1624), as every
/// forwarder must; a TTL of 0 or 1 is left alone (the bench's frames arrive with more).
fn ttl_minus_one(ip: &mut [u8]) {
    if ip[8] <= 1 {
        return;
    }
    let old = u16::from_be_bytes([ip[8], ip[9]]);
    ip[8] -= 1;
    let new = u16::from_be_bytes([ip[8], ip[9]]);
    let sum = u16::from_be_bytes([ip[10], ip[11]]);
    // HC' = ~(~HC + ~m + m')
    let mut acc = u32::from(!sum) + u32::from(!old) + u32::from(new);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    ip[10..12].copy_from_slice(&(!(acc as u16)).to_be_bytes());
}
