//! The agent's proxies, both directions side by side on what they share.
//!
//! - [`outbound`]: the outbound listener, which receives the connections the
//!   capture programs redirected, decides their route ([`route`]) and
//!   carries them.
//! - [`inbound`]: the tunnel port, where other agents ask for this node's pods.
//!
//! Below both: the accept loop ([`accept_forever`]), opening a socket to a
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
pub mod upstream;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

pub use balancer::Balancer;
pub use error::{Error, Refused};

use crate::workload::WorkloadTable;
use connections::Connections;

/// What both directions read: the workload table, and where they record
/// the connections they carry (and the metrics those update).
#[derive(Clone)]
pub struct ProxyInputs {
    pub workloads: watch::Receiver<Arc<WorkloadTable>>,
    pub connections: Arc<Connections>,
}

/// Accepts connections on `listener` forever, each handled in its own task.
/// An accept error (EMFILE and friends) backs off briefly instead of spinning.
pub async fn accept_forever<F, Fut>(listener: TcpListener, what: &'static str, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer));
            }
            Err(error) => {
                tracing::warn!(%error, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
