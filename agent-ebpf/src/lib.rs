//! Map types shared by Ferry's eBPF capture programs and the agent.
//!
//! Every type is `#[repr(C)]` and `Copy`, with explicit padding where its
//! fields would leave a hole: the kernel compares hash-map keys byte by byte,
//! padding included, so nothing may be left undefined.
//!
//! Addresses are stored as the kernel hands them to the programs: four `u32`
//! words in network byte order (an IPv4 address as its IPv4-mapped IPv6 form),
//! ports in host byte order.
#![no_std]

/// Names of the pinned maps, as they appear under `/sys/fs/bpf/ferry/<node>/`.
pub mod map_names {
    /// `[CaptureConfig; 1]`: where captured connections go.
    pub const CAPTURE_CONFIG: &str = "capture_config";
    /// `cgroup id -> PodCapture`: the pod cgroups the programs act for.
    pub const POD_CGROUPS: &str = "pod_cgroups";
    /// `PodPort -> u8`: destination ports a pod sends around the agent.
    pub const EXCLUDED_PORTS: &str = "excluded_ports";
    /// `socket cookie -> OriginalDst`: written by connect4/6, moved to
    /// `orig_dst_tuple` by sock_ops within the same `connect()` call.
    pub const ORIG_DST_CONNECTING: &str = "orig_dst_connect";
    /// `SockKey -> OriginalDst`: written by sock_ops once the local port
    /// exists, read by the agent and by getpeername4/6.
    pub const ORIG_DST_BY_TUPLE: &str = "orig_dst_tuple";
    /// `[u32; 4] -> u8`: addresses (IPv4 mapped) whose new connections into a
    /// strict pod are let in: the node's own (its agent, kubelet probes).
    pub const INBOUND_SOURCES: &str = "inbound_sources";
    /// `cgroup id -> InboundCounts`: plaintext connection attempts into each pod.
    pub const INBOUND_PLAINTEXT: &str = "inbound_plaintext";
    /// `PodPort -> u8`: for a pod with `POD_PLAINTEXT_BY_PORT`, the ports
    /// where plaintext from off the node is decided otherwise than the
    /// pod's default (1: let in, 0: refused).
    pub const PLAINTEXT_PORTS: &str = "plaintext_ports";
}

/// Names of the programs, as `bpftool prog show` lists them (at most 15 bytes).
pub mod program_names {
    pub const CONNECT4: &str = "ferry_connect4";
    pub const CONNECT6: &str = "ferry_connect6";
    pub const SOCK_OPS: &str = "ferry_sock_ops";
    pub const GETPEERNAME4: &str = "ferry_getpeer4";
    pub const GETPEERNAME6: &str = "ferry_getpeer6";
    pub const INBOUND: &str = "ferry_inbound";
}

/// Capacity of the original-destination map by 4-tuple: open captured
/// connections on one node (LRU: the oldest entry makes room when full, so a
/// socket that never reached TCP cannot leak an entry forever).
pub const MAX_TRACKED_CONNECTIONS: u32 = 65_536;
/// Capacity of the map by socket cookie, which holds an entry only from the
/// connect program to sock_ops' connect callback in the same `connect()`
/// call (LRU too, for connects that fail in between). Small, so it stays
/// in cache; getpeername, which used to look sockets up here, now uses the
/// 4-tuple map.
pub const MAX_CONNECTS_IN_FLIGHT: u32 = 1_024;
/// Capacity of the pod cgroup map: pods one node can run, with room to spare.
pub const MAX_PODS: u32 = 4_096;
/// Capacity of the excluded-port map, over all pods of a node.
pub const MAX_EXCLUDED_PORTS: u32 = 16_384;
/// How many cgroup levels above the calling task the programs search for the pod cgroup.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// `CaptureConfig::flags`: the agent listens on `agent_ip4`.
pub const CAPTURE_IPV4: u16 = 1 << 0;
/// `CaptureConfig::flags`: the agent listens on `agent_ip6`.
pub const CAPTURE_IPV6: u16 = 1 << 1;

/// Where the connect programs send captured connections: the agent's outbound listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// The agent's IPv4 address, network byte order.
    pub agent_ip4: u32,
    /// The agent's IPv6 address, network byte order.
    pub agent_ip6: [u32; 4],
    /// The outbound listener's port, host byte order.
    pub outbound_port: u16,
    /// `CAPTURE_IPV4` | `CAPTURE_IPV6`.
    pub flags: u16,
}

/// `PodCapture::flags`: refuse new plaintext connections into the pod that
/// do not come from the node (strict mode, or policies that do not admit
/// `unauthenticated`); without it they are let in and counted.
pub const POD_STRICT: u32 = 1 << 0;
/// `PodCapture::flags`: the pod has ports in `excluded_ports`; without it
/// `connect4`/`connect6` skip that lookup.
pub const POD_EXCLUDES_PORTS: u32 = 1 << 1;
/// `PodCapture::flags`: some destination ports of the pod decide plaintext
/// otherwise than `POD_STRICT` says; `inbound` looks them up in `plaintext_ports`.
pub const POD_PLAINTEXT_BY_PORT: u32 = 1 << 2;
/// Capacity of the plaintext-port map, over all pods of a node.
pub const MAX_PLAINTEXT_PORTS: u32 = 16_384;

/// What the programs know about one pod cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCapture {
    /// `POD_STRICT` | `POD_EXCLUDES_PORTS` | `POD_PLAINTEXT_BY_PORT`.
    pub flags: u32,
    pub _pad: u32,
}

/// New TCP connections into a pod that did not come from the node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundCounts {
    /// Let in (permissive mode).
    pub passed: u64,
    /// Dropped (strict mode).
    pub refused: u64,
}

/// One port of one pod: a destination port it sends around the agent
/// (`excluded_ports`), or a port of its own whose plaintext decision is
/// its own (`plaintext_ports`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodPort {
    pub pod_cgroup: u64,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// `OriginalDst::family`: the application dialled an IPv4 socket address.
pub const ORIG_IPV4: u16 = 4;
/// `OriginalDst::family`: the application dialled an IPv6 socket address
/// (possibly IPv4-mapped, on a dual-stack socket).
pub const ORIG_IPV6: u16 = 6;

/// The address an application dialled before the connect program rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    /// Network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    /// `ORIG_IPV4` or `ORIG_IPV6`: which socket address family the application used.
    pub family: u16,
}

/// A TCP connection as the agent's listener sees it: (pod address, pod port)
/// to (agent address, outbound port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub src_addr: [u32; 4],
    /// Network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub dst_addr: [u32; 4],
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
}

/// The second word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), network byte order.
pub const V4_MAPPED_WORD: u32 = 0x0000_ffff_u32.to_be();

/// `a.b.c.d` (network-order word) as `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Whether `addr` is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and have no implicit padding
    // (holes are explicit `_pad` fields), so every byte pattern is a valid value.
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::PodCapture {}
    unsafe impl aya::Pod for super::PodPort {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::InboundCounts {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn shared_types_have_no_implicit_padding() {
        assert_eq!(size_of::<CaptureConfig>(), 4 + 16 + 2 + 2);
        assert_eq!(size_of::<PodCapture>(), 8);
        assert_eq!(size_of::<PodPort>(), 8 + 2 + 6);
        assert_eq!(size_of::<OriginalDst>(), 16 + 2 + 2);
        assert_eq!(size_of::<SockKey>(), 16 + 16 + 2 + 2);
    }

    #[test]
    fn v4_mapped_round_trips() {
        let ip = u32::from_ne_bytes([198, 18, 1, 2]);
        let mapped = v4_mapped(ip);
        assert!(is_v4_mapped(&mapped));
        let bytes: std::vec::Vec<u8> = mapped.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap());
        assert_eq!(
            v6.to_ipv4_mapped(),
            Some(std::net::Ipv4Addr::new(198, 18, 1, 2))
        );
    }
}
