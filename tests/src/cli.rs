//! `linkpulse testbed up|down|status` (and the hidden `run`, the long-lived process `up`
//! starts in the background).
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

use crate::emulator::{LinkProfile, Outage, DEFAULT_GUARD_US};
use crate::netns;
use crate::sys;
use crate::topology::{
    self, ModemKind, ModemSpec, Testbed, TestbedOptions, TestbedSpec, TestbedState, STATE_FILE,
};
use crate::traffic::{
    TcpDirection, TcpFlow, TcpFlowHandle, UdpFlow, UdpFlowHandle, UdpSink, UdpSinkHandle,
};
use crate::truth::{self, Dir};

/// Default parent of state directories (tmpfs: the truth logs grow by 32 bytes per packet).
pub const STATE_ROOT: &str = "/run/linkpulse-testbed";
const PID_FILE: &str = "pid";
const READY_FILE: &str = "ready";
const LOG_FILE: &str = "testbed.log";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrafficMode {
    /// No generated traffic.
    None,
    /// UDP both ways on every modem (300 pps up, 600 pps down) and one TCP download on modem 0.
    Demo,
}

/// `LISTEN=PORT` or `LISTEN=ADDR:PORT`: a TCP port forwarder from the calling namespace into
/// the router namespace (target address defaults to 127.0.0.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

impl std::str::FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (l, t) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected LISTEN_ADDR:PORT=PORT"))?;
        let listen: SocketAddr = l
            .parse()
            .map_err(|e| format!("{l:?} is not an address:port ({e})"))?;
        let target = match t.parse::<u16>() {
            Ok(port) => SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port),
            Err(_) => t
                .parse()
                .map_err(|e| format!("{t:?} is neither a port nor an address:port ({e})"))?,
        };
        Ok(Forward { listen, target })
    }
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.listen, self.target)
    }
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum TestbedCmd {
    /// Build the emulated router (namespaces NAME-rtr, NAME-car, NAME-srv) in a background
    /// process and return once it is ready.
    Up {
        /// Testbed name (≤ 6 characters): the prefix of its namespaces.
        #[arg(long, default_value = "lp")]
        name: String,
        /// Number of modems wwan0..; they cycle through Verizon, T-Mobile, AT&T, fixed 20/5 Mbit.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        modems: u16,
        /// Where the truth logs, the log file and the pid file go [default: /run/linkpulse-testbed/NAME].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "none")]
        traffic: TrafficMode,
        /// Forward a TCP port of this namespace into the router namespace, e.g.
        /// 127.0.0.1:8480=8480 (repeatable).
        #[arg(long = "forward", value_name = "LISTEN=PORT")]
        forward: Vec<Forward>,
        /// Downlink boundary guard in µs (no delivery toward the router this close before a
        /// whole second).
        #[arg(long, default_value_t = DEFAULT_GUARD_US)]
        guard_us: u32,
        /// Also run a real InfluxDB 1.x (the tests' harness) in the router namespace, on
        /// 127.0.0.1:8086 only, with its files in this directory and a database `linkpulse`: a
        /// central side for the daemon's [[forward]]. Stopped with the testbed.
        #[arg(long, value_name = "DIR")]
        influx: Option<PathBuf>,
        /// How long to wait for the background process to be ready.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Stop the testbed's process and remove its namespaces (also leftovers of a crash).
    Down {
        #[arg(long, default_value = "lp")]
        name: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// How long the process gets to tear down before it is killed.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Show namespaces, modems, profiles and ground-truth counts.
    Status {
        #[arg(long, default_value = "lp")]
        name: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// The testbed process itself (started by `up`).
    #[command(hide = true)]
    Run {
        #[arg(long)]
        name: String,
        #[arg(long)]
        modems: u16,
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, value_enum)]
        traffic: TrafficMode,
        #[arg(long = "forward")]
        forward: Vec<Forward>,
        #[arg(long)]
        guard_us: u32,
        #[arg(long)]
        influx: Option<PathBuf>,
    },
}

/// How `up` re-executes this program for `run`: the executable and the arguments before `run`.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub exe: PathBuf,
    pub prefix: Vec<String>,
}

impl Launcher {
    /// `current_exe() testbed run …` — the `linkpulse` binary's layout.
    pub fn current() -> Result<Launcher> {
        Ok(Launcher {
            exe: std::env::current_exe().context("cannot find the running executable")?,
            prefix: vec!["testbed".into()],
        })
    }
}

/// Runs a testbed subcommand of the `linkpulse` binary.
pub fn run(cmd: TestbedCmd) -> Result<()> {
    run_with(cmd, &Launcher::current()?)
}

/// Like [`run`], with an explicit way to start the background process.
pub fn run_with(cmd: TestbedCmd, launcher: &Launcher) -> Result<()> {
    match cmd {
        TestbedCmd::Up {
            name,
            modems,
            state_dir,
            traffic,
            forward,
            guard_us,
            influx,
            timeout_secs,
        } => {
            let state_dir = state_dir.unwrap_or_else(|| default_state_dir(&name));
            up(
                launcher,
                &RunArgs {
                    name,
                    modems,
                    state_dir,
                    traffic,
                    forward,
                    guard_us,
                    influx,
                },
                Duration::from_secs(timeout_secs),
            )
        }
        TestbedCmd::Down {
            name,
            state_dir,
            timeout_secs,
        } => {
            let state_dir = state_dir.unwrap_or_else(|| default_state_dir(&name));
            down(&name, &state_dir, Duration::from_secs(timeout_secs))
        }
        TestbedCmd::Status { name, state_dir } => {
            let state_dir = state_dir.unwrap_or_else(|| default_state_dir(&name));
            status(&name, &state_dir)
        }
        TestbedCmd::Run {
            name,
            modems,
            state_dir,
            traffic,
            forward,
            guard_us,
            influx,
        } => run_foreground(&RunArgs {
            name,
            modems,
            state_dir,
            traffic,
            forward,
            guard_us,
            influx,
        }),
    }
}

pub fn default_state_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

#[derive(Debug, Clone)]
struct RunArgs {
    name: String,
    modems: u16,
    state_dir: PathBuf,
    traffic: TrafficMode,
    forward: Vec<Forward>,
    guard_us: u32,
    /// Data directory of the router namespace's InfluxDB, if one is wanted.
    influx: Option<PathBuf>,
}

/// Where `--influx` listens, inside the router namespace, and its database.
pub const INFLUX_ADDR: &str = "127.0.0.1:8086";
pub const INFLUX_DB: &str = "linkpulse";

/// The demo set: modem k gets profile k % 4 (seeds and outage phases differ per k).
pub fn demo_spec(name: &str, modems: usize, state_dir: &Path) -> TestbedSpec {
    let tr = |f: &str| Some(crate::traces_dir().join(f));
    // Cellular buffers are deep; 150 kB is ~100 full-size packets.
    let queue = 150_000;
    let modems = (0..modems)
        .map(|k| {
            let seed = 1 + k as u64;
            let base = LinkProfile {
                queue_bytes: queue,
                seed,
                ..LinkProfile::default()
            };
            let (kind, up, down) = match k % 4 {
                0 => {
                    let p = |f| LinkProfile {
                        trace: tr(f),
                        delay_us: 20_000,
                        ..base.clone()
                    };
                    (
                        ModemKind::Veth,
                        p("Verizon-LTE-short.up"),
                        p("Verizon-LTE-short.down"),
                    )
                }
                1 => {
                    let p = |f, loss| LinkProfile {
                        trace: tr(f),
                        delay_us: 30_000,
                        jitter_us: 5_000,
                        loss,
                        ..base.clone()
                    };
                    (
                        ModemKind::Tun,
                        p("TMobile-LTE-short.up", 0.005),
                        p("TMobile-LTE-short.down", 0.0),
                    )
                }
                2 => {
                    let outage = Outage {
                        start_ms: 10_000 + 1_000 * (k as u64 / 4),
                        duration_ms: 3_000,
                        every_ms: Some(30_000),
                    };
                    let p = |f| LinkProfile {
                        trace: tr(f),
                        delay_us: 40_000,
                        outages: vec![outage],
                        ..base.clone()
                    };
                    (
                        ModemKind::Veth,
                        p("ATT-LTE-driving-2016.up"),
                        p("ATT-LTE-driving-2016.down"),
                    )
                }
                _ => {
                    let p = |kbit, loss| LinkProfile {
                        rate_kbit: Some(kbit),
                        delay_us: 25_000,
                        loss,
                        ..base.clone()
                    };
                    (ModemKind::Tun, p(5_000, 0.0), p(20_000, 0.01))
                }
            };
            ModemSpec {
                ifname: format!("wwan{k}"),
                kind,
                up,
                down,
            }
        })
        .collect();
    TestbedSpec {
        name: name.to_string(),
        modems,
        state_dir: state_dir.to_path_buf(),
    }
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0: existence check only.
    signal::kill(Pid::from_raw(pid), None).is_ok()
}

/// The pid in the state dir, if that process is alive and is a testbed `run`.
fn running_pid(state_dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(state_dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid <= 1 || !pid_alive(pid) {
        return None;
    }
    // Guard against pid reuse: the process must be ours.
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args.iter().any(|a| *a == b"run") && args.iter().any(|a| *a == b"--state-dir");
    ours.then_some(pid)
}

/// A live `testbed run` process for testbed `name`, found by its command line (for when the pid
/// file is gone or another state dir was used).
fn find_runner(name: &str) -> Option<i32> {
    let me = std::process::id() as i32;
    let rd = fs::read_dir("/proc").ok()?;
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_run = args.iter().any(|a| *a == b"run") && args.iter().any(|a| *a == b"--state-dir");
        let named = args
            .windows(2)
            .any(|w| w[0] == b"--name" && w[1] == name.as_bytes());
        if is_run && named {
            return Some(pid);
        }
    }
    None
}

fn up(launcher: &Launcher, a: &RunArgs, timeout: Duration) -> Result<()> {
    topology::check_prerequisites()?;
    // Validate before forking, so mistakes are reported here, not in a log file.
    demo_spec(&a.name, usize::from(a.modems), &a.state_dir).validate()?;
    if let Some(pid) = running_pid(&a.state_dir).or_else(|| find_runner(&a.name)) {
        bail!(
            "testbed {} is already running (pid {pid}); stop it with `testbed down --name {}`",
            a.name,
            a.name
        );
    }
    fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let ready = a.state_dir.join(READY_FILE);
    match fs::remove_file(&ready) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", ready.display())),
    }
    let log_path = a.state_dir.join(LOG_FILE);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = Command::new(&launcher.exe);
    cmd.args(&launcher.prefix)
        .args(["run", "--name", &a.name, "--modems", &a.modems.to_string()])
        .arg("--state-dir")
        .arg(&a.state_dir)
        .args([
            "--traffic",
            match a.traffic {
                TrafficMode::None => "none",
                TrafficMode::Demo => "demo",
            },
            "--guard-us",
            &a.guard_us.to_string(),
        ]);
    for f in &a.forward {
        cmd.arg("--forward").arg(f.to_string());
    }
    if let Some(dir) = &a.influx {
        // The background process runs elsewhere (setsid) but not in another directory; an
        // absolute path keeps its meaning in the log and in `status`.
        let dir =
            std::path::absolute(dir).with_context(|| format!("--influx {}", dir.display()))?;
        cmd.arg("--influx").arg(dir);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating the log fd")?)
        .stderr(log);
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent; detaching
    // from our session keeps the testbed alive when the calling terminal goes away.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", launcher.exe.display()))?;
    let t0 = Instant::now();
    loop {
        if ready.exists() {
            break;
        }
        if let Some(st) = child
            .try_wait()
            .context("waiting for the testbed process")?
        {
            bail!(
                "the testbed process exited ({st}) before it was ready; its log ({}):\n{}",
                log_path.display(),
                log_tail(&log_path, log_start)
            );
        }
        if t0.elapsed() > timeout {
            // Let it tear down what it built.
            let _ = signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            bail!(
                "the testbed was not ready after {timeout:?}; it was asked to stop. Log ({}):\n{}",
                log_path.display(),
                log_tail(&log_path, log_start)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let spec = demo_spec(&a.name, usize::from(a.modems), &a.state_dir);
    println!(
        "testbed {} up (pid {}), in {:.1} s",
        a.name,
        child.id(),
        t0.elapsed().as_secs_f64()
    );
    print_layout(&spec);
    if a.traffic == TrafficMode::Demo {
        println!("traffic: demo (UDP both ways on every modem, TCP download on wwan0)");
    }
    for f in &a.forward {
        println!(
            "forward: {} (this namespace) -> {} in {}-rtr",
            f.listen, f.target, a.name
        );
    }
    if let Some(dir) = &a.influx {
        println!(
            "influx:  http://{INFLUX_ADDR} in {}-rtr, database {INFLUX_DB}, files in {}",
            a.name,
            dir.display()
        );
    }
    println!(
        "state:   {} (log {LOG_FILE}, truth/)",
        a.state_dir.display()
    );
    println!("stop:    linkpulse testbed down --name {}", a.name);
    Ok(())
}

fn print_layout(spec: &TestbedSpec) {
    let [rtr, car, srv] = topology::namespaces(&spec.name);
    println!("namespaces: {rtr} (router), {car} (carrier), {srv} (server)");
    for (k, m) in spec.modems.iter().enumerate() {
        let (r4, s4) = topology::addr_v4(k);
        let (r6, s6) = topology::addr_v6(k);
        let kind = match m.kind {
            ModemKind::Veth => "veth",
            ModemKind::Tun => "tun ",
        };
        println!(
            "  {:<7} {kind} {r4} {r6}  <->  {} {s4} {s6}",
            m.ifname,
            topology::server_ifname(k)
        );
        println!("          up:   {}", m.up);
        println!("          down: {}", m.down);
    }
}

fn log_tail(path: &Path, from: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = from.max(len.saturating_sub(8_000));
        if f.seek(SeekFrom::Start(start)).is_ok() {
            let _ = f.read_to_string(&mut s);
        }
    }
    if s.trim().is_empty() {
        "(empty)".into()
    } else {
        s
    }
}

fn down(name: &str, state_dir: &Path, timeout: Duration) -> Result<()> {
    if !sys::is_root() {
        bail!("testbed down needs root (it deletes network namespaces)");
    }
    let mut did = Vec::new();
    if let Some(pid) = running_pid(state_dir).or_else(|| find_runner(name)) {
        signal::kill(Pid::from_raw(pid), Signal::SIGTERM)
            .with_context(|| format!("signalling testbed process {pid}"))?;
        let t0 = Instant::now();
        while pid_alive(pid) && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid_alive(pid) {
            eprintln!("testbed process {pid} did not stop within {timeout:?}; killing it");
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            let t1 = Instant::now();
            while pid_alive(pid) && t1.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        did.push(format!("stopped process {pid}"));
    }
    let mut errors = Vec::new();
    for ns in topology::namespaces(name) {
        if netns::exists(&ns) {
            match netns::delete(&ns) {
                Ok(()) => did.push(format!("deleted leftover namespace {ns}")),
                Err(e) => errors.push(format!("{e}")),
            }
        }
    }
    // testbed.json and truth/ stay for `status` and analysis after the fact.
    for f in [PID_FILE, READY_FILE] {
        let _ = fs::remove_file(state_dir.join(f));
    }
    if !errors.is_empty() {
        bail!("testbed {name}: {}", errors.join("; "));
    }
    if did.is_empty() {
        println!("testbed {name}: nothing running");
    } else {
        println!("testbed {name} down: {}", did.join(", "));
    }
    Ok(())
}

fn status(name: &str, state_dir: &Path) -> Result<()> {
    let nss = topology::namespaces(name);
    let present: Vec<&String> = nss.iter().filter(|n| netns::exists(n)).collect();
    match running_pid(state_dir).or_else(|| find_runner(name)) {
        Some(pid) => println!("testbed {name}: running (pid {pid})"),
        None => println!("testbed {name}: no process"),
    }
    println!(
        "namespaces: {}",
        if present.is_empty() {
            "none".to_string()
        } else {
            present
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let state_path = state_dir.join(STATE_FILE);
    let state: Option<TestbedState> = fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let Some(state) = state else {
        println!("no state file ({})", state_path.display());
        return Ok(());
    };
    let secs = sys::realtime_ns().saturating_sub(state.start_ns) as f64 / 1e9;
    println!(
        "last emulator start {secs:.1} s ago, downlink guard {} µs, state {}",
        state.guard_us,
        state_dir.display()
    );
    print_layout(&state.spec);
    let truth_dir = state_dir.join("truth");
    println!("ground truth ({}):", truth_dir.display());
    for k in 0..state.spec.modems.len() {
        for dir in [Dir::Up, Dir::Down] {
            let path = truth_dir.join(truth::file_name(k as u16, dir));
            if !path.exists() {
                continue;
            }
            let sum = truth::summarize_file(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let total: u64 = sum.values().map(|c| c.packets).sum();
            let parts: Vec<String> = sum
                .iter()
                .map(|(v, c)| format!("{} {} ({} B)", v.as_str(), c.packets, c.bytes))
                .collect();
            println!(
                "  {} {:<4}: {total} packets: {}",
                state.spec.modems[k].ifname,
                dir.as_str(),
                parts.join(", ")
            );
        }
    }
    Ok(())
}

// ---- the background process ----

static STOP: AtomicBool = AtomicBool::new(false);
static STOP_PIPE_W: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    let fd = STOP_PIPE_W.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; the pipe fd stays open for the process life.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// Installs SIGTERM/SIGINT/SIGHUP handlers that wake the returned pipe.
fn install_signals() -> Result<std::os::fd::OwnedFd> {
    let (r, w) = nix::unistd::pipe().context("creating the signal pipe")?;
    STOP_PIPE_W.store(w.as_raw_fd(), Ordering::SeqCst);
    // The write end must outlive every signal: leak it on purpose.
    std::mem::forget(w);
    let act = signal::SigAction::new(
        SigHandler::Handler(on_signal),
        signal::SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only does async-signal-safe things (atomics, write).
        unsafe { signal::sigaction(s, &act) }.with_context(|| format!("installing {s} handler"))?;
        set.add(s);
    }
    // A caller may have blocked them (the daemon does for its own loop); we want them.
    signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None)
        .context("unblocking signals")?;
    Ok(r)
}

struct Running {
    flows: Vec<UdpFlowHandle>,
    sinks: Vec<UdpSinkHandle>,
    tcp: Vec<TcpFlowHandle>,
    forwarders: Vec<Forwarder>,
}

fn run_foreground(a: &RunArgs) -> Result<()> {
    let stop_pipe = install_signals()?;
    fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let pid_path = a.state_dir.join(PID_FILE);
    fs::write(&pid_path, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_path.display()))?;
    let result = run_until_signal(a, &stop_pipe);
    for f in [PID_FILE, READY_FILE] {
        let _ = fs::remove_file(a.state_dir.join(f));
    }
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "testbed failed");
    }
    result
}

fn run_until_signal(a: &RunArgs, stop_pipe: &std::os::fd::OwnedFd) -> Result<()> {
    let spec = demo_spec(&a.name, usize::from(a.modems), &a.state_dir);
    let tb = Testbed::up_with(
        spec,
        TestbedOptions {
            guard_us: a.guard_us,
        },
    )?;
    let mut running = Running {
        flows: Vec::new(),
        sinks: Vec::new(),
        tcp: Vec::new(),
        forwarders: Vec::new(),
    };
    if a.traffic == TrafficMode::Demo {
        start_demo_traffic(&tb, &mut running)?;
    }
    for f in &a.forward {
        running
            .forwarders
            .push(Forwarder::start(f, tb.router_ns())?);
    }
    let influx = match &a.influx {
        Some(dir) => {
            let addr: SocketAddr = INFLUX_ADDR.parse().context("INFLUX_ADDR")?;
            let IpAddr::V4(ip) = addr.ip() else {
                bail!("INFLUX_ADDR must be IPv4");
            };
            let i = crate::influx::Influx::start(tb.router_ns(), ip, dir.clone(), INFLUX_DB)
                .context("starting the router namespace's InfluxDB (--influx)")?;
            tracing::info!(url = %i.url(), db = INFLUX_DB, dir = %dir.display(), "InfluxDB up");
            Some(i)
        }
        None => None,
    };
    let ready = a.state_dir.join(READY_FILE);
    let tmp = a.state_dir.join(".ready.tmp");
    fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| fs::rename(&tmp, &ready))
        .with_context(|| format!("writing {}", ready.display()))?;
    tracing::info!(name = %a.name, "testbed ready; waiting for SIGTERM/SIGINT");

    let mut warned = vec![false; tb.spec().modems.len()];
    while !STOP.load(Ordering::SeqCst) {
        let [woke] = sys::poll_readable([stop_pipe.as_raw_fd()], Some(1_000_000_000))
            .context("waiting for a signal")?;
        if woke {
            break;
        }
        for (k, w) in warned.iter_mut().enumerate() {
            if !*w && !tb.emulator_running(k) {
                *w = true;
                tracing::error!(modem = k, "emulator thread stopped; see the errors above");
            }
        }
    }
    tracing::info!("stopping");
    if let Some(i) = influx {
        i.stop();
    }
    for f in running.forwarders.drain(..) {
        f.stop();
    }
    for t in running.tcp.drain(..) {
        match t.stop() {
            Ok(st) => tracing::info!(?st, "TCP flow stopped"),
            Err(e) => tracing::warn!(error = %e, "TCP flow stop"),
        }
    }
    for f in running.flows.drain(..) {
        match f.stop() {
            Ok(st) => tracing::info!(?st, "UDP flow stopped"),
            Err(e) => tracing::warn!(error = %e, "UDP flow stop"),
        }
    }
    for s in running.sinks.drain(..) {
        let _ = s.stop();
    }
    tb.down()?;
    Ok(())
}

fn start_demo_traffic(tb: &Testbed, r: &mut Running) -> Result<()> {
    for k in 0..tb.spec().modems.len() {
        let ifname = tb.modem_ifname(k)?.to_string();
        let srv_if = tb.server_ifname(k);
        // Odd modems carry IPv6, even ones IPv4.
        let (rtr, srv): (IpAddr, IpAddr) = if k % 2 == 1 {
            let (a, b) = tb.modem_addr_v6(k);
            (a.into(), b.into())
        } else {
            let (a, b) = tb.modem_addr_v4(k);
            (a.into(), b.into())
        };
        let up_dst = SocketAddr::new(srv, 5000);
        let down_dst = SocketAddr::new(rtr, 5001);
        r.sinks.push(
            UdpSink::new(tb.server_ns(), up_dst, Some(srv_if.clone()))
                .start()
                .with_context(|| format!("UDP sink for {ifname} up"))?,
        );
        r.sinks.push(
            UdpSink::new(tb.router_ns(), down_dst, Some(ifname.clone()))
                .start()
                .with_context(|| format!("UDP sink for {ifname} down"))?,
        );
        let up = UdpFlow::new(tb.router_ns(), &ifname, rtr, up_dst, 300, 500 - 28);
        let down = UdpFlow::new(tb.server_ns(), &srv_if, srv, down_dst, 600, 1000 - 28);
        for f in [up, down] {
            // Keep L3 sizes identical for v4 and v6 modems.
            let f = if k % 2 == 1 {
                UdpFlow {
                    payload: f.payload - 20,
                    ..f
                }
            } else {
                f
            };
            r.flows.push(
                f.start()
                    .with_context(|| format!("UDP flow {} -> {}", f.src, f.dst))?,
            );
        }
    }
    let (rtr0, srv0) = tb.modem_addr_v4(0);
    let tcp = TcpFlow {
        client_ns: tb.router_ns().to_string(),
        client_dev: tb.modem_ifname(0)?.to_string(),
        client_src: rtr0.into(),
        server_ns: tb.server_ns().to_string(),
        server_dev: Some(tb.server_ifname(0)),
        server: SocketAddr::new(srv0.into(), 5201),
        direction: TcpDirection::ServerToClient,
        rate_kbit: Some(2_000),
    };
    r.tcp.push(tcp.start().context("TCP download on modem 0")?);
    Ok(())
}

/// TCP port forwarder: accepts in the calling namespace, connects inside the router's.
struct Forwarder {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Forwarder {
    fn start(f: &Forward, router_ns: &str) -> Result<Forwarder> {
        let listener = TcpListener::bind(f.listen)
            .with_context(|| format!("forwarder: listening on {}", f.listen))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (st, cs, target, ns) = (stop.clone(), conns.clone(), f.target, router_ns.to_string());
        let join = std::thread::Builder::new()
            .name("forwarder".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match sys::poll_readable([listener.as_raw_fd()], Some(200_000_000)) {
                        Ok([true]) => {}
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "forwarder poll failed");
                            return;
                        }
                    }
                    let Ok((client, peer)) = listener.accept() else {
                        continue;
                    };
                    let upstream = netns::run_in(&ns, || {
                        TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    });
                    let upstream = match upstream {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, %target, error = %e, "forwarder: upstream connect failed");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "forwarder: cannot enter the router namespace");
                            continue;
                        }
                    };
                    if let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) {
                        if let Ok(mut g) = cs.lock() {
                            g.retain(|s| s.peer_addr().is_ok());
                            g.push(c2);
                            g.push(u2);
                        }
                    }
                    splice_pair(client, upstream);
                }
            })
            .context("forwarder: spawning its thread")?;
        Ok(Forwarder {
            stop,
            join: Some(join),
            conns,
        })
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(g) = self.conns.lock() {
            for s in g.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Copies both ways on two threads; each direction half-closes the other side at EOF.
fn splice_pair(a: TcpStream, b: TcpStream) {
    let pairs = match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => [(a, b2), (b, a2)],
        _ => return,
    };
    for (mut from, mut to) in pairs {
        let spawned = std::thread::Builder::new()
            .name("forward copy".into())
            .spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "forwarder: cannot spawn a copy thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: TestbedCmd,
    }

    #[test]
    fn parses_the_demo_invocation() {
        let c = Cli::try_parse_from([
            "x",
            "up",
            "--name",
            "lpdemo",
            "--modems",
            "4",
            "--traffic",
            "demo",
            "--forward",
            "127.0.0.1:8480=8480",
        ])
        .unwrap();
        match c.cmd {
            TestbedCmd::Up {
                name,
                modems,
                traffic,
                forward,
                state_dir,
                ..
            } => {
                assert_eq!(name, "lpdemo");
                assert_eq!(modems, 4);
                assert_eq!(traffic, TrafficMode::Demo);
                assert_eq!(state_dir, None);
                assert_eq!(
                    forward,
                    vec![Forward {
                        listen: "127.0.0.1:8480".parse().unwrap(),
                        target: "127.0.0.1:8480".parse().unwrap()
                    }]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["x", "down"]).is_ok());
        assert!(Cli::try_parse_from(["x", "up", "--forward", "8480"]).is_err());
        assert!(Cli::try_parse_from(["x", "up", "--modems", "0"]).is_err());
        let f: Forward = "0.0.0.0:9=[::1]:10".parse().unwrap();
        assert_eq!(f.target, "[::1]:10".parse().unwrap());
    }

    #[test]
    fn demo_spec_cycles_and_validates() {
        let s = demo_spec("lpdemo", 6, Path::new("/tmp/x"));
        assert!(s.validate().is_ok());
        assert_eq!(s.modems[0].kind, ModemKind::Veth);
        assert_eq!(s.modems[1].kind, ModemKind::Tun);
        assert_eq!(s.modems[3].up.rate_kbit, Some(5_000));
        assert_eq!(s.modems[3].down.rate_kbit, Some(20_000));
        assert!((s.modems[3].down.loss - 0.01).abs() < 1e-12);
        assert!((s.modems[1].up.loss - 0.005).abs() < 1e-12);
        assert_eq!(s.modems[2].down.outages[0].duration_ms, 3_000);
        assert_eq!(s.modems[4].kind, ModemKind::Veth);
        assert_ne!(s.modems[4].up.seed, s.modems[0].up.seed);
        for m in &s.modems {
            for p in [&m.up, &m.down] {
                if let Some(t) = &p.trace {
                    assert!(t.exists(), "{}", t.display());
                }
            }
        }
    }
}
