//! The workloads as the Kubernetes API knows them: namespaces (the mesh label,
//! the inbound mode and default policy annotations), pods cluster-wide,
//! Services, EndpointSlices and `AuthorizationPolicy` objects, each kept by a
//! kube-rs reflector. Any change wakes one loop that rebuilds the
//! [`WorkloadTable`] from the five stores and publishes it if it differs, so
//! every event, re-list and reconnect converges on the same answer the API
//! server gives.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    hash::Hash,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ferry_proto::{
    Untrusted,
    policy::{AuthorizationPolicy, DEFAULT_POLICY_ANNOTATION},
};
use futures_util::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service as KubeService},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use super::{
    LocalNode, PolicyFacts, PolicySettings, Service, Workload, WorkloadTable,
    file::{
        INBOUND_MODE_ANNOTATION, INBOUND_STRICT, MESH_ENABLED, MESH_LABEL, PolicySpec, ServicePort,
    },
    pod_cgroups::PodCgroups,
};

/// How long the agent waits for the first full list of every kind.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Changes that arrive together (a re-list, a rollout) make one new table.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often the pod cgroups not yet made by kubelet are looked for again.
const CGROUP_RESCAN: Duration = Duration::from_secs(1);
/// A pod annotation: destination ports its connections reach without the agent.
pub const EXCLUDED_PORTS_ANNOTATION: &str = "ferry.dev/excluded-ports";
/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub struct KubeSource {
    node: LocalNode,
    settings: PolicySettings,
    cgroups: PodCgroups,
    stores: Stores,
    changed: Arc<Notify>,
}

#[derive(Clone)]
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<KubeService>,
    slices: Store<EndpointSlice>,
    policies: Store<AuthorizationPolicy>,
}

/// Every object of the five kinds, as the stores hold them.
pub struct Listed {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<KubeService>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub policies: Vec<Arc<AuthorizationPolicy>>,
}

impl Listed {
    /// Objects as the API server sends them, trimmed as the reflectors keep
    /// them (`keep_*`).
    pub fn kept(
        namespaces: Vec<Namespace>,
        pods: Vec<Pod>,
        services: Vec<KubeService>,
        slices: Vec<EndpointSlice>,
        policies: Vec<AuthorizationPolicy>,
    ) -> Self {
        fn kept<K>(objects: Vec<K>, keep: fn(&mut K)) -> Vec<Arc<K>> {
            objects
                .into_iter()
                .map(|mut object| {
                    keep(&mut object);
                    Arc::new(object)
                })
                .collect()
        }
        Self {
            namespaces: kept(namespaces, keep_namespace),
            pods: kept(pods, keep_pod),
            services: kept(services, keep_service),
            slices: kept(slices, keep_slice),
            policies: kept(policies, keep_policy),
        }
    }
}

impl KubeSource {
    /// Starts the five watches and waits until each has listed once: an agent
    /// that published a table before then would detach pods it simply had not
    /// heard of yet, or admit connections a policy it had not heard of denies.
    pub async fn start(
        client: Client,
        node: LocalNode,
        cgroup_root: PathBuf,
        settings: PolicySettings,
    ) -> anyhow::Result<(Self, WorkloadTable)> {
        let changed = Arc::new(Notify::new());
        let stores = Stores {
            namespaces: reflect(
                Api::all(client.clone()),
                "namespaces",
                keep_namespace,
                &changed,
            ),
            pods: reflect(Api::all(client.clone()), "pods", keep_pod, &changed),
            services: reflect(Api::all(client.clone()), "services", keep_service, &changed),
            slices: reflect(
                Api::all(client.clone()),
                "endpointslices",
                keep_slice,
                &changed,
            ),
            policies: reflect(
                Api::all(client),
                "authorizationpolicies",
                keep_policy,
                &changed,
            ),
        };
        let synced = async {
            stores.namespaces.wait_until_ready().await?;
            stores.pods.wait_until_ready().await?;
            stores.services.wait_until_ready().await?;
            stores.slices.wait_until_ready().await?;
            stores.policies.wait_until_ready().await
        };
        tokio::time::timeout(SYNC_TIMEOUT, synced)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no full list of namespaces, pods, services, endpointslices and \
                     authorizationpolicies.ferry.dev from the Kubernetes API within {SYNC_TIMEOUT:?}; \
                     check that the CRD is installed (daemonset/), the agent's RBAC, and the API server"
                )
            })?
            .map_err(|e| anyhow::anyhow!("a Kubernetes watch ended before its first list: {e}"))?;
        let mut source = Self {
            node,
            settings,
            cgroups: PodCgroups::new(cgroup_root),
            stores,
            changed,
        };
        let table = source.table();
        table.log_policy_problems();
        Ok((source, table))
    }

    /// Publishes a new table whenever what the API server says changes.
    pub async fn watch(mut self, tx: watch::Sender<Arc<WorkloadTable>>) {
        let mut awaiting_cgroups = missing_cgroups(&tx.borrow());
        loop {
            if awaiting_cgroups.is_empty() {
                self.changed.notified().await;
            } else {
                tokio::select! {
                    () = self.changed.notified() => {}
                    () = tokio::time::sleep(CGROUP_RESCAN) => {}
                }
            }
            tokio::time::sleep(DEBOUNCE).await;
            if tx.is_closed() {
                return;
            }
            let table = self.table();
            let missing = missing_cgroups(&table);
            for pod in missing.difference(&awaiting_cgroups) {
                tracing::info!(pod = %Untrusted(pod), root = %self.cgroups.root.display(), "waiting for kubelet to create the pod's cgroup");
            }
            awaiting_cgroups = missing;
            tx.send_if_modified(|current| {
                if **current == table {
                    return false;
                }
                tracing::info!(
                    pods = table.workloads.len(),
                    services = table.services.len(),
                    policies = table.policies.len(),
                    "workloads changed in the Kubernetes API"
                );
                if current.policies != table.policies
                    || current.policy_problems != table.policy_problems
                {
                    table.log_policy_problems();
                }
                *current = Arc::new(table);
                true
            });
        }
    }

    fn table(&mut self) -> WorkloadTable {
        let (node, settings, stores) = (&self.node, &self.settings, &self.stores);
        let listed = Listed {
            namespaces: stores.namespaces.state(),
            pods: stores.pods.state(),
            services: stores.services.state(),
            slices: stores.slices.state(),
            policies: stores.policies.state(),
        };
        self.cgroups
            .rebuild(|find_cgroup| build_table(node, &listed, settings, find_cgroup))
    }
}

/// Meshed pods of this node whose cgroup is not there (yet).
fn missing_cgroups(table: &WorkloadTable) -> BTreeSet<String> {
    table
        .workloads
        .iter()
        .filter(|w| w.meshed && w.node == table.node.name && w.cgroup.is_none())
        .map(|w| w.key())
        .collect()
}

/// A reflector for one kind, stripped to what the table reads, waking
/// `changed` on every event. The watch re-lists after `410 Gone` and
/// reconnects with backoff when the API server goes away.
fn reflect<K>(api: Api<K>, kind: &'static str, keep: fn(&mut K), changed: &Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .modify(keep)
        .default_backoff()
        .reflect(writer);
    let changed = Arc::clone(changed);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(error) => {
                    tracing::warn!(kind, error = %Untrusted(&error), "Kubernetes watch interrupted; resuming with backoff")
                }
            }
        }
    });
    store
}

// What each kind keeps in memory: the fields `build_table` reads.

fn keep_namespace(ns: &mut Namespace) {
    ns.metadata.managed_fields = None;
    ns.spec = None;
    ns.status = None;
    if let Some(annotations) = &mut ns.metadata.annotations {
        annotations.retain(|k, _| k == INBOUND_MODE_ANNOTATION || k == DEFAULT_POLICY_ANNOTATION);
    }
}

fn keep_policy(policy: &mut AuthorizationPolicy) {
    policy.metadata.managed_fields = None;
    policy.metadata.annotations = None;
}

fn keep_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.owner_references = None;
    if let Some(annotations) = &mut pod.metadata.annotations {
        annotations.retain(|k, _| k.starts_with("ferry.dev/"));
    }
    if let Some(spec) = &mut pod.spec {
        spec.containers.clear();
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
    }
    if let Some(status) = &mut pod.status {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
    }
}

fn keep_service(service: &mut KubeService) {
    service.metadata.managed_fields = None;
    service.metadata.annotations = None;
    service.status = None;
}

fn keep_slice(slice: &mut EndpointSlice) {
    slice.metadata.managed_fields = None;
    slice.metadata.annotations = None;
}

/// The table `node` sees, from the five kinds as listed: pure, so every
/// rule below is tested (and fuzzed) without an API server.
pub fn build_table(
    node: &LocalNode,
    listed: &Listed,
    settings: &PolicySettings,
    mut find_cgroup: impl FnMut(&str) -> Option<PathBuf>,
) -> WorkloadTable {
    let Listed {
        namespaces,
        pods,
        services,
        slices,
        policies,
    } = listed;
    let mode: HashMap<&str, (bool, bool)> = namespaces
        .iter()
        .filter_map(|ns| {
            let meta = &ns.metadata;
            let has = |map: &Option<BTreeMap<String, String>>, key: &str, value: &str| {
                map.as_ref()
                    .and_then(|m| m.get(key))
                    .is_some_and(|v| v == value)
            };
            let meshed = has(&meta.labels, MESH_LABEL, MESH_ENABLED);
            let strict = has(&meta.annotations, INBOUND_MODE_ANNOTATION, INBOUND_STRICT);
            Some((meta.name.as_deref()?, (meshed, strict)))
        })
        .collect();

    // Going-away pods first, then oldest first: where a new pod got an old
    // pod's address, the new one owns it in the table.
    let mut running: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_running(p)).collect();
    running.sort_by_key(|p| {
        (
            p.metadata.deletion_timestamp.is_none(),
            p.metadata.creation_timestamp.clone(),
        )
    });
    let mut nodes: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let workloads: Vec<Workload> = running
        .into_iter()
        .filter_map(|pod| {
            let meta = &pod.metadata;
            let spec = pod.spec.as_ref()?;
            let status = pod.status.as_ref()?;
            let namespace = meta.namespace.clone()?;
            let pod_node = spec.node_name.clone()?;
            let ips = status_ips(
                status.pod_ips.iter().flatten().map(|i| i.ip.as_str()),
                status.pod_ip.as_deref(),
            );
            if ips.is_empty() {
                return None;
            }
            let host_ips = status_ips(
                status.host_ips.iter().flatten().map(|i| i.ip.as_str()),
                status.host_ip.as_deref(),
            );
            if !host_ips.is_empty() {
                nodes.entry(pod_node.clone()).or_insert(host_ips);
            }
            let (meshed, strict) = mode.get(namespace.as_str()).copied().unwrap_or_default();
            let cgroup = if meshed && pod_node == node.name {
                meta.uid.as_deref().and_then(&mut find_cgroup)
            } else {
                None
            };
            Some(Workload {
                name: meta.name.clone()?,
                namespace,
                service_account: spec
                    .service_account_name
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
                node: pod_node,
                ips,
                meshed,
                cgroup,
                excluded_ports: excluded_ports(pod),
                strict,
                labels: meta.labels.clone().unwrap_or_default(),
            })
        })
        .collect();

    // Each Service's slices, found in one pass over the slices.
    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let meta = &slice.metadata;
        let service = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let (Some(namespace), Some(service)) = (meta.namespace.as_deref(), service) {
            slices_of
                .entry((namespace, service.as_str()))
                .or_default()
                .push(slice);
        }
    }
    let services = services
        .iter()
        .filter_map(|service| {
            let meta = &service.metadata;
            let key = (meta.namespace.as_deref()?, meta.name.as_deref()?);
            resolve_service(service, slices_of.get(&key).map_or(&[], Vec::as_slice))
        })
        .collect();
    let mut problems = Vec::new();
    let namespace_defaults = namespaces
        .iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.as_deref()?;
            let annotation = ns
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DEFAULT_POLICY_ANNOTATION));
            let default =
                settings.namespace_default(name, annotation.map(String::as_str), &mut problems);
            Some((name.to_owned(), default))
        })
        .collect();
    let mut policies: Vec<PolicySpec> = policies
        .iter()
        .filter_map(|policy| {
            Some(PolicySpec {
                name: policy.metadata.name.clone()?,
                namespace: policy.metadata.namespace.clone()?,
                spec: policy.spec.clone(),
            })
        })
        .collect();
    // The stores' order is not the API server's; a table compares equal
    // only if its policies are in one order.
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let facts = PolicyFacts {
        policies,
        namespace_defaults,
        problems,
    };
    WorkloadTable::new(node.clone(), nodes, workloads, services, facts, settings)
}

/// Pods with addresses that can still take connections; host-network pods
/// are the node itself, not workloads of the mesh.
fn is_running(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    !host_network && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// Parses the addresses of a status list (`podIPs`, `hostIPs`), or of the
/// single legacy field when the list is absent.
fn status_ips<'a>(list: impl Iterator<Item = &'a str>, single: Option<&str>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = list.filter_map(|ip| ip.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(single.and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    ips
}

fn excluded_ports(pod: &Pod) -> Vec<u16> {
    let Some(text) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXCLUDED_PORTS_ANNOTATION))
    else {
        return Vec::new();
    };
    // As the workload file: a port is 1-65535, so `0` is refused like `nope`.
    text.split(',')
        .filter_map(|item| match item.trim().parse::<u16>() {
            Ok(port) if port != 0 => Some(port),
            _ => {
                tracing::warn!(
                    pod = ?pod.metadata.name,
                    annotation = EXCLUDED_PORTS_ANNOTATION,
                    value = %Untrusted(text),
                    "ignoring an item that is not a port (1-65535)"
                );
                None
            }
        })
        .collect()
}

/// A Service with a ClusterIP, its TCP ports mapped to the pods' port
/// numbers (a named `targetPort` is resolved through the EndpointSlices),
/// and its ready endpoint pods; `own` are the Service's EndpointSlices.
fn resolve_service(service: &KubeService, own: &[&EndpointSlice]) -> Option<Service> {
    let name = service.metadata.name.clone()?;
    let namespace = service.metadata.namespace.clone()?;
    let spec = service.spec.as_ref()?;
    let cluster_ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if cluster_ips.is_empty() {
        return None;
    }
    let slice_port = |port_name: Option<&str>| {
        own.iter()
            .flat_map(|slice| slice.ports.iter().flatten())
            .find(|p| p.name.as_deref().unwrap_or("") == port_name.unwrap_or(""))
            .and_then(|p| u16::try_from(p.port?).ok())
    };
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target_port = match &p.target_port {
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                Some(IntOrString::String(_)) => Some(slice_port(p.name.as_deref())?),
                None => None,
            };
            Some(ServicePort { port, target_port })
        })
        .collect();
    let endpoints = own
        .iter()
        .flat_map(|slice| slice.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| {
            let pod = e.target_ref.as_ref()?;
            (pod.kind.as_deref() == Some("Pod")).then_some(())?;
            let pod_namespace = pod.namespace.as_deref().unwrap_or(&namespace);
            Some(format!("{pod_namespace}/{}", pod.name.as_deref()?))
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    Some(Service {
        name,
        namespace,
        cluster_ips,
        ports,
        endpoints,
    })
}

/// A client from `kubeconfig`, or the in-cluster credentials (or `$KUBECONFIG`).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{HostIP, ObjectReference, PodIP, PodSpec, PodStatus, ServiceSpec},
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
        },
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
        jiff::Timestamp,
    };

    use super::*;

    fn namespace(name: &str, meshed: bool, strict: bool) -> Arc<Namespace> {
        let mut meta = ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        if meshed {
            meta.labels = Some(BTreeMap::from([(MESH_LABEL.into(), MESH_ENABLED.into())]));
        }
        if strict {
            meta.annotations = Some(BTreeMap::from([(
                INBOUND_MODE_ANNOTATION.into(),
                INBOUND_STRICT.into(),
            )]));
        }
        Arc::new(Namespace {
            metadata: meta,
            ..Default::default()
        })
    }

    fn pod(ns: &str, name: &str, node: &str, ip: &str, created: i64) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                uid: Some(format!("uid-{name}")),
                creation_timestamp: Some(Time(Timestamp::from_second(created).unwrap())),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_owned()),
                service_account_name: Some(format!("sa-{name}")),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".to_owned()),
                pod_ips: Some(vec![PodIP { ip: ip.to_owned() }]),
                host_ips: Some(vec![HostIP {
                    ip: format!("198.19.0.{}", &node[1..]),
                }]),
                ..Default::default()
            }),
        }
    }

    fn node() -> LocalNode {
        LocalNode {
            name: "n1".to_owned(),
            addresses: vec!["198.19.0.1".parse().unwrap()],
        }
    }

    fn table(namespaces: &[Arc<Namespace>], pods: Vec<Pod>) -> WorkloadTable {
        let listed = Listed {
            namespaces: namespaces.to_vec(),
            pods: pods.into_iter().map(Arc::new).collect(),
            services: Vec::new(),
            slices: Vec::new(),
            policies: Vec::new(),
        };
        let settings = PolicySettings {
            trust_domain: "cluster.local".to_owned(),
            cluster_default: ferry_proto::policy::DefaultPolicy::AllUnauthenticated,
        };
        build_table(&node(), &listed, &settings, |uid| {
            Some(PathBuf::from(format!("/cg/{uid}")))
        })
    }

    #[test]
    fn meshed_namespaces_and_this_node_decide_capture() {
        let namespaces = [
            namespace("shop", true, true),
            namespace("legacy", false, false),
        ];
        let table = table(
            &namespaces,
            vec![
                pod("shop", "web", "n1", "198.18.1.2", 1),
                pod("shop", "db", "n2", "198.18.2.2", 1),
                pod("legacy", "old", "n1", "198.18.1.3", 1),
            ],
        );
        let local: Vec<_> = table.local_meshed().map(|w| w.key()).collect();
        assert_eq!(local, ["shop/web"]);
        let web = table.by_ip("198.18.1.2".parse().unwrap()).unwrap();
        assert!(web.strict && web.meshed);
        assert_eq!(web.service_account, "sa-web");
        assert_eq!(web.cgroup, Some(PathBuf::from("/cg/uid-web")));
        let db = table.by_ip("198.18.2.2".parse().unwrap()).unwrap();
        assert_eq!(db.cgroup, None, "a pod of another node has no cgroup here");
        assert_eq!(
            table.node_address("n2", "198.18.2.2".parse().unwrap()),
            Some("198.19.0.2".parse().unwrap()),
            "other nodes' agents are found from their pods' host IPs"
        );
        assert!(!table.by_ip("198.18.1.3".parse().unwrap()).unwrap().meshed);
    }

    #[test]
    fn finished_pods_and_host_network_pods_are_not_workloads() {
        let namespaces = [namespace("shop", true, false)];
        let mut done = pod("shop", "job", "n1", "198.18.1.4", 1);
        done.status.as_mut().unwrap().phase = Some("Succeeded".to_owned());
        let mut host = pod("shop", "host", "n1", "198.19.0.1", 1);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut pending = pod("shop", "pending", "n1", "198.18.1.5", 1);
        pending.status.as_mut().unwrap().pod_ips = None;
        let table = table(&namespaces, vec![done, host, pending]);
        assert!(table.workloads.is_empty(), "{:?}", table.workloads);
    }

    #[test]
    fn a_reused_ip_belongs_to_the_pod_that_is_not_going_away() {
        let namespaces = [namespace("shop", true, false)];
        let mut old = pod("shop", "old", "n1", "198.18.1.2", 5);
        old.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(9).unwrap()));
        let new = pod("shop", "new", "n1", "198.18.1.2", 8);
        for pods in [vec![old.clone(), new.clone()], vec![new, old]] {
            let table = table(&namespaces, pods);
            assert_eq!(
                table.by_ip("198.18.1.2".parse().unwrap()).unwrap().name,
                "new"
            );
        }
    }

    #[test]
    fn excluded_ports_come_from_the_pod_annotation() {
        let namespaces = [namespace("shop", true, false)];
        let mut web = pod("shop", "web", "n1", "198.18.1.2", 1);
        web.metadata.annotations = Some(BTreeMap::from([(
            EXCLUDED_PORTS_ANNOTATION.to_owned(),
            "5432, 6379,nope".to_owned(),
        )]));
        let table = table(&namespaces, vec![web]);
        assert_eq!(table.workloads[0].excluded_ports, [5432, 6379]);
    }

    /// Found by the `kube_table` fuzz target: `0` in the annotation was
    /// taken as an excluded port.
    #[test]
    fn an_excluded_port_of_zero_is_not_a_port() {
        let namespaces = [namespace("shop", true, false)];
        let mut api = pod("shop", "api-0", "n1", "198.18.1.2", 1);
        api.metadata.annotations = Some(BTreeMap::from([(
            EXCLUDED_PORTS_ANNOTATION.to_owned(),
            "5432, 6,,:,0,379,nope,65536".to_owned(),
        )]));
        let table = table(&namespaces, vec![api]);
        assert_eq!(table.workloads[0].excluded_ports, [5432, 6, 379]);
    }

    #[test]
    fn services_resolve_named_ports_and_ready_endpoints_through_their_slices() {
        let service = Arc::new(KubeService {
            metadata: ObjectMeta {
                name: Some("db".to_owned()),
                namespace: Some("shop".to_owned()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ips: Some(vec!["198.18.100.1".to_owned()]),
                ports: Some(vec![
                    k8s_openapi::api::core::v1::ServicePort {
                        name: Some("sql".to_owned()),
                        port: 5432,
                        target_port: Some(IntOrString::String("postgres".to_owned())),
                        ..Default::default()
                    },
                    k8s_openapi::api::core::v1::ServicePort {
                        name: Some("http".to_owned()),
                        port: 80,
                        target_port: Some(IntOrString::Int(8080)),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            status: None,
        });
        let endpoint = |pod: &str, ready: bool| Endpoint {
            addresses: vec![],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                ..Default::default()
            }),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".to_owned()),
                name: Some(pod.to_owned()),
                namespace: Some("shop".to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let slice = Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some("db-abc".to_owned()),
                namespace: Some("shop".to_owned()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_owned(),
                    "db".to_owned(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".to_owned(),
            endpoints: vec![endpoint("db-0", true), endpoint("db-1", false)],
            ports: Some(vec![EndpointPort {
                name: Some("sql".to_owned()),
                port: Some(15432),
                ..Default::default()
            }]),
        });
        let resolved = resolve_service(&service, &[&slice]).unwrap();
        assert_eq!(resolved.endpoints, ["shop/db-0"]);
        assert_eq!(resolved.target_port(5432), Some(15432));
        assert_eq!(resolved.target_port(80), Some(8080));
        let headless = KubeService {
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".to_owned()),
                ..Default::default()
            }),
            ..(*service).clone()
        };
        assert!(resolve_service(&headless, &[]).is_none());
    }
}
