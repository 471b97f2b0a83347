//! Zero-downtime agent replacement (issue 13) on two simulated nodes: a
//! successor takes over from a running agent with the same arguments (a
//! DaemonSet surge pod), the old one drains; SIGTERM drains too; after
//! `kill -9` a new agent serves again promptly. The client pod is on node
//! 1, the server pod on node 2, so every connection crosses both agents.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use ferry_tests::{
    Agent, Cluster, MIB, NodeId, PORT, PodId, PodOptions, Proc,
    ca::CaFixture,
    inspect::{eventually, live_connection, metric_value, metrics},
    load::{self, Churn, ChurnPhase, ChurnSummary, Streams, StreamsSummary},
    testapp::{Ended, Family, TestApp, exchange, pod_addr},
};

/// A drain deadline longer than any test: the old agents may only end
/// because their connections did.
const LONG_DRAIN: Duration = Duration::from_secs(300);
/// The deadline of the tests that wait it out.
const SHORT_DRAIN: Duration = Duration::from_secs(2);
/// How long the old agents may take to exit once their last connection
/// ended (or their deadline passed).
const EXIT_WITHIN: Duration = Duration::from_secs(30);
/// Traffic before anything happens, and after each replacement.
const BASELINE: Duration = Duration::from_secs(2);
const AFTER_REPLACEMENT: Duration = Duration::from_secs(3);
/// The long-lived connections, each sending a message every
/// `STREAM_PAUSE_MS` (debug agents on two cores carry 100 × 50 a second
/// and still leave the churn and the successors room).
const STREAM_CONNECTIONS: usize = 100;
const STREAM_PAUSE_MS: u64 = 20;
const MESSAGE_SIZE: usize = 1024;
/// A churn connect that takes longer than this is a hang, counted as a
/// `timeout` failure.
const CHURN_TIMEOUT_MS: u64 = 3000;
/// How soon a connection cut by a dying agent must be seen closed.
const CLOSE_NOTICED: Duration = Duration::from_secs(5);
/// After `kill -9`: how long the node is left without an agent, and by
/// when, after the new agent is ready, every new connection must work
/// again (the aim: under a second after the new agent starts).
const NO_AGENT: Duration = Duration::from_secs(1);
const RECOVERED_AFTER_READY: Duration = Duration::from_secs(1);

/// Two nodes with an agent each, a CA, and `ferry-load serve` in the
/// server pod.
struct TwoNodes {
    cluster: Cluster,
    n2: NodeId,
    client: PodId,
    server: PodId,
    /// Node 1's agent, then node 2's.
    agents: [Agent; 2],
    /// Where the client reaches the load server.
    to: SocketAddr,
    _load_server: Proc,
    _ca: CaFixture,
}

fn two_nodes(name: &str, drain: Duration) -> anyhow::Result<TwoNodes> {
    two_nodes_with(name, drain, &[])
}

/// [`two_nodes`], both agents with `args` too.
fn two_nodes_with(name: &str, drain: Duration, args: &[&str]) -> anyhow::Result<TwoNodes> {
    let mut cluster = Cluster::new(name)?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let client = cluster.add_pod(n1, PodOptions::meshed("web-0", "shop", "web"))?;
    let server = cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let ca = cluster.start_ca()?;
    let agents = [
        cluster
            .agent(n1)
            .ca(&ca)
            .drain_timeout(drain)
            .args(args)
            .start()?,
        cluster
            .agent(n2)
            .ca(&ca)
            .drain_timeout(drain)
            .args(args)
            .start()?,
    ];
    // Churn closes thousands of connections; their ports must be reusable.
    load::reuse_time_wait_ports(&cluster)?;
    let to = pod_addr(&cluster, server, Family::V4, PORT);
    let listen = SocketAddr::from(([0, 0, 0, 0], PORT));
    let load_server = load::serve(&mut cluster, server, listen)?;
    Ok(TwoNodes {
        cluster,
        n2,
        client,
        server,
        agents,
        to,
        _load_server: load_server,
        _ca: ca,
    })
}

impl TwoNodes {
    /// Starts a successor for agent `i` and returns the old one, which now drains.
    fn replace(&mut self, i: usize) -> anyhow::Result<Agent> {
        let successor = self.cluster.start_successor(&self.agents[i])?;
        Ok(std::mem::replace(&mut self.agents[i], successor))
    }

    fn streams(&mut self) -> anyhow::Result<load::Running<StreamsSummary>> {
        Streams {
            to: self.to,
            connections: STREAM_CONNECTIONS,
            size: MESSAGE_SIZE,
            pause_ms: STREAM_PAUSE_MS,
        }
        .start(&mut self.cluster, self.client)
    }

    fn churn(&mut self) -> anyhow::Result<load::Running<ChurnSummary>> {
        Churn {
            to: self.to,
            size: MESSAGE_SIZE,
            seconds: None,
            timeout_ms: CHURN_TIMEOUT_MS,
        }
        .start(&mut self.cluster, self.client)
    }
}

/// A connection from the client pod to a `ferry-testapp serve` on
/// `port`, open through both agents.
fn held_connection(t: &mut TwoNodes, port: u16) -> anyhow::Result<ferry_tests::testapp::Held> {
    let to = pod_addr(&t.cluster, t.server, Family::V4, port);
    // Killed with the cluster.
    let _server = TestApp::serve(to).start(&mut t.cluster, t.server)?;
    let held = TestApp::hold(to).start(&mut t.cluster, t.client)?;
    live_connection(&t.cluster, t.n2, to)?;
    Ok(held)
}

fn show_churn(phases: &[(&str, &ChurnPhase)]) {
    for (name, p) in phases {
        println!(
            "churn {name:>22}: {:>6} attempts, {:>3} failed, connect p50 {:>8.0} µs, p99 {:>8.0} µs, \
             max {:>8.0} µs ({:.1}× p50), longest gap {:>8.0} µs",
            p.attempts,
            p.failed,
            p.p50_micros,
            p.p99_micros,
            p.max_micros,
            p.max_micros / p.p50_micros.max(1.0),
            p.longest_gap_micros,
        );
    }
}

#[test]
fn replacing_both_agents_loses_no_byte_and_fails_no_connect() -> anyhow::Result<()> {
    let mut t = two_nodes("upgrade-handover", LONG_DRAIN)?;
    let mut streams = t.streams()?;
    let mut churn = t.churn()?;
    thread::sleep(BASELINE);

    // Phase 1: the destination's agent is replaced; phase 2: the source's;
    // phase 3: both are new.
    let mut old = Vec::new();
    for i in [1, 0] {
        streams.mark()?;
        churn.mark()?;
        let began = Instant::now();
        let replaced = t
            .replace(i)
            .with_context(|| format!("replacing the agent of node {}", i + 1))?;
        println!(
            "node {}: successor pid {} took over from pid {} in {:?}",
            i + 1,
            t.agents[i].proc.pid(),
            replaced.proc.pid(),
            began.elapsed()
        );
        old.push(replaced);
        thread::sleep(AFTER_REPLACEMENT);
    }
    streams.mark()?;
    churn.mark()?;
    thread::sleep(BASELINE);
    // The streams' connections are still the old agents'.
    for agent in &old {
        ensure!(
            agent.proc.has_exited()?.is_none(),
            "the old agent (pid {}) exited while connections still ran through it:\n{}",
            agent.proc.pid(),
            agent.proc.stderr_tail()
        );
    }
    let streams = streams.finish()?;
    let churn = churn.finish()?;

    println!(
        "streams: {} connections, {} messages, {} bytes, {} bytes lost, errors {:?}, \
         longest round trip {:.0} µs",
        streams.connections,
        streams.messages,
        streams.bytes,
        streams.bytes_lost,
        streams.errors,
        streams.max_round_trip_micros
    );
    let names = ["before", "destination replaced", "source replaced", "after"];
    ensure!(
        churn.phases.len() == names.len() && streams.phases.len() == names.len(),
        "expected {} phases: {churn:?} {streams:?}",
        names.len()
    );
    let phases: Vec<_> = names.iter().copied().zip(&churn.phases).collect();
    show_churn(&phases);
    show_churn(&[("whole run", &churn.total)]);

    ensure!(
        streams.errors.total() == 0,
        "long-lived connections failed across the replacements: {:?}",
        streams.errors
    );
    ensure!(streams.bytes_lost == 0, "{} bytes lost", streams.bytes_lost);
    for (name, phase) in names.iter().zip(&streams.phases) {
        ensure!(
            phase.connections_active == STREAM_CONNECTIONS,
            "{name}: only {} of {STREAM_CONNECTIONS} long-lived connections carried messages \
             ({phase:?})",
            phase.connections_active
        );
    }
    ensure!(
        churn.total.failed == 0,
        "{} of {} new connections failed: {:?}",
        churn.total.failed,
        churn.total.attempts,
        churn.total.failures
    );
    for (name, phase) in &phases {
        ensure!(
            phase.ok > 0,
            "{name}: no new connection completed: {phase:?}"
        );
    }

    // With the streams gone, the old agents have nothing left to relay.
    for mut agent in old {
        let pid = agent.proc.pid();
        let drained = agent
            .drained(EXIT_WITHIN)
            .context("the old agent, after its connections ended")?;
        ensure!(
            drained.closed_at_deadline == 0,
            "the old agent (pid {pid}) closed connections at the deadline: {}",
            drained.line
        );
    }
    // The successors carry new connections on their own.
    let again = pod_addr(&t.cluster, t.server, Family::V4, PORT + 1);
    exchange(&mut t.cluster, t.client, t.server, again, MIB)?;
    Ok(())
}

#[test]
fn at_the_drain_deadline_the_old_agent_closes_what_is_left_and_exits() -> anyhow::Result<()> {
    let mut t = two_nodes("upgrade-deadline", SHORT_DRAIN)?;
    let mut held = held_connection(&mut t, PORT + 1)?;
    let began = Instant::now();
    let mut old = t.replace(1)?;
    let drained = old.drained(SHORT_DRAIN + EXIT_WITHIN)?;
    let lasted = began.elapsed();
    println!(
        "old agent gone {lasted:?} after its successor started: {}",
        drained.line
    );
    ensure!(
        drained.closed_at_deadline >= 1,
        "the held connection was open at the deadline, but: {}",
        drained.line
    );
    ensure!(
        lasted >= SHORT_DRAIN,
        "the old agent exited after {lasted:?}, before its drain deadline ({SHORT_DRAIN:?}), \
         with a connection open"
    );
    // Closed, not left hanging.
    let ended: Ended = held
        .wait_for(CLOSE_NOTICED)
        .context("the held connection was not closed when the old agent exited")?;
    println!("held connection: {}", ended.how);
    // The successor carries new connections.
    let again = pod_addr(&t.cluster, t.server, Family::V4, PORT + 2);
    exchange(&mut t.cluster, t.client, t.server, again, MIB)?;
    Ok(())
}

#[test]
fn sigterm_drains_says_so_and_exits_at_the_deadline() -> anyhow::Result<()> {
    let mut t = two_nodes("upgrade-sigterm", SHORT_DRAIN + SHORT_DRAIN)?;
    let mut held = held_connection(&mut t, PORT + 1)?;
    let began = Instant::now();
    t.agents[1].terminate()?;
    let n2 = t.n2;
    eventually(|| {
        let (status, body) = t.cluster.admin_get(n2, "/healthz/ready")?;
        ensure!(
            status == 503 && body.contains("draining"),
            "/healthz/ready of a draining agent: {status} {body}"
        );
        Ok(())
    })?;
    let samples = metrics(&t.cluster, n2)?;
    let draining = metric_value(&samples, "ferry_draining", &[]);
    let open = metric_value(&samples, "ferry_drain_connections", &[]);
    ensure!(draining == 1.0, "ferry_draining is {draining}");
    ensure!(
        open >= 1.0,
        "ferry_drain_connections is {open} with a connection held"
    );

    let drained = t.agents[1]
        .drained(SHORT_DRAIN + SHORT_DRAIN + EXIT_WITHIN)
        .context("after SIGTERM")?;
    let lasted = began.elapsed();
    println!("agent gone {lasted:?} after SIGTERM: {}", drained.line);
    ensure!(drained.closed_at_deadline >= 1, "{}", drained.line);
    let ended: Ended = held
        .wait_for(CLOSE_NOTICED)
        .context("the held connection was not closed when the agent exited")?;
    println!("held connection: {}", ended.how);
    Ok(())
}

#[test]
fn an_agent_started_during_a_sigterm_drain_takes_over_the_node() -> anyhow::Result<()> {
    let mut t = two_nodes("upgrade-late", LONG_DRAIN)?;
    let held = held_connection(&mut t, PORT + 1)?;
    t.agents[1].terminate()?;
    let n2 = t.n2;
    eventually(|| {
        let (status, body) = t.cluster.admin_get(n2, "/healthz/ready")?;
        ensure!(
            status == 503 && body.contains("draining"),
            "{status} {body}"
        );
        Ok(())
    })?;
    // Stop, then start: the new agent takes the admin, probe and handover
    // sockets from the draining one and binds the data ports afresh.
    let mut old = t.replace(1).context("an agent started during a drain")?;
    let again = pod_addr(&t.cluster, t.server, Family::V4, PORT + 2);
    exchange(&mut t.cluster, t.client, t.server, again, MIB)
        .context("a new connection through the agent that took over")?;
    ensure!(
        old.proc.has_exited()?.is_none(),
        "the old agent left while its held connection was open"
    );
    held.release()?;
    let drained = old.drained(EXIT_WITHIN)?;
    ensure!(drained.closed_at_deadline == 0, "{}", drained.line);
    Ok(())
}

#[test]
fn with_stay_until_terminated_a_drained_agent_waits_for_sigterm() -> anyhow::Result<()> {
    let mut t = two_nodes_with("upgrade-stay", LONG_DRAIN, &["--stay-until-terminated"])?;
    let mut old = t.replace(1)?;
    // Nothing ran through it: its drain ends at once, and it stays.
    eventually(|| {
        let log = old.proc.stderr_tail();
        ensure!(
            log.contains("waiting for SIGTERM"),
            "the old agent's log:\n{log}"
        );
        Ok(())
    })?;
    thread::sleep(Duration::from_secs(1));
    ensure!(
        old.proc.has_exited()?.is_none(),
        "with --stay-until-terminated the drained agent exited before SIGTERM"
    );
    old.terminate()?;
    let drained = old.drained(EXIT_WITHIN)?;
    ensure!(drained.closed_at_deadline == 0, "{}", drained.line);
    Ok(())
}

#[test]
fn after_kill_9_a_new_agent_serves_promptly_and_no_connection_hangs() -> anyhow::Result<()> {
    let mut t = two_nodes("upgrade-kill9", LONG_DRAIN)?;
    let streams = Streams {
        to: t.to,
        connections: 10,
        size: MESSAGE_SIZE,
        pause_ms: STREAM_PAUSE_MS,
    }
    .start(&mut t.cluster, t.client)?;
    let mut churn = t.churn()?;
    thread::sleep(BASELINE);

    // Phase 1: no agent on the destination node.
    churn.mark()?;
    t.agents[1].kill9();
    thread::sleep(NO_AGENT);
    // Phase 2: from just before the new agent is started (the killed one
    // left its handover socket behind).
    churn.mark()?;
    let spawned = Instant::now();
    let new = t
        .cluster
        .start_successor(&t.agents[1])
        .context("a new agent after kill -9")?;
    let ready = spawned.elapsed();
    t.agents[1] = new;
    thread::sleep(AFTER_REPLACEMENT);
    let churn = churn.finish()?;
    let streams = streams.finish()?;

    show_churn(&[
        ("before", &churn.phases[0]),
        ("no agent", &churn.phases[1]),
        ("new agent", &churn.phases[2]),
    ]);
    println!(
        "churn failures without an agent: {:?}",
        churn.phases[1].failures
    );
    println!(
        "churn failures once the new agent started: {:?}",
        churn.phases[2].failures
    );
    println!("streams cut by the kill: {:?}", streams.errors);
    let since_start = |micros: f64| Duration::from_secs_f64(micros / 1e6);
    let new_agent = &churn.phases[2];
    let first_ok = new_agent
        .first_ok_micros
        .map(since_start)
        .with_context(|| {
            format!("no new connection succeeded after the new agent started: {new_agent:?}")
        })?;
    // From the last failure on, every new connection went through.
    let recovered = new_agent
        .last_failure_micros
        .map_or(first_ok, since_start)
        .max(first_ok);
    println!(
        "kill -9: new agent ready {ready:?} after its start; first new connection through \
         {first_ok:?}, every one from {recovered:?} after its start"
    );
    ensure!(
        churn.total.failures.timeout == 0 && streams.errors.timeout == 0,
        "connections hung: churn {:?}, streams {:?}",
        churn.total.failures,
        streams.errors
    );
    ensure!(
        churn.phases[1].failed > 0,
        "no connect failed while the destination had no agent: {:?}",
        churn.phases[1]
    );
    ensure!(
        streams.errors.total() == 10,
        "the kill should cut all 10 long-lived connections: {:?}",
        streams.errors
    );
    ensure!(
        recovered <= ready + RECOVERED_AFTER_READY,
        "new connections still failed {:?} after the new agent was ready (ready {ready:?}, \
         last failure {recovered:?} after its start): {:?}",
        recovered.saturating_sub(ready),
        new_agent.failures
    );
    Ok(())
}
