//! Chaos (root, real Tarantool 2.6 and InfluxDB 1.6.7, the `linkpulse run` binary as its own
//! process in a testbed's router namespace): about 20 kill -9 of the daemon, its Tarantool and
//! influxd at random moments, each timed on a write in flight (the daemon's
//! `linkpulse_store_put_in_flight` / `linkpulse_forward_in_flight` gauges), then restarted.
//! Afterwards: every row of the store is in InfluxDB with equal values and nothing else is
//! (0 lost, 0 doubled), each (link, boot) has consecutive windows (no acknowledged rollup lost),
//! no complete window spans a daemon kill, and the daemon came back after every kill.
#[path = "../../tests/tests/common/influx.rs"]
mod influx;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use influx::{diff_point, Influx};
use linkpulse_sink::store::{LocalConfig, Store};
use linkpulse_testbed::{
    emulator::LinkProfile, netns, topology::addr_v4, ModemKind, ModemSpec, Testbed, TestbedOptions,
    TestbedSpec,
};
use rand::Rng;

const NAME: &str = "lpkil";
const DB: &str = "chaos";
const DEST: &str = "central";
const API: &str = "127.0.0.1:18480";
const W: u64 = 500_000_000;
const KILLS: usize = 20;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon process; killed on drop.
struct DaemonProc {
    child: Option<Child>,
    ns: String,
    config: PathBuf,
    log: PathBuf,
}

impl DaemonProc {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let child = netns::command(&self.ns, env!("CARGO_BIN_EXE_linkpulse"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start linkpulse run");
        self.child = Some(child);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
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
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// GET from the daemon's API inside the router namespace; None while it does not answer.
fn get(ns: &str, path: &str) -> Option<String> {
    let path = path.to_string();
    netns::run_in(ns, move || {
        let mut s = std::net::TcpStream::connect_timeout(
            &API.parse().expect("addr"),
            Duration::from_millis(500),
        )
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

fn in_flight(m: &str) -> bool {
    metric(m, "linkpulse_store_put_in_flight ") == Some(1.0)
        || metric(
            m,
            &format!("linkpulse_forward_in_flight{{destination=\"{DEST}\"}} "),
        ) == Some(1.0)
}

/// Waits until the daemon answers with its store up and a rollup written since it started.
fn wait_healthy(ns: &str, what: &str) {
    let t = Instant::now();
    loop {
        if let Some(m) = get(ns, "/metrics") {
            if metric(&m, "linkpulse_store_up ") == Some(1.0)
                && metric(&m, "linkpulse_rollups_written_total ").unwrap_or(0.0) > 0.0
            {
                return;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the daemon stalled after {what}: not healthy within 90 s"
        );
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

#[test]
fn kill_9_of_daemon_tarantool_and_influxd_loses_and_doubles_nothing() {
    let dir = Dir(std::env::temp_dir().join(format!("lp-chaos-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("dir");
    let plain = |i: &str| ModemSpec {
        ifname: i.into(),
        kind: ModemKind::Veth,
        up: LinkProfile::unlimited(),
        down: LinkProfile::unlimited(),
    };
    let bed = Testbed::up_with(
        TestbedSpec {
            name: NAME.into(),
            modems: vec![plain("wwan0"), plain("wwan1")],
            state_dir: dir.0.join("testbed"),
        },
        TestbedOptions::default(),
    )
    .expect("testbed");
    let (_, srv0) = addr_v4(0);
    let data = dir.0.join("store");
    let config = dir.0.join("linkpulse.toml");
    std::fs::write(
        &config,
        format!(
            "[router]\nid = \"chaos\"\nsite = \"lab\"\n[http]\nlisten = \"{API}\"\n[stream]\nenabled = false\n\
             [store]\ndata_dir = \"{}\"\n\
             [[forward]]\nname = \"{DEST}\"\nurl = \"http://{srv0}:8086\"\ndatabase = \"{DB}\"\n\
             batch_points = 20\ntimeout_s = 5\npace_share = 0\nretry_max_s = 2\n\
             [[link]]\ninterface = \"wwan0\"\n[[link]]\ninterface = \"wwan1\"\n",
            data.display()
        ),
    )
    .expect("config");
    let rtr = bed.router_ns().to_string();
    let mut central = Influx::start(bed.server_ns(), srv0, dir.0.join("influx"), DB);
    let mut daemon = DaemonProc {
        child: None,
        ns: rtr.clone(),
        config,
        log: dir.0.join("linkpulse.log"),
    };
    daemon.spawn();
    wait_healthy(&rtr, "the first start");

    let mut rng = rand::thread_rng();
    let mut landed = 0;
    let mut counts = [0usize; 3];
    let mut daemon_kills_ns = Vec::new();
    for k in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(500..3000)));
        // Victim: 0 daemon, 1 its Tarantool, 2 influxd; timed on a write in flight.
        let victim = rng.gen_range(0..3);
        let t = Instant::now();
        let mut hit = false;
        while t.elapsed() < Duration::from_secs(3) {
            if get(&rtr, "/metrics").is_some_and(|m| in_flight(&m)) {
                hit = true;
                break;
            }
        }
        landed += usize::from(hit);
        counts[victim] += 1;
        match victim {
            0 => {
                assert!(daemon.pid() > 0);
                daemon.kill9();
                daemon_kills_ns.push(linkpulse::clock::realtime_ns());
                std::thread::sleep(Duration::from_millis(rng.gen_range(100..1500)));
                daemon.spawn();
                wait_healthy(&rtr, &format!("kill {k} (daemon)"));
            }
            1 => {
                let pid = tarantool_pid(&data).expect("tarantool pid");
                // SAFETY: kill(2) of the daemon's Tarantool (pid from its pid file).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                std::thread::sleep(Duration::from_millis(500));
                wait_healthy(&rtr, &format!("kill {k} (tarantool)"));
            }
            _ => {
                central.kill();
                std::thread::sleep(Duration::from_millis(rng.gen_range(200..3000)));
                central.spawn();
            }
        }
    }
    // Let everything settle, then stop cleanly with the destination up.
    wait_healthy(&rtr, "the last kill");
    let t = Instant::now();
    loop {
        let m = get(&rtr, "/metrics").unwrap_or_default();
        let key = format!("linkpulse_forward_backlog_rows{{destination=\"{DEST}\"}} ");
        if metric(&m, &key).is_some_and(|b| b < 10.0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "backlog never drained:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.stop();

    let store = Store::start_local(LocalConfig::new(&data)).expect("reopen the store");
    let cursor = store.get_cursor(DEST).expect("cursor").unwrap_or(0);
    let mut rows = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_after(after, 5000).expect("read_after");
        let Some(last) = page.last() else { break };
        after = last.seq;
        rows.extend(page);
    }
    store.stop();
    let unsent = rows.iter().filter(|r| r.seq > cursor).count();
    assert_eq!(unsent, 0, "rows never forwarded after a clean stop");

    // 0 lost, 0 doubled: InfluxDB holds exactly the store's rows, with equal values.
    let got = central.points(DB);
    let mut want = BTreeMap::new();
    for r in &rows {
        let key = (
            r.link_id.to_string(),
            r.boot_tag.to_string(),
            r.window_start_ns,
        );
        assert!(
            want.insert(key, r).is_none(),
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
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} points, {} rows; missing {missing:?}, extra {extra:?}",
        got.len(),
        want.len()
    );
    let duplicated = want
        .iter()
        .filter(|(k, r)| diff_point(&got[*k], r, "chaos", "lab").is_some())
        .count();
    assert_eq!(duplicated, 0, "identities with other values in InfluxDB");

    // No acknowledged rollup lost in the store: each (link, boot) run of windows is unbroken.
    let mut runs: BTreeMap<(u32, u64), Vec<u64>> = BTreeMap::new();
    for r in &rows {
        runs.entry((r.link_id, r.boot_tag))
            .or_default()
            .push(r.window_start_ns);
    }
    for ((link, boot), w) in &mut runs {
        w.sort_unstable();
        for p in w.windows(2) {
            assert_eq!(
                p[1] - p[0],
                W,
                "link {link} boot {boot}: a hole at {}",
                p[0]
            );
        }
    }
    // No complete window spans a daemon kill.
    for t in &daemon_kills_ns {
        for r in &rows {
            assert!(
                !(r.complete && r.window_start_ns <= *t && *t < r.window_start_ns + W),
                "complete window {r:?} spans the kill at {t}"
            );
        }
    }
    eprintln!(
        "chaos: {KILLS} kills (daemon {}, tarantool {}, influxd {}), {landed} with a write in flight; {} rows in {} (link, boot) runs, all in InfluxDB with equal values",
        counts[0],
        counts[1],
        counts[2],
        rows.len(),
        runs.len()
    );
    assert!(landed >= KILLS / 4, "only {landed} kills landed mid-write");
    drop(bed);
}
