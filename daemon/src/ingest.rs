//! The ingest thread: reads the ring buffer and the mmapped slots, runs the aligner at each
//! bin's deadline and fans frames out to the consumers through SPSC queues. Per tick it takes
//! no lock and allocates nothing (see tests/no_alloc.rs).
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use aya::maps::{MapData, RingBuf};
use linkpulse_common::{BinRecord, MAX_LINKS};

use crate::{
    align::{Aligner, SlotSource, TickContext},
    clock::{self, ClockState, StepDetector},
    frame::Frame,
    frame_queue::{Encoded, FrameProducer},
    kernel::{decode_record, BinRings},
    shared::Shared,
};

/// Where completed per-CPU bins come from (the BPF ring buffer, or a Vec in tests).
pub trait RecordSource {
    /// Calls `f` for every record available now.
    fn drain(&mut self, f: impl FnMut(&BinRecord));
}

impl RecordSource for RingBuf<MapData> {
    fn drain(&mut self, mut f: impl FnMut(&BinRecord)) {
        while let Some(item) = self.next() {
            if let Some(rec) = decode_record(&item) {
                f(&rec);
            }
        }
    }
}

impl RecordSource for BinRings {
    fn drain(&mut self, mut f: impl FnMut(&BinRecord)) {
        for ring in &mut self.0 {
            ring.drain(&mut f);
        }
    }
}

/// One consumer's queue, as the ingest thread sees it.
pub struct Output {
    pub producer: FrameProducer,
    /// Frames are pushed only while this is set (e.g. the stream has clients); None = always.
    pub live: Option<Arc<AtomicBool>>,
    /// While live, wants each bin at its deadline (the ingest thread then wakes per bin).
    pub realtime: bool,
}

impl Output {
    pub fn new(producer: FrameProducer) -> Self {
        Self {
            producer,
            live: None,
            realtime: false,
        }
    }

    fn is_live(&self) -> bool {
        self.live.as_ref().is_none_or(|l| l.load(Ordering::Relaxed))
    }
}

/// The consumers' queues. A full queue loses that frame for that consumer only (counted); the
/// pipeline never waits for anyone.
pub struct Fanout {
    pub outputs: Vec<Output>,
    pub dropped: Arc<[AtomicU64]>,
    /// The controller stream's send side: frames are encoded and sent from this thread.
    pub stream: Option<crate::stream::StreamSender>,
    /// The frame being published in its queue form (encoded once for all queues).
    encoded: Box<Encoded>,
}

impl Fanout {
    pub fn new(producers: Vec<FrameProducer>) -> Self {
        Self::from_outputs(producers.into_iter().map(Output::new).collect())
    }

    pub fn from_outputs(outputs: Vec<Output>) -> Self {
        let dropped: Arc<[AtomicU64]> = outputs.iter().map(|_| AtomicU64::new(0)).collect();
        Self {
            outputs,
            dropped,
            stream: None,
            encoded: Box::default(),
        }
    }

    /// Some live consumer wants every bin at its deadline.
    pub fn realtime(&self) -> bool {
        self.outputs.iter().any(|o| o.realtime && o.is_live())
            || self.stream.as_ref().is_some_and(|s| s.is_active())
    }

    #[inline]
    pub fn publish(&mut self, f: &Frame) {
        // The controller first: its latency is measured from the bin's deadline; the queues'
        // consumers read in batches every few ms.
        if let Some(s) = &mut self.stream {
            s.on_frame(f);
        }
        let mut encoded = false;
        for (o, d) in self.outputs.iter_mut().zip(self.dropped.iter()) {
            if !o.is_live() {
                continue;
            }
            if !encoded {
                self.encoded.encode(f);
                encoded = true;
            }
            if o.producer.push_encoded(&self.encoded).is_err() {
                d.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One pass of the pipeline: ring, slots, ring again, close due bins, fan out. The second
/// drain picks up records the kernel submitted while the slots were read (a bin that moved on
/// just then) before its bin is published.
pub fn tick_once(
    aligner: &mut Aligner,
    ring: &mut impl RecordSource,
    slots: &impl SlotSource,
    ctx: &TickContext,
    fanout: &mut Fanout,
) {
    ring.drain(|r| aligner.on_record(r));
    aligner.read_slots(slots, ctx.now_tai, ctx.link_count);
    ring.drain(|r| aligner.on_record(r));
    aligner.drain_probes();
    if let Some(s) = &mut fanout.stream {
        s.poll_control();
    }
    aligner.close_due(ctx, |f| fanout.publish(f));
}

/// Wakes at a deadline with the timer's own latency taken out: a timer wake-up costs tens of
/// µs on a VM (38 µs median measured here, even in SCHED_FIFO), which would all be added to
/// the stream's latency. The sleep ends `bias` early and a short spin covers the rest; `bias`
/// follows the lower quartile of the observed oversleep (up 1 µs after a late wake-up, down
/// 3 µs after an early one), so a quarter of the wake-ups spin a few µs and the others arrive
/// a few µs late: most of the latency gone for little spinning.
#[derive(Default)]
pub struct EarlyWake {
    bias_ns: u64,
}

impl EarlyWake {
    /// Most the sleep is shortened by (bounds the spin if the timer is suddenly fast).
    const MAX_BIAS_NS: u64 = 200_000;
    const UP_NS: u64 = 1_000;
    const DOWN_NS: u64 = 3_000;

    pub fn sleep_until(&mut self, deadline: u64, now: u64) {
        let target = deadline.saturating_sub(self.bias_ns);
        if target > now {
            clock::sleep_ns((target - now).min(100_000_000));
            let over = clock::tai_ns().saturating_sub(target);
            if over > self.bias_ns {
                self.bias_ns = (self.bias_ns + Self::UP_NS).min(Self::MAX_BIAS_NS);
            } else {
                self.bias_ns = self.bias_ns.saturating_sub(Self::DOWN_NS);
            }
        }
        while clock::tai_ns() < deadline {
            std::hint::spin_loop();
        }
    }

    pub fn bias_ns(&self) -> u64 {
        self.bias_ns
    }
}

/// How often the clock state (adjtimex) and steps are checked.
const CLOCK_CHECK_NS: u64 = 100_000_000;

/// Runs until `stop` is set. Wakes at each bin's deadline when a real-time consumer is
/// connected, otherwise every `publish_interval_ns` (fewer wake-ups: each costs several µs of
/// CPU, more on a VM).
pub fn run(
    publish_interval_ns: u64,
    mut aligner: Aligner,
    mut ring: BinRings,
    slots: crate::kernel::MmapSlots,
    mut fanout: Fanout,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    // Precise wake-ups: the default 50 µs timer slack is half a bin.
    // SAFETY: prctl with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let mut clock_state = ClockState::read().unwrap_or_default();
    let mut steps = StepDetector::new(clock::realtime_ns(), clock::monotonic_ns());
    let mut next_clock_check = 0u64;
    let mut stepped = false;
    aligner.start(clock::tai_ns());
    let mut last_wake = clock::tai_ns();
    let mut wake = EarlyWake::default();
    while !stop.load(Ordering::Relaxed) {
        let mut deadline = aligner.next_deadline();
        if !fanout.realtime() {
            deadline = deadline.max(last_wake + publish_interval_ns);
        }
        let realtime = fanout.realtime();
        let now = clock::tai_ns();
        if realtime {
            wake.sleep_until(deadline, now);
        } else if deadline > now {
            // Bounded so a stop request is seen within 100 ms even with 1 s bins.
            clock::sleep_ns((deadline - now).min(100_000_000));
        }
        let now = clock::tai_ns();
        last_wake = now;
        // Scheduled on the monotonic clock: TAI itself steps with the real-time clock.
        let mono = clock::monotonic_ns();
        if mono >= next_clock_check {
            next_clock_check = mono + CLOCK_CHECK_NS;
            if let Ok(c) = ClockState::read() {
                if c.synced != clock_state.synced {
                    shared.event_clock_sync(c.synced);
                }
                clock_state = c;
            }
            if let Some(step) = steps.observe(clock::realtime_ns(), clock::monotonic_ns()) {
                stepped = true;
                shared.event_clock_step(step);
            }
            shared.set_clock(clock_state);
        }
        let mut ctx = TickContext {
            now_tai: now,
            clock: clock_state,
            clock_stepped: stepped,
            link_count: shared.link_count(),
            attached_since: [0; MAX_LINKS],
        };
        shared.load_attached_since(&mut ctx.attached_since);
        stepped = false;
        tick_once(&mut aligner, &mut ring, &slots, &ctx, &mut fanout);
        shared.publish_align_stats(&aligner.stats, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_wake_never_returns_before_the_deadline_and_learns_a_bounded_bias() {
        let mut w = EarlyWake::default();
        for _ in 0..300 {
            let now = clock::tai_ns();
            let deadline = now + 200_000;
            w.sleep_until(deadline, now);
            assert!(clock::tai_ns() >= deadline);
        }
        assert!(w.bias_ns() <= EarlyWake::MAX_BIAS_NS);
        // A deadline already past returns at once.
        let now = clock::tai_ns();
        w.sleep_until(now - 1, now);
    }
}
