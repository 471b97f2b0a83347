//! `route::decide` against the workload table it reads.

use super::policy::*;
use super::*;

// Routes: a small cluster of four nodes (n1 is this one; n4's address is
// unknown), three namespaces, a few pods and Services on shared addresses.

const LOCAL: &str = "n1";
const NODES: [&str; 4] = ["n1", "n2", "n3", "n4"];
/// The last is no valid ServiceAccount name: its pod has no identity.
const POD_ACCOUNTS: [&str; 3] = ["a", "b", "Not_A_Name"];
const POD_IPS: [&str; 9] = [
    "198.18.0.1",
    "198.18.0.2",
    "198.18.0.3",
    "198.18.0.4",
    "198.18.0.5",
    "198.18.0.6",
    "2001:db8::1",
    "2001:db8::2",
    "2001:db8::3",
];
const SERVICE_IPS: [&str; 3] = ["10.96.0.1", "10.96.0.2", "fd00::a"];
/// Neither a pod's nor a Service's, or a pod's and a Service's written as
/// IPv4-mapped IPv6.
const OTHER_IPS: [&str; 3] = ["203.0.113.1", "::ffff:198.18.0.1", "::ffff:10.96.0.1"];

/// Where each node's agent listens; `None`: the table does not know.
fn agent_addresses(node: &str) -> Option<Vec<IpAddr>> {
    match node {
        "n1" => Some(vec![ip("198.19.0.1"), ip("2001:db8:ff::1")]),
        "n2" => Some(vec![ip("198.19.0.2")]),
        "n3" => Some(vec![ip("2001:db8:ff::3")]),
        _ => None,
    }
}

#[derive(Debug, Clone)]
struct PodGen {
    namespace: usize,
    account: usize,
    node: usize,
    ips: Vec<usize>,
    app: Option<&'static str>,
}

#[derive(Debug, Clone)]
struct ServiceGen {
    ips: Vec<usize>,
    ports: Vec<(u16, Option<u16>)>,
    /// Pod indexes; past the last pod: an endpoint the table does not know.
    endpoints: Vec<usize>,
}

#[derive(Debug, Clone)]
struct World {
    meshed: [bool; 3],
    defaults: [DefaultPolicy; 3],
    pods: Vec<PodGen>,
    services: Vec<ServiceGen>,
    policies: Vec<PolicyGen>,
}

impl World {
    fn pod_key(&self, i: usize) -> String {
        let namespace = self.pods.get(i).map_or(0, |p| p.namespace);
        format!("{}/p{i}", NAMESPACES[namespace])
    }

    fn table(&self) -> WorkloadTable {
        let workloads = self
            .pods
            .iter()
            .enumerate()
            .map(|(i, pod)| Workload {
                name: format!("p{i}"),
                namespace: NAMESPACES[pod.namespace].to_owned(),
                service_account: POD_ACCOUNTS[pod.account].to_owned(),
                node: NODES[pod.node].to_owned(),
                ips: pod.ips.iter().map(|&i| ip(POD_IPS[i])).collect(),
                meshed: self.meshed[pod.namespace],
                cgroup: None,
                excluded_ports: Vec::new(),
                strict: false,
                labels: labels(pod.app),
            })
            .collect();
        let services = self
            .services
            .iter()
            .enumerate()
            .map(|(i, service)| Service {
                name: format!("s{i}"),
                namespace: "shop".to_owned(),
                cluster_ips: service.ips.iter().map(|&i| ip(SERVICE_IPS[i])).collect(),
                ports: service
                    .ports
                    .iter()
                    .map(|&(port, target_port)| ServicePort { port, target_port })
                    .collect(),
                endpoints: service.endpoints.iter().map(|&i| self.pod_key(i)).collect(),
            })
            .collect();
        let nodes = NODES
            .iter()
            .filter_map(|node| Some(((*node).to_owned(), agent_addresses(node)?)))
            .filter(|(node, _)| node != LOCAL)
            .collect();
        let facts = PolicyFacts {
            policies: self.policies.iter().map(PolicyGen::spec).collect(),
            namespace_defaults: NAMESPACES
                .iter()
                .zip(self.defaults)
                .map(|(ns, default)| ((*ns).to_owned(), default))
                .collect(),
            problems: Vec::new(),
        };
        WorkloadTable::new(
            LocalNode {
                name: LOCAL.to_owned(),
                addresses: agent_addresses(LOCAL).expect("this node's addresses"),
            },
            nodes,
            workloads,
            services,
            facts,
            &PolicySettings {
                trust_domain: TD.to_owned(),
                cluster_default: DefaultPolicy::AllUnauthenticated,
            },
        )
    }

    /// The pod that owns `address`: the last one listed with it.
    fn owner(&self, address: IpAddr) -> Option<usize> {
        let address = address.to_canonical();
        (0..self.pods.len())
            .rev()
            .find(|&i| self.pods[i].ips.iter().any(|&j| ip(POD_IPS[j]) == address))
    }

    /// The caller a pod connects as, if it has an identity.
    fn caller(&self, pod: usize) -> Option<CallerGen> {
        let pod = &self.pods[pod];
        (pod.account < ACCOUNTS.len()).then_some(CallerGen::Identity(pod.namespace, pod.account))
    }

    fn identity(&self, pod: usize) -> Option<SpiffeId> {
        let pod = &self.pods[pod];
        SpiffeId::new(TD, NAMESPACES[pod.namespace], POD_ACCOUNTS[pod.account]).ok()
    }

    /// The addresses a Service resolves to for `dialled`: each known
    /// endpoint's first address of the dialled family, on `port`.
    fn candidates(&self, service: &Service, dialled: IpAddr, port: u16) -> Vec<SocketAddr> {
        let v4 = dialled.to_canonical().is_ipv4();
        service
            .endpoints
            .iter()
            .filter_map(|key| (0..self.pods.len()).find(|&i| self.pod_key(i) == *key))
            .filter_map(|i| {
                let first = self.pods[i]
                    .ips
                    .iter()
                    .map(|&j| ip(POD_IPS[j]))
                    .find(|ip| ip.is_ipv4() == v4)?;
                Some(SocketAddr::new(first, port))
            })
            .collect()
    }
}

fn worlds() -> impl Strategy<Value = World> {
    let pod = (
        0..NAMESPACES.len(),
        prop_oneof![6 => 0..ACCOUNTS.len(), 1 => Just(2)],
        prop_oneof![2 => Just(0usize), 1 => 1..NODES.len()],
        subsequence((0..POD_IPS.len()).collect::<Vec<_>>(), 1..=2),
        apps(),
    )
        .prop_map(|(namespace, account, node, ips, app)| PodGen {
            namespace,
            account,
            node,
            ips,
            app,
        });
    let service = (
        subsequence((0..SERVICE_IPS.len()).collect::<Vec<_>>(), 1..=2),
        vec(
            (
                prop::sample::select(vec![80u16, 443]),
                proptest::option::of(prop::sample::select(vec![8080u16, 80])),
            ),
            1..3,
        ),
        vec(0usize..9, 0..4),
    )
        .prop_map(|(ips, ports, endpoints)| ServiceGen {
            ips,
            ports,
            endpoints,
        });
    (
        [weighted(0.8), weighted(0.8), weighted(0.8)],
        [defaults(), defaults(), defaults()],
        vec(pod, 1..8),
        vec(service, 0..3),
        policies(),
    )
        .prop_map(|(meshed, defaults, pods, services, policies)| World {
            meshed,
            defaults,
            pods,
            services,
            policies,
        })
}

#[derive(Debug, Clone)]
struct Connection {
    source: IpAddr,
    dialled: SocketAddr,
    identities: bool,
    /// What the balancer returns: at times past the last candidate.
    pick: usize,
}

/// A world and a connection in it: mostly from its pods' addresses to its
/// pods' and Services' addresses, at times from or to an unknown one.
fn scenarios() -> impl Strategy<Value = (World, Connection)> {
    worlds().prop_flat_map(|world| {
        let pod_ips: Vec<&str> = world
            .pods
            .iter()
            .flat_map(|pod| pod.ips.iter().map(|&i| POD_IPS[i]))
            .collect();
        let mut service_ips: Vec<&str> = world
            .services
            .iter()
            .flat_map(|service| service.ips.iter().map(|&i| SERVICE_IPS[i]))
            .collect();
        if service_ips.is_empty() {
            service_ips = SERVICE_IPS.to_vec();
        }
        let source = prop_oneof![
            8 => prop::sample::select(pod_ips.clone()),
            1 => Just("198.18.9.9"),
        ];
        let dialled = prop_oneof![
            4 => prop::sample::select(pod_ips),
            3 => prop::sample::select(service_ips),
            1 => prop::sample::select(OTHER_IPS.to_vec()),
        ];
        let connection = (
            source,
            dialled,
            prop_oneof![2 => Just(80u16), 1 => Just(443), 1 => Just(5432)],
            weighted(0.9),
            prop_oneof![0usize..4, any::<usize>()],
        )
            .prop_map(|(source, dialled, port, identities, pick)| Connection {
                source: ip(source),
                dialled: SocketAddr::new(ip(dialled), port),
                identities,
                pick,
            });
        (Just(world), connection)
    })
}

/// The decision, and the candidates `decide` offered the balancer, if any.
fn route(
    table: &WorkloadTable,
    connection: &Connection,
) -> (Result<Decision, Refused>, Option<Vec<SocketAddr>>) {
    let mut offered = None;
    let decision = decide(
        table,
        connection.source,
        connection.dialled,
        connection.identities.then_some(TD),
        &mut |candidates: &[SocketAddr]| {
            offered = Some(candidates.to_vec());
            connection.pick
        },
    );
    (decision, offered)
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_meshed_route_goes_to_the_meshed_pod_that_owns_its_target(
        (world, connection) in scenarios(),
    ) {
        let table = world.table();
        let (decision, _) = route(&table, &connection);
        match &decision {
            Ok(Decision::Passthrough { target }) => {
                if connection.identities {
                    let owner = world.owner(target.ip());
                    prop_assert!(
                        owner.is_none_or(|i| !world.meshed[world.pods[i].namespace]),
                        "passed through to meshed {:?}", owner.map(|i| world.pod_key(i))
                    );
                }
            }
            Ok(decision @ (Decision::Direct { pod, .. } | Decision::Tunnel { pod, .. })) => {
                prop_assert!(connection.identities, "meshed without identities: {:?}", decision);
                let owner = world.owner(decision.target().ip());
                prop_assert_eq!(owner.map(|i| world.pod_key(i)), Some(pod.clone()));
                let owner = owner.expect("checked");
                prop_assert!(world.meshed[world.pods[owner].namespace], "{} is not meshed", pod);
                prop_assert_eq!(decision.destination_identity().cloned(), world.identity(owner));
                let client = world.owner(connection.source);
                prop_assert!(client.is_some(), "sent for an unknown source: {:?}", decision);
                prop_assert_eq!(
                    decision.source_identity().cloned(),
                    client.and_then(|i| world.identity(i))
                );
            }
            Err(Refused::UnknownSource(source)) => {
                prop_assert_eq!(*source, connection.source);
                prop_assert!(connection.identities && world.owner(*source).is_none());
            }
            Err(_) => {}
        }
    }

    #[test]
    fn without_identities_every_connection_passes_through(
        (world, connection) in scenarios(),
    ) {
        let table = world.table();
        let connection = Connection { identities: false, ..connection };
        let (decision, _) = route(&table, &connection);
        match decision {
            Ok(Decision::Passthrough { target }) => {
                if table.service_by_ip(connection.dialled.ip()).is_none() {
                    prop_assert_eq!(target, connection.dialled);
                }
            }
            Err(Refused::NoServicePort { .. } | Refused::NoEndpoints(_)) => {}
            other => prop_assert!(false, "without identities: {:?}", other),
        }
    }

    #[test]
    fn local_pods_go_direct_and_remote_pods_through_their_nodes_agent(
        (world, connection) in scenarios(),
    ) {
        let table = world.table();
        let (decision, _) = route(&table, &connection);
        let node_of = |target: SocketAddr| {
            world.owner(target.ip()).map(|i| NODES[world.pods[i].node])
        };
        match &decision {
            Ok(Decision::Direct { target, .. }) => {
                prop_assert_eq!(node_of(*target), Some(LOCAL));
            }
            Ok(Decision::Tunnel { target, key, .. }) => {
                let node = node_of(*target).expect("an owned target");
                prop_assert_ne!(node, LOCAL, "tunnelled to a pod of this node");
                let addresses = agent_addresses(node).expect("a known node");
                let v4 = target.ip().to_canonical().is_ipv4();
                let agent = addresses
                    .iter()
                    .find(|a| a.is_ipv4() == v4)
                    .or(addresses.first())
                    .copied()
                    .expect("an address");
                prop_assert_eq!(key.address, SocketAddr::new(agent, TUNNEL_PORT));
            }
            Err(Refused::UnknownNode { node, .. }) => {
                prop_assert!(agent_addresses(node).is_none(), "node {} has an address", node);
            }
            _ => {}
        }
    }

    #[test]
    fn a_service_address_resolves_to_one_of_its_own_endpoints(
        (world, connection) in scenarios(),
    ) {
        let table = world.table();
        let (decision, offered) = route(&table, &connection);
        let dialled = connection.dialled;
        let Some(service) = table.service_by_ip(dialled.ip()) else {
            prop_assert_eq!(offered, None, "the balancer was asked for no Service");
            if let Ok(decision) = &decision {
                prop_assert_eq!(decision.target(), dialled);
            }
            return Ok(());
        };
        let Some(port) = service.target_port(dialled.port()) else {
            prop_assert!(
                matches!(decision, Err(Refused::NoServicePort { .. })),
                "{:?}", decision
            );
            prop_assert_eq!(offered, None);
            return Ok(());
        };
        let candidates = world.candidates(service, dialled.ip(), port);
        if candidates.is_empty() {
            prop_assert!(matches!(decision, Err(Refused::NoEndpoints(_))), "{:?}", decision);
            prop_assert_eq!(offered, None);
            return Ok(());
        }
        prop_assert_eq!(offered.as_ref(), Some(&candidates));
        if let Ok(decision) = &decision {
            let chosen = candidates[connection.pick.min(candidates.len() - 1)];
            prop_assert_eq!(decision.target(), chosen);
        }
    }

    #[test]
    fn a_direct_route_is_exactly_what_the_destinations_policies_admit(
        (world, connection) in scenarios(),
    ) {
        let table = world.table();
        let (decision, offered) = route(&table, &connection);
        let target = match &offered {
            Some(candidates) => candidates[connection.pick.min(candidates.len() - 1)],
            None => connection.dialled,
        };
        // The verdict the route must follow, when it comes to one: with
        // identities, from a pod with one, to a meshed pod of this node.
        let expected = (|| {
            if !connection.identities {
                return None;
            }
            let destination = world.owner(target.ip())?;
            let pod = &world.pods[destination];
            if !world.meshed[pod.namespace] || NODES[pod.node] != LOCAL {
                return None;
            }
            world.identity(destination)?;
            let caller = world.caller(world.owner(connection.source)?)?;
            Some(expected_verdict(
                &world.policies,
                &world.pod_key(destination),
                pod.namespace,
                pod.app,
                world.defaults[pod.namespace],
                caller,
                target.port(),
            ))
        })();
        match (&decision, expected) {
            (Ok(Decision::Direct { policy, .. }), Some(Verdict::Allowed { policy: want })) => {
                prop_assert_eq!(policy, &want);
            }
            (Err(Refused::Policy(denied)), Some(Verdict::Denied(want))) => {
                prop_assert_eq!(denied, &want);
            }
            (Ok(Decision::Direct { .. }) | Err(Refused::Policy(_)), want)
            | (_, want @ Some(_)) => {
                prop_assert!(false, "decided {:?}, the policies say {:?}", decision, want);
            }
            _ => {}
        }
    }

    #[test]
    fn the_table_authorizes_local_pods_by_their_policies_and_no_others(
        world in worlds(),
        caller in callers(),
        port in port(),
    ) {
        let table = world.table();
        let id = caller.identity();
        for (i, pod) in world.pods.iter().enumerate() {
            let key = world.pod_key(i);
            let workload = table.by_key(&key).expect("every pod is in the table");
            let verdict = table.authorize(caller_of(id.as_ref()), workload, port);
            if NODES[pod.node] == LOCAL {
                let want = expected_verdict(
                    &world.policies, &key, pod.namespace, pod.app,
                    world.defaults[pod.namespace], caller, port,
                );
                prop_assert_eq!(verdict, want);
            } else {
                prop_assert!(!allowed(&verdict), "{} of {} admitted here", key, NODES[pod.node]);
            }
        }
    }
}
