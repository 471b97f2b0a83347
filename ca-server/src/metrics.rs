//! The CA's Prometheus metrics, served as text on the metrics address.

use std::sync::{
    Mutex,
    atomic::{AtomicI64, AtomicU64},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    issued: Counter<u64, AtomicU64>,
    refused: Family<Reason, Counter<u64, AtomicU64>>,
    issuer_expiry: Gauge<i64, AtomicI64>,
    issuer_reload_failures: Counter<u64, AtomicU64>,
    jwks_keys: Gauge<i64, AtomicI64>,
    jwks_reload_failures: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferry_ca");
        let issued = Counter::default();
        let refused = Family::default();
        let issuer_expiry = Gauge::default();
        let issuer_reload_failures = Counter::default();
        let jwks_keys = Gauge::default();
        let jwks_reload_failures = Counter::default();
        registry.register(
            "certificates_issued",
            "Leaf certificates signed",
            issued.clone(),
        );
        registry.register(
            "requests_refused",
            "Certify requests refused, by reason",
            refused.clone(),
        );
        registry.register(
            "issuer_expiry_timestamp_seconds",
            "NotAfter of the issuing certificate in use, Unix seconds",
            issuer_expiry.clone(),
        );
        registry.register(
            "issuer_reload_failures",
            "Replacement issuer files refused",
            issuer_reload_failures.clone(),
        );
        registry.register(
            "jwks_keys",
            "Token signing keys in use from the JWKS file (0 without --jwks)",
            jwks_keys.clone(),
        );
        registry.register(
            "jwks_reload_failures",
            "Replacement JWKS files refused",
            jwks_reload_failures.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            issued,
            refused,
            issuer_expiry,
            issuer_reload_failures,
            jwks_keys,
            jwks_reload_failures,
        }
    }
}

impl Metrics {
    pub fn issued(&self) {
        self.issued.inc();
    }

    pub fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn issuer_expires_at(&self, unix: i64) {
        self.issuer_expiry.set(unix);
    }

    pub fn issuer_reload_failed(&self) {
        self.issuer_reload_failures.inc();
    }

    pub fn jwks_keys(&self, keys: usize) {
        self.jwks_keys.set(i64::try_from(keys).unwrap_or(i64::MAX));
    }

    pub fn jwks_reload_failed(&self) {
        self.jwks_reload_failures.inc();
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().expect("metrics lock");
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }
}
