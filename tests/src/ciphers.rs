//! The TLS 1.3 cipher suites side by side, for choosing their order: a real
//! rustls client and server (Ferry's provider, a P-256 chain under a test
//! CA, full verification) in one process, connected by memory, each suite
//! carrying the same bytes both ways. It times the record layer (seal and
//! open, framing) without the network, which is what a suite changes.

use std::{
    io::{Read as _, Write as _},
    sync::Arc,
    time::Instant,
};

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
    SupportedCipherSuite,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};

/// What one suite moved, and how fast.
#[derive(Debug, Clone)]
pub struct SuiteRun {
    pub suite: String,
    pub bytes: u64,
    pub seconds: f64,
}

impl SuiteRun {
    pub fn mib_per_second(&self) -> f64 {
        self.bytes as f64 / self.seconds / (1024.0 * 1024.0)
    }
}

/// The TLS 1.3 suites of Ferry's provider, in its order.
pub fn suites() -> Vec<SupportedCipherSuite> {
    ferry_proto::crypto::provider(Default::default())
        .cipher_suites
        .into_iter()
        .filter(|suite| suite.tls13().is_some())
        .collect()
}

/// Sends `bytes` in 16 KiB writes client → server and the same back, over a
/// connection that may use `suite` only.
pub fn run(suite: SupportedCipherSuite, bytes: u64) -> anyhow::Result<SuiteRun> {
    let (client_config, server_config) = configs(suite)?;
    let name = ServerName::try_from("bench.ferry.test")?;
    let mut client = ClientConnection::new(client_config, name)?;
    let mut server = ServerConnection::new(server_config)?;
    while client.is_handshaking() || server.is_handshaking() {
        pump(&mut client, &mut server)?;
        pump(&mut server, &mut client)?;
    }
    anyhow::ensure!(
        client.negotiated_cipher_suite() == Some(suite),
        "negotiated {:?}",
        client.negotiated_cipher_suite()
    );
    let chunk = vec![0x5a_u8; 16 * 1024];
    let mut sink = vec![0_u8; 64 * 1024];
    let started = Instant::now();
    let mut moved = 0;
    while moved < bytes {
        client.writer().write_all(&chunk)?;
        pump(&mut client, &mut server)?;
        drain(&mut server, &mut sink)?;
        server.writer().write_all(&chunk)?;
        pump(&mut server, &mut client)?;
        drain(&mut client, &mut sink)?;
        moved += 2 * chunk.len() as u64;
    }
    Ok(SuiteRun {
        suite: format!("{:?}", suite.suite()),
        bytes: moved,
        seconds: started.elapsed().as_secs_f64().max(1e-9),
    })
}

/// Moves every TLS byte `from` has to send into `to`.
fn pump(
    from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
) -> anyhow::Result<()> {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire)?;
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest)?;
        to.process_new_packets().context("processing records")?;
    }
    Ok(())
}

/// Reads all the plaintext `connection` has received.
fn drain(
    connection: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    sink: &mut [u8],
) -> anyhow::Result<()> {
    loop {
        match connection.reader().read(sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(error) => return Err(error.into()),
        }
    }
}

/// A client and a server config that allow only `suite`, with a chain the
/// client verifies.
fn configs(suite: SupportedCipherSuite) -> anyhow::Result<(Arc<ClientConfig>, Arc<ServerConfig>)> {
    configs_with(rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..ferry_proto::crypto::provider(Default::default())
    })
}

/// A client and a server config on `provider`, with a chain the client verifies.
fn configs_with(
    provider: rustls::crypto::CryptoProvider,
) -> anyhow::Result<(Arc<ClientConfig>, Arc<ServerConfig>)> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let leaf_key = KeyPair::generate()?;
    let leaf =
        CertificateParams::new(vec!["bench.ferry.test".to_owned()])?.signed_by(&leaf_key, &ca)?;
    let provider = Arc::new(provider);
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone())?;
    let mut client = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every handshake a full one, as a new pooled connection's is.
    client.resumption = rustls::client::Resumption::disabled();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)?;
    Ok((Arc::new(client), Arc::new(server)))
}

/// Runs every suite `rounds` times, alternating, `bytes` each; returns the
/// runs by suite, in the provider's order.
pub fn compare(rounds: usize, bytes: u64) -> anyhow::Result<Vec<Vec<SuiteRun>>> {
    let suites = suites();
    let mut runs = vec![Vec::new(); suites.len()];
    for round in 0..rounds {
        for i in 0..suites.len() {
            // The order rotates per round, so no suite always goes first.
            let i = (i + round) % suites.len();
            runs[i].push(run(suites[i], bytes)?);
        }
    }
    Ok(runs)
}

/// Full handshakes with one key exchange group.
#[derive(Debug, Clone)]
pub struct HandshakeRun {
    pub group: String,
    pub handshakes: u64,
    pub seconds: f64,
    /// The client's first flight (its ClientHello), in bytes.
    pub client_hello_bytes: usize,
}

impl HandshakeRun {
    pub fn per_second(&self) -> f64 {
        self.handshakes as f64 / self.seconds
    }
}

/// The key exchange groups of Ferry's provider, in its order.
pub fn groups() -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    ferry_proto::crypto::provider(Default::default()).kx_groups
}

/// `count` full TLS 1.3 handshakes (P-256 chain verified, no resumption)
/// offering and accepting `group` only: both sides' work, on one core.
pub fn handshakes(
    group: &'static dyn rustls::crypto::SupportedKxGroup,
    count: u64,
) -> anyhow::Result<HandshakeRun> {
    let (client_config, server_config) = configs_with(rustls::crypto::CryptoProvider {
        kx_groups: vec![group],
        ..ferry_proto::crypto::provider(Default::default())
    })?;
    let name = ServerName::try_from("bench.ferry.test")?;
    let mut client_hello_bytes = 0;
    let started = Instant::now();
    for _ in 0..count {
        let mut client = ClientConnection::new(Arc::clone(&client_config), name.clone())?;
        let mut server = ServerConnection::new(Arc::clone(&server_config))?;
        let mut first = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut first)?;
        }
        client_hello_bytes = first.len();
        let mut rest = &first[..];
        while !rest.is_empty() {
            server.read_tls(&mut rest)?;
            server.process_new_packets()?;
        }
        while client.is_handshaking() || server.is_handshaking() {
            pump(&mut server, &mut client)?;
            pump(&mut client, &mut server)?;
        }
        anyhow::ensure!(
            client.negotiated_key_exchange_group().map(|g| g.name()) == Some(group.name()),
            "negotiated {:?}",
            client.negotiated_key_exchange_group().map(|g| g.name())
        );
    }
    Ok(HandshakeRun {
        group: format!("{:?}", group.name()),
        handshakes: count,
        seconds: started.elapsed().as_secs_f64().max(1e-9),
        client_hello_bytes,
    })
}

/// Every group `rounds` times, the order rotating; runs by group.
pub fn compare_handshakes(rounds: usize, count: u64) -> anyhow::Result<Vec<Vec<HandshakeRun>>> {
    let groups = groups();
    let mut runs = vec![Vec::new(); groups.len()];
    for round in 0..rounds {
        for i in 0..groups.len() {
            let i = (i + round) % groups.len();
            runs[i].push(handshakes(groups[i], count)?);
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_group_completes_handshakes_and_the_hybrid_one_sends_more() {
        let runs: Vec<_> = super::groups()
            .into_iter()
            .map(|group| super::handshakes(group, 2).unwrap())
            .collect();
        assert_eq!(runs[0].group, "X25519MLKEM768", "{runs:?}");
        // The hybrid share is ML-KEM-768's 1,184-byte encapsulation key
        // beside the same 32-byte X25519 share.
        assert!(
            runs[0].client_hello_bytes >= runs[1].client_hello_bytes + 1184,
            "{runs:?}"
        );
    }

    #[test]
    fn every_suite_carries_bytes_both_ways_and_is_the_one_negotiated() {
        for suite in super::suites() {
            let run = super::run(suite, 256 * 1024).unwrap();
            assert!(run.bytes >= 256 * 1024, "{run:?}");
        }
        assert_eq!(super::suites().len(), 3, "TLS 1.3 has three suites here");
    }
}
