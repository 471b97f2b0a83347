//! Where the cgroup v2 hierarchy is mounted, read from the mount table: the
//! tests' cgroups are below it, so the harness and the finder both need it.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result};

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Every place a cgroup v2 hierarchy is mounted, in mount-table order
/// (`/sys/fs/cgroup` on a pure v2 machine, `/sys/fs/cgroup/unified` on a
/// hybrid one). There is only one hierarchy, but it may be mounted twice.
pub fn cgroup2_points() -> Result<Vec<PathBuf>> {
    let table =
        fs::read_to_string(MOUNTINFO).with_context(|| format!("cannot read {MOUNTINFO}"))?;
    Ok(cgroup2_points_in(&table))
}

/// The mount points of the `cgroup2` lines of a mountinfo file:
/// `ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER`.
fn cgroup2_points_in(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            if fs.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            mount
                .split_whitespace()
                .nth(4)
                .map(|point| PathBuf::from(unescape(point)))
        })
        .collect()
}

/// Mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_of_a_hybrid_machine() {
        let mountinfo = "\
29 23 0:25 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
30 29 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
31 29 0:27 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            cgroup2_points_in(mountinfo),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert!(cgroup2_points_in("31 29 0:27 / /x rw - cgroup cgroup rw\n").is_empty());
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape(r"/mnt/my\040cgroup"), "/mnt/my cgroup");
        assert_eq!(unescape(r"/plain\path"), r"/plain\path");
    }
}
