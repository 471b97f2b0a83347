//! What the end-to-end tests may leave on the machine when a test does not
//! clean up: `ferry-*` network namespaces, cgroups under `ferry-sim/`, pins
//! under `/sys/fs/bpf/ferry/`, and `ferry-agent` / `ferry-testapp` processes.
//! `cargo xtask test` removes stale ones before the suite (so one broken run
//! does not break the next) and fails if the suite leaves any behind.
//!
//! Finding leftovers runs no command (it reads `/run/netns`, the directory
//! `ip netns list` reads), so the check after the suite prints nothing and
//! cargo test's summary stays the last thing on screen.

use std::{
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, mounts};

/// Where `ip netns add NAME` puts its handle.
const NETNS_DIR: &str = "/run/netns";
/// Every namespace the tests make is named `ferry-…`.
const NETNS_PREFIX: &str = "ferry-";
/// The tests' cgroups live under this directory of the cgroup v2 hierarchy.
const CGROUP_SUBTREE: &str = "ferry-sim";
/// The agent pins its maps and links under `/sys/fs/bpf/ferry/<node>/`.
const BPF_PINS: &str = "/sys/fs/bpf/ferry";
/// Processes the tests start (`/proc/<pid>/comm`).
const PROCESS_NAMES: &[&str] = &["ferry-agent", "ferry-testapp"];

/// How long exiting processes and cgroups get to disappear.
const SETTLE: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(100);

/// One thing a test left on the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    Process { pid: i32, name: String },
    Netns(String),
    Cgroup(PathBuf),
    BpfPin(PathBuf),
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Process { pid, name } => write!(f, "process {pid} ({name})"),
            Self::Netns(name) => write!(f, "network namespace {name}"),
            Self::Cgroup(dir) => write!(f, "cgroup {}", dir.display()),
            Self::BpfPin(path) => write!(f, "bpf pin {}", path.display()),
        }
    }
}

/// Before the suite: removes what earlier runs left, with a warning, and
/// fails only if something cannot be removed.
pub fn remove_stale() -> Result<()> {
    cmd::step("looking for leftovers of earlier test runs");
    let stale = find()?;
    if stale.is_empty() {
        cmd::note("none");
        return Ok(());
    }
    cmd::warn(&format!(
        "removing leftovers of an earlier test run:\n{}",
        bulleted(&stale)
    ));
    remove(&stale);
    let remaining = find()?;
    if !remaining.is_empty() {
        bail!(
            "cannot remove these leftovers of an earlier test run (see the warnings above); \
             remove them by hand, then rerun:\n{}",
            bulleted(&remaining)
        );
    }
    Ok(())
}

/// After the suite: fails listing whatever the tests left behind. Silent when
/// nothing is left; gives exiting processes a moment before judging.
pub fn ensure_none_left() -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let left = find()?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "tests left behind:\n{}\nevery test must remove what it made, also when it fails; \
                 the next `cargo xtask test` removes these before it starts",
                bulleted(&left)
            );
        }
        thread::sleep(POLL);
    }
}

/// Everything the tests may have left, in the order it must be removed:
/// processes (so nothing recreates the rest), namespaces, cgroups, pins.
pub fn find() -> Result<Vec<Leftover>> {
    let mut found = processes()?;
    found.extend(network_namespaces()?);
    found.extend(cgroups()?);
    found.extend(bpf_pins()?);
    Ok(found)
}

/// Removes `leftovers`, warning about (not stopping at) what cannot be removed.
pub fn remove(leftovers: &[Leftover]) {
    let pids: Vec<i32> = leftovers
        .iter()
        .filter_map(|leftover| match leftover {
            Leftover::Process { pid, .. } => Some(*pid),
            _ => None,
        })
        .collect();
    stop_processes(&pids);
    for leftover in leftovers {
        let removed = match leftover {
            Leftover::Process { .. } => Ok(()),
            Leftover::Netns(name) => remove_netns(name),
            Leftover::Cgroup(dir) => remove_cgroup(dir),
            Leftover::BpfPin(path) => remove_pin(path),
        };
        if let Err(err) = removed {
            cmd::warn(&format!("cannot remove {leftover}: {err:#}"));
        }
    }
}

fn bulleted(leftovers: &[Leftover]) -> String {
    leftovers
        .iter()
        .map(|leftover| format!("  - {leftover}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Live processes named like the tests' binaries (zombies hold nothing and
/// vanish once reaped, so they do not count).
fn processes() -> Result<Vec<Leftover>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").context("cannot list /proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        // A process may exit while we look: then it is not a leftover.
        let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let name = comm.trim_end().to_owned();
        if PROCESS_NAMES.contains(&name.as_str()) && is_alive(pid) {
            found.push(Leftover::Process { pid, name });
        }
    }
    Ok(found)
}

/// Whether `pid` exists and is not a zombie (state `Z` in `/proc/<pid>/stat`).
fn is_alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold any character.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].trim_start().chars().next());
    !matches!(state, None | Some('Z' | 'X'))
}

fn network_namespaces() -> Result<Vec<Leftover>> {
    let names = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries
            .map(|entry| Ok(entry?.file_name()))
            .collect::<io::Result<Vec<_>>>(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err),
    }
    .with_context(|| format!("cannot list {NETNS_DIR}"))?;
    let mut ours: Vec<String> = names
        .into_iter()
        .filter_map(|name| name.into_string().ok())
        .filter(|name| name.starts_with(NETNS_PREFIX))
        .collect();
    ours.sort();
    Ok(ours.into_iter().map(Leftover::Netns).collect())
}

/// Every directory below `ferry-sim/` of the cgroup v2 hierarchy, deepest first
/// (the order rmdir needs). The hierarchy may be mounted twice: seen once.
fn cgroups() -> Result<Vec<Leftover>> {
    let mut seen = Vec::new();
    let mut found = Vec::new();
    for point in mounts::cgroup2_points()? {
        let subtree = point.join(CGROUP_SUBTREE);
        let Ok(meta) = fs::metadata(&subtree) else {
            continue;
        };
        if !meta.is_dir() || seen.contains(&(meta.dev(), meta.ino())) {
            continue;
        }
        seen.push((meta.dev(), meta.ino()));
        found.extend(
            below_deepest_first(&subtree, true)?
                .into_iter()
                .map(Leftover::Cgroup),
        );
    }
    Ok(found)
}

/// Every file and directory below `/sys/fs/bpf/ferry/`, deepest first.
fn bpf_pins() -> Result<Vec<Leftover>> {
    let root = Path::new(BPF_PINS);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    Ok(below_deepest_first(root, false)?
        .into_iter()
        .map(Leftover::BpfPin)
        .collect())
}

/// The paths below `dir` (not `dir` itself), children before their parent.
/// With `dirs_only`, files are skipped (a cgroup's files are its interface).
fn below_deepest_first(dir: &Path, dirs_only: bool) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut entries = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .collect::<io::Result<Vec<_>>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let is_dir = entry.file_type()?.is_dir();
        if is_dir {
            found.extend(below_deepest_first(&entry.path(), dirs_only)?);
        }
        if is_dir || !dirs_only {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// SIGTERM, a moment to exit, then SIGKILL for whatever is still running.
fn stop_processes(pids: &[i32]) {
    if pids.is_empty() {
        return;
    }
    signal(pids, libc::SIGTERM, "TERM");
    if wait_until(|| !pids.iter().any(|&pid| is_alive(pid))) {
        return;
    }
    let stubborn: Vec<i32> = pids.iter().copied().filter(|&pid| is_alive(pid)).collect();
    signal(&stubborn, libc::SIGKILL, "KILL");
    wait_until(|| !stubborn.iter().any(|&pid| is_alive(pid)));
}

/// Sends `signal` to each pid (std cannot; printed as the `kill` it stands for).
fn signal(pids: &[i32], signal: libc::c_int, name: &str) {
    let listed: Vec<String> = pids.iter().map(i32::to_string).collect();
    cmd::announce_equivalent(&format!("kill -{name} {}", listed.join(" ")));
    for &pid in pids {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        if unsafe { libc::kill(pid, signal) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                cmd::warn(&format!("cannot signal process {pid}: {err}"));
            }
        }
    }
}

/// Polls `done` until it holds or [`SETTLE`] passes; tells which.
fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + SETTLE;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
    true
}

/// Stops what still runs in the namespace (a test's pod process), then
/// deletes it: deleting alone would leave those processes running.
fn remove_netns(name: &str) -> Result<()> {
    let pids = cmd::output(Command::new("ip").args(["netns", "pids", name]))
        .with_context(|| format!("cannot list the processes in network namespace {name}"))?;
    let pids: Vec<i32> = pids
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect();
    stop_processes(&pids);
    cmd::run(Command::new("ip").args(["netns", "delete", name]))
}

/// Kills what runs in the cgroup (through `cgroup.kill`, which also reaches
/// processes we know nothing about), then removes the directory.
fn remove_cgroup(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(()); // removed with its parent mount's twin, or by its owner
    }
    if !cgroup_is_empty(dir) {
        cmd::announce_equivalent(&format!("echo 1 > {}", dir.join("cgroup.kill").display()));
        fs::write(dir.join("cgroup.kill"), "1")
            .with_context(|| format!("cannot kill the processes in cgroup {}", dir.display()))?;
        if !wait_until(|| cgroup_is_empty(dir)) {
            bail!("its processes did not exit within {SETTLE:?}");
        }
    }
    cmd::announce_equivalent(&format!("rmdir {}", dir.display()));
    ignore_not_found(fs::remove_dir(dir)).with_context(|| format!("cannot rmdir {}", dir.display()))
}

fn cgroup_is_empty(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.procs")).map_or(true, |procs| procs.trim().is_empty())
}

/// Unpins a map, program or link (a pinned link keeps its program attached).
fn remove_pin(path: &Path) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    let removed = if meta.is_dir() {
        cmd::announce_equivalent(&format!("rmdir {}", path.display()));
        fs::remove_dir(path)
    } else {
        cmd::announce_equivalent(&format!("rm {}", path.display()));
        fs::remove_file(path)
    };
    ignore_not_found(removed).with_context(|| format!("cannot remove {}", path.display()))
}

fn ignore_not_found(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_children_before_their_parents() {
        let root = std::env::temp_dir().join(format!("xtask-leaks-{}", std::process::id()));
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/pin"), "").unwrap();
        let all = below_deepest_first(&root, false).unwrap();
        let dirs = below_deepest_first(&root, true).unwrap();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            all,
            [root.join("a/b/pin"), root.join("a/b"), root.join("a")]
        );
        assert_eq!(dirs, [root.join("a/b"), root.join("a")]);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(is_alive(std::process::id() as i32));
    }
}
