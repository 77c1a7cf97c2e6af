//! What a running relay owns, and how it follows the interfaces its rules name as they are
//! deleted, re-created and readdressed under it.

use std::{path::PathBuf, sync::Arc};

use anyhow::Result;
use log::{error, info, warn};

use crate::{
    allmulti::AllMulti, config::Config, datapath::Datapath, loader::Steering,
    membership::Memberships, neighbours::Neighbours, querier::Querier, rules::RuleTable,
};

/// The running relay's parts that a reload changes.
pub(super) struct Running {
    pub(super) config_path: PathBuf,
    pub(super) config: Config,
    pub(super) steering: Steering,
    pub(super) datapath: Datapath,
    pub(super) memberships: Memberships,
    /// Allmulticast on the ingresses that receive group ranges.
    pub(super) allmulti: AllMulti,
    /// Follows the next hops of unicast outputs; started with the first such output.
    pub(super) neighbours: Option<Neighbours>,
    /// The IGMP/MLD querier of on-demand outputs (idle while there are none).
    pub(super) querier: Arc<Querier>,
    /// Interfaces of the running rules that do not exist right now.
    pub(super) gone: Vec<String>,
    /// Why binding to a re-created interface failed last time, so it is logged once.
    pub(super) bind_error: Option<String>,
}

impl Running {
    /// Notices interfaces of the running rules that were deleted, and binds to them again
    /// when an interface of the same name reappears: its sockets and XDP program belonged to
    /// the old device, so the running rules are applied again, which opens sockets on the new
    /// one, attaches the program to a new ingress and joins its groups. Rules on other
    /// interfaces keep flowing throughout.
    pub(super) fn watch_interfaces(&mut self) {
        // Names and ifindexes only: the table itself (perhaps thousands of rules) is not
        // copied twice a second.
        let known: Vec<(String, u32, bool)> = self.datapath.with_table(|t| {
            t.ingress
                .iter()
                .map(|i| (i.name.clone(), i.info.ifindex, true))
                .chain(
                    t.egress
                        .iter()
                        .map(|e| (e.name.clone(), e.info.ifindex, false)),
                )
                .collect()
        });
        let mut replaced = Vec::new();
        for (name, ifindex, ingress) in known {
            match crate::sys::ifindex(&name) {
                // Never seen: said at start, and nothing to close.
                None if ifindex == 0 => {}
                None if !self.gone.contains(&name) => {
                    warn!(
                        "{name}: the interface is gone; {} until an interface of that name is back",
                        if ingress {
                            "its rules receive nothing"
                        } else {
                            "its outputs' frames are dropped (interface_down)"
                        }
                    );
                    self.gone.push(name);
                }
                Some(now) if now != ifindex => replaced.push((name, ingress, ifindex == 0)),
                _ => {}
            }
        }
        if let Err(e) = self.retire_gone() {
            error!("closing the sockets of interfaces that went away: {e:#}");
        }
        let readdressed = self.datapath.with_table(readdressed);
        if replaced.is_empty() && readdressed.is_empty() {
            return;
        }
        for name in &readdressed {
            info!("{name}: its addresses changed; the outputs with `source: auto` follow");
        }
        for (name, ingress, new) in &replaced {
            self.gone.retain(|g| g != name);
            if *new {
                info!("{name}: the interface has appeared; binding to it");
            } else {
                info!("{name}: the interface is back (a new device); binding to it");
            }
            if *ingress && let Err(e) = self.steering.detach_iface(name) {
                // The kernel took the old link away with the old device.
                info!("{name}: the old XDP link is already gone ({e:#})");
            }
        }
        match self.apply_running() {
            Ok(summary) => {
                self.bind_error = None;
                if replaced.is_empty() {
                    info!("source addresses followed: {summary}");
                } else {
                    info!("rebound: {summary}");
                }
            }
            // Tried again at the next look; said again only if the reason changes.
            Err(e) => {
                let e = format!("{e:#}");
                if self.bind_error.as_ref() != Some(&e) {
                    error!(
                        "binding to the new interface failed; the running rules stay, and it is \
                         tried again every 0.5 s: {e}"
                    );
                    self.bind_error = Some(e);
                }
            }
        }
    }

    /// Closes the sockets of devices that no longer exist, with their frames taken back, and
    /// makes the XDP program forget them.
    pub(super) fn retire_gone(&mut self) -> Result<()> {
        let retired = self.datapath.retire_gone()?;
        for r in &retired {
            if r.ingress {
                self.steering.release_iface(r.ifindex)?;
            }
        }
        if self.datapath.is_orphaned() {
            warn!(
                "every interface the relay had sockets on is gone: starting over on a new UMEM, \
                 the rules idle until their interfaces are back"
            );
            let account = self.datapath.rebuild()?;
            info!(
                "the old UMEM: {} frames, {} back in the pool, {} lost with devices, {} leaked",
                account.frames,
                account.in_pool + account.in_fill + account.in_tx,
                account.abandoned,
                account.leaked()
            );
        }
        Ok(())
    }
}

/// Egress interfaces whose address `source: auto` stands for is no longer the one `table`
/// writes.
fn readdressed(table: &RuleTable) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    // Each interface's addresses read once per look, however many outputs it has.
    let mut addresses = std::collections::HashMap::new();
    for rule in &table.rules {
        for o in &rule.outputs {
            let egress = &table.egress[o.egress];
            if o.action.source_spec != Some(crate::config::SourceSpec::Auto)
                || !egress.info.exists()
                || out.contains(&egress.name)
            {
                continue;
            }
            let has = addresses
                .entry(egress.name.as_str())
                .or_insert_with(|| crate::sys::interface_addresses(&egress.name));
            let now = crate::config::auto_source(has, rule.group.is_ipv4());
            if now != o.action.source {
                out.push(egress.name.clone());
            }
        }
    }
    out
}
