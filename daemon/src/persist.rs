//! Rollups into the local store: a consumer of the aligned frames builds the windows
//! (`rollup`) and writes one batch per window into the Tarantool the daemon supervises. The
//! store starts on its own thread, so a slow or missing Tarantool never holds up frames: until
//! it is ready (or while it fails) the rollups wait in a bounded queue; beyond it the oldest
//! are dropped, counted and their range recorded as an event — nothing is lost silently, and
//! the live consumers go on whatever the store does.
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use linkpulse_common::MAX_LINKS;
use linkpulse_sink::store::{LocalConfig, Rollup, Store};

use crate::{
    clock,
    config::StoreConfig,
    frame::FLAG_CLOCK_STEP,
    rollup::RollupBuilder,
    rollup_probe::{ProbeWindows, SAMPLES_PER_SLOT},
    shared::Shared,
};

/// Rollups kept in memory while the store is not available: 2 minutes of 16 links at 500 ms.
const MAX_PENDING: usize = 16 * 2 * 120;
/// Probe samples and outcomes queued for `lp-persist` (it drains every 20 ms: two per probe,
/// 16 links at 10 kHz fill ~6 400 of them in that time).
pub const PROBE_EVENTS: usize = 1 << 14;
/// Bins the frame queue holds: 200 ms, ten times the 20 ms between reads, so a window's
/// percentiles (computed between two reads) or a late wake-up lose nothing; still 100 ms if a
/// reload doubles the links.
pub const QUEUE_NS: u64 = 200_000_000;
/// Rows per put (one transaction, one WAL write).
const BATCH: usize = 500;

/// Counters of the store path (in Shared for /metrics).
#[derive(Default)]
pub struct StoreCounters {
    /// 1 while the store answers.
    pub up: AtomicBool,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub pending: AtomicU64,
    pub errors: AtomicU64,
    /// True while a put is in flight (chaos tests time their kills on it).
    pub put_in_flight: AtomicBool,
}

pub fn run(
    cfg: StoreConfig,
    mut rx: crate::frame_queue::FrameConsumer,
    mut samples: rtrb::Consumer<crate::probe::ProbeEvent>,
    shared: Arc<Shared>,
    bin_ns: u64,
    loss_timeout_ns: Option<u64>,
    stop: Arc<AtomicBool>,
) {
    let mut builder = RollupBuilder::new(cfg.window_ns, bin_ns, clock::realtime_ns());
    // Probes (RTT, sent, lost) per window of their send time: windows wait for the loss
    // timeout (held).
    let mut probes = ProbeWindows::new(cfg.window_ns, loss_timeout_ns, SAMPLES_PER_SLOT);
    let mut held: VecDeque<Rollup> = VecDeque::with_capacity(1024);
    // UTC − TAI and the newest bin's UTC start, from the frames.
    let (mut tai_to_utc, mut now_utc) = (None, i64::MIN);
    let mut pending: VecDeque<Rollup> = VecDeque::with_capacity(1024);
    // Batches go to the writer thread: a put that waits (Tarantool restarting, a slow disk)
    // never stops this thread from draining its frame queue, which holds only 200 ms.
    let (batch_tx, batch_rx) = crossbeam_channel::bounded::<Vec<Rollup>>(2);
    let writer = {
        let (stop, shared) = (Arc::clone(&stop), Arc::clone(&shared));
        std::thread::Builder::new()
            .name("lp-store".into())
            .spawn(move || write_loop(cfg.data_dir, cfg.external, batch_rx, shared, stop))
    };
    if let Err(e) = &writer {
        tracing::error!(error = %e, "cannot start the store thread");
    }
    let c = &shared.store;
    while !stop.load(Ordering::Relaxed) {
        let mut any = false;
        while let Ok(f) = rx.pop() {
            any = true;
            if f.flags & FLAG_CLOCK_STEP != 0 {
                // A new clock epoch: windows after the step never replace earlier ones.
                builder.set_boot_tag(clock::realtime_ns());
                // Held windows would wait for the old time scale: write them now.
                drain_samples(&mut samples, &mut probes, tai_to_utc, &shared);
                release(&mut held, &mut probes, &mut pending, i64::MAX);
            }
            tai_to_utc = Some(f.bin_start_utc_ns - f.bin_start_tai_ns as i64);
            now_utc = f.bin_start_utc_ns;
            builder.set_clock_error_ns(shared.clock().max_error_us.max(0) as u64 * 1000);
            builder.push(&f, |mut r| {
                let l = &shared.probe.links[(r.link_id as usize).min(MAX_LINKS - 1)];
                if l.probed.load(Ordering::Relaxed) != 0 {
                    // The link's health at the window's end (0 unknown, 1 up, 2 degraded, 3 down).
                    r.link_state = l.state.load(Ordering::Relaxed);
                }
                held.push_back(r)
            });
        }
        drain_samples(&mut samples, &mut probes, tai_to_utc, &shared);
        release(&mut held, &mut probes, &mut pending, now_utc);
        if pending.len() > MAX_PENDING {
            let n = pending.len() - MAX_PENDING;
            let first = pending.front().map_or(0, |r| r.window_start_ns);
            pending.drain(..n);
            c.dropped.fetch_add(n as u64, Ordering::Relaxed);
            shared.event(
                "rollups_lost",
                None,
                format!("{n} rollups from window {first} dropped: the store was unavailable for over 2 minutes"),
            );
        }
        while !pending.is_empty() && !batch_tx.is_full() {
            let n = pending.len().min(BATCH);
            if batch_tx.try_send(pending.drain(..n).collect()).is_err() {
                break;
            }
        }
        c.pending.store(
            (pending.len() + batch_tx.len() * BATCH) as u64,
            Ordering::Relaxed,
        );
        if !any {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Last rollups out before the store stops (the writer gives up on them after a few failed
    // attempts once stopping); held ones with the samples there are.
    drain_samples(&mut samples, &mut probes, tai_to_utc, &shared);
    release(&mut held, &mut probes, &mut pending, i64::MAX);
    while !pending.is_empty() {
        let n = pending.len().min(BATCH);
        if batch_tx
            .send_timeout(pending.drain(..n).collect(), Duration::from_secs(5))
            .is_err()
        {
            break;
        }
    }
    drop(batch_tx);
    if let Ok(h) = writer {
        let _ = h.join();
    }
}

fn drain_samples(
    samples: &mut rtrb::Consumer<crate::probe::ProbeEvent>,
    probes: &mut ProbeWindows,
    tai_to_utc: Option<i64>,
    shared: &Shared,
) {
    use crate::probe::ProbeEvent;
    // Before the first frame the offset is unknown: the samples wait in their queue.
    let Some(off) = tai_to_utc else { return };
    let mono_to_tai = clock::tai_ns() as i64 - clock::monotonic_ns() as i64;
    // Our clock's state now (samples are at most ~20 ms old): one-way delays only while synced.
    let local = shared.clock();
    while let Ok(e) = samples.pop() {
        match e {
            ProbeEvent::Sample(s) => probes.add(&s, off, crate::probe::oneway::one_way(&s, &local)),
            ProbeEvent::Outcome(o) => probes.add_outcome(&o, off, mono_to_tai),
        }
    }
}

/// Moves the held windows whose probes are settled at `now_utc` to `pending`, with their RTT.
fn release(
    held: &mut VecDeque<Rollup>,
    probes: &mut ProbeWindows,
    pending: &mut VecDeque<Rollup>,
    now_utc: i64,
) {
    while held
        .front()
        .is_some_and(|r| probes.ready(r.window_start_ns as i64, now_utc))
    {
        if let Some(mut r) = held.pop_front() {
            probes.fill(&mut r);
            pending.push_back(r);
        }
    }
}

/// The `lp-store` thread: starts (or connects to) the store, then writes the batches it gets,
/// in order, each until it is stored (puts are idempotent). Ends when the sender is gone.
fn write_loop(
    dir: std::path::PathBuf,
    external: Option<crate::forward::ExternalStore>,
    batches: crossbeam_channel::Receiver<Vec<Rollup>>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    let c = &shared.store;
    // Starting Tarantool takes from 0.1 s to a minute (xlog replay).
    let mut backoff = Duration::from_secs(1);
    let store = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let started = match &external {
            Some(x) => x
                .client_config()
                .map_err(|e| format!("store.external_password_file: {e}"))
                .and_then(|c| {
                    Store::connect_external(c)
                        .map_err(|e| format!("external store {}: {e}", x.address))
                }),
            None => Store::start_local(LocalConfig::new(&dir)).map_err(|e| e.to_string()),
        };
        match started {
            Ok(store) => {
                tracing::info!(dir = %dir.display(), "local store ready");
                break Arc::new(store);
            }
            Err(e) => {
                tracing::error!(error = %e, "local store unavailable: rollups wait in memory (2 min), live data is unaffected; retrying");
                shared.event("store_error", None, e);
                let t = Instant::now();
                while t.elapsed() < backoff && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    shared.set_store_handle(Some(Arc::clone(&store)));
    for batch in batches.iter() {
        let mut failures = 0;
        loop {
            c.put_in_flight.store(true, Ordering::Relaxed);
            let put = store.put_rollups(&batch);
            c.put_in_flight.store(false, Ordering::Relaxed);
            match put {
                Ok(_) => {
                    c.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    c.up.store(true, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    failures += 1;
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    c.up.store(false, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) && failures >= 3 {
                        tracing::error!(error = %e, rows = batch.len(), "stopping: rollups not stored");
                        c.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        break;
                    }
                    tracing::warn!(error = %e, "rollup write failed; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
    shared.set_store_handle(None);
    // Readers (an HTTP request, a forwarder) may still hold it: the last one to let go stops
    // Tarantool (Store's drop).
    if let Ok(s) = Arc::try_unwrap(store) {
        s.stop();
    }
}
