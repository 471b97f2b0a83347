//! Reading what `ferry-testapp` prints: one JSON object per line, each with
//! an `"event"` (`listening`, `connected`, `done`, `served`, `udp`, …).

pub mod cli;
pub mod events;

use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
use serde_json::Value;

use crate::{Cluster, PodId};

/// An address family, for tests that run the same thing over both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];
}

/// The pod's address of `family`.
pub fn pod_ip(cluster: &Cluster, pod: PodId, family: Family) -> IpAddr {
    match family {
        Family::V4 => cluster.pod(pod).ipv4.into(),
        Family::V6 => cluster.pod(pod).ipv6.into(),
    }
}

/// The pod's socket address of `family` on `port`.
pub fn pod_addr(cluster: &Cluster, pod: PodId, family: Family, port: u16) -> SocketAddr {
    SocketAddr::new(pod_ip(cluster, pod, family), port)
}

/// Matches the line of one event, for [`Proc::wait_for_line`](crate::Proc::wait_for_line).
pub fn event(name: &'static str) -> impl Fn(&Value) -> bool {
    move |line| line["event"] == name
}

/// A socket address the testapp printed.
pub fn socket_addr(value: &Value) -> anyhow::Result<SocketAddr> {
    let text = value
        .as_str()
        .with_context(|| format!("not an address: {value}"))?;
    text.parse()
        .with_context(|| format!("not an address: {text}"))
}

/// Every line of a finished testapp's stdout.
pub fn json_lines(stdout: &str) -> anyhow::Result<Vec<Value>> {
    stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("not JSON lines: {stdout}"))
}
