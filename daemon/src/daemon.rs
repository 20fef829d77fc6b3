//! Starts and stops the pipeline: kernel programs, control thread (links, hot-plug), ingest
//! thread (ring + slots → aligned frames), consumers, HTTP. See ARCHITECTURE.md.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use crossbeam_channel::Sender;

use crate::{
    align::Aligner,
    config::Config,
    frame_queue::{frame_queue, frame_queue_for, FrameConsumer, FrameProducer},
    http,
    ingest::{self, Fanout, Output},
    kernel::{Kernel, KernelError},
    links::{self, Control, LinkManager},
    persist,
    shared::Shared,
    stats,
    stream::{StreamError, StreamServer},
};

/// Bins the live-statistics queue holds (it is read every 5 ms): 100 ms.
const STATS_QUEUE_NS: u64 = 100_000_000;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("cannot start thread {name}: {source}")]
    Thread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP thread stopped before it was ready")]
    HttpStartup,
    #[error(transparent)]
    Auth(#[from] http::auth::AuthError),
    #[error(transparent)]
    Tls(#[from] http::tls::TlsError),
}

/// A consumer queue to register at start (tests, benchmarks, later the stream socket).
pub struct Subscription {
    pub name: String,
    pub producer: FrameProducer,
    /// Wants each bin at its deadline (the daemon then wakes once per bin).
    pub realtime: bool,
}

impl Subscription {
    fn into_output(self) -> (String, Output) {
        let mut o = Output::new(self.producer);
        o.realtime = self.realtime;
        (self.name, o)
    }
}

/// A queue pair for [`Daemon::start`]: give the producer to the daemon, read the consumer.
/// It holds at least `capacity` frames.
pub fn subscription(name: &str, capacity: usize) -> (Subscription, FrameConsumer) {
    let (producer, consumer) = frame_queue(capacity);
    (
        Subscription {
            name: name.to_string(),
            producer,
            realtime: false,
        },
        consumer,
    )
}

pub struct Daemon {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    control: Sender<Control>,
    threads: Vec<(&'static str, JoinHandle<()>)>,
    http_addr: SocketAddr,
    http_shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

fn spawn(
    name: &'static str,
    f: impl FnOnce() + Send + 'static,
) -> Result<(&'static str, JoinHandle<()>), DaemonError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|h| (name, h))
        .map_err(|source| DaemonError::Thread { name, source })
}

impl Daemon {
    /// Loads and attaches everything in the calling thread's network namespace and starts the
    /// threads. Links whose interface is missing are reported and attached when they appear.
    pub fn start(cfg: &Config, subscriptions: Vec<Subscription>) -> Result<Daemon, DaemonError> {
        // The web side's files first: a bad token or certificate stops the start, clearly.
        let tls = match (&cfg.http.tls_cert, &cfg.http.tls_key) {
            (Some(c), Some(k)) => Some(http::tls::acceptor(c, k)?),
            _ => None,
        };
        let auth = match &cfg.http.token_file {
            Some(p) => Some(http::auth::Auth::load(p, tls.is_some())?),
            None => None,
        };
        let (mut kernel, data) = Kernel::load(cfg.bin_width_ns, cfg.tcp_rtt)?;
        let shared = Arc::new(Shared::new(cfg));
        let stop = Arc::new(AtomicBool::new(false));

        // The consumers' queues are sized in time for the configured links (frame_queue.rs).
        let probed = cfg.links.iter().filter(|l| l.probe.is_some()).count();
        let queue = |span_ns| frame_queue_for(span_ns, cfg.bin_width_ns, cfg.links.len(), probed);
        let (stats_tx, stats_rx) = queue(STATS_QUEUE_NS);
        let mut names = vec!["stats".to_string()];
        let mut outputs = vec![Output::new(stats_tx)];
        for s in subscriptions {
            let (name, o) = s.into_output();
            names.push(name);
            outputs.push(o);
        }
        // The controller's stream: frames flow to it only while it has clients.
        let (stream, stream_sender) = match &cfg.stream {
            Some(sc) => {
                let (server, sender) =
                    StreamServer::bind(sc, Arc::clone(&shared), cfg.bin_width_ns)?;
                (Some(server), Some(sender))
            }
            None => (None, None),
        };
        // The rollups and the local store.
        let persist_rx = cfg.store.as_ref().map(|_| {
            let (tx, rx) = queue(persist::QUEUE_NS);
            names.push("store".to_string());
            outputs.push(Output::new(tx));
            rx
        });
        // The page's live graphs: fed only while a browser listens.
        let hub = Arc::new(http::live::LiveHub::new(
            cfg.http.live_point_ns,
            Arc::clone(&shared),
        ));
        let live_rx = {
            let (tx, rx) = queue(http::live::QUEUE_NS);
            let mut o = Output::new(tx);
            o.live = Some(Arc::clone(&hub.feeding));
            names.push("live".to_string());
            outputs.push(o);
            rx
        };
        let mut fanout = Fanout::from_outputs(outputs);
        fanout.stream = stream_sender;
        *shared
            .fanout_dropped
            .write()
            .unwrap_or_else(|p| p.into_inner()) = names
            .into_iter()
            .map(|n| (n, Arc::clone(&fanout.dropped)))
            .collect::<Vec<_>>();
        let probe_setups = crate::probe::sender::setups(cfg);
        // The rollups' probe feed exists before the prober starts, so that no probe's
        // outcome is missed at start (the prober picks it up when it is built).
        let probe_events = cfg
            .store
            .is_some()
            .then(|| shared.probe.subscribe_persist(persist::PROBE_EVENTS));
        // The frames' probe feed (lp-probe → lp-ingest): sized for two events (sample, sent)
        // per probe at every link's highest rate, over the ingest thread's longest sleep
        // (publish interval) plus 100 ms of slack.
        let probed_mask = probe_setups
            .iter()
            .filter(|s| s.index < 64)
            .fold(0u64, |m, s| m | (1 << s.index));
        let grid_feed = (!probe_setups.is_empty()).then(|| {
            let per_s: u64 = probe_setups
                .iter()
                .map(|s| u64::from(s.cfg.max_rate_hz) * 2)
                .sum();
            let over_ns = cfg.publish_interval_ns.max(cfg.grace_ns) + 100_000_000;
            let cap = (per_s.saturating_mul(over_ns) / 1_000_000_000)
                .clamp(1024, 1 << 20)
                .next_power_of_two();
            rtrb::RingBuffer::new(cap as usize)
        });
        let (grid_tx, grid_rx) = match grid_feed {
            Some((tx, rx)) => (Some(tx), Some(rx)),
            None => (None, None),
        };
        let prober = if probe_setups.is_empty() {
            None
        } else {
            let maps = kernel.take_probe_maps()?;
            let mut s = crate::probe::sender::Sender::new(
                probe_setups,
                cfg.probe.clone(),
                maps,
                Arc::clone(&shared),
            );
            if let Some(tx) = grid_tx {
                s = s.with_grid(tx);
            }
            Some(s)
        };
        // One Arc for all: split per consumer when rendering is not worth the copies here.
        let mut manager = LinkManager::new(kernel, cfg, Arc::clone(&shared));
        manager.resync();

        let mut threads = Vec::new();
        let (control_tx, control_rx) = crossbeam_channel::bounded(16);
        {
            let stop = Arc::clone(&stop);
            threads.push(spawn("lp-control", move || manager.run(control_rx, stop))?);
        }
        {
            let (tx, stop) = (control_tx.clone(), Arc::clone(&stop));
            threads.push(spawn("lp-netlink", move || {
                if let Err(e) = links::watch_netlink(tx, stop) {
                    tracing::error!(error = %e, "netlink watch failed: hot-plug is then seen by the 2 s periodic check only");
                }
            })?);
        }
        {
            let mut aligner = Aligner::new(cfg.bin_width_ns, cfg.grace_ns, data.slots_ncpu());
            aligner.set_probes(probed_mask, grid_rx);
            aligner.set_tcp_rtt(cfg.tcp_rtt.enabled);
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            let crate::kernel::DataMaps { ring, slots } = data;
            let (interval, rt) = (cfg.publish_interval_ns, cfg.realtime_priority);
            threads.push(spawn("lp-ingest", move || {
                crate::clock::apply_realtime_priority("lp-ingest", rt);
                ingest::run(interval, aligner, ring, slots, fanout, shared, stop)
            })?);
        }
        {
            let (shared, stop, width) = (Arc::clone(&shared), Arc::clone(&stop), cfg.bin_width_ns);
            threads.push(spawn("lp-stats", move || {
                stats::run(stats_rx, shared, width, stop)
            })?);
        }
        if let (Some(sc), Some(rx), Some(events)) = (cfg.store.clone(), persist_rx, probe_events) {
            let (shared, stop, width) = (Arc::clone(&shared), Arc::clone(&stop), cfg.bin_width_ns);
            // Rollups wait for the probes' loss timeout only when some link is probed.
            let loss_timeout = cfg
                .links
                .iter()
                .any(|l| l.probe.is_some())
                .then_some(cfg.probe.loss_timeout_ns);
            threads.push(spawn("lp-persist", move || {
                persist::run(sc, rx, events, shared, width, loss_timeout, stop)
            })?);
        }
        {
            let (hub, stop) = (Arc::clone(&hub), Arc::clone(&stop));
            threads.push(spawn("lp-live", move || {
                http::live::run(live_rx, hub, stop)
            })?);
        }
        // Forwarding and retention, once the store is ready.
        if let Some(sc) = cfg.store.clone() {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            let dests = cfg.forwards.clone();
            threads.push(spawn("lp-forward", move || {
                crate::forward::run(sc, dests, shared, stop)
            })?);
        }
        if let Some(prober) = prober {
            let stop = Arc::clone(&stop);
            // Real-time one below the ingest and stream threads: probe send times are
            // measurements, and a late tick is a missed tick.
            let prio = cfg
                .realtime_priority
                .saturating_sub(1)
                .max(u8::from(cfg.realtime_priority > 0));
            threads.push(spawn("lp-probe", move || {
                crate::clock::apply_realtime_priority("lp-probe", prio);
                prober.run(stop)
            })?);
        }
        if let Some(server) = stream {
            let (stop, rt) = (Arc::clone(&stop), cfg.realtime_priority);
            threads.push(spawn("lp-stream", move || {
                crate::clock::apply_realtime_priority("lp-stream", rt);
                server.run(stop)
            })?);
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        {
            let web = Arc::new(http::web::Web {
                shared: Arc::clone(&shared),
                auth,
                live: hub,
                window_ns: cfg.store.as_ref().map(|s| s.window_ns),
            });
            let addr = cfg.http_listen;
            threads.push(spawn("lp-http", move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(http::HttpError::Bind { addr, source: e }));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match http::bind(addr).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let local = listener.local_addr().unwrap_or(addr);
                    let app = http::web::app(http::router(), web);
                    let shutdown = async move {
                        let _ = shutdown_rx.await;
                    };
                    let served = match tls {
                        Some(acceptor) => match http::tls::TlsListener::new(listener, acceptor) {
                            Ok(l) => {
                                let _ = ready_tx.send(Ok(local));
                                axum::serve(l, app).with_graceful_shutdown(shutdown).await
                            }
                            Err(source) => {
                                let _ = ready_tx.send(Err(http::HttpError::Bind { addr, source }));
                                return;
                            }
                        },
                        None => {
                            let _ = ready_tx.send(Ok(local));
                            axum::serve(listener, app)
                                .with_graceful_shutdown(shutdown)
                                .await
                        }
                    };
                    if let Err(e) = served {
                        tracing::error!(error = %e, "HTTP server stopped");
                    }
                });
            })?);
        }
        let mut daemon = Daemon {
            shared,
            stop,
            control: control_tx,
            threads,
            http_addr: cfg.http_listen,
            http_shutdown: Some(shutdown_tx),
        };
        match ready_rx.recv() {
            Ok(Ok(addr)) => daemon.http_addr = addr,
            Ok(Err(e)) => {
                daemon.shutdown();
                return Err(e.into());
            }
            Err(_) => {
                daemon.shutdown();
                return Err(DaemonError::HttpStartup);
            }
        }
        Ok(daemon)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The address the HTTP API listens on (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Applies a new configuration (links added/removed without a restart).
    pub fn reload(&self, cfg: Config) {
        let _ = self.control.send(Control::Reload(Box::new(cfg)));
    }

    /// Whether the ingest thread ticked within `max_age_ns` (for the watchdog).
    pub fn is_healthy(&self, max_age_ns: u64) -> bool {
        let last = self.shared.counters.last_tick_tai.load(Ordering::Relaxed);
        crate::clock::tai_ns().saturating_sub(last) < max_age_ns
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(tx) = self.http_shutdown.take() {
            let _ = tx.send(());
        }
        for (name, h) in self.threads.drain(..) {
            if h.join().is_err() {
                tracing::error!(thread = name, "thread panicked");
            }
        }
    }

    /// Stops every thread and detaches from every interface.
    pub fn stop(mut self) {
        self.shutdown();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}
