//! `[probe]`: the STAMP Session-Sender of every modem link, its data-plan budget and the link
//! health thresholds. Probing is off unless a reflector is configured (globally or per link).
use std::{net::SocketAddr, ops::Range};

use serde::Deserialize;
use toml::Spanned;

use crate::stamp::{parse_listen, DEFAULT_PORT};

/// Highest probe rate per link.
pub const MAX_RATE_HZ: u32 = 10_000;

/// `[probe]` as written. Every key has a default; see deploy/linkpulse.toml.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProbe {
    /// Reflector `ADDR` or `ADDR:PORT` (IPv6 `[ADDR]:PORT`). Default: none (probing off).
    #[serde(default)]
    reflector: Option<Spanned<String>>,
    /// Reflector port when `reflector` has none. Default 862.
    #[serde(default = "default_port")]
    port: Spanned<u16>,
    /// Rate when the link is stable. Default 2 Hz.
    #[serde(default = "default_min_rate")]
    min_rate_hz: Spanned<u32>,
    /// Rate while the link changes (RTT jumps, loss). Default 50 Hz.
    #[serde(default = "default_max_rate")]
    max_rate_hz: Spanned<u32>,
    /// Probe bytes per link and day, both directions, IP headers included. Default 50 MB.
    #[serde(default = "default_budget")]
    budget_mb_per_day: Spanned<f64>,
    /// A probe without reply after this long is lost. Default 1000 ms.
    #[serde(default = "default_timeout")]
    loss_timeout_ms: Spanned<u64>,
    /// Loss over the last second at or above which a link is degraded. Default 5 %.
    #[serde(default = "default_degraded_loss")]
    degraded_loss_pct: Spanned<f64>,
    /// Mean RTT over the last second at or above which a link is degraded. Default 500 ms.
    #[serde(default = "default_degraded_rtt")]
    degraded_rtt_ms: Spanned<f64>,
    /// No reply for this long → down. Default 3000 ms.
    #[serde(default = "default_down_after")]
    down_after_ms: Spanned<u64>,
    /// Consecutive seconds a better state must hold before the link moves to it. Default 3.
    #[serde(default = "default_recover")]
    recover_s: Spanned<u32>,
}

impl Default for RawProbe {
    fn default() -> Self {
        Self {
            reflector: None,
            port: default_port(),
            min_rate_hz: default_min_rate(),
            max_rate_hz: default_max_rate(),
            budget_mb_per_day: default_budget(),
            loss_timeout_ms: default_timeout(),
            degraded_loss_pct: default_degraded_loss(),
            degraded_rtt_ms: default_degraded_rtt(),
            down_after_ms: default_down_after(),
            recover_s: default_recover(),
        }
    }
}

fn sp<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}
fn default_port() -> Spanned<u16> {
    sp(DEFAULT_PORT)
}
fn default_min_rate() -> Spanned<u32> {
    sp(2)
}
fn default_max_rate() -> Spanned<u32> {
    sp(50)
}
fn default_budget() -> Spanned<f64> {
    sp(50.0)
}
fn default_timeout() -> Spanned<u64> {
    sp(1000)
}
fn default_degraded_loss() -> Spanned<f64> {
    sp(5.0)
}
fn default_degraded_rtt() -> Spanned<f64> {
    sp(500.0)
}
fn default_down_after() -> Spanned<u64> {
    sp(3000)
}
fn default_recover() -> Spanned<u32> {
    sp(3)
}

/// Per-link probe keys inside `[[link]]` (all optional; they override `[probe]`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLinkProbe {
    /// This link's reflector; `"off"` disables probing on it.
    #[serde(default)]
    reflector: Option<Spanned<String>>,
    #[serde(default)]
    min_rate_hz: Option<Spanned<u32>>,
    #[serde(default)]
    max_rate_hz: Option<Spanned<u32>>,
    #[serde(default)]
    budget_mb_per_day: Option<Spanned<f64>>,
}

/// The validated probe settings of one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkProbeConfig {
    pub reflector: SocketAddr,
    pub min_rate_hz: u32,
    pub max_rate_hz: u32,
    /// Bytes per day (both directions, IP + UDP + STAMP).
    pub budget_bytes_per_day: u64,
}

/// The validated `[probe]` section (shared by all links).
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    pub loss_timeout_ns: u64,
    pub degraded_loss_pct: f64,
    pub degraded_rtt_ns: u64,
    pub down_after_ns: u64,
    pub recover_s: u32,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            loss_timeout_ns: 1_000_000_000,
            degraded_loss_pct: 5.0,
            degraded_rtt_ns: 500_000_000,
            down_after_ns: 3_000_000_000,
            recover_s: 3,
        }
    }
}

type Err = (Option<Range<usize>>, String);

fn reflector_addr(s: &Spanned<String>, port: u16) -> Result<SocketAddr, Err> {
    let text = s.get_ref().trim();
    let mut a = parse_listen(text)
        .map_err(|e| (Some(s.span()), format!("probe reflector {text:?}: {e}")))?;
    // `parse_listen` fills in 862; an explicit `port` applies when the address has none.
    if text.parse::<SocketAddr>().is_err() {
        a.set_port(port);
    }
    if a.ip().is_unspecified() || a.port() == 0 {
        return Err((
            Some(s.span()),
            format!("probe reflector {text:?} is not a reachable address: name the reflector's IP (e.g. \"192.0.2.10\" or \"[2001:db8::1]:862\")"),
        ));
    }
    Ok(a)
}

fn rate(v: &Spanned<u32>, key: &str) -> Result<u32, Err> {
    let r = *v.get_ref();
    if !(1..=MAX_RATE_HZ).contains(&r) {
        return Err((
            Some(v.span()),
            format!("{key} = {r}: use 1 to {MAX_RATE_HZ} probes per second"),
        ));
    }
    Ok(r)
}

fn budget(v: &Spanned<f64>, key: &str) -> Result<u64, Err> {
    let mb = *v.get_ref();
    if !(mb.is_finite() && mb > 0.0 && mb <= 1e6) {
        return Err((
            Some(v.span()),
            format!("{key} = {mb}: use a positive number of megabytes per day (e.g. 50)"),
        ));
    }
    Ok((mb * 1e6) as u64)
}

impl RawProbe {
    /// Validates the section. Errors carry the span of the offending value.
    pub(crate) fn validate(&self) -> Result<ProbeConfig, Err> {
        let t = *self.loss_timeout_ms.get_ref();
        if !(10..=60_000).contains(&t) {
            return Err((
                Some(self.loss_timeout_ms.span()),
                format!("probe.loss_timeout_ms = {t}: use 10 to 60000 (default 1000)"),
            ));
        }
        let l = *self.degraded_loss_pct.get_ref();
        if !(l.is_finite() && l > 0.0 && l <= 100.0) {
            return Err((
                Some(self.degraded_loss_pct.span()),
                format!("probe.degraded_loss_pct = {l}: use a percentage above 0 (default 5)"),
            ));
        }
        let r = *self.degraded_rtt_ms.get_ref();
        if !(r.is_finite() && r > 0.0) {
            return Err((
                Some(self.degraded_rtt_ms.span()),
                format!("probe.degraded_rtt_ms = {r}: use a positive number (default 500)"),
            ));
        }
        let d = *self.down_after_ms.get_ref();
        if d < t {
            return Err((
                Some(self.down_after_ms.span()),
                format!("probe.down_after_ms = {d} is below loss_timeout_ms = {t}: a link can only be declared down after its probes time out"),
            ));
        }
        rate(&self.min_rate_hz, "probe.min_rate_hz")?;
        rate(&self.max_rate_hz, "probe.max_rate_hz")?;
        budget(&self.budget_mb_per_day, "probe.budget_mb_per_day")?;
        Ok(ProbeConfig {
            loss_timeout_ns: t * 1_000_000,
            degraded_loss_pct: l,
            degraded_rtt_ns: (r * 1e6) as u64,
            down_after_ns: d * 1_000_000,
            recover_s: *self.recover_s.get_ref(),
        })
    }

    /// The settings of one link (None: not probed).
    pub(crate) fn for_link(&self, l: &RawLinkProbe) -> Result<Option<LinkProbeConfig>, Err> {
        let port = *self.port.get_ref();
        let reflector = match (&l.reflector, &self.reflector) {
            (Some(r), _) if r.get_ref().trim() == "off" => return Ok(None),
            (Some(r), _) | (None, Some(r)) => reflector_addr(r, port)?,
            (None, None) => return Ok(None),
        };
        let min = rate(
            l.min_rate_hz.as_ref().unwrap_or(&self.min_rate_hz),
            "min_rate_hz",
        )?;
        let max_v = l.max_rate_hz.as_ref().unwrap_or(&self.max_rate_hz);
        let max = rate(max_v, "max_rate_hz")?;
        if max < min {
            return Err((
                Some(max_v.span()),
                format!("max_rate_hz = {max} is below min_rate_hz = {min}: raise it"),
            ));
        }
        let budget_bytes_per_day = budget(
            l.budget_mb_per_day
                .as_ref()
                .unwrap_or(&self.budget_mb_per_day),
            "budget_mb_per_day",
        )?;
        Ok(Some(LinkProbeConfig {
            reflector,
            min_rate_hz: min,
            max_rate_hz: max,
            budget_bytes_per_day,
        }))
    }
}

/// IP + UDP + STAMP bytes of one probe and its reply together (what the data plan sees).
pub fn probe_round_trip_bytes(reflector: &SocketAddr) -> u64 {
    let ip = if reflector.is_ipv4() { 20 } else { 40 };
    2 * (ip + 8 + crate::stamp::wire::SENDER_LEN as u64)
}

/// The highest average rate the budget allows (probes per second, at least 1 per minute).
pub fn budget_rate_hz(l: &LinkProbeConfig) -> f64 {
    let per_probe = probe_round_trip_bytes(&l.reflector) as f64;
    (l.budget_bytes_per_day as f64 / (86_400.0 * per_probe)).max(1.0 / 60.0)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    const BASE: &str = "[router]\nid = \"r\"\nsite = \"s\"\n[[link]]\ninterface = \"wwan0\"\n[[link]]\ninterface = \"wwan1\"\n";

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("t.toml"))
    }

    #[test]
    fn probing_is_off_without_a_reflector() {
        let c = parse(BASE).expect("valid");
        assert!(c.links.iter().all(|l| l.probe.is_none()));
        assert_eq!(c.probe.loss_timeout_ns, 1_000_000_000);
    }

    #[test]
    fn global_reflector_with_per_link_overrides() {
        let s = format!(
            "{BASE}[link.probe]\nreflector = \"off\"\n[probe]\nreflector = \"192.0.2.1\"\nport = 8620\n"
        );
        let c = parse(&s).expect("valid");
        let p = c.links[0].probe.as_ref().expect("wwan0 probed");
        assert_eq!(p.reflector, "192.0.2.1:8620".parse().expect("addr"));
        assert_eq!((p.min_rate_hz, p.max_rate_hz), (2, 50));
        assert_eq!(p.budget_bytes_per_day, 50_000_000);
        assert!(
            c.links[1].probe.is_none(),
            "[link.probe] off applies to wwan1"
        );
        // 50 MB a day of 144-byte round trips: ~4 probes a second.
        let r = super::budget_rate_hz(p);
        assert!((4.0..4.1).contains(&r), "{r}");
    }

    #[test]
    fn bad_probe_values_name_their_line() {
        let s = format!("{BASE}[probe]\nreflector = \"192.0.2.1\"\nmax_rate_hz = 20000\n");
        match parse(&s) {
            Err(ConfigError::Invalid { line, message, .. }) => {
                assert_eq!(line, 10);
                assert!(message.contains("1 to 10000"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let s = format!("{BASE}[probe]\nreflector = \"nowhere\"\n");
        assert!(parse(&s).is_err());
        let s = format!("{BASE}[probe]\nloss_timeout_ms = 5000\ndown_after_ms = 1000\n");
        let e = parse(&s).expect_err("down before timeout").to_string();
        assert!(e.contains("down_after_ms"), "{e}");
    }
}
