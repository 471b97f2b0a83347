//! Workload identity end to end: a real CA (`ferry-ca`) and a real agent on
//! a simulated node; the agent gets a certificate for each ServiceAccount
//! with a pod on its node, checked here by an independent verifier
//! (`openssl verify`).

use std::{process::Command, time::Duration};

use anyhow::{Context as _, ensure};
use ferry_tests::{Cluster, PodOptions, WAIT, inspect::admin_json};
use serde_json::Value;

fn certs_of(cluster: &Cluster, node: ferry_tests::NodeId) -> anyhow::Result<Vec<Value>> {
    let certs = admin_json(cluster, node, "/certs")?;
    certs.as_array().cloned().context("/certs is not a list")
}

fn openssl(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .context("cannot run openssl")?;
    ensure!(
        output.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn the_agent_gets_a_verified_24h_certificate_per_local_service_account() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("identity")?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    cluster.add_pod(n1, PodOptions::meshed("api-0", "shop", "api"))?;
    cluster.add_pod(n1, PodOptions::meshed("web-0", "shop", "web"))?;
    cluster.add_pod(n1, PodOptions::meshed("web-1", "shop", "web"))?;
    // On another node: the agent of n1 must not get a certificate for it.
    cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let ca = cluster.start_ca()?;
    // Ready means: every local identity has a valid certificate.
    let _agent = cluster.agent(n1).ca(&ca).start()?;

    let certs = certs_of(&cluster, n1)?;
    let identities: Vec<&str> = certs
        .iter()
        .filter_map(|c| c["identity"].as_str())
        .collect();
    ensure!(
        identities
            == [
                "spiffe://cluster.local/ns/shop/sa/api",
                "spiffe://cluster.local/ns/shop/sa/web"
            ],
        "{identities:?}"
    );
    let issuer_cert = ca.issuer_dir.join("tls.crt");
    for cert in &certs {
        let identity = cert["identity"].as_str().unwrap_or_default();
        let leaf = cluster.tempdir().join("leaf.pem");
        std::fs::write(&leaf, cert["leafPem"].as_str().context("no leafPem")?)?;
        let leaf = leaf.to_string_lossy().into_owned();
        let verified = openssl(&[
            "verify",
            "-CAfile",
            &ca.trust_bundle.to_string_lossy(),
            "-untrusted",
            &issuer_cert.to_string_lossy(),
            "-purpose",
            "sslclient",
            &leaf,
        ])?;
        ensure!(verified.trim().ends_with(": OK"), "{verified}");
        let san = openssl(&["x509", "-in", &leaf, "-noout", "-ext", "subjectAltName"])?;
        let names: Vec<&str> = san.lines().skip(1).map(str::trim).collect();
        ensure!(
            names == [format!("URI:{identity}")],
            "SANs of {identity}: {san}"
        );
        let not_before = cert["notBeforeUnix"].as_u64().context("notBeforeUnix")?;
        let not_after = cert["notAfterUnix"].as_u64().context("notAfterUnix")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        // 24 h from issuance; NotBefore 5 min early for clock skew.
        ensure!(
            not_after.abs_diff(now + 24 * 3600) < 120,
            "{identity} expires at {not_after}, not 24 h from {now}"
        );
        ensure!(
            (now - not_before).abs_diff(300) < 120,
            "{identity} starts at {not_before}"
        );
    }

    // The CA goes away: the agent keeps serving on the certificates it has.
    drop(ca);
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = cluster.admin_get(n1, "/healthz/ready")?;
    ensure!(status == 200, "not ready without the CA: {body}");

    // The last web pod leaves the node: its identity (and key) goes.
    let path = cluster.workloads_path();
    let mut file: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    file["pods"]
        .as_sequence_mut()
        .context("pods")?
        .retain(|pod| pod["serviceAccount"] != "web");
    let partial = path.with_extension("partial");
    std::fs::write(&partial, serde_yaml::to_string(&file)?)?;
    std::fs::rename(&partial, &path)?;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let certs = certs_of(&cluster, n1)?;
        let identities: Vec<&str> = certs
            .iter()
            .filter_map(|c| c["identity"].as_str())
            .collect();
        if identities == ["spiffe://cluster.local/ns/shop/sa/api"] {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "web's identity is still there: {identities:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
