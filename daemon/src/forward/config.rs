//! `[[forward]]`: destinations the rollups of the local store are forwarded to (central
//! InfluxDB). Parsed with the rest of the config; every error names the key's line and column.
use std::{ops::Range, path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use linkpulse_sink::forward::{DEFAULT_IN_FLIGHT, MAX_BATCH_POINTS, MAX_IN_FLIGHT};

/// `[[forward]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawForward {
    /// Names the destination's cursor in the store and its metrics (required).
    name: Spanned<String>,
    /// `influx_v1` (default) or `influx_v2`.
    #[serde(default = "default_kind")]
    kind: Spanned<String>,
    /// Base URL, `http://` or `https://` (required).
    url: Spanned<String>,
    /// v1: database. Default `linkpulse`.
    #[serde(default)]
    database: Option<Spanned<String>>,
    /// v1: user (optional; then `password_file` is required).
    #[serde(default)]
    user: Option<Spanned<String>>,
    #[serde(default)]
    password_file: Option<Spanned<String>>,
    /// v2: organisation, bucket and token file (all required).
    #[serde(default)]
    org: Option<Spanned<String>>,
    #[serde(default)]
    bucket: Option<Spanned<String>>,
    #[serde(default)]
    token_file: Option<Spanned<String>>,
    /// PEM CA file for https (default: the bundled web PKI roots).
    #[serde(default)]
    ca_file: Option<Spanned<String>>,
    #[serde(default)]
    insecure_skip_verify: bool,
    /// Default 5000 (1..=5000).
    #[serde(default = "default_batch_points")]
    batch_points: Spanned<u32>,
    /// Requests on the wire at once during a backlog. Default 2 (1..=8).
    #[serde(default = "default_max_in_flight")]
    max_in_flight: Spanned<u32>,
    /// Default 30 s (1..=600).
    #[serde(default = "default_timeout_s")]
    timeout_s: Spanned<u64>,
    /// Share of the measured uplink capacity the backfill may use, 0..=1; 0 = unpaced.
    /// Default 0.25.
    #[serde(default = "default_pace_share")]
    pace_share: Spanned<f64>,
    /// Longest wait between retries after failures, seconds (1..=3600). Default 30.
    #[serde(default = "default_retry_max_s")]
    retry_max_s: Spanned<u64>,
    /// Default true.
    #[serde(default = "default_true")]
    enabled: bool,
}

fn default_retry_max_s() -> Spanned<u64> {
    Spanned::new(0..0, 30)
}

fn default_kind() -> Spanned<String> {
    Spanned::new(0..0, "influx_v1".into())
}
fn default_batch_points() -> Spanned<u32> {
    Spanned::new(0..0, MAX_BATCH_POINTS)
}
fn default_max_in_flight() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_IN_FLIGHT)
}
fn default_timeout_s() -> Spanned<u64> {
    Spanned::new(0..0, 30)
}
fn default_pace_share() -> Spanned<f64> {
    Spanned::new(0..0, DEFAULT_PACE_SHARE)
}
fn default_true() -> bool {
    true
}

impl RawForward {
    pub(crate) fn name_span(&self) -> Range<usize> {
        self.name.span()
    }
}

/// Default share of the uplink a backfill may take.
pub const DEFAULT_PACE_SHARE: f64 = 0.25;

/// The write API of a validated destination.
#[derive(Debug, Clone, PartialEq)]
pub enum DestKind {
    V1 {
        database: String,
        /// User and the file holding its password (first line).
        user: Option<(String, PathBuf)>,
    },
    V2 {
        org: String,
        bucket: String,
        token_file: PathBuf,
    },
}

/// A validated `[[forward]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardDest {
    pub name: String,
    pub url: String,
    pub kind: DestKind,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub batch_points: u32,
    pub max_in_flight: u32,
    pub timeout: Duration,
    /// 0 = unpaced.
    pub pace_share: f64,
    /// Ceiling of the retry backoff.
    pub retry_max: Duration,
}

/// Validates the `[[forward]]` entries; `err` builds an error at a span (None: the file's start).
pub(crate) fn validate<E>(
    raw: &[RawForward],
    err: impl Fn(Option<Range<usize>>, String) -> E,
) -> Result<Vec<ForwardDest>, E> {
    let mut out: Vec<ForwardDest> = Vec::new();
    let mut names: Vec<(String, Range<usize>)> = Vec::new();
    for f in raw {
        let name = f.name.get_ref().trim().to_string();
        let ok_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok_name {
            return Err(err(
                Some(f.name.span()),
                format!("forward.name = {name:?}: use 1 to 64 characters of A-Z a-z 0-9 _ . - (it names the destination's cursor and metrics)"),
            ));
        }
        if names.iter().any(|(n, _)| *n == name) {
            return Err(err(
                Some(f.name.span()),
                format!("forward.name = {name:?} is used by another [[forward]]: each destination needs its own name (its cursor is kept under it)"),
            ));
        }
        names.push((name.clone(), f.name.span()));
        let url = f.url.get_ref().trim().trim_end_matches('/').to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
            return Err(err(
                Some(f.url.span()),
                format!("forward.url = {url:?}: give the server's base URL with http:// or https://, e.g. \"https://influx.example:8086\""),
            ));
        }
        let not_for = |v: &Option<Spanned<String>>, key: &str, kind: &str| match v {
            Some(s) => Err(err(
                Some(s.span()),
                format!("forward.{key} belongs to kind = \"{kind}\": remove it or change `kind`"),
            )),
            None => Ok(()),
        };
        let required = |v: &Option<Spanned<String>>, key: &str| -> Result<String, E> {
            match v {
                Some(s) if !s.get_ref().trim().is_empty() => Ok(s.get_ref().trim().to_string()),
                Some(s) => Err(err(
                    Some(s.span()),
                    format!("forward.{key} is empty: set it"),
                )),
                None => Err(err(
                    Some(f.name.span()),
                    format!("destination {name:?} (kind = \"influx_v2\") needs `{key}`: add it to its [[forward]]"),
                )),
            }
        };
        let kind = match f.kind.get_ref().as_str() {
            "influx_v1" => {
                not_for(&f.org, "org", "influx_v2")?;
                not_for(&f.bucket, "bucket", "influx_v2")?;
                not_for(&f.token_file, "token_file", "influx_v2")?;
                let database = match &f.database {
                    Some(d) if d.get_ref().trim().is_empty() => {
                        return Err(err(
                            Some(d.span()),
                            "forward.database is empty: name the InfluxDB database".into(),
                        ))
                    }
                    Some(d) => d.get_ref().trim().to_string(),
                    None => "linkpulse".to_string(),
                };
                let user = match (&f.user, &f.password_file) {
                    (None, None) => None,
                    (Some(u), Some(p)) if !u.get_ref().is_empty() => {
                        Some((u.get_ref().clone(), PathBuf::from(p.get_ref())))
                    }
                    (Some(u), None) => {
                        return Err(err(
                            Some(u.span()),
                            "forward.user needs `password_file` (a file whose first line is the password)".into(),
                        ))
                    }
                    (None, Some(p)) => {
                        return Err(err(
                            Some(p.span()),
                            "forward.password_file needs `user`".into(),
                        ))
                    }
                    (Some(u), Some(_)) => {
                        return Err(err(
                            Some(u.span()),
                            "forward.user is empty: set it or remove it and `password_file`"
                                .into(),
                        ))
                    }
                };
                DestKind::V1 { database, user }
            }
            "influx_v2" => {
                not_for(&f.database, "database", "influx_v1")?;
                not_for(&f.user, "user", "influx_v1")?;
                not_for(&f.password_file, "password_file", "influx_v1")?;
                DestKind::V2 {
                    org: required(&f.org, "org")?,
                    bucket: required(&f.bucket, "bucket")?,
                    token_file: PathBuf::from(required(&f.token_file, "token_file")?),
                }
            }
            other => {
                return Err(err(
                    Some(f.kind.span()),
                    format!("forward.kind = {other:?}: use \"influx_v1\" (InfluxDB 1.x /write) or \"influx_v2\" (1.8+, 2.x, 3.x /api/v2/write with a token)"),
                ))
            }
        };
        let batch = *f.batch_points.get_ref();
        if !(1..=MAX_BATCH_POINTS).contains(&batch) {
            return Err(err(
                Some(f.batch_points.span()),
                format!("forward.batch_points = {batch}: use 1 to {MAX_BATCH_POINTS} (default {MAX_BATCH_POINTS})"),
            ));
        }
        let in_flight = *f.max_in_flight.get_ref();
        if !(1..=MAX_IN_FLIGHT).contains(&in_flight) {
            return Err(err(
                Some(f.max_in_flight.span()),
                format!("forward.max_in_flight = {in_flight}: use 1 to {MAX_IN_FLIGHT} (default {DEFAULT_IN_FLIGHT})"),
            ));
        }
        let timeout = *f.timeout_s.get_ref();
        if !(1..=600).contains(&timeout) {
            return Err(err(
                Some(f.timeout_s.span()),
                format!("forward.timeout_s = {timeout}: use 1 to 600 (default 30)"),
            ));
        }
        let share = *f.pace_share.get_ref();
        if !(0.0..=1.0).contains(&share) {
            return Err(err(
                Some(f.pace_share.span()),
                format!("forward.pace_share = {share}: use a share of the uplink between 0 (unpaced) and 1 (default {DEFAULT_PACE_SHARE})"),
            ));
        }
        let retry = *f.retry_max_s.get_ref();
        if !(1..=3600).contains(&retry) {
            return Err(err(
                Some(f.retry_max_s.span()),
                format!("forward.retry_max_s = {retry}: use 1 to 3600 (default 30)"),
            ));
        }
        if let Some(ca) = &f.ca_file {
            if !url.starts_with("https://") {
                return Err(err(
                    Some(ca.span()),
                    "forward.ca_file is only used with an https:// url: remove it or use https"
                        .into(),
                ));
            }
        }
        if !f.enabled {
            continue;
        }
        out.push(ForwardDest {
            name,
            url,
            kind,
            ca_file: f.ca_file.as_ref().map(|c| PathBuf::from(c.get_ref())),
            insecure_skip_verify: f.insecure_skip_verify,
            batch_points: batch,
            max_in_flight: in_flight,
            timeout: Duration::from_secs(timeout),
            pace_share: share,
            retry_max: Duration::from_secs(retry),
        });
    }
    Ok(out)
}
