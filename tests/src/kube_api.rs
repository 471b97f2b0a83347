//! A stand-in Kubernetes API server for runs without a cluster: real HTTP,
//! the real paths and JSON (objects built from `k8s-openapi` types), so the
//! real `kube` clients in Ferry's binaries talk to it through a kubeconfig.
//!
//! It serves `POST tokenreviews` (answered from a table of known tokens) and,
//! for namespaces, pods, services and endpointslices, lists and watches the
//! way the API server does: every change gets the next resourceVersion and is
//! kept as an event; a watch streams the events after the version it names,
//! then new ones as they happen, with `BOOKMARK`s in between; a version older
//! than the last [`compact`](FakeApiServer::compact) gets `410 Gone`. Tests can
//! also [`drop_watches`](FakeApiServer::drop_watches) (what a restart does to
//! clients) and make the server [`unavailable`](FakeApiServer::set_available).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::Context as _;
use ferry_proto::policy::AuthorizationPolicy;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    Metadata, Resource,
    api::{
        authentication::v1::{TokenReview, TokenReviewStatus, UserInfo},
        core::v1::{HostIP, Namespace, Pod, PodIP, PodSpec, PodStatus},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{Cluster, PodId, netns};

/// Who a known token belongs to, as a TokenReview would say.
#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub username: String,
    pub node: Option<String>,
    pub pod: Option<String>,
    pub audiences: Vec<String>,
}

/// Where the stand-in API server listens (in the fabric namespace).
pub const FAKE_API_PORT: u16 = 6443;

/// How often an idle watch gets a bookmark.
const BOOKMARK_EVERY: Duration = Duration::from_secs(2);

/// The kinds served, by collection path: (path, apiVersion, kind).
const KINDS: [(&str, &str, &str); 5] = [
    ("/api/v1/namespaces", "v1", "Namespace"),
    ("/api/v1/pods", "v1", "Pod"),
    ("/api/v1/services", "v1", "Service"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSlice",
    ),
    (
        "/apis/ferry.dev/v1alpha1/authorizationpolicies",
        "ferry.dev/v1alpha1",
        "AuthorizationPolicy",
    ),
];

/// The kind of Ferry's custom resource, as [`KINDS`] lists it.
const POLICY_KIND: &str = "AuthorizationPolicy";

struct Event {
    version: u64,
    kind: &'static str,
    kind_of: &'static str,
    object: Value,
}

struct State {
    tokens: BTreeMap<String, TokenOwner>,
    /// Current objects: kind → `namespace/name` → object.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    events: Vec<Event>,
    version: u64,
    /// Watches from a version before this get 410 Gone.
    oldest_watchable: u64,
    available: bool,
    lists: u64,
}

/// A running stand-in API server; stops with the test process.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Wakes the open watches at each change; its value, the generation,
    /// is bumped to end them all.
    changes: watch::Sender<u64>,
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<State>>,
    changes: watch::Receiver<u64>,
}

impl FakeApiServer {
    /// Listens in network namespace `netns` on `addr`.
    pub fn start(netns_name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = netns::in_netns(netns_name, || {
            std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))
        })?;
        listener.set_nonblocking(true)?;
        let state = Arc::new(Mutex::new(State {
            tokens: BTreeMap::new(),
            objects: BTreeMap::new(),
            events: Vec::new(),
            version: 1,
            oldest_watchable: 0,
            available: true,
            lists: 0,
        }));
        let (changes, receiver) = watch::channel(0);
        let shared = Shared {
            state: Arc::clone(&state),
            changes: receiver,
        };
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request| handle(shared.clone(), request));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Ok(Self {
            addr,
            state,
            changes,
        })
    }

    /// Starts one for `cluster`, in its fabric namespace where every node
    /// reaches it, and writes its kubeconfig to `kubeconfig`.
    pub fn start_for(cluster: &Cluster, kubeconfig: &Path) -> anyhow::Result<Self> {
        let addr = SocketAddr::from((crate::sim::FABRIC_SERVICE_V4, FAKE_API_PORT));
        let api = Self::start(cluster.fabric_netns(), addr)?;
        api.write_kubeconfig(kubeconfig)?;
        Ok(api)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake API lock")
    }

    pub fn add_token(&self, token: &str, owner: TokenOwner) {
        self.lock().tokens.insert(token.to_owned(), owner);
    }

    /// Creates or replaces `object` (an ADDED or MODIFIED event).
    pub fn apply<K: Resource + Metadata<Ty = ObjectMeta> + serde::Serialize>(&self, mut object: K) {
        self.record(K::KIND, &mut object, K::metadata_mut, false);
    }

    /// Deletes `object` (a DELETED event carrying its last state).
    pub fn delete<K: Resource + Metadata<Ty = ObjectMeta> + serde::Serialize>(
        &self,
        mut object: K,
    ) {
        self.record(K::KIND, &mut object, K::metadata_mut, true);
    }

    /// Creates or replaces a Ferry `AuthorizationPolicy`.
    pub fn apply_policy(&self, mut policy: AuthorizationPolicy) {
        self.record(POLICY_KIND, &mut policy, |p| &mut p.metadata, false);
    }

    /// Deletes a Ferry `AuthorizationPolicy`.
    pub fn delete_policy(&self, mut policy: AuthorizationPolicy) {
        self.record(POLICY_KIND, &mut policy, |p| &mut p.metadata, true);
    }

    /// Stores `object` of `kind` at the next resourceVersion (written into
    /// its metadata) and records its event.
    fn record<T: serde::Serialize>(
        &self,
        kind: &str,
        object: &mut T,
        metadata: fn(&mut T) -> &mut ObjectMeta,
        delete: bool,
    ) {
        let kind = KINDS
            .iter()
            .map(|(_, _, served)| *served)
            .find(|served| *served == kind)
            .unwrap_or_else(|| panic!("the fake API server does not serve {kind}"));
        let meta = metadata(object);
        let key = format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or(""),
            meta.name.as_deref().unwrap_or("")
        );
        let mut state = self.lock();
        state.version += 1;
        let version = state.version;
        meta.resource_version = Some(version.to_string());
        let value = serde_json::to_value(&*object).expect("objects serialize");
        let objects = state.objects.entry(kind).or_default();
        let kind_of = if delete {
            objects.remove(&key);
            "DELETED"
        } else if objects.insert(key, value.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.events.push(Event {
            version,
            kind,
            kind_of,
            object: value,
        });
        drop(state);
        // The new event is in the state; the watches only need waking.
        self.changes.send_modify(|_| {});
    }

    /// The simulated cluster as the API server would hold it: each pod's
    /// namespace (labelled as meshed or not) and the pods themselves.
    pub fn load(&self, cluster: &Cluster) {
        let mut namespaces = BTreeMap::new();
        for pod in cluster.pods() {
            namespaces.insert(pod.namespace.clone(), pod.meshed);
        }
        for (name, meshed) in namespaces {
            self.apply(namespace(&name, meshed));
        }
        for i in 0..cluster.pods().len() {
            self.apply(pod(cluster, PodId(i)));
        }
    }

    /// Forgets every event so far: a watch resuming from any version it has
    /// seen gets `410 Gone` and must list again. Ends the open watches.
    pub fn compact(&self) {
        {
            let mut state = self.lock();
            state.oldest_watchable = state.version + 1;
            state.events.clear();
        }
        self.drop_watches();
    }

    /// Ends every open watch, as an API server restart does.
    pub fn drop_watches(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// While unavailable, every request is answered 503 and open watches end.
    pub fn set_available(&self, available: bool) {
        self.lock().available = available;
        if !available {
            self.drop_watches();
        }
    }

    /// How many lists the server has answered: a client that re-lists shows here.
    pub fn lists(&self) -> u64 {
        self.lock().lists
    }

    /// A kubeconfig that points a client at this server.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<PathBuf> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: ferry\n  user:\n    token: fake-admin-token\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: ferry\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(path, text)?;
        Ok(path.to_owned())
    }
}

/// A namespace, labelled `ferry.dev/mesh=enabled` if `meshed`.
pub fn namespace(name: &str, meshed: bool) -> Namespace {
    let labels = meshed.then(|| {
        BTreeMap::from([(
            ferry_proto::workload_file::MESH_LABEL.to_owned(),
            ferry_proto::workload_file::MESH_ENABLED.to_owned(),
        )])
    });
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels,
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// The simulated pod as the API server would show it running: its UID,
/// ServiceAccount, node, both addresses and its node's addresses.
pub fn pod(cluster: &Cluster, id: PodId) -> Pod {
    let pod = cluster.pod(id);
    let node = cluster.node(pod.node);
    let ips = |ips: [IpAddr; 2]| ips.map(|ip| ip.to_string());
    Pod {
        metadata: ObjectMeta {
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            labels: Some(pod.labels.clone()),
            creation_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            )),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.name.clone()),
            service_account_name: Some(pod.service_account.clone()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ips: Some(
                ips([pod.ipv4.into(), pod.ipv6.into()])
                    .map(|ip| PodIP { ip })
                    .into(),
            ),
            host_ips: Some(
                ips([node.ipv4.into(), node.ipv6.into()])
                    .map(|ip| HostIP { ip })
                    .into(),
            ),
            ..PodStatus::default()
        }),
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(
    shared: Shared,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_owned();
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if !shared.state.lock().expect("fake API lock").available {
        return Ok(status(
            StatusCode::SERVICE_UNAVAILABLE,
            "the API server is restarting",
        ));
    }
    let collection = KINDS.iter().find(|(p, _, _)| *p == path);
    let response = match (request.method().clone(), collection) {
        (Method::POST, None) if path == "/apis/authentication.k8s.io/v1/tokenreviews" => {
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            match serde_json::from_slice::<TokenReview>(&body) {
                Ok(review) => {
                    json_response(StatusCode::CREATED, &review_token(&shared.state, review))
                }
                Err(error) => status(StatusCode::BAD_REQUEST, &error.to_string()),
            }
        }
        (Method::GET, Some(&(_, api_version, kind)))
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") =>
        {
            let from = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout = query
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .map_or(Duration::from_secs(290), Duration::from_secs);
            let bookmarks = query
                .get("allowWatchBookmarks")
                .is_some_and(|b| b == "true");
            watch_stream(shared, api_version, kind, from, timeout, bookmarks)
        }
        (Method::GET, Some(&(_, api_version, kind))) => {
            let mut state = shared.state.lock().expect("fake API lock");
            state.lists += 1;
            let items: Vec<Value> = state
                .objects
                .get(kind)
                .map(|objects| objects.values().cloned().collect())
                .unwrap_or_default();
            json_response(
                StatusCode::OK,
                &json!({
                    "apiVersion": api_version,
                    "kind": format!("{kind}List"),
                    "metadata": { "resourceVersion": state.version.to_string() },
                    "items": items,
                }),
            )
        }
        _ => status(
            StatusCode::NOT_FOUND,
            &format!("the fake API server does not serve {path}"),
        ),
    };
    Ok(response)
}

/// A watch: the events of `kind` after version `from`, then every new one,
/// bookmarks while idle, until the timeout or the server drops its watches.
fn watch_stream(
    shared: Shared,
    api_version: &'static str,
    kind: &'static str,
    from: u64,
    timeout: Duration,
    bookmarks: bool,
) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let too_old = {
        let state = shared.state.lock().expect("fake API lock");
        from < state.oldest_watchable
    };
    tokio::spawn(async move {
        let line = |value: Value| {
            let mut bytes = serde_json::to_vec(&value).expect("JSON");
            bytes.push(b'\n');
            Bytes::from(bytes)
        };
        if too_old {
            let gone = json!({
                "type": "ERROR",
                "object": {
                    "apiVersion": "v1", "kind": "Status", "status": "Failure",
                    "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {from}"),
                },
            });
            let _ = tx.send(line(gone)).await;
            return;
        }
        let mut changes = shared.changes.clone();
        let generation = *changes.borrow_and_update();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = from;
        loop {
            let (pending, latest) = {
                let state = shared.state.lock().expect("fake API lock");
                let pending: Vec<Value> = state
                    .events
                    .iter()
                    .filter(|e| e.kind == kind && e.version > seen)
                    .map(|e| json!({ "type": e.kind_of, "object": e.object }))
                    .collect();
                (pending, state.version)
            };
            seen = latest;
            for event in pending {
                if tx.send(line(event)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() || *changes.borrow_and_update() != generation {
                        return;
                    }
                }
                () = tokio::time::sleep(BOOKMARK_EVERY) => {
                    if bookmarks {
                        let bookmark = json!({
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": api_version, "kind": kind,
                                "metadata": { "resourceVersion": seen.to_string() },
                            },
                        });
                        if tx.send(line(bookmark)).await.is_err() {
                            return;
                        }
                    }
                }
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let body = StreamBody::new(tokio_stream::StreamExt::map(stream, |bytes| {
        Ok::<_, Infallible>(Frame::data(bytes))
    }));
    let mut response = Response::new(body.boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn review_token(state: &Mutex<State>, mut review: TokenReview) -> TokenReview {
    let token = review.spec.token.clone().unwrap_or_default();
    let wanted = review.spec.audiences.clone().unwrap_or_default();
    let owner = state
        .lock()
        .expect("fake API lock")
        .tokens
        .get(&token)
        .cloned();
    review.status = Some(match owner {
        Some(owner) if wanted.iter().all(|a| owner.audiences.contains(a)) => {
            let mut extra = BTreeMap::new();
            if let Some(node) = owner.node {
                extra.insert(
                    "authentication.kubernetes.io/node-name".to_owned(),
                    vec![node],
                );
            }
            if let Some(pod) = owner.pod {
                extra.insert(
                    "authentication.kubernetes.io/pod-name".to_owned(),
                    vec![pod],
                );
            }
            TokenReviewStatus {
                authenticated: Some(true),
                audiences: Some(wanted),
                user: Some(UserInfo {
                    username: Some(owner.username),
                    extra: Some(extra),
                    ..UserInfo::default()
                }),
                ..TokenReviewStatus::default()
            }
        }
        Some(_) => TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token audiences do not match".to_owned()),
            ..TokenReviewStatus::default()
        },
        None => TokenReviewStatus {
            authenticated: Some(false),
            error: Some("invalid bearer token".to_owned()),
            ..TokenReviewStatus::default()
        },
    });
    review
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = Full::new(Bytes::from(serde_json::to_vec(value).expect("JSON")));
    let mut response = Response::new(body.boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": message, "code": code.as_u16(),
        }),
    )
}
