//! The nodes' agents: one builder ([`Cluster::agent`]) that starts
//! `ferry-agent run` on a node, with the workload file or the Kubernetes
//! source, with or without a CA, and waits until it is ready; and the
//! agent's admin endpoint, which the tests read the way an operator does.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Cluster, NodeId};
use crate::{BPFFS_ROOT, bin_path, http, netns, process::Proc};

/// How long [`AgentBuilder::start`] waits for `/healthz/ready`.
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

/// A CA an agent gets its certificates from; the tests' is
/// [`CaFixture`](crate::ca::CaFixture).
pub trait AgentCa {
    /// The `ferry-agent run` arguments that point the agent of node `node`
    /// at this CA; files they name (the agent's token) are written into `dir`.
    fn agent_args(&self, node: &str, dir: &Path) -> anyhow::Result<Vec<String>>;

    /// The kubeconfig of the API server this CA runs against, if it runs as
    /// in a cluster: its agents then learn their workloads there too.
    fn api_server(&self) -> Option<PathBuf>;
}

/// How the agent of one node is to be started; made by [`Cluster::agent`],
/// started by [`start`](Self::start).
#[must_use = "the agent starts only with .start()"]
pub struct AgentBuilder<'a> {
    cluster: &'a mut Cluster,
    node: NodeId,
    kubeconfig: Option<PathBuf>,
    ca: Option<&'a dyn AgentCa>,
    args: Vec<String>,
}

impl Cluster {
    /// The agent of `node`, to be started with [`AgentBuilder::start`]. By
    /// default it reads the workload file and has no CA (so it has no
    /// identities and carries every connection as passthrough).
    pub fn agent(&mut self, node: NodeId) -> AgentBuilder<'_> {
        AgentBuilder {
            cluster: self,
            node,
            kubeconfig: None,
            ca: None,
            args: Vec::new(),
        }
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
        self.admin_request(node, "POST", path)
    }

    /// GETs `path` from the agent's admin endpoint (127.0.0.1:15000 in the
    /// node's namespace); returns the status code and body.
    pub fn admin_get(&self, node: NodeId, path: &str) -> anyhow::Result<(u16, String)> {
        self.admin_request(node, "GET", path)
    }

    fn admin_request(
        &self,
        node: NodeId,
        method: &str,
        path: &str,
    ) -> anyhow::Result<(u16, String)> {
        let addr: SocketAddr = ferry_agent::cli::DEFAULT_ADMIN_ADDR.parse()?;
        let node = &self.nodes[node.0];
        netns::in_netns(&node.netns, || http::request(addr, method, path))
            .with_context(|| format!("admin endpoint of node {}", node.name))
    }
}

impl<'a> AgentBuilder<'a> {
    /// Learn the workloads from the API server named in `kubeconfig`
    /// instead of the workload file: the node's addresses go on the command
    /// line, and its pods' cgroups are found under
    /// [`node_cgroup_root`](Cluster::node_cgroup_root).
    pub fn kubernetes(mut self, kubeconfig: &Path) -> Self {
        self.kubeconfig = Some(kubeconfig.to_owned());
        self
    }

    /// Get certificates from `ca`, with a token for this node's agent. A CA
    /// that runs against an API server makes the agent use it too, unless
    /// [`kubernetes`](Self::kubernetes) names another.
    pub fn ca(mut self, ca: &'a dyn AgentCa) -> Self {
        self.ca = Some(ca);
        self
    }

    /// `--worker-threads`: how many shards (threads) the data plane runs on.
    pub fn worker_threads(self, threads: usize) -> Self {
        self.args(&["--worker-threads".to_owned(), threads.to_string()])
    }

    /// `--pool-idle-timeout`, in whole seconds: when the pool closes an idle
    /// TLS connection.
    pub fn pool_idle_timeout(self, idle: Duration) -> Self {
        self.args(&["--pool-idle-timeout".to_owned(), idle.as_secs().to_string()])
    }

    /// More `ferry-agent run` arguments, as they are: for flags no test
    /// varies often enough to deserve a setter.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Writes what the agent reads (the workload file, unless it uses the
    /// Kubernetes source; its CA token), starts `ferry-agent run` in the
    /// node's namespace, and waits until `/healthz/ready` answers 200.
    pub fn start(self) -> anyhow::Result<Agent> {
        let Self {
            cluster,
            node,
            kubeconfig,
            ca,
            args: extra,
        } = self;
        let agent_bin = bin_path("ferry-agent")?;
        let host = cluster.node(node).clone();
        let mut args: Vec<String> = vec![
            "run".to_owned(),
            "--node".to_owned(),
            host.name.clone(),
            "--bpffs-root".to_owned(),
            BPFFS_ROOT.to_owned(),
        ];
        match kubeconfig.or_else(|| ca.and_then(AgentCa::api_server)) {
            None => {
                let workloads = cluster.write_workloads()?;
                args.extend(["--workloads".to_owned(), path_arg(&workloads)]);
            }
            Some(kubeconfig) => args.extend([
                "--kubernetes".to_owned(),
                "--kubeconfig".to_owned(),
                path_arg(&kubeconfig),
                "--node-address".to_owned(),
                format!("{},{}", host.ipv4, host.ipv6),
                "--cgroup-root".to_owned(),
                path_arg(&cluster.node_cgroup_root(node)),
            ]),
        }
        if let Some(ca) = ca {
            args.extend(ca.agent_args(&host.name, cluster.tempdir())?);
        }
        args.extend(extra);
        let proc = cluster.spawn(node, &agent_bin, &args)?;
        let mut agent = Agent {
            proc,
            node,
            pin_dir: host.pin_dir(),
        };
        cluster
            .wait_ready(&mut agent)
            .with_context(|| format!("the agent of node {} did not become ready", host.name))?;
        Ok(agent)
    }
}

/// A path as a command-line argument.
fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
