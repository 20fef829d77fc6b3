//! The NOC's side, against the real tools (root; real Tarantool, InfluxDB 1.6.7 and Prometheus
//! 2.42 from Debian): the alerting rules pass `promtool check rules` and `promtool test rules`;
//! every InfluxQL query of the InfluxDB dashboard and of the README returns data from a testbed
//! run forwarded to a real influxd; every PromQL expression of the Prometheus dashboard returns
//! data from a real Prometheus scraping the daemon.
mod common;
#[path = "common/influx.rs"]
mod influx;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{plain, Run, TempDir};
use influx::Influx;
use linkpulse::stamp::{Reflector, ReflectorConfig};
use linkpulse_testbed::{
    netns,
    traffic::{TcpDirection, TcpFlow, UdpFlow, UdpSink},
    ModemKind, TestbedOptions,
};
use serde_json::Value;

const DB: &str = "noc";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo().join("deploy/prometheus"))
        .output()
        .expect("run promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alerting_rules_pass_promtool_check_and_unit_tests() {
    let check = promtool(&["check", "rules", "linkpulse-alerts.yml"]);
    assert!(check.contains("SUCCESS"), "{check}");
    let test = promtool(&["test", "rules", "linkpulse-alerts.test.yml"]);
    assert!(test.contains("SUCCESS"), "{test}");
}

/// The dashboard's queries (and template variables), with Grafana's macros replaced the way
/// Grafana would for router `router`, all links, the last hour and a 1 s interval.
fn influx_dashboard_queries(router: &str) -> Vec<String> {
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/linkpulse-influxdb.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut qs: Vec<String> = d["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| v["query"].as_str().expect("variable query").to_string())
        .collect();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            qs.push(t["query"].as_str().expect("raw query").to_string());
        }
    }
    qs.iter()
        .map(|q| {
            q.replace("$timeFilter", "time > now() - 1h")
                .replace("$__interval", "1s")
                .replace("$router", router)
                .replace("$link", ".*")
        })
        .collect()
}

/// The InfluxQL block of the README, one query per line, with its example router id replaced.
fn readme_queries(router: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let start = readme
        .find("**InfluxQL**")
        .expect("README has an InfluxQL section");
    let block = &readme[start..];
    let block = &block[block.find("```sql").expect("sql block") + 6..];
    let block = &block[..block.find("```").expect("end of sql block")];
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .map(|l| l.replace("router-0001", router))
        .collect()
}

/// Rows with at least one non-null value over all series of the answer.
fn rows_with_data(v: &Value) -> usize {
    v["results"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["series"].as_array().into_iter().flatten())
        .flat_map(|s| s["values"].as_array().into_iter().flatten())
        .filter(|row| {
            row.as_array()
                .is_some_and(|r| r.iter().skip(1).any(|x| !x.is_null()) || r.len() == 1)
        })
        .count()
}

struct Prometheus {
    child: Child,
    addr: String,
    ns: String,
    _dir: TempDir,
}

impl Prometheus {
    /// A real Prometheus in `ns`, scraping the daemon at `target` every second.
    fn start(ns: &str, target: SocketAddr) -> Prometheus {
        let dir = TempDir::new("lpnoc-prom");
        let cfg = dir.0.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: linkpulse\n    static_configs:\n      - targets: ['{target}']\n",
                repo().join("deploy/prometheus/linkpulse-alerts.yml").display()
            ),
        )
        .expect("prometheus config");
        let addr = "127.0.0.1:19090".to_string();
        let child = netns::command(ns, "prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("prometheus.log")).expect("log"))
            .spawn()
            .expect("start prometheus (Debian package prometheus)");
        Prometheus {
            child,
            addr,
            ns: ns.to_string(),
            _dir: dir,
        }
    }

    fn get(&self, path: &str, pairs: &[(&str, &str)]) -> Option<Value> {
        let url = format!("http://{}{path}", self.addr);
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        netns::run_in(&self.ns, move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .proxy(None)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into();
            let mut r = agent.get(&url).query_pairs(pairs).call().ok()?;
            let text = r.body_mut().read_to_string().ok()?;
            serde_json::from_str(&text).ok()
        })
        .expect("enter ns")
    }

    fn query(&self, expr: &str) -> Value {
        let v = self
            .get("/api/v1/query", &[("query", expr)])
            .unwrap_or_else(|| panic!("prometheus did not answer {expr}"));
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn dashboard_and_readme_queries_return_data_from_a_testbed_run() {
    let store_dir = TempDir::new("lpnoc-db");
    let influx_dir = TempDir::new("lpnoc-influx");
    let (_, srv0) = linkpulse_testbed::topology::addr_v4(0);
    let toml = format!(
        "[[forward]]\nname = \"noc\"\nurl = \"http://{srv0}:8086\"\ndatabase = \"{DB}\"\ntimeout_s = 5\n"
    );
    // Each modem probed (RTT, loss, health) against a reflector behind it.
    let mut reflectors = Vec::new();
    let run = Run::start_custom(
        "lpnoc",
        vec![
            plain("wwan0", ModemKind::Veth),
            plain("wwan1", ModemKind::Tun),
        ],
        &[],
        TestbedOptions::default(),
        None,
        Some(store_dir.0.clone()),
        &|text| {
            let mut text = common::with_toml(text, &toml);
            for k in 0..2 {
                let (_, srv) = linkpulse_testbed::topology::addr_v4(k);
                let link = format!("interface = \"wwan{k}\"\noperator = \"test\"\n");
                assert!(text.contains(&link), "config layout changed:\n{text}");
                text = text.replace(
                    &link,
                    &format!("{link}[link.probe]\nreflector = \"{srv}\"\n"),
                );
            }
            text + "[probe]\nmin_rate_hz = 20\nmax_rate_hz = 20\n"
        },
        &mut |bed| {
            for k in 0..2 {
                let (_, srv) = bed.modem_addr_v4(k);
                let cfg = ReflectorConfig {
                    listen: SocketAddr::new(srv.into(), 862),
                    ..ReflectorConfig::default()
                };
                reflectors.push(
                    netns::run_in(bed.server_ns(), || Reflector::bind(cfg))
                        .expect("enter server ns")
                        .expect("bind reflector")
                        .spawn()
                        .expect("reflector thread"),
                );
            }
        },
    );
    let central = Influx::start(run.bed.server_ns(), srv0, influx_dir.0.join("influx"), DB);
    let prom = Prometheus::start(run.bed.router_ns(), run.daemon().http_addr());
    let rtr = run.bed.router_ns().to_string();
    let mut flows = Vec::new();
    let mut sinks = Vec::new();
    for k in 0..2 {
        let (r, s) = run.bed.modem_addr_v4(k);
        let dst = SocketAddr::new(s.into(), 9810);
        sinks.push(
            UdpSink::new(run.bed.server_ns(), dst, None)
                .start()
                .expect("sink"),
        );
        flows.push(
            UdpFlow::new(&rtr, format!("wwan{k}"), r.into(), dst, 300, 500)
                .start()
                .expect("flow"),
        );
    }
    // A paced TCP flow on wwan0: passive TCP RTT (the README's query of it needs samples).
    let tcp = {
        let (r, srv) = run.bed.modem_addr_v4(0);
        TcpFlow {
            client_ns: rtr.clone(),
            client_dev: "wwan0".into(),
            client_src: r.into(),
            server_ns: run.bed.server_ns().to_string(),
            server_dev: Some(run.bed.server_ifname(0)),
            server: SocketAddr::new(srv.into(), 9811),
            direction: TcpDirection::ClientToServer,
            rate_kbit: Some(2_000),
        }
        .start()
        .expect("tcp flow")
    };
    // Some seconds of complete windows in InfluxDB, and of scrapes in Prometheus.
    let deadline = Instant::now() + Duration::from_secs(120);
    while central.count(DB) < 60 {
        assert!(
            Instant::now() < deadline,
            "no rollups reached InfluxDB in 120 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(5));

    let mut failed = Vec::new();
    let queries: Vec<(&str, String)> = influx_dashboard_queries("e2e")
        .into_iter()
        .map(|q| ("deploy/grafana/linkpulse-influxdb.json", q))
        .chain(readme_queries("e2e").into_iter().map(|q| ("README.md", q)))
        .collect();
    assert!(queries.len() >= 12, "queries found: {queries:?}");
    for (from, q) in &queries {
        // linkpulse_lost holds what retention removed before it was sent: daemon_forward's
        // retention test runs those queries (here nothing is lost).
        if q.contains("linkpulse_lost") {
            continue;
        }
        let v = central.query(DB, q);
        let n = rows_with_data(&v);
        println!("{n:>5} rows  {from}: {q}");
        if n == 0 {
            failed.push(format!("{from}: {q}\n  → {v}"));
        }
    }

    // Prometheus: the dashboard's expressions over the scrapes of this run.
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/linkpulse-prometheus.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let deadline = Instant::now() + Duration::from_secs(60);
    while prom
        .get("/api/v1/query", &[("query", "up{job=\"linkpulse\"} == 1")])
        .is_none_or(|v| v["data"]["result"].as_array().is_none_or(Vec::is_empty))
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the daemon in 60 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(12));
    let instance = run.daemon().http_addr().to_string();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let e = t["expr"]
                .as_str()
                .expect("expr")
                .replace("$instance", &instance)
                .replace("$__rate_interval", "10s");
            let v = prom.query(&e);
            let n = v["data"]["result"].as_array().map_or(0, Vec::len);
            println!("{n:>5} series  deploy/grafana/linkpulse-prometheus.json: {e}");
            if n == 0 {
                failed.push(format!("prometheus: {e}\n  → {v}"));
            }
        }
    }
    let var = d["templating"]["list"][0]["query"]
        .as_str()
        .expect("variable");
    let metric = var
        .trim_start_matches("label_values(")
        .split(',')
        .next()
        .expect("metric of the variable");
    assert!(
        prom.query(metric)["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "the dashboard's variable {var} finds no series"
    );
    drop(tcp);
    drop(flows);
    drop(sinks);
    drop(run);
    for r in reflectors {
        r.stop().expect("reflector stops");
    }
    assert!(
        failed.is_empty(),
        "queries returned no data:\n{}",
        failed.join("\n")
    );
}
