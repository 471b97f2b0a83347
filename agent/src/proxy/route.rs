//! Where a captured connection goes: a pure function of the workload table,
//! the source address and the address the application dialled.

use std::net::{IpAddr, SocketAddr};

use ferry_proto::{SpiffeId, TUNNEL_PORT};

use super::Refused;
use crate::{
    tunnel::pool::PoolKey,
    workload::{
        WorkloadTable,
        policy::{Caller, Verdict},
    },
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Plain TCP to `target`: not meshed (or the agent has no identities).
    Passthrough { target: SocketAddr },
    /// A meshed pod on this node: straight to it, after authorization.
    Direct {
        source: SpiffeId,
        destination: SpiffeId,
        pod: String,
        target: SocketAddr,
        /// The `Allow` policy that admitted it; `None`: the namespace's default.
        policy: Option<String>,
    },
    /// A meshed pod on another node: through that node's agent.
    Tunnel {
        key: PoolKey,
        pod: String,
        target: SocketAddr,
    },
}

impl Decision {
    /// Where the connection goes: the pod address (a Service's resolved
    /// endpoint) or, for passthrough, what was dialled.
    pub fn target(&self) -> SocketAddr {
        match self {
            Self::Passthrough { target }
            | Self::Direct { target, .. }
            | Self::Tunnel { target, .. } => *target,
        }
    }

    /// The identity the connection is sent with, if it is meshed.
    pub fn source_identity(&self) -> Option<&SpiffeId> {
        match self {
            Self::Passthrough { .. } => None,
            Self::Direct { source, .. } => Some(source),
            Self::Tunnel { key, .. } => Some(&key.source),
        }
    }

    /// The identity the destination must prove, if it is meshed.
    pub fn destination_identity(&self) -> Option<&SpiffeId> {
        match self {
            Self::Passthrough { .. } => None,
            Self::Direct { destination, .. } => Some(destination),
            Self::Tunnel { key, .. } => Some(&key.destination),
        }
    }
}

/// Decides for a connection from `source` to `dialled`. `trust_domain` is
/// `None` when the agent runs without identities. A Service's ClusterIP is
/// resolved to one of its endpoints: `choose` picks among the candidate
/// endpoint addresses (it returns an index). `Err` says why the connection
/// is refused.
pub fn decide(
    table: &WorkloadTable,
    source: IpAddr,
    dialled: SocketAddr,
    trust_domain: Option<&str>,
    choose: &mut dyn FnMut(&[SocketAddr]) -> usize,
) -> Result<Decision, Refused> {
    let target = match table.service_by_ip(dialled.ip()) {
        None => dialled,
        Some(service) => {
            let Some(port) = service.target_port(dialled.port()) else {
                return Err(Refused::NoServicePort {
                    service: service.key(),
                    port: dialled.port(),
                });
            };
            let candidates: Vec<SocketAddr> = table
                .endpoints(service, dialled.ip())
                .iter()
                .map(|(_, ip)| SocketAddr::new(*ip, port))
                .collect();
            if candidates.is_empty() {
                return Err(Refused::NoEndpoints(service.key()));
            }
            candidates[choose(&candidates).min(candidates.len() - 1)]
        }
    };
    let Some(trust_domain) = trust_domain else {
        return Ok(Decision::Passthrough { target });
    };
    let Some(destination) = table.by_ip(target.ip()).filter(|pod| pod.meshed) else {
        return Ok(Decision::Passthrough { target });
    };
    let Some(client) = table.by_ip(source) else {
        // Captured, so it came from a meshed pod; if the table does not know
        // it yet, there is no identity to send it with.
        return Err(Refused::UnknownSource(source));
    };
    let identity = |namespace: &str, service_account: &str| {
        SpiffeId::new(trust_domain, namespace, service_account)
    };
    let source_id = identity(&client.namespace, &client.service_account)?;
    let destination_id = identity(&destination.namespace, &destination.service_account)?;
    let pod = destination.key();
    if destination.node == table.node.name {
        return match table.authorize(Caller::Identity(&source_id), destination, target.port()) {
            Verdict::Allowed { policy } => Ok(Decision::Direct {
                source: source_id,
                destination: destination_id,
                pod,
                target,
                policy,
            }),
            Verdict::Denied(denied) => Err(Refused::Policy(denied)),
        };
    }
    let Some(agent) = table.node_address(&destination.node, target.ip()) else {
        return Err(Refused::UnknownNode {
            pod,
            node: destination.node.clone(),
        });
    };
    Ok(Decision::Tunnel {
        key: PoolKey {
            source: source_id,
            destination: destination_id,
            address: SocketAddr::new(agent, TUNNEL_PORT),
        },
        pod,
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> WorkloadTable {
        let text = "
nodes: [{ name: n1, addresses: [198.19.0.1, \"2001:2:0:ff::1\"] }, { name: n2, addresses: [198.19.0.2, \"2001:2:0:ff::2\"] }]
namespaces: [{ name: shop, labels: { ferry.dev/mesh: enabled } }, { name: legacy }]
pods:
  - { name: web, namespace: shop, serviceAccount: web, node: n1, ips: [198.18.1.2, \"2001:2:0:1::2\"], cgroup: /x/web }
  - { name: api, namespace: shop, serviceAccount: api, node: n1, ips: [198.18.1.3], cgroup: /x/api, labels: { app: api } }
  - { name: db, namespace: shop, serviceAccount: db, node: n2, ips: [198.18.2.2, \"2001:2:0:2::2\"] }
  - { name: old, namespace: legacy, serviceAccount: old, node: n2, ips: [198.18.2.3] }
  - { name: db-2, namespace: shop, serviceAccount: db, node: n2, ips: [198.18.2.4] }
services:
  - { name: db, namespace: shop, clusterIPs: [10.96.0.10], ports: [{ port: 80, targetPort: 8080 }], endpoints: [db, db-2] }
policies: [{ name: api-admits-nobody, namespace: shop, spec: { selector: { matchLabels: { app: api } }, from: [] } }]
";
        WorkloadTable::for_test(text, "n1")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn first(_: &[SocketAddr]) -> usize {
        0
    }

    #[test]
    fn a_service_ip_resolves_to_an_endpoint_and_its_target_port() {
        let table = table();
        let mut seen = Vec::new();
        let mut choose = |candidates: &[SocketAddr]| {
            seen = candidates.to_vec();
            1
        };
        let decision = decide(
            &table,
            ip("198.18.1.2"),
            "10.96.0.10:80".parse().unwrap(),
            Some("cluster.local"),
            &mut choose,
        )
        .unwrap();
        assert_eq!(
            seen,
            [
                "198.18.2.2:8080".parse().unwrap(),
                "198.18.2.4:8080".parse().unwrap()
            ]
        );
        let Decision::Tunnel { target, pod, .. } = decision else {
            panic!("{decision:?}")
        };
        assert_eq!(target, "198.18.2.4:8080".parse().unwrap());
        assert_eq!(pod, "shop/db-2");
        let unknown_port = decide(
            &table,
            ip("198.18.1.2"),
            "10.96.0.10:81".parse().unwrap(),
            Some("cluster.local"),
            &mut first,
        );
        assert!(
            matches!(unknown_port, Err(ref r) if r.to_string().contains("no port 81")),
            "{unknown_port:?}"
        );
    }

    #[test]
    fn a_remote_meshed_pod_goes_through_its_nodes_agent_in_the_same_family() {
        let table = table();
        let to = "198.18.2.2:5432".parse().unwrap();
        let Decision::Tunnel { key, pod, .. } = decide(
            &table,
            ip("198.18.1.2"),
            to,
            Some("cluster.local"),
            &mut first,
        )
        .unwrap() else {
            panic!("not tunnelled");
        };
        assert_eq!(pod, "shop/db");
        assert_eq!(
            key.source.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(
            key.destination.to_string(),
            "spiffe://cluster.local/ns/shop/sa/db"
        );
        assert_eq!(key.address, "198.19.0.2:15008".parse().unwrap());
        let to6 = "[2001:2:0:2::2]:5432".parse().unwrap();
        let Decision::Tunnel { key, .. } = decide(
            &table,
            ip("2001:2:0:1::2"),
            to6,
            Some("cluster.local"),
            &mut first,
        )
        .unwrap() else {
            panic!("not tunnelled");
        };
        assert_eq!(key.address, "[2001:2:0:ff::2]:15008".parse().unwrap());
    }

    #[test]
    fn local_meshed_pods_go_direct_after_authorization() {
        let table = table();
        let decision = decide(
            &table,
            ip("198.18.1.2"),
            "198.18.1.3:80".parse().unwrap(),
            Some("cluster.local"),
            &mut first,
        );
        // shop/api's policy allows nobody.
        assert!(
            matches!(decision, Err(ref reason) if reason.to_string().contains("allow policies: shop/api-admits-nobody")),
            "{decision:?}"
        );
        let decision = decide(
            &table,
            ip("198.18.1.3"),
            "198.18.1.2:80".parse().unwrap(),
            Some("cluster.local"),
            &mut first,
        );
        assert!(
            matches!(decision, Ok(Decision::Direct { ref pod, .. }) if pod == "shop/web"),
            "{decision:?}"
        );
    }

    #[test]
    fn unmeshed_and_unknown_destinations_pass_through() {
        let table = table();
        for to in ["198.18.2.3:80", "203.0.113.9:443"] {
            let to: SocketAddr = to.parse().unwrap();
            let decision = decide(
                &table,
                ip("198.18.1.2"),
                to,
                Some("cluster.local"),
                &mut first,
            );
            assert_eq!(decision, Ok(Decision::Passthrough { target: to }));
        }
        // Without identities everything passes through.
        let to: SocketAddr = "198.18.2.2:5432".parse().unwrap();
        let decision = decide(&table, ip("198.18.1.2"), to, None, &mut first);
        assert_eq!(decision, Ok(Decision::Passthrough { target: to }));
    }

    #[test]
    fn an_unknown_source_is_refused_for_meshed_destinations() {
        let table = table();
        let decision = decide(
            &table,
            ip("198.18.1.99"),
            "198.18.2.2:5432".parse().unwrap(),
            Some("cluster.local"),
            &mut first,
        );
        assert!(decision.is_err(), "{decision:?}");
    }
}
