//! durability.*: the chaos run of the daemon's chaos test (`linkpulse_testbed::chaos`) with
//! 100 kill -9 of the daemon, its Tarantool and influxd, each timed on a write in flight to the
//! victim, then restarted; the store and the central InfluxDB compared afterwards.
use std::time::Duration;

use anyhow::Context as _;
use linkpulse_testbed::chaos::{self, ChaosSpec};

use crate::{report::Metric, Args};

/// Issue 4: at least 100.
const KILLS: usize = 100;

pub fn durability(_args: &Args) -> anyhow::Result<Vec<Metric>> {
    // The shipped `linkpulse` beside this binary (`cargo xtask bench` builds both in `dist`).
    let exe = std::env::current_exe()?
        .parent()
        .context("bench binary dir")?
        .join("linkpulse");
    anyhow::ensure!(exe.exists(), "{} not built", exe.display());
    let spec = ChaosSpec {
        name: "lpbdu".into(),
        dir: std::env::temp_dir().join(format!("lpbench-chaos-{}", std::process::id())),
        linkpulse: exe,
        kills: KILLS,
        // Shorter pauses than the test's (500..3000 ms): 100 kills in about 8 minutes.
        pause_ms: 200..1200,
        mid_write_wait: Duration::from_secs(3),
    };
    let r = chaos::run(&spec)?;
    eprintln!("bench: durability: {r}");
    let peer = "target (issue 4); Vector, Fluent Bit, InfluxDB edge replication lose data on crash or a full queue";
    Ok(vec![
        Metric::new("durability.kills", r.kills as f64, "kills")
            .peer(KILLS as f64, "issue 4: at least 100 kill -9")
            .target("≥ 100")
            .note(format!(
                "daemon {}, tarantool {}, influxd {}; {} sent while a write to the victim was in flight; {:.0} s",
                r.by_victim[0],
                r.by_victim[1],
                r.by_victim[2],
                r.mid_write,
                r.kill_phase.as_secs_f64()
            )),
        Metric::new("durability.lost", r.lost() as f64, "rows")
            .peer(0.0, peer)
            .target("0")
            .note(format!(
                "{} rows in {} (link, boot) runs; missing in InfluxDB {}, holes in the store {}",
                r.rows, r.runs, r.missing, r.holes
            )),
        Metric::new("durability.duplicated", r.duplicated() as f64, "rows")
            .peer(0.0, peer)
            .target("0")
            .note(format!(
                "other values {}, extra points {}, identity stored twice {}, complete window across a kill {}",
                r.differing, r.extra, r.store_repeats, r.complete_across_kill
            )),
    ])
}
