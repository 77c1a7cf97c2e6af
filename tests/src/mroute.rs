//! Kernel multicast routing (Linux ipmr) set up directly through the MRT socket options, as
//! smcroute does: the kernel's own forwarding of a flow, to measure the relay against.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Result, bail};

const MRT_INIT: i32 = 200;
const MRT_ADD_VIF: i32 = 202;
const MRT_ADD_MFC: i32 = 204;
const VIFF_USE_IFINDEX: u8 = 0x8;
const MAXVIFS: usize = 32;

#[repr(C)]
struct VifCtl {
    vifc_vifi: u16,
    vifc_flags: u8,
    vifc_threshold: u8,
    vifc_rate_limit: u32,
    /// `vifc_lcl_ifindex` when VIFF_USE_IFINDEX is set (a union with the local address).
    vifc_lcl_ifindex: i32,
    vifc_rmt_addr: u32,
}

#[repr(C)]
struct MfcCtl {
    mfcc_origin: u32,
    mfcc_mcastgrp: u32,
    mfcc_parent: u16,
    mfcc_ttls: [u8; MAXVIFS],
    mfcc_pkt_cnt: u32,
    mfcc_byte_cnt: u32,
    mfcc_wrong_if: u32,
    mfcc_expire: i32,
}

/// An (S,G) route in the kernel's multicast forwarding cache; the routing table goes away
/// when this is dropped (closing the MRT socket).
pub struct KernelMroute {
    _sock: OwnedFd,
}

impl KernelMroute {
    /// Forwards (source, group) arriving on `input` to every interface in `outputs` (indices
    /// in the calling thread's namespace). The kernel allows at most 32 interfaces.
    pub fn new(input: u32, outputs: &[u32], source: Ipv4Addr, group: Ipv4Addr) -> Result<Self> {
        if outputs.len() + 1 > MAXVIFS {
            bail!("the kernel's multicast routing takes at most {MAXVIFS} interfaces (MAXVIFS)");
        }
        // SAFETY: socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IGMP) };
        if fd < 0 {
            bail!("raw IGMP socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        set(&sock, MRT_INIT, &1i32)?;
        let mut ttls = [0u8; MAXVIFS];
        for (vif, &ifindex) in std::iter::once(&input).chain(outputs).enumerate() {
            let ctl = VifCtl {
                vifc_vifi: vif as u16,
                vifc_flags: VIFF_USE_IFINDEX,
                vifc_threshold: 1,
                vifc_rate_limit: 0,
                vifc_lcl_ifindex: ifindex as i32,
                vifc_rmt_addr: 0,
            };
            set(&sock, MRT_ADD_VIF, &ctl)?;
            if vif > 0 {
                // Forward when the packet's TTL exceeds this threshold.
                ttls[vif] = 1;
            }
        }
        let mfc = MfcCtl {
            mfcc_origin: u32::from_ne_bytes(source.octets()),
            mfcc_mcastgrp: u32::from_ne_bytes(group.octets()),
            mfcc_parent: 0,
            mfcc_ttls: ttls,
            mfcc_pkt_cnt: 0,
            mfcc_byte_cnt: 0,
            mfcc_wrong_if: 0,
            mfcc_expire: 0,
        };
        set(&sock, MRT_ADD_MFC, &mfc)?;
        Ok(Self { _sock: sock })
    }
}

fn set<T>(sock: &OwnedFd, name: i32, value: &T) -> Result<()> {
    // SAFETY: `value` is a valid T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("MRT setsockopt {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
