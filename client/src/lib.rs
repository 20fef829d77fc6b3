//! Reader of linkpulse's real-time stream (`/run/linkpulse/stream.sock`): connect, subscribe to
//! links and a decimation, then read typed frames. The wire layout is
//! `linkpulse_common::stream` (and `common/include/linkpulse_stream.h` for C).
//!
//! ```no_run
//! let mut c = linkpulse_client::StreamClient::connect(
//!     "/run/linkpulse/stream.sock",
//!     linkpulse_client::Subscription::every_bin(),
//! )?;
//! loop {
//!     let f = c.next_frame()?;
//!     for r in f.records() {
//!         println!("{} link {} down {} B", f.header.bin_start_utc_ns, r.index, r.bytes[0]);
//!     }
//! }
//! # Ok::<(), linkpulse_client::ClientError>(())
//! ```
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
    time::Duration,
};

use linkpulse_common::stream::{
    as_bytes, field_str, read, Subscribe, MAGIC_ERROR, MAGIC_FRAME, MAGIC_HELLO, MAGIC_SUBSCRIBE,
    STREAM_VERSION,
};
pub use linkpulse_common::stream::{
    ErrorMsg, FrameHeader, Hello, LinkDesc, LinkRecord, FLAG_CLOCK_STEP, FLAG_CLOCK_UNSYNC,
    FLAG_GAP, FLAG_LATE, FLAG_RTT_LATE, FLAG_SKIPPED, VALID_LATE, VALID_PROBES, VALID_RTT,
    VALID_TCP_RTT, VALID_TRAFFIC,
};

#[cfg(feature = "async")]
mod asynchronous;
#[cfg(feature = "async")]
pub use asynchronous::AsyncStreamClient;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source} (is linkpulse running with [stream] enabled, and may this user open the socket?)")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("stream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the daemon refused (code {code}): {message}")]
    Refused { code: u32, message: String },
    #[error("the daemon closed the stream")]
    Closed,
    #[error("malformed message from the daemon: {0}")]
    Protocol(String),
}

/// What to subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// Bit i = link index i; 0 = every configured link.
    pub link_mask: u64,
    /// Aggregate this many bins per frame (1 = every bin).
    pub decimation: u32,
}

impl Subscription {
    pub fn every_bin() -> Self {
        Self {
            link_mask: 0,
            decimation: 1,
        }
    }

    /// The request record as sent on the socket.
    pub fn record(&self) -> Subscribe {
        Subscribe {
            magic: MAGIC_SUBSCRIBE,
            version: STREAM_VERSION,
            _pad0: 0,
            link_mask: self.link_mask,
            decimation: self.decimation,
            _pad1: 0,
        }
    }
}

/// A subscribed link as the hello describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub interface: String,
    pub label: String,
}

/// One frame, borrowing the client's receive buffer.
#[derive(Debug)]
pub struct FrameRef<'a> {
    pub header: FrameHeader,
    records: &'a [u8],
}

impl FrameRef<'_> {
    /// The records of the subscribed links, ascending index.
    pub fn records(&self) -> impl Iterator<Item = LinkRecord> + '_ {
        self.records
            .chunks_exact(std::mem::size_of::<LinkRecord>())
            .filter_map(read::<LinkRecord>)
    }

    /// The raw message (header and records), e.g. to save frames for a C reader.
    pub fn raw_len(&self) -> usize {
        std::mem::size_of::<FrameHeader>() + self.records.len()
    }
}

/// Largest message: a header and 64 records.
const MAX_MSG: usize = 64 + 64 * 80 + 64;

/// Blocking reader.
pub struct StreamClient {
    fd: OwnedFd,
    hello: Hello,
    links: Vec<LinkInfo>,
    buf: Vec<u8>,
}

pub(crate) fn connect_fd(path: &Path, nonblocking: bool) -> Result<OwnedFd, ClientError> {
    let err = |source| ClientError::Connect {
        path: path.display().to_string(),
        source,
    };
    let flags = libc::SOCK_SEQPACKET
        | libc::SOCK_CLOEXEC
        | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(err(io::Error::other("path too long for a Unix socket")));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: valid address of `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if !(nonblocking && e.raw_os_error() == Some(libc::EINPROGRESS)) {
            return Err(err(e));
        }
    }
    Ok(fd)
}

/// Parses the hello message (or the daemon's error).
pub(crate) fn parse_hello(msg: &[u8]) -> Result<(Hello, Vec<LinkInfo>), ClientError> {
    let magic = msg
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| ClientError::Protocol(format!("{} bytes", msg.len())))?;
    if magic == MAGIC_ERROR {
        let e: ErrorMsg = read(msg).ok_or_else(|| ClientError::Protocol("short error".into()))?;
        return Err(ClientError::Refused {
            code: e.code,
            message: field_str(&e.message).to_string(),
        });
    }
    let hello: Hello = read(msg)
        .filter(|h: &Hello| h.magic == MAGIC_HELLO)
        .ok_or_else(|| ClientError::Protocol(format!("expected a hello, magic {magic:#x}")))?;
    if hello.version != STREAM_VERSION {
        return Err(ClientError::Protocol(format!(
            "layout version {} (this client reads {STREAM_VERSION})",
            hello.version
        )));
    }
    let descs = &msg[std::mem::size_of::<Hello>()..];
    let links = descs
        .chunks_exact(std::mem::size_of::<LinkDesc>())
        .take(hello.link_count as usize)
        .filter_map(read::<LinkDesc>)
        .map(|d| LinkInfo {
            index: d.index,
            interface: field_str(&d.interface).to_string(),
            label: field_str(&d.label).to_string(),
        })
        .collect::<Vec<_>>();
    if links.len() != hello.link_count as usize {
        return Err(ClientError::Protocol(
            "hello lists fewer links than it says".into(),
        ));
    }
    Ok((hello, links))
}

/// Checks a frame message and splits it.
pub(crate) fn parse_frame(msg: &[u8]) -> Result<FrameRef<'_>, ClientError> {
    let header: FrameHeader =
        read(msg).ok_or_else(|| ClientError::Protocol(format!("frame of {} bytes", msg.len())))?;
    if header.magic == MAGIC_ERROR {
        return parse_hello(msg).and(Err(ClientError::Closed));
    }
    if header.magic != MAGIC_FRAME || header.version != STREAM_VERSION {
        return Err(ClientError::Protocol(format!(
            "bad frame magic {:#x} version {}",
            header.magic, header.version
        )));
    }
    let records = &msg[std::mem::size_of::<FrameHeader>()..];
    if records.len() != header.link_count as usize * std::mem::size_of::<LinkRecord>() {
        return Err(ClientError::Protocol(format!(
            "{} record bytes for {} links",
            records.len(),
            header.link_count
        )));
    }
    Ok(FrameRef { header, records })
}

/// Sends one message on a blocking socket (MSG_NOSIGNAL: a closed daemon is an error, not a
/// SIGPIPE).
fn send_msg(fd: &OwnedFd, b: &[u8]) -> io::Result<()> {
    // SAFETY: sending a valid buffer of its own length.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            b.as_ptr().cast(),
            b.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, ClientError> {
    loop {
        // SAFETY: receiving into a valid buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            return Ok(n as usize);
        }
        if n == 0 {
            return Err(ClientError::Closed);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

impl StreamClient {
    /// Connects and subscribes; returns when the daemon has answered.
    pub fn connect(path: impl AsRef<Path>, sub: Subscription) -> Result<Self, ClientError> {
        let fd = connect_fd(path.as_ref(), false)?;
        send_msg(&fd, as_bytes(&sub.record()))?;
        let mut buf = vec![0u8; MAX_MSG];
        let n = recv(&fd, &mut buf)?;
        let (hello, links) = parse_hello(&buf[..n])?;
        Ok(Self {
            fd,
            hello,
            links,
            buf,
        })
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    pub fn links(&self) -> &[LinkInfo] {
        &self.links
    }

    /// Gives up waiting for a frame after `t` (None = wait forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = t.map_or(
            libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            |t| libc::timeval {
                tv_sec: t.as_secs() as libc::time_t,
                tv_usec: t.subsec_micros() as libc::suseconds_t,
            },
        );
        // SAFETY: valid option value.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Blocks for the next frame.
    pub fn next_frame(&mut self) -> Result<FrameRef<'_>, ClientError> {
        let n = recv(&self.fd, &mut self.buf)?;
        parse_frame(&self.buf[..n])
    }

    /// The last message received, raw (header and records).
    pub fn raw(&self, len: usize) -> &[u8] {
        &self.buf[..len.min(self.buf.len())]
    }

    /// Sends raw bytes (for tests of the daemon's input checks).
    pub fn send_raw(&self, b: &[u8]) -> io::Result<()> {
        send_msg(&self.fd, b)
    }
}

/// Connects and sends `raw` as the first message, returning the daemon's answer (tests of bad
/// requests: the daemon must refuse with an error naming the cause).
pub fn request_raw(
    path: impl AsRef<Path>,
    raw: &[u8],
) -> Result<(Hello, Vec<LinkInfo>), ClientError> {
    let fd = connect_fd(path.as_ref(), false)?;
    send_msg(&fd, raw)?;
    let mut buf = vec![0u8; MAX_MSG];
    let n = recv(&fd, &mut buf)?;
    parse_hello(&buf[..n])
}
