//! `ferry-bench --quick`: every benchmark scenario, the real applications'
//! included, runs end to end over every setup. A smoke check, not a
//! measurement: no timing is asserted.

use anyhow::{Context as _, ensure};
use ferry_tests::{bench::SETUPS, bin_path};
use serde_json::Value;

#[test]
fn every_scenario_runs_over_every_setup() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("results.json");
    let run = std::process::Command::new(bin_path("ferry-bench")?)
        .args(["--quick", "--out"])
        .arg(&out)
        .output()
        .context("cannot run ferry-bench")?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    ensure!(
        run.status.success(),
        "ferry-bench --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let results: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    std::fs::remove_dir_all(&dir)?;
    let summary = &results["summary"];
    for metric in [
        "bulk.MiBPerSecond",
        "rr.perSecond",
        "rr.p99Micros",
        "rr-16.perSecond",
        "rr-16.p99Micros",
        "rr-64.perSecond",
        "rr-64.p99Micros",
        "crr.perSecond",
        "same-node-bulk.MiBPerSecond",
        "same-node-rr.perSecond",
        "redis-get-1.perSecond",
        "redis-get-20.p99Micros",
        "redis-set-1.perSecond",
        "redis-set-20.p99Micros",
        "http-small.perSecond",
        "http-64k.p99Micros",
    ] {
        for setup in SETUPS {
            let median = summary[metric][setup]["median"].as_f64();
            ensure!(
                median.is_some_and(|m| m > 0.0),
                "{metric} has no measurement over {setup}: {}",
                summary[metric]
            );
        }
    }
    for metric in [
        "bulk.cpuSecondsPerGiB",
        "rr.cpuMicrosPerRequest",
        "rr-16.cpuMicrosPerRequest",
        "rr-64.cpuMicrosPerRequest",
        "crr.cpuMicrosPerRequest",
        "redis-get-20.cpuMicrosPerRequest",
        "http-64k.cpuMicrosPerRequest",
        "same-node-rr.cpuMicrosPerRequest",
    ] {
        for setup in ["ferry", "stunnel", "haproxy"] {
            ensure!(
                summary[metric][setup]["median"].is_f64(),
                "{metric} has no measurement over {setup}: {}",
                summary[metric]
            );
        }
    }
    for setup in ["ferry", "stunnel", "haproxy"] {
        ensure!(
            summary["idle.clientSideKiBPerConn"][setup]["median"].is_f64(),
            "no idle-connection memory over {setup}"
        );
    }
    let connect4 = results["extra"]["connect4"]["nsPerCall"].as_f64();
    ensure!(
        connect4.is_some_and(|ns| ns > 0.0),
        "no connect4 cost: {}",
        results["extra"]
    );
    ensure!(
        stdout.contains("| target | value | wanted | met |"),
        "no table printed:\n{stdout}"
    );
    Ok(())
}
