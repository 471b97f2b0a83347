//! The tunnel port (15008) from a client that is not an agent but holds a
//! valid certificate of the trust domain (signed by the mesh's issuer) and
//! asks for what an agent never would. Each request gets its own status
//! with a reason, is counted by reason, and the port keeps serving.

use std::{net::SocketAddr, sync::Arc};

use anyhow::ensure;
use bytes::Bytes;
use ferry_agent::tunnel::wire::REASON_HEADER;
use ferry_proto::SpiffeId;
use ferry_tests::{
    Cluster, PORT, PodOptions,
    inspect::{metric_value, metrics},
    netns,
    testapp::{Family, TestApp, pod_addr},
};
use http::{Method, Request, StatusCode};
use rustls::{RootCertStore, sign::CertifiedKey};

#[test]
fn the_tunnel_port_refuses_what_an_agent_must_not_carry() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("inbound-refusals")?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let web = cluster.add_pod(n1, PodOptions::meshed("web-0", "shop", "web"))?;
    let db = cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let cache = cluster.add_pod(n2, PodOptions::meshed("cache-0", "shop", "cache"))?;
    let legacy = cluster.add_pod(n2, PodOptions::unmeshed("old-0", "legacy", "old"))?;
    let ca = cluster.start_ca()?;
    let _a1 = cluster.agent(n1).ca(&ca).start()?;
    let _a2 = cluster.agent(n2).ca(&ca).start()?;
    let listen = pod_addr(&cluster, db, Family::V4, PORT);
    let _serve = TestApp::serve(listen).start(&mut cluster, db)?;

    let n2_ip = cluster.node(n2).ipv4;
    let tunnel = SocketAddr::from((n2_ip, ferry_proto::TUNNEL_PORT));
    let db_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/db".parse()?;
    let to = |pod| pod_addr(&cluster, pod, Family::V4, PORT).to_string();
    let cases: Vec<(&str, Method, String, StatusCode, &str)> = vec![
        (
            "the pod the tunnel names",
            Method::CONNECT,
            to(db),
            StatusCode::OK,
            "",
        ),
        (
            "a pod on another node",
            Method::CONNECT,
            to(web),
            StatusCode::NOT_FOUND,
            "runs on node",
        ),
        (
            "an unmeshed pod",
            Method::CONNECT,
            to(legacy),
            StatusCode::FORBIDDEN,
            "not meshed",
        ),
        (
            "a pod of another identity",
            Method::CONNECT,
            to(cache),
            StatusCode::MISDIRECTED_REQUEST,
            "runs as",
        ),
        (
            "the agent's own admin port",
            Method::CONNECT,
            format!("{n2_ip}:15000"),
            StatusCode::NOT_FOUND,
            "no pod has address",
        ),
        (
            "a name, not an address",
            Method::CONNECT,
            "db.shop:8080".to_owned(),
            StatusCode::BAD_REQUEST,
            "not an IP address",
        ),
        (
            "a GET",
            Method::GET,
            format!("https://{}/", to(db)),
            StatusCode::METHOD_NOT_ALLOWED,
            "only CONNECT",
        ),
    ];
    let client = ca.client_certificate("spiffe://cluster.local/ns/shop/sa/web")?;
    let answers = netns::block_on_in(&cluster.node(n1).netns, || {
        ask_all(tunnel, client, db_id, &cases)
    })?;
    for ((what, _, target, status, reason), (got, got_reason)) in cases.iter().zip(&answers) {
        ensure!(
            got == status && got_reason.contains(reason),
            "{what} ({target}): {got} {got_reason:?}, expected {status} with {reason:?}"
        );
    }

    let samples = metrics(&cluster, n2)?;
    for reason in [
        "not_local",
        "not_meshed",
        "wrong_identity",
        "bad_request",
        "method",
    ] {
        let counted = metric_value(
            &samples,
            "ferry_inbound_refused_total",
            &[("reason", reason)],
        );
        let expected = if reason == "not_local" { 2.0 } else { 1.0 };
        ensure!(
            counted == expected,
            "ferry_inbound_refused_total{{reason={reason}}} = {counted}, expected {expected}"
        );
    }
    Ok(())
}

async fn ask_all(
    tunnel: SocketAddr,
    (certified, roots): (Arc<CertifiedKey>, Arc<RootCertStore>),
    expected: SpiffeId,
    cases: &[(&str, Method, String, StatusCode, &str)],
) -> anyhow::Result<Vec<(StatusCode, String)>> {
    let mut send =
        ferry_tests::tunnel_client::connect(tunnel, (certified, roots), &expected).await?;
    let mut answers = Vec::new();
    for (_, method, target, _, _) in cases {
        let request = Request::builder()
            .method(method.clone())
            .uri(target.as_str())
            .body(())?;
        send = send.ready().await?;
        let (response, mut body) = send.send_request(request, false)?;
        let response = response.await?;
        let reason = response
            .headers()
            .get(REASON_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let _ = body.send_data(Bytes::new(), true);
        answers.push((response.status(), reason));
    }
    Ok(answers)
}
