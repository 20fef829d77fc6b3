//! The write request to InfluxDB.
//!
//! Why `ureq` (3.x, rustls with ring, webpki roots): the forwarder is one blocking thread per
//! destination, like the rest of the sink, so an async stack (tokio + hyper + reqwest) would add
//! a runtime for a few requests per second; reqwest's default TLS backend (aws-lc-rs) also needs
//! cmake and a C toolchain for the router's target. ureq is a small blocking client with
//! keep-alive; ring is a plain `cc` build; the bundled webpki roots work on a router without
//! /etc/ssl. A hand-written HTTP/1.1 client was the alternative: chunked replies, keep-alive and
//! TLS would have been ours to get right.

use super::{BasicAuth, ForwardError, Kind, TlsOptions};
use base64::Engine;
use std::time::Duration;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::Agent;

/// Longest error body kept (InfluxDB's JSON errors are short; a proxy's HTML page is cut).
const BODY_LIMIT: u64 = 4096;

/// An answer: status and (the start of) the body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// A connection pool to one write endpoint with its fixed query and headers.
pub struct Transport {
    agent: Agent,
    /// Full write URL without the query, e.g. `http://host:8086/write`.
    pub url: String,
    query: Vec<(&'static str, String)>,
    authorization: Option<String>,
}

impl Transport {
    pub fn new(
        name: &str,
        base_url: &str,
        kind: &Kind,
        token: Option<&str>,
        timeout: Duration,
        tls: &TlsOptions,
        connections: u32,
    ) -> Result<Transport, ForwardError> {
        let base = base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ForwardError::Config {
                name: name.to_owned(),
                reason: format!(
                    "url `{base_url}` must start with http:// or https:// (e.g. http://influx.example:8086)"
                ),
            });
        }
        let (path, query, authorization) = match kind {
            Kind::V1 { db, auth } => {
                // Basic auth, which InfluxDB 1.x accepts like `u=`/`p=`, keeps the password out
                // of the URL and so out of access logs and proxies.
                let authorization = auth.as_ref().map(|BasicAuth { user, password }| {
                    let raw = format!("{user}:{password}");
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(raw)
                    )
                });
                (
                    "/write",
                    vec![("db", db.clone()), ("precision", "ns".to_owned())],
                    authorization,
                )
            }
            Kind::V2 { org, bucket, .. } => (
                "/api/v2/write",
                vec![
                    ("org", org.clone()),
                    ("bucket", bucket.clone()),
                    ("precision", "ns".to_owned()),
                ],
                token.map(|t| format!("Token {t}")),
            ),
        };
        let root_certs = match &tls.ca_file {
            None => RootCerts::WebPki,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| ForwardError::CaFile {
                    name: name.to_owned(),
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .collect::<Result<_, _>>()
                    .map_err(|e| ForwardError::CaFile {
                        name: name.to_owned(),
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if certs.is_empty() {
                    return Err(ForwardError::CaFile {
                        name: name.to_owned(),
                        path: path.clone(),
                        reason: "no CERTIFICATE block in it".to_owned(),
                    });
                }
                RootCerts::new_with_certs(&certs)
            }
        };
        let tls_config = TlsConfig::builder()
            .root_certs(root_certs)
            .disable_verification(tls.insecure_skip_verify)
            .build();
        let agent: Agent = Agent::config_builder()
            .timeout_global(Some(timeout))
            // Statuses are classified by the forwarder, not turned into errors.
            .http_status_as_error(false)
            // No proxy from the environment: the daemon's environment is not the operator's
            // shell, and a stray http_proxy would silently reroute the uplink.
            .proxy(None)
            // One kept-alive connection per request that may be on the wire at once.
            .max_idle_connections_per_host(connections as usize)
            .tls_config(tls_config)
            .build()
            .into();
        Ok(Transport {
            agent,
            url: format!("{base}{path}"),
            query,
            authorization,
        })
    }

    /// Replaces the `Authorization` value (a v2 token re-read from its file).
    pub fn set_token(&mut self, token: &str) {
        self.authorization = Some(format!("Token {token}"));
    }

    /// POSTs a gzip'ed line-protocol body.
    pub fn post_gzip(&self, body: &[u8]) -> Result<Reply, ureq::Error> {
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "text/plain; charset=utf-8")
            .header("Content-Encoding", "gzip");
        for (k, v) in &self.query {
            req = req.query(*k, v);
        }
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        let mut resp = req.send(body)?;
        let status = resp.status().as_u16();
        // Read (and so drain) the body, so the connection can be reused.
        let body = resp
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_string()
            .unwrap_or_else(|e| format!("(unreadable body: {e})"));
        Ok(Reply {
            status,
            body: body.trim().to_owned(),
        })
    }
}
