//! Builds the kernel programs (`../ebpf`) for bpfel-unknown-none with Debian's cargo, rustc-web
//! and bpf-linker (see ARCHITECTURE.md and `cargo xtask setup`), and embeds them in the daemon.
use std::{env, path::PathBuf, process::Command};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .ok_or_else(|| anyhow::anyhow!("daemon/ has no parent directory"))?;
    let ebpf_dir = root.join("ebpf");
    println!(
        "cargo::rerun-if-changed={}",
        root.join("common/src").display()
    );
    println!("cargo::rerun-if-env-changed=LINKPULSE_TOOLS_DIR");

    // bpf-linker lives in the project's tools dir (installed by `cargo xtask setup`); put it
    // on PATH for the nested build so a plain `cargo build` works too once setup has run.
    let tools = env::var_os("LINKPULSE_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/linkpulse/tools")));
    let mut path = env::var_os("PATH").unwrap_or_default();
    if let Some(tools) = tools {
        let bin = tools.join("bin");
        let mut dirs = vec![bin];
        dirs.extend(env::split_paths(&path));
        path = env::join_paths(dirs)?;
    }
    let has_linker = env::split_paths(&path).any(|d| d.join("bpf-linker").is_file());
    if !has_linker {
        anyhow::bail!(
            "bpf-linker not found (looked in $LINKPULSE_TOOLS_DIR/bin, ~/.cache/linkpulse/tools/bin \
             and PATH): run `cargo xtask setup` as root once, it installs it"
        );
    }
    if !PathBuf::from("/usr/lib/rustlib/bpfel-unknown-none").exists() {
        anyhow::bail!(
            "Debian's BPF core library is missing (/usr/lib/rustlib/bpfel-unknown-none): run \
             `cargo xtask setup` (it installs rustc-web and libstd-rust-web-dev-bpf)"
        );
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    if env::var("CARGO_CFG_TARGET_ENDIAN")? != "little" {
        anyhow::bail!("linkpulse's kernel programs are built for bpfel (little-endian hosts) only");
    }
    // One target dir for the kernel programs of every profile and check of the workspace, per
    // host architecture (its `bpf_target_arch` cfg): clippy, the release build and the aarch64
    // cross build then compile aya-ebpf and its bindings once instead of each in its OUT_DIR
    // (what aya-build does: ~2.5 min each here, most of a cold CI build's eBPF time).
    let target_root = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target_dir = target_root.join("ebpf").join(&arch);
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");
    for p in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo::rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    let flags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    // Debian's cargo and rustc-web (the rustc with the BPF target's core library); the
    // nested cargo is not the one running us, so nothing of the outer build is passed on.
    let out = Command::new("/usr/bin/cargo")
        .current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--bins",
            "--target",
            "bpfel-unknown-none",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", &path)
        .env("RUSTC", "/usr/bin/rustc")
        // aya-ebpf and our programs (crate `linkpulse`, the bin) need `asm_experimental_arch`:
        // the unstable features are enabled for those two crates only.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf,linkpulse")
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .output()?;
    if !out.status.success() {
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            println!("cargo::warning={line}");
        }
        anyhow::bail!(
            "building the kernel programs in {} failed ({}): cargo's messages are above",
            ebpf_dir.display(),
            out.status
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/linkpulse");
    let dst = PathBuf::from(env::var("OUT_DIR")?).join("linkpulse");
    std::fs::copy(&built, &dst)
        .map_err(|e| anyhow::anyhow!("copying {} to {}: {e}", built.display(), dst.display()))?;
    // The DWARF that bpf-linker turned into BTF is not needed at load time (aya and the
    // verifier read .BTF and .BTF.ext, which stay): 210 of the object's 263 KB, embedded in
    // the shipped binary. LLVM 22's objcopy comes with llvm-22-dev, which setup installs.
    const OBJCOPY: &str = "/usr/lib/llvm-22/bin/llvm-objcopy";
    let status = Command::new(OBJCOPY)
        .arg("--strip-debug")
        .arg(&dst)
        .status()
        .map_err(|e| {
            anyhow::anyhow!(
                "{OBJCOPY}: {e}. Fix: run `cargo xtask setup` (it installs llvm-22-dev)"
            )
        })?;
    if !status.success() {
        anyhow::bail!(
            "{OBJCOPY} --strip-debug {} failed ({status})",
            dst.display()
        );
    }
    Ok(())
}
