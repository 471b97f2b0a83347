//! The table an agent builds from what the Kubernetes API lists
//! (`workload::kube_source::build_table`): Namespaces, Pods, Services,
//! EndpointSlices and AuthorizationPolicies, trimmed as the reflectors keep
//! them (`Listed::kept`), and keyed as a reflector's store keys them (one
//! object per namespace and name, the last one listed).
//!
//! Input: JSON, `{"namespaces": [...], "pods": [...], "services": [...],
//! "slices": [...], "policies": [...]}`, each list optional, of the API's
//! own objects (k8s-openapi and Ferry's CRD type read it).
//!
//! What must hold: the table lists each pod (`namespace/name`) once, and
//! finds it by that key on its one node; each comes from a listed pod that
//! is not finished nor on the host network, named and placed as that pod
//! is, with the addresses its status gives; a pod is meshed exactly when a
//! namespace of its name carries the label `ferry.dev/mesh=enabled`, and
//! strict exactly when that namespace is annotated `ferry.dev/inbound:
//! strict`; a pod has a cgroup exactly when it is meshed, on this node and
//! has a uid, and it is the one found for that uid; its excluded ports are
//! port numbers written in its `ferry.dev/excluded-ports` annotation. The
//! same objects make the same table, and in any order the same pods.

#![no_main]

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::PathBuf,
};

use ferry_agent::workload::{
    LocalNode, Workload, WorkloadTable,
    kube_source::{EXCLUDED_PORTS_ANNOTATION, Listed, build_table},
};
use ferry_fuzz::{NODE, policy_settings};
use ferry_proto::policy::AuthorizationPolicy;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

/// What the API server lists, as the input gives it.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Objects {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    policies: Vec<AuthorizationPolicy>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(objects) = serde_json::from_slice::<Objects>(data) else {
        return;
    };
    let Objects {
        namespaces,
        pods,
        services,
        slices,
        policies,
    } = objects;
    let (namespaces, pods, services, slices, policies) = (
        stored(namespaces, |o| &o.metadata),
        stored(pods, |o| &o.metadata),
        stored(services, |o| &o.metadata),
        stored(slices, |o| &o.metadata),
        stored(policies, |o| &o.metadata),
    );
    let listed = |reversed: bool| {
        Listed::kept(
            ordered(&namespaces, reversed),
            ordered(&pods, reversed),
            ordered(&services, reversed),
            ordered(&slices, reversed),
            ordered(&policies, reversed),
        )
    };
    let kept = listed(false);
    let table = build(&kept);
    check(&kept, &table);
    assert_eq!(build(&kept), table, "the same objects make the same table");
    let reversed = build(&listed(true));
    assert_eq!(
        sorted(&reversed),
        sorted(&table),
        "the stores' order changes the pods"
    );
});

fn build(listed: &Listed) -> WorkloadTable {
    let node = LocalNode {
        name: NODE.to_owned(),
        addresses: vec!["198.19.0.1".parse().expect("an address")],
    };
    build_table(&node, listed, &policy_settings(), cgroup_of)
}

/// Where the fuzzed kubelet keeps a pod's cgroup.
fn cgroup_of(uid: &str) -> Option<PathBuf> {
    Some(PathBuf::from(format!("/sys/fs/cgroup/kubepods/pod{uid}")))
}

/// A reflector's store holds one object per namespace and name: the last.
fn stored<K>(objects: Vec<K>, meta: fn(&K) -> &ObjectMeta) -> Vec<K> {
    let mut seen = HashSet::new();
    let mut kept: Vec<K> = objects
        .into_iter()
        .rev()
        .filter(|object| {
            let meta = meta(object);
            seen.insert((meta.namespace.clone(), meta.name.clone()))
        })
        .collect();
    kept.reverse();
    kept
}

fn ordered<K: Clone>(objects: &[K], reversed: bool) -> Vec<K> {
    let mut objects = objects.to_vec();
    if reversed {
        objects.reverse();
    }
    objects
}

fn sorted(table: &WorkloadTable) -> Vec<Workload> {
    let mut pods: Vec<Workload> = table.workloads.iter().map(|w| (**w).clone()).collect();
    pods.sort_by_key(Workload::key);
    pods
}

fn check(listed: &Listed, table: &WorkloadTable) {
    let mut keys = HashSet::new();
    for workload in &table.workloads {
        let key = workload.key();
        assert!(keys.insert(key.clone()), "{key} is listed twice");
        assert_eq!(
            table.by_key(&key).map(|w| &w.node),
            Some(&workload.node),
            "{key} is found on its node"
        );
        let pod = listed
            .pods
            .iter()
            .find(|p| {
                p.metadata.namespace.as_ref() == Some(&workload.namespace)
                    && p.metadata.name.as_ref() == Some(&workload.name)
            })
            .expect("every pod of the table was listed");
        from_pod(workload, pod);
        let namespace = listed
            .namespaces
            .iter()
            .find(|ns| ns.metadata.name.as_ref() == Some(&workload.namespace));
        let says = |map: Option<&BTreeMap<String, String>>, key: &str, value: &str| {
            map.and_then(|m| m.get(key)).is_some_and(|v| v == value)
        };
        let meshed = namespace
            .is_some_and(|ns| says(ns.metadata.labels.as_ref(), "ferry.dev/mesh", "enabled"));
        let strict = namespace.is_some_and(|ns| {
            says(
                ns.metadata.annotations.as_ref(),
                "ferry.dev/inbound",
                "strict",
            )
        });
        assert_eq!(workload.meshed, meshed, "{key} meshed");
        assert_eq!(workload.strict, strict, "{key} strict");
        let cgroup = pod
            .metadata
            .uid
            .as_deref()
            .filter(|_| meshed && workload.node == NODE)
            .and_then(cgroup_of);
        assert_eq!(workload.cgroup, cgroup, "{key}'s cgroup");
    }
    for pod in table.local_meshed() {
        assert!(pod.meshed && pod.node == NODE, "{pod:?}");
    }
}

/// `workload` is what `pod` says.
fn from_pod(workload: &Workload, pod: &Pod) {
    let key = workload.key();
    let spec = pod.spec.as_ref().expect("a pod of the table has a spec");
    let status = pod
        .status
        .as_ref()
        .expect("a pod of the table has a status");
    assert!(
        !matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
        "{key} has finished"
    );
    assert_ne!(spec.host_network, Some(true), "{key} is the host's");
    assert_eq!(
        spec.node_name.as_ref(),
        Some(&workload.node),
        "{key}'s node"
    );
    assert!(!workload.ips.is_empty(), "{key} has no address");
    let written: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    for ip in &workload.ips {
        assert!(written.contains(ip), "{key}'s {ip} is not in its status");
    }
    let annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXCLUDED_PORTS_ANNOTATION));
    for port in &workload.excluded_ports {
        assert!(
            annotation.is_some_and(|text| text.split(',').any(|item| names_port(item, *port))),
            "{key} excludes {port}, which its annotation {annotation:?} does not name"
        );
    }
}

/// `item` of an annotation writes `port`: digits (after spaces and an
/// optional `+`), worth `port`, which is a port (1–65535).
fn names_port(item: &str, port: u16) -> bool {
    let digits = item.trim();
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    port != 0
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.trim_start_matches('0') == port.to_string()
}
