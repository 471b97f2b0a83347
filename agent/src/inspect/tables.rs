//! The admin endpoint's views as aligned tables: pure functions of the typed
//! views the agent serves, so they are tested without an agent.

use std::collections::BTreeMap;

use serde::Serialize;

use super::metrics_text::Sample;
use crate::{
    admin::ConfigDump, identity::CertView, proxy::connections::ConnectionInfo,
    proxy::connections::Route, tunnel::pool::PoolView, workload::Workload,
    workload::policy::PolicyView,
};

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

/// An optional cell, `-` when absent.
fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

pub fn workloads_table(workloads: &[Workload]) -> String {
    let rows: Vec<Vec<String>> = workloads
        .iter()
        .map(|pod| {
            let mode = match (pod.meshed, pod.strict) {
                (true, true) => "strict",
                (true, false) => "permissive",
                (false, _) => "unmeshed",
            };
            let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
            vec![
                pod.key(),
                pod.node.clone(),
                pod.service_account.clone(),
                mode.to_owned(),
                ips.join(","),
            ]
        })
        .collect();
    table(&["POD", "NODE", "SERVICE-ACCOUNT", "MESH", "IPS"], &rows)
}

pub fn certs_table(certs: &[CertView], now_unix: u64) -> String {
    if certs.is_empty() {
        return "no identities: no meshed pod on this node, or the agent runs without a CA\n"
            .to_owned();
    }
    let mut rows = Vec::new();
    let mut errors = String::new();
    for cert in certs {
        let not_after = cert.not_after_unix;
        rows.push(vec![
            cert.identity.clone(),
            or_dash(cert.serial.as_deref()),
            not_after.map_or("-".to_owned(), utc),
            not_after.map_or("no certificate".to_owned(), |at| {
                if at > now_unix {
                    duration(at - now_unix)
                } else {
                    format!("EXPIRED {} ago", duration(now_unix - at))
                }
            }),
            cert.next_attempt_in_secs.map_or("-".to_owned(), duration),
            cert.consecutive_failures.to_string(),
        ]);
        if let Some(error) = &cert.last_error {
            errors.push_str(&format!("{}: {error}\n", cert.identity));
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
    out
}

pub fn connections_table(connections: &[ConnectionInfo], now_unix: u64) -> String {
    if connections.is_empty() {
        return "no live connections\n".to_owned();
    }
    let rows: Vec<Vec<String>> = connections
        .iter()
        .map(|connection| {
            let c = &connection.meta;
            // The identity at the other end of the tunnel, as this agent knows it.
            let peer = if c.route == Route::InboundTunnel {
                &c.source_identity
            } else {
                &c.destination_identity
            };
            vec![
                or_dash(c.source_pod.as_deref()),
                c.source.to_string(),
                c.original_dst.to_string(),
                or_dash(c.destination_pod.as_deref()),
                route_name(c.route),
                or_dash(peer.as_deref()),
                bytes(connection.bytes_sent),
                bytes(connection.bytes_received),
                duration(now_unix.saturating_sub(connection.opened_at_unix_ms / 1000)),
            ]
        })
        .collect();
    table(
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
    )
}

/// A route as `/connections` names it.
fn route_name(route: Route) -> String {
    match serde_json::to_value(route) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{route:?}"),
    }
}

/// `None`: the agent runs without a CA.
pub fn pool_table(pool: Option<&PoolView>) -> String {
    let Some(pool) = pool else {
        return "no tunnel pool: the agent runs without a CA (plaintext passthrough only)\n"
            .to_owned();
    };
    let rows: Vec<Vec<String>> = pool
        .keys
        .iter()
        .map(|key| {
            let streams: usize = key.connections.iter().map(|c| c.streams).sum();
            let state = if key.dialing {
                "dialing".to_owned()
            } else if let Some(retry) = key.retry_in_ms {
                format!("backing off {}", duration(retry.div_ceil(1000)))
            } else {
                "ok".to_owned()
            };
            vec![
                key.source.clone(),
                key.destination.clone(),
                key.address.to_string(),
                key.connections.len().to_string(),
                streams.to_string(),
                state,
                key.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
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
    out.push_str(&format!("\ntotals: {}\n", counters(&pool.totals)));
    out
}

pub fn policies_table(policies: &[PolicyView]) -> String {
    if policies.is_empty() {
        return "no authorization policies: every destination gets its namespace's default\n"
            .to_owned();
    }
    let mut problems = String::new();
    let rows: Vec<Vec<String>> = policies
        .iter()
        .map(|policy| {
            for problem in &policy.problems {
                problems.push_str(&format!("{}: {problem}\n", policy.policy));
            }
            let pods = if policy.local_pods.is_empty() {
                "-".to_owned()
            } else {
                policy.local_pods.join(",")
            };
            vec![
                policy.policy.clone(),
                format!("{:?}", policy.action),
                policy.allowed.to_string(),
                policy.denied.to_string(),
                policy.problems.len().to_string(),
                pods,
            ]
        })
        .collect();
    let mut out = table(
        &[
            "POLICY",
            "ACTION",
            "ALLOWED",
            "DENIED",
            "PROBLEMS",
            "LOCAL-PODS",
        ],
        &rows,
    );
    if !problems.is_empty() {
        out.push_str("\nignored:\n");
        out.push_str(&problems);
    }
    out
}

/// `name=value` for each counter of `totals`, by name, as the JSON names them.
fn counters(totals: &impl Serialize) -> String {
    let fields: BTreeMap<String, serde_json::Value> = serde_json::to_value(totals)
        .ok()
        .and_then(|value| serde_json::from_value(value).ok())
        .unwrap_or_default();
    fields
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn config_summary(dump: &ConfigDump) -> String {
    let node = &dump.node;
    let addresses: Vec<String> = node.addresses.iter().map(ToString::to_string).collect();
    let local = dump
        .workloads
        .iter()
        .filter(|w| w.node == node.name && w.meshed)
        .count();
    let capture = &dump.capture;
    let mut rows = vec![
        vec!["node".to_owned(), node.name.clone()],
        vec!["agent pid".to_owned(), dump.pid.to_string()],
        vec!["addresses".to_owned(), addresses.join(", ")],
        vec![
            "ready".to_owned(),
            if dump.ready { "yes" } else { "NO" }.to_owned(),
        ],
        vec![
            "mtls".to_owned(),
            if dump.mtls {
                "yes".to_owned()
            } else {
                "no (no CA: plaintext passthrough only)".to_owned()
            },
        ],
        vec![
            "workloads".to_owned(),
            format!(
                "{} known, {local} meshed on this node",
                dump.workloads.len()
            ),
        ],
        vec![
            "capture".to_owned(),
            format!(
                "{} pods attached, {} failing, pins in {}",
                capture.attached.len(),
                capture.failures.len(),
                capture.pin_dir
            ),
        ],
        vec![
            "certificates".to_owned(),
            dump.certificates.len().to_string(),
        ],
        vec![
            "connections".to_owned(),
            format!("{} live", dump.connections.len()),
        ],
        vec!["totals".to_owned(), counters(&dump.totals)],
    ];
    for reason in &dump.not_ready_reasons {
        rows.push(vec!["not ready".to_owned(), reason.clone()]);
    }
    for failure in &capture.failures {
        rows.push(vec!["capture failure".to_owned(), failure.clone()]);
    }
    // A two-column key/value listing: no header line.
    let listing = table(&["", ""], &rows);
    listing.lines().skip(1).map(|l| format!("{l}\n")).collect()
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
    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    use super::*;
    use crate::inspect::parse_metrics;

    /// A view as the agent would have served it.
    fn typed<T: DeserializeOwned>(json: Value) -> T {
        serde_json::from_value(json).expect("the fixture is a valid view")
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
        let out = certs_table(&typed::<Vec<_>>(certs), 1_700_000_000);
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
        let out = connections_table(&typed::<Vec<_>>(connections), 1_700_000_000);
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
        assert_eq!(connections_table(&[], 0), "no live connections\n");
    }

    #[test]
    fn pool_shows_keys_state_and_totals() {
        let pool = json!({
            "keys": [{"source": "spiffe://td/ns/a/sa/x", "destination": "spiffe://td/ns/b/sa/y",
                      "address": "198.19.0.2:15008", "connections": [{"id": 1, "streams": 2, "ageMs": 5}],
                      "dialing": false, "failures": 1, "lastError": "refused", "retryInMs": 1500}],
            "totals": {"handshakes": 1, "dialFailures": 1, "streams": 0, "closedIdle": 0,
                       "closedKeepalive": 0, "closedBroken": 0}
        });
        let out = pool_table(Some(&typed(pool)));
        assert!(
            out.contains("198.19.0.2:15008  1            2        backing off 2s  refused"),
            "{out}"
        );
        assert!(
            out.ends_with(
                "totals: closedBroken=0 closedGoaway=0 closedIdle=0 closedKeepalive=0 dialFailures=1 handshakes=1 streams=0\n"
            ),
            "{out}"
        );
        assert!(pool_table(None).contains("without a CA"));
    }

    #[test]
    fn policies_show_what_they_select_decide_and_ignore() {
        let policies = json!([
            {"policy": "shop/db-from-web", "action": "Allow", "localPods": ["shop/db-0", "shop/db-1"],
             "problems": [], "allowed": 12, "denied": 3},
            {"policy": "shop/bad", "action": "Deny", "localPods": [],
             "problems": ["from[0]: unauthenticated: false names nobody; ignored"], "allowed": 0, "denied": 0}
        ]);
        let out = policies_table(&typed::<Vec<_>>(policies));
        assert!(
            out.contains(
                "shop/db-from-web  Allow   12       3       0         shop/db-0,shop/db-1"
            ),
            "{out}"
        );
        assert!(
            out.contains("shop/bad          Deny    0        0       1         -"),
            "{out}"
        );
        assert!(
            out.ends_with(
                "ignored:\nshop/bad: from[0]: unauthenticated: false names nobody; ignored\n"
            ),
            "{out}"
        );
        assert!(policies_table(&[]).starts_with("no authorization policies"));
    }

    #[test]
    fn workloads_show_mesh_mode() {
        let workloads = json!([
            {"name": "web-0", "namespace": "shop", "serviceAccount": "web", "node": "n1",
             "ips": ["198.18.1.2", "2001:2::2"], "meshed": true, "strict": true},
            {"name": "legacy", "namespace": "old", "serviceAccount": "default", "node": "n2",
             "ips": [], "meshed": false, "strict": false}
        ]);
        let out = workloads_table(&typed::<Vec<_>>(workloads));
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
            "workloads": [
                {"name": "a", "namespace": "shop", "serviceAccount": "a", "node": "n1",
                 "ips": ["198.18.1.2"], "meshed": true, "strict": false},
                {"name": "b", "namespace": "shop", "serviceAccount": "b", "node": "n2",
                 "ips": ["198.18.2.2"], "meshed": true, "strict": false}
            ],
            "services": [],
            "capture": {"pinDir": "/sys/fs/bpf/ferry/n1", "failures": [],
                        "attached": [{"pod": "shop/a", "cgroup": "/x/a", "cgroupId": 7,
                                      "excludedPorts": [], "strict": false}]},
            "connections": [], "mtls": true, "certificates": [], "policies": [],
            "totals": {"captured": 3, "uncaptured": 0, "upstreamFailures": 0,
                       "inboundHandshakes": 0, "inboundRefused": 0, "inboundDenied": 0,
                       "outboundDenied": 0},
            "config": {},
            "pool": null, "ready": false, "notReadyReasons": ["no certificate yet for x"]
        });
        let out = config_summary(&typed(dump));
        assert!(out.starts_with("node          n1\n"), "{out}");
        assert!(out.contains("\nready         NO\n"), "{out}");
        assert!(out.contains("2 known, 1 meshed on this node"), "{out}");
        assert!(
            out.contains(
                "\ntotals        captured=3 inboundDenied=0 inboundHandshakes=0 inboundRefused=0 \
                 outboundDenied=0 uncaptured=0 upstreamFailures=0\n"
            ),
            "{out}"
        );
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
}
