//! One view of every counter and setting, and two of its renderings: JSON (the control
//! socket and `relay stats --json`) and the Prometheus text format (the `metrics:`
//! endpoint). The tables `relay stats`, `relay rules` and `relay members` print are in
//! [`crate::render`], the rates of `--watch` in [`crate::rates`].

use std::{collections::BTreeMap, fmt, fmt::Write};

use relay_common::XdpCounter;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::{DatapathStats, SocketCounters},
    pool::{AllocatorKind, PoolStats},
    rewrite::RewriteError,
    rules::RuleTable,
    vlan::Vlan,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    /// Which relay answered: the default control socket is one path for every network
    /// namespace, so a client may reach a relay it did not mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayId>,
    pub rules: Vec<RuleView>,
    /// The XDP program's counters, summed over CPUs.
    pub xdp: BTreeMap<String, u64>,
    pub pool: PoolView,
    /// Redirected frames the data path could not attribute to a rule.
    pub unmatched: u64,
    /// Redirected frames that were not multicast UDP after all, or whose lengths disagree.
    pub malformed: u64,
    /// Fan-out copies made (outputs - 1 per frame at most).
    #[serde(default)]
    pub copies: u64,
    /// Of those, copies from one UMEM into another.
    #[serde(default)]
    pub cross_umem: u64,
    /// Frames `relay capture` wanted and could not queue (the client fell behind); the
    /// frames themselves were forwarded.
    #[serde(default)]
    pub capture_dropped: u64,
    /// TX kicks (sendto on an AF_XDP socket) the workers made: the system calls they pay to
    /// transmit.
    #[serde(default)]
    pub kicks: u64,
    /// Times a `poll: sleep` worker that only awaited TX completions gave its CPU up, so the
    /// kernel's deferred work that produces them could run.
    #[serde(default)]
    pub yields: u64,
    /// The IGMP/MLD querier on each interface with an on-demand output, with its members
    /// (`relay members`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queriers: Vec<crate::querier::QuerierView>,
    /// The kernel's counters of each AF_XDP socket, one per (interface, queue), at most
    /// 100 ms old: the drops before the relay sees a frame.
    #[serde(default)]
    pub sockets: Vec<SocketCounters>,
}

/// The relay that answered: its config file, its process and its network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayId {
    /// The config file it runs on, as an absolute path.
    pub config: String,
    pub pid: u32,
    /// Its network namespace as the kernel names it (`net:[4026531840]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

impl RelayId {
    /// This process, running on `config`.
    pub fn this(config: &std::path::Path) -> Self {
        let config = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
        RelayId {
            config: config.display().to_string(),
            pid: std::process::id(),
            netns: own_netns(),
        }
    }
}

/// This process's network namespace, as `/proc/self/ns/net` names it.
pub fn own_netns() -> Option<String> {
    std::fs::read_link("/proc/self/ns/net")
        .ok()
        .map(|p| p.display().to_string())
}

/// A rule's input: what it matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputView {
    pub interface: String,
    /// The group or range it matches, or its unicast destination (`unicast`).
    pub group: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unicast: bool,
    /// The UDP port; any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The source or source prefix; any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A VID or `untagged`; any VLAN or none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<Vlan>,
}

impl InputView {
    /// A compiled input (a rule's, or a leg's) as the views show it.
    pub fn of(table: &RuleTable, input: &crate::rules::CompiledInput) -> Self {
        InputView {
            interface: table.ingress_name(input.ifindex).to_owned(),
            group: input.prefix.to_string(),
            unicast: input.unicast,
            port: input.port,
            source: input.source.map(|s| s.to_string()),
            vlan: input.vlan,
        }
    }
}

/// `rin 239.1.1.1:5000 from 198.18.0.1 vlan 10`; `*` for any port, IPv6 in brackets.
impl fmt::Display for InputView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.interface, endpoint(&self.group, self.port))?;
        if let Some(s) = &self.source {
            write!(f, " from {s}")?;
        }
        if let Some(v) = self.vlan {
            write!(f, " vlan {v}")?;
        }
        Ok(())
    }
}

/// An address and port as written in a URL: `239.1.1.1:5000`, `[ff18::1:1]:5000`; `*` for
/// no port (any on an input, the received one on an output). A prefix (`239.10.0.0/16`)
/// is an address here.
pub fn endpoint(address: &str, port: Option<u16>) -> String {
    let port = port.map_or("*".to_owned(), |p| p.to_string());
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub name: String,
    pub input: InputView,
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
    /// For a merged rule (`inputs:` with `merge:`): each leg and what the merge decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeView>,
}

/// A merged rule's legs and totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeView {
    /// `rtp`, or `counter of N bytes at offset M`.
    pub numbering: String,
    pub window_ms: u32,
    /// Packets relayed: the first of each sequence number within the window.
    pub relayed: u64,
    /// Sequence numbers no leg carried (so far).
    pub lost: u64,
    /// Packets without a sequence number the merge could read: dropped.
    pub malformed: u64,
    /// RTCP on an RTP merge: dropped (no part of the merged stream).
    #[serde(default)]
    pub rtcp: u64,
    /// Times a leg's new SSRC started the merge over.
    #[serde(default)]
    pub new_streams: u64,
    /// Packets of a leg still on the SSRC the merge left: dropped.
    #[serde(default)]
    pub stale: u64,
    pub legs: Vec<LegView>,
}

/// One leg of a merged rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegView {
    pub input: InputView,
    pub received: u64,
    /// Relayed from this leg: it brought the sequence number first.
    pub first: u64,
    /// Dropped: another leg had brought it.
    pub duplicate: u64,
    /// Sequence numbers this leg skipped: a failing path shows here first.
    pub gaps: u64,
}

impl LegView {
    /// The counters as `(name, value)`, in the order every view prints them.
    pub fn fields(&self) -> [(&'static str, u64); 4] {
        [
            ("received", self.received),
            ("first", self.first),
            ("duplicate", self.duplicate),
            ("gaps", self.gaps),
        ]
    }
}

impl MergeView {
    pub fn fields(&self) -> [(&'static str, u64); 6] {
        [
            ("relayed", self.relayed),
            ("lost", self.lost),
            ("malformed", self.malformed),
            ("rtcp", self.rtcp),
            ("new_streams", self.new_streams),
            ("stale", self.stale),
        ]
    }
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
    /// A unicast output's next-hop MAC, `unresolved` while the kernel has no neighbour entry
    /// for it, or `no route via IF` while the kernel routes the destination through another
    /// interface than the output's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<String>,
    /// The source the output writes, as `auto (198.18.2.1)` or the address the rule names;
    /// absent when it keeps the sender's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The UDP source port the output writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
    /// The UDP port it sends to; the received one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The TTL (IPv4) or hop limit (IPv6) it writes; the received one minus one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u8>,
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
                input: InputView::of(table, &r.inputs().next().expect("a rule has an input")),
                received: rc.packets,
                bytes: rc.bytes,
                checksum_completed: rc.checksum_completed,
                merge: r.merge.as_ref().map(|m| {
                    let counted = |i: usize| rc.merge.legs.get(i).copied().unwrap_or_default();
                    MergeView {
                        numbering: match m.sequence() {
                            crate::merge::Sequence::Rtp => "rtp".to_owned(),
                            crate::merge::Sequence::Counter { offset, bytes } => {
                                format!("counter of {bytes} bytes at offset {offset}")
                            }
                        },
                        window_ms: m.window_ms(),
                        relayed: rc.merge.relayed(),
                        lost: rc.merge.lost(),
                        malformed: rc.merge.malformed,
                        rtcp: rc.merge.rtcp,
                        new_streams: rc.merge.new_streams,
                        stale: rc.merge.stale,
                        legs: r
                            .inputs()
                            .enumerate()
                            .map(|(i, leg)| LegView {
                                input: InputView::of(table, &leg),
                                received: counted(i).received,
                                first: counted(i).first,
                                duplicate: counted(i).duplicate,
                                gaps: counted(i).gaps,
                            })
                            .collect(),
                    }
                }),
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
                            match o.next_hop.as_ref().map(|s| s.usable()) {
                                Some(Ok(m)) => crate::nexthop::MacDisplay(m).to_string(),
                                Some(Err(RewriteError::NoRouteVia)) => {
                                    format!("no route via {}", table.egress[o.egress].name)
                                }
                                _ => "unresolved".to_owned(),
                            }
                        }),
                        source: describe_source(&o.action),
                        source_port: o.action.source_port,
                        port: o.action.port.or(r.port),
                        ttl: o.action.ttl,
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
                            ("no_route_via", oc.no_route_via),
                            ("no_source", oc.no_source),
                            ("zero_checksum_fragment", oc.zero_checksum_fragment),
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
            relay: None,
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
            capture_dropped: stats.capture_dropped,
            kicks: stats.kicks,
            yields: stats.yields,
            queriers: Vec::new(),
            sockets: Vec::new(),
        }
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
                escape(&r.input.interface)
            )
        };
        // Two outputs may differ only in their VLAN, so it is part of the output's name.
        // A unicast output is labelled with its destination rather than a group.
        let ol = |r: &RuleView, o: &OutputView| {
            format!(
                "rule=\"{}\",output=\"{} {}{}\",interface=\"{}\",{}=\"{}\"",
                escape(&r.name),
                escape(&o.interface),
                endpoint(&o.group, o.port),
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
        let merged: Vec<&RuleView> = self.rules.iter().filter(|r| r.merge.is_some()).collect();
        if !merged.is_empty() {
            family(
                "relay_merge_packets_total",
                "counter",
                "A merged rule's packets: relayed (the first of each sequence number), lost (sequence numbers no leg carried), malformed (no sequence number to read: dropped), rtcp (RTCP on an RTP merge: dropped), new_streams (a leg's new SSRC started the merge over), stale (packets of a leg still on the SSRC the merge left: dropped).",
                merged
                    .iter()
                    .flat_map(|r| {
                        let m = r.merge.as_ref().expect("merged");
                        m.fields().map(|(counter, v)| {
                            (
                                format!("{{rule=\"{}\",counter=\"{counter}\"}}", escape(&r.name)),
                                v,
                            )
                        })
                    })
                    .collect(),
            );
            family(
                "relay_merge_leg_packets_total",
                "counter",
                "Each leg of a merged rule: received, first (relayed from this leg), duplicate (another leg was first), gaps (sequence numbers the leg skipped).",
                merged
                    .iter()
                    .flat_map(|r| {
                        let m = r.merge.as_ref().expect("merged");
                        m.legs.iter().enumerate().flat_map(move |(i, l)| {
                            l.fields().map(move |(counter, v)| {
                                (
                                    format!(
                                        "{{rule=\"{}\",leg=\"{i}\",interface=\"{}\",group=\"{}\",counter=\"{counter}\"}}",
                                        escape(&r.name),
                                        escape(&l.input.interface),
                                        l.input.group
                                    ),
                                    v,
                                )
                            })
                        })
                    })
                    .collect(),
            );
        }
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
        family(
            "relay_datapath_packets_total",
            "counter",
            "Frames the data path received and could not use (unmatched: no rule in userspace; malformed: not multicast UDP after all), and the fan-out copies it made (copies, of them cross_umem), and the frames relay capture could not queue (capture_dropped; they were forwarded).",
            [
                ("unmatched", self.unmatched),
                ("malformed", self.malformed),
                ("copies", self.copies),
                ("cross_umem", self.cross_umem),
                ("capture_dropped", self.capture_dropped),
            ]
            .into_iter()
            .map(|(k, v)| (format!("{{counter=\"{k}\"}}"), v))
            .collect(),
        );
        family(
            "relay_worker_events_total",
            "counter",
            "What the data path's workers did besides forwarding: TX kicks (kicks: sendto calls on AF_XDP sockets) and times a sleeping-mode worker that awaited only TX completions gave its CPU up (yields).",
            [("kicks", self.kicks), ("yields", self.yields)]
                .into_iter()
                .map(|(k, v)| (format!("{{event=\"{k}\"}}"), v))
                .collect(),
        );
        family(
            "relay_socket_packets_total",
            "counter",
            "The kernel's counters of each AF_XDP socket (XDP_STATISTICS): frames dropped before the relay saw them (rx_dropped, rx_ring_full), times the fill ring was empty (fill_ring_empty), invalid descriptors (rx_invalid, tx_invalid).",
            self.sockets
                .iter()
                .flat_map(|k| {
                    k.fields().into_iter().map(move |(c, v)| {
                        (
                            format!(
                                "{{interface=\"{}\",queue=\"{}\",counter=\"{c}\"}}",
                                escape(&k.interface),
                                k.queue
                            ),
                            v,
                        )
                    })
                })
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
        d.unmatched = 3;
        d.kicks = 40;
        d.yields = 2;
        d.malformed = 2;
        StatsView {
            sockets: vec![SocketCounters {
                interface: "in0".into(),
                queue: 1,
                ingress: true,
                rx_ring_full: 7,
                fill_ring_empty: 5,
                rx_dropped: 6,
                ..Default::default()
            }],
            ..StatsView::build(
                &t,
                &d,
                Some(&[12, 10, 10, 2, 0, 0, 0, 0, 0]),
                &pool,
                AllocatorKind::Lockfree,
            )
        }
    }

    /// A merged rule shows its legs and totals in every view: JSON, table, rules,
    /// Prometheus.
    #[test]
    fn merged_rules_show_their_legs() {
        let c = Config::parse(
            "t",
            "rules:\n  - name: feed\n    inputs: [{interface: in0, group: 239.1.1.1, port: 5000}, {interface: out1, group: 239.101.1.1, port: 5000}]\n    merge: {offset: 4, bytes: 8}\n    window_ms: 250\n    outputs: [{interface: out0}]\n",
        )
        .unwrap();
        let t = RuleTable::compile(&c, "t", &fake()).unwrap();
        let mut d = DatapathStats::new([1].into_iter());
        let m = &mut d.rules[0].merge;
        *m.leg(0) = crate::datapath::LegCounters {
            received: 90,
            first: 60,
            duplicate: 30,
            gaps: 10,
        };
        *m.leg(1) = crate::datapath::LegCounters {
            received: 95,
            first: 40,
            duplicate: 55,
            gaps: 5,
        };
        m.holes_opened = 3;
        m.holes_filled = 1;
        m.malformed = 2;
        m.rtcp = 7;
        m.new_streams = 1;
        m.stale = 3;
        let pool = PoolStats {
            capacity: 64,
            free: 60,
            low_water: 50,
            rejected: 0,
        };
        let v = StatsView::build(&t, &d, None, &pool, AllocatorKind::Mutex);
        let mv = v.rules[0].merge.as_ref().unwrap();
        assert_eq!(
            (mv.relayed, mv.lost, mv.malformed, mv.window_ms),
            (100, 2, 2, 250)
        );
        assert_eq!((mv.rtcp, mv.new_streams, mv.stale), (7, 1, 3));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["rules"][0]["merge"]["rtcp"], 7);
        assert_eq!(mv.numbering, "counter of 8 bytes at offset 4");
        assert_eq!(mv.legs[1].input.interface, "out1");
        assert_eq!(mv.legs[1].input.group, "239.101.1.1");
        let back: StatsView = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(back, v);
        let table = v.render_table();
        assert!(table.contains("leg 1"), "{table}");
        assert!(table.contains("first=40 duplicate=55 gaps=5"), "{table}");
        assert!(
            table.contains("relayed=100 lost=2 malformed=2 rtcp=7 new_streams=1 stale=3"),
            "{table}"
        );
        let rules = v.render_rules();
        assert!(rules.contains("out1 239.101.1.1:5000"), "{rules}");
        let p = v.render_prometheus();
        assert!(
            p.contains("relay_merge_packets_total{rule=\"feed\",counter=\"lost\"} 2\n"),
            "{p}"
        );
        for (counter, n) in [("rtcp", 7), ("new_streams", 1), ("stale", 3)] {
            assert!(
                p.contains(&format!(
                    "relay_merge_packets_total{{rule=\"feed\",counter=\"{counter}\"}} {n}\n"
                )),
                "{p}"
            );
        }
        assert!(
            p.contains("relay_merge_leg_packets_total{rule=\"feed\",leg=\"1\",interface=\"out1\",group=\"239.101.1.1\",counter=\"gaps\"} 5\n"),
            "{p}"
        );
        // Without merged rules the families are not there at all.
        let plain = StatsView {
            rules: Vec::new(),
            ..v
        };
        assert!(!plain.render_prometheus().contains("relay_merge"));
    }

    /// `relay stats` starts with the answering relay, and notes a namespace not the client's.
    #[test]
    fn the_table_names_the_relay_that_answered() {
        let mut v = view();
        assert_eq!(
            v.render_header(Some("net:[1]")),
            "",
            "no relay named: no header"
        );
        v.relay = Some(RelayId {
            config: "/etc/relay/rules.yaml".into(),
            pid: 42,
            netns: Some("net:[1]".into()),
        });
        assert_eq!(
            v.render_header(Some("net:[1]")),
            "relay pid 42, config /etc/relay/rules.yaml, network namespace net:[1]\n"
        );
        assert_eq!(
            v.render_header(Some("net:[2]")),
            "relay pid 42, config /etc/relay/rules.yaml, network namespace net:[1] (not this \
             command's: another relay than the one here may have answered)\n"
        );
        assert!(v.render_table().starts_with("relay pid 42, "));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["relay"]["pid"], 42);
        assert_eq!(json["relay"]["config"], "/etc/relay/rules.yaml");
        let id = RelayId::this(std::path::Path::new("rules.yaml"));
        assert!(std::path::Path::new(&id.config).is_absolute(), "{id:?}");
        assert_eq!(id.pid, std::process::id());
    }

    #[test]
    fn json_round_trips() {
        let v = view();
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<StatsView>(&json).unwrap(), v);
        assert_eq!(v.rules[0].input.to_string(), "in0 239.1.1.1:5000 vlan 10");
        assert_eq!(
            (v.rules[0].outputs[0].vlan, v.rules[0].outputs[1].vlan),
            (None, Some(30))
        );
        assert_eq!(v.rules[0].outputs[1].group, "239.2.2.2");
        assert_eq!(v.rules[0].outputs[1].port, Some(6000));
        // Numbers are numbers, and the input is its parts.
        let tree: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(tree["rules"][0]["outputs"][1]["port"], 6000);
        assert_eq!(tree["rules"][0]["outputs"][1]["vlan"], 30);
        assert_eq!(
            tree["rules"][0]["input"],
            serde_json::json!({"interface": "in0", "group": "239.1.1.1", "port": 5000, "vlan": 10})
        );
        assert_eq!(tree["sockets"][0]["rx_ring_full"], 7);
        assert_eq!(tree["unmatched"], 3);
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
        assert_eq!(v.rules[0].input.to_string(), "in0 239.10.0.0/16:5000");
        let table = v.render_table();
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("   . ") && l.contains(" 239.10.0.39 ")),
            "{table}"
        );
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
        t.set_next_hops(slots.clone());
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
        assert_eq!(v.rules[1].input.to_string(), "in0 198.18.1.2:7100");
        assert!(v.rules[1].input.unicast);
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

        // A destination the kernel routes through another interface: said, and counted apart.
        slots[1].set_no_route_via();
        d.rules[0].outputs[1].no_route_via = 3;
        let v = StatsView::build(&t, &d, None, &pool, AllocatorKind::Mutex);
        let o = &v.rules[0].outputs[1];
        assert_eq!(o.next_hop.as_deref(), Some("no route via out1"));
        assert_eq!(
            (o.dropped["no_route_via"], o.dropped["no_neighbour"]),
            (3, 5)
        );
        let table = v.render_table();
        assert!(
            table.contains("198.18.3.9:5000 (no route via out1)"),
            "{table}"
        );
        assert!(table.contains("no_route_via=3"), "{table}");
        assert!(
            v.render_prometheus()
                .contains("destination=\"198.18.3.9\",reason=\"no_route_via\"} 3"),
            "{}",
            v.render_prometheus()
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
        assert!(
            t.contains(
                "datapath: unmatched=3 malformed=2 copies=0 cross_umem=0 capture_dropped=0\n\
                 workers: kicks=40 yields=2\n"
            ),
            "{t}"
        );
        let prom = view().render_prometheus();
        assert!(
            prom.contains("relay_worker_events_total{event=\"kicks\"} 40\n"),
            "{prom}"
        );
        assert!(
            prom.contains("relay_worker_events_total{event=\"yields\"} 2\n"),
            "{prom}"
        );
        assert!(
            t.contains(
                "socket in0  queue 1  ingress  rx_dropped=6 rx_ring_full=7 fill_ring_empty=5 rx_invalid=0 tx_invalid=0\n"
            ),
            "{t}"
        );
    }

    /// Every row's numbers end in the same column, whatever the names, sources and
    /// addresses before them; IPv6 endpoints are in brackets.
    #[test]
    fn table_columns_align_with_long_names_sources_and_ipv6() {
        let c = Config::parse(
            "t",
            "rules:\n  - name: a-rather-long-rule-name-for-a-table\n    input: {interface: in0, group: ff18::1:1, port: 5000, source: 2001:2::1}\n    outputs: [{interface: out0, group: 'ff18::2:2', port: 6000}, {interface: out1}]\n  - name: s\n    input: {interface: in0, group: 239.1.1.1, source: 198.18.0.0/24}\n    outputs: [{interface: out0}]\n",
        )
        .unwrap();
        let t = RuleTable::compile(&c, "t", &fake()).unwrap();
        let mut d = DatapathStats::new([2, 1].into_iter());
        d.rules[0].packets = 123456789;
        d.rules[0].outputs[1].bytes = 7;
        d.rules[1].outputs[0].packets = 5;
        let pool = PoolStats {
            capacity: 64,
            free: 64,
            low_water: 64,
            rejected: 0,
        };
        let v = StatsView::build(&t, &d, None, &pool, AllocatorKind::Lockfree);
        assert_eq!(
            v.rules[0].input.to_string(),
            "in0 [ff18::1:1]:5000 from 2001:2::1"
        );
        assert_eq!(
            v.rules[1].input.to_string(),
            "in0 239.1.1.1:* from 198.18.0.0/24"
        );
        let table = v.render_table();
        let rows: Vec<&str> = table.lines().take(6).collect();
        assert!(rows[0].starts_with("RULE "), "{table}");
        assert!(rows[2].contains("[ff18::2:2]:6000"), "{table}");
        assert!(rows[3].contains("[ff18::1:1]:5000"), "{table}");
        assert!(rows[5].contains("239.1.1.1:*"), "{table}");
        // The BYTES column ends at the same place on every row: the header's, the rules'
        // and the outputs'.
        let end = rows[0].find("BYTES").unwrap() + "BYTES".len();
        for row in &rows[1..] {
            let before_notes = row.split("  dropped").next().unwrap();
            assert_eq!(before_notes.trim_end().len(), end, "{row:?} in\n{table}");
        }
        // And PACKETS too.
        let packets = rows[0].find("PACKETS").unwrap() + "PACKETS".len();
        assert_eq!(&rows[1][packets - 9..packets], "123456789", "{table}");
    }

    /// `relay rules`: where each output sends and what it does to the frames.
    #[test]
    fn rules_table_shows_ttl_remap_and_rewrites() {
        let c = Config::parse(
            "t",
            "rules:\n  - name: gw\n    input: {interface: in0, group: 239.1.1.1, port: 5000, vlan: 10}\n    outputs: [{interface: out0, group: 239.2.2.2, port: 6000, ttl: 5, vlan: 30, dscp: 46}, {interface: out1, destination: 198.18.3.9, source: 198.18.12.1, source_port: 7001}]\n  - name: v6\n    input: {interface: in0, group: ff18::1:1, port: 5000}\n    outputs: [{interface: out0, hop_limit: 9, on_demand: true}]\n",
        )
        .unwrap();
        let t = RuleTable::compile(&c, "t", &fake()).unwrap();
        let d = DatapathStats::new([2, 1].into_iter());
        let pool = PoolStats {
            capacity: 64,
            free: 64,
            low_water: 64,
            rejected: 0,
        };
        let v = StatsView::build(&t, &d, None, &pool, AllocatorKind::Lockfree);
        assert_eq!(v.rules[0].outputs[0].ttl, Some(5));
        let r = v.render_rules();
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines.len(), 6, "{r}");
        assert!(
            lines[1].starts_with("gw ") && lines[1].ends_with("in0 239.1.1.1:5000 vlan 10"),
            "{r}"
        );
        let settings = lines[0].find("SETTINGS").unwrap();
        assert_eq!(
            (&lines[2][..12], &lines[2][settings..]),
            (
                "  -> out0  2",
                "ttl 5, remapped from 239.1.1.1:5000, vlan 30, dscp 46"
            ),
            "{r}"
        );
        assert!(lines[2].contains("  239.2.2.2:6000 "), "{r}");
        assert_eq!(
            &lines[3][settings..],
            "ttl received-1, remapped from 239.1.1.1:5000, unicast via unresolved, source 198.18.12.1, source_port 7001",
            "{r}"
        );
        assert!(lines[3].contains("  198.18.3.9:5000 "), "{r}");
        assert_eq!(&lines[5][settings..], "hop_limit 9, on_demand", "{r}");
        assert!(lines[5].contains("  [ff18::1:1]:5000 "), "{r}");
        let empty = StatsView {
            rules: Vec::new(),
            ..v
        };
        assert!(
            empty
                .render_rules()
                .starts_with("no rules: the relay is idle")
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
        assert!(
            p.contains("relay_datapath_packets_total{counter=\"unmatched\"} 3\n"),
            "{p}"
        );
        assert!(
            p.contains("relay_datapath_packets_total{counter=\"malformed\"} 2\n"),
            "{p}"
        );
        assert!(
            p.contains(
                "relay_socket_packets_total{interface=\"in0\",queue=\"1\",counter=\"rx_ring_full\"} 7\n"
            ),
            "{p}"
        );
        assert!(
            p.contains(
                "relay_socket_packets_total{interface=\"in0\",queue=\"1\",counter=\"fill_ring_empty\"} 5\n"
            ),
            "{p}"
        );
        assert!(
            p.contains(
                "relay_socket_packets_total{interface=\"in0\",queue=\"1\",counter=\"rx_dropped\"} 6\n"
            ),
            "{p}"
        );
        assert!(
            p.contains("# TYPE relay_socket_packets_total counter"),
            "{p}"
        );
        // Every sample line is `name{labels} value` or `name value`.
        for line in p.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
    }
}
