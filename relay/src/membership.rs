//! Group membership on the ingress interfaces.
//!
//! An AF_XDP socket cannot join a multicast group, yet a switch that snoops IGMP or MLD, or a
//! NIC's multicast filter, delivers a group only to ports where someone joined it. So for every
//! ingress (interface, group) the relay joins through an ordinary UDP socket of the group's
//! family: source-specific (IGMPv3 / MLDv2 INCLUDE) for (S,G) rules, any-source otherwise. The socket is never bound to a
//! port, so it receives nothing; it only holds the membership, and closing it leaves.
//! One socket per membership keeps clear of the per-socket limits (igmp_max_memberships,
//! igmp_max_msf, and their MLD counterparts).

use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Result, bail};
use log::info;

use crate::rules::RuleTable;

/// One membership: (interface name, ifindex, group, source for source-specific joins).
pub type Membership = (String, u32, IpAddr, Option<IpAddr>);

/// The memberships a rule table needs, one per (interface, group, source); an any-source
/// membership makes source-specific ones for the same (interface, group) redundant.
pub fn wanted(table: &RuleTable) -> Vec<Membership> {
    let mut any: BTreeSet<(u32, IpAddr)> = BTreeSet::new();
    // A rule whose input does not exist yet joins nothing until it does; a unicast input
    // has no group to join, and a range cannot be joined group by group (its interface is
    // put into allmulticast mode instead).
    // A merged rule joins on each of its legs.
    let inputs = || {
        table
            .rules
            .iter()
            .flat_map(|r| r.inputs())
            .filter(|i| i.ifindex != 0 && !i.unicast && i.prefix.is_host())
    };
    // A source prefix cannot be joined source-specifically: it joins any-source.
    let one_source =
        |i: &crate::rules::CompiledInput| i.source.filter(|s| s.is_host()).map(|s| s.addr);
    for i in inputs() {
        if one_source(&i).is_none() {
            any.insert((i.ifindex, i.group));
        }
    }
    let mut out: BTreeSet<(u32, IpAddr, Option<IpAddr>)> = BTreeSet::new();
    for i in inputs() {
        let src = if any.contains(&(i.ifindex, i.group)) {
            None
        } else {
            one_source(&i)
        };
        out.insert((i.ifindex, i.group, src));
    }
    out.into_iter()
        .map(|(ifindex, g, s)| {
            let name = table
                .ingress
                .iter()
                .find(|i| i.info.ifindex == ifindex)
                .map_or_else(|| ifindex.to_string(), |i| i.name.clone());
            (name, ifindex, g, s)
        })
        .collect()
}

/// A membership as the log names it: `(S, G) (IGMPv3 source-specific)` or `G (IGMP)`.
fn describe(m: &Membership) -> String {
    let (any, ssm) = if m.2.is_ipv4() {
        ("IGMP", "IGMPv3")
    } else {
        ("MLD", "MLDv2")
    };
    match m.3 {
        Some(s) => format!("({s}, {}) ({ssm} source-specific)", m.2),
        None => format!("{} ({any})", m.2),
    }
}

/// Held memberships; dropping this leaves every group.
pub struct Memberships {
    held: Vec<(Membership, OwnedFd)>,
}

impl Memberships {
    /// Joins every membership the table needs, logging each.
    pub fn join(table: &RuleTable) -> Result<Self> {
        let mut held = Vec::new();
        for m in wanted(table) {
            let fd = join_one(&m)?;
            info!("{}: joined {}", m.0, describe(&m));
            held.push((m, fd));
        }
        Ok(Self { held })
    }

    /// Joins what `table` needs and is not held yet; all or nothing (what this call joined is
    /// left again if one join fails). Returns what it joined, for [`Memberships::leave`].
    pub fn join_new(&mut self, table: &RuleTable) -> Result<Vec<Membership>> {
        let mut joined = Vec::new();
        for m in wanted(table) {
            if self.held.iter().any(|(h, _)| *h == m) {
                continue;
            }
            match join_one(&m) {
                Ok(fd) => {
                    info!("{}: joined {}", m.0, describe(&m));
                    self.held.push((m.clone(), fd));
                    joined.push(m);
                }
                Err(e) => {
                    self.leave(&joined);
                    return Err(e);
                }
            }
        }
        Ok(joined)
    }

    /// Leaves what `table` no longer needs.
    pub fn leave_unwanted(&mut self, table: &RuleTable) {
        let want = wanted(table);
        let unwanted: Vec<Membership> = self
            .held
            .iter()
            .filter(|(m, _)| !want.contains(m))
            .map(|(m, _)| m.clone())
            .collect();
        self.leave(&unwanted);
    }

    /// Leaves these memberships.
    pub fn leave(&mut self, these: &[Membership]) {
        self.held.retain(|(m, _)| {
            let go = these.contains(m);
            if go {
                info!(
                    "{}: left {}",
                    crate::sys::device_label(&m.0, m.1),
                    describe(m)
                );
            }
            !go
        });
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

impl Drop for Memberships {
    fn drop(&mut self) {
        for (m, fd) in self.held.drain(..) {
            drop(fd);
            info!(
                "{}: left {}",
                crate::sys::device_label(&m.0, m.1),
                describe(&m)
            );
        }
    }
}

fn sockaddr(addr: IpAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data, large and aligned enough for any sockaddr.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let p = &mut ss as *mut libc::sockaddr_storage;
    match addr {
        IpAddr::V4(a) => {
            // SAFETY: as above; the cast views the start of the storage as a sockaddr_in.
            let sin = unsafe { &mut *p.cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
        }
        IpAddr::V6(a) => {
            // SAFETY: as above, as a sockaddr_in6.
            let sin6 = unsafe { &mut *p.cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = a.octets();
        }
    }
    ss
}

/// setsockopt(`level`, `name`) with a typed value; the raw return code.
fn set_opt<T>(sock: &OwnedFd, level: i32, name: i32, value: &T) -> i32 {
    // SAFETY: a valid socket and a fully initialised T of the size passed.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    }
}

fn join_one((name, ifindex, group, source): &Membership) -> Result<OwnedFd> {
    let (family, level) = match group {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_IP),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_IPV6),
    };
    // SAFETY: socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!(
            "socket for joining {group}: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let rc = match source {
        None => set_opt(
            &sock,
            level,
            libc::MCAST_JOIN_GROUP,
            &libc::group_req {
                gr_interface: *ifindex,
                gr_group: sockaddr(*group),
            },
        ),
        Some(src) => set_opt(
            &sock,
            level,
            libc::MCAST_JOIN_SOURCE_GROUP,
            &libc::group_source_req {
                gsr_interface: *ifindex,
                gsr_group: sockaddr(*group),
                gsr_source: sockaddr(*src),
            },
        ),
    };
    if rc != 0 {
        bail!(
            "{name}: joining {group}{}: {}",
            source.map_or(String::new(), |s| format!(" from {s}")),
            std::io::Error::last_os_error()
        );
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Config, tests::fake},
        rules::RuleTable,
    };

    #[test]
    fn one_membership_per_interface_group_and_source() {
        let yaml = "rules:
  - name: a
    input: {interface: in0, group: 239.1.1.1, port: 5000}
    outputs: [{interface: out0}]
  - name: b
    input: {interface: in0, group: 239.1.1.1, port: 5001}
    outputs: [{interface: out0}]
  - name: c
    input: {interface: in0, group: 239.1.1.1, port: 5002, source: 198.18.1.1}
    outputs: [{interface: out0}]
  - name: d
    input: {interface: in0, group: 239.2.2.2, source: 198.18.1.1}
    outputs: [{interface: out0}]
  - name: e
    input: {interface: in0, group: 239.2.2.2, port: 7, source: 198.18.1.9}
    outputs: [{interface: out0}]
  - name: unicast-in
    input: {interface: in0, destination: 198.18.1.2, port: 7100}
    outputs: [{interface: out0, group: 239.9.9.9}]
  - name: unicast-out
    input: {interface: in0, group: 239.3.3.3, port: 7100}
    outputs: [{interface: out0, destination: 198.18.2.2}]
";
        let c = Config::parse("t", yaml).unwrap();
        let t = RuleTable::compile(&c, "t", &fake()).unwrap();
        let w: Vec<(IpAddr, Option<IpAddr>)> = wanted(&t).into_iter().map(|m| (m.2, m.3)).collect();
        assert_eq!(
            w,
            [
                (IpAddr::from([239, 1, 1, 1]), None),
                (
                    IpAddr::from([239, 2, 2, 2]),
                    Some(IpAddr::from([198, 18, 1, 1]))
                ),
                (
                    IpAddr::from([239, 2, 2, 2]),
                    Some(IpAddr::from([198, 18, 1, 9]))
                ),
                // A group input with a unicast output joins its group; a unicast input
                // (198.18.1.2) joins nothing.
                (IpAddr::from([239, 3, 3, 3]), None),
            ]
        );
    }
}
