//! The outbound listener: every connection a meshed pod on this node makes
//! arrives here, redirected by the capture programs. The agent looks up where
//! it was going and who sent it, decides the route ([`route::decide`]), and
//! carries it: through an mTLS tunnel to another node's agent, straight to a
//! meshed pod on this node, or as plain TCP to anything outside the mesh.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::Instrument as _;

use super::{
    connections::{ConnectionInfo, Connections, Route},
    relay,
    route::{self, Decision},
};
use crate::{
    capture::OriginalDsts,
    identity::{CertManager, ca_client::CaClient},
    metrics::{Direction, Failure, Metrics},
    tunnel::{
        client::{self, TlsDialer},
        pool::Pool,
    },
    workload::WorkloadTable,
};

/// How long the agent waits for a destination to accept before resetting the client.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The mTLS side of the agent: identities and the tunnel pool.
pub struct Mesh {
    pub identities: Arc<CertManager<CaClient>>,
    pub pool: Arc<Pool<TlsDialer<CertManager<CaClient>>>>,
}

pub struct Outbound {
    pub workloads: watch::Receiver<Arc<WorkloadTable>>,
    pub original_dsts: Arc<OriginalDsts>,
    pub connections: Arc<Connections>,
    /// `None` when the agent runs without a CA: everything passes through.
    pub mesh: Option<Mesh>,
    /// Shared by every shard: it counts this agent's connections per endpoint.
    pub balancer: Arc<Balancer>,
}

/// Picks a Service endpoint: the less busy of two chosen at random (power of
/// two choices), counting the connections this agent has open to each.
#[derive(Debug, Default)]
pub struct Balancer {
    active: Mutex<HashMap<SocketAddr, usize>>,
}

impl Balancer {
    pub fn choose(&self, candidates: &[SocketAddr]) -> usize {
        if candidates.len() < 2 {
            return 0;
        }
        let n = candidates.len();
        let a = random_below(n);
        let b = (a + 1 + random_below(n - 1)) % n;
        let active = self.active.lock().expect("balancer lock");
        let load = |i: usize| active.get(&candidates[i]).copied().unwrap_or(0);
        if load(b) < load(a) { b } else { a }
    }

    /// Counts a connection to `target` until the guard drops.
    fn start(&self, target: SocketAddr) -> ActiveGuard<'_> {
        *self
            .active
            .lock()
            .expect("balancer lock")
            .entry(target)
            .or_default() += 1;
        ActiveGuard {
            balancer: self,
            target,
        }
    }
}

struct ActiveGuard<'a> {
    balancer: &'a Balancer,
    target: SocketAddr,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        let mut active = self.balancer.active.lock().expect("balancer lock");
        if let Some(count) = active.get_mut(&self.target) {
            *count -= 1;
            if *count == 0 {
                active.remove(&self.target);
            }
        }
    }
}

fn random_below(n: usize) -> usize {
    ((crate::backoff::jitter_sample() * n as f64) as usize).min(n - 1)
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
            self.metrics()
                .connection_failed(Direction::Outbound, Failure::Uncaptured);
            tracing::warn!(%peer, %local, "connection to the outbound port was not redirected by Ferry's capture; closing it");
            relay::reset(&client);
            return;
        };
        self.metrics().connection_captured();
        let table = self.workloads.borrow().clone();
        let source_pod = table.by_ip(peer.ip()).map(|w| w.key());
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
            Err(reason) => {
                self.metrics()
                    .connection_failed(Direction::Outbound, Failure::Denied);
                tracing::warn!(src.addr = %peer, dst.addr = %original_dst, %reason, "connection refused");
                relay::reset(&client);
                return;
            }
        };
        let (route, destination_pod, source_identity, destination_identity) = match &decision {
            Decision::Passthrough { target } => (
                Route::Passthrough,
                table.by_ip(target.ip()).map(|w| w.key()),
                None,
                None,
            ),
            Decision::Direct {
                source,
                destination,
                pod,
                ..
            } => (
                Route::Direct,
                Some(pod.clone()),
                Some(source.to_string()),
                Some(destination.to_string()),
            ),
            Decision::Tunnel { key, pod, .. } => (
                Route::Tunnel,
                Some(pod.clone()),
                Some(key.source.to_string()),
                Some(key.destination.to_string()),
            ),
        };
        let span = tracing::info_span!(
            "outbound",
            src.pod = source_pod.as_deref().unwrap_or("unknown"),
            src.addr = %peer,
            dst.addr = %original_dst,
            dst.pod = destination_pod.as_deref().unwrap_or("none"),
            route = ?route,
        );
        let target = decision.target();
        let _active = balanced.then(|| self.balancer.start(target));
        let tracked = self.connections.open(ConnectionInfo {
            id: 0,
            source_pod,
            source: peer,
            original_dst,
            destination_pod,
            route,
            source_identity,
            destination_identity,
            opened_at_unix_ms: 0,
            bytes_sent: 0,
            bytes_received: 0,
        });
        async move {
            tracing::debug!(connection = tracked.id(), "captured connection");
            let _ = client.set_nodelay(true);
            let result = match decision {
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
                            let result =
                                relay::relay_tunnel(tracked.client_end(client), stream).await;
                            drop(checkout);
                            result
                        }
                        Err(error) => {
                            let failure = match &error {
                                client::OpenError::Refused { status, .. }
                                    if status.is_server_error() =>
                                {
                                    Failure::PeerConnect
                                }
                                client::OpenError::Refused { .. } => Failure::PeerRefused,
                                client::OpenError::Pool(_) | client::OpenError::Stream { .. } => {
                                    Failure::Tunnel
                                }
                            };
                            return self.upstream_failed(&client, failure, &error.to_string());
                        }
                    }
                }
                Decision::Passthrough { .. } | Decision::Direct { .. } => {
                    let upstream =
                        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
                            .await
                        {
                            Ok(Ok(upstream)) => upstream,
                            Ok(Err(error)) => {
                                return self.upstream_failed(
                                    &client,
                                    Failure::Connect,
                                    &error.to_string(),
                                );
                            }
                            Err(_) => {
                                return self.upstream_failed(
                                    &client,
                                    Failure::Connect,
                                    "timed out",
                                );
                            }
                        };
                    let _ = upstream.set_nodelay(true);
                    relay::relay(tracked.client_end(client), upstream).await
                }
            };
            match result {
                Ok((sent, received)) => tracing::info!(sent, received, "connection closed"),
                Err(error) => tracing::info!(%error, "connection reset"),
            }
            drop(tracked);
        }
        .instrument(span)
        .await;
    }

    fn metrics(&self) -> &Metrics {
        self.connections.metrics()
    }

    /// The client sees the destination's refusal as a reset, never a hang.
    fn upstream_failed(&self, client: &TcpStream, failure: Failure, error: &str) {
        self.metrics()
            .connection_failed(Direction::Outbound, failure);
        tracing::warn!(
            error,
            "cannot reach the original destination; resetting the client"
        );
        relay::reset(client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 244, 1, i], 8080)))
            .collect()
    }

    #[test]
    fn of_two_endpoints_the_balancer_picks_the_less_busy_one() {
        let balancer = Balancer::default();
        let endpoints = endpoints(2);
        let busy = [
            balancer.start(endpoints[0]),
            balancer.start(endpoints[0]),
            balancer.start(endpoints[1]),
        ];
        for _ in 0..1_000 {
            assert_eq!(
                balancer.choose(&endpoints),
                1,
                "picked the endpoint with two open connections over the one with one"
            );
        }

        drop(busy);
        let mut picks = [0; 2];
        for _ in 0..1_000 {
            picks[balancer.choose(&endpoints)] += 1;
        }
        // Equal loads: each is picked half the time, 500 of 1,000 with a
        // standard deviation of ~16; under 250 is ~16 deviations away.
        assert!(
            picks.iter().all(|&p| p > 250),
            "with their connections closed the endpoints were not shared evenly: {picks:?}"
        );
    }

    #[test]
    fn an_idle_endpoint_among_busy_ones_gets_most_connections() {
        let balancer = Balancer::default();
        let endpoints = endpoints(3);
        let _busy = [balancer.start(endpoints[0]), balancer.start(endpoints[2])];
        let idle = (0..3_000)
            .filter(|_| balancer.choose(&endpoints) == 1)
            .count();
        // The idle endpoint wins whenever it is one of the two sampled: 2/3 of
        // calls, 2,000 of 3,000 with a standard deviation of ~26. Over 1,500 is
        // ~19 deviations below that, and as far above the 1,000 of a uniform pick.
        assert!(
            idle > 1_500,
            "the idle endpoint got {idle} of 3,000 picks; the less busy of two should give it about 2,000"
        );
    }
}
