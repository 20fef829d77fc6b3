//! The page in real headless Chromium (Debian's `chromium`), driven over the DevTools protocol,
//! against the daemon on a testbed, listening off loopback with a token and its local store:
//! login, every modem shown, the live graph advances, a history range renders and a reload
//! gives identical data, the CSV export downloads, the layout fits a phone, the 30-day range
//! renders from the 1 h tier. Screenshots go to target/test-artifacts/.
mod common;

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Child,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use base64::Engine as _;
use common::{plain, Run, TempDir};
use linkpulse_testbed::{
    netns,
    traffic::{UdpFlow, UdpSink},
    ModemKind, TestbedOptions,
};
use serde_json::{json, Value};

/// Chromium in the router namespace; killed (its whole process group) on drop.
struct Browser {
    child: Child,
}

impl Browser {
    fn start(ns: &str, profile: &Path) -> Browser {
        let child = linkpulse_testbed::browser::spawn_headless(ns, profile)
            .expect("chromium: install it with `cargo xtask setup` (Debian package chromium)");
        Browser { child }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this test created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

type Ws = tungstenite::WebSocket<TcpStream>;

/// A minimal DevTools client: numbered calls, events skipped.
struct Cdp {
    ws: Ws,
    id: u64,
}

impl Cdp {
    fn connect(ns: &str, port: u16, path: &str) -> Cdp {
        let url = format!("ws://127.0.0.1:{port}{path}");
        // The socket is made inside the namespace and stays there.
        let stream = netns::run_in(ns, || {
            TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).expect("devtools port")
        })
        .expect("enter ns");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("devtools websocket");
        Cdp { ws, id: 0 }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.id += 1;
        let msg = json!({"id": self.id, "method": method, "params": params});
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .expect("send");
        loop {
            let m = self.ws.read().expect("devtools read");
            let tungstenite::Message::Text(t) = m else {
                continue;
            };
            let v: Value = serde_json::from_str(t.as_str()).expect("devtools JSON");
            if v["id"] == self.id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    fn wait(&mut self, what: &str, expr: &str, deadline: Duration) {
        let t = Instant::now();
        loop {
            // The page may still be loading: an exception counts as "not yet".
            let guarded =
                format!("(() => {{ try {{ return ({expr}); }} catch (e) {{ return false; }} }})()");
            if self.eval(&guarded) == Value::Bool(true) {
                return;
            }
            assert!(t.elapsed() < deadline, "{what}: `{expr}` never held");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self, path: &Path) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("png data"))
            .expect("base64");
        std::fs::write(path, png).expect("write screenshot");
    }
}

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let d = target.join("test-artifacts");
    std::fs::create_dir_all(&d).expect("artifacts dir");
    d
}

#[test]
fn web_page_in_headless_chromium() {
    let files = TempDir::new("lpbrw-files");
    let token = "browser-token-0123456789abcdef";
    let token_file = files.0.join("api.token");
    std::fs::write(&token_file, token).expect("token file");
    let store_dir = files.0.join("db");
    let tf = token_file.display().to_string();
    let run = Run::start_edited(
        "lpbrw",
        vec![
            plain("wwan0", ModemKind::Veth),
            plain("wwan1", ModemKind::Tun),
        ],
        &[],
        TestbedOptions::default(),
        None,
        Some(store_dir),
        &|t| {
            t.replace(
                "listen = \"127.0.0.1:0\"\n",
                &format!("listen = \"0.0.0.0:0\"\ntoken_file = \"{tf}\"\n"),
            )
        },
    );
    let ns = run.bed.router_ns().to_string();
    let (r, s) = run.bed.modem_addr_v4(0);
    let dst = SocketAddr::new(s.into(), 9820);
    let _sink = UdpSink::new(run.bed.server_ns(), dst, None)
        .start()
        .expect("sink");
    let flow = UdpFlow::new(&ns, "wwan0", r.into(), dst, 500, 900)
        .start()
        .expect("flow");
    let t = Instant::now();
    while run.daemon().shared().store.written.load(Ordering::Relaxed) < 2 * 16 {
        assert!(t.elapsed() < Duration::from_secs(60), "no rollups in 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }

    let profile = files.0.join("chromium");
    let _browser = Browser::start(&ns, &profile);
    // Chromium writes its DevTools port and browser path once it listens.
    let active = profile.join("DevToolsActivePort");
    let t = Instant::now();
    let (port, path) = loop {
        if let Ok(s) = std::fs::read_to_string(&active) {
            let mut l = s.lines();
            if let (Some(p), Some(w)) = (l.next(), l.next()) {
                break (p.parse::<u16>().expect("port"), w.to_string());
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "chromium did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut browser = Cdp::connect(&ns, port, &path);
    let url = format!("http://127.0.0.1:{}/", run.daemon().http_addr().port());
    let target = browser.call("Target.createTarget", json!({"url": url}));
    let id = target["targetId"].as_str().expect("target id").to_string();
    let mut page = Cdp::connect(&ns, port, &format!("/devtools/page/{id}"));
    page.call("Page.enable", json!({}));

    // Off loopback, the page asks for the token first.
    page.wait(
        "login form",
        "!document.getElementById('login').hidden",
        Duration::from_secs(30),
    );
    page.eval(
        "document.getElementById('token').value = 'wrong-token-0000000000000'; \
         document.getElementById('login-form').requestSubmit(); true",
    );
    page.wait(
        "wrong token refused",
        "document.getElementById('login-error').textContent.includes('wrong token')",
        Duration::from_secs(10),
    );
    page.eval(&format!(
        "document.getElementById('token').value = '{token}'; \
         document.getElementById('login-form').requestSubmit(); true"
    ));
    page.wait(
        "overview after login",
        "window.linkpulse.started === true && document.querySelectorAll('#links tbody tr').length === 2",
        Duration::from_secs(30),
    );
    let rows = page.eval("document.querySelector('#links tbody').innerText");
    let rows = rows.as_str().expect("rows text");
    assert!(rows.contains("wwan0") && rows.contains("wwan1"), "{rows}");
    assert!(rows.contains("attached"), "{rows}");

    // The live graph advances.
    page.wait(
        "live points",
        "window.linkpulse.livePoints > 20",
        Duration::from_secs(20),
    );
    let first = page
        .eval("window.linkpulse.liveLast")
        .as_f64()
        .expect("liveLast");
    std::thread::sleep(Duration::from_millis(1500));
    let later = page
        .eval("window.linkpulse.liveLast")
        .as_f64()
        .expect("liveLast");
    assert!(
        later > first + 500.0,
        "live graph advanced: {first} → {later}"
    );
    let live_up = page.eval("window.linkpulse.live.get(0).reduce((a, p) => a + p.up, 0) > 0");
    assert_eq!(
        live_up,
        Value::Bool(true),
        "the flow shows in the live graph"
    );

    // History: the range renders, a reload of the same range gives the same data.
    page.wait(
        "history",
        "(window.linkpulse.histLoads || 0) >= 1",
        Duration::from_secs(30),
    );
    let n = page.eval("JSON.parse(window.linkpulse.histJson)[0].points.length");
    assert!(n.as_u64().is_some_and(|n| n > 10), "history points: {n}");
    let h1 = page.eval("window.linkpulse.histJson");
    page.eval("document.getElementById('refresh').click(); true");
    page.wait(
        "history reload",
        "window.linkpulse.histLoads >= 2",
        Duration::from_secs(30),
    );
    let h2 = page.eval("window.linkpulse.histJson");
    assert_eq!(h1, h2, "the same range gives the same data on reload");
    // Synchronised cursor: hovering one chart shows values under every chart.
    page.eval(
        "(() => { const c = document.getElementById('hist-0'); const r = c.getBoundingClientRect(); \
         const pts = JSON.parse(window.linkpulse.histJson)[0].points, rg = window.linkpulse.range; \
         const t = pts[pts.length - 2].start_ms + 100; \
         c.dispatchEvent(new PointerEvent('pointermove', {clientX: r.left + r.width * (t - rg.from) / (rg.to - rg.from), clientY: r.top + 10})); \
         return true; })()",
    );
    let vals = page.eval("[...document.querySelectorAll('#history .val')].map(v => v.textContent)");
    let vals = vals.as_array().expect("values");
    assert_eq!(vals.len(), 2);
    assert!(
        vals.iter()
            .all(|v| v.as_str().is_some_and(|t| t.contains('↓'))),
        "{vals:?}"
    );

    // Each link's history has its RTT graph (probe RTT and passive TCP RTT) under the rates,
    // drawn (sized) like them; the points carry the TCP RTT fields (null without samples).
    let rtt = page.eval(
        "[0, 1].map(i => { const c = document.getElementById('hist-' + i + '-rtt'); \
         return !!c && c.width > 0 && c.height > 0; })",
    );
    assert_eq!(rtt, json!([true, true]), "RTT graphs");
    let keys = page.eval(
        "(() => { const p = JSON.parse(window.linkpulse.histJson)[0].points[0]; \
         return ['tcp_rtt_samples', 'tcp_rtt_mean_ms', 'owd_up_mean_ms'].every(k => k in p); })()",
    );
    assert_eq!(
        keys,
        Value::Bool(true),
        "TCP RTT and one-way delay fields in the points"
    );

    // CSV export downloads.
    let downloads = files.0.join("downloads");
    std::fs::create_dir_all(&downloads).expect("downloads dir");
    browser.call(
        "Browser.setDownloadBehavior",
        json!({"behavior": "allow", "downloadPath": downloads.display().to_string()}),
    );
    page.eval("document.getElementById('csv-0').click(); true");
    let t = Instant::now();
    let csv = loop {
        let done = std::fs::read_dir(&downloads)
            .expect("read downloads")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "csv"));
        if let Some(p) = done {
            break std::fs::read_to_string(p).expect("read csv");
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no CSV downloaded");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(csv.starts_with("link,label,start_ms,"), "{csv}");
    let points = page
        .eval("JSON.parse(window.linkpulse.histJson)[0].points.length")
        .as_u64()
        .expect("points");
    assert_eq!(csv.lines().count() as u64, points + 1);

    let dir = artifacts();
    page.screenshot(&dir.join("web-page.png"));
    // A phone screen: nothing wider than the screen (tables scroll inside their box).
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
    );
    std::thread::sleep(Duration::from_millis(500));
    let w = page.eval("document.documentElement.scrollWidth");
    assert!(
        w.as_u64().is_some_and(|w| w <= 390),
        "page width on a phone: {w}"
    );
    page.screenshot(&dir.join("web-page-phone.png"));
    page.call("Emulation.clearDeviceMetricsOverride", json!({}));

    // 30 days: 2 h steps served from the 1 h tier, drawn (the run's own data in the last step(s)).
    let loads = page
        .eval("window.linkpulse.histLoads")
        .as_u64()
        .expect("loads");
    page.eval(
        "(() => { const s = document.getElementById('range'); s.value = '2592000000';          s.dispatchEvent(new Event('change')); return true; })()",
    );
    page.wait(
        "30-day history",
        &format!("window.linkpulse.histLoads > {loads}"),
        Duration::from_secs(30),
    );
    let month = page.eval(
        "(() => { const h = JSON.parse(window.linkpulse.histJson);          return [h.length, h[0].step_ms, h[0].source_ms, h[0].points.length,          document.getElementById('hist-status').textContent]; })()",
    );
    let m = month.as_array().expect("30-day summary");
    assert_eq!(m[0], 2, "{month}");
    assert_eq!(m[1], 7_200_000, "{month}");
    assert_eq!(m[2], 3_600_000, "{month}");
    assert!(m[3].as_u64().is_some_and(|n| n >= 1), "{month}");
    assert!(
        m[4].as_str().is_some_and(|t| t.contains("step 7200 s")),
        "{month}"
    );
    page.screenshot(&dir.join("web-page-30d.png"));
    flow.stop().expect("flow");
}
