//! Shared by the daemon's end-to-end tests: a testbed with a daemon running in its router
//! namespace, and a collector that checks every frame and sums them per link, direction and
//! UTC second. Everything is torn down on drop, also when a test fails.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use linkpulse::{
    shared::LinkState,
    stamp::{Reflector, ReflectorConfig, ReflectorHandle},
    Config, Daemon, Frame,
};
use linkpulse_testbed::{
    emulator::LinkProfile, netns, ModemKind, ModemSpec, Testbed, TestbedOptions, TestbedSpec,
};

/// Counts of one (link, direction, second) or total.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
}

/// What the collector saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub frames: u64,
    pub first_seq: Option<u64>,
    pub last_seq: u64,
    pub seq_gaps: u64,
    pub misaligned: u64,
    pub width_ns: u64,
    /// (link, dir) → UTC second → counts.
    pub per_second: BTreeMap<(usize, usize), BTreeMap<i64, Counts>>,
    pub totals: BTreeMap<(usize, usize), Counts>,
    /// (link, dir, 500 ms window start UTC ns) → counts, as the daemon's rollups define windows.
    pub per_window: BTreeMap<(usize, usize, i64), Counts>,
    /// Frames in which link i was not valid (missing data).
    pub invalid: BTreeMap<usize, u64>,
    /// (link, UTC second) with at least one bin in which the link was not valid.
    pub incomplete_seconds: std::collections::BTreeSet<(usize, i64)>,
    /// Counts that arrived while a link was not valid (they still count in totals).
    pub flags_or: u32,
    /// Distinct TAI − UTC differences of the frames' bin starts (ns).
    pub tai_minus_utc: std::collections::BTreeSet<i64>,
    /// Frames per flag bit (index = bit).
    pub flag_frames: [u64; 8],
    pub last_bin_utc: i64,
    /// (link, bin start UTC ns) → passive TCP RTT of that bin (bins with samples only).
    pub tcp_rtt: BTreeMap<(usize, i64), linkpulse::frame::RttBin>,
    /// (link, bin start UTC ns) of bins whose entry carries late data.
    pub late_bins: std::collections::BTreeSet<(usize, i64)>,
    /// Frames in which link i's passive RTT was marked measured.
    pub tcp_rtt_measured: BTreeMap<usize, u64>,
}

pub struct Run {
    pub bed: Testbed,
    pub daemon: Option<Daemon>,
    pub seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    collector: Option<JoinHandle<()>>,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("lp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn modem(ifname: &str, kind: ModemKind, up: LinkProfile, down: LinkProfile) -> ModemSpec {
    ModemSpec {
        ifname: ifname.into(),
        kind,
        up,
        down,
    }
}

/// A modem without impairments either way (for counting tests).
pub fn plain(ifname: &str, kind: ModemKind) -> ModemSpec {
    modem(
        ifname,
        kind,
        LinkProfile::unlimited(),
        LinkProfile::unlimited(),
    )
}

/// Config text for links named like the testbed's modems (plus `extra` interface names).
/// The controller stream is off unless `stream` names a socket path (tests run in parallel).
pub fn config_text(
    bed: &Testbed,
    extra: &[&str],
    stream: Option<&std::path::Path>,
    store: Option<&std::path::Path>,
) -> String {
    let mut s =
        String::from("[router]\nid = \"e2e\"\nsite = \"lab\"\n[http]\nlisten = \"127.0.0.1:0\"\n");
    match stream {
        Some(p) => s += &format!("[stream]\npath = \"{}\"\n", p.display()),
        None => s += "[stream]\nenabled = false\n",
    }
    // The local store (a Tarantool per daemon) only where a test asks for it.
    match store {
        Some(p) => s += &format!("[store]\ndata_dir = \"{}\"\n", p.display()),
        None => s += "[store]\nenabled = false\n",
    }
    for m in &bed.spec().modems {
        s += &format!(
            "[[link]]\ninterface = \"{}\"\noperator = \"test\"\n",
            m.ifname
        );
    }
    for e in extra {
        s += &format!("[[link]]\ninterface = \"{e}\"\n");
    }
    s
}

/// Appends `toml` to a generated config; lines of `toml` before its first table header are
/// keys of `[store]` (inserted there).
pub fn with_toml(mut text: String, toml: &str) -> String {
    let (store_keys, rest) = match toml.find("\n[") {
        _ if toml.starts_with('[') => ("", toml),
        Some(i) => toml.split_at(i + 1),
        None => (toml, ""),
    };
    if !store_keys.is_empty() {
        let at = text
            .find("[store]\n")
            .expect("[store] in the generated config")
            + 8;
        text.insert_str(at, store_keys);
    }
    text + rest
}

impl Run {
    /// Brings up a testbed `name` with `modems` and a daemon for them (plus `extra` links that do
    /// not exist), waits until the testbed's links are attached.
    pub fn start(name: &str, modems: Vec<ModemSpec>, extra: &[&str]) -> Run {
        Self::start_with(name, modems, extra, TestbedOptions::default())
    }

    pub fn start_with(
        name: &str,
        modems: Vec<ModemSpec>,
        extra: &[&str],
        options: TestbedOptions,
    ) -> Run {
        Self::start_full(name, modems, extra, options, None, None)
    }

    /// With the controller stream served at `stream`.
    pub fn start_full(
        name: &str,
        modems: Vec<ModemSpec>,
        extra: &[&str],
        options: TestbedOptions,
        stream: Option<PathBuf>,
        store: Option<PathBuf>,
    ) -> Run {
        Self::start_config(name, modems, extra, options, stream, store, "", &mut |_| {})
    }

    /// As [`Run::start_full`], with `toml` appended to the generated config (e.g. `[[forward]]`,
    /// store keys go into `[store]`).
    pub fn start_toml(
        name: &str,
        modems: Vec<ModemSpec>,
        extra: &[&str],
        options: TestbedOptions,
        stream: Option<PathBuf>,
        store: Option<PathBuf>,
        toml: &str,
    ) -> Run {
        Self::start_custom(
            name,
            modems,
            extra,
            options,
            stream,
            store,
            &|t| with_toml(t, toml),
            &mut |_| {},
        )
    }

    /// Like `start_full`, with `edit` applied to the config text (e.g. an `[http]` section).
    pub fn start_edited(
        name: &str,
        modems: Vec<ModemSpec>,
        extra: &[&str],
        options: TestbedOptions,
        stream: Option<PathBuf>,
        store: Option<PathBuf>,
        edit: &dyn Fn(String) -> String,
    ) -> Run {
        Self::start_custom(
            name,
            modems,
            extra,
            options,
            stream,
            store,
            edit,
            &mut |_| {},
        )
    }

    /// Like [`Run::start_full`], with `append` added to the config text (e.g. a `[probe]`
    /// section; a text starting with `[router]` is the whole config instead) and `before` run
    /// on the testbed before the daemon starts (e.g. a reflector).
    #[allow(clippy::too_many_arguments)]
    pub fn start_config(
        name: &str,
        modems: Vec<ModemSpec>,
        extra: &[&str],
        options: TestbedOptions,
        stream: Option<PathBuf>,
        store: Option<PathBuf>,
        append: &str,
        before: &mut dyn FnMut(&Testbed),
    ) -> Run {
        Self::start_custom(
            name,
            modems,
            extra,
            options,
            stream,
            store,
            &|t| {
                if append.starts_with("[router]") {
                    append.to_string()
                } else {
                    t + append
                }
            },
            before,
        )
    }

    /// The general form: `edit` maps the generated config text to the one used, `before` runs
    /// on the testbed before the daemon starts.
    #[allow(clippy::too_many_arguments)]
    pub fn start_custom(
        name: &str,
        modems: Vec<ModemSpec>,
        extra: &[&str],
        options: TestbedOptions,
        stream: Option<PathBuf>,
        store: Option<PathBuf>,
        edit: &dyn Fn(String) -> String,
        before: &mut dyn FnMut(&Testbed),
    ) -> Run {
        let dir = TempDir::new(name);
        let bed = Testbed::up_with(
            TestbedSpec {
                name: name.into(),
                modems,
                state_dir: dir.0.join("testbed"),
            },
            options,
        )
        .expect("testbed up");
        let cfg = Config::parse(
            &edit(config_text(
                &bed,
                extra,
                stream.as_deref(),
                store.as_deref(),
            )),
            std::path::Path::new("e2e.toml"),
        )
        .expect("config");
        before(&bed);
        let (sub, mut rx) = linkpulse::subscription("e2e", 1 << 16);
        let daemon = netns::run_in(bed.router_ns(), || Daemon::start(&cfg, vec![sub]))
            .expect("enter router ns")
            .expect("daemon start");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let collector = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            std::thread::spawn(move || loop {
                let mut any = false;
                while let Ok(f) = rx.pop() {
                    any = true;
                    // A failing test may have poisoned the lock; the data is still fine.
                    collect(&mut seen.lock().unwrap_or_else(|p| p.into_inner()), &f);
                }
                if !any {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let run = Run {
            bed,
            daemon: Some(daemon),
            seen,
            stop,
            collector: Some(collector),
            _dir: dir,
        };
        let n = run.bed.spec().modems.len();
        run.wait_links(Duration::from_secs(20), |links| {
            links.iter().take(n).all(|l| l.state == LinkState::Attached)
        });
        run
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    /// Waits (generous deadline) until `ok` holds for the link table.
    pub fn wait_links(
        &self,
        deadline: Duration,
        ok: impl Fn(&[linkpulse::shared::LinkInfo]) -> bool,
    ) {
        let t = Instant::now();
        loop {
            let links = self.daemon().shared().links();
            if ok(&links) {
                return;
            }
            assert!(
                t.elapsed() < deadline,
                "link table never reached the expected state: {links:#?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Interfaces that just got addresses send IPv6 multicast listener reports (real IP
    /// packets, at random times within about a second, twice): wait them out before measuring
    /// packet counts against a generator's.
    pub const MLD_QUIET: Duration = Duration::from_millis(3000);

    /// Waits until every bin up to now + `settle` has been collected.
    pub fn settle(&self, settle: Duration) {
        std::thread::sleep(settle);
        let target = linkpulse::clock::realtime_ns() as i64;
        let t = Instant::now();
        while self.seen.lock().expect("seen").last_bin_utc < target {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "frames stopped coming"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the daemon and the collector; the testbed stays up until drop.
    pub fn stop_daemon(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop();
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(c) = self.collector.take() {
            let _ = c.join();
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.stop_daemon();
    }
}

fn collect(s: &mut Seen, f: &Frame) {
    s.frames += 1;
    match s.first_seq {
        None => s.first_seq = Some(f.seq),
        Some(_) if f.seq != s.last_seq + 1 => s.seq_gaps += 1,
        _ => {}
    }
    s.last_seq = f.seq;
    s.width_ns = f.width_ns;
    if !f.bin_start_tai_ns.is_multiple_of(f.width_ns) || f.bin_start_utc_ns % f.width_ns as i64 != 0
    {
        s.misaligned += 1;
    }
    s.flags_or |= f.flags;
    s.tai_minus_utc
        .insert(f.bin_start_tai_ns as i64 - f.bin_start_utc_ns);
    for (bit, n) in s.flag_frames.iter_mut().enumerate() {
        if f.flags & (1 << bit) != 0 {
            *n += 1;
        }
    }
    s.last_bin_utc = f.bin_start_utc_ns;
    let sec = f.bin_start_utc_ns.div_euclid(1_000_000_000);
    for l in 0..f.link_count as usize {
        if !f.is_valid(l) {
            *s.invalid.entry(l).or_default() += 1;
            s.incomplete_seconds.insert((l, sec));
        }
        if f.tcp_rtt_mask & (1 << l) != 0 {
            *s.tcp_rtt_measured.entry(l).or_default() += 1;
        }
        if f.tcp_rtt[l].rtt_count > 0 {
            s.tcp_rtt.insert((l, f.bin_start_utc_ns), f.tcp_rtt[l]);
        }
        if f.late_mask & (1 << l) != 0 {
            s.late_bins.insert((l, f.bin_start_utc_ns));
        }
        for d in 0..2 {
            let (p, b) = (f.links[l].packets[d], f.links[l].bytes[d]);
            if p == 0 && b == 0 {
                continue;
            }
            let c = s
                .per_second
                .entry((l, d))
                .or_default()
                .entry(sec)
                .or_default();
            c.packets += p;
            c.bytes += b;
            let w = f.bin_start_utc_ns - f.bin_start_utc_ns.rem_euclid(500_000_000);
            let c = s.per_window.entry((l, d, w)).or_default();
            c.packets += p;
            c.bytes += b;
            let t = s.totals.entry((l, d)).or_default();
            t.packets += p;
            t.bytes += b;
        }
    }
}

/// GET `path` from the daemon's HTTP API, from inside the router namespace (where it listens).
/// Returns (status code, body).
pub fn http_get(run: &Run, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = run.daemon().http_addr();
    let path = path.to_string();
    netns::run_in(run.bed.router_ns(), move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect to the API");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(s, "GET {path} HTTP/1.0\r\nHost: linkpulse\r\n\r\n").expect("request");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("response");
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
    .expect("enter router ns")
}

/// A STAMP reflector on port 862 of modem `k`'s server address, in the server namespace.
pub fn reflector(bed: &Testbed, k: usize) -> ReflectorHandle {
    let (_, srv) = bed.modem_addr_v4(k);
    let cfg = ReflectorConfig {
        listen: std::net::SocketAddr::new(srv.into(), 862),
        ..ReflectorConfig::default()
    };
    netns::run_in(bed.server_ns(), || Reflector::bind(cfg))
        .expect("enter server ns")
        .expect("bind reflector")
        .spawn()
        .expect("reflector thread")
}

/// A `[probe]` section: `rate` Hz to reflector `srv`, a budget that never limits, `extra` lines.
pub fn probe_section(srv: std::net::Ipv4Addr, rate: u32, extra: &str) -> String {
    format!(
        "[probe]\nreflector = \"{srv}\"\nmin_rate_hz = {rate}\nmax_rate_hz = {rate}\n\
         budget_mb_per_day = 100000\n{extra}"
    )
}
