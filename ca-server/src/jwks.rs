//! The JWKS file the CA verifies tokens against, re-read when it changes.
//!
//! The API server rotates its ServiceAccount signing keys by publishing the
//! new key beside the old one; the file (a mounted ConfigMap holding
//! `/openid/v1/jwks`) follows, and the CA must follow without a restart. A
//! replacement that does not parse or holds no usable key is refused and
//! logged, and the keys in use stay.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use ferry_proto::Untrusted;

use crate::{jwt::Verifier, metrics::Metrics, serve::RELOAD_INTERVAL};

pub struct JwksFile {
    path: PathBuf,
    issuer: String,
    audience: String,
    current: RwLock<Arc<Verifier>>,
    /// The bytes the current keys were read from.
    seen: Mutex<Vec<u8>>,
}

/// What a reload found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    Unchanged,
    /// New keys are in use; this many.
    Replaced(usize),
}

impl JwksFile {
    pub fn load(path: &Path, issuer: &str, audience: &str) -> Result<Self, String> {
        let bytes = read(path)?;
        let verifier = parse(path, &bytes, issuer, audience)?;
        Ok(Self {
            path: path.to_owned(),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            current: RwLock::new(Arc::new(verifier)),
            seen: Mutex::new(bytes),
        })
    }

    /// The keys in use now.
    pub fn verifier(&self) -> Arc<Verifier> {
        Arc::clone(&self.current.read().expect("jwks lock"))
    }

    /// Reads the file again; changed, valid keys replace the current ones.
    /// A changed, invalid file is an error and changes nothing, and is not
    /// reported again until it changes once more.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let bytes = read(&self.path)?;
        let mut seen = self.seen.lock().expect("jwks lock");
        if *seen == bytes {
            return Ok(Reloaded::Unchanged);
        }
        let parsed = parse(&self.path, &bytes, &self.issuer, &self.audience);
        *seen = bytes;
        let verifier = parsed?;
        let keys = verifier.key_count();
        *self.current.write().expect("jwks lock") = Arc::new(verifier);
        Ok(Reloaded::Replaced(keys))
    }
}

/// Reloads the file every [`RELOAD_INTERVAL`].
pub async fn watch(jwks: Arc<JwksFile>, metrics: Arc<Metrics>) {
    metrics.jwks_keys(jwks.verifier().key_count());
    loop {
        tokio::time::sleep(RELOAD_INTERVAL).await;
        match jwks.reload() {
            Ok(Reloaded::Unchanged) => {}
            Ok(Reloaded::Replaced(keys)) => {
                metrics.jwks_keys(keys);
                tracing::info!(file = %jwks.path.display(), keys, "token keys (JWKS) reloaded");
            }
            Err(error) => {
                metrics.jwks_reload_failed();
                tracing::error!(error = %Untrusted(&error), "refused the replacement token keys (JWKS); the keys in use stay");
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read JWKS {}: {e}", path.display()))
}

fn parse(path: &Path, bytes: &[u8], issuer: &str, audience: &str) -> Result<Verifier, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("JWKS {} is not UTF-8: {e}", path.display()))?;
    Verifier::from_jwks_json(text, issuer, audience)
        .map_err(|e| format!("JWKS {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::{Minter, TokenError, TokenRequest};

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    fn token(minter: &Minter) -> String {
        minter
            .mint(&TokenRequest {
                namespace: "ferry-system".to_owned(),
                service_account: "ferry-agent".to_owned(),
                node: "n1".to_owned(),
                pod: "ferry-agent-1".to_owned(),
                audience: vec!["ferry-ca".to_owned()],
                lifetime_secs: 600,
            })
            .unwrap()
    }

    fn write(path: &Path, minters: &[&Minter]) {
        let keys: Vec<_> = minters.iter().flat_map(|m| m.jwks().keys).collect();
        std::fs::write(path, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    }

    /// A directory removed when the test ends, passed or not.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_rotation_is_followed_and_a_broken_file_keeps_the_keys_in_use() {
        let dir = TempDir(std::env::temp_dir().join(format!("ferry-jwks-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("jwks.json");
        let (old, new) = (
            Minter::generate(ISSUER).unwrap(),
            Minter::generate(ISSUER).unwrap(),
        );
        write(&path, &[&old]);
        let jwks = JwksFile::load(&path, ISSUER, "ferry-ca").unwrap();
        assert_eq!(jwks.reload(), Ok(Reloaded::Unchanged));
        jwks.verifier().verify(&token(&old)).expect("the old key");
        assert!(matches!(
            jwks.verifier().verify(&token(&new)),
            Err(TokenError::Signature(_))
        ));

        // The API server publishes the new key beside the old, then drops the old.
        write(&path, &[&old, &new]);
        assert_eq!(jwks.reload(), Ok(Reloaded::Replaced(2)));
        jwks.verifier()
            .verify(&token(&old))
            .expect("old, during the rotation");
        jwks.verifier()
            .verify(&token(&new))
            .expect("new, during the rotation");
        write(&path, &[&new]);
        assert_eq!(jwks.reload(), Ok(Reloaded::Replaced(1)));
        assert!(jwks.verifier().verify(&token(&old)).is_err());

        // A truncated file and one with no usable key are refused once each.
        std::fs::write(&path, "{\"keys\": [").unwrap();
        let error = jwks.reload().unwrap_err();
        assert!(error.contains("not a JSON Web Key Set"), "{error}");
        assert_eq!(jwks.reload(), Ok(Reloaded::Unchanged));
        std::fs::write(&path, "{\"keys\": []}").unwrap();
        assert!(jwks.reload().unwrap_err().contains("no usable key"));
        jwks.verifier()
            .verify(&token(&new))
            .expect("the keys in use stayed");
    }
}
