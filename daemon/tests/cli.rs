//! The binary's own behaviour on bad input: `check-config` names the file, line and fix, and
//! exits non-zero; a good file is summarised.
use std::process::Command;

fn check(text: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("lp-cli-{}-{}", std::process::id(), text.len()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let file = dir.join("linkpulse.toml");
    std::fs::write(&file, text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_linkpulse"))
        .args(["check-config"])
        .arg(&file)
        .output()
        .expect("run linkpulse");
    let _ = std::fs::remove_dir_all(&dir);
    let all =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), all)
}

const GOOD: &str = "[router]\nid = \"r1\"\nsite = \"s\"\n\n[[link]]\ninterface = \"wwan0\"\n";

#[test]
fn good_config_is_summarised() {
    let (ok, out) = check(GOOD);
    assert!(ok, "{out}");
    assert!(
        out.contains("ok") && out.contains("1 link(s)") && out.contains("100 µs"),
        "{out}"
    );
}

#[test]
fn errors_name_the_line_and_the_fix() {
    for (text, line, words) in [
        (GOOD.replace("interface", "iface"), 6, "unknown field"),
        (
            format!("{GOOD}[sampling]\nbin_width_us = 300\n"),
            8,
            "does not divide one second",
        ),
        (
            format!("{GOOD}[[link]]\ninterface = \"wwan0\"\n"),
            8,
            "already used by the link on line 6",
        ),
        (
            GOOD.replace("id = \"r1\"", "id = \"\""),
            2,
            "router.id is empty",
        ),
    ] {
        let (ok, out) = check(&text);
        assert!(!ok, "must fail: {text}");
        assert!(
            out.contains(&format!("linkpulse.toml:{line}:")),
            "line {line} in: {out}"
        );
        assert!(out.contains(words), "{words:?} in: {out}");
    }
}

#[test]
fn missing_file_says_how_to_fix() {
    let out = Command::new(env!("CARGO_BIN_EXE_linkpulse"))
        .args(["check-config", "/nonexistent/linkpulse.toml"])
        .output()
        .expect("run linkpulse");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/linkpulse.toml") && err.contains("--config"),
        "{err}"
    );
}

/// `linkpulse run` takes SIGTERM synchronously (blocked in every thread); the Tarantool it
/// starts must not inherit that mask, or it ignores the daemon's stop. Needs root (eBPF).
#[test]
fn run_starts_its_store_with_signals_unblocked_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("lp-cli-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let cfg = dir.join("linkpulse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[router]\nid = \"r1\"\nsite = \"s\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [stream]\nenabled = false\n[store]\ndata_dir = \"{}\"\n",
            dir.join("store").display()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_linkpulse"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run linkpulse");
    let store = dir.join("store").display().to_string();
    let find = || {
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| {
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
                comm.starts_with("tarantool") && cwd.to_string_lossy().starts_with(&store)
            })
    };
    let t = std::time::Instant::now();
    let tarantool = loop {
        if let Some(p) = find() {
            break p;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "no tarantool started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let status = std::fs::read_to_string(tarantool.path().join("status")).expect("status");
    let blocked = status
        .lines()
        .find(|l| l.starts_with("SigBlk:"))
        .expect("SigBlk")
        .to_string();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code = child.wait().expect("wait");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        blocked.ends_with("0000000000000000"),
        "tarantool inherited blocked signals: {blocked}"
    );
    assert!(code.success(), "clean exit on SIGTERM: {code:?}");
    assert!(find().is_none(), "tarantool stopped with the daemon");
}
