//! `cargo xtask bench`: Ferry side by side with no mesh, stunnel and HAProxy.
//! Benchmarks run optimized binaries, so this builds the release profile
//! (the tests and the demo use debug) and then becomes `ferry-bench`, which
//! prints the table, writes `target/bench/results.json` and puts the table
//! into BENCHMARKS.md.

use std::process::Command;

use anyhow::Result;

use crate::{cmd, setup, workspace};

pub fn bench(bench_args: &[String]) -> Result<()> {
    setup::setup()?;
    cmd::step("building the release binaries the benchmark runs");
    cmd::run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "ferry-agent",
        "-p",
        "ferry-ca",
        "-p",
        "ferry-tests",
        "--bins",
    ]))
    .map_err(|err| err.context("the release build failed"))?;
    let binary = workspace::target_dir().join("release").join("ferry-bench");
    let mut command = Command::new(binary);
    command
        .args(["--markdown", "BENCHMARKS.md"])
        .args(bench_args);
    Err(cmd::exec(&mut command))
}
