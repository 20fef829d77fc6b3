//! STAMP (RFC 8762, unauthenticated mode): the test-packet codec and the reflector.
//!
//! `wire` encodes and parses the Session-Sender and Session-Reflector test packets without
//! allocating; `reflector` is the stateful Session-Reflector behind `linkpulse reflect`.
pub mod lru;
pub mod reflector;
pub mod wire;

pub use reflector::{
    parse_listen, CountersSnapshot, FormatChoice, Reflector, ReflectorConfig, ReflectorCounters,
    ReflectorError, ReflectorHandle, DEFAULT_PORT,
};
pub use wire::{
    ErrorEstimate, ReflectorFields, ReflectorPacket, SenderFields, SenderPacket, Timestamp,
    TimestampFormat, WireError,
};
