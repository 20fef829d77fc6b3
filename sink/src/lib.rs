//! linkpulse's sink: the local store of 500 ms rollups (a Tarantool 2.6 instance the daemon
//! supervises, or an external one) and the IPROTO client it is reached with.
//!
//! - [`tarantool`]: a small blocking, pipelined, reconnecting IPROTO client (PING, AUTH, CALL, EVAL).
//! - [`store`]: the supervised instance (data dir, generated `init.lua`, restarts, clean stop),
//!   the versioned schema, and typed access through batch stored functions.
//!
//! ```no_run
//! use linkpulse_sink::store::{LocalConfig, Rollup, Store};
//!
//! # fn main() -> Result<(), linkpulse_sink::store::StoreError> {
//! let store = Store::start_local(LocalConfig::new("/var/lib/linkpulse/store"))?;
//! let put = store.put_rollups(&[Rollup { link_id: 3, window_ns: 500_000_000, ..Rollup::default() }])?;
//! // The forwarder: everything after the destination's cursor, oldest first.
//! let after = store.get_cursor("central")?.unwrap_or(0);
//! for row in store.read_after(after, 5000)? {
//!     let _ = row.rx_bytes;
//! }
//! store.set_cursor("central", put.last_seq)?;
//! store.stop();
//! # Ok(())
//! # }
//! ```

pub mod forward;
pub mod store;
pub mod tarantool;
