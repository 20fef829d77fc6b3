//! `cargo xtask setup`: checks the machine and installs what is missing, idempotently.
//!
//! A second run only asks dpkg once and bpf-linker for its version, so it takes well under a second.

use crate::cmd;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// Every Debian package the project needs, with what needs it. Later work adds rows here, and the
/// README's "What gets installed" lists the same names.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "rustc-web",
        "Debian's rustc 1.96: compiles the eBPF crate ebpf/ for bpfel-unknown-none",
    ),
    (
        "cargo-web",
        "Debian's cargo: daemon/build.rs runs it for ebpf/; it also builds bpf-linker",
    ),
    (
        "libstd-rust-web-dev-bpf",
        "prebuilt `core` for bpfel-unknown-none (no rust-src, no -Z build-std)",
    ),
    (
        "llvm-22-dev",
        "libLLVM 22, the LLVM of Debian's rustc, which bpf-linker links against",
    ),
    (
        "bpftool",
        "inspecting loaded programs and maps; per-program run time for the bench",
    ),
    (
        "iproute2",
        "`ip netns` / `ip link` for the testbed, the demo and the tests",
    ),
    (
        "procps",
        "ps/pgrep/free: RSS and CPU figures in tests and the bench",
    ),
    (
        "tshark",
        "decodes captured STAMP probes and replies (TWAMP-Test dissector) in the wire-format tests",
    ),
    (
        "irtt",
        "irtt 0.9, the RTT peer: the bench runs its client and server beside linkpulse's probes on one emulated link",
    ),
    (
        "tarantool",
        "the local store of 500 ms rollups (2.6), supervised by the daemon; sink tests run it",
    ),
    (
        "influxdb",
        "InfluxDB 1.6.7, the central side: forwarder tests and the backfill bench start their own influxd",
    ),
    (
        "influxdb-client",
        "the `influx` CLI, to inspect and create databases on a central InfluxDB by hand",
    ),
    (
        "python3-venv",
        "the venv under ~/.cache/linkpulse/ that holds schemathesis (PyPI) for the API test",
    ),
    (
        "chromium",
        "headless Chromium: the web page's browser test (tests/tests/web_browser.rs), over DevTools",
    ),
    (
        "prometheus",
        "promtool checks and unit-tests deploy/prometheus's alerting rules; the NOC test scrapes the daemon with a real Prometheus",
    ),
];

/// bpf-linker's version; the recipe in shared notes/ebpf-toolchain.md was verified with it.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's LLVM 22, the one Debian's rustc uses; without LLVM_PREFIX bpf-linker's build finds
/// /usr/bin/llvm-config (LLVM 14) and fails with `unable to find library -lLLVM`.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Kernel that brought tcx (bpf_link based tc attach), which the daemon uses.
const TCX_KERNEL: (u32, u32) = (6, 6);

/// One line per check, aligned so that a failing line stands out.
pub fn report(status: &str, what: &str) {
    say!("setup  {status:<9}  {what}");
}

pub fn run() -> Result<()> {
    run_with(false)
}

/// `cross`: also install the aarch64 cross tools (`cargo xtask setup --cross`); without it only
/// say whether they are there.
pub fn run_with(cross: bool) -> Result<()> {
    check_root()?;
    check_btf()?;
    check_kernel_version();
    ensure_packages()?;
    ensure_bpf_linker()?;
    crate::pyvenv::ensure_schemathesis()?;
    if cross {
        crate::cross::ensure()?;
    } else {
        crate::cross::report_state();
    }
    Ok(())
}

fn check_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        report("error", "running as root");
        bail!(
            "not running as root (euid {euid}): setup installs Debian packages, and the testbed \
             and tests create network namespaces and load eBPF programs. Fix: run as root, e.g. \
             `sudo -E cargo xtask ...` or from a root shell"
        );
    }
    report("ok", "running as root");
    Ok(())
}

fn check_btf() -> Result<()> {
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !btf.exists() {
        report("error", "kernel BTF");
        bail!(
            "{} does not exist: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF), which \
             linkpulse's eBPF programs need; such kernels are not supported. Fix: boot a kernel \
             with BTF (Debian 12's own kernels have it)",
            btf.display()
        );
    }
    report("ok", &format!("kernel BTF at {}", btf.display()));
    Ok(())
}

/// Only a warning: a backported kernel may have tcx under an older version number, and the daemon
/// reports a failed attach itself.
fn check_kernel_version() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    match parse_kernel_version(release) {
        Some(v) if v >= TCX_KERNEL => report(
            "ok",
            &format!(
                "kernel {release} has tcx (>= {}.{})",
                TCX_KERNEL.0, TCX_KERNEL.1
            ),
        ),
        _ => report(
            "warn",
            &format!(
                "kernel `{release}` is older than {}.{} or unrecognised: tcx attach may fail. \
                 Fix: use a kernel >= {}.{}",
                TCX_KERNEL.0, TCX_KERNEL.1, TCX_KERNEL.0, TCX_KERNEL.1
            ),
        ),
    }
}

/// "6.18.44-fc-v669" -> (6, 18).
fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn ensure_packages() -> Result<()> {
    let names: Vec<&str> = PACKAGES.iter().map(|(name, _)| *name).collect();
    install_missing("Debian packages", &names)
}

/// Installs those of `names` that dpkg does not list as installed (`apt-get update` first, and
/// only then); `what` names the group in the report. A name may carry an architecture
/// (`pkg:arm64`).
pub fn install_missing(what: &str, names: &[&str]) -> Result<()> {
    let missing = missing_packages(names)?;
    if missing.is_empty() {
        report("ok", &format!("{what}: all {} installed", names.len()));
        return Ok(());
    }
    for name in &missing {
        report("missing", &format!("Debian package {name}"));
    }
    cmd::run(Command::new("apt-get").arg("update")).context(
        "`apt-get update` failed. Fix: check the network and /etc/apt/sources.list, then rerun",
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("`apt-get install` failed. Fix: read apt's message above, then rerun setup")?;
    let still = missing_packages(&missing)?;
    if !still.is_empty() {
        bail!(
            "apt-get finished but dpkg still lists {} as not installed. Fix: run `apt-get install \
             {}` by hand and read its output",
            still.join(", "),
            still.join(" ")
        );
    }
    for name in &missing {
        report("installed", &format!("Debian package {name}"));
    }
    Ok(())
}

/// One dpkg-query for all packages. It prints a line per known package and exits 1 if any is
/// unknown to dpkg, so its exit code is ignored and the absence of an "install ok installed" line
/// is what counts as missing.
fn missing_packages<S: AsRef<str>>(names: &[S]) -> Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .arg("-W")
        // The architecture too, to tell `libstd-rust-web-dev:arm64` from the amd64 one.
        .arg("-f=${Package}:${Architecture} ${Status}\n")
        .args(names.iter().map(AsRef::as_ref))
        .output()
        .context(
            "could not run dpkg-query. Fix: run on Debian 12 (setup installs with dpkg/apt)",
        )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(names
        .iter()
        .map(AsRef::as_ref)
        .filter(|name| !is_installed(&stdout, name))
        .map(str::to_owned)
        .collect())
}

/// Whether dpkg-query's `${Package}:${Architecture} ${Status}` output has `name` fully installed.
/// A plain name matches any architecture (a multi-arch package may have several lines; any
/// installed one is enough); `pkg:arch` matches only that architecture.
fn is_installed(dpkg_output: &str, name: &str) -> bool {
    dpkg_output.lines().any(|line| {
        let Some((pkg_arch, status)) = line.split_once(' ') else {
            return false;
        };
        let (pkg, arch) = pkg_arch.split_once(':').unwrap_or((pkg_arch, ""));
        let same = match name.split_once(':') {
            Some((want_pkg, want_arch)) => pkg == want_pkg && arch == want_arch,
            None => pkg == name,
        };
        same && status.trim() == "install ok installed"
    })
}

fn ensure_bpf_linker() -> Result<()> {
    let tools = cmd::tools_dir()?;
    let linker = tools.join("bin/bpf-linker");
    if bpf_linker_version_ok(&linker) {
        report(
            "ok",
            &format!("bpf-linker {BPF_LINKER_VERSION} at {}", linker.display()),
        );
        return Ok(());
    }
    report(
        "missing",
        &format!(
            "bpf-linker {BPF_LINKER_VERSION} at {} (building it takes about a minute)",
            linker.display()
        ),
    );
    // Debian's cargo on purpose: the recipe in notes/ebpf-toolchain.md was verified with it.
    let mut install = Command::new("/usr/bin/cargo");
    install
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
            "--root",
        ])
        .arg(&tools);
    cmd::run(&mut install).with_context(|| {
        format!(
            "installing bpf-linker {BPF_LINKER_VERSION} failed. Fix: check that crates.io is \
             reachable and that llvm-22-dev is installed ({LLVM_PREFIX} must exist), then rerun \
             `cargo xtask setup`"
        )
    })?;
    if !bpf_linker_version_ok(&linker) {
        bail!(
            "cargo install finished but `{} --version` does not print {BPF_LINKER_VERSION}. Fix: \
             delete {} and rerun `cargo xtask setup`",
            linker.display(),
            tools.display()
        );
    }
    report(
        "installed",
        &format!("bpf-linker {BPF_LINKER_VERSION} at {}", linker.display()),
    );
    Ok(())
}

/// True if `linker --version` runs and names exactly our version ("bpf-linker 0.13.0").
fn bpf_linker_version_ok(linker: &Path) -> bool {
    Command::new(linker)
        .arg("--version")
        .output()
        .map(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .any(|word| word == BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_version("6.6"), Some((6, 6)));
        assert_eq!(parse_kernel_version(""), None);
        assert!(parse_kernel_version("6.1.0-28-amd64").unwrap() < TCX_KERNEL);
        assert!(parse_kernel_version("6.10.2").unwrap() >= TCX_KERNEL);
    }

    #[test]
    fn dpkg_status_lines() {
        let out = "procps:amd64 install ok installed\nirtt:amd64 deinstall ok config-files\n\
                   libc6:amd64 install ok installed\nlibc6:arm64 not-installed\n\
                   libstd-rust-web-dev-bpf:all install ok installed\n";
        assert!(is_installed(out, "procps"));
        assert!(
            !is_installed(out, "irtt"),
            "config-files only is not installed"
        );
        assert!(is_installed(out, "libc6"), "one installed arch is enough");
        assert!(!is_installed(out, "ethtool"), "absent from the output");
        assert!(!is_installed(out, "proc"), "no prefix matches");
        assert!(is_installed(out, "libc6:amd64"));
        assert!(!is_installed(out, "libc6:arm64"), "only that architecture");
        assert!(is_installed(out, "libstd-rust-web-dev-bpf"), "arch all");
    }

    #[test]
    fn package_names_are_unique() {
        let mut names: Vec<_> = PACKAGES.iter().map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PACKAGES.len());
    }
}
