//! Ctrl-C (SIGINT), SIGTERM and SIGHUP (terminal closed) become a flag, so that the demo can tear
//! its testbed down instead of dying with network namespaces and a daemon left behind.

use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    // Only an atomic store: the one thing that is async-signal-safe and all we need.
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP. Children in our process group still get the
/// terminal's SIGINT themselves; those we must outlive are started in their own group.
pub fn install() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
        // performs an atomic store, which is async-signal-safe.
        let ok = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // SA_RESTART: a signal must not turn a pending read or wait into a spurious error.
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut()) == 0
        };
        if !ok {
            bail!(
                "could not install a handler for signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// True once one of those signals arrived.
pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}
