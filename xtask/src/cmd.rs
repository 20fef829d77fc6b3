//! Paths of the workspace and the tools dir, and running child commands with the build environment.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The workspace root. xtask lives one level below it, and `cargo xtask` always compiles it from
/// this checkout, so the compile-time manifest dir is the right anchor wherever the user's shell is.
pub fn repo_root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| xtask_dir.join(".."))
}

/// Cargo's target dir as the child cargo will see it: `CARGO_TARGET_DIR` when the user set one
/// (relative values are relative to the workspace root, where we run cargo), else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => repo_root().join(dir),
        _ => repo_root().join("target"),
    }
}

/// Where bpf-linker is installed: `$LINKPULSE_TOOLS_DIR`, default `$HOME/.cache/linkpulse/tools`.
/// Outside the repo so that a fresh clone (and CI) reuses the one-minute bpf-linker build.
pub fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LINKPULSE_TOOLS_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache/linkpulse/tools")),
        None => bail!(
            "HOME is not set, so the tools dir (default $HOME/.cache/linkpulse/tools) is unknown. \
             Fix: set HOME, or set LINKPULSE_TOOLS_DIR to a directory for bpf-linker"
        ),
    }
}

/// `cargo` with the environment every build needs: `TOOLS/bin` first in PATH, because the daemon's
/// build.rs builds ebpf/ with Debian's cargo, and rustc's bpf target runs `bpf-linker` from PATH;
/// `LINKPULSE_TOOLS_DIR` so that nested tools find the same dir.
pub fn cargo(args: &[&str]) -> Result<Command> {
    let tools = tools_dir()?;
    let mut path = vec![tools.join("bin")];
    if let Some(old) = std::env::var_os("PATH") {
        path.extend(std::env::split_paths(&old));
    }
    let path: OsString =
        std::env::join_paths(path).context("a directory in PATH or the tools dir contains ':'")?;
    // `cargo run` sets CARGO to the cargo that runs us: reuse it so that the toolchain that built
    // xtask (rustup's stable, as pinned by the user) also builds the workspace.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args)
        .current_dir(repo_root())
        .env("PATH", path)
        .env("LINKPULSE_TOOLS_DIR", tools);
    Ok(cmd)
}

/// The command line as a user would type it, for logs and error messages.
pub fn display(cmd: &Command) -> String {
    // The cargo `cargo run` hands us is a long toolchain path; the user typed `cargo`.
    let program = cmd.get_program();
    let program = if std::env::var_os("CARGO").is_some_and(|c| c == program) {
        "cargo".into()
    } else {
        program.to_string_lossy()
    };
    let mut parts = vec![program.into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs a command with inherited stdio and fails, naming it, if it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!(
            "`{}` failed ({}); its output is above",
            display(cmd),
            describe(status)
        );
    }
    Ok(())
}

/// Runs a command with inherited stdio and returns its exit status; failing to start it is an error.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    esay!("$ {}", display(cmd));
    cmd.status()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// "exit code 101" or "killed by signal 2": what a user needs to tell a failure from an interrupt.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    }
}

/// `cargo build --release --workspace` with the build environment: what build, demo and bench share.
pub fn build_release() -> Result<()> {
    run(&mut cargo(&["build", "--release", "--workspace"])?)
}

/// The shipped binary (`linkpulse`) in the `dist` profile (fat LTO, one codegen unit,
/// dependencies optimised for size) without the `testbed` feature (the emulated router is a
/// development tool, not part of what a router runs): what `cargo xtask build` leaves in
/// target/dist and what the benchmark's footprint measures.
pub fn build_dist() -> Result<()> {
    run(&mut cargo(&[
        "build",
        "--profile",
        "dist",
        "-p",
        "linkpulse",
        "--bin",
        "linkpulse",
        "--no-default-features",
    ])?)
}

/// The benchmark in the `dist` profile, so that what it runs in process (the daemon's
/// pipeline, the stream) is compiled as what ships; its `linkpulse` beside it is
/// [`build_dist`]'s.
pub fn build_bench() -> Result<()> {
    run(&mut cargo(&[
        "build",
        "--profile",
        "dist",
        "-p",
        "linkpulse-bench",
    ])?)
}

/// A built binary of the workspace in `profile`, with a fix in the error if it is missing.
pub fn profile_bin(profile: &str, name: &str) -> Result<PathBuf> {
    let bin = target_dir().join(profile).join(name);
    if !bin.is_file() {
        bail!(
            "{} was not produced by `cargo build --profile {profile}`. Fix: check that the \
             workspace still has a binary named `{name}`",
            bin.display()
        );
    }
    Ok(bin)
}
