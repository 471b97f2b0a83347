//! Where a captured connection goes: a pure function of the workload table,
//! the source address and the address the application dialled.

use std::net::{IpAddr, SocketAddr};

use ferry_proto::{SpiffeId, TUNNEL_PORT};

use crate::{tunnel::pool::PoolKey, workload::WorkloadTable};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Plain TCP to the destination: it is not meshed (or the agent has no identities).
    Passthrough,
    /// A meshed pod on this node: straight to it, after authorization.
    Direct {
        source: SpiffeId,
        destination: SpiffeId,
        pod: String,
    },
    /// A meshed pod on another node: through that node's agent.
    Tunnel { key: PoolKey, pod: String },
    /// Refused, and why.
    Deny(String),
}

/// Decides for a connection from `source` to `dialled`. `trust_domain` is
/// `None` when the agent runs without identities.
pub fn decide(
    table: &WorkloadTable,
    source: IpAddr,
    dialled: SocketAddr,
    trust_domain: Option<&str>,
) -> Decision {
    let Some(trust_domain) = trust_domain else {
        return Decision::Passthrough;
    };
    let Some(destination) = table.by_ip(dialled.ip()).filter(|pod| pod.meshed) else {
        return Decision::Passthrough;
    };
    let Some(client) = table.by_ip(source) else {
        // Captured, so it came from a meshed pod; if the table does not know
        // it yet, there is no identity to send it with.
        return Decision::Deny(format!("source {source} is not a known pod"));
    };
    let identity = |namespace: &str, service_account: &str| {
        SpiffeId::new(trust_domain, namespace, service_account)
    };
    let (source_id, destination_id) = match (
        identity(&client.namespace, &client.service_account),
        identity(&destination.namespace, &destination.service_account),
    ) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => return Decision::Deny(e.to_string()),
    };
    let pod = destination.key();
    if destination.node == table.node.name {
        if let Err(reason) = table.authorize(&source_id, destination) {
            return Decision::Deny(reason);
        }
        return Decision::Direct {
            source: source_id,
            destination: destination_id,
            pod,
        };
    }
    let Some(agent) = table.node_address(&destination.node, dialled.ip()) else {
        return Decision::Deny(format!(
            "pod {pod} runs on node {}, whose address is unknown",
            destination.node
        ));
    };
    Decision::Tunnel {
        key: PoolKey {
            source: source_id,
            destination: destination_id,
            address: SocketAddr::new(agent, TUNNEL_PORT),
        },
        pod,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::file::WorkloadFile;

    fn table() -> WorkloadTable {
        let text = "
nodes: [{ name: n1, addresses: [198.19.0.1, \"2001:2:0:ff::1\"] }, { name: n2, addresses: [198.19.0.2, \"2001:2:0:ff::2\"] }]
namespaces: [{ name: shop, labels: { ferry.dev/mesh: enabled } }, { name: legacy }]
pods:
  - { name: web, namespace: shop, serviceAccount: web, node: n1, ips: [198.18.1.2, \"2001:2:0:1::2\"], cgroup: /x/web }
  - { name: api, namespace: shop, serviceAccount: api, node: n1, ips: [198.18.1.3], cgroup: /x/api }
  - { name: db, namespace: shop, serviceAccount: db, node: n2, ips: [198.18.2.2, \"2001:2:0:2::2\"] }
  - { name: old, namespace: legacy, serviceAccount: old, node: n2, ips: [198.18.2.3] }
policies: [{ namespace: shop, serviceAccount: api, allow: [] }]
";
        WorkloadTable::from_file(&WorkloadFile::parse(text, None).unwrap(), "n1")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_remote_meshed_pod_goes_through_its_nodes_agent_in_the_same_family() {
        let table = table();
        let to = "198.18.2.2:5432".parse().unwrap();
        let Decision::Tunnel { key, pod } =
            decide(&table, ip("198.18.1.2"), to, Some("cluster.local"))
        else {
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
        let Decision::Tunnel { key, .. } =
            decide(&table, ip("2001:2:0:1::2"), to6, Some("cluster.local"))
        else {
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
        );
        // shop/api's policy allows nobody.
        assert!(
            matches!(decision, Decision::Deny(ref reason) if reason.contains("policy for shop/api")),
            "{decision:?}"
        );
        let decision = decide(
            &table,
            ip("198.18.1.3"),
            "198.18.1.2:80".parse().unwrap(),
            Some("cluster.local"),
        );
        assert!(
            matches!(decision, Decision::Direct { ref pod, .. } if pod == "shop/web"),
            "{decision:?}"
        );
    }

    #[test]
    fn unmeshed_and_unknown_destinations_pass_through() {
        let table = table();
        for to in ["198.18.2.3:80", "203.0.113.9:443"] {
            assert_eq!(
                decide(
                    &table,
                    ip("198.18.1.2"),
                    to.parse().unwrap(),
                    Some("cluster.local")
                ),
                Decision::Passthrough
            );
        }
        // Without identities everything passes through.
        assert_eq!(
            decide(
                &table,
                ip("198.18.1.2"),
                "198.18.2.2:5432".parse().unwrap(),
                None
            ),
            Decision::Passthrough
        );
    }

    #[test]
    fn an_unknown_source_is_refused_for_meshed_destinations() {
        let table = table();
        let decision = decide(
            &table,
            ip("198.18.1.99"),
            "198.18.2.2:5432".parse().unwrap(),
            Some("cluster.local"),
        );
        assert!(matches!(decision, Decision::Deny(_)));
    }
}
