//! Allmulticast mode on the ingress interfaces that receive group ranges.
//!
//! An exact group is joined through an ordinary socket ([`crate::membership`]), which makes
//! the NIC's multicast filter pass it and tells snooping switches to forward it. A range
//! (`239.10.0.0/16`) cannot be joined group by group, so while a rule with a range receives on
//! an interface, the relay puts that interface into allmulticast mode (IFF_ALLMULTI): the
//! NIC then passes every multicast frame. Switches still see no join for the range, which is
//! why the relay says once per interface that they must flood it or have it joined
//! statically.
//!
//! The relay turns the flag on only where it was off, and turns off only what it turned on: an
//! operator's own allmulticast stays. What it turned on is written, before it is turned on, to
//! a state file beside the control socket (`<control>.allmulti`), and taken out again once
//! turned off, so that the next start can clean up after a relay that was killed (SIGKILL, a
//! crash) before it could.
//!
//! The flag is read and changed over rtnetlink (RTM_GETLINK, RTM_SETLINK with IFF_ALLMULTI in
//! the change mask) rather than with SIOCGIFFLAGS/SIOCSIFFLAGS: the ioctl can only write every
//! flag at once, so a read-modify-write would race with anyone bringing the link up or down
//! in between, while the change mask makes the kernel flip this one bit under its own lock. The
//! link is also named by ifindex, so a device re-created under the same name is never taken
//! for the one the relay changed.
//!
//! The kernel reports (and changes) the flag the way `ip link set allmulticast` sees it: the
//! user-set bit, not allmulticast that a driver or the kernel's multicast routing holds
//! internally (a counter), so those are neither mistaken for an operator's setting nor undone.
//!
//! What to do is decided by pure functions ([`needed`], [`plan`], [`recovery`], [`parse`],
//! [`render`]), tested without root; [`AllMulti`] carries it out.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use log::{info, warn};
use netlink_packet_core::NLM_F_ACK;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkFlags, LinkMessage},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use crate::{prefix::Prefix, rules::RuleTable};

/// One device: its name and its ifindex. Both identify it: a device deleted and created again
/// under the same name has a new ifindex and none of the old one's flags.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Iface {
    pub name: String,
    pub ifindex: u32,
}

impl Iface {
    pub fn new(name: &str, ifindex: u32) -> Self {
        Iface {
            name: name.to_owned(),
            ifindex,
        }
    }
}

/// The state file for the control socket at `control`: `<control>.allmulti`.
pub fn state_path(control: &Path) -> PathBuf {
    let mut s = control.as_os_str().to_owned();
    s.push(".allmulti");
    PathBuf::from(s)
}

/// The ingress interfaces that need allmulticast under `table`, each with the group ranges it
/// receives, by name. An interface that does not exist yet (ifindex 0) needs nothing until it
/// does: the table is applied again when it appears.
pub fn needed(table: &RuleTable) -> Vec<(Iface, Vec<Prefix>)> {
    let mut out: Vec<(Iface, Vec<Prefix>)> = Vec::new();
    for r in table
        .rules
        .iter()
        .filter(|r| r.ingress_ifindex != 0 && !r.unicast && !r.prefix.is_host())
    {
        let Some(i) = table
            .ingress
            .iter()
            .find(|i| i.info.ifindex == r.ingress_ifindex)
        else {
            continue;
        };
        let iface = Iface::new(&i.name, r.ingress_ifindex);
        match out.iter_mut().find(|(n, _)| *n == iface) {
            Some((_, ranges)) if ranges.contains(&r.prefix) => {}
            Some((_, ranges)) => ranges.push(r.prefix),
            None => out.push((iface, vec![r.prefix])),
        }
    }
    out.sort();
    for (_, ranges) in &mut out {
        ranges.sort();
    }
    out
}

/// What a switch to a table that needs `needed` does, given the interfaces the relay turned
/// allmulticast on (`ours`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Needed and not the relay's doing yet: turned on if they are off (if on, the operator's
    /// allmulticast serves, and stays theirs).
    pub on: Vec<Iface>,
    /// The relay's and no longer needed: turned off.
    pub off: Vec<Iface>,
}

pub fn plan(needed: &[Iface], ours: &[Iface]) -> Plan {
    Plan {
        on: needed
            .iter()
            .filter(|n| !ours.contains(n))
            .cloned()
            .collect(),
        off: ours
            .iter()
            .filter(|o| !needed.contains(o))
            .cloned()
            .collect(),
    }
}

/// What the start does with one interface that the state file says a relay turned
/// allmulticast on, that relay having gone without turning it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Still on and not needed now: turned off.
    TurnOff,
    /// Still on and needed by the rules now: kept on, as the relay's own (turned off at exit).
    Keep,
    /// Off already (someone turned it off), or the device is gone or is another one now (its
    /// flag went with it): nothing to do.
    Nothing,
}

/// `now`: whether the recorded device (that name with that ifindex) has allmulticast on, or
/// `None` if no such device exists any more.
pub fn recovery(recorded: &Iface, needed: &[Iface], now: Option<bool>) -> Recovery {
    match now {
        Some(true) if needed.contains(recorded) => Recovery::Keep,
        Some(true) => Recovery::TurnOff,
        Some(false) | None => Recovery::Nothing,
    }
}

const HEADER: &str = "\
# relay: the interfaces this relay turned allmulticast on (for group ranges), one per line:
# name ifindex. A relay that starts and finds this file turns off those it does not need.
";

/// The state file's text for `ours`.
pub fn render(ours: &[Iface]) -> String {
    let mut s = HEADER.to_owned();
    for i in ours {
        s.push_str(&format!("{} {}\n", i.name, i.ifindex));
    }
    s
}

/// The interfaces a state file names, and the lines that do not parse (to be reported, not
/// acted on). Blank lines and `#` comments are skipped.
pub fn parse(text: &str) -> (Vec<Iface>, Vec<String>) {
    let (mut out, mut bad) = (Vec::new(), Vec::new());
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|w| w.parse::<u32>().ok()),
            words.next(),
        ) {
            (Some(name), Some(ifindex), None) if ifindex != 0 => {
                let i = Iface::new(name, ifindex);
                if !out.contains(&i) {
                    out.push(i);
                }
            }
            _ => bad.push(line.to_owned()),
        }
    }
    (out, bad)
}

/// Allmulticast as the relay manages it: what it turned on, written to the state file.
/// Dropping it turns off again what the relay turned on.
pub struct AllMulti {
    link: Link,
    state: PathBuf,
    /// The interfaces the relay turned allmulticast on, as written in the state file.
    ours: Vec<Iface>,
    /// Interfaces told about upstream switches, by name: said once per interface.
    told: BTreeSet<String>,
    /// Devices whose allmulticast was on already when a range first needed it: said once.
    theirs: BTreeSet<Iface>,
}

impl AllMulti {
    /// Cleans up after a relay that used the state file `state` (see [`state_path`]) and did
    /// not stop cleanly: what it turned on and `table` does not need is turned off (if still
    /// on), what `table` needs is kept on as this relay's own. The file is then rewritten to
    /// what is kept, or removed. Turns nothing on: [`AllMulti::turn_on`] does.
    ///
    /// Call this only once this relay holds the control socket, so that it is the only relay
    /// using `state`.
    pub fn recover(state: PathBuf, table: &RuleTable) -> Result<Self> {
        let mut me = AllMulti {
            link: Link::open()?,
            state,
            ours: Vec::new(),
            told: BTreeSet::new(),
            theirs: BTreeSet::new(),
        };
        let text = match std::fs::read_to_string(&me.state) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(me),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", me.state.display()));
            }
        };
        let (recorded, bad) = parse(&text);
        for line in bad {
            warn!(
                "{}: ignoring a line that names no interface: '{line}'",
                me.state.display()
            );
        }
        let needed: Vec<Iface> = needed(table).into_iter().map(|(i, _)| i).collect();
        for r in recorded {
            let now = match me.link.get(r.ifindex) {
                Ok(Some((name, on))) if name == r.name => Some(on),
                Ok(_) => None,
                Err(e) => {
                    // Kept in the file: the next look (a switch, the exit, the next start)
                    // tries again.
                    warn!("{}: reading its allmulticast flag: {e}", r.name);
                    me.ours.push(r);
                    continue;
                }
            };
            match recovery(&r, &needed, now) {
                Recovery::TurnOff => match me.link.set(r.ifindex, false) {
                    Ok(()) => warn!(
                        "{}: allmulticast left on by a relay that did not stop cleanly; turned off",
                        r.name
                    ),
                    Err(e) => {
                        warn!(
                            "{}: allmulticast left on by a relay that did not stop cleanly; \
                             turning it off failed, tried again later: {e}",
                            r.name
                        );
                        me.ours.push(r);
                    }
                },
                Recovery::Keep => {
                    info!(
                        "{}: allmulticast left on by a relay that did not stop cleanly; kept on, \
                         as a group range is received there",
                        r.name
                    );
                    me.ours.push(r);
                }
                Recovery::Nothing => {}
            }
        }
        me.save()?;
        Ok(me)
    }

    /// The interfaces the relay has allmulticast on.
    pub fn ours(&self) -> &[Iface] {
        &self.ours
    }

    /// Turns allmulticast on where `table` needs it and it is off, recording each in the state
    /// file first; all or nothing (what this call turned on is turned off again if one fails).
    /// Returns what it turned on, for [`AllMulti::undo`].
    pub fn turn_on(&mut self, table: &RuleTable) -> Result<Vec<Iface>> {
        let needed = needed(table);
        let names: Vec<Iface> = needed.iter().map(|(i, _)| i.clone()).collect();
        let mut to_turn = Vec::new();
        for i in plan(&names, &self.ours).on {
            let ranges = &needed.iter().find(|(n, _)| *n == i).expect("planned").1;
            let ranges = ranges
                .iter()
                .map(Prefix::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            if self.told.insert(i.name.clone()) {
                warn!(
                    "{}: group ranges are received here ({ranges}) in allmulticast mode, and no \
                     group of them is joined: upstream switches must flood these ranges to this \
                     port or have them joined statically (IGMP/MLD snooping sees no join for them)",
                    i.name
                );
            }
            match self.link.get(i.ifindex) {
                Ok(Some((_, true))) => {
                    if self.theirs.insert(i.clone()) {
                        info!(
                            "{}: allmulticast was on already, not by the relay: it stays on at exit",
                            i.name
                        );
                    }
                }
                Ok(Some((_, false))) => to_turn.push((i, ranges)),
                Ok(None) => anyhow::bail!(
                    "{}: turning allmulticast on: the interface (ifindex {}) is gone",
                    i.name,
                    i.ifindex
                ),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("{}: reading its allmulticast flag", i.name));
                }
            }
        }
        if to_turn.is_empty() {
            return Ok(Vec::new());
        }
        // Recorded before it is done: a relay killed in between leaves the next start an entry
        // to look at (it is off, so nothing is done), never a flag nobody knows about.
        let before = self.ours.len();
        self.ours.extend(to_turn.iter().map(|(i, _)| i.clone()));
        if let Err(e) = self.save() {
            self.ours.truncate(before);
            return Err(e);
        }
        let mut done = Vec::new();
        for (i, ranges) in to_turn {
            if let Err(e) = self.link.set(i.ifindex, true) {
                // Only the recorded entries not turned on yet are taken out here; `undo` takes
                // out the rest.
                self.ours.truncate(before + done.len());
                self.undo(&done, "the change failed");
                // `undo` saves only when it had something to undo.
                if let Err(e) = self.save() {
                    warn!("{e:#}");
                }
                return Err(e).with_context(|| format!("{}: turning allmulticast on", i.name));
            }
            info!("{}: allmulticast on, for {ranges}", i.name);
            done.push(i);
        }
        Ok(done)
    }

    /// Turns off what the relay turned on and `table` no longer needs.
    pub fn turn_off_unneeded(&mut self, table: &RuleTable) {
        let needed: Vec<Iface> = needed(table).into_iter().map(|(i, _)| i).collect();
        let off = plan(&needed, &self.ours).off;
        self.undo(&off, "no group range is received there any more");
        // A device whose flag the operator changed since (on again, now theirs) is looked at
        // afresh the next time a range needs it.
        self.theirs.retain(|t| needed.contains(t));
    }

    /// Turns these (the relay's) off again, saying `why`, and updates the state file.
    pub fn undo(&mut self, these: &[Iface], why: &str) {
        if these.is_empty() {
            return;
        }
        for i in these {
            if !self.ours.contains(i) {
                continue;
            }
            match self.turn_off(i) {
                Ok(true) => info!("{}: allmulticast off again ({why})", i.name),
                // Off already, or the device is gone: the relay's part is over either way.
                Ok(false) => {}
                Err(e) => {
                    // Stays recorded: tried again when next unneeded, at exit, or by the next
                    // start.
                    warn!("{}: turning allmulticast off again: {e}", i.name);
                    continue;
                }
            }
            self.ours.retain(|o| o != i);
        }
        if let Err(e) = self.save() {
            warn!("{e:#}");
        }
    }

    /// Turns off allmulticast on `i` if that device is still there with it on; whether it did.
    fn turn_off(&mut self, i: &Iface) -> io::Result<bool> {
        match self.link.get(i.ifindex)? {
            Some((name, true)) if name == i.name => {
                self.link.set(i.ifindex, false)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Writes the state file, or removes it when the relay has nothing on. Written whole to a
    /// temporary file and renamed over, so a relay killed mid-write leaves the old or the new
    /// list, never half of one.
    fn save(&self) -> Result<()> {
        if self.ours.is_empty() {
            return match std::fs::remove_file(&self.state) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", self.state.display()))
                }
                _ => Ok(()),
            };
        }
        let mut tmp = self.state.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, render(&self.ours))
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.state)
            .with_context(|| format!("replacing {}", self.state.display()))
    }
}

impl Drop for AllMulti {
    fn drop(&mut self) {
        let ours = self.ours.clone();
        self.undo(&ours, "the relay stops");
    }
}

/// How long a request waits for the kernel's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// An rtnetlink socket for reading and setting one link flag.
struct Link {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Link {
    fn open() -> Result<Self> {
        let mut socket =
            Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket for allmulticast")?;
        socket
            .bind_auto()
            .context("binding an rtnetlink socket for allmulticast")?;
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )
        .context("setting a receive timeout on an rtnetlink socket")?;
        Ok(Link {
            socket,
            seq: 0,
            buf: Vec::with_capacity(1 << 16),
        })
    }

    /// The name of the device with `ifindex` and whether allmulticast is on there (as set by
    /// a user: `ip link set allmulticast`, or the relay); `None` if there is no such device.
    fn get(&mut self, ifindex: u32) -> io::Result<Option<(String, bool)>> {
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(Some(RouteNetlinkMessage::NewLink(l))) => {
                let name = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                });
                Ok(Some((
                    name.unwrap_or_default(),
                    l.header.flags.contains(LinkFlags::Allmulti),
                )))
            }
            Ok(_) => Err(io::Error::other("the kernel answered RTM_GETLINK oddly")),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets or clears IFF_ALLMULTI on `ifindex`, and only that flag (the change mask).
    fn set(&mut self, ifindex: u32, on: bool) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        msg.header.change_mask = LinkFlags::Allmulti;
        if on {
            msg.header.flags = LinkFlags::Allmulti;
        }
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)
            .map(|_| ())
    }

    /// Sends `msg` and waits for its answer (see [`crate::rtnl::request`]).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Option<RouteNetlinkMessage>> {
        crate::rtnl::request(
            &self.socket,
            &mut self.seq,
            &mut self.buf,
            msg,
            flags,
            ANSWER_TIMEOUT,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, tests::fake};

    fn table(yaml: &str) -> RuleTable {
        let c = Config::parse("t", yaml).unwrap();
        RuleTable::compile(&c, "t", &fake()).unwrap()
    }

    fn i(name: &str, ifindex: u32) -> Iface {
        Iface::new(name, ifindex)
    }

    #[test]
    fn only_existing_ingresses_with_a_range_need_it() {
        let t = table(
            "rules:
  - name: exact
    input: {interface: out0, group: 239.1.1.1, port: 5000}
    outputs: [{interface: out1}]
  - name: range-a
    input: {interface: in0, group: 239.10.0.0/16, port: 5000}
    outputs: [{interface: out0}]
  - name: range-b
    input: {interface: in0, group: 239.10.0.0/16, port: 5001}
    outputs: [{interface: out0}]
  - name: range-c
    input: {interface: in0, group: 239.20.0.0/24, port: 5002}
    outputs: [{interface: out0}]
  - name: later
    input: {interface: notyet0, group: 239.30.0.0/16, port: 5000}
    outputs: [{interface: out0}]
",
        );
        let n = needed(&t);
        let ranges = |s: &[&str]| s.iter().map(|p| p.parse().unwrap()).collect::<Vec<_>>();
        // in0 is ifindex 10 in the fake system; out0 receives an exact group only, and
        // notyet0 does not exist (ifindex 0) until the watch applies the table again.
        assert_eq!(
            n,
            [(i("in0", 10), ranges(&["239.10.0.0/16", "239.20.0.0/24"]))]
        );
    }

    #[test]
    fn exact_groups_and_unicast_inputs_need_nothing() {
        let t = table(
            "rules:
  - name: a
    input: {interface: in0, group: 239.1.1.1, port: 5000, source: 198.18.0.0/16}
    outputs: [{interface: out0}]
  - name: u
    input: {interface: in0, destination: 198.18.1.2, port: 7100}
    outputs: [{interface: out0, group: 239.9.9.9}]
",
        );
        assert_eq!(needed(&t), []);
    }

    #[test]
    fn plan_turns_on_the_new_and_off_the_relays_unneeded() {
        let p = plan(&[i("a", 1), i("b", 2)], &[i("b", 2), i("c", 3)]);
        assert_eq!(
            p,
            Plan {
                on: vec![i("a", 1)],
                off: vec![i("c", 3)],
            }
        );
        // A device re-created under the same name is another device: the new one is turned
        // on, the old one's entry is let go.
        let p = plan(&[i("a", 7)], &[i("a", 1)]);
        assert_eq!(
            p,
            Plan {
                on: vec![i("a", 7)],
                off: vec![i("a", 1)],
            }
        );
        assert_eq!(plan(&[], &[]), Plan::default());
    }

    #[test]
    fn recovery_turns_off_only_what_is_still_on_and_unneeded() {
        let needed = [i("a", 1)];
        assert_eq!(recovery(&i("b", 2), &needed, Some(true)), Recovery::TurnOff);
        assert_eq!(recovery(&i("a", 1), &needed, Some(true)), Recovery::Keep);
        // Off already: someone else turned it off; nothing of the relay's is left.
        assert_eq!(
            recovery(&i("b", 2), &needed, Some(false)),
            Recovery::Nothing
        );
        assert_eq!(
            recovery(&i("a", 1), &needed, Some(false)),
            Recovery::Nothing
        );
        // Gone, or another device now: its flag went with the old one.
        assert_eq!(recovery(&i("b", 2), &needed, None), Recovery::Nothing);
        // Needed under the same name, but the recorded device is not that one.
        assert_eq!(recovery(&i("a", 9), &needed, Some(true)), Recovery::TurnOff);
    }

    #[test]
    fn state_file_round_trips_and_skips_what_does_not_parse() {
        let ours = [i("rin", 5), i("eth0.100", 12)];
        let text = render(&ours);
        assert!(text.starts_with("# relay: "), "{text}");
        assert!(text.ends_with("rin 5\neth0.100 12\n"), "{text}");
        assert_eq!(parse(&text), (ours.to_vec(), vec![]));
        let (got, bad) = parse("rin 5\n\n  # note\nrin 5\nx\ny 0\nz 3 extra\nw -1\nq 7\n");
        assert_eq!(got, [i("rin", 5), i("q", 7)]);
        assert_eq!(bad, ["x", "y 0", "z 3 extra", "w -1"]);
        assert_eq!(parse(&render(&[])), (vec![], vec![]));
    }

    #[test]
    fn state_file_sits_beside_the_control_socket() {
        assert_eq!(
            state_path(Path::new("/run/relay/relay.sock")),
            Path::new("/run/relay/relay.sock.allmulti")
        );
    }
}
