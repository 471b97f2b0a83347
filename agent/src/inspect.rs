//! `ferry-agent inspect`: the admin endpoint as an operator reads it, in
//! aligned tables. It asks the agent over plain HTTP/1.1 (the admin endpoint
//! listens on the node's loopback), so it runs on the node, or in the
//! agent's pod with `kubectl exec`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::ValueEnum;
use serde_json::Value;

use crate::cli::DEFAULT_ADMIN_ADDR;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// The agent's admin address.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Print what the agent answered (JSON, or the metrics text) instead of a table.
    #[arg(long)]
    pub raw: bool,
    /// What to show.
    pub view: View,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum View {
    /// Every pod the agent knows, from its workload source.
    Workloads,
    /// The certificate of each identity on this node.
    Certs,
    /// The connections the agent carries now.
    Connections,
    /// The pooled tunnel connections to other agents.
    Pool,
    /// A summary of `/config_dump`: node, readiness, capture, totals.
    Config,
    /// Every series of `/metrics`.
    Metrics,
}

impl View {
    fn path(self) -> &'static str {
        match self {
            View::Workloads => "/workloads",
            View::Certs => "/certs",
            View::Connections => "/connections",
            View::Pool => "/pool",
            View::Config => "/config_dump",
            View::Metrics => "/metrics",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("nothing listens on {addr}: is ferry-agent running on this node?")]
    NotRunning { addr: SocketAddr },
    #[error("cannot {what} {addr}: {source}")]
    Io {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{method} {path} on {addr}: {status} {body}")]
    Status {
        method: String,
        path: String,
        addr: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("the agent's answer to {path} is not what inspect expects: {error}")]
    Answer { path: String, error: String },
}

/// Fetches the view from the agent and prints it.
pub fn run(args: &InspectArgs) -> Result<(), InspectError> {
    let path = args.view.path();
    let (status, body) = request(args.admin_addr, "GET", path)?;
    if status != 200 {
        return Err(InspectError::Status {
            method: "GET".to_owned(),
            path: path.to_owned(),
            addr: args.admin_addr,
            status,
            body: body.trim().to_owned(),
        });
    }
    if args.raw {
        print!("{body}");
        return Ok(());
    }
    let answer = |error: String| InspectError::Answer {
        path: path.to_owned(),
        error,
    };
    let text = if args.view == View::Metrics {
        metrics_table(&parse_metrics(&body).map_err(answer)?)
    } else {
        let value: Value = serde_json::from_str(&body).map_err(|e| answer(e.to_string()))?;
        let now = unix_now();
        match args.view {
            View::Workloads => workloads_table(&value),
            View::Certs => certs_table(&value, now),
            View::Connections => connections_table(&value, now),
            View::Pool => pool_table(&value),
            View::Config => config_summary(&value),
            View::Metrics => unreachable!("handled above"),
        }
        .map_err(answer)?
    };
    print!("{text}");
    Ok(())
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
        error,
    })
}

/// Splits a whole HTTP/1.1 response into status code and (de-chunked) body.
fn parse_response(response: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(format!("no end of headers in {text:?}"));
    };
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
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
fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body
            .split_once("\r\n")
            .ok_or("chunked body: no chunk size line")?;
        let size_text = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunked body: bad chunk size {size_line:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or("chunked body: chunk shorter than its size")?;
        out.push_str(chunk);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
}

/// Columns padded to their widest cell, two spaces apart; the last column
/// is not padded, so long identities and errors do not push lines wider.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn list<'a>(value: &'a Value, what: &str) -> Result<&'a Vec<Value>, String> {
    value
        .as_array()
        .ok_or_else(|| format!("{what} is not a list: {value}"))
}

/// The strings of a JSON list (none if it is not one).
fn strings(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.as_str().map(str::to_owned))
        .collect()
}

/// A string field, or `-` when absent or null.
fn text(value: &Value, key: &str) -> String {
    match &value[key] {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

pub fn workloads_table(workloads: &Value) -> Result<String, String> {
    let mut rows = Vec::new();
    for pod in list(workloads, "/workloads")? {
        let ips = strings(&pod["ips"]);
        let mode = match (pod["meshed"].as_bool(), pod["strict"].as_bool()) {
            (Some(true), Some(true)) => "strict",
            (Some(true), _) => "permissive",
            _ => "unmeshed",
        };
        rows.push(vec![
            format!("{}/{}", text(pod, "namespace"), text(pod, "name")),
            text(pod, "node"),
            text(pod, "serviceAccount"),
            mode.to_owned(),
            ips.join(","),
        ]);
    }
    Ok(table(
        &["POD", "NODE", "SERVICE-ACCOUNT", "MESH", "IPS"],
        &rows,
    ))
}

pub fn certs_table(certs: &Value, now_unix: u64) -> Result<String, String> {
    let certs = list(certs, "/certs")?;
    if certs.is_empty() {
        return Ok(
            "no identities: no meshed pod on this node, or the agent runs without a CA\n"
                .to_owned(),
        );
    }
    let mut rows = Vec::new();
    let mut errors = String::new();
    for cert in certs {
        let not_after = cert["notAfterUnix"].as_u64();
        rows.push(vec![
            text(cert, "identity"),
            text(cert, "serial"),
            not_after.map_or("-".to_owned(), utc),
            not_after.map_or("no certificate".to_owned(), |at| {
                if at > now_unix {
                    duration(at - now_unix)
                } else {
                    format!("EXPIRED {} ago", duration(now_unix - at))
                }
            }),
            cert["nextAttemptInSecs"]
                .as_u64()
                .map_or("-".to_owned(), duration),
            cert["consecutiveFailures"]
                .as_u64()
                .unwrap_or(0)
                .to_string(),
        ]);
        if let Some(error) = cert["lastError"].as_str() {
            errors.push_str(&format!("{}: {error}\n", text(cert, "identity")));
        }
    }
    let mut out = table(
        &[
            "IDENTITY",
            "SERIAL",
            "NOT-AFTER",
            "EXPIRES-IN",
            "NEXT-ATTEMPT",
            "FAILURES",
        ],
        &rows,
    );
    if !errors.is_empty() {
        out.push_str("\nlast errors:\n");
        out.push_str(&errors);
    }
    Ok(out)
}

pub fn connections_table(connections: &Value, now_unix: u64) -> Result<String, String> {
    let connections = list(connections, "/connections")?;
    if connections.is_empty() {
        return Ok("no live connections\n".to_owned());
    }
    let mut rows = Vec::new();
    for c in connections {
        let route = text(c, "route");
        // The identity at the other end of the tunnel, as this agent knows it.
        let peer = if route == "inboundTunnel" {
            text(c, "sourceIdentity")
        } else {
            text(c, "destinationIdentity")
        };
        let age = c["openedAtUnixMs"].as_u64().map_or("-".to_owned(), |ms| {
            duration(now_unix.saturating_sub(ms / 1000))
        });
        rows.push(vec![
            text(c, "sourcePod"),
            text(c, "source"),
            text(c, "originalDst"),
            text(c, "destinationPod"),
            route,
            peer,
            bytes(c["bytesSent"].as_u64().unwrap_or(0)),
            bytes(c["bytesReceived"].as_u64().unwrap_or(0)),
            age,
        ]);
    }
    Ok(table(
        &[
            "SOURCE-POD",
            "SOURCE",
            "ORIGINAL-DST",
            "DESTINATION-POD",
            "ROUTE",
            "PEER-IDENTITY",
            "SENT",
            "RECEIVED",
            "AGE",
        ],
        &rows,
    ))
}

pub fn pool_table(pool: &Value) -> Result<String, String> {
    if pool.is_null() {
        return Ok(
            "no tunnel pool: the agent runs without a CA (plaintext passthrough only)\n".to_owned(),
        );
    }
    let mut rows = Vec::new();
    for key in list(&pool["keys"], "/pool keys")? {
        let connections = key["connections"].as_array().map_or(&[][..], Vec::as_slice);
        let streams: u64 = connections
            .iter()
            .filter_map(|c| c["streams"].as_u64())
            .sum();
        let state = if key["dialing"].as_bool() == Some(true) {
            "dialing".to_owned()
        } else if let Some(retry) = key["retryInMs"].as_u64() {
            format!("backing off {}", duration(retry.div_ceil(1000)))
        } else {
            "ok".to_owned()
        };
        rows.push(vec![
            text(key, "source"),
            text(key, "destination"),
            text(key, "address"),
            connections.len().to_string(),
            streams.to_string(),
            state,
            key["lastError"].as_str().unwrap_or("").to_owned(),
        ]);
    }
    let mut out = table(
        &[
            "SOURCE",
            "DESTINATION",
            "ADDRESS",
            "CONNECTIONS",
            "STREAMS",
            "STATE",
            "LAST-ERROR",
        ],
        &rows,
    );
    out.push_str(&format!("\ntotals: {}\n", counters(&pool["totals"])));
    Ok(out)
}

/// `name=value` for each number of a JSON object, in its order.
fn counters(object: &Value) -> String {
    object
        .as_object()
        .map(|fields| {
            fields
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

pub fn config_summary(dump: &Value) -> Result<String, String> {
    if !dump.is_object() {
        return Err(format!("/config_dump is not an object: {dump}"));
    }
    let node = &dump["node"];
    let addresses = strings(&node["addresses"]);
    let workloads = dump["workloads"].as_array().map_or(0, Vec::len);
    let local = dump["workloads"].as_array().map_or(0, |all| {
        all.iter()
            .filter(|w| w["node"] == node["name"] && w["meshed"] == true)
            .count()
    });
    let capture = &dump["capture"];
    let attached = capture["attached"].as_array().map_or(0, Vec::len);
    let capture_failures = strings(&capture["failures"]);
    let ready = dump["ready"].as_bool() == Some(true);
    let mut rows = vec![
        vec!["node".to_owned(), text(node, "name")],
        vec!["addresses".to_owned(), addresses.join(", ")],
        vec![
            "ready".to_owned(),
            if ready { "yes" } else { "NO" }.to_owned(),
        ],
        vec![
            "mtls".to_owned(),
            if dump["mtls"].as_bool() == Some(true) {
                "yes".to_owned()
            } else {
                "no (no CA: plaintext passthrough only)".to_owned()
            },
        ],
        vec![
            "workloads".to_owned(),
            format!("{workloads} known, {local} meshed on this node"),
        ],
        vec![
            "capture".to_owned(),
            format!(
                "{attached} pods attached, {} failing, pins in {}",
                capture_failures.len(),
                text(capture, "pinDir")
            ),
        ],
        vec![
            "certificates".to_owned(),
            dump["certificates"]
                .as_array()
                .map_or(0, Vec::len)
                .to_string(),
        ],
        vec![
            "connections".to_owned(),
            format!(
                "{} live",
                dump["connections"].as_array().map_or(0, Vec::len)
            ),
        ],
        vec!["totals".to_owned(), counters(&dump["totals"])],
    ];
    for reason in dump["notReadyReasons"].as_array().into_iter().flatten() {
        rows.push(vec![
            "not ready".to_owned(),
            reason.as_str().unwrap_or_default().to_owned(),
        ]);
    }
    for failure in capture_failures {
        rows.push(vec!["capture failure".to_owned(), failure]);
    }
    // A two-column key/value listing: no header line.
    let listing = table(&["", ""], &rows);
    Ok(listing.lines().skip(1).map(|l| format!("{l}\n")).collect())
}

/// One series of the metrics text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses Prometheus / OpenMetrics text exposition, refusing anything that
/// is not a comment (`# HELP`, `# TYPE`, `# UNIT`, `# EOF`) or a sample
/// `name{label="value",…} number`.
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    let mut ended = false;
    for (number, line) in text.lines().enumerate() {
        let at = |error: String| format!("line {}: {error}: {line:?}", number + 1);
        if ended {
            return Err(at("text after # EOF".to_owned()));
        }
        if line == "# EOF" {
            ended = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            if !matches!(kind, "HELP" | "TYPE" | "UNIT") || !is_metric_name(name) {
                return Err(at("not a HELP, TYPE or UNIT line".to_owned()));
            }
            if kind == "TYPE"
                && !matches!(
                    words.next().unwrap_or(""),
                    "counter"
                        | "gauge"
                        | "histogram"
                        | "gaugehistogram"
                        | "summary"
                        | "info"
                        | "stateset"
                        | "unknown"
                        | "untyped"
                )
            {
                return Err(at("unknown metric type".to_owned()));
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        samples.push(parse_sample(line).map_err(at)?);
    }
    Ok(samples)
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or_else(|| "no value".to_owned())?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = inner
                .split_once("=\"")
                .ok_or_else(|| "bad label".to_owned())?;
            if !is_metric_name(label) || label.contains(':') {
                return Err(format!("bad label name {label:?}"));
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        _ => return Err("bad escape in a label value".to_owned()),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".to_owned()),
                }
            };
            labels.push((label.to_owned(), value));
            inner = &after[end + 1..];
            inner = inner.strip_prefix(',').unwrap_or(inner);
        }
    }
    let mut fields = rest
        .strip_prefix(' ')
        .ok_or_else(|| "no space before the value".to_owned())?
        .split(' ');
    let value = fields.next().unwrap_or("");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => value.parse().map_err(|_| format!("bad value {value:?}"))?,
    };
    // An optional timestamp may follow.
    if let Some(timestamp) = fields.next()
        && timestamp.parse::<f64>().is_err()
    {
        return Err(format!("bad timestamp {timestamp:?}"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

pub fn metrics_table(samples: &[Sample]) -> String {
    let rows: Vec<Vec<String>> = samples
        .iter()
        .map(|s| {
            let labels: Vec<String> = s
                .labels
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            let labels = if labels.is_empty() {
                "-".to_owned()
            } else {
                labels.join(",")
            };
            vec![s.name.clone(), labels, s.value.to_string()]
        })
        .collect();
    table(&["METRIC", "LABELS", "VALUE"], &rows)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2d3h`, `23h59m`, `4m5s`, `7s`: the two largest units.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// Bytes in binary units with one decimal: `512B`, `1.5KiB`, `64.0MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// RFC 3339 in UTC, to the second: `2025-03-01T12:00:00Z`.
pub fn utc(unix: u64) -> String {
    let days = unix / 86400;
    let secs = unix % 86400;
    // Civil from days (Howard Hinnant's algorithm), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_command_line_names_a_view_and_defaults_to_the_admin_address() {
        use clap::Parser as _;

        use crate::cli::{Cli, Command};
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["ferry-agent", "inspect"].iter().chain(args))
                .map(|cli| cli.command)
        };
        let Ok(Command::Inspect(args)) = parse(&["certs"]) else {
            panic!("inspect certs does not parse");
        };
        assert_eq!(
            (args.admin_addr, args.view, args.raw),
            ("127.0.0.1:15000".parse().unwrap(), View::Certs, false)
        );
        let Ok(Command::Inspect(args)) =
            parse(&["--admin-addr", "127.0.0.1:16000", "--raw", "pool"])
        else {
            panic!("inspect with flags does not parse");
        };
        assert_eq!(
            (args.admin_addr.port(), args.view, args.raw),
            (16000, View::Pool, true)
        );
        let error = parse(&["everything"]).unwrap_err().to_string();
        assert!(
            error.contains("possible values: workloads, certs, connections, pool, config, metrics"),
            "{error}"
        );
    }

    #[test]
    fn tables_align_every_column_but_the_last() {
        let out = table(
            &["A", "LONGER", "LAST"],
            &[
                vec!["wide cell".into(), "x".into(), "free".into()],
                vec!["y".into(), "".into(), "".into()],
            ],
        );
        assert_eq!(out, "A          LONGER  LAST\nwide cell  x       free\ny\n");
    }

    #[test]
    fn certs_show_identity_serial_and_time_left() {
        let certs = json!([
            {"identity": "spiffe://cluster.local/ns/shop/sa/web", "ready": true,
             "serial": "0a1b", "notAfterUnix": 1_700_086_400u64, "nextAttemptInSecs": 43200,
             "issued": 1, "consecutiveFailures": 0},
            {"identity": "spiffe://cluster.local/ns/shop/sa/db", "ready": false,
             "issued": 0, "consecutiveFailures": 3, "lastError": "connection refused"}
        ]);
        let out = certs_table(&certs, 1_700_000_000).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("IDENTITY  "), "{out}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "spiffe://cluster.local/ns/shop/sa/web",
                "0a1b",
                "2023-11-15T22:13:20Z",
                "1d0h",
                "12h0m",
                "0"
            ],
            "{out}"
        );
        assert!(lines[2].contains("no certificate"), "{out}");
        assert!(
            out.contains("spiffe://cluster.local/ns/shop/sa/db: connection refused"),
            "{out}"
        );
        // Columns line up: every header starts where its cells start.
        let col = lines[0].find("SERIAL").unwrap();
        assert_eq!(&lines[1][col..col + 4], "0a1b");
    }

    #[test]
    fn connections_name_the_peer_identity_of_either_direction() {
        let connections = json!([
            {"id": 1, "sourcePod": "shop/web-0", "source": "198.18.1.2:40000",
             "originalDst": "198.18.2.2:8080", "destinationPod": "shop/db-0",
             "sourceIdentity": "spiffe://cluster.local/ns/shop/sa/web",
             "destinationIdentity": "spiffe://cluster.local/ns/shop/sa/db",
             "route": "tunnel", "openedAtUnixMs": 1_699_999_990_000u64,
             "bytesSent": 100, "bytesReceived": 3_145_728},
            {"id": 2, "sourcePod": null, "source": "198.19.0.1:51000",
             "originalDst": "198.18.1.2:80", "destinationPod": "shop/web-0",
             "sourceIdentity": "spiffe://cluster.local/ns/shop/sa/db",
             "destinationIdentity": "spiffe://cluster.local/ns/shop/sa/web",
             "route": "inboundTunnel", "openedAtUnixMs": 1_700_000_000_000u64,
             "bytesSent": 0, "bytesReceived": 0}
        ]);
        let out = connections_table(&connections, 1_700_000_000).unwrap();
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0].len(), 9, "{out}");
        assert_eq!(
            rows[1],
            [
                "shop/web-0",
                "198.18.1.2:40000",
                "198.18.2.2:8080",
                "shop/db-0",
                "tunnel",
                "spiffe://cluster.local/ns/shop/sa/db",
                "100B",
                "3.0MiB",
                "10s"
            ],
            "{out}"
        );
        assert_eq!(
            rows[2],
            [
                "-",
                "198.19.0.1:51000",
                "198.18.1.2:80",
                "shop/web-0",
                "inboundTunnel",
                "spiffe://cluster.local/ns/shop/sa/db",
                "0B",
                "0B",
                "0s"
            ],
            "{out}"
        );
        // Columns line up: each header starts where its cells start.
        let lines: Vec<&str> = out.lines().collect();
        let at = lines[0].find("PEER-IDENTITY").unwrap();
        assert!(
            lines[1][at..].starts_with("spiffe://cluster.local/ns/shop/sa/db"),
            "{out}"
        );
        assert!(
            lines[2][at..].starts_with("spiffe://cluster.local/ns/shop/sa/db"),
            "{out}"
        );
        assert_eq!(
            connections_table(&json!([]), 0).unwrap(),
            "no live connections\n"
        );
    }

    #[test]
    fn pool_shows_keys_state_and_totals() {
        let pool = json!({
            "keys": [{"source": "spiffe://td/ns/a/sa/x", "destination": "spiffe://td/ns/b/sa/y",
                      "address": "198.19.0.2:15008", "connections": [{"id": 1, "streams": 2, "ageMs": 5}],
                      "dialing": false, "failures": 1, "lastError": "refused", "retryInMs": 1500}],
            "totals": {"handshakes": 1, "dialFailures": 1}
        });
        let out = pool_table(&pool).unwrap();
        assert!(
            out.contains("198.19.0.2:15008  1            2        backing off 2s  refused"),
            "{out}"
        );
        assert!(
            out.ends_with("totals: dialFailures=1 handshakes=1\n"),
            "{out}"
        );
        assert!(pool_table(&Value::Null).unwrap().contains("without a CA"));
    }

    #[test]
    fn workloads_show_mesh_mode() {
        let workloads = json!([
            {"name": "web-0", "namespace": "shop", "serviceAccount": "web", "node": "n1",
             "ips": ["198.18.1.2", "2001:2::2"], "meshed": true, "strict": true},
            {"name": "legacy", "namespace": "old", "serviceAccount": "default", "node": "n2",
             "ips": [], "meshed": false, "strict": false}
        ]);
        let out = workloads_table(&workloads).unwrap();
        assert!(
            out.contains("shop/web-0  n1    web              strict    198.18.1.2,2001:2::2"),
            "{out}"
        );
        assert!(
            out.contains("old/legacy  n2    default          unmeshed"),
            "{out}"
        );
    }

    #[test]
    fn config_summary_says_why_not_ready() {
        let dump = json!({
            "node": {"name": "n1", "addresses": ["198.19.0.1"]},
            "workloads": [{"node": "n1", "meshed": true}, {"node": "n2", "meshed": true}],
            "capture": {"pinDir": "/sys/fs/bpf/ferry/n1", "attached": [{}], "failures": []},
            "connections": [], "totals": {"captured": 3}, "mtls": true, "certificates": [],
            "pool": null, "ready": false, "notReadyReasons": ["no certificate yet for x"]
        });
        let out = config_summary(&dump).unwrap();
        assert!(out.starts_with("node          n1\n"), "{out}");
        assert!(out.contains("\nready         NO\n"), "{out}");
        assert!(out.contains("2 known, 1 meshed on this node"), "{out}");
        assert!(out.contains("\ntotals        captured=3\n"), "{out}");
        assert!(
            out.contains("\nnot ready     no certificate yet for x\n"),
            "{out}"
        );
    }

    #[test]
    fn parses_metrics_text_and_refuses_what_is_not() {
        let text = "# HELP ferry_x Things.\n# TYPE ferry_x counter\n\
                    ferry_x_total{direction=\"out\",why=\"a \\\"b\\\"\"} 3\n\
                    ferry_up 1 1700000000\n# EOF\n";
        let samples = parse_metrics(text).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].name, "ferry_x_total");
        assert_eq!(
            samples[0].labels,
            vec![
                ("direction".to_owned(), "out".to_owned()),
                ("why".to_owned(), "a \"b\"".to_owned())
            ]
        );
        assert_eq!(samples[0].value, 3.0);
        for bad in [
            "ferry x 1\n",
            "ferry_x{a=\"1} 2\n",
            "ferry_x three\n",
            "# TYPE ferry_x thing\n",
            "# EOF\nferry_x 1\n",
            "just words\n",
        ] {
            assert!(parse_metrics(bad).is_err(), "{bad:?} parsed");
        }
        let out = metrics_table(&samples);
        assert!(out.contains("ferry_up       -"), "{out}");
    }

    #[test]
    fn units_read_like_a_person_wrote_them() {
        assert_eq!(duration(7), "7s");
        assert_eq!(duration(245), "4m5s");
        assert_eq!(duration(86_399), "23h59m");
        assert_eq!(duration(183_600), "2d3h");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(64 << 20), "64.0MiB");
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_709_294_399), "2024-03-01T11:59:59Z");
    }

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
