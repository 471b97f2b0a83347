//! How an agent starts beside the one it replaces, and how it ends: the
//! listening sockets (bound, or taken over), handing them to a successor,
//! and the drain.

use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle, time::Instant};

use crate::{
    admin::AdminState,
    cli::RunArgs,
    drain::{Drain, Phase},
    handover::{self, Message, Predecessor, SocketName, Successor},
    proxy::connections::Connections,
    shard,
    workload::LocalNode,
};

/// How often a draining agent looks at what is left, and tells its successor.
const DRAIN_POLL: Duration = Duration::from_millis(250);
/// How long relays get to close cleanly once the drain deadline passed.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How often a waiting agent logs why it is not ready yet.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(5);

/// The listening sockets, bound (or taken over) before anything else
/// starts: a port in use is a start-up error, not a later surprise.
pub struct Listeners {
    pub outbound: Vec<std::net::TcpListener>,
    /// Empty without a CA: no tunnel to accept.
    pub tunnel: Vec<std::net::TcpListener>,
    pub admin: std::net::TcpListener,
    pub probe: std::net::TcpListener,
    pub handover: handover::Listener,
    handover_path: PathBuf,
}

impl Listeners {
    /// Each socket the predecessor had is taken over; the others are bound here.
    pub fn open(
        args: &RunArgs,
        node: &LocalNode,
        mut predecessor: Option<&mut Predecessor>,
        handover_path: &Path,
    ) -> anyhow::Result<Self> {
        let mut tcp =
            |role: &str,
             addr: SocketAddr,
             bind: &dyn Fn() -> std::io::Result<std::net::TcpListener>| {
                if let Some(fd) = predecessor
                    .as_deref_mut()
                    .and_then(|p| p.take(role, &addr.to_string()))
                {
                    return taken_tcp(fd, addr).with_context(|| {
                        format!("{role} listener on {addr} from the running agent")
                    });
                }
                bind().with_context(|| format!("{role} listener on {addr}"))
            };
        let mut outbound = Vec::new();
        for ip in &node.addresses {
            let addr = SocketAddr::new(*ip, args.outbound_port);
            outbound.push(tcp("outbound", addr, &|| shard::bind(addr))?);
        }
        let mut tunnel = Vec::new();
        if args.identity.ca_addr.is_some() {
            for ip in &node.addresses {
                let addr = SocketAddr::new(*ip, ferry_proto::TUNNEL_PORT);
                tunnel.push(tcp("tunnel", addr, &|| shard::bind(addr))?);
            }
        }
        let admin = tcp("admin", args.admin_addr, &|| bind_std(args.admin_addr))?;
        let probe_addr = SocketAddr::new(
            std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            args.probe_port,
        );
        let probe = tcp("probe", probe_addr, &|| bind_std(probe_addr))?;
        let path = handover_path.display().to_string();
        let handover = match predecessor
            .as_deref_mut()
            .and_then(|p| p.take("handover", &path))
        {
            Some(fd) => handover::Listener::from_fd(fd)?,
            None => handover::listen(handover_path)?,
        };
        if let Some(predecessor) = predecessor {
            for unused in predecessor.untaken() {
                tracing::info!(role = %unused.role, address = %unused.address, "the running agent has a listener this one does not use; it closes with that agent");
            }
        }
        Ok(Self {
            outbound,
            tunnel,
            admin,
            probe,
            handover,
            handover_path: handover_path.to_owned(),
        })
    }

    /// Every socket, named, for a successor.
    fn named(&self) -> anyhow::Result<Vec<(SocketName, BorrowedFd<'_>)>> {
        let name = |role: &str, address: String| SocketName {
            role: role.to_owned(),
            address,
        };
        let mut named = Vec::new();
        for (role, listeners) in [("outbound", &self.outbound), ("tunnel", &self.tunnel)] {
            for listener in listeners {
                named.push((
                    name(role, listener.local_addr()?.to_string()),
                    listener.as_fd(),
                ));
            }
        }
        named.push((
            name("admin", self.admin.local_addr()?.to_string()),
            self.admin.as_fd(),
        ));
        named.push((
            name("probe", self.probe.local_addr()?.to_string()),
            self.probe.as_fd(),
        ));
        named.push((
            name("handover", self.handover_path.display().to_string()),
            self.handover.as_fd(),
        ));
        Ok(named)
    }
}

/// A listening socket received from the predecessor, checked to be the one
/// asked for.
fn taken_tcp(fd: OwnedFd, expected: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    let addr = listener.local_addr().context("not a TCP socket")?;
    anyhow::ensure!(addr == expected, "the socket passed is bound to {addr}");
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn bind_std(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A handle of its own on a listening socket, for another task or runtime.
pub fn tokio_listener(listener: &std::net::TcpListener) -> anyhow::Result<TcpListener> {
    Ok(TcpListener::from_std(listener.try_clone()?)?)
}

/// Waits until the agent is ready (capture, and a certificate for every
/// local identity), saying why not every few seconds.
pub async fn ready(state: &AdminState) {
    let mut logged = Instant::now();
    loop {
        let reasons = state.not_ready_to_serve();
        if reasons.is_empty() {
            return;
        }
        if logged.elapsed() >= WAIT_LOG_EVERY {
            tracing::info!(?reasons, "not ready yet");
            logged = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Tells the predecessor this agent serves, then follows its drain.
pub async fn take_over(predecessor: Predecessor, drain: Arc<Drain>) {
    let pid = predecessor.pid;
    match predecessor.release().await {
        Ok(connections) => {
            tracing::info!(
                predecessor = pid,
                connections,
                "took over: the previous agent accepts no more and drains"
            );
            drain
                .metrics
                .predecessor_connections
                .set(connections as i64);
        }
        Err(handover::HandoverError::Closed) => {
            tracing::info!(predecessor = pid, "took over: the previous agent is gone");
            return;
        }
        Err(error) => {
            tracing::warn!(predecessor = pid, %error, "the previous agent did not confirm the handover; serving regardless");
            return;
        }
    }
    let progress = |connections: usize| {
        drain
            .metrics
            .predecessor_connections
            .set(connections as i64);
    };
    match predecessor.follow(progress).await {
        Ok(closed_at_deadline) => tracing::info!(
            predecessor = pid,
            closed_at_deadline,
            "the previous agent finished draining"
        ),
        Err(error) => {
            tracing::info!(predecessor = pid, %error, "the previous agent stopped reporting its drain")
        }
    }
    drain.metrics.predecessor_connections.set(0);
}

/// Serves agents that connect to take over, until one is ready to; returns it.
pub async fn await_successor(listeners: &Listeners, drain: &Drain) -> Successor {
    loop {
        let channel = match listeners.handover.accept().await {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(%error, "refused a connection on the handover socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let named = match listeners.named() {
            Ok(named) => named,
            Err(error) => {
                tracing::warn!(%error, "cannot name the listening sockets for a successor");
                Successor::refuse(
                    channel,
                    format!("cannot name the listening sockets: {error}"),
                )
                .await;
                continue;
            }
        };
        let successor = match Successor::greet(channel, &named).await {
            Ok(successor) => successor,
            Err(error) => {
                tracing::warn!(%error, "handover to a new agent failed; still serving");
                continue;
            }
        };
        tracing::info!(
            successor = successor.pid,
            "a new agent took copies of the listening sockets; serving until it is ready"
        );
        drain.set_not_ready(Some(format!(
            "handing over to the agent with pid {}",
            successor.pid
        )));
        match successor.ready().await {
            Ok(()) => return successor,
            Err(error) => {
                tracing::warn!(successor = successor.pid, %error, "the new agent went away before it was ready; still serving");
                drain.set_not_ready(None);
            }
        }
    }
}

/// SIGINT and SIGTERM, listened for from the start: one that arrives while
/// nobody waits is kept for the next wait.
pub struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }

    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// What the agent has, to end with.
pub struct Ending<'a> {
    pub listeners: Listeners,
    pub drain: &'a Drain,
    pub connections: &'a Connections,
    /// Set once a successor serves: the admin and probe ports are its.
    pub handed_over: watch::Sender<bool>,
    pub capture_keeper: JoinHandle<()>,
    pub timeout: Duration,
}

/// How the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A successor took over when it was ready, and this agent drained.
    HandedOver,
    /// SIGTERM, and this agent drained.
    Terminated,
}

impl Ending<'_> {
    /// Serves until a successor is ready or SIGTERM, then drains. On SIGTERM
    /// the outbound and tunnel listeners close at once (new connections are
    /// refused, not queued for nobody), but the handover socket stays: an
    /// agent started during the drain still takes over the admin and probe
    /// ports and follows on without a port in use.
    pub async fn run(mut self, signals: &mut Signals) -> Ended {
        let successor = tokio::select! {
            successor = await_successor(&self.listeners, self.drain) => Some(successor),
            () = signals.recv() => None,
        };
        let Some(successor) = successor else {
            self.listeners.outbound.clear();
            self.listeners.tunnel.clear();
            let drained = drain(self.drain, self.connections, None, self.timeout);
            let late = async {
                let successor = await_successor(&self.listeners, self.drain).await;
                self.hand_over(&successor);
                successor
                    .tell(Message::Released {
                        connections: self.connections.count(),
                    })
                    .await;
                // Held, so the successor sees no end until this agent's.
                std::future::pending::<()>().await;
            };
            let closed_at_deadline = tokio::select! {
                closed = drained => closed,
                () = late => unreachable!("pending"),
            };
            tracing::info!(closed_at_deadline, "drain finished");
            return Ended::Terminated;
        };
        self.hand_over(&successor);
        // This agent's handles on the listening sockets; the shards and the
        // admin endpoint close theirs as they stop.
        drop(self.listeners);
        let closed_at_deadline =
            drain(self.drain, self.connections, Some(&successor), self.timeout).await;
        tracing::info!(closed_at_deadline, "drain finished");
        Ended::HandedOver
    }

    /// The successor serves: the node's capture and ports are its now.
    fn hand_over(&self, successor: &Successor) {
        tracing::info!(
            successor = successor.pid,
            "the new agent serves; this one lets go"
        );
        self.handed_over.send_replace(true);
        self.capture_keeper.abort();
    }
}

/// The drain: accept nothing new, `GOAWAY` to tunnel peers, relay what is
/// open until it ends or `timeout` passes, then close what is left. Returns
/// how many connections had to be closed at the deadline.
async fn drain(
    drain: &Drain,
    connections: &Connections,
    successor: Option<&Successor>,
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    drain.enter(Phase::Draining);
    drain.metrics.draining.set(1);
    let open = connections.count();
    drain.set_not_ready(Some(format!("draining: {open} connections still open")));
    match successor {
        Some(successor) => {
            tracing::info!(
                successor = successor.pid,
                connections = open,
                ?timeout,
                "handed over; draining"
            );
            successor
                .tell(Message::Released { connections: open })
                .await;
        }
        None => tracing::info!(connections = open, ?timeout, "SIGTERM: draining"),
    }
    let mut logged = Instant::now();
    loop {
        let open = connections.count();
        drain.metrics.connections.set(open as i64);
        if open == 0 || Instant::now() >= deadline {
            break;
        }
        drain.set_not_ready(Some(format!("draining: {open} connections still open")));
        if let Some(successor) = successor {
            successor
                .tell(Message::Draining { connections: open })
                .await;
        }
        if logged.elapsed() >= WAIT_LOG_EVERY {
            tracing::info!(connections = open, remaining = ?deadline.saturating_duration_since(Instant::now()), "draining");
            logged = Instant::now();
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let closed = connections.count();
    if closed > 0 {
        tracing::info!(
            connections = closed,
            "drain deadline passed: closing the connections still open"
        );
        drain.metrics.closed.inc_by(closed as u64);
        drain.enter(Phase::Closing);
        let grace = Instant::now() + CLOSE_GRACE;
        while connections.count() > 0 && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drain.metrics.connections.set(connections.count() as i64);
    if let Some(successor) = successor {
        successor
            .tell(Message::Drained {
                closed_at_deadline: closed,
            })
            .await;
    }
    closed
}
