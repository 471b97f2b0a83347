//! The inbound side of the tunnel (port 15008): other agents open mTLS
//! connections here and ask, one HTTP/2 `CONNECT` per application
//! connection, to be connected to a pod on this node.
//!
//! Nothing here is an open relay: a `CONNECT` is honoured only for a meshed
//! pod on this node, running as the identity whose certificate this end
//! presented, and allowed by policy to hear from the client's verified
//! identity. Every refusal is an HTTP status with a reason, a log line and a
//! counter.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use ferry_proto::SpiffeId;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use rustls::{ServerConfig, crypto::CryptoProvider};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::LazyConfigAcceptor;
use tracing::Instrument as _;

use super::{Identities, stream::TunnelStream, tls};
use crate::{
    identity::Issued,
    metrics::{Direction, Failure, InboundRefusal, Side},
    proxy::{
        connections::{ConnectionInfo, Connections, Route},
        relay,
    },
    workload::WorkloadTable,
};

/// How long a peer may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent waits for the destination pod to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one peer connection may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

pub struct Inbound<I> {
    pub node: String,
    pub trust_domain: String,
    pub workloads: watch::Receiver<Arc<WorkloadTable>>,
    pub identities: Arc<I>,
    pub provider: Arc<CryptoProvider>,
    pub connections: Arc<Connections>,
    pub stream_window: u32,
    pub connection_window: u32,
    /// The server config per local identity, rebuilt when its certificate or
    /// the roots change.
    configs: Mutex<HashMap<SpiffeId, CachedConfig>>,
}

struct CachedConfig {
    issued: Arc<Issued>,
    config: Arc<ServerConfig>,
}

/// Why a `CONNECT` was refused, as the client's agent and the logs see it.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// A `CONNECT` this agent will not serve: the metric's reason and the answer.
#[derive(Debug)]
struct Denial {
    kind: InboundRefusal,
    reason: String,
}

impl Denial {
    fn new(kind: InboundRefusal, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }

    fn into_refusal(self) -> Refusal {
        let status = match self.kind {
            InboundRefusal::Method => StatusCode::METHOD_NOT_ALLOWED,
            InboundRefusal::BadRequest => StatusCode::BAD_REQUEST,
            InboundRefusal::NotLocal => StatusCode::NOT_FOUND,
            InboundRefusal::NotMeshed | InboundRefusal::Policy => StatusCode::FORBIDDEN,
            InboundRefusal::WrongIdentity => StatusCode::MISDIRECTED_REQUEST,
            InboundRefusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal::new(status, self.reason)
    }
}

impl<I: Identities> Inbound<I> {
    pub fn new(
        node: String,
        trust_domain: String,
        workloads: watch::Receiver<Arc<WorkloadTable>>,
        identities: Arc<I>,
        provider: Arc<CryptoProvider>,
        connections: Arc<Connections>,
    ) -> Self {
        let defaults = super::pool::PoolConfig::default();
        Self {
            node,
            trust_domain,
            workloads,
            identities,
            provider,
            connections,
            stream_window: defaults.stream_window,
            connection_window: defaults.connection_window,
            configs: Mutex::default(),
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        crate::proxy::accept_forever(listener, "inbound tunnel", move |stream, peer| {
            let this = Arc::clone(&self);
            let span = tracing::info_span!("inbound", peer = %peer);
            async move {
                if let Err(error) = this.serve_connection(stream, peer).await {
                    this.connections
                        .metrics()
                        .tunnel_handshake(Side::Server, false);
                    tracing::warn!(%error, "inbound tunnel connection refused");
                }
            }
            .instrument(span)
        })
        .await;
    }

    async fn serve_connection(&self, stream: TcpStream, peer: SocketAddr) -> Result<(), String> {
        let _ = stream.set_nodelay(true);
        let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let start = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor)
            .await
            .map_err(|_| "no TLS ClientHello within the handshake timeout".to_owned())?
            .map_err(|e| format!("not a TLS ClientHello: {e}"))?;
        let sni = start.client_hello().server_name().map(str::to_owned);
        let local = sni
            .as_deref()
            .and_then(|sni| tls::identity_from_sni(sni, &self.trust_domain))
            .ok_or_else(|| format!("SNI {sni:?} names no workload identity"))?;
        let config = self
            .server_config(&local)
            .ok_or_else(|| format!("no certificate on this node for {local} (asked for in SNI)"))?;
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config))
            .await
            .map_err(|_| "TLS handshake timed out".to_owned())?
            .map_err(|e| format!("TLS handshake with a request for {local} failed: {e}"))?;
        let client = {
            let (_, session) = tls.get_ref();
            let chain = session
                .peer_certificates()
                .ok_or("client presented no certificate")?;
            tls::identity_of(&chain[0])?
        };
        if client.trust_domain() != local.trust_domain() {
            return Err(format!(
                "client {client} is not in trust domain {}",
                local.trust_domain()
            ));
        }
        let mut connection = h2::server::Builder::new()
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(64 * 1024)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| format!("HTTP/2 handshake with {client}: {e}"))?;
        self.connections
            .metrics()
            .tunnel_handshake(Side::Server, true);
        tracing::info!(client = %client, server = %local, "tunnel connection accepted");
        while let Some(accepted) = connection.accept().await {
            let (request, respond) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::info!(%error, client = %client, "tunnel connection ended");
                    return Ok(());
                }
            };
            let (client, local) = (client.clone(), local.clone());
            let this = self.stream_handler();
            tokio::spawn(async move {
                this.serve_stream(request, respond, client, local, peer)
                    .await
            });
        }
        tracing::debug!(client = %client, "tunnel connection closed");
        Ok(())
    }

    fn stream_handler(&self) -> StreamHandler {
        StreamHandler {
            node: self.node.clone(),
            workloads: self.workloads.clone(),
            connections: Arc::clone(&self.connections),
        }
    }

    /// The cached config for `identity`, rebuilt when its certificate is renewed.
    fn server_config(&self, identity: &SpiffeId) -> Option<Arc<ServerConfig>> {
        let issued = self.identities.current(identity)?;
        let mut configs = self.configs.lock().expect("inbound config lock");
        if let Some(cached) = configs.get(identity)
            && Arc::ptr_eq(&cached.issued, &issued)
        {
            return Some(Arc::clone(&cached.config));
        }
        let config = match tls::server_config(
            &self.provider,
            Arc::clone(&issued.certified_key),
            Arc::clone(&issued.roots),
        ) {
            Ok(config) => Arc::new(config),
            Err(error) => {
                tracing::error!(%error, %identity, "cannot build the tunnel's TLS server config");
                return None;
            }
        };
        configs.retain(|id, _| self.identities.current(id).is_some());
        configs.insert(
            identity.clone(),
            CachedConfig {
                issued,
                config: Arc::clone(&config),
            },
        );
        Some(config)
    }
}

/// What one `CONNECT` needs, cheap to move into its task.
struct StreamHandler {
    node: String,
    workloads: watch::Receiver<Arc<WorkloadTable>>,
    connections: Arc<Connections>,
}

impl StreamHandler {
    async fn serve_stream(
        self,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        client: SpiffeId,
        local: SpiffeId,
        peer: SocketAddr,
    ) {
        let destination = match self.admit(&request, &client, &local) {
            Ok(destination) => destination,
            Err(denial) => {
                self.connections.metrics().inbound_refused(denial.kind);
                let refusal = denial.into_refusal();
                tracing::warn!(
                    client = %client,
                    authority = ?request.uri().authority().map(|a| a.as_str()),
                    status = refusal.status.as_u16(),
                    reason = %refusal.reason,
                    "tunnel request refused"
                );
                let _ = respond.send_response(refusal_response(&refusal), true);
                return;
            }
        };
        let (address, pod) = destination;
        let span = tracing::info_span!("inbound", src.identity = %client, dst.pod = %pod, dst.addr = %address);
        async move {
            let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
                .await
            {
                Ok(Ok(upstream)) => upstream,
                Ok(Err(error)) => {
                    return self.upstream_failed(
                        respond,
                        StatusCode::BAD_GATEWAY,
                        &error.to_string(),
                    );
                }
                Err(_) => {
                    return self.upstream_failed(respond, StatusCode::GATEWAY_TIMEOUT, "timed out");
                }
            };
            let _ = upstream.set_nodelay(true);
            let send = match respond.send_response(Response::new(()), false) {
                Ok(send) => send,
                Err(error) => {
                    tracing::info!(%error, "client went away before the tunnel opened");
                    return;
                }
            };
            let tracked = self.connections.open(ConnectionInfo {
                id: 0,
                source_pod: None,
                source: peer,
                original_dst: address,
                destination_pod: Some(pod.clone()),
                source_identity: Some(client.to_string()),
                destination_identity: Some(local.to_string()),
                route: Route::InboundTunnel,
                opened_at_unix_ms: 0,
                bytes_sent: 0,
                bytes_received: 0,
            });
            tracing::debug!(connection = tracked.id(), "tunnel stream accepted");
            let tunnel = TunnelStream::new(send, request.into_body());
            match relay::relay_tunnel(tracked.server_end(upstream), tunnel).await {
                Ok((to_pod, from_pod)) => {
                    tracing::info!(
                        bytes_to_pod = to_pod,
                        bytes_from_pod = from_pod,
                        "connection closed"
                    )
                }
                Err(error) => tracing::info!(%error, "connection reset"),
            }
            drop(tracked);
        }
        .instrument(span)
        .await;
    }

    /// The pod address a `CONNECT` may reach, or why not.
    fn admit(
        &self,
        request: &Request<h2::RecvStream>,
        client: &SpiffeId,
        local: &SpiffeId,
    ) -> Result<(SocketAddr, String), Denial> {
        if request.method() != Method::CONNECT {
            return Err(Denial::new(
                InboundRefusal::Method,
                format!("only CONNECT is served here, not {}", request.method()),
            ));
        }
        let authority = request
            .uri()
            .authority()
            .ok_or_else(|| Denial::new(InboundRefusal::BadRequest, "CONNECT without host:port"))?;
        let address: SocketAddr = authority.as_str().parse().map_err(|_| {
            Denial::new(
                InboundRefusal::BadRequest,
                format!("{authority} is not an IP address and port"),
            )
        })?;
        let table = self.workloads.borrow().clone();
        let pod = table.by_ip(address.ip()).ok_or_else(|| {
            Denial::new(
                InboundRefusal::NotLocal,
                format!("no pod has address {}", address.ip()),
            )
        })?;
        if pod.node != self.node {
            return Err(Denial::new(
                InboundRefusal::NotLocal,
                format!(
                    "pod {} runs on node {}, not on {}",
                    pod.key(),
                    pod.node,
                    self.node
                ),
            ));
        }
        if !pod.meshed {
            return Err(Denial::new(
                InboundRefusal::NotMeshed,
                format!("pod {} is not meshed", pod.key()),
            ));
        }
        let runs_as = SpiffeId::new(local.trust_domain(), &pod.namespace, &pod.service_account)
            .map_err(|e| Denial::new(InboundRefusal::Internal, e.to_string()))?;
        if &runs_as != local {
            return Err(Denial::new(
                InboundRefusal::WrongIdentity,
                format!(
                    "pod {} runs as {runs_as}, but the tunnel was opened to {local}",
                    pod.key()
                ),
            ));
        }
        table
            .authorize(client, pod)
            .map_err(|reason| Denial::new(InboundRefusal::Policy, reason))?;
        Ok((address, pod.key()))
    }

    fn upstream_failed(&self, mut respond: SendResponse<Bytes>, status: StatusCode, error: &str) {
        self.connections
            .metrics()
            .connection_failed(Direction::Inbound, Failure::Connect);
        tracing::warn!(error, "cannot reach the destination pod");
        let refusal = Refusal::new(status, format!("destination did not accept: {error}"));
        let _ = respond.send_response(refusal_response(&refusal), true);
    }
}

/// The refusal's reason travels in a header so the client's agent can log it.
pub const REASON_HEADER: &str = "ferry-reason";

fn refusal_response(refusal: &Refusal) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = refusal.status;
    if let Ok(value) = http::HeaderValue::from_str(&refusal.reason) {
        response.headers_mut().insert(REASON_HEADER, value);
    }
    response
}
