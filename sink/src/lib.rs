//! linkpulse's sink: the local store of 500 ms rollups (a Tarantool 2.6 instance the daemon
//! supervises, or an external one) and the IPROTO client it is reached with.

pub mod store;
pub mod tarantool;
