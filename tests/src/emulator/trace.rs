//! Mahimahi packet-delivery traces (see `tests/traces/SOURCE-README`).
//!
//! Each line is a time in ms since the trace start and is one opportunity for one 1500-byte
//! packet to leave the bottleneck in that millisecond; repeated timestamps add up. The trace
//! repeats with a period equal to its last timestamp, exactly like mahimahi's `LinkQueue`: after
//! the last line the base time advances by that last value, so line `t` of repetition `r` falls
//! at ms `t + r * period` (hence ms `r * period` gets both the `0` lines of repetition `r` and the
//! `period` lines of repetition `r - 1`).
use std::path::{Path, PathBuf};

/// Bytes one trace line lets through.
pub const OPPORTUNITY_BYTES: u64 = 1500;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trace {path}, line {line}: {msg}")]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("trace {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// A parsed trace: the number of opportunities in each ms of one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    source: PathBuf,
    /// `counts[t]` = number of lines with timestamp `t`, for `t` in `0..=period`.
    counts: Vec<u32>,
    lines: u64,
}

impl Trace {
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Trace::parse(&text, path)
    }

    /// Parses trace text; `source` only names it in errors. Blank lines are ignored; anything
    /// else must be a non-negative integer, non-decreasing, and the last must be > 0 (mahimahi
    /// rejects a zero-length trace too).
    pub fn parse(text: &str, source: &Path) -> Result<Trace, TraceError> {
        let mut stamps: Vec<u64> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let t: u64 = line.parse().map_err(|e| TraceError::Parse {
                path: source.to_path_buf(),
                line: i + 1,
                msg: format!("{line:?} is not a millisecond count: {e}"),
            })?;
            if let Some(&prev) = stamps.last() {
                if t < prev {
                    return Err(TraceError::Parse {
                        path: source.to_path_buf(),
                        line: i + 1,
                        msg: format!("timestamp {t} goes back (previous {prev})"),
                    });
                }
            }
            stamps.push(t);
        }
        let period = match stamps.last() {
            None => {
                return Err(TraceError::Invalid {
                    path: source.to_path_buf(),
                    msg: "empty trace".into(),
                })
            }
            Some(0) => {
                return Err(TraceError::Invalid {
                    path: source.to_path_buf(),
                    msg: "last timestamp is 0: the trace must last a nonzero time".into(),
                })
            }
            Some(&p) => p,
        };
        // 24 h of ms is far beyond any real trace and keeps the table < 350 MB worst case.
        if period > 86_400_000 {
            return Err(TraceError::Invalid {
                path: source.to_path_buf(),
                msg: format!("period {period} ms is implausibly long"),
            });
        }
        let mut counts = vec![0u32; period as usize + 1];
        for t in &stamps {
            counts[*t as usize] = counts[*t as usize].saturating_add(1);
        }
        Ok(Trace {
            source: source.to_path_buf(),
            counts,
            lines: stamps.len() as u64,
        })
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Repetition period in ms (the last timestamp).
    pub fn period_ms(&self) -> u64 {
        (self.counts.len() - 1) as u64
    }

    /// Number of lines (opportunities) per period.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Opportunities in absolute ms `m` since the trace start (repetitions included).
    pub fn opportunities(&self, m: u64) -> u64 {
        let p = self.period_ms();
        let r = m % p;
        if m == 0 {
            u64::from(self.counts[0])
        } else if r == 0 {
            u64::from(self.counts[0]) + u64::from(self.counts[p as usize])
        } else {
            u64::from(self.counts[r as usize])
        }
    }

    /// Byte budget of ms `m`.
    pub fn budget_bytes(&self, m: u64) -> u64 {
        self.opportunities(m) * OPPORTUNITY_BYTES
    }

    /// Total byte budget of ms `from_ms..to_ms`.
    pub fn capacity_bytes(&self, from_ms: u64, to_ms: u64) -> u64 {
        (from_ms..to_ms).map(|m| self.budget_bytes(m)).sum()
    }

    /// Mean capacity over one period, kbit/s.
    pub fn mean_kbit(&self) -> f64 {
        (self.lines * OPPORTUNITY_BYTES * 8) as f64 / self.period_ms() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> Trace {
        Trace::parse(text, Path::new("test")).unwrap()
    }

    #[test]
    fn counts_and_repetition() {
        // Two opportunities at ms 0, one at 2, three at 5: period 5.
        let tr = t("0\n0\n2\n5\n5\n5\n");
        assert_eq!(tr.period_ms(), 5);
        assert_eq!(tr.lines(), 6);
        let first: Vec<u64> = (0..=5).map(|m| tr.opportunities(m)).collect();
        assert_eq!(first, vec![2, 0, 1, 0, 0, 3 + 2]);
        // ms 5 = last lines of rep 0 (3) + the `0` lines of rep 1 (2).
        assert_eq!(tr.opportunities(5), 3 + 2);
        assert_eq!(tr.opportunities(7), 1);
        assert_eq!(tr.opportunities(10), 5);
        assert_eq!(tr.capacity_bytes(0, 5), 3 * 1500);
        // Over whole periods each line counts once: 6 lines per 5 ms.
        assert_eq!(tr.capacity_bytes(1, 101), 6 * 20 * 1500);
    }

    #[test]
    fn mahimahi_one_line_is_one_packet_per_ms() {
        let tr = t("1");
        assert_eq!(tr.period_ms(), 1);
        assert!((0..100).skip(1).all(|m| tr.opportunities(m) == 1));
        assert_eq!(tr.opportunities(0), 0);
        assert!((tr.mean_kbit() - 12_000.0).abs() < 1e-9);
    }

    #[test]
    fn rejects_bad_input() {
        let p = Path::new("x");
        assert!(matches!(
            Trace::parse("", p),
            Err(TraceError::Invalid { .. })
        ));
        assert!(matches!(
            Trace::parse("0\n0\n", p),
            Err(TraceError::Invalid { .. })
        ));
        assert!(matches!(
            Trace::parse("1\nx\n", p),
            Err(TraceError::Parse { line: 2, .. })
        ));
        assert!(matches!(
            Trace::parse("5\n3\n", p),
            Err(TraceError::Parse { line: 2, .. })
        ));
        assert!(Trace::parse("\n1\n\n2 \n", p).is_ok());
    }

    #[test]
    fn shipped_traces_parse() {
        for name in [
            "Verizon-LTE-short",
            "TMobile-LTE-short",
            "ATT-LTE-driving-2016",
        ] {
            for dir in ["up", "down"] {
                let path = crate::traces_dir().join(format!("{name}.{dir}"));
                let tr = Trace::load(&path).unwrap();
                assert!(tr.period_ms() > 60_000, "{}", path.display());
                let kbit = tr.mean_kbit();
                assert!((500.0..50_000.0).contains(&kbit), "{name}.{dir}: {kbit}");
            }
        }
    }
}
