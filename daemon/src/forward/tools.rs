//! `linkpulse export` and `linkpulse resync`: operators' tools over the local store.
//!
//! Both open the store of the configured `[store]`: the instance of the running daemon when it
//! holds the data dir (through its socket, read with the data dir's client secret), otherwise
//! they start the instance themselves for the duration of the command (and stop it after; the
//! daemon cannot start meanwhile: the data dir is locked). An external store is used as
//! configured.
use std::{io::Write, path::PathBuf};

use linkpulse_sink::{
    forward::Encoder,
    store::{LocalConfig, Rollup, Store, FIELDS},
};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "the store is disabled in the config ([store] enabled = false): there is nothing to read"
    )]
    NoStore,
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("store request failed: {0}")]
    Request(#[from] linkpulse_sink::store::StoreError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Output formats of `export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Comma-separated, a header line with the field names; window start as ns and RFC 3339.
    Csv,
    /// Influx line protocol, as the forwarder writes it.
    Lp,
    /// A JSON array of objects (the store's fields).
    Json,
}

/// Parses a time: RFC 3339 (`2026-11-22T05:00:00Z`, `2026-11-22T07:00:00.5+02:00`) or unix
/// seconds (`1795000000`, `1795000000.25`). Returns UTC ns since the epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || {
        format!("{s:?} is not a time: use RFC 3339 (e.g. 2026-11-22T05:00:00Z) or unix seconds (e.g. 1795000000)")
    };
    if s.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        // Unix seconds, exact to the ns (no float rounding).
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let secs: u64 = int.parse().map_err(|_| bad())?;
        if secs >= 9_200_000_000 || frac.len() > 9 || frac.contains('.') {
            return Err(bad());
        }
        let frac_ns: u64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<9}").parse().map_err(|_| bad())?
        };
        return Ok(secs * 1_000_000_000 + frac_ns);
    }
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        s.get(r)
            .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let mut i = 19;
    let mut frac_ns = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return Err(bad());
        }
        let mut padded = digits.chars().take(9).collect::<String>();
        while padded.len() < 9 {
            padded.push('0');
        }
        frac_ns = padded.parse().map_err(|_| bad())?;
    }
    let offset_s = match &s[i..] {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let v = oh * 3600 + om * 60;
            if o.starts_with('-') {
                -v
            } else {
                v
            }
        }
        _ => return Err(bad()),
    };
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let (y2, m2) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    if secs < 0 {
        return Err(format!("{s:?} is before 1970"));
    }
    Ok(secs as u64 * 1_000_000_000 + frac_ns as u64)
}

/// UTC ns → RFC 3339 with nanoseconds.
pub fn format_time(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ns % 1_000_000_000
    )
}

/// Opens the configured store (see the module doc).
pub fn open_store(cfg: &Config) -> Result<Store, ToolError> {
    let sc = cfg.store.as_ref().ok_or(ToolError::NoStore)?;
    match &sc.external {
        Some(x) => {
            let c = x.client_config().map_err(ToolError::Store)?;
            Store::connect_external(c).map_err(|e| ToolError::Store(format!("{}: {e}", x.address)))
        }
        None => {
            let (s, running) = Store::open_for_tool(LocalConfig::new(&sc.data_dir))
                .map_err(|e| ToolError::Store(format!("{}: {e}", sc.data_dir.display())))?;
            tracing::info!(
                data_dir = %sc.data_dir.display(),
                daemon_running = running,
                "store opened"
            );
            Ok(s)
        }
    }
}

/// Resolves `--link`: a configured interface name or label, or a link number.
pub fn resolve_link(cfg: &Config, link: &str) -> Result<u32, ToolError> {
    if let Some(i) = cfg
        .links
        .iter()
        .position(|l| l.interface == link || l.label == link)
    {
        return Ok(i as u32);
    }
    link.parse::<u32>().map_err(|_| {
        let names: Vec<&str> = cfg.links.iter().map(|l| l.interface.as_str()).collect();
        ToolError::Usage(format!(
            "--link {link:?} is neither a configured interface ({}) nor a link number",
            names.join(", ")
        ))
    })
}

/// Writes one link's windows with `from <= start < to` in `format`; returns the rows written.
pub fn export(
    store: &Store,
    cfg: &Config,
    link: u32,
    from_ns: u64,
    to_ns: u64,
    format: Format,
    out: &mut dyn Write,
) -> Result<u64, ToolError> {
    if from_ns >= to_ns {
        return Err(ToolError::Usage(format!(
            "--from ({}) must be before --to ({})",
            format_time(from_ns),
            format_time(to_ns)
        )));
    }
    let encoder = Encoder::new(&cfg.router_id, &cfg.site);
    let mut buf = Vec::with_capacity(1 << 16);
    let mut n = 0u64;
    match format {
        Format::Csv => {
            let names: Vec<&str> = FIELDS.iter().map(|f| f.0).collect();
            writeln!(out, "window_start_utc,{}", names.join(","))?;
        }
        Format::Json => out.write_all(b"[")?,
        Format::Lp => {}
    }
    let mut from = from_ns;
    loop {
        let rows = store.read_range(link, from, to_ns, 5000)?;
        let Some(last) = rows.last() else { break };
        from = last.window_start_ns + 1;
        for r in &rows {
            buf.clear();
            match format {
                Format::Csv => csv_line(&mut buf, r),
                Format::Lp => {
                    let mut st = linkpulse_sink::forward::EncodeStats::default();
                    encoder.encode(r, &mut buf, &mut st);
                }
                Format::Json => {
                    if n > 0 {
                        buf.push(b',');
                    }
                    buf.push(b'\n');
                    serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
                }
            }
            out.write_all(&buf)?;
            n += 1;
        }
    }
    if format == Format::Json {
        out.write_all(b"\n]\n")?;
    }
    out.flush()?;
    Ok(n)
}

fn csv_line(buf: &mut Vec<u8>, r: &Rollup) {
    let opt = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
    let _ = writeln!(
        buf,
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        format_time(r.window_start_ns),
        r.seq,
        r.link_id,
        r.window_start_ns,
        r.boot_tag,
        r.window_ns,
        r.complete,
        r.link_state,
        r.clock_state,
        r.clock_error_ns,
        r.rx_bytes,
        r.tx_bytes,
        r.rx_packets,
        r.tx_packets,
        r.rx_rate_mean_bps,
        r.rx_rate_peak_bps,
        r.rx_rate_p50_bps,
        r.rx_rate_p95_bps,
        r.rx_rate_p99_bps,
        r.tx_rate_mean_bps,
        r.tx_rate_peak_bps,
        r.tx_rate_p50_bps,
        r.tx_rate_p95_bps,
        r.tx_rate_p99_bps,
        opt(r.rtt_min_ns),
        opt(r.rtt_mean_ns),
        opt(r.rtt_max_ns),
        opt(r.rtt_p50_ns),
        opt(r.rtt_p99_ns),
        r.probes_sent_fwd,
        r.probes_lost_fwd,
        r.probes_sent_bwd,
        r.probes_lost_bwd,
    );
    // Schema v4 fields, same order as FIELDS; empty cells when not measured.
    let sopt = |v: Option<i64>| v.map_or(String::new(), |v| v.to_string());
    buf.pop(); // the newline
    let _ = writeln!(
        buf,
        ",{},{},{},{},{},{},{},{},{},{}",
        r.tcp_rtt_samples,
        opt(r.tcp_rtt_min_ns),
        opt(r.tcp_rtt_mean_ns),
        opt(r.tcp_rtt_max_ns),
        r.owd_samples,
        sopt(r.owd_up_mean_ns),
        sopt(r.owd_up_max_ns),
        sopt(r.owd_down_mean_ns),
        sopt(r.owd_down_max_ns),
        opt(r.owd_error_ns),
    );
}

/// The seq just before the first row (in seq order) whose window starts at or after `since`.
const RESYNC_FROM_LUA: &str = r#"
local since = ...
for _, t in box.space.rollups.index.primary:pairs({0}, {iterator = 'GT'}) do
    if t[3] >= since then return t[1] - 1, true end
end
return 0, false
"#;

/// What a resync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resync {
    pub old_cursor: u64,
    pub new_cursor: u64,
}

/// Moves `destination`'s cursor back so that every row with a window start at or after
/// `since_ns` is sent again (idempotent on the central side: same point identity, same
/// values). A cursor already below that is left alone.
pub fn resync(
    store: &Store,
    cfg: &Config,
    destination: &str,
    since_ns: u64,
) -> Result<Option<Resync>, ToolError> {
    if !cfg.forwards.iter().any(|f| f.name == destination) {
        let names: Vec<&str> = cfg.forwards.iter().map(|f| f.name.as_str()).collect();
        return Err(ToolError::Usage(format!(
            "--destination {destination:?} is not a configured [[forward]] (configured: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    let (target, found): (u64, bool) =
        store
            .client()
            .eval(RESYNC_FROM_LUA, &(since_ns,))
            .map_err(|source| linkpulse_sink::store::StoreError::Request {
                request: "resync start",
                source,
            })?;
    if !found {
        return Ok(None);
    }
    let old = store.get_cursor(destination)?.unwrap_or(0);
    let new = old.min(target);
    // A batch on the wire meanwhile cannot move it forward again: an acknowledgement moves the
    // cursor only from where that batch was read (`Store::advance_cursor`).
    store.set_cursor(destination, new)?;
    Ok(Some(Resync {
        old_cursor: old,
        new_cursor: new,
    }))
}

/// Where `export` writes: a file or stdout.
pub fn output(path: Option<&PathBuf>) -> Result<Box<dyn Write>, ToolError> {
    Ok(match path {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_both_notations() {
        assert_eq!(parse_time("0"), Ok(0));
        assert_eq!(parse_time("1795000000"), Ok(1_795_000_000_000_000_000));
        assert_eq!(parse_time("1795000000.25"), Ok(1_795_000_000_250_000_000));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_time("2026-11-22T05:00:00Z"),
            Ok(1_795_323_600_000_000_000)
        );
        assert_eq!(
            parse_time("2026-11-22T07:00:00.5+02:00"),
            Ok(1_795_323_600_500_000_000)
        );
        assert_eq!(
            parse_time("2000-02-29T12:00:00-01:30"),
            Ok(951_831_000_000_000_000)
        );
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-22 05:00",
            "-5",
            "2026-11-22T05:00:00",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("RFC 3339") || e.contains("1970"), "{bad}: {e}");
        }
    }

    #[test]
    fn times_format_back() {
        for t in [
            "2026-11-22T05:00:00.000000000Z",
            "2000-02-29T23:59:59.123456789Z",
            "1970-01-01T00:00:00.000000000Z",
        ] {
            assert_eq!(format_time(parse_time(t).expect(t)), t);
        }
    }
}
