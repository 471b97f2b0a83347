//! The workload file (`ferry_proto::workload_file`), which the agent and
//! the CA read and re-read from disk, and the table an agent builds from it
//! (`WorkloadTable::from_file`).
//!
//! Input: a mode byte picking the agent's node (n1, n2, or n9, which files
//! seldom list), then the file's YAML text.
//!
//! What must hold: an accepted file serializes to YAML that parses back to
//! the same file; a file accepted for a node is accepted without one (the
//! node's own checks only add problems) and lists that node, with every pod
//! of it given an absolute cgroup; a refused file has problems, each of
//! which says something. The table lists each pod (`namespace/name`) once,
//! on its file's node, and finds it by that key; every pod IP leads back
//! (`by_ip`) to a pod that has it, and no other IP leads anywhere; a pod is
//! meshed exactly when its namespace is listed with `ferry.dev/mesh:
//! enabled`; `local_meshed` yields only meshed pods of this node with a
//! cgroup; every policy problem says something.

#![no_main]

use std::collections::HashSet;

use ferry_agent::workload::{WorkloadTable, file::WorkloadFile};
use ferry_fuzz::{assert_message, policy_settings, split_mode};
use libfuzzer_sys::fuzz_target;

const NODES: [&str; 3] = ["n1", "n2", "n9"];

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data, NODES.len() as u8) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let node = NODES[usize::from(mode)];
    let file = match WorkloadFile::parse(text, None) {
        Ok(file) => file,
        Err(problems) => {
            refused(&problems);
            if let Err(for_node) = WorkloadFile::parse(text, Some(node)) {
                refused(&for_node);
            } else {
                panic!("refused without a node, accepted for {node}: {problems:?}");
            }
            return;
        }
    };
    let yaml = serde_yaml::to_string(&file).expect("a workload file serializes");
    assert_eq!(
        WorkloadFile::parse(&yaml, None).as_ref(),
        Ok(&file),
        "round trip through {yaml}"
    );
    match WorkloadFile::parse(text, Some(node)) {
        Ok(for_node) => {
            assert_eq!(for_node, file);
            assert!(
                file.nodes.iter().any(|n| n.name == node),
                "{node} is listed"
            );
            for pod in file.pods.iter().filter(|p| p.node == node) {
                assert!(
                    pod.cgroup.as_ref().is_some_and(|dir| dir.is_absolute()),
                    "{pod:?} of this node has an absolute cgroup"
                );
            }
        }
        Err(problems) => refused(&problems),
    }
    check_table(
        &file,
        &WorkloadTable::from_file(&file, node, &policy_settings()),
    );
});

fn refused(problems: &[String]) {
    assert!(!problems.is_empty(), "refused without a problem");
    for problem in problems {
        assert_message(problem, &problems);
    }
}

fn check_table(file: &WorkloadFile, table: &WorkloadTable) {
    let node = table.node.name.as_str();
    let mut keys = HashSet::new();
    for pod in &table.workloads {
        let key = pod.key();
        assert!(keys.insert(key.clone()), "{key} is listed twice");
        let listed = file
            .pods
            .iter()
            .find(|p| p.namespace == pod.namespace && p.name == pod.name)
            .expect("every pod of the table is one of the file");
        assert_eq!(pod.node, listed.node, "{key} on the node the file says");
        assert_eq!(table.by_key(&key).map(|w| &w.node), Some(&pod.node));
        let meshed = file.namespaces.iter().any(|ns| {
            ns.name == pod.namespace
                && ns.labels.get("ferry.dev/mesh").map(String::as_str) == Some("enabled")
        });
        assert_eq!(pod.meshed, meshed, "{key} meshed");
        for ip in &pod.ips {
            let owner = table.by_ip(*ip).expect("every pod IP has a pod");
            assert!(
                owner
                    .ips
                    .iter()
                    .any(|own| own.to_canonical() == ip.to_canonical()),
                "{ip} leads to {}, which does not have it",
                owner.key()
            );
        }
    }
    assert_eq!(
        table.workloads.len(),
        file.pods.len(),
        "every pod is in the table"
    );
    let ips: HashSet<_> = file.pods.iter().flat_map(|p| &p.ips).collect();
    for service in &file.services {
        for ip in &service.cluster_ips {
            if !ips.contains(ip) {
                assert!(
                    table.by_ip(*ip).is_none(),
                    "{ip} is a Service's, not a pod's"
                );
            }
        }
    }
    for pod in table.local_meshed() {
        assert!(
            pod.meshed && pod.node == node && pod.cgroup.is_some(),
            "{pod:?} is not a meshed pod of {node} with a cgroup"
        );
    }
    for problem in &table.policy_problems {
        assert_message(problem, &table.policy_problems);
    }
    for policy in table.policy_views() {
        for problem in &policy.problems {
            assert_message(problem, &policy);
        }
    }
}
