//! The supervised store against a real Tarantool 2.6, started in a temp dir. `Store`'s drop stops
//! the instance, also when a test panics.

mod common;

use linkpulse_sink::store::{LocalConfig, Rollup, Store, StoreError, Trimmed, SCHEMA_VERSION};
use std::path::Path;
use std::time::Instant;

const T0: u64 = 1_790_000_000_000_000_000; // 2026-09, epoch ns, a multiple of 500 ms
const W: u64 = 500_000_000;

fn rollup(link: u32, window: u64, boot: u64) -> Rollup {
    let x = window as f64;
    Rollup {
        link_id: link,
        window_start_ns: T0 + window * W,
        boot_tag: boot,
        seq: 0,
        window_ns: W,
        complete: window % 7 != 0,
        link_state: 1,
        clock_state: 1,
        clock_error_ns: 1500 + window % 100,
        rx_bytes: window * 1000 + u64::from(link),
        tx_bytes: window * 10,
        rx_packets: window,
        tx_packets: window / 2,
        rx_rate_mean_bps: x * 1.5,
        rx_rate_peak_bps: x * 3.25,
        rx_rate_p50_bps: x,
        rx_rate_p95_bps: x * 2.0,
        rx_rate_p99_bps: x * 2.5,
        tx_rate_mean_bps: 0.0,
        tx_rate_peak_bps: 1e9,
        tx_rate_p50_bps: 0.125,
        tx_rate_p95_bps: 7.0,
        tx_rate_p99_bps: 8.5,
        rtt_min_ns: (window % 3 != 0).then_some(20_000_000),
        rtt_mean_ns: (window % 3 != 0).then_some(25_000_000 + window),
        rtt_max_ns: None,
        rtt_p50_ns: Some(u64::MAX),
        rtt_p99_ns: (window % 2 == 0).then_some(window),
        probes_sent_fwd: 10,
        probes_lost_fwd: (window % 4) as u32,
        probes_sent_bwd: 9,
        probes_lost_bwd: 0,
        ..v4_fields(window)
    }
}

/// The schema v4 fields of a test row: TCP RTT in 4 windows of 5, one-way delays (some
/// negative) in 5 of 6.
fn v4_fields(window: u64) -> Rollup {
    let tcp = window % 5;
    let owd = (window % 6) as u32;
    let up = 10_000_000 - (window % 7) as i64 * 3_000_000;
    Rollup {
        tcp_rtt_samples: tcp,
        tcp_rtt_min_ns: (tcp > 0).then_some(30_000_000 + window % 11),
        tcp_rtt_mean_ns: (tcp > 0).then_some(35_000_000 + window % 13),
        tcp_rtt_max_ns: (tcp > 0).then_some(40_000_000 + window % 17),
        owd_samples: owd,
        owd_up_mean_ns: (owd > 0).then_some(up),
        owd_up_max_ns: (owd > 0).then_some(up + 1_000),
        owd_down_mean_ns: (owd > 0).then_some(15_000_000 + (window % 19) as i64),
        owd_down_max_ns: (owd > 0).then_some(16_000_000 + (window % 23) as i64),
        owd_error_ns: (owd > 0).then_some(500_000 + window % 3),
        ..Rollup::default()
    }
}

fn start(dir: &Path) -> Store {
    common::init_tracing();
    Store::start_local(LocalConfig::new(dir)).expect("start local store")
}

/// Open flags of the WAL file (`*.xlog`) the instance writes to, from /proc/PID/fdinfo; `None`
/// while no xlog is open (after a snapshot, the next write opens one).
fn xlog_flags(pid: u32) -> Option<u32> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir");
    for fd in fds {
        let fd = fd.expect("fd");
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if target.extension().is_some_and(|e| e == "xlog") {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .expect("fdinfo");
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .expect("flags line");
            return Some(u32::from_str_radix(flags.trim(), 8).expect("octal flags"));
        }
    }
    None
}

/// True while `pid` runs; a zombie (an orphan its new parent has not reaped yet) is dead.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Every row after `after`, paging like the forwarder.
fn read_all(store: &Store, mut after: u64) -> Vec<Rollup> {
    let mut out = Vec::new();
    loop {
        let page = store.read_after(after, 5000).expect("read_after");
        let Some(last) = page.last() else { return out };
        after = last.seq;
        out.extend(page);
    }
}

#[test]
fn put_100k_rollups_in_batches_and_read_them_back_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start(dir.path());
    assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
    let links = 16u32;
    let windows = 100_000 / u64::from(links);
    let mut all = Vec::with_capacity(100_000);
    for w in 0..windows {
        for l in 0..links {
            all.push(rollup(l, w, 1));
        }
    }
    let t = Instant::now();
    let mut last = 0;
    for batch in all.chunks(500) {
        let r = store.put_rollups(batch).expect("put");
        assert_eq!(r.rows, batch.len() as u64);
        assert!(r.last_seq > last, "seq grows across batches");
        last = r.last_seq;
    }
    let dt = t.elapsed();
    println!(
        "put: {} rows in batches of 500, one call at a time: {:.2} s = {:.0} rows/s",
        all.len(),
        dt.as_secs_f64(),
        all.len() as f64 / dt.as_secs_f64()
    );

    let t = Instant::now();
    let back = read_all(&store, 0);
    let dt = t.elapsed();
    println!(
        "read_after: {} rows in pages of 5000: {:.2} s = {:.0} rows/s",
        back.len(),
        dt.as_secs_f64(),
        back.len() as f64 / dt.as_secs_f64()
    );
    assert_eq!(back.len(), all.len());
    for (i, (got, want)) in back.iter().zip(&all).enumerate() {
        assert_eq!(got.seq, i as u64 + 1, "seq is the insertion order");
        let mut want = want.clone();
        want.seq = got.seq;
        assert_eq!(got, &want, "row {i}");
    }
    let pid = store.supervised_pid().expect("running");
    println!("tarantool RSS after 100k rows: {} KiB", rss_kib(pid));
    // Paging from the middle starts right after the given seq.
    let page = store.read_after(50_000, 3).expect("page");
    assert_eq!(
        page.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [50_001, 50_002, 50_003]
    );
}

#[test]
fn pipelined_puts_from_several_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start(dir.path());
    let threads = 4u32;
    let per_thread = 25_000u64;
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..threads {
            let store = &store;
            s.spawn(move || {
                let rows: Vec<Rollup> = (0..per_thread).map(|w| rollup(th, w, 1)).collect();
                for b in rows.chunks(500) {
                    store.put_rollups(b).expect("put");
                }
            });
        }
    });
    let dt = t.elapsed();
    let total = u64::from(threads) * per_thread;
    println!(
        "put: {total} rows in batches of 500 from {threads} threads on one connection: {:.2} s = {:.0} rows/s",
        dt.as_secs_f64(),
        total as f64 / dt.as_secs_f64()
    );
    let back = read_all(&store, 0);
    assert_eq!(back.len() as u64, total);
    // Concurrent puts never share a seq.
    assert!(back.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[test]
fn replace_is_idempotent_and_boot_tag_keeps_identities_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start(dir.path());
    let a = rollup(3, 10, 1);
    store.put_rollups(std::slice::from_ref(&a)).expect("put");
    let mut a2 = a.clone();
    a2.rx_bytes += 1;
    store
        .put_rollups(std::slice::from_ref(&a2))
        .expect("put again");
    let rows = read_all(&store, 0);
    assert_eq!(rows.len(), 1, "same identity twice -> one row");
    assert_eq!(rows[0].rx_bytes, a2.rx_bytes, "the later put wins");

    // The same identity twice within one batch: one row, the later one.
    let mut a3 = a.clone();
    a3.rx_bytes += 2;
    store
        .put_rollups(&[a2.clone(), a3.clone()])
        .expect("put duplicate in batch");
    let rows = read_all(&store, 0);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].rx_bytes, a3.rx_bytes);

    // Same link and timestamp after a clock step back, new boot tag: a second row.
    let b = rollup(3, 10, 2);
    store.put_rollups(&[b]).expect("put other boot");
    let rows = read_all(&store, 0);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows.iter().map(|r| r.boot_tag).collect::<Vec<_>>(), [1, 2]);

    // A bad row fails the whole batch (one transaction): nothing of it is stored.
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Row<'a> {
        Good(&'a Rollup),
        Bad((u32, &'a str)),
    }
    let good = rollup(4, 2, 1);
    let batch = vec![Row::Good(&good), Row::Bad((4, "not a rollup"))];
    let err = store
        .client()
        .call::<_, (u64, u64)>("lp_put_rollups", &(batch,))
        .unwrap_err();
    assert!(err.server_code().is_some(), "{err}");
    assert_eq!(
        read_all(&store, 0).len(),
        2,
        "failed batch left nothing behind"
    );
}

#[test]
fn read_range_returns_one_links_windows_in_time_order_and_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start(dir.path());
    // Interleaved links, and a second boot tag (a backward clock step) over windows 5..8.
    let mut rows: Vec<Rollup> = (0..20u64)
        .flat_map(|w| (0..3u32).map(move |l| rollup(l, w, 1)))
        .collect();
    rows.extend((5..8u64).map(|w| rollup(1, w, 2)));
    store.put_rollups(&rows).expect("put");
    let got = store
        .read_range(1, T0 + 4 * W, T0 + 10 * W, 100)
        .expect("range");
    let keys: Vec<(u64, u64)> = got
        .iter()
        .map(|r| ((r.window_start_ns - T0) / W, r.boot_tag))
        .collect();
    assert_eq!(
        keys,
        [
            (4, 1),
            (5, 1),
            (5, 2),
            (6, 1),
            (6, 2),
            (7, 1),
            (7, 2),
            (8, 1),
            (9, 1)
        ]
    );
    assert!(got.iter().all(|r| r.link_id == 1));
    assert_eq!(
        got[0],
        Rollup {
            seq: got[0].seq,
            ..rollup(1, 4, 1)
        }
    );
    // Paging: limit 6 ends inside window 5's two rows: the page takes both.
    let page = store.read_range(1, T0, T0 + 20 * W, 6).expect("page");
    assert_eq!(page.len(), 7);
    assert_eq!((page[6].window_start_ns - T0) / W, 5);
    let next = store
        .read_range(1, page[6].window_start_ns + 1, T0 + 20 * W, 100)
        .expect("next");
    assert_eq!(page.len() + next.len(), 23);
    assert!(store
        .read_range(7, T0, u64::MAX, 10)
        .expect("none")
        .is_empty());
    assert!(store
        .read_range(1, T0 + 30 * W, T0 + 40 * W, 10)
        .expect("after")
        .is_empty());
}

#[test]
fn concurrent_puts_of_the_same_identities_leave_one_row_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start(dir.path());
    // Two writers race over the same 4000 identities (each batch reads, then writes). The identity
    // must stay unique whether the instance serialises the batches or vinyl aborts one of two
    // conflicting transactions (the store retries it).
    std::thread::scope(|s| {
        for writer in 0..2u64 {
            let store = &store;
            s.spawn(move || {
                let rows: Vec<Rollup> = (0..1000u64)
                    .flat_map(|w| {
                        (0..4u32).map(move |l| Rollup {
                            tx_bytes: writer,
                            ..rollup(l, w, 1)
                        })
                    })
                    .collect();
                for b in rows.chunks(100) {
                    store.put_rollups(b).expect("put");
                }
            });
        }
    });
    let rows = read_all(&store, 0);
    let mut ids: Vec<_> = rows
        .iter()
        .map(|r| (r.link_id, r.window_start_ns, r.boot_tag))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4000);
    assert_eq!(rows.len(), 4000, "one row per identity");
}

#[test]
fn cursor_and_rows_survive_kill_9_and_the_client_reconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start(dir.path());
    assert_eq!(store.get_cursor("central").expect("get"), None);
    let r = store
        .put_rollups(&(0..100).map(|w| rollup(0, w, 1)).collect::<Vec<_>>())
        .expect("put");
    store.set_cursor("central", 77).expect("set");
    store.set_cursor("backup", 12).expect("set");
    assert_eq!(store.get_cursor("central").expect("get"), Some(77));

    let pid = store.supervised_pid().expect("running");
    let o_sync = libc::O_SYNC as u32;
    let flags = xlog_flags(pid).expect("an xlog is open after writes");
    assert_eq!(flags & o_sync, o_sync, "fsync mode: the xlog is O_SYNC");
    // SAFETY: plain syscall on the pid of the instance this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    // The next calls reconnect (and retry) once the supervisor has restarted the instance.
    let t = Instant::now();
    assert_eq!(
        store.get_cursor("central").expect("get after kill"),
        Some(77)
    );
    println!(
        "kill -9 -> answered again after {:.3} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(store.get_cursor("backup").expect("get"), Some(12));
    let new_pid = store.supervised_pid().expect("restarted");
    assert_ne!(new_pid, pid);
    assert_eq!(store.restarts(), 1);
    assert_eq!(read_all(&store, 0).len(), 100);
    // seq continues after the restart (rebuilt from the stored rows).
    let r2 = store
        .put_rollups(&[rollup(0, 1000, 1)])
        .expect("put after restart");
    assert_eq!(r2.last_seq, r.last_seq + 1);
    // fsync mode holds after a restart from kill -9 too (init.lua's write + snapshot).
    let flags = xlog_flags(new_pid).expect("an xlog is open after the put");
    assert_eq!(
        flags & o_sync,
        o_sync,
        "xlog of the restarted instance is not O_SYNC (flags {flags:o})"
    );

    // A clean stop and a new start on the same data dir keep everything; no migration re-runs.
    store.stop();
    assert!(!alive(new_pid), "stop() leaves no instance behind");
    let store = start(dir.path());
    assert_eq!(store.get_cursor("central").expect("get"), Some(77));
    assert_eq!(read_all(&store, 0).len(), 101);
    // A clean stop is where 2.6.0 leaves the xlog it reopens without O_SYNC (seen on this
    // machine): without the workaround this check fails.
    store
        .put_rollups(&[rollup(0, 1001, 1)])
        .expect("put after stop/start");
    let pid = store.supervised_pid().expect("running");
    let flags = xlog_flags(pid).expect("an xlog is open after the put");
    assert_eq!(
        flags & o_sync,
        o_sync,
        "xlog after a clean restart is not O_SYNC (flags {flags:o})"
    );
    assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
}

#[test]
fn kill_9_during_puts_loses_no_acknowledged_row_and_doubles_none() {
    use linkpulse_sink::tarantool::Error as ClientError;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    let dir = tempfile::tempdir().expect("tempdir");
    common::init_tracing();
    let mut cfg = LocalConfig::new(dir.path());
    // Kills come faster than a healthy run: keep the backoff from growing to seconds.
    cfg.restart_backoff_max = std::time::Duration::from_millis(400);
    let mut store = Store::start_local(cfg).expect("start local store");
    // Surface every failure to this test, which retries like a producer would.
    store.set_retry_for(std::time::Duration::ZERO);
    let done = AtomicBool::new(false);
    let acked = Mutex::new(Vec::new());
    let (mut in_flight, mut refused) = (0u32, 0u32);
    let kills = 6;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let (mut in_flight, mut refused) = (0, 0);
            let mut batch = 0u64;
            while !done.load(Ordering::Relaxed) {
                // 112 rows = 7 windows x 16 links, a fresh identity range per batch.
                let rows: Vec<Rollup> = (0..112u64)
                    .map(|i| rollup((i % 16) as u32, batch * 7 + i / 16, 1))
                    .collect();
                loop {
                    match store.put_rollups(&rows) {
                        Ok(_) => break,
                        Err(StoreError::Request { source, .. }) if source.is_retryable() => {
                            // Lost with the request on the wire vs. instance not back yet.
                            match source {
                                ClientError::Disconnected { .. } => in_flight += 1,
                                _ => refused += 1,
                            }
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                        Err(e) => panic!("put: {e}"),
                    }
                }
                acked.lock().expect("lock").push(batch);
                batch += 1;
            }
            (in_flight, refused)
        });
        let mut last = 0;
        for _ in 0..kills {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let t = Instant::now();
            let pid = loop {
                match store.supervised_pid() {
                    Some(p) if p != last => break p,
                    _ => {
                        assert!(t.elapsed().as_secs() < 20, "instance not restarted");
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            };
            // Kill only an instance that took writes again (a ready one, not one still starting).
            let before = acked.lock().expect("lock").len();
            while acked.lock().expect("lock").len() < before + 2 {
                assert!(
                    t.elapsed().as_secs() < 30,
                    "no write acknowledged after the restart"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // SAFETY: plain syscall on the pid of the instance this test started.
            assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
            last = pid;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        done.store(true, Ordering::Relaxed);
        (in_flight, refused) = writer.join().expect("writer");
    });
    store.set_retry_for(std::time::Duration::from_secs(15));
    let acked = acked.into_inner().expect("lock");
    let rows = read_all(&store, 0);
    let mut ids: Vec<_> = rows
        .iter()
        .map(|r| (r.window_start_ns, r.link_id, r.boot_tag))
        .collect();
    ids.sort_unstable();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "an identity stored twice");
    for b in &acked {
        for i in 0..112u64 {
            let want = (T0 + (b * 7 + i / 16) * W, (i % 16) as u32, 1);
            assert!(
                ids.binary_search(&want).is_ok(),
                "acknowledged row {want:?} lost"
            );
        }
    }
    println!(
        "kill -9 x {kills} during puts: {} batches acknowledged, {} rows stored, {in_flight} puts cut \
         in flight, {refused} refused while restarting; 0 lost, 0 doubled",
        acked.len(),
        rows.len()
    );
    assert_eq!(store.restarts(), kills);
    assert!(
        in_flight > 0,
        "no kill landed during a put: the test did not test"
    );
}

#[test]
fn trim_deletes_the_oldest_prefix_and_seq_is_never_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start(dir.path());
    // Written as the daemon writes them: window after window, all links of a window together.
    let rows: Vec<Rollup> = (0..1000u64)
        .flat_map(|w| (0..3u32).map(move |l| rollup(l * 5, w, 1)))
        .collect();
    let mut last = 0;
    for b in rows.chunks(500) {
        last = store.put_rollups(b).expect("put").last_seq;
    }
    let cut = T0 + 400 * W;
    let t = store.trim(cut).expect("trim");
    assert_eq!(
        t,
        Trimmed {
            rows: 3 * 400,
            upto: 3 * 400
        }
    );
    let left = read_all(&store, 0);
    assert_eq!(left.len(), 3 * 600);
    assert!(left.iter().all(|r| r.window_start_ns >= cut));
    assert_eq!(left[0].seq, t.upto + 1);
    let again = store.trim(cut).expect("trim again");
    assert_eq!(
        again,
        Trimmed {
            rows: 0,
            upto: t.upto
        },
        "idempotent"
    );

    // A row newer than the cut stops the trim even if older ones follow it (a prefix only).
    let late = store.put_rollups(&[rollup(9, 0, 2)]).expect("late put");
    assert_eq!(store.trim(T0 + 999 * W).expect("trim").upto, last - 3);
    assert_eq!(read_all(&store, 0).len(), 3 + 1);

    // Trim everything, restart: new rows must still get seqs above every seq ever handed out,
    // or a destination whose cursor is there would skip them.
    let all = store.trim(u64::MAX).expect("trim all");
    assert_eq!(all.upto, late.last_seq);
    assert!(read_all(&store, 0).is_empty());
    store.stop();
    let store = start(dir.path());
    let r = store.put_rollups(&[rollup(1, 1, 1)]).expect("put");
    assert_eq!(r.last_seq, late.last_seq + 1);
    assert_eq!(store.trim(0).expect("trim nothing").upto, late.last_seq);
}

#[test]
fn an_external_instance_gets_the_same_migration() {
    let server = common::TestServer::tcp();
    let store = Store::connect_external(server.config()).expect("external");
    assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
    assert_eq!(store.supervised_pid(), None);
    store.put_rollups(&[rollup(1, 1, 1)]).expect("put");
    drop(store);
    // Migrating again is a no-op and keeps the data.
    let store = Store::connect_external(server.config()).expect("external again");
    assert_eq!(read_all(&store, 0).len(), 1);

    // A migration cut short (here: version not recorded, one function missing) is run again
    // over what exists: it is idempotent and completes the schema.
    let _: (bool,) = store
        .client()
        .eval(
            "box.schema.func.drop('lp_trim') \
             box.space._linkpulse_meta:replace{'schema_version', 0} return true",
            &[(); 0],
        )
        .expect("undo part of v1");
    drop(store);
    let store = Store::connect_external(server.config()).expect("re-migrate");
    assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
    assert_eq!(store.trim(0).expect("lp_trim is back").rows, 0);
    assert_eq!(read_all(&store, 0).len(), 1, "data kept");

    // A schema from a newer build is refused, not downgraded.
    let _: (bool,) = store
        .client()
        .eval(
            "box.space._linkpulse_meta:replace{'schema_version', 99} return true",
            &[(); 0],
        )
        .expect("pretend a newer schema");
    let err = Store::connect_external(server.config())
        .err()
        .expect("must refuse");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

/// The body of the child process of `a_killed_owner_takes_its_instance_along`: does nothing unless
/// that test runs it with LP_SINK_OWNER_DIR set.
#[test]
fn helper_owner_process() {
    let Ok(dir) = std::env::var("LP_SINK_OWNER_DIR") else {
        return;
    };
    let store = start(Path::new(&dir));
    store
        .put_rollups(&(0..10).map(|w| rollup(2, w, 1)).collect::<Vec<_>>())
        .expect("put");
    println!("TARANTOOL_PID {}", store.supervised_pid().expect("running"));
    std::thread::sleep(std::time::Duration::from_secs(120));
}

#[test]
fn a_killed_owner_takes_its_instance_along() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut owner = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "helper_owner_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LP_SINK_OWNER_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn owner");
    let out = std::io::BufReader::new(owner.stdout.take().expect("stdout"));
    let pid: i32 = out
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.split_once("TARANTOOL_PID ")
                .map(|(_, p)| p.trim().to_owned())
        })
        .expect("owner reports its instance")
        .parse()
        .expect("pid");
    owner.kill().expect("kill -9 the owner");
    owner.wait().expect("reap owner");
    // A new owner starts at once (it waits for the old instance to release its pid file).
    let t = Instant::now();
    let store = start(dir.path());
    println!(
        "new owner ready {:.3} s after kill -9 of the old one",
        t.elapsed().as_secs_f64()
    );
    assert!(!alive(pid as u32), "the old instance died with its owner");
    assert_ne!(store.supervised_pid(), Some(pid as u32));
    assert_eq!(read_all(&store, 0).len(), 10);
}

#[test]
fn one_store_per_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _store = start(dir.path());
    let err = Store::start_local(LocalConfig::new(dir.path()))
        .err()
        .expect("second must fail");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
}

#[test]
fn missing_tarantool_binary_names_the_package() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = LocalConfig::new(dir.path());
    cfg.tarantool_bin = "/nonexistent/bin/tarantool".into();
    let err = Store::start_local(cfg).err().expect("must fail");
    assert!(matches!(err, StoreError::TarantoolMissing { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("apt-get install -y --no-install-recommends tarantool"),
        "{msg}"
    );
}

#[test]
fn a_failing_start_reports_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = LocalConfig::new(dir.path());
    // Below the arena 2.6 can boot with: box.cfg fails, the process exits.
    cfg.memtx_memory_mib = 1;
    let err = Store::start_local(cfg).err().expect("must fail");
    match &err {
        StoreError::StartFailed { tail, .. } => {
            assert!(
                tail.contains("memtx") || tail.contains("allocate"),
                "{tail}"
            )
        }
        other => panic!("expected StartFailed, got {other}"),
    }
}

/// Makes a directory unwritable even for root (immutable attribute), and undoes it on drop.
struct Immutable<'a>(&'a Path);
impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(self.0)
            .status();
    }
}

#[test]
fn an_unwritable_data_dir_gives_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let _guard = if root {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&data)
            .status()
            .expect("chattr (e2fsprogs)")
            .success();
        assert!(ok, "chattr +i failed on {}", data.display());
        Some(Immutable(&data))
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        None
    };
    let err = Store::start_local(LocalConfig::new(&data))
        .err()
        .expect("must fail");
    assert!(matches!(err, StoreError::DataDir { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&data.display().to_string()) && msg.contains("writable"),
        "{msg}"
    );

    // A path below a regular file is not usable either.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let err = Store::start_local(LocalConfig::new(file.join("sub")))
        .err()
        .expect("must fail");
    assert!(matches!(err, StoreError::DataDir { .. }), "{err}");
}

/// Every tier bucket of `link`, rebuilt in Rust from the raw rows (what the API does without
/// tiers), and as stored; the two must agree (floats: sums in another order, so a relative 1e-12).
fn check_tiers_match_rows(store: &Store, links: &[u32], span: (u64, u64)) -> usize {
    use linkpulse_sink::store::{TierRow, TIERS_NS};
    use std::collections::BTreeMap;
    let mut checked = 0;
    for &link in links {
        let mut rows = Vec::new();
        let mut from = span.0;
        loop {
            let page = store
                .read_range(link, from, span.1, 20_000)
                .expect("read_range");
            let Some(last) = page.last() else { break };
            from = last.window_start_ns + 1;
            rows.extend(page);
        }
        for w in TIERS_NS {
            let mut want: BTreeMap<(u64, u64), TierRow> = BTreeMap::new();
            for r in &rows {
                let start = r.window_start_ns - r.window_start_ns % w;
                let one = TierRow::from_rollup(r);
                want.entry((start, r.boot_tag))
                    .and_modify(|a| a.merge(&one))
                    .or_insert_with(|| TierRow {
                        tier_ns: w,
                        start_ns: start,
                        ..one.clone()
                    });
            }
            let got = store
                .read_tier(w, link, 0, u64::MAX, 1_000_000)
                .expect("read_tier");
            assert_eq!(got.len(), want.len(), "link {link} tier {w}: bucket count");
            for (g, (_, e)) in got.iter().zip(&want) {
                assert_eq!(g.tier_ns, w);
                assert_eq!(g.exact_part(), e.exact_part(), "link {link} tier {w}");
                for (a, b) in [
                    (g.rx_rate_wsum, e.rx_rate_wsum),
                    (g.tx_rate_wsum, e.tx_rate_wsum),
                    (g.rtt_wsum, e.rtt_wsum),
                    (g.tcp_rtt_wsum, e.tcp_rtt_wsum),
                    (g.owd_up_wsum, e.owd_up_wsum),
                    (g.owd_down_wsum, e.owd_down_wsum),
                ] {
                    assert!(
                        (a - b).abs() <= 1e-12 * a.abs().max(b.abs()),
                        "link {link} tier {w} bucket {}: {a} vs {b}",
                        g.start_ns
                    );
                }
                checked += 1;
            }
        }
    }
    checked
}

#[test]
fn tiers_equal_the_rows_through_replays_changes_clock_steps_rebuilds_and_trims() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start(dir.path());
    // 2.5 h of two links; T0 is not hour-aligned, so first and last buckets are partial.
    let n = 18_000u64;
    let rows: Vec<Rollup> = (0..n)
        .flat_map(|w| [rollup(1, w, 1), rollup(4, w, 1)])
        .collect();
    for b in rows.chunks(997) {
        store.put_rollups(b).expect("put");
    }
    // A replay of identical rows changes nothing.
    store.put_rollups(&rows[5000..7000]).expect("replay");
    // Changed rows (same identity): buckets are recomputed, a max may go down.
    let changed: Vec<Rollup> = rows[9000..9100]
        .iter()
        .map(|r| Rollup {
            rx_bytes: r.rx_bytes + 7,
            rx_rate_peak_bps: 1.0,
            rtt_min_ns: Some(1),
            complete: !r.complete,
            ..r.clone()
        })
        .collect();
    store.put_rollups(&changed).expect("change");
    // A backward clock step: the same window starts again under another boot tag.
    let stepped: Vec<Rollup> = (1000..1500).map(|w| rollup(1, w, 2)).collect();
    store.put_rollups(&stepped).expect("after step");
    let span = (0, u64::MAX);
    let t = Instant::now();
    let checked = check_tiers_match_rows(&store, &[1, 4], span);
    println!("{checked} buckets checked in {:?}", t.elapsed());
    assert!(checked > 1800, "{checked}");

    // The migration's build from rows stored before v2 gives the same buckets.
    let _: (bool,) = store
        .client()
        .eval(
            "box.space.tiers:truncate() box.space.tiers_build:truncate() \
             box.space._linkpulse_meta:replace{'schema_version', 1} return true",
            &[(); 0],
        )
        .expect("back to v1");
    store.stop();
    let t = Instant::now();
    let store = start(dir.path());
    println!("restart with the v2 migration and build: {:?}", t.elapsed());
    assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
    check_tiers_match_rows(&store, &[1, 4], span);
    // New puts after the build keep them in step.
    store
        .put_rollups(&[rollup(1, n, 1), rollup(1, n + 1, 1)])
        .expect("put after build");
    check_tiers_match_rows(&store, &[1, 4], span);

    // Retention: buckets that end at or before the cut go, the rest stay.
    let cut = T0 + 9000 * W;
    let gone = store.trim_tiers(cut).expect("trim tiers");
    assert!(gone > 0);
    for w in linkpulse_sink::store::TIERS_NS {
        for link in [1, 4] {
            let left = store
                .read_tier(w, link, 0, u64::MAX, 1_000_000)
                .expect("read_tier");
            assert!(left.iter().all(|b| b.start_ns + w > cut), "tier {w}");
            let first = left.first().expect("buckets after the cut");
            assert!(first.start_ns <= cut, "the straddling bucket stays");
        }
    }
    assert_eq!(store.trim_tiers(cut).expect("again"), 0, "idempotent");
}

/// Schema v3 → v4 on start: rows and tier buckets stored by v3 (shorter tuples, v3 formats)
/// keep working — read back without the v4 fields, their buckets equal to the rows — and puts
/// of new rows, replays and changed re-puts of old ones fold into those buckets exactly.
#[test]
fn migration_from_v3_keeps_old_rows_and_tiers_and_adds_the_new_fields() {
    use linkpulse_sink::store::{lua_format, FIELDS, FIELDS_V3, TIER_FIELDS};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start(dir.path());
    let n = 3000u64;
    let old: Vec<Rollup> = (0..n)
        .flat_map(|w| [rollup(1, w, 1), rollup(4, w, 1)])
        .collect();
    for b in old.chunks(500) {
        store.put_rollups(b).expect("put");
    }
    // Back to what v3 stored: tuples and formats without the v4 fields, version 3.
    let lua = format!(
        r#"
local function shorten(space, keep)
    local rows = space:select({{}}, {{limit = 1000000}})
    for i = 1, #rows, 1000 do
        box.begin()
        for j = i, math.min(i + 999, #rows) do
            local t = rows[j]:totable()
            for k = #t, keep + 1, -1 do t[k] = nil end
            space:replace(t)
        end
        box.commit()
    end
end
shorten(box.space.rollups, {v3})
shorten(box.space.tiers, 24)
box.space.rollups:format({{{rollups}}})
box.space.tiers:format({{{tiers}}})
box.space._linkpulse_meta:replace{{'schema_version', 3}}
return true
"#,
        v3 = FIELDS_V3,
        rollups = lua_format(&FIELDS[..FIELDS_V3]),
        tiers = lua_format(&TIER_FIELDS[..24]),
    );
    let _: (bool,) = store.client().eval(&lua, &[(); 0]).expect("back to v3");
    let (len,): (u32,) = store
        .client()
        .eval(
            "return #box.space.rollups:select({}, {limit = 1})[1]",
            &[(); 0],
        )
        .expect("tuple length");
    assert_eq!(len as usize, FIELDS_V3, "a v3 tuple");
    store.stop();

    let store = start(dir.path());
    assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
    // Old rows read back as before, without the v4 fields.
    let back = read_all(&store, 0);
    assert_eq!(back.len(), old.len());
    for (b, o) in back.iter().zip(&old) {
        let want = Rollup {
            seq: b.seq,
            tcp_rtt_samples: 0,
            tcp_rtt_min_ns: None,
            tcp_rtt_mean_ns: None,
            tcp_rtt_max_ns: None,
            owd_samples: 0,
            owd_up_mean_ns: None,
            owd_up_max_ns: None,
            owd_down_mean_ns: None,
            owd_down_max_ns: None,
            owd_error_ns: None,
            ..o.clone()
        };
        assert_eq!(b, &want);
    }
    let span = (0, u64::MAX);
    check_tiers_match_rows(&store, &[1, 4], span);
    // New windows in the old buckets, an old row put again unchanged (its v4 fields absent
    // before, now 0 / None: the bucket is recomputed, same figures), old rows changed with
    // their v4 fields, and a row put after a backward step.
    let mut puts: Vec<Rollup> = (n..n + 500).map(|w| rollup(1, w, 1)).collect();
    puts.push(Rollup {
        seq: 0,
        ..back[10].clone()
    });
    puts.extend((100..400).map(|w| rollup(4, w, 1)));
    puts.extend((100..110).map(|w| rollup(1, w, 2)));
    store.put_rollups(&puts).expect("put after the migration");
    let checked = check_tiers_match_rows(&store, &[1, 4], span);
    assert!(checked > 300, "{checked}");
    let tiers = store
        .read_tier(linkpulse_sink::store::TIERS_NS[2], 4, 0, u64::MAX, 100)
        .expect("read_tier");
    assert!(
        tiers
            .iter()
            .any(|t| t.tcp_rtt_samples > 0 && t.owd_samples > 0),
        "the re-put rows' v4 figures reach the hour tier: {tiers:?}"
    );
    let got = store
        .read_range(4, T0 + 100 * W, T0 + 101 * W, 10)
        .expect("read");
    assert_eq!(got.len(), 1);
    assert_eq!(
        Rollup {
            seq: 0,
            ..got[0].clone()
        },
        rollup(4, 100, 1)
    );
}

/// Every row of link 1 as stored, by (window, boot), for comparing raw reads.
fn link_rows(store: &Store, link: u32) -> Vec<Rollup> {
    let mut rows: Vec<Rollup> = read_all(store, 0)
        .into_iter()
        .filter(|r| r.link_id == link)
        .collect();
    rows.sort_by_key(|r| (r.window_start_ns, r.boot_tag));
    rows
}

/// `read_range` over [from, to) in pages of `limit`, as the API pages.
fn read_paged(store: &Store, link: u32, from: u64, to: u64, limit: u32) -> Vec<Rollup> {
    let mut out: Vec<Rollup> = Vec::new();
    let mut from = from;
    loop {
        let page = store.read_range(link, from, to, limit).expect("read_range");
        let n = page.len();
        if let Some(last) = page.last() {
            from = last.window_start_ns + 1;
        }
        out.extend(page);
        if n < limit as usize {
            return out;
        }
    }
}

fn assert_same_rows(got: &[Rollup], want: &[Rollup], what: &str) {
    let key = |r: &Rollup| ((r.window_start_ns - T0) / W, r.boot_tag, r.seq);
    assert_eq!(
        got.iter().map(key).collect::<Vec<_>>(),
        want.iter().map(key).collect::<Vec<_>>(),
        "{what}"
    );
    assert_eq!(got, want, "{what}");
}

/// Schema v5 reads raw rows through the 10 s buckets' seq ranges: rows written late (a window
/// put again unchanged or changed, a window first stored long after its neighbours, a clock
/// step) get a new, higher seq and must still be read, and so must rows whose bucket tier
/// retention removed (retention trims rows as a prefix of the seq order, so late rows stay).
#[test]
fn raw_reads_find_late_rows_and_rows_whose_bucket_was_trimmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start(dir.path());
    // Two links interleaved, one window per put as the daemon puts them; window 60 of link 1
    // is missing for now.
    let n = 1700u64;
    let mut batch = Vec::new();
    for w in 0..n {
        for l in [1, 2] {
            if (l, w) != (1, 60) {
                batch.push(rollup(l, w, 1));
            }
        }
        if batch.len() >= 40 {
            store.put_rollups(&batch).expect("put");
            batch.clear();
        }
    }
    store.put_rollups(&batch).expect("put");
    // Late: window 5 again unchanged, window 45 changed, window 60 at last, windows 50..52
    // under a new boot tag, and a recent window again unchanged (a narrow range).
    let late = vec![
        rollup(1, 5, 1),
        Rollup {
            rx_bytes: 7,
            ..rollup(1, 45, 1)
        },
        rollup(1, 60, 1),
        rollup(1, 50, 3),
        rollup(1, 51, 3),
        rollup(1, 52, 3),
        rollup(1, n - 3, 1),
    ];
    for r in &late {
        store
            .put_rollups(std::slice::from_ref(r))
            .expect("late put");
        store.put_rollups(&[rollup(2, n + 5, 1)]).expect("filler");
    }
    // One identity twice in one batch, unchanged, in a new bucket: the row kept has the
    // second seq.
    store
        .put_rollups(&[
            rollup(1, n + 10, 1),
            rollup(2, n + 10, 1),
            rollup(1, n + 10, 1),
        ])
        .expect("twice in a batch");
    let want = link_rows(&store, 1);
    assert_eq!(want.len() as u64, n + 4);
    let to = T0 + (n + 100) * W;
    assert_same_rows(
        &store.read_range(1, T0, to, 1_000_000).expect("read"),
        &want,
        "one page",
    );
    for limit in [1, 7, 33, 500] {
        assert_same_rows(
            &read_paged(&store, 1, T0, to, limit),
            &want,
            &format!("pages of {limit}"),
        );
    }
    // A range starting and ending inside buckets.
    let part: Vec<Rollup> = want
        .iter()
        .filter(|r| r.window_start_ns >= T0 + 43 * W && r.window_start_ns < T0 + 61 * W)
        .cloned()
        .collect();
    assert_same_rows(
        &read_paged(&store, 1, T0 + 43 * W, T0 + 61 * W, 5),
        &part,
        "inside buckets",
    );

    // Retention: rows go as a prefix of the seq order (windows 0..99), the late ones stay;
    // tier retention removes the buckets of windows 0..99, theirs included.
    let cut = T0 + 100 * W;
    store.trim(cut).expect("trim");
    assert!(store.trim_tiers(cut).expect("trim tiers") > 0);
    let want = link_rows(&store, 1);
    assert_eq!(
        want.iter()
            .filter(|r| r.window_start_ns < cut)
            .map(|r| (r.window_start_ns - T0) / W)
            .collect::<Vec<_>>(),
        [5, 45, 50, 51, 52, 60]
    );
    assert_same_rows(&read_paged(&store, 1, T0, to, 7), &want, "after retention");

    // The same store as v4 left it (no seq ranges, no cut): the v5 build restores both.
    let _: (bool,) = store
        .client()
        .eval(
            "for _, t in box.space.tiers:pairs() do \
                 local a = t:totable() a[35] = nil a[36] = nil box.space.tiers:replace(a) end \
             box.space.tiers_build:delete('seq_stop') box.space.tiers_build:delete('seq_done') \
             box.space._linkpulse_meta:delete('tiers_cut') \
             box.space._linkpulse_meta:replace{'schema_version', 4} return true",
            &[(); 0],
        )
        .expect("back to v4");
    store.stop();
    let store = start(dir.path());
    assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
    let tiers = store
        .read_tier(
            linkpulse_sink::store::TIERS_NS[0],
            1,
            0,
            u64::MAX,
            1_000_000,
        )
        .expect("read_tier");
    assert!(tiers
        .iter()
        .all(|t| t.seq_min.is_some() && t.seq_max.is_some()));
    assert_same_rows(
        &read_paged(&store, 1, T0, to, 7),
        &want,
        "after the v5 build",
    );
}
