//! Simulated Kubernetes nodes built from the running kernel.
//!
//! ```text
//! fabric netns (bridge "fabric")
//!   ├─ veth ── node k netns: "uplink" 198.19.0.k/24, 2001:2:0:ff::k/64 (the node's addresses)
//!   │            bridge "pods" 198.18.k.1/24, 2001:2:0:k::1/64 (pods' gateway)
//!   │              └─ veth "vp<j>" ── pod j netns: "eth0" 198.18.k.(j+1)/24, 2001:2:0:k::(j+1)/64
//!   └─ ...           (each pod is also a cgroup v2 directory holding its processes)
//! ```
//!
//! Every name carries the cluster's id, so tests run in parallel, and
//! dropping the [`Cluster`] removes everything it made, also when a test
//! panics. Addresses come only from 198.18.0.0/15 and 2001:2::/48, and
//! nothing is attached to the machine's own (initial) network namespace.

use std::{
    collections::{BTreeMap, hash_map::RandomState},
    fs,
    hash::{BuildHasher as _, Hasher as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use ferry_agent::workload::file::{
    INBOUND_MODE_ANNOTATION, INBOUND_STRICT, MESH_ENABLED, MESH_LABEL, NamespaceSpec, NodeSpec,
    PodSpec, PolicySpec, ServiceSpec, WorkloadFile,
};

use crate::{
    BPFFS_ROOT, bin_path, cgroup, http,
    netns::{self, ip},
    process::{Placement, Proc, Shared, run_checked},
};

/// How long [`Cluster::start_agent`] waits for `/healthz/ready`.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
const AGENT_READY_POLL: Duration = Duration::from_millis(100);
/// The bridge in the fabric namespace that joins the nodes.
const FABRIC_BRIDGE: &str = "fabric";
/// The node's interface into the fabric; its addresses are the node's.
const UPLINK: &str = "uplink";
/// The bridge in a node that its pods' veths attach to.
const PODS_BRIDGE: &str = "pods";
/// The fabric's own address, on its bridge: where cluster-wide services
/// (the CA) listen, reachable from every node.
pub const FABRIC_SERVICE_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 254);
/// The last octet limits both node and pod numbers.
const MAX_NODES: usize = 254;
const MAX_PODS_PER_NODE: usize = 253;

/// A node of a [`Cluster`]; node k has `NodeId` k - 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId(usize);

/// A pod of a [`Cluster`], in the order pods were added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodId(pub(crate) usize);

/// What a test asks of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOptions {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Whether the pod's namespace carries `ferry.dev/mesh: enabled`; all
    /// pods of one namespace must agree.
    pub meshed: bool,
    /// Destination ports the pod reaches around the agent.
    pub excluded_ports: Vec<u16>,
}

impl PodOptions {
    /// A pod in a meshed namespace.
    pub fn meshed(name: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            meshed: true,
            excluded_ports: Vec::new(),
        }
    }

    /// A pod in a namespace without the mesh label.
    pub fn unmeshed(name: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            meshed: false,
            ..Self::meshed(name, namespace, service_account)
        }
    }

    pub fn excluding_ports(mut self, ports: &[u16]) -> Self {
        self.excluded_ports = ports.to_vec();
        self
    }
}

/// A simulated node: a network namespace on the fabric.
#[derive(Debug, Clone)]
pub struct Node {
    /// `<cluster id>-n<k>`: the agent's `--node` and the workload file's node name.
    pub name: String,
    /// k, from 1.
    pub index: u8,
    pub netns: String,
    /// The node's addresses (on `uplink`), where its agent listens.
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Node {
    /// Where the node's agent pins its maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(&self.name)
    }
}

/// A simulated pod: a network namespace behind its node, plus a cgroup.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: NodeId,
    pub netns: String,
    /// The pod's cgroup v2 directory; its processes run in it.
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub meshed: bool,
    pub excluded_ports: Vec<u16>,
    /// The pod's UID, as the Kubernetes API would give it.
    pub uid: String,
}

/// How kubelet names pod cgroups: with [`Cluster::use_kubelet_cgroups`], pod
/// cgroups are made where kubelet would make them under each node's cgroup
/// root, so the agent's Kubernetes source must find them by pod UID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

impl Pod {
    pub fn addr_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4), port)
    }

    pub fn addr_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ipv6), port)
    }
}

/// A running `ferry-agent` of one node.
pub struct Agent {
    pub proc: Proc,
    pub node: NodeId,
    /// `<BPFFS_ROOT>/<node name>`: where it pins.
    pub pin_dir: PathBuf,
}

impl Agent {
    /// Kills the agent with SIGKILL (no chance to clean up, like a crash or
    /// an OOM kill) and reaps it. Its pins stay.
    pub fn kill9(&mut self) {
        self.proc.kill();
    }
}

/// A set of simulated nodes and pods, removed again on drop.
pub struct Cluster {
    id: String,
    name: String,
    tempdir: PathBuf,
    cgroup_dir: PathBuf,
    fabric: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    /// What to undo, in creation order.
    netns_made: Vec<String>,
    cgroups_made: Vec<PathBuf>,
    procs: Vec<Arc<Shared>>,
    /// Authorization policies written into the workload file.
    policies: Vec<PolicySpec>,
    /// Services written into the workload file.
    services: Vec<ServiceSpec>,
    /// Namespaces annotated `ferry.dev/inbound: strict`.
    strict_namespaces: Vec<String>,
    /// Whether pod cgroups follow kubelet's layout (and which driver's).
    kubelet_cgroups: Option<CgroupDriver>,
}

impl Cluster {
    /// An empty cluster: the fabric namespace and the cluster's cgroup.
    /// `name` is for humans (it appears in logs); the id is unique per call.
    /// Fails (never skips) when the machine cannot run simulated nodes.
    pub fn new(name: &str) -> anyhow::Result<Cluster> {
        let cgroup2 = check_preconditions()?;
        let (id, tempdir) = reserve_id()?;
        let mut cluster = Cluster {
            fabric: format!("{}{id}-fabric", netns::NETNS_PREFIX),
            cgroup_dir: cgroup2.join(cgroup::SUBTREE).join(&id),
            id,
            name: name.to_owned(),
            tempdir,
            nodes: Vec::new(),
            pods: Vec::new(),
            netns_made: Vec::new(),
            cgroups_made: Vec::new(),
            procs: Vec::new(),
            policies: Vec::new(),
            services: Vec::new(),
            strict_namespaces: Vec::new(),
            kubelet_cgroups: None,
        };
        eprintln!(
            "ferry-tests: cluster {} ({name}) in {}",
            cluster.id,
            cluster.tempdir.display()
        );
        cluster.make_fabric()?;
        Ok(cluster)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name given to [`Cluster::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<cgroup2>/ferry-sim/<id>`: the parent of every pod cgroup.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// A directory for the test's files, removed with the cluster.
    pub fn tempdir(&self) -> &Path {
        &self.tempdir
    }

    /// Every network namespace this cluster made.
    pub fn netns_names(&self) -> &[String] {
        &self.netns_made
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    pub fn pod(&self, id: PodId) -> &Pod {
        &self.pods[id.0]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Pods added from now on get their cgroup where kubelet with `driver`
    /// would make it, under [`node_cgroup_root`](Self::node_cgroup_root);
    /// their QoS classes cycle (Guaranteed, Burstable, BestEffort) so every
    /// kubelet path is used.
    pub fn use_kubelet_cgroups(&mut self, driver: CgroupDriver) {
        self.kubelet_cgroups = Some(driver);
    }

    /// What the node's agent sees as the cgroup v2 root, for `--cgroup-root`.
    pub fn node_cgroup_root(&self, node: NodeId) -> PathBuf {
        self.cgroup_dir
            .join(format!("n{}", self.nodes[node.0].index))
    }

    /// Where a pod's cgroup goes: flat under the cluster's directory, or
    /// kubelet's path for its UID.
    fn pod_cgroup(&self, node: NodeId, name: &str, uid: &str, j: u8) -> PathBuf {
        let index = self.nodes[node.0].index;
        let Some(driver) = self.kubelet_cgroups else {
            return self.cgroup_dir.join(format!("n{index}-{name}"));
        };
        let escaped = uid.replace('-', "_");
        let qos = ["", "burstable", "besteffort"][usize::from(j) % 3];
        let relative = match (driver, qos) {
            (CgroupDriver::Systemd, "") => format!("kubepods.slice/kubepods-pod{escaped}.slice"),
            (CgroupDriver::Systemd, qos) => {
                format!("kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{escaped}.slice")
            }
            (CgroupDriver::Cgroupfs, "") => format!("kubepods/pod{uid}"),
            (CgroupDriver::Cgroupfs, qos) => format!("kubepods/{qos}/pod{uid}"),
        };
        self.node_cgroup_root(node).join(relative)
    }

    /// Creates `dir` and whichever of its parents under the cluster's
    /// directory are missing, remembering each for removal.
    fn make_cgroup(&mut self, dir: &Path) -> anyhow::Result<()> {
        let mut missing: Vec<&Path> = dir
            .ancestors()
            .take_while(|d| *d != self.cgroup_dir && !d.exists())
            .collect();
        missing.reverse();
        for d in missing {
            fs::create_dir(d).with_context(|| format!("cannot create cgroup {}", d.display()))?;
            self.cgroups_made.push(d.to_owned());
        }
        Ok(())
    }

    fn make_fabric(&mut self) -> anyhow::Result<()> {
        let parent = self.cgroup_dir.parent().expect("cgroup dir has a parent");
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create cgroup {}", parent.display()))?;
        fs::create_dir(&self.cgroup_dir)
            .with_context(|| format!("cannot create cgroup {}", self.cgroup_dir.display()))?;
        self.cgroups_made.push(self.cgroup_dir.clone());

        let fabric = self.fabric.clone();
        self.add_netns(&fabric)?;
        ip(&[
            "-n",
            &fabric,
            "link",
            "add",
            FABRIC_BRIDGE,
            "type",
            "bridge",
        ])?;
        ip(&["-n", &fabric, "link", "set", FABRIC_BRIDGE, "up"])?;
        ip(&[
            "-n",
            &fabric,
            "addr",
            "add",
            &format!("{FABRIC_SERVICE_V4}/24"),
            "dev",
            FABRIC_BRIDGE,
        ])?;
        Ok(())
    }

    /// Sets the authorization policies of the workload file (written by the
    /// next [`write_workloads`](Self::write_workloads)).
    pub fn set_policies(&mut self, policies: Vec<PolicySpec>) {
        self.policies = policies;
    }

    /// Puts `namespace` in strict mode (written by the next
    /// [`write_workloads`](Self::write_workloads)).
    pub fn set_strict(&mut self, namespace: &str) {
        self.strict_namespaces.push(namespace.to_owned());
    }

    /// Sets the Services of the workload file (written by the next
    /// [`write_workloads`](Self::write_workloads)).
    pub fn set_services(&mut self, services: Vec<ServiceSpec>) {
        self.services = services;
    }

    /// The namespace joining the nodes, where cluster-wide services run.
    pub fn fabric_netns(&self) -> &str {
        &self.fabric
    }

    /// Starts `program` in the fabric namespace (at [`FABRIC_SERVICE_V4`]),
    /// stdout piped; killed with the cluster.
    pub fn spawn_in_fabric(&mut self, program: &Path, args: &[&str]) -> anyhow::Result<Proc> {
        let label = format!("fabric: {}", command_line(program, args));
        let netns = self.fabric.clone();
        self.spawn_placed(label, &netns, program, args)
    }

    /// Starts `program` in `netns` (in no pod cgroup) and kills it with the cluster.
    fn spawn_placed(
        &mut self,
        label: String,
        netns: &str,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<Proc> {
        let placement = Placement {
            netns,
            cgroup: None,
        };
        let (proc, shared) = Proc::spawn(label, &placement, program, args)?;
        self.procs.push(shared);
        Ok(proc)
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.netns_made.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Adds node k (k = 1, 2, ...) on the fabric, routed to every other node.
    pub fn add_node(&mut self) -> anyhow::Result<NodeId> {
        ensure!(self.nodes.len() < MAX_NODES, "at most {MAX_NODES} nodes");
        let k = u8::try_from(self.nodes.len() + 1)?;
        let node = Node {
            name: format!("{}-n{k}", self.id),
            index: k,
            netns: format!("{}{}-n{k}", netns::NETNS_PREFIX, self.id),
            ipv4: Ipv4Addr::new(198, 19, 0, k),
            ipv6: Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, k.into()),
        };
        self.wire_node(&node)
            .with_context(|| format!("cannot build node {} of cluster {}", node.name, self.id))?;
        for other in &self.nodes {
            route_between(&node, other)?;
            route_between(other, &node)?;
        }
        self.nodes.push(node);
        Ok(NodeId(self.nodes.len() - 1))
    }

    fn wire_node(&mut self, node: &Node) -> anyhow::Result<()> {
        let ns = node.netns.as_str();
        let fabric = self.fabric.clone();
        let fabric_port = format!("n{}", node.index);
        self.add_netns(ns)?;
        ip(&[
            "-n",
            ns,
            "link",
            "add",
            UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            &fabric_port,
            "netns",
            &fabric,
        ])?;
        ip(&[
            "-n",
            &fabric,
            "link",
            "set",
            &fabric_port,
            "master",
            FABRIC_BRIDGE,
            "up",
        ])?;
        add_addresses(ns, UPLINK, node.ipv4, node.ipv6)?;
        ip(&["-n", ns, "link", "set", UPLINK, "up"])?;

        let (gateway_v4, gateway_v6) = pod_address(node.index, 1);
        ip(&["-n", ns, "link", "add", PODS_BRIDGE, "type", "bridge"])?;
        add_addresses(ns, PODS_BRIDGE, gateway_v4, gateway_v6)?;
        ip(&["-n", ns, "link", "set", PODS_BRIDGE, "up"])?;
        netns::set_sysctl(ns, "net/ipv4/ip_forward", "1")?;
        netns::set_sysctl(ns, "net/ipv6/conf/all/forwarding", "1")?;
        Ok(())
    }

    /// Adds a pod on `node`: its namespace, veth, addresses, routes and cgroup.
    pub fn add_pod(&mut self, node: NodeId, spec: PodOptions) -> anyhow::Result<PodId> {
        let host = self
            .nodes
            .get(node.0)
            .cloned()
            .with_context(|| format!("cluster {} has no node {node:?}", self.id))?;
        self.check_namespace_mesh(&spec)?;
        let on_node = self.pods.iter().filter(|p| p.node == node).count();
        ensure!(
            on_node < MAX_PODS_PER_NODE,
            "at most {MAX_PODS_PER_NODE} pods per node"
        );
        if let Some(twin) = self
            .pods
            .iter()
            .find(|p| p.node == node && p.name == spec.name)
        {
            bail!(
                "node {} already has a pod named {} (in namespace {}); the simulation names \
                 a pod's network namespace after node and pod, so pod names must differ per node",
                host.name,
                spec.name,
                twin.namespace
            );
        }
        let j = u8::try_from(on_node + 1)?;
        let (ipv4, ipv6) = pod_address(host.index, j + 1);
        let uid = format!("{}-{}-{j}", self.id, host.index);
        let pod = Pod {
            netns: format!("{}-{}", host.netns, spec.name),
            cgroup: self.pod_cgroup(node, &spec.name, &uid, j),
            uid,
            name: spec.name,
            namespace: spec.namespace,
            service_account: spec.service_account,
            node,
            ipv4,
            ipv6,
            meshed: spec.meshed,
            excluded_ports: spec.excluded_ports,
        };
        // The agent's own checks (names, addresses) reject a bad pod before
        // anything is built for it.
        self.workload_file(Some(&pod))
            .with_context(|| format!("pod {}/{} is not valid", pod.namespace, pod.name))?;
        self.wire_pod(&host, j, &pod).with_context(|| {
            format!(
                "cannot build pod {} on node {} of cluster {}",
                pod.name, host.name, self.id
            )
        })?;
        self.pods.push(pod);
        Ok(PodId(self.pods.len() - 1))
    }

    fn check_namespace_mesh(&self, spec: &PodOptions) -> anyhow::Result<()> {
        let mesh = |meshed: bool| if meshed { "meshed" } else { "not meshed" };
        match self.pods.iter().find(|p| p.namespace == spec.namespace) {
            Some(other) if other.meshed != spec.meshed => bail!(
                "pod {}/{} asks to be {}, but namespace {} is {} (pod {}); \
                 a namespace is meshed or not as a whole (its label)",
                spec.namespace,
                spec.name,
                mesh(spec.meshed),
                spec.namespace,
                mesh(other.meshed),
                other.name
            ),
            _ => Ok(()),
        }
    }

    fn wire_pod(&mut self, host: &Node, j: u8, pod: &Pod) -> anyhow::Result<()> {
        self.make_cgroup(&pod.cgroup)?;
        let ns = pod.netns.as_str();
        let node_port = format!("vp{j}");
        self.add_netns(ns)?;
        ip(&[
            "-n",
            ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &node_port,
            "netns",
            &host.netns,
        ])?;
        ip(&[
            "-n",
            &host.netns,
            "link",
            "set",
            &node_port,
            "master",
            PODS_BRIDGE,
            "up",
        ])?;
        add_addresses(ns, "eth0", pod.ipv4, pod.ipv6)?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        let (gateway_v4, gateway_v6) = pod_address(host.index, 1);
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &gateway_v4.to_string(),
        ])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway_v6.to_string(),
            "dev",
            "eth0",
        ])?;
        Ok(())
    }

    /// The workload file of the cluster as it is (plus `extra`), checked by
    /// the agent's own parser.
    fn workload_file(&self, extra: Option<&Pod>) -> anyhow::Result<String> {
        let pods: Vec<&Pod> = self.pods.iter().chain(extra).collect();
        let mut namespaces: BTreeMap<&str, bool> = BTreeMap::new();
        for pod in &pods {
            namespaces.insert(&pod.namespace, pod.meshed);
        }
        let file = WorkloadFile {
            policies: self.policies.clone(),
            services: self.services.clone(),
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
                    annotations: if self.strict_namespaces.iter().any(|s| s == name) {
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

    /// Writes the workload file (YAML) describing all nodes, namespaces and
    /// pods, and returns its path. The file is replaced atomically (rename),
    /// so a watching agent never reads half of it.
    pub fn write_workloads(&self) -> anyhow::Result<PathBuf> {
        let text = self.workload_file(None)?;
        let path = self.workloads_path();
        let partial = self.tempdir.join("workloads.yaml.partial");
        fs::write(&partial, text).with_context(|| format!("cannot write {}", partial.display()))?;
        fs::rename(&partial, &path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(path)
    }

    /// Where [`write_workloads`](Self::write_workloads) writes.
    pub fn workloads_path(&self) -> PathBuf {
        self.tempdir.join("workloads.yaml")
    }

    /// Starts `program` in the pod's network namespace and cgroup (so the
    /// agent's capture applies to it), stdout piped; killed with the cluster.
    pub fn spawn_in_pod(
        &mut self,
        pod: PodId,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<Proc> {
        let pod = &self.pods[pod.0];
        let label = format!(
            "{}/{}: {}",
            self.nodes[pod.node.0].name,
            pod.name,
            command_line(program, args)
        );
        let placement = Placement {
            netns: &pod.netns,
            cgroup: Some(&pod.cgroup),
        };
        let (proc, shared) = Proc::spawn(label, &placement, program, args)?;
        self.procs.push(shared);
        Ok(proc)
    }

    /// Starts `program` in the node's network namespace (in no pod cgroup),
    /// stdout piped; killed with the cluster.
    pub fn spawn_on_node(
        &mut self,
        node: NodeId,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<Proc> {
        let node = &self.nodes[node.0];
        let label = format!("{}: {}", node.name, command_line(program, args));
        let netns = node.netns.clone();
        self.spawn_placed(label, &netns, program, args)
    }

    /// Runs `program` in the node's network namespace to completion (via
    /// `ip netns exec`, which also shows the node's view in `/sys`) and
    /// returns its stdout; an error with its stderr if it fails.
    pub fn run_on_node(
        &self,
        node: NodeId,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", self.nodes[node.0].netns.as_str(), program];
        full.extend_from_slice(args);
        run_checked("ip", &full)
    }

    /// Writes the workload file, starts `ferry-agent run` for the node in its
    /// namespace, and waits until `/healthz/ready` answers 200.
    pub fn start_agent(&mut self, node: NodeId) -> anyhow::Result<Agent> {
        self.start_agent_with(node, &[])
    }

    /// [`start_agent`](Self::start_agent) with more arguments for `ferry-agent run`.
    pub fn start_agent_with(&mut self, node: NodeId, extra: &[&str]) -> anyhow::Result<Agent> {
        let workloads = self.write_workloads()?;
        let workloads = workloads.to_string_lossy().into_owned();
        let source = ["--workloads", &workloads];
        self.launch_agent(node, &source, extra)
    }

    /// Starts the node's agent with the Kubernetes workload source: the API
    /// server named in `kubeconfig`, the node's addresses on the command line
    /// and its pods' cgroups found under [`node_cgroup_root`](Self::node_cgroup_root).
    pub fn start_agent_kubernetes(
        &mut self,
        node: NodeId,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let host = &self.nodes[node.0];
        let addresses = format!("{},{}", host.ipv4, host.ipv6);
        let root = self.node_cgroup_root(node).to_string_lossy().into_owned();
        let kubeconfig = kubeconfig.to_string_lossy().into_owned();
        let source = [
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--node-address",
            &addresses,
            "--cgroup-root",
            &root,
        ];
        self.launch_agent(node, &source, extra)
    }

    fn launch_agent(
        &mut self,
        node: NodeId,
        source: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let agent_bin = bin_path("ferry-agent")?;
        let name = self.nodes[node.0].name.clone();
        let args = ["run", "--node", &name, "--bpffs-root", BPFFS_ROOT];
        let args: Vec<&str> = args.iter().chain(source).chain(extra).copied().collect();
        let proc = self.spawn_on_node(node, &agent_bin, &args)?;
        let mut agent = Agent {
            proc,
            node,
            pin_dir: self.nodes[node.0].pin_dir(),
        };
        self.wait_ready(&mut agent)
            .with_context(|| format!("the agent of node {name} did not become ready"))?;
        Ok(agent)
    }

    fn wait_ready(&self, agent: &mut Agent) -> anyhow::Result<()> {
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if let Some(status) = agent.proc.has_exited()? {
                bail!(
                    "ferry-agent exited ({status}) before it was ready\n{}",
                    agent.proc.report()
                );
            }
            let last = match self.admin_get(agent.node, "/healthz/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("{status}: {}", body.trim()),
                Err(err) => format!("{err:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "no 200 from /healthz/ready within {AGENT_READY_TIMEOUT:?}; last answer: {last}\n{}",
                    agent.proc.report()
                );
            }
            thread::sleep(AGENT_READY_POLL);
        }
    }

    /// POSTs to `path` (no body) on the agent's admin endpoint; returns the status code and body.
    pub fn admin_post(&self, node: NodeId, path: &str) -> anyhow::Result<(u16, String)> {
        let addr: SocketAddr = ferry_agent::cli::DEFAULT_ADMIN_ADDR.parse()?;
        let node = &self.nodes[node.0];
        netns::in_netns(&node.netns, || http::request(addr, "POST", path))
            .with_context(|| format!("admin endpoint of node {}", node.name))
    }

    /// GETs `path` from the agent's admin endpoint (127.0.0.1:15000 in the
    /// node's namespace); returns the status code and body.
    pub fn admin_get(&self, node: NodeId, path: &str) -> anyhow::Result<(u16, String)> {
        let addr: SocketAddr = ferry_agent::cli::DEFAULT_ADMIN_ADDR.parse()?;
        let node = &self.nodes[node.0];
        netns::in_netns(&node.netns, || http::get(addr, path))
            .with_context(|| format!("admin endpoint of node {}", node.name))
    }

    /// Removes everything; returns what could not be removed.
    fn cleanup(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for proc in self.procs.drain(..) {
            if let Err(err) = proc.kill() {
                problems.push(format!("cannot kill {}: {err}", proc.label()));
            }
        }
        for pod in &self.pods {
            if let Err(err) = cgroup::kill_all(&pod.cgroup) {
                problems.push(format!("{err:#}"));
            }
        }
        for ns in self.netns_made.iter().rev() {
            match netns::pids(ns) {
                Ok(pids) => pids.into_iter().for_each(cgroup::kill),
                Err(err) => problems.push(format!("{err:#}")),
            }
        }
        for ns in self.netns_made.drain(..).rev() {
            if let Err(err) = netns::delete(&ns) {
                problems.push(format!("{err:#}"));
            }
        }
        for node in &self.nodes {
            if let Err(err) = remove_tree(&node.pin_dir()) {
                problems.push(format!("{err:#}"));
            }
        }
        for dir in self.cgroups_made.drain(..).rev() {
            if let Err(err) = cgroup::remove(&dir) {
                problems.push(format!("{err:#}"));
            }
        }
        if let Err(err) = remove_tree(&self.tempdir) {
            problems.push(format!("{err:#}"));
        }
        problems
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            for proc in &self.procs {
                eprintln!(
                    "ferry-tests: stderr of {} (last lines):\n{}",
                    proc.label(),
                    proc.stderr_tail()
                );
            }
        }
        let problems = self.cleanup();
        for problem in &problems {
            eprintln!(
                "ferry-tests: cleanup of cluster {} ({}): {problem}",
                self.id, self.name
            );
        }
    }
}

/// Fails with what to do when the machine cannot run simulated nodes;
/// returns the cgroup v2 mount point.
fn check_preconditions() -> anyhow::Result<PathBuf> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the simulated nodes need root (network namespaces, cgroups, eBPF): \
         run the tests as root, e.g. `sudo -E cargo xtask test`"
    );
    run_checked("ip", &["-V"]).context(
        "the simulated nodes are built with `ip` (iproute2); install it (apt-get install iproute2)",
    )?;
    cgroup::cgroup2_mount()
}

/// A fresh cluster id (6 hex digits) and its temporary directory, whose
/// creation proves the id unused by any other test process.
fn reserve_id() -> anyhow::Result<(String, PathBuf)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    for _ in 0..16 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        hasher.write_u128(nanos);
        let id = format!("{:06x}", hasher.finish() & 0xff_ffff);
        let tempdir = std::env::temp_dir().join(format!("ferry-{id}"));
        let netns_taken = netns::exists(&format!("{}{id}-fabric", netns::NETNS_PREFIX));
        if !netns_taken && fs::create_dir(&tempdir).is_ok() {
            return Ok((id, tempdir));
        }
    }
    bail!(
        "cannot find an unused cluster id (is {} writable?)",
        std::env::temp_dir().display()
    )
}

/// Address number `host` of node `node`'s pod subnets: 0 names the subnet,
/// 1 is the node's gateway, pod j has j + 1.
pub(crate) fn pod_address(node: u8, host: u8) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(198, 18, node, host),
        Ipv6Addr::new(0x2001, 2, 0, node.into(), 0, 0, 0, host.into()),
    )
}

/// Adds an IPv4 /24 and an IPv6 /64 to `dev`; IPv6 without duplicate
/// address detection, so the address works at once.
fn add_addresses(ns: &str, dev: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> anyhow::Result<()> {
    ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
    ip(&[
        "-n",
        ns,
        "-6",
        "addr",
        "add",
        &format!("{v6}/64"),
        "dev",
        dev,
        "nodad",
    ])?;
    Ok(())
}

/// Routes `from`'s traffic for `to`'s pods via `to`'s uplink addresses.
fn route_between(from: &Node, to: &Node) -> anyhow::Result<()> {
    let (subnet_v4, subnet_v6) = pod_address(to.index, 0);
    let ns = from.netns.as_str();
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        &format!("{subnet_v4}/24"),
        "via",
        &to.ipv4.to_string(),
    ])?;
    ip(&[
        "-n",
        ns,
        "-6",
        "route",
        "add",
        &format!("{subnet_v6}/64"),
        "via",
        &to.ipv6.to_string(),
    ])?;
    Ok(())
}

/// Removes a file or directory tree; absent is fine. Works on bpffs pins.
pub(crate) fn remove_tree(path: &Path) -> anyhow::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => Err(err),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    result.with_context(|| format!("cannot remove {}", path.display()))
}

fn command_line(program: &Path, args: &[&str]) -> String {
    let name = program.file_name().map_or_else(
        || program.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    std::iter::once(name.as_str())
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}
