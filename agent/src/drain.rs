//! The agent's way out: serving, then draining (no new connections; the
//! established ones keep flowing), then closing (the drain deadline passed:
//! what is left is closed). One watch channel carries the phase to every
//! accept loop, tunnel connection and relay, on every shard's runtime.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Accept nothing new; tell tunnel peers (`GOAWAY`); relay what is open.
    Draining,
    /// Close every connection still open, cleanly where the protocol allows.
    Closing,
}

/// Moves the agent from phase to phase; made once, in the app.
pub struct Drain {
    phase: watch::Sender<Phase>,
    /// Why `/healthz/ready` must say no although the agent serves: it hands
    /// over, or drains.
    not_ready: Mutex<Option<String>>,
    pub metrics: Arc<DrainMetrics>,
}

/// How the agent's way out shows in `/metrics`.
#[derive(Default)]
pub struct DrainMetrics {
    /// 1 while this agent drains.
    pub draining: Gauge,
    /// Connections still open in this draining agent.
    pub connections: Gauge,
    /// Connections this agent closed at its drain deadline.
    pub closed: Counter,
    /// Connections still open in the agent this one took over from.
    pub predecessor_connections: Gauge,
}

impl DrainMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "draining",
            "1 while this agent drains: it accepts nothing new and relays what is open",
            self.draining.clone(),
        );
        registry.register(
            "drain_connections",
            "Connections still open in this draining agent",
            self.connections.clone(),
        );
        registry.register(
            "drain_closed",
            "Connections this agent closed because its drain deadline passed",
            self.closed.clone(),
        );
        registry.register(
            "predecessor_connections",
            "Connections still open in the agent this one took over from, while it drains",
            self.predecessor_connections.clone(),
        );
    }
}

/// What the data path watches: cheap to clone (one per accept loop, tunnel
/// connection and relay).
#[derive(Clone)]
pub struct DrainSignal {
    phase: watch::Receiver<Phase>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl Drain {
    pub fn new(metrics: Arc<DrainMetrics>) -> Self {
        Self {
            phase: watch::Sender::new(Phase::Serving),
            not_ready: Mutex::default(),
            metrics,
        }
    }

    pub fn signal(&self) -> DrainSignal {
        DrainSignal {
            phase: self.phase.subscribe(),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Why the agent must not count as ready although it serves (`None`: no reason).
    pub fn set_not_ready(&self, reason: Option<String>) {
        *self.not_ready.lock().expect("drain lock") = reason;
    }

    pub fn not_ready(&self) -> Option<String> {
        self.not_ready.lock().expect("drain lock").clone()
    }

    /// Moves on to `phase`; never back.
    pub fn enter(&self, phase: Phase) {
        self.phase.send_if_modified(|now| {
            let later = phase > *now;
            if later {
                *now = phase;
            }
            later
        });
    }
}

impl DrainSignal {
    /// A signal that never fires: for code run outside an agent (tests).
    pub fn never() -> Self {
        Drain::default().signal()
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Resolves once the agent reaches `phase` (at once if it has).
    pub async fn reached(mut self, phase: Phase) {
        // `changed` rather than `wait_for`: this future is part of every
        // relay's, and the smaller wait keeps each connection's memory down.
        while *self.phase.borrow_and_update() < phase {
            if self.phase.changed().await.is_err() {
                // The `Drain` is gone, with the app: nothing moves on.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward_and_wake_those_waiting() {
        let drain = Drain::default();
        let draining = tokio::spawn(drain.signal().reached(Phase::Draining));
        let closing = tokio::spawn(drain.signal().reached(Phase::Closing));
        drain.enter(Phase::Draining);
        draining.await.unwrap();
        assert!(!closing.is_finished());
        drain.enter(Phase::Serving);
        assert_eq!(drain.phase(), Phase::Draining);
        drain.enter(Phase::Closing);
        closing.await.unwrap();
        // A late subscriber sees where the agent is.
        drain.signal().reached(Phase::Draining).await;
    }
}
