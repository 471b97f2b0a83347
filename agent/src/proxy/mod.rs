//! The agent's proxies, both directions side by side on what they share.
//!
//! - [`outbound`]: the outbound listener, which receives the connections the
//!   capture programs redirected, decides their route ([`route`]) and
//!   carries them.
//! - [`inbound`]: the tunnel port, where other agents ask for this node's pods.
//!
//! Below both: the accept loop ([`accept_until_drained`]), opening a socket to a
//! destination ([`upstream`]), the byte relay ([`relay`]), live connection
//! tracking and the access log ([`connections`]), the errors that say why a
//! connection was not carried ([`Error`], [`Refused`]) and the metrics.

mod balancer;
pub mod connections;
mod error;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod relay;
pub mod revocation;
pub mod route;
pub mod spread;
pub mod upstream;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpStream, sync::watch};

pub use balancer::Balancer;
pub use error::{Error, Refused};

use crate::{
    drain::{DrainSignal, Phase},
    workload::WorkloadTable,
};
use connections::Connections;
use spread::Accepting;

/// What both directions read: the workload table, and where they record
/// the connections they carry (and the metrics those update).
#[derive(Clone)]
pub struct ProxyInputs {
    pub workloads: watch::Receiver<Arc<WorkloadTable>>,
    pub connections: Arc<Connections>,
    /// Where the agent is on its way out: accept loops stop when it drains.
    pub drain: DrainSignal,
}

/// Accepts connections on `listener` until the agent drains, each handled in
/// its own task on the shard [`spread`] gives it; then closes this handle on
/// the listening socket (a successor may hold another). An accept error
/// (EMFILE and friends) backs off briefly instead of spinning.
pub async fn accept_until_drained<F, Fut>(
    mut listener: Accepting,
    what: &'static str,
    drain: DrainSignal,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let carry = |taken: spread::Taken| {
        spread::spawn_counted(taken.load, handle(taken.stream, taken.peer));
    };
    let drained = drain.reached(Phase::Draining);
    tokio::pin!(drained);
    loop {
        let taken = tokio::select! {
            () = &mut drained => break,
            taken = listener.next() => taken,
        };
        match taken {
            Ok(taken) => carry(taken),
            Err(error) => {
                tracing::warn!(%error, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    listener.close(carry);
    tracing::debug!(listener = what, "stopped accepting");
}
