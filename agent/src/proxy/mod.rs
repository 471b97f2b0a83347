//! The agent's proxies: the outbound listener, which receives the
//! connections the capture programs redirected, decides their route and
//! carries them; the relay both directions share.

pub mod connections;
pub mod outbound;
pub mod relay;
pub mod route;

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

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
