//! The aligner: turns per-CPU partial bins (ring-buffer records and snapshots of the kernel's
//! slots) into one published frame per bin, all links on the same epoch-aligned grid.
//!
//! Rules (see ARCHITECTURE.md):
//! - a bin `[b, b + w)` is published when CLOCK_TAI passes `b + w + grace`;
//! - the kernel emits a CPU's bin when that CPU sees a packet of a newer bin; for idle links the
//!   aligner takes the counts from the slot itself and remembers what it took, so the kernel's
//!   later record only adds the difference (and until that record arrives, takes nothing more
//!   from the slot); a slot still showing the bin of a record already drained is the kernel
//!   between submitting that record and moving on: nothing is taken from it;
//! - anything that arrives for a bin already published (late) is carried into the next
//!   published bin and counted: totals over any interval equal what the kernel counted.
//!
//! - probe RTT samples (by their reply's T4) and sent probes (by their T1) come from `lp-probe`
//!   through an SPSC queue drained each tick; one for a bin already published goes into the
//!   next frame, flagged `FLAG_RTT_LATE`.
//!
//! - passive TCP RTT samples ride in the kernel's slots and records like the counts (the bin
//!   their echo arrived in); their count and sum are taken by difference like the counts, min
//!   and max from the kernel's latest view of the bin (a superset of what was taken).
//!
//! Pure logic: the kernel is behind [`SlotSource`] and plain [`BinRecord`]s, so every rule is
//! unit-tested without privileges. Nothing here allocates after [`Aligner::new`].
use linkpulse_common::{bin_start, BinRecord, RttAcc, Slot, DIRS, MAX_LINKS, SLOTS_PER_CPU};

use crate::{
    clock::ClockState,
    frame::{
        Frame, RttBin, FLAG_CLOCK_STEP, FLAG_CLOCK_UNSYNC, FLAG_GAP, FLAG_LATE, FLAG_RTT_LATE,
        FLAG_SKIPPED,
    },
    probe::GridEvent,
};

/// Read access to the kernel's per-CPU slots (mmapped in the daemon, a Vec in tests).
pub trait SlotSource {
    fn ncpu(&self) -> usize;
    /// Copy of slot `index` (cpu * SLOTS_PER_CPU + link * 2 + dir).
    fn read(&self, index: usize) -> Slot;
}

/// Per-tick facts from outside the aligner.
#[derive(Debug, Clone, Copy)]
pub struct TickContext {
    pub now_tai: u64,
    pub clock: ClockState,
    /// A clock step was seen since the last tick.
    pub clock_stepped: bool,
    /// Links [0, link_count) are in use.
    pub link_count: usize,
    /// TAI time since which each link has been attached without interruption (0 = not now).
    pub attached_since: [u64; MAX_LINKS],
}

/// Counters the aligner keeps (exported to /metrics by the daemon).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlignStats {
    pub frames: u64,
    pub records: u64,
    /// Arrivals of data for a bin already published (each carried into the next frame).
    pub late_events: u64,
    pub late_packets: u64,
    /// Times the kernel found the ring full at a bin's end (the slot kept counting into its
    /// old bin; those counts arrive late, nothing is lost).
    pub ring_full: u64,
    /// The same, per link.
    pub ring_full_by_link: [u64; MAX_LINKS],
    /// Records naming a CPU or link out of range (should never happen).
    pub bad_records: u64,
    /// Slot reads caught while the kernel was updating the slot: a count lower than what was
    /// taken from it before, or the bin of a record already drained (nothing taken either way).
    pub torn_reads: u64,
    /// Bins skipped because the daemon fell behind by more than MAX_BEHIND or the clock jumped.
    pub skipped_bins: u64,
    /// Packets counted by the kernel as malformed (headers unreadable).
    pub malformed: u64,
    /// Probe samples and sent probes that arrived for a bin already published (each carried
    /// into the next frame).
    pub rtt_late_events: u64,
    /// Passive TCP RTT samples carried into a later frame (their bin was published).
    pub tcp_rtt_late: u64,
}

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Counts {
    packets: u64,
    bytes: u64,
    tcp_rtt: RttAcc,
}

impl Counts {
    fn is_zero(&self) -> bool {
        self.packets == 0 && self.bytes == 0 && self.tcp_rtt.count == 0
    }
    fn add(&mut self, p: u64, b: u64, rtt: &RttAcc) {
        self.packets += p;
        self.bytes += b;
        self.tcp_rtt.merge(rtt);
    }
}

/// What the aligner already took from a slot for its bin (resolved by the kernel's record).
#[derive(Clone, Copy, Default, Debug)]
struct Taken {
    bin: u64,
    packets: u64,
    bytes: u64,
    rtt_count: u32,
    rtt_sum_ns: u64,
}

/// The RTT samples of `now` (the kernel's view of a bin) not in what was taken before (count
/// and sum by difference; min and max of the whole bin, which covers the taken ones).
fn rtt_since(now: &RttAcc, taken_count: u32, taken_sum: u64) -> RttAcc {
    if now.count <= taken_count {
        return RttAcc::default();
    }
    RttAcc {
        count: now.count - taken_count,
        sum_ns: now.sum_ns.saturating_sub(taken_sum),
        ..*now
    }
}

/// Monotonic per-slot counters last seen.
#[derive(Clone, Copy, Default, Debug)]
struct Seen {
    ring_full: u64,
    malformed: u64,
}

/// How far behind real time the aligner may be before it skips to the present (and says so).
const MAX_BEHIND_NS: u64 = 2_000_000_000;

/// A link's probe figures of one bin while it is open: RTT samples and sent probes, and the
/// one-way delays of the samples that have them (a sample always counts in `rtt`).
#[derive(Clone, Copy, Default)]
struct ProbeAcc {
    rtt: RttBin,
    owd: crate::frame::OwdBin,
}

impl ProbeAcc {
    fn merge(&mut self, o: &ProbeAcc) {
        self.rtt.merge(&o.rtt);
        self.owd.merge(&o.owd);
    }
}

pub struct Aligner {
    width: u64,
    grace: u64,
    ncpu: usize,
    /// Start of the next bin to publish (0 until the first tick).
    next_bin: u64,
    /// Pending counts of the bins in [next_bin, next_bin + window * width), by bin number mod window.
    window: usize,
    pending: Box<[[Counts; SLOTS_PER_CPU]]>,
    taken: Box<[Taken]>,
    seen: Box<[Seen]>,
    /// Per slot, the bin of the last record drained from the ring (0 = none yet).
    recorded: Box<[u64]>,
    carry: [Counts; SLOTS_PER_CPU],
    /// Probe figures of the same bins as `pending` (empty until [`Aligner::set_probes`]).
    rtt_pending: Box<[[ProbeAcc; MAX_LINKS]]>,
    rtt_carry: [ProbeAcc; MAX_LINKS],
    probed_mask: u64,
    probe_feed: Option<rtrb::Consumer<GridEvent>>,
    /// The kernel matches TCP timestamps (frames then mark valid links in `tcp_rtt_mask`).
    tcp_rtt_on: bool,
    seq: u64,
    pending_step: bool,
    pending_skip: bool,
    frame: Frame,
    pub stats: AlignStats,
}

impl Aligner {
    pub fn new(width_ns: u64, grace_ns: u64, ncpu: usize) -> Self {
        // The window must hold every bin that can still receive data: grace plus a generous
        // allowance for the reader being late, in bins, as a power of two.
        let need = ((grace_ns + 50_000_000) / width_ns + 2) as usize;
        let window = need.next_power_of_two().clamp(16, 1 << 14);
        let slots = ncpu * SLOTS_PER_CPU;
        Self {
            width: width_ns,
            grace: grace_ns,
            ncpu,
            next_bin: 0,
            window,
            pending: vec![[Counts::default(); SLOTS_PER_CPU]; window].into_boxed_slice(),
            taken: vec![Taken::default(); slots].into_boxed_slice(),
            seen: vec![Seen::default(); slots].into_boxed_slice(),
            recorded: vec![0; slots].into_boxed_slice(),
            carry: [Counts::default(); SLOTS_PER_CPU],
            rtt_pending: Box::new([]),
            rtt_carry: [ProbeAcc::default(); MAX_LINKS],
            probed_mask: 0,
            probe_feed: None,
            tcp_rtt_on: false,
            seq: 0,
            pending_step: false,
            pending_skip: false,
            frame: Frame::default(),
            stats: AlignStats::default(),
        }
    }

    pub fn width_ns(&self) -> u64 {
        self.width
    }

    /// Start of the next bin to publish.
    pub fn next_bin(&self) -> u64 {
        self.next_bin
    }

    /// TAI time at which the next bin is due.
    pub fn next_deadline(&self) -> u64 {
        self.next_bin + self.width + self.grace
    }

    /// Starts the grid at the bin containing `now_tai` (called once, before records flow).
    pub fn start(&mut self, now_tai: u64) {
        self.next_bin = bin_start(now_tai, self.width);
    }

    /// Whether the kernel matches TCP timestamps (`[tcp_rtt] enabled`).
    pub fn set_tcp_rtt(&mut self, on: bool) {
        self.tcp_rtt_on = on;
    }

    /// The probed links (bit i = link i) and the prober's feed; allocates the per-bin probe
    /// accumulators (once, before the first tick).
    pub fn set_probes(&mut self, probed_mask: u64, feed: Option<rtrb::Consumer<GridEvent>>) {
        self.probed_mask = probed_mask;
        self.probe_feed = feed;
        if probed_mask != 0 && self.rtt_pending.is_empty() {
            self.rtt_pending =
                vec![[ProbeAcc::default(); MAX_LINKS]; self.window].into_boxed_slice();
        }
    }

    /// Takes everything the prober queued (each tick, before closing bins).
    pub fn drain_probes(&mut self) {
        // Taken out for the loop (the accumulators are updated inside); no allocation.
        let Some(mut feed) = self.probe_feed.take() else {
            return;
        };
        while let Ok(e) = feed.pop() {
            self.on_probe_event(&e);
        }
        self.probe_feed = Some(feed);
    }

    /// One sample (into the bin containing its T4) or sent probe (the bin containing its T1).
    pub fn on_probe_event(&mut self, e: &GridEvent) {
        let (link, t, rtt) = match *e {
            GridEvent::Sample {
                link,
                t4_tai_ns,
                rtt_ns,
                owd,
            } => (link as usize, t4_tai_ns, Some((rtt_ns, owd))),
            GridEvent::Sent { link, t1_tai_ns } => (link as usize, t1_tai_ns, None),
        };
        if link >= MAX_LINKS || self.rtt_pending.is_empty() {
            self.stats.bad_records += 1;
            return;
        }
        let end = self.next_bin + self.window as u64 * self.width;
        let acc = if t < self.next_bin || t >= end {
            // Its bin is published (or beyond the window: a clock jump): the next frame.
            self.stats.rtt_late_events += 1;
            &mut self.rtt_carry[link]
        } else {
            let k = ((t / self.width) as usize) & (self.window - 1);
            &mut self.rtt_pending[k][link]
        };
        match rtt {
            Some((r, owd)) => {
                acc.rtt.add_sample(r);
                if let Some(o) = owd {
                    acc.owd.add(&o);
                }
            }
            None => acc.rtt.probes_sent = acc.rtt.probes_sent.saturating_add(1),
        }
    }

    /// A completed per-CPU bin from the ring buffer.
    pub fn on_record(&mut self, rec: &BinRecord) {
        self.stats.records += 1;
        let cpu = rec.cpu as usize;
        let (link, dir) = (rec.link as usize, rec.dir as usize);
        if cpu >= self.ncpu || link >= MAX_LINKS || dir >= DIRS {
            self.stats.bad_records += 1;
            return;
        }
        let s = link * DIRS + dir;
        self.recorded[cpu * SLOTS_PER_CPU + s] = rec.bin_start;
        let t = &mut self.taken[cpu * SLOTS_PER_CPU + s];
        let (p, b, r) = if t.bin == rec.bin_start && t.bin != 0 {
            if rec.packets < t.packets || rec.bytes < t.bytes || rec.tcp_rtt.count < t.rtt_count {
                self.stats.torn_reads += 1;
            }
            let d = (
                rec.packets.saturating_sub(t.packets),
                rec.bytes.saturating_sub(t.bytes),
                rtt_since(&rec.tcp_rtt, t.rtt_count, t.rtt_sum_ns),
            );
            *t = Taken::default();
            d
        } else {
            (rec.packets, rec.bytes, rec.tcp_rtt)
        };
        self.add(rec.bin_start, s, p, b, &r);
    }

    /// Reads every in-use slot and takes the counts of bins that are due (idle links), or the
    /// growth since the last read. Call between two complete drains of the ring buffer.
    pub fn read_slots(&mut self, src: &impl SlotSource, now_tai: u64, link_count: usize) {
        let used = link_count.min(MAX_LINKS) * DIRS;
        let closable_end = now_tai.saturating_sub(self.grace);
        for cpu in 0..self.ncpu.min(src.ncpu()) {
            for s in 0..used {
                let i = cpu * SLOTS_PER_CPU + s;
                let snap = src.read(i);
                let seen = self.seen[i];
                self.seen[i] = Seen {
                    ring_full: snap.ring_full,
                    malformed: snap.malformed,
                };
                self.stats.malformed += snap.malformed.wrapping_sub(seen.malformed);
                let full = snap.ring_full.wrapping_sub(seen.ring_full);
                self.stats.ring_full += full;
                self.stats.ring_full_by_link[s / DIRS] += full;
                if snap.bin_start != 0 && snap.bin_start == self.recorded[i] {
                    // The kernel submitted this bin's record, which we drained, and has not
                    // moved the slot on yet (its CPU was held up in between): the record had
                    // every count. Taking them again would count them twice and leave `taken`
                    // waiting for a record that already came.
                    self.stats.torn_reads += 1;
                    continue;
                }
                let t = self.taken[i];
                if t.bin != 0 && t.bin != snap.bin_start {
                    // The kernel moved on from a bin we took from: it submitted that bin's
                    // record (a full ring keeps the slot on its bin), which resolves `taken`
                    // in the next drain. Take nothing from this slot until then.
                    continue;
                }
                if snap.bin_start == 0 || snap.bin_start + self.width > closable_end {
                    continue; // empty, or its bin may still receive packets
                }
                let (p, b) = (
                    snap.packets.saturating_sub(t.packets),
                    snap.bytes.saturating_sub(t.bytes),
                );
                let r = rtt_since(&snap.tcp_rtt, t.rtt_count, t.rtt_sum_ns);
                if snap.packets < t.packets
                    || snap.bytes < t.bytes
                    || snap.tcp_rtt.count < t.rtt_count
                {
                    self.stats.torn_reads += 1;
                }
                self.taken[i] = Taken {
                    bin: snap.bin_start,
                    packets: snap.packets.max(t.packets),
                    bytes: snap.bytes.max(t.bytes),
                    rtt_count: snap.tcp_rtt.count.max(t.rtt_count),
                    rtt_sum_ns: snap.tcp_rtt.sum_ns.max(t.rtt_sum_ns),
                };
                self.add(snap.bin_start, s, p, b, &r);
            }
        }
    }

    fn add(&mut self, bin: u64, s: usize, p: u64, b: u64, rtt: &RttAcc) {
        if p == 0 && b == 0 && rtt.count == 0 {
            return;
        }
        if bin < self.next_bin || bin >= self.next_bin + self.window as u64 * self.width {
            // Late (already published) or beyond the window (a clock jump): carried into the
            // next frame so that nothing is lost; the frame says so.
            self.stats.late_events += 1;
            self.stats.late_packets += p;
            self.stats.tcp_rtt_late += u64::from(rtt.count);
            self.carry[s].add(p, b, rtt);
        } else {
            let k = ((bin / self.width) as usize) & (self.window - 1);
            self.pending[k][s].add(p, b, rtt);
        }
    }

    /// Publishes every bin whose deadline has passed, calling `emit` once per frame.
    pub fn close_due(&mut self, ctx: &TickContext, mut emit: impl FnMut(&Frame)) {
        let now = ctx.now_tai;
        if self.next_bin == 0 {
            self.start(now);
        }
        if ctx.clock_stepped {
            self.pending_step = true;
        }
        let behind = now.saturating_sub(self.next_deadline());
        if now + 2 * self.width < self.next_bin || behind > MAX_BEHIND_NS {
            // TAI went backwards, or we are hopelessly behind (suspend, forward step): keep
            // every count (carried into the next frame) and restart the grid at the present.
            self.carry_all_pending();
            let restart = bin_start(now.saturating_sub(self.grace + self.width), self.width);
            if restart > self.next_bin {
                self.stats.skipped_bins += (restart - self.next_bin) / self.width;
            }
            self.next_bin = restart;
            self.pending_skip = true;
        }
        while self.next_deadline() <= now {
            self.publish_next(ctx);
            emit(&self.frame);
        }
    }

    fn carry_all_pending(&mut self) {
        for bin in self.pending.iter_mut() {
            for (s, c) in bin.iter_mut().enumerate() {
                self.carry[s].add(c.packets, c.bytes, &c.tcp_rtt);
                *c = Counts::default();
            }
        }
        for bin in self.rtt_pending.iter_mut() {
            for (l, r) in bin.iter_mut().enumerate() {
                self.rtt_carry[l].merge(r);
                *r = ProbeAcc::default();
            }
        }
    }

    fn publish_next(&mut self, ctx: &TickContext) {
        let bin = self.next_bin;
        let k = ((bin / self.width) as usize) & (self.window - 1);
        let links = ctx.link_count.min(MAX_LINKS);
        let f = &mut self.frame;
        f.bin_start_tai_ns = bin;
        f.bin_start_utc_ns = ctx.clock.tai_to_utc(bin);
        f.width_ns = self.width;
        f.seq = self.seq;
        f.link_count = links as u32;
        f.flags = 0;
        f.valid_mask = 0;
        f.late_mask = 0;
        f.probed_mask = self.probed_mask;
        f.rtt_late_mask = 0;
        f.tcp_rtt_mask = if self.tcp_rtt_on { u64::MAX } else { 0 };
        let mut traffic_late = false;
        for l in 0..MAX_LINKS {
            let mut lb = crate::frame::LinkBin::default();
            let mut tcp = RttAcc::default();
            for d in 0..DIRS {
                let s = l * DIRS + d;
                let c = self.pending[k][s];
                let carry = self.carry[s];
                if !carry.is_zero() {
                    f.late_mask |= 1 << l;
                    traffic_late = true;
                }
                lb.packets[d] = c.packets + carry.packets;
                lb.bytes[d] = c.bytes + carry.bytes;
                tcp.merge(&c.tcp_rtt);
                tcp.merge(&carry.tcp_rtt);
                self.pending[k][s] = Counts::default();
                self.carry[s] = Counts::default();
            }
            f.links[l] = lb;
            f.tcp_rtt[l] = RttBin::from_acc(&tcp);
            let mut r = ProbeAcc::default();
            if let Some(p) = self.rtt_pending.get_mut(k) {
                r = p[l];
                p[l] = ProbeAcc::default();
            }
            let carry = self.rtt_carry[l];
            if !carry.rtt.is_empty() {
                r.merge(&carry);
                self.rtt_carry[l] = ProbeAcc::default();
                f.rtt_late_mask |= 1 << l;
            }
            f.rtt[l] = r.rtt;
            f.owd[l] = r.owd;
            let since = ctx.attached_since[l];
            if l < links {
                if since != 0 && since <= bin {
                    f.valid_mask |= 1 << l;
                } else {
                    f.flags |= FLAG_GAP;
                }
            }
        }
        f.tcp_rtt_mask &= f.valid_mask;
        if traffic_late {
            f.flags |= FLAG_LATE;
        }
        if f.rtt_late_mask != 0 {
            f.flags |= FLAG_RTT_LATE;
        }
        if !ctx.clock.synced {
            f.flags |= FLAG_CLOCK_UNSYNC;
        }
        if self.pending_step {
            f.flags |= FLAG_CLOCK_STEP;
            self.pending_step = false;
        }
        if self.pending_skip {
            f.flags |= FLAG_SKIPPED;
            self.pending_skip = false;
        }
        self.seq += 1;
        self.next_bin += self.width;
        self.stats.frames += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linkpulse_common::slot_index;

    const W: u64 = 100_000;
    const G: u64 = 1_000_000;
    const T0: u64 = 1_700_000_000_000_000_000;

    struct Fake {
        ncpu: usize,
        slots: Vec<Slot>,
    }
    impl SlotSource for Fake {
        fn ncpu(&self) -> usize {
            self.ncpu
        }
        fn read(&self, index: usize) -> Slot {
            self.slots[index]
        }
    }

    /// A packet the model's kernel has submitted the finished bin for but not yet counted.
    struct Stalled {
        index: usize,
        new_bin: Option<u64>,
        bytes: u64,
    }

    /// A model of the kernel program: per-CPU slots, a ring that can be made to refuse.
    struct Kernel {
        src: Fake,
        ring: Vec<BinRecord>,
        ring_cap: usize,
    }
    impl Kernel {
        fn new(ncpu: usize, ring_cap: usize) -> Self {
            Self {
                src: Fake {
                    ncpu,
                    slots: vec![Slot::default(); ncpu * SLOTS_PER_CPU],
                },
                ring: Vec::new(),
                ring_cap,
            }
        }
        fn packet(&mut self, cpu: u32, link: u32, dir: u8, t: u64, bytes: u64) {
            let p = self.begin_packet(cpu, link, dir, t, bytes);
            self.finish_packet(p);
        }

        /// The program's first half for a packet: on a newer bin, the finished bin goes to the
        /// ring; the slot is not touched yet (its CPU stalls here until [`Self::finish_packet`]).
        fn begin_packet(&mut self, cpu: u32, link: u32, dir: u8, t: u64, bytes: u64) -> Stalled {
            let bin = bin_start(t, W);
            let index = slot_index(cpu, link, dir) as usize;
            let slot = &mut self.src.slots[index];
            let mut new_bin = None;
            if slot.bin_start != bin {
                let emitted = slot.packets == 0 || {
                    if self.ring.len() < self.ring_cap {
                        self.ring.push(BinRecord::of(slot, cpu, link, dir));
                        true
                    } else {
                        slot.ring_full += 1;
                        false
                    }
                };
                if emitted {
                    new_bin = Some(bin);
                }
            }
            Stalled {
                index,
                new_bin,
                bytes,
            }
        }

        /// The program's second half: the slot moves to the new bin and counts the packet.
        fn finish_packet(&mut self, p: Stalled) {
            let slot = &mut self.src.slots[p.index];
            if let Some(bin) = p.new_bin {
                slot.bin_start = bin;
                slot.packets = 0;
                slot.bytes = 0;
                slot.tcp_rtt = RttAcc::default();
            }
            slot.packets += 1;
            slot.bytes += p.bytes;
        }

        /// An ingress packet that echoes a stored TSval: one RTT sample in its bin.
        fn echo(&mut self, cpu: u32, link: u32, t: u64, rtt_ns: u64) {
            self.packet(cpu, link, 0, t, 52);
            self.src.slots[slot_index(cpu, link, 0) as usize]
                .tcp_rtt
                .add(rtt_ns);
        }
    }

    fn ctx(now: u64, links: usize) -> TickContext {
        TickContext {
            now_tai: now,
            clock: ClockState {
                tai_offset_s: 37,
                synced: true,
                ..Default::default()
            },
            clock_stepped: false,
            link_count: links,
            attached_since: [1; MAX_LINKS],
        }
    }

    fn tick(a: &mut Aligner, k: &mut Kernel, now: u64, links: usize, out: &mut Vec<Frame>) {
        tick_racing(a, k, now, links, out, |_| {});
    }

    /// A tick during which the kernel also runs (`race`) between reading the slots and the
    /// second drain of the ring: the interleaving that a sequential model misses.
    fn tick_racing(
        a: &mut Aligner,
        k: &mut Kernel,
        now: u64,
        links: usize,
        out: &mut Vec<Frame>,
        race: impl FnOnce(&mut Kernel),
    ) {
        for r in k.ring.drain(..) {
            a.on_record(&r);
        }
        a.read_slots(&k.src, now, links);
        race(k);
        for r in k.ring.drain(..) {
            a.on_record(&r);
        }
        a.close_due(&ctx(now, links), |f| out.push(*f));
    }

    #[test]
    fn frames_are_aligned_consecutive_and_utc() {
        let mut a = Aligner::new(W, G, 2);
        let mut k = Kernel::new(2, 1 << 20);
        let mut out = Vec::new();
        tick(&mut a, &mut k, T0 + 12_345, 2, &mut out);
        assert!(out.is_empty());
        tick(&mut a, &mut k, T0 + 20 * W, 2, &mut out);
        assert!(!out.is_empty());
        for (i, f) in out.iter().enumerate() {
            assert_eq!(f.bin_start_tai_ns % W, 0);
            assert_eq!(f.bin_start_tai_ns, T0 + i as u64 * W);
            assert_eq!(
                f.bin_start_utc_ns,
                (T0 + i as u64 * W) as i64 - 37_000_000_000
            );
            assert_eq!(f.seq, i as u64);
            // bins are published only after end + grace
            assert!(f.bin_start_tai_ns + W + G <= T0 + 20 * W);
        }
    }

    #[test]
    fn idle_link_gets_its_bin_from_the_snapshot_and_the_record_adds_only_the_rest() {
        let mut a = Aligner::new(W, G, 1);
        let mut k = Kernel::new(1, 1 << 20);
        let mut out = Vec::new();
        tick(&mut a, &mut k, T0, 1, &mut out);
        k.packet(0, 0, 1, T0 + 10, 100);
        k.packet(0, 0, 1, T0 + 20, 200);
        // the link goes idle: the bin is due at T0 + W + G and must come out with both packets
        tick(&mut a, &mut k, T0 + W + G, 1, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].links[0].packets[1], 2);
        assert_eq!(out[0].links[0].bytes[1], 300);
        // much later a packet: the kernel emits the old bin (2 packets, already taken)
        k.packet(0, 0, 1, T0 + 50 * W + 5, 50);
        tick(&mut a, &mut k, T0 + 52 * W + G, 1, &mut out);
        let total: u64 = out.iter().map(|f| f.links[0].bytes[1]).sum();
        assert_eq!(total, 350, "no double count");
        assert_eq!(a.stats.late_events, 0);
        let f = out.iter().find(|f| f.links[0].bytes[1] == 50).expect("bin");
        assert_eq!(f.bin_start_tai_ns, T0 + 50 * W);
    }

    #[test]
    fn tcp_rtt_samples_land_in_their_echo_bin_across_cpus_idle_and_late() {
        let mut a = Aligner::new(W, G, 2);
        a.set_tcp_rtt(true);
        let mut k = Kernel::new(2, 1 << 20);
        let mut out = Vec::new();
        tick(&mut a, &mut k, T0, 2, &mut out);
        // Bin 0: samples on both CPUs of link 1.
        k.echo(0, 1, T0 + 10, 30_000_000);
        k.echo(1, 1, T0 + 20, 20_000_000);
        k.echo(0, 1, T0 + 30, 25_000_000);
        // Bin 1: link 1 goes on (the kernel emits bin 0 of CPU 0 by record).
        k.echo(0, 1, T0 + W + 5, 40_000_000);
        // Both bins due: CPU 1's bin 0 and CPU 0's bin 1 come from the idle slots.
        tick(&mut a, &mut k, T0 + 2 * W + G, 2, &mut out);
        assert_eq!(out.len(), 2);
        let b0 = out[0].tcp_rtt[1];
        assert_eq!(
            (b0.rtt_count, b0.rtt_min_ns, b0.rtt_max_ns, b0.rtt_sum_ns),
            (3, 20_000_000, 30_000_000, 75_000_000)
        );
        let b1 = out[1].tcp_rtt[1];
        assert_eq!((b1.rtt_count, b1.rtt_min_ns), (1, 40_000_000));
        assert_eq!(out[0].tcp_rtt[0].rtt_count, 0);
        assert_eq!(out[0].tcp_rtt_mask, 0b11);
        // A sample stamped in a published bin (1) shows up after it was closed: carried.
        k.echo(1, 1, T0 + W + 50, 5_000);
        tick(&mut a, &mut k, T0 + 4 * W + G, 2, &mut out);
        let late = out
            .iter()
            .find(|f| f.tcp_rtt[1].rtt_count == 1 && f.tcp_rtt[1].rtt_max_ns == 5_000);
        let late = late.expect("late sample in a later frame");
        assert!(late.late_mask & 0b10 != 0 && late.flags & FLAG_LATE != 0);
        // The kernel's later records of bins already taken add nothing.
        k.echo(0, 1, T0 + 40 * W, 1_000);
        k.echo(1, 1, T0 + 40 * W + 1, 2_000);
        tick(&mut a, &mut k, T0 + 42 * W + G, 2, &mut out);
        let total: u32 = out.iter().map(|f| f.tcp_rtt[1].rtt_count).sum();
        assert_eq!(total, 7, "every sample exactly once");
        let f40 = out
            .iter()
            .find(|f| f.bin_start_tai_ns == T0 + 40 * W)
            .expect("bin 40");
        assert_eq!(f40.tcp_rtt[1].rtt_count, 2);
        assert_eq!(f40.tcp_rtt[1].rtt_max_ns, 2_000);
        assert!(a.stats.tcp_rtt_late >= 1);
        // Off: the mask says so.
        a.set_tcp_rtt(false);
        tick(&mut a, &mut k, T0 + 44 * W + G, 2, &mut out);
        assert_eq!(out.last().expect("frame").tcp_rtt_mask, 0);
    }

    /// The kernel submits a finished bin's record, then its CPU stalls (an interrupt, the
    /// hypervisor) before it moves the slot on, while the daemon ticks: the first drain takes
    /// the record, the slot still shows that bin. Taking the slot's counts then counted them
    /// twice, and left the slot waiting for a record already taken: the bins it counted next
    /// came out only when the kernel moved on again, and its last one, on a link gone idle,
    /// not at all.
    #[test]
    fn a_slot_still_showing_a_bin_whose_record_was_drained_is_not_taken_again() {
        for taken_before in [false, true] {
            let mut a = Aligner::new(W, G, 1);
            let mut k = Kernel::new(1, 1 << 20);
            let mut out = Vec::new();
            tick(&mut a, &mut k, T0, 1, &mut out);
            k.packet(0, 0, 1, T0 + 10, 100);
            if taken_before {
                // the link goes idle: bin 0 comes out of the slot
                tick(&mut a, &mut k, T0 + W + G, 1, &mut out);
            }
            let stalled = k.begin_packet(0, 0, 1, T0 + 30 * W + 5, 50);
            tick(&mut a, &mut k, T0 + 30 * W + G / 2, 1, &mut out);
            k.finish_packet(stalled);
            // the link is idle again: bin 30 is due at 31 W + G
            tick(&mut a, &mut k, T0 + 31 * W + G, 1, &mut out);
            let packets: u64 = out.iter().map(|f| f.links[0].packets[1]).sum();
            let bytes: u64 = out.iter().map(|f| f.links[0].bytes[1]).sum();
            assert_eq!((packets, bytes), (2, 150), "taken before: {taken_before}");
            let b30 = out
                .iter()
                .find(|f| f.bin_start_tai_ns == T0 + 30 * W)
                .expect("bin 30");
            assert_eq!(b30.links[0].bytes[1], 50, "bin 30 on time, from the slot");
            assert_eq!(a.stats.late_events, 0);
            assert_eq!(
                a.stats.torn_reads, 1,
                "the stale slot was seen and left alone"
            );
        }
    }

    #[test]
    fn late_packet_is_carried_and_flagged() {
        let mut a = Aligner::new(W, G, 1);
        let mut k = Kernel::new(1, 1 << 20);
        let mut out = Vec::new();
        tick(&mut a, &mut k, T0, 1, &mut out);
        k.packet(0, 0, 0, T0 + 10, 100);
        tick(&mut a, &mut k, T0 + W + G, 1, &mut out);
        // a packet stamped in the published bin arrives after the snapshot (grace too short)
        k.packet(0, 0, 0, T0 + 99_999, 7);
        k.packet(0, 0, 0, T0 + 3 * W, 1);
        tick(&mut a, &mut k, T0 + 2 * W + G, 1, &mut out);
        let late = out.last().expect("frame");
        assert_eq!(late.links[0].bytes[0], 7);
        assert!(late.flags & FLAG_LATE != 0);
        assert_eq!(a.stats.late_events, 1);
    }

    #[test]
    fn ring_full_keeps_counting_without_loss_or_double_count() {
        let mut a = Aligner::new(W, G, 1);
        let mut k = Kernel::new(1, 0); // ring always full
        let mut out = Vec::new();
        tick(&mut a, &mut k, T0, 1, &mut out);
        let mut sent = 0;
        for i in 0..300u64 {
            let t = T0 + i * 37_000;
            k.packet(0, 0, 0, t, 10 + i);
            sent += 10 + i;
            if i % 7 == 0 {
                tick(&mut a, &mut k, t, 1, &mut out);
            }
        }
        tick(&mut a, &mut k, T0 + 1_000 * W, 1, &mut out);
        let got: u64 = out.iter().map(|f| f.links[0].bytes[0]).sum();
        assert_eq!(got, sent);
        assert!(a.stats.ring_full > 0);
        assert_eq!(a.stats.ring_full_by_link[0], a.stats.ring_full);
    }

    /// Conservation under random interleavings of packets, CPUs, links and ticks.
    #[test]
    fn totals_are_exact_under_random_interleavings() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        for seed in 0..20u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let ncpu = 1 + (seed as usize % 3);
            let links = 4;
            let mut a = Aligner::new(W, G, ncpu);
            let mut k = Kernel::new(ncpu, if seed % 4 == 0 { 3 } else { 1 << 20 });
            let mut out = Vec::new();
            let mut truth = [[0u64; 2]; 4];
            let mut t = T0;
            let mut last_now = t;
            tick(&mut a, &mut k, t, links, &mut out);
            for _ in 0..5_000 {
                t += rng.gen_range(0..40_000);
                let (l, d, c) = (
                    rng.gen_range(0..4),
                    rng.gen_range(0..2),
                    rng.gen_range(0..ncpu),
                );
                let b = rng.gen_range(40..1500);
                k.packet(c as u32, l as u32, d as u8, t, b);
                truth[l][d] += b;
                if rng.gen_bool(0.05) {
                    // the daemon ticks at any moment (its clock never goes back here), sometimes
                    // ahead of packets the model then stamps in already published bins, and
                    // sometimes the kernel moves a slot on while the daemon is mid-tick
                    last_now = last_now.max(t + rng.gen_range(0..2 * G));
                    let (rl, rd, rc) = (
                        rng.gen_range(0..4),
                        rng.gen_range(0..2),
                        rng.gen_range(0..ncpu),
                    );
                    let rb = rng.gen_range(40..1500);
                    // 0: no race; 1: a packet between the slot read and the second drain;
                    // 2: a packet whose CPU stalls through the whole tick between submitting
                    // the finished bin and updating the slot
                    let race = rng.gen_range(0..3);
                    let rt = last_now;
                    let stalled =
                        (race == 2).then(|| k.begin_packet(rc as u32, rl as u32, rd as u8, rt, rb));
                    tick_racing(&mut a, &mut k, last_now, links, &mut out, |k| {
                        if race == 1 {
                            k.packet(rc as u32, rl as u32, rd as u8, rt, rb);
                        }
                    });
                    if let Some(p) = stalled {
                        k.finish_packet(p);
                    }
                    if race != 0 {
                        truth[rl][rd] += rb;
                    }
                }
            }
            tick(&mut a, &mut k, last_now.max(t + 10 * G), links, &mut out);
            // flush the per-CPU tails: one packet in a far bin per slot, then publish everything
            for c in 0..ncpu {
                for l in 0..4 {
                    for d in 0..2 {
                        k.packet(c as u32, l, d, last_now + 20 * G, 0);
                    }
                }
            }
            tick(&mut a, &mut k, last_now + 40 * G, links, &mut out);
            for (l, dirs) in truth.iter().enumerate() {
                for (d, want) in dirs.iter().enumerate() {
                    let got: u64 = out.iter().map(|f| f.links[l].bytes[d]).sum();
                    assert_eq!(got, *want, "seed {seed} link {l} dir {d}");
                }
            }
            for w in out.windows(2) {
                assert_eq!(w[1].seq, w[0].seq + 1);
                assert_eq!(w[1].bin_start_tai_ns, w[0].bin_start_tai_ns + W);
            }
        }
    }

    #[test]
    fn links_not_attached_for_the_whole_bin_are_marked_missing() {
        let mut a = Aligner::new(W, G, 1);
        let mut c = ctx(T0 + 5 * W + G, 2);
        a.start(T0);
        c.attached_since[0] = T0 + 2 * W + 1; // attached mid-bin 2
        c.attached_since[1] = 0; // not attached
        let mut out = Vec::new();
        a.close_due(&c, |f| out.push(*f));
        assert_eq!(out.len(), 5);
        assert!(!out[2].is_valid(0));
        assert!(out[3].is_valid(0));
        assert!(out
            .iter()
            .all(|f| !f.is_valid(1) && f.flags & FLAG_GAP != 0));
    }

    #[test]
    fn clock_jumps_skip_ahead_without_losing_counts() {
        let mut a = Aligner::new(W, G, 1);
        let mut k = Kernel::new(1, 1 << 20);
        let mut out = Vec::new();
        tick(&mut a, &mut k, T0, 1, &mut out);
        k.packet(0, 0, 0, T0 + 10, 100);
        // 1 hour forward jump: no 36M frames, one skip, the count survives
        let later = T0 + 3_600_000_000_000;
        tick(&mut a, &mut k, later, 1, &mut out);
        assert!(out.len() < 100, "{}", out.len());
        assert!(out.iter().any(|f| f.flags & FLAG_SKIPPED != 0));
        let total: u64 = out.iter().map(|f| f.links[0].bytes[0]).sum();
        assert_eq!(total, 100);
        // backward jump: the grid restarts at the present
        let before = out.len();
        tick(&mut a, &mut k, later - 600_000_000_000, 1, &mut out);
        tick(
            &mut a,
            &mut k,
            later - 600_000_000_000 + 5 * W + G,
            1,
            &mut out,
        );
        assert!(out.len() > before);
        assert!(out.last().unwrap().bin_start_tai_ns < later - 500_000_000_000);
    }

    fn sample(link: u16, t4: u64, rtt: u64) -> GridEvent {
        GridEvent::Sample {
            link,
            t4_tai_ns: t4,
            rtt_ns: rtt,
            owd: None,
        }
    }

    fn synced_sample(link: u16, t4: u64, up: i64, down: i64, error: u64) -> GridEvent {
        GridEvent::Sample {
            link,
            t4_tai_ns: t4,
            rtt_ns: (up + down) as u64,
            owd: Some(crate::probe::oneway::OneWay {
                up_ns: up,
                down_ns: down,
                error_ns: error,
            }),
        }
    }

    #[test]
    fn one_way_delays_go_with_their_sample_and_stay_empty_without_synced_clocks() {
        let mut a = Aligner::new(W, G, 1);
        let (mut tx, rx) = rtrb::RingBuffer::new(64);
        a.set_probes(0b11, Some(rx));
        a.start(T0);
        // Bin 0: two synced samples and an unsynced one on link 0; link 1 only unsynced.
        for e in [
            synced_sample(0, T0 + 10, 20_000, 25_000, 1_500),
            sample(0, T0 + 20, 44_000),
            synced_sample(0, T0 + 30, -3_000, 48_000, 2_500),
            sample(1, T0 + 40, 40_000),
        ] {
            tx.push(e).unwrap();
        }
        a.drain_probes();
        let mut out = Vec::new();
        a.close_due(&ctx(T0 + W + G, 2), |f| out.push(*f));
        assert_eq!(out.len(), 1);
        let (r, o) = (&out[0].rtt[0], &out[0].owd[0]);
        assert_eq!(r.rtt_count, 3, "every sample counts in the RTT");
        assert_eq!(o.count, 2, "only the synced ones have one-way delays");
        assert_eq!(
            (o.up_min_ns, o.up_max_ns, o.up_sum_ns),
            (-3_000, 20_000, 17_000)
        );
        assert_eq!(
            (o.down_min_ns, o.down_max_ns, o.down_sum_ns),
            (25_000, 48_000, 73_000)
        );
        assert_eq!(o.error_max_ns, 2_500);
        assert!(out[0].owd[1].is_empty());
        assert_eq!(out[0].owd[1], crate::frame::OwdBin::default());
        // A late synced sample is carried into the next frame with its RTT.
        tx.push(synced_sample(0, T0 + 5, 1_000, 2_000, 10)).unwrap();
        a.drain_probes();
        a.close_due(&ctx(T0 + 2 * W + G, 2), |f| out.push(*f));
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].rtt_late_mask, 0b1);
        assert_eq!((out[1].rtt[0].rtt_count, out[1].owd[0].count), (1, 1));
        assert_eq!(out[1].owd[0].up_sum_ns, 1_000);
    }

    fn sent(link: u16, t1: u64) -> GridEvent {
        GridEvent::Sent {
            link,
            t1_tai_ns: t1,
        }
    }

    #[test]
    fn probe_samples_land_in_the_bin_of_their_t4_and_sends_in_the_bin_of_their_t1() {
        let mut a = Aligner::new(W, G, 1);
        let (mut tx, rx) = rtrb::RingBuffer::new(64);
        a.set_probes(0b101, Some(rx));
        a.start(T0);
        // Bin 0: two samples on link 0, one sent; bin 2: a sample on link 2, two sent.
        for e in [
            sent(0, T0 + 10),
            sample(0, T0 + 50, 700),
            sample(0, T0 + W - 1, 300),
            sample(2, T0 + 2 * W + 5, 1_000),
            sent(2, T0 + 2 * W),
            sent(2, T0 + 3 * W - 1),
        ] {
            tx.push(e).unwrap();
        }
        a.drain_probes();
        let mut out = Vec::new();
        a.close_due(&ctx(T0 + 3 * W + G, 3), |f| out.push(*f));
        assert_eq!(out.len(), 3);
        let f0 = &out[0];
        assert_eq!(f0.probed_mask, 0b101);
        assert_eq!(f0.rtt[0].rtt_count, 2);
        assert_eq!(f0.rtt[0].probes_sent, 1);
        assert_eq!(f0.rtt[0].rtt_min_ns, 300);
        assert_eq!(f0.rtt[0].rtt_max_ns, 700);
        assert_eq!(f0.rtt[0].rtt_sum_ns, 1_000);
        assert_eq!(f0.rtt[2], RttBin::default());
        assert_eq!(out[1].rtt[0], RttBin::default());
        assert_eq!(out[1].rtt[2], RttBin::default());
        assert_eq!(out[2].rtt[2].rtt_count, 1);
        assert_eq!(out[2].rtt[2].probes_sent, 2);
        assert_eq!(out[2].rtt[2].rtt_min_ns, 1_000);
        for f in &out {
            assert_eq!(f.flags & (FLAG_RTT_LATE | FLAG_LATE), 0);
            assert_eq!(f.late_mask | f.rtt_late_mask, 0);
        }
        // Nothing is kept: the window's slots are reused clean.
        let mut more = Vec::new();
        a.close_due(&ctx(T0 + 40 * W + G, 3), |f| more.push(*f));
        assert!(more.iter().all(|f| f.rtt.iter().all(RttBin::is_empty)));
        assert_eq!(a.stats.rtt_late_events, 0);
    }

    #[test]
    fn a_late_probe_sample_goes_into_the_next_frame_flagged_never_lost() {
        let mut a = Aligner::new(W, G, 1);
        let (mut tx, rx) = rtrb::RingBuffer::new(64);
        a.set_probes(0b1, Some(rx));
        a.start(T0);
        let mut out = Vec::new();
        a.close_due(&ctx(T0 + 2 * W + G, 1), |f| out.push(*f));
        assert_eq!(out.len(), 2);
        // Two samples and a send for bin 0, already published; one sample for bin 2.
        for e in [
            sample(0, T0 + 5, 400),
            sample(0, T0 + W + 5, 900),
            sent(0, T0 + 1),
            sample(0, T0 + 2 * W + 1, 100),
        ] {
            tx.push(e).unwrap();
        }
        a.drain_probes();
        assert_eq!(a.stats.rtt_late_events, 3);
        a.close_due(&ctx(T0 + 4 * W + G, 1), |f| out.push(*f));
        let f = &out[2];
        assert_eq!(f.bin_start_tai_ns, T0 + 2 * W);
        assert_ne!(f.flags & FLAG_RTT_LATE, 0);
        assert_eq!(f.flags & FLAG_LATE, 0, "no traffic was late");
        assert_eq!(f.late_mask, 0, "traffic's late mask is the rollups'");
        assert_eq!(f.rtt_late_mask, 1);
        assert_eq!(f.rtt[0].rtt_count, 3);
        assert_eq!(f.rtt[0].probes_sent, 1);
        assert_eq!(f.rtt[0].rtt_min_ns, 100);
        assert_eq!(f.rtt[0].rtt_max_ns, 900);
        assert_eq!(f.rtt[0].rtt_sum_ns, 1_400);
        // The carry is consumed once.
        assert_eq!(out[3].flags & FLAG_RTT_LATE, 0);
        assert!(out[3].rtt[0].is_empty());
        let total: u32 = out.iter().map(|f| f.rtt[0].rtt_count).sum();
        assert_eq!(total, 3);
    }

    #[test]
    fn probe_events_without_probes_set_or_out_of_range_are_counted_not_stored() {
        let mut a = Aligner::new(W, G, 1);
        a.start(T0);
        a.on_probe_event(&sample(0, T0, 1));
        a.set_probes(1, None);
        a.on_probe_event(&sample(MAX_LINKS as u16, T0, 1));
        assert_eq!(a.stats.bad_records, 2);
        a.drain_probes(); // no feed: nothing to do
        let mut out = Vec::new();
        a.close_due(&ctx(T0 + W + G, 1), |f| out.push(*f));
        assert!(out[0].rtt[0].is_empty());
    }
}
