//! The aligned frame: one per bin, all links, the same interval. Fixed size, `#[repr(C)]`,
//! copied through lock-free queues to every consumer.
use linkpulse_common::{DIRS, MAX_LINKS};

/// This frame carries counts of packets stamped in bins that were already published (carried
/// forward so that totals over any interval stay exact); see `late_mask` for which links.
pub const FLAG_LATE: u32 = 1 << 0;
/// The kernel said the clock was not synchronised when this bin was published.
pub const FLAG_CLOCK_UNSYNC: u32 = 1 << 1;
/// A clock step was detected since the previous frame: bin times around it are not comparable.
pub const FLAG_CLOCK_STEP: u32 = 1 << 2;
/// Some configured link was not attached for the whole bin (see `valid_mask`): its numbers are
/// missing data, not zeros.
pub const FLAG_GAP: u32 = 1 << 3;
/// The daemon fell behind (or the clock jumped) and skipped bins before this one.
pub const FLAG_SKIPPED: u32 = 1 << 4;

/// Counts of one link in one bin; index 0 = ingress (download), 1 = egress (upload).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkBin {
    pub packets: [u64; DIRS],
    pub bytes: [u64; DIRS],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Bin start on CLOCK_TAI (ns), the kernel's stamp clock.
    pub bin_start_tai_ns: u64,
    /// Bin start in UTC (ns since the UNIX epoch): TAI − the kernel's TAI offset.
    pub bin_start_utc_ns: i64,
    pub width_ns: u64,
    /// Increases by one per published frame; a gap means a consumer lost frames.
    pub seq: u64,
    pub flags: u32,
    /// Links [0, link_count) are meaningful.
    pub link_count: u32,
    /// Bit i: link i was attached for the whole bin (otherwise its entry is missing data).
    pub valid_mask: u64,
    /// Bit i: link i's entry includes late data carried from earlier bins.
    pub late_mask: u64,
    pub links: [LinkBin; MAX_LINKS],
}

const _: () = assert!(MAX_LINKS <= 64, "masks are u64");

impl Default for Frame {
    fn default() -> Self {
        Self {
            bin_start_tai_ns: 0,
            bin_start_utc_ns: 0,
            width_ns: 0,
            seq: 0,
            flags: 0,
            link_count: 0,
            valid_mask: 0,
            late_mask: 0,
            links: [LinkBin::default(); MAX_LINKS],
        }
    }
}

impl Frame {
    /// Whether link `i` has measured data in this frame.
    pub fn is_valid(&self, link: usize) -> bool {
        link < 64 && self.valid_mask & (1 << link) != 0
    }
}
