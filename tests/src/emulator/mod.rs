//! User-space link emulator (the kernel here has no netem): per modem and direction, a pure
//! [`engine::LinkEngine`] driven by an I/O thread ([`io`]) that moves real packets and logs
//! each one's fate to the ground truth ([`crate::truth`]).
pub mod engine;
pub mod io;
pub mod trace;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use engine::{guard_release, Admission, Bottleneck, Departure, EngineStats, LinkEngine};
pub use trace::{Trace, TraceError, OPPORTUNITY_BYTES};

/// Default boundary guard on the downlink (toward the router): see [`engine::guard_release`]
/// and [`io`]. No downlink packet is delivered in the last 200 µs before a whole UTC second, so
/// the second a delivered packet lands in is unambiguous for per-second exactness tests.
pub const DEFAULT_GUARD_US: u32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("invalid link profile: {0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Truth(#[from] crate::truth::TruthError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("emulator thread {0} panicked")]
    Panicked(String),
}

impl EmulatorError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EmulatorError::Io {
            context: context.into(),
            source,
        }
    }
}

/// An outage window, relative to the emulator start: `[start_ms, start_ms + duration_ms)`, and
/// again every `every_ms` after that if set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    pub start_ms: u64,
    pub duration_ms: u64,
    #[serde(default)]
    pub every_ms: Option<u64>,
}

impl Outage {
    /// Does the outage cover ms `rel_ms` since the emulator start?
    pub fn covers(&self, rel_ms: u64) -> bool {
        if rel_ms < self.start_ms {
            return false;
        }
        let since = rel_ms - self.start_ms;
        match self.every_ms {
            Some(every) if every > 0 => since % every < self.duration_ms,
            _ => since < self.duration_ms,
        }
    }
}

/// One direction of an emulated modem link. Stages, in order: outage, random loss, bottleneck
/// queue (drop-tail at `queue_bytes`, 0 = unlimited) served by `rate_kbit` or by `trace` (at
/// most one of them; neither = unlimited), then `delay_us` ± `jitter_us` without reordering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkProfile {
    pub rate_kbit: Option<u64>,
    /// Mahimahi trace file (see [`trace`]); relative paths are taken as is (use
    /// [`crate::traces_dir`] for the shipped ones).
    pub trace: Option<PathBuf>,
    pub delay_us: u64,
    pub jitter_us: u64,
    /// Random loss probability, 0..=1.
    pub loss: f64,
    pub queue_bytes: u64,
    pub outages: Vec<Outage>,
    pub seed: u64,
}

impl Default for LinkProfile {
    /// Lossless, unlimited, no delay.
    fn default() -> Self {
        LinkProfile {
            rate_kbit: None,
            trace: None,
            delay_us: 0,
            jitter_us: 0,
            loss: 0.0,
            queue_bytes: 0,
            outages: Vec::new(),
            seed: 1,
        }
    }
}

impl LinkProfile {
    /// Lossless, unlimited, no delay: what a test needs to count exactly.
    pub fn unlimited() -> Self {
        Self::default()
    }

    pub fn fixed_rate(kbit: u64) -> Self {
        LinkProfile {
            rate_kbit: Some(kbit),
            ..Self::default()
        }
    }

    pub fn from_trace(path: impl Into<PathBuf>) -> Self {
        LinkProfile {
            trace: Some(path.into()),
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), ProfileError> {
        if !(0.0..=1.0).contains(&self.loss) || self.loss.is_nan() {
            return Err(ProfileError::Invalid(format!(
                "loss {} is not a probability in 0..=1",
                self.loss
            )));
        }
        if self.rate_kbit.is_some() && self.trace.is_some() {
            return Err(ProfileError::Invalid(
                "rate_kbit and trace are exclusive (both set)".into(),
            ));
        }
        if self.rate_kbit == Some(0) {
            return Err(ProfileError::Invalid("rate_kbit must be > 0".into()));
        }
        // 1 h keeps every ns sum far from u64 overflow.
        if self.delay_us + self.jitter_us > 3_600_000_000 {
            return Err(ProfileError::Invalid(
                "delay + jitter above one hour".into(),
            ));
        }
        for o in &self.outages {
            if o.every_ms.is_some_and(|e| e == 0 || e < o.duration_ms) {
                return Err(ProfileError::Invalid(format!(
                    "outage {o:?}: every_ms must be > 0 and ≥ duration_ms"
                )));
            }
        }
        Ok(())
    }

    /// Builds the bottleneck, loading the trace through `cache`.
    pub fn bottleneck(&self, cache: &mut TraceCache) -> Result<Bottleneck, EmulatorError> {
        self.validate()?;
        Ok(match (&self.rate_kbit, &self.trace) {
            (Some(kbit), _) => Bottleneck::Rate { kbit: *kbit },
            (None, Some(path)) => Bottleneck::Trace(cache.get(path)?),
            (None, None) => Bottleneck::Unlimited,
        })
    }
}

impl fmt::Display for LinkProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.rate_kbit, &self.trace) {
            (Some(k), _) => write!(f, "{k} kbit/s")?,
            (None, Some(p)) => write!(
                f,
                "trace {}",
                p.file_name().map_or_else(
                    || p.display().to_string(),
                    |n| n.to_string_lossy().into_owned()
                )
            )?,
            (None, None) => write!(f, "unlimited")?,
        }
        if self.delay_us > 0 || self.jitter_us > 0 {
            write!(f, ", delay {} µs", self.delay_us)?;
            if self.jitter_us > 0 {
                write!(f, " ± {} µs", self.jitter_us)?;
            }
        }
        if self.loss > 0.0 {
            write!(f, ", loss {:.2}%", self.loss * 100.0)?;
        }
        if self.queue_bytes > 0 {
            write!(f, ", queue {} B", self.queue_bytes)?;
        }
        for o in &self.outages {
            write!(f, ", outage {} ms at {} ms", o.duration_ms, o.start_ms)?;
            if let Some(e) = o.every_ms {
                write!(f, " every {e} ms")?;
            }
        }
        Ok(())
    }
}

/// Loads each trace file once.
#[derive(Debug, Default)]
pub struct TraceCache(HashMap<PathBuf, Arc<Trace>>);

impl TraceCache {
    pub fn get(&mut self, path: &Path) -> Result<Arc<Trace>, TraceError> {
        if let Some(t) = self.0.get(path) {
            return Ok(t.clone());
        }
        let t = Arc::new(Trace::load(path)?);
        self.0.insert(path.to_path_buf(), t.clone());
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_validation_and_display() {
        assert!(LinkProfile::default().validate().is_ok());
        let mut p = LinkProfile::fixed_rate(5000);
        p.trace = Some("x".into());
        assert!(p.validate().is_err());
        let mut p = LinkProfile::fixed_rate(20_000);
        p.delay_us = 25_000;
        p.loss = 0.01;
        assert_eq!(p.to_string(), "20000 kbit/s, delay 25000 µs, loss 1.00%");
        let mut p = LinkProfile::default();
        p.outages.push(Outage {
            start_ms: 0,
            duration_ms: 10,
            every_ms: Some(5),
        });
        assert!(p.validate().is_err());
    }

    #[test]
    fn profile_serde_defaults() {
        let p: LinkProfile = serde_json::from_str(r#"{"delay_us": 5}"#).unwrap();
        assert_eq!(p.delay_us, 5);
        assert_eq!(p.rate_kbit, None);
        let back: LinkProfile = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn trace_cache_loads_once() {
        let mut c = TraceCache::default();
        let path = crate::traces_dir().join("Verizon-LTE-short.up");
        let a = c.get(&path).unwrap();
        let b = c.get(&path).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(c.get(Path::new("/nonexistent/trace")).is_err());
    }
}
