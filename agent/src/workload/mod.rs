//! What the agent knows about the cluster's workloads, and where it learns it.
//!
//! A [`WorkloadTable`] is an immutable snapshot: sources build a new one and
//! publish it through a `watch` channel, so readers on the connection path
//! never wait on a writer.

/// The workload file format, shared with the CA (which authorizes nodes from it).
pub use ferry_proto::workload_file as file;
mod file_source;
pub mod kube_source;
mod pod_cgroups;
pub mod policy;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use ferry_proto::{
    Untrusted,
    policy::{DEFAULT_POLICY_ANNOTATION, DefaultPolicy},
};
use serde::{Deserialize, Serialize, Serializer};

use policy::{Caller, CompiledPolicy, PodPolicies, PolicyView, Verdict};

pub use file_source::FileSource;
pub use kube_source::KubeSource;

/// Where the table comes from; each source publishes every change itself.
pub enum Source {
    File(FileSource),
    Kubernetes(KubeSource),
}

impl Source {
    /// Publishes new tables until the receivers are gone.
    pub async fn watch(self, tx: tokio::sync::watch::Sender<Arc<WorkloadTable>>) {
        match self {
            Self::File(source) => source.watch(tx).await,
            Self::Kubernetes(source) => source.watch(tx).await,
        }
    }
}

/// One pod, as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// Whether the pod's namespace carries `ferry.dev/mesh=enabled`.
    pub meshed: bool,
    /// The pod's cgroup v2 directory (known for pods on this node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_ports: Vec<u16>,
    /// The namespace is in strict mode: plaintext from off the node is refused.
    pub strict: bool,
    /// The pod's labels, which policies select it by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    /// `namespace/name`, the way Kubernetes people say it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// This node, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalNode {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// A snapshot of every workload the agent knows, indexed for the connection path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadTable {
    pub node: LocalNode,
    #[serde(serialize_with = "serialize_arcs")]
    pub workloads: Vec<Arc<Workload>>,
    /// Every node's addresses: where its agent's tunnel listens.
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
    /// Every authorization policy the source gave, compiled.
    #[serde(skip)]
    pub policies: Vec<Arc<CompiledPolicy>>,
    /// What the sources' policy settings (annotations) got wrong.
    #[serde(skip)]
    pub policy_problems: Vec<String>,
    #[serde(serialize_with = "serialize_arcs")]
    pub services: Vec<Arc<Service>>,
    #[serde(skip)]
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    #[serde(skip)]
    services_by_ip: HashMap<IpAddr, Arc<Service>>,
    /// Workloads by `namespace/name`, how Services name their endpoints.
    #[serde(skip)]
    by_key: HashMap<String, Arc<Workload>>,
    /// The policies of each pod of this node, by `namespace/name`.
    #[serde(skip)]
    pod_policies: HashMap<String, Arc<PodPolicies>>,
}

/// What the agent brings to any source's facts to authorize connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    /// Identities of other trust domains can never connect.
    pub trust_domain: String,
    /// For namespaces without a valid [`DEFAULT_POLICY_ANNOTATION`].
    pub cluster_default: DefaultPolicy,
}

impl PolicySettings {
    /// The default of a namespace with `annotation` (its
    /// [`DEFAULT_POLICY_ANNOTATION`], if it has one); a value that is not a
    /// default policy is a problem, and the cluster default applies.
    pub fn namespace_default(
        &self,
        namespace: &str,
        annotation: Option<&str>,
        problems: &mut Vec<String>,
    ) -> DefaultPolicy {
        match annotation.map(str::parse::<DefaultPolicy>) {
            None => self.cluster_default,
            Some(Ok(default)) => default,
            Some(Err(error)) => {
                problems.push(format!(
                    "namespace {namespace}: {DEFAULT_POLICY_ANNOTATION}: {error}; using the agent's default {}",
                    self.cluster_default.as_str()
                ));
                self.cluster_default
            }
        }
    }
}

/// A source's policies and the defaults of its namespaces, for [`WorkloadTable::new`].
#[derive(Debug, Clone, Default)]
pub struct PolicyFacts {
    pub policies: Vec<file::PolicySpec>,
    /// Each namespace's default; namespaces not listed get the cluster default.
    pub namespace_defaults: HashMap<String, DefaultPolicy>,
    /// What was wrong with the namespaces' annotations.
    pub problems: Vec<String>,
}

/// A Service, with its endpoints resolved to pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<file::ServicePort>,
    /// `namespace/name` of each endpoint pod.
    pub endpoints: Vec<String>,
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pods' port for the Service port `port`, if the Service has it.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port.unwrap_or(p.port))
    }
}

impl WorkloadTable {
    /// Indexes a snapshot: the one constructor every source goes through.
    /// Where two workloads claim one IP (a pod that is going away and the new
    /// pod that got its address), the later one in `workloads` wins.
    pub fn new(
        node: LocalNode,
        nodes: BTreeMap<String, Vec<IpAddr>>,
        workloads: Vec<Workload>,
        services: Vec<Service>,
        facts: PolicyFacts,
        settings: &PolicySettings,
    ) -> Self {
        let workloads: Vec<_> = workloads.into_iter().map(Arc::new).collect();
        let by_ip = workloads
            .iter()
            .flat_map(|w| {
                w.ips
                    .iter()
                    .map(move |ip| (ip.to_canonical(), Arc::clone(w)))
            })
            .collect();
        let by_key = workloads.iter().map(|w| (w.key(), Arc::clone(w))).collect();
        let services: Vec<_> = services.into_iter().map(Arc::new).collect();
        let services_by_ip = services
            .iter()
            .flat_map(|s| {
                s.cluster_ips
                    .iter()
                    .map(move |ip| (ip.to_canonical(), Arc::clone(s)))
            })
            .collect();
        let mut nodes = nodes;
        nodes
            .entry(node.name.clone())
            .or_insert_with(|| node.addresses.clone());
        let policies: Vec<Arc<CompiledPolicy>> = facts
            .policies
            .iter()
            .map(|policy| Arc::new(CompiledPolicy::compile(policy, &settings.trust_domain)))
            .collect();
        let mut of_namespace: HashMap<&str, Vec<Arc<CompiledPolicy>>> = HashMap::new();
        for policy in &policies {
            of_namespace
                .entry(policy.namespace.as_str())
                .or_default()
                .push(Arc::clone(policy));
        }
        let pod_policies = workloads
            .iter()
            .filter(|w| w.node == node.name)
            .map(|w| {
                let default = facts
                    .namespace_defaults
                    .get(&w.namespace)
                    .copied()
                    .unwrap_or(settings.cluster_default);
                let candidates = of_namespace
                    .get(w.namespace.as_str())
                    .map_or(&[][..], Vec::as_slice);
                let selected = PodPolicies::select(
                    w.key(),
                    &settings.trust_domain,
                    &w.namespace,
                    &w.labels,
                    default,
                    candidates,
                );
                (w.key(), Arc::new(selected))
            })
            .collect();
        Self {
            node,
            workloads,
            nodes,
            policies,
            policy_problems: facts.problems,
            services,
            by_ip,
            services_by_ip,
            by_key,
            pod_policies,
        }
    }

    /// The Service whose ClusterIP is `ip`.
    pub fn service_by_ip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services_by_ip.get(&ip.to_canonical())
    }

    /// The endpoint pods of `service`, in the address family of `like`.
    pub fn endpoints(&self, service: &Service, like: IpAddr) -> Vec<(Arc<Workload>, IpAddr)> {
        let v4 = like.to_canonical().is_ipv4();
        service
            .endpoints
            .iter()
            .filter_map(|key| self.by_key.get(key))
            .filter_map(|pod| {
                let ip = pod.ips.iter().find(|ip| ip.is_ipv4() == v4)?;
                Some((Arc::clone(pod), *ip))
            })
            .collect()
    }

    /// The address of `node`'s agent in the family of `like` (or any other).
    pub fn node_address(&self, node: &str, like: IpAddr) -> Option<IpAddr> {
        let addresses = self.nodes.get(node)?;
        addresses
            .iter()
            .find(|ip| ip.is_ipv4() == like.to_canonical().is_ipv4())
            .or_else(|| addresses.first())
            .copied()
    }

    /// Whether `caller` may connect to `port` of `destination`, a pod of
    /// this node, by its policies (see [`policy`]). A pod of another node is
    /// its own agent's to judge.
    pub fn authorize(&self, caller: Caller<'_>, destination: &Workload, port: u16) -> Verdict {
        match self.pod_policies.get(&destination.key()) {
            Some(policies) => policies.evaluate(caller, port),
            None => Verdict::Denied(policy::PolicyDenied {
                pod: destination.key(),
                port,
                caller: caller.to_string(),
                reason: policy::DenyReason::Default(ferry_proto::policy::DefaultPolicy::Deny),
            }),
        }
    }

    /// What the kernel does with plaintext from off the node into `pod` (of
    /// this node): a strict namespace refuses it all; else its policies say.
    pub fn plaintext(&self, pod: &Workload) -> policy::PlaintextRule {
        if pod.strict {
            return policy::PlaintextRule {
                refused: true,
                ports: BTreeMap::new(),
            };
        }
        self.pod_policies
            .get(&pod.key())
            .map(|policies| policies.plaintext())
            .unwrap_or_default()
    }

    /// The policies as `/config_dump` shows them: which of this node's pods
    /// each selects, and what was ignored of it.
    pub fn policy_views(&self) -> Vec<PolicyView> {
        // One pass over the pods' selections, not one per policy.
        let mut selected: HashMap<*const CompiledPolicy, std::collections::BTreeSet<&str>> =
            HashMap::new();
        for pod in self.pod_policies.values() {
            for policy in &pod.policies {
                selected
                    .entry(Arc::as_ptr(policy))
                    .or_default()
                    .insert(&pod.pod);
            }
        }
        self.policies
            .iter()
            .map(|policy| PolicyView {
                policy: policy.key.clone(),
                action: policy.action,
                local_pods: selected
                    .get(&Arc::as_ptr(policy))
                    .into_iter()
                    .flatten()
                    .map(|pod| (*pod).to_owned())
                    .collect(),
                problems: policy.problems.clone(),
                allowed: 0,
                denied: 0,
            })
            .collect()
    }

    /// Builds the table `node` sees from a checked workload file.
    pub fn from_file(file: &file::WorkloadFile, node: &str, settings: &PolicySettings) -> Self {
        let addresses = file
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.addresses.clone())
            .unwrap_or_default();
        let workloads = file
            .pods
            .iter()
            .map(|pod| Workload {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
                node: pod.node.clone(),
                ips: pod.ips.clone(),
                meshed: file.is_meshed(&pod.namespace),
                strict: file.is_strict(&pod.namespace),
                cgroup: pod.cgroup.clone(),
                excluded_ports: pod.excluded_ports.clone(),
                labels: pod.labels.clone(),
            })
            .collect();
        let mut problems = Vec::new();
        let namespace_defaults = file
            .namespaces
            .iter()
            .map(|ns| {
                let annotation = ns.annotations.get(DEFAULT_POLICY_ANNOTATION);
                let default = settings.namespace_default(
                    &ns.name,
                    annotation.map(String::as_str),
                    &mut problems,
                );
                (ns.name.clone(), default)
            })
            .collect();
        let services = file
            .services
            .iter()
            .map(|s| Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                cluster_ips: s.cluster_ips.clone(),
                ports: s.ports.clone(),
                endpoints: s
                    .endpoints
                    .iter()
                    .map(|pod| format!("{}/{pod}", s.namespace))
                    .collect(),
            })
            .collect();
        Self::new(
            LocalNode {
                name: node.to_owned(),
                addresses,
            },
            file.nodes
                .iter()
                .map(|n| (n.name.clone(), n.addresses.clone()))
                .collect(),
            workloads,
            services,
            PolicyFacts {
                policies: file.policies.clone(),
                namespace_defaults,
                problems,
            },
            settings,
        )
    }

    /// Logs what this table's policies and policy settings got wrong (a
    /// source calls it when it publishes a table with new policies).
    pub fn log_policy_problems(&self) {
        for problem in &self.policy_problems {
            tracing::warn!(problem = %Untrusted(problem), "policy setting ignored");
        }
        for policy in self.policies.iter().filter(|p| !p.problems.is_empty()) {
            tracing::warn!(
                policy = %Untrusted(&policy.key),
                problems = ?policy.problems,
                "authorization policy applied without what it got wrong"
            );
        }
    }

    /// The workload named `namespace/name`.
    pub fn by_key(&self, key: &str) -> Option<&Arc<Workload>> {
        self.by_key.get(key)
    }

    /// The workload that owns `ip` (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// The table `node` builds from the workload file `text`, in the trust
    /// domain `cluster.local` with everyone allowed by default: for tests.
    #[cfg(test)]
    pub fn for_test(text: &str, node: &str) -> Self {
        let settings = PolicySettings {
            trust_domain: "cluster.local".to_owned(),
            cluster_default: DefaultPolicy::AllUnauthenticated,
        };
        Self::from_file(
            &file::WorkloadFile::parse(text, None).unwrap(),
            node,
            &settings,
        )
    }

    /// The meshed pods on this node: the ones whose cgroups get the capture programs.
    pub fn local_meshed(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads
            .iter()
            .filter(|w| w.meshed && w.node == self.node.name && w.cgroup.is_some())
    }
}

fn serialize_arcs<T: Serialize, S: Serializer>(items: &[Arc<T>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(items.iter().map(AsRef::as_ref))
}

#[cfg(test)]
mod tests {
    use ferry_proto::SpiffeId;

    use super::*;

    fn table() -> WorkloadTable {
        let text = "
nodes: [{ name: n1, addresses: [198.19.0.1] }, { name: n2, addresses: [198.19.0.2] }]
namespaces: [{ name: shop, labels: { ferry.dev/mesh: enabled } }, { name: legacy }]
pods:
  - { name: a, namespace: shop, serviceAccount: a, node: n1, ips: [198.18.1.2, \"2001:2:0:1::2\"], cgroup: /x/a }
  - { name: b, namespace: legacy, serviceAccount: b, node: n1, ips: [198.18.1.3], cgroup: /x/b }
  - { name: c, namespace: shop, serviceAccount: c, node: n2, ips: [198.18.2.2] }
";
        WorkloadTable::for_test(text, "n1")
    }

    #[test]
    fn finds_workloads_by_ip_of_either_family() {
        let table = table();
        assert_eq!(
            table.by_ip("198.18.1.2".parse().unwrap()).unwrap().key(),
            "shop/a"
        );
        assert_eq!(
            table.by_ip("2001:2:0:1::2".parse().unwrap()).unwrap().key(),
            "shop/a"
        );
        assert_eq!(
            table
                .by_ip("::ffff:198.18.1.3".parse().unwrap())
                .unwrap()
                .key(),
            "legacy/b"
        );
        assert!(table.by_ip("198.18.9.9".parse().unwrap()).is_none());
    }

    #[test]
    fn finds_each_node_agent_in_the_family_asked_for() {
        let table = table();
        let v4: IpAddr = "198.18.2.2".parse().unwrap();
        assert_eq!(
            table.node_address("n2", v4),
            Some("198.19.0.2".parse().unwrap())
        );
        assert_eq!(table.node_address("n9", v4), None);
    }

    #[test]
    fn policies_and_namespace_defaults_govern_this_nodes_pods() {
        let text = "
nodes: [{ name: n1, addresses: [198.19.0.1] }]
namespaces:
  - { name: shop, labels: { ferry.dev/mesh: enabled }, annotations: { ferry.dev/default-inbound-policy: same-namespace } }
  - { name: legacy, annotations: { ferry.dev/default-inbound-policy: nobody } }
pods:
  - { name: a, namespace: shop, serviceAccount: a, node: n1, ips: [198.18.1.2], cgroup: /x/a, labels: { app: a } }
  - { name: d, namespace: shop, serviceAccount: d, node: n1, ips: [198.18.1.4], cgroup: /x/d, labels: { app: d } }
  - { name: b, namespace: legacy, serviceAccount: b, node: n1, ips: [198.18.1.3] }
policies:
  - { name: a-from-ops, namespace: shop, spec: { selector: { matchLabels: { app: a } }, from: [{ namespace: ops }] } }
";
        let table = WorkloadTable::for_test(text, "n1");
        let pod = |ip: &str| table.by_ip(ip.parse().unwrap()).unwrap().clone();
        let (a, d, b) = (pod("198.18.1.2"), pod("198.18.1.4"), pod("198.18.1.3"));
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        let (ops, shop) = (
            id("spiffe://cluster.local/ns/ops/sa/x"),
            id("spiffe://cluster.local/ns/shop/sa/b"),
        );
        let admits = |caller, pod: &Workload| {
            matches!(table.authorize(caller, pod, 80), Verdict::Allowed { .. })
        };
        assert!(admits(Caller::Identity(&ops), &a), "the policy names ops");
        assert!(
            !admits(Caller::Identity(&shop), &a),
            "the policy does not name shop"
        );
        // No policy selects d: its namespace's default, same-namespace.
        assert!(admits(Caller::Identity(&shop), &d));
        assert!(!admits(Caller::Identity(&ops), &d));
        // legacy's annotation is not a default: the agent's (all-unauthenticated).
        assert!(admits(Caller::Unauthenticated, &b));
        assert_eq!(
            table.policy_problems.len(),
            1,
            "{:?}",
            table.policy_problems
        );
        assert!(
            table.policy_problems[0].contains("\"nobody\""),
            "{:?}",
            table.policy_problems
        );
        let views = table.policy_views();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].policy, "shop/a-from-ops");
        assert_eq!(views[0].local_pods, ["shop/a"]);
    }

    #[test]
    fn a_strict_namespace_refuses_plaintext_whatever_a_policy_allows() {
        let text = "
nodes: [{ name: n1, addresses: [198.19.0.1] }]
namespaces:
  - { name: shop, labels: { ferry.dev/mesh: enabled }, annotations: { ferry.dev/inbound: strict } }
  - { name: open, labels: { ferry.dev/mesh: enabled } }
pods:
  - { name: a, namespace: shop, serviceAccount: a, node: n1, ips: [198.18.1.2], cgroup: /x/a }
  - { name: b, namespace: open, serviceAccount: b, node: n1, ips: [198.18.1.3], cgroup: /x/b }
policies:
  - { name: plaintext, namespace: shop, spec: { from: [{ unauthenticated: true }] } }
  - { name: plaintext, namespace: open, spec: { from: [{ unauthenticated: true }] } }
";
        let table = WorkloadTable::for_test(text, "n1");
        let pod = |ip: &str| table.by_ip(ip.parse().unwrap()).unwrap().clone();
        assert!(table.plaintext(&pod("198.18.1.2")).refused, "strict");
        assert!(!table.plaintext(&pod("198.18.1.3")).refused, "permissive");
    }

    #[test]
    fn captures_only_meshed_pods_of_this_node() {
        let table = table();
        let local: Vec<_> = table.local_meshed().map(|w| w.key()).collect();
        assert_eq!(local, ["shop/a"]);
        assert_eq!(
            table.node.addresses,
            ["198.19.0.1".parse::<IpAddr>().unwrap()]
        );
    }
}
