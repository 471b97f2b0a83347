//! What a CSR must be for the CA to sign it: well-formed, signed by the key
//! it carries (proof of possession), an ECDSA P-256 key, and asking for
//! exactly one name: the URI SAN of the identity requested.

use ferry_proto::SpiffeId;
use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
    prelude::FromDer as _,
};

/// A CSR this CA will sign: the requester's public key (SubjectPublicKeyInfo, DER).
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    pub spki_der: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not a DER PKCS#10 request: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify with its own key (no proof of possession)")]
    Signature,
    #[error("the CSR's key must be ECDSA P-256, not {0}")]
    KeyType(String),
    #[error("the CSR must ask for exactly one URI SAN, {expected}; it asks for {found}")]
    Names { expected: String, found: String },
    #[error("the CSR asks for an extension the CA does not grant: {0}")]
    Extension(String),
}

/// Checks `der` as a request for `identity`.
pub fn check(der: &[u8], identity: &SpiffeId) -> Result<CheckedCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        let what = match curve {
            Some(curve) => format!(
                "key algorithm {} on curve {curve}",
                spki.algorithm.algorithm
            ),
            None => format!("key algorithm {}", spki.algorithm.algorithm),
        };
        return Err(CsrError::KeyType(what));
    }
    csr.verify_signature().map_err(|_| CsrError::Signature)?;

    let expected = identity.to_string();
    let mut names = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(san) => {
                names.extend(san.general_names.iter().map(describe));
            }
            other => {
                return Err(CsrError::Extension(
                    format!("{other:?}").chars().take(80).collect(),
                ));
            }
        }
    }
    if names != [format!("URI:{expected}")] {
        let found = if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        };
        return Err(CsrError::Names {
            expected: format!("URI:{expected}"),
            found,
        });
    }
    Ok(CheckedCsr {
        spki_der: spki.raw.to_vec(),
    })
}

fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::RFC822Name(mail) => format!("email:{mail}"),
        GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType, string::Ia5String};

    use super::*;

    fn identity() -> SpiffeId {
        "spiffe://cluster.local/ns/shop/sa/api".parse().unwrap()
    }

    fn csr(key: &KeyPair, sans: &[SanType]) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans.to_vec();
        params.serialize_request(key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s).unwrap())
    }

    #[test]
    fn accepts_a_p256_request_for_exactly_the_identity() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let checked = check(&csr(&key, &[uri(&identity().to_string())]), &identity()).unwrap();
        assert_eq!(
            checked.spki_der,
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
    }

    #[test]
    fn refuses_other_names_keys_and_garbage() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = "spiffe://cluster.local/ns/shop/sa/admin";
        assert!(matches!(
            check(&csr(&key, &[uri(other)]), &identity()),
            Err(CsrError::Names { .. })
        ));
        assert!(matches!(
            check(
                &csr(
                    &key,
                    &[
                        uri(&identity().to_string()),
                        SanType::DnsName("x.example".try_into().unwrap())
                    ]
                ),
                &identity()
            ),
            Err(CsrError::Names { .. })
        ));
        assert!(matches!(
            check(&csr(&key, &[]), &identity()),
            Err(CsrError::Names { .. })
        ));
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            check(&csr(&p384, &[uri(&identity().to_string())]), &identity()),
            Err(CsrError::KeyType(_))
        ));
        assert!(matches!(
            check(b"garbage", &identity()),
            Err(CsrError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_a_request_not_signed_by_its_own_key() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr(&key, &[uri(&identity().to_string())]);
        // The signature is the last bytes of the DER; flip one.
        let last = der.len() - 3;
        der[last] ^= 0x55;
        assert_eq!(check(&der, &identity()).unwrap_err(), CsrError::Signature);
    }
}
