//! Probes in the rollups: each probe counts in the window it was SENT in (its kernel T1),
//! whenever its reply arrives or its loss is settled: RTT, probes sent and lost per direction. A reply can come up to the loss timeout after T1, so
//! `lp-persist` holds each window back until `window end + loss timeout + margin` (frames' UTC)
//! before it writes it; a sample for a window already written is counted as late and dropped.
//!
//! Per link a small ring of window slots (enough for the hold), each with exact count, min, max
//! and sum, and up to [`SAMPLES_PER_SLOT`] RTTs for the p50/p99 (beyond that the percentiles
//! come from the first ones of the window; min/mean/max stay exact), and the window's probes:
//! sent, lost up, lost down, and lost with the direction still unknown. A lost probe's
//! direction is known only when a later probe is answered (`probe::session`): at ≥ ~2 Hz that
//! comes within the hold; otherwise the window is written with the probe lost, direction
//! unknown (counted in `probes_sent_fwd`, in neither `probes_lost_fwd` nor `probes_sent_bwd`).
//! All buffers are sized at start: adding a sample allocates nothing.
//!
//! One-way delays (`probe::oneway`): per window the answered probes whose both clocks reported
//! sync when the sample reached `lp-persist` (ours by adjtimex, the reflector's by the S bit of
//! its Error Estimate), with the mean and max of each direction and the largest error bound;
//! a window without such a probe has none (never a zero).
use linkpulse_common::MAX_LINKS;
use linkpulse_sink::store::Rollup;

use crate::probe::{oneway::OneWay, Fate, Outcome, Sample};

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
    /// Probes sent in the window and settled so far, and the lost ones by direction.
    sent: u32,
    lost_up: u32,
    lost_down: u32,
    lost_unknown: u32,
    owd: Owd,
}

/// One-way delays of a window's probes: count, sums and maxima per direction, error bound.
#[derive(Clone, Copy)]
struct Owd {
    count: u32,
    up_sum: i64,
    down_sum: i64,
    up_max: i64,
    down_max: i64,
    error_max: u64,
}

impl Owd {
    const EMPTY: Owd = Owd {
        count: 0,
        up_sum: 0,
        down_sum: 0,
        up_max: i64::MIN,
        down_max: i64::MIN,
        error_max: 0,
    };

    fn add(&mut self, o: &OneWay) {
        self.count += 1;
        self.up_sum = self.up_sum.saturating_add(o.up_ns);
        self.down_sum = self.down_sum.saturating_add(o.down_ns);
        self.up_max = self.up_max.max(o.up_ns);
        self.down_max = self.down_max.max(o.down_ns);
        self.error_max = self.error_max.max(o.error_ns);
    }

    fn fill(&self, r: &mut Rollup) {
        if self.count == 0 {
            return;
        }
        let n = i64::from(self.count);
        r.owd_samples = self.count;
        r.owd_up_mean_ns = Some(self.up_sum / n);
        r.owd_up_max_ns = Some(self.up_max);
        r.owd_down_mean_ns = Some(self.down_sum / n);
        r.owd_down_max_ns = Some(self.down_max);
        r.owd_error_ns = Some(self.error_max);
    }
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
        self.sent = 0;
        self.lost_up = 0;
        self.lost_down = 0;
        self.lost_unknown = 0;
        self.owd = Owd::EMPTY;
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
                sent: 0,
                lost_up: 0,
                lost_down: 0,
                lost_unknown: 0,
                owd: Owd::EMPTY,
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

    /// The slot of `link`'s window holding UTC time `t_utc`, opened if need be; None (counted
    /// late) when that window was written already.
    fn open(&mut self, link: usize, t_utc: i64) -> Option<&mut Slot> {
        if link >= MAX_LINKS {
            return None;
        }
        let start = t_utc - t_utc.rem_euclid(self.window_ns as i64);
        let slot = self.slot(link, start);
        if slot.start < start {
            // Older contents were written (or never had a rollup): reuse the slot.
            slot.reset(start);
        } else if slot.start > start || slot.written {
            self.late += 1;
            return None;
        }
        Some(self.slot(link, start))
    }

    /// A probe's fate; `tai_to_utc_ns` = UTC − TAI (from the frames), `mono_to_tai_ns` = TAI −
    /// CLOCK_MONOTONIC (now), for a probe whose kernel T1 never came.
    pub fn add_outcome(&mut self, o: &Outcome, tai_to_utc_ns: i64, mono_to_tai_ns: i64) {
        let t1_tai = if o.t1_tai_ns != 0 {
            o.t1_tai_ns as i64
        } else {
            o.sent_mono_ns as i64 + mono_to_tai_ns
        };
        let Some(slot) = self.open(o.link as usize, t1_tai + tai_to_utc_ns) else {
            return;
        };
        match o.fate {
            Fate::Answered => slot.sent += 1,
            Fate::Lost => {
                slot.sent += 1;
                slot.lost_unknown += 1;
            }
            Fate::LostUp | Fate::LostDown => {
                slot.lost_unknown = slot.lost_unknown.saturating_sub(1);
                if o.fate == Fate::LostUp {
                    slot.lost_up += 1;
                } else {
                    slot.lost_down += 1;
                }
            }
        }
    }

    /// A sample; `tai_to_utc_ns` = UTC − TAI (from the frames); `owd`: its one-way delays when
    /// both clocks are synchronised (`probe::oneway::one_way`).
    pub fn add(&mut self, s: &Sample, tai_to_utc_ns: i64, owd: Option<OneWay>) {
        let t1 = s.t1_tai_ns as i64 + tai_to_utc_ns;
        let Some(slot) = self.open(s.link as usize, t1) else {
            return;
        };
        slot.count += 1;
        slot.min = slot.min.min(s.rtt_ns);
        slot.max = slot.max.max(s.rtt_ns);
        slot.sum += s.rtt_ns;
        if slot.rtts.len() < slot.rtts.capacity() {
            slot.rtts.push(s.rtt_ns);
        }
        if let Some(o) = owd {
            slot.owd.add(&o);
        }
    }

    /// Whether the window starting at `start` may be written, frames having reached `now` (UTC).
    pub fn ready(&self, start: i64, now_utc_ns: i64) -> bool {
        now_utc_ns >= start + (self.window_ns + self.hold_ns) as i64
    }

    /// Fills `r`'s probe fields from its window: probes sent and lost per direction, RTT from
    /// the samples (None when no probe of that window was answered); frees the slot, later
    /// samples and outcomes for it count as late.
    pub fn fill(&mut self, r: &mut Rollup) {
        let link = r.link_id as usize;
        if link >= MAX_LINKS {
            return;
        }
        let start = r.window_start_ns as i64;
        let slot = self.slot(link, start);
        if slot.start != start {
            if slot.start < start {
                // Mark it written: a straggler for this window is late, not a new window.
                slot.reset(start);
                slot.written = true;
            }
            return;
        }
        r.probes_sent_fwd = slot.sent;
        r.probes_lost_fwd = slot.lost_up;
        // What the reflector sent back: the probes that reached it, as far as known.
        r.probes_sent_bwd = slot
            .sent
            .saturating_sub(slot.lost_up)
            .saturating_sub(slot.lost_unknown);
        r.probes_lost_bwd = slot.lost_down;
        slot.owd.fill(r);
        if slot.count == 0 {
            slot.reset(start);
            slot.written = true;
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
            reflector_error: Default::default(),
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
        p.add(&sample(0, 10_499, 300), OFF, None);
        p.add(&sample(0, 10_000, 20), OFF, None);
        p.add(&sample(0, 10_100, 40), OFF, None);
        p.add(&sample(0, 10_500, 99), OFF, None);
        p.add(&sample(1, 10_200, 7), OFF, None);
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
        p.add(&sample(0, 20_100, 5), OFF, None);
        assert_eq!(p.late, 1);
        p.add(&sample(0, 20_600, 5), OFF, None);
        let mut r = rollup(0, 20_500);
        p.fill(&mut r);
        assert_eq!(r.rtt_mean_ns, Some(5_000_000));
        p.add(&sample(0, 20_700, 6), OFF, None);
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
            p.add(&sample(2, 40_000 + i as i64, rtt), OFF, None);
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

    #[test]
    fn one_way_delays_only_from_synced_probes_with_their_error_bound() {
        let mut p = ProbeWindows::new(W, Some(1_000_000_000), 16);
        let ow = |up: i64, down: i64, err: u64| {
            Some(OneWay {
                up_ns: up,
                down_ns: down,
                error_ns: err,
            })
        };
        // Window 60.0: three synced probes (one with a clock offset beyond its delay: a
        // negative up delay is kept as measured) and one unsynced; sent at 60.499, answered in
        // the next window: still window 60.0.
        p.add(
            &sample(0, 60_000, 40),
            OFF,
            ow(20_000_000, 20_000_000, 500_000),
        );
        p.add(
            &sample(0, 60_100, 40),
            OFF,
            ow(-1_000_000, 41_000_000, 502_000),
        );
        p.add(&sample(0, 60_200, 40), OFF, None);
        p.add(
            &sample(0, 60_499, 40),
            OFF,
            ow(26_000_000, 14_000_000, 501_000),
        );
        // Window 60.5: answered, never synced.
        p.add(&sample(0, 60_600, 40), OFF, None);
        let mut r = rollup(0, 60_000);
        p.fill(&mut r);
        assert_eq!(r.owd_samples, 3);
        assert_eq!(r.owd_up_mean_ns, Some(15_000_000));
        assert_eq!(r.owd_up_max_ns, Some(26_000_000));
        assert_eq!(r.owd_down_mean_ns, Some(25_000_000));
        assert_eq!(r.owd_down_max_ns, Some(41_000_000));
        assert_eq!(r.owd_error_ns, Some(502_000));
        assert_eq!(
            r.rtt_mean_ns,
            Some(40_000_000),
            "RTT counts every answered probe"
        );
        let mut r = rollup(0, 60_500);
        p.fill(&mut r);
        assert_eq!(r.rtt_mean_ns, Some(40_000_000));
        assert_eq!(r.owd_samples, 0);
        assert_eq!(
            (r.owd_up_mean_ns, r.owd_up_max_ns, r.owd_down_mean_ns),
            (None, None, None)
        );
        assert_eq!((r.owd_down_max_ns, r.owd_error_ns), (None, None));
        // The slot of window 60.0, reused for window 63.0 (6 slots per link), starts empty.
        p.add(&sample(0, 63_000, 5), OFF, None);
        let mut r = rollup(0, 63_000);
        p.fill(&mut r);
        assert_eq!((r.owd_samples, r.owd_up_mean_ns), (0, None));
    }

    fn outcome(link: u16, seq: u32, t1_utc_ms: i64, fate: Fate) -> Outcome {
        Outcome {
            link,
            seq,
            fate,
            t1_tai_ns: (t1_utc_ms * 1_000_000 - OFF) as u64,
            sent_mono_ns: 0,
        }
    }

    #[test]
    fn probes_sent_and_lost_count_in_the_window_of_their_send_time() {
        let mut p = ProbeWindows::new(W, Some(1_000_000_000), 4);
        // Window 50.0: 0 answered, 1 lost up, 2 lost down, 3 lost and its direction never
        // settled; 4 (sent at 50.499) lost up, its direction settled long after: window 50.0.
        // Window 50.5: 5 answered, 6 sent without a kernel T1 (its send time says 50.6).
        for (seq, t, fate) in [
            (0, 50_000, Fate::Answered),
            (1, 50_100, Fate::Lost),
            (2, 50_200, Fate::Lost),
            (3, 50_300, Fate::Lost),
            (4, 50_499, Fate::Lost),
            (1, 50_100, Fate::LostUp),
            (2, 50_200, Fate::LostDown),
            (5, 50_501, Fate::Answered),
            (4, 50_499, Fate::LostUp),
        ] {
            p.add_outcome(&outcome(0, seq, t, fate), OFF, 0);
        }
        // No T1: CLOCK_MONOTONIC 600 ms + (TAI − MONOTONIC) = 50.6 s UTC.
        let mono_to_tai = 50_000 * 1_000_000 - OFF;
        let mut o = outcome(0, 6, 0, Fate::Answered);
        (o.t1_tai_ns, o.sent_mono_ns) = (0, 600_000_000);
        p.add_outcome(&o, OFF, mono_to_tai);
        let mut r = rollup(0, 50_000);
        p.fill(&mut r);
        assert_eq!(
            (
                r.probes_sent_fwd,
                r.probes_lost_fwd,
                r.probes_sent_bwd,
                r.probes_lost_bwd
            ),
            // 5 sent; 2 lost up; the reflector answered 0 and 2 (3 unknown); 1 lost down.
            (5, 2, 2, 1)
        );
        assert_eq!(r.rtt_mean_ns, None, "outcomes alone make no RTT");
        let mut r = rollup(0, 50_500);
        p.fill(&mut r);
        assert_eq!(
            (r.probes_sent_fwd, r.probes_lost_fwd, r.probes_sent_bwd),
            (2, 0, 2)
        );
        // After the write: late, not counted anywhere.
        p.add_outcome(&outcome(0, 3, 50_300, Fate::LostDown), OFF, 0);
        assert_eq!(p.late, 1);
        // An unprobed link's window stays at 0.
        let mut r = rollup(1, 50_000);
        p.fill(&mut r);
        assert_eq!((r.probes_sent_fwd, r.probes_sent_bwd), (0, 0));
    }
}
