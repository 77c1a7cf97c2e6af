// SPDX-License-Identifier: MIT OR GPL-2.0
//
// The relay's front program for a device whose driver hands the VLAN tag it took off a frame
// (rx-vlan-offload) to XDP as RX metadata. It is in C because the Rust toolchain for eBPF
// (bpf-linker 0.13) emits no BTF for an extern kernel function, which a kfunc call needs.
// Bound to its device at load (the kfunc demands it), it leaves the frame's tag, or that it
// has none, in this CPU's slot of VLAN_HINTS and tail-calls the relay's `relay_hinted`,
// which steers the frame as if the tag were in its header.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

extern int bpf_xdp_metadata_rx_vlan_tag(const struct xdp_md *ctx, __be16 *vlan_proto,
                                        __u16 *vlan_tci) __ksym;

// relay_common::VlanHint.
struct vlan_hint {
    __u16 present;
    __be16 proto;
    __u16 tci;
    __u16 pad;
};

// The relay's own map (relay_common::VLAN_HINT_MAP): the daemon hands its descriptor over
// before this object is loaded.
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct vlan_hint);
} VLAN_HINTS SEC(".maps");

// Slot 0: `relay_hinted`, put there by the daemon.
struct {
    __uint(type, BPF_MAP_TYPE_PROG_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} NEXT SEC(".maps");

SEC("xdp")
int relay_vlan_hint(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct vlan_hint *hint = bpf_map_lookup_elem(&VLAN_HINTS, &zero);
    if (!hint)
        return XDP_PASS;
    __be16 proto = 0;
    __u16 tci = 0;
    // Written for every frame, so the relay's program never reads another frame's tag.
    hint->present = bpf_xdp_metadata_rx_vlan_tag(ctx, &proto, &tci) == 0;
    hint->proto = proto;
    hint->tci = tci;
    bpf_tail_call(ctx, &NEXT, 0);
    // No program in the slot (a relay starting or stopping): the kernel gets the frame.
    return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
