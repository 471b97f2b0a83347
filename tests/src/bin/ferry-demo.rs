//! `ferry-demo` (run by `cargo xtask demo`): Ferry on a simulated node,
//! with a short printed proof of what it does, then running until Ctrl-C so
//! you can look around with `bpftool` and the admin endpoint.
//!
//! The node is a network namespace with a real `ferry-agent`; the pods are
//! network namespaces plus cgroups with real client and server processes
//! (`ferry-testapp`). Everything is removed again when the demo ends.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use clap::Parser;
use ferry_tests::{
    Cluster, NodeId, PodId, PodOptions, Proc, bin_path,
    inspect::{admin_json, captured_total, is_node_addr, pinned_original_dsts, programs_on},
    testapp::event,
};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use serde_json::Value;

const SERVER_PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(name = "ferry-demo", about = "Ferry on a simulated node, explained")]
struct Args {
    /// Print the proof and exit instead of waiting for Ctrl-C.
    #[arg(long)]
    exit_after_proof: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ferry-demo: {err:#}");
            ExitCode::FAILURE
        }
    }
}

struct Demo {
    cluster: Cluster,
    node: NodeId,
    client: PodId,
    server: PodId,
    legacy: PodId,
    testapp: std::path::PathBuf,
}

fn run(args: &Args) -> anyhow::Result<()> {
    // Caught from the start, so Ctrl-C stops the demo through its clean-up
    // instead of killing it. (Children get default handlers back at exec.)
    catch_stop_signals()?;

    heading("Building a simulated node");
    let mut cluster = Cluster::new("demo")?;
    let node = cluster.add_node()?;
    let client = cluster.add_pod(node, PodOptions::meshed("client", "shop", "client"))?;
    let server = cluster.add_pod(node, PodOptions::meshed("server", "shop", "server"))?;
    let legacy = cluster.add_pod(node, PodOptions::unmeshed("legacy", "legacy", "legacy"))?;
    let n = cluster.node(node).clone();
    say(&format!(
        "node {} (network namespace {}, address {} / {})",
        n.name, n.netns, n.ipv4, n.ipv6
    ));
    for pod in [client, server, legacy] {
        let p = cluster.pod(pod);
        say(&format!(
            "pod {}/{} at {} / {}: {}",
            p.namespace,
            p.name,
            p.ipv4,
            p.ipv6,
            if p.meshed {
                "meshed (namespace labelled ferry.dev/mesh=enabled)"
            } else {
                "not meshed"
            }
        ));
    }
    let agent = cluster.start_agent(node)?;
    say(&format!(
        "ferry-agent is ready; it pins its maps under {}",
        agent.pin_dir.display()
    ));

    let mut demo = Demo {
        cluster,
        node,
        client,
        server,
        legacy,
        testapp: bin_path("ferry-testapp")?,
    };
    demo.prove()?;

    if !args.exit_after_proof {
        demo.explain_how_to_look_around();
        wait_for_stop();
        heading("Stopping");
    }
    drop(agent);
    drop(demo);
    say("removed the node, its pods, cgroups and pins");
    Ok(())
}

impl Demo {
    fn prove(&mut self) -> anyhow::Result<()> {
        heading("1. Ferry's programs on the meshed client pod's cgroup (bpftool cgroup show)");
        let client_cgroup = self.cluster.pod(self.client).cgroup.clone();
        for program in programs_on(&client_cgroup)? {
            say(&program);
        }
        let legacy_cgroup = self.cluster.pod(self.legacy).cgroup.clone();
        ensure!(programs_on(&legacy_cgroup)?.is_empty());
        say("(the unmeshed pod's cgroup has none)");

        let to = self.cluster.pod(self.server).addr_v4(SERVER_PORT);
        let mut serve = self.spawn(
            self.server,
            &["serve", "--listen", &to.to_string(), "--bytes", "1048576"],
        )?;
        serve.wait_for_line(event("listening"), WAIT)?;

        heading("2. The client connects to the server; the agent carries it");
        let before = captured_total(&self.cluster, self.node)?;
        let done = self.connect(self.client, to)?;
        let served = serve.wait_for_line(event("served"), WAIT)?;
        say(&format!(
            "client dialled {to}; its getpeername() says {}",
            done["peer"].as_str().unwrap_or("?")
        ));
        let server_peer: SocketAddr = served["peer"].as_str().unwrap_or("").parse()?;
        ensure!(is_node_addr(&self.cluster, self.node, server_peer.ip()));
        say(&format!(
            "server saw the connection from {server_peer}: the agent, not the client pod"
        ));
        say(&format!(
            "1 MiB each way arrived intact: client {}, server {}",
            done["intact"], served["intact"]
        ));
        say(&format!(
            "agent's captured-connection counter: {before} -> {}",
            captured_total(&self.cluster, self.node)?
        ));

        heading("3. A live connection, as the agent and the kernel see it");
        let held_to = self.cluster.pod(self.server).addr_v4(SERVER_PORT + 1);
        let mut hold_server =
            self.spawn(self.server, &["serve", "--listen", &held_to.to_string()])?;
        hold_server.wait_for_line(event("listening"), WAIT)?;
        let mut held = self.spawn(self.client, &["hold", "--to", &held_to.to_string()])?;
        held.wait_for_line(event("connected"), WAIT)?;
        let live = admin_json(&self.cluster, self.node, "/connections")?;
        for connection in live.as_array().into_iter().flatten() {
            say(&format!(
                "admin /connections: {} from {} to {} (dialled), route {}",
                connection["sourcePod"].as_str().unwrap_or("?"),
                connection["source"].as_str().unwrap_or("?"),
                connection["originalDst"].as_str().unwrap_or("?"),
                connection["route"].as_str().unwrap_or("?"),
            ));
        }
        let pin_dir = self.cluster.node(self.node).pin_dir();
        for dst in pinned_original_dsts(&pin_dir)? {
            say(&format!(
                "bpftool map dump pinned {}/orig_dst_tuple: original destination {dst}",
                pin_dir.display()
            ));
        }
        held.close_stdin();
        held.wait_exit(WAIT)?;

        heading("4. The unmeshed pod is left alone");
        let done = self.connect(self.legacy, to)?;
        let served = serve.wait_for_line(event("served"), WAIT)?;
        say(&format!(
            "legacy pod dialled {to}; the server saw it as {} (its own address), captured counter unchanged at {}",
            served["peer"].as_str().unwrap_or("?"),
            captured_total(&self.cluster, self.node)?
        ));
        ensure!(done["intact"] == true);
        Ok(())
    }

    fn spawn(&mut self, pod: PodId, args: &[&str]) -> anyhow::Result<Proc> {
        let testapp = self.testapp.clone();
        self.cluster.spawn_in_pod(pod, &testapp, args)
    }

    /// One 1 MiB exchange from `pod`; the client's "done" line.
    fn connect(&mut self, pod: PodId, to: SocketAddr) -> anyhow::Result<Value> {
        let mut connect = self.spawn(
            pod,
            &["connect", "--to", &to.to_string(), "--bytes", "1048576"],
        )?;
        let (status, stdout, stderr) = connect.wait_exit(WAIT)?;
        ensure!(status.success(), "connect failed: {stderr}");
        stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["event"] == "done")
            .context("the client printed no result")
    }

    fn explain_how_to_look_around(&self) {
        let node = self.cluster.node(self.node);
        heading("Ferry is running. Look around from another terminal:");
        say(&format!(
            "ip netns exec {} curl -s 127.0.0.1:15000/config_dump",
            node.netns
        ));
        say("bpftool prog show name ferry_connect4");
        say(&format!(
            "bpftool cgroup show {}",
            self.cluster.pod(self.client).cgroup.display()
        ));
        say(&format!(
            "bpftool map dump pinned {}/orig_dst_tuple",
            node.pin_dir().display()
        ));
        println!("\nPress Ctrl-C to stop and clean up.");
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn catch_stop_signals() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.with_context(|| format!("cannot catch {signal}"))?;
    }
    Ok(())
}

fn wait_for_stop() {
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn heading(text: &str) {
    println!("\n== {text}");
}

fn say(text: &str) {
    println!("   {text}");
}
