//! Ground truth: one fixed-size binary record per IP packet the emulator handles.
//!
//! # File layout
//! One file per modem and direction, `state_dir/truth/m{modem}-{up|down}.bin`, made only of
//! records (no header), each [`RECORD_SIZE`] = 48 bytes, little-endian, `#[repr(C)]`:
//!
//! | offset | type  | field      | meaning |
//! | ------ | ----- | ---------- | ------- |
//! | 0      | u64   | `t_in_ns`  | CLOCK_REALTIME ns of the arrival at the emulator: the kernel rx stamp (SO_TIMESTAMPNS) for AF_PACKET reads, the clock right after `read()` for TUN reads |
//! | 8      | u64   | `t_out_ns` | CLOCK_REALTIME ns read right after the write toward the destination returned; 0 if not delivered |
//! | 16     | u16   | `modem`    | modem index k (wwanK) |
//! | 18     | u8    | `dir`      | 0 = down (server → router, router ingress), 1 = up (router → server, router egress) |
//! | 19     | u8    | `verdict`  | see [`Verdict`] |
//! | 20     | u32   | `size`     | L3 bytes (IP header onward), from the IP header's length field |
//! | 24     | u32   | `write_ns` | how long the delivering write took: `t_out_ns - write_ns` is the clock just before it (0 if not delivered) |
//! | 28     | u8    | `ip_version` | 4 or 6 |
//! | 29     | u8    | `ip_proto` | IPv4 protocol / IPv6 first next-header (17 UDP, 6 TCP, 58 ICMPv6, 0 hop-by-hop…) |
//! | 30     | u8    | `flags`    | bit 0: `t_in_ns` is a kernel rx stamp; bit 1: delivery held by the boundary guard |
//! | 31     | u8    | `_pad`     | 0 |
//! | 32     | u32   | `tsval`    | TCP timestamp option's TSval (0 unless `tcp` bit 1) |
//! | 36     | u32   | `tsecr`    | its TSecr |
//! | 40     | u16   | `sport`    | TCP source port (0 unless `tcp` bit 0) |
//! | 42     | u16   | `dport`    | TCP destination port |
//! | 44     | u8    | `tcp_flags`| the TCP header's flags byte (0x10 = ACK) |
//! | 45     | u8    | `tcp`      | bit 0: a TCP header was read; bit 1: it has a timestamp option |
//! | 46     | u16   | `_pad2`    | 0 |
//!
//! Records are appended when the packet's fate is known (dropped at arrival, delivered at its
//! departure), so a file is ordered by that moment, not by `t_in_ns`.
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

/// Size of one on-disk record.
pub const RECORD_SIZE: usize = 48;
/// `flags` bit: `t_in_ns` comes from the kernel's rx timestamp.
pub const FLAG_KERNEL_RX_STAMP: u8 = 1;
/// `flags` bit: the delivery was held back by the downlink boundary guard.
pub const FLAG_GUARD_HELD: u8 = 2;

const NS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum TruthError {
    #[error("truth file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("truth file {path}: {len} bytes is not a whole number of {RECORD_SIZE}-byte records")]
    Truncated { path: PathBuf, len: u64 },
    #[error("truth file {path}, record {index}: unknown {field} value {value}")]
    BadField {
        path: PathBuf,
        index: usize,
        field: &'static str,
        value: u8,
    },
}

/// Direction, numbered like the daemon's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Dir {
    /// Server → router: the router's ingress.
    Down = 0,
    /// Router → server: the router's egress.
    Up = 1,
}

impl Dir {
    pub fn from_u8(v: u8) -> Option<Dir> {
        match v {
            0 => Some(Dir::Down),
            1 => Some(Dir::Up),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Down => "down",
            Dir::Up => "up",
        }
    }
}

/// What happened to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Verdict {
    Delivered = 0,
    /// Random loss (`LinkProfile::loss`).
    LostRandom = 1,
    /// Drop-tail at the bottleneck queue.
    DroppedQueue = 2,
    /// Arrived during an outage.
    DroppedOutage = 3,
    /// Accepted, but the emulator stopped (testbed down, modem deleted) before it left.
    DroppedShutdown = 4,
    /// The write toward the destination failed.
    TxError = 5,
}

impl Verdict {
    pub const ALL: [Verdict; 6] = [
        Verdict::Delivered,
        Verdict::LostRandom,
        Verdict::DroppedQueue,
        Verdict::DroppedOutage,
        Verdict::DroppedShutdown,
        Verdict::TxError,
    ];
    pub fn from_u8(v: u8) -> Option<Verdict> {
        Verdict::ALL.get(usize::from(v)).copied()
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Delivered => "delivered",
            Verdict::LostRandom => "lost_random",
            Verdict::DroppedQueue => "dropped_queue",
            Verdict::DroppedOutage => "dropped_outage",
            Verdict::DroppedShutdown => "dropped_shutdown",
            Verdict::TxError => "tx_error",
        }
    }
}

/// One packet's fate. In memory the enums are typed; on disk see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TruthRecord {
    pub t_in_ns: u64,
    pub t_out_ns: u64,
    pub modem: u16,
    pub dir: Dir,
    pub verdict: Verdict,
    pub size: u32,
    pub write_ns: u32,
    pub ip_version: u8,
    pub ip_proto: u8,
    pub flags: u8,
    /// Ports, flags and timestamps of a TCP segment (the passive RTT's truth).
    pub tcp: Option<TcpFacts>,
}

/// What the truth keeps of a TCP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFacts {
    pub sport: u16,
    pub dport: u16,
    /// The flags byte (0x10 = ACK, 0x02 = SYN, 0x01 = FIN).
    pub flags: u8,
    /// (TSval, TSecr) of the timestamp option, if any.
    pub ts: Option<(u32, u32)>,
}

impl TcpFacts {
    pub const ACK: u8 = 0x10;

    /// The TCP facts of an IP packet (IPv4, or IPv6 with up to four extension headers, stepped
    /// over as the kernel programs do: `linkpulse_common::ip`), None for other packets,
    /// non-first fragments and headers cut short. Options are read with the parser the kernel
    /// programs use (`linkpulse_common::tcp`); a malformed list gives `ts` None.
    pub fn of_packet(pkt: &[u8]) -> Option<TcpFacts> {
        let l4 = match pkt.first()? >> 4 {
            4 if pkt.len() >= 20 => {
                if pkt[9] != 6 || (pkt[6] & 0x1f) != 0 || pkt[7] != 0 {
                    return None;
                }
                usize::from(pkt[0] & 0x0f) * 4
            }
            6 if pkt.len() >= 40 => match linkpulse_common::ip::ipv6_transport(pkt)? {
                (off, 6) => off,
                _ => return None,
            },
            _ => return None,
        };
        let t = pkt.get(l4..)?;
        if t.len() < 20 {
            return None;
        }
        let opt_len = (usize::from(t[12] >> 4) * 4).saturating_sub(20);
        let opts = &t[20..];
        let ts = match linkpulse_common::tcp::tcp_timestamp(opts, opt_len) {
            linkpulse_common::tcp::TsOption::Found { tsval, tsecr } => Some((tsval, tsecr)),
            _ => None,
        };
        Some(TcpFacts {
            sport: u16::from_be_bytes([t[0], t[1]]),
            dport: u16::from_be_bytes([t[2], t[3]]),
            flags: t[13],
            ts,
        })
    }
}

impl TruthRecord {
    pub fn to_bytes(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0..8].copy_from_slice(&self.t_in_ns.to_le_bytes());
        b[8..16].copy_from_slice(&self.t_out_ns.to_le_bytes());
        b[16..18].copy_from_slice(&self.modem.to_le_bytes());
        b[18] = self.dir as u8;
        b[19] = self.verdict as u8;
        b[20..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..28].copy_from_slice(&self.write_ns.to_le_bytes());
        b[28] = self.ip_version;
        b[29] = self.ip_proto;
        b[30] = self.flags;
        if let Some(t) = &self.tcp {
            let (tsval, tsecr) = t.ts.unwrap_or((0, 0));
            b[32..36].copy_from_slice(&tsval.to_le_bytes());
            b[36..40].copy_from_slice(&tsecr.to_le_bytes());
            b[40..42].copy_from_slice(&t.sport.to_le_bytes());
            b[42..44].copy_from_slice(&t.dport.to_le_bytes());
            b[44] = t.flags;
            b[45] = 1 | if t.ts.is_some() { 2 } else { 0 };
        }
        b
    }

    /// Parses one record; `Err((field, value))` names an out-of-range enum byte.
    pub fn from_bytes(b: &[u8; RECORD_SIZE]) -> Result<TruthRecord, (&'static str, u8)> {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        Ok(TruthRecord {
            t_in_ns: u64_at(0),
            t_out_ns: u64_at(8),
            modem: u16::from_le_bytes([b[16], b[17]]),
            dir: Dir::from_u8(b[18]).ok_or(("dir", b[18]))?,
            verdict: Verdict::from_u8(b[19]).ok_or(("verdict", b[19]))?,
            size: u32_at(20),
            write_ns: u32_at(24),
            ip_version: b[28],
            ip_proto: b[29],
            flags: b[30],
            tcp: (b[45] & 1 != 0).then(|| TcpFacts {
                sport: u16::from_le_bytes([b[40], b[41]]),
                dport: u16::from_le_bytes([b[42], b[43]]),
                flags: b[44],
                ts: (b[45] & 2 != 0).then(|| (u32_at(32), u32_at(36))),
            }),
        })
    }

    pub fn delivered(&self) -> bool {
        self.verdict == Verdict::Delivered
    }

    /// The moment the router's interface handles this packet as far as the truth can tell:
    /// egress (up) at the emulator's arrival, ingress (down) when delivered; `None` for a
    /// downlink packet that never reached the router.
    pub fn router_time_ns(&self) -> Option<u64> {
        match self.dir {
            Dir::Up => Some(self.t_in_ns),
            Dir::Down if self.delivered() => Some(self.t_out_ns),
            Dir::Down => None,
        }
    }
}

/// File name of one modem/direction's log inside the truth directory.
pub fn file_name(modem: u16, dir: Dir) -> String {
    format!("m{modem}-{}.bin", dir.as_str())
}

/// Appender for one truth file. Records are encoded into an in-memory buffer on the caller's
/// thread; [`TruthWriter::maybe_flush`] hands the buffer to a writer thread, which does the
/// file I/O, so a slow disk never stalls the emulator thread that stamps packets (a file write
/// inline used to add multi-ms tails to the TUN read stamps). The owner calls `maybe_flush`
/// from its loop (the emulator: at least every 100 ms) and [`TruthWriter::flush`] on stop,
/// which waits until everything is written.
pub struct TruthWriter {
    path: PathBuf,
    buf: Vec<u8>,
    tx: Option<mpsc::SyncSender<ToWriter>>,
    recycled: mpsc::Receiver<Vec<u8>>,
    join: Option<JoinHandle<()>>,
    last_flush_ns: u64,
}

enum ToWriter {
    Data(Vec<u8>),
    /// Reply once everything before is written: the first write error so far, if any.
    Sync(mpsc::Sender<Option<std::io::Error>>),
}

/// Buffers in flight between the caller and the writer thread before handoffs wait.
const HANDOFF_QUEUE: usize = 64;

impl TruthWriter {
    /// Opens `dir/m{modem}-{dir}.bin` for appending (created if missing).
    pub fn open(truth_dir: &Path, modem: u16, dir: Dir) -> Result<TruthWriter, TruthError> {
        let path = truth_dir.join(file_name(modem, dir));
        let io_err = |source| TruthError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err)?;
        let (tx, rx) = mpsc::sync_channel::<ToWriter>(HANDOFF_QUEUE);
        let (back_tx, recycled) = mpsc::sync_channel::<Vec<u8>>(4);
        let shown = path.display().to_string();
        let join = std::thread::Builder::new()
            .name("truth writer".into())
            .spawn(move || {
                let mut first_error: Option<std::io::Error> = None;
                for msg in rx {
                    match msg {
                        ToWriter::Data(mut v) => {
                            if first_error.is_none() {
                                if let Err(e) = file.write_all(&v) {
                                    tracing::error!(path = %shown, error = %e, "truth write failed");
                                    first_error = Some(e);
                                }
                            }
                            v.clear();
                            // Give the buffer back for reuse; drop it if nobody wants it.
                            let _ = back_tx.try_send(v);
                        }
                        ToWriter::Sync(reply) => {
                            let e = first_error
                                .as_ref()
                                .map(|e| std::io::Error::new(e.kind(), e.to_string()));
                            let _ = reply.send(e);
                        }
                    }
                }
            })
            .map_err(io_err)?;
        Ok(TruthWriter {
            path,
            buf: Vec::with_capacity(64 * 1024),
            tx: Some(tx),
            recycled,
            join: Some(join),
            last_flush_ns: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record to the buffer (no I/O).
    pub fn write(&mut self, rec: &TruthRecord) -> Result<(), TruthError> {
        self.buf.extend_from_slice(&rec.to_bytes());
        Ok(())
    }

    /// True when records are buffered and not yet handed to the writer.
    pub fn has_unflushed(&self) -> bool {
        !self.buf.is_empty()
    }

    /// When the next periodic handoff is due (if anything is buffered).
    pub fn flush_due_ns(&self, period_ns: u64) -> Option<u64> {
        self.has_unflushed()
            .then(|| self.last_flush_ns.saturating_add(period_ns))
    }

    /// Hands the buffer to the writer thread if the last handoff is at least `period_ns` old
    /// (or the buffer passed 64 KiB). Never blocks: if the writer is backed up, the records
    /// stay buffered for the next try.
    pub fn maybe_flush(&mut self, now_ns: u64, period_ns: u64) -> Result<(), TruthError> {
        let due =
            now_ns.saturating_sub(self.last_flush_ns) >= period_ns || self.buf.len() >= 64 * 1024;
        if !self.has_unflushed() || !due {
            return Ok(());
        }
        let Some(tx) = &self.tx else {
            return Err(self.gone());
        };
        let next = self
            .recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(64 * 1024));
        let data = std::mem::replace(&mut self.buf, next);
        match tx.try_send(ToWriter::Data(data)) {
            Ok(()) => {
                self.last_flush_ns = now_ns;
                Ok(())
            }
            Err(mpsc::TrySendError::Full(ToWriter::Data(mut data))) => {
                // Keep order: put the records back in front of anything buffered since.
                data.append(&mut self.buf);
                self.buf = data;
                Ok(())
            }
            Err(_) => Err(self.gone()),
        }
    }

    /// Hands everything over and waits until it is written; reports the first write error.
    pub fn flush(&mut self) -> Result<(), TruthError> {
        let Some(tx) = &self.tx else {
            return Err(self.gone());
        };
        if !self.buf.is_empty() {
            let data = std::mem::take(&mut self.buf);
            tx.send(ToWriter::Data(data)).map_err(|_| self.gone())?;
        }
        let (reply_tx, reply_rx) = mpsc::channel();
        tx.send(ToWriter::Sync(reply_tx)).map_err(|_| self.gone())?;
        match reply_rx.recv() {
            Ok(None) => {
                self.last_flush_ns = crate::sys::realtime_ns();
                Ok(())
            }
            Ok(Some(source)) => Err(TruthError::Io {
                path: self.path.clone(),
                source,
            }),
            Err(_) => Err(self.gone()),
        }
    }

    fn gone(&self) -> TruthError {
        TruthError::Io {
            path: self.path.clone(),
            source: std::io::Error::other("the truth writer thread is gone"),
        }
    }
}

impl Drop for TruthWriter {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(path = %self.path.display(), error = %e, "truth flush on drop failed");
        }
        // Closing the channel ends the writer thread once it has written everything.
        self.tx = None;
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Reads one truth file.
pub fn read_file(path: &Path) -> Result<Vec<TruthRecord>, TruthError> {
    let io_err = |source| TruthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err)?;
    if bytes.len() % RECORD_SIZE != 0 {
        return Err(TruthError::Truncated {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
        });
    }
    let mut out = Vec::with_capacity(bytes.len() / RECORD_SIZE);
    for (index, chunk) in bytes.chunks_exact(RECORD_SIZE).enumerate() {
        let mut b = [0u8; RECORD_SIZE];
        b.copy_from_slice(chunk);
        let rec = TruthRecord::from_bytes(&b).map_err(|(field, value)| TruthError::BadField {
            path: path.to_path_buf(),
            index,
            field,
            value,
        })?;
        out.push(rec);
    }
    Ok(out)
}

/// Reads every `*.bin` truth file in `dir`, sorted by (`t_in_ns`, modem, dir).
pub fn read_dir(dir: &Path) -> Result<Vec<TruthRecord>, TruthError> {
    let entries = std::fs::read_dir(dir).map_err(|source| TruthError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths = Vec::new();
    for e in entries {
        let e = e.map_err(|source| TruthError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let p = e.path();
        if p.extension().is_some_and(|x| x == "bin") {
            paths.push(p);
        }
    }
    paths.sort();
    let mut all = Vec::new();
    for p in paths {
        all.extend(read_file(&p)?);
    }
    all.sort_by_key(|r| (r.t_in_ns, r.modem, r.dir));
    Ok(all)
}

/// Per-verdict counts of one truth file, streamed (files can be large).
pub fn summarize_file(path: &Path) -> Result<BTreeMap<Verdict, Counts>, TruthError> {
    let io_err = |source| TruthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut r = std::io::BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err)?);
    let mut m: BTreeMap<Verdict, Counts> = BTreeMap::new();
    let mut b = [0u8; RECORD_SIZE];
    let mut index = 0usize;
    loop {
        match r.read_exact(&mut b) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io_err(e)),
        }
        let rec = TruthRecord::from_bytes(&b).map_err(|(field, value)| TruthError::BadField {
            path: path.to_path_buf(),
            index,
            field,
            value,
        })?;
        m.entry(rec.verdict).or_default().add(u64::from(rec.size));
        index += 1;
    }
    Ok(m)
}

/// Packet and byte counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
}

impl Counts {
    pub fn add(&mut self, bytes: u64) {
        self.packets += 1;
        self.bytes += bytes;
    }
}

/// UTC second (floor) of a CLOCK_REALTIME ns time.
pub fn utc_second(t_ns: u64) -> i64 {
    // u64 ns / 1e9 fits in i64 for the next ~292 years.
    (t_ns / NS_PER_SEC) as i64
}

/// What the router's `modem` interface saw in direction `dir`, per UTC second: for `Up`
/// (router egress) every packet the emulator received from the router, whatever became of it,
/// at `t_in`; for `Down` (router ingress) only delivered packets, at `t_out`.
pub fn router_view(records: &[TruthRecord], modem: u16, dir: Dir) -> BTreeMap<i64, Counts> {
    let mut per_sec: BTreeMap<i64, Counts> = BTreeMap::new();
    for r in records.iter().filter(|r| r.modem == modem && r.dir == dir) {
        if let Some(t) = r.router_time_ns() {
            per_sec
                .entry(utc_second(t))
                .or_default()
                .add(u64::from(r.size));
        }
    }
    per_sec
}

/// Totals of [`router_view`].
pub fn router_totals(records: &[TruthRecord], modem: u16, dir: Dir) -> Counts {
    let mut c = Counts::default();
    for r in records.iter().filter(|r| r.modem == modem && r.dir == dir) {
        if r.router_time_ns().is_some() {
            c.add(u64::from(r.size));
        }
    }
    c
}

/// Counts per verdict for one modem and direction (all records, whatever the router saw).
pub fn verdict_totals(records: &[TruthRecord], modem: u16, dir: Dir) -> BTreeMap<Verdict, Counts> {
    let mut m: BTreeMap<Verdict, Counts> = BTreeMap::new();
    for r in records.iter().filter(|r| r.modem == modem && r.dir == dir) {
        m.entry(r.verdict).or_default().add(u64::from(r.size));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(t_in: u64, t_out: u64, dir: Dir, verdict: Verdict, size: u32) -> TruthRecord {
        TruthRecord {
            t_in_ns: t_in,
            t_out_ns: t_out,
            modem: 3,
            dir,
            verdict,
            size,
            write_ns: 1234,
            ip_version: 4,
            ip_proto: 17,
            flags: FLAG_KERNEL_RX_STAMP,
            tcp: None,
        }
    }

    /// An IPv4 TCP segment 10.0.0.1:40000 → 10.0.0.2:5201, ACK, NOP NOP TS.
    fn tcp_v4(opts: &[u8]) -> Vec<u8> {
        let doff = (20 + opts.len()) / 4;
        let mut p = vec![0u8; 20 + 20 + opts.len()];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[32] = (doff as u8) << 4;
        p[33] = TcpFacts::ACK;
        p[40..].copy_from_slice(opts);
        p
    }

    #[test]
    fn tcp_facts_from_packets_and_roundtrip() {
        let ts = [1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9];
        let f = TcpFacts::of_packet(&tcp_v4(&ts)).expect("tcp");
        assert_eq!(
            f,
            TcpFacts {
                sport: 40000,
                dport: 5201,
                flags: TcpFacts::ACK,
                ts: Some((7, 9)),
            }
        );
        // No options, a malformed list, UDP, a non-first fragment.
        assert_eq!(TcpFacts::of_packet(&tcp_v4(&[])).map(|f| f.ts), Some(None));
        assert_eq!(
            TcpFacts::of_packet(&tcp_v4(&[1, 1, 8, 6])).map(|f| f.ts),
            Some(None)
        );
        let mut udp = tcp_v4(&ts);
        udp[9] = 17;
        assert_eq!(TcpFacts::of_packet(&udp), None);
        let mut frag = tcp_v4(&ts);
        frag[7] = 1;
        assert_eq!(TcpFacts::of_packet(&frag), None);
        assert_eq!(TcpFacts::of_packet(&tcp_v4(&ts)[..30]), None);
        let mut r = rec(1, 2, Dir::Down, Verdict::Delivered, 52);
        r.ip_proto = 6;
        r.tcp = Some(f);
        assert_eq!(TruthRecord::from_bytes(&r.to_bytes()), Ok(r));
        r.tcp = Some(TcpFacts { ts: None, ..f });
        assert_eq!(TruthRecord::from_bytes(&r.to_bytes()), Ok(r));
    }

    #[test]
    fn record_roundtrip_and_layout() {
        let r = rec(
            0x0102030405060708,
            0x1112131415161718,
            Dir::Up,
            Verdict::DroppedOutage,
            1500,
        );
        let b = r.to_bytes();
        assert_eq!(b[0], 0x08, "little-endian t_in");
        assert_eq!(b[8], 0x18, "little-endian t_out");
        assert_eq!(&b[16..18], &3u16.to_le_bytes());
        assert_eq!(b[18], 1);
        assert_eq!(b[19], 3);
        assert_eq!(&b[20..24], &1500u32.to_le_bytes());
        assert_eq!(b[31], 0);
        assert_eq!(TruthRecord::from_bytes(&b), Ok(r));
        let mut bad = b;
        bad[19] = 200;
        assert_eq!(TruthRecord::from_bytes(&bad), Err(("verdict", 200)));
    }

    #[test]
    fn writer_reader_and_views() {
        let dir = std::env::temp_dir().join(format!("lp-truth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = NS_PER_SEC;
        {
            let mut w = TruthWriter::open(&dir, 3, Dir::Up).unwrap();
            // Up: counted at t_in, whatever the verdict.
            w.write(&rec(
                10 * s + 5,
                10 * s + 9,
                Dir::Up,
                Verdict::Delivered,
                100,
            ))
            .unwrap();
            w.write(&rec(10 * s + 7, 0, Dir::Up, Verdict::LostRandom, 200))
                .unwrap();
            w.write(&rec(
                11 * s - 1,
                11 * s + 3,
                Dir::Up,
                Verdict::Delivered,
                300,
            ))
            .unwrap();
            w.flush().unwrap();
            let mut d = TruthWriter::open(&dir, 3, Dir::Down).unwrap();
            // Down: only delivered, at t_out.
            d.write(&rec(
                10 * s + 5,
                11 * s + 1,
                Dir::Down,
                Verdict::Delivered,
                1000,
            ))
            .unwrap();
            d.write(&rec(10 * s + 6, 0, Dir::Down, Verdict::DroppedQueue, 1000))
                .unwrap();
            // Dropped on drop: the Drop impl flushes.
        }
        let all = read_dir(&dir).unwrap();
        assert_eq!(all.len(), 5);
        assert!(all.windows(2).all(|w| w[0].t_in_ns <= w[1].t_in_ns));
        let up = router_view(&all, 3, Dir::Up);
        assert_eq!(
            up.get(&10),
            Some(&Counts {
                packets: 3,
                bytes: 600
            })
        );
        let down = router_view(&all, 3, Dir::Down);
        assert_eq!(down.len(), 1);
        assert_eq!(
            down.get(&11),
            Some(&Counts {
                packets: 1,
                bytes: 1000
            })
        );
        assert_eq!(
            router_totals(&all, 3, Dir::Down),
            Counts {
                packets: 1,
                bytes: 1000
            }
        );
        assert!(router_view(&all, 2, Dir::Up).is_empty());
        let v = verdict_totals(&all, 3, Dir::Down);
        assert_eq!(v[&Verdict::DroppedQueue].packets, 1);
        let f = summarize_file(&dir.join(file_name(3, Dir::Down))).unwrap();
        assert_eq!(f, v);
        std::fs::write(dir.join("junk.bin"), [0u8; 5]).unwrap();
        assert!(matches!(
            read_dir(&dir),
            Err(TruthError::Truncated { len: 5, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
