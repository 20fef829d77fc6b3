//! Backfill correctness (real store, real influxd): an unpaced forwarder drains a backlog of many
//! full batches — the path where the next batch is read, encoded and gzip'ed while the current
//! request is in flight — while new rows keep arriving and influxd is killed and restarted in
//! the middle. InfluxDB then holds exactly the store's rows with equal values. The speed of a
//! 24 h, 16-link backfill against a plain bulk writer is a benchmark figure
//! (`cargo xtask bench -- --only backfill`), not a test.

mod forward_support;

use forward_support::*;
use linkpulse_sink::forward::Forwarder;
use std::sync::atomic::Ordering;
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
    let h = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .spawn()
        .expect("spawn");
    let stats = h.stats().clone();
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
