//! The kernel side as the daemon sees it: loads the embedded eBPF object, attaches its tcx
//! programs to interfaces, and hands out the three maps (ifindex table, mmapped slots, ring).
use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::{
    maps::{Array, Map, MapData, RingBuf},
    programs::{tc::SchedClassifierLinkId, ProgramError, SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use linkpulse_common::{
    bin_ring_bytes, bin_rings_used,
    tcp::{
        GLOBAL_TCP_RTT_ON, MAP_TCP_STATS, MAP_TCP_TS, TCP_STAT_BAD_OPTIONS, TCP_STAT_INSERTS,
        TCP_STAT_INSERT_ERRORS, TCP_STAT_SAMPLES,
    },
    BinRecord, IfaceConf, Slot, GLOBAL_BIN_WIDTH_NS, MAP_BINS, MAP_IFACES, MAP_SLOTS, MAX_IFINDEX,
    SLOTS_PER_CPU,
};

use crate::{align::SlotSource, config::TcpRttConfig};

/// The compiled kernel programs (built by build.rs from ../ebpf).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/linkpulse"));

const PROG_INGRESS: &str = "lp_ingress";
const PROG_EGRESS: &str = "lp_egress";
/// An empty program in the same object: the benchmark's baseline (not attached by the daemon).
const PROG_EMPTY: &str = "lp_empty";
/// Reads the clock and nothing else: the benchmark's second baseline (not attached either).
const PROG_CLOCK: &str = "lp_clock";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot count possible CPUs ({0}): is /sys/devices/system/cpu/possible readable?")]
    Cpus(String),
    #[error("loading the eBPF object failed: {0} (needs root or CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN, and a kernel with BTF)")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {name} is missing from the object: rebuild the daemon")]
    MissingProgram { name: &'static str },
    #[error("eBPF map {name} is missing from the object: rebuild the daemon")]
    MissingMap { name: &'static str },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("mmap of the slot map failed: {0} (kernel without BPF_F_MMAPABLE array support?)")]
    Mmap(#[source] io::Error),
    #[error("attaching to {interface} ({direction}) failed: {source} (the kernel needs tcx, Linux ≥ 6.6; CAP_NET_ADMIN and CAP_BPF)")]
    Attach {
        interface: String,
        direction: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "interface {interface} has ifindex {ifindex}, above the {MAX_IFINDEX} this build supports"
    )]
    IfindexTooLarge { interface: String, ifindex: u32 },
}

/// What attaching one interface produced; dropping it detaches nothing by itself — call
/// [`Kernel::detach`] (tcx links also die with the interface).
#[derive(Debug)]
pub struct Attachment {
    pub ifindex: u32,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

/// Owns the loaded object, its programs and the interface table (the control side).
pub struct Kernel {
    ebpf: Ebpf,
    ifaces: Array<MapData, IfaceConf>,
    tcp_stats: aya::maps::PerCpuArray<MapData, u64>,
    tcp_table_entries: u32,
}

/// Totals of the passive TCP RTT path over all CPUs (`TCP_STATS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpStats {
    pub samples: u64,
    pub inserts: u64,
    pub bad_options: u64,
    pub insert_errors: u64,
}

impl TcpStats {
    /// Stored TSvals that left the table without a match, at least: every insert leaves by a
    /// match (a sample), by LRU eviction, or is still there, and at most `capacity` are there.
    /// TSvals that are never echoed (e.g. the 2nd segment of a delayed-ACK pair) also leave
    /// this way, so it grows on any busy link once the table has filled; a table too small
    /// shows as samples falling while this rises.
    pub fn evicted_at_least(&self, capacity: u32) -> u64 {
        self.inserts
            .saturating_sub(self.samples)
            .saturating_sub(u64::from(capacity))
    }
}

/// The data side: moved to the ingest thread.
pub struct DataMaps {
    pub ring: BinRings,
    pub slots: MmapSlots,
}

/// The kernel's rings of completed bins that CPUs use (CPU `c` emits into ring
/// `c % BIN_RINGS`), drained one after the other. A CPU's records stay in order within its ring, which is all
/// the aligner needs (it keeps state per CPU and slot).
pub struct BinRings(pub Vec<RingBuf<MapData>>);

impl Kernel {
    /// Loads the programs with the given bin width and passive-RTT settings; returns the
    /// control and data halves.
    pub fn load(bin_width_ns: u64, tcp: TcpRttConfig) -> Result<(Kernel, DataMaps), KernelError> {
        let ncpu =
            aya::util::nr_cpus().map_err(|(what, e)| KernelError::Cpus(format!("{what}: {e}")))?;
        let tcp_on = u64::from(tcp.enabled);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_BIN_WIDTH_NS, &bin_width_ns, true)
            .override_global(GLOBAL_TCP_RTT_ON, &tcp_on, true)
            .map_max_entries(MAP_SLOTS, (ncpu * SLOTS_PER_CPU) as u32)
            .map_max_entries(MAP_TCP_TS, tcp.table_entries);
        for (i, name) in MAP_BINS.iter().enumerate() {
            loader.map_max_entries(name, bin_ring_bytes(i, ncpu));
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(KernelError::Load)?;
        for name in [PROG_INGRESS, PROG_EGRESS, PROG_EMPTY, PROG_CLOCK] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram { name })?
                .try_into()
                .map_err(|source| KernelError::Program { name, source })?;
            prog.load()
                .map_err(|source| KernelError::Program { name, source })?;
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(KernelError::MissingMap { name })
        };
        let ifaces =
            Array::try_from(take(&mut ebpf, MAP_IFACES)?).map_err(|source| KernelError::Map {
                name: MAP_IFACES,
                source,
            })?;
        // Only the rings some CPU emits into: the others stay empty, unmapped.
        let ring = BinRings(
            MAP_BINS[..bin_rings_used(ncpu)]
                .iter()
                .map(|&name| {
                    RingBuf::try_from(take(&mut ebpf, name)?)
                        .map_err(|source| KernelError::Map { name, source })
                })
                .collect::<Result<_, _>>()?,
        );
        let slots = match take(&mut ebpf, MAP_SLOTS)? {
            Map::Array(data) => MmapSlots::new(data, ncpu)?,
            _ => return Err(KernelError::MissingMap { name: MAP_SLOTS }),
        };
        let tcp_stats = aya::maps::PerCpuArray::try_from(take(&mut ebpf, MAP_TCP_STATS)?).map_err(
            |source| KernelError::Map {
                name: MAP_TCP_STATS,
                source,
            },
        )?;
        Ok((
            Kernel {
                ebpf,
                ifaces,
                tcp_stats,
                tcp_table_entries: tcp.table_entries,
            },
            DataMaps { ring, slots },
        ))
    }

    /// Entries of the kernel's TSval table.
    pub fn tcp_table_entries(&self) -> u32 {
        self.tcp_table_entries
    }

    /// The passive RTT counters summed over CPUs (one syscall per counter).
    pub fn tcp_stats(&self) -> TcpStats {
        let read = |i: u32| -> u64 {
            self.tcp_stats
                .get(&i, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        TcpStats {
            samples: read(TCP_STAT_SAMPLES),
            inserts: read(TCP_STAT_INSERTS),
            bad_options: read(TCP_STAT_BAD_OPTIONS),
            insert_errors: read(TCP_STAT_INSERT_ERRORS),
        }
    }

    /// Points `ifindex` at `link` (so the programs count it) and attaches both directions.
    pub fn attach(
        &mut self,
        interface: &str,
        ifindex: u32,
        link: u32,
        l2_len: u32,
    ) -> Result<Attachment, KernelError> {
        if ifindex >= MAX_IFINDEX {
            return Err(KernelError::IfindexTooLarge {
                interface: interface.to_string(),
                ifindex,
            });
        }
        let conf = IfaceConf {
            link_plus_one: link + 1,
            l2_len,
        };
        self.ifaces
            .set(ifindex, conf, 0)
            .map_err(|source| KernelError::Map {
                name: MAP_IFACES,
                source,
            })?;
        let ingress = self.attach_one(interface, PROG_INGRESS, TcAttachType::Ingress, "ingress");
        let ingress = match ingress {
            Ok(id) => id,
            Err(e) => {
                self.clear(ifindex);
                return Err(e);
            }
        };
        match self.attach_one(interface, PROG_EGRESS, TcAttachType::Egress, "egress") {
            Ok(egress) => Ok(Attachment {
                ifindex,
                ingress,
                egress,
            }),
            Err(e) => {
                let _ = self.program(PROG_INGRESS).map(|p| p.detach(ingress));
                self.clear(ifindex);
                Err(e)
            }
        }
    }

    fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, KernelError> {
        self.ebpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram { name })?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })
    }

    fn attach_one(
        &mut self,
        interface: &str,
        name: &'static str,
        kind: TcAttachType,
        direction: &'static str,
    ) -> Result<SchedClassifierLinkId, KernelError> {
        self.program(name)?
            .attach(interface, kind)
            .map_err(|source| KernelError::Attach {
                interface: interface.to_string(),
                direction,
                source,
            })
    }

    /// Stops counting `ifindex` and detaches both programs. Errors are ignored when the
    /// interface is already gone (the kernel dropped the links with it).
    pub fn detach(&mut self, a: Attachment) {
        self.clear(a.ifindex);
        for (name, id) in [(PROG_INGRESS, a.ingress), (PROG_EGRESS, a.egress)] {
            if let Ok(p) = self.program(name) {
                // Fails harmlessly when the interface (and so the link) is already gone.
                if let Err(e) = p.detach(id) {
                    tracing::debug!(error = %e, "detach");
                }
            }
        }
    }

    /// Attaches the baseline programs (empty, and a bare clock read) to both directions of
    /// `interface` (benchmarks).
    pub fn attach_baseline(&mut self, interface: &str) -> Result<(), KernelError> {
        for (kind, direction) in [
            (TcAttachType::Ingress, "ingress"),
            (TcAttachType::Egress, "egress"),
        ] {
            self.attach_one(interface, PROG_EMPTY, kind, direction)?;
            self.attach_one(interface, PROG_CLOCK, kind, direction)?;
        }
        Ok(())
    }

    /// (program name, total run time ns, run count) of each program, as bpf_stats counts them
    /// (both are 0 unless `kernel.bpf_stats_enabled` is 1).
    pub fn program_stats(&self) -> Vec<(&'static str, u64, u64)> {
        [PROG_INGRESS, PROG_EGRESS, PROG_EMPTY, PROG_CLOCK]
            .into_iter()
            .filter_map(|name| {
                let p: &SchedClassifier = self.ebpf.program(name)?.try_into().ok()?;
                let info = p.info().ok()?;
                Some((name, info.run_time().as_nanos() as u64, info.run_count()))
            })
            .collect()
    }

    fn clear(&mut self, ifindex: u32) {
        if let Err(e) = self.ifaces.set(ifindex, IfaceConf::default(), 0) {
            tracing::warn!(ifindex, error = %e, "could not clear interface table entry");
        }
    }
}

/// The `SLOTS` array mapped read-only into our address space (no syscalls to read it).
pub struct MmapSlots {
    ptr: NonNull<Slot>,
    len: usize,
    map_len: usize,
    ncpu: usize,
    _map: MapData,
}

// SAFETY: the mapping is read-only shared memory owned by this value; reads are volatile.
unsafe impl Send for MmapSlots {}

impl MmapSlots {
    fn new(map: MapData, ncpu: usize) -> Result<Self, KernelError> {
        let len = ncpu * SLOTS_PER_CPU;
        let page = 4096usize;
        let map_len = (len * std::mem::size_of::<Slot>()).div_ceil(page) * page;
        // SAFETY: mapping a BPF array fd created with BPF_F_MMAPABLE, read-only and shared.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(KernelError::Mmap(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<Slot>())
            .ok_or_else(|| KernelError::Mmap(io::Error::other("null mapping")))?;
        Ok(Self {
            ptr,
            len,
            map_len,
            ncpu,
            _map: map,
        })
    }
}

impl SlotSource for MmapSlots {
    fn ncpu(&self) -> usize {
        self.ncpu
    }

    #[inline]
    fn read(&self, index: usize) -> Slot {
        if index >= self.len {
            return Slot::default();
        }
        let p = self.ptr.as_ptr();
        // SAFETY (both closures): in bounds of the mapping; the kernel writes concurrently, so
        // every field is read volatile (each is an aligned u64: no torn field).
        consistent_slot(
            || unsafe { std::ptr::addr_of!((*p.add(index)).bin_start).read_volatile() },
            || unsafe {
                let p = p.add(index);
                Slot {
                    bin_start: 0,
                    packets: std::ptr::addr_of!((*p).packets).read_volatile(),
                    bytes: std::ptr::addr_of!((*p).bytes).read_volatile(),
                    ring_full: std::ptr::addr_of!((*p).ring_full).read_volatile(),
                    malformed: std::ptr::addr_of!((*p).malformed).read_volatile(),
                    tcp_rtt: std::ptr::addr_of!((*p).tcp_rtt).read_volatile(),
                }
            },
        )
    }
}

/// A slot's counts with the bin they belong to. The kernel moves a slot on by zeroing the
/// counts, storing the new bin start, then counting the packet that moved it: counts read after
/// that under a bin start read before it would be the new bin's, taken for the old one (a GSO
/// packet of 40 segments landing in a bin that had 2). So the start is read before and after
/// the counts, and the read is retried when it changed; if it keeps changing the slot reads as
/// empty this time (its counts come with the record, or at the next tick).
fn consistent_slot(mut bin: impl FnMut() -> u64, mut rest: impl FnMut() -> Slot) -> Slot {
    use std::sync::atomic::{fence, Ordering};
    for _ in 0..4 {
        let b = bin();
        // Loads in program order on weakly ordered CPUs too (x86 keeps them anyway).
        fence(Ordering::Acquire);
        let s = rest();
        fence(Ordering::Acquire);
        if bin() == b {
            return Slot { bin_start: b, ..s };
        }
    }
    Slot {
        bin_start: 0,
        ..rest()
    }
}

impl Drop for MmapSlots {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

/// Decodes one ring-buffer item (the kernel writes exactly one BinRecord per item).
#[inline]
pub fn decode_record(bytes: &[u8]) -> Option<BinRecord> {
    if bytes.len() < std::mem::size_of::<BinRecord>() {
        return None;
    }
    // SAFETY: length checked; BinRecord is plain integers; read_unaligned tolerates any alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<BinRecord>()) })
}

/// Link-layer header length of an interface, from its ARPHRD type (SIOCGIFHWADDR in the
/// calling thread's network namespace).
pub fn l2_header_len(interface: &str) -> io::Result<u32> {
    let name = CString::new(interface).map_err(|_| io::Error::other("interface name has a NUL"))?;
    // SAFETY: plain socket for an ioctl; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq zeroed then the name copied within IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.as_bytes_with_nul().iter().take(libc::IFNAMSIZ - 1))
    {
        *dst = *src as libc::c_char;
    }
    // SAFETY: valid fd and ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    // SAFETY: SIOCGIFHWADDR fills ifru_hwaddr.
    let family = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
    Ok(match family {
        libc::ARPHRD_ETHER => 14,
        // TUN (NONE), raw-IP modems (RAWIP = 519), PPP, IP-in-IP tunnels: no L2 header at tc.
        libc::ARPHRD_NONE | libc::ARPHRD_PPP | libc::ARPHRD_TUNNEL | libc::ARPHRD_TUNNEL6 | 519 => {
            0
        }
        other => {
            return Err(io::Error::other(format!(
                "link type {other} is not supported (supported: Ethernet/veth, raw-IP, TUN, PPP)"
            )))
        }
    })
}

/// ifindex of `interface` in the calling thread's network namespace, None if it does not exist.
pub fn ifindex(interface: &str) -> Option<u32> {
    let name = CString::new(interface).ok()?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

/// The probe path's maps, taken by the `lp-probe` thread.
pub struct ProbeMaps {
    /// link → the ports the programs match (`PROBE_CONF`).
    pub conf: Array<MapData, linkpulse_common::probe::ProbeConf>,
    /// Kernel stamps of probe packets (`PROBE_RING`).
    pub ring: RingBuf<MapData>,
    /// Per-CPU counters of the probe path (`PROBE_STATS`).
    pub stats: aya::maps::PerCpuArray<MapData, u64>,
}

impl Kernel {
    /// Hands the probe maps to their owner (once; later calls report them missing).
    pub fn take_probe_maps(&mut self) -> Result<ProbeMaps, KernelError> {
        use linkpulse_common::probe::{MAP_PROBE_CONF, MAP_PROBE_RING, MAP_PROBE_STATS};
        let mut take = |name: &'static str| {
            self.ebpf
                .take_map(name)
                .ok_or(KernelError::MissingMap { name })
        };
        let conf = Array::try_from(take(MAP_PROBE_CONF)?).map_err(|source| KernelError::Map {
            name: MAP_PROBE_CONF,
            source,
        })?;
        let ring = RingBuf::try_from(take(MAP_PROBE_RING)?).map_err(|source| KernelError::Map {
            name: MAP_PROBE_RING,
            source,
        })?;
        let stats = aya::maps::PerCpuArray::try_from(take(MAP_PROBE_STATS)?).map_err(|source| {
            KernelError::Map {
                name: MAP_PROBE_STATS,
                source,
            }
        })?;
        Ok(ProbeMaps { conf, ring, stats })
    }
}

impl DataMaps {
    /// Possible CPUs the slot map was sized for.
    pub fn slots_ncpu(&self) -> usize {
        self.slots.ncpu
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn counts(packets: u64) -> Slot {
        Slot {
            packets,
            bytes: packets * 1500,
            ..Slot::default()
        }
    }

    #[test]
    fn counts_read_across_a_rollover_go_with_the_new_bin() {
        // The kernel moves the slot from bin 100 to 200 and counts a 44-segment GSO packet
        // between the daemon's first read of the start and its read of the counts.
        let starts = [100u64, 200, 200, 200];
        let calls = Cell::new(0);
        let s = consistent_slot(
            || {
                let i = calls.get();
                calls.set(i + 1);
                starts[i.min(starts.len() - 1)]
            },
            || counts(44),
        );
        assert_eq!((s.bin_start, s.packets), (200, 44));
    }

    #[test]
    fn a_quiet_slot_reads_once_and_a_slot_that_keeps_moving_reads_empty() {
        let calls = Cell::new(0);
        let s = consistent_slot(
            || {
                calls.set(calls.get() + 1);
                100
            },
            || counts(3),
        );
        assert_eq!((s.bin_start, s.packets, calls.get()), (100, 3, 2));
        let next = Cell::new(100);
        let s = consistent_slot(
            || {
                next.set(next.get() + 100);
                next.get()
            },
            || counts(5),
        );
        // Empty means "take nothing now": the counts still come with the record or later.
        assert_eq!(s.bin_start, 0);
    }
}
