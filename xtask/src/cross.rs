//! aarch64, for small ARM routers: the cross tools `cargo xtask setup --cross` installs, and the
//! `cargo xtask test` step that builds the pure-logic crates for aarch64 and runs their tests under
//! qemu-user.
//!
//! The build uses Debian's cargo/rustc 1.96 (`/usr/bin`), not rustup's toolchain: rustup cannot
//! add targets on this machine, while Debian ships the aarch64 std as the multiarch package
//! `libstd-rust-web-dev:arm64` (see shared notes/ebpf-toolchain.md, "aarch64 builds").

use crate::{cmd, setup};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const TARGET: &str = "aarch64-unknown-linux-gnu";

/// The Debian packages of the cross tools, with what needs each. rustc-web and cargo-web are in
/// setup's own list already.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "libstd-rust-web-dev:arm64",
        "Rust std for aarch64, the same 1.96 as rustc-web (multiarch; rustup cannot add targets here)",
    ),
    ("gcc-aarch64-linux-gnu", "links the aarch64 binaries"),
    (
        "libc6-dev-arm64-cross",
        "aarch64 glibc to link against; /usr/aarch64-linux-gnu is also qemu-user's sysroot",
    ),
    ("qemu-user", "qemu-aarch64 runs the aarch64 test binaries on this host"),
];

/// Files that show the cross tools are present. The test step looks at these, not at dpkg, so a
/// check costs three stat calls and tools installed some other way count as well.
const MARKERS: &[&str] = &[
    "/usr/bin/aarch64-linux-gnu-gcc",
    "/usr/bin/qemu-aarch64",
    "/usr/lib/rustlib/aarch64-unknown-linux-gnu",
];

/// qemu-user with the cross sysroot (libc6-arm64-cross), and glibc taken from that sysroot too.
/// `-L` alone is not enough: it resolves the loader there, but the loader then finds
/// /lib/aarch64-linux-gnu/libc.so.6 of the multiarch libc6:arm64 (which libstd-rust-web-dev:arm64
/// pulls in), a different build (2.36-9+deb12u14 against 2.36-8cross1), and every program hangs
/// in its first pthread_create.
const RUNNER: &str =
    "qemu-aarch64 -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib";

/// Crates whose whole test suite (unit, integration and doc tests) runs under qemu-user: pure
/// logic, no eBPF, no root.
pub const PURE_CRATES: &[&str] = &["linkpulse-common", "linkpulse-client"];
/// The daemon: only its lib tests, which need neither the kernel programs loaded nor namespaces.
pub const DAEMON_CRATE: &str = "linkpulse";

/// The marker files that do not exist; empty when the cross tools are installed.
pub fn missing_tools() -> Vec<&'static str> {
    MARKERS
        .iter()
        .copied()
        .filter(|m| !Path::new(m).exists())
        .collect()
}

/// For plain `cargo xtask setup`: one line saying whether the cross tools are there. It installs
/// nothing, so that CI machines that do not test aarch64 do not pay for the downloads.
pub fn report_state() {
    if missing_tools().is_empty() {
        setup::report(
            "ok",
            &format!("cross tools for {TARGET} (gcc, qemu-user, Rust std)"),
        );
    } else {
        setup::report(
            "skip",
            "cross tools: not installed (cargo xtask setup --cross)",
        );
    }
}

/// `cargo xtask setup --cross`: adds the arm64 dpkg architecture if needed and installs the cross
/// packages that are missing. A second run only asks dpkg.
pub fn ensure() -> Result<()> {
    ensure_arm64_architecture()?;
    let names: Vec<&str> = PACKAGES.iter().map(|(name, _)| *name).collect();
    // setup runs `apt-get update` only when something is missing; that also covers the case of
    // the architecture just added above, whose package lists apt does not have yet.
    setup::install_missing("cross packages", &names)?;
    let missing = missing_tools();
    if !missing.is_empty() {
        anyhow::bail!(
            "the cross packages are installed but {} do not exist. Fix: reinstall them with \
             `apt-get install --reinstall {}` and read apt's output",
            missing.join(", "),
            names.join(" ")
        );
    }
    Ok(())
}

fn ensure_arm64_architecture() -> Result<()> {
    let out = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()
        .context("could not run dpkg. Fix: run on Debian 12 (setup installs with dpkg/apt)")?;
    let foreign = String::from_utf8_lossy(&out.stdout);
    if foreign.split_whitespace().any(|a| a == "arm64") {
        setup::report("ok", "dpkg architecture arm64");
        return Ok(());
    }
    cmd::run(Command::new("dpkg").args(["--add-architecture", "arm64"])).context(
        "`dpkg --add-architecture arm64` failed. Fix: read dpkg's message above (setup must run \
         as root)",
    )?;
    setup::report("added", "dpkg architecture arm64");
    Ok(())
}

/// Where the aarch64 build goes: beside the host build, in its own directory, so that Debian's
/// rustc and the cross target never invalidate the host's artifacts.
pub fn target_dir() -> PathBuf {
    cmd::target_dir().join("cross")
}

/// Debian's cargo with everything an aarch64 build and a qemu-user test run need.
pub fn cargo(args: &[&str]) -> Result<Command> {
    let tools = cmd::tools_dir()?;
    // /usr/bin first: only Debian's toolchain has the aarch64 std. The tools dir for bpf-linker,
    // which the daemon's build.rs runs for its eBPF object.
    let mut path = vec![PathBuf::from("/usr/bin"), tools.join("bin")];
    if let Some(old) = std::env::var_os("PATH") {
        path.extend(std::env::split_paths(&old));
    }
    let path =
        std::env::join_paths(path).context("a directory in PATH or the tools dir contains ':'")?;
    let mut cargo = Command::new("/usr/bin/cargo");
    cargo
        .args(args)
        .current_dir(cmd::repo_root())
        .env("PATH", path)
        .env("LINKPULSE_TOOLS_DIR", tools)
        // Explicit, because `cargo run` under rustup may leave RUSTC/RUSTDOC or
        // RUSTUP_TOOLCHAIN pointing at rustup's toolchain, which has no aarch64 std.
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTDOC", "/usr/bin/rustdoc")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("CARGO_TARGET_DIR", target_dir())
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", RUNNER);
    Ok(cargo)
}

/// What the aarch64 test step does.
pub enum Plan {
    /// The `cargo test` commands to run, in order.
    Run(Vec<Command>),
    /// Nothing, for this reason (printed as "aarch64: skipped (REASON)").
    Skip(String),
}

/// The aarch64 `cargo test` runs for `cargo xtask test -- EXTRA`: the pure crates' whole suites,
/// then the daemon's lib tests; with `-p`, only those of the picked packages that are built for
/// aarch64. EXTRA's other arguments go to each run as they are.
pub fn test_commands(extra: &[String]) -> Result<Plan> {
    if !missing_tools().is_empty() {
        return Ok(Plan::Skip(
            "cross tools not installed: cargo xtask setup --cross".into(),
        ));
    }
    let (picked, rest) = split_packages(extra);
    let wanted = |name: &str| picked.is_empty() || picked.iter().any(|p| p == name);
    let pure: Vec<&str> = PURE_CRATES.iter().copied().filter(|c| wanted(c)).collect();
    let mut commands = Vec::new();
    if !pure.is_empty() {
        let mut test = cargo(&["test", "--release", "--target", TARGET])?;
        for name in pure {
            test.args(["-p", name]);
        }
        test.args(&rest);
        commands.push(test);
    }
    if wanted(DAEMON_CRATE) {
        // A separate run: `--lib` would otherwise drop the pure crates' doc tests too.
        // Without default features: what ships to a router (the `testbed` development tool and
        // its dependencies are neither built nor tested for aarch64).
        let mut test = cargo(&[
            "test",
            "--release",
            "--target",
            TARGET,
            "-p",
            DAEMON_CRATE,
            "--no-default-features",
        ])?;
        // cargo rejects a second `--lib`, and the user may have given one.
        if !rest.iter().take_while(|a| *a != "--").any(|a| a == "--lib") {
            test.arg("--lib");
        }
        test.args(&rest);
        commands.push(test);
    }
    if commands.is_empty() {
        return Ok(Plan::Skip(format!(
            "none of the selected packages is tested on aarch64: {}, {DAEMON_CRATE} (lib)",
            PURE_CRATES.join(", ")
        )));
    }
    Ok(Plan::Run(commands))
}

/// Splits cargo test's arguments into the packages picked with `-p X`, `-pX`, `--package X` or
/// `--package=X` (before a `--` only: after it they are libtest's) and everything else.
fn split_packages(args: &[String]) -> (Vec<String>, Vec<String>) {
    let mut picked = Vec::new();
    let mut rest = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            rest.push(arg.clone());
            rest.extend(iter.by_ref().cloned());
            break;
        }
        if arg == "-p" || arg == "--package" {
            // A trailing `-p` without a name is left for cargo to reject with its own message.
            match iter.next() {
                Some(name) => picked.push(name.clone()),
                None => rest.push(arg.clone()),
            }
        } else if let Some(name) = arg.strip_prefix("--package=") {
            picked.push(name.to_owned());
        } else if let Some(name) = arg.strip_prefix("-p").filter(|n| !n.is_empty()) {
            picked.push(name.to_owned());
        } else {
            rest.push(arg.clone());
        }
    }
    (picked, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn packages_are_split_from_the_rest() {
        let (picked, rest) = split_packages(&strings(&[
            "-p",
            "linkpulse",
            "-pxtask",
            "--package=linkpulse-common",
            "--package",
            "linkpulse-client",
            "some_filter",
            "--",
            "-p",
            "--nocapture",
        ]));
        assert_eq!(
            picked,
            strings(&["linkpulse", "xtask", "linkpulse-common", "linkpulse-client"])
        );
        assert_eq!(rest, strings(&["some_filter", "--", "-p", "--nocapture"]));
        assert_eq!(split_packages(&[]), (vec![], vec![]));
    }
}
