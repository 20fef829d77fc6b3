//! The daemon's TOML configuration: sections with documented defaults, unknown keys refused,
//! every semantic error reported with the file, line and column of the offending value.
use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use linkpulse_common::MAX_LINKS;

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/linkpulse/linkpulse.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source} (pass the right file with --config or LINKPULSE_CONFIG)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub router_id: String,
    pub site: String,
    pub bin_width_ns: u64,
    pub grace_ns: u64,
    pub publish_interval_ns: u64,
    /// SCHED_FIFO priority of lp-ingest and lp-stream; 0: normal scheduling.
    pub realtime_priority: u8,
    pub http_listen: SocketAddr,
    /// `[http]` access: token and TLS (see `crate::http::auth`).
    pub http: HttpAccess,
    /// None when `[stream] enabled = false`.
    pub stream: Option<StreamConfig>,
    /// None when `[store] enabled = false`.
    pub store: Option<StoreConfig>,
    /// `[[forward]]` destinations (enabled ones; they need the store).
    pub forwards: Vec<crate::forward::ForwardDest>,
    pub links: Vec<LinkConfig>,
    /// `[probe]`: loss timeout and link-health thresholds (per-link settings in `LinkConfig`).
    pub probe: crate::probe::ProbeConfig,
    /// `[tcp_rtt]`: passive RTT from TCP timestamps.
    pub tcp_rtt: TcpRttConfig,
    /// The file it came from (for SIGHUP reloads and messages).
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Kernel interface name of the modem (e.g. `wwan0`).
    pub interface: String,
    /// Human label shown on the page and in the table (defaults to the interface name).
    pub label: String,
    pub operator: String,
    pub modem_id: String,
    /// STAMP probing of this link (None: no reflector configured, not probed).
    pub probe: Option<crate::probe::LinkProbeConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    router: RawRouter,
    #[serde(default)]
    sampling: RawSampling,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    stream: RawStream,
    #[serde(default)]
    store: RawStore,
    #[serde(default, rename = "link")]
    links: Vec<RawLink>,
    #[serde(default, rename = "forward")]
    forwards: Vec<crate::forward::RawForward>,
    #[serde(default)]
    probe: crate::probe::config::RawProbe,
    #[serde(default)]
    tcp_rtt: RawTcpRtt,
}

/// Passive RTT: the kernel programs match TCP timestamp options (TSval out, TSecr back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpRttConfig {
    pub enabled: bool,
    /// Entries of the kernel's (flow, TSval) table (an LRU hash).
    pub table_entries: u32,
}

impl Default for TcpRttConfig {
    /// As `[tcp_rtt]` defaults: on, 16384 entries.
    fn default() -> Self {
        Self {
            enabled: true,
            table_entries: 16384,
        }
    }
}

/// Most entries of the TSval table (64 B each with the hash overhead: ~64 MiB).
pub const MAX_TCP_TABLE_ENTRIES: u32 = 1 << 20;

/// `[tcp_rtt]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcpRtt {
    /// Default true.
    #[serde(default = "default_true")]
    enabled: bool,
    /// TSvals the kernel remembers, all links together: in flight and, until evicted, matched
    /// (LRU: the least recently used go first when it is full). 64..=1048576. Default 16384
    /// (~1 MiB).
    #[serde(default = "default_tcp_table_entries")]
    table_entries: Spanned<u32>,
}

impl Default for RawTcpRtt {
    fn default() -> Self {
        Self {
            enabled: true,
            table_entries: default_tcp_table_entries(),
        }
    }
}

fn default_tcp_table_entries() -> Spanned<u32> {
    Spanned::new(0..0, 16384)
}

/// `[stream]`: the controller's real-time stream (Unix SOCK_SEQPACKET socket).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    /// Default true.
    #[serde(default = "default_true")]
    enabled: bool,
    /// Default `/run/linkpulse/stream.sock`.
    #[serde(default = "default_stream_path")]
    path: PathBuf,
    /// File mode of the socket, octal. Default "0660" (owner and group).
    #[serde(default = "default_stream_mode")]
    mode: Spanned<String>,
    /// Group that may connect (the controller's). Default: the daemon's group.
    #[serde(default)]
    group: Option<String>,
    /// Clients at once. Default 16.
    #[serde(default = "default_max_clients")]
    max_clients: Spanned<usize>,
    /// CPU wake-up latency held while clients are subscribed, µs, or "off". Default 0.
    #[serde(default = "default_wakeup_latency")]
    cpu_wakeup_latency_us: Spanned<toml::Value>,
    /// How long a client may be held off its CPU without losing frames, ms. Default 20.
    #[serde(default = "default_client_buffer_ms")]
    client_buffer_ms: Spanned<u32>,
}

impl Default for RawStream {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_stream_path(),
            mode: default_stream_mode(),
            group: None,
            max_clients: default_max_clients(),
            cpu_wakeup_latency_us: default_wakeup_latency(),
            client_buffer_ms: default_client_buffer_ms(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_stream_path() -> PathBuf {
    PathBuf::from("/run/linkpulse/stream.sock")
}
fn default_stream_mode() -> Spanned<String> {
    Spanned::new(0..0, "0660".to_string())
}
fn default_max_clients() -> Spanned<usize> {
    Spanned::new(0..0, 16)
}
fn default_client_buffer_ms() -> Spanned<u32> {
    Spanned::new(0..0, 20)
}
fn default_wakeup_latency() -> Spanned<toml::Value> {
    Spanned::new(0..0, toml::Value::Integer(0))
}

/// Largest wake-up latency request accepted, µs (beyond it no idle state is excluded anyway).
const MAX_WAKEUP_LATENCY_US: i64 = 100_000;

/// `[store]`: 500 ms rollups in a local Tarantool the daemon runs itself.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    /// Default true.
    #[serde(default = "default_true")]
    enabled: bool,
    /// The instance's directory (init file, socket, log, database). Default
    /// `/var/lib/linkpulse/store`.
    #[serde(default = "default_store_dir")]
    data_dir: PathBuf,
    /// Rollup window in ms: a multiple of the bin width that divides one second, or whole
    /// seconds. Default 500.
    #[serde(default = "default_window_ms")]
    window_ms: Spanned<u64>,
    /// An instance someone else runs instead of the supervised one: "host:port" or a Unix
    /// socket path. Default: none (the daemon runs its own).
    #[serde(default)]
    external: Option<Spanned<String>>,
    /// User and password file (first line) for `external`. Default: guest.
    #[serde(default)]
    external_user: Option<String>,
    #[serde(default)]
    external_password_file: Option<PathBuf>,
    /// Rows older than this are deleted. Default 30 days; 0 keeps them until the disk quota.
    #[serde(default = "default_retention_days")]
    retention_days: Spanned<u32>,
    /// Disk quota of the supervised store's database in MiB; the oldest rows go first.
    /// Default 2048; 0 = no quota.
    #[serde(default = "default_max_disk_mb")]
    max_disk_mb: Spanned<u64>,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            enabled: true,
            data_dir: default_store_dir(),
            window_ms: default_window_ms(),
            external: None,
            external_user: None,
            external_password_file: None,
            retention_days: default_retention_days(),
            max_disk_mb: default_max_disk_mb(),
        }
    }
}

fn default_retention_days() -> Spanned<u32> {
    Spanned::new(0..0, 30)
}
fn default_max_disk_mb() -> Spanned<u64> {
    Spanned::new(0..0, 2048)
}

fn default_store_dir() -> PathBuf {
    PathBuf::from("/var/lib/linkpulse/store")
}
fn default_window_ms() -> Spanned<u64> {
    Spanned::new(0..0, 500)
}

/// The validated access settings of `[http]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpAccess {
    /// File holding the API token; required when `listen` is not a loopback address.
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain and private key: the API is served over HTTPS when both are set.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Width of a point of the live graphs (SSE), ns; a multiple of the bin width.
    pub live_point_ns: u64,
}

/// The validated `[store]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub window_ns: u64,
    /// `[store] external`: use this instance instead of supervising one.
    pub external: Option<crate::forward::ExternalStore>,
    /// 0 = no age limit.
    pub retention_days: u32,
    /// 0 = no quota.
    pub max_disk_mb: u64,
}

/// The validated `[stream]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    pub path: PathBuf,
    pub mode: u32,
    pub group: Option<String>,
    pub max_clients: usize,
    /// PM QoS limit held while clients are subscribed (`crate::cpu_latency`); None = off.
    pub cpu_wakeup_latency_us: Option<u32>,
    /// Each client's socket holds this many ms of its frames.
    pub client_buffer_ms: u32,
}

/// `[router]`: the identity that tags everything leaving the box.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    id: Spanned<String>,
    site: Spanned<String>,
}

/// `[sampling]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSampling {
    /// Bin width in µs; must divide one second (10 µs to 1 s). Default 100.
    #[serde(default = "default_bin_width_us")]
    bin_width_us: Spanned<u64>,
    /// How long after a bin's end the daemon waits for per-CPU data before publishing it.
    /// Default 1000 µs.
    #[serde(default = "default_grace_us")]
    grace_us: Spanned<u64>,
    /// How often due bins are published when no real-time consumer is connected (they are
    /// then published in small batches; a real-time consumer gets each bin at its deadline).
    /// Waking at every bin costs ~10% of a core at 10 kHz on a VM. Default 1000 µs.
    #[serde(default = "default_publish_interval_us")]
    publish_interval_us: Spanned<u64>,
    /// SCHED_FIFO priority of the threads between the kernel and the stream's clients
    /// (`lp-ingest`, `lp-stream`): 1..=99, 0 for normal scheduling. Default 10.
    #[serde(default = "default_realtime_priority")]
    realtime_priority: Spanned<u8>,
}

impl Default for RawSampling {
    fn default() -> Self {
        Self {
            bin_width_us: default_bin_width_us(),
            grace_us: default_grace_us(),
            publish_interval_us: default_publish_interval_us(),
            realtime_priority: default_realtime_priority(),
        }
    }
}

fn default_bin_width_us() -> Spanned<u64> {
    Spanned::new(0..0, 100)
}
fn default_grace_us() -> Spanned<u64> {
    Spanned::new(0..0, 1000)
}
fn default_publish_interval_us() -> Spanned<u64> {
    Spanned::new(0..0, 1000)
}
fn default_realtime_priority() -> Spanned<u8> {
    Spanned::new(0..0, 10)
}

/// `[http]`: API and metrics. Default `127.0.0.1:8480` (loopback only).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default = "default_listen")]
    listen: Spanned<String>,
    /// Token file (required off loopback). Default: none.
    #[serde(default)]
    token_file: Option<PathBuf>,
    /// TLS certificate chain and key (PEM). Default: none (plain HTTP).
    #[serde(default)]
    tls_cert: Option<Spanned<PathBuf>>,
    #[serde(default)]
    tls_key: Option<Spanned<PathBuf>>,
    /// Point width of the live graphs, ms. Default 10.
    #[serde(default = "default_live_point_ms")]
    live_point_ms: Spanned<u64>,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token_file: None,
            tls_cert: None,
            tls_key: None,
            live_point_ms: default_live_point_ms(),
        }
    }
}

fn default_live_point_ms() -> Spanned<u64> {
    Spanned::new(0..0, 10)
}

fn default_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:8480".to_string())
}

/// `[[link]]`: one modem.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    interface: Spanned<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    operator: Option<String>,
    #[serde(default)]
    modem_id: Option<String>,
    /// Per-link probe overrides (`[link.probe]`).
    #[serde(default)]
    probe: crate::probe::config::RawLinkProbe,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text, path)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Validates config text; `path` only names the file in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let err = |span: Option<Range<usize>>, message: String| {
            let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| err(e.span(), e.message().to_string()))?;

        let router_id = non_empty_tag(&raw.router.id, "router.id")
            .map_err(|m| err(Some(raw.router.id.span()), m))?;
        let site = non_empty_tag(&raw.router.site, "router.site")
            .map_err(|m| err(Some(raw.router.site.span()), m))?;

        let width_us = *raw.sampling.bin_width_us.get_ref();
        if !(10..=1_000_000).contains(&width_us) || 1_000_000 % width_us != 0 {
            return Err(err(
                Some(raw.sampling.bin_width_us.span()),
                format!(
                    "bin_width_us = {width_us} does not divide one second: use a divisor of \
                     1000000 between 10 and 1000000 (e.g. 10, 50, 100, 250, 500, 1000)"
                ),
            ));
        }
        let grace_us = *raw.sampling.grace_us.get_ref();
        if grace_us > 1_000_000 {
            return Err(err(
                Some(raw.sampling.grace_us.span()),
                format!(
                    "grace_us = {grace_us} is over one second: use 100 to 10000 (default 1000)"
                ),
            ));
        }

        let publish_us = *raw.sampling.publish_interval_us.get_ref();
        if !(1..=1_000_000).contains(&publish_us) {
            return Err(err(
                Some(raw.sampling.publish_interval_us.span()),
                format!("publish_interval_us = {publish_us} is out of range: use 1 to 1000000 (default 1000)"),
            ));
        }
        let realtime_priority = *raw.sampling.realtime_priority.get_ref();
        if realtime_priority > 99 {
            return Err(err(
                Some(raw.sampling.realtime_priority.span()),
                format!("realtime_priority = {realtime_priority} is out of range: use 1 to 99, or 0 for normal scheduling (default 10)"),
            ));
        }
        let http_listen: SocketAddr = raw.http.listen.get_ref().parse().map_err(|e| {
            err(
                Some(raw.http.listen.span()),
                format!(
                    "http.listen = {:?} is not an address with a port ({e}): e.g. \"127.0.0.1:8480\"",
                    raw.http.listen.get_ref()
                ),
            )
        })?;
        if !http_listen.ip().is_loopback() && raw.http.token_file.is_none() {
            return Err(err(
                Some(raw.http.listen.span()),
                format!(
                    "http.listen = {:?} is not a loopback address, so the API needs a token: set \
                     [http] token_file to a file holding a long random secret (e.g. \
                     `openssl rand -hex 32 > /etc/linkpulse/api.token`), or listen on 127.0.0.1",
                    raw.http.listen.get_ref()
                ),
            ));
        }
        let tls_cert = raw.http.tls_cert.as_ref().map(|c| c.get_ref().clone());
        let tls_key = raw.http.tls_key.as_ref().map(|c| c.get_ref().clone());
        if tls_cert.is_some() != tls_key.is_some() {
            let span = raw
                .http
                .tls_cert
                .as_ref()
                .or(raw.http.tls_key.as_ref())
                .map(|s| s.span());
            return Err(err(
                span,
                "http.tls_cert and http.tls_key go together: set both (PEM files) for HTTPS, or \
                 neither for plain HTTP"
                    .to_string(),
            ));
        }
        let live_ms = *raw.http.live_point_ms.get_ref();
        let live_point_ns = live_ms * 1_000_000;
        if !(1..=1000).contains(&live_ms) || !live_point_ns.is_multiple_of(width_us * 1000) {
            return Err(err(
                Some(raw.http.live_point_ms.span()),
                format!(
                    "http.live_point_ms = {live_ms}: use 1 to 1000 ms, a multiple of the bin \
                     width ({width_us} µs); default 10"
                ),
            ));
        }
        let http = HttpAccess {
            token_file: raw.http.token_file.clone(),
            tls_cert,
            tls_key,
            live_point_ns,
        };

        let stream = if raw.stream.enabled {
            let mode_text = raw.stream.mode.get_ref();
            let mode = u32::from_str_radix(mode_text.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    err(
                        Some(raw.stream.mode.span()),
                        format!(
                            "stream.mode = {mode_text:?} is not an octal file mode: e.g. \"0660\""
                        ),
                    )
                })?;
            let max = *raw.stream.max_clients.get_ref();
            if !(1..=256).contains(&max) {
                return Err(err(
                    Some(raw.stream.max_clients.span()),
                    format!("stream.max_clients = {max}: use 1 to 256 (default 16)"),
                ));
            }
            let w = &raw.stream.cpu_wakeup_latency_us;
            let cpu_wakeup_latency_us = match w.get_ref() {
                toml::Value::Integer(us) if (0..=MAX_WAKEUP_LATENCY_US).contains(us) => {
                    Some(*us as u32)
                }
                toml::Value::String(s) if s == "off" => None,
                v => {
                    // Not `{v}`: toml's Display brings its serializer, ~20 KB of the binary.
                    let v = match v {
                        toml::Value::Integer(i) => i.to_string(),
                        toml::Value::Float(f) => f.to_string(),
                        toml::Value::String(s) => format!("{s:?}"),
                        other => format!("a {}", other.type_str()),
                    };
                    return Err(err(
                        Some(w.span()),
                        format!(
                            "stream.cpu_wakeup_latency_us = {v}: use µs from 0 to \
                             {MAX_WAKEUP_LATENCY_US} (0: idle CPUs poll while clients are \
                             subscribed), or \"off\" to leave the idle states alone (default 0)"
                        ),
                    ));
                }
            };
            let buffer_ms = *raw.stream.client_buffer_ms.get_ref();
            if !(1..=1000).contains(&buffer_ms) {
                return Err(err(
                    Some(raw.stream.client_buffer_ms.span()),
                    format!("stream.client_buffer_ms = {buffer_ms}: use 1 to 1000 (default 20)"),
                ));
            }
            Some(StreamConfig {
                path: raw.stream.path.clone(),
                client_buffer_ms: buffer_ms,
                mode,
                group: raw.stream.group.clone(),
                max_clients: max,
                cpu_wakeup_latency_us,
            })
        } else {
            None
        };

        let store = if raw.store.enabled {
            let ms = *raw.store.window_ms.get_ref();
            let ns = ms.saturating_mul(1_000_000);
            let ok = ms > 0
                && ns.is_multiple_of(width_us * 1000)
                && (1000 % ms == 0 || ms.is_multiple_of(1000))
                && ms <= 3_600_000;
            if !ok {
                return Err(err(
                    Some(raw.store.window_ms.span()),
                    format!(
                        "store.window_ms = {ms}: use a multiple of the bin width that divides one \
                         second (e.g. 100, 250, 500) or whole seconds (1000, 5000, 60000)"
                    ),
                ));
            }
            let external = crate::forward::external_store(
                raw.store.external.as_ref(),
                raw.store.external_user.as_deref(),
                raw.store.external_password_file.as_deref(),
            )
            .map_err(|(span, m)| err(span, m))?;
            if *raw.store.retention_days.get_ref() > 36_500 {
                return Err(err(
                    Some(raw.store.retention_days.span()),
                    "store.retention_days: use 0 (no age limit) to 36500 (default 30)".into(),
                ));
            }
            Some(StoreConfig {
                data_dir: raw.store.data_dir.clone(),
                window_ns: ns,
                external,
                retention_days: *raw.store.retention_days.get_ref(),
                max_disk_mb: *raw.store.max_disk_mb.get_ref(),
            })
        } else {
            None
        };
        let forwards = crate::forward::validate_config(&raw.forwards, &err)?;
        if store.is_none() {
            if let Some(f) = raw.forwards.first() {
                return Err(err(
                    Some(crate::forward::raw_name_span(f)),
                    "[[forward]] sends the rollups of the local store, but [store] enabled = false: enable the store or remove the [[forward]] sections".into(),
                ));
            }
        }

        if raw.links.len() > MAX_LINKS {
            return Err(err(
                Some(raw.links[MAX_LINKS].interface.span()),
                format!(
                    "{} links configured; at most {MAX_LINKS} are supported",
                    raw.links.len()
                ),
            ));
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut links = Vec::with_capacity(raw.links.len());
        for l in &raw.links {
            let name = l.interface.get_ref();
            validate_ifname(name).map_err(|m| err(Some(l.interface.span()), m))?;
            if let Some(first) = seen.get(name.as_str()) {
                return Err(err(
                    Some(l.interface.span()),
                    format!(
                        "interface {name:?} is already used by the link on line {first}: each \
                         modem interface may appear in one [[link]] only"
                    ),
                ));
            }
            seen.insert(name, line_col(text, l.interface.span().start).0);
            let probe = raw.probe.for_link(&l.probe).map_err(|(s, m)| err(s, m))?;
            links.push(LinkConfig {
                interface: name.clone(),
                label: l.label.clone().unwrap_or_else(|| name.clone()),
                operator: l.operator.clone().unwrap_or_default(),
                modem_id: l.modem_id.clone().unwrap_or_default(),
                probe,
            });
        }

        let entries = *raw.tcp_rtt.table_entries.get_ref();
        if !(64..=MAX_TCP_TABLE_ENTRIES).contains(&entries) {
            return Err(err(
                Some(raw.tcp_rtt.table_entries.span()),
                format!(
                    "[tcp_rtt] table_entries = {entries}: must be 64..={MAX_TCP_TABLE_ENTRIES}"
                ),
            ));
        }
        let tcp_rtt = TcpRttConfig {
            enabled: raw.tcp_rtt.enabled,
            table_entries: entries,
        };

        Ok(Config {
            router_id,
            site,
            bin_width_ns: width_us * 1000,
            grace_ns: grace_us * 1000,
            publish_interval_ns: publish_us * 1000,
            realtime_priority,
            http_listen,
            http,
            stream,
            store,
            forwards,
            links,
            probe: raw.probe.validate().map_err(|(s, m)| err(s, m))?,
            tcp_rtt,
            source: None,
        })
    }
}

fn non_empty_tag(v: &Spanned<String>, key: &str) -> Result<String, String> {
    let s = v.get_ref().trim();
    if s.is_empty() {
        return Err(format!(
            "{key} is empty: it tags every metric that leaves the router, set it"
        ));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(format!("{key} contains control characters"));
    }
    Ok(s.to_string())
}

/// Linux interface names: 1–15 bytes, no '/', no whitespace, not "." or "..".
fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "interface {name:?} is not a valid Linux interface name (1 to 15 characters)"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "interface {name:?} is not a valid Linux interface name (no '/', ':' or spaces)"
        ));
    }
    Ok(())
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl fmt::Display for LinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.label, self.interface)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[router]
id = "rtr-1"
site = "depot"

[sampling]
bin_width_us = 100

[[link]]
interface = "wwan0"
label = "Verizon A"
operator = "Verizon"

[[link]]
interface = "wwan1"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    fn invalid_at(s: &str) -> (usize, String) {
        match parse(s) {
            Err(ConfigError::Invalid { line, message, .. }) => (line, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.bin_width_ns, 100_000);
        let st = c.stream.as_ref().expect("stream on by default");
        assert_eq!(st.path, PathBuf::from("/run/linkpulse/stream.sock"));
        assert_eq!(st.mode, 0o660);
        assert_eq!(c.grace_ns, 1_000_000);
        assert_eq!(c.http_listen, "127.0.0.1:8480".parse().unwrap());
        assert_eq!(c.links.len(), 2);
        assert_eq!(c.links[1].label, "wwan1");
        assert_eq!(c.links[0].operator, "Verizon");
    }

    #[test]
    fn tcp_rtt_defaults_and_table_size_bounds() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.tcp_rtt, TcpRttConfig::default());
        assert_eq!((c.tcp_rtt.enabled, c.tcp_rtt.table_entries), (true, 16384));
        let off = parse(&format!(
            "{GOOD}\n[tcp_rtt]\nenabled = false\ntable_entries = 64\n"
        ))
        .expect("valid");
        assert_eq!(
            off.tcp_rtt,
            TcpRttConfig {
                enabled: false,
                table_entries: 64
            }
        );
        let (_, msg) = invalid_at(&format!("{GOOD}\n[tcp_rtt]\ntable_entries = 10\n"));
        assert!(msg.contains("table_entries = 10"), "{msg}");
        let (_, msg) = invalid_at(&format!("{GOOD}\n[tcp_rtt]\ntable_size = 100\n"));
        assert!(msg.contains("table_size"), "{msg}");
    }

    #[test]
    fn stream_wakeup_latency_is_micros_or_off() {
        let c = parse(GOOD).expect("valid");
        let st = c.stream.as_ref().expect("stream");
        assert_eq!(st.cpu_wakeup_latency_us, Some(0));
        assert_eq!(st.client_buffer_ms, 20);
        let (_, msg) = invalid_at(&format!("{GOOD}\n[stream]\nclient_buffer_ms = 0\n"));
        assert!(msg.contains("client_buffer_ms = 0"), "{msg}");
        let with = |v: &str| format!("{GOOD}\n[stream]\ncpu_wakeup_latency_us = {v}\n");
        let c = parse(&with("10")).expect("valid");
        assert_eq!(c.stream.expect("stream").cpu_wakeup_latency_us, Some(10));
        let c = parse(&with("\"off\"")).expect("valid");
        assert_eq!(c.stream.expect("stream").cpu_wakeup_latency_us, None);
        for bad in ["-1", "\"none\"", "1.5", "100001"] {
            let (line, msg) = invalid_at(&with(bad));
            assert_eq!(line, 18, "{bad}");
            assert!(
                msg.contains("cpu_wakeup_latency_us") && msg.contains("\"off\""),
                "{msg}"
            );
        }
    }

    #[test]
    fn unknown_key_names_its_line() {
        let s = GOOD.replace("label = \"Verizon A\"", "lable = \"Verizon A\"");
        let (line, msg) = invalid_at(&s);
        assert_eq!(line, 11);
        assert!(msg.contains("lable"), "{msg}");
    }

    #[test]
    fn width_that_does_not_divide_a_second_is_refused() {
        let (line, msg) = invalid_at(&GOOD.replace("bin_width_us = 100", "bin_width_us = 300"));
        assert_eq!(line, 7);
        assert!(msg.contains("does not divide one second"), "{msg}");
        let (_, msg) = invalid_at(&GOOD.replace("bin_width_us = 100", "bin_width_us = 5"));
        assert!(msg.contains("between 10"), "{msg}");
    }

    #[test]
    fn two_links_on_one_interface_are_refused() {
        let s = GOOD.replace("interface = \"wwan1\"", "interface = \"wwan0\"");
        let (line, msg) = invalid_at(&s);
        assert_eq!(line, 15);
        assert!(msg.contains("line 10"), "{msg}");
    }

    #[test]
    fn bad_interface_name_and_listen_are_refused() {
        let (line, _) = invalid_at(&GOOD.replace("\"wwan1\"", "\"a-very-long-interface-name\""));
        assert_eq!(line, 15);
        let s = format!("{GOOD}\n[http]\nlisten = \"localhost\"\n");
        let (_, msg) = invalid_at(&s);
        assert!(msg.contains("http.listen"), "{msg}");
    }

    #[test]
    fn missing_router_section_is_named() {
        let (_, msg) = invalid_at("[[link]]\ninterface = \"wwan0\"\n");
        assert!(msg.contains("router"), "{msg}");
    }

    #[test]
    fn rollup_window_must_fit_the_grid() {
        let (_, msg) = invalid_at(&format!("{GOOD}\n[store]\nwindow_ms = 300\n"));
        assert!(msg.contains("store.window_ms = 300"), "{msg}");
        let c = parse(&format!("{GOOD}\n[store]\nwindow_ms = 5000\n")).expect("5 s");
        assert_eq!(c.store.expect("store").window_ns, 5_000_000_000);
        assert!(parse(&format!("{GOOD}\n[store]\nenabled = false\n"))
            .expect("off")
            .store
            .is_none());
    }

    #[test]
    fn forward_destinations_parse_and_errors_name_the_key() {
        let v1 = "[[forward]]\nname = \"central\"\nurl = \"http://10.0.0.1:8086\"\nuser = \"r\"\npassword_file = \"/p\"\n";
        let v2 = "[[forward]]\nname = \"cloud\"\nkind = \"influx_v2\"\nurl = \"https://c.example\"\norg = \"o\"\nbucket = \"b\"\ntoken_file = \"/t\"\nca_file = \"/ca.pem\"\npace_share = 0\n";
        let c = parse(&format!("{GOOD}{v1}{v2}")).expect("two destinations");
        assert_eq!(c.forwards.len(), 2);
        assert_eq!(c.forwards[0].pace_share, crate::forward::DEFAULT_PACE_SHARE);
        assert!(
            matches!(&c.forwards[0].kind, crate::forward::DestKind::V1 { database, user: Some(_) } if database == "linkpulse")
        );
        assert_eq!(c.forwards[1].pace_share, 0.0);
        // Same name twice.
        let (line, msg) = invalid_at(&format!("{GOOD}{v1}{v1}"));
        assert_eq!(line, 22);
        assert!(msg.contains("another [[forward]]"), "{msg}");
        // A v2 key in a v1 destination, a missing v2 key, a bad share, a bad kind.
        let (line, msg) = invalid_at(&format!("{GOOD}{v1}org = \"x\"\n"));
        assert_eq!(line, 21);
        assert!(msg.contains("influx_v2"), "{msg}");
        let (_, msg) = invalid_at(&format!("{GOOD}{}", v2.replace("bucket = \"b\"\n", "")));
        assert!(msg.contains("needs `bucket`"), "{msg}");
        let (line, msg) = invalid_at(&format!(
            "{GOOD}{}",
            v2.replace("pace_share = 0", "pace_share = 2.5")
        ));
        assert_eq!(line, 24);
        assert!(msg.contains("pace_share = 2.5"), "{msg}");
        let (_, msg) = invalid_at(&format!(
            "{GOOD}{}",
            v1.replace("url", "kind = \"influx\"\nurl")
        ));
        assert!(msg.contains("influx_v1"), "{msg}");
        let (_, msg) = invalid_at(&format!(
            "{GOOD}{}",
            v1.replace("\"/p\"", "\"/p\"\nbatch_points = 9000")
        ));
        assert!(msg.contains("batch_points = 9000"), "{msg}");
        let (_, msg) = invalid_at(&format!(
            "{GOOD}{}",
            v1.replace("\"/p\"", "\"/p\"\nmax_in_flight = 0")
        ));
        assert!(msg.contains("max_in_flight = 0: use 1 to 8"), "{msg}");
        // Forwarding needs the store.
        let (_, msg) = invalid_at(&format!("{GOOD}[store]\nenabled = false\n{v1}"));
        assert!(msg.contains("[store] enabled = false"), "{msg}");
    }

    #[test]
    fn external_store_and_retention() {
        let c = parse(&format!(
            "{GOOD}[store]\nexternal = \"127.0.0.1:3301\"\nretention_days = 7\nmax_disk_mb = 0\n"
        ))
        .expect("external");
        let st = c.store.expect("store");
        assert_eq!(st.retention_days, 7);
        assert_eq!(st.max_disk_mb, 0);
        assert_eq!(
            st.external.expect("external").address,
            linkpulse_sink::tarantool::Address::Tcp("127.0.0.1:3301".into())
        );
        let c = parse(&format!("{GOOD}[store]\nexternal = \"/run/t.sock\"\n")).expect("socket");
        assert!(c.store.expect("store").external.is_some());
        let (line, msg) = invalid_at(&format!("{GOOD}[store]\nexternal = \"nowhere\"\n"));
        assert_eq!(line, 17);
        assert!(msg.contains("host:port"), "{msg}");
        let (_, msg) = invalid_at(&format!(
            "{GOOD}[store]\nexternal = \"h:1\"\nexternal_user = \"u\"\n"
        ));
        assert!(msg.contains("go together"), "{msg}");
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let c = parse(include_str!("../../deploy/linkpulse.toml")).expect("deploy/linkpulse.toml");
        assert_eq!(c.links.len(), 2);
    }

    #[test]
    fn error_display_has_file_line_column() {
        let e = parse(&GOOD.replace("bin_width_us = 100", "bin_width_us = 300")).unwrap_err();
        assert!(e.to_string().starts_with("test.toml:7:16:"), "{e}");
    }
}
