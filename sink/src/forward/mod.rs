//! The forwarder: pushes every rollup of the local store, oldest first, to a central InfluxDB, one
//! [`Forwarder`] per destination.
//!
//! Each destination has a persisted cursor in the store (the last `seq` it acknowledged). One step
//! reads the cursor, reads up to `batch_points` rows after it (`lp_read_after`), encodes them as
//! line protocol ([`line`]), gzips the body and POSTs it:
//! - 2xx: the cursor moves to the batch's last `seq` (and only then);
//! - 400 (a malformed point or a field type conflict: "partial write", the other points are
//!   stored): the batch is *parked* (its `seq` range recorded in the parked log, counted) and the
//!   cursor moves on, so one bad point never blocks the backlog;
//! - 404 unknown database / bucket, 401/403, other 4xx, 5xx, timeouts, refused connections: an
//!   error that names the fix; the same batch is retried after an exponential backoff with
//!   jitter, or at once on [`Kicker::kick`] (the daemon kicks when a link comes up).
//!
//! Replays are idempotent: a point's identity (measurement, tags, timestamp) comes from the row's
//! identity, so re-sending a range overwrites the same points with the same values. The backlog
//! is the store itself (on disk); the forwarder holds at most `max_in_flight + 1` batches.
//!
//! During a backlog (full batches) up to `max_in_flight` (default 2) requests are on the wire at
//! once, each on a short-lived thread `fwd-<name>-tx`, and the batch after them is read, encoded
//! and gzip'ed meanwhile, so that the store, the encoder and InfluxDB work at the same time. The
//! answers are taken in cursor order: the cursor only ever ends a contiguous prefix of
//! acknowledged (or parked) batches, so a crash at any moment replays from there. A failure
//! (5xx, timeout, ...) drops the batches behind it, even those already acknowledged; they are
//! sent again after the backoff. Concurrent requests may land in any order; this is safe because
//! the store holds one row per identity and a row is only ever put again with the same values
//! (a retried put), so no two batches carry different values for one point.

mod gzip;
mod http;
pub mod line;
pub mod parked;

pub use line::{EncodeStats, Encoder, MEASUREMENT};
pub use parked::ParkedRange;

use crate::store::{Store, StoreError};
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// InfluxDB's documented optimum, and the bound the design sets.
pub const MAX_BATCH_POINTS: u32 = 5000;

/// Requests on the wire at once during a backlog, by default: two keep InfluxDB busy (it parses
/// one batch while the next is on its way) and the forwarder's own reads, encoding and gzip out
/// of its way, for one more batch in memory. More were not measured; on a 2-core VM InfluxDB's
/// CPU is the bound (`cargo xtask bench -- --only backfill`).
pub const DEFAULT_IN_FLIGHT: u32 = 2;

/// Upper bound of [`ForwardConfig::max_in_flight`]: each request holds a batch in memory.
pub const MAX_IN_FLIGHT: u32 = 8;

/// User and password of an InfluxDB 1.x destination.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password into logs.
        f.debug_struct("BasicAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The write API of a destination.
#[derive(Debug, Clone)]
pub enum Kind {
    /// InfluxDB 1.x (`/write?db=..`): what Debian ships (1.6.7). `auth` is `None` when the server
    /// runs without `auth-enabled`.
    V1 { db: String, auth: Option<BasicAuth> },
    /// InfluxDB 1.8+ / 2.x / 3.x (`/api/v2/write?org=..&bucket=..`); the token is read from a file
    /// (first line), again after each 401/403 so that a rotated token is picked up.
    V2 {
        org: String,
        bucket: String,
        token_file: PathBuf,
    },
}

/// TLS settings of an `https://` destination.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM file of the CA certificate(s) to trust instead of the bundled web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate. For lab set-ups only: the uplink is then open to interception.
    pub insecure_skip_verify: bool,
}

/// Settings of one destination.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// Names the cursor in the store and the parked log; `[A-Za-z0-9_.-]`, at most 64 bytes.
    pub name: String,
    /// Base URL of the server, e.g. `http://influx.example:8086`.
    pub url: String,
    pub kind: Kind,
    /// Tag `router` of every point (not empty).
    pub router: String,
    /// Tag `site` of every point (left out when empty).
    pub site: String,
    /// Points per request, 1..=5000.
    pub batch_points: u32,
    /// Requests on the wire at once during a backlog, 1..=[`MAX_IN_FLIGHT`]: the server
    /// parses one batch while the next arrives. The cursor still moves only over the oldest
    /// acknowledged batches, in order.
    pub max_in_flight: u32,
    /// Bound on one request (connect, send, answer).
    pub timeout: Duration,
    pub tls: TlsOptions,
    /// Pacing of the uplink use, in compressed bytes per second; `None` sends as fast as the
    /// server acknowledges.
    pub max_bytes_per_s: Option<u64>,
    /// Backoff after a failure: starts at `backoff_min`, doubles per failure up to `backoff_max`;
    /// each wait is drawn uniformly from [d/2, d] so that many routers do not retry in step.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Wait between looks at the store once everything is sent (a kick ends it early).
    pub idle_poll: Duration,
    /// Holds the parked log `parked-<name>.log`.
    pub state_dir: PathBuf,
}

impl ForwardConfig {
    pub fn new(
        name: impl Into<String>,
        url: impl Into<String>,
        kind: Kind,
        router: impl Into<String>,
        state_dir: impl Into<PathBuf>,
    ) -> ForwardConfig {
        ForwardConfig {
            name: name.into(),
            url: url.into(),
            kind,
            router: router.into(),
            site: String::new(),
            batch_points: MAX_BATCH_POINTS,
            max_in_flight: DEFAULT_IN_FLIGHT,
            timeout: Duration::from_secs(30),
            tls: TlsOptions::default(),
            max_bytes_per_s: None,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            idle_poll: Duration::from_millis(500),
            state_dir: state_dir.into(),
        }
    }

    /// Path of the parked log.
    pub fn parked_path(&self) -> PathBuf {
        self.state_dir.join(format!("parked-{}.log", self.name))
    }

    fn validate(&self) -> Result<(), ForwardError> {
        let bad = |reason: String| {
            Err(ForwardError::Config {
                name: self.name.clone(),
                reason,
            })
        };
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return bad(
                "the destination name must be 1 to 64 characters of A-Z a-z 0-9 _ . -".into(),
            );
        }
        if self.router.is_empty() {
            return bad("`router` (the router's id, tag of every point) must not be empty".into());
        }
        if self.batch_points == 0 || self.batch_points > MAX_BATCH_POINTS {
            return bad(format!(
                "batch_points = {} is outside 1..={MAX_BATCH_POINTS}",
                self.batch_points
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT {
            return bad(format!(
                "max_in_flight = {} is outside 1..={MAX_IN_FLIGHT}",
                self.max_in_flight
            ));
        }
        if self.backoff_min.is_zero() || self.backoff_max < self.backoff_min {
            return bad("backoff_min must be > 0 and ≤ backoff_max".into());
        }
        if self.max_bytes_per_s == Some(0) {
            return bad(
                "max_bytes_per_s = 0 would never send; leave it unset for no pacing".into(),
            );
        }
        match &self.kind {
            Kind::V1 { db, .. } if db.is_empty() => bad("`db` must not be empty".into()),
            Kind::V2 { org, bucket, .. } if org.is_empty() || bucket.is_empty() => {
                bad("`org` and `bucket` must not be empty".into())
            }
            _ => Ok(()),
        }
    }
}

/// What a failed step was about; errors are counted per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The local store failed (it is retried like the rest).
    Store,
    /// Refused, reset or unresolvable connection; TLS failure.
    Connect,
    Timeout,
    /// 404: unknown database / bucket, or no write endpoint at that URL.
    NotFound,
    /// 401 / 403.
    Auth,
    /// 5xx.
    Server,
    /// Other 4xx (e.g. 413, 429).
    Rejected,
    /// The parked log could not be written; the cursor did not move.
    ParkedLog,
    /// Settings that cannot work (not retried by [`Forwarder::new`], counted when seen later).
    Config,
}

/// Errors of the forwarder, each naming the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("destination `{name}`: {reason}; fix its configuration")]
    Config { name: String, reason: String },
    #[error("destination `{name}`: cannot read the token file {}: {source}; put the InfluxDB API token (one line) into it, readable by the daemon", path.display())]
    TokenFile {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("destination `{name}`: the token file {} is empty; put the InfluxDB API token (one line) into it", path.display())]
    TokenEmpty { name: String, path: PathBuf },
    #[error("destination `{name}`: TLS CA file {}: {reason}; give a PEM file with the CA certificate(s) of the server", path.display())]
    CaFile {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("destination `{name}`: the local store failed: {source}")]
    Store {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("destination `{name}`: cannot record parked batch {first_seq}..={last_seq} in {}: {source}; free space or fix the permissions of the state dir (the batch is retried meanwhile)", path.display())]
    ParkedLog {
        name: String,
        path: PathBuf,
        first_seq: u64,
        last_seq: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("destination `{name}`: cannot connect to {url}: {reason}; check the URL, the uplink and that InfluxDB runs there (retrying with backoff)")]
    Connect {
        name: String,
        url: String,
        reason: String,
    },
    #[error("destination `{name}`: no complete answer from {url} within {timeout:?}; the uplink or the server is slow (retrying with backoff; a longer `timeout` or smaller `batch_points` helps on a slow link)")]
    Timeout {
        name: String,
        url: String,
        timeout: Duration,
    },
    #[error("destination `{name}`: InfluxDB at {url} has no database `{db}` ({body}): create it (influx -execute 'CREATE DATABASE \"{db}\"') or fix `db` in the destination's config (retrying with backoff)")]
    DatabaseNotFound {
        name: String,
        url: String,
        db: String,
        body: String,
    },
    #[error("destination `{name}`: InfluxDB at {url} has no bucket `{bucket}` in org `{org}` ({body}): create it (influx bucket create -n {bucket} -o {org}) or fix `bucket`/`org` in the destination's config (retrying with backoff)")]
    BucketNotFound {
        name: String,
        url: String,
        org: String,
        bucket: String,
        body: String,
    },
    #[error("destination `{name}`: {url} answered 404 ({body}): there is no write endpoint at that URL; check the URL and the kind (v1 `/write` for InfluxDB 1.x, v2 `/api/v2/write` for 1.8+, 2.x and 3.x)")]
    EndpointNotFound {
        name: String,
        url: String,
        body: String,
    },
    #[error("destination `{name}`: InfluxDB at {url} refused the credentials (HTTP {status}: {body}); {hint} (retrying with backoff)")]
    Auth {
        name: String,
        url: String,
        status: u16,
        body: String,
        hint: &'static str,
    },
    #[error("destination `{name}`: InfluxDB at {url} failed (HTTP {status}: {body}); retrying with backoff")]
    Server {
        name: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("destination `{name}`: {url} refused the write (HTTP {status}: {body}); retrying with backoff")]
    Rejected {
        name: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("destination `{name}`: cannot start a forwarder thread: {source}")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

impl ForwardError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ForwardError::Config { .. }
            | ForwardError::TokenFile { .. }
            | ForwardError::TokenEmpty { .. }
            | ForwardError::CaFile { .. }
            | ForwardError::Thread { .. } => ErrorClass::Config,
            ForwardError::Store { .. } => ErrorClass::Store,
            ForwardError::ParkedLog { .. } => ErrorClass::ParkedLog,
            ForwardError::Connect { .. } => ErrorClass::Connect,
            ForwardError::Timeout { .. } => ErrorClass::Timeout,
            ForwardError::DatabaseNotFound { .. }
            | ForwardError::BucketNotFound { .. }
            | ForwardError::EndpointNotFound { .. } => ErrorClass::NotFound,
            ForwardError::Auth { .. } => ErrorClass::Auth,
            ForwardError::Server { .. } => ErrorClass::Server,
            ForwardError::Rejected { .. } => ErrorClass::Rejected,
        }
    }
}

/// Counters and gauges of one destination, for `/metrics`. Updated by the forwarder thread, read
/// from anywhere.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Points acknowledged with 2xx.
    pub points_sent: AtomicU64,
    pub batches_sent: AtomicU64,
    /// Line-protocol bytes of acknowledged batches, before and after gzip.
    pub bytes_raw: AtomicU64,
    pub bytes_gzip: AtomicU64,
    /// Batches refused with 400 and parked (and their points); counted from the parked log at
    /// start, so they survive restarts.
    pub parked_batches: AtomicU64,
    pub parked_points: AtomicU64,
    /// Integers clamped to i64::MAX, NaN/inf floats left out, rows outside InfluxDB's time range.
    pub values_clamped: AtomicU64,
    pub values_non_finite: AtomicU64,
    pub points_skipped: AtomicU64,
    /// Failed steps by class.
    pub errors_store: AtomicU64,
    pub errors_connect: AtomicU64,
    pub errors_timeout: AtomicU64,
    pub errors_not_found: AtomicU64,
    pub errors_auth: AtomicU64,
    pub errors_server: AtomicU64,
    pub errors_rejected: AtomicU64,
    pub errors_parked_log: AtomicU64,
    pub errors_config: AtomicU64,
    /// The destination's cursor (last acknowledged `seq`).
    pub cursor: AtomicU64,
    /// Rows not yet acknowledged, as a `seq` distance from the cursor to the newest row (an upper
    /// bound: `seq` has gaps where a row was put again).
    pub backlog: AtomicU64,
    /// Window start of the newest acknowledged point (ns); now minus this is the lag.
    pub last_window_ns: AtomicU64,
    /// True after a step that succeeded (sent, parked or idle), false after a failed one.
    pub up: std::sync::atomic::AtomicBool,
    /// Write requests on the wire, up to `max_in_flight` (for chaos tests: a kill then lands
    /// mid-write).
    pub in_flight: std::sync::atomic::AtomicU32,
}

impl ForwardStats {
    fn error(&self, class: ErrorClass) -> &AtomicU64 {
        match class {
            ErrorClass::Store => &self.errors_store,
            ErrorClass::Connect => &self.errors_connect,
            ErrorClass::Timeout => &self.errors_timeout,
            ErrorClass::NotFound => &self.errors_not_found,
            ErrorClass::Auth => &self.errors_auth,
            ErrorClass::Server => &self.errors_server,
            ErrorClass::Rejected => &self.errors_rejected,
            ErrorClass::ParkedLog => &self.errors_parked_log,
            ErrorClass::Config => &self.errors_config,
        }
    }

    /// Failed steps of one class so far.
    pub fn errors(&self, class: ErrorClass) -> u64 {
        self.error(class).load(Ordering::Relaxed)
    }

    /// All failed steps so far.
    pub fn errors_total(&self) -> u64 {
        [
            ErrorClass::Store,
            ErrorClass::Connect,
            ErrorClass::Timeout,
            ErrorClass::NotFound,
            ErrorClass::Auth,
            ErrorClass::Server,
            ErrorClass::Rejected,
            ErrorClass::ParkedLog,
            ErrorClass::Config,
        ]
        .iter()
        .map(|c| self.errors(*c))
        .sum()
    }
}

/// Line-protocol points to send besides the rollups (e.g. the daemon's lost-range events): the
/// forwarder sends them before its next batch and reports their delivery by generation, so the
/// producer can persist what was delivered. A replay must be idempotent (deterministic points).
#[derive(Default)]
pub struct Outbox {
    pending: Mutex<Option<(u64, Vec<u8>)>>,
    delivered: AtomicU64,
}

impl Outbox {
    /// Queues `lines` as generation `gen` (replacing what was queued and not yet sent).
    pub fn put(&self, gen: u64, lines: Vec<u8>) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some((gen, lines));
    }

    /// True while something is queued.
    pub fn is_pending(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Highest generation acknowledged (2xx, or 400: refused points are not retried).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    fn take(&self) -> Option<(u64, Vec<u8>)> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn put_back(&self, gen: u64, lines: Vec<u8>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            *p = Some((gen, lines));
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing after the cursor.
    Idle,
    /// A batch was acknowledged; the cursor is now `last_seq`.
    Sent {
        points: u64,
        first_seq: u64,
        last_seq: u64,
    },
    /// A batch was refused with 400 and parked; the cursor is now `last_seq`.
    Parked {
        points: u64,
        first_seq: u64,
        last_seq: u64,
    },
    /// A batch was answered (2xx or 400), but its cursor had been moved from outside (a resync)
    /// while it was on the wire: the cursor stays where that put it, and the batches behind this
    /// one are dropped, to be read again from there.
    Superseded {
        points: u64,
        first_seq: u64,
        last_seq: u64,
    },
}

#[derive(Default)]
struct SignalState {
    kicked: bool,
    stopped: bool,
}

#[derive(Default)]
struct Signal {
    state: Mutex<SignalState>,
    cv: Condvar,
}

impl Signal {
    fn lock(&self) -> std::sync::MutexGuard<'_, SignalState> {
        // The state is two flags: a panic elsewhere cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps up to `d`; returns early on a kick (if `kickable`) or a stop. True when kicked.
    fn wait(&self, d: Duration, kickable: bool) -> bool {
        let deadline = Instant::now() + d;
        let mut st = self.lock();
        loop {
            if st.stopped {
                return false;
            }
            if kickable && st.kicked {
                st.kicked = false;
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Wakes a forwarder (a link came up, new rows were stored) or stops it; cheap to clone.
#[derive(Clone)]
pub struct Kicker {
    signal: Arc<Signal>,
}

impl Kicker {
    /// Ends the current backoff or idle wait at once, and resets the backoff.
    pub fn kick(&self) {
        self.signal.lock().kicked = true;
        self.signal.cv.notify_all();
    }

    /// Asks the loop to end after the current request.
    pub fn stop(&self) {
        self.signal.lock().stopped = true;
        self.signal.cv.notify_all();
    }

    fn stopped(&self) -> bool {
        self.signal.lock().stopped
    }
}

/// Holds a forwarder still for retention: while a pause is requested the forwarder drops the
/// batch it read ahead, puts nothing new on the wire and settles what is there. Once nothing is
/// held any more, the cursor says exactly what the destination has, so rows after it that a trim
/// removes are exactly the ones it will never get (no read-ahead batch carries them out after
/// the trim, no answer moves the cursor over them).
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Pauses requested and not yet released.
    pausers: u32,
    /// The forwarder has batches on the wire or read ahead.
    holding: bool,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // A counter and a flag: a panic elsewhere cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before the forwarder reads new batches: false while paused; else it holds from now on.
    fn may_fill(&self) -> bool {
        let mut st = self.lock();
        if st.pausers > 0 {
            return false;
        }
        st.holding = true;
        true
    }

    fn set_holding(&self, holding: bool) {
        let mut st = self.lock();
        st.holding = holding;
        if !holding {
            self.cv.notify_all();
        }
    }
}

/// A pause of one forwarder (see [`ForwarderHandle::pause`]); dropping it lets the forwarder go
/// on at once.
pub struct Paused {
    gate: Arc<Gate>,
    kicker: Kicker,
}

impl Paused {
    fn request(gate: &Arc<Gate>, kicker: &Kicker) -> Paused {
        gate.lock().pausers += 1;
        Paused {
            gate: Arc::clone(gate),
            kicker: kicker.clone(),
        }
    }

    /// Waits until the forwarder holds no batch (its requests on the wire are answered and
    /// settled), at most until `deadline`. True when it holds none.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut st = self.gate.lock();
        while st.holding {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .gate
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        self.gate.lock().pausers -= 1;
        self.kicker.kick();
    }
}

/// The forwarder of one destination. Drive it with [`Forwarder::step`] or [`Forwarder::spawn`].
pub struct Forwarder {
    cfg: ForwardConfig,
    store: Arc<Store>,
    /// Shared with the threads that carry the requests on the wire.
    transport: Arc<http::Transport>,
    encoder: Encoder,
    /// The outbox's body. Batch buffers are reused across batches: the batch loop allocates
    /// nothing per point.
    buf: Buffers,
    /// Batches on the wire, oldest first (at most `cfg.max_in_flight`). The cursor moves over
    /// them only in this order, so it always ends a contiguous prefix of acknowledged batches.
    wire: VecDeque<Sending>,
    /// The batch after the newest one on the wire, read, encoded and gzip'ed while the requests
    /// are in flight (during a backlog only).
    ready: Option<(Prepared, Buffers)>,
    /// Buffers of settled batches, for the next ones (at most `max_in_flight + 1` ever exist).
    free: Vec<Buffers>,
    parked: parked::ParkedLog,
    stats: Arc<ForwardStats>,
    kicker: Kicker,
    rng: rand::rngs::SmallRng,
    backoff: Duration,
    /// Pacing: the next request may start at this instant.
    next_send: Instant,
    /// Pacing set from outside while running (bytes/s; 0 = `cfg.max_bytes_per_s`): the daemon
    /// sets it from the uplink capacity it measures.
    pace_override: Arc<AtomicU64>,
    outbox: Arc<Outbox>,
    gate: Arc<Gate>,
}

/// Buffers of one batch (line protocol, gzip'ed body, compressor), reused.
#[derive(Default)]
struct Buffers {
    gzip: gzip::Gzip,
    lines: Vec<u8>,
    body: Vec<u8>,
}

/// A batch read after the cursor `after`, encoded into its buffers' `lines` and, when it has
/// points, gzip'ed into their `body`.
#[derive(Debug, Clone, Copy)]
struct Prepared {
    after: u64,
    first_seq: u64,
    last_seq: u64,
    /// As many rows as asked for: more may follow (a backlog), so the next batch is read ahead.
    full: bool,
    enc: EncodeStats,
    newest_window: u64,
}

/// A batch handed to the wire, in cursor order.
struct Sending {
    p: Prepared,
    job: Job,
}

/// What settles a [`Sending`].
enum Job {
    /// A thread `fwd-<name>-tx` POSTs the body and hands the buffers back with the answer.
    Thread(std::thread::JoinHandle<(Buffers, Result<http::Reply, ureq::Error>)>),
    /// Settled without a request: nothing to send (every row skipped), or it could not be sent.
    Done(Buffers, Outcome),
}

enum Outcome {
    Reply(Result<http::Reply, ureq::Error>),
    /// Every row of the batch was skipped: the cursor moves over it without a request.
    Nothing,
    GzipFailed,
    /// No sender thread could be started (resource limits); the batch is sent again.
    NoThread(std::io::Error),
    /// The sender thread panicked (a bug); the batch is sent again.
    Lost,
}

impl Job {
    /// Waits for the answer.
    fn settle(self) -> (Buffers, Outcome) {
        match self {
            Job::Thread(h) => match h.join() {
                Ok((buf, reply)) => (buf, Outcome::Reply(reply)),
                Err(_) => (Buffers::default(), Outcome::Lost),
            },
            Job::Done(buf, outcome) => (buf, outcome),
        }
    }
}

/// Reads up to `limit` rows after `after` and encodes them into `buf`; `None` when there are
/// none.
fn prepare(
    store: &Store,
    encoder: &Encoder,
    limit: u32,
    after: u64,
    buf: &mut Buffers,
) -> Result<Option<Prepared>, StoreError> {
    let rows = store.read_after(after, limit)?;
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Ok(None);
    };
    buf.lines.clear();
    let mut enc = EncodeStats::default();
    for r in &rows {
        encoder.encode(r, &mut buf.lines, &mut enc);
    }
    buf.body.clear();
    if enc.points > 0 {
        // In-memory compression fails only through a bug in flate2; the empty body left then
        // is reported by the caller.
        if buf.gzip.compress(&buf.lines, &mut buf.body).is_err() {
            buf.body.clear();
        }
    }
    Ok(Some(Prepared {
        after,
        first_seq: first.seq,
        last_seq: last.seq,
        full: rows.len() >= limit as usize,
        enc,
        newest_window: rows.iter().map(|r| r.window_start_ns).max().unwrap_or(0),
    }))
}

/// Lua for the newest `seq` in the store (the primary key of `rollups`), for the backlog gauge.
const TOP_SEQ_LUA: &str =
    "local t = box.space.rollups.index.primary:max() if t == nil then return 0 end return t[1]";

impl Forwarder {
    /// Checks the settings, reads the token file (v2) and the parked log; does not contact the
    /// server (it may well be unreachable now).
    pub fn new(cfg: ForwardConfig, store: Arc<Store>) -> Result<Forwarder, ForwardError> {
        cfg.validate()?;
        let token = match &cfg.kind {
            Kind::V2 { token_file, .. } => Some(read_token(&cfg.name, token_file)?),
            Kind::V1 { .. } => None,
        };
        let transport = http::Transport::new(
            &cfg.name,
            &cfg.url,
            &cfg.kind,
            token.as_deref(),
            cfg.timeout,
            &cfg.tls,
            cfg.max_in_flight,
        )?;
        let parked_path = cfg.parked_path();
        let stats = Arc::new(ForwardStats::default());
        let known = parked::read(&parked_path).map_err(|source| ForwardError::ParkedLog {
            name: cfg.name.clone(),
            path: parked_path.clone(),
            first_seq: 0,
            last_seq: 0,
            source,
        })?;
        stats
            .parked_batches
            .store(known.len() as u64, Ordering::Relaxed);
        stats
            .parked_points
            .store(known.iter().map(|r| r.points).sum(), Ordering::Relaxed);
        Ok(Forwarder {
            encoder: Encoder::new(&cfg.router, &cfg.site),
            buf: Buffers::default(),
            wire: VecDeque::new(),
            ready: None,
            free: Vec::new(),
            parked: parked::ParkedLog::new(parked_path),
            stats,
            kicker: Kicker {
                signal: Arc::new(Signal::default()),
            },
            rng: rand::rngs::SmallRng::from_entropy(),
            backoff: cfg.backoff_min,
            next_send: Instant::now(),
            pace_override: Arc::new(AtomicU64::new(0)),
            outbox: Arc::new(Outbox::default()),
            gate: Arc::new(Gate::default()),
            transport: Arc::new(transport),
            store,
            cfg,
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn stats(&self) -> Arc<ForwardStats> {
        self.stats.clone()
    }

    pub fn kicker(&self) -> Kicker {
        self.kicker.clone()
    }

    /// A handle that sets the pacing while the forwarder runs: compressed bytes per second, 0 for
    /// the configured `max_bytes_per_s` (unpaced when that is unset). Read before each request.
    pub fn pacer(&self) -> Arc<AtomicU64> {
        self.pace_override.clone()
    }

    /// Extra points to send (see [`Outbox`]).
    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// The batches parked so far (from the parked log).
    pub fn parked(&self) -> Result<Vec<ParkedRange>, ForwardError> {
        parked::read(self.parked.path()).map_err(|source| ForwardError::ParkedLog {
            name: self.cfg.name.clone(),
            path: self.parked.path().to_owned(),
            first_seq: 0,
            last_seq: 0,
            source,
        })
    }

    fn store_err(&self, source: StoreError) -> ForwardError {
        ForwardError::Store {
            name: self.cfg.name.clone(),
            source,
        }
    }

    /// One batch: read after the cursor, send, and on 2xx or 400 move the cursor. During a
    /// backlog (full batches) up to `max_in_flight` requests are on the wire at once and the
    /// batch after them is prepared meanwhile; a step settles the oldest one, and those behind it
    /// stay on the wire for the next steps. A failure drops what is behind it: the cursor did not
    /// move over them and they are sent again (idempotent). No waiting besides the requests
    /// (pacing and backoff belong to [`Forwarder::run`]); errors are returned, not counted.
    pub fn step(&mut self) -> Result<Step, ForwardError> {
        let r = self.step_inner();
        self.gate
            .set_holding(!self.wire.is_empty() || self.ready.is_some());
        r
    }

    /// Requests a pause (see [`Paused`]): from the next step on the forwarder reads nothing new
    /// and settles what it holds; [`Paused::wait_until`] waits for that.
    pub fn pause(&self) -> Paused {
        Paused::request(&self.gate, &self.kicker)
    }

    fn step_inner(&mut self) -> Result<Step, ForwardError> {
        self.send_outbox()?;
        let cursor = self
            .store
            .get_cursor(&self.cfg.name)
            .map_err(|e| self.store_err(e))?
            .unwrap_or(0);
        self.stats.cursor.store(cursor, Ordering::Relaxed);
        // What is on the wire or ready follows the cursor this forwarder set; a cursor moved
        // from outside (a resync) starts over from there.
        let head = self
            .wire
            .front()
            .map(|s| s.p.after)
            .or_else(|| self.ready.as_ref().map(|(p, _)| p.after));
        if head.is_some_and(|after| after != cursor) {
            self.abandon();
        }
        if self.gate.may_fill() {
            self.fill(cursor)?;
            self.prepare_ahead();
        } else if let Some((_, buf)) = self.ready.take() {
            // Paused (retention): what was read ahead may be trimmed before it would be sent.
            self.free.push(buf);
        }
        let Some(head) = self.wire.pop_front() else {
            self.stats.backlog.store(0, Ordering::Relaxed);
            return Ok(Step::Idle);
        };
        let p = head.p;
        // The backlog gauge: rows after the cursor (the newest seq is looked up only in a
        // backlog; a short batch is all there is). A failed look-up only leaves the gauge low.
        let top = if p.full {
            self.top_seq().unwrap_or(p.last_seq).max(p.last_seq)
        } else {
            p.last_seq
        };
        self.stats.backlog.store(top - cursor, Ordering::Relaxed);
        let (buf, outcome) = head.job.settle();
        let settled = self.settle(p, &buf, outcome, top - p.last_seq);
        self.free.push(buf);
        if matches!(settled, Err(_) | Ok(Step::Superseded { .. })) {
            self.abandon();
        }
        settled
    }

    /// Puts batches on the wire, starting after `cursor`, up to `max_in_flight`: more than one
    /// only behind full batches (a backlog) and as pacing allows.
    fn fill(&mut self, cursor: u64) -> Result<(), ForwardError> {
        let limit = self.cfg.max_in_flight as usize;
        while self.wire.len() < limit {
            let after = match self.wire.back() {
                None => cursor,
                Some(s) if !s.p.full || Instant::now() < self.next_send => break,
                Some(s) => s.p.last_seq,
            };
            let (p, buf) = match self.ready.take() {
                Some((p, buf)) if p.after == after => (p, buf),
                stale => {
                    if let Some((_, b)) = stale {
                        self.free.push(b);
                    }
                    let mut buf = self.free.pop().unwrap_or_default();
                    let read = prepare(
                        &self.store,
                        &self.encoder,
                        self.cfg.batch_points,
                        after,
                        &mut buf,
                    );
                    match read {
                        Ok(Some(p)) => (p, buf),
                        Ok(None) => {
                            self.free.push(buf);
                            break;
                        }
                        Err(e) => {
                            self.free.push(buf);
                            if self.wire.is_empty() {
                                return Err(self.store_err(e));
                            }
                            // What is on the wire settles first; the next step reads again.
                            tracing::debug!(destination = %self.cfg.name, error = %e,
                                "cannot read the next batch yet");
                            break;
                        }
                    }
                }
            };
            self.launch(p, buf);
        }
        Ok(())
    }

    /// Hands a prepared batch to a sender thread (or settles it at once when there is nothing
    /// to send).
    fn launch(&mut self, p: Prepared, buf: Buffers) {
        let job = if p.enc.points == 0 {
            Job::Done(buf, Outcome::Nothing)
        } else if buf.body.is_empty() {
            Job::Done(buf, Outcome::GzipFailed)
        } else {
            self.next_send = Instant::now() + self.pace(buf.body.len());
            let (transport, stats) = (Arc::clone(&self.transport), Arc::clone(&self.stats));
            // Counted before the thread starts so that the gauge never misses a request.
            stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let spawned = std::thread::Builder::new()
                .name(format!("fwd-{}-tx", self.cfg.name))
                .spawn(move || {
                    let reply = transport.post_gzip(&buf.body);
                    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                    (buf, reply)
                });
            match spawned {
                Ok(h) => Job::Thread(h),
                Err(e) => {
                    // The batch is read again after the backoff.
                    self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                    Job::Done(Buffers::default(), Outcome::NoThread(e))
                }
            }
        };
        self.wire.push_back(Sending { p, job });
    }

    /// During a backlog, reads, encodes and gzips the batch after the newest one on the wire
    /// while the requests are in flight. A failure is left to the next step, which reads again.
    fn prepare_ahead(&mut self) {
        let after = match self.wire.back() {
            Some(s) if s.p.full && self.ready.is_none() => s.p.last_seq,
            _ => return,
        };
        let mut buf = self.free.pop().unwrap_or_default();
        match prepare(
            &self.store,
            &self.encoder,
            self.cfg.batch_points,
            after,
            &mut buf,
        ) {
            Ok(Some(p)) => self.ready = Some((p, buf)),
            Ok(None) => self.free.push(buf),
            Err(e) => {
                tracing::debug!(destination = %self.cfg.name, error = %e,
                    "cannot read ahead; reading at the next step");
                self.free.push(buf);
            }
        }
    }

    /// Waits for every request on the wire and forgets them and the batch read ahead: the
    /// cursor did not move over them, so they are sent again from the cursor (idempotent).
    fn abandon(&mut self) {
        while let Some(s) = self.wire.pop_front() {
            let (buf, _) = s.job.settle();
            self.free.push(buf);
        }
        if let Some((_, buf)) = self.ready.take() {
            self.free.push(buf);
        }
    }

    /// The answer to the oldest batch on the wire: 2xx (or nothing to send) moves the cursor
    /// over it, 400 parks it, anything else is an error (the cursor stays).
    fn settle(
        &mut self,
        p: Prepared,
        buf: &Buffers,
        outcome: Outcome,
        backlog_after: u64,
    ) -> Result<Step, ForwardError> {
        let points = p.enc.points;
        match outcome {
            Outcome::Nothing => {}
            Outcome::GzipFailed => {
                return Err(ForwardError::Config {
                    name: self.cfg.name.clone(),
                    reason: "gzip of the batch failed".into(),
                })
            }
            Outcome::Lost => {
                return Err(ForwardError::Config {
                    name: self.cfg.name.clone(),
                    reason: "the thread sending a batch failed (a bug); sending it again".into(),
                })
            }
            Outcome::NoThread(source) => {
                return Err(ForwardError::Thread {
                    name: self.cfg.name.clone(),
                    source,
                })
            }
            Outcome::Reply(Err(e)) => return Err(self.transport_err(e)),
            Outcome::Reply(Ok(reply)) => match reply.status {
                200..=299 => {}
                400 => {
                    self.count_encoding(&p.enc);
                    return self.park(&p, backlog_after, reply);
                }
                _ => return Err(self.status_err(reply)),
            },
        }
        // A batch of rows that all had to be skipped moves the cursor as well: nothing of it
        // can ever be written. Only from where this batch was read: a resync that moved the
        // cursor meanwhile must not be overtaken by this (older) answer.
        let moved = self
            .store
            .advance_cursor(&self.cfg.name, p.after, p.last_seq)
            .map_err(|e| self.store_err(e))?;
        self.count_encoding(&p.enc);
        let s = &self.stats;
        if moved {
            s.cursor.store(p.last_seq, Ordering::Relaxed);
            s.backlog.store(backlog_after, Ordering::Relaxed);
        }
        s.points_sent.fetch_add(points, Ordering::Relaxed);
        s.batches_sent.fetch_add(1, Ordering::Relaxed);
        s.bytes_raw
            .fetch_add(buf.lines.len() as u64, Ordering::Relaxed);
        s.bytes_gzip
            .fetch_add(buf.body.len() as u64, Ordering::Relaxed);
        s.last_window_ns
            .fetch_max(p.newest_window, Ordering::Relaxed);
        tracing::debug!(destination = %self.cfg.name, points, first_seq = p.first_seq,
            last_seq = p.last_seq, gzip_bytes = buf.body.len(), moved, "batch acknowledged");
        if !moved {
            return Ok(self.superseded(&p));
        }
        Ok(Step::Sent {
            points,
            first_seq: p.first_seq,
            last_seq: p.last_seq,
        })
    }

    /// Values the encoder changed or left out, counted once per batch the cursor moves over.
    fn count_encoding(&self, enc: &EncodeStats) {
        let s = &self.stats;
        s.values_clamped.fetch_add(enc.clamped, Ordering::Relaxed);
        s.values_non_finite
            .fetch_add(enc.non_finite, Ordering::Relaxed);
        s.points_skipped
            .fetch_add(enc.skipped_points, Ordering::Relaxed);
    }

    /// Sends the outbox's points, if any, before the rollups.
    fn send_outbox(&mut self) -> Result<(), ForwardError> {
        let Some((gen, lines)) = self.outbox.take() else {
            return Ok(());
        };
        if let Err(e) = self.buf.gzip.compress(&lines, &mut self.buf.body) {
            return Err(ForwardError::Config {
                name: self.cfg.name.clone(),
                reason: format!("gzip of the outbox failed: {e}"),
            });
        }
        let reply = match self.transport.post_gzip(&self.buf.body) {
            Ok(r) => r,
            Err(e) => {
                self.outbox.put_back(gen, lines);
                return Err(self.transport_err(e));
            }
        };
        match reply.status {
            200..=299 => {}
            400 => tracing::warn!(destination = %self.cfg.name, body = %reply.body,
                "InfluxDB refused the event points; not retried"),
            _ => {
                self.outbox.put_back(gen, lines);
                return Err(self.status_err(reply));
            }
        }
        self.outbox.delivered.fetch_max(gen, Ordering::Relaxed);
        Ok(())
    }

    fn top_seq(&self) -> Result<u64, ForwardError> {
        let (top,): (u64,) = self
            .store
            .client()
            .eval(TOP_SEQ_LUA, &[(); 0])
            .map_err(|source| {
                self.store_err(StoreError::Request {
                    request: "top seq",
                    source,
                })
            })?;
        Ok(top)
    }

    /// How long after this request's start the next may start.
    fn pace(&self, bytes: usize) -> Duration {
        let over = self.pace_override.load(Ordering::Relaxed);
        match (over > 0).then_some(over).or(self.cfg.max_bytes_per_s) {
            Some(rate) => Duration::from_secs_f64(bytes as f64 / rate as f64),
            None => Duration::ZERO,
        }
    }

    /// The answer to `p` came after its cursor was moved from outside.
    fn superseded(&self, p: &Prepared) -> Step {
        tracing::info!(destination = %self.cfg.name, first_seq = p.first_seq,
            last_seq = p.last_seq, "the cursor was moved from outside (resync) while this batch was on the wire; going on from there");
        Step::Superseded {
            points: p.enc.points,
            first_seq: p.first_seq,
            last_seq: p.last_seq,
        }
    }

    fn park(
        &mut self,
        p: &Prepared,
        backlog_after: u64,
        reply: http::Reply,
    ) -> Result<Step, ForwardError> {
        let (first_seq, last_seq, points) = (p.first_seq, p.last_seq, p.enc.points);
        let record = ParkedRange {
            first_seq,
            last_seq,
            points,
            status: reply.status,
            at_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            message: reply.body,
        };
        // Recorded (fsync'ed) before the cursor moves: a crash in between parks it twice, which
        // the log merges, but never loses the record.
        self.parked
            .append(&record)
            .map_err(|source| ForwardError::ParkedLog {
                name: self.cfg.name.clone(),
                path: self.parked.path().to_owned(),
                first_seq,
                last_seq,
                source,
            })?;
        let moved = self
            .store
            .advance_cursor(&self.cfg.name, p.after, last_seq)
            .map_err(|e| self.store_err(e))?;
        if moved {
            self.stats.cursor.store(last_seq, Ordering::Relaxed);
            self.stats.backlog.store(backlog_after, Ordering::Relaxed);
        }
        self.stats.parked_batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .parked_points
            .fetch_add(points, Ordering::Relaxed);
        tracing::warn!(destination = %self.cfg.name, first_seq, last_seq, points,
            status = record.status, message = %record.message,
            "InfluxDB refused a batch; parked it (see the parked log) and moved on");
        if !moved {
            return Ok(self.superseded(p));
        }
        Ok(Step::Parked {
            points,
            first_seq,
            last_seq,
        })
    }

    fn transport_err(&self, e: ureq::Error) -> ForwardError {
        let name = self.cfg.name.clone();
        let url = self.transport.url.clone();
        match e {
            ureq::Error::Timeout(_) => ForwardError::Timeout {
                name,
                url,
                timeout: self.cfg.timeout,
            },
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                ForwardError::Timeout {
                    name,
                    url,
                    timeout: self.cfg.timeout,
                }
            }
            other => ForwardError::Connect {
                name,
                url,
                reason: other.to_string(),
            },
        }
    }

    fn status_err(&self, reply: http::Reply) -> ForwardError {
        let name = self.cfg.name.clone();
        let url = self.transport.url.clone();
        let http::Reply { status, body } = reply;
        match status {
            404 => match &self.cfg.kind {
                Kind::V1 { db, .. } if body.contains("database not found") => {
                    ForwardError::DatabaseNotFound {
                        name,
                        url,
                        db: db.clone(),
                        body,
                    }
                }
                Kind::V2 { org, bucket, .. }
                    if body.contains("bucket") || body.contains("organization") =>
                {
                    ForwardError::BucketNotFound {
                        name,
                        url,
                        org: org.clone(),
                        bucket: bucket.clone(),
                        body,
                    }
                }
                _ => ForwardError::EndpointNotFound { name, url, body },
            },
            401 | 403 => ForwardError::Auth {
                name,
                url,
                status,
                body,
                hint: match self.cfg.kind {
                    Kind::V1 { auth: None, .. } => {
                        "the server has authentication enabled: set `user` and `password` of a user with WRITE on the database"
                    }
                    Kind::V1 { .. } => {
                        "check `user` and `password`, and that the user has WRITE on the database (GRANT WRITE ON \"db\" TO \"user\")"
                    }
                    Kind::V2 { .. } => {
                        "check the token in the token file: it must be valid and allowed to write to the bucket"
                    }
                },
            },
            500..=599 => ForwardError::Server {
                name,
                url,
                status,
                body,
            },
            _ => ForwardError::Rejected {
                name,
                url,
                status,
                body,
            },
        }
    }

    /// Re-reads a v2 token file (after 401/403: the token may have been rotated).
    fn reload_token(&mut self) {
        if let Kind::V2 { token_file, .. } = &self.cfg.kind {
            match read_token(&self.cfg.name, token_file) {
                // After a failure nothing is on the wire: no sender thread shares the transport.
                Ok(t) => match Arc::get_mut(&mut self.transport) {
                    Some(tr) => tr.set_token(&t),
                    None => tracing::warn!(destination = %self.cfg.name,
                        "the token file changed while requests were on the wire; using it next time"),
                },
                Err(e) => tracing::warn!(destination = %self.cfg.name, error = %e,
                    "cannot re-read the token file"),
            }
        }
    }

    /// Steps until stopped: paced while there is a backlog, polling when idle, backing off with
    /// jitter on failure (a kick ends a backoff at once). Logs the first failure of a streak and
    /// each change of its class as a warning, repeats at debug.
    pub fn run(mut self) {
        let name = self.cfg.name.clone();
        tracing::info!(destination = %name, url = %self.transport.url, "forwarder started");
        let mut failing: Option<ErrorClass> = None;
        while !self.kicker.stopped() {
            let wait = self.next_send.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                self.kicker.signal.wait(wait, false);
                continue;
            }
            match self.step() {
                Ok(step) => {
                    self.stats.up.store(true, Ordering::Relaxed);
                    if failing.take().is_some() {
                        tracing::info!(destination = %name, "forwarder recovered");
                    }
                    self.backoff = self.cfg.backoff_min;
                    if step == Step::Idle {
                        self.kicker.signal.wait(self.cfg.idle_poll, true);
                    }
                }
                Err(e) => {
                    let class = e.class();
                    self.stats.up.store(false, Ordering::Relaxed);
                    self.stats.error(class).fetch_add(1, Ordering::Relaxed);
                    let d = self.backoff;
                    let pause = d / 2 + d.mul_f64(self.rng.gen::<f64>() / 2.0);
                    if failing != Some(class) {
                        tracing::warn!(destination = %name, error = %e, class = ?class,
                            retry_in_ms = pause.as_millis() as u64, "forwarding failed");
                    } else {
                        tracing::debug!(destination = %name, error = %e,
                            retry_in_ms = pause.as_millis() as u64, "forwarding still failing");
                    }
                    failing = Some(class);
                    if class == ErrorClass::Auth {
                        self.reload_token();
                    }
                    self.backoff = (d * 2).min(self.cfg.backoff_max);
                    if self.kicker.signal.wait(pause, true) {
                        tracing::debug!(destination = %name, "kicked: retrying now");
                        self.backoff = self.cfg.backoff_min;
                    }
                }
            }
        }
        tracing::info!(destination = %name, "forwarder stopped");
    }

    /// Runs [`Forwarder::run`] on a thread of its own.
    pub fn spawn(self) -> Result<ForwarderHandle, ForwardError> {
        let kicker = self.kicker();
        let stats = self.stats();
        let gate = Arc::clone(&self.gate);
        let name = self.cfg.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fwd-{name}"))
            .spawn(move || self.run())
            .map_err(|source| ForwardError::Thread { name, source })?;
        Ok(ForwarderHandle {
            kicker,
            stats,
            gate,
            thread: Some(thread),
        })
    }
}

impl Drop for Forwarder {
    /// No request outlives its forwarder.
    fn drop(&mut self) {
        self.abandon();
    }
}

fn read_token(name: &str, path: &std::path::Path) -> Result<String, ForwardError> {
    let text = std::fs::read_to_string(path).map_err(|source| ForwardError::TokenFile {
        name: name.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(ForwardError::TokenEmpty {
            name: name.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// A forwarder running on its thread; dropping it stops it (after the request in flight).
pub struct ForwarderHandle {
    kicker: Kicker,
    stats: Arc<ForwardStats>,
    gate: Arc<Gate>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ForwarderHandle {
    pub fn kick(&self) {
        self.kicker.kick();
    }

    pub fn kicker(&self) -> Kicker {
        self.kicker.clone()
    }

    pub fn stats(&self) -> &Arc<ForwardStats> {
        &self.stats
    }

    /// Requests a pause, for retention (see [`Paused`] and [`Forwarder::pause`]); the
    /// forwarder goes on when it is dropped.
    pub fn pause(&self) -> Paused {
        Paused::request(&self.gate, &self.kicker)
    }

    /// Stops the loop and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.kicker.stop();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("forwarder thread panicked");
            }
        }
    }
}

impl Drop for ForwarderHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
