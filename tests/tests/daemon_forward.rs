//! Store and forward, end to end (root, real Tarantool 2.6 and InfluxDB 1.6.7): the daemon runs in
//! the testbed's router namespace with traffic on two modems and forwards its rollups to an
//! influxd in the server namespace (reached over modem 0). influxd is killed for a multi-window
//! outage and restarted; afterwards InfluxDB holds exactly the local store's rollups of the whole
//! run (every window of every link, none twice, values equal), and /metrics showed the outage.
mod common;
#[path = "common/influx.rs"]
mod influx;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{plain, Run, TempDir};
use influx::{diff_point, Influx};
use linkpulse_sink::store::{LocalConfig, Store};
use linkpulse_testbed::{
    traffic::{UdpFlow, UdpSink},
    ModemKind, TestbedOptions,
};

const DB: &str = "fleet";
const DEST: &str = "central";
/// Long enough for dozens of 500 ms windows to pile up, and for the forwarder's backoff to
/// reach its ceiling.
const OUTAGE: Duration = Duration::from_secs(30);

/// A gauge or counter of `/metrics` with the given label set (e.g. `{destination="central"}`).
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = format!("{name}{labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn central_influxdb_outage_loses_and_doubles_nothing() {
    let store_dir = TempDir::new("lpfwd-db");
    let influx_dir = TempDir::new("lpfwd-influx");
    // The server end of modem 0 (198.18.0.1) is where influxd listens.
    let (_, srv0) = linkpulse_testbed::topology::addr_v4(0);
    let toml = format!(
        "[[forward]]\nname = \"{DEST}\"\nurl = \"http://{srv0}:8086\"\ndatabase = \"{DB}\"\nbatch_points = 500\ntimeout_s = 5\npace_share = 0.5\n"
    );
    let mut run = Run::start_toml(
        "lpfwd",
        vec![
            plain("wwan0", ModemKind::Veth),
            plain("wwan1", ModemKind::Tun),
        ],
        &[],
        TestbedOptions::default(),
        None,
        Some(store_dir.0.clone()),
        &toml,
    );
    let mut central = Influx::start(run.bed.server_ns(), srv0, influx_dir.0.join("influx"), DB);
    let rtr = run.bed.router_ns().to_string();
    let mut flows = Vec::new();
    let mut sinks = Vec::new();
    for k in 0..2 {
        let (r, s) = run.bed.modem_addr_v4(k);
        let dst = SocketAddr::new(s.into(), 9800);
        sinks.push(
            UdpSink::new(run.bed.server_ns(), dst, None)
                .start()
                .expect("sink"),
        );
        flows.push(
            UdpFlow::new(&rtr, format!("wwan{k}"), r.into(), dst, 500, 600)
                .start()
                .expect("flow"),
        );
    }
    let dest = format!("{{destination=\"{DEST}\"}}");
    // Forwarding works before the outage.
    wait_for(90, "the first points in InfluxDB", || {
        central.count(DB) > 20
    });
    let (_, m) = common::http_get(&run, "/metrics");
    assert_eq!(metric(&m, "linkpulse_forward_up", &dest), Some(1.0), "{m}");
    for name in [
        "linkpulse_forward_backlog_rows",
        "linkpulse_forward_backlog_age_seconds",
        "linkpulse_forward_points_total",
        "linkpulse_forward_parked_points_total",
    ] {
        assert!(metric(&m, name, &dest).is_some(), "{name} missing:\n{m}");
    }
    for name in [
        "linkpulse_store_rows",
        "linkpulse_store_lost_rows_total",
        "linkpulse_store_lost_ranges_total",
    ] {
        assert!(metric(&m, name, "").is_some(), "{name} missing:\n{m}");
    }

    // The outage: influxd killed mid-run; the rollups keep coming into the store.
    central.kill();
    let down_at = Instant::now();
    let mut backlog_seen = 0.0f64;
    let mut age_seen = 0.0f64;
    let mut down_seen = false;
    while down_at.elapsed() < OUTAGE {
        std::thread::sleep(Duration::from_secs(2));
        let (_, m) = common::http_get(&run, "/metrics");
        backlog_seen =
            backlog_seen.max(metric(&m, "linkpulse_forward_backlog_rows", &dest).unwrap_or(0.0));
        age_seen =
            age_seen.max(metric(&m, "linkpulse_forward_backlog_age_seconds", &dest).unwrap_or(0.0));
        down_seen |= metric(&m, "linkpulse_forward_up", &dest) == Some(0.0);
    }
    let (_, m) = common::http_get(&run, "/metrics");
    let connect_errors = metric(
        &m,
        "linkpulse_forward_errors_total",
        &format!("{{destination=\"{DEST}\",class=\"connect\"}}"),
    )
    .unwrap_or(0.0);
    assert!(
        down_seen,
        "forward_up never went to 0 during the outage:\n{m}"
    );
    assert!(connect_errors >= 1.0, "no connect errors counted:\n{m}");
    // 2 links × 2 windows/s × 30 s (the gauges refresh at least every 5 s).
    assert!(
        backlog_seen >= 90.0,
        "backlog during the outage: {backlog_seen}"
    );
    assert!(
        age_seen >= 10.0,
        "backlog age during the outage: {age_seen}"
    );

    // Back: the forwarder catches up on its own (backoff ≤ 30 s).
    central.spawn();
    let back_at = Instant::now();
    wait_for(120, "the backlog to drain after the outage", || {
        let (_, m) = common::http_get(&run, "/metrics");
        metric(&m, "linkpulse_forward_up", &dest) == Some(1.0)
            && metric(&m, "linkpulse_forward_backlog_rows", &dest).unwrap_or(1e9) < 10.0
    });
    eprintln!(
        "outage {OUTAGE:?}: backlog up to {backlog_seen} rows (age {age_seen} s), drained {:?} after influxd returned",
        back_at.elapsed()
    );
    for f in flows {
        f.stop().expect("flow");
    }
    std::thread::sleep(Duration::from_secs(2));
    run.stop_daemon();
    central.kill();
    central.spawn();

    // The store after the run: every row, and how far the destination's cursor got.
    let store = Store::start_local(LocalConfig::new(&store_dir.0)).expect("reopen the store");
    let cursor = store.get_cursor(DEST).expect("cursor").expect("a cursor");
    let mut rows = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_after(after, 5000).expect("read_after");
        let Some(last) = page.last() else { break };
        after = last.seq;
        rows.extend(page);
    }
    store.stop();
    let (sent, unsent): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.seq <= cursor);
    // A clean stop lets a destination that is up take the last windows.
    assert!(
        unsent.is_empty(),
        "{} rows never forwarded before the daemon stopped (cursor {cursor})",
        unsent.len()
    );

    // No window missing in the store: per link, consecutive windows from the first to the last.
    let mut per_link: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for r in &rows {
        per_link
            .entry(r.link_id)
            .or_default()
            .push(r.window_start_ns);
    }
    assert_eq!(per_link.len(), 2, "both links have rollups");
    for (link, w) in &mut per_link {
        w.sort_unstable();
        for pair in w.windows(2) {
            assert_eq!(
                pair[1] - pair[0],
                500_000_000,
                "link {link}: windows {} and {} are not consecutive",
                pair[0],
                pair[1]
            );
        }
        // The whole run: from before the outage to after it.
        let span = Duration::from_nanos(w[w.len() - 1] - w[0]);
        assert!(
            span > OUTAGE + Duration::from_secs(10),
            "link {link}: {span:?}"
        );
    }

    // InfluxDB: exactly the forwarded rows, values equal.
    let got = central.points(DB);
    let mut want = BTreeMap::new();
    for r in &sent {
        let key = (
            r.link_id.to_string(),
            r.boot_tag.to_string(),
            r.window_start_ns,
        );
        assert!(
            want.insert(key, *r).is_none(),
            "the store repeats an identity"
        );
    }
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| {
            !want.contains_key(*k)
                && !unsent.iter().any(|r| {
                    (
                        r.link_id.to_string(),
                        r.boot_tag.to_string(),
                        r.window_start_ns,
                    ) == **k
                })
        })
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} points in InfluxDB, {} forwarded rows; missing e.g. {missing:?}, extra e.g. {extra:?}",
        got.len(),
        want.len()
    );
    let mut outage_rows = 0;
    let killed_ns = linkpulse::clock::realtime_ns() - (down_at.elapsed().as_nanos() as u64);
    for (k, r) in &want {
        if let Some(d) = diff_point(&got[k], r, "e2e", "lab") {
            panic!("point {k:?}: {d}");
        }
        if r.window_start_ns >= killed_ns
            && r.window_start_ns < killed_ns + OUTAGE.as_nanos() as u64
        {
            outage_rows += 1;
        }
    }
    assert!(
        outage_rows >= 2 * 2 * 25,
        "rows measured during the outage and delivered after it: {outage_rows}"
    );
    eprintln!(
        "{} rows in the store, {} forwarded and equal in InfluxDB ({outage_rows} measured during the outage), {} stored after the forwarder stopped",
        rows.len(),
        want.len(),
        unsent.len()
    );
}

/// Retention by age removes rows the destination never had: the ranges (per link) are recorded,
/// shown in /metrics and /api/v1/events, and sent to the destination as `linkpulse_lost` points
/// once it is reachable; rows it already had and recent rows are not reported.
#[test]
fn retention_records_lost_ranges_and_sends_them_when_the_destination_returns() {
    const W: u64 = 500_000_000;
    let store_dir = TempDir::new("lpret-db");
    let influx_dir = TempDir::new("lpret-influx");
    // Before the daemon: 100 windows × 2 links three days old, the first 50 windows
    // acknowledged by the destination, and 20 windows of link 0 an hour old.
    let now = linkpulse::clock::realtime_ns() / W * W;
    let old = now - 3 * 86_400 * 1_000_000_000;
    let recent = now - 3_600 * 1_000_000_000;
    let row = |link: u32, start: u64| linkpulse_sink::store::Rollup {
        link_id: link,
        window_start_ns: start,
        boot_tag: 7,
        window_ns: W,
        complete: true,
        tx_bytes: start / W % 1000,
        ..Default::default()
    };
    {
        let store = Store::start_local(LocalConfig::new(&store_dir.0)).expect("store");
        let batch: Vec<_> = (0..100)
            .flat_map(|w| (0..2).map(move |l| row(l, old + w * W)))
            .collect();
        store.put_rollups(&batch).expect("put old");
        let recent_rows: Vec<_> = (0..20).map(|w| row(0, recent + w * W)).collect();
        store.put_rollups(&recent_rows).expect("put recent");
        let rows = store.read_after(0, 1000).expect("read");
        assert_eq!(rows.len(), 220);
        store.set_cursor(DEST, rows[99].seq).expect("cursor");
        store.stop();
    }
    let (_, srv0) = linkpulse_testbed::topology::addr_v4(0);
    let toml = format!(
        "retention_days = 1\n[[forward]]\nname = \"{DEST}\"\nurl = \"http://{srv0}:8086\"\ndatabase = \"{DB}\"\ntimeout_s = 5\n"
    );
    let run = Run::start_toml(
        "lpret",
        vec![plain("wwan0", ModemKind::Veth)],
        &[],
        TestbedOptions::default(),
        None,
        Some(store_dir.0.clone()),
        &toml,
    );
    // The destination is down while retention runs (first pass ~5 s after the store is up).
    wait_for(90, "lost ranges in /metrics", || {
        let (_, m) = common::http_get(&run, "/metrics");
        metric(&m, "linkpulse_store_lost_rows_total", "") == Some(100.0)
    });
    let (_, m) = common::http_get(&run, "/metrics");
    assert_eq!(
        metric(&m, "linkpulse_store_lost_ranges_total", ""),
        Some(2.0),
        "{m}"
    );
    let (_, events) = common::http_get(&run, "/api/v1/events");
    assert_eq!(events.matches("\"rollups_lost\"").count(), 2, "{events}");
    let lost = std::fs::read_to_string(store_dir.0.join("lost-ranges.log")).expect("lost log");
    let mut ranges: Vec<serde_json::Value> = lost
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    ranges.sort_by_key(|v| v["link_id"].as_u64());
    for (link, r) in ranges.iter().enumerate() {
        assert_eq!(r["link_id"], link as u64, "{lost}");
        assert_eq!(r["rows"], 50, "{lost}");
        assert_eq!(r["from_ns"], old + 50 * W, "{lost}");
        assert_eq!(r["to_ns"], old + 99 * W, "{lost}");
        assert_eq!(r["destination"], DEST, "{lost}");
    }

    // The destination returns: it gets the two events, the recent rows and the live ones,
    // nothing of the trimmed ones.
    let central = Influx::start(run.bed.server_ns(), srv0, influx_dir.0.join("influx"), DB);
    let mut points = serde_json::Value::Null;
    wait_for(120, "linkpulse_lost points in InfluxDB", || {
        points = central.query(DB, "SELECT * FROM linkpulse_lost");
        points["results"][0]["series"][0]["values"]
            .as_array()
            .is_some_and(|v| v.len() == 2)
    });
    let s = &points["results"][0]["series"][0];
    let cols: Vec<&str> = s["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c.as_str().expect("name"))
        .collect();
    let col = |name: &str| cols.iter().position(|c| *c == name).expect(name);
    for v in s["values"].as_array().expect("values") {
        assert_eq!(v[col("rows")], 50, "{points}");
        assert_eq!(v[col("time")], old + 50 * W, "{points}");
        assert_eq!(v[col("to_ns")], old + 99 * W, "{points}");
        assert_eq!(v[col("router")], "e2e", "{points}");
    }
    wait_for(60, "the recent rows in InfluxDB", || {
        central
            .points(DB)
            .keys()
            .filter(|(_, boot, _)| boot == "7")
            .count()
            == 20
    });
    let got = central.points(DB);
    assert!(
        got.keys().all(|(_, _, t)| *t >= recent),
        "a trimmed row reached InfluxDB"
    );
    let (_, m) = common::http_get(&run, "/metrics");
    assert_eq!(
        metric(&m, "linkpulse_store_lost_rows_total", ""),
        Some(100.0),
        "{m}"
    );
}
