//! Headless Chromium (Debian's `chromium`) for the browser test and the bench's render timing.

use std::{
    io,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
};

/// Starts headless Chromium in network namespace `ns` with its DevTools endpoint on a free port
/// (Chromium writes it to `profile/DevToolsActivePort`), on `about:blank`. It runs in its own
/// process group, so the caller can kill it and its helpers at once.
pub fn spawn_headless(ns: &str, profile: &Path) -> io::Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", ns, "chromium"])
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            "--window-size=1280,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
}
