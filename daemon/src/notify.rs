//! systemd notification (sd_notify): READY=1 once attached and serving, WATCHDOG=1 while the
//! ingest thread keeps ticking. Without $NOTIFY_SOCKET it does nothing.
use std::{os::unix::net::UnixDatagram, time::Duration};

pub struct Notifier {
    sock: Option<(UnixDatagram, String)>,
}

impl Notifier {
    pub fn from_env() -> Self {
        let sock = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let s = UnixDatagram::unbound().ok()?;
            Some((s, path))
        });
        Self { sock }
    }

    pub fn notify(&self, msg: &str) {
        let Some((s, path)) = &self.sock else { return };
        let r = if let Some(abstract_name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
                .and_then(|a| s.send_to_addr(msg.as_bytes(), &a))
        } else {
            s.send_to(msg.as_bytes(), path)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    /// Half the watchdog period systemd asked for, if any.
    pub fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        Some(Duration::from_micros(usec / 2))
    }
}
