//! The workload file: the facts a Kubernetes API server would give the agent,
//! written down as YAML. It runs Ferry without a cluster (the demo, the tests,
//! VMs and bare hosts); one file can describe every node, so the same file
//! serves every agent (each picks its own node by name) and the CA.
//!
//! ```yaml
//! nodes:
//!   - name: n1
//!     addresses: [198.19.0.1, "2001:2:0:ff::1"]
//! namespaces:
//!   - name: shop
//!     labels: { ferry.dev/mesh: enabled }
//! pods:
//!   - name: web-0
//!     namespace: shop
//!     serviceAccount: web
//!     node: n1
//!     ips: [198.18.1.2, "2001:2:0:1::2"]
//!     cgroup: /sys/fs/cgroup/kubepods/pod1234   # required for pods on the agent's node
//!     excludedPorts: [22]
//!     labels: { app: web }
//! policies:                   # AuthorizationPolicy objects: name, namespace, spec
//!   - name: web-clients
//!     namespace: shop
//!     spec: { selector: { matchLabels: { app: web } }, from: [{ namespace: shop }] }
//! ```

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{is_dns_label, is_dns_subdomain, policy::AuthorizationPolicySpec};

/// The namespace label that opts a namespace's pods into the mesh.
pub const MESH_LABEL: &str = "ferry.dev/mesh";
/// The value of [`MESH_LABEL`] that means "meshed".
pub const MESH_ENABLED: &str = "enabled";
/// The namespace annotation that sets the inbound mode of its meshed pods:
/// `strict` (plaintext from off the node refused) or `permissive` (default).
pub const INBOUND_MODE_ANNOTATION: &str = "ferry.dev/inbound";
pub const INBOUND_STRICT: &str = "strict";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadFile {
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    /// Services: virtual IPs the agent resolves to one of their endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
    /// Who may connect to whom: `AuthorizationPolicy` objects (see
    /// [`crate::policy`]); a destination no policy selects gets its
    /// namespace's default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicySpec>,
}

/// A Service: ClusterIPs whose ports lead to the same port (or a target
/// port) on one of the endpoint pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    /// At most one per family.
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Names of the endpoint pods, in the Service's namespace.
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    /// The pods' port; the same as `port` if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}

/// An `AuthorizationPolicy` as the workload file writes it: the object's
/// name and namespace, and the same `spec` as the custom resource's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    pub name: String,
    pub namespace: String,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSpec {
    pub name: String,
    /// The node's addresses, at most one per family: where its agent listens.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    /// The pod's addresses, at most one per family.
    pub ips: Vec<IpAddr>,
    /// The pod's cgroup v2 directory; required for pods on the agent's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Destination ports this pod reaches around the agent (not captured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_ports: Vec<u16>,
    /// The pod's labels, which policies select it by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl WorkloadFile {
    /// Reads and checks `path`. `local_node`, when given, must be one of the
    /// file's nodes, and the cgroups of its pods must exist.
    pub fn load(path: &Path, local_node: Option<&str>) -> Result<Self, WorkloadFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| WorkloadFileError {
            file: path.to_owned(),
            problems: vec![format!("cannot read: {e}")],
        })?;
        Self::parse(&text, local_node).map_err(|problems| WorkloadFileError {
            file: path.to_owned(),
            problems,
        })
    }

    /// Parses and checks YAML text; every problem found is reported, not just the first.
    pub fn parse(text: &str, local_node: Option<&str>) -> Result<Self, Vec<String>> {
        let file: Self = serde_yaml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let problems = file.problems(local_node);
        if problems.is_empty() {
            Ok(file)
        } else {
            Err(problems)
        }
    }

    /// Whether meshed pods of `namespace` refuse plaintext from off the node.
    pub fn is_strict(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|ns| {
            ns.name == namespace
                && ns
                    .annotations
                    .get(INBOUND_MODE_ANNOTATION)
                    .is_some_and(|v| v == INBOUND_STRICT)
        })
    }

    /// Whether pods of `namespace` are meshed.
    pub fn is_meshed(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|ns| {
            ns.name == namespace && ns.labels.get(MESH_LABEL).is_some_and(|v| v == MESH_ENABLED)
        })
    }

    fn problems(&self, local_node: Option<&str>) -> Vec<String> {
        let mut problems = Vec::new();
        let mut node_names = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let at = format!("nodes[{i}] ({})", node.name);
            if !is_dns_label(&node.name) {
                problems.push(format!(
                    "{at}.name: {:?} is not a valid node name",
                    node.name
                ));
            }
            if !node_names.insert(node.name.as_str()) {
                problems.push(format!("{at}.name: node {:?} is listed twice", node.name));
            }
            check_one_per_family(&node.addresses, &format!("{at}.addresses"), &mut problems);
        }
        if let Some(local) = local_node
            && !node_names.contains(local)
        {
            problems.push(format!("nodes: this agent's node {local:?} is not listed"));
        }
        let mut namespaces = HashSet::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            if !is_dns_label(&ns.name) {
                problems.push(format!(
                    "namespaces[{i}].name: {:?} is not a valid namespace name",
                    ns.name
                ));
            }
            if !namespaces.insert(ns.name.as_str()) {
                problems.push(format!(
                    "namespaces[{i}].name: namespace {:?} is listed twice",
                    ns.name
                ));
            }
        }
        for (i, ns) in self.namespaces.iter().enumerate() {
            if let Some(mode) = ns.annotations.get(INBOUND_MODE_ANNOTATION)
                && mode != INBOUND_STRICT
                && mode != "permissive"
            {
                problems.push(format!(
                    "namespaces[{i}].annotations.{INBOUND_MODE_ANNOTATION}: {mode:?} is neither \"strict\" nor \"permissive\""
                ));
            }
        }
        let mut service_ips: HashMap<IpAddr, String> = HashMap::new();
        for (i, service) in self.services.iter().enumerate() {
            let id = format!("{}/{}", service.namespace, service.name);
            let at = format!("services[{i}] ({id})");
            if !is_dns_label(&service.name) || !is_dns_label(&service.namespace) {
                problems.push(format!("{at}: name and namespace must be DNS labels"));
            }
            if service.cluster_ips.is_empty() {
                problems.push(format!(
                    "{at}.clusterIPs: a Service needs at least one ClusterIP"
                ));
            }
            check_one_per_family(
                &service.cluster_ips,
                &format!("{at}.clusterIPs"),
                &mut problems,
            );
            for ip in &service.cluster_ips {
                if let Some(other) = service_ips.insert(*ip, id.clone()) {
                    problems.push(format!(
                        "{at}.clusterIPs: {ip} is also the ClusterIP of {other}"
                    ));
                }
            }
            if service.ports.is_empty() {
                problems.push(format!("{at}.ports: a Service needs at least one port"));
            }
            for (j, port) in service.ports.iter().enumerate() {
                if port.port == 0 || port.target_port == Some(0) {
                    problems.push(format!("{at}.ports[{j}]: 0 is not a port"));
                }
            }
            for (j, endpoint) in service.endpoints.iter().enumerate() {
                if !self
                    .pods
                    .iter()
                    .any(|p| p.namespace == service.namespace && &p.name == endpoint)
                {
                    problems.push(format!(
                        "{at}.endpoints[{j}]: no pod {}/{endpoint} in pods",
                        service.namespace
                    ));
                }
            }
        }
        let mut policy_names = HashSet::new();
        for (i, policy) in self.policies.iter().enumerate() {
            let at = format!("policies[{i}] ({}/{})", policy.namespace, policy.name);
            if !is_dns_label(&policy.namespace) {
                problems.push(format!(
                    "{at}.namespace: {:?} is not a valid namespace name",
                    policy.namespace
                ));
            }
            if !is_dns_subdomain(&policy.name) {
                problems.push(format!(
                    "{at}.name: {:?} is not a valid object name",
                    policy.name
                ));
            }
            if !policy_names.insert((&policy.namespace, &policy.name)) {
                problems.push(format!("{at}: listed twice"));
            }
        }
        let mut pod_names = HashSet::new();
        let mut pod_ips: HashMap<IpAddr, String> = HashMap::new();
        for (i, pod) in self.pods.iter().enumerate() {
            let id = format!("{}/{}", pod.namespace, pod.name);
            let at = format!("pods[{i}] ({id})");
            for (field, value) in [
                ("name", &pod.name),
                ("namespace", &pod.namespace),
                ("serviceAccount", &pod.service_account),
            ] {
                if !is_dns_subdomain(value) {
                    problems.push(format!(
                        "{at}.{field}: {value:?} is not a valid Kubernetes name"
                    ));
                }
            }
            if !pod_names.insert(id.clone()) {
                problems.push(format!("{at}: pod {id} is listed twice"));
            }
            if !node_names.contains(pod.node.as_str()) {
                problems.push(format!(
                    "{at}.node: node {:?} is not listed under nodes",
                    pod.node
                ));
            }
            if pod.ips.is_empty() {
                problems.push(format!("{at}.ips: a pod needs at least one IP"));
            }
            check_one_per_family(&pod.ips, &format!("{at}.ips"), &mut problems);
            for ip in &pod.ips {
                if let Some(other) = pod_ips.insert(*ip, id.clone()) {
                    problems.push(format!("{at}.ips: {ip} is also the IP of pod {other}"));
                }
            }
            if pod.excluded_ports.contains(&0) {
                problems.push(format!("{at}.excludedPorts: 0 is not a port"));
            }
            if local_node == Some(pod.node.as_str()) {
                match &pod.cgroup {
                    None => problems.push(format!(
                        "{at}.cgroup: missing; pods on this agent's node ({}) need their cgroup v2 directory",
                        pod.node
                    )),
                    Some(dir) if !dir.is_absolute() => {
                        problems.push(format!("{at}.cgroup: {} is not an absolute path", dir.display()))
                    }
                    Some(dir) if !dir.join("cgroup.procs").is_file() => problems.push(format!(
                        "{at}.cgroup: {} does not exist or is not a cgroup directory",
                        dir.display()
                    )),
                    Some(_) => {}
                }
            }
        }
        problems
    }
}

fn check_one_per_family(ips: &[IpAddr], at: &str, problems: &mut Vec<String>) {
    if ips.iter().filter(|ip| ip.is_ipv4()).count() > 1
        || ips.iter().filter(|ip| ip.is_ipv6()).count() > 1
    {
        problems.push(format!("{at}: at most one IPv4 and one IPv6 address"));
    }
    for ip in ips {
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            problems.push(format!("{at}: {ip} cannot be a workload address"));
        }
    }
}

/// A workload file that cannot be used, with every problem found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadFileError {
    pub file: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for WorkloadFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "workload file {} is invalid:", self.file.display())?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for WorkloadFileError {}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "
nodes:
  - name: n1
    addresses: [198.19.0.1, \"2001:2:0:ff::1\"]
  - name: n2
    addresses: [198.19.0.2]
namespaces:
  - name: shop
    labels: { ferry.dev/mesh: enabled }
  - name: legacy
pods:
  - name: web-0
    namespace: shop
    serviceAccount: web
    node: n2
    ips: [198.18.2.2]
  - name: db-0
    namespace: legacy
    serviceAccount: db
    node: n2
    ips: [198.18.2.3]
    excludedPorts: [5432]
";

    #[test]
    fn parses_a_valid_file() {
        let file = WorkloadFile::parse(VALID, Some("n1")).unwrap();
        assert_eq!(file.pods.len(), 2);
        assert!(file.is_meshed("shop"));
        assert!(!file.is_meshed("legacy"));
        assert!(!file.is_meshed("absent"));
        assert_eq!(file.pods[1].excluded_ports, vec![5432]);
    }

    #[test]
    fn round_trips_through_yaml() {
        let file = WorkloadFile::parse(VALID, None).unwrap();
        let text = serde_yaml::to_string(&file).unwrap();
        assert_eq!(WorkloadFile::parse(&text, None).unwrap(), file);
    }

    fn problems(text: &str) -> String {
        WorkloadFile::parse(text, Some("n1"))
            .unwrap_err()
            .join("\n")
    }

    #[test]
    fn unknown_field_names_the_field_and_line() {
        let text = VALID.replace("    excludedPorts: [5432]", "    excludedPort: [5432]");
        let msg = problems(&text);
        assert!(msg.contains("unknown field `excludedPort`"), "{msg}");
        assert!(msg.contains("pods[1]"), "{msg}");
        assert!(msg.contains("line 22"), "{msg}");
    }

    #[test]
    fn missing_service_account_is_named() {
        let text = VALID.replace("    serviceAccount: web\n", "");
        let msg = problems(&text);
        assert!(
            msg.contains("pods[0]: missing field `serviceAccount`"),
            "{msg}"
        );
        assert!(msg.contains("line 12"), "{msg}");
    }

    #[test]
    fn invalid_ip_is_named() {
        let text = VALID.replace("198.18.2.3", "198.18.2.300");
        let msg = problems(&text);
        assert!(msg.contains("pods[1].ips[0]"), "{msg}");
        assert!(msg.contains("invalid IP address"), "{msg}");
    }

    #[test]
    fn local_pod_needs_an_existing_cgroup() {
        let text = VALID.replace(
            "node: n2\n    ips: [198.18.2.2]",
            "node: n1\n    ips: [198.18.2.2]",
        );
        assert!(problems(&text).contains("pods[0] (shop/web-0).cgroup: missing"));
        let text = text.replace(
            "ips: [198.18.2.2]",
            "ips: [198.18.2.2]\n    cgroup: /sys/fs/cgroup/no/such/ferry/pod",
        );
        let msg = problems(&text);
        assert!(
            msg.contains(
                "pods[0] (shop/web-0).cgroup: /sys/fs/cgroup/no/such/ferry/pod does not exist"
            ),
            "{msg}"
        );
    }

    #[test]
    fn reports_every_semantic_problem_together() {
        let text = VALID
            .replace(
                "node: n2\n    ips: [198.18.2.2]",
                "node: n9\n    ips: [198.18.2.3]",
            )
            .replace("name: db-0", "name: Db_0");
        let msg = problems(&text);
        assert!(msg.contains("node \"n9\" is not listed"), "{msg}");
        assert!(
            msg.contains("198.18.2.3 is also the IP of pod shop/web-0"),
            "{msg}"
        );
        assert!(
            msg.contains("\"Db_0\" is not a valid Kubernetes name"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_local_node_is_refused() {
        let msg = WorkloadFile::parse(VALID, Some("n7"))
            .unwrap_err()
            .join("\n");
        assert!(
            msg.contains("this agent's node \"n7\" is not listed"),
            "{msg}"
        );
    }
}
