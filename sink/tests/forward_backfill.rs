//! Backfill correctness (real store, real influxd): an unpaced forwarder drains a backlog of many
//! full batches — the path where `max_in_flight` requests are on the wire at once and the next
//! batch is read, encoded and gzip'ed meanwhile — while new rows keep arriving and influxd is
//! killed and restarted in the middle (so requests behind a failed one are dropped and sent
//! again). InfluxDB then holds exactly the store's rows with equal values, and the requests
//! really overlapped, never beyond the bound. The speed of a
//! 24 h, 16-link backfill against a plain bulk writer is a benchmark figure
//! (`cargo xtask bench -- --only backfill`), not a test.

mod forward_support;

use forward_support::*;
use linkpulse_sink::forward::{Forwarder, DEFAULT_IN_FLIGHT};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const LINKS: u32 = 16;
/// Windows in the backlog at the start (30,000 rows), and appended while it drains.
const BACKLOG: u64 = 1875;
const LIVE: u64 = 125;

#[test]
fn backlog_of_full_batches_lands_exactly_across_an_influxd_restart() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    let mut influx = Influx::start(false);
    influx.exec("CREATE DATABASE fwd");
    for chunk in rollups(LINKS, 0..BACKLOG, 1).chunks(5000) {
        store.put_rollups(chunk).expect("put");
    }

    let mut cfg = v1_config("central", &influx, "fwd", dir.path());
    assert_eq!(cfg.max_bytes_per_s, None, "unpaced");
    cfg.batch_points = 1000;
    assert_eq!(cfg.max_in_flight, DEFAULT_IN_FLIGHT);
    const {
        assert!(
            DEFAULT_IN_FLIGHT >= 2,
            "the test is about overlapping requests"
        )
    };
    let h = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .spawn()
        .expect("spawn");
    let stats = h.stats().clone();
    // The most requests seen on the wire at once.
    let (most, done) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let watcher = {
        let (stats, most, done) = (stats.clone(), most.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                most.fetch_max(stats.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    // Some batches through, then an outage of the central side in the middle of the backlog.
    wait_for(120, "the first batches", || {
        stats.batches_sent.load(Ordering::Relaxed) >= 3
    });
    influx.kill();
    // Rows keep arriving (one window of 16 links at a time, as the daemon writes them).
    for w in BACKLOG..BACKLOG + LIVE {
        store
            .put_rollups(&rollups(LINKS, w..w + 1, 1))
            .expect("put");
    }
    std::thread::sleep(Duration::from_millis(500));
    influx.spawn();
    h.kick();
    let rows = all_rows(&store);
    let top = rows.last().expect("rows").seq;
    wait_for(300, "the backlog drained", || {
        stats.cursor.load(Ordering::Relaxed) == top
    });
    h.stop();
    done.store(true, Ordering::Relaxed);
    watcher.join().expect("watcher");
    assert_eq!(
        most.load(Ordering::Relaxed),
        DEFAULT_IN_FLIGHT,
        "requests on the wire at once during the backlog"
    );
    assert_eq!(
        stats.in_flight.load(Ordering::Relaxed),
        0,
        "none left after stop"
    );
    assert_eq!(store.get_cursor("central").expect("cursor"), Some(top));
    assert!(
        stats.errors_total() > 0,
        "the outage was seen by the forwarder"
    );
    assert!(
        stats.batches_sent.load(Ordering::Relaxed) >= 30,
        "the backlog went in full batches"
    );
    assert_exactly(&influx, "fwd", &rows);
}

/// Retention while a backlog drains: the forwarder is paused (it drops its read-ahead batch and
/// settles the requests on the wire), then what is after its cursor and older than the cut is
/// trimmed. Every trimmed row then either reached InfluxDB before the pause or is lost for it,
/// never both: no batch read before the trim is sent after it.
#[test]
fn a_trim_during_a_backlog_loses_exactly_the_rows_after_the_cursor() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    let influx = Influx::start(false);
    influx.exec("CREATE DATABASE fwd");
    for chunk in rollups(LINKS, 0..BACKLOG, 1).chunks(5000) {
        store.put_rollups(chunk).expect("put");
    }
    let rows = all_rows(&store);
    let top = rows.last().expect("rows").seq;
    // The trim removes the first half of the windows.
    let cut = T0 + BACKLOG / 2 * W;
    let mut cfg = v1_config("central", &influx, "fwd", dir.path());
    cfg.batch_points = 1000;
    let h = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .spawn()
        .expect("spawn");
    let stats = h.stats().clone();
    wait_for(120, "the first batch", || {
        stats.batches_sent.load(Ordering::Relaxed) >= 1
    });
    let paused = h.pause();
    assert!(
        paused.wait_until(std::time::Instant::now() + Duration::from_secs(60)),
        "the forwarder settles what it holds"
    );
    assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0);
    let cursor = store.get_cursor("central").expect("cursor").unwrap_or(0);
    let lost: Vec<u64> = rows
        .iter()
        .filter(|r| r.seq > cursor && r.window_start_ns < cut)
        .map(|r| r.seq)
        .collect();
    assert!(
        lost.len() > 2000,
        "the trim must land in the backlog (cursor {cursor})"
    );
    // Held: nothing moves while paused.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stats.cursor.load(Ordering::Relaxed), cursor);
    let trimmed = store.trim(cut).expect("trim");
    drop(paused);
    wait_for(300, "the backlog drained", || {
        stats.cursor.load(Ordering::Relaxed) == top
    });
    h.stop();
    assert!(trimmed.rows >= lost.len() as u64);
    let want: Vec<_> = rows
        .into_iter()
        .filter(|r| lost.binary_search(&r.seq).is_err())
        .collect();
    assert_exactly(&influx, "fwd", &want);
}
