//! The outbound proxy: every connection a meshed pod on this node makes
//! arrives on the outbound listener, redirected by the capture programs.
//! The agent looks up where it was going and who sent it, decides the route
//! ([`route::decide`]), and carries it: through an mTLS tunnel to another
//! node's agent, straight to a meshed pod on this node, or as plain TCP to
//! anything outside the mesh.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use super::{
    Error, ProxyInputs,
    balancer::Balancer,
    connections::{ConnectionMeta, Route},
    metrics::Direction,
    relay,
    route::{self, Decision},
    upstream,
};
use crate::{
    capture::OriginalDsts,
    identity::{CertManager, ca_client::CaClient},
    tunnel::{
        client::{self, TlsDialer},
        pool::{Checkout, Pool},
        stream::TunnelStream,
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

/// Where a connection's bytes go once the agent has opened its far end.
// Moved once, on one connection's task; boxing would allocate per connection.
#[allow(clippy::large_enum_variant)]
enum Upstream {
    Tunnel(TunnelStream, Checkout<Dialer>),
    Socket(TcpStream),
}

impl Outbound {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        super::accept_forever(listener, "outbound", move |stream, peer| {
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
        let decided = route::decide(
            &table,
            peer.ip(),
            original_dst,
            trust_domain,
            &mut |candidates| {
                balanced = true;
                self.balancer.choose(candidates)
            },
        );
        let decision = match decided {
            Ok(decision) => decision,
            Err(refused) => {
                tracing::warn!(src.addr = %peer, dst.addr = %original_dst, reason = %refused, "connection refused");
                return self.fail(&client, &Error::Refused(refused));
            }
        };
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
            src.pod = meta.source_pod.as_deref().unwrap_or("unknown"),
            src.addr = %peer,
            dst.addr = %original_dst,
            dst.pod = meta.destination_pod.as_deref().unwrap_or("none"),
            route = ?meta.route,
        );
        let _active = balanced.then(|| self.balancer.start(target));
        let tracked = self.inputs.connections.open(meta);
        async move {
            tracing::debug!(connection = tracked.id(), "captured connection");
            let _ = client.set_nodelay(true);
            match self.open_upstream(decision).await {
                Ok(Upstream::Tunnel(stream, checkout)) => {
                    tracing::debug!(connection = checkout.connection_id(), "tunnel stream open");
                    let relayed = relay::relay_tunnel(tracked.client_end(client), stream);
                    tracked.finish(relayed).await;
                    drop(checkout);
                }
                Ok(Upstream::Socket(socket)) => {
                    let relayed = relay::relay(tracked.client_end(client), socket);
                    tracked.finish(relayed).await;
                }
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "cannot reach the original destination; resetting the client"
                    );
                    self.fail(&client, &error);
                }
            }
        }
        .instrument(span)
        .await;
    }

    /// Opens the far end the decision names: a tunnel stream, or a socket.
    async fn open_upstream(&self, decision: Decision) -> Result<Upstream, Error> {
        let target = decision.target();
        match decision {
            Decision::Tunnel { key, .. } => {
                let mesh = self
                    .mesh
                    .as_ref()
                    .expect("a tunnel decision needs the mesh");
                let (stream, checkout) = client::open(&mesh.pool, &key, target).await?;
                Ok(Upstream::Tunnel(stream, checkout))
            }
            Decision::Passthrough { .. } | Decision::Direct { .. } => {
                Ok(Upstream::Socket(upstream::connect(target).await?))
            }
        }
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
