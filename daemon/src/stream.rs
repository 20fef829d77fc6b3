//! The controller's real-time stream: a Unix SOCK_SEQPACKET socket serving fixed-layout
//! records (`linkpulse_common::stream`). The `lp-stream` thread owns the listener and the
//! control side of every client (accept, subscribe, errors, hang-ups); the send side of each
//! subscription (`StreamSender`) lives in the ingest thread, which encodes and sends a frame
//! right after closing its bin — no queue and no second thread's wake-up between the bin's
//! deadline and the client. Subscriptions travel between the two threads through SPSC queues.
//! Sends are non-blocking: a client whose socket buffer is full loses that frame (counted, and
//! told in the next frame's `dropped_before`); nobody else waits for it.
use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use linkpulse_common::{
    stream::{
        as_bytes, fixed_str, read, ErrorMsg, FrameHeader, Hello, LinkDesc, LinkRecord, Subscribe,
        ERR_BAD_REQUEST, ERR_NO_LINKS, ERR_TOO_MANY_CLIENTS, ERR_VERSION, MAGIC_FRAME, MAGIC_HELLO,
        MAGIC_SUBSCRIBE, STREAM_VERSION, VALID_LATE, VALID_OWD, VALID_PROBES, VALID_RTT,
        VALID_TCP_RTT, VALID_TRAFFIC,
    },
    DIRS, MAX_LINKS,
};

use crate::{
    clock,
    config::StreamConfig,
    cpu_latency::{CpuLatency, DEVICE},
    frame::{Frame, OwdBin, RttBin},
    shared::Shared,
};

/// A client must subscribe within this time after connecting.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream socket {path}: {what}: {source} (set [stream] path to a writable place, or enabled = false)")]
    Socket {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("stream socket {0} is in use by a running process (another linkpulse?): stop it or set [stream] path")]
    InUse(PathBuf),
    #[error("stream.group {0:?} does not exist: create it or fix [stream] group")]
    NoGroup(String),
}

/// Per-client state of the control side.
struct Client {
    fd: OwnedFd,
    since: Instant,
    /// Set once subscribed: the id its send side has in the ingest thread.
    id: Option<u64>,
}

/// A subscription handed to the ingest thread: its own descriptor of the client socket (a
/// `dup`, so the control side can read and close independently) and the aggregate state.
struct Attached {
    id: u64,
    fd: OwnedFd,
    sub: Sub,
}

/// An active subscription: which links, the decimation and its aggregate in progress.
struct Sub {
    mask: u64,
    decimation: u64,
    /// Daemon seq the aggregate in progress expects next (None = waiting for an aligned start).
    expect: Option<u64>,
    count: u64,
    header: FrameHeader,
    valid: u64,
    late: u64,
    /// Links probed in every bin of the aggregate.
    probed: u64,
    links: [LinkRecord; MAX_LINKS],
    /// Probe figures of the aggregate (min/max merge needs the empty state `RttBin` has).
    rtt: [RttBin; MAX_LINKS],
    /// One-way delays of the aggregate's synced probe samples.
    owd: [OwdBin; MAX_LINKS],
    /// Links whose passive TCP RTT was measured in every bin of the aggregate, and its figures.
    tcp: u64,
    tcp_rtt: [RttBin; MAX_LINKS],
    dropped: u64,
    buf: Vec<u8>,
}

pub struct StreamServer {
    listener: OwnedFd,
    path: PathBuf,
    /// New subscriptions to the ingest thread.
    attach: rtrb::Producer<Attached>,
    /// Ids of subscribed clients that hung up or were closed here.
    detach: rtrb::Producer<u64>,
    /// Send sides the ingest thread gives back, dropped here (freeing is not its job).
    retired: rtrb::Consumer<Attached>,
    shared: Arc<Shared>,
    max_clients: usize,
    width: u64,
    /// `[stream] client_buffer_ms`: how much of its frames a client's socket holds.
    buffer_ms: u32,
    next_id: u64,
}

/// The send side of every subscription, owned and driven by the ingest thread: per frame,
/// no allocation and no lock (slots are preallocated, buffers reserved at subscribe time).
pub struct StreamSender {
    slots: Vec<Option<Attached>>,
    active: usize,
    attach: rtrb::Consumer<Attached>,
    detach: rtrb::Consumer<u64>,
    retire: rtrb::Producer<Attached>,
    shared: Arc<Shared>,
    /// Held while any client is subscribed; None when off or the device could not be opened.
    wakeup: Option<CpuLatency>,
}

/// Counters of the stream (in Shared for /metrics).
#[derive(Default)]
pub struct StreamCounters {
    pub clients: AtomicU64,
    pub connections: AtomicU64,
    pub frames_sent: AtomicU64,
    /// Frames a client lost because its socket buffer was full (it sees the gap).
    pub frames_dropped: AtomicU64,
    pub bad_requests: AtomicU64,
    /// 1 while the CPU wake-up latency request is held (`crate::cpu_latency`).
    pub wakeup_latency_held: AtomicU64,
}

fn sock_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> StreamError + 'a {
    move |source| StreamError::Socket {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// sockaddr_un for `path`.
pub fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::other(format!(
            "path is {} bytes, at most {} fit in a Unix socket address",
            bytes.len(),
            addr.sun_path.len() - 1
        )));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

impl StreamServer {
    /// Binds the socket (removing a stale one), sets its mode and group, and returns the server
    /// (for the `lp-stream` thread) and the send side (for the ingest thread).
    pub fn bind(
        cfg: &StreamConfig,
        shared: Arc<Shared>,
        width: u64,
    ) -> Result<(StreamServer, StreamSender), StreamError> {
        let path = cfg.path.clone();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(sock_err(&path, "creating its directory"))?;
        }
        let (addr, len) = unix_addr(&path).map_err(sock_err(&path, "address"))?;
        if path.exists() {
            // A socket file left by a crash: remove it, unless someone still listens there.
            let probe = seqpacket().map_err(sock_err(&path, "socket"))?;
            // SAFETY: valid address of `len` bytes.
            let rc = unsafe {
                libc::connect(
                    probe.as_raw_fd(),
                    (&addr as *const libc::sockaddr_un).cast(),
                    len,
                )
            };
            if rc == 0 {
                return Err(StreamError::InUse(path));
            }
            std::fs::remove_file(&path).map_err(sock_err(&path, "removing the stale socket"))?;
        }
        let listener = seqpacket().map_err(sock_err(&path, "socket"))?;
        // SAFETY: valid address of `len` bytes.
        if unsafe {
            libc::bind(
                listener.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        } < 0
        {
            return Err(sock_err(&path, "bind")(io::Error::last_os_error()));
        }
        // SAFETY: a bound socket.
        if unsafe { libc::listen(listener.as_raw_fd(), 64) } < 0 {
            return Err(sock_err(&path, "listen")(io::Error::last_os_error()));
        }
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| sock_err(&path, "path")(io::Error::other("NUL in path")))?;
        let gid = match &cfg.group {
            Some(g) => Some(
                nix::unistd::Group::from_name(g)
                    .ok()
                    .flatten()
                    .ok_or_else(|| StreamError::NoGroup(g.clone()))?
                    .gid
                    .as_raw(),
            ),
            None => None,
        };
        // SAFETY: valid C path; mode and ids are plain integers.
        unsafe {
            if let Some(gid) = gid {
                if libc::chown(cpath.as_ptr(), u32::MAX, gid) < 0 {
                    return Err(sock_err(&path, "chown to the group")(
                        io::Error::last_os_error(),
                    ));
                }
            }
            if libc::chmod(cpath.as_ptr(), cfg.mode) < 0 {
                return Err(sock_err(&path, "chmod")(io::Error::last_os_error()));
            }
        }
        // Each queue holds every client there can be, so a push only fails on a bug.
        let cap = cfg.max_clients.max(1) * 2;
        let (attach_tx, attach_rx) = rtrb::RingBuffer::new(cap);
        let (detach_tx, detach_rx) = rtrb::RingBuffer::new(cap);
        let (retire_tx, retire_rx) = rtrb::RingBuffer::new(cap);
        tracing::info!(path = %path.display(), mode = format!("{:o}", cfg.mode), "stream socket ready");
        // Opened here, where failing costs nothing but latency: the stream works without it.
        let wakeup = cfg.cpu_wakeup_latency_us.and_then(|us| {
            match CpuLatency::open(Path::new(DEVICE), us) {
                Ok(w) => {
                    tracing::info!(
                        limit_us = us,
                        "idle CPUs are held to this wake-up latency while stream clients are subscribed"
                    );
                    Some(w)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stream frames will wait for CPUs waking from idle");
                    None
                }
            }
        });
        Ok((
            StreamServer {
                listener,
                path,
                attach: attach_tx,
                detach: detach_tx,
                retired: retire_rx,
                shared: Arc::clone(&shared),
                max_clients: cfg.max_clients,
                buffer_ms: cfg.client_buffer_ms,
                width,
                next_id: 1,
            },
            StreamSender {
                slots: (0..cfg.max_clients.max(1)).map(|_| None).collect(),
                active: 0,
                attach: attach_rx,
                detach: detach_rx,
                retire: retire_tx,
                shared,
                wakeup,
            },
        ))
    }

    /// Serves until `stop`; removes the socket file on the way out.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut clients: HashMap<RawFd, Client> = HashMap::new();
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(self.max_clients + 1);
        let mut gone: Vec<u64> = Vec::new();
        let mut msg = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            pfds.clear();
            pfds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for fd in clients.keys() {
                pfds.push(libc::pollfd {
                    fd: *fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: valid array of pollfd.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
            if n < 0 {
                continue; // EINTR
            }
            if pfds[0].revents & libc::POLLIN != 0 {
                self.accept(&mut clients);
            }
            for p in pfds.iter().skip(1) {
                if p.revents == 0 {
                    continue;
                }
                let keep = match clients.get_mut(&p.fd) {
                    Some(c) => self.on_readable(c, &mut msg, p.revents),
                    None => true,
                };
                if !keep {
                    if let Some(id) = clients.remove(&p.fd).and_then(|c| c.id) {
                        gone.push(id);
                    }
                }
            }
            // Clients that never subscribed.
            clients.retain(|_, c| c.id.is_some() || c.since.elapsed() < SUBSCRIBE_TIMEOUT);
            // The ingest thread stops sending to clients that are gone (their dup keeps the
            // socket open until then).
            gone.retain(|id| self.detach.push(*id).is_err());
            while let Ok(a) = self.retired.pop() {
                drop(a);
            }
            let active = clients.values().filter(|c| c.id.is_some()).count();
            self.shared
                .stream
                .clients
                .store(active as u64, Ordering::Relaxed);
        }
        let _ = std::fs::remove_file(&self.path);
    }

    fn accept(&mut self, clients: &mut HashMap<RawFd, Client>) {
        loop {
            // SAFETY: accept on our listener; no address wanted.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                return;
            }
            // SAFETY: a fresh fd we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            self.shared
                .stream
                .connections
                .fetch_add(1, Ordering::Relaxed);
            if clients.len() >= self.max_clients {
                send_error(
                    &fd,
                    ERR_TOO_MANY_CLIENTS,
                    &format!(
                        "{} clients already: raise [stream] max_clients",
                        clients.len()
                    ),
                );
                continue;
            }
            clients.insert(
                fd.as_raw_fd(),
                Client {
                    fd,
                    since: Instant::now(),
                    id: None,
                },
            );
        }
    }

    /// Returns false when the client must be dropped.
    fn on_readable(&mut self, c: &mut Client, msg: &mut [u8], revents: libc::c_short) -> bool {
        // SAFETY: receiving into a valid buffer.
        let n = unsafe {
            libc::recv(
                c.fd.as_raw_fd(),
                msg.as_mut_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n == 0 || (n < 0 && revents & (libc::POLLHUP | libc::POLLERR) != 0) {
            return false; // closed
        }
        if n < 0 {
            return true;
        }
        if c.id.is_some() {
            self.shared
                .stream
                .bad_requests
                .fetch_add(1, Ordering::Relaxed);
            send_error(
                &c.fd,
                ERR_BAD_REQUEST,
                "already subscribed: connect again to change the subscription",
            );
            return false;
        }
        match self.subscribe(&msg[..n as usize]) {
            Ok((sub, hello)) => {
                let frame_len = std::mem::size_of::<FrameHeader>()
                    + sub.mask.count_ones() as usize * std::mem::size_of::<LinkRecord>();
                let frame_ns = self.width.saturating_mul(sub.decimation);
                match size_send_buffer(&c.fd, frame_len, frame_ns, self.buffer_ms) {
                    Ok((bytes, want)) if bytes >= want => {
                        tracing::debug!(bytes, frame_len, frame_ns, "stream client buffer sized")
                    }
                    Ok((bytes, want)) => tracing::warn!(
                        bytes,
                        want,
                        "stream client's socket buffer is smaller than [stream] client_buffer_ms \
                         asks (SO_SNDBUFFORCE needs CAP_NET_ADMIN; SO_SNDBUF is capped by \
                         net.core.wmem_max): it may lose frames when held off its CPU"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "stream client keeps the default socket buffer: it may lose frames when held off its CPU for a few ms")
                    }
                }
                if send(&c.fd, &hello).is_err() {
                    return false;
                }
                let fd = match c.fd.try_clone() {
                    Ok(fd) => fd,
                    Err(e) => {
                        tracing::warn!(error = %e, "stream client dropped: cannot dup its socket");
                        return false;
                    }
                };
                let id = self.next_id;
                self.next_id += 1;
                if self.attach.push(Attached { id, fd, sub }).is_err() {
                    // Cannot happen: the queue holds twice max_clients.
                    send_error(
                        &c.fd,
                        ERR_TOO_MANY_CLIENTS,
                        "subscription queue full: try again",
                    );
                    return false;
                }
                c.id = Some(id);
                true
            }
            Err((code, text)) => {
                self.shared
                    .stream
                    .bad_requests
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(code, reason = %text, "stream client refused");
                send_error(&c.fd, code, &text);
                false
            }
        }
    }

    fn subscribe(&self, b: &[u8]) -> Result<(Sub, Vec<u8>), (u32, String)> {
        let req: Subscribe = read(b)
            .filter(|_| b.len() == std::mem::size_of::<Subscribe>())
            .ok_or_else(|| {
                (
                    ERR_BAD_REQUEST,
                    format!(
                        "expected a {}-byte Subscribe record, got {} bytes",
                        std::mem::size_of::<Subscribe>(),
                        b.len()
                    ),
                )
            })?;
        if req.magic != MAGIC_SUBSCRIBE {
            return Err((
                ERR_BAD_REQUEST,
                format!("bad magic {:#010x}: expected \"LPS1\"", req.magic),
            ));
        }
        if req.version != STREAM_VERSION {
            return Err((
                ERR_VERSION,
                format!(
                    "layout version {} is not served: this daemon speaks {STREAM_VERSION}",
                    req.version
                ),
            ));
        }
        if req.decimation == 0 || req.decimation > 1_000_000 {
            return Err((
                ERR_BAD_REQUEST,
                format!("decimation {} out of range 1..=1000000", req.decimation),
            ));
        }
        let links = self.shared.links();
        let configured: u64 = links.iter().fold(0, |m, l| m | (1 << l.index));
        let mask = if req.link_mask == 0 {
            configured
        } else {
            req.link_mask & configured
        };
        if mask == 0 {
            return Err((
                ERR_NO_LINKS,
                format!(
                    "none of the links in mask {:#x} is configured (configured: {configured:#x})",
                    req.link_mask
                ),
            ));
        }
        let n = mask.count_ones() as usize;
        let hello = Hello {
            magic: MAGIC_HELLO,
            version: STREAM_VERSION,
            _pad0: 0,
            bin_width_ns: self.width,
            decimation: req.decimation,
            link_count: n as u32,
            link_mask: mask,
            header_size: std::mem::size_of::<FrameHeader>() as u32,
            record_size: std::mem::size_of::<LinkRecord>() as u32,
        };
        let mut out = as_bytes(&hello).to_vec();
        for l in links.iter().filter(|l| mask & (1 << l.index) != 0) {
            let d = LinkDesc {
                index: l.index as u32,
                _pad0: 0,
                interface: fixed_str(&l.config.interface),
                label: fixed_str(&l.config.label),
            };
            out.extend_from_slice(as_bytes(&d));
        }
        Ok((Sub::new(mask, req.decimation as u64, n), out))
    }
}

impl StreamSender {
    /// Some client is subscribed: the ingest thread then wakes at every bin's deadline.
    pub fn is_active(&self) -> bool {
        self.active > 0
    }

    /// Takes new subscriptions and lets go of closed ones (once per tick; no allocation).
    pub fn poll_control(&mut self) {
        while let Ok(id) = self.detach.pop() {
            if let Some(i) = self
                .slots
                .iter()
                .position(|s| s.as_ref().is_some_and(|a| a.id == id))
            {
                self.retire_slot(i);
            }
        }
        while !self.attach.is_empty() {
            let Some(free) = self.slots.iter().position(Option::is_none) else {
                break; // the control side admits at most max_clients
            };
            if let Ok(a) = self.attach.pop() {
                self.slots[free] = Some(a);
                self.active += 1;
            }
        }
        if let Some(w) = &mut self.wakeup {
            // A write only when the first client comes or the last goes. A failed write (not
            // seen in practice) leaves the gauge telling the truth and is tried again next tick.
            if let Ok(true) = w.set(self.active > 0) {
                self.shared
                    .stream
                    .wakeup_latency_held
                    .store(u64::from(w.held()), Ordering::Relaxed);
            }
        }
    }

    fn retire_slot(&mut self, i: usize) {
        if let Some(a) = self.slots[i].take() {
            self.active -= 1;
            // Freed on the control thread; if its queue were full, drop here (rare, harmless).
            let _ = self.retire.push(a);
        }
    }

    /// Adds a frame to every subscription and sends the aggregates that are complete.
    #[inline]
    pub fn on_frame(&mut self, f: &Frame) {
        if self.active == 0 {
            return;
        }
        for i in 0..self.slots.len() {
            let Some(a) = self.slots[i].as_mut() else {
                continue;
            };
            if !a.sub.push(f) {
                continue;
            }
            a.sub.encode();
            match send_bytes(&a.fd, &a.sub.buf) {
                Ok(()) => {
                    a.sub.dropped = 0;
                    self.shared
                        .stream
                        .frames_sent
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    a.sub.dropped += 1;
                    self.shared
                        .stream
                        .frames_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
                // Gone (EPIPE, ECONNRESET): the control side sees the hang-up too.
                Err(_) => self.retire_slot(i),
            }
        }
    }
}

impl Sub {
    /// An empty subscription to the links of `mask` (`links` of them), every `decimation` bins;
    /// its send buffer is sized here, once.
    fn new(mask: u64, decimation: u64, links: usize) -> Sub {
        Sub {
            mask,
            decimation,
            expect: None,
            count: 0,
            header: FrameHeader::default(),
            valid: 0,
            late: 0,
            probed: 0,
            links: [LinkRecord::default(); MAX_LINKS],
            rtt: [RttBin::default(); MAX_LINKS],
            owd: [OwdBin::default(); MAX_LINKS],
            tcp: 0,
            tcp_rtt: [RttBin::default(); MAX_LINKS],
            dropped: 0,
            buf: Vec::with_capacity(
                std::mem::size_of::<FrameHeader>() + links * std::mem::size_of::<LinkRecord>(),
            ),
        }
    }

    /// Adds a frame to the aggregate; true when an aggregate is complete.
    fn push(&mut self, f: &Frame) -> bool {
        let idx = f.bin_start_tai_ns / f.width_ns.max(1);
        if self.expect != Some(f.seq) {
            // Start (or restart after a gap in the daemon's sequence) on an aligned bin.
            if !idx.is_multiple_of(self.decimation) {
                self.expect = None;
                return false;
            }
            self.count = 0;
        }
        if self.count == 0 {
            self.header = FrameHeader {
                magic: MAGIC_FRAME,
                version: STREAM_VERSION,
                seq: f.seq,
                bin_start_utc_ns: f.bin_start_utc_ns,
                bin_start_tai_ns: f.bin_start_tai_ns,
                width_ns: f.width_ns * self.decimation,
                ..FrameHeader::default()
            };
            self.valid = u64::MAX;
            self.late = 0;
            self.probed = u64::MAX;
            for l in self.links.iter_mut() {
                *l = LinkRecord::default();
            }
            for r in self.rtt.iter_mut() {
                *r = RttBin::default();
            }
            for o in self.owd.iter_mut() {
                *o = OwdBin::default();
            }
            self.tcp = u64::MAX;
            for r in self.tcp_rtt.iter_mut() {
                *r = RttBin::default();
            }
        }
        self.header.flags |= f.flags;
        self.valid &= f.valid_mask;
        // A record's VALID_LATE covers traffic and probe figures alike.
        self.late |= f.late_mask | f.rtt_late_mask;
        self.probed &= f.probed_mask;
        self.tcp &= f.tcp_rtt_mask;
        for (i, rec) in self.links.iter_mut().enumerate() {
            if self.mask & (1 << i) == 0 {
                continue;
            }
            for d in 0..DIRS {
                rec.packets[d] += f.links[i].packets[d];
                rec.bytes[d] += f.links[i].bytes[d];
            }
            self.rtt[i].merge(&f.rtt[i]);
            self.owd[i].merge(&f.owd[i]);
            self.tcp_rtt[i].merge(&f.tcp_rtt[i]);
        }
        self.count += 1;
        self.expect = Some(f.seq + 1);
        if self.count == self.decimation {
            self.count = 0;
            true
        } else {
            false
        }
    }

    /// Writes header and records of the completed aggregate into `buf` (no allocation: the
    /// capacity was reserved at subscribe time).
    fn encode(&mut self) {
        self.buf.clear();
        self.header.dropped_before = self.dropped;
        self.header.link_count = self.mask.count_ones();
        self.header.sent_tai_ns = clock::tai_ns();
        self.buf.extend_from_slice(as_bytes(&self.header));
        for (i, rec) in self.links.iter_mut().enumerate() {
            if self.mask & (1 << i) == 0 {
                continue;
            }
            rec.index = i as u32;
            rec.valid = 0;
            if self.valid & (1 << i) != 0 {
                rec.valid |= VALID_TRAFFIC;
            }
            if self.late & (1 << i) != 0 {
                rec.valid |= VALID_LATE;
            }
            let r = &self.rtt[i];
            if self.probed & (1 << i) != 0 {
                rec.valid |= VALID_RTT | VALID_PROBES;
                rec.rtt_count = r.rtt_count;
                rec.probes_sent = r.probes_sent;
                rec.rtt_sum_ns = r.rtt_sum_ns;
                (rec.rtt_min_ns, rec.rtt_max_ns) = r.min_max();
                let o = &self.owd[i];
                if !o.is_empty() {
                    rec.valid |= VALID_OWD;
                    rec.owd_count = o.count;
                    rec.owd_up_min_ns = o.up_min_ns;
                    rec.owd_up_max_ns = o.up_max_ns;
                    rec.owd_up_sum_ns = o.up_sum_ns;
                    rec.owd_down_min_ns = o.down_min_ns;
                    rec.owd_down_max_ns = o.down_max_ns;
                    rec.owd_down_sum_ns = o.down_sum_ns;
                    rec.owd_error_max_ns = o.error_max_ns;
                }
            }
            let t = &self.tcp_rtt[i];
            if self.tcp & (1 << i) != 0 {
                rec.valid |= VALID_TCP_RTT;
                rec.tcp_rtt_count = t.rtt_count;
                rec.tcp_rtt_sum_ns = t.rtt_sum_ns;
                (rec.tcp_rtt_min_ns, rec.tcp_rtt_max_ns) = t.min_max();
            }
            self.buf.extend_from_slice(as_bytes(rec));
        }
    }
}

/// Kernel memory a queued frame of `len` bytes takes in a Unix socket (`skb->truesize`): the
/// data in its kmalloc size class with the skb_shared_info after it, and the sk_buff.
fn frame_truesize(len: usize) -> usize {
    (len + 320).next_power_of_two() + 256
}

/// Most a client's socket may hold, whatever the subscription.
const MAX_CLIENT_BUFFER: usize = 64 << 20;

/// Sizes a client's send buffer (the Unix socket's queue towards it) to hold `buffer_ms` of its
/// frames, so a client held off its CPU that long (softirq work, a busier real-time thread)
/// loses nothing; never below the system's default. Returns the buffer the kernel set and the
/// one wanted.
fn size_send_buffer(
    fd: &OwnedFd,
    frame_len: usize,
    frame_ns: u64,
    buffer_ms: u32,
) -> io::Result<(usize, usize)> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let frames = (u64::from(buffer_ms) * 1_000_000)
        .div_ceil(frame_ns.max(1))
        .max(2);
    let want = (frames as usize)
        .saturating_mul(frame_truesize(frame_len))
        .min(MAX_CLIENT_BUFFER);
    let have = getsockopt(fd, sockopt::SndBuf)?;
    if want <= have {
        return Ok((have, want));
    }
    // The kernel doubles the value given (its own bookkeeping), and caps SO_SNDBUF at
    // net.core.wmem_max; SO_SNDBUFFORCE passes the cap with CAP_NET_ADMIN, which the daemon has.
    if setsockopt(fd, sockopt::SndBufForce, &(want / 2)).is_err() {
        setsockopt(fd, sockopt::SndBuf, &(want / 2))?;
    }
    Ok((getsockopt(fd, sockopt::SndBuf)?, want))
}

fn send_bytes(fd: &OwnedFd, b: &[u8]) -> io::Result<()> {
    // SAFETY: sending a valid buffer; MSG_NOSIGNAL: a vanished client must not kill us.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            b.as_ptr().cast(),
            b.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn send(fd: &OwnedFd, b: &[u8]) -> io::Result<()> {
    send_bytes(fd, b)
}

fn send_error(fd: &OwnedFd, code: u32, text: &str) {
    let _ = send_bytes(fd, as_bytes(&ErrorMsg::new(code, text)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(mask: u64, decimation: u64) -> Sub {
        Sub::new(mask, decimation, mask.count_ones() as usize)
    }

    fn frame(seq: u64, samples: &[u64], sent: u32) -> Frame {
        let mut f = Frame {
            bin_start_tai_ns: 1_000 * seq,
            width_ns: 1_000,
            seq,
            valid_mask: 0b11,
            probed_mask: 0b10,
            ..Frame::default()
        };
        for &r in samples {
            f.rtt[1].add_sample(r);
        }
        f.rtt[1].probes_sent = sent;
        f
    }

    fn records(s: &Sub) -> Vec<LinkRecord> {
        s.buf[std::mem::size_of::<FrameHeader>()..]
            .chunks_exact(std::mem::size_of::<LinkRecord>())
            .filter_map(read::<LinkRecord>)
            .collect()
    }

    #[test]
    fn a_client_socket_sized_for_20_ms_queues_20_ms_of_frames() {
        // SO_SNDBUFFORCE needs CAP_NET_ADMIN (the daemon has it; the suite runs as root).
        // SAFETY: plain call.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for SO_SNDBUFFORCE");
            return;
        }
        let mut fds = [0; 2];
        // SAFETY: valid array of two ints.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair");
        // SAFETY: fresh fds we own.
        let (a, _b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // 16 links every 100 µs bin: 200 frames in 20 ms, far beyond the 208 KiB default.
        let len = std::mem::size_of::<FrameHeader>() + 16 * std::mem::size_of::<LinkRecord>();
        let (bytes, want) = size_send_buffer(&a, len, 100_000, 20).expect("sized");
        assert!(
            bytes >= want && want >= 200 * len,
            "{bytes} of {want} bytes"
        );
        let frame = vec![0u8; len];
        for i in 0..200 {
            send_bytes(&a, &frame).unwrap_or_else(|e| panic!("frame {i} of 200 not queued: {e}"));
        }
        // A decimated subscription's frames are rarer: the default suffices, kept as it is.
        let (c, _d) = {
            let mut fds = [0; 2];
            // SAFETY: as above.
            unsafe {
                libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr());
                (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
            }
        };
        let (default, _) = size_send_buffer(&c, len, 100_000_000, 20).expect("default");
        assert!(default < bytes);
    }

    #[test]
    fn decimation_aggregates_one_way_delays_only_from_synced_probes() {
        let ow = |up, down, error_ns| crate::probe::oneway::OneWay {
            up_ns: up,
            down_ns: down,
            error_ns,
        };
        let mut s = sub(0b11, 2);
        let mut a = frame(0, &[45_000, 44_000], 1);
        a.owd[1].add(&ow(20_000, 24_000, 700));
        let b = frame(1, &[50_000], 1);
        let mut c = frame(2, &[40_000], 1);
        c.owd[1].add(&ow(-1_000, 41_000, 300));
        let d = frame(3, &[40_000], 1);
        assert!(!s.push(&a));
        assert!(s.push(&b));
        s.encode();
        let r = records(&s);
        assert_eq!(r[1].rtt_count, 3);
        assert_eq!(
            r[1].owd(),
            Some(linkpulse_common::stream::OneWayDelays {
                count: 1,
                up_min_ns: 20_000,
                up_max_ns: 20_000,
                up_mean_ns: 20_000,
                down_min_ns: 24_000,
                down_max_ns: 24_000,
                down_mean_ns: 24_000,
                error_max_ns: 700,
            })
        );
        assert_eq!(r[1].valid & VALID_OWD, VALID_OWD);
        assert_eq!((r[0].valid & VALID_OWD, r[0].owd()), (0, None));
        // The next aggregate starts empty: only c's delays, a negative one kept as it is.
        assert!(!s.push(&c));
        assert!(s.push(&d));
        s.encode();
        let r = records(&s);
        let o = r[1].owd().expect("c was synced");
        assert_eq!(
            (o.count, o.up_min_ns, o.down_max_ns, o.error_max_ns),
            (1, -1_000, 41_000, 300)
        );
        // No synced probe at all: the fields stay 0 and unmarked.
        assert!(!s.push(&frame(4, &[1], 1)));
        assert!(s.push(&frame(5, &[1], 1)));
        s.encode();
        let r = records(&s);
        assert_eq!(
            (r[1].valid & VALID_OWD, r[1].owd_count, r[1].owd_up_sum_ns),
            (0, 0, 0)
        );
    }

    #[test]
    fn decimation_aggregates_tcp_rtt_and_marks_it_measured() {
        let mut s = sub(0b11, 2);
        let mut a = frame(0, &[], 0);
        a.tcp_rtt_mask = 0b11;
        a.tcp_rtt[0].add_sample(7_000);
        a.tcp_rtt[0].add_sample(3_000);
        let mut b = frame(1, &[], 0);
        // Link 1's passive RTT was not measured in bin 1 (e.g. detached).
        b.tcp_rtt_mask = 0b01;
        b.tcp_rtt[0].add_sample(9_000);
        assert!(!s.push(&a));
        assert!(s.push(&b));
        s.encode();
        let r = records(&s);
        assert_eq!(r[0].tcp_rtt(), Some((3, 3_000, 9_000, 19_000 / 3)));
        assert_eq!(r[0].valid & VALID_TCP_RTT, VALID_TCP_RTT);
        assert!(!r[1].has_tcp_rtt());
        assert_eq!((r[1].tcp_rtt_count, r[1].tcp_rtt()), (0, None));
        // Measured, no sample: count 0, min/max 0.
        let mut s = sub(0b01, 1);
        let mut c = frame(2, &[], 0);
        c.tcp_rtt_mask = 0b01;
        assert!(s.push(&c));
        s.encode();
        let r = records(&s);
        assert!(r[0].has_tcp_rtt());
        assert_eq!(
            (r[0].tcp_rtt_count, r[0].tcp_rtt_min_ns, r[0].tcp_rtt()),
            (0, 0, None)
        );
    }

    #[test]
    fn decimation_aggregates_probe_figures_exactly() {
        let mut s = sub(0b11, 4);
        let bins = [
            frame(0, &[500, 200], 2),
            frame(1, &[], 1),
            frame(2, &[900], 0),
            frame(3, &[], 1),
        ];
        let done: Vec<bool> = bins.iter().map(|f| s.push(f)).collect();
        assert_eq!(done, [false, false, false, true]);
        s.encode();
        let r = records(&s);
        assert_eq!(r.len(), 2);
        // Link 0 is not probed: no RTT fields.
        assert_eq!(r[0].valid & (VALID_RTT | VALID_PROBES), 0);
        assert_eq!(r[0].rtt_count, 0);
        assert_eq!(
            r[1].valid & (VALID_RTT | VALID_PROBES),
            VALID_RTT | VALID_PROBES
        );
        assert_eq!(r[1].rtt_count, 3);
        assert_eq!(r[1].probes_sent, 4);
        assert_eq!(r[1].rtt_min_ns, 200);
        assert_eq!(r[1].rtt_max_ns, 900);
        assert_eq!(r[1].rtt_sum_ns, 1_600);
        assert_eq!(r[1].rtt_mean(), Some(533));
        // The next aggregate starts clean: probed, no reply = count 0, min/max 0.
        for seq in 4..8 {
            s.push(&frame(seq, &[], 0));
        }
        s.encode();
        let r = records(&s);
        assert!(r[1].has_rtt() && r[1].has_probes());
        assert_eq!(
            (
                r[1].rtt_count,
                r[1].probes_sent,
                r[1].rtt_min_ns,
                r[1].rtt_max_ns
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(r[1].rtt_min(), None);
        assert_eq!(r[1].rtt_mean(), None);
    }
}
