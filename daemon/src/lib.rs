//! linkpulse: per-modem traffic counted in the kernel, aligned on one time grid.
//!
//! Data path: `kernel` (eBPF programs and their maps) → `ingest` (ring buffer + mmapped
//! slots) → `align` (one frame per bin) → consumers (`stats` → `http`). `links` follows the
//! interfaces; `config` and `clock` are what they say. See ARCHITECTURE.md.
pub mod align;
pub mod clock;
pub mod config;
pub mod cpu_latency;
pub mod daemon;
pub mod forward;
pub mod frame;
pub mod frame_queue;
pub mod http;
pub mod ingest;
pub mod kernel;
pub mod links;
pub mod notify;
pub mod persist;
pub mod probe;
pub mod rollup;
pub mod rollup_probe;
pub mod shared;
pub mod stamp;
pub mod stats;
pub mod stream;
pub mod top;

pub use config::Config;
pub use daemon::{subscription, Daemon, Subscription};
pub use frame::Frame;
pub use frame_queue::{frame_queue, FrameConsumer, FrameProducer};
