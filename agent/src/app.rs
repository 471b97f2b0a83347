//! The agent put together: binds its ports, loads capture, starts the
//! workload source, the certificate manager and the shards that carry
//! connections, serves the admin endpoint, and runs until SIGINT or SIGTERM.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    admin::{self, AdminState},
    capture::{self, Capture, CaptureStatus, Redirect},
    cli::{IdentityArgs, RunArgs},
    identity::{self, CertManager, IdentityConfig, ca_client::CaClient},
    metrics::Metrics,
    proxy::{
        Balancer, ProxyInputs,
        connections::Connections,
        inbound::Inbound,
        outbound::{Mesh, Outbound},
        revocation,
    },
    shard::{self, Shard},
    tunnel::{
        client::TlsDialer,
        pool::{self, Pool, PoolView},
        server::Server,
    },
    workload::{FileSource, KubeSource, LocalNode, PolicySettings, Source, WorkloadTable},
};

/// Runs the agent until SIGINT or SIGTERM. Pinned capture stays in place when
/// it stops, so pods keep being redirected across a restart.
pub fn run(mut args: RunArgs) -> anyhow::Result<()> {
    match raise_open_files_limit() {
        Ok((before, now)) => tracing::info!(before, now, "open files limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
    }
    // Resolved here, so `/config_dump` shows the count in use.
    args.worker_threads = args
        .worker_threads
        .or_else(|| std::thread::available_parallelism().ok());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

/// Raises the soft limit on open files to the hard one; returns the soft
/// limit before and the one now. A relayed connection holds two sockets, and a same-node one
/// up to two pipes more (four descriptors): the soft limit a process often
/// starts with (1,024) would cap the agent long before memory does.
fn raise_open_files_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

/// The listening sockets, bound before anything else starts: a port in use
/// is a start-up error, not a later surprise.
struct Listeners {
    outbound: Vec<std::net::TcpListener>,
    /// Empty without a CA: no tunnel to accept.
    tunnel: Vec<std::net::TcpListener>,
    admin: TcpListener,
    probe: TcpListener,
}

impl Listeners {
    async fn bind(args: &RunArgs, node: &LocalNode) -> anyhow::Result<Self> {
        let mut outbound = Vec::new();
        for ip in &node.addresses {
            let addr = SocketAddr::new(*ip, args.outbound_port);
            outbound
                .push(shard::bind(addr).with_context(|| format!("outbound listener on {addr}"))?);
        }
        let mut tunnel = Vec::new();
        if args.identity.ca_addr.is_some() {
            for ip in &node.addresses {
                let addr = SocketAddr::new(*ip, ferry_proto::TUNNEL_PORT);
                tunnel.push(
                    shard::bind(addr)
                        .with_context(|| format!("inbound tunnel listener on {addr}"))?,
                );
            }
        }
        let admin = TcpListener::bind(args.admin_addr)
            .await
            .with_context(|| format!("admin on {}", args.admin_addr))?;
        let probe_addr =
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), args.probe_port);
        let probe = TcpListener::bind(probe_addr)
            .await
            .with_context(|| format!("readiness probe on {probe_addr}"))?;
        Ok(Self {
            outbound,
            tunnel,
            admin,
            probe,
        })
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let shards = args.worker_threads.map_or(1, std::num::NonZeroUsize::get);
    let (source, table) = load_workloads(&args).await?;
    let redirect = Redirect::for_node(&table.node, args.outbound_port)?;
    tracing::info!(node = %args.node, addresses = ?table.node.addresses, pods = table.workloads.len(), "starting");
    let listeners = Listeners::bind(&args, &table.node).await?;

    let (mut capture, original_dsts) = Capture::load(&args.bpffs_root, &args.node, redirect)?;
    let node_local = capture::node_local_addresses();
    tracing::info!(addresses = ?node_local, "new connections into strict pods are let in only from these");
    capture.allow_inbound_from(&node_local)?;
    let capture_status = Arc::new(CaptureStatus::new(&capture));
    let (table_tx, table_rx) = watch::channel(Arc::new(table));
    let metrics = Arc::new(Metrics::default());
    let inputs = ProxyInputs {
        workloads: table_rx.clone(),
        connections: Arc::new(Connections::new(Arc::clone(&metrics.proxy))),
    };
    let identities = start_identities(&args.identity, &metrics)?;

    tokio::spawn(source.watch(table_tx));
    tokio::spawn(capture::keep_captured(
        capture,
        table_rx.clone(),
        Arc::clone(&capture_status),
        Arc::clone(&metrics.capture),
    ));
    if let Some(identities) = &identities {
        identities.follow(table_rx.clone());
    }
    tokio::spawn(revocation::follow_policies(
        table_rx.clone(),
        Arc::clone(&inputs.connections),
    ));

    let inbound = identities.as_ref().map(|identities| {
        Arc::new(Inbound {
            node: args.node.clone(),
            inputs: inputs.clone(),
            server: Server::new(
                identities.trust_domain().to_owned(),
                Arc::clone(identities),
                Arc::clone(&metrics.tunnel),
            ),
        })
    });
    let original_dsts = Arc::new(original_dsts);
    let balancer = Arc::new(Balancer::default());
    let mut pools = Vec::new();
    for index in 0..shards {
        // Each shard dials and keeps its own tunnel connections, so a
        // connection's relay and the pooled connection it rides on share a thread.
        let mesh = identities.as_ref().map(|identities| Mesh {
            identities: Arc::clone(identities),
            pool: Pool::new(
                args.tunnel.pool_config(),
                TlsDialer {
                    identities: Arc::clone(identities),
                },
                Arc::clone(&metrics.tunnel),
            ),
        });
        pools.extend(mesh.as_ref().map(|mesh| Arc::clone(&mesh.pool)));
        let outbound = Arc::new(Outbound {
            inputs: inputs.clone(),
            original_dsts: Arc::clone(&original_dsts),
            mesh,
            balancer: Arc::clone(&balancer),
        });
        Shard {
            index,
            outbound,
            inbound: inbound.clone(),
            outbound_listeners: try_clone_all(&listeners.outbound)?,
            tunnel_listeners: try_clone_all(&listeners.tunnel)?,
        }
        .start()?;
    }
    for listener in &listeners.outbound {
        tracing::info!(addr = %listener.local_addr()?, shards, "outbound listener ready");
    }
    for listener in &listeners.tunnel {
        tracing::info!(addr = %listener.local_addr()?, shards, "inbound tunnel listener ready");
    }
    let pool_view = (!pools.is_empty()).then(|| {
        Arc::new(move || pool::merged_view(pools.iter().map(AsRef::as_ref)))
            as Arc<dyn Fn() -> PoolView + Send + Sync>
    });
    let state = Arc::new(AdminState {
        config: serde_json::to_value(&args).unwrap_or_default(),
        workloads: table_rx,
        capture: capture_status,
        connections: inputs.connections,
        metrics,
        identities: identities.map(|manager| manager as Arc<dyn admin::IdentityState>),
        pool: pool_view,
    });
    tracing::info!(addr = %args.admin_addr, "admin endpoint ready");
    tokio::spawn(admin::serve_admin(listeners.admin, Arc::clone(&state)));
    tokio::spawn(admin::serve_probe(listeners.probe, state));

    shutdown_signal().await;
    tracing::info!("stopping; pinned capture stays in place for the next agent");
    Ok(())
}

/// A handle per shard on each listening socket.
fn try_clone_all(
    listeners: &[std::net::TcpListener],
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    listeners
        .iter()
        .map(|l| {
            l.try_clone()
                .context("cannot share a listening socket with a shard")
        })
        .collect()
}

/// The first table from the source the command line names, and the source
/// to keep it current.
async fn load_workloads(args: &RunArgs) -> anyhow::Result<(Source, WorkloadTable)> {
    let source = &args.source;
    let settings = PolicySettings {
        trust_domain: args.identity.trust_domain.clone(),
        cluster_default: args.default_inbound_policy,
    };
    if let Some(path) = &source.workloads {
        let (file, table) = FileSource::load(path.clone(), args.node.clone(), settings)?;
        return Ok((Source::File(file), table));
    }
    let client = crate::workload::kube_source::client(source.kubeconfig.as_deref())
        .await
        .context("cannot reach the Kubernetes API")?;
    let node = LocalNode {
        name: args.node.clone(),
        addresses: source.node_addresses.clone(),
    };
    tracing::info!(node = %node.name, "listing namespaces, pods, services and endpointslices");
    let (kube, table) =
        KubeSource::start(client, node, source.cgroup_root.clone(), settings).await?;
    Ok((Source::Kubernetes(kube), table))
}

/// The certificate manager, when the agent has a CA.
fn start_identities(
    args: &IdentityArgs,
    metrics: &Metrics,
) -> anyhow::Result<Option<Arc<CertManager<CaClient>>>> {
    let (Some(ca_addr), Some(trust_bundle), Some(token_file)) =
        (&args.ca_addr, &args.trust_bundle, &args.token_file)
    else {
        tracing::warn!(
            "no --ca-addr: running without workload identities; captured connections are relayed in plaintext"
        );
        return Ok(None);
    };
    let client = CaClient::new(ca_addr.clone(), &args.ca_server_name, trust_bundle.clone())?;
    let manager = CertManager::new(
        IdentityConfig {
            trust_domain: args.trust_domain.clone(),
            trust_bundle: trust_bundle.clone(),
            token_file: token_file.clone(),
            backoff: identity::CA_BACKOFF,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        },
        client,
        Arc::clone(&metrics.identity),
    );
    tracing::info!(ca = %ca_addr, trust_domain = %args.trust_domain, "getting workload certificates from the CA");
    Ok(Some(manager))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // One below: low enough to show the raise, high enough that tests
        // running beside this one keep their descriptors.
        setrlimit(Resource::RLIMIT_NOFILE, hard - 1, hard).unwrap();
        assert_eq!(super::raise_open_files_limit(), Ok((hard - 1, hard)));
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE), Ok((hard, hard)));
    }
}
