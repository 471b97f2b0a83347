//! The nodes' agents: starting `ferry-agent run` on a node (with the
//! workload file or the Kubernetes source) and waiting until it is ready,
//! and its admin endpoint, which the tests read the way an operator does.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Cluster, NodeId};
use crate::{BPFFS_ROOT, bin_path, http, netns, process::Proc};

/// How long [`Cluster::start_agent`] waits for `/healthz/ready`.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
const AGENT_READY_POLL: Duration = Duration::from_millis(100);

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

impl Cluster {
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
}
