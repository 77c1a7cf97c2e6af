//! Next-hop resolution for unicast outputs, as logic with no I/O.
//!
//! An output that sends to a unicast destination needs the MAC address of the next hop: the
//! kernel's route to the destination through the output's interface names the next hop (the
//! destination itself when on-link, or a gateway), and the kernel's neighbour (ARP/ND) entry for
//! that next hop holds its MAC. The relay never speaks ARP or ND itself: it asks the kernel to
//! resolve an entry and follows the entry through netlink notifications.
//!
//! [`Resolver`] is the state machine, in the style of `quinn-proto`: it is fed what the kernel
//! said (route answers, neighbour notifications and answers, deletions, "routes changed", links
//! going down), is asked for what to send next ([`Resolver::poll`]), and takes the time as a
//! value (`now`, a [`Duration`] since any fixed epoch the caller picks). `neighbours` does the
//! netlink I/O around it.
//!
//! The data path reads a target's MAC from its [`NextHopSlot`], one atomic load per frame.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::rewrite::RewriteError;

/// Neighbour (NUD) states, as the kernel's `ndm_state` bits.
pub const NUD_INCOMPLETE: u16 = 0x01;
pub const NUD_REACHABLE: u16 = 0x02;
pub const NUD_STALE: u16 = 0x04;
pub const NUD_DELAY: u16 = 0x08;
pub const NUD_PROBE: u16 = 0x10;
pub const NUD_FAILED: u16 = 0x20;
pub const NUD_NOARP: u16 = 0x40;
pub const NUD_PERMANENT: u16 = 0x80;

/// The states whose link-layer address the kernel itself sends with (its `NUD_VALID`): a STALE
/// entry's address is still used while the kernel re-confirms it.
pub const NUD_USABLE: u16 =
    NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP;

/// How often an unanswered query is asked again, an unresolved next hop solicited again, and a
/// destination with no route looked up again.
pub const RETRY: Duration = Duration::from_secs(1);

/// Set in a slot's word when it holds a MAC: an all-zero MAC is then still a MAC.
const RESOLVED: u64 = 1 << 48;
const MAC_MASK: u64 = RESOLVED - 1;
/// Set in a slot's word, without a MAC, when the kernel routes the destination through another
/// interface than the output's ([`Route::Elsewhere`]).
const NO_ROUTE_VIA: u64 = 1 << 49;

/// A target's next-hop MAC, shared with the data path.
///
/// One word, so a reader never sees half of an old MAC and half of a new one, and a read is a
/// single load with no lock.
pub struct NextHopSlot(AtomicU64);

impl NextHopSlot {
    /// An unresolved slot.
    pub fn new() -> Self {
        NextHopSlot(AtomicU64::new(0))
    }

    /// The MAC to send to, if the next hop is resolved.
    #[inline]
    pub fn mac(&self) -> Option<[u8; 6]> {
        // Relaxed: the word is the whole message; nothing else is published with it.
        let word = self.0.load(Ordering::Relaxed);
        if word & RESOLVED == 0 {
            return None;
        }
        let b = (word & MAC_MASK).to_be_bytes();
        Some([b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    /// The MAC to send to, or why a frame cannot be sent: no route through the output's
    /// interface ([`RewriteError::NoRouteVia`]), or no neighbour entry (yet).
    #[inline]
    pub fn usable(&self) -> Result<[u8; 6], RewriteError> {
        // One load: the MAC and the reason are of the same moment.
        let word = self.0.load(Ordering::Relaxed);
        if word & RESOLVED == 0 {
            return Err(if word & NO_ROUTE_VIA != 0 {
                RewriteError::NoRouteVia
            } else {
                RewriteError::NoNeighbour
            });
        }
        let b = (word & MAC_MASK).to_be_bytes();
        Ok([b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    /// Whether the destination has no route through the output's interface (the kernel routes
    /// it through another).
    pub fn no_route_via(&self) -> bool {
        self.usable() == Err(RewriteError::NoRouteVia)
    }

    pub fn set(&self, mac: Option<[u8; 6]>) {
        let word = match mac {
            None => 0,
            Some(m) => RESOLVED | u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]]),
        };
        self.0.store(word, Ordering::Relaxed);
    }

    /// No MAC: the destination is routed through another interface than the output's.
    pub fn set_no_route_via(&self) {
        self.0.store(NO_ROUTE_VIA, Ordering::Relaxed);
    }
}

impl Default for NextHopSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for NextHopSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.usable() {
            Ok(m) => write!(f, "NextHopSlot({})", MacDisplay(m)),
            Err(RewriteError::NoRouteVia) => f.write_str("NextHopSlot(no route via)"),
            Err(_) => f.write_str("NextHopSlot(unresolved)"),
        }
    }
}

/// Formats a MAC the way `ip` prints it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MacDisplay(pub [u8; 6]);

impl fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The kernel's answer to "which way to `destination` through this interface".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The destination is on the link: it is its own next hop.
    OnLink,
    /// Through this gateway (on the same interface).
    Gateway(IpAddr),
    /// No usable route (an error, or a route of a kind that sends nowhere).
    Unreachable,
    /// None through the output's interface, but one through this other interface: the
    /// kernel's answer for the output's interface was an error (IPv6) or only its on-link
    /// fallback (IPv4: with RTA_OIF set and no route through that interface, it answers "on
    /// link" from no table), which no neighbour would ever answer.
    Elsewhere(u32),
}

/// What the I/O layer is to send to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// RTM_GETROUTE for `destination` with RTA_OIF `ifindex`; answer with
    /// [`Resolver::on_route`].
    QueryRoute { ifindex: u32, destination: IpAddr },
    /// RTM_GETNEIGH for one entry; answer with [`Resolver::on_neighbour`], or
    /// [`Resolver::on_neighbour_gone`] if there is none.
    QueryNeighbour { ifindex: u32, address: IpAddr },
    /// Have the kernel resolve (or re-confirm) the entry: RTM_NEWNEIGH with NTF_USE. Its outcome
    /// arrives as notifications.
    Solicit { ifindex: u32, address: IpAddr },
}

/// One target as [`Resolver::describe`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHopState {
    pub ifindex: u32,
    pub destination: IpAddr,
    /// The next hop the last route answer gave (the destination itself when on-link).
    pub next_hop: Option<IpAddr>,
    pub mac: Option<[u8; 6]>,
    /// "resolved", "resolving", "no route", or "no route via" (the output's interface; the
    /// kernel routes it through `elsewhere`).
    pub state: &'static str,
    /// The interface the kernel routes the destination through instead, in "no route via".
    pub elsewhere: Option<u32>,
}

/// When a query is next to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Query {
    /// Nothing to ask.
    Idle,
    /// To be asked at the next poll; an answer to an earlier query does not cancel it, because
    /// that answer may predate whatever made this one due.
    Due,
    /// Asked, or waiting to ask again; asked (again) at this time unless answered first.
    At(Duration),
}

impl Query {
    fn due(self, now: Duration) -> bool {
        match self {
            Query::Idle => false,
            Query::Due => true,
            Query::At(t) => now >= t,
        }
    }

    fn deadline(self) -> Option<Duration> {
        match self {
            Query::Idle => None,
            Query::Due => Some(Duration::ZERO),
            Query::At(t) => Some(t),
        }
    }

    /// An answer arrived: a query that was only waiting for it is done.
    fn answered(&mut self) {
        if let Query::At(_) = self {
            *self = Query::Idle;
        }
    }
}

type Key = (u32, IpAddr);

#[derive(Debug)]
struct Target {
    ifindex: u32,
    destination: IpAddr,
    slot: Arc<NextHopSlot>,
    /// The latest route answer; `None` until the first.
    route: Option<Route>,
    route_query: Query,
}

impl Target {
    fn next_hop(&self) -> Option<IpAddr> {
        match self.route? {
            Route::OnLink => Some(self.destination),
            Route::Gateway(g) => Some(g),
            Route::Unreachable | Route::Elsewhere(_) => None,
        }
    }
}

/// What the resolver knows of one next hop's neighbour entry.
#[derive(Debug)]
struct Neighbour {
    /// Whether anything was heard since the entry was (re)tracked: until then it is queried
    /// rather than solicited, so an entry the kernel already has is used as it is.
    known: bool,
    /// The latest NUD state; `None` when there is no entry.
    state: Option<u16>,
    /// The MAC of the latest event, if that event's state makes it usable.
    mac: Option<[u8; 6]>,
    query: Query,
    /// When the last solicitation went out.
    solicited: Option<Duration>,
}

impl Neighbour {
    fn unknown() -> Self {
        Neighbour {
            known: false,
            state: None,
            mac: None,
            query: Query::Due,
            solicited: None,
        }
    }

    /// Whether the kernel is to be asked to resolve or re-confirm it. A STALE entry is used but
    /// not re-confirmed by the kernel on its own, since the relay's frames bypass the stack.
    fn wants_solicit(&self) -> bool {
        self.known && (self.mac.is_none() || self.state.is_some_and(|s| s & NUD_STALE != 0))
    }

    fn solicit_at(&self) -> Option<Duration> {
        if !self.wants_solicit() {
            return None;
        }
        Some(self.solicited.map_or(Duration::ZERO, |t| t + RETRY))
    }
}

/// Resolves each tracked `(ifindex, destination)` to the MAC of its next hop.
#[derive(Debug, Default)]
pub struct Resolver {
    /// In the order `track` was given them, without duplicates.
    targets: Vec<Target>,
    /// The next hops the targets' routes name, and only those.
    neighbours: BTreeMap<Key, Neighbour>,
}

impl Resolver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `wanted` the tracked set; returns a slot for each entry, in order. A target that
    /// was tracked before keeps its slot, and with it its MAC, so a reload loses no frames;
    /// duplicates share a slot. Targets no longer wanted have their slots cleared.
    pub fn track(&mut self, wanted: &[(u32, IpAddr)]) -> Vec<Arc<NextHopSlot>> {
        let mut old: BTreeMap<Key, Target> = self
            .targets
            .drain(..)
            .map(|t| ((t.ifindex, t.destination), t))
            .collect();
        let mut slots = Vec::with_capacity(wanted.len());
        for &(ifindex, destination) in wanted {
            if let Some(t) = self
                .targets
                .iter()
                .find(|t| t.ifindex == ifindex && t.destination == destination)
            {
                slots.push(t.slot.clone());
                continue;
            }
            let target = old.remove(&(ifindex, destination)).unwrap_or(Target {
                ifindex,
                destination,
                slot: Arc::new(NextHopSlot::new()),
                route: None,
                route_query: Query::Due,
            });
            slots.push(target.slot.clone());
            self.targets.push(target);
        }
        for gone in old.values() {
            gone.slot.set(None);
        }
        self.refresh();
        slots
    }

    /// The kernel's route answer for a target. Answers for targets not tracked are ignored.
    pub fn on_route(&mut self, ifindex: u32, destination: IpAddr, route: Route, now: Duration) {
        let Some(t) = self
            .targets
            .iter_mut()
            .find(|t| t.ifindex == ifindex && t.destination == destination)
        else {
            return;
        };
        t.route = Some(route);
        t.route_query.answered();
        if matches!(route, Route::Unreachable | Route::Elsewhere(_)) && t.route_query == Query::Idle
        {
            // Routes that appear are notified, but a link coming back is not always a route
            // change (a route with an oif set needs none): look again now and then.
            t.route_query = Query::At(now + RETRY);
        }
        self.refresh();
    }

    /// A neighbour entry as the kernel notified or answered it: its NUD state bits and its
    /// link-layer address, if the message had one.
    pub fn on_neighbour(
        &mut self,
        ifindex: u32,
        address: IpAddr,
        state: u16,
        lladdr: Option<&[u8]>,
    ) {
        let Some(n) = self.neighbours.get_mut(&(ifindex, address)) else {
            return;
        };
        n.known = true;
        n.state = Some(state);
        n.mac = match lladdr {
            Some(&[a, b, c, d, e, f]) if state & NUD_USABLE != 0 => Some([a, b, c, d, e, f]),
            _ => None,
        };
        n.query.answered();
        self.sync_slots();
    }

    /// The kernel has no entry (any more): deleted, garbage-collected, or a query found none.
    pub fn on_neighbour_gone(&mut self, ifindex: u32, address: IpAddr) {
        let Some(n) = self.neighbours.get_mut(&(ifindex, address)) else {
            return;
        };
        n.known = true;
        n.state = None;
        n.mac = None;
        n.query.answered();
        self.sync_slots();
    }

    /// Some route changed (or may have): every target's route is asked for again. Slots keep
    /// their MACs until an answer names a different next hop.
    pub fn on_routes_changed(&mut self) {
        for t in &mut self.targets {
            t.route_query = Query::Due;
        }
    }

    /// The interface is down or gone: the kernel flushes its neighbours, so the next hops on it
    /// are forgotten (their slots cleared) and everything about it is asked for again.
    pub fn on_link_down(&mut self, ifindex: u32) {
        for (_, n) in self
            .neighbours
            .iter_mut()
            .filter(|((i, _), _)| *i == ifindex)
        {
            *n = Neighbour::unknown();
        }
        for t in self.targets.iter_mut().filter(|t| t.ifindex == ifindex) {
            t.route_query = Query::Due;
        }
        self.sync_slots();
    }

    /// The interface is up (again): unresolved next hops on it are solicited at once rather
    /// than at their next retry.
    pub fn on_link_up(&mut self, ifindex: u32) {
        for (_, n) in self
            .neighbours
            .iter_mut()
            .filter(|((i, _), _)| *i == ifindex)
        {
            if n.mac.is_none() {
                n.solicited = None;
            }
        }
    }

    /// Notifications may have been lost (the socket overran): ask for everything again.
    pub fn resync(&mut self) {
        self.on_routes_changed();
        for n in self.neighbours.values_mut() {
            n.query = Query::Due;
        }
    }

    /// What is to be sent now: route queries, then neighbour queries, then solicitations.
    pub fn poll(&mut self, now: Duration) -> Vec<Action> {
        let mut actions = Vec::new();
        for t in &mut self.targets {
            if t.route_query.due(now) {
                t.route_query = Query::At(now + RETRY);
                actions.push(Action::QueryRoute {
                    ifindex: t.ifindex,
                    destination: t.destination,
                });
            }
        }
        for (&(ifindex, address), n) in &mut self.neighbours {
            if n.query.due(now) {
                n.query = Query::At(now + RETRY);
                actions.push(Action::QueryNeighbour { ifindex, address });
            }
        }
        for (&(ifindex, address), n) in &mut self.neighbours {
            if n.solicit_at().is_some_and(|t| now >= t) {
                n.solicited = Some(now);
                actions.push(Action::Solicit { ifindex, address });
            }
        }
        actions
    }

    /// When [`Resolver::poll`] next has something to do, if ever (absent new input).
    pub fn next_timeout(&self) -> Option<Duration> {
        let routes = self.targets.iter().filter_map(|t| t.route_query.deadline());
        let neighbours = self
            .neighbours
            .values()
            .flat_map(|n| [n.query.deadline(), n.solicit_at()])
            .flatten();
        routes.chain(neighbours).min()
    }

    /// Each tracked target's state, in tracking order.
    pub fn describe(&self) -> Vec<NextHopState> {
        self.targets
            .iter()
            .map(|t| {
                let mac = t.slot.mac();
                let elsewhere = match t.route {
                    Some(Route::Elsewhere(i)) => Some(i),
                    _ => None,
                };
                let state = if t.route == Some(Route::Unreachable) {
                    "no route"
                } else if elsewhere.is_some() {
                    "no route via"
                } else if mac.is_some() {
                    "resolved"
                } else {
                    "resolving"
                };
                NextHopState {
                    ifindex: t.ifindex,
                    destination: t.destination,
                    next_hop: t.next_hop(),
                    mac,
                    state,
                    elsewhere,
                }
            })
            .collect()
    }

    /// After the targets or their routes changed: keeps a neighbour record for exactly the next
    /// hops in use, then brings the slots in line.
    fn refresh(&mut self) {
        let mut kept = BTreeMap::new();
        for t in &self.targets {
            if let Some(nh) = t.next_hop() {
                let key = (t.ifindex, nh);
                kept.entry(key).or_insert_with(|| {
                    self.neighbours
                        .remove(&key)
                        .unwrap_or_else(Neighbour::unknown)
                });
            }
        }
        self.neighbours = kept;
        self.sync_slots();
    }

    fn sync_slots(&self) {
        for t in &self.targets {
            let mac = t
                .next_hop()
                .and_then(|nh| self.neighbours.get(&(t.ifindex, nh)))
                .and_then(|n| n.mac);
            let no_route_via = matches!(t.route, Some(Route::Elsewhere(_)));
            // Compared first: an unchanged slot is not written, so the data path's cache line
            // stays shared.
            if no_route_via {
                if !t.slot.no_route_via() {
                    t.slot.set_no_route_via();
                }
            } else if t.slot.mac() != mac || t.slot.no_route_via() {
                t.slot.set(mac);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    const IF: u32 = 3;
    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
    const MAC_G: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn dest() -> IpAddr {
        ip("198.18.2.2")
    }

    fn gw() -> IpAddr {
        ip("198.18.2.254")
    }

    fn query_route(destination: IpAddr) -> Action {
        Action::QueryRoute {
            ifindex: IF,
            destination,
        }
    }

    fn query_neigh(address: IpAddr) -> Action {
        Action::QueryNeighbour {
            ifindex: IF,
            address,
        }
    }

    fn solicit(address: IpAddr) -> Action {
        Action::Solicit {
            ifindex: IF,
            address,
        }
    }

    /// Tracks the one on-link destination and answers its route: the next hop is then to be
    /// queried.
    fn on_link() -> (Resolver, Arc<NextHopSlot>) {
        let mut r = Resolver::new();
        let slot = r.track(&[(IF, dest())]).remove(0);
        assert_eq!(r.poll(ms(0)), vec![query_route(dest())]);
        r.on_route(IF, dest(), Route::OnLink, ms(0));
        assert_eq!(r.poll(ms(0)), vec![query_neigh(dest())]);
        (r, slot)
    }

    /// As [`on_link`], with the entry resolved to MAC_A after a solicitation at 0.
    fn resolved() -> (Resolver, Arc<NextHopSlot>) {
        let (mut r, slot) = on_link();
        r.on_neighbour_gone(IF, dest());
        assert_eq!(r.poll(ms(0)), vec![solicit(dest())]);
        r.on_neighbour(IF, dest(), NUD_REACHABLE, Some(&MAC_A));
        assert_eq!(slot.mac(), Some(MAC_A));
        (r, slot)
    }

    #[test]
    fn slot_round_trips_every_mac() {
        let s = NextHopSlot::new();
        assert_eq!(s.mac(), None);
        for m in [[0; 6], [0xff; 6], MAC_A, [1, 2, 3, 4, 5, 6]] {
            s.set(Some(m));
            assert_eq!(s.mac(), Some(m));
        }
        s.set(None);
        assert_eq!(s.mac(), None);
        assert_eq!(NextHopSlot::default().mac(), None);
        s.set(Some([0x02, 0xab, 0, 0, 0, 1]));
        assert_eq!(format!("{s:?}"), "NextHopSlot(02:ab:00:00:00:01)");
    }

    #[test]
    fn first_resolution_queries_then_solicits_once() {
        let (mut r, slot) = on_link();
        assert_eq!(
            r.poll(ms(0)),
            vec![],
            "a query is not repeated before its retry"
        );
        r.on_neighbour_gone(IF, dest());
        assert_eq!(r.poll(ms(10)), vec![solicit(dest())]);
        assert_eq!(slot.mac(), None);
        assert_eq!(r.describe()[0].state, "resolving");
        r.on_neighbour(IF, dest(), NUD_INCOMPLETE, None);
        assert_eq!(r.poll(ms(500)), vec![]);
        r.on_neighbour(IF, dest(), NUD_REACHABLE, Some(&MAC_A));
        assert_eq!(slot.mac(), Some(MAC_A));
        assert_eq!(
            r.describe(),
            vec![NextHopState {
                ifindex: IF,
                destination: dest(),
                next_hop: Some(dest()),
                mac: Some(MAC_A),
                state: "resolved",
                elsewhere: None,
            }]
        );
        assert_eq!(r.next_timeout(), None, "nothing left to do");
        assert_eq!(r.poll(Duration::from_secs(100)), vec![]);
    }

    #[test]
    fn an_existing_entry_is_used_without_soliciting() {
        let (mut r, slot) = on_link();
        r.on_neighbour(IF, dest(), NUD_PERMANENT, Some(&MAC_A));
        assert_eq!(slot.mac(), Some(MAC_A));
        assert_eq!(r.poll(Duration::from_secs(60)), vec![]);
        assert_eq!(r.next_timeout(), None);
    }

    #[test]
    fn unresolved_next_hop_is_solicited_every_second() {
        let (mut r, slot) = on_link();
        r.on_neighbour_gone(IF, dest());
        assert_eq!(r.next_timeout(), Some(Duration::ZERO));
        assert_eq!(r.poll(ms(100)), vec![solicit(dest())]);
        assert_eq!(r.next_timeout(), Some(ms(1100)));
        assert_eq!(r.poll(ms(1099)), vec![]);
        assert_eq!(r.poll(ms(1100)), vec![solicit(dest())]);
        // The kernel gives up after its own probes; that changes nothing about the pace.
        r.on_neighbour(IF, dest(), NUD_FAILED, None);
        assert_eq!(r.poll(ms(1500)), vec![]);
        assert_eq!(r.poll(ms(2100)), vec![solicit(dest())]);
        // A deletion right after a solicitation waits for the retry too.
        r.on_neighbour_gone(IF, dest());
        assert_eq!(r.poll(ms(2200)), vec![]);
        assert_eq!(r.poll(ms(3100)), vec![solicit(dest())]);
        assert_eq!(slot.mac(), None);
        // A FAILED entry that still carries an address is not used.
        r.on_neighbour(IF, dest(), NUD_FAILED, Some(&MAC_A));
        assert_eq!(slot.mac(), None);
    }

    #[test]
    fn stale_entry_is_kept_and_reconfirmed() {
        let (mut r, slot) = resolved();
        r.on_neighbour(IF, dest(), NUD_STALE, Some(&MAC_A));
        assert_eq!(slot.mac(), Some(MAC_A), "a STALE MAC is still used");
        // The resolution's solicitation was at 0: the refresh waits for the retry interval.
        assert_eq!(r.next_timeout(), Some(ms(1000)));
        assert_eq!(r.poll(ms(999)), vec![]);
        assert_eq!(r.poll(ms(30_000)), vec![solicit(dest())]);
        // The kernel need not notify DELAY: asking again is harmless, and goes on while the
        // last word heard is STALE.
        assert_eq!(r.poll(ms(31_000)), vec![solicit(dest())]);
        r.on_neighbour(IF, dest(), NUD_PROBE, Some(&MAC_A));
        assert_eq!(r.poll(ms(40_000)), vec![]);
        r.on_neighbour(IF, dest(), NUD_REACHABLE, Some(&MAC_A));
        assert_eq!(r.poll(ms(50_000)), vec![]);
        assert_eq!(slot.mac(), Some(MAC_A));
        assert_eq!(r.next_timeout(), None);
    }

    #[test]
    fn mac_change_is_followed() {
        let (mut r, slot) = resolved();
        r.on_neighbour(IF, dest(), NUD_STALE, Some(&MAC_B));
        assert_eq!(slot.mac(), Some(MAC_B));
        r.on_neighbour(IF, dest(), NUD_REACHABLE, Some(&MAC_A));
        assert_eq!(slot.mac(), Some(MAC_A));
    }

    #[test]
    fn deleted_entry_is_cleared_and_resolved_again() {
        let (mut r, slot) = resolved();
        r.on_neighbour_gone(IF, dest());
        assert_eq!(slot.mac(), None);
        assert_eq!(r.describe()[0].state, "resolving");
        assert_eq!(r.poll(ms(5000)), vec![solicit(dest())]);
        r.on_neighbour(IF, dest(), NUD_REACHABLE, Some(&MAC_B));
        assert_eq!(slot.mac(), Some(MAC_B));
        assert_eq!(r.poll(ms(9000)), vec![]);
    }

    #[test]
    fn route_change_to_a_gateway_moves_the_slot_to_the_gateway() {
        let (mut r, slot) = resolved();
        r.on_routes_changed();
        assert_eq!(r.poll(ms(2000)), vec![query_route(dest())]);
        assert_eq!(slot.mac(), Some(MAC_A), "kept while the route is asked for");
        r.on_route(IF, dest(), Route::Gateway(gw()), ms(2001));
        assert_eq!(slot.mac(), None, "the gateway's entry is not known yet");
        assert_eq!(r.describe()[0].next_hop, Some(gw()));
        assert_eq!(r.poll(ms(2001)), vec![query_neigh(gw())]);
        r.on_neighbour(IF, gw(), NUD_REACHABLE, Some(&MAC_G));
        assert_eq!(slot.mac(), Some(MAC_G));
        // The old next hop is no longer followed.
        r.on_neighbour(IF, dest(), NUD_REACHABLE, Some(&MAC_B));
        r.on_neighbour_gone(IF, dest());
        assert_eq!(slot.mac(), Some(MAC_G));
        assert_eq!(r.poll(ms(9000)), vec![]);
        // And back on-link: the destination's entry is asked for afresh.
        r.on_routes_changed();
        assert_eq!(r.poll(ms(9000)), vec![query_route(dest())]);
        r.on_route(IF, dest(), Route::OnLink, ms(9000));
        assert_eq!(slot.mac(), None);
        assert_eq!(r.poll(ms(9000)), vec![query_neigh(dest())]);
        r.on_neighbour(IF, dest(), NUD_STALE, Some(&MAC_B));
        assert_eq!(slot.mac(), Some(MAC_B));
    }

    #[test]
    fn unchanged_route_keeps_the_entry_without_asking_again() {
        let (mut r, slot) = resolved();
        r.on_routes_changed();
        assert_eq!(r.poll(ms(2000)), vec![query_route(dest())]);
        r.on_route(IF, dest(), Route::OnLink, ms(2000));
        assert_eq!(slot.mac(), Some(MAC_A));
        assert_eq!(r.poll(ms(2000)), vec![]);
        assert_eq!(r.next_timeout(), None);
    }

    #[test]
    fn an_answer_does_not_cancel_a_query_made_due_after_it_was_asked() {
        let (mut r, _slot) = resolved();
        r.on_routes_changed();
        assert_eq!(r.poll(ms(2000)), vec![query_route(dest())]);
        r.on_routes_changed();
        r.on_route(IF, dest(), Route::OnLink, ms(2001));
        assert_eq!(r.poll(ms(2001)), vec![query_route(dest())]);
    }

    #[test]
    fn lost_answers_are_asked_for_again() {
        let mut r = Resolver::new();
        r.track(&[(IF, dest())]);
        assert_eq!(r.poll(ms(0)), vec![query_route(dest())]);
        assert_eq!(r.next_timeout(), Some(ms(1000)));
        assert_eq!(r.poll(ms(1000)), vec![query_route(dest())]);
        r.on_route(IF, dest(), Route::OnLink, ms(1001));
        assert_eq!(r.poll(ms(1001)), vec![query_neigh(dest())]);
        assert_eq!(r.poll(ms(2001)), vec![query_neigh(dest())]);
    }

    #[test]
    fn no_route_is_reported_and_looked_up_again() {
        let mut r = Resolver::new();
        let slot = r.track(&[(IF, dest())]).remove(0);
        r.poll(ms(0));
        r.on_route(IF, dest(), Route::Unreachable, ms(10));
        assert_eq!(r.describe()[0].state, "no route");
        assert_eq!(r.describe()[0].next_hop, None);
        assert_eq!(r.next_timeout(), Some(ms(1010)));
        assert_eq!(r.poll(ms(1009)), vec![]);
        assert_eq!(r.poll(ms(1010)), vec![query_route(dest())]);
        r.on_route(IF, dest(), Route::OnLink, ms(1011));
        assert_eq!(r.describe()[0].state, "resolving");
        assert_eq!(r.poll(ms(1011)), vec![query_neigh(dest())]);
        r.on_neighbour(IF, dest(), NUD_REACHABLE, Some(&MAC_A));
        assert_eq!(slot.mac(), Some(MAC_A));
        // A route that goes away takes the MAC with it.
        r.on_routes_changed();
        r.poll(ms(2000));
        r.on_route(IF, dest(), Route::Unreachable, ms(2000));
        assert_eq!(slot.mac(), None);
    }

    #[test]
    fn a_route_through_another_interface_is_no_route_via_and_refuses_as_such() {
        let (mut r, slot) = resolved();
        assert_eq!(slot.usable(), Ok(MAC_A));
        r.on_routes_changed();
        assert_eq!(r.poll(ms(2000)), vec![query_route(dest())]);
        r.on_route(IF, dest(), Route::Elsewhere(IF + 4), ms(2000));
        let d = &r.describe()[0];
        assert_eq!(
            (d.state, d.elsewhere, d.next_hop, d.mac),
            ("no route via", Some(IF + 4), None, None)
        );
        assert_eq!(slot.mac(), None);
        assert_eq!(slot.usable(), Err(RewriteError::NoRouteVia));
        assert!(slot.no_route_via());
        // Looked up again, as a destination with no route is; no neighbour asked about.
        assert_eq!(r.next_timeout(), Some(ms(3000)));
        assert_eq!(r.poll(ms(3000)), vec![query_route(dest())]);
        // A route through the interface comes: resolving, then resolved.
        r.on_route(IF, dest(), Route::OnLink, ms(3000));
        assert_eq!(r.describe()[0].state, "resolving");
        assert_eq!(r.describe()[0].elsewhere, None);
        assert_eq!(slot.usable(), Err(RewriteError::NoNeighbour));
        assert_eq!(r.poll(ms(3000)), vec![query_neigh(dest())]);
        r.on_neighbour(IF, dest(), NUD_REACHABLE, Some(&MAC_B));
        assert_eq!(slot.usable(), Ok(MAC_B));
        assert_eq!(r.describe()[0].state, "resolved");
        // Untracked, the slot is cleared of the reason too.
        r.on_route(IF, dest(), Route::Elsewhere(IF + 4), ms(3001));
        r.track(&[]);
        assert_eq!(slot.usable(), Err(RewriteError::NoNeighbour));
    }

    #[test]
    fn a_slot_word_holds_a_mac_or_a_reason() {
        let slot = NextHopSlot::new();
        assert_eq!(slot.usable(), Err(RewriteError::NoNeighbour));
        slot.set_no_route_via();
        assert_eq!(
            (slot.mac(), slot.usable()),
            (None, Err(RewriteError::NoRouteVia))
        );
        slot.set(Some([0; 6]));
        assert_eq!(slot.usable(), Ok([0; 6]), "an all-zero MAC is a MAC");
        assert!(!slot.no_route_via());
        slot.set(None);
        assert_eq!(slot.usable(), Err(RewriteError::NoNeighbour));
    }

    #[test]
    fn track_keeps_slots_and_their_macs_across_calls() {
        let (mut r, slot) = resolved();
        let other = ip("2001:2:0:2::2");
        let slots = r.track(&[(IF, other), (IF, dest())]);
        assert!(Arc::ptr_eq(&slots[1], &slot));
        assert_eq!(slots[1].mac(), Some(MAC_A));
        assert_eq!(slots[0].mac(), None);
        // Only the new target is asked about.
        assert_eq!(r.poll(ms(3000)), vec![query_route(other)]);
        let again = r.track(&[(IF, dest()), (IF, other)]);
        assert!(Arc::ptr_eq(&again[0], &slot));
        assert!(Arc::ptr_eq(&again[1], &slots[0]));
        assert_eq!(again[0].mac(), Some(MAC_A));
        assert_eq!(
            r.describe()
                .iter()
                .map(|d| d.destination)
                .collect::<Vec<_>>(),
            vec![dest(), other],
            "describe follows the latest order"
        );
    }

    #[test]
    fn duplicates_share_one_slot_and_one_query() {
        let mut r = Resolver::new();
        let d2 = ip("198.18.2.3");
        let slots = r.track(&[(IF, dest()), (IF, d2), (IF, dest())]);
        assert_eq!(slots.len(), 3);
        assert!(Arc::ptr_eq(&slots[0], &slots[2]));
        assert!(!Arc::ptr_eq(&slots[0], &slots[1]));
        assert_eq!(r.describe().len(), 2);
        assert_eq!(r.poll(ms(0)), vec![query_route(dest()), query_route(d2)]);
        // Both behind one gateway: one neighbour, asked about once, feeding both slots.
        r.on_route(IF, dest(), Route::Gateway(gw()), ms(0));
        r.on_route(IF, d2, Route::Gateway(gw()), ms(0));
        assert_eq!(r.poll(ms(0)), vec![query_neigh(gw())]);
        r.on_neighbour(IF, gw(), NUD_REACHABLE, Some(&MAC_G));
        for s in &slots {
            assert_eq!(s.mac(), Some(MAC_G));
        }
        // The same address on another interface is another neighbour.
        r.on_neighbour(IF + 1, gw(), NUD_REACHABLE, Some(&MAC_B));
        assert_eq!(slots[0].mac(), Some(MAC_G));
    }

    #[test]
    fn untracked_slots_are_cleared_and_left_alone() {
        let (mut r, slot) = resolved();
        assert!(r.track(&[]).is_empty());
        assert_eq!(slot.mac(), None);
        r.on_route(IF, dest(), Route::OnLink, ms(2000));
        r.on_neighbour(IF, dest(), NUD_REACHABLE, Some(&MAC_B));
        assert_eq!(slot.mac(), None);
        assert_eq!(r.poll(ms(5000)), vec![]);
        assert_eq!(r.next_timeout(), None);
        assert!(r.describe().is_empty());
        // Tracked again, it starts over with a new slot.
        let fresh = r.track(&[(IF, dest())]).remove(0);
        assert!(!Arc::ptr_eq(&fresh, &slot));
        assert_eq!(r.poll(ms(5000)), vec![query_route(dest())]);
    }

    #[test]
    fn link_down_clears_and_link_up_solicits_at_once() {
        let (mut r, slot) = resolved();
        r.on_link_down(IF + 1);
        assert_eq!(slot.mac(), Some(MAC_A), "another link changes nothing");
        r.on_link_down(IF);
        assert_eq!(slot.mac(), None);
        assert_eq!(
            r.poll(ms(100)),
            vec![query_route(dest()), query_neigh(dest())]
        );
        r.on_route(IF, dest(), Route::OnLink, ms(100));
        r.on_neighbour_gone(IF, dest());
        assert_eq!(r.poll(ms(100)), vec![solicit(dest())]);
        assert_eq!(r.poll(ms(200)), vec![]);
        r.on_link_up(IF);
        assert_eq!(r.poll(ms(200)), vec![solicit(dest())]);
    }

    #[test]
    fn resync_asks_for_everything_and_keeps_macs() {
        let (mut r, slot) = resolved();
        r.resync();
        assert_eq!(
            r.poll(ms(100)),
            vec![query_route(dest()), query_neigh(dest())]
        );
        assert_eq!(slot.mac(), Some(MAC_A));
    }

    #[test]
    fn usable_state_without_a_six_byte_address_gives_no_mac() {
        let (mut r, slot) = resolved();
        r.on_neighbour(IF, dest(), NUD_REACHABLE, None);
        assert_eq!(slot.mac(), None);
        r.on_neighbour(IF, dest(), NUD_REACHABLE, Some(&[1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(slot.mac(), None);
        r.on_neighbour(IF, dest(), NUD_NOARP, Some(&MAC_B));
        assert_eq!(slot.mac(), Some(MAC_B));
    }

    // The property: whatever the kernel says in whatever order, each tracked target's slot holds
    // exactly what the latest event for its current next hop gave (or nothing), untracked slots
    // hold nothing, and poll only ever asks about what is tracked.

    fn universe_targets() -> Vec<Key> {
        vec![
            (1, ip("198.18.2.2")),
            (1, ip("198.18.2.3")),
            (2, ip("198.18.2.2")),
            (1, ip("2001:2:0:2::2")),
        ]
    }

    fn universe_hops() -> Vec<Key> {
        let mut v = universe_targets();
        v.extend([
            (1, ip("198.18.2.254")),
            (2, ip("198.18.2.254")),
            (1, IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1))),
        ]);
        v
    }

    #[derive(Debug, Clone)]
    enum Op {
        Track(Vec<usize>),
        Route(usize, Route),
        Neigh(usize, u16, Option<Vec<u8>>),
        Gone(usize),
        RoutesChanged,
        LinkDown(u32),
        LinkUp(u32),
        Resync,
        Poll(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let route = prop_oneof![
            Just(Route::OnLink),
            Just(Route::Unreachable),
            Just(Route::Elsewhere(2)),
            Just(Route::Gateway(ip("198.18.2.254"))),
            Just(Route::Gateway(ip("fe80::1"))),
        ];
        let state = prop_oneof![
            Just(NUD_INCOMPLETE),
            Just(NUD_REACHABLE),
            Just(NUD_STALE),
            Just(NUD_DELAY),
            Just(NUD_PROBE),
            Just(NUD_FAILED),
            Just(NUD_NOARP),
            Just(NUD_PERMANENT),
            Just(0),
        ];
        let lladdr = prop_oneof![
            Just(None),
            (0u8..3).prop_map(|b| Some(vec![2, 0, 0, 0, 0, b])),
            Just(Some(vec![1, 2, 3])),
        ];
        prop_oneof![
            prop::collection::vec(0usize..4, 0..6).prop_map(Op::Track),
            (0usize..4, route).prop_map(|(i, r)| Op::Route(i, r)),
            (0usize..7, state, lladdr).prop_map(|(i, s, l)| Op::Neigh(i, s, l)),
            (0usize..7).prop_map(Op::Gone),
            Just(Op::RoutesChanged),
            (1u32..3).prop_map(Op::LinkDown),
            (1u32..3).prop_map(Op::LinkUp),
            Just(Op::Resync),
            (0u64..3000).prop_map(Op::Poll),
        ]
    }

    /// What the slots should say, kept the plain way.
    #[derive(Default)]
    struct Model {
        tracked: Vec<Key>,
        routes: HashMap<Key, Route>,
        /// The expected MAC of each next hop in use, from the latest event about it.
        hops: HashMap<Key, Option<[u8; 6]>>,
    }

    impl Model {
        fn next_hop(&self, t: Key) -> Option<Key> {
            match self.routes.get(&t)? {
                Route::OnLink => Some(t),
                Route::Gateway(g) => Some((t.0, *g)),
                Route::Unreachable | Route::Elsewhere(_) => None,
            }
        }

        /// Whether a tracked target's route goes through another interface.
        fn elsewhere(&self, t: Key) -> Option<u32> {
            match self.routes.get(&t) {
                Some(Route::Elsewhere(i)) if self.tracked.contains(&t) => Some(*i),
                _ => None,
            }
        }

        fn prune(&mut self) {
            let used: Vec<Key> = self
                .tracked
                .iter()
                .filter_map(|&t| self.next_hop(t))
                .collect();
            self.hops.retain(|k, _| used.contains(k));
            for k in used {
                self.hops.entry(k).or_insert(None);
            }
        }

        fn expected(&self, t: Key) -> Option<[u8; 6]> {
            if !self.tracked.contains(&t) {
                return None;
            }
            self.next_hop(t).and_then(|h| self.hops[&h])
        }
    }

    proptest! {
        #[test]
        fn slots_hold_what_the_latest_event_gave(ops in prop::collection::vec(op(), 1..80)) {
            let targets = universe_targets();
            let hops = universe_hops();
            let mut r = Resolver::new();
            let mut m = Model::default();
            let mut slots: HashMap<Key, Arc<NextHopSlot>> = HashMap::new();
            let mut now = Duration::ZERO;
            for op in ops {
                match op {
                    Op::Track(idx) => {
                        let wanted: Vec<Key> = idx.iter().map(|&i| targets[i]).collect();
                        let got = r.track(&wanted);
                        prop_assert_eq!(got.len(), wanted.len());
                        let mut tracked = Vec::new();
                        for (k, s) in wanted.iter().zip(&got) {
                            if m.tracked.contains(k) && !tracked.contains(k) {
                                prop_assert!(Arc::ptr_eq(&slots[k], s), "slot kept for {:?}", k);
                            }
                            if tracked.contains(k) {
                                prop_assert!(Arc::ptr_eq(&slots[k], s), "duplicates share");
                            } else {
                                tracked.push(*k);
                            }
                            slots.insert(*k, s.clone());
                        }
                        for k in &m.tracked {
                            if !tracked.contains(k) {
                                m.routes.remove(k);
                            }
                        }
                        m.tracked = tracked;
                        m.prune();
                    }
                    Op::Route(i, route) => {
                        let (ifindex, d) = targets[i];
                        r.on_route(ifindex, d, route, now);
                        if m.tracked.contains(&targets[i]) {
                            m.routes.insert(targets[i], route);
                            m.prune();
                        }
                    }
                    Op::Neigh(i, state, lladdr) => {
                        let (ifindex, a) = hops[i];
                        r.on_neighbour(ifindex, a, state, lladdr.as_deref());
                        if let Some(h) = m.hops.get_mut(&hops[i]) {
                            *h = match lladdr.as_deref() {
                                Some(&[a, b, c, d, e, f]) if state & NUD_USABLE != 0 => {
                                    Some([a, b, c, d, e, f])
                                }
                                _ => None,
                            };
                        }
                    }
                    Op::Gone(i) => {
                        r.on_neighbour_gone(hops[i].0, hops[i].1);
                        if let Some(h) = m.hops.get_mut(&hops[i]) {
                            *h = None;
                        }
                    }
                    Op::RoutesChanged => r.on_routes_changed(),
                    Op::LinkDown(ifindex) => {
                        r.on_link_down(ifindex);
                        for (k, h) in &mut m.hops {
                            if k.0 == ifindex {
                                *h = None;
                            }
                        }
                    }
                    Op::LinkUp(ifindex) => r.on_link_up(ifindex),
                    Op::Resync => r.resync(),
                    Op::Poll(dt) => {
                        now += Duration::from_millis(dt);
                        let actions = r.poll(now);
                        for (n, a) in actions.iter().enumerate() {
                            prop_assert!(!actions[..n].contains(a), "{:?} twice in one poll", a);
                            match *a {
                                Action::QueryRoute { ifindex, destination } => {
                                    prop_assert!(m.tracked.contains(&(ifindex, destination)));
                                }
                                Action::QueryNeighbour { ifindex, address }
                                | Action::Solicit { ifindex, address } => {
                                    prop_assert!(m.hops.contains_key(&(ifindex, address)));
                                }
                            }
                        }
                        if let Some(t) = r.next_timeout() {
                            prop_assert!(t > now, "poll left something due: {:?}", r);
                        }
                    }
                }
                for (k, s) in &slots {
                    prop_assert_eq!(s.mac(), m.expected(*k), "slot of {:?}", k);
                    let why = if m.elsewhere(*k).is_some() {
                        RewriteError::NoRouteVia
                    } else {
                        RewriteError::NoNeighbour
                    };
                    prop_assert_eq!(s.usable(), m.expected(*k).ok_or(why), "slot of {:?}", k);
                }
                let described = r.describe();
                prop_assert_eq!(described.len(), m.tracked.len());
                for d in &described {
                    let k = (d.ifindex, d.destination);
                    prop_assert_eq!(d.mac, m.expected(k));
                    prop_assert_eq!(d.next_hop, m.next_hop(k).map(|h| h.1));
                    prop_assert_eq!(d.elsewhere, m.elsewhere(k));
                    prop_assert_eq!(d.state == "no route via", m.elsewhere(k).is_some());
                }
            }
        }
    }
}
