//! Errors of the Tarantool client.

use std::time::Duration;

/// Tarantool error codes (`ER_*` in 2.6's `errcode.h`) that callers act on.
pub mod codes {
    /// A Lua error raised by a stored function or an EVAL (`error('...')`).
    pub const PROC_LUA: u32 = 32;
    /// CALL of a function that does not exist.
    pub const NO_SUCH_PROC: u32 = 33;
    /// The user lacks a privilege.
    pub const ACCESS_DENIED: u32 = 42;
    /// Unknown user in AUTH.
    pub const NO_SUCH_USER: u32 = 45;
    /// Wrong password in AUTH.
    pub const PASSWORD_MISMATCH: u32 = 47;
    /// Two vinyl transactions touched the same key; the loser may simply retry.
    pub const TRANSACTION_CONFLICT: u32 = 97;
}

/// Everything a request to Tarantool can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to Tarantool at {addr}: {source}; check that the instance runs and listens there")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not send a Tarantool greeting ({reason}); point the client at the IPROTO `listen` address, not a console")]
    Greeting { addr: String, reason: String },
    #[error("authentication as `{user}` at {addr} failed: {message} (error {code}); check the user name and password")]
    Auth {
        addr: String,
        user: String,
        code: u32,
        message: String,
    },
    #[error("Tarantool at {addr} failed {request}: {message} (error {code})")]
    Server {
        addr: String,
        request: String,
        code: u32,
        message: String,
    },
    #[error("no answer from Tarantool at {addr} to {request} within {timeout:?}; the instance is stalled or overloaded (the connection stays open, a late answer is dropped)")]
    Timeout {
        addr: String,
        request: String,
        timeout: Duration,
    },
    #[error("connection to Tarantool at {addr} lost during {request}: {reason}; the next request reconnects (retry if the call is idempotent)")]
    Disconnected {
        addr: String,
        request: String,
        reason: String,
    },
    #[error("arguments of {request} must encode as a msgpack array (rmp-serde encodes `()` as nil): pass a tuple such as `&(x,)` or an empty slice `&[(); 0]`")]
    ArgsNotArray { request: String },
    #[error("cannot encode the arguments of {request}: {source}")]
    Encode {
        request: String,
        #[source]
        source: rmp_serde::encode::Error,
    },
    #[error("cannot decode the answer to {request} as {target}: {source}; the function returned another shape than the caller expects (schema mismatch?)")]
    Decode {
        request: String,
        target: &'static str,
        #[source]
        source: rmp_serde::decode::Error,
    },
    #[error("malformed IPROTO packet from {addr}: {reason}; is this a Tarantool 2.x IPROTO port?")]
    Protocol { addr: String, reason: String },
}

impl Error {
    /// True for failures where the same idempotent request may succeed if sent again (after the
    /// client reconnects): transport loss, connect failure, timeout, vinyl transaction conflict.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Disconnected { .. } | Error::Timeout { .. } => true,
            Error::Server { code, .. } => *code == codes::TRANSACTION_CONFLICT,
            _ => false,
        }
    }

    /// The Tarantool error code, when the server answered with an error.
    pub fn server_code(&self) -> Option<u32> {
        match self {
            Error::Server { code, .. } | Error::Auth { code, .. } => Some(*code),
            _ => None,
        }
    }
}
