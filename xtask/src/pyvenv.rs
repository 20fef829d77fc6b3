//! The Python tools the tests use, from PyPI, in a venv outside the repo:
//! `$HOME/.cache/linkpulse/schemathesis-venv` (tests/tests/web_schemathesis.rs runs it).
//! Idempotent: nothing is fetched when the pinned version is there.
use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{cmd, setup::report};

/// schemathesis, pinned: its checks and CLI flags change between releases.
const SCHEMATHESIS: &str = "4.32.5";

fn venv() -> Result<PathBuf> {
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache/linkpulse/schemathesis-venv")),
        None => bail!("HOME is not set, so the schemathesis venv ($HOME/.cache/linkpulse/schemathesis-venv) has no place. Fix: set HOME"),
    }
}

pub fn ensure_schemathesis() -> Result<()> {
    let dir = venv()?;
    let bin = dir.join("bin/schemathesis");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(SCHEMATHESIS))
        .unwrap_or(false);
    if installed {
        report(
            "ok",
            &format!("schemathesis {SCHEMATHESIS} in {}", dir.display()),
        );
        return Ok(());
    }
    if !dir.join("bin/pip").exists() {
        cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&dir))
            .context("creating the venv (Debian package python3-venv)")?;
    }
    cmd::run(
        Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet"])
            .arg(format!("schemathesis=={SCHEMATHESIS}")),
    )
    .context("installing schemathesis from PyPI into the venv")?;
    report(
        "installed",
        &format!("schemathesis {SCHEMATHESIS} in {}", dir.display()),
    );
    Ok(())
}
