//! How many certificates the CA signs per second of its own CPU: a real
//! `ferry-ca` on a simulated cluster, driven over TLS and gRPC by the
//! agent's own CA client with many requests in flight, each carrying a real
//! token and a fresh P-256 CSR. The CA's CPU time comes from
//! `/proc/<pid>/stat`, so the figure is per core and barely moves when the
//! client shares the machine.
//!
//! Given several `ferry-ca` binaries (one built on ring, one on aws-lc-rs,
//! say) it runs them in turn, the order rotating per round.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use ferry_agent::identity::Certifier as _;
use ferry_proto::identity::v1::CertifyRequest;
use rcgen::{CertificateParams, KeyPair, SanType, string::Ia5String};

use crate::{
    Cluster, NodeId, PodOptions,
    ca::{CaFixture, CaOptions, ca_client},
    inspect::cpu_seconds,
    netns,
};

const IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/api";
/// Requests in flight at once (an agent renewing many identities, or many
/// agents after a CA restart).
const IN_FLIGHT: usize = 16;
/// Distinct CSRs sent in turn; the CA checks each in full every time.
const CSRS: usize = 64;

/// One binary's run.
#[derive(Debug, Clone)]
pub struct IssuanceRun {
    pub binary: PathBuf,
    pub issued: u64,
    pub seconds: f64,
    /// The CA's user + system CPU time during the run.
    pub cpu_seconds: f64,
}

impl IssuanceRun {
    pub fn per_second(&self) -> f64 {
        self.issued as f64 / self.seconds
    }

    /// Certificates per second of one core fully used by the CA.
    pub fn per_cpu_second(&self) -> f64 {
        self.issued as f64 / self.cpu_seconds
    }
}

/// Runs each binary `rounds` times for `seconds`; one list per round.
pub fn compare(
    binaries: &[PathBuf],
    rounds: usize,
    seconds: f64,
) -> anyhow::Result<Vec<Vec<IssuanceRun>>> {
    let mut cluster = Cluster::new("bench-issuance")?;
    let node = cluster.add_node()?;
    cluster.add_pod(node, PodOptions::meshed("api-0", "shop", "api"))?;
    let csrs = (0..CSRS)
        .map(|_| csr())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut all = Vec::new();
    for round in 0..rounds {
        let mut runs = Vec::new();
        for k in 0..binaries.len() {
            let binary = &binaries[(round + k) % binaries.len()];
            runs.push(run(&mut cluster, node, binary, &csrs, seconds)?);
        }
        all.push(runs);
    }
    Ok(all)
}

fn run(
    cluster: &mut Cluster,
    node: NodeId,
    binary: &Path,
    csrs: &[Vec<u8>],
    seconds: f64,
) -> anyhow::Result<IssuanceRun> {
    let mut ca = cluster.start_ca_with(&CaOptions {
        binary: Some(binary.to_owned()),
        ..CaOptions::default()
    })?;
    let result = measure(cluster, node, &ca, csrs, seconds);
    ca.proc.kill();
    let (issued, elapsed, cpu) = result.with_context(|| binary.display().to_string())?;
    Ok(IssuanceRun {
        binary: binary.to_owned(),
        issued,
        seconds: elapsed,
        cpu_seconds: cpu,
    })
}

/// Certificates issued, seconds, and the CA's CPU seconds.
fn measure(
    cluster: &Cluster,
    node: NodeId,
    ca: &CaFixture,
    csrs: &[Vec<u8>],
    seconds: f64,
) -> anyhow::Result<(u64, f64, f64)> {
    let token = ca.agent_token(&cluster.node(node).name)?;
    let requests: Arc<Vec<CertifyRequest>> = Arc::new(
        csrs.iter()
            .map(|csr| CertifyRequest {
                identity: IDENTITY.to_owned(),
                csr_der: csr.clone(),
                token: token.clone(),
            })
            .collect(),
    );
    // One request each first, so the connection and the CA's caches are warm.
    drive(cluster, ca, &requests, Duration::ZERO)?;
    let cpu_before = cpu_seconds(ca.proc.pid())?;
    let started = Instant::now();
    let issued = drive(cluster, ca, &requests, Duration::from_secs_f64(seconds))?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(ca.proc.pid())? - cpu_before;
    ensure!(issued > 0 && cpu > 0.0, "nothing issued");
    Ok((issued, elapsed, cpu))
}

/// Keeps [`IN_FLIGHT`] requests going for `duration` (at least one each);
/// every answer must be a certificate.
fn drive(
    cluster: &Cluster,
    ca: &CaFixture,
    requests: &Arc<Vec<CertifyRequest>>,
    duration: Duration,
) -> anyhow::Result<u64> {
    let (addr, bundle) = (ca.addr, &ca.trust_bundle);
    netns::block_on_in(cluster.fabric_netns(), || async {
        let client = ca_client(addr, bundle)?;
        let until = Instant::now() + duration;
        let mut tasks = Vec::new();
        for worker in 0..IN_FLIGHT {
            let (client, requests) = (client.clone(), Arc::clone(requests));
            tasks.push(tokio::spawn(async move {
                let mut issued = 0u64;
                loop {
                    let request = requests[(worker + issued as usize) % requests.len()].clone();
                    client
                        .certify(request)
                        .await
                        .map_err(|e| anyhow::anyhow!("certify: {e}"))?;
                    issued += 1;
                    if Instant::now() >= until {
                        return anyhow::Ok(issued);
                    }
                }
            }));
        }
        let mut issued = 0;
        for task in tasks {
            issued += task.await??;
        }
        Ok(issued)
    })
}

fn csr() -> anyhow::Result<Vec<u8>> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(IDENTITY)?)];
    Ok(params.serialize_request(&key)?.der().to_vec())
}
