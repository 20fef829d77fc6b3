//! Influx line protocol for rollups.
//!
//! One point per stored row: measurement [`MEASUREMENT`], tags `boot`, `link`, `router`, `site`
//! (sorted by key, as InfluxDB stores them, which spares it a sort), the row's fields, and the
//! window start in nanoseconds as the timestamp. Identity in InfluxDB is measurement + tag set +
//! timestamp; the tags carry the store's identity `(link_id, boot_tag)` and the window start is
//! the timestamp, so a row sent twice lands on the same point (a replay is idempotent). `seq` is
//! not written: it is local to the store and changes when a row is put again.
//!
//! Only `i64` (`..i`), `f64` and booleans are written: InfluxDB 1.6.7 rejects unsigned (`..u`).

use crate::store::Rollup;
use std::io::Write;

/// Measurement name of every rollup point.
pub const MEASUREMENT: &str = "linkpulse_rollup";

/// Counts of values the encoder had to change or leave out; they stay zero for sane input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EncodeStats {
    pub points: u64,
    /// Integers above `i64::MAX`, written as `i64::MAX` (a field's type must never change, so
    /// they cannot become floats).
    pub clamped: u64,
    /// NaN or infinite floats, left out (line protocol has no spelling for them).
    pub non_finite: u64,
    /// Rows whose window start does not fit InfluxDB's time range; not written.
    pub skipped_points: u64,
}

/// Encodes rollups of one router. The tag values fixed per router are escaped once.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// `,router=..[,site=..] ` including the trailing space before the fields.
    tail_tags: Vec<u8>,
}

/// InfluxDB's largest timestamp (`models.MaxNanoTime`).
const MAX_TIME_NS: u64 = i64::MAX as u64 - 1;

impl Encoder {
    /// `router` must not be empty (a tag value cannot be); an empty `site` leaves the tag out.
    pub fn new(router: &str, site: &str) -> Encoder {
        let mut tail_tags = Vec::with_capacity(16 + router.len() + site.len());
        tail_tags.extend_from_slice(b",router=");
        escape_tag(&mut tail_tags, router);
        if !site.is_empty() {
            tail_tags.extend_from_slice(b",site=");
            escape_tag(&mut tail_tags, site);
        }
        tail_tags.push(b' ');
        Encoder { tail_tags }
    }

    /// Appends one line for `r` to `out` (no allocation beyond `out`'s growth).
    pub fn encode(&self, r: &Rollup, out: &mut Vec<u8>, stats: &mut EncodeStats) {
        if r.window_start_ns > MAX_TIME_NS {
            stats.skipped_points += 1;
            return;
        }
        let mut f = Fields {
            out,
            stats,
            first: true,
        };
        f.out.extend_from_slice(MEASUREMENT.as_bytes());
        f.out.extend_from_slice(b",boot=");
        write_u64(f.out, r.boot_tag);
        f.out.extend_from_slice(b",link=");
        write_u64(f.out, u64::from(r.link_id));
        f.out.extend_from_slice(&self.tail_tags);

        f.int("window_ns", r.window_ns);
        f.boolean("complete", r.complete);
        f.int("link_state", u64::from(r.link_state));
        f.int("clock_state", u64::from(r.clock_state));
        f.int("clock_error_ns", r.clock_error_ns);
        f.int("rx_bytes", r.rx_bytes);
        f.int("tx_bytes", r.tx_bytes);
        f.int("rx_packets", r.rx_packets);
        f.int("tx_packets", r.tx_packets);
        f.float("rx_rate_mean_bps", r.rx_rate_mean_bps);
        f.float("rx_rate_peak_bps", r.rx_rate_peak_bps);
        f.float("rx_rate_p50_bps", r.rx_rate_p50_bps);
        f.float("rx_rate_p95_bps", r.rx_rate_p95_bps);
        f.float("rx_rate_p99_bps", r.rx_rate_p99_bps);
        f.float("tx_rate_mean_bps", r.tx_rate_mean_bps);
        f.float("tx_rate_peak_bps", r.tx_rate_peak_bps);
        f.float("tx_rate_p50_bps", r.tx_rate_p50_bps);
        f.float("tx_rate_p95_bps", r.tx_rate_p95_bps);
        f.float("tx_rate_p99_bps", r.tx_rate_p99_bps);
        f.opt_int("rtt_min_ns", r.rtt_min_ns);
        f.opt_int("rtt_mean_ns", r.rtt_mean_ns);
        f.opt_int("rtt_max_ns", r.rtt_max_ns);
        f.opt_int("rtt_p50_ns", r.rtt_p50_ns);
        f.opt_int("rtt_p99_ns", r.rtt_p99_ns);
        f.int("probes_sent_fwd", u64::from(r.probes_sent_fwd));
        f.int("probes_lost_fwd", u64::from(r.probes_lost_fwd));
        f.int("probes_sent_bwd", u64::from(r.probes_sent_bwd));
        f.int("probes_lost_bwd", u64::from(r.probes_lost_bwd));
        // Schema v4; counts only when not 0, figures only when measured (no field = empty).
        if r.tcp_rtt_samples > 0 {
            f.int("tcp_rtt_samples", r.tcp_rtt_samples);
        }
        f.opt_int("tcp_rtt_min_ns", r.tcp_rtt_min_ns);
        f.opt_int("tcp_rtt_mean_ns", r.tcp_rtt_mean_ns);
        f.opt_int("tcp_rtt_max_ns", r.tcp_rtt_max_ns);
        if r.owd_samples > 0 {
            f.int("owd_samples", u64::from(r.owd_samples));
        }
        f.opt_signed("owd_up_mean_ns", r.owd_up_mean_ns);
        f.opt_signed("owd_up_max_ns", r.owd_up_max_ns);
        f.opt_signed("owd_down_mean_ns", r.owd_down_mean_ns);
        f.opt_signed("owd_down_max_ns", r.owd_down_max_ns);
        f.opt_int("owd_error_ns", r.owd_error_ns);

        f.out.push(b' ');
        write_u64(f.out, r.window_start_ns);
        f.out.push(b'\n');
        f.stats.points += 1;
    }
}

/// Field writer of one line. The field keys are constants of this file and need no escaping
/// (a unit test checks); at least `window_ns` is always written, so a line is never field-less.
struct Fields<'a> {
    out: &'a mut Vec<u8>,
    stats: &'a mut EncodeStats,
    first: bool,
}

impl Fields<'_> {
    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.extend_from_slice(key.as_bytes());
        self.out.push(b'=');
    }

    fn int(&mut self, key: &str, v: u64) {
        self.key(key);
        let v = if v > i64::MAX as u64 {
            self.stats.clamped += 1;
            i64::MAX as u64
        } else {
            v
        };
        write_u64(self.out, v);
        self.out.push(b'i');
    }

    fn opt_int(&mut self, key: &str, v: Option<u64>) {
        if let Some(v) = v {
            self.int(key, v);
        }
    }

    fn opt_signed(&mut self, key: &str, v: Option<i64>) {
        if let Some(v) = v {
            self.key(key);
            if v < 0 {
                self.out.push(b'-');
            }
            write_u64(self.out, v.unsigned_abs());
            self.out.push(b'i');
        }
    }

    fn float(&mut self, key: &str, v: f64) {
        if !v.is_finite() {
            self.stats.non_finite += 1;
            return;
        }
        self.key(key);
        // `Display` prints the shortest decimal that reads back as the same f64 and never uses
        // an exponent; without an `i` suffix InfluxDB parses it as a float even when it has no
        // decimal point, so the field type stays float.
        let _ = write!(self.out, "{v}");
    }

    fn boolean(&mut self, key: &str, v: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
    }
}

fn write_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Tag keys and values: commas, equals signs and spaces are escaped with a backslash. Newlines
/// cannot be escaped in line protocol; they become spaces (escaped) so a line is never split.
pub fn escape_tag(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b',' | b'=' | b' ' => {
                out.push(b'\\');
                out.push(b);
            }
            b'\n' | b'\r' => out.extend_from_slice(b"\\ "),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Rollup {
        Rollup {
            seq: 77,
            link_id: 3,
            window_start_ns: 1_790_000_000_500_000_000,
            boot_tag: 9,
            window_ns: 500_000_000,
            complete: true,
            link_state: 1,
            clock_state: 1,
            clock_error_ns: 1500,
            rx_bytes: 1000,
            tx_rate_peak_bps: 1e9,
            rx_rate_mean_bps: 0.1,
            rtt_min_ns: Some(20_000_000),
            probes_sent_fwd: 10,
            ..Rollup::default()
        }
    }

    fn line(enc: &Encoder, r: &Rollup) -> (String, EncodeStats) {
        let mut out = Vec::new();
        let mut st = EncodeStats::default();
        enc.encode(r, &mut out, &mut st);
        (String::from_utf8(out).expect("utf8"), st)
    }

    #[test]
    fn one_full_line() {
        let (l, st) = line(&Encoder::new("r1", "depot"), &row());
        assert_eq!(
            l,
            "linkpulse_rollup,boot=9,link=3,router=r1,site=depot \
             window_ns=500000000i,complete=true,link_state=1i,clock_state=1i,clock_error_ns=1500i,\
             rx_bytes=1000i,tx_bytes=0i,rx_packets=0i,tx_packets=0i,\
             rx_rate_mean_bps=0.1,rx_rate_peak_bps=0,rx_rate_p50_bps=0,rx_rate_p95_bps=0,rx_rate_p99_bps=0,\
             tx_rate_mean_bps=0,tx_rate_peak_bps=1000000000,tx_rate_p50_bps=0,tx_rate_p95_bps=0,tx_rate_p99_bps=0,\
             rtt_min_ns=20000000i,\
             probes_sent_fwd=10i,probes_lost_fwd=0i,probes_sent_bwd=0i,probes_lost_bwd=0i \
             1790000000500000000\n"
        );
        assert_eq!(st.points, 1);
    }

    #[test]
    fn same_identity_same_series_and_time_whatever_the_seq() {
        let enc = Encoder::new("r1", "");
        let a = row();
        let mut b = row();
        b.seq = 12345;
        assert_eq!(line(&enc, &a).0, line(&enc, &b).0);
        assert!(!line(&enc, &a).0.contains("site="));
    }

    #[test]
    fn tags_are_escaped() {
        let (l, _) = line(&Encoder::new("r 1,a=b", "x\ny"), &row());
        assert!(
            l.starts_with("linkpulse_rollup,boot=9,link=3,router=r\\ 1\\,a\\=b,site=x\\ y "),
            "{l}"
        );
        assert_eq!(l.matches('\n').count(), 1);
    }

    #[test]
    fn out_of_range_values() {
        let mut r = row();
        r.rx_bytes = u64::MAX;
        r.rx_rate_p50_bps = f64::NAN;
        r.tx_rate_p99_bps = f64::INFINITY;
        let (l, st) = line(&Encoder::new("r", ""), &r);
        assert!(l.contains(&format!("rx_bytes={}i,", i64::MAX)), "{l}");
        assert!(!l.contains("rx_rate_p50_bps") && !l.contains("tx_rate_p99_bps"));
        assert_eq!((st.clamped, st.non_finite, st.points), (1, 2, 1));

        r.window_start_ns = u64::MAX;
        let (l, st) = line(&Encoder::new("r", ""), &r);
        assert_eq!((l.as_str(), st.skipped_points, st.points), ("", 1, 0));
    }

    #[test]
    fn floats_read_back_exactly() {
        let mut r = row();
        for v in [0.1, 1.0 / 3.0, 123456.789e10, 5e-324, f64::MAX] {
            r.rx_rate_mean_bps = v;
            let (l, _) = line(&Encoder::new("r", ""), &r);
            let s = l
                .split("rx_rate_mean_bps=")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .expect("field");
            assert!(!s.contains('e') && !s.ends_with('i'), "{s}");
            assert_eq!(s.parse::<f64>().expect("float"), v);
        }
    }

    #[test]
    fn tcp_rtt_and_one_way_delays_only_when_measured() {
        let mut r = row();
        r.tcp_rtt_samples = 3;
        (r.tcp_rtt_min_ns, r.tcp_rtt_mean_ns, r.tcp_rtt_max_ns) = (Some(1), Some(2), Some(4));
        r.owd_samples = 2;
        (r.owd_up_mean_ns, r.owd_up_max_ns) = (Some(-1_500), Some(i64::MAX));
        (r.owd_down_mean_ns, r.owd_down_max_ns) = (Some(i64::MIN), Some(0));
        r.owd_error_ns = Some(502_000);
        let (l, _) = line(&Encoder::new("r", ""), &r);
        assert!(
            l.contains(&format!(
                "probes_lost_bwd=0i,tcp_rtt_samples=3i,tcp_rtt_min_ns=1i,tcp_rtt_mean_ns=2i,\
                 tcp_rtt_max_ns=4i,owd_samples=2i,owd_up_mean_ns=-1500i,owd_up_max_ns={}i,\
                 owd_down_mean_ns={}i,owd_down_max_ns=0i,owd_error_ns=502000i ",
                i64::MAX,
                i64::MIN
            )),
            "{l}"
        );
        // Not measured: no field at all (the default row has none of them).
        let (l, _) = line(&Encoder::new("r", ""), &row());
        assert!(!l.contains("tcp_") && !l.contains("owd_"), "{l}");
    }

    #[test]
    fn field_keys_need_no_escaping() {
        let mut r = row();
        (r.tcp_rtt_samples, r.tcp_rtt_min_ns, r.owd_samples) = (1, Some(1), 1);
        (r.owd_up_mean_ns, r.owd_error_ns) = (Some(-1), Some(1));
        let (l, _) = line(&Encoder::new("r", ""), &r);
        let fields = l.split(' ').nth(1).expect("fields");
        for kv in fields.split(',') {
            let k = kv.split('=').next().expect("key");
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{k}"
            );
        }
    }
}
