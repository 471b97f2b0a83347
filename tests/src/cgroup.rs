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
pub const SUBTREE: &str = "ferry-sim";

/// How long a cgroup gets to empty after its processes were killed.
const EMPTY_WAIT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a pure v2
/// machine, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    match find_cgroup2(&mountinfo) {
        Some(point) => Ok(point),
        None => bail!(
            "no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo); \
             the simulated pods are cgroup v2 directories: run `cargo xtask setup`, which mounts one"
        ),
    }
}

/// The mount point of the first `cgroup2` line of a mountinfo file.
fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        mount
            .split_whitespace()
            .nth(4)
            .map(|p| PathBuf::from(unescape(p)))
    })
}

/// Mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

/// Every directory below `dir` (not `dir` itself), children before parents:
/// the order in which rmdir can remove them.
pub(crate) fn subdirs_deepest_first(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(err) => return Err(err).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_type()?.is_dir() {
            found.extend(subdirs_deepest_first(&entry.path())?);
            found.push(entry.path());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_of_a_hybrid_machine() {
        let mountinfo = "\
29 23 0:25 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
30 29 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
31 29 0:27 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            find_cgroup2(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2("31 29 0:27 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape(r"/mnt/my\040cgroup"), "/mnt/my cgroup");
        assert_eq!(unescape(r"/plain\path"), r"/plain\path");
    }
}
