//! The mTLS tunnel between agents: HTTP/2 `CONNECT` streams (the HBONE
//! convention, port 15008) over TLS 1.3 with client certificates, pooled per
//! (source identity, destination identity, destination agent).

pub mod client;
pub mod inbound;
pub mod pool;
pub mod stream;
pub mod tls;

use std::sync::Arc;

use ferry_proto::SpiffeId;

use crate::identity::{CertManager, Certifier, Issued};

/// What the tunnel needs from the certificate manager: a local identity's
/// current certificate, key and roots. Read at each handshake, so renewals
/// reach new connections without disturbing live ones.
pub trait Identities: Send + Sync + 'static {
    fn current(&self, identity: &SpiffeId) -> Option<Arc<Issued>>;
}

impl<C: Certifier> Identities for CertManager<C> {
    fn current(&self, identity: &SpiffeId) -> Option<Arc<Issued>> {
        CertManager::current(self, identity)
    }
}
