//! The aligned frame: one per bin, all links, the same interval. Fixed size, `#[repr(C)]`,
//! copied through lock-free queues to every consumer.
use linkpulse_common::{DIRS, MAX_LINKS};

/// Frame flags: one definition, shared with the stream's wire layout (see
/// `linkpulse_common::stream` for what each means).
pub use linkpulse_common::stream::{
    FLAG_CLOCK_STEP, FLAG_CLOCK_UNSYNC, FLAG_GAP, FLAG_LATE, FLAG_SKIPPED,
};

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
