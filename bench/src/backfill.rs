//! backfill.*: 24 h of 16 links of 500 ms rollups (2,764,800 rows) put into the real local store
//! (supervised Tarantool 2.6), then drained by the real forwarder, unpaced, into a real
//! InfluxDB 1.6.7 (both in a namespace of their own, over its loopback), with the forwarder's
//! default of requests in flight ([`DEFAULT_IN_FLIGHT`]), or each count given with
//! `--backfill-in-flight 1,2,3` over the same filled store (the databases are dropped between
//! counts; the first count gives the section's main figures). Peer, same run: a plain bulk writer
//! posting the same line protocol (encoded and gzip'ed before its clock starts, 5,000 points a
//! request, as many requests at once as the forwarder) to another database of the same influxd,
//! i.e. InfluxDB's own ingest ceiling here. Both must land every point. The forwarder's parts
//! are timed apart as well (a read-only scan of the store; encoding and gzip of what it read),
//! and the CPU time of influxd, of Tarantool and of this process during each phase, so that the
//! figure says where the time goes.
use std::{
    io::Write as _,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use flate2::write::GzEncoder;
use linkpulse_sink::{
    forward::{
        EncodeStats, Encoder, ForwardConfig, Forwarder, Kind, DEFAULT_IN_FLIGHT, MAX_BATCH_POINTS,
    },
    store::{LocalConfig, Rollup, Store},
};
use linkpulse_testbed::{influx::Influx, netns};

use crate::{net::BenchNet, report::Metric, Args};

const LINKS: u32 = 16;
/// 24 h of 500 ms windows.
const WINDOWS: u64 = 24 * 3600 * 2;
const W: u64 = 500_000_000;
/// 2026-09, a multiple of 500 ms.
const T0: u64 = 1_790_000_000_000_000_000;
const ROUTER: &str = "bench";
const SITE: &str = "lab";

/// A plausible rollup (values vary with link and window, RTTs mostly present).
fn rollup(link: u32, w: u64) -> Rollup {
    let x = (w % 977) as f64 * 1013.7 + f64::from(link) * 77.3;
    let rtt = 20_000_000 + (w * 7919 + u64::from(link) * 104_729) % 30_000_000;
    Rollup {
        link_id: link,
        window_start_ns: T0 + w * W,
        boot_tag: 1,
        window_ns: W,
        complete: true,
        link_state: 1,
        clock_state: 1,
        clock_error_ns: 1500 + w % 300,
        rx_bytes: (x * 62.5) as u64,
        tx_bytes: (x * 12.5) as u64,
        rx_packets: (x / 20.0) as u64,
        tx_packets: (x / 90.0) as u64,
        rx_rate_mean_bps: x * 1000.0,
        rx_rate_peak_bps: x * 2310.5,
        rx_rate_p50_bps: x * 950.25,
        rx_rate_p95_bps: x * 1800.125,
        rx_rate_p99_bps: x * 2200.0625,
        tx_rate_mean_bps: x * 200.0,
        tx_rate_peak_bps: x * 612.5,
        tx_rate_p50_bps: x * 180.75,
        tx_rate_p95_bps: x * 400.5,
        tx_rate_p99_bps: x * 580.25,
        rtt_min_ns: Some(rtt),
        rtt_mean_ns: Some(rtt + 2_000_000),
        rtt_max_ns: Some(rtt + 9_000_000),
        rtt_p50_ns: Some(rtt + 1_500_000),
        rtt_p99_ns: (!w.is_multiple_of(5)).then_some(rtt + 8_000_000),
        probes_sent_fwd: 20,
        probes_lost_fwd: u32::from(w.is_multiple_of(50)),
        probes_sent_bwd: 20,
        probes_lost_bwd: 0,
        ..Rollup::default()
    }
}

/// Rows `i..i + n` of the whole set, window-major as the daemon writes them.
fn rows(i: u64, n: u64, out: &mut Vec<Rollup>) {
    out.clear();
    out.extend((i..i + n).map(|k| rollup((k % u64::from(LINKS)) as u32, k / u64::from(LINKS))));
}

/// CPU seconds (user + system) so far of each named process, `None` when it is unknown.
fn cpu_times(procs: &[(&'static str, Option<u32>)]) -> Vec<(&'static str, Option<f64>)> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    procs
        .iter()
        .map(|&(name, pid)| {
            let secs = pid.and_then(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                // Fields after the command (which may hold spaces) in parentheses.
                let rest = stat.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
                Some(ticks / hz)
            });
            (name, secs)
        })
        .collect()
}

/// "influxd 1.2 cores, ..." over `secs` of wall time, and the machine's load average.
fn cpu_delta(
    before: &[(&'static str, Option<f64>)],
    after: &[(&'static str, Option<f64>)],
    secs: f64,
) -> String {
    let mut parts: Vec<String> = before
        .iter()
        .zip(after)
        .filter_map(|((name, a), (_, b))| {
            Some(format!(
                "{name} {:.2} cores",
                (b.as_ref()? - a.as_ref()?) / secs
            ))
        })
        .collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    parts.push(format!(
        "load {}",
        load.split_whitespace().next().unwrap_or("?")
    ));
    parts.join(", ")
}

fn gzip1(lines: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::new(1));
    gz.write_all(lines)?;
    Ok(gz.finish()?)
}

pub fn backfill(args: &Args) -> anyhow::Result<Vec<Metric>> {
    let total = WINDOWS * u64::from(LINKS);
    let net = BenchNet::up("b", 0)?;
    let dir = std::env::temp_dir().join(format!("lpbench-backfill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut in_flight = args.backfill_in_flight.clone();
    if in_flight.is_empty() {
        in_flight.push(DEFAULT_IN_FLIGHT);
    }
    let result = run(&net, &dir, total, &in_flight);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(net: &BenchNet, dir: &Path, total: u64, in_flight: &[u32]) -> anyhow::Result<Vec<Metric>> {
    let influx = Influx::start(
        &net.router,
        std::net::Ipv4Addr::LOCALHOST,
        dir.join("influx"),
        "fwd",
    )?;
    let store = Arc::new(Store::start_local(LocalConfig::new(dir.join("store")))?);

    // Fill the store (not timed as backfill).
    let t = Instant::now();
    let mut batch = Vec::with_capacity(5000);
    let mut top = 0;
    for i in (0..total).step_by(5000) {
        rows(i, 5000.min(total - i), &mut batch);
        top = store.put_rollups(&batch)?.last_seq;
    }
    let fill_s = t.elapsed().as_secs_f64();
    eprintln!("bench: backfill: {total} rows stored in {fill_s:.0} s");

    // Profile of the forwarder's parts, each alone: the store scan, then encoding and gzip.
    let enc = Encoder::new(ROUTER, SITE);
    let (mut read_s, mut encode_s, mut gzip_s, mut miniz_s) = (0.0, 0.0, 0.0, 0.0);
    let (mut after, mut lines, mut raw_bytes, mut gz_bytes) = (0, Vec::new(), 0usize, 0usize);
    loop {
        let t = Instant::now();
        let page = store.read_after(after, MAX_BATCH_POINTS)?;
        read_s += t.elapsed().as_secs_f64();
        let Some(last) = page.last() else { break };
        after = last.seq;
        let t = Instant::now();
        lines.clear();
        let mut st = EncodeStats::default();
        for r in &page {
            enc.encode(r, &mut lines, &mut st);
        }
        encode_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        gz_bytes += gzip1(&lines)?.len();
        gzip_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        std::hint::black_box(miniz_oxide::deflate::compress_to_vec(&lines, 1));
        miniz_s += t.elapsed().as_secs_f64();
        raw_bytes += lines.len();
    }

    // The peer's bodies: the same points, encoded and compressed before its clock starts.
    let mut bodies = Vec::new();
    for i in (0..total).step_by(MAX_BATCH_POINTS as usize) {
        rows(i, u64::from(MAX_BATCH_POINTS).min(total - i), &mut batch);
        lines.clear();
        let mut st = EncodeStats::default();
        for r in &batch {
            enc.encode(r, &mut lines, &mut st);
        }
        bodies.push(gzip1(&lines)?);
    }
    let profile = format!(
        "store filled in {fill_s:.0} s beforehand; parts alone: store scan {} ({read_s:.1} s), encode {} ({encode_s:.1} s), gzip {} ({gzip_s:.1} s; level 1 of miniz_oxide, flate2's default backend: {}, {miniz_s:.1} s); {:.0} B/point raw, {:.0} B/point gzip",
        rate(total, read_s),
        rate(total, encode_s),
        rate(total, gzip_s),
        rate(total, miniz_s),
        raw_bytes as f64 / total as f64,
        gz_bytes as f64 / total as f64
    );
    let mut out = Vec::new();
    for &n in in_flight {
        let m = forwarder_and_peer(net, dir, &influx, &store, top, total, n, &bodies, &profile)?;
        if n == in_flight[0] {
            out.extend(m);
        } else {
            // Further counts: the seconds only, named by the count.
            out.extend(m.into_iter().skip(1).map(|mut m| {
                // A handful per run: leaked for the report's `&'static str` names.
                m.name = Box::leak(format!("{}.in_flight_{n}", m.name).into_boxed_str());
                m
            }));
        }
    }
    drop(store);
    Ok(out)
}

fn rate(total: u64, secs: f64) -> String {
    format!("{:.0} k rows/s", total as f64 / secs / 1e3)
}

/// The forwarder (cursor `central-<n>`, database `fwd<n>`) with `n` requests in flight, then
/// the peer (database `peer<n>`) with `n` writers; both databases are dropped afterwards so
/// that the next count starts from the same InfluxDB.
#[allow(clippy::too_many_arguments)]
fn forwarder_and_peer(
    net: &BenchNet,
    dir: &Path,
    influx: &Influx,
    store: &Arc<Store>,
    top: u64,
    total: u64,
    n: u32,
    bodies: &[Vec<u8>],
    profile: &str,
) -> anyhow::Result<Vec<Metric>> {
    let (fwd_db, peer_db) = (format!("fwd{n}"), format!("peer{n}"));
    influx.exec(&format!("CREATE DATABASE {fwd_db}"))?;
    influx.exec(&format!("CREATE DATABASE {peer_db}"))?;
    // The forwarder, unpaced, in the namespace of the influxd it writes to.
    let mut cfg = ForwardConfig::new(
        format!("central-{n}"),
        influx.url(),
        Kind::V1 {
            db: fwd_db.clone(),
            auth: None,
        },
        ROUTER,
        dir,
    );
    cfg.site = SITE.into();
    cfg.max_bytes_per_s = None;
    cfg.max_in_flight = n;
    let fwd = Forwarder::new(cfg, Arc::clone(store))?;
    let procs = [
        ("influxd", influx.pid()),
        ("tarantool", store.supervised_pid()),
        ("bench", Some(std::process::id())),
    ];
    let cpu0 = cpu_times(&procs);
    let t = Instant::now();
    let handle = netns::run_in(&net.router, move || {
        fwd.spawn().map_err(anyhow::Error::from)
    })??;
    let stats = Arc::clone(handle.stats());
    while stats.cursor.load(Ordering::Relaxed) < top {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(900),
            "backfill not done in 900 s: cursor {} of {top}",
            stats.cursor.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let fwd_s = t.elapsed().as_secs_f64();
    let fwd_cpu = cpu_delta(&cpu0, &cpu_times(&procs), fwd_s);
    handle.stop();
    let sent = stats.points_sent.load(Ordering::Relaxed);
    let errors = stats.errors_total();
    let batches = stats.batches_sent.load(Ordering::Relaxed);

    // The peer: the same points, encoded and compressed before the clock starts.
    let url = format!("{}/write?db={peer_db}&precision=ns", influx.url());
    let procs = [
        ("influxd", influx.pid()),
        ("bench", Some(std::process::id())),
    ];
    let cpu0 = cpu_times(&procs);
    let t = Instant::now();
    netns::run_in(&net.router, || -> anyhow::Result<()> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        // As many writers as the forwarder has requests in flight, taking bodies in order.
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            let writers: Vec<_> = (0..n)
                .map(|_| {
                    s.spawn(|| -> anyhow::Result<()> {
                        while let Some(b) = bodies.get(next.fetch_add(1, Ordering::Relaxed)) {
                            let mut r = agent
                                .post(&url)
                                .header("Content-Encoding", "gzip")
                                .send(b.as_slice())?;
                            let status = r.status().as_u16();
                            let text = r.body_mut().read_to_string().unwrap_or_default();
                            anyhow::ensure!(status == 204, "peer write: HTTP {status}: {text}");
                        }
                        Ok(())
                    })
                })
                .collect();
            writers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("writer panicked")))
                })
                .collect::<anyhow::Result<Vec<()>>>()
        })?;
        Ok(())
    })??;
    let peer_s = t.elapsed().as_secs_f64();
    let peer_cpu = cpu_delta(&cpu0, &cpu_times(&procs), peer_s);

    let got_fwd = influx.count(&fwd_db)?;
    let got_peer = influx.count(&peer_db)?;
    influx.exec(&format!("DROP DATABASE {fwd_db}"))?;
    influx.exec(&format!("DROP DATABASE {peer_db}"))?;
    anyhow::ensure!(
        sent == total && got_fwd == total && got_peer == total && errors == 0,
        "points: forwarder sent {sent} ({errors} errors), InfluxDB holds {got_fwd} (forwarder) and {got_peer} (peer) of {total}"
    );
    let per_s = |secs: f64| total as f64 / secs;
    Ok(vec![
        Metric::new("backfill.points_per_s", per_s(fwd_s), "pts/s")
            .peer(
                per_s(peer_s),
                format!("plain bulk writer, same influxd, same points and lines (pre-encoded, gzip 1, 5k/request, {n} at once)"),
            )
            .note(format!(
                "{batches} requests, {n} in flight; CPU during the run: {fwd_cpu} (peer's run: {peer_cpu}); {profile}"
            )),
        Metric::new("backfill.seconds_24h_16_links", fwd_s, "s")
            .peer(peer_s, "the plain bulk writer's seconds for the same points")
            .target("≤ 60")
            .note(format!(
                "{total} points into InfluxDB 1.6.7, unpaced, {n} requests in flight"
            )),
    ])
}
