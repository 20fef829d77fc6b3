//! A real InfluxDB 1.6.7 (`influxd`) as the central side of the store-and-forward tests and of
//! the benchmark's durability run, inside a testbed namespace (the server's: the router reaches
//! it over a modem), from its own generated config in a directory of the caller. Killed on drop,
//! also when a test fails. Queries run from a thread inside the same namespace. Every call
//! returns a [`InfluxError`] instead of panicking: the benchmark is built with `panic = "abort"`
//! and must still tear its namespaces down.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use linkpulse_sink::store::Rollup;
use serde_json::Value;

use crate::netns::{self, NetnsError};

/// A failure of the harness's InfluxDB, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum InfluxError {
    #[error("cannot run `influxd config` (cargo xtask setup installs influxdb): {0}")]
    Config(String),
    #[error("influxd files in {dir}: {source}")]
    Files {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start influxd: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("influxd exited ({status}) while starting:\n{log}")]
    Exited { status: String, log: String },
    #[error("influxd: no 204 on /ping within 30 s:\n{0}")]
    NotReady(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("influxd /query `{query}`: {reason}")]
    Query { query: String, reason: String },
}

pub struct Influx {
    child: Option<Child>,
    pub ns: String,
    /// `ip:port` it listens on inside `ns`.
    pub http: String,
    pub dir: PathBuf,
}

type Points = BTreeMap<(String, String, u64), BTreeMap<String, Value>>;

impl Influx {
    /// Starts influxd in namespace `ns`, listening on `addr` (an address of that namespace), with
    /// its files under `dir`, and creates database `db`.
    pub fn start(
        ns: &str,
        addr: std::net::Ipv4Addr,
        dir: PathBuf,
        db: &str,
    ) -> Result<Influx, InfluxError> {
        std::fs::create_dir_all(&dir).map_err(|source| InfluxError::Files {
            dir: dir.clone(),
            source,
        })?;
        let mut s = Influx {
            child: None,
            ns: ns.to_string(),
            http: format!("{addr}:8086"),
            dir,
        };
        s.write_config(&format!("{addr}:8088"))?;
        s.spawn()?;
        s.exec(&format!("CREATE DATABASE \"{db}\""))?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    fn files_err(&self) -> impl FnOnce(std::io::Error) -> InfluxError + '_ {
        move |source| InfluxError::Files {
            dir: self.dir.clone(),
            source,
        }
    }

    fn write_config(&self, rpc: &str) -> Result<(), InfluxError> {
        let out = std::process::Command::new("influxd")
            .arg("config")
            .stderr(Stdio::null())
            .output()
            .map_err(|e| InfluxError::Config(e.to_string()))?;
        let text = String::from_utf8(out.stdout).map_err(|e| InfluxError::Config(e.to_string()))?;
        let mut cfg: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| InfluxError::Config(e.to_string()))?;
        let d = &self.dir;
        let s = |v: String| toml::Value::String(v);
        let b = toml::Value::Boolean;
        let mut set = |section: Option<&str>, key: &str, v: toml::Value| {
            let t = match section {
                None => Some(&mut cfg),
                Some(sec) => cfg.get_mut(sec).and_then(|v| v.as_table_mut()),
            };
            let t = t.ok_or_else(|| InfluxError::Config(format!("no section [{section:?}]")))?;
            t.insert(key.to_owned(), v);
            Ok::<_, InfluxError>(())
        };
        set(None, "reporting-enabled", b(false))?;
        set(None, "bind-address", s(rpc.to_string()))?;
        set(Some("meta"), "dir", s(d.join("meta").display().to_string()))?;
        set(Some("data"), "dir", s(d.join("data").display().to_string()))?;
        set(
            Some("data"),
            "wal-dir",
            s(d.join("wal").display().to_string()),
        )?;
        set(Some("data"), "query-log-enabled", b(false))?;
        set(Some("monitor"), "store-enabled", b(false))?;
        set(Some("http"), "bind-address", s(self.http.clone()))?;
        set(Some("http"), "log-enabled", b(false))?;
        std::fs::write(d.join("influxd.conf"), cfg.to_string()).map_err(self.files_err())
    }

    /// Starts (or restarts, on the same data) influxd and waits for /ping.
    pub fn spawn(&mut self) -> Result<(), InfluxError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("influxd.log"))
            .map_err(self.files_err())?;
        let log2 = log.try_clone().map_err(self.files_err())?;
        // `ip netns exec` execs influxd: the child's pid is influxd's.
        let child = netns::command(&self.ns, "influxd")
            .args(["run", "-config"])
            .arg(self.dir.join("influxd.conf"))
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .map_err(InfluxError::Spawn)?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let url = format!("{}/ping", self.url());
            let ok = netns::run_in(&self.ns, || {
                agent()
                    .get(&url)
                    .call()
                    .is_ok_and(|r| r.status().as_u16() == 204)
            })?;
            if ok {
                return Ok(());
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(InfluxError::Exited {
                    status: st.to_string(),
                    log: self.log(),
                });
            }
            if Instant::now() >= deadline {
                return Err(InfluxError::NotReady(self.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// influxd's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("influxd.log")).unwrap_or_default()
    }

    /// SIGTERM, and kill -9 if influxd has not exited within 10 s (a clean stop, for the demo).
    pub fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(c.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kill -9 (an outage of the central side).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn query_raw(&self, post: bool, db: Option<&str>, q: &str) -> Result<Value, InfluxError> {
        let err = |reason: String| InfluxError::Query {
            query: q.to_owned(),
            reason,
        };
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
            let mut resp = resp.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = resp
                .body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_string()
                .map_err(|e| e.to_string())?;
            if status != 200 {
                return Err(format!("HTTP {status}: {body}"));
            }
            Ok(body)
        })?
        .map_err(err)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| err(format!("{e}: {text}")))?;
        // /query answers 200 even when a statement fails: the error is in results[i].error.
        for r in v["results"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(e) = r.get("error") {
                return Err(err(e.to_string()));
            }
        }
        Ok(v)
    }

    pub fn exec(&self, q: &str) -> Result<Value, InfluxError> {
        self.query_raw(true, None, q)
    }

    pub fn query(&self, db: &str, q: &str) -> Result<Value, InfluxError> {
        self.query_raw(false, Some(db), q)
    }

    /// All rollup points, keyed by (link, boot, time): column → value. A point returned twice
    /// is an error.
    pub fn points(&self, db: &str) -> Result<Points, InfluxError> {
        const Q: &str = "SELECT * FROM linkpulse_rollup";
        let bad = |reason: &str| InfluxError::Query {
            query: Q.into(),
            reason: reason.into(),
        };
        let v = self.query(db, Q)?;
        let mut out = BTreeMap::new();
        let Some(series) = v["results"][0]["series"].as_array() else {
            return Ok(out);
        };
        for s in series {
            let cols: Vec<String> = s["columns"]
                .as_array()
                .ok_or_else(|| bad("no columns"))?
                .iter()
                .map(|c| c.as_str().unwrap_or_default().to_owned())
                .collect();
            for row in s["values"].as_array().ok_or_else(|| bad("no values"))? {
                let row = row.as_array().ok_or_else(|| bad("a row is no array"))?;
                let mut m: BTreeMap<String, Value> =
                    cols.iter().cloned().zip(row.iter().cloned()).collect();
                m.retain(|_, v| !v.is_null());
                let tag = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
                let (Some(link), Some(boot), Some(time)) = (
                    tag("link"),
                    tag("boot"),
                    m.get("time").and_then(Value::as_u64),
                ) else {
                    return Err(bad(&format!("a point without link, boot or time: {m:?}")));
                };
                let key = (link, boot, time);
                if out.contains_key(&key) {
                    return Err(bad(&format!("point {key:?} returned twice")));
                }
                out.insert(key, m);
            }
        }
        Ok(out)
    }

    /// Rollup points stored (by a field every point has).
    pub fn count(&self, db: &str) -> Result<u64, InfluxError> {
        let v = self.query(db, "SELECT count(window_ns) FROM linkpulse_rollup")?;
        Ok(v["results"][0]["series"][0]["values"][0][1]
            .as_u64()
            .unwrap_or(0))
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
    if r.tcp_rtt_samples > 0 {
        put("tcp_rtt_samples", json!(r.tcp_rtt_samples));
    }
    if r.owd_samples > 0 {
        put("owd_samples", json!(r.owd_samples));
    }
    for (k, v) in [
        ("tcp_rtt_min_ns", r.tcp_rtt_min_ns),
        ("tcp_rtt_mean_ns", r.tcp_rtt_mean_ns),
        ("tcp_rtt_max_ns", r.tcp_rtt_max_ns),
        ("owd_error_ns", r.owd_error_ns),
    ] {
        if let Some(v) = v {
            put(k, json!(v));
        }
    }
    for (k, v) in [
        ("owd_up_mean_ns", r.owd_up_mean_ns),
        ("owd_up_max_ns", r.owd_up_max_ns),
        ("owd_down_mean_ns", r.owd_down_mean_ns),
        ("owd_down_max_ns", r.owd_down_max_ns),
    ] {
        if let Some(v) = v {
            put(k, json!(v));
        }
    }
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
