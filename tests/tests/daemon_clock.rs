//! The daemon's time base on a real kernel (root): UTC = TAI − the kernel's TAI offset with a
//! non-zero offset, frames flagged while the clock is not synchronised, and steps of the real
//! clock detected. This binary changes the system clock state: it runs alone (cargo runs test
//! binaries one after the other) and restores everything it changed, also when it fails.
mod common;

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use common::{plain, Run};
use linkpulse::{
    clock::{self, ClockState},
    frame::{FLAG_CLOCK_STEP, FLAG_CLOCK_UNSYNC, FLAG_SKIPPED},
};
use linkpulse_testbed::{
    traffic::{UdpFlow, UdpSink},
    ModemKind,
};

fn adjtimex(tx: &mut libc::timex) {
    // SAFETY: valid timex; the modes set say what is written.
    let rc = unsafe { libc::adjtimex(tx) };
    assert!(rc >= 0, "adjtimex: {}", std::io::Error::last_os_error());
}

/// Puts back the TAI offset, status and max error found at the start.
struct RestoreClock(libc::timex);
impl RestoreClock {
    fn save() -> Self {
        // SAFETY: zeroed timex with modes 0 reads.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        adjtimex(&mut tx);
        RestoreClock(tx)
    }
}
impl Drop for RestoreClock {
    fn drop(&mut self) {
        // SAFETY: zeroed timex, then only the fields named in modes.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        tx.modes = libc::ADJ_TAI | libc::ADJ_STATUS | libc::ADJ_MAXERROR | libc::ADJ_ESTERROR;
        tx.constant = self.0.tai as libc::c_long;
        tx.status = self.0.status;
        tx.maxerror = self.0.maxerror;
        tx.esterror = self.0.esterror;
        // SAFETY: as above.
        unsafe { libc::adjtimex(&mut tx) };
    }
}

fn set_tai_offset(s: i64) {
    // SAFETY: zeroed timex, modes = ADJ_TAI.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    tx.modes = libc::ADJ_TAI;
    tx.constant = s as libc::c_long;
    adjtimex(&mut tx);
}

fn set_synced(synced: bool) {
    // SAFETY: zeroed timex, then a read to keep the other status bits.
    let mut cur: libc::timex = unsafe { std::mem::zeroed() };
    adjtimex(&mut cur);
    // SAFETY: zeroed timex.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    tx.modes = libc::ADJ_STATUS | libc::ADJ_MAXERROR | libc::ADJ_ESTERROR;
    tx.status = if synced {
        cur.status & !libc::STA_UNSYNC
    } else {
        cur.status | libc::STA_UNSYNC
    };
    tx.maxerror = 2_000;
    tx.esterror = 500;
    adjtimex(&mut tx);
}

/// Steps CLOCK_REALTIME by `ns` (positive = forward).
fn step_realtime(ns: i64) {
    let now = clock::realtime_ns() as i64 + ns;
    let ts = libc::timespec {
        tv_sec: (now / 1_000_000_000) as libc::time_t,
        tv_nsec: (now % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: valid timespec.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    assert_eq!(rc, 0, "clock_settime: {}", std::io::Error::last_os_error());
}

#[test]
fn utc_sync_flags_and_clock_steps() {
    let _restore = RestoreClock::save();
    let offset = if ClockState::read().expect("adjtimex").tai_offset_s == 37 {
        11
    } else {
        37
    };
    set_tai_offset(offset);
    set_synced(false);
    assert_eq!(
        (clock::tai_ns() as i64 - clock::realtime_ns() as i64 + 500_000_000) / 1_000_000_000,
        offset,
        "the kernel applies the TAI offset"
    );

    let mut run = Run::start("lpck", vec![plain("wwan0", ModemKind::Veth)], &[]);
    let rtr = run.bed.router_ns().to_string();
    let (r, s) = run.bed.modem_addr_v4(0);
    let dst = SocketAddr::new(s.into(), 9500);
    let _sink = UdpSink::new(run.bed.server_ns(), dst, None)
        .start()
        .expect("sink");
    let flow = UdpFlow::new(&rtr, "wwan0", r.into(), dst, 1000, 100);
    let t0 = clock::realtime_ns() as i64 / 1_000_000_000;
    flow.run_count(1500).expect("flow");
    let t1 = clock::realtime_ns() as i64 / 1_000_000_000;
    run.settle(Duration::from_millis(300));
    {
        let seen = run.seen.lock().expect("seen");
        assert_eq!(
            seen.tai_minus_utc.iter().copied().collect::<Vec<_>>(),
            vec![offset * 1_000_000_000],
            "every frame: UTC start = TAI start − the kernel's offset"
        );
        let secs: Vec<i64> = seen.per_second[&(0, 1)].keys().copied().collect();
        assert!(
            secs.iter().all(|s| (t0..=t1).contains(s)),
            "packets counted in UTC seconds {secs:?}, sent within {t0}..={t1}"
        );
        assert!(
            seen.flag_frames[1] > 0 && seen.flags_or & FLAG_CLOCK_UNSYNC != 0,
            "unsynchronised clock flagged"
        );
    }

    // Synchronised: frames are no longer flagged.
    set_synced(true);
    std::thread::sleep(Duration::from_millis(400));
    let flagged = run.seen.lock().expect("seen").flag_frames[1];
    std::thread::sleep(Duration::from_millis(400));
    run.settle(Duration::from_millis(10));
    assert_eq!(
        run.seen.lock().expect("seen").flag_frames[1],
        flagged,
        "synced clock: no new unsync flags"
    );
    assert!(run.daemon().shared().clock().synced);

    // Steps of the real clock, forward then back: detected, recorded, frames flagged.
    step_realtime(1_500_000_000);
    std::thread::sleep(Duration::from_millis(400));
    step_realtime(-1_500_000_000);
    std::thread::sleep(Duration::from_millis(400));
    run.settle(Duration::from_millis(10));
    let steps = run
        .daemon()
        .shared()
        .counters
        .clock_steps
        .load(Ordering::Relaxed);
    assert!(steps >= 2, "two steps detected, got {steps}");
    assert!(
        run.daemon()
            .shared()
            .events()
            .iter()
            .filter(|e| e.kind == "clock_step")
            .count()
            >= 2
    );
    let seen = run.seen.lock().expect("seen");
    assert!(
        seen.flags_or & FLAG_CLOCK_STEP != 0,
        "frames after a step are flagged"
    );
    assert!(
        seen.flags_or & FLAG_SKIPPED != 0 || seen.flag_frames[2] >= 2,
        "the grid restarted or was flagged"
    );
    drop(seen);
    run.stop_daemon();
}
