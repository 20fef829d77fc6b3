//! IPROTO framing for Tarantool 2.6: greeting, chap-sha1 scramble, request packets, response parsing.
//!
//! Only what linkpulse uses is here: PING, AUTH, CALL (0x0a) and EVAL. Everything else is done by
//! stored functions, so the client never needs SELECT/REPLACE or the schema id dance.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Request types (`IPROTO_*` in Tarantool's `iproto_constants.h`).
pub(crate) const REQ_AUTH: u8 = 0x07;
pub(crate) const REQ_EVAL: u8 = 0x08;
pub(crate) const REQ_CALL: u8 = 0x0a;
pub(crate) const REQ_PING: u8 = 0x40;

/// Header keys.
const KEY_REQUEST_TYPE: u8 = 0x00;
const KEY_SYNC: u8 = 0x01;
/// Body keys.
const KEY_TUPLE: u8 = 0x21;
const KEY_FUNCTION_NAME: u8 = 0x22;
const KEY_USER_NAME: u8 = 0x23;
const KEY_EXPR: u8 = 0x27;
const KEY_DATA: u8 = 0x30;
const KEY_ERROR_24: u8 = 0x31;

/// A response code with this bit set is an error; the low bits are the error code (`ER_*`).
const ERROR_FLAG: u64 = 0x8000;

/// The greeting is two 64-byte lines: a banner and the base64 salt.
pub(crate) const GREETING_LEN: usize = 128;

/// Why a greeting or a packet could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtoError(pub String);

fn perr(msg: impl Into<String>) -> ProtoError {
    ProtoError(msg.into())
}

/// What the greeting tells: the server banner (version) and the auth salt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Greeting {
    pub banner: String,
    pub salt: Vec<u8>,
}

pub(crate) fn parse_greeting(raw: &[u8; GREETING_LEN]) -> Result<Greeting, ProtoError> {
    let banner = std::str::from_utf8(&raw[..64])
        .map_err(|_| perr("banner is not UTF-8"))?
        .trim_end()
        .to_owned();
    if !banner.starts_with("Tarantool ") {
        return Err(perr(format!(
            "banner {banner:?} does not start with `Tarantool`"
        )));
    }
    if !banner.contains("(Binary)") {
        return Err(perr(format!(
            "banner {banner:?} is not the binary protocol (a console port?)"
        )));
    }
    let salt_b64 = std::str::from_utf8(&raw[64..])
        .map_err(|_| perr("salt line is not UTF-8"))?
        .trim();
    let salt = base64::engine::general_purpose::STANDARD
        .decode(salt_b64)
        .map_err(|e| perr(format!("salt is not base64: {e}")))?;
    if salt.len() < 20 {
        return Err(perr(format!(
            "salt has {} bytes, expected at least 20",
            salt.len()
        )));
    }
    Ok(Greeting { banner, salt })
}

/// chap-sha1: `sha1(password) XOR sha1(salt[..20] ++ sha1(sha1(password)))`.
pub(crate) fn scramble(salt: &[u8], password: &str) -> [u8; 20] {
    let hash1: [u8; 20] = Sha1::digest(password.as_bytes()).into();
    let hash2: [u8; 20] = Sha1::digest(hash1).into();
    let mut h = Sha1::new();
    h.update(&salt[..20]);
    h.update(hash2);
    let hash3: [u8; 20] = h.finalize().into();
    let mut out = [0u8; 20];
    for i in 0..20 {
        out[i] = hash1[i] ^ hash3[i];
    }
    out
}

// Writes into a Vec cannot fail, so the `rmp::encode` results are discarded on purpose below.

/// Starts a packet: 5 bytes reserved for the length, then the header map. Finish with [`finish`].
pub(crate) fn begin(buf: &mut Vec<u8>, req_type: u8, sync: u64) {
    buf.clear();
    buf.extend_from_slice(&[0xce, 0, 0, 0, 0]);
    let _ = rmp::encode::write_map_len(buf, 2);
    let _ = rmp::encode::write_uint(buf, KEY_REQUEST_TYPE.into());
    let _ = rmp::encode::write_uint(buf, req_type.into());
    let _ = rmp::encode::write_uint(buf, KEY_SYNC.into());
    let _ = rmp::encode::write_uint(buf, sync);
}

/// Patches the length prefix (always the 5-byte uint32 form, which Tarantool accepts).
pub(crate) fn finish(buf: &mut [u8]) -> Result<(), ProtoError> {
    let len = u32::try_from(buf.len() - 5)
        .map_err(|_| perr(format!("request of {} bytes exceeds 4 GiB", buf.len())))?;
    buf[1..5].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

pub(crate) fn body_ping(buf: &mut Vec<u8>) {
    let _ = rmp::encode::write_map_len(buf, 0);
}

pub(crate) fn body_auth(buf: &mut Vec<u8>, user: &str, scramble: &[u8; 20]) {
    let _ = rmp::encode::write_map_len(buf, 2);
    let _ = rmp::encode::write_uint(buf, KEY_USER_NAME.into());
    let _ = rmp::encode::write_str(buf, user);
    let _ = rmp::encode::write_uint(buf, KEY_TUPLE.into());
    let _ = rmp::encode::write_array_len(buf, 2);
    let _ = rmp::encode::write_str(buf, "chap-sha1");
    let _ = rmp::encode::write_bin(buf, scramble);
}

/// CALL or EVAL body; `args` is an already encoded msgpack array.
pub(crate) fn body_call(buf: &mut Vec<u8>, req_type: u8, name_or_expr: &str, args: &[u8]) {
    let key = if req_type == REQ_EVAL {
        KEY_EXPR
    } else {
        KEY_FUNCTION_NAME
    };
    let _ = rmp::encode::write_map_len(buf, 2);
    let _ = rmp::encode::write_uint(buf, key.into());
    let _ = rmp::encode::write_str(buf, name_or_expr);
    let _ = rmp::encode::write_uint(buf, KEY_TUPLE.into());
    buf.extend_from_slice(args);
}

/// True when `encoded` starts with a msgpack array marker: Tarantool wants the arguments as one.
pub(crate) fn is_array(encoded: &[u8]) -> bool {
    matches!(
        encoded.first().map(|&b| rmp::Marker::from_u8(b)),
        Some(rmp::Marker::FixArray(_) | rmp::Marker::Array16 | rmp::Marker::Array32)
    )
}

/// Reads the length prefix that precedes every packet from the first bytes of the stream.
/// Returns `(prefix_len, packet_len)`, or `None` when more bytes are needed.
pub(crate) fn packet_len(prefix: &[u8]) -> Result<Option<(usize, usize)>, ProtoError> {
    let Some(&first) = prefix.first() else {
        return Ok(None);
    };
    let need = match rmp::Marker::from_u8(first) {
        rmp::Marker::FixPos(n) => return Ok(Some((1, n.into()))),
        rmp::Marker::U8 => 2,
        rmp::Marker::U16 => 3,
        rmp::Marker::U32 => 5,
        rmp::Marker::U64 => 9,
        m => {
            return Err(perr(format!(
                "length prefix has marker {m:?}, not an unsigned int"
            )))
        }
    };
    if prefix.len() < need {
        return Ok(None);
    }
    let mut rd = &prefix[..need];
    let len: u64 =
        rmp::decode::read_int(&mut rd).map_err(|e| perr(format!("length prefix: {e}")))?;
    let len = usize::try_from(len).map_err(|_| perr("packet length overflows usize"))?;
    Ok(Some((need, len)))
}

/// The parts of a response linkpulse reads.
#[derive(Debug)]
pub(crate) struct Response<'a> {
    pub code: u64,
    pub sync: u64,
    /// The raw msgpack of `IPROTO_DATA` (an array of results), if present.
    pub data: Option<&'a [u8]>,
    /// `IPROTO_ERROR_24`: the error message.
    pub error: Option<String>,
}

impl Response<'_> {
    /// `Some(code)` when the server answered with an error.
    pub fn error_code(&self) -> Option<u32> {
        (self.code & ERROR_FLAG != 0).then_some((self.code & 0x7fff) as u32)
    }
}

/// Reads only the header (for routing by sync in the reader thread).
pub(crate) fn parse_sync(packet: &[u8]) -> Result<u64, ProtoError> {
    let mut rd = packet;
    let n = rmp::decode::read_map_len(&mut rd).map_err(|e| perr(format!("header: {e}")))?;
    for _ in 0..n {
        let key: u64 =
            rmp::decode::read_int(&mut rd).map_err(|e| perr(format!("header key: {e}")))?;
        if key == u64::from(KEY_SYNC) {
            return rmp::decode::read_int(&mut rd).map_err(|e| perr(format!("sync: {e}")));
        }
        rd = skip(rd)?;
    }
    Err(perr("header has no sync"))
}

/// Parses a whole response packet (header map, then an optional body map).
pub(crate) fn parse_response(packet: &[u8]) -> Result<Response<'_>, ProtoError> {
    let mut rd = packet;
    let mut resp = Response {
        code: 0,
        sync: 0,
        data: None,
        error: None,
    };
    let n = rmp::decode::read_map_len(&mut rd).map_err(|e| perr(format!("header: {e}")))?;
    for _ in 0..n {
        let key: u64 =
            rmp::decode::read_int(&mut rd).map_err(|e| perr(format!("header key: {e}")))?;
        match key {
            k if k == u64::from(KEY_REQUEST_TYPE) => {
                resp.code =
                    rmp::decode::read_int(&mut rd).map_err(|e| perr(format!("code: {e}")))?
            }
            k if k == u64::from(KEY_SYNC) => {
                resp.sync =
                    rmp::decode::read_int(&mut rd).map_err(|e| perr(format!("sync: {e}")))?
            }
            _ => rd = skip(rd)?,
        }
    }
    if rd.is_empty() {
        return Ok(resp);
    }
    let n = rmp::decode::read_map_len(&mut rd).map_err(|e| perr(format!("body: {e}")))?;
    for _ in 0..n {
        let key: u64 =
            rmp::decode::read_int(&mut rd).map_err(|e| perr(format!("body key: {e}")))?;
        let rest = skip(rd)?;
        let value = &rd[..rd.len() - rest.len()];
        match key {
            k if k == u64::from(KEY_DATA) => resp.data = Some(value),
            k if k == u64::from(KEY_ERROR_24) => {
                let mut v = value;
                let len = rmp::decode::read_str_len(&mut v)
                    .map_err(|e| perr(format!("error message: {e}")))?;
                let text = v
                    .get(..len as usize)
                    .ok_or_else(|| perr("error message truncated"))?;
                resp.error = Some(String::from_utf8_lossy(text).into_owned());
            }
            _ => {}
        }
        rd = rest;
    }
    Ok(resp)
}

/// Returns the input after one msgpack value.
pub(crate) fn skip(buf: &[u8]) -> Result<&[u8], ProtoError> {
    use rmp::Marker as M;
    let short = || perr("truncated msgpack value");
    let (&b, rest) = buf.split_first().ok_or_else(short)?;
    let be = |n: usize| -> Result<usize, ProtoError> {
        let s = rest.get(..n).ok_or_else(short)?;
        Ok(s.iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x)))
    };
    let take = |hdr: usize, len: usize| -> Result<&[u8], ProtoError> {
        rest.get(hdr + len..).ok_or_else(short)
    };
    match M::from_u8(b) {
        M::FixPos(_) | M::FixNeg(_) | M::Null | M::True | M::False => Ok(rest),
        M::U8 | M::I8 => take(1, 0),
        M::U16 | M::I16 => take(2, 0),
        M::U32 | M::I32 | M::F32 => take(4, 0),
        M::U64 | M::I64 | M::F64 => take(8, 0),
        M::FixStr(n) => take(0, n.into()),
        M::Str8 | M::Bin8 => take(1, be(1)?),
        M::Str16 | M::Bin16 => take(2, be(2)?),
        M::Str32 | M::Bin32 => take(4, be(4)?),
        M::FixExt1 => take(1, 1),
        M::FixExt2 => take(1, 2),
        M::FixExt4 => take(1, 4),
        M::FixExt8 => take(1, 8),
        M::FixExt16 => take(1, 16),
        M::Ext8 => take(2, be(1)?),
        M::Ext16 => take(3, be(2)?),
        M::Ext32 => take(5, be(4)?),
        M::FixArray(n) => skip_n(rest, n.into()),
        M::Array16 => skip_n(take(2, 0)?, be(2)?),
        M::Array32 => skip_n(take(4, 0)?, be(4)?),
        M::FixMap(n) => skip_n(rest, 2 * usize::from(n)),
        M::Map16 => skip_n(take(2, 0)?, 2 * be(2)?),
        M::Map32 => skip_n(take(4, 0)?, 2 * be(4)?),
        M::Reserved => Err(perr("reserved msgpack marker 0xc1")),
    }
}

fn skip_n(mut buf: &[u8], n: usize) -> Result<&[u8], ProtoError> {
    for _ in 0..n {
        buf = skip(buf)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(banner: &str, salt: &str) -> [u8; GREETING_LEN] {
        let mut g = [b' '; GREETING_LEN];
        g[..banner.len()].copy_from_slice(banner.as_bytes());
        g[63] = b'\n';
        g[64..64 + salt.len()].copy_from_slice(salt.as_bytes());
        g[127] = b'\n';
        g
    }

    #[test]
    fn greeting_parses_and_rejects_console() {
        let salt = "QK2HoFZGXTXBq2vFj7soCsHqTo6PGTF575ssUBAJLAI=";
        let g = parse_greeting(&greeting(
            "Tarantool 2.6.0 (Binary) 7170b4af-c72f-4f07-8729-08fc678543a1",
            salt,
        ))
        .expect("valid greeting");
        assert!(g.banner.starts_with("Tarantool 2.6.0"));
        assert_eq!(g.salt.len(), 32);
        let err = parse_greeting(&greeting("Tarantool 2.6.0 (Lua console)", salt)).unwrap_err();
        assert!(err.0.contains("console"), "{err}");
        assert!(parse_greeting(&greeting("SSH-2.0-OpenSSH", salt)).is_err());
    }

    #[test]
    fn scramble_matches_reference() {
        // Reference computed with Python's hashlib from the chap-sha1 definition.
        let salt = [7u8; 20];
        let s = scramble(&salt, "secret");
        let hex: String = s.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, REFERENCE_SCRAMBLE);
    }
    const REFERENCE_SCRAMBLE: &str = include_str!("scramble_reference.txt");

    #[test]
    fn skip_walks_nested_values() {
        let v = rmp_serde::to_vec(&(1u8, "ab", vec![1.5f64, 2.5], Some(u64::MAX), (true, -3i8)))
            .expect("encode");
        let mut tail = v.clone();
        tail.push(0xc0);
        assert_eq!(skip(&tail).expect("skip"), &[0xc0]);
        assert!(
            skip(&v[..v.len() - 1]).is_err(),
            "truncated input must be rejected"
        );
    }

    #[test]
    fn packet_roundtrip_and_length_prefix() {
        let mut buf = Vec::new();
        begin(&mut buf, REQ_PING, 300);
        body_ping(&mut buf);
        finish(&mut buf).expect("finish");
        let (pre, len) = packet_len(&buf).expect("prefix").expect("complete");
        assert_eq!((pre, len), (5, buf.len() - 5));
        assert_eq!(parse_sync(&buf[5..]).expect("sync"), 300);
        assert_eq!(packet_len(&[0xce, 0, 0]).expect("partial"), None);
        assert!(packet_len(&[0xa1]).is_err());
    }

    #[test]
    fn error_response_is_parsed() {
        // {0x00: 0x8021, 0x01: 9} {0x31: "Procedure 'x' is not defined"}
        let mut p = Vec::new();
        rmp::encode::write_map_len(&mut p, 2).unwrap();
        rmp::encode::write_uint(&mut p, 0).unwrap();
        rmp::encode::write_uint(&mut p, 0x8021).unwrap();
        rmp::encode::write_uint(&mut p, 1).unwrap();
        rmp::encode::write_uint(&mut p, 9).unwrap();
        rmp::encode::write_map_len(&mut p, 1).unwrap();
        rmp::encode::write_uint(&mut p, 0x31).unwrap();
        rmp::encode::write_str(&mut p, "Procedure 'x' is not defined").unwrap();
        let r = parse_response(&p).expect("parse");
        assert_eq!((r.sync, r.error_code()), (9, Some(0x21)));
        assert_eq!(r.error.as_deref(), Some("Procedure 'x' is not defined"));
        assert!(r.data.is_none());
    }
}
