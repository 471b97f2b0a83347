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
    /// How the agent carries it.
    pub route: Route,
    pub opened_at_unix_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Route {
    /// Plain TCP from this agent to the destination.
    Passthrough,
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
