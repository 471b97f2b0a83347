//! `cargo xtask test`: the one command that says whether the workspace is
//! good: setup, format check, clippy, a few seconds of each fuzz target,
//! build, `cargo test --workspace`, with leak checks around the suite because
//! the end-to-end tests change the machine.

use std::process::Command;

use anyhow::{Context as _, Result, anyhow};

use crate::{cmd, fuzz, leaks, setup, workspace};

/// Runs every stage in order; `cargo_test_args` go to `cargo test --workspace`.
pub fn test(cargo_test_args: &[String]) -> Result<()> {
    setup::setup()?;
    check_formatting()?;
    check_lints()?;
    check_one_crypto_provider()?;
    fuzz::smoke()?;
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
        .context("the code is not formatted: run `cargo fmt --all`, then rerun")?;
    // The fuzz crate is a workspace of its own.
    cmd::run(Command::new("cargo").args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"]))
        .context("the fuzz targets are not formatted: run `cargo fmt` in fuzz/, then rerun")
}

/// Crates that carry their own crypto: the workspace uses aws-lc-rs only
/// (one provider: one set of algorithms, one thing to patch), so none of
/// these may come back into what the binaries link.
const OTHER_CRYPTO: &[&str] = &["ring", "openssl", "openssl-sys", "boring"];

/// `cargo tree` of every workspace crate's normal dependencies must name
/// none of [`OTHER_CRYPTO`].
fn check_one_crypto_provider() -> Result<()> {
    cmd::step("checking that aws-lc-rs is the only crypto provider");
    let tree = cmd::output(Command::new("cargo").args([
        "tree",
        "--workspace",
        "--edges",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]))?;
    let found = other_crypto(&tree);
    if found.is_empty() {
        return Ok(());
    }
    Err(anyhow!(
        "{} in the dependency tree; see which crate pulls it in with `cargo tree -e normal -i {}`, and put that crate on its aws-lc-rs feature",
        found.join(", "),
        found[0].split(' ').next().unwrap_or_default()
    ))
}

/// The packages of `tree` (one `name vX.Y.Z` a line) that are in [`OTHER_CRYPTO`].
fn other_crypto(tree: &str) -> Vec<String> {
    let mut found: Vec<String> = tree
        .lines()
        .filter(|line| {
            line.split(' ')
                .next()
                .is_some_and(|name| OTHER_CRYPTO.contains(&name))
        })
        .map(|line| line.split(" (").next().unwrap_or(line).to_owned())
        .collect();
    found.sort();
    found.dedup();
    found
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

    #[test]
    fn only_other_crypto_crates_are_found() {
        let tree = "ferry-agent v0.1.0 (/work/agent)\naws-lc-rs v1.19.0\nring v0.17.14\nstring-interner v0.1.0\nring v0.17.14 (*)\n";
        assert_eq!(super::other_crypto(tree), ["ring v0.17.14"]);
        assert!(super::other_crypto("aws-lc-rs v1.19.0\nrustls v0.23.31\n").is_empty());
    }
}
