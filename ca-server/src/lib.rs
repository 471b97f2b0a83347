//! The Ferry CA: signs 24-hour workload certificates for node agents, after
//! checking who the agent is (its ServiceAccount token), that the identity
//! it asks for has a pod on its node, and that its CSR is what it should be.

pub mod bootstrap;
pub mod cli;
pub mod csr;
pub mod issuer;
pub mod jwks;
pub mod jwt;
pub mod kubernetes;
mod metrics;
mod metrics_http;
pub mod nodes;
pub mod serve;
pub mod service;
