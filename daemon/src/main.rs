//! The `linkpulse` binary: `run`, `check-config`, `reflect`, `top`, `testbed`.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use linkpulse::stamp::{FormatChoice, Reflector, ReflectorConfig};
use linkpulse::{config::DEFAULT_CONFIG_PATH, notify::Notifier, Config, Daemon};

#[derive(Parser)]
#[command(
    name = "linkpulse",
    version,
    about = "Per-modem throughput at 0.1 ms resolution, on one time grid"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "LINKPULSE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: attach to the configured modem interfaces and serve the API.
    Run {
        /// Configuration file.
        #[arg(long, short, env = "LINKPULSE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration file; errors name the line and the fix.
    CheckConfig {
        /// Configuration file.
        #[arg(env = "LINKPULSE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        file: PathBuf,
    },
    /// Answer STAMP probes (RFC 8762, unauthenticated): the reflector for the aggregation
    /// server. Port 862 needs CAP_NET_BIND_SERVICE.
    Reflect {
        /// ADDR or ADDR:PORT; `[::]` listens on IPv6 and IPv4. Without a port: 862.
        #[arg(long, default_value = "[::]:862", value_parser = linkpulse::stamp::parse_listen)]
        listen: std::net::SocketAddr,
        /// Sessions (sender address, port, SSID) kept; the least recent one is recycled.
        #[arg(long, default_value_t = ReflectorConfig::default().max_sessions)]
        max_sessions: usize,
        /// Replies per second per source address (token bucket).
        #[arg(long, default_value_t = ReflectorConfig::default().rate_per_source)]
        rate: f64,
        /// Replies a source may send in a burst above its rate.
        #[arg(long, default_value_t = ReflectorConfig::default().burst)]
        burst: u32,
        /// Timestamp format of replies: auto (each request's Z flag), ntp or ptp.
        #[arg(long, default_value = "auto")]
        timestamp_format: FormatChoice,
        /// Largest request reflected, in bytes of UDP payload; larger ones are dropped.
        #[arg(long, default_value_t = ReflectorConfig::default().max_len)]
        max_len: usize,
    },
    /// The live per-link table in the terminal (over SSH too), from the daemon's API; q quits.
    Top {
        /// The daemon's configuration: where its API listens, its token, its TLS certificate.
        #[arg(long, short, env = "LINKPULSE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// API base URL instead of the config's, e.g. https://10.0.0.1:8480.
        #[arg(long, env = "LINKPULSE_URL")]
        url: Option<String>,
        /// File holding the API token (default: the config's [http] token_file).
        #[arg(long, env = "LINKPULSE_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// PEM certificate to trust for https (default: the config's [http] tls_cert).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Print the table once and exit (for scripts).
        #[arg(long)]
        once: bool,
    },
    /// Export one link's rollups from the local store (for ISP reports). Uses the running
    /// daemon's store, or starts it for the command when the daemon is not running.
    Export {
        #[arg(long, short, env = "LINKPULSE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Interface name, label or link number.
        #[arg(long)]
        link: String,
        /// Start (inclusive): RFC 3339 (2026-11-22T05:00:00Z) or unix seconds.
        #[arg(long, value_parser = linkpulse::forward::tools::parse_time)]
        from: u64,
        /// End (exclusive), same notations.
        #[arg(long, value_parser = linkpulse::forward::tools::parse_time)]
        to: u64,
        #[arg(long, default_value = "csv")]
        format: linkpulse::forward::tools::Format,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Send a destination every rollup from a time on again (idempotent: same points, same
    /// values). The running daemon's forwarder picks it up at once.
    Resync {
        #[arg(long, short, env = "LINKPULSE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// A [[forward]] name.
        #[arg(long)]
        destination: String,
        /// RFC 3339 or unix seconds.
        #[arg(long, value_parser = linkpulse::forward::tools::parse_time)]
        since: u64,
    },
    /// The emulated router used by the demo and the tests (network namespaces, LTE traces).
    #[cfg(feature = "testbed")]
    #[command(subcommand)]
    Testbed(linkpulse_testbed::cli::TestbedCmd),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs also go to files and journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.cmd {
        Cmd::Run { config } => run(config),
        Cmd::CheckConfig { file } => {
            let cfg = Config::load(&file)?;
            println!(
                "{}: ok — router {} at {}, {} link(s), bins of {} µs, API on {}",
                file.display(),
                cfg.router_id,
                cfg.site,
                cfg.links.len(),
                cfg.bin_width_ns / 1000,
                cfg.http_listen
            );
            Ok(())
        }
        Cmd::Reflect {
            listen,
            max_sessions,
            rate,
            burst,
            timestamp_format,
            max_len,
        } => reflect(ReflectorConfig {
            listen,
            max_sessions,
            rate_per_source: rate,
            burst,
            format: timestamp_format,
            max_len,
        }),
        Cmd::Top {
            config,
            url,
            token_file,
            ca,
            once,
        } => top(config, url, token_file, ca, once),
        Cmd::Export {
            config,
            link,
            from,
            to,
            format,
            output,
        } => {
            use linkpulse::forward::tools;
            let cfg = Config::load(&config)?;
            let link = tools::resolve_link(&cfg, &link)?;
            let store = tools::open_store(&cfg)?;
            let mut out = tools::output(output.as_ref())?;
            let n = tools::export(&store, &cfg, link, from, to, format, &mut out);
            drop(out);
            store.stop();
            eprintln!("{} rollups exported", n?);
            Ok(())
        }
        Cmd::Resync {
            config,
            destination,
            since,
        } => {
            use linkpulse::forward::tools;
            let cfg = Config::load(&config)?;
            let store = tools::open_store(&cfg)?;
            let r = tools::resync(&store, &cfg, &destination, since);
            store.stop();
            match r? {
                Some(r) => println!(
                    "{destination}: cursor moved from seq {} to {}: every rollup from {} on is sent again",
                    r.old_cursor,
                    r.new_cursor,
                    tools::format_time(since)
                ),
                None => println!("{destination}: no rollup from {} on in the store: nothing to send", tools::format_time(since)),
            }
            Ok(())
        }
        #[cfg(feature = "testbed")]
        Cmd::Testbed(cmd) => linkpulse_testbed::cli::run(cmd),
    }
}

/// `linkpulse top`: the config gives the defaults, flags override them (with --url the config
/// is optional).
fn top(
    config: PathBuf,
    url: Option<String>,
    token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    once: bool,
) -> anyhow::Result<()> {
    use linkpulse::top::{read_token, Target};
    let mut target = match (Config::load(&config), &url) {
        (Ok(cfg), _) => Target::from_config(&cfg)?,
        (Err(_), Some(u)) => Target {
            base: u.clone(),
            token: None,
            ca: None,
        },
        (Err(e), None) => return Err(e).context("reading the daemon's config (or pass --url)"),
    };
    if let Some(u) = url {
        target.base = u.trim_end_matches('/').to_string();
    }
    if let Some(p) = token_file {
        target.token = Some(read_token(&p)?);
    }
    if ca.is_some() {
        target.ca = ca;
    }
    linkpulse::top::run(target, once)?;
    Ok(())
}

/// `linkpulse reflect`: serves until SIGINT or SIGTERM.
fn reflect(cfg: ReflectorConfig) -> anyhow::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        set.add(s);
    }
    // Before the reflector thread starts, so it inherits the mask.
    set.thread_block().context("blocking signals")?;
    let handle = Reflector::bind(cfg.clone())?.spawn()?;
    tracing::info!(
        listen = %handle.local_addr(),
        max_sessions = cfg.max_sessions,
        rate_per_source = cfg.rate_per_source,
        burst = cfg.burst,
        format = ?cfg.format,
        "STAMP reflector running"
    );
    let notifier = Notifier::from_env();
    notifier.notify("READY=1");
    while handle.is_running() {
        match wait_signal(&set, Duration::from_secs(1)) {
            Some(libc::SIGHUP) => {
                tracing::info!(
                    "SIGHUP: the reflector has no file to reload; restart it to change flags"
                )
            }
            Some(sig) => {
                tracing::info!(signal = sig, "stopping");
                notifier.notify("STOPPING=1");
                break;
            }
            None => {}
        }
    }
    // Read after the thread has ended, so the last reply is counted.
    let counters = handle.counters();
    handle.stop()?;
    println!("{}", serde_json::to_string(&counters.snapshot())?);
    Ok(())
}

/// glibc's malloc, tuned for a daemon of a dozen threads of which only the non-real-time ones
/// allocate: two arenas instead of one per thread (each a heap of its own, ~0.1–1 MB resident).
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt with a documented parameter, before the threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Gives freed heap pages back to the kernel: start-up (the eBPF object, the kernel's BTF, the
/// configuration) frees a few MB that otherwise stay resident in the middle of the heap.
fn trim_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// When `run` trims the heap: 10 s after start (the store is up by then), then every minute
/// (what HTTP requests freed).
const TRIM_FIRST: Duration = Duration::from_secs(10);
const TRIM_EVERY: Duration = Duration::from_secs(60);

fn run(path: PathBuf) -> anyhow::Result<()> {
    tune_malloc();
    let cfg = Config::load(&path)?;
    // Signals are taken synchronously by this thread; block them before any thread starts so
    // every thread inherits the mask.
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        set.add(s);
    }
    set.thread_block().context("blocking signals")?;

    let daemon = Daemon::start(&cfg, Vec::new()).context("starting the daemon")?;
    trim_malloc();
    let mut next_trim = std::time::Instant::now() + TRIM_FIRST;
    tracing::info!(
        router = %cfg.router_id,
        links = cfg.links.len(),
        bin_width_us = cfg.bin_width_ns / 1000,
        api = %daemon.http_addr(),
        "linkpulse running"
    );
    let notifier = Notifier::from_env();
    notifier.notify("READY=1");
    let watchdog = Notifier::watchdog_interval();
    let wait = watchdog
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    loop {
        match wait_signal(&set, wait) {
            Some(libc::SIGHUP) => match Config::load(&path) {
                Ok(new) => {
                    tracing::info!(file = %path.display(), "configuration reloaded");
                    notifier.notify("RELOADING=1");
                    daemon.reload(new);
                    notifier.notify("READY=1");
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload refused, keeping the running configuration")
                }
            },
            Some(sig) => {
                tracing::info!(signal = sig, "stopping");
                notifier.notify("STOPPING=1");
                break;
            }
            None => {}
        }
        if std::time::Instant::now() >= next_trim {
            trim_malloc();
            next_trim = std::time::Instant::now() + TRIM_EVERY;
        }
        // The watchdog is fed only while the data path is alive (ticked within 2 s).
        if watchdog.is_some() && daemon.is_healthy(2_000_000_000) {
            notifier.notify("WATCHDOG=1");
        }
    }
    daemon.stop();
    Ok(())
}

/// Waits up to `timeout` for one of the blocked signals.
fn wait_signal(set: &nix::sys::signal::SigSet, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid sigset and timespec; the info pointer may be null.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}
