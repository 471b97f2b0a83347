//! Ferry's node agent.
pub mod workload;
