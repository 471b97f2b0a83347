//! The data plane runs on shards: one thread per worker, each with its own
//! single-threaded runtime, its own pool of tunnel connections, and its own
//! accept loops on the node's listening sockets (every shard waits on the
//! same sockets; whichever is woken first accepts, and hands the connection
//! to the shard carrying the fewest: [`crate::proxy::spread`]).
//!
//! A connection is carried from accept to close on one thread: its relay,
//! the pooled HTTP/2 connection it rides on and that connection's TLS all
//! run on the shard that accepted it, so a message crosses no thread on its
//! way through the agent. The control plane (workloads, capture,
//! certificates, admin) runs on the main thread's runtime.

use std::{io, net::SocketAddr, sync::Arc, sync::mpsc};

use anyhow::Context as _;
use tokio::net::TcpSocket;

use crate::{
    proxy::{inbound::Inbound, outbound::Outbound, spread::SharedListener},
    tunnel::Identities,
};

/// Connections the kernel queues for the shards to accept.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds a listening socket the shards share. Called on the main runtime;
/// each shard registers its own handle ([`crate::proxy::spread::share`]) with its own reactor.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// What one shard serves.
pub struct Shard<I> {
    pub index: usize,
    pub outbound: Arc<Outbound>,
    /// `None` without a CA: no tunnel to accept.
    pub inbound: Option<Arc<Inbound<I>>>,
    pub outbound_listeners: Vec<SharedListener>,
    pub tunnel_listeners: Vec<SharedListener>,
}

impl<I: Identities> Shard<I> {
    /// Starts the shard's thread and returns once it accepts connections.
    pub fn start(self) -> anyhow::Result<()> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let name = format!("ferry-shard-{}", self.index);
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error).context("cannot build its runtime"));
                        return;
                    }
                };
                runtime.block_on(async move {
                    if let Err(error) = self.accept() {
                        let _ = ready_tx.send(Err(error).context("cannot accept"));
                        return;
                    }
                    let _ = ready_tx.send(Ok(()));
                    std::future::pending::<()>().await;
                });
            })
            .with_context(|| format!("cannot start {name}"))?;
        ready_rx
            .recv()
            .with_context(|| format!("{name} stopped while starting"))?
            .with_context(|| name.clone())
    }

    /// Spawns this shard's accept loops on its runtime.
    fn accept(self) -> io::Result<()> {
        for listener in self.outbound_listeners {
            let listener = listener.accept_on_this_shard()?;
            tokio::spawn(Arc::clone(&self.outbound).serve(listener));
        }
        if let Some(inbound) = &self.inbound {
            for listener in self.tunnel_listeners {
                let listener = listener.accept_on_this_shard()?;
                tokio::spawn(Arc::clone(inbound).serve(listener));
            }
        }
        Ok(())
    }
}
