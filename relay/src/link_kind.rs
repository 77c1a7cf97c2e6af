//! What kind of device an interface is, asked of the kernel without attaching anything: its
//! kind (rtnetlink's IFLA_INFO_KIND: veth, bridge, macvlan, vxlan, tun, ...) and whether its
//! driver runs XDP programs itself (native mode), from the kernel's "netdev" generic netlink
//! family (Linux 6.3+). With these the checks refuse, before the start or a reload changes
//! anything, an interface the XDP program cannot run on as configured, rather than the attach
//! failing half-way through the start. Also the words the refusals use for link types.

use std::{io, time::Duration};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NlasIterator, ParseableParametrized, parse_u32, parse_u64,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkInfo, LinkMessage},
};
use netlink_sys::{
    Socket,
    protocols::{NETLINK_GENERIC, NETLINK_ROUTE},
};

/// ARPHRD_ETHER: the only link type whose frames the XDP program and the rewrite parse.
pub const ARPHRD_ETHER: u16 = 1;

// include/uapi/linux/netdev.h.
const NETDEV_FAMILY_NAME: &str = "netdev";
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NETDEV_A_DEV_XDP_RX_METADATA_FEATURES: u16 = 5;
/// NETDEV_XDP_ACT_BASIC: the driver runs XDP programs (XDP_PASS, XDP_DROP, XDP_TX, ...).
pub const NETDEV_XDP_ACT_BASIC: u64 = 1;
/// NETDEV_XDP_ACT_REDIRECT: the driver's XDP can redirect (the relay's XSKMAP needs this).
pub const NETDEV_XDP_ACT_REDIRECT: u64 = 2;
/// NETDEV_XDP_RX_METADATA_VLAN_TAG: the driver gives a native-mode program the VLAN tag it took
/// off the frame (rx-vlan offload) through the bpf_xdp_metadata_rx_vlan_tag kfunc.
pub const NETDEV_XDP_RX_METADATA_VLAN_TAG: u64 = 4;

/// What the kernel's netdev family says a device's XDP can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpFeatures {
    /// NETDEV_XDP_ACT_* bits: 0 for a device without XDP of its own (generic mode only).
    pub actions: u64,
    /// NETDEV_XDP_RX_METADATA_* bits: what a native program can ask the driver about a frame.
    pub rx_metadata: u64,
}

impl XdpFeatures {
    /// Native XDP: the driver runs programs itself.
    pub fn native(&self) -> bool {
        self.actions & NETDEV_XDP_ACT_BASIC != 0
    }

    /// A native program can read the VLAN tag the driver stripped.
    pub fn vlan_hint(&self) -> bool {
        self.native() && self.rx_metadata & NETDEV_XDP_RX_METADATA_VLAN_TAG != 0
    }
}

/// How long one question to the kernel may take: an answer is local and immediate, so
/// running out means the kernel will not answer, and the answer is "unknown".
const ANSWER_TIMEOUT: Duration = Duration::from_millis(500);

/// The words for a link type (ARPHRD_*, /sys/class/net/IF/type) in a refusal.
pub fn link_type_name(link_type: u16) -> &'static str {
    match link_type {
        ARPHRD_ETHER => "Ethernet",
        32 => "InfiniBand",
        512 => "PPP",
        768 => "IPIP tunnel",
        769 => "IPv6 tunnel",
        772 => "loopback",
        776 => "SIT tunnel",
        778 => "GRE tunnel",
        823 => "IPv6 GRE tunnel",
        65534 => "none: an L3 device, its packets have no Ethernet header",
        _ => "not Ethernet",
    }
}

/// What to use instead of a device that is not Ethernet, by its link type and kind.
pub fn instead(link_type: u16, kind: Option<&str>) -> &'static str {
    match (link_type, kind) {
        (_, Some("tun")) => {
            "a tap instead of a tun (ip tuntap add mode tap; the program or VM on it then \
             reads and writes Ethernet frames)"
        }
        (772, _) => "a veth pair or a dummy interface instead of loopback",
        (_, Some("wireguard")) => {
            "a vxlan or gretap interface over the tunnel (Ethernet carried through it) instead \
             of the WireGuard interface itself"
        }
        (768 | 769 | 776 | 778 | 823, _)
        | (_, Some("ipip" | "gre" | "sit" | "ip6tnl" | "ip6gre" | "vti" | "vti6")) => {
            "gretap or vxlan (Ethernet over the tunnel) instead of an IP tunnel"
        }
        _ => "an Ethernet interface (veth, bridge, macvlan, vlan, vxlan, tap or a NIC)",
    }
}

/// The interface's kind as rtnetlink names it (IFLA_INFO_KIND); `None` for a device without
/// one (a physical NIC, loopback) or when the kernel does not answer.
pub fn kind(ifindex: u32) -> Option<String> {
    let socket = open(NETLINK_ROUTE).ok()?;
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    let (mut seq, mut buf) = (0, Vec::with_capacity(1 << 16));
    let answer = crate::rtnl::request(
        &socket,
        &mut seq,
        &mut buf,
        RouteNetlinkMessage::GetLink(msg),
        0,
        ANSWER_TIMEOUT,
    );
    let Ok(Some(RouteNetlinkMessage::NewLink(link))) = answer else {
        return None;
    };
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.to_string()),
            _ => None,
        }),
        _ => None,
    })
}

/// The interface's XDP features: no actions for a device whose driver has no XDP of its own
/// (bridge, macvlan, vxlan: generic mode only). `None` when the kernel cannot say: no
/// "netdev" family (before 6.3), or no answer.
pub fn xdp_features(ifindex: u32) -> Option<XdpFeatures> {
    let socket = open(NETLINK_GENERIC).ok()?;
    let (mut seq, mut buf) = (0, Vec::with_capacity(1 << 16));
    let family = family_id(&socket, &mut seq, &mut buf, NETDEV_FAMILY_NAME).ok()?;
    let mut ask = GenlMessage::from_payload(NetdevDev {
        ifindex: Some(ifindex),
        xdp_features: None,
        rx_metadata: None,
    });
    ask.set_resolved_family_id(family);
    let answer = crate::rtnl::request(&socket, &mut seq, &mut buf, ask, 0, ANSWER_TIMEOUT);
    match answer {
        Ok(Some(m)) => m.payload.xdp_features.map(|actions| XdpFeatures {
            actions,
            // A kernel from before the metadata kfuncs (6.3) has none to offer.
            rx_metadata: m.payload.rx_metadata.unwrap_or(0),
        }),
        Ok(None) => None,
        Err(e) => {
            log::debug!("netdev: no XDP features for ifindex {ifindex}: {e}");
            None
        }
    }
}

/// Whether the driver takes the 802.1Q tag off the frames it receives into the skb's metadata
/// (ethtool's rx-vlan-offload: ETH_FLAG_RXVLAN of ETHTOOL_GFLAGS); `None` when it cannot say.
/// On a veth it says how tags from the peer are kept: in the metadata unless the peer's
/// tx-vlan-offload is off.
pub fn rx_vlan_offload(name: &str) -> Option<bool> {
    const ETHTOOL_GFLAGS: u32 = 0x25;
    const ETH_FLAG_RXVLAN: u32 = 1 << 8;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    // struct ifreq: the name, then a union whose member here is the pointer to the command.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        pad: [u8; 16],
    }
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain socket(2); the result is checked before use and owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GFLAGS,
        data: 0,
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCETHTOOL reads the NUL-terminated name and the command `req.data` points
    // to, and writes the flags into it; both live until the call returns.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCETHTOOL,
            &mut req,
        )
    };
    (rc == 0).then_some(value.data & ETH_FLAG_RXVLAN != 0)
}

/// The id the kernel gave the generic netlink family `name`; an error (ENOENT) when the
/// kernel has no such family.
fn family_id(socket: &Socket, seq: &mut u32, buf: &mut Vec<u8>, name: &str) -> io::Result<u16> {
    let ask = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_owned())],
    });
    let answer = crate::rtnl::request(socket, seq, buf, ask, 0, ANSWER_TIMEOUT)?;
    answer
        .and_then(|m| {
            m.payload.nlas.iter().find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
        })
        .ok_or_else(|| io::Error::other(format!("no id for the generic netlink family {name}")))
}

/// A netlink socket of `protocol`, bound, with a receive timeout so a lost answer cannot hold
/// a check past [`ANSWER_TIMEOUT`].
fn open(protocol: isize) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 100_000),
    )
    .map_err(io::Error::from)?;
    Ok(socket)
}

/// NETDEV_CMD_DEV_GET: the question (with the ifindex) and its answer (with the features).
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetdevDev {
    ifindex: Option<u32>,
    xdp_features: Option<u64>,
    rx_metadata: Option<u64>,
}

impl NetdevDev {
    fn attributes(&self) -> Vec<DefaultNla> {
        let ifindex = self
            .ifindex
            .map(|i| DefaultNla::new(NETDEV_A_DEV_IFINDEX, i.to_ne_bytes().to_vec()));
        let features = self
            .xdp_features
            .map(|f| DefaultNla::new(NETDEV_A_DEV_XDP_FEATURES, f.to_ne_bytes().to_vec()));
        let rx_metadata = self.rx_metadata.map(|f| {
            DefaultNla::new(
                NETDEV_A_DEV_XDP_RX_METADATA_FEATURES,
                f.to_ne_bytes().to_vec(),
            )
        });
        ifindex
            .into_iter()
            .chain(features)
            .chain(rx_metadata)
            .collect()
    }
}

impl GenlFamily for NetdevDev {
    fn family_name() -> &'static str {
        NETDEV_FAMILY_NAME
    }

    fn command(&self) -> u8 {
        NETDEV_CMD_DEV_GET
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for NetdevDev {
    fn buffer_len(&self) -> usize {
        self.attributes().as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attributes().as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevDev {
    fn parse_with_param(buf: &[u8], _header: GenlHeader) -> Result<Self, DecodeError> {
        let mut dev = NetdevDev {
            ifindex: None,
            xdp_features: None,
            rx_metadata: None,
        };
        // Attributes a newer kernel adds (zero-copy segments, metadata, ...) are skipped.
        for nla in NlasIterator::new(buf) {
            let nla = nla?;
            match nla.kind() {
                NETDEV_A_DEV_IFINDEX => dev.ifindex = Some(parse_u32(nla.value())?),
                NETDEV_A_DEV_XDP_FEATURES => dev.xdp_features = Some(parse_u64(nla.value())?),
                NETDEV_A_DEV_XDP_RX_METADATA_FEATURES => {
                    dev.rx_metadata = Some(parse_u64(nla.value())?)
                }
                _ => {}
            }
        }
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dev_get_question_reads_back_as_sent() {
        let dev = NetdevDev {
            ifindex: Some(7),
            xdp_features: Some(NETDEV_XDP_ACT_BASIC | NETDEV_XDP_ACT_REDIRECT),
            rx_metadata: Some(NETDEV_XDP_RX_METADATA_VLAN_TAG),
        };
        let mut buf = vec![0; dev.buffer_len()];
        dev.emit(&mut buf);
        // Three attributes of 4 header bytes each, the u32 and the two u64 values.
        assert_eq!(buf.len(), 8 + 12 + 12);
        let header = GenlHeader {
            cmd: NETDEV_CMD_DEV_GET,
            version: 1,
        };
        assert_eq!(NetdevDev::parse_with_param(&buf, header).unwrap(), dev);
    }

    #[test]
    fn an_answer_with_attributes_of_a_newer_kernel_still_reads() {
        // ifindex 3, xdp-features BASIC, then an attribute 9 this code does not know.
        let mut buf = Vec::new();
        for (kind, value) in [
            (NETDEV_A_DEV_IFINDEX, 3u32.to_ne_bytes().to_vec()),
            (NETDEV_A_DEV_XDP_FEATURES, 1u64.to_ne_bytes().to_vec()),
            (9, 0xabcd_u32.to_ne_bytes().to_vec()),
        ] {
            buf.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&value);
        }
        let header = GenlHeader {
            cmd: NETDEV_CMD_DEV_GET,
            version: 1,
        };
        let dev = NetdevDev::parse_with_param(&buf, header).unwrap();
        assert_eq!(dev.ifindex, Some(3));
        assert_eq!(dev.xdp_features, Some(NETDEV_XDP_ACT_BASIC));
    }

    /// What the kernel says of loopback's rx-vlan-offload (off, fixed), and of no interface.
    #[test]
    fn rx_vlan_offload_reads_the_driver_flag() {
        assert_eq!(rx_vlan_offload("lo"), Some(false));
        assert_eq!(rx_vlan_offload("no-such-if0"), None);
        assert_eq!(rx_vlan_offload("a-name-too-long-for-linux"), None);
    }

    /// The VLAN tag from the metadata needs both: a driver that runs the program, and one
    /// that answers the kfunc.
    #[test]
    fn the_vlan_hint_needs_native_xdp_and_the_metadata_bit() {
        let f = |actions, rx_metadata| XdpFeatures {
            actions,
            rx_metadata,
        };
        // What veth answers here (6.18): native, redirect, ...; timestamp, hash, VLAN tag.
        assert!(f(35, 7).vlan_hint());
        assert!(!f(35, 3).vlan_hint(), "no VLAN tag bit");
        assert!(!f(0, 7).vlan_hint(), "generic mode only");
        assert!(f(35, 0).native() && !f(0, 0).native());
    }

    #[test]
    fn every_kind_that_cannot_work_is_told_what_to_use_instead() {
        assert!(instead(65534, Some("tun")).contains("a tap instead of a tun"));
        assert!(instead(772, None).contains("instead of loopback"));
        assert!(instead(65534, Some("wireguard")).contains("vxlan or gretap"));
        for (t, k) in [
            (768, Some("ipip")),
            (778, Some("gre")),
            (776, Some("sit")),
            (769, Some("ip6tnl")),
            (823, Some("ip6gre")),
            (65534, Some("vti")),
        ] {
            assert!(instead(t, k).contains("gretap or vxlan"), "{t} {k:?}");
        }
        assert_eq!(link_type_name(772), "loopback");
        assert!(link_type_name(65534).starts_with("none"));
        assert_eq!(link_type_name(ARPHRD_ETHER), "Ethernet");
    }

    /// What this machine's kernel answers for loopback: no native XDP (generic only). A
    /// kernel without the family answers nothing, which must read as "unknown".
    #[test]
    fn loopback_has_no_native_xdp_or_the_kernel_cannot_say() {
        let features = xdp_features(1);
        assert!(
            features.is_none_or(|f| !f.native() && !f.vlan_hint()),
            "lo's xdp-features: {features:?}"
        );
        assert_eq!(kind(1), None, "loopback has no IFLA_INFO_KIND");
    }
}
