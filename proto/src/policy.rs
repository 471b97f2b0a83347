//! `AuthorizationPolicy` (`authorizationpolicies.ferry.dev/v1alpha1`): who
//! may connect to the meshed pods of a namespace. One type for both
//! sources: the Kubernetes custom resource, and the `policies` of the
//! workload file (the same `name`, `namespace` and `spec`).
//!
//! ```yaml
//! apiVersion: ferry.dev/v1alpha1
//! kind: AuthorizationPolicy
//! metadata: { name: db-clients, namespace: shop }
//! spec:
//!   selector: { matchLabels: { app: db } }   # every pod of the namespace if absent
//!   ports: [5432]                            # every port if absent
//!   action: Allow                            # or Deny; a Deny wins over any Allow
//!   from:
//!     - serviceAccount: shop/api
//!     - namespace: ops
//!     - identity: spiffe://cluster.local/ns/batch/sa/report
//!     - unauthenticated: true                # plaintext from outside the mesh
//! ```
//!
//! The schema says what a schema can (port range, one kind of source per
//! entry, selector operators, name shapes); the agent checks the rest when
//! it compiles a policy and ignores, with a reason, what does not pass.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the CRD's manifest lives in the repository.
pub const CRD_MANIFEST: &str = "daemonset/crd-authorizationpolicy.yaml";

/// The `CustomResourceDefinition` of [`AuthorizationPolicy`].
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use kube::CustomResourceExt as _;
    AuthorizationPolicy::crd()
}

/// The `CustomResourceDefinition` of [`AuthorizationPolicy`] as a manifest,
/// generated from this file's types (`ferry-agent crd` prints it; a test
/// checks the committed [`CRD_MANIFEST`] is this).
pub fn crd_manifest() -> String {
    let yaml = serde_yaml::to_string(&crd()).expect("a CustomResourceDefinition serializes");
    format!(
        "# Generated from ferry-proto's policy types: `ferry-agent crd > {CRD_MANIFEST}`.\n\
         # Do not edit by hand; a test fails if this differs from what the code generates.\n{yaml}"
    )
}

/// The namespace annotation naming the policy of the namespace's
/// destinations that no `AuthorizationPolicy` selects.
pub const DEFAULT_POLICY_ANNOTATION: &str = "ferry.dev/default-inbound-policy";

/// The pods of its namespace a policy selects, the sources it names, and
/// whether it allows or denies them.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "fpol",
    namespaced,
    doc = "Who may connect to the meshed pods of a namespace (Ferry).",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The pods of the namespace the policy applies to, by label; every pod
    /// of the namespace if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// The destination ports it applies to; every port if absent or empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1, max = 65535)))]
    pub ports: Vec<u16>,
    /// `Allow` (the default) or `Deny`. A `Deny` that matches wins over any
    /// `Allow`; a destination that an `Allow` selects admits only what an
    /// `Allow` names.
    #[serde(default)]
    pub action: Action,
    /// The sources, each of one kind. An `Allow` with none admits nobody.
    #[serde(default)]
    pub from: Vec<PolicySource>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// One source of a policy: exactly one of its fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct PolicySource {
    /// A workload identity, `spiffe://<trust domain>/ns/<namespace>/sa/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^spiffe://[a-z0-9._-]+/ns/[a-z0-9-]+/sa/[a-z0-9.-]+$"))]
    pub identity: Option<String>,
    /// A ServiceAccount, `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    ))]
    pub service_account: Option<String>,
    /// Every ServiceAccount of a namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: Option<String>,
    /// `true`: plaintext connections from outside the mesh (a permissive
    /// pod's; a strict namespace refuses them whatever a policy says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unauthenticated: Option<bool>,
}

/// A Kubernetes label selector: every `matchLabels` pair and every
/// expression must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelExpression>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelExpression {
    pub key: String,
    pub operator: LabelOperator,
    /// For `In` and `NotIn`: at least one; for `Exists` and `DoesNotExist`: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// What a namespace's destinations that no policy selects admit: the
/// namespace's [`DEFAULT_POLICY_ANNOTATION`], else the agent's
/// `--default-inbound-policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Every identity of the trust domain, and plaintext where the
    /// namespace is permissive: Ferry without policies.
    #[default]
    AllUnauthenticated,
    /// Every identity of the trust domain; no plaintext.
    AllAuthenticated,
    /// Identities of the destination's own namespace.
    SameNamespace,
    /// Nobody.
    Deny,
}

impl DefaultPolicy {
    pub const ALL: [DefaultPolicy; 4] = [
        DefaultPolicy::AllUnauthenticated,
        DefaultPolicy::AllAuthenticated,
        DefaultPolicy::SameNamespace,
        DefaultPolicy::Deny,
    ];

    /// The annotation's (and the flag's) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::SameNamespace => "same-namespace",
            DefaultPolicy::Deny => "deny",
        }
    }
}

impl std::str::FromStr for DefaultPolicy {
    type Err = UnknownDefaultPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|policy| policy.as_str() == s)
            .ok_or_else(|| UnknownDefaultPolicy(s.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a default inbound policy: all-unauthenticated, all-authenticated, same-namespace or deny"
)]
pub struct UnknownDefaultPolicy(pub String);

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt as _;

    use super::*;

    #[test]
    fn the_documented_example_parses_as_a_policy() {
        let doc = include_str!("policy.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```yaml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| {
                format!(
                    "{}\n",
                    l.trim_start_matches("//!").strip_prefix(' ').unwrap_or("")
                )
            })
            .collect();
        let policy: AuthorizationPolicy = serde_yaml::from_str(&example).unwrap();
        assert_eq!(policy.spec.action, Action::Allow);
        assert_eq!(policy.spec.ports, [5432]);
        assert_eq!(policy.spec.from.len(), 4);
        assert_eq!(policy.spec.from[3].unauthenticated, Some(true));
    }

    #[test]
    fn the_crd_is_namespaced_and_its_schema_bounds_ports_and_sources() {
        let crd = AuthorizationPolicy::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("authorizationpolicies.ferry.dev")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(
            spec["ports"]["items"]["minimum"].as_f64(),
            Some(1.0),
            "{spec:#}"
        );
        assert_eq!(
            spec["from"]["items"]["maxProperties"].as_u64(),
            Some(1),
            "{spec:#}"
        );
        assert_eq!(
            spec["action"]["enum"],
            serde_json::json!(["Allow", "Deny"]),
            "{spec:#}"
        );
    }

    #[test]
    fn default_policies_round_trip_their_spelling() {
        for policy in DefaultPolicy::ALL {
            assert_eq!(policy.as_str().parse::<DefaultPolicy>(), Ok(policy));
        }
        assert!("allow".parse::<DefaultPolicy>().is_err());
    }
}
