//! Why the proxy does not carry a connection, in either direction. Each
//! error knows its metric's reason (and, for a tunnel `CONNECT`, the HTTP
//! status it is answered with), so call sites do not translate.

use std::{io, net::IpAddr, net::SocketAddr};

use ferry_proto::{SpiffeId, SpiffeIdError};
use http::{Method, StatusCode};

use super::metrics::{Failure, InboundRefusal};
use crate::{tunnel::client::OpenError, workload::policy::PolicyDenied};

/// A connection this agent will not carry: what it asked for is not allowed
/// or names nothing the agent can serve. Outbound these come from the route
/// decision; inbound from the admission of a `CONNECT`. Policy and identity
/// refusals mean the same thing on both sides.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Policy(#[from] PolicyDenied),
    #[error(transparent)]
    Identity(#[from] SpiffeIdError),
    #[error("Service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
    #[error("Service {0} has no endpoints")]
    NoEndpoints(String),
    #[error("source {0} is not a known pod")]
    UnknownSource(IpAddr),
    #[error("pod {pod} runs on node {node}, whose address is unknown")]
    UnknownNode { pod: String, node: String },
    #[error("only CONNECT is served here, not {0}")]
    Method(Method),
    #[error("CONNECT without host:port")]
    NoAuthority,
    #[error("{0} is not an IP address and port")]
    BadAuthority(String),
    #[error("no pod has address {0}")]
    NoPod(IpAddr),
    #[error("pod {pod} runs on node {node}, not on {local}")]
    NotLocal {
        pod: String,
        node: String,
        local: String,
    },
    #[error("pod {0} is not meshed")]
    NotMeshed(String),
    #[error("pod {pod} runs as {runs_as}, but the tunnel was opened to {local}")]
    WrongIdentity {
        pod: String,
        runs_as: Box<SpiffeId>,
        local: Box<SpiffeId>,
    },
}

impl Refused {
    /// The reason a refused `CONNECT` is counted under.
    pub fn inbound_reason(&self) -> InboundRefusal {
        match self {
            Self::Method(_) => InboundRefusal::Method,
            Self::NoAuthority | Self::BadAuthority(_) => InboundRefusal::BadRequest,
            Self::NoPod(_) | Self::NotLocal { .. } => InboundRefusal::NotLocal,
            Self::NotMeshed(_) => InboundRefusal::NotMeshed,
            Self::WrongIdentity { .. } => InboundRefusal::WrongIdentity,
            Self::Policy(_) => InboundRefusal::Policy,
            Self::Identity(_)
            | Self::NoServicePort { .. }
            | Self::NoEndpoints(_)
            | Self::UnknownSource(_)
            | Self::UnknownNode { .. } => InboundRefusal::Internal,
        }
    }

    /// The status a refused `CONNECT` is answered with.
    pub fn status(&self) -> StatusCode {
        match self.inbound_reason() {
            InboundRefusal::Method => StatusCode::METHOD_NOT_ALLOWED,
            InboundRefusal::BadRequest => StatusCode::BAD_REQUEST,
            InboundRefusal::NotLocal => StatusCode::NOT_FOUND,
            InboundRefusal::NotMeshed | InboundRefusal::Policy => StatusCode::FORBIDDEN,
            InboundRefusal::WrongIdentity => StatusCode::MISDIRECTED_REQUEST,
            InboundRefusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Why a connection the agent was given was not carried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the connection was not redirected by Ferry's capture")]
    Uncaptured,
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: SocketAddr,
        source: io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error(transparent)]
    Tunnel(#[from] OpenError),
}

impl Error {
    /// The reason it is counted under in `ferry_connection_failures_total`.
    pub fn reason(&self) -> Failure {
        match self {
            Self::Uncaptured => Failure::Uncaptured,
            Self::Refused(_) => Failure::Denied,
            Self::Connect { .. } | Self::ConnectTimeout(_) => Failure::Connect,
            Self::Tunnel(OpenError::Refused { status, .. }) if status.is_server_error() => {
                Failure::PeerConnect
            }
            Self::Tunnel(OpenError::Refused { .. }) => Failure::PeerRefused,
            Self::Tunnel(OpenError::Pool(_) | OpenError::Stream { .. }) => Failure::Tunnel,
        }
    }

    /// The status a `CONNECT` that failed this way is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Refused(refused) => refused.status(),
            Self::Connect { .. } => StatusCode::BAD_GATEWAY,
            Self::ConnectTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Uncaptured | Self::Tunnel(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}
