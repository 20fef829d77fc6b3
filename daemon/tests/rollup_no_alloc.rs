//! `lp-persist`'s per-frame and per-sample work allocates nothing: a counting global allocator
//! around a rollup builder fed two windows of frames with traffic and passive TCP RTT, and the
//! probes' windows fed samples with one-way delays (rollups are `Copy`-like plain data).
use std::sync::atomic::Ordering;

use linkpulse::{
    clock::ClockState,
    frame::Frame,
    probe::{oneway::one_way, Sample},
    rollup::RollupBuilder,
    rollup_probe::{ProbeWindows, SAMPLES_PER_SLOT},
    stamp::{ErrorEstimate, TimestampFormat},
};

mod support {
    pub mod counting_alloc;
}
use support::counting_alloc::{ALLOCS, COUNTING, HOT_THREAD};

#[test]
fn rollup_and_probe_windows_allocate_nothing() {
    const W: u64 = 100_000;
    const WIN: u64 = 500_000_000;
    const T0: i64 = 1_800_000_000_000_000_000;
    const OFF: i64 = -37_000_000_000;
    let mut builder = RollupBuilder::new(WIN, W, 1);
    let mut probes = ProbeWindows::new(WIN, Some(1_000_000_000), SAMPLES_PER_SLOT);
    let clock = ClockState {
        tai_offset_s: 37,
        synced: true,
        max_error_us: 500,
        est_error_us: 10,
    };
    let mut frame = Frame {
        width_ns: W,
        link_count: 16,
        valid_mask: 0xffff,
        tcp_rtt_mask: 0xffff,
        ..Frame::default()
    };
    let bins = 2 * WIN / W + 1;
    let (mut emitted, mut with_tcp, mut with_owd) = (0u64, 0u64, 0u64);
    HOT_THREAD.with(|h| h.set(true));
    COUNTING.store(true, Ordering::SeqCst);
    for i in 0..bins {
        frame.seq = i;
        frame.bin_start_utc_ns = T0 + (i * W) as i64;
        frame.bin_start_tai_ns = (frame.bin_start_utc_ns - OFF) as u64;
        for l in 0..16 {
            frame.links[l].bytes = [i % 1500, 100];
            frame.links[l].packets = [1, 1];
            frame.tcp_rtt[l] = Default::default();
            frame.tcp_rtt[l].add_sample(20_000_000 + i);
        }
        if i % 10 == 0 {
            // A probe per ms and link, reflector synced (one-way delays known).
            for l in 0..16u16 {
                let t1 = frame.bin_start_tai_ns;
                let s = Sample {
                    link: l,
                    seq: i as u32,
                    refl_seq: i as u32,
                    t1_tai_ns: t1,
                    t4_tai_ns: t1 + 40_000_000,
                    reflector_hold_ns: 10_000,
                    t2_ns: t1 - 37_000_000_000 + 20_000_000,
                    rtt_ns: 39_990_000,
                    reflector_error: ErrorEstimate::from_error_ns(true, TimestampFormat::Ntp, 1000),
                };
                probes.add(&s, OFF, one_way(&s, &clock));
            }
        }
        builder.push(&frame, |mut r| {
            probes.fill(&mut r);
            emitted += 1;
            with_tcp += u64::from(r.tcp_rtt_samples > 0);
            with_owd += u64::from(r.owd_samples > 0);
        });
    }
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(emitted, 32, "two windows of 16 links");
    assert_eq!((with_tcp, with_owd), (32, 32));
    assert_eq!(
        ALLOCS.load(Ordering::SeqCst),
        0,
        "allocations in lp-persist's per-frame work"
    );
}
