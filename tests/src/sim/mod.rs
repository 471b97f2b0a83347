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
//!
//! This file holds the [`Cluster`] and the processes it starts; the rest is
//! split by concern: `topology` (namespaces, veths, bridges, addresses,
//! routes, cgroups: the drawing above), `workload_file` (the file the
//! agents read), `agent` (starting `ferry-agent` and its admin endpoint),
//! `teardown` (what the cluster made, removed on drop).

mod agent;
mod teardown;
mod topology;
mod workload_file;

use std::{
    collections::hash_map::RandomState,
    fs,
    hash::{BuildHasher as _, Hasher as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use anyhow::{Context as _, bail, ensure};

pub use agent::{Agent, AgentBuilder, AgentCa, AgentExit, DrainFinished};
pub(crate) use topology::pod_address;
pub use topology::{CgroupDriver, FABRIC_SERVICE_V4, Node, NodeId, Pod, PodId, PodOptions};
pub use workload_file::policy;

use crate::{
    cgroup, netns,
    process::{Placement, Proc, run_checked},
};

/// Where a process of the cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The namespace joining the nodes, at `FABRIC_SERVICE_V4`: where
    /// cluster-wide services (the CA) run, and tcpdump sees every node's link.
    Fabric,
    /// A node's namespace, in no pod cgroup: its agent, a kubelet probe.
    Node(NodeId),
    /// A pod's namespace and cgroup, so the agent's capture applies to it.
    Pod(PodId),
}

impl From<NodeId> for Place {
    fn from(node: NodeId) -> Self {
        Place::Node(node)
    }
}

impl From<PodId> for Place {
    fn from(pod: PodId) -> Self {
        Place::Pod(pod)
    }
}

/// A set of simulated nodes and pods, removed again on drop.
pub struct Cluster {
    id: String,
    name: String,
    cgroup_dir: PathBuf,
    fabric: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    /// What the workload file says beyond nodes and pods.
    settings: workload_file::Settings,
    /// Whether pod cgroups follow kubelet's layout (and which driver's).
    kubelet_cgroups: Option<CgroupDriver>,
    /// Everything made so far, removed when the cluster is dropped.
    made: teardown::Made,
}

impl Cluster {
    /// An empty cluster: the fabric namespace and the cluster's cgroup.
    /// `name` is for humans (it appears in logs); the id is unique per call.
    /// Fails (never skips) when the machine cannot run simulated nodes.
    pub fn new(name: &str) -> anyhow::Result<Cluster> {
        let cgroup2 = check_preconditions()?;
        let (id, tempdir) = reserve_id()?;
        eprintln!(
            "ferry-tests: cluster {id} ({name}) in {}",
            tempdir.display()
        );
        let mut cluster = Cluster {
            fabric: format!("{}{id}-fabric", netns::NETNS_PREFIX),
            cgroup_dir: cgroup2.join(cgroup::SUBTREE).join(&id),
            made: teardown::Made::new(format!("{id} ({name})"), tempdir),
            id,
            name: name.to_owned(),
            nodes: Vec::new(),
            pods: Vec::new(),
            settings: workload_file::Settings::default(),
            kubelet_cgroups: None,
        };
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
        &self.made.tempdir
    }

    /// Every network namespace this cluster made.
    pub fn netns_names(&self) -> &[String] {
        &self.made.netns
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

    /// The namespace joining the nodes, where cluster-wide services run.
    pub fn fabric_netns(&self) -> &str {
        &self.fabric
    }

    /// Starts `program` at `place` (a [`NodeId`] or [`PodId`] will do),
    /// stdout piped; killed with the cluster.
    pub fn spawn<S: AsRef<str>>(
        &mut self,
        place: impl Into<Place>,
        program: &Path,
        args: &[S],
    ) -> anyhow::Result<Proc> {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let (host, placement) = match place.into() {
            Place::Fabric => ("fabric".to_owned(), Placement::netns(&self.fabric)),
            Place::Node(node) => {
                let node = &self.nodes[node.0];
                (node.name.clone(), Placement::netns(&node.netns))
            }
            Place::Pod(pod) => {
                let pod = &self.pods[pod.0];
                let host = format!("{}/{}", self.nodes[pod.node.0].name, pod.name);
                let placement = Placement {
                    netns: &pod.netns,
                    cgroup: Some(&pod.cgroup),
                };
                (host, placement)
            }
        };
        let label = format!("{host}: {}", command_line(program, &args));
        let (proc, shared) = Proc::spawn(label, &placement, program, &args)?;
        self.made.procs.push(shared);
        Ok(proc)
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
