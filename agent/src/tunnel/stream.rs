//! One HTTP/2 `CONNECT` stream as the relay uses it: it hands the stream
//! whole buffers to send and writes what was received straight from h2's
//! buffers, so the relay adds no copy of its own (rustls still copies into
//! TLS records, and h2 reads plaintext into its frame buffer).
//!
//! End of stream maps to a TCP half-close (FIN) and `RST_STREAM` to a reset,
//! in both directions: the application on either end sees what the other did.

use std::{
    io,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};

/// The most one send reserves of h2's window: bounded so one stream cannot
/// claim the whole connection window, large so a bulk stream moves in few frames.
const MAX_WRITE: usize = 256 * 1024;

pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read; its flow-control capacity is released as
    /// the relay reads it, so the window tracks what has really been consumed.
    pending: Bytes,
}

impl TunnelStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
        }
    }

    /// Tells the peer this stream failed (it resets its side's socket).
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CANCEL);
    }

    /// Sends all of `data` as DATA frames as flow control allows, moving the
    /// bytes into h2 without copying them. Pending while the peer's window
    /// is closed.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        while !data.is_empty() {
            let wanted = data.len().min(MAX_WRITE);
            if self.send.capacity() < wanted {
                self.send.reserve_capacity(wanted);
            }
            let granted = match self.send.capacity() {
                0 => match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(granted)) => granted,
                    Some(Err(error)) => return Poll::Ready(Err(into_io(error))),
                    None => return Poll::Ready(Err(stream_closed())),
                },
                available => available,
            };
            let n = granted.min(data.len());
            if n > 0 {
                self.send
                    .send_data(data.split_to(n), false)
                    .map_err(into_io)?;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// What the peer sent and was not consumed yet, in place in h2's
    /// buffers; empty at the end of the stream.
    pub fn poll_received(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(error)) => return Poll::Ready(Err(into_io(error))),
                None => return Poll::Ready(Ok(&[])),
            }
        }
        Poll::Ready(Ok(&self.pending))
    }

    /// Marks `n` received bytes as passed on, releasing their flow-control
    /// capacity: the window tracks what has really been consumed.
    pub fn consume(&mut self, n: usize) {
        self.pending.advance(n);
        // Only fails if the stream is already gone; the next poll says so.
        let _ = self.recv.flow_control().release_capacity(n);
    }

    /// Ends this direction (`END_STREAM`): the peer half-closes its socket.
    /// Called once, when the pod's side has sent its FIN.
    pub fn finish(&mut self) -> io::Result<()> {
        self.send.reserve_capacity(0);
        self.send.send_data(Bytes::new(), true).map_err(into_io)
    }
}

/// A peer's `RST_STREAM` is a reset to the application; anything else that
/// breaks the stream is too, with what h2 said.
fn into_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error.into_io().expect("is_io");
    }
    let kind = match error.reason() {
        Some(Reason::NO_ERROR) | None => io::ErrorKind::BrokenPipe,
        Some(_) => io::ErrorKind::ConnectionReset,
    };
    io::Error::new(kind, error)
}

fn stream_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the tunnel stream is closed")
}
