//! The certificate manager: keeps a valid certificate for every identity the
//! node's pods run as, and publishes each one (validated first) through a
//! `watch`, so new TLS handshakes use the newest and live ones are untouched.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ferry_proto::{SpiffeId, Untrusted, identity::v1::CertifyRequest};
use rcgen::{CertificateParams, KeyPair, PublicKeyData as _, SanType, string::Ia5String};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    CertIdentityError, Certifier, CertifyError,
    ca_client::read_roots,
    identity_of,
    metrics::{CaResult, IdentityMetrics},
    renewal, tls,
};
use crate::{
    backoff::{Backoff, jitter_sample},
    workload::WorkloadTable,
};

/// How long one attempt to get a certificate may take.
pub const CERTIFY_TIMEOUT: Duration = Duration::from_secs(15);
/// Backoff while the CA fails: from 1 s up to 5 min.
pub const CA_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub trust_domain: String,
    /// PEM roots every certificate must chain to; re-read at each renewal.
    pub trust_bundle: PathBuf,
    /// The agent's own ServiceAccount token (audience ferry-ca); re-read at each request.
    pub token_file: PathBuf,
    pub backoff: Backoff,
    /// The crypto every certificate's TLS configs are built with.
    pub provider: Arc<CryptoProvider>,
}

/// Why one attempt to get a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum ObtainError {
    #[error("cannot read the agent's token {}: {source}", path.display())]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    UriSan(rcgen::Error),
    #[error("cannot make a CSR: {0}")]
    Csr(rcgen::Error),
    #[error(transparent)]
    Certify(#[from] CertifyError),
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    TrustBundle(std::io::Error),
    #[error(transparent)]
    Invalid(#[from] InvalidCertificate),
}

/// Why a certificate from the CA was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum InvalidCertificate {
    #[error("the CA's certificate does not parse: {0}")]
    Parse(webpki::Error),
    #[error("the CA's certificate does not verify against the trust bundle: {0}")]
    Untrusted(webpki::Error),
    #[error(transparent)]
    Identity(#[from] CertIdentityError),
    #[error("the CA's certificate is for {presented}, not {expected}")]
    WrongIdentity {
        presented: Box<SpiffeId>,
        expected: Box<SpiffeId>,
    },
    #[error(transparent)]
    X509(x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("the CA's certificate is not for this identity's key")]
    WrongKey,
    #[error("{0}")]
    KeyEncoding(&'static str),
    #[error("the identity's key is not usable for TLS: {0}")]
    UnusableKey(rustls::Error),
    #[error("cannot build the tunnel's TLS configs with the certificate: {0}")]
    TlsConfig(rustls::Error),
}

/// A certificate that passed every check, with the TLS configs it is used
/// in, built once when it was accepted.
#[derive(Debug)]
pub struct Issued {
    pub identity: SpiffeId,
    pub certified_key: Arc<CertifiedKey>,
    /// The roots peers must chain to, as of this certificate.
    pub roots: Arc<RootCertStore>,
    /// Dials tunnels as this identity, expecting the identity SNI names.
    pub client_config: Arc<ClientConfig>,
    /// Accepts tunnels for this identity, verifying the client's chain.
    pub server_config: Arc<ServerConfig>,
    pub leaf_pem: String,
    pub serial: String,
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// One identity's certificate, as `/certs` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertView {
    pub identity: String,
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before_unix: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after_unix: Option<u64>,
    /// When the next attempt (renewal or retry) is due.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_in_secs: Option<u64>,
    pub issued: u64,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaf_pem: Option<String>,
}

/// One identity the manager keeps certified.
struct Slot {
    current: watch::Sender<Option<Arc<Issued>>>,
    status: Mutex<Status>,
    task: tokio::task::AbortHandle,
}

#[derive(Default)]
struct Status {
    next_attempt: Option<tokio::time::Instant>,
    issued: u64,
    failures: u32,
    last_error: Option<String>,
}

pub struct CertManager<C> {
    config: IdentityConfig,
    certifier: Arc<C>,
    slots: Mutex<BTreeMap<SpiffeId, Arc<Slot>>>,
    metrics: Arc<IdentityMetrics>,
}

impl<C: Certifier> CertManager<C> {
    pub fn new(config: IdentityConfig, certifier: C, metrics: Arc<IdentityMetrics>) -> Arc<Self> {
        Arc::new(Self {
            config,
            certifier: Arc::new(certifier),
            slots: Mutex::default(),
            metrics,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    /// Keeps the identities in step with the ServiceAccounts of this node's
    /// meshed pods as the workload table changes.
    pub fn follow(self: &Arc<Self>, mut tables: watch::Receiver<Arc<WorkloadTable>>) {
        let manager = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let table = tables.borrow_and_update().clone();
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                manager.set_identities(&local_identities(&table, manager.trust_domain()));
                drop(manager);
                if tables.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Keeps exactly `wanted` certified: starts the new ones, and drops the
    /// keys and certificates of the ones no pod on this node runs as anymore.
    pub fn set_identities(self: &Arc<Self>, wanted: &BTreeSet<SpiffeId>) {
        let mut slots = self.slots.lock().expect("cert slots lock");
        slots.retain(|identity, slot| {
            let keep = wanted.contains(identity);
            if !keep {
                slot.task.abort();
                self.metrics.certificate_dropped(identity);
                tracing::info!(%identity, "no pod on this node runs as this identity anymore; dropped its key");
            }
            keep
        });
        for identity in wanted {
            if slots.contains_key(identity) {
                continue;
            }
            let (current, _) = watch::channel(None);
            let manager = Arc::downgrade(self);
            let slot = Arc::new_cyclic(|weak: &Weak<Slot>| {
                let task = tokio::spawn(keep_certified(manager, weak.clone(), identity.clone()));
                Slot {
                    current,
                    status: Mutex::default(),
                    task: task.abort_handle(),
                }
            });
            tracing::info!(%identity, "new identity on this node; getting a certificate");
            slots.insert(identity.clone(), slot);
        }
    }

    /// The current certificate of `identity`, if it has one.
    pub fn current(&self, identity: &SpiffeId) -> Option<Arc<Issued>> {
        let slots = self.slots.lock().expect("cert slots lock");
        slots.get(identity)?.current.borrow().clone()
    }

    /// Why the agent cannot serve yet: identities still without a valid certificate.
    pub fn not_ready(&self) -> Vec<String> {
        let now = SystemTime::now();
        let slots = self.slots.lock().expect("cert slots lock");
        slots
            .iter()
            .filter(|(_, slot)| {
                slot.current
                    .borrow()
                    .as_ref()
                    .is_none_or(|issued| issued.not_after <= now)
            })
            .map(|(identity, slot)| {
                let status = slot.status.lock().expect("cert status lock");
                match &status.last_error {
                    Some(error) => format!("no certificate yet for {identity}: {error}"),
                    None => format!("no certificate yet for {identity}"),
                }
            })
            .collect()
    }

    pub fn view(&self) -> Vec<CertView> {
        let now = tokio::time::Instant::now();
        let slots = self.slots.lock().expect("cert slots lock");
        slots
            .iter()
            .map(|(identity, slot)| {
                let current = slot.current.borrow().clone();
                let status = slot.status.lock().expect("cert status lock");
                CertView {
                    identity: identity.to_string(),
                    ready: current.is_some(),
                    serial: current.as_ref().map(|c| c.serial.clone()),
                    issuer: current.as_ref().map(|c| c.issuer.clone()),
                    not_before_unix: current.as_ref().map(|c| unix(c.not_before)),
                    not_after_unix: current.as_ref().map(|c| unix(c.not_after)),
                    next_attempt_in_secs: status
                        .next_attempt
                        .map(|at| at.saturating_duration_since(now).as_secs()),
                    issued: status.issued,
                    consecutive_failures: status.failures,
                    last_error: status.last_error.clone(),
                    leaf_pem: current.as_ref().map(|c| c.leaf_pem.clone()),
                }
            })
            .collect()
    }

    /// One attempt: a CSR with this identity's key, `Certify`, and the checks.
    async fn obtain(&self, identity: &SpiffeId, key: &KeyPair) -> Result<Issued, ObtainError> {
        let token = std::fs::read_to_string(&self.config.token_file).map_err(|source| {
            ObtainError::Token {
                path: self.config.token_file.clone(),
                source,
            }
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(identity.to_string()).map_err(ObtainError::UriSan)?,
        )];
        let csr = params.serialize_request(key).map_err(ObtainError::Csr)?;
        let request = CertifyRequest {
            identity: identity.to_string(),
            csr_der: csr.der().to_vec(),
            token: token.trim().to_owned(),
        };
        let answer = tokio::time::timeout(CERTIFY_TIMEOUT, self.certifier.certify(request)).await;
        self.metrics.ca_request(match &answer {
            Ok(Ok(_)) => CaResult::Ok,
            Ok(Err(_)) => CaResult::Error,
            Err(_) => CaResult::Timeout,
        });
        let response = answer.map_err(|_| ObtainError::Timeout(CERTIFY_TIMEOUT))??;
        let roots = read_roots(&self.config.trust_bundle).map_err(ObtainError::TrustBundle)?;
        Ok(validate(
            &self.config,
            identity,
            key,
            &response.leaf_der,
            &response.intermediates_der,
            roots,
        )?)
    }
}

/// The identities this node's meshed pods run as.
fn local_identities(table: &WorkloadTable, trust_domain: &str) -> BTreeSet<SpiffeId> {
    table
        .local_meshed()
        .filter_map(
            |pod| match SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account) {
                Ok(identity) => Some(identity),
                Err(error) => {
                    tracing::error!(pod = %Untrusted(pod.key()), error = %Untrusted(&error), "pod has no valid identity");
                    None
                }
            },
        )
        .collect()
}

/// Checks a certificate from the CA before anything uses it: it chains to
/// the trust bundle, carries exactly `identity`, holds our key, and is valid
/// now; then builds the TLS configs it will be used in.
fn validate(
    config: &IdentityConfig,
    identity: &SpiffeId,
    key: &KeyPair,
    leaf_der: &[u8],
    intermediates_der: &[Vec<u8>],
    roots: RootCertStore,
) -> Result<Issued, InvalidCertificate> {
    let leaf = CertificateDer::from(leaf_der.to_vec());
    let intermediates: Vec<CertificateDer<'static>> = intermediates_der
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let end_entity = webpki::EndEntityCert::try_from(&leaf).map_err(InvalidCertificate::Parse)?;
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &roots.roots,
                &intermediates,
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .map_err(InvalidCertificate::Untrusted)?;
    }
    let presented = identity_of(&leaf)?;
    if &presented != identity {
        return Err(InvalidCertificate::WrongIdentity {
            presented: Box::new(presented),
            expected: Box::new(identity.clone()),
        });
    }
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&leaf).map_err(InvalidCertificate::X509)?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(InvalidCertificate::WrongKey);
    }
    let validity = parsed.validity();
    let not_before = system_time(validity.not_before.timestamp());
    let not_after = system_time(validity.not_after.timestamp());
    let private =
        PrivateKeyDer::try_from(key.serialize_der()).map_err(InvalidCertificate::KeyEncoding)?;
    let signing = config
        .provider
        .key_provider
        .load_private_key(private)
        .map_err(InvalidCertificate::UnusableKey)?;
    let mut chain = vec![leaf.clone()];
    chain.extend(intermediates);
    let leaf_pem = pem_encode(&leaf);
    let certified_key = Arc::new(CertifiedKey::new(chain, signing));
    let roots = Arc::new(roots);
    let client_config = tls::client_config(
        &config.provider,
        Arc::clone(&certified_key),
        Arc::clone(&roots),
        &config.trust_domain,
    )
    .map_err(InvalidCertificate::TlsConfig)?;
    let server_config = tls::server_config(
        &config.provider,
        Arc::clone(&certified_key),
        Arc::clone(&roots),
    )
    .map_err(InvalidCertificate::TlsConfig)?;
    Ok(Issued {
        identity: identity.clone(),
        certified_key,
        roots,
        client_config: Arc::new(client_config),
        server_config: Arc::new(server_config),
        leaf_pem,
        serial: parsed.raw_serial_as_string().replace(':', ""),
        issuer: parsed.issuer().to_string(),
        not_before,
        not_after,
    })
}

/// Keeps one identity certified until its slot is dropped (the task is aborted).
async fn keep_certified<C: Certifier>(
    manager: Weak<CertManager<C>>,
    slot: Weak<Slot>,
    identity: SpiffeId,
) {
    // Generated here, never written anywhere, dropped with this task.
    let key = match KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256) {
        Ok(key) => key,
        Err(error) => {
            tracing::error!(%identity, %error, "cannot generate a key");
            return;
        }
    };
    let mut failures = 0u32;
    loop {
        let (Some(manager), Some(slot)) = (manager.upgrade(), slot.upgrade()) else {
            return;
        };
        let obtained = manager.obtain(&identity, &key).await;
        manager.metrics.certificate_attempt(obtained.is_ok());
        let wait = match obtained {
            Ok(issued) => {
                failures = 0;
                let wait = renewal::renew_in(
                    issued.not_before,
                    issued.not_after,
                    SystemTime::now(),
                    jitter_sample(),
                );
                tracing::info!(
                    %identity,
                    serial = %issued.serial,
                    not_after = unix(issued.not_after),
                    renew_in = ?wait,
                    "certificate ready"
                );
                {
                    let mut status = slot.status.lock().expect("cert status lock");
                    status.issued += 1;
                    status.failures = 0;
                    status.last_error = None;
                }
                manager
                    .metrics
                    .certificate_published(&identity, issued.not_after);
                slot.current.send_replace(Some(Arc::new(issued)));
                wait
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let wait = manager.config.backoff.delay(failures, jitter_sample());
                let still_valid = slot
                    .current
                    .borrow()
                    .as_ref()
                    .is_some_and(|c| c.not_after > SystemTime::now());
                tracing::warn!(
                    %identity,
                    error = %Untrusted(&error),
                    failures,
                    retry_in = ?wait,
                    serving_old_certificate = still_valid,
                    "could not get a certificate"
                );
                let mut status = slot.status.lock().expect("cert status lock");
                status.failures = failures;
                status.last_error = Some(error.to_string());
                wait
            }
        };
        slot.status.lock().expect("cert status lock").next_attempt =
            Some(tokio::time::Instant::now() + wait);
        drop((manager, slot));
        tokio::time::sleep(wait).await;
    }
}

fn system_time(unix_secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_secs).unwrap_or(0))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn pem_encode(cert: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use ferry_ca::issuer::{Issuer, LeafPolicy};
    use ferry_proto::identity::v1::CertifyResponse;

    use super::*;

    const LIFETIME: Duration = Duration::from_secs(3600);

    /// The real CA's signing code in-process, with switches to fail or misbehave.
    struct TestCa {
        issuer: Issuer,
        calls: AtomicUsize,
        called_at: Mutex<Vec<tokio::time::Instant>>,
        issued_at: Mutex<Vec<tokio::time::Instant>>,
        down: AtomicBool,
        /// Sign for another identity than the one asked for.
        wrong_identity: AtomicBool,
    }

    impl Certifier for Arc<TestCa> {
        async fn certify(&self, request: CertifyRequest) -> Result<CertifyResponse, CertifyError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.called_at
                .lock()
                .unwrap()
                .push(tokio::time::Instant::now());
            let refused = |code, message: String| CertifyError { code, message };
            if self.down.load(Ordering::SeqCst) {
                return Err(refused(
                    tonic::Code::Unavailable,
                    "connection refused".to_owned(),
                ));
            }
            let invalid =
                |e: &dyn std::fmt::Display| refused(tonic::Code::InvalidArgument, e.to_string());
            let mut identity: SpiffeId = request.identity.parse().map_err(|e| invalid(&e))?;
            let checked =
                ferry_ca::csr::check(&request.csr_der, &identity).map_err(|e| invalid(&e))?;
            if self.wrong_identity.load(Ordering::SeqCst) {
                identity =
                    SpiffeId::new(identity.trust_domain(), identity.namespace(), "admin").unwrap();
            }
            let leaf = self
                .issuer
                .sign_leaf(
                    &identity,
                    &checked.spki_der,
                    LeafPolicy {
                        lifetime: LIFETIME,
                        clock_skew: Duration::ZERO,
                    },
                )
                .map_err(|e| refused(tonic::Code::Internal, e))?;
            self.issued_at
                .lock()
                .unwrap()
                .push(tokio::time::Instant::now());
            Ok(CertifyResponse {
                leaf_der: leaf.der.to_vec(),
                intermediates_der: vec![self.issuer.cert_der.to_vec()],
                trust_bundle_der: self.issuer.roots.iter().map(|r| r.to_vec()).collect(),
                valid_until_unix: leaf.not_after.unix_timestamp(),
            })
        }
    }

    struct Setup {
        ca: Arc<TestCa>,
        manager: Arc<CertManager<Arc<TestCa>>>,
        metrics: crate::metrics::Metrics,
        _dir: TempDir,
    }

    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn setup() -> Setup {
        let dir = std::env::temp_dir().join(format!(
            "ferry-certmanager-{}-{}",
            std::process::id(),
            jitter_sample().to_bits()
        ));
        let written = ferry_ca::bootstrap::bootstrap(
            &dir,
            "cluster.local",
            Duration::from_secs(10 * 86400),
            Duration::from_secs(5 * 86400),
        )
        .unwrap();
        let issuer = Issuer::load(&written.issuer_dir, &written.trust_bundle).unwrap();
        std::fs::write(dir.join("token"), "a-token\n").unwrap();
        let ca = Arc::new(TestCa {
            issuer,
            calls: AtomicUsize::new(0),
            called_at: Mutex::default(),
            issued_at: Mutex::default(),
            down: AtomicBool::new(false),
            wrong_identity: AtomicBool::new(false),
        });
        let metrics = crate::metrics::Metrics::default();
        let manager = CertManager::new(
            IdentityConfig {
                trust_domain: "cluster.local".to_owned(),
                trust_bundle: written.trust_bundle,
                token_file: dir.join("token"),
                backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
                provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            },
            Arc::clone(&ca),
            Arc::clone(&metrics.identity),
        );
        Setup {
            ca,
            manager,
            metrics,
            _dir: TempDir(dir),
        }
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).unwrap()
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    /// Advances paused time in small steps, letting tasks run in between.
    async fn advance(by: Duration) {
        let step = Duration::from_secs(1);
        let mut left = by;
        while left > Duration::ZERO {
            let now = left.min(step);
            tokio::time::advance(now).await;
            settle().await;
            left -= now;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn certifies_each_identity_and_renews_near_half_life() {
        let Setup {
            ca,
            manager,
            metrics,
            _dir,
        } = setup();
        assert_eq!(manager.not_ready().len(), 0);
        manager.set_identities(&[id("api"), id("web")].into());
        settle().await;
        for sa in ["api", "web"] {
            let issued = manager
                .current(&id(sa))
                .unwrap_or_else(|| panic!("not certified: {:?}", manager.view()));
            assert_eq!(issued.identity, id(sa));
            assert_eq!(issued.certified_key.cert.len(), 2, "leaf and issuer");
        }
        assert!(manager.not_ready().is_empty(), "{:?}", manager.not_ready());

        advance(LIFETIME / 2 + Duration::from_secs(5)).await;
        let issued_at = ca.issued_at.lock().unwrap().clone();
        assert_eq!(
            issued_at.len(),
            4,
            "one renewal each within half the lifetime"
        );
        let first = issued_at[0];
        for renewal in &issued_at[2..] {
            let after = *renewal - first;
            assert!(
                after >= LIFETIME.mul_f64(0.4) - Duration::from_secs(2)
                    && after <= LIFETIME / 2 + Duration::from_secs(2),
                "renewed {after:?} after issuance"
            );
        }
        let text = metrics.render();
        assert!(
            text.contains("ferry_certificate_renewals_total{result=\"ok\"} 4")
                && text.contains("ferry_ca_requests_total{result=\"ok\"} 4"),
            "{text}"
        );
        let not_after = unix(manager.current(&id("web")).unwrap().not_after);
        assert!(
            text.contains(&format!(
                "ferry_certificate_expiry_timestamp_seconds{{identity=\"spiffe://cluster.local/ns/shop/sa/web\"}} {not_after}"
            )),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_while_the_ca_is_down_and_keeps_the_old_certificate() {
        let Setup {
            ca,
            manager,
            metrics,
            _dir,
        } = setup();
        manager.set_identities(&[id("api")].into());
        settle().await;
        let first = manager.current(&id("api")).unwrap();
        ca.down.store(true, Ordering::SeqCst);
        let calls_before = ca.calls.load(Ordering::SeqCst);
        // Past the renewal time: retries begin, backing off.
        advance(LIFETIME / 2 + Duration::from_secs(60)).await;
        let retries = ca.calls.load(Ordering::SeqCst) - calls_before;
        assert!(retries >= 3, "{retries} retries");
        // The waits between retries grow: 1 s doubling, jitter in the upper half.
        let called_at = ca.called_at.lock().unwrap().clone();
        let gaps: Vec<Duration> = called_at[calls_before..]
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .collect();
        for (i, gap) in gaps.iter().enumerate() {
            // Time advances in 1 s steps here, hence the second of slack.
            let ceiling = Duration::from_secs(1 << i.min(6)).min(Duration::from_secs(60));
            assert!(
                *gap + Duration::from_secs(1) >= ceiling / 2
                    && *gap <= ceiling + Duration::from_secs(1),
                "retry gaps {gaps:?}"
            );
        }
        let still = manager.current(&id("api")).unwrap();
        assert!(
            Arc::ptr_eq(&first, &still),
            "the valid certificate must keep serving"
        );
        let view = manager.view();
        assert!(
            view[0]
                .last_error
                .as_deref()
                .unwrap()
                .contains("connection refused")
        );
        assert!(view[0].consecutive_failures >= 3);
        let text = metrics.render();
        assert!(
            text.contains(&format!(
                "ferry_ca_requests_total{{result=\"error\"}} {retries}"
            )) && text.contains(&format!(
                "ferry_certificate_renewals_total{{result=\"error\"}} {retries}"
            )),
            "{retries} retries: {text}"
        );

        ca.down.store(false, Ordering::SeqCst);
        advance(Duration::from_secs(120)).await;
        let renewed = manager.current(&id("api")).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &renewed),
            "renewed once the CA is back"
        );
        assert_eq!(manager.view()[0].consecutive_failures, 0);
    }

    /// A TLS handshake between `client`'s client config, asking for
    /// `server_name`, and `server`'s server config, over an in-memory pipe.
    async fn handshake(
        client: &Issued,
        server: &Issued,
        server_name: &str,
    ) -> Result<(), std::io::Error> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&server.server_config));
        let accepting = tokio::spawn(async move { acceptor.accept(server_io).await.map(drop) });
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .expect("a valid server name");
        let connected = tokio_rustls::TlsConnector::from(Arc::clone(&client.client_config))
            .connect(name, client_io)
            .await
            .map(drop);
        let _ = accepting.await;
        connected
    }

    #[tokio::test]
    async fn a_client_config_accepts_only_the_identity_its_server_name_asks_for() {
        let Setup { manager, _dir, .. } = setup();
        manager.set_identities(&[id("api"), id("web")].into());
        for _ in 0..100 {
            if manager.not_ready().is_empty() && manager.current(&id("web")).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let api = manager.current(&id("api")).expect("api certified");
        let web = manager.current(&id("web")).expect("web certified");
        handshake(&api, &web, &id("web").sni())
            .await
            .expect("the identity the server name asks for is accepted");
        let other = handshake(&api, &web, &id("db").sni())
            .await
            .expect_err("a server presenting web for a request for db is refused")
            .to_string();
        assert!(
            other.contains("peer presented spiffe://cluster.local/ns/shop/sa/web, expected spiffe://cluster.local/ns/shop/sa/db"),
            "{other}"
        );
        let name = handshake(&api, &web, "web.example.com")
            .await
            .expect_err("a server name that names no identity is refused")
            .to_string();
        assert!(name.contains("names no workload identity"), "{name}");
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_a_certificate_for_another_identity() {
        let Setup {
            ca, manager, _dir, ..
        } = setup();
        ca.wrong_identity.store(true, Ordering::SeqCst);
        manager.set_identities(&[id("api")].into());
        settle().await;
        assert!(manager.current(&id("api")).is_none());
        let reasons = manager.not_ready();
        assert_eq!(reasons.len(), 1);
        assert!(
            reasons[0].contains("is for spiffe://cluster.local/ns/shop/sa/admin"),
            "{reasons:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drops_an_identity_whose_last_pod_left() {
        let Setup {
            ca,
            manager,
            metrics,
            _dir,
        } = setup();
        manager.set_identities(&[id("api"), id("web")].into());
        settle().await;
        manager.set_identities(&[id("web")].into());
        settle().await;
        assert!(manager.current(&id("api")).is_none());
        assert!(manager.current(&id("web")).is_some());
        let text = metrics.render();
        assert!(
            !text.contains("sa/api") && text.contains("sa/web"),
            "the expiry series must follow the identities: {text}"
        );
        let calls = ca.calls.load(Ordering::SeqCst);
        advance(LIFETIME).await;
        // Only web renews (twice in a lifetime at most).
        let renewals = ca.calls.load(Ordering::SeqCst) - calls;
        assert!((1..=3).contains(&renewals), "{renewals}");
        assert_eq!(manager.view().len(), 1);
    }

    #[test]
    fn validation_refuses_a_chain_from_another_ca() {
        let Setup { manager, _dir, .. } = setup();
        let other = setup();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = other
            .ca
            .issuer
            .sign_leaf(
                &id("api"),
                &key.subject_public_key_info(),
                LeafPolicy {
                    lifetime: LIFETIME,
                    clock_skew: Duration::ZERO,
                },
            )
            .unwrap();
        let roots = read_roots(Path::new(&manager.config.trust_bundle)).unwrap();
        let error = validate(
            &manager.config,
            &id("api"),
            &key,
            &leaf.der,
            &[other.ca.issuer.cert_der.to_vec()],
            roots,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("does not verify against the trust bundle"),
            "{error}"
        );
    }
}
