//! Property tests for the agent's pure cores, where a fuzzer is the wrong
//! tool. Each property says what holds for every input its generator
//! makes; proptest shrinks a failure to a small input.
//!
//! - route: `decide` agrees with the table: meshed routes go to the meshed
//!   pod that owns the target, local ones after its policies, remote ones
//!   through its node's agent, a Service only to its own endpoints.
//! - policy: the evaluator is the three rules read literally, a matching
//!   deny always wins, the order of the policies does not matter, and the
//!   plaintext rule agrees with the evaluator on every port.
//! - renewal: a certificate renews 40–50 % into its lifetime, never after
//!   it expires, sooner as the clock runs and as the sample grows.
//! - backoff: delays stay in the upper half of a ceiling that doubles from
//!   the base to the cap, never fall as failures mount, and start over at
//!   the base.
//! - balancer: it picks one of the candidates, never one busier than all
//!   the others, and spreads over candidates whose connections closed.
//! - pool: a checkout takes the first connection with room and dials only
//!   when every connection is full.
//! - relay: `relay_tunnel` over in-memory pipes carries both directions
//!   byte for byte whichever side half-closes first, passes a reset on as a
//!   reset, never as a clean end, stops as `Stop` says, and asks for the
//!   pod's ACK after a large read only. (`relay`, the
//!   splice path, needs real sockets and is not covered here.)

use std::{
    collections::BTreeMap,
    future::{Future, poll_fn},
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use ferry_proto::{
    SpiffeId, TUNNEL_PORT,
    policy::{
        Action, AuthorizationPolicySpec, DefaultPolicy, LabelExpression, LabelOperator,
        LabelSelector, PolicySource,
    },
    workload_file::{PolicySpec, ServicePort},
};
use proptest::{bool::weighted, collection::vec, prelude::*, sample::subsequence};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

use crate::{
    backoff::Backoff,
    identity::renewal::{RENEW_AT, RENEW_JITTER, renew_in},
    proxy::{
        Balancer, Refused,
        connections::Stop,
        relay::{ACK_NOW_READ, AckNow, CloseWrite, Reset, relay_tunnel},
        route::{Decision, decide},
    },
    tunnel::{
        pool::{Dial, DialError, Pool, PoolConfig, PoolKey},
        stream::TunnelStream,
    },
    workload::{
        LocalNode, PolicyFacts, PolicySettings, Service, Workload, WorkloadTable,
        policy::{Caller, CompiledPolicy, DenyReason, PodPolicies, PolicyDenied, Verdict},
    },
};

const TD: &str = "cluster.local";

/// `cases` cases, and no regression files written into the source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP address")
}

fn allowed(verdict: &Verdict) -> bool {
    matches!(verdict, Verdict::Allowed { .. })
}
/// Runs `future` on a runtime of its own (a proptest case is a plain test).
fn run<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(future)
}

mod choice;
mod policy;
mod relay;
mod route;
mod timing;
