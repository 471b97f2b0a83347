//! What Ferry's fuzz targets share: the fixed token key and the verifier
//! that trusts it, the identity the CSR targets ask for, the cluster the
//! agent's targets see, how an input picks its mode, and the check every
//! error message must pass.
//!
//! Everything here is deterministic (fixed keys, no clock in the inputs'
//! meaning beyond "far in the future"), so an input that fails once fails
//! every time it is replayed.

use std::sync::OnceLock;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD as B64_STANDARD, URL_SAFE_NO_PAD as B64},
};
use ferry_agent::{
    proxy::inbound::Peer,
    workload::{PolicySettings, WorkloadTable, file::WorkloadFile},
};
use ferry_ca::jwt::{Minter, Verifier};
use ferry_proto::{SpiffeId, policy::DefaultPolicy};

/// The issuer the fixed verifier expects, as a cluster's API server names itself.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The identity the CSR-only mode and the seeds ask for.
pub const IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// The ES256 key every fuzzed token is signed with (PKCS#8 DER, base64). A
/// test key, committed so that runs and crash inputs are reproducible.
pub const TOKEN_KEY_PKCS8: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKRoWyRr2aKLINwrQv80XyXWRDZZZ9kZvFAYJFCdmhYShRANCAAS4zIPDGO8IXkvVouzhTXjS2UFpXhOzHFLr0wwVy46Tbq5eu3i0iU61ikuF2m0N9iJo/z7sMprc8YP0rYE6aWuj";

/// Separates the header from the claims in the jwt target's signing mode;
/// never part of UTF-8 text, so never part of valid JSON.
pub const HEADER_END: u8 = 0xff;

/// The fixed key, its minter, and a verifier that trusts only it.
pub struct TokenKey {
    pub minter: Minter,
    pub verifier: Verifier,
    /// The key id the JWKS gives the key (the API server always names its key).
    pub kid: String,
    pair: EcdsaKeyPair,
}

/// Built once per process: parsing keys in every iteration would drown the
/// parsers under test.
pub fn token_key() -> &'static TokenKey {
    static KEY: OnceLock<TokenKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let pkcs8 = B64_STANDARD
            .decode(TOKEN_KEY_PKCS8)
            .expect("TOKEN_KEY_PKCS8 is base64");
        let minter = Minter::from_pkcs8(&pkcs8, ISSUER).expect("TOKEN_KEY_PKCS8 is a P-256 key");
        let jwks = minter.jwks();
        let kid = jwks.keys[0]
            .common
            .key_id
            .clone()
            .expect("the minter names its key");
        let verifier = Verifier::new(&jwks, ISSUER, ferry_proto::TOKEN_AUDIENCE)
            .expect("the verifier takes the minter's JWKS");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
            .expect("TOKEN_KEY_PKCS8 is a P-256 key");
        TokenKey {
            minter,
            verifier,
            kid,
            pair,
        }
    })
}

impl TokenKey {
    /// A compact JWT of exactly these header and claims bytes (whatever they
    /// are), with a valid ES256 signature by the fixed key.
    pub fn sign(&self, header: &[u8], claims: &[u8]) -> String {
        let signed = format!("{}.{}", B64.encode(header), B64.encode(claims));
        let signature = self
            .pair
            .sign(&aws_lc_rs::rand::SystemRandom::new(), signed.as_bytes())
            .expect("ES256 signing does not fail");
        format!("{signed}.{}", B64.encode(signature.as_ref()))
    }

    /// The header the API server writes: ES256 and the key's id.
    pub fn header(&self) -> String {
        serde_json::json!({ "alg": "ES256", "kid": self.kid, "typ": "JWT" }).to_string()
    }
}

/// The part `index` (0 header, 1 claims) of a compact JWT, base64url-decoded
/// and read as JSON into `T`, independently of the code under test.
///
/// Read into a type that names only the fields a check needs, as the
/// verifier reads them: unknown fields are skipped without being converted,
/// so a valid number that no `f64` holds (the fuzzer found one) does not
/// stop a check on a token the verifier rightly accepted.
///
/// Bytes that are not UTF-8 are read as U+FFFD: serde_json skips the strings
/// of fields nobody reads without checking them, so a token the library
/// accepts may carry such bytes there (the fuzzer found it; the signature
/// still has to be the API server's). In a string that is read they are
/// refused, so the replacement never changes a value compared here.
pub fn jwt_part<T: serde::de::DeserializeOwned>(token: &str, index: usize) -> Option<T> {
    let part = token.split('.').nth(index)?;
    let bytes = B64.decode(part).ok()?;
    serde_json::from_str(&String::from_utf8_lossy(&bytes)).ok()
}

/// [`IDENTITY`], parsed.
pub fn identity() -> &'static SpiffeId {
    static ID: OnceLock<SpiffeId> = OnceLock::new();
    ID.get_or_init(|| IDENTITY.parse().expect("IDENTITY is a SPIFFE id"))
}

/// The mode an input's first byte picks (of `modes`), and the rest.
pub fn split_mode(data: &[u8], modes: u8) -> Option<(u8, &[u8])> {
    let (&first, rest) = data.split_first()?;
    Some((first % modes, rest))
}

/// An error message goes into logs and gRPC statuses as it is: it must say
/// something, and carry no raw control characters (a newline in a message
/// forges a log line).
pub fn assert_clean_message(message: &str, error: &dyn std::fmt::Debug) {
    assert_message(message, error);
    assert!(
        !message.chars().any(char::is_control),
        "raw control character in the message {message:?} of {error:?}"
    );
}

/// A refusal says something.
pub fn assert_message(message: &str, error: &dyn std::fmt::Debug) {
    assert!(!message.is_empty(), "empty message for {error:?}");
}

/// The cluster the agent's targets see (`tunnel_connect` admits against it,
/// and it seeds `workload_file`): two nodes; on [`NODE`], a meshed pod a
/// policy guards, a meshed pod whose ServiceAccount has a dot, and an
/// unmeshed pod; on n2, a meshed pod.
///
/// Who may reach what, as `tunnel_connect` checks it independently: a
/// `Deny` of shop/db on every pod of shop wins; `api-0` port 8080 hears
/// from namespace ops and from shop/web.v2 only; anything else of shop
/// hears from shop (the namespace's default, same-namespace).
pub const WORKLOADS: &str = "\
nodes:
  - { name: n1, addresses: [198.19.0.1, \"2001:2:0:ff::1\"] }
  - { name: n2, addresses: [198.19.0.2] }
namespaces:
  - name: shop
    labels: { ferry.dev/mesh: enabled }
    annotations: { ferry.dev/default-inbound-policy: same-namespace }
  - { name: ops, labels: { ferry.dev/mesh: enabled } }
  - { name: legacy }
pods:
  - { name: api-0, namespace: shop, serviceAccount: api, node: n1, ips: [198.18.1.2, \"2001:2:0:1::2\"], cgroup: /sys/fs/cgroup/api-0, labels: { app: api } }
  - { name: web-0, namespace: shop, serviceAccount: web.v2, node: n1, ips: [198.18.1.3], cgroup: /sys/fs/cgroup/web-0, labels: { app: web } }
  - { name: old-0, namespace: legacy, serviceAccount: old, node: n1, ips: [198.18.1.4] }
  - { name: db-0, namespace: shop, serviceAccount: db, node: n2, ips: [198.18.2.2] }
services:
  - { name: api, namespace: shop, clusterIPs: [198.18.100.1], ports: [{ port: 80, targetPort: 8080 }], endpoints: [api-0] }
policies:
  - name: api-from-ops
    namespace: shop
    spec:
      selector: { matchLabels: { app: api } }
      ports: [8080]
      from: [{ namespace: ops }, { serviceAccount: shop/web.v2 }]
  - name: no-db
    namespace: shop
    spec: { action: Deny, from: [{ serviceAccount: shop/db }] }
";

/// The node the agent's targets run on.
pub const NODE: &str = "n1";

/// The trust domain and default policy of the agent's targets.
pub fn policy_settings() -> PolicySettings {
    PolicySettings {
        trust_domain: "cluster.local".to_owned(),
        cluster_default: DefaultPolicy::AllUnauthenticated,
    }
}

/// [`WORKLOADS`] as [`NODE`]'s agent sees it, built once.
pub fn workload_table() -> &'static WorkloadTable {
    static TABLE: OnceLock<WorkloadTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let file =
            WorkloadFile::parse(WORKLOADS, None).expect("WORKLOADS is a valid workload file");
        WorkloadTable::from_file(&file, NODE, &policy_settings())
    })
}

/// The identities a tunnel connection may have been opened to (this end's).
pub const LOCALS: [&str; 4] = [
    "spiffe://cluster.local/ns/shop/sa/api",
    "spiffe://cluster.local/ns/shop/sa/web.v2",
    "spiffe://cluster.local/ns/shop/sa/db",
    "spiffe://cluster.local/ns/legacy/sa/old",
];

/// The identities a tunnel's client may have proved.
pub const CLIENTS: [&str; 4] = [
    "spiffe://cluster.local/ns/shop/sa/web.v2",
    "spiffe://cluster.local/ns/ops/sa/monitor",
    "spiffe://cluster.local/ns/shop/sa/db",
    "spiffe://example.org/ns/shop/sa/web.v2",
];

/// `tunnel_connect`'s first byte: bit 0 the mode, bits 1–2 the local
/// identity ([`LOCALS`]), bits 3–4 the client's ([`CLIENTS`]).
pub fn tunnel_byte(mode: u8, local: usize, client: usize) -> u8 {
    assert!(mode < 2 && local < LOCALS.len() && client < CLIENTS.len());
    mode | (local as u8) << 1 | (client as u8) << 3
}

/// The mode and the peer a `tunnel_connect` first byte names.
pub fn tunnel_peer(byte: u8) -> (u8, Peer) {
    let id = |s: &str| s.parse::<SpiffeId>().expect("LOCALS and CLIENTS are ids");
    let peer = Peer {
        local: id(LOCALS[usize::from(byte >> 1) % LOCALS.len()]),
        client: id(CLIENTS[usize::from(byte >> 3) % CLIENTS.len()]),
        address: "198.19.0.2:41000".parse().expect("an address"),
    };
    (byte & 1, peer)
}

/// What an HTTP/2 client sends first, before its SETTINGS (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
