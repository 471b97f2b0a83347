//! The relay's half-close and reset handling, over in-memory pipes.

use super::*;

// The relay's half-close and reset handling, over in-memory pipes: the pod's
// socket is one end of a duplex pipe, the tunnel an HTTP/2 stream over
// another, the agent's end of it as the inbound side has it.

/// What the relay did to the pod's socket beyond moving bytes.
#[derive(Debug, Default)]
struct Seen {
    resets: AtomicUsize,
    close_writes: AtomicUsize,
    shutdowns: AtomicUsize,
    /// Reads that returned at least [`ACK_NOW_READ`] bytes.
    large_reads: AtomicUsize,
    acks: AtomicUsize,
}

/// The agent's end of the pod's socket. With `fail_after`, reading fails
/// (as on a connection reset) once that many bytes were read.
struct PodSocket {
    io: DuplexStream,
    seen: Arc<Seen>,
    fail_after: Option<usize>,
    read: usize,
}

impl AsyncRead for PodSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.fail_after.is_some_and(|n| this.read >= n) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n >= ACK_NOW_READ {
            this.seen.large_reads.fetch_add(1, Ordering::SeqCst);
        }
        this.read += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PodSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = ready!(Pin::new(&mut self.io).poll_shutdown(cx));
        self.seen.shutdowns.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(result)
    }
}

impl Reset for PodSocket {
    fn reset(&mut self) {
        self.seen.resets.fetch_add(1, Ordering::SeqCst);
    }
}

impl CloseWrite for PodSocket {
    fn close_write(&self) {
        self.seen.close_writes.fetch_add(1, Ordering::SeqCst);
    }
}

impl AckNow for PodSocket {
    fn ack_now(&self) {
        self.seen.acks.fetch_add(1, Ordering::SeqCst);
    }
}

/// The peer agent's end of the tunnel stream, in two halves that can be
/// driven at once.
struct Peer {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
}

/// Sends `chunks` as flow control allows; `end`: then ends the stream.
async fn peer_send(
    send: &mut h2::SendStream<Bytes>,
    chunks: &[Vec<u8>],
    end: bool,
) -> Result<(), h2::Error> {
    for chunk in chunks {
        let mut data = Bytes::copy_from_slice(chunk);
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(0)) => {}
                Some(Ok(granted)) => {
                    let part = data.split_to(granted.min(data.len()));
                    send.send_data(part, false)?;
                }
                Some(Err(error)) => return Err(error),
                None => panic!("the tunnel stream closed under the peer"),
            }
        }
    }
    if end {
        send.send_data(Bytes::new(), true)?;
    }
    Ok(())
}

/// Reads `n` bytes, or to the end; the end is `Ok` if it was clean.
async fn peer_receive(
    recv: &mut h2::RecvStream,
    n: Option<usize>,
) -> (Vec<u8>, Result<(), h2::Error>) {
    let mut got = Vec::new();
    while n.is_none_or(|n| got.len() < n) {
        match recv.data().await {
            Some(Ok(data)) => {
                got.extend_from_slice(&data);
                let _ = recv.flow_control().release_capacity(data.len());
            }
            Some(Err(error)) => return (got, Err(error)),
            None => break,
        }
    }
    (got, Ok(()))
}

/// A `CONNECT` stream over an in-memory HTTP/2 connection: the agent's end
/// (as the inbound side builds it) and the peer's.
async fn tunnel_pair() -> (TunnelStream, Peer) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let (accepted, agent) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut connection = h2::server::handshake(server_io)
            .await
            .expect("the server's handshake");
        let Some(Ok((request, mut respond))) = connection.accept().await else {
            return;
        };
        let send = respond
            .send_response(http::Response::new(()), false)
            .expect("the response");
        let _ = accepted.send(TunnelStream::new(send, request.into_body()));
        while let Some(Ok(_)) = connection.accept().await {}
    });
    let (send_request, connection) = h2::client::handshake(client_io)
        .await
        .expect("the client's handshake");
    let keep = send_request.clone();
    tokio::spawn(async move {
        let _keep = keep;
        let _ = connection.await;
    });
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("198.18.2.2:80")
        .body(())
        .expect("a request");
    let (response, send) = send_request
        .ready()
        .await
        .expect("a ready connection")
        .send_request(request, false)
        .expect("the request");
    let recv = response.await.expect("the response").into_body();
    (
        agent.await.expect("the accepted stream"),
        Peer { send, recv },
    )
}

type Relay = tokio::task::JoinHandle<io::Result<(u64, u64)>>;

/// A relay between a pod and a peer, ending when `stop` resolves (or never).
/// The pod's pipe holds 4 KiB, so no read reaches [`ACK_NOW_READ`].
async fn start(
    fail_after: Option<usize>,
    stop: impl Future<Output = Stop> + Send + 'static,
) -> (DuplexStream, Peer, Arc<Seen>, Relay) {
    start_with_pipe(4096, fail_after, stop).await
}

async fn start_with_pipe(
    pipe: usize,
    fail_after: Option<usize>,
    stop: impl Future<Output = Stop> + Send + 'static,
) -> (DuplexStream, Peer, Arc<Seen>, Relay) {
    let (agent, peer) = tunnel_pair().await;
    let (pod, socket) = tokio::io::duplex(pipe);
    let seen = Arc::new(Seen::default());
    let socket = PodSocket {
        io: socket,
        seen: Arc::clone(&seen),
        fail_after,
        read: 0,
    };
    let relay = tokio::spawn(relay_tunnel(socket, agent, stop));
    (pod, peer, seen, relay)
}

/// Guards against a hang: a relay that never ends fails the case.
async fn within<F: Future>(future: F) -> Result<F::Output, TestCaseError> {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .map_err(|_| TestCaseError::fail("the relay hung"))
}

async fn relay_result(relay: Relay) -> Result<io::Result<(u64, u64)>, TestCaseError> {
    within(relay)
        .await?
        .map_err(|error| TestCaseError::fail(format!("the relay task: {error}")))
}

fn count(seen: &AtomicUsize) -> usize {
    seen.load(Ordering::SeqCst)
}

#[derive(Debug, Clone, Copy)]
enum HalfClose {
    /// The pod sends and half-closes before the peer sends anything.
    PodFirst,
    /// The peer sends and ends its stream before the pod sends anything.
    PeerFirst,
    /// Both at once.
    Together,
}

#[derive(Debug, Clone, Copy)]
enum Failure {
    /// The peer resets the stream after sending this many of its chunks.
    PeerResets(prop::sample::Index),
    /// Reading the pod's socket fails after this many of its bytes.
    PodFails(prop::sample::Index),
}

fn chunks() -> impl Strategy<Value = Vec<Vec<u8>>> {
    vec(vec(any::<u8>(), 0..3000), 0..24)
}

fn never() -> impl Future<Output = Stop> + Send + 'static {
    std::future::pending()
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn the_relay_carries_both_ways_byte_for_byte_whichever_side_half_closes_first(
        up in chunks(),
        down in chunks(),
        order in prop_oneof![
            Just(HalfClose::PodFirst),
            Just(HalfClose::PeerFirst),
            Just(HalfClose::Together),
        ],
    ) {
        run(async move {
            let (pod, peer, seen, relay) = start(None, never()).await;
            let (mut pod_reads, mut pod_writes) = tokio::io::split(pod);
            let Peer { mut send, mut recv } = peer;
            let pod_sends = async {
                for chunk in &up {
                    pod_writes.write_all(chunk).await?;
                }
                pod_writes.shutdown().await
            };
            let pod_receives = async {
                let mut got = Vec::new();
                pod_reads.read_to_end(&mut got).await.map(|_| got)
            };
            let peer_sends = peer_send(&mut send, &down, true);
            let peer_receives = peer_receive(&mut recv, None);
            let (sent, received_down, peer_sent, (received_up, end)) = within(async {
                match order {
                    HalfClose::PodFirst => {
                        let (sent, up) = tokio::join!(pod_sends, peer_receives);
                        let (peer_sent, down) = tokio::join!(peer_sends, pod_receives);
                        (sent, down, peer_sent, up)
                    }
                    HalfClose::PeerFirst => {
                        let (peer_sent, down) = tokio::join!(peer_sends, pod_receives);
                        let (sent, up) = tokio::join!(pod_sends, peer_receives);
                        (sent, down, peer_sent, up)
                    }
                    HalfClose::Together => {
                        let (sent, up, peer_sent, down) =
                            tokio::join!(pod_sends, peer_receives, peer_sends, pod_receives);
                        (sent, down, peer_sent, up)
                    }
                }
            })
            .await?;
            prop_assert!(sent.is_ok(), "the pod could not send: {:?}", sent);
            prop_assert!(peer_sent.is_ok(), "the peer could not send: {:?}", peer_sent);
            prop_assert!(end.is_ok(), "the pod's FIN reached the peer as {:?}", end);
            prop_assert!(received_up == up.concat(), "the peer got other bytes than the pod sent");
            let received_down = received_down.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(received_down == down.concat(), "the pod got other bytes than the peer sent");
            let lengths = (up.concat().len() as u64, down.concat().len() as u64);
            let result = relay_result(relay).await?;
            prop_assert_eq!(result.map_err(|e| e.kind()), Ok(lengths));
            prop_assert_eq!(count(&seen.resets), 0, "a clean relay reset the pod");
            prop_assert_eq!(count(&seen.shutdowns), 1, "the peer's end reached the pod as no FIN or several");
            prop_assert_eq!(count(&seen.acks), 0, "small reads asked for the ACK now");
            Ok::<(), TestCaseError>(())
        })?;
    }

    #[test]
    fn a_failure_on_either_side_resets_the_other_and_never_ends_it_cleanly(
        up in chunks(),
        down in chunks(),
        failure in prop_oneof![
            any::<prop::sample::Index>().prop_map(Failure::PeerResets),
            any::<prop::sample::Index>().prop_map(Failure::PodFails),
        ],
    ) {
        let (up, down) = (up.concat(), down);
        let fail_after = match failure {
            Failure::PodFails(at) => Some(at.index(up.len() + 1)),
            Failure::PeerResets(_) => None,
        };
        run(async move {
            let (pod, peer, seen, relay) = start(fail_after, never()).await;
            let (mut pod_reads, mut pod_writes) = tokio::io::split(pod);
            let Peer { mut send, mut recv } = peer;
            // The pod sends without half-closing and reads until its socket
            // goes; its writes fail once the relay has dropped it.
            let pod_sends = async {
                let _ = pod_writes.write_all(&up).await;
            };
            let pod_receives = async {
                let mut got = Vec::new();
                let _ = pod_reads.read_to_end(&mut got).await;
                got
            };
            let sent_before_reset = match failure {
                Failure::PeerResets(at) => down[..at.index(down.len() + 1)].concat(),
                Failure::PodFails(_) => Vec::new(),
            };
            let peer_acts = async {
                match failure {
                    Failure::PeerResets(at) => {
                        let _ = peer_send(&mut send, &down[..at.index(down.len() + 1)], false).await;
                        send.send_reset(h2::Reason::CANCEL);
                        None
                    }
                    Failure::PodFails(_) => Some(peer_receive(&mut recv, None).await),
                }
            };
            let ((), received_down, peer_saw, result) = within(async {
                tokio::join!(pod_sends, pod_receives, peer_acts, relay_result(relay))
            })
            .await?;
            let result = result?;
            prop_assert!(result.is_err(), "the relay ended cleanly: {:?}", result);
            prop_assert_eq!(count(&seen.resets), 1, "the pod's socket was not reset once");
            match failure {
                Failure::PeerResets(_) => {
                    prop_assert_eq!(count(&seen.shutdowns), 0, "the peer's reset reached the pod as a FIN");
                    prop_assert!(
                        sent_before_reset.starts_with(&received_down),
                        "the pod got bytes the peer did not send"
                    );
                }
                Failure::PodFails(_) => {
                    let (received_up, end) = peer_saw.expect("the peer read");
                    prop_assert!(end.is_err(), "the pod's failure reached the peer as a clean end");
                    prop_assert!(up.starts_with(&received_up), "the peer got bytes the pod did not send");
                }
            }
            Ok::<(), TestCaseError>(())
        })?;
    }

    #[test]
    fn a_revocation_resets_both_ends_and_the_deadline_closes_them_cleanly(
        up in chunks(),
        down in chunks(),
        revoked in any::<bool>(),
    ) {
        let (up, down) = (up.concat(), down.concat());
        run(async move {
            let (stop_now, stop) = tokio::sync::oneshot::channel::<Stop>();
            let stop = async move { stop.await.unwrap_or(Stop::Deadline) };
            let (pod, peer, seen, relay) = start(None, stop).await;
            let (mut pod_reads, mut pod_writes) = tokio::io::split(pod);
            let Peer { mut send, mut recv } = peer;
            // Bytes flow both ways, neither side ends; then the stop comes.
            let (wrote, (received_up, _)) = within(async {
                tokio::join!(pod_writes.write_all(&up), peer_receive(&mut recv, Some(up.len())))
            })
            .await?;
            prop_assert!(wrote.is_ok() && received_up == up, "the peer did not get the pod's bytes");
            let mut received_down = vec![0; down.len()];
            let (sent, read) = within(async {
                tokio::join!(
                    peer_send(&mut send, std::slice::from_ref(&down), false),
                    pod_reads.read_exact(&mut received_down)
                )
            })
            .await?;
            prop_assert!(sent.is_ok() && read.is_ok() && received_down == down, "the pod did not get the peer's bytes");
            let stop = if revoked { Stop::Revoked("test".to_owned()) } else { Stop::Deadline };
            let _ = stop_now.send(stop);
            let result = relay_result(relay).await?;
            let (rest, end) = within(peer_receive(&mut recv, None)).await?;
            prop_assert!(rest.is_empty(), "the peer got bytes after the stop");
            if revoked {
                prop_assert_eq!(
                    result.map_err(|e| e.kind()),
                    Err(io::ErrorKind::PermissionDenied)
                );
                prop_assert_eq!(count(&seen.resets), 1, "the pod's socket was not reset");
                prop_assert!(end.is_err(), "the peer's stream ended cleanly on a revocation");
            } else {
                let lengths = (up.len() as u64, down.len() as u64);
                prop_assert_eq!(result.map_err(|e| e.kind()), Ok(lengths));
                prop_assert_eq!(count(&seen.resets), 0, "the deadline reset the pod's socket");
                prop_assert_eq!(count(&seen.close_writes), 1, "the deadline sent the pod no FIN");
                prop_assert!(end.is_ok(), "the deadline reset the peer's stream: {:?}", end);
            }
            Ok::<(), TestCaseError>(())
        })?;
    }
}

/// A pod that sends 64 KiB at once gets its ACK asked for after the large
/// read, once per such read: the delayed-ACK stall of a BBR sender.
#[test]
fn a_large_read_from_the_pod_asks_for_the_ack_now() {
    run(async {
        let (mut pod, peer, seen, relay) = start_with_pipe(64 * 1024, None, never()).await;
        let Peer {
            send: _send,
            mut recv,
        } = peer;
        let response = vec![7u8; 64 * 1024];
        // The pipe takes it all before the relay first reads.
        pod.write_all(&response).await.unwrap();
        pod.shutdown().await.unwrap();
        let (received, _end) = peer_receive(&mut recv, None).await;
        assert_eq!(received, response);
        assert!(
            count(&seen.large_reads) >= 1,
            "no read reached {ACK_NOW_READ} bytes"
        );
        assert_eq!(count(&seen.acks), count(&seen.large_reads));
        relay.abort();
    });
}
