//! `ferry-bench`: Ferry side by side with no mesh, with stunnel and with
//! HAProxy, on two simulated nodes (`cargo xtask bench` builds it in release
//! and runs it).
//!
//! One cluster holds all four setups, so they share nodes, veths and
//! kernel: `no-mesh` is a client pod and a server pod in an unmeshed
//! namespace talking plain TCP; `ferry` is the same pair in a meshed
//! namespace (captured, tunnelled over pooled mTLS between the agents);
//! `stunnel` is the unmeshed pair again with a `stunnel4` process in each
//! pod doing mutual TLS 1.3 with P-256 certificates, one TLS connection per
//! application connection; `haproxy` is the same with a multi-threaded
//! `haproxy` (`mode tcp`) in each pod instead, which also resumes TLS
//! sessions towards the server side. Every scenario runs each setup in
//! turn, the order rotating per round, and the medians are compared.
//!
//! `rr-concurrent` is `rr` on 16, then 64 connections at once (metrics
//! `rr-16.*`, `rr-64.*`): the CPU-bound case. `redis` runs the real
//! `redis-benchmark` (`GET`, then `SET`, over 1 and 20 connections) against
//! a `redis-server` in the server pod, and `http` runs `wrk` over 16
//! keep-alive connections against nginx there, fetching a 128-byte and a
//! 64 KiB file: the loads users run, through the same four data paths.
//! Every scenario also records the CPU time (utime + stime from
//! `/proc/<pid>/stat`) of the setup's proxies, both agents or both stunnel
//! or HAProxy processes, per request (`*.cpuMicrosPerRequest`) or per GiB
//! (`*bulk.cpuSecondsPerGiB`); `no-mesh` has none.
//!
//! The `same-node-*` scenarios run the same load to a second server pod on
//! the client's own node: there Ferry authorizes the connection and relays
//! it inside the node without TLS, and stunnel and HAProxy still encrypt.
//!
//! The `upgrade` scenario (Ferry only, once, last: it replaces the agents)
//! keeps 100 long-lived connections exchanging checksummed messages and a
//! client opening new connections back to back while the destination's
//! agent and then the source's are replaced by successors, then kills the
//! destination's with SIGKILL and starts a new one.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Command as Process, ExitCode},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use clap::Parser;
use ferry_tests::{
    Cluster, MIB, PodId, PodOptions, Proc, apps,
    baselines::Baseline,
    bench::{
        SETUPS, Samples, best_baseline_check, bound_check, markdown, ratio_check, replace_results,
    },
    inspect::{self, admin_json, bpftool, eventually},
    load::{self, Churn, ChurnPhase, Measured, Mode, Streams},
};
use serde_json::{Value, json};

const SERVER_PORT: u16 = 7000;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// What the `ciphers` scenario moves through each suite, both ways together.
const CIPHER_BYTES: u64 = 512 * MIB;
/// Full handshakes per key exchange group in the `ciphers` scenario.
const HANDSHAKES: u64 = 2000;
/// How many policies the `policies` scenario puts in the cluster.
const POLICY_COUNT: usize = 1000;
/// How long the agent goes without traffic before its idle memory is read:
/// more than the 5 s between its returns of freed memory to the kernel.
const IDLE_SETTLE: Duration = Duration::from_secs(6);
const NO_POLICIES_METRIC: &str = "crr-no-policies.perSecond";
const POLICIES_METRIC: &str = "crr-1000-policies.perSecond";
/// The services of the server pods, in the order the baselines number
/// them: `ferry-load serve`, `redis-server`, nginx. The server pod on the
/// client's node runs only the first.
const SERVICES: [u16; 3] = [SERVER_PORT, REDIS_PORT, HTTP_PORT];
const REDIS_PORT: u16 = 6379;
const HTTP_PORT: u16 = 8080;
/// Requests per second of run that redis-benchmark is asked for (it counts
/// requests, not time), per connection up to [`REDIS_RATE_CLIENTS`]: about
/// what one connection without a mesh does here, so a run lasts about
/// `--seconds` without a mesh and longer with one.
const REDIS_RATE: f64 = 15_000.0;
const REDIS_RATE_CLIENTS: f64 = 3.0;
/// Connections of the `http` scenario.
const HTTP_CONNECTIONS: usize = 16;
/// The `upgrade` scenario: its long-lived connections (each sending a
/// message, then pausing), how long a connect may take before it counts
/// as a hang, how long the destination is left without an agent after
/// `kill -9`, and how long an old agent may take to exit once its
/// connections are gone.
const UPGRADE_STREAMS: usize = 100;
const UPGRADE_STREAM_PAUSE_MS: u64 = 10;
const UPGRADE_MESSAGE_SIZE: usize = 1024;
const UPGRADE_CONNECT_TIMEOUT_MS: u64 = 3000;
const UPGRADE_NO_AGENT: Duration = Duration::from_secs(1);
const UPGRADE_OLD_EXIT: Duration = Duration::from_secs(60);
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Debug, Parser)]
#[command(
    name = "ferry-bench",
    about = "Ferry vs no mesh vs stunnel vs HAProxy, side by side"
)]
struct Args {
    /// A smoke run: every scenario once, briefly, 50 idle connections; no
    /// numbers worth reading.
    #[arg(long)]
    quick: bool,
    /// Rounds per scenario (each runs every setup once).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Idle connections held open for the memory scenario.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// Extra `ferry-agent run` arguments for both agents (e.g.
    /// `--agent-arg=--worker-threads=1`), to compare settings.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// A Markdown file whose `<!-- bench:start/end -->` section gets the
    /// table; only a run of every scenario over every setup writes it.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Run only these scenarios (repeatable), e.g. to profile one of them.
    #[arg(long = "scenario", value_parser = scenario_names())]
    scenarios: Vec<String>,
    /// Run only these setups (repeatable).
    #[arg(long = "setup", value_parser = SETUPS)]
    setups: Vec<String>,
    /// Another `ferry-ca` build for the `issuance` scenario to run beside
    /// this one (e.g. one from an older commit), each in turn per round.
    #[arg(long)]
    baseline_ca: Option<PathBuf>,
}

/// What a timed run puts on the path.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// `ferry-load`'s `mode` over this many connections at once (`bulk`
    /// uses one).
    Ferry(Mode, usize),
    /// `redis-benchmark`'s test (`get`, `set`) over this many connections.
    Redis(&'static str, usize),
    /// `wrk` fetching one of [`apps::HTTP_FILES`] over
    /// [`HTTP_CONNECTIONS`] keep-alive connections.
    Http(&'static str),
}

impl Load {
    /// Which of [`SERVICES`] it talks to.
    fn service(self) -> usize {
        match self {
            Load::Ferry(..) => 0,
            Load::Redis(..) => 1,
            Load::Http(..) => 2,
        }
    }
}

/// A run of a timed scenario.
struct Timed {
    scenario: &'static str,
    /// The prefix of its metrics.
    metric: &'static str,
    load: Load,
    /// Whether the server pod is on the client's node.
    same_node: bool,
}

const fn timed(scenario: &'static str, metric: &'static str, load: Load, same_node: bool) -> Timed {
    Timed {
        scenario,
        metric,
        load,
        same_node,
    }
}

/// The timed runs, each over every setup per round (`rr-concurrent`,
/// `redis` and `http` make several). The memory scenario `idle` and the
/// authorization cost `policies` (ferry only) run after them.
const TIMED: [Timed; 13] = [
    timed("bulk", "bulk", Load::Ferry(Mode::Bulk, 1), false),
    timed("rr", "rr", Load::Ferry(Mode::Rr, 1), false),
    timed("rr-concurrent", "rr-16", Load::Ferry(Mode::Rr, 16), false),
    timed("rr-concurrent", "rr-64", Load::Ferry(Mode::Rr, 64), false),
    timed("crr", "crr", Load::Ferry(Mode::Crr, 1), false),
    timed("redis", "redis-get-1", Load::Redis("get", 1), false),
    timed("redis", "redis-get-20", Load::Redis("get", 20), false),
    timed("redis", "redis-set-1", Load::Redis("set", 1), false),
    timed("redis", "redis-set-20", Load::Redis("set", 20), false),
    timed("http", "http-small", Load::Http("small"), false),
    timed("http", "http-64k", Load::Http("64k"), false),
    timed(
        "same-node-bulk",
        "same-node-bulk",
        Load::Ferry(Mode::Bulk, 1),
        true,
    ),
    timed(
        "same-node-rr",
        "same-node-rr",
        Load::Ferry(Mode::Rr, 1),
        true,
    ),
];

fn scenario_names() -> clap::builder::PossibleValuesParser {
    let mut names: Vec<&str> = TIMED.iter().map(|t| t.scenario).collect();
    names.dedup();
    names.extend(["idle", "policies", "ciphers", "issuance", "upgrade"]);
    clap::builder::PossibleValuesParser::new(names)
}

impl Args {
    fn runs(&self, scenario: &str) -> bool {
        self.scenarios.is_empty() || self.scenarios.iter().any(|s| s == scenario)
    }

    fn over(&self, setup: &str) -> bool {
        self.setups.is_empty() || self.setups.iter().any(|s| s == setup)
    }

    fn is_full(&self) -> bool {
        self.scenarios.is_empty() && self.setups.is_empty()
    }
}

struct Bench {
    cluster: Cluster,
    agents: Vec<ferry_tests::Agent>,
    /// Kept running for the whole bench.
    _servers: Vec<Proc>,
    /// The stunnel pair towards the other node (client, server), then the
    /// one towards the client's own node.
    stunnels: [[Proc; 2]; 2],
    /// The HAProxy pairs, as `stunnels`.
    haproxies: [[Proc; 2]; 2],
    /// Kept running for the whole bench (`upgrade` starts agents again).
    _ca: ferry_tests::ca::CaFixture,
    /// The unmeshed client pod (no-mesh, stunnel, HAProxy) and the meshed
    /// one.
    clients: [PodId; 2],
    /// The server pods, unmeshed and meshed, on the other node (`[0]`) and
    /// on the client's node (`[1]`).
    servers: [[PodId; 2]; 2],
    seconds: f64,
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.quick {
        args.rounds = 1;
        args.seconds = 0.3;
        args.idle = 50;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let stats_before = fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".to_owned());
    fs::write(BPF_STATS, "1").context("cannot enable BPF run-time statistics")?;
    let result = measure(args);
    let _ = fs::write(BPF_STATS, stats_before.trim());
    let (samples, checks, extra) = result?;

    let table = markdown(&samples, &checks);
    println!("\n{table}");
    let machine = machine();
    let report = json!({
        "date": today(),
        "machine": machine,
        "rounds": args.rounds,
        "secondsPerRun": args.seconds,
        "idleConnections": args.idle,
        "quick": args.quick,
        "agentArgs": args.agent_args,
        "summary": samples.summary(),
        "samples": samples,
        "checks": checks,
        "extra": extra,
    });
    if let Some(dir) = args.out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("results: {}", args.out.display());
    if let Some(path) = args.markdown.as_ref().filter(|_| args.is_full()) {
        let document =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let section = format!(
            "Measured {} on {machine}: {} rounds of {} s per setup, {} idle connections \
             (`cargo xtask bench`).\n\n{table}",
            today(),
            args.rounds,
            args.seconds,
            args.idle
        );
        let updated = replace_results(&document, &section).with_context(|| {
            format!("{} has no <!-- bench:start/end --> markers", path.display())
        })?;
        fs::write(path, updated)?;
        println!("table written into {}", path.display());
    }
    Ok(())
}

fn measure(args: &Args) -> anyhow::Result<(Samples, Vec<ferry_tests::bench::Check>, Value)> {
    let mut samples = Samples::default();
    // On a cluster of its own, before the bench's: it starts and stops CAs.
    if args.runs("issuance") && args.over("ferry") {
        issuance(args, &mut samples)?;
    }
    let mut bench = Bench::start(args.seconds, &args.agent_args)?;
    let connect4_before = prog_stats("ferry_connect4")?;
    let sock_ops_before = prog_stats("ferry_sock_ops")?;
    for round in 0..args.rounds {
        for run in TIMED.iter().filter(|t| args.runs(t.scenario)) {
            let metric = run.metric;
            for k in 0..SETUPS.len() {
                let i = (round + k) % SETUPS.len();
                let setup = SETUPS[i];
                if !args.over(setup) {
                    continue;
                }
                let pair = usize::from(run.same_node);
                let (pod, to) = bench.target(pair, i, run.load.service());
                let pids = bench.proxy_pids(setup, pair);
                let cpu_before = cpu_seconds(&pids)?;
                let result = bench
                    .measure(run.load, pod, to)
                    .with_context(|| format!("{metric} over {setup}"))?;
                let cpu = (!pids.is_empty())
                    .then(|| cpu_seconds(&pids).map(|after| after - cpu_before))
                    .transpose()?;
                let cpu_note = cpu.map_or(String::new(), |c| format!(" (proxy CPU {c:.2} s)"));
                println!(
                    "round {} {metric:>14} {setup:>8}: {result}{cpu_note}",
                    round + 1
                );
                let with_p50 = !matches!(run.load, Load::Ferry(Mode::Crr, _));
                record(&mut samples, metric, with_p50, setup, &result, cpu);
            }
        }
    }
    let connect4_after = prog_stats("ferry_connect4")?;
    let sock_ops_after = prog_stats("ferry_sock_ops")?;
    let calls = connect4_after.1.saturating_sub(connect4_before.1);
    // Same-node connections are captured too.
    let ferry_ran = args.over("ferry") && TIMED.iter().any(|t| args.runs(t.scenario));
    ensure!(
        calls > 0 || !ferry_ran,
        "ferry_connect4 never ran: is capture working?"
    );
    let per_connect = |after: u64, before: u64| after.saturating_sub(before) as f64 / calls as f64;
    let connect4_ns = per_connect(connect4_after.0, connect4_before.0);

    if args.runs("policies") && args.over("ferry") {
        for (metric, value) in bench.policy_cost(args.rounds)? {
            samples.add(metric, "ferry", value);
        }
    }
    if args.runs("idle") {
        let setups: Vec<&str> = ["ferry", "stunnel", "haproxy"]
            .into_iter()
            .filter(|s| args.over(s))
            .collect();
        for (metric, setup, value) in bench.memory(args.idle, &setups)? {
            samples.add(metric, setup, value);
        }
    }
    if args.runs("ciphers") && args.over("ferry") {
        let bytes = if args.quick { 4 * MIB } else { CIPHER_BYTES };
        for runs in ferry_tests::ciphers::compare(args.rounds, bytes)? {
            for run in runs {
                println!(
                    "ciphers {:>28}: {:.0} MiB/s ({} MiB in {:.2} s)",
                    run.suite,
                    run.mib_per_second(),
                    run.bytes / MIB,
                    run.seconds
                );
                samples.add(
                    &format!("ciphers.{}.MiBPerSecond", run.suite),
                    "ferry",
                    run.mib_per_second(),
                );
            }
        }
    }
    if args.runs("ciphers") && args.over("ferry") {
        let count = if args.quick { 20 } else { HANDSHAKES };
        for runs in ferry_tests::ciphers::compare_handshakes(args.rounds, count)? {
            for run in runs {
                println!(
                    "handshakes {:>16}: {:.0}/s (ClientHello {} bytes)",
                    run.group,
                    run.per_second(),
                    run.client_hello_bytes
                );
                samples.add(
                    &format!("handshakes.{}.perSecond", run.group),
                    "ferry",
                    run.per_second(),
                );
                samples.add(
                    &format!("handshakes.{}.clientHelloBytes", run.group),
                    "ferry",
                    run.client_hello_bytes as f64,
                );
            }
        }
    }
    // Last: it replaces the agents (and leaves new ones running).
    if args.runs("upgrade") && args.over("ferry") {
        for (metric, value) in bench.upgrade()? {
            samples.add(metric, "ferry", value);
        }
    }
    let mut checks: Vec<_> = [
        ("bulk", 0.4),
        ("rr", 0.5),
        ("rr-16", 0.5),
        ("rr-64", 0.5),
        ("redis-get-20", 0.5),
        ("redis-set-20", 0.5),
    ]
    .into_iter()
    .map(|(load, bound)| ratio_check(&samples, &throughput(load), "no-mesh", bound, true))
    .chain(TIMED.iter().flat_map(|run| {
        let crr = matches!(run.load, Load::Ferry(Mode::Crr, _));
        let bound = if crr { 3.0 } else { 1.0 };
        let throughput = throughput(run.metric);
        [
            best_baseline_check(&samples, &throughput, &BASELINES, bound, true),
            best_baseline_check(
                &samples,
                &format!("{}.p99Micros", run.metric),
                &BASELINES,
                1.0,
                false,
            ),
        ]
    }))
    .flatten()
    .collect();
    for load in ["rr-16", "rr-64"] {
        let metric = format!("{load}.cpuMicrosPerRequest");
        if let Some(cpu) = samples.median(&metric, "ferry") {
            checks.push(bound_check(&format!("{metric} ferry"), cpu, 20.0, "µs"));
        }
    }
    let rss = |metric: &str| samples.median(metric, "ferry").unwrap_or(f64::NAN);
    checks.push(bound_check(
        "agent RSS idle",
        rss("idle.agentRssMiB"),
        20.0,
        "MiB",
    ));
    checks.push(bound_check(
        "agent KiB per connection (client node)",
        rss("idle.clientSideKiBPerConn"),
        32.0,
        "KiB",
    ));
    checks.push(bound_check(
        "agent KiB per connection (server node)",
        rss("idle.serverSideKiBPerConn"),
        32.0,
        "KiB",
    ));
    // Only `crr` connects often enough for a per-call mean: in a run without
    // it, a few dozen first calls (cold caches) make up the figure.
    if args.runs("crr") {
        checks.push(bound_check(
            "connect4 ns per call",
            connect4_ns,
            1000.0,
            "ns",
        ));
    }
    let ferry = |metric: &str| samples.median(metric, "ferry").unwrap_or(f64::NAN);
    for (what, metric, bound, unit) in [
        ("upgrade: stream errors", "upgrade.streamErrors", 0.0, ""),
        ("upgrade: bytes lost", "upgrade.bytesLost", 0.0, "B"),
        (
            "upgrade: failed connects",
            "upgrade.failedConnects",
            0.0,
            "",
        ),
        (
            "kill -9: all new connections through after the new agent's start",
            "upgrade.kill9RecoveryMillis",
            1000.0,
            "ms",
        ),
    ] {
        checks.push(bound_check(what, ferry(metric), bound, unit));
    }
    let policy_ratio = samples
        .median(POLICIES_METRIC, "ferry")
        .zip(samples.median(NO_POLICIES_METRIC, "ferry"))
        .map_or(f64::NAN, |(with, without)| with / without);
    checks.push(ferry_tests::bench::Check {
        what: format!("crr with {POLICY_COUNT} policies / without"),
        value: policy_ratio,
        target: "≥ 0.9".to_owned(),
        met: policy_ratio >= 0.9,
    });
    // A run filtered by scenario or setup has no value for some targets.
    checks.retain(|c| !c.value.is_nan());
    // sock_ops finishes what connect4 starts (it moves the record to the
    // 4-tuple map), so its cost per connect belongs beside connect4's.
    let sock_ops_ns = per_connect(sock_ops_after.0, sock_ops_before.0);
    let sock_ops_calls = per_connect(sock_ops_after.1, sock_ops_before.1);
    println!(
        "connect4: {connect4_ns:.0} ns per call over {calls} calls; \
         sock_ops per connect: {sock_ops_ns:.0} ns in {sock_ops_calls:.1} calls"
    );
    let extra = json!({
        "connect4": { "calls": calls, "nsPerCall": connect4_ns },
        "sockOps": { "nsPerConnect": sock_ops_ns, "callsPerConnect": sock_ops_calls },
    });
    Ok((samples, checks, extra))
}

/// Certificates per CA CPU second, this build's `ferry-ca` and, with
/// `--baseline-ca`, another one beside it.
fn issuance(args: &Args, samples: &mut Samples) -> anyhow::Result<()> {
    let ours = ferry_tests::bin_path("ferry-ca")?;
    let mut binaries = vec![ours.clone()];
    binaries.extend(args.baseline_ca.clone());
    let seconds = args.seconds.max(1.0);
    for (round, runs) in ferry_tests::issuance::compare(&binaries, args.rounds, seconds)?
        .into_iter()
        .enumerate()
    {
        for run in runs {
            let which = if run.binary == ours {
                "this build"
            } else {
                "baseline"
            };
            println!(
                "round {} issuance {which:>10}: {:.0} certificates/s, {:.0} per CA CPU second \
                 ({} in {:.1} s, CA CPU {:.2} s)",
                round + 1,
                run.per_second(),
                run.per_cpu_second(),
                run.issued,
                run.seconds,
                run.cpu_seconds
            );
            let prefix = if run.binary == ours {
                "issuance"
            } else {
                "issuance-baseline"
            };
            samples.add(&format!("{prefix}.perSecond"), "ferry", run.per_second());
            samples.add(
                &format!("{prefix}.perCpuSecond"),
                "ferry",
                run.per_cpu_second(),
            );
        }
    }
    if let (Some(ours), Some(baseline)) = (
        samples.median("issuance.perCpuSecond", "ferry"),
        samples.median("issuance-baseline.perCpuSecond", "ferry"),
    ) {
        println!(
            "issuance per CA CPU second: this build {ours:.0}, baseline {baseline:.0}: {:.2} ×",
            ours / baseline
        );
    }
    Ok(())
}

/// Adds a run's metrics under `prefix`; `cpu`, the proxies' CPU seconds
/// during it, also per GiB or per round trip.
/// The proxies a user could run in Ferry's place.
const BASELINES: [&str; 2] = ["stunnel", "haproxy"];

/// The throughput metric of a timed run's `prefix`: MiB/s for bulk
/// transfers, requests (or round trips) per second for the rest.
fn throughput(prefix: &str) -> String {
    if prefix.ends_with("bulk") {
        format!("{prefix}.MiBPerSecond")
    } else {
        format!("{prefix}.perSecond")
    }
}

fn record(
    samples: &mut Samples,
    prefix: &str,
    with_p50: bool,
    setup: &str,
    result: &Measured,
    cpu: Option<f64>,
) {
    let mut add = |metric: &str, value: f64| {
        samples.add(&format!("{prefix}.{metric}"), setup, value);
    };
    match result {
        Measured::Throughput(bulk) => {
            add("MiBPerSecond", bulk.bytes_per_second / MIB as f64);
            if let Some(cpu) = cpu.filter(|_| bulk.bytes > 0) {
                add("cpuSecondsPerGiB", cpu / (bulk.bytes as f64 / GIB));
            }
        }
        Measured::Latencies(latencies) => {
            add("perSecond", latencies.per_second);
            if with_p50 {
                add("p50Micros", latencies.p50_micros);
            }
            add("p99Micros", latencies.p99_micros);
            if let Some(cpu) = cpu.filter(|_| latencies.count > 0) {
                add("cpuMicrosPerRequest", cpu * 1e6 / latencies.count as f64);
            }
        }
    }
}

/// CPU seconds (user and system, every thread) that `pids` have used.
fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|&pid| inspect::cpu_seconds(pid)).sum()
}

impl Bench {
    /// The processes that carry `setup`'s traffic for `pair` (none for
    /// `no-mesh`): both agents for Ferry (on the same node only the
    /// client's works), the pair's two proxies for a baseline.
    fn proxy_pids(&self, setup: &str, pair: usize) -> Vec<u32> {
        match setup {
            "ferry" => self.agents.iter().map(|a| a.proc.pid()).collect(),
            "stunnel" => self.stunnels[pair].iter().map(Proc::pid).collect(),
            "haproxy" => self.haproxies[pair].iter().map(Proc::pid).collect(),
            _ => Vec::new(),
        }
    }

    /// The client pod of [`SETUPS`]`[setup]` and where it connects for the
    /// `service`-th of [`SERVICES`], across nodes (`pair` 0) or on the
    /// client's node (1).
    fn target(&self, pair: usize, setup: usize, service: usize) -> (PodId, SocketAddr) {
        let [plain, meshed] = self.servers[pair];
        let port = SERVICES[service];
        match SETUPS[setup] {
            "ferry" => (self.clients[1], self.cluster.pod(meshed).addr_v4(port)),
            "stunnel" => (self.clients[0], Baseline::Stunnel.local_addr(pair, service)),
            "haproxy" => (self.clients[0], Baseline::Haproxy.local_addr(pair, service)),
            _ => (self.clients[0], self.cluster.pod(plain).addr_v4(port)),
        }
    }

    /// One timed run of `load` from `pod` to `to`.
    fn measure(&mut self, load: Load, pod: PodId, to: SocketAddr) -> anyhow::Result<Measured> {
        let seconds = self.seconds;
        Ok(match load {
            Load::Ferry(mode, connections) => {
                load::measure(&mut self.cluster, pod, mode, to, seconds, connections)?
            }
            Load::Redis(test, clients) => {
                let rate = REDIS_RATE * (clients as f64).min(REDIS_RATE_CLIENTS);
                let requests = ((seconds * rate) as usize).max(1000);
                Measured::Latencies(apps::redis_benchmark(
                    &mut self.cluster,
                    pod,
                    to,
                    test,
                    clients,
                    requests,
                )?)
            }
            Load::Http(file) => {
                let url = format!("http://{to}/{file}");
                Measured::Latencies(apps::wrk(
                    &mut self.cluster,
                    pod,
                    &url,
                    HTTP_CONNECTIONS,
                    seconds,
                )?)
            }
        })
    }

    fn start(seconds: f64, agent_args: &[String]) -> anyhow::Result<Self> {
        let mut cluster = Cluster::new("bench")?;
        let n1 = cluster.add_node()?;
        let n2 = cluster.add_node()?;
        let plain_client = cluster.add_pod(n1, PodOptions::unmeshed("plain-c", "plain", "c"))?;
        let plain_server = cluster.add_pod(n2, PodOptions::unmeshed("plain-s", "plain", "s"))?;
        let plain_local = cluster.add_pod(n1, PodOptions::unmeshed("plain-l", "plain", "s"))?;
        let mesh_client = cluster.add_pod(n1, PodOptions::meshed("mesh-c", "mesh", "client"))?;
        let mesh_server = cluster.add_pod(n2, PodOptions::meshed("mesh-s", "mesh", "server"))?;
        let mesh_local = cluster.add_pod(n1, PodOptions::meshed("mesh-l", "mesh", "server"))?;
        let ca = cluster.start_ca()?;
        let agents = vec![
            cluster.agent(n1).ca(&ca).args(agent_args).start()?,
            cluster.agent(n2).ca(&ca).args(agent_args).start()?,
        ];
        let listen = SocketAddr::from(([0, 0, 0, 0], SERVER_PORT));
        let mut servers = Vec::new();
        for pod in [plain_server, mesh_server, plain_local, mesh_local] {
            servers.push(load::serve(&mut cluster, pod, listen)?);
        }
        for pod in [plain_server, mesh_server] {
            servers.push(apps::start_redis(&mut cluster, pod, REDIS_PORT)?);
            servers.push(apps::start_nginx(&mut cluster, pod, HTTP_PORT)?);
        }
        // Thousands of connect/close a second leave the closing side's ports
        // in TIME_WAIT; without reuse, later rounds of `crr` measure the
        // kernel's search for a free port instead of the path. Same for every
        // setup: every pod and node may reuse them.
        load::reuse_time_wait_ports(&cluster)?;
        let mut pairs = |baseline: Baseline| -> anyhow::Result<[[Proc; 2]; 2]> {
            Ok([
                baseline.start(&mut cluster, plain_client, plain_server, 0, &SERVICES)?,
                baseline.start(&mut cluster, plain_client, plain_local, 1, &SERVICES[..1])?,
            ])
        };
        let stunnels = pairs(Baseline::Stunnel)?;
        let haproxies = pairs(Baseline::Haproxy)?;
        Ok(Self {
            cluster,
            agents,
            _servers: servers,
            stunnels,
            haproxies,
            _ca: ca,
            clients: [plain_client, mesh_client],
            servers: [[plain_server, mesh_server], [plain_local, mesh_local]],
            seconds,
        })
    }

    /// New connections per second over Ferry with no policy, then with
    /// [`POLICY_COUNT`] that all select the server pod (the evaluator's worst
    /// case: the one that names the client is the last), alternated `rounds`
    /// times; each change waits until the server's agent holds it.
    fn policy_cost(&mut self, rounds: usize) -> anyhow::Result<Vec<(&'static str, f64)>> {
        let many: Vec<_> = (0..POLICY_COUNT)
            .map(|i| {
                let from = if i + 1 == POLICY_COUNT {
                    "serviceAccount: mesh/client".to_owned()
                } else {
                    format!("namespace: other-{i}")
                };
                ferry_tests::policy(
                    "mesh",
                    &format!("server-{i}"),
                    &format!(
                        "{{ selector: {{ matchLabels: {{ app: server }} }}, from: [{{ {from} }}] }}"
                    ),
                )
            })
            .collect::<anyhow::Result<_>>()?;
        let (pod, to) = self.target(0, setup_index("ferry")?, 0);
        let mut out = Vec::new();
        for round in 0..rounds {
            for (metric, policies) in [
                (NO_POLICIES_METRIC, Vec::new()),
                (POLICIES_METRIC, many.clone()),
            ] {
                let count = policies.len();
                self.cluster.set_policies(policies);
                self.cluster.write_workloads()?;
                let node = self.agents[1].node;
                eventually(|| {
                    let held = admin_json(&self.cluster, node, "/policies")?;
                    ensure!(
                        held.as_array().map(Vec::len) == Some(count),
                        "waiting for {count} policies"
                    );
                    Ok(())
                })?;
                let result = load::measure(&mut self.cluster, pod, Mode::Crr, to, self.seconds, 1)
                    .with_context(|| format!("crr with {count} policies"))?;
                println!("round {} crr with {count:>4} policies: {result}", round + 1);
                if let Measured::Latencies(latencies) = result {
                    out.push((metric, latencies.per_second));
                }
            }
        }
        self.cluster.set_policies(Vec::new());
        self.cluster.write_workloads()?;
        Ok(out)
    }

    /// Issue 13's replacement, once: streams and churn from the meshed
    /// client to the server on the other node while the destination's
    /// agent, then the source's, is replaced by a successor (phases 1 and
    /// 2, against phase 0 before); then, with the streams ended and the old
    /// agents gone, the destination's agent is killed (phase 4) and a new
    /// one started (phase 5), and the time from its start to the first new
    /// connection through is measured.
    fn upgrade(&mut self) -> anyhow::Result<Vec<(&'static str, f64)>> {
        let (pod, to) = self.target(0, setup_index("ferry")?, 0);
        let phase = Duration::from_secs_f64(self.seconds.max(1.0));
        let mut streams = Streams {
            to,
            connections: UPGRADE_STREAMS,
            size: UPGRADE_MESSAGE_SIZE,
            pause_ms: UPGRADE_STREAM_PAUSE_MS,
        }
        .start(&mut self.cluster, pod)?;
        let mut churn = Churn {
            to,
            size: UPGRADE_MESSAGE_SIZE,
            seconds: None,
            timeout_ms: UPGRADE_CONNECT_TIMEOUT_MS,
        }
        .start(&mut self.cluster, pod)?;
        thread::sleep(phase);
        let mut old = Vec::new();
        for i in [1, 0] {
            streams.mark()?;
            churn.mark()?;
            let successor = self
                .cluster
                .start_successor(&self.agents[i])
                .with_context(|| format!("a successor for the agent of node {}", i + 1))?;
            old.push(std::mem::replace(&mut self.agents[i], successor));
            thread::sleep(phase);
        }
        streams.mark()?;
        churn.mark()?;
        thread::sleep(phase);
        let streams = streams.finish()?;
        for agent in &mut old {
            let pid = agent.proc.pid();
            let drained = agent
                .drained(UPGRADE_OLD_EXIT)
                .context("the old agent, once its connections ended")?;
            println!("upgrade: old agent {pid}: {}", drained.line);
        }

        churn.mark()?;
        self.agents[1].kill9();
        thread::sleep(UPGRADE_NO_AGENT);
        churn.mark()?;
        let spawned = Instant::now();
        let restarted = self
            .cluster
            .start_successor(&self.agents[1])
            .context("a new agent after kill -9")?;
        let ready = spawned.elapsed();
        self.agents[1] = restarted;
        thread::sleep(phase);
        let churn = churn.finish()?;
        ensure!(
            churn.phases.len() == 6,
            "churn reports {} phases, not 6",
            churn.phases.len()
        );
        let p = &churn.phases;
        let handover = [&p[1], &p[2]];
        let failed: u64 = p[..4].iter().map(|phase| phase.failed).sum();
        let p50_during = handover.iter().map(|h| h.p50_micros).fold(0.0, f64::max);
        let max_during = handover.iter().map(|h| h.max_micros).fold(0.0, f64::max);
        // The first connection through after the new agent's start, and
        // the end of the last one that failed: from then on all went through.
        let first_ok_ms = p[5].first_ok_micros.map_or(f64::INFINITY, |us| us / 1000.0);
        let recovery_ms = p[5]
            .last_failure_micros
            .map_or(first_ok_ms, |us| (us / 1000.0).max(first_ok_ms));
        let show = |name: &str, phase: &ChurnPhase| {
            println!(
                "upgrade {name:>21}: {} connects, {} failed {:?}, p50 {:.0} µs, max {:.0} µs, \
                 longest gap {:.0} µs",
                phase.attempts,
                phase.failed,
                phase.failures,
                phase.p50_micros,
                phase.max_micros,
                phase.longest_gap_micros
            );
        };
        for (name, phase) in [
            "before",
            "destination replaced",
            "source replaced",
            "after",
            "killed, no agent",
            "new agent",
        ]
        .into_iter()
        .zip(p)
        {
            show(name, phase);
        }
        println!(
            "upgrade: streams {} connections, {} messages, {} bytes lost, errors {:?}; \
             {failed} failed connects; connect max/median {:.0}/{:.0} µs during the handover \
             vs {:.0}/{:.0} µs before; kill -9: first connection {first_ok_ms:.0} ms, every \
             one from {recovery_ms:.0} ms after the new agent's start (ready after {:.0} ms)",
            streams.connections,
            streams.messages,
            streams.bytes_lost,
            streams.errors,
            max_during,
            p50_during,
            p[0].max_micros,
            p[0].p50_micros,
            ready.as_secs_f64() * 1000.0
        );
        Ok(vec![
            ("upgrade.streamErrors", streams.errors.total() as f64),
            ("upgrade.streamResets", streams.errors.reset as f64),
            ("upgrade.bytesLost", streams.bytes_lost as f64),
            ("upgrade.failedConnects", failed as f64),
            ("upgrade.connectP50BeforeMicros", p[0].p50_micros),
            ("upgrade.connectMaxBeforeMicros", p[0].max_micros),
            ("upgrade.connectP50HandoverMicros", p50_during),
            ("upgrade.connectMaxHandoverMicros", max_during),
            ("upgrade.kill9FirstOkMillis", first_ok_ms),
            ("upgrade.kill9RecoveryMillis", recovery_ms),
            ("upgrade.kill9ReadyMillis", ready.as_secs_f64() * 1000.0),
        ])
    }

    /// Agent RSS idle (once the agent has had [`IDLE_SETTLE`] without
    /// traffic), then what `count` idle connections add to each side:
    /// the two agents for Ferry, the two stunnel or HAProxy processes for
    /// stunnel and HAProxy.
    fn memory(
        &mut self,
        count: usize,
        setups: &[&'static str],
    ) -> anyhow::Result<Vec<(&'static str, &'static str, f64)>> {
        let agent_pids = [self.agents[0].proc.pid(), self.agents[1].proc.pid()];
        let stunnel_pids = [self.stunnels[0][0].pid(), self.stunnels[0][1].pid()];
        let haproxy_pids = [self.haproxies[0][0].pid(), self.haproxies[0][1].pid()];
        // The agent hands what the timed scenarios freed back to the kernel
        // every 5 s (`app/memory.rs`); idle is after that.
        std::thread::sleep(IDLE_SETTLE);
        let idle_rss = rss_kib(agent_pids[0])?;
        let mut out = vec![("idle.agentRssMiB", "ferry", idle_rss / 1024.0)];
        for (setup, pids) in [
            ("ferry", agent_pids),
            ("stunnel", stunnel_pids),
            ("haproxy", haproxy_pids),
        ] {
            if !setups.contains(&setup) {
                continue;
            }
            let (pod, to) = self.target(0, setup_index(setup)?, 0);
            let before = [rss_kib(pids[0])?, rss_kib(pids[1])?];
            let idle = load::open_idle(&mut self.cluster, pod, to, count)
                .with_context(|| format!("{count} idle connections over {setup}"))?;
            std::thread::sleep(Duration::from_secs(1));
            let after = [rss_kib(pids[0])?, rss_kib(pids[1])?];
            load::close_idle(idle)?;
            let per = |i: usize| (after[i] - before[i]) / count as f64;
            println!("{setup}: RSS {before:?} KiB → {after:?} KiB with {count} idle connections");
            out.push(("idle.clientSideKiBPerConn", setup, per(0)));
            out.push(("idle.serverSideKiBPerConn", setup, per(1)));
        }
        Ok(out)
    }
}

/// Where `setup` is in [`SETUPS`].
fn setup_index(setup: &str) -> anyhow::Result<usize> {
    SETUPS
        .iter()
        .position(|s| *s == setup)
        .with_context(|| format!("no setup {setup}"))
}

/// Resident memory of `pid`, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .with_context(|| format!("no VmRSS for {pid}"))?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS without a number")?
        .parse()?;
    Ok(kib)
}

/// Total run time (ns) and runs of every loaded program called `name`.
fn prog_stats(name: &str) -> anyhow::Result<(u64, u64)> {
    let progs = bpftool(&["prog", "show", "name", name])?;
    let list = match progs {
        Value::Array(list) => list,
        one => vec![one],
    };
    Ok(list.iter().fold((0, 0), |(ns, cnt), p| {
        (
            ns + p["run_time_ns"].as_u64().unwrap_or(0),
            cnt + p["run_cnt"].as_u64().unwrap_or(0),
        )
    }))
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // Every namespace the bench makes starts with this default, and it
    // moves the results (BENCHMARKS.md: BBR in the server pod and http-64k).
    let congestion =
        fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, Linux {}, TCP congestion control {}",
        kernel.trim(),
        congestion.trim()
    )
}

fn today() -> String {
    let out = Process::new("date").arg("+%Y-%m-%d").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
