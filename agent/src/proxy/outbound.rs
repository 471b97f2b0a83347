//! The outbound listener: every connection a meshed pod on this node makes
//! arrives here, redirected by the capture programs. The agent looks up where
//! it was going, who sent it, and carries it there.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::Instrument as _;

use super::{
    connections::{ConnectionInfo, Connections, Route},
    relay,
};
use crate::{capture::OriginalDsts, workload::WorkloadTable};

/// How long the agent waits for a destination to accept before resetting the client.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Outbound {
    pub workloads: watch::Receiver<Arc<WorkloadTable>>,
    pub original_dsts: Arc<OriginalDsts>,
    pub connections: Arc<Connections>,
}

impl Outbound {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = Arc::clone(&self);
            tokio::spawn(async move { this.handle(stream, peer).await });
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let Ok(local) = client.local_addr() else {
            return;
        };
        let Some(original_dst) = self.original_dsts.lookup(peer, local) else {
            self.connections.totals.uncaptured.fetch_add(1, relaxed());
            tracing::warn!(%peer, %local, "connection to the outbound port was not redirected by Ferry's capture; closing it");
            relay::reset(&client);
            return;
        };
        self.connections.totals.captured.fetch_add(1, relaxed());
        let table = self.workloads.borrow().clone();
        let source_pod = table.by_ip(peer.ip()).map(|w| w.key());
        let destination_pod = table.by_ip(original_dst.ip()).map(|w| w.key());
        let span = tracing::info_span!(
            "outbound",
            src.pod = source_pod.as_deref().unwrap_or("unknown"),
            src.addr = %peer,
            dst.addr = %original_dst,
            dst.pod = destination_pod.as_deref().unwrap_or("none"),
        );
        let info = ConnectionInfo {
            id: 0,
            source_pod,
            source: peer,
            original_dst,
            destination_pod,
            route: Route::Passthrough,
            opened_at_unix_ms: 0,
        };
        let tracked = self.connections.open(info);
        async move {
            tracing::info!(connection = tracked.id(), "captured connection");
            let upstream =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(original_dst)).await
                {
                    Ok(Ok(upstream)) => upstream,
                    Ok(Err(error)) => return self.upstream_failed(&client, &error.to_string()),
                    Err(_) => return self.upstream_failed(&client, "timed out"),
                };
            let _ = upstream.set_nodelay(true);
            let _ = client.set_nodelay(true);
            match relay::relay(client, upstream).await {
                Ok((sent, received)) => tracing::info!(sent, received, "connection closed"),
                Err(error) => tracing::info!(%error, "connection reset"),
            }
            drop(tracked);
        }
        .instrument(span)
        .await;
    }

    /// The client sees the destination's refusal as a reset, never a hang.
    fn upstream_failed(&self, client: &TcpStream, error: &str) {
        self.connections
            .totals
            .upstream_failures
            .fetch_add(1, relaxed());
        tracing::warn!(
            error,
            "cannot reach the original destination; resetting the client"
        );
        relay::reset(client);
    }
}

fn relaxed() -> std::sync::atomic::Ordering {
    std::sync::atomic::Ordering::Relaxed
}
