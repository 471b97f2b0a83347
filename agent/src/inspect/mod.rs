//! `ferry-agent inspect`: the admin endpoint as an operator reads it, in
//! aligned tables. It asks the agent over plain HTTP/1.1 (the admin endpoint
//! listens on the node's loopback), so it runs on the node, or in the
//! agent's pod with `kubectl exec`.
//!
//! [`client`] fetches a page, [`tables`] renders the typed views the admin
//! endpoint serves, [`metrics_text`] parses `/metrics`.

pub mod client;
pub mod metrics_text;
pub mod tables;

use std::{
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use clap::ValueEnum;
use serde::de::DeserializeOwned;

pub use client::{BadResponse, request};
pub use metrics_text::{BadMetricsText, Sample, parse_metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum View {
    /// Every pod the agent knows, from its workload source.
    Workloads,
    /// The certificate of each identity on this node.
    Certs,
    /// The connections the agent carries now.
    Connections,
    /// The pooled tunnel connections to other agents.
    Pool,
    /// Every authorization policy: what it selects here, what it decided.
    Policies,
    /// A summary of `/config_dump`: node, readiness, capture, totals.
    Config,
    /// Every series of `/metrics`.
    Metrics,
}

impl View {
    fn path(self) -> &'static str {
        match self {
            View::Workloads => "/workloads",
            View::Certs => "/certs",
            View::Connections => "/connections",
            View::Pool => "/pool",
            View::Policies => "/policies",
            View::Config => "/config_dump",
            View::Metrics => "/metrics",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("nothing listens on {addr}: is ferry-agent running on this node?")]
    NotRunning { addr: SocketAddr },
    #[error("cannot {what} {addr}: {source}")]
    Io {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{method} {path} on {addr}: {status} {body}")]
    Status {
        method: String,
        path: String,
        addr: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("the agent's answer to {path} is not what inspect expects: {error}")]
    Answer { path: String, error: BadAnswer },
}

/// What was wrong with an answer from the agent.
#[derive(Debug, thiserror::Error)]
pub enum BadAnswer {
    #[error(transparent)]
    Http(#[from] BadResponse),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Metrics(#[from] BadMetricsText),
}

/// Fetches `view` from the agent at `admin_addr` and prints it: as a table,
/// or as it came with `raw`.
pub fn run(admin_addr: SocketAddr, view: View, raw: bool) -> Result<(), InspectError> {
    let path = view.path();
    let (status, body) = request(admin_addr, "GET", path)?;
    if status != 200 {
        return Err(InspectError::Status {
            method: "GET".to_owned(),
            path: path.to_owned(),
            addr: admin_addr,
            status,
            body: body.trim().to_owned(),
        });
    }
    if raw {
        print!("{body}");
        return Ok(());
    }
    let text = render(view, &body, unix_now()).map_err(|error| InspectError::Answer {
        path: path.to_owned(),
        error,
    })?;
    print!("{text}");
    Ok(())
}

/// The table of `view` for the agent's answer `body`.
fn render(view: View, body: &str, now_unix: u64) -> Result<String, BadAnswer> {
    fn parse<T: DeserializeOwned>(body: &str) -> Result<T, BadAnswer> {
        Ok(serde_json::from_str(body)?)
    }
    Ok(match view {
        View::Workloads => tables::workloads_table(&parse::<Vec<_>>(body)?),
        View::Certs => tables::certs_table(&parse::<Vec<_>>(body)?, now_unix),
        View::Connections => tables::connections_table(&parse::<Vec<_>>(body)?, now_unix),
        View::Pool => tables::pool_table(parse::<Option<_>>(body)?.as_ref()),
        View::Policies => tables::policies_table(&parse::<Vec<_>>(body)?),
        View::Config => tables::config_summary(&parse(body)?),
        View::Metrics => tables::metrics_table(&parse_metrics(body)?),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
