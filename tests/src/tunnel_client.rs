//! An HTTP/2 connection to an agent's tunnel port as an outside client
//! with a certificate from the test CA: what the tests use to send the
//! `CONNECT`s no agent would send.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use ferry_agent::identity::tls;
use ferry_proto::SpiffeId;
use rustls::{RootCertStore, crypto::CryptoProvider, pki_types::ServerName, sign::CertifiedKey};

/// Connects to `tunnel` with `certified`, expecting the server to present
/// `expected` (its SNI is asked for), and returns the h2 handle; the
/// connection runs on a task of its own.
pub async fn connect(
    tunnel: SocketAddr,
    (certified, roots): (Arc<CertifiedKey>, Arc<RootCertStore>),
    expected: &SpiffeId,
) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let sni = ServerName::try_from(expected.sni())?;
    let config = tls::client_config(&provider, certified, roots, expected.trust_domain())?;
    let tcp = tokio::net::TcpStream::connect(tunnel).await?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(sni, tcp)
        .await?;
    let (send, connection) = h2::client::handshake(stream).await?;
    tokio::spawn(connection);
    Ok(send)
}
