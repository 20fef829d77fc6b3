//! Chaos run shared by the daemon's chaos test (about 20 kills) and the benchmark's durability
//! section (at least 100): the `linkpulse run` binary as its own process in a testbed's router
//! namespace with its supervised Tarantool, forwarding to a real InfluxDB 1.6.7 in the server
//! namespace; kill -9 of the daemon, its Tarantool or influxd at random moments, each timed on
//! a write in flight to the victim (the daemon's `linkpulse_store_put_in_flight` /
//! `linkpulse_forward_in_flight` gauges), then restarted. Afterwards the store and InfluxDB are
//! compared and the differences counted in a [`ChaosReport`] (the caller asserts or reports).
//!
//! What counts:
//! - *lost*: a stored row missing from InfluxDB, or a window missing inside a run of windows of
//!   one (link, boot tag) in the store (a boot tag changes at each daemon start, so a hole inside
//!   a run is an acknowledged rollup that vanished);
//! - *duplicated* (issue 4): an identity (link, boot, window start) in InfluxDB with values other
//!   than the store's, a point in InfluxDB the store does not have, an identity stored twice, or
//!   a window marked complete that spans a daemon kill.
//!
//! A daemon that does not come back (its store up and a new rollup written) within 90 s after a
//! kill is an error: it stalled.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    ops::Range,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use linkpulse_sink::store::{LocalConfig, Rollup, Store, StoreError};
use rand::Rng;

use crate::{
    emulator::LinkProfile,
    influx::{diff_point, Influx, InfluxError},
    netns,
    topology::{addr_v4, TopologyError},
    ModemKind, ModemSpec, Testbed, TestbedOptions, TestbedSpec,
};

const DB: &str = "chaos";
const DEST: &str = "central";
/// The daemon's API inside the router namespace (a namespace of its own: no clash).
const API: &str = "127.0.0.1:18480";
const ROUTER: &str = "chaos";
const SITE: &str = "lab";
/// Window width of the daemon's default rollups.
const W: u64 = 500_000_000;
/// A daemon that is not back within this after a kill has stalled.
const HEALTHY_WITHIN: Duration = Duration::from_secs(90);

/// One chaos run.
#[derive(Debug, Clone)]
pub struct ChaosSpec {
    /// Testbed name (prefix of its namespaces): unique per caller.
    pub name: String,
    /// Work dir (testbed state, store, InfluxDB, logs); created, and removed afterwards.
    pub dir: PathBuf,
    /// The `linkpulse` executable.
    pub linkpulse: PathBuf,
    pub kills: usize,
    /// Pause before each kill, milliseconds (drawn uniformly).
    pub pause_ms: Range<u64>,
    /// How long to wait for a write in flight to the victim before killing anyway.
    pub mid_write_wait: Duration,
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    pub kills: usize,
    /// Kills of the daemon, its Tarantool, influxd.
    pub by_victim: [usize; 3],
    /// Kills that were sent while the gauge showed a write in flight to the victim.
    pub mid_write: usize,
    /// Rows in the store at the end, and their (link, boot) runs.
    pub rows: usize,
    pub runs: usize,
    /// Rows above the destination's cursor after a clean stop (also counted in `missing`).
    pub unsent: usize,
    /// Stored rows that are not in InfluxDB.
    pub missing: usize,
    /// Windows missing inside a (link, boot) run of the store.
    pub holes: usize,
    /// Points in InfluxDB the store does not have.
    pub extra: usize,
    /// Identities in InfluxDB with other values than the store's.
    pub differing: usize,
    /// Identities the store holds more than once.
    pub store_repeats: usize,
    /// Windows marked complete that span a daemon kill.
    pub complete_across_kill: usize,
    /// The first problems found, for the message.
    pub examples: Vec<String>,
    /// Duration of the kill phase and of the whole run.
    pub kill_phase: Duration,
    pub total: Duration,
}

impl ChaosReport {
    pub fn lost(&self) -> usize {
        self.missing + self.holes
    }

    pub fn duplicated(&self) -> usize {
        self.extra + self.differing + self.store_repeats + self.complete_across_kill
    }

    fn example(&mut self, what: String) {
        if self.examples.len() < 8 {
            self.examples.push(what);
        }
    }
}

impl std::fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kills (daemon {}, tarantool {}, influxd {}), {} with a write in flight, in {:.0} s; \
             {} rows in {} (link, boot) runs; lost {} (missing {}, holes {}, unsent {}), \
             duplicated {} (extra {}, differing {}, repeated {}, complete across a kill {})",
            self.kills,
            self.by_victim[0],
            self.by_victim[1],
            self.by_victim[2],
            self.mid_write,
            self.kill_phase.as_secs_f64(),
            self.rows,
            self.runs,
            self.lost(),
            self.missing,
            self.holes,
            self.unsent,
            self.duplicated(),
            self.extra,
            self.differing,
            self.store_repeats,
            self.complete_across_kill
        )?;
        if !self.examples.is_empty() {
            write!(f, "; e.g. {}", self.examples.join("; "))?;
        }
        Ok(())
    }
}

/// A chaos run that could not be carried out (as opposed to one that found losses).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("chaos work dir {}: {source}", path.display())]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("testbed: {0}")]
    Testbed(#[from] TopologyError),
    #[error("central InfluxDB: {0}")]
    Influx(#[from] InfluxError),
    #[error("cannot start {}: {source}", bin.display())]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon stalled after {after}: its store was not up with a new rollup written within {HEALTHY_WITHIN:?}; its log ends with:\n{log}")]
    Stalled { after: String, log: String },
    #[error("no Tarantool pid in {}", path.display())]
    NoTarantool { path: PathBuf },
    #[error(
        "the forwarder's backlog never drained after the last kill (120 s); /metrics:\n{metrics}"
    )]
    NotDrained { metrics: String },
    #[error("reading the store afterwards: {0}")]
    Store(#[from] StoreError),
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon process; killed on drop.
struct DaemonProc {
    child: Option<Child>,
    bin: PathBuf,
    ns: String,
    config: PathBuf,
    log: PathBuf,
}

impl DaemonProc {
    fn spawn(&mut self) -> Result<(), ChaosError> {
        let files = |source| ChaosError::Files {
            path: self.log.clone(),
            source,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(files)?;
        let log2 = log.try_clone().map_err(files)?;
        let bin = self.bin.to_str().ok_or_else(|| ChaosError::Spawn {
            bin: self.bin.clone(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        let child = netns::command(&self.ns, bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .map_err(|source| ChaosError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        self.child = Some(child);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (a clean stop: the forwarder takes the last windows).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(30) {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// GET from the daemon's API inside the router namespace; None while it does not answer.
fn get(ns: &str, path: &str) -> Option<String> {
    netns::run_in(ns, move || {
        let mut s =
            std::net::TcpStream::connect_timeout(&API.parse().ok()?, Duration::from_millis(500))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    })
    .ok()
    .flatten()
}

fn metric(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

fn put_in_flight(m: &str) -> bool {
    metric(m, "linkpulse_store_put_in_flight ") == Some(1.0)
}

fn forward_in_flight(m: &str) -> bool {
    metric(
        m,
        &format!("linkpulse_forward_in_flight{{destination=\"{DEST}\"}} "),
    )
    .is_some_and(|n| n >= 1.0)
}

fn written(m: &str) -> f64 {
    metric(m, "linkpulse_rollups_written_total ").unwrap_or(0.0)
}

/// Waits until the daemon answers with its store up and more than `written_before` rollups
/// written since it started.
fn wait_healthy(d: &DaemonProc, written_before: f64, what: &str) -> Result<(), ChaosError> {
    let t = Instant::now();
    loop {
        if let Some(m) = get(&d.ns, "/metrics") {
            if metric(&m, "linkpulse_store_up ") == Some(1.0) && written(&m) > written_before {
                return Ok(());
            }
        }
        if t.elapsed() > HEALTHY_WITHIN {
            return Err(ChaosError::Stalled {
                after: what.to_owned(),
                log: d.log_tail(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tarantool_pid(data: &Path) -> Option<i32> {
    std::fs::read_to_string(data.join("tarantool.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Runs the chaos and compares the store with InfluxDB. Needs root (namespaces, eBPF).
pub fn run(spec: &ChaosSpec) -> Result<ChaosReport, ChaosError> {
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(&spec.dir);
    std::fs::create_dir_all(&spec.dir).map_err(|source| ChaosError::Files {
        path: spec.dir.clone(),
        source,
    })?;
    let dir = Dir(spec.dir.clone());
    let plain = |i: &str| ModemSpec {
        ifname: i.into(),
        kind: ModemKind::Veth,
        up: LinkProfile::unlimited(),
        down: LinkProfile::unlimited(),
    };
    let bed = Testbed::up_with(
        TestbedSpec {
            name: spec.name.clone(),
            modems: vec![plain("wwan0"), plain("wwan1")],
            state_dir: dir.0.join("testbed"),
        },
        TestbedOptions::default(),
    )?;
    let (_, srv0) = addr_v4(0);
    let data = dir.0.join("store");
    let config = dir.0.join("linkpulse.toml");
    std::fs::write(
        &config,
        format!(
            "[router]\nid = \"{ROUTER}\"\nsite = \"{SITE}\"\n[http]\nlisten = \"{API}\"\n[stream]\nenabled = false\n\
             [store]\ndata_dir = \"{}\"\n\
             [[forward]]\nname = \"{DEST}\"\nurl = \"http://{srv0}:8086\"\ndatabase = \"{DB}\"\n\
             batch_points = 20\ntimeout_s = 5\npace_share = 0\nretry_max_s = 2\n\
             [[link]]\ninterface = \"wwan0\"\n[[link]]\ninterface = \"wwan1\"\n",
            data.display()
        ),
    )
    .map_err(|source| ChaosError::Files {
        path: config.clone(),
        source,
    })?;
    let rtr = bed.router_ns().to_string();
    let mut central = Influx::start(bed.server_ns(), srv0, dir.0.join("influx"), DB)?;
    let mut daemon = DaemonProc {
        child: None,
        bin: spec.linkpulse.clone(),
        ns: rtr.clone(),
        config,
        log: dir.0.join("linkpulse.log"),
    };
    daemon.spawn()?;
    wait_healthy(&daemon, 0.0, "the first start")?;

    let mut report = ChaosReport::default();
    let mut rng = rand::thread_rng();
    let mut daemon_kills_ns = Vec::new();
    let kill_phase = Instant::now();
    for k in 0..spec.kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(spec.pause_ms.clone())));
        // Victim: 0 daemon, 1 its Tarantool, 2 influxd; timed on a write in flight to it.
        let victim = rng.gen_range(0..3);
        let hits: fn(&str) -> bool = match victim {
            0 => |m| put_in_flight(m) || forward_in_flight(m),
            1 => put_in_flight,
            _ => forward_in_flight,
        };
        let t = Instant::now();
        let mut before = None;
        while t.elapsed() < spec.mid_write_wait {
            if let Some(m) = get(&rtr, "/metrics") {
                if hits(&m) {
                    report.mid_write += 1;
                    before = Some(written(&m));
                    break;
                }
            }
        }
        report.by_victim[victim] += 1;
        report.kills += 1;
        match victim {
            0 => {
                daemon.kill9();
                daemon_kills_ns.push(realtime_ns());
                std::thread::sleep(Duration::from_millis(rng.gen_range(100..1500)));
                daemon.spawn()?;
                wait_healthy(&daemon, 0.0, &format!("kill {k} (daemon)"))?;
            }
            1 => {
                let pid = tarantool_pid(&data)
                    .ok_or_else(|| ChaosError::NoTarantool { path: data.clone() })?;
                // SAFETY: kill(2) of the daemon's Tarantool (pid from its pid file).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                // Back when a rollup was written after the kill, through the new instance.
                let before = match before {
                    Some(b) => b,
                    None => get(&rtr, "/metrics").map_or(0.0, |m| written(&m)),
                };
                wait_healthy(&daemon, before, &format!("kill {k} (tarantool)"))?;
            }
            _ => {
                central.kill();
                std::thread::sleep(Duration::from_millis(rng.gen_range(200..3000)));
                central.spawn()?;
            }
        }
    }
    report.kill_phase = kill_phase.elapsed();
    // Let everything settle, then stop cleanly with the destination up.
    wait_healthy(&daemon, 0.0, "the last kill")?;
    let t = Instant::now();
    let key = format!("linkpulse_forward_backlog_rows{{destination=\"{DEST}\"}} ");
    loop {
        let m = get(&rtr, "/metrics").unwrap_or_default();
        if metric(&m, &key).is_some_and(|b| b < 10.0) {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(ChaosError::NotDrained { metrics: m });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.stop();

    let store = Store::start_local(LocalConfig::new(&data))?;
    let cursor = store.get_cursor(DEST)?.unwrap_or(0);
    let mut rows = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_after(after, 5000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        rows.extend(page);
    }
    store.stop();
    let got = central.points(DB)?;
    compare(&mut report, &rows, cursor, &got, &daemon_kills_ns);
    drop(central);
    drop(daemon);
    drop(bed);
    report.total = started.elapsed();
    Ok(report)
}

type Points = BTreeMap<(String, String, u64), BTreeMap<String, serde_json::Value>>;

/// Counts what the store and InfluxDB disagree on (see the module doc).
fn compare(
    report: &mut ChaosReport,
    rows: &[Rollup],
    cursor: u64,
    got: &Points,
    daemon_kills_ns: &[u64],
) {
    report.rows = rows.len();
    report.unsent = rows.iter().filter(|r| r.seq > cursor).count();
    let mut want = BTreeMap::new();
    for r in rows {
        let key = (
            r.link_id.to_string(),
            r.boot_tag.to_string(),
            r.window_start_ns,
        );
        if want.insert(key.clone(), r).is_some() {
            report.store_repeats += 1;
            report.example(format!("identity {key:?} stored twice"));
        }
    }
    for (k, r) in &want {
        match got.get(k) {
            None => {
                report.missing += 1;
                report.example(format!("row {k:?} (seq {}) not in InfluxDB", r.seq));
            }
            Some(p) => {
                if let Some(d) = diff_point(p, r, ROUTER, SITE) {
                    report.differing += 1;
                    report.example(format!("point {k:?}: {d}"));
                }
            }
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        report.extra += 1;
        report.example(format!("point {k:?} in InfluxDB, not in the store"));
    }
    // Each (link, boot) run of windows must be unbroken.
    let mut runs: BTreeMap<(u32, u64), Vec<u64>> = BTreeMap::new();
    for r in rows {
        runs.entry((r.link_id, r.boot_tag))
            .or_default()
            .push(r.window_start_ns);
    }
    report.runs = runs.len();
    for ((link, boot), w) in &mut runs {
        w.sort_unstable();
        w.dedup();
        for p in w.windows(2) {
            if p[1] - p[0] != W {
                let n = ((p[1] - p[0]) / W).saturating_sub(1) as usize;
                report.holes += n.max(1);
                report.example(format!("link {link} boot {boot}: a hole after {}", p[0]));
            }
        }
    }
    for t in daemon_kills_ns {
        for r in rows {
            if r.complete && r.window_start_ns <= *t && *t < r.window_start_ns + W {
                report.complete_across_kill += 1;
                report.example(format!(
                    "complete window {} of link {} spans the kill at {t}",
                    r.window_start_ns, r.link_id
                ));
            }
        }
    }
}
