//! The IGMP/MLD querier on the interfaces of on-demand outputs: the thin I/O around
//! [`crate::listeners`], which holds the protocol and no sockets.
//!
//! One packet socket per interface (AF_PACKET, a classic BPF filter that lets IGMP and
//! ICMPv6 through and nothing else, allmulticast held by the socket so that the NIC delivers
//! reports sent to group MACs, and released by the kernel however the relay ends; each frame
//! comes with its VLAN tag, if it had one, as auxiliary data, since the kernel takes the
//! tag off before packet sockets see the frame). One
//! thread reads them, drives one [`Router`] per (interface, family), sends the queries the
//! routers ask for, and writes the [`ListenSlot`]s the data path reads.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use crate::{
    config::{QuerierConfig, System},
    listeners::{
        router::{Event, Family, FilterMode, Router, Timers},
        wire::{self, Received, Refusal},
    },
    ondemand::{Filter, ListenKey, ListenSlot},
};

/// The longest the thread sleeps: how soon it sees a new interface or a stop.
const TICK: Duration = Duration::from_millis(100);
/// The largest frame read; membership reports longer than this are truncated and refused.
const FRAME: usize = 9216;

/// The routers' timers from the config.
pub fn timers(q: &QuerierConfig) -> Timers {
    let (query_interval, query_response_interval, last_member_query_interval) = q.durations();
    Timers {
        query_interval,
        query_response_interval,
        last_member_query_interval,
        robustness: q.robustness,
    }
}

/// One membership as `relay members` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub interface: String,
    pub group: String,
    /// `include` or `exclude` (IGMPv3/MLDv2 filter mode).
    pub mode: String,
    /// The compatibility mode the group runs in: `v1`, `v2`, `v3` (IGMP) or `mldv1`,
    /// `mldv2`.
    pub version: String,
    /// Sources with the milliseconds left on their timers (INCLUDE: forwarded; EXCLUDE:
    /// those with time left are forwarded, those at 0 are blocked).
    pub sources: Vec<(String, u64)>,
    /// Milliseconds left on the group timer (0 in INCLUDE mode).
    pub expires_ms: u64,
    pub last_reporter: Option<String>,
}

/// One interface's querier state, for `relay members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuerierView {
    pub interface: String,
    pub family: String,
    /// The relay sends the general queries on this link (no querier with a lower address).
    pub querier: bool,
    pub address: String,
    /// Reports and queries refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Reports taken although they break a rule other routers do not enforce either, by
    /// what they broke (`no_router_alert`: IGMPv2 reports without the Router Alert option).
    #[serde(default)]
    pub accepted: BTreeMap<String, u64>,
    pub members: Vec<MemberView>,
}

/// The querier: owns the thread.
pub struct Querier {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Each step finishes its writes to the slots last; a panic elsewhere leaves the state
        // usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct State {
    epoch: Instant,
    timers: Timers,
    /// In the order `track` was given them, without duplicates.
    targets: Vec<(ListenKey, Arc<ListenSlot>)>,
    links: BTreeMap<u32, Link>,
    /// (interface, group) whose forwarding may have changed since the slots were written.
    changed: BTreeSet<(u32, IpAddr)>,
}

/// One interface the relay is querier on.
struct Link {
    name: String,
    socket: OwnedFd,
    mac: [u8; 6],
    v4: Option<Router>,
    v6: Option<Router>,
    /// Refused reports and queries by reason: [IPv4, IPv6].
    refused: [BTreeMap<&'static str, u64>; 2],
    /// Reports taken though flawed, by flaw: [IPv4, IPv6].
    accepted: [BTreeMap<&'static str, u64>; 2],
    /// The interface's IPv4 subnets, which reports must come from (RFC 3376 §9.2).
    subnets: Subnets,
}

impl Link {
    fn router(&mut self, ip: IpAddr) -> Option<&mut Router> {
        match ip {
            IpAddr::V4(_) => self.v4.as_mut(),
            IpAddr::V6(_) => self.v6.as_mut(),
        }
    }
}

impl Querier {
    /// Starts the thread, querying nowhere yet.
    pub fn start(config: &QuerierConfig) -> Result<Querier> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                epoch: Instant::now(),
                timers: timers(config),
                targets: Vec::new(),
                links: BTreeMap::new(),
                changed: BTreeSet::new(),
            }),
            stop: AtomicBool::new(false),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("relay-querier".into())
            .spawn(move || run(&worker))
            .context("spawning the querier thread")?;
        Ok(Querier {
            shared,
            thread: Some(thread),
        })
    }

    /// Makes `wanted` the set of on-demand outputs followed; one slot per entry, in order.
    /// An entry followed before keeps its slot (and so its state across a reload); a new
    /// interface gets its socket and routers here, so a failure to open one fails the caller.
    /// Interfaces no entry names any more are left: their routers stop.
    pub fn track(
        &self,
        wanted: &[ListenKey],
        sys: &dyn System,
        names: &dyn Fn(u32) -> Option<String>,
    ) -> Result<Vec<Arc<ListenSlot>>> {
        let mut st = self.shared.state();
        let now = st.epoch.elapsed();
        let timers = st.timers;
        for key in wanted {
            let link = match st.links.entry(key.ifindex) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let name = names(key.ifindex)
                        .with_context(|| format!("no interface has ifindex {}", key.ifindex))?;
                    let info = sys.interface(&name).with_context(|| {
                        format!("{name}: the interface of an on-demand output is gone")
                    })?;
                    let socket = open(key.ifindex)
                        .with_context(|| format!("{name}: opening the IGMP/MLD packet socket"))?;
                    info!(
                        "{name}: IGMP/MLD querier for on-demand outputs (query interval {} s)",
                        timers.query_interval.as_secs()
                    );
                    e.insert(Link {
                        name,
                        socket,
                        mac: info.mac,
                        v4: None,
                        v6: None,
                        refused: Default::default(),
                        accepted: Default::default(),
                        subnets: Subnets::default(),
                    })
                }
            };
            let name = link.name.clone();
            link.subnets.read(&name, now);
            let addresses = sys.addresses(&name);
            // The interface was readdressed: the election runs again with the new address.
            for (router, v4) in [(link.v4.as_mut(), true), (link.v6.as_mut(), false)] {
                if let Some(r) = router
                    && r.address() != own_address(&addresses, v4)
                {
                    r.set_address(own_address(&addresses, v4), now);
                }
            }
            match key.group {
                IpAddr::V4(_) if link.v4.is_none() => {
                    let own = own_address(&addresses, true);
                    link.v4 = Some(Router::new(Family::V4, own, timers, now));
                }
                IpAddr::V6(_) if link.v6.is_none() => {
                    let own = own_address(&addresses, false);
                    link.v6 = Some(Router::new(Family::V6, own, timers, now));
                }
                _ => {}
            }
        }
        let mut old: BTreeMap<ListenKey, Arc<ListenSlot>> = st.targets.drain(..).collect();
        let mut slots = Vec::with_capacity(wanted.len());
        for key in wanted {
            if let Some((_, s)) = st.targets.iter().find(|(k, _)| k == key) {
                slots.push(s.clone());
                continue;
            }
            let slot = old.remove(key).unwrap_or_default();
            slots.push(slot.clone());
            st.targets.push((*key, slot));
        }
        for gone in old.values() {
            gone.set(false);
        }
        let keep: Vec<u32> = st.targets.iter().map(|(k, _)| k.ifindex).collect();
        st.links.retain(|ifindex, l| {
            let kept = keep.contains(ifindex);
            if !kept {
                info!("{}: no on-demand output left; querier stopped", l.name);
            }
            kept
        });
        // Each router keeps state only for the groups its interface's outputs send to.
        for (ifindex, link) in st.links.iter_mut() {
            for (router, v4) in [(link.v4.as_mut(), true), (link.v6.as_mut(), false)] {
                let Some(r) = router else { continue };
                let groups = wanted
                    .iter()
                    .filter(|k| k.ifindex == *ifindex && k.group.is_ipv4() == v4)
                    .map(|k| k.group)
                    .collect();
                r.set_forwardable(Some(groups));
            }
        }
        st.refresh_all(true);
        Ok(slots)
    }

    /// New timers from a reload: routers made from now on use them; the running ones keep
    /// theirs until their interface's routers are made again.
    pub fn set_timers(&self, config: &QuerierConfig) {
        self.shared.state().timers = timers(config);
    }

    /// Every interface's querier state and members.
    pub fn describe(&self) -> Vec<QuerierView> {
        let st = self.shared.state();
        let now = st.epoch.elapsed();
        let mut out = Vec::new();
        for l in st.links.values() {
            for (i, (family, r)) in [("ipv4", &l.v4), ("ipv6", &l.v6)].into_iter().enumerate() {
                let Some(r) = r else { continue };
                out.push(QuerierView {
                    interface: l.name.clone(),
                    family: family.to_owned(),
                    querier: r.is_querier(),
                    address: r.address().to_string(),
                    refused: refusals(&l.refused[i], r),
                    accepted: l.accepted[i]
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), *v))
                        .collect(),
                    members: r
                        .groups(now)
                        .into_iter()
                        .map(|g| MemberView {
                            interface: l.name.clone(),
                            group: g.group.to_string(),
                            mode: g.mode.to_string(),
                            version: g.compat.to_string(),
                            sources: g
                                .sources
                                .iter()
                                .map(|s| (s.source.to_string(), s.remaining.as_millis() as u64))
                                .collect(),
                            expires_ms: g.timer.map_or(0, |t| t.as_millis() as u64),
                            last_reporter: g.last_reporter.map(|a| a.to_string()),
                        })
                        .collect(),
                });
            }
        }
        out
    }
}

impl Drop for Querier {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            warn!("querier thread panicked");
        }
    }
}

impl std::fmt::Debug for Querier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Querier").finish_non_exhaustive()
    }
}

/// Writes what `router` says the hosts want into the slot of `key`; whether anyone listens.
fn write_slot(router: &Router, key: &ListenKey, slot: &ListenSlot) -> bool {
    match key.source {
        // The frames carry one known source: the slot is on or off for it.
        Some(_) => {
            let on = router.forwards(key.group, key.source);
            slot.set(on);
            on
        }
        // Each frame is decided by its own source.
        None => {
            let filter = router.filter(key.group);
            slot.set_filter(match &filter {
                None => Filter::Off,
                Some((FilterMode::Exclude, s)) if s.is_empty() => Filter::Any,
                Some((FilterMode::Include, s)) => Filter::Include(s),
                Some((FilterMode::Exclude, s)) => Filter::Exclude(s),
            });
            filter.is_some()
        }
    }
}

/// What `relay members` lists as refused for one router: the reports the parser refused, and
/// those the router ignored (source-specific groups reported the old way or in EXCLUDE mode,
/// groups no output sends to, groups and sources over its bounds); zero counts are left out.
fn refusals(parsed: &BTreeMap<&'static str, u64>, r: &Router) -> BTreeMap<String, u64> {
    let i = r.ignored();
    let ignored = [
        ("ssm_old_version", i.ssm_old_version),
        ("ssm_exclude", i.ssm_exclude),
        ("not_forwarded", i.not_forwarded),
        ("over_limit", r.dropped_over_limit()),
    ];
    parsed
        .iter()
        .map(|(k, v)| (*k, *v))
        .chain(ignored.into_iter().filter(|(_, v)| *v > 0))
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// The address a router queries from: the interface's primary IPv4 address, or its IPv6
/// link-local one (RFC 3810 §5.1.14 wants a link-local source); the unspecified address when
/// it has none (yet). Hosts answer a query from 0.0.0.0 (the Linux bridge sends them so), and
/// in the election such a router ranks below every querier with an address: it yields to
/// any it hears.
fn own_address(addresses: &[IpAddr], v4: bool) -> IpAddr {
    let found = addresses.iter().copied().find(|a| match a {
        IpAddr::V4(_) => v4,
        IpAddr::V6(a) => !v4 && a.segments()[0] & 0xffc0 == 0xfe80,
    });
    found.unwrap_or(if v4 {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    })
}

impl State {
    /// Sends what the routers ask for and writes the slots of the groups whose forwarding
    /// changed (every slot when `all`) from the routers' state. Nothing here walks the
    /// groups: a wake-up with nothing new costs a look at each router's queues.
    fn refresh_all(&mut self, all: bool) {
        let ifindexes: Vec<u32> = self.links.keys().copied().collect();
        for ifindex in ifindexes {
            self.flush(ifindex);
        }
        if all || !self.changed.is_empty() {
            self.write_slots(all);
        }
        self.changed.clear();
    }

    /// One link: its queries out, its events noted for [`State::write_slots`].
    fn flush(&mut self, ifindex: u32) {
        let Some(link) = self.links.get_mut(&ifindex) else {
            return;
        };
        for router in [link.v4.as_mut(), link.v6.as_mut()].into_iter().flatten() {
            while let Some(q) = router.poll_transmit() {
                let frame = wire::build_query(&q, link.mac, router.address());
                // SAFETY: `frame` is a valid buffer of its length for the call; the socket is
                // bound to the interface, so the frame needs no address.
                let sent = unsafe {
                    libc::send(
                        link.socket.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                    )
                };
                if sent < 0 {
                    debug!(
                        "{}: sending a query: {}",
                        link.name,
                        io::Error::last_os_error()
                    );
                }
            }
            while let Some(Event::Changed { group }) = router.poll_event() {
                self.changed.insert((ifindex, group));
            }
        }
    }

    /// The slots of the changed groups (every slot when `all`), from their routers; every
    /// slot's count of groups (a group that came or went changed it for all).
    fn write_slots(&mut self, all: bool) {
        for (key, slot) in &self.targets {
            let Some(link) = self.links.get(&key.ifindex) else {
                slot.set(false);
                continue;
            };
            let router = match key.group {
                IpAddr::V4(_) => link.v4.as_ref(),
                IpAddr::V6(_) => link.v6.as_ref(),
            };
            let Some(router) = router else {
                slot.set(false);
                continue;
            };
            slot.set_groups(router.group_count() as u32);
            if !all && !self.changed.contains(&(key.ifindex, key.group)) {
                continue;
            }
            let was = slot.on();
            let on = write_slot(router, key, slot);
            if on != was {
                info!(
                    "{}: {} {} listeners for {}{}",
                    link.name,
                    if on { "now has" } else { "has no more" },
                    if key.group.is_ipv4() { "IGMP" } else { "MLD" },
                    key.group,
                    key.source.map_or(String::new(), |s| format!(" from {s}"))
                );
            }
        }
    }
}

fn run(shared: &Shared) {
    let mut buf = vec![0u8; FRAME];
    while !shared.stop.load(Ordering::Relaxed) {
        let (fds, wait) = {
            let st = shared.state();
            let now = st.epoch.elapsed();
            let next = st
                .links
                .values()
                .flat_map(|l| [l.v4.as_ref(), l.v6.as_ref()])
                .flatten()
                .filter_map(Router::poll_timeout)
                .min();
            let wait = next.map_or(TICK, |t| t.saturating_sub(now).min(TICK));
            let fds: Vec<(u32, i32)> = st
                .links
                .iter()
                .map(|(i, l)| (*i, l.socket.as_raw_fd()))
                .collect();
            (fds, wait)
        };
        let mut polls: Vec<libc::pollfd> = fds
            .iter()
            .map(|&(_, fd)| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `polls` is a valid array of its length for the call. A descriptor closed
        // meanwhile by `track` (under the lock, not held here) makes poll report POLLNVAL
        // for it, or the number was reused and its readiness is read below through the
        // state again, by ifindex.
        let n = unsafe {
            libc::poll(
                polls.as_mut_ptr(),
                polls.len() as libc::nfds_t,
                wait.as_millis().max(1) as i32,
            )
        };
        let mut st = shared.state();
        let now = st.epoch.elapsed();
        if n > 0 {
            for (p, &(ifindex, _)) in polls.iter().zip(&fds) {
                if p.revents & libc::POLLIN != 0 {
                    st.receive(ifindex, &mut buf, now);
                }
            }
        }
        for link in st.links.values_mut() {
            for r in [link.v4.as_mut(), link.v6.as_mut()].into_iter().flatten() {
                r.handle_timeout(now);
            }
        }
        st.refresh_all(false);
    }
}

impl State {
    /// Reads what is waiting on one link's socket and hands it to its routers.
    fn receive(&mut self, ifindex: u32, buf: &mut [u8], now: Duration) {
        let Some(link) = self.links.get_mut(&ifindex) else {
            return;
        };
        while let Some((n, tagged)) = recv_tagged(&link.socket, buf) {
            let frame = &buf[..n];
            let verdict = wire::parse(frame).and_then(|got| {
                admit(&got, tagged, |a| link.subnets.holds(a, &link.name, now))?;
                Ok(got)
            });
            match verdict {
                Ok(got) => {
                    let v6 = usize::from(got.source.is_ipv6());
                    if got.missing_router_alert {
                        *link.accepted[v6].entry("no_router_alert").or_default() += 1;
                    }
                    if let Some(r) = link.router(got.source) {
                        r.receive(got.source, &got.message, now);
                    }
                }
                Err(Refusal::NotMembership) => {}
                Err(e) => {
                    // The family by the ethertype (after one VLAN tag): what the refused
                    // frame claimed to be.
                    let at = if frame[12..14] == [0x81, 0x00] {
                        16
                    } else {
                        12
                    };
                    let v6 = frame.get(at..at + 2) == Some(&[0x86, 0xdd][..]);
                    *link.refused[usize::from(v6)].entry(e.name()).or_default() += 1;
                }
            }
        }
    }
}

/// Whether a parsed message is one for the router: not from another VLAN (`tagged`), and a
/// report or leave from an IPv4 source on one of the interface's subnets (`on_subnet`), or
/// from 0.0.0.0 (RFC 3376 §4.2.13: a host without an address yet). Queries are exempt from
/// the subnet check (§9.2 concerns reports; a querier's address matters only to the
/// election), and so is MLD, which comes from link-local addresses only.
fn admit(
    got: &Received,
    tagged: bool,
    on_subnet: impl FnOnce(Ipv4Addr) -> bool,
) -> Result<(), Refusal> {
    if tagged {
        return Err(Refusal::VlanTagged);
    }
    if let IpAddr::V4(source) = got.source
        && !matches!(got.message, wire::Message::Query(_))
        && !source.is_unspecified()
        && !on_subnet(source)
    {
        return Err(Refusal::OffSubnet);
    }
    Ok(())
}

/// How long a link's subnets are trusted before a report from outside them makes the
/// thread read them again: an address added since is then seen within this time, and a
/// flood of off-subnet reports costs at most one address dump per link per interval.
const SUBNETS_STALE: Duration = Duration::from_secs(1);

/// An interface's IPv4 subnets, as (network address, prefix length), and when they were read.
#[derive(Debug, Default)]
struct Subnets {
    nets: Vec<(Ipv4Addr, u8)>,
    read_at: Option<Duration>,
}

impl Subnets {
    fn read(&mut self, name: &str, now: Duration) {
        self.nets = interface_subnets(name);
        self.read_at = Some(now);
    }

    /// Whether `a` is on one of the subnets, reading them again first if they are stale
    /// and `a` is on none. An interface without IPv4 addresses holds every source: there
    /// is nothing to tell a neighbour by, and an unaddressed output link is a supported
    /// setup.
    fn holds(&mut self, a: Ipv4Addr, name: &str, now: Duration) -> bool {
        if !self.nets.is_empty() && on_subnet(a, &self.nets) {
            return true;
        }
        if self
            .read_at
            .is_none_or(|t| now.saturating_sub(t) >= SUBNETS_STALE)
        {
            self.read(name, now);
        }
        self.nets.is_empty() || on_subnet(a, &self.nets)
    }
}

fn on_subnet(a: Ipv4Addr, nets: &[(Ipv4Addr, u8)]) -> bool {
    nets.iter().any(|&(net, len)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        u32::from(a) & mask == u32::from(net) & mask
    })
}

/// The IPv4 subnets of `name`'s addresses (and of a point-to-point peer's), from
/// getifaddrs; empty when it has none or cannot be read.
fn interface_subnets(name: &str) -> Vec<(Ipv4Addr, u8)> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let v4 = |a: &Option<nix::sys::socket::SockaddrStorage>| {
        a.as_ref().and_then(|a| a.as_sockaddr_in()).map(|a| a.ip())
    };
    let mut out = Vec::new();
    for i in all.filter(|i| i.interface_name == name) {
        let Some(addr) = v4(&i.address) else { continue };
        let len = v4(&i.netmask).map_or(32, |m| u32::from(m).leading_ones() as u8);
        out.push((addr, len));
        if i.flags
            .contains(nix::net::if_::InterfaceFlags::IFF_POINTOPOINT)
            && let Some(peer) = v4(&i.destination)
        {
            out.push((peer, len));
        }
    }
    out
}

/// Reads one frame from a packet socket without waiting: its length and whether it arrived
/// with a VLAN tag (from PACKET_AUXDATA); `None` when nothing is waiting.
fn recv_tagged(socket: &OwnedFd, buf: &mut [u8]) -> Option<(usize, bool)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64 words: aligned for the cmsghdr the kernel writes at their start.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; zero is a valid value for every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points to the live `iov` (over `buf`) and `control`, each valid for the
    // length given; MSG_DONTWAIT keeps the thread from blocking on a drained socket.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n <= 0 {
        return None;
    }
    let mut tagged = false;
    // SAFETY: `msg` is the header recvmsg filled in; its control buffer is `control`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return headers within the control buffer.
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_PACKET && c.cmsg_type == libc::PACKET_AUXDATA {
            // SAFETY: a PACKET_AUXDATA message carries a tpacket_auxdata, which may not be
            // aligned for its type within the buffer, hence the unaligned read.
            let aux: libc::tpacket_auxdata =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
            tagged = vlan_tagged(aux.tp_status, aux.tp_vlan_tci);
        }
        // SAFETY: as above; `cmsg` is a header of `msg`.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Some((n as usize, tagged))
}

/// Whether auxiliary data says the frame came from a VLAN: a tag with a VID. A priority tag
/// (VID 0) is not a VLAN: the kernel hands such frames to the untagged interface too.
fn vlan_tagged(status: u32, tci: u16) -> bool {
    status & libc::TP_STATUS_VLAN_VALID != 0 && tci & 0x0fff != 0
}

/// A packet socket on `ifindex` that receives IGMP and ICMPv6 (the kernel filters the rest
/// out before they are queued), with the interface in allmulticast mode while it is open.
fn open(ifindex: u32) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: a plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto.into(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: `fd` is a descriptor just opened and owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let filter = membership_filter();
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    setsockopt(&sock, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
        .context("attaching the IGMP/ICMPv6 filter")?;
    // Our own queries are not news to us.
    setsockopt(&sock, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1i32)
        .context("PACKET_IGNORE_OUTGOING")?;
    // On a trunk's parent the kernel has taken the tag off a VLAN's frames before this
    // socket sees them; only the auxiliary data tells them from the untagged link's.
    setsockopt(&sock, libc::SOL_PACKET, libc::PACKET_AUXDATA, &1i32).context("PACKET_AUXDATA")?;
    // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and the length is its size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("binding to the interface");
    }
    // SAFETY: packet_mreq is plain data; zero is a valid value for every field.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = ifindex as i32;
    mreq.mr_type = libc::PACKET_MR_ALLMULTI as u16;
    setsockopt(&sock, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
        .context("allmulticast, for reports sent to group MACs")?;
    Ok(sock)
}

fn setsockopt<T>(sock: &OwnedFd, level: i32, name: i32, value: &T) -> Result<()> {
    // SAFETY: `value` points to a live T of the size given, which is the option's type.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        bail!(io::Error::last_os_error());
    }
    Ok(())
}

/// A classic BPF filter: IPv4 with protocol 2 (IGMP), or IPv6 whose next header is 58
/// (ICMPv6) directly or after a hop-by-hop header (where MLD's Router Alert sits). Anything
/// else is not queued to the socket at all. Untagged frames: a VLAN device's frames arrive
/// on it untagged, and a trunk's tag is taken off by the kernel before packet sockets see it
/// (and reported in the auxiliary data, which `receive` reads).
fn membership_filter() -> Vec<libc::sock_filter> {
    const LDH_ABS: u16 = 0x28;
    const LDB_ABS: u16 = 0x30;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    vec![
        op(LDH_ABS, 0, 0, 12),         // 0: ethertype
        op(JEQ_K, 0, 2, 0x0800),       // 1: IPv4? else 4
        op(LDB_ABS, 0, 0, 23),         // 2: IPv4 protocol
        op(JEQ_K, 6, 7, 2),            // 3: IGMP -> accept (10) else reject (11)
        op(JEQ_K, 0, 6, 0x86dd),       // 4: IPv6? else reject (11)
        op(LDB_ABS, 0, 0, 20),         // 5: next header
        op(JEQ_K, 3, 0, 58),           // 6: ICMPv6 -> accept (10)
        op(JEQ_K, 0, 3, 0),            // 7: hop-by-hop? else reject (11)
        op(LDB_ABS, 0, 0, 54),         // 8: its next header
        op(JEQ_K, 0, 1, 58),           // 9: ICMPv6 -> accept (10) else reject (11)
        op(RET_K, 0, 0, FRAME as u32), // 10: accept
        op(RET_K, 0, 0, 0),            // 11: reject
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::listeners::wire::{Message, Record, RecordType};

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An any-source output's slot follows the frame's source: INCLUDE of another source
    /// holds the rule's back, EXCLUDE of a source holds that one back and lets the others
    /// through, and a known-source output's slot is on or off for its source alone.
    #[test]
    fn slots_decide_by_the_frames_source() {
        for (own, g, s1, s2, host) in [
            (
                "198.18.2.1",
                "239.1.1.1",
                "198.18.1.1",
                "198.18.1.5",
                "198.18.2.2",
            ),
            (
                "fe80::1",
                "ff1e::1:1",
                "2001:2:0:1::1",
                "2001:2:0:1::5",
                "fe80::2",
            ),
        ] {
            let family = if a(g).is_ipv4() {
                Family::V4
            } else {
                Family::V6
            };
            let now = Duration::from_secs(1);
            let mut r = Router::new(family, a(own), Timers::default(), now);
            let any = ListenKey {
                ifindex: 1,
                group: a(g),
                source: None,
            };
            let from_s1 = ListenKey {
                source: Some(a(s1)),
                ..any
            };
            let (slot, slot1) = (ListenSlot::new(), ListenSlot::new());
            let mut report = |kind, sources: &[&str]| {
                let records = vec![Record {
                    kind,
                    group: a(g),
                    sources: sources.iter().map(|s| a(s)).collect(),
                }];
                r.receive(a(host), &Message::Report { records }, now);
                (
                    write_slot(&r, &any, &slot),
                    write_slot(&r, &from_s1, &slot1),
                )
            };
            assert_eq!(report(RecordType::IsIn, &[s2]), (true, false), "{g}");
            assert!(
                !slot.wants(a(s1)) && slot.wants(a(s2)),
                "{g}: INCLUDE({s2})"
            );
            assert!(!slot1.wants(a(s1)) && !slot1.wants(a(s2)));
            assert_eq!(report(RecordType::IsEx, &[s1]), (true, false), "{g}");
            assert!(
                !slot.wants(a(s1)) && slot.wants(a(s2)),
                "{g}: EXCLUDE({s1})"
            );
            assert_eq!(report(RecordType::IsEx, &[]), (true, true), "{g}");
            assert!(slot.wants(a(s1)) && slot.wants(a(s2)), "{g}: EXCLUDE({{}})");
            assert!(
                slot1.wants(a(s1)) && slot1.wants(a(s2)),
                "{g}: on for its source"
            );
        }
    }

    #[test]
    fn own_address_is_the_primary_ipv4_or_the_link_local_ipv6() {
        let a: Vec<IpAddr> = ["2001:2::1", "198.18.2.1", "fe80::1", "198.18.2.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            own_address(&a, true),
            "198.18.2.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(own_address(&a, false), "fe80::1".parse::<IpAddr>().unwrap());
        assert_eq!(own_address(&a[..1], false), "::".parse::<IpAddr>().unwrap());
        assert_eq!(own_address(&[], true), "0.0.0.0".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn subnets_match_by_prefix() {
        let nets = [
            (Ipv4Addr::new(198, 18, 2, 1), 24),
            (Ipv4Addr::new(198, 19, 0, 7), 32),
        ];
        for (a, on) in [
            ("198.18.2.2", true),
            ("198.18.2.255", true),
            ("198.18.3.2", false),
            ("198.19.0.7", true),
            ("198.19.0.8", false),
        ] {
            assert_eq!(on_subnet(a.parse().unwrap(), &nets), on, "{a}");
        }
        assert!(on_subnet(
            Ipv4Addr::new(203, 0, 113, 9),
            &[(Ipv4Addr::UNSPECIFIED, 0)]
        ));
        assert!(!on_subnet(Ipv4Addr::new(198, 18, 2, 2), &[]));
    }

    #[test]
    fn a_tag_with_a_vid_is_a_vlan_and_a_priority_tag_is_not() {
        let valid = libc::TP_STATUS_VLAN_VALID;
        assert!(vlan_tagged(valid, 10));
        assert!(vlan_tagged(valid, 0xe00a), "VID 10 with priority 7");
        assert!(!vlan_tagged(valid, 0xe000), "priority tag: VID 0");
        assert!(!vlan_tagged(0, 10), "no tag: the TCI field is not valid");
    }

    /// Tagged frames are refused whatever they are; reports and leaves must come from a
    /// subnet of the interface or from 0.0.0.0; queries and MLD are not checked.
    #[test]
    fn admit_refuses_tagged_and_off_subnet_reports() {
        let g = IpAddr::V4(Ipv4Addr::new(239, 1, 1, 1));
        let msg = |from: &str, message: wire::Message| Received {
            source: from.parse().unwrap(),
            destination: g,
            message,
            missing_router_alert: false,
        };
        let report = || wire::Message::V2Report { group: g };
        let query = || {
            wire::Message::Query(wire::Query {
                version: 3,
                group: None,
                max_response: Duration::from_secs(10),
                suppress: false,
                qrv: 2,
                qqi: Duration::from_secs(125),
                sources: vec![],
            })
        };
        let ours = |a: Ipv4Addr| a.octets()[..3] == [198, 18, 2];
        let cases = [
            (msg("198.18.2.2", report()), false, Ok(())),
            (msg("198.18.2.2", report()), true, Err(Refusal::VlanTagged)),
            (msg("198.18.9.2", report()), false, Err(Refusal::OffSubnet)),
            (
                msg("198.18.9.2", wire::Message::Leave { group: g }),
                false,
                Err(Refusal::OffSubnet),
            ),
            (msg("0.0.0.0", report()), false, Ok(())),
            (msg("198.18.9.2", query()), false, Ok(())),
            (msg("fe80::2", report()), false, Ok(())),
            (msg("fe80::2", report()), true, Err(Refusal::VlanTagged)),
        ];
        for (got, tagged, want) in cases {
            assert_eq!(admit(&got, tagged, ours), want, "{got:?} tagged {tagged}");
        }
    }
}
