//! What the agent knows about the cluster's workloads, and where it learns it.
//!
//! A [`WorkloadTable`] is an immutable snapshot: sources build a new one and
//! publish it through a `watch` channel, so readers on the connection path
//! never wait on a writer.

/// The workload file format, shared with the CA (which authorizes nodes from it).
pub use ferry_proto::workload_file as file;
mod file_source;
pub mod kube_source;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use ferry_proto::SpiffeId;

use serde::{Deserialize, Serialize, Serializer};

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
    pub policies: Vec<file::PolicySpec>,
    #[serde(serialize_with = "serialize_arcs")]
    pub services: Vec<Arc<Service>>,
    #[serde(skip)]
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    #[serde(skip)]
    services_by_ip: HashMap<IpAddr, Arc<Service>>,
    /// Workloads by `namespace/name`, how Services name their endpoints.
    #[serde(skip)]
    by_key: HashMap<String, Arc<Workload>>,
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

/// A policy governs the destination and allows no identity the source has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy for {destination} allows {allowed:?}; {identity} is not among them")]
pub struct PolicyDenied {
    /// `namespace/serviceAccount` of the destination.
    pub destination: String,
    pub allowed: Vec<String>,
    /// The source's identity.
    pub identity: SpiffeId,
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
        policies: Vec<file::PolicySpec>,
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
        Self {
            node,
            workloads,
            nodes,
            policies,
            services,
            by_ip,
            services_by_ip,
            by_key,
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

    /// Whether `source` may connect to `destination`: if a policy governs the
    /// destination, `source` must be allowed by one; otherwise any identity
    /// of the trust domain may.
    pub fn authorize(&self, source: &SpiffeId, destination: &Workload) -> Result<(), PolicyDenied> {
        let governing: Vec<&file::PolicySpec> = self
            .policies
            .iter()
            .filter(|p| p.applies_to(&destination.namespace, &destination.service_account))
            .collect();
        if governing.is_empty() || governing.iter().any(|p| p.allows(source)) {
            return Ok(());
        }
        Err(PolicyDenied {
            destination: format!("{}/{}", destination.namespace, destination.service_account),
            allowed: governing.iter().flat_map(|p| p.allow.clone()).collect(),
            identity: source.clone(),
        })
    }

    /// Builds the table `node` sees from a checked workload file.
    pub fn from_file(file: &file::WorkloadFile, node: &str) -> Self {
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
            file.policies.clone(),
        )
    }

    /// The workload that owns `ip` (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
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
        WorkloadTable::from_file(&file::WorkloadFile::parse(text, None).unwrap(), "n1")
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
    fn policies_govern_the_destinations_they_name() {
        let mut table = table();
        table.policies = vec![file::PolicySpec {
            namespace: "shop".to_owned(),
            service_account: Some("c".to_owned()),
            allow: vec![
                "spiffe://cluster.local/ns/shop/sa/a".to_owned(),
                "spiffe://cluster.local/ns/ops/sa/*".to_owned(),
            ],
        }];
        let c = table.by_ip("198.18.2.2".parse().unwrap()).unwrap().clone();
        let a = table.by_ip("198.18.1.2".parse().unwrap()).unwrap().clone();
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        assert!(
            table
                .authorize(&id("spiffe://cluster.local/ns/shop/sa/a"), &c)
                .is_ok()
        );
        assert!(
            table
                .authorize(&id("spiffe://cluster.local/ns/ops/sa/any"), &c)
                .is_ok()
        );
        let denied = table
            .authorize(&id("spiffe://cluster.local/ns/shop/sa/b"), &c)
            .unwrap_err()
            .to_string();
        assert!(denied.contains("policy for shop/c"), "{denied}");
        // No policy names shop/a: anyone of the trust domain may connect.
        assert!(
            table
                .authorize(&id("spiffe://cluster.local/ns/shop/sa/b"), &a)
                .is_ok()
        );
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
