//! Changes to the running rules: a reload of the file, a rule added or removed over the
//! control socket, the running rules applied again to interfaces that changed under them.

use anyhow::Result;
use log::warn;

use super::{
    running::Running,
    tracking::{listener_slots, track_listeners, track_next_hops},
};
use crate::{
    config::Config,
    control::{self, ReloadMode},
    rules::RuleTable,
    sys::LiveSystem,
};

impl Running {
    /// Re-reads the config file and switches to its rules. Everything is validated before
    /// anything changes; a refused file leaves the running rules as they were. Rules present
    /// before and after keep flowing: their BPF map entries are replaced in place and the
    /// workers switch tables between two passes.
    ///
    /// The warnings `--check` gives (interfaces that do not exist) go to the log and the
    /// reply; `strict` refuses the file for them, so a typo in an interface name is caught
    /// before its output goes dark. A `dry_run` stops after the checks and says what the
    /// reload would change.
    pub(super) fn reload(&mut self, mode: &ReloadMode) -> Result<String> {
        let file = self.config_path.display().to_string();
        if let Some(asked) = &mode.file
            && !same_file(asked, &self.config_path)
        {
            anyhow::bail!(
                "this relay reloads {file}, not {}: a dry run checks the file a reload would \
                 read (edit {file}, or point --config at it)",
                asked.display()
            );
        }
        let new_config = Config::load(&self.config_path)?;
        let new = RuleTable::compile(&new_config, &file, &LiveSystem)?;
        let warnings = new_config.absent_interfaces(&file, &LiveSystem);
        refuse_if_strict(mode.strict, &warnings)?;
        if mode.dry_run {
            return Ok(self.dry_run(&new_config, &warnings));
        }
        let summary = self.apply_table(new_config, new)?;
        Ok(with_warnings(summary, &warnings))
    }

    /// What a reload to `new_config` would change, as the reply to a dry run: the rules added,
    /// removed and changed by name, the settings that would wait for a restart, and the
    /// warnings.
    fn dry_run(&self, new_config: &Config, warnings: &[String]) -> String {
        let names = |c: &Config| c.rules.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        let (before, after) = (names(&self.config), names(new_config));
        let added: Vec<String> = after
            .iter()
            .filter(|n| !before.contains(n))
            .cloned()
            .collect();
        let removed: Vec<String> = before
            .iter()
            .filter(|n| !after.contains(n))
            .cloned()
            .collect();
        let changed: Vec<String> = new_config
            .rules
            .iter()
            .filter(|r| {
                self.config
                    .rules
                    .iter()
                    .any(|o| o.name == r.name && o != *r)
            })
            .map(|r| r.name.clone())
            .collect();
        let list = |what: &str, names: &[String]| match names {
            [] => format!("0 {what}"),
            _ => format!("{} {what} ({})", names.len(), names.join(", ")),
        };
        let out = format!(
            "{}: valid, nothing applied; a reload would run {} rules: {}, {}, {}",
            self.config_path.display(),
            new_config.rules.len(),
            list("added", &added),
            list("removed", &removed),
            list("changed", &changed),
        );
        let notes = self.restart_notes(new_config);
        warning_lines(warning_lines(out, &notes), warnings)
    }

    /// Settings a reload cannot change: each one that differs, said so.
    fn restart_notes(&self, new_config: &Config) -> Vec<String> {
        let file = self.config_path.display();
        [
            ("allocator", new_config.allocator != self.config.allocator),
            ("umem", new_config.umem != self.config.umem),
            ("workers", new_config.workers != self.config.workers),
            ("cpus", new_config.cpus != self.config.cpus),
            ("bind", new_config.bind != self.config.bind),
            ("poll", new_config.poll != self.config.poll),
            ("control", new_config.control != self.config.control),
            ("metrics", new_config.metrics != self.config.metrics),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(what, _)| format!("{file}: `{what}` changed; it takes effect at the next start"))
        .collect()
    }

    /// Carries out a change asked for over the control socket. Rules added or removed this
    /// way change the running relay only: the file is not rewritten, and the next reload
    /// goes back to what it says.
    pub(super) fn change(&mut self, change: control::Change) -> Result<String> {
        let mut config = self.config.clone();
        match change {
            control::Change::Reload(mode) => self.reload(&mode),
            control::Change::AddRule {
                rule,
                source,
                strict,
            } => {
                let rule = crate::config::Rule::parse_one(&source, &rule)?;
                let name = rule.name.clone();
                let warnings = crate::config::absent_interfaces(
                    std::slice::from_ref(&rule),
                    &source,
                    &LiveSystem,
                );
                config.rules.push(rule);
                // An error about the added rule is the added rule's source's, not the file's.
                let file = self.config_path.display().to_string();
                let table = RuleTable::compile(&config, &file, &LiveSystem).map_err(|mut e| {
                    if e.rule.as_deref() == Some(name.as_str()) {
                        e.file = source;
                    }
                    e
                })?;
                refuse_if_strict(strict, &warnings)?;
                let summary = self.apply_table(config, table)?;
                Ok(with_warnings(summary, &warnings))
            }
            control::Change::RemoveRule(name) => {
                let before = config.rules.len();
                config.rules.retain(|r| r.name != name);
                if config.rules.len() == before {
                    let names: Vec<&str> =
                        self.config.rules.iter().map(|r| r.name.as_str()).collect();
                    anyhow::bail!(
                        "no rule named '{name}' (the running rules: {})",
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        }
                    );
                }
                if config.rules.is_empty() {
                    // The relay idles, its XDP program detached, until a rule is added or the
                    // file reloaded (a file must still have rules).
                    return self.apply_table(config, RuleTable::default());
                }
                self.apply(config)
            }
        }
    }

    /// Validates `new_config` against the system and switches to its rules.
    fn apply(&mut self, new_config: Config) -> Result<String> {
        let file = self.config_path.display().to_string();
        let new = RuleTable::compile(&new_config, &file, &LiveSystem)?;
        self.apply_table(new_config, new)
    }

    /// Applies the running rules again, to interfaces re-created or readdressed under them;
    /// an output whose `source: auto` has no address now drops its frames until it has.
    pub(super) fn apply_running(&mut self) -> Result<String> {
        let file = self.config_path.display().to_string();
        let new = RuleTable::compile_running(&self.config, &file, &LiveSystem)?;
        self.apply_table(self.config.clone(), new)
    }

    fn apply_table(&mut self, new_config: Config, mut new: RuleTable) -> Result<String> {
        // An interface re-created since the last look has new sockets coming: the old ones
        // go first, so the new ones can share the UMEM through a live socket.
        self.retire_gone()?;
        let old = self.datapath.table();
        // The old table's next hops stay followed until the switch is done either way.
        let old_targets = old.unicast_targets();
        track_next_hops(&mut self.neighbours, &mut new, &old_targets)?;
        // Likewise the old table's listeners: an on-demand output both tables have keeps its
        // slot, and so its state.
        let old_listeners = old.listen_targets();
        self.querier.set_timers(&new_config.querier);
        track_listeners(&self.querier, &mut new, &old_listeners)?;
        // A merged rule that stays keeps what it remembers, so the packets still in flight
        // on its other legs are not relayed twice.
        new.keep_merge_state(&old);
        // Said in the log and in the reply to whoever asked for the change.
        let notes = self.restart_notes(&new_config);
        for note in &notes {
            warn!("{note}");
        }
        let switched = self.switch(&old, &new, new_config.xdp_mode);
        // Now only the table in use is followed; its slots are the ones it already holds.
        let kept = if switched.is_ok() { &new } else { &old };
        if let Some(n) = &self.neighbours {
            n.track(&kept.unicast_targets());
        }
        if let Err(e) = listener_slots(&self.querier, kept, &kept.listen_targets()) {
            warn!("on-demand outputs: {e:#}");
        }
        switched?;
        let names = |t: &RuleTable| t.rules.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        let (before, after) = (names(&old), names(&new));
        let added = after.iter().filter(|n| !before.contains(n)).count();
        let removed = before.iter().filter(|n| !after.contains(n)).count();
        let changed = new
            .rules
            .iter()
            .filter(|r| old.rules.iter().any(|o| o.name == r.name && o != *r))
            .count();
        // Settings that need a restart keep their running values; the rules are the new ones.
        self.config = Config {
            xdp_mode: new_config.xdp_mode,
            rules: new_config.rules,
            ..self.config.clone()
        };
        let mut summary = format!(
            "{} rules ({added} added, {removed} removed, {changed} changed)",
            new.rules.len()
        );
        if new.rules.is_empty() {
            summary.push_str("; the relay is idle until a rule is added");
        }
        for note in notes {
            summary.push_str(&format!("; warning: {note}"));
        }
        Ok(summary)
    }
}

/// With `strict`, a change that draws warnings is refused, and the running rules stay.
fn refuse_if_strict(strict: bool, warnings: &[String]) -> Result<()> {
    if strict && !warnings.is_empty() {
        anyhow::bail!(
            "--strict: refused for {} warning{}: {}",
            warnings.len(),
            if warnings.len() == 1 { "" } else { "s" },
            warnings.join("; ")
        );
    }
    Ok(())
}

/// `summary` of a change that was applied, with each warning logged and added on a line of
/// its own, for the reply.
fn with_warnings(summary: String, warnings: &[String]) -> String {
    for w in warnings {
        warn!("{w}");
    }
    warning_lines(summary, warnings)
}

/// `summary` with each warning on a line of its own. A dry run's are not logged as warnings:
/// nothing was applied, and the log says the dry run's answer as a whole.
fn warning_lines(mut summary: String, warnings: &[String]) -> String {
    for w in warnings {
        summary.push_str(&format!("\nwarning: {w}"));
    }
    summary
}

/// Whether two paths name one file (either may be relative, or a link to the other).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
