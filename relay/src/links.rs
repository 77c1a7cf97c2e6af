//! The state of the interfaces the data path's sockets are bound to (MTU, up or down, still
//! there), kept current from the kernel's link notifications (RTM_NEWLINK / RTM_DELLINK) by one
//! thread, so that workers read a few atomics instead of sysfs files: three file reads per port
//! ten times a second was about 6,000 system calls a second on the data path with 64 outputs.
//!
//! A slot is made for a device (an ifindex, which a re-created interface never reuses while
//! the old one is referred to) when its first socket is opened, filled from sysfs then, and
//! from the notifications after. The thread subscribes before any slot exists, so no change
//! after a slot's first reading is missed; a notification that overtook that reading wins
//! (it is at least as new), and one that is lost to a receive-buffer overrun makes the thread
//! read every slot's device again.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use log::{debug, warn};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, State},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use nix::sys::{socket::setsockopt, socket::sockopt, time::TimeVal};

/// One device's state, as the workers read it.
#[derive(Debug)]
pub struct LinkSlot {
    ifindex: u32,
    mtu: AtomicU32,
    up: AtomicBool,
    present: AtomicBool,
    /// A notification has been applied: the first reading (older or as old) must not overwrite
    /// it.
    notified: AtomicBool,
}

impl LinkSlot {
    fn new(ifindex: u32) -> Self {
        LinkSlot {
            ifindex,
            mtu: AtomicU32::new(0),
            up: AtomicBool::new(false),
            present: AtomicBool::new(true),
            notified: AtomicBool::new(false),
        }
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The device's MTU: the largest IP packet it sends (0 before anything was read).
    pub fn mtu(&self) -> u32 {
        self.mtu.load(Ordering::Relaxed)
    }

    /// Operationally up (or "unknown", which devices without carrier detection report), as
    /// `/sys/class/net/*/operstate` says.
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The device still exists (deleted devices never come back under the same ifindex).
    pub fn present(&self) -> bool {
        self.present.load(Ordering::Relaxed)
    }

    fn store(&self, state: LinkState) {
        if let Some(mtu) = state.mtu {
            self.mtu.store(mtu, Ordering::Relaxed);
        }
        self.up.store(state.up, Ordering::Relaxed);
        self.present.store(state.present, Ordering::Relaxed);
    }
}

/// What one notification (or reading) says of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    pub ifindex: u32,
    /// `None` when the message does not carry it (a deletion).
    pub mtu: Option<u32>,
    pub up: bool,
    pub present: bool,
}

/// A link notification as the slots take it: `None` for messages that are not about links.
pub fn link_state(msg: &RouteNetlinkMessage) -> Option<LinkState> {
    match msg {
        RouteNetlinkMessage::NewLink(l) => Some(of_new_link(l)),
        RouteNetlinkMessage::DelLink(l) => Some(LinkState {
            ifindex: l.header.index,
            mtu: None,
            up: false,
            present: false,
        }),
        _ => None,
    }
}

fn of_new_link(l: &LinkMessage) -> LinkState {
    let mut mtu = None;
    let mut oper = None;
    for a in &l.attributes {
        match a {
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            LinkAttribute::OperState(s) => oper = Some(*s),
            _ => {}
        }
    }
    LinkState {
        ifindex: l.header.index,
        mtu,
        // The kernel always sends IFLA_OPERSTATE; a message without it says nothing of the
        // state, and "unknown" is what a device without carrier detection reports.
        up: matches!(oper, None | Some(State::Up) | Some(State::Unknown)),
        present: true,
    }
}

/// The slots, by ifindex; the thread holds them weakly, so a retired socket's slot goes with it.
#[derive(Default)]
struct Table {
    slots: HashMap<u32, Weak<LinkSlot>>,
}

impl Table {
    /// Applies a notification to the device's slot, if one is watched.
    fn apply(&mut self, state: LinkState) {
        let Some(slot) = self.slots.get(&state.ifindex).and_then(Weak::upgrade) else {
            return;
        };
        slot.notified.store(true, Ordering::Relaxed);
        slot.store(state);
    }

    fn live(&mut self) -> Vec<Arc<LinkSlot>> {
        self.slots.retain(|_, w| w.strong_count() > 0);
        self.slots.values().filter_map(Weak::upgrade).collect()
    }
}

/// The process's link watcher: one thread, started by the first slot asked for.
struct Watcher {
    table: Mutex<Table>,
}

static WATCHER: OnceLock<std::result::Result<Arc<Watcher>, String>> = OnceLock::new();

/// How long the thread waits for a notification before it looks again (nothing else wakes it).
const TICK: Duration = Duration::from_secs(1);
/// Room for a burst of notifications (hundreds of interfaces created at once).
const RCVBUF: usize = 1 << 20;

/// The slot of device `ifindex` (named `name` now), read from sysfs and followed from here on.
pub fn watch(ifindex: u32, name: &str) -> Result<Arc<LinkSlot>> {
    let watcher = WATCHER
        .get_or_init(|| start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("watching interface state: {e}"))?;
    let slot = {
        let mut table = watcher.table.lock().unwrap_or_else(PoisonError::into_inner);
        let existing = table.slots.get(&ifindex).and_then(Weak::upgrade);
        match existing {
            Some(s) => return Ok(s),
            None => {
                let s = Arc::new(LinkSlot::new(ifindex));
                table.slots.insert(ifindex, Arc::downgrade(&s));
                s
            }
        }
    };
    read_sysfs(&slot, name);
    Ok(slot)
}

/// The first reading, unless a notification got there first.
fn read_sysfs(slot: &LinkSlot, name: &str) {
    let state = LinkState {
        ifindex: slot.ifindex,
        mtu: crate::sys::mtu(name),
        up: crate::sys::link_up(name),
        // Gone already, or the name is another device's now.
        present: crate::sys::ifindex(name) == Some(slot.ifindex),
    };
    if !slot.notified.load(Ordering::Relaxed) {
        slot.store(LinkState {
            mtu: state.mtu.or(Some(1500)),
            ..state
        });
    }
}

fn start() -> Result<Arc<Watcher>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
    socket.bind_auto().context("binding an rtnetlink socket")?;
    socket
        .set_rx_buf_sz(RCVBUF)
        .context("sizing an rtnetlink socket")?;
    socket
        .add_membership(libc::RTNLGRP_LINK)
        .context("joining the rtnetlink link group")?;
    setsockopt(
        &socket,
        sockopt::ReceiveTimeout,
        &TimeVal::from(libc::timeval {
            tv_sec: TICK.as_secs() as libc::time_t,
            tv_usec: 0,
        }),
    )
    .context("setting a receive timeout on an rtnetlink socket")?;
    let watcher = Arc::new(Watcher {
        table: Mutex::new(Table::default()),
    });
    let w = watcher.clone();
    std::thread::Builder::new()
        .name("relay-links".into())
        .spawn(move || run(&socket, &w))
        .context("spawning the link watcher thread")?;
    Ok(watcher)
}

/// Runs for the life of the process.
fn run(socket: &Socket, watcher: &Watcher) {
    let mut buf = Vec::with_capacity(1 << 16);
    loop {
        buf.clear();
        match socket.recv(&mut buf, libc::MSG_TRUNC) {
            Ok(n) if n > buf.capacity() => {
                warn!(
                    "a link notification of {n} bytes was truncated; reading every interface again"
                );
                resync(watcher);
            }
            Ok(_) => {
                let mut table = watcher.table.lock().unwrap_or_else(PoisonError::into_inner);
                for msg in crate::rtnl::messages(&buf) {
                    if let NetlinkPayload::InnerMessage(m) = msg.payload
                        && let Some(state) = link_state(&m)
                    {
                        debug!("link {state:?}");
                        table.apply(state);
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                warn!("link notifications overran; reading every interface again");
                resync(watcher);
            }
            Err(e) if crate::rtnl::transient(&e) => {}
            Err(e) => {
                warn!("reading link notifications: {e}");
                std::thread::sleep(TICK);
            }
        }
    }
}

/// After lost notifications: every watched device read again, by its index's current name.
fn resync(watcher: &Watcher) {
    let slots = watcher
        .table
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .live();
    for slot in slots {
        let name = crate::sys::ifindex_name(slot.ifindex);
        let state = match name {
            Some(name) => LinkState {
                ifindex: slot.ifindex,
                mtu: crate::sys::mtu(&name),
                up: crate::sys::link_up(&name),
                present: true,
            },
            None => LinkState {
                ifindex: slot.ifindex,
                mtu: None,
                up: false,
                present: false,
            },
        };
        slot.store(state);
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::link::LinkMessage;

    use super::*;

    fn new_link(ifindex: u32, mtu: Option<u32>, oper: Option<State>) -> RouteNetlinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = ifindex;
        l.attributes.extend(mtu.map(LinkAttribute::Mtu));
        l.attributes.extend(oper.map(LinkAttribute::OperState));
        RouteNetlinkMessage::NewLink(l)
    }

    fn del_link(ifindex: u32) -> RouteNetlinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = ifindex;
        RouteNetlinkMessage::DelLink(l)
    }

    #[test]
    fn reads_mtu_and_operational_state() {
        let s = link_state(&new_link(7, Some(9000), Some(State::Up))).unwrap();
        assert_eq!(
            s,
            LinkState {
                ifindex: 7,
                mtu: Some(9000),
                up: true,
                present: true
            }
        );
        for (oper, up) in [
            (State::Down, false),
            (State::LowerLayerDown, false),
            (State::Dormant, false),
            (State::NotPresent, false),
            (State::Testing, false),
            (State::Unknown, true),
            (State::Up, true),
        ] {
            let s = link_state(&new_link(7, None, Some(oper))).unwrap();
            assert_eq!((s.up, s.mtu), (up, None), "{oper:?}");
        }
        assert_eq!(
            link_state(&del_link(7)),
            Some(LinkState {
                ifindex: 7,
                mtu: None,
                up: false,
                present: false
            })
        );
        assert_eq!(
            link_state(&RouteNetlinkMessage::NewRoute(Default::default())),
            None
        );
    }

    #[test]
    fn notifications_reach_only_watched_slots_and_win_over_the_first_reading() {
        let mut table = Table::default();
        let slot = Arc::new(LinkSlot::new(3));
        table.slots.insert(3, Arc::downgrade(&slot));
        table.apply(link_state(&new_link(4, Some(1400), Some(State::Up))).unwrap());
        assert_eq!((slot.mtu(), slot.up()), (0, false), "another device's news");
        table.apply(link_state(&new_link(3, Some(1400), Some(State::Down))).unwrap());
        assert_eq!((slot.mtu(), slot.up(), slot.present()), (1400, false, true));
        // A first reading taken before that notification no longer applies.
        read_sysfs(&slot, "relay-no-such-interface");
        assert_eq!((slot.mtu(), slot.up(), slot.present()), (1400, false, true));
        // A later notification keeps the MTU it does not carry.
        table.apply(link_state(&new_link(3, None, Some(State::Up))).unwrap());
        assert_eq!((slot.mtu(), slot.up()), (1400, true));
        table.apply(link_state(&del_link(3)).unwrap());
        assert_eq!(
            (slot.mtu(), slot.up(), slot.present()),
            (1400, false, false)
        );
    }

    #[test]
    fn a_first_reading_of_a_missing_device_says_gone() {
        let slot = LinkSlot::new(u32::MAX);
        read_sysfs(&slot, "relay-no-such-interface");
        assert_eq!(
            (slot.mtu(), slot.up(), slot.present()),
            (1500, false, false)
        );
    }

    #[test]
    fn dropped_slots_leave_the_table() {
        let mut table = Table::default();
        let kept = Arc::new(LinkSlot::new(1));
        table.slots.insert(1, Arc::downgrade(&kept));
        table
            .slots
            .insert(2, Arc::downgrade(&Arc::new(LinkSlot::new(2))));
        let live = table.live();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].ifindex(), 1);
        assert_eq!(table.slots.len(), 1);
    }
}
