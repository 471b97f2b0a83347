//! The handover socket: a Unix `SOCK_SEQPACKET` socket, so every message is
//! one packet (its JSON and, for [`Message::Sockets`], the listening
//! sockets as `SCM_RIGHTS`) and nothing has to be framed or reassembled.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use nix::{
    errno::Errno,
    sys::socket::{
        self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
        SockType, UnixAddr, sockopt,
    },
};
use serde::{Deserialize, Serialize};
use tokio::io::{Interest, unix::AsyncFd};

use super::HandoverError;

/// What the two agents say. The order is fixed: `Hello` (successor), then
/// `Sockets` or `Refused` (predecessor), `Ready` (successor), `Released`,
/// any number of `Draining`, and `Drained` (predecessor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Message {
    Hello {
        version: u32,
        pid: u32,
    },
    /// The listening sockets, in this order, ride along as `SCM_RIGHTS`.
    Sockets {
        pid: u32,
        sockets: Vec<SocketName>,
    },
    Refused {
        reason: String,
    },
    /// Ready to serve alone: it accepts on the sockets from now on.
    Ready,
    /// The predecessor accepts no more; `connections` are still open in it.
    Released {
        connections: usize,
    },
    Draining {
        connections: usize,
    },
    Drained {
        closed_at_deadline: usize,
    },
}

/// Which of the agent's listening sockets a descriptor is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SocketName {
    pub role: String,
    pub address: String,
}

/// Large enough for any message; the sockets are a handful.
const MAX_MESSAGE: usize = 64 * 1024;
const MAX_SOCKETS: usize = 64;

fn seqpacket() -> Result<OwnedFd, Errno> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// A listening handover socket, bound to a path or inherited.
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
}

impl Listener {
    /// Binds `path`, which must not exist.
    pub fn bind(path: &Path) -> Result<Self, HandoverError> {
        let io = |source: Errno| HandoverError::Bind {
            path: path.to_owned(),
            source: source.into(),
        };
        let fd = seqpacket().map_err(io)?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).map_err(io)?).map_err(io)?;
        socket::listen(&fd, Backlog::new(4).map_err(io)?).map_err(io)?;
        Self::from_fd(fd)
    }

    /// A listening socket a predecessor passed on.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, HandoverError> {
        // SAFETY: an OwnedFd stays open, and its own, until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|error| HandoverError::Io(error.into()))?;
        Ok(Self { fd })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// The next agent that connects, once it proves it runs as this one's user.
    pub async fn accept(&self) -> Result<Channel, HandoverError> {
        let fd = loop {
            let mut ready = self.fd.readable().await.map_err(HandoverError::Io)?;
            match socket::accept4(
                self.fd.get_ref().as_raw_fd(),
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            ) {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(fd) => break unsafe { OwnedFd::from_raw_fd(fd) },
                Err(Errno::EAGAIN) => ready.clear_ready(),
                Err(error) => return Err(HandoverError::Io(error.into())),
            }
        };
        Channel::new(fd)
    }
}

/// One connection between a predecessor and its successor.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    /// Connects to the agent listening on `path`: `Ok(None)` if there is
    /// none (no socket there, or one a crashed agent left).
    pub fn connect(path: &Path) -> Result<Option<Self>, HandoverError> {
        let fd = seqpacket().map_err(|e| HandoverError::Io(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| HandoverError::Io(e.into()))?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => Self::new(fd).map(Some),
            Err(Errno::ENOENT | Errno::ECONNREFUSED) => Ok(None),
            Err(source) => Err(HandoverError::Connect {
                path: path.to_owned(),
                source: source.into(),
            }),
        }
    }

    fn new(fd: OwnedFd) -> Result<Self, HandoverError> {
        // Listening sockets go only to a process of the same user (root, in
        // a DaemonSet): the socket's directory is 0700, and this checks it.
        let peer = socket::getsockopt(&fd, sockopt::PeerCredentials)
            .map_err(|e| HandoverError::Io(e.into()))?;
        let own = nix::unistd::geteuid().as_raw();
        if peer.uid() != own {
            return Err(HandoverError::ForeignPeer {
                uid: peer.uid(),
                pid: peer.pid(),
            });
        }
        // SAFETY: as in `Listener::from_fd`.
        let fd =
            unsafe { AsyncFd::register(fd) }.map_err(|error| HandoverError::Io(error.into()))?;
        Ok(Self { fd })
    }

    /// Sends `message`, with `fds` attached.
    pub async fn send(
        &self,
        message: &Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), HandoverError> {
        let bytes = serde_json::to_vec(message).expect("messages serialize");
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let iov = [IoSlice::new(&bytes)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() {
            &[]
        } else {
            &[ControlMessage::ScmRights(&raw)]
        };
        loop {
            let mut ready = self.fd.writable().await.map_err(HandoverError::Io)?;
            match socket::sendmsg::<()>(
                self.fd.get_ref().as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EAGAIN) => ready.clear_ready(),
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(HandoverError::Closed),
                Err(error) => return Err(HandoverError::Io(error.into())),
            }
        }
    }

    /// The next message and the descriptors that came with it.
    pub async fn recv(&self) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
        let mut buffer = vec![0; MAX_MESSAGE];
        loop {
            let mut ready = self.fd.readable().await.map_err(HandoverError::Io)?;
            let mut cmsg = nix::cmsg_space!([RawFd; MAX_SOCKETS]);
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let received = socket::recvmsg::<()>(
                self.fd.get_ref().as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let (len, fds, truncated) = match received {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for cmsg in msg.cmsgs().map_err(|e| HandoverError::Io(e.into()))? {
                        if let ControlMessageOwned::ScmRights(received) = cmsg {
                            // SAFETY: the kernel installed these descriptors for
                            // this process just now; nothing else owns them.
                            fds.extend(
                                received
                                    .into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                    let truncated = msg
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                    (msg.bytes, fds, truncated)
                }
                Err(Errno::EAGAIN) => {
                    ready.clear_ready();
                    continue;
                }
                Err(Errno::ECONNRESET) => return Err(HandoverError::Closed),
                Err(error) => return Err(HandoverError::Io(error.into())),
            };
            if len == 0 {
                return Err(HandoverError::Closed);
            }
            if truncated {
                return Err(HandoverError::Malformed(
                    "message or descriptors truncated".into(),
                ));
            }
            let message = serde_json::from_slice(&buffer[..len])
                .map_err(|error| HandoverError::Malformed(error.to_string()))?;
            return Ok((message, fds));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    #[tokio::test]
    async fn a_message_carries_a_listening_socket_that_still_accepts() {
        let dir = tempdir();
        let path = dir.join("handover.sock");
        let listener = Listener::bind(&path).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();

        let successor = tokio::spawn({
            let path = path.clone();
            async move {
                let channel = Channel::connect(&path).unwrap().expect("a listener");
                channel
                    .send(&Message::Hello { version: 1, pid: 7 }, &[])
                    .await
                    .unwrap();
                channel.recv().await.unwrap()
            }
        });
        let channel = listener.accept().await.unwrap();
        assert_eq!(
            channel.recv().await.unwrap().0,
            Message::Hello { version: 1, pid: 7 }
        );
        let sockets = Message::Sockets {
            pid: 1,
            sockets: vec![SocketName {
                role: "test".into(),
                address: addr.to_string(),
            }],
        };
        channel.send(&sockets, &[tcp.as_fd()]).await.unwrap();
        let (message, mut fds) = successor.await.unwrap();
        assert_eq!(message, sockets);
        assert_eq!(fds.len(), 1);

        // The original closes; the copy accepts what the kernel queued.
        drop(tcp);
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let copy = std::net::TcpListener::from(fds.remove(0));
        let (mut accepted, _) = copy.accept().unwrap();
        client.write_all(b"x").unwrap();
        let mut byte = [0];
        accepted.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn no_listener_or_a_stale_socket_means_no_predecessor() {
        let dir = tempdir();
        let path = dir.join("handover.sock");
        assert!(Channel::connect(&path).unwrap().is_none());
        // A crashed agent's socket: the path exists, nothing listens.
        drop(Listener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(Channel::connect(&path).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_goes_away_is_reported_as_closed() {
        let dir = tempdir();
        let path = dir.join("handover.sock");
        let listener = Listener::bind(&path).unwrap();
        let channel = Channel::connect(&path).unwrap().unwrap();
        let accepted = listener.accept().await.unwrap();
        drop(channel);
        assert!(matches!(accepted.recv().await, Err(HandoverError::Closed)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferry-handover-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
