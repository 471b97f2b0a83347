//! Node authorization: the CA signs for a ServiceAccount only when one of
//! its pods runs on the node of the agent that asks. Without a cluster the
//! facts come from the workload file, re-read whenever it changes.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use ferry_proto::{Untrusted, workload_file::WorkloadFile};

pub struct PodIndex {
    path: PathBuf,
    state: Mutex<Loaded>,
}

struct Loaded {
    modified: Option<SystemTime>,
    file: WorkloadFile,
}

impl PodIndex {
    pub fn load(path: &Path) -> Result<Self, String> {
        let (modified, file) = read(path)?;
        Ok(Self {
            path: path.to_owned(),
            state: Mutex::new(Loaded { modified, file }),
        })
    }

    /// Whether a pod of `namespace/service_account` runs on `node`. A file
    /// that changed is re-read first; a broken new version is logged and the
    /// last good one kept.
    pub fn has_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let mut state = self.state.lock().expect("pod index lock");
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified != state.modified {
            match read(&self.path) {
                Ok((modified, file)) => *state = Loaded { modified, file },
                Err(error) => {
                    tracing::error!(error = %Untrusted(&error), "keeping the last good workload file");
                    state.modified = modified;
                }
            }
        }
        state.file.pods.iter().any(|pod| {
            pod.node == node && pod.namespace == namespace && pod.service_account == service_account
        })
    }
}

fn read(path: &Path) -> Result<(Option<SystemTime>, WorkloadFile), String> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let file = WorkloadFile::load(path, None).map_err(|e| e.to_string())?;
    Ok((modified, file))
}
