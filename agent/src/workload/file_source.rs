//! Watches the workload file and publishes a new [`WorkloadTable`] whenever it
//! changes. A file that stops being valid is reported and ignored: the agent
//! keeps serving from the last good table.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ferry_proto::Untrusted;
use tokio::sync::watch;

use super::{PolicySettings, WorkloadTable, file::WorkloadFile};
use crate::workload::file::WorkloadFileError;

/// How often the file is checked for changes. Polling the metadata is cheap
/// and sees every kind of update (in place, rename over, ConfigMap symlink swap).
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

pub struct FileSource {
    path: PathBuf,
    node: String,
    settings: PolicySettings,
    seen: Option<(SystemTime, u64)>,
}

impl FileSource {
    /// Loads the file once; an invalid file at start is an error the caller reports.
    pub fn load(
        path: PathBuf,
        node: String,
        settings: PolicySettings,
    ) -> Result<(Self, WorkloadTable), WorkloadFileError> {
        let mut source = Self {
            path,
            node,
            settings,
            seen: None,
        };
        let table = source.read()?;
        table.log_policy_problems();
        Ok((source, table))
    }

    /// Publishes every later valid version of the file until the receivers are gone.
    pub async fn watch(mut self, tx: watch::Sender<Arc<WorkloadTable>>) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            if self.stamp() == self.seen {
                continue;
            }
            match self.read() {
                Ok(table) => {
                    tracing::info!(file = %self.path.display(), pods = table.workloads.len(), policies = table.policies.len(), "workload file changed");
                    table.log_policy_problems();
                    tx.send_replace(Arc::new(table));
                }
                Err(error) => {
                    tracing::error!(error = %Untrusted(&error), "ignoring the changed workload file; keeping the last good one")
                }
            }
        }
    }

    fn read(&mut self) -> Result<WorkloadTable, WorkloadFileError> {
        self.seen = self.stamp();
        let file = WorkloadFile::load(&self.path, Some(&self.node))?;
        Ok(WorkloadTable::from_file(&file, &self.node, &self.settings))
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }
}
