//! The client end of the tunnel: dial another agent with the source
//! identity's certificate, then open one `CONNECT` stream per application
//! connection on a pooled connection.

use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{
    Identities,
    pool::{Checkout, Dial, DialError, Pool, PoolError, PoolKey},
    stream::TunnelStream,
    transport::Transport,
    wire,
};

/// Dials tunnel connections: TCP to the destination agent, then TLS with the
/// source's certificate, expecting the destination's identity (named in SNI).
pub struct TlsDialer<I> {
    pub identities: Arc<I>,
}

impl<I: Identities> Dial for TlsDialer<I> {
    type Io = Transport;

    fn key_exchange(io: &Self::Io) -> Option<&'static str> {
        Some(ferry_proto::crypto::negotiated_group(io.tls()))
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
        let tls = TlsConnector::from(Arc::clone(&issued.client_config))
            .connect(sni, tcp)
            .await
            .map_err(|source| DialError::Tls {
                address: key.address,
                source,
            })?;
        let (tcp, session) = tls.into_inner();
        Ok(Transport::new(tcp, session))
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::DuplexStream;

    use super::*;
    use crate::tunnel::pool::PoolConfig;

    /// Dials in-process HTTP/2 peers. The first `resetting` connections
    /// reset every stream before answering (a peer agent gone between
    /// checkout and use); later ones answer `status`.
    struct Peers {
        dials: AtomicUsize,
        resetting: usize,
        status: StatusCode,
    }

    impl Dial for Arc<Peers> {
        type Io = DuplexStream;

        async fn dial(&self, _key: &PoolKey) -> Result<DuplexStream, DialError> {
            let resets = self.dials.fetch_add(1, Ordering::SeqCst) < self.resetting;
            let status = self.status;
            let (client, server) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(server).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    if resets {
                        respond.send_reset(h2::Reason::CONNECT_ERROR);
                    } else {
                        let mut response = http::Response::new(());
                        *response.status_mut() = status;
                        let _ = respond.send_response(response, false);
                    }
                }
            });
            Ok(client)
        }
    }

    async fn open_with(resetting: usize, status: StatusCode) -> (Result<(), OpenError>, usize) {
        let peers = Arc::new(Peers {
            dials: AtomicUsize::new(0),
            resetting,
            status,
        });
        let pool = Pool::new(PoolConfig::default(), Arc::clone(&peers), Arc::default());
        let key = PoolKey {
            source: "spiffe://cluster.local/ns/a/sa/client".parse().unwrap(),
            destination: "spiffe://cluster.local/ns/b/sa/server".parse().unwrap(),
            address: SocketAddr::from(([198, 19, 0, 2], 15008)),
        };
        let target = SocketAddr::from(([198, 18, 2, 10], 8080));
        let opened = open(&pool, &key, target).await.map(drop);
        (opened, peers.dials.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_stream_reset_before_the_answer_is_sent_again_on_a_fresh_connection() {
        let (opened, dials) = open_with(OPEN_ATTEMPTS - 1, StatusCode::OK).await;
        opened.expect("the last try reaches a peer that answers");
        assert_eq!(dials, OPEN_ATTEMPTS);
    }

    #[tokio::test]
    async fn after_the_last_try_the_reset_is_the_error() {
        let (opened, dials) = open_with(OPEN_ATTEMPTS, StatusCode::OK).await;
        let error = opened.unwrap_err();
        assert!(matches!(error, OpenError::Stream { .. }), "{error}");
        assert_eq!(dials, OPEN_ATTEMPTS, "no try after the last");
    }

    #[tokio::test]
    async fn a_refusal_is_an_answer_and_is_not_sent_again() {
        let (opened, dials) = open_with(0, StatusCode::FORBIDDEN).await;
        let error = opened.unwrap_err();
        assert!(
            matches!(
                error,
                OpenError::Refused {
                    status: StatusCode::FORBIDDEN,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(dials, 1);
    }
}
