//! Standalone testbed CLI: the same commands as `linkpulse testbed …`, without the daemon
//! (for the bench and this crate's end-to-end tests).
use clap::Parser;
use linkpulse_testbed::cli::{run_with, Launcher, TestbedCmd};

#[derive(Parser)]
#[command(
    name = "linkpulse-testbed",
    version,
    about = "linkpulse's emulated router"
)]
struct Cli {
    #[command(subcommand)]
    cmd: TestbedCmd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // `up` sends the background process's stderr to a log file: no colour codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let launcher = Launcher {
        exe: std::env::current_exe()?,
        // This binary takes the testbed commands at top level.
        prefix: Vec::new(),
    };
    run_with(cli.cmd, &launcher)
}
