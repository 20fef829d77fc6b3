//! Rollups: every window (500 ms by default, epoch-aligned, stamped at its start) per link,
//! from the aligned frames — bytes and packets per direction, mean and peak rate and the
//! p50/p95/p99 of the per-bin rates, the passive TCP RTT of the bins (samples, exact min, mean
//! and max), and whether the window is complete. The store keeps them
//! for weeks; the forwarder sends them to the central InfluxDB.
//!
//! A window is complete only if every one of its bins was published, valid for the link,
//! without a clock step or a skip: a window that spans a daemon start, a hot-plug gap or a
//! clock step is marked partial, never presented as complete. Per-bin work is a few additions
//! into buffers sized at start; the percentiles are computed once per window.
use linkpulse_common::{DIRS, MAX_LINKS};
use linkpulse_sink::store::Rollup;

use crate::frame::{Frame, RttBin, FLAG_CLOCK_STEP, FLAG_CLOCK_UNSYNC, FLAG_SKIPPED};

/// Link state codes in rollups (the link-health issue refines "up" into up/degraded/down).
pub const LINK_STATE_MISSING: u8 = 0;
pub const LINK_STATE_UP: u8 = 1;
/// Clock state codes in rollups.
pub const CLOCK_UNSYNCED: u8 = 0;
pub const CLOCK_SYNCED: u8 = 1;

struct LinkAcc {
    bytes: [u64; DIRS],
    packets: [u64; DIRS],
    /// Bytes of each bin of the window, per direction (capacity = bins per window).
    bins: [Vec<u32>; DIRS],
    valid_bins: u64,
    late: bool,
    /// Passive TCP RTT of the window's bins (by the bin its echo arrived in, late ones in the
    /// frame that carried them, like the counts).
    tcp: RttBin,
}

pub struct RollupBuilder {
    window_ns: u64,
    bin_ns: u64,
    bins_per_window: u64,
    boot_tag: u64,
    /// UTC start of the window being filled (None before the first frame).
    window: Option<i64>,
    /// Bins of the current window seen so far, and whether the run of frames was unbroken.
    seen_bins: u64,
    broken: bool,
    last_seq: Option<u64>,
    unsynced: bool,
    max_error_ns: u64,
    link_count: usize,
    links: Vec<LinkAcc>,
    scratch: Vec<u32>,
}

impl RollupBuilder {
    /// `window_ns` must be a multiple of `bin_ns` (the config checks it).
    pub fn new(window_ns: u64, bin_ns: u64, boot_tag: u64) -> Self {
        let bins_per_window = (window_ns / bin_ns).max(1);
        let cap = bins_per_window as usize;
        Self {
            window_ns,
            bin_ns,
            bins_per_window,
            boot_tag,
            window: None,
            seen_bins: 0,
            broken: false,
            last_seq: None,
            unsynced: false,
            max_error_ns: 0,
            link_count: 0,
            links: (0..MAX_LINKS)
                .map(|_| LinkAcc {
                    bytes: [0; DIRS],
                    packets: [0; DIRS],
                    bins: [Vec::with_capacity(cap), Vec::with_capacity(cap)],
                    valid_bins: 0,
                    late: false,
                    tcp: RttBin::default(),
                })
                .collect(),
            scratch: Vec::with_capacity(cap),
        }
    }

    /// A new clock epoch (after a clock step): later windows get a new identity.
    pub fn set_boot_tag(&mut self, tag: u64) {
        self.boot_tag = tag;
    }

    /// The clock's error bound to record (from adjtimex).
    pub fn set_clock_error_ns(&mut self, ns: u64) {
        self.max_error_ns = self.max_error_ns.max(ns);
    }

    /// Adds a frame; calls `emit` with each link's rollup when a window completes.
    pub fn push(&mut self, f: &Frame, mut emit: impl FnMut(Rollup)) {
        let w = f.bin_start_utc_ns - f.bin_start_utc_ns.rem_euclid(self.window_ns as i64);
        if self.window != Some(w) {
            if self.window.is_some() {
                self.close(&mut emit);
            }
            self.window = Some(w);
            // A window joined mid-way (first frame is not its first bin) is partial.
            self.broken = self.broken || f.bin_start_utc_ns != w;
        }
        if self.last_seq.is_some_and(|s| f.seq != s + 1)
            || f.flags & (FLAG_CLOCK_STEP | FLAG_SKIPPED) != 0
        {
            self.broken = true;
        }
        self.last_seq = Some(f.seq);
        self.unsynced |= f.flags & FLAG_CLOCK_UNSYNC != 0;
        self.seen_bins += 1;
        self.link_count = self.link_count.max(f.link_count as usize);
        for (l, acc) in self
            .links
            .iter_mut()
            .enumerate()
            .take(f.link_count as usize)
        {
            let b = &f.links[l];
            for d in 0..DIRS {
                acc.bytes[d] += b.bytes[d];
                acc.packets[d] += b.packets[d];
                if acc.bins[d].len() < acc.bins[d].capacity() {
                    acc.bins[d].push(b.bytes[d].min(u32::MAX as u64) as u32);
                }
            }
            if f.tcp_rtt_mask & (1 << l) != 0 {
                acc.tcp.merge(&f.tcp_rtt[l]);
            }
            if f.is_valid(l) {
                acc.valid_bins += 1;
            }
            acc.late |= f.late_mask & (1 << l) != 0;
        }
    }

    fn close(&mut self, emit: &mut impl FnMut(Rollup)) {
        let Some(start) = self.window else { return };
        let all_bins = self.seen_bins == self.bins_per_window && !self.broken;
        let secs = self.window_ns as f64 / 1e9;
        let bin_secs = self.bin_ns as f64 / 1e9;
        for l in 0..self.link_count {
            let acc = &mut self.links[l];
            let complete = all_bins && acc.valid_bins == self.bins_per_window;
            let mut rates = [[0f64; 5]; DIRS];
            for (d, rate) in rates.iter_mut().enumerate() {
                // Bins with no packet are zero-rate bins, not absent ones.
                self.scratch.clear();
                self.scratch.extend_from_slice(&acc.bins[d]);
                self.scratch.resize(self.bins_per_window as usize, 0);
                self.scratch.sort_unstable();
                let pct = |p: f64| {
                    let i = ((self.scratch.len() - 1) as f64 * p).round() as usize;
                    self.scratch[i] as f64 * 8.0 / bin_secs
                };
                *rate = [
                    acc.bytes[d] as f64 * 8.0 / secs,
                    pct(1.0),
                    pct(0.5),
                    pct(0.95),
                    pct(0.99),
                ];
            }
            emit(Rollup {
                seq: 0,
                link_id: l as u32,
                window_start_ns: start.max(0) as u64,
                boot_tag: self.boot_tag,
                window_ns: self.window_ns,
                complete,
                link_state: if acc.valid_bins > 0 {
                    LINK_STATE_UP
                } else {
                    LINK_STATE_MISSING
                },
                clock_state: if self.unsynced {
                    CLOCK_UNSYNCED
                } else {
                    CLOCK_SYNCED
                },
                clock_error_ns: self.max_error_ns,
                rx_bytes: acc.bytes[0],
                tx_bytes: acc.bytes[1],
                rx_packets: acc.packets[0],
                tx_packets: acc.packets[1],
                rx_rate_mean_bps: rates[0][0],
                rx_rate_peak_bps: rates[0][1],
                rx_rate_p50_bps: rates[0][2],
                rx_rate_p95_bps: rates[0][3],
                rx_rate_p99_bps: rates[0][4],
                tx_rate_mean_bps: rates[1][0],
                tx_rate_peak_bps: rates[1][1],
                tx_rate_p50_bps: rates[1][2],
                tx_rate_p95_bps: rates[1][3],
                tx_rate_p99_bps: rates[1][4],
                rtt_min_ns: None,
                rtt_mean_ns: None,
                rtt_max_ns: None,
                rtt_p50_ns: None,
                rtt_p99_ns: None,
                probes_sent_fwd: 0,
                probes_lost_fwd: 0,
                probes_sent_bwd: 0,
                probes_lost_bwd: 0,
                tcp_rtt_samples: u64::from(acc.tcp.rtt_count),
                tcp_rtt_min_ns: (acc.tcp.rtt_count > 0).then_some(acc.tcp.rtt_min_ns),
                tcp_rtt_mean_ns: (acc.tcp.rtt_count > 0)
                    .then(|| acc.tcp.rtt_sum_ns / u64::from(acc.tcp.rtt_count)),
                tcp_rtt_max_ns: (acc.tcp.rtt_count > 0).then_some(acc.tcp.rtt_max_ns),
                // Filled from the probes' windows (rollup_probe.rs).
                owd_samples: 0,
                owd_up_mean_ns: None,
                owd_up_max_ns: None,
                owd_down_mean_ns: None,
                owd_down_max_ns: None,
                owd_error_ns: None,
            });
            acc.bytes = [0; DIRS];
            acc.packets = [0; DIRS];
            acc.bins[0].clear();
            acc.bins[1].clear();
            acc.valid_bins = 0;
            acc.late = false;
            acc.tcp = RttBin::default();
        }
        self.seen_bins = 0;
        self.broken = false;
        self.unsynced = false;
        self.max_error_ns = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 100_000; // 100 µs bins
    const WIN: u64 = 500_000_000;
    const T0: i64 = 1_800_000_000_000_000_000;

    fn frame(seq: u64, utc: i64, bytes: u64, valid: bool, flags: u32) -> Frame {
        let mut f = Frame {
            bin_start_utc_ns: utc,
            bin_start_tai_ns: utc as u64,
            width_ns: W,
            seq,
            flags,
            link_count: 2,
            valid_mask: u64::from(valid), // link 1 is never attached
            ..Frame::default()
        };
        f.links[0].bytes = [bytes, bytes / 2];
        f.links[0].packets = [1, 1];
        f.links[1].bytes = [0, 0];
        f
    }

    fn run(frames: impl Iterator<Item = Frame>) -> Vec<Rollup> {
        let mut b = RollupBuilder::new(WIN, W, 7);
        let mut out = Vec::new();
        for f in frames {
            b.push(&f, |r| out.push(r));
        }
        out
    }

    #[test]
    fn windows_are_aligned_summed_and_complete_only_when_whole() {
        // Start 10 bins into a window: the first window is partial, the next two complete.
        let n = 5000u64;
        let out = run((10..3 * n).map(|i| frame(i, T0 + (i * W) as i64, 125, true, 0)));
        let link0: Vec<_> = out.iter().filter(|r| r.link_id == 0).collect();
        assert_eq!(
            link0.len(),
            2,
            "two windows closed (the third is still open)"
        );
        assert_eq!(link0[0].window_start_ns, T0 as u64);
        assert!(!link0[0].complete, "joined mid-way");
        assert_eq!(link0[1].window_start_ns, T0 as u64 + WIN);
        assert!(link0[1].complete);
        assert_eq!(link0[1].rx_bytes, 125 * n);
        assert_eq!(link0[1].tx_bytes, 62 * n);
        assert_eq!(link0[1].rx_packets, n);
        // 125 B per 100 µs = 10 Mbit/s, every bin alike
        assert!((link0[1].rx_rate_mean_bps - 10e6).abs() < 1.0);
        assert!((link0[1].rx_rate_p50_bps - 10e6).abs() < 1.0);
        assert_eq!(link0[1].boot_tag, 7);
        // link 1 is never valid in these frames: never complete, marked missing
        assert!(out
            .iter()
            .filter(|r| r.link_id == 1)
            .all(|r| !r.complete && r.link_state == LINK_STATE_MISSING));
    }

    #[test]
    fn percentiles_see_idle_bins_and_bursts() {
        let n = 5000u64;
        // one window: 1 % of bins carry 1250 B (100 Mbit/s), the rest nothing
        let out = run((0..2 * n).map(|i| {
            let b = if i % 100 == 0 { 1250 } else { 0 };
            frame(i, T0 + (i * W) as i64, b, true, 0)
        }));
        let r = out.iter().find(|r| r.link_id == 0).expect("window");
        assert!(r.complete);
        assert!((r.rx_rate_peak_bps - 100e6).abs() < 1.0);
        assert_eq!(r.rx_rate_p50_bps, 0.0);
        assert!((r.rx_rate_mean_bps - 1e6).abs() < 1.0);
        assert!(r.rx_rate_p99_bps <= 100e6);
    }

    #[test]
    fn tcp_rtt_of_the_bins_sums_exactly_and_is_empty_without_samples() {
        let n = 5000u64;
        // Window 0: samples in bins 3 (two), 4000 (one) and one late one carried by bin 4999;
        // a masked-out bin's figures are not counted. Window 1: measured, no sample.
        let out = run((0..2 * n + 1).map(|i| {
            let mut f = frame(i, T0 + (i * W) as i64, 10, true, 0);
            f.tcp_rtt_mask = 1;
            match i {
                3 => {
                    f.tcp_rtt[0].add_sample(30_000_000);
                    f.tcp_rtt[0].add_sample(10_000_000);
                }
                4000 => f.tcp_rtt[0].add_sample(20_000_001),
                4999 => f.tcp_rtt[0].add_sample(50_000_000),
                4001 => {
                    f.tcp_rtt[0].add_sample(1);
                    f.tcp_rtt_mask = 0;
                }
                _ => {}
            }
            f
        }));
        let link0: Vec<_> = out.iter().filter(|r| r.link_id == 0).collect();
        assert_eq!(link0.len(), 2);
        let r = link0[0];
        assert_eq!(r.tcp_rtt_samples, 4);
        assert_eq!(r.tcp_rtt_min_ns, Some(10_000_000));
        assert_eq!(r.tcp_rtt_max_ns, Some(50_000_000));
        assert_eq!(r.tcp_rtt_mean_ns, Some(110_000_001 / 4));
        let r = link0[1];
        assert_eq!(r.tcp_rtt_samples, 0);
        assert_eq!(
            (r.tcp_rtt_min_ns, r.tcp_rtt_mean_ns, r.tcp_rtt_max_ns),
            (None, None, None)
        );
        assert_eq!(
            r.owd_up_mean_ns, None,
            "one-way delays come from the probes"
        );
    }

    #[test]
    fn gaps_steps_and_missing_bins_make_a_window_partial() {
        let n = 5000u64;
        // a sequence gap (a frame lost), a clock step, an invalid bin: each in its own window
        let out = run((0..4 * n).filter(|i| *i != n + 17).map(|i| {
            let flags = if i == 2 * n + 5 { FLAG_CLOCK_STEP } else { 0 };
            let valid = i != 3 * n + 9;
            frame(i, T0 + (i * W) as i64, 10, valid, flags)
        }));
        let link0: Vec<_> = out.iter().filter(|r| r.link_id == 0).collect();
        assert_eq!(link0.len(), 3);
        assert!(link0[0].complete, "window 0 is whole");
        assert!(!link0[1].complete, "a lost frame");
        assert!(!link0[2].complete, "a clock step");
        // window 3 is still open; close it with one more frame
        let mut b = RollupBuilder::new(WIN, W, 1);
        let mut out = Vec::new();
        for i in 3 * n..4 * n + 1 {
            b.push(&frame(i, T0 + (i * W) as i64, 10, i != 3 * n + 9, 0), |r| {
                out.push(r)
            });
        }
        assert!(
            !out.iter()
                .find(|r| r.link_id == 0)
                .expect("window")
                .complete,
            "an invalid bin"
        );
    }
}
