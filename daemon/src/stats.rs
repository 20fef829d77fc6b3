//! The live-statistics consumer: from every frame, cumulative per-link counters (for /metrics)
//! and per-second totals (for /api/v1/links). Reads its queue in batches; a whole second is
//! written to the shared table once, when it completes.
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};
use std::time::Duration;

use linkpulse_common::{DIRS, MAX_LINKS};

use crate::{
    frame::{Frame, RttBin},
    shared::{DirTotals, SecondTotals, Shared},
};

const NS_PER_S: i64 = 1_000_000_000;

/// Per-link accumulation of the second in progress.
#[derive(Clone, Copy, Default)]
struct Acc {
    packets: [u64; DIRS],
    bytes: [u64; DIRS],
    bins: u64,
    valid_bins: u64,
    /// Bins in which passive TCP RTT was measured, and their samples.
    tcp_bins: u64,
    tcp: RttBin,
}

pub struct SecondAccumulator {
    second: i64,
    acc: [Acc; MAX_LINKS],
    bins_per_second: u64,
}

impl SecondAccumulator {
    pub fn new(width_ns: u64) -> Self {
        Self {
            second: i64::MIN,
            acc: [Acc::default(); MAX_LINKS],
            bins_per_second: 1_000_000_000 / width_ns.max(1),
        }
    }

    /// Adds a frame; returns the completed second's totals (per link) when `f` starts a new one.
    pub fn push(&mut self, f: &Frame, mut done: impl FnMut(usize, SecondTotals)) {
        let sec = f.bin_start_utc_ns.div_euclid(NS_PER_S);
        if sec != self.second {
            if self.second != i64::MIN {
                for (l, a) in self.acc.iter().enumerate().take(f.link_count as usize) {
                    let dir = |d: usize| DirTotals {
                        packets: a.packets[d],
                        bytes: a.bytes[d],
                        bits_per_s: a.bytes[d] * 8,
                    };
                    done(
                        l,
                        SecondTotals {
                            start_utc_ns: self.second * NS_PER_S,
                            down: dir(0),
                            up: dir(1),
                            complete: a.valid_bins == self.bins_per_second,
                            tcp_rtt_samples: (a.tcp_bins > 0).then_some(u64::from(a.tcp.rtt_count)),
                            tcp_rtt_min_ns: (a.tcp.rtt_count > 0).then_some(a.tcp.rtt_min_ns),
                            tcp_rtt_mean_ns: a
                                .tcp
                                .rtt_sum_ns
                                .checked_div(u64::from(a.tcp.rtt_count)),
                            tcp_rtt_max_ns: (a.tcp.rtt_count > 0).then_some(a.tcp.rtt_max_ns),
                        },
                    );
                }
            }
            self.second = sec;
            self.acc = [Acc::default(); MAX_LINKS];
        }
        for l in 0..(f.link_count as usize).min(MAX_LINKS) {
            let a = &mut self.acc[l];
            for d in 0..DIRS {
                a.packets[d] += f.links[l].packets[d];
                a.bytes[d] += f.links[l].bytes[d];
            }
            a.bins += 1;
            if f.is_valid(l) {
                a.valid_bins += 1;
            }
            if f.tcp_rtt_mask & (1 << l) != 0 {
                a.tcp_bins += 1;
                a.tcp.merge(&f.tcp_rtt[l]);
            }
        }
    }
}

pub fn run(
    mut rx: crate::frame_queue::FrameConsumer,
    shared: Arc<Shared>,
    width_ns: u64,
    stop: Arc<AtomicBool>,
) {
    let mut acc = SecondAccumulator::new(width_ns);
    while !stop.load(Ordering::Relaxed) {
        let mut any = false;
        while let Ok(f) = rx.pop() {
            any = true;
            for l in 0..(f.link_count as usize).min(MAX_LINKS) {
                let c = &shared.link_counters[l];
                for d in 0..DIRS {
                    c.packets[d].fetch_add(f.links[l].packets[d], Ordering::Relaxed);
                    c.bytes[d].fetch_add(f.links[l].bytes[d], Ordering::Relaxed);
                }
                if f.is_valid(l) {
                    c.bins_valid.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.bins_missing.fetch_add(1, Ordering::Relaxed);
                }
            }
            acc.push(&f, |l, totals| {
                shared.update_link(l, |info| info.last_second = Some(totals))
            });
        }
        if !any {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_sum_their_bins() {
        let w = 100_000_000u64; // 10 bins a second
        let mut acc = SecondAccumulator::new(w);
        let mut out = Vec::new();
        for i in 0..25i64 {
            let mut f = Frame {
                bin_start_utc_ns: 1_000 * NS_PER_S + i * w as i64,
                width_ns: w,
                link_count: 1,
                valid_mask: if i == 13 { 0 } else { 1 },
                ..Frame::default()
            };
            f.links[0].bytes = [10, 1];
            f.links[0].packets = [1, 1];
            acc.push(&f, |l, t| out.push((l, t)));
        }
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.start_utc_ns, 1_000 * NS_PER_S);
        assert_eq!(out[0].1.down.bytes, 100);
        assert_eq!(out[0].1.down.bits_per_s, 800);
        assert_eq!(out[0].1.up.packets, 10);
        assert!(out[0].1.complete);
        assert!(
            !out[1].1.complete,
            "a missing bin makes the second incomplete"
        );
        assert_eq!(out[0].1.tcp_rtt_samples, None, "passive RTT off");
        assert_eq!(out[0].1.tcp_rtt_mean_ns, None);
    }

    #[test]
    fn seconds_carry_passive_tcp_rtt() {
        let w = 100_000_000u64;
        let mut acc = SecondAccumulator::new(w);
        let mut out = Vec::new();
        for i in 0..21i64 {
            let mut f = Frame {
                bin_start_utc_ns: 1_000 * NS_PER_S + i * w as i64,
                width_ns: w,
                link_count: 2,
                valid_mask: 0b11,
                // Link 0 measured in every bin, link 1 never.
                tcp_rtt_mask: 0b01,
                ..Frame::default()
            };
            if i < 10 {
                f.tcp_rtt[0].add_sample(20_000_000 + i as u64 * 1_000_000);
            }
            acc.push(&f, |l, t| out.push((l, t)));
        }
        let (l0, l1) = (out[0].1, out[1].1);
        assert_eq!((out[0].0, out[1].0), (0, 1));
        assert_eq!(l0.tcp_rtt_samples, Some(10));
        assert_eq!(l0.tcp_rtt_min_ns, Some(20_000_000));
        assert_eq!(l0.tcp_rtt_mean_ns, Some(24_500_000));
        assert_eq!(l0.tcp_rtt_max_ns, Some(29_000_000));
        assert_eq!(l1.tcp_rtt_samples, None, "not measured on link 1");
        // A measured second without samples: 0, and no min/mean/max.
        let (l0, _) = (out[2].1, out[3].1);
        assert_eq!(l0.tcp_rtt_samples, Some(0));
        assert_eq!((l0.tcp_rtt_min_ns, l0.tcp_rtt_mean_ns), (None, None));
    }
}
