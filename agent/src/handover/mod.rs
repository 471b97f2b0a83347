//! Handing the node over from one agent process to the next without a
//! moment in which a connection is refused.
//!
//! Every agent listens on a Unix socket, `<handover dir>/<node>/handover.sock`.
//! A new agent started while another runs (a DaemonSet's surge pod, a
//! restart by hand) connects there first and receives the old agent's
//! listening sockets, the very same ones (`SCM_RIGHTS`): the outbound and
//! tunnel listeners, the admin and probe ports, and the handover socket
//! itself. Nothing is ever unbound, so the kernel's accept queues carry on
//! and nobody is refused. The new agent becomes ready (capture adopted,
//! certificates for every local identity), starts accepting, and says so;
//! only then does the old one stop accepting and drain. See
//! `docs/architecture.md` for why this and not `SO_REUSEPORT`.

mod channel;

use std::{
    collections::HashMap,
    io,
    os::fd::{BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

pub use channel::{Channel, Listener, Message, SocketName};

/// The protocol's version: an agent refuses a successor that speaks another.
pub const VERSION: u32 = 1;

/// Where the agent of `node` listens for its successor.
pub fn socket_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(node).join("handover.sock")
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("cannot make the handover directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot listen for a successor on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot reach the running agent on {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("handover socket: {0}")]
    Io(io::Error),
    #[error("the other agent runs as uid {uid} (pid {pid}), not as this one's user")]
    ForeignPeer { uid: u32, pid: i32 },
    #[error("the other agent went away")]
    Closed,
    #[error("the other agent sent a malformed message: {0}")]
    Malformed(String),
    #[error("the other agent sent {got} where {expected} was due")]
    Unexpected { expected: &'static str, got: String },
    #[error("the running agent refused the handover: {0}")]
    Refused(String),
    #[error("{sockets} sockets announced but {fds} descriptors came")]
    Descriptors { sockets: usize, fds: usize },
}

/// Makes `<dir>/<node>/`, only its owner may enter: whoever can connect to
/// the socket could take the node's listening sockets.
pub fn prepare_dir(dir: &Path, node: &str) -> Result<(), HandoverError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let path = dir.join(node);
    let error = |source| HandoverError::Dir {
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&path)
        .map_err(error)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(error)
}

/// Listens at `path`, replacing a socket a crashed agent left there.
pub fn listen(path: &Path) -> Result<Listener, HandoverError> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "removed the handover socket of an agent that is gone")
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(HandoverError::Bind {
                path: path.to_owned(),
                source,
            });
        }
    }
    Listener::bind(path)
}

/// The running agent this one takes over from, and the sockets it passed.
pub struct Predecessor {
    channel: Channel,
    pub pid: u32,
    sockets: HashMap<SocketName, OwnedFd>,
}

impl Predecessor {
    /// Asks the agent listening at `path` for its sockets; `Ok(None)` when no
    /// agent listens there.
    pub async fn find(path: &Path) -> Result<Option<Self>, HandoverError> {
        let Some(channel) = Channel::connect(path)? else {
            return Ok(None);
        };
        let hello = Message::Hello {
            version: VERSION,
            pid: std::process::id(),
        };
        channel.send(&hello, &[]).await?;
        let (pid, names, fds) = match channel.recv().await? {
            (Message::Sockets { pid, sockets }, fds) => (pid, sockets, fds),
            (Message::Refused { reason }, _) => return Err(HandoverError::Refused(reason)),
            (other, _) => return Err(unexpected("the sockets", &other)),
        };
        if names.len() != fds.len() {
            return Err(HandoverError::Descriptors {
                sockets: names.len(),
                fds: fds.len(),
            });
        }
        Ok(Some(Self {
            channel,
            pid,
            sockets: names.into_iter().zip(fds).collect(),
        }))
    }

    /// The socket the predecessor had for `role` on `address`, if any.
    pub fn take(&mut self, role: &str, address: &str) -> Option<OwnedFd> {
        self.sockets.remove(&SocketName {
            role: role.to_owned(),
            address: address.to_owned(),
        })
    }

    /// Sockets passed that this agent does not use (its arguments differ):
    /// closed here; the predecessor closes its own when it lets go.
    pub fn untaken(&self) -> impl Iterator<Item = &SocketName> {
        self.sockets.keys()
    }

    /// Says this agent serves now; returns once the predecessor accepts no
    /// more, with the connections it still carries.
    pub async fn release(&self) -> Result<usize, HandoverError> {
        self.channel.send(&Message::Ready, &[]).await?;
        match self.channel.recv().await? {
            (Message::Released { connections }, _) => Ok(connections),
            (other, _) => Err(unexpected("released", &other)),
        }
    }

    /// Follows the predecessor's drain, calling `progress` with the
    /// connections still open in it; returns how many it closed at its
    /// deadline.
    pub async fn follow(self, mut progress: impl FnMut(usize)) -> Result<usize, HandoverError> {
        loop {
            match self.channel.recv().await? {
                (Message::Draining { connections }, _) => progress(connections),
                (Message::Drained { closed_at_deadline }, _) => return Ok(closed_at_deadline),
                (other, _) => return Err(unexpected("drain progress", &other)),
            }
        }
    }
}

/// An agent taking over from this one.
pub struct Successor {
    channel: Channel,
    pub pid: u32,
}

impl Successor {
    /// Reads the successor's hello on `channel` and passes it `sockets`.
    pub async fn greet(
        channel: Channel,
        sockets: &[(SocketName, BorrowedFd<'_>)],
    ) -> Result<Self, HandoverError> {
        let pid = match channel.recv().await? {
            (Message::Hello { version, pid }, _) if version == VERSION => pid,
            (Message::Hello { version, pid }, _) => {
                let reason =
                    format!("handover protocol {version} (pid {pid}); this agent speaks {VERSION}");
                let _ = channel
                    .send(
                        &Message::Refused {
                            reason: reason.clone(),
                        },
                        &[],
                    )
                    .await;
                return Err(HandoverError::Refused(reason));
            }
            (other, _) => return Err(unexpected("hello", &other)),
        };
        let (names, fds): (Vec<SocketName>, Vec<BorrowedFd<'_>>) = sockets.iter().cloned().unzip();
        let message = Message::Sockets {
            pid: std::process::id(),
            sockets: names,
        };
        channel.send(&message, &fds).await?;
        Ok(Self { channel, pid })
    }

    /// Refuses an agent that connects while this one cannot hand over.
    pub async fn refuse(channel: Channel, reason: String) {
        let _ = channel.recv().await;
        let _ = channel.send(&Message::Refused { reason }, &[]).await;
    }

    /// Resolves once the successor serves; an error if it went away first.
    pub async fn ready(&self) -> Result<(), HandoverError> {
        match self.channel.recv().await? {
            (Message::Ready, _) => Ok(()),
            (other, _) => Err(unexpected("ready", &other)),
        }
    }

    /// Tells the successor how the drain goes; it may have gone, which
    /// changes nothing here.
    pub async fn tell(&self, message: Message) {
        if let Err(error) = self.channel.send(&message, &[]).await {
            tracing::debug!(%error, "successor no longer follows the drain");
        }
    }
}

fn unexpected(expected: &'static str, got: &Message) -> HandoverError {
    HandoverError::Unexpected {
        expected,
        got: format!("{got:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferry-handover-flow-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        prepare_dir(&dir, "node-1").unwrap();
        dir
    }

    #[tokio::test]
    async fn a_successor_gets_the_sockets_and_the_predecessor_lets_go_when_told() {
        let dir = tempdir();
        let path = socket_path(&dir, "node-1");
        let listener = listen(&path).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap().to_string();
        let old = async {
            let name = SocketName {
                role: "outbound".into(),
                address: addr.clone(),
            };
            let successor =
                Successor::greet(listener.accept().await.unwrap(), &[(name, tcp.as_fd())])
                    .await
                    .unwrap();
            successor.ready().await.unwrap();
            successor.tell(Message::Released { connections: 3 }).await;
            successor.tell(Message::Draining { connections: 1 }).await;
            successor
                .tell(Message::Drained {
                    closed_at_deadline: 1,
                })
                .await;
        };
        let new = async {
            let mut predecessor = Predecessor::find(&path).await.unwrap().expect("one runs");
            assert_eq!(predecessor.pid, std::process::id());
            assert!(predecessor.take("outbound", "127.0.0.1:1").is_none());
            let fd = predecessor
                .take("outbound", &addr)
                .expect("the outbound socket");
            assert_eq!(
                std::net::TcpListener::from(fd)
                    .local_addr()
                    .unwrap()
                    .to_string(),
                addr
            );
            assert_eq!(predecessor.release().await.unwrap(), 3);
            let mut seen = Vec::new();
            let closed = predecessor.follow(|open| seen.push(open)).await.unwrap();
            (seen, closed)
        };
        let ((), (seen, closed)) = tokio::join!(old, new);
        assert_eq!((seen, closed), (vec![1], 1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_successor_of_another_protocol_version_is_refused_and_told_why() {
        let dir = tempdir();
        let path = socket_path(&dir, "node-1");
        let listener = listen(&path).unwrap();
        let old = async { Successor::greet(listener.accept().await.unwrap(), &[]).await };
        let new = async {
            let channel = Channel::connect(&path).unwrap().unwrap();
            let hello = Message::Hello {
                version: VERSION + 1,
                pid: 1,
            };
            channel.send(&hello, &[]).await.unwrap();
            channel.recv().await.unwrap().0
        };
        let (old, new) = tokio::join!(old, new);
        assert!(matches!(old, Err(HandoverError::Refused(_))));
        let Message::Refused { reason } = new else {
            panic!("expected a refusal, got {new:?}");
        };
        assert!(
            reason.contains(&format!("handover protocol {}", VERSION + 1)),
            "{reason}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_handover_directory_is_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempdir();
        let mode = std::fs::metadata(dir.join("node-1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
