//! `linkpulse export` and `linkpulse resync` as an operator runs them (the binary, a config
//! file, a real Tarantool 2.6 store): with no daemon running (the command starts the store
//! itself) and with the store held by another process (the command uses its socket).
use std::{path::PathBuf, process::Command};

use linkpulse_sink::store::{LocalConfig, Rollup, Store};

const W: u64 = 500_000_000;
/// 2026-11-22T05:00:00Z.
const T0: u64 = 1_795_323_600_000_000_000;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn row(link: u32, w: u64) -> Rollup {
    Rollup {
        link_id: link,
        window_start_ns: T0 + w * W,
        boot_tag: 3,
        window_ns: W,
        complete: !w.is_multiple_of(5),
        tx_bytes: 1000 * u64::from(link) + w,
        rx_rate_mean_bps: w as f64 / 3.0,
        rtt_min_ns: w.is_multiple_of(2).then_some(w * 10),
        tcp_rtt_samples: w % 3,
        tcp_rtt_mean_ns: (!w.is_multiple_of(3)).then_some(30_000_000 + w),
        owd_samples: (w % 4) as u32,
        owd_up_mean_ns: (!w.is_multiple_of(4)).then_some(-(w as i64)),
        owd_error_ns: (!w.is_multiple_of(4)).then_some(500_000),
        ..Default::default()
    }
}

fn linkpulse(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_linkpulse"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run linkpulse");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn export_and_resync_from_the_command_line() {
    let dir = Dir(std::env::temp_dir().join(format!("lp-tools-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("dir");
    let data = dir.0.join("store");
    let cfg = dir.0.join("linkpulse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[router]\nid = \"r1\"\nsite = \"s\"\n[store]\ndata_dir = \"{}\"\n\
             [[forward]]\nname = \"central\"\nurl = \"http://127.0.0.1:9\"\n\
             [[link]]\ninterface = \"wwan0\"\n[[link]]\ninterface = \"wwan1\"\nlabel = \"modem B\"\n",
            data.display()
        ),
    )
    .expect("config");
    let cfg = cfg.to_str().expect("utf8 path");
    // 100 windows of two links; the destination has them all.
    {
        let store = Store::start_local(LocalConfig::new(&data)).expect("store");
        let rows: Vec<_> = (0..100).flat_map(|w| [row(0, w), row(1, w)]).collect();
        let put = store.put_rollups(&rows).expect("put");
        store.set_cursor("central", put.last_seq).expect("cursor");
        store.stop();
    }
    // Windows 10..30 of link 1 (by label), --from in RFC 3339, --to in unix seconds.
    let from = "2026-11-22T05:00:05Z";
    let to = format!("{}", (T0 + 30 * W) / 1_000_000_000);
    let (ok, csv, err) = linkpulse(&[
        "export", "--config", cfg, "--link", "modem B", "--from", from, "--to", &to, "--format",
        "csv",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("window_start_utc,seq,link_id,window_start_ns"),
        "{csv}"
    );
    assert_eq!(lines.len(), 21, "{csv}");
    assert!(
        lines[1].starts_with("2026-11-22T05:00:05.000000000Z,"),
        "{}",
        lines[1]
    );
    let header: Vec<&str> = lines[0].split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
    for (i, l) in lines[1..].iter().enumerate() {
        let f: Vec<&str> = l.split(',').collect();
        let w = 10 + i as u64;
        assert_eq!(f.len(), header.len(), "{l}");
        assert_eq!(f[col("tcp_rtt_samples")], (w % 3).to_string());
        let some = |on: bool, v: String| if on { v } else { String::new() };
        assert_eq!(
            f[col("tcp_rtt_mean_ns")],
            some(!w.is_multiple_of(3), (30_000_000 + w).to_string())
        );
        assert_eq!(f[col("tcp_rtt_max_ns")], "");
        assert_eq!(
            f[col("owd_up_mean_ns")],
            some(!w.is_multiple_of(4), format!("-{w}"))
        );
        assert_eq!(
            f[col("owd_error_ns")],
            some(!w.is_multiple_of(4), "500000".into())
        );
        assert_eq!(f[2], "1");
        assert_eq!(f[3], (T0 + w * W).to_string());
        assert_eq!(f[11], (1000 + w).to_string(), "tx_bytes of {l}");
        assert_eq!(f[6], (!w.is_multiple_of(5)).to_string());
    }
    assert!(err.contains("20 rollups exported"), "{err}");

    // JSON: the same rows, every field; line protocol: one line each with the router's tags.
    let (ok, json, err) = linkpulse(&[
        "export", "--config", cfg, "--link", "1", "--from", from, "--to", &to, "--format", "json",
    ]);
    assert!(ok, "{err}");
    let got: Vec<Rollup> = serde_json::from_str(&json).expect("a JSON array of rollups");
    let want: Vec<Rollup> = (10..30).map(|w| row(1, w)).collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            Rollup {
                seq: 0,
                ..g.clone()
            },
            *w
        );
    }
    // While another process holds the store (as the daemon does), the tool uses its instance.
    let held = Store::start_local(LocalConfig::new(&data)).expect("store held");
    let (ok, lp, err) = linkpulse(&[
        "export",
        "--config",
        cfg,
        "--link",
        "wwan0",
        "--from",
        "0",
        "--to",
        "2026-11-23T00:00:00Z",
        "--format",
        "lp",
    ]);
    assert!(ok, "{err}");
    assert_eq!(lp.lines().count(), 100);
    assert!(
        lp.lines()
            .all(|l| l.starts_with("linkpulse_rollup,boot=3,link=0,router=r1,site=s ")),
        "{lp}"
    );
    assert!(
        held.supervised_pid().is_some(),
        "the holder's instance still runs"
    );

    // Resync from window 40 on: the cursor goes back to just before its first row.
    let first_40 = held
        .read_after(0, 1000)
        .expect("read")
        .into_iter()
        .find(|r| r.window_start_ns == T0 + 40 * W)
        .expect("window 40")
        .seq;
    let since = format!("{}", (T0 + 40 * W) / 1_000_000_000);
    let (ok, out, err) = linkpulse(&[
        "resync",
        "--config",
        cfg,
        "--destination",
        "central",
        "--since",
        &since,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("sent again"), "{out}");
    assert_eq!(
        held.get_cursor("central").expect("cursor"),
        Some(first_40 - 1)
    );
    held.stop();

    // Bad input: clear errors, non-zero exit.
    let (ok, _, err) = linkpulse(&[
        "export",
        "--config",
        cfg,
        "--link",
        "wwan9",
        "--from",
        "yesterday",
        "--to",
        "0",
    ]);
    assert!(!ok && err.contains("RFC 3339"), "{err}");
    let (ok, _, err) = linkpulse(&[
        "export", "--config", cfg, "--link", "wwan9", "--from", "0", "--to", "1",
    ]);
    assert!(!ok && err.contains("wwan0, wwan1"), "{err}");
    let (ok, _, err) = linkpulse(&[
        "export", "--config", cfg, "--link", "0", "--from", "100", "--to", "10",
    ]);
    assert!(!ok && err.contains("must be before"), "{err}");
    let (ok, _, err) = linkpulse(&[
        "resync",
        "--config",
        cfg,
        "--destination",
        "nope",
        "--since",
        "0",
    ]);
    assert!(!ok && err.contains("configured: central"), "{err}");
}
