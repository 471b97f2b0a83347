//! The agent's Prometheus metrics: one registry, served as `/metrics` on the
//! admin endpoint and on the probe port (where Prometheus scrapes it).
//!
//! Every counter here is the only count of its event: `/config_dump`'s
//! `totals` and `/pool`'s `totals` are read from these same series, so the
//! JSON and the metrics can never disagree. Labels are bounded: directions,
//! routes, reasons and results are fixed sets; only certificates carry their
//! identity (one per ServiceAccount with a pod on this node).

use std::{
    sync::atomic::{AtomicI64, AtomicU64},
    time::{SystemTime, UNIX_EPOCH},
};

use ferry_proto::SpiffeId;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

use crate::proxy::connections::Route;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which way a connection goes through this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Dialled by a pod on this node.
    Outbound,
    /// Arrived over a tunnel from another agent, for a pod on this node.
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl Route {
    /// The `direction` and `route` labels of a connection carried this way.
    pub fn labels(self) -> (Direction, &'static str) {
        match self {
            Route::Passthrough => (Direction::Outbound, "passthrough"),
            Route::Tunnel => (Direction::Outbound, "tunnel"),
            Route::Direct => (Direction::Outbound, "direct"),
            Route::InboundTunnel => (Direction::Inbound, "tunnel"),
        }
    }
}

/// Why a connection the agent was given did not get carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// On the outbound port without a capture record (not sent by Ferry's programs).
    Uncaptured,
    /// Refused by this agent's route decision (policy, unknown source).
    Denied,
    /// The destination (a pod, or anything outside the mesh) did not accept.
    Connect,
    /// No tunnel stream to the destination's agent (dial, backoff, broken connection).
    Tunnel,
    /// The destination's agent refused the `CONNECT` (not local, not meshed, policy…).
    PeerRefused,
    /// The destination's agent could not reach the pod.
    PeerConnect,
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::Uncaptured => "uncaptured",
            Failure::Denied => "denied",
            Failure::Connect => "connect",
            Failure::Tunnel => "tunnel",
            Failure::PeerRefused => "peer_refused",
            Failure::PeerConnect => "peer_connect",
        }
    }
}

/// Why this agent refused a tunnel `CONNECT` from another agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundRefusal {
    /// 405: not a `CONNECT`.
    Method,
    /// 400: no `ip:port` authority.
    BadRequest,
    /// 404: no pod with that address on this node.
    NotLocal,
    /// 403: the pod is not meshed.
    NotMeshed,
    /// 421: the pod runs as another identity than the one the tunnel was opened to.
    WrongIdentity,
    /// 403: the destination's policy does not allow the client's identity.
    Policy,
    /// 500: the agent could not judge the request.
    Internal,
}

impl InboundRefusal {
    pub const ALL: [InboundRefusal; 7] = [
        InboundRefusal::Method,
        InboundRefusal::BadRequest,
        InboundRefusal::NotLocal,
        InboundRefusal::NotMeshed,
        InboundRefusal::WrongIdentity,
        InboundRefusal::Policy,
        InboundRefusal::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InboundRefusal::Method => "method",
            InboundRefusal::BadRequest => "bad_request",
            InboundRefusal::NotLocal => "not_local",
            InboundRefusal::NotMeshed => "not_meshed",
            InboundRefusal::WrongIdentity => "wrong_identity",
            InboundRefusal::Policy => "policy",
            InboundRefusal::Internal => "internal",
        }
    }
}

/// Which end of a tunnel connection this agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This agent dialled (the pool).
    Client,
    /// Another agent dialled this one (port 15008).
    Server,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// Why a pooled tunnel connection left the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolClose {
    Idle,
    /// The peer stopped answering keepalive pings (a dead or cut-off node).
    Keepalive,
    /// Closed by the peer, failed, or found unusable.
    Broken,
}

impl PoolClose {
    fn as_str(self) -> &'static str {
        match self {
            PoolClose::Idle => "idle",
            PoolClose::Keepalive => "keepalive",
            PoolClose::Broken => "broken",
        }
    }
}

/// How one call to the CA ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaResult {
    Ok,
    Error,
    Timeout,
}

impl CaResult {
    fn as_str(self) -> &'static str {
        match self {
            CaResult::Ok => "ok",
            CaResult::Error => "error",
            CaResult::Timeout => "timeout",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    direction: &'static str,
    route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByteLabels {
    direction: &'static str,
    route: &'static str,
    /// `sent` by the client (the application that dialled), or `received` by it.
    flow: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    side: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

type Count = Counter<u64, AtomicU64>;
type Level = Gauge<i64, AtomicI64>;

/// The counters one live connection updates, looked up once when it opens.
#[derive(Debug, Clone)]
pub struct ConnectionCounters {
    pub active: Level,
    /// Bytes the client sent (towards the server).
    pub sent: Count,
    /// Bytes the client received (from the server).
    pub received: Count,
}

pub struct Metrics {
    registry: Registry,
    connections_captured: Count,
    connections_opened: Family<ConnectionLabels, Count>,
    connections_active: Family<ConnectionLabels, Level>,
    connection_bytes: Family<ByteLabels, Count>,
    connection_failures: Family<FailureLabels, Count>,
    inbound_refused: Family<ReasonLabels, Count>,
    tunnel_handshakes: Family<HandshakeLabels, Count>,
    pool_connections: Level,
    pool_streams: Count,
    pool_closed: Family<ReasonLabels, Count>,
    certificate_expiry: Family<IdentityLabels, Level>,
    certificate_renewals: Family<ResultLabels, Count>,
    ca_requests: Family<ResultLabels, Count>,
    captured_pods: Level,
    capture_failing_pods: Level,
    capture_attach_failures: Count,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(env!("CARGO_PKG_VERSION"))
    }
}

impl Metrics {
    pub fn new(version: &'static str) -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let metrics = Self {
            connections_captured: Count::default(),
            connections_opened: Family::default(),
            connections_active: Family::default(),
            connection_bytes: Family::default(),
            connection_failures: Family::default(),
            inbound_refused: Family::default(),
            tunnel_handshakes: Family::default(),
            pool_connections: Level::default(),
            pool_streams: Count::default(),
            pool_closed: Family::default(),
            certificate_expiry: Family::default(),
            certificate_renewals: Family::default(),
            ca_requests: Family::default(),
            captured_pods: Level::default(),
            capture_failing_pods: Level::default(),
            capture_attach_failures: Count::default(),
            registry: Registry::default(),
        };
        let build_info = Family::<VersionLabels, Level>::default();
        build_info.get_or_create(&VersionLabels { version }).set(1);
        registry.register("build_info", "The agent's version; always 1", build_info);
        registry.register(
            "connections_captured",
            "Connections the capture programs redirected and the agent accepted",
            metrics.connections_captured.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections the agent started carrying, by direction and route",
            metrics.connections_opened.clone(),
        );
        registry.register(
            "connections_active",
            "Connections the agent carries now, by direction and route",
            metrics.connections_active.clone(),
        );
        registry.register(
            "connection_bytes",
            "Bytes relayed, counted per chunk as they move; flow=sent is what the dialling application sent, received what it got back",
            metrics.connection_bytes.clone(),
        );
        registry.register(
            "connection_failures",
            "Connections the agent was given but could not carry, by direction and reason",
            metrics.connection_failures.clone(),
        );
        registry.register(
            "inbound_refused",
            "Tunnel CONNECT requests from other agents refused, by reason",
            metrics.inbound_refused.clone(),
        );
        registry.register(
            "tunnel_handshakes",
            "mTLS + HTTP/2 handshakes of tunnel connections, by side (client: this agent dialled) and result",
            metrics.tunnel_handshakes.clone(),
        );
        registry.register(
            "pool_connections",
            "Tunnel connections open in the pool",
            metrics.pool_connections.clone(),
        );
        registry.register(
            "pool_streams",
            "Tunnel streams handed out by the pool (one per tunnelled connection)",
            metrics.pool_streams.clone(),
        );
        registry.register(
            "pool_connections_closed",
            "Tunnel connections that left the pool, by reason",
            metrics.pool_closed.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "NotAfter of each local identity's current certificate, Unix seconds",
            metrics.certificate_expiry.clone(),
        );
        registry.register(
            "certificate_renewals",
            "Attempts to get a certificate (first or renewal), by result; an error includes a certificate that failed validation",
            metrics.certificate_renewals.clone(),
        );
        registry.register(
            "ca_requests",
            "Certify calls to the CA, by result",
            metrics.ca_requests.clone(),
        );
        registry.register(
            "captured_pods",
            "Local meshed pods with the capture programs attached",
            metrics.captured_pods.clone(),
        );
        registry.register(
            "capture_failing_pods",
            "Local meshed pods whose capture failed at the last attempt",
            metrics.capture_failing_pods.clone(),
        );
        registry.register(
            "capture_attach_failures",
            "Failed attempts to capture a pod (each retry counts)",
            metrics.capture_attach_failures.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The metrics in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    pub fn connection_captured(&self) {
        self.connections_captured.inc();
    }

    /// Counts a connection opened on `route` and returns the counters it
    /// updates while it lives (the active gauge is already raised).
    pub fn connection_opened(&self, route: Route) -> ConnectionCounters {
        let (direction, route) = route.labels();
        let direction = direction.as_str();
        let labels = ConnectionLabels { direction, route };
        self.connections_opened.get_or_create(&labels).inc();
        let active = self.connections_active.get_or_create_owned(&labels);
        active.inc();
        let bytes = |flow| {
            self.connection_bytes.get_or_create_owned(&ByteLabels {
                direction,
                route,
                flow,
            })
        };
        ConnectionCounters {
            active,
            sent: bytes("sent"),
            received: bytes("received"),
        }
    }

    pub fn connection_failed(&self, direction: Direction, failure: Failure) {
        self.connection_failures
            .get_or_create(&FailureLabels {
                direction: direction.as_str(),
                reason: failure.as_str(),
            })
            .inc();
    }

    pub fn inbound_refused(&self, refusal: InboundRefusal) {
        self.inbound_refused
            .get_or_create(&ReasonLabels {
                reason: refusal.as_str(),
            })
            .inc();
    }

    pub fn tunnel_handshake(&self, side: Side, ok: bool) {
        self.tunnel_handshakes
            .get_or_create(&HandshakeLabels {
                side: side.as_str(),
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn pool_connection_opened(&self) {
        self.pool_connections.inc();
    }

    pub fn pool_connection_closed(&self, why: PoolClose) {
        self.pool_connections.dec();
        self.pool_closed
            .get_or_create(&ReasonLabels {
                reason: why.as_str(),
            })
            .inc();
    }

    pub fn pool_stream(&self) {
        self.pool_streams.inc();
    }

    pub fn certificate_published(&self, identity: &SpiffeId, not_after: SystemTime) {
        let unix = not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.certificate_expiry
            .get_or_create(&IdentityLabels {
                identity: identity.to_string(),
            })
            .set(unix);
    }

    /// The identity left the node: its series goes with it.
    pub fn certificate_dropped(&self, identity: &SpiffeId) {
        self.certificate_expiry.remove(&IdentityLabels {
            identity: identity.to_string(),
        });
    }

    pub fn certificate_attempt(&self, ok: bool) {
        self.certificate_renewals
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn ca_request(&self, result: CaResult) {
        self.ca_requests
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
    }

    /// The outcome of one capture reconcile: pods captured, pods that failed.
    pub fn capture_reconciled(&self, captured: usize, failed: usize) {
        self.captured_pods
            .set(i64::try_from(captured).unwrap_or(i64::MAX));
        self.capture_failing_pods
            .set(i64::try_from(failed).unwrap_or(i64::MAX));
        self.capture_attach_failures
            .inc_by(u64::try_from(failed).unwrap_or(u64::MAX));
    }

    fn failures(&self, direction: Direction, failure: Failure) -> u64 {
        self.connection_failures
            .get(&FailureLabels {
                direction: direction.as_str(),
                reason: failure.as_str(),
            })
            .map_or(0, |c| c.get())
    }

    fn handshakes(&self, side: Side, ok: bool) -> u64 {
        self.tunnel_handshakes
            .get(&HandshakeLabels {
                side: side.as_str(),
                result: if ok { "ok" } else { "error" },
            })
            .map_or(0, |c| c.get())
    }

    /// The connection counters `/config_dump` shows, read from the metrics.
    pub fn totals(&self) -> Totals {
        use Direction::{Inbound, Outbound};
        let outbound = |f| self.failures(Outbound, f);
        Totals {
            captured: self.connections_captured.get(),
            uncaptured: outbound(Failure::Uncaptured),
            upstream_failures: outbound(Failure::Connect)
                + outbound(Failure::Tunnel)
                + outbound(Failure::PeerConnect)
                + self.failures(Inbound, Failure::Connect),
            inbound_handshakes: self.handshakes(Side::Server, true),
            inbound_refused: self.handshakes(Side::Server, false),
            inbound_denied: InboundRefusal::ALL
                .iter()
                .map(|r| {
                    self.inbound_refused
                        .get(&ReasonLabels { reason: r.as_str() })
                        .map_or(0, |c| c.get())
                })
                .sum(),
            outbound_denied: outbound(Failure::Denied) + outbound(Failure::PeerRefused),
        }
    }

    /// The pool counters `/pool` shows, read from the metrics.
    pub fn pool_totals(&self) -> PoolTotals {
        let closed = |why: PoolClose| {
            self.pool_closed
                .get(&ReasonLabels {
                    reason: why.as_str(),
                })
                .map_or(0, |c| c.get())
        };
        PoolTotals {
            handshakes: self.handshakes(Side::Client, true),
            dial_failures: self.handshakes(Side::Client, false),
            streams: self.pool_streams.get(),
            closed_idle: closed(PoolClose::Idle),
            closed_keepalive: closed(PoolClose::Keepalive),
            closed_broken: closed(PoolClose::Broken),
        }
    }
}

/// Connection counters since the agent started (`/config_dump` `totals`);
/// each is a series of `/metrics`, or a sum of some.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    /// Connections the capture programs redirected and the agent accepted
    /// (`ferry_connections_captured_total`).
    pub captured: u64,
    /// Connections on the outbound port that the capture programs did not
    /// send (`ferry_connection_failures_total{reason="uncaptured"}`).
    pub uncaptured: u64,
    /// Connections whose destination could not be reached, either way
    /// (`ferry_connection_failures_total{reason=~"connect|tunnel|peer_connect"}`).
    pub upstream_failures: u64,
    /// Tunnel connections from other agents that completed mutual TLS and
    /// HTTP/2 (`ferry_tunnel_handshakes_total{side="server",result="ok"}`).
    pub inbound_handshakes: u64,
    /// Tunnel connections refused before or during the handshake
    /// (`ferry_tunnel_handshakes_total{side="server",result="error"}`).
    pub inbound_refused: u64,
    /// `CONNECT` requests refused: not a local meshed pod, wrong identity,
    /// policy (`ferry_inbound_refused_total`, all reasons).
    pub inbound_denied: u64,
    /// Outbound connections refused by this agent's route decision or by the
    /// peer agent (`ferry_connection_failures_total{reason=~"denied|peer_refused"}`).
    pub outbound_denied: u64,
}

/// The pool's counters since the agent started (`/pool` `totals`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolTotals {
    /// Completed TLS + HTTP/2 handshakes: connections opened.
    pub handshakes: u64,
    pub dial_failures: u64,
    /// Streams handed out, one per tunnelled application connection.
    pub streams: u64,
    pub closed_idle: u64,
    pub closed_keepalive: u64,
    pub closed_broken: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn counters_and_json_totals_are_the_same_numbers() {
        let metrics = Metrics::new("1.2.3");
        metrics.connection_captured();
        metrics.connection_captured();
        metrics.connection_failed(Direction::Outbound, Failure::Uncaptured);
        metrics.connection_failed(Direction::Outbound, Failure::Denied);
        metrics.connection_failed(Direction::Outbound, Failure::PeerRefused);
        metrics.connection_failed(Direction::Outbound, Failure::Tunnel);
        metrics.connection_failed(Direction::Inbound, Failure::Connect);
        metrics.inbound_refused(InboundRefusal::Policy);
        metrics.inbound_refused(InboundRefusal::NotLocal);
        metrics.tunnel_handshake(Side::Server, true);
        metrics.tunnel_handshake(Side::Server, false);
        metrics.tunnel_handshake(Side::Client, true);
        assert_eq!(
            metrics.totals(),
            Totals {
                captured: 2,
                uncaptured: 1,
                upstream_failures: 2,
                inbound_handshakes: 1,
                inbound_refused: 1,
                inbound_denied: 2,
                outbound_denied: 2,
            }
        );
        assert_eq!(metrics.pool_totals().handshakes, 1);
        let text = metrics.render();
        assert_eq!(sample(&text, "ferry_connections_captured_total"), Some("2"));
        assert_eq!(
            sample(&text, "ferry_inbound_refused_total{reason=\"policy\"}"),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "ferry_tunnel_handshakes_total{side=\"server\",result=\"ok\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample(&text, "ferry_build_info{version=\"1.2.3\"}"),
            Some("1")
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_connection_is_active_until_its_gauge_is_lowered_and_counts_its_bytes() {
        let metrics = Metrics::default();
        let counters = metrics.connection_opened(Route::InboundTunnel);
        counters.sent.inc_by(10);
        counters.received.inc_by(5);
        let text = metrics.render();
        let labels = "{direction=\"inbound\",route=\"tunnel\"}";
        assert_eq!(
            sample(&text, &format!("ferry_connections_opened_total{labels}")),
            Some("1")
        );
        assert_eq!(
            sample(&text, &format!("ferry_connections_active{labels}")),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "ferry_connection_bytes_total{direction=\"inbound\",route=\"tunnel\",flow=\"sent\"}"
            ),
            Some("10")
        );
        counters.active.dec();
        assert_eq!(
            sample(
                &metrics.render(),
                &format!("ferry_connections_active{labels}")
            ),
            Some("0")
        );
    }

    #[test]
    fn a_certificate_series_leaves_with_its_identity() {
        let metrics = Metrics::default();
        let identity = SpiffeId::new("cluster.local", "shop", "web").unwrap();
        metrics.certificate_published(&identity, UNIX_EPOCH + std::time::Duration::from_secs(42));
        let series = "ferry_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/web\"}";
        assert_eq!(sample(&metrics.render(), series), Some("42"));
        metrics.certificate_dropped(&identity);
        assert_eq!(sample(&metrics.render(), series), None);
    }
}
