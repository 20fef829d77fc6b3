//! `cargo xtask demo`: the daemon on the emulated router, with a live per-link table, and a local
//! InfluxDB as the central side of its store-and-forward.
//!
//! testbed up (with its InfluxDB in the router namespace, 127.0.0.1:8086, files in
//! target/demo/influx) -> config (a [[forward]] to it) -> daemon in the router namespace -> wait
//! for the API -> table every second -> the points InfluxDB holds -> teardown (daemon, then the
//! testbed with its InfluxDB). Teardown runs on success, error, Ctrl-C and SIGTERM alike.

use crate::{cmd, http, links_table, setup, signals};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Testbed name; the testbed derives its namespaces from it (`lpdemo-rtr` is the router).
const TESTBED: &str = "lpdemo";
const ROUTER_NS: &str = "lpdemo-rtr";
/// The daemon listens here inside the router namespace; the testbed forwards the host's same
/// address and port into it (`--forward`), so the page opens from the host.
const API_ADDR: &str = "127.0.0.1:8480";
const LINKS_PATH: &str = "/api/v1/links";
/// The testbed's InfluxDB (`testbed up --influx`) listens here inside the router namespace, on
/// loopback only; the testbed forwards the host's same address into it.
const INFLUX_ADDR: &str = "127.0.0.1:8086";
const INFLUX_DB: &str = "linkpulse";
/// An InfluxQL query that shows the forwarded rollups.
const INFLUX_QUERY: &str =
    "SELECT count(rx_bytes) FROM linkpulse_rollup WHERE time > now() - 1h GROUP BY link";
const API_DEADLINE: Duration = Duration::from_secs(30);
/// How long the daemon gets to flush and detach after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Operators of the first modems, in the testbed's order; later modems cycle through them.
const OPERATORS: [&str; 4] = ["Verizon", "T-Mobile", "AT&T", "Fixed 20M"];

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Run this many seconds, then tear down (non-interactive); default: until Ctrl-C.
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// Number of emulated modems (wwan0..).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=16))]
    modems: u8,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    // First, so that a Ctrl-C from here on always reaches our teardown.
    signals::install()?;
    setup::run()?;
    cmd::build_release()?;
    if signals::stopping() {
        bail!("interrupted before the testbed was started");
    }
    let mut demo = Demo {
        linkpulse: cmd::profile_bin("release", "linkpulse")?,
        dir: cmd::target_dir().join("demo"),
        daemon: None,
        testbed_started: false,
    };
    let result = demo.run(args);
    let teardown = demo.teardown();
    match (result, teardown) {
        (Ok(()), teardown) => teardown,
        (Err(err), Ok(())) => Err(err),
        (Err(err), Err(teardown_err)) => {
            // The first error is the cause; the teardown failure is what the user must clean up.
            esay!("demo: teardown also failed: {teardown_err:#}");
            Err(err)
        }
    }
}

struct Demo {
    linkpulse: PathBuf,
    dir: PathBuf,
    daemon: Option<Child>,
    /// Set before `testbed up` runs, so that a half-built testbed is taken down too.
    testbed_started: bool,
}

impl Demo {
    fn run(&mut self, args: &DemoArgs) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        // A demo killed with SIGKILL leaves its namespaces; `testbed up` would then fail on them.
        if Path::new("/run/netns").join(ROUTER_NS).exists() {
            say!("demo: removing the testbed {TESTBED} left by an earlier run");
            self.testbed_started = true;
            self.testbed_down()?;
        }

        self.testbed_started = true;
        cmd::run(
            Command::new(&self.linkpulse)
                .args(["testbed", "up", "--name", TESTBED, "--modems"])
                .arg(args.modems.to_string())
                .args(["--traffic", "demo", "--forward"])
                .arg(format!("{API_ADDR}=8480"))
                .arg("--forward")
                .arg(format!("{INFLUX_ADDR}=8086"))
                .arg("--influx")
                .arg(self.dir.join("influx")),
        )
        .context("starting the testbed failed")?;
        if signals::stopping() {
            bail!("interrupted");
        }

        let config = self.dir.join("linkpulse.toml");
        std::fs::write(&config, demo_config(args.modems, &self.dir.join("store")))
            .with_context(|| format!("writing {}", config.display()))?;
        let log_path = self.log_path();
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut daemon = Command::new("ip");
        daemon
            .args(["netns", "exec", ROUTER_NS])
            .arg(&self.linkpulse)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: the terminal's Ctrl-C reaches only us, and we stop the daemon
            // with SIGTERM in teardown, after the table stops, in a known order.
            .process_group(0);
        say!(
            "demo: starting `{}` (log: {})",
            cmd::display(&daemon),
            log_path.display()
        );
        self.daemon = Some(
            daemon
                .spawn()
                .with_context(|| format!("could not start `{}`", cmd::display(&daemon)))?,
        );

        let addr: SocketAddr = API_ADDR.parse().context("API_ADDR is not an address")?;
        self.wait_for_api(addr)?;
        say!("web page: http://{API_ADDR}/ (API {LINKS_PATH}, metrics /metrics)");
        say!(
            "InfluxDB (the central side, forwarded to by [[forward]] \"demo-influx\"): \
             http://{INFLUX_ADDR}, database {INFLUX_DB}, files in {}; query it with\n  \
             influx -host 127.0.0.1 -port 8086 -database {INFLUX_DB} -execute '{INFLUX_QUERY}'",
            self.dir.join("influx").display()
        );
        self.show_table(addr, args)?;
        self.show_influx();
        Ok(())
    }

    /// Prints how many rollup points InfluxDB holds per link (the forwarder's work), or why not.
    fn show_influx(&self) {
        let path = format!("/query?db={INFLUX_DB}&q={}", percent_encode(INFLUX_QUERY));
        let answer = INFLUX_ADDR
            .parse::<SocketAddr>()
            .context("INFLUX_ADDR is not an address")
            .and_then(|addr| http::get(addr, &path, Duration::from_secs(5)));
        match answer.and_then(|body| influx_counts(&body)) {
            Ok(counts) if counts.is_empty() => {
                say!(
                    "demo: InfluxDB holds no rollup points yet (the first arrive ~1 s after start)"
                )
            }
            Ok(counts) => {
                let total: u64 = counts.iter().map(|(_, n)| n).sum();
                let per_link: Vec<String> = counts
                    .iter()
                    .map(|(l, n)| format!("link {l}: {n}"))
                    .collect();
                say!(
                    "demo: InfluxDB holds {total} rollup points of the last hour ({})",
                    per_link.join(", ")
                );
            }
            Err(err) => say!("demo: could not query InfluxDB at {INFLUX_ADDR}: {err:#}"),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("linkpulse.log")
    }

    fn wait_for_api(&mut self, addr: SocketAddr) -> Result<()> {
        let start = Instant::now();
        let mut last_error = String::from("no attempt yet");
        while start.elapsed() < API_DEADLINE {
            if signals::stopping() {
                bail!("interrupted while waiting for the daemon");
            }
            self.check_daemon_alive()?;
            match http::get(addr, LINKS_PATH, Duration::from_secs(2)) {
                Ok(_) => {
                    say!(
                        "demo: the API answered after {:.1} s",
                        start.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                Err(err) => last_error = format!("{err:#}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "the daemon did not answer http://{addr}{LINKS_PATH} within {} s (last error: \
             {last_error}).\nLast lines of {}:\n{}\nFix: read that log; check that the daemon \
             listens on {API_ADDR} in the router namespace (`ip netns exec {ROUTER_NS} ss -ltn`) \
             and that the testbed forwards it (`{} testbed status --name {TESTBED}`)",
            API_DEADLINE.as_secs(),
            self.log_path().display(),
            log_tail(&self.log_path()),
            self.linkpulse.display()
        )
    }

    fn check_daemon_alive(&mut self) -> Result<()> {
        let Some(daemon) = self.daemon.as_mut() else {
            return Ok(());
        };
        if let Some(status) = daemon.try_wait()? {
            self.daemon = None;
            bail!(
                "the daemon exited ({}).\nLast lines of {}:\n{}\nFix: see the error in that log",
                cmd::describe(status),
                self.log_path().display(),
                log_tail(&self.log_path())
            );
        }
        Ok(())
    }

    fn show_table(&mut self, addr: SocketAddr, args: &DemoArgs) -> Result<()> {
        let start = Instant::now();
        let deadline = args.duration.map(Duration::from_secs);
        // Redraw in place only on a terminal; a log (CI, `--duration` into a file) gets one table
        // after another instead of escape codes.
        let tty = std::io::stdout().is_terminal();
        let mut tick = start;
        loop {
            if signals::stopping() || deadline.is_some_and(|d| start.elapsed() >= d) {
                break;
            }
            self.check_daemon_alive()?;
            let table = match http::get(addr, LINKS_PATH, Duration::from_secs(2)) {
                Ok(body) => match serde_json::from_str(&body) {
                    Ok(json) => links_table::render(&json),
                    Err(err) => format!("(the API answered something that is not JSON: {err})\n"),
                },
                Err(err) => format!("(the API did not answer: {err:#})\n"),
            };
            let elapsed = start.elapsed().as_secs();
            let mut out = std::io::stdout().lock();
            if tty {
                let until = match deadline {
                    Some(d) => format!("stops after {} s", d.as_secs()),
                    None => "Ctrl-C to stop".to_owned(),
                };
                write!(
                    out,
                    "\x1b[H\x1b[2Jlinkpulse demo: {} modems, {elapsed} s, {until}\nweb page: \
                     http://{API_ADDR}/ (API {LINKS_PATH}, metrics /metrics)\n\n{table}",
                    args.modems
                )?;
            } else {
                write!(out, "--- demo +{elapsed} s ---\n{table}")?;
            }
            out.flush()?;
            drop(out);
            // Fixed ticks, so that a slow answer does not make the table drift; short sleeps, so
            // that Ctrl-C is honoured within 0.1 s.
            tick += Duration::from_secs(1);
            while Instant::now() < tick && !signals::stopping() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        say!(
            "demo: stopping after {:.0} s",
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Stops the daemon, then removes the testbed; tries both even if the first fails.
    fn teardown(&mut self) -> Result<()> {
        let daemon = match self.daemon.take() {
            Some(child) => stop_daemon(child),
            None => Ok(()),
        };
        let testbed = if self.testbed_started {
            self.testbed_down()
        } else {
            Ok(())
        };
        daemon.and(testbed)
    }

    fn testbed_down(&mut self) -> Result<()> {
        let mut down = Command::new(&self.linkpulse);
        down.args(["testbed", "down", "--name", TESTBED])
            .stdin(Stdio::null())
            // A second Ctrl-C must not interrupt the cleanup of the first.
            .process_group(0);
        let fix = format!(
            "Fix: run `{}` by hand; `ip netns list` shows what is left",
            cmd::display(&down)
        );
        esay!("$ {}", cmd::display(&down));
        // Captured, not inherited: after SIGHUP the terminal is gone, and a child writing to it
        // would fail before it removed anything. We relay what it said as far as we can.
        let out = down
            .output()
            .with_context(|| format!("could not start the testbed teardown. {fix}"))?;
        let _ = std::io::stdout().write_all(&out.stdout);
        let _ = std::io::stderr().write_all(&out.stderr);
        if !out.status.success() {
            bail!(
                "removing the testbed failed ({}). {fix}",
                cmd::describe(out.status)
            );
        }
        self.testbed_started = false;
        say!("demo: testbed {TESTBED} removed");
        Ok(())
    }
}

/// SIGTERM, then SIGKILL if the daemon has not exited within STOP_GRACE.
fn stop_daemon(mut child: Child) -> Result<()> {
    if let Some(status) = child.try_wait()? {
        say!(
            "demo: the daemon had already exited ({})",
            cmd::describe(status)
        );
        return Ok(());
    }
    let pid = libc::pid_t::try_from(child.id()).context("daemon pid out of range")?;
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child, so it cannot
    // have been recycled for another process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < STOP_GRACE {
        if let Some(status) = child.try_wait()? {
            say!(
                "demo: daemon stopped ({}, {:.1} s after SIGTERM)",
                cmd::describe(status),
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().context("sending SIGKILL to the daemon")?;
    child.wait()?;
    bail!(
        "the daemon did not exit within {} s of SIGTERM and was killed. Fix: its shutdown path \
         hangs; see the end of its log",
        STOP_GRACE.as_secs()
    )
}

/// The daemon's TOML for `modems` emulated links wwan0.. (the format is `deny_unknown_fields`).
/// The rollups go to a local store under `store_dir` (kept between runs, like a router's) and
/// are forwarded to the testbed's InfluxDB.
fn demo_config(modems: u8, store_dir: &Path) -> String {
    let mut toml = format!(
        "# Written by `cargo xtask demo`; rewritten on every run.\n\n\
         [router]\nid = \"demo-router\"\nsite = \"lab\"\n\n\
         [sampling]\nbin_width_us = 100\ngrace_us = 1000\n\n\
         [http]\nlisten = \"{API_ADDR}\"\n\n\
         [store]\ndata_dir = \"{}\"\n\n\
         [[forward]]\nname = \"demo-influx\"\nurl = \"http://{INFLUX_ADDR}\"\n\
         database = \"{INFLUX_DB}\"\n",
        store_dir.display()
    );
    for k in 0..usize::from(modems) {
        toml.push_str(&format!(
            "\n[[link]]\ninterface = \"wwan{k}\"\nlabel = \"modem {}\"\noperator = \"{}\"\n\
             modem_id = \"demo-{k}\"\n",
            k + 1,
            OPERATORS[k % OPERATORS.len()]
        ));
    }
    toml
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters stay).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// (link, count) per series of an InfluxDB 1.x `/query` answer to [`INFLUX_QUERY`]; `/query`
/// answers 200 even when the statement failed, so `error` is checked.
fn influx_counts(body: &str) -> Result<Vec<(String, u64)>> {
    let v: serde_json::Value = serde_json::from_str(body).context("the answer is not JSON")?;
    let result = &v["results"][0];
    if let Some(e) = result.get("error") {
        bail!("the query failed: {e}");
    }
    let mut out = Vec::new();
    for series in result["series"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let link = series["tags"]["link"].as_str().unwrap_or("?").to_owned();
        let n = series["values"][0][1].as_u64().unwrap_or(0);
        out.push((link, n));
    }
    Ok(out)
}

/// The last lines of a log, for error messages.
fn log_tail(path: &Path) -> String {
    const LINES: usize = 25;
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
            if tail.is_empty() {
                "(empty)".to_owned()
            } else {
                tail
            }
        }
        Err(err) => format!("(cannot read it: {err})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_one_link_per_modem() {
        let toml = demo_config(5, Path::new("/tmp/demo-store"));
        assert!(toml.contains("[store]\ndata_dir = \"/tmp/demo-store\"\n"));
        assert_eq!(toml.matches("[[link]]").count(), 5);
        assert!(toml.contains("interface = \"wwan0\"\nlabel = \"modem 1\"\noperator = \"Verizon\"\nmodem_id = \"demo-0\""));
        assert!(
            toml.contains("interface = \"wwan3\"\nlabel = \"modem 4\"\noperator = \"Fixed 20M\"")
        );
        assert!(toml.contains("interface = \"wwan4\"\nlabel = \"modem 5\"\noperator = \"Verizon\""));
        assert!(toml.contains("[http]\nlisten = \"127.0.0.1:8480\"\n"));
        assert!(toml.contains("bin_width_us = 100\ngrace_us = 1000\n"));
        assert!(toml.contains(
            "[[forward]]\nname = \"demo-influx\"\nurl = \"http://127.0.0.1:8086\"\ndatabase = \"linkpulse\"\n"
        ));
    }

    #[test]
    fn influx_answers() {
        let body = r#"{"results":[{"statement_id":0,"series":[
            {"name":"linkpulse_rollup","tags":{"link":"0"},"columns":["time","count"],"values":[[0,118]]},
            {"name":"linkpulse_rollup","tags":{"link":"1"},"columns":["time","count"],"values":[[0,117]]}]}]}"#;
        assert_eq!(
            influx_counts(body).unwrap(),
            vec![("0".to_owned(), 118), ("1".to_owned(), 117)]
        );
        assert!(influx_counts(r#"{"results":[{"statement_id":0}]}"#)
            .unwrap()
            .is_empty());
        let e = influx_counts(r#"{"results":[{"statement_id":0,"error":"database not found"}]}"#);
        assert!(format!("{:#}", e.unwrap_err()).contains("database not found"));
        assert_eq!(percent_encode("a b>c'"), "a%20b%3Ec%27");
    }

    #[test]
    fn tail_of_a_log() {
        let path = std::env::temp_dir().join(format!("xtask-tail-{}", std::process::id()));
        let text: String = (0..40).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        std::fs::remove_file(&path).unwrap();
        assert!(
            tail.starts_with("line 15\n") && tail.ends_with("line 39"),
            "{tail}"
        );
        assert!(log_tail(Path::new("/nonexistent/x.log")).starts_with("(cannot read it"));
    }
}
