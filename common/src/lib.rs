//! Records shared by the kernel programs (`ebpf/`) and user space (`daemon/`).
//!
//! Every type is `#[repr(C)]`, has explicit padding and no `bool`, so that both sides agree
//! byte for byte. Sizes are asserted at compile time.
#![no_std]

pub mod ip;
pub mod probe;
pub mod stream;
pub mod tcp;

/// Most modem links one daemon follows (the design's ceiling is 16 modems; headroom for
/// hot-plug churn, where a returning modem keeps its index).
pub const MAX_LINKS: usize = 32;
/// Directions per link: 0 = ingress (download), 1 = egress (upload).
pub const DIRS: usize = 2;
/// Slots per CPU in [`SLOTS`](Slot): one per (link, direction).
pub const SLOTS_PER_CPU: usize = MAX_LINKS * DIRS;
/// Entries of the ifindex → link table. Interface indexes are allocated per network namespace
/// and start small; an interface above this index is refused by the daemon with a clear error.
pub const MAX_IFINDEX: u32 = 16384;

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Name of the global holding the bin width in nanoseconds (set by the loader).
pub const GLOBAL_BIN_WIDTH_NS: &str = "BIN_WIDTH_NS";
/// Map names, shared so the loader cannot misspell them.
pub const MAP_IFACES: &str = "IFACES";
pub const MAP_SLOTS: &str = "SLOTS";
/// Rings of completed bins: CPU `c` emits into ring `c % BIN_RINGS`, so that CPUs do not share
/// one ring's lock, producer position and data lines (with one ring, each emit cost cross-CPU
/// cache misses: ~25 ns per packet of a TCP flow in the bench).
pub const BIN_RINGS: usize = 4;
/// Bytes of all bin rings together, shared among the rings CPUs use (see `bin_ring_bytes`).
pub const BIN_RINGS_BYTES: u32 = 1 << 20;

/// Bin rings that some CPU emits into when `ncpu` CPUs are possible (CPU `c` → ring `c % BIN_RINGS`).
pub fn bin_rings_used(ncpu: usize) -> usize {
    ncpu.clamp(1, BIN_RINGS)
}

/// Size of each bin ring when `ncpu` CPUs are possible: [`BIN_RINGS_BYTES`] shared among the
/// rings in use (a power of two, as ring buffers must be); one page for the others (the loader
/// rounds a size up to whole pages). The daemon maps only the rings in use, and their pages
/// count in its RSS at once (twice the size: the data is mapped twice), so that stays what one
/// 1 MiB ring took.
pub fn bin_ring_bytes(ring: usize, ncpu: usize) -> u32 {
    let used = bin_rings_used(ncpu);
    if ring >= used {
        return 1;
    }
    let share = BIN_RINGS_BYTES / used as u32;
    // Largest power of two not above the share.
    1u32 << (31 - share.leading_zeros())
}
pub const MAP_BINS: [&str; BIN_RINGS] = ["BINS0", "BINS1", "BINS2", "BINS3"];

/// Value of the `IFACES` array, indexed by ifindex. `link_plus_one == 0` means "not a modem".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceConf {
    /// Link index + 1 (0 = unused entry).
    pub link_plus_one: u32,
    /// Bytes of link-layer header in front of the IP header at tc (14 for Ethernet/veth, 0 for
    /// raw-IP modems and TUN devices), so that bytes are counted from the IP header on.
    pub l2_len: u32,
}

/// The per-CPU accumulator of one (link, direction), in the `SLOTS` array
/// (index = cpu * SLOTS_PER_CPU + link * 2 + dir). The array is mmapped by the daemon, which
/// reads it without a syscall to close bins of idle links; only the CPU that owns a slot writes
/// it, and all fields are naturally aligned u64 (torn reads of one field cannot happen).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// TAI start of the bin being accumulated (ns), 0 before the first packet.
    pub bin_start: u64,
    /// Wire packets (GSO segments) in that bin so far.
    pub packets: u64,
    /// L3 bytes in that bin so far.
    pub bytes: u64,
    /// Monotonic: times the ring buffer was full when a bin ended. The slot then keeps its
    /// old bin and goes on counting into it (nothing is lost); the daemon takes those counts
    /// from the slot and publishes them as late data.
    pub ring_full: u64,
    /// Monotonic: GSO packets whose headers could not be read (counted with their skb length).
    pub malformed: u64,
    /// Passive TCP RTT samples whose echo arrived in this bin (ingress slots only; reset with
    /// the bin). RTTs in ns, saturated at u32::MAX (4.29 s); the sum is exact.
    pub tcp_rtt: RttAcc,
}

/// Count, min, max and sum of the passive TCP RTT samples of one bin (ns). `min`/`max` are
/// meaningful only when `count > 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RttAcc {
    pub count: u32,
    pub min_ns: u32,
    pub max_ns: u32,
    pub _pad: u32,
    pub sum_ns: u64,
}

impl RttAcc {
    /// Adds one sample (ns, saturated to u32 for min/max).
    #[inline(always)]
    pub fn add(&mut self, rtt_ns: u64) {
        let r = if rtt_ns > u32::MAX as u64 {
            u32::MAX
        } else {
            rtt_ns as u32
        };
        if self.count == 0 {
            self.min_ns = r;
            self.max_ns = r;
        } else {
            if r < self.min_ns {
                self.min_ns = r;
            }
            if r > self.max_ns {
                self.max_ns = r;
            }
        }
        self.count += 1;
        self.sum_ns += rtt_ns;
    }

    /// Merges another accumulator (per-CPU parts of one bin, or late data).
    #[inline]
    pub fn merge(&mut self, o: &RttAcc) {
        if o.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *o;
            return;
        }
        self.min_ns = self.min_ns.min(o.min_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
        self.count += o.count;
        self.sum_ns += o.sum_ns;
    }
}

/// One completed per-CPU bin, sent through a `BINS*` ring buffer when a CPU sees the first
/// packet of a newer bin on the same (link, direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BinRecord {
    pub bin_start: u64,
    pub packets: u64,
    pub bytes: u64,
    pub cpu: u32,
    pub link: u16,
    pub dir: u8,
    pub _pad: u8,
    /// The bin's passive TCP RTT samples (ingress records only).
    pub tcp_rtt: RttAcc,
}

impl BinRecord {
    /// The record of the bin `slot` holds (the kernel program, and its model in the aligner's
    /// tests, build it the same way).
    #[inline(always)]
    pub fn of(slot: &Slot, cpu: u32, link: u32, dir: u8) -> Self {
        Self {
            bin_start: slot.bin_start,
            packets: slot.packets,
            bytes: slot.bytes,
            cpu,
            link: link as u16,
            dir,
            _pad: 0,
            tcp_rtt: slot.tcp_rtt,
        }
    }
}

const _: () = assert!(core::mem::size_of::<IfaceConf>() == 8);
const _: () = assert!(core::mem::size_of::<RttAcc>() == 24);
const _: () = assert!(core::mem::size_of::<Slot>() == 64);
const _: () = assert!(core::mem::size_of::<BinRecord>() == 56);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::IfaceConf {}
    unsafe impl aya::Pod for super::Slot {}
    unsafe impl aya::Pod for super::BinRecord {}
}

/// Start of the epoch-aligned bin that contains `t` (both in ns).
#[inline(always)]
pub fn bin_start(t: u64, width: u64) -> u64 {
    t - t % width
}

/// Slot index of (cpu, link, dir).
#[inline(always)]
pub fn slot_index(cpu: u32, link: u32, dir: u8) -> u32 {
    cpu * SLOTS_PER_CPU as u32 + link * DIRS as u32 + dir as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_epoch_aligned() {
        assert_eq!(bin_start(1_000_000_123, 100_000), 1_000_000_000);
        assert_eq!(bin_start(99_999, 100_000), 0);
        assert_eq!(bin_start(100_000, 100_000), 100_000);
    }

    #[test]
    fn rtt_accumulator_keeps_min_max_sum() {
        let mut a = RttAcc::default();
        a.add(30);
        a.add(10);
        a.add(20);
        assert_eq!((a.count, a.min_ns, a.max_ns, a.sum_ns), (3, 10, 30, 60));
        let mut b = RttAcc::default();
        b.add(5_000_000_000);
        assert_eq!(b.max_ns, u32::MAX);
        assert_eq!(b.sum_ns, 5_000_000_000);
        b.merge(&a);
        assert_eq!((b.count, b.min_ns, b.max_ns), (4, 10, u32::MAX));
        let mut e = RttAcc::default();
        e.merge(&a);
        assert_eq!(e, a);
        e.merge(&RttAcc::default());
        assert_eq!(e, a);
    }

    #[test]
    fn bin_rings_share_one_mebibyte_among_the_rings_in_use() {
        let sizes =
            |ncpu| -> [u32; BIN_RINGS] { core::array::from_fn(|r| bin_ring_bytes(r, ncpu)) };
        assert_eq!(sizes(1), [1 << 20, 1, 1, 1]);
        assert_eq!(sizes(2), [1 << 19, 1 << 19, 1, 1]);
        assert_eq!(sizes(3), [1 << 18, 1 << 18, 1 << 18, 1]);
        assert_eq!(sizes(64), [1 << 18; 4]);
        assert_eq!(sizes(0), [1 << 20, 1, 1, 1]);
        assert_eq!(bin_rings_used(2), 2);
        assert_eq!(bin_rings_used(64), BIN_RINGS);
    }

    #[test]
    fn slot_indexes_do_not_overlap() {
        assert_eq!(slot_index(0, 0, 0), 0);
        assert_eq!(slot_index(0, 0, 1), 1);
        assert_eq!(slot_index(0, 1, 0), 2);
        assert_eq!(slot_index(1, 0, 0), SLOTS_PER_CPU as u32);
        assert_eq!(
            slot_index(0, MAX_LINKS as u32 - 1, 1) + 1,
            slot_index(1, 0, 0)
        );
    }
}
