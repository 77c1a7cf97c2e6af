//! The generator's AF_XDP sender: frames written straight into a UMEM and handed to the
//! interface's TX ring, with no socket layer, no routing and no skb until the driver. On a
//! veth the peer's receive path (the relay's XDP program) still runs on the sending CPU, but
//! the sender's own cost per packet drops to a descriptor and a 100-byte copy.

use std::{
    io::Write,
    net::Ipv4Addr,
    num::NonZeroU32,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use xsk_rs::{
    FrameDesc, Socket, Umem,
    config::{BindFlags, FrameSize, LibxdpFlags, QueueSize, SocketConfigBuilder, UmemConfig},
};

use crate::loadgen::{
    HEADER, SendSummary, UDP4_PAYLOAD_AT, due, now_ns, stamp, udp4_frame, udp4_frame_to,
};

const FRAMES: u32 = 4096;
const RING: u32 = 2048;
const BATCH: usize = 64;

/// What to send, and how fast.
pub struct XdpSend {
    pub iface: String,
    pub source: Ipv4Addr,
    /// Groups, sent to round-robin (frame k to the k mod N'th); or one unicast address when
    /// `dst_mac` is given.
    pub destinations: Vec<Ipv4Addr>,
    /// The frames' destination MAC for a unicast `destination` (the next hop's, which the
    /// caller knows and this process may not be able to see); a group's own MAC when absent.
    pub dst_mac: Option<[u8; 6]>,
    pub port: u16,
    pub ttl: u8,
    pub size: usize,
    /// Packets per second; 0 for flat out.
    pub rate: u64,
    pub count: Option<u64>,
    pub duration: Duration,
    pub flow: u32,
}

pub fn send(spec: &XdpSend) -> Result<SendSummary> {
    if spec.size < HEADER {
        bail!("--size must be at least {HEADER}");
    }
    let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", spec.iface))
        .with_context(|| format!("no interface {}", spec.iface))?;
    let src_mac = parse_mac(&mac)?;
    // One whole frame per destination, made once, each with its own destination MAC (a
    // group's is derived from the group): sending is then the same copy whichever it goes to.
    let templates: Vec<Vec<u8>> = spec
        .destinations
        .iter()
        .map(|&destination| match spec.dst_mac {
            None => udp4_frame(
                src_mac,
                spec.source,
                destination,
                spec.port,
                spec.ttl,
                spec.size,
            ),
            Some(dst_mac) => udp4_frame_to(
                dst_mac,
                src_mac,
                spec.source,
                destination,
                spec.port,
                spec.ttl,
                spec.size,
            ),
        })
        .collect();
    let Some(first) = templates.first() else {
        bail!("no destination to send to");
    };
    if first.len() > 2048 - 256 {
        bail!("a {}-byte frame does not fit a UMEM frame", first.len());
    }

    let umem_config = UmemConfig::builder()
        .frame_size(FrameSize::new(2048).map_err(|e| anyhow!("{e}"))?)
        .fill_queue_size(QueueSize::new(RING).map_err(|e| anyhow!("{e}"))?)
        .comp_queue_size(QueueSize::new(RING).map_err(|e| anyhow!("{e}"))?)
        .build()
        .map_err(|e| anyhow!("UMEM config: {e}"))?;
    let (umem, mut free) = Umem::new(
        umem_config,
        NonZeroU32::new(FRAMES).expect("non-zero"),
        false,
    )
    .map_err(|e| anyhow!("creating the UMEM: {e}"))?;
    let config = SocketConfigBuilder::new()
        .tx_queue_size(QueueSize::new(RING).map_err(|e| anyhow!("{e}"))?)
        .rx_queue_size(QueueSize::new(RING).map_err(|e| anyhow!("{e}"))?)
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(BindFlags::XDP_COPY | BindFlags::XDP_USE_NEED_WAKEUP)
        .build();
    let ifname = spec
        .iface
        .parse()
        .map_err(|e| anyhow!("interface name {}: {e:?}", spec.iface))?;
    // The kernel releases the previous run's hold on the queue a moment after that process
    // exits (from a work queue), so a bind right after one can find the queue busy.
    let deadline = Instant::now() + Duration::from_secs(3);
    let (mut tx, _rx, rings) = loop {
        // SAFETY: libxdp's program loading is inhibited (the sender receives nothing) and
        // the queue is bound once at a time.
        match unsafe { Socket::new(config, &umem, &ifname, 0) } {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => bail!("binding an AF_XDP socket to {} queue 0: {e}", spec.iface),
        }
    };
    let (_fq, mut cq) = rings.ok_or_else(|| anyhow!("no completion ring"))?;

    let mut comp: Vec<FrameDesc> = free[..BATCH].to_vec();
    let mut batch: Vec<FrameDesc> = Vec::with_capacity(BATCH);
    let limit = spec.count.unwrap_or(u64::MAX);
    let start = Instant::now();
    let (mut seq, mut in_flight, mut full) = (0u64, 0usize, 0u64);
    while seq < limit && start.elapsed() < spec.duration {
        // SAFETY: completed frames are the kernel's no more.
        let n = unsafe { cq.consume(&mut comp) };
        in_flight -= n;
        free.extend_from_slice(&comp[..n]);
        let mut want = BATCH.min(free.len()).min((limit - seq) as usize);
        if spec.rate > 0 {
            let allowed = (start.elapsed().as_nanos() as u64)
                .saturating_mul(spec.rate)
                .div_ceil(1_000_000_000)
                .saturating_sub(seq);
            want = want.min(allowed as usize);
            if want == 0 {
                let wait = due(seq, spec.rate).saturating_sub(start.elapsed());
                if wait > Duration::from_micros(200) {
                    std::thread::sleep(wait - Duration::from_micros(100));
                }
                continue;
            }
        }
        let t = now_ns();
        batch.clear();
        // Frame `seq` goes to destination `seq mod N`, also after a short produce (the
        // numbers not taken are sent again); one division per batch, not per frame.
        let mut k = (seq % templates.len() as u64) as usize;
        for i in 0..want {
            let mut desc = free.pop().expect("counted above");
            // SAFETY: a free frame, on no ring.
            let mut data = unsafe { umem.data_mut(&mut desc) };
            // The completion ring hands descriptors back with their length cleared, so each
            // send writes the frame again (about a hundred bytes), then the stamp.
            let mut cursor = data.cursor();
            cursor.set_pos(0);
            cursor.write_all(&templates[k])?;
            k += 1;
            if k == templates.len() {
                k = 0;
            }
            stamp(
                &mut data.contents_mut()[UDP4_PAYLOAD_AT..],
                spec.flow,
                seq + i as u64,
                t,
            );
            batch.push(desc);
        }
        // SAFETY: every frame in the batch is ours and on no ring.
        let sent = unsafe { tx.produce(&batch) };
        if sent < batch.len() {
            full += 1;
        }
        free.extend_from_slice(&batch[sent..]);
        in_flight += sent;
        seq += sent as u64;
        // Copy mode transmits only inside sendto().
        if in_flight > 0 {
            let _ = tx.wakeup();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let what is queued go out before the socket closes.
    let drain = Instant::now();
    while in_flight > 0 && drain.elapsed() < Duration::from_secs(1) {
        let _ = tx.wakeup();
        // SAFETY: as above.
        in_flight -= unsafe { cq.consume(&mut comp) };
    }
    Ok(SendSummary {
        sent: seq,
        errors: full,
        elapsed_s: elapsed,
        pps: seq as f64 / elapsed.max(1e-9),
    })
}

/// A MAC address as sysfs and `ip link` write it (`02:00:00:00:00:01`).
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 6 {
        bail!("not a MAC address: {text:?}");
    }
    for (b, h) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(h, 16).with_context(|| format!("not a MAC address: {text:?}"))?;
    }
    Ok(mac)
}
