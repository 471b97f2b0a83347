//! A stand-in Kubernetes API server for runs without a cluster: real HTTP,
//! the real paths and JSON (objects built from `k8s-openapi` types), so the
//! real `kube` client in Ferry's binaries talks to it through a kubeconfig.
//!
//! It serves what the CA uses today: `POST tokenreviews` (answered from a
//! table of known tokens) and `GET pods` as a list and as a watch.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    api::{
        authentication::v1::{TokenReview, TokenReviewStatus, UserInfo},
        core::v1::{Pod, PodSpec},
    },
    apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta},
};

use crate::netns;

/// Who a known token belongs to, as a TokenReview would say.
#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub username: String,
    pub node: Option<String>,
    pub pod: Option<String>,
    pub audiences: Vec<String>,
}

#[derive(Default)]
struct State {
    tokens: BTreeMap<String, TokenOwner>,
    pods: Vec<Pod>,
    resource_version: u64,
}

/// A running stand-in API server; stops with the test process.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl FakeApiServer {
    /// Listens in network namespace `netns` on `addr`.
    pub fn start(netns_name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = netns::in_netns(netns_name, || {
            std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))
        })?;
        listener.set_nonblocking(true)?;
        let state = Arc::new(Mutex::new(State {
            resource_version: 1,
            ..State::default()
        }));
        let shared = Arc::clone(&state);
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
                    let state = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let service =
                            service_fn(move |request| handle(Arc::clone(&state), request));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Ok(Self { addr, state })
    }

    pub fn add_token(&self, token: &str, owner: TokenOwner) {
        self.state
            .lock()
            .expect("fake API lock")
            .tokens
            .insert(token.to_owned(), owner);
    }

    pub fn add_pod(&self, namespace: &str, name: &str, service_account: &str, node: &str) {
        let mut state = self.state.lock().expect("fake API lock");
        state.resource_version += 1;
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                uid: Some(format!("uid-{namespace}-{name}")),
                resource_version: Some(state.resource_version.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_owned()),
                service_account_name: Some(service_account.to_owned()),
                ..PodSpec::default()
            }),
            status: None,
        };
        state.pods.push(pod);
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

async fn handle(
    state: Arc<Mutex<State>>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let response = match (request.method().clone(), path.as_str()) {
        (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            match serde_json::from_slice::<TokenReview>(&body) {
                Ok(review) => json(StatusCode::CREATED, &review_token(&state, review)),
                Err(error) => status(StatusCode::BAD_REQUEST, &error.to_string()),
            }
        }
        (Method::GET, "/api/v1/pods") if query.contains("watch=true") => {
            // No changes to report: an empty watch that ends, and the client re-watches.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            Response::new(Full::new(Bytes::new()))
        }
        (Method::GET, "/api/v1/pods") => {
            let state = state.lock().expect("fake API lock");
            let list = serde_json::json!({
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": ListMeta {
                    resource_version: Some(state.resource_version.to_string()),
                    ..ListMeta::default()
                },
                "items": state.pods,
            });
            json(StatusCode::OK, &list)
        }
        _ => status(
            StatusCode::NOT_FOUND,
            &format!("the fake API server does not serve {path}"),
        ),
    };
    Ok(response)
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

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(value).expect("JSON"),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(
        code,
        &serde_json::json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": message, "code": code.as_u16(),
        }),
    )
}
