//! A VLAN tag pushed by tc onto every frame an interface sends, for tests that need tagged
//! frames from a host's own stack (its IGMP/MLD reports, its flows) rather than crafted
//! ones: `bpf_skb_vlan_push` in a clsact egress program puts the tag into the skb's
//! metadata, where a NIC's rx-vlan offload would have put it.
//!
//! The program (tests/bpf/vlan_push.bpf.c) is built with clang at attach time, one object
//! per VID in a temporary directory; clang and the libbpf headers come from
//! scripts/setup.sh.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{Netns, sh, unique_name};

/// Where the tag travels between a veth and its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagIn {
    /// In the skb's metadata, as rx-vlan offload leaves it: the sending veth has tx-vlan
    /// offload on (veth's default), so no bytes of the frame change on the way.
    Metadata,
    /// In the frame's bytes: tx-vlan offload off, so the kernel writes the tag into the
    /// frame before the veth sends it (the peer's stack then takes it out again, as it does
    /// with any tagged frame).
    Frame,
}

/// A tag-pushing tc program on one interface in a namespace; removed (with the clsact
/// qdisc it hangs off, and its object file) on drop.
#[derive(Debug)]
pub struct VlanPush {
    ns: String,
    iface: String,
    dir: PathBuf,
}

impl VlanPush {
    /// Tags every frame `iface` in `ns` sends with `vid` (1 to 4094), the tag carried as
    /// `tag_in` says. The interface must not have a clsact qdisc of someone else's: the
    /// drop removes it.
    pub fn attach(ns: &Netns, iface: &str, vid: u16, tag_in: TagIn) -> Result<VlanPush> {
        ensure!((1..=4094).contains(&vid), "VID {vid} is not 1 to 4094");
        Self::attach_built(ns, iface, &format!("VID={vid}"), tag_in)
    }

    /// Moves the tag of every tagged frame `iface` in `ns` sends (crafted and injected raw)
    /// into the skb's metadata, as a NIC's rx-vlan offload leaves it: the frame reaches the
    /// peer untagged, its tag beside it. Of two tags (QinQ) the outer one moves.
    pub fn move_frame_tags(ns: &Netns, iface: &str) -> Result<VlanPush> {
        Self::attach_built(ns, iface, "MOVE_FRAME_TAG", TagIn::Metadata)
    }

    /// Builds the program with `define` and attaches it, with the tag carried as `tag_in`.
    fn attach_built(ns: &Netns, iface: &str, define: &str, tag_in: TagIn) -> Result<VlanPush> {
        let dir = std::env::temp_dir().join(unique_name("vlan-tc"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on the drop cleans up whatever was done.
        let push = VlanPush {
            ns: ns.name().to_owned(),
            iface: iface.to_owned(),
            dir,
        };
        let obj = build(&push.dir, define)?;
        let offload = match tag_in {
            TagIn::Metadata => "on",
            TagIn::Frame => "off",
        };
        ns.exec(&["ethtool", "-K", iface, "txvlan", offload])?;
        ns.exec(&["tc", "qdisc", "add", "dev", iface, "clsact"])?;
        let obj = obj.to_str().context("a temporary path that is not UTF-8")?;
        ns.exec(&[
            "tc",
            "filter",
            "add",
            "dev",
            iface,
            "egress",
            "bpf",
            "direct-action",
            "obj",
            obj,
            "sec",
            "tc",
        ])?;
        Ok(push)
    }
}

impl Drop for VlanPush {
    fn drop(&mut self) {
        let _ = sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "tc",
            "qdisc",
            "del",
            "dev",
            &self.iface,
            "clsact",
        ]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Compiles the program with `-D<define>` into `dir`; the object's path.
fn build(dir: &Path, define: &str) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf/vlan_push.bpf.c");
    let obj = dir.join("vlan_push.o");
    let mut cc = Command::new("clang");
    cc.args(["-O2", "-g", "-target", "bpf", &format!("-D{define}")]);
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps under the multiarch
    // directory; `-target bpf` does not look there by itself.
    let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    if Path::new(&multiarch).is_dir() {
        cc.arg(format!("-I{multiarch}"));
    }
    let out = cc
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .output()
        .context("running clang (scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "clang failed on {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(obj)
}
