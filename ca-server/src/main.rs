use std::process::ExitCode;

use clap::Parser as _;
use ferry_ca::{
    bootstrap,
    cli::{Cli, Command, LogFormat},
    issuer::LeafPolicy,
    jwks::JwksFile,
    kubernetes::{KubePods, TokenReviewer},
    nodes::PodIndex,
    serve::{self, ServeConfig},
    service::{Authenticator, Pods},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = init_logging(&cli) {
        eprintln!("ferry-ca: {error:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Bootstrap(args) => run_bootstrap(&args).map_err(anyhow::Error::msg),
        Command::Serve(args) => run_serve(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-ca: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_bootstrap(args: &ferry_ca::cli::BootstrapArgs) -> Result<(), String> {
    let written = bootstrap::bootstrap(
        &args.out,
        &args.trust_domain,
        args.root_lifetime,
        args.issuer_lifetime,
    )?;
    println!("trust bundle: {}", written.trust_bundle.display());
    println!(
        "issuer (tls.crt, tls.key): {}",
        written.issuer_dir.display()
    );
    println!(
        "root key: {} (keep it offline; only a new issuer needs it)",
        written.root_key.display()
    );
    if let Some(file) = &args.kubernetes_manifests {
        bootstrap::write_kubernetes_manifests(&written, file)?;
        println!(
            "Kubernetes Secret {} and ConfigMap {} (namespace {}): {}",
            bootstrap::ISSUER_SECRET,
            bootstrap::TRUST_BUNDLE_CONFIG_MAP,
            bootstrap::KUBERNETES_NAMESPACE,
            file.display()
        );
    }
    Ok(())
}

fn run_serve(args: ferry_ca::cli::ServeArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve_async(args))
}

async fn serve_async(args: ferry_ca::cli::ServeArgs) -> anyhow::Result<()> {
    let needs_cluster = args.token_review || args.workloads.is_none();
    let client = if needs_cluster {
        Some(kube_client(args.kubeconfig.as_deref()).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the Kubernetes API (needed for --token-review, or without --workloads): {e:#}"
            )
        })?)
    } else {
        None
    };
    let authenticator = match (&args.jwks, &client) {
        (Some(jwks), _) => Authenticator::Jwks(std::sync::Arc::new(
            JwksFile::load(jwks, &args.token_issuer, &args.token_audience)
                .map_err(anyhow::Error::msg)?,
        )),
        (None, Some(client)) => {
            Authenticator::TokenReview(TokenReviewer::new(client.clone(), &args.token_audience))
        }
        (None, None) => unreachable!("clap requires --jwks or --token-review"),
    };
    let pods = match (&args.workloads, client) {
        (Some(file), _) => Pods::File(PodIndex::load(file).map_err(anyhow::Error::msg)?),
        (None, Some(client)) => {
            Pods::Kubernetes(KubePods::start(client).await.map_err(anyhow::Error::msg)?)
        }
        (None, None) => unreachable!("a client is made when there is no --workloads"),
    };
    let config = ServeConfig {
        listen: args.listen,
        issuer_dir: args.issuer_dir,
        trust_bundle: args.trust_bundle,
        trust_domain: args.trust_domain,
        server_names: args.server_names,
        policy: LeafPolicy {
            lifetime: args.leaf_lifetime,
            clock_skew: args.clock_skew,
        },
        allowed_agents: args.allowed_agents,
        authenticator,
        pods,
        metrics_addr: args.metrics_addr,
    };
    serve::serve(config).await
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_filter)
        .map_err(|e| anyhow::anyhow!("--log-level {:?}: {e}", cli.log_filter))?;
    use std::io::IsTerminal as _;
    // Colours only on a terminal, as the agent: a pod's log is a file, where
    // the escapes are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
