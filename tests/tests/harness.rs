//! Self-test of the simulation harness, without Ferry: unmeshed pods talk
//! directly over the simulated network (IPv4 and IPv6, on one node and
//! across nodes), and a dropped cluster leaves nothing behind. Needs root;
//! fails (never skips) when the machine cannot run simulated nodes.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use ferry_agent::workload::file::WorkloadFile;
use ferry_tests::{
    Cluster, MIB, PORT, PodId, PodOptions, WAIT, netns,
    testapp::{Family, Served, Summary, TestApp, UdpEcho, pod_addr, pod_ip},
};

#[test]
fn pods_on_one_node_talk_over_ipv4_and_ipv6() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("harness-one-node")?;
    let n1 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::unmeshed("client", "plain", "client"))?;
    let server = cluster.add_pod(n1, PodOptions::unmeshed("server", "plain", "server"))?;

    for family in [Family::V4, Family::V6] {
        exchange_and_echo(&mut cluster, client, server, family)?;
    }
    repeat_quietly(&mut cluster, client, server)?;
    hold_until_stdin_closes(&mut cluster, client, server)?;
    workload_file_is_valid_for_the_agent(&cluster)?;

    let mixed = cluster.add_pod(n1, PodOptions::meshed("intruder", "plain", "x"));
    let error = format!(
        "{:#}",
        mixed
            .err()
            .context("a meshed pod in an unmeshed namespace")?
    );
    ensure!(error.contains("meshed or not as a whole"), "{error}");

    assert_removed_on_drop(cluster)
}

#[test]
fn pods_on_two_nodes_talk_over_ipv4_and_ipv6() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("harness-two-nodes")?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::unmeshed("client", "plain", "client"))?;
    let server = cluster.add_pod(n2, PodOptions::unmeshed("server", "plain", "server"))?;
    for family in [Family::V4, Family::V6] {
        exchange_and_echo(&mut cluster, client, server, family)?;
    }
    assert_removed_on_drop(cluster)
}

/// 1 MiB each way between the pods, checked at both ends, plus a UDP echo
/// from the same server.
fn exchange_and_echo(
    cluster: &mut Cluster,
    client: PodId,
    server: PodId,
    family: Family,
) -> anyhow::Result<()> {
    let listen = pod_addr(cluster, server, family, PORT);
    let mut serve = TestApp::serve(listen)
        .bytes(MIB)
        .udp()
        .start(cluster, server)?;
    let seen = serve
        .exchange(cluster, client, listen)
        .with_context(|| format!("{family:?}"))?;
    ensure!(
        seen.connected.peer == listen,
        "{family:?}: {:?}",
        seen.connected
    );
    let client_ip = pod_ip(cluster, client, family);
    ensure!(
        seen.served.peer.ip() == client_ip,
        "{family:?}: the server saw {} instead of the client pod's {client_ip}",
        seen.served.peer
    );

    let udp = TestApp::udp(listen).run(cluster, client)?;
    ensure!(
        udp.success(),
        "{family:?} udp failed ({}): {}\n{}",
        udp.status,
        udp.stderr,
        udp.stdout
    );
    let echo: UdpEcho = udp.event()?;
    ensure!(echo.echoed, "{family:?}: {echo:?}");
    serve.kill();
    Ok(())
}

/// `connect --repeat --quiet` prints one summary line.
fn repeat_quietly(cluster: &mut Cluster, client: PodId, server: PodId) -> anyhow::Result<()> {
    let listen = pod_addr(cluster, server, Family::V4, PORT + 1);
    let mut serve = TestApp::serve(listen).bytes(1000).start(cluster, server)?;
    let connect = TestApp::connect(listen)
        .bytes(1000)
        .repeat(50)
        .quiet()
        .run(cluster, client)?;
    ensure!(
        connect.success(),
        "repeat failed ({}): {}\n{}",
        connect.status,
        connect.stderr,
        connect.stdout
    );
    ensure!(
        connect.lines()?.len() == 1,
        "expected one summary line, got: {}",
        connect.stdout
    );
    let summary: Summary = connect.event()?;
    ensure!(
        summary.connections == 50 && summary.failed == 0,
        "{summary:?}"
    );
    serve.kill();
    Ok(())
}

/// `hold` keeps its connection until a line arrives on stdin.
fn hold_until_stdin_closes(
    cluster: &mut Cluster,
    client: PodId,
    server: PodId,
) -> anyhow::Result<()> {
    let listen = pod_addr(cluster, server, Family::V6, PORT + 2);
    let mut serve = TestApp::serve(listen).start(cluster, server)?;
    let mut hold = TestApp::hold(listen).start(cluster, client)?;
    ensure!(hold.connected().peer == listen, "{:?}", hold.connected());
    ensure!(
        hold.is_running()?,
        "hold must keep running until stdin has a line"
    );
    hold.send_line()?;
    let exit = hold.wait_exit()?;
    ensure!(
        exit.success(),
        "hold failed ({}): {}",
        exit.status,
        exit.stderr
    );
    let served: Served = serve.wait_for(WAIT)?;
    ensure!(served.received == 0 && served.intact, "{served:?}");
    serve.kill();
    Ok(())
}

/// The agent's own loader accepts the file, cgroups included.
fn workload_file_is_valid_for_the_agent(cluster: &Cluster) -> anyhow::Result<()> {
    let path = cluster.write_workloads()?;
    let node = &cluster.nodes()[0].name;
    let file = WorkloadFile::load(&path, Some(node))?;
    ensure!(file.pods.len() == 2 && !file.is_meshed("plain"), "{file:?}");
    Ok(())
}

/// Drops the cluster and checks that its namespaces, cgroups, files and
/// processes are gone.
fn assert_removed_on_drop(cluster: Cluster) -> anyhow::Result<()> {
    let namespaces: Vec<String> = cluster.netns_names().to_vec();
    let cgroup: PathBuf = cluster.cgroup_dir().to_owned();
    let tempdir: PathBuf = cluster.tempdir().to_owned();
    ensure!(namespaces.len() >= 3, "{namespaces:?}");
    ensure!(
        namespaces.iter().all(|ns| netns::exists(ns)),
        "{namespaces:?}"
    );
    ensure!(cgroup.is_dir() && tempdir.is_dir());
    drop(cluster);
    let left: Vec<&String> = namespaces.iter().filter(|ns| netns::exists(ns)).collect();
    ensure!(
        left.is_empty(),
        "network namespaces left after drop: {left:?}"
    );
    ensure!(
        !Path::new(&cgroup).exists(),
        "{} left after drop",
        cgroup.display()
    );
    ensure!(!tempdir.exists(), "{} left after drop", tempdir.display());
    Ok(())
}
