//! Facts about this machine's interfaces, read from sysfs (and, for their kind, netlink).

use std::{fs, path::PathBuf};

use crate::config::{InterfaceInfo, LinkKind, System};

/// The system the relay runs on.
#[derive(Debug, Default, Clone, Copy)]
pub struct LiveSystem;

/// The interface's directory in sysfs, if `name` can be an interface's name: at most 15
/// bytes and never a path.
fn sysfs_dir(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.len() > 15 || name.contains('/') || name == "." || name == ".." {
        return None;
    }
    Some(PathBuf::from("/sys/class/net").join(name))
}

/// A number sysfs holds for the interface in `dir` (`ifindex`, `type`, `mtu`).
fn sysfs_number<T: std::str::FromStr>(dir: &std::path::Path, file: &str) -> Option<T> {
    fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
}

impl System for LiveSystem {
    fn interface(&self, name: &str) -> Option<InterfaceInfo> {
        let dir = sysfs_dir(name)?;
        let ifindex = sysfs_number(&dir, "ifindex")?;
        let mac = parse_mac(fs::read_to_string(dir.join("address")).ok()?.trim())?;
        let rx_queues = fs::read_dir(dir.join("queues"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                    .count() as u32
            })
            .unwrap_or(1)
            .max(1);
        let mtu = sysfs_number(&dir, "mtu").unwrap_or(1500);
        Some(InterfaceInfo {
            ifindex,
            mac,
            rx_queues,
            mtu,
        })
    }

    /// Read even for a device [`LiveSystem::interface`] cannot use (a tun in L3 mode has no
    /// MAC address), so that the checks can say why.
    fn link(&self, name: &str) -> Option<LinkKind> {
        let dir = sysfs_dir(name)?;
        let ifindex = sysfs_number(&dir, "ifindex")?;
        let link_type = sysfs_number(&dir, "type")?;
        // A physical NIC has no rtnetlink kind: its driver says what it is.
        let driver = || {
            fs::read_link(dir.join("device/driver"))
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        };
        let kind = crate::link_kind::kind(ifindex).or_else(driver);
        let features = crate::link_kind::xdp_features(ifindex);
        log::debug!("{name}: link type {link_type}, kind {kind:?}, xdp-features {features:?}");
        Some(LinkKind {
            link_type,
            kind,
            native_xdp: features.map(|f| f.native()),
            rx_vlan_offload: crate::link_kind::rx_vlan_offload(name),
            vlan_hint: features.map(|f| f.vlan_hint()),
        })
    }

    fn allowed_cpus(&self) -> Option<Vec<usize>> {
        allowed_cpus().ok()
    }

    fn addresses(&self, name: &str) -> Vec<std::net::IpAddr> {
        interface_addresses(name)
    }
}

/// An interface's IP addresses in the kernel's order (IPv4 primary first), from getifaddrs.
pub fn interface_addresses(name: &str) -> Vec<std::net::IpAddr> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    all.filter(|i| i.interface_name == name)
        .filter_map(|i| {
            let a = i.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Whether `iface` can transmit now: administratively up with its link up (operstate `up`,
/// or `unknown` for interfaces that do not report one). A deleted interface is down.
pub fn link_up(iface: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/operstate"))
        .map(|s| matches!(s.trim(), "up" | "unknown"))
        .unwrap_or(false)
}

/// The capabilities the relay cannot run without, each with its bit in the capability sets.
pub const REQUIRED_CAPS: [(&str, u32); 4] = [
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
];

/// CAP_IPC_LOCK's bit: locking more memory than RLIMIT_MEMLOCK allows (a large UMEM).
pub const CAP_IPC_LOCK: u32 = 14;

/// This process's effective capability set, as a bit mask (0 if it cannot be read).
fn effective_capabilities() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// Whether the capability with bit `bit` is in this process's effective set.
pub fn has_capability(bit: u32) -> bool {
    effective_capabilities() & (1 << bit) != 0
}

/// Which of [`REQUIRED_CAPS`] this process lacks in its effective set (none for root).
pub fn missing_capabilities() -> Vec<&'static str> {
    let eff = effective_capabilities();
    REQUIRED_CAPS
        .iter()
        .filter(|(_, bit)| eff & (1 << bit) == 0)
        .map(|(name, _)| *name)
        .collect()
}

/// The one line the relay stops with when it lacks capabilities it needs (`missing` is
/// [`missing_capabilities`]), or `None` when it has them all. The start and `--check` both
/// say exactly this.
pub fn capabilities_message(missing: &[&str]) -> Option<String> {
    (!missing.is_empty()).then(|| {
        format!(
            "the relay lacks {}: run it as root (sudo), or as the relay.service unit, which \
             grants CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF, CAP_PERFMON and CAP_IPC_LOCK",
            missing.join(", ")
        )
    })
}

/// Fails with [`capabilities_message`] if this process lacks a capability it needs.
pub fn require_capabilities() -> anyhow::Result<()> {
    match capabilities_message(&missing_capabilities()) {
        Some(message) => Err(anyhow::anyhow!(message)),
        None => Ok(()),
    }
}

/// This process's RLIMIT_MEMLOCK soft limit in bytes; `None` when unlimited.
pub fn memlock_limit() -> Option<u64> {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, initialised struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rlim) } != 0 {
        return None;
    }
    (rlim.rlim_cur != libc::RLIM_INFINITY).then_some(rlim.rlim_cur)
}

/// The interface's MTU now, if it exists.
pub fn mtu(iface: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The interface's index now, if it exists.
pub fn ifindex(iface: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// How the log names the device `ifindex` that was called `name`: the name alone while it is
/// still the device of that name, `name (ifindex N, deleted)` once it is not (the interface
/// was deleted, perhaps created again as another device), so a line about the old device is
/// not read as one about the new.
pub fn device_label(name: &str, ifindex: u32) -> String {
    if ifindex == 0 || self::ifindex(name) == Some(ifindex) {
        name.to_owned()
    } else {
        format!("{name} (ifindex {ifindex}, deleted)")
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lo` is ifindex 1 in every namespace; an ifindex it does not have is another device.
    #[test]
    fn a_device_that_is_not_the_current_one_of_its_name_is_labelled_deleted() {
        assert_eq!(device_label("lo", 1), "lo");
        assert_eq!(device_label("lo", 0), "lo", "never bound: no index to name");
        assert_eq!(device_label("lo", 987_654), "lo (ifindex 987654, deleted)");
        assert_eq!(
            device_label("no-such-if", 5),
            "no-such-if (ifindex 5, deleted)"
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:00:5e:0a:ff:01"),
            Some([2, 0, 0x5e, 0x0a, 0xff, 1])
        );
        assert_eq!(parse_mac("02:00:5e:0a:ff"), None);
        assert_eq!(parse_mac("02:00:5e:0a:ff:01:02"), None);
        assert_eq!(parse_mac("zz:00:5e:0a:ff:01"), None);
    }

    #[test]
    fn the_capabilities_message_names_what_is_missing() {
        assert_eq!(capabilities_message(&[]), None);
        assert_eq!(
            capabilities_message(&["CAP_NET_ADMIN", "CAP_BPF"]).unwrap(),
            "the relay lacks CAP_NET_ADMIN, CAP_BPF: run it as root (sudo), or as the \
             relay.service unit, which grants CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF, CAP_PERFMON \
             and CAP_IPC_LOCK"
        );
    }

    #[test]
    fn loopback_is_seen_and_paths_are_refused() {
        let lo = LiveSystem
            .interface("lo")
            .expect("every Linux system has lo");
        assert_eq!(lo.ifindex, 1);
        assert_eq!(lo.mac, [0; 6]);
        assert!(LiveSystem.interface("../lo").is_none());
        assert!(LiveSystem.interface("no-such-if0").is_none());
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

/// `0-3,6` for `[0, 1, 2, 3, 6]`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

#[cfg(test)]
mod cpu_tests {
    use super::cpu_list;

    #[test]
    fn cpu_lists_collapse_runs() {
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6]), "0-3,6");
        assert_eq!(cpu_list(&[1]), "1");
        assert_eq!(cpu_list(&[0, 2, 3]), "0,2-3");
        assert_eq!(cpu_list(&[]), "");
    }
}

/// Whether a device with this ifindex still exists in the relay's namespace (under any name).
/// The name of the interface with this index now, if there is one.
pub fn ifindex_name(ifindex: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname may write, and is NUL-terminated
    // by it on success.
    let p = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `name` holds a NUL-terminated string.
    let c = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(c.to_string_lossy().into_owned())
}

pub fn ifindex_exists(ifindex: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname may write.
    !unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) }.is_null()
}
