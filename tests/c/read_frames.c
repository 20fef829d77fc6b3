/*
 * Reads frames captured from linkpulse's stream with nothing but linkpulse_stream.h: a file of
 * messages, each preceded by its length as a little-endian uint32. Prints one line per frame
 * and per link record; the Rust test prints the same from its own decoding and compares.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <inttypes.h>

#include "linkpulse_stream.h"

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    unsigned char buf[65536];
    uint32_t len;
    while (fread(&len, sizeof len, 1, f) == 1) {
        if (len > sizeof buf || fread(buf, 1, len, f) != len) {
            fprintf(stderr, "truncated capture\n");
            return 1;
        }
        struct lp_frame_header h;
        if (len < sizeof h) {
            fprintf(stderr, "short frame\n");
            return 1;
        }
        memcpy(&h, buf, sizeof h);
        if (h.magic != LP_MAGIC_FRAME || h.version != LP_STREAM_VERSION ||
            len != sizeof h + h.link_count * sizeof(struct lp_link_record)) {
            fprintf(stderr, "bad frame\n");
            return 1;
        }
        printf("frame seq=%" PRIu64 " utc=%" PRId64 " width=%" PRIu64 " flags=%" PRIu32 " links=%" PRIu32 " dropped=%" PRIu64 "\n",
               h.seq, h.bin_start_utc_ns, h.width_ns, h.flags, h.link_count, h.dropped_before);
        for (uint32_t i = 0; i < h.link_count; i++) {
            struct lp_link_record r;
            memcpy(&r, buf + sizeof h + i * sizeof r, sizeof r);
            printf("  link=%" PRIu32 " valid=%" PRIu32 " pkts=%" PRIu64 "/%" PRIu64 " bytes=%" PRIu64 "/%" PRIu64
                   " tcp=%" PRIu32 "/%" PRIu64 "/%" PRIu64 "/%" PRIu64
                   " owd=%" PRIu32 "/%" PRId64 "/%" PRId64 "/%" PRIu64 "\n",
                   r.index, r.valid, r.packets[0], r.packets[1], r.bytes[0], r.bytes[1],
                   r.tcp_rtt_count, r.tcp_rtt_min_ns, r.tcp_rtt_max_ns, r.tcp_rtt_sum_ns,
                   r.owd_count, r.owd_up_sum_ns, r.owd_down_sum_ns, r.owd_error_max_ns);
        }
    }
    return 0;
}
