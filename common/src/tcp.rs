//! Passive TCP RTT: the flow table's key, the counters, and the TCP timestamp option parser
//! shared by the kernel programs (which read the options from the packet) and the unit tests
//! (which feed it byte fixtures).
//!
//! On egress, the first departure of each (flow, TSval) is stamped into `TCP_TS` (an LRU hash);
//! on ingress, a packet of the reverse flow whose TSecr echoes a stored TSval gives one RTT
//! sample (now − stamp) and marks the entry matched. Matched entries stay until the LRU evicts
//! them, so later segments carrying that TSval skip the insert and later echoes give no second
//! sample: exactly one sample per (flow, link, TSval).

/// Name of the LRU hash (flow, TSval) → TAI ns of first departure.
pub const MAP_TCP_TS: &str = "TCP_TS";
/// Name of the per-CPU counters of the passive RTT path (index: `TCP_STAT_*`).
pub const MAP_TCP_STATS: &str = "TCP_STATS";
/// Name of the global switching the matching on (1) or off (0), set by the loader.
pub const GLOBAL_TCP_RTT_ON: &str = "TCP_RTT_ON";

/// `TCP_STATS` index: RTT samples taken (an echoed TSval found unmatched and marked matched).
pub const TCP_STAT_SAMPLES: u32 = 0;
/// `TCP_STATS` index: TSvals stored (first departure of a (flow, TSval)).
pub const TCP_STAT_INSERTS: u32 = 1;
/// `TCP_STATS` index: TCP headers whose option list could not be parsed (bad length,
/// truncated); they give no sample.
pub const TCP_STAT_BAD_OPTIONS: u32 = 2;
/// `TCP_STATS` index: inserts the map refused (other than "already there").
pub const TCP_STAT_INSERT_ERRORS: u32 = 3;
/// Entries of `TCP_STATS`.
pub const TCP_STATS_LEN: u32 = 4;

/// Key of `TCP_TS`: the flow as seen from the router (local = source on egress) on one link,
/// and the TSval. Addresses and ports are kept in network byte order; IPv4 addresses use the
/// first 4 bytes (the rest zero) and `family` tells them apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TsKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub tsval: u32,
    /// The link the packet left on: a reply that comes back on another link is no sample of
    /// either link's RTT.
    pub link: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<TsKey>() == 44);
const _: () = assert!(core::mem::align_of::<TsKey>() == 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::TsKey {}
}

/// Largest TCP option list (data offset 15 → 60-byte header − 20).
pub const TCP_MAX_OPT_LEN: usize = 40;
/// Options (a NOP counts as one) the slow path walks before it gives up: the verifier explores
/// every path through the loop, and 40 steps of it exceed its budget of a million
/// instructions, while real stacks put the timestamp within the first 6 (Linux SYN: MSS,
/// SACK-permitted, TS; macOS SYN: MSS, NOP, WS, NOP, NOP, TS; SACK-first data: NOP, NOP,
/// SACK, NOP, NOP, TS). A list with the timestamp further on gives no sample (`Absent`).
pub const TCP_MAX_OPT_ITEMS: usize = 10;
const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_TS: u8 = 8;
const OPT_TS_LEN: u8 = 10;

/// What the option list says about timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TsOption {
    Found {
        tsval: u32,
        tsecr: u32,
    },
    Absent,
    /// A length byte that is too small, runs past the list, or a timestamp option whose
    /// length is not 10, or bytes that cannot be read: the segment gives no sample.
    Malformed,
}

/// Byte access to a TCP option list: offset 0 is the first option byte.
pub trait OptBytes {
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

impl OptBytes for [u8] {
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.get(off..off.checked_add(N)?)?.try_into().ok()
    }
}

#[inline(always)]
fn ts_from(b: [u8; 8]) -> TsOption {
    TsOption::Found {
        tsval: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        tsecr: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    }
}

/// Finds the timestamp option in an option list of `opt_len` bytes (the TCP header's data
/// offset × 4 − 20, at most 40). Linux, the BSDs and Windows put NOP NOP TS first on every
/// non-SYN segment: that layout is read with one 12-byte load; anything else walks the list,
/// a bounded loop of at most [`TCP_MAX_OPT_ITEMS`] options.
#[inline(always)]
pub fn tcp_timestamp<B: OptBytes + ?Sized>(b: &B, opt_len: usize) -> TsOption {
    if opt_len >= 12 {
        if let Some(h) = b.bytes::<12>(0) {
            let layout = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]);
            let ts = u64::from_ne_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
            if let Some(found) = ts_first(layout, ts) {
                return found;
            }
        }
    }
    tcp_timestamp_walk(b, opt_len)
}

/// NOP NOP TS 10, the first 4 option bytes read as one word in memory order.
pub const TS_FIRST_LAYOUT: u32 = u32::from_ne_bytes([OPT_NOP, OPT_NOP, OPT_TS, OPT_TS_LEN]);

/// The timestamps when the option list starts NOP NOP TS: `layout` is its first 4 bytes and
/// `ts` the next 8, each read as one word in memory order (how the kernel program loads them).
#[inline(always)]
pub fn ts_first(layout: u32, ts: u64) -> Option<TsOption> {
    (layout == TS_FIRST_LAYOUT).then(|| ts_from(ts.to_ne_bytes()))
}

/// The slow path of [`tcp_timestamp`]: walks the option list (for a list that does not start
/// NOP NOP TS; the kernel program checks that layout itself with word loads).
#[inline(always)]
pub fn tcp_timestamp_walk<B: OptBytes + ?Sized>(b: &B, opt_len: usize) -> TsOption {
    let opt_len = if opt_len > TCP_MAX_OPT_LEN {
        TCP_MAX_OPT_LEN
    } else {
        opt_len
    };
    let mut i = 0usize;
    for _ in 0..TCP_MAX_OPT_ITEMS {
        if i >= opt_len {
            return TsOption::Absent;
        }
        let Some([kind]) = b.bytes::<1>(i) else {
            return TsOption::Malformed;
        };
        if kind == OPT_EOL {
            return TsOption::Absent;
        }
        if kind == OPT_NOP {
            i += 1;
            continue;
        }
        if i + 2 > opt_len {
            return TsOption::Malformed;
        }
        let Some([len]) = b.bytes::<1>(i + 1) else {
            return TsOption::Malformed;
        };
        let len = len as usize;
        if len < 2 || i + len > opt_len {
            return TsOption::Malformed;
        }
        if kind == OPT_TS {
            if len != OPT_TS_LEN as usize {
                return TsOption::Malformed;
            }
            return match b.bytes::<8>(i + 2) {
                Some(v) => ts_from(v),
                None => TsOption::Malformed,
            };
        }
        i += len;
    }
    TsOption::Absent
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: [u8; 10] = [8, 10, 0x01, 0x02, 0x03, 0x04, 0xa0, 0xb0, 0xc0, 0xd0];
    const FOUND: TsOption = TsOption::Found {
        tsval: 0x0102_0304,
        tsecr: 0xa0b0_c0d0,
    };

    fn parse(opts: &[u8]) -> TsOption {
        tcp_timestamp(opts, opts.len())
    }

    fn cat(parts: &[&[u8]]) -> ([u8; 40], usize) {
        let mut out = [0u8; 40];
        let mut n = 0;
        for p in parts {
            out[n..n + p.len()].copy_from_slice(p);
            n += p.len();
        }
        (out, n)
    }

    #[test]
    fn linux_data_segment_layout() {
        // NOP NOP TS, as every Linux data segment and ACK carries it.
        let (o, n) = cat(&[&[1, 1], &TS]);
        assert_eq!(parse(&o[..n]), FOUND);
    }

    #[test]
    fn macos_and_windows_syn_layouts() {
        // MSS, NOP, WS, NOP, NOP, TS, SACK permitted, EOL.
        let (o, n) = cat(&[&[2, 4, 5, 0xb4, 1, 3, 3, 6, 1, 1], &TS, &[4, 2, 0, 0]]);
        assert_eq!(parse(&o[..n]), FOUND);
        // MSS, NOP, WS, SACK permitted, TS.
        let (o, n) = cat(&[&[2, 4, 5, 0xb4, 1, 3, 3, 8, 4, 2], &TS]);
        assert_eq!(parse(&o[..n]), FOUND);
    }

    #[test]
    fn linux_syn_layout() {
        // SYN: MSS 1460, SACK permitted, TS, NOP, window scale 7.
        let (o, n) = cat(&[&[2, 4, 0x05, 0xb4, 4, 2], &TS, &[1, 3, 3, 7]]);
        assert_eq!(parse(&o[..n]), FOUND);
    }

    #[test]
    fn timestamp_after_sack_blocks() {
        // NOP NOP SACK(2 blocks) NOP NOP TS: a stack that puts SACK first.
        let sack = [5, 18, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4];
        let (o, n) = cat(&[&[1, 1], &sack, &[1, 1], &TS]);
        assert_eq!(n, 32);
        assert_eq!(parse(&o[..n]), FOUND);
    }

    #[test]
    fn sack_after_timestamp_is_read_by_the_fast_path() {
        let sack = [5, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let (o, n) = cat(&[&[1, 1], &TS, &[1, 1], &sack]);
        assert_eq!(parse(&o[..n]), FOUND);
    }

    #[test]
    fn no_timestamp() {
        assert_eq!(parse(&[]), TsOption::Absent);
        // MSS, NOP, NOP, SACK permitted.
        assert_eq!(parse(&[2, 4, 5, 0xb4, 1, 1, 4, 2]), TsOption::Absent);
        // End of list before a (garbage) timestamp option.
        let (o, n) = cat(&[&[1, 0], &TS]);
        assert_eq!(parse(&o[..n]), TsOption::Absent);
        // Only NOPs, the whole 40 bytes.
        assert_eq!(parse(&[1u8; 40]), TsOption::Absent);
        // A timestamp after more options than the walk reads is not found (documented limit).
        let (o, n) = cat(&[&[1u8; TCP_MAX_OPT_ITEMS], &TS]);
        assert_eq!(parse(&o[..n]), TsOption::Absent);
        let (o, n) = cat(&[&[1u8; TCP_MAX_OPT_ITEMS - 1], &TS]);
        assert_eq!(parse(&o[..n]), FOUND);
    }

    #[test]
    fn garbage_and_truncation_are_malformed() {
        // Length 0 and 1 would loop forever in a naive parser.
        assert_eq!(parse(&[3, 0, 1, 1]), TsOption::Malformed);
        assert_eq!(parse(&[3, 1, 1, 1]), TsOption::Malformed);
        // An option running past the list.
        assert_eq!(parse(&[1, 1, 5, 30, 0, 0, 0, 0]), TsOption::Malformed);
        // Kind without a length byte at the end.
        assert_eq!(parse(&[1, 1, 1, 2]), TsOption::Malformed);
        // Timestamp with a wrong length.
        assert_eq!(parse(&[1, 1, 8, 6, 0, 0, 0, 0]), TsOption::Malformed);
        // Timestamp cut by the data offset: the list says 8 bytes, the option needs 10.
        let (o, _) = cat(&[&[1, 1], &TS]);
        assert_eq!(tcp_timestamp(&o[..], 8), TsOption::Malformed);
    }

    #[test]
    fn truncated_packet_is_malformed() {
        // The header claims 12 option bytes but the packet ends after 7 of them.
        let (o, _) = cat(&[&[1, 1], &TS]);
        assert_eq!(tcp_timestamp(&o[..7], 12), TsOption::Malformed);
    }

    #[test]
    fn oversized_option_length_is_clamped_to_40() {
        let mut o = [1u8; 44];
        o[40..42].copy_from_slice(&[8, 10]);
        // Bytes past the 40 an option list can hold are never read.
        assert_eq!(tcp_timestamp(&o[..], 60), TsOption::Absent);
    }

    #[test]
    fn fuzzed_lists_never_panic_and_stay_in_bounds() {
        // A small xorshift: every list of random bytes ends in one of the three answers and
        // only reads inside the list.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut o = [0u8; 40];
            for b in o.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Bias towards small kinds and lengths so that lists are often well formed.
                *b = if x & 1 == 0 {
                    (x >> 8) as u8 % 12
                } else {
                    (x >> 8) as u8
                };
            }
            let n = (x >> 32) as usize % 41;
            let _ = tcp_timestamp(&o[..n], n);
        }
    }
}
