//! The one crypto provider of every Ferry TLS endpoint (the tunnel, both
//! ends; the CA and its clients): rustls on aws-lc-rs, with the key
//! exchange groups and cipher suites in Ferry's order.

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, aws_lc_rs};

/// Which key exchange groups a TLS endpoint offers and accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyExchange {
    /// X25519MLKEM768 (hybrid post-quantum) first, X25519 and secp256r1
    /// still accepted.
    #[default]
    PostQuantum,
    /// X25519 and secp256r1 only: for a peer or a middlebox that cannot take
    /// the larger ClientHello (an ML-KEM key share is 1,184 bytes).
    Classical,
}

impl std::str::FromStr for KeyExchange {
    type Err = UnknownKeyExchange;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "post-quantum" => Ok(KeyExchange::PostQuantum),
            "classical" => Ok(KeyExchange::Classical),
            other => Err(UnknownKeyExchange(other.to_owned())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: the key exchange is post-quantum or classical")]
pub struct UnknownKeyExchange(String);

/// The provider with `key_exchange`'s groups, in order of preference.
pub fn provider(key_exchange: KeyExchange) -> CryptoProvider {
    use aws_lc_rs::kx_group::{SECP256R1, X25519, X25519MLKEM768};
    let kx_groups = match key_exchange {
        KeyExchange::PostQuantum => vec![X25519MLKEM768, X25519, SECP256R1],
        KeyExchange::Classical => vec![X25519, SECP256R1],
    };
    let default = aws_lc_rs::default_provider();
    // TLS 1.3's suites in the order `cargo xtask bench -- --scenario
    // ciphers` measured (BENCHMARKS.md): AES-128-GCM 2,382 MiB/s,
    // AES-256-GCM 2,202, ChaCha20-Poly1305 602 on this machine's AES-NI.
    // AES-128 is NIST's post-quantum security category 1; ChaCha20 stays
    // for peers without AES instructions. TLS 1.2's follow, as rustls has them.
    use aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    cipher_suites.extend(
        default
            .cipher_suites
            .iter()
            .filter(|suite| suite.tls13().is_none())
            .copied(),
    );
    CryptoProvider {
        kx_groups,
        cipher_suites,
        ..default
    }
}

/// [`provider`], shared.
pub fn shared_provider(key_exchange: KeyExchange) -> Arc<CryptoProvider> {
    Arc::new(provider(key_exchange))
}

/// The IANA name of a negotiated key exchange group, as metrics and logs
/// show it (`X25519MLKEM768`, `X25519`, `secp256r1`); `none` when no
/// handshake finished.
pub fn group_name(group: Option<rustls::NamedGroup>) -> &'static str {
    use rustls::NamedGroup;
    match group {
        Some(NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(NamedGroup::X25519) => "X25519",
        Some(NamedGroup::secp256r1) => "secp256r1",
        Some(NamedGroup::secp384r1) => "secp384r1",
        Some(NamedGroup::MLKEM768) => "MLKEM768",
        Some(_) => "other",
        None => "none",
    }
}

/// The group a finished handshake negotiated.
pub fn negotiated_group(connection: &rustls::CommonState) -> &'static str {
    group_name(
        connection
            .negotiated_key_exchange_group()
            .map(|group| group.name()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_quantum_comes_first_and_classical_leaves_it_out() {
        let names = |kx: KeyExchange| -> Vec<&str> {
            provider(kx)
                .kx_groups
                .iter()
                .map(|g| group_name(Some(g.name())))
                .collect()
        };
        assert_eq!(
            names(KeyExchange::PostQuantum),
            ["X25519MLKEM768", "X25519", "secp256r1"]
        );
        assert_eq!(names(KeyExchange::Classical), ["X25519", "secp256r1"]);
    }

    #[test]
    fn aes_128_gcm_is_offered_first() {
        let suites: Vec<String> = provider(KeyExchange::PostQuantum)
            .cipher_suites
            .iter()
            .take(3)
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(
            suites,
            [
                "TLS13_AES_128_GCM_SHA256",
                "TLS13_AES_256_GCM_SHA384",
                "TLS13_CHACHA20_POLY1305_SHA256"
            ]
        );
    }
}
