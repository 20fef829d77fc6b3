//! State shared between the daemon's threads: link table (control thread writes, API reads),
//! per-link atomics (read by ingest each tick), counters for /metrics, a bounded event log.
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Mutex, MutexGuard, RwLock,
    },
};

use linkpulse_common::{DIRS, MAX_LINKS};
use serde::Serialize;

use crate::{
    align::AlignStats,
    clock::{self, ClockState, ClockStep},
    config::{Config, LinkConfig},
};

/// Attachment state of a configured link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Counting on the interface.
    Attached,
    /// The interface does not exist (yet); attached as soon as it appears.
    Missing,
    /// The interface exists but attaching failed (see `last_error`).
    Error,
}

/// One configured link as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkInfo {
    pub index: usize,
    #[serde(flatten)]
    pub config: LinkConfigView,
    pub state: LinkState,
    pub ifindex: Option<u32>,
    /// UTC ns since when it has been in this state.
    pub since_utc_ns: i64,
    pub attach_count: u64,
    pub last_error: Option<String>,
    /// Whole UTC second last completed (None until one is).
    pub last_second: Option<SecondTotals>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkConfigView {
    pub interface: String,
    pub label: String,
    pub operator: String,
    pub modem_id: String,
}

impl From<&LinkConfig> for LinkConfigView {
    fn from(l: &LinkConfig) -> Self {
        Self {
            interface: l.interface.clone(),
            label: l.label.clone(),
            operator: l.operator.clone(),
            modem_id: l.modem_id.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DirTotals {
    pub packets: u64,
    pub bytes: u64,
    pub bits_per_s: u64,
}

/// Totals of one link over one whole UTC second.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct SecondTotals {
    pub start_utc_ns: i64,
    /// Router ingress (download).
    pub down: DirTotals,
    /// Router egress (upload).
    pub up: DirTotals,
    /// Every bin of the second was measured (link attached throughout).
    pub complete: bool,
    /// Passive TCP RTT samples whose echo arrived in the second; None when passive RTT is off
    /// or the link was measured in none of its bins.
    pub tcp_rtt_samples: Option<u64>,
    /// Their min, mean and max (ns); None without samples.
    pub tcp_rtt_min_ns: Option<u64>,
    pub tcp_rtt_mean_ns: Option<u64>,
    pub tcp_rtt_max_ns: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub at_utc_ns: i64,
    pub kind: &'static str,
    pub link: Option<String>,
    pub message: String,
}

const EVENTS_KEPT: usize = 1024;

/// Cumulative counters of one link, direction-indexed (0 = down/ingress, 1 = up/egress).
#[derive(Default)]
pub struct LinkCounters {
    /// Bin ends at which the kernel found the ring buffer full on this link.
    pub ring_full: AtomicU64,
    pub packets: [AtomicU64; DIRS],
    pub bytes: [AtomicU64; DIRS],
    pub bins_valid: AtomicU64,
    pub bins_missing: AtomicU64,
}

#[derive(Default)]
pub struct DaemonCounters {
    pub frames: AtomicU64,
    pub ring_records: AtomicU64,
    pub bins_late: AtomicU64,
    pub late_packets: AtomicU64,
    /// Probe samples and sent probes carried into a later frame (their bin was published).
    pub rtt_late: AtomicU64,
    pub ring_full: AtomicU64,
    pub bad_records: AtomicU64,
    pub torn_reads: AtomicU64,
    pub skipped_bins: AtomicU64,
    pub malformed_packets: AtomicU64,
    pub attach_errors: AtomicU64,
    pub attaches: AtomicU64,
    pub clock_steps: AtomicU64,
    /// Passive TCP RTT, copied from the kernel's counters by `lp-control` every 200 ms.
    pub tcp_rtt: TcpRttCounters,
    /// TAI ns of the ingest thread's last tick (watchdog).
    pub last_tick_tai: AtomicU64,
}

/// The kernel's passive RTT counters (see `crate::kernel::TcpStats`).
#[derive(Default)]
pub struct TcpRttCounters {
    pub samples: AtomicU64,
    pub inserts: AtomicU64,
    pub bad_options: AtomicU64,
    pub insert_errors: AtomicU64,
    /// Lower bound of stored TSvals evicted unmatched (`TcpStats::evicted_at_least`).
    pub evicted: AtomicU64,
    /// Size of the kernel's TSval table.
    pub table_entries: AtomicU64,
}

pub struct Shared {
    pub router_id: String,
    pub site: String,
    pub bin_width_ns: u64,
    links: RwLock<Vec<Option<LinkInfo>>>,
    attached_since: [AtomicU64; MAX_LINKS],
    link_count: AtomicU32,
    pub link_counters: [LinkCounters; MAX_LINKS],
    pub counters: DaemonCounters,
    clock: Mutex<ClockState>,
    clock_synced: AtomicBool,
    events: Mutex<VecDeque<Event>>,
    /// The rollup store's counters.
    pub store: crate::persist::StoreCounters,
    /// The controller stream's counters.
    pub stream: crate::stream::StreamCounters,
    /// The page's live feed (SSE) counters.
    pub live: crate::http::live::LiveCounters,
    /// The probes' figures and link health (written by `lp-probe`).
    pub probe: crate::probe::ProbeShared,
    /// Frames lost per consumer queue (set once the fan-out exists).
    pub fanout_dropped: RwLock<Vec<(String, std::sync::Arc<[AtomicU64]>)>>,
    /// The local store once it is ready (set and cleared by `lp-persist`), for readers outside
    /// the frame path: the HTTP API, the forwarders.
    store_handle: RwLock<Option<std::sync::Arc<linkpulse_sink::store::Store>>>,
    /// Forwarders and retention (for /metrics).
    pub forward: crate::forward::ForwardState,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking thread cannot leave these plain values half-updated in a harmful way.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new(cfg: &Config) -> Self {
        Self {
            router_id: cfg.router_id.clone(),
            site: cfg.site.clone(),
            bin_width_ns: cfg.bin_width_ns,
            links: RwLock::new(vec![None; MAX_LINKS]),
            attached_since: std::array::from_fn(|_| AtomicU64::new(0)),
            link_count: AtomicU32::new(0),
            link_counters: std::array::from_fn(|_| LinkCounters::default()),
            counters: DaemonCounters::default(),
            clock: Mutex::new(ClockState::default()),
            clock_synced: AtomicBool::new(true),
            events: Mutex::new(VecDeque::with_capacity(EVENTS_KEPT)),
            stream: Default::default(),
            live: Default::default(),
            probe: Default::default(),
            store: Default::default(),
            fanout_dropped: RwLock::new(Vec::new()),
            store_handle: RwLock::new(None),
            forward: Default::default(),
        }
    }

    pub fn link_count(&self) -> usize {
        self.link_count.load(Ordering::Acquire) as usize
    }

    pub fn load_attached_since(&self, out: &mut [u64; MAX_LINKS]) {
        for (o, a) in out.iter_mut().zip(self.attached_since.iter()) {
            *o = a.load(Ordering::Acquire);
        }
    }

    pub fn set_attached_since(&self, link: usize, tai: u64) {
        self.attached_since[link].store(tai, Ordering::Release);
    }

    /// Replaces the link table (control thread only).
    pub fn set_links(&self, links: Vec<Option<LinkInfo>>) {
        let count = links.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
        *self.links.write().unwrap_or_else(|p| p.into_inner()) = links;
        self.link_count.store(count as u32, Ordering::Release);
    }

    pub fn update_link(&self, index: usize, f: impl FnOnce(&mut LinkInfo)) {
        let mut links = self.links.write().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(l)) = links.get_mut(index) {
            f(l);
        }
    }

    pub fn links(&self) -> Vec<LinkInfo> {
        self.links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    pub fn set_clock(&self, c: ClockState) {
        self.clock_synced.store(c.synced, Ordering::Relaxed);
        *lock(&self.clock) = c;
    }

    pub fn clock(&self) -> ClockState {
        *lock(&self.clock)
    }

    /// The local store, if it is up (`None` while it starts, or when disabled).
    pub fn store_handle(&self) -> Option<std::sync::Arc<linkpulse_sink::store::Store>> {
        self.store_handle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_store_handle(
        &self,
        store: Option<std::sync::Arc<linkpulse_sink::store::Store>>,
    ) {
        *self.store_handle.write().unwrap_or_else(|p| p.into_inner()) = store;
    }

    pub fn event(&self, kind: &'static str, link: Option<&str>, message: String) {
        let ev = Event {
            at_utc_ns: clock::realtime_ns() as i64,
            kind,
            link: link.map(str::to_string),
            message,
        };
        let mut q = lock(&self.events);
        if q.len() == EVENTS_KEPT {
            q.pop_front();
        }
        q.push_back(ev);
    }

    pub fn events(&self) -> Vec<Event> {
        lock(&self.events).iter().cloned().collect()
    }

    pub fn event_clock_step(&self, step: ClockStep) {
        self.counters.clock_steps.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            step_ns = step.step_ns,
            "clock step detected: bins around it are flagged"
        );
        self.event(
            "clock_step",
            None,
            format!(
                "the real-time clock stepped by {} ms",
                step.step_ns / 1_000_000
            ),
        );
    }

    pub fn event_clock_sync(&self, synced: bool) {
        let msg = if synced {
            "the kernel reports the clock synchronised"
        } else {
            "the kernel reports the clock NOT synchronised: frames are flagged clock_unsynced"
        };
        tracing::info!(synced, "{msg}");
        self.event("clock_sync", None, msg.to_string());
    }

    /// Copies the aligner's counters (cheap relaxed stores, once per tick).
    pub fn publish_align_stats(&self, s: &AlignStats, now_tai: u64) {
        let c = &self.counters;
        c.frames.store(s.frames, Ordering::Relaxed);
        c.ring_records.store(s.records, Ordering::Relaxed);
        c.bins_late.store(s.late_events, Ordering::Relaxed);
        c.late_packets.store(s.late_packets, Ordering::Relaxed);
        c.rtt_late.store(s.rtt_late_events, Ordering::Relaxed);
        c.ring_full.store(s.ring_full, Ordering::Relaxed);
        for (lc, v) in self.link_counters.iter().zip(s.ring_full_by_link.iter()) {
            lc.ring_full.store(*v, Ordering::Relaxed);
        }
        c.bad_records.store(s.bad_records, Ordering::Relaxed);
        c.torn_reads.store(s.torn_reads, Ordering::Relaxed);
        c.skipped_bins.store(s.skipped_bins, Ordering::Relaxed);
        c.malformed_packets.store(s.malformed, Ordering::Relaxed);
        c.last_tick_tai.store(now_tai, Ordering::Relaxed);
    }
}
