//! The Ferry CA on a simulated cluster: bootstrapped into the cluster's
//! temporary directory, trusting a token key the fixture holds (it mints
//! agent tokens the way the Kubernetes API server does), and serving in the
//! fabric namespace where every node reaches it.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ferry_agent::identity::ca_client::CaClient;
use ferry_ca::{
    issuer::{Issuer, LeafPolicy},
    jwt::{Minter, TokenRequest},
};
use rustls::{RootCertStore, sign::CertifiedKey};

use crate::{
    AgentCa, Cluster, Place, Proc, bin_path,
    kube_api::{FakeApiServer, TokenOwner},
    netns,
    sim::FABRIC_SERVICE_V4,
};

/// The agents' ServiceAccount, as the CA's default `--allowed-agent` names it.
pub const AGENT_NAMESPACE: &str = "ferry-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "ferry-agent";
/// The `iss` of minted tokens (the CA's default `--token-issuer`).
pub const TOKEN_ISSUER: &str = ferry_ca::cli::DEFAULT_TOKEN_ISSUER;
/// The name in the CA's serving certificate that agents check.
pub const CA_SERVER_NAME: &str = ferry_proto::DEFAULT_CA_SERVER_NAME;
const CA_READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct CaFixture {
    pub proc: Proc,
    /// Where agents reach it.
    pub addr: SocketAddr,
    /// ca.crt: the trust bundle.
    pub trust_bundle: PathBuf,
    /// issuer/: tls.crt and tls.key, watched by the CA.
    pub issuer_dir: PathBuf,
    /// Everything bootstrap wrote (also root.key).
    pub dir: PathBuf,
    pub jwks: PathBuf,
    pub minter: Minter,
    /// The stand-in API server, when the CA runs as in a cluster.
    pub api: Option<FakeApiServer>,
}

/// Options for [`Cluster::start_ca_with`].
#[derive(Debug, Clone, Default)]
pub struct CaOptions {
    /// `--leaf-lifetime`, e.g. `"1h"`; the CA's default (24h) if `None`.
    pub leaf_lifetime: Option<String>,
    /// `--clock-skew`, e.g. `"0s"`; the CA's default (5m) if `None`.
    pub clock_skew: Option<String>,
    /// Run as in a cluster: tokens checked by TokenReview and pods watched,
    /// both through a stand-in API server, instead of a JWKS and the workload file.
    pub kubernetes: bool,
    /// The `ferry-ca` to run instead of the one built beside this binary
    /// (another build of it, to compare).
    pub binary: Option<PathBuf>,
    /// More arguments for `ferry-ca serve`, e.g. `["--log-format", "json"]`.
    pub args: Vec<String>,
}

impl Cluster {
    /// Bootstraps and starts a CA with default options.
    pub fn start_ca(&mut self) -> anyhow::Result<CaFixture> {
        self.start_ca_with(&CaOptions::default())
    }

    pub fn start_ca_with(&mut self, options: &CaOptions) -> anyhow::Result<CaFixture> {
        let ca_bin = match &options.binary {
            Some(binary) => binary.clone(),
            None => bin_path("ferry-ca")?,
        };
        let dir = self.tempdir().join("ca");
        let dir_text = dir.to_str().context("tempdir is not UTF-8")?.to_owned();
        let output = std::process::Command::new(&ca_bin)
            .args(["bootstrap", "--out", &dir_text])
            .output()
            .context("cannot run ferry-ca bootstrap")?;
        if !output.status.success() {
            bail!(
                "ferry-ca bootstrap failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let minter = Minter::generate(TOKEN_ISSUER).map_err(anyhow::Error::msg)?;
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, serde_json::to_string(&minter.jwks())?)?;
        let workloads = self.write_workloads()?;
        let api = if options.kubernetes {
            let api = FakeApiServer::start_for(self, &dir.join("kubeconfig"))?;
            api.load(self);
            Some(api)
        } else {
            None
        };
        let addr = SocketAddr::from((FABRIC_SERVICE_V4, ferry_proto::CA_PORT));
        let trust_bundle = dir.join("ca.crt");
        let issuer_dir = dir.join("issuer");
        let mut args = vec![
            "serve".to_owned(),
            "--listen".to_owned(),
            addr.to_string(),
            "--issuer-dir".to_owned(),
            issuer_dir.to_string_lossy().into_owned(),
            "--trust-bundle".to_owned(),
            trust_bundle.to_string_lossy().into_owned(),
            "--server-name".to_owned(),
            CA_SERVER_NAME.to_owned(),
        ];
        match &api {
            Some(_) => args.extend([
                "--token-review".to_owned(),
                "--kubeconfig".to_owned(),
                dir.join("kubeconfig").to_string_lossy().into_owned(),
            ]),
            None => args.extend([
                "--jwks".to_owned(),
                jwks.to_string_lossy().into_owned(),
                "--workloads".to_owned(),
                workloads.to_string_lossy().into_owned(),
            ]),
        }
        if let Some(lifetime) = &options.leaf_lifetime {
            args.extend(["--leaf-lifetime".to_owned(), lifetime.clone()]);
        }
        if let Some(skew) = &options.clock_skew {
            args.extend(["--clock-skew".to_owned(), skew.clone()]);
        }
        args.extend(options.args.iter().cloned());
        let proc = self.spawn(Place::Fabric, &ca_bin, &args)?;
        let fabric = self.fabric_netns().to_owned();
        let deadline = Instant::now() + CA_READY_TIMEOUT;
        loop {
            if let Some(status) = proc.has_exited()? {
                bail!(
                    "ferry-ca exited ({status}) before serving:\n{}",
                    proc.stderr_tail()
                );
            }
            let listening = netns::in_netns(&fabric, || {
                Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
            })?;
            if listening {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "ferry-ca did not listen on {addr} within {CA_READY_TIMEOUT:?}:\n{}",
                    proc.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(CaFixture {
            proc,
            addr,
            trust_bundle,
            issuer_dir,
            dir,
            jwks,
            minter,
            api,
        })
    }
}

/// The agent's own CA client for the CA at `addr`, checking it against
/// `bundle`; call it inside a tokio runtime in the fabric namespace, where
/// the CA listens (e.g. in [`netns::block_on_in`]).
pub fn ca_client(addr: SocketAddr, bundle: &Path) -> anyhow::Result<CaClient> {
    CaClient::new(
        addr.to_string(),
        CA_SERVER_NAME,
        bundle.to_owned(),
        ferry_proto::crypto::shared_provider(Default::default()),
    )
}

/// What an agent needs to get certificates from this CA:
/// `cluster.agent(node).ca(&ca).start()`.
impl AgentCa for CaFixture {
    fn agent_args(&self, node: &str, dir: &Path) -> anyhow::Result<Vec<String>> {
        let token_file = dir.join(format!("{node}.token"));
        std::fs::write(&token_file, self.agent_token(node)?)
            .with_context(|| format!("cannot write {}", token_file.display()))?;
        Ok(vec![
            "--ca-addr".to_owned(),
            self.addr.to_string(),
            "--ca-server-name".to_owned(),
            CA_SERVER_NAME.to_owned(),
            "--trust-bundle".to_owned(),
            self.trust_bundle.to_string_lossy().into_owned(),
            "--token-file".to_owned(),
            token_file.to_string_lossy().into_owned(),
        ])
    }

    fn api_server(&self) -> Option<PathBuf> {
        // As in a cluster: the agent, too, learns its workloads from the API server.
        self.api.as_ref().map(|_| self.kubeconfig())
    }
}

impl CaFixture {
    /// The kubeconfig naming the stand-in API server (with `kubernetes: true`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A valid token for the agent of node `node`: a JWT the CA's JWKS
    /// verifies, or, with the stand-in API server, an opaque token it knows.
    pub fn agent_token(&self, node: &str) -> anyhow::Result<String> {
        let request = Self::agent_request(node);
        match &self.api {
            Some(api) => {
                let token = format!("opaque-token-{node}-{}", std::process::id());
                api.add_token(
                    &token,
                    TokenOwner {
                        username: format!(
                            "system:serviceaccount:{}:{}",
                            request.namespace, request.service_account
                        ),
                        node: Some(request.node.clone()),
                        pod: Some(request.pod.clone()),
                        audiences: request.audience,
                    },
                );
                Ok(token)
            }
            None => self.mint(&request),
        }
    }

    /// What the API server would put in the token of `node`'s agent pod.
    pub fn agent_request(node: &str) -> TokenRequest {
        TokenRequest {
            namespace: AGENT_NAMESPACE.to_owned(),
            service_account: AGENT_SERVICE_ACCOUNT.to_owned(),
            node: node.to_owned(),
            pod: format!("ferry-agent-{node}"),
            audience: vec![ferry_proto::TOKEN_AUDIENCE.to_owned()],
            lifetime_secs: 3600,
        }
    }

    pub fn mint(&self, request: &TokenRequest) -> anyhow::Result<String> {
        self.minter.mint(request).map_err(anyhow::Error::msg)
    }

    /// A certificate for `identity`, signed the way the CA signs one (its
    /// own `Issuer::sign_leaf` with the mesh's issuer), and the mesh's roots:
    /// for a TLS client that is no agent.
    pub fn client_certificate(
        &self,
        identity: &str,
    ) -> anyhow::Result<(Arc<CertifiedKey>, Arc<RootCertStore>)> {
        let issuer =
            Issuer::load(&self.issuer_dir, &self.trust_bundle).map_err(anyhow::Error::msg)?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let policy = LeafPolicy {
            lifetime: Duration::from_secs(3600),
            clock_skew: Duration::from_secs(60),
        };
        let leaf = issuer
            .sign_leaf(
                &identity.parse()?,
                &rcgen::PublicKeyData::subject_public_key_info(&key),
                policy,
            )
            .map_err(anyhow::Error::msg)?;
        let signing = rustls::crypto::aws_lc_rs::default_provider()
            .key_provider
            .load_private_key(
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
                    .map_err(anyhow::Error::msg)?,
            )?;
        let certified = CertifiedKey::new(vec![leaf.der, issuer.cert_der], signing);
        let mut roots = RootCertStore::empty();
        for root in issuer.roots {
            roots.add(root)?;
        }
        Ok((Arc::new(certified), Arc::new(roots)))
    }
}
