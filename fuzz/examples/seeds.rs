//! Writes the committed seed corpora, `fuzz/seeds/<target>/`, from real
//! inputs: a CSR made the way the agent makes one, a token minted the way
//! the API server mints one (with the fixed fuzz key), the JWKS that trusts
//! it; the HTTP/2 frames an agent's h2 client writes for its `CONNECT`s, the
//! refusals the inbound side answers, workload files, the Kubernetes
//! objects of the same cluster as the API server serves them, admin
//! requests, and the agent's own `/metrics` text. Run again only to change
//! the seeds:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```
//!
//! Each file is a mode byte (see the target's doc) and the input.

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ferry_agent::{
    admin::READY_PATH,
    metrics::Metrics,
    proxy::{inbound::admit, metrics::Direction},
    tunnel::wire,
};
use ferry_ca::jwt::TokenRequest;
use ferry_fuzz::{
    CLIENTS, HEADER_END, IDENTITY, LOCALS, NODE, PREFACE, WORKLOADS, jwt_part, token_key,
    tunnel_byte, tunnel_peer, workload_table,
};
use ferry_proto::identity::v1::CertifyRequest;
use prost::Message as _;
use rcgen::{CertificateParams, KeyPair, SanType, string::Ia5String};

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let write = |target: &str, name: &str, mode: Option<u8>, input: &[u8]| {
        let dir = seeds.join(target);
        fs::create_dir_all(&dir).expect("create the seed directory");
        let bytes: Vec<u8> = mode.into_iter().chain(input.iter().copied()).collect();
        fs::write(dir.join(name), bytes).expect("write a seed");
    };

    for (name, id) in [
        ("id", IDENTITY),
        (
            "id-dotted-service-account",
            "spiffe://cluster.local/ns/shop/sa/api.v2",
        ),
        (
            "id-other-trust-domain",
            "spiffe://example.org/ns/kube-system/sa/coredns",
        ),
        ("id-bad-namespace", "spiffe://cluster.local/ns/a.b/sa/c"),
        ("id-extra-segment", "spiffe://cluster.local/ns/a/sa/b/extra"),
    ] {
        write("spiffe_id", name, Some(0), id.as_bytes());
    }
    for (name, sni) in [
        ("sni", "api.shop.sa.cluster.local"),
        ("sni-dotted-service-account", "api.v2.shop.sa.cluster.local"),
        (
            "sni-other-trust-domain",
            "coredns.kube-system.sa.example.org\0example.org",
        ),
        ("sni-service", "api.shop.svc.cluster.local"),
    ] {
        write("spiffe_id", name, Some(1), sni.as_bytes());
    }

    let key = token_key();
    let token = key.minter.mint(&agent_token()).expect("mint a token");
    let claims: serde_json::Value = jwt_part(&token, 1).expect("the minted claims");
    write("jwt", "token", Some(0), token.as_bytes());
    write("jwt", "claims", Some(1), claims.to_string().as_bytes());
    let with_header = |header: &serde_json::Value, claims: &serde_json::Value| {
        let mut bytes = header.to_string().into_bytes();
        bytes.push(HEADER_END);
        bytes.extend(claims.to_string().into_bytes());
        bytes
    };
    let header: serde_json::Value = jwt_part(&token, 0).expect("the minted header");
    write(
        "jwt",
        "header-and-claims",
        Some(1),
        &with_header(&header, &claims),
    );
    let unnamed = serde_json::json!({ "alg": "ES256" });
    write(
        "jwt",
        "header-without-kid",
        Some(1),
        &with_header(&unnamed, &claims),
    );
    let hmac = serde_json::json!({ "alg": "HS256", "kid": key.kid });
    write("jwt", "header-hs256", Some(1), &with_header(&hmac, &claims));
    let mut nodeless = claims.clone();
    nodeless["kubernetes.io"]
        .as_object_mut()
        .expect("kubernetes.io claims")
        .remove("node");
    write(
        "jwt",
        "claims-without-node",
        Some(1),
        nodeless.to_string().as_bytes(),
    );
    let mut node_subject = claims.clone();
    node_subject["sub"] = "system:node:n1".into();
    write(
        "jwt",
        "claims-node-subject",
        Some(1),
        node_subject.to_string().as_bytes(),
    );

    let identity: ferry_proto::SpiffeId = IDENTITY.parse().expect("IDENTITY");
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
    let csr = agent_csr(&p256, &[uri(IDENTITY)]);
    write("certify_request", "csr", Some(1), &csr);
    let request = CertifyRequest {
        identity: identity.to_string(),
        csr_der: csr,
        token: token.clone(),
    };
    write(
        "certify_request",
        "request",
        Some(0),
        &request.encode_to_vec(),
    );
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("a P-384 key");
    write(
        "certify_request",
        "csr-p384",
        Some(1),
        &agent_csr(&p384, &[uri(IDENTITY)]),
    );
    let dns = SanType::DnsName("api.shop.svc".try_into().expect("a DNS name"));
    write(
        "certify_request",
        "csr-two-names",
        Some(1),
        &agent_csr(&p256, &[uri(IDENTITY), dns]),
    );

    let jwks = serde_json::to_string(&key.minter.jwks()).expect("the JWKS");
    write("jwks", "ec", None, jwks.as_bytes());
    let rsa =
        aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("an RSA key");
    let public = aws_lc_rs::signature::RsaPublicKeyComponents::<Vec<u8>>::from(
        aws_lc_rs::signature::KeyPair::public_key(&rsa),
    );
    let rsa_jwk = serde_json::json!({
        "kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig",
        "n": B64.encode(&public.n), "e": B64.encode(&public.e),
    });
    write(
        "jwks",
        "rsa",
        None,
        serde_json::json!({ "keys": [rsa_jwk] })
            .to_string()
            .as_bytes(),
    );
    let mut mixed: serde_json::Value = serde_json::from_str(&jwks).expect("the JWKS");
    mixed["keys"]
        .as_array_mut()
        .expect("keys")
        .extend(serde_json::json!([
            { "kty": "oct", "kid": "hmac", "k": B64.encode(b"a shared secret") },
            { "kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": B64.encode([7u8; 32]) },
            { "kty": "EC", "kid": "p384", "crv": "P-384", "x": B64.encode([1u8; 48]), "y": B64.encode([2u8; 48]) },
            { "kty": "RSA", "kid": "pss", "alg": "PS256", "n": B64.encode([3u8; 256]), "e": "AQAB" },
        ]).as_array().expect("keys").iter().cloned());
    write("jwks", "mixed", None, mixed.to_string().as_bytes());

    agent_seeds(&write);

    println!("wrote the seeds under {}", seeds.display());
}

/// A token as the API server mints one for an agent, valid for a century so
/// the seed stays accepted.
fn agent_token() -> TokenRequest {
    TokenRequest {
        namespace: "ferry-system".to_owned(),
        service_account: "ferry-agent".to_owned(),
        node: "n1".to_owned(),
        pod: "ferry-agent-x7k2p".to_owned(),
        audience: vec![ferry_proto::TOKEN_AUDIENCE.to_owned()],
        lifetime_secs: 100 * 365 * 24 * 3600,
    }
}

/// A CSR as the agent makes one (`identity/manager.rs`): no subject, the
/// names given, signed by `key`.
fn agent_csr(key: &KeyPair, sans: &[SanType]) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = sans.to_vec();
    params.serialize_request(key).expect("a CSR").der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).expect("an IA5 string"))
}

/// How a seed is written: target, file name, mode byte, input.
type Write<'a> = dyn Fn(&str, &str, Option<u8>, &[u8]) + 'a;

fn agent_seeds(write: &Write<'_>) {
    tunnel_seeds(write);
    workload_file_seeds(write);
    kube_table_seeds(write);
    admin_request_seeds(write);
    inspect_seeds(write);
}

fn local(id: &str) -> usize {
    LOCALS.iter().position(|l| *l == id).expect("one of LOCALS")
}

fn client(id: &str) -> usize {
    CLIENTS
        .iter()
        .position(|c| *c == id)
        .expect("one of CLIENTS")
}

fn tunnel_seeds(write: &Write<'_>) {
    let (api, web, db) = (
        "spiffe://cluster.local/ns/shop/sa/api",
        "spiffe://cluster.local/ns/shop/sa/web.v2",
        "spiffe://cluster.local/ns/shop/sa/db",
    );
    let ops = "spiffe://cluster.local/ns/ops/sa/monitor";
    let connect = |target: &str| wire::connect_request(target.parse().expect("an address"));
    let get = || {
        http::Request::builder()
            .method(http::Method::GET)
            .uri("http://198.18.1.2:8080/")
            .body(())
            .expect("a GET")
    };
    let cases: Vec<(&str, &str, &str, http::Request<()>)> = vec![
        ("connect-allowed", api, web, connect("198.18.1.2:8080")),
        ("connect-ipv6", api, ops, connect("[2001:2:0:1::2]:8080")),
        ("connect-other-node", api, web, connect("198.18.2.2:5432")),
        ("connect-unmeshed", api, web, connect("198.18.1.4:80")),
        (
            "connect-dotted-service-account",
            web,
            web,
            connect("198.18.1.3:8080"),
        ),
        ("connect-denied", web, db, connect("198.18.1.3:8080")),
        (
            "connect-wrong-identity",
            db,
            web,
            connect("198.18.1.2:8080"),
        ),
        ("get-not-connect", api, web, get()),
    ];
    let mut all = Vec::new();
    for (name, this_end, caller, request) in cases {
        all.push(clone_request(&request));
        let frames = h2_client_frames(vec![request]);
        let mode = tunnel_byte(0, local(this_end), client(caller));
        write("tunnel_connect", name, Some(mode), &frames);
    }
    write(
        "tunnel_connect",
        "connect-many",
        Some(tunnel_byte(0, local(api), client(web))),
        &h2_client_frames(all),
    );

    // The reasons the inbound side answers with, as a client reads them.
    let (_, peer) = tunnel_peer(tunnel_byte(0, local(api), client(web)));
    let refusals: Vec<String> = ["198.18.2.2:5432", "198.18.1.4:80", "198.18.9.9:80"]
        .iter()
        .map(|target| {
            let uri: http::Uri = target.parse().expect("a URI");
            admit(&http::Method::CONNECT, &uri, workload_table(), NODE, &peer)
                .expect_err("refused")
                .to_string()
        })
        .collect();
    let reason_mode = tunnel_byte(1, local(api), client(web));
    write(
        "tunnel_connect",
        "reason",
        Some(reason_mode),
        refusals[0].as_bytes(),
    );
    write(
        "tunnel_connect",
        "reasons",
        Some(reason_mode),
        refusals.join("\n").as_bytes(),
    );
    write(
        "tunnel_connect",
        "reason-tab-and-utf8",
        Some(reason_mode),
        "pod\tshop/caf\u{e9} is not meshed".as_bytes(),
    );
}

fn clone_request(request: &http::Request<()>) -> http::Request<()> {
    http::Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone())
        .body(())
        .expect("a copy")
}

/// What an agent's h2 client (the pool's settings) writes after the
/// preface to open a stream for each of `requests`.
fn h2_client_frames(requests: Vec<http::Request<()>>) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let (io, mut server) = tokio::io::duplex(1 << 20);
        let (mut send, connection) = h2::client::Builder::new()
            .initial_window_size(wire::STREAM_WINDOW)
            .initial_connection_window_size(wire::CONNECTION_WINDOW)
            .max_frame_size(wire::MAX_FRAME_SIZE)
            .max_concurrent_reset_streams(wire::MAX_CONCURRENT_RESET_STREAMS)
            .handshake::<_, bytes::Bytes>(io)
            .await
            .expect("an h2 client handshake");
        tokio::spawn(connection);
        let mut open = Vec::new();
        for request in requests {
            send = send.ready().await.expect("the client is ready");
            open.push(send.send_request(request, false).expect("a request"));
        }
        let mut written = Vec::new();
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), server.read_buf(&mut written)).await
        {
            if n == 0 {
                break;
            }
        }
        drop(open);
        let frames = written
            .strip_prefix(PREFACE)
            .expect("an h2 client starts with the preface");
        frames.to_vec()
    })
}

fn workload_file_seeds(write: &Write<'_>) {
    write("workload_file", "cluster-n1", Some(0), WORKLOADS.as_bytes());
    write("workload_file", "cluster-n2", Some(1), WORKLOADS.as_bytes());
    let strict = "\
nodes:
  - name: n1
    addresses: [198.19.0.1, \"2001:2:0:ff::1\"]
namespaces:
  - name: shop
    labels: { ferry.dev/mesh: enabled }
    annotations: { ferry.dev/inbound: strict, ferry.dev/default-inbound-policy: deny }
pods:
  - name: web-0
    namespace: shop
    serviceAccount: web
    node: n1
    ips: [198.18.1.2, \"2001:2:0:1::2\"]
    cgroup: /sys/fs/cgroup/kubepods/pod1234
    excludedPorts: [22]
    labels: { app: web }
policies:
  - name: web-clients
    namespace: shop
    spec:
      selector: { matchExpressions: [{ key: app, operator: In, values: [web] }] }
      from: [{ namespace: shop }, { unauthenticated: true }, { identity: \"spiffe://cluster.local/ns/ops/sa/x\" }]
";
    write("workload_file", "strict-n1", Some(0), strict.as_bytes());
    let invalid = "\
nodes: [{ name: n1, addresses: [198.19.0.1, 198.19.0.9] }]
namespaces: [{ name: Shop }, { name: shop, annotations: { ferry.dev/inbound: open } }]
pods:
  - { name: a, namespace: shop, serviceAccount: a, node: n3, ips: [198.18.1.2], excludedPorts: [0] }
  - { name: b, namespace: shop, serviceAccount: b, node: n1, ips: [198.18.1.2, 127.0.0.1] }
services:
  - { name: s, namespace: shop, clusterIPs: [], ports: [{ port: 0 }], endpoints: [c] }
";
    write("workload_file", "invalid", Some(2), invalid.as_bytes());
}

fn kube_table_seeds(write: &Write<'_>) {
    use k8s_openapi::{
        api::{
            core::v1::{
                Container, HostIP, Namespace, ObjectReference, Pod, PodIP, PodSpec, PodStatus,
                Service, ServicePort, ServiceSpec,
            },
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
        },
        apimachinery::pkg::{
            apis::meta::v1::{ManagedFieldsEntry, ObjectMeta, Time},
            util::intstr::IntOrString,
        },
        jiff::Timestamp,
    };
    let map = |pairs: &[(&str, &str)]| -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    };
    let managed = || {
        Some(vec![ManagedFieldsEntry {
            manager: Some("kubectl".to_owned()),
            operation: Some("Apply".to_owned()),
            ..Default::default()
        }])
    };
    let namespace = |name: &str, labels, annotations| Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels,
            annotations,
            ..Default::default()
        },
        ..Default::default()
    };
    let namespaces = vec![
        namespace(
            "shop",
            map(&[("ferry.dev/mesh", "enabled")]),
            map(&[
                ("ferry.dev/inbound", "strict"),
                ("ferry.dev/default-inbound-policy", "same-namespace"),
                ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
            ]),
        ),
        namespace("ops", map(&[("ferry.dev/mesh", "enabled")]), None),
        namespace(
            "legacy",
            map(&[("kubernetes.io/metadata.name", "legacy")]),
            map(&[("ferry.dev/default-inbound-policy", "nobody")]),
        ),
    ];
    let pod = |ns: &str, name: &str, node: &str, ip: &str, created: i64| Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            uid: Some(format!("u-{name}")),
            creation_timestamp: Some(Time(Timestamp::from_second(created).expect("a time"))),
            labels: map(&[("app", name.split('-').next().unwrap_or(name))]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            service_account_name: Some(name.split('-').next().unwrap_or(name).to_owned()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ip: Some(ip.to_owned()),
            pod_ips: Some(vec![PodIP { ip: ip.to_owned() }]),
            host_ip: Some(format!("198.19.0.{}", &node[1..])),
            host_ips: Some(vec![HostIP {
                ip: format!("198.19.0.{}", &node[1..]),
            }]),
            ..Default::default()
        }),
    };
    let mut api = pod("shop", "api-0", "n1", "198.18.1.2", 1_700_000_000);
    api.status.as_mut().expect("a status").pod_ips = Some(vec![
        PodIP {
            ip: "198.18.1.2".to_owned(),
        },
        PodIP {
            ip: "2001:2:0:1::2".to_owned(),
        },
    ]);
    api.metadata.annotations = map(&[
        ("ferry.dev/excluded-ports", "5432, 6379,nope"),
        ("prometheus.io/scrape", "true"),
    ]);
    let mut going = pod("shop", "api-old", "n1", "198.18.1.9", 1_600_000_000);
    going.metadata.deletion_timestamp =
        Some(Time(Timestamp::from_second(1_700_000_100).expect("a time")));
    let reused = pod("shop", "api-new", "n1", "198.18.1.9", 1_700_000_050);
    let mut done = pod("shop", "job-0", "n1", "198.18.1.5", 1_700_000_000);
    done.status.as_mut().expect("a status").phase = Some("Succeeded".to_owned());
    let mut host = pod("ops", "node-exporter", "n1", "198.19.0.1", 1_700_000_000);
    host.spec.as_mut().expect("a spec").host_network = Some(true);
    let mut web = pod("shop", "web-0", "n1", "198.18.1.3", 1_700_000_000);
    web.metadata.managed_fields = managed();
    web.spec.as_mut().expect("a spec").containers = vec![Container {
        name: "app".to_owned(),
        image: Some("registry.example/web:1".to_owned()),
        ..Default::default()
    }];
    let pods = vec![
        api,
        web,
        pod("legacy", "old-0", "n1", "198.18.1.4", 1_700_000_000),
        pod("shop", "db-0", "n2", "198.18.2.2", 1_700_000_000),
    ];
    // Pods coming and going: an address handed on, a finished job, the host's.
    let lifecycle = vec![
        going,
        reused,
        done,
        host,
        pod("ops", "monitor-0", "n2", "198.18.2.3", 1_700_000_000),
    ];
    let service = Service {
        metadata: ObjectMeta {
            name: Some("db".to_owned()),
            namespace: Some("shop".to_owned()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("198.18.100.2".to_owned()),
            cluster_ips: Some(vec!["198.18.100.2".to_owned()]),
            ports: Some(vec![
                ServicePort {
                    name: Some("sql".to_owned()),
                    port: 5432,
                    target_port: Some(IntOrString::String("postgres".to_owned())),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("dns".to_owned()),
                    port: 53,
                    protocol: Some("UDP".to_owned()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    };
    let endpoint = |name: &str, ready: bool| Endpoint {
        addresses: vec!["198.18.2.2".to_owned()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            ..Default::default()
        }),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".to_owned()),
            name: Some(name.to_owned()),
            namespace: Some("shop".to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some("db-x7k2p".to_owned()),
            namespace: Some("shop".to_owned()),
            labels: map(&[("kubernetes.io/service-name", "db")]),
            ..Default::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints: vec![endpoint("db-0", true), endpoint("db-1", false)],
        ports: Some(vec![EndpointPort {
            name: Some("sql".to_owned()),
            port: Some(15432),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
    };
    let file: ferry_proto::workload_file::WorkloadFile =
        serde_yaml::from_str(WORKLOADS).expect("WORKLOADS");
    let policies: Vec<ferry_proto::policy::AuthorizationPolicy> = file
        .policies
        .iter()
        .map(|policy| {
            let mut object =
                ferry_proto::policy::AuthorizationPolicy::new(&policy.name, policy.spec.clone());
            object.metadata.namespace = Some(policy.namespace.clone());
            object
        })
        .collect();
    let objects = serde_json::json!({
        "namespaces": namespaces,
        "pods": pods,
        "services": [service],
        "slices": [slice],
        "policies": policies,
    });
    write(
        "kube_table",
        "cluster",
        None,
        objects.to_string().as_bytes(),
    );
    let lifecycle = serde_json::json!({ "namespaces": namespaces, "pods": lifecycle });
    write(
        "kube_table",
        "lifecycle",
        None,
        lifecycle.to_string().as_bytes(),
    );
}

fn admin_request_seeds(write: &Write<'_>) {
    // The first byte picks the method: 0 GET, 1 POST, 2 PUT.
    for (name, method, target) in [
        ("config-dump", 0, "/config_dump"),
        ("ready", 0, READY_PATH),
        ("show-filter", 0, "/logging"),
        (
            "set-filter",
            1,
            "/logging?level=info%2Cferry_agent%3A%3Atunnel%3Ddebug",
        ),
        ("set-filter-second", 1, "/logging?x=1&level=warn"),
        ("set-bad-filter", 1, "/logging?level=info%3D%3Dx"),
        ("set-no-filter", 1, "/logging"),
        ("set-escaped-newline", 1, "/logging?level=info%0a%1b%5b2J"),
        ("put-workloads", 2, "/workloads"),
        ("no-such-page", 0, "/nope?level=%zz"),
    ] {
        write("admin_request", name, Some(method), target.as_bytes());
    }
}

fn inspect_seeds(write: &Write<'_>) {
    let metrics = Metrics::default();
    metrics.proxy.policy_allowed(Some("shop/api-from-ops"));
    metrics.proxy.policy_allowed(None);
    let (_, peer) = tunnel_peer(tunnel_byte(0, 0, 2));
    let uri: http::Uri = "198.18.1.3:8080".parse().expect("a URI");
    let refused = admit(&http::Method::CONNECT, &uri, workload_table(), NODE, &peer)
        .expect_err("shop/db is denied");
    metrics.proxy.inbound_refused(refused.inbound_reason());
    if let ferry_agent::proxy::Refused::Policy(denied) = &refused {
        metrics.proxy.policy_denied(Direction::Inbound, denied);
    }
    let text = metrics.render();
    write("inspect", "metrics", Some(2), text.as_bytes());
    write(
        "inspect",
        "metrics-labels-escaped",
        Some(2),
        b"# TYPE ferry_x counter\nferry_x_total{a=\"q\\\"\\\\\\n\",b=\"\"} 1.5e3 1700000000\nferry_y +Inf\nferry_z{} NaN\n# EOF\n",
    );
    let plain = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncontent-length: {}\r\ndate: Tue, 14 Nov 2023 22:13:20 GMT\r\n\r\n{text}",
        ferry_agent::metrics::CONTENT_TYPE,
        text.len()
    );
    write("inspect", "response-metrics", Some(0), plain.as_bytes());
    let body = "{\n  \"pid\": 1,\n  \"ready\": false,\n  \"notReadyReasons\": [\"pods not captured yet\"]\n}";
    let mut chunked = String::from(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    for part in [&body[..20], &body[20..]] {
        chunked.push_str(&format!("{:x}\r\n{part}\r\n", part.len()));
    }
    chunked.push_str("0\r\n\r\n");
    write("inspect", "response-chunked", Some(0), chunked.as_bytes());
    let mut sizes = vec![3, 0x8a, 17, 64];
    sizes.push(HEADER_END);
    sizes.extend(body.as_bytes());
    write("inspect", "chunk-sizes", Some(1), &sizes);
}
