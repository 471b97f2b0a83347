//! The CA's offline token check (`jwt::Verifier::verify`) against a JWKS
//! that holds one fixed ES256 key ([`ferry_fuzz::TOKEN_KEY_PKCS8`]).
//!
//! Input: a mode byte, then
//! - even: a token, as an agent sends it;
//! - odd: claims JSON, or a header, 0xFF, and claims JSON: signed with the
//!   fixed key (the header defaults to the API server's), so the fuzzer gets
//!   past the signature into the claim checks.
//!
//! What must hold: a verified token's identity is its `sub`
//! (`system:serviceaccount:<ns>:<sa>`), its node is
//! `kubernetes.io.node.name`, its pod `kubernetes.io.pod.name`, and its
//! issuer and audience are the verifier's, all read again from the token
//! here (reading only those fields, as the verifier does, so an unknown
//! claim's value is skipped unconverted); a token whose header does not say
//! ES256 (the only trusted key's algorithm; RS256 would need an RSA key) is
//! never accepted; every refusal's
//! message is non-empty and free of raw control characters (serde's errors
//! quote the token's text; they are escaped).

#![no_main]

use ferry_ca::jwt::{LEEWAY_SECS, TokenIdentity, unix_now};
use ferry_fuzz::{HEADER_END, ISSUER, assert_clean_message, jwt_part, split_mode, token_key};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data, 2) else {
        return;
    };
    let key = token_key();
    let token = if mode == 0 {
        let Ok(token) = std::str::from_utf8(rest) else {
            return;
        };
        token.to_owned()
    } else {
        match rest.iter().position(|&b| b == HEADER_END) {
            Some(end) => key.sign(&rest[..end], &rest[end + 1..]),
            None => key.sign(key.header().as_bytes(), rest),
        }
    };
    match key.verifier.verify(&token) {
        Ok(identity) => accepted(&token, &identity),
        Err(error) => assert_clean_message(&error.to_string(), &error),
    }
});

/// The header fields checked here; the rest are skipped unread.
#[derive(Debug, Deserialize)]
struct Header {
    alg: Option<Value>,
}

/// The claims checked here, each leaf read as any JSON; the rest are
/// skipped unread, as the verifier skips them.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<Value>,
    iss: Option<Value>,
    aud: Option<Value>,
    exp: Option<Value>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<Kubernetes>,
}

#[derive(Debug, Deserialize)]
struct Kubernetes {
    node: Option<Named>,
    pod: Option<Named>,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: Option<Value>,
}

fn text(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str)
}

fn name(object: Option<&Named>) -> Option<&str> {
    text(object.and_then(|o| o.name.as_ref()))
}

fn accepted(token: &str, identity: &TokenIdentity) {
    let header: Header = jwt_part(token, 0).expect("an accepted token's header is JSON");
    assert_eq!(
        header.alg.as_ref().and_then(Value::as_str),
        Some("ES256"),
        "accepted a token whose header is {header:?}"
    );
    let claims: Claims = jwt_part(token, 1).expect("an accepted token's claims are JSON");
    let kubernetes = claims.kubernetes.as_ref();
    assert_eq!(
        text(claims.sub.as_ref()),
        Some(identity.username().as_str()),
        "{identity:?} is not the subject of {claims:?}"
    );
    assert_eq!(
        text(claims.sub.as_ref()),
        Some(
            format!(
                "system:serviceaccount:{}:{}",
                identity.namespace, identity.service_account
            )
            .as_str()
        )
    );
    assert!(!identity.namespace.is_empty() && !identity.service_account.is_empty());
    assert!(!identity.namespace.contains(':') && !identity.service_account.contains(':'));
    assert_eq!(
        name(kubernetes.and_then(|k| k.node.as_ref())),
        Some(identity.node.as_str()),
        "{identity:?} is not on the node of {claims:?}"
    );
    assert_eq!(
        name(kubernetes.and_then(|k| k.pod.as_ref())),
        identity.pod.as_deref(),
        "{identity:?} is not the pod of {claims:?}"
    );
    assert_eq!(
        text(claims.iss.as_ref()),
        Some(ISSUER),
        "issuer of {claims:?}"
    );
    let audience = match &claims.aud {
        Some(Value::String(one)) => vec![one.as_str()],
        Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    assert!(
        audience.contains(&ferry_proto::TOKEN_AUDIENCE),
        "audience of {claims:?}"
    );
    let exp = claims.exp.as_ref().and_then(Value::as_f64);
    assert!(
        exp.is_some_and(|exp| exp + LEEWAY_SECS as f64 >= unix_now() as f64),
        "expiry of {claims:?}"
    );
}
