//! Ferry's developer workflows, run as `cargo xtask <task>` (an alias in
//! `.cargo/config.toml`). Plain Rust instead of shell scripts so the steps are
//! readable, checked by the compiler, and behave the same on every machine.
//!
//! - `setup`: installs and mounts everything the build and the tests need;
//! - `test`: setup, format check, lints, a short fuzz run, build, leak check,
//!   `cargo test --workspace`, leak check again;
//! - `demo`: setup, build, then runs `target/debug/ferry-demo`;
//! - `bench`: setup, release build, then runs `target/release/ferry-bench`;
//! - `fuzz`: runs the fuzz targets of `fuzz/` (cargo-fuzz, nightly) for a while.

mod bench;
mod cmd;
mod demo;
mod fuzz;
mod leaks;
mod mounts;
mod setup;
mod test_suite;
mod workspace;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Ferry's developer workflows"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install and mount what building and testing Ferry needs (root; idempotent).
    ///
    /// Debian packages (LLVM 22, bpftool, iproute2, tcpdump), the nightly
    /// toolchain's rust-src, bpf-linker 0.13.0 built against LLVM 22, cargo-fuzz, bpffs at
    /// /sys/fs/bpf and a cgroup v2 hierarchy.
    Setup,
    /// Run setup, check formatting, build, and run the whole test suite.
    ///
    /// Leftovers of earlier runs (ferry-* network namespaces, ferry-sim
    /// cgroups, pins under /sys/fs/bpf/ferry, ferry-agent/ferry-testapp/ferry-load
    /// processes) are removed first; any the suite leaves behind fail the run.
    /// Example: `cargo xtask test -- -p ferry-tests two_nodes -- --nocapture`.
    Test {
        /// Passed to `cargo test --workspace` as they are (`--workspace` is left out
        /// when they name packages with `-p`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run setup, build in release, and benchmark Ferry against no mesh,
    /// stunnel and HAProxy (`target/release/ferry-bench`; `-- --quick` for a smoke run).
    Bench {
        /// Passed to ferry-bench as they are.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        bench_args: Vec<String>,
    },
    /// Fuzz the parsers on Ferry's trust boundaries (`fuzz/`, cargo-fuzz with nightly).
    ///
    /// Each target runs in turn for --seconds over its working corpus
    /// (fuzz/corpus/<target>, which the committed seeds in fuzz/seeds/<target> are
    /// copied into), then a table shows executions and coverage per target. A crash,
    /// hang, leak or out-of-memory fails the run, naming the input libFuzzer saved in
    /// fuzz/artifacts/<target>/. Example: `cargo xtask fuzz --seconds 600 jwt`.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// The targets to run (default: every file of fuzz/fuzz_targets/).
        targets: Vec<String>,
    },
    /// Run setup, build, and start the demo (`target/debug/ferry-demo`).
    Demo {
        /// Passed to ferry-demo as they are.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        demo_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(&err);
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    let root = workspace::root();
    std::env::set_current_dir(&root)
        .with_context(|| format!("cannot enter the workspace root {}", root.display()))?;
    match task {
        Task::Setup => setup::setup(),
        Task::Test { cargo_test_args } => test_suite::test(&cargo_test_args),
        Task::Demo { demo_args } => demo::demo(&demo_args),
        Task::Bench { bench_args } => bench::bench(&bench_args),
        Task::Fuzz { seconds, targets } => fuzz::fuzz(seconds, &targets),
    }
}

/// Prints what failed and why, without the backtrace anyhow would add when
/// `RUST_BACKTRACE` is set: the error chain already says where xtask stopped.
fn report(err: &anyhow::Error) {
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  because: {cause}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(argv: &[&str]) -> Vec<String> {
        match Cli::try_parse_from(argv).unwrap().task {
            Task::Test { cargo_test_args } => cargo_test_args,
            _ => panic!("not the test task"),
        }
    }

    #[test]
    fn passes_everything_after_the_first_double_dash_to_cargo_test() {
        let args = test_args(&[
            "xtask",
            "test",
            "--",
            "-p",
            "ferry-tests",
            "two",
            "--",
            "--nocapture",
        ]);
        assert_eq!(args, ["-p", "ferry-tests", "two", "--", "--nocapture"]);
    }

    #[test]
    fn passes_arguments_without_a_double_dash_too() {
        assert_eq!(
            test_args(&["xtask", "test", "two", "--", "--nocapture"]),
            ["two", "--", "--nocapture"]
        );
        assert!(test_args(&["xtask", "test"]).is_empty());
    }

    #[test]
    fn passes_demo_arguments_through() {
        let Task::Demo { demo_args } = Cli::try_parse_from(["xtask", "demo", "--", "--nodes", "3"])
            .unwrap()
            .task
        else {
            panic!("not the demo task")
        };
        assert_eq!(demo_args, ["--nodes", "3"]);
    }
}
