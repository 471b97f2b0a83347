//! `cargo xtask demo` runs `ferry-demo`: it must prove what it claims and
//! leave the machine as it found it.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, MutexGuard, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use ferry_tests::{
    bin_path,
    leftovers::{self, Note},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// How long the demo may take to print its proof.
const PROOF_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the demo may take to clean up after Ctrl-C.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Each test checks that the whole machine is clean afterwards, so the demo
/// runs once at a time.
fn one_demo_at_a_time() -> MutexGuard<'static, ()> {
    static DEMO: Mutex<()> = Mutex::new(());
    DEMO.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn the_demo_proves_mtls_between_two_nodes_and_cleans_up() -> anyhow::Result<()> {
    let _one = one_demo_at_a_time();
    let demo = bin_path("ferry-demo")?;
    let started = Instant::now();
    let output = Command::new(&demo)
        .arg("--exit-after-proof")
        .output()
        .with_context(|| format!("cannot run {}", demo.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "ferry-demo failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    ensure!(
        started.elapsed() < Duration::from_secs(60),
        "the demo took {:?}",
        started.elapsed()
    );
    for expected in [
        "ferry_connect4",
        "ferry_sock_ops",
        "spiffe://cluster.local/ns/shop/sa/client serial",
        "spiffe://cluster.local/ns/shop/sa/server serial",
        "its getpeername() says 198.18.2.2:8080",
        "node 2's agent, at the end of the tunnel",
        "arrived intact: client true, server true",
        "a TLS 1.3 ClientHello for server.shop.sa.cluster.local, and none of the client's plaintext",
        "route tunnel, source identity spiffe://cluster.local/ns/shop/sa/client",
        "route inboundTunnel, source identity spiffe://cluster.local/ns/shop/sa/client",
        "shards pools its own",
        "original destination 198.18.2.2:8081",
        "the server saw it as 198.18.1.3:",
        "removed the nodes",
    ] {
        ensure!(
            stdout.contains(expected),
            "the demo did not print {expected:?}:\n{stdout}"
        );
    }
    let left = leftovers::find()?;
    ensure!(
        left.is_empty(),
        "the demo left behind:\n{}",
        leftovers::bulleted(&left)
    );
    Ok(())
}

/// A `ferry-demo` waiting for Ctrl-C. Dropped while it still runs (a failed
/// test), it gets SIGTERM, then SIGKILL and the leftovers are removed.
struct Interactive {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    printed: String,
}

impl Interactive {
    fn start() -> anyhow::Result<Self> {
        let demo = bin_path("ferry-demo")?;
        let mut child = Command::new(&demo)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", demo.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut from_stderr = child.stderr.take().context("no stderr")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let into = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut chunk = [0; 4096];
            while let Ok(len @ 1..) = from_stderr.read(&mut chunk) {
                if let Ok(mut text) = into.lock() {
                    text.push_str(&String::from_utf8_lossy(&chunk[..len]));
                }
            }
        });
        Ok(Self {
            child,
            stdout: rx,
            stderr,
            printed: String::new(),
        })
    }

    /// Reads stdout until a line contains `text`.
    fn wait_for(&mut self, text: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.printed.push_str(&line);
                    self.printed.push('\n');
                    if line.contains(text) {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "ferry-demo did not print {text:?} within {timeout:?}:\n{}",
                        self.printed
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!(
                    "ferry-demo ended ({:?}) without printing {text:?}:\n{}\n{}",
                    self.child.try_wait(),
                    self.printed,
                    self.stderr()
                ),
            }
        }
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = Pid::from_raw(i32::try_from(self.child.id())?);
        kill(pid, signal).with_context(|| format!("cannot send {signal} to ferry-demo"))
    }

    /// Waits for the exit; `None` if it did not come within `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the demo printed on stderr so far.
    fn stderr(&self) -> String {
        self.stderr.lock().map_or_else(
            |poisoned| poisoned.into_inner().clone(),
            |text| text.clone(),
        )
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = self.signal(Signal::SIGTERM);
        if !matches!(self.wait_exit(STOP_TIMEOUT), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            remove_leftovers();
        }
    }
}

/// What a stuck demo left, removed: the demo tests already need the machine
/// to themselves (they check that nothing is left anywhere).
fn remove_leftovers() {
    let report = |what: &str| eprintln!("ferry-tests: after a stuck ferry-demo: {what}");
    match leftovers::find() {
        Ok(found) => leftovers::remove(&found, &mut |note| {
            if let Note::Failed(what) = note {
                report(what);
            }
        }),
        Err(err) => report(&format!("{err:#}")),
    }
    match leftovers::settle(leftovers::SETTLE) {
        Ok(left) if left.is_empty() => {}
        Ok(left) => report(&format!(
            "cannot remove these leftovers:\n{}",
            leftovers::bulleted(&left)
        )),
        Err(err) => report(&format!("{err:#}")),
    }
}

#[test]
fn ctrl_c_stops_the_demo_and_removes_everything() -> anyhow::Result<()> {
    let _one = one_demo_at_a_time();
    let mut demo = Interactive::start()?;
    demo.wait_for("Press Ctrl-C", PROOF_TIMEOUT)?;
    ensure!(
        !leftovers::find()?.is_empty(),
        "ferry-demo says it is running, but no simulated node exists"
    );
    demo.signal(Signal::SIGINT)?;
    demo.wait_for("removed the nodes", STOP_TIMEOUT)?;
    let status = demo
        .wait_exit(STOP_TIMEOUT)?
        .with_context(|| format!("ferry-demo did not exit after Ctrl-C:\n{}", demo.printed))?;
    ensure!(
        status.success(),
        "ferry-demo failed after Ctrl-C ({status}):\n{}\n{}",
        demo.printed,
        demo.stderr()
    );
    let left = leftovers::find()?;
    ensure!(
        left.is_empty(),
        "the demo left behind after Ctrl-C:\n{}",
        leftovers::bulleted(&left)
    );
    Ok(())
}
