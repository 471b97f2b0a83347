//! The CA in a cluster: callers are authenticated with a TokenReview (the
//! API server checks the token and says whose it is and on which node it
//! was minted), and node authorization reads a watched index of all pods.

use std::time::Duration;

use ferry_proto::Untrusted;
use futures_util::StreamExt as _;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{WatchStreamExt as _, reflector, watcher},
};

use crate::jwt::TokenIdentity;

/// The `extra` key in which the API server names the node a pod's token was bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// How long the CA waits for its first full list of pods before giving up.
pub const POD_INDEX_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

pub struct TokenReviewer {
    client: Client,
    audience: String,
}

impl TokenReviewer {
    pub fn new(client: Client, audience: &str) -> Self {
        Self {
            client,
            audience: audience.to_owned(),
        }
    }

    pub async fn review(&self, token: &str) -> Result<TokenIdentity, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = reviewed
            .status
            .ok_or("TokenReview came back without a status")?;
        if status.authenticated != Some(true) {
            return Err(format!(
                "the API server did not authenticate the token: {}",
                status.error.unwrap_or_else(|| "no reason given".to_owned())
            ));
        }
        if let Some(audiences) = &status.audiences
            && !audiences.contains(&self.audience)
        {
            return Err(format!(
                "the token's audiences {audiences:?} do not include {:?}",
                self.audience
            ));
        }
        let user = status.user.ok_or("TokenReview named no user")?;
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| format!("{username:?} is not a ServiceAccount"))?;
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|values| values.first()).cloned();
        let node = first(NODE_NAME_EXTRA).ok_or_else(|| {
            format!("the token of {username} is not bound to a node (no {NODE_NAME_EXTRA})")
        })?;
        Ok(TokenIdentity {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            node,
            pod: first(POD_NAME_EXTRA),
        })
    }
}

/// Every pod in the cluster, kept current by a watch.
pub struct KubePods {
    store: reflector::Store<Pod>,
}

impl KubePods {
    /// Starts the watch and waits for the first full list.
    pub async fn start(client: Client) -> Result<Self, String> {
        let (store, writer) = reflector::store();
        let stream = watcher(Api::<Pod>::all(client), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(error) = event {
                    tracing::warn!(error = %Untrusted(&error), "pod watch interrupted; it resumes on its own");
                }
            }
        });
        tokio::time::timeout(POD_INDEX_SYNC_TIMEOUT, store.wait_until_ready())
            .await
            .map_err(|_| {
                format!("no pod list from the API server within {POD_INDEX_SYNC_TIMEOUT:?}")
            })?
            .map_err(|e| format!("the pod watch ended: {e}"))?;
        Ok(Self { store })
    }

    pub fn has_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.store.state().iter().any(|pod| {
            let spec = pod.spec.as_ref();
            pod.metadata.namespace.as_deref() == Some(namespace)
                && spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && spec
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default")
                    == service_account
                && !pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
        })
    }
}
