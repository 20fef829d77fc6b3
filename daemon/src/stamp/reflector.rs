//! The STAMP Session-Reflector (RFC 8762 §4.3, stateful, unauthenticated).
//!
//! One thread, one UDP socket (IPv4, IPv6 or dual-stack). Per datagram:
//! 1. `recvmsg` with the kernel's software RX timestamp (SO_TIMESTAMPING → T2), the TTL or
//!    hop limit the sender's packet arrived with, and the local address it was sent to.
//! 2. [`Engine::handle`]: size checks, loop guard, per-source token bucket, the session of
//!    (source address, port, SSID) with its own reflector sequence number — a gap in it seen
//!    by the sender is downstream loss, a gap in the sender's own sequence is upstream loss —
//!    and the reply encoded at the request's length, so it never amplifies.
//! 3. T3 is read as the very last step before `sendmsg` and patched into the reply. A
//!    kernel TX timestamp would be later still, but unauthenticated STAMP has no way to send
//!    it after the fact without a second packet, so the gap between this read and the wire
//!    (a syscall and the stack, a few µs on a quiet host) stays in the reflector's residence
//!    time T3 − T2 and, like every reflector's, out of the RTT the sender computes.
//!
//! Replies leave from the address the request was sent to (IP_PKTINFO / IPV6_PKTINFO), so a
//! multi-homed server answers through NAT correctly.
use std::{
    io,
    mem::{size_of, MaybeUninit},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::{Domain, SockAddr, Socket, Type};

use super::{
    lru::{Lru, Slot},
    wire::{ErrorEstimate, ReflectorFields, SenderPacket, Timestamp, TimestampFormat, SENDER_LEN},
};
use crate::clock;

/// The IANA port of STAMP (RFC 8762 §4.1). Below 1024: binding needs CAP_NET_BIND_SERVICE.
pub const DEFAULT_PORT: u16 = 862;

/// Which timestamp format the reflector writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatChoice {
    /// The format of each request (its Z flag): the sender reads the reply in its own format.
    #[default]
    Auto,
    Ntp,
    Ptp,
}

impl FromStr for FormatChoice {
    type Err = ReflectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(FormatChoice::Auto),
            "ntp" => Ok(FormatChoice::Ntp),
            "ptp" => Ok(FormatChoice::Ptp),
            _ => Err(ReflectorError::Config(format!(
                "timestamp format `{s}` is unknown; use auto (follow each request's Z flag), \
                 ntp or ptp"
            ))),
        }
    }
}

/// Parses `ADDR` or `ADDR:PORT` (IPv6 as `[ADDR]:PORT`); without a port, 862.
pub fn parse_listen(s: &str) -> Result<SocketAddr, ReflectorError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
        .map_err(|_| {
            ReflectorError::Config(format!(
                "listen address `{s}` is not ADDR or ADDR:PORT; write e.g. 0.0.0.0, [::]:862 or \
                 192.0.2.1:8620"
            ))
        })
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReflectorConfig {
    /// `[::]` listens on IPv6 and IPv4 (dual-stack, whatever net.ipv6.bindv6only says).
    pub listen: SocketAddr,
    /// Sessions kept at most; the least recently used one is recycled beyond that.
    pub max_sessions: usize,
    /// Replies per second per source IP address (all its ports and SSIDs together).
    pub rate_per_source: f64,
    /// Replies a source may send in a burst above its rate.
    pub burst: u32,
    pub format: FormatChoice,
    /// Largest request reflected (padding included); larger ones are counted and dropped.
    pub max_len: usize,
}

impl Default for ReflectorConfig {
    fn default() -> Self {
        ReflectorConfig {
            listen: SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), DEFAULT_PORT),
            max_sessions: 4096,
            // 16 links of one router at the 10 kHz maximum probe rate, plus headroom.
            rate_per_source: 200_000.0,
            burst: 20_000,
            format: FormatChoice::Auto,
            // A full 1500-byte IPv4 MTU minus IP and UDP headers.
            max_len: 1472,
        }
    }
}

impl ReflectorConfig {
    pub fn validate(&self) -> Result<(), ReflectorError> {
        if self.max_sessions == 0 {
            return Err(ReflectorError::Config(
                "max_sessions is 0: no sender could ever be answered; use at least 1 (default \
                 4096)"
                    .into(),
            ));
        }
        if !(self.rate_per_source.is_finite() && self.rate_per_source > 0.0) || self.burst == 0 {
            return Err(ReflectorError::Config(format!(
                "rate limit {} /s with burst {} blocks every sender; use a rate > 0 and a burst \
                 >= 1",
                self.rate_per_source, self.burst
            )));
        }
        if !(SENDER_LEN..=65_507).contains(&self.max_len) {
            return Err(ReflectorError::Config(format!(
                "max_len {} is outside {SENDER_LEN}..=65507: STAMP packets have a 44-byte base \
                 and a UDP payload ends at 65507",
                self.max_len
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReflectorError {
    #[error("invalid STAMP reflector configuration: {0}")]
    Config(String),
    #[error(
        "cannot bind the STAMP reflector to {addr}: {source}. Ports below 1024 (STAMP's is 862) \
         need CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE) or a \
         --listen port >= 1024; `address in use` means another reflector already has it"
    )]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(
        "setting {what} on the reflector socket failed: {source}. The kernel must support it \
         (Linux >= 4.x for all options used); check seccomp or container restrictions"
    )]
    SocketOption {
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "receiving on the reflector socket keeps failing ({source}); the socket is unusable, \
         restart the reflector"
    )]
    Recv { source: io::Error },
    #[error("starting the reflector thread failed: {0}; the process is out of threads or memory")]
    Spawn(io::Error),
    #[error("the reflector thread panicked; this is a bug, please report it with the logs")]
    Panicked,
}

/// Counters of the reflector, written by its thread, read by anyone (later `/metrics`).
#[derive(Debug, Default)]
pub struct ReflectorCounters {
    pub received: AtomicU64,
    pub reflected: AtomicU64,
    /// Shorter than the 44-byte base.
    pub truncated: AtomicU64,
    /// Longer than `max_len`.
    pub oversized: AtomicU64,
    pub rate_limited: AtomicU64,
    /// From our own port: another reflector (or a spoofed request) would loop with us.
    pub loop_guard: AtomicU64,
    /// Reflected, but with non-zero MBZ octets (tolerated per RFC 8762).
    pub mbz_nonzero: AtomicU64,
    /// Reflected, but the sender's Error Estimate has the forbidden zero multiplier.
    pub bad_error_estimate: AtomicU64,
    pub sessions_created: AtomicU64,
    pub sessions_evicted: AtomicU64,
    pub sessions_active: AtomicU64,
    pub sources_evicted: AtomicU64,
    /// No kernel RX timestamp came with the datagram; T2 was read in user space instead.
    pub rx_timestamp_fallback: AtomicU64,
    pub send_errors: AtomicU64,
    pub recv_errors: AtomicU64,
}

/// A plain copy of [`ReflectorCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CountersSnapshot {
    pub received: u64,
    pub reflected: u64,
    pub truncated: u64,
    pub oversized: u64,
    pub rate_limited: u64,
    pub loop_guard: u64,
    pub mbz_nonzero: u64,
    pub bad_error_estimate: u64,
    pub sessions_created: u64,
    pub sessions_evicted: u64,
    pub sessions_active: u64,
    pub sources_evicted: u64,
    pub rx_timestamp_fallback: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
}

impl ReflectorCounters {
    pub fn snapshot(&self) -> CountersSnapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        CountersSnapshot {
            received: g(&self.received),
            reflected: g(&self.reflected),
            truncated: g(&self.truncated),
            oversized: g(&self.oversized),
            rate_limited: g(&self.rate_limited),
            loop_guard: g(&self.loop_guard),
            mbz_nonzero: g(&self.mbz_nonzero),
            bad_error_estimate: g(&self.bad_error_estimate),
            sessions_created: g(&self.sessions_created),
            sessions_evicted: g(&self.sessions_evicted),
            sessions_active: g(&self.sessions_active),
            sources_evicted: g(&self.sources_evicted),
            rx_timestamp_fallback: g(&self.rx_timestamp_fallback),
            send_errors: g(&self.send_errors),
            recv_errors: g(&self.recv_errors),
        }
    }
}

#[inline]
fn bump(c: &AtomicU64) {
    // Single writer: a relaxed load + store is enough and cheaper than a locked add.
    c.store(c.load(Relaxed) + 1, Relaxed);
}

/// A session: one sender socket and SSID.
#[derive(Debug, Clone, Copy)]
struct Session {
    /// The next reflector sequence number.
    next_seq: u32,
}

/// Token bucket per source address.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_ns: u64,
}

/// What the socket layer knows about a received datagram.
#[derive(Debug, Clone, Copy)]
pub struct RxMeta {
    pub src: SocketAddr,
    /// The datagram's real length (may exceed the buffer: then it is oversized).
    pub len: usize,
    /// T2 as UTC ns since the UNIX epoch (CLOCK_REALTIME).
    pub rx_utc_ns: u64,
    /// TTL / hop limit the request arrived with; 0 if the kernel did not say.
    pub ttl: u8,
    /// CLOCK_MONOTONIC ns, for the rate limiter.
    pub now_mono_ns: u64,
}

/// The reflector's view of its clock, refreshed from adjtimex about once a second.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClockInfo {
    pub synced: bool,
    pub error_ns: u64,
    /// TAI − UTC, for PTP timestamps (PTP counts TAI).
    pub tai_offset_ns: u64,
}

impl ClockInfo {
    pub fn read() -> ClockInfo {
        match clock::ClockState::read() {
            Ok(s) => ClockInfo {
                synced: s.synced,
                // While unsynchronised only the kernel's maximum error is an honest bound.
                error_ns: (if s.synced {
                    s.est_error_us
                } else {
                    s.max_error_us
                })
                .max(0) as u64
                    * 1_000,
                tai_offset_ns: s.tai_offset_s.max(0) as u64 * clock::NS_PER_S,
            },
            Err(e) => {
                tracing::warn!(error = %e, "adjtimex failed; STAMP replies say unsynchronised");
                ClockInfo::default()
            }
        }
    }

    /// A UTC ns instant in `format`'s time scale and encoding.
    #[inline]
    pub fn timestamp(&self, format: TimestampFormat, utc_ns: u64) -> Timestamp {
        let ns = match format {
            TimestampFormat::Ntp => utc_ns,
            TimestampFormat::Ptp => utc_ns + self.tai_offset_ns,
        };
        Timestamp::from_epoch_ns(format, ns)
    }
}

/// Why a datagram got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Truncated,
    Oversized,
    RateLimited,
    LoopGuard,
}

/// A reply is ready in the output buffer; only T3 is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub len: usize,
    pub format: TimestampFormat,
}

/// The reflector's logic without the socket: sessions, rate limit, encoding.
pub struct Engine {
    cfg: ReflectorConfig,
    own_port: u16,
    sessions: Lru<(SocketAddr, u16), Session>,
    buckets: Lru<IpAddr, Bucket>,
    counters: Arc<ReflectorCounters>,
    pub clock: ClockInfo,
}

impl Engine {
    pub fn new(cfg: ReflectorConfig, own_port: u16, counters: Arc<ReflectorCounters>) -> Self {
        Engine {
            sessions: Lru::new(cfg.max_sessions),
            // As many sources as sessions: each source has at least one session.
            buckets: Lru::new(cfg.max_sessions),
            cfg,
            own_port,
            counters,
            clock: ClockInfo::default(),
        }
    }

    pub fn counters(&self) -> &Arc<ReflectorCounters> {
        &self.counters
    }

    fn admit(&mut self, ip: IpAddr, now: u64) -> bool {
        let (rate, burst) = (self.cfg.rate_per_source, self.cfg.burst as f64);
        let (b, slot) = self.buckets.get_or_insert_with(ip, || Bucket {
            tokens: burst,
            last_ns: now,
        });
        if slot == Slot::Evicted {
            bump(&self.counters.sources_evicted);
        }
        let dt = now.saturating_sub(b.last_ns) as f64 * 1e-9;
        b.tokens = (b.tokens + dt * rate).min(burst);
        b.last_ns = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Handles one request; on success the reply (minus T3) is in `out[..len]`.
    pub fn handle(
        &mut self,
        req: &[u8],
        meta: &RxMeta,
        out: &mut [u8],
    ) -> Result<Reply, DropReason> {
        let c = Arc::clone(&self.counters);
        bump(&c.received);
        if meta.len > self.cfg.max_len || meta.len > req.len() {
            bump(&c.oversized);
            return Err(DropReason::Oversized);
        }
        let pkt = match SenderPacket::parse(req) {
            Ok(p) => p,
            Err(_) => {
                bump(&c.truncated);
                return Err(DropReason::Truncated);
            }
        };
        if meta.src.port() == self.own_port {
            bump(&c.loop_guard);
            return Err(DropReason::LoopGuard);
        }
        if !self.admit(meta.src.ip().to_canonical(), meta.now_mono_ns) {
            bump(&c.rate_limited);
            return Err(DropReason::RateLimited);
        }
        if pkt.mbz_nonzero() {
            bump(&c.mbz_nonzero);
        }
        let sender = pkt.fields();
        if !sender.error_estimate.is_valid() {
            bump(&c.bad_error_estimate);
        }
        let (session, slot) = self
            .sessions
            .get_or_insert_with((meta.src, sender.ssid), || Session { next_seq: 0 });
        let seq = session.next_seq;
        session.next_seq = seq.wrapping_add(1);
        match slot {
            Slot::Hit => {}
            Slot::Inserted => {
                bump(&c.sessions_created);
                c.sessions_active.store(self.sessions.len() as u64, Relaxed);
                tracing::debug!(src = %meta.src, ssid = sender.ssid, "new STAMP session");
            }
            Slot::Evicted => {
                bump(&c.sessions_created);
                bump(&c.sessions_evicted);
                tracing::debug!(src = %meta.src, ssid = sender.ssid, "new STAMP session, evicted the least recent");
            }
        }
        let format = match self.cfg.format {
            FormatChoice::Auto => sender.error_estimate.format(),
            FormatChoice::Ntp => TimestampFormat::Ntp,
            FormatChoice::Ptp => TimestampFormat::Ptp,
        };
        let fields = ReflectorFields {
            seq,
            timestamp: Timestamp::default(),
            error_estimate: ErrorEstimate::from_error_ns(
                self.clock.synced,
                format,
                self.clock.error_ns,
            ),
            ssid: sender.ssid,
            receive_timestamp: self.clock.timestamp(format, meta.rx_utc_ns),
            sender_seq: sender.seq,
            sender_timestamp: sender.timestamp,
            sender_error_estimate: sender.error_estimate,
            sender_ttl: meta.ttl,
        };
        // Same length as the request: symmetric sizes (RFC 8762 §4.3) and no amplification.
        // `out` is at least max_len long and pkt.len() <= max_len, so this cannot fail.
        match fields.encode(out, pkt.len()) {
            Ok(len) => Ok(Reply { len, format }),
            Err(_) => {
                bump(&c.oversized);
                Err(DropReason::Oversized)
            }
        }
    }
}

/// Control space for the cmsgs we ask for: timestamps (3 timespecs), TTL, pktinfo; with room.
const CMSG_SPACE: usize = 256;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

fn setsockopt_int(
    sock: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: libc::c_int,
    what: &'static str,
) -> Result<(), ReflectorError> {
    // SAFETY: valid fd, pointer to a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            &val as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(ReflectorError::SocketOption {
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Where the request was addressed, to answer from the same address.
#[derive(Clone, Copy)]
enum PktInfo {
    None,
    V4(libc::in_pktinfo),
    V6(libc::in6_pktinfo),
}

/// A bound reflector socket plus its engine.
pub struct Reflector {
    sock: Socket,
    local: SocketAddr,
    engine: Engine,
    max_len: usize,
}

impl Reflector {
    pub fn bind(cfg: ReflectorConfig) -> Result<Reflector, ReflectorError> {
        cfg.validate()?;
        let addr = cfg.listen;
        let bind_err = |source| ReflectorError::Bind { addr, source };
        let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, None).map_err(bind_err)?;
        let opt = |what| move |source| ReflectorError::SocketOption { what, source };
        if addr.is_ipv6() {
            // `[::]` means both families, independent of net.ipv6.bindv6only.
            sock.set_only_v6(false).map_err(opt("IPV6_V6ONLY=0"))?;
            setsockopt_int(
                &sock,
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVHOPLIMIT,
                1,
                "IPV6_RECVHOPLIMIT",
            )?;
            setsockopt_int(
                &sock,
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVPKTINFO,
                1,
                "IPV6_RECVPKTINFO",
            )?;
            // The sender learns the path's hop count from its own TTL; ours starts at 255.
            sock.set_unicast_hops_v6(255)
                .map_err(opt("IPV6_UNICAST_HOPS"))?;
        }
        // IPv4 options also apply to IPv4-mapped traffic on a dual-stack socket.
        let v4 = |name, val, what| setsockopt_int(&sock, libc::IPPROTO_IP, name, val, what);
        let r4 = v4(libc::IP_RECVTTL, 1, "IP_RECVTTL")
            .and_then(|_| v4(libc::IP_PKTINFO, 1, "IP_PKTINFO"))
            .and_then(|_| v4(libc::IP_TTL, 255, "IP_TTL"));
        match r4 {
            Err(e) if addr.is_ipv4() => return Err(e),
            // On an IPv6 socket only mapped IPv4 traffic needs them: best effort.
            Err(e) => tracing::debug!(error = %e, "IPv4 options on the IPv6 reflector socket"),
            Ok(()) => {}
        }
        let flags = (libc::SOF_TIMESTAMPING_RX_SOFTWARE | libc::SOF_TIMESTAMPING_SOFTWARE) as i32;
        setsockopt_int(
            &sock,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPING,
            flags,
            "SO_TIMESTAMPING (software RX)",
        )?;
        wait_rx_timestamps_live(Duration::from_secs(2));
        // Wakes the loop to look at the stop flag; costs nothing while traffic flows.
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(opt("SO_RCVTIMEO"))?;
        // Room for bursts from many senders at 10 kHz each.
        let _ = sock.set_recv_buffer_size(4 << 20);
        sock.bind(&SockAddr::from(addr)).map_err(bind_err)?;
        let local = sock
            .local_addr()
            .map_err(bind_err)?
            .as_socket()
            .ok_or_else(|| bind_err(io::Error::other("bound socket has no IP address")))?;
        let counters = Arc::new(ReflectorCounters::default());
        let max_len = cfg.max_len;
        let mut engine = Engine::new(cfg, local.port(), counters);
        engine.clock = ClockInfo::read();
        Ok(Reflector {
            sock,
            local,
            engine,
            max_len,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn counters(&self) -> Arc<ReflectorCounters> {
        Arc::clone(self.engine.counters())
    }

    /// Serves until `stop` is set (checked at least every 100 ms).
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), ReflectorError> {
        // One byte more than max_len, so a larger datagram shows as such even without
        // MSG_TRUNC's length; all buffers live for the whole loop: no allocation per packet.
        let mut buf = vec![0u8; self.max_len + 1];
        let mut out = vec![0u8; self.max_len + 1];
        let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
        let fd = self.sock.as_raw_fd();
        let mut next_clock_ns = clock::monotonic_ns() + clock::NS_PER_S;
        let mut consecutive_errors = 0u32;
        let mut warned_no_ts = false;
        tracing::info!(listen = %self.local, max_len = self.max_len, "STAMP reflector listening");
        while !stop.load(Relaxed) {
            // SAFETY: zeroed sockaddr_storage is valid; the kernel fills at most its size.
            let mut name: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain data; zero is a valid start.
            let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.0.as_mut_ptr().cast();
            msg.msg_controllen = CMSG_SPACE as _;
            // SAFETY: every pointer in msg refers to live buffers of the stated sizes.
            // MSG_TRUNC: the return value is the datagram's real length.
            let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_TRUNC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {}
                    _ => {
                        bump(&self.engine.counters.recv_errors);
                        consecutive_errors += 1;
                        tracing::warn!(error = %e, consecutive = consecutive_errors, "STAMP reflector recvmsg failed");
                        if consecutive_errors >= 1000 {
                            return Err(ReflectorError::Recv { source: e });
                        }
                    }
                }
                continue;
            }
            consecutive_errors = 0;
            let len = n as usize;
            let now_mono = clock::monotonic_ns();
            if now_mono >= next_clock_ns {
                self.engine.clock = ClockInfo::read();
                next_clock_ns = now_mono + clock::NS_PER_S;
            }
            let (rx_ts, ttl, pktinfo) = read_cmsgs(&msg);
            let rx_utc_ns = match rx_ts {
                Some(t) => t,
                None => {
                    bump(&self.engine.counters.rx_timestamp_fallback);
                    if !warned_no_ts {
                        warned_no_ts = true;
                        tracing::warn!(
                            "no kernel RX timestamp on a STAMP request; T2 falls back to user \
                             space (less exact). Check that SO_TIMESTAMPING is not filtered"
                        );
                    }
                    clock::realtime_ns()
                }
            };
            let Some(src) = sockaddr_to_std(&name, msg.msg_namelen) else {
                continue;
            };
            let meta = RxMeta {
                src,
                len,
                rx_utc_ns,
                ttl,
                now_mono_ns: now_mono,
            };
            let req = &buf[..len.min(buf.len())];
            let reply = match self.engine.handle(req, &meta, &mut out) {
                Ok(r) => r,
                Err(why) => {
                    tracing::trace!(src = %src, len, ?why, "STAMP request dropped");
                    continue;
                }
            };
            self.send(
                &name,
                msg.msg_namelen,
                &mut out[..reply.len],
                pktinfo,
                reply.format,
            );
        }
        tracing::info!(counters = ?self.engine.counters.snapshot(), "STAMP reflector stopped");
        Ok(())
    }

    fn send(
        &self,
        name: &libc::sockaddr_storage,
        namelen: libc::socklen_t,
        pkt: &mut [u8],
        pktinfo: PktInfo,
        format: TimestampFormat,
    ) {
        let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
        // SAFETY: msghdr is plain data; zero is a valid start.
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_name = name as *const libc::sockaddr_storage as *mut libc::c_void;
        msg.msg_namelen = namelen;
        let controllen = match pktinfo {
            PktInfo::None => 0,
            // SAFETY: cmsg is aligned and large enough for one pktinfo cmsg.
            PktInfo::V4(mut info) => unsafe {
                // Answer from the address asked; let routing choose the interface.
                info.ipi_spec_dst = info.ipi_addr;
                info.ipi_ifindex = 0;
                put_cmsg(&mut cmsg, libc::IPPROTO_IP, libc::IP_PKTINFO, info)
            },
            // SAFETY: as above.
            PktInfo::V6(info) => unsafe {
                put_cmsg(&mut cmsg, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info)
            },
        };
        if controllen > 0 {
            msg.msg_control = cmsg.0.as_mut_ptr().cast();
            msg.msg_controllen = controllen as _;
        }
        // T3: the last thing before the syscall.
        let t3 = self.engine.clock.timestamp(format, clock::realtime_ns());
        if ReflectorFields::patch_timestamp(pkt, t3).is_err() {
            return;
        }
        let mut iov = libc::iovec {
            iov_base: pkt.as_mut_ptr().cast(),
            iov_len: pkt.len(),
        };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: pointers refer to live buffers. MSG_DONTWAIT: a full send buffer drops
        // this reply (counted) instead of stalling every other session.
        let rc = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if rc < 0 {
            bump(&self.engine.counters.send_errors);
            tracing::debug!(error = %io::Error::last_os_error(), "STAMP reply not sent");
        } else {
            bump(&self.engine.counters.reflected);
        }
    }

    /// Runs the reflector on its own thread.
    pub fn spawn(mut self) -> Result<ReflectorHandle, ReflectorError> {
        let stop = Arc::new(AtomicBool::new(false));
        let local = self.local;
        let counters = self.counters();
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("stamp-reflector".into())
            .spawn(move || self.run(&flag))
            .map_err(ReflectorError::Spawn)?;
        Ok(ReflectorHandle {
            stop,
            thread: Some(thread),
            local,
            counters,
        })
    }
}

/// Waits until the kernel stamps received packets, at most `limit`.
///
/// Enabling RX timestamps flips a global static key from a workqueue, later: on a busy host
/// we saw hundreds of milliseconds in which packets came without stamps (T2 then falls back
/// to user space, counted). The reflector's socket already holds its reference on the key, so
/// a private loopback pair probes until stamps show up; the reflector then starts exact.
fn wait_rx_timestamps_live(limit: Duration) {
    let t0 = std::time::Instant::now();
    let pair = std::net::UdpSocket::bind("127.0.0.1:0").and_then(|rx| {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0")?;
        tx.connect(rx.local_addr()?)?;
        rx.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok((rx, tx))
    });
    let (rx, tx) = match pair {
        Ok(p) => p,
        Err(e) => {
            // No loopback (e.g. a fresh namespace with lo down): nothing to probe with.
            tracing::debug!(error = %e, "cannot probe RX timestamping on loopback; not waiting");
            return;
        }
    };
    let flags = (libc::SOF_TIMESTAMPING_RX_SOFTWARE | libc::SOF_TIMESTAMPING_SOFTWARE) as i32;
    if setsockopt_int(&rx, libc::SOL_SOCKET, libc::SO_TIMESTAMPING, flags, "probe").is_err() {
        return;
    }
    let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
    let mut byte = [0u8; 1];
    while t0.elapsed() < limit {
        if tx.send(&[0]).is_err() {
            return;
        }
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: msghdr is plain data; zero is a valid start.
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = CMSG_SPACE as _;
        // SAFETY: pointers refer to live buffers of the stated sizes.
        let n = unsafe { libc::recvmsg(rx.as_raw_fd(), &mut msg, 0) };
        if n >= 0 && read_cmsgs(&msg).0.is_some() {
            tracing::debug!(
                waited_us = t0.elapsed().as_micros() as u64,
                "kernel RX timestamps live"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::warn!(
        waited_ms = limit.as_millis() as u64,
        "the kernel does not stamp received packets yet; T2 falls back to user space until it \
         does (counted as rx_timestamp_fallback)"
    );
}

/// Writes one cmsg at the start of `buf`; returns the control length.
///
/// # Safety
/// `buf` must be aligned for cmsghdr and hold CMSG_SPACE(size_of::<T>()) bytes.
unsafe fn put_cmsg<T: Copy>(buf: &mut CmsgBuf, level: i32, ty: i32, val: T) -> usize {
    let space = libc::CMSG_SPACE(size_of::<T>() as u32) as usize;
    let mut msg: libc::msghdr = MaybeUninit::zeroed().assume_init();
    msg.msg_control = buf.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let c = libc::CMSG_FIRSTHDR(&msg);
    (*c).cmsg_level = level;
    (*c).cmsg_type = ty;
    (*c).cmsg_len = libc::CMSG_LEN(size_of::<T>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<T>(), val);
    space
}

/// T2 (UTC ns), TTL and destination address from the received control messages.
fn read_cmsgs(msg: &libc::msghdr) -> (Option<u64>, u8, PktInfo) {
    let (mut ts, mut ttl, mut info) = (None, 0u8, PktInfo::None);
    // SAFETY: the kernel wrote msg_controllen bytes of well-formed cmsgs into msg_control;
    // CMSG_* walk within them, and data is read unaligned with the size checked.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let h = &*c;
            let data = libc::CMSG_DATA(c);
            let dlen = h.cmsg_len as usize - (data as usize - c as usize);
            match (h.cmsg_level, h.cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMPING)
                    if dlen >= size_of::<[libc::timespec; 3]>() =>
                {
                    // ts[0] is the software stamp; [1] is deprecated, [2] hardware.
                    let t: [libc::timespec; 3] = std::ptr::read_unaligned(data.cast());
                    if t[0].tv_sec > 0 {
                        ts = Some(t[0].tv_sec as u64 * clock::NS_PER_S + t[0].tv_nsec as u64);
                    }
                }
                (libc::IPPROTO_IP, libc::IP_TTL) | (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
                    if dlen >= size_of::<libc::c_int>() =>
                {
                    let v: libc::c_int = std::ptr::read_unaligned(data.cast());
                    ttl = v.clamp(0, 255) as u8;
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO) if dlen >= size_of::<libc::in_pktinfo>() => {
                    info = PktInfo::V4(std::ptr::read_unaligned(data.cast()));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                    if dlen >= size_of::<libc::in6_pktinfo>() =>
                {
                    info = PktInfo::V6(std::ptr::read_unaligned(data.cast()));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    (ts, ttl, info)
}

fn sockaddr_to_std(name: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    let len = len as usize;
    match name.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says sockaddr_in, and the kernel wrote that many bytes.
            let a = unsafe { &*(name as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(name as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A reflector running on its own thread; stops when dropped.
pub struct ReflectorHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), ReflectorError>>>,
    local: SocketAddr,
    counters: Arc<ReflectorCounters>,
}

impl ReflectorHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn counters(&self) -> Arc<ReflectorCounters> {
        Arc::clone(&self.counters)
    }

    /// False once the loop has ended (stopped, or failed: [`ReflectorHandle::stop`] says why).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the loop (within ~100 ms) and returns how it ended.
    pub fn stop(mut self) -> Result<(), ReflectorError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), ReflectorError> {
        self.stop.store(true, Relaxed);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| ReflectorError::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for ReflectorHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::error!(error = %e, "STAMP reflector ended with an error");
        }
    }
}

#[cfg(test)]
#[path = "reflector_tests.rs"]
mod tests;
