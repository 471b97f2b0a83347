//! The agent's proxies. Today: the outbound listener, which receives the
//! connections the capture programs redirected and relays them.

pub mod connections;
pub mod outbound;
pub mod relay;
pub mod route;
