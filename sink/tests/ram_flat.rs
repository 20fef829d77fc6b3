//! RAM stays flat during an outage (real Tarantool 2.6): with the central side unreachable and
//! its forwarder retrying, hours of 16-link rollups (115,200 rows an hour, 500 ms windows) are
//! put through the daemon's write path (`put_rollups`, batches of 500) faster than real time.
//! The RSS of the supervised Tarantool plus this process (which holds the store client and the
//! forwarder, as the daemon does) grows by less than 2 MB per hour of data, measured over six
//! hours after a warm-up of eight that brings vinyl's write buffer and cache to their bounds.
//! (It grew ~6 MiB per hour before the instance got a fixed malloc mmap threshold and schema
//! v2; see `sink/src/store/supervisor.rs` and `schema.rs`.)

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
    // What the instance holds in RAM, by part: printed with the figures so a failure says where
    // the growth went.
    let memory = || -> String {
        let (s,): (String,) = store
            .client()
            .eval(
                "local v = box.stat.vinyl() \
                 return require('json').encode({level0 = v.memory.level0, \
                 tuple_cache = v.memory.tuple_cache, page_index = v.memory.page_index, \
                 bloom_filter = v.memory.bloom_filter, lua = box.info.memory().lua})",
                &[(); 0],
            )
            .expect("eval box.stat.vinyl()");
        s
    };
    // Vinyl's dumps and compactions hold buffers only while they run: RSS is sampled when the
    // scheduler is idle, so a sample shows what stays, not a compaction caught mid-way.
    let quiet_rss = || -> (u64, u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (busy,): (u64,) = store
                .client()
                .eval(
                    "local s = box.stat.vinyl().scheduler \
                     return s.tasks_inprogress + s.compaction_queue",
                    &[(); 0],
                )
                .expect("eval scheduler");
            if busy == 0 || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        (rss_kib(tarantool), rss_kib(me))
    };
    // Warm-up: eight hours, which bring vinyl's write buffer and page cache to their bounds.
    // Then six measured hours. One hour alone is a noisy figure: compactions grow in size
    // with the history and each leaves the allocator a little more (steps of 1-5 MiB a few
    // hours apart), so the growth per hour is the least-squares slope over the six hours.
    // `LINKPULSE_RAM_FLAT_HOURS` measures more hours (the README's 21-hour figure).
    const WARM_UP: u64 = 8;
    let measured: u64 = std::env::var("LINKPULSE_RAM_FLAT_HOURS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    put_hours(0, WARM_UP);
    let memory_before = memory();
    let mut samples = vec![quiet_rss()];
    for h in WARM_UP..WARM_UP + measured {
        put_hours(h, 1);
        samples.push(quiet_rss());
    }
    let memory_after = memory();
    let totals: Vec<f64> = samples.iter().map(|(t, c)| (t + c) as f64).collect();
    let n = totals.len() as f64;
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = totals.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, y) in totals.iter().enumerate() {
        let dx = i as f64 - mean_x;
        sxy += dx * (y - mean_y);
        sxx += dx * dx;
    }
    let slope_kib = sxy / sxx;
    let errors = fwd.stats().errors_connect.load(Ordering::Relaxed);
    let sent = fwd.stats().points_sent.load(Ordering::Relaxed);
    fwd.stop();
    eprintln!(
        "RSS (tarantool + client, KiB) after {WARM_UP} h and each of the next {measured} hours: {samples:?}; growth {slope_kib:.0} KiB per hour (least squares; {errors} connect errors, {sent} points sent)\nstore memory before: {memory_before}\nstore memory after:  {memory_after}"
    );
    assert!(errors > 0, "the forwarder kept trying during the outage");
    assert_eq!(sent, 0);
    assert!(
        slope_kib < 2048.0,
        "RSS grew by {slope_kib:.0} KiB per hour of 16 links"
    );
}
