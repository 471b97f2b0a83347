//! The cgroup v2 directories that stand for pods: the agent attaches its
//! capture programs to them, and the harness starts pod processes in them.

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{sys::signal, unistd::Pid};

/// The harness's cgroups live under `<cgroup2>/ferry-sim/<cluster id>/`.
pub const SUBTREE: &str = ferry_leftovers::CGROUP_SUBTREE;

/// How long a cgroup gets to empty after its processes were killed.
const EMPTY_WAIT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

/// Where the cgroup v2 hierarchy is mounted (the first mount of it, if it
/// is mounted more than once).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    match ferry_leftovers::cgroup2_points()?.into_iter().next() {
        Some(point) => Ok(point),
        None => bail!(
            "no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo); \
             the simulated pods are cgroup v2 directories: run `cargo xtask setup`, which mounts one"
        ),
    }
}

/// The processes in cgroup `dir` (not its children).
pub(crate) fn procs(dir: &Path) -> anyhow::Result<Vec<i32>> {
    let path = dir.join("cgroup.procs");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// SIGKILLs every process in cgroup `dir`.
pub(crate) fn kill_all(dir: &Path) -> anyhow::Result<()> {
    for pid in procs(dir)? {
        kill(pid);
    }
    Ok(())
}

/// SIGKILLs `pid`; it may be gone already, which is fine.
pub(crate) fn kill(pid: i32) {
    let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL);
}

/// Removes the (childless) cgroup `dir`, waiting briefly for killed
/// processes to leave it: rmdir fails with EBUSY until they have.
pub(crate) fn remove(dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + EMPTY_WAIT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) if Instant::now() >= deadline => {
                let left = procs(dir).unwrap_or_default();
                return Err(err).with_context(|| {
                    format!(
                        "cannot remove cgroup {} (processes in it: {left:?})",
                        dir.display()
                    )
                });
            }
            Err(_) => {
                let _ = kill_all(dir);
                thread::sleep(POLL);
            }
        }
    }
}
