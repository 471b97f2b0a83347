//! What a [`Cluster`](super::Cluster) made, recorded as it is made, and its
//! removal when the cluster is dropped, also when a test panics: processes
//! killed (also any left in its cgroups and namespaces), namespaces
//! deleted, bpffs pins, cgroups and the temporary directory removed.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
};

use anyhow::Context as _;

use crate::{cgroup, netns, process::Shared};

/// Everything a cluster made, in creation order; removed on drop.
pub(super) struct Made {
    /// Names the cluster in messages: `<id> (<name>)`.
    cluster: String,
    /// The cluster's temporary directory (made first, removed last).
    pub tempdir: PathBuf,
    pub netns: Vec<String>,
    pub cgroups: Vec<PathBuf>,
    /// Where the nodes' agents pin (made by the agents, not the harness).
    pub pin_dirs: Vec<PathBuf>,
    pub procs: Vec<Arc<Shared>>,
}

impl Made {
    pub fn new(cluster: String, tempdir: PathBuf) -> Self {
        Self {
            cluster,
            tempdir,
            netns: Vec::new(),
            cgroups: Vec::new(),
            pin_dirs: Vec::new(),
            procs: Vec::new(),
        }
    }

    /// Removes everything; returns what could not be removed.
    fn remove(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for proc in self.procs.drain(..) {
            if let Err(err) = proc.kill() {
                problems.push(format!("cannot kill {}: {err}", proc.label()));
            }
        }
        for dir in &self.cgroups {
            if let Err(err) = cgroup::kill_all(dir) {
                problems.push(format!("{err:#}"));
            }
        }
        for ns in self.netns.iter().rev() {
            match netns::pids(ns) {
                Ok(pids) => pids.into_iter().for_each(cgroup::kill),
                Err(err) => problems.push(format!("{err:#}")),
            }
        }
        for ns in self.netns.drain(..).rev() {
            if let Err(err) = netns::delete(&ns) {
                problems.push(format!("{err:#}"));
            }
        }
        for dir in self.pin_dirs.drain(..) {
            if let Err(err) = remove_tree(&dir) {
                problems.push(format!("{err:#}"));
            }
        }
        for dir in self.cgroups.drain(..).rev() {
            if let Err(err) = cgroup::remove(&dir) {
                problems.push(format!("{err:#}"));
            }
        }
        if let Err(err) = remove_tree(&self.tempdir) {
            problems.push(format!("{err:#}"));
        }
        problems
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        if thread::panicking() {
            for proc in &self.procs {
                eprintln!(
                    "ferry-tests: stderr of {} (last lines):\n{}",
                    proc.label(),
                    proc.stderr_tail()
                );
            }
        }
        for problem in self.remove() {
            eprintln!(
                "ferry-tests: cleanup of cluster {}: {problem}",
                self.cluster
            );
        }
    }
}

/// Removes a file or directory tree; absent is fine. Works on bpffs pins.
fn remove_tree(path: &Path) -> anyhow::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => Err(err),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    result.with_context(|| format!("cannot remove {}", path.display()))
}
