//! The mTLS data path end to end: a real CA, two simulated nodes with an
//! agent each, and pods that talk across them without knowing it.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, ensure};
use ferry_tests::{
    Cluster, MIB, NodeId, PORT, PodId, PodOptions, WAIT,
    inspect::{admin_json, is_node_addr, live_connection, metric_value, metrics},
    testapp::{Connected, Family, Reset, Served, TestApp, exchange, pod_addr},
    wire::{LinkCapture, contains, plaintext_marker},
};

struct TwoNodes {
    cluster: Cluster,
    n1: NodeId,
    n2: NodeId,
    client: PodId,
    server: PodId,
    /// A meshed pod on the client's node (reached directly, not tunnelled).
    neighbour: PodId,
    agents: Vec<ferry_tests::Agent>,
    _ca: ferry_tests::ca::CaFixture,
}

fn two_nodes(name: &str) -> anyhow::Result<TwoNodes> {
    two_nodes_with(name, &ferry_tests::ca::CaOptions::default(), None)
}

/// Two nodes with a CA of `ca_options`, their agents' pools closing idle
/// connections after `pool_idle_timeout` (the agent's default if `None`).
fn two_nodes_with(
    name: &str,
    ca_options: &ferry_tests::ca::CaOptions,
    pool_idle_timeout: Option<Duration>,
) -> anyhow::Result<TwoNodes> {
    let mut cluster = Cluster::new(name)?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("web-0", "shop", "web"))?;
    let server = cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let neighbour = cluster.add_pod(n1, PodOptions::meshed("cache-0", "shop", "cache"))?;
    let ca = cluster.start_ca_with(ca_options)?;
    let mut agents = Vec::new();
    for node in [n1, n2] {
        let mut agent = cluster.agent(node).ca(&ca);
        if let Some(idle) = pool_idle_timeout {
            agent = agent.pool_idle_timeout(idle);
        }
        agents.push(agent.start()?);
    }
    Ok(TwoNodes {
        cluster,
        n1,
        n2,
        client,
        server,
        neighbour,
        agents,
        _ca: ca,
    })
}

#[test]
fn pods_on_two_nodes_talk_through_an_mtls_tunnel() -> anyhow::Result<()> {
    let mut t = two_nodes("tunnel")?;
    for family in Family::BOTH {
        let to = pod_addr(&t.cluster, t.server, family, PORT);
        let seen = exchange(&mut t.cluster, t.client, t.server, to, 64 * MIB)
            .with_context(|| format!("{family:?}"))?;
        ensure!(seen.done.peer == to, "getpeername: {:?}", seen.done);
        // The destination node's agent opened the server's connection.
        let peer = seen.served.peer;
        ensure!(
            is_node_addr(&t.cluster, t.n2, peer.ip()),
            "{family:?}: the server saw {peer}, not node 2's agent"
        );
    }

    // A live connection, as both agents see it.
    let to = pod_addr(&t.cluster, t.server, Family::V4, PORT + 1);
    let _serve = TestApp::serve(to).start(&mut t.cluster, t.server)?;
    let hold = TestApp::hold(to).start(&mut t.cluster, t.client)?;
    let outbound = live_connection(&t.cluster, t.n1, to)?;
    ensure!(outbound["route"] == "tunnel", "{outbound}");
    ensure!(
        outbound["sourceIdentity"] == "spiffe://cluster.local/ns/shop/sa/web",
        "{outbound}"
    );
    ensure!(
        outbound["destinationIdentity"] == "spiffe://cluster.local/ns/shop/sa/db",
        "{outbound}"
    );
    let inbound = live_connection(&t.cluster, t.n2, to)?;
    ensure!(inbound["route"] == "inboundTunnel", "{inbound}");
    ensure!(
        inbound["sourceIdentity"] == "spiffe://cluster.local/ns/shop/sa/web",
        "{inbound}"
    );
    hold.release()?;
    // Node 2's access log line for the connection names the client.
    ferry_tests::inspect::eventually(|| {
        let log = t.agents[1].proc.stderr_tail();
        ensure!(
            log.lines().any(|l| l.contains("connection closed")
                && l.contains("src.identity=spiffe://cluster.local/ns/shop/sa/web")),
            "node 2's agent did not log the client's identity:\n{log}"
        );
        Ok(())
    })?;
    Ok(())
}

#[test]
fn short_connections_share_a_few_pooled_tls_connections() -> anyhow::Result<()> {
    let mut t = two_nodes_with(
        "tunnel-pool",
        &ferry_tests::ca::CaOptions::default(),
        Some(Duration::from_secs(2)),
    )?;
    let to = pod_addr(&t.cluster, t.server, Family::V4, PORT);
    let _serve = TestApp::serve(to)
        .bytes(1024)
        .start(&mut t.cluster, t.server)?;
    let connect = TestApp::connect(to)
        .bytes(1024)
        .repeat(200)
        .quiet()
        .run(&mut t.cluster, t.client)?;
    ensure!(connect.success(), "{}\n{}", connect.stderr, connect.stdout);
    let pool = admin_json(&t.cluster, t.n1, "/pool")?;
    let handshakes = pool["totals"]["handshakes"]
        .as_u64()
        .context("handshakes")?;
    let streams = pool["totals"]["streams"].as_u64().context("streams")?;
    ensure!(streams == 200, "{pool}");
    ensure!(
        handshakes <= 3,
        "200 connections took {handshakes} TLS handshakes: {pool}"
    );
    // Idle past --pool-idle-timeout (2 s): the pool closes them.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let pool = admin_json(&t.cluster, t.n1, "/pool")?;
        if pool["keys"].as_array().is_some_and(Vec::is_empty) {
            ensure!(
                pool["totals"]["closedIdle"].as_u64() == Some(handshakes),
                "{pool}"
            );
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "idle connections stay open: {pool}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = &t.n2;
    Ok(())
}

#[test]
fn renewed_certificates_serve_new_connections_while_live_ones_go_on() -> anyhow::Result<()> {
    // 20 s leaves without skew allowance: renewal 8-10 s after issuance.
    let options = ferry_tests::ca::CaOptions {
        leaf_lifetime: Some("20s".to_owned()),
        clock_skew: Some("0s".to_owned()),
        ..Default::default()
    };
    let mut t = two_nodes_with("tunnel-rotation", &options, None)?;
    let serial = |cluster: &Cluster, node: NodeId| -> anyhow::Result<String> {
        let certs = admin_json(cluster, node, "/certs")?;
        certs[0]["serial"]
            .as_str()
            .map(str::to_owned)
            .context("no serial")
    };
    let first = serial(&t.cluster, t.n2)?;
    let to = pod_addr(&t.cluster, t.server, Family::V4, PORT);
    let _serve = TestApp::serve(to)
        .bytes(1)
        .start(&mut t.cluster, t.server)?;
    let hold = TestApp::hold(to).start(&mut t.cluster, t.client)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while serial(&t.cluster, t.n2)? == first {
        ensure!(
            std::time::Instant::now() < deadline,
            "node 2 never renewed its certificate"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The live connection is still there on both sides...
    live_connection(&t.cluster, t.n1, to)?;
    live_connection(&t.cluster, t.n2, to)?;
    // ...and new connections work with the renewed certificates.
    let connect = TestApp::connect(to)
        .bytes(1)
        .run(&mut t.cluster, t.client)?;
    ensure!(connect.success(), "after renewal: {}", connect.stderr);
    let hold = hold.release()?;
    ensure!(hold.success(), "the held connection broke: {}", hold.stderr);
    Ok(())
}

#[test]
fn the_node_link_carries_tls_only_and_policy_denials_are_refused() -> anyhow::Result<()> {
    let mut t = two_nodes("tunnel-wire")?;
    let capture = LinkCapture::start(&mut t.cluster)?;

    let to = pod_addr(&t.cluster, t.server, Family::V4, PORT);
    let _serve = TestApp::serve(to)
        .bytes(MIB)
        .start(&mut t.cluster, t.server)?;
    let connect = TestApp::connect(to)
        .bytes(MIB)
        .run(&mut t.cluster, t.client)?;
    ensure!(connect.success(), "{}", connect.stderr);
    let captured = capture.finish()?;
    ensure!(
        captured.len() > 1_048_576,
        "the capture holds only {} bytes",
        captured.len()
    );
    ensure!(
        !contains(&captured, &plaintext_marker()),
        "the client's plaintext crossed the node link"
    );
    // The TLS ClientHello names the destination identity (SNI) and offers h2.
    ensure!(
        contains(&captured, b"db.shop.sa.cluster.local"),
        "no TLS ClientHello for the destination identity on the link"
    );
    // supported_versions (0x002b) offering only TLS 1.3 (0x0304).
    ensure!(
        contains(&captured, &[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]),
        "the ClientHello does not offer TLS 1.3 alone"
    );

    // A policy that does not allow the client: the destination agent refuses.
    t.cluster.set_policies(vec![ferry_tests::policy(
        "shop",
        "db-admin-only",
        "{ selector: { matchLabels: { app: db } }, from: [{ serviceAccount: shop/admin }] }",
    )?]);
    t.cluster.write_workloads()?;
    let to = pod_addr(&t.cluster, t.server, Family::V4, PORT + 1);
    let _small = TestApp::serve(to)
        .bytes(1)
        .start(&mut t.cluster, t.server)?;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let connect = TestApp::connect(to)
            .bytes(1)
            .run(&mut t.cluster, t.client)?;
        if !connect.success() {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the policy was never applied"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let dump = admin_json(&t.cluster, t.n2, "/config_dump")?;
    ensure!(
        dump["totals"]["inboundDenied"].as_u64() >= Some(1),
        "{}",
        dump["totals"]
    );
    let log = t.agents[1].proc.stderr_tail();
    ensure!(
        log.contains("does not admit spiffe://cluster.local/ns/shop/sa/web: no allow policy selecting it names it (allow policies: shop/db-admin-only)"),
        "node 2's agent did not log the denial:\n{log}"
    );
    Ok(())
}

#[test]
fn garbage_on_the_tunnel_port_is_dropped_and_service_goes_on() -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut t = two_nodes("tunnel-garbage")?;
    let agent =
        std::net::SocketAddr::new(t.cluster.node(t.n2).ipv4.into(), ferry_proto::TUNNEL_PORT);
    let fabric = t.cluster.fabric_netns().to_owned();
    ferry_tests::netns::in_netns(&fabric, || {
        for garbage in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0][..],
            &[0u8; 4096][..],
        ] {
            let mut stream = std::net::TcpStream::connect_timeout(&agent, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(15)))?;
            stream.write_all(garbage)?;
            let mut answer = Vec::new();
            // The agent closes the connection (possibly with a TLS alert).
            let _ = stream.read_to_end(&mut answer);
            ensure!(
                answer.len() < 64,
                "the agent answered garbage with {} bytes",
                answer.len()
            );
        }
        Ok(())
    })?;
    let to = pod_addr(&t.cluster, t.server, Family::V4, PORT);
    exchange(&mut t.cluster, t.client, t.server, to, 1024)
        .context("after garbage, the tunnel no longer works")?;
    let dump = admin_json(&t.cluster, t.n2, "/config_dump")?;
    ensure!(
        dump["totals"]["inboundRefused"].as_u64() >= Some(3),
        "{}",
        dump["totals"]
    );
    Ok(())
}

#[test]
fn a_service_ip_spreads_connections_over_its_endpoints() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("tunnel-service")?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("web-0", "shop", "web"))?;
    let db0 = cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let db1 = cluster.add_pod(n2, PodOptions::meshed("db-1", "shop", "db"))?;
    let cluster_ip: std::net::IpAddr = "198.18.255.10".parse()?;
    cluster.set_services(vec![ferry_agent::workload::file::ServiceSpec {
        name: "db".to_owned(),
        namespace: "shop".to_owned(),
        cluster_ips: vec![cluster_ip],
        ports: vec![ferry_agent::workload::file::ServicePort {
            port: 80,
            target_port: Some(PORT),
        }],
        endpoints: vec!["db-0".to_owned(), "db-1".to_owned()],
    }]);
    let ca = cluster.start_ca()?;
    let a1 = cluster.agent(n1).ca(&ca).start()?;
    let a2 = cluster.agent(n2).ca(&ca).start()?;
    let mut servers = Vec::new();
    for pod in [db0, db1] {
        let listen = pod_addr(&cluster, pod, Family::V4, PORT);
        servers.push(TestApp::serve(listen).bytes(16).start(&mut cluster, pod)?);
    }
    let service = SocketAddr::new(cluster_ip, 80);
    let connect = TestApp::connect(service)
        .bytes(16)
        .repeat(40)
        .run(&mut cluster, client)?;
    ensure!(
        connect.success(),
        "{}\nnode 1 agent:\n{}\nnode 2 agent:\n{}",
        connect.stderr,
        a1.proc.stderr_tail(),
        a2.proc.stderr_tail()
    );
    ensure!(
        connect
            .events::<Connected>()?
            .iter()
            .all(|c| c.peer == service),
        "getpeername should give the ClusterIP: {}",
        connect.stdout
    );
    let mut counts = Vec::new();
    for serve in &mut servers {
        let mut served = 0;
        while serve.wait_for::<Served>(Duration::from_millis(500)).is_ok() {
            served += 1;
        }
        counts.push(served);
    }
    ensure!(counts.iter().sum::<u32>() == 40, "served {counts:?}");
    ensure!(
        counts.iter().all(|c| *c >= 5),
        "40 connections spread as {counts:?}"
    );
    Ok(())
}

#[test]
fn a_reset_travels_back_through_the_tunnel_as_a_reset() -> anyhow::Result<()> {
    let mut t = two_nodes("tunnel-reset")?;
    // Through the tunnel, and through the agent's in-kernel splice on the
    // client's node.
    for (server, route) in [(t.server, "tunnel"), (t.neighbour, "direct")] {
        let to = pod_addr(&t.cluster, server, Family::V4, PORT);
        let mut serve = TestApp::serve(to)
            .bytes(1024)
            .reset()
            .start(&mut t.cluster, server)?;
        let opened = |cluster: &Cluster| -> anyhow::Result<f64> {
            let labels = [("direction", "outbound"), ("route", route)];
            let samples = metrics(cluster, t.n1)?;
            Ok(metric_value(
                &samples,
                "ferry_connections_opened_total",
                &labels,
            ))
        };
        let before = opened(&t.cluster)?;
        let connect = TestApp::connect(to)
            .bytes(1024)
            .run(&mut t.cluster, t.client)?;
        let reset: Reset = serve.wait_for(WAIT)?;
        ensure!(reset.ok, "{route}: {reset:?}");
        // The server aborted: the client must see a reset, not a clean end of stream.
        ensure!(
            !connect.success() && connect.stderr.contains("Connection reset by peer"),
            "{route}: the client did not see the server's reset: {}",
            connect.stderr
        );
        ensure!(
            opened(&t.cluster)? == before + 1.0,
            "the connection did not go the {route} way"
        );
        serve.kill();
    }
    Ok(())
}

#[test]
fn strict_pods_refuse_plaintext_from_off_the_node_and_permissive_ones_count_it()
-> anyhow::Result<()> {
    let mut cluster = Cluster::new("tunnel-strict")?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("web-0", "shop", "web"))?;
    let legacy = cluster.add_pod(n1, PodOptions::unmeshed("old-0", "legacy", "old"))?;
    let strict = cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let permissive = cluster.add_pod(n2, PodOptions::meshed("cache-0", "open", "cache"))?;
    cluster.set_strict("shop");
    let ca = cluster.start_ca()?;
    let _a1 = cluster.agent(n1).ca(&ca).start()?;
    let a2 = cluster.agent(n2).ca(&ca).start()?;
    let strict_to = pod_addr(&cluster, strict, Family::V4, PORT);
    let permissive_to = pod_addr(&cluster, permissive, Family::V4, PORT);
    let _s1 = TestApp::serve(strict_to)
        .bytes(1)
        .start(&mut cluster, strict)?;
    let _s2 = TestApp::serve(permissive_to)
        .bytes(1)
        .start(&mut cluster, permissive)?;
    let quick = |to| {
        TestApp::connect(to)
            .bytes(1)
            .connect_timeout(Duration::from_secs(2))
    };

    // Through the mesh: fine.
    let connect = quick(strict_to).run(&mut cluster, client)?;
    ensure!(
        connect.success(),
        "meshed client to the strict pod: {}",
        connect.stderr
    );
    // Plaintext from another node's unmeshed pod: refused in the kernel.
    let connect = quick(strict_to).run(&mut cluster, legacy)?;
    ensure!(!connect.success(), "plaintext reached the strict pod");
    ensure!(
        connect.stderr.contains("timed out") || connect.stderr.contains("refused"),
        "{}",
        connect.stderr
    );
    // From the node itself (a kubelet probe): let in.
    let probe = TestApp::connect(strict_to).bytes(1).run(&mut cluster, n2)?;
    ensure!(
        probe.success(),
        "a probe from the node was refused: {}",
        probe.stderr
    );
    // Permissive: plaintext gets in, and is counted.
    let connect = quick(permissive_to).run(&mut cluster, legacy)?;
    ensure!(
        connect.success(),
        "plaintext to the permissive pod: {}",
        connect.stderr
    );

    let strict_counts =
        ferry_tests::inspect::plaintext_counts(&a2.pin_dir, &cluster.pod(strict).cgroup)?;
    ensure!(
        strict_counts.1 >= 1 && strict_counts.0 == 0,
        "strict pod counters {strict_counts:?}"
    );
    let permissive_counts =
        ferry_tests::inspect::plaintext_counts(&a2.pin_dir, &cluster.pod(permissive).cgroup)?;
    ensure!(
        permissive_counts == (1, 0),
        "permissive pod counters {permissive_counts:?}"
    );
    Ok(())
}
