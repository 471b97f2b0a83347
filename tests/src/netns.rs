//! Named network namespaces (the `ip netns` kind: a file in `/run/netns`),
//! and running code inside one.

use std::{fs, path::Path, thread};

use anyhow::{Context as _, anyhow};
use nix::sched::{CloneFlags, setns};

use crate::process::run_checked;

/// Where `ip netns add NAME` puts the namespace's handle.
pub const NETNS_DIR: &str = ferry_leftovers::NETNS_DIR;
/// Every namespace the harness makes starts with this, so leftovers are easy
/// to find and never confused with the machine's own.
pub const NETNS_PREFIX: &str = ferry_leftovers::NETNS_PREFIX;

/// Runs `ip` with `args`; its stdout, or an error with its stderr.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<String> {
    run_checked("ip", args)
}

/// Removes the name; the namespace itself goes when nothing uses it anymore.
pub(crate) fn delete(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "delete", name]).map(drop)
}

/// The processes in namespace `name`.
pub(crate) fn pids(name: &str) -> anyhow::Result<Vec<i32>> {
    let out = ip(&["netns", "pids", name])?;
    Ok(out
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect())
}

/// Runs `f` on a thread that has entered namespace `name`. Network
/// namespaces are per thread, so the rest of the test process stays where it
/// is, and the thread (with its namespace) ends with `f`.
pub fn in_netns<T: Send>(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let path = Path::new(NETNS_DIR).join(name);
    let handle = fs::File::open(&path)
        .with_context(|| format!("cannot open network namespace {}", path.display()))?;
    thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&handle, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("cannot enter network namespace {name}"))?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("the thread working in network namespace {name} panicked"))?
    })
}

/// Runs the future `make` returns on a one-thread tokio runtime, on a
/// thread that has entered namespace `name` (see [`in_netns`]).
pub fn block_on_in<T: Send, F: std::future::Future<Output = anyhow::Result<T>>>(
    name: &str,
    make: impl FnOnce() -> F + Send,
) -> anyhow::Result<T> {
    in_netns(name, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(make())
    })
}

/// Sets a sysctl of namespace `name`, e.g. `net/ipv4/ip_forward`. The
/// `/proc/sys/net` a thread opens is that of its own namespace.
pub(crate) fn set_sysctl(name: &str, key: &str, value: &str) -> anyhow::Result<()> {
    in_netns(name, || {
        let path = Path::new("/proc/sys").join(key);
        fs::write(&path, value)
            .with_context(|| format!("cannot write {value:?} to {} in {name}", path.display()))
    })
}

/// Whether namespace `name` exists.
pub fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}
