//! The agent with its Kubernetes workload source, against a stand-in API
//! server that lists and watches the way the real one does: real agents and
//! CA, pod cgroups where kubelet makes them, and the API server changing,
//! dropping watches, going away and forgetting history under them.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, ensure};
use ferry_tests::{
    CgroupDriver, Cluster, NodeId, PORT, PodId, PodOptions, WAIT,
    ca::CaOptions,
    inspect::{PROGRAMS, admin_json, eventually, live_connection, programs_on},
    kube_api::{FakeApiServer, namespace, pod},
    testapp::{Family, Served, TestApp, pod_addr},
};
use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde_json::Value;

/// Whether the agent's capture programs are on the pod's cgroup (all of
/// them) or not (none), failing on anything in between.
fn captured(cluster: &Cluster, pod: PodId) -> anyhow::Result<bool> {
    let cgroup = &cluster.pod(pod).cgroup;
    let attached = programs_on(cgroup)?;
    ensure!(
        attached.is_empty() || attached == PROGRAMS,
        "{}: partly attached: {attached:?}",
        cgroup.display()
    );
    Ok(!attached.is_empty())
}

fn wait_captured(cluster: &Cluster, pod: PodId, want: bool) -> anyhow::Result<()> {
    let name = &cluster.pod(pod).name;
    eventually(|| {
        ensure!(
            captured(cluster, pod)? == want,
            "{name}: expected captured = {want}"
        );
        Ok(())
    })
    .with_context(|| format!("pod {name}"))
}

/// The ids of the links that hold the capture programs on the pod's cgroup
/// (from their pins), sorted. An agent that adopts a link swaps the program
/// in it but keeps the link; one that detached and attached again would
/// have made new links.
fn link_ids(agent: &ferry_tests::Agent, cluster: &Cluster, pod: PodId) -> anyhow::Result<Vec<u64>> {
    use std::os::unix::fs::MetadataExt as _;
    let cgroup_id = std::fs::metadata(&cluster.pod(pod).cgroup)?.ino();
    let dir = agent.pin_dir.join("links").join(cgroup_id.to_string());
    let mut ids = Vec::new();
    for pin in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        let pin = pin?.path();
        let link =
            ferry_tests::inspect::bpftool(&["link", "show", "pinned", &pin.to_string_lossy()])?;
        ids.push(
            link["id"]
                .as_u64()
                .with_context(|| format!("no link id: {link}"))?,
        );
    }
    ids.sort_unstable();
    ensure!(
        ids.len() == PROGRAMS.len(),
        "links pinned in {}: {ids:?}",
        dir.display()
    );
    Ok(ids)
}

/// The node's agent's view of the workload with `ip`.
fn workload_at(cluster: &Cluster, node: NodeId, ip: std::net::IpAddr) -> anyhow::Result<Value> {
    let workloads = admin_json(cluster, node, "/workloads")?;
    workloads
        .as_array()
        .context("/workloads is not a list")?
        .iter()
        .find(|w| {
            w["ips"]
                .as_array()
                .is_some_and(|ips| ips.iter().any(|i| i == &ip.to_string()))
        })
        .cloned()
        .with_context(|| format!("no workload with {ip}: {workloads}"))
}

#[test]
fn the_agent_follows_labels_pod_churn_and_lost_watches() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("kube-follow")?;
    cluster.use_kubelet_cgroups(CgroupDriver::Cgroupfs);
    let n1 = cluster.add_node()?;
    let web = cluster.add_pod(n1, PodOptions::unmeshed("web", "shop", "web"))?;
    let old = cluster.add_pod(n1, PodOptions::unmeshed("old", "shop", "old"))?;
    let late = cluster.add_pod(n1, PodOptions::unmeshed("late", "shop", "late"))?;
    let kubeconfig = cluster.tempdir().join("kubeconfig");
    let api = FakeApiServer::start_for(&cluster, &kubeconfig)?;
    api.apply(namespace("shop", false));
    api.apply(pod(&cluster, web));
    api.apply(pod(&cluster, old));
    let mut agent = cluster.agent(n1).kubernetes(&kubeconfig).start()?;

    // The agent says where it learns the workloads.
    let config = &admin_json(&cluster, n1, "/config_dump")?["config"];
    ensure!(
        config["node"] == cluster.node(n1).name.as_str()
            && config["source"]["kubernetes"] == true
            && config["source"]["cgroupRoot"]
                == cluster.node_cgroup_root(n1).to_string_lossy().as_ref(),
        "/config_dump config: {config}"
    );

    // Pods exist before their namespace is labelled: none is captured, then all are.
    ensure!(!captured(&cluster, web)? && !captured(&cluster, old)?);
    api.apply(namespace("shop", true));
    wait_captured(&cluster, web, true)?;
    wait_captured(&cluster, old, true)?;

    // A pod created later is captured.
    api.apply(pod(&cluster, late));
    wait_captured(&cluster, late, true)?;

    // A new agent lists before it reconciles: it adopts the pinned links
    // instead of detaching pods it has not heard of yet and attaching anew.
    let before = link_ids(&agent, &cluster, web)?;
    agent.kill9();
    let agent = cluster.agent(n1).kubernetes(&kubeconfig).start()?;
    ensure!(
        link_ids(&agent, &cluster, web)? == before,
        "the restarted agent made new links for the web pod"
    );

    // A new pod gets a deleted pod's address: the address is the new pod's.
    let reused = cluster.pod(old).ipv4.into();
    api.delete(pod(&cluster, old));
    let mut successor = pod(&cluster, old);
    successor.metadata.name = Some("old-2".to_owned());
    successor.metadata.uid = Some("a-uid-kubelet-has-no-cgroup-for-yet".to_owned());
    successor
        .spec
        .as_mut()
        .context("spec")?
        .service_account_name = Some("batch".to_owned());
    api.apply(successor);
    wait_captured(&cluster, old, false)?;
    eventually(|| {
        let now = workload_at(&cluster, n1, reused)?;
        ensure!(
            now["name"] == "old-2" && now["serviceAccount"] == "batch",
            "{reused} still belongs to {now}"
        );
        Ok(())
    })?;

    // The watch drops (an API server restart): the agent watches again from
    // where it was, without listing everything again, and sees what changed.
    let lists = api.lists();
    api.drop_watches();
    api.delete(pod(&cluster, late));
    wait_captured(&cluster, late, false)?;
    ensure!(
        api.lists() == lists,
        "the agent listed again ({} lists, {lists} before) where resuming its watch was enough",
        api.lists()
    );

    // The API server is away while the namespace loses its label and it
    // forgets its history: the agent gets 410 Gone, lists again, and
    // converges on what the API server now says.
    api.set_available(false);
    api.apply(namespace("shop", false));
    api.compact();
    std::thread::sleep(Duration::from_secs(1));
    api.set_available(true);
    wait_captured(&cluster, web, false)?;
    ensure!(
        api.lists() > lists,
        "the agent never listed again after 410 Gone"
    );
    Ok(())
}

#[test]
fn pods_found_through_the_api_server_talk_over_mtls_and_services_follow_their_endpoints()
-> anyhow::Result<()> {
    let mut cluster = Cluster::new("kube-mesh")?;
    cluster.use_kubelet_cgroups(CgroupDriver::Systemd);
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("web-0", "shop", "web"))?;
    let db0 = cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let db1 = cluster.add_pod(n2, PodOptions::meshed("db-1", "shop", "db"))?;
    let ca = cluster.start_ca_with(&CaOptions {
        kubernetes: true,
        ..CaOptions::default()
    })?;
    let _a1 = cluster.agent(n1).ca(&ca).start()?;
    let _a2 = cluster.agent(n2).ca(&ca).start()?;
    let api = ca.api.as_ref().context("no stand-in API server")?;
    for pod in [client, db0, db1] {
        ensure!(captured(&cluster, pod)?, "{}", cluster.pod(pod).name);
    }

    let mut servers = Vec::new();
    for pod in [db0, db1] {
        let listen = pod_addr(&cluster, pod, Family::V4, PORT);
        servers.push(TestApp::serve(listen).bytes(16).start(&mut cluster, pod)?);
    }
    // Pod to pod: through the tunnel, with the identities from the API server.
    let to = pod_addr(&cluster, db0, Family::V4, PORT);
    let hold = TestApp::hold(to).start(&mut cluster, client)?;
    let live = live_connection(&cluster, n1, to)?;
    ensure!(live["route"] == "tunnel", "{live}");
    ensure!(
        live["sourceIdentity"] == "spiffe://cluster.local/ns/shop/sa/web"
            && live["destinationIdentity"] == "spiffe://cluster.local/ns/shop/sa/db",
        "{live}"
    );
    hold.release()?;
    servers[0].wait_for::<Served>(WAIT)?;

    // A Service whose named target port and endpoints come from its EndpointSlice.
    let cluster_ip = "198.18.255.20";
    api.apply(Service {
        metadata: meta("db"),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.to_owned()),
            cluster_ips: Some(vec![cluster_ip.to_owned()]),
            ports: Some(vec![ServicePort {
                name: Some("sql".to_owned()),
                port: 80,
                target_port: Some(IntOrString::String("sql".to_owned())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    });
    let service = SocketAddr::new(cluster_ip.parse()?, 80);
    for (now, idle) in [(db0, db1), (db1, db0)] {
        let name = cluster.pod(now).name.clone();
        api.apply(endpoint_slice(&name));
        eventually(|| {
            let dump = admin_json(&cluster, n1, "/config_dump")?;
            let db = dump["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "db"))
                .with_context(|| format!("no Service db in {}", dump["services"]))?;
            ensure!(
                db["endpoints"] == serde_json::json!([format!("shop/{name}")]),
                "{db}"
            );
            Ok(())
        })?;
        let connect = TestApp::connect(service)
            .bytes(16)
            .repeat(5)
            .run(&mut cluster, client)?;
        ensure!(
            connect.success(),
            "through the Service to {name}: {}",
            connect.stderr
        );
        let (now_index, idle_index) = (server_index(now, db0), server_index(idle, db0));
        for _ in 0..5 {
            servers[now_index].wait_for::<Served>(WAIT)?;
        }
        ensure!(
            servers[idle_index]
                .wait_for::<Served>(Duration::from_millis(300))
                .is_err(),
            "a pod that is not an endpoint of the Service got a connection"
        );
    }
    Ok(())
}

fn server_index(pod: PodId, first: PodId) -> usize {
    usize::from(pod != first)
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some("shop".to_owned()),
        ..ObjectMeta::default()
    }
}

/// Service db's one EndpointSlice, naming `pod` as its only endpoint and
/// the pods' port for the Service's `sql` port.
fn endpoint_slice(pod: &str) -> EndpointSlice {
    let mut metadata = meta("db-slice");
    metadata.labels = Some(
        [("kubernetes.io/service-name".to_owned(), "db".to_owned())]
            .into_iter()
            .collect(),
    );
    EndpointSlice {
        metadata,
        address_type: "IPv4".to_owned(),
        endpoints: vec![Endpoint {
            addresses: vec![],
            target_ref: Some(ObjectReference {
                kind: Some("Pod".to_owned()),
                name: Some(pod.to_owned()),
                namespace: Some("shop".to_owned()),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        }],
        ports: Some(vec![EndpointPort {
            name: Some("sql".to_owned()),
            port: Some(i32::from(PORT)),
            ..EndpointPort::default()
        }]),
    }
}
