//! Time: the kernel stamps packets with CLOCK_TAI; UTC = TAI − the kernel's TAI offset. This
//! module reads the clocks, the offset and the NTP state (adjtimex), and detects clock steps.
use std::io;

pub const NS_PER_S: u64 = 1_000_000_000;

/// Reads a clock in ns. The clocks used here always exist on Linux; a failure is a bug.
#[inline]
fn now_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; the clock ids are constants Linux supports.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * NS_PER_S + ts.tv_nsec as u64
}

/// CLOCK_TAI in ns: the clock of the kernel's `bpf_ktime_get_tai_ns()`.
#[inline]
pub fn tai_ns() -> u64 {
    now_ns(libc::CLOCK_TAI)
}

/// CLOCK_REALTIME (UTC) in ns.
#[inline]
pub fn realtime_ns() -> u64 {
    now_ns(libc::CLOCK_REALTIME)
}

/// CLOCK_MONOTONIC in ns.
#[inline]
pub fn monotonic_ns() -> u64 {
    now_ns(libc::CLOCK_MONOTONIC)
}

/// Puts the calling thread in SCHED_FIFO at `priority` (1..=99), so its wake-up preempts
/// ordinary (CFS) work at once instead of waiting for a time slice: on a loaded 2-core router
/// that is the difference between tens of µs and milliseconds. Needs CAP_SYS_NICE or an
/// RLIMIT_RTPRIO of at least `priority` (the systemd unit sets `LimitRTPRIO`).
pub fn set_realtime_priority(priority: u8) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: pthread_self is always valid; param is a valid sched_param.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// [`set_realtime_priority`] for a daemon thread: 0 leaves the thread alone; a failure is
/// logged once with the fix and the thread goes on at normal priority.
pub fn apply_realtime_priority(thread: &str, priority: u8) {
    if priority == 0 {
        return;
    }
    match set_realtime_priority(priority) {
        Ok(()) => tracing::debug!(thread, priority, "SCHED_FIFO"),
        Err(e) => tracing::warn!(
            thread,
            priority,
            error = %e,
            "cannot switch to real-time scheduling: under CPU load frames reach stream clients \
             late. Fix: give the daemon CAP_SYS_NICE or LimitRTPRIO={priority} (systemd), or set \
             [sampling] realtime_priority = 0 to run at normal priority"
        ),
    }
}

/// Sleeps `ns` on CLOCK_MONOTONIC. Relative on purpose: an absolute sleep on CLOCK_TAI would
/// stretch by the size of a backward clock step, and the daemon must see steps at once.
pub fn sleep_ns(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / NS_PER_S) as libc::time_t,
        tv_nsec: (ns % NS_PER_S) as libc::c_long,
    };
    // SAFETY: valid timespec; EINTR just wakes us early, the caller re-checks the time.
    unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &ts, std::ptr::null_mut()) };
}

/// Sleeps until CLOCK_MONOTONIC reaches `t` ns (an absolute deadline: no drift from the time
/// spent between deadlines).
pub fn sleep_until_monotonic_ns(t: u64) {
    let ts = libc::timespec {
        tv_sec: (t / NS_PER_S) as libc::time_t,
        tv_nsec: (t % NS_PER_S) as libc::c_long,
    };
    // SAFETY: valid timespec; an interruption just ends the sleep early, callers re-check.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

/// The kernel's view of time synchronisation, from adjtimex(2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ClockState {
    /// TAI − UTC in seconds, as the kernel applies it to CLOCK_TAI.
    pub tai_offset_s: i64,
    /// False while the kernel says the clock is not synchronised (STA_UNSYNC or TIME_ERROR).
    pub synced: bool,
    /// The kernel's maximum error bound in µs (maxerror).
    pub max_error_us: i64,
    /// The kernel's estimated error in µs (esterror).
    pub est_error_us: i64,
}

impl ClockState {
    /// Reads adjtimex without changing anything (modes = 0).
    pub fn read() -> io::Result<ClockState> {
        // SAFETY: zeroed timex is a valid "read only" request.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer; modes = 0 reads.
        let rc = unsafe { libc::adjtimex(&mut tx) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let unsync = (tx.status & libc::STA_UNSYNC) != 0 || rc == libc::TIME_ERROR;
        Ok(ClockState {
            tai_offset_s: tx.tai as i64,
            synced: !unsync,
            max_error_us: tx.maxerror as i64,
            est_error_us: tx.esterror as i64,
        })
    }

    /// UTC ns of a TAI ns stamp.
    #[inline]
    pub fn tai_to_utc(&self, tai: u64) -> i64 {
        tai as i64 - self.tai_offset_s * NS_PER_S as i64
    }
}

/// A detected step of the real-time clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ClockStep {
    /// CLOCK_REALTIME after the step (ns).
    pub at_utc_ns: i64,
    /// Size of the step in ns (positive = forward).
    pub step_ns: i64,
}

/// Detects steps of CLOCK_REALTIME against CLOCK_MONOTONIC. A slewing NTP daemon changes their
/// difference by at most 500 ppm; anything beyond that plus a small reading allowance is a step.
#[derive(Debug)]
pub struct StepDetector {
    last_mono: u64,
    last_diff: i64,
}

/// Reading both clocks is not atomic: allow this much noise before calling it a step.
const STEP_NOISE_NS: i64 = 200_000;

impl StepDetector {
    pub fn new(realtime: u64, mono: u64) -> Self {
        Self {
            last_mono: mono,
            last_diff: realtime as i64 - mono as i64,
        }
    }

    /// Feeds a pair of readings; returns the step when the difference moved more than slewing
    /// can explain.
    pub fn observe(&mut self, realtime: u64, mono: u64) -> Option<ClockStep> {
        let diff = realtime as i64 - mono as i64;
        let elapsed = mono.saturating_sub(self.last_mono) as i64;
        let allowed = elapsed / 2000 + STEP_NOISE_NS; // 500 ppm
        let moved = diff - self.last_diff;
        self.last_mono = mono;
        self.last_diff = diff;
        (moved.abs() > allowed).then_some(ClockStep {
            at_utc_ns: realtime as i64,
            step_ns: moved,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_is_tai_minus_offset() {
        let c = ClockState {
            tai_offset_s: 37,
            synced: true,
            ..Default::default()
        };
        assert_eq!(
            c.tai_to_utc(1_700_000_037 * NS_PER_S),
            1_700_000_000 * NS_PER_S as i64
        );
    }

    #[test]
    fn tai_and_realtime_agree_with_the_kernel_offset() {
        let c = ClockState::read().expect("adjtimex");
        let tai = tai_ns();
        let utc = realtime_ns();
        let err = c.tai_to_utc(tai) - utc as i64;
        assert!(err.abs() < 50_000_000, "TAI→UTC off by {err} ns");
    }

    #[test]
    fn slewing_is_not_a_step_but_a_jump_is() {
        let mut d = StepDetector::new(1_000 * NS_PER_S, 5 * NS_PER_S);
        // one second later, 400 µs of slew: allowed (500 ppm + noise)
        assert_eq!(d.observe(1_001 * NS_PER_S + 400_000, 6 * NS_PER_S), None);
        // then a 2 s backward step
        let s = d.observe(1_000 * NS_PER_S, 7 * NS_PER_S).expect("step");
        assert!(s.step_ns < -1_900_000_000, "{s:?}");
        // and a forward one
        let s = d.observe(1_010 * NS_PER_S, 8 * NS_PER_S).expect("step");
        assert!(s.step_ns > 8 * NS_PER_S as i64, "{s:?}");
    }
}
