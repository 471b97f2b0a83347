//! The agent's Prometheus registry: every subsystem's families (each defined
//! beside what it counts: `proxy::metrics`, `tunnel::metrics`,
//! `identity::metrics`, `capture::metrics`), served as `/metrics` on the
//! admin endpoint and on the probe port (where Prometheus scrapes it).
//!
//! Every counter is the only count of its event: `/config_dump`'s `totals`
//! and `/pool`'s `totals` are read from these same series, so the JSON and
//! the metrics can never disagree. Labels are bounded: directions, routes,
//! reasons and results are fixed sets; only certificates carry their
//! identity (one per ServiceAccount with a pod on this node).

use std::sync::{Arc, atomic::AtomicI64};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

use crate::{
    capture::metrics::CaptureMetrics,
    drain::DrainMetrics,
    identity::metrics::IdentityMetrics,
    proxy::{
        metrics::{Direction, Failure, ProxyMetrics},
        spread::SpreadMetrics,
    },
    tunnel::metrics::{Side, TunnelMetrics},
};

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// The registry and the subsystems' metrics it holds.
pub struct Metrics {
    registry: Registry,
    pub proxy: Arc<ProxyMetrics>,
    pub tunnel: Arc<TunnelMetrics>,
    pub identity: Arc<IdentityMetrics>,
    pub capture: Arc<CaptureMetrics>,
    pub drain: Arc<DrainMetrics>,
    pub spread: Arc<SpreadMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(env!("CARGO_PKG_VERSION"))
    }
}

impl Metrics {
    pub fn new(version: &'static str) -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let build_info = Family::<VersionLabels, Gauge<i64, AtomicI64>>::default();
        build_info.get_or_create(&VersionLabels { version }).set(1);
        registry.register("build_info", "The agent's version; always 1", build_info);
        let (proxy, tunnel, identity, capture) = (
            Arc::<ProxyMetrics>::default(),
            Arc::<TunnelMetrics>::default(),
            Arc::<IdentityMetrics>::default(),
            Arc::<CaptureMetrics>::default(),
        );
        proxy.register(&mut registry);
        tunnel.register(&mut registry);
        identity.register(&mut registry);
        capture.register(&mut registry);
        let drain = Arc::<DrainMetrics>::default();
        drain.register(&mut registry);
        let spread = Arc::<SpreadMetrics>::default();
        spread.register(&mut registry);
        Self {
            drain,
            spread,
            registry,
            proxy,
            tunnel,
            identity,
            capture,
        }
    }

    /// The metrics in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    /// The connection counters `/config_dump` shows, read from the metrics.
    pub fn totals(&self) -> Totals {
        use Direction::{Inbound, Outbound};
        let outbound = |f| self.proxy.failures(Outbound, f);
        Totals {
            captured: self.proxy.captured(),
            uncaptured: outbound(Failure::Uncaptured),
            upstream_failures: outbound(Failure::Connect)
                + outbound(Failure::Tunnel)
                + outbound(Failure::PeerConnect)
                + self.proxy.failures(Inbound, Failure::Connect),
            inbound_handshakes: self.tunnel.handshakes(Side::Server, true),
            inbound_refused: self.tunnel.handshakes(Side::Server, false),
            inbound_denied: self.proxy.inbound_refusals(),
            outbound_denied: outbound(Failure::Denied) + outbound(Failure::PeerRefused),
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

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use ferry_proto::SpiffeId;

    use super::*;
    use crate::proxy::{connections::Route, metrics::InboundRefusal};

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn counters_and_json_totals_are_the_same_numbers() {
        let metrics = Metrics::new("1.2.3");
        let proxy = &metrics.proxy;
        proxy.connection_captured();
        proxy.connection_captured();
        proxy.connection_failed(Direction::Outbound, Failure::Uncaptured);
        proxy.connection_failed(Direction::Outbound, Failure::Denied);
        proxy.connection_failed(Direction::Outbound, Failure::PeerRefused);
        proxy.connection_failed(Direction::Outbound, Failure::Tunnel);
        proxy.connection_failed(Direction::Inbound, Failure::Connect);
        proxy.inbound_refused(InboundRefusal::Policy);
        proxy.inbound_refused(InboundRefusal::NotLocal);
        metrics.tunnel.handshake(Side::Server, true);
        metrics.tunnel.handshake(Side::Server, false);
        metrics.tunnel.handshake(Side::Client, true);
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
        assert_eq!(metrics.tunnel.pool_totals().handshakes, 1);
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
        let counters = metrics.proxy.connection_opened(Route::InboundTunnel);
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
        metrics
            .identity
            .certificate_published(&identity, UNIX_EPOCH + std::time::Duration::from_secs(42));
        let series = "ferry_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/web\"}";
        assert_eq!(sample(&metrics.render(), series), Some("42"));
        metrics.identity.certificate_dropped(&identity);
        assert_eq!(sample(&metrics.render(), series), None);
    }
}
