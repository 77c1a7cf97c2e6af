//! The compiled rule table: what the XDP program's maps hold, and what the data path looks up
//! for each redirected frame.

use std::{net::IpAddr, sync::Arc};

use rustc_hash::FxHashMap;

use relay_common::{
    RuleKey, RuleValue, SHAPE_RANGES, SHAPE_UNICAST, TUPLE_PORT, TUPLE_V4, TUPLE_VLAN, Tuple,
    VLAN_ANY, frame_vlan, v4_mapped,
};

use crate::{
    config::{
        Config, ConfigError, DEFAULT_WINDOW_MS, Input, InterfaceInfo, SourceSpec, System,
        auto_source,
    },
    merge::{DEFAULT_SLOTS, MergeState},
    nexthop::NextHopSlot,
    ondemand::{ListenKey, ListenSlot},
    prefix::Prefix,
    rewrite::OutputAction,
    vlan::Vlan,
    wire::Flow,
};

/// An interface the relay receives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingress {
    pub name: String,
    pub info: InterfaceInfo,
}

/// An interface the relay transmits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub name: String,
    pub info: InterfaceInfo,
}

#[derive(Debug, Clone)]
pub struct CompiledOutput {
    /// Index into [`RuleTable::egress`].
    pub egress: usize,
    pub action: OutputAction,
    /// For a unicast `destination:`, where the data path reads the next hop's MAC: filled by
    /// [`RuleTable::unicast_targets`]' caller (the neighbour tracker) before the table is
    /// used; `None` until then, and for group outputs.
    pub next_hop: Option<Arc<NextHopSlot>>,
    /// `on_demand: true`: frames go out only while [`CompiledOutput::listening`] says a
    /// listener wants them.
    pub on_demand: bool,
    /// For an on-demand output, where the data path reads whether it has listeners: filled
    /// by the querier ([`RuleTable::set_listeners`]); `None` until then (nothing is sent),
    /// and for outputs that are always on.
    pub listening: Option<Arc<ListenSlot>>,
}

impl PartialEq for CompiledOutput {
    fn eq(&self, other: &Self) -> bool {
        fn same<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            }
        }
        self.egress == other.egress
            && self.action == other.action
            && same(&self.next_hop, &other.next_hop)
            && self.on_demand == other.on_demand
            && same(&self.listening, &other.listening)
    }
}

impl CompiledOutput {
    /// An on-demand output that has no listener now.
    pub fn unwanted(&self) -> bool {
        self.on_demand && !self.listening.as_ref().is_some_and(|l| l.on())
    }

    /// An on-demand output whose listeners want no frame from `source` now. An output whose
    /// frames carry another source (a rewritten `source:`) has a slot that is on or off for
    /// that one, whatever the frame's.
    pub fn unwanted_from(&self, source: IpAddr) -> bool {
        self.on_demand && !self.listening.as_ref().is_some_and(|l| l.wants(source))
    }
}

impl Eq for CompiledOutput {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRule {
    pub name: String,
    pub ingress_ifindex: u32,
    /// The destination the input matches: a group (the first of a range), or a unicast
    /// address (`unicast`).
    pub group: IpAddr,
    /// The input's groups: `group` and its length (a single group's is 32 or 128).
    pub prefix: Prefix,
    /// The input is a unicast `destination:`: no group to join.
    pub unicast: bool,
    pub port: Option<u16>,
    pub source: Option<Prefix>,
    /// The input's `vlan:`: any VLAN or none when absent.
    pub vlan: Option<Vlan>,
    /// A merged rule's legs after the first (whose fields are the ones above).
    pub legs: Vec<CompiledInput>,
    /// A merged rule's shared state: which sequence numbers went out, and when.
    pub merge: Option<Arc<MergeState>>,
    pub outputs: Vec<CompiledOutput>,
}

/// One input of a rule, as compiled: a merged rule has several (its legs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompiledInput {
    pub ifindex: u32,
    pub group: IpAddr,
    pub prefix: Prefix,
    pub unicast: bool,
    pub port: Option<u16>,
    pub source: Option<Prefix>,
    pub vlan: Option<Vlan>,
}

impl CompiledRule {
    /// The rule's inputs: its own, then a merged rule's other legs.
    pub fn inputs(&self) -> impl Iterator<Item = CompiledInput> + '_ {
        std::iter::once(CompiledInput {
            ifindex: self.ingress_ifindex,
            group: self.group,
            prefix: self.prefix,
            unicast: self.unicast,
            port: self.port,
            source: self.source,
            vlan: self.vlan,
        })
        .chain(self.legs.iter().copied())
    }

    /// The leg a frame of this rule arrived on: of those whose interface, destination,
    /// source, port and VLAN it has, the most specific, as the lookup ranks keys (a VLAN
    /// over none, then the longer group prefix, the longer source prefix, a port over none);
    /// 0 for a rule with one input. Legs on one trunk that differ only by VID, or on one
    /// link only by source, are told apart.
    pub fn leg_of(&self, ifindex: u32, flow: &Flow) -> usize {
        if self.legs.is_empty() {
            return 0;
        }
        self.inputs()
            .enumerate()
            .filter(|(_, i)| {
                i.ifindex == ifindex
                    && i.prefix.contains(flow.group)
                    && i.port.is_none_or(|p| p == flow.port)
                    && i.source.is_none_or(|s| s.contains(flow.source))
                    && crate::vlan::Vlan::takes(i.vlan, flow.tci)
            })
            .max_by_key(|(n, i)| {
                (
                    i.vlan.is_some(),
                    i.prefix.len,
                    i.source.map_or(0, |s| s.len + 1),
                    i.port.is_some(),
                    std::cmp::Reverse(*n),
                )
            })
            .map_or(0, |(n, _)| n)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleTable {
    pub rules: Vec<CompiledRule>,
    pub ingress: Vec<Ingress>,
    pub egress: Vec<Egress>,
    /// Looked up for every relayed frame. FxHash rather than SipHash: the profile under load
    /// showed SipHash as a third of the relay's own CPU time, and a lookup key from the wire
    /// cannot grow this table (only the config fills it), so flooding it is not a concern.
    keys: FxHashMap<MapKey, u32>,
    /// The tuples (forms of key) the keys have, most specific first: what a lookup walks,
    /// here and in the XDP program, and nothing else, so a rule set without sources or
    /// VLANs costs one hash lookup per frame.
    tuples: Vec<Tuple>,
}

impl RuleTable {
    /// Compiles a validated configuration against the running system.
    pub fn compile(cfg: &Config, file: &str, sys: &dyn System) -> Result<Self, ConfigError> {
        cfg.validate(file, sys)?;
        Ok(Self::compile_valid(cfg, sys))
    }

    /// Compiles the running rules again after their interfaces or addresses changed (see
    /// [`Config::validate_running`]): a `source: auto` with no address to stand for now
    /// compiles to an output that drops its frames as `no_source`.
    pub fn compile_running(
        cfg: &Config,
        file: &str,
        sys: &dyn System,
    ) -> Result<Self, ConfigError> {
        cfg.validate_running(file, sys)?;
        Ok(Self::compile_valid(cfg, sys))
    }

    fn compile_valid(cfg: &Config, sys: &dyn System) -> Self {
        let mut table = RuleTable::default();
        for (id, rule) in cfg.rules.iter().enumerate() {
            // An interface that does not exist (yet) gets ifindex 0: its rules are idle (no
            // socket, no XDP, no map key) until the interface appears and the running rules
            // are applied again (`watch_interfaces`).
            let in_info = sys
                .interface(&rule.input.interface)
                .unwrap_or_else(InterfaceInfo::absent);
            if !table.ingress.iter().any(|i| i.name == rule.input.interface) {
                table.ingress.push(Ingress {
                    name: rule.input.interface.clone(),
                    info: in_info,
                });
            }
            for leg in &rule.legs {
                if !table.ingress.iter().any(|i| i.name == leg.interface) {
                    table.ingress.push(Ingress {
                        name: leg.interface.clone(),
                        info: sys
                            .interface(&leg.interface)
                            .unwrap_or_else(InterfaceInfo::absent),
                    });
                }
            }
            let address = rule.input.address();
            // A merged stream goes out as its first leg: frames of the others get its group
            // and port unless the output names its own.
            let merged = !rule.legs.is_empty();
            let mut outputs = Vec::with_capacity(rule.outputs.len());
            for out in &rule.outputs {
                let info = sys
                    .interface(&out.interface)
                    .unwrap_or_else(InterfaceInfo::absent);
                let egress = match table.egress.iter().position(|e| e.name == out.interface) {
                    Some(i) => i,
                    None => {
                        table.egress.push(Egress {
                            name: out.interface.clone(),
                            info,
                        });
                        table.egress.len() - 1
                    }
                };
                let source = match out.source {
                    Some(SourceSpec::Address(a)) => Some(a),
                    Some(SourceSpec::Auto) => {
                        auto_source(&sys.addresses(&out.interface), address.is_ipv4())
                    }
                    None => None,
                };
                outputs.push(CompiledOutput {
                    egress,
                    action: OutputAction {
                        group: out
                            .group
                            .or((merged && out.destination.is_none()).then(|| rule.input.prefix())),
                        port: out.port.or(if merged { rule.input.port } else { None }),
                        ttl: out.ttl,
                        vlan: out.vlan.and_then(Vlan::vid),
                        dscp: out.dscp,
                        destination: out.destination,
                        source_spec: out.source,
                        source,
                        source_port: out.source_port,
                        ..OutputAction::plain(info.mac)
                    },
                    next_hop: None,
                    on_demand: out.on_demand,
                    listening: None,
                });
            }
            let mut legs = Vec::with_capacity(rule.legs.len());
            for input in rule.inputs() {
                let info = sys
                    .interface(&input.interface)
                    .unwrap_or_else(InterfaceInfo::absent);
                let tuple = input_tuple(input);
                let key = RuleKey::new(
                    info.ifindex,
                    key_addr(input.address()),
                    input.source.map_or([0; 16], |s| key_addr(s.network())),
                    input.port.unwrap_or(0),
                )
                .with_vlan(input.vlan.map_or(VLAN_ANY, Vlan::key))
                .with_lengths(tuple.glen, tuple.slen);
                // A leg whose interface does not exist yet receives nothing until it does;
                // the others carry the stream meanwhile.
                if info.exists() {
                    table.keys.insert(MapKey(key), id as u32);
                    table.tuples.push(tuple);
                }
                legs.push(CompiledInput {
                    ifindex: info.ifindex,
                    group: input.address(),
                    prefix: input.prefix(),
                    unicast: input.destination.is_some(),
                    port: input.port,
                    source: input.source,
                    vlan: input.vlan,
                });
            }
            legs.remove(0);
            let merge = rule.sequence().map(|sequence| {
                Arc::new(MergeState::new(
                    sequence,
                    1 + rule.legs.len(),
                    rule.window_ms.unwrap_or(DEFAULT_WINDOW_MS),
                    DEFAULT_SLOTS,
                ))
            });
            table.rules.push(CompiledRule {
                name: rule.name.clone(),
                ingress_ifindex: in_info.ifindex,
                group: address,
                prefix: rule.input.prefix(),
                unicast: rule.input.destination.is_some(),
                port: rule.input.port,
                source: rule.input.source,
                vlan: rule.input.vlan,
                legs,
                merge,
                outputs,
            });
        }
        table.tuples = merge_tuples(&table.tuples, &[]);
        table
    }

    /// Takes over the merge state of each merged rule `old` has the same way (name, legs,
    /// numbering, window): a reload must not forget which sequence numbers went out.
    pub fn keep_merge_state(&mut self, old: &RuleTable) {
        for r in self.rules.iter_mut().filter(|r| r.merge.is_some()) {
            let same = old.rules.iter().find(|o| {
                o.name == r.name
                    && o.merge == r.merge
                    && o.inputs()
                        .map(|i| (i.group, i.port, i.vlan))
                        .eq(r.inputs().map(|i| (i.group, i.port, i.vlan)))
            });
            if let Some(o) = same {
                r.merge.clone_from(&o.merge);
            }
        }
    }

    /// The name of the ingress interface with this index (`?` if none has it).
    pub fn ingress_name(&self, ifindex: u32) -> &str {
        self.ingress
            .iter()
            .find(|i| i.info.ifindex == ifindex)
            .map_or("?", |i| i.name.as_str())
    }

    /// The entries of the XDP program's rule map.
    pub fn bpf_entries(&self) -> impl Iterator<Item = (RuleKey, RuleValue)> + '_ {
        self.keys
            .iter()
            .map(|(k, &rule_id)| (k.0, RuleValue { rule_id, slot: 0 }))
    }

    /// The `SHAPE_*` bits of the keys in the rule map: which of the eight exact lookups can
    /// hit, [`SHAPE_UNICAST`] when some key is a unicast destination, and [`SHAPE_RANGES`]
    /// when some key is a range (then the program walks [`RuleTable::tuples`] instead).
    /// The tuple count and half bits are the loader's.
    pub fn shapes(&self) -> u32 {
        let ranges = if self.has_ranges() { SHAPE_RANGES } else { 0 };
        self.keys.keys().map(|k| &k.0).fold(ranges, |s, k| {
            let unicast = !IpAddr::from(k.group).to_canonical().is_multicast();
            let exact = Tuple::new(k.glen, k.slen, 0).is_exact();
            s | if exact { k.shape() } else { 0 } | if unicast { SHAPE_UNICAST } else { 0 }
        })
    }

    /// The tuples of the rule map's keys, most specific first (see [`Tuple::precedence`]).
    pub fn tuples(&self) -> &[Tuple] {
        &self.tuples
    }

    /// Some key is a group range or a source prefix.
    pub fn has_ranges(&self) -> bool {
        self.tuples.iter().any(|t| !t.is_exact())
    }

    /// The (egress ifindex, destination) of every unicast output whose interface exists, in
    /// the order [`RuleTable::set_next_hops`] takes their slots.
    pub fn unicast_targets(&self) -> Vec<(u32, IpAddr)> {
        self.unicast_outputs()
            .map(|(o, ifindex)| (ifindex, o.action.destination.expect("a unicast output")))
            .collect()
    }

    /// Gives the unicast outputs their next-hop slots, one per [`RuleTable::unicast_targets`]
    /// entry, in its order.
    pub fn set_next_hops(&mut self, slots: Vec<Arc<NextHopSlot>>) {
        let egress: Vec<u32> = self.egress.iter().map(|e| e.info.ifindex).collect();
        let mut slots = slots.into_iter();
        for o in self.rules.iter_mut().flat_map(|r| r.outputs.iter_mut()) {
            if o.action.destination.is_some() && egress[o.egress] != 0 {
                o.next_hop = slots.next();
            }
        }
    }

    /// What each on-demand output whose interface exists listens for, in the order
    /// [`RuleTable::set_listeners`] takes their slots: its interface, the group it sends to
    /// there, and the source its frames carry when listeners may pick sources (a rewritten
    /// source, or the rule's exact input source).
    pub fn listen_targets(&self) -> Vec<ListenKey> {
        self.rules
            .iter()
            .flat_map(|r| r.outputs.iter().map(move |o| (r, o)))
            .filter(|(_, o)| o.on_demand)
            .filter_map(|(r, o)| {
                let ifindex = self.egress[o.egress].info.ifindex;
                (ifindex != 0).then(|| ListenKey {
                    ifindex,
                    group: o.action.group.map_or(r.group, |g| g.network()),
                    source: o
                        .action
                        .source
                        .or(r.source.filter(|s| s.is_host()).map(|s| s.network())),
                })
            })
            .collect()
    }

    /// Gives the on-demand outputs their slots, one per [`RuleTable::listen_targets`]
    /// entry, in its order.
    pub fn set_listeners(&mut self, slots: Vec<Arc<ListenSlot>>) {
        let egress: Vec<u32> = self.egress.iter().map(|e| e.info.ifindex).collect();
        let mut slots = slots.into_iter();
        for o in self.rules.iter_mut().flat_map(|r| r.outputs.iter_mut()) {
            if o.on_demand && egress[o.egress] != 0 {
                o.listening = slots.next();
            }
        }
    }

    fn unicast_outputs(&self) -> impl Iterator<Item = (&CompiledOutput, u32)> {
        self.rules
            .iter()
            .flat_map(|r| r.outputs.iter())
            .filter(|o| o.action.destination.is_some())
            .map(|o| (o, self.egress[o.egress].info.ifindex))
            .filter(|&(_, ifindex)| ifindex != 0)
    }

    /// The rule for a frame that arrived on `ifindex`, in the XDP program's order: the
    /// tuples of the frame's family, most specific first (the frame's VLAN before any VLAN,
    /// then the longer group prefix, the longer source prefix, a port before any), the
    /// frame's group and source masked to each tuple's lengths; the first hit.
    pub fn lookup(&self, ifindex: u32, flow: &Flow) -> Option<u32> {
        let family = if flow.group.is_ipv4() { TUPLE_V4 } else { 0 };
        let group = u128::from_ne_bytes(key_addr(flow.group));
        let source = u128::from_ne_bytes(key_addr(flow.source));
        let (port, vlan) = (flow.port.to_be_bytes(), frame_vlan(flow.tci));
        self.tuples
            .iter()
            .filter(|t| t.flags & TUPLE_V4 == family)
            .find_map(|t| {
                let key = RuleKey {
                    ifindex,
                    group: (group & u128::from_ne_bytes(t.group_mask)).to_ne_bytes(),
                    source: (source & u128::from_ne_bytes(t.source_mask)).to_ne_bytes(),
                    port: if t.flags & TUPLE_PORT != 0 {
                        port
                    } else {
                        [0; 2]
                    },
                    vlan: if t.flags & TUPLE_VLAN != 0 {
                        vlan
                    } else {
                        VLAN_ANY
                    },
                    glen: t.glen,
                    slen: t.slen,
                    pad: 0,
                };
                self.keys.get(&MapKey(key)).copied()
            })
    }
}

/// A rule key as the table's map holds it: hashed as six words rather than field by field
/// (the derived hash writes each field and each array's length on its own, a dozen rounds),
/// as it is hashed once per tuple for every relayed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapKey(RuleKey);

impl std::hash::Hash for MapKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let k = &self.0;
        let word = |b: &[u8; 16], half: usize| {
            u64::from_ne_bytes(b[half * 8..half * 8 + 8].try_into().expect("8 bytes"))
        };
        state.write_u64(
            u64::from(k.ifindex)
                | u64::from(u16::from_ne_bytes(k.port)) << 32
                | u64::from(k.vlan) << 48,
        );
        state.write_u64(word(&k.group, 0));
        state.write_u64(word(&k.group, 1));
        state.write_u64(word(&k.source, 0));
        state.write_u64(word(&k.source, 1));
        state.write_u64(u64::from(k.glen) | u64::from(k.slen) << 8 | u64::from(k.pad) << 16);
    }
}

/// The tuple of an input's key: its VLAN or any, its group (or destination) prefix length,
/// its source prefix length (0 for any), its port or any, its family. The config's
/// validation counts these too, as the XDP program walks at most
/// [`relay_common::MAX_TUPLES`] of them.
pub fn input_tuple(input: &Input) -> Tuple {
    let prefix = input.prefix();
    let flags = if input.vlan.is_some() { TUPLE_VLAN } else { 0 }
        | if input.port.is_some() { TUPLE_PORT } else { 0 }
        | if prefix.addr.is_ipv4() { TUPLE_V4 } else { 0 };
    Tuple::new(
        prefix.key_len(),
        input.source.map_or(0, |s| s.key_len()),
        flags,
    )
}

/// The tuples of both lists, each once, most specific first: what the program walks while
/// a reload has both tables' keys in the rule map (and, with `b` empty, one list sorted).
pub fn merge_tuples(a: &[Tuple], b: &[Tuple]) -> Vec<Tuple> {
    let mut all: Vec<Tuple> = a.iter().chain(b).copied().collect();
    all.sort_by_key(Tuple::precedence);
    all.dedup();
    all
}

/// An address as the rule map's keys hold it: IPv6 as is, IPv4 mapped into IPv6.
pub fn key_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Input, Output, Rule, tests::fake};
    use proptest::prelude::*;

    /// What each on-demand output listens for: the group after remapping, and the source
    /// its frames carry (rewritten, or the rule's exact source; none for any source or a
    /// source prefix); always-on outputs listen for nothing; slots go back in that order.
    #[test]
    fn on_demand_outputs_listen_for_what_they_send() {
        let yaml = "rules:
  - name: a
    input: { interface: in0, group: 239.1.1.1, port: 5000 }
    outputs:
      - { interface: out0, on_demand: true }
      - { interface: out1 }
      - { interface: out1, group: 239.9.9.9, on_demand: true }
      - { interface: out1, port: 6000, source: auto, on_demand: true }
  - name: b
    input: { interface: in0, group: 'ff18::1', source: '2001:2::7' }
    outputs: [ { interface: out0, on_demand: true } ]
  - name: c
    input: { interface: in0, group: 239.2.2.2, source: 198.18.7.0/24 }
    outputs: [ { interface: out0, on_demand: true } ]
";
        let cfg = Config::parse("r.yaml", yaml).unwrap();
        let mut t = RuleTable::compile(&cfg, "r.yaml", &fake()).unwrap();
        let key = |ifindex, group: &str, source: Option<&str>| ListenKey {
            ifindex,
            group: group.parse().unwrap(),
            source: source.map(|s| s.parse().unwrap()),
        };
        let want = vec![
            key(11, "239.1.1.1", None),
            key(12, "239.9.9.9", None),
            // out1 (ifindex 12) is 198.18.12.1 in the fake system.
            key(12, "239.1.1.1", Some("198.18.12.1")),
            key(11, "ff18::1", Some("2001:2::7")),
            key(11, "239.2.2.2", None),
        ];
        assert_eq!(t.listen_targets(), want);
        let slots: Vec<Arc<ListenSlot>> = want.iter().map(|_| Arc::default()).collect();
        t.set_listeners(slots.clone());
        let got: Vec<&Arc<ListenSlot>> = t
            .rules
            .iter()
            .flat_map(|r| &r.outputs)
            .filter_map(|o| o.listening.as_ref())
            .collect();
        assert_eq!(got.len(), slots.len());
        assert!(got.iter().zip(&slots).all(|(a, b)| Arc::ptr_eq(a, b)));
        let a = &t.rules[0].outputs;
        assert!(
            a[0].unwanted() && !a[1].unwanted(),
            "off until a listener comes"
        );
        slots[0].set(true);
        assert!(!a[0].unwanted());
    }

    fn flow(group: [u8; 4], source: [u8; 4], port: u16) -> Flow {
        Flow {
            tci: None,
            l3: 14,
            l4: 34,
            source: source.into(),
            group: group.into(),
            port,
            frag: None,
        }
    }

    fn rule(name: String, group: [u8; 4], port: Option<u16>, source: Option<[u8; 4]>) -> Rule {
        prefix_rule(name, group.into(), port, source.map(Into::into), None)
    }

    fn prefix_rule(
        name: String,
        group: Prefix,
        port: Option<u16>,
        source: Option<Prefix>,
        vlan: Option<Vlan>,
    ) -> Rule {
        Rule {
            name,
            input: Input {
                interface: "in0".into(),
                group: Some(group),
                destination: None,
                port,
                source,
                vlan,
            },
            legs: Vec::new(),
            merge: None,
            window_ms: None,
            outputs: vec![Output {
                interface: "out0".into(),
                group: None,
                destination: None,
                port: None,
                ttl: None,
                vlan: None,
                dscp: None,
                source: None,
                source_port: None,
                on_demand: false,
            }],
        }
    }

    fn config(rules: Vec<Rule>) -> Config {
        Config::parse("t", "rules: []")
            .map(|c| Config { rules, ..c })
            .unwrap()
    }

    /// The table of a config file's text, on the fake system's interfaces.
    fn compiled(yaml: &str) -> RuleTable {
        RuleTable::compile(&Config::parse("t", yaml).unwrap(), "t", &fake()).unwrap()
    }

    #[test]
    fn compiles_interfaces_and_actions() {
        let mut c = config(vec![rule("a".into(), [239, 1, 1, 1], Some(5000), None)]);
        c.rules[0].outputs.push(Output {
            interface: "out1".into(),
            group: Some([239, 2, 2, 2].into()),
            port: Some(6000),
            ttl: Some(3),
            vlan: Some(Vlan::Id(30)),
            dscp: Some(46),
            destination: None,
            source: None,
            source_port: None,
            on_demand: false,
        });
        let t = RuleTable::compile(&c, "t", &fake()).unwrap();
        assert_eq!(t.ingress.len(), 1);
        assert_eq!(t.ingress[0].info.ifindex, 10);
        assert_eq!(
            t.egress.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["out0", "out1"]
        );
        let o = &t.rules[0].outputs[1];
        assert_eq!(o.egress, 1);
        assert_eq!(o.action.src_mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(
            (o.action.port, o.action.ttl, o.action.vlan),
            (Some(6000), Some(3), Some(30))
        );
        assert_eq!(t.rules[0].outputs[0].action.vlan, None);
        assert_eq!(t.bpf_entries().count(), 1);
        assert_eq!(
            t.lookup(10, &flow([239, 1, 1, 1], [1, 2, 3, 4], 5000)),
            Some(0)
        );
        assert_eq!(
            t.lookup(10, &flow([239, 1, 1, 1], [1, 2, 3, 4], 5001)),
            None
        );
        assert_eq!(
            t.lookup(11, &flow([239, 1, 1, 1], [1, 2, 3, 4], 5000)),
            None
        );
    }

    /// A unicast input is a key like a group's, looked up with the frame's destination; it
    /// sets the unicast shape bit only when some rule has one, and its unicast outputs get
    /// their next-hop slots in order.
    #[test]
    fn unicast_inputs_and_outputs_compile() {
        let yaml = "rules:\n  - name: a\n    input: {interface: in0, group: 239.1.1.1, port: 5000}\n    outputs: [{interface: out0, destination: 198.18.2.2, source: auto}, {interface: out1}, {interface: out1, destination: 198.18.3.2}]\n  - name: b\n    input: {interface: in0, destination: 198.18.1.2, port: 7100}\n    outputs: [{interface: out1, group: 239.5.5.5, source: auto, source_port: 7001}]\n";
        let c = Config::parse("t", yaml).unwrap();
        let mut t = RuleTable::compile(&c, "t", &fake()).unwrap();
        assert_eq!(
            t.shapes(),
            relay_common::SHAPE_PORT | SHAPE_UNICAST,
            "two (*,G,port) keys, one of them unicast"
        );
        let only_groups = Config::parse("t", &yaml[..yaml.find("  - name: b").unwrap()]).unwrap();
        assert_eq!(
            RuleTable::compile(&only_groups, "t", &fake())
                .unwrap()
                .shapes(),
            relay_common::SHAPE_PORT
        );
        assert!(t.rules[1].unicast && !t.rules[0].unicast);
        assert_eq!(
            t.lookup(10, &flow([198, 18, 1, 2], [198, 18, 1, 1], 7100)),
            Some(1)
        );
        assert_eq!(
            t.lookup(10, &flow([198, 18, 1, 2], [198, 18, 1, 1], 7101)),
            None
        );
        // `auto`: the egress's first address of the family (out0 is ifindex 11, out1 12).
        let a = &t.rules[0].outputs[0].action;
        assert_eq!(a.source, Some(IpAddr::from([198, 18, 11, 1])));
        assert_eq!(a.destination, Some(IpAddr::from([198, 18, 2, 2])));
        assert_eq!(
            t.rules[1].outputs[0].action.source,
            Some(IpAddr::from([198, 18, 12, 1]))
        );
        assert_eq!(t.rules[1].outputs[0].action.source_port, Some(7001));
        let targets = t.unicast_targets();
        assert_eq!(
            targets,
            [
                (11, IpAddr::from([198, 18, 2, 2])),
                (12, IpAddr::from([198, 18, 3, 2]))
            ]
        );
        let slots: Vec<_> = targets
            .iter()
            .map(|_| Arc::new(NextHopSlot::new()))
            .collect();
        t.set_next_hops(slots.clone());
        let got: Vec<_> = t.rules[0]
            .outputs
            .iter()
            .map(|o| o.next_hop.clone())
            .collect();
        assert!(Arc::ptr_eq(got[0].as_ref().unwrap(), &slots[0]));
        assert!(got[1].is_none());
        assert!(Arc::ptr_eq(got[2].as_ref().unwrap(), &slots[1]));
        assert!(t.rules[1].outputs[0].next_hop.is_none());
    }

    /// Whether an input's `vlan:` takes a frame with this tag control word (VID 0 is a
    /// priority tag: untagged). Written out here, not `Vlan::takes`: the reference model
    /// must not share the code it checks.
    pub(crate) fn vlan_covers(vlan: Option<Vlan>, tci: Option<u16>) -> bool {
        let vid = tci.map(|t| t & 0x0fff).filter(|&v| v != 0);
        match vlan {
            None => true,
            Some(Vlan::Untagged) => vid.is_none(),
            Some(Vlan::Id(v)) => vid == Some(v),
        }
    }

    /// The reference model, by brute force over the rules: among those whose input covers
    /// the frame (group inside its prefix, source inside its prefix or none, port equal or
    /// none, VLAN covered or none), the most specific: one with a VLAN over one without, then
    /// the longest group prefix, then the longest source prefix (none is /0), then one with
    /// a port over one without. Validation refuses two inputs that would tie.
    pub(crate) fn model(rules: &[Rule], f: &Flow) -> Option<u32> {
        rules
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.input.prefix().contains(f.group)
                    && r.input.port.is_none_or(|p| p == f.port)
                    && r.input.source.is_none_or(|s| s.contains(f.source))
                    && vlan_covers(r.input.vlan, f.tci)
            })
            .max_by_key(|(_, r)| {
                (
                    r.input.vlan.is_some(),
                    r.input.prefix().len,
                    r.input.source.map_or(0, |s| s.len),
                    r.input.port.is_some(),
                )
            })
            .map(|(i, _)| i as u32)
    }

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    /// Nested and neighbouring group ranges and single groups, per family.
    const GROUPS: [[&str; 6]; 2] = [
        [
            "239.0.0.0/8",
            "239.10.0.0/16",
            "239.10.3.0/24",
            "239.10.3.4",
            "239.10.9.9",
            "239.11.0.0/16",
        ],
        [
            "ff18::/16",
            "ff18::10:0/112",
            "ff18::10:300/120",
            "ff18::10:304",
            "ff18::10:909",
            "ff18:1::/32",
        ],
    ];
    /// Nested source prefixes and single sources, per family.
    const SOURCES: [[&str; 5]; 2] = [
        [
            "198.18.0.0/15",
            "198.18.7.0/24",
            "198.18.7.1",
            "198.18.8.0/24",
            "198.18.7.0/25",
        ],
        [
            "2001:2::/32",
            "2001:2:0:7::/64",
            "2001:2:0:7::1",
            "2001:2:0:8::/64",
            "2001:2:0:7::/65",
        ],
    ];
    /// Probe groups: inside one range or several, single groups, and outside every range.
    const PROBE_GROUPS: [[&str; 7]; 2] = [
        [
            "239.10.3.4",
            "239.10.3.5",
            "239.10.9.9",
            "239.11.2.2",
            "239.1.1.1",
            "238.1.1.1",
            "239.10.3.200",
        ],
        [
            "ff18::10:304",
            "ff18::10:305",
            "ff18::10:909",
            "ff18:1::1",
            "ff19::1",
            "ff18::1:304",
            "ff18::10:3c8",
        ],
    ];
    const PROBE_SOURCES: [[&str; 5]; 2] = [
        [
            "198.18.7.1",
            "198.18.7.200",
            "198.18.8.1",
            "198.19.0.1",
            "10.0.0.1",
        ],
        [
            "2001:2:0:7::1",
            "2001:2:0:7:8000::1",
            "2001:2:0:8::1",
            "2001:2:1::1",
            "2001:3::1",
        ],
    ];

    /// The example of the issue: the longer group prefix wins before the source prefix, a
    /// range rule takes the rest of its range, and a source prefix keeps other senders out.
    #[test]
    fn the_longest_group_prefix_wins_before_the_source() {
        let rules = vec![
            prefix_rule(
                "wide".into(),
                p("239.10.0.0/16"),
                None,
                Some(p("198.18.7.0/24")),
                None,
            ),
            prefix_rule("narrow".into(), p("239.10.3.0/24"), None, None, None),
            prefix_rule("one".into(), p("239.10.3.9"), Some(5000), None, None),
        ];
        let t = RuleTable::compile(&config(rules.clone()), "t", &fake()).unwrap();
        assert_ne!(t.shapes() & SHAPE_RANGES, 0);
        assert!(t.has_ranges());
        let (v4, port) = (TUPLE_V4, TUPLE_PORT);
        assert_eq!(
            t.tuples(),
            [
                Tuple::new(128, 0, v4 | port),
                Tuple::new(120, 0, v4),
                Tuple::new(112, 120, v4),
            ],
            "one group, then /24, then /16 from a /24"
        );
        for (g, s, port, want) in [
            ([239, 10, 3, 4], [198, 18, 7, 1], 9, Some(1)),
            ([239, 10, 9, 9], [198, 18, 7, 1], 9, Some(0)),
            ([239, 10, 9, 9], [198, 18, 8, 1], 9, None),
            ([239, 11, 0, 1], [198, 18, 7, 1], 9, None),
            ([239, 10, 3, 9], [198, 18, 7, 1], 5000, Some(2)),
            ([239, 10, 3, 9], [198, 18, 7, 1], 5001, Some(1)),
        ] {
            let f = flow(g, s, port);
            assert_eq!(t.lookup(10, &f), want, "{g:?} from {s:?}:{port}");
            assert_eq!(
                model(&rules, &f),
                want,
                "the model, {g:?} from {s:?}:{port}"
            );
        }
        let exact = RuleTable::compile(
            &config(vec![rule("a".into(), [239, 1, 1, 1], None, None)]),
            "t",
            &fake(),
        )
        .unwrap();
        assert!(!exact.has_ranges());
        assert_eq!(exact.shapes(), relay_common::SHAPE_GROUP);
        // A reload walks both tables' tuples, each once, in one order.
        assert_eq!(
            merge_tuples(exact.tuples(), t.tuples()),
            [
                Tuple::new(128, 0, v4 | port),
                Tuple::new(128, 0, v4),
                Tuple::new(120, 0, v4),
                Tuple::new(112, 120, v4),
            ]
        );
    }

    fn arb_vlan() -> impl Strategy<Value = Option<Vlan>> {
        proptest::option::of(prop_oneof![
            Just(Vlan::Untagged),
            (10u16..12).prop_map(Vlan::Id)
        ])
    }

    /// Legs that differ only by VID (red and blue on one trunk), or only by source (two
    /// senders of one group on one link), are told apart, and a leg with a VLAN or a source
    /// outranks one without, as the lookup ranks keys; a frame no leg takes counts as the
    /// first.
    #[test]
    fn legs_on_one_link_differ_by_vid_or_source() {
        let t = compiled(
            "rules:\n  - name: trunk\n    inputs:\n      - {interface: in0, group: 239.1.1.1, port: 5000, vlan: 10}\n      - {interface: in0, group: 239.1.1.1, port: 5000, vlan: 20}\n    merge: rtp\n    outputs: [{interface: out0}]\n  - name: ssm\n    inputs:\n      - {interface: in0, group: 239.2.2.2, port: 5000}\n      - {interface: in0, group: 239.2.2.2, port: 5000, source: 198.18.0.9}\n    merge: rtp\n    outputs: [{interface: out0}]\n",
        );
        let in0 = fake().interface("in0").unwrap().ifindex;
        let tagged = |tci| Flow {
            tci: Some(tci),
            ..flow([239, 1, 1, 1], [198, 18, 0, 1], 5000)
        };
        let trunk = &t.rules[0];
        // The priority bits are not the VID.
        assert_eq!(trunk.leg_of(in0, &tagged(0x000a)), 0);
        assert_eq!(trunk.leg_of(in0, &tagged(0x6014)), 1);
        assert_eq!(trunk.leg_of(in0, &tagged(0x001e)), 0, "no leg takes VID 30");
        let ssm = &t.rules[1];
        let from = |s: [u8; 4]| flow([239, 2, 2, 2], s, 5000);
        assert_eq!(ssm.leg_of(in0, &from([198, 18, 0, 1])), 0);
        assert_eq!(ssm.leg_of(in0, &from([198, 18, 0, 9])), 1, "the source leg");
        assert_eq!(t.lookup(in0, &from([198, 18, 0, 9])), Some(1));
    }

    /// A merged rule: each leg's key finds the rule and tells its leg, the outputs send the
    /// first leg's group and port, and every leg is joined.
    #[test]
    fn merged_legs_find_their_rule_and_go_out_as_the_first() {
        let t = compiled(
            "rules:\n  - name: feed\n    inputs:\n      - {interface: in0, group: 239.1.1.1, port: 5000}\n      - {interface: out1, group: 239.101.1.1, port: 5002}\n    merge: rtp\n    window_ms: 300\n    outputs: [{interface: out0}, {interface: out0, group: 239.9.9.9, port: 9}]\n",
        );
        let r = &t.rules[0];
        let (in0, out1) = (
            fake().interface("in0").unwrap(),
            fake().interface("out1").unwrap(),
        );
        let a = flow([239, 1, 1, 1], [198, 18, 0, 1], 5000);
        let b = flow([239, 101, 1, 1], [198, 18, 0, 9], 5002);
        assert_eq!(t.lookup(in0.ifindex, &a), Some(0));
        assert_eq!(t.lookup(out1.ifindex, &b), Some(0));
        assert_eq!(t.lookup(in0.ifindex, &b), None, "a leg is its interface's");
        assert_eq!(
            (r.leg_of(in0.ifindex, &a), r.leg_of(out1.ifindex, &b)),
            (0, 1)
        );
        assert_eq!(t.bpf_entries().count(), 2);
        assert!(t.ingress.iter().any(|i| i.name == "out1"));
        let m = r.merge.as_ref().unwrap();
        assert_eq!((m.legs(), m.window_ms()), (2, 300));
        assert_eq!(m.sequence(), crate::merge::Sequence::Rtp);
        let o = &r.outputs[0].action;
        assert_eq!(
            (o.group, o.port),
            (Some("239.1.1.1".parse().unwrap()), Some(5000))
        );
        let o = &r.outputs[1].action;
        assert_eq!(
            (o.group, o.port),
            (Some("239.9.9.9".parse().unwrap()), Some(9))
        );
        let joins: Vec<(String, IpAddr)> = crate::membership::wanted(&t)
            .into_iter()
            .map(|m| (m.0, m.2))
            .collect();
        assert_eq!(
            joins,
            vec![
                ("in0".to_owned(), "239.1.1.1".parse().unwrap()),
                ("out1".to_owned(), "239.101.1.1".parse().unwrap())
            ]
        );
        // A rule with one input has no merge, and its outputs keep the received group.
        let plain = RuleTable::compile(
            &config(vec![rule("p".into(), [239, 1, 1, 1], Some(5000), None)]),
            "t",
            &fake(),
        )
        .unwrap();
        assert!(plain.rules[0].merge.is_none() && plain.rules[0].legs.is_empty());
        assert_eq!(plain.rules[0].outputs[0].action.group, None);
    }

    /// A reload keeps a merged rule's state when the rule merges the same way, and starts a
    /// new one when it does not.
    #[test]
    fn reloads_keep_merge_state_of_rules_that_stay() {
        let yaml = |window: u32| {
            format!(
                "rules:\n  - name: feed\n    inputs: [{{interface: in0, group: 239.1.1.1, port: 5000}}, {{interface: out1, group: 239.101.1.1, port: 5000}}]\n    merge: rtp\n    window_ms: {window}\n    outputs: [{{interface: out0}}]\n"
            )
        };
        let table = |window| compiled(&yaml(window));
        let old = table(500);
        assert!(old.rules[0].merge.as_ref().unwrap().offer(0, 7, 0).first);
        let mut same = table(500);
        same.keep_merge_state(&old);
        let (a, b) = (&old.rules[0].merge, &same.rules[0].merge);
        assert!(Arc::ptr_eq(a.as_ref().unwrap(), b.as_ref().unwrap()));
        assert!(
            !b.as_ref().unwrap().offer(1, 7, 1).first,
            "remembered across the reload"
        );
        let mut other = table(200);
        other.keep_merge_state(&old);
        assert!(!Arc::ptr_eq(
            old.rules[0].merge.as_ref().unwrap(),
            other.rules[0].merge.as_ref().unwrap()
        ));
        assert!(other.rules[0].merge.as_ref().unwrap().offer(1, 7, 1).first);
    }

    proptest! {
        #[test]
        fn lookup_agrees_with_model(
            specs in proptest::collection::vec(
                (0u8..3, proptest::option::of(5000u16..5003), proptest::option::of(1u8..4), arb_vlan()), 1..24),
            probes in proptest::collection::vec(
                (0u8..3, 5000u16..5003, 1u8..4, proptest::option::of(prop_oneof![Just(0x2000u16), Just(0xe00a), Just(11), Just(12)])), 1..32),
        ) {
            let mut seen = std::collections::HashSet::new();
            let rules: Vec<Rule> = specs
                .into_iter()
                .filter(|s| seen.insert(*s))
                .enumerate()
                .map(|(i, (g, p, s, v))| {
                    let mut r = rule(format!("r{i}"), [239, 0, 0, g], p, s.map(|s| [198, 18, 0, s]));
                    r.input.vlan = v;
                    r
                })
                .collect();
            let t = RuleTable::compile(&config(rules.clone()), "t", &fake()).unwrap();
            prop_assert!(!t.has_ranges());
            for (g, p, s, tci) in probes {
                let f = Flow { tci, ..flow([239, 0, 0, g], [198, 18, 0, s], p) };
                prop_assert_eq!(t.lookup(10, &f), model(&rules, &f));
            }
        }

        /// Overlapping group ranges and source prefixes of both families, with ports and
        /// VLANs: the tuple walk finds the rule the brute-force model picks, for frames
        /// inside several ranges, inside one, and outside all.
        #[test]
        fn range_lookup_agrees_with_model(
            specs in proptest::collection::vec(
                (any::<bool>(), 0usize..6, proptest::option::of(5000u16..5002), 0usize..6, arb_vlan()), 1..32),
            probes in proptest::collection::vec(
                (any::<bool>(), 0usize..7, 5000u16..5003, 0usize..5, proptest::option::of(prop_oneof![Just(0x2000u16), Just(0xe00a), Just(11), Just(12)])), 1..48),
        ) {
            let mut seen = std::collections::HashSet::new();
            let rules: Vec<Rule> = specs
                .into_iter()
                .filter(|s| seen.insert(*s))
                .enumerate()
                .map(|(i, (v6, g, port, s, vlan))| {
                    let fam = usize::from(v6);
                    let source = s.checked_sub(1).map(|s| p(SOURCES[fam][s]));
                    prefix_rule(format!("r{i}"), p(GROUPS[fam][g]), port, source, vlan)
                })
                .collect();
            let t = RuleTable::compile(&config(rules.clone()), "t", &fake()).unwrap();
            for (v6, g, port, s, tci) in probes {
                let fam = usize::from(v6);
                let f = Flow {
                    tci,
                    group: PROBE_GROUPS[fam][g].parse().unwrap(),
                    source: PROBE_SOURCES[fam][s].parse().unwrap(),
                    ..flow([0; 4], [0; 4], port)
                };
                prop_assert_eq!(t.lookup(10, &f), model(&rules, &f), "{:?}", f);
                // Another ingress finds nothing.
                prop_assert_eq!(t.lookup(11, &f), None);
            }
        }
    }
}
