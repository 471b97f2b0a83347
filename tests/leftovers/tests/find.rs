//! The finder and the remover on things this test makes itself (a network
//! namespace and a process named like the harness's `ferry-load`), never on
//! anyone else's: other tests may be running on the machine. Needs root
//! (`ip netns add`); fails, never skips, without it.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command},
};

use ferry_leftovers::{Leftover, Note, find, remove};

/// What the test made, removed again on drop, also when it fails.
struct Made {
    netns: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for Made {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn finds_a_namespace_and_a_process_of_the_tests_and_removes_them() {
    let id = std::process::id();
    let mut made = Made {
        netns: format!("ferry-leftovers-test-{id}"),
        dir: std::env::temp_dir().join(format!("ferry-leftovers-test-{id}")),
        child: None,
    };
    let added = Command::new("ip")
        .args(["netns", "add", &made.netns])
        .status()
        .expect("cannot run ip (install iproute2)");
    assert!(
        added.success(),
        "ip netns add {} failed (root?)",
        made.netns
    );
    // A process called ferry-load: `sleep` under that name.
    fs::create_dir_all(&made.dir).unwrap();
    let program = made.dir.join("ferry-load");
    fs::copy("/bin/sleep", &program).unwrap();
    let child = made
        .child
        .insert(Command::new(&program).arg("60").spawn().unwrap());
    let process = Leftover::Process {
        pid: i32::try_from(child.id()).unwrap(),
        name: "ferry-load".to_owned(),
    };
    let netns = Leftover::Netns(made.netns.clone());

    let found = find().unwrap();
    assert!(found.contains(&process), "{process} not in {found:?}");
    assert!(found.contains(&netns), "{netns} not in {found:?}");

    let mut notes = Vec::new();
    remove(&[process.clone(), netns.clone()], &mut |note| {
        notes.push(match note {
            Note::Doing(line) => format!("$ {line}"),
            Note::Failed(what) => format!("failed: {what}"),
        });
    });
    // A killed child stays a zombie until reaped, and zombies do not count.
    let found = find().unwrap();
    assert!(!found.contains(&process), "{process} still found");
    assert!(!found.contains(&netns), "{netns} still found");
    let kill = format!("$ kill -TERM {}", made.child.as_ref().unwrap().id());
    let delete = format!("$ ip netns delete {}", made.netns);
    assert!(
        notes.contains(&kill) && notes.contains(&delete),
        "{notes:?}"
    );
    assert!(!notes.iter().any(|n| n.starts_with("failed")), "{notes:?}");
}
