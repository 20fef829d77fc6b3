//! Link health from the probes: up / degraded / down with hysteresis, and the adaptive rate.

/// Codes of `linkpulse_link_state` and the rollups' `link_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Health {
    /// Not probed, or not yet judged.
    Unknown = 0,
    Up = 1,
    /// Loss or mean RTT over the last second at or above the configured thresholds.
    Degraded = 2,
    /// No reply for `down_after_ms`.
    Down = 3,
}

impl Health {
    pub fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Up,
            2 => Health::Degraded,
            3 => Health::Down,
            _ => Health::Unknown,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Degraded => "degraded",
            Health::Down => "down",
        }
    }
}

/// One second of a link as the health judge sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecondView {
    /// Probes settled this second (answered or lost).
    pub settled: u64,
    pub lost: u64,
    /// Mean RTT of this second's samples (None without samples).
    pub mean_rtt_ns: Option<u64>,
    /// Time since the last reply (or since probing started, if none yet).
    pub silent_ns: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub degraded_loss_pct: f64,
    pub degraded_rtt_ns: u64,
    pub down_after_ns: u64,
    /// Consecutive seconds a better state must hold before the link moves to it.
    pub recover_s: u32,
}

/// Hysteresis: a worse state applies at once, a better one after `recover_s` good seconds.
#[derive(Debug, Clone)]
pub struct Judge {
    pub state: Health,
    better_for: u32,
}

impl Default for Judge {
    fn default() -> Self {
        Self {
            state: Health::Unknown,
            better_for: 0,
        }
    }
}

impl Judge {
    /// What this one second says on its own.
    pub fn candidate(t: &Thresholds, v: &SecondView) -> Health {
        if v.silent_ns >= t.down_after_ns {
            return Health::Down;
        }
        let loss_pct = if v.settled == 0 {
            0.0
        } else {
            100.0 * v.lost as f64 / v.settled as f64
        };
        if loss_pct >= t.degraded_loss_pct || v.mean_rtt_ns.is_some_and(|m| m >= t.degraded_rtt_ns)
        {
            Health::Degraded
        } else if v.settled == 0 {
            // Nothing settled yet (first second): keep judging.
            Health::Unknown
        } else {
            Health::Up
        }
    }

    /// Feeds one second; returns the new state when it changed.
    pub fn step(&mut self, t: &Thresholds, v: &SecondView) -> Option<Health> {
        let c = Self::candidate(t, v);
        if c == Health::Unknown || c == self.state {
            self.better_for = 0;
            return None;
        }
        let worse = self.state == Health::Unknown || c > self.state;
        if !worse {
            self.better_for += 1;
            if self.better_for < t.recover_s.max(1) {
                return None;
            }
        }
        self.better_for = 0;
        self.state = c;
        Some(c)
    }
}

/// The adaptive rate: the highest rate while the link changes, halving each stable second
/// down to the lowest; never above what the byte budget allows on average (a token bucket
/// holding one hour of budget lets bursts of change use the full rate).
#[derive(Debug, Clone)]
pub struct RateControl {
    pub min_hz: f64,
    pub max_hz: f64,
    /// Average rate the daily budget allows.
    pub budget_hz: f64,
    pub rate_hz: f64,
    tokens: f64,
    capacity: f64,
    rtt_ewma: Option<f64>,
}

impl RateControl {
    pub fn new(min_hz: u32, max_hz: u32, budget_hz: f64) -> Self {
        let capacity = budget_hz * 3600.0;
        Self {
            min_hz: min_hz as f64,
            max_hz: max_hz as f64,
            budget_hz,
            // Start fast: the first seconds tell the most.
            rate_hz: (max_hz as f64).min(budget_hz.max(min_hz as f64)),
            tokens: capacity,
            capacity,
            rtt_ewma: None,
        }
    }

    /// Once a second: `sent` probes this second, whether the link changed (state change,
    /// loss, RTT jump). Returns the rate for the next second.
    pub fn update(&mut self, sent: u64, v: &SecondView, state_changed: bool) -> f64 {
        self.tokens = (self.tokens + self.budget_hz - sent as f64).min(self.capacity);
        let jump = match (v.mean_rtt_ns, self.rtt_ewma) {
            (Some(m), Some(e)) => ((m as f64) - e).abs() > 0.2 * e,
            _ => false,
        };
        if let Some(m) = v.mean_rtt_ns {
            let m = m as f64;
            self.rtt_ewma = Some(self.rtt_ewma.map_or(m, |e| 0.8 * e + 0.2 * m));
        }
        let changing = state_changed || v.lost > 0 || jump;
        let mut want = if changing {
            self.max_hz
        } else {
            (self.rate_hz / 2.0).max(self.min_hz)
        };
        // An empty bucket: only what the budget refills.
        if self.tokens < want {
            want = want.min(self.budget_hz.max(self.min_hz.min(self.budget_hz)));
        }
        self.rate_hz = want.clamp(self.min_hz.min(self.budget_hz), self.max_hz);
        self.rate_hz
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        degraded_loss_pct: 5.0,
        degraded_rtt_ns: 500_000_000,
        down_after_ns: 3_000_000_000,
        recover_s: 3,
    };

    fn sec(settled: u64, lost: u64, rtt_ms: u64, silent_ms: u64) -> SecondView {
        SecondView {
            settled,
            lost,
            mean_rtt_ns: (rtt_ms > 0).then_some(rtt_ms * 1_000_000),
            silent_ns: silent_ms * 1_000_000,
        }
    }

    #[test]
    fn worse_at_once_better_after_recovery_seconds() {
        let mut j = Judge::default();
        assert_eq!(j.step(&T, &sec(10, 0, 30, 0)), Some(Health::Up));
        assert_eq!(j.step(&T, &sec(10, 1, 30, 0)), Some(Health::Degraded));
        assert_eq!(j.step(&T, &sec(0, 0, 0, 3000)), Some(Health::Down));
        assert_eq!(j.step(&T, &sec(10, 0, 30, 0)), None);
        assert_eq!(j.step(&T, &sec(10, 0, 30, 0)), None);
        assert_eq!(j.step(&T, &sec(10, 0, 30, 0)), Some(Health::Up));
        assert_eq!(j.step(&T, &sec(10, 0, 600, 0)), Some(Health::Degraded));
    }

    #[test]
    fn a_bad_second_resets_recovery() {
        let mut j = Judge::default();
        j.step(&T, &sec(0, 0, 0, 5000));
        assert_eq!(j.state, Health::Down);
        j.step(&T, &sec(10, 0, 30, 0));
        j.step(&T, &sec(10, 0, 30, 0));
        j.step(&T, &sec(0, 0, 0, 4000));
        assert_eq!(j.step(&T, &sec(10, 0, 30, 0)), None);
        assert_eq!(j.state, Health::Down);
    }

    #[test]
    fn rate_slows_when_stable_speeds_up_on_change_and_keeps_the_budget() {
        let mut r = RateControl::new(1, 100, 10.0);
        let stable = sec(10, 0, 30, 0);
        let mut last = r.rate_hz;
        for _ in 0..10 {
            last = r.update(last as u64, &stable, false);
        }
        assert_eq!(last, 1.0);
        assert_eq!(r.update(1, &sec(10, 2, 30, 0), false), 100.0);
        // Spending 100/s against a 10/s budget empties one hour of tokens in ~400 s.
        let mut spent = 0.0;
        for _ in 0..2000 {
            let rate = r.update(100, &sec(10, 2, 30, 0), false);
            spent += rate;
        }
        assert!(r.rate_hz <= 10.0, "{}", r.rate_hz);
        assert!(spent < 2000.0 * 100.0);
    }
}
