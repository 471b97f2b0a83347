//! Revocation: when the policies change, every live connection a policy
//! admitted here is judged again, and the ones the new policies no longer
//! admit are closed (both ends reset), with a log line naming the policy
//! and both identities and a count, as a revoked permission should.

use std::sync::Arc;

use tokio::sync::watch;

use super::{connections::Connections, metrics::Direction};
use crate::workload::{
    WorkloadTable,
    policy::{Caller, Verdict},
};

/// Judges the granted connections again at every new table, until the
/// table's sender is gone.
pub async fn revoke_what_policies_no_longer_admit(
    mut tables: watch::Receiver<Arc<WorkloadTable>>,
    connections: Arc<Connections>,
) {
    while tables.changed().await.is_ok() {
        let table = tables.borrow_and_update().clone();
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
                dst.pod = meta.destination_pod.as_deref().unwrap_or("-"),
                reason = %connection.reason,
                "connection revoked: the policies no longer admit it; resetting both ends"
            );
        }
    }
}
