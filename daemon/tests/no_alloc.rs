//! The per-bin hot path (ring records → aligner → fan-out to consumer queues and the stream's
//! clients) allocates nothing: a counting global allocator around many ticks of the real
//! `tick_once`. Only the ticking thread counts (the stream's control thread and the test's
//! readers allocate as they like).
use std::sync::atomic::{AtomicBool, Ordering};

use std::sync::Arc;

use linkpulse::{
    align::{Aligner, SlotSource, TickContext},
    clock::ClockState,
    config::Config,
    frame::FLAG_RTT_LATE,
    ingest::{tick_once, Fanout, RecordSource},
    probe::GridEvent,
    shared::{LinkInfo, LinkState, Shared},
    stream::StreamServer,
};
use linkpulse_client::{StreamClient, Subscription as StreamSubscription};
use linkpulse_common::{BinRecord, Slot, MAX_LINKS, SLOTS_PER_CPU};

mod support {
    pub mod counting_alloc;
}
use support::counting_alloc::{ALLOCS, COUNTING, HOT_THREAD};

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
    let (p1, mut c1) = linkpulse::frame_queue(64);
    let (p2, _c2) = linkpulse::frame_queue(4); // a consumer that never reads: must not matter
    let mut fanout = Fanout::new(vec![p1, p2]);
    // The controller stream with two clients reading every bin, served from this thread.
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("stream.sock");
    let cfg = Config::parse(
        &format!(
            "[router]\nid = \"t\"\nsite = \"s\"\n[stream]\npath = \"{}\"\n[store]\nenabled = false\n\
             [[link]]\ninterface = \"wwan0\"\n[[link]]\ninterface = \"wwan1\"\n",
            sock.display()
        ),
        std::path::Path::new("t.toml"),
    )
    .expect("config");
    let shared = Arc::new(Shared::new(&cfg));
    shared.set_links(
        cfg.links
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Some(LinkInfo {
                    index: i,
                    config: l.into(),
                    state: LinkState::Attached,
                    ifindex: None,
                    since_utc_ns: 0,
                    attach_count: 1,
                    last_error: None,
                    last_second: None,
                })
            })
            .collect(),
    );
    let stream_cfg = cfg.stream.clone().expect("stream");
    let (server, sender) = StreamServer::bind(&stream_cfg, Arc::clone(&shared), W).expect("bind");
    fanout.stream = Some(sender);
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || server.run(stop))
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let mut c =
                StreamClient::connect(&sock, StreamSubscription::every_bin()).expect("connect");
            c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .expect("timeout");
            std::thread::spawn(move || {
                let mut n = 0u64;
                while let Ok(f) = c.next_frame() {
                    assert_eq!(f.records().count(), 2);
                    n += 1;
                }
                n
            })
        })
        .collect();
    // The subscriptions reach this thread's sender through its control queue.
    let t = std::time::Instant::now();
    while !fanout.realtime() && t.elapsed() < std::time::Duration::from_secs(10) {
        fanout.stream.as_mut().expect("stream").poll_control();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(fanout.realtime(), "the stream's clients reached the sender");
    HOT_THREAD.with(|h| h.set(true));
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
    // The prober's feed: a sample on link 1 and a sent probe on link 0 per bin, and now and
    // then a sample for a bin already published (the late path).
    let (mut probe_tx, probe_rx) = rtrb::RingBuffer::new(1024);
    aligner.set_probes(0b11, Some(probe_rx));
    let (mut pushed, mut in_frames, mut late_frames) = (0u64, 0u64, 0u64);

    COUNTING.store(true, Ordering::SeqCst);
    let mut frames = 0u64;
    for i in 0..20_000u64 {
        let now = t0 + i * W;
        let t4 = if i % 100 == 99 {
            now - 50 * W
        } else {
            now - W + 10
        };
        // Every other sample with synced clocks: one-way delays take the same path.
        let owd = (i % 2 == 0).then_some(linkpulse::probe::oneway::OneWay {
            up_ns: 9_000_000,
            down_ns: 11_000_000 + i as i64,
            error_ns: 1_000,
        });
        let sample = GridEvent::Sample {
            link: 1,
            t4_tai_ns: t4,
            rtt_ns: 20_000_000 + i,
            owd,
        };
        let sent = GridEvent::Sent {
            link: 0,
            t1_tai_ns: now - W + 5,
        };
        if probe_tx.push(sample).is_ok() && probe_tx.push(sent).is_ok() {
            pushed += 1;
        }
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
                tcp_rtt: Default::default(),
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
        while let Ok(f) = c1.pop() {
            frames += 1;
            in_frames += u64::from(f.rtt[1].rtt_count);
            late_frames += u64::from(f.flags & FLAG_RTT_LATE != 0);
        }
    }
    COUNTING.store(false, Ordering::SeqCst);
    let sent = shared.stream.frames_sent.load(Ordering::Relaxed)
        + shared.stream.frames_dropped.load(Ordering::Relaxed);
    drop(fanout.stream.take());
    stop.store(true, Ordering::Relaxed);
    server.join().expect("server");
    let read: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
    assert!(
        sent >= 2 * 19_000 && read > 0,
        "frames went to both stream clients: {sent} sent or lost, {read} read"
    );
    assert!(
        frames > 19_000,
        "the loop really published frames: {frames}"
    );
    // All but the samples of the bins still within the grace period are in frames.
    assert!(
        in_frames <= pushed && in_frames + 20 >= pushed,
        "{in_frames} samples in frames of {pushed} fed"
    );
    assert!(late_frames >= 150, "the late path ran: {late_frames}");
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
