//! Active probes: one STAMP Session-Sender per modem link, stamped in the kernel (T1 on
//! egress, T4 on ingress, by `lp_egress`/`lp_ingress`), RTT and per-direction loss, link health.
//!
//! `sender` is the `lp-probe` thread (sockets, absolute-deadline schedule, the kernel's
//! `PROBE_RING`); `session` the per-link bookkeeping; `health` the state judge and the adaptive
//! rate; `config` the `[probe]` section. What other threads read is in [`ProbeShared`].
pub mod config;
pub mod health;
pub mod oneway;
pub mod sender;
pub mod session;

use std::{
    fmt::Write as _,
    sync::{
        atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering},
        Mutex,
    },
};

use linkpulse_common::MAX_LINKS;
use serde::Serialize;

pub use config::{LinkProbeConfig, ProbeConfig};
pub use health::Health;
pub use session::{Bad, Fate, Outcome, Sample};

/// What `lp-probe` tells the rollups (`lp-persist`): RTT samples and each probe's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeEvent {
    Sample(Sample),
    Outcome(Outcome),
}

/// What `lp-probe` tells `lp-ingest` for the frames: each RTT sample, in the bin of its
/// reply's kernel stamp T4, and each probe sent, in the bin of its kernel stamp T1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GridEvent {
    Sample {
        link: u16,
        t4_tai_ns: u64,
        rtt_ns: u64,
        /// Only when both clocks report synchronisation (see [`oneway`]).
        owd: Option<oneway::OneWay>,
    },
    Sent {
        link: u16,
        t1_tai_ns: u64,
    },
}

/// Per-link figures the probe thread publishes (relaxed atomics; read by HTTP).
#[derive(Default)]
pub struct LinkProbeCounters {
    pub probed: AtomicU8,
    pub sent: AtomicU64,
    pub replies: AtomicU64,
    pub samples: AtomicU64,
    pub lost_up: AtomicU64,
    pub lost_down: AtomicU64,
    pub lost_unattributed: AtomicU64,
    pub duplicates: AtomicU64,
    pub reordered: AtomicU64,
    pub late: AtomicU64,
    pub settled_through: AtomicU64,
    /// Local UDP port of the link's sender socket (0: not open).
    pub sender_port: AtomicU64,
    /// Over the last complete second (0 when it had no sample).
    pub rtt_min_ns: AtomicU64,
    pub rtt_mean_ns: AtomicU64,
    pub rtt_max_ns: AtomicU64,
    pub rtt_second_samples: AtomicU64,
    /// One-way delays over the last complete second: samples with both clocks synchronised
    /// (0: no figure), mean up and down (ns, may be negative) and the largest error bound.
    pub owd_second_samples: AtomicU64,
    pub owd_up_mean_ns: AtomicI64,
    pub owd_down_mean_ns: AtomicI64,
    pub owd_error_ns: AtomicU64,
    /// Over the last complete second: longest time from a reply's kernel stamp (T4) to its
    /// sample being handed to the frames and the rollups (0 without samples).
    pub sample_ready_max_ns: AtomicU64,
    /// Current probe rate, mHz.
    pub rate_mhz: AtomicU64,
    pub state: AtomicU8,
    /// UTC ns of the last state change (0: never).
    pub state_since_utc_ns: AtomicI64,
}

/// What the probe thread shares with the rest of the daemon.
pub struct ProbeShared {
    pub links: [LinkProbeCounters; MAX_LINKS],
    /// Send ticks skipped because the thread woke more than one period late.
    pub missed_ticks: AtomicU64,
    pub ticks: AtomicU64,
    pub send_errors: AtomicU64,
    /// Per [`Bad::ALL`] reason.
    pub bad: [AtomicU64; 5],
    /// Probe stamps the kernel could not queue (ring full).
    pub ring_full: AtomicU64,
    /// Packets on a probe port too short for the kernel to read their STAMP sequence.
    pub kernel_short: AtomicU64,
    /// Samples and outcomes the rollups' feed could not take (lp-persist behind): those
    /// windows miss them.
    pub persist_dropped: AtomicU64,
    /// Samples and sent probes the frames' feed (`lp-ingest`) could not take: those frames
    /// miss them.
    pub grid_dropped: AtomicU64,
    /// Where samples go when a test or the bench listens (picked up once a second).
    tap: Mutex<Option<rtrb::Producer<Sample>>>,
    /// The rollups' own feed (`lp-persist`), apart from the test/bench tap.
    persist_tap: Mutex<Option<rtrb::Producer<ProbeEvent>>>,
}

impl Default for ProbeShared {
    fn default() -> Self {
        Self {
            links: std::array::from_fn(|_| LinkProbeCounters::default()),
            missed_ticks: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            bad: std::array::from_fn(|_| AtomicU64::new(0)),
            ring_full: AtomicU64::new(0),
            kernel_short: AtomicU64::new(0),
            persist_dropped: AtomicU64::new(0),
            grid_dropped: AtomicU64::new(0),
            tap: Mutex::new(None),
            persist_tap: Mutex::new(None),
        }
    }
}

/// One link's probe figures in `/api/v1/links` (`probes`).
#[derive(Debug, Clone, Serialize)]
pub struct ProbeView {
    pub index: usize,
    pub state: Health,
    pub state_code: u8,
    pub state_since_utc_ns: i64,
    pub rate_hz: f64,
    pub probes_sent: u64,
    pub replies: u64,
    pub rtt_samples: u64,
    pub lost_up: u64,
    pub lost_down: u64,
    pub lost_unattributed: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub late_replies: u64,
    /// Probes 0..n whose loss direction is settled (the lost ones wait for a later answer).
    pub settled_through: u64,
    pub sender_port: u16,
    /// Over the last complete second; None without samples.
    pub rtt_min_ns: Option<u64>,
    pub rtt_mean_ns: Option<u64>,
    pub rtt_max_ns: Option<u64>,
    /// One-way delays over the last complete second, only when our clock and the
    /// reflector's both report synchronisation (else None): means (ns, negative when the
    /// clocks' offset exceeds the delay) and the error bound (ours + the reflector's).
    pub owd_up_mean_ns: Option<i64>,
    pub owd_down_mean_ns: Option<i64>,
    pub owd_error_bound_ns: Option<u64>,
}

impl ProbeShared {
    /// Per-probe RTT samples from now on (at most `capacity` waiting; more are dropped).
    /// One listener at a time; it starts receiving within about a second.
    pub fn subscribe(&self, capacity: usize) -> rtrb::Consumer<Sample> {
        let (p, c) = rtrb::RingBuffer::new(capacity);
        *self.tap.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        c
    }

    pub(crate) fn take_tap(&self) -> Option<rtrb::Producer<Sample>> {
        self.tap.try_lock().ok()?.take()
    }

    /// The samples and probe outcomes for the rollups (`lp-persist`): like
    /// [`ProbeShared::subscribe`], on a second feed so tests and the bench can listen at the
    /// same time.
    pub fn subscribe_persist(&self, capacity: usize) -> rtrb::Consumer<ProbeEvent> {
        let (p, c) = rtrb::RingBuffer::new(capacity);
        *self.persist_tap.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        c
    }

    pub(crate) fn take_persist_tap(&self) -> Option<rtrb::Producer<ProbeEvent>> {
        self.persist_tap.try_lock().ok()?.take()
    }

    pub fn state(&self, link: usize) -> Health {
        self.links.get(link).map_or(Health::Unknown, |l| {
            Health::from_u8(l.state.load(Ordering::Relaxed))
        })
    }

    pub fn view(&self) -> Vec<ProbeView> {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.links
            .iter()
            .enumerate()
            .filter(|(_, l)| l.probed.load(Ordering::Relaxed) != 0)
            .map(|(index, l)| {
                let n = r(&l.rtt_second_samples);
                let owd = r(&l.owd_second_samples) > 0;
                let st = l.state.load(Ordering::Relaxed);
                ProbeView {
                    index,
                    state: Health::from_u8(st),
                    state_code: st,
                    state_since_utc_ns: l.state_since_utc_ns.load(Ordering::Relaxed),
                    rate_hz: r(&l.rate_mhz) as f64 / 1000.0,
                    probes_sent: r(&l.sent),
                    replies: r(&l.replies),
                    rtt_samples: r(&l.samples),
                    lost_up: r(&l.lost_up),
                    lost_down: r(&l.lost_down),
                    lost_unattributed: r(&l.lost_unattributed),
                    duplicates: r(&l.duplicates),
                    reordered: r(&l.reordered),
                    late_replies: r(&l.late),
                    settled_through: r(&l.settled_through),
                    sender_port: r(&l.sender_port) as u16,
                    rtt_min_ns: (n > 0).then(|| r(&l.rtt_min_ns)),
                    rtt_mean_ns: (n > 0).then(|| r(&l.rtt_mean_ns)),
                    rtt_max_ns: (n > 0).then(|| r(&l.rtt_max_ns)),
                    owd_up_mean_ns: owd.then(|| l.owd_up_mean_ns.load(Ordering::Relaxed)),
                    owd_down_mean_ns: owd.then(|| l.owd_down_mean_ns.load(Ordering::Relaxed)),
                    owd_error_bound_ns: owd.then(|| r(&l.owd_error_ns)),
                }
            })
            .collect()
    }

    /// The probe metrics in Prometheus text; `labels` is http.rs's per-link label set.
    pub fn write_metrics(
        &self,
        o: &mut String,
        links: &[crate::shared::LinkInfo],
        labels: &dyn Fn(&crate::shared::LinkInfo) -> String,
    ) {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let probed: Vec<_> = links
            .iter()
            .filter(|l| {
                self.links
                    .get(l.index)
                    .is_some_and(|p| p.probed.load(Ordering::Relaxed) != 0)
            })
            .map(|l| (l, &self.links[l.index], labels(l)))
            .collect();
        let _ = writeln!(o, "# HELP linkpulse_link_state Link health from the probes: 0 unknown, 1 up, 2 degraded, 3 down.\n# TYPE linkpulse_link_state gauge");
        for l in links {
            let st = self
                .links
                .get(l.index)
                .map_or(0, |p| p.state.load(Ordering::Relaxed));
            let _ = writeln!(o, "linkpulse_link_state{{{}}} {st}", labels(l));
        }
        let _ = writeln!(o, "# HELP linkpulse_link_state_since_seconds Unix time of the link state's last change.\n# TYPE linkpulse_link_state_since_seconds gauge");
        for (_, p, lb) in &probed {
            let t = p.state_since_utc_ns.load(Ordering::Relaxed);
            if t > 0 {
                let _ = writeln!(
                    o,
                    "linkpulse_link_state_since_seconds{{{lb}}} {}",
                    t as f64 / 1e9
                );
            }
        }
        let _ = writeln!(o, "# HELP linkpulse_link_rtt_seconds Probe RTT ((T4-T1)-(T3-T2), kernel stamps) over the last complete second.\n# TYPE linkpulse_link_rtt_seconds gauge");
        for (_, p, lb) in &probed {
            if r(&p.rtt_second_samples) == 0 {
                continue;
            }
            for (stat, v) in [
                ("min", &p.rtt_min_ns),
                ("mean", &p.rtt_mean_ns),
                ("max", &p.rtt_max_ns),
            ] {
                let _ = writeln!(
                    o,
                    "linkpulse_link_rtt_seconds{{{lb},stat=\"{stat}\"}} {}",
                    r(v) as f64 / 1e9
                );
            }
        }
        let _ = writeln!(o, "# HELP linkpulse_link_probe_sample_delay_seconds Longest time from a reply's kernel stamp (T4) to its RTT sample being ready, over the last complete second.\n# TYPE linkpulse_link_probe_sample_delay_seconds gauge");
        for (_, p, lb) in &probed {
            if r(&p.rtt_second_samples) == 0 {
                continue;
            }
            let _ = writeln!(
                o,
                "linkpulse_link_probe_sample_delay_seconds{{{lb}}} {}",
                r(&p.sample_ready_max_ns) as f64 / 1e9
            );
        }
        let _ = writeln!(o, "# HELP linkpulse_link_one_way_delay_seconds Mean one-way delay over the last complete second (T2-T1 up, T4-T3 down); only while our clock and the reflector's both report synchronisation.\n# TYPE linkpulse_link_one_way_delay_seconds gauge");
        for (_, p, lb) in &probed {
            if r(&p.owd_second_samples) == 0 {
                continue;
            }
            for (dir, v) in [("up", &p.owd_up_mean_ns), ("down", &p.owd_down_mean_ns)] {
                let _ = writeln!(
                    o,
                    "linkpulse_link_one_way_delay_seconds{{{lb},direction=\"{dir}\"}} {}",
                    v.load(Ordering::Relaxed) as f64 / 1e9
                );
            }
        }
        let _ = writeln!(o, "# HELP linkpulse_link_one_way_delay_error_bound_seconds Error bound of the one-way delays: our kernel's maxerror plus the reflector's Error Estimate.\n# TYPE linkpulse_link_one_way_delay_error_bound_seconds gauge");
        for (_, p, lb) in &probed {
            if r(&p.owd_second_samples) == 0 {
                continue;
            }
            let _ = writeln!(
                o,
                "linkpulse_link_one_way_delay_error_bound_seconds{{{lb}}} {}",
                r(&p.owd_error_ns) as f64 / 1e9
            );
        }
        let _ = writeln!(o, "# HELP linkpulse_link_probes_sent_total STAMP probes sent on the link.\n# TYPE linkpulse_link_probes_sent_total counter");
        for (_, p, lb) in &probed {
            let _ = writeln!(o, "linkpulse_link_probes_sent_total{{{lb}}} {}", r(&p.sent));
        }
        let _ = writeln!(o, "# HELP linkpulse_link_probes_lost_total Probes without reply after the loss timeout, by the direction the reflector's sequence shows (unknown: the reflector restarted its sequence).\n# TYPE linkpulse_link_probes_lost_total counter");
        for (_, p, lb) in &probed {
            for (dir, v) in [
                ("up", &p.lost_up),
                ("down", &p.lost_down),
                ("unknown", &p.lost_unattributed),
            ] {
                let _ = writeln!(
                    o,
                    "linkpulse_link_probes_lost_total{{{lb},direction=\"{dir}\"}} {}",
                    r(v)
                );
            }
        }
        let _ = writeln!(o, "# HELP linkpulse_link_rtt_samples_total RTT samples by source (probe: STAMP with kernel stamps).\n# TYPE linkpulse_link_rtt_samples_total counter");
        for (_, p, lb) in &probed {
            let _ = writeln!(
                o,
                "linkpulse_link_rtt_samples_total{{{lb},source=\"probe\"}} {}",
                r(&p.samples)
            );
        }
        let _ = writeln!(o, "# HELP linkpulse_probe_missed_ticks_total Probe send ticks skipped because the sender woke more than one period late.\n# TYPE linkpulse_probe_missed_ticks_total counter\nlinkpulse_probe_missed_ticks_total {}", r(&self.missed_ticks));
        let _ = writeln!(o, "# HELP linkpulse_probe_ticks_total Probe send ticks due.\n# TYPE linkpulse_probe_ticks_total counter\nlinkpulse_probe_ticks_total {}", r(&self.ticks));
        let _ = writeln!(o, "# HELP linkpulse_probe_send_errors_total Probes the socket refused (interface down, no route).\n# TYPE linkpulse_probe_send_errors_total counter\nlinkpulse_probe_send_errors_total {}", r(&self.send_errors));
        let _ = writeln!(o, "# HELP linkpulse_probe_bad_packets_total Packets on a probe socket or port that were dropped.\n# TYPE linkpulse_probe_bad_packets_total counter");
        for (b, v) in Bad::ALL.iter().zip(self.bad.iter()) {
            let _ = writeln!(
                o,
                "linkpulse_probe_bad_packets_total{{reason=\"{}\"}} {}",
                b.label(),
                r(v)
            );
        }
        let _ = writeln!(
            o,
            "linkpulse_probe_bad_packets_total{{reason=\"kernel_short\"}} {}",
            r(&self.kernel_short)
        );
        let _ = writeln!(o, "# HELP linkpulse_probe_ring_full_total Probe stamps lost because the kernel's probe ring was full (those probes give no RTT sample).\n# TYPE linkpulse_probe_ring_full_total counter\nlinkpulse_probe_ring_full_total {}", r(&self.ring_full));
        let _ = writeln!(o, "# HELP linkpulse_probe_rollup_dropped_total Probe samples and outcomes the rollups' queue could not take (their windows miss them).\n# TYPE linkpulse_probe_rollup_dropped_total counter\nlinkpulse_probe_rollup_dropped_total {}", r(&self.persist_dropped));
        let _ = writeln!(o, "# HELP linkpulse_probe_frame_dropped_total Probe samples and sent probes the frames' queue (lp-ingest) could not take (those frames miss them).\n# TYPE linkpulse_probe_frame_dropped_total counter\nlinkpulse_probe_frame_dropped_total {}", r(&self.grid_dropped));
    }
}
