//! The multicast router's side of IGMPv3 (RFC 3376 §6, §7.3) and MLDv2 (RFC 3810 §7, §8.3)
//! for one (interface, family): per-group filter state from the hosts' reports, the queries
//! a querier sends, querier election, and compatibility with older hosts.
//!
//! It holds no clock: every call takes the time, deadlines are read with
//! [`Router::poll_timeout`] and served by [`Router::handle_timeout`], and the queries and
//! events it produces wait in queues until drained.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use super::wire::{
    MAX_QUERY_SOURCES_V4, MAX_QUERY_SOURCES_V6, Message, Query, QueryToSend, RecordType,
};

/// Time since an epoch the caller chooses; only differences matter.
pub type Time = Duration;

/// Groups one router keeps state for; reports for more are dropped and counted, so hosts
/// behind an interface cannot grow the relay's memory without bound.
pub const MAX_GROUPS: usize = 4096;
/// Sources one group keeps; more are dropped and counted.
pub const MAX_SOURCES: usize = 256;

/// The protocol variables of RFC 3376 §8 / RFC 3810 §9 that are configured; the others
/// derive from these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub query_interval: Duration,
    pub query_response_interval: Duration,
    pub last_member_query_interval: Duration,
    /// Also the last member query count and the startup query count. 0 is taken as 1: the
    /// RFCs forbid it and it would make every timer zero.
    pub robustness: u8,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            query_interval: Duration::from_secs(125),
            query_response_interval: Duration::from_secs(10),
            last_member_query_interval: Duration::from_secs(1),
            robustness: 2,
        }
    }
}

impl Timers {
    fn count(&self) -> u8 {
        self.robustness.max(1)
    }

    /// Robustness × query interval + query response interval (RFC 3376 §8.4).
    pub fn group_membership_interval(&self) -> Duration {
        self.query_interval
            .saturating_mul(self.count().into())
            .saturating_add(self.query_response_interval)
    }

    /// Robustness × query interval + half the query response interval (§8.5).
    pub fn other_querier_present_interval(&self) -> Duration {
        self.query_interval
            .saturating_mul(self.count().into())
            .saturating_add(self.query_response_interval / 2)
    }

    /// Same as the group membership interval (§8.13).
    pub fn older_host_present_interval(&self) -> Duration {
        self.group_membership_interval()
    }

    /// Last member query interval × last member query count (§8.9).
    pub fn last_member_query_time(&self) -> Duration {
        self.last_member_query_interval
            .saturating_mul(self.count().into())
    }

    /// A quarter of the query interval (§8.6).
    pub fn startup_query_interval(&self) -> Duration {
        self.query_interval / 4
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterMode {
    Include,
    Exclude,
}

impl std::fmt::Display for FilterMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FilterMode::Include => "include",
            FilterMode::Exclude => "exclude",
        })
    }
}

/// A group's compatibility mode (RFC 3376 §7.3.2, RFC 3810 §8.3.2): the oldest version of
/// host heard within the older host present interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compat {
    IgmpV1,
    IgmpV2,
    IgmpV3,
    MldV1,
    MldV2,
}

impl std::fmt::Display for Compat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compat::IgmpV1 => "v1",
            Compat::IgmpV2 => "v2",
            Compat::IgmpV3 => "v3",
            Compat::MldV1 => "mldv1",
            Compat::MldV2 => "mldv2",
        })
    }
}

impl Compat {
    /// Whether the group is in an older mode, where BLOCK records and the source lists of
    /// TO_EX records are ignored.
    fn is_old(self) -> bool {
        matches!(self, Compat::IgmpV1 | Compat::IgmpV2 | Compat::MldV1)
    }
}

/// Whether `group` is in the source-specific range (RFC 4607: 232.0.0.0/8 and ff3x::/32),
/// where RFC 4604 §2.2 has a router take only source-specific requests.
pub fn is_ssm(group: IpAddr) -> bool {
    match group {
        IpAddr::V4(g) => g.octets()[0] == 232,
        IpAddr::V6(g) => g.segments()[0] & 0xfff0 == 0xff30 && g.segments()[1] == 0,
    }
}

/// Reports and records a router did not act on, by reason: hosts can send them at will, so
/// they cost a counter and no state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ignored {
    /// IGMPv1/v2 reports and leaves, MLDv1 reports and dones, for a source-specific group
    /// (RFC 4604 §2.2.4).
    pub ssm_old_version: u64,
    /// IS_EX and TO_EX records for a source-specific group (RFC 4604 §2.2.2).
    pub ssm_exclude: u64,
    /// Records and reports for a group no on-demand output sends to.
    pub not_forwarded: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// [`Router::forwards`] may answer differently for this group than before.
    Changed { group: IpAddr },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceView {
    pub source: IpAddr,
    /// Zero for a source excluded in EXCLUDE mode.
    pub remaining: Duration,
}

/// A group's state as `relay members` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub group: IpAddr,
    pub mode: FilterMode,
    pub compat: Compat,
    pub sources: Vec<SourceView>,
    /// The group timer's remaining time; `None` in INCLUDE mode, where it is not used.
    pub timer: Option<Duration>,
    pub last_reporter: Option<IpAddr>,
}

#[derive(Debug, Clone, Default)]
struct Source {
    /// `None` is a timer at zero: in EXCLUDE mode the source is in the exclude list. In
    /// INCLUDE mode every source's timer runs.
    timer: Option<Time>,
    /// Group-and-source-specific queries still to send that name this source.
    retransmit: u8,
}

#[derive(Debug, Clone)]
struct Group {
    addr: IpAddr,
    mode: FilterMode,
    /// Runs only in EXCLUDE mode.
    timer: Option<Time>,
    sources: BTreeMap<IpAddr, Source>,
    v1_host: Option<Time>,
    /// IGMPv2 host present, or MLDv1 host present.
    v2_host: Option<Time>,
    /// Group-specific queries still to send, and when the next is due.
    group_query: Option<(u8, Time)>,
    /// When the next group-and-source-specific query is due.
    source_query: Option<Time>,
    last_reporter: Option<IpAddr>,
    /// The earliest of the above, as it is filed in `Router::deadlines`.
    deadline: Option<Time>,
}

/// What a group's state changes need from the router around it.
struct Ctx<'a> {
    now: Time,
    timers: Timers,
    querier: bool,
    family: Family,
    out: &'a mut VecDeque<QueryToSend>,
    dropped: &'a mut u64,
}

impl Ctx<'_> {
    fn gmi(&self) -> Time {
        self.now
            .saturating_add(self.timers.group_membership_interval())
    }

    fn lmqt(&self) -> Time {
        self.now
            .saturating_add(self.timers.last_member_query_time())
    }

    /// One query, split over several when the sources would not fit one packet.
    fn send(&mut self, group: IpAddr, sources: Vec<IpAddr>, suppress: bool) {
        let per = match self.family {
            Family::V4 => MAX_QUERY_SOURCES_V4,
            Family::V6 => MAX_QUERY_SOURCES_V6,
        };
        let query = |sources: Vec<IpAddr>| QueryToSend {
            group: Some(group),
            sources,
            max_response: self.timers.last_member_query_interval,
            suppress,
            qrv: self.timers.robustness,
            qqi: self.timers.query_interval,
        };
        if sources.is_empty() {
            let q = query(Vec::new());
            self.out.push_back(q);
            return;
        }
        let queries: Vec<_> = sources.chunks(per).map(|c| query(c.to_vec())).collect();
        self.out.extend(queries);
    }
}

impl Group {
    fn new(addr: IpAddr) -> Self {
        Group {
            addr,
            mode: FilterMode::Include,
            timer: None,
            sources: BTreeMap::new(),
            v1_host: None,
            v2_host: None,
            group_query: None,
            source_query: None,
            last_reporter: None,
            deadline: None,
        }
    }

    fn compat(&self, family: Family) -> Compat {
        match family {
            Family::V4 if self.v1_host.is_some() => Compat::IgmpV1,
            Family::V4 if self.v2_host.is_some() => Compat::IgmpV2,
            Family::V4 => Compat::IgmpV3,
            Family::V6 if self.v2_host.is_some() => Compat::MldV1,
            Family::V6 => Compat::MldV2,
        }
    }

    fn is_empty(&self) -> bool {
        self.mode == FilterMode::Include && self.sources.is_empty()
    }

    /// What [`Router::forwards`] reads: the mode and the sources that decide it (those
    /// included, or those excluded).
    fn forwarding(&self) -> (FilterMode, Vec<IpAddr>) {
        let deciding = self
            .sources
            .iter()
            .filter(|(_, s)| (self.mode == FilterMode::Include) == s.timer.is_some())
            .map(|(a, _)| *a)
            .collect();
        (self.mode, deciding)
    }

    fn next_deadline(&self) -> Option<Time> {
        let sources = self.sources.values().filter_map(|s| s.timer);
        [
            self.timer,
            self.v1_host,
            self.v2_host,
            self.group_query.map(|(_, t)| t),
            self.source_query,
        ]
        .into_iter()
        .flatten()
        .chain(sources)
        .min()
    }

    fn running(&self, s: &IpAddr) -> bool {
        self.sources.get(s).is_some_and(|s| s.timer.is_some())
    }

    /// Sets a source's timer, adding the source if there is room.
    fn set(&mut self, s: IpAddr, timer: Option<Time>, cx: &mut Ctx) {
        if let Some(src) = self.sources.get_mut(&s) {
            src.timer = timer;
        } else if self.sources.len() < MAX_SOURCES {
            self.sources.insert(
                s,
                Source {
                    timer,
                    retransmit: 0,
                },
            );
        } else {
            *cx.dropped += 1;
        }
    }

    /// Adds a source with `timer` unless it is known already.
    fn add(&mut self, s: IpAddr, timer: Option<Time>, cx: &mut Ctx) {
        if !self.sources.contains_key(&s) {
            self.set(s, timer, cx);
        }
    }

    /// RFC 3376 §6.4.1 and §6.4.2 (RFC 3810 §7.4 is the same table): one record, already
    /// translated for the group's compatibility mode. `b` has no duplicates.
    fn apply(&mut self, kind: RecordType, b: &BTreeSet<IpAddr>, cx: &mut Ctx) {
        use FilterMode::{Exclude, Include};
        use RecordType::*;
        let gmi = cx.gmi();
        match (self.mode, kind) {
            // INCLUDE (A) -> INCLUDE (A+B); (B)=GMI
            (Include, IsIn | Allow) => {
                for s in b {
                    self.set(*s, Some(gmi), cx);
                }
            }
            // IS_EX: EXCLUDE (A*B, B-A); (B-A)=0; Delete (A-B); Group Timer=GMI
            // TO_EX: the same, and Send Q(G,A*B) before the group timer is set.
            (Include, IsEx | ToEx) => {
                self.sources.retain(|s, _| b.contains(s));
                let a_and_b: Vec<IpAddr> = self.sources.keys().copied().collect();
                for s in b {
                    self.add(*s, None, cx);
                }
                self.mode = Exclude;
                if kind == ToEx {
                    self.query_sources(&a_and_b, cx);
                }
                self.timer = Some(gmi);
            }
            // INCLUDE (A); Send Q(G,A*B)
            (Include, Block) => {
                let a_and_b: Vec<IpAddr> = b
                    .iter()
                    .filter(|s| self.sources.contains_key(s))
                    .copied()
                    .collect();
                self.query_sources(&a_and_b, cx);
            }
            // INCLUDE (A+B); (B)=GMI; Send Q(G,A-B)
            (Include, ToIn) => {
                let a_minus_b: Vec<IpAddr> = self
                    .sources
                    .keys()
                    .filter(|s| !b.contains(s))
                    .copied()
                    .collect();
                for s in b {
                    self.set(*s, Some(gmi), cx);
                }
                self.query_sources(&a_minus_b, cx);
            }
            // EXCLUDE (X+A, Y-A); (A)=GMI
            (Exclude, IsIn | Allow) => {
                for s in b {
                    self.set(*s, Some(gmi), cx);
                }
            }
            // EXCLUDE (A-Y, Y*A); (A-X-Y)=GMI; Delete (X-A); Delete (Y-A); Group Timer=GMI
            (Exclude, IsEx) => {
                self.sources.retain(|s, _| b.contains(s));
                for s in b {
                    self.add(*s, Some(gmi), cx);
                }
                self.timer = Some(gmi);
            }
            // EXCLUDE (A-Y, Y*A); (A-X-Y)=Group Timer; Delete (X-A); Delete (Y-A);
            // Send Q(G,A-Y); Group Timer=GMI
            (Exclude, ToEx) => {
                let group_timer = self.timer.unwrap_or(gmi);
                self.sources.retain(|s, _| b.contains(s));
                for s in b {
                    self.add(*s, Some(group_timer), cx);
                }
                let a_minus_y: Vec<IpAddr> =
                    b.iter().filter(|s| self.running(s)).copied().collect();
                self.query_sources(&a_minus_y, cx);
                self.timer = Some(gmi);
            }
            // EXCLUDE (X+(A-Y), Y); (A-X-Y)=Group Timer; Send Q(G,A-Y)
            (Exclude, Block) => {
                let group_timer = self.timer.unwrap_or(gmi);
                for s in b {
                    self.add(*s, Some(group_timer), cx);
                }
                let a_minus_y: Vec<IpAddr> =
                    b.iter().filter(|s| self.running(s)).copied().collect();
                self.query_sources(&a_minus_y, cx);
            }
            // EXCLUDE (X+A, Y-A); (A)=GMI; Send Q(G,X-A); Send Q(G)
            (Exclude, ToIn) => {
                let x_minus_a: Vec<IpAddr> = self
                    .sources
                    .iter()
                    .filter(|(s, src)| src.timer.is_some() && !b.contains(s))
                    .map(|(s, _)| *s)
                    .collect();
                for s in b {
                    self.set(*s, Some(gmi), cx);
                }
                self.query_sources(&x_minus_a, cx);
                self.query_group(cx);
            }
        }
    }

    /// "Send Q(G,X)", RFC 3376 §6.6.3.2: sources of X whose timer is above LMQT get it
    /// lowered to LMQT and [Last Member Query Count] queries to come. Only a querier does
    /// this; the others wait for the querier's query (§6.6.1).
    fn query_sources(&mut self, x: &[IpAddr], cx: &mut Ctx) {
        if !cx.querier {
            return;
        }
        let lmqt = cx.lmqt();
        let mut started = false;
        for s in x {
            if let Some(src) = self.sources.get_mut(s)
                && src.timer.is_some_and(|t| t > lmqt)
            {
                src.timer = Some(lmqt);
                src.retransmit = cx.timers.count();
                started = true;
            }
        }
        if started {
            self.send_source_queries(cx);
        }
    }

    /// The queries for every source with retransmissions left: those whose timer a report
    /// has raised above LMQT since in one with the suppress flag, so other routers do not
    /// lower it again, the rest in one without; an empty one is not sent.
    fn send_source_queries(&mut self, cx: &mut Ctx) {
        let lmqt = cx.lmqt();
        let (mut above, mut below) = (Vec::new(), Vec::new());
        for (s, src) in self
            .sources
            .iter_mut()
            .filter(|(_, src)| src.retransmit > 0)
        {
            src.retransmit -= 1;
            if src.timer.is_some_and(|t| t > lmqt) {
                above.push(*s);
            } else {
                below.push(*s);
            }
        }
        for (list, suppress) in [(above, true), (below, false)] {
            if !list.is_empty() {
                cx.send(self.addr, list, suppress);
            }
        }
        let more = self.sources.values().any(|s| s.retransmit > 0);
        self.source_query =
            more.then(|| cx.now.saturating_add(cx.timers.last_member_query_interval));
    }

    /// "Send Q(G)", RFC 3376 §6.6.3.1: the group timer is lowered to LMQT and
    /// [Last Member Query Count] group-specific queries follow.
    fn query_group(&mut self, cx: &mut Ctx) {
        if !cx.querier {
            return;
        }
        let lmqt = cx.lmqt();
        self.timer = Some(self.timer.map_or(lmqt, |t| t.min(lmqt)));
        self.group_query = Some((cx.timers.count(), cx.now));
        self.send_group_query(cx);
    }

    fn send_group_query(&mut self, cx: &mut Ctx) {
        let Some((left, _)) = self.group_query else {
            return;
        };
        let suppress = self.timer.is_some_and(|t| t > cx.lmqt());
        cx.send(self.addr, Vec::new(), suppress);
        let left = left - 1;
        self.group_query = (left > 0).then(|| {
            (
                left,
                cx.now.saturating_add(cx.timers.last_member_query_interval),
            )
        });
    }

    /// Everything due at or before `limit`, in the order it fell due (a late call must not
    /// see a group timer expire before the source timers that ran out first).
    fn expire(&mut self, limit: Time, cx: &mut Ctx) {
        while let Some(t) = self.next_deadline().filter(|t| *t <= limit) {
            cx.now = t;
            let due = |d: Option<Time>| d.is_some_and(|d| d <= t);
            // RFC 3376 §6.3: an INCLUDE source is deleted, an EXCLUDE one joins the
            // exclude list.
            match self.mode {
                FilterMode::Include => self.sources.retain(|_, s| !due(s.timer)),
                FilterMode::Exclude => {
                    for s in self.sources.values_mut().filter(|s| due(s.timer)) {
                        s.timer = None;
                        s.retransmit = 0;
                    }
                }
            }
            // §6.5: with sources still running the group goes to INCLUDE with them; with
            // none its state is gone.
            if due(self.timer) {
                self.timer = None;
                if self.mode == FilterMode::Exclude {
                    self.mode = FilterMode::Include;
                    self.sources.retain(|_, s| s.timer.is_some());
                }
            }
            if due(self.v1_host) {
                self.v1_host = None;
            }
            if due(self.v2_host) {
                self.v2_host = None;
            }
            if self.is_empty() {
                return;
            }
            // Source queries first, as the TO_IN action that starts both sends them.
            if due(self.source_query) {
                if cx.querier {
                    self.send_source_queries(cx);
                } else {
                    self.source_query = None;
                }
            }
            if self.group_query.is_some_and(|(_, at)| at <= t) {
                if cx.querier && self.mode == FilterMode::Exclude {
                    self.send_group_query(cx);
                } else {
                    self.group_query = None;
                }
            }
        }
    }

    fn stop_queries(&mut self) {
        self.group_query = None;
        self.source_query = None;
        for s in self.sources.values_mut() {
            s.retransmit = 0;
        }
    }
}

/// The order of the querier election: lowest address first, the unspecified address (a
/// querier with no address of its own) after all others.
fn rank(a: IpAddr) -> (bool, IpAddr) {
    (a.is_unspecified(), a)
}

/// The router for one interface and one family.
#[derive(Debug, Clone)]
pub struct Router {
    family: Family,
    own: IpAddr,
    configured: Timers,
    /// The configured timers, or while another router is querier its robustness and query
    /// interval (RFC 3376 §4.1.6, §4.1.7).
    timers: Timers,
    querier: bool,
    /// The lowest-addressed other querier heard, and when its other querier present timer
    /// runs out.
    other: Option<(IpAddr, Time)>,
    next_general: Option<Time>,
    startup_left: u8,
    groups: BTreeMap<IpAddr, Group>,
    /// Each group's earliest deadline, so the next one is found without a scan.
    deadlines: BTreeSet<(Time, IpAddr)>,
    transmits: VecDeque<QueryToSend>,
    events: VecDeque<Event>,
    dropped_over_limit: u64,
    /// The groups state is kept for; `None` for every group.
    forwardable: Option<BTreeSet<IpAddr>>,
    ignored: Ignored,
}

impl Router {
    /// A router that starts as querier (RFC 3376 §6.6.2: every router does) and sends
    /// [robustness] general queries a startup query interval apart, the first at `now`.
    pub fn new(family: Family, own: IpAddr, timers: Timers, now: Time) -> Self {
        Router {
            family,
            own,
            configured: timers,
            timers,
            querier: true,
            other: None,
            next_general: Some(now),
            startup_left: timers.count(),
            groups: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            dropped_over_limit: 0,
            forwardable: None,
            ignored: Ignored::default(),
        }
    }

    /// The address this router queries from.
    pub fn address(&self) -> IpAddr {
        self.own
    }

    /// Our address changed: the election is run again against the querier last heard.
    pub fn set_address(&mut self, own: IpAddr, now: Time) {
        self.handle_timeout(now);
        self.own = own;
        self.elect(now);
    }

    pub fn is_querier(&self) -> bool {
        self.querier
    }

    /// The querier's address: ours, or the other router's that won.
    pub fn querier_address(&self) -> IpAddr {
        match self.other {
            Some((a, _)) if !self.querier => a,
            _ => self.own,
        }
    }

    /// The timers in use: the configured ones, with robustness and query interval adopted
    /// from another querier while it is querier.
    pub fn timers(&self) -> Timers {
        self.timers
    }

    /// Group records and sources ignored because of [`MAX_GROUPS`] or [`MAX_SOURCES`].
    pub fn dropped_over_limit(&self) -> u64 {
        self.dropped_over_limit
    }

    /// What was ignored so far, by reason.
    pub fn ignored(&self) -> Ignored {
        self.ignored
    }

    /// Keeps state only for `groups` (those some on-demand output sends to) from now on, so
    /// that a host reporting many other groups cannot take the room of these; the state of
    /// the groups left out goes now. `None` keeps every group.
    pub fn set_forwardable(&mut self, groups: Option<BTreeSet<IpAddr>>) {
        if let Some(keep) = &groups {
            let gone: Vec<IpAddr> = self
                .groups
                .keys()
                .filter(|g| !keep.contains(g))
                .copied()
                .collect();
            for g in gone {
                if let Some(d) = self.groups.remove(&g).and_then(|g| g.deadline) {
                    self.deadlines.remove(&(d, g));
                }
                self.events.push_back(Event::Changed { group: g });
            }
        }
        self.forwardable = groups;
    }

    /// Groups with state.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Whether a report about `group` is for us: a group some output sends to (counted when
    /// not), and for a source-specific group not of an older version (counted when it is).
    fn heeds(&mut self, group: IpAddr, old_version: bool) -> bool {
        if self
            .forwardable
            .as_ref()
            .is_some_and(|f| !f.contains(&group))
        {
            self.ignored.not_forwarded += 1;
            false
        } else if old_version && is_ssm(group) {
            self.ignored.ssm_old_version += 1;
            false
        } else {
            true
        }
    }

    pub fn receive(&mut self, from: IpAddr, msg: &Message, now: Time) {
        // Timers that ran out before this message acted first.
        self.handle_timeout(now);
        let about = match msg {
            Message::Query(_) | Message::Report { .. } => None,
            Message::V1Report { group }
            | Message::V2Report { group }
            | Message::Leave { group } => Some(*group),
        };
        if let Some(group) = about
            && !self.heeds(group, true)
        {
            return;
        }
        match msg {
            Message::Query(q) => self.hear_query(from, q, now),
            Message::V1Report { group } => {
                if self.family == Family::V4 {
                    self.old_report(*group, from, true, now);
                }
            }
            Message::V2Report { group } => self.old_report(*group, from, false, now),
            Message::Leave { group } => {
                // In IGMPv1 mode leaves are ignored (RFC 3376 §7.3.2). Outside the older
                // modes a leave is still a TO_IN({}): a host whose report was lost may
                // send one, and the query it causes costs only the members' answers.
                let v1 = self
                    .groups
                    .get(group)
                    .is_some_and(|g| g.compat(self.family) == Compat::IgmpV1);
                if !v1 {
                    self.update(*group, false, now, |g, cx| {
                        g.last_reporter = Some(from);
                        g.apply(RecordType::ToIn, &BTreeSet::new(), cx);
                    });
                }
            }
            Message::Report { records } => {
                for r in records {
                    self.record(r.group, r.kind, &r.sources, from, now);
                }
            }
        }
    }

    /// A v1/v2 report (an MLDv1 report for IPv6): the older host present timer, then
    /// IS_EX({}).
    fn old_report(&mut self, group: IpAddr, from: IpAddr, v1: bool, now: Time) {
        let present = now.saturating_add(self.timers.older_host_present_interval());
        self.update(group, true, now, |g, cx| {
            if v1 {
                g.v1_host = Some(present);
            } else {
                g.v2_host = Some(present);
            }
            g.last_reporter = Some(from);
            g.apply(RecordType::IsEx, &BTreeSet::new(), cx);
        });
    }

    fn record(
        &mut self,
        group: IpAddr,
        kind: RecordType,
        sources: &[IpAddr],
        from: IpAddr,
        now: Time,
    ) {
        if !self.heeds(group, false) {
            return;
        }
        // RFC 4604 §2.2.2: EXCLUDE mode does not apply to a source-specific group.
        if is_ssm(group) && matches!(kind, RecordType::IsEx | RecordType::ToEx) {
            self.ignored.ssm_exclude += 1;
            return;
        }
        let family = self.family;
        let old = self
            .groups
            .get(&group)
            .is_some_and(|g| g.compat(family).is_old());
        // RFC 3376 §7.3.2 / RFC 3810 §8.3.2: in an older mode BLOCK is ignored, and so is
        // a TO_EX's source list.
        let sources: BTreeSet<IpAddr> = match kind {
            RecordType::Block if old => return,
            RecordType::ToEx if old => BTreeSet::new(),
            _ => sources
                .iter()
                .copied()
                .filter(|s| Family::of(*s) == family)
                .collect(),
        };
        // A record that leaves an absent group in INCLUDE({}) creates nothing.
        let creates = match kind {
            RecordType::IsEx | RecordType::ToEx => true,
            RecordType::IsIn | RecordType::Allow | RecordType::ToIn => !sources.is_empty(),
            RecordType::Block => false,
        };
        self.update(group, creates, now, |g, cx| {
            g.last_reporter = Some(from);
            g.apply(kind, &sources, cx);
        });
    }

    fn hear_query(&mut self, from: IpAddr, q: &Query, now: Time) {
        // Our own query looped back; with no address of ours, a query from the unspecified
        // address is another addressless querier's.
        if Family::of(from) != self.family || (from == self.own && !from.is_unspecified()) {
            return;
        }
        // A querier without an address (a Linux bridge's, by default, queries from 0.0.0.0)
        // wins against no one: it is not a candidate, and it yields to any querier it hears
        // (below, through `rank`).
        if !from.is_unspecified() {
            let lowest = self.other.is_none_or(|(a, _)| from <= a);
            if lowest {
                if rank(from) < rank(self.own) {
                    let v3 = match self.family {
                        Family::V4 => q.version == 3,
                        Family::V6 => q.version == 2,
                    };
                    // RFC 3376 §4.1.6-7: a non-querier adopts the querier's robustness and
                    // query interval, or its configured ones where the querier sends 0.
                    if v3 {
                        self.timers.robustness = if q.qrv == 0 {
                            self.configured.robustness
                        } else {
                            q.qrv
                        };
                        self.timers.query_interval = if q.qqi.is_zero() {
                            self.configured.query_interval
                        } else {
                            q.qqi
                        };
                    }
                }
                let present = now.saturating_add(self.timers.other_querier_present_interval());
                self.other = Some((from, present));
            }
            self.elect(now);
        }
        // RFC 3376 §6.6.1: a group-specific query without the suppress flag lowers the
        // timers it names to LMQT, whoever sent it; a non-querier learns of leaves only so.
        // The LMQT is the querier's: its max response time × robustness, as RFC 2236 §3
        // has a non-querier compute it.
        let Some(group) = q.group.filter(|_| !q.suppress) else {
            return;
        };
        let interval = if q.max_response.is_zero() {
            self.timers.last_member_query_interval
        } else {
            q.max_response
        };
        let lmqt = now.saturating_add(interval.saturating_mul(self.timers.count().into()));
        self.update(group, false, now, |g, _| {
            if q.sources.is_empty() {
                if g.mode == FilterMode::Exclude {
                    g.timer = Some(g.timer.map_or(lmqt, |t| t.min(lmqt)));
                }
            } else {
                for s in &q.sources {
                    if let Some(src) = g.sources.get_mut(s)
                        && src.timer.is_some_and(|t| t > lmqt)
                    {
                        src.timer = Some(lmqt);
                    }
                }
            }
        });
    }

    /// The lowest address is querier (RFC 3376 §6.6.2, RFC 3810 §7.6.2); our own address
    /// when unspecified ranks above every other, so that we yield to any querier heard, as
    /// the Linux bridge does when it queries from 0.0.0.0.
    fn elect(&mut self, now: Time) {
        let win = !matches!(self.other, Some((a, _)) if rank(a) < rank(self.own));
        if win && !self.querier {
            self.querier = true;
            self.timers = self.configured;
            self.startup_left = 0;
            self.next_general = Some(now);
        } else if !win && self.querier {
            self.querier = false;
            self.next_general = None;
            self.startup_left = 0;
            self.transmits.clear();
            for g in self.groups.values_mut() {
                g.stop_queries();
            }
            self.deadlines.clear();
            for (addr, g) in &mut self.groups {
                g.deadline = g.next_deadline();
                if let Some(d) = g.deadline {
                    self.deadlines.insert((d, *addr));
                }
            }
        }
    }

    /// Runs `f` on a group's state (creating it first when `create` and there is room),
    /// then drops the state if it is empty, files its next deadline and reports a change
    /// of forwarding.
    fn update(
        &mut self,
        addr: IpAddr,
        create: bool,
        now: Time,
        f: impl FnOnce(&mut Group, &mut Ctx),
    ) {
        if Family::of(addr) != self.family || !addr.is_multicast() {
            return;
        }
        let before = self.groups.get(&addr).map(Group::forwarding);
        if before.is_none() {
            if !create {
                return;
            }
            if self.groups.len() >= MAX_GROUPS {
                self.dropped_over_limit += 1;
                return;
            }
            self.groups.insert(addr, Group::new(addr));
        }
        let Some(g) = self.groups.get_mut(&addr) else {
            return;
        };
        let mut cx = Ctx {
            now,
            timers: self.timers,
            querier: self.querier,
            family: self.family,
            out: &mut self.transmits,
            dropped: &mut self.dropped_over_limit,
        };
        f(g, &mut cx);
        if let Some(d) = g.deadline.take() {
            self.deadlines.remove(&(d, addr));
        }
        let after = if g.is_empty() {
            self.groups.remove(&addr);
            None
        } else {
            g.deadline = g.next_deadline();
            if let Some(d) = g.deadline {
                self.deadlines.insert((d, addr));
            }
            Some(g.forwarding())
        };
        if before != after {
            let e = Event::Changed { group: addr };
            if self.events.back() != Some(&e) {
                self.events.push_back(e);
            }
        }
    }

    /// Serves every timer due at or before `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        if let Some((_, t)) = self.other
            && t <= now
        {
            // §6.6.2: the other querier went quiet; we are querier again.
            self.other = None;
            self.elect(now);
        }
        if self.querier
            && let Some(t) = self.next_general.filter(|t| *t <= now)
        {
            self.transmits.push_back(QueryToSend {
                group: None,
                sources: Vec::new(),
                max_response: self.timers.query_response_interval,
                suppress: false,
                qrv: self.timers.robustness,
                qqi: self.timers.query_interval,
            });
            self.startup_left = self.startup_left.saturating_sub(1);
            let every = if self.startup_left > 0 {
                self.timers.startup_query_interval()
            } else {
                self.timers.query_interval
            };
            // Late by more than a period: one query now, not a burst to catch up.
            let mut next = t.saturating_add(every);
            if next <= now {
                next = now.saturating_add(every);
            }
            self.next_general = Some(next);
        }
        while let Some(&(t, addr)) = self.deadlines.first()
            && t <= now
        {
            let before = self.deadlines.len();
            self.update(addr, false, now, |g, cx| g.expire(now, cx));
            // `update` re-files the group later than `now` or drops it; should it ever not,
            // this keeps the loop finite.
            if self.deadlines.first() == Some(&(t, addr)) && self.deadlines.len() == before {
                self.deadlines.remove(&(t, addr));
            }
        }
    }

    /// The earliest deadline: call [`Router::handle_timeout`] then.
    pub fn poll_timeout(&self) -> Option<Time> {
        let general = self.next_general.filter(|_| self.querier);
        [
            general,
            self.other.map(|(_, t)| t),
            self.deadlines.first().map(|(t, _)| *t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_transmit(&mut self) -> Option<QueryToSend> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether traffic to `group` is wanted behind this interface: from any source
    /// (`source` `None`: the group has state that wants some traffic), or from `source`
    /// (RFC 3376 §6.3, RFC 3810 §7.3: INCLUDE with its timer running, or EXCLUDE without it
    /// in the exclude list). As of the last call that took the time.
    pub fn forwards(&self, group: IpAddr, source: Option<IpAddr>) -> bool {
        let Some(g) = self.groups.get(&group) else {
            return false;
        };
        match (source, g.mode) {
            (None, FilterMode::Exclude) => true,
            (None, FilterMode::Include) => !g.sources.is_empty(),
            (Some(s), FilterMode::Include) => g.running(&s),
            (Some(s), FilterMode::Exclude) => g.sources.get(&s).is_none_or(|s| s.timer.is_some()),
        }
    }

    /// The filter the hosts want for `group`: `None` if none listens, else the mode and the
    /// sources that decide it (INCLUDE: those forwarded; EXCLUDE: those blocked, none for
    /// every source). As of the last call that took the time.
    pub fn filter(&self, group: IpAddr) -> Option<(FilterMode, Vec<IpAddr>)> {
        self.groups.get(&group).map(Group::forwarding)
    }

    pub fn groups(&self, now: Time) -> Vec<GroupView> {
        let left = |t: Option<Time>| t.map_or(Duration::ZERO, |t| t.saturating_sub(now));
        self.groups
            .values()
            .map(|g| GroupView {
                group: g.addr,
                mode: g.mode,
                compat: g.compat(self.family),
                sources: g
                    .sources
                    .iter()
                    .map(|(s, src)| SourceView {
                        source: *s,
                        remaining: left(src.timer),
                    })
                    .collect(),
                timer: g.timer.map(|t| t.saturating_sub(now)),
                last_reporter: g.last_reporter,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listeners::wire::Record;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const T0: Time = Duration::from_secs(1000);
    const OWN: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));
    const LOWER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const HIGHER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));
    const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100));
    const HOST2: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 101));
    const G: IpAddr = IpAddr::V4(Ipv4Addr::new(239, 1, 1, 1));
    const GMI: u64 = 260_000;

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    fn s(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, n))
    }

    /// A router on a simulated clock, its startup queries drained.
    struct Sim {
        r: Router,
        now: Time,
    }

    type State = (FilterMode, Vec<(u8, u64)>, Option<u64>);

    impl Sim {
        fn v4() -> Sim {
            Sim::with(OWN)
        }

        /// A router querying from `own`, of its family.
        fn with(own: IpAddr) -> Sim {
            let mut r = Router::new(Family::of(own), own, Timers::default(), T0);
            r.handle_timeout(T0);
            let mut sim = Sim { r, now: T0 };
            assert_eq!(sim.general(), 1);
            sim
        }

        fn advance(&mut self, m: u64) {
            self.now += ms(m);
            self.r.handle_timeout(self.now);
        }

        fn rec(&mut self, kind: RecordType, srcs: &[u8]) {
            self.rec_from(HOST, kind, srcs);
        }

        fn rec_from(&mut self, from: IpAddr, kind: RecordType, srcs: &[u8]) {
            let records = vec![Record {
                kind,
                group: G,
                sources: srcs.iter().map(|n| s(*n)).collect(),
            }];
            self.r.receive(from, &Message::Report { records }, self.now);
        }

        fn msg(&mut self, from: IpAddr, m: Message) {
            self.r.receive(from, &m, self.now);
        }

        /// G's mode, sources (last octet, remaining ms) and group timer (ms).
        fn state(&self) -> Option<State> {
            self.r
                .groups(self.now)
                .into_iter()
                .find(|v| v.group == G)
                .map(|v| {
                    let sources = v
                        .sources
                        .iter()
                        .map(|sv| match sv.source {
                            IpAddr::V4(a) => (a.octets()[3], sv.remaining.as_millis() as u64),
                            IpAddr::V6(_) => unreachable!(),
                        })
                        .collect();
                    (v.mode, sources, v.timer.map(|t| t.as_millis() as u64))
                })
        }

        /// The group-specific queries for G sent since the last call, as (sources, S flag);
        /// periodic general queries are skipped ([`Sim::general`] counts those).
        fn queries(&mut self) -> Vec<(Vec<u8>, bool)> {
            let mut out = Vec::new();
            while let Some(q) = self.r.poll_transmit() {
                if q.group.is_none() {
                    continue;
                }
                assert_eq!(q.group, Some(G), "only queries for G expected here: {q:?}");
                assert_eq!(q.max_response, ms(1000), "LMQI");
                let srcs = q
                    .sources
                    .iter()
                    .map(|a| match a {
                        IpAddr::V4(a) => a.octets()[3],
                        IpAddr::V6(_) => unreachable!(),
                    })
                    .collect();
                out.push((srcs, q.suppress));
            }
            out
        }

        /// How many general queries were sent since the last call (and no others).
        fn general(&mut self) -> usize {
            let mut n = 0;
            while let Some(q) = self.r.poll_transmit() {
                assert_eq!(q.group, None, "{q:?}");
                assert_eq!(
                    (q.max_response, q.qrv, q.qqi, q.suppress),
                    (ms(10_000), 2, ms(125_000), false)
                );
                n += 1;
            }
            n
        }

        fn changed(&mut self) -> bool {
            let mut seen = false;
            while let Some(Event::Changed { group }) = self.r.poll_event() {
                assert_eq!(group, G);
                seen = true;
            }
            seen
        }

        fn fwd(&self, n: u8) -> bool {
            self.r.forwards(G, Some(s(n)))
        }

        fn any(&self) -> bool {
            self.r.forwards(G, None)
        }

        /// Another router wins the election.
        fn lose_election(&mut self) {
            let q = general_query();
            self.msg(LOWER, q);
            assert!(!self.r.is_querier());
        }

        /// EXCLUDE(X = {2}, Y = {3}), both records at the current time.
        fn exclude_x2_y3(&mut self) {
            self.rec(RecordType::IsIn, &[2]);
            self.rec(RecordType::IsEx, &[2, 3]);
            assert_eq!(
                self.state(),
                Some((FilterMode::Exclude, vec![(2, GMI), (3, 0)], Some(GMI)))
            );
        }
    }

    fn general_query() -> Message {
        Message::Query(Query {
            version: 3,
            group: None,
            max_response: ms(10_000),
            suppress: false,
            qrv: 2,
            qqi: ms(125_000),
            sources: vec![],
        })
    }

    fn specific_query(sources: &[u8], suppress: bool) -> Message {
        Message::Query(Query {
            version: 3,
            group: Some(G),
            max_response: ms(1000),
            suppress,
            qrv: 2,
            qqi: ms(125_000),
            sources: sources.iter().map(|n| s(*n)).collect(),
        })
    }

    use FilterMode::{Exclude, Include};
    use RecordType::*;

    // RFC 3376 §6.4.1, current-state records.

    #[test]
    fn include_is_in_adds_sources_at_gmi() {
        let mut sim = Sim::v4();
        sim.rec(IsIn, &[1, 2]);
        assert!(sim.changed());
        sim.advance(10_000);
        sim.rec(IsIn, &[2, 3]);
        assert_eq!(
            sim.state(),
            Some((Include, vec![(1, GMI - 10_000), (2, GMI), (3, GMI)], None))
        );
        assert!(sim.queries().is_empty());
        assert!(sim.fwd(1) && sim.fwd(2) && sim.fwd(3) && sim.any());
        assert!(!sim.fwd(4));
        assert!(sim.changed(), "source 3 is new");
    }

    #[test]
    fn include_is_ex_goes_to_exclude_with_new_sources_excluded() {
        let mut sim = Sim::v4();
        sim.rec(IsIn, &[1, 2]);
        sim.advance(10_000);
        sim.changed();
        sim.rec(IsEx, &[2, 3]);
        // EXCLUDE(A*B, B-A): 1 deleted, 2 keeps its timer, 3 at zero.
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![(2, GMI - 10_000), (3, 0)], Some(GMI)))
        );
        assert!(sim.queries().is_empty());
        assert!(sim.changed());
        assert!(sim.fwd(1) && sim.fwd(2) && sim.fwd(4));
        assert!(!sim.fwd(3));
    }

    #[test]
    fn exclude_is_in_moves_sources_out_of_the_exclude_list() {
        let mut sim = Sim::v4();
        sim.exclude_x2_y3();
        assert!(!sim.fwd(3));
        sim.advance(10_000);
        sim.changed();
        sim.rec(IsIn, &[3, 4]);
        assert_eq!(
            sim.state(),
            Some((
                Exclude,
                vec![(2, GMI - 10_000), (3, GMI), (4, GMI)],
                Some(GMI - 10_000)
            ))
        );
        assert!(sim.fwd(3) && sim.fwd(4));
        assert!(sim.queries().is_empty());
        assert!(sim.changed());
    }

    #[test]
    fn exclude_is_ex_replaces_both_lists() {
        let mut sim = Sim::v4();
        sim.exclude_x2_y3();
        sim.advance(10_000);
        sim.rec(IsEx, &[3, 4]);
        // EXCLUDE(A-Y, Y*A): 2 deleted, 3 stays excluded, 4 new at GMI; group timer GMI.
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![(3, 0), (4, GMI)], Some(GMI)))
        );
        assert!(sim.queries().is_empty());
        assert!(sim.fwd(2) && sim.fwd(4) && !sim.fwd(3));
    }

    // RFC 3376 §6.4.2, filter-mode-change and source-list-change records.

    #[test]
    fn include_allow_adds_sources() {
        let mut sim = Sim::v4();
        sim.rec(IsIn, &[1]);
        sim.advance(10_000);
        sim.rec(Allow, &[1, 2]);
        assert_eq!(sim.state(), Some((Include, vec![(1, GMI), (2, GMI)], None)));
        assert!(sim.queries().is_empty());
    }

    #[test]
    fn include_block_queries_the_blocked_sources_then_drops_them() {
        let mut sim = Sim::v4();
        sim.rec(IsIn, &[1, 2]);
        sim.advance(10_000);
        sim.changed();
        sim.rec(Block, &[2, 9]);
        // Q(G, A*B) = Q(G, {2}); 2 lowered to LMQT; 9 was never there.
        assert_eq!(sim.queries(), vec![(vec![2], false)]);
        assert_eq!(
            sim.state(),
            Some((Include, vec![(1, GMI - 10_000), (2, 2000)], None))
        );
        assert!(sim.fwd(2), "until LMQT runs out");
        assert!(!sim.changed());
        sim.advance(999);
        assert!(sim.queries().is_empty());
        sim.advance(1);
        assert_eq!(
            sim.queries(),
            vec![(vec![2], false)],
            "the retransmission, LMQI later"
        );
        sim.advance(999);
        assert!(sim.fwd(2));
        sim.advance(1);
        assert!(!sim.fwd(2) && sim.fwd(1));
        assert_eq!(sim.state(), Some((Include, vec![(1, GMI - 12_000)], None)));
        assert!(sim.changed());
        sim.advance(10_000);
        assert!(
            sim.queries().is_empty(),
            "[Last Member Query Count] = 2 queries only"
        );
    }

    #[test]
    fn include_block_answered_keeps_the_source_and_suppresses() {
        let mut sim = Sim::v4();
        sim.rec(IsIn, &[1, 2]);
        sim.rec(Block, &[2]);
        assert_eq!(sim.queries(), vec![(vec![2], false)]);
        sim.advance(300);
        sim.rec_from(HOST2, IsIn, &[2]);
        sim.advance(700);
        // The report raised 2 above LMQT: the retransmission says so with the S flag.
        assert_eq!(sim.queries(), vec![(vec![2], true)]);
        sim.advance(5000);
        assert!(sim.fwd(2));
        assert_eq!(
            sim.state(),
            Some((Include, vec![(1, GMI - 6000), (2, GMI - 5700)], None))
        );
    }

    #[test]
    fn include_to_ex_switches_mode_and_queries_the_kept_sources() {
        let mut sim = Sim::v4();
        sim.rec(IsIn, &[1, 2]);
        sim.advance(10_000);
        sim.rec(ToEx, &[2, 3]);
        // EXCLUDE(A*B, B-A); Q(G, A*B) lowers 2 to LMQT; group timer GMI.
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![(2, 2000), (3, 0)], Some(GMI)))
        );
        assert_eq!(sim.queries(), vec![(vec![2], false)]);
        assert!(sim.fwd(1) && sim.fwd(2) && !sim.fwd(3));
        sim.advance(1000);
        assert_eq!(sim.queries(), vec![(vec![2], false)]);
        sim.advance(1000);
        // An EXCLUDE source whose timer runs out is excluded, not deleted.
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![(2, 0), (3, 0)], Some(GMI - 2000)))
        );
        assert!(!sim.fwd(2) && sim.fwd(1));
    }

    #[test]
    fn include_to_in_queries_the_sources_left_out() {
        let mut sim = Sim::v4();
        sim.rec(IsIn, &[1, 2]);
        sim.advance(10_000);
        sim.rec(ToIn, &[2, 3]);
        assert_eq!(
            sim.state(),
            Some((Include, vec![(1, 2000), (2, GMI), (3, GMI)], None))
        );
        assert_eq!(sim.queries(), vec![(vec![1], false)]);
        sim.advance(2000);
        assert_eq!(sim.queries(), vec![(vec![1], false)]);
        assert!(!sim.fwd(1) && sim.fwd(2) && sim.fwd(3));
    }

    #[test]
    fn exclude_allow_moves_sources_to_the_requested_list() {
        let mut sim = Sim::v4();
        sim.exclude_x2_y3();
        sim.advance(10_000);
        sim.rec(Allow, &[3, 4]);
        assert_eq!(
            sim.state(),
            Some((
                Exclude,
                vec![(2, GMI - 10_000), (3, GMI), (4, GMI)],
                Some(GMI - 10_000)
            ))
        );
        assert!(sim.queries().is_empty());
        assert!(sim.fwd(3));
    }

    #[test]
    fn exclude_block_adds_at_the_group_timer_and_queries_a_minus_y() {
        let mut sim = Sim::v4();
        sim.exclude_x2_y3();
        sim.advance(10_000);
        sim.rec(Block, &[2, 3, 4]);
        // 4 joins X at the group timer, then Q(G, A-Y) = Q(G, {2, 4}) lowers both to LMQT;
        // 3 stays excluded.
        assert_eq!(sim.queries(), vec![(vec![2, 4], false)]);
        assert_eq!(
            sim.state(),
            Some((
                Exclude,
                vec![(2, 2000), (3, 0), (4, 2000)],
                Some(GMI - 10_000)
            ))
        );
        sim.advance(1000);
        assert_eq!(sim.queries(), vec![(vec![2, 4], false)]);
        sim.changed();
        sim.advance(1000);
        assert!(!sim.fwd(2) && !sim.fwd(3) && !sim.fwd(4) && sim.fwd(5) && sim.any());
        assert!(sim.changed());
    }

    #[test]
    fn exclude_block_on_a_non_querier_sets_the_group_timer_and_sends_nothing() {
        let mut sim = Sim::v4();
        sim.lose_election();
        sim.queries();
        sim.exclude_x2_y3();
        sim.advance(10_000);
        sim.rec(Block, &[4]);
        assert_eq!(
            sim.state(),
            Some((
                Exclude,
                vec![(2, GMI - 10_000), (3, 0), (4, GMI - 10_000)],
                Some(GMI - 10_000)
            ))
        );
        assert!(sim.queries().is_empty());
    }

    #[test]
    fn exclude_to_ex_replaces_lists_and_queries_new_sources() {
        let mut sim = Sim::v4();
        sim.exclude_x2_y3();
        sim.advance(10_000);
        sim.rec(ToEx, &[3, 4]);
        // 2 deleted (X-A), 3 stays in Y, 4 at the group timer lowered by Q(G, A-Y = {4}),
        // group timer GMI.
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![(3, 0), (4, 2000)], Some(GMI)))
        );
        assert_eq!(sim.queries(), vec![(vec![4], false)]);
    }

    #[test]
    fn exclude_to_ex_on_a_non_querier_gives_new_sources_the_old_group_timer() {
        let mut sim = Sim::v4();
        sim.lose_election();
        sim.exclude_x2_y3();
        sim.advance(10_000);
        sim.rec(ToEx, &[3, 4]);
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![(3, 0), (4, GMI - 10_000)], Some(GMI)))
        );
        assert!(sim.queries().is_empty());
    }

    #[test]
    fn exclude_to_in_queries_x_minus_a_and_the_group_then_falls_back_to_include() {
        let mut sim = Sim::v4();
        sim.exclude_x2_y3();
        sim.advance(10_000);
        sim.rec(ToIn, &[3]);
        // EXCLUDE(X+A, Y-A); (A)=GMI; Q(G, X-A) = Q(G, {2}); Q(G) lowers the group timer.
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![(2, 2000), (3, GMI)], Some(2000)))
        );
        assert_eq!(sim.queries(), vec![(vec![2], false), (vec![], false)]);
        sim.advance(1000);
        assert_eq!(sim.queries(), vec![(vec![2], false), (vec![], false)]);
        sim.changed();
        sim.advance(1000);
        // Group timer out with 3 still running: INCLUDE({3}).
        assert_eq!(sim.state(), Some((Include, vec![(3, GMI - 2000)], None)));
        assert!(sim.fwd(3) && !sim.fwd(2) && !sim.fwd(9) && sim.any());
        assert!(sim.changed());
        assert!(sim.queries().is_empty());
    }

    // Timers (RFC 3376 §6.3, §6.5).

    #[test]
    fn exclude_group_timer_expiry_without_sources_deletes_the_group() {
        let mut sim = Sim::v4();
        sim.rec(IsEx, &[]);
        assert!(sim.changed() && sim.any());
        sim.advance(GMI - 1);
        assert!(sim.any() && !sim.changed());
        assert_eq!(sim.r.poll_timeout(), Some(sim.now + ms(1)));
        sim.advance(1);
        assert!(!sim.any());
        assert!(sim.changed());
        assert_eq!(sim.state(), None);
    }

    #[test]
    fn exclude_group_timer_expiry_with_running_sources_switches_to_include() {
        let mut sim = Sim::v4();
        sim.rec(IsEx, &[3]);
        sim.advance(100_000);
        sim.rec(Allow, &[1]);
        sim.changed();
        sim.advance(GMI - 100_000);
        assert_eq!(sim.state(), Some((Include, vec![(1, 100_000)], None)));
        assert!(sim.changed());
        assert!(sim.fwd(1) && !sim.fwd(3) && !sim.fwd(4) && sim.any());
        sim.advance(100_000);
        assert_eq!(sim.state(), None);
        assert!(sim.changed() && !sim.any());
    }

    #[test]
    fn include_source_expiry_deletes_the_source_then_the_group() {
        let mut sim = Sim::v4();
        sim.rec(IsIn, &[1]);
        sim.advance(10_000);
        sim.rec(Allow, &[2]);
        sim.changed();
        sim.advance(GMI - 10_000);
        assert_eq!(sim.state(), Some((Include, vec![(2, 10_000)], None)));
        assert!(sim.changed() && !sim.fwd(1));
        sim.advance(10_000);
        assert_eq!(sim.state(), None);
        assert!(sim.changed());
    }

    #[test]
    fn exclude_source_expiry_excludes_the_source() {
        let mut sim = Sim::v4();
        sim.rec(IsEx, &[]);
        sim.advance(5_000);
        sim.rec(Allow, &[1]);
        sim.advance(195_000);
        // IS_EX({1}) keeps 1's timer (A*X) and refreshes the group's.
        sim.rec(IsEx, &[1]);
        sim.changed();
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![(1, GMI - 195_000)], Some(GMI)))
        );
        sim.advance(GMI - 195_000);
        assert_eq!(sim.state(), Some((Exclude, vec![(1, 0)], Some(195_000))));
        assert!(!sim.fwd(1) && sim.fwd(2));
        assert!(sim.changed());
    }

    #[test]
    fn late_handle_timeout_serves_timers_in_order() {
        // Source 1 runs out (to the exclude list) before the group timer: the group is then
        // deleted, not switched to INCLUDE({1}).
        let mut sim = Sim::v4();
        sim.rec(IsEx, &[]);
        sim.advance(1000);
        sim.rec(Allow, &[1]);
        sim.advance(100_000);
        sim.rec(IsEx, &[1]);
        // 1 ends at 261 s, the group at 361 s; one call at 400 s.
        sim.advance(299_000);
        assert_eq!(sim.state(), None);
    }

    // Queries of the querier (RFC 3376 §8.6).

    #[test]
    fn startup_then_periodic_general_queries() {
        let mut r = Router::new(Family::V4, OWN, Timers::default(), T0);
        assert_eq!(r.poll_timeout(), Some(T0));
        assert!(
            r.poll_transmit().is_none(),
            "nothing before the first handle_timeout"
        );
        r.handle_timeout(T0);
        let q = r.poll_transmit().expect("the first startup query");
        assert_eq!(
            q,
            QueryToSend {
                group: None,
                sources: vec![],
                max_response: ms(10_000),
                suppress: false,
                qrv: 2,
                qqi: ms(125_000)
            }
        );
        assert!(r.poll_transmit().is_none());
        let startup = T0 + ms(31_250);
        assert_eq!(
            r.poll_timeout(),
            Some(startup),
            "a quarter of the query interval"
        );
        r.handle_timeout(startup - ms(1));
        assert!(r.poll_transmit().is_none());
        r.handle_timeout(startup);
        assert!(r.poll_transmit().is_some_and(|q| q.group.is_none()));
        assert!(r.poll_transmit().is_none());
        // Robustness 2: two startup queries, then the query interval.
        for k in 1..=3u32 {
            let at = startup + ms(125_000) * k;
            assert_eq!(r.poll_timeout(), Some(at));
            r.handle_timeout(at);
            assert!(r.poll_transmit().is_some_and(|q| q.group.is_none()));
            assert!(r.poll_transmit().is_none());
        }
        assert!(r.is_querier());
    }

    #[test]
    fn a_late_clock_sends_one_general_query_not_a_burst() {
        let mut r = Router::new(Family::V4, OWN, Timers::default(), T0);
        r.handle_timeout(T0 + ms(10_000_000));
        assert!(r.poll_transmit().is_some());
        assert!(r.poll_transmit().is_none());
        assert!(r.poll_timeout().unwrap() > T0 + ms(10_000_000));
    }

    // Compatibility modes (RFC 3376 §7.3.2, RFC 3810 §8.3.2).

    fn compat(sim: &Sim) -> Compat {
        sim.r
            .groups(sim.now)
            .into_iter()
            .find(|v| v.group == G)
            .unwrap()
            .compat
    }

    #[test]
    fn igmpv1_host_present_ignores_leaves_blocks_and_to_ex_sources() {
        let mut sim = Sim::v4();
        sim.msg(HOST, Message::V1Report { group: G });
        assert_eq!(compat(&sim), Compat::IgmpV1);
        assert_eq!(sim.state(), Some((Exclude, vec![], Some(GMI))));
        sim.advance(10_000);
        sim.msg(HOST, Message::Leave { group: G });
        assert!(sim.queries().is_empty(), "leaves are ignored in v1 mode");
        assert_eq!(sim.state(), Some((Exclude, vec![], Some(GMI - 10_000))));
        sim.rec(Block, &[1]);
        assert!(sim.queries().is_empty());
        assert_eq!(sim.state(), Some((Exclude, vec![], Some(GMI - 10_000))));
        sim.rec(ToEx, &[1]);
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![], Some(GMI))),
            "TO_EX({{1}}) as TO_EX({{}})"
        );
        assert!(sim.fwd(1));
        // A v2 report too is IS_EX({}) and v1 still rules.
        sim.msg(HOST2, Message::V2Report { group: G });
        assert_eq!(compat(&sim), Compat::IgmpV1);
        // v1 host present ends GMI after the v1 report; the group lives on from later
        // reports, now in v2 mode until the v2 host timer ends too.
        sim.advance(GMI - 10_000);
        assert_eq!(compat(&sim), Compat::IgmpV2);
        sim.advance(10_000);
        sim.rec(IsEx, &[]);
        assert_eq!(compat(&sim), Compat::IgmpV3);
        sim.msg(HOST, Message::Leave { group: G });
        assert_eq!(sim.queries(), vec![(vec![], false)], "leaves count again");
    }

    #[test]
    fn igmpv2_host_present_translates_and_expires_back_to_v3() {
        let mut sim = Sim::v4();
        sim.msg(HOST, Message::V2Report { group: G });
        assert_eq!(compat(&sim), Compat::IgmpV2);
        assert_eq!(sim.r.groups(sim.now)[0].last_reporter, Some(HOST));
        sim.rec(Block, &[1]);
        sim.rec(ToEx, &[1]);
        assert!(sim.queries().is_empty());
        assert_eq!(sim.state(), Some((Exclude, vec![], Some(GMI))));
        sim.advance(200_000);
        sim.rec(IsEx, &[]);
        sim.advance(GMI - 200_000 - 1);
        assert_eq!(compat(&sim), Compat::IgmpV2);
        sim.advance(1);
        assert_eq!(compat(&sim), Compat::IgmpV3);
        // BLOCK counts again: 1 joins X at the group timer and is queried.
        sim.rec(Block, &[1]);
        assert_eq!(sim.queries(), vec![(vec![1], false)]);
    }

    #[test]
    fn mldv1_host_present_and_done() {
        let own6: IpAddr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 5).into();
        let host6: IpAddr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x100).into();
        let g6: IpAddr = Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 0x42).into();
        let src6: IpAddr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into();
        let mut r = Router::new(Family::V6, own6, Timers::default(), T0);
        r.handle_timeout(T0);
        assert!(r.poll_transmit().is_some_and(|q| q.group.is_none()));
        // IPv4 messages do not touch an IPv6 router.
        r.receive(HOST, &Message::V2Report { group: G }, T0);
        r.receive(HOST, &Message::V1Report { group: G }, T0);
        assert!(r.groups(T0).is_empty());
        r.receive(host6, &Message::V2Report { group: g6 }, T0);
        let v = &r.groups(T0)[0];
        assert_eq!(
            (v.compat, v.mode, v.timer),
            (Compat::MldV1, Exclude, Some(ms(GMI)))
        );
        let block = Message::Report {
            records: vec![Record {
                kind: Block,
                group: g6,
                sources: vec![src6],
            }],
        };
        r.receive(host6, &block, T0);
        assert!(r.poll_transmit().is_none(), "BLOCK ignored in MLDv1 mode");
        r.receive(host6, &Message::Leave { group: g6 }, T0 + ms(1000));
        let q = r
            .poll_transmit()
            .expect("a multicast-address-specific query");
        assert_eq!((q.group, q.suppress, q.sources.len()), (Some(g6), false, 0));
        r.handle_timeout(T0 + ms(2000));
        assert!(r.poll_transmit().is_some());
        assert!(r.forwards(g6, None));
        r.handle_timeout(T0 + ms(3000));
        assert!(!r.forwards(g6, None));
        assert!(r.groups(T0 + ms(3000)).is_empty());
    }

    #[test]
    fn mld_source_queries_are_split_to_fit_the_minimum_mtu() {
        let own6: IpAddr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 5).into();
        let g6: IpAddr = Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 0x42).into();
        let mut r = Router::new(Family::V6, own6, Timers::default(), T0);
        r.handle_timeout(T0);
        r.poll_transmit();
        let sources: Vec<IpAddr> = (0..100u16)
            .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i).into())
            .collect();
        let rec = |kind| Message::Report {
            records: vec![Record {
                kind,
                group: g6,
                sources: sources.clone(),
            }],
        };
        r.receive(own6, &rec(Allow), T0);
        r.receive(own6, &rec(Block), T0);
        let qs: Vec<QueryToSend> = std::iter::from_fn(|| r.poll_transmit()).collect();
        assert_eq!(
            qs.iter().map(|q| q.sources.len()).collect::<Vec<_>>(),
            vec![75, 25]
        );
        let frame = crate::listeners::wire::build_query(&qs[0], [2; 6], own6);
        assert!(frame.len() - 14 <= 1280);
    }

    // Querier election (RFC 3376 §6.6.2).

    #[test]
    fn a_lower_querier_takes_over_until_it_goes_quiet() {
        let mut sim = Sim::v4();
        sim.advance(1000);
        sim.lose_election();
        assert_eq!(sim.r.querier_address(), LOWER);
        // No more general queries: neither the second startup one nor periodic ones.
        sim.advance(200_000);
        assert_eq!(sim.general(), 0);
        // Reports are still tracked; a leave sends nothing and lowers nothing.
        sim.msg(HOST, Message::V2Report { group: G });
        assert!(sim.any());
        sim.advance(1000);
        sim.msg(HOST, Message::Leave { group: G });
        assert!(sim.queries().is_empty());
        assert_eq!(sim.state(), Some((Exclude, vec![], Some(GMI - 1000))));
        // Other querier present interval: 2 × 125 + 10 / 2 = 255 s after its query.
        let back = T0 + ms(1000 + 255_000);
        sim.advance((back - sim.now).as_millis() as u64 - 1);
        assert!(!sim.r.is_querier());
        assert_eq!(sim.general(), 0);
        sim.advance(1);
        assert!(sim.r.is_querier());
        assert_eq!(sim.r.querier_address(), OWN);
        assert_eq!(sim.general(), 1, "a general query on taking over");
        assert_eq!(sim.r.poll_timeout(), Some(back + ms(125_000)));
        sim.advance(125_000);
        assert_eq!(sim.general(), 1);
    }

    #[test]
    fn a_querier_heard_again_keeps_us_quiet() {
        let mut sim = Sim::v4();
        sim.lose_election();
        for _ in 0..5 {
            sim.advance(125_000);
            sim.lose_election();
        }
        assert_eq!(sim.general(), 0);
    }

    #[test]
    fn a_higher_querier_does_not_win() {
        let mut sim = Sim::v4();
        sim.msg(HIGHER, general_query());
        assert!(sim.r.is_querier());
        sim.advance(31_250);
        assert_eq!(sim.general(), 1, "startup goes on");
        // Nor does a query from 0.0.0.0, or our own looped back.
        sim.msg(IpAddr::V4(Ipv4Addr::UNSPECIFIED), general_query());
        sim.msg(OWN, general_query());
        assert!(sim.r.is_querier());
    }

    /// A router with no address of its own queries from the unspecified address, as the
    /// Linux bridge does, and yields to any querier it hears, however high its address;
    /// once that one has been quiet for the other querier present interval it queries
    /// again. Both families.
    #[test]
    fn without_an_address_we_yield_to_any_querier() {
        let v6_higher = IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xffff));
        for (own, other) in [
            (IpAddr::V4(Ipv4Addr::UNSPECIFIED), HIGHER),
            (
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V4(Ipv4Addr::BROADCAST),
            ),
            (IpAddr::V6(Ipv6Addr::UNSPECIFIED), v6_higher),
        ] {
            let mut sim = Sim::with(own);
            assert!(sim.r.is_querier(), "alone, it queries");
            sim.advance(1000);
            sim.msg(other, general_query());
            assert!(!sim.r.is_querier(), "{own} yields to {other}");
            assert_eq!(sim.r.querier_address(), other);
            sim.advance(250_000);
            assert_eq!(sim.general(), 0, "{own} keeps quiet while {other} is heard");
            // Heard last at 1 s: back 2 × 125 + 10 / 2 = 255 s later.
            sim.advance(6_000);
            assert!(sim.r.is_querier(), "{other} went quiet");
            assert_eq!(sim.r.querier_address(), own);
            assert_eq!(sim.general(), 1);
        }
    }

    /// The other way round: a querier with no address never wins against one with an
    /// address (already the case before the relay's own address could be unspecified), and
    /// two without an address both query (neither is a candidate: hosts answer either).
    #[test]
    fn a_querier_without_an_address_wins_against_no_one() {
        let zero = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let mut sim = Sim::v4();
        sim.msg(zero, general_query());
        assert!(sim.r.is_querier());
        assert_eq!(sim.r.querier_address(), OWN);
        let mut sim = Sim::with(zero);
        sim.msg(zero, general_query());
        assert!(sim.r.is_querier());
        sim.advance(31_250);
        assert_eq!(sim.general(), 1, "startup goes on");
    }

    /// Readdressing runs the election with the unspecified address ranked last: losing the
    /// address yields to a querier heard, gaining one lower than it takes over.
    #[test]
    fn losing_or_gaining_an_address_reruns_the_election() {
        let zero = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let mut sim = Sim::with(LOWER);
        sim.msg(HIGHER, general_query());
        assert!(sim.r.is_querier());
        sim.r.set_address(zero, sim.now);
        assert!(!sim.r.is_querier(), "without an address, {HIGHER} wins");
        sim.advance(1000);
        sim.r.set_address(LOWER, sim.now);
        assert!(sim.r.is_querier());
        sim.r.handle_timeout(sim.now);
        assert_eq!(sim.general(), 1);
    }

    #[test]
    fn losing_the_election_stops_pending_specific_queries() {
        let mut sim = Sim::v4();
        sim.msg(HOST, Message::V2Report { group: G });
        sim.msg(HOST, Message::Leave { group: G });
        assert_eq!(sim.queries(), vec![(vec![], false)]);
        sim.lose_election();
        sim.advance(1000);
        assert!(sim.queries().is_empty());
    }

    #[test]
    fn a_non_querier_lowers_timers_on_specific_queries_without_the_s_flag() {
        let mut sim = Sim::v4();
        sim.lose_election();
        sim.rec(IsEx, &[]);
        sim.msg(LOWER, specific_query(&[], true));
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![], Some(GMI))),
            "S set: no change"
        );
        sim.msg(LOWER, specific_query(&[], false));
        // The querier's max response (1 s) × robustness.
        assert_eq!(sim.state(), Some((Exclude, vec![], Some(2000))));
        sim.advance(2000);
        assert!(!sim.any());

        sim.rec(IsIn, &[1, 2]);
        sim.msg(LOWER, specific_query(&[1], false));
        assert_eq!(
            sim.state(),
            Some((Include, vec![(1, 2000), (2, GMI)], None))
        );
        sim.advance(2000);
        assert!(!sim.fwd(1) && sim.fwd(2));
    }

    #[test]
    fn set_address_reruns_the_election() {
        let mut sim = Sim::v4();
        sim.msg(HIGHER, general_query());
        assert!(sim.r.is_querier());
        sim.r
            .set_address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 20)), sim.now);
        assert!(!sim.r.is_querier());
        assert_eq!(sim.r.querier_address(), HIGHER);
        sim.advance(1000);
        sim.r
            .set_address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), sim.now);
        assert!(sim.r.is_querier());
        sim.r.handle_timeout(sim.now);
        assert_eq!(sim.general(), 1);
    }

    #[test]
    fn a_non_querier_adopts_the_queriers_robustness_and_interval() {
        let mut sim = Sim::v4();
        let q = Message::Query(Query {
            version: 3,
            group: None,
            max_response: ms(10_000),
            suppress: false,
            qrv: 3,
            qqi: ms(60_000),
            sources: vec![],
        });
        sim.msg(LOWER, q);
        assert_eq!(
            (sim.r.timers().robustness, sim.r.timers().query_interval),
            (3, ms(60_000))
        );
        sim.rec(IsEx, &[]);
        assert_eq!(
            sim.state(),
            Some((Exclude, vec![], Some(3 * 60_000 + 10_000)))
        );
        // Other querier present: 3 × 60 + 5 s; then our own values again.
        sim.advance(185_000);
        assert!(sim.r.is_querier());
        assert_eq!(sim.r.timers(), Timers::default());
    }

    // Leaves (RFC 3376 §6.6.3.1).

    #[test]
    fn last_member_leaves() {
        let mut sim = Sim::v4();
        sim.msg(HOST, Message::V2Report { group: G });
        sim.advance(10_000);
        sim.changed();
        sim.msg(HOST, Message::Leave { group: G });
        assert_eq!(sim.queries(), vec![(vec![], false)]);
        assert_eq!(sim.state(), Some((Exclude, vec![], Some(2000))));
        sim.advance(1000);
        assert_eq!(sim.queries(), vec![(vec![], false)]);
        sim.advance(999);
        assert!(sim.any() && !sim.changed());
        sim.advance(1);
        assert!(!sim.any() && sim.changed());
        sim.advance(10_000);
        assert!(sim.queries().is_empty());
    }

    #[test]
    fn a_report_after_a_leave_keeps_the_group() {
        let mut sim = Sim::v4();
        sim.msg(HOST, Message::V2Report { group: G });
        sim.advance(10_000);
        sim.msg(HOST, Message::Leave { group: G });
        assert_eq!(sim.queries(), vec![(vec![], false)]);
        sim.advance(500);
        sim.msg(HOST2, Message::V2Report { group: G });
        assert_eq!(sim.state(), Some((Exclude, vec![], Some(GMI))));
        sim.advance(500);
        assert_eq!(
            sim.queries(),
            vec![(vec![], true)],
            "the retransmission suppresses"
        );
        sim.advance(5000);
        assert!(sim.any());
        assert!(sim.queries().is_empty());
        assert_eq!(sim.r.groups(sim.now)[0].last_reporter, Some(HOST2));
    }

    #[test]
    fn two_v3_members_one_leaving() {
        let mut sim = Sim::v4();
        sim.rec_from(HOST, IsEx, &[]);
        sim.rec_from(HOST2, IsEx, &[]);
        sim.advance(10_000);
        sim.rec_from(HOST, ToIn, &[]);
        assert_eq!(sim.queries(), vec![(vec![], false)]);
        sim.advance(300);
        sim.rec_from(HOST2, IsEx, &[]);
        sim.advance(5000);
        assert!(sim.any());
        assert_eq!(sim.state(), Some((Exclude, vec![], Some(GMI - 5000))));
        assert_eq!(sim.queries(), vec![(vec![], true)]);
    }

    #[test]
    fn records_that_create_nothing_leave_no_state() {
        let mut sim = Sim::v4();
        sim.msg(HOST, Message::Leave { group: G });
        sim.rec(Block, &[1]);
        sim.rec(ToIn, &[]);
        sim.rec(IsIn, &[]);
        sim.rec(Allow, &[]);
        assert_eq!(sim.state(), None);
        assert!(sim.queries().is_empty() && !sim.changed());
        // Non-multicast groups are not groups.
        sim.msg(HOST, Message::V2Report { group: HOST });
        assert!(sim.r.groups(sim.now).is_empty());
    }

    // Bounds.

    #[test]
    fn groups_beyond_the_bound_are_dropped_and_counted() {
        let mut sim = Sim::v4();
        for i in 0..MAX_GROUPS as u32 {
            let g = IpAddr::V4(Ipv4Addr::from(0xef00_0000 | i));
            sim.msg(HOST, Message::V2Report { group: g });
        }
        assert_eq!(sim.r.dropped_over_limit(), 0);
        sim.msg(HOST, Message::V2Report { group: G });
        assert_eq!(sim.r.dropped_over_limit(), 1);
        assert!(!sim.any());
        assert_eq!(sim.r.groups(sim.now).len(), MAX_GROUPS);
        // Existing groups still update.
        let first = IpAddr::V4(Ipv4Addr::from(0xef00_0000));
        sim.msg(HOST, Message::Leave { group: first });
        assert_eq!(sim.r.poll_transmit().map(|q| q.group), Some(Some(first)));
    }

    #[test]
    fn sources_beyond_the_bound_are_dropped_and_counted() {
        let mut sim = Sim::v4();
        let many: Vec<IpAddr> = (0..300u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0xc000_0200 + i)))
            .collect();
        sim.msg(
            HOST,
            Message::Report {
                records: vec![Record {
                    kind: Allow,
                    group: G,
                    sources: many.clone(),
                }],
            },
        );
        assert_eq!(sim.r.groups(sim.now)[0].sources.len(), MAX_SOURCES);
        assert_eq!(sim.r.dropped_over_limit(), 300 - MAX_SOURCES as u64);
        assert!(sim.r.forwards(G, Some(many[0])) && !sim.r.forwards(G, Some(many[299])));
    }

    // Properties.

    #[derive(Debug, Clone)]
    enum Op {
        Advance(u64),
        Record(u8, u8, Vec<u8>),
        V1(u8),
        V2(u8),
        Leave(u8),
        Query {
            from: u8,
            group: Option<u8>,
            sources: Vec<u8>,
            suppress: bool,
            qrv: u8,
            qqi: u64,
        },
        Address(u8),
    }

    fn group(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(239, 0, 0, n % 4))
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let srcs = proptest::collection::vec(0u8..6, 0..5);
        prop_oneof![
            4 => prop_oneof![0u64..3000, 0u64..300_000, Just(0)].prop_map(Op::Advance),
            4 => (1u8..=6, any::<u8>(), srcs.clone()).prop_map(|(k, g, s)| Op::Record(k, g, s)),
            1 => any::<u8>().prop_map(Op::V1),
            2 => any::<u8>().prop_map(Op::V2),
            2 => any::<u8>().prop_map(Op::Leave),
            1 => (0u8..12, proptest::option::of(any::<u8>()), srcs, any::<bool>(), 0u8..8, 0u64..400)
                .prop_map(|(from, group, sources, suppress, qrv, qqi)| Op::Query { from, group, sources, suppress, qrv, qqi }),
            1 => (1u8..12).prop_map(Op::Address),
        ]
    }

    fn run_op(r: &mut Router, now: &mut Time, op: &Op) {
        let host = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100));
        match op {
            Op::Advance(m) => {
                *now += ms(*m);
                r.handle_timeout(*now);
            }
            Op::Record(k, g, srcs) => {
                let records = vec![Record {
                    kind: RecordType::from_wire(*k).unwrap(),
                    group: group(*g),
                    sources: srcs.iter().map(|n| s(*n)).collect(),
                }];
                r.receive(host, &Message::Report { records }, *now);
            }
            Op::V1(g) => r.receive(host, &Message::V1Report { group: group(*g) }, *now),
            Op::V2(g) => r.receive(host, &Message::V2Report { group: group(*g) }, *now),
            Op::Leave(g) => r.receive(host, &Message::Leave { group: group(*g) }, *now),
            Op::Query {
                from,
                group: g,
                sources,
                suppress,
                qrv,
                qqi,
            } => {
                let q = Query {
                    version: 3,
                    group: g.map(group),
                    max_response: ms(1000),
                    suppress: *suppress,
                    qrv: *qrv,
                    qqi: ms(qqi * 1000),
                    sources: sources.iter().map(|n| s(*n)).collect(),
                };
                r.receive(
                    IpAddr::V4(Ipv4Addr::new(10, 0, 0, *from)),
                    &Message::Query(q),
                    *now,
                );
            }
            Op::Address(a) => r.set_address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, *a)), *now),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any sequence: no panic, no deadline left in the past, no empty or oversized
        /// state, every forwarding change announced, queries only for known-shaped groups.
        #[test]
        fn random_sequences_keep_the_invariants(ops in proptest::collection::vec(arb_op(), 1..60)) {
            let mut now = T0;
            let mut r = Router::new(Family::V4, OWN, Timers::default(), now);
            let probe: Vec<(IpAddr, Option<IpAddr>)> = (0..4u8)
                .flat_map(|g| std::iter::once((group(g), None)).chain((0..6).map(move |n| (group(g), Some(s(n))))))
                .collect();
            let mut seen: Vec<bool> = probe.iter().map(|(g, src)| r.forwards(*g, *src)).collect();
            for op in &ops {
                run_op(&mut r, &mut now, op);
                r.handle_timeout(now);
                if let Some(t) = r.poll_timeout() {
                    prop_assert!(t > now, "deadline {t:?} not after {now:?} after {op:?}");
                }
                let views = r.groups(now);
                prop_assert!(views.len() <= MAX_GROUPS);
                for v in &views {
                    prop_assert!(v.sources.len() <= MAX_SOURCES);
                    prop_assert!(v.mode == FilterMode::Exclude || !v.sources.is_empty(), "empty INCLUDE kept: {v:?}");
                    prop_assert_eq!(v.timer.is_some(), v.mode == FilterMode::Exclude);
                    if v.mode == FilterMode::Include {
                        prop_assert!(v.sources.iter().all(|s| !s.remaining.is_zero()));
                    }
                    prop_assert!(r.forwards(v.group, None));
                }
                let mut changed = std::collections::BTreeSet::new();
                while let Some(Event::Changed { group }) = r.poll_event() {
                    changed.insert(group);
                }
                for (i, (g, src)) in probe.iter().enumerate() {
                    let now_fwd = r.forwards(*g, *src);
                    if now_fwd != seen[i] {
                        prop_assert!(changed.contains(g), "{g} {src:?} changed silently after {op:?}");
                    }
                    seen[i] = now_fwd;
                }
                let querier = r.is_querier();
                while let Some(q) = r.poll_transmit() {
                    prop_assert!(q.group.is_none_or(|g| g.is_multicast()));
                    prop_assert!(q.sources.len() <= MAX_QUERY_SOURCES_V4);
                    // Losing the election drops what was queued; a non-querier adds nothing.
                    prop_assert!(querier, "{q:?} queued by a non-querier after {op:?}");
                }
            }
        }

        /// Any-source joins and leaves (IGMPv2 reports and leaves, IGMPv3 IS_EX({}) and
        /// TO_IN({})) on a lone querier agree with a model that knows only: a join keeps
        /// the group GMI from now, a leave cuts what is left to LMQT.
        #[test]
        fn any_source_membership_matches_a_reference_model(
            ops in proptest::collection::vec((0u8..5, 0u8..3, 0u64..400_000), 1..80)
        ) {
            let mut now = T0;
            let mut r = Router::new(Family::V4, OWN, Timers::default(), now);
            let mut model: BTreeMap<IpAddr, Time> = BTreeMap::new();
            let host = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100));
            for (kind, g, wait) in ops {
                let g = group(g);
                let rec = |kind| Message::Report { records: vec![Record { kind, group: g, sources: vec![] }] };
                // Waits are mostly short, so leaves land within LMQT of each other too.
                now += ms(if wait % 3 == 0 { wait } else { wait % 3000 });
                r.handle_timeout(now);
                model.retain(|_, end| *end > now);
                let joined = now + ms(GMI);
                let left = now + ms(2000);
                match kind {
                    0 => r.receive(host, &Message::V2Report { group: g }, now),
                    1 => r.receive(host, &rec(RecordType::IsEx), now),
                    2 => r.receive(host, &Message::Leave { group: g }, now),
                    3 => r.receive(host, &rec(RecordType::ToIn), now),
                    _ => {}
                }
                match kind {
                    0 | 1 => { model.insert(g, joined); }
                    2 | 3 => if let Some(end) = model.get_mut(&g) { *end = (*end).min(left); },
                    _ => {}
                }
                for n in 0..4 {
                    let g = group(n);
                    prop_assert_eq!(r.forwards(g, None), model.contains_key(&g), "group {} at {:?}", g, now);
                }
            }
        }
    }

    // Filter modes, source-specific groups and the groups kept, for both families.

    /// A group, two sources and a host of `family`; `ssm` picks a source-specific group.
    fn addrs(family: Family, ssm: bool) -> (IpAddr, IpAddr, IpAddr, IpAddr) {
        match family {
            Family::V4 => (
                if ssm {
                    Ipv4Addr::new(232, 1, 1, 1).into()
                } else {
                    G
                },
                s(1),
                s(2),
                HOST,
            ),
            Family::V6 => (
                if ssm {
                    Ipv6Addr::new(0xff3e, 0, 0, 0, 0, 0, 1, 1).into()
                } else {
                    Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 1, 1).into()
                },
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2).into(),
                Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x100).into(),
            ),
        }
    }

    fn router(family: Family) -> Router {
        let own = match family {
            Family::V4 => OWN,
            Family::V6 => Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 5).into(),
        };
        let mut r = Router::new(family, own, Timers::default(), T0);
        r.handle_timeout(T0);
        while r.poll_transmit().is_some() {}
        r
    }

    fn report(group: IpAddr, kind: RecordType, sources: &[IpAddr]) -> Message {
        Message::Report {
            records: vec![Record {
                kind,
                group,
                sources: sources.to_vec(),
            }],
        }
    }

    #[test]
    fn include_of_another_source_wants_that_source_only() {
        for family in [Family::V4, Family::V6] {
            let (g, s1, s2, host) = addrs(family, false);
            let mut r = router(family);
            r.receive(host, &report(g, IsIn, &[s2]), T0);
            assert_eq!(r.filter(g), Some((Include, vec![s2])), "{family:?}");
            assert!(!r.forwards(g, Some(s1)) && r.forwards(g, Some(s2)));
            // Its timer runs out: nobody is left.
            r.handle_timeout(T0 + ms(GMI));
            assert_eq!(r.filter(g), None, "{family:?}");
        }
    }

    #[test]
    fn exclude_of_a_source_blocks_it_and_wants_the_others() {
        for family in [Family::V4, Family::V6] {
            let (g, s1, s2, host) = addrs(family, false);
            let mut r = router(family);
            r.receive(host, &report(g, IsEx, &[s1]), T0);
            assert_eq!(r.filter(g), Some((Exclude, vec![s1])), "{family:?}");
            assert!(!r.forwards(g, Some(s1)) && r.forwards(g, Some(s2)));
            // A second host wants every source: the exclude list is gone.
            r.receive(host, &report(g, IsEx, &[]), T0 + ms(10));
            assert_eq!(r.filter(g), Some((Exclude, vec![])), "{family:?}");
        }
    }

    #[test]
    fn ssm_groups_take_source_specific_records_only_and_count_the_rest() {
        for family in [Family::V4, Family::V6] {
            let (g, s1, s2, host) = addrs(family, true);
            let mut r = router(family);
            let mut t = T0;
            let old: &[Message] = match family {
                Family::V4 => &[
                    Message::V1Report { group: g },
                    Message::V2Report { group: g },
                    Message::Leave { group: g },
                ],
                Family::V6 => &[Message::V2Report { group: g }, Message::Leave { group: g }],
            };
            for m in old {
                r.receive(host, m, t);
                t += ms(1);
            }
            for kind in [IsEx, ToEx] {
                r.receive(host, &report(g, kind, &[]), t);
                r.receive(host, &report(g, kind, &[s2]), t);
            }
            assert_eq!(r.filter(g), None, "{family:?}: nothing joined");
            assert!(r.poll_transmit().is_none(), "{family:?}: nothing queried");
            assert_eq!(
                r.ignored(),
                Ignored {
                    ssm_old_version: old.len() as u64,
                    ssm_exclude: 4,
                    not_forwarded: 0
                },
                "{family:?}"
            );
            // The source-specific join works, for its source only.
            r.receive(host, &report(g, IsIn, &[s1]), t);
            assert_eq!(r.filter(g), Some((Include, vec![s1])), "{family:?}");
            assert!(r.forwards(g, Some(s1)) && !r.forwards(g, Some(s2)));
            // An old-version report does not turn it into EXCLUDE({}) either.
            r.receive(host, &Message::V2Report { group: g }, t);
            assert_eq!(r.filter(g), Some((Include, vec![s1])), "{family:?}");
            // The same reports for an ordinary group are taken.
            let (asm, ..) = addrs(family, false);
            r.receive(host, &Message::V2Report { group: asm }, t);
            assert_eq!(r.filter(asm), Some((Exclude, vec![])), "{family:?}");
            assert_eq!(r.ignored().ssm_old_version, old.len() as u64 + 1);
        }
    }

    #[test]
    fn the_ssm_ranges() {
        for (a, ssm) in [
            ("231.255.255.255", false),
            ("232.0.0.0", true),
            ("232.255.255.255", true),
            ("233.0.0.0", false),
            ("239.1.1.1", false),
            ("ff30::", true),
            ("ff3e::1:1", true),
            ("ff32::8000:1", true),
            ("ff3e:1::1", false),
            ("ff2e::1", false),
            ("ff1e::1", false),
            ("ff0e::1", false),
        ] {
            assert_eq!(is_ssm(a.parse().unwrap()), ssm, "{a}");
        }
    }

    /// `n` groups of `family` that are not `g`, spread over the space.
    fn other_groups(family: Family, g: IpAddr, n: u32) -> Vec<IpAddr> {
        (0..n)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761);
                match family {
                    Family::V4 => IpAddr::V4(Ipv4Addr::from(0xe000_0000 | (x & 0x0fff_ffff))),
                    Family::V6 => IpAddr::V6(Ipv6Addr::new(
                        0xff1e,
                        0,
                        0,
                        0,
                        0,
                        0,
                        (x >> 16) as u16,
                        x as u16,
                    )),
                }
            })
            .filter(|o| *o != g)
            .collect()
    }

    #[test]
    fn a_flood_of_other_groups_keeps_no_state_and_leaves_room_for_ours() {
        for family in [Family::V4, Family::V6] {
            let (g, _, _, host) = addrs(family, false);
            let mut r = router(family);
            r.set_forwardable(Some([g].into()));
            let flood = other_groups(family, g, 10_000);
            let mut t = T0;
            for (i, o) in flood.iter().enumerate() {
                let m = if i % 2 == 0 {
                    report(*o, IsEx, &[])
                } else {
                    Message::V2Report { group: *o }
                };
                r.receive(host, &m, t);
                t += Duration::from_micros(100);
            }
            assert_eq!(r.group_count(), 0, "{family:?}");
            assert_eq!(r.dropped_over_limit(), 0, "{family:?}");
            assert_eq!(r.ignored().not_forwarded, flood.len() as u64, "{family:?}");
            assert!(r.deadlines.is_empty(), "{family:?}: no timers for them");
            r.receive(host, &report(g, IsEx, &[]), t);
            assert_eq!(r.filter(g), Some((Exclude, vec![])), "{family:?}");
            assert_eq!(r.poll_event(), Some(Event::Changed { group: g }));
        }
    }

    #[test]
    fn without_a_forwardable_set_a_flood_fills_the_table() {
        // What the set is for: a bare router keeps every group, up to its bound.
        let (g, _, _, host) = addrs(Family::V4, false);
        let mut r = router(Family::V4);
        for o in other_groups(Family::V4, g, 10_000) {
            r.receive(host, &Message::V2Report { group: o }, T0);
        }
        assert_eq!(r.group_count(), MAX_GROUPS);
        r.receive(host, &report(g, IsEx, &[]), T0);
        assert_eq!(r.filter(g), None);
    }

    #[test]
    fn a_new_forwardable_set_drops_the_state_of_groups_left_out() {
        for family in [Family::V4, Family::V6] {
            let (g, s1, _, host) = addrs(family, false);
            let (other, ..) = addrs(family, true);
            let mut r = router(family);
            r.receive(host, &report(g, IsEx, &[]), T0);
            r.receive(host, &report(other, IsIn, &[s1]), T0);
            while r.poll_event().is_some() {}
            r.set_forwardable(Some([g].into()));
            assert_eq!(r.poll_event(), Some(Event::Changed { group: other }));
            assert_eq!(r.filter(other), None, "{family:?}");
            assert_eq!(r.filter(g), Some((Exclude, vec![])), "{family:?}");
            // Its timers went with it: only the kept group's are left.
            assert_eq!(r.deadlines.iter().map(|(_, a)| *a).collect::<Vec<_>>(), [g]);
            // Reports for it are ignored now; the kept group still joins.
            r.receive(host, &report(other, IsIn, &[s1]), T0 + ms(GMI));
            assert_eq!((r.filter(other), r.ignored().not_forwarded), (None, 1));
        }
    }
}
