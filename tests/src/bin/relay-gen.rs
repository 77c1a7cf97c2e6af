//! `relay-gen`: a multicast UDP traffic generator and receiver for measuring relays.
//!
//! ```text
//! relay-gen send --group 239.1.1.1 --port 5000 --source 198.18.1.1 --size 64 --rate 100000 --duration 3
//! relay-gen recv --group 239.1.1.1 --port 5000 --iface-addr 198.18.2.2
//! relay-gen send --group 239.1.0.1 --groups 1000 --port 5000 --source 198.18.1.1
//! relay-gen send --destination 198.18.1.2 --dst-mac 02:00:00:00:00:02 --port 7100 --source 198.18.1.1
//! relay-gen recv --port 5000 --iface-addr 198.18.2.2
//! ```
//! The third sends round-robin over 239.1.0.1 .. 239.1.3.232, the traffic a rule for a group
//! range sees. The last two are the unicast ends a gateway rule has: a sender to a unicast address, and a
//! receiver that joins nothing. The sender stamps every payload with a sequence number and its send time; the receiver
//! reports loss, duplicates, reordering and one-way latency percentiles. Both print one JSON
//! line on stdout when they finish. Run them in network namespaces (`ip netns exec`).

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use relay_tests::loadgen::{HEADER, RecvStats, SendSummary, due, now_ns, stamp};
use relay_tests::traffic::setsockopt;

#[derive(Parser)]
#[command(about = "multicast UDP generator and receiver with loss and latency accounting")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send stamped datagrams to a group, or to a unicast address.
    #[command(group(clap::ArgGroup::new("to").required(true).args(["group", "destination"])))]
    Send {
        #[arg(long)]
        group: Option<Ipv4Addr>,
        /// Send round-robin over this many consecutive groups from --group (datagram k goes
        /// to the k mod N'th), as many distinct groups as a range rule may see.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        groups: u32,
        /// A unicast address to send to instead of a group.
        #[arg(long)]
        destination: Option<Ipv4Addr>,
        /// With --destination and --afxdp: the frames' destination MAC, the next hop's (an
        /// AF_XDP sender resolves no neighbours; a UDP socket leaves it to the kernel).
        #[arg(long, value_name = "MAC", requires = "destination")]
        dst_mac: Option<String>,
        #[arg(long)]
        port: u16,
        /// Local address to send from; also selects the outgoing interface.
        #[arg(long)]
        source: Ipv4Addr,
        /// UDP payload bytes (at least 24).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Packets per second; 0 sends flat out.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Stop after this many packets.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 3.0)]
        duration: f64,
        #[arg(long, default_value_t = 8)]
        ttl: u32,
        /// Datagrams per sendmmsg call.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 0)]
        flow: u32,
        /// Pin to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
        /// Write frames into an AF_XDP socket on this interface (queue 0, copy mode) instead
        /// of sending through a UDP socket: no socket layer or routing on the sender's side,
        /// so the relay rather than the generator is the bottleneck. The UDP checksum is 0.
        #[arg(long, value_name = "IFACE")]
        afxdp: Option<String>,
    },
    /// Join a group (or, without --group, listen on a unicast address) and account for what
    /// arrives.
    Recv {
        /// Without it, the receiver binds --iface-addr and --port and joins nothing.
        #[arg(long)]
        group: Option<Ipv4Addr>,
        #[arg(long)]
        port: u16,
        /// Address of the interface to join on; with no group, the address to listen on.
        #[arg(long)]
        iface_addr: Ipv4Addr,
        /// Stop this long after the last datagram (once one has arrived).
        #[arg(long, default_value_t = 1000)]
        idle_ms: u64,
        /// Never run longer than this.
        #[arg(long, default_value_t = 60.0)]
        max_secs: f64,
        #[arg(long)]
        cpu: Option<usize>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Send {
            group,
            groups,
            destination,
            dst_mac,
            port,
            source,
            size,
            rate,
            count,
            duration,
            ttl,
            batch,
            flow,
            cpu,
            afxdp,
        } => {
            pin(cpu);
            let to = match (group, destination) {
                (Some(g), _) => To::Group(g),
                (None, Some(d)) if groups == 1 => To::Unicast(d),
                (None, Some(d)) => bail!("--groups is for groups; {d} is one unicast address"),
                (None, None) => unreachable!("clap requires one"),
            };
            let destinations = to.destinations(groups)?;
            let s = match afxdp {
                Some(iface) => relay_tests::xdpgen::send(&relay_tests::xdpgen::XdpSend {
                    iface,
                    source,
                    destinations,
                    dst_mac: match (&to, dst_mac) {
                        (To::Group(_), _) => None,
                        (To::Unicast(_), Some(m)) => Some(relay_tests::xdpgen::parse_mac(&m)?),
                        (To::Unicast(d), None) => {
                            bail!("--afxdp to unicast {d} needs --dst-mac (the next hop's MAC)")
                        }
                    },
                    port,
                    ttl: ttl.min(255) as u8,
                    size,
                    rate,
                    count,
                    duration: Duration::from_secs_f64(duration),
                    flow,
                })?,
                None => send(
                    &to,
                    &destinations,
                    port,
                    source,
                    size,
                    rate,
                    count,
                    duration,
                    ttl,
                    batch,
                    flow,
                )?,
            };
            println!("{}", serde_json::to_string(&s)?);
        }
        Cmd::Recv {
            group,
            port,
            iface_addr,
            idle_ms,
            max_secs,
            cpu,
        } => {
            pin(cpu);
            let s = recv(group, port, iface_addr, idle_ms, max_secs)?;
            println!("{}", serde_json::to_string(&s.summary(None))?);
        }
    }
    Ok(())
}

/// Where a sender sends.
enum To {
    Group(Ipv4Addr),
    Unicast(Ipv4Addr),
}

impl To {
    /// The addresses datagrams go to in turn: `groups` consecutive groups from the first, or
    /// the one unicast address.
    fn destinations(&self, groups: u32) -> Result<Vec<Ipv4Addr>> {
        match *self {
            To::Unicast(a) => Ok(vec![a]),
            To::Group(g) => {
                let first = u32::from(g);
                let last = first.checked_add(groups - 1).map(Ipv4Addr::from);
                if !last.is_some_and(|l| l.is_multicast()) {
                    bail!("{groups} groups from {g} run past the multicast range");
                }
                Ok((first..first + groups).map(Ipv4Addr::from).collect())
            }
        }
    }
}

fn pin(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: cpu_set_t is plain data; CPU_SET and sched_setaffinity get a valid set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Buffers and the headers sendmmsg/recvmmsg take, pointing at each other. The vectors' heap
/// storage never moves, so the pointers stay valid for as long as the batch lives.
struct MsgBatch {
    bufs: Vec<Vec<u8>>,
    _iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl MsgBatch {
    /// `n` buffers of `size` bytes; every header names `dst` as its address, if given (it
    /// must outlive the batch).
    fn new(n: usize, size: usize, dst: Option<&mut libc::sockaddr_in>) -> Self {
        let mut bufs = vec![vec![0u8; size]; n];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let dst: *mut libc::sockaddr_in = dst.map_or(std::ptr::null_mut(), |d| d as *mut _);
        let msgs = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; zero is a valid value for every field.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                if !dst.is_null() {
                    m.msg_hdr.msg_name = dst.cast();
                    m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                }
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        Self {
            bufs,
            _iovs: iovs,
            msgs,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn send(
    to: &To,
    destinations: &[Ipv4Addr],
    port: u16,
    source: Ipv4Addr,
    size: usize,
    rate: u64,
    count: Option<u64>,
    duration: f64,
    ttl: u32,
    batch: usize,
    flow: u32,
) -> Result<SendSummary> {
    if size < HEADER {
        bail!("--size must be at least {HEADER}");
    }
    let batch = batch.clamp(1, 1024);
    let sock = UdpSocket::bind(SocketAddrV4::new(source, 0)).context("binding the sender")?;
    let fd = sock.as_raw_fd();
    match *to {
        To::Group(_) => {
            sock.set_multicast_ttl_v4(ttl)?;
            sock.set_multicast_loop_v4(false)?;
            let ifaddr = libc::in_addr {
                s_addr: u32::from_ne_bytes(source.octets()),
            };
            setsockopt(fd, libc::IPPROTO_IP, libc::IP_MULTICAST_IF, &ifaddr)?;
        }
        // The same TTL as a group's datagrams and the AF_XDP sender's frames, so a relay
        // sees the same frames whichever way they were sent.
        To::Unicast(_) => sock.set_ttl(ttl)?,
    }
    // A large send buffer lets the kernel queue a whole batch.
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &(4i32 << 20))?;

    let mut dsts: Vec<libc::sockaddr_in> = destinations
        .iter()
        .map(|a| {
            // SAFETY: sockaddr_in is plain data.
            let mut dst: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            dst.sin_family = libc::AF_INET as u16;
            dst.sin_port = port.to_be();
            dst.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
            dst
        })
        .collect();
    // The vector is never resized, so the headers' pointers into it stay valid.
    let n_dsts = dsts.len();

    let mut io = MsgBatch::new(batch, size, Some(&mut dsts[0]));
    let limit = count.unwrap_or(u64::MAX);
    let end = Duration::from_secs_f64(duration);
    let start = Instant::now();
    let (mut seq, mut errors) = (0u64, 0u64);
    while seq < limit && start.elapsed() < end {
        if rate > 0 {
            let at = due(seq, rate);
            loop {
                let now = start.elapsed();
                if now >= at {
                    break;
                }
                if at - now > Duration::from_micros(200) {
                    std::thread::sleep(at - now - Duration::from_micros(100));
                }
            }
        }
        let n = (batch as u64).min(limit - seq) as usize;
        let t = now_ns();
        for (i, b) in io.bufs[..n].iter_mut().enumerate() {
            stamp(b, flow, seq + i as u64, t);
        }
        // Datagram `seq` goes to destination `seq mod N`, also after a short send (the
        // numbers not taken are sent again). With one destination every header already names
        // it, and the loop (and its division) is skipped.
        if n_dsts > 1 {
            let mut k = (seq % n_dsts as u64) as usize;
            for m in &mut io.msgs[..n] {
                m.msg_hdr.msg_name = std::ptr::from_mut(&mut dsts[k]).cast();
                k += 1;
                if k == n_dsts {
                    k = 0;
                }
            }
        }
        // SAFETY: msgs[..n] point at live buffers, iovecs and destination addresses.
        let rc = unsafe { libc::sendmmsg(fd, io.msgs.as_mut_ptr(), n as u32, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) => {
                    errors += 1;
                    continue;
                }
                _ => return Err(e).context("sendmmsg"),
            }
        }
        // Datagrams the call did not take are sent again with their own numbers next time.
        seq += rc as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(SendSummary {
        sent: seq,
        errors,
        elapsed_s: elapsed,
        pps: seq as f64 / elapsed.max(1e-9),
    })
}

fn recv(
    group: Option<Ipv4Addr>,
    port: u16,
    iface_addr: Ipv4Addr,
    idle_ms: u64,
    max_secs: f64,
) -> Result<RecvStats> {
    let sock = match group {
        Some(group) => {
            let sock = UdpSocket::bind(SocketAddrV4::new(group, port))
                .with_context(|| format!("binding {group}:{port}"))?;
            sock.join_multicast_v4(&group, &iface_addr)
                .with_context(|| format!("joining {group} on {iface_addr}"))?;
            sock
        }
        None => UdpSocket::bind(SocketAddrV4::new(iface_addr, port))
            .with_context(|| format!("binding {iface_addr}:{port}"))?,
    };
    let fd = sock.as_raw_fd();
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &(8i32 << 20))?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    eprintln!("ready");

    const BATCH: usize = 64;
    let mut io = MsgBatch::new(BATCH, 2048, None);
    let mut stats = RecvStats::new();
    let start = Instant::now();
    let mut last: Option<Instant> = None;
    let idle = Duration::from_millis(idle_ms);
    let max = Duration::from_secs_f64(max_secs);
    while start.elapsed() < max && last.is_none_or(|l| l.elapsed() < idle) {
        // SAFETY: msgs point at live buffers; a null timeout waits per SO_RCVTIMEO.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                io.msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if rc <= 0 {
            continue;
        }
        let now = now_ns();
        last = Some(Instant::now());
        for k in 0..rc as usize {
            let len = io.msgs[k].msg_len as usize;
            stats.record(&io.bufs[k][..len], now);
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_run_consecutively_and_stay_multicast() {
        let d = To::Group(Ipv4Addr::new(239, 1, 0, 1))
            .destinations(1000)
            .unwrap();
        assert_eq!(d.len(), 1000);
        assert_eq!(d[255], Ipv4Addr::new(239, 1, 1, 0));
        assert_eq!(d[999], Ipv4Addr::new(239, 1, 3, 232));
        assert_eq!(
            To::Group(Ipv4Addr::new(239, 1, 1, 1))
                .destinations(1)
                .unwrap(),
            [Ipv4Addr::new(239, 1, 1, 1)]
        );
        assert!(
            To::Group(Ipv4Addr::new(239, 255, 255, 250))
                .destinations(10)
                .is_err()
        );
    }
}
