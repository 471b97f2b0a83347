//! Byte-exact relaying between two TCP streams.

use std::io;

use tokio::net::TcpStream;

/// Per-direction buffer: large enough that a bulk stream moves in few syscalls.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Copies both ways until both sides have finished. A FIN from one side is
/// passed on as a FIN (half-close) while the other direction keeps flowing;
/// an error on either side resets both, so a peer that vanishes is seen as a
/// reset, never as a clean end of stream.
pub async fn relay(mut a: TcpStream, mut b: TcpStream) -> io::Result<(u64, u64)> {
    match tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, RELAY_BUFFER, RELAY_BUFFER).await
    {
        Ok(bytes) => Ok(bytes),
        Err(error) => {
            reset(&a);
            reset(&b);
            Err(error)
        }
    }
}

/// Makes the coming close send RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
