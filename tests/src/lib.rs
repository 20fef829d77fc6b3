//! linkpulse's testbed: an emulated bonded-cellular router in network namespaces, with a
//! user-space link emulator per modem that logs the fate of every packet (the ground truth the
//! daemon's measurements are checked against), traffic generators and a CLI.
//!
//! Layout: `{name}-rtr` (the router, where the daemon runs, modems wwanK) ↔ `{name}-car` (the
//! carrier: veth peers, emulator sockets) ↔ `{name}-srv` (the server side, TUN srvK). See
//! [`topology`] for addressing, [`emulator`] for the link model, [`truth`] for the log format.
//!
//! ```no_run
//! use linkpulse_testbed::{emulator::LinkProfile, traffic::{UdpFlow, UdpSink}, truth};
//! use linkpulse_testbed::{ModemKind, ModemSpec, Testbed, TestbedSpec};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bed = Testbed::up(TestbedSpec {
//!     name: "lpt1".into(),
//!     modems: vec![ModemSpec {
//!         ifname: "wwan0".into(),
//!         kind: ModemKind::Veth,
//!         up: LinkProfile::from_trace(linkpulse_testbed::traces_dir().join("Verizon-LTE-short.up")),
//!         down: LinkProfile { delay_us: 20_000, ..LinkProfile::fixed_rate(20_000) },
//!     }],
//!     state_dir: "/tmp/lpt1".into(),
//! })?;
//! let (rtr, srv) = bed.modem_addr_v4(0);
//! let dst = std::net::SocketAddr::new(srv.into(), 9000);
//! let sink = UdpSink::new(bed.server_ns(), dst, None).start()?;
//! let sent = UdpFlow::new(bed.router_ns(), "wwan0", rtr.into(), dst, 500, 1000).run_count(2000)?;
//! bed.wait_drained(std::time::Duration::from_secs(30));
//! let records = truth::read_dir(&bed.truth_dir())?;
//! let per_second = truth::router_view(&records, 0, truth::Dir::Up);
//! # let _ = (sink, sent, per_second);
//! bed.down()?;
//! # Ok(()) }
//! ```
pub mod browser;
pub mod chaos;
pub mod cli;
pub mod emulator;
pub mod influx;
pub mod netns;
pub mod rtt;
pub mod sys;
pub mod topology;
pub mod traffic;
pub mod truth;
pub mod tshark;

pub use topology::{ModemKind, ModemSpec, Testbed, TestbedOptions, TestbedSpec};

use std::path::PathBuf;

/// The shipped Mahimahi traces (`tests/traces`, with their README and SOURCE-README).
pub fn traces_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("traces")
}
