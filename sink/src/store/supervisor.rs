//! The local Tarantool instance: its data dir, generated `init.lua`, child process, readiness,
//! restarts with backoff, and a clean stop.

use super::{migrate, LocalConfig, StoreError};
use crate::tarantool::{Address, Client, ClientConfig, Credentials};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The Debian package that provides the binary, for error messages.
pub const TARANTOOL_PACKAGE_HINT: &str =
    "apt-get install -y --no-install-recommends tarantool (or `cargo xtask setup`)";

/// The user the daemon logs in as; created with a random password by `init.lua`.
const USER: &str = "linkpulse";
/// The log is truncated at start when larger than this, so it cannot fill the disk over months.
const LOG_MAX_BYTES: u64 = 8 << 20;
/// A run this long resets the restart backoff: only a crash loop backs off further.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// How often the supervisor looks whether the child is still there.
const POLL: Duration = Duration::from_millis(100);
/// Allocator settings of the instance (see [`spawn`]); bytes.
const MALLOC_ENV: [(&str, &str); 3] = [
    ("MALLOC_MMAP_THRESHOLD_", "131072"),
    ("MALLOC_TRIM_THRESHOLD_", "131072"),
    ("MALLOC_ARENA_MAX", "1"),
];
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Files of one data dir.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    pub dir: PathBuf,
    pub init: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub secret: PathBuf,
    pub lock: PathBuf,
    pub pid_file: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            dir: dir.to_owned(),
            init: dir.join("init.lua"),
            socket: dir.join("tarantool.sock"),
            log: dir.join("tarantool.log"),
            secret: dir.join("client.secret"),
            lock: dir.join("linkpulse.lock"),
            pid_file: dir.join("tarantool.pid"),
        }
    }
}

fn dir_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::DataDir {
        path: path.to_owned(),
        action,
        source,
    }
}

/// Creates the data dir (0700), takes its lock, and writes the secret and `init.lua`.
/// Returns the lock (held for the life of the store) and the password.
pub(crate) fn prepare(cfg: &LocalConfig, paths: &Paths) -> Result<(File, String), StoreError> {
    fs::create_dir_all(paths.dir.join("db")).map_err(dir_err(&paths.dir, "create it"))?;
    fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o700))
        .map_err(dir_err(&paths.dir, "set its mode to 0700"))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&paths.lock)
        .map_err(dir_err(&paths.dir, "create a file in it"))?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return Err(StoreError::Locked {
            path: paths.lock.clone(),
        });
    }
    if paths.socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(StoreError::SocketPathTooLong {
            path: paths.socket.clone(),
        });
    }
    let password = secret(&paths.secret)?;
    let init = init_lua(cfg, paths, &password)?;
    write_private(&paths.init, init.as_bytes()).map_err(dir_err(&paths.dir, "write init.lua"))?;
    Ok((lock, password))
}

/// Reads the client password, or creates one (random, 0600) on the first start.
fn secret(path: &Path) -> Result<String, StoreError> {
    if let Ok(s) = fs::read_to_string(path) {
        let s = s.trim();
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(s.to_owned());
        }
        tracing::warn!(path = %path.display(), "client secret malformed; generating a new one");
    }
    let mut raw = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|source| StoreError::Random { source })?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let dir = path.parent().unwrap_or(Path::new("."));
    write_private(path, hex.as_bytes()).map_err(dir_err(dir, "write client.secret"))?;
    Ok(hex)
}

fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// A Lua string literal for any UTF-8 text.
fn lua_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\{:03}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn utf8(path: &Path) -> Result<&str, StoreError> {
    path.to_str().ok_or_else(|| StoreError::DataDir {
        path: path.to_owned(),
        action: "use it (the path is not UTF-8)",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

pub(crate) fn init_lua(
    cfg: &LocalConfig,
    paths: &Paths,
    password: &str,
) -> Result<String, StoreError> {
    let dir = lua_str(utf8(&paths.dir)?);
    let sock = lua_str(utf8(&paths.socket)?);
    let pw = lua_str(password);
    let mib = |m: u32| u64::from(m) << 20;
    Ok(format!(
        r#"-- Generated by linkpulse at every start of this instance: edits are lost.
box.cfg{{
    work_dir = {dir},
    wal_dir = 'db', memtx_dir = 'db', vinyl_dir = 'db',
    pid_file = 'tarantool.pid', -- locked: a second instance on this dir fails at once
    wal_mode = 'fsync',         -- the default 'write' does not fsync
    -- Memory bounds (see LocalConfig): the memtx arena holds only small spaces (meta, cursors);
    -- rollups are in vinyl, whose RAM is its in-memory level plus its page cache.
    memtx_memory = {memtx},
    vinyl_memory = {vinyl},
    vinyl_cache = {cache},
    vinyl_write_threads = 2,   -- the minimum (one dump, one compaction): fewer stacks and buffers
    checkpoint_count = 2,
    log_level = 5,
}}
-- Tarantool 2.6.0 reopens the last xlog after a restart without O_SYNC, so 'fsync' silently stops
-- syncing; one write and a snapshot make it open a new xlog with O_SYNC.
box.schema.space.create('_linkpulse_meta', {{engine = 'memtx', if_not_exists = true,
    format = {{{{'key', 'string'}}, {{'value', 'any'}}}}}})
box.space._linkpulse_meta:create_index('primary', {{parts = {{{{1, 'string'}}}}, if_not_exists = true}})
local boots = box.space._linkpulse_meta:get('boots')
box.space._linkpulse_meta:replace{{'boots', (boots and boots[2] or 0) + 1}}
box.schema.user.create('{USER}', {{password = {pw}, if_not_exists = true}})
box.schema.user.passwd('{USER}', {pw})
box.schema.user.grant('{USER}', 'super', nil, nil, {{if_not_exists = true}})
box.snapshot()
-- Last: listen binds at once, and no client may get in before the above is done.
box.cfg{{listen = {sock}}}
"#,
        memtx = mib(cfg.memtx_memory_mib),
        vinyl = mib(cfg.vinyl_memory_mib),
        cache = mib(cfg.vinyl_cache_mib),
    ))
}

/// Counters shared with the store.
#[derive(Default)]
pub(crate) struct Status {
    pub pid: AtomicU32,
    pub restarts: AtomicU64,
}

pub(crate) struct Supervisor {
    stop_tx: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    pub status: Arc<Status>,
}

impl Supervisor {
    /// Starts the instance and returns once it is ready (or failed to get there).
    pub fn start(
        cfg: LocalConfig,
        paths: Paths,
        client_cfg: ClientConfig,
    ) -> Result<Supervisor, StoreError> {
        let status = Arc::new(Status::default());
        let (stop_tx, stop_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let status = status.clone();
            // The child is spawned from this thread: PR_SET_PDEATHSIG fires when the *thread* that
            // forked ends, and this thread lives exactly as long as the supervision.
            std::thread::Builder::new()
                .name("tarantool-sup".into())
                .spawn(move || supervise(&cfg, &paths, &client_cfg, &status, &stop_rx, ready_tx))
                .map_err(|source| StoreError::Thread { source })?
        };
        let mut sup = Supervisor {
            stop_tx: Some(stop_tx),
            thread: Some(thread),
            status,
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(sup),
            Ok(Err(e)) => {
                sup.stop();
                Err(e)
            }
            Err(_) => {
                sup.stop();
                Err(StoreError::SupervisorDied)
            }
        }
    }

    /// Stops the instance (SIGTERM, SIGKILL after the deadline) and waits for it.
    pub fn stop(&mut self) {
        // Dropping the sender wakes the thread from any wait.
        self.stop_tx.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("Tarantool supervisor thread panicked");
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn supervise(
    cfg: &LocalConfig,
    paths: &Paths,
    client_cfg: &ClientConfig,
    status: &Status,
    stop_rx: &Receiver<()>,
    ready_tx: Sender<Result<(), StoreError>>,
) {
    let mut ready_tx = Some(ready_tx);
    let mut backoff = cfg.restart_backoff_min;
    loop {
        let started = Instant::now();
        let attempt = spawn(cfg, paths).and_then(|mut child| {
            match wait_ready(cfg, paths, client_cfg, &mut child, stop_rx) {
                Ok(()) => {
                    // Published once ready: a pid always names an instance that served.
                    status.pid.store(child.id(), Ordering::Relaxed);
                    Ok(child)
                }
                Err(e) => {
                    terminate(&mut child, cfg.stop_timeout);
                    Err(e)
                }
            }
        });
        let mut child = match attempt {
            Ok(child) => {
                tracing::info!(pid = child.id(), socket = %paths.socket.display(),
                    ms = started.elapsed().as_millis() as u64, "local Tarantool ready");
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Ok(()));
                }
                child
            }
            Err(e) => {
                // The first start reports to the caller; later ones can only log and retry.
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracing::error!(error = %e, backoff_ms = backoff.as_millis() as u64,
                    "local Tarantool failed to restart");
                if stopped(stop_rx, backoff) {
                    return;
                }
                backoff = (backoff * 2).min(cfg.restart_backoff_max);
                continue;
            }
        };
        let exit = loop {
            if stopped(stop_rx, POLL) {
                tracing::info!(pid = child.id(), "stopping local Tarantool");
                terminate(&mut child, cfg.stop_timeout);
                status.pid.store(0, Ordering::Relaxed);
                return;
            }
            match child.try_wait() {
                Ok(Some(st)) => break describe(st),
                Ok(None) => {}
                Err(e) => break format!("wait failed: {e}"),
            }
        };
        status.pid.store(0, Ordering::Relaxed);
        if started.elapsed() >= HEALTHY_RUN {
            backoff = cfg.restart_backoff_min;
        }
        let restarts = status.restarts.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(exit = %exit, restarts, backoff_ms = backoff.as_millis() as u64,
            log = %paths.log.display(), tail = %log_tail(&paths.log),
            "local Tarantool died; restarting");
        if stopped(stop_rx, backoff) {
            return;
        }
        backoff = (backoff * 2).min(cfg.restart_backoff_max);
    }
}

/// Waits up to `d`; true when the store asked to stop.
fn stopped(stop_rx: &Receiver<()>, d: Duration) -> bool {
    !matches!(stop_rx.recv_timeout(d), Err(RecvTimeoutError::Timeout))
}

fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

/// Waits until no process holds Tarantool's pid file. After a daemon is killed -9, its instance
/// gets SIGTERM (PR_SET_PDEATHSIG) and needs a moment to exit; a new daemon started at once would
/// otherwise see its instance fail on the locked pid file.
fn wait_pid_file_free(paths: &Paths, timeout: Duration) -> Result<(), StoreError> {
    let f = match File::open(&paths.pid_file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(dir_err(&paths.dir, "open tarantool.pid")(e)),
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let deadline = Instant::now() + timeout;
    let mut logged = false;
    loop {
        // SAFETY: flock on a descriptor we own; dropping `f` releases it.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let pid = fs::read_to_string(&paths.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if Instant::now() >= deadline {
            return Err(StoreError::Foreign {
                socket: paths.socket.clone(),
                pid,
            });
        }
        if !logged {
            tracing::info!(
                pid,
                "waiting for a previous Tarantool on this data dir to exit"
            );
            logged = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(cfg: &LocalConfig, paths: &Paths) -> Result<Child, StoreError> {
    wait_pid_file_free(paths, cfg.stop_timeout)?;
    let log = open_log(&paths.log).map_err(dir_err(&paths.dir, "open tarantool.log"))?;
    let log2 = log
        .try_clone()
        .map_err(dir_err(&paths.dir, "open tarantool.log"))?;
    let mut cmd = Command::new(&cfg.tarantool_bin);
    cmd.arg(&paths.init)
        .current_dir(&paths.dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C on the daemon's terminal must not kill the store
        // before the daemon has stopped writing to it.
        .process_group(0);
    // glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after
    // which vinyl's dump and compaction buffers come from the heap and their pages stay in RSS
    // when freed: the instance grew in steps of ~8 MiB over hours of writes. A fixed threshold
    // keeps such buffers in their own mappings (returned at free), and a low trim threshold
    // gives freed heap tops back. One arena instead of one per vinyl worker thread: each
    // thread's arena kept its own fragments (the instance measured ~4 MiB less with one).
    for (k, v) in MALLOC_ENV {
        cmd.env(k, v);
    }
    // SAFETY: prctl, sigemptyset and sigprocmask are async-signal-safe and touch no memory of
    // the parent.
    unsafe {
        cmd.pre_exec(|| {
            // The instance must not outlive a daemon killed with -9.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The daemon blocks SIGTERM/SIGINT/SIGHUP in every thread to take them synchronously;
            // a blocked mask survives exec, and Tarantool would then ignore our SIGTERM.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            StoreError::TarantoolMissing {
                bin: cfg.tarantool_bin.clone(),
            }
        } else {
            StoreError::Spawn {
                bin: cfg.tarantool_bin.clone(),
                source,
            }
        }
    })
}

fn open_log(path: &Path) -> io::Result<File> {
    let big = fs::metadata(path)
        .map(|m| m.len() > LOG_MAX_BYTES)
        .unwrap_or(false);
    let mut o = OpenOptions::new();
    o.create(true).mode(0o600);
    if big {
        o.write(true).truncate(true);
    } else {
        o.append(true);
    }
    o.open(path)
}

/// The last lines of the instance's log, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(1500)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// Ready = connected to *our* child (its pid), schema migrated, and a stored function answers.
fn wait_ready(
    cfg: &LocalConfig,
    paths: &Paths,
    client_cfg: &ClientConfig,
    child: &mut Child,
    stop_rx: &Receiver<()>,
) -> Result<(), StoreError> {
    let deadline = Instant::now() + cfg.start_timeout;
    let mut last = String::from("no attempt yet");
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(StoreError::StartFailed {
                status: describe(st),
                log: paths.log.clone(),
                tail: log_tail(&paths.log),
            });
        }
        if Instant::now() >= deadline {
            return Err(StoreError::NotReady {
                timeout: cfg.start_timeout,
                last,
                log: paths.log.clone(),
                tail: log_tail(&paths.log),
            });
        }
        match Client::connect(client_cfg.clone()) {
            Ok(client) => {
                let (pid,): (u32,) = client.eval("return box.info.pid", &[(); 0])?;
                if pid != child.id() {
                    return Err(StoreError::Foreign {
                        socket: paths.socket.clone(),
                        pid,
                    });
                }
                migrate(&client)?;
                let (_,): (u32,) = client.call("lp_schema_version", &[(); 0])?;
                return Ok(());
            }
            // Not listening yet (the socket appears last, after recovery and the snapshot).
            Err(e) if e.is_retryable() => last = e.to_string(),
            Err(e) => return Err(e.into()),
        }
        if stopped(stop_rx, Duration::from_millis(20)) {
            return Err(StoreError::Stopped);
        }
    }
}

/// SIGTERM, then SIGKILL after `deadline`; always reaps.
fn terminate(child: &mut Child, deadline: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain syscall on our own, not yet reaped child (no pid reuse possible).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    tracing::warn!(
        pid,
        deadline_ms = deadline.as_millis() as u64,
        "local Tarantool ignored SIGTERM; killing it"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// The client config for a local instance.
pub(crate) fn client_config(
    paths: &Paths,
    password: String,
    request_timeout: Duration,
) -> ClientConfig {
    let mut c = ClientConfig::new(Address::Unix(paths.socket.clone()));
    c.credentials = Some(Credentials {
        user: USER.to_owned(),
        password,
    });
    c.request_timeout = request_timeout;
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lua_strings_are_escaped() {
        assert_eq!(lua_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(lua_str("x\ny]]"), r#""x\010y]]""#);
    }
}
