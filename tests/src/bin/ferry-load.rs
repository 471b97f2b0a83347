//! `ferry-load`: the load generator `cargo xtask bench` runs in simulated
//! pods, the same program for every setup it compares (no mesh, Ferry,
//! stunnel). Plain blocking sockets, one thread per connection on the
//! server, so what it measures is the path between the pods, not itself.
//!
//! The first byte a client sends picks what the server does with the
//! connection: `B` read to EOF, then answer the byte count (bulk); `R` echo
//! fixed-size messages (request/response, and idle connections, which make
//! one round trip so they are known to reach the server, then wait).
//! Each client prints one JSON line with what it measured. Its command
//! line and those lines are defined in `ferry_tests::load`, which drives it.

use std::{
    io::{self, BufRead as _, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser as _;
use ferry_tests::{
    load::{Cli, Command, Exchange, Latencies, Open, Throughput},
    testapp::events::{self, Listening},
};
use serde::Serialize;

const BULK: u8 = b'B';
const ECHO: u8 = b'R';
const BULK_CHUNK: usize = 256 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { listen } => serve(listen),
        Command::Bulk(run) => bulk(run.to, run.duration()),
        Command::Rr(exchange) => exchanges(&exchange, false),
        Command::Crr(exchange) => exchanges(&exchange, true),
        Command::Idle { to, count } => idle(to, count),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-load: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    println!("{}", events::line(&Listening { addr: listen }));
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        thread::spawn(move || {
            let _ = serve_one(stream);
        });
    }
    Ok(())
}

fn serve_one(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut mode = [0u8];
    stream.read_exact(&mut mode)?;
    match mode[0] {
        BULK => {
            let mut buf = vec![0u8; BULK_CHUNK];
            let mut total: u64 = 0;
            loop {
                match stream.read(&mut buf)? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            stream.write_all(&total.to_be_bytes())
        }
        ECHO => {
            let mut size = [0u8; 4];
            stream.read_exact(&mut size)?;
            let mut buf = vec![0u8; u32::from_be_bytes(size) as usize];
            loop {
                match stream.read_exact(&mut buf) {
                    Ok(()) => stream.write_all(&buf)?,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown mode byte {other:#x}"),
        )),
    }
}

fn connect(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)
        .with_context(|| format!("cannot connect to {to}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn bulk(to: SocketAddr, duration: Duration) -> anyhow::Result<()> {
    let mut stream = connect(to)?;
    let started = Instant::now();
    stream.write_all(&[BULK])?;
    let chunk = vec![0x5au8; BULK_CHUNK];
    let mut sent: u64 = 0;
    while started.elapsed() < duration {
        stream.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .context("the server did not answer the byte count")?;
    let elapsed = started.elapsed().as_secs_f64();
    let received = u64::from_be_bytes(count);
    if received != sent {
        bail!("sent {sent} bytes, the server counted {received}");
    }
    report(&Throughput {
        bytes: sent,
        seconds: elapsed,
        bytes_per_second: sent as f64 / elapsed,
    })
}

/// Starts an echo conversation of `size`-byte messages on `stream`.
fn start_echo(stream: &mut TcpStream, size: usize) -> anyhow::Result<()> {
    let mut hello = vec![ECHO];
    hello.extend_from_slice(&u32::try_from(size)?.to_be_bytes());
    stream.write_all(&hello)?;
    Ok(())
}

fn round_trip(stream: &mut TcpStream, request: &[u8], response: &mut [u8]) -> anyhow::Result<()> {
    stream.write_all(request)?;
    stream
        .read_exact(response)
        .context("the echo did not come back")?;
    if response != request {
        bail!("the echo differs from the request");
    }
    Ok(())
}

/// Request/response exchanges back to back for the run's duration, on one
/// connection or (`connection_each`) on a new connection each, timed from
/// the start of each (its connect, if it makes one) to its answer.
fn exchanges(exchange: &Exchange, connection_each: bool) -> anyhow::Result<()> {
    let Exchange { run, size } = exchange;
    let request: Vec<u8> = (0..*size).map(|i| i as u8).collect();
    let mut response = vec![0u8; *size];
    let open = || -> anyhow::Result<TcpStream> {
        let mut stream = connect(run.to)?;
        start_echo(&mut stream, *size)?;
        Ok(stream)
    };
    let mut kept = if connection_each { None } else { Some(open()?) };
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < run.duration() {
        let began = Instant::now();
        let mut fresh = None;
        let stream = match &mut kept {
            Some(stream) => stream,
            None => fresh.insert(open()?),
        };
        round_trip(stream, &request, &mut response)?;
        drop(fresh);
        latencies.push(began.elapsed());
    }
    let elapsed = started.elapsed().as_secs_f64();
    report(&latency_report(latencies, elapsed))
}

fn latency_report(mut latencies: Vec<Duration>, elapsed: f64) -> Latencies {
    latencies.sort();
    let percentile = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len().max(1)) - 1;
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Latencies {
        count: latencies.len(),
        seconds: elapsed,
        per_second: latencies.len() as f64 / elapsed,
        p50_micros: percentile(0.50),
        p99_micros: percentile(0.99),
    }
}

fn idle(to: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut held = Vec::with_capacity(count);
    let mut echo = [0u8];
    for i in 0..count {
        let mut stream = connect(to).with_context(|| format!("connection {i} of {count}"))?;
        start_echo(&mut stream, 1)?;
        round_trip(&mut stream, b".", &mut echo)
            .with_context(|| format!("connection {i} of {count}"))?;
        held.push(stream);
    }
    report(&Open { open: held.len() })?;
    // Hold until the bench closes stdin.
    let mut line = String::new();
    while io::stdin().lock().read_line(&mut line)? > 0 {
        line.clear();
    }
    Ok(())
}

fn report(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    io::stdout().flush()?;
    Ok(())
}
