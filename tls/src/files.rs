//! Reading certificates and keys (PEM), and the one field of a certificate basalt reads
//! itself: the subject's common name.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::TlsError;

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file, in order (a chain: leaf first).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read("certificate file", path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadFile {
            path: path.to_path_buf(),
            message: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what: "certificate",
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key file", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::BadFile {
        path: path.to_path_buf(),
        message: format!("no PEM private key in it: {e}"),
    })
}

/// The CA certificates of `path` as trust anchors.
pub fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| TlsError::BadFile {
            path: path.to_path_buf(),
            message: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// One DER element: (tag, contents, rest). `None` on anything malformed.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
/// 2.5.4.3, id-at-commonName.
const COMMON_NAME_OID: &[u8] = &[0x55, 0x04, 0x03];

/// The subject CN of a DER X.509 certificate (the last one if several); `None` if the
/// certificate has none or does not parse. Certificate → tbsCertificate → [version],
/// serial, signature, issuer, validity, subject → RDNs → (type, value).
pub(crate) fn subject_common_name(cert: &[u8]) -> Option<String> {
    let (tag, certificate, _) = der_element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = der_element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // The explicit [0] version is optional.
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    // serial, signature, issuer, validity
    for _ in 0..4 {
        rest = der_element(rest)?.2;
    }
    let (tag, mut rdns, _) = der_element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut found = None;
    while !rdns.is_empty() {
        let (tag, set, after) = der_element(rdns)?;
        rdns = after;
        if tag != SET {
            return None;
        }
        let mut atvs = set;
        while !atvs.is_empty() {
            let (tag, atv, after) = der_element(atvs)?;
            atvs = after;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_element(atv)?;
            if tag == OID && oid == COMMON_NAME_OID {
                // UTF8String, PrintableString, IA5String and the like: the bytes are text.
                let (_, text, _) = der_element(value)?;
                found = Some(String::from_utf8(text.to_vec()).ok()?);
            }
        }
    }
    found
}
