//! `ferry-testapp`'s command line, in one place for the binary, which
//! parses it, and the harness, which builds it: [`Command::argv`] is the
//! only code that spells its flags, and a test here checks that what it
//! spells parses back into the same command.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};

/// How long a connect may take before it counts as failed, by default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "ferry-testapp",
    about = "Test workload for Ferry's end-to-end tests"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Accept TCP connections: check that stream A arrives, answer with stream B.
    Serve(Serve),
    /// Connect, send stream A, half-close, check that stream B comes back.
    Connect(Connect),
    /// Send one datagram on a connected UDP socket and wait for its echo.
    Udp(Udp),
    /// Connect and keep the connection open until stdin has a line or ends;
    /// fails (event `ended`) if the other end closes it first.
    Hold(Hold),
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Serve {
    #[arg(long)]
    pub listen: SocketAddr,
    /// Bytes of stream B to send back on each connection.
    #[arg(long, default_value_t = 0)]
    pub bytes: u64,
    /// Also echo UDP datagrams on the same address (event `datagram` with the sender).
    #[arg(long)]
    pub udp: bool,
    /// After reading stream A, abort the connection (RST) instead of answering.
    #[arg(long)]
    pub reset: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Connect {
    #[arg(long)]
    pub to: SocketAddr,
    /// Bytes to send, and to expect back.
    #[arg(long)]
    pub bytes: u64,
    /// Connections to make, one after the other.
    #[arg(long, default_value_t = 1)]
    pub repeat: u64,
    /// Print only a final summary line.
    #[arg(long)]
    pub quiet: bool,
    /// Seconds a connect may take before it counts as failed.
    #[arg(long, default_value_t = CONNECT_TIMEOUT.as_secs())]
    pub connect_timeout: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Udp {
    #[arg(long)]
    pub to: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Hold {
    #[arg(long)]
    pub to: SocketAddr,
}

impl Command {
    /// The arguments that make `ferry-testapp` run this command, every
    /// option spelled out.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Serve(Serve {
                listen,
                bytes,
                udp,
                reset,
            }) => {
                let mut argv = words(&["serve", "--listen", &listen.to_string()]);
                argv.extend(words(&["--bytes", &bytes.to_string()]));
                argv.extend(flag(*udp, "--udp"));
                argv.extend(flag(*reset, "--reset"));
                argv
            }
            Command::Connect(Connect {
                to,
                bytes,
                repeat,
                quiet,
                connect_timeout,
            }) => {
                let mut argv = words(&["connect", "--to", &to.to_string()]);
                argv.extend(words(&["--bytes", &bytes.to_string()]));
                argv.extend(words(&["--repeat", &repeat.to_string()]));
                argv.extend(flag(*quiet, "--quiet"));
                argv.extend(words(&["--connect-timeout", &connect_timeout.to_string()]));
                argv
            }
            Command::Udp(Udp { to }) => words(&["udp", "--to", &to.to_string()]),
            Command::Hold(Hold { to }) => words(&["hold", "--to", &to.to_string()]),
        }
    }
}

fn words(words: &[&str]) -> Vec<String> {
    words.iter().map(|word| (*word).to_owned()).collect()
}

fn flag(set: bool, name: &str) -> Option<String> {
    set.then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(command: &Command) -> Command {
        let argv = std::iter::once("ferry-testapp".to_owned()).chain(command.argv());
        Cli::try_parse_from(argv)
            .unwrap_or_else(|err| panic!("{:?} does not parse: {err}", command.argv()))
            .command
    }

    #[test]
    fn every_command_parses_back_from_its_argv() {
        let addr: SocketAddr = "[2001:2:0:1::2]:8080".parse().unwrap();
        let commands = [
            Command::Serve(Serve {
                listen: addr,
                bytes: 0,
                udp: false,
                reset: false,
            }),
            Command::Serve(Serve {
                listen: addr,
                bytes: 1 << 26,
                udp: true,
                reset: true,
            }),
            Command::Connect(Connect {
                to: addr,
                bytes: 1,
                repeat: 200,
                quiet: true,
                connect_timeout: 2,
            }),
            Command::Connect(Connect {
                to: addr,
                bytes: 0,
                repeat: 1,
                quiet: false,
                connect_timeout: CONNECT_TIMEOUT.as_secs(),
            }),
            Command::Udp(Udp { to: addr }),
            Command::Hold(Hold { to: addr }),
        ];
        for command in commands {
            assert_eq!(parsed(&command), command);
        }
    }
}
