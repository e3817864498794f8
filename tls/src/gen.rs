//! Making certificates: a cluster CA, and the certificates it signs for daemons and clients.
//!
//! Every certificate (CA included) is ECDSA P-256, valid from an hour ago for ten years.
//! Leaves carry the key usages and extended key usages (TLS server and client) that QEMU's
//! `tls-creds-x509` checks, so one file serves as a daemon's server certificate and as a
//! client certificate. File names follow QEMU's and libnbd's layout ([`CA_CERT`],
//! [`SERVER_CERT`], ...); private keys are written mode 0600.

use std::io::Write;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::TlsError;

/// The CA certificate, in a directory QEMU or libnbd reads.
pub const CA_CERT: &str = "ca-cert.pem";
/// The CA's private key (kept beside the CA certificate where certificates are made).
pub const CA_KEY: &str = "ca-key.pem";
/// An NBD server's certificate and key, as QEMU's `tls-creds-x509,endpoint=server` reads.
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
/// An NBD client's certificate and key (`tls-creds-x509,endpoint=client`, libnbd's
/// `tls-certificates=DIR`).
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

const VALID_DAYS: i64 = 3650;

fn gen_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A certificate authority that can sign.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A signed certificate and its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertificateAuthority {
    /// A new CA named `common_name` (e.g. "basalt CA <fsid>").
    pub fn generate(common_name: &str) -> Result<CertificateAuthority, TlsError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = ca_params(common_name);
        validity(&mut params);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA of `dir` (its [`CA_CERT`] and [`CA_KEY`]). Signing needs only the CA's name and
    /// key, both read back from the files.
    pub fn load(dir: &Path) -> Result<CertificateAuthority, TlsError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let certs = crate::files::certs(&cert_path)?;
        let name = crate::files::subject_common_name(certs[0].as_ref()).ok_or_else(|| {
            TlsError::BadFile {
                path: cert_path.clone(),
                message: "the CA certificate has no common name".into(),
            }
        })?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(|source| TlsError::Read {
            what: "CA key",
            path: key_path.clone(),
            source,
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::BadFile {
            path: key_path,
            message: format!("not a PEM private key: {e}"),
        })?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(|source| TlsError::Read {
            what: "CA certificate",
            path: cert_path,
            source,
        })?;
        Ok(CertificateAuthority {
            issuer: Issuer::new(ca_params(&name), key),
            cert_pem,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes [`CA_CERT`] and [`CA_KEY`] (0600) into `dir` (created if missing).
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        create_dir(dir)?;
        write_public(&dir.join(CA_CERT), &self.cert_pem)?;
        write_private(&dir.join(CA_KEY), &self.issuer.key().serialize_pem())
    }

    /// A certificate for `common_name` (an entity name: `osd.3`, `client.admin`), valid as a
    /// TLS server for `names` (IP addresses or DNS names) and as a TLS client.
    pub fn issue(&self, common_name: &str, names: &[String]) -> Result<Issued, TlsError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Issued {
    /// Writes the certificate and the key (0600).
    pub fn write(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        write_public(cert, &self.cert_pem)?;
        write_private(key, &self.key_pem)
    }
}

/// Which end of NBD a certificate directory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdEnd {
    Server,
    Client,
}

/// Writes `dir` in QEMU's `tls-creds-x509` layout: [`CA_CERT`], and the certificate and key
/// under the server or client names.
pub fn write_nbd_dir(
    dir: &Path,
    ca_cert_pem: &str,
    issued: &Issued,
    end: NbdEnd,
) -> Result<(), TlsError> {
    create_dir(dir)?;
    write_public(&dir.join(CA_CERT), ca_cert_pem)?;
    let (cert, key) = match end {
        NbdEnd::Server => (SERVER_CERT, SERVER_KEY),
        NbdEnd::Client => (CLIENT_CERT, CLIENT_KEY),
    };
    issued.write(&dir.join(cert), &dir.join(key))
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_public(path: &Path, text: &str) -> Result<(), TlsError> {
    std::fs::write(path, text).map_err(|source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a private key readable by its owner only (created 0600, never wider for a moment).
pub fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    // An existing file keeps its mode on open: narrow it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)
}
