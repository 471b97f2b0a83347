//! Capture: loads the eBPF programs, keeps them attached to exactly the meshed
//! pods of this node, and answers "where was this connection going?".
//!
//! Everything lives under one bpffs directory per node,
//! `<bpffs root>/<node>/`: the maps (pinned by name, reused by the next agent)
//! and one pinned link per (pod cgroup, program) under `links/<cgroup id>/`.
//! The pins, not the agent process, keep the programs attached, so a
//! restarting agent leaves pods captured; the new agent swaps its programs
//! into the existing links instead of attaching a second copy.

mod keeper;
mod link;
pub mod metrics;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData},
    programs::{
        CgroupAttachMode,
        links::{FdLink, PinnedLink},
    },
};
use ferry_agent_ebpf::{
    CAPTURE_IPV4, CAPTURE_IPV6, CaptureConfig, OriginalDst, PodCapture, PodPort, SockKey,
    map_names, program_names,
};
use ferry_proto::Untrusted;
use serde::{Deserialize, Serialize};

pub use keeper::{CAPTURE_RETRY, CaptureStatus, CaptureView, keep_captured, node_local_addresses};

use crate::workload::{LocalNode, Workload, policy::PlaintextRule};

/// The capture programs, compiled by `build.rs` for `bpfel-unknown-none`.
static CAPTURE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-capture"));

/// Programs in the order they are attached: `sock_ops` and `getpeername`
/// first, so that by the time `connect` starts rewriting, every redirected
/// connection gets its 4-tuple record and its application-facing address.
/// Detaching goes in reverse.
const ATTACH_ORDER: [&str; 6] = [
    program_names::SOCK_OPS,
    program_names::GETPEERNAME4,
    program_names::GETPEERNAME6,
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::INBOUND,
];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "cannot create the pin directory {path}: {source} (is bpffs mounted? `cargo xtask setup` mounts it)"
    )]
    PinDir { path: PathBuf, source: io::Error },
    #[error("cannot load the eBPF capture programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("pod {pod}: cgroup {cgroup}: {source}")]
    Cgroup {
        pod: String,
        cgroup: PathBuf,
        source: io::Error,
    },
    #[error("pod {pod}: attaching {program}: {source}")]
    Attach {
        pod: String,
        program: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("detaching cgroup {cgroup_id}: {source}")]
    Detach { cgroup_id: u64, source: io::Error },
}

/// Where the agent's outbound listener is, for the connect programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub port: u16,
}

/// The node has no address to redirect to.
#[derive(Debug, thiserror::Error)]
#[error(
    "node {0} has no addresses in the workload source; the agent needs one to receive captured connections"
)]
pub struct NoNodeAddress(pub String);

impl Redirect {
    /// The node's first address of each family, at `port`.
    pub fn for_node(node: &LocalNode, port: u16) -> Result<Self, NoNodeAddress> {
        let ipv4 = node.addresses.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        let ipv6 = node.addresses.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        });
        if ipv4.is_none() && ipv6.is_none() {
            return Err(NoNodeAddress(node.name.clone()));
        }
        Ok(Self { ipv4, ipv6, port })
    }
}

/// One pod cgroup with Ferry's programs on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub pod: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub excluded_ports: Vec<u16>,
    /// Strict mode: plaintext connections into the pod from off the node are dropped.
    pub strict: bool,
    /// What the kernel does with plaintext from off the node: strict mode
    /// refuses it all, else the pod's authorization policies decide.
    #[serde(default)]
    pub plaintext: PlaintextRule,
}

/// Pinned maps of earlier builds: `orig_dst_cookie` (socket cookie ->
/// original destination for a connection's whole life) became the smaller
/// `orig_dst_connect`, which holds only connects in flight.
const RETIRED_MAPS: [&str; 1] = ["orig_dst_cookie"];

/// The loaded programs and their maps, for one node.
pub struct Capture {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pods: HashMap<MapData, u64, PodCapture>,
    excluded: HashMap<MapData, PodPort, u8>,
    plaintext_ports: HashMap<MapData, PodPort, u8>,
    inbound_sources: HashMap<MapData, [u32; 4], u8>,
    attached: BTreeMap<u64, Attachment>,
}

/// The read side the connection path needs: original destinations by 4-tuple.
pub struct OriginalDsts {
    map: HashMap<MapData, SockKey, OriginalDst>,
}

impl Capture {
    /// Loads the programs with their maps pinned under `<bpffs_root>/<node>/`
    /// (reusing maps a previous agent pinned) and points them at `redirect`.
    pub fn load(
        bpffs_root: &Path,
        node: &str,
        redirect: Redirect,
    ) -> Result<(Self, OriginalDsts), CaptureError> {
        let pin_dir = bpffs_root.join(node);
        let links_dir = pin_dir.join("links");
        fs::create_dir_all(&links_dir).map_err(|source| CaptureError::PinDir {
            path: links_dir,
            source,
        })?;

        // Maps earlier builds pinned that these programs no longer use.
        for stale in RETIRED_MAPS {
            let path = pin_dir.join(stale);
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a map pinned by an earlier build")
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot remove a map pinned by an earlier build")
                }
            }
        }

        let log_level = ebpf_log_level();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .override_global(aya_log::LEVEL, &log_level, true)
            .load(CAPTURE_OBJECT)?;
        forward_ebpf_logs(&mut ebpf);

        for name in ATTACH_ORDER {
            let program = ebpf.program_mut(name).ok_or(CaptureError::Missing(name))?;
            let result = match program {
                aya::programs::Program::SockOps(p) => p.load(),
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::CgroupSkb(p) => p.load(),
                _ => return Err(CaptureError::Missing(name)),
            };
            result.map_err(|source| CaptureError::Program { name, source })?;
        }

        let mut config: Array<MapData, CaptureConfig> =
            take_map(&mut ebpf, map_names::CAPTURE_CONFIG)?;
        config
            .set(0, capture_config(redirect), 0)
            .map_err(|source| CaptureError::Map {
                name: map_names::CAPTURE_CONFIG,
                source,
            })?;
        let pods = take_map(&mut ebpf, map_names::POD_CGROUPS)?;
        let excluded = take_map(&mut ebpf, map_names::EXCLUDED_PORTS)?;
        let plaintext_ports = take_map(&mut ebpf, map_names::PLAINTEXT_PORTS)?;
        let map = take_map(&mut ebpf, map_names::ORIG_DST_BY_TUPLE)?;
        let inbound_sources = take_map(&mut ebpf, map_names::INBOUND_SOURCES)?;
        let capture = Self {
            ebpf,
            pin_dir,
            pods,
            excluded,
            plaintext_ports,
            inbound_sources,
            attached: BTreeMap::new(),
        };
        Ok((capture, OriginalDsts { map }))
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn attachments(&self) -> impl Iterator<Item = &Attachment> {
        self.attached.values()
    }

    /// Makes the set of captured pods equal to `wanted`: attaches new ones,
    /// adopts the links a previous agent left (swapping in this agent's
    /// programs), and detaches pods that are gone, including ones that left
    /// while no agent was running. Returns one error per pod that failed;
    /// the others are captured regardless.
    pub fn reconcile<'a>(
        &mut self,
        wanted: impl IntoIterator<Item = (&'a Workload, PlaintextRule)>,
    ) -> Vec<CaptureError> {
        let mut errors = Vec::new();
        let mut keep = BTreeSet::new();
        for (pod, plaintext) in wanted {
            match self.capture_pod(pod, plaintext) {
                Ok(id) => {
                    keep.insert(id);
                }
                Err(error) => errors.push(error),
            }
        }
        for id in self.pinned_cgroups() {
            if !keep.contains(&id)
                && let Err(error) = self.release(id)
            {
                errors.push(error);
            }
        }
        errors
    }

    fn capture_pod(
        &mut self,
        pod: &Workload,
        plaintext: PlaintextRule,
    ) -> Result<u64, CaptureError> {
        let key = pod.key();
        let cgroup = pod.cgroup.clone().unwrap_or_default();
        let cgroup_err = |source| CaptureError::Cgroup {
            pod: key.clone(),
            cgroup: cgroup.clone(),
            source,
        };
        let dir = fs::File::open(&cgroup).map_err(cgroup_err)?;
        // A cgroup v2 directory's inode number is its cgroup id, what
        // bpf_get_current_cgroup_id() returns for tasks inside it.
        let cgroup_id = dir.metadata().map_err(cgroup_err)?.ino();

        let wanted = Attachment {
            pod: key.clone(),
            cgroup: cgroup.clone(),
            cgroup_id,
            excluded_ports: pod.excluded_ports.clone(),
            strict: pod.strict,
            plaintext,
        };
        if self.attached.get(&cgroup_id) == Some(&wanted) {
            return Ok(cgroup_id);
        }
        self.set_pod_maps(&wanted)
            .map_err(|source| attach_err(&key, "maps", source))?;

        let links_dir = self.links_dir(cgroup_id);
        fs::create_dir_all(&links_dir).map_err(|e| attach_err(&key, "pin directory", e))?;
        for name in ATTACH_ORDER {
            let pin = links_dir.join(name);
            self.attach_or_adopt(name, &dir, &pin)
                .map_err(|source| attach_err(&key, name, source))?;
        }
        tracing::info!(pod = %Untrusted(&key), cgroup = %Untrusted(cgroup.display()), cgroup_id, "capturing pod");
        self.attached.insert(cgroup_id, wanted);
        Ok(cgroup_id)
    }

    /// Attaches `name` to the cgroup and pins the link at `pin`, or, if a link
    /// is already pinned there, swaps this agent's program into it.
    fn attach_or_adopt(
        &mut self,
        name: &'static str,
        cgroup: &fs::File,
        pin: &Path,
    ) -> Result<(), BoxError> {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(CaptureError::Missing(name))?;
        if pin.exists() {
            let link = link::open_pinned(pin)?;
            link::update_program(link.as_fd(), program.fd()?.as_fd())?;
            return Ok(());
        }
        let fd_link = match program {
            aya::programs::Program::SockOps(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single)?;
                FdLink::try_from(p.take_link(id)?)?
            }
            aya::programs::Program::CgroupSockAddr(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single)?;
                FdLink::try_from(p.take_link(id)?)?
            }
            aya::programs::Program::CgroupSkb(p) => {
                let id = p.attach(
                    cgroup,
                    aya::programs::CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )?;
                FdLink::try_from(p.take_link(id)?)?
            }
            _ => return Err(Box::new(CaptureError::Missing(name))),
        };
        fd_link.pin(pin)?;
        Ok(())
    }

    fn set_pod_maps(&mut self, pod: &Attachment) -> Result<(), aya::maps::MapError> {
        let id = pod.cgroup_id;
        let excluded: BTreeMap<u16, u8> = pod.excluded_ports.iter().map(|&p| (p, 1)).collect();
        set_pod_ports(&mut self.excluded, id, &excluded)?;
        let plaintext: BTreeMap<u16, u8> = pod
            .plaintext
            .ports
            .iter()
            .map(|(&port, &let_in)| (port, u8::from(let_in)))
            .collect();
        set_pod_ports(&mut self.plaintext_ports, id, &plaintext)?;
        // Written after the ports, so a program that sees a flag finds them.
        let mut flags = 0;
        if pod.plaintext.refused {
            flags |= ferry_agent_ebpf::POD_STRICT;
        }
        if !pod.plaintext.ports.is_empty() {
            flags |= ferry_agent_ebpf::POD_PLAINTEXT_BY_PORT;
        }
        if !pod.excluded_ports.is_empty() {
            flags |= ferry_agent_ebpf::POD_EXCLUDES_PORTS;
        }
        self.pods.insert(id, PodCapture { flags, _pad: 0 }, 0)
    }

    /// The addresses new connections into strict pods may come from: the
    /// node's own (its agent, kubelet probes) and loopback.
    pub fn allow_inbound_from(&mut self, addresses: &[IpAddr]) -> Result<(), CaptureError> {
        let err = |source| CaptureError::Map {
            name: map_names::INBOUND_SOURCES,
            source,
        };
        let stale: Vec<[u32; 4]> = self.inbound_sources.keys().filter_map(Result::ok).collect();
        for key in stale {
            self.inbound_sources.remove(&key).map_err(err)?;
        }
        for ip in addresses {
            let words = match ip.to_canonical() {
                IpAddr::V4(v4) => ferry_agent_ebpf::v4_mapped(u32::from_ne_bytes(v4.octets())),
                IpAddr::V6(v6) => {
                    let b = v6.octets();
                    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]))
                }
            };
            self.inbound_sources.insert(words, 1, 0).map_err(err)?;
        }
        Ok(())
    }

    /// Detaches every program from cgroup `id` and forgets the pod.
    fn release(&mut self, id: u64) -> Result<(), CaptureError> {
        let err = |source| CaptureError::Detach {
            cgroup_id: id,
            source,
        };
        // Out of the pod map first: the programs pass everything through from here on.
        let _ = self.pods.remove(&id);
        let _ = set_pod_ports(&mut self.excluded, id, &BTreeMap::new());
        let _ = set_pod_ports(&mut self.plaintext_ports, id, &BTreeMap::new());
        let links_dir = self.links_dir(id);
        for name in ATTACH_ORDER.iter().rev() {
            let pin = links_dir.join(name);
            match PinnedLink::from_pin(&pin) {
                // Unpinning drops the last reference: the kernel detaches the program.
                Ok(link) => drop(link.unpin().map_err(err)?),
                Err(_) if !pin.exists() => {}
                Err(e) => return Err(err(io::Error::other(e))),
            }
        }
        fs::remove_dir(&links_dir)
            .or_else(ignore_not_found)
            .map_err(err)?;
        if let Some(gone) = self.attached.remove(&id) {
            tracing::info!(pod = %Untrusted(&gone.pod), cgroup_id = id, "stopped capturing pod");
        } else {
            tracing::info!(cgroup_id = id, "detached capture left by a previous agent");
        }
        Ok(())
    }

    /// Cgroup ids with links pinned, by this agent or a previous one.
    fn pinned_cgroups(&self) -> Vec<u64> {
        let Ok(entries) = fs::read_dir(self.pin_dir.join("links")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    fn links_dir(&self, cgroup_id: u64) -> PathBuf {
        self.pin_dir.join("links").join(cgroup_id.to_string())
    }
}

impl OriginalDsts {
    /// The address the application dialled for the connection the outbound
    /// listener accepted from `peer` on `local`.
    pub fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        let key = SockKey {
            src_addr: words(peer.ip()),
            dst_addr: words(local.ip()),
            src_port: peer.port(),
            dst_port: local.port(),
        };
        let original = self.map.get(&key, 0).ok()?;
        Some(socket_addr(&original))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Makes `map`'s entries of pod cgroup `id` exactly `ports` (port -> value).
fn set_pod_ports(
    map: &mut HashMap<MapData, PodPort, u8>,
    id: u64,
    ports: &BTreeMap<u16, u8>,
) -> Result<(), aya::maps::MapError> {
    let stale: Vec<PodPort> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.pod_cgroup == id && !ports.contains_key(&k.port))
        .collect();
    for key in stale {
        map.remove(&key)?;
    }
    for (&port, &value) in ports {
        let key = PodPort {
            pod_cgroup: id,
            port,
            _pad: [0; 6],
        };
        map.insert(key, value, 0)?;
    }
    Ok(())
}

fn attach_err(pod: &str, program: &'static str, source: impl Into<BoxError>) -> CaptureError {
    CaptureError::Attach {
        pod: pod.to_owned(),
        program,
        source: source.into(),
    }
}

fn ignore_not_found(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::Missing(name))?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

fn capture_config(redirect: Redirect) -> CaptureConfig {
    let mut config = CaptureConfig {
        outbound_port: redirect.port,
        ..Default::default()
    };
    if let Some(ip) = redirect.ipv4 {
        config.agent_ip4 = u32::from_ne_bytes(ip.octets());
        config.flags |= CAPTURE_IPV4;
    }
    if let Some(ip) = redirect.ipv6 {
        config.agent_ip6 = words(IpAddr::V6(ip));
        config.flags |= CAPTURE_IPV6;
    }
    config
}

/// An address as the programs store it: network-order words, IPv4 mapped into IPv6.
fn words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

fn socket_addr(original: &OriginalDst) -> SocketAddr {
    let octets: Vec<u8> = original.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(octets).expect("four words are 16 bytes"));
    // A dual-stack socket that dialled ::ffff:a.b.c.d made an IPv4 connection.
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, original.port)
}

/// The eBPF side logs at the level the agent's own filter would show.
fn ebpf_log_level() -> u8 {
    use aya_log::Level;
    let level = match tracing::level_filters::LevelFilter::current().into_level() {
        Some(tracing::Level::TRACE) => Level::Trace,
        Some(tracing::Level::DEBUG) => Level::Debug,
        Some(tracing::Level::INFO) => Level::Info,
        Some(tracing::Level::WARN) => Level::Warn,
        Some(tracing::Level::ERROR) | None => Level::Error,
    };
    level as u8
}

/// Forwards the programs' aya-log records into `tracing` (through the `log` bridge).
fn forward_ebpf_logs(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!(%error, "eBPF log forwarding unavailable");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the
    // same for as long as the AsyncFd (the task below) holds the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!(error = %error.into_parts().1, "eBPF log forwarding unavailable");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_match_the_kernel_layout() {
        let w = words("198.18.1.2".parse().unwrap());
        assert_eq!(
            w,
            ferry_agent_ebpf::v4_mapped(u32::from_ne_bytes([198, 18, 1, 2]))
        );
        let w = words("2001:2::7".parse().unwrap());
        assert_eq!(w[0].to_ne_bytes(), [0x20, 0x01, 0x00, 0x02]);
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 7]);
    }

    #[test]
    fn original_destinations_round_trip() {
        for addr in ["198.18.2.2:8080", "[2001:2:0:2::2]:443"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let family = if addr.is_ipv4() {
                ferry_agent_ebpf::ORIG_IPV4
            } else {
                ferry_agent_ebpf::ORIG_IPV6
            };
            let original = OriginalDst {
                addr: words(addr.ip()),
                port: addr.port(),
                family,
            };
            assert_eq!(socket_addr(&original), addr);
        }
    }

    #[test]
    fn config_carries_both_families() {
        let config = capture_config(Redirect {
            ipv4: Some(Ipv4Addr::new(198, 19, 0, 1)),
            ipv6: Some("2001:2:0:ff::1".parse().unwrap()),
            port: 15001,
        });
        assert_eq!(config.flags, CAPTURE_IPV4 | CAPTURE_IPV6);
        assert_eq!(config.agent_ip4.to_ne_bytes(), [198, 19, 0, 1]);
        assert_eq!(config.outbound_port, 15001);
    }
}
