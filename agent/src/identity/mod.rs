//! Workload identity: one key per ServiceAccount with a pod on this node,
//! held in memory only, and a certificate for it from the Ferry CA, renewed
//! at half its lifetime and checked before it is used.

pub mod ca_client;
mod manager;
pub mod renewal;

use std::future::Future;

use ferry_proto::{
    SpiffeId,
    identity::v1::{CertifyRequest, CertifyResponse},
};
use rustls::pki_types::CertificateDer;

pub use manager::{CA_BACKOFF, CertManager, CertView, IdentityConfig, Issued};

/// Something that signs CSRs: the CA client, or a test's stand-in.
pub trait Certifier: Send + Sync + 'static {
    fn certify(
        &self,
        request: CertifyRequest,
    ) -> impl Future<Output = Result<CertifyResponse, String>> + Send;
}

/// The one SPIFFE id a certificate carries as its URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("certificate has no subjectAltName")?;
    let mut uris = sans
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err("certificate must carry exactly one URI SAN".to_owned());
    };
    uri.parse::<SpiffeId>()
        .map_err(|e| format!("URI SAN {uri:?} is not a SPIFFE id: {e}"))
}
