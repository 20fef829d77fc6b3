//! A real InfluxDB 1.6.7 (`influxd`) as the central side of the store-and-forward tests, run
//! inside a testbed namespace (the server's: the router reaches it over a modem), from its own
//! generated config in a temp dir. Killed on drop, also when a test fails. Queries run from a
//! thread inside the same namespace.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use linkpulse_sink::store::Rollup;
use linkpulse_testbed::netns;
use serde_json::Value;

pub struct Influx {
    child: Option<Child>,
    pub ns: String,
    /// `ip:port` it listens on inside `ns`.
    pub http: String,
    pub dir: PathBuf,
}

impl Influx {
    /// Starts influxd in namespace `ns`, listening on `addr` (an address of that namespace), with
    /// its files under `dir`, and creates database `db`.
    pub fn start(ns: &str, addr: std::net::Ipv4Addr, dir: PathBuf, db: &str) -> Influx {
        std::fs::create_dir_all(&dir).expect("influx dir");
        let mut s = Influx {
            child: None,
            ns: ns.to_string(),
            http: format!("{addr}:8086"),
            dir,
        };
        s.write_config(&format!("{addr}:8088"));
        s.spawn();
        s.exec(&format!("CREATE DATABASE \"{db}\""));
        s
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    fn write_config(&self, rpc: &str) {
        let out = std::process::Command::new("influxd")
            .arg("config")
            .stderr(Stdio::null())
            .output()
            .expect("run `influxd config` (cargo xtask setup installs influxdb)");
        let text = String::from_utf8(out.stdout).expect("utf8 config");
        let mut cfg: toml::Table = text.parse().expect("influxd config is TOML");
        let d = &self.dir;
        let s = |v: String| toml::Value::String(v);
        let b = toml::Value::Boolean;
        let mut set = |section: Option<&str>, key: &str, v: toml::Value| {
            let t = match section {
                None => &mut cfg,
                Some(sec) => cfg
                    .get_mut(sec)
                    .and_then(|v| v.as_table_mut())
                    .unwrap_or_else(|| panic!("section [{sec}] in influxd config")),
            };
            t.insert(key.to_owned(), v);
        };
        set(None, "reporting-enabled", b(false));
        set(None, "bind-address", s(rpc.to_string()));
        set(Some("meta"), "dir", s(d.join("meta").display().to_string()));
        set(Some("data"), "dir", s(d.join("data").display().to_string()));
        set(
            Some("data"),
            "wal-dir",
            s(d.join("wal").display().to_string()),
        );
        set(Some("data"), "query-log-enabled", b(false));
        set(Some("monitor"), "store-enabled", b(false));
        set(Some("http"), "bind-address", s(self.http.clone()));
        set(Some("http"), "log-enabled", b(false));
        std::fs::write(d.join("influxd.conf"), cfg.to_string()).expect("write influxd.conf");
    }

    /// Starts (or restarts, on the same data) influxd and waits for /ping.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("influxd.log"))
            .expect("log");
        // `ip netns exec` execs influxd: the child's pid is influxd's.
        let child = netns::command(&self.ns, "influxd")
            .args(["run", "-config"])
            .arg(self.dir.join("influxd.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start influxd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let url = format!("{}/ping", self.url());
            let ok = netns::run_in(&self.ns, || {
                agent()
                    .get(&url)
                    .call()
                    .is_ok_and(|r| r.status().as_u16() == 204)
            })
            .expect("enter ns");
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
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("influxd.log")).unwrap_or_default()
    }

    /// kill -9 (an outage of the central side).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn query_raw(&self, post: bool, db: Option<&str>, q: &str) -> Value {
        let url = format!("{}/query", self.url());
        let text = netns::run_in(&self.ns, || {
            let mut pairs = vec![("q", q), ("epoch", "ns")];
            if let Some(db) = db {
                pairs.push(("db", db));
            }
            let a = agent();
            let resp = if post {
                a.post(&url).query_pairs(pairs).send_empty()
            } else {
                a.get(&url).query_pairs(pairs).call()
            };
            let mut resp = resp.expect("influxd /query");
            assert_eq!(resp.status().as_u16(), 200, "{q}");
            resp.body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_string()
                .expect("query body")
        })
        .expect("enter ns");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        // /query answers 200 even when a statement fails: the error is in results[i].error.
        for r in v["results"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            assert!(r.get("error").is_none(), "{q}: {}", r["error"]);
        }
        v
    }

    pub fn exec(&self, q: &str) -> Value {
        self.query_raw(true, None, q)
    }

    pub fn query(&self, db: &str, q: &str) -> Value {
        self.query_raw(false, Some(db), q)
    }

    /// All rollup points, keyed by (link, boot, time): column → value. Panics on a point
    /// returned twice.
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

    /// Rollup points stored (by a field every point has).
    pub fn count(&self, db: &str) -> u64 {
        let v = self.query(db, "SELECT count(window_ns) FROM linkpulse_rollup");
        v["results"][0]["series"][0]["values"][0][1]
            .as_u64()
            .unwrap_or(0)
    }
}

impl Drop for Influx {
    fn drop(&mut self) {
        self.kill();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// What a stored row must look like in InfluxDB, written out field by field (independently of
/// the forwarder's encoder).
pub fn expected_point(r: &Rollup, router: &str, site: &str) -> BTreeMap<String, Value> {
    use serde_json::json;
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_owned(), v);
    };
    put("time", json!(r.window_start_ns));
    put("boot", json!(r.boot_tag.to_string()));
    put("link", json!(r.link_id.to_string()));
    put("router", json!(router));
    put("site", json!(site));
    put("window_ns", json!(r.window_ns));
    put("complete", json!(r.complete));
    put("link_state", json!(r.link_state));
    put("clock_state", json!(r.clock_state));
    put("clock_error_ns", json!(r.clock_error_ns));
    put("rx_bytes", json!(r.rx_bytes));
    put("tx_bytes", json!(r.tx_bytes));
    put("rx_packets", json!(r.rx_packets));
    put("tx_packets", json!(r.tx_packets));
    put("rx_rate_mean_bps", json!(r.rx_rate_mean_bps));
    put("rx_rate_peak_bps", json!(r.rx_rate_peak_bps));
    put("rx_rate_p50_bps", json!(r.rx_rate_p50_bps));
    put("rx_rate_p95_bps", json!(r.rx_rate_p95_bps));
    put("rx_rate_p99_bps", json!(r.rx_rate_p99_bps));
    put("tx_rate_mean_bps", json!(r.tx_rate_mean_bps));
    put("tx_rate_peak_bps", json!(r.tx_rate_peak_bps));
    put("tx_rate_p50_bps", json!(r.tx_rate_p50_bps));
    put("tx_rate_p95_bps", json!(r.tx_rate_p95_bps));
    put("tx_rate_p99_bps", json!(r.tx_rate_p99_bps));
    for (k, v) in [
        ("rtt_min_ns", r.rtt_min_ns),
        ("rtt_mean_ns", r.rtt_mean_ns),
        ("rtt_max_ns", r.rtt_max_ns),
        ("rtt_p50_ns", r.rtt_p50_ns),
        ("rtt_p99_ns", r.rtt_p99_ns),
    ] {
        if let Some(v) = v {
            put(k, json!(v));
        }
    }
    put("probes_sent_fwd", json!(r.probes_sent_fwd));
    put("probes_lost_fwd", json!(r.probes_lost_fwd));
    put("probes_sent_bwd", json!(r.probes_sent_bwd));
    put("probes_lost_bwd", json!(r.probes_lost_bwd));
    m
}

/// Compares a point with its row; returns the first difference.
pub fn diff_point(
    got: &BTreeMap<String, Value>,
    r: &Rollup,
    router: &str,
    site: &str,
) -> Option<String> {
    let exp = expected_point(r, router, site);
    for (field, v) in &exp {
        // JSON numbers: floats compared as f64, integers exactly.
        let same = match (v.as_f64(), got.get(field).and_then(Value::as_f64)) {
            (Some(a), Some(b)) if v.is_f64() => a == b,
            _ => got.get(field) == Some(v),
        };
        if !same {
            return Some(format!("field {field}: want {v}, got {:?}", got.get(field)));
        }
    }
    (got.len() != exp.len()).then(|| format!("other fields: {got:?}"))
}
