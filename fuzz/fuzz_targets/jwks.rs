//! The JWKS document the CA trusts tokens by (`Verifier::from_jwks_json`),
//! a file it re-reads whenever it changes.
//!
//! Input: the document's text.
//!
//! What must hold: no panic; a verifier is made only with at least one key
//! and never more keys than the document lists; a refusal says why in a
//! non-empty message; and a token whose signature no key made (one for each
//! key the document names, in that key's algorithm) is never accepted.

#![no_main]

use std::sync::OnceLock;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ferry_ca::jwt::{TokenRequest, Verifier};
use ferry_fuzz::{ISSUER, token_key};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let verifier = match Verifier::from_jwks_json(text, ISSUER, ferry_proto::TOKEN_AUDIENCE) {
        Ok(verifier) => verifier,
        Err(message) => {
            assert!(!message.is_empty(), "an empty refusal of {text:?}");
            return;
        }
    };
    let listed: Vec<Value> = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|jwks| jwks.get("keys")?.as_array().cloned())
        .expect("an accepted JWKS has a list of keys");
    assert!(
        (1..=listed.len()).contains(&verifier.key_count()),
        "{} keys made of the {} listed",
        verifier.key_count(),
        listed.len()
    );
    // Real claims, but a signature none of these keys made.
    let claims = claims();
    for jwk in listed.iter().take(16) {
        let kid = jwk.get("kid").and_then(Value::as_str);
        for alg in ["ES256", "RS256"] {
            let header = match kid {
                Some(kid) => serde_json::json!({ "alg": alg, "kid": kid }),
                None => serde_json::json!({ "alg": alg }),
            };
            let signature_len = if alg == "ES256" { 64 } else { 256 };
            let token = format!(
                "{}.{claims}.{}",
                B64.encode(header.to_string()),
                B64.encode(vec![0x5a; signature_len])
            );
            assert!(
                verifier.verify(&token).is_err(),
                "a forged {alg} token verified against {jwk}"
            );
        }
    }
});

/// The claims part of a token the API server would mint, made once.
fn claims() -> &'static str {
    static CLAIMS: OnceLock<String> = OnceLock::new();
    CLAIMS.get_or_init(|| {
        let token = token_key()
            .minter
            .mint(&TokenRequest {
                namespace: "ferry-system".to_owned(),
                service_account: "ferry-agent".to_owned(),
                node: "n1".to_owned(),
                pod: "ferry-agent-1".to_owned(),
                audience: vec![ferry_proto::TOKEN_AUDIENCE.to_owned()],
                lifetime_secs: 3600,
            })
            .expect("a token");
        token.split('.').nth(1).expect("claims").to_owned()
    })
}
