//! Authorization policies as Kubernetes objects: `AuthorizationPolicy`
//! custom resources and namespace annotations from the stand-in API server,
//! judged by the destination's real agent for connections between real
//! pods on two simulated nodes.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use ferry_proto::policy::{
    AuthorizationPolicy, AuthorizationPolicySpec, DEFAULT_POLICY_ANNOTATION,
};
use ferry_tests::{
    CgroupDriver, Cluster, MIB, NodeId, PORT, PodId, PodOptions,
    ca::CaOptions,
    inspect::{admin_json, eventually, metric_value, metrics, plaintext_counts},
    kube_api::{FakeApiServer, namespace, pod},
    testapp::{Ended, Family, TestApp, pod_addr},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// What the connection a policy change leaves alone carries each way meanwhile.
const BULK: u64 = 256 * MIB;
/// How soon a connection a new policy denies must be closed.
const REVOKED_WITHIN: Duration = Duration::from_secs(2);

fn authorization_policy(name: &str, spec: &str) -> anyhow::Result<AuthorizationPolicy> {
    let spec: AuthorizationPolicySpec =
        serde_yaml::from_str(spec).with_context(|| format!("policy {name}: {spec}"))?;
    Ok(AuthorizationPolicy {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("shop".to_owned()),
            ..ObjectMeta::default()
        },
        spec,
    })
}

/// Whether one connection from `client` to `to` carries its bytes both
/// ways (a SYN the kernel drops fails it after two seconds).
fn reaches(cluster: &mut Cluster, client: PodId, to: SocketAddr) -> anyhow::Result<bool> {
    Ok(TestApp::connect(to)
        .bytes(16)
        .connect_timeout(Duration::from_secs(2))
        .run(cluster, client)?
        .success())
}

/// Waits until `client` reaches `to` (or, with `want` false, is refused);
/// on failure says what policies `judge`, the destination's node, holds.
fn wait_reaches(
    cluster: &mut Cluster,
    judge: NodeId,
    client: PodId,
    to: SocketAddr,
    want: bool,
) -> anyhow::Result<()> {
    let name = cluster.pod(client).name.clone();
    eventually(|| {
        ensure!(
            reaches(cluster, client, to)? == want,
            "{name} -> {to}: expected reaches = {want}"
        );
        Ok(())
    })
    .with_context(|| {
        let held = admin_json(cluster, judge, "/policies");
        format!("the destination's agent holds these policies: {held:?}")
    })
}

fn denials(cluster: &Cluster, node: NodeId, reason: &str) -> anyhow::Result<f64> {
    let text = metrics(cluster, node)?;
    Ok(metric_value(
        &text,
        "ferry_authorization_denials_total",
        &[("direction", "inbound"), ("reason", reason)],
    ))
}

struct Mesh {
    cluster: Cluster,
    n2: NodeId,
    web: PodId,
    job: PodId,
    db: PodId,
    /// An unmeshed pod on node 1: its connections are plaintext.
    legacy: PodId,
    agents: Vec<ferry_tests::Agent>,
    ca: ferry_tests::ca::CaFixture,
}

impl Mesh {
    fn api(&self) -> &FakeApiServer {
        self.ca
            .api
            .as_ref()
            .expect("the CA runs against the stand-in API server")
    }
}

/// shop/web, batch/job and the unmeshed legacy/legacy-0 on node 1 call shop/db (labelled `app: db`) on node 2.
fn mesh(name: &str) -> anyhow::Result<Mesh> {
    let mut cluster = Cluster::new(name)?;
    // The agents find the pods' cgroups where kubelet makes them.
    cluster.use_kubelet_cgroups(CgroupDriver::Systemd);
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    let web = cluster.add_pod(n1, PodOptions::meshed("web-0", "shop", "web"))?;
    let job = cluster.add_pod(n1, PodOptions::meshed("job-0", "batch", "job"))?;
    let legacy = cluster.add_pod(n1, PodOptions::unmeshed("legacy-0", "legacy", "old"))?;
    let db = cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let ca = cluster.start_ca_with(&CaOptions {
        kubernetes: true,
        ..CaOptions::default()
    })?;
    let agents = vec![
        cluster.agent(n1).ca(&ca).start()?,
        cluster.agent(n2).ca(&ca).start()?,
    ];
    Ok(Mesh {
        cluster,
        n2,
        web,
        job,
        db,
        legacy,
        agents,
        ca,
    })
}

#[test]
fn policies_from_the_api_server_allow_deny_cover_ports_and_follow_labels() -> anyhow::Result<()> {
    let mut m = mesh("policy-rules")?;
    let (web, job, db, n2) = (m.web, m.job, m.db, m.n2);
    let to = pod_addr(&m.cluster, db, Family::V4, PORT);
    let other_port = pod_addr(&m.cluster, db, Family::V4, PORT + 1);
    let _servers = [
        TestApp::serve(to).bytes(16).start(&mut m.cluster, db)?,
        TestApp::serve(other_port)
            .bytes(16)
            .start(&mut m.cluster, db)?,
    ];

    // No policy: the default (all-unauthenticated) admits every identity.
    ensure!(reaches(&mut m.cluster, web, to)?, "web before any policy");
    ensure!(reaches(&mut m.cluster, job, to)?, "job before any policy");

    // An Allow for shop/web: web gets in, batch/job is refused and counted.
    let allow = authorization_policy(
        "db-from-web",
        "{ selector: { matchLabels: { app: db } }, from: [{ serviceAccount: shop/web }] }",
    )?;
    m.api().apply_policy(allow);
    wait_reaches(&mut m.cluster, n2, job, to, false)?;
    ensure!(
        reaches(&mut m.cluster, web, to)?,
        "web with an Allow naming it"
    );
    ensure!(denials(&m.cluster, n2, "not_allowed")? >= 1.0);
    // The refused client's agent logs the reason the destination gave.
    let log = m.agents[0].proc.stderr_tail();
    ensure!(
        log.contains("does not admit spiffe://cluster.local/ns/batch/sa/job: no allow policy selecting it names it (allow policies: shop/db-from-web)"),
        "node 1's agent did not log the destination's reason:\n{log}"
    );

    // A Deny overrides the Allow.
    let deny = authorization_policy(
        "no-web",
        "{ action: Deny, from: [{ identity: spiffe://cluster.local/ns/shop/sa/web }] }",
    )?;
    m.api().apply_policy(deny.clone());
    wait_reaches(&mut m.cluster, n2, web, to, false)?;
    ensure!(denials(&m.cluster, n2, "deny_policy")? >= 1.0);
    m.api().delete_policy(deny);
    wait_reaches(&mut m.cluster, n2, web, to, true)?;

    // Restricted to one port, the Allow leaves the other port to the default.
    let allow_port = authorization_policy(
        "db-from-web",
        &format!(
            "{{ selector: {{ matchLabels: {{ app: db }} }}, ports: [{PORT}], from: [{{ serviceAccount: shop/web }}] }}"
        ),
    )?;
    m.api().apply_policy(allow_port);
    wait_reaches(&mut m.cluster, n2, job, other_port, true)?;
    ensure!(
        !reaches(&mut m.cluster, job, to)?,
        "job on the policy's port"
    );

    // The selector follows the pod's labels: relabelled, db leaves the policy.
    let mut relabelled = pod(&m.cluster, db);
    relabelled.metadata.labels = Some([("app".to_owned(), "db-v2".to_owned())].into());
    m.api().apply(relabelled);
    wait_reaches(&mut m.cluster, n2, job, to, true)?;
    m.api().apply(pod(&m.cluster, db));
    wait_reaches(&mut m.cluster, n2, job, to, false)?;

    // The policy decided, and /config_dump says what it selects and counted.
    let dump = admin_json(&m.cluster, n2, "/config_dump")?;
    let policy = dump["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["policy"] == "shop/db-from-web"))
        .with_context(|| format!("no shop/db-from-web in {}", dump["policies"]))?;
    ensure!(
        policy["localPods"] == serde_json::json!(["shop/db-0"]),
        "{policy}"
    );
    ensure!(
        policy["allowed"].as_u64() >= Some(1) && policy["denied"].as_u64() >= Some(2),
        "{policy}"
    );
    Ok(())
}

#[test]
fn namespace_defaults_apply_where_no_policy_does_and_bad_policies_are_said() -> anyhow::Result<()> {
    let mut m = mesh("policy-defaults")?;
    let (web, job, db, n2) = (m.web, m.job, m.db, m.n2);
    let to = pod_addr(&m.cluster, db, Family::V4, PORT);
    let _server = TestApp::serve(to).bytes(16).start(&mut m.cluster, db)?;
    ensure!(
        reaches(&mut m.cluster, job, to)?,
        "job before the annotation"
    );

    // same-namespace: shop/web gets in, batch/job does not.
    let mut shop = namespace("shop", true);
    shop.metadata.annotations = Some(
        [(
            DEFAULT_POLICY_ANNOTATION.to_owned(),
            "same-namespace".to_owned(),
        )]
        .into(),
    );
    m.api().apply(shop.clone());
    wait_reaches(&mut m.cluster, n2, job, to, false)?;
    ensure!(
        reaches(&mut m.cluster, web, to)?,
        "web, of the same namespace"
    );
    ensure!(denials(&m.cluster, n2, "default")? >= 1.0);

    // A policy the agent can only partly use: its valid source still admits,
    // and the agent says what it ignored.
    let partly = authorization_policy(
        "partly-valid",
        &format!(
            "{{ ports: [0, {PORT}], from: [{{ identity: spiffe://other.domain/ns/batch/sa/job }}, \
             {{ unauthenticated: false }}, {{ namespace: batch }}] }}"
        ),
    )?;
    // A selector the API server would refuse: it selects all of shop.
    let unreadable = authorization_policy(
        "unreadable-selector",
        "{ selector: { matchExpressions: [{ key: app, operator: In }] }, from: [{ namespace: batch }] }",
    )?;
    m.api().apply_policy(partly);
    m.api().apply_policy(unreadable);
    wait_reaches(&mut m.cluster, n2, job, to, true)?;
    let policies = admin_json(&m.cluster, n2, "/policies")?;
    let problems = |i: usize| -> Vec<String> {
        policies[i]["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect()
    };
    let (partly, unreadable) = (problems(0), problems(1));
    ensure!(
        partly.len() == 3
            && partly[0].starts_with("ports[0]: 0 is not a port")
            && partly[1].contains("trust domain other.domain")
            && partly[2].contains("unauthenticated: false names nobody"),
        "{policies}"
    );
    ensure!(
        unreadable.len() == 1
            && unreadable[0].contains("needs at least one value")
            && policies[1]["localPods"] == serde_json::json!(["shop/db-0"]),
        "{policies}"
    );
    let text = metrics(&m.cluster, n2)?;
    ensure!(
        metric_value(&text, "ferry_policies", &[("state", "partly_ignored")]) == 2.0
            && metric_value(&text, "ferry_policies", &[("state", "applied")]) == 0.0,
        "ferry_policies does not count the partly ignored policy"
    );
    let log = m.agents[1].proc.stderr_tail();
    ensure!(
        log.contains("authorization policy applied without what it got wrong"),
        "node 2's agent did not log the ignored parts:\n{log}"
    );

    // An annotation that is no default: the agent's default, and it says so.
    shop.metadata.annotations =
        Some([(DEFAULT_POLICY_ANNOTATION.to_owned(), "nobody".to_owned())].into());
    m.api().apply(shop);
    eventually(|| {
        let dump = admin_json(&m.cluster, n2, "/config_dump")?;
        ensure!(
            dump["policyProblems"][0]
                .as_str()
                .is_some_and(|p| p.contains("\"nobody\" is not a default inbound policy")),
            "{}",
            dump["policyProblems"]
        );
        Ok(())
    })?;
    Ok(())
}

#[test]
fn plaintext_that_policies_do_not_admit_is_refused_in_the_kernel() -> anyhow::Result<()> {
    let mut m = mesh("policy-plaintext")?;
    let (legacy, db, n2) = (m.legacy, m.db, m.n2);
    let to = pod_addr(&m.cluster, db, Family::V4, PORT);
    let other_port = pod_addr(&m.cluster, db, Family::V4, PORT + 1);
    let _servers = [
        TestApp::serve(to).bytes(16).start(&mut m.cluster, db)?,
        TestApp::serve(other_port)
            .bytes(16)
            .start(&mut m.cluster, db)?,
    ];
    let pins = m.agents[1].pin_dir.clone();
    let cgroup = m.cluster.pod(db).cgroup.clone();
    // Permissive, no policy: plaintext from the unmeshed pod is let in, counted.
    ensure!(
        reaches(&mut m.cluster, legacy, to)?,
        "plaintext before any policy"
    );
    let (passed, refused) = plaintext_counts(&pins, &cgroup)?;
    ensure!(
        passed >= 1 && refused == 0,
        "passed {passed}, refused {refused}"
    );

    // An Allow that does not name unauthenticated closes the plaintext door,
    // in the kernel: the SYN is dropped and counted as refused.
    m.api().apply_policy(authorization_policy(
        "db-from-web",
        "{ selector: { matchLabels: { app: db } }, from: [{ serviceAccount: shop/web }] }",
    )?);
    wait_reaches(&mut m.cluster, n2, legacy, to, false)?;
    let (_, refused) = plaintext_counts(&pins, &cgroup)?;
    ensure!(refused >= 1, "the kernel counted no refused plaintext");
    ensure!(
        reaches(&mut m.cluster, m.web, to)?,
        "web over mTLS is still admitted"
    );

    // Naming unauthenticated on one port opens that port alone.
    m.api().apply_policy(authorization_policy(
        "db-status-plaintext",
        &format!(
            "{{ selector: {{ matchLabels: {{ app: db }} }}, ports: [{}], from: [{{ unauthenticated: true }}] }}",
            PORT + 1
        ),
    )?);
    wait_reaches(&mut m.cluster, n2, legacy, other_port, true)?;
    ensure!(
        !reaches(&mut m.cluster, legacy, to)?,
        "plaintext on the other port"
    );
    let dump = admin_json(&m.cluster, n2, "/config_dump")?;
    let attached = &dump["capture"]["attached"][0]["plaintext"];
    ensure!(
        attached
            == &serde_json::json!({ "refused": true, "ports": { (PORT + 1).to_string(): true } }),
        "{attached}"
    );
    Ok(())
}

#[test]
fn a_connection_the_new_policies_deny_is_closed_and_the_others_flow_on() -> anyhow::Result<()> {
    let mut m = mesh("policy-revoke")?;
    let (web, job, db, n2) = (m.web, m.job, m.db, m.n2);
    let to = pod_addr(&m.cluster, db, Family::V4, PORT);
    let bulk = pod_addr(&m.cluster, db, Family::V4, PORT + 1);
    let _servers = [
        TestApp::serve(to).start(&mut m.cluster, db)?,
        TestApp::serve(bulk).bytes(BULK).start(&mut m.cluster, db)?,
    ];
    let mut revoked = TestApp::hold(to).start(&mut m.cluster, web)?;
    let untouched = TestApp::hold(to).start(&mut m.cluster, job)?;
    // Moving bytes while the policy changes, checked at both ends.
    let streaming = TestApp::connect(bulk)
        .bytes(BULK)
        .start(&mut m.cluster, job)?;

    let changed = Instant::now();
    m.api().apply_policy(authorization_policy(
        "no-web",
        "{ action: Deny, from: [{ serviceAccount: shop/web }] }",
    )?);
    let ended: Ended = revoked.wait_for(REVOKED_WITHIN)?;
    let took = changed.elapsed();
    eprintln!("ferry-tests: web's connection was reset {took:?} after the Deny was applied");
    ensure!(
        took <= REVOKED_WITHIN,
        "web's connection ended {took:?} after the policy"
    );
    ensure!(
        streaming.is_running()?,
        "the transfer ended before the policy changed; it proves nothing"
    );
    let exit = revoked.wait_exit()?;
    ensure!(
        !exit.success(),
        "web's connection ended cleanly ({ended:?}), not reset"
    );

    let log = m.agents[1].proc.stderr_tail();
    ensure!(
        log.contains("connection revoked")
            && log.contains("spiffe://cluster.local/ns/shop/sa/web")
            && log.contains("spiffe://cluster.local/ns/shop/sa/db")
            && log.contains("policy shop/no-web denies it"),
        "node 2's agent did not log the revocation with the policy and both identities:\n{log}"
    );
    let text = metrics(&m.cluster, n2)?;
    ensure!(
        metric_value(
            &text,
            "ferry_connections_revoked_total",
            &[("direction", "inbound")]
        ) == 1.0,
        "only web's connection is revoked"
    );

    let moved = streaming.wait_exit()?;
    ensure!(
        moved.success(),
        "the transfer the policy does not touch: {}",
        moved.stderr
    );
    let kept = untouched.release()?;
    ensure!(kept.success(), "job's held connection: {}", kept.stderr);
    Ok(())
}
