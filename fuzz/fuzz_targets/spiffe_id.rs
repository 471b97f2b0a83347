//! `SpiffeId` from the strings it comes from: a requested identity (the CA
//! reads one from every Certify request, the agent from workload facts) and
//! a TLS server name (an inbound tunnel's SNI, chosen by the peer).
//!
//! Input: a mode byte, then UTF-8 text.
//! - even: the text is a SPIFFE id;
//! - odd: the text is an SNI, optionally followed by NUL and the trust
//!   domain to read it in (`cluster.local` otherwise).
//!
//! What must hold: a parsed id prints back to exactly its input, its parts
//! are the input's path segments, it round-trips through its SNI, and it is
//! accepted exactly when each part passes the rule for its kind (checked
//! against reference implementations of RFC 1123 written separately here).
//! An SNI names an identity only if that identity's SNI is the very string.

#![no_main]

use ferry_fuzz::{assert_clean_message, split_mode};
use ferry_proto::{SpiffeId, SpiffeIdError, is_dns_label, is_dns_subdomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data, 2) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if mode == 0 {
        spiffe_id(text);
    } else {
        let (sni, trust_domain) = text.split_once('\0').unwrap_or((text, "cluster.local"));
        server_name(sni, trust_domain);
    }
});

fn spiffe_id(text: &str) {
    // What the string says, read without the parser: scheme, then exactly
    // `<td>/ns/<ns>/sa/<sa>`.
    let said = text.strip_prefix("spiffe://").and_then(|rest| {
        match rest.split('/').collect::<Vec<_>>()[..] {
            [td, "ns", ns, "sa", sa] => Some((td, ns, sa)),
            _ => None,
        }
    });
    for part in text.split(['/', ':']) {
        assert_eq!(is_dns_label(part), reference_label(part), "label {part:?}");
        assert_eq!(
            is_dns_subdomain(part),
            reference_subdomain(part),
            "subdomain {part:?}"
        );
    }
    match text.parse::<SpiffeId>() {
        Ok(id) => {
            assert_eq!(id.to_string(), text, "prints back to its input");
            assert_eq!(
                said,
                Some((id.trust_domain(), id.namespace(), id.service_account())),
                "its parts are what {text:?} says"
            );
            assert!(reference_trust_domain(id.trust_domain()));
            assert!(reference_label(id.namespace()), "{id}");
            assert!(reference_subdomain(id.service_account()), "{id}");
            assert_eq!(
                id.kubernetes_username(),
                format!(
                    "system:serviceaccount:{}:{}",
                    id.namespace(),
                    id.service_account()
                )
            );
            let sni = id.sni();
            assert_eq!(
                SpiffeId::from_sni(&sni, id.trust_domain()).as_ref(),
                Some(&id),
                "round trip through the SNI {sni:?}"
            );
            assert_eq!(
                SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account()).as_ref(),
                Ok(&id)
            );
        }
        Err(error) => {
            assert_clean_message(&error.to_string(), &error);
            let Some((td, ns, sa)) = said else {
                assert!(
                    matches!(error, SpiffeIdError::Scheme(_) | SpiffeIdError::Shape(_)),
                    "{text:?} is not of the shape, but the error is {error:?}"
                );
                return;
            };
            // The shape is right: the first part that breaks its rule is named.
            let expected = if !reference_trust_domain(td) {
                SpiffeIdError::TrustDomain(td.to_owned())
            } else if !reference_label(ns) {
                SpiffeIdError::Namespace(ns.to_owned())
            } else if !reference_subdomain(sa) {
                SpiffeIdError::ServiceAccount(sa.to_owned())
            } else {
                panic!("{text:?} has valid parts but was refused: {error:?}")
            };
            assert_eq!(error, expected, "{text:?}");
        }
    }
}

fn server_name(sni: &str, trust_domain: &str) {
    if let Some(id) = SpiffeId::from_sni(sni, trust_domain) {
        assert_eq!(id.sni(), sni, "{id} is named by exactly its own SNI");
        assert_eq!(id.trust_domain(), trust_domain);
        assert_eq!(
            id.to_string().parse::<SpiffeId>().as_ref(),
            Ok(&id),
            "an id read from an SNI is a valid SPIFFE id"
        );
    }
}

/// RFC 1123 label, as Kubernetes checks a namespace name:
/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
fn reference_label(s: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    match bytes {
        [] => false,
        [only] => alnum(only),
        [first, middle @ .., last] => {
            bytes.len() <= 63
                && alnum(first)
                && alnum(last)
                && middle.iter().all(|b| alnum(b) || *b == b'-')
        }
    }
}

/// RFC 1123 subdomain: labels joined by dots, at most 253 characters.
fn reference_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(reference_label)
}

/// SPIFFE trust domain: 1–255 of `a-z0-9._-`.
fn reference_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
}
