//! The text tables of the command line: `relay stats` (counters), `relay rules` (what each
//! rule does) and `relay members` (the IGMP/MLD state), from one [`StatsView`].

use std::fmt::Write;

use crate::stats::{OutputView, RuleView, StatsView, endpoint};

/// Rows of cells printed in columns as wide as their widest cell, two spaces apart. The last
/// cell of a row is free text and sets no width; a [`Columns::line`] is printed as it is.
pub struct Columns {
    right: Vec<bool>,
    rows: Vec<Row>,
}

enum Row {
    Cells(Vec<String>),
    Line(String),
}

impl Columns {
    /// `right[i]`: column i is aligned to the right (numbers).
    pub fn new(right: &[bool]) -> Self {
        Columns {
            right: right.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(Row::Cells(cells));
    }

    pub fn line(&mut self, text: String) {
        self.rows.push(Row::Line(text));
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = Vec::new();
        for row in &self.rows {
            if let Row::Cells(cells) = row {
                // The last cell is free text.
                for (i, c) in cells.iter().take(cells.len().saturating_sub(1)).enumerate() {
                    if widths.len() <= i {
                        widths.resize(i + 1, 0);
                    }
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
        }
        let mut s = String::new();
        for row in &self.rows {
            let line = match row {
                Row::Line(text) => text.clone(),
                Row::Cells(cells) => {
                    let last = cells.len().saturating_sub(1);
                    let mut line = String::new();
                    for (i, c) in cells.iter().enumerate() {
                        if i > 0 {
                            line.push_str("  ");
                        }
                        let pad = if i == last {
                            0
                        } else {
                            widths[i].saturating_sub(c.chars().count())
                        };
                        if self.right.get(i).copied().unwrap_or(false) {
                            line.push_str(&" ".repeat(pad));
                            line.push_str(c);
                        } else {
                            line.push_str(c);
                            line.push_str(&" ".repeat(pad));
                        }
                    }
                    line
                }
            };
            let _ = writeln!(s, "{}", line.trim_end());
        }
        s
    }
}

/// Where an output sends, as the tables show it: `239.2.2.2:6000 vlan 30 dscp 10`, with
/// its unicast next hop and source rewrites.
/// A unicast output's next hop as `via 0a:..` or `via unresolved`, or its reason in brackets
/// when there is no next hop to name (`(no route via out0)`).
fn via(hop: &str) -> String {
    if hop.starts_with("no route") {
        format!("({hop})")
    } else {
        format!("via {hop}")
    }
}

pub fn describe_output(o: &OutputView) -> String {
    let mut s = endpoint(&o.group, o.port);
    if let Some(v) = o.vlan {
        let _ = write!(s, " vlan {v}");
    }
    if let Some(d) = o.dscp {
        let _ = write!(s, " dscp {d}");
    }
    if let Some(hop) = &o.next_hop {
        let _ = write!(s, " {}", via(hop));
    }
    match (&o.source, o.source_port) {
        (Some(a), Some(p)) => {
            let _ = write!(s, " from {a} port {p}");
        }
        (Some(a), None) => {
            let _ = write!(s, " from {a}");
        }
        (None, Some(p)) => {
            let _ = write!(s, " from port {p}");
        }
        (None, None) => {}
    }
    s
}

/// The first column of an output's row.
pub fn output_label(interface: &str) -> String {
    format!("  -> {interface}")
}

/// Drops by reason, as `dropped 3 (ttl_expired=1, no_frame=2)`.
fn describe_drops(o: &OutputView) -> String {
    let dropped: u64 = o.dropped.values().sum();
    let reasons: Vec<String> = o
        .dropped
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if reasons.is_empty() {
        format!("dropped {dropped}")
    } else {
        format!("dropped {dropped} ({})", reasons.join(", "))
    }
}

/// Whole seconds from `ms` (since the Unix epoch) to now; 0 for a time ahead of the clock.
fn seconds_since(ms: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_sub(ms) / 1000
}

/// The line under an on-demand output.
fn on_demand_line(o: &OutputView) -> Option<String> {
    let d = o.on_demand.as_ref()?;
    Some(format!(
        "     on demand: {}, {} held back (no listener), {} groups with listeners on {}{}",
        if d.forwarding { "forwarding" } else { "idle" },
        d.no_listener,
        d.groups,
        o.interface,
        d.changed_ms.map_or(String::new(), |ms| format!(
            ", changed {} s ago",
            seconds_since(ms)
        )),
    ))
}

/// What a rule's output does to each frame beyond where it sends it, for `relay rules`.
fn settings(r: &RuleView, o: &OutputView) -> String {
    let v6 = r.input.group.contains(':');
    let hops = if v6 { "hop_limit" } else { "ttl" };
    let mut out = vec![match o.ttl {
        Some(t) => format!("{hops} {t}"),
        None => format!("{hops} received-1"),
    }];
    if o.group != r.input.group || o.port.is_some_and(|p| Some(p) != r.input.port) {
        out.push(format!(
            "remapped from {}",
            endpoint(&r.input.group, r.input.port)
        ));
    }
    if let Some(v) = o.vlan {
        out.push(format!("vlan {v}"));
    }
    if let Some(d) = o.dscp {
        out.push(format!("dscp {d}"));
    }
    if o.unicast {
        out.push(format!(
            "unicast {}",
            via(o.next_hop.as_deref().unwrap_or("unresolved"))
        ));
    }
    if let Some(a) = &o.source {
        out.push(format!("source {a}"));
    }
    if let Some(p) = o.source_port {
        out.push(format!("source_port {p}"));
    }
    if o.on_demand.is_some() {
        out.push("on_demand".to_owned());
    }
    out.join(", ")
}

impl StatsView {
    /// The table `relay stats` prints: per rule and output, packets, bytes and drops by
    /// reason; then the XDP program's counters, the data path's, each socket's, the pool.
    pub fn render_table(&self) -> String {
        let mut t = Columns::new(&[false, false, true, true]);
        t.row(vec![
            "RULE".into(),
            "INPUT / OUTPUT".into(),
            "PACKETS".into(),
            "BYTES".into(),
            String::new(),
        ]);
        for r in &self.rules {
            t.row(vec![
                r.name.clone(),
                r.input.to_string(),
                r.received.to_string(),
                r.bytes.to_string(),
                // Only where it happens: most relays never see a partial checksum.
                if r.checksum_completed > 0 {
                    format!("checksum_completed={}", r.checksum_completed)
                } else {
                    String::new()
                },
            ]);
            if let Some(m) = &r.merge {
                for (i, leg) in m.legs.iter().enumerate() {
                    t.row(vec![
                        format!("   leg {i}"),
                        leg.input.to_string(),
                        leg.received.to_string(),
                        String::new(),
                        format!(
                            "first={} duplicate={} gaps={}",
                            leg.first, leg.duplicate, leg.gaps
                        ),
                    ]);
                }
                let counted: Vec<String> =
                    m.fields().iter().map(|(n, v)| format!("{n}={v}")).collect();
                t.line(format!(
                    "     merge ({}, window {} ms): {}",
                    m.numbering,
                    m.window_ms,
                    counted.join(" ")
                ));
            }
            for g in r.groups.iter().flatten() {
                t.row(vec![
                    "   .".into(),
                    g.group.clone(),
                    g.packets.to_string(),
                    g.bytes.to_string(),
                    if g.error > 0 {
                        format!("(at most {} of them other groups')", g.error)
                    } else {
                        String::new()
                    },
                ]);
            }
            for o in &r.outputs {
                t.row(vec![
                    output_label(&o.interface),
                    describe_output(o),
                    o.sent.to_string(),
                    o.bytes.to_string(),
                    describe_drops(o),
                ]);
                if let Some(line) = on_demand_line(o) {
                    t.line(line);
                }
            }
        }
        let mut s = self.render_header(crate::stats::own_netns().as_deref());
        s.push_str(&t.render());
        s.push_str(&self.render_totals());
        s
    }

    /// Which relay answered, as the first line of `relay stats`, with a note when it runs in
    /// another network namespace than `here` (the client's): the default control socket is
    /// one path for every namespace.
    pub fn render_header(&self, here: Option<&str>) -> String {
        let Some(r) = &self.relay else {
            return String::new();
        };
        let mut s = format!("relay pid {}, config {}", r.pid, r.config);
        if let Some(ns) = &r.netns {
            let _ = write!(s, ", network namespace {ns}");
            if here.is_some_and(|h| h != ns) {
                let _ = write!(
                    s,
                    " (not this command's: another relay than the one here may have answered)"
                );
            }
        }
        s.push('\n');
        s
    }

    /// What `relay stats` prints under the rules: the XDP program's counters, the data
    /// path's, each socket's, the pool.
    fn render_totals(&self) -> String {
        let mut s = String::new();
        let xdp: Vec<String> = self.xdp.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(s, "xdp: {}", xdp.join(" "));
        let _ = writeln!(
            s,
            "datapath: unmatched={} malformed={} copies={} cross_umem={} capture_dropped={}",
            self.unmatched, self.malformed, self.copies, self.cross_umem, self.capture_dropped
        );
        let _ = writeln!(s, "workers: kicks={} yields={}", self.kicks, self.yields);
        let mut k = Columns::new(&[]);
        for sock in &self.sockets {
            let fields: Vec<String> = sock
                .fields()
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            k.row(vec![
                format!("socket {}", sock.interface),
                format!("queue {}", sock.queue),
                if sock.ingress { "ingress" } else { "egress" }.into(),
                fields.join(" "),
            ]);
        }
        s.push_str(&k.render());
        let p = &self.pool;
        let _ = writeln!(
            s,
            "pool: {} allocator, {} frames, {} free, {} in flight, low-water {}, rejected {}",
            p.allocator, p.capacity, p.free, p.in_flight, p.low_water, p.rejected
        );
        s
    }

    /// The table `relay rules` prints: each rule's input, and where and how each output
    /// sends (TTL, remapping, VLAN, DSCP, unicast, source rewrites, on demand).
    pub fn render_rules(&self) -> String {
        if self.rules.is_empty() {
            return "no rules: the relay is idle (add one with `relay add-rule`)\n".to_owned();
        }
        let mut t = Columns::new(&[]);
        t.row(vec![
            "RULE".into(),
            "INPUT / OUTPUT".into(),
            "SETTINGS".into(),
        ]);
        for r in &self.rules {
            match &r.merge {
                None => t.row(vec![r.name.clone(), r.input.to_string(), String::new()]),
                Some(m) => {
                    for (i, leg) in m.legs.iter().enumerate() {
                        t.row(vec![
                            if i == 0 {
                                r.name.clone()
                            } else {
                                String::new()
                            },
                            leg.input.to_string(),
                            if i == 0 {
                                format!("merged ({}, window {} ms)", m.numbering, m.window_ms)
                            } else {
                                String::new()
                            },
                        ]);
                    }
                }
            }
            for o in &r.outputs {
                t.row(vec![
                    output_label(&o.interface),
                    endpoint(&o.group, o.port),
                    settings(r, o),
                ]);
            }
        }
        t.render()
    }

    /// The table `relay members` prints: per interface and family, who is querier, what
    /// was refused, and each group's listeners.
    pub fn render_members(&self) -> String {
        let mut s = String::new();
        if self.queriers.is_empty() {
            let _ = writeln!(s, "no on-demand outputs: the relay is querier nowhere");
        }
        for q in &self.queriers {
            let refused: Vec<String> = q.refused.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let accepted: Vec<String> =
                q.accepted.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                s,
                "{} {}: {} (from {}){}{}",
                q.interface,
                q.family,
                if q.querier {
                    "querier"
                } else {
                    "another router is querier"
                },
                q.address,
                if refused.is_empty() {
                    String::new()
                } else {
                    format!(", refused {}", refused.join(" "))
                },
                if accepted.is_empty() {
                    String::new()
                } else {
                    format!(", accepted {}", accepted.join(" "))
                }
            );
            let mut t = Columns::new(&[false, false, false, false, true, false]);
            t.row(vec![
                String::new(),
                "GROUP".into(),
                "MODE".into(),
                "COMPAT".into(),
                "EXPIRES".into(),
                "LAST REPORTER".into(),
                "SOURCES".into(),
            ]);
            for m in &q.members {
                let sources: Vec<String> = m
                    .sources
                    .iter()
                    .map(|(a, ms)| format!("{a} ({:.1} s)", *ms as f64 / 1000.0))
                    .collect();
                t.row(vec![
                    String::new(),
                    m.group.clone(),
                    m.mode.clone(),
                    m.version.to_string(),
                    format!("{:.1} s", m.expires_ms as f64 / 1000.0),
                    m.last_reporter.clone().unwrap_or_else(|| "-".to_owned()),
                    if sources.is_empty() {
                        "-".to_owned()
                    } else {
                        sources.join(", ")
                    },
                ]);
            }
            s.push_str(&t.render());
        }
        s
    }
}
