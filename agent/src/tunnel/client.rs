//! The client end of the tunnel: dial another agent with the source
//! identity's certificate, then open one `CONNECT` stream per application
//! connection on a pooled connection.

use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    Identities,
    pool::{Checkout, Dial, DialError, Pool, PoolError, PoolKey},
    stream::TunnelStream,
    wire,
};

/// Dials tunnel connections: TCP to the destination agent, then TLS with the
/// source's certificate, expecting the destination's identity (named in SNI).
pub struct TlsDialer<I> {
    pub identities: Arc<I>,
}

impl<I: Identities> Dial for TlsDialer<I> {
    type Io = TlsStream<TcpStream>;

    fn key_exchange(io: &Self::Io) -> Option<&'static str> {
        Some(ferry_proto::crypto::negotiated_group(io.get_ref().1))
    }

    async fn dial(&self, key: &PoolKey) -> Result<Self::Io, DialError> {
        let issued = self
            .identities
            .current(&key.source)
            .ok_or_else(|| DialError::NoCertificate(key.source.clone()))?;
        let sni = ServerName::try_from(key.destination.sni())
            .map_err(|_| DialError::ServerName(key.destination.clone()))?;
        let tcp = TcpStream::connect(key.address)
            .await
            .map_err(|source| DialError::Connect {
                address: key.address,
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(Arc::clone(&issued.client_config))
            .connect(sni, tcp)
            .await
            .map_err(|source| DialError::Tls {
                address: key.address,
                source,
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("tunnel stream to {target} failed: {source}")]
    Stream {
        target: SocketAddr,
        source: h2::Error,
    },
    #[error("peer agent refused {target}: {status} {reason}")]
    Refused {
        target: SocketAddr,
        status: StatusCode,
        reason: String,
    },
}

/// Tries one `CONNECT` may take: a stream that fails before the peer
/// answered carried none of the application's bytes (the relay starts only
/// after the answer), so it is safe to ask again on a fresh connection.
const OPEN_ATTEMPTS: usize = 3;

/// A `CONNECT target` stream to the agent of `key`, and the pool slot it holds.
///
/// A pooled connection can die between checkout and use: the peer drains
/// (its `GOAWAY` refuses new streams), or its agent is gone (a reset the
/// keepalive has not caught yet). Then the connection leaves the pool and
/// the request is sent again on a fresh one, so an agent upgrade on the
/// peer's node fails no application connection.
pub async fn open<D: Dial>(
    pool: &Arc<Pool<D>>,
    key: &PoolKey,
    target: SocketAddr,
) -> Result<(TunnelStream, Checkout<D>), OpenError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let checkout = pool.checkout(key).await?;
        let sent = match checkout.send.clone().ready().await {
            Ok(mut send) => send.send_request(wire::connect_request(target), false),
            Err(error) => Err(error),
        };
        let answered = match sent {
            Ok((response, send_stream)) => response.await.map(|response| (response, send_stream)),
            Err(error) => Err(error),
        };
        let (response, send_stream) = match answered {
            Ok(answered) => answered,
            Err(error) if attempts < OPEN_ATTEMPTS => {
                tracing::debug!(%error, attempt = attempts, "tunnel stream failed before an answer; retrying on a fresh connection");
                checkout.broken();
                continue;
            }
            Err(source) => {
                checkout.broken();
                return Err(OpenError::Stream { target, source });
            }
        };
        if response.status() != StatusCode::OK {
            return Err(OpenError::Refused {
                target,
                status: response.status(),
                reason: wire::refusal_reason(&response),
            });
        }
        let stream = TunnelStream::new(send_stream, response.into_body());
        return Ok((stream, checkout));
    }
}
