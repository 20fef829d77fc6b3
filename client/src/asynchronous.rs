//! The async reader, on tokio's reactor.
use std::{os::fd::AsRawFd, path::Path};

use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    connect_fd, parse_frame, parse_hello, ClientError, FrameRef, Hello, LinkInfo, Subscription,
    MAX_MSG,
};
use linkpulse_common::stream::as_bytes;

pub struct AsyncStreamClient {
    fd: AsyncFd<std::os::fd::OwnedFd>,
    hello: Hello,
    links: Vec<LinkInfo>,
    buf: Vec<u8>,
}

async fn recv(fd: &AsyncFd<std::os::fd::OwnedFd>, buf: &mut [u8]) -> Result<usize, ClientError> {
    loop {
        let mut guard = fd.readable().await?;
        // SAFETY: receiving into a valid buffer, non-blocking.
        let r = guard.try_io(|inner| {
            let n = unsafe {
                libc::recv(
                    inner.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(Ok(0)) => return Err(ClientError::Closed),
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) => return Err(e.into()),
            Err(_would_block) => continue,
        }
    }
}

impl AsyncStreamClient {
    pub async fn connect(path: impl AsRef<Path>, sub: Subscription) -> Result<Self, ClientError> {
        let fd = connect_fd(path.as_ref(), true)?;
        // SAFETY: the fd is a fresh socket we own and move in; nothing else closes or reuses
        // it while registered (register_with_interest's contract).
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| ClientError::Io(e.into()))?;
        let req = sub.record();
        loop {
            let mut guard = fd.writable().await?;
            // SAFETY: sending a valid buffer.
            let r = guard.try_io(|inner| {
                let n = unsafe {
                    libc::send(
                        inner.get_ref().as_raw_fd(),
                        as_bytes(&req).as_ptr().cast(),
                        as_bytes(&req).len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match r {
                Ok(res) => {
                    res?;
                    break;
                }
                Err(_would_block) => continue,
            }
        }
        let mut buf = vec![0u8; MAX_MSG];
        let n = recv(&fd, &mut buf).await?;
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

    /// Waits for the next frame.
    pub async fn next_frame(&mut self) -> Result<FrameRef<'_>, ClientError> {
        let n = recv(&self.fd, &mut self.buf).await?;
        parse_frame(&self.buf[..n])
    }
}
