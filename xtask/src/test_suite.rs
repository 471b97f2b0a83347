//! `cargo xtask test`: the one command that says whether the workspace is
//! good: setup, format check, clippy, build, `cargo test --workspace`, with
//! leak checks around the suite because the end-to-end tests change the machine.

use std::process::Command;

use anyhow::{Context as _, Result, anyhow};

use crate::{cmd, leaks, setup, workspace};

/// Runs every stage in order; `cargo_test_args` go to `cargo test --workspace`.
pub fn test(cargo_test_args: &[String]) -> Result<()> {
    setup::setup()?;
    check_formatting()?;
    check_lints()?;
    workspace::build_binaries()?;
    leaks::remove_stale()?;
    let suite = run_suite(cargo_test_args);
    let left_behind = leaks::ensure_none_left();
    match (suite, left_behind) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(failed), Ok(())) | (Ok(()), Err(failed)) => Err(failed),
        (Err(failed), Err(left)) => Err(anyhow!("{failed:#}\nand {left:#}")),
    }
}

fn check_formatting() -> Result<()> {
    cmd::step("checking formatting");
    cmd::run(Command::new("cargo").args(["fmt", "--all", "--check"]))
        .context("the code is not formatted: run `cargo fmt --all`, then rerun")
}

/// Clippy on every target, warnings as errors: a lint is fixed when it
/// appears, not collected.
fn check_lints() -> Result<()> {
    cmd::step("checking lints");
    cmd::run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found problems: see its output above, fix them, then rerun")
}

/// The whole suite, unit and end-to-end tests, with backtraces on panics.
/// Prints nothing after cargo's own summary.
fn run_suite(cargo_test_args: &[String]) -> Result<()> {
    cmd::step("running the test suite");
    let mut suite = Command::new("cargo");
    suite.env("RUST_BACKTRACE", "1").arg("test");
    if !names_packages(cargo_test_args) {
        suite.arg("--workspace");
    }
    suite.args(cargo_test_args);
    cmd::run(&mut suite).context("tests failed: see cargo's output above")
}

/// Whether the arguments pick packages (`-p NAME`, `--package NAME`): then
/// `--workspace` is left out, because cargo would let it win and test everything.
fn names_packages(cargo_test_args: &[String]) -> bool {
    let mut cargo_args = cargo_test_args.iter().take_while(|arg| *arg != "--");
    cargo_args.any(|arg| {
        arg.starts_with("--package") || (arg.starts_with("-p") && !arg.starts_with("--"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| (*arg).to_owned()).collect()
    }

    #[test]
    fn tells_whether_packages_are_named() {
        assert!(names_packages(&strings(&[
            "-p",
            "ferry-tests",
            "two_nodes"
        ])));
        assert!(names_packages(&strings(&["--package=xtask"])));
        assert!(!names_packages(&strings(&["two_nodes", "--", "-p"])));
        assert!(!names_packages(&strings(&["--no-fail-fast"])));
    }
}
