//! `GET /api/v1/series` (and `/api/v1/series.csv`): one link's rollups from the local store,
//! aggregated over epoch-aligned steps, and the page's view of `/api/v1/links`.
//!
//! A step that is a multiple of an aggregate tier's width (10 s, 5 min, 1 h; see the sink's
//! `store::tiers`) is served from the coarsest such tier, else from the rollups. Both go through
//! the same merge ([`TierRow::merge`]), so counts, sums, min, max and complete flags are the same
//! whichever serves; means differ only by float rounding.
use std::{fmt::Write as _, sync::Arc, time::Duration};

use axum::{
    extract::{rejection::QueryRejection, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use linkpulse_sink::store::{TierRow, TIERS_NS};
use serde::Serialize;
use serde_json::{json, Value};

use super::web::Web;

/// Points one request may return.
pub const MAX_POINTS: u64 = 10_000;
/// Rollups one request may read when no tier serves the step (27.7 h of one link at 500 ms):
/// reading scans the store's rows by seq ranges (schema v5), ~3 µs per row of any link in the
/// range (~9 s for a day of one of 16 links), so this bounds a request to
/// seconds. Tiers need no bound: a tier row per step at most (MAX_POINTS).
pub const MAX_WINDOWS: u64 = 200_000;
/// Windows per store call (a page; pages never split a window start).
const PAGE: u32 = 20_000;
/// Bound on one whole request against the store.
const STORE_DEADLINE: Duration = Duration::from_secs(30);

pub fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn bad(msg: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, msg)
}

/// Query of `/api/v1/series`. Times are UTC milliseconds since the UNIX epoch.
pub struct SeriesQuery {
    link: Option<String>,
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
    partial: Option<String>,
    source: Option<String>,
}

/// One point: the windows whose start lies in `[start_ms, end_ms)`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Point {
    pub start_ms: i64,
    pub end_ms: i64,
    /// Every window of the step is stored and complete.
    pub complete: bool,
    pub windows: u32,
    pub windows_expected: u32,
    pub down_bytes: u64,
    pub up_bytes: u64,
    pub down_packets: u64,
    pub up_packets: u64,
    /// Mean rate over the windows present (each window's mean, weighted by its width).
    pub down_rate_mean_bps: f64,
    pub up_rate_mean_bps: f64,
    /// Highest bin rate of any window.
    pub down_rate_peak_bps: f64,
    pub up_rate_peak_bps: f64,
    /// Highest of the windows' p99 bin rates: an upper bound of them, not the step's p99
    /// (percentiles do not merge).
    pub down_rate_p99_max_bps: f64,
    pub up_rate_p99_max_bps: f64,
    pub rtt_min_ms: Option<f64>,
    pub rtt_mean_ms: Option<f64>,
    pub rtt_max_ms: Option<f64>,
    /// Highest of the windows' RTT p99s (same caveat).
    pub rtt_p99_max_ms: Option<f64>,
    /// Probes lost / sent (both ways), when probes were sent.
    pub loss_ratio: Option<f64>,
    /// Passive TCP RTT: samples, min, mean (weighted by samples), max; None without a sample.
    pub tcp_rtt_samples: u64,
    pub tcp_rtt_min_ms: Option<f64>,
    pub tcp_rtt_mean_ms: Option<f64>,
    pub tcp_rtt_max_ms: Option<f64>,
    /// One-way delays of the probes whose both clocks were synchronised: count, mean (weighted
    /// by count) and highest window max per direction, the largest error bound; None without.
    pub owd_samples: u64,
    pub owd_up_mean_ms: Option<f64>,
    pub owd_up_max_ms: Option<f64>,
    pub owd_down_mean_ms: Option<f64>,
    pub owd_down_max_ms: Option<f64>,
    pub owd_error_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Series {
    pub link: usize,
    pub label: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub step_ms: i64,
    pub window_ms: i64,
    /// Width of the stored rows that served the request: `window_ms` for the rollups, else the
    /// tier's width.
    pub source_ms: i64,
    pub partial: bool,
    pub points: Vec<Point>,
}

/// Validated parameters.
#[derive(Debug, PartialEq)]
pub struct Params {
    pub link: usize,
    pub from_ms: i64,
    pub to_ms: i64,
    pub step_ms: i64,
    pub partial: bool,
    /// The tier that serves the step (ns), `None` for the rollups.
    pub tier_ns: Option<u64>,
}

/// The coarsest tier whose width divides the step.
pub fn tier_for(step_ms: i64) -> Option<u64> {
    let step_ns = step_ms as u64 * 1_000_000;
    TIERS_NS
        .iter()
        .rev()
        .copied()
        .find(|w| step_ns.is_multiple_of(*w))
}

fn int(name: &str, v: Option<&String>) -> Result<i64, String> {
    let v = v.ok_or_else(|| {
        format!("missing parameter `{name}`: give UTC milliseconds since the epoch (from, to) and a step in ms, e.g. ?link=0&from=1700000000000&to=1700000300000&step=500")
    })?;
    v.trim().parse::<i64>().map_err(|_| {
        format!("`{name}` = {v:?} is not an integer: use milliseconds (UTC since the epoch for from/to)")
    })
}

/// Checks the query against the configured links and the rollup width.
pub fn params(
    q: &SeriesQuery,
    links: &[(usize, String, String)],
    window_ms: i64,
) -> Result<Params, String> {
    let names = || {
        links
            .iter()
            .map(|(i, l, _)| format!("{i} ({l})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let l = q.link.as_deref().map(str::trim).ok_or_else(|| {
        format!(
            "missing parameter `link`: give a link's index, label or interface; configured: {}",
            names()
        )
    })?;
    let link = links
        .iter()
        .find(|(i, label, ifname)| l == i.to_string() || l == label || l == ifname)
        .map(|(i, _, _)| *i)
        .ok_or_else(|| {
            format!(
                "unknown link {l:?}: use an index, label or interface of a configured link: {}",
                names()
            )
        })?;
    let from_ms = int("from", q.from.as_ref())?;
    let to_ms = int("to", q.to.as_ref())?;
    let step_ms = int("step", q.step.as_ref())?;
    if from_ms < 0 || to_ms < 0 {
        return Err("from and to must be ≥ 0 (UTC milliseconds since the epoch)".into());
    }
    if from_ms >= to_ms {
        return Err(format!(
            "from ({from_ms}) must be before to ({to_ms}): swap them or widen the range"
        ));
    }
    if step_ms <= 0 || step_ms % window_ms != 0 {
        return Err(format!(
            "step = {step_ms} ms is not a positive multiple of the rollup width ({window_ms} ms): use e.g. {window_ms}, {} or {}",
            window_ms * 2,
            window_ms * 120
        ));
    }
    let raw = match q.source.as_deref() {
        None | Some("auto") => false,
        Some("raw") => true,
        Some(v) => return Err(format!("source = {v:?}: use auto (default) or raw")),
    };
    let tier_ns = if raw { None } else { tier_for(step_ms) };
    let span = to_ms - from_ms;
    let windows = (span as u64).div_ceil(window_ms as u64);
    if tier_ns.is_none() && windows > MAX_WINDOWS {
        return Err(format!(
            "the range spans {windows} rollup windows; one request reads at most {MAX_WINDOWS} ({} h at {window_ms} ms) unless the step is a multiple of {} s (served from the aggregate tiers, source=auto): narrow the range or use such a step",
            MAX_WINDOWS as i64 * window_ms / 3_600_000,
            TIERS_NS[0] / 1_000_000_000
        ));
    }
    let points = (span as u64).div_ceil(step_ms as u64) + 1;
    if points > MAX_POINTS {
        let min_step = (span as u64 / MAX_POINTS).div_ceil(window_ms as u64) * window_ms as u64;
        return Err(format!(
            "the range gives {points} points at step {step_ms} ms; at most {MAX_POINTS}: use a step of at least {min_step} ms"
        ));
    }
    let partial = match q.partial.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(v) => return Err(format!("partial = {v:?}: use true or false")),
    };
    Ok(Params {
        link,
        from_ms,
        to_ms,
        step_ms,
        partial,
        tier_ns,
    })
}

/// Aggregates stored rows (rollups as [`TierRow::from_rollup`], or tier buckets), in time
/// order, into epoch-aligned steps. Points are stamped at their start, so the same range gives the
/// same points on every request. A point is complete when every window of the step is stored and
/// complete; without `partial` only complete points are returned.
pub fn aggregate(rows: &[TierRow], p: &Params, window_ms: i64) -> Vec<Point> {
    let step_ns = p.step_ms as u64 * 1_000_000;
    let expected = (p.step_ms / window_ms) as u32;
    let mut out: Vec<Point> = Vec::new();
    let mut acc: Option<TierRow> = None;
    let point = |a: &TierRow| -> Point {
        let start_ms = (a.start_ns / 1_000_000) as i64;
        let windows = u32::try_from(a.windows).unwrap_or(u32::MAX);
        let ms = |v: u64| v as f64 / 1e6;
        let mean = |sum: f64| {
            if a.width_ns > 0 {
                sum / a.width_ns as f64
            } else {
                0.0
            }
        };
        Point {
            start_ms,
            end_ms: start_ms + p.step_ms,
            complete: a.windows_complete == a.windows && windows == expected,
            windows,
            windows_expected: expected,
            down_bytes: a.rx_bytes,
            up_bytes: a.tx_bytes,
            down_packets: a.rx_packets,
            up_packets: a.tx_packets,
            down_rate_mean_bps: mean(a.rx_rate_wsum),
            up_rate_mean_bps: mean(a.tx_rate_wsum),
            down_rate_peak_bps: a.rx_rate_peak_bps,
            up_rate_peak_bps: a.tx_rate_peak_bps,
            down_rate_p99_max_bps: a.rx_rate_p99_max_bps,
            up_rate_p99_max_bps: a.tx_rate_p99_max_bps,
            rtt_min_ms: a.rtt_min_ns.map(ms),
            rtt_mean_ms: (a.rtt_weight > 0).then(|| a.rtt_wsum / a.rtt_weight as f64 / 1e6),
            rtt_max_ms: a.rtt_max_ns.map(ms),
            rtt_p99_max_ms: a.rtt_p99_max_ns.map(ms),
            loss_ratio: (a.probes_sent > 0).then(|| a.probes_lost as f64 / a.probes_sent as f64),
            tcp_rtt_samples: a.tcp_rtt_samples,
            tcp_rtt_min_ms: a.tcp_rtt_min_ns.map(ms),
            tcp_rtt_mean_ms: (a.tcp_rtt_samples > 0)
                .then(|| a.tcp_rtt_wsum / a.tcp_rtt_samples as f64 / 1e6),
            tcp_rtt_max_ms: a.tcp_rtt_max_ns.map(ms),
            owd_samples: a.owd_samples,
            owd_up_mean_ms: (a.owd_samples > 0).then(|| a.owd_up_wsum / a.owd_samples as f64 / 1e6),
            owd_up_max_ms: a.owd_up_max_ns.map(|v| v as f64 / 1e6),
            owd_down_mean_ms: (a.owd_samples > 0)
                .then(|| a.owd_down_wsum / a.owd_samples as f64 / 1e6),
            owd_down_max_ms: a.owd_down_max_ns.map(|v| v as f64 / 1e6),
            owd_error_ms: a.owd_error_max_ns.map(ms),
        }
    };
    for r in rows {
        let start_ns = r.start_ns - r.start_ns % step_ns;
        match acc.as_mut() {
            Some(a) if a.start_ns == start_ns => a.merge(r),
            _ => {
                if let Some(a) = acc.take() {
                    out.push(point(&a));
                }
                acc = Some(TierRow {
                    start_ns,
                    ..r.clone()
                });
            }
        }
    }
    if let Some(a) = acc {
        out.push(point(&a));
    }
    if !p.partial {
        out.retain(|pt| pt.complete);
    }
    out
}

/// Reads and aggregates, or the error response.
async fn query(web: &Arc<Web>, q: &SeriesQuery) -> Result<Series, Response> {
    let Some(window_ns) = web.window_ns else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the local store is disabled ([store] enabled = false): enable it for history",
        ));
    };
    let window_ms = (window_ns / 1_000_000) as i64;
    let links: Vec<(usize, String, String)> = web
        .shared
        .links()
        .into_iter()
        .map(|l| (l.index, l.config.label, l.config.interface))
        .collect();
    let p = params(q, &links, window_ms).map_err(bad)?;
    let label = links
        .iter()
        .find(|l| l.0 == p.link)
        .map(|l| l.1.clone())
        .unwrap_or_default();
    let Some(store) = web.shared.store_handle() else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the local store is not up (starting, or restarting after a failure): retry in a few seconds; /metrics linkpulse_store_up tells",
        ));
    };
    // Whole steps: from rounded down, to rounded up, so points never cover half a step.
    let from_ns = (p.from_ms - p.from_ms.rem_euclid(p.step_ms)) as u64 * 1_000_000;
    let to_ns =
        (p.to_ms + (p.step_ms - p.to_ms.rem_euclid(p.step_ms)) % p.step_ms) as u64 * 1_000_000;
    let link_id = p.link as u32;
    let tier_ns = p.tier_ns;
    let read = tokio::task::spawn_blocking(move || {
        let mut rows = Vec::new();
        let mut from = from_ns;
        loop {
            let n = match tier_ns {
                Some(w) => {
                    let page = store.read_tier(w, link_id, from, to_ns, PAGE)?;
                    if let Some(last) = page.last() {
                        from = last.start_ns + 1;
                    }
                    let n = page.len();
                    rows.extend(page);
                    n
                }
                None => {
                    let page = store.read_range(link_id, from, to_ns, PAGE)?;
                    if let Some(last) = page.last() {
                        from = last.window_start_ns + 1;
                    }
                    rows.extend(page.iter().map(TierRow::from_rollup));
                    page.len()
                }
            };
            if n < PAGE as usize || rows.len() as u64 > MAX_WINDOWS * 2 {
                return Ok::<_, linkpulse_sink::store::StoreError>(rows);
            }
        }
    });
    let rows = match tokio::time::timeout(STORE_DEADLINE, read).await {
        Ok(Ok(Ok(rows))) => rows,
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "series: store read failed");
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the local store did not answer: {e}"),
            ));
        }
        Ok(Err(e)) => {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the store read stopped: {e}"),
            ))
        }
        Err(_) => {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the local store did not answer within {} s: retry, or narrow the range",
                    STORE_DEADLINE.as_secs()
                ),
            ))
        }
    };
    Ok(Series {
        link: p.link,
        label,
        from_ms: p.from_ms,
        to_ms: p.to_ms,
        step_ms: p.step_ms,
        window_ms,
        source_ms: p.tier_ns.map_or(window_ms, |w| (w / 1_000_000) as i64),
        partial: p.partial,
        points: aggregate(&rows, &p, window_ms),
    })
}

/// The query as pairs: axum's own rejections are plain text, and a key given twice must get a
/// JSON 400 that says so.
type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn series_query(q: Pairs) -> Result<SeriesQuery, String> {
    let Query(pairs) =
        q.map_err(|e| format!("unreadable query string ({e}): use ?link=&from=&to=&step="))?;
    let mut sq = SeriesQuery {
        link: None,
        from: None,
        to: None,
        step: None,
        partial: None,
        source: None,
    };
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "link" => &mut sq.link,
            "from" => &mut sq.from,
            "to" => &mut sq.to,
            "step" => &mut sq.step,
            "partial" => &mut sq.partial,
            "source" => &mut sq.source,
            _ => {
                return Err(format!(
                    "unknown parameter `{k}`: use link, from, to, step, partial and source"
                ))
            }
        };
        if slot.replace(v).is_some() {
            return Err(format!("parameter `{k}` is given twice: give it once"));
        }
    }
    Ok(sq)
}

pub async fn series(State(web): State<Arc<Web>>, q: Pairs) -> Response {
    let q = match series_query(q) {
        Ok(q) => q,
        Err(m) => return bad(m),
    };
    match query(&web, &q).await {
        Ok(s) => Json(s).into_response(),
        Err(r) => r,
    }
}

/// The CSV header and one line per point.
pub fn csv(s: &Series) -> String {
    let mut o = String::with_capacity(64 + s.points.len() * 160);
    o.push_str("link,label,start_ms,end_ms,complete,windows,windows_expected,down_bytes,up_bytes,down_packets,up_packets,down_rate_mean_bps,up_rate_mean_bps,down_rate_peak_bps,up_rate_peak_bps,rtt_min_ms,rtt_mean_ms,rtt_max_ms,loss_ratio,down_rate_p99_max_bps,up_rate_p99_max_bps,rtt_p99_max_ms,tcp_rtt_samples,tcp_rtt_min_ms,tcp_rtt_mean_ms,tcp_rtt_max_ms,owd_samples,owd_up_mean_ms,owd_up_max_ms,owd_down_mean_ms,owd_down_max_ms,owd_error_ms\n");
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    // Labels are config text: quote them, doubling quotes.
    let label = format!("\"{}\"", s.label.replace('"', "\"\""));
    for p in &s.points {
        let _ = writeln!(
            o,
            "{},{label},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            s.link,
            p.start_ms,
            p.end_ms,
            p.complete,
            p.windows,
            p.windows_expected,
            p.down_bytes,
            p.up_bytes,
            p.down_packets,
            p.up_packets,
            p.down_rate_mean_bps,
            p.up_rate_mean_bps,
            p.down_rate_peak_bps,
            p.up_rate_peak_bps,
            opt(p.rtt_min_ms),
            opt(p.rtt_mean_ms),
            opt(p.rtt_max_ms),
            opt(p.loss_ratio),
            p.down_rate_p99_max_bps,
            p.up_rate_p99_max_bps,
            opt(p.rtt_p99_max_ms),
            p.tcp_rtt_samples,
            opt(p.tcp_rtt_min_ms),
            opt(p.tcp_rtt_mean_ms),
            opt(p.tcp_rtt_max_ms),
            p.owd_samples,
            opt(p.owd_up_mean_ms),
            opt(p.owd_up_max_ms),
            opt(p.owd_down_mean_ms),
            opt(p.owd_down_max_ms),
            opt(p.owd_error_ms),
        );
    }
    o
}

pub async fn series_csv(State(web): State<Arc<Web>>, q: Pairs) -> Response {
    let q = match series_query(q) {
        Ok(q) => q,
        Err(m) => return bad(m),
    };
    match query(&web, &q).await {
        Ok(s) => {
            let name = format!(
                "attachment; filename=\"linkpulse-{}-{}-{}.csv\"",
                s.link, s.from_ms, s.to_ms
            );
            (
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                    (header::CONTENT_DISPOSITION, name),
                ],
                csv(&s),
            )
                .into_response()
        }
        Err(r) => r,
    }
}

/// `GET /api/v1/links`: each link as the daemon knows it, plus the overview's fields (throughput
/// of the last complete second; RTT and loss when a prober reports them, null otherwise).
pub async fn links(State(web): State<Arc<Web>>) -> Response {
    let s = &web.shared;
    let probes = s.probe.view();
    let links: Vec<Value> = s
        .links()
        .into_iter()
        .map(|l| {
            let (down, up) = l.last_second.map_or((None, None), |sec| {
                (Some(sec.down.bits_per_s), Some(sec.up.bits_per_s))
            });
            let mut v = serde_json::to_value(&l).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("throughput_down_bps".into(), json!(down));
                m.insert("throughput_up_bps".into(), json!(up));
                // Health and RTT from the link's STAMP probes (null when it is not probed);
                // loss_ratio is over every settled probe since the daemon started.
                let p = probes.iter().find(|p| p.index == l.index);
                m.insert(
                    "rtt_ms".into(),
                    json!(p.and_then(|p| p.rtt_mean_ns).map(|ns| ns as f64 / 1e6)),
                );
                m.insert(
                    "loss_ratio".into(),
                    json!(p.filter(|p| p.probes_sent > 0).map(|p| {
                        (p.lost_up + p.lost_down + p.lost_unattributed) as f64
                            / p.probes_sent as f64
                    })),
                );
                m.insert("health".into(), json!(p.map(|p| p.state)));
                m.insert(
                    "health_since_utc_ns".into(),
                    json!(p.map(|p| p.state_since_utc_ns)),
                );
            }
            v
        })
        .collect();
    Json(json!({
        "router_id": s.router_id,
        "site": s.site,
        "bin_width_ns": s.bin_width_ns,
        "clock": s.clock(),
        "links": links,
        "probes": probes,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(link: &str, from: &str, to: &str, step: &str) -> SeriesQuery {
        SeriesQuery {
            link: Some(link.into()),
            from: Some(from.into()),
            to: Some(to.into()),
            step: Some(step.into()),
            partial: None,
            source: None,
        }
    }

    fn links() -> Vec<(usize, String, String)> {
        vec![
            (0, "A".into(), "wwan0".into()),
            (1, "B".into(), "wwan1".into()),
        ]
    }

    #[test]
    fn bad_parameters_say_what_and_how() {
        let e = |q: SeriesQuery| params(&q, &links(), 500).expect_err("refused");
        assert!(e(q("9", "0", "1000", "500")).contains("unknown link"));
        assert!(e(q("0", "2000", "1000", "500")).contains("must be before"));
        assert!(e(q("0", "0", "1000", "700")).contains("multiple of the rollup width"));
        assert!(e(q("0", "0", "1000", "0")).contains("multiple"));
        assert!(e(q("0", "x", "1000", "500")).contains("not an integer"));
        // 30 days: fine from a tier, refused from the rollups.
        let ok = params(&q("0", "0", "2592000000", "600000"), &links(), 500).expect("tier");
        assert_eq!(ok.tier_ns, Some(300_000_000_000));
        let raw = SeriesQuery {
            source: Some("raw".into()),
            ..q("0", "0", "2592000000", "600000")
        };
        assert!(e(raw).contains("narrow the range"));
        assert!(e(q("0", "0", "2592000000", "1500")).contains("narrow the range"));
        let bad_source = SeriesQuery {
            source: Some("tier".into()),
            ..q("0", "0", "1000", "500")
        };
        assert!(e(bad_source).contains("auto"));
        assert_eq!(tier_for(500), None);
        assert_eq!(tier_for(20_000), Some(10_000_000_000));
        assert_eq!(tier_for(600_000), Some(300_000_000_000));
        assert_eq!(tier_for(7_200_000), Some(3_600_000_000_000));
        assert!(e(q("0", "0", "86400000", "500")).contains("use a step of at least"));
        let ok = params(&q("wwan1", "0", "1000", "500"), &links(), 500).expect("ok");
        assert_eq!(ok.link, 1);
        let ok = params(&q("B", "0", "1000", "1000"), &links(), 500).expect("ok");
        assert_eq!((ok.link, ok.step_ms), (1, 1000));
    }

    use linkpulse_sink::store::Rollup;

    fn win(start_ms: u64, complete: bool, rx: u64, mean: f64, peak: f64) -> Rollup {
        Rollup {
            window_start_ns: start_ms * 1_000_000,
            window_ns: 500_000_000,
            complete,
            rx_bytes: rx,
            rx_packets: 1,
            rx_rate_mean_bps: mean,
            rx_rate_peak_bps: peak,
            rtt_min_ns: Some(10_000_000),
            rtt_max_ns: Some(30_000_000 + start_ms),
            ..Rollup::default()
        }
    }

    #[test]
    fn aggregation_is_exact_and_aligned() {
        let rows: Vec<TierRow> = [
            win(1000, true, 10, 100.0, 500.0),
            win(1500, true, 20, 300.0, 900.0),
            win(2000, true, 5, 50.0, 60.0),
            win(2500, false, 7, 70.0, 80.0),
        ]
        .iter()
        .map(TierRow::from_rollup)
        .collect();
        let mut p = Params {
            link: 0,
            from_ms: 1000,
            to_ms: 3000,
            step_ms: 1000,
            partial: true,
            tier_ns: None,
        };
        let pts = aggregate(&rows, &p, 500);
        assert_eq!(pts.len(), 2);
        assert_eq!((pts[0].start_ms, pts[0].end_ms), (1000, 2000));
        assert_eq!(pts[0].down_bytes, 30);
        assert_eq!(pts[0].down_packets, 2);
        assert_eq!(pts[0].down_rate_mean_bps, 200.0);
        assert_eq!(pts[0].down_rate_peak_bps, 900.0);
        assert_eq!(pts[0].rtt_min_ms, Some(10.0));
        assert_eq!(pts[0].rtt_max_ms, Some(30.0015));
        // No TCP RTT or one-way delay in these windows: null, not 0.
        assert_eq!(pts[0].tcp_rtt_samples, 0);
        assert_eq!(
            (pts[0].tcp_rtt_mean_ms, pts[0].owd_up_mean_ms),
            (None, None)
        );
        assert_eq!((pts[0].owd_down_max_ms, pts[0].owd_error_ms), (None, None));
        assert!(pts[0].complete);
        assert!(
            !pts[1].complete,
            "an incomplete window makes the point partial"
        );
        assert_eq!(pts[1].down_bytes, 12);
        // Without partial: incomplete windows and partial points are left out.
        p.partial = false;
        let pts = aggregate(&rows, &p, 500);
        assert_eq!(pts.len(), 1);
        assert_eq!(pts[0].start_ms, 1000);
        // A missing window makes a point partial too.
        let pts = aggregate(&rows[1..], &Params { partial: true, ..p }, 500);
        assert_eq!(pts[0].windows, 1);
        assert!(!pts[0].complete);
    }

    /// Steps served by a tier equal the same steps from the rollups (the store's test checks
    /// that its tiers equal these buckets).
    #[test]
    fn tier_buckets_give_the_points_the_rollups_give() {
        let t0 = 1_790_000_123_000u64; // not aligned to any tier
        let rows: Vec<Rollup> = (0..30_000u64)
            .map(|i| Rollup {
                rtt_mean_ns: (i % 5 != 0).then_some(20_000_000 + i * 13),
                rtt_p99_ns: (i % 3 != 0).then_some(40_000_000 + i % 977),
                probes_sent_fwd: 10,
                probes_lost_fwd: (i % 4) as u32,
                tx_bytes: i * 3,
                tx_rate_mean_bps: (i % 101) as f64 * 0.37,
                tcp_rtt_samples: i % 4,
                tcp_rtt_min_ns: (!i.is_multiple_of(4)).then_some(30_000_000 + i % 31),
                tcp_rtt_mean_ns: (!i.is_multiple_of(4)).then_some(35_000_000 + i * 7),
                tcp_rtt_max_ns: (!i.is_multiple_of(4)).then_some(40_000_000 + i % 37),
                owd_samples: (i % 6) as u32,
                owd_up_mean_ns: (!i.is_multiple_of(6))
                    .then_some(3_000_000 - (i % 13) as i64 * 500_000),
                owd_up_max_ns: (!i.is_multiple_of(6)).then_some(4_000_000 + (i % 17) as i64),
                owd_down_mean_ns: (!i.is_multiple_of(6)).then_some(20_000_000 + i as i64),
                owd_down_max_ns: (!i.is_multiple_of(6)).then_some(21_000_000 - (i % 19) as i64),
                owd_error_ns: (!i.is_multiple_of(6)).then_some(500_000 + i % 5),
                ..win(
                    t0 + i * 500,
                    i % 9001 != 0,
                    i,
                    (i % 7) as f64 * 1.3,
                    (i % 11) as f64,
                )
            })
            .collect();
        let raw: Vec<TierRow> = rows.iter().map(TierRow::from_rollup).collect();
        for (step_ms, tier) in [(10_000i64, 10_000_000_000u64), (600_000, 300_000_000_000)] {
            let mut buckets: Vec<TierRow> = Vec::new();
            for r in &raw {
                let start = r.start_ns - r.start_ns % tier;
                match buckets.last_mut() {
                    Some(b) if b.start_ns == start => b.merge(r),
                    _ => buckets.push(TierRow {
                        start_ns: start,
                        tier_ns: tier,
                        ..r.clone()
                    }),
                }
            }
            for partial in [false, true] {
                let p = Params {
                    link: 0,
                    from_ms: 0,
                    to_ms: 0,
                    step_ms,
                    partial,
                    tier_ns: Some(tier),
                };
                let a = aggregate(&raw, &p, 500);
                let b = aggregate(&buckets, &p, 500);
                assert!(a.len() > 10, "{step_ms} {partial}: {}", a.len());
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(&b) {
                    let close = |u: f64, v: f64| (u - v).abs() <= 1e-9 * u.abs().max(1.0);
                    assert!(close(x.down_rate_mean_bps, y.down_rate_mean_bps));
                    assert!(close(x.up_rate_mean_bps, y.up_rate_mean_bps));
                    assert_eq!(x.rtt_mean_ms.is_some(), y.rtt_mean_ms.is_some());
                    for (u, v) in [
                        (x.rtt_mean_ms, y.rtt_mean_ms),
                        (x.tcp_rtt_mean_ms, y.tcp_rtt_mean_ms),
                        (x.owd_up_mean_ms, y.owd_up_mean_ms),
                        (x.owd_down_mean_ms, y.owd_down_mean_ms),
                    ] {
                        assert_eq!(u.is_some(), v.is_some());
                        assert!(close(u.unwrap_or(0.0), v.unwrap_or(0.0)));
                    }
                    assert!(x.tcp_rtt_samples > 0 && x.owd_samples > 0);
                    assert!(x.owd_up_max_ms.is_some() && x.owd_error_ms.is_some());
                    let exact = |p: &Point| Point {
                        down_rate_mean_bps: 0.0,
                        up_rate_mean_bps: 0.0,
                        rtt_mean_ms: None,
                        tcp_rtt_mean_ms: None,
                        owd_up_mean_ms: None,
                        owd_down_mean_ms: None,
                        ..p.clone()
                    };
                    assert_eq!(exact(x), exact(y));
                }
                if !partial {
                    assert!(a
                        .iter()
                        .all(|p| p.complete && p.windows == p.windows_expected));
                } else {
                    assert!(a.iter().any(|p| !p.complete), "partial points stay visible");
                }
            }
        }
    }
}
