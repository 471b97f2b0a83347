//! Offline verification of Kubernetes ServiceAccount tokens (JWTs) against
//! the API server's published keys (a JWKS file), and minting of such tokens
//! for runs without a cluster (tests, the demo).
//!
//! Only what projected ServiceAccount tokens use is accepted: ES256 and
//! RS256 signatures, never `none` or an HMAC, and every time and audience
//! claim checked.

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
}

/// A key a token may be signed with.
enum TrustedKey {
    Es256(Vec<u8>),
    Rs256 { n: Vec<u8>, e: Vec<u8> },
}

/// Verifies tokens against a set of trusted keys.
pub struct Verifier {
    keys: Vec<(Option<String>, TrustedKey)>,
    issuer: String,
    audience: String,
}

impl Verifier {
    /// Reads a JWKS file; keys of other types are skipped, but at least one must be usable.
    pub fn from_jwks_file(path: &Path, issuer: &str, audience: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read JWKS {}: {e}", path.display()))?;
        let jwks: Jwks = serde_json::from_str(&text)
            .map_err(|e| format!("JWKS {} is not a JSON Web Key Set: {e}", path.display()))?;
        Self::new(&jwks, issuer, audience).map_err(|e| format!("JWKS {}: {e}", path.display()))
    }

    pub fn new(jwks: &Jwks, issuer: &str, audience: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, jwk) in jwks.keys.iter().enumerate() {
            let decode = |field: &Option<String>, name: &str| {
                let value = field
                    .as_deref()
                    .ok_or_else(|| format!("keys[{i}] has no {name:?}"))?;
                B64.decode(value)
                    .map_err(|e| format!("keys[{i}].{name} is not base64url: {e}"))
            };
            let key = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
                ("EC", Some("P-256")) => {
                    let (x, y) = (decode(&jwk.x, "x")?, decode(&jwk.y, "y")?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err(format!("keys[{i}] is not a P-256 point"));
                    }
                    TrustedKey::Es256([&[4][..], &x, &y].concat())
                }
                ("RSA", _) => TrustedKey::Rs256 {
                    n: decode(&jwk.n, "n")?,
                    e: decode(&jwk.e, "e")?,
                },
                _ => continue,
            };
            keys.push((jwk.kid.clone(), key));
        }
        if keys.is_empty() {
            return Err("no usable key (EC P-256 or RSA)".to_owned());
        }
        Ok(Self {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        })
    }

    /// Checks signature, issuer, audience and times, and reads who the token is for.
    pub fn verify(&self, token: &str, now: u64) -> Result<TokenIdentity, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!(
                "{} bytes is more than {MAX_TOKEN_BYTES}",
                token.len()
            )));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "it does not have three dot-separated parts".to_owned(),
            ));
        };
        let header: Value = decode_json(header, "header")?;
        let alg = header["alg"].as_str().unwrap_or_default();
        let kid = header["kid"].as_str();
        let signature = B64
            .decode(signature)
            .map_err(|e| TokenError::Malformed(format!("signature is not base64url: {e}")))?;
        let signed = &token.as_bytes()[..header_len(token)];
        let candidates = self
            .keys
            .iter()
            .filter(|(key_id, _)| kid.is_none() || key_id.is_none() || key_id.as_deref() == kid);
        let mut verified = false;
        for (_, key) in candidates {
            let ok = match (alg, key) {
                ("ES256", TrustedKey::Es256(point)) => {
                    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                        .verify(signed, &signature)
                        .is_ok()
                }
                ("RS256", TrustedKey::Rs256 { n, e }) => signature::RsaPublicKeyComponents { n, e }
                    .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, &signature)
                    .is_ok(),
                ("ES256" | "RS256", _) => false,
                (other, _) => return Err(TokenError::Algorithm(other.to_owned())),
            };
            if ok {
                verified = true;
                break;
            }
        }
        if !verified {
            if !matches!(alg, "ES256" | "RS256") {
                return Err(TokenError::Algorithm(alg.to_owned()));
            }
            return Err(TokenError::Signature(
                kid.map(|k| format!(" (kid {k:?})")).unwrap_or_default(),
            ));
        }
        let claims: Claims = decode_json(payload, "payload")?;
        self.check_claims(&claims, now)?;
        identity_of(&claims)
    }

    fn check_claims(&self, claims: &Claims, now: u64) -> Result<(), TokenError> {
        if claims.iss != self.issuer {
            return Err(TokenError::Issuer {
                found: claims.iss.clone(),
                expected: self.issuer.clone(),
            });
        }
        let audiences = match &claims.aud {
            Value::String(one) => vec![one.clone()],
            Value::Array(many) => many
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        if !audiences.contains(&self.audience) {
            return Err(TokenError::Audience {
                found: audiences,
                expected: self.audience.clone(),
            });
        }
        let exp = claims
            .exp
            .ok_or_else(|| TokenError::Malformed("no exp claim".to_owned()))?;
        if now > exp + LEEWAY_SECS {
            return Err(TokenError::Expired(now - exp));
        }
        if let Some(nbf) = claims.nbf.or(claims.iat)
            && nbf > now + LEEWAY_SECS
        {
            return Err(TokenError::NotYetValid(nbf - now));
        }
        Ok(())
    }
}

/// The claims of a Kubernetes projected ServiceAccount token that matter here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: Value,
    pub sub: String,
    #[serde(default)]
    pub exp: Option<u64>,
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

fn decode_json<T: serde::de::DeserializeOwned>(part: &str, what: &str) -> Result<T, TokenError> {
    let bytes = B64
        .decode(part)
        .map_err(|e| TokenError::Malformed(format!("{what} is not base64url: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| TokenError::Malformed(format!("{what} is not the expected JSON: {e}")))
}

/// The length of `header.payload`, the part the signature covers.
fn header_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(0)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs tokens the way the Kubernetes API server does, for clusters that
/// are not there: an ES256 key whose public half goes into a JWKS file.
pub struct Minter {
    key: aws_lc_rs::signature::EcdsaKeyPair,
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
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|e| format!("cannot generate a token key: {e}"))?;
        let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
        )
        .map_err(|e| format!("cannot load the token key: {e}"))?;
        use aws_lc_rs::signature::KeyPair as _;
        let kid = B64.encode(
            &aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_key().as_ref())
                .as_ref()[..12],
        );
        Ok(Self {
            key,
            kid,
            issuer: issuer.to_owned(),
        })
    }

    /// The public key, as the JWKS a CA trusts.
    pub fn jwks(&self) -> Jwks {
        use aws_lc_rs::signature::KeyPair as _;
        let point = self.key.public_key().as_ref();
        Jwks {
            keys: vec![Jwk {
                kty: "EC".to_owned(),
                kid: Some(self.kid.clone()),
                alg: Some("ES256".to_owned()),
                crv: Some("P-256".to_owned()),
                x: Some(B64.encode(&point[1..33])),
                y: Some(B64.encode(&point[33..65])),
                n: None,
                e: None,
            }],
        }
    }

    pub fn mint(&self, request: &TokenRequest) -> Result<String, String> {
        let claims = token_claims(&self.issuer, request);
        encode("ES256", &self.kid, &claims, |signed| {
            self.key
                .sign(&aws_lc_rs::rand::SystemRandom::new(), signed)
                .map(|signature| signature.as_ref().to_vec())
                .map_err(|e| format!("cannot sign a token: {e}"))
        })
    }
}

/// A compact JWT: header and claims, base64url, signed by `sign`.
fn encode(
    alg: &str,
    kid: &str,
    claims: &Value,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<String, String> {
    let header = serde_json::json!({ "alg": alg, "kid": kid, "typ": "JWT" });
    let signed = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let signature = sign(signed.as_bytes())?;
    Ok(format!("{signed}.{}", B64.encode(signature)))
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

    fn verifier(minter: &Minter) -> Verifier {
        Verifier::new(&minter.jwks(), ISSUER, "ferry-ca").unwrap()
    }

    /// A 2048-bit RSA key, as the API server's usually is.
    fn rsa_key() -> signature::RsaKeyPair {
        signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("an RSA key")
    }

    fn rsa_jwks(key: &signature::RsaKeyPair, kid: &str) -> Jwks {
        use aws_lc_rs::signature::KeyPair as _;
        let public = signature::RsaPublicKeyComponents::<Vec<u8>>::from(key.public_key());
        Jwks {
            keys: vec![Jwk {
                kty: "RSA".to_owned(),
                kid: Some(kid.to_owned()),
                alg: Some("RS256".to_owned()),
                crv: None,
                x: None,
                y: None,
                n: Some(B64.encode(&public.n)),
                e: Some(B64.encode(&public.e)),
            }],
        }
    }

    fn rs256_token(key: &signature::RsaKeyPair, kid: &str, claims: &Value) -> String {
        encode("RS256", kid, claims, |signed| {
            let mut signature = vec![0; key.public_modulus_len()];
            key.sign(
                &signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                signed,
                &mut signature,
            )
            .map_err(|e| e.to_string())?;
            Ok(signature)
        })
        .unwrap()
    }

    #[test]
    fn an_rs256_token_verifies_against_its_rsa_key_only() {
        let key = rsa_key();
        let claims = token_claims(ISSUER, &request());
        let token = rs256_token(&key, "rsa-1", &claims);
        let rsa = Verifier::new(&rsa_jwks(&key, "rsa-1"), ISSUER, "ferry-ca").unwrap();
        let who = rsa.verify(&token, unix_now()).unwrap();
        assert_eq!(
            who.username(),
            "system:serviceaccount:ferry-system:ferry-agent"
        );
        assert_eq!(who.node, "n1");

        // Another RSA key, a verifier with only an EC key, a changed payload.
        let other = Verifier::new(&rsa_jwks(&rsa_key(), "rsa-1"), ISSUER, "ferry-ca").unwrap();
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
                matches!(
                    verifier.verify(token, unix_now()),
                    Err(TokenError::Signature(_))
                ),
                "{what}: accepted"
            );
        }
    }

    #[test]
    fn a_minted_token_verifies_and_names_its_service_account_and_node() {
        let minter = Minter::generate(ISSUER).unwrap();
        let token = minter.mint(&request()).unwrap();
        let who = verifier(&minter).verify(&token, unix_now()).unwrap();
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
        let now = unix_now();

        let mut wrong_audience = request();
        wrong_audience.audience = vec!["https://kubernetes.default.svc".to_owned()];
        let error = verifier
            .verify(&minter.mint(&wrong_audience).unwrap(), now)
            .unwrap_err();
        assert!(matches!(error, TokenError::Audience { .. }), "{error}");

        let mut expired = request();
        expired.lifetime_secs = -600;
        let error = verifier
            .verify(&minter.mint(&expired).unwrap(), now)
            .unwrap_err();
        assert!(matches!(error, TokenError::Expired(_)), "{error}");

        let stranger = Minter::generate(ISSUER).unwrap();
        let error = verifier
            .verify(&stranger.mint(&request()).unwrap(), now)
            .unwrap_err();
        assert!(matches!(error, TokenError::Signature(_)), "{error}");

        let other_issuer = Minter {
            issuer: "https://evil".to_owned(),
            ..Minter::generate(ISSUER).unwrap()
        };
        let other = Verifier::new(&other_issuer.jwks(), ISSUER, "ferry-ca").unwrap();
        let error = other
            .verify(&other_issuer.mint(&request()).unwrap(), now)
            .unwrap_err();
        assert!(matches!(error, TokenError::Issuer { .. }), "{error}");

        let token = minter.mint(&request()).unwrap();
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = B64.encode(
            String::from_utf8(B64.decode(parts[1]).unwrap())
                .unwrap()
                .replace("ferry-agent\"", "admin\""),
        );
        parts[1] = &forged;
        let error = verifier.verify(&parts.join("."), now).unwrap_err();
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
            let error = verifier
                .verify(&format!("{header}.{rest}"), unix_now())
                .unwrap_err();
            assert_eq!(error, TokenError::Algorithm(alg.to_owned()));
        }
        for garbage in ["", "a.b", "a.b.c.d", "!!.!!.!!"] {
            assert!(matches!(
                verifier.verify(garbage, unix_now()).unwrap_err(),
                TokenError::Malformed(_)
            ));
        }
    }
}
