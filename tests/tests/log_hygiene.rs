//! What an outside party can make the CA and the agents log: a requested
//! identity, a token and its claims, a CSR's names, a TLS SNI, a tunnel
//! `CONNECT`, the admin endpoint's paths and `/logging?level=`, and the
//! workload file's names and annotations. Each carries a forged log line
//! and terminal escapes; afterwards the whole log of every process, in the
//! text and in the JSON format, holds no raw control character and no line
//! of the input's making.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use ferry_agent::identity::{Certifier as _, ca_client::CaClient};
use ferry_proto::{
    SpiffeId,
    identity::v1::{CertifyRequest, CertifyResponse},
    policy::DEFAULT_POLICY_ANNOTATION,
    workload_file::{PodSpec, WorkloadFile},
};
use ferry_tests::{
    Agent, Cluster, NodeId, PodOptions,
    ca::{CA_SERVER_NAME, CaFixture, CaOptions},
    inspect::eventually,
    netns,
};
use http::{HeaderValue, Method, Request};
use rcgen::{CertificateParams, KeyPair, SanType, string::Ia5String};
use rustls::{RootCertStore, sign::CertifiedKey};

/// Every forged line starts with this day: no line of a log may.
const FORGED_DAY: &str = "1999-12-31";
/// What the issue's report forged: a whole audit line of the CA.
const FORGED_ISSUE: &str = "1999-12-31T23:59:59.999999Z  INFO ferry_ca::service: issued a certificate identity=spiffe://cluster.local/ns/kube-system/sa/admin";
/// Terminal escapes and the other characters that fake or hide a line:
/// clear the screen, colour, CR, tab, BEL, DEL.
const ESCAPES_ASCII: &str = "\x1b[2J\x1b[31m\r\t\x07\x7f";
/// The same, and C1 controls (NEL, CSI), a bidi override, a line separator.
const ESCAPES: &str = "\x1b[2J\x1b[31m\r\t\x07\x7f\u{85}\u{9b}2J\u{202e}\u{2028}";
/// How every escaped hostile value shows in a log (text and JSON alike).
const ESCAPED_MARK: &str = r"u{1b}[2J";

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

fn hostile() -> String {
    format!("x{ESCAPES}\n{FORGED_ISSUE}")
}

fn hostile_ascii() -> String {
    format!("x{ESCAPES_ASCII}\n{FORGED_ISSUE}")
}

#[test]
fn hostile_input_is_logged_escaped_in_the_text_format() -> anyhow::Result<()> {
    hostile_input_is_logged_escaped("log-hygiene-text", Format::Text)
}

#[test]
fn hostile_input_is_logged_escaped_in_the_json_format() -> anyhow::Result<()> {
    hostile_input_is_logged_escaped("log-hygiene-json", Format::Json)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

impl Format {
    fn args(self) -> Vec<String> {
        match self {
            Self::Text => Vec::new(),
            Self::Json => vec!["--log-format".to_owned(), "json".to_owned()],
        }
    }
}

fn hostile_input_is_logged_escaped(name: &str, format: Format) -> anyhow::Result<()> {
    let mut cluster = Cluster::new(name)?;
    let n1 = cluster.add_node()?;
    let n2 = cluster.add_node()?;
    cluster.add_pod(n1, PodOptions::meshed("web-0", "shop", "web"))?;
    cluster.add_pod(n2, PodOptions::meshed("db-0", "shop", "db"))?;
    let ca = cluster.start_ca_with(&CaOptions {
        args: format.args(),
        ..CaOptions::default()
    })?;
    let a1 = cluster.agent(n1).ca(&ca).args(&format.args()).start()?;
    let a2 = cluster.agent(n2).ca(&ca).args(&format.args()).start()?;

    certify_requests(&cluster, &ca, n1).context("Certify")?;
    tunnel_requests(&cluster, &ca, n1, n2).context("the tunnel port")?;
    admin_requests(&cluster, n1).context("the admin endpoint")?;
    workload_files(&cluster, &ca, n1, &[&a1, &a2]).context("the workload file")?;

    let logs = stop(ca, a1, a2)?;
    for (who, log, reached) in &logs {
        check_log(who, log, format)?;
        for what in reached {
            ensure!(
                log.contains(what),
                "{who}: the log does not show {what:?}, so a path was not reached:\n{log}"
            );
        }
    }
    Ok(())
}

/// Requests a client without the agent's token (or with it) can send.
fn certify_requests(cluster: &Cluster, ca: &CaFixture, n1: NodeId) -> anyhow::Result<()> {
    let node = cluster.node(n1).name.clone();
    let token = ca.agent_token(&node)?;
    let claims = |change: &dyn Fn(&mut ferry_ca::jwt::TokenRequest)| {
        let mut request = CaFixture::agent_request(&node);
        change(&mut request);
        ca.mint(&request)
    };
    // No ':' in a ServiceAccount name, or the token is no ServiceAccount's.
    let forged_agent = format!("agent{ESCAPES}\n{FORGED_DAY} INFO ferry_ca.service issued");
    let cases: Vec<(&str, String, String, Vec<u8>)> = vec![
        ("no token", hostile(), String::new(), csr(&[WEB])),
        (
            "a bad token",
            hostile(),
            format!("eyJ{ESCAPES}.bad.token"),
            csr(&[WEB]),
        ),
        ("a good token", hostile(), token.clone(), csr(&[WEB])),
        (
            "a CSR naming another URI",
            WEB.to_owned(),
            token.clone(),
            csr(&[&format!("spiffe://{}", hostile_ascii())]),
        ),
        (
            "a token whose node claim is hostile",
            WEB.to_owned(),
            claims(&|r| r.node = hostile())?,
            csr(&[WEB]),
        ),
        (
            "a token whose subject is hostile",
            WEB.to_owned(),
            claims(&|r| r.service_account = forged_agent.clone())?,
            csr(&[WEB]),
        ),
        ("an empty CSR", WEB.to_owned(), token, Vec::new()),
    ];
    for (what, identity, token, csr_der) in cases {
        let request = CertifyRequest {
            identity,
            csr_der,
            token,
        };
        if certify(cluster, ca, request)?.is_ok() {
            bail!("the CA signed a request with {what}");
        }
    }
    Ok(())
}

fn certify(
    cluster: &Cluster,
    ca: &CaFixture,
    request: CertifyRequest,
) -> anyhow::Result<Result<CertifyResponse, String>> {
    let addr = ca.addr.to_string();
    let bundle = ca.trust_bundle.clone();
    netns::in_netns(cluster.fabric_netns(), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let client = CaClient::new(
                addr,
                CA_SERVER_NAME,
                bundle,
                ferry_proto::crypto::shared_provider(Default::default()),
            )?;
            Ok(client.certify(request).await.map_err(|e| e.to_string()))
        })
    })
}

fn csr(uris: &[&str]) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|uri| SanType::URI(Ia5String::try_from(*uri).expect("an IA5 string")))
        .collect();
    params
        .serialize_request(&key)
        .expect("a CSR")
        .der()
        .to_vec()
}

/// A ClientHello whose SNI holds odd bytes (rustls will not send one, so it
/// is written by hand), then `CONNECT`s that are no agent's.
fn tunnel_requests(
    cluster: &Cluster,
    ca: &CaFixture,
    n1: NodeId,
    n2: NodeId,
) -> anyhow::Result<()> {
    let tunnel = SocketAddr::from((cluster.node(n2).ipv4, ferry_proto::TUNNEL_PORT));
    let mut sni = b"db.shop.sa.cluster.local".to_vec();
    sni.extend(hostile().as_bytes());
    sni.extend(b"\x9b\xff");
    netns::in_netns(&cluster.node(n1).netns, || {
        let mut stream = TcpStream::connect_timeout(&tunnel, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(&client_hello(&sni))?;
        // The alert, then EOF; what it says does not matter here.
        let _ = stream.read_to_end(&mut Vec::new());
        Ok(())
    })?;

    let client = ca.client_certificate(WEB)?;
    let db: SpiffeId = DB.parse()?;
    netns::in_netns(&cluster.node(n1).netns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(connect_all(tunnel, client, db))
    })
}

/// A TLS 1.3 ClientHello carrying `sni` as its host name, nothing more.
fn client_hello(sni: &[u8]) -> Vec<u8> {
    fn u16_len(bytes: &[u8]) -> [u8; 2] {
        u16::try_from(bytes.len()).expect("short").to_be_bytes()
    }
    let mut name = vec![0];
    name.extend(u16_len(sni));
    name.extend(sni);
    let mut list = u16_len(&name).to_vec();
    list.extend(name);
    let mut extensions = vec![0, 0];
    extensions.extend(u16_len(&list));
    extensions.extend(list);
    // supported_versions: TLS 1.3.
    extensions.extend([0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    let mut hello = vec![0x03, 0x03];
    hello.extend([7; 32]);
    hello.push(0);
    hello.extend([0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    hello.extend(u16_len(&extensions));
    hello.extend(extensions);
    let mut handshake = vec![0x01];
    handshake.extend(&u32::try_from(hello.len()).expect("short").to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend(u16_len(&handshake));
    record.extend(handshake);
    record
}

/// `CONNECT`s with the oddest authority, header and method HTTP lets
/// through: `http` refuses control characters, non-ASCII and even `%` in
/// an authority, and anything but a token in a method, on either side (h2
/// resets a stream whose `:authority` does not parse); a header value may
/// hold obs-text bytes, but no header is logged.
async fn connect_all(
    tunnel: SocketAddr,
    (certified, roots): (Arc<CertifiedKey>, Arc<RootCertStore>),
    expected: SpiffeId,
) -> anyhow::Result<()> {
    let mut send =
        ferry_tests::tunnel_client::connect(tunnel, (certified, roots), &expected).await?;
    let requests = [
        Request::builder()
            .method(Method::CONNECT)
            .uri("x_1999-12-31~INFO!ferry_ca.service$issued:8080")
            .body(())?,
        Request::builder()
            .method(Method::CONNECT)
            .uri("db.shop:8080")
            .header(
                "x-forged",
                HeaderValue::from_bytes(b"\x80\x9b2J\xe2\x80\xae obs-text")?,
            )
            .body(())?,
        Request::builder()
            .method(Method::from_bytes(b"FORGE")?)
            .uri("https://db.shop/%1b%5b2J")
            .body(())?,
    ];
    for request in requests {
        send = send.ready().await?;
        let (response, mut body) = send.send_request(request, false)?;
        let response = response.await?;
        ensure!(
            response.status().is_client_error(),
            "a hostile CONNECT was answered {}",
            response.status()
        );
        let _ = body.send_data(Bytes::new(), true);
    }
    Ok(())
}

/// Paths with odd characters, and `/logging?level=` with a filter that
/// parses but holds a forged line.
fn admin_requests(cluster: &Cluster, n1: NodeId) -> anyhow::Result<()> {
    // httparse lets UTF-8 through in a path, not C0 controls: both are sent.
    for path in ["/\u{85}\u{9b}2J\u{202e}x", "/\x1b[2J", "/%1b%5b2J%0a"] {
        let _ = cluster.admin_get(n1, path);
    }
    let filter = format!(
        "info,[x{ESCAPES}\n{FORGED_DAY}T23:59:59.999999Z  INFO ferry_agent::logging: log filter changed filter=off]=debug"
    );
    let (status, body) = cluster.admin_post(n1, &format!("/logging?level={}", percent(&filter)))?;
    ensure!(status == 200, "the hostile filter: {status} {body}");
    let (status, body) = cluster.admin_post(n1, "/logging?level=info")?;
    ensure!(status == 200, "level=info: {status} {body}");
    // A '%' before a multi-byte character once made the handler panic.
    let (status, body) = cluster.admin_post(n1, "/logging?level=%a\u{e9}")?;
    ensure!(status == 400, "level=%a\u{e9}: {status} {body}");
    Ok(())
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A valid file whose namespace annotation is hostile, then an invalid one
/// whose pod names and cgroup are; the CA reads it on the next request.
fn workload_files(
    cluster: &Cluster,
    ca: &CaFixture,
    n1: NodeId,
    agents: &[&Agent],
) -> anyhow::Result<()> {
    let path = cluster.workloads_path();
    let good: WorkloadFile = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;

    let mut annotated = good.clone();
    let shop = annotated
        .namespaces
        .iter_mut()
        .find(|ns| ns.name == "shop")
        .context("no namespace shop")?;
    shop.annotations
        .insert(DEFAULT_POLICY_ANNOTATION.to_owned(), hostile());
    replace(&path, &annotated)?;
    for agent in agents {
        wait_for_log(agent, "policy setting ignored")?;
    }

    let mut invalid = good.clone();
    invalid.pods.push(PodSpec {
        name: hostile(),
        namespace: format!("shop{ESCAPES}"),
        service_account: "web".to_owned(),
        node: cluster.node(n1).name.clone(),
        ips: vec!["198.18.250.250".parse()?],
        cgroup: Some(format!("/sys/fs/cgroup/{}", hostile()).into()),
        excluded_ports: Vec::new(),
        labels: Default::default(),
    });
    replace(&path, &invalid)?;
    for agent in agents {
        wait_for_log(agent, "ignoring the changed workload file")?;
    }
    // The CA reads the file again when a request needs it.
    let request = CertifyRequest {
        identity: WEB.to_owned(),
        csr_der: csr(&[WEB]),
        token: ca.agent_token(&cluster.node(n1).name)?,
    };
    certify(cluster, ca, request)?.map_err(anyhow::Error::msg)?;
    replace(&path, &good)
}

fn replace(path: &Path, file: &WorkloadFile) -> anyhow::Result<()> {
    let partial = path.with_extension("hostile.partial");
    std::fs::write(&partial, serde_yaml::to_string(file)?)?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

fn wait_for_log(agent: &Agent, what: &str) -> anyhow::Result<()> {
    eventually(|| {
        let tail = agent.proc.stderr_tail();
        ensure!(tail.contains(what), "no {what:?} in:\n{tail}");
        Ok(())
    })
}

/// Stops the CA and the agents; each one's whole log, and what it must show.
fn stop(
    mut ca: CaFixture,
    mut a1: Agent,
    mut a2: Agent,
) -> anyhow::Result<Vec<(&'static str, String, Vec<&'static str>)>> {
    const EXIT: Duration = Duration::from_secs(30);
    ca.proc.terminate()?;
    a1.terminate()?;
    a2.terminate()?;
    let (_, _, ca_log) = ca.proc.wait_exit(EXIT)?;
    let a1_log = a1.wait_exit(EXIT)?.stderr;
    let a2_log = a2.wait_exit(EXIT)?.stderr;
    Ok(vec![
        (
            "ferry-ca",
            ca_log,
            vec![
                ESCAPED_MARK,
                "refused a certificate request",
                "keeping the last good workload file",
            ],
        ),
        (
            "ferry-agent n1",
            a1_log,
            vec![
                ESCAPED_MARK,
                "log filter changed",
                "policy setting ignored",
                "ignoring the changed workload file",
            ],
        ),
        (
            "ferry-agent n2",
            a2_log,
            vec![
                ESCAPED_MARK,
                "inbound tunnel connection refused",
                "tunnel request refused",
            ],
        ),
    ])
}

/// Characters no log line may hold raw: C0 and C1 controls and DEL (so also
/// ESC: neither process colours a log that is not a terminal), the
/// bidirectional controls, and the line and paragraph separators.
fn is_forbidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{61c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{2066}'..='\u{2069}'
        )
}

fn check_log(who: &str, log: &str, format: Format) -> anyhow::Result<()> {
    for (n, line) in log.split('\n').enumerate() {
        if let Some(c) = line.chars().find(|c| is_forbidden(*c)) {
            bail!("{who}: line {n} holds a raw {c:?}: {line:?}");
        }
        ensure!(
            !line.trim_start().starts_with(FORGED_DAY),
            "{who}: line {n} was forged by the input: {line:?}"
        );
        if format == Format::Json {
            serde_json::from_str::<serde_json::Value>(line)
                .with_context(|| format!("{who}: line {n} is not a JSON record: {line:?}"))?;
        }
    }
    Ok(())
}
