//! The server end of the tunnel (port 15008): the TLS handshake with the
//! certificate of the identity the client asks for in SNI, the client's
//! verified identity, and HTTP/2. What to do with each `CONNECT` is the
//! inbound proxy's business.

use std::sync::Arc;

use bytes::Bytes;
use ferry_proto::SpiffeId;
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;

use super::{
    Identities,
    metrics::{Side, TunnelMetrics},
    transport::Transport,
    wire,
};
use crate::identity::{CertIdentityError, identity_of};

/// A tunnel connection from another agent, ready for `CONNECT` streams.
pub struct Accepted {
    /// The identity the client's certificate proved.
    pub client: SpiffeId,
    /// The local identity whose certificate this end presented.
    pub local: SpiffeId,
    /// The key exchange group the handshake negotiated.
    pub key_exchange: &'static str,
    pub connection: h2::server::Connection<Transport, Bytes>,
}

/// Why a tunnel connection was refused before it could carry a stream.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no TLS ClientHello within the handshake timeout")]
    NoClientHello,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(std::io::Error),
    #[error("SNI {0:?} names no workload identity")]
    UnknownSni(Option<String>),
    #[error("no certificate on this node for {0} (asked for in SNI)")]
    NoCertificate(SpiffeId),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("TLS handshake with a request for {local} failed: {source}")]
    Handshake {
        local: SpiffeId,
        source: std::io::Error,
    },
    #[error("client presented no certificate")]
    NoClientCertificate,
    #[error(transparent)]
    ClientIdentity(#[from] CertIdentityError),
    #[error("client {client} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        client: SpiffeId,
        trust_domain: String,
    },
    #[error("HTTP/2 handshake with {client}: {source}")]
    Http2 { client: SpiffeId, source: h2::Error },
}

/// Accepts tunnel connections for this node's identities.
pub struct Server<I> {
    trust_domain: String,
    identities: Arc<I>,
    metrics: Arc<TunnelMetrics>,
}

impl<I: Identities> Server<I> {
    pub fn new(trust_domain: String, identities: Arc<I>, metrics: Arc<TunnelMetrics>) -> Self {
        Self {
            trust_domain,
            identities,
            metrics,
        }
    }

    /// TLS, then HTTP/2, on a connection another agent opened; counted as
    /// one server handshake, `ok` or `error`.
    pub async fn accept(&self, stream: TcpStream) -> Result<Accepted, AcceptError> {
        let accepted = self.handshake(stream).await;
        self.metrics.handshake(Side::Server, accepted.is_ok());
        if let Ok(accepted) = &accepted {
            self.metrics
                .key_exchange(Side::Server, accepted.key_exchange);
        }
        accepted
    }

    async fn handshake(&self, stream: TcpStream) -> Result<Accepted, AcceptError> {
        let _ = stream.set_nodelay(true);
        let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let start = tokio::time::timeout(wire::HANDSHAKE_TIMEOUT, acceptor)
            .await
            .map_err(|_| AcceptError::NoClientHello)?
            .map_err(AcceptError::NotTls)?;
        let sni = start.client_hello().server_name().map(str::to_owned);
        let local = sni
            .as_deref()
            .and_then(|sni| SpiffeId::from_sni(sni, &self.trust_domain))
            .ok_or(AcceptError::UnknownSni(sni))?;
        let issued = self
            .identities
            .current(&local)
            .ok_or_else(|| AcceptError::NoCertificate(local.clone()))?;
        let config = Arc::clone(&issued.server_config);
        let tls = tokio::time::timeout(wire::HANDSHAKE_TIMEOUT, start.into_stream(config))
            .await
            .map_err(|_| AcceptError::HandshakeTimeout)?
            .map_err(|source| AcceptError::Handshake {
                local: local.clone(),
                source,
            })?;
        let key_exchange = ferry_proto::crypto::negotiated_group(tls.get_ref().1);
        let client = {
            let (_, session) = tls.get_ref();
            let chain = session
                .peer_certificates()
                .ok_or(AcceptError::NoClientCertificate)?;
            identity_of(&chain[0])?
        };
        if client.trust_domain() != local.trust_domain() {
            return Err(AcceptError::ForeignTrustDomain {
                client,
                trust_domain: local.trust_domain().to_owned(),
            });
        }
        let (tcp, session) = tls.into_inner();
        let connection = h2::server::Builder::new()
            .initial_window_size(wire::STREAM_WINDOW)
            .initial_connection_window_size(wire::CONNECTION_WINDOW)
            .max_frame_size(wire::MAX_FRAME_SIZE)
            .max_concurrent_streams(wire::MAX_CONCURRENT_STREAMS)
            .handshake::<_, Bytes>(Transport::new(tcp, session))
            .await;
        match connection {
            Ok(connection) => Ok(Accepted {
                client,
                local,
                key_exchange,
                connection,
            }),
            Err(source) => Err(AcceptError::Http2 { client, source }),
        }
    }
}
