//! The per-bin hot path (ring records → aligner → fan-out to consumer queues) allocates
//! nothing: a counting global allocator around many ticks of the real `tick_once`.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use linkpulse::{
    align::{Aligner, SlotSource, TickContext},
    clock::ClockState,
    ingest::{tick_once, Fanout, RecordSource},
};
use linkpulse_common::{BinRecord, Slot, MAX_LINKS, SLOTS_PER_CPU};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

struct Slots(Vec<Slot>);
impl SlotSource for Slots {
    fn ncpu(&self) -> usize {
        self.0.len() / SLOTS_PER_CPU
    }
    fn read(&self, i: usize) -> Slot {
        self.0[i]
    }
}

/// A fixed array of records, replayed each tick (no allocation in the source either).
struct Records {
    recs: [BinRecord; 64],
    n: usize,
}
impl RecordSource for Records {
    fn drain(&mut self, mut f: impl FnMut(&BinRecord)) {
        for r in &self.recs[..self.n] {
            f(r);
        }
        self.n = 0;
    }
}

#[test]
fn ingest_tick_allocates_nothing() {
    const W: u64 = 100_000;
    let t0: u64 = 1_800_000_000_000_000_000;
    let ncpu = 2;
    let mut aligner = Aligner::new(W, 1_000_000, ncpu);
    let mut slots = Slots(vec![Slot::default(); ncpu * SLOTS_PER_CPU]);
    let mut ring = Records {
        recs: [BinRecord::default(); 64],
        n: 0,
    };
    let (p1, mut c1) = rtrb::RingBuffer::new(64);
    let (p2, _c2) = rtrb::RingBuffer::new(4); // a consumer that never reads: must not matter
    let mut fanout = Fanout::new(vec![p1, p2]);
    let mut ctx = TickContext {
        now_tai: t0,
        clock: ClockState {
            synced: true,
            ..Default::default()
        },
        clock_stepped: false,
        link_count: 16,
        attached_since: [1; MAX_LINKS],
    };
    aligner.start(t0);

    COUNTING.store(true, Ordering::SeqCst);
    let mut frames = 0u64;
    for i in 0..20_000u64 {
        let now = t0 + i * W;
        // 16 links × 2 directions of records for the bin that just ended, on alternating CPUs
        for (k, r) in ring.recs.iter_mut().take(32).enumerate() {
            *r = BinRecord {
                bin_start: now - W,
                packets: 3,
                bytes: 4500,
                cpu: (i % 2) as u32,
                link: (k / 2) as u16,
                dir: (k % 2) as u8,
                _pad: 0,
            };
        }
        ring.n = 32;
        // and an idle-link slot the aligner closes from the snapshot
        slots.0[0] = Slot {
            bin_start: now - 20 * W,
            packets: 1,
            bytes: 60,
            ..Default::default()
        };
        ctx.now_tai = now;
        tick_once(&mut aligner, &mut ring, &slots, &ctx, &mut fanout);
        while c1.pop().is_ok() {
            frames += 1;
        }
    }
    COUNTING.store(false, Ordering::SeqCst);
    assert!(
        frames > 19_000,
        "the loop really published frames: {frames}"
    );
    assert_eq!(
        ALLOCS.load(Ordering::SeqCst),
        0,
        "allocations on the hot path"
    );
    assert!(
        fanout.dropped[1].load(Ordering::Relaxed) > 0,
        "the stuck consumer lost frames"
    );
    assert_eq!(fanout.dropped[0].load(Ordering::Relaxed), 0);
}
