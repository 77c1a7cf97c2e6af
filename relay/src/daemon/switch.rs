//! The switch from one rule table to the next, all or nothing, and the undo of a switch that
//! failed part way.

use anyhow::Result;
use log::{error, info, warn};

use super::running::Running;
use crate::{allmulti, rules::RuleTable};

/// What a change did before its switch, so that a failure can put it back.
#[derive(Default)]
struct Undo {
    /// XSKMAP entries that were empty.
    xsks: Vec<(u32, u32)>,
    attached: Vec<String>,
    joined: Vec<crate::membership::Membership>,
    /// Interfaces turned allmulticast on.
    allmulti: Vec<allmulti::Iface>,
}

impl Running {
    /// Moves every part of the relay from `old` to `new`, all or nothing. What can fail
    /// without touching traffic comes first (sockets, XSKMAP entries, allmulticast for new
    /// ranges, XDP on new inputs, joins: the rule map has no key for a new input yet, so its
    /// frames still pass); then the workers switch, then the rule map; only then are old
    /// inputs detached, old groups left and the allmulticast no range needs any more turned
    /// off. A failure at any step puts back what the steps before it did.
    pub(super) fn switch(
        &mut self,
        old: &RuleTable,
        new: &RuleTable,
        xdp_mode: crate::config::XdpModeConfig,
    ) -> Result<()> {
        let prepared = self.datapath.prepare(new)?;
        let mut undo = Undo::default();
        if let Err(e) = self.stage(new, xdp_mode, &prepared, &mut undo) {
            self.roll_back(undo);
            self.datapath.abort(prepared);
            return Err(e);
        }
        if let Err(e) = self.datapath.commit(prepared, new.clone()) {
            self.back_to(old, undo);
            return Err(e);
        }
        if let Err(e) = self.steering.update_rules(old, new) {
            if let Err(e2) = self.steering.update_rules(new, old) {
                error!("putting the old rules back into the rule map failed too: {e2:#}");
            }
            self.back_to(old, undo);
            return Err(e);
        }
        for a in self.steering.attached() {
            if !new.ingress.iter().any(|i| i.name == a)
                && let Err(e) = self.steering.detach_iface(&a)
            {
                warn!("{a}: {e:#}");
            }
        }
        self.memberships.leave_unwanted(new);
        self.allmulti.turn_off_unneeded(new);
        Ok(())
    }

    /// The steps of a switch that traffic does not see yet.
    fn stage(
        &mut self,
        new: &RuleTable,
        xdp_mode: crate::config::XdpModeConfig,
        prepared: &crate::datapath::Prepared,
        undo: &mut Undo,
    ) -> Result<()> {
        for (ifindex, queue, fd) in &prepared.bindings {
            if self.steering.set_socket(*ifindex, *queue, fd)? {
                undo.xsks.push((*ifindex, *queue));
            }
        }
        // Allmulticast only lets more multicast reach the stack (which drops what no socket
        // wants) until the rule map steers it, so it can come first; a refused attach after it
        // turns it off again.
        undo.allmulti = self.allmulti.turn_on(new)?;
        let attached = self.steering.attached();
        for i in new.ingress.iter().filter(|i| i.info.exists()) {
            if !attached.contains(&i.name) {
                let mode = self.steering.attach(&i.name, i.info.ifindex, xdp_mode)?;
                info!(
                    "{}: XDP program attached in {} mode",
                    i.name,
                    mode.describe()
                );
                undo.attached.push(i.name.clone());
            }
        }
        undo.joined = self.memberships.join_new(new)?;
        Ok(())
    }

    /// Puts the workers back on `old`, then undoes the staged steps.
    fn back_to(&mut self, old: &RuleTable, undo: Undo) {
        if let Err(e) = self.datapath.switch_table(old.clone()) {
            error!("putting the workers back on the running rules: {e:#}");
        }
        self.roll_back(undo);
    }

    fn roll_back(&mut self, undo: Undo) {
        self.allmulti.undo(&undo.allmulti, "the change failed");
        self.memberships.leave(&undo.joined);
        for iface in undo.attached {
            if let Err(e) = self.steering.detach_iface(&iface) {
                warn!("{iface}: {e:#}");
            }
        }
        for (ifindex, queue) in undo.xsks {
            if let Err(e) = self.steering.unset_socket(ifindex, queue) {
                warn!("{e:#}");
            }
        }
    }
}
