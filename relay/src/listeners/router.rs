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

impl Compat {
    /// Whether the group is in an older mode, where BLOCK records and the source lists of
    /// TO_EX records are ignored.
    fn is_old(self) -> bool {
        matches!(self, Compat::IgmpV1 | Compat::IgmpV2 | Compat::MldV1)
    }
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
            if self.group_query.is_some_and(|(_, at)| at <= t) {
                if cx.querier && self.mode == FilterMode::Exclude {
                    self.send_group_query(cx);
                } else {
                    self.group_query = None;
                }
            }
            if due(self.source_query) {
                if cx.querier {
                    self.send_source_queries(cx);
                } else {
                    self.source_query = None;
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
        }
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

    pub fn receive(&mut self, from: IpAddr, msg: &Message, now: Time) {
        // Timers that ran out before this message acted first.
        self.handle_timeout(now);
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
        if Family::of(from) != self.family || from == self.own {
            return;
        }
        // A querier without an address (a Linux bridge's, by default, queries from 0.0.0.0)
        // cannot take part in an election by lowest address.
        if !from.is_unspecified() {
            let lowest = self.other.is_none_or(|(a, _)| from <= a);
            if lowest {
                if from < self.own {
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

    /// The lowest address is querier (RFC 3376 §6.6.2, RFC 3810 §7.6.2).
    fn elect(&mut self, now: Time) {
        let win = !matches!(self.other, Some((a, _)) if a < self.own);
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
