//! `cargo xtask test`: format check, clippy, then the whole test suite, with one summary at the end.

use crate::{cmd, cross, setup};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::process::Command;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and clippy (both are lints; the tests still run).
    #[arg(long)]
    no_lint: bool,
    /// Passed to `cargo test` as they are, e.g. `-- demo_links` or `-- -p linkpulse -- --nocapture`.
    #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
    cargo_test_args: Vec<String>,
}

/// What each step ended with, for the summary.
struct Step {
    name: &'static str,
    outcome: Result<()>,
    /// Did not run, and says why itself; counts as neither passed nor failed.
    skipped: bool,
    /// Wall time, for the summary: CI has a budget and this says where it went.
    secs: f64,
}

/// Runs one step and times it.
fn step(name: &'static str, f: impl FnOnce() -> Result<()>) -> Step {
    let t = Instant::now();
    let outcome = f();
    Step {
        name,
        outcome,
        skipped: false,
        secs: t.elapsed().as_secs_f64(),
    }
}

pub fn run(args: &TestArgs) -> Result<()> {
    let start = Instant::now();
    let setup_step = step("setup", setup::run);
    if let Err(err) = setup_step.outcome {
        return Err(err.context("the set-up failed, so nothing was built or tested"));
    }
    let mut steps = vec![setup_step];
    // Every step runs even after a failure: one CI run then reports all that is wrong.
    if !args.no_lint {
        steps.push(step("fmt", || {
            cmd::cargo(&["fmt", "--all", "--check"])
                .and_then(|mut c| cmd::run(&mut c))
                .context("formatting differs. Fix: run `cargo fmt --all` and commit")
        }));
        steps.push(step("clippy", || {
            cmd::cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ])
            .and_then(|mut c| cmd::run(&mut c))
            .context("clippy found problems (listed above). Fix them, or see why the build failed")
        }));
    }
    // Built apart from the run so that the summary tells compile time from test time.
    steps.push(step("build", || {
        cmd::run(&mut test_command(&args.cargo_test_args, true)?)
            .context("the tests did not build (errors above)")
    }));
    let (mut counts, mut slow) = (None, Vec::new());
    steps.push(step("tests", || {
        let (outcome, c, binaries) = run_counting(test_command(&args.cargo_test_args, false)?);
        (counts, slow) = (c, binaries);
        outcome
    }));
    let (aarch64_step, cross_counts) = aarch64(&args.cargo_test_args);
    steps.push(aarch64_step);
    add_counts(&mut counts, cross_counts);

    let failed: Vec<&Step> = steps.iter().filter(|s| s.outcome.is_err()).collect();
    for step in &failed {
        if let Err(err) = &step.outcome {
            esay!("error in {}: {err:#}", step.name);
        }
    }
    let states: Vec<String> = steps
        .iter()
        .map(|s| {
            format!(
                "{} {} {:.0} s",
                s.name,
                match (&s.outcome, s.skipped) {
                    (Err(_), _) => "FAILED",
                    (Ok(()), true) => "skipped",
                    (Ok(()), false) => "ok",
                },
                s.secs
            )
        })
        .collect();
    say!(
        "xtask test: {} ({}) in {:.0} s",
        if failed.is_empty() { "ok" } else { "FAILED" },
        states.join(", "),
        start.elapsed().as_secs_f64()
    );
    // The totals over every test binary, in the plain "N passed, N failed" form that reads the
    // same whatever the runner; only when cargo test got as far as running tests.
    if let Some(c) = counts {
        say!(
            "tests: {} passed, {} failed, {} skipped",
            c.passed,
            c.failed,
            c.ignored
        );
    }
    slow.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slowest: Vec<String> = slow
        .iter()
        .take(8)
        .map(|(name, secs)| format!("{name} {secs:.0} s"))
        .collect();
    if !slowest.is_empty() {
        say!("slowest test binaries: {}", slowest.join(", "));
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} steps failed: {}",
            failed.len(),
            steps.len(),
            failed.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

#[derive(Default, Debug, PartialEq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// `cargo test --workspace --release ARGS`, or only its build (`--no-run`, without the
/// arguments after `--`, which are libtest's).
fn test_command(extra: &[String], build_only: bool) -> Result<Command> {
    // `--workspace` would override a `-p` of the user's, so it is added only without one.
    let mut test = if selects_packages(extra) {
        cmd::cargo(&["test", "--release"])?
    } else {
        cmd::cargo(&["test", "--workspace", "--release"])?
    };
    if build_only {
        let cargo_args = extra.iter().take_while(|a| *a != "--");
        test.args(cargo_args).arg("--no-run");
    } else {
        // Every test binary runs even after one fails, like the steps: one CI run reports all.
        test.arg("--no-fail-fast").args(extra);
    }
    Ok(test)
}

/// The aarch64 step: the pure-logic crates' tests (and the daemon's lib tests) built for aarch64
/// and run under qemu-user, or one line saying why it is skipped.
fn aarch64(extra: &[String]) -> (Step, Option<Counts>) {
    let name = "aarch64";
    let t = Instant::now();
    let commands = match cross::test_commands(extra) {
        Ok(cross::Plan::Run(commands)) => commands,
        Ok(cross::Plan::Skip(reason)) => {
            say!("aarch64: skipped ({reason})");
            let step = Step {
                name,
                outcome: Ok(()),
                skipped: true,
                secs: t.elapsed().as_secs_f64(),
            };
            return (step, None);
        }
        Err(err) => {
            let step = Step {
                name,
                outcome: Err(err),
                skipped: false,
                secs: t.elapsed().as_secs_f64(),
            };
            return (step, None);
        }
    };
    let mut counts = None;
    let mut outcome = Ok(());
    // Both runs even if the first fails, like the steps themselves.
    for command in commands {
        let (result, c, _) = run_counting(command);
        add_counts(&mut counts, c);
        if outcome.is_ok() {
            outcome = result.context(
                "the aarch64 build or its tests under qemu-user failed (output above); the same \
                 tests on the host are the \"tests\" step",
            );
        }
    }
    let step = Step {
        name,
        outcome,
        skipped: false,
        secs: t.elapsed().as_secs_f64(),
    };
    (step, counts)
}

fn add_counts(total: &mut Option<Counts>, more: Option<Counts>) {
    if let Some(c) = more {
        let total = total.get_or_insert_with(Counts::default);
        total.passed += c.passed;
        total.failed += c.failed;
        total.ignored += c.ignored;
    }
}

/// What one `cargo test` run printed: its outcome, the totals, and each test binary's time.
type Counted = (Result<()>, Option<Counts>, Vec<(String, f64)>);

/// Runs a `cargo test` command, echoing its output (stderr merged into stdout, so each "Running"
/// line stays next to its results) while adding up the "test result:" lines of every test binary
/// and doc-test run, and noting how long each binary took.
fn run_counting(mut test: Command) -> Counted {
    let mut counts: Option<Counts> = None;
    let mut times = Vec::new();
    let shown = cmd::display(&test);
    let outcome = (|| {
        let (reader, writer) = std::io::pipe().context("could not create a pipe for cargo test")?;
        test.stdout(writer.try_clone()?).stderr(writer);
        esay!("$ {shown}");
        let mut child = test
            .spawn()
            .with_context(|| format!("could not start `{shown}`"))?;
        // The command holds the pipe's write ends: without dropping it the read never ends.
        drop(test);
        let mut out = std::io::stdout();
        let mut current = String::new();
        for line in BufReader::new(reader).lines() {
            // A test may print invalid UTF-8; losing that one line beats losing the count.
            let Ok(line) = line else { continue };
            // Echo failures do not stop the run: the exit status below is what counts.
            let _ = writeln!(out, "{line}");
            if let Some(name) = running_binary(&line) {
                current = name.to_string();
            }
            add_counts(&mut counts, parse_test_result(&line));
            if let Some(secs) = finished_in(&line) {
                times.push((current.clone(), secs));
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!(
                "`{shown}` failed ({}); the failing tests are listed above",
                cmd::describe(status)
            );
        }
        Ok(())
    })();
    (outcome, counts, times)
}

/// Cargo's "     Running tests/chaos.rs (target/release/deps/chaos-0123)" → "tests/chaos.rs";
/// "   Doc-tests linkpulse" → "Doc-tests linkpulse".
fn running_binary(line: &str) -> Option<&str> {
    let line = line.trim_start();
    if let Some(rest) = line.strip_prefix("Running ") {
        return Some(rest.split(" (").next().unwrap_or(rest));
    }
    line.starts_with("Doc-tests ").then_some(line)
}

/// The "finished in 12.34s" at the end of libtest's result line.
fn finished_in(line: &str) -> Option<f64> {
    let rest = line.trim().strip_prefix("test result: ")?;
    rest.rsplit_once("finished in ")?
        .1
        .trim_end_matches('s')
        .parse()
        .ok()
}

/// Whether cargo test's own arguments (those before a `--`) pick packages with `-p`/`--package`.
fn selects_packages(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-p" || a.starts_with("--package") || (a.starts_with("-p") && a.len() > 2))
}

/// libtest's "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...".
fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, fields) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    for field in fields.split(';') {
        let mut words = field.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            _ => {}
        }
    }
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_result_lines() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 0.01s"
            ),
            Some(Counts { passed: 3, failed: 0, ignored: 1 })
        );
        assert_eq!(
            parse_test_result(
                "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some(Counts {
                passed: 1,
                failed: 2,
                ignored: 0
            })
        );
        assert_eq!(parse_test_result("test foo ... ok"), None);
    }

    #[test]
    fn binary_times() {
        assert_eq!(
            running_binary("     Running tests/chaos.rs (target/release/deps/chaos-0123)"),
            Some("tests/chaos.rs")
        );
        assert_eq!(
            running_binary("   Doc-tests linkpulse"),
            Some("Doc-tests linkpulse")
        );
        assert_eq!(running_binary("test running ... ok"), None);
        assert_eq!(
            finished_in("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 12.50s"),
            Some(12.5)
        );
        assert_eq!(finished_in("test result: ok. 3 passed"), None);
    }

    #[test]
    fn package_selection() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(selects_packages(&args(&["-p", "xtask", "foo"])));
        assert!(selects_packages(&args(&["-pxtask"])));
        assert!(selects_packages(&args(&["--package=xtask"])));
        assert!(!selects_packages(&args(&["some_test"])));
        assert!(
            !selects_packages(&args(&["foo", "--", "-p"])),
            "after -- it is libtest's"
        );
    }
}
