//! `ferry.identity.v1.Identity/Certify`: authenticate the calling agent,
//! authorize it for the identity it asks for, check the CSR, sign.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use ferry_proto::{
    SpiffeId, Untrusted,
    identity::v1::{CertifyRequest, CertifyResponse, identity_server::Identity},
};
use tonic::{Code, Request, Response, Status};

use crate::{
    csr,
    issuer::{Issuer, LeafPolicy},
    jwks::JwksFile,
    jwt::{self, TokenIdentity},
    kubernetes::{KubePods, TokenReviewer},
    metrics::Metrics,
    nodes::PodIndex,
};

/// The largest Certify request accepted (a CSR is a few hundred bytes, a
/// token about a kilobyte).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// How callers prove who they are.
pub enum Authenticator {
    /// Offline, against the API server's keys.
    Jwks(Arc<JwksFile>),
    /// Online: the API server reviews each token.
    TokenReview(TokenReviewer),
}

impl Authenticator {
    async fn authenticate(&self, token: &str) -> Result<TokenIdentity, String> {
        if token.is_empty() {
            return Err("the request carries no token".to_owned());
        }
        if token.len() > jwt::MAX_TOKEN_BYTES {
            return Err(format!(
                "the token is {} bytes; at most {} are accepted",
                token.len(),
                jwt::MAX_TOKEN_BYTES
            ));
        }
        match self {
            Self::Jwks(keys) => keys.verifier().verify(token).map_err(|e| e.to_string()),
            Self::TokenReview(reviewer) => reviewer.review(token).await,
        }
    }
}

/// Which pods run on which node.
pub enum Pods {
    /// The workload file (runs without a cluster).
    File(PodIndex),
    /// A watch of the cluster's pods.
    Kubernetes(KubePods),
}

impl Pods {
    fn has_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        match self {
            Self::File(index) => index.has_pod(node, namespace, service_account),
            Self::Kubernetes(pods) => pods.has_pod(node, namespace, service_account),
        }
    }
}

pub struct Ca {
    pub issuer: Arc<RwLock<Arc<Issuer>>>,
    pub authenticator: Authenticator,
    pub pods: Pods,
    pub trust_domain: String,
    /// Kubernetes usernames of the agents (`system:serviceaccount:ns:sa`).
    pub allowed_agents: Vec<String>,
    pub policy: LeafPolicy,
    pub metrics: Arc<Metrics>,
}

/// Why a request was refused: a metric label, a gRPC code, and what to tell the caller.
struct Refusal {
    reason: &'static str,
    code: Code,
    message: String,
}

fn refuse(reason: &'static str, code: Code, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        code,
        message: message.into(),
    }
}

#[tonic::async_trait]
impl Identity for Ca {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let connection = request
            .extensions()
            .get::<crate::serve::ConnectInfo>()
            .cloned();
        let peer = connection.as_ref().map(|c| c.peer);
        let key_exchange = connection.as_ref().map_or("unknown", |c| c.key_exchange);
        let request = request.into_inner();
        match self.certify(&request, peer, key_exchange).await {
            Ok(response) => Ok(Response::new(response)),
            Err(refusal) => {
                self.metrics.refused(refusal.reason);
                tracing::warn!(
                    peer = ?peer,
                    key_exchange = %key_exchange,
                    identity = %Untrusted(&request.identity),
                    reason = refusal.reason,
                    error = %Untrusted(&refusal.message),
                    "refused a certificate request"
                );
                Err(Status::new(refusal.code, refusal.message))
            }
        }
    }
}

impl Ca {
    async fn certify(
        &self,
        request: &CertifyRequest,
        peer: Option<SocketAddr>,
        key_exchange: &'static str,
    ) -> Result<CertifyResponse, Refusal> {
        if request.csr_der.len() > MAX_CSR_BYTES {
            return Err(refuse(
                "too_large",
                Code::InvalidArgument,
                format!(
                    "the CSR is {} bytes; at most {MAX_CSR_BYTES} are accepted",
                    request.csr_der.len()
                ),
            ));
        }
        let caller = self
            .authenticator
            .authenticate(&request.token)
            .await
            .map_err(|e| refuse("unauthenticated", Code::Unauthenticated, e))?;
        let username = caller.username();
        if !self.allowed_agents.contains(&username) {
            return Err(refuse(
                "not_an_agent",
                Code::PermissionDenied,
                format!(
                    "{username} is not a Ferry agent identity; allowed: {}",
                    self.allowed_agents.join(", ")
                ),
            ));
        }
        let identity: SpiffeId =
            request
                .identity
                .parse()
                .map_err(|e: ferry_proto::SpiffeIdError| {
                    refuse(
                        "bad_identity",
                        Code::InvalidArgument,
                        format!("requested identity: {e}"),
                    )
                })?;
        if identity.trust_domain() != self.trust_domain {
            return Err(refuse(
                "bad_identity",
                Code::InvalidArgument,
                format!(
                    "{identity} is not in this CA's trust domain {}",
                    self.trust_domain
                ),
            ));
        }
        if !self.pods.has_pod(
            &caller.node,
            identity.namespace(),
            identity.service_account(),
        ) {
            return Err(refuse(
                "no_pod_on_node",
                Code::PermissionDenied,
                format!(
                    "no pod with ServiceAccount {}/{} runs on node {}, the node of the caller {username}",
                    identity.namespace(),
                    identity.service_account(),
                    caller.node
                ),
            ));
        }
        let checked = csr::check(&request.csr_der, &identity)
            .map_err(|e| refuse("bad_csr", Code::InvalidArgument, e.to_string()))?;
        let issuer = Arc::clone(&self.issuer.read().expect("issuer lock"));
        let leaf = issuer
            .sign_leaf(&identity, &checked.spki_der, self.policy)
            .map_err(|e| refuse("signing_failed", Code::Internal, e))?;
        self.metrics.issued();
        tracing::info!(
            identity = %identity,
            caller = %Untrusted(&username),
            node = %Untrusted(&caller.node),
            peer = ?peer,
            key_exchange = %key_exchange,
            serial = %leaf.serial_hex,
            not_after = %leaf.not_after,
            issuer = %issuer.label,
            "issued a certificate"
        );
        Ok(CertifyResponse {
            leaf_der: leaf.der.to_vec(),
            intermediates_der: vec![issuer.cert_der.to_vec()],
            trust_bundle_der: issuer.roots.iter().map(|r| r.to_vec()).collect(),
            valid_until_unix: leaf.not_after.unix_timestamp(),
        })
    }
}
