//! `ferry-ca bootstrap`: a new trust anchor (root) and an issuing
//! intermediate, ECDSA P-256, written as Kubernetes mounts a TLS Secret,
//! and on request as the Secret and ConfigMap `daemonset/` mounts.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use time::OffsetDateTime;

use crate::issuer::{ISSUER_CERT_FILE, ISSUER_KEY_FILE};

pub const DEFAULT_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const DEFAULT_ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The trust bundle: every root the mesh trusts, PEM.
pub const TRUST_BUNDLE_FILE: &str = "ca.crt";
pub const ROOT_KEY_FILE: &str = "root.key";
pub const ISSUER_DIR: &str = "issuer";

/// The namespace `daemonset/` installs Ferry into.
pub const KUBERNETES_NAMESPACE: &str = "ferry-system";
/// The issuer Secret the CA Deployment mounts at its `--issuer-dir`.
pub const ISSUER_SECRET: &str = "ferry-ca-issuer";
/// The trust bundle ConfigMap (key [`TRUST_BUNDLE_FILE`]) the CA and every agent mount.
pub const TRUST_BUNDLE_CONFIG_MAP: &str = "ferry-trust-bundle";

/// What bootstrap wrote.
pub struct Bootstrapped {
    pub trust_bundle: PathBuf,
    pub root_key: PathBuf,
    pub issuer_dir: PathBuf,
}

pub fn bootstrap(
    out: &Path,
    trust_domain: &str,
    root_lifetime: Duration,
    issuer_lifetime: Duration,
) -> Result<Bootstrapped, String> {
    if issuer_lifetime > root_lifetime {
        return Err(
            "the issuer cannot outlive the root: --issuer-lifetime > --root-lifetime".into(),
        );
    }
    let now = OffsetDateTime::now_utc();
    let root_key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut root = ca_params(&format!("Ferry root CA ({trust_domain})"), trust_domain, 1);
    root.not_before = now - Duration::from_secs(3600);
    root.not_after = now + root_lifetime;
    let root_cert = root.self_signed(&root_key).map_err(|e| e.to_string())?;

    let issuer_key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut issuer = ca_params(&format!("Ferry issuer ({trust_domain})"), trust_domain, 0);
    issuer.not_before = now - Duration::from_secs(3600);
    issuer.not_after = now + issuer_lifetime;
    issuer.use_authority_key_identifier_extension = true;
    let signer = rcgen::Issuer::from_params(&root, &root_key);
    let issuer_cert = issuer
        .signed_by(&issuer_key, &signer)
        .map_err(|e| e.to_string())?;

    let issuer_dir = out.join(ISSUER_DIR);
    fs::create_dir_all(&issuer_dir)
        .map_err(|e| format!("cannot create {}: {e}", issuer_dir.display()))?;
    let written = Bootstrapped {
        trust_bundle: out.join(TRUST_BUNDLE_FILE),
        root_key: out.join(ROOT_KEY_FILE),
        issuer_dir: issuer_dir.clone(),
    };
    write(&written.trust_bundle, &root_cert.pem(), 0o644)?;
    write(&written.root_key, &root_key.serialize_pem(), 0o600)?;
    write(
        &issuer_dir.join(ISSUER_CERT_FILE),
        &issuer_cert.pem(),
        0o644,
    )?;
    write(
        &issuer_dir.join(ISSUER_KEY_FILE),
        &issuer_key.serialize_pem(),
        0o600,
    )?;
    write(&issuer_dir.join(TRUST_BUNDLE_FILE), &root_cert.pem(), 0o644)?;
    Ok(written)
}

/// The issuer Secret (`kubernetes.io/tls`: `tls.crt`, `tls.key`, `ca.crt`)
/// and the trust bundle ConfigMap (`ca.crt`) in [`KUBERNETES_NAMESPACE`], as
/// one YAML stream for `kubectl apply -f`. Reads only the issuer directory
/// and the trust bundle: the root key is never read, so it cannot leak here.
pub fn kubernetes_manifests(issuer_dir: &Path, trust_bundle: &Path) -> Result<String, String> {
    let read =
        |path: PathBuf| fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let secret = Secret {
        metadata: kubernetes_metadata(ISSUER_SECRET),
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(
            [
                (ISSUER_CERT_FILE, issuer_dir.join(ISSUER_CERT_FILE)),
                (ISSUER_KEY_FILE, issuer_dir.join(ISSUER_KEY_FILE)),
                (TRUST_BUNDLE_FILE, issuer_dir.join(TRUST_BUNDLE_FILE)),
            ]
            .into_iter()
            .map(|(key, path)| Ok((key.to_owned(), ByteString(read(path)?))))
            .collect::<Result<_, String>>()?,
        ),
        ..Default::default()
    };
    let bundle = String::from_utf8(read(trust_bundle.to_owned())?)
        .map_err(|_| format!("{} is not PEM text", trust_bundle.display()))?;
    let config_map = ConfigMap {
        metadata: kubernetes_metadata(TRUST_BUNDLE_CONFIG_MAP),
        data: Some([(TRUST_BUNDLE_FILE.to_owned(), bundle)].into()),
        ..Default::default()
    };
    let yaml = |e: serde_yaml::Error| format!("cannot write the manifests as YAML: {e}");
    Ok(format!(
        "# Written by `ferry-ca bootstrap`: the issuer (with its private key) and the\n\
         # trust bundle for namespace {KUBERNETES_NAMESPACE}. Apply with `kubectl apply -f`.\n\
         {}---\n{}",
        serde_yaml::to_string(&secret).map_err(yaml)?,
        serde_yaml::to_string(&config_map).map_err(yaml)?,
    ))
}

/// Writes [`kubernetes_manifests`] of what bootstrap wrote to `file`, readable
/// by the owner only (it holds the issuer's key).
pub fn write_kubernetes_manifests(written: &Bootstrapped, file: &Path) -> Result<(), String> {
    let manifests = kubernetes_manifests(&written.issuer_dir, &written.trust_bundle)?;
    write(file, &manifests, 0o600)
}

fn kubernetes_metadata(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(KUBERNETES_NAMESPACE.to_owned()),
        labels: Some(
            [
                ("app.kubernetes.io/name", "ferry-ca"),
                ("app.kubernetes.io/part-of", "ferry"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
        ),
        ..Default::default()
    }
}

fn ca_params(common_name: &str, trust_domain: &str, path_len: u8) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Writes a file with `mode` from the start (a key is never world-readable, not even briefly).
fn write(path: &Path, contents: &str, mode: u32) -> Result<(), String> {
    let partial = path.with_extension("partial");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&partial)
        .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    fs::rename(&partial, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn bootstrapped(name: &str) -> (TempDir, Bootstrapped) {
        let dir =
            std::env::temp_dir().join(format!("ferry-bootstrap-{name}-{}", std::process::id()));
        let written = bootstrap(
            &dir,
            "cluster.local",
            Duration::from_secs(10 * 86400),
            Duration::from_secs(5 * 86400),
        )
        .unwrap();
        (TempDir(dir), written)
    }

    fn documents(yaml: &str) -> Vec<serde_yaml::Value> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|document| serde::Deserialize::deserialize(document).unwrap())
            .collect()
    }

    #[test]
    fn manifests_hold_the_issuer_secret_and_the_trust_bundle() {
        let (_dir, written) = bootstrapped("manifests");
        let yaml = kubernetes_manifests(&written.issuer_dir, &written.trust_bundle).unwrap();
        let [secret, config_map] = <[serde_yaml::Value; 2]>::try_from(documents(&yaml)).unwrap();
        let secret: Secret = serde_yaml::from_value(secret).unwrap();
        let config_map: ConfigMap = serde_yaml::from_value(config_map).unwrap();

        assert_eq!(secret.metadata.name.as_deref(), Some("ferry-ca-issuer"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("ferry-system"));
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let data = secret.data.unwrap();
        let file = |name: &str| fs::read(written.issuer_dir.join(name)).unwrap();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            ["ca.crt", "tls.crt", "tls.key"]
        );
        for (key, value) in &data {
            assert_eq!(value.0, file(key), "{key}");
        }

        assert_eq!(
            config_map.metadata.name.as_deref(),
            Some("ferry-trust-bundle")
        );
        assert_eq!(
            config_map.metadata.namespace.as_deref(),
            Some("ferry-system")
        );
        let bundle = fs::read_to_string(&written.trust_bundle).unwrap();
        assert_eq!(config_map.data.unwrap()["ca.crt"], bundle);
    }

    #[test]
    fn manifests_never_carry_the_root_key() {
        let (_dir, written) = bootstrapped("rootkey");
        let file = written.root_key.with_file_name("ferry-ca.yaml");
        write_kubernetes_manifests(&written, &file).unwrap();
        let yaml = fs::read_to_string(&file).unwrap();
        // What a reader of the file sees: the text, and the Secret's values decoded.
        let secret: Secret = serde_yaml::from_value(documents(&yaml).remove(0)).unwrap();
        let mut texts = vec![yaml];
        texts.extend(
            secret
                .data
                .unwrap()
                .into_values()
                .map(|value| String::from_utf8(value.0).unwrap()),
        );
        let root_key = fs::read_to_string(&written.root_key).unwrap();
        for line in root_key.lines().filter(|line| !line.starts_with("-----")) {
            assert!(
                texts.iter().all(|text| !text.contains(line)),
                "the root key is in the manifests"
            );
        }
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the manifests hold the issuer key: {mode:o}"
        );
    }

    #[test]
    fn missing_issuer_files_are_named() {
        let (_dir, written) = bootstrapped("missing");
        fs::remove_file(written.issuer_dir.join(ISSUER_KEY_FILE)).unwrap();
        let error = kubernetes_manifests(&written.issuer_dir, &written.trust_bundle).unwrap_err();
        assert!(error.contains("tls.key"), "{error}");
    }
}
