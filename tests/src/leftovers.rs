//! What a test run may leave on the machine if a cluster was not dropped
//! (the test process was killed): `ferry-*` network namespaces, cgroups under
//! `ferry-sim/`, pins under [`BPFFS_ROOT`], and `ferry-agent` /
//! `ferry-testapp` processes. For use between suites only: it cannot tell a
//! running test's things from stale ones.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{BPFFS_ROOT, cgroup, netns, sim::remove_tree};

/// `/proc/<pid>/comm` of the processes the harness starts.
const PROCESS_NAMES: &[&str] = &["ferry-agent", "ferry-testapp", "ferry-load"];
/// How long killed processes get to disappear.
const SETTLE: Duration = Duration::from_secs(3);

/// Describes every leftover, one per entry (and what could not be checked).
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    match processes() {
        Ok(procs) => found.extend(
            procs
                .into_iter()
                .map(|(pid, name)| format!("process {pid} ({name})")),
        ),
        Err(err) => found.push(format!("cannot check processes: {err:#}")),
    }
    match netns::ours() {
        Ok(names) => found.extend(names.into_iter().map(|n| format!("network namespace {n}"))),
        Err(err) => found.push(format!("cannot check network namespaces: {err:#}")),
    }
    match cgroups() {
        Ok(dirs) => found.extend(dirs.iter().map(|d| format!("cgroup {}", d.display()))),
        Err(err) => found.push(format!("cannot check cgroups: {err:#}")),
    }
    match pins() {
        Ok(paths) => found.extend(paths.iter().map(|p| format!("bpf pin {}", p.display()))),
        Err(err) => found.push(format!("cannot check bpf pins: {err:#}")),
    }
    found
}

/// Removes every leftover: processes first (so nothing holds or recreates
/// the rest), then namespaces, pins and cgroups. Fails listing what remains.
pub fn clean_leftovers() -> anyhow::Result<()> {
    for (pid, _) in processes()? {
        cgroup::kill(pid);
    }
    for name in netns::ours()? {
        netns::pids(&name)?.into_iter().for_each(cgroup::kill);
        if let Err(err) = netns::delete(&name) {
            eprintln!("ferry-tests: {err:#}");
        }
    }
    for path in pins()? {
        if let Err(err) = remove_tree(&path) {
            eprintln!("ferry-tests: {err:#}");
        }
    }
    let dirs = cgroups()?;
    for dir in &dirs {
        let _ = cgroup::kill_all(dir);
    }
    for dir in &dirs {
        if let Err(err) = cgroup::remove(dir) {
            eprintln!("ferry-tests: {err:#}");
        }
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let left = leftovers();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "cannot remove these leftovers:\n  - {}",
                left.join("\n  - ")
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Live (not zombie) processes named like the harness's binaries.
fn processes() -> anyhow::Result<Vec<(i32, String)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").context("cannot list /proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // A process may exit while we look: then it is no leftover.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((name, state)) = parse_stat(&stat)
            && PROCESS_NAMES.contains(&name)
            && !matches!(state, 'Z' | 'X')
        {
            found.push((pid, name.to_owned()));
        }
    }
    Ok(found)
}

/// The command name and state of a `/proc/<pid>/stat` line: `pid (name) S ...`.
/// The name may hold any character, so it ends at the last `)`.
fn parse_stat(stat: &str) -> Option<(&str, char)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let state = stat.get(close + 1..)?.trim_start().chars().next()?;
    Some((stat.get(open + 1..close)?, state))
}

/// Every cgroup below `<cgroup2>/ferry-sim/`, deepest first. No cgroup v2
/// mount means there can be none.
fn cgroups() -> anyhow::Result<Vec<PathBuf>> {
    let Ok(mount) = cgroup::cgroup2_mount() else {
        return Ok(Vec::new());
    };
    cgroup::subdirs_deepest_first(&mount.join(cgroup::SUBTREE))
}

/// The entries directly under [`BPFFS_ROOT`] (one per node that had an agent).
fn pins() -> anyhow::Result<Vec<PathBuf>> {
    let root = Path::new(BPFFS_ROOT);
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("cannot list {BPFFS_ROOT}")),
    };
    let mut paths = entries
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot list {BPFFS_ROOT}"))?;
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_name_and_state_from_stat() {
        assert_eq!(
            parse_stat("42 (ferry-agent) S 1 42 42 0"),
            Some(("ferry-agent", 'S'))
        );
        assert_eq!(parse_stat("7 (a) b) Z 1"), Some(("a) b", 'Z')));
    }
}
