//! Ferry's end-to-end test harness: simulated Kubernetes nodes built from
//! the running kernel (network namespaces, veths, bridges, cgroup v2
//! directories; root needed), real `ferry-agent` processes on them, and
//! `ferry-testapp` workloads in their pods. See [`Cluster`].
//!
//! - `sim/`: the [`Cluster`], split into `topology` (namespaces, veths,
//!   addresses, routes, pod cgroups), `workload_file`, `agent` (one builder,
//!   [`Cluster::agent`], and the admin endpoint) and `teardown` (everything
//!   the cluster made, removed on drop, also on panic);
//! - [`testapp`]: the typed driver of `ferry-testapp` ([`testapp::TestApp`],
//!   the shared [`testapp::exchange`]), its command line and its lines;
//! - [`load`]: the same for `ferry-load`, the benchmark's load generator;
//! - [`ca`]: the CA fixture; [`kube_api`]: the stand-in Kubernetes API server;
//! - [`inspect`]: bpftool and the admin endpoint, read as an operator reads
//!   them; [`wire`]: tcpdump on the node link;
//! - `process` ([`Proc`]), [`netns`], [`cgroup`], [`http`]: what they stand on;
//! - [`leftovers`]: what a killed test may leave on the machine (the
//!   `ferry-leftovers` crate, which `cargo xtask test` uses too);
//! - [`PORT`], [`WAIT`], [`MIB`]: the constants every test shares.

pub mod apps;
pub mod baselines;
pub mod bench;
pub mod ca;
pub mod cgroup;
pub mod ciphers;
pub mod http;
pub mod inspect;
pub mod issuance;
pub mod kube_api;
pub mod load;
pub mod netns;
mod process;
mod sim;
pub mod stream;
pub mod testapp;
pub mod tunnel_client;
pub mod wire;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};

/// What a test run may leave on the machine, found the way `cargo xtask
/// test` finds it.
pub use ferry_leftovers as leftovers;
pub use process::Proc;
pub use sim::{
    Agent, AgentBuilder, AgentCa, AgentExit, CgroupDriver, Cluster, DrainFinished, Node, NodeId,
    Place, Pod, PodId, PodOptions, policy,
};

/// The bpffs directory under which agents pin, in `<root>/<node name>/`:
/// the agent's default, so pins of tests and of a manual run look alike
/// (and where the leftover finder looks; a test below checks they agree).
pub const BPFFS_ROOT: &str = ferry_agent::cli::DEFAULT_BPFFS_ROOT;

/// The port the tests' servers (`ferry-testapp serve`) listen on; a test
/// with more servers in one pod uses the ports after it.
pub const PORT: u16 = 8080;
/// How long a test waits for a workload or an agent to do what it should
/// before it fails: generous, for slow machines running debug builds that
/// carry 64 MiB through TLS; a hang still fails.
pub const WAIT: Duration = Duration::from_secs(60);
/// A mebibyte, for byte counts.
pub const MIB: u64 = 1 << 20;

/// The path of a workspace binary built in the same profile as the running
/// executable (`target/<profile>/<name>`, found from a test binary in
/// `target/<profile>/deps/` or a binary in `target/<profile>/`).
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} does not exist; build it first: cargo xtask test builds ferry-agent and ferry-testapp \
             (or `cargo build -p ferry-agent -p ferry-tests`)",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_leftover_finder_looks_where_agents_pin() {
        assert_eq!(super::BPFFS_ROOT, ferry_leftovers::BPF_PINS);
    }
}
