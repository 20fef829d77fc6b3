//! linkpulse's developer commands, run as `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! Each command that builds first runs `setup`, so a fresh Debian 12 machine needs nothing but
//! rustup and this checkout.

/// `println!` that ignores a closed stdout: after a terminal hangs up (SIGHUP), the demo's teardown
/// must still run, and `println!` would panic on the failed write.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed stderr, for the same reason as `say!`.
macro_rules! esay {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod cmd;
mod cross;
mod demo;
mod http;
mod links_table;
mod pyvenv;
mod setup;
mod signals;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::{Command, ExitCode};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    about = "linkpulse's developer commands (run as root on Debian 12)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check the machine and install what is missing (Debian packages, bpf-linker); idempotent.
    Setup {
        /// Also install the aarch64 cross tools (arm64 std, cross gcc, qemu-user), which let
        /// `cargo xtask test` build and test the pure-logic crates for aarch64.
        #[arg(long)]
        cross: bool,
    },
    /// setup, then `cargo build --release --workspace`, and the shipped `linkpulse` in the
    /// `dist` profile (target/dist/linkpulse).
    Build,
    /// setup, fmt check, clippy, then `cargo test --workspace --release`.
    Test(test::TestArgs),
    /// setup, build, then the daemon on an emulated router with a live per-link table.
    Demo(demo::DemoArgs),
    /// setup, build, then `linkpulse-bench ARGS` (writes target/bench/summary.json).
    Bench {
        /// Passed to linkpulse-bench as they are.
        #[arg(last = true, value_name = "BENCH_ARGS")]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Cmd::Setup { cross } => setup::run_with(*cross),
        Cmd::Build => setup::run()
            .and_then(|()| cmd::build_release())
            .and_then(|()| cmd::build_dist()),
        Cmd::Test(args) => test::run(args),
        Cmd::Demo(args) => demo::run(args),
        Cmd::Bench { args } => bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            esay!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: &[String]) -> Result<()> {
    setup::run()?;
    cmd::build_dist()?;
    cmd::build_bench()?;
    let bench = cmd::profile_bin("dist", "linkpulse-bench")?;
    let mut run = Command::new(bench);
    run.args(args).current_dir(cmd::repo_root());
    cmd::run(&mut run)
}
