//! The pool as `/pool` and `/config_dump` show it, merged over the shards.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Dial, Pool};
use crate::tunnel::metrics::PoolTotals;

/// The pool as `/config_dump` shows it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    pub keys: Vec<KeyView>,
    pub totals: PoolTotals,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    pub source: String,
    pub destination: String,
    pub address: SocketAddr,
    pub connections: Vec<ConnectionView>,
    pub dialing: bool,
    pub failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionView {
    pub id: u64,
    pub streams: usize,
    pub age_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
    /// The TLS key exchange group (`X25519MLKEM768`: post-quantum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_exchange: Option<String>,
}

impl<D: Dial> Pool<D> {
    /// This pool as `/pool` shows it.
    pub fn view(&self) -> PoolView {
        merged_view([self])
    }

    /// Each key this pool holds, unsorted.
    fn key_views(&self) -> Vec<KeyView> {
        let now = Instant::now();
        let keys = self.keys.lock().expect("pool lock");
        keys.iter()
            .map(|(key, state)| KeyView {
                source: key.source.to_string(),
                destination: key.destination.to_string(),
                address: key.address,
                connections: state
                    .connections
                    .iter()
                    .map(|c| ConnectionView {
                        id: c.id,
                        streams: c.active,
                        age_ms: millis(now - c.opened),
                        idle_ms: (c.active == 0).then(|| millis(now - c.idle_since)),
                        key_exchange: c.key_exchange.map(str::to_owned),
                    })
                    .collect(),
                dialing: state.dialing.is_some(),
                failures: state.failures,
                last_error: state.last_error.as_ref().map(ToString::to_string),
                retry_in_ms: state
                    .retry_at
                    .filter(|at| *at > now)
                    .map(|at| millis(at - now)),
            })
            .collect()
    }
}

/// One view of the shards' pools (they share their metrics): a key several
/// shards hold is one entry, with every shard's connections.
pub fn merged_view<'a, D: Dial>(pools: impl IntoIterator<Item = &'a Pool<D>>) -> PoolView {
    let mut merged: Vec<KeyView> = Vec::new();
    let mut totals = PoolTotals::default();
    for pool in pools {
        totals = pool.metrics.pool_totals();
        for key in pool.key_views() {
            let same = merged.iter_mut().find(|k| {
                (&k.source, &k.destination, k.address)
                    == (&key.source, &key.destination, key.address)
            });
            match same {
                Some(entry) => {
                    entry.connections.extend(key.connections);
                    entry.dialing |= key.dialing;
                    entry.failures = entry.failures.max(key.failures);
                    entry.last_error = entry.last_error.take().or(key.last_error);
                    entry.retry_in_ms = entry.retry_in_ms.max(key.retry_in_ms);
                }
                None => merged.push(key),
            }
        }
    }
    merged.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
    PoolView {
        keys: merged,
        totals,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
