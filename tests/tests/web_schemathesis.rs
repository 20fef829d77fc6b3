//! schemathesis (PyPI, in the venv `cargo xtask setup` makes under ~/.cache/linkpulse/) against
//! the live API with its own OpenAPI document: no 5xx and every response matches its schema.
//! Bounded: a few examples per operation; the endless SSE stream is left out.
mod common;

use std::{path::PathBuf, process::Command, time::Duration};

use common::{plain, Run, TempDir};
use linkpulse_testbed::{ModemKind, TestbedOptions};

fn schemathesis() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/linkpulse/schemathesis-venv/bin/schemathesis")
}

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_mismatch() {
    let st = schemathesis();
    assert!(
        st.exists(),
        "{} is missing: run `cargo xtask setup` (it makes the venv)",
        st.display()
    );
    let store_dir = TempDir::new("lpwst-db");
    let run = Run::start_full(
        "lpwst",
        vec![plain("wwan0", ModemKind::Veth)],
        &[],
        TestbedOptions::default(),
        None,
        Some(store_dir.0.clone()),
    );
    // Some history to serve.
    std::thread::sleep(Duration::from_secs(3));
    let base = format!("http://{}", run.daemon().http_addr());
    let report = TempDir::new("lpwst-report");
    let out = Command::new("ip")
        .args(["netns", "exec", run.bed.router_ns()])
        .arg(&st)
        .args(["run", &format!("{base}/api/v1/openapi.json")])
        .args(["--url", &base])
        .args(["--checks", "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance"])
        .args(["--max-examples", "25", "--generation-deterministic", "--workers", "1"])
        .args(["--exclude-path", "/api/v1/live"])
        .args(["--request-timeout", "20"])
        .arg("--report-dir")
        .arg(&report.0)
        .env("NO_COLOR", "1")
        // Its cache (.schemathesis/) goes beside the report, not into the repo.
        .current_dir(&report.0)
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(text.contains("passed"), "{text}");
}
