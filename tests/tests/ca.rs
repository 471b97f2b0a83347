//! The Ferry CA as a client sees it: real `ferry-ca` processes, real TLS and
//! gRPC (the agent's own CA client), and every kind of bad request refused
//! with a message that says what was wrong, while good requests keep being
//! served. Also: the issuer replaced under a running CA.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail, ensure};
use ferry_agent::identity::Certifier as _;
use ferry_ca::jwt::Minter;
use ferry_proto::identity::v1::{CertifyRequest, CertifyResponse};
use ferry_tests::{
    Cluster, NodeId, PodOptions,
    ca::{CaFixture, ca_client},
    http, netns,
};
use rcgen::{CertificateParams, KeyPair, SanType, string::Ia5String};

const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

struct Setup {
    cluster: Cluster,
    ca: CaFixture,
    n1: NodeId,
}

fn setup(name: &str) -> anyhow::Result<Setup> {
    let mut cluster = Cluster::new(name)?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    cluster.add_pod(n1, PodOptions::meshed("api-0", "shop", "api"))?;
    cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let ca = cluster.start_ca()?;
    Ok(Setup { cluster, ca, n1 })
}

/// Sends `request` to the CA from the fabric namespace, checking the CA
/// against `bundle`.
fn certify(
    setup: &Setup,
    bundle: &Path,
    request: CertifyRequest,
) -> anyhow::Result<Result<CertifyResponse, String>> {
    let addr = setup.ca.addr;
    netns::block_on_in(setup.cluster.fabric_netns(), || async {
        let client = ca_client(addr, bundle)?;
        Ok(client.certify(request).await.map_err(|e| e.to_string()))
    })
}

fn csr(key: &KeyPair, sans: &[&str]) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|san| match san.strip_prefix("DNS:") {
            Some(dns) => SanType::DnsName(dns.try_into().expect("a DNS name")),
            None => SanType::URI(Ia5String::try_from(*san).expect("a URI")),
        })
        .collect();
    params.serialize_request(key).expect("a CSR").der().to_vec()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a key")
}

fn request(setup: &Setup, identity: &str, csr_der: Vec<u8>) -> anyhow::Result<CertifyRequest> {
    Ok(CertifyRequest {
        identity: identity.to_owned(),
        csr_der,
        token: setup.ca.agent_token(&setup.cluster.node(setup.n1).name)?,
    })
}

/// The elements of a DER SEQUENCE, each with its own tag and length.
fn der_elements(der: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    fn header(bytes: &[u8]) -> anyhow::Result<(usize, usize)> {
        let first = *bytes.get(1).context("short DER")?;
        Ok(match first {
            len @ 0..=0x7f => (2, usize::from(len)),
            0x81 => (3, usize::from(bytes[2])),
            0x82 => (4, usize::from(bytes[2]) << 8 | usize::from(bytes[3])),
            _ => bail!("unexpected DER length form"),
        })
    }
    let (head, len) = header(der)?;
    let mut rest = &der[head..head + len];
    let mut elements = Vec::new();
    while !rest.is_empty() {
        let (head, len) = header(rest)?;
        elements.push(&rest[..head + len]);
        rest = &rest[head + len..];
    }
    Ok(elements)
}

fn der_sequence(parts: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = parts.concat();
    let mut der = vec![0x30];
    match body.len() {
        len @ 0..=0x7f => der.push(len as u8),
        len @ 0x80..=0xff => der.extend([0x81, len as u8]),
        len => der.extend([0x82, (len >> 8) as u8, len as u8]),
    }
    der.extend(body);
    der
}

/// A CSR whose body carries one key but whose signature is made by another.
fn csr_signed_by_another_key() -> anyhow::Result<Vec<u8>> {
    let claimed = csr(&p256(), &[API]);
    let signed = csr(&p256(), &[API]);
    let claimed = der_elements(&claimed)?;
    let signed = der_elements(&signed)?;
    Ok(der_sequence(&[claimed[0], signed[1], signed[2]]))
}

fn rsa_csr(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let out = dir.join("rsa.csr");
    let status = Command::new("openssl")
        .args(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(dir.join("rsa.key"))
        .args(["-subj", "/", "-addext"])
        .arg(format!("subjectAltName=URI:{API}"))
        .args(["-outform", "DER", "-out"])
        .arg(&out)
        .output()
        .context("cannot run openssl")?;
    ensure!(
        status.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    Ok(std::fs::read(out)?)
}

fn refused(result: Result<CertifyResponse, String>, expected: &[&str]) -> anyhow::Result<()> {
    match result {
        Ok(_) => bail!("the CA signed a request it should refuse ({expected:?})"),
        Err(message) => {
            for part in expected {
                ensure!(
                    message.contains(part),
                    "refusal {message:?} does not say {part:?}"
                );
            }
            Ok(())
        }
    }
}

fn metrics(setup: &Setup) -> anyhow::Result<String> {
    let addr = ferry_ca::cli::DEFAULT_METRICS_ADDR.parse()?;
    let (status, body) =
        netns::in_netns(setup.cluster.fabric_netns(), || http::get(addr, "/metrics"))?;
    ensure!(status == 200, "metrics: {status}");
    Ok(body)
}

#[test]
fn bad_requests_are_refused_with_a_reason_and_good_ones_still_served() -> anyhow::Result<()> {
    let setup = setup("ca-refusals")?;
    let bundle = setup.ca.trust_bundle.clone();
    let node = setup.cluster.node(setup.n1).name.clone();
    let good = || request(&setup, API, csr(&p256(), &[API]));

    let issued = certify(&setup, &bundle, good()?)?.map_err(anyhow::Error::msg)?;
    ensure!(issued.intermediates_der.len() == 1 && issued.trust_bundle_der.len() == 1);

    let cases: Vec<(&str, CertifyRequest, Vec<&str>)> = vec![
        (
            "garbage CSR",
            request(&setup, API, b"not a CSR".to_vec())?,
            vec!["InvalidArgument", "not a DER PKCS#10"],
        ),
        (
            "empty CSR",
            request(&setup, API, Vec::new())?,
            vec!["InvalidArgument", "the CSR is empty"],
        ),
        (
            "SAN for someone else",
            request(&setup, API, csr(&p256(), &[DB]))?,
            vec!["exactly one URI SAN", DB],
        ),
        (
            "two SANs",
            request(&setup, API, csr(&p256(), &[API, "DNS:api.example"]))?,
            vec!["exactly one URI SAN", "DNS:api.example"],
        ),
        (
            "RSA key",
            request(&setup, API, rsa_csr(setup.cluster.tempdir())?)?,
            vec!["must be ECDSA P-256, not RSA"],
        ),
        (
            "signed by another key",
            request(&setup, API, csr_signed_by_another_key()?)?,
            vec!["signature does not verify"],
        ),
        (
            "no pod on the caller's node",
            request(&setup, DB, csr(&p256(), &[DB]))?,
            vec!["PermissionDenied", "shop/db", &node],
        ),
        (
            "identity of another trust domain",
            request(
                &setup,
                "spiffe://evil.org/ns/shop/sa/api",
                csr(&p256(), &["spiffe://evil.org/ns/shop/sa/api"]),
            )?,
            vec!["trust domain cluster.local"],
        ),
        (
            "request too large",
            request(&setup, API, vec![0x30; 100 * 1024])?,
            vec!["message length too large"],
        ),
    ];
    for (what, request, expected) in cases {
        refused(certify(&setup, &bundle, request)?, &expected).with_context(|| what.to_owned())?;
    }

    // Tokens.
    let with_token = |token: String| -> anyhow::Result<CertifyRequest> {
        Ok(CertifyRequest { token, ..good()? })
    };
    let mut wrong_audience = CaFixture::agent_request(&node);
    wrong_audience.audience = vec!["https://kubernetes.default.svc".to_owned()];
    let mut expired = CaFixture::agent_request(&node);
    expired.lifetime_secs = -3600;
    let stranger = Minter::generate(ferry_tests::ca::TOKEN_ISSUER).map_err(anyhow::Error::msg)?;
    let mut workload = CaFixture::agent_request(&node);
    workload.namespace = "shop".to_owned();
    workload.service_account = "api".to_owned();
    let token_cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "wrong audience",
            setup.ca.mint(&wrong_audience)?,
            vec!["Unauthenticated", "audience"],
        ),
        (
            "expired",
            setup.ca.mint(&expired)?,
            vec!["Unauthenticated", "expired"],
        ),
        (
            "unknown key",
            stranger
                .mint(&CaFixture::agent_request(&node))
                .map_err(anyhow::Error::msg)?,
            vec!["Unauthenticated", "signature does not verify"],
        ),
        (
            "not an agent",
            setup.ca.mint(&workload)?,
            vec![
                "PermissionDenied",
                "system:serviceaccount:shop:api is not a Ferry agent",
            ],
        ),
        (
            "garbage",
            "garbage".to_owned(),
            vec!["Unauthenticated", "not a JWT"],
        ),
        (
            "no token",
            String::new(),
            vec!["Unauthenticated", "the request carries no token"],
        ),
    ];
    for (what, token, expected) in token_cases {
        refused(certify(&setup, &bundle, with_token(token)?)?, &expected)
            .with_context(|| what.to_owned())?;
    }

    // Still serving, and the refusals are counted by reason.
    certify(&setup, &bundle, good()?)?.map_err(anyhow::Error::msg)?;
    let metrics = metrics(&setup)?;
    for line in [
        "ferry_ca_certificates_issued_total 2",
        "ferry_ca_requests_refused_total{reason=\"bad_csr\"} 6",
        "ferry_ca_requests_refused_total{reason=\"unauthenticated\"} 5",
        "ferry_ca_requests_refused_total{reason=\"not_an_agent\"} 1",
        "ferry_ca_requests_refused_total{reason=\"no_pod_on_node\"} 1",
    ] {
        ensure!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
    }
    Ok(())
}

/// The value of `ferry_ca_issuer_expiry_timestamp_seconds`.
fn issuer_expiry_metric(setup: &Setup) -> anyhow::Result<i64> {
    let metrics = metrics(setup)?;
    let line = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_ca_issuer_expiry_timestamp_seconds "))
        .with_context(|| format!("no issuer expiry in the metrics:\n{metrics}"))?;
    Ok(line.trim().parse()?)
}

/// A PEM certificate's notAfter in Unix seconds, as openssl and date read it.
fn not_after(path: &Path) -> anyhow::Result<i64> {
    let text = String::from_utf8(openssl_x509(path, &["-noout", "-enddate"])?)?;
    let date = text
        .trim()
        .strip_prefix("notAfter=")
        .with_context(|| format!("openssl said {text:?}"))?;
    let out = Command::new("date")
        .args(["-u", "-d", date, "+%s"])
        .output()?;
    ensure!(out.status.success(), "date cannot read {date:?}");
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

fn der_of_pem(path: &Path) -> anyhow::Result<Vec<u8>> {
    openssl_x509(path, &["-outform", "DER"])
}

/// `openssl x509 ARGS -in PATH`: what it printed.
fn openssl_x509(path: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("openssl")
        .arg("x509")
        .args(args)
        .arg("-in")
        .arg(path)
        .output()
        .context("cannot run openssl")?;
    ensure!(
        out.status.success(),
        "openssl x509 {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// `openssl verify` of a leaf (DER) against a bundle and an intermediate (PEM files).
fn openssl_verifies(
    leaf_der: &[u8],
    bundle: &Path,
    issuer: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let leaf = dir.join("leaf.der");
    std::fs::write(&leaf, leaf_der)?;
    let pem = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(&leaf)
        .output()?;
    let leaf_pem = dir.join("leaf.pem");
    std::fs::write(&leaf_pem, pem.stdout)?;
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(bundle)
        .arg("-untrusted")
        .arg(issuer)
        .arg(&leaf_pem)
        .output()?;
    ensure!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_replaced_issuer_is_used_without_a_restart_and_a_corrupt_one_is_refused() -> anyhow::Result<()>
{
    let setup = setup("ca-rotation")?;
    let dir = setup.cluster.tempdir().to_owned();
    let good = || request(&setup, API, csr(&p256(), &[API]));
    let before = certify(&setup, &setup.ca.trust_bundle, good()?)?.map_err(anyhow::Error::msg)?;
    let old_expiry = not_after(&setup.ca.issuer_dir.join("tls.crt"))?;
    ensure!(
        issuer_expiry_metric(&setup)? == old_expiry,
        "the issuer expiry metric is not the issuer's notAfter ({old_expiry})"
    );

    // A new root and issuer; the bundle holds both roots during the rotation.
    // A second later, so the new issuer's notAfter differs from the old one.
    std::thread::sleep(Duration::from_millis(1100));
    let next = dir.join("next-ca");
    let status = Command::new(ferry_tests::bin_path("ferry-ca")?)
        .args(["bootstrap", "--trust-domain", "cluster.local", "--out"])
        .arg(&next)
        .output()?;
    ensure!(
        status.status.success(),
        "bootstrap: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let both = [
        std::fs::read_to_string(&setup.ca.trust_bundle)?,
        std::fs::read_to_string(next.join("ca.crt"))?,
    ]
    .concat();
    std::fs::write(&setup.ca.trust_bundle, &both)?;
    for file in ["tls.crt", "tls.key"] {
        std::fs::copy(
            next.join("issuer").join(file),
            setup.ca.issuer_dir.join(file),
        )?;
    }
    let new_issuer = der_of_pem(&next.join("issuer/tls.crt"))?;
    ensure!(before.intermediates_der[0] != new_issuer);

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let response =
            certify(&setup, &setup.ca.trust_bundle, good()?)?.map_err(anyhow::Error::msg)?;
        if response.intermediates_der[0] == new_issuer {
            break response;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the CA still signs with the old issuer"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        after.trust_bundle_der.len() == 2,
        "the bundle should carry both roots"
    );
    let new_expiry = not_after(&next.join("issuer/tls.crt"))?;
    ensure!(new_expiry != old_expiry);
    let shown = issuer_expiry_metric(&setup)?;
    ensure!(
        shown == new_expiry,
        "after the rotation the issuer expiry metric says {shown}, the new issuer {new_expiry}"
    );
    openssl_verifies(
        &after.leaf_der,
        &setup.ca.trust_bundle,
        &next.join("issuer/tls.crt"),
        &dir,
    )?;

    // A corrupt replacement: refused, and the current issuer keeps signing.
    std::fs::write(
        setup.ca.issuer_dir.join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if metrics(&setup)?.contains("ferry_ca_issuer_reload_failures_total 1") {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the corrupt issuer was not noticed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let still = certify(&setup, &setup.ca.trust_bundle, good()?)?.map_err(anyhow::Error::msg)?;
    ensure!(
        still.intermediates_der[0] == new_issuer,
        "after a corrupt replacement the CA must keep its current issuer"
    );
    openssl_verifies(
        &still.leaf_der,
        &setup.ca.trust_bundle,
        &next.join("issuer/tls.crt"),
        &dir,
    )?;
    Ok(())
}

/// The API server rotates its signing key: the new key is published beside
/// the old one, then the old one is dropped. A running CA follows the JWKS
/// file, and a broken replacement leaves the keys in use.
#[test]
fn a_rotated_token_key_is_followed_without_a_restart() -> anyhow::Result<()> {
    let setup = setup("ca-jwks")?;
    let node = setup.cluster.node(setup.n1).name.clone();
    let old = Minter::generate(ferry_tests::ca::TOKEN_ISSUER).map_err(anyhow::Error::msg)?;
    let new = Minter::generate(ferry_tests::ca::TOKEN_ISSUER).map_err(anyhow::Error::msg)?;
    let signed_by = |minter: &Minter| -> anyhow::Result<CertifyRequest> {
        let token = minter
            .mint(&CaFixture::agent_request(&node))
            .map_err(anyhow::Error::msg)?;
        Ok(CertifyRequest {
            token,
            ..request(&setup, API, csr(&p256(), &[API]))?
        })
    };
    let send = |request: CertifyRequest| certify(&setup, &setup.ca.trust_bundle, request);
    let jwks_of = |minters: &[&Minter]| {
        let keys: Vec<_> = minters.iter().flat_map(|m| m.jwks().keys).collect();
        serde_json::json!({ "keys": keys }).to_string()
    };
    let until = |what: &str, done: &dyn Fn() -> anyhow::Result<bool>| -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done()? {
            ensure!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    };

    refused(
        send(signed_by(&new)?)?,
        &["Unauthenticated", "does not verify with any trusted key"],
    )?;
    // The fixture's own minter signed the keys the CA started with.
    std::fs::write(&setup.ca.jwks, jwks_of(&[&setup.ca.minter, &old, &new]))?;
    until("the CA did not take the new keys", &|| {
        Ok(metrics(&setup)?.contains("ferry_ca_jwks_keys 3"))
    })?;
    send(signed_by(&new)?)?.map_err(anyhow::Error::msg)?;
    send(signed_by(&old)?)?.map_err(anyhow::Error::msg)?;

    std::fs::write(&setup.ca.jwks, jwks_of(&[&new]))?;
    until("the CA did not drop the old keys", &|| {
        Ok(metrics(&setup)?.contains("ferry_ca_jwks_keys 1"))
    })?;
    refused(send(signed_by(&old)?)?, &["does not verify"])?;

    std::fs::write(
        &setup.ca.jwks,
        "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}",
    )?;
    until("the broken JWKS was not noticed", &|| {
        Ok(metrics(&setup)?.contains("ferry_ca_jwks_reload_failures_total 1"))
    })?;
    send(signed_by(&new)?)?.map_err(anyhow::Error::msg)?;
    Ok(())
}

#[test]
fn in_a_cluster_tokens_are_reviewed_by_the_api_server_and_pods_watched() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("ca-kubernetes")?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    cluster.add_pod(n1, PodOptions::meshed("api-0", "shop", "api"))?;
    cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let ca = cluster.start_ca_with(&ferry_tests::ca::CaOptions {
        kubernetes: true,
        ..Default::default()
    })?;
    let setup = Setup { cluster, ca, n1 };
    let bundle = setup.ca.trust_bundle.clone();
    let api = setup.ca.api.as_ref().context("no fake API server")?;

    let issued = certify(&setup, &bundle, request(&setup, API, csr(&p256(), &[API]))?)?
        .map_err(anyhow::Error::msg)?;
    ensure!(!issued.leaf_der.is_empty());

    let unknown = CertifyRequest {
        token: "a-token-the-api-server-never-issued".to_owned(),
        ..request(&setup, API, csr(&p256(), &[API]))?
    };
    refused(
        certify(&setup, &bundle, unknown)?,
        &["Unauthenticated", "invalid bearer token"],
    )?;

    api.add_token(
        "unbound-token",
        ferry_tests::kube_api::TokenOwner {
            username: "system:serviceaccount:ferry-system:ferry-agent".to_owned(),
            node: None,
            pod: None,
            audiences: vec!["ferry-ca".to_owned()],
        },
    );
    let unbound = CertifyRequest {
        token: "unbound-token".to_owned(),
        ..request(&setup, API, csr(&p256(), &[API]))?
    };
    refused(
        certify(&setup, &bundle, unbound)?,
        &["Unauthenticated", "not bound to a node"],
    )?;

    refused(
        certify(&setup, &bundle, request(&setup, DB, csr(&p256(), &[DB]))?)?,
        &["PermissionDenied", "no pod with ServiceAccount shop/db"],
    )?;
    Ok(())
}
