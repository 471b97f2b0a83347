//! Where kubelet puts each pod's cgroup (systemd or cgroupfs driver, every
//! QoS class), and the ones the Kubernetes source has found so far.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

/// Pod cgroups found so far under `root`, by pod UID. A UID's cgroup does
/// not move, so each is looked for on disk until found, not at every rebuild.
pub struct PodCgroups {
    pub root: PathBuf,
    known: HashMap<String, PathBuf>,
}

impl PodCgroups {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            known: HashMap::new(),
        }
    }

    /// Runs one table rebuild with a cgroup finder. UIDs the rebuild did not
    /// ask for (pods that are gone) leave the cache.
    pub fn rebuild<T>(
        &mut self,
        build: impl FnOnce(&mut dyn FnMut(&str) -> Option<PathBuf>) -> T,
    ) -> T {
        let known = std::mem::take(&mut self.known);
        let mut found = HashMap::new();
        let out = build(&mut |uid| {
            let path = known
                .get(uid)
                .cloned()
                .or_else(|| find_pod_cgroup(&self.root, uid))?;
            found.insert(uid.to_owned(), path.clone());
            Some(path)
        });
        self.known = found;
        out
    }
}

/// kubelet's cgroup for the pod with `uid`, under either cgroup driver and
/// any QoS class, if it exists under `root`.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    pod_cgroup_candidates(uid)
        .into_iter()
        .map(|relative| root.join(relative))
        .find(|path| path.is_dir())
}

/// Where kubelet puts a pod's cgroup, relative to the cgroup v2 root: the
/// systemd driver names slices with the UID's dashes as underscores, the
/// cgroupfs driver uses plain directories; Guaranteed pods sit directly
/// under `kubepods`, the other classes one level down.
pub fn pod_cgroup_candidates(uid: &str) -> Vec<PathBuf> {
    let escaped = uid.replace('-', "_");
    let mut candidates = vec![PathBuf::from(format!(
        "kubepods.slice/kubepods-pod{escaped}.slice"
    ))];
    for qos in ["burstable", "besteffort"] {
        candidates.push(PathBuf::from(format!(
            "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{escaped}.slice"
        )));
    }
    candidates.push(PathBuf::from(format!("kubepods/pod{uid}")));
    for qos in ["burstable", "besteffort"] {
        candidates.push(PathBuf::from(format!("kubepods/{qos}/pod{uid}")));
    }
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_are_found_under_both_drivers_and_every_qos_class() {
        let uid = "1f0c-22ab";
        let candidates = pod_cgroup_candidates(uid);
        assert!(candidates.contains(&PathBuf::from(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f0c_22ab.slice"
        )));
        assert!(candidates.contains(&PathBuf::from("kubepods/besteffort/pod1f0c-22ab")));
        assert!(candidates.contains(&PathBuf::from("kubepods.slice/kubepods-pod1f0c_22ab.slice")));
        let root = std::env::temp_dir().join(format!("ferry-cgroup-test-{}", std::process::id()));
        let made = root.join("kubepods/burstable/pod1f0c-22ab");
        std::fs::create_dir_all(&made).unwrap();
        assert_eq!(find_pod_cgroup(&root, uid), Some(made));
        assert_eq!(find_pod_cgroup(&root, "other"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_found_pod_cgroup_is_not_looked_for_again_until_its_pod_goes() {
        let root = std::env::temp_dir().join(format!("ferry-cgroup-cache-{}", std::process::id()));
        let made = root.join("kubepods/besteffort/poda-1");
        std::fs::create_dir_all(&made).unwrap();
        let mut cgroups = PodCgroups::new(root.clone());
        let rebuild = |cgroups: &mut PodCgroups, uids: &[&str]| {
            cgroups.rebuild(|find| uids.iter().map(|uid| find(uid)).collect::<Vec<_>>())
        };
        assert_eq!(
            rebuild(&mut cgroups, &["a-1", "b-2"]),
            [Some(made.clone()), None]
        );
        // Gone from disk: only a look on disk would miss it.
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(rebuild(&mut cgroups, &["a-1"]), [Some(made)]);
        // A rebuild without the pod drops it; the next one looks on disk.
        assert_eq!(rebuild(&mut cgroups, &[]), []);
        assert_eq!(rebuild(&mut cgroups, &["a-1"]), [None]);
    }
}
