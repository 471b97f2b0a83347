//! What an operator would look at, read the way an operator reads it:
//! `bpftool` for the kernel's view, the agent's admin endpoint for its own.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use ferry_agent::inspect::{Sample, parse_metrics};
use serde_json::Value;

use crate::{Cluster, NodeId};

/// Every program Ferry attaches to a meshed pod's cgroup, sorted.
pub const PROGRAMS: [&str; 6] = [
    "ferry_connect4",
    "ferry_connect6",
    "ferry_getpeer4",
    "ferry_getpeer6",
    "ferry_inbound",
    "ferry_sock_ops",
];

/// Every map Ferry pins under `<bpffs root>/<node>/`.
pub const MAPS: [&str; 7] = [
    "capture_config",
    "pod_cgroups",
    "excluded_ports",
    "orig_dst_connect",
    "orig_dst_tuple",
    "inbound_sources",
    "inbound_plaintext",
];

/// Runs `bpftool -j ARGS` and parses its JSON.
pub fn bpftool(args: &[&str]) -> anyhow::Result<Value> {
    let output = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("cannot run bpftool (run `cargo xtask setup`)")?;
    ensure!(
        output.status.success(),
        "bpftool {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // `cgroup show` prints nothing at all for a cgroup without programs.
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&output.stdout).with_context(|| format!("bpftool {args:?}: not JSON"))
}

/// The names of the programs attached to `cgroup` itself, one per attachment, sorted.
pub fn programs_on(cgroup: &Path) -> anyhow::Result<Vec<String>> {
    let cgroup = cgroup.to_str().context("cgroup path is not UTF-8")?;
    let attached = bpftool(&["cgroup", "show", cgroup])?;
    let mut names: Vec<String> = attached
        .as_array()
        .with_context(|| format!("bpftool cgroup show: {attached}"))?
        .iter()
        .filter_map(|prog| prog["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

/// The names of every loaded BPF program.
pub fn loaded_programs() -> anyhow::Result<Vec<String>> {
    let loaded = bpftool(&["prog", "show"])?;
    Ok(loaded
        .as_array()
        .context("bpftool prog show: not a list")?
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect())
}

/// Every original destination in the pinned `orig_dst_tuple` map under `pin_dir`.
pub fn pinned_original_dsts(pin_dir: &Path) -> anyhow::Result<Vec<SocketAddr>> {
    let map = pin_dir.join("orig_dst_tuple");
    let map = map.to_str().context("pin path is not UTF-8")?;
    let entries = bpftool(&["map", "dump", "pinned", map])?;
    entries
        .as_array()
        .with_context(|| format!("bpftool map dump: {entries}"))?
        .iter()
        .map(|entry| original_dst(&hex_bytes(&entry["value"])?))
        .collect()
}

/// Decodes an `OriginalDst` from `bpftool map dump`'s bytes: 16 address
/// bytes (network order, IPv4 mapped), then port and family in host order.
fn original_dst(bytes: &[u8]) -> anyhow::Result<SocketAddr> {
    ensure!(
        bytes.len() == 20,
        "an OriginalDst is 20 bytes, got {bytes:?}"
    );
    let addr = Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[..16])?);
    let port = u16::from_ne_bytes([bytes[16], bytes[17]]);
    let ip = match addr.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(addr),
    };
    Ok(SocketAddr::new(ip, port))
}

/// `(passed, refused)` plaintext connection attempts `ferry_inbound` counted
/// for the pod `cgroup`, from the pinned `inbound_plaintext` map; zeros if it
/// has no entry yet.
pub fn plaintext_counts(pin_dir: &Path, cgroup: &Path) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let id = std::fs::metadata(cgroup)
        .with_context(|| format!("cgroup {}", cgroup.display()))?
        .ino();
    let map = pin_dir.join("inbound_plaintext");
    let map = map.to_str().context("pin path is not UTF-8")?;
    let entries = bpftool(&["map", "dump", "pinned", map])?;
    for entry in entries
        .as_array()
        .with_context(|| format!("bpftool map dump: {entries}"))?
    {
        let key = hex_bytes(&entry["key"])?;
        let value = hex_bytes(&entry["value"])?;
        if key.len() == 8 && u64::from_ne_bytes(key[..].try_into()?) == id {
            ensure!(
                value.len() == 16,
                "InboundCounts is 16 bytes, got {value:?}"
            );
            let passed = u64::from_ne_bytes(value[..8].try_into()?);
            let refused = u64::from_ne_bytes(value[8..].try_into()?);
            return Ok((passed, refused));
        }
    }
    Ok((0, 0))
}

fn hex_bytes(value: &Value) -> anyhow::Result<Vec<u8>> {
    value
        .as_array()
        .with_context(|| format!("not a byte list: {value}"))?
        .iter()
        .map(|b| {
            let text = b.as_str().context("not a hex string")?;
            u8::from_str_radix(text.trim_start_matches("0x"), 16).context("not hex")
        })
        .collect()
}

/// GETs `path` from the node's agent and parses the JSON it answers.
pub fn admin_json(cluster: &Cluster, node: NodeId, path: &str) -> anyhow::Result<Value> {
    let (status, body) = cluster.admin_get(node, path)?;
    ensure!(status == 200, "GET {path}: {status} {body}");
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
}

/// How long [`eventually`] waits for the agent to catch up with the kernel.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Polls until `check` passes or [`SETTLE`] runs out; the last error explains.
///
/// A client's `connect` returns once the kernel completed the handshake with
/// the agent's listener, before the agent accepted it, let alone opened its
/// side on the other node: what the admin endpoint shows trails what a test
/// process sees, so assertions on it wait.
pub fn eventually<T>(mut check: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + SETTLE;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(err) if Instant::now() >= deadline => return Err(err),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The node's agent's live connection whose original destination is `to`,
/// waiting for it to show up.
pub fn live_connection(cluster: &Cluster, node: NodeId, to: SocketAddr) -> anyhow::Result<Value> {
    eventually(|| {
        let live = admin_json(cluster, node, "/connections")?;
        live.as_array()
            .context("/connections is not a list")?
            .iter()
            .find(|c| c["originalDst"] == to.to_string())
            .cloned()
            .with_context(|| format!("no live connection to {to} in /connections: {live}"))
    })
}

/// A socket address in the agent's JSON (`"source"` of a connection).
pub fn socket_addr(value: &Value) -> anyhow::Result<SocketAddr> {
    let text = value
        .as_str()
        .with_context(|| format!("not an address: {value}"))?;
    text.parse()
        .with_context(|| format!("not an address: {text}"))
}

/// The node's agent's `/metrics`, parsed.
pub fn metrics(cluster: &Cluster, node: NodeId) -> anyhow::Result<Vec<Sample>> {
    let (status, body) = cluster.admin_get(node, "/metrics")?;
    ensure!(status == 200, "GET /metrics: {status} {body}");
    parse_metrics(&body).map_err(|e| anyhow::anyhow!("/metrics does not parse: {e}\n{body}"))
}

/// The value of the series `name{labels}` (exactly those labels), 0 if absent
/// (a counter nothing has incremented yet is not shown).
pub fn metric_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map_or(0.0, |s| s.value)
}

/// Connections the node's agent has captured since it started.
pub fn captured_total(cluster: &Cluster, node: NodeId) -> anyhow::Result<u64> {
    let dump = admin_json(cluster, node, "/config_dump")?;
    dump["totals"]["captured"]
        .as_u64()
        .with_context(|| format!("no totals.captured in {dump}"))
}

/// Whether `ip` is one of the node's own addresses: its uplink, or the pods'
/// gateway, which the agent's connections to local pods come from.
pub fn is_node_addr(cluster: &Cluster, node: NodeId, ip: IpAddr) -> bool {
    let node = cluster.node(node);
    let (gateway_v4, gateway_v6) = crate::sim::pod_address(node.index, 1);
    let ip = ip.to_canonical();
    ip == IpAddr::V4(node.ipv4)
        || ip == IpAddr::V6(node.ipv6)
        || ip == IpAddr::V4(gateway_v4)
        || ip == IpAddr::V6(gateway_v6)
}

/// User + system CPU seconds of `pid` so far, every thread counted.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command may hold spaces and parentheses; the fields follow the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("an unreadable /proc/<pid>/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("a short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15; after the ')' they are 11 and 12 (0-based).
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}
