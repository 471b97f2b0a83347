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
    CryptoProvider {
        kx_groups,
        ..aws_lc_rs::default_provider()
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
pub fn negotiated_group<D>(connection: &rustls::ConnectionCommon<D>) -> &'static str {
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
}
