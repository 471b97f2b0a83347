//! The CA's Certify request path without the network: the protobuf message,
//! the requested identity, the CSR checks, and for a CSR the checks accept,
//! the leaf the CA would sign.
//!
//! Input: a mode byte, then
//! - even: an encoded `ferry.identity.v1.CertifyRequest`;
//! - odd: a CSR (DER) checked as a request for [`ferry_fuzz::IDENTITY`], so
//!   the fuzzer spends its time in CSR parsing.
//!
//! What must hold: the message re-encodes to one that decodes the same; an
//! accepted CSR's key (read again by aws-lc-rs, not x509-parser) is an EC
//! P-256 SubjectPublicKeyInfo and the CSR's own; the CSR, read again, asks
//! for one name only, the identity's URI; the leaf signed for it carries
//! that key and that name alone; every refusal says why in a clean message.

#![no_main]

use std::{sync::OnceLock, time::Duration};

use aws_lc_rs::agreement::{ECDH_P256, ParsedPublicKey, ParsedPublicKeyFormat, UnparsedPublicKey};
use ferry_ca::{
    csr,
    issuer::{Issuer, LeafPolicy},
};
use ferry_fuzz::{assert_clean_message, identity, split_mode};
use ferry_proto::{SpiffeId, identity::v1::CertifyRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use x509_parser::{
    certification_request::X509CertificationRequest, extensions::GeneralName,
    extensions::ParsedExtension, prelude::FromDer as _,
};

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data, 2) else {
        return;
    };
    if mode == 1 {
        check_csr(rest, identity());
        return;
    }
    let Ok(request) = CertifyRequest::decode(rest) else {
        return;
    };
    let again = CertifyRequest::decode(request.encode_to_vec().as_slice())
        .expect("a decoded request re-encodes to a valid one");
    assert_eq!(again, request, "the re-encoded request decodes the same");
    match request.identity.parse::<SpiffeId>() {
        Ok(identity) => check_csr(&request.csr_der, &identity),
        Err(error) => assert_clean_message(&error.to_string(), &error),
    }
});

fn check_csr(der: &[u8], identity: &SpiffeId) {
    let checked = match csr::check(der, identity) {
        Ok(checked) => checked,
        Err(error) => {
            assert_clean_message(&error.to_string(), &error);
            return;
        }
    };
    let key = ParsedPublicKey::try_from(UnparsedPublicKey::new(&ECDH_P256, &checked.spki_der))
        .expect("an accepted CSR's key parses as an EC P-256 key");
    assert_eq!(
        key.format(),
        ParsedPublicKeyFormat::X509,
        "the checked key is a whole SubjectPublicKeyInfo"
    );

    let (rest, csr) = X509CertificationRequest::from_der(der).expect("an accepted CSR parses");
    assert!(rest.is_empty());
    assert_eq!(
        csr.certification_request_info.subject_pki.raw, checked.spki_der,
        "the checked key is the CSR's own"
    );
    let uri = identity.to_string();
    assert_eq!(
        only_uri(&csr).as_deref(),
        Some(uri.as_str()),
        "an accepted CSR asks for the identity's URI and nothing else"
    );

    let leaf = issuer()
        .sign_leaf(identity, &checked.spki_der, POLICY)
        .expect("an accepted CSR's key can be signed");
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf.der).expect("the leaf parses");
    assert_eq!(cert.public_key().raw, checked.spki_der, "the leaf's key");
    let names: Vec<_> = cert
        .subject_alternative_name()
        .expect("one SAN extension")
        .expect("a SAN extension")
        .value
        .general_names
        .clone();
    assert!(
        matches!(names[..], [GeneralName::URI(name)] if name == uri),
        "the leaf names {names:?}, not only {uri}"
    );
}

/// The one name `csr` asks for, if it asks for exactly one URI and has no
/// other extension.
fn only_uri(csr: &X509CertificationRequest<'_>) -> Option<String> {
    let mut names = Vec::new();
    for extension in csr.requested_extensions()? {
        let ParsedExtension::SubjectAlternativeName(san) = extension else {
            return None;
        };
        names.extend(san.general_names.iter().cloned());
    }
    match names[..] {
        [GeneralName::URI(uri)] => Some(uri.to_owned()),
        _ => None,
    }
}

const POLICY: LeafPolicy = LeafPolicy {
    lifetime: Duration::from_secs(24 * 3600),
    clock_skew: Duration::from_secs(300),
};

/// A self-signed CA that is its own trust bundle, made once per process.
fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).expect("a CA certificate");
        let der = cert.der().clone();
        Issuer::new(der.clone(), key, vec![der]).expect("the CA is a valid issuer")
    })
}
