//! The web API end to end (root, real Tarantool 2.6, the daemon in a testbed's router
//! namespace): every endpoint, series equal to the frames window by window, bad parameters
//! refused with a message, the live feed, and the token off loopback.
mod common;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use common::{plain, Run, TempDir};
use linkpulse_testbed::{
    netns,
    traffic::{UdpFlow, UdpSink},
    ModemKind, TestbedOptions,
};
use serde_json::Value;

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One HTTP/1.0 request from inside `ns`; `read_for` bounds streams (SSE).
fn request(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    read_for: Option<Duration>,
) -> Reply {
    let (method, path, body) = (method.to_string(), path.to_string(), body.to_string());
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    netns::run_in(ns, move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect to the API");
        s.set_read_timeout(Some(read_for.unwrap_or(Duration::from_secs(30))))
            .expect("timeout");
        let mut req = format!(
            "{method} {path} HTTP/1.0\r\nHost: linkpulse\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in &headers {
            req += &format!("{k}: {v}\r\n");
        }
        req += "\r\n";
        req += &body;
        s.write_all(req.as_bytes()).expect("request");
        let mut resp = Vec::new();
        let start = Instant::now();
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => resp.extend_from_slice(&buf[..n]),
                Err(_) if read_for.is_some() => break,
                Err(e) => panic!("reading {path}: {e}"),
            }
            if read_for.is_some_and(|d| start.elapsed() > d) {
                break;
            }
        }
        let resp = String::from_utf8_lossy(&resp).to_string();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {resp}"));
        Reply {
            status,
            head: head.to_string(),
            body: body.to_string(),
        }
    })
    .expect("enter router ns")
}

fn get(run: &Run, path: &str) -> Reply {
    request(
        run.bed.router_ns(),
        run.daemon().http_addr(),
        "GET",
        path,
        &[],
        "",
        None,
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

#[test]
fn web_api_series_equal_the_frames_and_bad_parameters_are_refused() {
    let store_dir = TempDir::new("lpweb-db");
    let run = Run::start_full(
        "lpweb",
        vec![
            plain("wwan0", ModemKind::Veth),
            plain("wwan1", ModemKind::Tun),
        ],
        &[],
        TestbedOptions::default(),
        None,
        Some(store_dir.0.clone()),
    );
    let rtr = run.bed.router_ns().to_string();
    let (r, s) = run.bed.modem_addr_v4(0);
    let dst = SocketAddr::new(s.into(), 9810);
    let _sink = UdpSink::new(run.bed.server_ns(), dst, None)
        .start()
        .expect("sink");
    let flow = UdpFlow::new(&rtr, "wwan0", r.into(), dst, 1000, 700)
        .start()
        .expect("flow");
    let started = now_ms();
    let t = Instant::now();
    while run.daemon().shared().store.written.load(Ordering::Relaxed) < 2 * 10 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no rollups written within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Live feed while traffic flows: events with exact per-point sums of whole bins.
    let live = request(
        &rtr,
        run.daemon().http_addr(),
        "GET",
        "/api/v1/live",
        &[],
        "",
        Some(Duration::from_millis(1500)),
    );
    assert_eq!(live.status, 200, "{}", live.head);
    assert!(live
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let batches: Vec<Value> = live
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("live data is JSON"))
        .collect();
    assert!(batches.len() >= 3, "live events: {}", live.body);
    let points: Vec<&Value> = batches
        .iter()
        .flat_map(|b| b["points"].as_array().expect("points").iter())
        .collect();
    let up_bytes: u64 = points
        .iter()
        .map(|p| p["links"][0]["up_bytes"].as_u64().expect("up_bytes"))
        .sum();
    assert!(points.len() > 50, "{} live points", points.len());
    assert!(up_bytes > 0, "the flow shows in the live feed");
    for p in &points {
        assert_eq!(p["width_ns"], 10_000_000);
        assert_eq!(p["start_utc_ns"].as_i64().expect("start") % 10_000_000, 0);
        assert_eq!(p["links"].as_array().expect("links").len(), 2);
    }
    std::thread::sleep(Duration::from_millis(1500));
    flow.stop().expect("flow");
    run.settle(Duration::from_millis(1200));

    // Links: every modem, the overview's fields.
    let links = get(&run, "/api/v1/links");
    assert_eq!(links.status, 200);
    let lj = links.json();
    let arr = lj["links"].as_array().expect("links");
    assert_eq!(arr.len(), 2);
    for l in arr {
        for k in [
            "label",
            "operator",
            "state",
            "since_utc_ns",
            "throughput_down_bps",
            "throughput_up_bps",
            "rtt_ms",
            "loss_ratio",
        ] {
            assert!(l.get(k).is_some(), "{k} missing: {l}");
        }
    }
    // Page, assets, OpenAPI, events, metrics.
    let page = get(&run, "/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/assets/app.js"));
    assert_eq!(get(&run, "/assets/app.js").status, 200);
    assert_eq!(get(&run, "/assets/style.css").status, 200);
    assert_eq!(get(&run, "/assets/nope.js").status, 404);
    let doc = get(&run, "/api/v1/openapi.json");
    assert_eq!(doc.status, 200);
    assert!(doc.json()["paths"]["/api/v1/series"].is_object());
    let ev = get(&run, "/api/v1/events");
    assert_eq!(ev.status, 200);
    assert!(ev.json()["events"].is_array());
    let m = get(&run, "/metrics");
    assert!(m.body.contains("linkpulse_live_points_total"), "{}", m.body);

    // Series: complete points only, aligned, stamped with start and end; each equal to the
    // frames the daemon published over its windows.
    let (from, to) = (started - 10_000, now_ms() + 1000);
    let path = format!("/api/v1/series?link=0&from={from}&to={to}&step=1000");
    let a = get(&run, &path);
    assert_eq!(a.status, 200, "{}", a.body);
    let b = get(&run, &path);
    assert_eq!(a.body, b.body, "the same range gives the same answer");
    let sj = a.json();
    let pts = sj["points"].as_array().expect("points");
    assert!(pts.len() >= 3, "{}", a.body);
    let seen = run.seen.lock().expect("seen");
    let mut checked = 0;
    for p in pts {
        let (s0, s1) = (
            p["start_ms"].as_i64().unwrap(),
            p["end_ms"].as_i64().unwrap(),
        );
        assert_eq!((s0 % 1000, s1 - s0), (0, 1000), "{p}");
        assert_eq!(p["complete"], true);
        assert_eq!(p["windows"], 2);
        let mut want: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
        for d in 0..2 {
            for w in [s0, s0 + 500] {
                let c = seen
                    .per_window
                    .get(&(0, d, w * 1_000_000))
                    .copied()
                    .unwrap_or_default();
                let e = want.entry(d).or_default();
                e.0 += c.bytes;
                e.1 += c.packets;
            }
        }
        assert_eq!(p["down_bytes"].as_u64(), Some(want[&0].0), "{p}");
        assert_eq!(p["down_packets"].as_u64(), Some(want[&0].1), "{p}");
        assert_eq!(p["up_bytes"].as_u64(), Some(want[&1].0), "{p}");
        assert_eq!(p["up_packets"].as_u64(), Some(want[&1].1), "{p}");
        let mean = p["up_bytes"].as_f64().unwrap() * 8.0;
        assert!(
            (p["up_rate_mean_bps"].as_f64().unwrap() - mean).abs() < 2.0,
            "{p}"
        );
        checked += 1;
    }
    drop(seen);
    assert!(checked >= 3);
    let sent: u64 = pts.iter().map(|p| p["up_packets"].as_u64().unwrap()).sum();
    assert!(sent > 1000, "the flow is in the series: {sent} packets");
    // partial=true adds the partial points (the first window joined mid-way), marked.
    let partial = get(
        &run,
        &format!("/api/v1/series?link=wwan0&from={from}&to={to}&step=1000&partial=true"),
    )
    .json();
    let ppts = partial["points"].as_array().expect("points");
    assert!(ppts.len() > pts.len(), "{partial}");
    assert!(ppts.iter().any(|p| p["complete"] == false));
    // CSV: a download with a header and a line per point.
    let csv = get(
        &run,
        &format!("/api/v1/series.csv?link=0&from={from}&to={to}&step=1000"),
    );
    assert_eq!(csv.status, 200);
    assert!(csv
        .header("content-disposition")
        .is_some_and(|c| c.starts_with("attachment")));
    assert_eq!(csv.body.lines().count(), pts.len() + 1);
    assert!(csv.body.starts_with("link,label,start_ms,end_ms,"));

    // Bad parameters: 400 with a message that says what was wrong.
    let day = 86_400_000i64;
    for (q, says) in [
        (format!("link=0&from={to}&to={from}&step=1000"), "before"),
        (format!("link=0&from={from}&to={to}&step=700"), "multiple"),
        (format!("link=0&from={from}&to={to}&step=0"), "multiple"),
        (
            format!("link=nope&from={from}&to={to}&step=1000"),
            "unknown link",
        ),
        (
            format!("from={from}&to={to}&step=1000"),
            "missing parameter `link`",
        ),
        (
            format!("link=0&from=abc&to={to}&step=1000"),
            "not an integer",
        ),
        (
            format!(
                "link=0&from={}&to={to}&step=600000&source=raw",
                to - 30 * day
            ),
            "narrow the range",
        ),
        (
            format!("link=0&from={from}&to={to}&step=1000&source=tiers"),
            "source",
        ),
        (
            format!("link=0&from={}&to={to}&step=500", to - day),
            "step of at least",
        ),
        (
            format!("link=0&from={from}&to={to}&step=1000&partial=maybe"),
            "partial",
        ),
    ] {
        for ep in ["series", "series.csv"] {
            let r = get(&run, &format!("/api/v1/{ep}?{q}"));
            assert_eq!(r.status, 400, "{q}: {}", r.body);
            let e = r.json()["error"]
                .as_str()
                .expect("error message")
                .to_string();
            assert!(e.contains(says), "{q}: {e}");
        }
    }
    // A step served by the 10 s tier gives the points the rollups give (source=raw), partial ones
    // included, over a range the daemon has finished writing (a whole 10 s step of the run, 5 s
    // back); 30 days at 2 h (the page's step) come from the 1 h tier.
    let f10 = from - from.rem_euclid(10_000);
    let t10 = started - started.rem_euclid(10_000) + 20_000;
    while now_ms() < t10 + 5000 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let q = format!("/api/v1/series?link=0&from={f10}&to={t10}&step=10000&partial=true");
    let tier = get(&run, &q).json();
    let raw = get(&run, &format!("{q}&source=raw")).json();
    assert_eq!(tier["source_ms"], 10_000, "{tier}");
    assert_eq!(raw["source_ms"], 500, "{raw}");
    let tp = tier["points"].as_array().expect("points");
    assert!(!tp.is_empty(), "{tier}");
    assert_eq!(tp.len(), raw["points"].as_array().expect("points").len());
    for (a, b) in tp.iter().zip(raw["points"].as_array().expect("points")) {
        for (k, v) in a.as_object().expect("point") {
            if k.ends_with("_mean_bps") || k.ends_with("_mean_ms") {
                let (x, y) = (v.as_f64(), b[k].as_f64());
                assert_eq!(x.is_some(), y.is_some(), "{k}: {a} vs {b}");
                let (x, y) = (x.unwrap_or(0.0), y.unwrap_or(0.0));
                assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{k}: {a} vs {b}");
            } else {
                assert_eq!(v, &b[k], "{k}: {a} vs {b}");
            }
        }
    }
    let month = get(
        &run,
        &format!(
            "/api/v1/series?link=0&from={}&to={}&step=7200000&partial=true",
            to - 30 * 86_400_000 - to.rem_euclid(7_200_000),
            to + 7_200_000 - to.rem_euclid(7_200_000)
        ),
    );
    assert_eq!(month.status, 200, "{}", month.body);
    assert_eq!(month.json()["source_ms"], 3_600_000);
    let n = month.json()["points"].as_array().map_or(0, Vec::len);
    assert!((1..=2).contains(&n), "the run's step(s): {}", month.body);

    let r = get(&run, "/api/v1/nope");
    assert_eq!(r.status, 404);
}

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

#[test]
fn web_api_needs_the_token_off_loopback() {
    let dir = TempDir::new("lpwauth-files");
    let token = "s3cret-token-0123456789abcdef";
    let token_file = dir.0.join("api.token");
    write(&token_file, &format!("{token}\n"));

    // Off loopback without a token file: the config is refused, naming the key.
    let cfg = linkpulse::Config::parse(
        "[router]\nid = \"a\"\nsite = \"b\"\n[http]\nlisten = \"0.0.0.0:8480\"\n",
        std::path::Path::new("t.toml"),
    )
    .expect_err("refused");
    assert!(cfg.to_string().contains("token_file"), "{cfg}");

    let tf = token_file.display().to_string();
    let run = Run::start_edited(
        "lpwau",
        vec![plain("wwan0", ModemKind::Veth)],
        &[],
        TestbedOptions::default(),
        None,
        None,
        &|t| {
            t.replace(
                "listen = \"127.0.0.1:0\"\n",
                &format!("listen = \"0.0.0.0:0\"\ntoken_file = \"{tf}\"\n"),
            )
        },
    );
    let ns = run.bed.router_ns().to_string();
    let port = run.daemon().http_addr().port();
    // Any address of the router: what matters is that the daemon listens off loopback.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let req = |m: &str, p: &str, h: &[(&str, &str)], b: &str| request(&ns, addr, m, p, h, b, None);

    for p in [
        "/api/v1/links",
        "/api/v1/events",
        "/metrics",
        "/api/v1/live",
        "/api/v1/series?link=0&from=0&to=1000&step=500",
    ] {
        let r = req("GET", p, &[], "");
        assert_eq!(r.status, 401, "{p}: {}", r.body);
        assert!(r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("Bearer")));
        let r = req(
            "GET",
            p,
            &[("Authorization", "Bearer wrong-token-000000000")],
            "",
        );
        assert_eq!(r.status, 401, "{p}");
    }
    let bearer = format!("Bearer {token}");
    let r = req("GET", "/api/v1/links", &[("Authorization", &bearer)], "");
    assert_eq!(r.status, 200, "{}", r.body);
    // The store is off in this run: history says so, with 503.
    let r = req(
        "GET",
        "/api/v1/series?link=0&from=0&to=1000&step=500",
        &[("Authorization", &bearer)],
        "",
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("store")));
    // Public: the page shell and the API description.
    assert_eq!(req("GET", "/", &[], "").status, 200);
    assert_eq!(req("GET", "/api/v1/openapi.json", &[], "").status, 200);

    // The page's login: a wrong token is refused, the right one gives a session cookie.
    let r = req(
        "POST",
        "/api/v1/login",
        &[("Content-Type", "application/json")],
        "{\"token\":\"nope\"}",
    );
    assert_eq!(r.status, 401);
    let r = req("POST", "/api/v1/login", &[], "not json");
    assert_eq!(r.status, 400);
    let r = req(
        "POST",
        "/api/v1/login",
        &[("Content-Type", "application/json")],
        &format!("{{\"token\":\"{token}\"}}"),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let cookie = r.header("set-cookie").expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().expect("name=value").to_string();
    let r = req("GET", "/api/v1/links", &[("Cookie", &session)], "");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(
        &ns,
        addr,
        "GET",
        "/api/v1/live",
        &[("Cookie", &session)],
        "",
        Some(Duration::from_millis(500)),
    );
    assert_eq!(r.status, 200);
    // After logout the session no longer opens anything.
    assert_eq!(
        req("POST", "/api/v1/logout", &[("Cookie", &session)], "").status,
        204
    );
    assert_eq!(
        req("GET", "/api/v1/links", &[("Cookie", &session)], "").status,
        401
    );
}

#[test]
fn web_api_over_tls_and_linkpulse_top() {
    let dir = TempDir::new("lpwtls-files");
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=linkpulse-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        // A self-signed end-entity certificate (webpki refuses a CA certificate as a server's).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(ok.success(), "openssl made no certificate");
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let run = Run::start_edited(
        "lpwtls",
        vec![plain("wwan0", ModemKind::Veth)],
        &[],
        TestbedOptions::default(),
        None,
        None,
        &|t| {
            t.replace(
                "listen = \"127.0.0.1:0\"\n",
                &format!("listen = \"127.0.0.1:0\"\ntls_cert = \"{c}\"\ntls_key = \"{k}\"\n"),
            )
        },
    );
    let addr = run.daemon().http_addr();
    // Plain HTTP to the TLS port gets no answer that parses as HTTP 200.
    let plain_http = netns::run_in(run.bed.router_ns(), move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = s.write_all(b"GET /api/v1/links HTTP/1.0\r\n\r\n");
        let mut b = Vec::new();
        let _ = s.read_to_end(&mut b);
        String::from_utf8_lossy(&b).to_string()
    })
    .expect("ns");
    assert!(!plain_http.starts_with("HTTP/1.0 200"), "{plain_http}");
    // `linkpulse top`'s client, over https, trusting the daemon's certificate.
    let target = linkpulse::top::Target {
        base: format!("https://{addr}"),
        token: None,
        ca: Some(cert.clone()),
    };
    let (links, table) = netns::run_in(run.bed.router_ns(), move || {
        let c = linkpulse::top::Client::new(target).expect("client");
        let v = c.get("/api/v1/links").expect("links over https");
        let t = linkpulse::top::render(&v, usize::MAX);
        (v, t)
    })
    .expect("ns");
    assert_eq!(links["links"].as_array().map(Vec::len), Some(1));
    let row = table
        .lines()
        .find(|l| l.starts_with("wwan0"))
        .unwrap_or_else(|| panic!("no wwan0 row: {table}"));
    assert!(row.contains("attached"), "{row}");
    // Without the certificate trusted, the client refuses the connection, with a message.
    let target = linkpulse::top::Target {
        base: format!("https://{addr}"),
        token: None,
        ca: None,
    };
    let err = netns::run_in(run.bed.router_ns(), move || {
        linkpulse::top::Client::new(target)
            .expect("client")
            .get("/api/v1/links")
            .expect_err("untrusted certificate")
            .to_string()
    })
    .expect("ns");
    assert!(err.contains("https://"), "{err}");
}
