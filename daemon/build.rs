//! Builds the kernel programs (`../ebpf`) for bpfel-unknown-none with Debian's rustc-web and
//! bpf-linker (see ARCHITECTURE.md and `cargo xtask setup`), and embeds them in the daemon.
use std::{env, path::PathBuf};

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
    // The nested cargo inherits these (build scripts are single-threaded).
    env::set_var("PATH", &path);
    // aya-ebpf needs `asm_experimental_arch`; enabling it for that crate only keeps aya-build
    // from adding -Z build-std (which would need rust-src, absent here).
    env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf");
    let ebpf_dir_str = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // The eBPF crate is outside the workspace (it has its own lock file and target): run the
    // nested cargo from its directory.
    env::set_current_dir(&ebpf_dir)?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "linkpulse-ebpf",
            root_dir: ebpf_dir_str,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("/usr"),
    )
}
