//! The proxy's metrics: connections captured, opened, active, their bytes,
//! the ones it could not carry, and the `CONNECT`s it refused.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::connections::Route;
use crate::workload::policy::PolicyDenied;

type Count = Counter<u64, AtomicU64>;
type Level = Gauge<i64, AtomicI64>;

/// Which way a connection goes through this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Dialled by a pod on this node.
    Outbound,
    /// Arrived over a tunnel from another agent, for a pod on this node.
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl Route {
    /// The `direction` and `route` labels of a connection carried this way.
    pub fn labels(self) -> (Direction, &'static str) {
        match self {
            Route::Passthrough => (Direction::Outbound, "passthrough"),
            Route::Tunnel => (Direction::Outbound, "tunnel"),
            Route::Direct => (Direction::Outbound, "direct"),
            Route::InboundTunnel => (Direction::Inbound, "tunnel"),
        }
    }
}

/// Why a connection the agent was given did not get carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// On the outbound port without a capture record (not sent by Ferry's programs).
    Uncaptured,
    /// Refused by this agent's route decision (policy, unknown source).
    Denied,
    /// The destination (a pod, or anything outside the mesh) did not accept.
    Connect,
    /// No tunnel stream to the destination's agent (dial, backoff, broken connection).
    Tunnel,
    /// The destination's agent refused the `CONNECT` (not local, not meshed, policy…).
    PeerRefused,
    /// The destination's agent could not reach the pod.
    PeerConnect,
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::Uncaptured => "uncaptured",
            Failure::Denied => "denied",
            Failure::Connect => "connect",
            Failure::Tunnel => "tunnel",
            Failure::PeerRefused => "peer_refused",
            Failure::PeerConnect => "peer_connect",
        }
    }
}

/// Why this agent refused a tunnel `CONNECT` from another agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundRefusal {
    /// 405: not a `CONNECT`.
    Method,
    /// 400: no `ip:port` authority.
    BadRequest,
    /// 404: no pod with that address on this node.
    NotLocal,
    /// 403: the pod is not meshed.
    NotMeshed,
    /// 421: the pod runs as another identity than the one the tunnel was opened to.
    WrongIdentity,
    /// 403: the destination's policy does not allow the client's identity.
    Policy,
    /// 500: the agent could not judge the request.
    Internal,
}

impl InboundRefusal {
    pub const ALL: [InboundRefusal; 7] = [
        InboundRefusal::Method,
        InboundRefusal::BadRequest,
        InboundRefusal::NotLocal,
        InboundRefusal::NotMeshed,
        InboundRefusal::WrongIdentity,
        InboundRefusal::Policy,
        InboundRefusal::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InboundRefusal::Method => "method",
            InboundRefusal::BadRequest => "bad_request",
            InboundRefusal::NotLocal => "not_local",
            InboundRefusal::NotMeshed => "not_meshed",
            InboundRefusal::WrongIdentity => "wrong_identity",
            InboundRefusal::Policy => "policy",
            InboundRefusal::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    direction: &'static str,
    route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByteLabels {
    direction: &'static str,
    route: &'static str,
    /// `sent` by the client (the application that dialled), or `received` by it.
    flow: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    direction: &'static str,
    reason: &'static str,
}

impl FailureLabels {
    fn new(direction: Direction, failure: Failure) -> Self {
        Self {
            direction: direction.as_str(),
            reason: failure.as_str(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    /// `namespace/name`, or `default` for a namespace's default.
    policy: String,
    result: &'static str,
}

impl PolicyLabels {
    /// The label of a decision by `policy` (`None`: the default).
    fn new(policy: Option<&str>, allowed: bool) -> Self {
        Self {
            policy: policy.unwrap_or(DEFAULT_POLICY_LABEL).to_owned(),
            result: if allowed { "allow" } else { "deny" },
        }
    }
}

/// The `policy` label of decisions a namespace's default made.
pub const DEFAULT_POLICY_LABEL: &str = "default";

/// The counters one live connection updates, looked up once when it opens.
#[derive(Debug, Clone)]
pub struct ConnectionCounters {
    pub active: Level,
    /// Bytes the client sent (towards the server).
    pub sent: Count,
    /// Bytes the client received (from the server).
    pub received: Count,
}

#[derive(Debug, Default)]
pub struct ProxyMetrics {
    captured: Count,
    opened: Family<ConnectionLabels, Count>,
    active: Family<ConnectionLabels, Level>,
    bytes: Family<ByteLabels, Count>,
    failures: Family<FailureLabels, Count>,
    inbound_refused: Family<ReasonLabels, Count>,
    policy_decisions: Family<PolicyLabels, Count>,
    authorization_denials: Family<FailureLabels, Count>,
    revoked: Family<DirectionLabels, Count>,
    policies: Family<StateLabels, Level>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

impl ProxyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "connections_captured",
            "Connections the capture programs redirected and the agent accepted",
            self.captured.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections the agent started carrying, by direction and route",
            self.opened.clone(),
        );
        registry.register(
            "connections_active",
            "Connections the agent carries now, by direction and route",
            self.active.clone(),
        );
        registry.register(
            "connection_bytes",
            "Bytes relayed, counted per chunk as they move; flow=sent is what the dialling application sent, received what it got back",
            self.bytes.clone(),
        );
        registry.register(
            "connection_failures",
            "Connections the agent was given but could not carry, by direction and reason",
            self.failures.clone(),
        );
        registry.register(
            "inbound_refused",
            "Tunnel CONNECT requests from other agents refused, by reason",
            self.inbound_refused.clone(),
        );
        registry.register(
            "policy_decisions",
            "Connections authorized, by the policy that decided (namespace/name, or default) and result (allow, deny)",
            self.policy_decisions.clone(),
        );
        registry.register(
            "policies",
            "Authorization policies the agent holds, by state: applied as written, or partly_ignored (what it could not use is in /policies)",
            self.policies.clone(),
        );
        registry.register(
            "connections_revoked",
            "Live connections closed because the policies changed and no longer admit them, by direction",
            self.revoked.clone(),
        );
        registry.register(
            "authorization_denials",
            "Connections the destination's policies refused, by direction and reason (deny_policy, not_allowed, default)",
            self.authorization_denials.clone(),
        );
    }

    /// The policies in force: `applied` as written, `partly_ignored`.
    pub fn policies_in_force(&self, applied: usize, partly_ignored: usize) {
        for (state, count) in [("applied", applied), ("partly_ignored", partly_ignored)] {
            self.policies
                .get_or_create(&StateLabels { state })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Counts a live connection the policies no longer admit, closed.
    pub fn connection_revoked(&self, direction: Direction) {
        self.revoked
            .get_or_create(&DirectionLabels {
                direction: direction.as_str(),
            })
            .inc();
    }

    /// Counts a connection `policy` (`None`: the default) admitted.
    pub fn policy_allowed(&self, policy: Option<&str>) {
        self.policy_decisions
            .get_or_create(&PolicyLabels::new(policy, true))
            .inc();
    }

    /// Counts a connection the policies refused, against each policy that
    /// decided (or the default).
    pub fn policy_denied(&self, direction: Direction, denied: &PolicyDenied) {
        let policies = denied.reason.policies();
        if policies.is_empty() {
            self.policy_decisions
                .get_or_create(&PolicyLabels::new(None, false))
                .inc();
        }
        for policy in policies {
            self.policy_decisions
                .get_or_create(&PolicyLabels::new(Some(policy), false))
                .inc();
        }
        self.authorization_denials
            .get_or_create(&FailureLabels {
                direction: direction.as_str(),
                reason: denied.reason.label(),
            })
            .inc();
    }

    /// How many connections `policy` (`None`: the default) allowed and denied.
    pub fn policy_decisions(&self, policy: Option<&str>) -> (u64, u64) {
        let count = |allowed| {
            self.policy_decisions
                .get(&PolicyLabels::new(policy, allowed))
                .map_or(0, |c| c.get())
        };
        (count(true), count(false))
    }

    pub fn connection_captured(&self) {
        self.captured.inc();
    }

    /// Counts a connection opened on `route` and returns the counters it
    /// updates while it lives (the active gauge is already raised).
    pub fn connection_opened(&self, route: Route) -> ConnectionCounters {
        let (direction, route) = route.labels();
        let direction = direction.as_str();
        let labels = ConnectionLabels { direction, route };
        self.opened.get_or_create(&labels).inc();
        let active = self.active.get_or_create_owned(&labels);
        active.inc();
        let bytes = |flow| {
            self.bytes.get_or_create_owned(&ByteLabels {
                direction,
                route,
                flow,
            })
        };
        ConnectionCounters {
            active,
            sent: bytes("sent"),
            received: bytes("received"),
        }
    }

    pub fn connection_failed(&self, direction: Direction, failure: Failure) {
        self.failures
            .get_or_create(&FailureLabels::new(direction, failure))
            .inc();
    }

    pub fn inbound_refused(&self, refusal: InboundRefusal) {
        self.inbound_refused
            .get_or_create(&ReasonLabels {
                reason: refusal.as_str(),
            })
            .inc();
    }

    /// Connections the capture programs redirected and the agent accepted.
    pub fn captured(&self) -> u64 {
        self.captured.get()
    }

    /// Connections that failed in `direction` for `failure`.
    pub fn failures(&self, direction: Direction, failure: Failure) -> u64 {
        self.failures
            .get(&FailureLabels::new(direction, failure))
            .map_or(0, |c| c.get())
    }

    /// Tunnel `CONNECT`s refused, all reasons.
    pub fn inbound_refusals(&self) -> u64 {
        InboundRefusal::ALL
            .iter()
            .map(|r| {
                self.inbound_refused
                    .get(&ReasonLabels { reason: r.as_str() })
                    .map_or(0, |c| c.get())
            })
            .sum()
    }
}
