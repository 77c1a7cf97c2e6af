//! One view of every counter, and its three renderings: JSON (the control socket and
//! `relay stats --json`), a table (`relay stats`), and the Prometheus text format (the
//! `metrics:` endpoint).

use std::{collections::BTreeMap, fmt::Write};

use relay_common::XdpCounter;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::DatapathStats,
    pool::{AllocatorKind, PoolStats},
    rules::RuleTable,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    pub rules: Vec<RuleView>,
    /// The XDP program's counters, summed over CPUs.
    pub xdp: BTreeMap<String, u64>,
    pub pool: PoolView,
    /// Redirected frames the data path could not attribute to a rule.
    pub unmatched: u64,
    pub malformed: u64,
    /// Fan-out copies made (outputs - 1 per frame at most).
    #[serde(default)]
    pub copies: u64,
    /// Of those, copies from one UMEM into another.
    #[serde(default)]
    pub cross_umem: u64,
    /// The IGMP/MLD querier on each interface with an on-demand output, with its members
    /// (`relay members`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queriers: Vec<crate::querier::QuerierView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub name: String,
    /// The rule's input, as `interface group:port from source`, and ` vlan N` (or
    /// ` vlan untagged`) when it names one.
    pub input: String,
    pub received: u64,
    pub bytes: u64,
    /// Received frames whose partial UDP checksum the data path completed (senders with
    /// transmit checksum offload behind a veth).
    #[serde(default)]
    pub checksum_completed: u64,
    pub outputs: Vec<OutputView>,
    /// For a rule with a group range: its busiest groups, most packets first, at most
    /// [`GROUPS_SHOWN`]; `relay stats --groups` shows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<GroupView>>,
}

/// Groups of a range rule a view shows.
pub const GROUPS_SHOWN: usize = 32;

/// One group of a range rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub group: String,
    pub packets: u64,
    pub bytes: u64,
    /// How many of `packets` may belong to other groups (the counts are kept in bounded
    /// memory: see `relay::topgroups`); 0 when the count is exact.
    #[serde(default)]
    pub error: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputView {
    pub interface: String,
    /// The address the output sends to: its group, or its unicast destination (`unicast`).
    pub group: String,
    /// The output sends to a unicast `destination:` (then `next_hop` says where).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unicast: bool,
    /// A unicast output's next-hop MAC, or `unresolved` while the kernel has no neighbour
    /// entry for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<String>,
    /// The source the output writes, as `auto (198.18.2.1)` or the address the rule names;
    /// absent when it keeps the sender's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The UDP source port the output writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
    pub port: String,
    /// The VID the output tags its frames with; absent when it sends them untagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// The DSCP the output marks with; absent when it keeps the received one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dscp: Option<u8>,
    pub sent: u64,
    pub bytes: u64,
    /// Drops by reason.
    pub dropped: BTreeMap<String, u64>,
    /// For an `on_demand: true` output: whether it forwards now, and what it held back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<OnDemandView>,
}

/// The listener side of an on-demand output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnDemandView {
    /// A listener on the interface wants the output's group (and source) now.
    pub forwarding: bool,
    /// Frames not sent because nobody listened (not counted as dropped).
    pub no_listener: u64,
    /// Groups with listeners on the output's interface, of the rule's family.
    pub groups: u32,
    /// When `forwarding` last changed, in milliseconds since the Unix epoch; absent if never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    pub allocator: String,
    pub capacity: usize,
    pub free: usize,
    pub in_flight: usize,
    pub low_water: usize,
    pub rejected: u64,
}

impl StatsView {
    /// The view without the per-group counters of range rules.
    pub fn without_groups(mut self) -> Self {
        for r in &mut self.rules {
            r.groups = None;
        }
        self
    }

    pub fn build(
        table: &RuleTable,
        stats: &DatapathStats,
        xdp: Option<&[u64; XdpCounter::COUNT as usize]>,
        pool: &PoolStats,
        allocator: AllocatorKind,
    ) -> Self {
        let rules = table
            .rules
            .iter()
            .zip(&stats.rules)
            .map(|(r, rc)| RuleView {
                name: r.name.clone(),
                input: format!(
                    "{} {}:{} from {}{}",
                    table
                        .ingress
                        .iter()
                        .find(|i| i.info.ifindex == r.ingress_ifindex)
                        .map_or("?", |i| i.name.as_str()),
                    r.prefix,
                    r.port.map_or("any".into(), |p| p.to_string()),
                    r.source.map_or("any".into(), |s| s.to_string()),
                    r.vlan.map_or(String::new(), |v| format!(" vlan {v}")),
                ),
                received: rc.packets,
                bytes: rc.bytes,
                checksum_completed: rc.checksum_completed,
                groups: (!r.prefix.is_host()).then(|| {
                    rc.groups
                        .top(GROUPS_SHOWN)
                        .into_iter()
                        .map(|(g, c)| GroupView {
                            group: g.to_string(),
                            packets: c.packets,
                            bytes: c.bytes,
                            error: c.error,
                        })
                        .collect()
                }),
                outputs: r
                    .outputs
                    .iter()
                    .zip(&rc.outputs)
                    .map(|(o, oc)| OutputView {
                        interface: table.egress[o.egress].name.clone(),
                        group: o.action.named_destination().unwrap_or(r.prefix).to_string(),
                        unicast: o.action.destination.is_some(),
                        next_hop: o.action.destination.map(|_| {
                            o.next_hop
                                .as_ref()
                                .and_then(|s| s.mac())
                                .map_or("unresolved".to_owned(), |m| {
                                    crate::nexthop::MacDisplay(m).to_string()
                                })
                        }),
                        source: describe_source(&o.action),
                        source_port: o.action.source_port,
                        port: o
                            .action
                            .port
                            .or(r.port)
                            .map_or("same".into(), |p| p.to_string()),
                        vlan: o.action.vlan,
                        dscp: o.action.dscp,
                        sent: oc.packets,
                        bytes: oc.bytes,
                        dropped: [
                            ("ttl_expired", oc.ttl_expired),
                            ("no_frame", oc.no_frame),
                            ("tx_ring_full", oc.tx_ring_full),
                            ("handoff_full", oc.handoff_full),
                            ("malformed", oc.malformed),
                            ("too_large", oc.too_large),
                            ("interface_down", oc.interface_down),
                            ("no_neighbour", oc.no_neighbour),
                            ("no_source", oc.no_source),
                        ]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                        on_demand: o.on_demand.then(|| OnDemandView {
                            forwarding: !o.unwanted(),
                            no_listener: oc.no_listener,
                            groups: o.listening.as_ref().map_or(0, |l| l.groups()),
                            changed_ms: o.listening.as_ref().and_then(|l| l.changed_ms()),
                        }),
                    })
                    .collect(),
            })
            .collect();
        StatsView {
            rules,
            xdp: xdp
                .map(|x| {
                    XdpCounter::ALL
                        .iter()
                        .map(|c| (c.name().to_owned(), x[*c as usize]))
                        .collect()
                })
                .unwrap_or_default(),
            pool: PoolView {
                allocator: allocator.describe().to_owned(),
                capacity: pool.capacity,
                free: pool.free,
                in_flight: pool.in_flight(),
                low_water: pool.low_water,
                rejected: pool.rejected,
            },
            unmatched: stats.unmatched,
            malformed: stats.malformed,
            copies: stats.copies,
            cross_umem: stats.cross_umem,
            queriers: Vec::new(),
        }
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
            let _ = writeln!(
                s,
                "{} {}: {} (from {}){}",
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
                }
            );
            let _ = writeln!(
                s,
                "  {:<28} {:<8} {:<6} {:>10}  {:<24} SOURCES",
                "GROUP", "MODE", "COMPAT", "EXPIRES", "LAST REPORTER"
            );
            for m in &q.members {
                let sources: Vec<String> = m
                    .sources
                    .iter()
                    .map(|(a, ms)| format!("{a} ({:.1} s)", *ms as f64 / 1000.0))
                    .collect();
                let _ = writeln!(
                    s,
                    "  {:<28} {:<8} {:<6} {:>8.1} s  {:<24} {}",
                    m.group,
                    m.mode,
                    m.version,
                    m.expires_ms as f64 / 1000.0,
                    m.last_reporter.as_deref().unwrap_or("-"),
                    if sources.is_empty() {
                        "-".to_owned()
                    } else {
                        sources.join(", ")
                    }
                );
            }
        }
        s
    }

    /// The table `relay stats` prints.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<16} {:<28} {:>12} {:>14}",
            "RULE", "INPUT", "RECEIVED", "BYTES"
        );
        for r in &self.rules {
            // Only where it happens: most relays never see a partial checksum.
            let completed = if r.checksum_completed > 0 {
                format!("  checksum_completed={}", r.checksum_completed)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "{:<16} {:<28} {:>12} {:>14}{completed}",
                r.name, r.input, r.received, r.bytes
            );
            for g in r.groups.iter().flatten() {
                let _ = writeln!(
                    s,
                    "   . {:<40} {:>12} {:>14}{}",
                    g.group,
                    g.packets,
                    g.bytes,
                    if g.error > 0 {
                        format!("  (at most {} of them other groups')", g.error)
                    } else {
                        String::new()
                    }
                );
            }
            for o in &r.outputs {
                let dropped: u64 = o.dropped.values().sum();
                let reasons: Vec<String> = o
                    .dropped
                    .iter()
                    .filter(|(_, v)| **v > 0)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let _ = writeln!(
                    s,
                    "  -> {:<12} {:<22} {:>12} {:>14}  dropped {}{}",
                    o.interface,
                    format!(
                        "{}:{}{}{}{}",
                        o.group,
                        o.port,
                        vlan_suffix(o.vlan),
                        o.dscp.map_or(String::new(), |d| format!(" dscp {d}")),
                        rewrites_suffix(o),
                    ),
                    o.sent,
                    o.bytes,
                    dropped,
                    if reasons.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", reasons.join(", "))
                    }
                );
                if let Some(d) = &o.on_demand {
                    let _ = writeln!(
                        s,
                        "     on demand: {}, {} held back (no listener), {} groups with \
                         listeners on {}{}",
                        if d.forwarding { "forwarding" } else { "idle" },
                        d.no_listener,
                        d.groups,
                        o.interface,
                        d.changed_ms.map_or(String::new(), |ms| format!(
                            ", changed {} s ago",
                            seconds_since(ms)
                        )),
                    );
                }
            }
        }
        let xdp: Vec<String> = self.xdp.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(s, "xdp: {}", xdp.join(" "));
        let p = &self.pool;
        let _ = writeln!(
            s,
            "pool: {} allocator, {} frames, {} free, {} in flight, low-water {}, rejected {}",
            p.allocator, p.capacity, p.free, p.in_flight, p.low_water, p.rejected
        );
        if self.unmatched + self.malformed > 0 {
            let _ = writeln!(
                s,
                "datapath: unmatched={} malformed={}",
                self.unmatched, self.malformed
            );
        }
        s
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut s = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        // `interface` is the interface the counted frames cross: the input's for a rule, the
        // output's for an output; `output` names an output within its rule.
        let rl = |r: &RuleView| {
            format!(
                "{{rule=\"{}\",interface=\"{}\"}}",
                escape(&r.name),
                escape(r.input.split(' ').next().unwrap_or(""))
            )
        };
        // Two outputs may differ only in their VLAN, so it is part of the output's name.
        // A unicast output is labelled with its destination rather than a group.
        let ol = |r: &RuleView, o: &OutputView| {
            format!(
                "rule=\"{}\",output=\"{} {}:{}{}\",interface=\"{}\",{}=\"{}\"",
                escape(&r.name),
                escape(&o.interface),
                o.group,
                o.port,
                vlan_suffix(o.vlan),
                escape(&o.interface),
                if o.unicast { "destination" } else { "group" },
                o.group
            )
        };
        family(
            "relay_rule_received_packets_total",
            "counter",
            "Frames the rule matched.",
            self.rules.iter().map(|r| (rl(r), r.received)).collect(),
        );
        family(
            "relay_rule_received_bytes_total",
            "counter",
            "Bytes of the frames the rule matched.",
            self.rules.iter().map(|r| (rl(r), r.bytes)).collect(),
        );
        family(
            "relay_rule_checksum_completed_total",
            "counter",
            "Frames the rule matched whose partial UDP checksum (sender's transmit offload) was completed.",
            self.rules
                .iter()
                .map(|r| (rl(r), r.checksum_completed))
                .collect(),
        );
        family(
            "relay_output_sent_packets_total",
            "counter",
            "Frames transmitted on the output.",
            self.rules
                .iter()
                .flat_map(|r| {
                    r.outputs
                        .iter()
                        .map(move |o| (format!("{{{}}}", ol(r, o)), o.sent))
                })
                .collect(),
        );
        family(
            "relay_output_sent_bytes_total",
            "counter",
            "Bytes transmitted on the output.",
            self.rules
                .iter()
                .flat_map(|r| {
                    r.outputs
                        .iter()
                        .map(move |o| (format!("{{{}}}", ol(r, o)), o.bytes))
                })
                .collect(),
        );
        family(
            "relay_output_dropped_packets_total",
            "counter",
            "Frames not transmitted on the output, by reason.",
            self.rules
                .iter()
                .flat_map(|r| {
                    r.outputs.iter().flat_map(move |o| {
                        o.dropped
                            .iter()
                            .map(move |(k, v)| (format!("{{{},reason=\"{k}\"}}", ol(r, o)), *v))
                    })
                })
                .collect(),
        );
        let on_demand = |f: fn(&OnDemandView) -> u64| -> Vec<(String, u64)> {
            self.rules
                .iter()
                .flat_map(|r| {
                    r.outputs.iter().filter_map(move |o| {
                        o.on_demand
                            .as_ref()
                            .map(|d| (format!("{{{}}}", ol(r, o)), f(d)))
                    })
                })
                .collect()
        };
        family(
            "relay_output_forwarding",
            "gauge",
            "1 while an on-demand output has a listener and forwards, 0 while it holds back.",
            on_demand(|d| u64::from(d.forwarding)),
        );
        family(
            "relay_output_no_listener_packets_total",
            "counter",
            "Frames an on-demand output held back because nobody listened (not drops).",
            on_demand(|d| d.no_listener),
        );
        family(
            "relay_output_listened_groups",
            "gauge",
            "Groups with listeners on an on-demand output's interface.",
            on_demand(|d| u64::from(d.groups)),
        );
        family(
            "relay_xdp_packets_total",
            "counter",
            "Frames the XDP program saw, matched, redirected and passed, over all CPUs.",
            self.xdp
                .iter()
                .map(|(k, v)| (format!("{{counter=\"{k}\"}}"), *v))
                .collect(),
        );
        let p = &self.pool;
        family(
            "relay_pool_frames",
            "gauge",
            "UMEM frames by state.",
            vec![
                ("{state=\"free\"}".into(), p.free as u64),
                ("{state=\"in_flight\"}".into(), p.in_flight as u64),
            ],
        );
        family(
            "relay_pool_low_water_frames",
            "gauge",
            "Fewest free frames seen since start.",
            vec![(String::new(), p.low_water as u64)],
        );
        s
    }
}

/// Whole seconds from `ms` (since the Unix epoch) to now; 0 for a time ahead of the clock.
fn seconds_since(ms: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_sub(ms) / 1000
}

/// What `source:` an output writes, for the views: `auto (ADDRESS)` (or `auto (none)`
/// while the interface has none), or the address the rule names.
pub fn describe_source(a: &crate::rewrite::OutputAction) -> Option<String> {
    use crate::config::SourceSpec;
    Some(match a.source_spec? {
        SourceSpec::Auto => format!(
            "auto ({})",
            a.source.map_or("none".to_owned(), |s| s.to_string())
        ),
        SourceSpec::Address(s) => s.to_string(),
    })
}

/// ` unicast via MAC from SOURCE:PORT` for the rewrites an output makes beyond the group.
fn rewrites_suffix(o: &OutputView) -> String {
    let mut s = String::new();
    if let Some(hop) = &o.next_hop {
        let _ = write!(s, " via {hop}");
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

/// ` vlan N` for an output that tags its frames, nothing for one that does not.
fn vlan_suffix(vlan: Option<u16>) -> String {
    vlan.map_or(String::new(), |v| format!(" vlan {v}"))
}

/// Escapes a Prometheus label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, tests::fake};
    use std::net::IpAddr;

    fn view() -> StatsView {
        let c = Config::parse(
            "t",
            "rules:\n  - name: v\"a\n    input: {interface: in0, group: 239.1.1.1, port: 5000, vlan: 10}\n    outputs: [{interface: out0}, {interface: out1, group: 239.2.2.2, port: 6000, vlan: 30}]\n",
        )
        .unwrap();
        let t = RuleTable::compile(&c, "t", &fake()).unwrap();
        let mut d = DatapathStats::new([2].into_iter());
        d.rules[0].packets = 10;
        d.rules[0].bytes = 1000;
        d.rules[0].checksum_completed = 4;
        d.rules[0].outputs[0].packets = 9;
        d.rules[0].outputs[0].ttl_expired = 1;
        d.rules[0].outputs[1].packets = 10;
        let pool = PoolStats {
            capacity: 64,
            free: 60,
            low_water: 50,
            rejected: 0,
        };
        StatsView::build(
            &t,
            &d,
            Some(&[12, 10, 10, 2, 0, 0, 0, 0]),
            &pool,
            AllocatorKind::Lockfree,
        )
    }

    #[test]
    fn json_round_trips() {
        let v = view();
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<StatsView>(&json).unwrap(), v);
        assert_eq!(v.rules[0].input, "in0 239.1.1.1:5000 from any vlan 10");
        assert_eq!(
            (v.rules[0].outputs[0].vlan, v.rules[0].outputs[1].vlan),
            (None, Some(30))
        );
        assert_eq!(v.rules[0].outputs[1].group, "239.2.2.2");
        assert_eq!(v.rules[0].outputs[1].port, "6000");
        assert_eq!(v.xdp["redirected"], 10);
        assert_eq!(v.pool.in_flight, 4);
        assert_eq!(v.rules[0].checksum_completed, 4);
        // A view from a relay that did not have the counter yet still reads.
        let old = json.replace("\"checksum_completed\":4,", "");
        assert_ne!(old, json);
        let read: StatsView = serde_json::from_str(&old).unwrap();
        assert_eq!(read.rules[0].checksum_completed, 0);
    }

    /// A range rule's busiest groups: in the view (at most GROUPS_SHOWN, most first), in
    /// the table, gone with `without_groups`; an exact rule has none.
    #[test]
    fn range_rules_show_their_busiest_groups() {
        let c = Config::parse(
            "t",
            "rules:\n  - name: channels\n    input: {interface: in0, group: 239.10.0.0/16, port: 5000}\n    outputs: [{interface: out0, group: 239.20.0.0/16}]\n  - name: one\n    input: {interface: in0, group: 239.1.1.1}\n    outputs: [{interface: out0}]\n",
        )
        .unwrap();
        let t = RuleTable::compile(&c, "t", &fake()).unwrap();
        let mut d = DatapathStats::new([1, 1].into_iter());
        for i in 0..40u8 {
            for _ in 0..=i {
                d.rules[0].groups.record(IpAddr::from([239, 10, 0, i]), 100);
            }
        }
        let pool = PoolStats {
            capacity: 64,
            free: 64,
            low_water: 64,
            rejected: 0,
        };
        let v = StatsView::build(&t, &d, None, &pool, AllocatorKind::Lockfree);
        let groups = v.rules[0].groups.as_ref().unwrap();
        assert_eq!(groups.len(), GROUPS_SHOWN);
        assert_eq!(
            groups[0],
            GroupView {
                group: "239.10.0.39".into(),
                packets: 40,
                bytes: 4000,
                error: 0
            }
        );
        assert_eq!(v.rules[1].groups, None);
        assert_eq!(v.rules[0].outputs[0].group, "239.20.0.0/16");
        assert_eq!(v.rules[0].input, "in0 239.10.0.0/16:5000 from any");
        let table = v.render_table();
        assert!(table.contains("   . 239.10.0.39"), "{table}");
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<StatsView>(&json).unwrap(), v);
        let bare = v.without_groups();
        assert!(!serde_json::to_string(&bare).unwrap().contains("groups"));
        assert!(!bare.render_table().contains("239.10.0.39"));
    }

    /// Unicast outputs show their destination, next hop and rewrites in every view.
    #[test]
    fn gateway_outputs_show_destination_next_hop_and_rewrites() {
        let c = Config::parse(
            "t",
            "rules:\n  - name: gw\n    input: {interface: in0, group: 239.1.1.1, port: 5000}\n    outputs: [{interface: out0, destination: 198.18.2.2, port: 7000, source: auto, source_port: 7001}, {interface: out1, destination: 198.18.3.9}]\n  - name: back\n    input: {interface: in0, destination: 198.18.1.2, port: 7100}\n    outputs: [{interface: out1, group: 239.5.5.5, source: 198.18.12.1}]\n",
        )
        .unwrap();
        let mut t = RuleTable::compile(&c, "t", &fake()).unwrap();
        let slots = vec![
            std::sync::Arc::new(crate::nexthop::NextHopSlot::new()),
            std::sync::Arc::new(crate::nexthop::NextHopSlot::new()),
        ];
        slots[0].set(Some([2, 0, 0, 0, 0, 0x22]));
        t.set_next_hops(slots);
        let mut d = DatapathStats::new([2, 1].into_iter());
        d.rules[0].outputs[1].no_neighbour = 5;
        let pool = PoolStats {
            capacity: 64,
            free: 64,
            low_water: 64,
            rejected: 0,
        };
        let v = StatsView::build(&t, &d, None, &pool, AllocatorKind::Mutex);
        let o = &v.rules[0].outputs[0];
        assert_eq!(
            (o.group.as_str(), o.unicast, o.next_hop.as_deref()),
            ("198.18.2.2", true, Some("02:00:00:00:00:22"))
        );
        assert_eq!(
            (o.source.as_deref(), o.source_port),
            (Some("auto (198.18.11.1)"), Some(7001))
        );
        assert_eq!(
            v.rules[0].outputs[1].next_hop.as_deref(),
            Some("unresolved")
        );
        assert_eq!(v.rules[0].outputs[1].dropped["no_neighbour"], 5);
        let back = &v.rules[1].outputs[0];
        assert_eq!((back.unicast, back.next_hop.as_deref()), (false, None));
        assert_eq!(back.source.as_deref(), Some("198.18.12.1"));
        assert_eq!(v.rules[1].input, "in0 198.18.1.2:7100 from any");
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<StatsView>(&json).unwrap(), v);

        let table = v.render_table();
        assert!(
            table.contains(
                "198.18.2.2:7000 via 02:00:00:00:00:22 from auto (198.18.11.1) port 7001"
            ),
            "{table}"
        );
        assert!(table.contains("198.18.3.9:5000 via unresolved"), "{table}");
        assert!(table.contains("(no_neighbour=5)"), "{table}");
        let prom = v.render_prometheus();
        assert!(
            prom.contains("relay_output_dropped_packets_total{rule=\"gw\",output=\"out1 198.18.3.9:5000\",interface=\"out1\",destination=\"198.18.3.9\",reason=\"no_neighbour\"} 5"),
            "{prom}"
        );
        assert!(
            prom.contains("output=\"out1 239.5.5.5:7100\",interface=\"out1\",group=\"239.5.5.5\""),
            "{prom}"
        );
    }

    #[test]
    fn table_shows_drops_by_reason() {
        let t = view().render_table();
        assert!(t.contains("dropped 1 (ttl_expired=1)"), "{t}");
        assert!(t.contains("239.2.2.2:6000 vlan 30"), "{t}");
        assert!(t.contains("1000  checksum_completed=4\n"), "{t}");
        assert!(
            t.contains("pool: lock-free allocator, 64 frames, 60 free, 4 in flight"),
            "{t}"
        );
    }

    #[test]
    fn prometheus_names_labels_and_escapes() {
        let p = view().render_prometheus();
        assert!(
            p.contains("relay_rule_received_packets_total{rule=\"v\\\"a\",interface=\"in0\"} 10"),
            "{p}"
        );
        assert!(p.contains(
            "relay_output_sent_packets_total{rule=\"v\\\"a\",output=\"out1 239.2.2.2:6000 vlan 30\",interface=\"out1\",group=\"239.2.2.2\"} 10"
        ), "{p}");
        assert!(p.contains(
            "relay_output_dropped_packets_total{rule=\"v\\\"a\",output=\"out0 239.1.1.1:5000\",interface=\"out0\",group=\"239.1.1.1\",reason=\"ttl_expired\"} 1"
        ), "{p}");
        assert!(
            p.contains("relay_rule_checksum_completed_total{rule=\"v\\\"a\",interface=\"in0\"} 4"),
            "{p}"
        );
        assert!(
            p.contains("relay_xdp_packets_total{counter=\"seen\"} 12"),
            "{p}"
        );
        assert!(p.contains("# TYPE relay_pool_frames gauge"), "{p}");
        // Every sample line is `name{labels} value` or `name value`.
        for line in p.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
    }
}
