//! Chaos (root, real Tarantool 2.6 and InfluxDB 1.6.7, the `linkpulse run` binary as its own
//! process in a testbed's router namespace): about 20 kill -9 of the daemon, its Tarantool and
//! influxd at random moments, each timed on a write in flight to the victim, then restarted
//! (the run is `linkpulse_testbed::chaos`, shared with the benchmark's `durability.*`, which
//! does at least 100). Afterwards: every row of the store is in InfluxDB with equal values and
//! nothing else is (0 lost, 0 doubled), each (link, boot) has consecutive windows (no
//! acknowledged rollup lost), no complete window spans a daemon kill, and the daemon came back
//! after every kill.

use std::time::Duration;

use linkpulse_testbed::chaos::{self, ChaosSpec};

const KILLS: usize = 20;

#[test]
fn kill_9_of_daemon_tarantool_and_influxd_loses_and_doubles_nothing() {
    let spec = ChaosSpec {
        name: "lpkil".into(),
        dir: std::env::temp_dir().join(format!("lp-chaos-{}", std::process::id())),
        linkpulse: env!("CARGO_BIN_EXE_linkpulse").into(),
        kills: KILLS,
        pause_ms: 500..3000,
        mid_write_wait: Duration::from_secs(3),
    };
    let report = chaos::run(&spec).unwrap_or_else(|e| panic!("chaos run failed: {e}"));
    eprintln!("chaos: {report}");
    assert_eq!(report.kills, KILLS);
    assert_eq!(
        report.unsent, 0,
        "rows never forwarded after a clean stop: {report}"
    );
    assert_eq!(report.lost(), 0, "{report}");
    assert_eq!(report.duplicated(), 0, "{report}");
    assert!(
        report.mid_write >= KILLS / 2,
        "only {} kills landed mid-write: {report}",
        report.mid_write
    );
}
