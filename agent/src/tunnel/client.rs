//! The outbound side of the tunnel: dial another agent with the source
//! identity's certificate, then open one `CONNECT` stream per application
//! connection on a pooled connection.

use std::{net::SocketAddr, sync::Arc};

use http::{Method, Request, StatusCode};
use rustls::{crypto::CryptoProvider, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    Identities,
    inbound::REASON_HEADER,
    pool::{Checkout, Dial, Pool, PoolError, PoolKey},
    stream::TunnelStream,
    tls,
};

/// Dials tunnel connections: TCP to the destination agent, then TLS with the
/// source's certificate, expecting the destination's identity.
pub struct TlsDialer<I> {
    pub identities: Arc<I>,
    pub provider: Arc<CryptoProvider>,
}

impl<I: Identities> Dial for TlsDialer<I> {
    type Io = TlsStream<TcpStream>;

    async fn dial(&self, key: &PoolKey) -> Result<Self::Io, String> {
        let issued = self
            .identities
            .current(&key.source)
            .ok_or_else(|| format!("no certificate yet for {}", key.source))?;
        let config = tls::client_config(
            &self.provider,
            Arc::clone(&issued.certified_key),
            Arc::clone(&issued.roots),
            key.destination.clone(),
        )
        .map_err(|e| format!("TLS client config: {e}"))?;
        let sni = ServerName::try_from(tls::sni_for(&key.destination))
            .map_err(|e| format!("SNI for {}: {e}", key.destination))?;
        let tcp = TcpStream::connect(key.address)
            .await
            .map_err(|e| format!("connect to {}: {e}", key.address))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(Arc::new(config))
            .connect(sni, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {}: {e}", key.address))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("tunnel stream to {target} failed: {error}")]
    Stream { target: SocketAddr, error: String },
    #[error("peer agent refused {target}: {status} {reason}")]
    Refused {
        target: SocketAddr,
        status: StatusCode,
        reason: String,
    },
}

/// A `CONNECT target` stream to the agent of `key`, and the pool slot it holds.
pub async fn open<D: Dial>(
    pool: &Arc<Pool<D>>,
    key: &PoolKey,
    target: SocketAddr,
) -> Result<(TunnelStream, Checkout<D>), OpenError> {
    // A connection can die between checkout and use (GOAWAY, a dead peer the
    // keepalive has not caught yet); it leaves the pool and one retry dials anew.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let checkout = pool.checkout(key).await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .expect("a CONNECT to an address is a valid request");
        let sent = match checkout.send.clone().ready().await {
            Ok(mut send) => send.send_request(request, false),
            Err(error) => Err(error),
        };
        let (response, send_stream) = match sent {
            Ok(sent) => sent,
            Err(error) if attempts < 2 => {
                tracing::debug!(%error, "pooled tunnel connection unusable; redialling");
                checkout.broken();
                continue;
            }
            Err(error) => {
                checkout.broken();
                return Err(OpenError::Stream {
                    target,
                    error: error.to_string(),
                });
            }
        };
        let response = response.await.map_err(|error| OpenError::Stream {
            target,
            error: error.to_string(),
        })?;
        if response.status() != StatusCode::OK {
            let reason = response
                .headers()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            return Err(OpenError::Refused {
                target,
                status: response.status(),
                reason,
            });
        }
        let stream = TunnelStream::new(send_stream, response.into_body());
        return Ok((stream, checkout));
    }
}
