//! `ferry-load`: the load generator `cargo xtask bench` runs in simulated
//! pods, the same program for every setup it compares (no mesh, Ferry,
//! stunnel). Plain blocking sockets, one thread per connection on the
//! server, so what it measures is the path between the pods, not itself.
//!
//! The first byte a client sends picks what the server does with the
//! connection: `B` read to EOF, then answer the byte count (bulk); `R` echo
//! fixed-size messages (request/response, churn, and idle connections,
//! which make one round trip so they are known to reach the server, then
//! wait); `S` check and echo the checksummed messages of `streams`.
//! Each client prints one JSON line with what it measured. Its command
//! line and those lines are defined in `ferry_tests::load`, which drives it.

use std::{
    io::{self, BufRead as _, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser as _;
use ferry_tests::{
    load::{
        Churn, ChurnPhase, ChurnSummary, Cli, Command, Exchange, FailureKind, Failures, FirstOk,
        Latencies, Open, STREAM_HEADER, Streams, StreamsPhase, StreamsSummary, Throughput,
    },
    stream::Stream,
    testapp::events::{self, Listening},
};
use serde::Serialize;

const BULK: u8 = b'B';
const ECHO: u8 = b'R';
const STREAMS: u8 = b'S';
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
        Command::Streams(streams) => self::streams(&streams),
        Command::Churn(churn) => self::churn(&churn),
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
        STREAMS => serve_streams(&mut stream),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown mode byte {other:#x}"),
        )),
    }
}

/// The server's side of one `streams` connection: after the mode byte, the
/// message size and the connection's index (u32 each, big-endian), then
/// messages until EOF, each checked (index, next sequence number, checksum)
/// and echoed, with [`DAMAGED`] set in its status byte if it failed the check.
fn serve_streams(stream: &mut TcpStream) -> io::Result<()> {
    let mut hello = [0u8; 8];
    stream.read_exact(&mut hello)?;
    let size = u32::from_be_bytes(hello[..4].try_into().expect("4 bytes")) as usize;
    let index = u32::from_be_bytes(hello[4..].try_into().expect("4 bytes"));
    if size < STREAM_HEADER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("messages of {size} bytes have no room for the header"),
        ));
    }
    let mut buf = vec![0u8; size];
    let mut seq = 0u64;
    loop {
        match stream.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if !message_is(&buf, index, seq) {
            buf[STATUS] = DAMAGED;
        }
        stream.write_all(&buf)?;
        seq += 1;
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
/// the start of each (its connect, if it makes one) to its answer. With
/// `connections` above 1, that many threads do so at once (their kept
/// connections opened first), and the report covers them all.
fn exchanges(exchange: &Exchange, connection_each: bool) -> anyhow::Result<()> {
    let Exchange {
        run,
        size,
        connections,
    } = exchange;
    let open = || -> anyhow::Result<TcpStream> {
        let mut stream = connect(run.to)?;
        start_echo(&mut stream, *size)?;
        Ok(stream)
    };
    let mut kept = (0..(*connections).max(1))
        .map(|i| {
            let stream = if connection_each { None } else { Some(open()?) };
            anyhow::Ok(stream).with_context(|| format!("connection {i} of {connections}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let duration = run.duration();
    let started = Instant::now();
    let latencies = if kept.len() == 1 {
        exchange_loop(kept.pop().flatten(), &open, *size, started, duration)?
    } else {
        thread::scope(|scope| {
            let workers: Vec<_> = kept
                .into_iter()
                .map(|stream| {
                    let open = &open;
                    scope.spawn(move || exchange_loop(stream, open, *size, started, duration))
                })
                .collect();
            let mut all = Vec::new();
            for worker in workers {
                let latencies = worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("a connection's thread panicked"))??;
                all.extend(latencies);
            }
            anyhow::Ok(all)
        })?
    };
    let elapsed = started.elapsed().as_secs_f64();
    report(&latency_report(latencies, elapsed))
}

/// One connection's (or, without `kept`, one thread's of new connections)
/// round trips from `started` until `duration` has passed.
fn exchange_loop(
    mut kept: Option<TcpStream>,
    open: &(dyn Fn() -> anyhow::Result<TcpStream> + Sync),
    size: usize,
    started: Instant,
    duration: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let request: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut response = vec![0u8; size];
    let mut latencies = Vec::new();
    while started.elapsed() < duration {
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
    Ok(latencies)
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

// A `streams` message: magic, connection index (u32), sequence number
// (u64), checksum of index, sequence number and payload (u64), status byte,
// padding, then the payload: the bytes of `Stream::new(seed(index, seq))`.
const MAGIC: &[u8; 4] = b"FRYS";
const INDEX: usize = 4;
const SEQ: usize = 8;
const CHECKSUM: usize = 16;
const STATUS: usize = 24;
/// The status byte of an echo whose message the server found damaged.
const DAMAGED: u8 = 1;

fn seed(index: u32, seq: u64) -> u64 {
    (u64::from(index) << 40) ^ seq ^ ferry_tests::stream::SEED_A
}

/// FNV-1a of the index, sequence number and payload of `message`.
fn checksum(message: &[u8]) -> u64 {
    let covered = message[INDEX..CHECKSUM]
        .iter()
        .chain(&message[STREAM_HEADER..]);
    covered.fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes message `seq` of connection `index` into `buf` (its whole length).
fn fill_message(buf: &mut [u8], index: u32, seq: u64) {
    buf[..INDEX].copy_from_slice(MAGIC);
    buf[INDEX..SEQ].copy_from_slice(&index.to_be_bytes());
    buf[SEQ..CHECKSUM].copy_from_slice(&seq.to_be_bytes());
    buf[STATUS..STREAM_HEADER].fill(0);
    Stream::new(seed(index, seq)).fill(&mut buf[STREAM_HEADER..]);
    let sum = checksum(buf);
    buf[CHECKSUM..STATUS].copy_from_slice(&sum.to_be_bytes());
}

/// Whether `buf` is intact message `seq` of connection `index` (the
/// server's check: header fields and checksum; the client compares every byte).
fn message_is(buf: &[u8], index: u32, seq: u64) -> bool {
    let word = |at: usize, len: usize| &buf[at..at + len];
    word(0, 4) == MAGIC
        && word(INDEX, 4) == index.to_be_bytes()
        && word(SEQ, 8) == seq.to_be_bytes()
        && word(CHECKSUM, 8) == checksum(buf).to_be_bytes()
}

/// Why an echo is not the message sent, for the error message.
fn mismatch(sent: &[u8], echo: &[u8]) -> String {
    let seq = |m: &[u8]| u64::from_be_bytes(m[SEQ..CHECKSUM].try_into().expect("8 bytes"));
    let index = |m: &[u8]| u32::from_be_bytes(m[INDEX..SEQ].try_into().expect("4 bytes"));
    if echo[STATUS] == DAMAGED {
        format!(
            "the server received message {} damaged, out of order or from another connection",
            seq(sent)
        )
    } else if index(echo) != index(sent) {
        format!(
            "the echo of message {} belongs to connection {}",
            seq(sent),
            index(echo)
        )
    } else if seq(echo) != seq(sent) {
        format!(
            "message {} came back as message {} (lost, duplicated or reordered)",
            seq(sent),
            seq(echo)
        )
    } else {
        let at = sent.iter().zip(echo).position(|(a, b)| a != b).unwrap_or(0);
        format!("the echo of message {} differs at byte {at}", seq(sent))
    }
}

/// What the clients that run until stdin closes share with the thread
/// reading it: the current phase (one more per line) and when each began.
struct Phases {
    current: AtomicUsize,
    starts: Mutex<Vec<Instant>>,
    stop: AtomicBool,
}

impl Phases {
    /// Starts phase 0 now and a thread that reads stdin: each line starts
    /// the next phase; EOF sets `stop`, unless `ignore_eof` (a timed run).
    fn start(ignore_eof: bool) -> Arc<Self> {
        let phases = Arc::new(Self {
            current: AtomicUsize::new(0),
            starts: Mutex::new(vec![Instant::now()]),
            stop: AtomicBool::new(false),
        });
        let reader = Arc::clone(&phases);
        thread::spawn(move || {
            let mut line = String::new();
            while io::stdin().lock().read_line(&mut line).unwrap_or(0) > 0 {
                line.clear();
                let mut starts = reader.starts.lock().unwrap_or_else(PoisonError::into_inner);
                starts.push(Instant::now());
                reader.current.store(starts.len() - 1, Ordering::SeqCst);
            }
            if !ignore_eof {
                reader.stop.store(true, Ordering::SeqCst);
            }
        });
        phases
    }

    fn current(&self) -> usize {
        self.current.load(Ordering::SeqCst)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn starts(&self) -> Vec<Instant> {
        self.starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn start_of(&self, phase: usize) -> Instant {
        self.starts.lock().unwrap_or_else(PoisonError::into_inner)[phase]
    }
}

/// A failed exchange: its kind and what happened.
struct Failure {
    kind: FailureKind,
    message: String,
}

impl Failure {
    fn io(what: &str, error: &io::Error) -> Self {
        Self {
            kind: FailureKind::of_io(error.kind()),
            message: format!("{what}: {error}"),
        }
    }

    fn mismatch(message: String) -> Self {
        Self {
            kind: FailureKind::Mismatch,
            message,
        }
    }
}

/// What one `streams` connection did, per phase.
#[derive(Default)]
struct StreamsWorker {
    phases: Vec<StreamsPhase>,
    sent: u64,
    verified: u64,
    max_round_trip: Duration,
    failure: Option<Failure>,
}

impl StreamsWorker {
    fn record(&mut self, phase: usize, bytes: u64, round_trip: Duration) {
        if self.phases.len() <= phase {
            self.phases.resize(phase + 1, StreamsPhase::default());
        }
        let p = &mut self.phases[phase];
        p.messages += 1;
        p.bytes += bytes;
        p.max_round_trip_micros = p.max_round_trip_micros.max(micros(round_trip));
        self.verified += bytes;
        self.max_round_trip = self.max_round_trip.max(round_trip);
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Opens connection `index` of `streams` and makes its first round trip.
fn open_stream(to: SocketAddr, size: usize, index: u32) -> anyhow::Result<TcpStream> {
    let mut stream = connect(to)?;
    let mut hello = vec![STREAMS];
    hello.extend_from_slice(&u32::try_from(size)?.to_be_bytes());
    hello.extend_from_slice(&index.to_be_bytes());
    stream.write_all(&hello)?;
    let mut message = vec![0u8; size];
    let mut echo = vec![0u8; size];
    fill_message(&mut message, index, 0);
    stream.write_all(&message)?;
    stream
        .read_exact(&mut echo)
        .context("the first message did not come back")?;
    if echo != message {
        bail!("{}", mismatch(&message, &echo));
    }
    Ok(stream)
}

fn streams(config: &Streams) -> anyhow::Result<()> {
    let Streams {
        to,
        connections,
        size,
        pause_ms,
    } = *config;
    if size < STREAM_HEADER {
        bail!("--size {size}: a message needs at least {STREAM_HEADER} bytes");
    }
    let mut opened = Vec::with_capacity(connections);
    for i in 0..connections {
        let index = u32::try_from(i)?;
        let stream = open_stream(to, size, index)
            .with_context(|| format!("connection {i} of {connections}"))?;
        opened.push(stream);
    }
    let phases = Phases::start(false);
    report(&Open { open: opened.len() })?;
    let pause = Duration::from_millis(pause_ms);
    let workers: Vec<_> = opened
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            let phases = Arc::clone(&phases);
            thread::Builder::new()
                .name(format!("stream-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    let index = u32::try_from(i).expect("checked when opened");
                    stream_messages(stream, index, size, pause, &phases)
                })
        })
        .collect::<io::Result<_>>()
        .context("cannot start a thread per connection")?;
    let results: Vec<StreamsWorker> = workers
        .into_iter()
        .map(|w| {
            w.join().unwrap_or_else(|_| StreamsWorker {
                failure: Some(Failure {
                    kind: FailureKind::Other,
                    message: "a connection's thread panicked".to_owned(),
                }),
                ..StreamsWorker::default()
            })
        })
        .collect();
    let starts = phases.starts();
    let ended = Instant::now();
    let mut summary = StreamsSummary {
        connections,
        messages: 0,
        bytes: 0,
        bytes_lost: 0,
        max_round_trip_micros: 0.0,
        errors: Failures::default(),
        phases: phase_seconds(&starts, ended)
            .map(|seconds| StreamsPhase {
                seconds,
                ..StreamsPhase::default()
            })
            .collect(),
    };
    for worker in &results {
        summary.bytes += worker.verified;
        summary.bytes_lost += worker.sent - worker.verified;
        summary.max_round_trip_micros = summary
            .max_round_trip_micros
            .max(micros(worker.max_round_trip));
        if let Some(failure) = &worker.failure {
            summary.errors.add(failure.kind, &failure.message);
        }
        for (total, phase) in summary.phases.iter_mut().zip(&worker.phases) {
            total.messages += phase.messages;
            total.bytes += phase.bytes;
            total.connections_active += usize::from(phase.messages > 0);
            total.max_round_trip_micros =
                total.max_round_trip_micros.max(phase.max_round_trip_micros);
        }
    }
    summary.messages = summary.phases.iter().map(|p| p.messages).sum();
    report(&summary)
}

/// How long each phase lasted, the last until `ended`.
fn phase_seconds(starts: &[Instant], ended: Instant) -> impl Iterator<Item = f64> + '_ {
    starts.iter().enumerate().map(move |(i, start)| {
        let end = starts.get(i + 1).copied().unwrap_or(ended);
        end.saturating_duration_since(*start).as_secs_f64()
    })
}

/// One `streams` connection's messages, from sequence number 1, until
/// stop or its first failure; then it closes its side and waits for the
/// server to close too, so a reset at the end is seen.
fn stream_messages(
    mut stream: TcpStream,
    index: u32,
    size: usize,
    pause: Duration,
    phases: &Phases,
) -> StreamsWorker {
    let mut worker = StreamsWorker::default();
    let mut message = vec![0u8; size];
    let mut echo = vec![0u8; size];
    let bytes = size as u64;
    let mut seq = 1u64;
    while !phases.stopped() {
        fill_message(&mut message, index, seq);
        let began = Instant::now();
        worker.sent += bytes;
        if let Err(e) = stream.write_all(&message) {
            worker.failure = Some(Failure::io(
                &format!("connection {index} write of message {seq}"),
                &e,
            ));
            return worker;
        }
        if let Err(e) = stream.read_exact(&mut echo) {
            worker.failure = Some(Failure::io(
                &format!("connection {index} echo of message {seq}"),
                &e,
            ));
            return worker;
        }
        if echo != message {
            worker.failure = Some(Failure::mismatch(format!(
                "connection {index}: {}",
                mismatch(&message, &echo)
            )));
            return worker;
        }
        worker.record(phases.current(), bytes, began.elapsed());
        seq += 1;
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
    let closed = stream
        .shutdown(Shutdown::Write)
        .and_then(|()| stream.read(&mut echo));
    match closed {
        Ok(0) => {}
        Ok(_) => {
            worker.failure = Some(Failure::mismatch(format!(
                "connection {index}: bytes after the last echo"
            )));
        }
        Err(e) => worker.failure = Some(Failure::io(&format!("connection {index} close"), &e)),
    }
    worker
}

/// After a failed attempt `churn` waits this long before the next, so a
/// path that refuses at once is probed a thousand times a second rather
/// than spun on.
const CHURN_FAILURE_PAUSE: Duration = Duration::from_millis(1);

/// One `churn` attempt: connect, one echo of `request`, close.
fn churn_once(
    to: SocketAddr,
    request: &[u8],
    response: &mut [u8],
    timeout: Duration,
) -> Result<(), Failure> {
    let mut stream =
        TcpStream::connect_timeout(&to, timeout).map_err(|e| Failure::io("connect", &e))?;
    let setup = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .and_then(|()| stream.set_write_timeout(Some(timeout)));
    setup.map_err(|e| Failure::io("socket options", &e))?;
    let mut hello = vec![ECHO];
    hello.extend_from_slice(
        &u32::try_from(request.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    hello.extend_from_slice(request);
    stream
        .write_all(&hello)
        .map_err(|e| Failure::io("write", &e))?;
    stream
        .read_exact(response)
        .map_err(|e| Failure::io("read the echo", &e))?;
    if response != request {
        return Err(Failure::mismatch(
            "the echo differs from the request".to_owned(),
        ));
    }
    Ok(())
}

/// One phase of a `churn` run as it is counted.
#[derive(Default)]
struct ChurnCount {
    phase: ChurnPhase,
    latencies: Vec<Duration>,
    longest_gap: Duration,
    first_ok: Option<Duration>,
    last_failure: Option<Duration>,
}

impl ChurnCount {
    fn finish(mut self, seconds: f64) -> ChurnPhase {
        self.latencies.sort();
        let percentile = |p: f64| {
            let n = self.latencies.len();
            let i = ((n as f64 * p).ceil() as usize).clamp(1, n.max(1)) - 1;
            self.latencies.get(i).map_or(0.0, |d| micros(*d))
        };
        ChurnPhase {
            seconds,
            p50_micros: percentile(0.50),
            p99_micros: percentile(0.99),
            max_micros: self.latencies.last().map_or(0.0, |d| micros(*d)),
            longest_gap_micros: micros(self.longest_gap),
            first_ok_micros: self.first_ok.map(micros),
            last_failure_micros: self.last_failure.map(micros),
            ..self.phase
        }
    }
}

fn churn(config: &Churn) -> anyhow::Result<()> {
    let Churn {
        to,
        size,
        seconds,
        timeout_ms,
    } = *config;
    let timeout = Duration::from_millis(timeout_ms.max(1));
    let limit = seconds.map(|s| Duration::from_secs_f64(s.max(0.0)));
    let request: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut response = vec![0u8; size];
    let phases = Phases::start(limit.is_some());
    let started = Instant::now();
    let mut counts: Vec<ChurnCount> = Vec::new();
    let mut total = ChurnCount::default();
    let mut last_ok = started;
    while !phases.stopped() && limit.is_none_or(|limit| started.elapsed() < limit) {
        let began = Instant::now();
        let result = churn_once(to, &request, &mut response, timeout);
        let ended = Instant::now();
        let phase = phases.current();
        if counts.len() <= phase {
            counts.resize_with(phase + 1, ChurnCount::default);
        }
        if result.is_ok() && total.first_ok.is_none() {
            report(&FirstOk {
                first_ok_micros: micros(ended - began),
            })?;
        }
        let phase_start = phases.start_of(phase);
        for (count, start) in [(&mut counts[phase], phase_start), (&mut total, started)] {
            let since_start = ended.saturating_duration_since(start);
            count.phase.attempts += 1;
            match &result {
                Ok(()) => {
                    count.phase.ok += 1;
                    count.latencies.push(ended - began);
                    count.longest_gap = count.longest_gap.max(ended - last_ok);
                    count.first_ok.get_or_insert(since_start);
                }
                Err(failure) => {
                    count.phase.failed += 1;
                    count.last_failure = Some(since_start);
                    count.phase.failures.add(
                        failure.kind,
                        &format!(
                            "{} (after {:.3} s)",
                            failure.message,
                            (ended - started).as_secs_f64()
                        ),
                    );
                }
            }
        }
        match result {
            Ok(()) => last_ok = ended,
            Err(_) => thread::sleep(CHURN_FAILURE_PAUSE),
        }
    }
    let ended = Instant::now();
    let starts = phases.starts();
    counts.resize_with(starts.len(), ChurnCount::default);
    let trailing = ended - last_ok;
    if let Some(last) = counts.last_mut() {
        last.longest_gap = last.longest_gap.max(trailing);
    }
    total.longest_gap = total.longest_gap.max(trailing);
    let seconds: Vec<f64> = phase_seconds(&starts, ended).collect();
    report(&ChurnSummary {
        total: total.finish((ended - started).as_secs_f64()),
        phases: counts
            .into_iter()
            .zip(seconds)
            .map(|(count, seconds)| count.finish(seconds))
            .collect(),
    })
}

fn report(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    io::stdout().flush()?;
    Ok(())
}
