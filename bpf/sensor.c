/* connprobe kernel sensor: stable tracepoints only (no kprobes, no fentry).
 *
 * Compiled by bcc with -D flags from bpf/loader.py (offsets: bpf/preload.py, bpf/btf.py):
 *   OFF_*            struct member offsets read from the running kernel's BTF (never a header's layout);
 *                    the optional ones (OFF_SK_ERR, OFF_SK_PROTOCOL, OFF_INET_SPORT, OFF_SKB_CB,
 *                    OFF_TCB_SEQ, OFF_TCB_END_SEQ, OFF_TP_SND_UNA, OFF_TP_DATA_SEGS_OUT,
 *                    OFF_TP_TOTAL_RETRANS) only when present
 *   RING_PAGES       ring-buffer size in pages (power of two)
 *   RESCUE_PAGES     size of the second ring, for records the first refuses (power of two; default 16)
 *   WATCH_MAX        size of the watch list
 *   HOOK_*           one per tracepoint that passed its feature check on this kernel (bpf/loader.py
 *                    attaches each program itself, so one that fails to load costs only its event kind)
 *   HAVE_KFREE_RX_SK skb:kfree_skb has the rx_sk field (6.12+)
 *   STATE_RECORD_MASK bit n set: a watched flow's change to TCP state n (the kernel's numbering, from tracefs)
 *                    becomes a ring record; the others are only counted in `state_counts` (default: all)
 *   NETNS_FILTER     report only events seen in a network namespace on the `node_netns` list (the namespaces
 *                    of this node; an event whose namespace is unknown, inode 0, is not reported either);
 *                    the others are counted in `foreign`. Without it every namespace is reported.
 *
 * Events of watched flows (proto + local port on the watch list, matched on either port so the server
 * side of a flow on the same node is caught too; an ICMP echo's identifier is its "port": icmp/ID) go to the
 * `events` ring buffer (watch key: proto << 16 | port; ICMPv6 echoes are folded into proto 1). Every event,
 * watched or not, is counted in `counts`. Drop reasons on the `quiet` list (QUEUE_PURGE, NOT_SPECIFIED, ...) are only
 * counted, never sent. A record the ring refuses goes to the `rescue` ring (counted in `rescued`); one both refuse
 * is counted in `lost`.
 */
#include "events.h"

/* Tracepoint structs that name these enums do not compile against older headers ("incomplete type").
 * Complete dummy declarations make them compile; values are never taken from here (names come from the
 * running kernel's tracefs formats). */
enum skb_drop_reason { CP_DUMMY_DROP_REASON = 0 };
enum sk_rst_reason { CP_DUMMY_RST_REASON = 0 };

#define CP_AF_INET 2
#define CP_AF_INET6 10
#define CP_ETH_P_IP 0x0800
#define CP_ETH_P_IPV6 0x86DD
#define CP_IPPROTO_ICMP 1
/* IPv6 extension headers the packet parser steps over, and how many at most */
#define CP_NEXTHDR_HOP 0
#define CP_NEXTHDR_ROUTING 43
#define CP_NEXTHDR_FRAGMENT 44
#define CP_NEXTHDR_AUTH 51
#define CP_NEXTHDR_DEST 60
#define CP_IPV6_MAX_EXT 6
#define CP_IPPROTO_TCP 6
#define CP_IPPROTO_UDP 17
#define CP_IPPROTO_ICMPV6 58

#ifndef RESCUE_PAGES
#define RESCUE_PAGES 16
#endif
#ifndef STATE_RECORD_MASK
#define STATE_RECORD_MASK 0xFFFF
#endif

BPF_RINGBUF_OUTPUT(events, RING_PAGES);
/* Where a record goes when `events` refuses it (emit()); read with `events`. */
BPF_RINGBUF_OUTPUT(rescue, RESCUE_PAGES);
BPF_PERCPU_ARRAY(rescued, u64, 1);
BPF_HASH(watch, u32, u8, WATCH_MAX);
BPF_HASH(quiet, u32, u8, 256);
BPF_PERCPU_HASH(counts, struct cp_count_key, u64, 4096);
BPF_PERCPU_ARRAY(lost, u64, 1);
#ifdef NETNS_FILTER
BPF_HASH(node_netns, u32, u8, 1024);
BPF_PERCPU_ARRAY(foreign, u64, 1);
#endif
/* TCP state changes counted apart, [watched * 16 + new state]: every connection of the node makes ~10 of them,
 * and an array slot costs a fraction of the `counts` hash's lookup (benchmarks/sensor.py). */
BPF_PERCPU_ARRAY(state_counts, u64, 32);

static __always_inline u32 watch_key(u8 proto, u16 port) { return ((u32)proto << 16) | port; }

/* Per port: how many protocols watch it (user space keeps it with `watch`). An array slot is read in a few
 * instructions, a hash lookup costs tens of ns: traffic of unwatched ports (nearly all of a node's) is told
 * apart by the array alone, and only a port some protocol watches is looked up in `watch`. */
BPF_ARRAY(watch_ports, u8, 65536);

static __always_inline int port_watched(u16 port) {
    u32 i = port;
    u8 *n = watch_ports.lookup(&i);
    return n && *n;
}

static __always_inline int is_watched(u8 proto, u16 sport, u16 dport) {
    u32 k;
    if (port_watched(sport)) {
        k = watch_key(proto, sport);
        if (watch.lookup(&k))
            return 1;
    }
    if (port_watched(dport)) {
        k = watch_key(proto, dport);
        if (watch.lookup(&k))
            return 1;
    }
    return 0;
}

static __always_inline void count(u16 kind, u32 reason, int watched) {
    struct cp_count_key k = {};
    k.kind = kind;
    k.watched = watched;
    k.reason = reason;
    u64 zero = 0;
    u64 *v = counts.lookup_or_try_init(&k, &zero);
    if (v)
        (*v)++;
}

static __always_inline void emit(struct cp_event *ev) {
#ifdef NETNS_FILTER
    /* Another node's namespace (the two-node lab: each sensor reports only its own node's). */
    if (!node_netns.lookup(&ev->netns)) {
        u32 z = 0;
        u64 *f = foreign.lookup(&z);
        if (f)
            (*f)++;
        return;
    }
#endif
    struct cp_event *out = events.ringbuf_reserve(sizeof(struct cp_event));
    if (!out) {
        /* The ring's reservation also fails, now and then, with the ring nearly empty (seen on 6.18 with two
         * CPUs writing: up to ~1 in 10,000 records at 40,000/s; retrying at once mostly fails — likely its lock
         * giving up under contention); a second ring, with a lock of its own, takes the record (BENCHMARKS.md). */
        out = rescue.ringbuf_reserve(sizeof(struct cp_event));
        u32 z = 0;
        u64 *v = out ? rescued.lookup(&z) : lost.lookup(&z);
        if (v)
            (*v)++;
        if (!out)
            return;
    }
    __builtin_memcpy(out, ev, sizeof(struct cp_event));
    events.ringbuf_submit(out, 0); /* bpf_ringbuf_submit finds the record's ring from its header: either ring */
}

/* Network-namespace inode of a socket: sk->__sk_common.skc_net.net->ns.inum (BTF offsets). */
static __always_inline u32 sk_netns(const void *sk) {
    if (!sk)
        return 0;
    void *net = 0;
    if (bpf_probe_read_kernel(&net, sizeof(net), (const char *)sk + OFF_SK_NET) || !net)
        return 0;
    u32 inum = 0;
    bpf_probe_read_kernel(&inum, sizeof(inum), (const char *)net + OFF_NET_INUM);
    return inum;
}

/* Network-namespace inode of a packet: skb->dev->nd_net.net->ns.inum, else skb->sk's.
 * skb->dev shares storage with dev_scratch, so a failed or zero read falls through to skb->sk. */
static __always_inline u32 skb_netns(const void *skb) {
    void *dev = 0;
    u32 inum = 0;
    if (!bpf_probe_read_kernel(&dev, sizeof(dev), (const char *)skb + OFF_SKB_DEV) && dev) {
        void *net = 0;
        if (!bpf_probe_read_kernel(&net, sizeof(net), (const char *)dev + OFF_NETDEV_ND_NET) && net) {
            if (!bpf_probe_read_kernel(&inum, sizeof(inum), (const char *)net + OFF_NET_INUM) && inum)
                return inum;
        }
    }
    void *sk = 0;
    if (!bpf_probe_read_kernel(&sk, sizeof(sk), (const char *)skb + OFF_SKB_SK) && sk)
        return sk_netns(sk);
    return 0;
}

/* Where parse_skb found the headers, for the reads only a watched packet needs (seq, length). */
struct cp_hdrs {
    unsigned char *ip;
    unsigned char *th;
};

/* Parse the IP and TCP/UDP headers of a packet at skb->head + skb->network_header. Returns 0 on success. */
static __always_inline int parse_skb(const void *skb, u16 l3proto, struct cp_event *ev, struct cp_hdrs *hdrs) {
    unsigned char *head = 0;
    u16 nh = 0;
    if (bpf_probe_read_kernel(&head, sizeof(head), (const char *)skb + OFF_SKB_HEAD) || !head)
        return -1;
    if (bpf_probe_read_kernel(&nh, sizeof(nh), (const char *)skb + OFF_SKB_NETWORK_HEADER) || nh == 0xFFFF)
        return -1;
    if (l3proto != CP_ETH_P_IP && l3proto != CP_ETH_P_IPV6 && l3proto != 0)
        return -1;
    unsigned char *ip = head + nh;
    u8 vihl = 0;
    if (bpf_probe_read_kernel(&vihl, 1, ip))
        return -1;
    unsigned char *th;
    if ((vihl >> 4) == 4) {
        u16 frag = 0;
        ev->family = CP_AF_INET;
        bpf_probe_read_kernel(&ev->proto, 1, ip + 9);
        bpf_probe_read_kernel(ev->saddr, 4, ip + 12);
        bpf_probe_read_kernel(ev->daddr, 4, ip + 16);
        bpf_probe_read_kernel(&frag, 2, ip + 6);
        if (frag & bpf_htons(0x1FFF))  /* not the first fragment: no transport header */
            return 0;
        th = ip + (vihl & 0x0F) * 4;
    } else if ((vihl >> 4) == 6) {
        u8 next = 0;
        ev->family = CP_AF_INET6;
        bpf_probe_read_kernel(&next, 1, ip + 6);
        bpf_probe_read_kernel(ev->saddr, 16, ip + 8);
        bpf_probe_read_kernel(ev->daddr, 16, ip + 24);
        th = ip + 40;
        /* Follow extension headers to the transport header (RFC 8200 4.1 order; a bounded walk). */
#pragma unroll
        for (int i = 0; i < CP_IPV6_MAX_EXT; i++) {
            u8 h[4] = {};
            if (next == CP_NEXTHDR_HOP || next == CP_NEXTHDR_ROUTING || next == CP_NEXTHDR_DEST) {
                if (bpf_probe_read_kernel(h, 2, th))
                    break;
                next = h[0];
                th += ((u32)h[1] + 1) * 8;
            } else if (next == CP_NEXTHDR_FRAGMENT) {
                if (bpf_probe_read_kernel(h, 4, th))
                    break;
                next = h[0];
                th += 8;
                if ((((u16)h[2] << 8) | h[3]) >> 3) {  /* not the first fragment: no transport header */
                    ev->proto = next;
                    return 0;
                }
            } else if (next == CP_NEXTHDR_AUTH) {
                if (bpf_probe_read_kernel(h, 2, th))
                    break;
                next = h[0];
                th += ((u32)h[1] + 2) * 4;
            } else {
                break;
            }
        }
        ev->proto = next;
    } else {
        return -1;
    }
    hdrs->ip = ip;
    hdrs->th = th;
    if (ev->proto == CP_IPPROTO_TCP || ev->proto == CP_IPPROTO_UDP) {
        u16 ports[2] = {};
        if (bpf_probe_read_kernel(ports, sizeof(ports), th))
            return 0;
        ev->sport = bpf_ntohs(ports[0]);
        ev->dport = bpf_ntohs(ports[1]);
        if (ev->proto == CP_IPPROTO_TCP)
            bpf_probe_read_kernel(&ev->tcp_flags, 1, th + 13);
    } else if (ev->proto == CP_IPPROTO_ICMP || ev->proto == CP_IPPROTO_ICMPV6) {
        /* An echo request or reply: its identifier stands for both ports (an ICMP probe watches icmp/ID), and
         * ICMPv6 echoes are folded into icmp so that one watch key covers both families. Other ICMP messages
         * keep sport = dport = 0: never watched. */
        u8 type = 0;
        u16 id = 0;
        if (bpf_probe_read_kernel(&type, 1, th) || bpf_probe_read_kernel(&id, 2, th + 4))
            return 0;
        if (type == 8 || type == 0 || type == 128 || type == 129) {
            ev->proto = CP_IPPROTO_ICMP;
            ev->sport = bpf_ntohs(id);
            ev->dport = ev->sport;
        }
    }
    return 0;
}

/* Whether a parsed packet has a tuple the watch list can name: TCP/UDP ports or an echo's identifier. */
static __always_inline int has_ports(const struct cp_event *ev) {
    return ev->proto == CP_IPPROTO_TCP || ev->proto == CP_IPPROTO_UDP || (ev->proto == CP_IPPROTO_ICMP && ev->sport);
}

/* Copy the v4/v6 addresses of a tcp/sock tracepoint (saddr[4], daddr[4], saddr_v6[16], daddr_v6[16]). */
#define CP_COPY_ADDRS(ev, args)                                              \
    do {                                                                     \
        if ((ev)->family == CP_AF_INET6) {                                   \
            __builtin_memcpy((ev)->saddr, (args)->saddr_v6, 16);             \
            __builtin_memcpy((ev)->daddr, (args)->daddr_v6, 16);             \
        } else {                                                             \
            __builtin_memcpy((ev)->saddr, (args)->saddr, 4);                 \
            __builtin_memcpy((ev)->daddr, (args)->daddr, 4);                 \
        }                                                                    \
    } while (0)

/* Sequence number and sequence space of a parsed TCP packet (watched drops only: two small reads).
 * The IP length covers the whole packet, so a GSO super-packet reports all the segments it holds. */
static __always_inline void tcp_seq_of_packet(struct cp_event *ev, const struct cp_hdrs *hdrs) {
    u8 t[10] = {};  /* seq (4), ack (4), data offset (1), flags (1) from th + 4 */
    u16 iplen = 0;
    if (ev->proto != CP_IPPROTO_TCP || !hdrs->th || bpf_probe_read_kernel(t, sizeof(t), hdrs->th + 4))
        return;
    u32 l4len;
    if (ev->family == CP_AF_INET) {
        if (bpf_probe_read_kernel(&iplen, 2, hdrs->ip + 2))
            return;
        l4len = (u32)bpf_ntohs(iplen) - (u32)(hdrs->th - hdrs->ip);
    } else {
        if (bpf_probe_read_kernel(&iplen, 2, hdrs->ip + 4))
            return;
        l4len = (u32)bpf_ntohs(iplen) + 40 - (u32)(hdrs->th - hdrs->ip);
    }
    u32 doff = (t[8] >> 4) * 4;
    if (iplen == 0 || l4len < doff)  /* BIG TCP (length 0) or a truncated header: leave seq unknown */
        return;
    ev->seq = ((u32)t[0] << 24) | ((u32)t[1] << 16) | ((u32)t[2] << 8) | t[3];
    ev->seq_len = l4len - doff + ((t[9] & 0x02) ? 1 : 0) + ((t[9] & 0x01) ? 1 : 0);
    ev->seq_flags |= CP_SEQ_VALID;
}

#ifdef HOOK_TCP_TCP_RETRANSMIT_SKB
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    struct cp_event ev = {};
    ev.kind = CP_KIND_RETRANSMIT;
    ev.proto = CP_IPPROTO_TCP;
    ev.sport = args->sport;
    ev.dport = args->dport;
    ev.state = args->state;
    ev.error = args->err;
    int watched = is_watched(CP_IPPROTO_TCP, ev.sport, ev.dport);
    count(CP_KIND_RETRANSMIT, ev.state, watched);
    if (!watched)
        return 0;
    ev.ts_ns = bpf_ktime_get_ns();
    ev.family = args->family;
    ev.skaddr = (u64)args->skaddr;
    ev.netns = sk_netns(args->skaddr);
    CP_COPY_ADDRS(&ev, args);
#if defined(OFF_SKB_CB) && defined(OFF_TCB_SEQ) && defined(OFF_TCB_END_SEQ)
    /* The segment retransmitted: TCP_SKB_CB(skb)->seq / end_seq of the queued skb. */
    u32 range[2] = {};
    if (!bpf_probe_read_kernel(&range[0], 4, (const char *)args->skbaddr + OFF_SKB_CB + OFF_TCB_SEQ) &&
        !bpf_probe_read_kernel(&range[1], 4, (const char *)args->skbaddr + OFF_SKB_CB + OFF_TCB_END_SEQ)) {
        ev.seq = range[0];
        ev.seq_len = range[1] - range[0];
        ev.seq_flags |= CP_SEQ_VALID;
    }
#endif
#ifdef OFF_TP_SND_UNA
    if (!bpf_probe_read_kernel(&ev.snd_una, 4, (const char *)args->skaddr + OFF_TP_SND_UNA))
        ev.seq_flags |= CP_SNDUNA_VALID;
#endif
#if defined(OFF_TP_DATA_SEGS_OUT) && defined(OFF_TP_TOTAL_RETRANS)
    /* How many segments the socket had sent and resent: the loss rate it had met before this one. */
    if (!bpf_probe_read_kernel(&ev.segs_out, 4, (const char *)args->skaddr + OFF_TP_DATA_SEGS_OUT) &&
        !bpf_probe_read_kernel(&ev.total_retrans, 4, (const char *)args->skaddr + OFF_TP_TOTAL_RETRANS))
        ev.seq_flags |= CP_COUNTERS_VALID;
#endif
    emit(&ev);
    return 0;
}
#endif

#ifdef HOOK_TCP_TCP_RETRANSMIT_SYNACK
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack) {
    struct cp_event ev = {};
    ev.kind = CP_KIND_SYNACK_RETRANSMIT;
    ev.proto = CP_IPPROTO_TCP;
    ev.sport = args->sport;
    ev.dport = args->dport;
    ev.state = 3; /* TCP_SYN_RECV */
    int watched = is_watched(CP_IPPROTO_TCP, ev.sport, ev.dport);
    count(CP_KIND_SYNACK_RETRANSMIT, 0, watched);
    if (!watched)
        return 0;
    ev.ts_ns = bpf_ktime_get_ns();
    ev.family = args->family;
    ev.skaddr = (u64)args->skaddr;
    ev.netns = sk_netns(args->skaddr);
    CP_COPY_ADDRS(&ev, args);
    emit(&ev);
    return 0;
}
#endif

#ifdef HOOK_SOCK_INET_SOCK_SET_STATE
TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != CP_IPPROTO_TCP)
        return 0;
    /* The unwatched path first, and short: the watch test and one array slot, no event built. */
    int watched = is_watched(CP_IPPROTO_TCP, args->sport, args->dport);
    u32 slot = (watched ? 16 : 0) + ((u32)args->newstate & 15);
    u64 *n = state_counts.lookup(&slot);
    if (n)
        (*n)++;
    if (!watched)
        return 0;
    /* Of a watched flow's changes only the new states on the STATE_RECORD_MASK become records (the app asks
     * for those its readers use: ESTABLISHED and CLOSE); the others are counted above and nothing more. */
    if (!((STATE_RECORD_MASK >> ((u32)args->newstate & 15)) & 1))
        return 0;
    struct cp_event ev = {};
    ev.kind = CP_KIND_STATE;
    ev.proto = CP_IPPROTO_TCP;
    ev.sport = args->sport;
    ev.dport = args->dport;
    ev.state = args->newstate;
    ev.old_state = args->oldstate;
    ev.ts_ns = bpf_ktime_get_ns();
    ev.family = args->family;
    ev.skaddr = (u64)args->skaddr;
    ev.netns = sk_netns(args->skaddr);
    CP_COPY_ADDRS(&ev, args);
    emit(&ev);
    return 0;
}
#endif

#ifdef HOOK_TCP_TCP_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    struct cp_event ev = {};
    ev.kind = CP_KIND_RESET_RX;
    ev.proto = CP_IPPROTO_TCP;
    ev.sport = args->sport;
    ev.dport = args->dport;
    int watched = is_watched(CP_IPPROTO_TCP, ev.sport, ev.dport);
    count(CP_KIND_RESET_RX, 0, watched);
    if (!watched)
        return 0;
    ev.ts_ns = bpf_ktime_get_ns();
    ev.family = args->family;
    ev.skaddr = (u64)args->skaddr;
    ev.netns = sk_netns(args->skaddr);
    CP_COPY_ADDRS(&ev, args);
    emit(&ev);
    return 0;
}
#endif

#ifdef HOOK_TCP_TCP_SEND_RESET
/* 6.10+ layout: saddr/daddr are raw sockaddrs (family at 0, port at 2 network order, IPv4 address at 4,
 * IPv6 address at 8); skaddr is NULL when no socket exists (reason NO_SOCKET). */
TRACEPOINT_PROBE(tcp, tcp_send_reset) {
    struct cp_event ev = {};
    ev.kind = CP_KIND_RESET_TX;
    ev.proto = CP_IPPROTO_TCP;
    ev.reason = args->reason;
    ev.state = args->state;
    u16 fam = 0, sp = 0, dp = 0;
    __builtin_memcpy(&fam, args->saddr, 2);
    __builtin_memcpy(&sp, args->saddr + 2, 2);
    __builtin_memcpy(&dp, args->daddr + 2, 2);
    ev.sport = bpf_ntohs(sp);
    ev.dport = bpf_ntohs(dp);
    int watched = is_watched(CP_IPPROTO_TCP, ev.sport, ev.dport);
    count(CP_KIND_RESET_TX, ev.reason, watched);
    if (!watched)
        return 0;
    ev.ts_ns = bpf_ktime_get_ns();
    ev.family = fam;
    ev.skaddr = (u64)args->skaddr;
    if (fam == CP_AF_INET6) {
        __builtin_memcpy(ev.saddr, args->saddr + 8, 16);
        __builtin_memcpy(ev.daddr, args->daddr + 8, 16);
    } else {
        __builtin_memcpy(ev.saddr, args->saddr + 4, 4);
        __builtin_memcpy(ev.daddr, args->daddr + 4, 4);
    }
    ev.netns = args->skaddr ? sk_netns(args->skaddr) : skb_netns(args->skbaddr);
    emit(&ev);
    return 0;
}
#endif

#ifdef HOOK_SKB_KFREE_SKB
TRACEPOINT_PROBE(skb, kfree_skb) {
    struct cp_event ev = {};
    u32 reason = args->reason;
    const void *skb = args->skbaddr;
    struct cp_hdrs hdrs = {};
    ev.kind = CP_KIND_DROP;
    ev.reason = reason;
    int parsed = parse_skb(skb, args->protocol, &ev, &hdrs) == 0 && has_ports(&ev);
    int watched = parsed && is_watched(ev.proto, ev.sport, ev.dport);
    count(CP_KIND_DROP, reason, watched);
    if (!watched || quiet.lookup(&reason))
        return 0;
    ev.ts_ns = bpf_ktime_get_ns();
    ev.location = (u64)args->location;
    u32 inum = 0;
#ifdef HAVE_KFREE_RX_SK
    inum = sk_netns(args->rx_sk);
#endif
    if (!inum)
        inum = skb_netns(skb);
    ev.netns = inum;
    tcp_seq_of_packet(&ev, &hdrs);
    emit(&ev);
    return 0;
}
#endif

#ifdef HOOK_ICMP_ICMP_SEND
/* An ICMP error is being sent about skbaddr (the offending packet): e.g. port unreachable for a DNS query
 * to a closed port. The event carries that packet's tuple (the prober's view) and type << 8 | code. */
TRACEPOINT_PROBE(icmp, icmp_send) {
    struct cp_event ev = {};
    const void *skb = args->skbaddr;
    ev.kind = CP_KIND_ICMP_SEND;
    ev.error = (args->type << 8) | (args->code & 0xFF);
    struct cp_hdrs hdrs = {};
    int parsed = parse_skb(skb, 0, &ev, &hdrs) == 0 && has_ports(&ev);
    int watched = parsed && is_watched(ev.proto, ev.sport, ev.dport);
    count(CP_KIND_ICMP_SEND, (u32)ev.error, watched);
    if (!watched)
        return 0;
    ev.ts_ns = bpf_ktime_get_ns();
    ev.netns = skb_netns(skb);
    emit(&ev);
    return 0;
}
#endif

#if defined(HOOK_SOCK_INET_SK_ERROR_REPORT) && defined(OFF_SK_ERR) && defined(OFF_SK_PROTOCOL) && \
    defined(OFF_INET_SPORT)
/* A raw tracepoint: the regular one has no socket pointer, so no namespace. TP_PROTO(const struct sock *sk)
 * has been stable since the tracepoint appeared (5.13); every field is read from the socket at BTF offsets.
 * The local port is inet_sport: a TCP connect refused by a reset has already given back its port
 * (skc_num = 0) when the error is reported, as the regular tracepoint's own sport field knows. */
RAW_TRACEPOINT_PROBE(inet_sk_error_report) {
    const char *sk = (const char *)ctx->args[0];
    int err = 0;
    bpf_probe_read_kernel(&err, sizeof(err), sk + OFF_SK_ERR);
    if (err == 0)  /* a report after the error was already taken: nothing new */
        return 0;
    struct cp_event ev = {};
    u16 proto = 0, sport = 0, dport = 0;
    bpf_probe_read_kernel(&proto, 2, sk + OFF_SK_PROTOCOL);
    bpf_probe_read_kernel(&sport, 2, sk + OFF_INET_SPORT);
    bpf_probe_read_kernel(&dport, 2, sk + OFF_SKC_DPORT);
    ev.kind = CP_KIND_SOCK_ERROR;
    ev.proto = proto;
    ev.sport = bpf_ntohs(sport);
    ev.dport = bpf_ntohs(dport);
    ev.error = err;
    int watched = is_watched(ev.proto, ev.sport, ev.dport);
    count(CP_KIND_SOCK_ERROR, (u32)ev.error, watched);
    if (!watched)
        return 0;
    ev.ts_ns = bpf_ktime_get_ns();
    ev.skaddr = (u64)sk;
    bpf_probe_read_kernel(&ev.family, 2, sk + OFF_SKC_FAMILY);
    if (ev.family == CP_AF_INET6) {
        bpf_probe_read_kernel(ev.saddr, 16, sk + OFF_SKC_V6_RCV_SADDR);
        bpf_probe_read_kernel(ev.daddr, 16, sk + OFF_SKC_V6_DADDR);
    } else {
        bpf_probe_read_kernel(ev.saddr, 4, sk + OFF_SKC_RCV_SADDR);
        bpf_probe_read_kernel(ev.daddr, 4, sk + OFF_SKC_DADDR);
    }
    ev.netns = sk_netns(sk);
    emit(&ev);
    return 0;
}
#endif

/* UDP datagrams sent / received on watched sockets (the DNS queries of a probe and their answers). These
 * tracepoints fire for every sendmsg/recvmsg of every socket: anything not UDP leaves at the first test.
 * The tuple comes from the socket (BTF offsets); an unconnected socket has no peer (daddr 0, dport 0). */
static __always_inline int udp_sock_event(u16 kind, const void *sk, int ret) {
    struct cp_event ev = {};
    u16 num = 0, dport = 0;
    bpf_probe_read_kernel(&num, 2, (const char *)sk + OFF_SKC_NUM);
    bpf_probe_read_kernel(&dport, 2, (const char *)sk + OFF_SKC_DPORT);
    ev.sport = num;
    ev.dport = bpf_ntohs(dport);
    int watched = is_watched(CP_IPPROTO_UDP, ev.sport, ev.dport);
    count(kind, ret < 0 ? (u32)(-ret) : 0, watched);
    if (!watched)
        return 0;
    ev.kind = kind;
    ev.proto = CP_IPPROTO_UDP;
    ev.ts_ns = bpf_ktime_get_ns();
    ev.error = ret;
    ev.skaddr = (u64)sk;
    bpf_probe_read_kernel(&ev.family, 2, (const char *)sk + OFF_SKC_FAMILY);
    if (ev.family == CP_AF_INET6) {
        bpf_probe_read_kernel(ev.saddr, 16, (const char *)sk + OFF_SKC_V6_RCV_SADDR);
        bpf_probe_read_kernel(ev.daddr, 16, (const char *)sk + OFF_SKC_V6_DADDR);
    } else {
        bpf_probe_read_kernel(ev.saddr, 4, (const char *)sk + OFF_SKC_RCV_SADDR);
        bpf_probe_read_kernel(ev.daddr, 4, (const char *)sk + OFF_SKC_DADDR);
    }
    ev.netns = sk_netns(sk);
    emit(&ev);
    return 0;
}

#define CP_MSG_PEEK 2
#define CP_EAGAIN 11

#ifdef HOOK_SOCK_SOCK_SEND_LENGTH
TRACEPOINT_PROBE(sock, sock_send_length) {
    if (args->protocol != CP_IPPROTO_UDP || args->ret == -CP_EAGAIN)
        return 0;
    return udp_sock_event(CP_KIND_UDP_SEND, args->sk, args->ret);
}
#endif

#ifdef HOOK_SOCK_SOCK_RECV_LENGTH
TRACEPOINT_PROBE(sock, sock_recv_length) {
    /* Non-blocking reads that found nothing (EAGAIN) and MSG_PEEKs are not datagrams. */
    if (args->protocol != CP_IPPROTO_UDP || args->ret == -CP_EAGAIN || (args->flags & CP_MSG_PEEK))
        return 0;
    return udp_sock_event(CP_KIND_UDP_RECV, args->sk, args->ret);
}
#endif
