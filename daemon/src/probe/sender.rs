//! The `lp-probe` thread: one STAMP Session-Sender socket per probed link (bound to the modem
//! with SO_BINDTODEVICE, connected to the reflector), sends on a deadline schedule (ppoll on
//! the sockets and the kernel's probe ring, timed out at the next send deadline, so replies
//! are processed as they arrive), drains the kernel's probe stamps
//! (T1/T4) and the replies, settles losses, and once a second publishes figures, judges link
//! health and adapts the rate.
//!
//! Hot path (each tick): no allocation, no lock. A tick is *missed* when the thread wakes more
//! than one period after it: it is skipped (no burst to catch up) and counted.
use std::{
    ffi::CString,
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use linkpulse_common::{
    probe::{ProbeConf, ProbeRecord, PROBE_STAT_RING_FULL, PROBE_STAT_SHORT},
    DIR_EGRESS, MAX_LINKS,
};

use super::{
    config::{budget_rate_hz, LinkProbeConfig, ProbeConfig},
    health::{Health, Judge, RateControl, SecondView, Thresholds},
    session::{ReplyOutcome, Sample, Session},
};
use crate::{
    clock::{self, ClockState},
    kernel::ProbeMaps,
    shared::Shared,
    stamp::{ErrorEstimate, SenderFields, Timestamp, TimestampFormat},
};

const NS: u64 = 1_000_000_000;
/// Longest sleep between housekeeping passes (timeouts, replies at low rates).
const MAX_SLEEP_NS: u64 = 10_000_000;

/// A link to probe: its index in the link table, interface and settings.
#[derive(Debug, Clone)]
pub struct LinkSetup {
    pub index: usize,
    pub interface: String,
    pub cfg: LinkProbeConfig,
}

struct Link {
    index: usize,
    interface: String,
    cfg: LinkProbeConfig,
    sock: Option<UdpSocket>,
    session: Session,
    rate: RateControl,
    judge: Judge,
    period_ns: u64,
    next_at: u64,
    started_mono: u64,
    last_reply_mono: Option<u64>,
    // This second's samples.
    sec_n: u64,
    sec_sum: u64,
    sec_min: u64,
    sec_max: u64,
    /// This second's longest time from a reply's kernel stamp T4 to its sample being ready.
    sec_ready_max: u64,
    /// This second's one-way delays (samples with both clocks synchronised).
    sec_owd_n: u64,
    sec_owd_up_sum: i64,
    sec_owd_down_sum: i64,
    sec_owd_error_max: u64,
    sec_sent_base: u64,
    prev_lost: u64,
    prev_replies: u64,
    last_open_error: Option<String>,
}

impl Link {
    fn lost_total(&self) -> u64 {
        let c = &self.session.counters;
        c.lost_up + c.lost_down + c.lost_unattributed + self.session.lost_pending()
    }
}

fn period_of(rate_hz: f64) -> u64 {
    ((NS as f64) / rate_hz.max(1e-3)) as u64
}

/// Opens the link's sender socket: bound to the modem, connected to the reflector.
fn open(interface: &str, reflector: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if reflector.is_ipv4() {
        "0.0.0.0:0".parse().map_err(io::Error::other)?
    } else {
        "[::]:0".parse().map_err(io::Error::other)?
    };
    let s = UdpSocket::bind(any)?;
    let name = CString::new(interface).map_err(io::Error::other)?;
    // SAFETY: valid fd, a NUL-terminated name and its length (including the NUL).
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.as_bytes_with_nul().len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    s.connect(reflector)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// The probe thread's state.
pub struct Sender {
    links: Vec<Link>,
    /// Link-table index → position in `links`.
    by_index: [Option<u8>; MAX_LINKS],
    pcfg: ProbeConfig,
    maps: ProbeMaps,
    shared: Arc<Shared>,
    feeds: Feeds,
    error_estimate: ErrorEstimate,
    buf: [u8; 2048],
}

/// Where each sample goes (apart from the links' own per-second figures): a field of its own
/// so that [`Feeds::record`] can run while a link of `Sender::links` is borrowed.
struct Feeds {
    tap: Option<rtrb::Producer<Sample>>,
    persist_tap: Option<rtrb::Producer<super::ProbeEvent>>,
    /// The frames' feed (`lp-ingest`): samples by T4, sent probes by T1.
    grid: Option<rtrb::Producer<super::GridEvent>>,
    /// Our clock as adjtimex said at the last second (one-way delays need it synchronised).
    local_clock: ClockState,
}

impl Sender {
    pub fn new(
        setups: Vec<LinkSetup>,
        pcfg: ProbeConfig,
        maps: ProbeMaps,
        shared: Arc<Shared>,
    ) -> Sender {
        let now = clock::monotonic_ns();
        let mut by_index = [None; MAX_LINKS];
        let links: Vec<Link> = setups
            .into_iter()
            .filter(|s| s.index < MAX_LINKS)
            .take(u8::MAX as usize)
            .enumerate()
            .map(|(k, s)| {
                by_index[s.index] = Some(k as u8);
                let rate =
                    RateControl::new(s.cfg.min_rate_hz, s.cfg.max_rate_hz, budget_rate_hz(&s.cfg));
                let cap = Session::capacity_for(s.cfg.max_rate_hz, pcfg.loss_timeout_ns);
                Link {
                    index: s.index,
                    interface: s.interface,
                    session: Session::new(s.index as u16, cap),
                    period_ns: period_of(rate.rate_hz),
                    rate,
                    judge: Judge::default(),
                    cfg: s.cfg,
                    sock: None,
                    next_at: now,
                    started_mono: now,
                    last_reply_mono: None,
                    sec_n: 0,
                    sec_sum: 0,
                    sec_owd_n: 0,
                    sec_owd_up_sum: 0,
                    sec_owd_down_sum: 0,
                    sec_owd_error_max: 0,
                    sec_min: u64::MAX,
                    sec_max: 0,
                    sec_ready_max: 0,
                    sec_sent_base: 0,
                    prev_lost: 0,
                    prev_replies: 0,
                    last_open_error: None,
                }
            })
            .collect();
        for l in &links {
            shared.probe.links[l.index]
                .probed
                .store(1, Ordering::Relaxed);
        }
        // The rollups' feed is there from the start (see Daemon::start).
        let persist_tap = shared.probe.take_persist_tap();
        Sender {
            links,
            by_index,
            pcfg,
            maps,
            shared,
            feeds: Feeds {
                tap: None,
                persist_tap,
                grid: None,
                local_clock: ClockState::default(),
            },
            error_estimate: ErrorEstimate::from_error_ns(false, TimestampFormat::Ntp, 0),
            buf: [0; 2048],
        }
    }

    /// Feeds each sample and each sent probe to the frames (`lp-ingest`) through `p`.
    pub fn with_grid(mut self, p: rtrb::Producer<super::GridEvent>) -> Self {
        self.feeds.grid = Some(p);
        self
    }

    /// Runs until `stop`.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        // 1 ns timer slack: absolute deadlines are kept to the µs, not to the default 50 µs.
        // SAFETY: prctl on the calling thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
        let mut next_second = clock::monotonic_ns();
        while !stop.load(Ordering::Relaxed) {
            let now = clock::monotonic_ns();
            if now >= next_second {
                self.each_second(now);
                next_second = now + NS;
            }
            self.send_due(now);
            self.drain();
            let now = clock::monotonic_ns();
            let mut wake = (now + MAX_SLEEP_NS).min(next_second);
            let (tap, ps) = (&mut self.feeds.persist_tap, &self.shared.probe);
            for l in &mut self.links {
                // Each settled probe (and a lost one's direction) to the rollups.
                l.session
                    .expire_with(now, self.pcfg.loss_timeout_ns, &mut |o| {
                        if let Some(t) = tap.as_mut() {
                            if t.push(super::ProbeEvent::Outcome(o)).is_err() {
                                ps.persist_dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                if l.sock.is_some() {
                    wake = wake.min(l.next_at);
                }
            }
            if wake > now {
                self.wait_until_mono(wake);
            }
        }
        for l in &self.links {
            let _ = self.maps.conf.set(l.index as u32, ProbeConf::default(), 0);
            publish_counters(&self.shared.probe.links[l.index], &l.session.counters);
        }
    }

    /// Sleeps until `t` (CLOCK_MONOTONIC) or until a reply arrives, so a sample is complete
    /// (and fed to the frames) as its reply arrives, not at the next send tick. The kernel
    /// submits probe stamps without wake-up (its T4 is in the ring before the reply reaches
    /// the socket); the ring is polled only so stamps already waiting end the wait. The
    /// descriptors live on the stack: nothing allocated per tick.
    fn wait_until_mono(&self, t: u64) {
        let mut fds = [libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        }; MAX_LINKS + 1];
        fds[0] = libc::pollfd {
            fd: self.maps.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut n = 1;
        for l in &self.links {
            if let Some(s) = &l.sock {
                if n < fds.len() {
                    fds[n] = libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    n += 1;
                }
            }
        }
        let now = clock::monotonic_ns();
        if t <= now {
            return;
        }
        let d = t - now;
        let ts = libc::timespec {
            tv_sec: (d / NS) as libc::time_t,
            tv_nsec: (d % NS) as libc::c_long,
        };
        // SAFETY: `n` initialised pollfds, a valid timespec, no signal mask change. An
        // interruption or an error just ends the wait early (the loop re-checks the time).
        let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), n as libc::nfds_t, &ts, std::ptr::null()) };
        if rc < 0 {
            // Not EINTR: a poll that cannot work (e.g. no ring fd) must not spin.
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                clock::sleep_until_monotonic_ns(t);
            }
        }
    }

    fn send_due(&mut self, now: u64) {
        let ps = &self.shared.probe;
        for l in &mut self.links {
            let Some(sock) = &l.sock else {
                continue;
            };
            if now < l.next_at {
                continue;
            }
            let late = now - l.next_at;
            if late >= l.period_ns {
                let skipped = late / l.period_ns;
                ps.missed_ticks.fetch_add(skipped, Ordering::Relaxed);
                ps.ticks.fetch_add(skipped, Ordering::Relaxed);
                l.next_at += skipped * l.period_ns;
            }
            l.next_at += l.period_ns;
            ps.ticks.fetch_add(1, Ordering::Relaxed);
            if !l.session.can_send() {
                // Cannot happen with the table sized from the rate and timeout; counted.
                ps.send_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let ts = Timestamp::from_epoch_ns(TimestampFormat::Ntp, clock::realtime_ns());
            let f = SenderFields {
                seq: l.session.next_seq(),
                timestamp: ts,
                error_estimate: self.error_estimate,
                ssid: 0,
            };
            let mut pkt = [0u8; crate::stamp::wire::SENDER_LEN];
            if f.encode(&mut pkt, crate::stamp::wire::SENDER_LEN).is_err() {
                continue;
            }
            match sock.send(&pkt) {
                Ok(_) => l.session.on_sent(now, ts),
                Err(e) => {
                    ps.send_errors.fetch_add(1, Ordering::Relaxed);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::debug!(link = %l.interface, error = %e, "probe send failed");
                    }
                }
            }
        }
    }

    /// Kernel stamps first, then replies (a stamp may still follow its reply: sessions accept
    /// the pieces in any order).
    fn drain(&mut self) {
        while let Some(item) = self.maps.ring.next() {
            if item.len() < std::mem::size_of::<ProbeRecord>() {
                continue;
            }
            // SAFETY: length checked; plain integers, any bit pattern is valid.
            let rec: ProbeRecord = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            let Some(Some(k)) = self.by_index.get(rec.link as usize) else {
                continue;
            };
            let l = &mut self.links[*k as usize];
            let s = if rec.dir == DIR_EGRESS {
                if let Some(g) = self.feeds.grid.as_mut() {
                    let e = super::GridEvent::Sent {
                        link: rec.link as u16,
                        t1_tai_ns: rec.t_ns,
                    };
                    if g.push(e).is_err() {
                        self.shared
                            .probe
                            .grid_dropped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                l.session.on_t1(rec.sender_seq, rec.t_ns)
            } else {
                l.session.on_t4(rec.sender_seq, rec.refl_seq, rec.t_ns)
            };
            if let Some(s) = s {
                self.feeds.record(&self.shared, l, s);
            }
        }
        let now = clock::monotonic_ns();
        for l in &mut self.links {
            // Taken out for the loop (the session and the link are updated inside).
            let Some(sock) = l.sock.take() else { continue };
            loop {
                let n = match sock.recv(&mut self.buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // ICMP errors (port unreachable) surface here once on a connected socket.
                    Err(_) => break,
                };
                match l.session.on_reply(&self.buf[..n]) {
                    Ok(ReplyOutcome::Accepted(s)) => {
                        l.last_reply_mono = Some(now);
                        if let Some(s) = s {
                            self.feeds.record(&self.shared, l, s);
                        }
                    }
                    Ok(_) => {}
                    Err(b) => {
                        let i = super::Bad::ALL.iter().position(|x| *x == b).unwrap_or(0);
                        self.shared.probe.bad[i].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            l.sock = Some(sock);
        }
    }

    fn each_second(&mut self, now: u64) {
        if let Some(t) = self.shared.probe.take_tap() {
            self.feeds.tap = Some(t);
        }
        if let Some(t) = self.shared.probe.take_persist_tap() {
            self.feeds.persist_tap = Some(t);
        }
        let c = self.shared.clock();
        self.feeds.local_clock = c;
        self.error_estimate = ErrorEstimate::from_error_ns(
            c.synced,
            TimestampFormat::Ntp,
            (c.max_error_us.max(0) as u64) * 1000,
        );
        let read_stat = |i: u32| -> u64 {
            self.maps
                .stats
                .get(&i, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        let ps = &self.shared.probe;
        ps.ring_full
            .store(read_stat(PROBE_STAT_RING_FULL), Ordering::Relaxed);
        ps.kernel_short
            .store(read_stat(PROBE_STAT_SHORT), Ordering::Relaxed);
        let t = Thresholds {
            degraded_loss_pct: self.pcfg.degraded_loss_pct,
            degraded_rtt_ns: self.pcfg.degraded_rtt_ns,
            down_after_ns: self.pcfg.down_after_ns,
            recover_s: self.pcfg.recover_s,
        };
        for l in &mut self.links {
            if l.sock.is_none() {
                match open(&l.interface, l.cfg.reflector) {
                    Ok(s) => {
                        let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
                        let conf = ProbeConf {
                            sender_port: port,
                            reflector_port: l.cfg.reflector.port(),
                            _pad: 0,
                        };
                        if let Err(e) = self.maps.conf.set(l.index as u32, conf, 0) {
                            tracing::warn!(link = %l.interface, error = %e, "probe match table write failed: probes will give no RTT samples");
                        }
                        tracing::info!(link = %l.interface, reflector = %l.cfg.reflector, port, "probing");
                        ps.links[l.index]
                            .sender_port
                            .store(port as u64, Ordering::Relaxed);
                        l.sock = Some(s);
                        l.next_at = now;
                        l.last_open_error = None;
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if l.last_open_error.as_deref() != Some(msg.as_str()) {
                            tracing::warn!(link = %l.interface, error = %msg, "cannot open the probe socket (is the interface there?); retrying every second");
                            l.last_open_error = Some(msg);
                        }
                    }
                }
            }
            let lp = &ps.links[l.index];
            let sc = l.session.counters;
            let lost = l.lost_total();
            let view = SecondView {
                settled: (sc.replies - l.prev_replies) + (lost - l.prev_lost),
                lost: lost - l.prev_lost,
                mean_rtt_ns: l.sec_sum.checked_div(l.sec_n),
                silent_ns: now - l.last_reply_mono.unwrap_or(l.started_mono),
            };
            l.prev_replies = sc.replies;
            l.prev_lost = lost;
            lp.rtt_second_samples.store(l.sec_n, Ordering::Relaxed);
            if let Some(mean) = view.mean_rtt_ns {
                lp.rtt_min_ns.store(l.sec_min, Ordering::Relaxed);
                lp.rtt_max_ns.store(l.sec_max, Ordering::Relaxed);
                lp.rtt_mean_ns.store(mean, Ordering::Relaxed);
            }
            lp.sample_ready_max_ns
                .store(l.sec_ready_max, Ordering::Relaxed);
            (l.sec_n, l.sec_sum, l.sec_min, l.sec_max) = (0, 0, u64::MAX, 0);
            lp.owd_second_samples.store(l.sec_owd_n, Ordering::Relaxed);
            if l.sec_owd_n > 0 {
                let n = l.sec_owd_n as i64;
                lp.owd_up_mean_ns
                    .store(l.sec_owd_up_sum / n, Ordering::Relaxed);
                lp.owd_down_mean_ns
                    .store(l.sec_owd_down_sum / n, Ordering::Relaxed);
                lp.owd_error_ns
                    .store(l.sec_owd_error_max, Ordering::Relaxed);
            }
            (l.sec_owd_n, l.sec_owd_up_sum, l.sec_owd_down_sum) = (0, 0, 0);
            l.sec_owd_error_max = 0;
            l.sec_ready_max = 0;
            let changed = l.judge.step(&t, &view);
            if let Some(h) = changed {
                let at = clock::realtime_ns() as i64;
                lp.state.store(h as u8, Ordering::Relaxed);
                lp.state_since_utc_ns.store(at, Ordering::Relaxed);
                let msg = format!(
                    "link {} is {} (loss {}/{} in the last second, mean RTT {}, no reply for {} ms)",
                    l.interface,
                    h.as_str(),
                    view.lost,
                    view.settled,
                    view.mean_rtt_ns
                        .map_or("-".to_string(), |m| format!("{:.3} ms", m as f64 / 1e6)),
                    view.silent_ns / 1_000_000
                );
                if h == Health::Up {
                    tracing::info!(link = %l.interface, state = h.as_str(), "{msg}");
                } else {
                    tracing::warn!(link = %l.interface, state = h.as_str(), "{msg}");
                }
                self.shared.event("link_state", Some(&l.interface), msg);
            }
            let sent_sec = sc.sent - l.sec_sent_base;
            l.sec_sent_base = sc.sent;
            let rate = l.rate.update(sent_sec, &view, changed.is_some());
            l.period_ns = period_of(rate);
            lp.rate_mhz.store((rate * 1000.0) as u64, Ordering::Relaxed);
            publish_counters(lp, &sc);
        }
    }
}

impl Feeds {
    /// One sample: into the link's per-second figures and to every feed.
    fn record(&mut self, shared: &Shared, l: &mut Link, s: Sample) {
        let owd = super::oneway::one_way(&s, &self.local_clock);
        if let Some(o) = owd {
            l.sec_owd_n += 1;
            l.sec_owd_up_sum = l.sec_owd_up_sum.saturating_add(o.up_ns);
            l.sec_owd_down_sum = l.sec_owd_down_sum.saturating_add(o.down_ns);
            l.sec_owd_error_max = l.sec_owd_error_max.max(o.error_ns);
        }
        l.sec_n += 1;
        l.sec_sum += s.rtt_ns;
        l.sec_min = l.sec_min.min(s.rtt_ns);
        l.sec_max = l.sec_max.max(s.rtt_ns);
        // T4 is CLOCK_TAI: how long the sample took to reach the frames' feed.
        l.sec_ready_max = l
            .sec_ready_max
            .max(clock::tai_ns().saturating_sub(s.t4_tai_ns));
        // A slow listener loses samples, the prober never waits.
        if let Some(t) = self.tap.as_mut() {
            let _ = t.push(s);
        }
        if let Some(t) = self.persist_tap.as_mut() {
            if t.push(super::ProbeEvent::Sample(s)).is_err() {
                shared.probe.persist_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(g) = self.grid.as_mut() {
            let e = super::GridEvent::Sample {
                link: s.link,
                t4_tai_ns: s.t4_tai_ns,
                rtt_ns: s.rtt_ns,
                owd,
            };
            if g.push(e).is_err() {
                shared.probe.grid_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn publish_counters(lp: &super::LinkProbeCounters, sc: &super::session::SessionCounters) {
    lp.sent.store(sc.sent, Ordering::Relaxed);
    lp.replies.store(sc.replies, Ordering::Relaxed);
    lp.samples.store(sc.samples, Ordering::Relaxed);
    lp.lost_up.store(sc.lost_up, Ordering::Relaxed);
    lp.lost_down.store(sc.lost_down, Ordering::Relaxed);
    lp.lost_unattributed
        .store(sc.lost_unattributed, Ordering::Relaxed);
    lp.duplicates.store(sc.duplicates, Ordering::Relaxed);
    lp.reordered.store(sc.reordered, Ordering::Relaxed);
    lp.late.store(sc.late, Ordering::Relaxed);
    lp.settled_through
        .store(sc.settled_through, Ordering::Relaxed);
}

/// The links of `cfg` that are probed, with their link-table index (position in the config,
/// as `LinkManager` numbers them at start).
pub fn setups(cfg: &crate::Config) -> Vec<LinkSetup> {
    cfg.links
        .iter()
        .enumerate()
        .filter_map(|(index, l)| {
            l.probe.clone().map(|c| LinkSetup {
                index,
                interface: l.interface.clone(),
                cfg: c,
            })
        })
        .collect()
}
