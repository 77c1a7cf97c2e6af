// SPDX-License-Identifier: GPL-2.0
// A tc (clsact egress) program that gives every frame leaving the interface an 802.1Q tag
// with VID `VID` (set at build time): the tag goes into the skb's metadata, as a NIC's
// rx-vlan offload would leave it, and the driver writes it into the frame only if the
// interface has tx-vlan offload off. Built with MOVE_FRAME_TAG instead, it moves the tag a
// (crafted) frame carries into the metadata, whatever its VID: of two tags, the outer one, as
// a NIC strips it. Built and attached by tests/src/vlan_tc.rs.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifdef MOVE_FRAME_TAG
SEC("tc")
int vlan_push(struct __sk_buff *skb)
{
	__be16 type;
	__be16 tci;
	if (bpf_skb_load_bytes(skb, 12, &type, sizeof(type)) != 0)
		return TC_ACT_OK;
	if (type != bpf_htons(ETH_P_8021Q) && type != bpf_htons(ETH_P_8021AD))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, 14, &tci, sizeof(tci)) != 0)
		return TC_ACT_SHOT;
	// Off the frame (an inner tag then goes to the metadata), then the outer one into the
	// metadata (pushing an inner one back into the frame).
	if (bpf_skb_vlan_pop(skb) != 0 || bpf_skb_vlan_push(skb, type, bpf_ntohs(tci)) != 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}
#else
#ifndef VID
#error "build with -DVID=<1..4094>, or -DMOVE_FRAME_TAG"
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
#endif

char _license[] SEC("license") = "GPL";
