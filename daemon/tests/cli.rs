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
