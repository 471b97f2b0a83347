//! What a CSR must be for the CA to sign it: well-formed, signed by the key
//! it carries (proof of possession), an ECDSA P-256 key, and asking for
//! exactly one name: the URI SAN of the identity requested.

use ferry_proto::SpiffeId;
use x509_parser::{
    asn1_rs::{Oid, Tag},
    certification_request::X509CertificationRequest,
    error::X509Error,
    extensions::{GeneralName, ParsedExtension},
    nom,
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
        OID_PKCS1_RSAENCRYPTION, OID_SIG_ED448, OID_SIG_ED25519,
    },
    prelude::FromDer as _,
    x509::SubjectPublicKeyInfo,
};

/// A CSR this CA will sign: the requester's public key (SubjectPublicKeyInfo, DER).
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    pub spki_der: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is empty (the request's csr_der has no bytes)")]
    Empty,
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
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| malformed(der.len(), e))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve(spki) != Some(OID_EC_P256) {
        return Err(CsrError::KeyType(key_type(spki)));
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

/// Says why x509-parser refused the `len` bytes, in words rather than nom's.
fn malformed(len: usize, error: nom::Err<X509Error>) -> CsrError {
    CsrError::Malformed(match error {
        nom::Err::Incomplete(_) => {
            let bytes = if len == 1 { "byte" } else { "bytes" };
            format!("it is cut short: the request does not end within its {len} {bytes}")
        }
        nom::Err::Error(X509Error::NomError(_)) | nom::Err::Failure(X509Error::NomError(_)) => {
            "its bytes are not DER".to_owned()
        }
        nom::Err::Error(e) | nom::Err::Failure(e) => e.to_string(),
    })
}

/// The named curve of an EC key: its parameters, when they are an OID (an
/// RSA key's are NULL).
fn curve<'a>(spki: &'a SubjectPublicKeyInfo<'_>) -> Option<Oid<'a>> {
    let parameters = spki.algorithm.parameters.as_ref()?;
    if parameters.tag() != Tag::Oid {
        return None;
    }
    parameters.as_oid().ok()
}

/// What a refused key is, as a person would name it.
fn key_type(spki: &SubjectPublicKeyInfo<'_>) -> String {
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        return "RSA".to_owned();
    }
    if *algorithm == OID_SIG_ED25519 {
        return "Ed25519".to_owned();
    }
    if *algorithm == OID_SIG_ED448 {
        return "Ed448".to_owned();
    }
    if *algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return format!("a key of algorithm {algorithm}");
    }
    match curve(spki) {
        Some(curve) if curve == OID_NIST_EC_P384 => "ECDSA P-384".to_owned(),
        Some(curve) if curve == OID_NIST_EC_P521 => "ECDSA P-521".to_owned(),
        Some(curve) => format!("ECDSA on curve {curve}"),
        None => "ECDSA without a named curve".to_owned(),
    }
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
    fn refusals_say_plainly_what_was_wrong() {
        let message = |der: &[u8]| check(der, &identity()).unwrap_err().to_string();
        assert_eq!(
            message(b""),
            "the CSR is empty (the request's csr_der has no bytes)"
        );
        assert_eq!(
            message(b"\x30\x05\x01"),
            "the CSR is not a DER PKCS#10 request: its bytes are not DER"
        );
        assert_eq!(
            message(b"\x30"),
            "the CSR is not a DER PKCS#10 request: it is cut short: the request does not end within its 1 byte"
        );
        let san = [uri(&identity().to_string())];
        let rsa = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        assert_eq!(
            message(&csr(&rsa, &san)),
            "the CSR's key must be ECDSA P-256, not RSA"
        );
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert_eq!(
            message(&csr(&p384, &san)),
            "the CSR's key must be ECDSA P-256, not ECDSA P-384"
        );
        let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            message(&csr(&ed25519, &san)),
            "the CSR's key must be ECDSA P-256, not Ed25519"
        );
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
