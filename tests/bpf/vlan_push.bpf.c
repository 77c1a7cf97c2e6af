// SPDX-License-Identifier: GPL-2.0
// A tc (clsact egress) program that gives every frame leaving the interface an 802.1Q tag
// with VID `VID` (set at build time): the tag goes into the skb's metadata, as a NIC's
// rx-vlan offload would leave it, and the driver writes it into the frame only if the
// interface has tx-vlan offload off. Built and attached by tests/src/vlan_tc.rs.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef VID
#error "build with -DVID=<1..4094>"
#endif

SEC("tc")
int vlan_push(struct __sk_buff *skb)
{
	// A frame that cannot be tagged is dropped: leaving untagged would pass it off as
	// the untagged link's.
	if (bpf_skb_vlan_push(skb, bpf_htons(ETH_P_8021Q), VID) != 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
