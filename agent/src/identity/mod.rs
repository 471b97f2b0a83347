//! Workload identity: one key per ServiceAccount with a pod on this node,
//! held in memory only, and a certificate for it from the Ferry CA, renewed
//! at half its lifetime, checked, and turned into ready TLS configs before
//! it is used.

pub mod ca_client;
mod manager;
pub mod metrics;
pub mod renewal;
pub mod tls;

use std::future::Future;

use ferry_proto::{
    SpiffeId, SpiffeIdError,
    identity::v1::{CertifyRequest, CertifyResponse},
};
use rustls::pki_types::CertificateDer;

pub use manager::{
    CA_BACKOFF, CertManager, CertView, IdentityConfig, InvalidCertificate, Issued, ObtainError,
};

/// Something that signs CSRs: the CA client, or a test's stand-in.
pub trait Certifier: Send + Sync + 'static {
    fn certify(
        &self,
        request: CertifyRequest,
    ) -> impl Future<Output = Result<CertifyResponse, CertifyError>> + Send;
}

/// The CA did not sign.
#[derive(Debug, Clone, thiserror::Error)]
#[error("CA refused ({code:?}): {message}")]
pub struct CertifyError {
    /// The gRPC status: `Unavailable` when the CA cannot be reached.
    pub code: tonic::Code,
    pub message: String,
}

/// Why a certificate names no workload identity.
#[derive(Debug, thiserror::Error)]
pub enum CertIdentityError {
    #[error("certificate does not parse: {0}")]
    Parse(x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("bad subjectAltName: {0}")]
    SubjectAltName(x509_parser::error::X509Error),
    #[error("certificate has no subjectAltName")]
    NoSubjectAltName,
    #[error("certificate must carry exactly one URI SAN")]
    UriSans,
    #[error("URI SAN {uri:?} is not a SPIFFE id: {source}")]
    NotSpiffe { uri: String, source: SpiffeIdError },
}

/// The one SPIFFE id a certificate carries as its URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, CertIdentityError> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).map_err(CertIdentityError::Parse)?;
    let sans = cert
        .subject_alternative_name()
        .map_err(CertIdentityError::SubjectAltName)?
        .ok_or(CertIdentityError::NoSubjectAltName)?;
    let mut uris = sans
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err(CertIdentityError::UriSans);
    };
    uri.parse::<SpiffeId>()
        .map_err(|source| CertIdentityError::NotSpiffe {
            uri: uri.to_owned(),
            source,
        })
}
