//! The consumers' frame queues: an SPSC ring (rtrb) of `u64` words holding each frame
//! compactly instead of the fixed 5.2 KB [`Frame`] (32 links, the RTT and one-way delay parts
//! of every link): the header, the traffic records up to the last non-empty link, then the
//! probe, passive TCP RTT and one-way delay records of the links that have any. At 16 links
//! without RTT records a frame takes 624 bytes, so a queue that covers 100 ms of 100 µs bins
//! takes 0.6 MB instead of 5.2 MB — most of the daemon's heap.
//!
//! The ingest thread encodes a frame once ([`Encoded`]) and copies the words into every
//! queue; each consumer decodes them back into a `Frame` equal to the one published. Neither
//! side allocates; a full queue refuses the whole frame (the consumer loses it, counted by
//! the fanout), never part of one.
use linkpulse_common::{DIRS, MAX_LINKS};

use crate::frame::{Frame, LinkBin, OwdBin, RttBin};

/// Word 0 (length, link records), then the header fields and the masks of the records present.
const HEADER_WORDS: usize = 14;
/// packets[2], bytes[2].
const LINK_WORDS: usize = 2 * DIRS;
/// count | sent, min, max, sum.
const RTT_WORDS: usize = 4;
/// count, up min/max/sum, down min/max/sum, error bound.
const OWD_WORDS: usize = 8;
/// The largest encoded frame: every link with traffic, probe, TCP RTT and one-way records.
pub const MAX_WORDS: usize = HEADER_WORDS + MAX_LINKS * (LINK_WORDS + 2 * RTT_WORDS + OWD_WORDS);

const _: () = assert!(MAX_WORDS < 1 << 16, "length fits word 0's low 16 bits");

/// Words of a frame with `links` traffic records, `rtt` probe and TCP RTT records and `owd`
/// one-way delay records.
pub const fn frame_words(links: usize, rtt: usize, owd: usize) -> usize {
    HEADER_WORDS + links * LINK_WORDS + rtt * RTT_WORDS + owd * OWD_WORDS
}

/// Bit i set: record i of `bins` is not empty.
fn present(bins: &[RttBin; MAX_LINKS]) -> u64 {
    let empty = RttBin::default();
    bins.iter()
        .enumerate()
        .filter(|(_, r)| **r != empty)
        .fold(0u64, |m, (i, _)| m | 1 << i)
}

fn put_rtt(w: &mut [u64], at: &mut usize, bins: &[RttBin; MAX_LINKS], mask: u64) {
    for (i, r) in bins.iter().enumerate() {
        if mask & (1 << i) != 0 {
            w[*at] = u64::from(r.rtt_count) | u64::from(r.probes_sent) << 32;
            w[*at + 1] = r.rtt_min_ns;
            w[*at + 2] = r.rtt_max_ns;
            w[*at + 3] = r.rtt_sum_ns;
            *at += RTT_WORDS;
        }
    }
}

fn get_rtt(w: &[u64], at: &mut usize, bins: &mut [RttBin; MAX_LINKS], mask: u64) {
    for (i, r) in bins.iter_mut().enumerate() {
        if mask & (1 << i) != 0 {
            *r = RttBin {
                rtt_count: w[*at] as u32,
                probes_sent: (w[*at] >> 32) as u32,
                rtt_min_ns: w[*at + 1],
                rtt_max_ns: w[*at + 2],
                rtt_sum_ns: w[*at + 3],
            };
            *at += RTT_WORDS;
        }
    }
}

fn put_owd(w: &mut [u64], at: &mut usize, bins: &[OwdBin; MAX_LINKS], mask: u64) {
    for (i, o) in bins.iter().enumerate() {
        if mask & (1 << i) != 0 {
            w[*at] = u64::from(o.count);
            w[*at + 1] = o.up_min_ns as u64;
            w[*at + 2] = o.up_max_ns as u64;
            w[*at + 3] = o.up_sum_ns as u64;
            w[*at + 4] = o.down_min_ns as u64;
            w[*at + 5] = o.down_max_ns as u64;
            w[*at + 6] = o.down_sum_ns as u64;
            w[*at + 7] = o.error_max_ns;
            *at += OWD_WORDS;
        }
    }
}

fn get_owd(w: &[u64], at: &mut usize, bins: &mut [OwdBin; MAX_LINKS], mask: u64) {
    for (i, o) in bins.iter_mut().enumerate() {
        if mask & (1 << i) != 0 {
            *o = OwdBin {
                count: w[*at] as u32,
                _pad: 0,
                up_min_ns: w[*at + 1] as i64,
                up_max_ns: w[*at + 2] as i64,
                up_sum_ns: w[*at + 3] as i64,
                down_min_ns: w[*at + 4] as i64,
                down_max_ns: w[*at + 5] as i64,
                down_sum_ns: w[*at + 6] as i64,
                error_max_ns: w[*at + 7],
            };
            *at += OWD_WORDS;
        }
    }
}

/// One frame in its queue form (built once per frame, pushed into every queue).
pub struct Encoded {
    words: [u64; MAX_WORDS],
    len: usize,
}

impl Default for Encoded {
    fn default() -> Self {
        Self {
            words: [0; MAX_WORDS],
            len: 0,
        }
    }
}

impl Encoded {
    pub fn new(f: &Frame) -> Self {
        let mut e = Self::default();
        e.encode(f);
        e
    }

    /// Encodes `f`, replacing what was there.
    pub fn encode(&mut self, f: &Frame) {
        let empty_link = LinkBin::default();
        let links = MAX_LINKS
            - f.links
                .iter()
                .rev()
                .take_while(|l| **l == empty_link)
                .count();
        let rtt_mask = present(&f.rtt);
        let tcp_mask = present(&f.tcp_rtt);
        let owd_mask = f
            .owd
            .iter()
            .enumerate()
            .filter(|(_, o)| !o.is_empty())
            .fold(0u64, |m, (i, _)| m | 1 << i);
        let len = frame_words(
            links,
            (rtt_mask.count_ones() + tcp_mask.count_ones()) as usize,
            owd_mask.count_ones() as usize,
        );
        let w = &mut self.words;
        w[0] = len as u64 | (links as u64) << 16;
        w[1] = f.bin_start_tai_ns;
        w[2] = f.bin_start_utc_ns as u64;
        w[3] = f.width_ns;
        w[4] = f.seq;
        w[5] = u64::from(f.flags) | u64::from(f.link_count) << 32;
        w[6] = f.valid_mask;
        w[7] = f.late_mask;
        w[8] = f.probed_mask;
        w[9] = f.rtt_late_mask;
        w[10] = rtt_mask;
        w[11] = f.tcp_rtt_mask;
        w[12] = tcp_mask;
        w[13] = owd_mask;
        let mut at = HEADER_WORDS;
        for l in &f.links[..links] {
            w[at..at + DIRS].copy_from_slice(&l.packets);
            w[at + DIRS..at + LINK_WORDS].copy_from_slice(&l.bytes);
            at += LINK_WORDS;
        }
        put_rtt(w, &mut at, &f.rtt, rtt_mask);
        put_rtt(w, &mut at, &f.tcp_rtt, tcp_mask);
        put_owd(w, &mut at, &f.owd, owd_mask);
        self.len = len;
    }

    pub fn words(&self) -> &[u64] {
        &self.words[..self.len]
    }
}

/// The frame in `w` (as [`Encoded`] wrote it), or None if the words are not a frame.
pub fn decode(w: &[u64]) -> Option<Frame> {
    let head = *w.first()?;
    let len = (head & 0xffff) as usize;
    let links = ((head >> 16) & 0xffff) as usize;
    let rtt_mask = *w.get(10)?;
    let tcp_mask = *w.get(12)?;
    let owd_mask = *w.get(13)?;
    let beyond = |m: u64| m.checked_shr(MAX_LINKS as u32).unwrap_or(0) != 0;
    if links > MAX_LINKS
        || beyond(rtt_mask)
        || beyond(tcp_mask)
        || beyond(owd_mask)
        || len
            != frame_words(
                links,
                (rtt_mask.count_ones() + tcp_mask.count_ones()) as usize,
                owd_mask.count_ones() as usize,
            )
        || w.len() < len
    {
        return None;
    }
    let mut f = Frame {
        bin_start_tai_ns: w[1],
        bin_start_utc_ns: w[2] as i64,
        width_ns: w[3],
        seq: w[4],
        flags: w[5] as u32,
        link_count: (w[5] >> 32) as u32,
        valid_mask: w[6],
        late_mask: w[7],
        probed_mask: w[8],
        rtt_late_mask: w[9],
        tcp_rtt_mask: w[11],
        ..Frame::default()
    };
    let mut at = HEADER_WORDS;
    for l in &mut f.links[..links] {
        l.packets.copy_from_slice(&w[at..at + DIRS]);
        l.bytes.copy_from_slice(&w[at + DIRS..at + LINK_WORDS]);
        at += LINK_WORDS;
    }
    get_rtt(w, &mut at, &mut f.rtt, rtt_mask);
    get_rtt(w, &mut at, &mut f.tcp_rtt, tcp_mask);
    get_owd(w, &mut at, &mut f.owd, owd_mask);
    Some(f)
}

/// The queue is full: the frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// The ingest thread's end of a frame queue.
pub struct FrameProducer {
    ring: rtrb::Producer<u64>,
}

impl FrameProducer {
    /// Queues the whole frame, or nothing if it does not fit.
    #[inline]
    pub fn push_encoded(&mut self, e: &Encoded) -> Result<(), Full> {
        self.ring.push_entire_slice(e.words()).map_err(|_| Full)
    }

    /// Encodes and queues `f` (tests; the ingest thread encodes once for all queues).
    pub fn push(&mut self, f: &Frame) -> Result<(), Full> {
        self.push_encoded(&Encoded::new(f))
    }

    /// Capacity in words.
    pub fn capacity_words(&self) -> usize {
        self.ring.buffer().capacity()
    }
}

/// A consumer's end of a frame queue.
pub struct FrameConsumer {
    ring: rtrb::Consumer<u64>,
}

impl FrameConsumer {
    /// The oldest queued frame (`Err` when the queue is empty).
    pub fn pop(&mut self) -> Result<Frame, rtrb::PopError> {
        let len = (*self.ring.peek().map_err(|_| rtrb::PopError::Empty)? & 0xffff) as usize;
        let mut w = [0u64; MAX_WORDS];
        let n = len.clamp(1, MAX_WORDS);
        // The producer commits a frame's words at once: seeing the first means all are there.
        if self.ring.pop_entire_slice(&mut w[..n]).is_err() {
            return Err(rtrb::PopError::Empty);
        }
        // Only this crate's encoder writes here; a bad frame would be a bug, skipped.
        decode(&w[..n]).ok_or(rtrb::PopError::Empty)
    }
}

/// A queue holding at least `frames` frames of any size.
pub fn frame_queue(frames: usize) -> (FrameProducer, FrameConsumer) {
    queue_words(frames.max(1) * MAX_WORDS)
}

/// A queue sized in time: `span_ns` of `width_ns` bins with `links` link records and `probed`
/// probe records each (the configuration at start; more links after a reload shorten the
/// span it holds in proportion). Passive TCP RTT records are not counted: they come only in
/// bins where an echo arrived; if every link had one in every bin, a queue of 16 links with 16
/// probed would hold ~60 % of the span. One-way delay records are not counted either: they come
/// with a probe's reply, and only while both clocks are synchronised. At least four frames of
/// the largest size.
pub fn frame_queue_for(
    span_ns: u64,
    width_ns: u64,
    links: usize,
    probed: usize,
) -> (FrameProducer, FrameConsumer) {
    let frames = span_ns.div_ceil(width_ns.max(1)) as usize;
    let words = frames
        .saturating_mul(frame_words(links.min(MAX_LINKS), probed.min(MAX_LINKS), 0))
        .max(4 * MAX_WORDS);
    queue_words(words)
}

fn queue_words(words: usize) -> (FrameProducer, FrameConsumer) {
    let (ring, rx) = rtrb::RingBuffer::new(words);
    (FrameProducer { ring }, FrameConsumer { ring: rx })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(links: usize) -> Frame {
        let mut f = Frame {
            bin_start_tai_ns: 1_800_000_000_000_000_000,
            bin_start_utc_ns: 1_799_999_963_000_000_000,
            width_ns: 100_000,
            seq: 42,
            flags: 0b101,
            link_count: links as u32,
            valid_mask: (1 << links) - 2,
            late_mask: 0b100,
            probed_mask: 0b1010,
            rtt_late_mask: 0b10,
            ..Frame::default()
        };
        for (i, l) in f.links.iter_mut().enumerate().take(links) {
            *l = LinkBin {
                packets: [i as u64, u64::MAX - i as u64],
                bytes: [1500 * i as u64, 7],
            };
        }
        f.rtt[1].add_sample(20_000_000);
        f.rtt[1].probes_sent = 3;
        f.rtt[3].probes_sent = 1;
        f.tcp_rtt_mask = f.valid_mask;
        f.tcp_rtt[2].add_sample(31_000_000);
        f.tcp_rtt[2].add_sample(29_000_000);
        f.owd[1].add(&crate::probe::oneway::OneWay {
            up_ns: -2_000,
            down_ns: 21_000_000,
            error_ns: 900,
        });
        f
    }

    #[test]
    fn frames_come_back_equal_and_small() {
        let (mut tx, mut rx) = frame_queue(4);
        let mut frames = vec![sample(16), sample(1), Frame::default(), sample(32)];
        // An empty link in the middle and a non-empty one at the end.
        frames[0].links[5] = LinkBin::default();
        frames[0].links[31].bytes[1] = 9;
        for f in &frames {
            tx.push(f).expect("room for 4");
        }
        for f in &frames {
            assert_eq!(rx.pop().as_ref(), Ok(f));
        }
        assert!(rx.pop().is_err());
        assert_eq!(
            Encoded::new(&sample(16)).words().len(),
            14 + 16 * 4 + 2 * 4 + 4 + 8
        );
        assert_eq!(Encoded::new(&Frame::default()).words().len(), 14);
        // The TCP records come back where they were, apart from the probe records.
        let mut only_tcp = Frame::default();
        only_tcp.tcp_rtt[31].add_sample(1);
        tx.push(&only_tcp).expect("room");
        assert_eq!(rx.pop(), Ok(only_tcp));
    }

    #[test]
    fn a_full_queue_refuses_whole_frames_and_wraps_around() {
        // Room for 2.5 frames of 16 links: the third is refused whole.
        let size = Encoded::new(&sample(16)).words().len();
        let (mut tx, mut rx) = queue_words(size * 5 / 2);
        for round in 0..50u64 {
            let mut a = sample(16);
            a.seq = round;
            tx.push(&a).expect("first");
            tx.push(&a).expect("second");
            assert_eq!(tx.push(&a), Err(Full));
            assert_eq!(rx.pop().map(|f| f.seq), Ok(round));
            assert_eq!(rx.pop(), Ok(a));
            assert!(rx.pop().is_err());
        }
    }

    #[test]
    fn sized_in_time() {
        let (tx, _) = frame_queue_for(100_000_000, 100_000, 16, 0);
        assert_eq!(tx.capacity_words(), 1000 * frame_words(16, 0, 0));
        let (tx, _) = frame_queue_for(1_000_000, 1_000_000_000, 16, 0);
        assert_eq!(tx.capacity_words(), 4 * MAX_WORDS);
    }

    #[test]
    fn garbage_is_not_a_frame() {
        assert!(decode(&[]).is_none());
        assert!(decode(&[5; 14]).is_none());
        let e = Encoded::new(&sample(8));
        assert!(decode(&e.words()[..e.words().len() - 1]).is_none());
    }
}
