//! `ferry-load`, the benchmark's load generator: its command line (parsed
//! by the binary, spelled only by [`Command::argv`]), the lines it prints
//! (one type each, printed by the binary and read here), and the drivers
//! ferry-bench and the tests run it with in the simulated pods.
//!
//! Two modes watch a path change under them (an agent replaced, killed):
//! [`Streams`] keeps long-lived connections exchanging checksummed
//! messages, [`Churn`] opens new connections back to back. Both run until
//! their stdin closes; each line written to it (a [`Running::mark`]) starts
//! a new phase, and their summary reports every phase apart, so a test can
//! compare what happened before, during and after what it did.

use std::{fmt, io, io::Write as _, marker::PhantomData, net::SocketAddr, time::Duration};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    Cluster, Place, Proc, bin_path, netns,
    testapp::events::{Event as _, Listening},
};

/// How long a load server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a timed run may overrun its seconds (connects, the last answer).
const RUN_SLACK: Duration = Duration::from_secs(60);
/// How long opening the idle connections may take, and closing them.
const IDLE_OPEN_TIMEOUT: Duration = Duration::from_secs(120);
const IDLE_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `streams` may take to open its connections, and `churn` its
/// first round trip.
const STREAMS_OPEN_TIMEOUT: Duration = Duration::from_secs(120);
const CHURN_FIRST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped `streams` or `churn` may take to finish what is in
/// flight and print its summary: a hang (an IO timeout of 30 s) still ends.
const SUMMARY_TIMEOUT: Duration = Duration::from_secs(60);
/// The size of a `streams` message's header; `--size` must be at least this.
pub const STREAM_HEADER: usize = 32;
/// How many error messages a summary quotes.
pub const FIRST_ERRORS: usize = 5;

#[derive(Debug, Clone, PartialEq, Parser)]
#[command(name = "ferry-load", about = "Load generator for Ferry's benchmarks")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum Command {
    /// Serve every mode on `listen` until killed.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// One connection, as many bytes as fit in `seconds`: throughput.
    Bulk(Run),
    /// `size`-byte request then response, repeated back to back on each of
    /// `connections` connections: round trips per second and latency
    /// percentiles.
    Rr(Exchange),
    /// Connect, one `size`-byte request/response, close, repeated: new
    /// connections per second.
    Crr(Exchange),
    /// Open `count` connections, each checked with one round trip, print
    /// `{"open": count}`, and hold them until stdin closes.
    Idle {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Open `connections` connections, print `{"open": connections}`, then
    /// on each one exchange checksummed messages continuously until stdin
    /// closes, and print a [`StreamsSummary`].
    Streams(Streams),
    /// Connect, one round trip, close, back to back until stdin closes (or
    /// for `seconds`), and print a [`ChurnSummary`].
    Churn(Churn),
}

/// `ferry-load streams`: long-lived connections, each sending
/// `size`-byte messages that the server checks and echoes and the client
/// checks again, byte for byte. A message carries the connection's index,
/// its sequence number, a payload derived from both and a checksum, so
/// loss, reordering, duplication, corruption and crossed connections are
/// all told apart. A connection that fails is counted and not reopened.
/// Started with [`Streams::start`].
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct Streams {
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Bytes per message, at least [`STREAM_HEADER`].
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Milliseconds each connection waits after a round trip before the
    /// next (0: back to back), so that many connections stay busy without
    /// taking every CPU from what they test.
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
}

/// `ferry-load churn`: new connections back to back, each timed from its
/// connect to its one `size`-byte echo, each failure counted by kind.
/// Started with [`Churn::start`].
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct Churn {
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Stop after this long instead of when stdin closes.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// A connect, write or read that takes longer than this fails as a
    /// `timeout`: a hang is counted, not waited out.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// Where to, and for how long.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct Run {
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
}

impl Run {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.max(0.1))
    }
}

/// A run of request/response exchanges of `size` bytes each way.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct Exchange {
    #[command(flatten)]
    pub run: Run,
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Connections (threads) exchanging at once; the report covers all.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
}

impl Command {
    /// The arguments that make `ferry-load` run this command.
    pub fn argv(&self) -> Vec<String> {
        let words = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        let run = |mode: &str, run: &Run| {
            words(&[
                mode,
                "--to",
                &run.to.to_string(),
                "--seconds",
                &run.seconds.to_string(),
            ])
        };
        let exchange = |mode: &str,
                        Exchange {
                            run: timed,
                            size,
                            connections,
                        }: &Exchange| {
            let mut argv = run(mode, timed);
            argv.extend(words(&["--size", &size.to_string()]));
            if *connections != 1 {
                argv.extend(words(&["--connections", &connections.to_string()]));
            }
            argv
        };
        match self {
            Command::Serve { listen } => words(&["serve", "--listen", &listen.to_string()]),
            Command::Bulk(timed) => run("bulk", timed),
            Command::Rr(timed) => exchange("rr", timed),
            Command::Crr(timed) => exchange("crr", timed),
            Command::Idle { to, count } => words(&[
                "idle",
                "--to",
                &to.to_string(),
                "--count",
                &count.to_string(),
            ]),
            Command::Streams(Streams {
                to,
                connections,
                size,
                pause_ms,
            }) => words(&[
                "streams",
                "--to",
                &to.to_string(),
                "--connections",
                &connections.to_string(),
                "--size",
                &size.to_string(),
                "--pause-ms",
                &pause_ms.to_string(),
            ]),
            Command::Churn(Churn {
                to,
                size,
                seconds,
                timeout_ms,
            }) => {
                let mut argv = words(&[
                    "churn",
                    "--to",
                    &to.to_string(),
                    "--size",
                    &size.to_string(),
                    "--timeout-ms",
                    &timeout_ms.to_string(),
                ]);
                if let Some(seconds) = seconds {
                    argv.extend(words(&["--seconds", &seconds.to_string()]));
                }
                argv
            }
        }
    }
}

/// What `bulk` prints: `bytes` sent (and counted by the server) in `seconds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Throughput {
    pub bytes: u64,
    pub seconds: f64,
    pub bytes_per_second: f64,
}

/// What `rr` and `crr` print: `count` round trips in `seconds` (over all
/// connections), and their latency percentiles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Latencies {
    pub count: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_micros: f64,
    pub p99_micros: f64,
}

/// What `idle` prints once all its connections are open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    pub open: usize,
}

/// How a connection failed, as `streams` and `churn` count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Reset by the peer (`ECONNRESET`, `ECONNABORTED`, `EPIPE`).
    Reset,
    /// Refused at connect (`ECONNREFUSED`).
    Refused,
    /// Closed by the peer before the answer was complete.
    Eof,
    /// Nothing happened for the mode's timeout: a hang.
    Timeout,
    /// Bytes came back, but not the ones sent: lost, reordered, corrupted,
    /// or another connection's.
    Mismatch,
    Other,
}

impl FailureKind {
    /// The kind of an IO error.
    pub fn of_io(kind: io::ErrorKind) -> Self {
        use io::ErrorKind as K;
        match kind {
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Self::Reset,
            K::ConnectionRefused => Self::Refused,
            K::UnexpectedEof => Self::Eof,
            // A socket read timeout surfaces as EAGAIN.
            K::TimedOut | K::WouldBlock => Self::Timeout,
            _ => Self::Other,
        }
    }
}

/// Failures by kind, and the first [`FIRST_ERRORS`] messages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Failures {
    pub reset: u64,
    pub refused: u64,
    pub eof: u64,
    pub timeout: u64,
    pub mismatch: u64,
    pub other: u64,
    /// The first few, as `<kind>: <message>`.
    pub first: Vec<String>,
}

impl Failures {
    pub fn add(&mut self, kind: FailureKind, message: &str) {
        let (count, name) = match kind {
            FailureKind::Reset => (&mut self.reset, "reset"),
            FailureKind::Refused => (&mut self.refused, "refused"),
            FailureKind::Eof => (&mut self.eof, "eof"),
            FailureKind::Timeout => (&mut self.timeout, "timeout"),
            FailureKind::Mismatch => (&mut self.mismatch, "mismatch"),
            FailureKind::Other => (&mut self.other, "other"),
        };
        *count += 1;
        if self.first.len() < FIRST_ERRORS {
            self.first.push(format!("{name}: {message}"));
        }
    }

    pub fn merge(&mut self, other: &Failures) {
        self.reset += other.reset;
        self.refused += other.refused;
        self.eof += other.eof;
        self.timeout += other.timeout;
        self.mismatch += other.mismatch;
        self.other += other.other;
        let room = FIRST_ERRORS.saturating_sub(self.first.len());
        self.first.extend(other.first.iter().take(room).cloned());
    }

    pub fn total(&self) -> u64 {
        self.reset + self.refused + self.eof + self.timeout + self.mismatch + self.other
    }
}

/// What `streams` prints when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamsSummary {
    pub connections: usize,
    /// Messages that came back intact.
    pub messages: u64,
    /// Their bytes (each counted once, not once per direction).
    pub bytes: u64,
    /// Bytes sent that never came back intact (the messages in flight on
    /// connections that failed, or damaged).
    pub bytes_lost: u64,
    /// The longest round trip of one message.
    pub max_round_trip_micros: f64,
    /// One per connection that failed (a connection stops at its first).
    pub errors: Failures,
    /// Between the start, each mark and the end; a message belongs to the
    /// phase in which its echo arrived.
    pub phases: Vec<StreamsPhase>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamsPhase {
    pub seconds: f64,
    pub messages: u64,
    pub bytes: u64,
    /// How many connections had at least one message come back.
    pub connections_active: usize,
    pub max_round_trip_micros: f64,
}

/// What `churn` prints once, after its first successful round trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FirstOk {
    pub first_ok_micros: f64,
}

/// What `churn` prints when it ends: the whole run, and each phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChurnSummary {
    #[serde(flatten)]
    pub total: ChurnPhase,
    /// Between the start, each mark and the end; an attempt belongs to the
    /// phase in which it ended.
    pub phases: Vec<ChurnPhase>,
}

/// Connection attempts of a stretch of a `churn` run. Latencies are of
/// successful attempts, from the start of the connect to the echo.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChurnPhase {
    pub seconds: f64,
    pub attempts: u64,
    pub ok: u64,
    pub failed: u64,
    pub failures: Failures,
    pub p50_micros: f64,
    pub p99_micros: f64,
    pub max_micros: f64,
    /// The longest time between two successful completions (the first
    /// counted from the run's start, the last to the run's end).
    pub longest_gap_micros: f64,
    /// From the start of the phase to its first successful completion.
    pub first_ok_micros: Option<f64>,
    /// From the start of the phase to the end of its last failed attempt:
    /// after it, every connection succeeded.
    pub last_failure_micros: Option<f64>,
}

/// The timed modes, each a client measuring one thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Throughput over one connection.
    Bulk,
    /// Round trips on each of a run's connections.
    Rr,
    /// A new connection per round trip.
    Crr,
}

/// What a timed run measured.
#[derive(Debug, Clone, PartialEq)]
pub enum Measured {
    Throughput(Throughput),
    Latencies(Latencies),
}

impl fmt::Display for Measured {
    /// The line, as ferry-load printed it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = match self {
            Measured::Throughput(bulk) => serde_json::to_string(bulk),
            Measured::Latencies(latencies) => serde_json::to_string(latencies),
        };
        f.write_str(&line.map_err(|_| fmt::Error)?)
    }
}

/// Starts `ferry-load serve` on `listen` at `place`, once it listens.
pub fn serve(
    cluster: &mut Cluster,
    place: impl Into<Place>,
    listen: SocketAddr,
) -> anyhow::Result<Proc> {
    let argv = Command::Serve { listen }.argv();
    let mut server = cluster.spawn(place, &bin_path("ferry-load")?, &argv)?;
    // It says so as ferry-testapp does.
    server.wait_for_line(|line| line["event"] == Listening::NAME, LISTEN_TIMEOUT)?;
    Ok(server)
}

/// One timed run of `mode` from `place` to `to`, for `seconds`, over
/// `connections` connections at once (`rr` and `crr`; `bulk` uses one).
pub fn measure(
    cluster: &mut Cluster,
    place: impl Into<Place>,
    mode: Mode,
    to: SocketAddr,
    seconds: f64,
    connections: usize,
) -> anyhow::Result<Measured> {
    let run = Run { to, seconds };
    let exchange = || Exchange {
        run: run.clone(),
        size: 1024,
        connections,
    };
    let command = match mode {
        Mode::Bulk => Command::Bulk(run.clone()),
        Mode::Rr => Command::Rr(exchange()),
        Mode::Crr => Command::Crr(exchange()),
    };
    let mut proc = cluster.spawn(place, &bin_path("ferry-load")?, &command.argv())?;
    let (status, stdout, stderr) = proc.wait_exit(run.duration() + RUN_SLACK)?;
    ensure!(
        status.success(),
        "ferry-load {}: {stderr}",
        command.argv().join(" ")
    );
    let line = stdout.trim();
    let parsed = match mode {
        Mode::Bulk => serde_json::from_str(line).map(Measured::Throughput),
        Mode::Rr | Mode::Crr => serde_json::from_str(line).map(Measured::Latencies),
    };
    parsed.with_context(|| format!("ferry-load {mode:?} printed what it should not: {stdout}"))
}

/// Opens `count` idle connections from `place` to `to`, and returns once
/// all are open; they stay open until the returned process's stdin is
/// closed ([`close_idle`]).
pub fn open_idle(
    cluster: &mut Cluster,
    place: impl Into<Place>,
    to: SocketAddr,
    count: usize,
) -> anyhow::Result<Proc> {
    let argv = Command::Idle { to, count }.argv();
    let mut idle = cluster.spawn(place, &bin_path("ferry-load")?, &argv)?;
    let line = idle.wait_for_line(|line| line["open"].as_u64().is_some(), IDLE_OPEN_TIMEOUT)?;
    let open: Open = serde_json::from_value(line)?;
    ensure!(
        open.open == count,
        "{} of {count} idle connections open",
        open.open
    );
    Ok(idle)
}

/// Closes the connections of [`open_idle`] and waits for it to end.
pub fn close_idle(mut idle: Proc) -> anyhow::Result<()> {
    idle.close_stdin();
    idle.wait_exit(IDLE_CLOSE_TIMEOUT).map(drop)
}

impl Streams {
    /// Starts `streams` at `place` and returns once all its connections
    /// are open and have each made one round trip.
    pub fn start(
        self,
        cluster: &mut Cluster,
        place: impl Into<Place>,
    ) -> anyhow::Result<Running<StreamsSummary>> {
        let count = self.connections;
        let argv = Command::Streams(self).argv();
        let mut proc = cluster.spawn(place, &bin_path("ferry-load")?, &argv)?;
        let line =
            proc.wait_for_line(|line| line["open"].as_u64().is_some(), STREAMS_OPEN_TIMEOUT)?;
        let open: Open = serde_json::from_value(line)?;
        ensure!(
            open.open == count,
            "{} of {count} stream connections open",
            open.open
        );
        Ok(Running::new(proc))
    }
}

impl Churn {
    /// Starts `churn` at `place` and returns once a first connection made
    /// its round trip.
    pub fn start(
        self,
        cluster: &mut Cluster,
        place: impl Into<Place>,
    ) -> anyhow::Result<Running<ChurnSummary>> {
        let argv = Command::Churn(self).argv();
        let mut proc = cluster.spawn(place, &bin_path("ferry-load")?, &argv)?;
        proc.wait_for_line(
            |line| line["firstOkMicros"].as_f64().is_some(),
            CHURN_FIRST_TIMEOUT,
        )
        .context("churn never completed a first round trip")?;
        Ok(Running::new(proc))
    }
}

/// A running `streams` or `churn`, which prints an `S` when it ends.
pub struct Running<S> {
    proc: Proc,
    marks: usize,
    summary: PhantomData<S>,
}

impl<S: DeserializeOwned> Running<S> {
    fn new(proc: Proc) -> Self {
        Self {
            proc,
            marks: 0,
            summary: PhantomData,
        }
    }

    /// Starts a new phase (a line on its stdin): phase `k` of the summary
    /// is what happened between the `k`th mark and the next (0: from the
    /// start). Returns the new phase's index.
    pub fn mark(&mut self) -> anyhow::Result<usize> {
        let label = self.proc.label().to_owned();
        let stdin = self.proc.stdin()?;
        stdin
            .write_all(b"\n")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("cannot write to the stdin of {label}"))?;
        self.marks += 1;
        Ok(self.marks)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Stops it (closes its stdin), and returns its summary once it has
    /// finished what was in flight.
    pub fn finish(mut self) -> anyhow::Result<S> {
        self.proc.close_stdin();
        let (status, stdout, stderr) = self.proc.wait_exit(SUMMARY_TIMEOUT)?;
        ensure!(
            status.success(),
            "{} failed ({status}): {stderr}",
            self.proc.label()
        );
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| {
            format!(
                "{} printed no summary: {stdout}\n{stderr}",
                self.proc.label()
            )
        })
    }
}

/// Lets every node and pod of `cluster` reuse ports in `TIME_WAIT` for new
/// connections (`net.ipv4.tcp_tw_reuse=1`): thousands of connect/close a
/// second otherwise leave the closing side's ports in `TIME_WAIT`, and
/// later connections measure the kernel's search for a free port (or
/// fail with `EADDRNOTAVAIL`) instead of the path.
pub fn reuse_time_wait_ports(cluster: &Cluster) -> anyhow::Result<()> {
    let namespaces = cluster
        .nodes()
        .iter()
        .map(|n| &n.netns)
        .chain(cluster.pods().iter().map(|p| &p.netns));
    for ns in namespaces {
        netns::set_sysctl(ns, "net/ipv4/tcp_tw_reuse", "1")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_parses_back_from_its_argv() {
        let to: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let run = Run { to, seconds: 0.3 };
        for command in [
            Command::Serve {
                listen: "0.0.0.0:7000".parse().unwrap(),
            },
            Command::Bulk(run.clone()),
            Command::Rr(Exchange {
                run: run.clone(),
                size: 1024,
                connections: 1,
            }),
            Command::Rr(Exchange {
                run: run.clone(),
                size: 1024,
                connections: 16,
            }),
            Command::Crr(Exchange {
                run,
                size: 7,
                connections: 1,
            }),
            Command::Idle { to, count: 50 },
            Command::Streams(Streams {
                to,
                connections: 100,
                size: 512,
                pause_ms: 20,
            }),
            Command::Churn(Churn {
                to,
                size: 64,
                seconds: None,
                timeout_ms: 2000,
            }),
            Command::Churn(Churn {
                to,
                size: 1,
                seconds: Some(1.5),
                timeout_ms: 5000,
            }),
        ] {
            let argv = std::iter::once("ferry-load".to_owned()).chain(command.argv());
            assert_eq!(Cli::try_parse_from(argv).unwrap().command, command);
        }
    }

    #[test]
    fn failures_count_by_kind_and_quote_the_first_few() {
        let mut failures = Failures::default();
        for i in 0..7 {
            failures.add(
                FailureKind::of_io(io::ErrorKind::ConnectionReset),
                &i.to_string(),
            );
        }
        failures.add(FailureKind::of_io(io::ErrorKind::WouldBlock), "hung");
        let mut more = Failures::default();
        more.add(FailureKind::Mismatch, "seq 3 came back as 4");
        failures.merge(&more);
        assert_eq!(
            (failures.reset, failures.timeout, failures.mismatch),
            (7, 1, 1)
        );
        assert_eq!(failures.total(), 9);
        assert_eq!(failures.first.len(), FIRST_ERRORS);
        assert_eq!(failures.first[0], "reset: 0");
    }

    #[test]
    fn summaries_read_back_what_the_binary_prints() {
        let phase = ChurnPhase {
            attempts: 3,
            ok: 2,
            failed: 1,
            first_ok_micros: Some(12.5),
            ..ChurnPhase::default()
        };
        let summary = ChurnSummary {
            total: phase.clone(),
            phases: vec![phase],
        };
        let line = serde_json::to_string(&summary).unwrap();
        assert!(line.starts_with(r#"{"seconds":"#), "flattened: {line}");
        let back: ChurnSummary = serde_json::from_str(&line).unwrap();
        assert_eq!(back, summary);
    }
}
