//! Ferry's capture programs. They attach to each meshed pod's cgroup (v2):
//!
//! - `ferry_connect4` / `ferry_connect6` rewrite a TCP connect to the agent's
//!   outbound listener and remember the dialled address by socket cookie;
//! - `ferry_sock_ops` moves that record to the connection's 4-tuple as soon
//!   as the local port exists, still inside the same `connect()` (the agent
//!   only sees the accepted socket), and forgets it when the socket closes;
//! - `ferry_getpeer4` / `ferry_getpeer6` hand the application back the address
//!   it dialled, found by the socket's 4-tuple;
//! - `ferry_inbound` (`cgroup_skb/ingress`) sees new TCP connections into the
//!   pod that do not come from the node: it drops them in strict mode and
//!   counts them in permissive mode.
//!
//! Every decision that can live in the agent lives there; these programs only
//! look things up in maps the agent fills.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        EbpfContext as _,
        bindings::{
            BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
            BPF_TCP_CLOSE, bpf_sock, bpf_sock_addr,
        },
        helpers::generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
            bpf_skb_cgroup_id,
        },
        macros::{cgroup_skb, cgroup_sock_addr, map, sock_ops},
        maps::{Array, HashMap, LruHashMap},
        programs::{SkBuffContext, SockAddrContext, SockOpsContext},
    };
    use core::ptr::{read_volatile, write_volatile};

    use aya_log_ebpf::{debug, error};
    use ferry_agent_ebpf::{
        CAPTURE_IPV4, CAPTURE_IPV6, CaptureConfig, InboundCounts, MAX_CGROUP_DEPTH,
        MAX_CONNECTS_IN_FLIGHT, MAX_EXCLUDED_PORTS, MAX_PLAINTEXT_PORTS, MAX_PODS,
        MAX_TRACKED_CONNECTIONS, ORIG_IPV4, ORIG_IPV6, OriginalDst, POD_EXCLUDES_PORTS,
        POD_PLAINTEXT_BY_PORT, POD_STRICT, PodCapture, PodPort, SockKey, is_v4_mapped, v4_mapped,
    };

    /// What a cgroup/sock_addr program returns to let the syscall go on.
    const ALLOW: i32 = 1;
    /// What a cgroup/sock_addr program returns to fail the syscall with EPERM.
    const DENY: i32 = 0;

    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const SOCK_STREAM: u32 = 1;
    const IPPROTO_TCP: u32 = 6;

    #[map(name = "capture_config")]
    static CAPTURE_CONFIG: Array<CaptureConfig> = Array::pinned(1, 0);

    #[map(name = "pod_cgroups")]
    static POD_CGROUPS: HashMap<u64, PodCapture> = HashMap::pinned(MAX_PODS, 0);

    #[map(name = "excluded_ports")]
    static EXCLUDED_PORTS: HashMap<PodPort, u8> = HashMap::pinned(MAX_EXCLUDED_PORTS, 0);

    #[map(name = "orig_dst_connect")]
    static ORIG_DST_CONNECTING: LruHashMap<u64, OriginalDst> =
        LruHashMap::pinned(MAX_CONNECTS_IN_FLIGHT, 0);

    #[map(name = "orig_dst_tuple")]
    static ORIG_DST_BY_TUPLE: LruHashMap<SockKey, OriginalDst> =
        LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);

    #[map(name = "inbound_sources")]
    static INBOUND_SOURCES: HashMap<[u32; 4], u8> = HashMap::pinned(256, 0);

    #[map(name = "inbound_plaintext")]
    static INBOUND_PLAINTEXT: HashMap<u64, InboundCounts> = HashMap::pinned(MAX_PODS, 0);

    #[map(name = "plaintext_ports")]
    static PLAINTEXT_PORTS: HashMap<PodPort, u8> = HashMap::pinned(MAX_PLAINTEXT_PORTS, 0);

    /// What a cgroup_skb program returns to let a packet in, or to drop it.
    const PASS: i32 = 1;
    const DROP: i32 = 0;
    const TCP_SYN: u8 = 0x02;
    const TCP_ACK: u8 = 0x10;

    #[cgroup_skb(ingress)]
    pub fn ferry_inbound(ctx: SkBuffContext) -> i32 {
        inbound(&ctx).unwrap_or(PASS)
    }

    /// Only a connection's first packet (SYN without ACK) is judged: replies to
    /// the pod's own connections and established traffic always pass.
    #[inline(always)]
    fn inbound(ctx: &SkBuffContext) -> Result<i32, i64> {
        let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
        let Some(pod) = (unsafe { POD_CGROUPS.get(&cgroup) }).copied() else {
            return Ok(PASS);
        };
        let first: u8 = ctx.load(0)?;
        let (source, tcp) = match first >> 4 {
            4 => {
                let protocol: u8 = ctx.load(9)?;
                if u32::from(protocol) != IPPROTO_TCP {
                    return Ok(PASS);
                }
                let source: u32 = ctx.load(12)?;
                (v4_mapped(source), usize::from(first & 0x0f) * 4)
            }
            6 => {
                let next: u8 = ctx.load(6)?;
                if u32::from(next) != IPPROTO_TCP {
                    return Ok(PASS);
                }
                let source: [u32; 4] = [ctx.load(8)?, ctx.load(12)?, ctx.load(16)?, ctx.load(20)?];
                (source, 40)
            }
            _ => return Ok(PASS),
        };
        let flags: u8 = ctx.load(tcp + 13)?;
        if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
            return Ok(PASS);
        }
        if INBOUND_SOURCES.get_ptr(&source).is_some() {
            return Ok(PASS);
        }
        let mut strict = pod.flags & POD_STRICT != 0;
        if pod.flags & POD_PLAINTEXT_BY_PORT != 0 {
            let port: u16 = ctx.load(tcp + 2)?;
            let key = PodPort {
                pod_cgroup: cgroup,
                port: u16::from_be(port),
                _pad: [0; 6],
            };
            if let Some(allowed) = unsafe { PLAINTEXT_PORTS.get(&key) } {
                strict = *allowed == 0;
            }
        }
        let mut counts = unsafe { INBOUND_PLAINTEXT.get(&cgroup) }
            .copied()
            .unwrap_or_default();
        if strict {
            counts.refused += 1;
        } else {
            counts.passed += 1;
        }
        let _ = INBOUND_PLAINTEXT.insert(&cgroup, &counts, 0);
        Ok(if strict { DROP } else { PASS })
    }

    #[cgroup_sock_addr(connect4)]
    pub fn ferry_connect4(ctx: SockAddrContext) -> i32 {
        let sa = unsafe { &mut *ctx.sock_addr };
        let Some(config) = capture_for(sa, CAPTURE_IPV4) else {
            return ALLOW;
        };
        let dst_ip = sa.user_ip4;
        let dst_port = u16::from_be(sa.user_port as u16);
        // 127.0.0.0/8: the first octet is the lowest byte of the network-order word.
        if dst_ip & 0xff == 127 || dst_ip == config.agent_ip4 {
            return ALLOW;
        }
        let Some(pod) = pod_cgroup() else {
            return ALLOW;
        };
        if is_excluded(pod, dst_port) {
            return ALLOW;
        }
        let original = OriginalDst {
            addr: v4_mapped(dst_ip),
            port: dst_port,
            family: ORIG_IPV4,
        };
        if !remember(&ctx, &original) {
            return DENY;
        }
        sa.user_ip4 = config.agent_ip4;
        sa.user_port = u32::from(config.outbound_port.to_be());
        debug!(
            &ctx,
            "captured connect4 to {:i}:{}",
            u32::from_be(dst_ip),
            dst_port
        );
        ALLOW
    }

    #[cgroup_sock_addr(connect6)]
    pub fn ferry_connect6(ctx: SockAddrContext) -> i32 {
        let sa = unsafe { &mut *ctx.sock_addr };
        let dst_ip = read_user_ip6(sa);
        // A dual-stack socket dialling ::ffff:a.b.c.d makes an IPv4 connection.
        let mapped = is_v4_mapped(&dst_ip);
        let family = if mapped { CAPTURE_IPV4 } else { CAPTURE_IPV6 };
        let Some(config) = capture_for(sa, family) else {
            return ALLOW;
        };
        let dst_port = u16::from_be(sa.user_port as u16);
        let is_loopback = if mapped {
            dst_ip[3] & 0xff == 127
        } else {
            dst_ip == [0, 0, 0, 1_u32.to_be()]
        };
        let is_agent = if mapped {
            dst_ip[3] == config.agent_ip4
        } else {
            dst_ip == config.agent_ip6
        };
        if is_loopback || is_agent {
            return ALLOW;
        }
        let Some(pod) = pod_cgroup() else {
            return ALLOW;
        };
        if is_excluded(pod, dst_port) {
            return ALLOW;
        }
        let original = OriginalDst {
            addr: dst_ip,
            port: dst_port,
            family: ORIG_IPV6,
        };
        if !remember(&ctx, &original) {
            return DENY;
        }
        write_user_ip6(
            sa,
            if mapped {
                v4_mapped(config.agent_ip4)
            } else {
                config.agent_ip6
            },
        );
        sa.user_port = u32::from(config.outbound_port.to_be());
        debug!(&ctx, "captured connect6 to port {}", dst_port);
        ALLOW
    }

    #[sock_ops]
    pub fn ferry_sock_ops(ctx: SockOpsContext) -> u32 {
        match ctx.op() {
            BPF_SOCK_OPS_TCP_CONNECT_CB => {
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                let Some(original) = (unsafe { ORIG_DST_CONNECTING.get(&cookie) }).copied() else {
                    return 0;
                };
                let _ = ORIG_DST_CONNECTING.remove(&cookie);
                let key = sock_key(&ctx);
                if ORIG_DST_BY_TUPLE.insert(&key, &original, 0).is_err() {
                    error!(&ctx, "cannot record captured connection by 4-tuple");
                    return 0;
                }
                // Ask for state changes so the records go when the socket closes.
                let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
                if ctx.set_cb_flags(flags as i32).is_err() {
                    error!(&ctx, "cannot subscribe to TCP state changes");
                }
            }
            BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
                let _ = ORIG_DST_BY_TUPLE.remove(&sock_key(&ctx));
            }
            _ => {}
        }
        0
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn ferry_getpeer4(ctx: SockAddrContext) -> i32 {
        let sa = unsafe { &mut *ctx.sock_addr };
        if let Some(original) = captured_peer(sa) {
            sa.user_ip4 = original.addr[3];
            sa.user_port = u32::from(original.port.to_be());
        }
        ALLOW
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn ferry_getpeer6(ctx: SockAddrContext) -> i32 {
        let sa = unsafe { &mut *ctx.sock_addr };
        if let Some(original) = captured_peer(sa) {
            write_user_ip6(sa, original.addr);
            sa.user_port = u32::from(original.port.to_be());
        }
        ALLOW
    }

    /// The capture configuration, if this is a TCP socket and the agent
    /// listens on the address family the connection will use.
    #[inline(always)]
    fn capture_for(sa: &bpf_sock_addr, family: u16) -> Option<CaptureConfig> {
        if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
            return None;
        }
        let config = CAPTURE_CONFIG.get(0)?;
        (config.flags & family != 0).then_some(*config)
    }

    /// The pod cgroup the calling task is in, and what the agent said of it:
    /// its own cgroup (the simulated nodes put processes there) or the
    /// nearest ancestor the agent registered (Kubernetes puts them in a
    /// container cgroup below the pod's).
    #[inline(always)]
    fn pod_cgroup() -> Option<(u64, PodCapture)> {
        let own = unsafe { bpf_get_current_cgroup_id() };
        if let Some(pod) = unsafe { POD_CGROUPS.get(&own) } {
            return Some((own, *pod));
        }
        for level in 1..MAX_CGROUP_DEPTH {
            let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
            if ancestor == 0 || ancestor == own {
                return None;
            }
            if let Some(pod) = unsafe { POD_CGROUPS.get(&ancestor) } {
                return Some((ancestor, *pod));
            }
        }
        None
    }

    #[inline(always)]
    fn is_excluded((pod_cgroup, pod): (u64, PodCapture), port: u16) -> bool {
        if pod.flags & POD_EXCLUDES_PORTS == 0 {
            return false;
        }
        let key = PodPort {
            pod_cgroup,
            port,
            _pad: [0; 6],
        };
        EXCLUDED_PORTS.get_ptr(&key).is_some()
    }

    /// Records the dialled address under the socket's cookie; false if the map refused.
    #[inline(always)]
    fn remember(ctx: &SockAddrContext, original: &OriginalDst) -> bool {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if ORIG_DST_CONNECTING.insert(&cookie, original, 0).is_err() {
            // Failing the connect beats letting it leave the pod unencrypted.
            error!(ctx, "cannot record original destination; refusing connect");
            return false;
        }
        true
    }

    /// `user_ip6` word by word: the verifier allows only plain 4-byte loads
    /// and stores on the context, never a memcpy of the array.
    #[inline(always)]
    fn read_user_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
        unsafe { read_words(&raw const sa.user_ip6) }
    }

    #[inline(always)]
    unsafe fn read_words(p: *const [u32; 4]) -> [u32; 4] {
        unsafe {
            [
                read_volatile(&raw const (*p)[0]),
                read_volatile(&raw const (*p)[1]),
                read_volatile(&raw const (*p)[2]),
                read_volatile(&raw const (*p)[3]),
            ]
        }
    }

    #[inline(always)]
    fn write_user_ip6(sa: &mut bpf_sock_addr, addr: [u32; 4]) {
        let p = &raw mut sa.user_ip6;
        unsafe {
            write_volatile(&raw mut (*p)[0], addr[0]);
            write_volatile(&raw mut (*p)[1], addr[1]);
            write_volatile(&raw mut (*p)[2], addr[2]);
            write_volatile(&raw mut (*p)[3], addr[3]);
        }
    }

    /// The connection as the agent's listener sees it: pod side first.
    #[inline(always)]
    fn sock_key(ctx: &SockOpsContext) -> SockKey {
        // Every context field is read once, up front, with a volatile load:
        // otherwise LLVM may select between field pointers and dereference the
        // result, which the verifier refuses ("modified ctx ptr").
        let ops = ctx.ops;
        let (family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port) = unsafe {
            (
                read_volatile(&raw const (*ops).family),
                read_volatile(&raw const (*ops).local_ip4),
                read_volatile(&raw const (*ops).remote_ip4),
                read_words(&raw const (*ops).local_ip6),
                read_words(&raw const (*ops).remote_ip6),
                read_volatile(&raw const (*ops).local_port),
                read_volatile(&raw const (*ops).remote_port),
            )
        };
        // sock_ops gives the remote port in network byte order in the upper half.
        let remote_port = u16::from_be((remote_port >> 16) as u16);
        tuple_key(
            family,
            (local_ip4, remote_ip4),
            (local_ip6, remote_ip6),
            (local_port as u16, remote_port),
        )
    }

    /// Local then remote address and port, IPv4 as `::ffff:a.b.c.d`.
    #[inline(always)]
    fn tuple_key(
        family: u32,
        (local_ip4, remote_ip4): (u32, u32),
        (local_ip6, remote_ip6): ([u32; 4], [u32; 4]),
        (src_port, dst_port): (u16, u16),
    ) -> SockKey {
        let (src_addr, dst_addr) =
            if family == AF_INET || (family == AF_INET6 && is_v4_mapped(&remote_ip6)) {
                // For a dual-stack socket dialling IPv4, the IPv6 fields may not be
                // filled in yet when the connect callback runs; the IPv4 ones are.
                (v4_mapped(local_ip4), v4_mapped(remote_ip4))
            } else {
                (local_ip6, remote_ip6)
            };
        SockKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
        }
    }

    /// What the application dialled, if the socket getpeername is asked about
    /// is a captured connection: one whose peer is the agent's outbound
    /// listener. Every other socket (a server's `accept` asks too) is told
    /// apart by that, without a look into the large 4-tuple map.
    #[inline(always)]
    fn captured_peer(sa: &bpf_sock_addr) -> Option<OriginalDst> {
        let config = CAPTURE_CONFIG.get(0)?;
        let key = peer_key(sa);
        let agent = key.dst_addr == v4_mapped(config.agent_ip4) || key.dst_addr == config.agent_ip6;
        if !agent || key.dst_port != config.outbound_port {
            return None;
        }
        unsafe { ORIG_DST_BY_TUPLE.get(&key) }.copied()
    }

    /// The key [`sock_key`] gave the connection getpeername is asked about,
    /// read from the socket itself (the same fields, as `bpf_sock` names them).
    #[inline(always)]
    fn peer_key(sa: &bpf_sock_addr) -> SockKey {
        let sk: *const bpf_sock = unsafe { sa.__bindgen_anon_1.sk };
        let (family, src_ip4, dst_ip4, src_ip6, dst_ip6, src_port, dst_port) = unsafe {
            (
                read_volatile(&raw const (*sk).family),
                read_volatile(&raw const (*sk).src_ip4),
                read_volatile(&raw const (*sk).dst_ip4),
                read_words(&raw const (*sk).src_ip6),
                read_words(&raw const (*sk).dst_ip6),
                read_volatile(&raw const (*sk).src_port),
                read_volatile(&raw const (*sk).dst_port),
            )
        };
        tuple_key(
            family,
            (src_ip4, dst_ip4),
            (src_ip6, dst_ip6),
            (src_port as u16, u16::from_be(dst_port)),
        )
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// On the host this crate is only a library of shared types; the programs
/// exist for `bpfel-unknown-none` alone.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("ferry-capture holds eBPF programs; the agent loads them.");
}
