//! One HTTP/2 `CONNECT` stream seen as a byte stream, so the relay can copy
//! between it and a TCP socket the same way it copies between two sockets.
//!
//! End of stream maps to a TCP half-close (FIN) and `RST_STREAM` to a reset,
//! in both directions: the application on either end sees what the other did.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one write hands to h2: bounded so one stream cannot claim the
/// whole connection window, large so a bulk stream moves in few frames.
const MAX_WRITE: usize = 256 * 1024;

pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read; its flow-control capacity is released as
    /// the relay reads it, so the window tracks what has really been consumed.
    pending: Bytes,
    sent_end: bool,
}

impl TunnelStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            sent_end: false,
        }
    }

    /// Tells the peer this stream failed (it resets its side's socket).
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CANCEL);
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(error)) => return Poll::Ready(Err(into_io(error))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        // Only fails if the stream is already gone; the next poll says so.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let wanted = buf.len().min(MAX_WRITE);
        if this.send.capacity() < wanted {
            this.send.reserve_capacity(wanted);
        }
        loop {
            let granted = match this.send.capacity() {
                0 => match ready!(this.send.poll_capacity(cx)) {
                    Some(Ok(granted)) => granted,
                    Some(Err(error)) => return Poll::Ready(Err(into_io(error))),
                    None => return Poll::Ready(Err(stream_closed())),
                },
                available => available,
            };
            if granted == 0 {
                continue;
            }
            let n = granted.min(wanted);
            this.send
                .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                .map_err(into_io)?;
            return Poll::Ready(Ok(n));
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.sent_end {
            this.sent_end = true;
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(into_io)?;
        }
        Poll::Ready(Ok(()))
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
