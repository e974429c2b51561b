// connprobe lab: lose a random fraction of packets on a link (tc clsact, direct action).
// Built by connprobe.lab.faults with -DTHRESHOLD=<fraction * 2^32> and -DL4PROTO=<0 for any, 6 for tcp ...>.
// A packet dropped here is freed with reason TC_EGRESS or TC_INGRESS: unlike an nftables policy drop
// (NETFILTER_DROP), so the kernel itself tells injected loss from policy.
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

BPF_ARRAY(loss_stats, u64, 2);  // [0] packets considered, [1] packets dropped

static __always_inline void bump(int idx) {
    u64 *v = loss_stats.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

int lab_loss(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    u8 l4;
    if ((void *)(eth + 1) > end)
        return TC_ACT_OK;
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *iph = (void *)(eth + 1);
        if ((void *)(iph + 1) > end)
            return TC_ACT_OK;
        l4 = iph->protocol;
    } else if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > end)
            return TC_ACT_OK;
        l4 = ip6->nexthdr;
    } else {
        return TC_ACT_OK;  // ARP and friends always pass: the path stays resolvable
    }
    if (L4PROTO && l4 != L4PROTO)
        return TC_ACT_OK;
    bump(0);
    if (bpf_get_prandom_u32() < (u32)THRESHOLD) {
        bump(1);
        return TC_ACT_SHOT;
    }
    return TC_ACT_OK;
}
