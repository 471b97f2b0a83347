//! Spreading accepted connections over the shards.
//!
//! Every shard waits on the same listening sockets, and whichever shard the
//! kernel wakes first accepts whatever is queued. That is not a balance: a
//! shard already running drains a burst of connects, and the few tunnel
//! connections a peer agent opens may all land on one shard, so one thread
//! carries a node's traffic while the others idle. So each accepted
//! connection goes to the shard that carries the fewest connections from
//! that listener (the accepting one on a tie, which is every connection when
//! connections come one at a time): the socket is moved to that shard's
//! reactor once, at accept, and from then on it lives on that thread like
//! any other (Envoy's "exact balance" of connections between workers).

use std::{future::Future, io, net::SocketAddr, sync::Arc};

use futures_util::FutureExt as _;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

/// Which of the agent's listening sockets a connection arrived on.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `outbound` (captured pod connections) or `tunnel` (other agents).
    pub listener: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabels {
    listener: &'static str,
    shard: usize,
}

/// How the connections are spread, in `/metrics`: what each shard carries
/// and how many connections were moved at accept.
#[derive(Default)]
pub struct SpreadMetrics {
    connections: Family<ShardLabels, Gauge>,
    handed: Family<ListenerLabels, Counter>,
}

impl SpreadMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "shard_connections",
            "Connections each shard (data-path thread) carries, by the listener they arrived on",
            self.connections.clone(),
        );
        registry.register(
            "shard_handoffs",
            "Connections accepted by one shard and handed to a less loaded one",
            self.handed.clone(),
        );
    }
}

/// The connections each shard carries from one kind of listener, and the
/// way to hand a shard a connection another accepted.
pub struct Spread {
    loads: Box<[Gauge]>,
    handed: Counter,
    inboxes: Box<[mpsc::UnboundedSender<Handed>]>,
}

/// A connection accepted by one shard for another.
struct Handed {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    load: Load,
}

impl Handed {
    /// Registers the connection with the calling shard's reactor (counted as
    /// handed over); one that cannot be is closed, and said so.
    fn register(self) -> Option<Taken> {
        match TcpStream::from_std(self.stream) {
            Ok(stream) => {
                self.load.spread.handed.inc();
                Some(Taken {
                    stream,
                    peer: self.peer,
                    load: self.load,
                })
            }
            Err(error) => {
                tracing::warn!(%error, peer = %self.peer, "a connection another shard accepted could not be registered here; closing it");
                None
            }
        }
    }
}

/// A connection counted against a shard until it is dropped.
pub struct Load {
    spread: Arc<Spread>,
    shard: usize,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.spread.loads[self.shard].dec();
    }
}

/// One shard's handle on a listening socket the shards share: its own
/// descriptor for its own reactor, and its inbox of connections the other
/// shards accepted for it.
pub struct SharedListener {
    listener: std::net::TcpListener,
    shard: usize,
    spread: Arc<Spread>,
    inbox: mpsc::UnboundedReceiver<Handed>,
}

/// A handle per shard on each of `listeners` (all of one kind, `listener`
/// in the metrics): `[shard][listener]`. The shards' loads count every
/// listener of the kind together.
pub fn share(
    listeners: &[std::net::TcpListener],
    shards: usize,
    listener: &'static str,
    metrics: &SpreadMetrics,
) -> io::Result<Vec<Vec<SharedListener>>> {
    let mut per_shard: Vec<Vec<SharedListener>> = (0..shards).map(|_| Vec::new()).collect();
    for one in listeners {
        let (spread, inboxes) = Spread::new(shards, listener, metrics);
        for ((shard, inbox), mine) in inboxes.into_iter().enumerate().zip(&mut per_shard) {
            mine.push(SharedListener {
                listener: one.try_clone()?,
                shard,
                spread: Arc::clone(&spread),
                inbox,
            });
        }
    }
    Ok(per_shard)
}

impl Spread {
    fn new(
        shards: usize,
        listener: &'static str,
        metrics: &SpreadMetrics,
    ) -> (Arc<Self>, Vec<mpsc::UnboundedReceiver<Handed>>) {
        let (senders, receivers): (Vec<_>, _) =
            (0..shards).map(|_| mpsc::unbounded_channel()).unzip();
        let spread = Self {
            loads: (0..shards)
                .map(|shard| {
                    let labels = ShardLabels { listener, shard };
                    metrics.connections.get_or_create(&labels).clone()
                })
                .collect(),
            handed: metrics
                .handed
                .get_or_create(&ListenerLabels { listener })
                .clone(),
            inboxes: senders.into_boxed_slice(),
        };
        (Arc::new(spread), receivers)
    }

    /// Counts a connection `here` accepted against the shard that carries
    /// the fewest, `here` on a tie. Two shards placing at the same instant
    /// may both pick the same one; the next placement evens it out.
    fn place(self: &Arc<Self>, here: usize) -> Load {
        let mut shard = here;
        let mut least = self.loads[here].get();
        for (index, load) in self.loads.iter().enumerate() {
            let load = load.get();
            if load < least {
                (shard, least) = (index, load);
            }
        }
        self.count(shard)
    }

    fn count(self: &Arc<Self>, shard: usize) -> Load {
        self.loads[shard].inc();
        Load {
            spread: Arc::clone(self),
            shard,
        }
    }
}

/// Why a connection accepted for another shard could not be handed over.
enum Unhanded {
    /// The other shard has stopped taking connections: carry it here.
    Stopped(TcpStream, SocketAddr),
    /// The socket could not leave this shard's reactor; it is closed.
    Lost(io::Error),
}

impl SharedListener {
    /// Registers this handle with the calling shard's reactor.
    pub fn accept_on_this_shard(self) -> io::Result<Accepting> {
        Ok(Accepting {
            listener: TcpListener::from_std(self.listener)?,
            shard: self.shard,
            spread: self.spread,
            inbox: self.inbox,
        })
    }
}

/// A shard's end of a shared listening socket, on its reactor.
pub struct Accepting {
    listener: TcpListener,
    shard: usize,
    spread: Arc<Spread>,
    inbox: mpsc::UnboundedReceiver<Handed>,
}

/// A connection this shard carries, with where it came from.
pub struct Taken {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub load: Load,
}

impl Accepting {
    /// The next connection this shard carries: one it accepted and is the
    /// least loaded for, or one another shard accepted for it. A connection
    /// accepted for another shard is handed over here, so this only returns
    /// what is this shard's own.
    pub async fn next(&mut self) -> io::Result<Taken> {
        loop {
            let (stream, peer) = tokio::select! {
                Some(handed) = self.inbox.recv() => match handed.register() {
                    Some(taken) => return Ok(taken),
                    None => continue,
                },
                accepted = self.listener.accept() => accepted?,
            };
            let load = self.spread.place(self.shard);
            if load.shard == self.shard {
                return Ok(Taken { stream, peer, load });
            }
            match self.hand(stream, peer, load) {
                Ok(()) => {}
                Err(Unhanded::Stopped(stream, peer)) => {
                    let load = self.spread.count(self.shard);
                    return Ok(Taken { stream, peer, load });
                }
                Err(Unhanded::Lost(error)) => {
                    tracing::warn!(%error, %peer, "a connection accepted for another shard could not leave this one; closing it");
                }
            }
        }
    }

    fn hand(&self, stream: TcpStream, peer: SocketAddr, load: Load) -> Result<(), Unhanded> {
        let shard = load.shard;
        let stream = stream.into_std().map_err(Unhanded::Lost)?;
        self.spread.inboxes[shard]
            .send(Handed { stream, peer, load })
            .map_err(
                // The load counted on the stopped shard drops with `handed`.
                |mpsc::error::SendError(handed)| match TcpStream::from_std(handed.stream) {
                    Ok(stream) => Unhanded::Stopped(stream, handed.peer),
                    Err(error) => Unhanded::Lost(error),
                },
            )
    }

    /// Stops taking connections from the other shards, and passes each one
    /// they handed over before that to `carry`: a connection accepted is
    /// carried, even by a shard that has stopped accepting.
    pub fn close(mut self, mut carry: impl FnMut(Taken)) {
        self.inbox.close();
        while let Ok(handed) = self.inbox.try_recv() {
            if let Some(taken) = handed.register() {
                carry(taken);
            }
        }
    }
}

/// Spawns `carry` for a connection, counted against its shard until it ends.
///
/// `map` keeps `load` beside the future: an `async` block that awaited
/// `carry` would hold it twice (once captured, once being awaited), and a
/// relay's future is several KiB; that cost 3.3 KiB per idle connection.
pub fn spawn_counted<Fut>(load: Load, carry: Fut)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(carry.map(move |()| drop(load)));
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        io::Read as _,
        sync::{Mutex, mpsc as std_mpsc},
        time::Duration,
    };

    use super::*;

    #[test]
    fn a_connection_goes_to_the_least_loaded_shard_and_here_on_a_tie() {
        let metrics = SpreadMetrics::default();
        let (spread, _inboxes) = Spread::new(3, "outbound", &metrics);
        let first = spread.place(1);
        assert_eq!(first.shard, 1, "a tie stays where it was accepted");
        let second = spread.place(1);
        assert_eq!(second.shard, 0, "the least loaded shard, lowest first");
        let third = spread.place(1);
        assert_eq!(third.shard, 2);
        drop(second);
        assert_eq!(
            spread.place(2).shard,
            0,
            "a closed connection frees its shard"
        );
        let loads: Vec<_> = spread.loads.iter().map(Gauge::get).collect();
        assert_eq!(loads, [0, 1, 1], "the dropped placements are uncounted");
        assert_eq!(
            metrics
                .connections
                .get_or_create(&ShardLabels {
                    listener: "outbound",
                    shard: 2
                })
                .get(),
            1,
            "/metrics shows each shard's load"
        );
    }

    /// A shard that stops accepting still carries what was handed to it,
    /// and a hand-off after that stays with the shard that accepted it.
    #[tokio::test]
    async fn no_handed_connection_is_lost_when_a_shard_stops() {
        let metrics = SpreadMetrics::default();
        let (spread, mut inboxes) = Spread::new(2, "outbound", &metrics);
        let listeners = [(); 2].map(|()| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            listener
        });
        let addr = listeners[0].local_addr().unwrap();
        let mut shard = 0;
        let [zero, one] = listeners.map(|listener| {
            shard += 1;
            SharedListener {
                shard: shard - 1,
                listener,
                spread: Arc::clone(&spread),
                inbox: inboxes.remove(0),
            }
        });
        let mut zero = zero.accept_on_this_shard().unwrap();
        let one = one.accept_on_this_shard().unwrap();

        // Shard 1 is busier, then frees up: shard 0 hands it the next one.
        let busy = spread.count(1);
        let _first = std::net::TcpStream::connect(addr).unwrap();
        let kept = tokio::time::timeout(Duration::from_secs(5), zero.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kept.load.shard, 0);
        drop(busy);
        let _second = std::net::TcpStream::connect(addr).unwrap();
        let next = tokio::time::timeout(Duration::from_millis(200), zero.next()).await;
        assert!(next.is_err(), "the connection was handed over, not kept");

        let mut carried = Vec::new();
        one.close(|taken| carried.push(taken));
        assert_eq!(
            carried.len(),
            1,
            "the handed connection is carried at close"
        );
        assert_eq!(carried[0].load.shard, 1);

        // Both shards now carry one; shard 1's inbox is closed.
        drop(kept);
        let _third = std::net::TcpStream::connect(addr).unwrap();
        let stayed = tokio::time::timeout(Duration::from_secs(5), zero.next())
            .await
            .expect("a hand-off to a stopped shard is not lost")
            .unwrap();
        assert_eq!(stayed.load.shard, 0, "carried where it was accepted");
    }

    /// Shard 0 accepts every connection (shard 1's own descriptor is on a
    /// socket nobody dials), so every other one must move to shard 1's
    /// thread and be carried there.
    #[test]
    fn connections_one_shard_accepted_are_carried_by_both() {
        let dialled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        dialled.set_nonblocking(true).unwrap();
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        unused.set_nonblocking(true).unwrap();
        let addr = dialled.local_addr().unwrap();
        let metrics = SpreadMetrics::default();
        let (spread, mut inboxes) = Spread::new(2, "outbound", &metrics);
        let handles = [dialled, unused]
            .into_iter()
            .enumerate()
            .map(|(shard, listener)| SharedListener {
                listener,
                shard,
                spread: Arc::clone(&spread),
                inbox: inboxes.remove(0),
            });

        let carried_by: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (taken_tx, taken_rx) = std_mpsc::channel();
        for handle in handles {
            let carried_by = Arc::clone(&carried_by);
            let taken_tx = taken_tx.clone();
            std::thread::Builder::new()
                .name(format!("test-shard-{}", handle.shard))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async move {
                        let mut accepting = handle.accept_on_this_shard().unwrap();
                        loop {
                            let taken = accepting.next().await.unwrap();
                            let thread = std::thread::current().name().unwrap().to_owned();
                            *carried_by.lock().unwrap().entry(thread).or_default() += 1;
                            let taken_tx = taken_tx.clone();
                            spawn_counted(taken.load, async move {
                                // Holds the connection until the client closes it.
                                let mut stream = taken.stream;
                                let _ = taken_tx.send(());
                                let mut buf = [0; 1];
                                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                            });
                        }
                    });
                })
                .unwrap();
        }

        let mut clients = Vec::new();
        for _ in 0..16 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            // One at a time: each placement sees the ones before it.
            taken_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        let carried: HashMap<_, _> = carried_by.lock().unwrap().clone();
        assert_eq!(carried.get("test-shard-0"), Some(&8), "{carried:?}");
        assert_eq!(carried.get("test-shard-1"), Some(&8), "{carried:?}");
        let handed = metrics.handed.get_or_create(&ListenerLabels {
            listener: "outbound",
        });
        assert_eq!(handed.get(), 8);
        // The handed connections really live on shard 1: each still open.
        for client in &mut clients {
            client.set_nonblocking(true).unwrap();
            let mut buf = [0; 1];
            let still_open =
                matches!(client.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            assert!(still_open, "a carried connection was closed");
        }
    }
}
