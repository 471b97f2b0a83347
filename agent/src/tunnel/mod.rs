//! The mTLS tunnel between agents, as it is on the wire: HTTP/2 `CONNECT`
//! streams (the HBONE convention, port 15008) over TLS 1.3 with client
//! certificates, pooled per (source identity, destination identity,
//! destination agent). [`client`] dials and opens streams, [`server`]
//! accepts connections, [`pool`] keeps the client's connections,
//! [`stream`] is one stream as the relay uses it, [`transport`] is the TLS
//! under HTTP/2 once the handshake is done, [`wire`] holds the
//! conventions both ends share. Deciding what to carry is the proxy's job.

pub mod client;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod stream;
pub mod transport;
pub mod wire;

use std::sync::Arc;

use ferry_proto::SpiffeId;

use crate::identity::{CertManager, Certifier, Issued};

/// What the tunnel needs from the certificate manager: a local identity's
/// current certificate with its ready TLS configs. Read at each handshake,
/// so renewals reach new connections without disturbing live ones.
pub trait Identities: Send + Sync + 'static {
    fn current(&self, identity: &SpiffeId) -> Option<Arc<Issued>>;
}

impl<C: Certifier> Identities for CertManager<C> {
    fn current(&self, identity: &SpiffeId) -> Option<Arc<Issued>> {
        CertManager::current(self, identity)
    }
}
