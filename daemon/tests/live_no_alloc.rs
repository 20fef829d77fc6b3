//! The live feed's frame consumer allocates nothing per frame: a counting global allocator
//! around the real `PointAccumulator` fed many frames, each finished point sent into a tokio
//! broadcast ring with a subscriber attached (as `lp-live` does).
use std::sync::atomic::Ordering;

use linkpulse::{http::live::PointAccumulator, Frame};

mod support {
    pub mod counting_alloc;
}
use support::counting_alloc::{ALLOCS, COUNTING, HOT_THREAD};

#[test]
fn the_live_consumer_allocates_nothing_per_frame() {
    let (tx, mut rx) = tokio::sync::broadcast::channel(256);
    let mut acc = PointAccumulator::new(10_000_000);
    let mut f = Frame {
        width_ns: 100_000,
        link_count: 4,
        valid_mask: 0b1111,
        ..Frame::default()
    };
    let mut points = 0u64;
    let mut run = |from: u64, to: u64, points: &mut u64| {
        for i in from..to {
            f.seq = i;
            f.bin_start_utc_ns = 1_700_000_000_000_000_000 + i as i64 * 100_000;
            f.links[0].bytes = [i, 1];
            acc.push(&f, |p| {
                *points += 1;
                let _ = tx.send(*p);
            });
        }
    };
    // Warm-up: the ring's slots are filled once.
    run(0, 100_000, &mut points);
    HOT_THREAD.with(|h| h.set(true));
    COUNTING.store(true, Ordering::Relaxed);
    run(100_000, 300_000, &mut points);
    COUNTING.store(false, Ordering::Relaxed);
    assert!(points >= 2900, "points made: {points}");
    assert_eq!(ALLOCS.load(Ordering::Relaxed), 0, "allocations per frame");
    // The subscriber lagged (it never read): the oldest points were overwritten, not queued.
    assert!(matches!(
        rx.try_recv(),
        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_))
    ));
}
