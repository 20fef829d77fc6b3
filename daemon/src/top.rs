//! `linkpulse top`: the live per-link table in a terminal (over SSH too), read from the
//! daemon's HTTP API once a second. Plain ANSI; `q` or Ctrl-C quits and restores the terminal.
use std::{
    io::{IsTerminal, Read, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::Config;

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("cannot read the token file {path} ({source}): pass --token-file with the API token, or run top where the daemon's config can be read")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the CA certificate {path} ({msg}): pass --ca with the PEM certificate the daemon serves ([http] tls_cert)")]
    Ca { path: PathBuf, msg: String },
    #[error("{url}: {msg}")]
    Request { url: String, msg: String },
    #[error("terminal: {0}")]
    Terminal(#[source] std::io::Error),
}

/// Where and how to reach the API.
#[derive(Debug, Clone)]
pub struct Target {
    /// e.g. `http://127.0.0.1:8480`
    pub base: String,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
}

impl Target {
    /// From the daemon's config: its listen address (a wildcard becomes loopback), https when
    /// TLS is configured, and its token file.
    pub fn from_config(cfg: &Config) -> Result<Target, TopError> {
        let mut addr = cfg.http_listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let scheme = if cfg.http.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let token = match &cfg.http.token_file {
            Some(p) => Some(read_token(p)?),
            None => None,
        };
        Ok(Target {
            base: format!("{scheme}://{addr}"),
            token,
            ca: cfg.http.tls_cert.clone(),
        })
    }
}

pub fn read_token(p: &Path) -> Result<String, TopError> {
    std::fs::read_to_string(p)
        .map(|t| t.trim().to_string())
        .map_err(|source| TopError::Token {
            path: p.to_path_buf(),
            source,
        })
}

pub struct Client {
    agent: ureq::Agent,
    target: Target,
}

impl Client {
    pub fn new(target: Target) -> Result<Client, TopError> {
        let roots = match &target.ca {
            None => RootCerts::WebPki,
            Some(p) => {
                let ca_err = |msg: String| TopError::Ca {
                    path: p.clone(),
                    msg,
                };
                let pem = std::fs::read(p).map_err(|e| ca_err(e.to_string()))?;
                let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                    .filter_map(|i| match i {
                        Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .collect::<Result<_, _>>()
                    .map_err(|e| ca_err(e.to_string()))?;
                RootCerts::new_with_certs(&certs)
            }
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(3)))
            .http_status_as_error(false)
            .proxy(None)
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            .build()
            .into();
        Ok(Client { agent, target })
    }

    /// GETs a JSON document; errors carry the API's own message.
    pub fn get(&self, path: &str) -> Result<Value, TopError> {
        let url = format!("{}{path}", self.target.base);
        let err = |msg: String| TopError::Request {
            url: url.clone(),
            msg,
        };
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.target.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.call().map_err(|e| {
            err(format!(
                "{e} (is the daemon running and listening there? see [http] listen, or pass --url)"
            ))
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(4 << 20)
            .read_to_string()
            .map_err(|e| err(e.to_string()))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| {
            err(format!(
                "not JSON ({e}): {}",
                body.chars().take(200).collect::<String>()
            ))
        })?;
        if status != 200 {
            let msg = v["error"].as_str().unwrap_or("(no message)");
            return Err(err(format!("HTTP {status}: {msg}")));
        }
        Ok(v)
    }
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// The table for one `/api/v1/links` answer (plain text, one line per link).
pub fn render(links: &Value, width: usize) -> String {
    let mut out = String::new();
    let router = links["router_id"].as_str().unwrap_or("?");
    let site = links["site"].as_str().unwrap_or("?");
    let synced = links["clock"]["synced"].as_bool().unwrap_or(true);
    out.push_str(&format!(
        "linkpulse {router} @ {site}{}   (q quits)\n\n",
        if synced {
            ""
        } else {
            "   CLOCK NOT SYNCHRONISED"
        }
    ));
    out.push_str(&format!(
        "{:<14} {:<8} {:<10} {:<9} {:>11} {:>11} {:>8} {:>7}  {}\n",
        "LINK", "IFACE", "OPERATOR", "STATE", "DOWN Mb/s", "UP Mb/s", "RTT ms", "LOSS %", "SINCE"
    ));
    let now_ns = crate::clock::realtime_ns() as i64;
    for l in links["links"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let s = |k: &str| l[k].as_str().unwrap_or("-").to_string();
        let mbps = |k: &str| num(&l[k]).map_or("-".into(), |v| format!("{:.3}", v / 1e6));
        let rtt = num(&l["rtt_ms"]).map_or("-".into(), |v| format!("{v:.1}"));
        let loss = num(&l["loss_ratio"]).map_or("-".into(), |v| format!("{:.2}", v * 100.0));
        let state = l["health"]
            .as_str()
            .or(l["state"].as_str())
            .unwrap_or("-")
            .to_string();
        let since = l["since_utc_ns"]
            .as_i64()
            .map_or("-".into(), |t| age((now_ns - t).max(0) / 1_000_000_000));
        let line = format!(
            "{:<14} {:<8} {:<10} {:<9} {:>11} {:>11} {:>8} {:>7}  {}",
            clip(&s("label"), 14),
            clip(&s("interface"), 8),
            clip(&s("operator"), 10),
            clip(&state, 9),
            mbps("throughput_down_bps"),
            mbps("throughput_up_bps"),
            rtt,
            loss,
            since
        );
        // Colour the state only: the rest stays readable on any terminal.
        let colour = match state.as_str() {
            "attached" | "up" => "\x1b[32m",
            "degraded" => "\x1b[33m",
            _ => "\x1b[31m",
        };
        let line = clip(&line, width);
        out.push_str(&line.replacen(&state, &format!("{colour}{state}\x1b[0m"), 1));
        out.push('\n');
    }
    out
}

fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn age(s: i64) -> String {
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172800 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86400),
    }
}

/// Puts the terminal in non-canonical mode without echo, restores it on drop.
struct RawMode(Option<libc::termios>);

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        if !std::io::stdin().is_terminal() {
            return Ok(RawMode(None));
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let saved = t;
        // ISIG off too: Ctrl-C arrives as a byte and ends the loop, so the terminal is restored.
        t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        t.c_cc[libc::VMIN] = 0;
        t.c_cc[libc::VTIME] = 0;
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode(Some(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restoring the attributes read in enter().
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// Waits up to `d` for a key; true when it asks to quit (q, Q, Ctrl-C, Ctrl-D or end of input).
fn quit_key(d: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, d.as_millis() as libc::c_int) };
    if n <= 0 {
        return false;
    }
    let mut b = [0u8; 16];
    match std::io::stdin().read(&mut b) {
        Ok(0) => std::io::stdin().is_terminal(),
        Ok(n) => b[..n].iter().any(|c| matches!(c, b'q' | b'Q' | 3 | 4)),
        Err(_) => false,
    }
}

fn terminal_width() -> usize {
    // SAFETY: winsize is plain data; the ioctl fills it.
    let mut w: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    if unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut w) } == 0 && w.ws_col > 0 {
        w.ws_col as usize
    } else {
        200
    }
}

/// Runs the table; `once` prints one table without clearing and returns (scripts, tests).
pub fn run(target: Target, once: bool) -> Result<(), TopError> {
    let client = Client::new(target)?;
    if once {
        let v = client.get("/api/v1/links")?;
        print!("{}", render(&v, usize::MAX));
        return Ok(());
    }
    let _raw = RawMode::enter().map_err(TopError::Terminal)?;
    let mut out = std::io::stdout();
    // Alternate screen, hidden cursor; both undone below.
    let _ = write!(out, "\x1b[?1049h\x1b[?25l");
    let result = (|| loop {
        let started = Instant::now();
        let text = match client.get("/api/v1/links") {
            Ok(v) => render(&v, terminal_width()),
            Err(e) => format!("{e}\n\nretrying every second (q quits)\n"),
        };
        let _ = write!(out, "\x1b[H\x1b[2J{}", text.replace('\n', "\r\n"));
        let _ = out.flush();
        let wait = Duration::from_secs(1).saturating_sub(started.elapsed());
        if quit_key(wait) {
            return Ok(());
        }
    })();
    let _ = write!(out, "\x1b[?25h\x1b[?1049l");
    let _ = out.flush();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_link_with_nulls_as_dashes() {
        let v = serde_json::json!({
            "router_id": "r1", "site": "s", "clock": {"synced": false},
            "links": [
                {"label": "A", "interface": "wwan0", "operator": "op", "state": "attached",
                 "since_utc_ns": 0, "throughput_down_bps": 2_500_000, "throughput_up_bps": null,
                 "rtt_ms": 41.26, "loss_ratio": 0.015},
                {"label": "B", "interface": "wwan1", "state": "missing", "since_utc_ns": 0,
                 "throughput_down_bps": null, "throughput_up_bps": null, "rtt_ms": null, "loss_ratio": null}
            ]
        });
        let t = render(&v, usize::MAX);
        assert!(t.contains("CLOCK NOT SYNCHRONISED"));
        let a = t.lines().find(|l| l.starts_with("A ")).expect("row A");
        assert!(
            a.contains("2.500") && a.contains("41.3") && a.contains("1.50"),
            "{a}"
        );
        assert!(a.contains("\x1b[32mattached"), "{a}");
        let b = t.lines().find(|l| l.starts_with("B ")).expect("row B");
        assert!(b.contains("\x1b[31mmissing"), "{b}");
    }
}
