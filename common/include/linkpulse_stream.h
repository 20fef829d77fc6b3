/*
 * linkpulse real-time stream, layout version 3 (see common/src/stream.rs, the source of truth).
 *
 * Unix SOCK_SEQPACKET socket (default /run/linkpulse/stream.sock). The client sends one
 * lp_subscribe; the daemon answers with one message: an lp_hello followed by hello.link_count
 * lp_link_desc, or an lp_error (then closes). After that every message is one frame: an
 * lp_frame_header followed by header.link_count lp_link_record (subscribed links, ascending
 * index). All integers are little-endian; every struct has explicit padding and no implicit
 * holes. Consecutive frames have seq differing by the decimation; header.dropped_before counts
 * the frames this client lost (its socket buffer was full) just before this one.
 */
#ifndef LINKPULSE_STREAM_H
#define LINKPULSE_STREAM_H

#include <stddef.h>
#include <stdint.h>

#define LP_STREAM_VERSION 3
#define LP_MAGIC_SUBSCRIBE 0x3153504Cu /* "LPS1" */
#define LP_MAGIC_HELLO     0x3148504Cu /* "LPH1" */
#define LP_MAGIC_FRAME     0x3146504Cu /* "LPF1" */
#define LP_MAGIC_ERROR     0x3145504Cu /* "LPE1" */

#define LP_ERR_BAD_REQUEST      1
#define LP_ERR_VERSION          2
#define LP_ERR_NO_LINKS         3
#define LP_ERR_TOO_MANY_CLIENTS 4

/* lp_frame_header.flags */
#define LP_FLAG_LATE         (1u << 0) /* carries data that arrived after its bin was published */
#define LP_FLAG_CLOCK_UNSYNC (1u << 1) /* the kernel said the clock was not synchronised */
#define LP_FLAG_CLOCK_STEP   (1u << 2) /* a clock step happened just before */
#define LP_FLAG_GAP          (1u << 3) /* some link was not attached for the whole window */
#define LP_FLAG_SKIPPED      (1u << 4) /* the daemon skipped bins before this one */
#define LP_FLAG_RTT_LATE     (1u << 5) /* carries probe samples/sends whose bin was already published */

/* lp_link_record.valid */
#define LP_VALID_TRAFFIC (1u << 0)
#define LP_VALID_RTT     (1u << 1)
#define LP_VALID_PROBES  (1u << 2)
#define LP_VALID_TCP_RTT (1u << 3)
#define LP_VALID_OWD     (1u << 4)
#define LP_VALID_LATE    (1u << 31)

struct lp_subscribe {
    uint32_t magic;      /* LP_MAGIC_SUBSCRIBE */
    uint16_t version;    /* LP_STREAM_VERSION */
    uint16_t _pad0;
    uint64_t link_mask;  /* bit i = link index i; 0 = every link */
    uint32_t decimation; /* bins per frame, >= 1 */
    uint32_t _pad1;
};

struct lp_hello {
    uint32_t magic;
    uint16_t version;
    uint16_t _pad0;
    uint64_t bin_width_ns;
    uint32_t decimation;
    uint32_t link_count;
    uint64_t link_mask;
    uint32_t header_size; /* sizeof(struct lp_frame_header) */
    uint32_t record_size; /* sizeof(struct lp_link_record) */
};

struct lp_link_desc {
    uint32_t index;
    uint32_t _pad0;
    char interface[16]; /* NUL-padded */
    char label[32];     /* NUL-padded UTF-8 */
};

struct lp_error {
    uint32_t magic;
    uint16_t version;
    uint16_t _pad0;
    uint32_t code;
    uint32_t _pad1;
    char message[112]; /* NUL-padded UTF-8: the cause and the fix */
};

struct lp_frame_header {
    uint32_t magic;
    uint16_t version;
    uint16_t _pad0;
    uint64_t seq;
    uint64_t dropped_before;
    int64_t bin_start_utc_ns; /* window start, ns since the UNIX epoch (UTC) */
    uint64_t bin_start_tai_ns;
    uint64_t width_ns;        /* bin width x decimation */
    uint32_t flags;
    uint32_t link_count;
    uint64_t sent_tai_ns;     /* CLOCK_TAI when the daemon sent the frame */
};

/* Directions: [0] = down (router ingress), [1] = up (router egress). */
struct lp_link_record {
    uint32_t index;
    uint32_t valid;
    uint64_t packets[2];
    uint64_t bytes[2];
    /* With LP_VALID_RTT (probed link): probe RTT samples whose reply arrived (kernel stamp
       T4) in the window; min/max are 0 when rtt_count is 0 (probed, no reply). */
    uint32_t rtt_count;
    /* With LP_VALID_PROBES: probes that left (kernel stamp T1) in the window. */
    uint32_t probes_sent;
    uint64_t rtt_min_ns;
    uint64_t rtt_max_ns;
    uint64_t rtt_sum_ns;
    uint32_t probes_lost[2];  /* not filled yet (0) */
    /* With LP_VALID_TCP_RTT (passive RTT on, link attached): TCP timestamp echoes that
       reached the router in the window; min/max are 0 when the count is 0 and saturate at
       UINT32_MAX ns. */
    uint32_t tcp_rtt_count;
    uint32_t _pad0;
    uint64_t tcp_rtt_min_ns;
    uint64_t tcp_rtt_max_ns;
    uint64_t tcp_rtt_sum_ns;
    /* With LP_VALID_OWD: one-way delays of the probe samples (among rtt_count) taken while
       our clock and the reflector's both reported synchronisation. Signed ns: up = T2 - T1,
       down = T4 - T3; a clock offset larger than the delay makes one negative, which
       owd_error_max_ns (our maxerror + the reflector's Error Estimate, the largest among
       them) bounds. Without LP_VALID_OWD all are 0. */
    uint32_t owd_count;
    uint32_t _pad1;
    int64_t owd_up_min_ns;
    int64_t owd_up_max_ns;
    int64_t owd_up_sum_ns;
    int64_t owd_down_min_ns;
    int64_t owd_down_max_ns;
    int64_t owd_down_sum_ns;
    uint64_t owd_error_max_ns;
};

_Static_assert(sizeof(struct lp_subscribe) == 24, "lp_subscribe layout");
_Static_assert(sizeof(struct lp_hello) == 40, "lp_hello layout");
_Static_assert(sizeof(struct lp_link_desc) == 56, "lp_link_desc layout");
_Static_assert(sizeof(struct lp_error) == 128, "lp_error layout");
_Static_assert(sizeof(struct lp_frame_header) == 64, "lp_frame_header layout");
_Static_assert(sizeof(struct lp_link_record) == 176, "lp_link_record layout");
_Static_assert(offsetof(struct lp_link_record, tcp_rtt_count) == 80, "lp_link_record layout");
_Static_assert(offsetof(struct lp_link_record, owd_count) == 112, "lp_link_record layout");

#endif /* LINKPULSE_STREAM_H */
