//! The issuing CA: the intermediate certificate and key that sign leaves,
//! and the trust bundle (the roots) they chain to. Both come from files (a
//! mounted Secret and ConfigMap) and are checked as a whole before use.

use std::{path::Path, sync::Arc, time::Duration};

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber, SubjectPublicKeyInfo, string::Ia5String,
};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use time::OffsetDateTime;

use ferry_proto::SpiffeId;

/// The issuer's files, named as a Kubernetes TLS Secret mounts them.
pub const ISSUER_CERT_FILE: &str = "tls.crt";
pub const ISSUER_KEY_FILE: &str = "tls.key";

/// A loaded, checked issuer with the roots it chains to.
pub struct Issuer {
    pub cert_der: CertificateDer<'static>,
    signer: rcgen::Issuer<'static, KeyPair>,
    pub not_after: OffsetDateTime,
    /// Every root the mesh trusts (several during a rotation).
    pub roots: Vec<CertificateDer<'static>>,
    /// Fingerprint-ish label for logs: the issuer's subject and serial.
    pub label: String,
}

/// What a leaf certificate looks like.
#[derive(Debug, Clone, Copy)]
pub struct LeafPolicy {
    pub lifetime: Duration,
    /// How far back NotBefore goes, for peers whose clocks run behind.
    pub clock_skew: Duration,
}

/// A signed leaf.
pub struct Leaf {
    pub der: CertificateDer<'static>,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

impl Issuer {
    /// Loads `tls.crt` and `tls.key` from `dir` and the roots from `bundle`,
    /// and checks that they belong together.
    pub fn load(dir: &Path, bundle: &Path) -> Result<Self, String> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let cert_path = dir.join(ISSUER_CERT_FILE);
        let key_path = dir.join(ISSUER_KEY_FILE);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let bundle_pem = read(bundle)?;
        let cert_der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .next()
            .ok_or_else(|| format!("{} holds no certificate", cert_path.display()))?
            .map_err(|e| format!("{} is not a PEM certificate: {e}", cert_path.display()))?;
        let roots = CertificateDer::pem_slice_iter(bundle_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{} is not PEM certificates: {e}", bundle.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| format!("{} is not a PEM private key: {e}", key_path.display()))?;
        Self::new(cert_der, key, roots).map_err(|e| format!("issuer in {}: {e}", dir.display()))
    }

    /// Checks the issuer: a CA certificate, its key, valid now, chaining to one of `roots`.
    pub fn new(
        cert_der: CertificateDer<'static>,
        key: KeyPair,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, String> {
        if roots.is_empty() {
            return Err("the trust bundle holds no root".to_owned());
        }
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| format!("the certificate does not parse: {e}"))?;
        if !cert.is_ca() {
            return Err("the certificate is not a CA (basicConstraints cA=false)".to_owned());
        }
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err("the private key does not belong to the certificate".to_owned());
        }
        let now = OffsetDateTime::now_utc();
        let not_after = cert.validity().not_after.to_datetime();
        if now > not_after || now < cert.validity().not_before.to_datetime() {
            return Err(format!(
                "the certificate is not valid now (valid {} to {})",
                cert.validity().not_before,
                cert.validity().not_after
            ));
        }
        chains_to_roots(&cert_der, &roots)
            .map_err(|e| format!("the certificate does not chain to the trust bundle: {e}"))?;
        let label = format!("{} serial {}", cert.subject(), cert.raw_serial_as_string());
        let signer = rcgen::Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| format!("cannot sign with it: {e}"))?;
        Ok(Self {
            cert_der,
            signer,
            not_after,
            roots,
            label,
        })
    }

    /// Signs a leaf for `identity` with the requester's key `spki_der`.
    pub fn sign_leaf(
        &self,
        identity: &SpiffeId,
        spki_der: &[u8],
        policy: LeafPolicy,
    ) -> Result<Leaf, String> {
        let public_key = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| format!("the requester's key: {e}"))?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, identity.trust_domain());
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(identity.to_string()).map_err(|e| e.to_string())?,
        )];
        params.not_before = now - policy.clock_skew;
        params.not_after = (now + policy.lifetime).min(self.not_after);
        let serial = random_serial()?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&public_key, &self.signer)
            .map_err(|e| format!("signing failed: {e}"))?;
        Ok(Leaf {
            der: cert.der().clone(),
            serial_hex: serial.iter().map(|b| format!("{b:02x}")).collect(),
            not_after: params.not_after,
        })
    }

    /// A serving certificate for the CA itself, for `names` (DNS names or IPs).
    pub fn sign_server(
        &self,
        names: &[String],
        key: &KeyPair,
    ) -> Result<CertificateDer<'static>, String> {
        let mut params = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "ferry-ca");
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(300);
        params.not_after = (now + Duration::from_secs(7 * 24 * 3600)).min(self.not_after);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(key, &self.signer)
            .map_err(|e| format!("signing the CA's serving certificate failed: {e}"))?;
        Ok(cert.der().clone())
    }
}

/// 128 random bits, top bit clear so the DER INTEGER stays positive.
fn random_serial() -> Result<[u8; 16], String> {
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| "no randomness for a serial number".to_owned())?;
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    Ok(serial)
}

/// Checks that `cert` (the issuer) is signed by one of `roots`, or is one.
pub fn chains_to_roots(
    cert: &CertificateDer<'_>,
    roots: &[CertificateDer<'static>],
) -> Result<(), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    for root in roots {
        let (_, root_parsed) = x509_parser::parse_x509_certificate(root)
            .map_err(|e| format!("a root in the bundle does not parse: {e}"))?;
        if root.as_ref() == cert.as_ref() {
            return Ok(());
        }
        if parsed.issuer() == root_parsed.subject()
            && parsed
                .verify_signature(Some(root_parsed.public_key()))
                .is_ok()
        {
            return Ok(());
        }
    }
    Err(format!(
        "no root in the bundle ({} roots) signed it (issuer {})",
        roots.len(),
        parsed.issuer()
    ))
}

pub type SharedIssuer = Arc<Issuer>;
