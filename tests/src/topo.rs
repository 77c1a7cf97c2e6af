//! The test topology: a sender, the relay, and receivers, each in its own namespace.
//!
//! ```text
//!  sender ns            relay ns                          receiver ns
//!  snd0 198.18.1.1 ---- rin 198.18.1.2
//!                       rout0 198.18.2.1 -------------- rcv0 198.18.2.2   (rx0)
//!                       rout1 198.18.3.1 -------------- rcv1 198.18.3.2   (rx1)
//! ```
//!
//! Each link also has IPv6 addresses from the benchmarking prefix 2001:2::/48 (RFC 5180):
//! 2001:2:0:N::1 on the relay's side and 2001:2:0:N::2 on the other, N as the IPv4 subnet
//! (the sender is 2001:2:0:1::1, the relay's ingress 2001:2:0:1::2).

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use crate::netns::Netns;

pub const SENDER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const RELAY_IN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const SENDER_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
pub const RELAY_IN_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);
pub const RELAY_IN: &str = "rin";
pub const SENDER_IF: &str = "snd0";

/// One receiver: its namespace, interface and address.
pub struct Receiver {
    pub ns: Netns,
    pub iface: String,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    /// The relay's interface that faces it.
    pub relay_iface: String,
}

pub struct Topology {
    pub sender: Netns,
    pub relay: Netns,
    pub receivers: Vec<Receiver>,
}

impl Topology {
    /// Builds the topology with `n` receivers (at most 200).
    pub fn new(n: usize) -> Result<Self> {
        Self::with_queues(n, 1)
    }

    /// As [`Topology::new`], with `queues` rx and tx queues on both ends of the sender's
    /// link: the sender's flows spread over the queues by their hash, and each lands on the
    /// relay's rx queue of the same number.
    pub fn with_queues(n: usize, queues: u32) -> Result<Self> {
        assert!((1..=200).contains(&n));
        let sender = Netns::new("snd")?;
        let relay = Netns::new("rly")?;
        sender_link(&sender, &relay, queues)?;
        let mut receivers = Vec::with_capacity(n);
        for i in 0..n {
            let ns = Netns::new(&format!("rx{i}"))?;
            let relay_iface = format!("rout{i}");
            let iface = format!("rcv{i}");
            link(&relay, &relay_iface, &ns, &iface)?;
            let subnet = 2 + i as u8;
            addr(&relay, &relay_iface, Ipv4Addr::new(198, 18, subnet, 1))?;
            let a = Ipv4Addr::new(198, 18, subnet, 2);
            addr(&ns, &iface, a)?;
            let subnet6 = u16::from(subnet);
            addr6(
                &relay,
                &relay_iface,
                Ipv6Addr::new(0x2001, 2, 0, subnet6, 0, 0, 0, 1),
            )?;
            let a6 = Ipv6Addr::new(0x2001, 2, 0, subnet6, 0, 0, 0, 2);
            addr6(&ns, &iface, a6)?;
            // Relayed frames keep the sender's source address, which is not reachable through
            // the receiver's interface; strict reverse-path filtering would drop them.
            for conf in ["all", "default", iface.as_str()] {
                ns.exec(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.{conf}.rp_filter=0"),
                ])?;
            }
            receivers.push(Receiver {
                ns,
                iface,
                addr: a,
                addr6: a6,
                relay_iface,
            });
        }
        Ok(Topology {
            sender,
            relay,
            receivers,
        })
    }

    /// Creates receiver `i`'s link again, with the same names and addresses, after its
    /// relay-side interface was deleted (which deletes the peer too).
    pub fn relink_receiver(&self, i: usize) -> Result<()> {
        let r = &self.receivers[i];
        link(&self.relay, &r.relay_iface, &r.ns, &r.iface)?;
        let subnet = 2 + i as u8;
        addr(
            &self.relay,
            &r.relay_iface,
            Ipv4Addr::new(198, 18, subnet, 1),
        )?;
        addr(&r.ns, &r.iface, r.addr)?;
        let subnet6 = u16::from(subnet);
        addr6(
            &self.relay,
            &r.relay_iface,
            Ipv6Addr::new(0x2001, 2, 0, subnet6, 0, 0, 0, 1),
        )?;
        addr6(&r.ns, &r.iface, r.addr6)?;
        r.ns.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{}.rp_filter=0", r.iface),
        ])?;
        Ok(())
    }

    /// Creates the sender's link (snd0 -- rin) again, with the same names and addresses,
    /// after `rin` was deleted (which deletes snd0 too).
    pub fn relink_ingress(&self) -> Result<()> {
        sender_link(&self.sender, &self.relay, 1)
    }

    /// A second link from the sender to the relay, `sender_if` 198.18.`subnet`.1 to
    /// `relay_if` 198.18.`subnet`.2; returns the sender's address on it.
    pub fn add_ingress(&self, relay_if: &str, sender_if: &str, subnet: u8) -> Result<Ipv4Addr> {
        link(&self.sender, sender_if, &self.relay, relay_if)?;
        let a = Ipv4Addr::new(198, 18, subnet, 1);
        addr(&self.sender, sender_if, a)?;
        addr(&self.relay, relay_if, Ipv4Addr::new(198, 18, subnet, 2))?;
        self.sender
            .exec(&["ethtool", "-K", sender_if, "tx", "off"])?;
        Ok(a)
    }

    /// Turns the sender's transmit checksum offload back on, as a veth has it by default: its
    /// UDP frames then reach the relay with a partial checksum, as a container's do.
    pub fn sender_tx_offload_on(&self) -> Result<()> {
        self.sender
            .exec(&["ethtool", "-K", SENDER_IF, "tx", "on"])?;
        let features = self.sender.exec(&["ethtool", "-k", SENDER_IF])?;
        anyhow::ensure!(
            features
                .lines()
                .any(|l| l.trim() == "tx-checksum-ip-generic: on"),
            "{SENDER_IF}: tx checksum offload did not turn on:\n{features}"
        );
        Ok(())
    }

    /// Whether any interface in the relay namespace still has an XDP program attached.
    pub fn relay_has_xdp(&self) -> Result<bool> {
        let links = self.relay.exec(&["ip", "-d", "link", "show"])?;
        Ok(links.contains("prog/xdp") || links.contains(" xdp"))
    }
}

/// The sender's link to the relay's ingress, with its addresses and multicast route.
fn sender_link(sender: &Netns, relay: &Netns, queues: u32) -> Result<()> {
    link_queues(sender, SENDER_IF, relay, RELAY_IN, queues)?;
    addr(sender, SENDER_IF, SENDER_ADDR)?;
    addr(relay, RELAY_IN, RELAY_IN_ADDR)?;
    addr6(sender, SENDER_IF, SENDER_ADDR6)?;
    addr6(relay, RELAY_IN, RELAY_IN_ADDR6)?;
    // A wire carries checksums in full, and so does the sender here, by default: a veth
    // with tx offload hands over partial UDP checksums, which the relay completes, and
    // `sender_tx_offload_on` is for the tests of that.
    sender.exec(&["ethtool", "-K", SENDER_IF, "tx", "off"])?;
    sender.exec(&["ip", "route", "add", "224.0.0.0/4", "dev", SENDER_IF])?;
    Ok(())
}

/// A veth pair, `a_if` in `a` and `b_if` in `b`, both up.
pub fn link(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    link_queues(a, a_if, b, b_if, 1)
}

fn link_queues(a: &Netns, a_if: &str, b: &Netns, b_if: &str, queues: u32) -> Result<()> {
    let q = queues.to_string();
    crate::netns::sh(&[
        "ip",
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
    ])?;
    a.exec(&["ip", "link", "set", a_if, "up"])?;
    b.exec(&["ip", "link", "set", b_if, "up"])?;
    Ok(())
}

fn addr(ns: &Netns, iface: &str, a: Ipv4Addr) -> Result<()> {
    ns.exec(&["ip", "addr", "add", &format!("{a}/24"), "dev", iface])?;
    Ok(())
}

/// Gives `iface` in `ns` the address `a`/64, usable at once.
pub fn addr6(ns: &Netns, iface: &str, a: Ipv6Addr) -> Result<()> {
    // No duplicate address detection: the address is usable at once, and these links hold
    // nobody else.
    ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{a}/64"),
        "dev",
        iface,
        "nodad",
    ])?;
    Ok(())
}
