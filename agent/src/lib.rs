//! Ferry's node agent: captures the meshed pods of its node with eBPF and
//! carries their connections.

pub mod admin;
pub mod backoff;
pub mod capture;
pub mod cli;
pub mod identity;
pub mod inspect;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod shard;
pub mod tunnel;
pub mod workload;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use ferry_proto::SpiffeId;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    admin::{AdminState, CaptureView, Readiness},
    capture::{Capture, Redirect},
    cli::RunArgs,
    identity::{CertManager, IdentityConfig, ca_client::CaClient},
    proxy::{
        connections::Connections,
        outbound::{Balancer, Mesh, Outbound},
    },
    shard::Shard,
    tunnel::{client::TlsDialer, inbound::Inbound, pool::Pool},
    workload::{FileSource, KubeSource, LocalNode, Source, WorkloadTable},
};

/// How soon a pod whose capture failed is tried again.
pub const CAPTURE_RETRY: Duration = Duration::from_secs(5);

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

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let shards = args.worker_threads.map_or(1, std::num::NonZeroUsize::get);
    let (source, table) = load_workloads(&args).await?;
    let redirect = redirect_for(&table, args.outbound_port)?;
    tracing::info!(node = %args.node, addresses = ?table.node.addresses, pods = table.workloads.len(), "starting");

    // Bind everything first: a port in use is a start-up error, not a later surprise.
    let mut outbound_listeners = Vec::new();
    for ip in &table.node.addresses {
        let addr = SocketAddr::new(*ip, args.outbound_port);
        outbound_listeners
            .push(shard::bind(addr).with_context(|| format!("outbound listener on {addr}"))?);
    }
    let mut tunnel_listeners = Vec::new();
    if args.identity.ca_addr.is_some() {
        for ip in &table.node.addresses {
            let addr = SocketAddr::new(*ip, ferry_proto::TUNNEL_PORT);
            tunnel_listeners.push(
                shard::bind(addr).with_context(|| format!("inbound tunnel listener on {addr}"))?,
            );
        }
    }
    let admin = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("admin on {}", args.admin_addr))?;
    let probe_addr = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), args.probe_port);
    let probe = TcpListener::bind(probe_addr)
        .await
        .with_context(|| format!("readiness probe on {probe_addr}"))?;

    let (mut capture, original_dsts) = Capture::load(&args.bpffs_root, &args.node, redirect)?;
    let node_local = local_addresses();
    tracing::info!(addresses = ?node_local, "new connections into strict pods are let in only from these");
    capture.allow_inbound_from(&node_local)?;
    let (table_tx, table_rx) = watch::channel(Arc::new(table));
    let readiness = Arc::new(Readiness::not_ready("pods not captured yet"));
    let capture_view = Arc::new(Mutex::new(CaptureView {
        pin_dir: capture.pin_dir().display().to_string(),
        ..Default::default()
    }));
    let metrics = Arc::new(metrics::Metrics::default());
    let connections = Arc::new(Connections::new(Arc::clone(&metrics)));
    let identities = start_identities(&args.identity, table_rx.clone(), &metrics)?;

    tokio::spawn(source.watch(table_tx));
    tokio::spawn(keep_captured(
        capture,
        table_rx.clone(),
        Arc::clone(&capture_view),
        Arc::clone(&readiness),
        Arc::clone(&metrics),
    ));

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inbound = identities.as_ref().map(|identities| {
        Arc::new(Inbound::new(
            args.node.clone(),
            identities.trust_domain().to_owned(),
            table_rx.clone(),
            Arc::clone(identities),
            Arc::clone(&provider),
            Arc::clone(&connections),
        ))
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
                    provider: Arc::clone(&provider),
                },
                Arc::clone(&metrics),
            ),
        });
        pools.extend(mesh.as_ref().map(|mesh| Arc::clone(&mesh.pool)));
        let outbound = Arc::new(Outbound {
            workloads: table_rx.clone(),
            original_dsts: Arc::clone(&original_dsts),
            connections: Arc::clone(&connections),
            mesh,
            balancer: Arc::clone(&balancer),
        });
        Shard {
            index,
            outbound,
            inbound: inbound.clone(),
            outbound_listeners: try_clone_all(&outbound_listeners)?,
            tunnel_listeners: try_clone_all(&tunnel_listeners)?,
        }
        .start()?;
    }
    for listener in &outbound_listeners {
        tracing::info!(addr = %listener.local_addr()?, shards, "outbound listener ready");
    }
    for listener in &tunnel_listeners {
        tracing::info!(addr = %listener.local_addr()?, shards, "inbound tunnel listener ready");
    }
    let pool_view = (!pools.is_empty()).then(|| {
        Arc::new(move || tunnel::pool::merged_view(pools.iter().map(AsRef::as_ref)))
            as Arc<dyn Fn() -> tunnel::pool::PoolView + Send + Sync>
    });
    let state = Arc::new(AdminState {
        config: serde_json::to_value(&args).unwrap_or_default(),
        workloads: table_rx,
        attachments: capture_view,
        connections,
        readiness,
        metrics,
        identities: identities.map(|manager| manager as Arc<dyn admin::IdentityState>),
        pool: pool_view,
    });
    tracing::info!(addr = %args.admin_addr, "admin endpoint ready");
    tokio::spawn(admin::serve_admin(admin, Arc::clone(&state)));
    tokio::spawn(admin::serve_probe(probe, state));

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
    if let Some(path) = &source.workloads {
        let (file, table) = FileSource::load(path.clone(), args.node.clone())?;
        return Ok((Source::File(file), table));
    }
    let client = workload::kube_source::client(source.kubeconfig.as_deref())
        .await
        .context("cannot reach the Kubernetes API")?;
    let node = LocalNode {
        name: args.node.clone(),
        addresses: source.node_addresses.clone(),
    };
    tracing::info!(node = %node.name, "listing namespaces, pods, services and endpointslices");
    let (kube, table) = KubeSource::start(client, node, source.cgroup_root.clone()).await?;
    Ok((Source::Kubernetes(kube), table))
}

/// Starts the certificate manager when the agent has a CA, and keeps its
/// identities in step with the ServiceAccounts of this node's meshed pods.
fn start_identities(
    args: &cli::IdentityArgs,
    mut tables: watch::Receiver<Arc<WorkloadTable>>,
    metrics: &Arc<metrics::Metrics>,
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
        },
        client,
        Arc::clone(metrics),
    );
    let follower = Arc::clone(&manager);
    tokio::spawn(async move {
        loop {
            let table = tables.borrow_and_update().clone();
            follower.set_identities(&local_identities(&table, follower.trust_domain()));
            if tables.changed().await.is_err() {
                return;
            }
        }
    });
    tracing::info!(ca = %ca_addr, trust_domain = %args.trust_domain, "getting workload certificates from the CA");
    Ok(Some(manager))
}

/// The identities this node's meshed pods run as.
fn local_identities(table: &WorkloadTable, trust_domain: &str) -> BTreeSet<SpiffeId> {
    table
        .local_meshed()
        .filter_map(
            |pod| match SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account) {
                Ok(identity) => Some(identity),
                Err(error) => {
                    tracing::error!(pod = %pod.key(), %error, "pod has no valid identity");
                    None
                }
            },
        )
        .collect()
}

/// Every address of this node's network namespace, and loopback: where a
/// strict pod accepts plaintext connections from (its agent, kubelet probes).
fn local_addresses() -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = vec![
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    ];
    match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => {
            for interface in interfaces {
                let Some(address) = interface.address else {
                    continue;
                };
                if let Some(v4) = address.as_sockaddr_in() {
                    addresses.push(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = address.as_sockaddr_in6() {
                    addresses.push(IpAddr::V6(v6.ip()));
                }
            }
        }
        Err(error) => {
            tracing::error!(%error, "cannot list this node's addresses; strict pods accept plaintext only from loopback")
        }
    }
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Where the capture programs send connections: this node's addresses.
fn redirect_for(table: &WorkloadTable, port: u16) -> anyhow::Result<Redirect> {
    let addrs = &table.node.addresses;
    let ipv4 = addrs.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let ipv6 = addrs.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    anyhow::ensure!(
        ipv4.is_some() || ipv6.is_some(),
        "node {} has no addresses in the workload source; the agent needs one to receive captured connections",
        table.node.name
    );
    Ok(Redirect { ipv4, ipv6, port })
}

/// Keeps the capture programs on exactly this node's meshed pods as the
/// workload table changes; retries pods that failed.
async fn keep_captured(
    mut capture: Capture,
    mut tables: watch::Receiver<Arc<WorkloadTable>>,
    view: Arc<Mutex<CaptureView>>,
    readiness: Arc<Readiness>,
    metrics: Arc<metrics::Metrics>,
) {
    loop {
        let table = tables.borrow_and_update().clone();
        let failures: Vec<String> = capture
            .reconcile(table.local_meshed().map(AsRef::as_ref))
            .iter()
            .map(ToString::to_string)
            .collect();
        for failure in &failures {
            tracing::error!(error = %failure, "capture failed; retrying in {CAPTURE_RETRY:?}");
        }
        readiness.set(failures.iter().map(|f| format!("capture: {f}")).collect());
        metrics.capture_reconciled(capture.attachments().count(), failures.len());
        {
            let mut view = view.lock().expect("capture view lock");
            view.attached = capture.attachments().cloned().collect();
            view.failures = failures.clone();
        }
        let changed = tables.changed();
        if failures.is_empty() {
            if changed.await.is_err() {
                return;
            }
        } else {
            tokio::select! {
                result = changed => if result.is_err() { return },
                () = tokio::time::sleep(CAPTURE_RETRY) => {}
            }
        }
    }
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
