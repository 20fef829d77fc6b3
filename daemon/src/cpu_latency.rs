//! A CPU wake-up latency request (Linux PM QoS, `/dev/cpu_dma_latency`), held while the
//! controller stream has clients. An idle CPU in a deep state (or a VM's halted vCPU, woken
//! through the hypervisor) takes tens to hundreds of µs to run the thread a frame or a timer
//! wakes: on this project's 2-vCPU VM that was most of the stream's latency (p99 82–130 µs
//! without the request, ~50 with it; `cargo xtask bench -- --only stream` shows both). The
//! request lasts as long as the descriptor is open with a value written; writing -1 returns to
//! the kernel's default (no constraint), so the daemon keeps the file open and toggles.
use std::{
    fs::File,
    io::{self, Write},
    path::{Path, PathBuf},
};

/// The kernel's interface (root-only by default: deploy/linkpulse.service opens it to the group).
pub const DEVICE: &str = "/dev/cpu_dma_latency";

/// The kernel reads a written s32 of -1 (`PM_QOS_DEFAULT_VALUE`) as "withdraw the constraint".
const RELEASE: i32 = -1;

#[derive(Debug, thiserror::Error)]
pub enum CpuLatencyError {
    #[error("cannot open {path} for the stream's CPU wake-up latency request: {source} (let the daemon write it: deploy/linkpulse.service does `chgrp linkpulse` and `chmod g+w` on it before the start; or set [stream] cpu_wakeup_latency_us = \"off\" and accept that frames wait for CPUs waking from idle)")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An open request, held or released.
pub struct CpuLatency {
    file: File,
    us: i32,
    held: bool,
}

impl CpuLatency {
    /// Opens the request (the kernel adds it unconstrained) for a limit of `us` µs.
    pub fn open(path: &Path, us: u32) -> Result<Self, CpuLatencyError> {
        let file =
            File::options()
                .write(true)
                .open(path)
                .map_err(|source| CpuLatencyError::Open {
                    path: path.to_path_buf(),
                    source,
                })?;
        Ok(Self {
            file,
            us: i32::try_from(us).unwrap_or(i32::MAX),
            held: false,
        })
    }

    /// Holds or releases the limit; a write only when that changes (one syscall, no allocation).
    /// True when it changed.
    pub fn set(&mut self, hold: bool) -> io::Result<bool> {
        if hold == self.held {
            return Ok(false);
        }
        let v = if hold { self.us } else { RELEASE };
        // The kernel takes exactly four bytes as a binary s32.
        self.file.write_all(&v.to_ne_bytes())?;
        self.held = hold;
        Ok(true)
    }

    pub fn held(&self) -> bool {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_limit_once_when_held_and_minus_one_when_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("qos");
        std::fs::write(&p, b"").expect("create");
        let mut q = CpuLatency::open(&p, 7).expect("open");
        assert!(!q.set(false).expect("no-op"));
        assert!(q.set(true).expect("hold"));
        assert!(!q.set(true).expect("no-op"));
        assert!(q.held());
        assert!(q.set(false).expect("release"));
        let b = std::fs::read(&p).expect("read");
        let vals: Vec<i32> = b
            .chunks(4)
            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(vals, [7, -1]);
    }

    #[test]
    fn a_missing_device_names_the_fix() {
        let e = CpuLatency::open(Path::new("/nonexistent/cpu_dma_latency"), 0)
            .err()
            .expect("must fail");
        let text = e.to_string();
        assert!(text.contains("/nonexistent/cpu_dma_latency"), "{text}");
        assert!(text.contains("cpu_wakeup_latency_us"), "{text}");
    }
}
