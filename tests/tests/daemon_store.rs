//! Rollups into the daemon's own Tarantool, end to end (root, real Tarantool 2.6): the
//! windows the store holds equal the frames the daemon published, window by window, and a
//! window is complete only when it is whole.
mod common;

use std::{
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use common::{plain, Run, TempDir};
use linkpulse_sink::store::{LocalConfig, Store};
use linkpulse_testbed::{
    traffic::{UdpFlow, UdpSink},
    ModemKind, TestbedOptions,
};

#[test]
fn rollups_in_the_store_equal_the_frames() {
    let store_dir = TempDir::new("lpsto-db");
    let mut run = Run::start_full(
        "lpsto",
        vec![
            plain("wwan0", ModemKind::Veth),
            plain("wwan1", ModemKind::Tun),
        ],
        &[],
        TestbedOptions::default(),
        None,
        Some(store_dir.0.clone()),
    );
    let rtr = run.bed.router_ns().to_string();
    let (r, s) = run.bed.modem_addr_v4(0);
    let dst = SocketAddr::new(s.into(), 9800);
    let _sink = UdpSink::new(run.bed.server_ns(), dst, None)
        .start()
        .expect("sink");
    let flow = UdpFlow::new(&rtr, "wwan0", r.into(), dst, 1000, 700)
        .start()
        .expect("flow");
    // Tarantool starts beside the pipeline; wait (generously) for rollups to land.
    let t = Instant::now();
    while run.daemon().shared().store.written.load(Ordering::Relaxed) < 2 * 8 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no rollups written within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    flow.stop().expect("flow");
    run.settle(Duration::from_millis(700));
    assert!(run.daemon().shared().store.up.load(Ordering::Relaxed));
    run.stop_daemon();

    let store = Store::start_local(LocalConfig::new(&store_dir.0)).expect("reopen the store");
    let rows = store.read_after(0, 100_000).expect("read rollups");
    store.stop();
    let seen = run.seen.lock().expect("seen");
    let mut complete = 0;
    let mut identities = std::collections::BTreeSet::new();
    for r in &rows {
        assert!(
            identities.insert((r.link_id, r.window_start_ns, r.boot_tag)),
            "identity stored twice: {r:?}"
        );
        assert_eq!(r.window_ns, 500_000_000);
        assert_eq!(
            r.window_start_ns % 500_000_000,
            0,
            "windows are epoch-aligned"
        );
        let key = |d: usize| (r.link_id as usize, d, r.window_start_ns as i64);
        let down = seen.per_window.get(&key(0)).copied().unwrap_or_default();
        let up = seen.per_window.get(&key(1)).copied().unwrap_or_default();
        // Every stored window (complete or not) holds exactly what the frames carried.
        assert_eq!(
            (r.rx_bytes, r.rx_packets),
            (down.bytes, down.packets),
            "{r:?}"
        );
        assert_eq!((r.tx_bytes, r.tx_packets), (up.bytes, up.packets), "{r:?}");
        if r.complete {
            complete += 1;
            let mean = r.tx_bytes as f64 * 8.0 / 0.5;
            assert!((r.tx_rate_mean_bps - mean).abs() < 1.0);
            assert!(
                r.tx_rate_peak_bps >= r.tx_rate_p99_bps && r.tx_rate_p99_bps >= r.tx_rate_p50_bps
            );
        }
    }
    let link0_traffic: u64 = rows
        .iter()
        .filter(|r| r.link_id == 0)
        .map(|r| r.tx_packets)
        .sum();
    assert!(
        link0_traffic > 1000,
        "the flow's windows are there: {link0_traffic} packets"
    );
    assert!(
        complete >= 8,
        "complete windows: {complete} of {}",
        rows.len()
    );
    assert!(
        rows.iter().any(|r| !r.complete),
        "the first window (joined mid-way) is partial"
    );
}
