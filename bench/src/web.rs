//! web.*: the 30-day history request from the local store (`api.series_30d_ms`) and the page's
//! first render in headless Chromium (`ui.first_render_ms`).
//!
//! The store is filled through the real put path (`lp_put_rollups`, tiers included) with 30 days
//! of 500 ms rollups of link 0 and the last day of links 1..3, much faster than real time, and
//! kept in `--web-store` for later runs (a marker file records what it holds; the requested
//! range is the filled one, so a reused store answers the same request). The daemon then runs
//! with that data dir on a bench namespace and the requests go to its HTTP server.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use linkpulse::{Config, Daemon};
use linkpulse_sink::store::{LocalConfig, Rollup, Store};
use linkpulse_testbed::netns;
use serde_json::{json, Value};

use crate::{net::BenchNet, percentile, report::Metric, Args};

const DAY_MS: i64 = 86_400_000;
const WINDOW_MS: i64 = 500;
/// The page's step for 30 days (app.js STEPS_MS: the first ≥ span / 600).
const STEP_MS: i64 = 7_200_000;
const LINKS: usize = 4;
/// Samples: cold = a fresh daemon and store process each (vinyl's cache empty; the OS page
/// cache is not dropped, other work shares the machine), warm = repeats on one.
const COLD: usize = 3;
const WARM: usize = 9;

pub fn default_store() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/web-store")
}

/// What a filled store holds.
#[derive(Debug, Clone, Copy)]
struct Filled {
    days: i64,
    /// End of the filled range (exclusive), UTC ms, a multiple of STEP_MS.
    end_ms: i64,
    rows: u64,
    /// Rows per second of the fill that made it.
    rate: f64,
}

/// A small deterministic generator (xorshift64*): realistic-looking, reproducible figures.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn rollup(rng: &mut Rng, link: u32, start_ms: i64) -> Rollup {
    let rx = 2_000_000.0 + 8_000_000.0 * rng.unit();
    let tx = rx * 0.1;
    let rtt = 30_000_000 + (20_000_000.0 * rng.unit()) as u64;
    let bytes = |bps: f64| (bps / 8.0 * 0.5) as u64;
    Rollup {
        link_id: link,
        window_start_ns: start_ms as u64 * 1_000_000,
        boot_tag: 1,
        window_ns: WINDOW_MS as u64 * 1_000_000,
        complete: !rng.next().is_multiple_of(10_000),
        link_state: 1,
        clock_state: 1,
        clock_error_ns: 20_000,
        rx_bytes: bytes(rx),
        tx_bytes: bytes(tx),
        rx_packets: bytes(rx) / 1200,
        tx_packets: bytes(tx) / 200,
        rx_rate_mean_bps: rx,
        rx_rate_peak_bps: rx * 2.5,
        rx_rate_p50_bps: rx,
        rx_rate_p95_bps: rx * 1.8,
        rx_rate_p99_bps: rx * 2.2,
        tx_rate_mean_bps: tx,
        tx_rate_peak_bps: tx * 3.0,
        tx_rate_p50_bps: tx,
        tx_rate_p95_bps: tx * 2.0,
        tx_rate_p99_bps: tx * 2.6,
        rtt_min_ns: Some(rtt - 5_000_000),
        rtt_mean_ns: Some(rtt),
        rtt_max_ns: Some(rtt + 15_000_000),
        rtt_p50_ns: Some(rtt),
        rtt_p99_ns: Some(rtt + 12_000_000),
        probes_sent_fwd: 50,
        probes_lost_fwd: u32::from(rng.next().is_multiple_of(100)),
        probes_sent_bwd: 50,
        probes_lost_bwd: 0,
        ..Rollup::default()
    }
}

fn read_marker(path: &Path) -> Option<Filled> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    Some(Filled {
        days: v["days"].as_i64()?,
        end_ms: v["end_ms"].as_i64()?,
        rows: v["rows"].as_u64()?,
        rate: v["rate"].as_f64()?,
    })
}

/// Fills `dir` (or reuses what a previous run filled with the same number of days).
fn fill(dir: &Path, days: i64) -> anyhow::Result<(Filled, bool)> {
    let marker = dir.join("bench-fill.json");
    if let Some(f) = read_marker(&marker).filter(|f| f.days == days) {
        return Ok((f, true));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = Store::start_local(LocalConfig::new(dir)).context("starting the store")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let end_ms = now - now.rem_euclid(STEP_MS);
    let start_ms = end_ms - days * DAY_MS;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut batch = Vec::with_capacity(2000);
    let mut rows = 0u64;
    let t = Instant::now();
    let total = (end_ms - start_ms) / WINDOW_MS;
    let mut next_report = Instant::now() + Duration::from_secs(15);
    // As the daemon writes them: window after window, the links of one window together.
    for w in 0..total {
        let ws = start_ms + w * WINDOW_MS;
        for link in 0..LINKS as u32 {
            if link == 0 || ws >= end_ms - DAY_MS {
                batch.push(rollup(&mut rng, link, ws));
            }
        }
        if batch.len() >= 2000 || w == total - 1 {
            store.put_rollups(&batch).context("filling the store")?;
            rows += batch.len() as u64;
            batch.clear();
            if Instant::now() >= next_report {
                next_report += Duration::from_secs(15);
                eprintln!(
                    "bench: web: filled {rows} rollups ({:.0} %), {:.0} rows/s",
                    100.0 * w as f64 / total as f64,
                    rows as f64 / t.elapsed().as_secs_f64()
                );
            }
        }
    }
    let rate = rows as f64 / t.elapsed().as_secs_f64();
    // A checkpoint, so each daemon start below recovers from it instead of replaying the fill's
    // whole write-ahead log.
    let _: (bool,) = store
        .client()
        .eval("box.snapshot() return true", &[(); 0])
        .context("snapshot after the fill")?;
    store.stop();
    let f = Filled {
        days,
        end_ms,
        rows,
        rate,
    };
    std::fs::write(
        &marker,
        json!({"days": days, "end_ms": end_ms, "rows": rows, "rate": rate}).to_string(),
    )?;
    Ok((f, false))
}

/// A plain HTTP/1.1 GET from inside `ns`: status, body, and the wall time of the whole request.
fn get(ns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String, f64)> {
    let t = Instant::now();
    let mut s = netns::run_in(ns, || TcpStream::connect(addr))??;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("HTTP answer without a header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("HTTP status line")?;
    Ok((status, body.to_string(), ms))
}

fn series(ns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(Value, f64)> {
    let (status, body, ms) = get(ns, addr, path)?;
    ensure!(status == 200, "{path}: {status} {body}");
    Ok((serde_json::from_str(&body)?, ms))
}

fn start_daemon(net: &BenchNet, cfg: &Config) -> anyhow::Result<Daemon> {
    let d = netns::run_in(&net.router, || Daemon::start(cfg, Vec::new()))??;
    let t = Instant::now();
    while d.shared().store_handle().is_none() {
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "the store did not come up within 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(d)
}

pub fn web(args: &Args) -> anyhow::Result<Vec<Metric>> {
    let days = i64::from(args.web_days);
    let t = Instant::now();
    let (filled, reused) = fill(&args.web_store, days)?;
    let fill_note = if reused {
        format!(
            "store reused from {} ({} rollups, filled at {:.0} rows/s)",
            args.web_store.display(),
            filled.rows,
            filled.rate
        )
    } else {
        format!(
            "store filled in {:.0} s: {} rollups at {:.0} rows/s through lp_put_rollups",
            t.elapsed().as_secs_f64(),
            filled.rows,
            filled.rate
        )
    };
    eprintln!("bench: web: {fill_note}");

    let net = BenchNet::up("w", LINKS)?;
    let text = net.config(LINKS, None).replace(
        "[store]\nenabled = false\n",
        &format!(
            "[store]\ndata_dir = \"{}\"\nretention_days = 0\nmax_disk_mb = 0\n",
            args.web_store.display()
        ),
    );
    let cfg = Config::parse(&text, Path::new("bench.toml"))?;
    let from = filled.end_ms - days * DAY_MS;
    let path = format!(
        "/api/v1/series?link=0&from={from}&to={}&step={STEP_MS}&partial=true",
        filled.end_ms
    );
    let expected_windows = days * DAY_MS / WINDOW_MS;

    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let mut last = None;
    for i in 0..COLD {
        let d = start_daemon(&net, &cfg)?;
        let addr = d.http_addr();
        let (v, ms) = series(&net.router, addr, &path)?;
        cold.push(ms);
        let pts = v["points"].as_array().context("points")?;
        let windows: i64 = pts.iter().filter_map(|p| p["windows"].as_i64()).sum();
        ensure!(
            v["source_ms"] == 3_600_000 && windows == expected_windows,
            "the 30-day answer: source {} and {windows} windows (expected the 1 h tier, {expected_windows})",
            v["source_ms"]
        );
        if i + 1 < COLD {
            d.stop();
        } else {
            last = Some(d);
        }
    }
    let d = last.context("daemon")?;
    let addr = d.http_addr();
    for _ in 0..WARM {
        warm.push(series(&net.router, addr, &path)?.1);
    }
    // Peer: the same request over one day from the rollups (the most they serve at once),
    // scaled to the 30 days; and the tier's answer for that day, which must be equal.
    let day_q = format!(
        "/api/v1/series?link=0&from={}&to={}&step={STEP_MS}&partial=true",
        filled.end_ms - DAY_MS,
        filled.end_ms
    );
    let mut raw = Vec::new();
    let mut raw_v = Value::Null;
    for _ in 0..3 {
        let (v, ms) = series(&net.router, addr, &format!("{day_q}&source=raw"))?;
        raw.push(ms);
        raw_v = v;
    }
    let (tier_v, _) = series(&net.router, addr, &day_q)?;
    let sum = |v: &Value, k: &str| -> u64 {
        v["points"]
            .as_array()
            .map_or(0, |p| p.iter().filter_map(|p| p[k].as_u64()).sum())
    };
    let equal = ["windows", "down_bytes", "up_packets"]
        .iter()
        .all(|k| sum(&raw_v, k) == sum(&tier_v, k))
        && raw_v["points"].as_array().map(Vec::len) == tier_v["points"].as_array().map(Vec::len);
    ensure!(equal, "one day from the rollups and from the tier differ");

    let ui = first_render(&net, addr, days);
    d.stop();
    let cold_med = percentile(&mut cold.clone(), 0.5);
    let warm_med = percentile(&mut warm.clone(), 0.5);
    let raw_med = percentile(&mut raw, 0.5);
    let mut out = vec![
        Metric::new("api.series_30d_ms", cold_med.max(warm_med), "ms")
            .peer(
                raw_med * days as f64,
                format!("the same request from the 500 ms rollups: 1 day measured ({raw_med:.0} ms, median of 3) × {days}"),
            )
            .target("≤ 200")
            .note(format!(
                "link 0, {days} d at {} h steps (1 h tier); cold median {cold_med:.1} ms ({COLD} fresh daemons: {}), warm median {warm_med:.1} ms ({WARM}); value = the worse; {fill_note}",
                STEP_MS / 3_600_000,
                cold.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join("/")
            )),
        Metric::new("api.series_30d_warm_ms", warm_med, "ms")
            .peer(raw_med * days as f64, "rollups, 1 day measured × 30 (as above)"),
    ];
    match ui {
        Ok(m) => out.extend(m),
        Err(e) => bail!("ui.first_render_ms: {e:#} (the API figures were: cold {cold_med:.1} ms, warm {warm_med:.1} ms)"),
    }
    Ok(out)
}

/// Chromium in `ns`, its process group killed on drop.
struct Browser(Child);
impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this bench created.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// A minimal DevTools client: numbered calls, events skipped.
struct Cdp {
    ws: tungstenite::WebSocket<TcpStream>,
    id: u64,
}

impl Cdp {
    fn connect(ns: &str, port: u16, path: &str) -> anyhow::Result<Cdp> {
        let s = netns::run_in(ns, || {
            TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
        })??;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}{path}").as_str(), s)
            .map_err(|e| anyhow::anyhow!("devtools websocket: {e}"))?;
        Ok(Cdp { ws, id: 0 })
    }

    fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.id += 1;
        let msg = json!({"id": self.id, "method": method, "params": params});
        self.ws.send(tungstenite::Message::text(msg.to_string()))?;
        loop {
            let tungstenite::Message::Text(t) = self.ws.read()? else {
                continue;
            };
            let v: Value = serde_json::from_str(t.as_str())?;
            if v["id"] == self.id {
                ensure!(v.get("error").is_none(), "{method}: {v}");
                return Ok(v["result"].clone());
            }
        }
    }

    /// The value of `expr` once it is not null/false (exceptions while a page loads count as not
    /// yet).
    fn wait(&mut self, expr: &str, deadline: Duration) -> anyhow::Result<Value> {
        let t = Instant::now();
        let guarded =
            format!("(() => {{ try {{ return ({expr}); }} catch (e) {{ return null; }} }})()");
        loop {
            let r = self.call(
                "Runtime.evaluate",
                json!({"expression": guarded, "returnByValue": true}),
            )?;
            let v = r["result"]["value"].clone();
            if !(v.is_null() || v == Value::Bool(false)) {
                return Ok(v);
            }
            ensure!(t.elapsed() < deadline, "`{expr}` never held");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The peer page: a static table of the same links and one canvas chart of 360 points, inline,
/// marking its render the same way.
fn static_page() -> String {
    let rows: String = (0..LINKS)
        .map(|k| format!("<tr><td>wwan{k}</td><td>attached</td><td>op{k}</td><td>5.0 Mbit/s</td><td>0.5 Mbit/s</td><td>40 ms</td><td>0.1 %</td></tr>"))
        .collect();
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>static</title></head><body>\
         <table id=links><tbody>{rows}</tbody></table><canvas id=c width=1200 height=160></canvas>\
         <script>const c = document.getElementById('c').getContext('2d'); c.beginPath();\
         for (let i = 0; i < 360; i++) c.lineTo(i * 1200 / 360, 80 + 60 * Math.sin(i / 9));\
         c.stroke(); document.documentElement.dataset.firstRender = String(Math.round(performance.now()));\
         </script></body></html>"
    )
}

/// Serves `body` to every request until the listener is dropped (the thread ends with the
/// bench process; it only ever answers this page).
fn serve_static(ns: &str, body: String) -> anyhow::Result<u16> {
    let l = netns::run_in(ns, || TcpListener::bind("127.0.0.1:0"))??;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(port)
}

/// Navigates to `url` and returns the page's first-render mark (ms since navigation start).
fn load(page: &mut Cdp, url: &str) -> anyhow::Result<f64> {
    page.call("Page.navigate", json!({"url": url}))?;
    let v = page.wait(
        &format!(
            "location.href === {url:?} && document.readyState !== 'loading' && document.documentElement.dataset.firstRender"
        ),
        Duration::from_secs(60),
    )?;
    v.as_str()
        .and_then(|s| s.parse().ok())
        .context("firstRender mark")
}

fn first_render(net: &BenchNet, addr: SocketAddr, days: i64) -> anyhow::Result<Vec<Metric>> {
    let profile = std::env::temp_dir().join(format!("lpbench-chromium-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    let child = linkpulse_testbed::browser::spawn_headless(&net.router, &profile)
        .context("chromium: install it with `cargo xtask setup` (Debian package chromium)")?;
    let browser = Browser(child);
    let r = (|| -> anyhow::Result<Vec<Metric>> {
        let active = profile.join("DevToolsActivePort");
        let t = Instant::now();
        let (port, path) = loop {
            if let Ok(s) = std::fs::read_to_string(&active) {
                let mut l = s.lines();
                if let (Some(p), Some(w)) = (l.next(), l.next()) {
                    break (p.parse::<u16>()?, w.to_string());
                }
            }
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "chromium did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut b = Cdp::connect(&net.router, port, &path)?;
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}))?;
        let id = target["targetId"]
            .as_str()
            .context("target id")?
            .to_string();
        let mut page = Cdp::connect(&net.router, port, &format!("/devtools/page/{id}"))?;
        page.call("Page.enable", json!({}))?;
        let url = format!("http://127.0.0.1:{}/", addr.port());
        let peer_url = format!(
            "http://127.0.0.1:{}/",
            serve_static(&net.router, static_page())?
        );
        let (mut ours, mut peer) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            ours.push(load(&mut page, &url)?);
            peer.push(load(&mut page, &peer_url)?);
        }
        let first = ours[0];
        // The 30-day range on the loaded page: from the change to the charts drawn.
        load(&mut page, &url)?;
        page.wait("window.linkpulse.histLoads >= 1", Duration::from_secs(60))?;
        let month = page.wait(
            &format!(
                "(() => {{ const s = document.getElementById('range'); const l = window.linkpulse; \
                 if (l.month === undefined) {{ l.month = null; l.histLoads0 = l.histLoads; \
                 s.value = '{}'; s.dispatchEvent(new Event('change')); return null; }} \
                 return l.histLoads > l.histLoads0 ? l.histRenderMs : null; }})()",
                days * DAY_MS
            ),
            Duration::from_secs(60),
        )?;
        let month = month.as_f64().context("histRenderMs")?;
        Ok(vec![
            Metric::new("ui.first_render_ms", percentile(&mut ours, 0.5), "ms")
                .peer(
                    percentile(&mut peer, 0.5),
                    "static HTML page (4-row table + one 360-point canvas chart) from a minimal server, same browser, same run",
                )
                .note(format!(
                    "headless Chromium, navigation start → every link's row and the history charts drawn (the page's mark), median of 5 (first, cold cache: {first:.0} ms); {LINKS} links"
                )),
            Metric::new("ui.history_30d_ms", month, "ms").note(format!(
                "the page's {days}-day range picked: {LINKS} series requests (2 h steps from the 1 h tier) and the charts drawn"
            )),
        ])
    })();
    drop(browser);
    let _ = std::fs::remove_dir_all(&profile);
    r
}
