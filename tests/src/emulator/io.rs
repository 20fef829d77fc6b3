//! The emulator's I/O: one thread per modem per direction, reading packets from one side,
//! running them through a [`LinkEngine`] and writing them to the other side at their departure.
//!
//! The thread sleeps in ppoll() on its input fd, a stop eventfd and a timerfd armed shortly
//! before the next departure (absolute CLOCK_REALTIME, no timer slack), then a short ppoll()
//! timeout to the departure itself; it never spins. Reads are drained in batches so a burst
//! costs one wakeup.
//!
//! **Boundary guard** (downlink, toward the router, `guard_ns` > 0): the engine already moves
//! every departure that falls in the last `guard_ns` before a whole UTC second to that second's
//! start; the thread checks the clock again right before each write, because it may wake late,
//! and holds the packet until the second starts if the write would begin inside the guard. So
//! every delivery toward the router *starts* at least `guard_ns` before the end of its second,
//! and the router's ingress stamp and the truth's `t_out` (read right after the write, which
//! takes a few µs; the record keeps that duration in `write_ns`) fall in the same second.
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::engine::{guard_release, Admission, EngineStats, LinkEngine};
use super::EmulatorError;
use crate::sys::{self, EventFd, PacketMeta};
use crate::truth::{
    Dir, TcpFacts, TruthRecord, TruthWriter, Verdict, FLAG_GUARD_HELD, FLAG_KERNEL_RX_STAMP,
};

/// Truth records go to the writer thread (and so to the file) at least this often.
pub const TRUTH_FLUSH_NS: u64 = 100_000_000;
/// A kernel rx stamp further than this from the clock is not trusted (a foreign clock base).
const STAMP_SANITY_NS: u64 = 1_000_000_000;
/// See the two-phase wait in the main loop.
const EARLY_WAKE_NS: u64 = 200_000;
/// Max packets read per wakeup before serving departures again.
const READ_BATCH: usize = 256;
/// Buffers kept for reuse (saves an allocation per packet at high rates).
const POOL_MAX: usize = 4096;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Where a direction reads from.
#[derive(Debug)]
pub enum RxPort {
    /// A TUN fd (raw IP), possibly shared with the opposite direction's [`TxPort::Tun`].
    Tun(Arc<OwnedFd>),
    /// An AF_PACKET receiver from [`sys::packet_rx_socket`] (veth peer in the carrier ns).
    Packet(OwnedFd),
}

/// Where a direction writes to.
#[derive(Debug)]
pub enum TxPort {
    Tun(Arc<OwnedFd>),
    /// AF_PACKET sender; frames go out of `ifindex` to `dst_mac` (the router's veth end).
    Packet {
        fd: OwnedFd,
        ifindex: u32,
        dst_mac: [u8; 6],
    },
}

impl RxPort {
    fn raw(&self) -> RawFd {
        match self {
            RxPort::Tun(fd) => fd.as_raw_fd(),
            RxPort::Packet(fd) => fd.as_raw_fd(),
        }
    }
}

impl TxPort {
    fn send(&self, pkt: &[u8]) -> std::io::Result<()> {
        match self {
            TxPort::Tun(fd) => sys::write_packet(fd.as_raw_fd(), pkt),
            TxPort::Packet {
                fd,
                ifindex,
                dst_mac,
            } => {
                let ethertype = if pkt.first().is_some_and(|b| b >> 4 == 6) {
                    sys::ETH_P_IPV6
                } else {
                    sys::ETH_P_IP
                };
                sys::packet_send(fd.as_raw_fd(), *ifindex, ethertype, *dst_mac, pkt)
            }
        }
    }
}

/// Everything one direction's thread needs.
pub struct DirectionSpec {
    /// For logs, e.g. "wwan0 up".
    pub label: String,
    pub modem: u16,
    pub dir: Dir,
    pub rx: RxPort,
    pub tx: TxPort,
    pub engine: LinkEngine<Packet>,
    pub truth: TruthWriter,
    /// Boundary guard enforced at write time (0 = none); give the engine the same value.
    pub guard_ns: u64,
}

/// A packet in flight: its L3 bytes and the truth flags known at arrival.
#[derive(Debug)]
pub struct Packet {
    pub data: Vec<u8>,
    pub flags: u8,
}

/// What a direction did, besides the engine's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    pub engine: EngineStats,
    /// Frames that were not IPv4/IPv6 (not logged, not forwarded).
    pub ignored_non_ip: u64,
    /// Frames larger than the read buffer (not logged).
    pub truncated: u64,
    pub tx_errors: u64,
    pub rx_errors: u64,
    /// Drops the AF_PACKET socket reported (packets the truth missed!).
    pub socket_drops: u64,
    /// Reads without a usable kernel stamp (clock read instead).
    pub stamp_fallbacks: u64,
    /// Packets still queued when the thread stopped.
    pub shutdown_dropped: u64,
    /// Times the thread itself held deliveries at write time because of the guard.
    pub late_guard_holds: u64,
}

/// Environment variable: a SCHED_FIFO priority (1..=99) for the emulator threads. Off by
/// default: real-time emulator threads cut the wakeup tail under CPU contention (the TUN
/// uplink's arrival stamp is taken after the read), but they preempt whatever else runs,
/// the daemon under test included.
pub const RT_PRIORITY_ENV: &str = "LINKPULSE_TESTBED_RT_PRIORITY";

fn rt_priority() -> Option<i32> {
    let v = std::env::var(RT_PRIORITY_ENV).ok()?;
    match v.trim().parse::<i32>() {
        Ok(p) if (1..=99).contains(&p) => Some(p),
        _ => {
            tracing::warn!(value = %v, "{RT_PRIORITY_ENV} must be 1..=99; ignored");
            None
        }
    }
}

/// A running direction thread.
pub struct DirectionHandle {
    label: String,
    stop: Arc<EventFd>,
    in_flight: Arc<AtomicUsize>,
    join: Option<JoinHandle<Result<DirectionStats, EmulatorError>>>,
}

impl DirectionHandle {
    pub fn spawn(spec: DirectionSpec) -> Result<DirectionHandle, EmulatorError> {
        let label = spec.label.clone();
        let stop = Arc::new(
            EventFd::new().map_err(|e| EmulatorError::io(format!("{label}: eventfd"), e))?,
        );
        let stop2 = stop.clone();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let in_flight2 = in_flight.clone();
        let join = std::thread::Builder::new()
            .name(format!("emu {label}"))
            .spawn(move || run(spec, &stop2, in_flight2))
            .map_err(|e| EmulatorError::io(format!("{label}: spawn thread"), e))?;
        Ok(DirectionHandle {
            label,
            stop,
            in_flight,
            join: Some(join),
        })
    }

    /// Packets admitted and not yet delivered (as of the thread's last loop).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Is the thread still running (it ends only on stop or on an I/O error)?
    pub fn is_running(&self) -> bool {
        self.join.as_ref().is_some_and(|j| !j.is_finished())
    }

    /// Stops the thread: packets still in flight are logged as `dropped_shutdown`, the truth
    /// file is flushed.
    pub fn stop(mut self) -> Result<DirectionStats, EmulatorError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<DirectionStats, EmulatorError> {
        let Some(join) = self.join.take() else {
            return Ok(DirectionStats::default());
        };
        if let Err(e) = self.stop.signal() {
            // Without the wakeup the thread would never notice; nothing else to try.
            tracing::error!(label = %self.label, error = %e, "cannot signal emulator thread");
        }
        join.join()
            .map_err(|_| EmulatorError::Panicked(self.label.clone()))?
    }
}

impl Drop for DirectionHandle {
    fn drop(&mut self) {
        if self.join.is_some() {
            if let Err(e) = self.stop_inner() {
                tracing::error!(label = %self.label, error = %e, "emulator thread ended with an error");
            }
        }
    }
}

struct State {
    spec: DirectionSpec,
    stats: DirectionStats,
    pool: Vec<Vec<u8>>,
    consecutive_rx_errors: u32,
    /// The last second start the thread held deliveries for (write-time guard).
    hold_release: u64,
    /// Published for [`DirectionHandle::in_flight`].
    in_flight: Arc<AtomicUsize>,
}

fn run(
    spec: DirectionSpec,
    stop: &EventFd,
    in_flight: Arc<AtomicUsize>,
) -> Result<DirectionStats, EmulatorError> {
    sys::set_timer_slack_ns(1);
    let label = spec.label.clone();
    if let Some(prio) = rt_priority() {
        match sys::set_fifo_priority(prio) {
            Ok(()) => tracing::debug!(%label, prio, "SCHED_FIFO"),
            Err(e) => tracing::warn!(%label, prio, error = %e, "cannot switch to SCHED_FIFO"),
        }
    }
    tracing::debug!(%label, "emulator thread started");
    let mut st = State {
        spec,
        stats: DirectionStats::default(),
        pool: Vec::new(),
        consecutive_rx_errors: 0,
        hold_release: 0,
        in_flight,
    };
    let res = st.main_loop(stop);
    // Whatever happened, account for what is still queued and get the truth on disk.
    let finish = st.finish();
    let stats = st.stats;
    match (res, finish) {
        (Err(e), _) | (Ok(()), Err(e)) => {
            tracing::error!(%label, error = %e, "emulator thread failed");
            Err(e)
        }
        (Ok(()), Ok(())) => {
            tracing::debug!(%label, ?stats, "emulator thread stopped");
            Ok(stats)
        }
    }
}

impl State {
    fn main_loop(&mut self, stop: &EventFd) -> Result<(), EmulatorError> {
        let mut buf = vec![0u8; 65_536];
        let rx_fd = self.spec.rx.raw();
        let mut timer = sys::TimerFd::new()
            .map_err(|e| EmulatorError::io(format!("{}: timerfd", self.spec.label), e))?;
        let mut next_stats_ns = sys::realtime_ns() + NS_PER_SEC;
        loop {
            let mut wake = self.deliver_due()?;
            self.in_flight
                .store(self.spec.engine.in_flight(), Ordering::Relaxed);
            let now = sys::realtime_ns();
            self.spec.truth.maybe_flush(now, TRUTH_FLUSH_NS)?;
            if let Some(f) = self.spec.truth.flush_due_ns(TRUTH_FLUSH_NS) {
                wake = Some(wake.map_or(f, |w| w.min(f)));
            }
            if now >= next_stats_ns {
                self.poll_socket_stats();
                next_stats_ns = now + NS_PER_SEC;
            }
            // Two-phase wait: a long sleep ends EARLY_WAKE_NS before the deadline on the
            // timerfd, the rest is a short ppoll() timeout. Waking a long-idle CPU (a VM's
            // especially) takes tens of µs more than ending a short sleep, and a ppoll timeout
            // this short gets almost no slack (0.1%).
            let now = sys::realtime_ns();
            let (timer_at, timeout) = match wake {
                Some(w) if w > now + 2 * EARLY_WAKE_NS => (Some(w - EARLY_WAKE_NS), None),
                Some(w) => (None, Some(w.saturating_sub(now))),
                None => (None, None),
            };
            timer.set(timer_at).map_err(|e| {
                EmulatorError::io(format!("{}: timerfd_settime", self.spec.label), e)
            })?;
            let [readable, stopped, fired] =
                sys::poll_readable([rx_fd, stop.raw(), timer.raw()], timeout)
                    .map_err(|e| EmulatorError::io(format!("{}: ppoll", self.spec.label), e))?;
            if stopped {
                return Ok(());
            }
            if fired {
                timer.clear();
            }
            if readable {
                self.read_batch(&mut buf)?;
                self.in_flight
                    .store(self.spec.engine.in_flight(), Ordering::Relaxed);
            }
        }
    }

    /// Writes every packet due now; returns when the next one is due.
    fn deliver_due(&mut self) -> Result<Option<u64>, EmulatorError> {
        loop {
            let Some(next) = self.spec.engine.next_departure() else {
                return Ok(None);
            };
            let before = sys::realtime_ns();
            if next > before {
                return Ok(Some(next));
            }
            // Second check of the guard, at the moment the write would start (see module docs).
            if self.spec.guard_ns > 0 {
                let release = guard_release(before, self.spec.guard_ns);
                if release != before {
                    if self.hold_release != release {
                        self.stats.late_guard_holds += 1;
                        self.hold_release = release;
                    }
                    return Ok(Some(release));
                }
            }
            let Some(d) = self.spec.engine.pop_due(before) else {
                return Ok(Some(next));
            };
            // Due before a release we waited for: this packet was held at write time.
            let late_hold = d.depart_ns < self.hold_release && before >= self.hold_release;
            let sent = self.spec.tx.send(&d.payload.data);
            let after = sys::realtime_ns();
            let (verdict, t_out, write_ns) = match sent {
                Ok(()) => (
                    Verdict::Delivered,
                    after,
                    u32::try_from(after.saturating_sub(before)).unwrap_or(u32::MAX),
                ),
                Err(e) => {
                    self.stats.tx_errors += 1;
                    if self.stats.tx_errors <= 5 {
                        tracing::warn!(label = %self.spec.label, error = %e, "write toward destination failed");
                    }
                    (Verdict::TxError, 0, 0)
                }
            };
            let mut flags = d.payload.flags;
            if d.held_by_guard || late_hold {
                flags |= FLAG_GUARD_HELD;
            }
            self.log(
                d.t_in_ns,
                t_out,
                write_ns,
                verdict,
                &d.payload.data,
                d.size,
                flags,
            )?;
            self.recycle(d.payload.data);
        }
    }

    fn read_batch(&mut self, buf: &mut [u8]) -> Result<(), EmulatorError> {
        for _ in 0..READ_BATCH {
            let got = match &self.spec.rx {
                RxPort::Tun(fd) => match sys::read_nonblocking(fd.as_raw_fd(), buf) {
                    Ok(Some(n)) => Ok(Some((n, sys::realtime_ns(), 0u8))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                },
                RxPort::Packet(fd) => match sys::packet_recv(fd.as_raw_fd(), buf) {
                    Ok(Some(meta)) => Ok(self.accept_packet_meta(meta)),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                },
            };
            let (n, t_in, flags) = match got {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    // E.g. ENETDOWN while an interface flaps: reported once per event by the
                    // kernel, so keep going, but do not spin on a permanently broken fd.
                    self.stats.rx_errors += 1;
                    self.consecutive_rx_errors += 1;
                    if self.consecutive_rx_errors > 1000 {
                        return Err(EmulatorError::io(
                            format!("{}: read keeps failing", self.spec.label),
                            e,
                        ));
                    }
                    if self.stats.rx_errors <= 5 {
                        tracing::warn!(label = %self.spec.label, error = %e, "read failed");
                    }
                    break;
                }
            };
            self.consecutive_rx_errors = 0;
            if n == 0 {
                // Skipped frame (outgoing, non-IP, truncated): already counted.
                continue;
            }
            let Some((len, _, _)) = sys::ip_info(&buf[..n]) else {
                self.stats.ignored_non_ip += 1;
                continue;
            };
            let mut data = self.pool.pop().unwrap_or_default();
            data.clear();
            data.extend_from_slice(&buf[..len]);
            let size = len as u32;
            match self.spec.engine.arrive(t_in, size, Packet { data, flags }) {
                Admission::Scheduled { .. } => {}
                Admission::Dropped { verdict, payload } => {
                    self.log(t_in, 0, 0, verdict, &payload.data, size, payload.flags)?;
                    self.recycle(payload.data);
                }
            }
        }
        Ok(())
    }

    /// Filters an AF_PACKET read; `Some((0, ..))` = skip this frame, go on reading.
    fn accept_packet_meta(&mut self, meta: PacketMeta) -> Option<(usize, u64, u8)> {
        let now = sys::realtime_ns();
        if meta.outgoing {
            return Some((0, now, 0));
        }
        if meta.protocol != sys::ETH_P_IP && meta.protocol != sys::ETH_P_IPV6 {
            self.stats.ignored_non_ip += 1;
            return Some((0, now, 0));
        }
        if meta.truncated {
            self.stats.truncated += 1;
            tracing::warn!(label = %self.spec.label, len = meta.len, "truncated frame ignored");
            return Some((0, now, 0));
        }
        match meta.ts_ns {
            Some(ts) if ts.abs_diff(now) < STAMP_SANITY_NS => {
                Some((meta.len, ts, FLAG_KERNEL_RX_STAMP))
            }
            _ => {
                self.stats.stamp_fallbacks += 1;
                Some((meta.len, now, 0))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn log(
        &mut self,
        t_in_ns: u64,
        t_out_ns: u64,
        write_ns: u32,
        verdict: Verdict,
        data: &[u8],
        size: u32,
        flags: u8,
    ) -> Result<(), EmulatorError> {
        let (ip_version, ip_proto) = sys::ip_info(data).map_or((0, 0), |(_, v, p)| (v, p));
        self.spec.truth.write(&TruthRecord {
            t_in_ns,
            t_out_ns,
            modem: self.spec.modem,
            dir: self.spec.dir,
            verdict,
            size,
            write_ns,
            ip_version,
            ip_proto,
            flags,
            tcp: if ip_proto == 6 {
                TcpFacts::of_packet(data)
            } else {
                None
            },
        })?;
        Ok(())
    }

    fn recycle(&mut self, data: Vec<u8>) {
        if self.pool.len() < POOL_MAX {
            self.pool.push(data);
        }
    }

    fn poll_socket_stats(&mut self) {
        if let RxPort::Packet(fd) = &self.spec.rx {
            match sys::packet_stats(fd.as_raw_fd()) {
                Ok((_, drops)) if drops > 0 => {
                    self.stats.socket_drops += u64::from(drops);
                    tracing::warn!(
                        label = %self.spec.label, drops,
                        "AF_PACKET socket dropped packets: the truth misses them"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(label = %self.spec.label, error = %e, "PACKET_STATISTICS")
                }
            }
        }
    }

    fn finish(&mut self) -> Result<(), EmulatorError> {
        self.poll_socket_stats();
        let left: Vec<_> = self.spec.engine.drain().collect();
        for d in left {
            self.stats.shutdown_dropped += 1;
            self.log(
                d.t_in_ns,
                0,
                0,
                Verdict::DroppedShutdown,
                &d.payload.data,
                d.size,
                d.payload.flags,
            )?;
        }
        self.stats.engine = self.spec.engine.stats();
        self.spec.truth.flush()?;
        Ok(())
    }
}
