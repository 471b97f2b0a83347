//! The smallest HTTP/1.1 client that reads the agent's admin endpoint: the
//! one `ferry-agent inspect` uses (one request per connection, `Connection:
//! close`, the body read to EOF), so the tests read the agent the way an
//! operator does.

use std::net::SocketAddr;

/// GETs `path` from `addr`; returns the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    request(addr, "GET", path)
}

/// Sends `method path` (no body) to `addr`; returns the status code and the body.
pub fn request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(ferry_agent::inspect::request(addr, method, path)?)
}
