//! Authorization: `AuthorizationPolicy` objects compiled when the workload
//! table is built, the set that selects each pod of this node worked out
//! then (never by scanning every policy per connection), and the one
//! evaluator both directions ask (the inbound tunnel and the same-node
//! route).
//!
//! The rules, as operators of Istio and Linkerd know them:
//! 1. a `Deny` that selects the pod and port and names the caller wins;
//! 2. else, if any `Allow` selects the pod and port, one of them must name
//!    the caller;
//! 3. else the namespace's default decides (`ferry.dev/default-inbound-policy`,
//!    or the agent's `--default-inbound-policy`).
//!
//! What the agent cannot use in a policy it ignores, entry by entry, and
//! says so in the policy's status: a source that names nobody valid (a
//! malformed id, an identity of another trust domain, `unauthenticated:
//! false`, an entry of no kind or of two) matches no caller, and a port 0 no
//! port. A selector it cannot read selects every pod of the namespace, so a
//! typo in an `Allow` closes its pods instead of opening them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
};

use ferry_proto::{
    SpiffeId, is_dns_label,
    policy::{
        Action, AuthorizationPolicySpec, DefaultPolicy, LabelExpression, LabelOperator,
        LabelSelector, PolicySource,
    },
    workload_file::PolicySpec,
};
use serde::{Deserialize, Serialize};

/// Who is asking: a verified workload identity, or plaintext from outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    Identity(&'a SpiffeId),
    Unauthenticated,
}

impl fmt::Display for Caller<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Identity(identity) => identity.fmt(f),
            Caller::Unauthenticated => f.write_str("plaintext from outside the mesh"),
        }
    }
}

/// One policy as the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub action: Action,
    /// Empty: every pod of the namespace (also when the selector was unreadable).
    selector: Option<LabelSelector>,
    /// Empty: every port.
    ports: Vec<u16>,
    sources: Vec<Source>,
    /// What was ignored, for the policy's status; empty when all of it applies.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Identity(SpiffeId),
    Namespace(String),
    Unauthenticated,
}

impl CompiledPolicy {
    /// Compiles `policy` for a mesh of `trust_domain`, noting what it ignores.
    pub fn compile(policy: &PolicySpec, trust_domain: &str) -> Self {
        let AuthorizationPolicySpec {
            selector,
            ports,
            action,
            from,
        } = &policy.spec;
        let mut problems = Vec::new();
        let selector = match selector {
            Some(selector) => match selector_problems(selector) {
                found if found.is_empty() => Some(selector.clone()),
                found => {
                    problems.extend(found.into_iter().map(|p| {
                        format!("selector: {p}; it selects every pod of the namespace instead")
                    }));
                    None
                }
            },
            None => None,
        };
        let mut kept_ports = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            if *port == 0 {
                problems.push(format!("ports[{i}]: 0 is not a port; ignored"));
            } else {
                kept_ports.push(*port);
            }
        }
        if !ports.is_empty() && kept_ports.is_empty() {
            // Every listed port was invalid: the policy applies to no port,
            // rather than to every port.
            kept_ports.push(0);
        }
        let mut sources = Vec::new();
        for (i, source) in from.iter().enumerate() {
            match compile_source(source, trust_domain) {
                Ok(source) => sources.push(source),
                Err(problem) => problems.push(format!("from[{i}]: {problem}; ignored")),
            }
        }
        Self {
            key: format!("{}/{}", policy.namespace, policy.name),
            namespace: policy.namespace.clone(),
            action: *action,
            selector,
            ports: kept_ports,
            sources,
            problems,
        }
    }

    /// Whether the policy applies to `pod` (of its namespace) at all.
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        namespace == self.namespace
            && self
                .selector
                .as_ref()
                .is_none_or(|selector| matches(selector, labels))
    }

    fn covers(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }
}

/// Why a source of a policy names nobody the agent can match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum SourceProblem {
    #[error("a source names exactly one of identity, serviceAccount, namespace, unauthenticated")]
    Kinds,
    #[error("identity: {0}")]
    Identity(ferry_proto::SpiffeIdError),
    #[error(
        "identity {identity} is of trust domain {}, not this mesh's {mesh}: it can never connect",
        identity.trust_domain()
    )]
    ForeignTrustDomain { identity: SpiffeId, mesh: String },
    #[error("serviceAccount {0:?} is not <namespace>/<name>")]
    ServiceAccountShape(String),
    #[error("serviceAccount {account:?}: {error}")]
    ServiceAccount {
        account: String,
        error: ferry_proto::SpiffeIdError,
    },
    #[error("namespace {0:?} is not a namespace name")]
    Namespace(String),
    #[error("unauthenticated: false names nobody")]
    NotUnauthenticated,
}

fn compile_source(source: &PolicySource, trust_domain: &str) -> Result<Source, SourceProblem> {
    let PolicySource {
        identity,
        service_account,
        namespace,
        unauthenticated,
    } = source;
    let kinds = [
        identity.is_some(),
        service_account.is_some(),
        namespace.is_some(),
        unauthenticated.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(SourceProblem::Kinds);
    }
    if let Some(identity) = identity {
        let id: SpiffeId = identity.parse().map_err(SourceProblem::Identity)?;
        if id.trust_domain() != trust_domain {
            return Err(SourceProblem::ForeignTrustDomain {
                identity: id,
                mesh: trust_domain.to_owned(),
            });
        }
        return Ok(Source::Identity(id));
    }
    if let Some(account) = service_account {
        let (namespace, name) = account
            .split_once('/')
            .ok_or_else(|| SourceProblem::ServiceAccountShape(account.clone()))?;
        let id = SpiffeId::new(trust_domain, namespace, name).map_err(|error| {
            SourceProblem::ServiceAccount {
                account: account.clone(),
                error,
            }
        })?;
        return Ok(Source::Identity(id));
    }
    if let Some(namespace) = namespace {
        if !is_dns_label(namespace) {
            return Err(SourceProblem::Namespace(namespace.clone()));
        }
        return Ok(Source::Namespace(namespace.clone()));
    }
    match unauthenticated {
        Some(true) => Ok(Source::Unauthenticated),
        _ => Err(SourceProblem::NotUnauthenticated),
    }
}

/// What makes a selector unreadable, as the API server's own validation
/// sees it; empty when it is fine.
fn selector_problems(selector: &LabelSelector) -> Vec<String> {
    let mut problems = Vec::new();
    for (
        i,
        LabelExpression {
            key,
            operator,
            values,
        },
    ) in selector.match_expressions.iter().enumerate()
    {
        if key.is_empty() {
            problems.push(format!("matchExpressions[{i}] has no key"));
        }
        match operator {
            LabelOperator::In | LabelOperator::NotIn if values.is_empty() => problems.push(
                format!("matchExpressions[{i}] ({key} {operator:?}) needs at least one value"),
            ),
            LabelOperator::Exists | LabelOperator::DoesNotExist if !values.is_empty() => problems
                .push(format!(
                    "matchExpressions[{i}] ({key} {operator:?}) takes no values"
                )),
            _ => {}
        }
    }
    problems
}

fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
        && selector.match_expressions.iter().all(|expression| {
            let value = labels.get(&expression.key);
            match expression.operator {
                LabelOperator::In => value.is_some_and(|v| expression.values.contains(v)),
                LabelOperator::NotIn => value.is_none_or(|v| !expression.values.contains(v)),
                LabelOperator::Exists => value.is_some(),
                LabelOperator::DoesNotExist => value.is_none(),
            }
        })
}

/// The policies that select one pod, and its namespace's default: all the
/// evaluator needs, worked out when the table was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPolicies {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The mesh's trust domain: a caller of another is of no namespace here.
    pub trust_domain: String,
    pub namespace: String,
    pub default: DefaultPolicy,
    pub policies: Vec<Arc<CompiledPolicy>>,
    /// The `Deny`s and the `Allow`s by the callers they name, so a
    /// connection looks up its caller rather than scanning the policies.
    deny: ByCaller,
    allow: ByCaller,
    /// The ports some `Allow` covers; `None`: one covers every port.
    allow_ports: Option<BTreeSet<u16>>,
}

/// Policies (indexes into [`PodPolicies::policies`]) by the callers they name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ByCaller {
    identity: BTreeMap<SpiffeId, Vec<usize>>,
    namespace: BTreeMap<String, Vec<usize>>,
    unauthenticated: Vec<usize>,
}

impl ByCaller {
    fn add(&mut self, index: usize, policy: &CompiledPolicy) {
        for source in &policy.sources {
            let list = match source {
                Source::Identity(id) => self.identity.entry(id.clone()).or_default(),
                Source::Namespace(ns) => self.namespace.entry(ns.clone()).or_default(),
                Source::Unauthenticated => &mut self.unauthenticated,
            };
            if list.last() != Some(&index) {
                list.push(index);
            }
        }
    }

    /// The first policy (in policy order) that names `caller` and passes
    /// `covers`; no allocation, as it runs per connection.
    /// A `namespace` source names a namespace of the mesh's `trust_domain`.
    fn first_naming(
        &self,
        caller: Caller<'_>,
        trust_domain: &str,
        covers: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let none: &[usize] = &[];
        let lists = match caller {
            Caller::Identity(id) => [
                self.identity.get(id).map_or(none, Vec::as_slice),
                if id.trust_domain() == trust_domain {
                    self.namespace
                        .get(id.namespace())
                        .map_or(none, Vec::as_slice)
                } else {
                    none
                },
            ],
            Caller::Unauthenticated => [self.unauthenticated.as_slice(), none],
        };
        lists
            .into_iter()
            .flatten()
            .copied()
            .filter(|&index| covers(index))
            .min()
    }
}

/// How many of the `Allow`s that did not name a refused caller its denial names.
const DENIAL_NAMES: usize = 5;

/// What the evaluator decided, and on whose account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `policy`: the `Allow` that named the caller; `None`: the default.
    Allowed {
        policy: Option<String>,
    },
    Denied(PolicyDenied),
}

/// A connection the destination's policies do not admit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pod} port {port} does not admit {caller}: {reason}")]
pub struct PolicyDenied {
    /// `namespace/name` of the destination pod.
    pub pod: String,
    pub port: u16,
    /// The caller, as logs say it.
    pub caller: String,
    pub reason: DenyReason,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DenyReason {
    #[error("policy {0} denies it")]
    DenyPolicy(String),
    /// The `Allow`s that cover it (the first few).
    #[error("no allow policy selecting it names it (allow policies: {})", .0.join(", "))]
    NotAllowed(Vec<String>),
    #[error("no policy selects it, and the namespace's default is {}", .0.as_str())]
    Default(DefaultPolicy),
}

impl DenyReason {
    /// The bounded label a denial is counted under.
    pub fn label(&self) -> &'static str {
        match self {
            DenyReason::DenyPolicy(_) => "deny_policy",
            DenyReason::NotAllowed(_) => "not_allowed",
            DenyReason::Default(_) => "default",
        }
    }

    /// The policies that decided: the `Deny` that named the caller, or the
    /// `Allow`s that covered it and did not; none when the default did.
    pub fn policies(&self) -> &[String] {
        match self {
            DenyReason::DenyPolicy(policy) => std::slice::from_ref(policy),
            DenyReason::NotAllowed(policies) => policies,
            DenyReason::Default(_) => &[],
        }
    }
}

impl PodPolicies {
    /// Works out which of `policies` select a pod of `namespace` with `labels`.
    pub fn select(
        pod: String,
        trust_domain: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        default: DefaultPolicy,
        policies: &[Arc<CompiledPolicy>],
    ) -> Self {
        let policies: Vec<Arc<CompiledPolicy>> = policies
            .iter()
            .filter(|policy| policy.selects(namespace, labels))
            .cloned()
            .collect();
        let (mut deny, mut allow) = (ByCaller::default(), ByCaller::default());
        let mut allow_ports = Some(BTreeSet::new());
        for (index, policy) in policies.iter().enumerate() {
            match policy.action {
                Action::Deny => deny.add(index, policy),
                Action::Allow => {
                    allow.add(index, policy);
                    if policy.ports.is_empty() {
                        allow_ports = None;
                    } else if let Some(ports) = &mut allow_ports {
                        ports.extend(policy.ports.iter().copied());
                    }
                }
            }
        }
        Self {
            pod,
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            default,
            policies,
            deny,
            allow,
            allow_ports,
        }
    }

    /// Whether `caller` may connect to this pod's `port`: a lookup of the
    /// caller in the pod's indexes, whatever the number of policies.
    pub fn evaluate(&self, caller: Caller<'_>, port: u16) -> Verdict {
        let denied = |reason| {
            Verdict::Denied(PolicyDenied {
                pod: self.pod.clone(),
                port,
                caller: caller.to_string(),
                reason,
            })
        };
        let covering = |by: &ByCaller| {
            by.first_naming(caller, &self.trust_domain, |i| {
                self.policies[i].covers(port)
            })
            .map(|i| &self.policies[i])
        };
        if let Some(deny) = covering(&self.deny) {
            return denied(DenyReason::DenyPolicy(deny.key.clone()));
        }
        let allowed_here = self
            .allow_ports
            .as_ref()
            .is_none_or(|ports| ports.contains(&port));
        if allowed_here {
            return match covering(&self.allow) {
                Some(allow) => Verdict::Allowed {
                    policy: Some(allow.key.clone()),
                },
                // Only a refusal names the Allows that did not admit it.
                None => denied(DenyReason::NotAllowed(
                    self.policies
                        .iter()
                        .filter(|p| p.action == Action::Allow && p.covers(port))
                        .take(DENIAL_NAMES)
                        .map(|p| p.key.clone())
                        .collect(),
                )),
            };
        }
        let admitted = match (self.default, caller) {
            (DefaultPolicy::AllUnauthenticated, _) => true,
            (DefaultPolicy::AllAuthenticated, caller) => caller != Caller::Unauthenticated,
            (DefaultPolicy::SameNamespace, Caller::Identity(id)) => {
                id.trust_domain() == self.trust_domain && id.namespace() == self.namespace
            }
            (DefaultPolicy::SameNamespace, Caller::Unauthenticated) => false,
            (DefaultPolicy::Deny, _) => false,
        };
        if admitted {
            Verdict::Allowed { policy: None }
        } else {
            denied(DenyReason::Default(self.default))
        }
    }
}

/// What the kernel does with new plaintext connections from off the node
/// into one pod: refused or let in, and the ports where it is the other way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaintextRule {
    pub refused: bool,
    /// Port → let in, where that differs from `refused`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, bool>,
}

impl PodPolicies {
    /// Plaintext from outside the mesh, as these policies judge it on every
    /// port: the decision on ports no policy lists, and the listed ports
    /// where it differs.
    pub fn plaintext(&self) -> PlaintextRule {
        let listed: BTreeSet<u16> = self
            .policies
            .iter()
            .flat_map(|policy| policy.ports.iter().copied())
            .filter(|port| *port != 0)
            .collect();
        let admitted = |port| {
            matches!(
                self.evaluate(Caller::Unauthenticated, port),
                Verdict::Allowed { .. }
            )
        };
        // A port no policy lists stands for every such port.
        let unlisted = (1..=u16::MAX).find(|port| !listed.contains(port));
        let let_in = unlisted.is_some_and(admitted);
        PlaintextRule {
            refused: !let_in,
            ports: listed
                .into_iter()
                .filter_map(|port| {
                    let here = admitted(port);
                    (here != let_in).then_some((port, here))
                })
                .collect(),
        }
    }
}

/// A policy as `/config_dump` and `inspect policies` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    /// `namespace/name`.
    pub policy: String,
    pub action: Action,
    /// The pods of this node it selects.
    pub local_pods: Vec<String>,
    /// What the agent ignored of it; empty when it applies as written.
    pub problems: Vec<String>,
    /// Connections it admitted and refused since the agent started.
    #[serde(default)]
    pub allowed: u64,
    #[serde(default)]
    pub denied: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn policy(name: &str, yaml: &str) -> Arc<CompiledPolicy> {
        let spec: AuthorizationPolicySpec = serde_yaml::from_str(yaml).unwrap();
        Arc::new(CompiledPolicy::compile(
            &PolicySpec {
                name: name.to_owned(),
                namespace: "shop".to_owned(),
                spec,
            },
            TD,
        ))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod(
        labels_of: &[(&str, &str)],
        default: DefaultPolicy,
        all: &[Arc<CompiledPolicy>],
    ) -> PodPolicies {
        PodPolicies::select(
            "shop/db-0".to_owned(),
            TD,
            "shop",
            &labels(labels_of),
            default,
            all,
        )
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new(TD, ns, sa).unwrap()
    }

    fn allowed(verdict: &Verdict) -> bool {
        matches!(verdict, Verdict::Allowed { .. })
    }

    /// Found by the tunnel_connect fuzz target: a caller of another trust
    /// domain was admitted by `same-namespace` and by `namespace` sources,
    /// which compared the namespace's name alone.
    #[test]
    fn a_namespace_of_another_trust_domain_is_not_this_namespace() {
        let foreign = SpiffeId::new("example.org", "shop", "api").unwrap();
        let same = pod(&[], DefaultPolicy::SameNamespace, &[]);
        assert!(!allowed(&same.evaluate(Caller::Identity(&foreign), 80)));
        assert!(allowed(
            &same.evaluate(Caller::Identity(&id("shop", "api")), 80)
        ));
        let from_shop = policy("from-shop", "from: [{ namespace: shop }]");
        let guarded = pod(&[], DefaultPolicy::Deny, &[from_shop]);
        assert!(!allowed(&guarded.evaluate(Caller::Identity(&foreign), 80)));
        assert!(allowed(
            &guarded.evaluate(Caller::Identity(&id("shop", "api")), 80)
        ));
    }

    #[test]
    fn without_policies_the_default_decides() {
        let (api, ops) = (id("shop", "api"), id("ops", "admin"));
        let cases = [
            (DefaultPolicy::AllUnauthenticated, [true, true, true]),
            (DefaultPolicy::AllAuthenticated, [true, true, false]),
            (DefaultPolicy::SameNamespace, [true, false, false]),
            (DefaultPolicy::Deny, [false, false, false]),
        ];
        for (default, expected) in cases {
            let pod = pod(&[], default, &[]);
            let got = [
                allowed(&pod.evaluate(Caller::Identity(&api), 80)),
                allowed(&pod.evaluate(Caller::Identity(&ops), 80)),
                allowed(&pod.evaluate(Caller::Unauthenticated, 80)),
            ];
            assert_eq!(got, expected, "{default:?}");
        }
        let denied = pod(&[], DefaultPolicy::Deny, &[]).evaluate(Caller::Identity(&api), 80);
        let Verdict::Denied(denied) = denied else {
            panic!("{denied:?}")
        };
        assert_eq!(
            denied.to_string(),
            "shop/db-0 port 80 does not admit spiffe://cluster.local/ns/shop/sa/api: no policy selects it, and the namespace's default is deny"
        );
    }

    #[test]
    fn an_allow_admits_only_what_it_names_and_a_deny_wins() {
        let allow = policy("api-only", "from: [{ serviceAccount: shop/api }]");
        let (api, web) = (id("shop", "api"), id("shop", "web"));
        let pod_ = pod(
            &[],
            DefaultPolicy::AllUnauthenticated,
            &[Arc::clone(&allow)],
        );
        assert_eq!(
            pod_.evaluate(Caller::Identity(&api), 80),
            Verdict::Allowed {
                policy: Some("shop/api-only".to_owned())
            }
        );
        let refused = pod_.evaluate(Caller::Identity(&web), 80);
        assert!(
            matches!(&refused, Verdict::Denied(d) if d.reason == DenyReason::NotAllowed(vec!["shop/api-only".to_owned()])),
            "{refused:?}"
        );
        // An Allow that does not name unauthenticated closes the plaintext door.
        assert!(!allowed(&pod_.evaluate(Caller::Unauthenticated, 80)));

        let deny = policy(
            "no-api",
            "{ action: Deny, from: [{ identity: spiffe://cluster.local/ns/shop/sa/api }] }",
        );
        let pod_ = pod(&[], DefaultPolicy::AllUnauthenticated, &[allow, deny]);
        let verdict = pod_.evaluate(Caller::Identity(&api), 80);
        assert!(
            matches!(&verdict, Verdict::Denied(d) if d.reason == DenyReason::DenyPolicy("shop/no-api".to_owned())),
            "{verdict:?}"
        );
    }

    #[test]
    fn ports_limit_a_policy_and_namespaces_and_plaintext_are_sources() {
        let allow = policy(
            "db-port",
            "{ ports: [5432], from: [{ namespace: ops }, { unauthenticated: true }] }",
        );
        let pod_ = pod(&[], DefaultPolicy::Deny, &[allow]);
        let (ops, shop) = (id("ops", "any"), id("shop", "api"));
        assert!(allowed(&pod_.evaluate(Caller::Identity(&ops), 5432)));
        assert!(allowed(&pod_.evaluate(Caller::Unauthenticated, 5432)));
        assert!(!allowed(&pod_.evaluate(Caller::Identity(&shop), 5432)));
        // Another port: no policy covers it, so the default (deny) decides.
        let other = pod_.evaluate(Caller::Identity(&ops), 8080);
        assert!(
            matches!(&other, Verdict::Denied(d) if d.reason == DenyReason::Default(DefaultPolicy::Deny)),
            "{other:?}"
        );
    }

    #[test]
    fn selectors_pick_pods_by_label() {
        let by_labels = policy(
            "db",
            "{ selector: { matchLabels: { app: db }, matchExpressions: [{ key: tier, operator: NotIn, values: [test] }] }, from: [] }",
        );
        let selected = |l: &[(&str, &str)]| {
            !pod(
                l,
                DefaultPolicy::AllUnauthenticated,
                &[Arc::clone(&by_labels)],
            )
            .policies
            .is_empty()
        };
        assert!(selected(&[("app", "db")]));
        assert!(selected(&[("app", "db"), ("tier", "prod")]));
        assert!(!selected(&[("app", "db"), ("tier", "test")]));
        assert!(!selected(&[("app", "web")]));
        // Of another namespace: never.
        assert!(!by_labels.selects("ops", &labels(&[("app", "db")])));
        let exists = policy(
            "exists",
            "{ selector: { matchExpressions: [{ key: app, operator: Exists }, { key: canary, operator: DoesNotExist }] } }",
        );
        assert!(exists.selects("shop", &labels(&[("app", "x")])));
        assert!(!exists.selects("shop", &labels(&[("app", "x"), ("canary", "1")])));
        let listed = policy(
            "in",
            "{ selector: { matchExpressions: [{ key: app, operator: In, values: [a, b] }] } }",
        );
        assert!(listed.selects("shop", &labels(&[("app", "b")])));
        assert!(!listed.selects("shop", &labels(&[("app", "c")])));
    }

    #[test]
    fn plaintext_is_judged_per_port_as_the_policies_say() {
        // No policy: the default decides every port.
        let open = pod(&[], DefaultPolicy::AllUnauthenticated, &[]).plaintext();
        assert_eq!(open, PlaintextRule::default());
        let closed = pod(&[], DefaultPolicy::AllAuthenticated, &[]).plaintext();
        assert!(closed.refused && closed.ports.is_empty(), "{closed:?}");
        // An Allow without unauthenticated closes every port it covers (all).
        let mesh_only = policy("mesh-only", "from: [{ namespace: shop }]");
        let rule = pod(&[], DefaultPolicy::AllUnauthenticated, &[mesh_only]).plaintext();
        assert!(rule.refused && rule.ports.is_empty(), "{rule:?}");
        // One port for plaintext, one for the mesh only, the rest to the default.
        let status = policy(
            "status",
            "{ ports: [8081], from: [{ unauthenticated: true }] }",
        );
        let db = policy("db", "{ ports: [5432], from: [{ namespace: shop }] }");
        let rule = pod(&[], DefaultPolicy::Deny, &[status, db]).plaintext();
        assert_eq!(
            rule,
            PlaintextRule {
                refused: true,
                ports: [(8081, true)].into()
            }
        );
        let rule = pod(
            &[],
            DefaultPolicy::AllUnauthenticated,
            &[policy(
                "db",
                "{ ports: [5432], from: [{ namespace: shop }] }",
            )],
        )
        .plaintext();
        assert_eq!(
            rule,
            PlaintextRule {
                refused: false,
                ports: [(5432, false)].into()
            }
        );
    }

    #[test]
    fn many_policies_are_looked_up_by_caller_and_a_refusal_names_a_few() {
        let many: Vec<_> = (0..1000)
            .map(|i| {
                policy(
                    &format!("p{i}"),
                    &format!("from: [{{ namespace: ns-{i} }}]"),
                )
            })
            .collect();
        let pod_ = pod(&[], DefaultPolicy::Deny, &many);
        assert_eq!(
            pod_.evaluate(Caller::Identity(&id("ns-999", "x")), 80),
            Verdict::Allowed {
                policy: Some("shop/p999".to_owned())
            }
        );
        let Verdict::Denied(denied) = pod_.evaluate(Caller::Identity(&id("ops", "x")), 80) else {
            panic!("a caller no policy names got in");
        };
        assert_eq!(
            denied.reason,
            DenyReason::NotAllowed((0..DENIAL_NAMES).map(|i| format!("shop/p{i}")).collect())
        );
    }

    #[test]
    fn what_cannot_be_used_is_ignored_and_said() {
        let bad = policy(
            "bad",
            "{ ports: [0, 80], from: [\
               { identity: spiffe://other.domain/ns/shop/sa/api },\
               { identity: not-an-id },\
               { serviceAccount: no-slash },\
               { namespace: NOT_A_NS },\
               { unauthenticated: false },\
               {},\
               { namespace: shop, serviceAccount: shop/api },\
               { serviceAccount: shop/api }] }",
        );
        assert_eq!(bad.problems.len(), 8, "{:#?}", bad.problems);
        assert!(
            bad.problems[0].starts_with("ports[0]"),
            "{:?}",
            bad.problems
        );
        assert!(
            bad.problems[1].contains("trust domain other.domain"),
            "{:?}",
            bad.problems
        );
        // What is valid still applies: shop/api on port 80.
        let pod_ = pod(&[], DefaultPolicy::Deny, &[Arc::clone(&bad)]);
        assert!(allowed(
            &pod_.evaluate(Caller::Identity(&id("shop", "api")), 80)
        ));
        assert!(!allowed(
            &pod_.evaluate(Caller::Identity(&id("shop", "web")), 80)
        ));

        // A selector the API server would refuse selects the whole namespace.
        let unreadable = policy(
            "unreadable",
            "{ selector: { matchExpressions: [{ key: app, operator: In }] }, from: [] }",
        );
        assert_eq!(unreadable.problems.len(), 1, "{:?}", unreadable.problems);
        assert!(unreadable.selects("shop", &labels(&[("app", "anything")])));
        // An Allow whose every port is invalid applies to no port.
        let no_port = policy("no-port", "{ ports: [0], from: [] }");
        let pod_ = pod(&[], DefaultPolicy::AllUnauthenticated, &[no_port]);
        assert!(allowed(
            &pod_.evaluate(Caller::Identity(&id("shop", "web")), 80)
        ));
    }
}
