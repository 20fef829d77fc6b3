//! Backfill speed, printed (not asserted): an unpaced forwarder draining 200k rollups from the
//! real store into a real influxd, and its peer in the same run: a plain bulk writer posting the
//! same line protocol (pre-encoded, gzip level 1, 5,000 points a request) without the store,
//! i.e. InfluxDB's own ingest ceiling on this machine. Both must land every point.

mod forward_support;

use flate2::write::GzEncoder;
use forward_support::*;
use linkpulse_sink::forward::{EncodeStats, Encoder, Forwarder};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Instant;

const POINTS: u64 = 200_000;
const LINKS: u32 = 16;

#[test]
fn unpaced_backfill_against_a_plain_bulk_writer() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    let influx = Influx::start(false);
    influx.exec("CREATE DATABASE fwd");
    influx.exec("CREATE DATABASE peer");

    let rows = rollups(LINKS, 0..POINTS / u64::from(LINKS), 1);
    let t = Instant::now();
    for chunk in rows.chunks(5000) {
        store.put_rollups(chunk).expect("put");
    }
    println!("stored {} rollups in {:?}", rows.len(), t.elapsed());
    let top = all_rows(&store).last().expect("rows").seq;

    let cfg = v1_config("central", &influx, "fwd", dir.path());
    assert_eq!(cfg.max_bytes_per_s, None, "unpaced");
    let t = Instant::now();
    let h = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .spawn()
        .expect("spawn");
    wait_for(600, "backfill", || {
        store.get_cursor("central").expect("cursor") == Some(top)
    });
    let fwd_s = t.elapsed().as_secs_f64();
    let s = h.stats().clone();
    h.stop();
    assert_eq!(s.points_sent.load(Ordering::Relaxed), POINTS);
    assert_eq!(s.errors_total(), 0);

    // The peer: the same lines, encoded and compressed before the clock starts.
    let enc = Encoder::new(ROUTER, SITE);
    let mut st = EncodeStats::default();
    let bodies: Vec<Vec<u8>> = rows
        .chunks(5000)
        .map(|chunk| {
            let mut lines = Vec::new();
            for r in chunk {
                enc.encode(r, &mut lines, &mut st);
            }
            let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::new(1));
            gz.write_all(&lines).expect("gzip");
            gz.finish().expect("gzip")
        })
        .collect();
    let t = Instant::now();
    for b in &bodies {
        let (status, body) = influx.write("peer", b, true);
        assert_eq!(status, 204, "{body}");
    }
    let peer_s = t.elapsed().as_secs_f64();

    assert_eq!(influx.count("fwd"), POINTS);
    assert_eq!(influx.count("peer"), POINTS);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "backfill ({profile} build): forwarder {POINTS} points in {fwd_s:.2} s = {:.0} points/s \
         ({} batches, {} B line protocol, {} B gzip); peer bulk writer {:.2} s = {:.0} points/s",
        POINTS as f64 / fwd_s,
        s.batches_sent.load(Ordering::Relaxed),
        s.bytes_raw.load(Ordering::Relaxed),
        s.bytes_gzip.load(Ordering::Relaxed),
        peer_s,
        POINTS as f64 / peer_s
    );
}
