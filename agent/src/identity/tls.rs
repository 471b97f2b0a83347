//! The TLS configs a workload certificate is used in: TLS 1.3 only, client
//! certificates always, and the peer's SPIFFE identity checked on both sides.
//! The certificate manager builds both configs when it accepts a certificate,
//! so dialers and acceptors only ever pick up a ready one.
//!
//! The client names the identity it expects in SNI ([`SpiffeId::sni`]), so
//! the server can pick that ServiceAccount's certificate; the client then
//! refuses any server chain that does not end in the trust bundle *and*
//! carry exactly the identity its SNI names. The server verifies the client
//! chain against the same bundle and reads the client's identity from it
//! for authorization.

use std::{fmt, sync::Arc};

use ferry_proto::{SpiffeId, TUNNEL_ALPN};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

use super::identity_of;

/// Client side: our certificate, and a verifier that wants the identity of
/// `trust_domain` the connection's server name (SNI) names.
pub fn client_config(
    provider: &Arc<CryptoProvider>,
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<ClientConfig, Error> {
    let verifier = ExpectIdentity {
        trust_domain: trust_domain.to_owned(),
        roots,
        provider: Arc::clone(provider),
    };
    let mut config = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(FixedKey(certified)));
    config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    // Session resumption would skip the client's certificate on the wire but
    // not its check; it is not worth a ticket store per key yet.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Server side: `identity`'s certificate, client chains checked against `roots`.
pub fn server_config(
    provider: &Arc<CryptoProvider>,
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
) -> Result<ServerConfig, Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(provider))
        .build()
        .map_err(|e| Error::General(format!("client verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedKey(certified)));
    config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The certificate chosen before the handshake; a renewal takes effect on the next one.
#[derive(Debug)]
struct FixedKey(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedKey {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for FixedKey {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// Accepts a server chain only if it ends in the trust bundle and carries
/// exactly the SPIFFE id the server name asks for. The server name is not
/// checked as a DNS name: it encodes the identity, which is checked instead.
#[derive(Debug)]
struct ExpectIdentity {
    trust_domain: String,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

enum WrongIdentity {
    /// The chain is for another identity than the one asked for.
    Presented {
        expected: SpiffeId,
        presented: String,
    },
    /// The server name asks for no identity of the trust domain.
    ServerName(String),
}

impl fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Presented {
                expected,
                presented,
            } => write!(f, "peer presented {presented}, expected {expected}"),
            Self::ServerName(name) => {
                write!(f, "server name {name:?} names no workload identity")
            }
        }
    }
}

/// rustls shows the error with `Debug` ("invalid peer certificate: Other(…)"):
/// the sentence reads better in the logs than the fields.
impl fmt::Debug for WrongIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for WrongIdentity {}

fn wrong_identity(wrong: WrongIdentity) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(wrong))))
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let name = server_name.to_str();
        let expected = SpiffeId::from_sni(&name, &self.trust_domain)
            .ok_or_else(|| wrong_identity(WrongIdentity::ServerName(name.into_owned())))?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = identity_of(end_entity);
        if presented.as_ref().ok() != Some(&expected) {
            let presented = presented.map_or_else(|e| e.to_string(), |id| id.to_string());
            return Err(wrong_identity(WrongIdentity::Presented {
                expected,
                presented,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        None
    }
}
