//! The pool of mTLS tunnel connections to other agents.
//!
//! Keyed by (source identity, destination identity, destination agent
//! address): every pod of one ServiceAccount on this node shares the same
//! warm connections to a destination, and each connection carries many
//! HTTP/2 streams. For each key at most one dial is in flight; callers that
//! find no room wait on that key's dial alone, and the pool's lock is never
//! held across a handshake. A failed dial backs the key off; idle
//! connections close after a timeout; keepalive pings find dead peers.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bytes::Bytes;
use ferry_proto::{SpiffeId, Untrusted};
use h2::client::SendRequest;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
    time::Instant,
};

mod view;

pub use view::{ConnectionView, KeyView, PoolView, merged_view};

use super::{
    metrics::{PoolClose, Side, TunnelMetrics},
    wire,
};
use crate::backoff::{Backoff, jitter_sample};

/// What one pooled connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub destination: SpiffeId,
    /// The destination node's inbound tunnel address.
    pub address: SocketAddr,
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} at {}",
            self.source, self.destination, self.address
        )
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams one connection carries before the pool opens another.
    pub max_streams_per_connection: usize,
    /// A connection with no streams for this long is closed.
    pub idle_timeout: Duration,
    /// How often an idle-or-busy connection is pinged, and how long a pong may take.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// How long a dial (TCP + TLS + HTTP/2 preface) may take.
    pub dial_timeout: Duration,
    /// Delay before a key whose dial failed is dialled again.
    pub backoff: Backoff,
    /// The same, when the peer's node refused the TCP connection (no agent
    /// listens: it is restarting). A refusal costs the peer one RST, so the
    /// key is retried sooner: a restarted agent is reached within this
    /// backoff's ceiling of starting.
    pub refused_backoff: Backoff,
}

pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: usize = 100;
/// New connections that may vanish under one checkout before it gives up.
const MAX_DIAL_ROUNDS: usize = 3;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(10),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            refused_backoff: Backoff::new(Duration::from_millis(50), Duration::from_millis(500)),
        }
    }
}

/// Opens the transport under a pooled connection: TCP and the TLS handshake
/// with the source's certificate, checking the destination's identity.
pub trait Dial: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn dial(&self, key: &PoolKey) -> impl Future<Output = Result<Self::Io, DialError>> + Send;

    /// The key exchange group the transport's handshake negotiated, if it
    /// has one (`/pool` and `ferry_tunnel_key_exchanges_total` show it).
    fn key_exchange(_io: &Self::Io) -> Option<&'static str> {
        None
    }
}

/// Why a key could not get a new connection.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no certificate yet for {0}")]
    NoCertificate(SpiffeId),
    #[error("{0} has no valid TLS server name")]
    ServerName(SpiffeId),
    #[error("connect to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {address}: {source}")]
    Tls {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake: {0}")]
    Http2(h2::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the dial was abandoned")]
    Abandoned,
    /// A new connection closed before it carried a stream: as good as a failed dial.
    #[error("the peer closed a new connection: {0}")]
    ClosedNew(String),
}

impl DialError {
    /// The peer's node answered the connect with a reset: nothing listens there.
    pub fn is_refused(&self) -> bool {
        matches!(self, DialError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("tunnel to {key} failed: {error}")]
    Dial { key: String, error: Arc<DialError> },
    #[error("tunnel to {key} failed: {vanished} new connections closed before carrying a stream")]
    Vanished { key: String, vanished: usize },
    #[error("tunnel to {key} is backing off for {remaining:?} after: {last_error}")]
    BackingOff {
        key: String,
        remaining: Duration,
        last_error: Arc<DialError>,
    },
}

/// How the dial a caller waited on ended.
type DialOutcome = Result<(), Arc<DialError>>;

pub struct Pool<D: Dial> {
    config: PoolConfig,
    dialer: D,
    keys: Mutex<HashMap<PoolKey, KeyState>>,
    metrics: Arc<TunnelMetrics>,
}

#[derive(Default)]
struct KeyState {
    connections: Vec<Connection>,
    /// Set while a dial for this key is in flight; callers wait on it.
    dialing: Option<watch::Receiver<Option<DialOutcome>>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<Arc<DialError>>,
}

struct Connection {
    id: u64,
    send: SendRequest<Bytes>,
    active: usize,
    /// Streams it has carried; one that closes having carried none counts as a failed dial.
    served: u64,
    opened: Instant,
    idle_since: Instant,
    key_exchange: Option<&'static str>,
}

/// A stream slot on a pooled connection; gives the slot back when dropped.
pub struct Checkout<D: Dial> {
    pub send: SendRequest<Bytes>,
    pool: Weak<Pool<D>>,
    key: PoolKey,
    connection: u64,
}

impl<D: Dial> Checkout<D> {
    /// The connection could not open a stream: it is dropped from the pool so
    /// the next checkout dials afresh.
    pub fn broken(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.remove(&self.key, self.connection, PoolClose::Broken, "broken");
        }
    }

    pub fn connection_id(&self) -> u64 {
        self.connection
    }
}

impl<D: Dial> Drop for Checkout<D> {
    fn drop(&mut self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let mut keys = pool.keys.lock().expect("pool lock");
        let Some(state) = keys.get_mut(&self.key) else {
            return;
        };
        if let Some(connection) = state
            .connections
            .iter_mut()
            .find(|c| c.id == self.connection)
        {
            connection.active -= 1;
            if connection.active == 0 {
                connection.idle_since = Instant::now();
            }
        }
    }
}

impl<D: Dial> Pool<D> {
    /// Creates the pool and its idle reaper, which ends when the pool is dropped.
    pub fn new(config: PoolConfig, dialer: D, metrics: Arc<TunnelMetrics>) -> Arc<Self> {
        let pool = Arc::new(Self {
            config,
            dialer,
            keys: Mutex::default(),
            metrics,
        });
        tokio::spawn(reap_idle(Arc::downgrade(&pool)));
        pool
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// A stream slot on a connection for `key`, dialling one if none has room.
    pub async fn checkout(self: &Arc<Self>, key: &PoolKey) -> Result<Checkout<D>, PoolError> {
        // A new connection can close before our turn comes; a peer that keeps
        // doing that gets a few rounds, then the error (and backoff).
        let mut vanished = 0;
        loop {
            let mut dial = {
                let mut keys = self.keys.lock().expect("pool lock");
                let state = keys.entry(key.clone()).or_default();
                let max = self.config.max_streams_per_connection;
                if let Some(connection) = state.connections.iter_mut().find(|c| c.active < max) {
                    connection.active += 1;
                    connection.served += 1;
                    self.metrics.pool_stream();
                    return Ok(Checkout {
                        send: connection.send.clone(),
                        pool: Arc::downgrade(self),
                        key: key.clone(),
                        connection: connection.id,
                    });
                }
                // A key backs off only after a failure, so both are set.
                if let (Some(retry_at), Some(last_error)) = (state.retry_at, &state.last_error) {
                    let now = Instant::now();
                    if now < retry_at && state.dialing.is_none() {
                        return Err(PoolError::BackingOff {
                            key: key.to_string(),
                            remaining: retry_at - now,
                            last_error: Arc::clone(last_error),
                        });
                    }
                }
                match &state.dialing {
                    Some(dialing) => dialing.clone(),
                    None => {
                        let (done, dialing) = watch::channel(None);
                        state.dialing = Some(dialing.clone());
                        // Its own task: a caller that gives up does not cancel
                        // the dial the other callers wait on.
                        tokio::spawn(Arc::clone(self).dial(key.clone(), done));
                        dialing
                    }
                }
            };
            let outcome = match dial.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone().expect("waited for Some"),
                Err(_) => Err(Arc::new(DialError::Abandoned)),
            };
            if let Err(error) = outcome {
                return Err(PoolError::Dial {
                    key: key.to_string(),
                    error,
                });
            }
            let gone = self
                .keys
                .lock()
                .expect("pool lock")
                .get(key)
                .is_none_or(|state| state.connections.is_empty());
            if gone {
                vanished += 1;
                if vanished >= MAX_DIAL_ROUNDS {
                    return Err(PoolError::Vanished {
                        key: key.to_string(),
                        vanished,
                    });
                }
            }
        }
    }

    async fn dial(self: Arc<Self>, key: PoolKey, done: watch::Sender<Option<DialOutcome>>) {
        let outcome = match tokio::time::timeout(self.config.dial_timeout, self.connect(&key)).await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(DialError::Timeout(self.config.dial_timeout)),
        };
        let reported = {
            let mut keys = self.keys.lock().expect("pool lock");
            let state = keys.entry(key.clone()).or_default();
            state.dialing = None;
            match outcome {
                Ok((id, send, key_exchange)) => {
                    let now = Instant::now();
                    state.connections.push(Connection {
                        id,
                        send,
                        active: 0,
                        served: 0,
                        opened: now,
                        idle_since: now,
                        key_exchange,
                    });
                    if let Some(group) = key_exchange {
                        self.metrics.key_exchange(Side::Client, group);
                    }
                    state.failures = 0;
                    state.retry_at = None;
                    state.last_error = None;
                    self.metrics.handshake(Side::Client, true);
                    self.metrics.pool_connection_opened();
                    tracing::info!(%key, connection = id, "tunnel connection open");
                    Ok(())
                }
                Err(error) => {
                    let error = Arc::new(error);
                    let delay = self.back_off(state, Arc::clone(&error));
                    self.metrics.handshake(Side::Client, false);
                    tracing::warn!(%key, error = %Untrusted(&error), retry_in = ?delay, "tunnel dial failed");
                    Err(error)
                }
            }
        };
        let _ = done.send(Some(reported));
    }

    /// TLS through the dialer, then the HTTP/2 handshake; spawns the task that
    /// drives the connection and pings the peer.
    async fn connect(
        self: &Arc<Self>,
        key: &PoolKey,
    ) -> Result<(u64, SendRequest<Bytes>, Option<&'static str>), DialError> {
        let io = self.dialer.dial(key).await?;
        let key_exchange = D::key_exchange(&io);
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(wire::STREAM_WINDOW)
            .initial_connection_window_size(wire::CONNECTION_WINDOW)
            .max_frame_size(wire::MAX_FRAME_SIZE)
            .max_concurrent_reset_streams(wire::MAX_CONCURRENT_RESET_STREAMS)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(DialError::Http2)?;
        let id = NEXT_CONNECTION_ID.fetch_add(1, relaxed()) + 1;
        let mut ping_pong = connection.ping_pong().expect("ping_pong is taken once");
        let pool = Arc::downgrade(self);
        let key = key.clone();
        let (interval, timeout) = (
            self.config.keepalive_interval,
            self.config.keepalive_timeout,
        );
        tokio::spawn(async move {
            let (close, why) = tokio::select! {
                result = &mut connection => match result {
                    Ok(()) => (PoolClose::Broken, "closed".to_owned()),
                    Err(error) => (PoolClose::Broken, format!("failed: {error}")),
                },
                error = keepalive(&mut ping_pong, interval, timeout) => (PoolClose::Keepalive, error),
            };
            tracing::info!(%key, connection = id, why = %Untrusted(&why), "tunnel connection ended");
            if let Some(pool) = pool.upgrade() {
                pool.remove(&key, id, close, &why);
            }
        });
        Ok((id, send, key_exchange))
    }

    fn remove(&self, key: &PoolKey, id: u64, close: PoolClose, why: &str) {
        let mut keys = self.keys.lock().expect("pool lock");
        let Some(state) = keys.get_mut(key) else {
            return;
        };
        let Some(index) = state.connections.iter().position(|c| c.id == id) else {
            return;
        };
        let removed = state.connections.remove(index);
        let close = if close == PoolClose::Broken && said_goaway(&removed.send) {
            PoolClose::GoAway
        } else {
            close
        };
        self.metrics.pool_connection_closed(close);
        tracing::debug!(%key, connection = id, close = ?close, why = %Untrusted(why), "tunnel connection left the pool");
        // A peer that drains (GOAWAY) did not fail; anything else that ends
        // a connection before it carried a stream is as good as a failed dial.
        if removed.served == 0 && close != PoolClose::GoAway {
            self.back_off(state, Arc::new(DialError::ClosedNew(why.to_owned())));
        }
    }

    /// Counts a failure against the key and schedules its next dial; returns the delay.
    fn back_off(&self, state: &mut KeyState, error: Arc<DialError>) -> Duration {
        // Failures count in a row of one kind: a peer that refused while its
        // agent restarted, then failed a handshake, starts the handshake
        // backoff from its base, not from the refusals' count.
        let same_kind = state
            .last_error
            .as_ref()
            .is_none_or(|last| last.is_refused() == error.is_refused());
        state.failures = if same_kind {
            state.failures.saturating_add(1)
        } else {
            1
        };
        let backoff = if error.is_refused() {
            &self.config.refused_backoff
        } else {
            &self.config.backoff
        };
        let delay = backoff.delay(state.failures, jitter_sample());
        state.retry_at = Some(Instant::now() + delay);
        state.last_error = Some(error);
        delay
    }

    /// Closes connections idle past the timeout; forgets keys with nothing left.
    fn close_idle(&self) {
        let now = Instant::now();
        let mut keys = self.keys.lock().expect("pool lock");
        for (key, state) in keys.iter_mut() {
            state.connections.retain(|c| {
                let idle = c.active == 0 && now - c.idle_since >= self.config.idle_timeout;
                if idle {
                    self.metrics.pool_connection_closed(PoolClose::Idle);
                    tracing::info!(%key, connection = c.id, "closing idle tunnel connection");
                }
                !idle
            });
        }
        keys.retain(|_, state| {
            !state.connections.is_empty()
                || state.dialing.is_some()
                || state.retry_at.is_some_and(|at| at > now)
        });
    }
}

/// Connection ids, unique across the shards' pools.
static NEXT_CONNECTION_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether the peer ended this connection with a graceful `GOAWAY` (it
/// drains: an agent being replaced), as the handle's next stream would be
/// refused; checked without waiting.
fn said_goaway(send: &SendRequest<Bytes>) -> bool {
    use futures_util::FutureExt as _;
    match send.clone().ready().now_or_never() {
        Some(Err(error)) => {
            error.is_go_away() && error.is_remote() && error.reason() == Some(h2::Reason::NO_ERROR)
        }
        _ => false,
    }
}

/// Pings the peer every `interval`; returns why it stopped answering.
async fn keepalive(ping_pong: &mut h2::PingPong, interval: Duration, timeout: Duration) -> String {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(error)) => return format!("keepalive ping failed: {error}"),
            Err(_) => return format!("peer did not answer a keepalive ping within {timeout:?}"),
        }
    }
}

async fn reap_idle<D: Dial>(pool: Weak<Pool<D>>) {
    let period = match pool.upgrade() {
        Some(pool) => (pool.config.idle_timeout / 4).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        match pool.upgrade() {
            Some(pool) => pool.close_idle(),
            None => return,
        }
    }
}

fn relaxed() -> std::sync::atomic::Ordering {
    std::sync::atomic::Ordering::Relaxed
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::DuplexStream;

    use super::*;

    /// Dials an in-process HTTP/2 server over a pipe, counting dials; fails
    /// while `failing` is set.
    #[derive(Default)]
    struct PipeDialer {
        dials: AtomicUsize,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
        failing: std::sync::atomic::AtomicBool,
        /// Servers close (GOAWAY) after their first stream when set.
        goaway: std::sync::atomic::AtomicBool,
        /// The next server says GOAWAY before any stream (a draining agent).
        goaway_next_at_once: std::sync::atomic::AtomicBool,
        /// Servers hang once set: the pipe stays open but nothing reads it.
        hang: watch::Sender<bool>,
    }

    impl Dial for Arc<PipeDialer> {
        type Io = DuplexStream;

        async fn dial(&self, key: &PoolKey) -> Result<DuplexStream, DialError> {
            self.dials.fetch_add(1, Ordering::SeqCst);
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            // A handshake takes a while, so concurrent callers pile up on it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(DialError::Connect {
                    address: key.address,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                });
            }
            let (client, server) = tokio::io::duplex(64 * 1024);
            let goaway = self.goaway.load(Ordering::SeqCst);
            let goaway_at_once = self.goaway_next_at_once.swap(false, Ordering::SeqCst);
            let mut hang = self.hang.subscribe();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(server).await else {
                    return;
                };
                if goaway_at_once {
                    connection.graceful_shutdown();
                }
                loop {
                    tokio::select! {
                        accepted = connection.accept() => {
                            let Some(Ok((_, mut respond))) = accepted else {
                                return;
                            };
                            let _ = respond.send_response(http::Response::new(()), true);
                            if goaway {
                                connection.graceful_shutdown();
                            }
                        }
                        _ = hang.wait_for(|hang| *hang) => break,
                    }
                }
                // Still holds `connection`, so the pipe stays open, but never
                // polls it again: pings go unanswered.
                std::future::pending::<()>().await;
            });
            Ok(client)
        }
    }

    fn key(n: u8) -> PoolKey {
        PoolKey {
            source: "spiffe://cluster.local/ns/a/sa/client".parse().unwrap(),
            destination: "spiffe://cluster.local/ns/b/sa/server".parse().unwrap(),
            address: SocketAddr::from(([198, 19, 0, n], 15008)),
        }
    }

    fn config() -> PoolConfig {
        PoolConfig {
            max_streams_per_connection: 10,
            idle_timeout: Duration::from_secs(30),
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(8)),
            ..PoolConfig::default()
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_dial_per_key() {
        let dialer = Arc::new(PipeDialer::default());
        let pool = Pool::new(config(), Arc::clone(&dialer), Arc::default());
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..25 {
            let pool = Arc::clone(&pool);
            callers.spawn(async move { pool.checkout(&key(2)).await.unwrap() });
        }
        let checkouts = callers.join_all().await;
        // 25 streams at 10 per connection: three connections, dialled one at a time.
        assert_eq!(dialer.dials.load(Ordering::SeqCst), 3);
        assert_eq!(dialer.most_in_flight.load(Ordering::SeqCst), 1);
        let view = pool.view();
        let streams: Vec<usize> = view.keys[0].connections.iter().map(|c| c.streams).collect();
        assert_eq!(streams.iter().sum::<usize>(), 25);
        assert!(streams.iter().all(|s| *s <= 10), "{streams:?}");
        drop(checkouts);
        let view = pool.view();
        assert!(view.keys[0].connections.iter().all(|c| c.streams == 0));
    }

    #[tokio::test]
    async fn keys_do_not_share_connections() {
        let dialer = Arc::new(PipeDialer::default());
        let pool = Pool::new(config(), Arc::clone(&dialer), Arc::default());
        let _a = pool.checkout(&key(2)).await.unwrap();
        let _b = pool.checkout(&key(3)).await.unwrap();
        let _c = pool.checkout(&key(2)).await.unwrap();
        assert_eq!(dialer.dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_dial_backs_the_key_off_then_recovers() {
        let dialer = Arc::new(PipeDialer::default());
        dialer.failing.store(true, Ordering::SeqCst);
        let pool = Pool::new(config(), Arc::clone(&dialer), Arc::default());
        let first = pool.checkout(&key(2)).await.err().unwrap();
        assert!(first.to_string().contains("connection refused"), "{first}");
        let second = pool.checkout(&key(2)).await.err().unwrap();
        assert!(matches!(second, PoolError::BackingOff { .. }), "{second}");
        assert_eq!(dialer.dials.load(Ordering::SeqCst), 1);

        dialer.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        pool.checkout(&key(2)).await.unwrap();
        assert_eq!(dialer.dials.load(Ordering::SeqCst), 2);
        assert_eq!(pool.view().keys[0].failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_after_the_timeout() {
        let dialer = Arc::new(PipeDialer::default());
        let pool = Pool::new(config(), Arc::clone(&dialer), Arc::default());
        drop(pool.checkout(&key(2)).await.unwrap());
        assert_eq!(pool.view().keys[0].connections.len(), 1);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(pool.view().keys[0].connections.len(), 1, "closed too early");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(pool.view().keys.is_empty(), "{:?}", pool.view());
        assert_eq!(pool.view().totals.closed_idle, 1);
        // The next caller dials again.
        pool.checkout(&key(2)).await.unwrap();
        assert_eq!(dialer.dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_drops_a_connection_whose_peer_stops_answering() {
        let interval = Duration::from_secs(2);
        let timeout = Duration::from_secs(1);
        let dialer = Arc::new(PipeDialer::default());
        let pool = Pool::new(
            PoolConfig {
                keepalive_interval: interval,
                keepalive_timeout: timeout,
                ..config()
            },
            Arc::clone(&dialer),
            Arc::default(),
        );
        // Held throughout, so the idle timeout cannot be what closes it.
        let first = pool.checkout(&key(2)).await.unwrap();
        // Half an interval off the ping times, so no sleep ends on a ping's instant.
        tokio::time::sleep(interval * 3 + interval / 2).await;
        assert_eq!(
            pool.view().keys[0].connections.len(),
            1,
            "keepalive closed a connection whose peer answers its pings"
        );

        dialer.hang.send_replace(true);
        // The next ping goes out within an interval and times out after `timeout`.
        tokio::time::sleep(interval + timeout).await;
        let view = pool.view();
        assert!(
            view.keys.first().is_none_or(|k| k.connections.is_empty()),
            "a connection whose peer stopped answering pings stayed in the pool: {view:?}"
        );
        assert_eq!(
            (
                view.totals.closed_keepalive,
                view.totals.closed_broken,
                view.totals.closed_idle
            ),
            (1, 0, 0),
            "the hung connection was not counted as closed by keepalive: {view:?}"
        );

        dialer.hang.send_replace(false);
        let second = pool.checkout(&key(2)).await.unwrap();
        assert_ne!(
            second.connection_id(),
            first.connection_id(),
            "the checkout after the keepalive failure got the dead connection"
        );
        assert_eq!(dialer.dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_shards_pools_show_as_one_with_distinct_connection_ids() {
        let dialer = Arc::new(PipeDialer::default());
        let metrics = Arc::new(TunnelMetrics::default());
        let shards = [
            Pool::new(config(), Arc::clone(&dialer), Arc::clone(&metrics)),
            Pool::new(config(), Arc::clone(&dialer), Arc::clone(&metrics)),
        ];
        let held = [
            shards[0].checkout(&key(2)).await.unwrap(),
            shards[1].checkout(&key(2)).await.unwrap(),
            shards[1].checkout(&key(3)).await.unwrap(),
        ];
        let view = merged_view(shards.iter().map(AsRef::as_ref));
        let addresses: Vec<SocketAddr> = view.keys.iter().map(|k| k.address).collect();
        assert_eq!(
            addresses,
            [key(2).address, key(3).address],
            "one entry per key over both pools: {view:?}"
        );
        let ids: Vec<u64> = view.keys[0].connections.iter().map(|c| c.id).collect();
        assert!(
            ids.len() == 2 && ids[0] != ids[1],
            "the key both pools hold shows each pool's connection, with its own id: {view:?}"
        );
        assert_eq!(
            view.totals.handshakes, 3,
            "totals are the shared metrics': {view:?}"
        );
        drop(held);
    }

    #[tokio::test]
    async fn a_connection_the_peer_drains_at_once_is_redialled_without_backoff() {
        let dialer = Arc::new(PipeDialer::default());
        let pool = Pool::new(config(), Arc::clone(&dialer), Arc::default());
        // Like a connection the old agent accepted an instant before it let
        // go: GOAWAY before any stream, and it closes.
        dialer.goaway_next_at_once.store(true, Ordering::SeqCst);
        let target = SocketAddr::from(([198, 18, 2, 2], 80));
        super::super::client::open(&pool, &key(2), target)
            .await
            .expect("the stream goes to a fresh connection");
        assert_eq!(dialer.dials.load(Ordering::SeqCst), 2);
        let view = pool.view();
        assert_eq!(
            (
                view.keys[0].failures,
                view.keys[0].retry_in_ms,
                view.totals.closed_goaway,
                view.totals.closed_broken
            ),
            (0, None, 1, 0),
            "a peer's GOAWAY is no failure: {view:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_dial_is_retried_sooner_than_a_failed_handshake() {
        let dialer = Arc::new(PipeDialer::default());
        dialer.failing.store(true, Ordering::SeqCst);
        let pool = Pool::new(PoolConfig::default(), Arc::clone(&dialer), Arc::default());
        // Ten refusals in a row: the ceiling of the refused backoff.
        for _ in 0..10 {
            let _ = pool.checkout(&key(2)).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let retry_in = pool.view().keys[0].retry_in_ms;
        assert!(
            retry_in.is_none(),
            "still backing off after 1 s: {retry_in:?}"
        );
        let ceiling = PoolConfig::default().refused_backoff.max;
        assert!(ceiling <= Duration::from_millis(500), "{ceiling:?}");
    }

    #[tokio::test]
    async fn a_connection_the_peer_closes_leaves_the_pool() {
        let dialer = Arc::new(PipeDialer::default());
        dialer.goaway.store(true, Ordering::SeqCst);
        let pool = Pool::new(config(), Arc::clone(&dialer), Arc::default());
        let checkout = pool.checkout(&key(2)).await.unwrap();
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("198.18.2.2:80")
            .body(())
            .unwrap();
        let (response, _) = checkout
            .send
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(request, true)
            .unwrap();
        response.await.unwrap();
        drop(checkout);
        // The peer's GOAWAY ends the connection; the driver removes it.
        for _ in 0..100 {
            if pool
                .view()
                .keys
                .first()
                .is_none_or(|k| k.connections.is_empty())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            pool.view()
                .keys
                .first()
                .is_none_or(|k| k.connections.is_empty())
        );
        dialer.goaway.store(false, Ordering::SeqCst);
        pool.checkout(&key(2)).await.unwrap();
        assert_eq!(dialer.dials.load(Ordering::SeqCst), 2);
    }
}
