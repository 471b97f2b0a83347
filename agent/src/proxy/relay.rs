//! Byte-exact relaying between two byte streams: a TCP socket and another
//! socket or a tunnel stream.

use std::io;

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::connections::Counted;
use crate::tunnel::stream::TunnelStream;

/// Per-direction buffer: large enough that a bulk stream moves in few syscalls.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// A stream whose failure can be passed on as a reset rather than a clean end.
pub trait Reset {
    fn reset(&mut self);
}

impl Reset for TcpStream {
    /// Makes the coming close send RST instead of FIN.
    fn reset(&mut self) {
        reset(self);
    }
}

impl<S: Reset> Reset for Counted<S> {
    fn reset(&mut self) {
        self.get_mut().reset();
    }
}

impl Reset for TunnelStream {
    fn reset(&mut self) {
        TunnelStream::reset(self);
    }
}

/// Copies both ways until both sides have finished. A FIN from one side is
/// passed on as a FIN (half-close) while the other direction keeps flowing;
/// an error on either side resets both, so a peer that vanishes is seen as a
/// reset, never as a clean end of stream. Returns the bytes `a` sent and received.
pub async fn relay<A, B>(mut a: A, mut b: B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + Reset,
    B: AsyncRead + AsyncWrite + Unpin + Reset,
{
    match tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, RELAY_BUFFER, RELAY_BUFFER).await
    {
        Ok(bytes) => Ok(bytes),
        Err(error) => {
            a.reset();
            b.reset();
            Err(error)
        }
    }
}

/// Makes the coming close of `stream` send RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
