//! The control side: which configured link is attached to which interface. Follows hot-plug
//! through netlink (RTM_NEWLINK/RTM_DELLINK wake a resync; a lost message — ENOBUFS — too),
//! re-attaches a modem that returns with a new ifindex, and applies reloaded configs.
use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};
use linkpulse_common::MAX_LINKS;

use crate::{
    clock,
    config::{Config, LinkConfig},
    kernel::{self, Attachment, Kernel},
    shared::{LinkInfo, LinkState, Shared},
};

/// Requests to the control thread.
#[derive(Debug)]
pub enum Control {
    /// Something changed in the interfaces: check every link.
    Resync,
    /// A new configuration (SIGHUP).
    Reload(Box<Config>),
}

struct Slot {
    config: LinkConfig,
    attachment: Option<Attachment>,
    state: LinkState,
    /// Last error printed, to avoid repeating the same warning every resync.
    last_error: Option<String>,
    ever_attached: bool,
    warned_missing: bool,
    missing_since: Option<Instant>,
}

pub struct LinkManager {
    kernel: Kernel,
    slots: Vec<Option<Slot>>,
    shared: Arc<Shared>,
    bin_width_ns: u64,
}

/// A resync also runs this often without any netlink message, as a safety net.
const PERIODIC_RESYNC: Duration = Duration::from_secs(2);

impl LinkManager {
    pub fn new(kernel: Kernel, cfg: &Config, shared: Arc<Shared>) -> Self {
        let mut m = Self {
            kernel,
            slots: (0..MAX_LINKS).map(|_| None).collect(),
            shared,
            bin_width_ns: cfg.bin_width_ns,
        };
        for (i, l) in cfg.links.iter().enumerate() {
            m.slots[i] = Some(Slot::new(l.clone()));
        }
        m.publish_table();
        m
    }

    /// Runs until `stop`; detaches everything on the way out.
    pub fn run(mut self, rx: Receiver<Control>, stop: Arc<AtomicBool>) {
        self.resync();
        // A message found behind a burst of resyncs, handled next.
        let mut next = None;
        while !stop.load(Ordering::Relaxed) {
            let msg = match next.take() {
                Some(m) => Ok(m),
                None => rx.recv_timeout(PERIODIC_RESYNC.min(Duration::from_millis(200))),
            };
            match msg {
                Ok(Control::Resync) => {
                    next = drain_resyncs(&rx);
                    self.resync();
                }
                Ok(Control::Reload(cfg)) => self.reload(&cfg),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => self.resync(),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            self.publish_tcp_stats();
        }
        self.detach_all();
    }

    /// Copies the kernel's passive RTT counters to `Shared` (for /metrics).
    fn publish_tcp_stats(&self) {
        let t = self.kernel.tcp_stats();
        let entries = self.kernel.tcp_table_entries();
        let c = &self.shared.counters.tcp_rtt;
        c.samples.store(t.samples, Ordering::Relaxed);
        c.inserts.store(t.inserts, Ordering::Relaxed);
        c.bad_options.store(t.bad_options, Ordering::Relaxed);
        c.insert_errors.store(t.insert_errors, Ordering::Relaxed);
        c.evicted
            .store(t.evicted_at_least(entries), Ordering::Relaxed);
        c.table_entries.store(u64::from(entries), Ordering::Relaxed);
    }

    fn detach_all(&mut self) {
        for i in 0..self.slots.len() {
            if let Some(a) = self.slots[i].as_mut().and_then(|s| s.attachment.take()) {
                self.kernel.detach(a);
                self.shared.set_attached_since(i, 0);
            }
        }
        tracing::info!("detached from every interface");
    }

    /// Checks every configured link against the interfaces that exist now.
    pub fn resync(&mut self) {
        for i in 0..self.slots.len() {
            self.resync_one(i);
        }
    }

    fn resync_one(&mut self, i: usize) {
        let Some(slot) = self.slots[i].as_mut() else {
            return;
        };
        let name = slot.config.interface.clone();
        let now_ix = kernel::ifindex(&name);
        let current = slot.attachment.as_ref().map(|a| a.ifindex);
        if now_ix.is_some() && now_ix == current {
            return;
        }
        if let Some(old) = slot.attachment.take() {
            // The interface went away, or came back under a new ifindex.
            self.kernel.detach(old);
            self.shared.set_attached_since(i, 0);
            tracing::warn!(link = %name, "modem interface disappeared: its bins are marked missing until it returns");
            self.shared.event(
                "link_gone",
                Some(&name),
                format!("interface {name} disappeared"),
            );
        }
        let slot = self.slots[i].as_mut().expect("checked above");
        let Some(ifindex) = now_ix else {
            if !slot.ever_attached && !slot.warned_missing {
                slot.warned_missing = true;
                tracing::warn!(link = %name, "interface {name} does not exist (yet): the other links run; it is attached as soon as it appears (check the interface name in the config)");
                self.shared.event(
                    "link_missing",
                    Some(&name),
                    format!("interface {name} does not exist"),
                );
            }
            if slot.state != LinkState::Missing {
                slot.state = LinkState::Missing;
                slot.missing_since = Some(Instant::now());
                self.set_state(i, LinkState::Missing, None, None);
            }
            return;
        };
        let result = kernel::l2_header_len(&name)
            .map_err(|e| format!("cannot read the link type of {name}: {e}"))
            .and_then(|l2| {
                self.kernel
                    .attach(&name, ifindex, i as u32, l2)
                    .map_err(|e| e.to_string())
            });
        let slot = self.slots[i].as_mut().expect("checked above");
        match result {
            Ok(a) => {
                // Counting starts with the next bin: the one in progress is partial.
                let tai = clock::tai_ns();
                let since = tai - tai % self.bin_width_ns + self.bin_width_ns;
                let gap = slot.missing_since.take().map(|t| t.elapsed());
                slot.attachment = Some(a);
                slot.state = LinkState::Attached;
                slot.last_error = None;
                let again = slot.ever_attached;
                slot.ever_attached = true;
                self.shared.set_attached_since(i, since);
                self.shared
                    .counters
                    .attaches
                    .fetch_add(1, Ordering::Relaxed);
                if again {
                    tracing::info!(link = %name, ifindex, gap_ms = gap.map(|g| g.as_millis() as u64), "modem interface is back: re-attached");
                    self.shared.event(
                        "link_reattached",
                        Some(&name),
                        format!("interface {name} re-attached (ifindex {ifindex})"),
                    );
                } else {
                    tracing::info!(link = %name, ifindex, "attached");
                    self.shared.event(
                        "link_attached",
                        Some(&name),
                        format!("interface {name} attached (ifindex {ifindex})"),
                    );
                }
                self.set_state(i, LinkState::Attached, Some(ifindex), None);
            }
            Err(e) => {
                self.shared
                    .counters
                    .attach_errors
                    .fetch_add(1, Ordering::Relaxed);
                if slot.last_error.as_deref() != Some(e.as_str()) {
                    tracing::error!(link = %name, error = %e, "attach failed; retrying on the next interface change");
                    self.shared.event("attach_error", Some(&name), e.clone());
                }
                slot.last_error = Some(e.clone());
                slot.state = LinkState::Error;
                self.set_state(i, LinkState::Error, Some(ifindex), Some(e));
            }
        }
    }

    fn set_state(&self, i: usize, state: LinkState, ifindex: Option<u32>, err: Option<String>) {
        self.shared.update_link(i, |l| {
            if l.state != state {
                l.since_utc_ns = clock::realtime_ns() as i64;
            }
            l.state = state;
            l.ifindex = ifindex;
            if state == LinkState::Attached {
                l.attach_count += 1;
            }
            l.last_error = err;
        });
    }

    /// Applies a reloaded configuration: links keep their index by interface name, removed
    /// links are detached, new ones take free indexes.
    pub fn reload(&mut self, cfg: &Config) {
        if cfg.bin_width_ns != self.bin_width_ns {
            tracing::warn!(
                configured_us = cfg.bin_width_ns / 1000,
                running_us = self.bin_width_ns / 1000,
                "bin_width_us changed: it takes effect at the next restart; keeping the running width"
            );
        }
        for i in 0..self.slots.len() {
            let keep = self.slots[i]
                .as_ref()
                .is_some_and(|s| cfg.links.iter().any(|l| l.interface == s.config.interface));
            if !keep {
                if let Some(mut s) = self.slots[i].take() {
                    if let Some(a) = s.attachment.take() {
                        self.kernel.detach(a);
                    }
                    self.shared.set_attached_since(i, 0);
                    tracing::info!(link = %s.config.interface, "link removed by reload");
                    self.shared.event(
                        "link_removed",
                        Some(&s.config.interface),
                        "removed from the configuration".into(),
                    );
                }
            }
        }
        for l in &cfg.links {
            if let Some(s) = self
                .slots
                .iter_mut()
                .flatten()
                .find(|s| s.config.interface == l.interface)
            {
                s.config = l.clone();
            } else if let Some(free) = self.slots.iter().position(Option::is_none) {
                tracing::info!(link = %l.interface, index = free, "link added by reload");
                self.shared.event(
                    "link_added",
                    Some(&l.interface),
                    "added by a configuration reload".into(),
                );
                self.slots[free] = Some(Slot::new(l.clone()));
            }
        }
        self.publish_table();
        self.resync();
    }

    fn publish_table(&self) {
        let now = clock::realtime_ns() as i64;
        let old = self.shared.links();
        let table = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_ref().map(|s| {
                    let prev = old
                        .iter()
                        .find(|o| o.index == i && o.config.interface == s.config.interface);
                    LinkInfo {
                        index: i,
                        config: (&s.config).into(),
                        state: s.state,
                        ifindex: s.attachment.as_ref().map(|a| a.ifindex),
                        since_utc_ns: prev.map_or(now, |p| p.since_utc_ns),
                        attach_count: prev.map_or(0, |p| p.attach_count),
                        last_error: s.last_error.clone(),
                        last_second: prev.and_then(|p| p.last_second),
                    }
                })
            })
            .collect();
        self.shared.set_links(table);
    }
}

impl Slot {
    fn new(config: LinkConfig) -> Self {
        Self {
            config,
            attachment: None,
            state: LinkState::Missing,
            last_error: None,
            ever_attached: false,
            warned_missing: false,
            missing_since: Some(Instant::now()),
        }
    }
}

/// Watches RTM_NEWLINK/RTM_DELLINK in the calling thread's network namespace and asks the
/// control thread to resync on each (coalesced). Runs until `stop`.
pub fn watch_netlink(tx: Sender<Control>, stop: Arc<AtomicBool>) -> io::Result<()> {
    // SAFETY: plain socket/bind/setsockopt calls with valid arguments; the fd is closed below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let close = |e: io::Error| {
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        e
    };
    // SAFETY: zeroed sockaddr_nl is valid; groups set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    // SAFETY: valid address and length.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(close(io::Error::last_os_error()));
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: valid option value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let mut buf = [0u8; 16384];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: buffer valid for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            let _ = tx.try_send(Control::Resync);
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => {}
            Some(libc::ENOBUFS) => {
                // Messages were lost: re-resolve every interface.
                tracing::debug!("netlink overrun: resyncing every link");
                let _ = tx.try_send(Control::Resync);
            }
            _ => return Err(close(e)),
        }
    }
    close(io::Error::other("stopped"));
    Ok(())
}

/// Folds the resyncs waiting in `rx` into the one being handled (one resync covers them all)
/// and returns the first other message, which must still be handled: a reload sent right after
/// a netlink event used to be taken off the queue here and lost.
fn drain_resyncs(rx: &Receiver<Control>) -> Option<Control> {
    loop {
        match rx.try_recv() {
            Ok(Control::Resync) => continue,
            Ok(other) => return Some(other),
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_behind_resyncs_is_kept() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let cfg = Config::parse(
            "[router]\nid = \"r\"\nsite = \"s\"\n[[link]]\ninterface = \"wwan0\"\n",
            std::path::Path::new("t.toml"),
        )
        .expect("config");
        for c in [
            Control::Resync,
            Control::Resync,
            Control::Reload(Box::new(cfg)),
            Control::Resync,
        ] {
            tx.send(c).expect("send");
        }
        assert!(matches!(drain_resyncs(&rx), Some(Control::Reload(_))));
        assert!(
            matches!(rx.try_recv(), Ok(Control::Resync)),
            "what follows stays queued"
        );
        assert!(drain_resyncs(&rx).is_none());
    }
}
