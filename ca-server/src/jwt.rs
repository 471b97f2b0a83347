//! Kubernetes ServiceAccount tokens: verified offline against the API
//! server's published keys (a JWKS) with `jsonwebtoken`, and minted for runs
//! without a cluster (tests, the demo).
//!
//! The library checks the signature and the registered claims (`iss`, `aud`,
//! `exp`, `nbf`, with [`LEEWAY_SECS`]). What Ferry adds on top:
//! - the algorithm is pinned per key: an EC P-256 key verifies ES256 only and
//!   an RSA key RS256 only, so `none`, an HMAC (a public key used as the
//!   shared secret) or a key of the wrong type never verifies anything;
//! - the key is chosen by the token's `kid`, and a token without one is
//!   accepted only when a single trusted key could have signed it;
//! - the subject must be a ServiceAccount and the token must name the node of
//!   the pod it was minted for.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ferry_proto::Untrusted;
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How far the token's clocks may disagree with ours.
pub const LEEWAY_SECS: u64 = 60;
/// Tokens larger than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is not a JWT: {0}")]
    Malformed(String),
    #[error("the token's algorithm {0:?} is not accepted (only ES256 and RS256)")]
    Algorithm(String),
    #[error("the token's signature does not verify with any trusted key{0}")]
    Signature(String),
    #[error(
        "the token names no key (kid) and {0} trusted keys could have signed it; the API server always names its key"
    )]
    NoKeyId(usize),
    #[error("the token is signed {alg} but its key {kid:?} is {key}")]
    KeyType {
        kid: String,
        alg: &'static str,
        key: &'static str,
    },
    #[error("the token has no {0:?} claim")]
    MissingClaim(String),
    #[error("the token was issued by {found:?}, not by {expected:?}")]
    Issuer { found: String, expected: String },
    #[error("the token's audience {found:?} does not include {expected:?}")]
    Audience {
        found: Vec<String>,
        expected: String,
    },
    #[error("the token expired {0} seconds ago")]
    Expired(u64),
    #[error("the token is not valid for another {0} seconds")]
    NotYetValid(u64),
    #[error(
        "the token's subject {0:?} is not a ServiceAccount (system:serviceaccount:<ns>:<name>)"
    )]
    Subject(String),
    #[error(
        "the token carries no node name (kubernetes.io.node.name): it was not minted for a pod bound to a node"
    )]
    NoNode,
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub pod: Option<String>,
}

impl TokenIdentity {
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// A key a token may be signed with, and the one algorithm it verifies.
struct TrustedKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

/// Verifies tokens against a set of trusted keys.
pub struct Verifier {
    keys: Vec<TrustedKey>,
    issuer: String,
    audience: String,
}

impl Verifier {
    /// Parses a JWKS document; keys Ferry does not accept (not EC P-256 or
    /// RSA, or marked for another algorithm) are skipped, but one must be left.
    pub fn from_jwks_json(text: &str, issuer: &str, audience: &str) -> Result<Self, String> {
        let jwks: JwkSet =
            serde_json::from_str(text).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
        Self::new(&jwks, issuer, audience)
    }

    pub fn new(jwks: &JwkSet, issuer: &str, audience: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, jwk) in jwks.keys.iter().enumerate() {
            let Some(alg) = accepted_algorithm(jwk) else {
                continue;
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))?;
            if alg == Algorithm::ES256 && key.try_get_as_bytes().map(<[u8]>::len) != Ok(65) {
                return Err(format!("keys[{i}] is not a P-256 point"));
            }
            let mut validation = Validation::new(alg);
            validation.leeway = LEEWAY_SECS;
            validation.validate_nbf = true;
            validation.set_issuer(&[issuer]);
            validation.set_audience(&[audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            keys.push(TrustedKey {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
                validation,
            });
        }
        if keys.is_empty() {
            return Err("no usable key (EC P-256 for ES256, or RSA for RS256)".to_owned());
        }
        Ok(Self {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        })
    }

    /// How many keys tokens may be signed with.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Checks signature, issuer, audience and times, and reads who the token is for.
    pub fn verify(&self, token: &str) -> Result<TokenIdentity, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!(
                "{} bytes is more than {MAX_TOKEN_BYTES}",
                token.len()
            )));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| match named_algorithm(token) {
                Some(alg) if !matches!(alg.as_str(), "ES256" | "RS256") => {
                    TokenError::Algorithm(alg)
                }
                _ => TokenError::Malformed(format!("its header: {}", Untrusted(&e))),
            })?;
        if !matches!(header.alg, Algorithm::ES256 | Algorithm::RS256) {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let key = self.key_for(header.kid.as_deref(), header.alg)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|e| self.refusal(e.into_kind(), token, key))?
            .claims;
        let now = unix_now();
        if let (None, Some(iat)) = (claims.nbf, claims.iat)
            && iat > now + LEEWAY_SECS
        {
            return Err(TokenError::NotYetValid(iat - now));
        }
        identity_of(&claims)
    }

    /// The key named by `kid`, or the only key of `alg` when there is no `kid`.
    fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<&TrustedKey, TokenError> {
        let Some(kid) = kid else {
            let mut of_alg = self.keys.iter().filter(|k| k.alg == alg);
            return match (of_alg.next(), of_alg.count()) {
                (Some(only), 0) => Ok(only),
                (Some(_), more) => Err(TokenError::NoKeyId(more + 1)),
                (None, _) => Err(TokenError::Signature(format!(" (none is {alg:?})"))),
            };
        };
        let key = self
            .keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .ok_or_else(|| TokenError::Signature(format!(" (none has kid {kid:?})")))?;
        if key.alg != alg {
            return Err(TokenError::KeyType {
                kid: kid.to_owned(),
                alg: algorithm_name(alg),
                key: key_type(key.alg),
            });
        }
        Ok(key)
    }

    /// Says what the library refused, with the values that were wrong. The
    /// claims are read again only for the message: each of these refusals
    /// comes after the signature verified.
    fn refusal(&self, kind: ErrorKind, token: &str, key: &TrustedKey) -> TokenError {
        let registered = || {
            jsonwebtoken::dangerous::insecure_decode_claims::<Registered>(token).unwrap_or_default()
        };
        let now = unix_now();
        match kind {
            ErrorKind::InvalidSignature => TokenError::Signature(
                key.kid
                    .as_ref()
                    .map(|kid| format!(" (kid {kid:?})"))
                    .unwrap_or_default(),
            ),
            // The library also calls a claim missing when it has the wrong type.
            ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim) => {
                let present = jsonwebtoken::dangerous::insecure_decode_claims::<Value>(token)
                    .is_ok_and(|claims| claims.get(&claim).is_some());
                if present {
                    TokenError::Malformed(format!(
                        "its {claim:?} claim is not of the expected type"
                    ))
                } else {
                    TokenError::MissingClaim(claim)
                }
            }
            ErrorKind::ExpiredSignature => {
                TokenError::Expired(now.saturating_sub(registered().exp.unwrap_or(now)))
            }
            ErrorKind::ImmatureSignature => {
                TokenError::NotYetValid(registered().nbf.unwrap_or(now).saturating_sub(now))
            }
            ErrorKind::InvalidIssuer => TokenError::Issuer {
                found: strings(registered().iss).join(", "),
                expected: self.issuer.clone(),
            },
            ErrorKind::InvalidAudience => TokenError::Audience {
                found: strings(registered().aud),
                expected: self.audience.clone(),
            },
            ErrorKind::Json(e) => TokenError::Malformed(format!(
                "its claims are not the expected JSON: {}",
                Untrusted(&e)
            )),
            ErrorKind::Base64(e) => TokenError::Malformed(format!("it is not base64url: {e}")),
            other => TokenError::Malformed(jsonwebtoken::errors::Error::from(other).to_string()),
        }
    }
}

fn accepted_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let alg = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        _ => return None,
    };
    let marked = jwk.common.key_algorithm.map(|a| a.to_string());
    (marked.is_none() || marked.as_deref() == Some(algorithm_name(alg))).then_some(alg)
}

fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => "ES256",
        Algorithm::RS256 => "RS256",
        _ => "another algorithm",
    }
}

fn key_type(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => "an EC P-256 key",
        _ => "an RSA key",
    }
}

/// The `alg` a header names, when the library cannot parse the header
/// because it does not know the algorithm (`none`, say).
fn named_algorithm(token: &str) -> Option<String> {
    let header = B64.decode(token.split('.').next()?).ok()?;
    let header: Value = serde_json::from_slice(&header).ok()?;
    header.get("alg")?.as_str().map(str::to_owned)
}

/// `iss` and `aud` are a string or a list of strings.
fn strings(value: Option<Value>) -> Vec<String> {
    match value {
        Some(Value::String(one)) => vec![one],
        Some(Value::Array(many)) => many
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// The registered claims, read only to explain a refusal.
#[derive(Debug, Default, Deserialize)]
struct Registered {
    iss: Option<Value>,
    aud: Option<Value>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

/// The claims of a Kubernetes projected ServiceAccount token that Ferry
/// reads once the library has checked the registered ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub iat: Option<u64>,
    #[serde(rename = "kubernetes.io", default)]
    pub kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KubernetesClaims {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub node: Option<ObjectRef>,
    #[serde(default)]
    pub pod: Option<ObjectRef>,
    #[serde(default)]
    pub serviceaccount: Option<ObjectRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

fn identity_of(claims: &Claims) -> Result<TokenIdentity, TokenError> {
    let subject = || TokenError::Subject(claims.sub.clone());
    let rest = claims
        .sub
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(subject)?;
    let (namespace, service_account) = rest.split_once(':').ok_or_else(subject)?;
    if namespace.is_empty() || service_account.is_empty() || service_account.contains(':') {
        return Err(subject());
    }
    let kubernetes = claims.kubernetes.clone().unwrap_or_default();
    let node = kubernetes.node.ok_or(TokenError::NoNode)?.name;
    Ok(TokenIdentity {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        node,
        pod: kubernetes.pod.map(|p| p.name),
    })
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs tokens the way the Kubernetes API server does, for clusters that
/// are not there: an ES256 key whose public half goes into a JWKS file.
pub struct Minter {
    key: EncodingKey,
    kid: String,
    pub issuer: String,
}

/// What to put into a minted token.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub pod: String,
    pub audience: Vec<String>,
    /// Seconds from now; negative for a token that has already expired.
    pub lifetime_secs: i64,
}

impl Minter {
    pub fn generate(issuer: &str) -> Result<Self, String> {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| format!("cannot generate a token key: {e}"))?;
        Self::from_pkcs8(pkcs8.as_ref(), issuer)
    }

    /// A minter with a given P-256 key (PKCS#8 DER): the fuzz targets sign
    /// with a fixed key so that their runs are reproducible.
    pub fn from_pkcs8(pkcs8: &[u8], issuer: &str) -> Result<Self, String> {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|e| format!("cannot load the token key: {e}"))?;
        let kid = B64.encode(
            &aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pair.public_key().as_ref())
                .as_ref()[..12],
        );
        Ok(Self {
            key: EncodingKey::from_ec_der(pkcs8),
            kid,
            issuer: issuer.to_owned(),
        })
    }

    /// The public key, as the JWKS a CA trusts.
    pub fn jwks(&self) -> JwkSet {
        let mut jwk = Jwk::from_encoding_key(&self.key, Algorithm::ES256)
            .expect("a P-256 key has a public JWK");
        jwk.common.key_id = Some(self.kid.clone());
        JwkSet { keys: vec![jwk] }
    }

    pub fn mint(&self, request: &TokenRequest) -> Result<String, String> {
        let header = Header {
            kid: Some(self.kid.clone()),
            ..Header::new(Algorithm::ES256)
        };
        jsonwebtoken::encode(&header, &token_claims(&self.issuer, request), &self.key)
            .map_err(|e| format!("cannot sign a token: {e}"))
    }
}

/// The claims the API server puts in a projected ServiceAccount token.
fn token_claims(issuer: &str, request: &TokenRequest) -> Value {
    let now = unix_now() as i64;
    let exp = now + request.lifetime_secs;
    let uid = |kind: &str, name: &str| format!("{kind}-{name}-uid");
    serde_json::json!({
        "iss": issuer,
        "aud": request.audience,
        "sub": format!("system:serviceaccount:{}:{}", request.namespace, request.service_account),
        "iat": now.min(exp),
        "nbf": now.min(exp),
        "exp": exp,
        "kubernetes.io": {
            "namespace": request.namespace,
            "node": { "name": request.node, "uid": uid("node", &request.node) },
            "pod": { "name": request.pod, "uid": uid("pod", &request.pod) },
            "serviceaccount": { "name": request.service_account, "uid": uid("sa", &request.service_account) },
        },
    })
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::signature::{self, KeyPair as _};

    use super::*;

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    fn request() -> TokenRequest {
        TokenRequest {
            namespace: "ferry-system".to_owned(),
            service_account: "ferry-agent".to_owned(),
            node: "n1".to_owned(),
            pod: "ferry-agent-x7k2p".to_owned(),
            audience: vec!["ferry-ca".to_owned()],
            lifetime_secs: 3600,
        }
    }

    fn verifier_of(jwks: &JwkSet) -> Verifier {
        Verifier::new(jwks, ISSUER, "ferry-ca").unwrap()
    }

    fn verifier(minter: &Minter) -> Verifier {
        verifier_of(&minter.jwks())
    }

    /// Both minters' keys in one JWKS, as during a key rotation.
    fn both(a: &Minter, b: &Minter) -> JwkSet {
        JwkSet {
            keys: [a.jwks().keys, b.jwks().keys].concat(),
        }
    }

    /// A compact JWT with any header, signed by `sign`: for the tokens the
    /// library would refuse to make.
    fn compact(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature = sign(signed.as_bytes());
        format!("{signed}.{}", B64.encode(signature))
    }

    /// Signs `claims` with the minter's key under a header of our choosing.
    fn es256(minter: &Minter, header: &Value, claims: &Value) -> String {
        let pair = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            minter.key.as_bytes(),
        )
        .unwrap();
        compact(header, claims, |signed| {
            pair.sign(&aws_lc_rs::rand::SystemRandom::new(), signed)
                .unwrap()
                .as_ref()
                .to_vec()
        })
    }

    /// Found by the jwt fuzz target: serde's error quotes the header's
    /// `alg` as it is, and this message goes into the gRPC status and the log.
    #[test]
    fn a_malformed_header_is_refused_without_its_control_characters() {
        let minter = Minter::generate(ISSUER).unwrap();
        // Not UTF-8 in a field nobody reads: only the typed parse gets to `alg`.
        let header = [&br#"{"alg":"ES256\n\u001b[2J","x":""#[..], b"\xff\"}"].concat();
        let token = format!(
            "{}.{}.{}",
            B64.encode(header),
            B64.encode("{}"),
            B64.encode("x")
        );
        let error = verifier(&minter).verify(&token).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, TokenError::Malformed(_)), "{error:?}");
        assert!(message.contains("ES256\\n"), "{message}");
        assert!(!message.chars().any(char::is_control), "{message:?}");
    }

    fn header(minter: &Minter) -> Value {
        serde_json::json!({ "alg": "ES256", "kid": minter.kid, "typ": "JWT" })
    }

    /// A 2048-bit RSA key, as the API server's usually is.
    fn rsa_key() -> signature::RsaKeyPair {
        signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("an RSA key")
    }

    fn rsa_jwks(key: &signature::RsaKeyPair, kid: &str) -> JwkSet {
        let public = signature::RsaPublicKeyComponents::<Vec<u8>>::from(key.public_key());
        serde_json::from_value(serde_json::json!({ "keys": [{
            "kty": "RSA", "kid": kid, "alg": "RS256",
            "n": B64.encode(&public.n), "e": B64.encode(&public.e),
        }]}))
        .unwrap()
    }

    fn rs256_token(key: &signature::RsaKeyPair, kid: &str, claims: &Value) -> String {
        let header = serde_json::json!({ "alg": "RS256", "kid": kid, "typ": "JWT" });
        compact(&header, claims, |signed| {
            let mut signature = vec![0; key.public_modulus_len()];
            key.sign(
                &signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                signed,
                &mut signature,
            )
            .unwrap();
            signature
        })
    }

    #[test]
    fn an_rs256_token_verifies_against_its_rsa_key_only() {
        let key = rsa_key();
        let claims = token_claims(ISSUER, &request());
        let token = rs256_token(&key, "rsa-1", &claims);
        let rsa = verifier_of(&rsa_jwks(&key, "rsa-1"));
        let who = rsa.verify(&token).unwrap();
        assert_eq!(
            who.username(),
            "system:serviceaccount:ferry-system:ferry-agent"
        );
        assert_eq!(who.node, "n1");

        // Another RSA key, a verifier with only an EC key, a changed payload.
        let other = verifier_of(&rsa_jwks(&rsa_key(), "rsa-1"));
        let ec_only = verifier(&Minter::generate(ISSUER).unwrap());
        let mut forged = claims;
        forged["kubernetes.io"]["namespace"] = "kube-system".into();
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let (header, _) = signed.split_once('.').unwrap();
        let tampered = format!("{header}.{}.{signature}", B64.encode(forged.to_string()));
        for (what, verifier, token) in [
            ("another RSA key", &other, &token),
            ("only an EC key", &ec_only, &token),
            ("a changed payload", &rsa, &tampered),
        ] {
            assert!(
                matches!(verifier.verify(token), Err(TokenError::Signature(_))),
                "{what}: accepted"
            );
        }
    }

    #[test]
    fn a_minted_token_verifies_and_names_its_service_account_and_node() {
        let minter = Minter::generate(ISSUER).unwrap();
        let token = minter.mint(&request()).unwrap();
        let who = verifier(&minter).verify(&token).unwrap();
        assert_eq!(
            who.username(),
            "system:serviceaccount:ferry-system:ferry-agent"
        );
        assert_eq!(who.node, "n1");
        assert_eq!(who.pod.as_deref(), Some("ferry-agent-x7k2p"));
    }

    #[test]
    fn refuses_wrong_audience_expiry_key_issuer_and_tampering() {
        let minter = Minter::generate(ISSUER).unwrap();
        let verifier = verifier(&minter);

        let mut wrong_audience = request();
        wrong_audience.audience = vec!["https://kubernetes.default.svc".to_owned()];
        let error = verifier
            .verify(&minter.mint(&wrong_audience).unwrap())
            .unwrap_err();
        assert_eq!(
            error,
            TokenError::Audience {
                found: vec!["https://kubernetes.default.svc".to_owned()],
                expected: "ferry-ca".to_owned()
            }
        );

        let mut expired = request();
        expired.lifetime_secs = -600;
        let error = verifier
            .verify(&minter.mint(&expired).unwrap())
            .unwrap_err();
        assert!(matches!(error, TokenError::Expired(600..=602)), "{error}");

        let stranger = Minter::generate(ISSUER).unwrap();
        let error = verifier
            .verify(&stranger.mint(&request()).unwrap())
            .unwrap_err();
        assert!(matches!(error, TokenError::Signature(_)), "{error}");

        let other_issuer = Minter {
            issuer: "https://evil".to_owned(),
            ..Minter::generate(ISSUER).unwrap()
        };
        let other = Verifier::new(&other_issuer.jwks(), ISSUER, "ferry-ca").unwrap();
        let error = other
            .verify(&other_issuer.mint(&request()).unwrap())
            .unwrap_err();
        assert_eq!(
            error,
            TokenError::Issuer {
                found: "https://evil".to_owned(),
                expected: ISSUER.to_owned()
            }
        );

        let token = minter.mint(&request()).unwrap();
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = B64.encode(
            String::from_utf8(B64.decode(parts[1]).unwrap())
                .unwrap()
                .replace("ferry-agent\"", "admin\""),
        );
        parts[1] = &forged;
        let error = verifier.verify(&parts.join(".")).unwrap_err();
        assert!(matches!(error, TokenError::Signature(_)), "{error}");
    }

    #[test]
    fn refuses_unsigned_and_hmac_tokens_and_garbage() {
        let minter = Minter::generate(ISSUER).unwrap();
        let verifier = verifier(&minter);
        let token = minter.mint(&request()).unwrap();
        let (_, rest) = token.split_once('.').unwrap();
        for alg in ["none", "HS256"] {
            let header = B64.encode(format!(r#"{{"alg":"{alg}"}}"#));
            let error = verifier.verify(&format!("{header}.{rest}")).unwrap_err();
            assert_eq!(error, TokenError::Algorithm(alg.to_owned()));
        }
        for garbage in ["", "a.b", "a.b.c.d", "!!.!!.!!"] {
            let error = verifier.verify(garbage).unwrap_err();
            assert!(
                matches!(error, TokenError::Malformed(_)),
                "{garbage:?}: {error}"
            );
        }
    }

    #[test]
    fn an_unsigned_token_with_an_empty_signature_is_refused() {
        let minter = Minter::generate(ISSUER).unwrap();
        let claims = token_claims(ISSUER, &request());
        for alg in ["none", "None", "NONE"] {
            let token = compact(
                &serde_json::json!({ "alg": alg, "kid": minter.kid }),
                &claims,
                |_| Vec::new(),
            );
            let error = verifier(&minter).verify(&token).unwrap_err();
            assert_eq!(error, TokenError::Algorithm(alg.to_owned()));
        }
    }

    /// The classic confusion: an HMAC keyed with the verifier's public key,
    /// which an attacker knows, in every form a careless verifier might use.
    #[test]
    fn an_hmac_keyed_with_the_public_key_is_refused() {
        let minter = Minter::generate(ISSUER).unwrap();
        let jwks = minter.jwks();
        let pair = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            minter.key.as_bytes(),
        )
        .unwrap();
        let secrets = [
            pair.public_key().as_ref().to_vec(),
            serde_json::to_vec(&jwks).unwrap(),
            serde_json::to_vec(&jwks.keys[0]).unwrap(),
        ];
        let claims = token_claims(ISSUER, &request());
        for (i, secret) in secrets.iter().enumerate() {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                let header = Header {
                    kid: Some(minter.kid.clone()),
                    ..Header::new(alg)
                };
                let token = jsonwebtoken::encode(
                    &header,
                    &claims,
                    &EncodingKey::from_secret(secret).unwrap(),
                )
                .unwrap();
                let error = verifier(&minter).verify(&token).unwrap_err();
                assert_eq!(
                    error,
                    TokenError::Algorithm(format!("{alg:?}")),
                    "secret {i}"
                );
            }
        }
    }

    #[test]
    fn a_token_without_a_kid_needs_a_single_key_that_could_have_signed_it() {
        let minter = Minter::generate(ISSUER).unwrap();
        let claims = token_claims(ISSUER, &request());
        let unnamed = es256(&minter, &serde_json::json!({ "alg": "ES256" }), &claims);
        verifier(&minter).verify(&unnamed).expect("the only key");

        let rotating = verifier_of(&both(&minter, &Minter::generate(ISSUER).unwrap()));
        assert_eq!(
            rotating.verify(&unnamed).unwrap_err(),
            TokenError::NoKeyId(2)
        );
        // With its kid, the same token verifies during the rotation.
        let named = es256(&minter, &header(&minter), &claims);
        rotating.verify(&named).expect("the named key");

        // One EC key and one RSA key: only one could have signed ES256.
        let mixed = JwkSet {
            keys: [minter.jwks().keys, rsa_jwks(&rsa_key(), "rsa-1").keys].concat(),
        };
        verifier_of(&mixed)
            .verify(&unnamed)
            .expect("the only EC key");
    }

    #[test]
    fn a_kid_of_a_key_of_the_wrong_type_is_refused() {
        let minter = Minter::generate(ISSUER).unwrap();
        let rsa = rsa_key();
        let jwks = JwkSet {
            keys: [minter.jwks().keys, rsa_jwks(&rsa, "rsa-1").keys].concat(),
        };
        let claims = token_claims(ISSUER, &request());
        // RS256, signed by the RSA key, but naming the EC key.
        let rs256 = rs256_token(&rsa, &minter.kid, &claims);
        assert_eq!(
            verifier_of(&jwks).verify(&rs256).unwrap_err(),
            TokenError::KeyType {
                kid: minter.kid.clone(),
                alg: "RS256",
                key: "an EC P-256 key"
            }
        );
        // ES256, signed by the EC key, but naming the RSA key.
        let es = es256(
            &minter,
            &serde_json::json!({ "alg": "ES256", "kid": "rsa-1" }),
            &claims,
        );
        assert_eq!(
            verifier_of(&jwks).verify(&es).unwrap_err(),
            TokenError::KeyType {
                kid: "rsa-1".to_owned(),
                alg: "ES256",
                key: "an RSA key"
            }
        );
    }

    #[test]
    fn keys_ferry_does_not_accept_are_skipped_and_never_verify() {
        let minter = Minter::generate(ISSUER).unwrap();
        let mut jwks = serde_json::to_value(minter.jwks()).unwrap();
        let secret = B64.encode(b"a shared secret in the JWKS");
        let extra = serde_json::json!([
            { "kty": "oct", "kid": "hmac", "k": secret },
            { "kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": B64.encode([7u8; 32]) },
            { "kty": "EC", "kid": "p384", "crv": "P-384", "x": B64.encode([1u8; 48]), "y": B64.encode([2u8; 48]) },
            { "kty": "RSA", "kid": "pss", "alg": "PS256", "n": B64.encode([3u8; 256]), "e": "AQAB" },
        ]);
        jwks["keys"]
            .as_array_mut()
            .unwrap()
            .extend(extra.as_array().unwrap().iter().cloned());
        let verifier =
            Verifier::from_jwks_json(&jwks.to_string(), ISSUER, "ferry-ca").expect("one usable");
        assert_eq!(verifier.key_count(), 1);
        let header = Header {
            kid: Some("hmac".to_owned()),
            ..Header::new(Algorithm::HS256)
        };
        let claims = token_claims(ISSUER, &request());
        let hmac = jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(b"a shared secret in the JWKS").unwrap(),
        )
        .unwrap();
        assert_eq!(
            verifier.verify(&hmac).unwrap_err(),
            TokenError::Algorithm("HS256".to_owned())
        );
        let only_others = serde_json::json!({ "keys": extra }).to_string();
        let error = Verifier::from_jwks_json(&only_others, ISSUER, "ferry-ca")
            .err()
            .expect("nothing usable");
        assert!(error.contains("no usable key"), "{error}");
        let error = Verifier::from_jwks_json("{\"keys\": 3}", ISSUER, "ferry-ca")
            .err()
            .expect("not a JWKS");
        assert!(error.starts_with("not a JSON Web Key Set"), "{error}");
    }

    #[test]
    fn each_missing_or_mistyped_claim_is_named() {
        let minter = Minter::generate(ISSUER).unwrap();
        let verifier = verifier(&minter);
        let full = token_claims(ISSUER, &request());
        for claim in ["exp", "iss", "aud", "sub"] {
            let mut claims = full.clone();
            claims.as_object_mut().unwrap().remove(claim);
            let error = verifier
                .verify(&es256(&minter, &header(&minter), &claims))
                .unwrap_err();
            assert_eq!(error, TokenError::MissingClaim(claim.to_owned()));
            assert_eq!(
                error.to_string(),
                format!("the token has no {claim:?} claim")
            );
        }
        let mut claims = full.clone();
        claims["exp"] = "tomorrow".into();
        let error = verifier
            .verify(&es256(&minter, &header(&minter), &claims))
            .unwrap_err();
        assert!(
            matches!(&error, TokenError::Malformed(m) if m.contains("\"exp\"")),
            "{error}"
        );

        let mut claims = full.clone();
        claims["sub"] = "system:node:n1".into();
        let error = verifier
            .verify(&es256(&minter, &header(&minter), &claims))
            .unwrap_err();
        assert_eq!(error, TokenError::Subject("system:node:n1".to_owned()));

        let mut claims = full;
        claims["kubernetes.io"]
            .as_object_mut()
            .unwrap()
            .remove("node");
        let error = verifier
            .verify(&es256(&minter, &header(&minter), &claims))
            .unwrap_err();
        assert_eq!(error, TokenError::NoNode);
    }

    #[test]
    fn times_are_checked_with_the_leeway() {
        let minter = Minter::generate(ISSUER).unwrap();
        let verifier = verifier(&minter);
        let now = unix_now();
        let at = |exp: u64, nbf: Option<u64>, iat: Option<u64>| {
            let mut claims = token_claims(ISSUER, &request());
            claims["exp"] = exp.into();
            let object = claims.as_object_mut().unwrap();
            object.remove("nbf");
            object.remove("iat");
            if let Some(nbf) = nbf {
                claims["nbf"] = nbf.into();
            }
            if let Some(iat) = iat {
                claims["iat"] = iat.into();
            }
            verifier.verify(&es256(&minter, &header(&minter), &claims))
        };
        at(now - 30, None, None).expect("expired within the leeway");
        assert!(matches!(
            at(now - 120, None, None),
            Err(TokenError::Expired(119..=121))
        ));
        at(now + 600, Some(now + 30), None).expect("not before, within the leeway");
        assert!(matches!(
            at(now + 600, Some(now + 300), None),
            Err(TokenError::NotYetValid(299..=300))
        ));
        // Without nbf, a token issued in the future is not valid yet either.
        assert!(matches!(
            at(now + 600, None, Some(now + 300)),
            Err(TokenError::NotYetValid(299..=300))
        ));
    }

    #[test]
    fn an_oversized_token_is_refused_before_parsing() {
        let minter = Minter::generate(ISSUER).unwrap();
        let error = verifier(&minter)
            .verify(&"a".repeat(MAX_TOKEN_BYTES + 1))
            .unwrap_err();
        assert!(matches!(error, TokenError::Malformed(m) if m.contains("more than")));
    }
}
