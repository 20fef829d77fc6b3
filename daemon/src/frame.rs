//! The aligned frame: one per bin, all links, the same interval. Fixed size, `#[repr(C)]`,
//! copied through lock-free queues to every consumer.
use linkpulse_common::{DIRS, MAX_LINKS};

/// Frame flags: one definition, shared with the stream's wire layout (see
/// `linkpulse_common::stream` for what each means).
pub use linkpulse_common::stream::{
    FLAG_CLOCK_STEP, FLAG_CLOCK_UNSYNC, FLAG_GAP, FLAG_LATE, FLAG_RTT_LATE, FLAG_SKIPPED,
};

/// Counts of one link in one bin; index 0 = ingress (download), 1 = egress (upload).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkBin {
    pub packets: [u64; DIRS],
    pub bytes: [u64; DIRS],
}

/// Probe figures of one link in one bin: RTT samples by the bin of their reply's kernel stamp
/// (T4), probes sent by the bin of their kernel stamp T1. `rtt_min_ns` is `u64::MAX` and
/// `rtt_max_ns` 0 while `rtt_count` is 0, so merging is plain min/max.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RttBin {
    pub rtt_count: u32,
    pub probes_sent: u32,
    pub rtt_min_ns: u64,
    pub rtt_max_ns: u64,
    pub rtt_sum_ns: u64,
}

impl Default for RttBin {
    fn default() -> Self {
        Self {
            rtt_count: 0,
            probes_sent: 0,
            rtt_min_ns: u64::MAX,
            rtt_max_ns: 0,
            rtt_sum_ns: 0,
        }
    }
}

impl RttBin {
    #[inline]
    pub fn add_sample(&mut self, rtt_ns: u64) {
        self.rtt_count = self.rtt_count.saturating_add(1);
        self.rtt_sum_ns = self.rtt_sum_ns.saturating_add(rtt_ns);
        self.rtt_min_ns = self.rtt_min_ns.min(rtt_ns);
        self.rtt_max_ns = self.rtt_max_ns.max(rtt_ns);
    }

    #[inline]
    pub fn merge(&mut self, o: &RttBin) {
        self.rtt_count = self.rtt_count.saturating_add(o.rtt_count);
        self.probes_sent = self.probes_sent.saturating_add(o.probes_sent);
        self.rtt_sum_ns = self.rtt_sum_ns.saturating_add(o.rtt_sum_ns);
        self.rtt_min_ns = self.rtt_min_ns.min(o.rtt_min_ns);
        self.rtt_max_ns = self.rtt_max_ns.max(o.rtt_max_ns);
    }

    /// The kernel's passive TCP RTT accumulator as a bin (`probes_sent` stays 0).
    #[inline]
    pub fn from_acc(a: &linkpulse_common::RttAcc) -> Self {
        if a.count == 0 {
            return Self::default();
        }
        Self {
            rtt_count: a.count,
            probes_sent: 0,
            rtt_min_ns: u64::from(a.min_ns),
            rtt_max_ns: u64::from(a.max_ns),
            rtt_sum_ns: a.sum_ns,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rtt_count == 0 && self.probes_sent == 0
    }

    /// (min, max) for the wire: (0, 0) without samples (min starts at `u64::MAX` here).
    #[inline]
    pub fn min_max(&self) -> (u64, u64) {
        if self.rtt_count > 0 {
            (self.rtt_min_ns, self.rtt_max_ns)
        } else {
            (0, 0)
        }
    }
}

/// One-way delays of one link in one bin: the probes whose reply arrived in the bin (by T4,
/// like [`RttBin`]) and whose two clocks both reported synchronisation; no others, so an
/// unsynchronised link stays empty, never zero. Delays are signed: a clock offset larger than
/// the delay makes one negative, and `error_max_ns` bounds that offset. Mins start at
/// `i64::MAX` and maxes at `i64::MIN` while `count` is 0, so merging is plain min/max.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwdBin {
    pub count: u32,
    pub _pad: u32,
    pub up_min_ns: i64,
    pub up_max_ns: i64,
    pub up_sum_ns: i64,
    pub down_min_ns: i64,
    pub down_max_ns: i64,
    pub down_sum_ns: i64,
    /// The largest error bound of the probes counted (our maxerror + the reflector's estimate).
    pub error_max_ns: u64,
}

impl Default for OwdBin {
    fn default() -> Self {
        Self {
            count: 0,
            _pad: 0,
            up_min_ns: i64::MAX,
            up_max_ns: i64::MIN,
            up_sum_ns: 0,
            down_min_ns: i64::MAX,
            down_max_ns: i64::MIN,
            down_sum_ns: 0,
            error_max_ns: 0,
        }
    }
}

impl OwdBin {
    #[inline]
    pub fn add(&mut self, o: &crate::probe::oneway::OneWay) {
        self.count = self.count.saturating_add(1);
        self.up_min_ns = self.up_min_ns.min(o.up_ns);
        self.up_max_ns = self.up_max_ns.max(o.up_ns);
        self.up_sum_ns = self.up_sum_ns.saturating_add(o.up_ns);
        self.down_min_ns = self.down_min_ns.min(o.down_ns);
        self.down_max_ns = self.down_max_ns.max(o.down_ns);
        self.down_sum_ns = self.down_sum_ns.saturating_add(o.down_ns);
        self.error_max_ns = self.error_max_ns.max(o.error_ns);
    }

    #[inline]
    pub fn merge(&mut self, o: &OwdBin) {
        self.count = self.count.saturating_add(o.count);
        self.up_min_ns = self.up_min_ns.min(o.up_min_ns);
        self.up_max_ns = self.up_max_ns.max(o.up_max_ns);
        self.up_sum_ns = self.up_sum_ns.saturating_add(o.up_sum_ns);
        self.down_min_ns = self.down_min_ns.min(o.down_min_ns);
        self.down_max_ns = self.down_max_ns.max(o.down_max_ns);
        self.down_sum_ns = self.down_sum_ns.saturating_add(o.down_sum_ns);
        self.error_max_ns = self.error_max_ns.max(o.error_max_ns);
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
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
    /// Bit i: link i is probed (its `rtt` entry is measured; zero counts mean none).
    pub probed_mask: u64,
    /// Bit i: link i's `rtt` entry includes samples or sent probes carried from earlier bins
    /// (apart from `late_mask`, which is about traffic: the rollups read it).
    pub rtt_late_mask: u64,
    /// Per link: probe RTT samples and probes sent in this bin (see [`RttBin`]).
    pub rtt: [RttBin; MAX_LINKS],
    /// Per link: one-way delays of the probes in `rtt` whose clocks were both synchronised
    /// (empty otherwise; carried late with them, under `rtt_late_mask`).
    pub owd: [OwdBin; MAX_LINKS],
    /// Bit i: link i's `tcp_rtt` entry is measured (passive RTT on, link valid).
    pub tcp_rtt_mask: u64,
    /// Per link: passive TCP RTT samples whose echo arrived in this bin (`probes_sent` unused;
    /// min/max saturate at u32::MAX ns in the kernel). Late samples are in `late_mask`.
    pub tcp_rtt: [RttBin; MAX_LINKS],
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
            probed_mask: 0,
            rtt_late_mask: 0,
            rtt: [RttBin::default(); MAX_LINKS],
            owd: [OwdBin::default(); MAX_LINKS],
            tcp_rtt_mask: 0,
            tcp_rtt: [RttBin::default(); MAX_LINKS],
        }
    }
}

impl Frame {
    /// Whether link `i` has measured data in this frame.
    pub fn is_valid(&self, link: usize) -> bool {
        link < 64 && self.valid_mask & (1 << link) != 0
    }
}
