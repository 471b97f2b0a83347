//! TLS for the tunnel: TLS 1.3 only, client certificates always, and the
//! peer's SPIFFE identity checked on both sides.
//!
//! The client names the identity it expects in SNI
//! (`<sa>.<ns>.sa.<trust domain>`), so the server can pick that
//! ServiceAccount's certificate, and then refuses any server chain that does
//! not end in the trust bundle *and* carry exactly that identity. The server
//! verifies the client chain against the same bundle and reads the client's
//! identity from it for authorization.

use std::{fmt, sync::Arc};

use ferry_proto::SpiffeId;
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

/// ALPN of the tunnel: HTTP/2 only.
pub const ALPN_H2: &[u8] = b"h2";

/// The SNI a client sends to ask for `identity`'s certificate.
pub fn sni_for(identity: &SpiffeId) -> String {
    format!(
        "{}.{}.sa.{}",
        identity.service_account(),
        identity.namespace(),
        identity.trust_domain()
    )
}

/// The identity of `trust_domain` an SNI of [`sni_for`]'s form asks for.
/// Read from the right: a ServiceAccount name may contain dots, a namespace
/// may not.
pub fn identity_from_sni(sni: &str, trust_domain: &str) -> Option<SpiffeId> {
    let rest = sni.strip_suffix(trust_domain)?.strip_suffix(".sa.")?;
    let (service_account, namespace) = rest.rsplit_once('.')?;
    SpiffeId::new(trust_domain, namespace, service_account).ok()
}

pub use crate::identity::identity_of;

/// Client side: our certificate for `source`, and a verifier that wants `expected`.
pub fn client_config(
    provider: &Arc<CryptoProvider>,
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
) -> Result<ClientConfig, Error> {
    let verifier = ExpectIdentity {
        expected,
        roots,
        provider: Arc::clone(provider),
    };
    let mut config = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(FixedKey(certified)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
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
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
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
/// exactly the expected SPIFFE id. The DNS name in SNI is not checked: it
/// encodes the identity, which is checked instead.
#[derive(Debug)]
struct ExpectIdentity {
    expected: SpiffeId,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug)]
struct WrongIdentity {
    expected: SpiffeId,
    presented: String,
}

impl fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer presented {}, expected {}",
            self.presented, self.expected
        )
    }
}

impl std::error::Error for WrongIdentity {}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = identity_of(end_entity);
        if presented.as_ref() != Ok(&self.expected) {
            let presented = presented.map_or_else(|e| e, |id| id.to_string());
            return Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(WrongIdentity {
                    expected: self.expected.clone(),
                    presented,
                })),
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trips_an_identity() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/api".parse().unwrap();
        assert_eq!(sni_for(&id), "api.shop.sa.cluster.local");
        assert_eq!(identity_from_sni(&sni_for(&id), "cluster.local"), Some(id));
        let dotted: SpiffeId = "spiffe://cluster.local/ns/shop/sa/api.v2".parse().unwrap();
        assert_eq!(
            identity_from_sni(&sni_for(&dotted), "cluster.local"),
            Some(dotted)
        );
    }

    #[test]
    fn sni_of_another_form_names_no_identity() {
        for sni in [
            "example.com",
            "api.shop.svc.cluster.local",
            "api.shop.sa",
            "",
            "shop.sa.cluster.local",
            "api.shop.sa.other.domain",
        ] {
            assert_eq!(identity_from_sni(sni, "cluster.local"), None, "{sni}");
        }
    }
}
