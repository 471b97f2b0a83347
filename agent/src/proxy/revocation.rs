//! Following the policies: at every new table the gauges of policies in
//! force are set, and every live connection a policy admitted here is
//! judged again; the ones the new policies no longer admit are closed
//! (both ends reset), with a log line naming the policy and both
//! identities and a count, as a revoked permission should.

use std::sync::Arc;

use ferry_proto::Untrusted;
use tokio::sync::watch;

use super::{connections::Connections, metrics::Direction};
use crate::workload::{
    WorkloadTable,
    policy::{Caller, Verdict},
};

/// Counts the policies and judges the granted connections again at every
/// new table (the first one included), until the table's sender is gone.
pub async fn follow_policies(
    mut tables: watch::Receiver<Arc<WorkloadTable>>,
    connections: Arc<Connections>,
) {
    loop {
        let table = tables.borrow_and_update().clone();
        let partly_ignored = table
            .policies
            .iter()
            .filter(|p| !p.problems.is_empty())
            .count();
        connections
            .metrics()
            .policies_in_force(table.policies.len() - partly_ignored, partly_ignored);
        let revoked = connections.revoke_where(|grant| {
            let pod = table.by_key(&grant.pod)?;
            match table.authorize(Caller::Identity(&grant.caller), pod, grant.port) {
                Verdict::Allowed { .. } => None,
                Verdict::Denied(denied) => Some(denied.to_string()),
            }
        });
        for connection in revoked {
            let meta = &connection.meta;
            let direction = meta.route.labels().0;
            connections.metrics().connection_revoked(direction);
            tracing::warn!(
                connection = connection.id,
                direction = if direction == Direction::Inbound { "inbound" } else { "outbound" },
                src.identity = meta.source_identity.as_deref().unwrap_or("-"),
                dst.identity = meta.destination_identity.as_deref().unwrap_or("-"),
                dst.pod = %Untrusted(meta.destination_pod.as_deref().unwrap_or("-")),
                reason = %Untrusted(&connection.reason),
                "connection revoked: the policies no longer admit it; resetting both ends"
            );
        }
        if tables.changed().await.is_err() {
            return;
        }
    }
}
