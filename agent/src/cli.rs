//! The agent's command line. Every default is a named constant; the
//! DaemonSet manifest sets flags through the same parser.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/ferry";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_PROBE_PORT: u16 = 15021;
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
pub const DEFAULT_HANDOVER_DIR: &str = "/run/ferry";
/// Long enough for most long-lived connections to end on their own; the
/// DaemonSet's `terminationGracePeriodSeconds` is a little longer.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 300;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "Ferry's node agent: transparent mTLS for meshed pods"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture this node's meshed pods and carry their connections.
    Run(RunArgs),
    /// Show a running agent's state in tables, from its admin endpoint.
    Inspect(InspectArgs),
    /// Print the AuthorizationPolicy CustomResourceDefinition (YAML), for
    /// `kubectl apply -f -`.
    Crd,
}

#[derive(Debug, Clone, clap::Args, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunArgs {
    /// This node's name, as in the workload source.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    #[command(flatten)]
    pub source: SourceArgs,
    /// bpffs directory under which the agent pins its maps and links, in `<root>/<node>/`.
    #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
    /// Address of the admin API; must be a loopback address.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR, value_parser = parse_admin_addr)]
    pub admin_addr: SocketAddr,
    /// Port of the outbound listener the capture programs redirect to (on the node's addresses).
    #[arg(long, default_value_t = DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Port of the kubelet readiness probe, `/healthz/ready` (on all addresses).
    #[arg(long, default_value_t = DEFAULT_PROBE_PORT)]
    pub probe_port: u16,
    /// Threads carrying connections (shards: each accepts, relays and pools
    /// tunnel connections on its own). By default one per CPU the agent may
    /// use, as `std::thread::available_parallelism` counts them (its
    /// documentation says it reads the cgroup's CPU quota; that was not
    /// tested here); fewer keeps the agent's share of a busy node down.
    #[arg(long, env = "FERRY_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    /// What a destination that no AuthorizationPolicy selects admits, unless
    /// its namespace's `ferry.dev/default-inbound-policy` annotation says:
    /// all-unauthenticated (any mesh identity, and plaintext where the
    /// namespace is permissive), all-authenticated, same-namespace or deny.
    #[arg(
        long,
        env = "FERRY_DEFAULT_INBOUND_POLICY",
        default_value = "all-unauthenticated"
    )]
    pub default_inbound_policy: ferry_proto::policy::DefaultPolicy,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub tunnel: TunnelArgs,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
    #[command(flatten)]
    pub log: crate::logging::LogArgs,
}

/// How one agent hands the node over to the next, and drains.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleArgs {
    /// Where the agent listens for its successor (`<dir>/<node>/handover.sock`):
    /// an agent started while another runs on the node takes over its
    /// listening sockets there. Only root may enter it.
    #[arg(long, env = "FERRY_HANDOVER_DIR", default_value = DEFAULT_HANDOVER_DIR)]
    pub handover_dir: PathBuf,
    /// Once it drains (SIGTERM, or a successor took over), how long the
    /// agent keeps relaying connections that are still open before it closes
    /// them (seconds).
    #[arg(long, env = "FERRY_DRAIN_TIMEOUT", default_value_t = DEFAULT_DRAIN_TIMEOUT_SECS)]
    pub drain_timeout: u64,
    /// After handing over and draining, wait for SIGTERM instead of exiting.
    /// In a DaemonSet pod an exit would make the kubelet restart the old
    /// container, which would then take the node back from its successor.
    #[arg(long, env = "FERRY_STAY_UNTIL_TERMINATED")]
    pub stay_until_terminated: bool,
}

impl LifecycleArgs {
    pub fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.drain_timeout)
    }
}

/// Where the agent learns the cluster's workloads: a file, or the Kubernetes API.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
#[serde(rename_all = "camelCase")]
#[command(group = clap::ArgGroup::new("workload_source").required(true))]
pub struct SourceArgs {
    /// The workload file (YAML) describing nodes, namespaces and pods; watched for changes.
    #[arg(long, env = "FERRY_WORKLOADS", group = "workload_source")]
    pub workloads: Option<PathBuf>,
    /// Watch namespaces, pods, Services and EndpointSlices in the Kubernetes
    /// API (in-cluster credentials, or `--kubeconfig`).
    #[arg(long, group = "workload_source", requires = "node_addresses")]
    pub kubernetes: bool,
    /// A kubeconfig to reach the API server with, instead of the in-cluster credentials.
    #[arg(long, env = "KUBECONFIG", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's addresses, where the agent listens (with `--kubernetes`; the
    /// workload file names them itself). The DaemonSet passes `status.podIPs`,
    /// which on the host network are the node's.
    #[arg(
        long = "node-address",
        env = "NODE_ADDRESSES",
        value_delimiter = ',',
        requires = "kubernetes"
    )]
    pub node_addresses: Vec<std::net::IpAddr>,
    /// Where the node's cgroup v2 hierarchy is mounted: kubelet's pod cgroups
    /// are found under it by pod UID (systemd or cgroupfs driver, any QoS class).
    #[arg(long, default_value = DEFAULT_CGROUP_ROOT, requires = "kubernetes")]
    pub cgroup_root: PathBuf,
}

/// The pool of mTLS connections to other agents.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelArgs {
    /// A pooled tunnel connection with no streams for this long is closed (seconds).
    #[arg(long, default_value_t = crate::tunnel::pool::DEFAULT_IDLE_TIMEOUT.as_secs())]
    pub pool_idle_timeout: u64,
    /// Streams one tunnel connection carries before the pool opens another.
    #[arg(long, default_value_t = crate::tunnel::pool::DEFAULT_MAX_STREAMS_PER_CONNECTION)]
    pub max_streams_per_connection: usize,
}

impl TunnelArgs {
    pub fn pool_config(&self) -> crate::tunnel::pool::PoolConfig {
        crate::tunnel::pool::PoolConfig {
            idle_timeout: std::time::Duration::from_secs(self.pool_idle_timeout.max(1)),
            max_streams_per_connection: self.max_streams_per_connection.max(1),
            ..Default::default()
        }
    }
}

/// Where the agent gets its workloads' certificates. Without `--ca-addr`
/// the agent runs without identities: capture and plaintext passthrough only.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityArgs {
    /// The Ferry CA, `host:port`.
    #[arg(long, env = "FERRY_CA_ADDR", requires_all = ["trust_bundle", "token_file"])]
    pub ca_addr: Option<String>,
    /// The name the CA's serving certificate must carry.
    #[arg(long, default_value = ferry_proto::DEFAULT_CA_SERVER_NAME)]
    pub ca_server_name: String,
    /// The mesh's trust bundle (PEM roots): the CA and every peer must chain to it.
    #[arg(long, env = "FERRY_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// The agent's own projected ServiceAccount token (audience ferry-ca); re-read at each request.
    #[arg(long, env = "FERRY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[arg(long, default_value = ferry_proto::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// TLS key exchange, on the tunnel (both ends) and towards the CA:
    /// post-quantum (X25519MLKEM768 first; X25519 and secp256r1 still
    /// accepted) or classical (X25519 and secp256r1 only, for a peer or a
    /// network device that cannot take the larger ClientHello).
    #[arg(long, env = "FERRY_KEY_EXCHANGE", default_value = "post-quantum")]
    pub key_exchange: ferry_proto::crypto::KeyExchange,
}

#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// The agent's admin address.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Print what the agent answered (JSON, or the metrics text) instead of a table.
    #[arg(long)]
    pub raw: bool,
    /// What to show.
    pub view: crate::inspect::View,
}

/// Why `--admin-addr` was refused.
#[derive(Debug, thiserror::Error)]
enum AdminAddrError {
    #[error("{input:?}: {source}")]
    Parse {
        input: String,
        source: std::net::AddrParseError,
    },
    #[error(transparent)]
    NotLoopback(#[from] crate::admin::NotLoopback),
}

fn parse_admin_addr(s: &str) -> Result<SocketAddr, AdminAddrError> {
    let addr: SocketAddr = s.parse().map_err(|source| AdminAddrError::Parse {
        input: s.to_owned(),
        source,
    })?;
    Ok(crate::admin::check_admin_addr(addr)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_must_listen_on_localhost() {
        let args = [
            "ferry-agent",
            "run",
            "--node",
            "n1",
            "--workloads",
            "w.yaml",
            "--admin-addr",
            "0.0.0.0:15000",
        ];
        let error = Cli::try_parse_from(args).unwrap_err().to_string();
        assert!(error.contains("not a loopback address"), "{error}");
    }

    #[test]
    fn defaults_are_the_documented_ports() {
        let Command::Run(args) =
            Cli::try_parse_from(["ferry-agent", "run", "--node", "n1", "--workloads", "w"])
                .unwrap()
                .command
        else {
            panic!("not run")
        };
        assert_eq!(args.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!((args.outbound_port, args.probe_port), (15001, 15021));
    }

    #[test]
    fn one_workload_source_is_required() {
        let error = Cli::try_parse_from(["ferry-agent", "run", "--node", "n1"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--workloads"), "{error}");
        let error = Cli::try_parse_from([
            "ferry-agent",
            "run",
            "--node",
            "n1",
            "--workloads",
            "w",
            "--kubernetes",
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("cannot be used with"), "{error}");
    }

    #[test]
    fn kubernetes_needs_the_node_addresses() {
        let base = ["ferry-agent", "run", "--node", "n1", "--kubernetes"];
        let error = Cli::try_parse_from(base).unwrap_err().to_string();
        assert!(error.contains("--node-address"), "{error}");
        let Command::Run(args) = Cli::try_parse_from(
            base.iter()
                .copied()
                .chain(["--node-address", "198.19.0.1,2001:2::1"]),
        )
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        assert_eq!(args.source.node_addresses.len(), 2);
        assert_eq!(args.source.cgroup_root, PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn the_command_line_names_a_view_and_defaults_to_the_admin_address() {
        use clap::Parser as _;

        use crate::inspect::View;
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["ferry-agent", "inspect"].iter().chain(args))
                .map(|cli| cli.command)
        };
        let Ok(Command::Inspect(args)) = parse(&["certs"]) else {
            panic!("inspect certs does not parse");
        };
        assert_eq!(
            (args.admin_addr, args.view, args.raw),
            ("127.0.0.1:15000".parse().unwrap(), View::Certs, false)
        );
        let Ok(Command::Inspect(args)) =
            parse(&["--admin-addr", "127.0.0.1:16000", "--raw", "pool"])
        else {
            panic!("inspect with flags does not parse");
        };
        assert_eq!(
            (args.admin_addr.port(), args.view, args.raw),
            (16000, View::Pool, true)
        );
        let error = parse(&["everything"]).unwrap_err().to_string();
        assert!(
            error.contains(
                "possible values: workloads, certs, connections, pool, policies, config, metrics"
            ),
            "{error}"
        );
    }
}
