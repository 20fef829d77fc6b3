//! STAMP test packets, unauthenticated mode (RFC 8762 §4.2.1 and §4.3.1, with the SSID of
//! RFC 8972 §3 in the first MBZ octets).
//!
//! Session-Sender test packet (44 octets, then optional padding):
//! ```text
//!  0..4   Sequence Number
//!  4..12  Timestamp (NTP 64-bit, or PTPv2 truncated when the Z flag is set)
//! 12..14  Error Estimate (S, Z, Scale, Multiplier; RFC 4656 §4.1.2)
//! 14..16  SSID (RFC 8972; MBZ for a plain RFC 8762 sender)
//! 16..44  MBZ (28 octets)
//! ```
//! Session-Reflector test packet (44 octets, then padding up to the request's length):
//! ```text
//!  0..4   Sequence Number (the reflector's own, in stateful mode)
//!  4..12  Timestamp (T3, when the reply leaves)
//! 12..14  Error Estimate
//! 14..16  SSID (echoed)
//! 16..24  Receive Timestamp (T2)
//! 24..28  Session-Sender Sequence Number
//! 28..36  Session-Sender Timestamp (T1)
//! 36..38  Session-Sender Error Estimate
//! 38..40  MBZ
//! 40      Session-Sender TTL (or Hop Limit)
//! 41..44  MBZ
//! ```
//! Both bases are 44 octets, so a reflector that answers with the request's length never
//! amplifies. Non-zero MBZ octets are tolerated (RFC 8762 §4.2.1 asks receivers not to check
//! them) and only reported, so callers can count them.

/// Base length of the unauthenticated Session-Sender test packet.
pub const SENDER_LEN: usize = 44;
/// Base length of the unauthenticated Session-Reflector test packet.
pub const REFLECTOR_LEN: usize = 44;

const NS_PER_S: u64 = 1_000_000_000;
/// Seconds from the NTP prime epoch (1900-01-01) to the UNIX epoch (1970-01-01).
pub const NTP_UNIX_OFFSET_S: u64 = 2_208_988_800;

/// Errors of the codec. Each names what was wrong and what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(
        "STAMP {what} packet truncated: {len} bytes, at least {min} needed; the peer sent a \
         short datagram or speaks another protocol on this port (check the peer's port and that \
         it uses STAMP unauthenticated mode)"
    )]
    TooShort {
        what: &'static str,
        len: usize,
        min: usize,
    },
    #[error(
        "a {len}-byte STAMP packet does not fit an output buffer of {cap} bytes; pass a buffer \
         of at least {len} bytes"
    )]
    BufferTooSmall { len: usize, cap: usize },
    #[error(
        "STAMP packet length {len} is below the base of {min} bytes; ask for at least {min} \
         (padding may only make it longer)"
    )]
    LengthBelowBase { len: usize, min: usize },
}

/// Wire format of a timestamp, selected by the Z flag of the Error Estimate (RFC 8186 §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestampFormat {
    /// Z = 0: NTP 64-bit (32-bit seconds since 1900, 32-bit binary fraction), UTC.
    #[default]
    Ntp,
    /// Z = 1: PTPv2 truncated (32-bit seconds, 32-bit nanoseconds since the PTP epoch), TAI.
    Ptp,
}

/// A raw 64-bit STAMP timestamp as carried on the wire; its meaning depends on the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The upper 32 bits: seconds in both formats.
    #[inline]
    pub fn seconds(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The lower 32 bits: a binary fraction (NTP) or nanoseconds (PTP).
    #[inline]
    pub fn fraction(self) -> u32 {
        self.0 as u32
    }

    #[inline]
    pub fn from_parts(seconds: u32, fraction: u32) -> Self {
        Timestamp(((seconds as u64) << 32) | fraction as u64)
    }

    /// Encodes `ns` since the format's epoch on the format's time scale: for NTP, UTC ns since
    /// the UNIX epoch; for PTP, TAI ns since the PTP epoch (1970-01-01 TAI). Seconds wrap
    /// modulo 2^32 as the formats do (NTP era 1 from 2036, PTP in 2106).
    #[inline]
    pub fn from_epoch_ns(format: TimestampFormat, ns: u64) -> Self {
        let (s, sub) = (ns / NS_PER_S, ns % NS_PER_S);
        match format {
            TimestampFormat::Ntp => {
                // Round to the nearest 2^-32 s: with 0.23 ns steps, ns -> NTP -> ns is exact.
                // sub < 2^30, so sub << 32 < 2^62; the result stays < 2^32 for sub < 1e9.
                let frac = ((sub << 32) + NS_PER_S / 2) / NS_PER_S;
                Timestamp::from_parts((s + NTP_UNIX_OFFSET_S) as u32, frac as u32)
            }
            TimestampFormat::Ptp => Timestamp::from_parts(s as u32, sub as u32),
        }
    }

    /// Decodes to ns since the format's epoch (see [`Timestamp::from_epoch_ns`]). NTP seconds
    /// below 2^31 are read as era 1 (2036-2104), the RFC 5905 convention that keeps the
    /// format usable past 2036. `None` for instants before 1970 (NTP) and for a nanoseconds
    /// field of 10^9 or more (PTP): values a well-behaved peer never sends.
    #[inline]
    pub fn to_epoch_ns(self, format: TimestampFormat) -> Option<u64> {
        let s = self.seconds() as u64;
        match format {
            TimestampFormat::Ntp => {
                let unix_s = if s >= 1 << 31 {
                    s.checked_sub(NTP_UNIX_OFFSET_S)?
                } else {
                    s + (1 << 32) - NTP_UNIX_OFFSET_S
                };
                let sub = (self.fraction() as u64 * NS_PER_S + (1 << 31)) >> 32;
                // sub may round up to exactly 1e9; the addition carries it into the seconds.
                Some(unix_s * NS_PER_S + sub)
            }
            TimestampFormat::Ptp => {
                let nanos = self.fraction() as u64;
                (nanos < NS_PER_S).then_some(s * NS_PER_S + nanos)
            }
        }
    }
}

/// Error Estimate (RFC 4656 §4.1.2, Z as in RFC 8762): `S|Z|Scale(6)|Multiplier(8)`; the
/// error is Multiplier × 2^Scale × 2^-32 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ErrorEstimate(pub u16);

impl ErrorEstimate {
    const S: u16 = 0x8000;
    const Z: u16 = 0x4000;

    pub fn new(synced: bool, format: TimestampFormat, scale: u8, multiplier: u8) -> Self {
        let mut v = ((scale as u16 & 0x3f) << 8) | multiplier as u16;
        if synced {
            v |= Self::S;
        }
        if format == TimestampFormat::Ptp {
            v |= Self::Z;
        }
        ErrorEstimate(v)
    }

    /// The smallest estimate that is not below `error_ns` (an error bound must not be
    /// understated), saturating at the largest one the field can carry.
    pub fn from_error_ns(synced: bool, format: TimestampFormat, error_ns: u64) -> Self {
        // Units of 2^-32 s, rounded up.
        let mut units = ((error_ns as u128) << 32).div_ceil(NS_PER_S as u128);
        let mut scale = 0u8;
        while units > 255 {
            if scale == 63 {
                return Self::new(synced, format, 63, 255);
            }
            units = units.div_ceil(2);
            scale += 1;
        }
        // RFC 4656 forbids a zero multiplier.
        Self::new(synced, format, scale, units.max(1) as u8)
    }

    /// S: the clock is synchronised to UTC by an external source.
    #[inline]
    pub fn synced(self) -> bool {
        self.0 & Self::S != 0
    }

    /// Z: the format of the timestamps this estimate goes with.
    #[inline]
    pub fn format(self) -> TimestampFormat {
        if self.0 & Self::Z != 0 {
            TimestampFormat::Ptp
        } else {
            TimestampFormat::Ntp
        }
    }

    #[inline]
    pub fn scale(self) -> u8 {
        ((self.0 >> 8) & 0x3f) as u8
    }

    #[inline]
    pub fn multiplier(self) -> u8 {
        self.0 as u8
    }

    /// RFC 4656 §4.1.2: the multiplier MUST NOT be zero.
    #[inline]
    pub fn is_valid(self) -> bool {
        self.multiplier() != 0
    }

    /// The error in ns, rounded up, saturating at `u64::MAX`.
    pub fn error_ns(self) -> u64 {
        let units = (self.multiplier() as u128) << self.scale();
        let ns = (units * NS_PER_S as u128).div_ceil(1u128 << 32);
        ns.min(u64::MAX as u128) as u64
    }
}

#[inline]
fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
#[inline]
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
#[inline]
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
#[inline]
fn any_nonzero(b: &[u8]) -> bool {
    b.iter().any(|&x| x != 0)
}

/// Checks a caller's output buffer and length; zeroes the packet area so MBZ and padding are 0.
fn prepare(out: &mut [u8], len: usize, min: usize) -> Result<&mut [u8], WireError> {
    if len < min {
        return Err(WireError::LengthBelowBase { len, min });
    }
    let cap = out.len();
    let pkt = out
        .get_mut(..len)
        .ok_or(WireError::BufferTooSmall { len, cap })?;
    pkt.fill(0);
    Ok(pkt)
}

/// The fields of a Session-Sender test packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SenderFields {
    pub seq: u32,
    pub timestamp: Timestamp,
    pub error_estimate: ErrorEstimate,
    pub ssid: u16,
}

impl SenderFields {
    /// Writes the packet into `out[..len]` (padding zeroed) and returns `len`. No allocation.
    pub fn encode(&self, out: &mut [u8], len: usize) -> Result<usize, WireError> {
        let p = prepare(out, len, SENDER_LEN)?;
        p[0..4].copy_from_slice(&self.seq.to_be_bytes());
        p[4..12].copy_from_slice(&self.timestamp.0.to_be_bytes());
        p[12..14].copy_from_slice(&self.error_estimate.0.to_be_bytes());
        p[14..16].copy_from_slice(&self.ssid.to_be_bytes());
        Ok(len)
    }
}

/// A zero-copy view of a received Session-Sender test packet.
#[derive(Debug, Clone, Copy)]
pub struct SenderPacket<'a> {
    buf: &'a [u8],
}

impl<'a> SenderPacket<'a> {
    /// Accepts any datagram of at least 44 bytes; the rest is padding (or RFC 8972 TLVs).
    pub fn parse(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() < SENDER_LEN {
            return Err(WireError::TooShort {
                what: "Session-Sender",
                len: buf.len(),
                min: SENDER_LEN,
            });
        }
        Ok(SenderPacket { buf })
    }

    #[inline]
    pub fn seq(&self) -> u32 {
        be_u32(self.buf, 0)
    }
    #[inline]
    pub fn timestamp(&self) -> Timestamp {
        Timestamp(be_u64(self.buf, 4))
    }
    #[inline]
    pub fn error_estimate(&self) -> ErrorEstimate {
        ErrorEstimate(be_u16(self.buf, 12))
    }
    #[inline]
    pub fn ssid(&self) -> u16 {
        be_u16(self.buf, 14)
    }
    /// Whole datagram length, padding included.
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// Octets 16..44 are MBZ; RFC 8762 receivers tolerate non-zero values.
    #[inline]
    pub fn mbz_nonzero(&self) -> bool {
        any_nonzero(&self.buf[16..SENDER_LEN])
    }
    pub fn fields(&self) -> SenderFields {
        SenderFields {
            seq: self.seq(),
            timestamp: self.timestamp(),
            error_estimate: self.error_estimate(),
            ssid: self.ssid(),
        }
    }
}

/// The fields of a Session-Reflector test packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReflectorFields {
    pub seq: u32,
    pub timestamp: Timestamp,
    pub error_estimate: ErrorEstimate,
    pub ssid: u16,
    pub receive_timestamp: Timestamp,
    pub sender_seq: u32,
    pub sender_timestamp: Timestamp,
    pub sender_error_estimate: ErrorEstimate,
    pub sender_ttl: u8,
}

/// Offset of the reflector's Timestamp (T3), patched last just before the packet is sent.
pub const REFLECTOR_TIMESTAMP_AT: usize = 4;

impl ReflectorFields {
    /// Writes the packet into `out[..len]` (padding zeroed) and returns `len`. No allocation.
    pub fn encode(&self, out: &mut [u8], len: usize) -> Result<usize, WireError> {
        let p = prepare(out, len, REFLECTOR_LEN)?;
        p[0..4].copy_from_slice(&self.seq.to_be_bytes());
        p[4..12].copy_from_slice(&self.timestamp.0.to_be_bytes());
        p[12..14].copy_from_slice(&self.error_estimate.0.to_be_bytes());
        p[14..16].copy_from_slice(&self.ssid.to_be_bytes());
        p[16..24].copy_from_slice(&self.receive_timestamp.0.to_be_bytes());
        p[24..28].copy_from_slice(&self.sender_seq.to_be_bytes());
        p[28..36].copy_from_slice(&self.sender_timestamp.0.to_be_bytes());
        p[36..38].copy_from_slice(&self.sender_error_estimate.0.to_be_bytes());
        p[40] = self.sender_ttl;
        Ok(len)
    }

    /// Overwrites the Timestamp of an encoded reflector packet, so T3 can be read after all
    /// other work. `pkt` must hold at least the 44-byte base.
    #[inline]
    pub fn patch_timestamp(pkt: &mut [u8], ts: Timestamp) -> Result<(), WireError> {
        let cap = pkt.len();
        let field = pkt
            .get_mut(REFLECTOR_TIMESTAMP_AT..REFLECTOR_TIMESTAMP_AT + 8)
            .filter(|_| cap >= REFLECTOR_LEN)
            .ok_or(WireError::BufferTooSmall {
                len: REFLECTOR_LEN,
                cap,
            })?;
        field.copy_from_slice(&ts.0.to_be_bytes());
        Ok(())
    }
}

/// A zero-copy view of a received Session-Reflector test packet.
#[derive(Debug, Clone, Copy)]
pub struct ReflectorPacket<'a> {
    buf: &'a [u8],
}

impl<'a> ReflectorPacket<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() < REFLECTOR_LEN {
            return Err(WireError::TooShort {
                what: "Session-Reflector",
                len: buf.len(),
                min: REFLECTOR_LEN,
            });
        }
        Ok(ReflectorPacket { buf })
    }

    #[inline]
    pub fn seq(&self) -> u32 {
        be_u32(self.buf, 0)
    }
    #[inline]
    pub fn timestamp(&self) -> Timestamp {
        Timestamp(be_u64(self.buf, 4))
    }
    #[inline]
    pub fn error_estimate(&self) -> ErrorEstimate {
        ErrorEstimate(be_u16(self.buf, 12))
    }
    #[inline]
    pub fn ssid(&self) -> u16 {
        be_u16(self.buf, 14)
    }
    #[inline]
    pub fn receive_timestamp(&self) -> Timestamp {
        Timestamp(be_u64(self.buf, 16))
    }
    #[inline]
    pub fn sender_seq(&self) -> u32 {
        be_u32(self.buf, 24)
    }
    #[inline]
    pub fn sender_timestamp(&self) -> Timestamp {
        Timestamp(be_u64(self.buf, 28))
    }
    #[inline]
    pub fn sender_error_estimate(&self) -> ErrorEstimate {
        ErrorEstimate(be_u16(self.buf, 36))
    }
    #[inline]
    pub fn sender_ttl(&self) -> u8 {
        self.buf[40]
    }
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// Octets 38..40 and 41..44 are MBZ; tolerated, reported for counting.
    #[inline]
    pub fn mbz_nonzero(&self) -> bool {
        any_nonzero(&self.buf[38..40]) || any_nonzero(&self.buf[41..REFLECTOR_LEN])
    }
    pub fn fields(&self) -> ReflectorFields {
        ReflectorFields {
            seq: self.seq(),
            timestamp: self.timestamp(),
            error_estimate: self.error_estimate(),
            ssid: self.ssid(),
            receive_timestamp: self.receive_timestamp(),
            sender_seq: self.sender_seq(),
            sender_timestamp: self.sender_timestamp(),
            sender_error_estimate: self.sender_error_estimate(),
            sender_ttl: self.sender_ttl(),
        }
    }
}
#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
