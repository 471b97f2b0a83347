//! The live connections the agent carries, for `/config_dump` and
//! `/connections`, the connection metrics they update, and the access-log
//! line each writes when it ends.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};

use ferry_proto::SpiffeId;

use super::metrics::{ConnectionCounters, ProxyMetrics};
use crate::drain::{DrainSignal, Phase};

/// One proxied connection, as an operator sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    pub id: u64,
    pub opened_at_unix_ms: u64,
    #[serde(flatten)]
    pub meta: ConnectionMeta,
    /// Bytes the client (the application that dialled) sent so far.
    pub bytes_sent: u64,
    /// Bytes the client received so far.
    pub bytes_received: u64,
}

/// What the proxy knows of a connection when it starts carrying it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionMeta {
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// What a destination's policies admitted a connection as: asked again
/// when the policies change, and the connection is closed if they no
/// longer admit it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub caller: SpiffeId,
    /// `namespace/name` of the destination pod (of this node).
    pub pod: String,
    pub port: u16,
}

/// What a connection admitted by policy was granted, and where its
/// revocation is announced (set once, with the reason; its relay watches it).
struct Revocable {
    grant: Grant,
    revoked: watch::Sender<Option<String>>,
}

/// A connection closed because the policies no longer admit it.
#[derive(Debug, Clone)]
pub struct Revoked {
    pub id: u64,
    pub meta: ConnectionMeta,
    /// Why, as the policies say it.
    pub reason: String,
}

/// Why a relay is told to stop before its connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The policies no longer admit it: both ends are reset.
    Revoked(String),
    /// The agent's drain deadline passed: both ends are closed cleanly.
    Deadline,
}

/// The live connections and the metrics their opening, bytes and closing update.
pub struct Connections {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<Live>>>,
    metrics: Arc<ProxyMetrics>,
    drain: DrainSignal,
}

/// One live connection: what it is and what it has moved so far.
struct Live {
    id: u64,
    opened_at_unix_ms: u64,
    meta: ConnectionMeta,
    /// Only for connections admitted here by policy: what they were granted,
    /// and where their revocation is announced.
    revocable: Option<Box<Revocable>>,
    sent: AtomicU64,
    received: AtomicU64,
}

impl Connections {
    /// Connections still open when `drain` reaches [`Phase::Closing`] are
    /// told to stop ([`Stop::Deadline`]).
    pub fn new(metrics: Arc<ProxyMetrics>, drain: DrainSignal) -> Self {
        Self {
            next_id: AtomicU64::new(0),
            live: Mutex::default(),
            metrics,
            drain,
        }
    }

    /// How many connections are open.
    pub fn count(&self) -> usize {
        self.live.lock().expect("connections lock").len()
    }

    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// Records a connection and counts it opened; it is forgotten (and no
    /// longer active) when the returned guard drops. With a `grant`, the
    /// policies may revoke it ([`revoke_where`](Self::revoke_where)).
    pub fn open(self: &Arc<Self>, meta: ConnectionMeta, grant: Option<Grant>) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let counters = self.metrics.connection_opened(meta.route);
        let live = Arc::new(Live {
            id,
            opened_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            meta,
            revocable: grant.map(|grant| {
                Box::new(Revocable {
                    grant,
                    revoked: watch::Sender::new(None),
                })
            }),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        });
        self.live
            .lock()
            .expect("connections lock")
            .insert(id, Arc::clone(&live));
        Tracked {
            id,
            live,
            counters,
            registry: Arc::clone(self),
        }
    }

    /// Revokes every granted connection for which `judge` gives a reason,
    /// once; returns those it revoked. Their relays reset both ends.
    pub fn revoke_where(&self, judge: impl Fn(&Grant) -> Option<String>) -> Vec<Revoked> {
        let live: Vec<Arc<Live>> = self
            .live
            .lock()
            .expect("connections lock")
            .values()
            .cloned()
            .collect();
        live.iter()
            .filter_map(|live| {
                let revocable = live.revocable.as_ref()?;
                if revocable.revoked.borrow().is_some() {
                    return None;
                }
                let reason = judge(&revocable.grant)?;
                revocable.revoked.send_replace(Some(reason.clone()));
                Some(Revoked {
                    id: live.id,
                    meta: live.meta.clone(),
                    reason,
                })
            })
            .collect()
    }

    pub fn live(&self) -> Vec<ConnectionInfo> {
        self.live
            .lock()
            .expect("connections lock")
            .values()
            .map(|live| ConnectionInfo {
                id: live.id,
                opened_at_unix_ms: live.opened_at_unix_ms,
                meta: live.meta.clone(),
                bytes_sent: live.sent.load(Ordering::Relaxed),
                bytes_received: live.received.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// The reason, once the connection is revoked; pending forever without a
/// receiver, or once the connection's entry is gone (nothing will revoke it).
async fn revocation(revoked: Option<watch::Receiver<Option<String>>>) -> String {
    if let Some(mut revoked) = revoked {
        loop {
            if let Some(reason) = revoked.borrow_and_update().clone() {
                return reason;
            }
            if revoked.changed().await.is_err() {
                break;
            }
        }
    }
    std::future::pending().await
}

/// Keeps a connection listed (and counted active) while it lives.
pub struct Tracked {
    id: u64,
    live: Arc<Live>,
    counters: ConnectionCounters,
    registry: Arc<Connections>,
}

impl Tracked {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Resolves once the connection is revoked, or the agent's drain
    /// deadline passes; pending otherwise. The relay stops on it.
    pub fn stopped(&self) -> impl Future<Output = Stop> + Send + 'static {
        // Only a granted connection can be revoked; the others need no receiver.
        let revoked = self
            .live
            .revocable
            .as_ref()
            .map(|revocable| revocable.revoked.subscribe());
        let drain = self.registry.drain.clone();
        // The waits are made inside the block, so its state holds each once
        // (it is part of every relay's future, so of every connection's memory).
        async move {
            tokio::select! {
                reason = revocation(revoked) => Stop::Revoked(reason),
                () = drain.reached(Phase::Closing) => Stop::Deadline,
            }
        }
    }

    /// `stream` is the client's end of the relay (the socket of the pod that
    /// dialled): what is read from it the client sent, what is written it received.
    pub fn client_end<S>(&self, stream: S) -> Counted<S> {
        self.counted(stream, true)
    }

    /// `stream` is the server's end of the relay (the socket to the pod that
    /// was dialled): what is read from it the client received.
    pub fn server_end<S>(&self, stream: S) -> Counted<S> {
        self.counted(stream, false)
    }

    /// Writes the connection's one access-log line at `info` (in the
    /// caller's span) for how its relay ended: its bytes each way, or the
    /// error that reset it. The connection stops being listed here.
    pub fn finish(self, relayed: io::Result<(u64, u64)>) {
        match relayed {
            Ok(_) => tracing::info!(
                sent = self.live.sent.load(Ordering::Relaxed),
                received = self.live.received.load(Ordering::Relaxed),
                "connection closed"
            ),
            Err(error) => tracing::info!(%error, "connection reset"),
        }
    }

    fn counted<S>(&self, inner: S, reads_are_sent: bool) -> Counted<S> {
        Counted {
            inner,
            live: Arc::clone(&self.live),
            sent: self.counters.sent.clone(),
            received: self.counters.received.clone(),
            reads_are_sent,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.counters.active.dec();
        self.registry
            .live
            .lock()
            .expect("connections lock")
            .remove(&self.id);
    }
}

/// A relay end that counts the bytes moving through it, per chunk, into its
/// connection's `/connections` entry and `ferry_connection_bytes_total`.
pub struct Counted<S> {
    inner: S,
    live: Arc<Live>,
    sent: Counter<u64, AtomicU64>,
    received: Counter<u64, AtomicU64>,
    reads_are_sent: bool,
}

impl<S> Counted<S> {
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// What the connection moved so far: bytes the client sent and received.
    pub fn moved(&self) -> (u64, u64) {
        (
            self.live.sent.load(Ordering::Relaxed),
            self.live.received.load(Ordering::Relaxed),
        )
    }

    /// Counts bytes that went from this end's peer towards the other side
    /// without passing through `poll_read` (spliced in the kernel).
    pub fn count_from(&self, bytes: usize) {
        self.count(true, bytes);
    }

    /// Counts bytes delivered to this end's peer without `poll_write`.
    pub fn count_to(&self, bytes: usize) {
        self.count(false, bytes);
    }

    fn count(&self, read: bool, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let bytes = bytes as u64;
        if read == self.reads_are_sent {
            self.live.sent.fetch_add(bytes, Ordering::Relaxed);
            self.sent.inc_by(bytes);
        } else {
            self.live.received.fetch_add(bytes, Ordering::Relaxed);
            self.received.inc_by(bytes);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.count(true, buf.filled().len() - before);
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = result {
            this.count(false, written);
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn meta(route: Route) -> ConnectionMeta {
        ConnectionMeta {
            source_pod: Some("shop/web-0".to_owned()),
            source: "198.18.1.2:40000".parse().unwrap(),
            original_dst: "198.18.2.2:80".parse().unwrap(),
            destination_pod: None,
            source_identity: None,
            destination_identity: None,
            route,
        }
    }

    #[tokio::test]
    async fn a_relay_end_counts_each_way_into_the_connection_and_the_metrics() {
        let metrics = crate::metrics::Metrics::default();
        let connections = Arc::new(Connections::new(
            Arc::clone(&metrics.proxy),
            DrainSignal::never(),
        ));
        let tracked = connections.open(meta(Route::Passthrough), None);
        let (client_app, agent_side) = tokio::io::duplex(1024);
        let mut client_end = tracked.client_end(agent_side);
        let mut client_app = client_app;
        client_app.write_all(b"hello").await.unwrap();
        let mut buf = [0; 5];
        client_end.read_exact(&mut buf).await.unwrap();
        client_end.write_all(b"a longer answer").await.unwrap();

        let live = connections.live();
        assert_eq!((live[0].bytes_sent, live[0].bytes_received), (5, 15));
        let text = metrics.render();
        assert!(
            text.contains("ferry_connection_bytes_total{direction=\"outbound\",route=\"passthrough\",flow=\"received\"} 15"),
            "{text}"
        );
        assert!(
            text.contains(
                "ferry_connections_active{direction=\"outbound\",route=\"passthrough\"} 1"
            ),
            "{text}"
        );
        drop(tracked);
        assert!(connections.live().is_empty());
        assert!(
            metrics.render().contains(
                "ferry_connections_active{direction=\"outbound\",route=\"passthrough\"} 0"
            )
        );
    }
}
#[cfg(test)]
mod future_size {
    /// The stop future is part of every relay's future, so of every
    /// connection's memory: 808 bytes with the waits captured and then moved
    /// into `select!`, 392 as built (debug build; release is smaller).
    #[test]
    fn a_relays_stop_future_stays_small() {
        let metrics = crate::metrics::Metrics::default();
        let connections = std::sync::Arc::new(super::Connections::new(
            std::sync::Arc::clone(&metrics.proxy),
            crate::drain::DrainSignal::never(),
        ));
        let meta = super::ConnectionMeta {
            source_pod: None,
            source: "198.18.1.2:1".parse().unwrap(),
            original_dst: "198.18.1.3:1".parse().unwrap(),
            destination_pod: None,
            source_identity: None,
            destination_identity: None,
            route: super::Route::Tunnel,
        };
        let tracked = connections.open(meta, None);
        let size = std::mem::size_of_val(&tracked.stopped());
        assert!(
            size <= 448,
            "the stop future takes {size} bytes per connection"
        );
    }
}
