//! One link's STAMP session as the sender sees it: probes in flight, kernel stamps (T1, T4),
//! replies, RTT samples, and loss split per direction by the reflector's sequence number.
//!
//! Pure logic, no I/O and no allocation after `new` (the in-flight table is sized once from
//! the link's highest rate and the loss timeout), so it is unit-tested without a network.
//!
//! Loss per direction: a stateful reflector numbers the packets it reflects 0, 1, 2…, so when
//! the reply to sender sequence `s` carries reflector sequence `r`, `s - r` probes were lost
//! on the way up so far. Probes are settled in sender-sequence order (a cursor): each lost
//! probe waits for the next answered one; the growth of `s - r` between two answered probes
//! is the upstream share of the lost probes between them, the rest were lost downstream.
//! This is exact when the path does not reorder; a reordered upstream is counted in
//! `reordered` and may shift a loss between directions (never changes the total).
use crate::stamp::{ErrorEstimate, ReflectorPacket, Timestamp};

const FREE: u8 = 0;
const SENT: u8 = 1;
const REPLIED: u8 = 2;
const LOST: u8 = 3;

#[derive(Clone, Copy, Default)]
struct Entry {
    seq: u32,
    state: u8,
    /// An RTT sample was produced (T1, T4 and the reply all arrived).
    sampled: bool,
    sent_mono_ns: u64,
    sender_ts: Timestamp,
    t1: u64,
    t4: u64,
    t4_refl_seq: u32,
    refl_seq: u32,
    /// T3 − T2 at the reflector (ns).
    refl_hold_ns: u64,
    t2_ns: u64,
    /// The reply's Error Estimate: the reflector's clock (synced?, format, error).
    refl_error: ErrorEstimate,
}

/// One RTT measurement: (T4 − T1) − (T3 − T2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub link: u16,
    pub seq: u32,
    pub refl_seq: u32,
    /// TAI ns the probe left (kernel egress stamp).
    pub t1_tai_ns: u64,
    /// TAI ns the reply arrived (kernel ingress stamp).
    pub t4_tai_ns: u64,
    /// T3 − T2 at the reflector.
    pub reflector_hold_ns: u64,
    /// T2 as the reflector reported it (ns since the UNIX epoch on its clock's scale).
    pub t2_ns: u64,
    pub rtt_ns: u64,
    /// The reflector's Error Estimate: whether its clock is synchronised, the scale of T2 and
    /// T3 (Z), its error bound. One-way delays need it (`super::oneway`).
    pub reflector_error: ErrorEstimate,
}

/// How a probe ended, for the rollups (each probe counts in the window of its T1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// A reply came within the loss timeout.
    Answered,
    /// No reply within the loss timeout. Its direction follows as `LostUp` / `LostDown` for
    /// the same probe once a later probe is answered (never if the reflector's numbering
    /// restarted in between: then it stays unknown).
    Lost,
    LostUp,
    LostDown,
}

/// A probe settled (answered or lost), or the direction of a lost one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub link: u16,
    pub seq: u32,
    pub fate: Fate,
    /// Kernel T1 (TAI ns); 0 when its stamp never came (ring full).
    pub t1_tai_ns: u64,
    /// When the socket took the probe (CLOCK_MONOTONIC ns): its time when T1 is missing.
    pub sent_mono_ns: u64,
}

/// Why a packet on the sender's socket was refused (label of
/// `linkpulse_probe_bad_packets_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Shorter than the 44-byte STAMP reflector packet.
    Truncated,
    /// Larger than any reply to our 44-byte probes can be (a reflector never pads a reply
    /// beyond the request).
    Oversized,
    /// A sender sequence we have no probe in flight for.
    UnknownSeq,
    /// The echoed sender timestamp is not the one we sent: forged or corrupt.
    Spoofed,
    /// T2/T3 not decodable, or T3 before T2.
    BadTimestamp,
}

impl Bad {
    pub const ALL: [Bad; 5] = [
        Bad::Truncated,
        Bad::Oversized,
        Bad::UnknownSeq,
        Bad::Spoofed,
        Bad::BadTimestamp,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Bad::Truncated => "truncated",
            Bad::Oversized => "oversized",
            Bad::UnknownSeq => "unknown_seq",
            Bad::Spoofed => "spoofed",
            Bad::BadTimestamp => "bad_timestamp",
        }
    }
}

/// What a reply did to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// A new reply; with a sample when its kernel stamps were already there.
    Accepted(Option<Sample>),
    Duplicate,
    /// The reply came after the probe had been declared lost (it stays lost).
    Late,
}

/// Monotonic counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounters {
    pub sent: u64,
    pub replies: u64,
    pub samples: u64,
    pub lost_up: u64,
    pub lost_down: u64,
    /// Lost while the reflector's sequence restarted (session evicted or reflector restarted):
    /// the direction cannot be told.
    pub lost_unattributed: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub late: u64,
    /// Probes (sequence numbers 0..n) whose fate and loss direction are settled.
    pub settled_through: u64,
}

pub struct Session {
    link: u16,
    entries: Box<[Entry]>,
    mask: u32,
    next_seq: u32,
    cursor: u32,
    lost_pending: u64,
    /// Upstream losses accounted so far, as `s - r - base`.
    up_total: i64,
    base: i64,
    last_refl: Option<u32>,
    max_replied: Option<u32>,
    /// The newest lost probes whose direction is pending (a ring as large as the in-flight
    /// table; when a run of losses is longer, its oldest stay of unknown direction).
    lost_ring: Box<[Outcome]>,
    lost_head: usize,
    lost_len: usize,
    pub counters: SessionCounters,
}

impl Session {
    /// `capacity`: probes that may be in flight at once (rounded up to a power of two).
    pub fn new(link: u16, capacity: usize) -> Session {
        let cap = capacity.clamp(16, 1 << 20).next_power_of_two();
        Session {
            link,
            entries: vec![Entry::default(); cap].into_boxed_slice(),
            mask: cap as u32 - 1,
            next_seq: 0,
            cursor: 0,
            lost_pending: 0,
            up_total: 0,
            base: 0,
            last_refl: None,
            max_replied: None,
            lost_ring: vec![
                Outcome {
                    link,
                    seq: 0,
                    fate: Fate::Lost,
                    t1_tai_ns: 0,
                    sent_mono_ns: 0,
                };
                cap
            ]
            .into_boxed_slice(),
            lost_head: 0,
            lost_len: 0,
            counters: SessionCounters::default(),
        }
    }

    /// In-flight capacity for a link probed at most at `max_rate_hz` with `timeout_ns`.
    pub fn capacity_for(max_rate_hz: u32, timeout_ns: u64) -> usize {
        // Twice the probes one timeout holds, and a second of slack for a slow sweep.
        (max_rate_hz as u64 * (2 * timeout_ns / 1_000_000_000 + 2)) as usize
    }

    /// The sequence number the next probe gets.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Whether a probe can be sent now (its table slot is free of unsettled probes).
    pub fn can_send(&self) -> bool {
        // The slot's previous probe is `capacity` sequences back: settled once the cursor
        // has passed it.
        self.next_seq.wrapping_sub(self.cursor) <= self.mask
    }

    /// Records a probe that the socket accepted.
    pub fn on_sent(&mut self, sent_mono_ns: u64, sender_ts: Timestamp) {
        let seq = self.next_seq;
        self.entries[(seq & self.mask) as usize] = Entry {
            seq,
            state: SENT,
            sent_mono_ns,
            sender_ts,
            ..Entry::default()
        };
        self.next_seq = seq.wrapping_add(1);
        self.counters.sent += 1;
    }

    /// Probes sent and not yet settled.
    pub fn in_flight(&self) -> u32 {
        self.next_seq.wrapping_sub(self.cursor)
    }

    fn live(&mut self, seq: u32) -> Option<&mut Entry> {
        // Only sequences sent and still in the table (not overwritten) are known.
        if self.next_seq.wrapping_sub(seq) == 0 || self.next_seq.wrapping_sub(seq) > self.mask + 1 {
            return None;
        }
        let e = &mut self.entries[(seq & self.mask) as usize];
        (e.state != FREE && e.seq == seq).then_some(e)
    }

    /// The kernel saw probe `seq` leave at `t` (TAI ns).
    pub fn on_t1(&mut self, seq: u32, t: u64) -> Option<Sample> {
        let link = self.link;
        let e = self.live(seq)?;
        if e.t1 == 0 {
            e.t1 = t;
        }
        let s = complete(link, e);
        self.count_sample(s)
    }

    /// The kernel saw the reply to `seq` (reflector sequence `refl_seq`) arrive at `t`.
    pub fn on_t4(&mut self, seq: u32, refl_seq: u32, t: u64) -> Option<Sample> {
        let link = self.link;
        let e = self.live(seq)?;
        // The first arrival counts (a duplicate reply is stamped again; keep the first).
        if e.t4 == 0 {
            e.t4 = t;
            e.t4_refl_seq = refl_seq;
        }
        let s = complete(link, e);
        self.count_sample(s)
    }

    fn count_sample(&mut self, s: Option<Sample>) -> Option<Sample> {
        if s.is_some() {
            self.counters.samples += 1;
        }
        s
    }

    /// A datagram from the reflector's address arrived on the sender's socket.
    pub fn on_reply(&mut self, buf: &[u8]) -> Result<ReplyOutcome, Bad> {
        if buf.len() < crate::stamp::wire::REFLECTOR_LEN {
            return Err(Bad::Truncated);
        }
        // Our probes are 44 bytes; RFC 8762 replies are never longer than the request
        // (symmetric size), the reflector may add nothing beyond that.
        if buf.len() > crate::stamp::wire::SENDER_LEN {
            return Err(Bad::Oversized);
        }
        let p = ReflectorPacket::parse(buf).map_err(|_| Bad::Truncated)?;
        let seq = p.sender_seq();
        let fmt = p.error_estimate().format();
        let (t2, t3) = (
            p.receive_timestamp().to_epoch_ns(fmt),
            p.timestamp().to_epoch_ns(fmt),
        );
        let link = self.link;
        let refl_seq = p.seq();
        let e = self.live(seq).ok_or(Bad::UnknownSeq)?;
        if e.sender_ts != p.sender_timestamp() {
            return Err(Bad::Spoofed);
        }
        let hold = match (t2, t3) {
            (Some(a), Some(b)) if b >= a => b - a,
            _ => return Err(Bad::BadTimestamp),
        };
        match e.state {
            REPLIED => {
                self.counters.duplicates += 1;
                return Ok(ReplyOutcome::Duplicate);
            }
            LOST => {
                self.counters.late += 1;
                return Ok(ReplyOutcome::Late);
            }
            _ => {}
        }
        e.state = REPLIED;
        e.refl_seq = refl_seq;
        e.refl_hold_ns = hold;
        e.t2_ns = t2.unwrap_or(0);
        e.refl_error = p.error_estimate();
        let s = complete(link, e);
        self.counters.replies += 1;
        match self.max_replied {
            Some(m) if (seq.wrapping_sub(m) as i32) < 0 => self.counters.reordered += 1,
            _ => self.max_replied = Some(seq),
        }
        Ok(ReplyOutcome::Accepted(self.count_sample(s)))
    }

    /// Settles probes in sequence order: answered ones at once, unanswered ones once
    /// `timeout_ns` has passed since they were sent.
    pub fn expire(&mut self, now_mono_ns: u64, timeout_ns: u64) {
        self.expire_with(now_mono_ns, timeout_ns, &mut |_| {});
    }

    /// [`Session::expire`], telling `out` each probe's [`Outcome`] as it is settled.
    pub fn expire_with(
        &mut self,
        now_mono_ns: u64,
        timeout_ns: u64,
        out: &mut impl FnMut(Outcome),
    ) {
        while self.cursor != self.next_seq {
            let i = (self.cursor & self.mask) as usize;
            let e = self.entries[i];
            let mut o = Outcome {
                link: self.link,
                seq: e.seq,
                fate: Fate::Answered,
                t1_tai_ns: e.t1,
                sent_mono_ns: e.sent_mono_ns,
            };
            match e.state {
                REPLIED => {
                    self.settle(e.seq, e.refl_seq, out);
                    out(o);
                }
                SENT if now_mono_ns.saturating_sub(e.sent_mono_ns) >= timeout_ns => {
                    self.entries[i].state = LOST;
                    self.lost_pending += 1;
                    o.fate = Fate::Lost;
                    let cap = self.lost_ring.len();
                    if self.lost_len == cap {
                        // The run outgrew the ring: its oldest stays of unknown direction.
                        self.lost_head = (self.lost_head + 1) % cap;
                        self.lost_len -= 1;
                    }
                    self.lost_ring[(self.lost_head + self.lost_len) % cap] = o;
                    self.lost_len += 1;
                    out(o);
                }
                _ => break,
            }
            self.cursor = self.cursor.wrapping_add(1);
        }
    }

    fn settle(&mut self, s: u32, r: u32, out: &mut impl FnMut(Outcome)) {
        let restarted = self.last_refl.is_some_and(|last| r <= last);
        if restarted {
            // The reflector numbers from 0 again: rebase; the direction of the losses since
            // the last answer is unknown.
            self.base = s as i64 - r as i64 - self.up_total;
            self.counters.lost_unattributed += self.lost_pending;
        } else {
            let u = s as i64 - r as i64 - self.base;
            let up = (u - self.up_total).clamp(0, self.lost_pending as i64);
            self.up_total += up;
            self.counters.lost_up += up as u64;
            self.counters.lost_down += self.lost_pending - up as u64;
            // Which of the run went which way is not in the numbering (only how many went
            // up): by convention its first `up` probes were lost up. Exact per window unless
            // a run with losses both ways straddles a window boundary.
            let cap = self.lost_ring.len();
            let first = self.lost_pending - self.lost_len as u64;
            for k in 0..self.lost_len {
                let mut o = self.lost_ring[(self.lost_head + k) % cap];
                o.fate = if first + (k as u64) < up as u64 {
                    Fate::LostUp
                } else {
                    Fate::LostDown
                };
                out(o);
            }
        }
        self.lost_head = 0;
        self.lost_len = 0;
        self.lost_pending = 0;
        self.last_refl = Some(r);
        self.counters.settled_through = self.counters.settled_through.max(s as u64 + 1);
    }

    /// Lost probes whose direction is known only when a later probe is answered.
    pub fn lost_pending(&self) -> u64 {
        self.lost_pending
    }
}

fn complete(link: u16, e: &mut Entry) -> Option<Sample> {
    if e.sampled || e.state != REPLIED || e.t1 == 0 || e.t4 == 0 || e.t4_refl_seq != e.refl_seq {
        return None;
    }
    let rtt = e.t4.checked_sub(e.t1)?.checked_sub(e.refl_hold_ns)?;
    e.sampled = true;
    Some(Sample {
        link,
        seq: e.seq,
        refl_seq: e.refl_seq,
        t1_tai_ns: e.t1,
        t4_tai_ns: e.t4,
        reflector_hold_ns: e.refl_hold_ns,
        t2_ns: e.t2_ns,
        rtt_ns: rtt,
        reflector_error: e.refl_error,
    })
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
