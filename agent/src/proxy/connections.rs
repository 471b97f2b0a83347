//! The live connections the agent carries, for `/config_dump` and `/connections`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

/// One proxied connection, as an operator sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    pub id: u64,
    /// `namespace/name` of the pod that dialled.
    pub source_pod: Option<String>,
    pub source: SocketAddr,
    /// The address the application dialled (its `getpeername` answer).
    pub original_dst: SocketAddr,
    /// `namespace/name` of the pod behind `original_dst`, if it is one.
    pub destination_pod: Option<String>,
    /// The verified SPIFFE id of the source (the client certificate's on
    /// inbound tunnels; the source pod's ServiceAccount on outbound ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    /// The SPIFFE id the destination must prove (tunnelled connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<String>,
    /// How the agent carries it.
    pub route: Route,
    pub opened_at_unix_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Route {
    /// Plain TCP from this agent to the destination.
    Passthrough,
    /// Over an mTLS tunnel to the destination node's agent.
    Tunnel,
    /// To a meshed pod on this node, straight from this agent.
    Direct,
    /// Arrived over an mTLS tunnel from another agent, to a pod on this node.
    InboundTunnel,
}

/// Counters since the agent started.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    /// Connections the capture programs redirected and the agent accepted.
    pub captured: AtomicU64,
    /// Connections on the outbound port that the capture programs did not send.
    pub uncaptured: AtomicU64,
    /// Captured connections whose destination could not be reached.
    pub upstream_failures: AtomicU64,
    /// Tunnel connections from other agents that completed mutual TLS.
    pub inbound_handshakes: AtomicU64,
    /// Tunnel connections refused before or during the handshake.
    pub inbound_refused: AtomicU64,
    /// `CONNECT` requests refused (not a local meshed pod, wrong identity, policy).
    pub inbound_denied: AtomicU64,
    /// Outbound connections refused by policy or by the peer agent.
    pub outbound_denied: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Connections {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, ConnectionInfo>>,
    pub totals: Totals,
}

impl Connections {
    /// Records a connection; it is forgotten when the returned guard drops.
    pub fn open(self: &Arc<Self>, mut info: ConnectionInfo) -> Tracked {
        info.id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        info.opened_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let id = info.id;
        self.live.lock().expect("connections lock").insert(id, info);
        Tracked {
            id,
            registry: Arc::clone(self),
        }
    }

    pub fn live(&self) -> Vec<ConnectionInfo> {
        self.live
            .lock()
            .expect("connections lock")
            .values()
            .cloned()
            .collect()
    }
}

/// Keeps a connection listed while it lives.
pub struct Tracked {
    id: u64,
    registry: Arc<Connections>,
}

impl Tracked {
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.registry
            .live
            .lock()
            .expect("connections lock")
            .remove(&self.id);
    }
}
