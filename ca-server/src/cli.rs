//! The CA's command line. The Deployment manifest sets flags through the
//! same parser.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use ferry_proto::{CA_PORT, DEFAULT_CA_SERVER_NAME, DEFAULT_TRUST_DOMAIN, TOKEN_AUDIENCE};

pub const DEFAULT_LEAF_LIFETIME: &str = "24h";
pub const DEFAULT_CLOCK_SKEW: &str = "5m";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:15014";
pub const DEFAULT_ALLOWED_AGENT: &str = "system:serviceaccount:ferry-system:ferry-agent";
pub const DEFAULT_TOKEN_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Debug, Parser)]
#[command(name = "ferry-ca", version, about = "The Ferry certificate authority")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[arg(
        long = "log-level",
        env = "FERRY_LOG",
        default_value = "info",
        global = true
    )]
    pub log_filter: String,
    #[arg(long = "log-format", env = "FERRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a trust anchor (root) and an issuer signed by it.
    Bootstrap(BootstrapArgs),
    /// Serve Certify over TLS.
    Serve(Box<ServeArgs>),
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// Directory to write into: ca.crt (trust bundle), root.key (keep it
    /// offline), issuer/{tls.crt,tls.key,ca.crt} (the issuer Secret).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    #[arg(long, default_value = "87600h", value_parser = parse_duration)]
    pub root_lifetime: Duration,
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    pub issuer_lifetime: Duration,
    /// Also write the issuer Secret (`ferry-ca-issuer`) and the trust bundle
    /// ConfigMap (`ferry-trust-bundle`) for namespace ferry-system to this
    /// file, as YAML for `kubectl apply -f`. It holds the issuer key (mode
    /// 0600), never the root key.
    #[arg(long, value_name = "FILE")]
    pub kubernetes_manifests: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("authentication").required(true))]
pub struct ServeArgs {
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], CA_PORT)))]
    pub listen: SocketAddr,
    /// The issuer Secret's directory (tls.crt, tls.key); reloaded when the files change.
    #[arg(long)]
    pub issuer_dir: PathBuf,
    /// Every root the mesh trusts (PEM); reloaded with the issuer.
    #[arg(long)]
    pub trust_bundle: PathBuf,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Names (DNS or IP) in the CA's serving certificate; agents check one of them.
    #[arg(long = "server-name", default_values_t = [DEFAULT_CA_SERVER_NAME.to_owned()])]
    pub server_names: Vec<String>,
    #[arg(long, default_value = DEFAULT_LEAF_LIFETIME, value_parser = parse_duration)]
    pub leaf_lifetime: Duration,
    /// How far before now a leaf's NotBefore is set, for clocks that run behind.
    #[arg(long, default_value = DEFAULT_CLOCK_SKEW, value_parser = parse_duration)]
    pub clock_skew: Duration,
    /// Kubernetes usernames allowed to ask for certificates (the agents).
    #[arg(long = "allowed-agent", default_values_t = [DEFAULT_ALLOWED_AGENT.to_owned()])]
    pub allowed_agents: Vec<String>,
    /// Verify tokens offline against this JWKS (the API server's signing keys).
    #[arg(long, group = "authentication")]
    pub jwks: Option<PathBuf>,
    /// Ask the Kubernetes API server to review each token (TokenReview).
    #[arg(long, group = "authentication")]
    pub token_review: bool,
    /// The `iss` the tokens must carry.
    #[arg(long, default_value = DEFAULT_TOKEN_ISSUER)]
    pub token_issuer: String,
    /// The `aud` the tokens must carry.
    #[arg(long, default_value = TOKEN_AUDIENCE)]
    pub token_audience: String,
    /// Which pods run where (the workload file format), for node authorization;
    /// without it the CA watches the cluster's pods.
    #[arg(long)]
    pub workloads: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// A kubeconfig for the API server; by default the in-cluster
    /// ServiceAccount, or `$KUBECONFIG`.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

/// `90s`, `15m`, `24h`, `7d`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 24h or 7d"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("120"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
    }
}
