//! Round trips against the ground truth: how a measured RTT (linkpulse's probes, irtt) is
//! compared with the emulator's per-packet log. Shared by `tests/tests/probe_e2e.rs` and the
//! bench (`bench/src/rtt.rs`), so both judge every tool by the same method.
//!
//! # Method
//! A request and its reply are found in the truth by their L3 size (each tool's packets have
//! a size of their own) and their order: the emulator never reorders
//! ([`crate::emulator`]: departure = max(previous departure, …)), so the i-th request in
//! arrival order is the i-th one sent, and the k-th request delivered is answered by the k-th
//! reply (a reflector answers in arrival order).
//!
//! measured RTT (T4 − T1 − (T3 − T2)) = hold(request) + hold(reply) + bare path, where a
//! packet's hold runs from its arrival stamp to the start of the write that delivers it. The
//! reply's arrival is a user-space stamp taken after the emulator's `read()` from the server's
//! TUN woke up: that wake-up latency (T3 → arrival) belongs to the emulator, not to any path the
//! measuring tool sees, so it is taken out using the reflector's T3 (same host clock). T3 then
//! cancels, and what is compared is T1, T2 and T4. The residual is the bare path plus the
//! tool's stamping error; its median is taken as the bare path, and the error of each round
//! trip is its distance from that median.
use crate::truth::{Dir, TcpFacts, TruthRecord};

/// One passive TCP RTT sample as the ground truth has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTruthSample {
    /// CLOCK_REALTIME ns at which the emulator started the write that delivered the echo to
    /// the router (the router's ingress sees it during or right after that write).
    pub echo_write_ns: u64,
    /// When the write returned.
    pub echo_out_ns: u64,
    /// From the segment's arrival at the emulator (its kernel rx stamp, just after it left
    /// the router) to `echo_write_ns`: the emulator's holds both ways plus the far end.
    pub rtt_ns: i64,
}

/// The passive RTT the kernel programs should find on `modem`, replayed from the truth by the
/// same rules: every router → server segment with a timestamp option stores (ports, TSval) at
/// its arrival unless stored already (whatever its fate: the router sent it); every delivered
/// server → router segment with ACK whose TSecr is stored and not yet matched gives a sample
/// and marks it matched (it stays: one sample per (flow, TSval), first departure → first echo).
/// Events run in router order (up by arrival, down by delivery). Flows are told apart by
/// their ports (the testbed gives each modem one address pair). Returns the samples and the
/// number of TSvals stored.
pub fn tcp_rtt_truth(records: &[TruthRecord], modem: u16) -> (Vec<TcpTruthSample>, u64) {
    let mut ev: Vec<(u64, &TruthRecord, TcpFacts, (u32, u32))> = records
        .iter()
        .filter(|r| r.modem == modem)
        .filter_map(|r| {
            let f = r.tcp?;
            let ts = f.ts?;
            let t = match r.dir {
                Dir::Up => r.t_in_ns,
                Dir::Down if r.delivered() => r.t_out_ns - u64::from(r.write_ns),
                Dir::Down => return None,
            };
            Some((t, r, f, ts))
        })
        .collect();
    ev.sort_by_key(|e| e.0);
    // (sport, dport, TSval) → (first departure, matched): an entry stays once matched, as in
    // the kernel's table, so each TSval gives at most one sample.
    let mut table: std::collections::HashMap<(u16, u16, u32), (u64, bool)> = Default::default();
    let mut stored = 0;
    let mut samples = Vec::new();
    for (t, r, f, (tsval, tsecr)) in ev {
        match r.dir {
            Dir::Up => {
                if let std::collections::hash_map::Entry::Vacant(v) =
                    table.entry((f.sport, f.dport, tsval))
                {
                    v.insert((t, false));
                    stored += 1;
                }
            }
            Dir::Down => {
                if f.flags & TcpFacts::ACK == 0 {
                    continue;
                }
                if let Some((t0, used @ false)) = table.get_mut(&(f.dport, f.sport, tsecr)) {
                    *used = true;
                    samples.push(TcpTruthSample {
                        echo_write_ns: t,
                        echo_out_ns: r.t_out_ns,
                        rtt_ns: t as i64 - *t0 as i64,
                    });
                }
            }
        }
    }
    (samples, stored)
}

/// How long the emulator held a delivered packet: from its arrival stamp to the start of the
/// write that delivered it.
pub fn hold_ns(r: &TruthRecord) -> i64 {
    (r.t_out_ns - u64::from(r.write_ns)) as i64 - r.t_in_ns as i64
}

/// The packets of `modem` in direction `dir` with L3 size `size`, in the order the emulator
/// got them.
pub fn packets_of_size(
    records: &[TruthRecord],
    modem: u16,
    dir: Dir,
    size: u32,
) -> Vec<TruthRecord> {
    let mut v: Vec<TruthRecord> = records
        .iter()
        .filter(|r| r.modem == modem && r.dir == dir && r.size == size)
        .copied()
        .collect();
    v.sort_by_key(|r| r.t_in_ns);
    v
}

/// For each request (index in `requests`, arrival order): the index of its reply in the
/// replies' arrival order, `None` if the request was dropped. Request k delivered ↔ reply k.
pub fn reply_index(requests: &[TruthRecord]) -> Vec<Option<usize>> {
    let mut k = 0;
    requests
        .iter()
        .map(|r| {
            r.delivered().then(|| {
                k += 1;
                k - 1
            })
        })
        .collect()
}

/// The measured RTT minus the emulator's holds of `request` and `reply` (ns). With `t3_ns`
/// (the reflector's send stamp, CLOCK_REALTIME ns) the emulator's wake-up latency on the reply
/// is taken out too (see the module docs); without it the residual keeps it.
pub fn residual_ns(
    rtt_ns: i64,
    request: &TruthRecord,
    reply: &TruthRecord,
    t3_ns: Option<i64>,
) -> i64 {
    let r = rtt_ns - hold_ns(request) - hold_ns(reply);
    match t3_ns {
        Some(t3) => r - (reply.t_in_ns as i64 - t3),
        None => r,
    }
}

/// The spread of residuals around their median (the bare path).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorSpread {
    pub samples: usize,
    /// Median residual: the bare path.
    pub bare_ns: i64,
    /// |residual − bare| at p50 and p99.
    pub p50_ns: u64,
    pub p99_ns: u64,
    /// Standard deviation of the residuals.
    pub stddev_ns: f64,
}

/// [`ErrorSpread`] of `residuals` (sorted in place); `None` when empty.
pub fn error_spread(residuals: &mut [i64]) -> Option<ErrorSpread> {
    if residuals.is_empty() {
        return None;
    }
    residuals.sort_unstable();
    let n = residuals.len();
    let bare = residuals[n / 2];
    let mut err: Vec<u64> = residuals
        .iter()
        .map(|r| (r - bare).unsigned_abs())
        .collect();
    err.sort_unstable();
    let mean = residuals.iter().map(|&r| r as f64).sum::<f64>() / n as f64;
    let var = residuals
        .iter()
        .map(|&r| (r as f64 - mean).powi(2))
        .sum::<f64>()
        / n as f64;
    Some(ErrorSpread {
        samples: n,
        bare_ns: bare,
        p50_ns: err[n / 2],
        p99_ns: err[n * 99 / 100],
        stddev_ns: var.sqrt(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::truth::Verdict;

    fn rec(t_in: u64, t_out: u64, write: u32, verdict: Verdict) -> TruthRecord {
        TruthRecord {
            t_in_ns: t_in,
            t_out_ns: t_out,
            modem: 0,
            dir: Dir::Up,
            verdict,
            size: 72,
            write_ns: write,
            ip_version: 4,
            ip_proto: 17,
            flags: 0,
            tcp: None,
        }
    }

    #[test]
    fn replies_follow_delivered_requests() {
        let d = rec(0, 10, 1, Verdict::Delivered);
        let x = rec(0, 0, 0, Verdict::LostRandom);
        assert_eq!(
            reply_index(&[d, x, d, d, x]),
            vec![Some(0), None, Some(1), Some(2), None]
        );
    }

    #[test]
    fn residual_takes_out_holds_and_wakeup() {
        // Request held 20 µs (write started at 1_020_000), reply held 30 µs, and the reply
        // reached the emulator 7 µs after T3.
        let up = rec(1_000_000, 1_021_000, 1_000, Verdict::Delivered);
        let down = rec(2_000_000, 2_030_500, 500, Verdict::Delivered);
        assert_eq!(hold_ns(&up), 20_000);
        assert_eq!(hold_ns(&down), 30_000);
        assert_eq!(residual_ns(60_000, &up, &down, None), 10_000);
        assert_eq!(residual_ns(60_000, &up, &down, Some(1_993_000)), 3_000);
    }

    fn tcp(dir: Dir, t_in: u64, t_out: u64, ports: (u16, u16), ts: (u32, u32)) -> TruthRecord {
        TruthRecord {
            dir,
            ip_proto: 6,
            tcp: Some(TcpFacts {
                sport: ports.0,
                dport: ports.1,
                flags: TcpFacts::ACK,
                ts: Some(ts),
            }),
            ..rec(t_in, t_out, 1_000, Verdict::Delivered)
        }
    }

    #[test]
    fn tcp_truth_matches_first_departure_to_first_echo() {
        let (c, s) = (40_000, 5_201);
        let recs = [
            // TSval 7 leaves twice (second one a retransmission): the first counts.
            tcp(Dir::Up, 1_000, 2_000, (c, s), (7, 0)),
            tcp(Dir::Up, 1_500, 2_500, (c, s), (7, 0)),
            tcp(Dir::Up, 1_600, 2_600, (c, s), (8, 0)),
            // Echo of 7 (delivery write starts at 50_000 - 1_000), then a duplicate echo.
            tcp(Dir::Down, 30_000, 50_000, (s, c), (90, 7)),
            tcp(Dir::Down, 31_000, 51_000, (s, c), (91, 7)),
            // Another flow's echo of 8 is not ours.
            tcp(Dir::Down, 32_000, 52_000, (s, c + 1), (92, 8)),
            // A dropped echo of 8, then the delivered one.
            TruthRecord {
                verdict: Verdict::LostRandom,
                ..tcp(Dir::Down, 33_000, 0, (s, c), (93, 8))
            },
            tcp(Dir::Down, 34_000, 60_000, (s, c), (94, 8)),
        ];
        let (samples, stored) = tcp_rtt_truth(&recs, 0);
        assert_eq!(stored, 2);
        let rtts: Vec<i64> = samples.iter().map(|s| s.rtt_ns).collect();
        assert_eq!(rtts, vec![49_000 - 1_000, 59_000 - 1_600]);
    }

    #[test]
    fn spread_is_around_the_median() {
        let mut v: Vec<i64> = (0..100).map(|i| 1_000 + i).collect();
        let s = error_spread(&mut v).expect("samples");
        assert_eq!(s.bare_ns, 1_050);
        assert_eq!(s.p50_ns, 25);
        assert_eq!(s.p99_ns, 50);
        assert!((s.stddev_ns - 28.866).abs() < 0.01, "{s:?}");
        assert_eq!(error_spread(&mut []), None);
    }
}
