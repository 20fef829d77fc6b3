//! Store-and-forward in the daemon: the `lp-forward` thread starts one forwarder
//! (`linkpulse_sink::forward`) per `[[forward]]` destination once the local store is ready,
//! kicks them when a modem link is attached, paces them to a share of the uplink the daemon
//! measures, applies retention (age and disk quota) and records the ranges retention removed
//! before some destination had them. Its metrics are written by [`write_metrics`].
mod config;
mod retention;
pub mod tools;

pub(crate) use config::{validate as validate_raw, RawForward};
pub use config::{DestKind, ForwardDest, DEFAULT_PACE_SHARE};
pub use retention::{LostRange, LOST_LOG};

use std::{
    fmt::Write as _,
    ops::Range,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use linkpulse_common::MAX_LINKS;
use linkpulse_sink::{
    forward::{
        BasicAuth, ForwardConfig, ForwardStats, Forwarder, ForwarderHandle, Kind, Outbox,
        TlsOptions,
    },
    store::Store,
    tarantool::{Address, ClientConfig, Credentials},
};
use toml::Spanned;

use crate::{config::StoreConfig, shared::Shared};

/// `[store] external`: an instance someone else runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalStore {
    pub address: Address,
    /// User and the file with its password (first line); guest when `None`.
    pub user: Option<(String, PathBuf)>,
}

impl ExternalStore {
    /// The client settings (reads the password file).
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let mut c = ClientConfig::new(self.address.clone());
        if let Some((user, file)) = &self.user {
            c.credentials = Some(Credentials {
                user: user.clone(),
                password: read_secret(file)?,
            });
        }
        Ok(c)
    }
}

/// First line of a secret file, trimmed; errors name the file and the fix.
pub fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e}; put the secret (one line) into it, readable by the daemon",
            path.display()
        )
    })?;
    let s = text.lines().next().unwrap_or("").trim();
    if s.is_empty() {
        return Err(format!(
            "{} is empty; put the secret (one line) into it",
            path.display()
        ));
    }
    Ok(s.to_string())
}

/// Parses `[store] external` ("host:port" or an absolute socket path).
pub(crate) fn external_store(
    external: Option<&Spanned<String>>,
    user: Option<&str>,
    password_file: Option<&Path>,
) -> Result<Option<ExternalStore>, (Option<Range<usize>>, String)> {
    let Some(e) = external else {
        return Ok(None);
    };
    let v = e.get_ref().trim();
    let address = if v.starts_with('/') {
        Address::Unix(PathBuf::from(v))
    } else {
        match v.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Address::Tcp(v.to_string())
            }
            _ => {
                return Err((
                    Some(e.span()),
                    format!("store.external = {v:?}: give \"host:port\" (e.g. \"127.0.0.1:3301\") or the absolute path of the instance's Unix socket"),
                ))
            }
        }
    };
    let user = match (user, password_file) {
        (None, None) => None,
        (Some(u), Some(p)) if !u.is_empty() => Some((u.to_string(), p.to_path_buf())),
        _ => {
            return Err((
                Some(e.span()),
                "store.external_user and store.external_password_file go together: set both (or neither, for guest)".into(),
            ))
        }
    };
    Ok(Some(ExternalStore { address, user }))
}

/// Validates `[[forward]]` with the config's error builder.
pub(crate) fn validate_config<E>(
    raw: &[RawForward],
    err: &impl Fn(Option<Range<usize>>, String) -> E,
) -> Result<Vec<ForwardDest>, E> {
    validate_raw(raw, err)
}

pub(crate) fn raw_name_span(f: &RawForward) -> Range<usize> {
    f.name_span()
}

/// One running destination as `/metrics` sees it.
pub struct DestState {
    pub name: String,
    pub stats: Arc<ForwardStats>,
    /// Age in seconds of the oldest row the destination has not acknowledged (0 when none).
    pub backlog_age_s: AtomicU64,
}

/// Forwarding and retention state shared with `/metrics` (in `Shared`).
#[derive(Default)]
pub struct ForwardState {
    pub dests: RwLock<Vec<Arc<DestState>>>,
    /// Rows in the store (vinyl's count, refreshed every few seconds).
    pub store_rows: AtomicU64,
    /// Rows retention removed before some destination had them, and in how many ranges
    /// (per destination and link); from the persistent lost-range log.
    pub lost_rows: AtomicU64,
    pub lost_ranges: AtomicU64,
    /// Rows removed by retention (age or quota).
    pub trimmed_rows: AtomicU64,
}

impl ForwardState {
    fn dests(&self) -> Vec<Arc<DestState>> {
        self.dests.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Lowest uplink capacity assumed for pacing (bits/s): a link that carries nothing yet still
/// gets a trickle of backfill.
const MIN_CAPACITY_BPS: f64 = 256_000.0;
/// The capacity estimate decays by this factor per second from its last peak.
const CAPACITY_DECAY: f64 = 0.99;

/// Builds the sink's settings of one destination (reads the password file).
pub fn forward_config(
    d: &ForwardDest,
    router: &str,
    site: &str,
    state_dir: &Path,
) -> Result<ForwardConfig, String> {
    let kind = match &d.kind {
        DestKind::V1 { database, user } => Kind::V1 {
            db: database.clone(),
            auth: match user {
                Some((u, file)) => Some(BasicAuth {
                    user: u.clone(),
                    password: read_secret(file)
                        .map_err(|e| format!("destination `{}`: password_file {e}", d.name))?,
                }),
                None => None,
            },
        },
        DestKind::V2 {
            org,
            bucket,
            token_file,
        } => Kind::V2 {
            org: org.clone(),
            bucket: bucket.clone(),
            token_file: token_file.clone(),
        },
    };
    let mut c = ForwardConfig::new(&d.name, &d.url, kind, router, state_dir);
    c.site = site.to_string();
    c.batch_points = d.batch_points;
    c.max_in_flight = d.max_in_flight;
    c.timeout = d.timeout;
    c.backoff_max = d.retry_max.max(c.backoff_min);
    c.tls = TlsOptions {
        ca_file: d.ca_file.clone(),
        insecure_skip_verify: d.insecure_skip_verify,
    };
    Ok(c)
}

struct Running {
    dest: ForwardDest,
    handle: ForwarderHandle,
    pacer: Arc<AtomicU64>,
    outbox: Arc<Outbox>,
    state: Arc<DestState>,
}

/// The `lp-forward` thread: until `stop`, waits for the store, runs the destinations, kicks,
/// paces, measures backlogs and applies retention.
pub fn run(
    store_cfg: StoreConfig,
    dests: Vec<ForwardDest>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    let fs = &shared.forward;
    let mut lost = retention::LostLog::open(&store_cfg.data_dir);
    if let Some(l) = &lost {
        fs.lost_rows.store(l.rows, Ordering::Relaxed);
        fs.lost_ranges.store(l.ranges, Ordering::Relaxed);
    }
    let mut running: Vec<Running> = Vec::new();
    let mut failed: Vec<(ForwardDest, Instant)> = Vec::new();
    let mut store: Option<Arc<Store>> = None;
    let mut attached = [0u64; MAX_LINKS];
    let mut capacity_bps = MIN_CAPACITY_BPS;
    let (mut last_second, mut last_slow) = (Instant::now(), None::<Instant>);
    let mut next_retention = Instant::now() + Duration::from_secs(5);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if store.is_none() {
            store = shared.store_handle();
            if let Some(s) = &store {
                for d in &dests {
                    failed.push((d.clone(), Instant::now()));
                }
                tracing::info!(destinations = dests.len(), "store ready: forwarding starts");
                let _ = s;
            }
        }
        let Some(s) = store.clone() else { continue };
        // Start (or retry starting) destinations whose settings could not be used yet
        // (e.g. a token file not provisioned): every 30 s.
        let now = Instant::now();
        let mut i = 0;
        while i < failed.len() {
            if failed[i].1 > now {
                i += 1;
                continue;
            }
            let d = failed[i].0.clone();
            match start_dest(&d, &shared, &store_cfg, &s) {
                Ok(r) => {
                    fs.dests
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Arc::clone(&r.state));
                    running.push(r);
                    failed.swap_remove(i);
                }
                Err(e) => {
                    tracing::error!(destination = %d.name, error = %e, "cannot start forwarding to this destination; retrying in 30 s");
                    shared.event("forward_error", None, e);
                    failed[i].1 = now + Duration::from_secs(30);
                    i += 1;
                }
            }
        }
        // A modem link attached (or re-attached): the uplink may be back, retry at once.
        let mut now_attached = [0u64; MAX_LINKS];
        shared.load_attached_since(&mut now_attached);
        let up = now_attached
            .iter()
            .zip(attached.iter())
            .any(|(n, o)| *n != 0 && n != o);
        attached = now_attached;
        if up {
            for r in &running {
                r.handle.kick();
            }
        }
        if last_second.elapsed() >= Duration::from_secs(1) {
            last_second = Instant::now();
            let tx_bps: u64 = shared
                .links()
                .iter()
                .filter(|l| l.state == crate::shared::LinkState::Attached)
                .filter_map(|l| l.last_second.map(|s| s.up.bits_per_s))
                .sum();
            capacity_bps = (capacity_bps * CAPACITY_DECAY)
                .max(tx_bps as f64)
                .max(MIN_CAPACITY_BPS);
            for r in &running {
                let pace = if r.dest.pace_share > 0.0 {
                    ((capacity_bps * r.dest.pace_share / 8.0) as u64).max(1)
                } else {
                    0
                };
                r.pacer.store(pace, Ordering::Relaxed);
            }
        }
        if last_slow.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            last_slow = Some(Instant::now());
            if let Ok(n) = retention::row_count(&s) {
                fs.store_rows.store(n, Ordering::Relaxed);
            }
            for r in &running {
                send_lost(&s, r, &shared, &store_cfg.data_dir);
            }
            // The forwarder updates its backlog per attempt; while it backs off (outage) the
            // gauges are refreshed here.
            for r in &running {
                if let Ok((rows, age)) = retention::backlog(&s, &r.dest.name) {
                    r.state.stats.backlog.store(rows, Ordering::Relaxed);
                    r.state.backlog_age_s.store(age, Ordering::Relaxed);
                }
            }
        }
        if Instant::now() >= next_retention {
            next_retention = Instant::now() + Duration::from_secs(60);
            let before = retention::cutoff(&s, &store_cfg);
            if before > 0 {
                // The forwarders settle what they hold first (each within its request timeout),
                // so that no batch read before the trim is sent after it: a row either reaches
                // a destination or is recorded lost for it, never both.
                let pauses: Vec<_> = running.iter().map(|r| r.handle.pause()).collect();
                let bound = running
                    .iter()
                    .map(|r| r.dest.timeout)
                    .max()
                    .unwrap_or_default();
                let deadline = Instant::now() + bound + Duration::from_secs(5);
                if pauses.iter().all(|p| p.wait_until(deadline)) {
                    let names: Vec<String> = dests.iter().map(|d| d.name.clone()).collect();
                    if let Err(e) = retention::trim(&s, before, &names, &shared, lost.as_mut()) {
                        tracing::warn!(error = %e, "retention pass failed; retrying at the next one");
                    }
                } else {
                    tracing::warn!(
                        "retention postponed: a destination did not settle its requests in time"
                    );
                    next_retention = Instant::now() + Duration::from_secs(5);
                }
            }
        }
    }
    // The last rollups reach the store after the stop (lp-persist flushes its queue, then
    // withdraws the store handle): give destinations that are up a few seconds to take them, so
    // a clean stop leaves nothing behind that a running destination could have had.
    if let Some(s) = &store {
        let t = Instant::now();
        while shared.store_handle().is_some() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let t = Instant::now();
        for r in &running {
            r.handle.kick();
        }
        // Not only destinations marked up: one that just failed a request (e.g. restarted
        // under us) is kicked and gets the same chance; a destination that is really down
        // costs the stop these 5 s at most.
        while t.elapsed() < DRAIN_ON_STOP {
            let pending = running.iter().any(|r| {
                s.get_cursor(&r.dest.name)
                    .and_then(|c| s.read_after(c.unwrap_or(0), 1))
                    .is_ok_and(|rows| !rows.is_empty())
            });
            if !pending {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Stop every forwarder (each finishes its request in flight) before the store goes.
    for r in running {
        r.handle.stop();
    }
}

/// How long a stop waits for destinations that are up to take the last rollups.
const DRAIN_ON_STOP: Duration = Duration::from_secs(5);

fn start_dest(
    d: &ForwardDest,
    shared: &Shared,
    sc: &StoreConfig,
    store: &Arc<Store>,
) -> Result<Running, String> {
    let cfg = forward_config(d, &shared.router_id, &shared.site, &sc.data_dir)?;
    let fwd = Forwarder::new(cfg, Arc::clone(store)).map_err(|e| e.to_string())?;
    let pacer = fwd.pacer();
    let outbox = fwd.outbox();
    let handle = fwd.spawn().map_err(|e| e.to_string())?;
    let state = Arc::new(DestState {
        name: d.name.clone(),
        stats: Arc::clone(handle.stats()),
        backlog_age_s: AtomicU64::new(0),
    });
    Ok(Running {
        dest: d.clone(),
        handle,
        pacer,
        outbox,
        state,
    })
}

/// Measurement of the lost-range event points.
pub const LOST_MEASUREMENT: &str = "linkpulse_lost";

/// Cursor name (in the store's cursors) of how many of a destination's lost ranges it has.
fn lost_cursor(dest: &str) -> String {
    format!("{dest}#lost")
}

/// Hands the lost ranges a destination has not had yet to its forwarder (one point per range:
/// measurement `linkpulse_lost`, tags destination, link, router, site, timestamp the first lost
/// window, fields from_ns, to_ns, rows, recorded_unix_s), and records what it acknowledged.
fn send_lost(s: &Store, r: &Running, shared: &Shared, dir: &Path) {
    let cursor = lost_cursor(&r.dest.name);
    let Ok(sent) = s.get_cursor(&cursor).map(|c| c.unwrap_or(0)) else {
        return;
    };
    let delivered = r.outbox.delivered();
    if delivered > sent {
        if let Err(e) = s.set_cursor(&cursor, delivered) {
            tracing::warn!(error = %e, "cannot record the delivered lost-range events");
        }
        return;
    }
    if r.outbox.is_pending() {
        return;
    }
    let Ok(all) = retention::read_lost(dir) else {
        return;
    };
    let mine: Vec<&LostRange> = all
        .iter()
        .filter(|l| l.destination == r.dest.name)
        .collect();
    if mine.len() as u64 <= sent {
        return;
    }
    let mut lines = Vec::new();
    for l in &mine[sent as usize..] {
        lines.extend_from_slice(LOST_MEASUREMENT.as_bytes());
        lines.extend_from_slice(b",destination=");
        linkpulse_sink::forward::line::escape_tag(&mut lines, &l.destination);
        let _ = std::io::Write::write_fmt(&mut lines, format_args!(",link={}", l.link_id));
        lines.extend_from_slice(b",router=");
        linkpulse_sink::forward::line::escape_tag(&mut lines, &shared.router_id);
        if !shared.site.is_empty() {
            lines.extend_from_slice(b",site=");
            linkpulse_sink::forward::line::escape_tag(&mut lines, &shared.site);
        }
        let _ = std::io::Write::write_fmt(
            &mut lines,
            format_args!(
                " from_ns={}i,to_ns={}i,rows={}i,recorded_unix_s={}i {}\n",
                l.from_ns.min(i64::MAX as u64),
                l.to_ns.min(i64::MAX as u64),
                l.rows.min(i64::MAX as u64),
                l.at_unix_s.min(i64::MAX as u64),
                l.from_ns
            ),
        );
    }
    r.outbox.put(mine.len() as u64, lines);
    r.handle.kick();
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The forwarding and retention part of `/metrics`.
pub fn write_metrics(o: &mut String, s: &Shared) {
    let fs = &s.forward;
    let dests = fs.dests();
    let mut family = |name: &str, kind: &str, help: &str, f: &dyn Fn(&DestState) -> u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for d in &dests {
            let _ = writeln!(o, "{name}{{destination=\"{}\"}} {}", esc(&d.name), f(d));
        }
    };
    family(
        "linkpulse_forward_backlog_rows",
        "gauge",
        "Rows of the local store the destination has not acknowledged (upper bound).",
        &|d| d.stats.backlog.load(Ordering::Relaxed),
    );
    family(
        "linkpulse_forward_backlog_age_seconds",
        "gauge",
        "Age of the oldest row the destination has not acknowledged (0 when caught up).",
        &|d| d.backlog_age_s.load(Ordering::Relaxed),
    );
    family(
        "linkpulse_forward_points_total",
        "counter",
        "Points the destination acknowledged (2xx).",
        &|d| d.stats.points_sent.load(Ordering::Relaxed),
    );
    family(
        "linkpulse_forward_parked_points_total",
        "counter",
        "Points the destination refused with 400 (parked in parked-<destination>.log, not retried).",
        &|d| d.stats.parked_points.load(Ordering::Relaxed),
    );
    family(
        "linkpulse_forward_up",
        "gauge",
        "1 while the destination's last attempt succeeded.",
        &|d| u64::from(d.stats.up.load(Ordering::Relaxed)),
    );
    family(
        "linkpulse_forward_in_flight",
        "gauge",
        "Write requests to the destination on the wire (up to its max_in_flight).",
        &|d| u64::from(d.stats.in_flight.load(Ordering::Relaxed)),
    );
    use linkpulse_sink::forward::ErrorClass as C;
    let _ = writeln!(o, "# HELP linkpulse_forward_errors_total Failed forwarding attempts by class (store, connect, timeout, not_found, auth, server, rejected, parked_log, config).\n# TYPE linkpulse_forward_errors_total counter");
    for d in &dests {
        for (class, label) in [
            (C::Store, "store"),
            (C::Connect, "connect"),
            (C::Timeout, "timeout"),
            (C::NotFound, "not_found"),
            (C::Auth, "auth"),
            (C::Server, "server"),
            (C::Rejected, "rejected"),
            (C::ParkedLog, "parked_log"),
            (C::Config, "config"),
        ] {
            let _ = writeln!(
                o,
                "linkpulse_forward_errors_total{{destination=\"{}\",class=\"{label}\"}} {}",
                esc(&d.name),
                d.stats.errors(class)
            );
        }
    }
    let _ = writeln!(o, "# HELP linkpulse_store_put_in_flight 1 while a batch of rollups is being written to the store.\n# TYPE linkpulse_store_put_in_flight gauge\nlinkpulse_store_put_in_flight {}", u8::from(s.store.put_in_flight.load(Ordering::Relaxed)));
    let _ = writeln!(o, "# HELP linkpulse_store_rows Rollups in the local store.\n# TYPE linkpulse_store_rows gauge\nlinkpulse_store_rows {}", fs.store_rows.load(Ordering::Relaxed));
    let _ = writeln!(o, "# HELP linkpulse_store_lost_rows_total Rollups retention removed before a destination had them (ranges in /api/v1/events and lost-ranges.log).\n# TYPE linkpulse_store_lost_rows_total counter\nlinkpulse_store_lost_rows_total {}", fs.lost_rows.load(Ordering::Relaxed));
    let _ = writeln!(o, "# HELP linkpulse_store_lost_ranges_total Lost ranges recorded (one per destination and link per trim).\n# TYPE linkpulse_store_lost_ranges_total counter\nlinkpulse_store_lost_ranges_total {}", fs.lost_ranges.load(Ordering::Relaxed));
    let _ = writeln!(o, "# HELP linkpulse_store_trimmed_rows_total Rollups removed by retention (age or disk quota).\n# TYPE linkpulse_store_trimmed_rows_total counter\nlinkpulse_store_trimmed_rows_total {}", fs.trimmed_rows.load(Ordering::Relaxed));
}
