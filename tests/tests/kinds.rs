//! The relay on every kind of interface a user has here, as ingress and as egress: veth, a
//! bridge, a bridge's port, macvlan, a tap (a VM's NIC: a thread of the test holds its fd and
//! is the VM) and vxlan (an overlay between namespaces). Every datagram arrives intact, the
//! relay's counters agree, and the log names the XDP mode each kind gets with `xdp_mode:
//! auto`: native on veth, a bridge port and tap, skb on bridge, macvlan and vxlan.
//!
//! ```text
//!  sender ns                  relay ns                          receiver ns
//!  snd0 198.18.1.1 ---------- rin 198.18.1.2  [br0 | mv0 | vx0 | tap0]
//!                             rout 198.18.2.1 [br1 | mv1 | vx1 | tap1] ---- rcv0 198.18.2.2
//! ```

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::bail;
use relay::{
    craft::{UdpFrame, build_udp_frame},
    wire::classify,
};
use relay_tests::{
    netns::{Netns, require_root},
    relay_proc::{RelayProc, relay_bin},
    topo::{Receiver, SENDER_ADDR, SENDER_ADDR6, Topology, addr6, link},
    traffic::{Flow, Limits, join, listen, payload, send},
};

mod common;
use common::{inspect, ip, mac_in, seqs, serial, stats_until, stop_clean};

const G4: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
/// A global-scope group: the test's namespaces are the whole of its world.
const G6: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 1, 1);
const PORT: u16 = 5000;
const N: u64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Veth,
    Bridge,
    /// A veth enslaved to a bridge: the relay uses the port itself.
    Port,
    Macvlan,
    Vxlan,
    Tap,
}

impl Kind {
    /// The XDP mode the log names for this kind as ingress with `xdp_mode: auto`: a veth's
    /// driver hands XDP the VLAN tags it keeps in the metadata, so the front that reads them
    /// goes first there.
    fn xdp_mode(self) -> &'static str {
        match self {
            Kind::Veth | Kind::Port => {
                "native (VLAN tags the driver strips read from XDP metadata)"
            }
            Kind::Tap => "native",
            Kind::Bridge | Kind::Macvlan | Kind::Vxlan => "skb (generic)",
        }
    }
}

/// One run's namespaces and interfaces.
struct Kinds {
    topo: Topology,
    input: String,
    output: String,
    /// Where the sender sends from (a tap's frames are written by the test instead).
    source: IpAddr,
    /// The receiver's address on the interface it joins the group on.
    joins_on: IpAddr,
    /// The fds of the taps, held as a VM holds its NIC's.
    tap_in: Option<OwnedFd>,
    tap_out: Option<OwnedFd>,
}

/// linux/if_tun.h.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates tap `name` in `ns` and brings it up; the fd is the VM's end: what is written to
/// it arrives on the tap, what the tap sends is read from it. The tap goes with the fd.
fn tap(ns: &Netns, name: &str) -> OwnedFd {
    let ifname = name.to_owned();
    let fd = join(ns.run(move || {
        // SAFETY: open(2) of a NUL-terminated path; the result is checked.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            bail!("/dev/net/tun: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // struct ifreq: the name, then the flags (a short) in the union.
        let mut req = [0u8; 40];
        req[..ifname.len()].copy_from_slice(ifname.as_bytes());
        req[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req` is big enough for.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) } < 0 {
            bail!("TUNSETIFF {ifname}: {}", std::io::Error::last_os_error());
        }
        Ok(fd)
    }))
    .unwrap();
    ip(ns, &format!("link set {name} up"));
    fd
}

impl Kinds {
    /// The sender's and receiver's veth links to the relay, then `input` and `output` of
    /// their kinds on them.
    fn new(input: Kind, output: Kind) -> Self {
        let sender = Netns::new("ksnd").unwrap();
        let relay = Netns::new("krly").unwrap();
        let receiver = Netns::new("krcv").unwrap();
        link(&sender, "snd0", &relay, "rin").unwrap();
        link(&relay, "rout", &receiver, "rcv0").unwrap();
        // A wire carries full checksums (see topo.rs).
        sender
            .exec(&["ethtool", "-K", "snd0", "tx", "off"])
            .unwrap();
        for (ns, iface, subnet, host) in [
            (&sender, "snd0", 1, 1),
            (&relay, "rin", 1, 2),
            (&relay, "rout", 2, 1),
            (&receiver, "rcv0", 2, 2),
        ] {
            ip(
                ns,
                &format!("addr add 198.18.{subnet}.{host}/24 dev {iface}"),
            );
            addr6(
                ns,
                iface,
                Ipv6Addr::new(0x2001, 2, 0, subnet, 0, 0, 0, host),
            )
            .unwrap();
        }
        // Relayed frames keep the sender's source, which the receiver cannot route back; a
        // device made later (vx1) takes the default.
        for conf in ["all", "default", "rcv0"] {
            receiver
                .exec(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.{conf}.rp_filter=0"),
                ])
                .unwrap();
        }
        let mut k = Kinds {
            input: "rin".to_owned(),
            output: "rout".to_owned(),
            source: SENDER_ADDR.into(),
            joins_on: Ipv4Addr::new(198, 18, 2, 2).into(),
            tap_in: None,
            tap_out: None,
            topo: Topology {
                sender,
                relay,
                receivers: vec![Receiver {
                    ns: receiver,
                    iface: "rcv0".to_owned(),
                    addr: Ipv4Addr::new(198, 18, 2, 2),
                    addr6: Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 2),
                    relay_iface: "rout".to_owned(),
                }],
            },
        };
        k.make_input(input);
        k.make_output(output);
        k.topo.receivers[0].relay_iface = k.output.clone();
        k
    }

    fn make_input(&mut self, kind: Kind) {
        let (s, r) = (&self.topo.sender, &self.topo.relay);
        match kind {
            Kind::Veth => {}
            Kind::Bridge => {
                // The bridge's own device is the ingress: rin's address moves to it.
                bridge(r, "br0", "rin", "", Some("198.18.1.2/24"));
                self.input = "br0".to_owned();
            }
            Kind::Port => bridge(r, "br0", "rin", "", None),
            Kind::Macvlan => {
                macvlan(r, "mv0", "rin", "198.18.1.3/24");
                addr6(r, "mv0", Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 3)).unwrap();
                self.input = "mv0".to_owned();
            }
            Kind::Vxlan => {
                // The sender sends into the overlay; the relay takes the decapsulated frames.
                vxlan(
                    s,
                    r,
                    "vx0",
                    42,
                    ("snd0", "198.18.1.1"),
                    ("rin", "198.18.1.2"),
                    9,
                );
                self.input = "vx0".to_owned();
                self.source = Ipv4Addr::new(198, 18, 9, 1).into();
            }
            Kind::Tap => {
                self.tap_in = Some(tap(r, "tap0"));
                self.input = "tap0".to_owned();
            }
        }
    }

    fn make_output(&mut self, kind: Kind) {
        let r = &self.topo.relay;
        match kind {
            Kind::Veth => {}
            Kind::Bridge => {
                bridge(r, "br1", "rout", " mcast_snooping 0", Some("198.18.2.1/24"));
                self.output = "br1".to_owned();
            }
            Kind::Port => bridge(r, "br1", "rout", " mcast_snooping 0", None),
            Kind::Macvlan => {
                macvlan(r, "mv1", "rout", "198.18.2.3/24");
                self.output = "mv1".to_owned();
            }
            Kind::Vxlan => {
                // The relay sends into the overlay; the receiver joins on its end of it.
                let d = &self.topo.receivers[0].ns;
                vxlan(
                    r,
                    d,
                    "vx1",
                    43,
                    ("rout", "198.18.2.1"),
                    ("rcv0", "198.18.2.2"),
                    8,
                );
                self.output = "vx1".to_owned();
                self.joins_on = Ipv4Addr::new(198, 18, 8, 2).into();
            }
            Kind::Tap => {
                self.tap_out = Some(tap(r, "tap1"));
                self.output = "tap1".to_owned();
            }
        }
    }
}

/// Bridge `br` (made with `options`) with `port` in it, up; with `address`, the port's
/// addresses move to the bridge's own device.
fn bridge(r: &Netns, br: &str, port: &str, options: &str, address: Option<&str>) {
    ip(r, &format!("link add {br} type bridge{options}"));
    ip(r, &format!("link set {port} master {br}"));
    ip(r, &format!("link set {br} up"));
    if let Some(a) = address {
        ip(r, &format!("addr flush dev {port}"));
        ip(r, &format!("addr add {a} dev {br}"));
    }
}

/// Macvlan `name` on `lower` in bridge mode, up, with `address`.
fn macvlan(r: &Netns, name: &str, lower: &str, address: &str) {
    ip(
        r,
        &format!("link add {name} link {lower} type macvlan mode bridge"),
    );
    ip(r, &format!("link set {name} up"));
    ip(r, &format!("addr add {address} dev {name}"));
}

/// A vxlan `name` (VNI `vni`) between `a` and `b` over their underlay `(device, address)`,
/// with 198.18.`subnet`.1 on `a`'s end and .2 on `b`'s.
fn vxlan(
    a: &Netns,
    b: &Netns,
    name: &str,
    vni: u32,
    a_under: (&str, &str),
    b_under: (&str, &str),
    subnet: u8,
) {
    for (ns, (dev, local), (_, remote), host) in
        [(a, a_under, b_under, 1), (b, b_under, a_under, 2)]
    {
        ip(
            ns,
            &format!(
                "link add {name} type vxlan id {vni} local {local} remote {remote} dstport 4789 \
                 dev {dev}"
            ),
        );
        ip(ns, &format!("link set {name} up"));
        ip(
            ns,
            &format!("addr add 198.18.{subnet}.{host}/24 dev {name}"),
        );
    }
}

/// The VM on tap `fd` sends `n` datagrams to `group`:PORT from the sender's address of the
/// group's family, paced as [`send`] paces.
fn tap_send(fd: &OwnedFd, group: IpAddr, n: u64) {
    let source: IpAddr = match group {
        IpAddr::V4(_) => SENDER_ADDR.into(),
        IpAddr::V6(_) => SENDER_ADDR6.into(),
    };
    let flow = Flow::new(group, PORT, n);
    for seq in 0..n {
        let frame = build_udp_frame(&UdpFrame::simple(
            source,
            group,
            PORT,
            8,
            &payload(seq, flow.len),
        ));
        // SAFETY: write(2) of a valid buffer of its length to an open fd.
        let wrote = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(
            wrote,
            frame.len() as isize,
            "writing frame {seq} to the tap: {}",
            std::io::Error::last_os_error()
        );
        if (seq + 1) % flow.burst == 0 {
            std::thread::sleep(flow.pause);
        }
    }
}

/// The VM on tap `fd` reads what the tap sends until `n` UDP frames to `group`:PORT came, or
/// nothing has come for 1.5 s (30 s at most); the frames.
fn tap_receive(fd: OwnedFd, group: IpAddr, n: u64) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || {
        let (start, mut last) = (Instant::now(), Instant::now());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while (got.len() as u64) < n
            && last.elapsed() < Duration::from_millis(1500)
            && start.elapsed() < Duration::from_secs(30)
        {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                continue;
            }
            // SAFETY: read(2) into a buffer valid for its length.
            let len = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(len) = usize::try_from(len) else {
                continue;
            };
            let frame = &buf[..len];
            // The tap also carries the relay's joins and the kernel's own chatter.
            if classify(frame).is_some_and(|f| f.group == group && f.port == PORT) {
                last = Instant::now();
                got.push(frame.to_vec());
            }
        }
        got
    })
}

/// `input` to `output` with `xdp_mode: auto` and `allocator`: every datagram of `group`
/// arrives intact, the counters say so, and the log names the XDP mode the input's kind gets
/// and the copy-mode sockets.
fn relays(input: Kind, output: Kind, group: IpAddr, allocator: &str) {
    require_root();
    let _serial = serial();
    let mut k = Kinds::new(input, output);
    let yaml = format!(
        "xdp_mode: auto\nrules:\n  - name: k\n    input: {{ interface: {}, group: '{group}', \
         port: {PORT} }}\n    outputs:\n      - interface: {}\n",
        k.input, k.output
    );
    let relay = RelayProc::start(
        &relay_bin(),
        &k.topo.relay,
        &yaml,
        &["--allocator", allocator],
    )
    .unwrap();
    let log = std::fs::read_to_string(&relay.stderr).unwrap();
    for line in [
        format!(
            "{}: XDP program attached in {} mode",
            k.input,
            input.xdp_mode()
        ),
        format!("{} queue 0: AF_XDP socket bound in copy mode", k.input),
        format!("{} queue 0: AF_XDP socket bound in copy mode", k.output),
    ] {
        assert!(
            log.contains(&line),
            "{input:?} to {output:?}: {line}\n{log}"
        );
    }

    let rcv = &k.topo.receivers[0];
    let joins_on = match group {
        IpAddr::V4(_) => k.joins_on,
        IpAddr::V6(_) => rcv.addr6.into(),
    };
    // Read now: the tap goes when the VM's reading thread ends and closes its fd.
    let out_mac = mac_in(&k.topo.relay, &k.output);
    let tapped = k.tap_out.take().map(|fd| tap_receive(fd, group, N));
    let listening = match tapped {
        Some(_) => None,
        None => Some(listen(&rcv.ns, group, PORT, joins_on, Limits::new(N)).unwrap()),
    };
    match &k.tap_in {
        Some(fd) => tap_send(fd, group, N),
        None => {
            let source = match group {
                IpAddr::V4(_) => k.source,
                IpAddr::V6(_) => SENDER_ADDR6.into(),
            };
            let sent = join(send(&k.topo.sender, source, Flow::new(group, PORT, N))).unwrap();
            assert_eq!(sent, N);
        }
    }
    let payloads = match (tapped, listening) {
        (Some(t), _) => t
            .join()
            .unwrap()
            .iter()
            .map(|f| {
                let (g, port, _, p) = inspect(f, out_mac);
                assert_eq!((g, port), (group, PORT));
                p
            })
            .collect(),
        (None, Some(l)) => join(l).unwrap(),
        (None, None) => unreachable!(),
    };
    let all: BTreeSet<u64> = (0..N).collect();
    assert_eq!(
        seqs(&payloads),
        all,
        "{input:?} to {output:?}: every datagram, intact\n{}",
        std::fs::read_to_string(&relay.stderr).unwrap()
    );
    let v = stats_until(&relay.control, |v| {
        v.rules[0].received == N && v.rules[0].outputs[0].sent == N
    });
    let (rule, out) = (&v.rules[0], &v.rules[0].outputs[0]);
    assert_eq!((rule.received, out.sent), (N, N), "{v:?}");
    assert!(out.dropped.values().all(|&d| d == 0), "{:?}", out.dropped);
    assert_eq!((v.unmatched, v.malformed), (0, 0));
    stop_clean(relay, &k.topo);
}

#[test]
fn veth_to_veth() {
    relays(Kind::Veth, Kind::Veth, G4.into(), "lockfree");
}

#[test]
fn bridge_ingress() {
    relays(Kind::Bridge, Kind::Veth, G4.into(), "lockfree");
}

#[test]
fn bridge_egress() {
    relays(Kind::Veth, Kind::Bridge, G4.into(), "lockfree");
}

#[test]
fn bridge_port_ingress() {
    relays(Kind::Port, Kind::Veth, G4.into(), "lockfree");
}

#[test]
fn bridge_port_egress() {
    relays(Kind::Veth, Kind::Port, G4.into(), "lockfree");
}

#[test]
fn macvlan_ingress() {
    relays(Kind::Macvlan, Kind::Veth, G4.into(), "lockfree");
}

#[test]
fn macvlan_egress() {
    relays(Kind::Veth, Kind::Macvlan, G4.into(), "lockfree");
}

#[test]
fn vxlan_ingress() {
    relays(Kind::Vxlan, Kind::Veth, G4.into(), "lockfree");
}

#[test]
fn vxlan_egress() {
    relays(Kind::Veth, Kind::Vxlan, G4.into(), "lockfree");
}

#[test]
fn tap_ingress() {
    relays(Kind::Tap, Kind::Veth, G4.into(), "lockfree");
}

#[test]
fn tap_egress() {
    relays(Kind::Veth, Kind::Tap, G4.into(), "lockfree");
}

#[test]
fn macvlan_ingress_ipv6() {
    relays(Kind::Macvlan, Kind::Veth, G6.into(), "lockfree");
}

#[test]
fn tap_ingress_ipv6() {
    relays(Kind::Tap, Kind::Veth, G6.into(), "lockfree");
}

#[test]
fn tap_egress_ipv6() {
    relays(Kind::Veth, Kind::Tap, G6.into(), "lockfree");
}

/// The mutex allocator on a generic-mode ingress and a native one.
#[test]
fn mutex_allocator_macvlan_to_tap() {
    relays(Kind::Macvlan, Kind::Tap, G4.into(), "mutex");
}

#[test]
fn mutex_allocator_tap_to_bridge() {
    relays(Kind::Tap, Kind::Bridge, G4.into(), "mutex");
}
