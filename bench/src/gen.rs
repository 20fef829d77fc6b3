//! A UDP flood with sendmmsg (batches of 64) over a set of links, counting what the kernel
//! accepted: the generator's count is the ground truth the daemon's totals are compared to.
use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

const BATCH: usize = 64;

/// Sends `payload`-byte UDP datagrams to `dsts` round-robin (a batch each) until `stop` or
/// `limit` packets or `duration`; returns (packets sent, L3 bytes sent). Optional `pps` paces
/// the flood (0 = as fast as possible).
pub fn flood(
    dsts: &[Ipv4Addr],
    payload: usize,
    limit: u64,
    duration: Duration,
    pps: u64,
    stop: &AtomicBool,
) -> std::io::Result<(u64, u64)> {
    // SAFETY: plain UDP socket; closed at the end.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let buf = vec![0x5au8; payload];
    let addrs: Vec<libc::sockaddr_in> = dsts
        .iter()
        .map(|a| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 9u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a).to_be(),
            },
            sin_zero: [0; 8],
        })
        .collect();
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut _,
        iov_len: buf.len(),
    };
    let mut sent = 0u64;
    let start = Instant::now();
    let mut k = 0usize;
    // SAFETY: zeroed mmsghdr array is valid; pointers set below stay valid during the calls.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    while sent < limit && !stop.load(Ordering::Relaxed) && start.elapsed() < duration {
        if pps > 0 {
            let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        }
        let n = BATCH.min((limit - sent) as usize);
        let dst = &addrs[k % addrs.len()];
        k += 1;
        for m in msgs.iter_mut().take(n) {
            m.msg_hdr.msg_name = dst as *const _ as *mut _;
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: n initialised headers pointing at live buffers.
        let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as u32, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        sent += r as u64;
    }
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    Ok((sent, sent * (payload as u64 + 28)))
}
