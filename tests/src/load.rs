//! `ferry-load`, the benchmark's load generator: its command line (parsed
//! by the binary, spelled only by [`Command::argv`]), the lines it prints
//! (one type each, printed by the binary and read here), and the driver
//! ferry-bench runs it with in the simulated pods.

use std::{fmt, net::SocketAddr, time::Duration};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::{
    Cluster, Place, Proc, bin_path,
    testapp::events::{Event as _, Listening},
};

/// How long a load server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a timed run may overrun its seconds (connects, the last answer).
const RUN_SLACK: Duration = Duration::from_secs(60);
/// How long opening the idle connections may take, and closing them.
const IDLE_OPEN_TIMEOUT: Duration = Duration::from_secs(120);
const IDLE_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// One connection, `size`-byte request then response, repeated: round
    /// trips per second and latency percentiles.
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
        let exchange = |mode: &str, Exchange { run: timed, size }: &Exchange| {
            let mut argv = run(mode, timed);
            argv.extend(words(&["--size", &size.to_string()]));
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

/// What `rr` and `crr` print: `count` round trips in `seconds`, and their
/// latency percentiles.
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

/// The timed modes, each a client measuring one thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Throughput over one connection.
    Bulk,
    /// Round trips on one connection.
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

/// One timed run of `mode` from `place` to `to`, for `seconds`.
pub fn measure(
    cluster: &mut Cluster,
    place: impl Into<Place>,
    mode: Mode,
    to: SocketAddr,
    seconds: f64,
) -> anyhow::Result<Measured> {
    let run = Run { to, seconds };
    let exchange = || Exchange {
        run: run.clone(),
        size: 1024,
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
            }),
            Command::Crr(Exchange { run, size: 7 }),
            Command::Idle { to, count: 50 },
        ] {
            let argv = std::iter::once("ferry-load".to_owned()).chain(command.argv());
            assert_eq!(Cli::try_parse_from(argv).unwrap().command, command);
        }
    }
}
