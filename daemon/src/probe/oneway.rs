//! One-way delays from a probe's four stamps: up = T2 − T1, down = T4 − T3. They mean something
//! only when both clocks are synchronised to UTC: ours says so through adjtimex, the
//! reflector's through the S bit of its Error Estimate. Otherwise there is no figure (never a
//! number off by the clocks' offset). The error bound is the sum of both clocks' error
//! bounds: our kernel's `maxerror` and the reflector's Error Estimate.

use super::session::Sample;
use crate::clock::{ClockState, NS_PER_S};
use crate::stamp::TimestampFormat;

/// One probe's one-way delays, ns. Either may be negative when the clocks' real offset
/// exceeds the delay; `error_ns` bounds that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OneWay {
    pub up_ns: i64,
    pub down_ns: i64,
    pub error_ns: u64,
}

/// The one-way delays of `s`, or None unless both clocks are synchronised.
pub fn one_way(s: &Sample, local: &ClockState) -> Option<OneWay> {
    if !local.synced || !s.reflector_error.synced() {
        return None;
    }
    // T1 and T4 are CLOCK_TAI; T2 and T3 are on the reflector's scale: UTC for NTP
    // timestamps, TAI for PTP ones (RFC 8762 §4.2.1).
    let shift = match s.reflector_error.format() {
        TimestampFormat::Ntp => local.tai_offset_s.checked_mul(NS_PER_S as i64)?,
        TimestampFormat::Ptp => 0,
    };
    let t1 = i64::try_from(s.t1_tai_ns).ok()?.checked_sub(shift)?;
    let t4 = i64::try_from(s.t4_tai_ns).ok()?.checked_sub(shift)?;
    let t2 = i64::try_from(s.t2_ns).ok()?;
    let t3 = t2.checked_add(i64::try_from(s.reflector_hold_ns).ok()?)?;
    Some(OneWay {
        up_ns: t2.checked_sub(t1)?,
        down_ns: t4.checked_sub(t3)?,
        error_ns: u64::try_from(local.max_error_us.max(0))
            .ok()?
            .saturating_mul(1000)
            .saturating_add(s.reflector_error.error_ns()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stamp::ErrorEstimate;

    const TAI_UTC: i64 = 37;

    fn sample(format: TimestampFormat, synced: bool) -> Sample {
        // Sent at UTC 1e18 ns, 20 ms up, 100 µs at the reflector, 25 ms down.
        let utc_t1 = 1_000_000_000_000_000_000u64;
        let tai = |utc: u64| utc + TAI_UTC as u64 * NS_PER_S;
        let refl = |utc: u64| match format {
            TimestampFormat::Ntp => utc,
            TimestampFormat::Ptp => tai(utc),
        };
        let t2 = utc_t1 + 20_000_000;
        let t3 = t2 + 100_000;
        let t4 = t3 + 25_000_000;
        Sample {
            link: 0,
            seq: 1,
            refl_seq: 1,
            t1_tai_ns: tai(utc_t1),
            t4_tai_ns: tai(t4),
            reflector_hold_ns: t3 - t2,
            t2_ns: refl(t2),
            rtt_ns: t4 - utc_t1 - (t3 - t2),
            reflector_error: ErrorEstimate::from_error_ns(synced, format, 2_000),
        }
    }

    fn clock(synced: bool) -> ClockState {
        ClockState {
            tai_offset_s: TAI_UTC,
            synced,
            max_error_us: 500,
            est_error_us: 10,
        }
    }

    #[test]
    fn both_formats_give_the_same_delays() {
        for f in [TimestampFormat::Ntp, TimestampFormat::Ptp] {
            let o = one_way(&sample(f, true), &clock(true)).expect("both synced");
            assert_eq!((o.up_ns, o.down_ns), (20_000_000, 25_000_000), "{f:?}");
            // 500 µs of ours + the reflector's 2 µs, rounded up by its 8-bit multiplier (< 1 %).
            assert!((502_000..=502_020).contains(&o.error_ns), "{}", o.error_ns);
        }
    }

    #[test]
    fn none_unless_both_clocks_are_synchronised() {
        let s = sample(TimestampFormat::Ntp, true);
        assert_eq!(one_way(&s, &clock(false)), None);
        let s = sample(TimestampFormat::Ntp, false);
        assert_eq!(one_way(&s, &clock(true)), None);
    }

    #[test]
    fn a_clock_offset_shows_as_a_negative_delay_not_an_overflow() {
        let mut s = sample(TimestampFormat::Ntp, true);
        // The reflector's clock 30 ms behind ours.
        s.t2_ns -= 30_000_000;
        let o = one_way(&s, &clock(true)).expect("synced");
        assert_eq!((o.up_ns, o.down_ns), (-10_000_000, 55_000_000));
        s.t2_ns = u64::MAX;
        assert_eq!(one_way(&s, &clock(true)), None);
    }
}
