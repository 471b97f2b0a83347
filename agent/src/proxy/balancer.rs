//! Choosing among a Service's endpoints: the less busy of two picked at
//! random (power of two choices), counting this agent's open connections to
//! each. Shared by every shard.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

/// Picks a Service endpoint: the less busy of two chosen at random (power of
/// two choices), counting the connections this agent has open to each.
#[derive(Debug, Default)]
pub struct Balancer {
    active: Mutex<HashMap<SocketAddr, usize>>,
}

impl Balancer {
    pub fn choose(&self, candidates: &[SocketAddr]) -> usize {
        if candidates.len() < 2 {
            return 0;
        }
        let n = candidates.len();
        let a = random_below(n);
        let b = (a + 1 + random_below(n - 1)) % n;
        let active = self.active.lock().expect("balancer lock");
        let load = |i: usize| active.get(&candidates[i]).copied().unwrap_or(0);
        if load(b) < load(a) { b } else { a }
    }

    /// Counts a connection to `target` until the guard drops.
    pub fn start(&self, target: SocketAddr) -> ActiveGuard<'_> {
        *self
            .active
            .lock()
            .expect("balancer lock")
            .entry(target)
            .or_default() += 1;
        ActiveGuard {
            balancer: self,
            target,
        }
    }
}

/// Holds one connection's place in the count.
pub struct ActiveGuard<'a> {
    balancer: &'a Balancer,
    target: SocketAddr,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        let mut active = self.balancer.active.lock().expect("balancer lock");
        if let Some(count) = active.get_mut(&self.target) {
            *count -= 1;
            if *count == 0 {
                active.remove(&self.target);
            }
        }
    }
}

fn random_below(n: usize) -> usize {
    ((crate::backoff::jitter_sample() * n as f64) as usize).min(n - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 244, 1, i], 8080)))
            .collect()
    }

    #[test]
    fn of_two_endpoints_the_balancer_picks_the_less_busy_one() {
        let balancer = Balancer::default();
        let endpoints = endpoints(2);
        let busy = [
            balancer.start(endpoints[0]),
            balancer.start(endpoints[0]),
            balancer.start(endpoints[1]),
        ];
        for _ in 0..1_000 {
            assert_eq!(
                balancer.choose(&endpoints),
                1,
                "picked the endpoint with two open connections over the one with one"
            );
        }

        drop(busy);
        let mut picks = [0; 2];
        for _ in 0..1_000 {
            picks[balancer.choose(&endpoints)] += 1;
        }
        // Equal loads: each is picked half the time, 500 of 1,000 with a
        // standard deviation of ~16; under 250 is ~16 deviations away.
        assert!(
            picks.iter().all(|&p| p > 250),
            "with their connections closed the endpoints were not shared evenly: {picks:?}"
        );
    }

    #[test]
    fn an_idle_endpoint_among_busy_ones_gets_most_connections() {
        let balancer = Balancer::default();
        let endpoints = endpoints(3);
        let _busy = [balancer.start(endpoints[0]), balancer.start(endpoints[2])];
        let idle = (0..3_000)
            .filter(|_| balancer.choose(&endpoints) == 1)
            .count();
        // The idle endpoint wins whenever it is one of the two sampled: 2/3 of
        // calls, 2,000 of 3,000 with a standard deviation of ~26. Over 1,500 is
        // ~19 deviations below that, and as far above the 1,000 of a uniform pick.
        assert!(
            idle > 1_500,
            "the idle endpoint got {idle} of 3,000 picks; the less busy of two should give it about 2,000"
        );
    }
}
