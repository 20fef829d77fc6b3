//! linkpulse's testbed: an emulated bonded-cellular router in network namespaces, with a
//! user-space link emulator per modem that logs the fate of every packet (the ground truth the
//! daemon's measurements are checked against), traffic generators and a CLI.
//!
//! Layout: `{name}-rtr` (the router, where the daemon runs, modems wwanK) ↔ `{name}-car` (the
//! carrier: veth peers, emulator sockets) ↔ `{name}-srv` (the server side, TUN srvK).
pub mod cli;
pub mod emulator;
pub mod netns;
pub(crate) mod sys;
pub mod topology;
pub mod traffic;
pub mod truth;

pub use topology::{ModemKind, ModemSpec, Testbed, TestbedOptions, TestbedSpec};

use std::path::PathBuf;

/// The shipped Mahimahi traces (`tests/traces`, with their README and SOURCE-README).
pub fn traces_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("traces")
}
