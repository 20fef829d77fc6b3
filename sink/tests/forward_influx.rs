//! The forwarder against a real Tarantool store and a real InfluxDB 1.6.7, both started by the
//! test on loopback and killed on drop.

mod forward_support;

use forward_support::*;
use linkpulse_sink::forward::{ErrorClass, ForwardError, Forwarder, Kind, Step};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const DB: &str = "lp";

#[test]
fn rows_arrive_exactly_once_with_equal_values_and_replays_change_nothing() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    let influx = Influx::start(false);
    influx.exec(&format!("CREATE DATABASE {DB}"));

    // 8 links × 400 windows, plus the same windows of 2 links under another boot tag (measured
    // again after a backward clock step): distinct identities, so distinct points.
    let mut rows = rollups(8, 0..400, 1);
    rows.extend(rollups(2, 0..50, 2));
    for chunk in rows.chunks(160) {
        store.put_rollups(chunk).expect("put");
    }
    let mut cfg = v1_config("central", &influx, DB, dir.path());
    cfg.batch_points = 500;
    let fwd = Forwarder::new(cfg, store.clone()).expect("forwarder");
    let h = fwd.spawn().expect("spawn");
    let top = all_rows(&store).last().expect("rows").seq;
    wait_for(60, "cursor at the last row", || {
        store.get_cursor("central").expect("cursor") == Some(top)
    });
    assert_exactly(&influx, DB, &all_rows(&store));
    let s = h.stats();
    let n = rows.len() as u64;
    assert_eq!(s.points_sent.load(Ordering::Relaxed), n);
    assert_eq!(s.batches_sent.load(Ordering::Relaxed), n.div_ceil(500));
    assert_eq!(s.backlog.load(Ordering::Relaxed), 0);
    let (raw, gz) = (
        s.bytes_raw.load(Ordering::Relaxed),
        s.bytes_gzip.load(Ordering::Relaxed),
    );
    println!("{n} points: {raw} bytes of line protocol, {gz} gzip'ed");
    assert!(
        gz * 4 < raw,
        "gzip should shrink line protocol: {raw} -> {gz}"
    );

    // Replay everything (cursor reset, as `resync` does): same points, none added.
    store.set_cursor("central", 0).expect("reset cursor");
    h.kick();
    wait_for(60, "replay to finish", || {
        s.points_sent.load(Ordering::Relaxed) == 2 * n
            && store.get_cursor("central").expect("cursor") == Some(top)
    });
    assert_exactly(&influx, DB, &all_rows(&store));

    // The same identities put again (new seqs, same values): sent again, still one point each.
    store.put_rollups(&rows[..300]).expect("put again");
    let top2 = all_rows(&store).last().expect("rows").seq;
    assert!(top2 > top);
    h.kick();
    wait_for(60, "re-put rows to be sent", || {
        store.get_cursor("central").expect("cursor") == Some(top2)
    });
    assert_eq!(influx.count(DB), n);
    assert_exactly(&influx, DB, &all_rows(&store));
    h.stop();
}

#[test]
fn influxd_down_for_a_while_nothing_missing_nothing_doubled_cursor_only_on_2xx() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    let mut influx = Influx::start(false);
    influx.exec(&format!("CREATE DATABASE {DB}"));

    let mut cfg = v1_config("central", &influx, DB, dir.path());
    cfg.batch_points = 200;
    cfg.timeout = Duration::from_secs(2);
    let h = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .spawn()
        .expect("spawn");
    let s = h.stats().clone();

    // The daemon's pace, faster: 4 links per window, one put per window.
    let producer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for w in 0..300u64 {
                store.put_rollups(&rollups(4, w..w + 1, 1)).expect("put");
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    wait_for(30, "some rows forwarded", || {
        s.points_sent.load(Ordering::Relaxed) >= 100
    });
    influx.kill();
    let killed_at = Instant::now();
    // Whatever was in flight settles within one request timeout; after that the cursor must stay
    // put while rows keep arriving and the forwarder keeps failing.
    std::thread::sleep(Duration::from_millis(2500));
    let cursor = store.get_cursor("central").expect("cursor");
    let errors = s.errors_total();
    assert!(errors > 0, "no failure counted while influxd is down");
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(store.get_cursor("central").expect("cursor"), cursor);
    }
    assert!(
        s.errors(ErrorClass::Connect) > 0,
        "connection refused counts as connect errors"
    );
    assert!(s.backlog.load(Ordering::Relaxed) > 0);
    producer.join().expect("producer");
    println!(
        "influxd down {:?}: {} failed attempts, backlog {} rows",
        killed_at.elapsed(),
        s.errors_total(),
        s.backlog.load(Ordering::Relaxed)
    );

    influx.spawn();
    h.kick();
    let top = all_rows(&store).last().expect("rows").seq;
    wait_for(60, "backlog forwarded after the restart", || {
        store.get_cursor("central").expect("cursor") == Some(top)
    });
    let all = all_rows(&store);
    assert_eq!(all.len(), 1200);
    assert_exactly(&influx, DB, &all);
    h.stop();
}

#[test]
fn a_kick_ends_a_long_backoff() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    let mut influx = Influx::start(false);
    influx.exec(&format!("CREATE DATABASE {DB}"));
    influx.kill();
    store.put_rollups(&rollups(4, 0..10, 1)).expect("put");

    let mut cfg = v1_config("central", &influx, DB, dir.path());
    // Without the kick, the next attempt would come 60 s (at least 30 s) after the failure.
    cfg.backoff_min = Duration::from_secs(60);
    cfg.backoff_max = Duration::from_secs(60);
    let h = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .spawn()
        .expect("spawn");
    wait_for(10, "the first failure", || h.stats().errors_total() > 0);
    influx.spawn();
    let t = Instant::now();
    h.kick();
    wait_for(10, "delivery after the kick", || {
        store.get_cursor("central").expect("cursor").is_some()
    });
    println!("delivered {:?} after the kick", t.elapsed());
    assert_exactly(&influx, DB, &all_rows(&store));
    h.stop();
}

#[test]
fn a_400_batch_is_parked_counted_and_the_forwarder_goes_on() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    let influx = Influx::start(false);
    influx.exec(&format!("CREATE DATABASE {DB}"));
    // rx_bytes as a float in the shard of T0's week: every point there with the integer rx_bytes
    // is a field type conflict.
    let (status, body) = influx.write(
        DB,
        format!("linkpulse_rollup,boot=0,link=999 rx_bytes=1.5 {T0}\n").as_bytes(),
        false,
    );
    assert_eq!(status, 204, "{body}");

    // 40 days later: other shards.
    let later = 40 * 86_400 * 2;
    let a = rollups(4, later..later + 25, 1);
    let b = rollups(4, 0..25, 1);
    let c = rollups(4, later + 25..later + 50, 1);
    for seg in [&a, &b, &c] {
        store.put_rollups(seg).expect("put");
    }
    let seqs: Vec<u64> = all_rows(&store).iter().map(|r| r.seq).collect();
    let mut cfg = v1_config("central", &influx, DB, dir.path());
    cfg.batch_points = 100;
    let mut fwd = Forwarder::new(cfg.clone(), store.clone()).expect("forwarder");
    let steps: Vec<Step> = (0..4).map(|_| fwd.step().expect("step")).collect();
    assert!(
        matches!(steps[0], Step::Sent { points: 100, .. }),
        "{steps:?}"
    );
    assert_eq!(
        steps[1],
        Step::Parked {
            points: 100,
            first_seq: seqs[100],
            last_seq: seqs[199]
        }
    );
    assert!(
        matches!(steps[2], Step::Sent { points: 100, .. }),
        "{steps:?}"
    );
    assert_eq!(steps[3], Step::Idle);
    assert_eq!(
        store.get_cursor("central").expect("cursor"),
        Some(seqs[299])
    );

    let parked = fwd.parked().expect("parked log");
    assert_eq!(parked.len(), 1);
    assert_eq!(
        (parked[0].first_seq, parked[0].last_seq),
        (seqs[100], seqs[199])
    );
    assert_eq!((parked[0].points, parked[0].status), (100, 400));
    assert!(
        parked[0].message.contains("partial write") && parked[0].message.contains("conflict"),
        "{}",
        parked[0].message
    );
    assert_eq!(fwd.stats().parked_batches.load(Ordering::Relaxed), 1);
    assert_eq!(fwd.stats().parked_points.load(Ordering::Relaxed), 100);
    // The count survives a restart of the forwarder.
    let again = Forwarder::new(cfg, store.clone()).expect("forwarder");
    assert_eq!(again.stats().parked_points.load(Ordering::Relaxed), 100);

    influx.exec_in(DB, "DROP SERIES FROM linkpulse_rollup WHERE link = '999'");
    let mut sent = a.clone();
    sent.extend(c.iter().cloned());
    let stored: Vec<_> = all_rows(&store)
        .into_iter()
        .filter(|r| r.window_start_ns > T0 + 86_400_000_000_000)
        .collect();
    assert_eq!(stored.len(), sent.len());
    assert_exactly(&influx, DB, &stored);
}

#[test]
fn wrong_database_credentials_or_endpoint_give_errors_that_name_the_fix() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    store.put_rollups(&rollups(2, 0..5, 1)).expect("put");

    // Unknown database: 404.
    let open = Influx::start(false);
    let mut fwd = Forwarder::new(v1_config("nodb", &open, "nodb", dir.path()), store.clone())
        .expect("forwarder");
    let e = fwd.step().expect_err("unknown database");
    let text = e.to_string();
    println!("{text}");
    assert!(matches!(e, ForwardError::DatabaseNotFound { .. }), "{e:?}");
    assert!(
        text.contains("`nodb`") && text.contains("CREATE DATABASE \"nodb\""),
        "{text}"
    );
    assert_eq!(e.class(), ErrorClass::NotFound);
    assert_eq!(store.get_cursor("nodb").expect("cursor"), None);

    // v2 write API against 1.6.7 (which has none): the URL has no write endpoint.
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").expect("token file");
    let mut cfg = v1_config("v2", &open, "x", dir.path());
    cfg.kind = Kind::V2 {
        org: "o".into(),
        bucket: "b".into(),
        token_file: token,
    };
    let e = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .step()
        .expect_err("no /api/v2/write on 1.6.7");
    println!("{e}");
    assert!(matches!(e, ForwardError::EndpointNotFound { .. }), "{e:?}");

    // Authentication enabled: a wrong password, and none at all, are 401.
    let secured = Influx::start(true);
    secured.exec(&format!("CREATE DATABASE {DB}"));
    let mut cfg = v1_config("badpass", &secured, DB, dir.path());
    if let Kind::V1 { auth: Some(a), .. } = &mut cfg.kind {
        a.password = "wrong".into();
    }
    let e = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .step()
        .expect_err("wrong password");
    let text = e.to_string();
    println!("{text}");
    assert!(matches!(e, ForwardError::Auth { status: 401, .. }), "{e:?}");
    assert!(
        text.contains("refused the credentials") && text.contains("password"),
        "{text}"
    );
    let mut cfg = v1_config("noauth", &secured, DB, dir.path());
    cfg.kind = Kind::V1 {
        db: DB.into(),
        auth: None,
    };
    let e = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .step()
        .expect_err("no credentials");
    assert!(e.to_string().contains("authentication enabled"), "{e}");
    // The right ones work on the same server.
    let mut ok = Forwarder::new(v1_config("good", &secured, DB, dir.path()), store.clone())
        .expect("forwarder");
    assert!(matches!(
        ok.step().expect("step"),
        Step::Sent { points: 10, .. }
    ));

    // Nothing listening: a connect error.
    let mut cfg = v1_config("refused", &open, DB, dir.path());
    cfg.url = format!("http://127.0.0.1:{}", free_port());
    let e = Forwarder::new(cfg, store.clone())
        .expect("forwarder")
        .step()
        .expect_err("refused");
    println!("{e}");
    assert_eq!(e.class(), ErrorClass::Connect, "{e:?}");

    // The loop counts each failure by class and keeps the cursor where it was.
    let h = fwd.spawn().expect("spawn");
    wait_for(10, "404s counted", || {
        h.stats().errors(ErrorClass::NotFound) >= 2
    });
    assert_eq!(store.get_cursor("nodb").expect("cursor"), None);
    h.stop();
}

#[test]
fn bad_settings_are_refused_up_front() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    let influx_url = "http://127.0.0.1:9";
    let base = || {
        linkpulse_sink::forward::ForwardConfig::new(
            "d",
            influx_url,
            Kind::V1 {
                db: "x".into(),
                auth: None,
            },
            ROUTER,
            dir.path(),
        )
    };
    let refuse = |cfg: linkpulse_sink::forward::ForwardConfig, needle: &str| {
        let e = Forwarder::new(cfg, store.clone())
            .err()
            .unwrap_or_else(|| panic!("accepted a config that should mention {needle}"));
        assert!(e.to_string().contains(needle), "{e}");
    };
    let mut c = base();
    c.batch_points = 5001;
    refuse(c, "batch_points");
    for n in [0, linkpulse_sink::forward::MAX_IN_FLIGHT + 1] {
        let mut c = base();
        c.max_in_flight = n;
        refuse(c, "max_in_flight");
    }
    let mut c = base();
    c.name = "a/b".into();
    refuse(c, "destination name");
    let mut c = base();
    c.router = String::new();
    refuse(c, "router");
    let mut c = base();
    c.url = "influx:8086".into();
    refuse(c, "http://");
    let mut c = base();
    c.kind = Kind::V2 {
        org: "o".into(),
        bucket: "b".into(),
        token_file: dir.path().join("missing"),
    };
    refuse(c, "token file");
    assert!(Forwarder::new(base(), store.clone()).is_ok());
}

/// A resync (the cursor set back from outside, as `linkpulse resync` does) while a batch is on
/// the wire: the answer to that older batch must not move the cursor past the resync point. The
/// forwarder goes on from there and sends everything after it again.
#[test]
fn an_answer_on_the_wire_does_not_overtake_a_resync() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(&dir.path().join("store"));
    let influx = Influx::start(false);
    influx.exec(&format!("CREATE DATABASE {DB}"));
    store.put_rollups(&rollups(4, 0..75, 1)).expect("put");
    let rows = all_rows(&store);
    let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    let mut cfg = v1_config("central", &influx, DB, dir.path());
    cfg.batch_points = 100;
    cfg.max_in_flight = 1;
    let mut fwd = Forwarder::new(cfg, store.clone()).expect("forwarder");
    let stats = fwd.stats();
    let first = fwd.step().expect("step 1");
    assert!(
        matches!(first, Step::Sent { last_seq, .. } if last_seq == seqs[99]),
        "{first:?}"
    );
    // influxd frozen: the second batch's request stays on the wire while the cursor is reset.
    let frozen = influx.freeze();
    let stepping = std::thread::spawn(move || {
        let step = fwd.step();
        (fwd, step)
    });
    wait_for(30, "the second batch on the wire", || {
        stats.in_flight.load(Ordering::Relaxed) == 1
    });
    store.set_cursor("central", 0).expect("resync");
    drop(frozen);
    let (mut fwd, step) = stepping.join().expect("step thread");
    assert_eq!(
        step.expect("step 2"),
        Step::Superseded {
            points: 100,
            first_seq: seqs[100],
            last_seq: seqs[199]
        }
    );
    assert_eq!(
        store.get_cursor("central").expect("cursor"),
        Some(0),
        "the older answer overtook the resync"
    );
    let mut again = 0;
    loop {
        match fwd.step().expect("step") {
            Step::Sent { points, .. } => again += points,
            Step::Idle => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        again, 300,
        "everything after the resync point is sent again"
    );
    assert_eq!(
        store.get_cursor("central").expect("cursor"),
        Some(seqs[299])
    );
    assert_exactly(&influx, DB, &rows);
}
