//! RAM stays flat during an outage (real Tarantool 2.6): with the central side unreachable and
//! its forwarder retrying, one hour of 16-link rollups (115,200 rows, 500 ms windows) is put
//! through the daemon's write path (`put_rollups`, batches of 500) faster than real time. The
//! RSS of the supervised Tarantool plus this process (which holds the store client and the
//! forwarder, as the daemon does) grows by less than 2 MB over that hour, measured after a
//! warm-up of eight hours that brings vinyl's write buffer and cache to their bounds. (It grew
//! ~6 MiB per hour before the instance got a fixed malloc mmap threshold and schema v2; see
//! `sink/src/store/supervisor.rs` and `schema.rs`.)

mod forward_support;

use forward_support::*;
use linkpulse_sink::forward::{ForwardConfig, Forwarder, Kind};
use std::sync::atomic::Ordering;
use std::time::Duration;

const LINKS: u32 = 16;
/// Windows per hour at 500 ms.
const HOUR: u64 = 7200;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn an_hour_of_16_links_during_an_outage_keeps_rss_flat() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    // The central side is down: nothing listens on this port.
    let port = free_port();
    let mut cfg = ForwardConfig::new(
        "central",
        format!("http://127.0.0.1:{port}"),
        Kind::V1 {
            db: "x".into(),
            auth: None,
        },
        ROUTER,
        dir.path(),
    );
    cfg.backoff_max = Duration::from_millis(500);
    let fwd = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .spawn()
        .expect("spawn");
    let tarantool = store.supervised_pid().expect("tarantool pid");
    let me = std::process::id();
    let mut batch = Vec::with_capacity(500);
    let mut put_hours = |from: u64, hours: u64| {
        for w in from * HOUR..(from + hours) * HOUR {
            for l in 0..LINKS {
                batch.push(rollup(l, w, 1));
                if batch.len() == 500 {
                    store.put_rollups(&batch).expect("put");
                    batch.clear();
                }
            }
        }
    };
    put_hours(0, 8);
    std::thread::sleep(Duration::from_secs(2));
    let before = (rss_kib(tarantool), rss_kib(me));
    put_hours(8, 1);
    std::thread::sleep(Duration::from_secs(2));
    let after = (rss_kib(tarantool), rss_kib(me));
    let errors = fwd.stats().errors_connect.load(Ordering::Relaxed);
    let sent = fwd.stats().points_sent.load(Ordering::Relaxed);
    fwd.stop();
    let growth_kib = (after.0 + after.1) as i64 - (before.0 + before.1) as i64;
    eprintln!(
        "RSS after 8 h: tarantool {} KiB + client {} KiB; after 9 h: {} + {} KiB; growth over the last hour {growth_kib} KiB ({} connect errors, {sent} points sent)",
        before.0, before.1, after.0, after.1, errors
    );
    assert!(errors > 0, "the forwarder kept trying during the outage");
    assert_eq!(sent, 0);
    assert!(
        growth_kib < 2048,
        "RSS grew by {growth_kib} KiB over one hour of 16 links"
    );
}
