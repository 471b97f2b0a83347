//! Keeps the capture programs on exactly this node's meshed pods as the
//! workload table changes, retries pods that failed, and shows the result
//! (for `/config_dump` and readiness).

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ferry_proto::Untrusted;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Attachment, Capture, metrics::CaptureMetrics};
use crate::workload::WorkloadTable;

/// How soon a pod whose capture failed is tried again.
pub const CAPTURE_RETRY: Duration = Duration::from_secs(5);

/// The capture state as last reconciled.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureView {
    pub pin_dir: String,
    pub attached: Vec<Attachment>,
    pub failures: Vec<String>,
}

/// What the keeper last did; read by the admin endpoint.
#[derive(Debug)]
pub struct CaptureStatus {
    view: Mutex<CaptureView>,
    reconciled: AtomicBool,
}

impl CaptureStatus {
    /// The status of a capture that has not reconciled yet.
    pub fn new(capture: &Capture) -> Self {
        Self {
            view: Mutex::new(CaptureView {
                pin_dir: capture.pin_dir().display().to_string(),
                ..CaptureView::default()
            }),
            reconciled: AtomicBool::new(false),
        }
    }

    pub fn view(&self) -> CaptureView {
        self.view.lock().expect("capture status lock").clone()
    }

    /// Why capture keeps the agent from being ready; empty when it does not.
    pub fn not_ready(&self) -> Vec<String> {
        if !self.reconciled.load(Ordering::Acquire) {
            return vec!["pods not captured yet".to_owned()];
        }
        let view = self.view.lock().expect("capture status lock");
        view.failures
            .iter()
            .map(|failure| format!("capture: {failure}"))
            .collect()
    }
}

/// Reconciles `capture` with every table `tables` publishes, until the
/// sender is gone; a failed pod is retried every [`CAPTURE_RETRY`].
pub async fn keep_captured(
    mut capture: Capture,
    mut tables: watch::Receiver<Arc<WorkloadTable>>,
    status: Arc<CaptureStatus>,
    metrics: Arc<CaptureMetrics>,
) {
    loop {
        let table = tables.borrow_and_update().clone();
        let failures: Vec<String> = capture
            .reconcile(
                table
                    .local_meshed()
                    .map(|pod| (pod.as_ref(), table.plaintext(pod))),
            )
            .iter()
            .map(ToString::to_string)
            .collect();
        for failure in &failures {
            tracing::error!(error = %Untrusted(failure), "capture failed; retrying in {CAPTURE_RETRY:?}");
        }
        metrics.reconciled(capture.attachments().count(), failures.len());
        let retry = !failures.is_empty();
        {
            let mut view = status.view.lock().expect("capture status lock");
            view.attached = capture.attachments().cloned().collect();
            view.failures = failures;
        }
        status.reconciled.store(true, Ordering::Release);
        let changed = tables.changed();
        if retry {
            tokio::select! {
                result = changed => if result.is_err() { return },
                () = tokio::time::sleep(CAPTURE_RETRY) => {}
            }
        } else if changed.await.is_err() {
            return;
        }
    }
}

/// Every address of this node's network namespace, and loopback: where a
/// strict pod accepts plaintext connections from (its agent, kubelet probes).
pub fn node_local_addresses() -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = vec![
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    ];
    match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => {
            for interface in interfaces {
                let Some(address) = interface.address else {
                    continue;
                };
                if let Some(v4) = address.as_sockaddr_in() {
                    addresses.push(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = address.as_sockaddr_in6() {
                    addresses.push(IpAddr::V6(v6.ip()));
                }
            }
        }
        Err(error) => {
            tracing::error!(%error, "cannot list this node's addresses; strict pods accept plaintext only from loopback")
        }
    }
    addresses.sort();
    addresses.dedup();
    addresses
}
