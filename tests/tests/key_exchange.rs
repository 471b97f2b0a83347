//! The tunnel's TLS key exchange: post-quantum (X25519MLKEM768) between two
//! default agents, and a mixed pair (one agent restricted to classical
//! groups with `--key-exchange classical`) still connects, both ways, on
//! X25519. What was negotiated shows in `/pool`, in
//! `ferry_tunnel_key_exchanges_total` and in the CA's line for each request.
//! And a client that is no agent, offering X25519MLKEM768 alone, completes
//! the tunnel port's mTLS handshake (Debian 12's OpenSSL 3.0 has no ML-KEM,
//! so the client is rustls).

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context as _, ensure};
use ferry_agent::identity::tls;
use ferry_proto::SpiffeId;
use ferry_tests::{
    Cluster, MIB, NodeId, PORT, PodOptions,
    inspect::{admin_json, eventually, metric_value, metrics},
    netns,
    testapp::{Family, TestApp, exchange, pod_addr},
};
use rustls::{
    NamedGroup, RootCertStore,
    crypto::{CryptoProvider, SupportedKxGroup, aws_lc_rs::kx_group},
    pki_types::ServerName,
    sign::CertifiedKey,
};
use serde_json::Value;

/// The key exchange groups of every pooled connection `node` holds.
fn pooled_groups(cluster: &Cluster, node: NodeId) -> anyhow::Result<Vec<String>> {
    let pool = admin_json(cluster, node, "/pool")?;
    let groups: Vec<String> = pool["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|key| key["connections"].as_array().cloned().unwrap_or_default())
        .map(|connection| match &connection["keyExchange"] {
            Value::String(group) => group.clone(),
            other => format!("missing ({other})"),
        })
        .collect();
    ensure!(!groups.is_empty(), "no pooled connection: {pool}");
    Ok(groups)
}

/// `text` without the terminal's colour escapes (`ESC [ … m`).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn agents_negotiate_post_quantum_and_a_classical_one_still_connects_both_ways() -> anyhow::Result<()>
{
    let mut cluster = Cluster::new("key-exchange")?;
    let classical = cluster.add_node()?;
    let pq = cluster.add_node()?;
    let pq_too = cluster.add_node()?;
    let on_classical = cluster.add_pod(classical, PodOptions::meshed("web-0", "shop", "web"))?;
    let on_pq = cluster.add_pod(pq, PodOptions::meshed("db-0", "shop", "db"))?;
    let on_pq_too = cluster.add_pod(pq_too, PodOptions::meshed("cache-0", "shop", "cache"))?;
    let ca = cluster.start_ca()?;
    let _agents = [
        cluster
            .agent(classical)
            .ca(&ca)
            .args(&["--key-exchange", "classical"])
            .start()?,
        cluster.agent(pq).ca(&ca).start()?,
        cluster.agent(pq_too).ca(&ca).start()?,
    ];

    // The CA's log says how each agent's request was secured: the default
    // agents on the hybrid group, the classical one on X25519.
    let log = without_colours(&ca.proc.stderr_tail());
    let issued = |group: &str| {
        log.lines()
            .filter(|line| line.contains("issued a certificate"))
            .filter(|line| line.contains(&format!("key_exchange={group} ")))
            .count()
    };
    ensure!(
        issued("X25519MLKEM768") >= 2 && issued("X25519") >= 1,
        "the CA's issuance lines do not name the key exchange of each agent:\n{log}"
    );

    // Two default agents: the hybrid post-quantum group.
    let to = pod_addr(&cluster, on_pq_too, Family::V4, PORT);
    exchange(&mut cluster, on_pq, on_pq_too, to, MIB).context("default to default")?;
    let groups = pooled_groups(&cluster, pq)?;
    ensure!(
        groups.iter().all(|g| g == "X25519MLKEM768"),
        "two default agents negotiated {groups:?}"
    );
    eventually(|| {
        let samples = metrics(&cluster, pq_too)?;
        let labels = [("side", "server"), ("group", "X25519MLKEM768")];
        let count = metric_value(&samples, "ferry_tunnel_key_exchanges_total", &labels);
        ensure!(
            count >= 1.0,
            "server-side X25519MLKEM768 handshakes: {count}"
        );
        Ok(())
    })?;

    // The classical agent dials a default one, then a default one dials it:
    // each offers X25519 too, so both meet there.
    let to = pod_addr(&cluster, on_pq, Family::V4, PORT + 1);
    exchange(&mut cluster, on_classical, on_pq, to, MIB).context("classical to default")?;
    let groups = pooled_groups(&cluster, classical)?;
    ensure!(
        groups.iter().all(|g| g == "X25519"),
        "the classical agent's connections negotiated {groups:?}"
    );
    let to = pod_addr(&cluster, on_classical, Family::V4, PORT + 2);
    exchange(&mut cluster, on_pq, on_classical, to, MIB).context("default to classical")?;
    let samples = metrics(&cluster, classical)?;
    let labels = [("side", "server"), ("group", "X25519")];
    let count = metric_value(&samples, "ferry_tunnel_key_exchanges_total", &labels);
    ensure!(
        count >= 1.0,
        "the classical agent accepted no X25519 handshake: {count}"
    );
    let pq_groups = pooled_groups(&cluster, pq)?;
    ensure!(
        pq_groups.iter().any(|g| g == "X25519"),
        "the default agent's connection to the classical one is not on X25519: {pq_groups:?}"
    );
    Ok(())
}

/// An outside client with a certificate of the trust domain, offering one
/// key exchange group only: with X25519MLKEM768 the handshake completes (the
/// server takes the client's certificate and answers a `CONNECT`); with a
/// group Ferry does not accept (secp384r1) the handshake is refused.
#[test]
fn a_client_offering_only_x25519mlkem768_completes_the_tunnel_handshake() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("key-exchange-client")?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let db = cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let ca = cluster.start_ca()?;
    let _agent = cluster.agent(n2).ca(&ca).start()?;
    let _serve =
        TestApp::serve(pod_addr(&cluster, db, Family::V4, PORT)).start(&mut cluster, db)?;
    let tunnel = SocketAddr::from((cluster.node(n2).ipv4, ferry_proto::TUNNEL_PORT));
    let target = pod_addr(&cluster, db, Family::V4, PORT).to_string();
    let client = ca.client_certificate("spiffe://cluster.local/ns/shop/sa/web")?;
    let db_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/db".parse()?;

    let (group, status) = netns::block_on_in(&cluster.node(n1).netns, || {
        connect_offering(
            kx_group::X25519MLKEM768,
            tunnel,
            client.clone(),
            &db_id,
            &target,
        )
    })?;
    ensure!(
        group == Some(NamedGroup::X25519MLKEM768) && status == http::StatusCode::OK,
        "offering only X25519MLKEM768: negotiated {group:?}, CONNECT answered {status}"
    );
    let samples = metrics(&cluster, n2)?;
    let labels = [("side", "server"), ("group", "X25519MLKEM768")];
    let count = metric_value(&samples, "ferry_tunnel_key_exchanges_total", &labels);
    ensure!(
        count >= 1.0,
        "the agent counted no X25519MLKEM768 handshake: {count}"
    );

    let refused = netns::block_on_in(&cluster.node(n1).netns, || async {
        let offered =
            connect_offering(kx_group::SECP384R1, tunnel, client.clone(), &db_id, &target);
        Ok(offered.await.map_err(|e| format!("{e:#}")))
    })?;
    match refused {
        Ok(answer) => anyhow::bail!("offering only secp384r1 was accepted: {answer:?}"),
        Err(error) => ensure!(
            error.contains("HandshakeFailure"),
            "offering only secp384r1 failed otherwise than by a handshake failure: {error}"
        ),
    }
    Ok(())
}

/// A TLS handshake with the tunnel port offering only `group`, then one
/// `CONNECT` to `target`: the group negotiated and the answer's status.
async fn connect_offering(
    group: &'static dyn SupportedKxGroup,
    tunnel: SocketAddr,
    (certified, roots): (Arc<CertifiedKey>, Arc<RootCertStore>),
    expected: &SpiffeId,
    target: &str,
) -> anyhow::Result<(Option<NamedGroup>, http::StatusCode)> {
    let provider = Arc::new(CryptoProvider {
        kx_groups: vec![group],
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let config = tls::client_config(&provider, certified, roots, expected.trust_domain())?;
    let tcp = tokio::net::TcpStream::connect(tunnel).await?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(expected.sni())?, tcp)
        .await?;
    let negotiated = stream
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .map(|g| g.name());
    let (send, connection) = h2::client::handshake(stream).await?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target)
        .body(())?;
    let mut send = send.ready().await?;
    let (response, _body) = send.send_request(request, false)?;
    Ok((negotiated, response.await?.status()))
}
