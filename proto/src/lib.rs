//! What the Ferry agent and the Ferry CA agree on: the identity API
//! (`ferry.identity.v1.Identity/Certify`, generated from `identity.proto`),
//! the SPIFFE identity of a workload, the workload file format (the facts
//! both read when there is no cluster), the well-known ports and names, and
//! how text from outside is shown in a log line ([`Untrusted`]).

use std::{fmt, str::FromStr};

pub mod crypto;
pub mod policy;
pub mod untrusted;
pub mod workload_file;

pub use untrusted::Untrusted;

/// The generated gRPC code of `identity.proto`.
pub mod identity {
    pub mod v1 {
        tonic::include_proto!("ferry.identity.v1");
    }
}

/// The trust domain a cluster has unless configured otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The audience an agent's projected ServiceAccount token is minted for.
pub const TOKEN_AUDIENCE: &str = "ferry-ca";
/// The CA's gRPC port.
pub const CA_PORT: u16 = 15012;
/// The inbound mTLS tunnel port of every agent.
pub const TUNNEL_PORT: u16 = 15008;
/// The tunnel's ALPN protocol: HTTP/2 `CONNECT` streams over TLS.
pub const TUNNEL_ALPN: &[u8] = b"h2";
/// The name in the CA's serving certificate, as agents reach it in a cluster.
pub const DEFAULT_CA_SERVER_NAME: &str = "ferry-ca.ferry-system.svc";

/// The identity of the workloads running as one Kubernetes ServiceAccount:
/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("{0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("{0:?} is not of the form spiffe://<trust domain>/ns/<namespace>/sa/<service account>")]
    Shape(String),
    #[error("trust domain {0:?} is not valid: 1-255 characters of a-z, 0-9, '.', '-' and '_'")]
    TrustDomain(String),
    #[error("namespace {0:?} is not a valid Kubernetes namespace name (a DNS label)")]
    Namespace(String),
    #[error(
        "service account {0:?} is not a valid Kubernetes ServiceAccount name (a DNS subdomain)"
    )]
    ServiceAccount(String),
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        if !is_trust_domain(trust_domain) {
            return Err(SpiffeIdError::TrustDomain(trust_domain.to_owned()));
        }
        if !is_dns_label(namespace) {
            return Err(SpiffeIdError::Namespace(namespace.to_owned()));
        }
        if !is_dns_subdomain(service_account) {
            return Err(SpiffeIdError::ServiceAccount(service_account.to_owned()));
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The TLS server name a tunnel client sends to ask for this identity's
    /// certificate: `<sa>.<ns>.sa.<trust domain>`.
    pub fn sni(&self) -> String {
        format!(
            "{}.{}.sa.{}",
            self.service_account, self.namespace, self.trust_domain
        )
    }

    /// The identity of `trust_domain` that an [`sni`](Self::sni) names. Read
    /// from the right: a ServiceAccount name may contain dots, a namespace
    /// may not.
    pub fn from_sni(sni: &str, trust_domain: &str) -> Option<Self> {
        let rest = sni.strip_suffix(trust_domain)?.strip_suffix(".sa.")?;
        let (service_account, namespace) = rest.rsplit_once('.')?;
        Self::new(trust_domain, namespace, service_account).ok()
    }

    /// The Kubernetes username of this ServiceAccount
    /// (`system:serviceaccount:<ns>:<sa>`), as tokens carry it in `sub`.
    pub fn kubernetes_username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let shape = || SpiffeIdError::Shape(s.to_owned());
        let (trust_domain, path) = rest.split_once('/').ok_or_else(shape)?;
        let mut segments = path.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) => {
                Self::new(trust_domain, namespace, service_account)
            }
            _ => Err(shape()),
        }
    }
}

fn is_trust_domain(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// RFC 1123 label: what Kubernetes accepts as a namespace name.
pub fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what Kubernetes accepts as a ServiceAccount name.
pub fn is_dns_subdomain(s: &str) -> bool {
    (1..=253).contains(&s.len()) && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_a_workload_identity() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/api".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "api");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/api");
        assert_eq!(id.kubernetes_username(), "system:serviceaccount:shop:api");
        let dotted: SpiffeId = "spiffe://td/ns/shop/sa/api.v2".parse().unwrap();
        assert_eq!(dotted.service_account(), "api.v2");
    }

    #[test]
    fn sni_round_trips_an_identity() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/api".parse().unwrap();
        assert_eq!(id.sni(), "api.shop.sa.cluster.local");
        assert_eq!(SpiffeId::from_sni(&id.sni(), "cluster.local"), Some(id));
        let dotted: SpiffeId = "spiffe://cluster.local/ns/shop/sa/api.v2".parse().unwrap();
        assert_eq!(
            SpiffeId::from_sni(&dotted.sni(), "cluster.local"),
            Some(dotted)
        );
    }

    #[test]
    fn sni_of_another_form_names_no_identity() {
        for sni in [
            "example.com",
            "api.shop.svc.cluster.local",
            "api.shop.sa",
            "",
            "shop.sa.cluster.local",
            "api.shop.sa.other.domain",
        ] {
            assert_eq!(SpiffeId::from_sni(sni, "cluster.local"), None, "{sni}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_workload_identity() {
        for (input, expected) in [
            (
                "https://cluster.local/ns/a/sa/b",
                "does not start with spiffe://",
            ),
            ("spiffe://cluster.local", "is not of the form"),
            ("spiffe://cluster.local/ns/a", "is not of the form"),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                "is not of the form",
            ),
            ("spiffe://cluster.local/ns/a/sa/", "ServiceAccount"),
            ("spiffe://cluster.local/sa/b/ns/a", "is not of the form"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain"),
            ("spiffe:///ns/a/sa/b", "trust domain"),
            ("spiffe://cluster.local/ns/A/sa/b", "namespace \"A\""),
            ("spiffe://cluster.local/ns/a.b/sa/c", "namespace"),
            ("spiffe://cluster.local/ns/a/sa/-b", "service account"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "service account"),
        ] {
            let error = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(
                error.to_lowercase().contains(&expected.to_lowercase()),
                "{input}: {error}"
            );
        }
    }
}
