//! The netlink side of next-hop resolution: a thread that feeds the kernel's route, neighbour
//! and link notifications into a [`Resolver`] and carries out what it asks for.
//!
//! The kernel does all ARP and ND. To have an entry resolved (or a STALE one re-confirmed) the
//! thread sends RTM_NEWNEIGH with NTF_USE and no link-layer address: the kernel then treats the
//! entry as if a packet were queued for it (`neigh_event_send`), creating it if need be and
//! probing, just as for its own traffic. The relay's frames bypass the stack, so without this
//! the kernel would never see the entry in use.
//!
//! Two sockets: one subscribed to the notification groups, one for requests, so an answer is
//! never mixed up with the notifications in flight.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use log::{debug, info, trace, warn};
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkFlags, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage},
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteType, RouteVia},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use nix::sys::{socket::setsockopt, socket::sockopt, time::TimeVal};

use crate::nexthop::{Action, MacDisplay, NextHopSlot, NextHopState, Resolver, Route};

/// How long the thread waits for notifications before it looks at its timers and its stop flag.
const TICK: Duration = Duration::from_millis(100);
/// How long a request waits for its answer; a lost one is asked again by the resolver.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(250);
/// A target unresolved this long is worth a warning; after it, one every `REMIND`.
const UNRESOLVED_WARN: Duration = Duration::from_secs(3);
const REMIND: Duration = Duration::from_secs(10);
/// Notifications can come in bursts (a route table reload): room for them, so they are not
/// dropped and answered by a full resync.
const RCVBUF: usize = 1 << 20;

/// Next-hop resolution for unicast outputs: owns the netlink thread.
pub struct Neighbours {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    resolver: Mutex<Resolver>,
    stop: AtomicBool,
}

impl Shared {
    fn resolver(&self) -> MutexGuard<'_, Resolver> {
        // A panic elsewhere while holding the lock leaves the resolver consistent (each method
        // finishes its writes to the slots last), so carry on with it.
        self.resolver.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Neighbours {
    /// Opens the netlink sockets (in the calling thread's network namespace) and starts the
    /// thread, tracking nothing yet.
    pub fn start() -> Result<Neighbours> {
        let events = open_socket("notifications", RCVBUF)?;
        for group in [
            libc::RTNLGRP_NEIGH,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV6_ROUTE,
            libc::RTNLGRP_LINK,
        ] {
            events
                .add_membership(group)
                .with_context(|| format!("joining rtnetlink group {group}"))?;
        }
        let requests = open_socket("requests", 1 << 16)?;
        let shared = Arc::new(Shared {
            resolver: Mutex::new(Resolver::new()),
            stop: AtomicBool::new(false),
        });
        let worker = Worker {
            shared: shared.clone(),
            events,
            requests,
            seq: 0,
            buf: Vec::with_capacity(1 << 16),
            epoch: Instant::now(),
            links_up: HashMap::new(),
            known: HashMap::new(),
            solicits: HashMap::new(),
            throttle: Throttle::default(),
        };
        let thread = std::thread::Builder::new()
            .name("relay-neigh".into())
            .spawn(move || worker.run())
            .context("spawning the next-hop thread")?;
        Ok(Neighbours {
            shared,
            thread: Some(thread),
        })
    }

    /// Makes `wanted` the set of `(ifindex, destination)` resolved; one slot per entry, in
    /// order. A target tracked before keeps its slot and MAC.
    pub fn track(&self, wanted: &[(u32, IpAddr)]) -> Vec<Arc<NextHopSlot>> {
        self.shared.resolver().track(wanted)
    }

    pub fn describe(&self) -> Vec<NextHopState> {
        self.shared.resolver().describe()
    }

    /// Stops the thread and waits for it.
    pub fn stop(self) {}

    fn shut_down(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            warn!("next-hop thread panicked");
        }
    }
}

impl Drop for Neighbours {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl std::fmt::Debug for Neighbours {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Neighbours")
            .field("targets", &self.describe())
            .finish()
    }
}

fn open_socket(role: &str, rcvbuf: usize) -> Result<Socket> {
    let mut s = Socket::new(NETLINK_ROUTE)
        .with_context(|| format!("opening the rtnetlink {role} socket"))?;
    s.bind_auto()
        .with_context(|| format!("binding the rtnetlink {role} socket"))?;
    s.set_rx_buf_sz(rcvbuf)
        .with_context(|| format!("sizing the rtnetlink {role} socket"))?;
    set_timeout(&s, TICK)?;
    Ok(s)
}

fn set_timeout(s: &Socket, t: Duration) -> Result<()> {
    setsockopt(
        s,
        sockopt::ReceiveTimeout,
        &TimeVal::from(libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        }),
    )
    .context("setting a receive timeout on an rtnetlink socket")
}

/// Something the kernel said, as the resolver takes it.
#[derive(Debug)]
enum Event {
    Neighbour {
        ifindex: u32,
        address: IpAddr,
        state: u16,
        lladdr: Option<Vec<u8>>,
    },
    NeighbourGone {
        ifindex: u32,
        address: IpAddr,
    },
    RoutesChanged,
    Link {
        ifindex: u32,
        up: bool,
    },
}

/// The state of one target last logged, to log changes only.
struct Logged {
    state: NextHopState,
    /// Since when it has been without a MAC, and when that was last warned about.
    unresolved_since: Option<Instant>,
    warned: Option<Instant>,
}

struct Worker {
    shared: Arc<Shared>,
    events: Socket,
    requests: Socket,
    seq: u32,
    buf: Vec<u8>,
    epoch: Instant,
    /// Each link's last seen up-ness, to act on changes only: RTM_NEWLINK comes for any
    /// attribute change, such as an XDP program being attached.
    links_up: HashMap<u32, bool>,
    known: HashMap<(u32, IpAddr), Logged>,
    /// Solicitations sent per next hop since it was last resolved, for the warnings.
    solicits: HashMap<(u32, IpAddr), u32>,
    throttle: Throttle,
}

impl Worker {
    fn run(mut self) {
        debug!("next-hop thread started");
        while !self.shared.stop.load(Ordering::Relaxed) {
            let events = self.receive();
            {
                let mut r = self.shared.resolver();
                for e in events {
                    feed(&mut r, e);
                }
            }
            // Answers make more to do (a route names a next hop to query, a query finds no
            // entry to solicit); a few rounds settle it, and the timers catch the rest.
            for _ in 0..4 {
                let now = self.epoch.elapsed();
                let actions = self.shared.resolver().poll(now);
                if actions.is_empty() {
                    break;
                }
                for a in actions {
                    if self.shared.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let answers = self.perform(a);
                    let mut r = self.shared.resolver();
                    for e in answers {
                        feed_answer(&mut r, e, self.epoch.elapsed());
                    }
                }
            }
            self.log_changes();
        }
        debug!("next-hop thread stopped");
    }

    /// Waits up to a tick for notifications, then takes all that are queued.
    fn receive(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        let mut flags = 0;
        loop {
            self.buf.clear();
            // MSG_TRUNC: the datagram's full length comes back, so a truncation shows.
            match self.events.recv(&mut self.buf, flags | libc::MSG_TRUNC) {
                Ok(n) if n > self.buf.len() => {
                    warn!("an rtnetlink notification of {n} bytes was truncated; asking again");
                    self.shared.resolver().resync();
                }
                Ok(_) => {
                    for msg in crate::rtnl::messages(&self.buf) {
                        if let NetlinkPayload::InnerMessage(m) = msg.payload {
                            out.extend(event(m));
                        }
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    warn!(
                        "rtnetlink notifications overran; asking the kernel again for every next hop"
                    );
                    self.shared.resolver().resync();
                }
                Err(e) if crate::rtnl::transient(&e) => break,
                Err(e) => {
                    if let Some(n) = self.throttle.allow("recv".into()) {
                        warn!("reading rtnetlink notifications: {e}{}", suppressed(n));
                    }
                    break;
                }
            }
            flags = libc::MSG_DONTWAIT;
        }
        // Link changes only matter when the up-ness changes.
        out.retain(|e| match *e {
            Event::Link { ifindex, up } => self.links_up.insert(ifindex, up) != Some(up),
            _ => true,
        });
        out
    }

    /// Sends one request and turns the answer into events for the resolver.
    fn perform(&mut self, action: Action) -> Vec<Answer> {
        match action {
            Action::QueryRoute {
                ifindex,
                destination,
            } => {
                let answer = self.get_route(destination, Some(ifindex));
                // No route through the interface: IPv4 answers with its on-link fallback, IPv6
                // with an error. If the kernel routes the destination through another
                // interface, no neighbour on this one will ever answer for it: say so.
                let none_via = match &answer {
                    Ok(Some(m)) => on_link_fallback(m),
                    Err(e) => matches!(
                        e.raw_os_error(),
                        Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
                    ),
                    Ok(None) => false,
                };
                // A link that is down has no routes either; that is not news about routing.
                if none_via && self.links_up.get(&ifindex) != Some(&false) {
                    let other = match self.get_route(destination, None) {
                        Ok(Some(m)) if route_of(&m) != Route::Unreachable => oif_of(&m),
                        _ => None,
                    };
                    if let Some(other) = other.filter(|&o| o != ifindex) {
                        return vec![Answer::Route {
                            ifindex,
                            destination,
                            route: Route::Elsewhere(other),
                        }];
                    }
                }
                let route = match answer {
                    Ok(Some(m)) => route_of(&m),
                    Ok(None) => return Vec::new(),
                    Err(e) => {
                        if let Some(n) = self
                            .throttle
                            .allow(format!("route {ifindex} {destination} {e}"))
                        {
                            warn!(
                                "{}: no route to {destination}: {e}{}",
                                ifname(ifindex),
                                suppressed(n)
                            );
                        }
                        return vec![Answer::Route {
                            ifindex,
                            destination,
                            route: Route::Unreachable,
                        }];
                    }
                };
                vec![Answer::Route {
                    ifindex,
                    destination,
                    route,
                }]
            }
            Action::QueryNeighbour { ifindex, address } => {
                let mut msg = NeighbourMessage::default();
                msg.header.family = family(address);
                msg.header.ifindex = ifindex;
                msg.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::from(
                    address,
                ))];
                match self.request(RouteNetlinkMessage::GetNeighbour(msg), 0) {
                    Ok(Some(RouteNetlinkMessage::NewNeighbour(m))) => neighbour_event(&m, false)
                        .map(Answer::Event)
                        .into_iter()
                        .collect(),
                    Ok(other) => {
                        debug!("unexpected answer to a neighbour query: {other:?}");
                        Vec::new()
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        vec![Answer::Event(Event::NeighbourGone { ifindex, address })]
                    }
                    Err(e) => {
                        if let Some(n) = self
                            .throttle
                            .allow(format!("getneigh {ifindex} {address} {e}"))
                        {
                            warn!(
                                "{}: asking for the neighbour entry of {address}: {e}{}",
                                ifname(ifindex),
                                suppressed(n)
                            );
                        }
                        Vec::new()
                    }
                }
            }
            Action::Solicit { ifindex, address } => {
                *self.solicits.entry((ifindex, address)).or_default() += 1;
                let mut msg = NeighbourMessage::default();
                msg.header.family = family(address);
                msg.header.ifindex = ifindex;
                msg.header.flags = NeighbourFlags::Use;
                msg.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::from(
                    address,
                ))];
                match self.request(
                    RouteNetlinkMessage::NewNeighbour(msg),
                    NLM_F_CREATE | NLM_F_ACK,
                ) {
                    Ok(_) => trace!("{}: asked the kernel to resolve {address}", ifname(ifindex)),
                    Err(e) => {
                        if let Some(n) = self
                            .throttle
                            .allow(format!("solicit {ifindex} {address} {e}"))
                        {
                            warn!(
                                "{}: asking the kernel to resolve {address}: {e}{}",
                                ifname(ifindex),
                                suppressed(n)
                            );
                        }
                    }
                }
                Vec::new()
            }
        }
    }

    /// RTM_GETROUTE for `destination`, through `oif` if given: the route the kernel answers,
    /// `None` (logged) for an answer of another kind.
    fn get_route(
        &mut self,
        destination: IpAddr,
        oif: Option<u32>,
    ) -> io::Result<Option<RouteMessage>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(destination);
        msg.header.destination_prefix_length = if destination.is_ipv4() { 32 } else { 128 };
        // The table the answer came from, as `ip route get` asks: without it IPv4 names the
        // main table even for its on-link fallback, which comes from none.
        msg.header.flags = RouteFlags::LookupTable;
        msg.attributes = vec![RouteAttribute::Destination(RouteAddress::from(destination))];
        msg.attributes.extend(oif.map(RouteAttribute::Oif));
        match self.request(RouteNetlinkMessage::GetRoute(msg), 0)? {
            Some(RouteNetlinkMessage::NewRoute(m)) => Ok(Some(m)),
            other => {
                debug!("unexpected answer to a route query: {other:?}");
                Ok(None)
            }
        }
    }

    /// Sends `msg` and waits for its answer (see [`crate::rtnl::request`]).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Option<RouteNetlinkMessage>> {
        crate::rtnl::request(
            &self.requests,
            &mut self.seq,
            &mut self.buf,
            msg,
            flags,
            ANSWER_TIMEOUT,
        )
    }

    /// Logs what changed since last time, per target, and reminds of those long unresolved.
    fn log_changes(&mut self) {
        let now = Instant::now();
        let states = self.shared.resolver().describe();
        let mut seen = HashMap::with_capacity(states.len());
        for s in states {
            let key = (s.ifindex, s.destination);
            let name = ifname(s.ifindex);
            let prev = self.known.remove(&key);
            let mut logged = prev.unwrap_or(Logged {
                state: NextHopState {
                    mac: None,
                    next_hop: None,
                    state: "resolving",
                    elsewhere: None,
                    ..s.clone()
                },
                unresolved_since: Some(now),
                warned: None,
            });
            let old = &logged.state;
            let via = match s.next_hop {
                Some(nh) if nh != s.destination => format!(" via {nh}"),
                _ => String::new(),
            };
            if s.state == "no route" && old.state != "no route" {
                warn!("{name}: no route to {}", s.destination);
            }
            if let Some(other) = s.elsewhere
                && old.elsewhere != Some(other)
            {
                warn!(
                    "{name}: no route to {} via {name}: the kernel routes it through {}; its frames are dropped as no_route_via",
                    s.destination,
                    ifname(other)
                );
            }
            match (old.mac, s.mac) {
                (None, Some(m)) => {
                    info!(
                        "{name}: {}{via} resolved to {}",
                        s.destination,
                        MacDisplay(m)
                    )
                }
                (Some(a), Some(b)) if a != b => info!(
                    "{name}: {}{via} changed MAC from {} to {}",
                    s.destination,
                    MacDisplay(a),
                    MacDisplay(b)
                ),
                (Some(a), None) => info!(
                    "{name}: {}{via} lost its neighbour entry (was {}); resolving again",
                    s.destination,
                    MacDisplay(a)
                ),
                _ => {}
            }
            if s.mac.is_some() {
                logged.unresolved_since = None;
                logged.warned = None;
                if let Some(nh) = s.next_hop {
                    self.solicits.remove(&(s.ifindex, nh));
                }
            } else {
                let since = *logged.unresolved_since.get_or_insert(now);
                let due = match logged.warned {
                    None => now.duration_since(since) >= UNRESOLVED_WARN,
                    Some(w) => now.duration_since(w) >= REMIND,
                };
                if due && s.state == "resolving" {
                    let count = s
                        .next_hop
                        .and_then(|nh| self.solicits.get(&(s.ifindex, nh)))
                        .copied()
                        .unwrap_or(0);
                    warn!(
                        "{name}: {}{via} still unresolved after {}s ({count} solicitations)",
                        s.destination,
                        now.duration_since(since).as_secs()
                    );
                    logged.warned = Some(now);
                }
            }
            logged.state = s;
            seen.insert(key, logged);
        }
        self.known = seen;
        // Counters of next hops no target uses any more.
        let used: Vec<(u32, IpAddr)> = self
            .known
            .values()
            .filter_map(|l| l.state.next_hop.map(|nh| (l.state.ifindex, nh)))
            .collect();
        self.solicits.retain(|k, _| used.contains(k));
    }
}

/// An answer to a request, as the resolver takes it.
enum Answer {
    Route {
        ifindex: u32,
        destination: IpAddr,
        route: Route,
    },
    Event(Event),
}

fn feed(r: &mut Resolver, e: Event) {
    match e {
        Event::Neighbour {
            ifindex,
            address,
            state,
            lladdr,
        } => r.on_neighbour(ifindex, address, state, lladdr.as_deref()),
        Event::NeighbourGone { ifindex, address } => r.on_neighbour_gone(ifindex, address),
        Event::RoutesChanged => r.on_routes_changed(),
        Event::Link { ifindex, up: true } => r.on_link_up(ifindex),
        Event::Link { ifindex, up: false } => r.on_link_down(ifindex),
    }
}

fn feed_answer(r: &mut Resolver, a: Answer, now: Duration) {
    match a {
        Answer::Route {
            ifindex,
            destination,
            route,
        } => r.on_route(ifindex, destination, route, now),
        Answer::Event(e) => feed(r, e),
    }
}

/// The resolver's view of one notification, if it is about something it follows.
fn event(m: RouteNetlinkMessage) -> Option<Event> {
    match m {
        RouteNetlinkMessage::NewNeighbour(n) => neighbour_event(&n, false),
        RouteNetlinkMessage::DelNeighbour(n) => neighbour_event(&n, true),
        RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_) => {
            Some(Event::RoutesChanged)
        }
        RouteNetlinkMessage::NewLink(l) => Some(link_event(&l, false)),
        RouteNetlinkMessage::DelLink(l) => Some(link_event(&l, true)),
        _ => None,
    }
}

fn neighbour_event(n: &NeighbourMessage, deleted: bool) -> Option<Event> {
    // Proxy entries answer for others; bridge FDB entries share the group but not the family.
    if n.header.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let address = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    let ifindex = n.header.ifindex;
    if deleted {
        return Some(Event::NeighbourGone { ifindex, address });
    }
    let lladdr = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
        _ => None,
    });
    Some(Event::Neighbour {
        ifindex,
        address,
        state: n.header.state.into(),
        lladdr,
    })
}

fn link_event(l: &LinkMessage, deleted: bool) -> Event {
    let up = !deleted
        && l.header.flags.contains(LinkFlags::Up)
        && l.header.flags.contains(LinkFlags::LowerUp);
    Event::Link {
        ifindex: l.header.index,
        up,
    }
}

/// Whether a route answer is the kernel's on-link fallback rather than a route of a table:
/// asked with RTA_OIF for a destination no route through that interface covers, IPv4 answers
/// as if it were on the link (`ip_route_output_key_hash_rcu`: "Apparently, routing tables are
/// wrong. Assume, that the destination is on link."), with no table (`RTA_TABLE` 0).
fn on_link_fallback(m: &RouteMessage) -> bool {
    m.header.address_family == AddressFamily::Inet
        && m.header.table == 0
        && m.attributes
            .iter()
            .all(|a| !matches!(a, RouteAttribute::Table(t) if *t != 0))
}

/// The interface a route answer sends through.
fn oif_of(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// The next hop of a route answer: its gateway (or RFC 5549 via), else on-link.
fn route_of(m: &RouteMessage) -> Route {
    if m.header.kind != RouteType::Unicast {
        return Route::Unreachable;
    }
    for a in &m.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => return Route::Gateway((*g).into()),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => return Route::Gateway((*g).into()),
            RouteAttribute::Via(RouteVia::Inet(g)) => return Route::Gateway((*g).into()),
            RouteAttribute::Via(RouteVia::Inet6(g)) => return Route::Gateway((*g).into()),
            _ => {}
        }
    }
    Route::OnLink
}

fn family(a: IpAddr) -> AddressFamily {
    if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// The interface's name for messages, or its index if it has none (any more).
fn ifname(ifindex: u32) -> String {
    nix::net::if_::if_indextoname(ifindex)
        .ok()
        .and_then(|c| c.into_string().ok())
        .unwrap_or_else(|| format!("ifindex {ifindex}"))
}

fn suppressed(n: u32) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more like it since the last report)")
    }
}

/// Lets a repeated message through once per `REMIND`, counting the ones held back.
#[derive(Default)]
struct Throttle {
    last: HashMap<String, (Instant, u32)>,
}

impl Throttle {
    fn allow(&mut self, key: String) -> Option<u32> {
        let now = Instant::now();
        self.last
            .retain(|_, (t, _)| now.duration_since(*t) < REMIND * 6);
        match self.last.get_mut(&key) {
            Some((t, held)) if now.duration_since(*t) < REMIND => {
                *held += 1;
                None
            }
            Some((t, held)) => {
                let n = *held;
                *t = now;
                *held = 0;
                Some(n)
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}
