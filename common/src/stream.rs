//! The controller's real-time stream: fixed-layout little-endian records on a Unix
//! SOCK_SEQPACKET socket (one message per frame). Layout version 3 (version 2 added the passive
//! TCP RTT fields, version 3 the one-way delays); `include/linkpulse_stream.h` is the same layout for C and Go readers (a
//! test compiles it and reads real frames).
//!
//! Conversation: the client sends one [`Subscribe`]; the server answers with a [`Hello`]
//! followed by `Hello.link_count` [`LinkDesc`] in the same message, or with an [`ErrorMsg`] and
//! closes. Then every message is one frame: a [`FrameHeader`] and `FrameHeader.link_count`
//! [`LinkRecord`]s (the subscribed links, ascending index).

/// "LPS1": a subscription request.
pub const MAGIC_SUBSCRIBE: u32 = 0x3153_504C;
/// "LPH1": the server's hello.
pub const MAGIC_HELLO: u32 = 0x3148_504C;
/// "LPF1": a frame.
pub const MAGIC_FRAME: u32 = 0x3146_504C;
/// "LPE1": an error; the server closes the connection after it.
pub const MAGIC_ERROR: u32 = 0x3145_504C;
/// Layout version of every record here.
pub const STREAM_VERSION: u16 = 3;

/// Client → server. `link_mask` bit i subscribes link i (0 = every link); `decimation` N ≥ 1
/// aggregates N consecutive bins exactly (sums; valid only if every bin was), aligned on the
/// epoch (the first bin of an aggregate has index divisible by N).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Subscribe {
    pub magic: u32,
    pub version: u16,
    pub _pad0: u16,
    pub link_mask: u64,
    pub decimation: u32,
    pub _pad1: u32,
}

/// Server → client, once, followed by `link_count` [`LinkDesc`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    pub magic: u32,
    pub version: u16,
    pub _pad0: u16,
    /// Width of one bin (ns); frames cover `bin_width_ns * decimation`.
    pub bin_width_ns: u64,
    pub decimation: u32,
    /// Number of [`LinkDesc`] that follow, and of [`LinkRecord`]s in every frame.
    pub link_count: u32,
    /// The links subscribed (bit i = link index i).
    pub link_mask: u64,
    pub header_size: u32,
    pub record_size: u32,
}

/// One subscribed link: its index (as in frames) and names, NUL-padded UTF-8.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkDesc {
    pub index: u32,
    pub _pad0: u32,
    pub interface: [u8; 16],
    pub label: [u8; 32],
}

/// Server → client before closing: what was wrong.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorMsg {
    pub magic: u32,
    pub version: u16,
    pub _pad0: u16,
    pub code: u32,
    pub _pad1: u32,
    /// NUL-padded UTF-8 message naming the cause and the fix.
    pub message: [u8; 112],
}

pub const ERR_BAD_REQUEST: u32 = 1;
pub const ERR_VERSION: u32 = 2;
pub const ERR_NO_LINKS: u32 = 3;
pub const ERR_TOO_MANY_CLIENTS: u32 = 4;

/// The frame carries counts of packets stamped in bins that were already published (carried
/// forward so that totals over any interval stay exact).
pub const FLAG_LATE: u32 = 1 << 0;
/// The kernel said the clock was not synchronised when the bin was published.
pub const FLAG_CLOCK_UNSYNC: u32 = 1 << 1;
/// A clock step was detected just before: window times around it are not comparable.
pub const FLAG_CLOCK_STEP: u32 = 1 << 2;
/// Some link was not attached for the whole window: its numbers are missing data, not zeros.
pub const FLAG_GAP: u32 = 1 << 3;
/// The daemon fell behind (or the clock jumped) and skipped bins before this one.
pub const FLAG_SKIPPED: u32 = 1 << 4;
/// Probe RTT samples (or sent probes) whose bin (by T4, or T1) was already published are in
/// this frame instead: the prober handed them over after that bin's deadline. Totals over any
/// interval stay exact; those records also carry [`VALID_LATE`].
pub const FLAG_RTT_LATE: u32 = 1 << 5;

/// One frame's header, followed by `link_count` [`LinkRecord`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameHeader {
    pub magic: u32,
    pub version: u16,
    pub _pad0: u16,
    /// Daemon sequence number of the first bin; consecutive frames differ by `decimation`.
    pub seq: u64,
    /// Frames this client lost (its queue was full) since its previous frame.
    pub dropped_before: u64,
    pub bin_start_utc_ns: i64,
    pub bin_start_tai_ns: u64,
    /// Width covered by this frame: bin width × decimation.
    pub width_ns: u64,
    pub flags: u32,
    pub link_count: u32,
    /// CLOCK_TAI when the server sent this frame: the receiver's CLOCK_TAI minus this is the
    /// socket's delivery delay; minus the end of the frame's window, the whole latency.
    pub sent_tai_ns: u64,
}

/// `LinkRecord.valid` bits: which fields were measured in this frame.
pub const VALID_TRAFFIC: u32 = 1 << 0;
pub const VALID_RTT: u32 = 1 << 1;
pub const VALID_PROBES: u32 = 1 << 2;
/// The `tcp_rtt_*` fields are measured (passive RTT on, link attached for the whole window).
pub const VALID_TCP_RTT: u32 = 1 << 3;
/// The `owd_*` fields hold at least one probe whose two clocks reported synchronisation.
pub const VALID_OWD: u32 = 1 << 4;
/// The record carries late data carried from earlier bins.
pub const VALID_LATE: u32 = 1 << 31;

/// One link in one frame. Directions: index 0 = down (router ingress), 1 = up (egress).
///
/// RTT fields (with [`VALID_RTT`], set for probed links): the probe RTT samples whose reply
/// arrived (kernel stamp T4) in the frame's window: count, min, max, sum (min/max are 0 when
/// the count is 0: probed, no reply in that window). `probes_sent` (with [`VALID_PROBES`]):
/// probes that left (kernel stamp T1) in the window. Decimated frames aggregate them exactly.
///
/// TCP RTT fields (with [`VALID_TCP_RTT`]): passive RTT samples (TCP timestamp echoes) whose
/// echo reached the router in the window: count, min, max, sum (min/max 0 when the count is
/// 0; the kernel saturates min/max at u32::MAX ns, 4.29 s). Late samples set [`VALID_LATE`].
///
/// One-way delay fields (with [`VALID_OWD`]): of the probe samples counted in `rtt_count`, those
/// taken while our clock and the reflector's both reported synchronisation: count, up
/// (T2 − T1) and down (T4 − T3) min, max and sum, signed ns (a clock offset larger than the
/// delay makes one negative), and the largest error bound among them (our kernel's maxerror
/// plus the reflector's Error Estimate). Without `VALID_OWD` they are 0 and mean nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkRecord {
    pub index: u32,
    pub valid: u32,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub rtt_count: u32,
    pub probes_sent: u32,
    pub rtt_min_ns: u64,
    pub rtt_max_ns: u64,
    pub rtt_sum_ns: u64,
    /// Not filled yet (always 0): loss is settled after the loss timeout, in the rollups.
    pub probes_lost: [u32; 2],
    pub tcp_rtt_count: u32,
    pub _pad0: u32,
    pub tcp_rtt_min_ns: u64,
    pub tcp_rtt_max_ns: u64,
    pub tcp_rtt_sum_ns: u64,
    pub owd_count: u32,
    pub _pad1: u32,
    pub owd_up_min_ns: i64,
    pub owd_up_max_ns: i64,
    pub owd_up_sum_ns: i64,
    pub owd_down_min_ns: i64,
    pub owd_down_max_ns: i64,
    pub owd_down_sum_ns: i64,
    pub owd_error_max_ns: u64,
}

impl LinkRecord {
    /// The link is probed: the RTT fields are measured (a count of 0 means no reply arrived).
    pub fn has_rtt(&self) -> bool {
        self.valid & VALID_RTT != 0
    }

    /// `probes_sent` is measured.
    pub fn has_probes(&self) -> bool {
        self.valid & VALID_PROBES != 0
    }

    /// Smallest RTT sample in the window, if any.
    pub fn rtt_min(&self) -> Option<u64> {
        (self.has_rtt() && self.rtt_count > 0).then_some(self.rtt_min_ns)
    }

    /// Largest RTT sample in the window, if any.
    pub fn rtt_max(&self) -> Option<u64> {
        (self.has_rtt() && self.rtt_count > 0).then_some(self.rtt_max_ns)
    }

    /// Mean RTT in the window (sum / count), if any sample.
    pub fn rtt_mean(&self) -> Option<u64> {
        if !self.has_rtt() {
            return None;
        }
        self.rtt_sum_ns.checked_div(u64::from(self.rtt_count))
    }

    /// Passive TCP RTT is measured in this record (a count of 0: no echo arrived).
    pub fn has_tcp_rtt(&self) -> bool {
        self.valid & VALID_TCP_RTT != 0
    }

    /// (count, min, max, mean) of the passive TCP RTT samples in the window, if any.
    pub fn tcp_rtt(&self) -> Option<(u32, u64, u64, u64)> {
        (self.has_tcp_rtt() && self.tcp_rtt_count > 0).then(|| {
            (
                self.tcp_rtt_count,
                self.tcp_rtt_min_ns,
                self.tcp_rtt_max_ns,
                self.tcp_rtt_sum_ns / u64::from(self.tcp_rtt_count),
            )
        })
    }

    /// One-way delays in the window, if any probe had both clocks synchronised.
    pub fn owd(&self) -> Option<OneWayDelays> {
        if self.valid & VALID_OWD == 0 || self.owd_count == 0 {
            return None;
        }
        let n = i64::from(self.owd_count);
        Some(OneWayDelays {
            count: self.owd_count,
            up_min_ns: self.owd_up_min_ns,
            up_max_ns: self.owd_up_max_ns,
            up_mean_ns: self.owd_up_sum_ns / n,
            down_min_ns: self.owd_down_min_ns,
            down_max_ns: self.owd_down_max_ns,
            down_mean_ns: self.owd_down_sum_ns / n,
            error_max_ns: self.owd_error_max_ns,
        })
    }

    /// Probes sent in the window, when the link is probed.
    pub fn probes(&self) -> Option<u32> {
        self.has_probes().then_some(self.probes_sent)
    }
}

const _: () = assert!(core::mem::size_of::<Subscribe>() == 24);
const _: () = assert!(core::mem::size_of::<Hello>() == 40);
const _: () = assert!(core::mem::size_of::<LinkDesc>() == 56);
const _: () = assert!(core::mem::size_of::<ErrorMsg>() == 128);
const _: () = assert!(core::mem::size_of::<FrameHeader>() == 64);
const _: () = assert!(core::mem::size_of::<LinkRecord>() == 176);
// The same offsets as the C header's asserts.
const _: () = assert!(core::mem::offset_of!(LinkRecord, tcp_rtt_count) == 80);
const _: () = assert!(core::mem::offset_of!(LinkRecord, owd_count) == 112);

/// A record's one-way delays, read by [`LinkRecord::owd`] (signed ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OneWayDelays {
    pub count: u32,
    pub up_min_ns: i64,
    pub up_max_ns: i64,
    pub up_mean_ns: i64,
    pub down_min_ns: i64,
    pub down_max_ns: i64,
    pub down_mean_ns: i64,
    pub error_max_ns: u64,
}

/// Marker for the records above: `#[repr(C)]`, integers only, no implicit padding, so any
/// byte string of the right length is a valid value and a value's bytes are fully defined.
///
/// # Safety
/// Only for types with those properties.
pub unsafe trait Record: Copy + 'static {}
unsafe impl Record for Subscribe {}
unsafe impl Record for Hello {}
unsafe impl Record for LinkDesc {}
unsafe impl Record for ErrorMsg {}
unsafe impl Record for FrameHeader {}
unsafe impl Record for LinkRecord {}

/// The bytes of a record (little-endian on the little-endian hosts linkpulse runs on).
pub fn as_bytes<T: Record>(v: &T) -> &[u8] {
    // SAFETY: Record types have no padding and only integer fields.
    unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), core::mem::size_of::<T>()) }
}

/// Reads a record from the start of `b`, if long enough.
pub fn read<T: Record>(b: &[u8]) -> Option<T> {
    if b.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; any bytes are a valid Record; unaligned read.
    Some(unsafe { core::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

/// Copies `s` into a NUL-padded fixed field (truncated on a char boundary).
pub fn fixed_str<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut end = s.len().min(N - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

/// The text of a NUL-padded field.
pub fn field_str(b: &[u8]) -> &str {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    core::str::from_utf8(&b[..end]).unwrap_or("")
}

impl ErrorMsg {
    pub fn new(code: u32, message: &str) -> Self {
        Self {
            magic: MAGIC_ERROR,
            version: STREAM_VERSION,
            _pad0: 0,
            code,
            _pad1: 0,
            message: fixed_str(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_bytes() {
        let h = FrameHeader {
            magic: MAGIC_FRAME,
            version: STREAM_VERSION,
            seq: 42,
            bin_start_utc_ns: -5,
            width_ns: 100_000,
            link_count: 3,
            ..Default::default()
        };
        assert_eq!(read::<FrameHeader>(as_bytes(&h)), Some(h));
        assert_eq!(read::<FrameHeader>(&as_bytes(&h)[..10]), None);
        // the magic is "LPF1" in memory order
        assert_eq!(&as_bytes(&h)[..4], b"LPF1");
        assert_eq!(
            &as_bytes(&Subscribe {
                magic: MAGIC_SUBSCRIBE,
                ..Default::default()
            })[..4],
            b"LPS1"
        );
    }

    #[test]
    fn fixed_strings_truncate_on_char_boundaries() {
        let f: [u8; 8] = fixed_str("wwan0");
        assert_eq!(field_str(&f), "wwan0");
        let f: [u8; 4] = fixed_str("äää");
        assert_eq!(field_str(&f), "ä");
    }
}
