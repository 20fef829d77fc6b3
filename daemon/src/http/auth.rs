//! Access to the API off loopback: a bearer token read from `[http] token_file`, and for the
//! page a login that exchanges the token for a session cookie (a random id, kept server-side
//! in a bounded table with an expiry; HttpOnly, SameSite=Strict, Secure under TLS).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Json,
};
use rand::RngCore;
use serde::Deserialize;
use serde_json::json;

use super::web::Web;

/// Sessions kept at once: the oldest is evicted when a new login needs room.
pub const MAX_SESSIONS: usize = 64;
/// A session's life.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const COOKIE: &str = "lp_session";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the API token file {path} ({source}): create it with a long random secret (e.g. `openssl rand -hex 32 > {path}`) readable by linkpulse, or fix [http] token_file")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API token file {path} holds fewer than 16 characters: put a long random secret in it (e.g. `openssl rand -hex 32 > {path}`)")]
    Short { path: PathBuf },
}

pub struct Auth {
    token: Vec<u8>,
    sessions: Mutex<HashMap<[u8; 32], Instant>>,
    /// Cookies get `Secure` (only sent over HTTPS). Browsers refuse Secure cookies from plain
    /// http:// origins other than localhost, so without TLS the flag would break the login.
    secure: bool,
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Auth {
    pub fn load(path: &Path, secure: bool) -> Result<Auth, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let token = text.trim();
        if token.len() < 16 {
            return Err(AuthError::Short {
                path: path.to_path_buf(),
            });
        }
        Ok(Self::with_token(token, secure))
    }

    pub fn with_token(token: &str, secure: bool) -> Auth {
        Auth {
            token: token.as_bytes().to_vec(),
            sessions: Mutex::new(HashMap::new()),
            secure,
        }
    }

    fn token_ok(&self, t: &str) -> bool {
        same(t.trim().as_bytes(), &self.token)
    }

    fn new_session(&self) -> String {
        let mut id = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let now = Instant::now();
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|_, exp| *exp > now);
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                s.remove(&oldest);
            }
        }
        s.insert(id, now + SESSION_TTL);
        hex(&id)
    }

    fn session_ok(&self, id: &str) -> bool {
        let Some(id) = unhex(id) else { return false };
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.get(&id).is_some_and(|exp| *exp > Instant::now())
    }

    fn end_session(&self, id: &str) {
        if let Some(id) = unhex(id) {
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }

    pub fn sessions(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether the request carries the token or a live session.
    pub fn allows(&self, h: &HeaderMap) -> bool {
        if let Some(t) = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            return self.token_ok(t);
        }
        session_cookie(h).is_some_and(|id| self.session_ok(id))
    }

    fn cookie(&self, value: &str, max_age: u64) -> String {
        format!(
            "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
            if self.secure { "; Secure" } else { "" }
        )
    }
}

fn session_cookie(h: &HeaderMap) -> Option<&str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix("lp_session="))
        .next()
}

/// Paths anyone may fetch: the page shell and its assets (no data), the OpenAPI document,
/// and the login itself.
fn public(path: &str) -> bool {
    path == "/"
        || path.starts_with("/assets/")
        || path == "/api/v1/openapi.json"
        || path == "/api/v1/login"
        || path == "/api/v1/logout"
}

pub fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({
            "error": "this linkpulse listens off loopback and needs the API token: send `Authorization: Bearer <token>` (the content of [http] token_file), or log in on the page",
        })),
    )
        .into_response()
}

/// The middleware: everything but the public paths needs credentials when a token is set.
pub async fn require(State(web): State<Arc<Web>>, req: Request, next: Next) -> Response {
    if let Some(auth) = &web.auth {
        if !public(req.uri().path()) && !auth.allows(req.headers()) {
            return unauthorized();
        }
    }
    next.run(req).await
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

/// `POST /api/v1/login` `{"token": "..."}` → 204 with the session cookie.
pub async fn login(State(web): State<Arc<Web>>, body: axum::body::Bytes) -> Response {
    let Some(auth) = &web.auth else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let Ok(l) = serde_json::from_slice::<Login>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "the login body must be JSON {\"token\": \"<the API token>\"}"})),
        )
            .into_response();
    };
    if !auth.token_ok(&l.token) {
        // Slows guessing down; the token is long and random anyway.
        tokio::time::sleep(Duration::from_millis(250)).await;
        tracing::warn!("login with a wrong token");
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "wrong token: use the content of the file [http] token_file names"})),
        )
            .into_response();
    }
    let id = auth.new_session();
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&auth.cookie(&id, SESSION_TTL.as_secs())) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `POST /api/v1/logout`: ends the session and clears the cookie.
pub async fn logout(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Some(auth) = &web.auth {
        if let Some(id) = session_cookie(&headers) {
            auth.end_session(id);
        }
        if let Ok(v) = HeaderValue::from_str(&auth.cookie("", 0)) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(k: header::HeaderName, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(k, HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn token_and_sessions() {
        let a = Auth::with_token("0123456789abcdef0123", true);
        assert!(a.allows(&headers(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef0123"
        )));
        assert!(!a.allows(&headers(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef0124"
        )));
        assert!(!a.allows(&HeaderMap::new()));
        let id = a.new_session();
        assert!(a.allows(&headers(header::COOKIE, &format!("x=1; lp_session={id}"))));
        assert!(!a.allows(&headers(
            header::COOKIE,
            &format!("lp_session={}", "0".repeat(64))
        )));
        a.end_session(&id);
        assert!(!a.allows(&headers(header::COOKIE, &format!("lp_session={id}"))));
        assert!(a.cookie("x", 1).contains("HttpOnly; SameSite=Strict"));
        assert!(a.cookie("x", 1).ends_with("; Secure"));
    }

    #[test]
    fn the_session_table_is_bounded() {
        let a = Auth::with_token("0123456789abcdef0123", false);
        let first = a.new_session();
        for _ in 0..MAX_SESSIONS {
            a.new_session();
        }
        assert_eq!(a.sessions(), MAX_SESSIONS);
        assert!(!a.session_ok(&first), "the oldest session was evicted");
    }

    #[test]
    fn short_or_missing_token_files_are_refused_with_the_fix() {
        let e = Auth::load(Path::new("/nonexistent/lp.token"), false)
            .err()
            .expect("missing file");
        assert!(e.to_string().contains("openssl rand"), "{e}");
    }
}
