//! The balancer's and the pool's choice of connection.

use super::*;

// The balancer (it draws its own random numbers: the properties hold for
// every draw).

fn endpoints(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::from(([10, 244, 0, i as u8], 8080)))
        .collect()
}

/// `loads[i]` connections open to each `candidates[i]`.
fn busy<'b>(
    balancer: &'b Balancer,
    candidates: &[SocketAddr],
    loads: &[usize],
) -> Vec<impl Sized + 'b> {
    candidates
        .iter()
        .zip(loads)
        .flat_map(|(c, &n)| (0..n).map(|_| balancer.start(*c)))
        .collect()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn the_balancer_picks_one_of_the_candidates(loads in vec(0usize..4, 1..16)) {
        let balancer = Balancer::default();
        let candidates = endpoints(loads.len());
        let _open = busy(&balancer, &candidates, &loads);
        for _ in 0..64 {
            let chosen = balancer.choose(&candidates);
            prop_assert!(chosen < candidates.len(), "{} of {}", chosen, candidates.len());
        }
    }

    #[test]
    fn the_balancer_never_picks_a_candidate_busier_than_all_the_others(
        loads in vec(0usize..4, 2..16),
    ) {
        let balancer = Balancer::default();
        let candidates = endpoints(loads.len());
        let _open = busy(&balancer, &candidates, &loads);
        for _ in 0..64 {
            let chosen = balancer.choose(&candidates);
            let others = loads
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != chosen)
                .map(|(_, load)| *load)
                .max()
                .expect("two candidates or more");
            prop_assert!(loads[chosen] <= others, "picked {} of loads {:?}", chosen, loads);
        }
    }

    #[test]
    fn the_balancer_spreads_over_candidates_whose_connections_closed(
        loads in vec(0usize..4, 1..8),
    ) {
        let balancer = Balancer::default();
        let candidates = endpoints(loads.len());
        let open = busy(&balancer, &candidates, &loads);
        drop(open);
        // All idle: each pick is uniform, so a candidate is missed in 100 × n
        // picks with a chance under e^-100.
        let mut picks = vec![0usize; candidates.len()];
        for _ in 0..100 * candidates.len() {
            picks[balancer.choose(&candidates)] += 1;
        }
        prop_assert!(picks.iter().all(|&p| p > 0), "loads {:?}, picks {:?}", loads, picks);
    }
}

// The pool's choice of connection, over in-memory HTTP/2 peers.

/// Dials an in-process HTTP/2 server over a pipe; it accepts and never closes.
struct Pipes;

impl Dial for Pipes {
    type Io = DuplexStream;

    async fn dial(&self, _key: &PoolKey) -> Result<DuplexStream, DialError> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let Ok(mut connection) = h2::server::handshake(server).await else {
                return;
            };
            while let Some(Ok(_)) = connection.accept().await {}
        });
        Ok(client)
    }
}

#[derive(Debug, Clone)]
enum PoolOp {
    Checkout,
    /// Drops one of the held checkouts (any, if one is held).
    Release(prop::sample::Index),
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn a_checkout_takes_the_first_connection_with_room_and_dials_only_when_all_are_full(
        max in 1usize..5,
        ops in vec(
            prop_oneof![
                3 => Just(PoolOp::Checkout),
                2 => any::<prop::sample::Index>().prop_map(PoolOp::Release),
            ],
            1..40,
        ),
    ) {
        run(async move {
            let config = PoolConfig {
                max_streams_per_connection: max,
                idle_timeout: Duration::from_secs(3600),
                keepalive_interval: Duration::from_secs(3600),
                ..PoolConfig::default()
            };
            let pool = Pool::new(config, Pipes, Arc::default());
            let key = PoolKey {
                source: "spiffe://cluster.local/ns/a/sa/client".parse().expect("an id"),
                destination: "spiffe://cluster.local/ns/b/sa/server".parse().expect("an id"),
                address: SocketAddr::from(([198, 19, 0, 2], TUNNEL_PORT)),
            };
            // Streams on each connection, in the pool's order.
            let mut model: Vec<usize> = Vec::new();
            let mut held = Vec::new();
            for op in ops {
                match op {
                    PoolOp::Checkout => {
                        let at = match model.iter().position(|&streams| streams < max) {
                            Some(at) => at,
                            None => {
                                model.push(0);
                                model.len() - 1
                            }
                        };
                        model[at] += 1;
                        let checkout = pool
                            .checkout(&key)
                            .await
                            .map_err(|error| TestCaseError::fail(error.to_string()))?;
                        let ids: Vec<u64> = pool.view().keys[0]
                            .connections
                            .iter()
                            .map(|c| c.id)
                            .collect();
                        prop_assert_eq!(
                            ids.get(at),
                            Some(&checkout.connection_id()),
                            "streams {:?}, ids {:?}", model, ids
                        );
                        held.push((checkout, at));
                    }
                    PoolOp::Release(index) => {
                        if !held.is_empty() {
                            let (checkout, at) = held.swap_remove(index.index(held.len()));
                            drop(checkout);
                            model[at] -= 1;
                        }
                    }
                }
                let streams: Vec<usize> = pool
                    .view()
                    .keys
                    .first()
                    .map(|k| k.connections.iter().map(|c| c.streams).collect())
                    .unwrap_or_default();
                prop_assert_eq!(&streams, &model);
            }
            Ok::<(), TestCaseError>(())
        })?;
    }
}
