//! The agent put together: binds its ports (or takes them over from the
//! agent it replaces), loads capture, starts the workload source, the
//! certificate manager and the shards that carry connections, serves the
//! admin endpoint, and runs until SIGINT or SIGTERM or a successor takes
//! over; then it drains ([`lifecycle`]).

mod lifecycle;
mod memory;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::watch;

use lifecycle::{Listeners, Signals};

use crate::{
    admin::{self, AdminState},
    capture::{self, Capture, CaptureStatus, Redirect},
    cli::{IdentityArgs, RunArgs},
    drain::Drain,
    handover::{self, Predecessor},
    identity::{self, CertManager, IdentityConfig, ca_client::CaClient},
    metrics::Metrics,
    proxy::{
        Balancer, ProxyInputs,
        connections::Connections,
        inbound::Inbound,
        outbound::{Mesh, Outbound},
        revocation, spread,
    },
    shard::Shard,
    tunnel::{
        client::TlsDialer,
        pool::{self, Pool, PoolView},
        server::Server,
    },
    workload::{FileSource, KubeSource, LocalNode, PolicySettings, Source, WorkloadTable},
};

/// How long an agent that starts alone holds its first accepts back while
/// it gets ready (certificates from the CA take tens of milliseconds).
const FIRST_ACCEPT_WAIT: Duration = Duration::from_secs(5);

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
    let mut signals = Signals::new()?;
    let shards = args.worker_threads.map_or(1, std::num::NonZeroUsize::get);
    let (source, table) = load_workloads(&args).await?;
    let redirect = Redirect::for_node(&table.node, args.outbound_port)?;
    tracing::info!(node = %args.node, addresses = ?table.node.addresses, pods = table.workloads.len(), "starting");
    handover::prepare_dir(&args.lifecycle.handover_dir, &args.node)?;
    let handover_path = handover::socket_path(&args.lifecycle.handover_dir, &args.node);
    let mut predecessor = Predecessor::find(&handover_path)
        .await
        .context("cannot take over from the agent running on this node")?;
    if let Some(predecessor) = &predecessor {
        tracing::info!(
            predecessor = predecessor.pid,
            "an agent runs on this node: taking over its listening sockets; it serves until this one is ready"
        );
    }
    let listeners = Listeners::open(&args, &table.node, predecessor.as_mut(), &handover_path)?;

    let (mut capture, original_dsts) = Capture::load(&args.bpffs_root, &args.node, redirect)?;
    let node_local = capture::node_local_addresses();
    tracing::info!(addresses = ?node_local, "new connections into strict pods are let in only from these");
    capture.allow_inbound_from(&node_local)?;
    let capture_status = Arc::new(CaptureStatus::new(&capture));
    let (table_tx, table_rx) = watch::channel(Arc::new(table));
    let metrics = Arc::new(Metrics::default());
    let drain = Arc::new(Drain::new(Arc::clone(&metrics.drain)));
    let inputs = ProxyInputs {
        workloads: table_rx.clone(),
        connections: Arc::new(Connections::new(Arc::clone(&metrics.proxy), drain.signal())),
        drain: drain.signal(),
    };
    let identities = start_identities(&args.identity, &metrics)?;

    tokio::spawn(source.watch(table_tx));
    let capture_keeper = tokio::spawn(capture::keep_captured(
        capture,
        table_rx.clone(),
        Arc::clone(&capture_status),
        Arc::clone(&metrics.capture),
    ));
    if let Some(identities) = &identities {
        identities.follow(table_rx.clone());
    }
    tokio::spawn(memory::return_freed());
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
    let mut shard_list = Vec::new();
    let mut outbound_listeners =
        spread::share(&listeners.outbound, shards, "outbound", &metrics.spread)
            .context("cannot share the outbound listeners with the shards")?
            .into_iter();
    let mut tunnel_listeners = spread::share(&listeners.tunnel, shards, "tunnel", &metrics.spread)
        .context("cannot share the tunnel listeners with the shards")?
        .into_iter();
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
        shard_list.push(Shard {
            index,
            outbound,
            inbound: inbound.clone(),
            outbound_listeners: outbound_listeners.next().unwrap_or_default(),
            tunnel_listeners: tunnel_listeners.next().unwrap_or_default(),
        });
    }
    let pool_view = (!pools.is_empty()).then(|| {
        Arc::new(move || pool::merged_view(pools.iter().map(AsRef::as_ref)))
            as Arc<dyn Fn() -> PoolView + Send + Sync>
    });
    let connections = Arc::clone(&inputs.connections);
    let state = Arc::new(AdminState {
        config: serde_json::to_value(&args).unwrap_or_default(),
        workloads: table_rx,
        capture: capture_status,
        connections: inputs.connections,
        metrics,
        identities: identities.map(|manager| manager as Arc<dyn admin::IdentityState>),
        pool: pool_view,
        drain: Arc::clone(&drain),
    });

    // The admin endpoint: at once when this agent is alone; beside a
    // running agent only once this one serves (until then that one answers).
    let (handed_over, handed_over_rx) = watch::channel(false);
    let admin_ports = AdminPorts {
        admin: lifecycle::tokio_listener(&listeners.admin)?,
        probe: lifecycle::tokio_listener(&listeners.probe)?,
        state: Arc::clone(&state),
        handed_over: handed_over_rx,
    };
    let admin_ports = match predecessor {
        Some(_) => Some(admin_ports),
        None => {
            drain.set_not_ready(Some("starting: not accepting connections yet".to_owned()));
            admin_ports.serve();
            tracing::info!(addr = %args.admin_addr, "admin endpoint ready");
            None
        }
    };

    // Beside a running agent, accept nothing until ready: until then that
    // agent accepts on these same sockets. Alone, wait a little: the
    // connections that arrive meanwhile queue on the bound sockets, and a
    // peer's dial waits for this node's certificates instead of failing
    // its handshake (and backing off) while they are requested.
    let alone = predecessor.is_none();
    let ready = async {
        if alone {
            tokio::time::timeout(FIRST_ACCEPT_WAIT, lifecycle::ready(&state))
                .await
                .is_ok()
        } else {
            lifecycle::ready(&state).await;
            true
        }
    };
    tokio::select! {
        ready = ready => {
            if !ready {
                tracing::warn!(reasons = ?state.not_ready_to_serve(), waited = ?FIRST_ACCEPT_WAIT, "accepting connections before the agent is ready");
            }
        }
        () = signals.recv() => {
            tracing::info!("stopped before it was ready; a running agent keeps the node");
            return Ok(());
        }
    }
    for shard in shard_list {
        shard.start()?;
    }
    drain.set_not_ready(None);
    for listener in &listeners.outbound {
        tracing::info!(addr = %listener.local_addr()?, shards, "outbound listener ready");
    }
    for listener in &listeners.tunnel {
        tracing::info!(addr = %listener.local_addr()?, shards, "inbound tunnel listener ready");
    }
    if let Some(ports) = admin_ports {
        ports.serve();
        tracing::info!(addr = %args.admin_addr, "admin endpoint ready");
    }
    if let Some(predecessor) = predecessor {
        tokio::spawn(lifecycle::take_over(predecessor, Arc::clone(&drain)));
    }

    let ended = lifecycle::Ending {
        listeners,
        drain: &drain,
        connections: &connections,
        handed_over,
        capture_keeper,
        timeout: args.lifecycle.drain_timeout(),
    }
    .run(&mut signals)
    .await;
    if ended == lifecycle::Ended::HandedOver && args.lifecycle.stay_until_terminated {
        // A SIGTERM during the drain is kept by the stream, so this returns at once.
        tracing::info!("waiting for SIGTERM (--stay-until-terminated)");
        signals.recv().await;
    }
    tracing::info!("stopping; pinned capture stays in place for the next agent");
    Ok(())
}

/// The admin and probe ports, to be served until a successor takes them.
struct AdminPorts {
    admin: tokio::net::TcpListener,
    probe: tokio::net::TcpListener,
    state: Arc<AdminState>,
    handed_over: watch::Receiver<bool>,
}

impl AdminPorts {
    fn serve(self) {
        let stop = || {
            let mut handed_over = self.handed_over.clone();
            async move {
                let _ = handed_over.wait_for(|done| *done).await;
            }
        };
        tokio::spawn(admin::serve_admin(
            self.admin,
            Arc::clone(&self.state),
            stop(),
        ));
        tokio::spawn(admin::serve_probe(
            self.probe,
            Arc::clone(&self.state),
            stop(),
        ));
    }
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
    let provider = ferry_proto::crypto::shared_provider(args.key_exchange);
    let client = CaClient::new(
        ca_addr.clone(),
        &args.ca_server_name,
        trust_bundle.clone(),
        Arc::clone(&provider),
    )?;
    let manager = CertManager::new(
        IdentityConfig {
            trust_domain: args.trust_domain.clone(),
            trust_bundle: trust_bundle.clone(),
            token_file: token_file.clone(),
            backoff: identity::CA_BACKOFF,
            provider,
        },
        client,
        Arc::clone(&metrics.identity),
    );
    tracing::info!(ca = %ca_addr, trust_domain = %args.trust_domain, key_exchange = ?args.key_exchange, "getting workload certificates from the CA");
    Ok(Some(manager))
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
