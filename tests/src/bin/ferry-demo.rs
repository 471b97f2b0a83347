//! `ferry-demo` (run by `cargo xtask demo`): Ferry's main job on two
//! simulated nodes — a CA, an agent per node, a meshed client on node 1
//! talking to a meshed server on node 2 over a pooled mTLS tunnel — with a
//! short printed proof, then running until Ctrl-C so you can look around
//! with `bpftool` and the admin endpoint.
//!
//! Nodes are network namespaces with a real `ferry-agent`; the CA is a real
//! `ferry-ca` in the namespace joining them; pods are network namespaces plus
//! cgroups with real client and server processes (`ferry-testapp`).
//! Everything is removed again when the demo ends.

use std::{
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use clap::Parser;
use ferry_tests::{
    Cluster, MIB, NodeId, PORT, PodId, PodOptions,
    inspect::{
        admin_json, captured_total, is_node_addr, live_connection, pinned_original_dsts,
        programs_on,
    },
    testapp::TestApp,
    wire::{LinkCapture, contains, plaintext_marker},
};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

#[derive(Debug, Parser)]
#[command(
    name = "ferry-demo",
    about = "Ferry on two simulated nodes with a CA, explained"
)]
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
    n1: NodeId,
    n2: NodeId,
    client: PodId,
    server: PodId,
    legacy: PodId,
}

fn run(args: &Args) -> anyhow::Result<()> {
    // Caught from the start, so Ctrl-C stops the demo through its clean-up
    // instead of killing it. (Children get default handlers back at exec.)
    catch_stop_signals()?;

    heading("Building a CA and two simulated nodes");
    let mut cluster = Cluster::new("demo")?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("client", "shop", "client"))?;
    let legacy = cluster.add_pod(n1, PodOptions::unmeshed("legacy", "legacy", "legacy"))?;
    let server = cluster.add_pod(n2, PodOptions::meshed("server", "shop", "server"))?;
    for node in [n1, n2] {
        let n = cluster.node(node).clone();
        say(&format!(
            "node {} (network namespace {}, address {} / {})",
            n.name, n.netns, n.ipv4, n.ipv6
        ));
    }
    for pod in [client, legacy, server] {
        let p = cluster.pod(pod);
        say(&format!(
            "pod {}/{} on {} at {} / {}: {}",
            p.namespace,
            p.name,
            cluster.node(p.node).name,
            p.ipv4,
            p.ipv6,
            if p.meshed {
                "meshed (namespace labelled ferry.dev/mesh=enabled)"
            } else {
                "not meshed"
            }
        ));
    }
    let ca = cluster.start_ca()?;
    say(&format!("ferry-ca serves Certify at {}", ca.addr));
    let agents = vec![
        cluster.agent(n1).ca(&ca).start()?,
        cluster.agent(n2).ca(&ca).start()?,
    ];
    say("both agents are ready: their pods are captured and certified");

    let mut demo = Demo {
        cluster,
        n1,
        n2,
        client,
        server,
        legacy,
    };
    demo.prove()?;

    if !args.exit_after_proof {
        demo.explain_how_to_look_around();
        wait_for_stop();
        heading("Stopping");
    }
    drop(agents);
    drop(ca);
    drop(demo);
    say("removed the nodes, pods, cgroups, pins and processes");
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

        heading("2. Workload certificates from the CA (admin /certs)");
        for node in [self.n1, self.n2] {
            for cert in admin_json(&self.cluster, node, "/certs")?
                .as_array()
                .into_iter()
                .flatten()
            {
                say(&format!(
                    "{}: {} serial {} valid until {} (unix), key held in memory only",
                    self.cluster.node(node).name,
                    cert["identity"].as_str().unwrap_or("?"),
                    cert["serial"].as_str().unwrap_or("?"),
                    cert["notAfterUnix"],
                ));
            }
        }

        heading("3. The client on node 1 talks to the server on node 2");
        let capture = LinkCapture::start(&mut self.cluster)?;
        let to = self.cluster.pod(self.server).addr_v4(PORT);
        let mut serve = TestApp::serve(to)
            .bytes(MIB)
            .start(&mut self.cluster, self.server)?;
        let seen = serve.exchange(&mut self.cluster, self.client, to)?;
        say(&format!(
            "client dialled {to}; its getpeername() says {}",
            seen.done.peer
        ));
        let server_peer = seen.served.peer;
        ensure!(is_node_addr(&self.cluster, self.n2, server_peer.ip()));
        say(&format!(
            "server saw the connection from {server_peer}: node 2's agent, at the end of the tunnel"
        ));
        say(&format!(
            "1 MiB each way arrived intact: client {}, server {}",
            seen.done.intact, seen.served.intact
        ));
        let captured = capture.finish()?;
        let plaintext = contains(&captured, &plaintext_marker());
        let sni = b"server.shop.sa.cluster.local";
        let hello = contains(&captured, sni);
        ensure!(!plaintext && hello, "the node link is not TLS-only");
        say(&format!(
            "tcpdump on the node-to-node link: {} bytes captured, a TLS 1.3 ClientHello for {}, and none of the client's plaintext",
            captured.len(),
            String::from_utf8_lossy(sni)
        ));

        heading("4. A live connection, as both agents see it");
        let held_to = self.cluster.pod(self.server).addr_v4(PORT + 1);
        let _hold_server = TestApp::serve(held_to).start(&mut self.cluster, self.server)?;
        let held = TestApp::hold(held_to).start(&mut self.cluster, self.client)?;
        for node in [self.n1, self.n2] {
            // The client's connect returns before the agents have opened the
            // tunnel stream; wait until each agent lists it.
            live_connection(&self.cluster, node, held_to)?;
            for connection in admin_json(&self.cluster, node, "/connections")?
                .as_array()
                .into_iter()
                .flatten()
            {
                say(&format!(
                    "{} /connections: {} -> {} route {}, source identity {}",
                    self.cluster.node(node).name,
                    connection["sourcePod"]
                        .as_str()
                        .or(connection["source"].as_str())
                        .unwrap_or("?"),
                    connection["originalDst"].as_str().unwrap_or("?"),
                    connection["route"].as_str().unwrap_or("?"),
                    connection["sourceIdentity"].as_str().unwrap_or("-"),
                ));
            }
        }
        let pool = admin_json(&self.cluster, self.n1, "/pool")?;
        let shards = admin_json(&self.cluster, self.n1, "/config_dump")?["config"]["workerThreads"]
            .as_u64()
            .context("/config_dump has no config.workerThreads")?;
        let streams = pool["totals"]["streams"].as_u64().unwrap_or(0);
        for key in pool["keys"].as_array().into_iter().flatten() {
            let connections = key["connections"].as_array().map_or(0, Vec::len);
            // Each shard keeps its own pool: the two application connections
            // so far may have landed on different shards, never on more.
            ensure!(
                connections as u64 <= shards,
                "{connections} pooled TLS connections for one key with {shards} shards: {pool}"
            );
            say(&format!(
                "{} /pool: {} -> {} at {}: {connections} TLS connection(s) for {streams} application connection(s); each of the agent's {shards} shards pools its own",
                self.cluster.node(self.n1).name,
                key["source"].as_str().unwrap_or("?"),
                key["destination"].as_str().unwrap_or("?"),
                key["address"].as_str().unwrap_or("?"),
            ));
        }
        let pin_dir = self.cluster.node(self.n1).pin_dir();
        for dst in pinned_original_dsts(&pin_dir)? {
            say(&format!(
                "bpftool map dump pinned {}/orig_dst_tuple: original destination {dst}",
                pin_dir.display()
            ));
        }
        held.release()?;

        heading("5. The unmeshed pod is left alone");
        let to = self.cluster.pod(self.server).addr_v4(PORT);
        let captured_before = captured_total(&self.cluster, self.n1)?;
        let seen = serve.exchange(&mut self.cluster, self.legacy, to)?;
        let legacy_peer = seen.served.peer;
        let captured_after = captured_total(&self.cluster, self.n1)?;
        ensure!(
            legacy_peer.ip() == self.cluster.pod(self.legacy).ipv4
                && captured_after == captured_before
                && seen.done.intact,
            "the unmeshed pod's connection was touched: server saw {legacy_peer}, \
             captured {captured_before} -> {captured_after}, client {:?}",
            seen.done
        );
        say(&format!(
            "legacy pod dialled {to}; the server saw it as {legacy_peer} (its own address, plain TCP); \
             node 1's captured counter stays at {captured_after}"
        ));
        Ok(())
    }

    fn explain_how_to_look_around(&self) {
        let node = self.cluster.node(self.n1);
        heading("Ferry is running. Look around from another terminal:");
        for endpoint in ["config_dump", "certs", "pool", "connections"] {
            say(&format!(
                "ip netns exec {} curl -s 127.0.0.1:15000/{endpoint}",
                node.netns
            ));
        }
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
