/* connprobe kernel sensor: the record every BPF program writes to the ring buffer.
 *
 * One layout shared by all hooks; bpf/decode.py (EVENT_STRUCT) decodes it. Keep both in step:
 * tests/bpf/test_decode.py checks the size and field offsets against this header's comments.
 *
 *   off  size  field
 *     0     8  ts_ns       bpf_ktime_get_ns() (CLOCK_MONOTONIC)
 *     8     8  location    kfree_skb: kernel text address of the drop
 *    16     8  skaddr      socket address (links CLOSE->SYN_SENT, which has sport 0, to later events)
 *    24     4  netns       network-namespace inode (0 = unknown)
 *    28     4  reason      drop reason (kfree_skb) or reset reason (tcp_send_reset), kernel numbering
 *    32     4  error       retransmit err / socket error / icmp (type << 8 | code) / UDP send/recv return value
 *    36     2  kind        CP_KIND_*
 *    38     2  family      AF_INET / AF_INET6 (0 when the packet could not be parsed)
 *    40     2  sport       host order
 *    42     2  dport       host order
 *    44     1  proto       IPPROTO_*
 *    45     1  state       TCP state (new state for CP_KIND_STATE)
 *    46     1  old_state
 *    47     1  tcp_flags   TCP header flags byte of a dropped / ICMP-answered packet
 *    48    16  saddr       IPv4 in the first 4 bytes
 *    64    16  daddr
 *    80     4  seq         TCP sequence number of a dropped segment / a retransmission (host order)
 *    84     4  seq_len     sequence space it covers: payload bytes, +1 for SYN and for FIN
 *    88     4  snd_una     retransmission: the sender's oldest unacknowledged sequence number then
 *    92     4  seq_flags   CP_SEQ_* bits: which of seq / snd_una / the counters were read
 *    96     4  segs_out    retransmission: data segments the socket had sent (tcp_sock.data_segs_out)
 *   100     4  total_retrans  retransmission: segments it had retransmitted (tcp_sock.total_retrans)
 *   104        (size)
 */
#ifndef CONNPROBE_EVENTS_H
#define CONNPROBE_EVENTS_H

#define CP_KIND_RETRANSMIT 1
#define CP_KIND_SYNACK_RETRANSMIT 2
#define CP_KIND_STATE 3
#define CP_KIND_RESET_RX 4
#define CP_KIND_RESET_TX 5
#define CP_KIND_DROP 6
#define CP_KIND_ICMP_SEND 7
#define CP_KIND_SOCK_ERROR 8
#define CP_KIND_UDP_SEND 9
#define CP_KIND_UDP_RECV 10

#define CP_SEQ_VALID 1     /* seq and seq_len were read */
#define CP_SNDUNA_VALID 2  /* snd_una was read */
#define CP_COUNTERS_VALID 4  /* segs_out and total_retrans were read */

struct cp_event {
    u64 ts_ns;
    u64 location;
    u64 skaddr;
    u32 netns;
    u32 reason;
    s32 error;
    u16 kind;
    u16 family;
    u16 sport;
    u16 dport;
    u8 proto;
    u8 state;
    u8 old_state;
    u8 tcp_flags;
    u8 saddr[16];
    u8 daddr[16];
    u32 seq;
    u32 seq_len;
    u32 snd_una;
    u32 seq_flags;
    u32 segs_out;
    u32 total_retrans;
};

/* Key of the per-kind / per-reason counters (node-level telemetry for all traffic). */
struct cp_count_key {
    u16 kind;
    u16 watched;  /* 1 when the flow was on the watch list */
    u32 reason;   /* drop/reset reason; TCP state for retransmits and state changes; 0 otherwise */
};

#endif
