// SPDX-License-Identifier: (MIT OR Apache-2.0)
// pinhole's kernel fast path: a TC ingress classifier that forwards the UDP packets of
// latched relay streams without them reaching a socket.
//
// A flow is the exact 5-tuple a latched party sends on: its source address and port, the
// relay address and port it sends to. Userspace installs one after the party's source is
// latched and the other side is latched too, and removes it at delete, timeout, signalling
// change or when the party's source moves. A packet that matches is rewritten to leave the
// relay's peer port towards the other party (addresses, ports and checksums), counted, and
// sent out of the interface userspace found in the routing table (bpf_redirect_neigh: the
// kernel resolves the next hop; the host need not forward), or passed back up the stack
// when the new destination is local (loopback). Everything else — a stranger, the first packets before latching, STUN, what
// is not IPv4/UDP, fragments, IP options — goes on to userspace untouched.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// All fields in network byte order (as on the wire).
struct flow_key {
	__u32 src_ip;
	__u32 dst_ip;
	__u16 src_port;
	__u16 dst_port;
};

struct flow {
	// The rewrite: from the relay's peer port, to the other party.
	__u32 new_src_ip;
	__u32 new_dst_ip;
	__u16 new_src_port;
	__u16 new_dst_port;
	// The interface the new destination is reached through (userspace asks the routing
	// table when it installs the flow); 0: a local address, back up the stack.
	__u32 ifindex;
	// What went through (host byte order), and when last (bpf_ktime_get_ns).
	__u64 packets;
	__u64 bytes;
	__u64 last_ns;
	// Of them, RTP (version 2, payload type outside RTCP's 64-95, as latch.rs reads it).
	__u64 rtp_packets;
	// RTP quality, continued from userspace's statistics (stats.rs): the extended highest
	// sequence number (seq_known: it holds one), and RFC 3550 A.8 jitter x 16 in 8 kHz
	// units with the last transit time (transit_known: it holds one).
	__u32 ext_max;
	__u32 seq_known;
	__u32 jitter16;
	__u32 last_transit;
	__u32 transit_known;
	__u32 pad;
};

// A jump of more than this is not loss: userspace's restart detection is not repeated here.
#define MAX_DROPOUT 3000

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow);
} pinhole_flows SEC(".maps");

// lo is the first interface of every network namespace.
#define LOOPBACK_IFINDEX 1
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define UDP_CSUM_OFF (ETH_HLEN + sizeof(struct iphdr) + offsetof(struct udphdr, check))

SEC("classifier")
int pinhole_fwd(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	if (ip->frag_off & bpf_htons(0x3fff))
		return TC_ACT_OK;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return TC_ACT_OK;
	struct flow_key key = {
		.src_ip = ip->saddr,
		.dst_ip = ip->daddr,
		.src_port = udp->source,
		.dst_port = udp->dest,
	};
	struct flow *f = bpf_map_lookup_elem(&pinhole_flows, &key);
	if (!f)
		return TC_ACT_OK;
	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, bpf_ntohs(udp->len) > 8 ? bpf_ntohs(udp->len) - 8 : 0);
	f->last_ns = bpf_ktime_get_ns();
	__u8 *payload = (void *)(udp + 1);
	if ((void *)(payload + 12) <= end && (payload[0] & 0xc0) == 0x80 && ((payload[1] & 0x7f) < 64 || (payload[1] & 0x7f) >= 96)) {
		__sync_fetch_and_add(&f->rtp_packets, 1);
		// Loss and jitter as stats.rs measures them. One party's packets arrive on one
		// CPU in order, so plain updates do.
		__u16 seq = ((__u16)payload[2] << 8) | payload[3];
		if (!f->seq_known) {
			f->ext_max = seq;
			f->seq_known = 1;
		} else {
			__u16 delta = seq - (__u16)f->ext_max;
			if (delta != 0 && delta < MAX_DROPOUT)
				f->ext_max += delta;
		}
		if ((payload[1] & 0x7f) <= 34) {
			__u32 ts = ((__u32)payload[4] << 24) | ((__u32)payload[5] << 16) | ((__u32)payload[6] << 8) | payload[7];
			__u32 transit = (__u32)(bpf_ktime_get_ns() / 125000) - ts;
			if (f->transit_known) {
				__s32 d = (__s32)(transit - f->last_transit);
				__u32 ad = d < 0 ? -d : d;
				f->jitter16 += ad - (f->jitter16 >> 4);
			}
			f->last_transit = transit;
			f->transit_known = 1;
		}
	}

	__u32 old_src = ip->saddr, old_dst = ip->daddr;
	__u32 new_src = f->new_src_ip, new_dst = f->new_dst_ip;
	__u16 old_sport = udp->source, old_dport = udp->dest;
	__u16 new_sport = f->new_src_port, new_dport = f->new_dst_port;
	int has_udp_csum = udp->check != 0;
	__u32 ifindex = f->ifindex;

	// The UDP checksum covers the pseudo-header (addresses) and the ports.
	if (has_udp_csum) {
		bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_src, new_src, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4);
		bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_dst, new_dst, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4);
		bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_sport, new_sport, BPF_F_MARK_MANGLED_0 | 2);
		bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_dport, new_dport, BPF_F_MARK_MANGLED_0 | 2);
	}
	bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_src, new_src, 4);
	bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_dst, new_dst, 4);
	bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, saddr), &new_src, 4, 0);
	bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, daddr), &new_dst, 4, 0);
	bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct iphdr) + offsetof(struct udphdr, source), &new_sport, 2, 0);
	bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct iphdr) + offsetof(struct udphdr, dest), &new_dport, 2, 0);

	// A local destination (loopback, or a relay-side shim such as the fake-TCP forwarder's)
	// is reached through lo's ingress, where a source of our own is no martian.
	if (!ifindex)
		return skb->ingress_ifindex == LOOPBACK_IFINDEX ? TC_ACT_OK : bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
	// The next hop's address resolved by the kernel's neighbour table, as routing would.
	return bpf_redirect_neigh(ifindex, 0, 0, 0);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
