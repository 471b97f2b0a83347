//! `ferry-ca bootstrap`: a new trust anchor (root) and an issuing
//! intermediate, ECDSA P-256, written as Kubernetes mounts a TLS Secret.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
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
