//! `cargo xtask fuzz`: runs the libFuzzer targets of `fuzz/` (cargo-fuzz,
//! nightly, AddressSanitizer) one after the other for a given time, prints
//! what each did (executions, coverage, corpus), and fails on any crash,
//! hang, leak or out-of-memory with the input that caused it. `cargo xtask
//! test` runs the same for a few seconds per target over the committed seeds.
//!
//! The sanitized build lives in `fuzz/target`, apart from the workspace's
//! `target/`, so fuzzing never invalidates the stable build.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup, workspace};

/// The fuzz crate, relative to the workspace root.
const FUZZ_DIR: &str = "fuzz";
/// How long `cargo xtask fuzz` runs each target unless told otherwise.
pub const DEFAULT_SECONDS: u64 = 60;
/// How long `cargo xtask test` runs each target: enough to run every seed
/// and a few thousand mutations, so a target that stops building or crashes
/// on what it was made for fails the suite.
pub const SMOKE_SECONDS: u64 = 5;
/// One input running longer than this is a hang, reported like a crash.
const INPUT_TIMEOUT_SECS: u64 = 10;
/// libFuzzer's memory limit (its default, said out loud).
const RSS_LIMIT_MB: u64 = 2048;

/// The longest input libFuzzer makes for `target`: a little more than the
/// largest real input, so time goes to inputs of the sizes that occur.
fn max_len(target: &str) -> usize {
    match target {
        // A SPIFFE id or SNI: trust domain ≤255 + namespace ≤63 + ServiceAccount ≤253.
        "spiffe_id" => 1024,
        // A JWKS during a rotation holds a few RSA keys of ~400 bytes each.
        "jwks" => 8192,
        // A Certify request (CSR + token), a token: a few hundred bytes to 2 KB.
        _ => 4096,
    }
}

/// `cargo xtask fuzz`: each of `targets` (all when empty) for `seconds`
/// over its working corpus `fuzz/corpus/<target>`, which starts as a copy
/// of the seeds and keeps what libFuzzer finds between runs.
pub fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    setup::ensure_fuzzing()?;
    let targets = select(&all_targets()?, targets)?;
    build()?;
    let mut runs = Vec::new();
    for target in &targets {
        let corpus = fuzz_dir().join("corpus").join(target);
        copy_seeds(target, &corpus)?;
        runs.push(run(target, seconds, &corpus, None)?);
    }
    report(&runs)
}

/// The fuzz stage of `cargo xtask test`: every target for
/// [`SMOKE_SECONDS`], starting from its seeds only (a fresh corpus each
/// time, so the result does not depend on earlier runs).
pub fn smoke() -> Result<()> {
    cmd::step(&format!(
        "fuzzing every target for {SMOKE_SECONDS} s (cargo xtask fuzz for longer)"
    ));
    let started = Instant::now();
    let targets = all_targets()?;
    build()?;
    let mut runs = Vec::new();
    for target in &targets {
        let corpus = fuzz_dir().join("target/smoke-corpus").join(target);
        if corpus.exists() {
            fs::remove_dir_all(&corpus)
                .with_context(|| format!("cannot empty {}", corpus.display()))?;
        }
        create_dir(&corpus)?;
        runs.push(run(
            target,
            SMOKE_SECONDS,
            &corpus,
            Some(&seeds_of(target)),
        )?);
    }
    report(&runs)?;
    cmd::note(&format!(
        "fuzz stage: {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    workspace::root().join(FUZZ_DIR)
}

fn seeds_of(target: &str) -> PathBuf {
    fuzz_dir().join("seeds").join(target)
}

/// The targets, named as their files in `fuzz/fuzz_targets/` (as each
/// `[[bin]]` of `fuzz/Cargo.toml` is), sorted.
fn all_targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let entries = fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "rs")
            && let Some(stem) = path.file_stem()
        {
            names.push(stem.to_string_lossy().into_owned());
        }
    }
    names.sort();
    if names.is_empty() {
        bail!("{} holds no fuzz target", dir.display());
    }
    Ok(names)
}

/// `asked` (all of `known` when empty), each of which must be known.
fn select(known: &[String], asked: &[String]) -> Result<Vec<String>> {
    if asked.is_empty() {
        return Ok(known.to_vec());
    }
    if let Some(unknown) = asked.iter().find(|name| !known.contains(name)) {
        bail!(
            "there is no fuzz target {unknown:?}; the targets are {}",
            known.join(", ")
        );
    }
    Ok(asked.to_vec())
}

/// The nightly toolchain and the flags every cargo-fuzz command here uses:
/// the same for build and run, so the run does not rebuild.
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(workspace::root())
        // Pinned to fuzz/target whatever the caller's CARGO_TARGET_DIR says.
        .env("CARGO_TARGET_DIR", fuzz_dir().join("target"))
        .args(["+nightly", "fuzz", subcommand, "--debug-assertions"]);
    command
}

/// Builds every target once (cargo builds them in parallel), with cargo's
/// output on the terminal.
fn build() -> Result<()> {
    cmd::step("building the fuzz targets (nightly, AddressSanitizer, in fuzz/target)");
    cmd::run(&mut cargo_fuzz("build"))
        .context("the fuzz targets do not build: fix the errors above, then rerun")
}

/// Copies the committed seeds into `corpus`, beside what earlier runs found.
fn copy_seeds(target: &str, corpus: &Path) -> Result<()> {
    create_dir(corpus)?;
    let seeds = seeds_of(target);
    let Ok(entries) = fs::read_dir(&seeds) else {
        cmd::warn(&format!(
            "{target} has no seeds in {}: it starts from nothing",
            seeds.display()
        ));
        return Ok(());
    };
    for entry in entries {
        let from = entry?.path();
        if let Some(name) = from.file_name() {
            fs::copy(&from, corpus.join(name))
                .with_context(|| format!("cannot copy the seed {}", from.display()))?;
        }
    }
    Ok(())
}

/// What one run of one target did.
#[derive(Debug)]
struct Run {
    target: String,
    elapsed: Duration,
    stats: Stats,
    corpus_files: usize,
    log: PathBuf,
    /// Set when the run failed: what went wrong.
    failure: Option<String>,
}

/// Runs `target` for `seconds` over `corpus` (where new inputs go) and
/// `extra` (read only), its output into `fuzz/target/logs/<target>.log`.
fn run(target: &str, seconds: u64, corpus: &Path, extra: Option<&Path>) -> Result<Run> {
    cmd::step(&format!("fuzzing {target} for {seconds} s"));
    let logs = fuzz_dir().join("target/logs");
    create_dir(&logs)?;
    let log = logs.join(format!("{target}.log"));
    let mut command = cargo_fuzz("run");
    command.arg(target).arg(corpus).args(extra).arg("--").args([
        format!("-max_total_time={seconds}"),
        format!("-max_len={}", max_len(target)),
        format!("-timeout={INPUT_TIMEOUT_SECS}"),
        format!("-rss_limit_mb={RSS_LIMIT_MB}"),
        "-print_final_stats=1".to_owned(),
    ]);
    let started = Instant::now();
    let status = cmd::run_logged(&mut command, &log)?;
    let elapsed = started.elapsed();
    let output = fs::read_to_string(&log)
        .with_context(|| format!("cannot read the fuzzer's output {}", log.display()))?;
    let stats = parse_output(&output);
    let failure = match (&stats.problem, status.success()) {
        (Some(problem), _) => Some(problem.clone()),
        (None, false) => Some(format!("cargo fuzz run exited with {status}")),
        (None, true) => None,
    };
    if failure.is_some() {
        print_tail(&output, 40);
    }
    Ok(Run {
        target: target.to_owned(),
        elapsed,
        stats,
        corpus_files: count_files(corpus) + extra.map_or(0, count_files),
        log,
        failure,
    })
}

/// Prints the table, then fails naming every target that found something.
fn report(runs: &[Run]) -> Result<()> {
    println!();
    println!("{}", table(runs));
    let failed: Vec<String> = runs
        .iter()
        .filter_map(|run| {
            let failure = run.failure.as_ref()?;
            let mut line = format!("{}: {failure}", run.target);
            if let Some(panic) = &run.stats.panic {
                line.push_str(&format!("\n    {panic}"));
            }
            match &run.stats.artifact {
                Some(input) => line.push_str(&format!(
                    "\n    input: {input}\n    reproduce: cargo +nightly fuzz run --debug-assertions {} {input}",
                    run.target
                )),
                None => line.push_str("\n    no input was saved"),
            }
            line.push_str(&format!("\n    output: {}", run.log.display()));
            Some(line)
        })
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    bail!(
        "the fuzzer found problems in {} of {} targets:\n{}",
        failed.len(),
        runs.len(),
        failed.join("\n")
    )
}

fn table(runs: &[Run]) -> String {
    let mut lines = vec![format!(
        "{:<18} {:>12} {:>8} {:>9} {:>7} {:>7} {:>7}  result",
        "target", "executions", "seconds", "exec/s", "cov", "ft", "corpus"
    )];
    let number = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
    for run in runs {
        lines.push(format!(
            "{:<18} {:>12} {:>8.1} {:>9} {:>7} {:>7} {:>7}  {}",
            run.target,
            number(run.stats.executions),
            run.elapsed.as_secs_f64(),
            number(run.stats.exec_per_sec),
            number(run.stats.cov),
            number(run.stats.ft),
            run.corpus_files,
            if run.failure.is_some() {
                "FAILED"
            } else {
                "ok"
            },
        ));
    }
    lines.join("\n")
}

/// What libFuzzer and cargo-fuzz said about a run.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    /// `stat::number_of_executed_units`.
    executions: Option<u64>,
    /// `stat::average_exec_per_sec`.
    exec_per_sec: Option<u64>,
    /// Coverage (edges) and features of the last status line.
    cov: Option<u64>,
    ft: Option<u64>,
    /// What libFuzzer or a sanitizer reported (`deadly signal`, `timeout after…`).
    problem: Option<String>,
    /// Where the panic was, and its message.
    panic: Option<String>,
    /// The saved input that reproduces the problem.
    artifact: Option<String>,
}

fn parse_output(output: &str) -> Stats {
    let mut stats = Stats::default();
    let mut lines = output.lines().peekable();
    while let Some(line) = lines.next() {
        let line = line.trim();
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            stats.executions = n.trim().parse().ok();
        } else if let Some(n) = line.strip_prefix("stat::average_exec_per_sec:") {
            stats.exec_per_sec = n.trim().parse().ok();
        } else if line.starts_with('#') && line.contains(" cov: ") {
            stats.cov = field(line, "cov:").or(stats.cov);
            stats.ft = field(line, "ft:").or(stats.ft);
        } else if let Some(at) = line.find("panicked at ") {
            if stats.panic.is_none() {
                let place = line[at + "panicked at ".len()..].trim_end_matches(':');
                let message = lines.peek().map_or("", |next| next.trim());
                stats.panic = Some(format!("panicked at {place}: {message}"));
            }
        } else if let Some(at) = line.find("ERROR: ") {
            if stats.problem.is_none() {
                let problem = line[at + "ERROR: ".len()..].trim();
                stats.problem = Some(problem.to_owned());
            }
        } else if let Some(at) = line.find("Test unit written to ") {
            stats.artifact = Some(line[at + "Test unit written to ".len()..].trim().to_owned());
        }
    }
    stats
}

/// The number after `name` in a libFuzzer status line
/// (`#1024 pulse cov: 812 ft: 2040 corp: 96/4Kb …`).
fn field(line: &str, name: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    words.find(|word| *word == name)?;
    words.next()?.parse().ok()
}

fn print_tail(output: &str, lines: usize) {
    let all: Vec<&str> = output.lines().collect();
    for line in &all[all.len().saturating_sub(lines)..] {
        println!("    | {line}");
    }
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().is_file())
            .count()
    })
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of a real run that found a panic (abridged).
    const CRASHED: &str = "\
INFO: Seed: 1234
#2\tINITED cov: 314 ft: 508 corp: 9/329b exec/s: 0 rss: 38Mb
#4096\tpulse  cov: 401 ft: 702 corp: 30/1Kb lim: 43 exec/s: 2048 rss: 40Mb
#5120\tNEW    cov: 405 ft: 710 corp: 31/1Kb lim: 43 exec/s: 2560 rss: 40Mb L: 40/43 MS: 1 ChangeBit-
thread '<unnamed>' panicked at fuzz_targets/spiffe_id.rs:52:13:
assertion `left == right` failed: prints back to its input
==4242== ERROR: libFuzzer: deadly signal
MS: 1 ChangeBit-; base unit: 0123
artifact_prefix='/work/fuzz/artifacts/spiffe_id/'; Test unit written to /work/fuzz/artifacts/spiffe_id/crash-abc
stat::number_of_executed_units: 5133
stat::average_exec_per_sec:     2566
stat::new_units_added:          22
";

    #[test]
    fn reads_the_figures_and_the_failure_of_a_run() {
        let stats = parse_output(CRASHED);
        assert_eq!(
            stats,
            Stats {
                executions: Some(5133),
                exec_per_sec: Some(2566),
                cov: Some(405),
                ft: Some(710),
                problem: Some("libFuzzer: deadly signal".to_owned()),
                panic: Some(
                    "panicked at fuzz_targets/spiffe_id.rs:52:13: assertion `left == right` failed: prints back to its input"
                        .to_owned()
                ),
                artifact: Some("/work/fuzz/artifacts/spiffe_id/crash-abc".to_owned()),
            }
        );
    }

    #[test]
    fn a_clean_run_has_no_problem_and_the_last_coverage() {
        let clean = "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                     #900\tDONE   cov: 12 ft: 15 corp: 2/3b lim: 4 exec/s: 450 rss: 31Mb\n\
                     Done 900 runs in 2 second(s)\n\
                     stat::number_of_executed_units: 900\n";
        let stats = parse_output(clean);
        assert_eq!(
            (stats.cov, stats.ft, stats.executions),
            (Some(12), Some(15), Some(900))
        );
        assert_eq!((stats.problem, stats.artifact), (None, None));
    }

    #[test]
    fn a_timeout_is_a_problem() {
        let hang = "==77== ERROR: libFuzzer: timeout after 10 seconds\n\
                    artifact_prefix='fuzz/artifacts/jwt/'; Test unit written to fuzz/artifacts/jwt/timeout-1f\n";
        let stats = parse_output(hang);
        assert_eq!(
            stats.problem.as_deref(),
            Some("libFuzzer: timeout after 10 seconds")
        );
        assert_eq!(
            stats.artifact.as_deref(),
            Some("fuzz/artifacts/jwt/timeout-1f")
        );
    }

    #[test]
    fn only_known_targets_are_selected() {
        let known = ["jwks".to_owned(), "jwt".to_owned()];
        assert_eq!(select(&known, &[]).unwrap(), known);
        assert_eq!(select(&known, &["jwt".to_owned()]).unwrap(), ["jwt"]);
        let error = select(&known, &["jws".to_owned()]).unwrap_err().to_string();
        assert!(error.contains("jwks, jwt"), "{error}");
    }
}
