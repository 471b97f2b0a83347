//! The nodes' agents: one builder ([`Cluster::agent`]) that starts
//! `ferry-agent run` on a node, with the workload file or the Kubernetes
//! source, with or without a CA, and waits until it is ready; a successor
//! started with the same arguments ([`Cluster::start_successor`]), which
//! takes over from a running agent; and the agent's admin endpoint, which
//! the tests read the way an operator does.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitStatus,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Cluster, NodeId};
use crate::{BPFFS_ROOT, bin_path, http, netns, process::Proc};

/// How long [`AgentBuilder::start`] waits for `/healthz/ready`, and
/// [`Cluster::start_successor`] for the successor to answer it.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
const AGENT_READY_POLL: Duration = Duration::from_millis(100);
/// The directory under the cluster's tempdir given as `--handover-dir`:
/// the agent of node `n` keeps its handover socket in `<it>/<n>/`.
const HANDOVER_DIR: &str = "handover";
/// What the agent's last line says when a drain is over.
const DRAIN_FINISHED: &str = "drain finished";
const CLOSED_AT_DEADLINE: &str = "closed_at_deadline=";

/// A running `ferry-agent` of one node.
pub struct Agent {
    pub proc: Proc,
    pub node: NodeId,
    /// `<BPFFS_ROOT>/<node name>`: where it pins.
    pub pin_dir: PathBuf,
    /// Its `ferry-agent` arguments: a successor gets the same.
    args: Vec<String>,
}

impl Agent {
    /// Kills the agent with SIGKILL (no chance to clean up, like a crash or
    /// an OOM kill) and reaps it. Its pins stay, and so does its handover
    /// socket file.
    pub fn kill9(&mut self) {
        self.proc.kill();
    }

    /// Sends SIGTERM, as kubelet does to a pod it stops: the agent drains
    /// (see [`wait_exit`](Self::wait_exit)).
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.proc.terminate()
    }

    /// The `ferry-agent` arguments it was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Waits up to `timeout` for the agent to exit (after SIGTERM, or once
    /// a successor took over and its drain ended); its status and stderr.
    /// On timeout it keeps running, and the error shows its last lines.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<AgentExit> {
        let (status, _, stderr) = self.proc.wait_exit(timeout)?;
        Ok(AgentExit { status, stderr })
    }

    /// Waits for a draining agent to exit, which must be with status 0 and
    /// after its `drain finished` line.
    pub fn drained(&mut self, timeout: Duration) -> anyhow::Result<DrainFinished> {
        let pid = self.proc.pid();
        let exit = self
            .wait_exit(timeout)
            .with_context(|| format!("the draining agent (pid {pid}) did not exit"))?;
        anyhow::ensure!(
            exit.status.success(),
            "the draining agent (pid {pid}) exited with {}:\n{}",
            exit.status,
            exit.stderr
        );
        exit.drain_finished()
    }
}

/// How an agent ended: [`Agent::wait_exit`].
#[derive(Debug, Clone)]
pub struct AgentExit {
    pub status: ExitStatus,
    /// Its stderr (the newest megabyte): its log.
    pub stderr: String,
}

/// The agent's last word on a drain: its `drain finished` log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainFinished {
    /// Connections still open at the drain deadline, which it closed.
    pub closed_at_deadline: u64,
    pub line: String,
}

impl AgentExit {
    /// Its `drain finished` line (the last, if it logged several), parsed;
    /// an error with the log's end if there is none.
    pub fn drain_finished(&self) -> anyhow::Result<DrainFinished> {
        let tail = || {
            let lines: Vec<&str> = self.stderr.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        let line = self
            .stderr
            .lines()
            .rev()
            .find(|line| line.contains(DRAIN_FINISHED))
            .with_context(|| {
                format!(
                    "the agent ({}) never logged `{DRAIN_FINISHED}`; its log ends:\n{}",
                    self.status,
                    tail()
                )
            })?;
        let count = line
            .split_once(CLOSED_AT_DEADLINE)
            .map(|(_, rest)| {
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .with_context(|| format!("no {CLOSED_AT_DEADLINE} in the agent's line: {line}"))?;
        Ok(DrainFinished {
            closed_at_deadline: count
                .parse()
                .with_context(|| format!("{CLOSED_AT_DEADLINE} without a number: {line}"))?,
            line: line.to_owned(),
        })
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

    /// Starts a second agent on `old`'s node with `old`'s arguments, as a
    /// DaemonSet's surge pod or a restart by hand would: it takes over from
    /// `old` if that still runs (its listening sockets, then `old` drains),
    /// or simply starts if `old` is gone (after [`Agent::kill9`]). Returns
    /// once the node's admin port is answered by the new process (its
    /// `/config_dump` `pid`) and `/healthz/ready` says 200; fails with the
    /// new process's output if that does not happen within the ready
    /// timeout, or if it exits.
    pub fn start_successor(&mut self, old: &Agent) -> anyhow::Result<Agent> {
        let agent_bin = bin_path("ferry-agent")?;
        let host = self.node(old.node).clone();
        let proc = self.spawn(old.node, &agent_bin, &old.args)?;
        let mut agent = Agent {
            proc,
            node: old.node,
            pin_dir: host.pin_dir(),
            args: old.args.clone(),
        };
        self.wait_successor(&mut agent).with_context(|| {
            format!(
                "the successor (pid {}) of the agent (pid {}) of node {} did not take over",
                agent.proc.pid(),
                old.proc.pid(),
                host.name
            )
        })?;
        Ok(agent)
    }

    fn wait_successor(&self, agent: &mut Agent) -> anyhow::Result<()> {
        let pid = u64::from(agent.proc.pid());
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if let Some(status) = agent.proc.has_exited()? {
                bail!(
                    "the new ferry-agent exited ({status}) before it took over\n{}",
                    agent.proc.report()
                );
            }
            let last = match self.admin_get(agent.node, "/config_dump") {
                Ok((200, body)) => {
                    let answered = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|dump| dump["pid"].as_u64());
                    match answered {
                        Some(answered) if answered == pid => {
                            match self.admin_get(agent.node, "/healthz/ready") {
                                Ok((200, _)) => return Ok(()),
                                Ok((status, body)) => {
                                    format!("/healthz/ready: {status}: {}", body.trim())
                                }
                                Err(err) => format!("/healthz/ready: {err:#}"),
                            }
                        }
                        Some(answered) => format!("/config_dump answered by pid {answered}"),
                        None => "/config_dump has no pid".to_owned(),
                    }
                }
                Ok((status, body)) => format!("/config_dump: {status}: {}", body.trim()),
                Err(err) => format!("{err:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "the admin port did not answer from pid {pid} with /healthz/ready 200 \
                     within {AGENT_READY_TIMEOUT:?}; last: {last}\n{}",
                    agent.proc.report()
                );
            }
            thread::sleep(AGENT_READY_POLL);
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

    /// `--drain-timeout`, in whole seconds: how long the agent keeps
    /// relaying established connections once it drains (after SIGTERM, or
    /// once a successor took over) before it closes what is left.
    pub fn drain_timeout(self, deadline: Duration) -> Self {
        self.args(&["--drain-timeout".to_owned(), deadline.as_secs().to_string()])
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
    /// Every agent gets `--handover-dir` in the cluster's tempdir, so a
    /// successor ([`Cluster::start_successor`]) can take over from it.
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
        let handover = cluster.tempdir().join(HANDOVER_DIR);
        fs::create_dir_all(&handover)
            .with_context(|| format!("cannot create {}", handover.display()))?;
        let mut args: Vec<String> = vec![
            "run".to_owned(),
            "--node".to_owned(),
            host.name.clone(),
            "--bpffs-root".to_owned(),
            BPFFS_ROOT.to_owned(),
            "--handover-dir".to_owned(),
            path_arg(&handover),
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
            args,
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

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    #[test]
    fn the_last_drain_line_is_read() {
        let exit = AgentExit {
            status: ExitStatus::from_raw(0),
            stderr: "2026-01-01T00:00:00Z  INFO ferry_agent::app: draining connections=3\n\
                     2026-01-01T00:00:02Z  INFO ferry_agent::app: drain finished closed_at_deadline=2 seconds=2.0"
                .to_owned(),
        };
        let drained = exit.drain_finished().unwrap();
        assert_eq!(drained.closed_at_deadline, 2);
        let silent = AgentExit {
            stderr: "INFO ferry_agent::app: ready".to_owned(),
            ..exit
        };
        let error = format!("{:#}", silent.drain_finished().unwrap_err());
        assert!(error.contains("never logged `drain finished`"), "{error}");
    }
}
