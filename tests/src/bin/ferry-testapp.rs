//! `ferry-testapp`: the workload the end-to-end tests run inside simulated
//! pods. It knows nothing of Ferry: a plain TCP/UDP client and server that
//! checks every byte (deterministic streams, see `ferry_tests::stream`) and
//! reports each connection as one JSON line on stdout. Its command line
//! (`ferry_tests::testapp::cli`) and its lines (`ferry_tests::testapp::events`)
//! live in the harness library, which drives it (`ferry_tests::testapp`).

use std::{
    io::{self, BufRead as _, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Parser as _;
use ferry_tests::{
    stream::{SEED_A, SEED_B, Stream, Verifier},
    testapp::{
        cli::{CONNECT_TIMEOUT, Cli, Command, Connect, Hold, Serve, Udp},
        events::{
            self, Closed, Connected, Datagram, Done, Ended, Event, Failed, Listening, Reset,
            Served, Summary, UdpEcho,
        },
    },
};
/// How long a connection may stay silent before it counts as failed; a test
/// gets an error instead of a hang when bytes stop flowing.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `udp` waits for its echo.
const UDP_ECHO_TIMEOUT: Duration = Duration::from_secs(3);
const UDP_PROBE: &[u8] = b"ferry-udp-probe";
const CHUNK: usize = 64 * 1024;

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve(options) => serve(&options),
        Command::Connect(connect) => connect_repeatedly(&connect),
        Command::Udp(Udp { to }) => udp_probe(to),
        Command::Hold(Hold { to }) => hold(to),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ferry-testapp: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints one event as a JSON line and flushes it: the harness reads stdout
/// through a pipe while the process runs.
fn emit<E: Event>(event: &E) {
    let line = events::line(event);
    let mut out = io::stdout().lock();
    // A closed stdout (harness gone) must not kill a server mid-test.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn serve(
    &Serve {
        listen,
        bytes,
        udp,
        reset,
    }: &Serve,
) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on TCP {listen}"))?;
    let bound = listener.local_addr()?;
    if udp {
        let socket = UdpSocket::bind(bound).with_context(|| format!("cannot bind UDP {bound}"))?;
        thread::spawn(move || echo_datagrams(&socket));
    }
    emit(&Listening { addr: bound });
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                thread::spawn(move || serve_connection(stream, peer, bytes, reset));
            }
            Err(err) => eprintln!("ferry-testapp: accept on {bound}: {err}"),
        }
    }
}

fn echo_datagrams(socket: &UdpSocket) {
    let mut buf = vec![0; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                emit(&Datagram { from, bytes: len });
                if let Err(err) = socket.send_to(&buf[..len], from) {
                    eprintln!("ferry-testapp: UDP echo to {from}: {err}");
                }
            }
            Err(err) => eprintln!("ferry-testapp: UDP receive: {err}"),
        }
    }
}

/// One server connection from `peer`: read stream A to EOF, answer with
/// `bytes` of stream B (or, with `reset`, abort the connection with an RST).
fn serve_connection(mut stream: TcpStream, peer: SocketAddr, bytes: u64, reset: bool) {
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(err) => {
            eprintln!("ferry-testapp: the connection from {peer} has no local address: {err}");
            return;
        }
    };
    let result = stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| receive(&mut stream, SEED_A));
    let (verifier, mut error) = match result {
        Ok(verifier) => (Some(verifier), None),
        Err(err) => (None, Some(format!("receive: {err}"))),
    };
    let mut sent = 0;
    if reset && error.is_none() {
        let linger = nix::sys::socket::sockopt::Linger;
        let zero = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let result = nix::sys::socket::setsockopt(&stream, linger, &zero);
        emit(&Reset {
            peer,
            ok: result.is_ok(),
        });
        drop(stream);
        return;
    }
    if error.is_none() {
        match send(&mut stream, SEED_B, bytes) {
            Ok(()) => sent = bytes,
            Err(err) => error = Some(format!("send: {err}")),
        }
    }
    emit(&Served {
        peer,
        local,
        received: verifier.as_ref().map_or(0, Verifier::received),
        intact: error.is_none() && verifier.as_ref().is_some_and(Verifier::intact),
        sent,
        error,
    });
}

/// Reads to EOF, checking the bytes against the stream seeded with `seed`.
fn receive(stream: &mut TcpStream, seed: u64) -> io::Result<Verifier> {
    let mut verifier = Verifier::new(seed);
    let mut buf = vec![0; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(verifier),
            Ok(len) => verifier.update(&buf[..len]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

/// Writes `bytes` of the stream seeded with `seed`, then half-closes.
fn send(stream: &mut TcpStream, seed: u64, bytes: u64) -> io::Result<()> {
    let mut source = Stream::new(seed);
    let mut buf = vec![0; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let len = usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
        source.fill(&mut buf[..len]);
        stream.write_all(&buf[..len])?;
        left -= len as u64;
    }
    stream.shutdown(Shutdown::Write)
}

/// A client connection's peer (its `getpeername`) and local address.
fn addresses(stream: &TcpStream, to: SocketAddr) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let peer = stream
        .peer_addr()
        .with_context(|| format!("the connection to {to} has no peer address"))?;
    let local = stream
        .local_addr()
        .with_context(|| format!("the connection to {to} has no local address"))?;
    Ok((peer, local))
}

fn connect_repeatedly(connect: &Connect) -> anyhow::Result<()> {
    let &Connect {
        to,
        bytes,
        repeat,
        quiet,
        connect_timeout,
    } = connect;
    let timeout = Duration::from_secs(connect_timeout);
    let mut failed = 0u64;
    let mut first_error = None;
    for _ in 0..repeat {
        if let Err(err) = connect_once(to, bytes, quiet, timeout) {
            failed += 1;
            if !quiet {
                emit(&Failed {
                    to,
                    error: format!("{err:#}"),
                });
            }
            first_error.get_or_insert(err);
        }
    }
    if quiet {
        emit(&Summary {
            connections: repeat,
            failed,
        });
    }
    match first_error {
        None => Ok(()),
        Some(err) => Err(err.context(format!(
            "{failed} of {repeat} connections to {to} failed; the first"
        ))),
    }
}

/// One client connection; an error if it failed or the answer was not intact.
fn connect_once(to: SocketAddr, bytes: u64, quiet: bool, timeout: Duration) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, timeout)
        .with_context(|| format!("cannot connect to {to}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let (peer, local) = addresses(&stream, to)?;
    if !quiet {
        emit(&Connected { peer, local });
    }
    send(&mut stream, SEED_A, bytes).with_context(|| format!("sending to {to}"))?;
    let verifier = receive(&mut stream, SEED_B).with_context(|| format!("receiving from {to}"))?;
    let intact = verifier.intact() && verifier.received() == bytes;
    if !quiet {
        emit(&Done {
            peer,
            local,
            sent: bytes,
            received: verifier.received(),
            intact,
        });
    }
    if !intact {
        bail!(
            "the answer from {to} is not intact: {} bytes arrived, {bytes} expected, {}",
            verifier.received(),
            if verifier.intact() {
                "content as expected"
            } else {
                "content differs from stream B"
            }
        );
    }
    Ok(())
}

fn udp_probe(to: SocketAddr) -> anyhow::Result<()> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(any).context("cannot bind a UDP socket")?;
    socket
        .connect(to)
        .with_context(|| format!("cannot connect the UDP socket to {to}"))?;
    let peer = socket
        .peer_addr()
        .with_context(|| format!("the UDP socket connected to {to} has no peer"))?;
    socket
        .send(UDP_PROBE)
        .with_context(|| format!("cannot send to {to}"))?;
    socket.set_read_timeout(Some(UDP_ECHO_TIMEOUT))?;
    let mut buf = [0; 512];
    let echoed = matches!(socket.recv(&mut buf), Ok(len) if &buf[..len] == UDP_PROBE);
    emit(&UdpEcho { peer, echoed });
    if !echoed {
        bail!("no echo from {to} within {UDP_ECHO_TIMEOUT:?}");
    }
    Ok(())
}

/// What ends a `hold`.
enum HoldEnd {
    /// stdin had a line or ended: close the connection as asked.
    Released,
    /// The other end closed (`Ok`) or broke (`Err`) the connection first.
    PeerEnded(io::Result<()>),
}

fn hold(to: SocketAddr) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)
        .with_context(|| format!("cannot connect to {to}"))?;
    let (peer, local) = addresses(&stream, to)?;
    emit(&Connected { peer, local });
    let (tx, rx) = std::sync::mpsc::channel();
    let released = tx.clone();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = io::stdin().lock().read_line(&mut line);
        let _ = released.send(HoldEnd::Released);
    });
    // Watching the socket too makes a connection that ends under us visible
    // (an event and a failure) instead of going unnoticed until release.
    let mut watched = stream.try_clone().context("cannot clone the socket")?;
    thread::spawn(move || {
        let mut buf = vec![0; CHUNK];
        let end = loop {
            match watched.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => break Err(err),
            }
        };
        let _ = tx.send(HoldEnd::PeerEnded(end));
    });
    match rx.recv().context("both watchers of hold stopped")? {
        HoldEnd::Released => {
            // The watcher's clone keeps the socket open: shut it down for both.
            let _ = stream.shutdown(Shutdown::Both);
            emit(&Closed {});
            Ok(())
        }
        HoldEnd::PeerEnded(end) => {
            let how = match &end {
                Ok(()) => "closed by the peer".to_owned(),
                Err(err) => format!("failed: {err}"),
            };
            emit(&Ended {
                peer: to,
                how: how.clone(),
            });
            bail!("the held connection to {to} ended before it was released: {how}")
        }
    }
}
