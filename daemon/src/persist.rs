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

use linkpulse_sink::store::{LocalConfig, Rollup, Store};

use crate::{
    clock,
    config::StoreConfig,
    frame::{Frame, FLAG_CLOCK_STEP},
    rollup::RollupBuilder,
    shared::Shared,
};

/// Rollups kept in memory while the store is not available: 2 minutes of 16 links at 500 ms.
const MAX_PENDING: usize = 16 * 2 * 120;
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
}

pub fn run(
    cfg: StoreConfig,
    mut rx: rtrb::Consumer<Frame>,
    shared: Arc<Shared>,
    bin_ns: u64,
    stop: Arc<AtomicBool>,
) {
    let mut builder = RollupBuilder::new(cfg.window_ns, bin_ns, clock::realtime_ns());
    let mut pending: VecDeque<Rollup> = VecDeque::with_capacity(1024);
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Store>(1);
    // Starting Tarantool takes from 0.1 s to a minute (xlog replay): on its own thread.
    let starter = {
        let (dir, stop, external) = (
            cfg.data_dir.clone(),
            Arc::clone(&stop),
            cfg.external.clone(),
        );
        let shared = Arc::clone(&shared);
        std::thread::Builder::new().name("lp-store-start".into()).spawn(move || {
            let mut backoff = Duration::from_secs(1);
            while !stop.load(Ordering::Relaxed) {
                let started = match &external {
                    Some(x) => x
                        .client_config()
                        .map_err(|e| format!("store.external_password_file: {e}"))
                        .and_then(|c| Store::connect_external(c).map_err(|e| format!("external store {}: {e}", x.address))),
                    None => Store::start_local(LocalConfig::new(&dir)).map_err(|e| e.to_string()),
                };
                match started {
                    Ok(store) => {
                        tracing::info!(dir = %dir.display(), "local store ready");
                        let _ = ready_tx.send(store);
                        return;
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
            }
        })
    };
    if let Err(e) = &starter {
        tracing::error!(error = %e, "cannot start the store thread");
    }
    let mut store: Option<Arc<Store>> = None;
    let mut retry_at = Instant::now();
    let c = &shared.store;
    while !stop.load(Ordering::Relaxed) {
        let mut any = false;
        while let Ok(f) = rx.pop() {
            any = true;
            if f.flags & FLAG_CLOCK_STEP != 0 {
                // A new clock epoch: windows after the step never replace earlier ones.
                builder.set_boot_tag(clock::realtime_ns());
            }
            builder.set_clock_error_ns(shared.clock().max_error_us.max(0) as u64 * 1000);
            builder.push(&f, |r| pending.push_back(r));
        }
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
        if store.is_none() {
            if let Ok(s) = ready_rx.try_recv() {
                let s = Arc::new(s);
                shared.set_store_handle(Some(Arc::clone(&s)));
                store = Some(s);
            }
        }
        if let Some(s) = &store {
            if !pending.is_empty() && Instant::now() >= retry_at {
                let n = pending.len().min(BATCH);
                let batch = pending.make_contiguous();
                match s.put_rollups(&batch[..n]) {
                    Ok(_) => {
                        pending.drain(..n);
                        c.written.fetch_add(n as u64, Ordering::Relaxed);
                        c.up.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        c.up.store(false, Ordering::Relaxed);
                        tracing::warn!(error = %e, pending = pending.len(), "rollup write failed; retrying in 1 s");
                        retry_at = Instant::now() + Duration::from_secs(1);
                    }
                }
                continue;
            }
        }
        c.pending.store(pending.len() as u64, Ordering::Relaxed);
        if !any {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Last rollups out before the store stops.
    if let Some(s) = &store {
        let batch: Vec<Rollup> = pending.drain(..).collect();
        for chunk in batch.chunks(BATCH) {
            if s.put_rollups(chunk).is_ok() {
                c.written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    }
    if let Ok(h) = starter {
        let _ = h.join();
    }
    shared.set_store_handle(None);
    if let Some(s) = store.take() {
        // Readers (an HTTP request, a forwarder) may still hold it: the last one to let go
        // stops Tarantool (Store's drop).
        if let Ok(s) = Arc::try_unwrap(s) {
            s.stop();
        }
    }
}
