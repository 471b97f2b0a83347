//! Opening the far end of a connection to a pod or an address outside the
//! mesh, the same way for both directions.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use super::Error;

/// How long the agent waits for a destination to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection from the agent to `target`, with `TCP_NODELAY` (the
/// relay writes what it was given; the application did its own batching).
pub async fn connect(target: SocketAddr) -> Result<TcpStream, Error> {
    let socket = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| Error::ConnectTimeout(target))?
        .map_err(|source| Error::Connect { target, source })?;
    let _ = socket.set_nodelay(true);
    Ok(socket)
}
