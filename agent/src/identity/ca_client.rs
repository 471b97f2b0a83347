//! The agent's client of the Ferry CA: `Certify` over gRPC and TLS, the CA
//! checked against the mesh's trust bundle and its expected name.

use std::{io, path::PathBuf, sync::Arc};

use ferry_proto::identity::v1::{CertifyRequest, CertifyResponse, identity_client::IdentityClient};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{Certifier, CertifyError};

/// How long a Certify call may take, connection included.
pub const CA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone)]
pub struct CaClient {
    client: IdentityClient<Channel>,
}

impl CaClient {
    /// A client of the CA at `address` (`host:port`), whose serving
    /// certificate must chain to a root in `trust_bundle` (re-read at every
    /// connection) and name `server_name`. Connects on first use.
    pub fn new(
        address: String,
        server_name: &str,
        trust_bundle: PathBuf,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> anyhow::Result<Self> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| anyhow::anyhow!("CA server name {server_name:?}: {e}"))?;
        let endpoint = Endpoint::from_shared(format!("http://{address}"))?
            .timeout(CA_TIMEOUT)
            .connect_timeout(CA_TIMEOUT);
        let connector = tower::service_fn(move |_: Uri| {
            let (address, name, trust_bundle, provider) = (
                address.clone(),
                name.clone(),
                trust_bundle.clone(),
                Arc::clone(&provider),
            );
            async move {
                let config = client_tls(&trust_bundle, provider)?;
                let tcp = TcpStream::connect(&address).await?;
                let _ = tcp.set_nodelay(true);
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(name, tcp)
                    .await?;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        });
        Ok(Self {
            client: IdentityClient::new(endpoint.connect_with_connector_lazy(connector)),
        })
    }
}

impl Certifier for CaClient {
    async fn certify(&self, request: CertifyRequest) -> Result<CertifyResponse, CertifyError> {
        let mut client = self.client.clone();
        match client.certify(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(CertifyError {
                code: status.code(),
                message: status.message().to_owned(),
            }),
        }
    }
}

fn client_tls(
    trust_bundle: &std::path::Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> io::Result<ClientConfig> {
    let roots = read_roots(trust_bundle)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The roots in a PEM trust bundle; an error if there are none.
pub fn read_roots(path: &std::path::Path) -> io::Result<RootCertStore> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let pem = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("trust bundle {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("trust bundle {}: {e}", path.display()),
            )
        })?;
        roots.add(cert).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("trust bundle {}: {e}", path.display()),
            )
        })?;
    }
    if roots.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("trust bundle {} holds no certificate", path.display()),
        ));
    }
    Ok(roots)
}
