//! The capture path, end to end: real agents load Ferry's eBPF programs onto
//! simulated pods' cgroups, and real client and server processes in those
//! pods talk through the agent without knowing it. Needs root; fails (never
//! skips) when the machine cannot run simulated nodes.

use std::{io::Write as _, net::IpAddr, time::Duration};

use anyhow::{Context as _, bail, ensure};
use ferry_tests::{
    Cluster, MIB, NodeId, PORT, PodOptions, WAIT, bin_path,
    inspect::{
        MAPS, PROGRAMS, admin_json, captured_total, eventually, is_node_addr, live_connection,
        loaded_programs, metric_value, metrics, pinned_original_dsts, programs_on, socket_addr,
    },
    testapp::{Datagram, Ended, Family, Served, TestApp, UdpEcho, exchange, pod_addr, pod_ip},
};

/// How soon both ends must notice that a relayed connection broke.
const CLOSE_NOTICED: Duration = Duration::from_secs(5);

/// `ferry_connection_bytes_total` of passthrough outbound connections,
/// sent and received, from one look at `/metrics`.
fn passthrough_bytes(cluster: &Cluster, node: NodeId) -> anyhow::Result<[f64; 2]> {
    let samples = metrics(cluster, node)?;
    Ok(["sent", "received"].map(|flow| {
        let labels = [
            ("direction", "outbound"),
            ("route", "passthrough"),
            ("flow", flow),
        ];
        metric_value(&samples, "ferry_connection_bytes_total", &labels)
    }))
}

fn expected_programs() -> Vec<String> {
    PROGRAMS.iter().map(|p| (*p).to_owned()).collect()
}

#[test]
fn meshed_client_reaches_server_through_the_agent_over_ipv4_and_ipv6() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("capture-meshed")?;
    let n1 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("client", "shop", "client"))?;
    let server = cluster.add_pod(n1, PodOptions::meshed("server", "shop", "server"))?;
    let agent = cluster.agent(n1).start()?;

    for family in [Family::V4, Family::V6] {
        let before = captured_total(&cluster, n1)?;
        let bytes_before = passthrough_bytes(&cluster, n1)?;
        let to = pod_addr(&cluster, server, family, PORT);
        let seen = exchange(&mut cluster, client, server, to, 16 * MIB)
            .with_context(|| format!("{family:?}"))?;
        // This agent has no identities, so it carries the connection as
        // passthrough: it splices the bytes between the two sockets, and
        // counts them although they never enter its memory.
        eventually(|| {
            let now = passthrough_bytes(&cluster, n1)?;
            let moved = [now[0] - bytes_before[0], now[1] - bytes_before[1]];
            ensure!(
                moved == [(16 * MIB) as f64; 2],
                "{family:?}: bytes counted sent/received {moved:?}, moved {} each way",
                16 * MIB
            );
            Ok(())
        })?;
        ensure!(
            seen.done.peer == to,
            "{family:?}: the client's getpeername says {}, but it dialled {to}",
            seen.done.peer
        );
        // The agent, not the client pod, opened the server's connection.
        ensure!(
            is_node_addr(&cluster, n1, seen.served.peer.ip()),
            "{family:?}: the server saw {} connect, not the agent",
            seen.served.peer,
        );
        ensure!(
            captured_total(&cluster, n1)? == before + 1,
            "{family:?}: the agent's captured counter did not count the connection"
        );
    }

    // A live connection, as the agent and bpftool show it.
    for family in [Family::V4, Family::V6] {
        let to = pod_addr(&cluster, server, family, PORT + 1);
        let mut serve = TestApp::serve(to).udp().start(&mut cluster, server)?;
        let held = TestApp::hold(to).start(&mut cluster, client)?;
        let entry = live_connection(&cluster, n1, to)?;
        ensure!(entry["sourcePod"] == "shop/client", "{family:?}: {entry}");
        ensure!(
            entry["destinationPod"] == "shop/server",
            "{family:?}: {entry}"
        );
        let client_ip = pod_ip(&cluster, client, family);
        ensure!(
            socket_addr(&entry["source"])?.ip().to_canonical() == client_ip,
            "{family:?}: the agent names {} as the source, not the client pod {client_ip}",
            entry["source"]
        );
        let pinned = pinned_original_dsts(&agent.pin_dir)?;
        ensure!(
            pinned.contains(&to),
            "{family:?}: bpftool map dump of orig_dst_tuple has no entry for {to}: {pinned:?}"
        );
        let hold = held.release()?;
        ensure!(
            hold.success(),
            "hold failed ({}): {}",
            hold.status,
            hold.stderr
        );
        // The server sees the client's close through the agent.
        let served: Served = serve.wait_for(WAIT)?;
        ensure!(served.intact, "{family:?}: {served:?}");
        eventually(|| {
            let live = admin_json(&cluster, n1, "/connections")?;
            ensure!(
                live.as_array().is_some_and(Vec::is_empty),
                "{family:?}: still live: {live}"
            );
            let pinned = pinned_original_dsts(&agent.pin_dir)?;
            ensure!(
                !pinned.contains(&to),
                "{family:?}: orig_dst_tuple still holds {to} after the close: {pinned:?}"
            );
            Ok(())
        })?;
        serve.kill();
    }
    Ok(())
}

#[test]
fn unmeshed_pods_and_udp_are_not_redirected() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("capture-bypass")?;
    let n1 = cluster.add_node()?;
    let meshed = cluster.add_pod(n1, PodOptions::meshed("client", "shop", "client"))?;
    let plain = cluster.add_pod(n1, PodOptions::unmeshed("legacy", "legacy", "legacy"))?;
    let server = cluster.add_pod(n1, PodOptions::unmeshed("server", "legacy", "server"))?;
    let _agent = cluster.agent(n1).start()?;

    let to = pod_addr(&cluster, server, Family::V4, PORT);
    let before = captured_total(&cluster, n1)?;
    let seen = exchange(&mut cluster, plain, server, to, MIB)?;
    ensure!(
        seen.served.peer.ip() == IpAddr::from(cluster.pod(plain).ipv4),
        "the unmeshed client reached the server as {}, not as itself",
        seen.served.peer
    );
    ensure!(
        captured_total(&cluster, n1)? == before,
        "an unmeshed pod was captured"
    );
    ensure!(
        programs_on(&cluster.pod(plain).cgroup)?.is_empty(),
        "programs attached to the unmeshed pod's cgroup"
    );

    // A connected UDP socket in a meshed pod (what a DNS resolver does).
    for family in [Family::V4, Family::V6] {
        let to = pod_addr(&cluster, server, family, PORT + 1);
        let mut serve = TestApp::serve(to).udp().start(&mut cluster, server)?;
        let udp = TestApp::udp(to).run(&mut cluster, meshed)?;
        ensure!(
            udp.success(),
            "{family:?}: UDP from a meshed pod did not reach the server directly: {}{}",
            udp.stderr,
            udp.stdout
        );
        let sent: UdpEcho = udp.event()?;
        ensure!(
            sent.peer == to,
            "{family:?}: the connected UDP socket's peer is {}, not {to}",
            sent.peer
        );
        let arrived: Datagram = serve.wait_for(WAIT)?;
        let meshed_ip = pod_ip(&cluster, meshed, family);
        ensure!(
            arrived.from.ip().to_canonical() == meshed_ip,
            "{family:?}: the datagram came from {}, not from the meshed pod {meshed_ip}",
            arrived.from
        );
        serve.kill();
    }
    ensure!(captured_total(&cluster, n1)? == before, "UDP was captured");
    let live = admin_json(&cluster, n1, "/connections")?;
    ensure!(
        live.as_array().is_some_and(Vec::is_empty),
        "the agent shows connections nobody captured: {live}"
    );
    Ok(())
}

#[test]
fn excluded_ports_go_around_the_agent() -> anyhow::Result<()> {
    const EXCLUDED: u16 = 5432;
    let mut cluster = Cluster::new("capture-excluded")?;
    let n1 = cluster.add_node()?;
    let client = cluster.add_pod(
        n1,
        PodOptions::meshed("client", "shop", "client").excluding_ports(&[EXCLUDED]),
    )?;
    let server = cluster.add_pod(n1, PodOptions::meshed("server", "shop", "server"))?;
    let _agent = cluster.agent(n1).start()?;

    let client_ip = IpAddr::from(cluster.pod(client).ipv4);
    let excluded = pod_addr(&cluster, server, Family::V4, EXCLUDED);
    let seen = exchange(&mut cluster, client, server, excluded, MIB)?;
    ensure!(
        seen.served.peer.ip() == client_ip,
        "port {EXCLUDED} is excluded, but the server saw {} connect",
        seen.served.peer
    );
    let captured = pod_addr(&cluster, server, Family::V4, PORT);
    let seen = exchange(&mut cluster, client, server, captured, MIB)?;
    ensure!(
        is_node_addr(&cluster, n1, seen.served.peer.ip()),
        "port {PORT} is not excluded, but the server saw {} connect",
        seen.served.peer
    );
    Ok(())
}

#[test]
fn programs_are_visible_to_bpftool_and_survive_an_agent_restart() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("capture-restart")?;
    let n1 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("client", "shop", "client"))?;
    let server = cluster.add_pod(n1, PodOptions::meshed("server", "shop", "server"))?;
    let mut agent = cluster.agent(n1).start()?;

    let loaded = loaded_programs()?;
    for program in PROGRAMS {
        ensure!(
            loaded.iter().any(|name| name == program),
            "bpftool prog show lacks {program}"
        );
    }
    let cgroup = cluster.pod(client).cgroup.clone();
    ensure!(programs_on(&cgroup)? == expected_programs());
    for map in MAPS {
        let path = agent.pin_dir.join(map);
        ensure!(path.exists(), "{} is not pinned", path.display());
    }

    let to = pod_addr(&cluster, server, Family::V4, PORT);
    let mut serve = TestApp::serve(to).udp().start(&mut cluster, server)?;
    let mut held = TestApp::hold(to).start(&mut cluster, client)?;
    live_connection(&cluster, n1, to)?;
    agent.kill9();

    // A connection live across the crash was relayed by the dead process:
    // both ends see it closed at once, rather than hanging.
    let ended: Ended = held.wait_for(CLOSE_NOTICED)?;
    let hold = held.wait_exit()?;
    ensure!(
        !hold.success(),
        "the held connection broke ({ended:?}), but hold succeeded"
    );
    let served: Served = serve.wait_for(CLOSE_NOTICED)?;
    ensure!(
        served.intact && served.received == 0,
        "the server's side of the broken connection: {served:?}"
    );

    // While no agent runs, the pinned links keep the programs on the cgroup:
    // a new connection is refused at once instead of leaving the mesh in
    // plaintext.
    ensure!(
        programs_on(&cgroup)? == expected_programs(),
        "programs left the cgroup when the agent died"
    );
    let connect = TestApp::connect(to).bytes(1).run(&mut cluster, client)?;
    ensure!(
        !connect.success() && connect.stderr.contains("refused"),
        "with the agent down, a captured connect should be refused: {} {}",
        connect.status,
        connect.stderr
    );

    // What an earlier build pinned and this one no longer uses goes at start.
    let retired = agent.pin_dir.join("orig_dst_cookie");
    let retired_path = retired.to_str().context("pin path")?;
    let created = std::process::Command::new("bpftool")
        .args(["map", "create", retired_path, "type", "hash"])
        .args([
            "key",
            "8",
            "value",
            "20",
            "entries",
            "16",
            "name",
            "orig_dst_cookie",
        ])
        .status()?;
    ensure!(created.success(), "bpftool could not pin {retired_path}");

    let agent = cluster.agent(n1).start()?;
    ensure!(
        !retired.exists(),
        "the restarted agent left the retired map {retired_path} pinned"
    );
    let again = pod_addr(&cluster, server, Family::V4, PORT + 2);
    let seen = exchange(&mut cluster, client, server, again, MIB)?;
    ensure!(
        is_node_addr(&cluster, n1, seen.served.peer.ip()),
        "after the restart the server saw {} connect, not the agent",
        seen.served.peer
    );
    ensure!(seen.done.peer == again);
    ensure!(
        programs_on(&cgroup)? == expected_programs(),
        "after a restart the cgroup carries {:?}",
        programs_on(&cgroup)?
    );
    drop(agent);
    Ok(())
}

#[test]
fn a_pod_removed_from_the_workloads_is_released() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("capture-release")?;
    let n1 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("client", "shop", "client"))?;
    let server = cluster.add_pod(n1, PodOptions::unmeshed("server", "legacy", "server"))?;
    let agent = cluster.agent(n1).start()?;
    let cgroup = cluster.pod(client).cgroup.clone();
    ensure!(programs_on(&cgroup)? == expected_programs());
    let links = agent.pin_dir.join("links");
    let pinned_links = std::fs::read_dir(&links)?.count();
    ensure!(
        pinned_links == 1,
        "{pinned_links} pods pinned under {}",
        links.display()
    );

    // Rewrite the file without the client pod: the agent follows.
    let path = cluster.workloads_path();
    let text = std::fs::read_to_string(&path)?;
    let mut file: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let pods = file["pods"].as_sequence_mut().context("pods")?;
    pods.retain(|pod| pod["name"] != "client");
    let partial = path.with_extension("partial");
    std::fs::write(&partial, serde_yaml::to_string(&file)?)?;
    std::fs::rename(&partial, &path)?;

    eventually(|| {
        let attached = programs_on(&cgroup)?;
        ensure!(attached.is_empty(), "still attached: {attached:?}");
        let left = std::fs::read_dir(&links)?.count();
        ensure!(
            left == 0,
            "{left} pods still pinned under {}",
            links.display()
        );
        Ok(())
    })?;
    let before = captured_total(&cluster, n1)?;
    let to = pod_addr(&cluster, server, Family::V4, PORT);
    let seen = exchange(&mut cluster, client, server, to, MIB)?;
    ensure!(
        seen.served.peer.ip() == IpAddr::from(cluster.pod(client).ipv4),
        "a released pod's connection still went through the agent"
    );
    ensure!(
        captured_total(&cluster, n1)? == before,
        "the agent counted a released pod's connection"
    );
    Ok(())
}

/// Starts the agent on `yaml` and returns what it printed when it refused it.
fn refused(cluster: &mut Cluster, node: NodeId, yaml: &str) -> anyhow::Result<String> {
    let path = cluster.tempdir().join("bad-workloads.yaml");
    std::fs::File::create(&path)?.write_all(yaml.as_bytes())?;
    let agent = bin_path("ferry-agent")?;
    let name = cluster.node(node).name.clone();
    let file = path.to_str().context("path is not UTF-8")?.to_owned();
    let pins = cluster.tempdir().join("no-pins");
    let pins = pins.to_str().context("path is not UTF-8")?.to_owned();
    let mut run = cluster.spawn(
        node,
        &agent,
        &[
            "run",
            "--node",
            &name,
            "--workloads",
            &file,
            "--bpffs-root",
            &pins,
        ],
    )?;
    let (status, _, stderr) = run.wait_exit(WAIT)?;
    if status.success() {
        bail!("the agent accepted a bad workload file:\n{yaml}");
    }
    ensure!(
        stderr.contains(&file),
        "the error does not name the file {file}: {stderr}"
    );
    Ok(stderr)
}

#[test]
fn a_bad_workload_file_is_refused_with_what_and_where() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("capture-bad-file")?;
    let n1 = cluster.add_node()?;
    let node = cluster.node(n1).name.clone();
    let cgroup = cluster.cgroup_dir().display().to_string();
    let header = format!(
        "nodes: [{{ name: {node}, addresses: [198.19.0.1] }}]\n\
         namespaces: [{{ name: shop, labels: {{ ferry.dev/mesh: enabled }} }}]\n"
    );
    let pod = |fields: &str| format!("{header}pods:\n  - {{ {fields} }}\n");

    let stderr = refused(
        &mut cluster,
        n1,
        &pod(&format!(
            "name: a, namespace: shop, serviceAccount: a, node: {node}, ips: [198.18.1.2], cgroup: {cgroup}, colour: red"
        )),
    )?;
    ensure!(
        stderr.contains("pods[0]")
            && stderr.contains("unknown field `colour`")
            && stderr.contains("line 4"),
        "unknown field: {stderr}"
    );

    let stderr = refused(
        &mut cluster,
        n1,
        &pod(&format!(
            "name: a, namespace: shop, node: {node}, ips: [198.18.1.2], cgroup: {cgroup}"
        )),
    )?;
    ensure!(
        stderr.contains("pods[0]")
            && stderr.contains("missing field `serviceAccount`")
            && stderr.contains("line 4"),
        "missing serviceAccount: {stderr}"
    );

    let stderr = refused(
        &mut cluster,
        n1,
        &pod(&format!(
            "name: a, namespace: shop, serviceAccount: a, node: {node}, ips: [198.18.1.300], cgroup: {cgroup}"
        )),
    )?;
    ensure!(
        stderr.contains("pods[0].ips[0]")
            && stderr.contains("invalid IP address")
            && stderr.contains("line 4"),
        "invalid IP: {stderr}"
    );

    let stderr = refused(
        &mut cluster,
        n1,
        &pod(&format!(
            "name: a, namespace: shop, serviceAccount: a, node: {node}, ips: [198.18.1.2], cgroup: {cgroup}/no-such-pod"
        )),
    )?;
    ensure!(
        stderr.contains("pods[0] (shop/a).cgroup")
            && stderr.contains(&format!("{cgroup}/no-such-pod does not exist")),
        "missing cgroup: {stderr}"
    );
    Ok(())
}

#[test]
fn the_log_filter_changes_at_runtime_through_the_admin_endpoint() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("capture-logging")?;
    let n1 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("client", "shop", "client"))?;
    let server = cluster.add_pod(n1, PodOptions::meshed("server", "shop", "server"))?;
    let agent = cluster.agent(n1).start()?;
    let (status, body) = cluster.admin_get(n1, "/logging")?;
    ensure!(status == 200 && body.trim() == "info", "{status} {body}");

    let to = pod_addr(&cluster, server, Family::V4, PORT);
    // At info, the one line per connection is its end (the access log).
    let announced = |agent: &ferry_tests::Agent| {
        agent
            .proc
            .stderr_tail()
            .matches("connection closed")
            .count()
    };
    exchange(&mut cluster, client, server, to, 1024)?;
    let before = eventually(|| {
        let logged = announced(&agent);
        ensure!(logged >= 1, "at info the agent logs each connection's end");
        Ok(logged)
    })?;

    let (status, body) = cluster.admin_post(n1, "/logging?level=warn")?;
    ensure!(status == 200, "{status} {body}");
    exchange(&mut cluster, client, server, to, 1024)?;
    ensure!(
        announced(&agent) == before,
        "at warn, info lines keep coming"
    );

    let (status, body) = cluster.admin_post(n1, "/logging?level=info%2Cferry_agent%3Ddebug")?;
    ensure!(
        status == 200 && body.contains("info,ferry_agent=debug"),
        "{status} {body}"
    );
    exchange(&mut cluster, client, server, to, 1024)?;
    eventually(|| {
        ensure!(
            announced(&agent) > before,
            "back at info, the lines do not come back"
        );
        Ok(())
    })?;

    let (status, body) = cluster.admin_post(n1, "/logging?level=%3D%3D%3D")?;
    ensure!(
        status == 400 && body.contains("is not a log filter"),
        "{status} {body}"
    );
    let (status, body) = cluster.admin_get(n1, "/logging")?;
    ensure!(
        body.trim() == "info,ferry_agent=debug",
        "a bad filter replaced the good one: {status} {body}"
    );
    Ok(())
}

#[test]
fn worker_threads_bound_the_agents_runtime() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("capture-threads")?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let workers = |agent: &ferry_tests::Agent| -> anyhow::Result<usize> {
        let mut count = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", agent.proc.pid()))? {
            let comm = std::fs::read_to_string(task?.path().join("comm"))?;
            count += usize::from(comm.trim().starts_with("ferry-shard-"));
        }
        Ok(count)
    };
    let default = cluster.agent(n1).start()?;
    let cpus = std::thread::available_parallelism()?.get();
    ensure!(
        workers(&default)? == cpus,
        "by default one shard per CPU ({cpus}), found {}",
        workers(&default)?
    );
    let one = cluster.agent(n2).worker_threads(1).start()?;
    ensure!(
        workers(&one)? == 1,
        "--worker-threads 1 gave {} shards",
        workers(&one)?
    );
    Ok(())
}
