//! Thin wrappers over the Linux calls the testbed needs and std lacks (TUN, AF_PACKET with
//! kernel rx timestamps, SIOCETHTOOL, ppoll, absolute sleeps). Every `unsafe` block says why it
//! is sound; all of them pass pointers to live, correctly sized locals.
use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const NS_PER_SEC: u64 = 1_000_000_000;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ALL: u16 = 0x0003;
const IFNAMSIZ: usize = 16;
// Stable Linux UAPI values (include/uapi/linux/if_packet.h, ethtool.h); defined here so we do
// not depend on which libc version exports them.
const PACKET_OUTGOING: u8 = 4;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
pub const ETHTOOL_STXCSUM: u32 = 0x0000_0017;
pub const ETHTOOL_STSO: u32 = 0x0000_001f;
pub const ETHTOOL_SGSO: u32 = 0x0000_0024;
pub const ETHTOOL_SGRO: u32 = 0x0000_002c;

/// CLOCK_REALTIME in ns (vDSO, no syscall).
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * NS_PER_SEC + ts.tv_nsec as u64
}

fn ns_to_timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / NS_PER_SEC) as libc::time_t,
        tv_nsec: (ns % NS_PER_SEC) as libc::c_long,
    }
}

/// Sets the calling thread's timer slack. The default 50 µs would smear every timed wakeup of
/// the emulator and the generators; 1 ns asks for the hrtimer's real precision.
pub fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long by value and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "PR_SET_TIMERSLACK failed");
    }
}

/// Moves the calling thread to SCHED_FIFO at `prio`.
pub fn set_fifo_priority(prio: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: `param` is a valid sched_param; pid 0 = the calling thread.
    cvt(unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) }).map(drop)
}

/// Sleeps until CLOCK_REALTIME reaches `t_ns` (absolute, so no drift accumulates).
pub fn sleep_until_realtime(t_ns: u64) {
    let ts = ns_to_timespec(t_ns);
    loop {
        // SAFETY: `ts` is a valid timespec; the remainder pointer may be null with TIMER_ABSTIME.
        let rc = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_REALTIME,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        // clock_nanosleep returns the error number instead of setting errno.
        if rc != libc::EINTR {
            return;
        }
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cvt_isize(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// An eventfd used to wake a thread blocked in [`poll_readable`].
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the returned fd is owned by the OwnedFd below.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    pub fn signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64, as eventfd requires.
        cvt_isize(unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) })
            .map(drop)
    }
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A CLOCK_REALTIME timerfd armed with absolute deadlines. Unlike a ppoll() timeout (which
/// the kernel pads by 0.1% of its length, 15 µs for 15 ms), a timerfd expires with no slack.
#[derive(Debug)]
pub struct TimerFd {
    fd: OwnedFd,
    armed: Option<u64>,
}

impl TimerFd {
    pub fn new() -> io::Result<TimerFd> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = cvt(unsafe {
            libc::timerfd_create(libc::CLOCK_REALTIME, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        })?;
        Ok(TimerFd {
            // SAFETY: fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: None,
        })
    }

    /// Fires at CLOCK_REALTIME `t_ns` (None disarms). No syscall if already set so.
    pub fn set(&mut self, t_ns: Option<u64>) -> io::Result<()> {
        if self.armed == t_ns {
            return Ok(());
        }
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let its = libc::itimerspec {
            it_interval: zero,
            // An all-zero value disarms; a real deadline is never the epoch.
            it_value: t_ns.map_or(zero, |t| ns_to_timespec(t.max(1))),
        };
        // SAFETY: `its` is a valid itimerspec; the old-value pointer may be null.
        cvt(unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &its,
                std::ptr::null_mut(),
            )
        })?;
        self.armed = t_ns;
        Ok(())
    }

    /// Consumes an expiry (after poll said readable); the timer is then disarmed.
    pub fn clear(&mut self) {
        let mut b = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer; EAGAIN (nothing expired) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        self.armed = None;
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// ppoll() for readability on `fds` with an optional ns timeout (None = forever). Returns which
/// fds are readable (or in error/hang-up). EINTR counts as a timeout (callers loop anyway).
pub fn poll_readable<const N: usize>(
    fds: [RawFd; N],
    timeout_ns: Option<u64>,
) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ts = timeout_ns.map(ns_to_timespec);
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `pfds` is a live array of N pollfds; `tsp` is null or points to `ts`.
    let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), N as libc::nfds_t, tsp, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    Ok(pfds.map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0))
}

fn ifname_bytes(name: &str) -> io::Result<[u8; IFNAMSIZ]> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= IFNAMSIZ || b.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?} (1..15 bytes, no NUL)"),
        ));
    }
    let mut out = [0u8; IFNAMSIZ];
    out[..b.len()].copy_from_slice(b);
    Ok(out)
}

/// `struct ifreq` with the flags member of the union (40 bytes on 64-bit).
#[repr(C)]
struct IfReqFlags {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `struct ifreq` with the data-pointer member of the union.
#[repr(C)]
struct IfReqData {
    name: [u8; IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// Creates TUN device `name` (IFF_TUN | IFF_NO_PI: raw IP, no packet-info header, no vnet
/// header) in the calling thread's network namespace and returns its fd, non-blocking. The
/// device lives as long as the fd.
pub fn open_tun(name: &str) -> io::Result<OwnedFd> {
    let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
    // SAFETY: valid C string; the fd is owned below.
    let fd = cvt(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReqFlags {
        name: ifname_bytes(name)?,
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    // SAFETY: TUNSETIFF reads/writes a struct ifreq; `req` has its layout and size.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETIFF as _,
            &mut req as *mut IfReqFlags,
        )
    })?;
    Ok(fd)
}

/// Can this process open /dev/net/tun?
pub fn tun_available() -> io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map(drop)
}

/// Sets a legacy ethtool boolean feature (ETHTOOL_STXCSUM/STSO/SGSO/SGRO) on `ifname` in the calling
/// thread's namespace — what `ethtool -K` does, without needing ethtool installed.
pub fn ethtool_set(ifname: &str, cmd: u32, on: bool) -> io::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut val = EthtoolValue {
        cmd,
        data: u32::from(on),
    };
    let mut req = IfReqData {
        name: ifname_bytes(ifname)?,
        data: (&mut val as *mut EthtoolValue).cast(),
        _pad: [0; 16],
    };
    // SAFETY: plain socket for the ioctl; owned below.
    let sock =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fresh descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: SIOCETHTOOL takes an ifreq whose data points to an ethtool command struct; both
    // live on this stack frame for the duration of the call.
    cvt(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCETHTOOL as _,
            &mut req as *mut IfReqData,
        )
    })
    .map(drop)
}

/// Interface index of `name` in the calling thread's namespace.
pub fn if_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(idx)
    }
}

/// AF_PACKET receiver on `ifindex` (calling thread's namespace): SOCK_DGRAM so the kernel strips
/// the Ethernet header, every protocol, our own transmissions ignored, kernel rx timestamps
/// (SO_TIMESTAMPNS, CLOCK_REALTIME), 8 MiB receive buffer, non-blocking.
pub fn packet_rx_socket(ifindex: u32) -> io::Result<OwnedFd> {
    // Protocol 0 at creation: the socket receives nothing until bound to one interface below,
    // so no packet of another interface slips in between.
    // SAFETY: plain syscall; owned below.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    // Without this the socket would also see what we write on the interface (PACKET_OUTGOING)
    // and loop it; the pkttype check in packet_recv is the second line of defence.
    if let Err(e) = setsockopt_int(raw, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1) {
        tracing::debug!(error = %e, "PACKET_IGNORE_OUTGOING unsupported; filtering by pkttype");
    }
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)?;
    // SAFETY: zeroed sockaddr_ll is a valid value; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: pointer to a live sockaddr_ll and its size.
    cvt(unsafe {
        libc::bind(
            raw,
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// AF_PACKET sender (protocol 0: it never receives).
pub fn packet_tx_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; owned below.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        4 << 20,
    )?;
    Ok(fd)
}

/// What [`packet_recv`] got besides the bytes.
#[derive(Debug, Clone, Copy)]
pub struct PacketMeta {
    pub len: usize,
    pub protocol: u16,
    pub outgoing: bool,
    /// Kernel rx timestamp (CLOCK_REALTIME ns), when the kernel attached one.
    pub ts_ns: Option<u64>,
    pub truncated: bool,
}

/// One non-blocking receive on an AF_PACKET SOCK_DGRAM socket. `Ok(None)` = nothing queued.
pub fn packet_recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<PacketMeta>> {
    // SAFETY: zeroed sockaddr_ll / msghdr are valid values; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64 array: cmsg buffers must be aligned like cmsghdr.
    let mut ctrl = [0u64; 16];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>();
    loop {
        // SAFETY: every pointer in `msg` refers to a live local or to `buf`, with its size.
        let rc = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
        if rc >= 0 {
            let mut ts_ns = None;
            // SAFETY: CMSG_* walk the control buffer the kernel just filled, within
            // msg_controllen; the timestamp payload is a timespec (64-bit time_t here).
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET
                        && (*c).cmsg_type == libc::SCM_TIMESTAMPNS
                    {
                        let ts: libc::timespec =
                            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                        ts_ns = Some(ts.tv_sec as u64 * NS_PER_SEC + ts.tv_nsec as u64);
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            return Ok(Some(PacketMeta {
                len: (rc as usize).min(buf.len()),
                protocol: u16::from_be(sll.sll_protocol),
                outgoing: sll.sll_pkttype == PACKET_OUTGOING,
                ts_ns,
                truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
            }));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Sends one L3 packet out of `ifindex` with an Ethernet header built by the kernel:
/// dst = `dst_mac`, src = the interface's MAC, type = `ethertype`.
pub fn packet_send(
    fd: RawFd,
    ifindex: u32,
    ethertype: u16,
    dst_mac: [u8; 6],
    pkt: &[u8],
) -> io::Result<()> {
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ethertype.to_be();
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&dst_mac);
    loop {
        // SAFETY: `pkt` and `sll` are live for the call, with their sizes.
        let rc = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        match cvt_isize(rc) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// (packets, drops) counted by an AF_PACKET socket since the last call (reading resets them).
pub fn packet_stats(fd: RawFd) -> io::Result<(u32, u32)> {
    let mut st = [0u32; 2]; // struct tpacket_stats { tp_packets, tp_drops }
    let mut len = size_of::<[u32; 2]>() as libc::socklen_t;
    // SAFETY: buffer and length describe `st`.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            PACKET_STATISTICS,
            st.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    Ok((st[0], st[1]))
}

/// read() that maps EAGAIN to `Ok(None)` and retries EINTR.
pub fn read_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is live and writable for its length.
        let rc = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match cvt_isize(rc) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// write() of one whole packet (TUN writes are all-or-nothing), retrying EINTR.
pub fn write_packet(fd: RawFd, pkt: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `pkt` is live for its length.
        let rc = unsafe { libc::write(fd, pkt.as_ptr().cast(), pkt.len()) };
        match cvt_isize(rc) {
            Ok(n) if n == pkt.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "short write {n} of {} bytes",
                    pkt.len()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// L3 facts of an IP packet: (length from the IP header, IP version, transport protocol: for
/// IPv6 the next header after any extension headers, stepped over as the kernel programs do,
/// else the first next header). The length comes from the header so link-layer padding never
/// counts; it is capped at what was read. `None` if this is not IPv4/IPv6.
pub fn ip_info(pkt: &[u8]) -> Option<(usize, u8, u8)> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            let len = if (20..=pkt.len()).contains(&total) {
                total
            } else {
                pkt.len()
            };
            Some((len, 4, pkt[9]))
        }
        6 if pkt.len() >= 40 => {
            let payload = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            // payload 0 = jumbogram (hop-by-hop option): trust what was read.
            let len = if payload > 0 && 40 + payload <= pkt.len() {
                40 + payload
            } else {
                pkt.len()
            };
            let proto = linkpulse_common::ip::ipv6_transport(pkt).map_or(pkt[6], |(_, p)| p);
            Some((len, 6, proto))
        }
        _ => None,
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_info_uses_header_length() {
        let mut v4 = vec![0u8; 60];
        v4[0] = 0x45;
        v4[2..4].copy_from_slice(&46u16.to_be_bytes());
        v4[9] = 17;
        // Ethernet minimum-frame padding beyond the IP length must not count.
        assert_eq!(ip_info(&v4), Some((46, 4, 17)));
        let mut v6 = vec![0u8; 100];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&20u16.to_be_bytes());
        v6[6] = 58;
        assert_eq!(ip_info(&v6), Some((60, 6, 58)));
        // Behind a destination options header (8 bytes): TCP.
        v6[6] = 60;
        v6[40] = 6;
        assert_eq!(ip_info(&v6), Some((60, 6, 6)));
        assert_eq!(ip_info(&[0x10; 64]), None);
        assert_eq!(ip_info(&[0x45; 10]), None);
        assert_eq!(ip_info(&[]), None);
    }

    #[test]
    fn realtime_is_sane_and_sleep_is_absolute() {
        let a = realtime_ns();
        assert!(a > 1_600_000_000 * NS_PER_SEC);
        sleep_until_realtime(a + 2_000_000);
        assert!(realtime_ns() >= a + 2_000_000);
        // A deadline in the past returns at once.
        sleep_until_realtime(a);
    }

    #[test]
    fn timerfd_fires_at_its_deadline() {
        let mut t = TimerFd::new().unwrap();
        let due = realtime_ns() + 3_000_000;
        t.set(Some(due)).unwrap();
        assert_eq!(poll_readable([t.raw()], None).unwrap(), [true]);
        assert!(realtime_ns() >= due);
        t.clear();
        t.set(Some(realtime_ns() + 1_000_000_000)).unwrap();
        t.set(None).unwrap();
        assert_eq!(poll_readable([t.raw()], Some(5_000_000)).unwrap(), [false]);
    }

    #[test]
    fn eventfd_wakes_poll() {
        let e = EventFd::new().unwrap();
        assert_eq!(poll_readable([e.raw()], Some(1_000_000)).unwrap(), [false]);
        e.signal().unwrap();
        assert_eq!(poll_readable([e.raw()], None).unwrap(), [true]);
    }
}
