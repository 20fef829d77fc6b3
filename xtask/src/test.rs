//! `cargo xtask test`: format check, clippy, then the whole test suite, with one summary at the end.

use crate::{cmd, cross, setup};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
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
}

pub fn run(args: &TestArgs) -> Result<()> {
    let start = Instant::now();
    setup::run()?;
    let mut steps = Vec::new();
    // Every step runs even after a failure: one CI run then reports all that is wrong.
    if !args.no_lint {
        steps.push(Step {
            name: "fmt",
            outcome: cmd::cargo(&["fmt", "--all", "--check"])
                .and_then(|mut c| cmd::run(&mut c))
                .context("formatting differs. Fix: run `cargo fmt --all` and commit"),
            skipped: false,
        });
        steps.push(Step {
            name: "clippy",
            outcome: cmd::cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ])
            .and_then(|mut c| cmd::run(&mut c))
            .context("clippy found problems (listed above). Fix them, or see why the build failed"),
            skipped: false,
        });
    }
    let (outcome, mut counts) = cargo_test(&args.cargo_test_args);
    steps.push(Step {
        name: "tests",
        outcome,
        skipped: false,
    });
    let (step, cross_counts) = aarch64(&args.cargo_test_args);
    steps.push(step);
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
                "{} {}",
                s.name,
                match (&s.outcome, s.skipped) {
                    (Err(_), _) => "FAILED",
                    (Ok(()), true) => "skipped",
                    (Ok(()), false) => "ok",
                }
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

/// Runs `cargo test --workspace --release ARGS`, echoing its stdout while adding up the
/// "test result:" lines of every test binary and doc-test run.
fn cargo_test(extra: &[String]) -> (Result<()>, Option<Counts>) {
    // `--workspace` would override a `-p` of the user's, so it is added only without one.
    let test = if selects_packages(extra) {
        cmd::cargo(&["test", "--release"])
    } else {
        cmd::cargo(&["test", "--workspace", "--release"])
    };
    match test {
        Ok(mut test) => {
            test.args(extra);
            run_counting(test)
        }
        Err(err) => (Err(err), None),
    }
}

/// The aarch64 step: the pure-logic crates' tests (and the daemon's lib tests) built for aarch64
/// and run under qemu-user, or one line saying why it is skipped.
fn aarch64(extra: &[String]) -> (Step, Option<Counts>) {
    let name = "aarch64";
    let commands = match cross::test_commands(extra) {
        Ok(cross::Plan::Run(commands)) => commands,
        Ok(cross::Plan::Skip(reason)) => {
            say!("aarch64: skipped ({reason})");
            let step = Step {
                name,
                outcome: Ok(()),
                skipped: true,
            };
            return (step, None);
        }
        Err(err) => {
            let step = Step {
                name,
                outcome: Err(err),
                skipped: false,
            };
            return (step, None);
        }
    };
    let mut counts = None;
    let mut outcome = Ok(());
    // Both runs even if the first fails, like the steps themselves.
    for command in commands {
        let (result, c) = run_counting(command);
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

/// Runs a `cargo test` command, echoing its stdout while adding up the "test result:" lines of
/// every test binary and doc-test run.
fn run_counting(mut test: Command) -> (Result<()>, Option<Counts>) {
    let mut counts: Option<Counts> = None;
    let outcome = (|| {
        test.stdout(Stdio::piped());
        esay!("$ {}", cmd::display(&test));
        let mut child = test
            .spawn()
            .with_context(|| format!("could not start `{}`", cmd::display(&test)))?;
        let stdout = child
            .stdout
            .take()
            .context("cargo test's stdout was not captured")?;
        let mut out = std::io::stdout();
        for line in BufReader::new(stdout).lines() {
            // A test may print invalid UTF-8; losing that one line beats losing the count.
            let Ok(line) = line else { continue };
            // Echo failures do not stop the run: the exit status below is what counts.
            let _ = writeln!(out, "{line}");
            add_counts(&mut counts, parse_test_result(&line));
        }
        let status = child.wait()?;
        if !status.success() {
            bail!(
                "`{}` failed ({}); the failing tests are listed above",
                cmd::display(&test),
                cmd::describe(status)
            );
        }
        Ok(())
    })();
    (outcome, counts)
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
