//! A small blocking HTTP/1.1 client for the admin endpoint (the tests use it too).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use super::{BadAnswer, InspectError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer that is not a well-formed HTTP/1.1 response.
#[derive(Debug, thiserror::Error)]
pub enum BadResponse {
    #[error("no end of headers in {0:?}")]
    NoHeaderEnd(String),
    #[error("bad status line {0:?}")]
    StatusLine(String),
    #[error("chunked body: {0}")]
    Chunked(String),
}

/// Sends `method path` (no body, `Connection: close`) and returns the status
/// code and the body.
pub fn request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), InspectError> {
    let io = |what| move |source| InspectError::Io { what, addr, source };
    let mut stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(stream) => stream,
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(InspectError::NotRunning { addr });
        }
        Err(error) => return Err(io("connect to")(error)),
    };
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(io("set a timeout on"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(io("set a timeout on"))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(io("send a request to"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(io("read the answer from"))?;
    parse_response(&response).map_err(|error| InspectError::Answer {
        path: path.to_owned(),
        error: BadAnswer::Http(error),
    })
}

/// Splits a whole HTTP/1.1 response into status code and (de-chunked) body.
pub fn parse_response(response: &[u8]) -> Result<(u16, String), BadResponse> {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(BadResponse::NoHeaderEnd(text.into_owned()));
    };
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| BadResponse::StatusLine(status_line.to_owned()))?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// Decodes a `Transfer-Encoding: chunked` body.
pub fn dechunk(mut body: &str) -> Result<String, BadResponse> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| BadResponse::Chunked("no chunk size line".to_owned()))?;
        let size_text = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| BadResponse::Chunked(format!("bad chunk size {size_line:?}")))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| BadResponse::Chunked("chunk shorter than its size".to_owned()))?;
        out.push_str(chunk);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_means_the_agent_is_not_running() {
        // Bind then drop: nothing listens on that port afterwards.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let error = request(addr, "GET", "/certs").unwrap_err().to_string();
        assert_eq!(
            error,
            format!("nothing listens on {addr}: is ferry-agent running on this node?")
        );
    }

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nwait\n";
        assert_eq!(parse_response(plain).unwrap(), (503, "wait\n".to_owned()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "abcde".to_owned()));
    }
}
