//! Real applications for the bench's application scenarios, each with the
//! load generator its users run against it, from Debian: `redis-server`
//! measured by `redis-benchmark`, and `nginx` serving static files
//! measured by `wrk` (HTTP/1.1 keep-alive). Their reports are read into
//! [`Latencies`], as `ferry-load rr` prints them; the parsers are pure and
//! tested on what the tools print.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{Cluster, PodId, Proc, load::Latencies};

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
pub const REDIS_BENCHMARK: &str = "/usr/bin/redis-benchmark";
pub const NGINX: &str = "/usr/sbin/nginx";
pub const WRK: &str = "/usr/bin/wrk";

/// The files nginx serves: a small response and a 64 KiB one.
pub const HTTP_FILES: [(&str, usize); 2] = [("small", 128), ("64k", 64 * 1024)];

/// Set (to anything), the load generators' own reports are printed whole,
/// e.g. for wrk's latency distribution beyond the p50 and p99 kept.
pub const RAW_REPORTS: &str = "FERRY_BENCH_RAW";

/// How long a load generator may run past what it was asked for.
const RUN_SLACK: Duration = Duration::from_secs(60);
/// How long a server gets to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Fails, naming the Debian package setup installs, if `binary` is missing.
pub(crate) fn ensure_installed(binary: &str, package: &str) -> anyhow::Result<()> {
    ensure!(
        Path::new(binary).is_file(),
        "{binary} is missing: run `cargo xtask setup` (it installs Debian's {package})"
    );
    Ok(())
}

/// Starts `redis-server` in `pod` on `port` (all addresses, no persistence:
/// a cache, as the bench uses it), once it listens.
pub fn start_redis(cluster: &mut Cluster, pod: PodId, port: u16) -> anyhow::Result<Proc> {
    ensure_installed(REDIS_SERVER, "redis-server")?;
    let dir = cluster.tempdir().join(format!("redis-{}", pod.0));
    fs::create_dir_all(&dir)?;
    let port = port.to_string();
    let dir = dir.to_string_lossy().into_owned();
    let args = [
        "--port",
        &port,
        "--bind",
        "0.0.0.0",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir,
        "--loglevel",
        "warning",
    ];
    let proc = cluster.spawn(pod, Path::new(REDIS_SERVER), &args)?;
    wait_listening(cluster, pod, port.parse()?)
        .with_context(|| format!("{}: {}", proc.label(), proc.stderr_tail()))?;
    Ok(proc)
}

/// Starts nginx in `pod` on `port`, serving [`HTTP_FILES`] (random bytes)
/// with keep-alive connections that last as long as the client wants, once
/// it listens. One worker per core, as nginx is run in production.
pub fn start_nginx(cluster: &mut Cluster, pod: PodId, port: u16) -> anyhow::Result<Proc> {
    ensure_installed(NGINX, "nginx")?;
    let dir = cluster.tempdir().join(format!("nginx-{}", pod.0));
    let root = dir.join("root");
    fs::create_dir_all(&root)?;
    for (name, size) in HTTP_FILES {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + 13) as u8).collect();
        fs::write(root.join(name), bytes)?;
    }
    let d = dir.display();
    let config = format!(
        "daemon off;\nworker_processes auto;\nuser root;\npid {d}/nginx.pid;\n\
         error_log stderr warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 1h;\n  \
         sendfile on;\n  tcp_nodelay on;\n  default_type application/octet-stream;\n  \
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
         scgi_temp_path {d}/scgi;\n  \
         server {{ listen {port}; root {root}; }}\n}}\n",
        root = root.display()
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, config)?;
    let path = path.to_string_lossy().into_owned();
    let prefix = dir.to_string_lossy().into_owned();
    // The configuration is checked first, so a bad one says why.
    let check = Command::new(NGINX)
        .args(["-t", "-q", "-p", &prefix, "-c", &path])
        .output()
        .with_context(|| format!("cannot run {NGINX}"))?;
    ensure!(
        check.status.success(),
        "{NGINX} rejects {path}: {}",
        String::from_utf8_lossy(&check.stderr).trim()
    );
    let proc = cluster.spawn(pod, Path::new(NGINX), &["-p", &prefix, "-c", &path])?;
    wait_listening(cluster, pod, port)
        .with_context(|| format!("{}: {}", proc.label(), proc.stderr_tail()))?;
    Ok(proc)
}

/// `redis-benchmark` from `pod` against `to`: `requests` of `test` (`get`,
/// `set`) over `clients` connections, one request in flight on each.
pub fn redis_benchmark(
    cluster: &mut Cluster,
    pod: PodId,
    to: SocketAddr,
    test: &str,
    clients: usize,
    requests: usize,
) -> anyhow::Result<Latencies> {
    ensure_installed(REDIS_BENCHMARK, "redis-tools")?;
    let args = [
        "-h".to_owned(),
        to.ip().to_string(),
        "-p".to_owned(),
        to.port().to_string(),
        "-t".to_owned(),
        test.to_owned(),
        "-n".to_owned(),
        requests.to_string(),
        "-c".to_owned(),
        clients.to_string(),
        "--csv".to_owned(),
    ];
    let stdout = run_to_end(cluster, pod, REDIS_BENCHMARK, &args, Duration::ZERO)?;
    parse_redis_csv(&stdout, test, requests)
        .with_context(|| format!("redis-benchmark {}: {stdout}", args.join(" ")))
}

/// `wrk` from `pod` fetching `url` over `connections` keep-alive
/// connections (one thread per core) for `seconds`.
pub fn wrk(
    cluster: &mut Cluster,
    pod: PodId,
    url: &str,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<Latencies> {
    ensure_installed(WRK, "wrk")?;
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(connections);
    // wrk's durations are whole seconds, minutes or hours (`300ms` is a
    // usage error), so a `--quick` run takes a second.
    let whole_seconds = (seconds.ceil() as u64).max(1);
    let args = [
        format!("--threads={threads}"),
        format!("--connections={connections}"),
        format!("--duration={whole_seconds}s"),
        "--latency".to_owned(),
        url.to_owned(),
    ];
    let stdout = run_to_end(cluster, pod, WRK, &args, Duration::from_secs(whole_seconds))?;
    parse_wrk(&stdout).with_context(|| format!("wrk {}: {stdout}", args.join(" ")))
}

/// Runs `program` in `pod` to its end (it should take about `expected`)
/// and returns its stdout.
fn run_to_end(
    cluster: &mut Cluster,
    pod: PodId,
    program: &str,
    args: &[String],
    expected: Duration,
) -> anyhow::Result<String> {
    let mut proc = cluster.spawn(pod, Path::new(program), args)?;
    let (status, stdout, stderr) = proc.wait_exit(expected + RUN_SLACK)?;
    if std::env::var_os(RAW_REPORTS).is_some() {
        eprintln!("{program} {}:\n{stdout}", args.join(" "));
    }
    // wrk prints its usage errors on stdout.
    let said = if stderr.trim().is_empty() {
        &stdout
    } else {
        &stderr
    };
    ensure!(
        status.success(),
        "{program} {}: {status}: {}",
        args.join(" "),
        said.trim()
    );
    Ok(stdout)
}

/// The row of `test` in `redis-benchmark --csv`'s output:
/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
/// "p95_latency_ms","p99_latency_ms","max_latency_ms"`.
pub fn parse_redis_csv(text: &str, test: &str, requests: usize) -> anyhow::Result<Latencies> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = split_csv(lines.next().context("no CSV header")?);
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no {name} column in {header:?}"))
    };
    let (rps, p50, p99) = (
        column("rps")?,
        column("p50_latency_ms")?,
        column("p99_latency_ms")?,
    );
    let row = lines
        .map(split_csv)
        .find(|row| row.first().is_some_and(|t| t.eq_ignore_ascii_case(test)))
        .with_context(|| format!("no {test} row"))?;
    let number = |i: usize| -> anyhow::Result<f64> {
        let cell = row.get(i).context("a short row")?;
        cell.parse()
            .with_context(|| format!("{cell:?} is not a number"))
    };
    let per_second = number(rps)?;
    ensure!(per_second > 0.0, "{per_second} requests per second");
    Ok(Latencies {
        count: requests,
        seconds: requests as f64 / per_second,
        per_second,
        p50_micros: number(p50)? * 1000.0,
        p99_micros: number(p99)? * 1000.0,
    })
}

fn split_csv(line: &str) -> Vec<String> {
    line.split(',')
        .map(|cell| cell.trim().trim_matches('"').to_owned())
        .collect()
}

/// wrk's report with `--latency`: the request count and duration
/// (`51353 requests in 2.01s, 18.61MB read`), the rate (`Requests/sec:`)
/// and the latency distribution (`50%  495.00us`, `99%    4.26ms`). Errors
/// (`Non-2xx or 3xx responses`, `Socket errors`) fail the run: a proxy
/// that breaks requests must not look fast.
pub fn parse_wrk(text: &str) -> anyhow::Result<Latencies> {
    for bad in ["Non-2xx or 3xx responses", "Socket errors"] {
        if let Some(line) = text.lines().find(|l| l.trim_start().starts_with(bad)) {
            bail!("wrk saw errors: {}", line.trim());
        }
    }
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("no {prefix:?} line"))
    };
    let summary = text
        .lines()
        .map(str::trim)
        .find(|l| l.contains(" requests in "))
        .context("no \"requests in\" line")?;
    let (count, rest) = summary
        .split_once(" requests in ")
        .context("no request count")?;
    let count: usize = count.trim().parse().context("the request count")?;
    let seconds = duration_micros(rest.split(',').next().context("no duration")?)? / 1e6;
    let per_second: f64 = field("Requests/sec:")?.parse().context("Requests/sec")?;
    Ok(Latencies {
        count,
        seconds,
        per_second,
        p50_micros: duration_micros(field("50%")?)?,
        p99_micros: duration_micros(field("99%")?)?,
    })
}

/// A wrk duration (`495.00us`, `4.26ms`, `2.01s`, `1.00m`) in microseconds.
fn duration_micros(text: &str) -> anyhow::Result<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("{text:?} has no unit"))?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value
        .parse()
        .with_context(|| format!("{text:?} is not a duration"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("{text:?}: unknown unit {unit:?}"),
    };
    Ok(value * scale)
}

/// Waits until something listens on TCP `port` in `pod`'s network
/// namespace.
pub fn wait_listening(cluster: &Cluster, pod: PodId, port: u16) -> anyhow::Result<()> {
    let netns = cluster.pod(pod).netns.clone();
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while Instant::now() < deadline {
        let out = Command::new("ip")
            .args(["netns", "exec", &netns, "ss", "-Htln"])
            .arg(format!("sport = :{port}"))
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listens on port {port} in {netns} after {LISTEN_TIMEOUT:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_benchmark_csv_is_read_by_column_name() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\
                    \"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"SET\",\"38910.51\",\"0.335\",\"0.080\",\"0.311\",\"0.543\",\"0.655\",\"4.071\"\n\
                    \"GET\",\"37950.66\",\"0.334\",\"0.072\",\"0.279\",\"0.519\",\"2.415\",\"4.399\"\n";
        let get = parse_redis_csv(text, "get", 20000).unwrap();
        assert_eq!(get.count, 20000);
        assert_eq!(get.per_second, 37950.66);
        assert!((get.p50_micros - 279.0).abs() < 1e-6);
        assert!((get.p99_micros - 2415.0).abs() < 1e-6);
        assert!((get.seconds - 20000.0 / 37950.66).abs() < 1e-9);
        let error = parse_redis_csv(text, "lpush", 1).unwrap_err();
        assert!(format!("{error:#}").contains("no lpush row"), "{error:#}");
        assert!(parse_redis_csv("", "get", 1).is_err());
    }

    const WRK_REPORT: &str = "Running 2s test @ http://127.0.0.1:18080/small
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   716.03us  736.45us   7.12ms   92.53%
    Req/Sec    25.81k     6.33k   39.74k    70.00%
  Latency Distribution
     50%  495.00us
     75%  772.00us
     90%    1.23ms
     99%    4.26ms
  51353 requests in 2.01s, 18.61MB read
Requests/sec:  25604.41
Transfer/sec:      9.28MB
";

    #[test]
    fn wrk_reports_are_read_with_their_units() {
        let run = parse_wrk(WRK_REPORT).unwrap();
        assert_eq!(run.count, 51353);
        assert!((run.seconds - 2.01).abs() < 1e-9);
        assert_eq!(run.per_second, 25604.41);
        assert!((run.p50_micros - 495.0).abs() < 1e-6);
        assert!((run.p99_micros - 4260.0).abs() < 1e-6);
    }

    #[test]
    fn wrk_errors_fail_the_run() {
        let broken = WRK_REPORT.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 12\nRequests/sec",
        );
        let error = parse_wrk(&broken).unwrap_err();
        assert!(format!("{error}").contains("Non-2xx"), "{error}");
        let reset = WRK_REPORT.replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec",
        );
        assert!(parse_wrk(&reset).is_err());
        assert!(duration_micros("3.5parsecs").is_err());
        assert!(duration_micros("1.5m").unwrap() == 90e6);
    }
}
