//! Ferry's node agent: captures the meshed pods of its node with eBPF and
//! carries their connections over mutual TLS.
//!
//! The modules are layered; each uses only the ones listed before it
//! (`tests/layering.rs` checks this on every test run):
//!
//! | layer | modules | what they are |
//! | --- | --- | --- |
//! | base | [`backoff`], [`logging`] | pure helpers and the log set-up |
//! | lifecycle | [`drain`], [`handover`] | the agent's way out: draining, and handing the node's sockets to a successor |
//! | facts | [`workload`] | what the cluster runs: the workload table and its sources |
//! | kernel | [`capture`] | the eBPF programs on this node's meshed pods |
//! | identity | [`identity`] | keys, certificates and the TLS configs built from them |
//! | wire | [`tunnel`] | the mTLS HTTP/2 tunnel between agents: client, server, pool |
//! | data path | [`proxy`] | outbound and inbound, on a shared relay and connection tracking |
//! | threads | [`shard`] | the data plane's threads |
//! | observation | [`metrics`], [`admin`], [`inspect`] | the registry, the admin endpoint, `inspect` |
//! | entry | [`cli`], [`app`] | the command line, and the agent put together |
//! | tests | [`properties`] | property tests of the pure cores (test builds only) |

pub mod backoff;
pub mod logging;

pub mod drain;
pub mod handover;

pub mod workload;

pub mod capture;

pub mod identity;

pub mod tunnel;

pub mod proxy;

pub mod shard;

pub mod metrics;

pub mod admin;

pub mod inspect;

pub mod cli;

pub mod app;

#[cfg(test)]
mod properties;

pub use app::run;
