//! Records of the active-probe path: the per-link match rule the daemon writes, and the kernel
//! stamps (T1 on egress, T4 on ingress) the eBPF programs send back through a ring buffer.

/// Name of the per-link probe match table (`Array<ProbeConf>`, `MAX_LINKS` entries).
pub const MAP_PROBE_CONF: &str = "PROBE_CONF";
/// Name of the ring buffer of [`ProbeRecord`]s.
pub const MAP_PROBE_RING: &str = "PROBE_RING";
/// Name of the per-CPU counters of the probe path (index: `PROBE_STAT_*`).
pub const MAP_PROBE_STATS: &str = "PROBE_STATS";

/// `PROBE_STATS` index: a probe stamp was lost because the ring was full.
pub const PROBE_STAT_RING_FULL: u32 = 0;
/// `PROBE_STATS` index: packets on the probe ports too short to hold a STAMP header.
pub const PROBE_STAT_SHORT: u32 = 1;
/// Entries of `PROBE_STATS`.
pub const PROBE_STATS_LEN: u32 = 4;

/// How the kernel recognises this link's probes. Ports in host byte order;
/// `sender_port == 0` means the link is not probed (one array lookup and one compare then).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConf {
    /// Local UDP port of the link's Session-Sender socket.
    pub sender_port: u16,
    /// UDP port of the reflector (default 862).
    pub reflector_port: u16,
    pub _pad: u32,
}

/// One kernel stamp of a probe packet (`dir` as in the bins: 1 = egress/T1, 0 = ingress/T4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeRecord {
    /// CLOCK_TAI ns when the program saw the packet.
    pub t_ns: u64,
    /// Egress: the sender's sequence number; ingress: the reflected Session-Sender sequence.
    pub sender_seq: u32,
    /// Ingress: the reflector's own sequence number; egress: 0.
    pub refl_seq: u32,
    pub link: u16,
    pub dir: u8,
    pub _pad: [u8; 5],
}

const _: () = assert!(core::mem::size_of::<ProbeConf>() == 8);
const _: () = assert!(core::mem::size_of::<ProbeRecord>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::ProbeConf {}
    unsafe impl aya::Pod for super::ProbeRecord {}
}
