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
use http::{Method, Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use super::{
    Error, ProxyInputs, Refused,
    connections::{ConnectionMeta, Grant, Route},
    metrics::Direction,
    relay, upstream,
};
use crate::{
    drain::Phase,
    tunnel::{
        Identities,
        server::{Accepted, Server},
        stream::TunnelStream,
        wire,
    },
    workload::policy::{Caller, Verdict},
};

pub struct Inbound<I> {
    /// This node's name: only its pods are served.
    pub node: String,
    pub inputs: ProxyInputs,
    pub server: Server<I>,
}

/// A `CONNECT` this agent serves.
struct Admitted {
    /// The pod's address and port.
    address: SocketAddr,
    /// `namespace/name` of the pod.
    pod: String,
    /// The `Allow` policy that admitted it; `None`: the namespace's default.
    policy: Option<String>,
}

/// Who asked, over which tunnel connection: the same for each of its streams.
#[derive(Clone)]
struct Peer {
    /// The identity the client's certificate proved.
    client: SpiffeId,
    /// The local identity this end presented.
    local: SpiffeId,
    /// The client agent's address.
    address: SocketAddr,
}

impl<I: Identities> Inbound<I> {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
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

    /// Where a `CONNECT` may go, or why not.
    fn admit(&self, request: &Request<h2::RecvStream>, peer: &Peer) -> Result<Admitted, Refused> {
        if request.method() != Method::CONNECT {
            return Err(Refused::Method(request.method().clone()));
        }
        let authority = request.uri().authority().ok_or(Refused::NoAuthority)?;
        let address: SocketAddr = authority
            .as_str()
            .parse()
            .map_err(|_| Refused::BadAuthority(authority.to_string()))?;
        let table = self.inputs.workloads.borrow().clone();
        let pod = table
            .by_ip(address.ip())
            .ok_or(Refused::NoPod(address.ip()))?;
        if pod.node != self.node {
            return Err(Refused::NotLocal {
                pod: pod.key(),
                node: pod.node.clone(),
                local: self.node.clone(),
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
