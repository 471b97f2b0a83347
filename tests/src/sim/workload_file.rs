//! The workload file the agents (and the CA) read: every node, namespace
//! and pod of the cluster as it stands, plus what a test sets beyond them
//! (authorization policies, Services, strict namespaces). Checked by the
//! agent's own parser before it is written, and replaced atomically.

use std::{collections::BTreeMap, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use ferry_agent::workload::file::{
    INBOUND_MODE_ANNOTATION, INBOUND_STRICT, MESH_ENABLED, MESH_LABEL, NamespaceSpec, NodeSpec,
    PodSpec, PolicySpec, ServiceSpec, WorkloadFile,
};

use super::{Cluster, Pod};

/// What a test sets in the workload file beyond nodes and pods.
#[derive(Debug, Default)]
pub(super) struct Settings {
    /// Authorization policies written into the workload file.
    policies: Vec<PolicySpec>,
    /// Services written into the workload file.
    services: Vec<ServiceSpec>,
    /// Namespaces annotated `ferry.dev/inbound: strict`.
    strict_namespaces: Vec<String>,
}

/// An `AuthorizationPolicy` named `namespace/name`, its spec written as in
/// a manifest (YAML), e.g. `{ selector: { matchLabels: { app: db } }, from: [{ serviceAccount: shop/web }] }`.
pub fn policy(namespace: &str, name: &str, spec: &str) -> anyhow::Result<PolicySpec> {
    Ok(PolicySpec {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        spec: serde_yaml::from_str(spec)
            .with_context(|| format!("policy {namespace}/{name}: not a policy spec: {spec}"))?,
    })
}

impl Cluster {
    /// Sets the authorization policies of the workload file (written by the
    /// next [`write_workloads`](Self::write_workloads)).
    pub fn set_policies(&mut self, policies: Vec<PolicySpec>) {
        self.settings.policies = policies;
    }

    /// Puts `namespace` in strict mode (written by the next
    /// [`write_workloads`](Self::write_workloads)).
    pub fn set_strict(&mut self, namespace: &str) {
        self.settings.strict_namespaces.push(namespace.to_owned());
    }

    /// Sets the Services of the workload file (written by the next
    /// [`write_workloads`](Self::write_workloads)).
    pub fn set_services(&mut self, services: Vec<ServiceSpec>) {
        self.settings.services = services;
    }

    /// Writes the workload file (YAML) describing all nodes, namespaces and
    /// pods, and returns its path. The file is replaced atomically (rename),
    /// so a watching agent never reads half of it.
    pub fn write_workloads(&self) -> anyhow::Result<PathBuf> {
        let text = self.workload_file(None)?;
        let path = self.workloads_path();
        let partial = self.tempdir().join("workloads.yaml.partial");
        fs::write(&partial, text).with_context(|| format!("cannot write {}", partial.display()))?;
        fs::rename(&partial, &path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(path)
    }

    /// Where [`write_workloads`](Self::write_workloads) writes.
    pub fn workloads_path(&self) -> PathBuf {
        self.tempdir().join("workloads.yaml")
    }

    /// The workload file of the cluster as it is (plus `extra`), checked by
    /// the agent's own parser.
    pub(super) fn workload_file(&self, extra: Option<&Pod>) -> anyhow::Result<String> {
        let pods: Vec<&Pod> = self.pods.iter().chain(extra).collect();
        let mut namespaces: BTreeMap<&str, bool> = BTreeMap::new();
        for pod in &pods {
            namespaces.insert(&pod.namespace, pod.meshed);
        }
        let settings = &self.settings;
        let file = WorkloadFile {
            policies: settings.policies.clone(),
            services: settings.services.clone(),
            nodes: self
                .nodes
                .iter()
                .map(|node| NodeSpec {
                    name: node.name.clone(),
                    addresses: vec![node.ipv4.into(), node.ipv6.into()],
                })
                .collect(),
            namespaces: namespaces
                .into_iter()
                .map(|(name, meshed)| NamespaceSpec {
                    annotations: if settings.strict_namespaces.iter().any(|s| s == name) {
                        BTreeMap::from([(
                            INBOUND_MODE_ANNOTATION.to_owned(),
                            INBOUND_STRICT.to_owned(),
                        )])
                    } else {
                        BTreeMap::new()
                    },
                    name: name.to_owned(),
                    labels: if meshed {
                        BTreeMap::from([(MESH_LABEL.to_owned(), MESH_ENABLED.to_owned())])
                    } else {
                        BTreeMap::new()
                    },
                })
                .collect(),
            pods: pods
                .iter()
                .map(|pod| PodSpec {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account.clone(),
                    node: self.nodes[pod.node.0].name.clone(),
                    ips: vec![pod.ipv4.into(), pod.ipv6.into()],
                    cgroup: Some(pod.cgroup.clone()),
                    excluded_ports: pod.excluded_ports.clone(),
                    labels: pod.labels.clone(),
                })
                .collect(),
        };
        let text = serde_yaml::to_string(&file).context("cannot write the workload file")?;
        WorkloadFile::parse(&text, None).map_err(|problems| {
            anyhow!(
                "the workload file would be invalid:\n  - {}",
                problems.join("\n  - ")
            )
        })?;
        Ok(text)
    }
}
