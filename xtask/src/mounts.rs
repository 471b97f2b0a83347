//! Reading the mount table, to tell whether bpffs and cgroup v2 are mounted
//! (and where) without running `mount` or `findmnt`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of `/proc/self/mountinfo`: where something is mounted and what.
#[derive(Debug, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    pub fstype: String,
}

/// Everything mounted in this process's mount namespace.
pub fn all() -> Result<Vec<Mount>> {
    let table =
        fs::read_to_string(MOUNTINFO).with_context(|| format!("cannot read {MOUNTINFO}"))?;
    Ok(table.lines().filter_map(parse_line).collect())
}

/// Whether a file system of `fstype` is mounted exactly at `point`.
pub fn is_mounted(point: &Path, fstype: &str) -> Result<bool> {
    Ok(all()?
        .iter()
        .any(|mount| mount.point == point && mount.fstype == fstype))
}

/// Every place a cgroup v2 hierarchy is mounted (there is only one hierarchy,
/// but it may be mounted more than once).
pub fn cgroup2_points() -> Result<Vec<PathBuf>> {
    let mounts = all()?.into_iter().filter(|mount| mount.fstype == "cgroup2");
    Ok(mounts.map(|mount| mount.point).collect())
}

/// Parses `ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER`.
fn parse_line(line: &str) -> Option<Mount> {
    let (before, after) = line.split_once(" - ")?;
    let point = before.split(' ').nth(4)?;
    let fstype = after.split(' ').next()?;
    Some(Mount {
        point: PathBuf::from(unescape(point)),
        fstype: fstype.to_owned(),
    })
}

/// Undoes the kernel's octal escapes (`\040` for a space, …) in mount points.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_point_and_type_past_optional_fields() {
        let line = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 master:2 - cgroup2 cgroup2 rw";
        let mount = parse_line(line).unwrap();
        assert_eq!(
            mount,
            Mount {
                point: "/sys/fs/cgroup/unified".into(),
                fstype: "cgroup2".into()
            }
        );
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let line = r"50 1 0:40 / /mnt/a\040b rw - bpf bpf rw";
        assert_eq!(parse_line(line).unwrap().point, PathBuf::from("/mnt/a b"));
    }

    #[test]
    fn this_machine_has_a_root_mount() {
        assert!(
            all()
                .unwrap()
                .iter()
                .any(|mount| mount.point == Path::new("/"))
        );
    }
}
