//! What Ferry's end-to-end tests make on the machine, and how to find and
//! remove what a test left behind (its process was killed before it could
//! clean up): `ferry-*` network namespaces, cgroups under `ferry-sim/`, pins
//! under `/sys/fs/bpf/ferry/`, and `ferry-agent` / `ferry-testapp` /
//! `ferry-load` processes.
//!
//! One finder for both of its users: the harness (`ferry-tests`, which also
//! names what it makes with these constants) and `cargo xtask test`, which
//! removes stale leftovers before the suite and fails if the suite leaves
//! any. It needs only std, libc and anyhow, so xtask stays cheap to build.
//!
//! Finding runs no command (it reads `/proc`, [`NETNS_DIR`] — the directory
//! `ip netns list` reads — and the mount table), so a check prints nothing.
//! It cannot tell a running test's things from stale ones: [`remove`] is
//! for between suites only.

mod mountinfo;

use std::{
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub use mountinfo::cgroup2_points;

/// Where `ip netns add NAME` puts the namespace's handle.
pub const NETNS_DIR: &str = "/run/netns";
/// Every network namespace the tests make is named `ferry-…`.
pub const NETNS_PREFIX: &str = "ferry-";
/// The tests' cgroups live under this directory of the cgroup v2 hierarchy.
pub const CGROUP_SUBTREE: &str = "ferry-sim";
/// The agents pin their maps and links under `<BPF_PINS>/<node>/` (the
/// agent's default `--bpffs-root`).
pub const BPF_PINS: &str = "/sys/fs/bpf/ferry";
/// The processes the tests start, as `/proc/<pid>/comm` names them.
pub const PROCESS_NAMES: &[&str] = &["ferry-agent", "ferry-testapp", "ferry-load"];

/// How long exiting processes and cgroups get to disappear.
pub const SETTLE: Duration = Duration::from_secs(3);
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

/// Everything the tests may have left, in the order it must be removed:
/// processes (so nothing recreates the rest), namespaces, cgroups, pins.
pub fn find() -> Result<Vec<Leftover>> {
    let mut found = processes()?;
    found.extend(network_namespaces()?);
    found.extend(cgroups()?);
    found.extend(bpf_pins()?);
    Ok(found)
}

/// What [`find`] still finds once `within` has passed, or sooner when it
/// finds nothing: exiting processes and emptying cgroups get a moment.
pub fn settle(within: Duration) -> Result<Vec<Leftover>> {
    let deadline = Instant::now() + within;
    loop {
        let left = find()?;
        if left.is_empty() || Instant::now() >= deadline {
            return Ok(left);
        }
        thread::sleep(POLL);
    }
}

/// `leftovers` one per line, as a bulleted list for a message.
pub fn bulleted(leftovers: &[Leftover]) -> String {
    leftovers
        .iter()
        .map(|leftover| format!("  - {leftover}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What [`remove`] tells its caller as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note<'a> {
    /// It is about to do this, written as the shell command it stands for
    /// (`kill -TERM 42`, `rmdir …`), so a user can replay it by hand.
    Doing(&'a str),
    /// It could not do this; it goes on with the rest.
    Failed(&'a str),
}

/// Removes `leftovers`, telling `note` what it does and what fails (it does
/// not stop at a failure). Stops processes first, with SIGTERM and then
/// SIGKILL, also those inside the namespaces and cgroups it removes.
pub fn remove(leftovers: &[Leftover], note: &mut dyn FnMut(Note<'_>)) {
    let pids: Vec<i32> = leftovers
        .iter()
        .filter_map(|leftover| match leftover {
            Leftover::Process { pid, .. } => Some(*pid),
            _ => None,
        })
        .collect();
    stop_processes(&pids, note);
    for leftover in leftovers {
        let removed = match leftover {
            Leftover::Process { .. } => Ok(()),
            Leftover::Netns(name) => remove_netns(name, note),
            Leftover::Cgroup(dir) => remove_cgroup(dir, note),
            Leftover::BpfPin(path) => remove_pin(path, note),
        };
        if let Err(err) = removed {
            note(Note::Failed(&format!("cannot remove {leftover}: {err:#}")));
        }
    }
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
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((name, state)) = parse_stat(&stat)
            && PROCESS_NAMES.contains(&name)
            && !matches!(state, 'Z' | 'X')
        {
            found.push(Leftover::Process {
                pid,
                name: name.to_owned(),
            });
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

/// Whether `pid` exists and is not a zombie.
fn is_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| parse_stat(&stat).map(|(_, state)| state))
        .is_some_and(|state| !matches!(state, 'Z' | 'X'))
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

/// Every directory below `ferry-sim/` of the cgroup v2 hierarchy, deepest
/// first (the order rmdir needs). The hierarchy may be mounted twice: seen
/// once. No cgroup v2 mount means there can be none.
fn cgroups() -> Result<Vec<Leftover>> {
    let mut seen = Vec::new();
    let mut found = Vec::new();
    for point in cgroup2_points()? {
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

/// Every file and directory below [`BPF_PINS`], deepest first.
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
fn stop_processes(pids: &[i32], note: &mut dyn FnMut(Note<'_>)) {
    if pids.is_empty() {
        return;
    }
    signal(pids, libc::SIGTERM, "TERM", note);
    if wait_until(|| !pids.iter().any(|&pid| is_alive(pid))) {
        return;
    }
    let stubborn: Vec<i32> = pids.iter().copied().filter(|&pid| is_alive(pid)).collect();
    signal(&stubborn, libc::SIGKILL, "KILL", note);
    wait_until(|| !stubborn.iter().any(|&pid| is_alive(pid)));
}

/// Sends `signal` to each pid (std cannot), noted as the `kill` it stands for.
fn signal(pids: &[i32], signal: libc::c_int, name: &str, note: &mut dyn FnMut(Note<'_>)) {
    let listed: Vec<String> = pids.iter().map(i32::to_string).collect();
    note(Note::Doing(&format!("kill -{name} {}", listed.join(" "))));
    for &pid in pids {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        if unsafe { libc::kill(pid, signal) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                note(Note::Failed(&format!("cannot signal process {pid}: {err}")));
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
fn remove_netns(name: &str, note: &mut dyn FnMut(Note<'_>)) -> Result<()> {
    let pids = ip(&["netns", "pids", name], note)
        .with_context(|| format!("cannot list the processes in network namespace {name}"))?;
    let pids: Vec<i32> = pids
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect();
    stop_processes(&pids, note);
    ip(&["netns", "delete", name], note).map(drop)
}

/// Runs `ip ARGS`; its stdout, or an error with its stderr.
fn ip(args: &[&str], note: &mut dyn FnMut(Note<'_>)) -> Result<String> {
    let line = format!("ip {}", args.join(" "));
    note(Note::Doing(&line));
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{line}` (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Kills what runs in the cgroup (through `cgroup.kill`, which also reaches
/// processes we know nothing about), then removes the directory.
fn remove_cgroup(dir: &Path, note: &mut dyn FnMut(Note<'_>)) -> Result<()> {
    if !dir.exists() {
        return Ok(()); // removed with its parent mount's twin, or by its owner
    }
    if !cgroup_is_empty(dir) {
        note(Note::Doing(&format!(
            "echo 1 > {}",
            dir.join("cgroup.kill").display()
        )));
        fs::write(dir.join("cgroup.kill"), "1")
            .with_context(|| format!("cannot kill the processes in cgroup {}", dir.display()))?;
        if !wait_until(|| cgroup_is_empty(dir)) {
            bail!("its processes did not exit within {SETTLE:?}");
        }
    }
    note(Note::Doing(&format!("rmdir {}", dir.display())));
    ignore_not_found(fs::remove_dir(dir)).with_context(|| format!("cannot rmdir {}", dir.display()))
}

fn cgroup_is_empty(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.procs")).map_or(true, |procs| procs.trim().is_empty())
}

/// Unpins a map, program or link (a pinned link keeps its program attached).
fn remove_pin(path: &Path, note: &mut dyn FnMut(Note<'_>)) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    let removed = if meta.is_dir() {
        note(Note::Doing(&format!("rmdir {}", path.display())));
        fs::remove_dir(path)
    } else {
        note(Note::Doing(&format!("rm {}", path.display())));
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
    fn reads_name_and_state_from_stat() {
        assert_eq!(
            parse_stat("42 (ferry-agent) S 1 42 42 0"),
            Some(("ferry-agent", 'S'))
        );
        assert_eq!(parse_stat("7 (a) b) Z 1"), Some(("a) b", 'Z')));
    }

    #[test]
    fn lists_children_before_their_parents() {
        let root = std::env::temp_dir().join(format!("ferry-leftovers-{}", std::process::id()));
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
