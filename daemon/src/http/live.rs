//! Live data for the page's graphs (`GET /api/v1/live`, server-sent events).
//!
//! A frame consumer of its own (thread `lp-live`, its own bounded rtrb queue, fed only while a
//! browser listens) sums the frames into points of `live_point_ns` (10 ms by default: what a
//! browser can draw, with exact byte and packet sums) and hands each finished point to a
//! bounded broadcast ring. Per frame it only adds into fixed arrays: no allocation, no lock.
//! A browser that does not keep up loses the oldest points of the ring (counted in
//! `linkpulse_live_points_dropped_total`); the pipeline never waits for it.
use std::{
    convert::Infallible,
    fmt::Write as _,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    extract::State,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
};
use linkpulse_common::{DIRS, MAX_LINKS};
use tokio::sync::{broadcast, mpsc};

use super::web::Web;
use crate::frame::Frame;

/// Points the broadcast ring holds (2.5 s at 10 ms): a browser lagging more loses the oldest.
const RING_POINTS: usize = 256;
/// Bins the consumer queue holds (it is read every 5 ms): 100 ms.
pub const QUEUE_NS: u64 = 100_000_000;

/// One point of the live graphs: sums of all bins whose start falls in
/// `[start_utc_ns, start_utc_ns + width_ns)`.
#[derive(Clone, Copy)]
pub struct LivePoint {
    pub start_utc_ns: i64,
    pub width_ns: u64,
    /// Bins summed (fewer than width / bin width: frames were lost or the stream just began).
    pub bins: u32,
    pub link_count: u32,
    /// Bit i: link i was attached in every bin summed.
    pub valid_mask: u64,
    pub packets: [[u64; DIRS]; MAX_LINKS],
    pub bytes: [[u64; DIRS]; MAX_LINKS],
}

impl LivePoint {
    fn empty() -> Self {
        Self {
            start_utc_ns: i64::MIN,
            width_ns: 0,
            bins: 0,
            link_count: 0,
            valid_mask: u64::MAX,
            packets: [[0; DIRS]; MAX_LINKS],
            bytes: [[0; DIRS]; MAX_LINKS],
        }
    }
}

/// Sums frames into points; `push` reports each point when the next one begins.
pub struct PointAccumulator {
    point_ns: i64,
    cur: LivePoint,
    last_seq: Option<u64>,
}

impl PointAccumulator {
    pub fn new(point_ns: u64) -> Self {
        Self {
            point_ns: point_ns.max(1) as i64,
            cur: LivePoint::empty(),
            last_seq: None,
        }
    }

    #[inline]
    pub fn push(&mut self, f: &Frame, mut done: impl FnMut(&LivePoint)) {
        let start = f.bin_start_utc_ns - f.bin_start_utc_ns.rem_euclid(self.point_ns);
        // A gap in seq (frames lost, or the feed paused) ends the point: it is reported with
        // the bins it has, so a browser never sees a sum that silently misses bins.
        let gap = self.last_seq.is_some_and(|s| f.seq != s.wrapping_add(1));
        self.last_seq = Some(f.seq);
        if start != self.cur.start_utc_ns || gap {
            if self.cur.bins > 0 {
                done(&self.cur);
            }
            self.cur.start_utc_ns = start;
            self.cur.width_ns = self.point_ns as u64;
            self.cur.bins = 0;
            self.cur.valid_mask = u64::MAX;
            self.cur.packets = [[0; DIRS]; MAX_LINKS];
            self.cur.bytes = [[0; DIRS]; MAX_LINKS];
        }
        let n = (f.link_count as usize).min(MAX_LINKS);
        self.cur.link_count = n as u32;
        self.cur.bins += 1;
        self.cur.valid_mask &= f.valid_mask;
        for l in 0..n {
            for d in 0..DIRS {
                self.cur.packets[l][d] += f.links[l].packets[d];
                self.cur.bytes[l][d] += f.links[l].bytes[d];
            }
        }
    }
}

/// The live feed's counters (in `Shared`, for /metrics).
#[derive(Default)]
pub struct LiveCounters {
    pub clients: AtomicUsize,
    pub points: AtomicU64,
    pub dropped: AtomicU64,
}

/// The live feed: the consumer thread publishes, each SSE client subscribes.
pub struct LiveHub {
    tx: broadcast::Sender<LivePoint>,
    /// Set while at least one browser listens: the ingest thread feeds the queue only then.
    pub feeding: Arc<AtomicBool>,
    pub counters: Arc<crate::shared::Shared>,
    pub point_ns: u64,
}

impl LiveHub {
    pub fn new(point_ns: u64, shared: Arc<crate::shared::Shared>) -> Self {
        let (tx, _) = broadcast::channel(RING_POINTS);
        Self {
            tx,
            feeding: Arc::new(AtomicBool::new(false)),
            counters: shared,
            point_ns,
        }
    }

    fn c(&self) -> &LiveCounters {
        &self.counters.live
    }

    fn attach(&self) -> broadcast::Receiver<LivePoint> {
        self.c().clients.fetch_add(1, Ordering::Relaxed);
        self.feeding.store(true, Ordering::Relaxed);
        self.tx.subscribe()
    }

    fn detach(&self) {
        if self.c().clients.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.feeding.store(false, Ordering::Relaxed);
        }
    }
}

/// The `lp-live` thread: frames → points → broadcast ring, until `stop`.
pub fn run(mut rx: crate::frame_queue::FrameConsumer, hub: Arc<LiveHub>, stop: Arc<AtomicBool>) {
    let mut acc = PointAccumulator::new(hub.point_ns);
    while !stop.load(Ordering::Relaxed) {
        let mut any = false;
        while let Ok(f) = rx.pop() {
            any = true;
            acc.push(&f, |p| {
                hub.c().points.fetch_add(1, Ordering::Relaxed);
                // No receiver is fine (the last browser just left).
                let _ = hub.tx.send(*p);
            });
        }
        if !any {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The Prometheus lines of the live feed.
pub fn write_metrics(o: &mut String, c: &LiveCounters) {
    let _ = writeln!(o, "# HELP linkpulse_live_clients Browsers on the live feed (/api/v1/live).\n# TYPE linkpulse_live_clients gauge\nlinkpulse_live_clients {}", c.clients.load(Ordering::Relaxed));
    let _ = writeln!(o, "# HELP linkpulse_live_points_total Points of the live graphs produced.\n# TYPE linkpulse_live_points_total counter\nlinkpulse_live_points_total {}", c.points.load(Ordering::Relaxed));
    let _ = writeln!(o, "# HELP linkpulse_live_points_dropped_total Live points a slow browser lost (it sees the gap).\n# TYPE linkpulse_live_points_dropped_total counter\nlinkpulse_live_points_dropped_total {}", c.dropped.load(Ordering::Relaxed));
}

/// Renders a batch of points as one SSE `data:` JSON object.
pub fn render(points: &[LivePoint], lost: u64, out: &mut String) {
    out.clear();
    let _ = write!(out, "{{\"lost\":{lost},\"points\":[");
    for (i, p) in points.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"start_utc_ns\":{},\"width_ns\":{},\"bins\":{},\"links\":[",
            p.start_utc_ns, p.width_ns, p.bins
        );
        for l in 0..p.link_count as usize {
            if l > 0 {
                out.push(',');
            }
            let valid = l < 64 && p.valid_mask & (1 << l) != 0;
            let _ = write!(
                out,
                "{{\"index\":{l},\"valid\":{valid},\"down_bytes\":{},\"up_bytes\":{},\"down_packets\":{},\"up_packets\":{}}}",
                p.bytes[l][0], p.bytes[l][1], p.packets[l][0], p.packets[l][1]
            );
        }
        out.push_str("]}");
    }
    out.push_str("]}");
}

/// The SSE response body: events produced by a per-client task.
struct Events(mpsc::Receiver<Event>);

impl futures_core::Stream for Events {
    type Item = Result<Event, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|e| e.map(Ok))
    }
}

/// `GET /api/v1/live`: one event per ~100 ms with the points finished since the last one.
pub async fn sse(State(web): State<Arc<Web>>) -> Response {
    let hub = Arc::clone(&web.live);
    let mut rx = hub.attach();
    let (tx, events) = mpsc::channel::<Event>(4);
    tokio::spawn(async move {
        let mut batch: Vec<LivePoint> = Vec::with_capacity(RING_POINTS);
        let mut text = String::with_capacity(64 * 1024);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        'outer: loop {
            tick.tick().await;
            let mut lost = 0u64;
            loop {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => lost += n,
                    Err(broadcast::error::TryRecvError::Empty) => break,
                    Err(broadcast::error::TryRecvError::Closed) => break 'outer,
                }
            }
            if lost > 0 {
                hub.c().dropped.fetch_add(lost, Ordering::Relaxed);
            }
            if batch.is_empty() && lost == 0 {
                if tx.is_closed() {
                    break;
                }
                continue;
            }
            render(&batch, lost, &mut text);
            batch.clear();
            // A browser whose connection is full loses this batch (counted), never blocks us.
            match tx.try_send(Event::default().event("points").data(text.as_str())) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    hub.c().dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        hub.detach();
    });
    Sse::new(Events(events))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, utc: i64, bytes: u64) -> Frame {
        let mut f = Frame {
            bin_start_utc_ns: utc,
            width_ns: 100_000,
            seq,
            link_count: 2,
            valid_mask: 0b11,
            ..Frame::default()
        };
        f.links[0].bytes = [bytes, 1];
        f.links[0].packets = [1, 1];
        f.links[1].bytes = [2, 2];
        f
    }

    #[test]
    fn points_sum_exactly_and_break_on_gaps() {
        let mut acc = PointAccumulator::new(10_000_000);
        let mut out = Vec::new();
        // 250 bins of 100 µs from an aligned start: points of 100, 100, (50 open).
        let base = 1_700_000_000_000_000_000i64;
        for i in 0..250u64 {
            acc.push(&frame(i, base + i as i64 * 100_000, i), |p| out.push(*p));
        }
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].bins, 100);
        assert_eq!(out[0].start_utc_ns, base);
        assert_eq!(out[0].bytes[0][0], (0..100u64).sum::<u64>());
        assert_eq!(out[1].bytes[0][0], (100..200u64).sum::<u64>());
        assert_eq!(out[1].bytes[1], [200, 200]);
        assert_eq!(out[1].valid_mask & 0b11, 0b11);
        // A lost frame closes the open point early, with the bins it has.
        acc.push(&frame(260, base + 260 * 100_000, 0), |p| out.push(*p));
        assert_eq!(out.len(), 3);
        assert_eq!(out[2].bins, 50);
        assert_eq!(out[2].start_utc_ns, base + 20_000_000);
    }

    #[test]
    fn render_is_json() {
        let mut acc = PointAccumulator::new(1_000_000);
        let mut out = Vec::new();
        for i in 0..30u64 {
            acc.push(&frame(i, i as i64 * 100_000, 5), |p| out.push(*p));
        }
        let mut s = String::new();
        render(&out, 3, &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).expect("valid JSON");
        assert_eq!(v["lost"], 3);
        assert_eq!(v["points"][1]["links"][0]["down_bytes"], 50);
        assert_eq!(v["points"][1]["links"][1]["valid"], true);
    }
}
