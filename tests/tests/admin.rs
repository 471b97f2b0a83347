//! The agent's metrics and `ferry-agent inspect`, end to end: real traffic
//! through the tunnel between two simulated nodes moves the counters an
//! operator would watch, Prometheus can scrape them off the node, and the
//! inspect tables show the identities and connections.

use std::{
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, ensure};
use ferry_agent::inspect::parse_metrics;
use ferry_tests::{
    Cluster, PORT, PodOptions, bin_path, http,
    inspect::{admin_json, eventually, live_connection, metric_value as value, metrics},
    netns,
    testapp::{Family, TestApp, pod_addr},
};

const BYTES: u64 = 1 << 20;
const CONNECTIONS: u64 = 3;
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[test]
fn metrics_and_inspect_show_tunnelled_traffic_certificates_and_denials() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("admin")?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("web-0", "shop", "web"))?;
    let server = cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let ca = cluster.start_ca()?;
    let _a1 = cluster.agent(n1).ca(&ca).start()?;
    let _a2 = cluster.agent(n2).ca(&ca).start()?;
    let agent = bin_path("ferry-agent")?;
    let agent = agent.to_str().context("agent path is not UTF-8")?;

    // Real traffic: three connections through the tunnel, BYTES each way.
    let to = pod_addr(&cluster, server, Family::V4, PORT);
    let _serve = TestApp::serve(to)
        .bytes(BYTES)
        .start(&mut cluster, server)?;
    let connect = TestApp::connect(to)
        .bytes(BYTES)
        .repeat(CONNECTIONS)
        .quiet()
        .run(&mut cluster, client)?;
    ensure!(connect.success(), "{}\n{}", connect.stderr, connect.stdout);

    // The client's agent: opened, bytes both ways, handshakes, pool.
    let outbound = [("direction", "outbound"), ("route", "tunnel")];
    let m1 = eventually(|| {
        let m = metrics(&cluster, n1)?;
        ensure!(
            value(&m, "ferry_connections_active", &outbound) == 0.0,
            "connections still active"
        );
        Ok(m)
    })?;
    let total = (CONNECTIONS * BYTES) as f64;
    ensure!(value(&m1, "ferry_connections_opened_total", &outbound) == CONNECTIONS as f64);
    for flow in ["sent", "received"] {
        let moved = value(
            &m1,
            "ferry_connection_bytes_total",
            &[outbound[0], outbound[1], ("flow", flow)],
        );
        ensure!(moved >= total, "{flow}: {moved} bytes, sent {total}");
    }
    let handshakes = value(
        &m1,
        "ferry_tunnel_handshakes_total",
        &[("side", "client"), ("result", "ok")],
    );
    ensure!(handshakes >= 1.0, "no client handshake counted");
    ensure!(value(&m1, "ferry_pool_connections", &[]) >= 1.0);
    ensure!(value(&m1, "ferry_pool_streams_total", &[]) == CONNECTIONS as f64);
    ensure!(value(&m1, "ferry_captured_pods", &[]) == 1.0);
    ensure!(value(&m1, "ferry_certificate_renewals_total", &[("result", "ok")]) >= 1.0);
    ensure!(value(&m1, "ferry_ca_requests_total", &[("result", "ok")]) >= 1.0);
    ensure!(
        m1.iter().any(|s| s.name == "ferry_build_info"
            && s.labels == [("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned())]
            && s.value == 1.0),
        "no ferry_build_info"
    );
    // The certificate the CA issued lives 24 h.
    let expiry = value(
        &m1,
        "ferry_certificate_expiry_timestamp_seconds",
        &[("identity", WEB)],
    );
    let lifetime = expiry - unix_now();
    ensure!(
        (lifetime - 86_400.0).abs() < 600.0,
        "the certificate expires in {lifetime} s, not about 24 h"
    );
    // One source of truth: the JSON totals are the same counters.
    let dump = admin_json(&cluster, n1, "/config_dump")?;
    ensure!(
        dump["totals"]["captured"].as_f64()
            == Some(value(&m1, "ferry_connections_captured_total", &[])),
        "config_dump {} vs metrics",
        dump["totals"]
    );
    let pool = admin_json(&cluster, n1, "/pool")?;
    ensure!(
        pool["totals"]["handshakes"].as_f64() == Some(handshakes),
        "{pool}"
    );

    // The server's agent saw them arrive.
    let inbound = [("direction", "inbound"), ("route", "tunnel")];
    let m2 = eventually(|| {
        let m = metrics(&cluster, n2)?;
        ensure!(value(&m, "ferry_connections_active", &inbound) == 0.0);
        Ok(m)
    })?;
    ensure!(value(&m2, "ferry_connections_opened_total", &inbound) == CONNECTIONS as f64);
    ensure!(
        value(
            &m2,
            "ferry_connection_bytes_total",
            &[inbound[0], inbound[1], ("flow", "sent")]
        ) >= total
    );
    ensure!(
        value(
            &m2,
            "ferry_tunnel_handshakes_total",
            &[("side", "server"), ("result", "ok")]
        ) >= 1.0
    );
    ensure!(
        (value(
            &m2,
            "ferry_certificate_expiry_timestamp_seconds",
            &[("identity", DB)]
        ) - unix_now()
            - 86_400.0)
            .abs()
            < 600.0
    );

    // Prometheus scrapes the probe port from off the node; the admin port
    // stays on the node's loopback.
    let n1_node = cluster.node(n1).clone();
    let n2_netns = cluster.node(n2).netns.clone();
    let probe = SocketAddr::from((n1_node.ipv4, ferry_agent::cli::DEFAULT_PROBE_PORT));
    let admin = SocketAddr::from((n1_node.ipv4, 15000));
    let (status, body, admin_off_node) = netns::in_netns(&n2_netns, || {
        let (status, body) = http::get(probe, "/metrics")?;
        Ok((status, body, http::get(admin, "/metrics")))
    })?;
    ensure!(status == 200, "{probe}/metrics: {status} {body}");
    let scraped = parse_metrics(&body).map_err(anyhow::Error::msg)?;
    ensure!(value(&scraped, "ferry_connections_opened_total", &outbound) == CONNECTIONS as f64);
    ensure!(
        admin_off_node.is_err(),
        "the admin endpoint answers on {admin}"
    );

    // inspect, as an operator runs it on the node.
    let certs = cluster.run_on_node(n1, agent, &["inspect", "certs"])?;
    let header = certs.lines().next().unwrap_or_default();
    ensure!(
        header.split_whitespace().collect::<Vec<_>>()
            == [
                "IDENTITY",
                "SERIAL",
                "NOT-AFTER",
                "EXPIRES-IN",
                "NEXT-ATTEMPT",
                "FAILURES"
            ],
        "{certs}"
    );
    let web = certs
        .lines()
        .find(|l| l.starts_with(WEB))
        .with_context(|| format!("no row for {WEB}:\n{certs}"))?;
    // The CA backdates NotBefore, not NotAfter: about a day left, either side of it.
    ensure!(
        web.contains(" 23h5") || web.contains(" 1d0h"),
        "expires in about 24 h: {certs}"
    );

    let held = pod_addr(&cluster, server, Family::V4, PORT + 1);
    let _hold_server = TestApp::serve(held).start(&mut cluster, server)?;
    let hold = TestApp::hold(held).start(&mut cluster, client)?;
    live_connection(&cluster, n1, held)?;
    live_connection(&cluster, n2, held)?;
    let table = cluster.run_on_node(n1, agent, &["inspect", "connections"])?;
    let row = table
        .lines()
        .find(|l| l.contains(&held.to_string()))
        .with_context(|| format!("no row for {held}:\n{table}"))?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    ensure!(
        cells[0] == "shop/web-0"
            && cells[2] == held.to_string()
            && cells[3] == "shop/db-0"
            && cells[4] == "tunnel"
            && cells[5] == DB,
        "{table}"
    );
    let table = cluster.run_on_node(n2, agent, &["inspect", "connections"])?;
    ensure!(
        table.lines().any(|l| l.contains(&held.to_string())
            && l.contains("inboundTunnel")
            && l.contains(WEB)),
        "{table}"
    );
    for view in ["workloads", "pool", "config", "metrics"] {
        let out = cluster.run_on_node(n1, agent, &["inspect", view])?;
        ensure!(out.lines().count() >= 2, "inspect {view}:\n{out}");
    }
    hold.release()?;

    // Nothing listens: inspect says so.
    let error = cluster
        .run_on_node(
            n1,
            agent,
            &["inspect", "--admin-addr", "127.0.0.1:15999", "certs"],
        )
        .unwrap_err();
    ensure!(
        format!("{error:#}")
            .contains("nothing listens on 127.0.0.1:15999: is ferry-agent running on this node?"),
        "{error:#}"
    );

    // A policy that does not allow web: node 2 refuses, both agents count it.
    let small = pod_addr(&cluster, server, Family::V4, PORT + 2);
    let _small_server = TestApp::serve(small).bytes(1).start(&mut cluster, server)?;
    cluster.set_policies(vec![ferry_tests::policy(
        "shop",
        "db-admin-only",
        "{ selector: { matchLabels: { app: db } }, from: [{ serviceAccount: shop/admin }] }",
    )?]);
    cluster.write_workloads()?;
    eventually(|| {
        let connect = TestApp::connect(small).bytes(1).run(&mut cluster, client)?;
        ensure!(!connect.success(), "the policy was not applied yet");
        Ok(())
    })?;
    let m2 = metrics(&cluster, n2)?;
    ensure!(value(&m2, "ferry_inbound_refused_total", &[("reason", "policy")]) >= 1.0);
    let dump = admin_json(&cluster, n2, "/config_dump")?;
    ensure!(
        dump["totals"]["inboundDenied"].as_f64()
            == Some(value(
                &m2,
                "ferry_inbound_refused_total",
                &[("reason", "policy")]
            )),
        "{}",
        dump["totals"]
    );
    let m1 = metrics(&cluster, n1)?;
    ensure!(
        value(
            &m1,
            "ferry_connection_failures_total",
            &[("direction", "outbound"), ("reason", "peer_refused")]
        ) >= 1.0
    );
    // The policy as inspect shows it on node 2: the pod it selects, what it refused.
    let table = cluster.run_on_node(n2, agent, &["inspect", "policies"])?;
    let row = table
        .lines()
        .find(|l| l.starts_with("shop/db-admin-only"))
        .with_context(|| format!("inspect policies:\n{table}"))?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    ensure!(
        cells[1] == "Allow"
            && cells[3].parse::<u64>().is_ok_and(|denied| denied >= 1)
            && cells[5] == "shop/db-0",
        "inspect policies:\n{table}"
    );
    Ok(())
}
