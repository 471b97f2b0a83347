//! The TLS connection under a tunnel's HTTP/2, after the handshake: rustls
//! driven over the socket so that many small HTTP/2 frames cost few
//! syscalls.
//!
//! Two things differ from `tokio_rustls::TlsStream`, which the handshake
//! still uses:
//!
//! - **Writes are batched per turn.** h2 writes and flushes every DATA frame
//!   of 256 bytes or more on its own, and `TlsStream` sends each write to
//!   the socket at once: with 16 streams busy, one loop turn of the
//!   connection's task made 16 `writev`s and 16 TCP segments, and the peer
//!   up to 16 wake-ups. Here a write seals the frame into rustls's buffer and owes
//!   the socket a write; the records go out together in one `writev` at the
//!   start of the task's next poll (the task wakes itself for it), or at once
//!   when rustls's buffer is full.
//! - **Reads take what the socket holds.** rustls reads at most 4 KiB per
//!   `read_tls`, so a 16 KiB record cost four or five `recv`s. Here one
//!   `recv` takes up to [`READ_CHUNK`] and rustls is fed from memory.

use std::{
    io::{self, IoSlice, Write},
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, BytesMut};
use rustls::Connection;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// The most one `recv` on the tunnel's socket takes: four full TLS records.
const READ_CHUNK: usize = 64 * 1024;

/// A tunnel connection's TLS after the handshake, as h2 reads and writes it.
pub struct Transport<S = TcpStream> {
    socket: S,
    tls: Connection,
    /// Bytes read from the socket that rustls has not taken yet; freed once
    /// empty, so an idle connection holds no read buffer.
    incoming: BytesMut,
    /// Records are sealed in rustls's buffer that the socket has not been
    /// given yet, and this task has been woken to send them.
    owed: bool,
    /// The socket said end of stream (rustls has been told).
    socket_eof: bool,
    close_notify_sent: bool,
}

impl<S> Transport<S> {
    /// Takes over a connection whose handshake is done, with whatever
    /// plaintext and records rustls already holds. What h2's own handshake
    /// writes (the preface, SETTINGS) goes out at the first poll of the
    /// task that drives the connection.
    pub fn new(socket: S, tls: impl Into<Connection>) -> Self {
        Self {
            socket,
            tls: tls.into(),
            incoming: BytesMut::new(),
            owed: false,
            socket_eof: false,
            close_notify_sent: false,
        }
    }

    /// The TLS session: the peer's certificates, the negotiated group.
    pub fn tls(&self) -> &Connection {
        &self.tls
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Transport<S> {
    /// Gives the socket every sealed record rustls holds; pending while the
    /// socket is full (its writability then wakes this task).
    fn poll_send_records(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tls.wants_write() {
            let mut socket = SocketWriter {
                socket: &mut self.socket,
                cx,
            };
            match self.tls.write_tls(&mut socket) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Notes that records wait in rustls's buffer and wakes this task, so
    /// that they go out at the start of its next poll, together with
    /// whatever else this poll seals.
    fn owe(&mut self, cx: &Context<'_>) {
        if !self.owed && self.tls.wants_write() {
            self.owed = true;
            cx.waker().wake_by_ref();
        }
    }

    /// Sends what an earlier poll sealed. A full socket keeps it owed: its
    /// writability wakes the task, and the next read or write tries again.
    fn poll_pay(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.owed {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_send_records(cx))?;
        self.owed = false;
        Poll::Ready(Ok(()))
    }

    /// Hands rustls the next received bytes: from memory if a `recv`
    /// brought more than it took, else from the socket.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.incoming.is_empty() && !self.socket_eof {
            self.incoming.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.socket),
                cx,
                &mut self.incoming
            ))?;
            if n == 0 {
                self.socket_eof = true;
            }
        }
        let taken = if self.incoming.is_empty() {
            // The socket's end of stream: rustls tells a clean close (after
            // close_notify) from a truncation.
            self.tls.read_tls(&mut io::empty())?
        } else {
            let taken = self.tls.read_tls(&mut &self.incoming[..])?;
            if taken == 0 {
                // Nothing is read after close_notify; what follows it is dropped.
                self.incoming.clear();
            }
            taken
        };
        self.incoming.advance(taken);
        if self.incoming.is_empty() {
            self.incoming = BytesMut::new();
        }
        if let Err(error) = self.tls.process_new_packets() {
            // The alert that says why, if the socket takes it.
            let _ = self.poll_send_records(cx);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, error)));
        }
        // Whatever rustls queued while reading leaves with the next batch.
        // (Its answer to a peer's key update waits for our next record by
        // rustls's own design; this is for anything it queues at once.)
        self.owe(cx);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Transport<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // h2 reads first in every poll of its connection: the turn in which
        // the records were sealed is over.
        if let Poll::Ready(Err(error)) = this.poll_pay(cx) {
            return Poll::Ready(Err(error));
        }
        loop {
            match this.tls.reader().into_first_chunk() {
                Ok(plaintext) => {
                    // Empty: the peer closed cleanly.
                    let n = plaintext.len().min(buf.remaining());
                    buf.put_slice(&plaintext[..n]);
                    io::BufRead::consume(&mut this.tls.reader(), n);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
            if this.socket_eof && this.incoming.is_empty() {
                // rustls has seen the end and still says "more to come".
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Transport<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if bufs.iter().all(|buf| buf.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        loop {
            // One record for all the slices (h2 gives a frame's header and
            // its payload), as far as rustls's buffer has room.
            let sealed = this.tls.writer().write_vectored(bufs)?;
            if sealed > 0 {
                this.owe(cx);
                return Poll::Ready(Ok(sealed));
            }
            // rustls's buffer is full: make room on the socket first.
            ready!(this.poll_send_records(cx))?;
            this.owed = false;
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Owed, not sent: the records leave at the start of the next poll
    /// (see the module's doc).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tls.writer().flush()?;
        this.owe(cx);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_sent {
            this.tls.send_close_notify();
            this.close_notify_sent = true;
        }
        ready!(this.poll_send_records(cx))?;
        this.owed = false;
        match ready!(Pin::new(&mut this.socket).poll_shutdown(cx)) {
            Err(error) if error.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(error)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// The socket as the `io::Write` rustls writes records to: a full socket is
/// `WouldBlock`, and its writability wakes the task.
struct SocketWriter<'a, 'b, S> {
    socket: &'a mut S,
    cx: &'a mut Context<'b>,
}

impl<S: AsyncWrite + Unpin> Write for SocketWriter<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.socket).poll_write(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.socket).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::poll_fn,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::Wake,
    };

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;

    /// A socket that counts the reads and writes that moved bytes.
    struct CountingSocket {
        socket: DuplexStream,
        reads: Arc<AtomicUsize>,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for CountingSocket {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            ready!(Pin::new(&mut self.socket).poll_read(cx, buf))?;
            if buf.filled().len() > before {
                self.reads.fetch_add(1, Ordering::SeqCst);
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for CountingSocket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.socket).poll_write(cx, buf))?;
            self.writes.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.socket).poll_write_vectored(cx, bufs))?;
            self.writes.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            self.socket.is_write_vectored()
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.socket).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.socket).poll_shutdown(cx)
        }
    }

    /// Both ends of a finished TLS 1.3 handshake over an in-memory pipe of
    /// `pipe` bytes, each a [`Transport`] over a counted socket.
    struct Pair {
        client: Transport<CountingSocket>,
        server: Transport<CountingSocket>,
        client_writes: Arc<AtomicUsize>,
        server_reads: Arc<AtomicUsize>,
    }

    async fn pair(pipe: usize) -> Pair {
        let certified = rcgen::generate_simple_self_signed(vec!["peer.test".to_owned()])
            .expect("a self-signed certificate");
        let provider = ferry_proto::crypto::shared_provider(Default::default());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certified.cert.der().clone()).expect("a root");
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("a server certificate");
        let (client_socket, server_socket) = tokio::io::duplex(pipe);
        let counted = |socket| CountingSocket {
            socket,
            reads: Arc::default(),
            writes: Arc::default(),
        };
        let (client_socket, server_socket) = (counted(client_socket), counted(server_socket));
        let client_writes = Arc::clone(&client_socket.writes);
        let server_reads = Arc::clone(&server_socket.reads);
        let accepting = tokio::spawn(async move {
            tokio_rustls::TlsAcceptor::from(Arc::new(server_config))
                .accept(server_socket)
                .await
                .expect("the server's handshake")
        });
        let name = ServerName::try_from("peer.test").expect("a server name");
        let client = tokio_rustls::TlsConnector::from(Arc::new(client_config))
            .connect(name, client_socket)
            .await
            .expect("the client's handshake");
        let server = accepting.await.expect("the handshake task");
        let (client_socket, client_session) = client.into_inner();
        let (server_socket, server_session) = server.into_inner();
        client_writes.store(0, Ordering::SeqCst);
        server_reads.store(0, Ordering::SeqCst);
        Pair {
            client: Transport::new(client_socket, client_session),
            server: Transport::new(server_socket, server_session),
            client_writes,
            server_reads,
        }
    }

    /// What h2's next poll of the connection does first: a read, which
    /// sends the records an earlier poll owes.
    async fn send_owed(transport: &mut Transport<CountingSocket>) {
        poll_fn(|cx| {
            let mut none = ReadBuf::new(&mut []);
            let _ = Pin::new(&mut *transport).poll_read(cx, &mut none);
            Poll::Ready(())
        })
        .await;
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn frames_written_in_one_poll_leave_in_one_socket_write_at_the_next() {
        let Pair {
            mut client,
            mut server,
            client_writes,
            ..
        } = pair(1024 * 1024).await;
        let wakes = Arc::new(Wakes::default());
        let waker = Arc::clone(&wakes).into();
        let mut cx = Context::from_waker(&waker);
        // One poll of h2's connection: sixteen 1 KiB DATA frames, each
        // written and flushed on its own, as h2 does.
        for i in 0..16u8 {
            let frame = [i; 1024];
            let mut client = Pin::new(&mut client);
            assert!(matches!(
                client.as_mut().poll_write(&mut cx, &frame),
                Poll::Ready(Ok(1024))
            ));
            assert!(client.poll_flush(&mut cx).is_ready());
        }
        assert_eq!(client_writes.load(Ordering::SeqCst), 0, "nothing sent yet");
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "the task woke itself once"
        );
        // Its next poll reads first, and pays what the last one owed.
        let mut nothing = [0; 16];
        let mut buf = ReadBuf::new(&mut nothing);
        assert!(
            Pin::new(&mut client)
                .poll_read(&mut cx, &mut buf)
                .is_pending()
        );
        assert_eq!(client_writes.load(Ordering::SeqCst), 1, "one write for all");
        let mut received = vec![0; 16 * 1024];
        server.read_exact(&mut received).await.expect("all of it");
        for (i, frame) in received.chunks(1024).enumerate() {
            assert!(
                frame.iter().all(|&b| b == i as u8),
                "frame {i} intact and in order"
            );
        }
    }

    #[tokio::test]
    async fn a_burst_is_received_in_large_reads() {
        let Pair {
            mut client,
            mut server,
            server_reads,
            ..
        } = pair(1024 * 1024).await;
        let sent: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.expect("sent");
        client.flush().await.expect("flushed");
        send_owed(&mut client).await;
        let mut received = vec![0; sent.len()];
        server.read_exact(&mut received).await.expect("all of it");
        assert!(received == sent, "bytes intact and in order");
        // rustls alone reads 4 KiB at a time: 130 reads or more.
        let reads = server_reads.load(Ordering::SeqCst);
        let records = sent.len().div_ceil(16 * 1024);
        assert!(
            reads <= records.div_ceil(READ_CHUNK / (16 * 1024 + 22)) + 1,
            "{reads} reads for {records} records"
        );
        assert_eq!(
            server.incoming.capacity(),
            0,
            "the read buffer is freed once rustls has taken it all"
        );
    }

    #[tokio::test]
    async fn close_notify_is_a_clean_end_and_a_cut_is_an_error() {
        let Pair {
            mut client,
            mut server,
            ..
        } = pair(64 * 1024).await;
        client.write_all(b"last words").await.expect("sent");
        client.shutdown().await.expect("close_notify sent");
        let mut received = Vec::new();
        server
            .read_to_end(&mut received)
            .await
            .expect("a clean end");
        assert_eq!(received, b"last words");

        let Pair {
            mut client,
            mut server,
            ..
        } = pair(64 * 1024).await;
        client.write_all(b"cut").await.expect("sent");
        client.flush().await.expect("flushed");
        // The peer vanishes: its socket closes without close_notify.
        send_owed(&mut client).await;
        drop(client);
        let mut received = Vec::new();
        let error = server
            .read_to_end(&mut received)
            .await
            .expect_err("a truncation is no clean end");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(received, b"cut", "what came before the cut is delivered");
    }

    #[tokio::test]
    async fn data_flows_on_across_a_key_update_from_the_peer() {
        let Pair {
            mut client,
            mut server,
            ..
        } = pair(64 * 1024).await;
        // The client changes its keys and asks the server to change its own.
        client.tls.refresh_traffic_keys().expect("a key update");
        client.write_all(b"after the update").await.expect("sent");
        client.flush().await.expect("flushed");
        send_owed(&mut client).await;
        let mut received = [0; 16];
        server.read_exact(&mut received).await.expect("read");
        assert_eq!(&received, b"after the update");
        server.write_all(b"reply").await.expect("sent");
        server.flush().await.expect("flushed");
        send_owed(&mut server).await;
        let mut reply = [0; 5];
        client.read_exact(&mut reply).await.expect("read");
        assert_eq!(&reply, b"reply");
    }

    #[tokio::test]
    async fn bytes_that_are_no_tls_record_are_an_error_not_a_hang() {
        let Pair {
            client, mut server, ..
        } = pair(64 * 1024).await;
        let mut socket = client.socket;
        socket
            .socket
            .write_all(b"GET / HTTP/1.1\r\nHost: ferry\r\n\r\n")
            .await
            .expect("written");
        let mut received = Vec::new();
        let error = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            server.read_to_end(&mut received),
        )
        .await
        .expect("an answer, not a hang")
        .expect_err("plaintext where a record belongs");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert!(received.is_empty());
    }
}
