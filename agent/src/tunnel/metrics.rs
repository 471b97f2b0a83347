//! The tunnel's metrics: handshakes on either side, and the pool's
//! connections and streams. The pool's `/pool` totals are read from them.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

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
    /// The peer said `GOAWAY` (it drains: an agent upgrade) and its last
    /// stream ended: not a failure.
    GoAway,
    /// Closed by the peer without `GOAWAY`, failed, or found unusable.
    Broken,
}

impl PoolClose {
    fn as_str(self) -> &'static str {
        match self {
            PoolClose::Idle => "idle",
            PoolClose::Keepalive => "keepalive",
            PoolClose::GoAway => "goaway",
            PoolClose::Broken => "broken",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    side: &'static str,
    result: &'static str,
}

impl HandshakeLabels {
    fn new(side: Side, ok: bool) -> Self {
        Self {
            side: side.as_str(),
            result: if ok { "ok" } else { "error" },
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyExchangeLabels {
    side: &'static str,
    group: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Default)]
pub struct TunnelMetrics {
    handshakes: Family<HandshakeLabels, Counter<u64, AtomicU64>>,
    key_exchanges: Family<KeyExchangeLabels, Counter<u64, AtomicU64>>,
    pool_connections: Gauge<i64, AtomicI64>,
    pool_streams: Counter<u64, AtomicU64>,
    pool_closed: Family<ReasonLabels, Counter<u64, AtomicU64>>,
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
    #[serde(default)]
    pub closed_goaway: u64,
    pub closed_broken: u64,
}

impl TunnelMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tunnel_handshakes",
            "mTLS + HTTP/2 handshakes of tunnel connections, by side (client: this agent dialled) and result",
            self.handshakes.clone(),
        );
        registry.register(
            "tunnel_key_exchanges",
            "Completed tunnel handshakes by side and the key exchange group negotiated (X25519MLKEM768 is post-quantum)",
            self.key_exchanges.clone(),
        );
        registry.register(
            "pool_connections",
            "Tunnel connections open in the pool",
            self.pool_connections.clone(),
        );
        registry.register(
            "pool_streams",
            "Tunnel streams handed out by the pool (one per tunnelled connection)",
            self.pool_streams.clone(),
        );
        registry.register(
            "pool_connections_closed",
            "Tunnel connections that left the pool, by reason",
            self.pool_closed.clone(),
        );
    }

    pub fn handshake(&self, side: Side, ok: bool) {
        self.handshakes
            .get_or_create(&HandshakeLabels::new(side, ok))
            .inc();
    }

    /// A completed handshake on `side` negotiated `group`.
    pub fn key_exchange(&self, side: Side, group: &'static str) {
        self.key_exchanges
            .get_or_create(&KeyExchangeLabels {
                side: side.as_str(),
                group,
            })
            .inc();
    }

    /// Handshakes on `side` that ended `ok` (or not).
    pub fn handshakes(&self, side: Side, ok: bool) -> u64 {
        self.handshakes
            .get(&HandshakeLabels::new(side, ok))
            .map_or(0, |c| c.get())
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
            closed_goaway: closed(PoolClose::GoAway),
            closed_broken: closed(PoolClose::Broken),
        }
    }
}
