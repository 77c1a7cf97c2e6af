//! The YAML configuration: its shape, its defaults, and the checks of the file against the
//! machine's interfaces and CPUs that run before anything is attached (`relay --check` runs
//! these, then [`crate::preflight`]'s; a reload runs these).

use std::{collections::HashSet, fmt, net::IpAddr, path::Path, time::Duration};

use relay_common::{MAX_INGRESS_IFACES, MAX_QUEUES_PER_IFACE, MAX_TUPLES};
use serde::Deserialize;

use crate::{pool::AllocatorKind, prefix::Prefix, vlan::Vlan};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub allocator: AllocatorKind,
    #[serde(default)]
    pub umem: UmemConfig,
    #[serde(default)]
    pub xdp_mode: XdpModeConfig,
    #[serde(default)]
    pub bind: BindMode,
    /// How an idle worker waits: `sleep` (in poll(2), woken by its sockets) or `busy`
    /// (never sleeps: a whole CPU per worker, for the lowest latency).
    #[serde(default)]
    pub poll: PollMode,
    /// Data path threads; when absent, one per ingress rx queue, up to the number of CPUs
    /// (see [`default_workers`]). Sockets are shared out among them; frames for an egress
    /// owned by another worker are handed over through a lock-free lane.
    #[serde(default)]
    pub workers: Option<usize>,
    /// CPUs to pin the workers to: worker i runs on `cpus[i % len]`. Unpinned when absent.
    #[serde(default)]
    pub cpus: Option<Vec<usize>>,
    /// The control socket (`relay stats`, ...); /run/relay/relay.sock when absent.
    #[serde(default)]
    pub control: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9469.
    #[serde(default)]
    pub metrics: Option<std::net::SocketAddr>,
    /// The IGMP/MLD querier's timers, on the interfaces of `on_demand` outputs.
    #[serde(default)]
    pub querier: QuerierConfig,
    pub rules: Vec<Rule>,
}

/// `querier:`: the timers of RFC 3376 §8 and RFC 3810 §9, in seconds, the RFCs' defaults
/// when absent. The relay queries with them on every interface with an `on_demand` output.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerierConfig {
    #[serde(default = "QuerierConfig::default_query_interval")]
    pub query_interval: f64,
    #[serde(default = "QuerierConfig::default_query_response_interval")]
    pub query_response_interval: f64,
    #[serde(default = "QuerierConfig::default_last_member_query_interval")]
    pub last_member_query_interval: f64,
    #[serde(default = "QuerierConfig::default_robustness")]
    pub robustness: u8,
}

impl QuerierConfig {
    fn default_query_interval() -> f64 {
        125.0
    }
    fn default_query_response_interval() -> f64 {
        10.0
    }
    fn default_last_member_query_interval() -> f64 {
        1.0
    }
    fn default_robustness() -> u8 {
        2
    }

    /// The timers as durations (after validation, every value is one).
    pub fn durations(&self) -> (Duration, Duration, Duration) {
        let d = |s: f64| Duration::from_secs_f64(s.max(0.0));
        (
            d(self.query_interval),
            d(self.query_response_interval),
            d(self.last_member_query_interval),
        )
    }

    /// What `--check`, the start and a reload refuse: values the RFCs' encodings cannot
    /// carry (a query's QQIC up to 31744 s, its max response code up to 3174.4 s in tenths),
    /// a response interval not shorter than the query interval (RFC 3376 §8.3), and a
    /// robustness of 0 or beyond the 3-bit QRV.
    fn check(&self) -> Result<(), String> {
        let QuerierConfig {
            query_interval: qi,
            query_response_interval: qri,
            last_member_query_interval: lmqi,
            robustness,
        } = *self;
        if !(1.0..=31744.0).contains(&qi) || qi.fract() != 0.0 {
            return Err(format!(
                "querier.query_interval is {qi}: it must be a whole number of seconds from 1 to \
                 31744"
            ));
        }
        let tenths = |v: f64| (v * 10.0 - (v * 10.0).round()).abs() < 1e-9;
        if !(0.1..=3174.4).contains(&qri) || !tenths(qri) {
            return Err(format!(
                "querier.query_response_interval is {qri}: it must be from 0.1 to 3174.4 \
                 seconds, in tenths"
            ));
        }
        if qri >= qi {
            return Err(format!(
                "querier.query_response_interval {qri} is not shorter than query_interval \
                 {qi}: hosts answer a query within the response interval, which must end \
                 before the next query"
            ));
        }
        if !(0.1..=3174.4).contains(&lmqi) || !tenths(lmqi) {
            return Err(format!(
                "querier.last_member_query_interval is {lmqi}: it must be from 0.1 to 3174.4 \
                 seconds, in tenths"
            ));
        }
        if !(1..=7).contains(&robustness) {
            return Err(format!(
                "querier.robustness is {robustness}: it must be from 1 to 7 (2 by default; \
                 raise it on a lossy link)"
            ));
        }
        Ok(())
    }
}

// Validation refuses NaN (no range contains it), the one value for which `==` is not
// reflexive, and `Config` compares whole configurations on reload.
impl Eq for QuerierConfig {}

impl Default for QuerierConfig {
    fn default() -> Self {
        Self {
            query_interval: Self::default_query_interval(),
            query_response_interval: Self::default_query_response_interval(),
            last_member_query_interval: Self::default_last_member_query_interval(),
            robustness: Self::default_robustness(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UmemConfig {
    #[serde(default = "UmemConfig::default_frames")]
    pub frames: u32,
    #[serde(default = "UmemConfig::default_frame_size")]
    pub frame_size: u32,
    /// Interfaces whose sockets get a UMEM of their own (of `frames` frames): their frames
    /// cannot starve the others', at the cost of a copy for every frame that crosses to or
    /// from them. Every other socket shares one UMEM per bind mode.
    #[serde(default)]
    pub separate: Vec<String>,
}

impl UmemConfig {
    fn default_frames() -> u32 {
        4096
    }
    fn default_frame_size() -> u32 {
        2048
    }
}

impl Default for UmemConfig {
    fn default() -> Self {
        Self {
            frames: Self::default_frames(),
            frame_size: Self::default_frame_size(),
            separate: Vec::new(),
        }
    }
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    /// Native (driver) mode, falling back to generic (skb) mode.
    #[default]
    Auto,
    Native,
    Skb,
}

/// How the AF_XDP sockets bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BindMode {
    /// Zero-copy, falling back to copy mode.
    #[default]
    Auto,
    Zerocopy,
    Copy,
}

/// How an idle data path worker waits for frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// In poll(2) on its sockets and its wake-up eventfd: no CPU when idle, a wake-up per
    /// burst.
    #[default]
    Sleep,
    /// Spinning over its rings: no wake-up, a whole CPU per worker. On zero-copy drivers
    /// with NAPI the sockets also prefer busy polling (SO_PREFER_BUSY_POLL).
    Busy,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RuleYaml")]
pub struct Rule {
    pub name: String,
    /// The input; with `inputs:`, the first leg.
    pub input: Input,
    /// With `inputs:`, the legs after the first: the same stream arriving again, merged
    /// (`merge:`) so that each packet goes out once.
    pub legs: Vec<Input>,
    /// How the legs' packets are numbered; required with two or more inputs.
    pub merge: Option<MergeSpec>,
    /// How long a sequence number counts as already relayed (`merge:` only).
    pub window_ms: Option<u32>,
    pub outputs: Vec<Output>,
}

/// A rule as written: `input:` or `inputs:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleYaml {
    name: String,
    #[serde(default)]
    input: Option<Input>,
    #[serde(default)]
    inputs: Option<Vec<Input>>,
    #[serde(default)]
    merge: Option<MergeSpec>,
    #[serde(default)]
    window_ms: Option<u32>,
    outputs: Vec<Output>,
}

impl TryFrom<RuleYaml> for Rule {
    type Error = String;

    fn try_from(r: RuleYaml) -> Result<Self, String> {
        let mut legs = match (r.input, r.inputs) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "rule '{}' has both input: and inputs:: one input, or a list of the legs \
                     of a merged stream",
                    r.name
                ));
            }
            (None, None) => {
                return Err(format!(
                    "rule '{}' has no input: name one (input:), or the legs of a merged stream \
                     (inputs:)",
                    r.name
                ));
            }
            (Some(one), None) => vec![one],
            (None, Some(list)) if list.is_empty() => {
                return Err(format!("rule '{}': inputs: is empty", r.name));
            }
            (None, Some(list)) => list,
        };
        let input = legs.remove(0);
        Ok(Rule {
            name: r.name,
            input,
            legs,
            merge: r.merge,
            window_ms: r.window_ms,
            outputs: r.outputs,
        })
    }
}

/// `merge:`, as written: `rtp`, or `{ offset: N, bytes: 4 | 8 }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum MergeSpec {
    /// A kind by name (`rtp` is the one there is; validation names any other).
    Named(String),
    /// A big-endian counter in the UDP payload.
    Counter(CounterSpec),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterSpec {
    pub offset: u32,
    pub bytes: u32,
}

/// The largest UDP payload (an IPv4 datagram of 65,535 bytes, less its headers).
const MAX_UDP_PAYLOAD: u32 = 65_507;

/// The window a merged rule has without `window_ms:`: ST 2022-7's class D skew between paths.
pub const DEFAULT_WINDOW_MS: u32 = 500;

impl Rule {
    /// The rule's inputs: the input (or first leg), then the other legs.
    pub fn inputs(&self) -> impl Iterator<Item = &Input> {
        std::iter::once(&self.input).chain(&self.legs)
    }

    /// The merge's numbering, once validated.
    pub fn sequence(&self) -> Option<crate::merge::Sequence> {
        match self.merge.as_ref()? {
            MergeSpec::Named(n) if n == "rtp" => Some(crate::merge::Sequence::Rtp),
            MergeSpec::Named(_) => None,
            MergeSpec::Counter(c) => Some(crate::merge::Sequence::Counter {
                offset: c.offset as usize,
                bytes: c.bytes as usize,
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub interface: String,
    /// An IPv4 or IPv6 group, or a range of groups (`239.10.0.0/16`); the source and the
    /// outputs' groups are of the same family. An input has this or `destination:`, never
    /// both.
    #[serde(default)]
    pub group: Option<Prefix>,
    /// A unicast address (usually one of this host's own) whose UDP datagrams to `port:` the
    /// rule relays instead of the host's stack receiving them.
    #[serde(default)]
    pub destination: Option<IpAddr>,
    /// Any UDP port when absent.
    pub port: Option<u16>,
    /// Any source when absent; one source, or a prefix of sources (`198.18.7.0/24`).
    pub source: Option<Prefix>,
    /// Frames of any VLAN or none when absent; a VID takes only frames tagged with it,
    /// `untagged` only frames without a tag.
    #[serde(default)]
    pub vlan: Option<Vlan>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub interface: String,
    /// Remapped destination group; the input's group when absent. For a range input, a
    /// range of the same length (the host bits carry over) or one group.
    pub group: Option<Prefix>,
    /// A unicast address to send to instead of a group (multicast -> unicast): the frame
    /// goes to the MAC of the kernel's next hop towards it through this interface.
    #[serde(default)]
    pub destination: Option<IpAddr>,
    /// Remapped destination port; the received port when absent.
    pub port: Option<u16>,
    /// TTL (IPv4) or hop limit (IPv6) to set; the received value minus one when absent.
    #[serde(alias = "hop_limit")]
    pub ttl: Option<u8>,
    /// Send tagged with this VID; untagged (a received tag removed) when absent or
    /// `untagged`.
    #[serde(default)]
    pub vlan: Option<Vlan>,
    /// Mark with this DSCP (0-63), keeping the ECN bits; the received marking when absent.
    #[serde(default)]
    pub dscp: Option<u8>,
    /// Rewrite the IP source: `auto` (the interface's own address) or an address of the
    /// interface; the sender's when absent.
    #[serde(default)]
    pub source: Option<SourceSpec>,
    /// Rewrite the UDP source port; the sender's when absent.
    #[serde(default)]
    pub source_port: Option<u16>,
    /// Forward only while a host behind the interface is a member of the output's group
    /// (the relay is the IGMP/MLD querier there); always when false.
    #[serde(default)]
    pub on_demand: bool,
}

impl Rule {
    /// One rule as `relay add-rule` takes it: the YAML of one entry of `rules:`, as a mapping
    /// or as a list of one `- name: ...` item (pasted from a file). `source` names where it
    /// came from in errors.
    pub fn parse_one(source: &str, yaml: &str) -> Result<Rule, ConfigError> {
        let err = |rule: Option<String>, message: String| ConfigError {
            file: source.to_owned(),
            rule,
            message,
        };
        let doc: serde_yaml::Value =
            serde_yaml::from_str(yaml).map_err(|e| err(None, format!("not YAML: {e}")))?;
        let name =
            |v: &serde_yaml::Value| v.get("name").and_then(|n| n.as_str()).map(str::to_owned);
        let parsed = match &doc {
            serde_yaml::Value::Sequence(items) if items.len() == 1 => {
                serde_yaml::from_str::<Vec<Rule>>(yaml).map(|mut v| v.remove(0))
            }
            serde_yaml::Value::Sequence(items) => {
                let names: Vec<String> = items.iter().filter_map(name).collect();
                return Err(err(
                    None,
                    format!(
                        "a list of {} rules ({}): add-rule adds one at a time",
                        items.len(),
                        names.join(", ")
                    ),
                ));
            }
            serde_yaml::Value::Mapping(m) if m.contains_key("rules") => {
                return Err(err(
                    None,
                    "a config file (it has `rules:`): add-rule takes one entry of `rules:`, such \
                     as `{name: a, input: {...}, outputs: [...]}`"
                        .to_owned(),
                ));
            }
            _ => serde_yaml::from_str::<Rule>(yaml),
        };
        parsed.map_err(|e| {
            let mut e = parse_error(source, yaml, &e);
            let rule = match &doc {
                serde_yaml::Value::Sequence(items) => items.first().and_then(name),
                one => name(one),
            };
            e.rule = e.rule.or(rule);
            // `[0].input...` for a list of one: the rule is named already.
            for prefix in [".[0].", "[0].", ".[0]: ", "[0]: "] {
                if let Some(rest) = e.message.strip_prefix(prefix) {
                    e.message = rest.to_owned();
                    break;
                }
            }
            e
        })
    }
}

impl Input {
    /// The destination address the input matches: its group, or its unicast destination.
    /// (Validation refuses an input with neither; unspecified until then.)
    pub fn address(&self) -> IpAddr {
        self.prefix().network()
    }

    /// The destinations the input matches: its group or range, or its unicast destination
    /// as a single address.
    pub fn prefix(&self) -> Prefix {
        self.group
            .or(self.destination.map(Prefix::host))
            .unwrap_or(Prefix::host(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)))
    }
}

impl Output {
    /// The destinations the output sends to when it names them: a group or range, or a
    /// unicast destination.
    pub fn prefix(&self) -> Option<Prefix> {
        self.group.or(self.destination.map(Prefix::host))
    }
}

/// An output's `source:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceSpec {
    /// The egress interface's primary address of the rule's family (IPv6: its first global
    /// one), followed when the interface's addresses change.
    Auto,
    /// This address, which the egress interface must have.
    Address(IpAddr),
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::Auto => f.write_str("auto"),
            SourceSpec::Address(a) => a.fmt(f),
        }
    }
}

impl<'de> Deserialize<'de> for SourceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SourceSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`auto` or an IP address")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SourceSpec, E> {
                if v == "auto" {
                    return Ok(SourceSpec::Auto);
                }
                v.parse()
                    .map(SourceSpec::Address)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// The address `source: auto` stands for on an interface with `addresses` (in the kernel's
/// order, primary first), for a rule of `v4`'s family: the first IPv4 address, or the first
/// global IPv6 one (not link-local, loopback or multicast).
pub fn auto_source(addresses: &[IpAddr], v4: bool) -> Option<IpAddr> {
    addresses.iter().copied().find(|a| match a {
        IpAddr::V4(a) => v4 && !a.is_unspecified() && !a.is_loopback(),
        IpAddr::V6(a) => {
            !v4 && !a.is_unspecified()
                && !a.is_loopback()
                && !a.is_multicast()
                && (a.segments()[0] & 0xffc0) != 0xfe80
        }
    })
}

/// What the relay needs to know about an interface on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceInfo {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub rx_queues: u32,
    /// Largest IP packet the interface sends.
    pub mtu: u32,
}

impl InterfaceInfo {
    /// What the rule table holds for an interface that does not exist (yet).
    pub fn absent() -> Self {
        InterfaceInfo {
            ifindex: 0,
            mac: [0; 6],
            rx_queues: 1,
            mtu: 1500,
        }
    }

    pub fn exists(&self) -> bool {
        self.ifindex != 0
    }
}

/// What kind of device an interface is: what decides whether the relay can use it at all (its
/// link type) and in which XDP mode (whether its driver runs XDP itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkKind {
    /// ARPHRD_* (/sys/class/net/IF/type): 1 is Ethernet, the only frames the relay parses.
    pub link_type: u16,
    /// rtnetlink's kind (veth, bridge, macvlan, vxlan, tun, ...), or a NIC's driver; `None`
    /// when the device has neither (loopback).
    pub kind: Option<String>,
    /// Whether the driver runs XDP programs itself (native mode); `None` when the kernel
    /// cannot say (before Linux 6.3), and then nothing is refused for it.
    pub native_xdp: Option<bool>,
    /// Whether the driver takes the VLAN tag off received frames into the skb's metadata
    /// (rx-vlan-offload); `None` when it cannot say.
    pub rx_vlan_offload: Option<bool>,
    /// Whether a native XDP program can read that tag (the XDP RX metadata kfunc).
    pub vlan_hint: Option<bool>,
}

impl LinkKind {
    /// An Ethernet device of `kind` with (or without) native XDP.
    pub fn ethernet(kind: &str, native_xdp: bool) -> Self {
        LinkKind {
            link_type: crate::link_kind::ARPHRD_ETHER,
            kind: Some(kind.to_owned()),
            native_xdp: Some(native_xdp),
            rx_vlan_offload: None,
            vlan_hint: None,
        }
    }

    /// As [`LinkKind::ethernet`], with its rx-vlan-offload and whether the tag it strips can
    /// be read by a native program.
    pub fn with_vlan(mut self, rx_vlan_offload: bool, vlan_hint: bool) -> Self {
        self.rx_vlan_offload = Some(rx_vlan_offload);
        self.vlan_hint = Some(vlan_hint);
        self
    }

    /// Why an input with `vlan:` on interface `name` cannot tell VLANs apart in `mode`, if it
    /// cannot: the driver takes tags off into the skb's metadata, and the program cannot read
    /// them there (skb mode, or a driver that does not hand them to XDP). Its frames of every
    /// VLAN would then look untagged.
    fn vlan_refusal(&self, name: &str, vlan: Vlan, mode: XdpModeConfig) -> Option<String> {
        if self.rx_vlan_offload != Some(true) {
            return None;
        }
        let hint = self.vlan_hint == Some(true);
        if hint && mode != XdpModeConfig::Skb {
            return None;
        }
        let (why, fix) = if hint {
            (
                "which only a native-mode program can read, and xdp_mode is skb",
                "use xdp_mode: auto or native".to_owned(),
            )
        } else if self.kind.as_deref() == Some("veth") {
            (
                "and this kernel's veth does not hand it to XDP programs",
                "have the peer write tags into the frames (ethtool -K PEER txvlan off, in the \
                 peer's namespace)"
                    .to_owned(),
            )
        } else {
            (
                "and its driver does not hand it to XDP programs",
                format!("turn the offload off: ethtool -K {name} rxvlan off"),
            )
        };
        Some(format!(
            "input vlan {vlan}: interface '{name}' (kind {}) takes the VLAN tag off the frames it \
             receives (rx-vlan-offload on) into their metadata, {why}: the relay could not tell \
             VLANs apart there, and frames of every VLAN would look untagged; {fix}",
            self.kind_name()
        ))
    }

    fn kind_name(&self) -> &str {
        self.kind.as_deref().unwrap_or("none")
    }

    /// Why `side` (`input`, `output`) interface `name` cannot be used at all, if it cannot:
    /// it is not Ethernet.
    fn refusal(&self, side: &str, name: &str) -> Option<String> {
        (self.link_type != crate::link_kind::ARPHRD_ETHER).then(|| {
            format!(
                "{side} interface '{name}' is not an Ethernet interface (link type {} ({}), kind \
                 {}): the XDP program and the rewrite read and write Ethernet frames; use {}",
                self.link_type,
                crate::link_kind::link_type_name(self.link_type),
                self.kind_name(),
                crate::link_kind::instead(self.link_type, self.kind.as_deref())
            )
        })
    }
}

/// The running system, as the checks see it; tests substitute a fixed one.
pub trait System {
    fn interface(&self, name: &str) -> Option<InterfaceInfo>;

    /// What kind of device the interface is; `None` when it does not exist or nothing can be
    /// said (then nothing is refused for its kind).
    fn link(&self, _name: &str) -> Option<LinkKind> {
        None
    }

    /// The interface's IP addresses, primary first (the kernel's order); empty when it has
    /// none or does not exist.
    fn addresses(&self, _name: &str) -> Vec<IpAddr> {
        Vec::new()
    }

    /// The CPUs the relay may run on, which `cpus:` must stay within; `None` when any CPU
    /// is allowed (a fixed system, for checks that do not concern the machine).
    fn allowed_cpus(&self) -> Option<Vec<usize>> {
        None
    }
}

/// `sys` with each interface's kind asked once: a file names the same interfaces in many
/// rules, and asking the kernel is a netlink round trip or three.
struct KindsOnce<'a> {
    sys: &'a dyn System,
    links: std::cell::RefCell<std::collections::HashMap<String, Option<LinkKind>>>,
}

impl System for KindsOnce<'_> {
    fn interface(&self, name: &str) -> Option<InterfaceInfo> {
        self.sys.interface(name)
    }

    fn link(&self, name: &str) -> Option<LinkKind> {
        if let Some(known) = self.links.borrow().get(name) {
            return known.clone();
        }
        let link = self.sys.link(name);
        self.links
            .borrow_mut()
            .insert(name.to_owned(), link.clone());
        link
    }

    fn addresses(&self, name: &str) -> Vec<IpAddr> {
        self.sys.addresses(name)
    }

    fn allowed_cpus(&self) -> Option<Vec<usize>> {
        self.sys.allowed_cpus()
    }
}

/// A fixed set of interfaces, for checking rules without the running system (tests,
/// benchmarks, fuzzing): each named interface has the given ifindex, a MAC derived from it,
/// one rx queue and a 1500-byte MTU. The second list gives interfaces a kind (a link type
/// and a native-XDP answer); one not in it has none to check.
#[derive(Debug, Clone, Default)]
pub struct StaticSystem(pub Vec<(String, u32)>, pub Vec<(String, LinkKind)>);

impl StaticSystem {
    pub fn new(ifaces: &[(&str, u32)]) -> Self {
        Self(
            ifaces.iter().map(|(n, i)| ((*n).to_owned(), *i)).collect(),
            Vec::new(),
        )
    }

    /// This system with interface `name` of kind `link`.
    pub fn with_link(mut self, name: &str, link: LinkKind) -> Self {
        self.1.push((name.to_owned(), link));
        self
    }
}

impl System for StaticSystem {
    fn link(&self, name: &str) -> Option<LinkKind> {
        self.1
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
    }

    fn interface(&self, name: &str) -> Option<InterfaceInfo> {
        let &(_, ifindex) = self.0.iter().find(|(n, _)| n == name)?;
        let b = ifindex.to_be_bytes();
        Some(InterfaceInfo {
            ifindex,
            mac: [0x02, 0, b[0], b[1], b[2], b[3]],
            rx_queues: 1,
            mtu: 1500,
        })
    }

    /// 198.18.N.1 and 2001:2:0:N::1 for ifindex N.
    fn addresses(&self, name: &str) -> Vec<IpAddr> {
        self.interface(name)
            .map(|i| static_addresses(i.ifindex))
            .unwrap_or_default()
    }
}

/// The addresses a fixed system gives interface `ifindex`: 198.18.N.1 and 2001:2:0:N::1.
pub fn static_addresses(ifindex: u32) -> Vec<IpAddr> {
    vec![
        IpAddr::from([198, 18, ifindex as u8, 1]),
        IpAddr::from([0x2001, 2, 0, ifindex as u16, 0, 0, 0, 1]),
    ]
}

/// A configuration the relay refuses, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// The rule the problem is in, when it is in one.
    pub rule: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => write!(f, "{}: rule '{}': {}", self.file, rule, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The multicast range of `addr`'s family, for messages.
fn multicast_range(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "224.0.0.0/4",
        IpAddr::V6(_) => "ff00::/8",
    }
}

/// A parse error as the user can act on it: serde_yaml names the key path and the position
/// but not always the value ("invalid IP address syntax"), so the value as written is taken
/// from the file at that position, and a `rules[N]` path gets the rule's name.
fn parse_error(file: &str, yaml: &str, e: &serde_yaml::Error) -> ConfigError {
    let mut message = e.to_string();
    // `hop_limit` is `ttl`'s other name, and serde reports the pair as `ttl` twice.
    if message.contains("duplicate field `ttl`")
        && let Some((rule, both)) = ttl_twice(yaml)
    {
        let position = message.find(" at line ").map_or("", |p| &message[p..]);
        return ConfigError {
            file: file.to_owned(),
            rule,
            message: format!(
                "{both}: `hop_limit` is another name for `ttl` (the IPv6 one); give one of them{position}"
            ),
        };
    }
    if let Some(said) = out_of_range(yaml, &message) {
        message = said;
    }
    // Only errors about a value point at it; others point at a key or a mapping.
    if message.contains(": invalid ")
        && let Some(at) = e.location()
        && let Some(value) = scalar_at(yaml, at.line(), at.column())
        && !message.contains(&value)
    {
        let position = message.rfind(" at line ").unwrap_or(message.len());
        message.insert_str(position, &format!(": `{value}`"));
    }
    ConfigError {
        file: file.to_owned(),
        rule: rule_name(yaml, &message),
        message,
    }
}

/// What each numeric key of the file takes, by the key's name (the last part of its path),
/// as the errors about it say it; the validation refuses what the types let through with the
/// same ranges.
fn key_range(key: &str) -> Option<String> {
    let port = "a UDP port from 1 to 65535";
    Some(match key {
        "ttl" | "hop_limit" => "a whole number from 1 to 255".to_owned(),
        "port" | "source_port" => port.to_owned(),
        "dscp" => "a whole number from 0 to 63".to_owned(),
        "window_ms" => format!(
            "a whole number of milliseconds from 1 to {}",
            crate::merge::MAX_WINDOW_MS
        ),
        "frames" => "a power of two from 512 to 1048576".to_owned(),
        "frame_size" => "2048 or 4096".to_owned(),
        "workers" => "a whole number from 1 to 256".to_owned(),
        "cpus" => "a list of CPU numbers from 0 to 1023".to_owned(),
        "robustness" => "a whole number from 1 to 7".to_owned(),
        "query_interval" => "a whole number of seconds from 1 to 31744".to_owned(),
        "query_response_interval" | "last_member_query_interval" => {
            "from 0.1 to 3174.4 seconds, in tenths".to_owned()
        }
        "vlan" => "a VLAN ID from 1 to 4094, or untagged".to_owned(),
        "merge" => format!(
            "rtp, or {{ offset: N, bytes: 4 or 8 }} with N from 0 to {}",
            MAX_UDP_PAYLOAD - 4
        ),
        _ => return None,
    })
}

/// serde's error about a value its type cannot hold (`invalid value: integer `300`, expected
/// u8`) said in the file's terms: `rules[0].outputs[0].ttl: 300: must be a whole number from 1
/// to 255`, the key's path, the value as written and the range, with the position. `None`
/// for other errors, and for keys that have no range.
fn out_of_range(yaml: &str, message: &str) -> Option<String> {
    let (path, why) = message.split_once(": ")?;
    let serde_words = why.starts_with("invalid value: ")
        || why.starts_with("invalid type: ")
        || why.starts_with("data did not match any variant");
    if !serde_words || path.contains(' ') {
        return None;
    }
    // `merge:` is read as one of two shapes, and serde says which enum matched neither at
    // the rule, not at the key.
    let path = match why.contains("untagged enum MergeSpec") && !path.ends_with("merge") {
        true => format!("{path}.merge"),
        false => path.to_owned(),
    };
    let segments = path_segments(&path);
    // A list's item (`cpus[1]`) takes what the list's key says.
    let key = segments.iter().rev().find_map(|s| match s {
        PathPart::Key(k) => Some(*k),
        PathPart::Index(_) => None,
    })?;
    let range = key_range(key)?;
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).ok()?;
    let value = segments
        .iter()
        .try_fold(&doc, |v, part| match part {
            PathPart::Key(k) => v.get(*k),
            PathPart::Index(i) => v.get(*i),
        })
        .map(show_value)?;
    let position = message.rfind(" at line ").map_or("", |p| &message[p..]);
    Some(format!("{path}: {value}: must be {range}{position}"))
}

/// A part of serde's path to a key: `rules[0].outputs[1].ttl`, or `[0].input.port` for a rule
/// pasted as a list of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathPart<'a> {
    Key(&'a str),
    Index(usize),
}

fn path_segments(path: &str) -> Vec<PathPart<'_>> {
    let mut out = Vec::new();
    for piece in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indices) = piece.split_once('[').unwrap_or((piece, ""));
        if !key.is_empty() {
            out.push(PathPart::Key(key));
        }
        for i in indices.split('[') {
            if let Ok(i) = i.trim_end_matches(']').parse() {
                out.push(PathPart::Index(i));
            }
        }
    }
    out
}

/// A value as the user wrote it, near enough: a scalar as it reads, a string that would read
/// as a number quoted, a mapping or list in flow style.
fn show_value(v: &serde_yaml::Value) -> String {
    use serde_yaml::Value;
    match v {
        Value::Null => "(empty)".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.parse::<f64>().is_ok() || s.is_empty() => format!("\"{s}\""),
        Value::String(s) => s.clone(),
        other => serde_json::to_string(other)
            .unwrap_or_default()
            .replace("\":", ": ")
            .replace(['"'], "")
            .replace(',', ", ")
            .replace('{', "{ ")
            .replace('}', " }"),
    }
}

/// The first output that has both `ttl:` and `hop_limit:`, as its rule's name and
/// `outputs[N]: ttl: A and hop_limit: B`; `yaml` is a whole file or one rule.
fn ttl_twice(yaml: &str) -> Option<(Option<String>, String)> {
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).ok()?;
    let rules: Vec<&serde_yaml::Value> = match (doc.get("rules"), &doc) {
        (Some(serde_yaml::Value::Sequence(rules)), _) => rules.iter().collect(),
        (_, serde_yaml::Value::Sequence(rules)) => rules.iter().collect(),
        (_, rule) => vec![rule],
    };
    let show = |v: &serde_yaml::Value| serde_json::to_string(v).unwrap_or_default();
    rules.into_iter().find_map(|rule| {
        let outputs = rule.get("outputs")?.as_sequence()?;
        outputs.iter().enumerate().find_map(|(i, o)| {
            let (ttl, hops) = (o.get("ttl")?, o.get("hop_limit")?);
            Some((
                rule.get("name").and_then(|n| n.as_str()).map(str::to_owned),
                format!(
                    "outputs[{i}]: `ttl: {}` and `hop_limit: {}`",
                    show(ttl),
                    show(hops)
                ),
            ))
        })
    })
}

/// The scalar written at 1-based `line` and `column`: up to the next `,`, `}`, `]`, ` #` or
/// the end of the line, or the quoted string there.
fn scalar_at(yaml: &str, line: usize, column: usize) -> Option<String> {
    let text = yaml.lines().nth(line.checked_sub(1)?)?;
    let rest = text.get(column.checked_sub(1)?..)?;
    let value = match rest.chars().next()? {
        q @ ('\'' | '"') => rest[1..].split(q).next()?,
        _ => rest
            .split([',', '}', ']'])
            .next()?
            .split(" #")
            .next()?
            .trim(),
    };
    // At a key (an unknown field), the key: the message names it already.
    let value = value.split(": ").next()?.trim_end_matches(':');
    (!value.is_empty()).then(|| value.to_owned())
}

/// The name of rule N when `message` is about `rules[N]` and the file says it.
fn rule_name(yaml: &str, message: &str) -> Option<String> {
    let index: usize = message
        .strip_prefix("rules[")?
        .split(']')
        .next()?
        .parse()
        .ok()?;
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).ok()?;
    doc.get("rules")?
        .get(index)?
        .get("name")?
        .as_str()
        .map(str::to_owned)
}

/// Interfaces `umem.separate` may list (each UMEM is `frames` frames of memory).
pub const MAX_SEPARATE_UMEMS: usize = 8;

/// A name Linux could give an interface: 1 to 15 bytes, no '/', no white space, not '.' or
/// '..'. Checked even when the interface does not exist yet, so a typo that can never match
/// is an error rather than a rule that waits forever.
fn check_interface_name(name: &str, side: &str) -> Result<(), String> {
    let ok = (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(|c| c.is_whitespace() || c == ':');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{side} interface '{name}' is not a valid interface name (1 to 15 characters, no \
             '/', ':' or spaces)"
        ))
    }
}

/// The worker count when the config names none: one per ingress rx queue (each queue's
/// socket then has a thread of its own), but no more than there are CPUs to run them.
pub fn default_workers(ingress_queues: usize, cpus: usize) -> usize {
    ingress_queues.clamp(1, cpus.max(1))
}

/// Warnings for the interfaces `rules` name that do not exist (yet), `file` naming where the
/// rules came from: their rules start idle, and their outputs drop their frames, until the
/// interface appears.
pub fn absent_interfaces(rules: &[Rule], file: &str, sys: &dyn System) -> Vec<String> {
    let mut out = Vec::new();
    for rule in rules {
        let sides = rule
            .inputs()
            .map(|i| ("input", &i.interface))
            .chain(rule.outputs.iter().map(|o| ("output", &o.interface)));
        for (side, name) in sides {
            if sys.interface(name).is_none() {
                out.push(format!(
                    "{file}: rule '{}': {side} interface '{name}' does not exist yet: {} \
                     until it appears",
                    rule.name,
                    if side == "input" {
                        "the rule is idle"
                    } else {
                        "this output drops its frames (interface_down)"
                    }
                ));
            }
        }
    }
    out
}

impl Config {
    /// Parses YAML; `file` names the source in errors.
    pub fn parse(file: &str, yaml: &str) -> Result<Config, ConfigError> {
        serde_yaml::from_str(yaml).map_err(|e| parse_error(file, yaml, &e))
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let yaml = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            rule: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&file, &yaml)
    }

    /// Warnings for the interfaces the rules name that do not exist (yet): their rules start
    /// idle and come alive when the interface appears.
    pub fn absent_interfaces(&self, file: &str, sys: &dyn System) -> Vec<String> {
        absent_interfaces(&self.rules, file, sys)
    }

    /// When not one of the interfaces the rules name exists, why `--check` fails: the file
    /// is checked where it cannot run (another network namespace, another machine), and a
    /// warning per interface would bury that.
    pub fn no_interface_here(&self, file: &str, sys: &dyn System) -> Option<String> {
        let mut names: Vec<&str> = Vec::new();
        for rule in &self.rules {
            let sides = rule.inputs().map(|i| &i.interface);
            for name in sides.chain(rule.outputs.iter().map(|o| &o.interface)) {
                if !names.contains(&name.as_str()) {
                    names.push(name);
                }
            }
        }
        if names.is_empty() || names.iter().any(|n| sys.interface(n).is_some()) {
            return None;
        }
        Some(format!(
            "{file}: none of the {} interfaces the rules name exists here ({}): is this the \
             relay's network namespace (or machine)? Run the check where the relay runs (`ip \
             netns exec NAME relay --config FILE --check`)",
            names.len(),
            names.join(", ")
        ))
    }

    /// Every check that does not need the kernel's cooperation: interfaces exist, addresses and
    /// ports are valid, names and inputs are unique, no output loops back into its input.
    pub fn validate(&self, file: &str, sys: &dyn System) -> Result<(), ConfigError> {
        self.validate_with(file, sys, true)
    }

    /// As [`Config::validate`], without checking that each `source:` is an address its
    /// interface has now: for applying the running rules again when interfaces or their
    /// addresses change under them, where an output whose address went away drops its
    /// frames (`no_source`) until one is back, rather than holding the whole table back.
    pub fn validate_running(&self, file: &str, sys: &dyn System) -> Result<(), ConfigError> {
        self.validate_with(file, sys, false)
    }

    fn validate_with(
        &self,
        file: &str,
        sys: &dyn System,
        check_sources: bool,
    ) -> Result<(), ConfigError> {
        let sys = &KindsOnce {
            sys,
            links: Default::default(),
        };
        let top = |message: String| ConfigError {
            file: file.to_owned(),
            rule: None,
            message,
        };
        let UmemConfig {
            frames,
            frame_size,
            ref separate,
        } = self.umem;
        for name in separate {
            check_interface_name(name, "umem.separate").map_err(top)?;
        }
        if separate.len() > MAX_SEPARATE_UMEMS {
            return Err(top(format!(
                "umem.separate lists {} interfaces: at most {MAX_SEPARATE_UMEMS} get a UMEM of their own",
                separate.len()
            )));
        }
        if !frames.is_power_of_two() || !(512..=1 << 20).contains(&frames) {
            return Err(top(format!(
                "umem.frames is {frames}: it must be a power of two from 512 to 1048576"
            )));
        }
        if frame_size != 2048 && frame_size != 4096 {
            return Err(top(format!(
                "umem.frame_size is {frame_size}: AF_XDP takes 2048 or 4096"
            )));
        }
        if let Some(w) = self.workers
            && !(1..=256).contains(&w)
        {
            return Err(top(format!("workers is {w}: it must be from 1 to 256")));
        }
        if let Some(cpus) = &self.cpus {
            if cpus.is_empty() {
                return Err(top(
                    "cpus is empty: list the CPUs to pin the workers to, or leave it out"
                        .to_owned(),
                ));
            }
            let mut seen = HashSet::new();
            for &c in cpus {
                if c >= 1024 {
                    return Err(top(format!(
                        "cpus: CPU {c} is beyond the 1024 the relay can pin to"
                    )));
                }
                if !seen.insert(c) {
                    return Err(top(format!("cpus lists CPU {c} twice")));
                }
            }
            if let Some(allowed) = sys.allowed_cpus()
                && let Some(c) = cpus.iter().find(|c| !allowed.contains(c))
            {
                return Err(top(format!(
                    "cpus: CPU {c} is not available to the relay (it may run on {}): fix \
                     `cpus:` or leave it out",
                    crate::sys::cpu_list(&allowed)
                )));
            }
        }
        if self.rules.is_empty() {
            return Err(top("no rules: there is nothing to relay".to_owned()));
        }
        self.querier.check().map_err(top)?;

        let mut names = HashSet::new();
        let mut inputs = HashSet::new();
        let mut ingress = HashSet::new();
        let mut tuples = HashSet::new();
        for rule in &self.rules {
            let err = |message: String| ConfigError {
                file: file.to_owned(),
                rule: Some(rule.name.clone()),
                message,
            };
            if rule.name.is_empty() {
                return Err(err("the rule name is empty".to_owned()));
            }
            if !names.insert(rule.name.as_str()) {
                return Err(err("duplicate rule name".to_owned()));
            }
            self.check_merge(rule).map_err(err)?;
            let mut address = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
            for (leg, input) in rule.inputs().enumerate() {
                // A merged rule's errors say which leg; a plain rule's read as they always did.
                let merged = !rule.legs.is_empty();
                let err = |message: String| {
                    err(if merged {
                        format!("inputs[{leg}]: {message}")
                    } else {
                        message
                    })
                };
                check_interface_name(&input.interface, "input").map_err(err)?;
                self.check_ingress_kind(&input.interface, input.vlan, sys)
                    .map_err(err)?;
                // An interface that does not exist yet leaves the rule idle until it appears
                // (see `absent_interfaces`).
                let info = sys
                    .interface(&input.interface)
                    .unwrap_or_else(InterfaceInfo::absent);
                if info.rx_queues > MAX_QUEUES_PER_IFACE {
                    return Err(err(format!(
                        "input interface '{}' has {} rx queues: the relay steers at most \
                         {MAX_QUEUES_PER_IFACE} per interface (`ethtool -L {} combined \
                         {MAX_QUEUES_PER_IFACE}` lowers them)",
                        input.interface, info.rx_queues, input.interface
                    )));
                }
                ingress.insert(input.interface.as_str());
                if ingress.len() > MAX_INGRESS_IFACES as usize {
                    return Err(err(format!(
                        "input interface '{}' is one more than the {MAX_INGRESS_IFACES} input \
                         interfaces the relay steers",
                        input.interface
                    )));
                }
                let leg_address = match (input.group, input.destination) {
                    (Some(g), Some(d)) => {
                        return Err(err(format!(
                            "input has both group {g} and destination {d}: an input takes a group \
                             or a unicast destination, not both"
                        )));
                    }
                    (None, None) => {
                        return Err(err(
                            "input has neither group: nor destination:: name the group to relay, \
                             or the unicast address and port"
                                .to_owned(),
                        ));
                    }
                    (Some(g), None) => {
                        check_group_prefix(&g, "input group", "").map_err(err)?;
                        g.addr
                    }
                    (None, Some(d)) => {
                        if d.is_multicast() {
                            return Err(err(format!(
                                "input destination {d} is a multicast address: it goes in group:"
                            )));
                        }
                        if !is_unicast_host(d) {
                            return Err(err(format!(
                                "input destination {d} is not a unicast host address"
                            )));
                        }
                        if input.port.is_none() {
                            return Err(err(format!(
                                "input destination {d} has no port: a unicast input takes the UDP \
                                 datagrams to one port of the address, and the host keeps the rest"
                            )));
                        }
                        d
                    }
                };
                let unicast_in = input.destination.is_some();
                if input.port == Some(0) {
                    return Err(err("input port 0 is not a valid UDP port".to_owned()));
                }
                if let Some(src) = input.source {
                    if src.addr.is_ipv4() != leg_address.is_ipv4() {
                        return Err(err(format!(
                            "input source {src} and {} {} are of different families: a rule is \
                             all IPv4 or all IPv6",
                            input_key(unicast_in),
                            input.prefix()
                        )));
                    }
                    check_source_prefix(&src).map_err(err)?;
                }
                if let Some(v) = input.vlan
                    && !v.is_valid()
                {
                    return Err(err(format!(
                        "input vlan {v} is not a VLAN ID from 1 to 4094 or untagged"
                    )));
                }
                let key = (
                    &input.interface,
                    input.prefix(),
                    input.port,
                    input.source,
                    input.vlan,
                );
                if !inputs.insert(key) {
                    return Err(err(format!(
                        "another rule already has the input {} {}:{} from {}{}",
                        input.interface,
                        input.prefix(),
                        input.port.map_or("any".to_owned(), |p| p.to_string()),
                        input.source.map_or("any".to_owned(), |s| s.to_string()),
                        input.vlan.map_or(String::new(), |v| format!(" vlan {v}")),
                    )));
                }
                // With ranges the XDP program walks one lookup per tuple (form of input) in a
                // loop the verifier must see end; during a reload it walks the old and the new
                // rules' tuples, so each table gets half of the program's bound.
                tuples.insert(crate::rules::input_tuple(input));
                if tuples.len() > MAX_TUPLES as usize {
                    return Err(err(format!(
                        "input {} {}:{} from {}{} makes {} forms of input (family, VLAN or any, \
                         group prefix length, source prefix length, port or any; this one's \
                         lengths are /{} and {}): the XDP program looks up at most {MAX_TUPLES}; \
                         use fewer distinct prefix lengths",
                        input.interface,
                        input.prefix(),
                        input.port.map_or("any".to_owned(), |p| p.to_string()),
                        input.source.map_or("any".to_owned(), |s| s.to_string()),
                        input.vlan.map_or(String::new(), |v| format!(" vlan {v}")),
                        tuples.len(),
                        input.prefix().len,
                        input
                            .source
                            .map_or("/0".to_owned(), |s| format!("/{}", s.len)),
                    )));
                }
                if leg == 0 {
                    address = leg_address;
                } else if leg_address.is_ipv4() != address.is_ipv4() {
                    return Err(err(format!(
                        "{} {} and the first leg's {address} are of different families: a rule \
                         is all IPv4 or all IPv6",
                        input_key(unicast_in),
                        input.prefix()
                    )));
                }
                if merged && !input.prefix().is_host() {
                    return Err(err(format!(
                        "group {} is a range: a leg of a merged stream is one group",
                        input.prefix()
                    )));
                }
            }
            let input = &rule.input;
            if rule.outputs.is_empty() {
                return Err(err("no outputs".to_owned()));
            }
            let mut seen_outputs = HashSet::new();
            for out in &rule.outputs {
                self.validate_output(rule, out, address, sys, check_sources, &err)?;
                let g = out.prefix().unwrap_or(input.prefix());
                let p = out.port.or(input.port);
                // Two VLANs of one trunk are two networks: the same group may go to each.
                let vid = out.vlan.and_then(Vlan::vid);
                if !seen_outputs.insert((&out.interface, g, p, vid)) {
                    return Err(err(format!(
                        "two outputs send the same {} {g} and port {} on '{}'{}",
                        if g.addr.is_multicast() {
                            "group"
                        } else {
                            "destination"
                        },
                        p.map_or("(as received)".to_owned(), |p| p.to_string()),
                        out.interface,
                        vid.map_or(String::new(), |v| format!(" vlan {v}")),
                    )));
                }
                // What the output sends (a merged stream goes out as its first leg) against
                // what each leg receives.
                let sends = (
                    out.prefix().unwrap_or(input.prefix()),
                    out.port.or(input.port),
                );
                for leg in rule.inputs() {
                    if out.interface == leg.interface
                        && sends.0 == leg.prefix()
                        && sends.1 == leg.port
                        && crate::vlan::may_loop(leg.vlan, out.vlan)
                    {
                        return Err(err(format!(
                            "output on '{}' sends the input's own {} and port back out of its \
                             input interface: a loop",
                            out.interface,
                            input_key(leg.destination.is_some())
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// An input interface of a kind the XDP program can run on in `xdp_mode`: Ethernet, and
    /// with a driver that runs XDP itself when the mode is `native` (a bridge, macvlan or vxlan
    /// has generic mode only, and the attach would fail half-way through the start).
    fn check_ingress_kind(
        &self,
        name: &str,
        vlan: Option<Vlan>,
        sys: &dyn System,
    ) -> Result<(), String> {
        let Some(link) = sys.link(name) else {
            return Ok(());
        };
        if let Some(why) = link.refusal("input", name) {
            return Err(why);
        }
        if let Some(why) = vlan.and_then(|v| link.vlan_refusal(name, v, self.xdp_mode)) {
            return Err(why);
        }
        if self.xdp_mode == XdpModeConfig::Native && link.native_xdp == Some(false) {
            return Err(format!(
                "input interface '{name}' (kind {}) has no native XDP (its driver does not run \
                 XDP programs), so xdp_mode: native cannot attach there; use xdp_mode: auto \
                 (native where the driver has it, skb mode elsewhere) or xdp_mode: skb",
                link.kind_name()
            ));
        }
        Ok(())
    }

    /// `inputs:`, `merge:` and `window_ms:` together: two or more legs need a numbering to
    /// merge by, one input has nothing to merge, and the numbering and window are ones the
    /// merge can read and time.
    fn check_merge(&self, rule: &Rule) -> Result<(), String> {
        let legs = 1 + rule.legs.len();
        match (&rule.merge, legs) {
            (None, 1) => {
                if let Some(w) = rule.window_ms {
                    return Err(format!(
                        "window_ms {w} without merge:: the window is how long a merged stream \
                         remembers a sequence number"
                    ));
                }
                return Ok(());
            }
            (None, n) => {
                return Err(format!(
                    "inputs: lists {n} legs but there is no merge:: say how their packets are \
                     numbered (merge: rtp, or merge: {{ offset: N, bytes: 4 }})"
                ));
            }
            (Some(_), 1) => {
                return Err(
                    "merge: with one input: a merge takes two or more legs (inputs:)".to_owned(),
                );
            }
            (Some(MergeSpec::Named(n)), _) if n != "rtp" => {
                return Err(format!(
                    "merge: {n} is not a numbering the relay reads: rtp (the RTP sequence \
                     number), or {{ offset: N, bytes: 4 or 8 }} (a counter in the payload)"
                ));
            }
            (Some(MergeSpec::Counter(c)), _) => {
                if c.bytes != 4 && c.bytes != 8 {
                    return Err(format!(
                        "merge: bytes {}: a payload counter is 4 or 8 bytes",
                        c.bytes
                    ));
                }
                if c.offset + c.bytes > MAX_UDP_PAYLOAD {
                    return Err(format!(
                        "merge: offset {} with bytes {} ends beyond the largest UDP payload \
                         ({MAX_UDP_PAYLOAD} bytes)",
                        c.offset, c.bytes
                    ));
                }
            }
            (Some(_), _) => {
                // RTP senders send RTCP to the next port up (ST 2110, ST 2022-7): a leg on
                // any port would take it, and its length read as a sequence number pushes
                // the merge ahead of the real packets.
                if let Some((leg, input)) =
                    rule.inputs().enumerate().find(|(_, i)| i.port.is_none())
                {
                    let (key, address) = match (input.group, input.destination) {
                        (Some(g), _) => ("group", g.to_string()),
                        (None, Some(d)) => ("destination", d.to_string()),
                        (None, None) => ("group", "(none)".to_owned()),
                    };
                    return Err(format!(
                        "inputs[{leg}]: merge: rtp needs port: on every leg, and the leg \
                         {key} {address} on {} has none: it would take the RTCP its senders \
                         send to the next port as RTP (name the RTP port, e.g. port: 5000)",
                        input.interface
                    ));
                }
            }
        }
        if let Some(w) = rule.window_ms
            && !(1..=crate::merge::MAX_WINDOW_MS).contains(&w)
        {
            return Err(format!(
                "window_ms {w} is out of range: from 1 to {} ms",
                crate::merge::MAX_WINDOW_MS
            ));
        }
        Ok(())
    }

    /// One output's own keys: its addresses and ports, their families against the input's
    /// `address`, and a `source:` the interface can send from.
    fn validate_output(
        &self,
        rule: &Rule,
        out: &Output,
        address: IpAddr,
        sys: &dyn System,
        check_sources: bool,
        err: &dyn Fn(String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let on = &out.interface;
        let unicast_in = rule.input.destination.is_some();
        let family = |what: &str, a: IpAddr| -> Result<(), ConfigError> {
            if a.is_ipv4() == address.is_ipv4() {
                return Ok(());
            }
            Err(err(format!(
                "output {what} {a} on '{on}' and input {} {address} are of different families: \
                 a rule is all IPv4 or all IPv6",
                input_key(unicast_in)
            )))
        };
        if let Some(v) = out.vlan
            && !v.is_valid()
        {
            return Err(err(format!(
                "output vlan {v} on '{on}' is not a VLAN ID from 1 to 4094 or untagged"
            )));
        }
        check_interface_name(on, "output").map_err(err)?;
        if let Some(why) = sys.link(on).and_then(|l| l.refusal("output", on)) {
            return Err(err(why));
        }
        if let Some(d) = out.dscp
            && d > 63
        {
            return Err(err(format!(
                "output dscp {d} on '{on}' is out of range: a DSCP is 0 to 63 (46 is EF, 34 \
                 AF41, 0 best effort)"
            )));
        }
        match (out.group, out.destination) {
            (Some(g), Some(d)) => {
                return Err(err(format!(
                    "output on '{on}' has both group {g} and destination {d}: an output sends \
                     to a group or to a unicast destination, not both"
                )));
            }
            (Some(g), None) => {
                family("group", g.addr)?;
                check_group_prefix(&g, "output group", &format!(" on '{on}'")).map_err(err)?;
                let input = rule.input.prefix();
                if !g.is_host() && (unicast_in || input.is_host()) {
                    return Err(err(format!(
                        "output group {g} on '{on}' is a range: only a range input (a group \
                         with a /length) maps onto a range"
                    )));
                }
                if !g.is_host() && g.len != input.len {
                    return Err(err(format!(
                        "output group {g} on '{on}' is a /{}: the input's {input} maps onto a \
                         /{} (the host bits carry over), a single group, or no group:",
                        g.len, input.len
                    )));
                }
            }
            (None, Some(d)) => {
                family("destination", d)?;
                if d.is_multicast() {
                    return Err(err(format!(
                        "output destination {d} on '{on}' is a multicast address: it goes in \
                         group:"
                    )));
                }
                if !is_unicast_host(d) {
                    return Err(err(format!(
                        "output destination {d} on '{on}' is not a unicast host address"
                    )));
                }
            }
            (None, None) if unicast_in => {
                return Err(err(format!(
                    "output on '{on}' has neither group: nor destination:: the input's \
                     destination {address} is an address of this host, so each output names \
                     where to send"
                )));
            }
            (None, None) => {}
        }
        if out.on_demand {
            if let Some(d) = out.destination {
                return Err(err(format!(
                    "output on_demand on '{on}' sends to the unicast destination {d}: only a \
                     group has members to follow"
                )));
            }
            if let Some(v) = out.vlan.filter(|v| v.vid().is_some()) {
                return Err(err(format!(
                    "output on_demand on '{on}' with vlan {v}: on-demand outputs follow the \
                     listeners of an interface, not of a VLAN on a trunk; use the VLAN's own \
                     interface ({on}.{v}), or leave on_demand out"
                )));
            }
            if let Some(g) = out.group.or(rule.input.group)
                && !g.is_host()
            {
                return Err(err(format!(
                    "output on_demand on '{on}' sends to the range {g}: on-demand outputs \
                     follow one group each; give the output one group, or leave on_demand out"
                )));
            }
        }
        if out.port == Some(0) {
            return Err(err(format!(
                "output port 0 on '{on}' is not a valid UDP port"
            )));
        }
        if out.source_port == Some(0) {
            return Err(err(format!(
                "output source_port 0 on '{on}' is not a valid UDP port"
            )));
        }
        if out.ttl == Some(0) {
            return Err(err(format!(
                "output ttl 0 on '{on}' would never be delivered"
            )));
        }
        // An interface that does not exist yet has no addresses to check against: its
        // output is checked again when it appears (a rule cannot come alive without it).
        let exists = check_sources && sys.interface(on).is_some();
        match out.source {
            Some(SourceSpec::Address(a)) => {
                family("source", a)?;
                if !is_unicast_host(a) {
                    return Err(err(format!(
                        "output source {a} on '{on}' is not a unicast host address"
                    )));
                }
                let has = sys.addresses(on);
                if exists && !has.contains(&a) {
                    return Err(err(format!(
                        "output source {a} is not an address of '{on}' ({}): use one it has, \
                         or source: auto",
                        address_list(&has)
                    )));
                }
            }
            Some(SourceSpec::Auto)
                if exists && auto_source(&sys.addresses(on), address.is_ipv4()).is_none() =>
            {
                return Err(err(format!(
                    "output source auto on '{on}': '{on}' has no {} address to send from (add \
                     one, or name the source)",
                    if address.is_ipv4() {
                        "IPv4"
                    } else {
                        "global IPv6"
                    }
                )));
            }
            Some(SourceSpec::Auto) | None => {}
        }
        Ok(())
    }
}

/// A group or range of groups as `what` (`input group`) may name it, `at` (` on 'out0'`)
/// after the value: inside the multicast range of its family, with no bits set past its
/// length.
fn check_group_prefix(g: &Prefix, what: &str, at: &str) -> Result<(), String> {
    let range = multicast_range(g.addr);
    let min = if g.addr.is_ipv4() { 4 } else { 8 };
    if !g.addr.is_multicast() || g.len < min {
        return Err(if g.is_host() {
            format!(
                "{what} {g}{at} is not a multicast address ({range}): a unicast address goes \
                 in destination:"
            )
        } else {
            format!("{what} {g}{at} is not inside the multicast range {range}")
        });
    }
    if g.has_host_bits() {
        return Err(format!(
            "{what} {g}{at} has bits set past its /{}: the range is {}/{}",
            g.len,
            g.network(),
            g.len
        ));
    }
    Ok(())
}

/// An input's `source:`: one host, or a prefix of unicast sources.
fn check_source_prefix(src: &Prefix) -> Result<(), String> {
    if src.is_host() {
        if !is_unicast_host(src.addr) {
            return Err(format!("input source {src} is not a unicast host address"));
        }
        return Ok(());
    }
    if src.len == 0 {
        return Err(format!(
            "input source {src} is every source: leave source: out to take any"
        ));
    }
    if src.has_host_bits() {
        return Err(format!(
            "input source {src} has bits set past its /{}: the prefix is {}/{}",
            src.len,
            src.network(),
            src.len
        ));
    }
    if src.addr.is_multicast() {
        return Err(format!("input source {src} is not a unicast prefix"));
    }
    Ok(())
}

/// "group" or "destination": what an input's address is called in messages.
fn input_key(unicast: bool) -> &'static str {
    if unicast { "destination" } else { "group" }
}

/// An address one host can have: not multicast, unspecified or the IPv4 broadcast.
fn is_unicast_host(a: IpAddr) -> bool {
    let broadcast = matches!(a, IpAddr::V4(a) if a.is_broadcast());
    !(a.is_multicast() || a.is_unspecified() || broadcast)
}

/// Addresses for a message: "it has 198.18.2.1, 2001:2:0:2::1", or "it has none".
fn address_list(addrs: &[IpAddr]) -> String {
    if addrs.is_empty() {
        return "it has none".to_owned();
    }
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    format!("it has {}", list.join(", "))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    pub(crate) struct FakeSystem(pub HashMap<&'static str, InterfaceInfo>);

    impl System for FakeSystem {
        fn interface(&self, name: &str) -> Option<InterfaceInfo> {
            self.0.get(name).copied()
        }

        /// 198.18.N.1 and 2001:2:0:N::1 for ifindex N, none for `bare0`.
        fn addresses(&self, name: &str) -> Vec<IpAddr> {
            match self.0.get(name) {
                Some(_) if name == "bare0" => Vec::new(),
                Some(i) => static_addresses(i.ifindex),
                None => Vec::new(),
            }
        }
    }

    pub(crate) fn fake() -> FakeSystem {
        let mut m = HashMap::new();
        for (i, n) in ["in0", "out0", "out1", "bare0"].into_iter().enumerate() {
            m.insert(
                n,
                InterfaceInfo {
                    ifindex: 10 + i as u32,
                    mac: [2, 0, 0, 0, 0, i as u8],
                    rx_queues: 1,
                    mtu: 1500,
                },
            );
        }
        FakeSystem(m)
    }

    const EXAMPLE: &str = r#"
allocator: lockfree
umem: { frames: 4096, frame_size: 2048 }
xdp_mode: auto
bind: auto
rules:
  - name: video-a
    input:
      interface: in0
      group: 239.1.1.1
      port: 5000
      source: 198.18.1.1
    outputs:
      - interface: out0
      - interface: out1
        group: 239.2.2.2
        port: 6000
        ttl: 16
"#;

    #[test]
    fn the_documented_example_parses_and_validates() {
        let c = Config::parse("rules.yaml", EXAMPLE).unwrap();
        c.validate("rules.yaml", &fake()).unwrap();
        assert_eq!(
            c.rules[0].outputs[1].group,
            Some(Prefix::from([239, 2, 2, 2]))
        );
        assert_eq!(c.rules[0].outputs[1].ttl, Some(16));
        assert_eq!(c.rules[0].input.source, Some(Prefix::from([198, 18, 1, 1])));
    }

    /// Ranges and prefixes: a /16 onto a /16, many onto one, unchanged; a source prefix;
    /// an exact group inside a range beside it.
    #[test]
    fn group_ranges_and_source_prefixes_parse_and_validate() {
        let yaml = r#"
rules:
  - name: channels
    input: { interface: in0, group: 239.10.0.0/16, port: 5000 }
    outputs:
      - { interface: out0, group: 239.20.0.0/16 }
      - { interface: out1, group: 239.99.0.1 }
      - { interface: bare0 }
  - name: one-channel
    input: { interface: in0, group: 239.10.3.4, port: 5000 }
    outputs: [ { interface: out1 } ]
  - name: by-sender
    input: { interface: in0, group: 239.30.0.0/24, source: 198.18.7.0/24 }
    outputs: [ { interface: out1 } ]
  - name: v6
    input: { interface: in0, group: 'ff18::/16', source: '2001:2:7::/48' }
    outputs: [ { interface: out1, group: 'ff15::/16' } ]
"#;
        let c = Config::parse("r.yaml", yaml).unwrap();
        c.validate("r.yaml", &fake()).unwrap();
        let r = &c.rules[0];
        assert_eq!(r.input.prefix().to_string(), "239.10.0.0/16");
        assert_eq!(r.outputs[0].group.unwrap().len, 16);
        assert!(r.outputs[1].group.unwrap().is_host());
        assert_eq!(
            c.rules[2].input.source.unwrap().to_string(),
            "198.18.7.0/24"
        );
    }

    /// The gateway configuration of the operator's guide: multicast to unicast with source
    /// rewrite, and unicast to multicast.
    #[test]
    fn gateway_keys_parse_and_validate() {
        let yaml = r#"
rules:
  - name: feed-to-wan
    input: { interface: in0, group: 239.1.1.1, port: 5000 }
    outputs:
      - interface: out0
        destination: 198.18.2.2
        port: 7000
        source: auto
        source_port: 7001
        dscp: 46
      - { interface: out0, destination: 198.18.9.9, port: 7002, source: 198.18.11.1 }
  - name: wan-to-lan
    input: { interface: in0, destination: 198.18.1.2, port: 7100 }
    outputs:
      - { interface: out1, group: 239.5.5.5, port: 5000, ttl: 8, source: auto }
  - name: v6
    input: { interface: in0, destination: '2001:2:0:1::2', port: 7100 }
    outputs:
      - { interface: out1, destination: '2001:2:0:3::2', source: auto }
"#;
        let c = Config::parse("r.yaml", yaml).unwrap();
        c.validate("r.yaml", &fake()).unwrap();
        let o = &c.rules[0].outputs[0];
        assert_eq!(o.destination, Some(IpAddr::from([198, 18, 2, 2])));
        assert_eq!(
            (o.source, o.source_port),
            (Some(SourceSpec::Auto), Some(7001))
        );
        assert_eq!(
            c.rules[0].outputs[1].source,
            Some(SourceSpec::Address(IpAddr::from([198, 18, 11, 1])))
        );
        assert_eq!(c.rules[1].input.address(), IpAddr::from([198, 18, 1, 2]));
        assert_eq!(c.rules[1].input.group, None);
        // `auto` resolves per family: IPv4 primary, IPv6 first global.
        let addrs: Vec<IpAddr> = ["fe80::1", "198.18.5.1", "198.18.6.1", "2001:2::5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(auto_source(&addrs, true), Some(addrs[1]));
        assert_eq!(auto_source(&addrs, false), Some(addrs[3]));
        assert_eq!(auto_source(&addrs[..1], false), None);
        // A `source:` that is neither.
        let bad = yaml.replace("source: auto\n", "source: nearest\n");
        assert_eq!(
            Config::parse("r.yaml", &bad).unwrap_err().to_string(),
            "r.yaml: rule 'feed-to-wan': rules[0].outputs[0].source: invalid value: string \
             \"nearest\", expected `auto` or an IP address at line 9 column 17"
        );
        let bad = yaml.replace("198.18.2.2", "300.2.2.2");
        assert_eq!(
            Config::parse("r.yaml", &bad).unwrap_err().to_string(),
            "r.yaml: rule 'feed-to-wan': rules[0].outputs[0].destination: invalid IP address \
             syntax: `300.2.2.2` at line 7 column 22"
        );
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse(
            "r.yaml",
            "rules:\n  - name: a\n    input: {interface: in0, group: 239.0.0.1}\n    outputs: [{interface: out0}]\n",
        )
        .unwrap();
        assert_eq!(c.allocator, AllocatorKind::Lockfree);
        assert_eq!(
            c.umem,
            UmemConfig {
                frames: 4096,
                frame_size: 2048,
                separate: Vec::new(),
            }
        );
        assert_eq!(c.xdp_mode, XdpModeConfig::Auto);
        assert_eq!(c.bind, BindMode::Auto);
        assert_eq!((c.workers, c.cpus.clone()), (None, None));
        assert_eq!(c.rules[0].input.port, None);
        c.validate("r.yaml", &fake()).unwrap();
    }

    #[test]
    fn ipv6_rules_parse_with_hop_limit() {
        let c = Config::parse(
            "r.yaml",
            "rules:\n  - name: v6\n    input: {interface: in0, group: ff18::1:1, port: 5000, source: 2001:2::1}\n    outputs: [{interface: out0, group: 'ff18::2:2', hop_limit: 9}]\n",
        )
        .unwrap();
        c.validate("r.yaml", &fake()).unwrap();
        let r = &c.rules[0];
        assert_eq!(r.input.group, Some("ff18::1:1".parse::<Prefix>().unwrap()));
        assert_eq!(r.input.source, Some("2001:2::1".parse().unwrap()));
        assert_eq!(r.outputs[0].group, Some("ff18::2:2".parse().unwrap()));
        assert_eq!(r.outputs[0].ttl, Some(9));
    }

    /// `ttl` and `hop_limit` are one setting: both on one output names both, their values
    /// and the rule, in a file and in a rule given to add-rule.
    #[test]
    fn ttl_and_hop_limit_together_are_refused_by_name() {
        let yaml = "rules:\n  - name: v6\n    input: {interface: in0, group: ff18::1:1}\n    outputs: [{interface: out0}, {interface: out1, ttl: 5, hop_limit: 9}]\n";
        let e = Config::parse("r.yaml", yaml).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "r.yaml: rule 'v6': outputs[1]: `ttl: 5` and `hop_limit: 9`: `hop_limit` is another name for `ttl` (the IPv6 one); give one of them at line 4"
            ),
            "{e}"
        );
        let one = "name: v6\ninput: {interface: in0, group: ff18::1:1}\noutputs: [{interface: out1, hop_limit: 9, ttl: 5}]\n";
        let e = Rule::parse_one("new.yaml", one).unwrap_err().to_string();
        assert!(
            e.starts_with("new.yaml: rule 'v6': outputs[0]: `ttl: 5` and `hop_limit: 9`"),
            "{e}"
        );
    }

    /// What add-rule takes: a mapping, or a list of one item pasted from a file; anything
    /// else is refused with the source's name.
    #[test]
    fn one_rule_parses_as_a_mapping_or_a_list_of_one() {
        let mapping =
            "name: a\ninput: {interface: in0, group: 239.1.1.1}\noutputs: [{interface: out0}]\n";
        let item = "- name: a\n  input: {interface: in0, group: 239.1.1.1}\n  outputs: [{interface: out0}]\n";
        assert_eq!(
            Rule::parse_one("a.yaml", mapping).unwrap(),
            Rule::parse_one("a.yaml", item).unwrap()
        );
        let two = format!("{item}{}", item.replace("name: a", "name: b"));
        assert_eq!(
            Rule::parse_one("a.yaml", &two).unwrap_err().to_string(),
            "a.yaml: a list of 2 rules (a, b): add-rule adds one at a time"
        );
        let file = format!(
            "rules:\n{}",
            item.replace("- ", "  - ").replace("\n  ", "\n    ")
        );
        assert!(
            Rule::parse_one("a.yaml", &file)
                .unwrap_err()
                .to_string()
                .starts_with("a.yaml: a config file (it has `rules:`)")
        );
        let bad = item.replace("239.1.1.1", "239.1.1");
        assert_eq!(
            Rule::parse_one("standard input", &bad)
                .unwrap_err()
                .to_string(),
            "standard input: rule 'a': input.group: invalid value: string \"239.1.1\", expected an IP address or a prefix such as 239.10.0.0/16 at line 2 column 34"
        );
    }

    /// The allocator's name as the log writes it is accepted too.
    #[test]
    fn lock_free_is_spelled_either_way() {
        for spelling in ["lockfree", "lock-free"] {
            let c =
                Config::parse("r.yaml", &format!("allocator: {spelling}\nrules: []\n")).unwrap();
            assert_eq!(c.allocator, AllocatorKind::Lockfree);
        }
    }

    #[test]
    fn default_workers_is_one_per_queue_up_to_the_cpus() {
        assert_eq!(default_workers(1, 2), 1);
        assert_eq!(default_workers(2, 2), 2);
        assert_eq!(default_workers(8, 2), 2);
        assert_eq!(default_workers(0, 2), 1);
        assert_eq!(default_workers(3, 0), 1);
    }

    /// Each broken config and the exact message it must produce.
    #[test]
    fn broken_configs_name_file_rule_and_value() {
        // 224.0.0.0/len: the lowest IPv4 group of each length, with no host bits.
        let mask_str =
            |l: u32| std::net::Ipv4Addr::from(0xe000_0000u32 & (u32::MAX << (32 - l))).to_string();
        let rule = |input: &str, outputs: &str| {
            format!("rules:\n  - name: r1\n    input: {input}\n    outputs: {outputs}\n")
        };
        let ok_in = "{interface: in0, group: 239.1.1.1, port: 5000}";
        let ok_out = "[{interface: out0}]";
        let cases: Vec<(String, &str)> = vec![
            (
                rule(
                    "{interface: in0, group: 239.10.0.0/16, port: 5000}",
                    "[{interface: out0, group: 239.20.0.0/24}]",
                ),
                "r.yaml: rule 'r1': output group 239.20.0.0/24 on 'out0' is a /24: the input's \
                 239.10.0.0/16 maps onto a /16 (the host bits carry over), a single group, or no \
                 group:",
            ),
            (
                rule(ok_in, "[{interface: out0, group: 239.20.0.0/16}]"),
                "r.yaml: rule 'r1': output group 239.20.0.0/16 on 'out0' is a range: only a range \
                 input (a group with a /length) maps onto a range",
            ),
            (
                rule("{interface: in0, group: 239.10.3.4/16}", ok_out),
                "r.yaml: rule 'r1': input group 239.10.3.4/16 has bits set past its /16: the range \
                 is 239.10.0.0/16",
            ),
            (
                rule("{interface: in0, group: 192.0.0.0/2}", ok_out),
                "r.yaml: rule 'r1': input group 192.0.0.0/2 is not inside the multicast range \
                 224.0.0.0/4",
            ),
            (
                rule("{interface: in0, group: 'fe00::/7'}", ok_out),
                "r.yaml: rule 'r1': input group fe00::/7 is not inside the multicast range ff00::/8",
            ),
            (
                rule(
                    "{interface: in0, group: 239.10.0.0/16, source: 198.18.7.0/16}",
                    ok_out,
                ),
                "r.yaml: rule 'r1': input source 198.18.7.0/16 has bits set past its /16: the \
                 prefix is 198.18.0.0/16",
            ),
            (
                rule(
                    "{interface: in0, group: 239.10.0.0/16, source: 0.0.0.0/0}",
                    ok_out,
                ),
                "r.yaml: rule 'r1': input source 0.0.0.0/0 is every source: leave source: out to \
                 take any",
            ),
            (
                rule(
                    "{interface: in0, group: 239.10.0.0/16, source: '2001:2::/48'}",
                    ok_out,
                ),
                "r.yaml: rule 'r1': input source 2001:2::/48 and group 239.10.0.0/16 are of \
                 different families: a rule is all IPv4 or all IPv6",
            ),
            (
                format!(
                    "{}  - name: r2\n    input: {{interface: in0, group: 239.10.0.0/16, source: 198.18.7.0/24}}\n    outputs: {ok_out}\n",
                    rule(
                        "{interface: in0, group: 239.10.0.0/16, source: 198.18.7.0/24}",
                        ok_out
                    )
                ),
                "r.yaml: rule 'r2': another rule already has the input in0 239.10.0.0/16:any from \
                 198.18.7.0/24",
            ),
            (
                rule(ok_in, "[{interface: out0, source: 198.18.7.7}]"),
                "r.yaml: rule 'r1': output source 198.18.7.7 is not an address of 'out0' (it has \
                 198.18.11.1, 2001:2:0:b::1): use one it has, or source: auto",
            ),
            (
                rule(ok_in, "[{interface: bare0, source: auto}]"),
                "r.yaml: rule 'r1': output source auto on 'bare0': 'bare0' has no IPv4 address to \
                 send from (add one, or name the source)",
            ),
            (
                rule(
                    "{interface: in0, group: 'ff18::1'}",
                    "[{interface: bare0, source: auto}]",
                ),
                "r.yaml: rule 'r1': output source auto on 'bare0': 'bare0' has no global IPv6 \
                 address to send from (add one, or name the source)",
            ),
            (
                rule(ok_in, "[{interface: out0, source: '2001:2:0:b::1'}]"),
                "r.yaml: rule 'r1': output source 2001:2:0:b::1 on 'out0' and input group \
                 239.1.1.1 are of different families: a rule is all IPv4 or all IPv6",
            ),
            (
                rule(ok_in, "[{interface: out0, destination: '2001:2::9'}]"),
                "r.yaml: rule 'r1': output destination 2001:2::9 on 'out0' and input group \
                 239.1.1.1 are of different families: a rule is all IPv4 or all IPv6",
            ),
            (
                rule(ok_in, "[{interface: out0, destination: 239.5.5.5}]"),
                "r.yaml: rule 'r1': output destination 239.5.5.5 on 'out0' is a multicast \
                 address: it goes in group:",
            ),
            (
                rule(ok_in, "[{interface: out0, destination: 255.255.255.255}]"),
                "r.yaml: rule 'r1': output destination 255.255.255.255 on 'out0' is not a \
                 unicast host address",
            ),
            (
                rule(
                    ok_in,
                    "[{interface: out0, group: 239.5.5.5, destination: 198.18.2.2}]",
                ),
                "r.yaml: rule 'r1': output on 'out0' has both group 239.5.5.5 and destination \
                 198.18.2.2: an output sends to a group or to a unicast destination, not both",
            ),
            (
                rule(ok_in, "[{interface: out0, source_port: 0}]"),
                "r.yaml: rule 'r1': output source_port 0 on 'out0' is not a valid UDP port",
            ),
            (
                rule("{interface: in0, destination: 198.18.1.2}", ok_out),
                "r.yaml: rule 'r1': input destination 198.18.1.2 has no port: a unicast input \
                 takes the UDP datagrams to one port of the address, and the host keeps the \
                 rest",
            ),
            (
                rule(
                    "{interface: in0, destination: 239.1.1.1, port: 7100}",
                    ok_out,
                ),
                "r.yaml: rule 'r1': input destination 239.1.1.1 is a multicast address: it goes \
                 in group:",
            ),
            (
                rule(
                    "{interface: in0, group: 239.1.1.1, destination: 198.18.1.2}",
                    ok_out,
                ),
                "r.yaml: rule 'r1': input has both group 239.1.1.1 and destination 198.18.1.2: an \
                 input takes a group or a unicast destination, not both",
            ),
            (
                rule("{interface: in0, port: 5000}", ok_out),
                "r.yaml: rule 'r1': input has neither group: nor destination:: name the group to \
                 relay, or the unicast address and port",
            ),
            (
                rule(
                    "{interface: in0, destination: 198.18.1.2, port: 7100}",
                    ok_out,
                ),
                "r.yaml: rule 'r1': output on 'out0' has neither group: nor destination:: the \
                 input's destination 198.18.1.2 is an address of this host, so each output names \
                 where to send",
            ),
            (
                rule(
                    "{interface: in0, destination: 198.18.1.2, port: 7100, source: 'ff18::1'}",
                    "[{interface: out0, group: 239.5.5.5}]",
                ),
                "r.yaml: rule 'r1': input source ff18::1 and destination 198.18.1.2 are of \
                 different families: a rule is all IPv4 or all IPv6",
            ),
            (
                rule(
                    "{interface: in0, destination: 198.18.1.2, port: 7100}",
                    "[{interface: in0, destination: 198.18.1.2}]",
                ),
                "r.yaml: rule 'r1': output on 'in0' sends the input's own destination and port \
                 back out of its input interface: a loop",
            ),
            (
                rule(
                    ok_in,
                    "[{interface: out0, destination: 198.18.2.2}, {interface: out0, destination: 198.18.2.2, source: auto}]",
                ),
                "r.yaml: rule 'r1': two outputs send the same destination 198.18.2.2 and port \
                 5000 on 'out0'",
            ),
            (
                rule(ok_in, "[{interface: out0, dscp: 99}]"),
                "r.yaml: rule 'r1': output dscp 99 on 'out0' is out of range: a DSCP is 0 to 63 \
                 (46 is EF, 34 AF41, 0 best effort)",
            ),
            (
                rule("{interface: eth9/1, group: 239.1.1.1}", ok_out),
                "r.yaml: rule 'r1': input interface 'eth9/1' is not a valid interface name (1 to \
                 15 characters, no '/', ':' or spaces)",
            ),
            (
                rule(ok_in, "[{interface: a-name-far-too-long0}]"),
                "r.yaml: rule 'r1': output interface 'a-name-far-too-long0' is not a valid \
                 interface name (1 to 15 characters, no '/', ':' or spaces)",
            ),
            (
                rule("{interface: in0, group: 10.1.1.1}", ok_out),
                "r.yaml: rule 'r1': input group 10.1.1.1 is not a multicast address (224.0.0.0/4): \
                 a unicast address goes in destination:",
            ),
            (
                rule(ok_in, "[{interface: out0, group: 198.18.0.1}]"),
                "r.yaml: rule 'r1': output group 198.18.0.1 on 'out0' is not a multicast address \
                 (224.0.0.0/4): a unicast address goes in destination:",
            ),
            (
                rule("{interface: in0, group: 239.1.1.1, port: 0}", ok_out),
                "r.yaml: rule 'r1': input port 0 is not a valid UDP port",
            ),
            (
                rule(ok_in, "[{interface: out0, port: 0}]"),
                "r.yaml: rule 'r1': output port 0 on 'out0' is not a valid UDP port",
            ),
            (
                rule(ok_in, "[{interface: out0, ttl: 0}]"),
                "r.yaml: rule 'r1': output ttl 0 on 'out0' would never be delivered",
            ),
            (rule(ok_in, "[]"), "r.yaml: rule 'r1': no outputs"),
            (
                rule(ok_in, "[{interface: out0}, {interface: out0, ttl: 4}]"),
                "r.yaml: rule 'r1': two outputs send the same group 239.1.1.1 and port 5000 on 'out0'",
            ),
            (
                rule(
                    "{interface: in0, group: 239.1.1.1, source: 239.9.9.9}",
                    ok_out,
                ),
                "r.yaml: rule 'r1': input source 239.9.9.9 is not a unicast host address",
            ),
            (
                rule(ok_in, "[{interface: in0}]"),
                "r.yaml: rule 'r1': output on 'in0' sends the input's own group and port back out of its input interface: a loop",
            ),
            (
                rule(
                    "{interface: in0, group: 'ff18::1', source: 198.18.0.1}",
                    ok_out,
                ),
                "r.yaml: rule 'r1': input source 198.18.0.1 and group ff18::1 are of different families: a rule is all IPv4 or all IPv6",
            ),
            (
                rule(ok_in, "[{interface: out0, group: 'ff18::1'}]"),
                "r.yaml: rule 'r1': output group ff18::1 on 'out0' and input group 239.1.1.1 are of different families: a rule is all IPv4 or all IPv6",
            ),
            (
                rule("{interface: in0, group: '2001:2::1'}", ok_out),
                "r.yaml: rule 'r1': input group 2001:2::1 is not a multicast address (ff00::/8): a \
                 unicast address goes in destination:",
            ),
            (
                rule("{interface: in0, group: 'ff18::1', source: '::'}", ok_out),
                "r.yaml: rule 'r1': input source :: is not a unicast host address",
            ),
            (
                rule(
                    "{interface: in0, group: 'ff18::1'}",
                    "[{interface: out0, group: 'fe80::1'}]",
                ),
                "r.yaml: rule 'r1': output group fe80::1 on 'out0' is not a multicast address \
                 (ff00::/8): a unicast address goes in destination:",
            ),
            (
                format!(
                    "{}  - name: r1\n    input: {{interface: in0, group: 239.1.1.2}}\n    outputs: {ok_out}\n",
                    rule(ok_in, ok_out)
                ),
                "r.yaml: rule 'r1': duplicate rule name",
            ),
            (
                format!(
                    "{}  - name: r2\n    input: {ok_in}\n    outputs: {ok_out}\n",
                    rule(ok_in, ok_out)
                ),
                "r.yaml: rule 'r2': another rule already has the input in0 239.1.1.1:5000 from any",
            ),
            (
                // 65 forms: IPv4 group lengths /4../32 and IPv6 /8../43 ranges.
                format!(
                    "rules:\n{}",
                    (4..=32)
                        .map(|l| format!("{}/{l}", mask_str(l)))
                        .chain((8..=43).map(|l| format!("'ff00::/{l}'")))
                        .enumerate()
                        .map(|(i, g)| format!(
                            "  - name: t{i}\n    input: {{interface: in0, group: {g}}}\n    outputs: {ok_out}\n"
                        ))
                        .collect::<String>()
                ),
                "r.yaml: rule 't64': input in0 ff00::/43:any from any makes 65 forms of input \
                 (family, VLAN or any, group prefix length, source prefix length, port or any; \
                 this one's lengths are /43 and /0): the XDP program looks up at most 64; use \
                 fewer distinct prefix lengths",
            ),
            (
                "rules: []\n".to_owned(),
                "r.yaml: no rules: there is nothing to relay",
            ),
            (
                format!("umem: {{frames: 1000}}\n{}", rule(ok_in, ok_out)),
                "r.yaml: umem.frames is 1000: it must be a power of two from 512 to 1048576",
            ),
            (
                format!("umem: {{frame_size: 1024}}\n{}", rule(ok_in, ok_out)),
                "r.yaml: umem.frame_size is 1024: AF_XDP takes 2048 or 4096",
            ),
            (
                format!("workers: 0\n{}", rule(ok_in, ok_out)),
                "r.yaml: workers is 0: it must be from 1 to 256",
            ),
            (
                format!("cpus: []\n{}", rule(ok_in, ok_out)),
                "r.yaml: cpus is empty: list the CPUs to pin the workers to, or leave it out",
            ),
            (
                format!("cpus: [0, 1, 0]\n{}", rule(ok_in, ok_out)),
                "r.yaml: cpus lists CPU 0 twice",
            ),
            (
                format!("cpus: [4096]\n{}", rule(ok_in, ok_out)),
                "r.yaml: cpus: CPU 4096 is beyond the 1024 the relay can pin to",
            ),
            (
                rule(
                    ok_in,
                    "[{interface: out0, destination: 198.18.2.2, on_demand: true}]",
                ),
                "r.yaml: rule 'r1': output on_demand on 'out0' sends to the unicast destination \
                 198.18.2.2: only a group has members to follow",
            ),
            (
                rule(
                    "{interface: in0, group: 239.10.0.0/16}",
                    "[{interface: out0, on_demand: true}]",
                ),
                "r.yaml: rule 'r1': output on_demand on 'out0' sends to the range 239.10.0.0/16: \
                 on-demand outputs follow one group each; give the output one group, or leave \
                 on_demand out",
            ),
            (
                rule(ok_in, "[{interface: out0, vlan: 10, on_demand: true}]"),
                "r.yaml: rule 'r1': output on_demand on 'out0' with vlan 10: on-demand outputs \
                 follow the listeners of an interface, not of a VLAN on a trunk; use the VLAN's \
                 own interface (out0.10), or leave on_demand out",
            ),
            (
                format!("querier: {{query_interval: 0}}\n{}", rule(ok_in, ok_out)),
                "r.yaml: querier.query_interval is 0: it must be a whole number of seconds from \
                 1 to 31744",
            ),
            (
                format!("querier: {{query_interval: 12.5}}\n{}", rule(ok_in, ok_out)),
                "r.yaml: querier.query_interval is 12.5: it must be a whole number of seconds \
                 from 1 to 31744",
            ),
            (
                format!(
                    "querier: {{query_interval: 10, query_response_interval: 10}}\n{}",
                    rule(ok_in, ok_out)
                ),
                "r.yaml: querier.query_response_interval 10 is not shorter than query_interval \
                 10: hosts answer a query within the response interval, which must end before \
                 the next query",
            ),
            (
                format!(
                    "querier: {{query_response_interval: 0.05}}\n{}",
                    rule(ok_in, ok_out)
                ),
                "r.yaml: querier.query_response_interval is 0.05: it must be from 0.1 to 3174.4 \
                 seconds, in tenths",
            ),
            (
                format!(
                    "querier: {{last_member_query_interval: 4000}}\n{}",
                    rule(ok_in, ok_out)
                ),
                "r.yaml: querier.last_member_query_interval is 4000: it must be from 0.1 to \
                 3174.4 seconds, in tenths",
            ),
            (
                format!("querier: {{robustness: 0}}\n{}", rule(ok_in, ok_out)),
                "r.yaml: querier.robustness is 0: it must be from 1 to 7 (2 by default; raise it \
                 on a lossy link)",
            ),
        ];
        for (yaml, want) in cases {
            let c = Config::parse("r.yaml", &yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            let got = c.validate("r.yaml", &fake()).expect_err(&yaml).to_string();
            assert_eq!(got, want, "for\n{yaml}");
        }
    }

    /// `inputs:` with `merge:`: parsed into the first leg and the others, with the numbering
    /// and the window; every way of getting it wrong is refused naming the rule and value.
    #[test]
    fn merged_rules_parse_and_their_mistakes_are_named() {
        let merged = |legs: &str, extra: &str, outputs: &str| {
            format!("rules:\n  - name: m\n    inputs: {legs}\n{extra}    outputs: {outputs}\n")
        };
        let two = "[{interface: in0, group: 239.1.1.1, port: 5000}, {interface: out1, group: 239.101.1.1, port: 5000}]";
        let out = "[{interface: out0}]";
        let c = Config::parse("r.yaml", &merged(two, "    merge: rtp\n", out)).unwrap();
        c.validate("r.yaml", &fake()).unwrap();
        let r = &c.rules[0];
        assert_eq!(r.input.interface, "in0");
        assert_eq!(r.legs.len(), 1);
        assert_eq!(r.legs[0].group, Some("239.101.1.1".parse().unwrap()));
        assert_eq!(r.sequence(), Some(crate::merge::Sequence::Rtp));
        assert_eq!(r.window_ms, None);
        let c = Config::parse(
            "r.yaml",
            &merged(
                two,
                "    merge: {offset: 8, bytes: 8}\n    window_ms: 200\n",
                out,
            ),
        )
        .unwrap();
        c.validate("r.yaml", &fake()).unwrap();
        assert_eq!(
            c.rules[0].sequence(),
            Some(crate::merge::Sequence::Counter {
                offset: 8,
                bytes: 8
            })
        );
        assert_eq!(c.rules[0].window_ms, Some(200));
        // A payload counter has no RTCP beside it: its legs may take any port.
        let any_port =
            "[{interface: in0, group: 239.1.1.1}, {interface: out1, group: 239.101.1.1}]";
        let c = Config::parse(
            "r.yaml",
            &merged(any_port, "    merge: {offset: 0, bytes: 4}\n", out),
        )
        .unwrap();
        c.validate("r.yaml", &fake()).unwrap();
        // Start, --check and reload validate with `validate`, a change of interfaces with
        // `validate_running`: neither takes an RTP merge without ports.
        let c = Config::parse("r.yaml", &merged(any_port, "    merge: rtp\n", out)).unwrap();
        assert!(c.validate("r.yaml", &fake()).is_err());
        assert!(c.validate_running("r.yaml", &fake()).is_err());
        // A single input in a list is a plain rule.
        let c = Config::parse(
            "r.yaml",
            &merged("[{interface: in0, group: 239.1.1.1}]", "", out),
        )
        .unwrap();
        c.validate("r.yaml", &fake()).unwrap();
        assert!(c.rules[0].legs.is_empty());

        let bad: Vec<(String, &str)> = vec![
            (
                merged(two, "", out),
                "r.yaml: rule 'm': inputs: lists 2 legs but there is no merge:: say how their \
                 packets are numbered (merge: rtp, or merge: { offset: N, bytes: 4 })",
            ),
            (
                ONE_RULE.replace("    outputs", "    merge: rtp\n    outputs"),
                "r.yaml: rule 'r1': merge: with one input: a merge takes two or more legs \
                 (inputs:)",
            ),
            (
                ONE_RULE.replace("    outputs", "    window_ms: 100\n    outputs"),
                "r.yaml: rule 'r1': window_ms 100 without merge:: the window is how long a \
                 merged stream remembers a sequence number",
            ),
            (
                merged(two, "    merge: smpte\n", out),
                "r.yaml: rule 'm': merge: smpte is not a numbering the relay reads: rtp (the RTP \
                 sequence number), or { offset: N, bytes: 4 or 8 } (a counter in the payload)",
            ),
            (
                merged(two, "    merge: {offset: 0, bytes: 2}\n", out),
                "r.yaml: rule 'm': merge: bytes 2: a payload counter is 4 or 8 bytes",
            ),
            (
                merged(two, "    merge: {offset: 65500, bytes: 8}\n", out),
                "r.yaml: rule 'm': merge: offset 65500 with bytes 8 ends beyond the largest UDP \
                 payload (65507 bytes)",
            ),
            (
                merged(two, "    merge: rtp\n    window_ms: 0\n", out),
                "r.yaml: rule 'm': window_ms 0 is out of range: from 1 to 60000 ms",
            ),
            (
                merged(
                    "[{interface: in0, group: 239.1.1.1, port: 5000}, {interface: out1, group: 'ff18::1', port: 5000}]",
                    "    merge: rtp\n",
                    out,
                ),
                "r.yaml: rule 'm': inputs[1]: group ff18::1 and the first leg's 239.1.1.1 are of \
                 different families: a rule is all IPv4 or all IPv6",
            ),
            (
                merged(
                    "[{interface: in0, group: 239.1.1.1, port: 5000}, {interface: out1, group: 239.2.0.0/16, port: 5000}]",
                    "    merge: rtp\n",
                    out,
                ),
                "r.yaml: rule 'm': inputs[1]: group 239.2.0.0/16 is a range: a leg of a merged \
                 stream is one group",
            ),
            (
                merged(
                    "[{interface: in0, group: 239.1.1.1, port: 5000}, {interface: in0, group: 239.1.1.1, port: 5000}]",
                    "    merge: rtp\n",
                    out,
                ),
                "r.yaml: rule 'm': inputs[1]: another rule already has the input in0 \
                 239.1.1.1:5000 from any",
            ),
            // RTP legs on any port would take the RTCP sent to the next one up.
            (
                merged(
                    "[{interface: in0, group: 239.1.1.1, port: 5000}, {interface: out1, group: 239.101.1.1}]",
                    "    merge: rtp\n",
                    out,
                ),
                "r.yaml: rule 'm': inputs[1]: merge: rtp needs port: on every leg, and the leg \
                 group 239.101.1.1 on out1 has none: it would take the RTCP its senders send to \
                 the next port as RTP (name the RTP port, e.g. port: 5000)",
            ),
            (
                merged(
                    "[{interface: in0, group: 'ff3e::1'}, {interface: out1, group: 'ff3e::2', port: 5000}]",
                    "    merge: rtp\n    window_ms: 100\n",
                    out,
                ),
                "r.yaml: rule 'm': inputs[0]: merge: rtp needs port: on every leg, and the leg \
                 group ff3e::1 on in0 has none: it would take the RTCP its senders send to the \
                 next port as RTP (name the RTP port, e.g. port: 5000)",
            ),
            (
                merged(
                    "[{interface: in0, group: 239.1.1.1, port: 5000}, {interface: out1, group: 239.101.1.1, port: 5000}]",
                    "    merge: rtp\n",
                    "[{interface: out1, group: 239.101.1.1}]",
                ),
                "r.yaml: rule 'm': output on 'out1' sends the input's own group and port back \
                 out of its input interface: a loop",
            ),
        ];
        for (yaml, want) in bad {
            let c = Config::parse("r.yaml", &yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            let got = c.validate("r.yaml", &fake()).expect_err(&yaml).to_string();
            assert_eq!(got, want, "for\n{yaml}");
        }
        for (yaml, want) in [
            (
                "rules:\n  - name: m\n    input: {interface: in0, group: 239.1.1.1}\n    inputs: [{interface: in0, group: 239.1.1.2}]\n    outputs: [{interface: out0}]\n",
                "r.yaml: rules: rule 'm' has both input: and inputs:: one input, or a list of the \
                 legs of a merged stream at line 2 column 3",
            ),
            (
                "rules:\n  - name: m\n    outputs: [{interface: out0}]\n",
                "r.yaml: rules: rule 'm' has no input: name one (input:), or the legs of a merged \
                 stream (inputs:) at line 2 column 3",
            ),
        ] {
            assert_eq!(Config::parse("r.yaml", yaml).unwrap_err().to_string(), want);
        }
    }

    /// A system that lets the relay run on some CPUs only.
    struct OnCpus(FakeSystem, Vec<usize>);

    impl System for OnCpus {
        fn interface(&self, name: &str) -> Option<InterfaceInfo> {
            self.0.interface(name)
        }
        fn allowed_cpus(&self) -> Option<Vec<usize>> {
            Some(self.1.clone())
        }
    }

    const ONE_RULE: &str = "rules:\n  - name: r1\n    input: {interface: in0, group: 239.1.1.1}\n    outputs: [{interface: out0}]\n";

    /// The README's `cpus: [2, 3]` on a machine (or cgroup) with CPUs 0 and 1: refused by
    /// the validation that `--check`, the start and a reload all run, naming the CPU.
    #[test]
    fn cpus_the_relay_may_not_use_are_refused() {
        let c = Config::parse("r.yaml", &format!("cpus: [1, 2, 3]\n{ONE_RULE}")).unwrap();
        assert_eq!(
            c.validate("r.yaml", &OnCpus(fake(), vec![0, 1]))
                .unwrap_err()
                .to_string(),
            "r.yaml: cpus: CPU 2 is not available to the relay (it may run on 0-1): fix \
             `cpus:` or leave it out"
        );
        c.validate("r.yaml", &OnCpus(fake(), vec![0, 1, 2, 3]))
            .unwrap();
        // A system that says nothing about CPUs (tests, fuzzing) takes any below 1024.
        c.validate("r.yaml", &fake()).unwrap();
    }

    /// The XDP program steers 64 rx queues per interface and 256 input interfaces.
    #[test]
    fn more_queues_or_inputs_than_the_program_steers_are_refused() {
        let mut sys = fake();
        sys.0.get_mut("in0").unwrap().rx_queues = 65;
        let c = Config::parse("r.yaml", ONE_RULE).unwrap();
        assert_eq!(
            c.validate("r.yaml", &sys).unwrap_err().to_string(),
            "r.yaml: rule 'r1': input interface 'in0' has 65 rx queues: the relay steers at \
             most 64 per interface (`ethtool -L in0 combined 64` lowers them)"
        );
        sys.0.get_mut("in0").unwrap().rx_queues = 64;
        c.validate("r.yaml", &sys).unwrap();

        let names: Vec<String> = (0..257).map(|i| format!("in{i}")).collect();
        let mut many = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            let info = InterfaceInfo {
                ifindex: 100 + i as u32,
                mac: [2, 0, 0, 0, 1, 0],
                rx_queues: 1,
                mtu: 1500,
            };
            many.insert(&*n.clone().leak(), info);
        }
        many.insert("out0", fake().0["out0"]);
        let mut yaml = "rules:\n".to_owned();
        for (i, n) in names.iter().enumerate() {
            yaml.push_str(&format!(
                "  - name: r{i}\n    input: {{interface: {n}, group: 239.1.1.1}}\n    outputs: [{{interface: out0}}]\n"
            ));
        }
        let c = Config::parse("r.yaml", &yaml).unwrap();
        assert_eq!(
            c.validate("r.yaml", &FakeSystem(many))
                .unwrap_err()
                .to_string(),
            "r.yaml: rule 'r256': input interface 'in256' is one more than the 256 input \
             interfaces the relay steers"
        );
    }

    /// Files that do not parse, and the exact message each produces (file, key path, value,
    /// line and column).
    #[test]
    fn parse_errors_carry_position_and_reject_unknown_keys() {
        let cases = [
            (
                "rules:\n  - name: a\n    input: {interface: in0, group: 239.0.0.1, prot: 5}\n    outputs: [{interface: out0}]\n",
                "r.yaml: rule 'a': rules[0].input: unknown field `prot`, expected one of `interface`, `group`, `destination`, `port`, `source`, `vlan` at line 3 column 47",
            ),
            (
                "rules:\n  - name: a\n    input: {interface: in0, group: 239.0.0.1, port: 70000}\n    outputs: [{interface: out0}]\n",
                "r.yaml: rule 'a': rules[0].input.port: 70000: must be a UDP port from 1 to 65535 at line 3 column 53",
            ),
            (
                "rules:\n  - name: a\n    input: {interface: in0, group: 239.0.0}\n    outputs: [{interface: out0}]\n",
                "r.yaml: rule 'a': rules[0].input.group: invalid value: string \"239.0.0\", expected an IP address or a prefix such as 239.10.0.0/16 at line 3 column 36",
            ),
            (
                "rules:\n  - name: [a\n",
                "r.yaml: rules[0].name: invalid type: sequence, expected a string: `[a` at line 2 column 11",
            ),
            (
                "allocator: spinlock\nrules: []\n",
                "r.yaml: allocator: unknown variant `spinlock`, expected one of `lock-free`, `lockfree`, `mutex` at line 1 column 12",
            ),
            (
                "rules:\n  - name: a\n    input: {interface: in0, group: 239.0.0.1}\n    outputs: [{interface: out0, ttl: 300}]\n",
                "r.yaml: rule 'a': rules[0].outputs[0].ttl: 300: must be a whole number from 1 to 255 at line 4 column 38",
            ),
            (
                "rules:\n  - name: a\n    input: {interface: in0, group: 239.0.0.1}\n",
                "r.yaml: rule 'a': rules[0]: missing field `outputs` at line 2 column 5",
            ),
            (
                "rules: 5\n",
                "r.yaml: rules: invalid type: integer `5`, expected a sequence at line 1 column 8",
            ),
            (
                "umem: {frames: -1}\nrules: []\n",
                "r.yaml: umem.frames: -1: must be a power of two from 512 to 1048576 at line 1 column 16",
            ),
            (
                "poll: spin\nrules: []\n",
                "r.yaml: poll: unknown variant `spin`, expected `sleep` or `busy` at line 1 column 7",
            ),
            (
                "querier: {interval: 5}\nrules: []\n",
                "r.yaml: querier: unknown field `interval`, expected one of `query_interval`, `query_response_interval`, `last_member_query_interval`, `robustness` at line 1 column 11",
            ),
            (
                "xdp_mode: fast\nrules: []\n",
                "r.yaml: xdp_mode: unknown variant `fast`, expected one of `auto`, `native`, `skb` at line 1 column 11",
            ),
            (
                "rules:\n\t- name: a\n",
                "r.yaml: found character that cannot start any token at line 2 column 1, while scanning for the next token",
            ),
            (
                "rules: [\n",
                "r.yaml: did not find expected node content at line 2 column 1, while parsing a flow node",
            ),
        ];
        for (yaml, want) in cases {
            let got = Config::parse("r.yaml", yaml).expect_err(yaml).to_string();
            assert_eq!(got, want, "for\n{yaml}");
        }
    }

    /// A file none of whose interfaces exist is checked in the wrong place (`--check` fails
    /// with the list); one that exists, or none named, is not; a merged rule's every leg is
    /// warned about when absent.
    #[test]
    fn no_interface_here_names_them_all_and_legs_are_warned_about() {
        let yaml = |a: &str, b: &str, c: &str| {
            format!(
                "rules:\n  - name: m\n    inputs: [{{interface: {a}, group: 239.0.0.1, port: 5000}}, {{interface: {b}, group: 239.0.0.2, port: 5000}}]\n    merge: rtp\n    outputs: [{{interface: {c}}}]\n"
            )
        };
        let none = Config::parse("r.yaml", &yaml("eth7", "eth8", "eth7")).unwrap();
        assert_eq!(
            none.no_interface_here("r.yaml", &fake()).as_deref(),
            Some(
                "r.yaml: none of the 2 interfaces the rules name exists here (eth7, eth8): is \
                 this the relay's network namespace (or machine)? Run the check where the relay \
                 runs (`ip netns exec NAME relay --config FILE --check`)"
            )
        );
        for (a, b, c) in [
            ("in0", "eth8", "eth9"),
            ("eth7", "in0", "eth9"),
            ("eth7", "eth8", "out0"),
        ] {
            let one = Config::parse("r.yaml", &yaml(a, b, c)).unwrap();
            assert_eq!(
                one.no_interface_here("r.yaml", &fake()),
                None,
                "{a} {b} {c}"
            );
        }
        let leg = Config::parse("r.yaml", &yaml("in0", "eth8", "out0")).unwrap();
        assert_eq!(
            leg.absent_interfaces("r.yaml", &fake()),
            [
                "r.yaml: rule 'm': input interface 'eth8' does not exist yet: the rule is idle \
              until it appears"
            ]
        );
    }

    /// Every numeric key given a value its type cannot hold: the error names the file, the
    /// rule, the key's path, the value as written and the range the key takes, never a Rust
    /// type; and the position follows.
    #[test]
    fn values_out_of_a_keys_type_name_the_key_value_and_range() {
        let rule = |input: &str, output: &str, extra: &str| {
            format!(
                "rules:\n  - name: a\n    input: {{interface: in0, group: 239.0.0.1{input}}}\n    outputs: [{{interface: out0{output}}}]\n{extra}"
            )
        };
        let top = |text: &str| format!("{text}\n{}", rule("", "", ""));
        let ttl = "a whole number from 1 to 255";
        let port = "a UDP port from 1 to 65535";
        let tenths = "from 0.1 to 3174.4 seconds, in tenths";
        let merge = "rtp, or { offset: N, bytes: 4 or 8 } with N from 0 to 65503";
        let cases = [
            (
                rule("", ", ttl: 300", ""),
                "rule 'a': rules[0].outputs[0].ttl: 300",
                ttl,
            ),
            (
                rule("", ", ttl: -1", ""),
                "rule 'a': rules[0].outputs[0].ttl: -1",
                ttl,
            ),
            (
                rule("", ", ttl: 1.5", ""),
                "rule 'a': rules[0].outputs[0].ttl: 1.5",
                ttl,
            ),
            (
                rule("", ", hop_limit: 256", ""),
                "rule 'a': rules[0].outputs[0].hop_limit: 256",
                ttl,
            ),
            (
                rule(", port: 70000", "", ""),
                "rule 'a': rules[0].input.port: 70000",
                port,
            ),
            (
                rule("", ", port: abc", ""),
                "rule 'a': rules[0].outputs[0].port: abc",
                port,
            ),
            (
                rule("", ", port: '5000'", ""),
                "rule 'a': rules[0].outputs[0].port: \"5000\"",
                port,
            ),
            (
                rule("", ", source_port: 65536", ""),
                "rule 'a': rules[0].outputs[0].source_port: 65536",
                port,
            ),
            (
                rule("", ", dscp: 300", ""),
                "rule 'a': rules[0].outputs[0].dscp: 300",
                "a whole number from 0 to 63",
            ),
            (
                rule(", vlan: 70000", "", ""),
                "rule 'a': rules[0].input.vlan: 70000",
                "a VLAN ID from 1 to 4094, or untagged",
            ),
            (
                rule("", ", vlan: trunk", ""),
                "rule 'a': rules[0].outputs[0].vlan: trunk",
                "a VLAN ID from 1 to 4094, or untagged",
            ),
            (
                rule("", "", "    window_ms: -5\n"),
                "rule 'a': rules[0].window_ms: -5",
                "a whole number of milliseconds from 1 to 60000",
            ),
            (
                rule("", "", "    merge: {offset: -1, bytes: 4}\n"),
                "rule 'a': rules[0].merge: { offset: -1, bytes: 4 }",
                merge,
            ),
            (
                rule("", "", "    merge: 7\n"),
                "rule 'a': rules[0].merge: 7",
                merge,
            ),
            (
                top("umem: {frames: -1}"),
                "umem.frames: -1",
                "a power of two from 512 to 1048576",
            ),
            (
                top("umem: {frame_size: 99999999999}"),
                "umem.frame_size: 99999999999",
                "2048 or 4096",
            ),
            (
                top("workers: -1"),
                "workers: -1",
                "a whole number from 1 to 256",
            ),
            (
                top("workers: many"),
                "workers: many",
                "a whole number from 1 to 256",
            ),
            (
                top("cpus: [0, -1]"),
                "cpus[1]: -1",
                "a list of CPU numbers from 0 to 1023",
            ),
            (
                top("querier: {robustness: 300}"),
                "querier.robustness: 300",
                "a whole number from 1 to 7",
            ),
            (
                top("querier: {query_interval: often}"),
                "querier.query_interval: often",
                "a whole number of seconds from 1 to 31744",
            ),
            (
                top("querier: {query_response_interval: true}"),
                "querier.query_response_interval: true",
                tenths,
            ),
            (
                top("querier: {last_member_query_interval: [1]}"),
                "querier.last_member_query_interval: [1]",
                tenths,
            ),
        ];
        // `relay add-rule`: one rule, as a mapping or a list of one.
        for one in [
            "name: a\ninput: {interface: in0, group: 239.0.0.1}\noutputs: [{interface: out0, ttl: 300}]\n",
            "- name: a\n  input: {interface: in0, group: 239.0.0.1}\n  outputs: [{interface: out0, ttl: 300}]\n",
        ] {
            let got = Rule::parse_one("new.yaml", one).expect_err(one).to_string();
            let want = format!("new.yaml: rule 'a': outputs[0].ttl: 300: must be {ttl} at line ");
            assert!(got.starts_with(&want), "got  {got}\nwant {want}...");
        }
        for (yaml, what, range) in cases {
            let got = Config::parse("r.yaml", &yaml).expect_err(&yaml).to_string();
            let want = format!("r.yaml: {what}: must be {range} at line ");
            assert!(
                got.starts_with(&want),
                "for\n{yaml}\ngot  {got}\nwant {want}..."
            );
            for rust in ["u8", "u16", "u32", "usize", "f64", "MergeSpec", "integer `"] {
                assert!(!got.contains(rust), "{got} names {rust}");
            }
        }
    }

    /// `vlan:` on inputs and outputs: what is accepted, and each refusal naming the file, the
    /// rule, the key and the value.
    #[test]
    fn vlan_keys_validate_and_errors_name_the_value() {
        let rule = |input: &str, outputs: &str| {
            format!("rules:\n  - name: r1\n    input: {input}\n    outputs: {outputs}\n")
        };
        let ok = [
            rule(
                "{interface: in0, group: 239.1.1.1, vlan: 10}",
                "[{interface: out0}, {interface: out0, vlan: 30}, {interface: out1, vlan: untagged}]",
            ),
            rule(
                "{interface: in0, group: 239.1.1.1, vlan: untagged}",
                "[{interface: out0, vlan: 4094}]",
            ),
            // A trunk relaying between its own VLANs is no loop.
            rule(
                "{interface: in0, group: 239.1.1.1, vlan: 10}",
                "[{interface: in0, vlan: 20}, {interface: in0}]",
            ),
            rule(
                "{interface: in0, group: 239.1.1.1, vlan: untagged}",
                "[{interface: in0, vlan: 20}]",
            ),
            // Two rules for one group on two VLANs of a trunk, and one for the rest.
            format!(
                "{}  - name: r2\n    input: {{interface: in0, group: 239.1.1.1, vlan: 11}}\n    outputs: [{{interface: out0}}]\n  - name: r3\n    input: {{interface: in0, group: 239.1.1.1}}\n    outputs: [{{interface: out0}}]\n",
                rule(
                    "{interface: in0, group: 239.1.1.1, vlan: 10}",
                    "[{interface: out0}]"
                )
            ),
        ];
        for yaml in &ok {
            let c = Config::parse("r.yaml", yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            c.validate("r.yaml", &fake())
                .unwrap_or_else(|e| panic!("{yaml}: {e}"));
        }
        let c = Config::parse("r.yaml", &ok[0]).unwrap();
        assert_eq!(c.rules[0].input.vlan, Some(Vlan::Id(10)));
        let outs: Vec<_> = c.rules[0].outputs.iter().map(|o| o.vlan).collect();
        assert_eq!(outs, [None, Some(Vlan::Id(30)), Some(Vlan::Untagged)]);

        let ok_out = "[{interface: out0}]";
        let broken = [
            (
                rule("{interface: in0, group: 239.1.1.1, vlan: 4095}", ok_out),
                "r.yaml: rule 'r1': input vlan 4095 is not a VLAN ID from 1 to 4094 or untagged",
            ),
            (
                rule("{interface: in0, group: 239.1.1.1, vlan: 0}", ok_out),
                "r.yaml: rule 'r1': input vlan 0 is not a VLAN ID from 1 to 4094 or untagged",
            ),
            (
                rule(
                    "{interface: in0, group: 239.1.1.1}",
                    "[{interface: out0, vlan: 5000}]",
                ),
                "r.yaml: rule 'r1': output vlan 5000 on 'out0' is not a VLAN ID from 1 to 4094 or untagged",
            ),
            (
                rule(
                    "{interface: in0, group: 239.1.1.1}",
                    "[{interface: out0, vlan: 7}, {interface: out0, vlan: 7, ttl: 3}]",
                ),
                "r.yaml: rule 'r1': two outputs send the same group 239.1.1.1 and port (as received) on 'out0' vlan 7",
            ),
            (
                rule(
                    "{interface: in0, group: 239.1.1.1}",
                    "[{interface: out0}, {interface: out0, vlan: untagged}]",
                ),
                "r.yaml: rule 'r1': two outputs send the same group 239.1.1.1 and port (as received) on 'out0'",
            ),
            (
                rule(
                    "{interface: in0, group: 239.1.1.1, vlan: 10}",
                    "[{interface: in0, vlan: 10}]",
                ),
                "r.yaml: rule 'r1': output on 'in0' sends the input's own group and port back out of its input interface: a loop",
            ),
            (
                rule(
                    "{interface: in0, group: 239.1.1.1}",
                    "[{interface: in0, vlan: 10}]",
                ),
                "r.yaml: rule 'r1': output on 'in0' sends the input's own group and port back out of its input interface: a loop",
            ),
            (
                format!(
                    "{}  - name: r2\n    input: {{interface: in0, group: 239.1.1.1, vlan: untagged}}\n    outputs: {ok_out}\n",
                    rule("{interface: in0, group: 239.1.1.1, vlan: untagged}", ok_out)
                ),
                "r.yaml: rule 'r2': another rule already has the input in0 239.1.1.1:any from any vlan untagged",
            ),
        ];
        for (yaml, want) in broken {
            let c = Config::parse("r.yaml", &yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            let got = c.validate("r.yaml", &fake()).expect_err(&yaml).to_string();
            assert_eq!(got, want, "for\n{yaml}");
        }
        let bad = rule("{interface: in0, group: 239.1.1.1, vlan: trunk}", ok_out);
        assert_eq!(
            Config::parse("r.yaml", &bad).unwrap_err().to_string(),
            "r.yaml: rule 'r1': rules[0].input.vlan: trunk: must be a VLAN ID from 1 to 4094, or untagged at line 3 column 53"
        );
    }
}

#[cfg(test)]
mod kind_tests {
    use super::*;

    /// Every kind a user has here, with what the kernel answers for it (xdp-features BASIC
    /// for veth and tun/tap, 0 for bridge, macvlan and vxlan; loopback and L3 devices are not
    /// Ethernet), and a kernel that cannot say.
    fn kinds() -> Vec<(&'static str, LinkKind)> {
        let l3 = |link_type, kind: Option<&str>| LinkKind {
            link_type,
            kind: kind.map(str::to_owned),
            native_xdp: Some(false),
            rx_vlan_offload: Some(false),
            vlan_hint: Some(false),
        };
        vec![
            ("veth0", LinkKind::ethernet("veth", true)),
            ("tap0", LinkKind::ethernet("tun", true)),
            ("br0", LinkKind::ethernet("bridge", false)),
            ("mv0", LinkKind::ethernet("macvlan", false)),
            ("vx0", LinkKind::ethernet("vxlan", false)),
            (
                "old0",
                LinkKind {
                    native_xdp: None,
                    ..LinkKind::ethernet("macvlan", false)
                },
            ),
            ("tun0", l3(65534, Some("tun"))),
            ("lo", l3(772, None)),
            ("gre1", l3(778, Some("gre"))),
            ("wg0", l3(65534, Some("wireguard"))),
        ]
    }

    fn system() -> StaticSystem {
        let mut ifaces: Vec<(&str, u32)> = vec![("plain0", 1)];
        ifaces.extend(
            kinds()
                .iter()
                .enumerate()
                .map(|(i, (n, _))| (*n, 2 + i as u32)),
        );
        kinds()
            .into_iter()
            .fold(StaticSystem::new(&ifaces), |s, (n, l)| s.with_link(n, l))
    }

    fn config(mode: &str, input: &str, output: &str) -> Config {
        let yaml = format!(
            "xdp_mode: {mode}\nrules:\n  - name: k\n    input: {{interface: {input}, group: \
             239.1.1.1, port: 5000}}\n    outputs: [{{interface: {output}}}]\n"
        );
        Config::parse("k.yaml", &yaml).unwrap()
    }

    /// An input with `vlan:` on a NIC that strips tags into the skb's metadata: taken where a
    /// native program reads them there (veth here), refused where nothing can (skb mode, a
    /// driver without the hint) with the fix; no refusal without the offload or without
    /// `vlan:`. The same check runs at --check, start and reload (`validate_running`).
    #[test]
    fn vlan_inputs_where_the_nic_strips_the_tag() {
        let links = [
            (
                "hinted0",
                LinkKind::ethernet("veth", true).with_vlan(true, true),
            ),
            (
                "nic0",
                LinkKind::ethernet("ixgbe", true).with_vlan(true, false),
            ),
            (
                "nic1",
                LinkKind::ethernet("ixgbe", true).with_vlan(false, false),
            ),
            (
                "oldveth0",
                LinkKind::ethernet("veth", true).with_vlan(true, false),
            ),
        ];
        let names: Vec<(&str, u32)> = links
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (*n, 2 + i as u32))
            .chain([("out0", 1)])
            .collect();
        let sys = links
            .iter()
            .cloned()
            .fold(StaticSystem::new(&names), |s, (n, l)| s.with_link(n, l));
        let check = |mode: &str, input: &str, vlan: &str| {
            let yaml = format!(
                "xdp_mode: {mode}\nrules:\n  - name: k\n    input: {{interface: {input}, group: \
                 239.1.1.1, port: 5000{vlan}}}\n    outputs: [{{interface: out0}}]\n"
            );
            let c = Config::parse("k.yaml", &yaml).unwrap();
            let at_start = c
                .validate_with("k.yaml", &sys, true)
                .map_err(|e| e.to_string());
            let at_reload = c
                .validate_running("k.yaml", &sys)
                .map_err(|e| e.to_string());
            assert_eq!(at_start, at_reload, "{mode} {input}{vlan}");
            at_start
        };
        for mode in ["auto", "native", "skb"] {
            for vlan in [", vlan: 10", ", vlan: untagged"] {
                assert_eq!(
                    check(mode, "nic1", vlan),
                    Ok(()),
                    "no offload: tags in the frame"
                );
                let nic = check(mode, "nic0", vlan).unwrap_err();
                assert!(nic.contains("rule 'k': input vlan"), "{nic}");
                assert!(nic.contains("ethtool -K nic0 rxvlan off"), "{nic}");
                let old = check(mode, "oldveth0", vlan).unwrap_err();
                assert!(old.contains("txvlan off"), "{old}");
                let hinted = check(mode, "hinted0", vlan);
                if mode == "skb" {
                    let e = hinted.unwrap_err();
                    assert!(e.contains("use xdp_mode: auto or native"), "{e}");
                } else {
                    assert_eq!(hinted, Ok(()), "{mode}: read from the metadata");
                }
            }
            // Without `vlan:` the input takes every VLAN anyway.
            for input in ["nic0", "oldveth0", "hinted0"] {
                assert_eq!(check(mode, input, ""), Ok(()), "{mode} {input}");
            }
        }
    }

    /// Each kind as input and as output in each XDP mode: refused exactly when it is not
    /// Ethernet, or when it is an input without native XDP and the mode is native.
    #[test]
    fn every_kind_on_either_side_in_every_mode() {
        // The kinds refused in any mode and on either side, and the inputs refused in native.
        let not_ethernet = ["tun0", "lo", "gre1", "wg0"];
        let generic_only = ["br0", "mv0", "vx0"];
        let sys = system();
        for (name, link) in kinds() {
            for mode in ["auto", "native", "skb"] {
                let as_input = config(mode, name, "plain0").validate("k.yaml", &sys);
                let as_output = config(mode, "plain0", name).validate("k.yaml", &sys);
                let kind = link.kind.as_deref().unwrap_or("none");
                if not_ethernet.contains(&name) {
                    for (side, got) in [("input", as_input), ("output", as_output)] {
                        let got = got.expect_err(name).to_string();
                        let want = format!(
                            "k.yaml: rule 'k': {side} interface '{name}' is not an Ethernet \
                             interface (link type {} ({}), kind {kind}):",
                            link.link_type,
                            crate::link_kind::link_type_name(link.link_type)
                        );
                        assert!(got.starts_with(&want), "{mode}: {got}\nwant {want}");
                    }
                } else if mode == "native" && generic_only.contains(&name) {
                    assert_eq!(
                        as_input.expect_err(name).to_string(),
                        format!(
                            "k.yaml: rule 'k': input interface '{name}' (kind {kind}) has no \
                             native XDP (its driver does not run XDP programs), so xdp_mode: \
                             native cannot attach there; use xdp_mode: auto (native where the \
                             driver has it, skb mode elsewhere) or xdp_mode: skb"
                        )
                    );
                    // An output needs no XDP program of its own: AF_XDP sends in copy mode.
                    as_output.unwrap();
                } else {
                    as_input.unwrap_or_else(|e| panic!("{name} in {mode} as input: {e}"));
                    as_output.unwrap_or_else(|e| panic!("{name} in {mode} as output: {e}"));
                }
            }
        }
    }

    #[test]
    fn a_refusal_says_what_to_use_instead() {
        let sys = system();
        assert_eq!(
            config("auto", "tun0", "plain0")
                .validate("k.yaml", &sys)
                .unwrap_err()
                .to_string(),
            "k.yaml: rule 'k': input interface 'tun0' is not an Ethernet interface (link type \
             65534 (none: an L3 device, its packets have no Ethernet header), kind tun): the XDP \
             program and the rewrite read and write Ethernet frames; use a tap instead of a tun \
             (ip tuntap add mode tap; the program or VM on it then reads and writes Ethernet \
             frames)"
        );
        assert_eq!(
            config("skb", "plain0", "lo")
                .validate("k.yaml", &sys)
                .unwrap_err()
                .to_string(),
            "k.yaml: rule 'k': output interface 'lo' is not an Ethernet interface (link type 772 \
             (loopback), kind none): the XDP program and the rewrite read and write Ethernet \
             frames; use a veth pair or a dummy interface instead of loopback"
        );
    }

    /// A leg of a merged rule is an input like any other, and a running relay applying its
    /// rules again (validate_running) refuses what a start refuses.
    #[test]
    fn merged_legs_and_running_rules_are_checked_too() {
        let yaml = "xdp_mode: native\nrules:\n  - name: m\n    inputs:\n      - {interface: \
                    veth0, group: 239.1.1.1, port: 5000}\n      - {interface: br0, group: \
                    239.1.1.2, port: 5000}\n    merge: rtp\n    outputs: [{interface: plain0}]\n";
        let c = Config::parse("k.yaml", yaml).unwrap();
        let got = c.validate("k.yaml", &system()).unwrap_err().to_string();
        assert!(
            got.starts_with(
                "k.yaml: rule 'm': inputs[1]: input interface 'br0' (kind bridge) has no native XDP"
            ),
            "{got}"
        );
        let got = config("auto", "plain0", "wg0")
            .validate_running("k.yaml", &system())
            .unwrap_err()
            .to_string();
        assert!(
            got.contains("output interface 'wg0' is not an Ethernet"),
            "{got}"
        );
    }

    /// Each interface's kind is asked once per validation, however many rules name it.
    #[test]
    fn each_interface_is_asked_its_kind_once() {
        struct Counting(StaticSystem, std::cell::RefCell<Vec<String>>);
        impl System for Counting {
            fn interface(&self, name: &str) -> Option<InterfaceInfo> {
                self.0.interface(name)
            }
            fn link(&self, name: &str) -> Option<LinkKind> {
                self.1.borrow_mut().push(name.to_owned());
                self.0.link(name)
            }
        }
        let mut yaml = "rules:\n".to_owned();
        for i in 1..=3 {
            yaml += &format!(
                "  - name: r{i}\n    input: {{interface: veth0, group: 239.1.1.{i}}}\n    \
                 outputs: [{{interface: br0}}, {{interface: tap0}}]\n"
            );
        }
        let sys = Counting(system(), Default::default());
        Config::parse("k.yaml", &yaml)
            .unwrap()
            .validate("k.yaml", &sys)
            .unwrap();
        let mut asked = sys.1.take();
        asked.sort();
        assert_eq!(asked, ["br0", "tap0", "veth0"]);
    }

    /// An interface that does not exist has no kind: its rule waits for it, in any mode.
    #[test]
    fn an_absent_interface_is_not_refused_for_its_kind() {
        let sys = system();
        config("native", "gone0", "gone1")
            .validate("k.yaml", &sys)
            .unwrap();
    }
}
