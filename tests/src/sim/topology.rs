//! The simulated network and cgroups, as drawn in the [module
//! doc](super): the fabric, nodes and pods as network namespaces joined by
//! veths and bridges, their addresses and routes, and each pod's cgroup v2
//! directory (flat, or where kubelet would make it).

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};

use super::Cluster;
use crate::{
    BPFFS_ROOT,
    netns::{self, ip},
};

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
pub struct NodeId(pub(super) usize);

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
    /// The pod's labels: `app: <service account>` unless a test says otherwise.
    pub labels: BTreeMap<String, String>,
}

impl PodOptions {
    /// A pod in a meshed namespace, labelled `app: <service account>` as a
    /// Deployment's pods would be.
    pub fn meshed(name: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            meshed: true,
            excluded_ports: Vec::new(),
            labels: BTreeMap::from([("app".to_owned(), service_account.to_owned())]),
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

    /// Adds (or replaces) the label `key: value`.
    pub fn labeled(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
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
    pub labels: BTreeMap<String, String>,
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

impl Cluster {
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
        self.made.pin_dirs.push(node.pin_dir());
        self.wire_node(&node)
            .with_context(|| format!("cannot build node {} of cluster {}", node.name, self.id))?;
        for other in &self.nodes {
            route_between(&node, other)?;
            route_between(other, &node)?;
        }
        self.nodes.push(node);
        Ok(NodeId(self.nodes.len() - 1))
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
            labels: spec.labels,
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

    /// The cluster's cgroup, and the fabric: its namespace and bridge.
    pub(super) fn make_fabric(&mut self) -> anyhow::Result<()> {
        let parent = self.cgroup_dir.parent().expect("cgroup dir has a parent");
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create cgroup {}", parent.display()))?;
        fs::create_dir(&self.cgroup_dir)
            .with_context(|| format!("cannot create cgroup {}", self.cgroup_dir.display()))?;
        self.made.cgroups.push(self.cgroup_dir.clone());

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

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.made.netns.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn wire_node(&mut self, node: &Node) -> anyhow::Result<()> {
        let ns = node.netns.as_str();
        let fabric = self.fabric.clone();
        self.add_netns(ns)?;
        let fabric_port = format!("n{}", node.index);
        add_veth((ns, UPLINK), (&fabric, &fabric_port), FABRIC_BRIDGE)?;
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
        self.add_netns(ns)?;
        let node_port = format!("vp{j}");
        add_veth((ns, "eth0"), (&host.netns, &node_port), PODS_BRIDGE)?;
        add_addresses(ns, "eth0", pod.ipv4, pod.ipv6)?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        let (gateway_v4, gateway_v6) = pod_address(host.index, 1);
        add_route(ns, "default", gateway_v4.into(), &[])?;
        add_route(ns, "default", gateway_v6.into(), &["dev", "eth0"])?;
        Ok(())
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
            self.made.cgroups.push(d.to_owned());
        }
        Ok(())
    }
}

/// Address number `host` of node `node`'s pod subnets: 0 names the subnet,
/// 1 is the node's gateway, pod j has j + 1.
pub(crate) fn pod_address(node: u8, host: u8) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(198, 18, node, host),
        Ipv6Addr::new(0x2001, 2, 0, node.into(), 0, 0, 0, host.into()),
    )
}

/// A veth pair from `dev` in namespace `ns` to `peer` in namespace
/// `peer_ns`, where that end joins `bridge` and goes up.
fn add_veth(
    (ns, dev): (&str, &str),
    (peer_ns, peer): (&str, &str),
    bridge: &str,
) -> anyhow::Result<()> {
    ip(&[
        "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", peer_ns,
    ])?;
    ip(&["-n", peer_ns, "link", "set", peer, "master", bridge, "up"])?;
    Ok(())
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
    add_route(&from.netns, &format!("{subnet_v4}/24"), to.ipv4.into(), &[])?;
    add_route(&from.netns, &format!("{subnet_v6}/64"), to.ipv6.into(), &[])?;
    Ok(())
}

/// `ip route add <to> via <via> [extra]` in namespace `ns`, of `via`'s family.
fn add_route(ns: &str, to: &str, via: IpAddr, extra: &[&str]) -> anyhow::Result<()> {
    let family = if via.is_ipv6() { "-6" } else { "-4" };
    let via = via.to_string();
    let mut args = vec!["-n", ns, family, "route", "add", to, "via", &via];
    args.extend_from_slice(extra);
    ip(&args).map(drop)
}
