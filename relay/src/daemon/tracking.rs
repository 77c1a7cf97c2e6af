//! The next hops of unicast outputs and the listeners of on-demand outputs: which the
//! neighbour tracker and the querier follow, and the slots the rules read them through.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use log::warn;

use crate::{
    neighbours::Neighbours,
    ondemand::{ListenKey, ListenSlot},
    querier::Querier,
    rules::RuleTable,
    sys::LiveSystem,
};

/// Gives `table`'s unicast outputs their next-hop slots, starting the neighbour tracker at the
/// first one. The tracker follows those targets and `also` (what another table still in use
/// sends to), and nothing else: a target followed before keeps its slot, and so its MAC.
pub(super) fn track_next_hops(
    neighbours: &mut Option<Neighbours>,
    table: &mut RuleTable,
    also: &[(u32, std::net::IpAddr)],
) -> Result<()> {
    let targets = table.unicast_targets();
    if targets.is_empty() && also.is_empty() && neighbours.is_none() {
        return Ok(());
    }
    let tracker = match neighbours {
        Some(n) => n,
        None => neighbours.insert(
            Neighbours::start().context("starting the neighbour tracker for unicast outputs")?,
        ),
    };
    let mut all = targets.clone();
    all.extend_from_slice(also);
    let mut slots = tracker.track(&all);
    slots.truncate(targets.len());
    table.set_next_hops(slots);
    Ok(())
}

/// Gives `table`'s on-demand outputs their listener slots. The querier follows those and
/// `also` (what another table still in use sends to), and nothing else: an output followed
/// before keeps its slot and state.
pub(super) fn track_listeners(
    querier: &Querier,
    table: &mut RuleTable,
    also: &[ListenKey],
) -> Result<()> {
    let targets = table.listen_targets();
    let mut all = targets.clone();
    all.extend_from_slice(also);
    let mut slots = listener_slots(querier, table, &all)?;
    slots.truncate(targets.len());
    table.set_listeners(slots);
    Ok(())
}

/// The querier's slots for `keys`, which it follows from now on (and nothing else); a new
/// interface among them is named from `table`.
pub(super) fn listener_slots(
    querier: &Querier,
    table: &RuleTable,
    keys: &[ListenKey],
) -> Result<Vec<Arc<ListenSlot>>> {
    let name_of = |ifindex: u32| {
        table
            .egress
            .iter()
            .find(|e| e.info.ifindex == ifindex)
            .map(|e| e.name.clone())
    };
    querier
        .track(keys, &LiveSystem, &name_of)
        .context("starting the IGMP/MLD querier for on-demand outputs")
}

/// Waits, at most `limit`, for the next hops of the unicast outputs to resolve before the
/// relay starts steering: the first frames then go out rather than count as `no_neighbour`.
/// A next hop that does not answer in time only delays the start by `limit`.
pub(super) fn await_next_hops(neighbours: &Neighbours, limit: Duration) {
    let start = std::time::Instant::now();
    loop {
        let states = neighbours.describe();
        let waiting = states.iter().filter(|s| s.mac.is_none()).count();
        if waiting == 0 {
            return;
        }
        if start.elapsed() >= limit {
            warn!(
                "{waiting} of {} unicast next hops not resolved after {} ms; their frames count \
                 as no_neighbour until they are",
                states.len(),
                limit.as_millis()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
