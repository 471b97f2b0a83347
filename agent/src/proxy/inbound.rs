//! The inbound proxy (port 15008): other agents open mTLS connections here
//! and ask, one HTTP/2 `CONNECT` per application connection, to be
//! connected to a pod on this node.
//!
//! Nothing here is an open relay: a `CONNECT` is honoured only for a meshed
//! pod on this node, running as the identity whose certificate this end
//! presented, and allowed by policy to hear from the client's verified
//! identity. Every refusal is an HTTP status with a reason, a log line and a
//! counter.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use ferry_proto::{SpiffeId, Untrusted};
use h2::server::SendResponse;
use http::{Method, Request, Response, Uri};
use tokio::net::TcpStream;
use tracing::Instrument as _;

use super::{
    Error, ProxyInputs, Refused,
    connections::{ConnectionMeta, Grant, Route},
    metrics::Direction,
    relay,
    spread::Accepting,
    upstream,
};
use crate::{
    drain::Phase,
    tunnel::{
        Identities,
        server::{Accepted, Server},
        stream::TunnelStream,
        wire,
    },
    workload::{
        WorkloadTable,
        policy::{Caller, Verdict},
    },
};

pub struct Inbound<I> {
    /// This node's name: only its pods are served.
    pub node: String,
    pub inputs: ProxyInputs,
    pub server: Server<I>,
}

/// A `CONNECT` this agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The pod's address and port.
    pub address: SocketAddr,
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The `Allow` policy that admitted it; `None`: the namespace's default.
    pub policy: Option<String>,
}

/// Who asked, over which tunnel connection: the same for each of its streams.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The identity the client's certificate proved.
    pub client: SpiffeId,
    /// The local identity this end presented.
    pub local: SpiffeId,
    /// The client agent's address.
    pub address: SocketAddr,
}

impl<I: Identities> Inbound<I> {
    pub async fn serve(self: Arc<Self>, listener: Accepting) {
        let drain = self.inputs.drain.clone();
        super::accept_until_drained(listener, "inbound tunnel", drain, move |stream, peer| {
            let this = Arc::clone(&self);
            let span = tracing::info_span!("inbound", peer = %peer);
            async move { this.serve_connection(stream, peer).await }.instrument(span)
        })
        .await;
    }

    async fn serve_connection(self: Arc<Self>, stream: TcpStream, address: SocketAddr) {
        let Accepted {
            client,
            local,
            key_exchange,
            mut connection,
        } = match self.server.accept(stream).await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(error = %Untrusted(&error), "inbound tunnel connection refused");
                return;
            }
        };
        tracing::info!(client = %client, server = %local, key_exchange = %key_exchange, "tunnel connection accepted");
        let peer = Peer {
            client,
            local,
            address,
        };
        // Once the agent drains, one GOAWAY: the peer opens new streams on a
        // fresh connection (to the successor), and these keep flowing.
        let drained = self.inputs.drain.clone().reached(Phase::Draining);
        tokio::pin!(drained);
        let mut going_away = false;
        loop {
            let accepted = tokio::select! {
                () = &mut drained, if !going_away => {
                    going_away = true;
                    tracing::info!(client = %peer.client, "draining: GOAWAY sent on the tunnel connection");
                    connection.graceful_shutdown();
                    continue;
                }
                accepted = connection.accept() => accepted,
            };
            let Some(accepted) = accepted else { break };
            let (request, respond) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::info!(%error, client = %peer.client, "tunnel connection ended");
                    return;
                }
            };
            let this = Arc::clone(&self);
            let peer = peer.clone();
            tokio::spawn(async move { this.serve_stream(request, respond, peer).await });
        }
        tracing::debug!(client = %peer.client, "tunnel connection closed");
    }

    async fn serve_stream(
        &self,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: Peer,
    ) {
        let metrics = self.inputs.connections.metrics();
        let Admitted {
            address,
            pod,
            policy,
        } = match self.admit(&request, &peer) {
            Ok(admitted) => admitted,
            Err(refused) => {
                metrics.inbound_refused(refused.inbound_reason());
                if let Refused::Policy(denied) = &refused {
                    metrics.policy_denied(Direction::Inbound, denied);
                }
                tracing::warn!(
                    client = %peer.client,
                    authority = ?request.uri().authority().map(|a| a.as_str()),
                    status = refused.status().as_u16(),
                    reason = %Untrusted(&refused),
                    "tunnel request refused"
                );
                let refusal = wire::refusal(refused.status(), &refused.to_string());
                let _ = respond.send_response(refusal, true);
                return;
            }
        };
        metrics.policy_allowed(policy.as_deref());
        let span = tracing::info_span!("inbound", src.identity = %peer.client, dst.pod = %Untrusted(&pod), dst.addr = %address);
        async move {
            let socket = match upstream::connect(address).await {
                Ok(socket) => socket,
                Err(error) => return self.upstream_failed(respond, &error),
            };
            let send = match respond.send_response(Response::new(()), false) {
                Ok(send) => send,
                Err(error) => {
                    tracing::info!(%error, "client went away before the tunnel opened");
                    return;
                }
            };
            let grant = Grant {
                caller: peer.client.clone(),
                pod: pod.clone(),
                port: address.port(),
            };
            let meta = ConnectionMeta {
                source_pod: None,
                source: peer.address,
                original_dst: address,
                destination_pod: Some(pod),
                source_identity: Some(peer.client.to_string()),
                destination_identity: Some(peer.local.to_string()),
                route: Route::InboundTunnel,
            };
            let tracked = self.inputs.connections.open(meta, Some(grant));
            tracing::debug!(connection = tracked.id(), "tunnel stream accepted");
            let tunnel = TunnelStream::new(send, request.into_body());
            let relayed =
                relay::relay_tunnel(tracked.server_end(socket), tunnel, tracked.stopped()).await;
            tracked.finish(relayed);
        }
        .instrument(span)
        .await;
    }

    /// Where a `CONNECT` may go, by the table in force, or why not.
    fn admit(&self, request: &Request<h2::RecvStream>, peer: &Peer) -> Result<Admitted, Refused> {
        let table = self.inputs.workloads.borrow().clone();
        admit(request.method(), request.uri(), &table, &self.node, peer)
    }

    /// The client's agent learns why (and resets its application's socket).
    fn upstream_failed(&self, mut respond: SendResponse<Bytes>, error: &Error) {
        self.inputs
            .connections
            .metrics()
            .connection_failed(Direction::Inbound, error.reason());
        tracing::warn!(%error, "cannot reach the destination pod");
        let _ = respond.send_response(wire::refusal(error.status(), &error.to_string()), true);
    }
}

/// Where a `CONNECT` (its method and URI) may go, or why not: a meshed pod
/// of `node` in `table`, running as the identity `peer` was given on this
/// end, and allowed by policy to hear from `peer`'s client identity.
pub fn admit(
    method: &Method,
    uri: &Uri,
    table: &WorkloadTable,
    node: &str,
    peer: &Peer,
) -> Result<Admitted, Refused> {
    if method != Method::CONNECT {
        return Err(Refused::Method(method.clone()));
    }
    let authority = uri.authority().ok_or(Refused::NoAuthority)?;
    let address: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| Refused::BadAuthority(authority.to_string()))?;
    let pod = table
        .by_ip(address.ip())
        .ok_or(Refused::NoPod(address.ip()))?;
    if pod.node != node {
        return Err(Refused::NotLocal {
            pod: pod.key(),
            node: pod.node.clone(),
            local: node.to_owned(),
        });
    }
    if !pod.meshed {
        return Err(Refused::NotMeshed(pod.key()));
    }
    let local = &peer.local;
    let runs_as = SpiffeId::new(local.trust_domain(), &pod.namespace, &pod.service_account)?;
    if &runs_as != local {
        return Err(Refused::WrongIdentity {
            pod: pod.key(),
            runs_as: Box::new(runs_as),
            local: Box::new(local.clone()),
        });
    }
    match table.authorize(Caller::Identity(&peer.client), pod, address.port()) {
        Verdict::Allowed { policy } => Ok(Admitted {
            address,
            pod: pod.key(),
            policy,
        }),
        Verdict::Denied(denied) => Err(Refused::Policy(denied)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> WorkloadTable {
        let text = "
nodes: [{ name: n1, addresses: [198.19.0.1] }, { name: n2, addresses: [198.19.0.2] }]
namespaces: [{ name: shop, labels: { ferry.dev/mesh: enabled } }, { name: legacy }]
pods:
  - { name: web, namespace: shop, serviceAccount: web, node: n1, ips: [198.18.1.2], cgroup: /x/web, labels: { app: web } }
  - { name: db, namespace: shop, serviceAccount: db, node: n2, ips: [198.18.2.2] }
  - { name: old, namespace: legacy, serviceAccount: old, node: n1, ips: [198.18.1.3] }
policies:
  - { name: web-from-shop, namespace: shop, spec: { selector: { matchLabels: { app: web } }, from: [{ namespace: shop }] } }
";
        WorkloadTable::for_test(text, "n1")
    }

    fn peer(client: &str, local: &str) -> Peer {
        Peer {
            client: client.parse().unwrap(),
            local: local.parse().unwrap(),
            address: "198.19.0.2:40000".parse().unwrap(),
        }
    }

    const SHOP_API: &str = "spiffe://cluster.local/ns/shop/sa/api";
    const SHOP_WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn connect(authority: &str, peer: &Peer) -> Result<Admitted, Refused> {
        let uri: Uri = authority.parse().unwrap();
        admit(&Method::CONNECT, &uri, &table(), "n1", peer)
    }

    #[test]
    fn admits_a_connect_to_a_meshed_local_pod_of_the_tunnels_identity() {
        let admitted = connect("198.18.1.2:8080", &peer(SHOP_API, SHOP_WEB)).unwrap();
        assert_eq!(
            admitted,
            Admitted {
                address: "198.18.1.2:8080".parse().unwrap(),
                pod: "shop/web".to_owned(),
                policy: Some("shop/web-from-shop".to_owned()),
            }
        );
    }

    #[test]
    fn refuses_what_is_not_a_connect_to_a_meshed_local_pod() {
        let web = peer(SHOP_API, SHOP_WEB);
        let uri: Uri = "198.18.1.2:8080".parse().unwrap();
        assert_eq!(
            admit(&Method::GET, &uri, &table(), "n1", &web),
            Err(Refused::Method(Method::GET))
        );
        assert_eq!(
            connect("web.shop:8080", &web),
            Err(Refused::BadAuthority("web.shop:8080".to_owned()))
        );
        assert_eq!(
            connect("198.18.9.9:80", &web),
            Err(Refused::NoPod("198.18.9.9".parse().unwrap()))
        );
        assert_eq!(
            connect("198.18.2.2:5432", &web),
            Err(Refused::NotLocal {
                pod: "shop/db".to_owned(),
                node: "n2".to_owned(),
                local: "n1".to_owned(),
            })
        );
        assert_eq!(
            connect("198.18.1.3:80", &web),
            Err(Refused::NotMeshed("legacy/old".to_owned()))
        );
        let db = peer(SHOP_API, "spiffe://cluster.local/ns/shop/sa/db");
        assert!(
            matches!(
                connect("198.18.1.2:8080", &db),
                Err(Refused::WrongIdentity { ref pod, .. }) if pod == "shop/web"
            ),
            "a tunnel opened to shop/db does not reach shop/web"
        );
        let ops = peer("spiffe://cluster.local/ns/ops/sa/x", SHOP_WEB);
        assert!(matches!(
            connect("198.18.1.2:8080", &ops),
            Err(Refused::Policy(_))
        ));
    }
}
