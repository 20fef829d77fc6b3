//! RTT of the probes in the rollups: each probe counts in the window it was SENT in (its
//! kernel T1), whenever its reply arrives. A reply can come up to the loss timeout after T1, so
//! `lp-persist` holds each window back until `window end + loss timeout + margin` (frames' UTC)
//! before it writes it; a sample for a window already written is counted as late and dropped.
//!
//! Per link a small ring of window slots (enough for the hold), each with exact count, min, max
//! and sum, and up to [`SAMPLES_PER_SLOT`] RTTs for the p50/p99 (beyond that the percentiles
//! come from the first ones of the window; min/mean/max stay exact). All buffers are sized at
//! start: adding a sample allocates nothing.
use linkpulse_common::MAX_LINKS;
use linkpulse_sink::store::Rollup;

use crate::probe::Sample;

/// RTTs kept per window and link for the percentiles (all of them up to 4 kHz at 500 ms).
pub const SAMPLES_PER_SLOT: usize = 2048;
/// Added to the loss timeout: the prober reads its ring and socket every ≤ 10 ms and publishes
/// samples at once; frames themselves lag the clock by the grace period.
pub const HOLD_MARGIN_NS: u64 = 200_000_000;

struct Slot {
    /// UTC start of the window this slot holds (i64::MIN: empty).
    start: i64,
    /// Its window was written: samples for it are late.
    written: bool,
    count: u64,
    min: u64,
    max: u64,
    sum: u64,
    rtts: Vec<u64>,
}

impl Slot {
    fn reset(&mut self, start: i64) {
        self.start = start;
        self.written = false;
        self.count = 0;
        self.min = u64::MAX;
        self.max = 0;
        self.sum = 0;
        self.rtts.clear();
    }
}

pub struct ProbeWindows {
    window_ns: u64,
    hold_ns: u64,
    per_link: usize,
    slots: Vec<Slot>,
    /// Samples that came after their window was written, or too far ahead of the frames.
    pub late: u64,
}

impl ProbeWindows {
    /// `loss_timeout_ns`: the prober's; windows are held back by it plus [`HOLD_MARGIN_NS`]
    /// (None: no link is probed, nothing is held). With `cap` RTTs kept per slot (tests use
    /// small ones; the daemon [`SAMPLES_PER_SLOT`]).
    pub fn new(window_ns: u64, loss_timeout_ns: Option<u64>, cap: usize) -> Self {
        let hold_ns = loss_timeout_ns.map_or(0, |t| t + HOLD_MARGIN_NS);
        let cap = if loss_timeout_ns.is_some() { cap } else { 0 };
        // The held windows, the one being filled, and samples running ahead of the frames.
        let per_link = (hold_ns / window_ns.max(1)) as usize + 4;
        let slots = (0..per_link * MAX_LINKS)
            .map(|_| Slot {
                start: i64::MIN,
                written: false,
                count: 0,
                min: u64::MAX,
                max: 0,
                sum: 0,
                rtts: Vec::with_capacity(cap),
            })
            .collect();
        Self {
            window_ns,
            hold_ns,
            per_link,
            slots,
            late: 0,
        }
    }

    /// How long after its end a window must wait before it is written.
    pub fn hold_ns(&self) -> u64 {
        self.hold_ns
    }

    fn slot(&mut self, link: usize, start: i64) -> &mut Slot {
        let i = (start.div_euclid(self.window_ns as i64)).rem_euclid(self.per_link as i64);
        &mut self.slots[link * self.per_link + i as usize]
    }

    /// A sample; `tai_to_utc_ns` = UTC − TAI (from the frames).
    pub fn add(&mut self, s: &Sample, tai_to_utc_ns: i64) {
        let link = s.link as usize;
        if link >= MAX_LINKS {
            return;
        }
        let t1 = s.t1_tai_ns as i64 + tai_to_utc_ns;
        let start = t1 - t1.rem_euclid(self.window_ns as i64);
        let slot = self.slot(link, start);
        if slot.start < start {
            // Older contents were written (or never had a rollup): reuse the slot.
            slot.reset(start);
        } else if slot.start > start || slot.written {
            self.late += 1;
            return;
        }
        slot.count += 1;
        slot.min = slot.min.min(s.rtt_ns);
        slot.max = slot.max.max(s.rtt_ns);
        slot.sum += s.rtt_ns;
        if slot.rtts.len() < slot.rtts.capacity() {
            slot.rtts.push(s.rtt_ns);
        }
    }

    /// Whether the window starting at `start` may be written, frames having reached `now` (UTC).
    pub fn ready(&self, start: i64, now_utc_ns: i64) -> bool {
        now_utc_ns >= start + (self.window_ns + self.hold_ns) as i64
    }

    /// Fills `r`'s RTT fields from its window's samples (None when no probe of that window
    /// was answered) and frees the slot; later samples for it count as late.
    pub fn fill(&mut self, r: &mut Rollup) {
        let link = r.link_id as usize;
        if link >= MAX_LINKS {
            return;
        }
        let start = r.window_start_ns as i64;
        let slot = self.slot(link, start);
        if slot.start != start || slot.count == 0 {
            if slot.start <= start {
                // Mark it written: a straggler for this window is late, not a new window.
                slot.reset(start);
                slot.written = true;
            }
            return;
        }
        r.rtt_min_ns = Some(slot.min);
        r.rtt_max_ns = Some(slot.max);
        r.rtt_mean_ns = Some(slot.sum / slot.count);
        slot.rtts.sort_unstable();
        let pct = |v: &[u64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        r.rtt_p50_ns = Some(pct(&slot.rtts, 0.5));
        r.rtt_p99_ns = Some(pct(&slot.rtts, 0.99));
        // Written: keep the start so that a straggler is recognised as late.
        slot.reset(start);
        slot.written = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 500_000_000;
    const OFF: i64 = -37_000_000_000;

    fn sample(link: u16, t1_utc_ms: i64, rtt_ms: u64) -> Sample {
        Sample {
            link,
            seq: 0,
            refl_seq: 0,
            t1_tai_ns: (t1_utc_ms * 1_000_000 - OFF) as u64,
            t4_tai_ns: 0,
            reflector_hold_ns: 0,
            t2_ns: 0,
            rtt_ns: rtt_ms * 1_000_000,
        }
    }

    fn rollup(link: u32, start_ms: u64) -> Rollup {
        Rollup {
            link_id: link,
            window_start_ns: start_ms * 1_000_000,
            window_ns: W,
            ..Default::default()
        }
    }

    #[test]
    fn a_probe_counts_in_the_window_it_was_sent_in() {
        let mut p = ProbeWindows::new(W, Some(1_000_000_000), 16);
        // Sent at 10.499 s, answered 300 ms later (in the next window): still window 10.0.
        p.add(&sample(0, 10_499, 300), OFF);
        p.add(&sample(0, 10_000, 20), OFF);
        p.add(&sample(0, 10_100, 40), OFF);
        p.add(&sample(0, 10_500, 99), OFF);
        p.add(&sample(1, 10_200, 7), OFF);
        let mut r = rollup(0, 10_000);
        p.fill(&mut r);
        assert_eq!(r.rtt_min_ns, Some(20_000_000));
        assert_eq!(r.rtt_max_ns, Some(300_000_000));
        assert_eq!(r.rtt_mean_ns, Some(120_000_000));
        assert_eq!(r.rtt_p50_ns, Some(40_000_000));
        assert_eq!(r.rtt_p99_ns, Some(300_000_000));
        let mut r = rollup(0, 10_500);
        p.fill(&mut r);
        assert_eq!(
            (r.rtt_min_ns, r.rtt_max_ns),
            (Some(99_000_000), Some(99_000_000))
        );
        let mut r = rollup(1, 10_000);
        p.fill(&mut r);
        assert_eq!(r.rtt_mean_ns, Some(7_000_000));
    }

    #[test]
    fn no_samples_no_rtt_and_stragglers_are_late() {
        let mut p = ProbeWindows::new(W, Some(1_000_000_000), 16);
        let mut r = rollup(0, 20_000);
        p.fill(&mut r);
        assert_eq!(r.rtt_mean_ns, None);
        // Written without samples: a reply for it now is late, not a new window.
        p.add(&sample(0, 20_100, 5), OFF);
        assert_eq!(p.late, 1);
        p.add(&sample(0, 20_600, 5), OFF);
        let mut r = rollup(0, 20_500);
        p.fill(&mut r);
        assert_eq!(r.rtt_mean_ns, Some(5_000_000));
        p.add(&sample(0, 20_700, 6), OFF);
        assert_eq!(p.late, 2);
    }

    #[test]
    fn windows_wait_for_the_loss_timeout() {
        let p = ProbeWindows::new(W, Some(1_000_000_000), 4);
        let s = 30_000_000_000;
        assert!(!p.ready(s, s + 500_000_000 + 1_000_000_000));
        assert!(p.ready(s, s + 500_000_000 + 1_000_000_000 + HOLD_MARGIN_NS as i64));
    }

    #[test]
    fn percentiles_from_the_kept_samples_extremes_exact() {
        let mut p = ProbeWindows::new(W, Some(1_000_000_000), 3);
        for (i, rtt) in [10, 20, 30, 1000, 1].into_iter().enumerate() {
            p.add(&sample(2, 40_000 + i as i64, rtt), OFF);
        }
        let mut r = rollup(2, 40_000);
        p.fill(&mut r);
        assert_eq!(
            (r.rtt_min_ns, r.rtt_max_ns),
            (Some(1_000_000), Some(1_000_000_000))
        );
        assert_eq!(r.rtt_mean_ns, Some(212_200_000));
        assert_eq!(r.rtt_p50_ns, Some(20_000_000));
    }
}
