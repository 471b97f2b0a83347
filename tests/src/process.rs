//! Processes the harness starts inside simulated nodes and pods, and the
//! commands (`ip`, `bpftool`) it runs to completion.
//!
//! A started process ([`Proc`]) has its stdout read line by line on a thread
//! (tests wait for JSON events) and its stderr kept in a bounded buffer (the
//! tail goes into error messages). The [`Cluster`](crate::Cluster) that
//! started it holds a second handle and kills it when the cluster is dropped,
//! so dropping a `Proc` early does not stop the process.

use std::{
    collections::VecDeque,
    ffi::OsStr,
    fs::File,
    io::{self, BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

/// How much of a process's stderr is kept (the newest part).
const STDERR_KEEP_BYTES: usize = 1 << 20;
/// How many stderr lines an error message quotes.
const STDERR_TAIL_LINES: usize = 40;
/// How long to wait for the pipes to close once a process has exited.
const PIPE_DRAIN: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(20);

/// Where a process starts: a network namespace and, for pods, a cgroup.
pub(crate) struct Placement<'a> {
    /// Name of the network namespace (a file in `/run/netns`).
    pub netns: &'a str,
    /// The cgroup v2 directory to move the process into, before it execs.
    pub cgroup: Option<&'a Path>,
}

impl<'a> Placement<'a> {
    /// In network namespace `netns`, in no pod cgroup.
    pub fn netns(netns: &'a str) -> Self {
        Self {
            netns,
            cgroup: None,
        }
    }
}

/// The part of a process both its [`Proc`] and its cluster hold.
pub(crate) struct Shared {
    label: String,
    child: Mutex<Child>,
    stderr: Mutex<StderrTail>,
}

impl Shared {
    /// SIGKILLs the process if it still runs and reaps it. Idempotent, and
    /// never signals a reused pid: `Child` remembers that it was reaped.
    pub(crate) fn kill(&self) -> io::Result<()> {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        if child.try_wait()?.is_none() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Sends `signal` to the process if it still runs (never to a reused
    /// pid: the child is not reaped while its lock is held).
    pub(crate) fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        if child.try_wait()?.is_none() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
            nix::sys::signal::kill(pid, signal)
                .with_context(|| format!("cannot send {signal} to {}", self.label))?;
        }
        Ok(())
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// The last lines the process wrote to stderr.
    pub(crate) fn stderr_tail(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tail(STDERR_TAIL_LINES)
    }

    fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_wait()
    }
}

/// The newest part of a process's stderr, and whether it reached EOF.
#[derive(Default)]
struct StderrTail {
    lines: VecDeque<String>,
    bytes: usize,
    closed: bool,
}

impl StderrTail {
    fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.bytes > STDERR_KEEP_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    fn tail(&self, lines: usize) -> String {
        let skip = self.lines.len().saturating_sub(lines);
        let tail: Vec<&str> = self.lines.iter().skip(skip).map(String::as_str).collect();
        if tail.is_empty() {
            "(nothing on stderr)".to_owned()
        } else {
            tail.join("\n")
        }
    }

    fn all(&self) -> String {
        self.lines
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A process the harness started, with its stdout as a stream of lines.
pub struct Proc {
    shared: Arc<Shared>,
    pid: u32,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    /// Every stdout line consumed so far, for error messages.
    seen: Vec<String>,
}

impl Proc {
    /// Starts `program` in `placement`. The network namespace and the cgroup
    /// are entered between fork and exec, so the program's first instruction
    /// already runs in the pod (no window in which it is outside).
    pub(crate) fn spawn(
        label: String,
        placement: &Placement<'_>,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<(Proc, Arc<Shared>)> {
        let netns_path = Path::new(crate::netns::NETNS_DIR).join(placement.netns);
        let netns = File::open(&netns_path)
            .with_context(|| format!("cannot open network namespace {}", netns_path.display()))?;
        let cgroup_procs = placement
            .cgroup
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                File::options()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("cannot open {} for writing", path.display()))
            })
            .transpose()?;
        let netns_fd = netns.as_raw_fd();
        let cgroup_fd = cgroup_procs.as_ref().map(|file| file.as_raw_fd());

        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure only makes async-signal-safe system calls
        // (prctl, setns, write) on fds that stay open until `spawn` returns,
        // and allocates nothing.
        unsafe {
            command.pre_exec(move || enter_placement(netns_fd, cgroup_fd));
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {label} ({})", program.display()))?;
        drop((netns, cgroup_procs));

        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("child has no stdout pipe")?;
        let stderr = child.stderr.take().context("child has no stderr pipe")?;
        let shared = Arc::new(Shared {
            label,
            child: Mutex::new(child),
            stderr: Mutex::new(StderrTail::default()),
        });
        let (line_tx, line_rx) = mpsc::channel();
        thread::spawn(move || {
            // Keep reading after the receiver is gone: a full pipe would block the child.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = line_tx.send(line);
            }
        });
        let collector = Arc::clone(&shared);
        thread::spawn(move || collect_stderr(stderr, &collector));
        let proc = Proc {
            shared: Arc::clone(&shared),
            pid,
            stdin,
            stdout: line_rx,
            seen: Vec::new(),
        };
        Ok((proc, shared))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the harness calls this process in messages ("node/pod: program args").
    pub fn label(&self) -> &str {
        self.shared.label()
    }

    /// The process's stdin; write a line or [`close_stdin`](Self::close_stdin)
    /// to end `ferry-testapp hold`.
    pub fn stdin(&mut self) -> anyhow::Result<&mut ChildStdin> {
        let label = &self.shared.label;
        self.stdin
            .as_mut()
            .with_context(|| format!("the stdin of {label} is already closed"))
    }

    /// Closes the process's stdin (it reads EOF).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Consumes stdout lines until one satisfies `pred`, and returns it.
    /// Lines are parsed as JSON; a line that is not JSON is a JSON string.
    /// Lines skipped on the way are gone for later calls.
    pub fn wait_for_line(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    let value = parse_line(&line);
                    self.seen.push(line);
                    if pred(&value) {
                        return Ok(value);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "{} printed no matching line within {timeout:?}\n{}",
                        self.label(),
                        self.report()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_briefly();
                    bail!(
                        "{} closed stdout ({status}) without printing a matching line\n{}",
                        self.label(),
                        self.report()
                    )
                }
            }
        }
    }

    /// Waits for the process to exit; returns its status, the stdout lines
    /// not consumed by [`wait_for_line`](Self::wait_for_line), and its stderr
    /// (the newest megabyte). On timeout the process keeps running.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<(ExitStatus, String, String)> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self
                .shared
                .try_wait()
                .with_context(|| format!("cannot wait for {}", self.label()))?
            {
                break status;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.label(),
                    self.report()
                );
            }
            thread::sleep(POLL);
        };
        let stdout = self.drain_stdout();
        let stderr = self.stderr_after_exit();
        Ok((status, stdout, stderr))
    }

    /// SIGKILLs the process (if it still runs) and reaps it.
    pub fn kill(&mut self) {
        if let Err(err) = self.shared.kill() {
            eprintln!("ferry-tests: cannot kill {}: {err}", self.label());
        }
    }

    /// Sends SIGTERM (if it still runs): asks it to stop.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.shared.signal(nix::sys::signal::Signal::SIGTERM)
    }

    /// The last lines of the process's stderr.
    pub fn stderr_tail(&self) -> String {
        self.shared.stderr_tail()
    }

    /// Whether the process has exited (it is reaped if so).
    pub fn has_exited(&self) -> anyhow::Result<Option<ExitStatus>> {
        self.shared
            .try_wait()
            .with_context(|| format!("cannot wait for {}", self.label()))
    }

    /// What to show when something went wrong with this process.
    pub(crate) fn report(&self) -> String {
        let tail = self.seen.len().saturating_sub(20);
        let stdout = if self.seen.is_empty() {
            "(nothing consumed from stdout)".to_owned()
        } else {
            self.seen[tail..].join("\n")
        };
        format!(
            "--- stdout consumed so far (last 20 lines):\n{stdout}\n--- stderr (last {STDERR_TAIL_LINES} lines):\n{}",
            self.stderr_tail()
        )
    }

    fn wait_briefly(&self) -> String {
        let deadline = Instant::now() + PIPE_DRAIN;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.shared.try_wait() {
                return status.to_string();
            }
            thread::sleep(POLL);
        }
        "still running".to_owned()
    }

    fn drain_stdout(&mut self) -> String {
        let deadline = Instant::now() + PIPE_DRAIN;
        let mut rest = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(_) => break,
            }
        }
        rest.join("\n")
    }

    fn stderr_after_exit(&self) -> String {
        let deadline = Instant::now() + PIPE_DRAIN;
        loop {
            let stderr = self
                .shared
                .stderr
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if stderr.closed || Instant::now() >= deadline {
                return stderr.all();
            }
            drop(stderr);
            thread::sleep(POLL);
        }
    }
}

/// Runs in the child between fork and exec: dies with the harness, enters the
/// network namespace, and moves itself into the cgroup ("0" = the writer).
fn enter_placement(netns_fd: i32, cgroup_fd: Option<i32>) -> io::Result<()> {
    // SAFETY: plain system calls on integers and a static buffer; all are
    // async-signal-safe, as pre_exec requires.
    unsafe {
        // If the test process is SIGKILLed, its processes go with it. (The
        // signal follows the spawning *thread*; the harness spawns from the
        // test's thread, which outlives the cluster.)
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(fd) = cgroup_fd
            && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn collect_stderr(stderr: impl io::Read, shared: &Shared) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                shared
                    .stderr
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        }
    }
    shared
        .stderr
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .closed = true;
}

fn parse_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|_| Value::String(line.to_owned()))
}

/// Runs `program` to completion and returns its stdout; an error (with the
/// command line and stderr) if it cannot start or exits unsuccessfully.
pub(crate) fn run_checked<S: AsRef<OsStr>>(program: &str, args: &[S]) -> anyhow::Result<String> {
    let shown = || {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        format!("{program} {}", args.join(" "))
    };
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| anyhow!("cannot run `{}`: {err}", shown()))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            shown(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{}` printed non-UTF-8", shown()))
}
