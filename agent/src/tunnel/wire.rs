//! The tunnel's HTTP/2 conventions, shared by both ends: flow-control
//! windows and frame size, how a `CONNECT` is asked for, and how a refusal
//! carries its reason.

use std::{net::SocketAddr, time::Duration};

use http::{HeaderValue, Method, Request, Response, StatusCode};

/// HTTP/2 windows: large enough that one stream can fill a fast link.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// DATA frames of up to 64 KiB: a bulk stream moves in few frames.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Streams one peer connection may have open at once (the server's limit).
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Streams a client may have reset and not yet forgotten.
pub const MAX_CONCURRENT_RESET_STREAMS: usize = 1024;
/// How long a peer may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The refusal's reason travels in a header so the client's agent can log it.
pub const REASON_HEADER: &str = "ferry-reason";

/// The request for one application connection to `target` (a pod address).
pub fn connect_request(target: SocketAddr) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .expect("a CONNECT to an address is a valid request")
}

/// The answer to a `CONNECT` that will not be served, with its reason.
pub fn refusal(status: StatusCode, reason: &str) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(reason) {
        response.headers_mut().insert(REASON_HEADER, value);
    }
    response
}

/// The reason a refusal carries; empty if it carries none.
pub fn refusal_reason<T>(response: &Response<T>) -> String {
    response
        .headers()
        .get(REASON_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}
