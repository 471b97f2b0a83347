//! The certificate manager's metrics: each local identity's expiry, and how
//! attempts to get a certificate (and the calls to the CA) end.

use std::{
    sync::atomic::{AtomicI64, AtomicU64},
    time::{SystemTime, UNIX_EPOCH},
};

use ferry_proto::SpiffeId;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// How one call to the CA ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaResult {
    Ok,
    Error,
    Timeout,
}

impl CaResult {
    fn as_str(self) -> &'static str {
        match self {
            CaResult::Ok => "ok",
            CaResult::Error => "error",
            CaResult::Timeout => "timeout",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Default)]
pub struct IdentityMetrics {
    certificate_expiry: Family<IdentityLabels, Gauge<i64, AtomicI64>>,
    certificate_renewals: Family<ResultLabels, Counter<u64, AtomicU64>>,
    ca_requests: Family<ResultLabels, Counter<u64, AtomicU64>>,
}

impl IdentityMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "NotAfter of each local identity's current certificate, Unix seconds",
            self.certificate_expiry.clone(),
        );
        registry.register(
            "certificate_renewals",
            "Attempts to get a certificate (first or renewal), by result; an error includes a certificate that failed validation",
            self.certificate_renewals.clone(),
        );
        registry.register(
            "ca_requests",
            "Certify calls to the CA, by result",
            self.ca_requests.clone(),
        );
    }

    pub fn certificate_published(&self, identity: &SpiffeId, not_after: SystemTime) {
        let unix = not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.certificate_expiry
            .get_or_create(&IdentityLabels {
                identity: identity.to_string(),
            })
            .set(unix);
    }

    /// The identity left the node: its series goes with it.
    pub fn certificate_dropped(&self, identity: &SpiffeId) {
        self.certificate_expiry.remove(&IdentityLabels {
            identity: identity.to_string(),
        });
    }

    pub fn certificate_attempt(&self, ok: bool) {
        self.certificate_renewals
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn ca_request(&self, result: CaResult) {
        self.ca_requests
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
    }
}
