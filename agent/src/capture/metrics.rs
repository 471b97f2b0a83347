//! Capture's metrics: how many of this node's meshed pods have the programs
//! attached, and how attaching fails.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Default)]
pub struct CaptureMetrics {
    captured_pods: Gauge<i64, AtomicI64>,
    failing_pods: Gauge<i64, AtomicI64>,
    attach_failures: Counter<u64, AtomicU64>,
}

impl CaptureMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "captured_pods",
            "Local meshed pods with the capture programs attached",
            self.captured_pods.clone(),
        );
        registry.register(
            "capture_failing_pods",
            "Local meshed pods whose capture failed at the last attempt",
            self.failing_pods.clone(),
        );
        registry.register(
            "capture_attach_failures",
            "Failed attempts to capture a pod (each retry counts)",
            self.attach_failures.clone(),
        );
    }

    /// The outcome of one capture reconcile: pods captured, pods that failed.
    pub fn reconciled(&self, captured: usize, failed: usize) {
        self.captured_pods
            .set(i64::try_from(captured).unwrap_or(i64::MAX));
        self.failing_pods
            .set(i64::try_from(failed).unwrap_or(i64::MAX));
        self.attach_failures
            .inc_by(u64::try_from(failed).unwrap_or(u64::MAX));
    }
}
