//! Real servers for the forwarder tests: an InfluxDB 1.6.7 (`influxd`) started from its own
//! generated config in a temp dir on free loopback ports, and the supervised Tarantool store.
//! Both are killed on drop, also when a test fails.
#![allow(dead_code)]

use linkpulse_sink::forward::{BasicAuth, ForwardConfig, Kind};
use linkpulse_sink::store::{LocalConfig, Rollup, Store};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const T0: u64 = 1_790_000_000_000_000_000; // 2026-09, epoch ns, a multiple of 500 ms
pub const W: u64 = 500_000_000;
pub const ADMIN: &str = "admin";
pub const ADMIN_PASSWORD: &str = "adm1n pass";
pub const ROUTER: &str = "rt-7";
pub const SITE: &str = "depot north";

// The same helpers as the store and client tests.
#[path = "../common/mod.rs"]
mod common;
pub use common::{free_port, init_tracing};

/// A rollup with values that depend on (link, window, boot): floats with fractions, optional
/// RTTs present and absent.
pub fn rollup(link: u32, window: u64, boot: u64) -> Rollup {
    let x = window as f64 + f64::from(link) / 7.0;
    Rollup {
        link_id: link,
        window_start_ns: T0 + window * W,
        boot_tag: boot,
        seq: 0,
        window_ns: W,
        complete: window % 7 != 0,
        link_state: 1,
        clock_state: (window % 2) as u8,
        clock_error_ns: 1500 + window % 100,
        rx_bytes: window * 1000 + u64::from(link),
        tx_bytes: window * 10 + boot,
        rx_packets: window,
        tx_packets: window / 2,
        rx_rate_mean_bps: x * 1.5,
        rx_rate_peak_bps: x * 3.25,
        rx_rate_p50_bps: x / 3.0,
        rx_rate_p95_bps: x * 2.0,
        rx_rate_p99_bps: x * 2.5,
        tx_rate_mean_bps: 0.0,
        tx_rate_peak_bps: 1e9,
        tx_rate_p50_bps: 0.125,
        tx_rate_p95_bps: 7.0,
        tx_rate_p99_bps: x * 1e-3,
        rtt_min_ns: (window % 3 != 0).then_some(20_000_000),
        rtt_mean_ns: (window % 3 != 0).then_some(25_000_000 + window),
        rtt_max_ns: None,
        rtt_p50_ns: Some(22_000_000 + window % 1000),
        rtt_p99_ns: (window % 2 == 0).then_some(window),
        probes_sent_fwd: 10,
        probes_lost_fwd: (window % 4) as u32,
        probes_sent_bwd: 9,
        probes_lost_bwd: (window % 3) as u32,
        // Schema v4: present in some windows, absent (no field) in others; negative delays.
        tcp_rtt_samples: window % 4,
        tcp_rtt_min_ns: (window % 4 != 0).then_some(30_000_000 + window),
        tcp_rtt_mean_ns: (window % 4 != 0).then_some(31_000_000 + window),
        tcp_rtt_max_ns: (window % 4 != 0).then_some(32_000_000 + window),
        owd_samples: (window % 5) as u32,
        owd_up_mean_ns: (window % 5 != 0).then_some(5_000_000 - (window % 9) as i64 * 1_000_000),
        owd_up_max_ns: (window % 5 != 0).then_some(6_000_000),
        owd_down_mean_ns: (window % 5 != 0).then_some(-(window as i64)),
        owd_down_max_ns: (window % 5 != 0).then_some(7_000_000),
        owd_error_ns: (window % 5 != 0).then_some(501_000 + window % 10),
    }
}

/// `links` links × windows `from..to`, window-major (as the daemon writes them).
pub fn rollups(links: u32, windows: std::ops::Range<u64>, boot: u64) -> Vec<Rollup> {
    windows
        .flat_map(|w| (0..links).map(move |l| rollup(l, w, boot)))
        .collect()
}

pub fn start_store(dir: &std::path::Path) -> Arc<Store> {
    Arc::new(Store::start_local(LocalConfig::new(dir)).expect("start local store"))
}

/// Everything in the store, in seq order.
pub fn all_rows(store: &Store) -> Vec<Rollup> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let rows = store.read_after(after, 5000).expect("read_after");
        let Some(last) = rows.last() else {
            return out;
        };
        after = last.seq;
        out.extend(rows);
    }
}

pub struct Influx {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    rpc_port: u16,
    pub auth: bool,
    agent: ureq::Agent,
}

impl Influx {
    /// Starts influxd; with `auth`, creates the admin user [`ADMIN`].
    pub fn start(auth: bool) -> Influx {
        let mut s = Influx {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            rpc_port: free_port(),
            auth,
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .proxy(None)
                .timeout_global(Some(Duration::from_secs(60)))
                .build()
                .into(),
        };
        s.write_config();
        s.spawn();
        if auth {
            // With auth enabled and no user yet, 1.x accepts exactly this statement unauthenticated.
            s.exec(&format!(
                "CREATE USER {ADMIN} WITH PASSWORD '{ADMIN_PASSWORD}' WITH ALL PRIVILEGES"
            ));
        }
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn write_config(&self) {
        let out = Command::new("influxd")
            .arg("config")
            .stderr(Stdio::null())
            .output()
            .expect("run `influxd config` (apt-get install -y --no-install-recommends influxdb)");
        let text = String::from_utf8(out.stdout).expect("utf8 config");
        let mut cfg: toml::Table = text.parse().expect("influxd config is TOML");
        let d = self.dir.path();
        let set = |cfg: &mut toml::Table, section: Option<&str>, key: &str, v: toml::Value| {
            let t = match section {
                None => cfg,
                Some(s) => cfg
                    .get_mut(s)
                    .and_then(|v| v.as_table_mut())
                    .unwrap_or_else(|| panic!("section [{s}] in influxd config")),
            };
            t.insert(key.to_owned(), v);
        };
        let s = |v: String| toml::Value::String(v);
        set(
            &mut cfg,
            None,
            "reporting-enabled",
            toml::Value::Boolean(false),
        );
        set(
            &mut cfg,
            None,
            "bind-address",
            s(format!("127.0.0.1:{}", self.rpc_port)),
        );
        set(
            &mut cfg,
            Some("meta"),
            "dir",
            s(d.join("meta").display().to_string()),
        );
        set(
            &mut cfg,
            Some("data"),
            "dir",
            s(d.join("data").display().to_string()),
        );
        set(
            &mut cfg,
            Some("data"),
            "wal-dir",
            s(d.join("wal").display().to_string()),
        );
        set(
            &mut cfg,
            Some("data"),
            "query-log-enabled",
            toml::Value::Boolean(false),
        );
        set(
            &mut cfg,
            Some("monitor"),
            "store-enabled",
            toml::Value::Boolean(false),
        );
        set(
            &mut cfg,
            Some("http"),
            "bind-address",
            s(format!("127.0.0.1:{}", self.port)),
        );
        set(
            &mut cfg,
            Some("http"),
            "auth-enabled",
            toml::Value::Boolean(self.auth),
        );
        set(
            &mut cfg,
            Some("http"),
            "log-enabled",
            toml::Value::Boolean(false),
        );
        std::fs::write(d.join("influxd.conf"), cfg.to_string()).expect("write influxd.conf");
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("influxd.log"))
            .expect("log");
        let child = Command::new("influxd")
            .args(["run", "-config"])
            .arg(self.dir.path().join("influxd.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start influxd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self
                .agent
                .get(&format!("{}/ping", self.url()))
                .call()
                .is_ok_and(|r| r.status().as_u16() == 204);
            if ok {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("influxd exited ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "influxd: no 204 on /ping within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("influxd.log")).unwrap_or_default()
    }

    /// Freezes influxd (SIGSTOP) until the guard is dropped (SIGCONT): requests sent meanwhile
    /// stay on the wire, unanswered.
    pub fn freeze(&self) -> Frozen {
        let pid = self.child.as_ref().expect("influxd runs").id();
        // libc is a dependency of the sink already; kill(2) on our own child.
        // SAFETY: kill has no memory preconditions.
        assert_eq!(
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) },
            0,
            "SIGSTOP influxd"
        );
        Frozen { pid }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn req(&self, method_post: bool, db: Option<&str>, q: &str) -> (u16, Value) {
        let url = format!("{}/query", self.url());
        let mut pairs = vec![("q", q), ("epoch", "ns")];
        if let Some(db) = db {
            pairs.push(("db", db));
        }
        if self.auth {
            pairs.push(("u", ADMIN));
            pairs.push(("p", ADMIN_PASSWORD));
        }
        let resp = if method_post {
            self.agent.post(&url).query_pairs(pairs).send_empty()
        } else {
            self.agent.get(&url).query_pairs(pairs).call()
        };
        let mut resp = resp.expect("influxd /query");
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .expect("query body");
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (status, v)
    }

    /// A statement that must succeed (`/query` answers 200 even when a statement fails: the error
    /// is in `results[i].error`).
    pub fn exec(&self, q: &str) -> Value {
        let (status, v) = self.req(true, None, q);
        assert_eq!(status, 200, "{q}: {v}");
        check_results(q, &v);
        v
    }

    /// A statement that must succeed, in `db` (POST, as 1.x wants for writes such as DROP).
    pub fn exec_in(&self, db: &str, q: &str) -> Value {
        let (status, v) = self.req(true, Some(db), q);
        assert_eq!(status, 200, "{q}: {v}");
        check_results(q, &v);
        v
    }

    pub fn query(&self, db: &str, q: &str) -> Value {
        let (status, v) = self.req(false, Some(db), q);
        assert_eq!(status, 200, "{q}: {v}");
        check_results(q, &v);
        v
    }

    /// Posts line protocol as is (the peer writer and the tests' own conflicting points).
    pub fn write(&self, db: &str, body: &[u8], gzip: bool) -> (u16, String) {
        let mut req = self
            .agent
            .post(&format!("{}/write", self.url()))
            .query("db", db)
            .query("precision", "ns");
        if self.auth {
            req = req.query("u", ADMIN).query("p", ADMIN_PASSWORD);
        }
        if gzip {
            req = req.header("Content-Encoding", "gzip");
        }
        let mut resp = req.send(body).expect("influxd /write");
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap_or_default())
    }

    /// All points of the rollup measurement, keyed by (link, boot, time): column → value.
    pub fn points(&self, db: &str) -> BTreeMap<(String, String, u64), BTreeMap<String, Value>> {
        let v = self.query(db, "SELECT * FROM linkpulse_rollup");
        let mut out = BTreeMap::new();
        let Some(series) = v["results"][0]["series"].as_array() else {
            return out;
        };
        for s in series {
            let cols: Vec<String> = s["columns"]
                .as_array()
                .expect("columns")
                .iter()
                .map(|c| c.as_str().expect("column name").to_owned())
                .collect();
            for row in s["values"].as_array().expect("values") {
                let row = row.as_array().expect("row");
                let mut m: BTreeMap<String, Value> =
                    cols.iter().cloned().zip(row.iter().cloned()).collect();
                m.retain(|_, v| !v.is_null());
                let key = (
                    m["link"].as_str().expect("link tag").to_owned(),
                    m["boot"].as_str().expect("boot tag").to_owned(),
                    m["time"].as_u64().expect("time"),
                );
                assert!(
                    out.insert(key.clone(), m).is_none(),
                    "point {key:?} returned twice"
                );
            }
        }
        out
    }

    /// Count of points of the rollup measurement (by a field every point has).
    pub fn count(&self, db: &str) -> u64 {
        let v = self.query(db, "SELECT count(window_ns) FROM linkpulse_rollup");
        v["results"][0]["series"][0]["values"][0][1]
            .as_u64()
            .unwrap_or(0)
    }
}

fn check_results(q: &str, v: &Value) {
    for r in v["results"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        assert!(r.get("error").is_none(), "{q}: {}", r["error"]);
    }
    assert!(v.get("error").is_none(), "{q}: {}", v["error"]);
}

impl Drop for Influx {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a stored row must look like in InfluxDB, written out field by field (independently of
/// the encoder under test): the harness's definition, shared with the daemon's tests and bench.
pub fn expected_point(r: &Rollup) -> BTreeMap<String, Value> {
    linkpulse_testbed::influx::expected_point(r, ROUTER, SITE)
}

/// A frozen influxd (see [`Influx::freeze`]), thawed on drop, also when a test fails.
pub struct Frozen {
    pid: u32,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.pid as i32, libc::SIGCONT) };
    }
}

pub fn assert_exactly(influx: &Influx, db: &str, rows: &[Rollup]) {
    let got = influx.points(db);
    let mut want = BTreeMap::new();
    for r in rows {
        let key = (
            r.link_id.to_string(),
            r.boot_tag.to_string(),
            r.window_start_ns,
        );
        assert!(
            want.insert(key, r).is_none(),
            "test rows repeat an identity"
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
        "{} points in InfluxDB, {} rows; missing e.g. {missing:?}, extra e.g. {extra:?}",
        got.len(),
        want.len()
    );
    for (k, r) in &want {
        let exp = expected_point(r);
        let g = &got[k];
        for (field, v) in &exp {
            // JSON numbers: compare as f64 for floats, exactly for integers.
            let same = match (v.as_f64(), g.get(field).and_then(Value::as_f64)) {
                (Some(a), Some(b)) if v.is_f64() => a == b,
                _ => g.get(field) == Some(v),
            };
            assert!(
                same,
                "point {k:?} field {field}: want {v}, got {:?}",
                g.get(field)
            );
        }
        assert_eq!(g.len(), exp.len(), "point {k:?} has other fields: {g:?}");
    }
}

pub fn v1_config(
    name: &str,
    influx: &Influx,
    db: &str,
    state_dir: &std::path::Path,
) -> ForwardConfig {
    let auth = influx.auth.then(|| BasicAuth {
        user: ADMIN.into(),
        password: ADMIN_PASSWORD.into(),
    });
    let mut cfg = ForwardConfig::new(
        name,
        influx.url(),
        Kind::V1 {
            db: db.into(),
            auth,
        },
        ROUTER,
        state_dir,
    );
    cfg.site = SITE.into();
    cfg.timeout = Duration::from_secs(10);
    cfg.backoff_min = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_secs(2);
    cfg.idle_poll = Duration::from_millis(100);
    cfg
}

/// Waits until `f` holds, up to `secs`.
pub fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
