//! Multicast senders, UDP receivers and raw frame captures that run inside a namespace.
//!
//! Each payload starts with a 8-byte sequence number followed by bytes derived from it, so a
//! receiver can tell which packets arrived and that their payloads are intact.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// The payload of packet `seq`, `len` bytes long (at least 8).
pub fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.extend(
        (0..len.saturating_sub(8)).map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8),
    );
    p
}

/// The sequence number of an intact payload, `None` if it was damaged. The last byte may
/// have its top bit flipped: see [`unambiguous`].
pub fn check_payload(p: &[u8]) -> Option<u64> {
    let seq = u64::from_be_bytes(p.get(..8)?.try_into().ok()?);
    let want = payload(seq, p.len());
    let n = p.len();
    let intact = n > 8
        && p[..n - 1] == want[..n - 1]
        && (p[n - 1] == want[n - 1] || p[n - 1] == want[n - 1] ^ 0x80);
    (intact || p == want).then_some(seq)
}

/// `p` as the payload of a datagram from `from` to `to` whose full UDP checksum is not the
/// pseudo-header's sum. A datagram whose full checksum equals that sum (one in 65,536) looks
/// the same whether or not its sender left the checksum to offload, so the relay cannot
/// count it as completed or not: the harness, which asserts those counts exactly, sends none
/// (the last byte's top bit is flipped instead, which `check_payload` accepts).
pub fn unambiguous(from: SocketAddr, to: SocketAddr, mut p: Vec<u8>) -> Vec<u8> {
    // RFC 1071, written here rather than taken from the relay: the harness checks the relay.
    fn fold(mut acc: u64) -> u16 {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }
    fn words(b: &[u8]) -> u64 {
        b.chunks(2)
            .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum()
    }
    let len = (8 + p.len()) as u16;
    let addresses = match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [s.octets().to_vec(), d.octets().to_vec()].concat(),
        (IpAddr::V6(s), IpAddr::V6(d)) => [s.octets().to_vec(), d.octets().to_vec()].concat(),
        _ => return p,
    };
    // Folded, not complemented: what a sender with offload leaves in the field.
    let pseudo = fold(words(&addresses) + u64::from(len) + 17);
    let header =
        words(&from.port().to_be_bytes()) + words(&to.port().to_be_bytes()) + u64::from(len);
    let full = match !fold(u64::from(pseudo) + header + words(&p)) {
        0 => 0xffff,
        c => c,
    };
    if full == pseudo
        && let Some(last) = p.last_mut()
    {
        *last ^= 0x80;
    }
    p
}

/// What to send.
#[derive(Debug, Clone)]
pub struct Flow {
    /// An IPv4 or IPv6 group; the source it is sent from is of the same family.
    pub group: IpAddr,
    pub port: u16,
    pub count: u64,
    /// The first sequence number (so several flows to one group can be told apart).
    pub first_seq: u64,
    pub len: usize,
    /// TTL or hop limit.
    pub ttl: u32,
    /// Send IPv6 datagrams with a zero UDP checksum (UDP_NO_CHECK6_TX), which IPv6 forbids
    /// and receivers drop: a relay must repair it.
    pub zero_checksum: bool,
    /// Pause after every `burst` packets, to stay below what a veth and the relay absorb.
    pub burst: u64,
    pub pause: Duration,
}

impl Flow {
    pub fn new(group: impl Into<IpAddr>, port: u16, count: u64) -> Self {
        Flow {
            group: group.into(),
            port,
            count,
            first_seq: 0,
            len: 100,
            ttl: 8,
            zero_checksum: false,
            burst: 16,
            pause: Duration::from_micros(500),
        }
    }
}

/// Sends `flow` from `source` (an address of the namespace) and returns how many were sent.
pub fn send(ns: &Netns, source: impl Into<IpAddr>, flow: Flow) -> JoinHandle<Result<u64>> {
    let source = source.into();
    ns.run(move || {
        let sock = UdpSocket::bind(SocketAddr::new(source, 0)).context("binding sender")?;
        match source {
            IpAddr::V4(a) => {
                sock.set_multicast_ttl_v4(flow.ttl)?;
                sock.set_multicast_loop_v4(false)?;
                set_multicast_if(&sock, a)?;
            }
            IpAddr::V6(a) => {
                let fd = sock.as_raw_fd();
                let hops = flow.ttl as libc::c_int;
                setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, &hops)?;
                sock.set_multicast_loop_v6(false)?;
                let ifindex = ifindex_of(a)? as libc::c_int;
                setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF, &ifindex)?;
                if flow.zero_checksum {
                    setsockopt(fd, libc::SOL_UDP, UDP_NO_CHECK6_TX, &1 as &libc::c_int)?;
                }
            }
        }
        let dst = SocketAddr::new(flow.group, flow.port);
        let local = sock.local_addr()?;
        for i in 0..flow.count {
            let seq = flow.first_seq + i;
            sock.send_to(&unambiguous(local, dst, payload(seq, flow.len)), dst)
                .with_context(|| format!("sending packet {seq}"))?;
            if (i + 1) % flow.burst == 0 {
                std::thread::sleep(flow.pause);
            }
        }
        Ok(flow.count)
    })
}

/// linux/udp.h: send IPv6 UDP with a zero checksum (not in the libc crate).
const UDP_NO_CHECK6_TX: i32 = 101;

/// The index of the interface that holds `addr` in the calling thread's namespace
/// (getifaddrs asks over netlink from this thread, and the harness moves threads, not
/// processes, into namespaces).
pub fn ifindex_of(addr: Ipv6Addr) -> Result<u32> {
    let name = nix::ifaddrs::getifaddrs()?
        .find(|i| {
            i.address
                .as_ref()
                .and_then(|a| a.as_sockaddr_in6())
                .is_some_and(|a| a.ip() == addr)
        })
        .map(|i| i.interface_name)
        .with_context(|| format!("no interface has {addr}"))?;
    Ok(nix::net::if_::if_nametoindex(name.as_str())?)
}

fn set_multicast_if(sock: &UdpSocket, addr: Ipv4Addr) -> Result<()> {
    let a = libc::in_addr {
        s_addr: u32::from_ne_bytes(addr.octets()),
    };
    setsockopt(
        sock.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_MULTICAST_IF,
        &a,
    )
}

/// setsockopt(2) with a typed value.
pub fn setsockopt<T>(fd: i32, level: i32, name: i32, value: &T) -> Result<()> {
    // SAFETY: `value` is a valid T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt({level}, {name}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// When a receiving loop gives up.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Stop after this many.
    pub expect: u64,
    /// Stop this long after the last packet (or after start, if none came).
    pub idle: Duration,
    /// Never run longer than this.
    pub max: Duration,
}

impl Limits {
    pub fn new(expect: u64) -> Self {
        Limits {
            expect,
            idle: Duration::from_millis(1500),
            max: Duration::from_secs(30),
        }
    }
}

/// Joins `group` on the interface with address `iface_addr`, binds `port`, and collects
/// payloads. Returns once the socket has joined; the handle yields the payloads.
pub fn listen(
    ns: &Netns,
    group: impl Into<IpAddr>,
    port: u16,
    iface_addr: impl Into<IpAddr>,
    limits: Limits,
) -> Result<JoinHandle<Result<Vec<Vec<u8>>>>> {
    let (group, iface_addr) = (group.into(), iface_addr.into());
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = ns.run(move || {
        let sock = UdpSocket::bind(SocketAddr::new(group, port))
            .with_context(|| format!("binding {group}:{port}"))?;
        match (group, iface_addr) {
            (IpAddr::V4(g), IpAddr::V4(a)) => sock.join_multicast_v4(&g, &a),
            (IpAddr::V6(g), IpAddr::V6(a)) => sock.join_multicast_v6(&g, ifindex_of(a)?),
            _ => bail!("{group} and {iface_addr} are of different families"),
        }
        .with_context(|| format!("joining {group} on {iface_addr}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        recv_loop(limits, &mut got, || match sock.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(_) => None,
        });
        Ok(got)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")?;
    Ok(handle)
}

/// Datagrams with the address and port each came from.
pub type Datagrams = Vec<(SocketAddr, Vec<u8>)>;

/// Binds an ordinary UDP socket to `bind` (unicast, or the unspecified address) and collects
/// what arrives, with the address and port each datagram came from. Returns once bound.
pub fn listen_unicast(
    ns: &Netns,
    bind: SocketAddr,
    limits: Limits,
) -> Result<JoinHandle<Result<Datagrams>>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = ns.run(move || {
        let sock = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        let start = Instant::now();
        let mut last = start;
        while (got.len() as u64) < limits.expect
            && start.elapsed() < limits.max
            && last.elapsed() < limits.idle
        {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                last = Instant::now();
                got.push((from, buf[..n].to_vec()));
            }
        }
        Ok(got)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")?;
    Ok(handle)
}

/// Captures every frame that arrives on `iface` with an AF_PACKET socket. Returns once the
/// socket is bound; the handle yields the frames.
pub fn capture(
    ns: &Netns,
    iface: &str,
    limits: Limits,
    keep: fn(&[u8]) -> bool,
) -> Result<JoinHandle<Result<Vec<Vec<u8>>>>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let iface = std::ffi::CString::new(iface)?;
    let handle = ns.run(move || {
        let fd = packet_socket(&iface)?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        recv_loop(limits, &mut got, || {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                return None;
            }
            let frame = &buf[..n as usize];
            // Frames the filter rejects count as activity but are not kept.
            Some(if keep(frame) {
                frame.to_vec()
            } else {
                Vec::new()
            })
        });
        got.retain(|f| !f.is_empty());
        Ok(got)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("capture did not start")?;
    Ok(handle)
}

/// As [`capture`], with each frame's VLAN tag where it was on the wire. The kernel takes the
/// outer tag out of a received frame (into the skb's metadata) before any tap sees it, so a
/// plain capture cannot tell a tagged frame from an untagged one; with PACKET_AUXDATA each
/// frame comes with the tag the kernel took, which is put back in front of the ethertype.
pub fn capture_tagged(
    ns: &Netns,
    iface: &str,
    limits: Limits,
    keep: fn(&[u8]) -> bool,
) -> Result<JoinHandle<Result<Vec<Vec<u8>>>>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let iface = std::ffi::CString::new(iface)?;
    let handle = ns.run(move || {
        let fd = packet_socket(&iface)?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            &1 as &libc::c_int,
        )?;
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        // Room for one cmsg holding a tpacket_auxdata, 8-byte aligned as cmsghdr wants.
        let mut control = [0u64; 16];
        recv_loop(limits, &mut got, || {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain data; zero is a valid starting value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: msg points at the live buffer and control area above, sized as given.
            let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
            if n <= 0 {
                return None;
            }
            let mut frame = buf[..n as usize].to_vec();
            // SAFETY: the kernel filled msg's control area; CMSG_FIRSTHDR and CMSG_NXTHDR walk
            // it within msg_controllen.
            let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            while !cmsg.is_null() {
                // SAFETY: cmsg is a header inside the control area (see above).
                let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
                if level == libc::SOL_PACKET && kind == libc::PACKET_AUXDATA {
                    // SAFETY: a PACKET_AUXDATA cmsg carries a tpacket_auxdata; read unaligned
                    // as CMSG_DATA promises no alignment for it.
                    let aux: libc::tpacket_auxdata =
                        unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 && frame.len() >= 12 {
                        let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                            aux.tp_vlan_tpid
                        } else {
                            0x8100
                        };
                        let mut tag = tpid.to_be_bytes().to_vec();
                        tag.extend(aux.tp_vlan_tci.to_be_bytes());
                        frame.splice(12..12, tag);
                    }
                }
                // SAFETY: as above.
                cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
            }
            // Frames the filter rejects count as activity but are not kept.
            Some(if keep(&frame) { frame } else { Vec::new() })
        });
        got.retain(|f| !f.is_empty());
        Ok(got)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("capture did not start")?;
    Ok(handle)
}

/// An AF_PACKET socket that sees and sends every frame of `iface`, as the frame is.
fn packet_socket(iface: &std::ffi::CStr) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: iface is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(iface.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {iface:?}");
    }
    // SAFETY: sockaddr_ll is plain data; zero is a valid starting value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: a valid socket and a properly sized sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("binding AF_PACKET: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sends `frames` out of `iface` exactly as given (no checksums or lengths fixed up), `gap`
/// apart; returns how many were sent.
pub fn inject(
    ns: &Netns,
    iface: &str,
    frames: Vec<Vec<u8>>,
    gap: Duration,
) -> Result<JoinHandle<Result<usize>>> {
    let iface = std::ffi::CString::new(iface)?;
    Ok(ns.run(move || {
        let fd = packet_socket(&iface)?;
        for (i, f) in frames.iter().enumerate() {
            // SAFETY: a bound socket and a buffer valid for its length.
            let n = unsafe { libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            if n != f.len() as isize {
                bail!(
                    "injecting frame {i} ({} bytes): {}",
                    f.len(),
                    std::io::Error::last_os_error()
                );
            }
            std::thread::sleep(gap);
        }
        Ok(frames.len())
    }))
}

fn recv_loop(limits: Limits, got: &mut Vec<Vec<u8>>, mut recv: impl FnMut() -> Option<Vec<u8>>) {
    let start = Instant::now();
    let mut last = start;
    let mut kept = 0;
    while kept < limits.expect && start.elapsed() < limits.max && last.elapsed() < limits.idle {
        if let Some(p) = recv() {
            last = Instant::now();
            if !p.is_empty() {
                kept += 1;
            }
            got.push(p);
        }
    }
}

/// Joins a receiving thread, with its error.
pub fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    match h.join() {
        Ok(r) => r,
        Err(_) => bail!("a harness thread panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay::checksum::{pseudo_ipv4, pseudo_ipv6, udp_ipv4, udp_ipv6};

    /// The UDP datagram `from` sends to `to` with `p`: (its full checksum, the pseudo-header's
    /// sum), by the relay's own checksum code.
    fn sums(from: SocketAddr, to: SocketAddr, p: &[u8]) -> (u16, u16) {
        let len = (8 + p.len()) as u16;
        let mut udp = [
            from.port().to_be_bytes(),
            to.port().to_be_bytes(),
            len.to_be_bytes(),
            [0, 0],
        ]
        .concat();
        udp.extend_from_slice(p);
        match (from.ip(), to.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (udp_ipv4(s, d, &udp), pseudo_ipv4(s, d, len)),
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                (udp_ipv6(s, d, &udp), pseudo_ipv6(s, d, u32::from(len)))
            }
            _ => unreachable!(),
        }
    }

    /// Among enough datagrams some are ambiguous as sent; each comes out of `unambiguous`
    /// with a full checksum that is not the pseudo-header sum, and still checks as its seq.
    #[test]
    fn the_harness_sends_no_ambiguous_checksum() {
        for (from, to) in [
            ("198.18.1.1:40000", "239.1.1.1:5000"),
            ("[2001:2:0:1::1]:40000", "[ff18::1:1]:5000"),
        ] {
            let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
            let mut flipped = 0;
            for seq in 0..400_000u64 {
                let raw = payload(seq, 100);
                let (full, pseudo) = sums(from, to, &raw);
                let sent = unambiguous(from, to, raw.clone());
                let (sent_full, _) = sums(from, to, &sent);
                assert_ne!(sent_full, pseudo, "seq {seq}");
                assert_eq!(check_payload(&sent), Some(seq));
                if full == pseudo {
                    assert_ne!(sent, raw);
                    flipped += 1;
                } else {
                    assert_eq!(sent, raw);
                }
            }
            assert!(flipped > 0, "400,000 datagrams held an ambiguous one");
        }
    }
}
