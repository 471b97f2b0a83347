//! Byte-exact relaying between a TCP socket and another socket or a tunnel
//! stream.

use std::{
    future::{Future, poll_fn},
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    sys::socket::{Shutdown, shutdown},
    unistd::pipe2,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest},
    net::TcpStream,
};

use super::connections::{Counted, Stop};
use crate::tunnel::stream::TunnelStream;

/// What [`relay_tunnel`] reads from the socket into at a time: large enough
/// that a bulk stream moves in few syscalls.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// A stream whose failure can be passed on as a reset rather than a clean end.
pub trait Reset {
    fn reset(&mut self);
}

/// A socket that can be half-closed at once, without waiting for room.
pub trait CloseWrite {
    /// Sends a FIN now (`shutdown(SHUT_WR)`); a socket already half-closed
    /// stays as it is.
    fn close_write(&self);
}

/// A socket whose held-back ACK can be sent now.
pub trait AckNow {
    /// `TCP_QUICKACK`: sends an ACK the kernel is delaying, and leaves its
    /// interactive (delayed-ACK) mode until the traffic puts it back.
    fn ack_now(&self);
}

impl Reset for TcpStream {
    /// Makes the coming close send RST instead of FIN.
    fn reset(&mut self) {
        reset(self);
    }
}

impl CloseWrite for TcpStream {
    fn close_write(&self) {
        let _ = shutdown(self.as_raw_fd(), Shutdown::Write);
    }
}

impl AckNow for TcpStream {
    fn ack_now(&self) {
        // Only a hint: a socket that refuses it still carries its bytes.
        let _ = socket2::SockRef::from(self).set_tcp_quickack(true);
    }
}

impl<S: Reset> Reset for Counted<S> {
    fn reset(&mut self) {
        self.get_mut().reset();
    }
}

impl<S: CloseWrite> CloseWrite for Counted<S> {
    fn close_write(&self) {
        self.get_ref().close_write();
    }
}

impl<S: AckNow> AckNow for Counted<S> {
    fn ack_now(&self) {
        self.get_ref().ack_now();
    }
}

impl Reset for TunnelStream {
    fn reset(&mut self) {
        TunnelStream::reset(self);
    }
}

/// What one pipe of [`relay`] grows to for a bulk stream: bytes move
/// through it in chunks of up to this size.
const SPLICE_PIPE: usize = 256 * 1024;

/// Moves bytes both ways between the client's socket and `upstream` until
/// both sides have finished, inside the kernel: each direction `splice(2)`s
/// from one socket into a pipe of its own and from the pipe into the other
/// socket, so the payload's pages are handed on, never copied into the agent.
/// A FIN from one side is passed on as a FIN (half-close) while the other
/// direction keeps flowing; an error on either side resets both, so a peer
/// that vanishes is seen as a reset, never as a clean end of stream; so does
/// `stop` resolving with a revocation. At the drain deadline ([`Stop::Deadline`])
/// both sockets get a FIN instead (the kernel still resets one that has
/// unread bytes). Returns the bytes the client sent and received.
pub async fn relay(
    mut client: Counted<TcpStream>,
    mut upstream: TcpStream,
    stop: impl Future<Output = Stop>,
) -> io::Result<(u64, u64)> {
    let result = {
        let counted = &client;
        let socket = counted.get_ref();
        let both = async {
            tokio::try_join!(
                splice_half(socket, &upstream, |n| counted.count_from(n)),
                splice_half(&upstream, socket, |n| counted.count_to(n)),
            )
        };
        tokio::select! {
            result = both => result,
            stop = stop => match stop {
                Stop::Revoked(reason) => Err(revoked(&reason)),
                Stop::Deadline => {
                    // Either side may have half-closed already; that is fine.
                    socket.close_write();
                    upstream.close_write();
                    Ok(counted.moved())
                }
            },
        }
    };
    if result.is_err() {
        client.reset();
        upstream.reset();
    }
    result
}

/// One direction of [`relay`]: `from` → pipe → `to` until `from` ends, then
/// a FIN to `to`. The pipe is made when the first bytes (or the FIN) arrive.
async fn splice_half(from: &TcpStream, to: &TcpStream, moved: impl Fn(usize)) -> io::Result<u64> {
    let mut pipe: Option<Pipe> = None;
    let mut total = 0;
    loop {
        from.readable().await?;
        let pipe = match &mut pipe {
            Some(pipe) => pipe,
            None => pipe.insert(Pipe::new()?),
        };
        // The pipe is empty here, so EAGAIN can only mean the socket has
        // nothing to read: try_io then clears its readiness and we wait.
        let n = match from.try_io(Interest::READABLE, || {
            splice_nonblocking(from, &pipe.into, SPLICE_PIPE)
        }) {
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        if n == 0 {
            shutdown(to.as_raw_fd(), Shutdown::Write).map_err(io::Error::from)?;
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice_nonblocking(&pipe.out, to, left)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => left -= written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        moved(n);
        total += n as u64;
        pipe.after_chunk(n);
    }
}

/// One direction's pipe. It starts at the kernel's default size (16 pages)
/// and grows to [`SPLICE_PIPE`] once a chunk fills half of it. Pipe pages
/// count against the user's `fs.pipe-user-pages-soft` (shared by every
/// process of the agent's uid on the node), so connections that only carry
/// small messages keep small pipes.
struct Pipe {
    out: OwnedFd,
    into: OwnedFd,
    capacity: usize,
    may_grow: bool,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (out, into) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = fcntl(&into, FcntlArg::F_GETPIPE_SZ)? as usize;
        Ok(Self {
            out,
            into,
            capacity,
            may_grow: capacity < SPLICE_PIPE,
        })
    }

    /// Grows the (now empty) pipe after a chunk of `n` bytes if the stream
    /// looks like bulk. Tried once: past the user's pipe limit, or above
    /// `fs.pipe-max-size`, the kernel refuses and the pipe keeps its size.
    fn after_chunk(&mut self, n: usize) {
        if !self.may_grow || n < self.capacity / 2 {
            return;
        }
        self.may_grow = false;
        if let Ok(size) = fcntl(&self.into, FcntlArg::F_SETPIPE_SZ(SPLICE_PIPE as i32)) {
            self.capacity = size as usize;
        }
    }
}

fn splice_nonblocking(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(splice(from, None, to, None, len, flags)?)
}

/// [`relay`] for a socket and a tunnel stream, without copying in user
/// space: what the socket gives is read into a buffer that is then handed to
/// h2 as it is, and what h2 received is written to the socket from h2's own
/// buffers. Both directions run in this one task; the semantics (FIN passed
/// on as `END_STREAM` and back, an error or a revocation resets both ends,
/// the drain deadline ends both cleanly) are [`relay`]'s.
pub async fn relay_tunnel<A>(
    mut socket: A,
    mut tunnel: TunnelStream,
    stop: impl Future<Output = Stop>,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + Reset + CloseWrite + AckNow,
{
    let mut up = ToTunnel::default();
    let mut down = ToSocket::default();
    let mut stop = std::pin::pin!(stop);
    let result = poll_fn(|cx| {
        if let Poll::Ready(stop) = stop.as_mut().poll(cx) {
            return Poll::Ready(match stop {
                Stop::Revoked(reason) => Err(revoked(&reason)),
                Stop::Deadline => Ok(false),
            });
        }
        let up = up.poll(cx, &mut socket, &mut tunnel)?;
        let down = down.poll(cx, &mut tunnel, &mut socket)?;
        match (up, down) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(true)),
            _ => Poll::Pending,
        }
    })
    .await;
    match result {
        Ok(true) => Ok((up.bytes, down.bytes)),
        Ok(false) => {
            // The drain deadline: END_STREAM to the peer and a FIN to the
            // pod, for whichever direction has not ended yet.
            if !up.done {
                let _ = tunnel.finish();
            }
            if !down.done {
                socket.close_write();
            }
            Ok((up.bytes, down.bytes))
        }
        Err(error) => {
            socket.reset();
            tunnel.reset();
            Err(error)
        }
    }
}

/// Socket to tunnel: read into `buffer`, hand the bytes read to h2 as one chunk.
#[derive(Default)]
struct ToTunnel {
    buffer: BytesMut,
    /// The last read filled all the room it had: the pod is sending faster
    /// than one buffer a read, so the next allocation is a large one.
    streaming: bool,
    /// Read but not yet accepted by h2 (its window was closed).
    chunk: Bytes,
    done: bool,
    bytes: u64,
}

impl ToTunnel {
    fn poll<A: AsyncRead + Unpin + AckNow>(
        &mut self,
        cx: &mut Context<'_>,
        socket: &mut A,
        tunnel: &mut TunnelStream,
    ) -> Poll<io::Result<()>> {
        while !self.done {
            if !self.chunk.is_empty() {
                ready!(tunnel.poll_send(cx, &mut self.chunk))?;
            } else {
                // A small read leaves the rest of the allocation for the
                // next; a new one is made only when less than a page is left.
                if self.buffer.capacity() - self.buffer.len() < MIN_READ {
                    self.buffer.reserve(if self.streaming {
                        STREAMING_READ
                    } else {
                        RELAY_BUFFER
                    });
                }
                let room = self.buffer.capacity() - self.buffer.len();
                let n = ready!(tokio_util::io::poll_read_buf(
                    Pin::new(&mut *socket),
                    cx,
                    &mut self.buffer
                ))?;
                self.streaming = n == room;
                if n == 0 {
                    // The pod's FIN, after everything it sent went to h2.
                    tunnel.finish()?;
                    self.done = true;
                } else {
                    if n >= ACK_NOW_READ {
                        socket.ack_now();
                    }
                    self.bytes += n as u64;
                    self.chunk = self.buffer.split().freeze();
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The least room a read into [`ToTunnel::buffer`] gets.
const MIN_READ: usize = 4 * 1024;
/// The buffer a pod that keeps its socket full gets: four times fewer reads
/// (and receive-window updates) than with [`RELAY_BUFFER`]. In A/B runs bulk
/// went from 0.85–0.87 to 0.93–0.98 × stunnel; 128 KiB gave 0.89–0.92 and
/// 1 MiB 0.83–0.85. A connection that sends less than a buffer at a time
/// keeps [`RELAY_BUFFER`]-sized ones.
const STREAMING_READ: usize = 256 * 1024;

/// A read from the pod of at least this much is followed by
/// [`AckNow::ack_now`]. A pod that sends this much at once may be sending
/// more than its congestion window holds (BBR keeps it near two round trips'
/// worth, which over a veth's microsecond round trips is little) and waits
/// for ACKs before the rest, while the kernel delays the agent's ACKs until
/// its delayed-ACK timer (at least 40 ms at HZ=250) or the pod's tail-loss
/// probe draws them out. Under `http-64k` (nginx's 64 KiB responses, BBR) that
/// was the p99 tail: in A/B runs beside HAProxy, Ferry's p99 went from 0.53,
/// 2.66, 6.36 and 6.66 × HAProxy's to 0.88, 0.92, 0.93 and 0.97 ×. Request
/// and response messages of a few KiB never pay the extra syscall.
pub(crate) const ACK_NOW_READ: usize = 16 * 1024;

/// Tunnel to socket: write each received chunk from where h2 holds it.
#[derive(Default)]
struct ToSocket {
    eof: bool,
    done: bool,
    bytes: u64,
}

impl ToSocket {
    fn poll<A: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut TunnelStream,
        socket: &mut A,
    ) -> Poll<io::Result<()>> {
        while !self.done {
            if self.eof {
                ready!(Pin::new(&mut *socket).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let data = ready!(tunnel.poll_received(cx))?;
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            let n = ready!(Pin::new(&mut *socket).poll_write(cx, data))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            tunnel.consume(n);
            self.bytes += n as u64;
        }
        Poll::Ready(Ok(()))
    }
}

/// The error a revoked connection's relay ends with.
fn revoked(reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("revoked: {reason}"),
    )
}

/// Makes the coming close of `stream` send RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_size(pipe: &Pipe) -> usize {
        fcntl(&pipe.into, FcntlArg::F_GETPIPE_SZ).expect("F_GETPIPE_SZ") as usize
    }

    #[test]
    fn a_pipe_grows_for_bulk_chunks_only() {
        let mut pipe = Pipe::new().expect("pipe");
        let initial = kernel_size(&pipe);
        assert!(initial < SPLICE_PIPE, "a new pipe has {initial} bytes");
        // Round trips of small messages leave the pipe as it is.
        pipe.after_chunk(1024);
        pipe.after_chunk(initial / 2 - 1);
        assert_eq!(kernel_size(&pipe), initial);
        // A chunk that fills half of it makes it bulk-sized, once.
        pipe.after_chunk(initial / 2);
        assert_eq!(kernel_size(&pipe), SPLICE_PIPE);
        assert_eq!(pipe.capacity, SPLICE_PIPE);
        assert!(!pipe.may_grow);
    }
}
