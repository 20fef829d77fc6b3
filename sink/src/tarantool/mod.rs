//! A small IPROTO client for Tarantool 2.6.
//!
//! Why our own: the crate named `tarantool` runs only inside Tarantool, `tarantool-rs` sends
//! IPROTO_ID which 2.6 rejects, `rusty_tarantool` is abandoned (shared notes/services.md). linkpulse
//! needs PING, AUTH, CALL and EVAL only, because all data access goes through batch stored functions.
//!
//! Why blocking: the sink does a few large calls per second (one batch per 500 ms window, forwarder
//! reads of thousands of rows); std threads and one reader thread per connection keep the code
//! small and add no runtime. Pipelining is still there: [`Client::call_async`] returns a
//! [`Pending`] at once, so one thread can keep many requests in flight on the one connection.

mod conn;
mod error;
mod proto;

pub use conn::Address;
pub use error::{codes, Error};

use conn::{Conn, Waiter};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// User and password for chap-sha1 authentication.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password into logs.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// How to reach an instance.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub address: Address,
    /// `None` connects as `guest`.
    pub credentials: Option<Credentials>,
    /// Bound on connect, greeting and authentication.
    pub connect_timeout: Duration,
    /// Bound on the wait for each answer.
    pub request_timeout: Duration,
}

impl ClientConfig {
    pub fn new(address: Address) -> ClientConfig {
        ClientConfig {
            address,
            credentials: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A reconnecting client. Cheap to clone; clones share the connection.
///
/// When the connection breaks, requests in flight fail with [`Error::Disconnected`] and the next
/// request opens a new connection. The client never re-sends by itself: only the caller knows
/// whether a call is idempotent (see [`Error::is_retryable`]).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClientConfig,
    conn: Mutex<Option<Arc<Conn>>>,
}

/// A request in flight; [`Pending::wait`] returns its result.
pub struct Pending {
    waiter: Waiter,
    timeout: Duration,
}

impl Pending {
    /// Waits for the answer and decodes the returned values (the `IPROTO_DATA` array, one element
    /// per value the function returned: use a tuple such as `(u64,)`; a function that returns
    /// nothing gives an empty array, e.g. a `Vec<u8>` that is empty).
    pub fn wait<R: DeserializeOwned>(self) -> Result<R, Error> {
        let packet = self.waiter.recv(self.timeout)?;
        let data = check(&self.waiter.addr, &self.waiter.request, &packet)?;
        rmp_serde::from_slice(data.unwrap_or(&[0x90])).map_err(|source| Error::Decode {
            request: self.waiter.request.clone(),
            target: std::any::type_name::<R>(),
            source,
        })
    }
}

/// Maps an answer to its data or to the server's error.
fn check<'a>(addr: &str, request: &str, packet: &'a [u8]) -> Result<Option<&'a [u8]>, Error> {
    let resp = proto::parse_response(packet).map_err(|e| Error::Protocol {
        addr: addr.to_owned(),
        reason: e.0,
    })?;
    match resp.error_code() {
        None => Ok(resp.data),
        Some(code) => Err(Error::Server {
            addr: addr.to_owned(),
            request: request.to_owned(),
            code,
            message: resp.error.unwrap_or_default(),
        }),
    }
}

impl Client {
    /// Connects (and authenticates) at once, so that a wrong address or password shows up here.
    pub fn connect(cfg: ClientConfig) -> Result<Client, Error> {
        let client = Client {
            inner: Arc::new(Inner {
                cfg,
                conn: Mutex::new(None),
            }),
        };
        client.conn()?;
        Ok(client)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// The live connection, opening a new one if there is none or it broke.
    fn conn(&self) -> Result<Arc<Conn>, Error> {
        // Held while connecting so that concurrent callers do not all open connections.
        let mut slot = self.inner.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            if !c.is_broken() {
                return Ok(c.clone());
            }
            tracing::info!(addr = %c.addr, "reconnecting to Tarantool");
        }
        *slot = None;
        let c = Arc::new(self.open()?);
        *slot = Some(c.clone());
        Ok(c)
    }

    fn open(&self) -> Result<Conn, Error> {
        let cfg = &self.inner.cfg;
        let (conn, salt) = Conn::open(&cfg.address, cfg.connect_timeout)?;
        if let Some(cred) = &cfg.credentials {
            let scramble = proto::scramble(&salt, &cred.password);
            let w = conn.send("AUTH", proto::REQ_AUTH, |b| {
                proto::body_auth(b, &cred.user, &scramble)
            })?;
            let packet = w.recv(cfg.connect_timeout)?;
            if let Err(e) = check(&conn.addr, "AUTH", &packet) {
                return Err(match e {
                    Error::Server { code, message, .. } => Error::Auth {
                        addr: conn.addr.clone(),
                        user: cred.user.clone(),
                        code,
                        message,
                    },
                    other => other,
                });
            }
        }
        Ok(conn)
    }

    /// The server's greeting banner (e.g. `Tarantool 2.6.0 (Binary) <uuid>`).
    pub fn server_banner(&self) -> Result<String, Error> {
        Ok(self.conn()?.banner.clone())
    }

    pub fn ping(&self) -> Result<(), Error> {
        let w = self
            .conn()?
            .send("PING", proto::REQ_PING, proto::body_ping)?;
        let packet = w.recv(self.inner.cfg.request_timeout)?;
        check(&w.addr, "PING", &packet).map(|_| ())
    }

    /// Sends an IPROTO_CALL and returns without waiting. `args` must encode as an array.
    pub fn call_async<A: Serialize + ?Sized>(
        &self,
        func: &str,
        args: &A,
    ) -> Result<Pending, Error> {
        self.send(proto::REQ_CALL, func, || format!("CALL {func}"), args)
    }

    /// Sends an EVAL of Lua `expr` (its arguments are `...`) and returns without waiting.
    pub fn eval_async<A: Serialize + ?Sized>(
        &self,
        expr: &str,
        args: &A,
    ) -> Result<Pending, Error> {
        self.send(proto::REQ_EVAL, expr, || "EVAL".to_owned(), args)
    }

    /// CALL and wait: see [`Pending::wait`] for the shape of `R`.
    pub fn call<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        func: &str,
        args: &A,
    ) -> Result<R, Error> {
        self.call_async(func, args)?.wait()
    }

    /// EVAL and wait: see [`Pending::wait`] for the shape of `R`.
    pub fn eval<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        expr: &str,
        args: &A,
    ) -> Result<R, Error> {
        self.eval_async(expr, args)?.wait()
    }

    fn send<A: Serialize + ?Sized>(
        &self,
        req_type: u8,
        target: &str,
        request: impl Fn() -> String,
        args: &A,
    ) -> Result<Pending, Error> {
        let encoded = rmp_serde::to_vec(args).map_err(|source| Error::Encode {
            request: request(),
            source,
        })?;
        if !proto::is_array(&encoded) {
            return Err(Error::ArgsNotArray { request: request() });
        }
        let conn = self.conn()?;
        let waiter = conn.send(&request(), req_type, |b| {
            b.reserve(encoded.len() + target.len() + 8);
            proto::body_call(b, req_type, target, &encoded)
        })?;
        Ok(Pending {
            waiter,
            timeout: self.inner.cfg.request_timeout,
        })
    }
}

/// Returns the input after one msgpack value (for tests that walk raw msgpack).
#[cfg(test)]
pub(crate) fn skip_value(buf: &[u8]) -> Result<&[u8], proto::ProtoError> {
    proto::skip(buf)
}
