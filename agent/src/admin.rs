//! The admin endpoint (localhost only) and the readiness probe.
//!
//! `GET /config_dump` shows the agent's whole state as JSON; debugging starts
//! there. `/healthz/ready` answers 200 once the agent serves every local pod,
//! and 503 with the reasons until then. `/metrics` is the Prometheus text,
//! also served on the probe port, which Prometheus can reach.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    capture::{CaptureStatus, CaptureView},
    drain::Drain,
    identity::CertView,
    logging::{self, FilterError},
    metrics::{self, Metrics, Totals},
    proxy::connections::{ConnectionInfo, Connections},
    tunnel::pool::PoolView,
    workload::{LocalNode, Service, Workload, WorkloadTable, policy::PolicyView},
};

/// What the admin endpoint reads from.
pub struct AdminState {
    /// The agent's settings as it started (its command line, defaults filled in).
    pub config: serde_json::Value,
    pub workloads: watch::Receiver<Arc<WorkloadTable>>,
    pub capture: Arc<CaptureStatus>,
    pub connections: Arc<Connections>,
    pub metrics: Arc<Metrics>,
    /// The certificate manager, when the agent runs with a CA.
    pub identities: Option<Arc<dyn IdentityState>>,
    /// The tunnel pool's state, when the agent runs with a CA.
    pub pool: Option<Arc<dyn Fn() -> PoolView + Send + Sync>>,
    /// Whether the agent drains or hands over (then it is not ready).
    pub drain: Arc<Drain>,
}

/// What the admin endpoint shows of the certificate manager.
pub trait IdentityState: Send + Sync {
    fn certs(&self) -> Vec<CertView>;
    fn not_ready(&self) -> Vec<String>;
}

impl<C: crate::identity::Certifier> IdentityState for crate::identity::CertManager<C> {
    fn certs(&self) -> Vec<CertView> {
        self.view()
    }

    fn not_ready(&self) -> Vec<String> {
        crate::identity::CertManager::not_ready(self)
    }
}

impl AdminState {
    /// Every reason the agent is not ready: capture, identities, then a
    /// drain or a handover under way.
    pub fn not_ready(&self) -> Vec<String> {
        let mut reasons = self.not_ready_to_serve();
        reasons.extend(self.drain.not_ready());
        reasons
    }

    /// What keeps the agent from serving every local pod: capture, then
    /// identities (not whether it has started accepting, or drains).
    pub fn not_ready_to_serve(&self) -> Vec<String> {
        let mut reasons = self.capture.not_ready();
        if let Some(identities) = &self.identities {
            reasons.extend(identities.not_ready());
        }
        reasons
    }

    /// The table's policies with the connections each decided.
    fn policies(&self, table: &WorkloadTable) -> Vec<PolicyView> {
        let mut views = table.policy_views();
        for view in &mut views {
            (view.allowed, view.denied) = self.metrics.proxy.policy_decisions(Some(&view.policy));
        }
        views
    }

    fn pool_view(&self) -> Option<PoolView> {
        self.pool.as_ref().map(|view| view())
    }

    fn certs(&self) -> Vec<CertView> {
        self.identities
            .as_ref()
            .map(|identities| identities.certs())
            .unwrap_or_default()
    }
}

/// `/config_dump`: the agent's whole state.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    /// The process that answered: during a handover, two agents share the
    /// admin port, and this says which one this is.
    #[serde(default)]
    pub pid: u32,
    /// The agent's settings as it started (its command line, defaults filled in).
    pub config: serde_json::Value,
    pub node: LocalNode,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub capture: CaptureView,
    pub connections: Vec<ConnectionInfo>,
    pub totals: Totals,
    /// Without a CA the agent has no identities and carries plaintext only.
    pub mtls: bool,
    pub certificates: Vec<CertView>,
    /// Every authorization policy, what it selects here and has decided.
    pub policies: Vec<PolicyView>,
    /// What the namespaces' policy annotations got wrong.
    #[serde(default)]
    pub policy_problems: Vec<String>,
    /// `None` without a CA.
    pub pool: Option<PoolView>,
    pub ready: bool,
    pub not_ready_reasons: Vec<String>,
}

/// Serves the full admin API on `listener` (bind it to localhost) until
/// `stop` resolves (a successor took the port over).
pub async fn serve_admin(
    listener: TcpListener,
    state: Arc<AdminState>,
    stop: impl Future<Output = ()>,
) {
    serve(listener, state, route_admin, stop).await
}

/// The readiness page, on the admin address and on the probe port.
pub const READY_PATH: &str = "/healthz/ready";

/// `GET` shows the log filter, `POST ?level=` replaces it.
pub const LOGGING_PATH: &str = "/logging";

/// Serves only `/healthz/ready` (the kubelet's probe) and `/metrics`
/// (Prometheus): the probe port listens on every address. Until `stop`
/// resolves, as [`serve_admin`].
pub async fn serve_probe(
    listener: TcpListener,
    state: Arc<AdminState>,
    stop: impl Future<Output = ()>,
) {
    let route = |state: &AdminState, req: &Request<hyper::body::Incoming>| match req.uri().path() {
        READY_PATH => ready(state),
        "/metrics" => metrics_text(state),
        _ => text(
            StatusCode::NOT_FOUND,
            "only /healthz/ready and /metrics are served here\n".into(),
        ),
    };
    serve(listener, state, route, stop).await
}

fn metrics_text(state: &AdminState) -> Response<Full<Bytes>> {
    response(
        StatusCode::OK,
        metrics::CONTENT_TYPE,
        state.metrics.render().into_bytes(),
    )
}

async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    route: fn(&AdminState, &Request<hyper::body::Incoming>) -> Response<Full<Bytes>>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = route(&state, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = conn.await {
                tracing::debug!(%error, "admin connection failed");
            }
        });
    }
}

/// `GET /logging` shows the filter; `POST /logging?level=<filter>` replaces it
/// (EnvFilter syntax, e.g. `info,ferry_agent::tunnel=debug`).
fn logging<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    let Some(current) = logging::current_filter() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", FilterError::NoLogger),
        );
    };
    if req.method() == Method::GET {
        return text(StatusCode::OK, format!("{current}\n"));
    }
    let level = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("level="))
        .map(percent_decode);
    let Some(level) = level.filter(|l| !l.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "say which filter: POST /logging?level=info,ferry_agent=debug\n".into(),
        );
    };
    match logging::set_filter(&level) {
        Ok(()) => text(StatusCode::OK, format!("log filter is now {level}\n")),
        Err(error) => {
            let status = match error {
                FilterError::NoLogger => StatusCode::SERVICE_UNAVAILABLE,
                FilterError::Invalid { .. } | FilterError::FieldFilter { .. } => {
                    StatusCode::BAD_REQUEST
                }
                FilterError::Reload(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            text(status, format!("{error}\n"))
        }
    }
}

/// `%XX` escapes, as a client puts `,` `=` `:` into a query. Read as bytes:
/// a query may hold UTF-8, and a `%` before a multi-byte character is no escape.
pub fn percent_decode(s: &str) -> String {
    fn hex(digit: u8) -> Option<u8> {
        char::from(digit)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(high), Some(low)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(high << 4 | low);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A page of the agent's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Ready,
    ConfigDump,
    Workloads,
    Connections,
    Certs,
    Pool,
    Policies,
    Metrics,
}

impl Page {
    /// Every page, in the order the 404 lists them.
    pub const ALL: [Page; 8] = [
        Page::ConfigDump,
        Page::Workloads,
        Page::Connections,
        Page::Certs,
        Page::Pool,
        Page::Policies,
        Page::Metrics,
        Page::Ready,
    ];

    /// The path a `GET` of this page names.
    pub fn path(self) -> &'static str {
        match self {
            Page::Ready => READY_PATH,
            Page::ConfigDump => "/config_dump",
            Page::Workloads => "/workloads",
            Page::Connections => "/connections",
            Page::Certs => "/certs",
            Page::Pool => "/pool",
            Page::Policies => "/policies",
            Page::Metrics => "/metrics",
        }
    }
}

/// Where the admin endpoint sends a request: to a page of the agent's
/// state, or to an answer made from the request alone (the log filter, a
/// refusal).
#[derive(Debug)]
pub enum Route {
    Page(Page),
    Answer(Response<Full<Bytes>>),
}

/// The admin endpoint's routing: by method, path and query only, so any
/// request (whatever its body) can be routed, and tested, without the
/// agent's state.
pub fn route<B>(req: &Request<B>) -> Route {
    let path = req.uri().path();
    if path == LOGGING_PATH && (req.method() == Method::POST || req.method() == Method::GET) {
        return Route::Answer(logging(req));
    }
    if req.method() != Method::GET {
        return Route::Answer(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported\n".into(),
        ));
    }
    match Page::ALL.into_iter().find(|page| page.path() == path) {
        Some(page) => Route::Page(page),
        None => {
            let pages: Vec<&str> = Page::ALL.iter().map(|page| page.path()).collect();
            Route::Answer(text(
                StatusCode::NOT_FOUND,
                format!(
                    "no such page {path}; try {}, {LOGGING_PATH}\n",
                    pages.join(", ")
                ),
            ))
        }
    }
}

fn route_admin(state: &AdminState, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match route(req) {
        Route::Answer(response) => response,
        Route::Page(page) => state.page(page),
    }
}

impl AdminState {
    fn page(&self, page: Page) -> Response<Full<Bytes>> {
        match page {
            Page::Ready => ready(self),
            Page::ConfigDump => {
                let table = self.workloads.borrow().clone();
                let reasons = self.not_ready();
                json(&ConfigDump {
                    pid: std::process::id(),
                    config: self.config.clone(),
                    node: table.node.clone(),
                    workloads: table.workloads.iter().map(|w| w.as_ref().clone()).collect(),
                    services: table.services.iter().map(|s| s.as_ref().clone()).collect(),
                    capture: self.capture.view(),
                    connections: self.connections.live(),
                    totals: self.metrics.totals(),
                    mtls: self.identities.is_some(),
                    certificates: self.certs(),
                    policies: self.policies(&table),
                    policy_problems: table.policy_problems.clone(),
                    pool: self.pool_view(),
                    ready: reasons.is_empty(),
                    not_ready_reasons: reasons,
                })
            }
            Page::Workloads => {
                let table = self.workloads.borrow().clone();
                json(
                    &table
                        .workloads
                        .iter()
                        .map(AsRef::as_ref)
                        .collect::<Vec<&Workload>>(),
                )
            }
            Page::Connections => json(&self.connections.live()),
            Page::Certs => json(&self.certs()),
            Page::Pool => json(&self.pool_view()),
            Page::Policies => {
                let table = self.workloads.borrow().clone();
                json(&self.policies(&table))
            }
            Page::Metrics => metrics_text(self),
        }
    }
}

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    let reasons = state.not_ready();
    if reasons.is_empty() {
        text(StatusCode::OK, "ready\n".into())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n- {}\n", reasons.join("\n- ")),
        )
    }
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => response(StatusCode::OK, "application/json", body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot serialise: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.into_bytes())
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// An admin address off the node's loopback.
#[derive(Debug, thiserror::Error)]
#[error("admin address {0} is not a loopback address; the admin API listens on localhost only")]
pub struct NotLoopback(pub SocketAddr);

/// The admin address must be a loopback address: the admin API shows the
/// node's workloads and connections and must not be reachable off the node.
pub fn check_admin_addr(addr: SocketAddr) -> Result<SocketAddr, NotLoopback> {
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(NotLoopback(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_of(method: Method, uri: &str) -> Route {
        route(&Request::builder().method(method).uri(uri).body(()).unwrap())
    }

    fn status_of(route: Route) -> StatusCode {
        match route {
            Route::Answer(response) => response.status(),
            Route::Page(page) => panic!("{page:?} is not an answer"),
        }
    }

    #[test]
    fn routes_by_method_and_path_alone() {
        for page in Page::ALL {
            assert!(
                matches!(route_of(Method::GET, page.path()), Route::Page(p) if p == page),
                "{page:?}"
            );
        }
        assert!(matches!(
            route_of(Method::GET, "/config_dump?x=1"),
            Route::Page(Page::ConfigDump)
        ));
        assert!(matches!(
            route_of(Method::GET, READY_PATH),
            Route::Page(Page::Ready)
        ));
        assert_eq!(
            status_of(route_of(Method::POST, "/workloads")),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            status_of(route_of(Method::GET, "/nope")),
            StatusCode::NOT_FOUND
        );
        // No logger is installed in unit tests.
        assert_eq!(
            status_of(route_of(Method::POST, "/logging?level=debug")),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn percent_decodes_a_query_value_of_any_bytes() {
        assert_eq!(
            percent_decode("info%2Cferry_agent%3Ddebug"),
            "info,ferry_agent=debug"
        );
        assert_eq!(percent_decode("a%1b%5b2J%0a"), "a\u{1b}[2J\n");
        // Not escapes: kept as they are, never a panic on a multi-byte character.
        assert_eq!(percent_decode("%aé%é%"), "%aé%é%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
