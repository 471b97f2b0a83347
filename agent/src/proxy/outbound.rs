//! The outbound proxy: every connection a meshed pod on this node makes
//! arrives on the outbound listener, redirected by the capture programs.
//! The agent looks up where it was going and who sent it, decides the route
//! ([`route::decide`]), and carries it: through an mTLS tunnel to another
//! node's agent, straight to a meshed pod on this node, or as plain TCP to
//! anything outside the mesh.

use std::{net::SocketAddr, sync::Arc};

use ferry_proto::Untrusted;
use tokio::net::TcpStream;
use tracing::Instrument as _;

use super::{
    Error, ProxyInputs, Refused,
    balancer::Balancer,
    connections::{ConnectionMeta, Grant, Route},
    metrics::Direction,
    relay,
    route::{self, Decision},
    spread::Accepting,
    upstream,
};
use crate::{
    capture::OriginalDsts,
    identity::{CertManager, ca_client::CaClient},
    tunnel::{
        client::{self, TlsDialer},
        pool::Pool,
    },
};

type Dialer = TlsDialer<CertManager<CaClient>>;

/// The mTLS side of the agent: identities and the tunnel pool.
pub struct Mesh {
    pub identities: Arc<CertManager<CaClient>>,
    pub pool: Arc<Pool<Dialer>>,
}

pub struct Outbound {
    pub inputs: ProxyInputs,
    pub original_dsts: Arc<OriginalDsts>,
    /// `None` when the agent runs without a CA: everything passes through.
    pub mesh: Option<Mesh>,
    /// Shared by every shard: it counts this agent's connections per endpoint.
    pub balancer: Arc<Balancer>,
}

impl Outbound {
    pub async fn serve(self: Arc<Self>, listener: Accepting) {
        let drain = self.inputs.drain.clone();
        super::accept_until_drained(listener, "outbound", drain, move |stream, peer| {
            let this = Arc::clone(&self);
            async move { this.handle(stream, peer).await }
        })
        .await;
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let Ok(local) = client.local_addr() else {
            return;
        };
        let Some(original_dst) = self.original_dsts.lookup(peer, local) else {
            tracing::warn!(%peer, %local, "connection to the outbound port was not redirected by Ferry's capture; closing it");
            return self.fail(&client, &Error::Uncaptured);
        };
        let metrics = self.inputs.connections.metrics();
        metrics.connection_captured();
        let table = self.inputs.workloads.borrow().clone();
        let trust_domain = self.mesh.as_ref().map(|m| m.identities.trust_domain());
        // Only connections to a Service's endpoints feed the balancer.
        let mut balanced = false;
        let decision = match route::decide(
            &table,
            peer.ip(),
            original_dst,
            trust_domain,
            &mut |candidates| {
                balanced = true;
                self.balancer.choose(candidates)
            },
        ) {
            Ok(decision) => decision,
            Err(refused) => {
                if let Refused::Policy(denied) = &refused {
                    metrics.policy_denied(Direction::Outbound, denied);
                }
                tracing::warn!(src.addr = %peer, dst.addr = %original_dst, reason = %Untrusted(&refused), "connection refused");
                return self.fail(&client, &Error::Refused(refused));
            }
        };
        if let Decision::Direct { policy, .. } = &decision {
            metrics.policy_allowed(policy.as_deref());
        }
        let target = decision.target();
        let meta = ConnectionMeta {
            source_pod: table.by_ip(peer.ip()).map(|w| w.key()),
            source: peer,
            original_dst,
            destination_pod: match &decision {
                Decision::Passthrough { target } => table.by_ip(target.ip()).map(|w| w.key()),
                Decision::Direct { pod, .. } | Decision::Tunnel { pod, .. } => Some(pod.clone()),
            },
            source_identity: decision.source_identity().map(ToString::to_string),
            destination_identity: decision.destination_identity().map(ToString::to_string),
            route: match &decision {
                Decision::Passthrough { .. } => Route::Passthrough,
                Decision::Direct { .. } => Route::Direct,
                Decision::Tunnel { .. } => Route::Tunnel,
            },
        };
        let span = tracing::info_span!(
            "outbound",
            src.pod = %Untrusted(meta.source_pod.as_deref().unwrap_or("unknown")),
            src.addr = %peer,
            dst.addr = %original_dst,
            dst.pod = %Untrusted(meta.destination_pod.as_deref().unwrap_or("none")),
            route = ?meta.route,
        );
        let _active = balanced.then(|| self.balancer.start(target));
        // Only a same-node connection was admitted here; a tunnelled one is
        // the destination agent's to revoke.
        let grant = match &decision {
            Decision::Direct { source, pod, .. } => Some(Grant {
                caller: source.clone(),
                pod: pod.clone(),
                port: target.port(),
            }),
            Decision::Passthrough { .. } | Decision::Tunnel { .. } => None,
        };
        let tracked = self.inputs.connections.open(meta, grant);
        async move {
            tracing::debug!(connection = tracked.id(), "captured connection");
            let _ = client.set_nodelay(true);
            // Each arm opens its far end and relays, so no value of one
            // arm's kind is held across the other's relay (this future is
            // part of every connection's memory).
            let relayed = match decision {
                Decision::Tunnel { key, .. } => {
                    let mesh = self
                        .mesh
                        .as_ref()
                        .expect("a tunnel decision needs the mesh");
                    match client::open(&mesh.pool, &key, target).await {
                        Ok((stream, checkout)) => {
                            tracing::debug!(
                                connection = checkout.connection_id(),
                                "tunnel stream open"
                            );
                            let relayed = relay::relay_tunnel(
                                tracked.client_end(client),
                                stream,
                                tracked.stopped(),
                            )
                            .await;
                            drop(checkout);
                            relayed
                        }
                        Err(error) => return self.upstream_failed(&client, &error.into()),
                    }
                }
                Decision::Passthrough { .. } | Decision::Direct { .. } => {
                    match upstream::connect(target).await {
                        Ok(socket) => {
                            relay::relay(tracked.client_end(client), socket, tracked.stopped())
                                .await
                        }
                        Err(error) => return self.upstream_failed(&client, &error),
                    }
                }
            };
            tracked.finish(relayed);
        }
        .instrument(span)
        .await;
    }

    fn upstream_failed(&self, client: &TcpStream, error: &Error) {
        tracing::warn!(
            error = %Untrusted(error),
            "cannot reach the original destination; resetting the client"
        );
        self.fail(client, error);
    }

    /// Counts the failure; the client sees it as a reset, never a hang.
    fn fail(&self, client: &TcpStream, error: &Error) {
        self.inputs
            .connections
            .metrics()
            .connection_failed(Direction::Outbound, error.reason());
        relay::reset(client);
    }
}
