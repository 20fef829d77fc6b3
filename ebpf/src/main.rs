//! linkpulse's kernel side: one tcx program per direction, attached to every modem interface.
//!
//! Per packet: find the link by ifindex, stamp with CLOCK_TAI, add the packet to the current
//! epoch-aligned bin of (link, direction) in this CPU's slot. When this CPU sees the first
//! packet of a newer bin, the finished bin goes to a `BINS*` ring buffer without a wakeup (the
//! daemon polls). The daemon closes bins of idle links itself by reading the mmapped slots.
//! TCP segments with the timestamp option give passive RTT samples (see `tcp_rtt`), added to
//! the ingress slot's bin.
#![no_std]
#![no_main]
// Inline asm on bpf (the atomic exchange in `xchg_u64`); daemon/build.rs allows it for this
// crate through RUSTC_BOOTSTRAP.
#![feature(asm_experimental_arch)]

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST, BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_tai_ns},
    macros::{classifier, map},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use linkpulse_common::{
    bin_start,
    ip::{ipv6_ext_next, is_ipv6_ext, IPV6_MAX_EXT},
    probe::{ProbeConf, ProbeRecord, PROBE_STATS_LEN, PROBE_STAT_RING_FULL, PROBE_STAT_SHORT},
    slot_index,
    tcp::{
        tcp_timestamp_walk, ts_first, OptBytes, TsKey, TS_FIRST_LAYOUT, TsOption, TCP_STATS_LEN, TCP_STAT_BAD_OPTIONS,
        TCP_STAT_INSERTS, TCP_STAT_INSERT_ERRORS, TCP_STAT_SAMPLES,
    },
    BinRecord, IfaceConf, Slot, BIN_RINGS, DIR_EGRESS, DIR_INGRESS, MAX_IFINDEX, MAX_LINKS, SLOTS_PER_CPU,
};

/// Bin width in ns, set by the loader before load (a divisor of one second).
#[no_mangle]
static BIN_WIDTH_NS: u64 = 100_000;

/// 1 = match TCP timestamps for passive RTT, 0 = off (set by the loader from the config).
#[no_mangle]
static TCP_RTT_ON: u64 = 1;

/// (flow, link, TSval) → CLOCK_TAI ns of the first departure of that TSval, or `TS_USED` once
/// it has given its sample. max_entries is set by the loader (`[tcp_rtt] table_entries`); the
/// LRU drops the least recently used entries when it is full: matched ones and TSvals that
/// are never echoed (e.g. the second segment of a delayed-ACK pair) leave only this way.
#[map(name = "TCP_TS")]
static TCP_TS: LruHashMap<TsKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Ways of `TCP_LAST` per direction (a power of two).
const TCP_LAST_WAYS: u32 = 256;

/// Per CPU and direction, the last (flow, link, TSval) dealt with in each of `TCP_LAST_WAYS`
/// ways picked by the ports. A busy flow sends many segments per TSval tick and many ACKs echo
/// one TSval: those find it here and skip building the full key and the hash lookup (~55 ns
/// in the bench). An entry here is in `TCP_TS` (egress) or has been matched or found absent
/// (ingress); a zeroed one matches only a segment with all-zero addresses, ports and TSval.
#[map(name = "TCP_LAST")]
static TCP_LAST: PerCpuArray<LastKey> = PerCpuArray::with_max_entries(2 * TCP_LAST_WAYS, 0);

/// Counters of the passive RTT path (see `TCP_STAT_*`).
#[map(name = "TCP_STATS")]
static TCP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TCP_STATS_LEN, 0);

/// ifindex → link of this daemon (0 = not a modem we follow).
#[map(name = "IFACES")]
static IFACES: Array<IfaceConf> = Array::with_max_entries(MAX_IFINDEX, 0);

/// cpu × (link, dir) accumulators; max_entries is set by the loader to possible CPUs ×
/// SLOTS_PER_CPU. Mmappable so the daemon reads it without syscalls.
#[map(name = "SLOTS")]
static SLOTS: Array<Slot> = Array::with_max_entries(SLOTS_PER_CPU as u32, BPF_F_MMAPABLE);

/// Completed per-CPU bins, CPU `c` into `BINS{c % 4}` (`BIN_RINGS`): CPUs sharing one ring
/// missed the cache on its lock, producer position and data at each emit. The loader sizes the
/// rings (`bin_ring_bytes`: 1 MiB shared among the rings in use). A 256 KiB ring holds 4.7k
/// records: ~15 ms of 16 busy links × 2 directions at 10 kHz bins on one CPU, far more than
/// the daemon's poll interval (1 ms); a full ring loses nothing (see `emit`).
const BIN_RING_BYTES: u32 = 1 << 18;
// `emit` picks among four rings.
const _: () = assert!(BIN_RINGS == 4);
#[map(name = "BINS0")]
static BINS0: RingBuf = RingBuf::with_byte_size(BIN_RING_BYTES, 0);
#[map(name = "BINS1")]
static BINS1: RingBuf = RingBuf::with_byte_size(BIN_RING_BYTES, 0);
#[map(name = "BINS2")]
static BINS2: RingBuf = RingBuf::with_byte_size(BIN_RING_BYTES, 0);
#[map(name = "BINS3")]
static BINS3: RingBuf = RingBuf::with_byte_size(BIN_RING_BYTES, 0);

/// link → how its STAMP probes are recognised (written by the daemon's probe thread).
#[map(name = "PROBE_CONF")]
static PROBE_CONF: Array<ProbeConf> = Array::with_max_entries(MAX_LINKS as u32, 0);

/// Kernel stamps of probe packets (T1 egress, T4 ingress). 256 KiB = 10k records: ~120 ms
/// of 4 links at 10 kHz both ways; the probe thread drains it at every send tick.
#[map(name = "PROBE_RING")]
static PROBE_RING: RingBuf = RingBuf::with_byte_size(1 << 18, 0);

/// Counters of the probe path (see `PROBE_STAT_*`).
#[map(name = "PROBE_STATS")]
static PROBE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_STATS_LEN, 0);

/// Offset of the reflected Session-Sender sequence number in a STAMP reflector packet.
const STAMP_SENDER_SEQ_AT: usize = 24;
/// Bytes of the STAMP header the ingress match reads.
const STAMP_MIN_LEN: u32 = 28;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FLAG_ACK: u8 = 0x10;
const EEXIST: i32 = 17;
/// `TCP_TS` value of a TSval that gave its sample (a CLOCK_TAI stamp is never 0).
const TS_USED: u64 = 0;

#[classifier]
pub fn lp_ingress(ctx: TcContext) -> i32 {
    try_count(&ctx, DIR_INGRESS);
    // TCX_NEXT: never end the chain, other programs on the modem still run.
    TC_ACT_UNSPEC
}

#[classifier]
pub fn lp_egress(ctx: TcContext) -> i32 {
    try_count(&ctx, DIR_EGRESS);
    TC_ACT_UNSPEC
}

/// Does nothing: the baseline the benchmark subtracts (the cost of running any tc program
/// under bpf_stats on the same interface, in the same run).
#[classifier]
pub fn lp_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Reads CLOCK_TAI and nothing else: the benchmark reports what the one clock read per packet
/// costs on the machine (over `lp_empty`), a platform cost that no program logic can avoid.
#[classifier]
pub fn lp_clock(_ctx: TcContext) -> i32 {
    // SAFETY: a helper without arguments, allowed in tc programs.
    let _ = unsafe { bpf_ktime_get_tai_ns() };
    TC_ACT_UNSPEC
}

#[inline(always)]
fn try_count(ctx: &TcContext, dir: u8) {
    // SAFETY: the verifier guarantees `skb` points to a valid __sk_buff for tc programs.
    let skb = unsafe { &*ctx.skb.skb };
    let proto = u16::from_be(skb.protocol as u16);
    if proto != ETH_P_IP && proto != ETH_P_IPV6 {
        return;
    }
    let Some(conf) = IFACES.get(skb.ifindex) else {
        return;
    };
    if conf.link_plus_one == 0 {
        return;
    }
    let link = conf.link_plus_one - 1;
    let l2 = conf.l2_len as usize;
    // One look at the IP header serves the GSO size, the probe match and passive RTT.
    let l4 = l4_start(ctx, l2, proto);

    let len = skb.len.saturating_sub(l2 as u32) as u64;
    // gso_segs first: one field read (through skb_shinfo) for the usual single-segment packet.
    let (packets, bytes, malformed) = if skb.gso_segs > 1 && skb.gso_size != 0 {
        // A GSO super-packet leaves as gso_segs wire packets, each with its own headers.
        match gso_header_len(ctx, l2, l4) {
            Some(hdr) => (
                skb.gso_segs as u64,
                len + (skb.gso_segs as u64 - 1) * hdr as u64,
                0,
            ),
            None => (skb.gso_segs as u64, len, 1),
        }
    } else {
        (1u64, len, 0u64)
    };

    // SAFETY: helpers without arguments, allowed in tc programs.
    let now = unsafe { bpf_ktime_get_tai_ns() };
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // SAFETY: a global set once by the loader before the program is loaded.
    let tcp_on = unsafe { core::ptr::read_volatile(&TCP_RTT_ON) } != 0;
    let mut rtt = None;
    if let Some(l4) = l4 {
        if l4.proto == IPPROTO_UDP {
            probe_stamp(ctx, link, l4.off, dir, now);
        } else if l4.proto == IPPROTO_TCP && tcp_on {
            rtt = tcp_rtt(ctx, link, l2, proto, l4.off, dir, now);
        }
    }
    // SAFETY: a global set once by the loader before the program is loaded.
    let width = unsafe { core::ptr::read_volatile(&BIN_WIDTH_NS) };
    if width == 0 {
        return;
    }

    let Some(slot) = SLOTS.get_ptr_mut(slot_index(cpu, link, dir)) else {
        return;
    };
    // SAFETY: array values live as long as the map; only this CPU writes this slot (the
    // daemon only reads), and tc programs do not migrate between CPUs while they run.
    let slot = unsafe { &mut *slot };
    // Still in the slot's bin? A subtraction, not a 64-bit division, on the common path (a clock
    // that went backwards wraps to a huge difference and is treated as a new bin).
    let since = now.wrapping_sub(slot.bin_start);
    if since >= width {
        // A busy slot moves to the next bin: no division for that either (bin starts are
        // multiples of the width, so the next one is too).
        let bin = if since < 2 * width {
            slot.bin_start + width
        } else {
            bin_start(now, width)
        };
        // A full ring keeps the slot on its old bin (see `emit`).
        if slot.bin_start != bin && (slot.packets == 0 || emit(slot, cpu, link, dir)) {
            // Whole-word stores, counts first, then the bin: as plain assignments LLVM made the
            // reset a byte-by-byte memset (40 one-byte stores), which the daemon could read
            // half done in one field, and which kept the window between the record's submit
            // and the slot moving on ~200 instructions long (the aligner copes with that
            // window; it is rarer this way).
            // SAFETY: aligned fields of the slot borrowed above.
            unsafe {
                use core::ptr::{addr_of_mut, write_volatile};
                write_volatile(addr_of_mut!(slot.packets), 0);
                write_volatile(addr_of_mut!(slot.bytes), 0);
                write_volatile(addr_of_mut!(slot.tcp_rtt.count), 0);
                write_volatile(addr_of_mut!(slot.tcp_rtt.min_ns), 0);
                write_volatile(addr_of_mut!(slot.tcp_rtt.max_ns), 0);
                write_volatile(addr_of_mut!(slot.tcp_rtt.sum_ns), 0);
                write_volatile(addr_of_mut!(slot.bin_start), bin);
            }
            // The new bin's counts are stored after its start (the daemon reads the start
            // before and after the counts to see a rollover under its feet): plain stores may
            // otherwise move above the volatile ones.
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        }
    }
    slot.packets += packets;
    slot.bytes += bytes;
    slot.malformed += malformed;
    // The sample belongs to the bin its echo arrived in (this packet's bin).
    if let Some(r) = rtt {
        slot.tcp_rtt.add(r);
    }
}

/// Where the transport header starts and which protocol it is.
#[derive(Clone, Copy)]
struct L4 {
    off: usize,
    proto: u8,
}

/// The transport header of an IPv4 or IPv6 packet at `l2`; None for non-first IPv4 fragments
/// (they carry no transport header) and unreadable packets. IPv6 extension headers are not
/// walked: `proto` is then the extension's number, which no caller matches.
#[inline(always)]
fn l4_start(ctx: &TcContext, l2: usize, proto: u16) -> Option<L4> {
    if proto == ETH_P_IP {
        let [vihl, ..] = ld32(ctx, l2)?.to_ne_bytes();
        // Bytes 6..10: flags and fragment offset, TTL, protocol.
        let [frag_hi, frag_lo, _, l4proto] = ld32(ctx, l2 + 6)?.to_ne_bytes();
        if (frag_hi & 0x1f) != 0 || frag_lo != 0 {
            return None;
        }
        Some(L4 {
            off: l2 + ((vihl & 0x0f) as usize) * 4,
            proto: l4proto,
        })
    } else {
        // Bytes 4..8: payload length, next header, hop limit.
        let [_, _, mut nh, _] = ld32(ctx, l2 + 4)?.to_ne_bytes();
        let mut off = l2 + 40;
        // Extension headers (rare; one compare when absent), stepped over as the ground truth
        // does (common's `ip`).
        let mut n = 0;
        while is_ipv6_ext(nh) {
            if n == IPV6_MAX_EXT {
                return None;
            }
            let (next, len) = ipv6_ext_next(nh, ld32(ctx, off)?.to_ne_bytes())?;
            nh = next;
            off += len;
            n += 1;
        }
        Some(L4 { off, proto: nh })
    }
}

/// Sends the finished bin of `slot` to the ring. If the ring is full it returns false: the slot
/// then stays on its old bin and this packet is added to it, so nothing is lost; the daemon
/// reads those counts from the slot and publishes them as late data.
#[inline(always)]
fn emit(slot: &mut Slot, cpu: u32, link: u32, dir: u8) -> bool {
    let rec = BinRecord::of(slot, cpu, link, dir);
    // One helper call (reserve, copy, submit) instead of two.
    let ring = match cpu % BIN_RINGS as u32 {
        0 => &BINS0,
        1 => &BINS1,
        2 => &BINS2,
        _ => &BINS3,
    };
    if ring.output::<BinRecord>(&rec, BPF_RB_NO_WAKEUP as u64).is_ok() {
        return true;
    }
    slot.ring_full += 1;
    false
}

/// Stamps the link's STAMP probes: egress packets from the sender's port to the reflector's
/// port (T1), ingress packets the other way (T4). For every other UDP packet: one array lookup,
/// and on probed links one header load and compare.
#[inline(always)]
fn probe_stamp(ctx: &TcContext, link: u32, udp: usize, dir: u8, now: u64) {
    let Some(conf) = PROBE_CONF.get(link) else {
        return;
    };
    if conf.sender_port == 0 {
        return;
    }
    let Some(ports) = ld32(ctx, udp) else {
        return;
    };
    let [s0, s1, d0, d1] = ports.to_ne_bytes();
    let (sport, dport) = (u16::from_be_bytes([s0, s1]), u16::from_be_bytes([d0, d1]));
    let (ours, theirs) = if dir == DIR_EGRESS {
        (sport, dport)
    } else {
        (dport, sport)
    };
    if ours != conf.sender_port || theirs != conf.reflector_port {
        return;
    }
    let payload = udp + 8;
    let (sender_seq, refl_seq) = if dir == DIR_EGRESS {
        match ctx.load::<[u8; 4]>(payload) {
            Ok(b) => (u32::from_be_bytes(b), 0),
            Err(_) => return count_probe_stat(PROBE_STAT_SHORT),
        }
    } else {
        let skb = unsafe { &*ctx.skb.skb };
        if skb.len < (payload as u32) + STAMP_MIN_LEN {
            return count_probe_stat(PROBE_STAT_SHORT);
        }
        let (Ok(r), Ok(s)) = (
            ctx.load::<[u8; 4]>(payload),
            ctx.load::<[u8; 4]>(payload + STAMP_SENDER_SEQ_AT),
        ) else {
            return count_probe_stat(PROBE_STAT_SHORT);
        };
        (u32::from_be_bytes(s), u32::from_be_bytes(r))
    };
    let rec = ProbeRecord {
        t_ns: now,
        sender_seq,
        refl_seq,
        link: link as u16,
        dir,
        _pad: [0; 5],
    };
    if PROBE_RING
        .output::<ProbeRecord>(&rec, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count_probe_stat(PROBE_STAT_RING_FULL);
    }
}

/// Headers start within this many bytes of the packet (L2 ≤ 14, IP ≤ 60, TCP ≤ 60): the bound
/// the verifier needs on a variable offset into the packet.
const DIRECT_MAX_OFF: usize = 255;

/// `ld16`, `ld32`, `ld64`: the bytes at `off` of the packet as an integer in memory order
/// (`to_ne_bytes` gives them back as they are on the wire). One load instruction from the
/// linear data when they are there, else bpf_skb_load_bytes (a helper call costs ~20–25 ns
/// here). The load is written in asm because LLVM splits an unaligned load into byte loads
/// and shifts (4–8 instructions per word, most of the header parsing's cost in the bench);
/// the verifier allows unaligned packet loads on architectures with efficient unaligned
/// access (x86-64 and arm64, the targets this ships for).
macro_rules! packet_load {
    ($name:ident, $t:ty, $n:literal, $insn:literal) => {
        #[inline(always)]
        fn $name(ctx: &TcContext, off: usize) -> Option<$t> {
            if off <= DIRECT_MAX_OFF {
                let p = ctx.data() + off;
                if p + $n <= ctx.data_end() {
                    let v: u64;
                    // SAFETY: [p, p + $n) is inside the linear packet data (checked just
                    // above, in the form the verifier tracks); the load reads only that.
                    unsafe {
                        core::arch::asm!(
                            $insn,
                            p = in(reg) p,
                            v = lateout(reg) v,
                            options(nostack, readonly, preserves_flags),
                        );
                    }
                    return Some(v as $t);
                }
            }
            ctx.load::<$t>(off).ok()
        }
    };
}
packet_load!(ld16, u16, 2, "{v} = *(u16 *)({p} + 0)");
packet_load!(ld32, u32, 4, "{v} = *(u32 *)({p} + 0)");
packet_load!(ld64, u64, 8, "{v} = *(u64 *)({p} + 0)");

/// TCP option bytes of the slow walk (offset 0 = first option byte), read through the helper:
/// one path per step keeps the verifier's exploration of the loop small.
struct SkbOpts<'a> {
    ctx: &'a TcContext,
    base: usize,
}

impl OptBytes for SkbOpts<'_> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.ctx.load::<[u8; N]>(self.base + off).ok()
    }
}

/// What `TCP_LAST` remembers of a (flow, link, TSval): IPv4 addresses exactly, IPv6 ones
/// folded to 64 bits (two flows that fold alike, with the same ports and link, seen by one CPU
/// with the same TSval in turn, would skip one sample: never a wrong one).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct LastKey {
    addrs: u64,
    ports: u32,
    tsval: u32,
    link: u32,
    _pad: u32,
}

/// Passive RTT. Egress: a TCP segment with the timestamp option stores (flow, link, TSval) →
/// `now` unless that TSval is already there (BPF_NOEXIST: the first departure counts, a
/// retransmission or the next segment of the same clock tick does not move it). Ingress: a
/// segment with ACK of the reverse flow whose TSecr is stored and not yet matched gives
/// `now − stored` and marks the entry `TS_USED` (exactly one sample per (flow, link, TSval):
/// first departure → first echo; later echoes and departures of that TSval find it and do
/// nothing). Matched entries leave the table by LRU eviction only.
/// IPv6 extension headers are not walked: such packets give no sample.
#[inline(always)]
fn tcp_rtt(
    ctx: &TcContext,
    link: u32,
    l2: usize,
    proto: u16,
    tcp: usize,
    dir: u8,
    now: u64,
) -> Option<u64> {
    // Ports; then data offset and flags.
    let ports = ld32(ctx, tcp)?;
    let [doff_byte, flags] = ld16(ctx, tcp + 12)?.to_ne_bytes();
    // Written so that the verifier sees 4..=40 (it then bounds the option walk).
    let doff = (doff_byte >> 4) as usize;
    if doff <= 5 {
        return None;
    }
    let opt_len = (doff - 5) * 4;
    let mut first = None;
    if opt_len >= 12 {
        let layout = ld32(ctx, tcp + 20)?;
        if layout == TS_FIRST_LAYOUT {
            first = ld64(ctx, tcp + 24).and_then(|ts| ts_first(layout, ts));
        }
    }
    let found = match first {
        Some(t) => t,
        None => tcp_timestamp_walk(
            &SkbOpts {
                ctx,
                base: tcp + 20,
            },
            opt_len,
        ),
    };
    let (tsval, tsecr) = match found {
        TsOption::Found { tsval, tsecr } => (tsval, tsecr),
        TsOption::Absent => return None,
        TsOption::Malformed => {
            count_tcp_stat(TCP_STAT_BAD_OPTIONS);
            return None;
        }
    };
    // TSecr is meaningful only with ACK set (RFC 7323 §3.2).
    if dir != DIR_EGRESS && flags & TCP_FLAG_ACK == 0 {
        return None;
    }
    // The flow as the router sees it: local = source on egress, destination on ingress. The
    // addresses and ports are in memory order; swapping the halves swaps source and
    // destination.
    let (ports, ts) = if dir == DIR_EGRESS {
        (ports, tsval)
    } else {
        (ports.rotate_left(16), tsecr)
    };
    let v6 = proto != ETH_P_IP;
    let (a, b) = if v6 {
        // Source, then destination, 16 bytes each.
        let (s0, s1, d0, d1) = (
            ld64(ctx, l2 + 8)?,
            ld64(ctx, l2 + 16)?,
            ld64(ctx, l2 + 24)?,
            ld64(ctx, l2 + 32)?,
        );
        if dir == DIR_EGRESS {
            ([s0, s1], [d0, d1])
        } else {
            ([d0, d1], [s0, s1])
        }
    } else {
        // Source and destination, 4 bytes each.
        let sd = ld64(ctx, l2 + 12)?;
        let ld = if dir == DIR_EGRESS {
            sd
        } else {
            sd.rotate_left(32)
        };
        ([ld, 0], [0, 0])
    };
    let short = LastKey {
        addrs: if v6 {
            a[0] ^ a[1] ^ (b[0] ^ b[1]).rotate_left(32)
        } else {
            a[0]
        },
        ports,
        tsval: ts,
        link,
        _pad: 0,
    };
    let last = TCP_LAST.get_ptr_mut(last_way(dir, ports));
    if seen_last(last, &short) {
        return None;
    }
    // Not dealt with last time on this CPU: the full key.
    let [p0, p1, p2, p3] = ports.to_ne_bytes();
    let mut key = TsKey {
        local_port: u16::from_ne_bytes([p0, p1]),
        remote_port: u16::from_ne_bytes([p2, p3]),
        tsval: ts,
        link: link as u16,
        family: if v6 { 6 } else { 4 },
        ..TsKey::default()
    };
    if v6 {
        key.local[..8].copy_from_slice(&a[0].to_ne_bytes());
        key.local[8..].copy_from_slice(&a[1].to_ne_bytes());
        key.remote[..8].copy_from_slice(&b[0].to_ne_bytes());
        key.remote[8..].copy_from_slice(&b[1].to_ne_bytes());
    } else {
        let ab = a[0].to_ne_bytes();
        key.local[..4].copy_from_slice(&ab[..4]);
        key.remote[..4].copy_from_slice(&ab[4..]);
    }
    if dir == DIR_EGRESS {
        // Look first: an LRU update allocates (and, when full, evicts) a node before it finds
        // the key present, and most segments of a busy flow carry a TSval already stored.
        if TCP_TS.get_ptr(&key).is_some() {
            set_last(last, &short);
            return None;
        }
        match TCP_TS.insert(&key, now, BPF_NOEXIST as u64) {
            Ok(()) => {
                count_tcp_stat(TCP_STAT_INSERTS);
                set_last(last, &short);
            }
            Err(e) if e == -EEXIST => set_last(last, &short),
            Err(_) => count_tcp_stat(TCP_STAT_INSERT_ERRORS),
        }
        return None;
    }
    // An echo this CPU dealt with last time (sample taken, or nothing stored) was skipped
    // above. An echo cannot precede its TSval's departure, so "not stored" stays true.
    set_last(last, &short);
    let p = TCP_TS.get_ptr_mut(&key)?;
    // SAFETY (both): a preallocated, 8-byte aligned map value, valid memory while the program
    // runs (if the LRU evicts and reuses it meanwhile, that other TSval loses its sample).
    // Already matched: the usual case for the 2nd..nth ACK echoing one TSval, a plain read.
    if unsafe { core::ptr::read_volatile(p) } == TS_USED {
        return None;
    }
    // The entry stays (marked used) so that later segments with this TSval find it and skip
    // the insert; one exchange, so of two CPUs seeing the same echo only one takes the sample.
    let sent = unsafe { xchg_u64(p, TS_USED) };
    if sent == TS_USED {
        return None;
    }
    count_tcp_stat(TCP_STAT_SAMPLES);
    Some(now.saturating_sub(sent))
}

/// The `TCP_LAST` entry of a flow in direction `dir`: a way picked by the ports.
#[inline(always)]
fn last_way(dir: u8, ports: u32) -> u32 {
    let x = ports ^ (ports >> 16);
    (dir as u32) * TCP_LAST_WAYS + ((x ^ (x >> 8)) & (TCP_LAST_WAYS - 1))
}

/// Is `key` the one this CPU remembered in `last`? Compared as 3 words (a byte-wise
/// comparison would be a memcmp call, which bpf lacks).
#[inline(always)]
fn seen_last(last: Option<*mut LastKey>, key: &LastKey) -> bool {
    let Some(last) = last else {
        return false;
    };
    // SAFETY: LastKey is 24 bytes of plain integers, 8-byte aligned; `last` is this CPU's
    // array value, which only this CPU touches (tc programs do not nest on a CPU).
    let (a, b) = unsafe {
        (
            &*(last as *const [u64; 3]),
            &*(key as *const LastKey as *const [u64; 3]),
        )
    };
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) == 0
}

#[inline(always)]
fn set_last(last: Option<*mut LastKey>, key: &LastKey) {
    if let Some(last) = last {
        // SAFETY: as in `seen_last`.
        unsafe { *last = *key };
    }
}

/// Stores `new` at `p` and returns what was there, atomically (BPF_XCHG). Rust's bpf target
/// has no atomic read-modify-write operations (no CAS), so this is the instruction itself.
///
/// # Safety
/// `p` must point to a valid, 8-byte aligned u64 (a map value).
#[inline(always)]
unsafe fn xchg_u64(p: *mut u64, new: u64) -> u64 {
    let mut v = new;
    // SAFETY: per the caller; the instruction reads and writes only *p.
    unsafe {
        core::arch::asm!(
            "{v} = xchg_64({p} + 0, {v})",
            p = in(reg) p,
            v = inout(reg) v,
            options(nostack),
        );
    }
    v
}

#[inline(always)]
fn count_tcp_stat(index: u32) {
    if let Some(c) = TCP_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn count_probe_stat(index: u32) {
    if let Some(c) = PROBE_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// Length of the IP and TCP/UDP headers of a GSO packet (the part repeated in every segment).
/// Extension headers are not used by GSO'd TCP/UDP in practice; the next header decides.
#[inline(always)]
fn gso_header_len(ctx: &TcContext, l2: usize, l4: Option<L4>) -> Option<u32> {
    let l4 = l4?;
    let l4_len = match l4.proto {
        IPPROTO_TCP => {
            let [doff, _] = ld16(ctx, l4.off + 12)?.to_ne_bytes();
            ((doff >> 4) as u32) * 4
        }
        IPPROTO_UDP => 8,
        _ => return None,
    };
    Some((l4.off - l2) as u32 + l4_len)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
