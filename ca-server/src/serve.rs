//! `ferry-ca serve`: gRPC over TLS, with the issuer reloaded from its files
//! when they change, and metrics on a separate (local) address.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use ferry_proto::{Untrusted, identity::v1::identity_server::IdentityServer};
use rcgen::KeyPair;
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::PrivateKeyDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{
    issuer::{Issuer, LeafPolicy},
    metrics::Metrics,
    service::{Authenticator, Ca, MAX_REQUEST_BYTES, Pods},
};

/// How often the issuer files are checked for a replacement.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ServeConfig {
    pub listen: SocketAddr,
    pub issuer_dir: PathBuf,
    pub trust_bundle: PathBuf,
    pub trust_domain: String,
    pub server_names: Vec<String>,
    pub policy: LeafPolicy,
    pub allowed_agents: Vec<String>,
    pub authenticator: Authenticator,
    pub pods: Pods,
    pub metrics_addr: SocketAddr,
}

pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let issuer = Arc::new(
        Issuer::load(&config.issuer_dir, &config.trust_bundle).map_err(anyhow::Error::msg)?,
    );
    let metrics = Arc::new(Metrics::default());
    metrics.issuer_expires_at(issuer.not_after.unix_timestamp());
    let serving = Arc::new(ServingCert::new(&issuer, &config.server_names)?);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let metrics_listener = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {} for metrics", config.metrics_addr))?;
    tracing::info!(
        addr = %config.listen,
        metrics = %config.metrics_addr,
        issuer = %issuer.label,
        roots = issuer.roots.len(),
        trust_domain = %config.trust_domain,
        "serving Certify"
    );

    let shared_issuer = Arc::new(RwLock::new(Arc::clone(&issuer)));
    tokio::spawn(reload_issuer(
        config.issuer_dir.clone(),
        config.trust_bundle.clone(),
        Arc::clone(&shared_issuer),
        Arc::clone(&serving),
        config.server_names.clone(),
        Arc::clone(&metrics),
    ));
    if let Authenticator::Jwks(keys) = &config.authenticator {
        tokio::spawn(crate::jwks::watch(Arc::clone(keys), Arc::clone(&metrics)));
    }
    tokio::spawn(crate::metrics_http::serve(
        metrics_listener,
        Arc::clone(&metrics),
    ));

    let ca = Ca {
        issuer: shared_issuer,
        authenticator: config.authenticator,
        pods: config.pods,
        trust_domain: config.trust_domain,
        allowed_agents: config.allowed_agents,
        policy: config.policy,
        metrics,
    };
    let mut tls = ServerConfig::builder_with_provider(ferry_proto::crypto::shared_provider(
        ferry_proto::crypto::KeyExchange::PostQuantum,
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_cert_resolver(serving);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let incoming = tls_incoming(listener, TlsAcceptor::from(Arc::new(tls)));
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(ca).max_decoding_message_size(MAX_REQUEST_BYTES))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await
        .context("the gRPC server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Accepted TLS connections; a client that fails its handshake is logged
/// and dropped without disturbing the others.
/// An agent's TLS connection to the CA, and what each of its requests
/// learns of it ([`ConnectInfo`]).
pub struct CaConnection {
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    info: ConnectInfo,
}

/// Where a request came from and how its connection was secured: tonic
/// puts it in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    pub peer: SocketAddr,
    /// The TLS key exchange group (`X25519MLKEM768`: post-quantum).
    pub key_exchange: &'static str,
}

impl tonic::transport::server::Connected for CaConnection {
    type ConnectInfo = ConnectInfo;

    fn connect_info(&self) -> ConnectInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for CaConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CaConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> tokio_stream::wrappers::ReceiverStream<Result<CaConnection, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // gRPC answers are small writes: without this, Nagle and delayed
            // ACKs add ~40 ms to every call.
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let key_exchange = ferry_proto::crypto::negotiated_group(tls.get_ref().1);
                        let info = ConnectInfo { peer, key_exchange };
                        let _ = tx.send(Ok(CaConnection { tls, info })).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%peer, error = %Untrusted(&error), "TLS handshake failed")
                    }
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The CA's own serving certificate, re-issued whenever the issuer changes.
#[derive(Debug)]
struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingCert {
    fn new(issuer: &Issuer, names: &[String]) -> anyhow::Result<Self> {
        Ok(Self {
            current: RwLock::new(Arc::new(serving_key(issuer, names)?)),
        })
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().expect("serving cert lock")))
    }
}

fn serving_key(issuer: &Issuer, names: &[String]) -> anyhow::Result<CertifiedKey> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = issuer
        .sign_server(names, &key)
        .map_err(anyhow::Error::msg)?;
    let private = PrivateKeyDer::try_from(key.serialize_der()).map_err(anyhow::Error::msg)?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&private)
        .context("the serving key is not usable")?;
    Ok(CertifiedKey::new(
        vec![cert, issuer.cert_der.clone()],
        signing,
    ))
}

/// Checks the issuer files every [`RELOAD_INTERVAL`]; a changed, valid pair
/// replaces the issuer, a changed, invalid one is refused and logged.
async fn reload_issuer(
    dir: PathBuf,
    bundle: PathBuf,
    issuer: Arc<RwLock<Arc<Issuer>>>,
    serving: Arc<ServingCert>,
    names: Vec<String>,
    metrics: Arc<Metrics>,
) {
    let files = [
        dir.join(crate::issuer::ISSUER_CERT_FILE),
        dir.join(crate::issuer::ISSUER_KEY_FILE),
        bundle.clone(),
    ];
    let fingerprint = || -> Vec<u8> {
        files
            .iter()
            .flat_map(|f| std::fs::read(f).unwrap_or_default())
            .collect()
    };
    let mut seen = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &fingerprint());
    loop {
        tokio::time::sleep(RELOAD_INTERVAL).await;
        let now = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &fingerprint());
        if now.as_ref() == seen.as_ref() {
            continue;
        }
        seen = now;
        let old = issuer.read().expect("issuer lock").label.clone();
        match Issuer::load(&dir, &bundle).and_then(|new| {
            let key = serving_key(&new, &names).map_err(|e| format!("{e:#}"))?;
            Ok((new, key))
        }) {
            Ok((new, key)) => {
                tracing::info!(old = %old, new = %new.label, roots = new.roots.len(), "issuer reloaded");
                metrics.issuer_expires_at(new.not_after.unix_timestamp());
                *issuer.write().expect("issuer lock") = Arc::new(new);
                *serving.current.write().expect("serving cert lock") = Arc::new(key);
            }
            Err(error) => {
                metrics.issuer_reload_failed();
                tracing::error!(%error, keeping = %old, "refused the replacement issuer files; the old issuer stays in use");
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
