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
    pub http_listen: SocketAddr,
    /// None when `[stream] enabled = false`.
    pub stream: Option<StreamConfig>,
    /// None when `[store] enabled = false`.
    pub store: Option<StoreConfig>,
    pub links: Vec<LinkConfig>,
    /// `[probe]`: loss timeout and link-health thresholds (per-link settings in `LinkConfig`).
    pub probe: crate::probe::ProbeConfig,
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
    #[serde(default)]
    probe: crate::probe::config::RawProbe,
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
}

impl Default for RawStream {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_stream_path(),
            mode: default_stream_mode(),
            group: None,
            max_clients: default_max_clients(),
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
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            enabled: true,
            data_dir: default_store_dir(),
            window_ms: default_window_ms(),
        }
    }
}

fn default_store_dir() -> PathBuf {
    PathBuf::from("/var/lib/linkpulse/store")
}
fn default_window_ms() -> Spanned<u64> {
    Spanned::new(0..0, 500)
}

/// The validated `[store]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub window_ns: u64,
}

/// The validated `[stream]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    pub path: PathBuf,
    pub mode: u32,
    pub group: Option<String>,
    pub max_clients: usize,
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
}

impl Default for RawSampling {
    fn default() -> Self {
        Self {
            bin_width_us: default_bin_width_us(),
            grace_us: default_grace_us(),
            publish_interval_us: default_publish_interval_us(),
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

/// `[http]`: API and metrics. Default `127.0.0.1:8480` (loopback only).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default = "default_listen")]
    listen: Spanned<String>,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
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
        let http_listen: SocketAddr = raw.http.listen.get_ref().parse().map_err(|e| {
            err(
                Some(raw.http.listen.span()),
                format!(
                    "http.listen = {:?} is not an address with a port ({e}): e.g. \"127.0.0.1:8480\"",
                    raw.http.listen.get_ref()
                ),
            )
        })?;

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
            Some(StreamConfig {
                path: raw.stream.path.clone(),
                mode,
                group: raw.stream.group.clone(),
                max_clients: max,
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
            Some(StoreConfig {
                data_dir: raw.store.data_dir.clone(),
                window_ns: ns,
            })
        } else {
            None
        };

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

        Ok(Config {
            router_id,
            site,
            bin_width_ns: width_us * 1000,
            grace_ns: grace_us * 1000,
            publish_interval_ns: publish_us * 1000,
            http_listen,
            stream,
            store,
            links,
            probe: raw.probe.validate().map_err(|(s, m)| err(s, m))?,
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
