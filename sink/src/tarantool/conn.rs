//! One IPROTO connection: a writer shared by callers and a reader thread that routes answers by
//! sync number, so any number of requests can be in flight at once.

use super::error::Error;
use super::proto;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where a Tarantool instance listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket path (`box.cfg{listen = '/path'}`).
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn open(addr: &Address, timeout: Duration) -> io::Result<Stream> {
        match addr {
            Address::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p)?)),
            Address::Tcp(a) => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, "name resolves to no address");
                for sa in a.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            // Small requests must leave at once, not wait for Nagle.
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
    fn shutdown(&self) {
        // Errors mean the socket is already gone, which is the goal.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A raw answer packet (header + body, without the length prefix), or why none will come.
type Reply = Result<Vec<u8>, String>;

struct State {
    pending: HashMap<u64, SyncSender<Reply>>,
    /// Set once the connection is unusable; no request is registered after that.
    broken: Option<String>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail_all(&self, reason: &str) {
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some(reason.to_owned());
        }
        for (_, tx) in st.pending.drain() {
            let _ = tx.try_send(Err(reason.to_owned()));
        }
    }
}

pub(crate) struct Conn {
    pub addr: String,
    pub banner: String,
    writer: Mutex<Stream>,
    shared: Arc<Shared>,
    next_sync: AtomicU64,
    reader: Option<JoinHandle<()>>,
}

/// An answer still to come. Dropping it is fine: the answer is then discarded.
pub(crate) struct Waiter {
    pub addr: String,
    pub request: String,
    sync: u64,
    rx: Receiver<Reply>,
    shared: Arc<Shared>,
}

impl Waiter {
    /// Waits for the raw answer packet.
    pub fn recv(&self, timeout: Duration) -> Result<Vec<u8>, Error> {
        let reply = match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Unregister; if the answer raced in meanwhile, take it.
                self.shared.lock().pending.remove(&self.sync);
                match self.rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(Error::Timeout {
                            addr: self.addr.clone(),
                            request: self.request.clone(),
                            timeout,
                        })
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("reader thread ended".to_owned()),
        };
        reply.map_err(|reason| Error::Disconnected {
            addr: self.addr.clone(),
            request: self.request.clone(),
            reason,
        })
    }
}

impl Conn {
    /// Connects and reads the greeting; returns the connection and the auth salt.
    pub fn open(addr: &Address, timeout: Duration) -> Result<(Conn, Vec<u8>), Error> {
        let name = addr.to_string();
        let connect_err = |source| Error::Connect {
            addr: name.clone(),
            source,
        };
        let mut stream = Stream::open(addr, timeout).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(connect_err)?;
        let mut raw = [0u8; proto::GREETING_LEN];
        stream.read_exact(&mut raw).map_err(|e| Error::Greeting {
            addr: name.clone(),
            reason: format!("reading 128 bytes: {e}"),
        })?;
        let greeting = proto::parse_greeting(&raw).map_err(|e| Error::Greeting {
            addr: name.clone(),
            reason: e.0,
        })?;
        // The reader blocks until data or shutdown; per-request timeouts live in `Waiter::recv`.
        stream.set_read_timeout(None).map_err(connect_err)?;
        let reader_stream = stream.try_clone().map_err(connect_err)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                broken: None,
            }),
        });
        let reader = {
            let shared = shared.clone();
            let addr = name.clone();
            std::thread::Builder::new()
                .name("tarantool-rx".into())
                .spawn(move || read_loop(reader_stream, &shared, &addr))
                .map_err(connect_err)?
        };
        tracing::debug!(addr = %name, banner = %greeting.banner, "connected to Tarantool");
        Ok((
            Conn {
                addr: name,
                banner: greeting.banner,
                writer: Mutex::new(stream),
                shared,
                next_sync: AtomicU64::new(1),
                reader: Some(reader),
            },
            greeting.salt,
        ))
    }

    pub fn is_broken(&self) -> bool {
        self.shared.lock().broken.is_some()
    }

    /// Sends one request; `body` writes the body after the header.
    pub fn send(
        &self,
        request: &str,
        req_type: u8,
        body: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Waiter, Error> {
        let sync = self.next_sync.fetch_add(1, Ordering::Relaxed);
        let mut buf = Vec::with_capacity(64);
        proto::begin(&mut buf, req_type, sync);
        body(&mut buf);
        proto::finish(&mut buf).map_err(|e| Error::Protocol {
            addr: self.addr.clone(),
            reason: e.0,
        })?;
        let disconnected = |reason: String| Error::Disconnected {
            addr: self.addr.clone(),
            request: request.to_owned(),
            reason,
        };
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut st = self.shared.lock();
            if let Some(reason) = &st.broken {
                return Err(disconnected(reason.clone()));
            }
            st.pending.insert(sync, tx);
        }
        let written = {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(&buf)
        };
        if let Err(e) = written {
            let reason = format!("write failed: {e}");
            self.shared.lock().pending.remove(&sync);
            self.writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shutdown();
            self.shared.fail_all(&reason);
            return Err(disconnected(reason));
        }
        Ok(Waiter {
            addr: self.addr.clone(),
            request: request.to_owned(),
            sync,
            rx,
            shared: self.shared.clone(),
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

fn read_loop(stream: Stream, shared: &Shared, addr: &str) {
    let mut rd = io::BufReader::with_capacity(64 * 1024, stream);
    let reason = loop {
        match read_packet(&mut rd) {
            Ok(packet) => {
                let sync = match proto::parse_sync(&packet) {
                    Ok(s) => s,
                    Err(e) => break format!("bad answer header: {e}"),
                };
                let tx = shared.lock().pending.remove(&sync);
                match tx {
                    Some(tx) => {
                        let _ = tx.try_send(Ok(packet));
                    }
                    // The caller timed out and left; the late answer has no one to go to.
                    None => tracing::debug!(addr, sync, "answer to an abandoned request dropped"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                break "server closed the connection".to_owned()
            }
            Err(e) => break format!("read failed: {e}"),
        }
    };
    tracing::debug!(addr, reason = %reason, "Tarantool connection closed");
    shared.fail_all(&reason);
}

fn read_packet(rd: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; 9];
    rd.read_exact(&mut prefix[..1])?;
    let mut have = 1;
    let (plen, len) = loop {
        match proto::packet_len(&prefix[..have]) {
            Ok(Some(x)) => break x,
            Ok(None) => {
                rd.read_exact(&mut prefix[have..have + 1])?;
                have += 1;
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.0)),
        }
    };
    debug_assert_eq!(plen, have);
    let mut packet = vec![0u8; len];
    rd.read_exact(&mut packet)?;
    Ok(packet)
}
