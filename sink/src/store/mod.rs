//! The local store of rollups: a Tarantool 2.6 instance the daemon supervises in its data dir
//! (default, zero set-up) or an external one, reached through batch stored functions.
//!
//! Every call here is idempotent (puts are `replace` on the identity), so the store retries calls
//! that failed on transport errors for up to [`Store::set_retry_for`], which covers a restart of the
//! supervised instance.

mod schema;
mod supervisor;
mod tiers;

pub use schema::{lua_format, Rollup, FIELDS, FIELDS_V3, SCHEMA_VERSION};
pub use supervisor::TARANTOOL_PACKAGE_HINT;
pub use tiers::{TierRow, TIERS_NS, TIER_FIELDS};

use crate::tarantool::{self, Client, ClientConfig};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use supervisor::{Paths, Supervisor};

/// Settings of the supervised local instance.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Holds `init.lua`, the socket, the log, the client secret and the database (`db/`).
    pub data_dir: PathBuf,
    /// The `tarantool` executable (looked up in `PATH` when bare).
    pub tarantool_bin: PathBuf,
    /// memtx arena. Only `_linkpulse_meta`, `cursors` and Tarantool's system spaces live there
    /// (kilobytes); 32 MiB is the smallest arena 2.6 boots with. Pages are touched on use, so RSS
    /// stays far below it.
    pub memtx_memory_mib: u32,
    /// vinyl's in-memory level (L0): writes gather here before a dump to disk. 16 MiB holds
    /// ~60k rollups (about a minute of 16 links at 500 ms, plus headroom) between dumps.
    pub vinyl_memory_mib: u32,
    /// vinyl's page cache for reads (forwarder scans, exports).
    ///
    /// Measured on the dev machine with the defaults (32/16/8): the instance's RSS is 29 MiB idle
    /// and ~67 MiB after 8 h of 16 links (0.9M rollups); beyond that it grows by vinyl's page
    /// indexes and bloom filters of the history on disk (~0.19 MiB per hour of 16 links) and by
    /// what compactions leave the allocator: 0.65-0.9 MiB per hour in all (schema v3,
    /// `sink/tests/ram_flat.rs`).
    pub vinyl_cache_mib: u32,
    /// Bound on a start: recovery of a large xlog after kill -9 takes seconds.
    pub start_timeout: Duration,
    /// SIGTERM → SIGKILL delay on stop.
    pub stop_timeout: Duration,
    /// Restart backoff: doubles on each failed restart up to the max, reset after a healthy run.
    pub restart_backoff_min: Duration,
    pub restart_backoff_max: Duration,
    /// Bound on each request.
    pub request_timeout: Duration,
}

impl LocalConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> LocalConfig {
        LocalConfig {
            data_dir: data_dir.into(),
            tarantool_bin: PathBuf::from("tarantool"),
            memtx_memory_mib: 32,
            vinyl_memory_mib: 16,
            vinyl_cache_mib: 8,
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(10),
            restart_backoff_min: Duration::from_millis(200),
            restart_backoff_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Errors of the store, each naming the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("tarantool executable `{}` not found: install it with `{TARANTOOL_PACKAGE_HINT}`, or configure an external Tarantool instance", bin.display())]
    TarantoolMissing { bin: PathBuf },
    #[error("cannot start `{}`: {source}; check that it is an executable Tarantool 2.6", bin.display())]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store data dir {} is not usable: cannot {action}: {source}; make it a writable directory for the daemon's user or choose another data dir", path.display())]
    DataDir {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("store data dir is in use: {} is locked by another process; stop the other linkpulse or choose another data dir", path.display())]
    Locked { path: PathBuf },
    #[error("socket path {} is longer than the 107 bytes a Unix socket allows; choose a shorter data dir", path.display())]
    SocketPathTooLong { path: PathBuf },
    #[error("cannot read /dev/urandom for the client secret: {source}")]
    Random {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the supervisor thread: {source}")]
    Thread {
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the Tarantool supervisor thread ended before the instance was ready (see the log above)"
    )]
    SupervisorDied,
    #[error("tarantool exited while starting ({status}); its log {} ends with:\n{tail}", log.display())]
    StartFailed {
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("tarantool not ready within {timeout:?} (last: {last}); its log {} ends with:\n{tail}", log.display())]
    NotReady {
        timeout: Duration,
        last: String,
        log: PathBuf,
        tail: String,
    },
    #[error("another Tarantool (pid {pid}) uses this data dir (socket {}); stop it", socket.display())]
    Foreign { socket: PathBuf, pid: u32 },
    #[error("the store was stopped while starting")]
    Stopped,
    #[error("the store's schema is version {found}, newer than this build's {supported}: upgrade linkpulse (or point it at another data dir)")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("schema migration to version {version} failed: {source}")]
    Migration {
        version: u32,
        #[source]
        source: tarantool::Error,
    },
    #[error("store request {request} failed: {source}")]
    Request {
        request: &'static str,
        #[source]
        source: tarantool::Error,
    },
    #[error(transparent)]
    Client(#[from] tarantool::Error),
}

impl StoreError {
    /// True when the same (idempotent) call may succeed later: the instance was unreachable or
    /// restarting, or a transaction conflict.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Request { source, .. } | StoreError::Client(source) => {
                source.is_retryable()
            }
            _ => false,
        }
    }
}

/// Applies the migrations the instance lacks; returns the version it is at afterwards.
pub(crate) fn migrate(client: &Client) -> Result<u32, StoreError> {
    let (mut version,): (u32,) = client
        .eval(schema::BOOTSTRAP_LUA, &[(); 0])
        .map_err(|source| StoreError::Migration { version: 0, source })?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, lua) in schema::migrations()
        .iter()
        .enumerate()
        .skip(version as usize)
    {
        let to = i as u32 + 1;
        let step = || -> Result<(), tarantool::Error> {
            let _: (bool,) = client.eval(lua, &[(); 0])?;
            let _: (bool,) = client.eval(schema::SET_VERSION_LUA, &(to,))?;
            Ok(())
        };
        step().map_err(|source| StoreError::Migration {
            version: to,
            source,
        })?;
        tracing::info!(from = version, to, "store schema migrated");
        version = to;
    }
    // The builds after the migrations: the tiers of rows stored before v3, then the seq ranges
    // of the 10 s buckets stored before v5 (`migration_v5` in tiers.rs).
    build_in_chunks(
        client,
        "lp_tier_build",
        2,
        "aggregate tiers built from the rows stored before schema v3",
    )?;
    build_in_chunks(
        client,
        "lp_seq_build",
        5,
        "seq ranges of the 10 s buckets built from the rows stored before schema v5",
    )?;
    Ok(version)
}

/// Rows per `lp_tier_build` / `lp_seq_build` call: ~0.1 s of work, far below the request timeout.
const TIER_BUILD_CHUNK: u32 = 20_000;

/// Calls the stored function `func(chunk)` → (done, rows) until done: each call commits its
/// chunk with its progress, so a crash resumes where it stopped. A no-op once done.
fn build_in_chunks(
    client: &Client,
    func: &str,
    version: u32,
    what: &'static str,
) -> Result<(), StoreError> {
    let start = Instant::now();
    let mut rows = 0u64;
    loop {
        let (done, n): (bool, u64) = client
            .call(func, &(TIER_BUILD_CHUNK,))
            .map_err(|source| StoreError::Migration { version, source })?;
        rows += n;
        if done {
            break;
        }
    }
    if rows > 0 {
        tracing::info!(rows, secs = start.elapsed().as_secs_f64(), "store: {what}");
    }
    Ok(())
}

/// Result of a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutResult {
    pub rows: u64,
    /// The `seq` of the last row of the batch.
    pub last_seq: u64,
}

/// Result of a trim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Rows deleted by this trim.
    pub rows: u64,
    /// Every `seq` up to this one has been deleted by retention (over all trims so far).
    pub upto: u64,
}

/// The rollup store.
pub struct Store {
    client: Client,
    supervisor: Option<Supervisor>,
    // Held for the life of the store: one daemon per data dir.
    _lock: Option<File>,
    retry_for: Duration,
}

impl Store {
    /// Starts (and supervises) the local instance in `cfg.data_dir`, migrates its schema, and
    /// returns once a stored function answers.
    pub fn start_local(cfg: LocalConfig) -> Result<Store, StoreError> {
        let paths = Paths::new(&cfg.data_dir);
        let (lock, password) = supervisor::prepare(&cfg, &paths)?;
        let client_cfg = supervisor::client_config(&paths, password, cfg.request_timeout);
        let sup = Supervisor::start(cfg, paths, client_cfg.clone())?;
        let client = Client::connect(client_cfg)?;
        Ok(Store {
            client,
            supervisor: Some(sup),
            _lock: Some(lock),
            retry_for: Duration::from_secs(15),
        })
    }

    /// Opens the store of `cfg.data_dir` for a command-line tool: when a daemon holds the data
    /// dir, connects to its running instance (its socket, with the client secret of the data
    /// dir; the daemon keeps supervising it); otherwise starts the instance like
    /// [`Store::start_local`] (the caller's [`Store::stop`] stops it again). The bool is true
    /// when the instance belongs to a running daemon.
    pub fn open_for_tool(cfg: LocalConfig) -> Result<(Store, bool), StoreError> {
        match Store::start_local(cfg.clone()) {
            Err(StoreError::Locked { .. }) => {
                let paths = Paths::new(&cfg.data_dir);
                let password = std::fs::read_to_string(&paths.secret)
                    .map_err(|source| StoreError::DataDir {
                        path: paths.secret.clone(),
                        action: "read the client secret",
                        source,
                    })?
                    .trim()
                    .to_owned();
                let client_cfg = supervisor::client_config(&paths, password, cfg.request_timeout);
                let client = Client::connect(client_cfg)?;
                Ok((
                    Store {
                        client,
                        supervisor: None,
                        _lock: None,
                        retry_for: Duration::from_secs(15),
                    },
                    true,
                ))
            }
            other => other.map(|s| (s, false)),
        }
    }

    /// Uses an instance someone else runs: connects and applies the same migrations. The user needs
    /// the rights to create spaces and functions (e.g. the `super` role) for the first migration.
    pub fn connect_external(cfg: ClientConfig) -> Result<Store, StoreError> {
        let client = Client::connect(cfg)?;
        migrate(&client)?;
        Ok(Store {
            client,
            supervisor: None,
            _lock: None,
            retry_for: Duration::from_secs(15),
        })
    }

    /// How long calls keep retrying on transport errors (default 15 s).
    pub fn set_retry_for(&mut self, d: Duration) {
        self.retry_for = d;
    }

    /// The underlying client, for calls this module does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Pid of the supervised instance once it is ready (`None` for an external one, or while it is
    /// down or starting).
    pub fn supervised_pid(&self) -> Option<u32> {
        let pid = self.supervisor.as_ref()?.status.pid.load(Ordering::Relaxed);
        (pid != 0).then_some(pid)
    }

    /// How often a running supervised instance died and was restarted (failed restart attempts
    /// are logged, not counted).
    pub fn restarts(&self) -> u64 {
        self.supervisor
            .as_ref()
            .map_or(0, |s| s.status.restarts.load(Ordering::Relaxed))
    }

    fn retry<T>(
        &self,
        request: &'static str,
        f: impl Fn(&Client) -> Result<T, tarantool::Error>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            match f(&self.client) {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && start.elapsed() + pause < self.retry_for => {
                    tracing::debug!(request, error = %e, pause_ms = pause.as_millis() as u64,
                        "store call failed; retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(source) => return Err(StoreError::Request { request, source }),
            }
        }
    }

    /// Stores one batch in one transaction (one WAL write). Rows with an identity already stored
    /// replace it, so a re-sent batch leaves one row per identity. `seq` of the input is ignored.
    pub fn put_rollups(&self, batch: &[Rollup]) -> Result<PutResult, StoreError> {
        if batch.is_empty() {
            return Ok(PutResult {
                rows: 0,
                last_seq: 0,
            });
        }
        let (rows, last_seq): (u64, u64) =
            self.retry("lp_put_rollups", |c| c.call("lp_put_rollups", &(batch,)))?;
        Ok(PutResult { rows, last_seq })
    }

    /// Up to `limit` rows with `seq > after_seq`, in `seq` order (the forwarder's scan).
    pub fn read_after(&self, after_seq: u64, limit: u32) -> Result<Vec<Rollup>, StoreError> {
        let (rows,): (Vec<Rollup>,) = self.retry("lp_read_after", |c| {
            c.call("lp_read_after", &(after_seq, limit))
        })?;
        Ok(rows)
    }

    /// About `limit` windows of one link with `from_ns <= window_start_ns < to_ns`, ordered by
    /// window start then boot tag (two rows with one start: a clock step; both are kept). A page
    /// never ends inside one window start, so the caller pages on with `from_ns` = the last
    /// start + 1 and misses nothing. For the API's series and `export`.
    pub fn read_range(
        &self,
        link_id: u32,
        from_ns: u64,
        to_ns: u64,
        limit: u32,
    ) -> Result<Vec<Rollup>, StoreError> {
        let (rows,): (Vec<Rollup>,) = self.retry("lp_read_range", |c| {
            c.call("lp_read_range", &(link_id, from_ns, to_ns, limit))
        })?;
        Ok(rows)
    }

    /// About `limit` buckets of tier `tier_ns` (one of [`TIERS_NS`]) of one link with
    /// `from_ns <= start_ns < to_ns`, ordered by start then boot tag; pages like
    /// [`Store::read_range`] (never ends inside one start).
    pub fn read_tier(
        &self,
        tier_ns: u64,
        link_id: u32,
        from_ns: u64,
        to_ns: u64,
        limit: u32,
    ) -> Result<Vec<TierRow>, StoreError> {
        let (rows,): (Vec<TierRow>,) = self.retry("lp_read_tier", |c| {
            c.call("lp_read_tier", &(tier_ns, link_id, from_ns, to_ns, limit))
        })?;
        Ok(rows)
    }

    /// Retention of the tiers: deletes every bucket that ends at or before `before_ns` (a bucket
    /// straddling the cut stays whole). Returns the buckets deleted.
    pub fn trim_tiers(&self, before_ns: u64) -> Result<u64, StoreError> {
        const CHUNK: u64 = 10_000;
        let mut rows = 0;
        loop {
            let (n,): (u64,) = self.retry("lp_trim_tiers", |c| {
                c.call("lp_trim_tiers", &(before_ns, CHUNK))
            })?;
            rows += n;
            if n < CHUNK {
                return Ok(rows);
            }
        }
    }

    /// Persists `seq` as the last one `destination` acknowledged (fsync'ed before this returns).
    pub fn set_cursor(&self, destination: &str, seq: u64) -> Result<(), StoreError> {
        let _: (bool,) = self.retry("lp_set_cursor", |c| {
            c.call("lp_set_cursor", &(destination, seq))
        })?;
        Ok(())
    }

    /// Moves `destination`'s cursor from `from` to `to` only if it is still at `from` (a missing
    /// cursor is 0): an acknowledgement must never move a cursor that was set from outside (a
    /// resync) while its request was on the wire. True when the cursor is now `to` (also when a
    /// retried call had already moved it), false when it stood elsewhere and was left alone.
    /// Fsync'ed before this returns. An eval of a fixed chunk, like the other small look-ups of
    /// the forwarder, so no schema migration is needed; the get and the replace run without a
    /// yield in between, hence atomically.
    pub fn advance_cursor(
        &self,
        destination: &str,
        from: u64,
        to: u64,
    ) -> Result<bool, StoreError> {
        const ADVANCE_CURSOR_LUA: &str = "local dest, from, to = ... \
            local t = box.space.cursors:get(dest) local cur = t and t[2] or 0 \
            if cur == to then return true end \
            if cur ~= from then return false end \
            box.space.cursors:replace{dest, to} return true";
        let (moved,): (bool,) = self.retry("advance cursor", |c| {
            c.eval(ADVANCE_CURSOR_LUA, &(destination, from, to))
        })?;
        Ok(moved)
    }

    /// The cursor of `destination`, `None` if it never acknowledged anything.
    pub fn get_cursor(&self, destination: &str) -> Result<Option<u64>, StoreError> {
        let (seq,): (Option<u64>,) = self.retry("lp_get_cursor", |c| {
            c.call("lp_get_cursor", &(destination,))
        })?;
        Ok(seq)
    }

    /// Retention: deletes the oldest rows (in `seq` order) while their window starts before
    /// `before_ns`. It stops at the first row that is newer, so what is gone is always every
    /// `seq` up to [`Trimmed::upto`]: a destination whose cursor is below that lost the rows in
    /// between. (After a backward clock step, rows written before it keep newer rows behind them
    /// until they age out themselves.) Works in calls of at most 10,000 rows so that no single call
    /// holds the instance for long.
    pub fn trim(&self, before_ns: u64) -> Result<Trimmed, StoreError> {
        const CHUNK: u32 = 10_000;
        let mut rows = 0;
        loop {
            let (n, upto): (u64, u64) =
                self.retry("lp_trim", |c| c.call("lp_trim", &(before_ns, CHUNK)))?;
            rows += n;
            if n < u64::from(CHUNK) {
                return Ok(Trimmed { rows, upto });
            }
        }
    }

    /// The schema version the instance is at.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let (v,): (u32,) = self.retry("lp_schema_version", |c| {
            c.call("lp_schema_version", &[(); 0])
        })?;
        Ok(v)
    }

    /// Stops the supervised instance cleanly (SIGTERM, SIGKILL after `stop_timeout`). Dropping the
    /// store does the same.
    pub fn stop(mut self) {
        if let Some(mut s) = self.supervisor.take() {
            s.stop();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(mut s) = self.supervisor.take() {
            s.stop();
        }
    }
}
