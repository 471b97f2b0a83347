//! The typed driver of `ferry-testapp`, the workload the tests run in pods:
//! a test says what a workload does and where, and gets back what it
//! reported, parsed.
//!
//! ```text
//! let mut server = TestApp::serve(to).bytes(MIB).start(&mut cluster, db)?;
//! let exit = TestApp::connect(to).bytes(MIB).run(&mut cluster, web)?;
//! let done: Done = exit.event()?;
//! let served: Served = server.wait_for(WAIT)?;
//! ```
//!
//! The command line is built only by [`cli`], the lines are read only
//! through [`events`], and the usual exchange (a fresh server, one client,
//! both ends checked) is [`exchange`].

pub mod cli;
pub mod events;

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::ExitStatus,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use serde_json::Value;

use self::cli::Command;
pub use self::{
    cli::{Connect, Hold, Serve, Udp},
    events::{
        Closed, Connected, Datagram, Done, Ended, Event, Failed, Listening, Reset, Served, Summary,
        UdpEcho,
    },
};
use crate::{Cluster, Place, PodId, Proc, WAIT, bin_path};

/// An address family, for tests that run the same thing over both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];
}

/// The pod's address of `family`.
pub fn pod_ip(cluster: &Cluster, pod: PodId, family: Family) -> IpAddr {
    match family {
        Family::V4 => cluster.pod(pod).ipv4.into(),
        Family::V6 => cluster.pod(pod).ipv6.into(),
    }
}

/// The pod's socket address of `family` on `port`.
pub fn pod_addr(cluster: &Cluster, pod: PodId, family: Family, port: u16) -> SocketAddr {
    SocketAddr::new(pod_ip(cluster, pod, family), port)
}

/// Where each `ferry-testapp` command starts: `TestApp::serve(addr)` and
/// so on, then the command's setters, then `start` or `run`.
pub struct TestApp;

impl TestApp {
    /// A server on `listen` that checks stream A and answers nothing (see
    /// [`Serve::bytes`]).
    pub fn serve(listen: SocketAddr) -> Serve {
        Serve {
            listen,
            bytes: 0,
            udp: false,
            reset: false,
        }
    }

    /// One client connection to `to` that sends nothing and expects nothing
    /// back (see [`Connect::bytes`]).
    pub fn connect(to: SocketAddr) -> Connect {
        Connect {
            to,
            bytes: 0,
            repeat: 1,
            quiet: false,
            connect_timeout: cli::CONNECT_TIMEOUT.as_secs(),
        }
    }

    /// A client connection to `to` held open until released.
    pub fn hold(to: SocketAddr) -> Hold {
        Hold { to }
    }

    /// One UDP datagram to `to` on a connected socket, and its echo.
    pub fn udp(to: SocketAddr) -> Udp {
        Udp { to }
    }
}

impl Serve {
    /// Answers each connection with `bytes` of stream B.
    pub fn bytes(mut self, bytes: u64) -> Self {
        self.bytes = bytes;
        self
    }

    /// Also echoes UDP datagrams on the same address ([`Datagram`]).
    pub fn udp(mut self) -> Self {
        self.udp = true;
        self
    }

    /// Aborts each connection with an RST once stream A has arrived ([`Reset`]).
    pub fn reset(mut self) -> Self {
        self.reset = true;
        self
    }

    /// Starts the server at `place` and waits until it listens.
    pub fn start(self, cluster: &mut Cluster, place: impl Into<Place>) -> anyhow::Result<Server> {
        let bytes = self.bytes;
        let mut proc = spawn(cluster, place, &Command::Serve(self))?;
        let listening: Listening = wait_for(&mut proc, WAIT)?;
        Ok(Server {
            proc,
            addr: listening.addr,
            bytes,
        })
    }
}

impl Connect {
    /// Sends `bytes` of stream A and expects as many of stream B back.
    pub fn bytes(mut self, bytes: u64) -> Self {
        self.bytes = bytes;
        self
    }

    /// Makes `connections` connections, one after the other.
    pub fn repeat(mut self, connections: u64) -> Self {
        self.repeat = connections;
        self
    }

    /// Prints only a [`Summary`].
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    /// How long a connect may take before it counts as failed (whole seconds).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.as_secs();
        self
    }

    /// Runs the client at `place` to its end (within [`WAIT`]).
    pub fn run(self, cluster: &mut Cluster, place: impl Into<Place>) -> anyhow::Result<Exit> {
        run(cluster, place, &Command::Connect(self))
    }

    /// Starts the client at `place` and returns while it runs.
    pub fn start(self, cluster: &mut Cluster, place: impl Into<Place>) -> anyhow::Result<Running> {
        Ok(Running {
            proc: spawn(cluster, place, &Command::Connect(self))?,
        })
    }
}

/// A client started with [`Connect::start`], still running.
pub struct Running {
    proc: Proc,
}

impl Running {
    pub fn is_running(&self) -> anyhow::Result<bool> {
        Ok(self.proc.has_exited()?.is_none())
    }

    /// Waits for its end ([`WAIT`]).
    pub fn wait_exit(mut self) -> anyhow::Result<Exit> {
        Exit::of(&mut self.proc)
    }
}

impl Udp {
    /// Runs the probe at `place` to its end (within [`WAIT`]).
    pub fn run(self, cluster: &mut Cluster, place: impl Into<Place>) -> anyhow::Result<Exit> {
        run(cluster, place, &Command::Udp(self))
    }
}

impl Hold {
    /// Opens the connection from `place` and waits until it is connected.
    pub fn start(self, cluster: &mut Cluster, place: impl Into<Place>) -> anyhow::Result<Held> {
        let mut proc = spawn(cluster, place, &Command::Hold(self))?;
        let connected = wait_for(&mut proc, WAIT)?;
        Ok(Held { proc, connected })
    }
}

/// A running `ferry-testapp serve`. Like every process of the cluster it
/// runs until [`kill`](Self::kill)ed or the cluster is dropped.
pub struct Server {
    proc: Proc,
    addr: SocketAddr,
    bytes: u64,
}

impl Server {
    /// Where it listens, as it said.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for its next line of kind `E` (a [`Served`], a [`Reset`], a
    /// [`Datagram`]); lines of other kinds on the way are skipped.
    pub fn wait_for<E: Event>(&mut self, timeout: Duration) -> anyhow::Result<E> {
        wait_for(&mut self.proc, timeout)
    }

    /// One connection from `client` to `to` (this server, or an address
    /// that leads to it), sending as many bytes as the server answers with,
    /// checked at both ends: everything arrived intact, both ways.
    pub fn exchange(
        &mut self,
        cluster: &mut Cluster,
        client: PodId,
        to: SocketAddr,
    ) -> anyhow::Result<Exchange> {
        let bytes = self.bytes;
        let exit = TestApp::connect(to).bytes(bytes).run(cluster, client)?;
        ensure!(
            exit.success(),
            "connect to {to} failed ({}): {}\n{}",
            exit.status,
            exit.stderr,
            exit.stdout
        );
        let connected: Connected = exit.event()?;
        let done: Done = exit.event()?;
        ensure!(done.intact, "the client saw a damaged answer: {done:?}");
        ensure!(
            done.received == bytes,
            "the client got {} of {bytes} bytes: {done:?}",
            done.received
        );
        let served: Served = self.wait_for(WAIT)?;
        ensure!(served.intact, "the server saw a damaged stream: {served:?}");
        ensure!(
            served.received == bytes,
            "the server got {} of {bytes} bytes: {served:?}",
            served.received
        );
        Ok(Exchange {
            connected,
            done,
            served,
        })
    }

    /// SIGKILLs the server (if it still runs) and reaps it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// One connection as both ends saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The client's view once connected; `peer` is its `getpeername`.
    pub connected: Connected,
    pub done: Done,
    /// The server's view; `peer` is who connected to it.
    pub served: Served,
}

/// `bytes` each way from `client` to a fresh server in pod `server` on
/// `to`, checked at both ends ([`Server::exchange`]); the server is stopped
/// again, so the next exchange may use the same address.
pub fn exchange(
    cluster: &mut Cluster,
    client: PodId,
    server: PodId,
    to: SocketAddr,
    bytes: u64,
) -> anyhow::Result<Exchange> {
    let mut serve = TestApp::serve(to).bytes(bytes).start(cluster, server)?;
    let seen = serve.exchange(cluster, client, to);
    serve.kill();
    seen
}

/// A running `ferry-testapp hold` with its connection open.
pub struct Held {
    proc: Proc,
    connected: Connected,
}

impl Held {
    /// The connection, as the client saw it when it connected.
    pub fn connected(&self) -> &Connected {
        &self.connected
    }

    /// Whether it still runs (holds its connection).
    pub fn is_running(&self) -> anyhow::Result<bool> {
        Ok(self.proc.has_exited()?.is_none())
    }

    /// Waits for its next line of kind `E` (an [`Ended`] when the other end
    /// goes away first).
    pub fn wait_for<E: Event>(&mut self, timeout: Duration) -> anyhow::Result<E> {
        wait_for(&mut self.proc, timeout)
    }

    /// Releases it with a line on stdin (without closing stdin).
    pub fn send_line(&mut self) -> anyhow::Result<()> {
        let label = self.proc.label().to_owned();
        self.proc
            .stdin()?
            .write_all(b"\n")
            .with_context(|| format!("cannot write to the stdin of {label}"))
    }

    /// Releases it by closing its stdin, and waits for its end ([`WAIT`]).
    pub fn release(mut self) -> anyhow::Result<Exit> {
        self.proc.close_stdin();
        self.wait_exit()
    }

    /// Waits for its end ([`WAIT`]): after a release, or after its
    /// connection ended under it.
    pub fn wait_exit(mut self) -> anyhow::Result<Exit> {
        Exit::of(&mut self.proc)
    }
}

/// A `ferry-testapp` that ran to its end: how it ended, what it printed.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    /// Its stdout lines not already read as events while it ran.
    pub stdout: String,
    /// Its stderr (the newest megabyte): why it failed, if it did.
    pub stderr: String,
}

impl Exit {
    fn of(proc: &mut Proc) -> anyhow::Result<Self> {
        let (status, stdout, stderr) = proc.wait_exit(WAIT)?;
        Ok(Self {
            status,
            stdout,
            stderr,
        })
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Every line of stdout, as JSON; an error if one is not JSON.
    pub fn lines(&self) -> anyhow::Result<Vec<Value>> {
        self.stdout
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| {
                format!(
                    "ferry-testapp printed a line that is not JSON: {}",
                    self.stdout
                )
            })
    }

    /// Every line of kind `E`, in order.
    pub fn events<E: Event>(&self) -> anyhow::Result<Vec<E>> {
        self.lines()?.iter().filter_map(events::parse).collect()
    }

    /// The first line of kind `E`; an error if there is none.
    pub fn event<E: Event>(&self) -> anyhow::Result<E> {
        self.events()?.into_iter().next().with_context(|| {
            format!(
                "ferry-testapp printed no {} line (exit {}): {}\n{}",
                E::NAME,
                self.status,
                self.stdout,
                self.stderr
            )
        })
    }
}

/// Starts `ferry-testapp COMMAND` at `place`.
fn spawn(
    cluster: &mut Cluster,
    place: impl Into<Place>,
    command: &Command,
) -> anyhow::Result<Proc> {
    cluster.spawn(place, &bin_path("ferry-testapp")?, &command.argv())
}

/// Runs `ferry-testapp COMMAND` at `place` to its end.
fn run(cluster: &mut Cluster, place: impl Into<Place>, command: &Command) -> anyhow::Result<Exit> {
    Exit::of(&mut spawn(cluster, place, command)?)
}

/// Consumes `proc`'s stdout until a line of kind `E`, and returns it.
fn wait_for<E: Event>(proc: &mut Proc, timeout: Duration) -> anyhow::Result<E> {
    let line = proc.wait_for_line(|line| line["event"] == E::NAME, timeout)?;
    events::parse(&line).context("a line that was just matched")?
}
