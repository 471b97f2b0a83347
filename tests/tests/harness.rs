//! Self-test of the simulation harness, without Ferry: unmeshed pods talk
//! directly over the simulated network (IPv4 and IPv6, on one node and
//! across nodes), and a dropped cluster leaves nothing behind. Needs root;
//! fails (never skips) when the machine cannot run simulated nodes.

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, ensure};
use ferry_agent::workload::file::WorkloadFile;
use ferry_tests::{
    Cluster, MIB, PORT, PodId, PodOptions, WAIT, bin_path, netns,
    testapp::{Family, event, pod_addr, socket_addr},
};
use serde_json::Value;

#[test]
fn pods_on_one_node_talk_over_ipv4_and_ipv6() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("harness-one-node")?;
    let n1 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::unmeshed("client", "plain", "client"))?;
    let server = cluster.add_pod(n1, PodOptions::unmeshed("server", "plain", "server"))?;

    for family in [Family::V4, Family::V6] {
        exchange(&mut cluster, client, server, family)?;
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
        exchange(&mut cluster, client, server, family)?;
    }
    assert_removed_on_drop(cluster)
}

/// 1 MiB each way between the pods, checked at both ends, plus a UDP echo.
fn exchange(
    cluster: &mut Cluster,
    client: PodId,
    server: PodId,
    family: Family,
) -> anyhow::Result<()> {
    let testapp = bin_path("ferry-testapp")?;
    let listen = pod_addr(cluster, server, family, PORT).to_string();
    let mib = MIB.to_string();
    let mut serve = cluster.spawn(
        server,
        &testapp,
        &["serve", "--listen", &listen, "--bytes", &mib, "--udp"],
    )?;
    serve.wait_for_line(event("listening"), WAIT)?;

    let mut connect = cluster.spawn(
        client,
        &testapp,
        &["connect", "--to", &listen, "--bytes", &mib],
    )?;
    let (status, stdout, stderr) = connect.wait_exit(WAIT)?;
    ensure!(
        status.success(),
        "{family:?} connect failed ({status}): {stderr}\n{stdout}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("connect printed non-JSON: {stdout}"))?;
    let connected = lines
        .iter()
        .find(|l| event("connected")(l))
        .context("no connected line")?;
    ensure!(
        connected["peer"] == listen.as_str(),
        "{family:?}: {connected}"
    );
    let done = lines
        .iter()
        .find(|l| event("done")(l))
        .context("no done line")?;
    ensure!(
        done["intact"] == true && done["received"] == MIB,
        "{family:?}: {done}"
    );

    let served = serve.wait_for_line(event("served"), WAIT)?;
    ensure!(
        served["intact"] == true && served["received"] == MIB,
        "{family:?}: {served}"
    );
    let client_ip: IpAddr = match family {
        Family::V4 => cluster.pod(client).ipv4.into(),
        Family::V6 => cluster.pod(client).ipv6.into(),
    };
    ensure!(
        socket_addr(&served["peer"])?.ip() == client_ip,
        "{family:?}: the server saw {} instead of the client pod's {client_ip}",
        served["peer"]
    );

    let mut udp = cluster.spawn(client, &testapp, &["udp", "--to", &listen])?;
    let (status, stdout, stderr) = udp.wait_exit(WAIT)?;
    ensure!(
        status.success(),
        "{family:?} udp failed ({status}): {stderr}\n{stdout}"
    );
    ensure!(stdout.contains(r#""echoed":true"#), "{family:?}: {stdout}");
    serve.kill();
    Ok(())
}

/// `connect --repeat --quiet` prints one summary line.
fn repeat_quietly(cluster: &mut Cluster, client: PodId, server: PodId) -> anyhow::Result<()> {
    let testapp = bin_path("ferry-testapp")?;
    let listen = pod_addr(cluster, server, Family::V4, PORT + 1).to_string();
    let mut serve = cluster.spawn(
        server,
        &testapp,
        &["serve", "--listen", &listen, "--bytes", "1000"],
    )?;
    serve.wait_for_line(event("listening"), WAIT)?;
    let args = [
        "connect", "--to", &listen, "--bytes", "1000", "--repeat", "50", "--quiet",
    ];
    let mut connect = cluster.spawn(client, &testapp, &args)?;
    let (status, stdout, stderr) = connect.wait_exit(WAIT)?;
    ensure!(
        status.success(),
        "repeat failed ({status}): {stderr}\n{stdout}"
    );
    let summary: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("expected one summary line, got: {stdout}"))?;
    ensure!(
        summary["event"] == "summary" && summary["connections"] == 50 && summary["failed"] == 0,
        "{summary}"
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
    let testapp = bin_path("ferry-testapp")?;
    let listen = pod_addr(cluster, server, Family::V6, PORT + 2).to_string();
    let mut serve = cluster.spawn(server, &testapp, &["serve", "--listen", &listen])?;
    serve.wait_for_line(event("listening"), WAIT)?;
    let mut hold = cluster.spawn(client, &testapp, &["hold", "--to", &listen])?;
    let connected = hold.wait_for_line(event("connected"), WAIT)?;
    ensure!(connected["peer"] == listen.as_str(), "{connected}");
    ensure!(
        hold.has_exited()?.is_none(),
        "hold must keep running until stdin has a line"
    );
    hold.stdin()?.write_all(b"\n")?;
    let (status, _, stderr) = hold.wait_exit(WAIT)?;
    ensure!(status.success(), "hold failed ({status}): {stderr}");
    let served = serve.wait_for_line(event("served"), WAIT)?;
    ensure!(
        served["received"] == 0 && served["intact"] == true,
        "{served}"
    );
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
